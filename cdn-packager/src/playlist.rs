//! Sans-IO LL-HLS playlist writer (rfc8216bis): live media playlists with parts, preload hints,
//! program date times, delta updates and rendition reports; the VOD playlist of a recording with
//! speaker changes as `EXT-X-DATERANGE`; the multivariant playlists.
//!
//! Durations are kept in 48 kHz ticks (the media timescale of both renditions), so the output
//! is exact and deterministic: the same inputs always render the same text.

use crate::segmenter::SegmentStart;
use crate::speakers::{attribute_text, SpeakerSpan};
use std::collections::VecDeque;
use std::fmt::Write;
use std::time::{Duration, SystemTime};

/// Media timescale of every rendition (ticks per second).
pub const TICKS_PER_SEC: u64 = 48_000;
/// Target duration in whole seconds (segments are at most 2 s, rounded).
pub const TARGET_DURATION: u32 = 2;
/// Opus part target duration in milliseconds.
pub const PART_TARGET_MS: u32 = 200;
/// Delta updates may skip segments older than this many seconds (6 x target duration).
pub const CAN_SKIP_UNTIL_SECS: u32 = 6 * TARGET_DURATION;
/// Complete segments kept in the live playlist (20 s).
pub const WINDOW_SEGMENTS: usize = 10;
/// Complete segments that still list their parts (plus the segment in progress).
pub const PART_WINDOW_SEGMENTS: usize = 2;
/// Parts per segment (the Opus segmenter cuts 10 parts of 200 ms; the AAC rendition follows).
pub const PARTS_PER_SEGMENT: u32 = amphi_protocol::audio::PARTS_PER_SEGMENT;

/// A rendition of a room: one media playlist in its own directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rendition {
    /// Directory name under the room (`opus`, `aac`).
    pub dir: &'static str,
    /// RFC 6381 codecs string (`opus` lowercase, `mp4a.40.2`).
    pub codecs: &'static str,
    /// Peak bandwidth in bits per second (media plus container overhead).
    pub bandwidth: u32,
    /// Average bandwidth in bits per second.
    pub average_bandwidth: u32,
    /// Longest part in ticks; `PART-TARGET` is this, rounded up to the millisecond.
    pub part_target_ticks: u32,
}

impl Rendition {
    /// `PART-TARGET` in milliseconds (rounded up).
    pub fn part_target_ms(&self) -> u32 {
        (u64::from(self.part_target_ticks) * 1000).div_ceil(TICKS_PER_SEC) as u32
    }
}

/// The Opus rendition (hls.js / MSE): parts of ten 20 ms packets.
pub const OPUS: Rendition = Rendition {
    dir: "opus",
    codecs: "opus",
    bandwidth: 80_000,
    average_bandwidth: 70_000,
    part_target_ticks: 9_600,
};

/// The AAC-LC rendition (Safari / iOS native HLS): parts follow the Opus parts, so they hold 9
/// or 10 AAC frames of 1024 samples (at most 213.3 ms).
pub const AAC: Rendition = Rendition {
    dir: "aac",
    codecs: "mp4a.40.2",
    bandwidth: 96_000,
    average_bandwidth: 76_000,
    part_target_ticks: 10 * 1024,
};

/// Every rendition the packager can write.
pub const ALL_RENDITIONS: &[Rendition] = &[OPUS, AAC];

/// The renditions this build writes.
pub fn renditions() -> &'static [Rendition] {
    if cfg!(feature = "aac") {
        ALL_RENDITIONS
    } else {
        &ALL_RENDITIONS[..1]
    }
}

/// Render a multivariant playlist for `renditions`, each pointing at `{dir}/{media}`.
///
/// Audio-only: one `EXT-X-STREAM-INF` variant per rendition, told apart by `CODECS` (no
/// `EXT-X-MEDIA` group: there is no video to attach an audio group to).
pub fn render_multivariant(renditions: &[Rendition], media: &str) -> String {
    let mut s = String::from("#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    for r in renditions {
        let _ = writeln!(
            s,
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={},CODECS=\"{}\"\n{}/{media}",
            r.bandwidth, r.average_bandwidth, r.codecs, r.dir
        );
    }
    s
}

/// How a rendition's media files are named. Every rendition is audio-only CMAF, so its files
/// carry an audio extension: players that see only a media playlist (Shaka Player guesses the
/// MIME type from the extension) then know it is `audio/mp4`. Recordings written before carry
/// the generic names, which are still served as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Naming {
    /// `init.m4a`, `seg{msn}.m4a`, `part{msn}.{i}.m4a` (what the packager writes).
    #[default]
    Audio,
    /// `init.mp4`, `seg{msn}.m4s`, `part{msn}.{i}.m4s` (older recordings, read only).
    Legacy,
}

impl Naming {
    /// Extension of parts and segments (without the dot).
    pub fn media_ext(self) -> &'static str {
        match self {
            Naming::Audio => "m4a",
            Naming::Legacy => "m4s",
        }
    }

    /// File name of the initialization segment.
    pub fn init(self) -> &'static str {
        match self {
            Naming::Audio => "init.m4a",
            Naming::Legacy => "init.mp4",
        }
    }

    /// File name of part `part` of segment `msn`.
    pub fn part(self, msn: u64, part: u32) -> String {
        format!("part{msn}.{part}.{}", self.media_ext())
    }

    /// File name of segment `msn`.
    pub fn segment(self, msn: u64) -> String {
        format!("seg{msn}.{}", self.media_ext())
    }

    /// The naming whose media extension is `ext`.
    pub fn from_media_ext(ext: &str) -> Option<Naming> {
        match ext {
            "m4a" => Some(Naming::Audio),
            "m4s" => Some(Naming::Legacy),
            _ => None,
        }
    }
}

/// The renditions of the main multivariant playlists (`index.m3u8`, `recording.m3u8`): one
/// codec only, AAC-LC when this build writes it (every HLS player plays it: Safari/iOS, Chromium's
/// native player, hls.js, Shaka, ffmpeg), else Opus. A multivariant playlist with both codecs
/// lets a player switch codecs midway, which Chromium's native player refuses ("Audio codec
/// changes not allowed"); the per-codec playlists ([`multivariants`]) pick one explicitly.
pub fn main_renditions(renditions: &[Rendition]) -> &[Rendition] {
    match renditions.iter().position(|r| r.dir == AAC.dir) {
        Some(i) => &renditions[i..=i],
        None => &renditions[..renditions.len().min(1)],
    }
}

/// A room's multivariant playlists as `(file name, text)`: `{prefix}.m3u8`, the main one
/// ([`main_renditions`]), then `{prefix}-{dir}.m3u8` with the rendition `dir` alone (for
/// players that pick a codec: the web client gives hls.js the Opus one). `prefix`: `index` for
/// the live room (media playlists `playlist.m3u8`), `recording` for its recording
/// (`vod.m3u8`).
pub fn multivariants(renditions: &[Rendition], prefix: &str, media: &str) -> Vec<(String, String)> {
    let mut out = vec![(
        format!("{prefix}.m3u8"),
        render_multivariant(main_renditions(renditions), media),
    )];
    for r in renditions {
        out.push((
            format!("{prefix}-{}.m3u8", r.dir),
            render_multivariant(std::slice::from_ref(r), media),
        ));
    }
    out
}

/// File name of the initialization segment the packager writes.
pub const INIT_NAME: &str = "init.m4a";

/// File name of a part the packager writes.
pub fn part_name(msn: u64, part: u32) -> String {
    Naming::Audio.part(msn, part)
}

/// File name of a segment the packager writes.
pub fn segment_name(msn: u64) -> String {
    Naming::Audio.segment(msn)
}

/// Format a wall-clock time as ISO 8601 UTC with milliseconds.
pub fn format_pdt(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    dt.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    ))
    .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

/// Position `ticks` on the millisecond grid (rounded to the nearest millisecond).
fn grid_ms(ticks: u64) -> u64 {
    (ticks * 1000 + TICKS_PER_SEC / 2) / TICKS_PER_SEC
}

/// Print the span `[from, to)` of the playlist's timeline (ticks) as seconds with three
/// decimals: the distance between its ends on the millisecond grid. Durations printed this way
/// add up exactly, however many follow each other: the parts of a segment to its `EXTINF`, and
/// any run of segments or parts to where the media says it ends (within half a millisecond),
/// even when no part is a whole number of milliseconds (AAC frames are 21.333 ms).
fn write_span(s: &mut String, from: u64, to: u64) {
    write_ms(s, grid_ms(to).saturating_sub(grid_ms(from)));
}

fn write_ms(s: &mut String, ms: u64) {
    let _ = write!(s, "{}.{:03}", ms / 1000, ms % 1000);
}

/// Duration of `ticks`.
pub fn ticks_duration(ticks: u64) -> Duration {
    Duration::from_micros(ticks * 1_000_000 / TICKS_PER_SEC)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    msn: u64,
    start: SegmentStart,
    /// Where it starts on the playlist's timeline (ticks since the playlist's first segment).
    at: u64,
    /// How its files are named.
    naming: Naming,
    /// Duration of each published part, in ticks.
    parts: Vec<u32>,
    /// Duration of the whole segment in ticks (once complete).
    duration: u64,
    complete: bool,
    /// Listed with `EXT-X-GAP`: its media was lost (a packager restart mid-segment).
    gap: bool,
}

/// A complete segment as the VOD playlist lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Media sequence number.
    pub msn: u64,
    /// Wall-clock start and discontinuity flag.
    pub start: SegmentStart,
    /// Duration in ticks.
    pub duration: u64,
    /// No media: listed with `EXT-X-GAP` (lost in a packager restart).
    pub gap: bool,
    /// How its file is named (older recordings resumed after an upgrade keep their names).
    pub naming: Naming,
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

impl PlaylistStatus {
    /// The playlist lists a segment or a part, or has ended.
    pub fn has_media(&self) -> bool {
        self.ended || self.last_complete.is_some() || self.current_parts > 0
    }

    /// The last published part `(msn, part)` (for `EXT-X-RENDITION-REPORT`).
    pub fn last_part(&self) -> Option<(u64, u32)> {
        if self.current_parts > 0 {
            Some((self.current_msn, self.current_parts - 1))
        } else {
            self.last_complete
                .map(|(m, parts)| (m, parts.saturating_sub(1)))
        }
    }
}

/// An `EXT-X-RENDITION-REPORT` line for a sibling rendition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenditionReport {
    /// URI of the sibling media playlist relative to this one (`../aac/playlist.m3u8`).
    pub uri: String,
    /// Its last published part.
    pub last: Option<(u64, u32)>,
}

/// A live media playlist (and, once ended, the source of the VOD playlist).
#[derive(Clone, Debug)]
pub struct MediaPlaylist {
    rendition: Rendition,
    segments: VecDeque<Segment>,
    current: Option<Segment>,
    next: (u64, u32),
    /// End of the last complete segment on the playlist's timeline (ticks).
    timeline_end: u64,
    discontinuity_sequence: u64,
    ended: bool,
    /// Every complete segment since the room opened (the recording).
    history: Vec<SegmentSummary>,
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
    /// A segment completed that is older than the one in progress.
    #[error("segment {0} is out of order")]
    SegmentOutOfOrder(u64),
    /// The playlist already ended.
    #[error("playlist already ended")]
    Ended,
}

impl MediaPlaylist {
    /// An empty live playlist of `rendition` whose first segment will be `msn`.
    pub fn new(rendition: Rendition, msn: u64) -> Self {
        MediaPlaylist {
            rendition,
            segments: VecDeque::new(),
            current: None,
            next: (msn, 0),
            timeline_end: 0,
            discontinuity_sequence: 0,
            ended: false,
            history: Vec::new(),
        }
    }

    /// The rendition.
    pub fn rendition(&self) -> Rendition {
        self.rendition
    }

    /// A part of `duration` ticks has been stored: list it.
    pub fn add_part(
        &mut self,
        msn: u64,
        part: u32,
        duration: u32,
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
                    at: self.timeline_end,
                    naming: Naming::Audio,
                    parts: vec![duration],
                    duration: 0,
                    complete: false,
                    gap: false,
                });
            }
            (Some(cur), None) if cur.msn == msn && cur.parts.len() as u32 == part => {
                cur.parts.push(duration);
            }
            _ => return Err(PlaylistError::OutOfOrder { msn, part }),
        }
        self.next = (msn, part + 1);
        Ok(())
    }

    /// Segment `msn` (`duration` ticks, starting at `start`) has been stored: list it as
    /// complete. Its parts are listed only if they were published before (a segment whose
    /// parts were not uploaded is listed without them).
    pub fn complete_segment(
        &mut self,
        msn: u64,
        start: SegmentStart,
        duration: u64,
    ) -> Result<(), PlaylistError> {
        if self.ended {
            return Err(PlaylistError::Ended);
        }
        let mut seg = match self.current.take() {
            Some(cur) if cur.msn == msn => cur,
            Some(cur) if cur.msn > msn => {
                self.current = Some(cur);
                return Err(PlaylistError::SegmentOutOfOrder(msn));
            }
            _ if msn < self.next.0 => return Err(PlaylistError::SegmentOutOfOrder(msn)),
            _ => Segment {
                msn,
                start,
                at: self.timeline_end,
                naming: Naming::Audio,
                parts: Vec::new(),
                duration: 0,
                complete: false,
                gap: false,
            },
        };
        seg.complete = true;
        seg.duration = duration;
        self.timeline_end = seg.at + duration;
        self.history.push(SegmentSummary {
            msn,
            start: seg.start,
            duration,
            gap: false,
            naming: seg.naming,
        });
        self.segments.push_back(seg);
        self.next = (msn + 1, 0);
        self.slide_window();
        Ok(())
    }

    fn slide_window(&mut self) {
        while self.segments.len() > WINDOW_SEGMENTS {
            if let Some(old) = self.segments.pop_front() {
                if old.start.discontinuity {
                    self.discontinuity_sequence += 1;
                }
            }
        }
    }

    /// A live playlist resumed after a packager restart: `history` (the recording so far, in
    /// media sequence order, e.g. from the durable recording index) fills the window and the
    /// recording, listed without parts; the next segment is `next_msn` (or the one after the
    /// last in `history`, whichever is later). The driver starts the next segment as a
    /// discontinuity.
    pub fn resume(rendition: Rendition, history: Vec<SegmentSummary>, next_msn: u64) -> Self {
        let mut p = MediaPlaylist::new(rendition, next_msn);
        for h in &history {
            p.segments.push_back(Segment {
                msn: h.msn,
                start: h.start,
                at: p.timeline_end,
                naming: h.naming,
                parts: Vec::new(),
                duration: h.duration,
                complete: true,
                gap: h.gap,
            });
            p.timeline_end += h.duration;
            p.slide_window();
        }
        if let Some(last) = history.last() {
            p.next = (next_msn.max(last.msn + 1), 0);
        }
        p.history = history;
        p
    }

    /// The room ended: `EXT-X-ENDLIST`, no more preload hint. A segment still in progress
    /// (parts without their segment) is dropped from the listing.
    pub fn end(&mut self) {
        self.ended = true;
        self.current = None;
    }

    /// True once [`MediaPlaylist::end`] was called.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Every complete segment since the room opened.
    pub fn history(&self) -> &[SegmentSummary] {
        &self.history
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
        let total: u64 = self.segments.iter().map(|s| s.duration).sum();
        let boundary = u64::from(CAN_SKIP_UNTIL_SECS) * TICKS_PER_SEC;
        let mut end = 0u64;
        let mut skip = 0;
        for s in &self.segments {
            end += s.duration;
            if total - end >= boundary {
                skip += 1;
            } else {
                break;
            }
        }
        skip
    }

    fn render_header(&self, s: &mut String) {
        let r = self.rendition;
        let part_target_ms = u64::from(r.part_target_ms());
        s.push_str("#EXTM3U\n#EXT-X-VERSION:9\n");
        let _ = writeln!(s, "#EXT-X-TARGETDURATION:{TARGET_DURATION}");
        s.push_str("#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=");
        write_ms(s, u64::from(CAN_SKIP_UNTIL_SECS) * 1000);
        s.push_str(",PART-HOLD-BACK=");
        write_ms(s, 3 * part_target_ms);
        s.push_str(",HOLD-BACK=");
        write_ms(s, 3 * u64::from(TARGET_DURATION) * 1000);
        s.push_str("\n#EXT-X-PART-INF:PART-TARGET=");
        write_ms(s, part_target_ms);
        s.push('\n');
    }

    /// Render the live playlist; with `skip`, a delta update that replaces the segments older
    /// than the skip boundary with `EXT-X-SKIP` (ignored once ended). `reports` are the sibling
    /// renditions' `EXT-X-RENDITION-REPORT`s.
    pub fn render(&self, skip: bool, reports: &[RenditionReport]) -> String {
        let mut s = String::with_capacity(4096);
        let status = self.status();
        self.render_header(&mut s);
        let _ = writeln!(s, "#EXT-X-MEDIA-SEQUENCE:{}", status.media_sequence);
        if self.discontinuity_sequence > 0 {
            let _ = writeln!(
                s,
                "#EXT-X-DISCONTINUITY-SEQUENCE:{}",
                self.discontinuity_sequence
            );
        }
        let _ = writeln!(s, "#EXT-X-MAP:URI=\"{INIT_NAME}\"");
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
        } else if let Some((msn, part)) = self.preload_hint() {
            let _ = writeln!(
                s,
                "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"{}\"",
                part_name(msn, part)
            );
        }
        for r in reports {
            let _ = write!(s, "#EXT-X-RENDITION-REPORT:URI=\"{}\"", r.uri);
            if let Some((msn, part)) = r.last {
                let _ = write!(s, ",LAST-MSN={msn},LAST-PART={part}");
            }
            s.push('\n');
        }
        s
    }

    /// Render the VOD playlist of the whole recording (every complete segment since the room
    /// opened), with `spans` as `EXT-X-DATERANGE` entries.
    pub fn render_vod(&self, spans: &[SpeakerSpan]) -> String {
        let mut s = String::with_capacity(256 + self.history.len() * 96);
        s.push_str("#EXTM3U\n#EXT-X-VERSION:9\n");
        let _ = writeln!(s, "#EXT-X-TARGETDURATION:{TARGET_DURATION}");
        s.push_str("#EXT-X-PLAYLIST-TYPE:VOD\n#EXT-X-INDEPENDENT-SEGMENTS\n");
        let first = self.history.first().map_or(0, |h| h.msn);
        let mut at = 0u64;
        let _ = writeln!(s, "#EXT-X-MEDIA-SEQUENCE:{first}");
        let _ = writeln!(s, "#EXT-X-MAP:URI=\"{INIT_NAME}\"");
        for (i, seg) in self.history.iter().enumerate() {
            if seg.start.discontinuity && i > 0 {
                s.push_str("#EXT-X-DISCONTINUITY\n");
            }
            let _ = writeln!(
                s,
                "#EXT-X-PROGRAM-DATE-TIME:{}",
                format_pdt(seg.start.program_date_time)
            );
            if i == 0 {
                for (n, span) in spans.iter().enumerate() {
                    let _ = write!(
                        s,
                        "#EXT-X-DATERANGE:ID=\"speaker-{n}\",CLASS=\"com.amphi.speaker\",START-DATE=\"{}\",DURATION=",
                        format_pdt(span.start)
                    );
                    write_ms(&mut s, span.duration.as_millis() as u64);
                    let _ = write!(s, ",X-SPEAKER-ID=\"{}\"", span.speaker);
                    if let Some(who) = &span.who {
                        let _ = write!(
                            s,
                            ",X-SPEAKER-NAME=\"{}\",X-SPEAKER-USER=\"{}\"",
                            attribute_text(&who.name),
                            attribute_text(&who.user)
                        );
                    }
                    s.push('\n');
                }
            }
            if seg.gap {
                s.push_str("#EXT-X-GAP\n");
            }
            s.push_str("#EXTINF:");
            write_span(&mut s, at, at + seg.duration);
            at += seg.duration;
            let _ = writeln!(s, ",\n{}", seg.naming.segment(seg.msn));
        }
        s.push_str("#EXT-X-ENDLIST\n");
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
            let mut at = seg.at;
            for (i, ticks) in seg.parts.iter().enumerate() {
                s.push_str("#EXT-X-PART:DURATION=");
                write_span(s, at, at + u64::from(*ticks));
                at += u64::from(*ticks);
                let _ = writeln!(
                    s,
                    ",URI=\"{}\",INDEPENDENT=YES",
                    seg.naming.part(seg.msn, i as u32)
                );
            }
        }
        if seg.complete {
            if seg.gap {
                s.push_str("#EXT-X-GAP\n");
            }
            s.push_str("#EXTINF:");
            write_span(s, seg.at, seg.at + seg.duration);
            let _ = writeln!(s, ",\n{}", seg.naming.segment(seg.msn));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphi_testkit::conformance::{check_media, Expect};

    const PART: u32 = 9_600;

    fn start(secs: u64, discontinuity: bool) -> SegmentStart {
        start_ms(secs * 1000, discontinuity)
    }

    fn start_ms(ms: u64, discontinuity: bool) -> SegmentStart {
        SegmentStart {
            program_date_time: SystemTime::UNIX_EPOCH
                + Duration::from_secs(1_700_000_000)
                + Duration::from_millis(250 + ms),
            discontinuity,
        }
    }

    fn add_segment(p: &mut MediaPlaylist, msn: u64, parts: u32, st: SegmentStart) {
        for i in 0..parts {
            p.add_part(msn, i, PART, (i == 0).then_some(st)).unwrap();
        }
        p.complete_segment(msn, st, u64::from(parts * PART))
            .unwrap();
    }

    fn live() -> Expect {
        Expect::live(OPUS.part_target_ms())
    }

    #[test]
    fn golden_small_playlist() {
        let mut p = MediaPlaylist::new(OPUS, 0);
        add_segment(&mut p, 0, 2, start(0, false));
        p.add_part(1, 0, PART, Some(start_ms(400, false))).unwrap();
        p.add_part(1, 1, 4 * 960, None).unwrap();
        let expected = "\
#EXTM3U
#EXT-X-VERSION:9
#EXT-X-TARGETDURATION:2
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=12.000,PART-HOLD-BACK=0.600,HOLD-BACK=6.000
#EXT-X-PART-INF:PART-TARGET=0.200
#EXT-X-MEDIA-SEQUENCE:0
#EXT-X-MAP:URI=\"init.m4a\"
#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.250Z
#EXT-X-PART:DURATION=0.200,URI=\"part0.0.m4a\",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.200,URI=\"part0.1.m4a\",INDEPENDENT=YES
#EXTINF:0.400,
seg0.m4a
#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.650Z
#EXT-X-PART:DURATION=0.200,URI=\"part1.0.m4a\",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.080,URI=\"part1.1.m4a\",INDEPENDENT=YES
#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part1.2.m4a\"
#EXT-X-RENDITION-REPORT:URI=\"../aac/playlist.m3u8\",LAST-MSN=1,LAST-PART=0
";
        let reports = [RenditionReport {
            uri: "../aac/playlist.m3u8".into(),
            last: Some((1, 0)),
        }];
        let text = p.render(false, &reports);
        assert_eq!(text, expected);
        assert_eq!(
            p.render(true, &reports),
            expected,
            "nothing old enough to skip"
        );
        check_media(&text, &live().with_reports(1)).unwrap();
    }

    #[test]
    fn aac_part_target_rounds_up_and_conforms() {
        let mut p = MediaPlaylist::new(AAC, 3);
        let st = start(0, false);
        p.add_part(3, 0, 9 * 1024, Some(st)).unwrap();
        p.add_part(3, 1, 10 * 1024, None).unwrap();
        let text = p.render(false, &[]);
        assert!(text.contains("PART-TARGET=0.214\n"), "{text}");
        assert!(text.contains("PART-HOLD-BACK=0.642,"), "{text}");
        assert!(text.contains("#EXT-X-PART:DURATION=0.213,URI=\"part3.1.m4a\""));
        check_media(&text, &Expect::live(AAC.part_target_ms())).unwrap();
    }

    #[test]
    fn endlist_after_room_ended_and_discontinuity() {
        let mut p = MediaPlaylist::new(OPUS, 0);
        add_segment(&mut p, 0, 10, start(0, false));
        add_segment(&mut p, 1, 3, start(2, true));
        p.add_part(2, 0, PART, Some(start(4, false))).unwrap();
        p.end();
        let text = p.render(true, &[]);
        assert!(
            text.ends_with("#EXTINF:0.600,\nseg1.m4a\n#EXT-X-ENDLIST\n"),
            "{text}"
        );
        assert!(!text.contains("PRELOAD-HINT"));
        assert!(!text.contains("EXT-X-SKIP"));
        assert!(!text.contains("part2.0"), "unfinished segment dropped");
        assert_eq!(text.matches("#EXT-X-DISCONTINUITY\n").count(), 1);
        check_media(&text, &Expect::ended(OPUS.part_target_ms())).unwrap();
        assert_eq!(
            p.add_part(2, 0, PART, Some(start(4, false))),
            Err(PlaylistError::Ended)
        );
        assert!(p.status().ended);
        assert_eq!(p.preload_hint(), None);
    }

    #[test]
    fn vod_lists_the_whole_recording_with_speaker_dateranges() {
        let mut p = MediaPlaylist::new(OPUS, 0);
        for msn in 0..14 {
            add_segment(&mut p, msn, 10, start(2 * msn, msn == 12));
        }
        p.end();
        let spans = [
            SpeakerSpan {
                speaker: 0x0100_0001,
                start: start(0, false).program_date_time,
                duration: Duration::from_millis(4_500),
                who: None,
            },
            SpeakerSpan {
                speaker: 0x0200_0003,
                start: start(4, false).program_date_time + Duration::from_millis(500),
                duration: Duration::from_secs(3),
                who: Some(crate::speakers::Speaker {
                    user: "user-\"7\"".into(),
                    name: "Ada \"the\" Lovelace\r\nx".into(),
                }),
            },
        ];
        let vod = p.render_vod(&spans);
        assert!(vod.contains("#EXT-X-PLAYLIST-TYPE:VOD\n"));
        assert_eq!(
            vod.matches("#EXTINF:2.000,").count(),
            14,
            "all, not the window"
        );
        assert!(vod.contains("seg0.m4a") && vod.contains("seg13.m4a"));
        assert!(vod.contains(
            "#EXT-X-DATERANGE:ID=\"speaker-1\",CLASS=\"com.amphi.speaker\",\
             START-DATE=\"2023-11-14T22:13:24.750Z\",DURATION=3.000,X-SPEAKER-ID=\"33554435\",\
             X-SPEAKER-NAME=\"Ada 'the' Lovelace  x\",X-SPEAKER-USER=\"user-'7'\"\n"
        ));
        // A turn nobody named carries the participant id only.
        assert!(
            vod.contains("DURATION=4.500,X-SPEAKER-ID=\"16777217\"\n"),
            "{vod}"
        );
        assert!(vod.ends_with("seg13.m4a\n#EXT-X-ENDLIST\n"));
        check_media(&vod, &Expect::vod()).unwrap();
        let parsed = m3u8_rs::parse_media_playlist_res(vod.as_bytes()).unwrap();
        assert_eq!(parsed.segments.len(), 14);
        assert_eq!(parsed.playlist_type, Some(m3u8_rs::MediaPlaylistType::Vod));
    }

    #[test]
    fn preload_hint_rolls_to_next_segment() {
        let mut p = MediaPlaylist::new(OPUS, 0);
        for i in 0..10 {
            p.add_part(0, i, PART, (i == 0).then_some(start(0, false)))
                .unwrap();
        }
        assert_eq!(p.preload_hint(), Some((1, 0)));
        assert!(p.render(false, &[]).contains("URI=\"part1.0.m4a\"\n"));
        p.complete_segment(0, start(0, false), 96_000).unwrap();
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
        assert_eq!(p.status().last_part(), Some((0, 9)));
    }

    #[test]
    fn out_of_order_updates_are_refused_and_partless_segments_listed() {
        let mut p = MediaPlaylist::new(OPUS, 0);
        assert!(p.add_part(0, 1, PART, None).is_err());
        assert!(
            p.add_part(0, 0, PART, None).is_err(),
            "first part needs a start"
        );
        p.add_part(0, 0, PART, Some(start(0, false))).unwrap();
        assert!(p.add_part(0, 2, PART, None).is_err());
        p.complete_segment(0, start(0, false), 9_600).unwrap();
        assert_eq!(
            p.complete_segment(0, start(0, false), 9_600),
            Err(PlaylistError::SegmentOutOfOrder(0))
        );
        // Segment 1 arrives without its parts (they were not stored): listed whole.
        p.complete_segment(1, start_ms(200, false), 96_000).unwrap();
        let text = p.render(false, &[]);
        assert!(text.contains("#EXTINF:2.000,\nseg1.m4a\n"));
        check_media(&text, &live()).unwrap();
    }

    #[test]
    fn window_slides_parts_expire_and_delta_skips() {
        let mut p = MediaPlaylist::new(OPUS, 0);
        for msn in 0..13 {
            add_segment(&mut p, msn, 10, start(2 * msn, msn == 1));
        }
        let st = p.status();
        assert_eq!(st.media_sequence, 3);
        assert_eq!(st.last_complete, Some((12, 10)));
        let full = p.render(false, &[]);
        assert!(full.contains("#EXT-X-MEDIA-SEQUENCE:3\n#EXT-X-DISCONTINUITY-SEQUENCE:1\n"));
        assert_eq!(full.matches("#EXTINF:2.000,").count(), 10);
        assert_eq!(
            full.matches("#EXT-X-PART:").count(),
            20,
            "parts of the last 2 only"
        );
        assert!(!full.contains("part10.9.m4a"));
        assert!(full.contains("part11.0.m4a"));
        // 20 s listed, skip boundary 12 s: the first 4 segments (8 s) are skipped.
        assert_eq!(p.skippable_segments(), 4);
        let delta = p.render(true, &[]);
        assert!(delta.contains("#EXT-X-SKIP:SKIPPED-SEGMENTS=4\n"));
        assert!(!delta.contains("seg6.m4a") && delta.contains("seg7.m4a"));
        check_media(&full, &live()).unwrap();
        check_media(&delta, &live()).unwrap();
    }

    #[test]
    fn resumed_playlist_keeps_the_recording_and_marks_the_restart() {
        let mut before = MediaPlaylist::new(OPUS, 0);
        for msn in 0..12 {
            add_segment(&mut before, msn, 10, start(2 * msn, false));
        }
        let mut history = before.history().to_vec();
        // Segment 11 was stored by an older packager, under its older name.
        history[11].naming = Naming::Legacy;
        // Segment 12 was cut off by the restart: a gap.
        history.push(SegmentSummary {
            msn: 12,
            start: start(24, false),
            duration: 3 * u64::from(PART),
            gap: true,
            naming: Naming::Audio,
        });
        let mut p = MediaPlaylist::resume(OPUS, history, 13);
        assert_eq!(p.preload_hint(), Some((13, 0)));
        assert_eq!(p.status().last_complete, Some((12, 0)));
        add_segment(&mut p, 13, 10, start(40, true));
        p.add_part(14, 0, PART, Some(start(42, false))).unwrap();
        let text = p.render(false, &[]);
        let sum = check_media(&text, &live()).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        assert_eq!(
            sum.media_sequence, 4,
            "the window slides over the resumed segments"
        );
        assert_eq!(sum.discontinuities, vec![13]);
        assert!(
            text.contains("#EXT-X-GAP\n#EXTINF:0.600,\nseg12.m4a\n"),
            "{text}"
        );
        assert!(text.contains("#EXTINF:2.000,\nseg11.m4s\n"), "{text}");
        p.end();
        let vod = p.render_vod(&[]);
        assert!(vod.contains("#EXTINF:2.000,\nseg11.m4s\n"), "{vod}");
        let sum = check_media(&vod, &Expect::vod()).unwrap_or_else(|e| panic!("{e:?}\n{vod}"));
        assert_eq!(sum.segments.len(), 14, "before and after the restart");
        assert_eq!(sum.discontinuities, vec![13]);
        assert_eq!(
            sum.segments
                .iter()
                .filter(|s| s.gap)
                .map(|s| s.msn)
                .collect::<Vec<_>>(),
            [12]
        );
    }

    #[test]
    fn main_multivariants_have_one_codec_and_each_codec_has_its_own() {
        let files = multivariants(ALL_RENDITIONS, "index", "playlist.m3u8");
        let names: Vec<_> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["index.m3u8", "index-opus.m3u8", "index-aac.m3u8"]);
        for (i, codec, uri) in [
            (0, "mp4a.40.2", "aac/playlist.m3u8"),
            (1, "opus", "opus/playlist.m3u8"),
            (2, "mp4a.40.2", "aac/playlist.m3u8"),
        ] {
            let (name, text) = &files[i];
            let uris = amphi_testkit::conformance::check_multivariant(text, 1)
                .unwrap_or_else(|e| panic!("{name}: {e:?}\n{text}"));
            assert_eq!(uris, [uri], "{name}");
            assert!(text.contains(&format!("CODECS=\"{codec}\"")), "{name}");
            assert_eq!(text.matches("#EXT-X-STREAM-INF").count(), 1, "{name}");
        }
        let rec = multivariants(ALL_RENDITIONS, "recording", "vod.m3u8");
        assert_eq!(rec[0].0, "recording.m3u8");
        assert!(rec[0].1.ends_with("\naac/vod.m3u8\n"));
        assert_eq!(main_renditions(&ALL_RENDITIONS[..1]), &[OPUS]);
    }

    #[test]
    fn multivariant_lists_both_renditions() {
        let text = render_multivariant(ALL_RENDITIONS, "playlist.m3u8");
        assert_eq!(
            text,
            "#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-INDEPENDENT-SEGMENTS\n\
             #EXT-X-STREAM-INF:BANDWIDTH=80000,AVERAGE-BANDWIDTH=70000,CODECS=\"opus\"\n\
             opus/playlist.m3u8\n\
             #EXT-X-STREAM-INF:BANDWIDTH=96000,AVERAGE-BANDWIDTH=76000,CODECS=\"mp4a.40.2\"\n\
             aac/playlist.m3u8\n"
        );
        amphi_testkit::conformance::check_multivariant(&text, ALL_RENDITIONS.len()).unwrap();
    }
}
