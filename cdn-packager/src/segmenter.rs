//! Sans-IO segmenter: 20 ms Opus frames in, CMAF parts (200 ms) and segments (2 s) out.
//!
//! Timeline: each room's media starts at 0 (the base media decode time of the room's first frame
//! is 0, whatever its RTP timestamp: the origin's program clock runs from when the program
//! started, and players such as GStreamer's legacy `hlsdemux` place the first segment of a live
//! playlist at its position in the playlist, not at its `tfdt`); a packager that resumes a room
//! continues after the media it wrote before ([`Segmenter::resume_at`]). RTP wrap-around is
//! unwrapped so the timeline is monotonic. After a program stop (or an RTP jump
//! larger than [`MAX_RTP_GAP`]) the next frame continues right where the written media ended and
//! its segment is flagged as a discontinuity. Small RTP gaps close the current part early; the
//! next part then starts at the frame's real timestamp.

use crate::fmp4::{ChunkWriter, MuxError, SAMPLE_DURATION, TIMESCALE};
use amphi_protocol::audio::{FRAMES_PER_PART, PARTS_PER_SEGMENT};
use std::time::{Duration, Instant, SystemTime};

/// Largest forward RTP step (10 s) still treated as the same timeline; larger jumps (and any
/// backwards step beyond a duplicate) start a discontinuity.
pub const MAX_RTP_GAP: u32 = 10 * TIMESCALE;

/// One program frame as the segmenter needs it.
#[derive(Clone, Copy, Debug)]
pub struct ProgramFrame<'a> {
    /// RTP timestamp (48 kHz).
    pub rtp_ts: u32,
    /// One 20 ms Opus packet.
    pub payload: &'a [u8],
}

/// Facts about a segment known when its first part is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentStart {
    /// Wall-clock time of the segment's first sample: arrival time of the stream's first frame
    /// plus the RTP distance from that frame.
    pub program_date_time: SystemTime,
    /// The segment follows a program stop or a timeline jump.
    pub discontinuity: bool,
}

/// A finished part (CMAF chunk).
#[derive(Clone, Debug, PartialEq)]
pub struct PartReady {
    /// Media sequence number of the parent segment.
    pub msn: u64,
    /// Index of the part inside its segment.
    pub index: u32,
    /// Opus frames (20 ms each) in the part.
    pub frames: u32,
    /// Duration in 48 kHz ticks.
    pub duration: u32,
    /// Base media decode time of the part (48 kHz ticks).
    pub base_media_decode_time: u64,
    /// `[styp] moof mdat` bytes of the part.
    pub bytes: Vec<u8>,
    /// Present on the first part of a segment.
    pub segment_start: Option<SegmentStart>,
    /// Arrival time of the part's last frame (for the publish-delay metric).
    pub last_arrival: Instant,
}

/// A finished segment: the concatenation of its parts.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentReady {
    /// Media sequence number.
    pub msn: u64,
    /// Number of parts.
    pub parts: u32,
    /// Opus frames in the segment.
    pub frames: u32,
    /// Duration in 48 kHz ticks.
    pub duration: u64,
    /// Wall-clock start and discontinuity flag (as on its first part).
    pub start: SegmentStart,
    /// The segment file.
    pub bytes: Vec<u8>,
}

/// What the segmenter produced.
#[derive(Clone, Debug, PartialEq)]
pub enum SegmenterOutput {
    /// A part is ready to be written and published.
    Part(PartReady),
    /// A segment is complete (always after its last part).
    Segment(SegmentReady),
}

/// The base media decode time a resumed room continues at: the wall-clock span of the media
/// written before, from the program date time of the room's first segment (`first`, decode time
/// 0) to the end of its last (`end`), in 48 kHz ticks. Decode time never runs ahead of program
/// date time (a stop or a jump re-anchors the wall clock forward while decode time continues
/// where the media ended), so this is at or after the end of the media written before.
pub fn resume_base(first: SystemTime, end: SystemTime) -> u64 {
    let span = end.duration_since(first).unwrap_or_default();
    u64::try_from(span.as_micros() * u128::from(TIMESCALE) / 1_000_000).unwrap_or(u64::MAX / 2)
}

/// Duration of `frames` Opus frames.
pub fn frames_duration(frames: u32) -> Duration {
    Duration::from_micros(u64::from(frames) * 20_000)
}

/// The segmenter of one room rendition.
#[derive(Debug)]
pub struct Segmenter {
    writer: ChunkWriter,
    frames_per_part: u32,
    parts_per_segment: u32,
    /// (rtp, extended timestamp) of the last frame of the running stream.
    last: Option<(u32, u64)>,
    /// End of the written media (extended ticks).
    next_ext: u64,
    started: bool,
    /// Wall clock and extended timestamp of the running stream's first frame.
    anchor: Option<(SystemTime, u64)>,
    discontinuity_pending: bool,
    part_payload: Vec<u8>,
    part_sizes: Vec<u32>,
    part_base: u64,
    part_last_arrival: Option<Instant>,
    msn: u64,
    part_index: u32,
    seg_buf: Vec<u8>,
    seg_frames: u32,
    seg_start: Option<SegmentStart>,
    /// Start of the segment in progress (kept for [`SegmentReady`]).
    cur_seg_start: Option<SegmentStart>,
    /// Extended timestamp of the frame the last `push` accepted.
    accepted: Option<u64>,
    /// The anchor of the previous stream (after a stop), for [`Segmenter::reanchor`].
    last_anchor: Option<(SystemTime, u64)>,
    /// End of the media written before a packager restart: program date times start no
    /// earlier.
    not_before: Option<SystemTime>,
}

impl Default for Segmenter {
    fn default() -> Self {
        Self::new(FRAMES_PER_PART, PARTS_PER_SEGMENT)
    }
}

impl Segmenter {
    /// A segmenter cutting parts of `frames_per_part` frames and segments of `parts_per_segment`
    /// parts (amphi uses 10 and 10).
    pub fn new(frames_per_part: u32, parts_per_segment: u32) -> Self {
        let frames_per_part = frames_per_part.max(1);
        Segmenter {
            writer: ChunkWriter::default(),
            frames_per_part,
            parts_per_segment: parts_per_segment.max(1),
            last: None,
            next_ext: 0,
            started: false,
            anchor: None,
            discontinuity_pending: false,
            part_payload: Vec::with_capacity(frames_per_part as usize * 400),
            part_sizes: Vec::with_capacity(frames_per_part as usize),
            part_base: 0,
            part_last_arrival: None,
            msn: 0,
            part_index: 0,
            seg_buf: Vec::new(),
            seg_frames: 0,
            seg_start: None,
            cur_seg_start: None,
            accepted: None,
            last_anchor: None,
            not_before: None,
        }
    }

    /// Continue numbering at segment `msn` (after a packager restart found earlier files), the
    /// first segment flagged as a discontinuity, its program date time no earlier than
    /// `not_before` (the end of the media already written, if known), its base media decode
    /// time `media_base` (48 kHz ticks; no earlier than where the media written before ended, so
    /// decode times never go backwards: see [`resume_base`]).
    pub fn resume_at(mut self, msn: u64, not_before: Option<SystemTime>, media_base: u64) -> Self {
        self.msn = msn;
        self.discontinuity_pending = true;
        self.not_before = not_before;
        self.next_ext = media_base;
        self
    }

    /// The part that will be produced next: `(msn, part index)` (the preload hint).
    pub fn next_part(&self) -> (u64, u32) {
        (self.msn, self.part_index)
    }

    /// Extended (unwrapped, continued) timestamp of the frame the last [`Segmenter::push`]
    /// accepted; `None` if it dropped it.
    pub fn last_ext(&self) -> Option<u64> {
        self.accepted
    }

    /// Program date time of the frame the last [`Segmenter::push`] accepted: the stream's
    /// anchor plus its RTP distance from it (what `EXT-X-PROGRAM-DATE-TIME` uses).
    pub fn last_program_time(&self) -> Option<SystemTime> {
        let ext = self.accepted?;
        let (wall, anchor) = self.anchor?;
        Some(wall + Duration::from_micros(ext.saturating_sub(anchor) * 1_000_000 / 48_000))
    }

    /// Feed one frame that arrived at `now` (monotonic) / `wall` (wall clock).
    /// Duplicate or reordered frames (RTP not after the previous one) and frames starting before
    /// the previous one ends (under one frame duration after it) are dropped.
    pub fn push(
        &mut self,
        frame: ProgramFrame<'_>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Vec<SegmenterOutput>, MuxError> {
        let mut out = Vec::new();
        self.accepted = None;
        let ext = match self.last {
            None => {
                // A room's first frame (0, or the resume base) or a new stream: right where
                // the written media ended.
                let ext = self.next_ext;
                self.anchor = Some((self.reanchor(wall), ext));
                ext
            }
            Some((last_rtp, last_ext)) => {
                let step = frame.rtp_ts.wrapping_sub(last_rtp);
                if step < SAMPLE_DURATION || step.wrapping_neg() <= MAX_RTP_GAP {
                    // Duplicate, slightly reordered, or overlapping the previous frame (its
                    // samples would decode before that frame ends): drop.
                    return Ok(out);
                }
                if step > MAX_RTP_GAP {
                    self.close_segment(&mut out)?;
                    self.discontinuity_pending = true;
                    let ext = self.next_ext;
                    self.anchor = Some((self.reanchor(wall), ext));
                    ext
                } else {
                    if step != SAMPLE_DURATION {
                        // Frames lost: end the segment here (its last part may be short, no
                        // other part may), the next one starts at the frame's real time.
                        self.close_segment(&mut out)?;
                    }
                    last_ext + u64::from(step)
                }
            }
        };
        self.started = true;
        if self.part_sizes.is_empty() {
            self.part_base = ext;
            if self.part_index == 0 {
                let (anchor_wall, anchor_ext) = self.anchor.unwrap_or((wall, ext));
                let offset = Duration::from_micros((ext - anchor_ext) * 1_000_000 / 48_000);
                let start = SegmentStart {
                    program_date_time: anchor_wall + offset,
                    discontinuity: std::mem::take(&mut self.discontinuity_pending),
                };
                self.seg_start = Some(start);
                self.cur_seg_start = Some(start);
            }
        }
        self.part_payload.extend_from_slice(frame.payload);
        self.part_sizes.push(frame.payload.len() as u32);
        self.part_last_arrival = Some(now);
        self.last = Some((frame.rtp_ts, ext));
        self.accepted = Some(ext);
        self.next_ext = ext + u64::from(SAMPLE_DURATION);
        if self.part_sizes.len() as u32 >= self.frames_per_part {
            self.flush_part(&mut out)?;
            if self.part_index >= self.parts_per_segment {
                self.close_segment(&mut out)?;
            }
        }
        Ok(out)
    }

    /// Wall clock for a new anchor: the arrival time, but never before the end of the media
    /// already written (a stream that was fed faster than real time), so program date times
    /// never go backwards.
    fn reanchor(&self, wall: SystemTime) -> SystemTime {
        let wall = self.not_before.map_or(wall, |t| wall.max(t));
        match (self.anchor.or(self.last_anchor), self.started) {
            (Some((anchor_wall, anchor_ext)), true) => {
                let end = anchor_wall
                    + Duration::from_micros(
                        self.next_ext.saturating_sub(anchor_ext) * 1_000_000 / 48_000,
                    );
                wall.max(end)
            }
            _ => wall,
        }
    }

    /// The program stream stopped (finished or broke): cut the trailing partial part, close the
    /// segment, and flag the next segment as a discontinuity.
    pub fn stream_stopped(&mut self) -> Result<Vec<SegmenterOutput>, MuxError> {
        let mut out = Vec::new();
        self.close_segment(&mut out)?;
        self.last = None;
        self.last_anchor = self.anchor.or(self.last_anchor);
        self.anchor = None;
        if self.started {
            self.discontinuity_pending = true;
        }
        Ok(out)
    }

    fn flush_part(&mut self, out: &mut Vec<SegmenterOutput>) -> Result<(), MuxError> {
        if self.part_sizes.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(self.part_payload.len() + 256);
        self.writer.write_chunk(
            self.part_base,
            &self.part_sizes,
            &self.part_payload,
            self.part_index == 0,
            &mut bytes,
        )?;
        self.seg_buf.extend_from_slice(&bytes);
        let frames = self.part_sizes.len() as u32;
        self.part_sizes.clear();
        self.part_payload.clear();
        out.push(SegmenterOutput::Part(PartReady {
            msn: self.msn,
            index: self.part_index,
            frames,
            duration: frames * SAMPLE_DURATION,
            base_media_decode_time: self.part_base,
            bytes,
            segment_start: if self.part_index == 0 {
                self.seg_start.take()
            } else {
                None
            },
            last_arrival: self.part_last_arrival.unwrap_or_else(Instant::now),
        }));
        self.part_index += 1;
        self.seg_frames += frames;
        Ok(())
    }

    fn close_segment(&mut self, out: &mut Vec<SegmenterOutput>) -> Result<(), MuxError> {
        self.flush_part(out)?;
        if self.part_index == 0 {
            return Ok(());
        }
        let cap = self.seg_buf.capacity();
        let start = self.cur_seg_start.take().unwrap_or(SegmentStart {
            program_date_time: SystemTime::UNIX_EPOCH,
            discontinuity: false,
        });
        out.push(SegmenterOutput::Segment(SegmentReady {
            msn: self.msn,
            parts: self.part_index,
            frames: self.seg_frames,
            duration: u64::from(self.seg_frames) * u64::from(SAMPLE_DURATION),
            start,
            bytes: std::mem::replace(&mut self.seg_buf, Vec::with_capacity(cap)),
        }));
        self.msn += 1;
        self.part_index = 0;
        self.seg_frames = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(
        s: &mut Segmenter,
        first_rtp: u32,
        n: u32,
        t0: Instant,
        w0: SystemTime,
    ) -> Vec<SegmenterOutput> {
        let payload = [0xf8u8, 0xff, 0xfe];
        let mut out = Vec::new();
        for i in 0..n {
            let rtp = first_rtp.wrapping_add(i * 960);
            let dt = Duration::from_millis(20 * u64::from(i));
            out.extend(
                s.push(
                    ProgramFrame {
                        rtp_ts: rtp,
                        payload: &payload,
                    },
                    t0 + dt,
                    w0 + dt,
                )
                .unwrap(),
            );
        }
        out
    }

    fn parts(out: &[SegmenterOutput]) -> Vec<(u64, u32, u32, u64)> {
        out.iter()
            .filter_map(|o| match o {
                SegmenterOutput::Part(p) => {
                    Some((p.msn, p.index, p.frames, p.base_media_decode_time))
                }
                _ => None,
            })
            .collect()
    }

    fn segments(out: &[SegmenterOutput]) -> Vec<(u64, u32, u32)> {
        out.iter()
            .filter_map(|o| match o {
                SegmenterOutput::Segment(s) => Some((s.msn, s.parts, s.frames)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ten_frames_per_part_ten_parts_per_segment() {
        let mut s = Segmenter::default();
        let (t0, w0) = (Instant::now(), SystemTime::UNIX_EPOCH);
        let out = feed(&mut s, 4800, 9, t0, w0);
        assert!(out.is_empty(), "no part before the 10th frame");
        let out = feed(&mut s, 4800 + 9 * 960, 1, t0, w0);
        assert_eq!(
            parts(&out),
            vec![(0, 0, 10, 0)],
            "the room's media starts at 0"
        );
        let out = feed(&mut s, 4800 + 10 * 960, 190, t0, w0);
        let p = parts(&out);
        assert_eq!(p.len(), 19);
        assert_eq!(p[8], (0, 9, 10, 9 * 9600));
        assert_eq!(p[9], (1, 0, 10, 10 * 9600));
        assert_eq!(segments(&out), vec![(0, 10, 100), (1, 10, 100)]);
        assert_eq!(s.next_part(), (2, 0));
        // The segment is the concatenation of its parts, and only part 0 carries styp.
        let mut concat = Vec::new();
        let mut seg = None;
        for o in &out {
            match o {
                SegmenterOutput::Part(p) if p.msn == 1 => {
                    assert_eq!(&p.bytes[4..8] == b"styp", p.index == 0);
                    concat.extend_from_slice(&p.bytes);
                }
                SegmenterOutput::Segment(s) if s.msn == 1 => seg = Some(s.bytes.clone()),
                _ => {}
            }
        }
        assert_eq!(seg.unwrap(), concat);
    }

    #[test]
    fn frames_overlapping_the_previous_one_are_dropped() {
        // Found by the program_stream fuzz target: a frame 56 samples after the previous one
        // started a part 904 samples before the previous part ended (the timeline went back).
        let mut s = Segmenter::default();
        let t0 = Instant::now();
        let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut out = feed(&mut s, 0, 10, t0, w0);
        for step in [56, 959] {
            let frame = ProgramFrame {
                rtp_ts: 9 * 960 + step,
                payload: &[0xf8, 0xff, 0xfe],
            };
            assert!(s.push(frame, t0, w0).unwrap().is_empty());
            assert_eq!(s.last_ext(), None, "step {step} accepted");
        }
        out.extend(feed(&mut s, 10 * 960, 1, t0, w0));
        out.extend(s.stream_stopped().unwrap());
        assert_eq!(parts(&out), vec![(0, 0, 10, 0), (0, 1, 1, 10 * 960)]);
    }

    #[test]
    fn trailing_partial_part_and_discontinuity_on_restart() {
        let mut s = Segmenter::default();
        let t0 = Instant::now();
        let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        feed(&mut s, 0, 25, t0, w0);
        let out = s.stream_stopped().unwrap();
        assert_eq!(parts(&out), vec![(0, 2, 5, 2 * 9600)]);
        assert_eq!(segments(&out), vec![(0, 3, 25)]);
        assert!(
            s.stream_stopped().unwrap().is_empty(),
            "nothing left to flush"
        );
        // A new stream restarts RTP at 0: the timeline continues at 25 frames, flagged.
        let w1 = w0 + Duration::from_secs(60);
        let out = feed(&mut s, 0, 10, t0, w1);
        let SegmenterOutput::Part(p) = &out[0] else {
            panic!("expected a part")
        };
        assert_eq!((p.msn, p.index, p.base_media_decode_time), (1, 0, 25 * 960));
        assert_eq!(
            p.segment_start,
            Some(SegmentStart {
                program_date_time: w1,
                discontinuity: true
            })
        );
    }

    #[test]
    fn program_date_time_never_goes_backwards_after_a_fast_stream() {
        let mut s = Segmenter::default();
        let t0 = Instant::now();
        let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        // 3 s of media delivered in (simulated) 0 s of wall time, then a restart at w0 + 1 s.
        feed(&mut s, 0, 150, t0, w0);
        s.stream_stopped().unwrap();
        let w1 = w0 + Duration::from_secs(1);
        let mut out = Vec::new();
        out.extend(
            s.push(
                ProgramFrame {
                    rtp_ts: 0,
                    payload: &[0xf8, 0xff, 0xfe],
                },
                t0,
                w1,
            )
            .unwrap(),
        );
        out.extend(feed(&mut s, 960, 9, t0, w1));
        let SegmenterOutput::Part(p) = &out[0] else {
            panic!("a part")
        };
        let st = p.segment_start.unwrap();
        assert!(st.discontinuity);
        assert_eq!(st.program_date_time, w0 + Duration::from_secs(3), "not w1");
    }

    #[test]
    fn program_date_time_follows_rtp_from_the_anchor() {
        let mut s = Segmenter::default();
        let t0 = Instant::now();
        let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        // Arrival times jitter, but PDT of segment 1 is anchor + 100 frames of RTP.
        let out = feed(&mut s, 96_000, 110, t0, w0 + Duration::from_millis(7));
        let starts: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                SegmenterOutput::Part(p) => p.segment_start.map(|st| (p.msn, st)),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), 2);
        assert_eq!(
            starts[1].1.program_date_time,
            w0 + Duration::from_millis(7) + Duration::from_secs(2)
        );
        assert!(!starts[0].1.discontinuity && !starts[1].1.discontinuity);
    }

    #[test]
    fn rtp_wraps_and_duplicates_are_dropped() {
        let mut s = Segmenter::default();
        let (t0, w0) = (Instant::now(), SystemTime::UNIX_EPOCH);
        let start = u32::MAX - 4 * 960 + 1;
        let out = feed(&mut s, start, 10, t0, w0);
        let p = parts(&out);
        assert_eq!(p, vec![(0, 0, 10, 0)]);
        let out = feed(&mut s, start.wrapping_add(10 * 960), 10, t0, w0);
        assert_eq!(parts(&out)[0].3, 9600, "across the wrap");
        let dup = s
            .push(
                ProgramFrame {
                    rtp_ts: start.wrapping_add(19 * 960),
                    payload: &[1],
                },
                t0,
                w0,
            )
            .unwrap();
        assert!(dup.is_empty());
        assert_eq!(s.next_part(), (0, 2));
    }

    #[test]
    fn small_gap_cuts_part_and_big_jump_is_a_discontinuity() {
        let mut s = Segmenter::default();
        let (t0, w0) = (Instant::now(), SystemTime::UNIX_EPOCH);
        feed(&mut s, 0, 15, t0, w0);
        // Two frames lost: segment 0 ends with its short part, segment 1 starts at the real
        // timestamp (no short part in the middle of a segment).
        let out = feed(&mut s, 17 * 960, 10, t0, w0);
        assert_eq!(parts(&out), vec![(0, 1, 5, 9600), (1, 0, 10, 17 * 960)]);
        assert_eq!(segments(&out), vec![(0, 2, 15)]);
        // A jump of an hour: close segment 1, continue the timeline, flag a discontinuity.
        let out = feed(&mut s, 3600 * 48_000, 10, t0, w0);
        assert_eq!(segments(&out), vec![(1, 1, 10)]);
        let SegmenterOutput::Part(p) = out.last().unwrap() else {
            panic!("expected a part last")
        };
        assert_eq!((p.msn, p.base_media_decode_time), (2, 27 * 960));
        assert!(p.segment_start.unwrap().discontinuity);
    }

    #[test]
    fn a_program_joined_late_starts_at_zero_and_a_resumed_room_continues_after_its_media() {
        let t0 = Instant::now();
        let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // The origin's program has run for an hour when this packager's stream starts.
        let mut s = Segmenter::default();
        let hour = 3600 * 48_000;
        let out = feed(&mut s, hour, 100, t0, w0);
        assert_eq!(parts(&out)[0], (0, 0, 10, 0));
        assert_eq!(parts(&out)[9], (0, 9, 10, 9 * 9600));
        // A packager restart: 100 frames (2 s) were written from w0, then a pause of 8 s, a
        // second stream of 1 s (re-anchored at w0 + 10 s): media ends at w0 + 11 s, decode time
        // at 3 s; the resumed room continues at 11 s, never before 3 s.
        let base = resume_base(w0, w0 + Duration::from_secs(11));
        assert_eq!(base, 11 * 48_000);
        let mut r = Segmenter::default().resume_at(7, Some(w0 + Duration::from_secs(11)), base);
        let out = feed(&mut r, 12_345, 10, t0, w0 + Duration::from_secs(12));
        let SegmenterOutput::Part(p) = &out[0] else {
            panic!("a part")
        };
        assert_eq!((p.msn, p.base_media_decode_time), (7, base));
        assert!(p.segment_start.unwrap().discontinuity);
        assert_eq!(resume_base(w0, w0 - Duration::from_secs(1)), 0);
    }
}
