//! Sans-IO LL-HLS playlist writer (rfc8216bis): media playlists with parts, preload hints,
//! program date times, delta updates, and the multivariant playlist.
//!
//! Output is deterministic: the same inputs always render the same text.

use crate::segmenter::SegmentStart;
use amphi_protocol::audio::PARTS_PER_SEGMENT;
use std::collections::VecDeque;
use std::fmt::Write;
use std::time::SystemTime;

/// Target duration in whole seconds (segments are at most 2 s).
pub const TARGET_DURATION: u32 = 2;
/// Part target duration in milliseconds.
pub const PART_TARGET_MS: u32 = 200;
/// Delta updates may skip segments older than this many seconds (6 x target duration).
pub const CAN_SKIP_UNTIL_SECS: u32 = 12;
/// Complete segments kept in the live playlist (20 s).
pub const WINDOW_SEGMENTS: usize = 10;
/// Complete segments that still list their parts (plus the segment in progress).
pub const PART_WINDOW_SEGMENTS: usize = 2;

/// A rendition of a room: one media playlist in its own directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rendition {
    /// Directory name under the room (`opus`).
    pub dir: &'static str,
    /// RFC 6381 codecs string, lowercase (`opus`).
    pub codecs: &'static str,
    /// Peak bandwidth in bits per second (media plus container overhead).
    pub bandwidth: u32,
    /// Average bandwidth in bits per second.
    pub average_bandwidth: u32,
}

/// The Opus rendition (hls.js / MSE). An AAC rendition for native Apple players is a later addition
/// to [`RENDITIONS`].
pub const OPUS: Rendition = Rendition {
    dir: "opus",
    codecs: "opus",
    bandwidth: 96_000,
    average_bandwidth: 72_000,
};

/// Every rendition the packager writes, in multivariant order.
pub const RENDITIONS: &[Rendition] = &[OPUS];

/// Render the multivariant playlist (`index.m3u8`) for `renditions`.
pub fn render_multivariant(renditions: &[Rendition]) -> String {
    let mut s = String::from("#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    for r in renditions {
        let _ = writeln!(
            s,
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={},CODECS=\"{}\"\n{}/playlist.m3u8",
            r.bandwidth, r.average_bandwidth, r.codecs, r.dir
        );
    }
    s
}

/// File name of a part.
pub fn part_name(msn: u64, part: u32) -> String {
    format!("part{msn}.{part}.m4s")
}

/// File name of a segment.
pub fn segment_name(msn: u64) -> String {
    format!("seg{msn}.m4s")
}

/// Format a wall-clock time as ISO 8601 UTC with milliseconds.
pub fn format_pdt(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    dt.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    ))
    .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

fn write_secs(s: &mut String, frames: u32) {
    // frames * 20 ms, printed with three decimals; exact in integer arithmetic.
    let ms = u64::from(frames) * 20;
    let _ = write!(s, "{}.{:03}", ms / 1000, ms % 1000);
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    msn: u64,
    start: SegmentStart,
    /// Frames of each part, in order.
    parts: Vec<u32>,
    complete: bool,
}

impl Segment {
    fn frames(&self) -> u32 {
        self.parts.iter().sum()
    }
}

/// What blocking reload decisions need to know about a playlist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlaylistStatus {
    /// The playlist has `EXT-X-ENDLIST`.
    pub ended: bool,
    /// Media sequence number of the first segment listed.
    pub media_sequence: u64,
    /// Last complete segment and its part count.
    pub last_complete: Option<(u64, u32)>,
    /// Media sequence number of the segment in progress (the next one if none has parts yet).
    pub current_msn: u64,
    /// Parts of the segment in progress already published.
    pub current_parts: u32,
}

/// A live media playlist.
#[derive(Clone, Debug, Default)]
pub struct MediaPlaylist {
    segments: VecDeque<Segment>,
    current: Option<Segment>,
    next: (u64, u32),
    discontinuity_sequence: u64,
    ended: bool,
}

/// Why a playlist update was refused (the driver fed parts out of order).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlaylistError {
    /// The part is not the one the playlist expects next.
    #[error("part {msn}.{part} is out of order")]
    OutOfOrder {
        /// Its segment.
        msn: u64,
        /// Its index.
        part: u32,
    },
    /// A segment completed that is not the one in progress.
    #[error("segment {0} is not in progress")]
    NotInProgress(u64),
    /// The playlist already ended.
    #[error("playlist already ended")]
    Ended,
}

impl MediaPlaylist {
    /// An empty live playlist.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty live playlist whose first segment will be `msn`.
    pub fn starting_at(msn: u64) -> Self {
        MediaPlaylist {
            next: (msn, 0),
            ..Default::default()
        }
    }

    /// A part of `frames` frames has been written: list it.
    pub fn add_part(
        &mut self,
        msn: u64,
        part: u32,
        frames: u32,
        segment_start: Option<SegmentStart>,
    ) -> Result<(), PlaylistError> {
        if self.ended {
            return Err(PlaylistError::Ended);
        }
        match (&mut self.current, segment_start) {
            (None, Some(start)) if part == 0 && msn >= self.next.0 => {
                self.current = Some(Segment {
                    msn,
                    start,
                    parts: vec![frames],
                    complete: false,
                });
            }
            (Some(cur), None) if cur.msn == msn && cur.parts.len() as u32 == part => {
                cur.parts.push(frames);
            }
            _ => return Err(PlaylistError::OutOfOrder { msn, part }),
        }
        self.next = (msn, part + 1);
        Ok(())
    }

    /// The segment in progress has been written as a whole: list it as complete.
    pub fn complete_segment(&mut self, msn: u64) -> Result<(), PlaylistError> {
        match self.current.take() {
            Some(mut seg) if seg.msn == msn => {
                seg.complete = true;
                self.segments.push_back(seg);
                self.next = (msn + 1, 0);
                while self.segments.len() > WINDOW_SEGMENTS {
                    if let Some(old) = self.segments.pop_front() {
                        if old.start.discontinuity {
                            self.discontinuity_sequence += 1;
                        }
                    }
                }
                Ok(())
            }
            other => {
                self.current = other;
                Err(PlaylistError::NotInProgress(msn))
            }
        }
    }

    /// The room ended: `EXT-X-ENDLIST`, no more preload hint.
    pub fn end(&mut self) {
        self.ended = true;
    }

    /// True once [`MediaPlaylist::end`] was called.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// The state blocking reloads are decided on.
    pub fn status(&self) -> PlaylistStatus {
        let last_complete = self.segments.back().map(|s| (s.msn, s.parts.len() as u32));
        let (current_msn, current_parts) = match &self.current {
            Some(c) => (c.msn, c.parts.len() as u32),
            None => (self.next.0, 0),
        };
        PlaylistStatus {
            ended: self.ended,
            media_sequence: self.segments.front().map_or(current_msn, |s| s.msn),
            last_complete,
            current_msn,
            current_parts,
        }
    }

    /// Number of complete segments a delta update (`_HLS_skip=YES`) skips.
    pub fn skippable_segments(&self) -> usize {
        if self.ended {
            return 0;
        }
        let total: u64 = self.segments.iter().map(|s| u64::from(s.frames())).sum();
        let boundary_frames = u64::from(CAN_SKIP_UNTIL_SECS) * 50;
        let mut end = 0u64;
        let mut skip = 0;
        for s in &self.segments {
            end += u64::from(s.frames());
            if total - end >= boundary_frames {
                skip += 1;
            } else {
                break;
            }
        }
        skip
    }

    /// Render the playlist; with `skip`, render a delta update that replaces the segments older
    /// than the skip boundary with `EXT-X-SKIP` (ignored once ended).
    pub fn render(&self, skip: bool) -> String {
        let mut s = String::with_capacity(4096);
        let status = self.status();
        s.push_str("#EXTM3U\n#EXT-X-VERSION:9\n");
        let _ = writeln!(s, "#EXT-X-TARGETDURATION:{TARGET_DURATION}");
        let part_target_frames = PART_TARGET_MS / 20;
        s.push_str("#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=");
        write_secs(&mut s, CAN_SKIP_UNTIL_SECS * 50);
        s.push_str(",PART-HOLD-BACK=");
        write_secs(&mut s, 3 * part_target_frames);
        s.push_str(",HOLD-BACK=");
        write_secs(&mut s, 3 * TARGET_DURATION * 50);
        s.push_str("\n#EXT-X-PART-INF:PART-TARGET=");
        write_secs(&mut s, part_target_frames);
        let _ = writeln!(s, "\n#EXT-X-MEDIA-SEQUENCE:{}", status.media_sequence);
        if self.discontinuity_sequence > 0 {
            let _ = writeln!(
                s,
                "#EXT-X-DISCONTINUITY-SEQUENCE:{}",
                self.discontinuity_sequence
            );
        }
        s.push_str("#EXT-X-MAP:URI=\"init.mp4\"\n");
        let skipped = if skip { self.skippable_segments() } else { 0 };
        if skipped > 0 {
            let _ = writeln!(s, "#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}");
        }
        let with_parts_from = self.segments.len().saturating_sub(PART_WINDOW_SEGMENTS);
        for (i, seg) in self.segments.iter().enumerate().skip(skipped) {
            Self::render_segment(&mut s, seg, i >= with_parts_from);
        }
        if let Some(cur) = &self.current {
            Self::render_segment(&mut s, cur, true);
        }
        if self.ended {
            s.push_str("#EXT-X-ENDLIST\n");
        } else {
            let (msn, part) = self.next;
            let (msn, part) = if part >= PARTS_PER_SEGMENT {
                (msn + 1, 0)
            } else {
                (msn, part)
            };
            let _ = writeln!(
                s,
                "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"{}\"",
                part_name(msn, part)
            );
        }
        s
    }

    /// The part the preload hint names, if the playlist is live.
    pub fn preload_hint(&self) -> Option<(u64, u32)> {
        if self.ended {
            return None;
        }
        let (msn, part) = self.next;
        Some(if part >= PARTS_PER_SEGMENT {
            (msn + 1, 0)
        } else {
            (msn, part)
        })
    }

    fn render_segment(s: &mut String, seg: &Segment, with_parts: bool) {
        if seg.start.discontinuity {
            s.push_str("#EXT-X-DISCONTINUITY\n");
        }
        let _ = writeln!(
            s,
            "#EXT-X-PROGRAM-DATE-TIME:{}",
            format_pdt(seg.start.program_date_time)
        );
        if with_parts {
            for (i, frames) in seg.parts.iter().enumerate() {
                s.push_str("#EXT-X-PART:DURATION=");
                write_secs(s, *frames);
                let _ = writeln!(
                    s,
                    ",URI=\"{}\",INDEPENDENT=YES",
                    part_name(seg.msn, i as u32)
                );
            }
        }
        if seg.complete {
            s.push_str("#EXTINF:");
            write_secs(s, seg.frames());
            let _ = writeln!(s, ",\n{}", segment_name(seg.msn));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn start(secs: u64, discontinuity: bool) -> SegmentStart {
        SegmentStart {
            program_date_time: SystemTime::UNIX_EPOCH
                + Duration::from_secs(1_700_000_000 + secs)
                + Duration::from_millis(250),
            discontinuity,
        }
    }

    fn add_segment(p: &mut MediaPlaylist, msn: u64, parts: u32, st: SegmentStart) {
        for i in 0..parts {
            p.add_part(msn, i, 10, (i == 0).then_some(st)).unwrap();
        }
        p.complete_segment(msn).unwrap();
    }

    #[test]
    fn golden_small_playlist() {
        let mut p = MediaPlaylist::new();
        add_segment(&mut p, 0, 2, start(0, false));
        p.add_part(1, 0, 10, Some(start(2, false))).unwrap();
        p.add_part(1, 1, 4, None).unwrap();
        let expected = "\
#EXTM3U
#EXT-X-VERSION:9
#EXT-X-TARGETDURATION:2
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=12.000,PART-HOLD-BACK=0.600,HOLD-BACK=6.000
#EXT-X-PART-INF:PART-TARGET=0.200
#EXT-X-MEDIA-SEQUENCE:0
#EXT-X-MAP:URI=\"init.mp4\"
#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.250Z
#EXT-X-PART:DURATION=0.200,URI=\"part0.0.m4s\",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.200,URI=\"part0.1.m4s\",INDEPENDENT=YES
#EXTINF:0.400,
seg0.m4s
#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:22.250Z
#EXT-X-PART:DURATION=0.200,URI=\"part1.0.m4s\",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.080,URI=\"part1.1.m4s\",INDEPENDENT=YES
#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part1.2.m4s\"
";
        assert_eq!(p.render(false), expected);
        assert_eq!(p.render(true), expected, "nothing old enough to skip");
    }

    #[test]
    fn endlist_after_room_ended_and_discontinuity() {
        let mut p = MediaPlaylist::new();
        add_segment(&mut p, 0, 10, start(0, false));
        add_segment(&mut p, 1, 3, start(2, true));
        p.end();
        let text = p.render(true);
        assert!(
            text.ends_with("#EXTINF:0.600,\nseg1.m4s\n#EXT-X-ENDLIST\n"),
            "{text}"
        );
        assert!(!text.contains("PRELOAD-HINT"));
        assert!(!text.contains("EXT-X-SKIP"));
        assert_eq!(text.matches("#EXT-X-DISCONTINUITY\n").count(), 1);
        assert_eq!(
            p.add_part(2, 0, 10, Some(start(4, false))),
            Err(PlaylistError::Ended)
        );
        assert!(p.status().ended);
        assert_eq!(p.preload_hint(), None);
    }

    #[test]
    fn preload_hint_rolls_to_next_segment() {
        let mut p = MediaPlaylist::new();
        for i in 0..10 {
            p.add_part(0, i, 10, (i == 0).then_some(start(0, false)))
                .unwrap();
        }
        assert_eq!(p.preload_hint(), Some((1, 0)));
        assert!(p.render(false).contains("URI=\"part1.0.m4s\"\n"));
        p.complete_segment(0).unwrap();
        assert_eq!(p.preload_hint(), Some((1, 0)));
        assert_eq!(
            p.status(),
            PlaylistStatus {
                ended: false,
                media_sequence: 0,
                last_complete: Some((0, 10)),
                current_msn: 1,
                current_parts: 0
            }
        );
    }

    #[test]
    fn out_of_order_updates_are_refused() {
        let mut p = MediaPlaylist::new();
        assert!(p.add_part(0, 1, 10, None).is_err());
        assert!(
            p.add_part(0, 0, 10, None).is_err(),
            "first part needs a start"
        );
        p.add_part(0, 0, 10, Some(start(0, false))).unwrap();
        assert!(p.add_part(0, 2, 10, None).is_err());
        assert_eq!(p.complete_segment(3), Err(PlaylistError::NotInProgress(3)));
        p.complete_segment(0).unwrap();
    }

    #[test]
    fn window_slides_parts_expire_and_delta_skips() {
        let mut p = MediaPlaylist::new();
        for msn in 0..13 {
            add_segment(&mut p, msn, 10, start(2 * msn, msn == 1));
        }
        let st = p.status();
        assert_eq!(st.media_sequence, 3);
        assert_eq!(st.last_complete, Some((12, 10)));
        let full = p.render(false);
        assert!(full.contains("#EXT-X-MEDIA-SEQUENCE:3\n#EXT-X-DISCONTINUITY-SEQUENCE:1\n"));
        assert_eq!(full.matches("#EXTINF:2.000,").count(), 10);
        assert_eq!(
            full.matches("#EXT-X-PART:").count(),
            20,
            "parts of the last 2 only"
        );
        assert!(!full.contains("part10.9.m4s"));
        assert!(full.contains("part11.0.m4s"));
        // 20 s listed, skip boundary 12 s: the first 4 segments (8 s) are skipped.
        assert_eq!(p.skippable_segments(), 4);
        let delta = p.render(true);
        assert!(delta.contains("#EXT-X-SKIP:SKIPPED-SEGMENTS=4\n"));
        assert!(!delta.contains("seg6.m4s") && delta.contains("seg7.m4s"));
    }

    #[test]
    fn multivariant_lists_the_opus_rendition() {
        assert_eq!(
            render_multivariant(RENDITIONS),
            "#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-INDEPENDENT-SEGMENTS\n\
             #EXT-X-STREAM-INF:BANDWIDTH=96000,AVERAGE-BANDWIDTH=72000,CODECS=\"opus\"\n\
             opus/playlist.m3u8\n"
        );
    }
}
