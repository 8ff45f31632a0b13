//! The ingest side of a room: program frames in, storage jobs out (sans-IO, behind the room's
//! mutex).

use super::{key, rkey, RoomError};
#[cfg(feature = "aac")]
use crate::aac::AacRendition;
use crate::playlist::{part_name, segment_name, Rendition};
use crate::recording_index::{render_turns, TURNS_FILE};
use crate::segmenter::{ProgramFrame, Segmenter, SegmenterOutput};
use crate::speakers::{Speaker, SpeakerTimeline};
use crate::storage::ObjectMeta;
use crate::upload::{Job, Publish};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};
use tokio::sync::Notify;

/// Jobs the ingest side hands to the room's uploader (drained at once; the uploader's
/// [`Lane`] holds them from then on).
#[derive(Debug, Default)]
pub(super) struct Inbox {
    jobs: Mutex<(Vec<Job>, bool)>,
    pub(super) notify: Notify,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Job>, bool)> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hand over a job (ignored once closed).
    pub(super) fn push(&self, job: Job) {
        let mut j = self.lock();
        if j.1 {
            return;
        }
        j.0.push(job);
        drop(j);
        self.notify.notify_one();
    }

    /// No more jobs (after the `End` job).
    fn close(&self) {
        self.lock().1 = true;
        self.notify.notify_one();
    }

    /// The jobs handed over so far, and whether the inbox is closed.
    pub(super) fn take(&self) -> (Vec<Job>, bool) {
        let mut j = self.lock();
        (std::mem::take(&mut j.0), j.1)
    }
}

/// The ingest side of a room, behind the room's mutex.
pub struct RoomCore {
    room: RoomId,
    renditions: &'static [Rendition],
    segmenter: Segmenter,
    #[cfg(feature = "aac")]
    aac: Option<AacRendition>,
    speakers: SpeakerTimeline,
    active_stream: Option<u64>,
    end_requested: bool,
    finished: bool,
    inbox: Arc<Inbox>,
}

impl RoomCore {
    /// A room's ingest side, queueing into `inbox`.
    pub(super) fn new(
        room: RoomId,
        renditions: &'static [Rendition],
        segmenter: Segmenter,
        #[cfg(feature = "aac")] aac: Option<AacRendition>,
        speakers: SpeakerTimeline,
        inbox: Arc<Inbox>,
    ) -> Self {
        RoomCore {
            room,
            renditions,
            segmenter,
            #[cfg(feature = "aac")]
            aac,
            speakers,
            active_stream: None,
            end_requested: false,
            finished: false,
            inbox,
        }
    }

    /// Room id.
    pub fn room(&self) -> RoomId {
        self.room
    }

    /// A program stream (generation `gen`) started. A still-active older stream is superseded.
    pub fn start_stream(&mut self, gen: u64) -> Result<(), RoomError> {
        if self.finished {
            return Ok(());
        }
        if let Some(old) = self.active_stream.replace(gen) {
            tracing::info!(room = %self.room, old, new = gen, "program stream superseded");
            self.stop()?;
        }
        Ok(())
    }

    /// One program frame of stream `gen` (`speaker`: the loudest speaker's id, 0 if none).
    /// Frames of superseded streams or ended rooms are dropped.
    pub fn frame(
        &mut self,
        gen: u64,
        frame: ProgramFrame<'_>,
        speaker: u32,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), RoomError> {
        if self.finished || self.active_stream != Some(gen) {
            return Ok(());
        }
        let out = self.segmenter.push(frame, now, wall)?;
        if let Some(at) = self.segmenter.last_program_time() {
            self.speakers.push(speaker, at);
        }
        #[cfg(feature = "aac")]
        if let (Some(aac), Some(ext)) = (&mut self.aac, self.segmenter.last_ext()) {
            aac.push_opus(frame.payload, ext)?;
        }
        self.enqueue(out)
    }

    /// Stream `gen` said who participant `speaker` is (records of superseded streams are
    /// dropped).
    pub fn identify(&mut self, gen: u64, speaker: u32, who: Speaker) {
        if self.finished || self.active_stream != Some(gen) {
            return;
        }
        self.speakers.identify(speaker, who);
    }

    fn stop(&mut self) -> Result<(), RoomError> {
        let out = self.segmenter.stream_stopped()?;
        self.speakers.stop();
        self.enqueue(out)
    }

    fn enqueue(&mut self, outputs: Vec<SegmenterOutput>) -> Result<(), RoomError> {
        for o in outputs {
            #[cfg(feature = "aac")]
            let aac = match &mut self.aac {
                Some(a) => a.follow(&o)?,
                None => None,
            };
            let segment_done = matches!(o, SegmenterOutput::Segment(_));
            self.push_output(0, o);
            #[cfg(feature = "aac")]
            if let Some(a) = aac {
                self.push_output(1, a);
            }
            if segment_done {
                self.store_turns();
            }
        }
        Ok(())
    }

    /// Queue the speaker turns so far (with the one in progress) for storage: a restarted
    /// packager reads them back into the room's recording.
    fn store_turns(&self) {
        let spans = self.speakers.spans();
        if spans.is_empty() {
            return;
        }
        self.inbox.push(Job::Put {
            key: key(self.room, TURNS_FILE),
            body: Bytes::from(render_turns(&spans)),
            meta: ObjectMeta::INDEX,
            publish: Publish::Nothing,
        });
    }

    fn push_output(&self, ri: usize, o: SegmenterOutput) {
        let Some(r) = self.renditions.get(ri).copied() else {
            return;
        };
        let job = match o {
            SegmenterOutput::Part(p) => Job::Put {
                key: rkey(self.room, r, &part_name(p.msn, p.index)),
                body: Bytes::from(p.bytes),
                meta: ObjectMeta::MEDIA,
                publish: Publish::Part {
                    rendition: ri,
                    msn: p.msn,
                    index: p.index,
                    duration: p.duration,
                    start: p.segment_start,
                    arrival: p.last_arrival,
                },
            },
            SegmenterOutput::Segment(s) => Job::Put {
                key: rkey(self.room, r, &segment_name(s.msn)),
                body: Bytes::from(s.bytes),
                meta: ObjectMeta::MEDIA,
                publish: Publish::Segment {
                    rendition: ri,
                    msn: s.msn,
                    start: s.start,
                    duration: s.duration,
                },
            },
        };
        self.inbox.push(job);
    }

    /// Stream `gen` finished or broke: the program stopped (or, after `RoomEnded`, the room ended).
    pub fn stream_finished(&mut self, gen: u64) -> Result<(), RoomError> {
        if self.active_stream != Some(gen) {
            return Ok(());
        }
        self.active_stream = None;
        if self.finished {
            return Ok(());
        }
        self.stop()?;
        if self.end_requested {
            self.finish()?;
        }
        Ok(())
    }

    /// The origin said the room ended. Finishes now if no program stream is running, otherwise
    /// when it finishes (or on [`RoomCore::force_end`]).
    pub fn room_ended(&mut self) -> Result<(), RoomError> {
        self.end_requested = true;
        if self.active_stream.is_none() {
            self.finish()?;
        }
        Ok(())
    }

    /// End the room now, flushing a still-running stream.
    pub fn force_end(&mut self) -> Result<(), RoomError> {
        self.active_stream = None;
        self.finish()
    }

    fn finish(&mut self) -> Result<(), RoomError> {
        if self.finished {
            return Ok(());
        }
        self.stop()?;
        self.finished = true;
        self.inbox.push(Job::End {
            spans: self.speakers.spans(),
        });
        self.inbox.close();
        tracing::info!(room = %self.room, "room ended: finishing playlists and the recording");
        Ok(())
    }
}
