//! Per-room driver. The ingest side ([`RoomCore`]) feeds the sans-IO segmenter, the AAC
//! rendition and the speaker timeline and queues what they produce; the room's uploader task
//! stores each object in order and only then publishes it: playlists are updated, snapshots go
//! to blocked HTTP requests through `watch` channels, recent objects stay in a small memory
//! cache for the HTTP origin.

#[cfg(feature = "aac")]
use crate::aac::AacRendition;
use crate::chapters::{CHAPTERS_JSON, CHAPTERS_VTT};
use crate::fmp4::{init_segment, MuxError};
use crate::h1::{release_waiters, render_blocking_answer, Waiter};
use crate::metrics::Metrics;
use crate::playlist::{
    multivariants, part_name, renditions, segment_name, MediaPlaylist, PlaylistError,
    PlaylistStatus, Rendition, RenditionReport, INIT_NAME,
};
use crate::recording_index::{
    chunk_name, chunk_of, parse_chunk, parse_turns, plan_resume, render_chunk, render_turns,
    Resume, TURNS_FILE,
};
use crate::segmenter::{ProgramFrame, Segmenter, SegmenterOutput};
use crate::speakers::{Speaker, SpeakerTimeline};
use crate::spill::{Recovery, SpillDir};
use crate::storage::{ObjectMeta, Storage, StorageError, Store};
use crate::upload::{Entry, Job, Lane, MemoryBudget, Placement, Poll, Publish, Transition};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// Segments whose parts and segment stay in the memory cache.
const CACHE_SEGMENTS: u64 = 4;

/// A published playlist state of one rendition.
#[derive(Debug)]
pub struct Snapshot {
    /// The room.
    pub room: RoomId,
    /// What blocking reloads decide on.
    pub status: PlaylistStatus,
    /// The part named by `EXT-X-PRELOAD-HINT`.
    pub hint: Option<(u64, u32)>,
    /// The full playlist.
    pub full: Bytes,
    /// The delta update (`_HLS_skip=YES`), when it skips anything.
    pub delta: Option<Bytes>,
    /// When this state was published (for delivery-delay measurements).
    pub published_at: SystemTime,
    /// The HTTP/1.1 answer to a blocking reload (head and `full`), rendered once.
    pub wire_full: Bytes,
    /// The same with `delta` as the body, when there is a delta update.
    pub wire_delta: Option<Bytes>,
}

impl Snapshot {
    /// The pre-rendered blocking-reload answer: the delta update if asked for and available.
    pub fn wire(&self, skip: bool) -> Bytes {
        match (&self.wire_delta, skip) {
            (Some(d), true) => d.clone(),
            _ => self.wire_full.clone(),
        }
    }

    fn empty(room: RoomId) -> Self {
        Snapshot {
            room,
            status: PlaylistStatus::default(),
            hint: None,
            full: Bytes::new(),
            delta: None,
            published_at: SystemTime::UNIX_EPOCH,
            wire_full: Bytes::new(),
            wire_delta: None,
        }
    }
}

/// Why a room update failed.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// Muxing failed.
    #[error("mux: {0}")]
    Mux(#[from] MuxError),
    /// Transcoding to AAC failed.
    #[cfg(feature = "aac")]
    #[error("aac: {0}")]
    Aac(#[from] crate::aac::AacError),
    /// The playlist refused an update (a bug: parts out of order).
    #[error("playlist: {0}")]
    Playlist(#[from] PlaylistError),
    /// The packager is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

/// Jobs the ingest side hands to the room's uploader (drained at once; the uploader's
/// [`Lane`] holds them from then on).
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    jobs: Mutex<(Vec<Job>, bool)>,
    notify: Notify,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Job>, bool)> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hand over a job (ignored once closed).
    fn push(&self, job: Job) {
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
    fn take(&self) -> (Vec<Job>, bool) {
        let mut j = self.lock();
        (std::mem::take(&mut j.0), j.1)
    }
}

/// Storage key of a room's file.
pub fn key(room: RoomId, rest: &str) -> String {
    format!("{room}/{rest}")
}

/// Storage key of a rendition's file.
pub fn rkey(room: RoomId, r: Rendition, file: &str) -> String {
    format!("{room}/{}/{file}", r.dir)
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

/// Recently stored objects, served without a storage round trip.
#[derive(Debug, Default)]
struct ObjectCache {
    objects: HashMap<String, Bytes>,
    order: VecDeque<(u64, String)>,
}

impl ObjectCache {
    fn insert(&mut self, msn: u64, key: String, body: Bytes) {
        self.order.push_back((msn, key.clone()));
        self.objects.insert(key, body);
        while let Some((m, _)) = self.order.front() {
            if m + CACHE_SEGMENTS >= msn {
                break;
            }
            if let Some((_, k)) = self.order.pop_front() {
                self.objects.remove(&k);
            }
        }
    }
}

/// What the HTTP side reads.
struct Published {
    playlists: Vec<MediaPlaylist>,
    cache: ObjectCache,
    /// Init segments (kept for the room's life).
    inits: HashMap<String, Bytes>,
}

/// A room as the HTTP side sees it.
pub struct RoomHandle {
    /// Room id.
    pub room: RoomId,
    /// The ingest side.
    pub core: Mutex<RoomCore>,
    /// Renditions, in multivariant order.
    pub renditions: &'static [Rendition],
    /// Playlist snapshots per rendition; `wait_for` on a clone to block.
    pub rx: Vec<watch::Receiver<Arc<Snapshot>>>,
    tx: Vec<watch::Sender<Arc<Snapshot>>>,
    published: Mutex<Published>,
    /// Blocking reloads held by the plain HTTP/1.1 fast path, per rendition.
    pub waiters: Vec<Mutex<Vec<Waiter>>>,
    inbox: Arc<Inbox>,
    /// The recording (VOD playlists) is stored.
    pub recording_ready: AtomicBool,
}

impl RoomHandle {
    /// Lock the ingest side.
    pub fn core(&self) -> std::sync::MutexGuard<'_, RoomCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn published(&self) -> std::sync::MutexGuard<'_, Published> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Index of the rendition in directory `dir`.
    pub fn rendition_index(&self, dir: &str) -> Option<usize> {
        self.renditions.iter().position(|r| r.dir == dir)
    }

    /// A stored object of this room still in memory.
    pub fn cached(&self, key: &str) -> Option<Bytes> {
        let p = self.published();
        p.cache
            .objects
            .get(key)
            .or_else(|| p.inits.get(key))
            .cloned()
    }

    /// The recording index chunks of rendition `ri` to store once segment `msn` completed: its
    /// chunk, and those of the segments before it back to the last one with media (gaps listed
    /// on resume are stored with the first segment after them).
    fn index_chunks(&self, ri: usize, msn: u64) -> Vec<(String, Bytes)> {
        let p = self.published();
        let Some(pl) = p.playlists.get(ri) else {
            return Vec::new();
        };
        let history = pl.history();
        let last = chunk_of(msn);
        let mut first = last;
        for s in history.iter().rev().skip(1) {
            first = first.min(chunk_of(s.msn));
            if !s.gap {
                break;
            }
        }
        (first..=last)
            .map(|c| {
                (
                    rkey(self.room, pl.rendition(), &chunk_name(c)),
                    Bytes::from(render_chunk(history, c)),
                )
            })
            .collect()
    }

    /// Publish a queued job (stored, or storage is failing): playlists, snapshots and the
    /// memory cache are updated. Returns the jobs this queues in turn: after a segment, its
    /// recording index chunks and a copy of the live playlist; after the room's end, its
    /// recording.
    fn publish_job(&self, job: Job, body: Bytes, metrics: &Metrics) -> Vec<Job> {
        match job {
            Job::Put { key, publish, .. } => {
                let segment = match &publish {
                    Publish::Segment { rendition, msn, .. } => Some((*rendition, *msn)),
                    _ => None,
                };
                self.publish(key, body, publish, metrics);
                let Some((ri, msn)) = segment else {
                    return Vec::new();
                };
                // The durable recording index, then a copy of the live playlist (inspection,
                // and serving it once the room is gone).
                let r = self.renditions[ri];
                let mut jobs: Vec<Job> = self
                    .index_chunks(ri, msn)
                    .into_iter()
                    .map(|(key, body)| Job::Put {
                        key,
                        body,
                        meta: ObjectMeta::INDEX,
                        publish: Publish::Nothing,
                    })
                    .collect();
                jobs.push(Job::Put {
                    key: rkey(self.room, r, "playlist.m3u8"),
                    body: self.rx[ri].borrow().full.clone(),
                    meta: ObjectMeta::PLAYLIST,
                    publish: Publish::Nothing,
                });
                jobs
            }
            Job::End { spans } => self.finish_recording(&spans, metrics),
        }
    }

    /// The room ended: end the playlists (listeners see `EXT-X-ENDLIST` now) and queue the
    /// recording: final playlists, VOD playlists, the recording's multivariant playlist and
    /// `recording.json` (last: once it is stored the recording is ready).
    fn finish_recording(
        &self,
        spans: &[crate::playlist::SpeakerSpan],
        metrics: &Metrics,
    ) -> Vec<Job> {
        let room = self.room;
        let mut p = self.published();
        let mut jobs = Vec::new();
        for pl in &mut p.playlists {
            pl.end();
        }
        let segments = p.playlists.first().map_or(0, |pl| pl.history().len());
        let ticks: u64 = p
            .playlists
            .first()
            .map_or(0, |pl| pl.history().iter().map(|h| h.duration).sum());
        let put = |key: String, text: String, meta: ObjectMeta| Job::Put {
            key,
            body: Bytes::from(text),
            meta,
            publish: Publish::Nothing,
        };
        for pl in &p.playlists {
            let r = pl.rendition();
            jobs.push(put(
                rkey(room, r, "playlist.m3u8"),
                pl.render(false, &[]),
                ObjectMeta::PLAYLIST,
            ));
            if segments > 0 {
                jobs.push(put(
                    rkey(room, r, "vod.m3u8"),
                    pl.render_vod(spans),
                    ObjectMeta::PLAYLIST,
                ));
            }
        }
        if segments > 0 {
            // Chapters for podcast players, beside the recording's multivariant playlist.
            let history = p.playlists.first().map_or(&[][..], |pl| pl.history());
            let chapters = crate::chapters::chapters(spans, history);
            jobs.push(put(
                key(room, CHAPTERS_JSON),
                crate::chapters::render_json(&chapters),
                ObjectMeta::JSON,
            ));
            jobs.push(put(
                key(room, CHAPTERS_VTT),
                crate::chapters::render_vtt(&chapters),
                ObjectMeta::VTT,
            ));
            for (name, text) in multivariants(self.renditions, "recording", "vod.m3u8") {
                jobs.push(put(key(room, &name), text, ObjectMeta::PLAYLIST));
            }
        }
        let meta = serde_json::json!({
            "room": room.to_string(),
            "ended_at": unix_secs(SystemTime::now()),
            "segments": segments,
            "duration_secs": ticks as f64 / 48_000.0,
            "speaker_turns": spans.len(),
        });
        jobs.push(Job::Put {
            key: key(room, "recording.json"),
            body: Bytes::from(meta.to_string()),
            meta: ObjectMeta::JSON,
            publish: Publish::RecordingStored {
                has_media: segments > 0,
            },
        });
        self.send_snapshots(&p);
        drop(p);
        self.release_waiters(metrics);
        jobs
    }

    /// The recording's last object is stored.
    fn recording_stored(&self, has_media: bool, metrics: &Metrics) {
        self.recording_ready.store(has_media, Ordering::Relaxed);
        let p = self.published();
        self.send_snapshots(&p);
        drop(p);
        self.release_waiters(metrics);
        metrics.rooms_live.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(room = %self.room, has_media, "room ended: EXT-X-ENDLIST and VOD recording stored");
    }

    /// Apply a job's publication and send new snapshots.
    fn publish(&self, key: String, body: Bytes, what: Publish, metrics: &Metrics) {
        let mut p = self.published();
        let result = match what {
            Publish::Nothing | Publish::RecordingStored { .. } => {
                if key.ends_with(INIT_NAME) {
                    p.inits.insert(key, body);
                }
                return;
            }
            Publish::Part {
                rendition,
                msn,
                index,
                duration,
                start,
                arrival,
            } => {
                if !body.is_empty() {
                    p.cache.insert(msn, key, body);
                }
                let r = p
                    .playlists
                    .get_mut(rendition)
                    .map(|pl| pl.add_part(msn, index, duration, start));
                if rendition == 0 {
                    metrics.parts_published.fetch_add(1, Ordering::Relaxed);
                    metrics
                        .observe_publish_delay(Instant::now().saturating_duration_since(arrival));
                }
                r
            }
            Publish::Segment {
                rendition,
                msn,
                start,
                duration,
            } => {
                if !body.is_empty() {
                    p.cache.insert(msn, key, body);
                }
                if rendition == 0 {
                    metrics.segments_published.fetch_add(1, Ordering::Relaxed);
                }
                p.playlists
                    .get_mut(rendition)
                    .map(|pl| pl.complete_segment(msn, start, duration))
            }
        };
        if let Some(Err(e)) = result {
            tracing::error!(room = %self.room, error = %e, "playlist update refused");
        }
        self.send_snapshots(&p);
        drop(p);
        self.release_waiters(metrics);
    }

    /// Answer the fast path's held requests that the current snapshots satisfy.
    fn release_waiters(&self, metrics: &Metrics) {
        for (ri, rx) in self.rx.iter().enumerate() {
            let snap = rx.borrow().clone();
            release_waiters(self, ri, &snap, metrics);
        }
    }

    fn send_snapshots(&self, p: &Published) {
        let now = SystemTime::now();
        for (i, pl) in p.playlists.iter().enumerate() {
            let reports: Vec<RenditionReport> = if pl.is_ended() {
                Vec::new()
            } else {
                p.playlists
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, sib)| RenditionReport {
                        uri: format!("../{}/playlist.m3u8", sib.rendition().dir),
                        last: sib.status().last_part(),
                    })
                    .collect()
            };
            // Rendered once per publication; every answer shares these bytes.
            let full = Bytes::from(pl.render(false, &reports));
            let delta =
                (pl.skippable_segments() > 0).then(|| Bytes::from(pl.render(true, &reports)));
            if let Some(tx) = self.tx.get(i) {
                tx.send_replace(Arc::new(Snapshot {
                    room: self.room,
                    status: pl.status(),
                    hint: pl.preload_hint(),
                    wire_full: render_blocking_answer(&full, now),
                    wire_delta: delta.as_ref().map(|d| render_blocking_answer(d, now)),
                    full,
                    delta,
                    published_at: now,
                }));
            }
        }
    }
}

/// Seconds since the Unix epoch.
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the uploaders of every room share.
pub(crate) struct Uploads {
    /// The storage backend.
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Memory for pending uploads, over all rooms.
    pub budget: Arc<MemoryBudget>,
    /// Where uploads beyond the budget wait.
    pub spill: Arc<SpillDir>,
}

/// How an upload attempt ended.
enum Attempt {
    Stored,
    /// Failed; retried after the backoff.
    Failed(StorageError),
    /// Cannot ever succeed (bad key, unreadable spill file): given up.
    Abandoned(StorageError),
}

type PutFuture = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Attempt)> + Send>>;

/// One attempt at storing lane entry `seq` (its bytes from memory or its spill file).
fn start_put(up: &Uploads, room: RoomId, e: &Entry) -> Option<PutFuture> {
    let Job::Put {
        key, body, meta, ..
    } = &e.job
    else {
        return None;
    };
    let (store, metrics, spill) = (up.store.clone(), up.metrics.clone(), up.spill.clone());
    let (seq, key, meta, body, spilled) = (e.seq, key.clone(), *meta, body.clone(), e.spilled);
    Some(Box::pin(async move {
        let body = if spilled {
            match spill.read(room, seq) {
                Ok(b) => b,
                Err(e) => return (seq, Attempt::Abandoned(e.into())),
            }
        } else {
            body
        };
        let attempt = Instant::now();
        let put = store.put(&key, body, meta).await;
        metrics.observe_upload(attempt.elapsed());
        let outcome = match put {
            Ok(()) => Attempt::Stored,
            Err(e @ StorageError::BadKey(_)) => Attempt::Abandoned(e),
            Err(e) => Attempt::Failed(e),
        };
        (seq, outcome)
    }))
}

/// The bytes of a queued job for publication: in memory, or read back from its spill file.
fn entry_body(up: &Uploads, room: RoomId, e: &Entry) -> Bytes {
    match &e.job {
        Job::Put { body, .. } if e.spilled => up.spill.read(room, e.seq).unwrap_or_else(|err| {
            tracing::warn!(%room, seq = e.seq, error = %err, "spill file unreadable");
            body.clone()
        }),
        Job::Put { body, .. } => body.clone(),
        Job::End { .. } => Bytes::new(),
    }
}

/// Keeps the global gauges in step with one lane.
#[derive(Default)]
struct LaneGauges {
    memory: i64,
    spilled: i64,
}

impl LaneGauges {
    fn update(&mut self, lane: &Lane, metrics: &Metrics) {
        let (m, s) = (lane.memory_bytes() as i64, lane.spilled_bytes() as i64);
        metrics
            .storage_buffered_bytes
            .fetch_add(m - self.memory, Ordering::Relaxed);
        metrics
            .storage_spilled_bytes
            .fetch_add(s - self.spilled, Ordering::Relaxed);
        (self.memory, self.spilled) = (m, s);
    }
}

/// The room's uploader: the driver of its [`Lane`]. It takes the jobs the ingest side
/// queues, publishes them in order (after storing them, or at once while storage fails),
/// spills what the memory budget cannot hold, and stores one object at a time with backoff,
/// until the room's recording is stored (or shutdown, when jobs still in memory are spilled
/// so that the next start uploads them).
async fn uploader(handle: Arc<RoomHandle>, up: Arc<Uploads>, shutdown: CancellationToken) {
    let room = handle.room;
    let metrics = up.metrics.clone();
    let mut lane = Lane::new();
    let mut gauges = LaneGauges::default();
    let mut in_flight: Option<PutFuture> = None;
    let mut in_outage = false;
    let mut finished = false;
    loop {
        let now = Instant::now();
        let (jobs, closed) = handle.inbox.take();
        let mut spills = Vec::new();
        let queue = |lane: &mut Lane, job: Job, spills: &mut Vec<u64>| {
            if let Placement::Spill { seq } = lane.push(job, &up.budget) {
                spills.push(seq);
            }
        };
        for job in jobs {
            queue(&mut lane, job, &mut spills);
        }
        // Publication can queue more jobs (recording index, playlist copies, the recording).
        for _ in 0..8 {
            let ready = lane.publishable(now);
            if ready.is_empty() {
                break;
            }
            for seq in ready {
                let Some(e) = lane.entry(seq) else { continue };
                let body = entry_body(&up, room, e);
                for job in handle.publish_job(e.job.clone(), body, &metrics) {
                    queue(&mut lane, job, &mut spills);
                }
            }
        }
        for seq in spills {
            let written = match lane.entry(seq).map(|e| &e.job) {
                Some(Job::Put {
                    key, body, meta, ..
                }) => up.spill.write(room, seq, key, *meta, body),
                _ => continue,
            };
            match written {
                Ok(()) => up.budget.release(lane.spilled(seq)),
                Err(e) => {
                    tracing::error!(%room, error = %e, "cannot spill an upload; keeping it in memory")
                }
            }
        }
        let done = lane.take_done();
        up.budget.release(done.memory);
        for seq in done.spill_files {
            up.spill.remove(room, seq);
        }
        gauges.update(&lane, &metrics);
        if closed && lane.is_empty() && in_flight.is_none() {
            break;
        }
        let mut wake = None;
        if in_flight.is_none() {
            match lane.poll(now) {
                Poll::Upload(seq) => match lane.entry(seq) {
                    Some(e) => in_flight = start_put(&up, room, e),
                    None => continue,
                },
                Poll::Wait(at) => wake = Some(at),
                Poll::Idle => {}
            }
        }
        wake = match (wake, lane.stall_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = tokio::time::sleep_until(wake.map_or_else(
            || tokio::time::Instant::now() + Duration::from_secs(3600),
            Into::into,
        ));
        tokio::select! {
            r = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                in_flight = None;
                let (seq, outcome) = r;
                let now = Instant::now();
                match outcome {
                    Attempt::Stored | Attempt::Abandoned(_) => {
                        if let Attempt::Abandoned(e) = &outcome {
                            tracing::error!(%room, seq, error = %e, "upload abandoned");
                        } else {
                            metrics.storage_puts.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(Job::Put { publish: Publish::RecordingStored { has_media }, .. }) =
                            lane.entry(seq).map(|e| &e.job)
                        {
                            handle.recording_stored(*has_media, &metrics);
                            finished = true;
                        }
                        if let Transition::OutageEnded { lasted, retries } = lane.stored(seq, now) {
                            in_outage = false;
                            metrics.storage_outage.fetch_sub(1, Ordering::Relaxed);
                            tracing::info!(
                                %room,
                                retries,
                                outage_ms = lasted.as_millis() as u64,
                                memory_bytes = lane.memory_bytes(),
                                spilled_bytes = lane.spilled_bytes(),
                                "storage reachable again; flushing buffered uploads"
                            );
                        }
                    }
                    Attempt::Failed(e) => {
                        metrics.storage_errors.fetch_add(1, Ordering::Relaxed);
                        metrics.storage_retry();
                        if lane.failed(seq, now) == Transition::OutageStarted {
                            in_outage = true;
                            metrics.storage_outage.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                %room,
                                error = %e,
                                memory_bytes = lane.memory_bytes(),
                                "storage put failed; buffering uploads and retrying (the live playlist goes on)"
                            );
                        }
                    }
                }
            }
            _ = handle.inbox.notify.notified() => {}
            _ = sleep => {}
            _ = shutdown.cancelled() => break,
        }
    }
    if shutdown.is_cancelled() {
        // Keep what is not stored yet for the next start.
        for seq in lane.unstored_in_memory() {
            if let Some(Job::Put {
                key, body, meta, ..
            }) = lane.entry(seq).map(|e| &e.job)
            {
                if up.spill.write(room, seq, key, *meta, body).is_ok() {
                    up.budget.release(lane.spilled(seq));
                }
            }
        }
    }
    up.budget.release(lane.memory_bytes());
    metrics
        .storage_buffered_bytes
        .fetch_sub(gauges.memory, Ordering::Relaxed);
    metrics
        .storage_spilled_bytes
        .fetch_sub(gauges.spilled, Ordering::Relaxed);
    if in_outage {
        metrics.storage_outage.fetch_sub(1, Ordering::Relaxed);
    }
    if !finished && !shutdown.is_cancelled() {
        tracing::warn!(%room, "uploader stopped before the recording was stored");
    }
}

/// Every room this packager has seen since it started.
pub struct Registry {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    uploads: Arc<Uploads>,
    recovery: Arc<Recovery>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    rooms: Mutex<HashMap<RoomId, Arc<RoomHandle>>>,
    /// Rooms with output in storage from before this run (recordings of ended rooms); `None`
    /// until storage has been listed once.
    stored: Mutex<Option<HashSet<RoomId>>>,
}

impl Registry {
    /// An empty registry storing into `store` (pending uploads: `budget` bytes in memory over
    /// all rooms, the rest in `spill`); uploader tasks run on `tasks` until `shutdown`. Spill
    /// files an earlier run left in `spill` are uploaded first (each room opens after its own).
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        budget: usize,
        spill: SpillDir,
        shutdown: CancellationToken,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        let spill = Arc::new(spill);
        let recovery = crate::spill::recover(
            spill.clone(),
            store.clone(),
            metrics.clone(),
            &tasks,
            shutdown.clone(),
        );
        Registry {
            uploads: Arc::new(Uploads {
                store: store.clone(),
                metrics: metrics.clone(),
                budget: Arc::new(MemoryBudget::new(budget)),
                spill,
            }),
            store,
            metrics,
            recovery,
            shutdown,
            tasks,
            rooms: Mutex::new(HashMap::new()),
            stored: Mutex::new(None),
        }
    }

    /// The storage backend.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Whether storage may hold output of `room`: it is open in this run, or was in storage
    /// when this run listed it, or storage has not been listed yet. HTTP requests for any other
    /// room are answered 404 without a storage read.
    pub fn may_have(&self, room: RoomId) -> bool {
        if self.get(room).is_some() {
            return true;
        }
        match &*self.stored.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(set) => set.contains(&room),
            None => true,
        }
    }

    /// List the rooms in storage once (one listing of its top level), retrying every
    /// `retry` until it works or `shutdown`; until then [`Registry::may_have`] answers yes.
    pub async fn load_stored_rooms(&self, retry: Duration) {
        loop {
            match self.store.top_level().await {
                Ok(names) => {
                    let set: HashSet<RoomId> =
                        names.iter().filter_map(|n| n.parse().ok()).collect();
                    tracing::info!(rooms = set.len(), "rooms in storage listed");
                    *self.stored.lock().unwrap_or_else(|e| e.into_inner()) = Some(set);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "cannot list the rooms in storage (yet)"),
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// `room`'s stored output was deleted (retention): requests for it no longer read storage.
    pub fn forget_stored(&self, room: RoomId) {
        if let Some(set) = &mut *self.stored.lock().unwrap_or_else(|e| e.into_inner()) {
            set.remove(&room);
        }
    }

    /// A known room.
    pub fn get(&self, room: RoomId) -> Option<Arc<RoomHandle>> {
        self.rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&room)
            .cloned()
    }

    /// Where rendition `r` of `room` resumes after a packager restart: its durable recording
    /// index plus the media files stored (`None`: nothing stored, a new room). A chunk that
    /// cannot be read is skipped (its segments are then bridged as gaps or dropped).
    async fn resume_point(
        &self,
        room: RoomId,
        r: Rendition,
    ) -> Result<Option<Resume>, StorageError> {
        let keys = self.store.list(&rkey(room, r, "")).await?;
        let index_prefix = rkey(room, r, "index/");
        let mut indexed = Vec::new();
        for k in keys.iter().filter(|k| k.starts_with(&index_prefix)) {
            let parsed = match self.store.get(k).await? {
                Some(b) => parse_chunk(b),
                None => continue,
            };
            match parsed {
                Ok(mut segments) => indexed.append(&mut segments),
                Err(e) => {
                    tracing::warn!(%room, key = %k, error = %e, "recording index chunk skipped")
                }
            }
        }
        let names = keys.iter().filter_map(|k| k.rsplit('/').next());
        Ok(plan_resume(indexed, names, r.part_target_ticks))
    }

    /// The speaker turns stored before a packager restart (none if unreadable).
    async fn stored_turns(&self, room: RoomId) -> SpeakerTimeline {
        let stored = match self.store.get(&key(room, TURNS_FILE)).await {
            Ok(Some(b)) => b,
            Ok(None) => return SpeakerTimeline::new(),
            Err(e) => {
                tracing::warn!(%room, error = %e, "cannot read the stored speaker turns");
                return SpeakerTimeline::new();
            }
        };
        match parse_turns(stored) {
            Ok(spans) => SpeakerTimeline::resume(spans),
            Err(e) => {
                tracing::warn!(%room, error = %e, "stored speaker turns skipped");
                SpeakerTimeline::new()
            }
        }
    }

    /// A known room, or a new one: its init segments and multivariant playlist are queued
    /// first, and its uploader started. After a packager restart the room resumes from its
    /// durable recording index: the live playlist and the recording keep the segments (and the
    /// speaker turns) from before, numbering continues after anything already stored, and the
    /// next segment is a discontinuity.
    pub async fn get_or_open(&self, room: RoomId) -> Result<Arc<RoomHandle>, RoomError> {
        if let Some(h) = self.get(room) {
            return Ok(h);
        }
        // What an earlier run spilled for this room is stored before the room resumes from
        // storage (else its numbering would reuse those segments' names).
        if !self.recovery.wait(room, &self.shutdown).await {
            return Err(RoomError::ShuttingDown);
        }
        let rends = renditions();
        let mut resumed = Vec::with_capacity(rends.len());
        for r in rends {
            resumed.push(match self.resume_point(room, *r).await {
                Ok(point) => point,
                Err(e) => {
                    tracing::warn!(%room, error = %e, "cannot read earlier output; numbering from 0");
                    None
                }
            });
        }
        let start_msn = resumed.iter().flatten().map(|p| p.next_msn).max();
        let media_end = resumed
            .iter()
            .flatten()
            .filter_map(|p| p.history.last())
            .map(|s| s.start.program_date_time + crate::playlist::ticks_duration(s.duration))
            .max();
        // Decode times continue after the media written before (the room's first segment
        // had decode time 0).
        let media_start = resumed
            .iter()
            .flatten()
            .filter_map(|p| p.history.first())
            .map(|s| s.start.program_date_time)
            .min();
        let media_base = match (media_start, media_end) {
            (Some(first), Some(end)) => crate::segmenter::resume_base(first, end),
            _ => 0,
        };
        let queue = Arc::new(Inbox::default());
        queue.push(Job::Put {
            key: rkey(room, rends[0], INIT_NAME),
            body: Bytes::from(init_segment()?),
            meta: ObjectMeta::MEDIA,
            publish: Publish::Nothing,
        });
        #[cfg(feature = "aac")]
        let aac = {
            let a = AacRendition::new()?;
            if let Some(r) = rends.get(1) {
                queue.push(Job::Put {
                    key: rkey(room, *r, INIT_NAME),
                    body: Bytes::from(a.init_segment()?),
                    meta: ObjectMeta::MEDIA,
                    publish: Publish::Nothing,
                });
            }
            Some(a)
        };
        for (name, text) in multivariants(rends, "index", "playlist.m3u8") {
            queue.push(Job::Put {
                key: key(room, &name),
                body: Bytes::from(text),
                meta: ObjectMeta::PLAYLIST,
                publish: Publish::Nothing,
            });
        }
        let msn = start_msn.unwrap_or(0);
        let playlists: Vec<MediaPlaylist> = rends
            .iter()
            .zip(resumed)
            .map(|(r, point)| match point {
                Some(p) => MediaPlaylist::resume(*r, p.history, msn),
                None => MediaPlaylist::new(*r, msn),
            })
            .collect();
        let (tx, rx): (Vec<_>, Vec<_>) = rends
            .iter()
            .map(|_| watch::channel(Arc::new(Snapshot::empty(room))))
            .unzip();
        let core = RoomCore {
            room,
            renditions: rends,
            segmenter: match start_msn {
                Some(msn) => Segmenter::default().resume_at(msn, media_end, media_base),
                None => Segmenter::default(),
            },
            #[cfg(feature = "aac")]
            aac,
            speakers: match start_msn {
                Some(_) => self.stored_turns(room).await,
                None => SpeakerTimeline::new(),
            },
            active_stream: None,
            end_requested: false,
            finished: false,
            inbox: queue.clone(),
        };
        let handle = Arc::new(RoomHandle {
            room,
            core: Mutex::new(core),
            renditions: rends,
            rx,
            tx,
            published: Mutex::new(Published {
                playlists,
                cache: ObjectCache::default(),
                inits: HashMap::new(),
            }),
            waiters: rends.iter().map(|_| Mutex::new(Vec::new())).collect(),
            inbox: queue,
            recording_ready: AtomicBool::new(false),
        });
        {
            let p = handle.published();
            handle.send_snapshots(&p);
        }
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = rooms.get(&room) {
            return Ok(existing.clone());
        }
        rooms.insert(room, handle.clone());
        drop(rooms);
        self.metrics.rooms_total.fetch_add(1, Ordering::Relaxed);
        self.metrics.rooms_live.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%room, ?start_msn, storage = self.store.kind(), "room opened");
        self.tasks.spawn(uploader(
            handle.clone(),
            self.uploads.clone(),
            self.shutdown.clone(),
        ));
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keeps_the_last_segments() {
        let mut c = ObjectCache::default();
        for msn in 0..10u64 {
            c.insert(msn, format!("seg{msn}"), Bytes::from_static(b"x"));
        }
        assert!(c.objects.contains_key("seg9"));
        assert!(c.objects.contains_key("seg5"));
        assert!(!c.objects.contains_key("seg4"));
        assert_eq!(c.objects.len(), 5);
    }
}
