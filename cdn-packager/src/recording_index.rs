//! Sans-IO durable recording index: the complete segments of a rendition, stored in chunks as
//! segments complete and read back when a restarted packager reopens a room, so the recording
//! (VOD) lists the segments from before and after the restart and media sequence numbers never
//! go backwards.
//!
//! A chunk holds the segments whose media sequence numbers fall in
//! `[chunk * CHUNK_SEGMENTS, (chunk + 1) * CHUNK_SEGMENTS)` and is stored as
//! `{room}/{rendition}/index/{chunk}.txt`: only the last chunk is rewritten as a room goes on,
//! so a write stays small however long the room lasts. Text, one line per segment after a
//! version line:
//!
//! ```text
//! amphi-recording-index 1
//! {msn} {program date time, Unix microseconds} {duration, 48 kHz ticks} {flags}
//! ```
//!
//! `flags` is `-`, or `d` (discontinuity) and/or `g` (gap: media lost in a restart). Media
//! sequence numbers above [`MAX_MSN`] (the largest a URL may carry) are refused.
//!
//! The room's speaker turns (the recording's `EXT-X-DATERANGE`s) are stored beside it as
//! `{room}/speakers.txt`, rewritten as segments complete, in the same kind of text:
//!
//! ```text
//! amphi-speaker-turns 2
//! {participant id} {start, Unix microseconds} {duration, microseconds} {user id} {name}
//! ```
//!
//! `user id` and `name` are percent-encoded (every byte outside `!`..`~`, and `%`, as `%XX`), both
//! empty when the speaker's identity is unknown. Version 1 files (the first three fields only,
//! written before identities were carried) still load, their turns unnamed.

use crate::playlist::{Naming, SegmentSummary};
use crate::request::MAX_MSN;
use crate::segmenter::SegmentStart;
use crate::speakers::Speaker;
use crate::speakers::SpeakerSpan;
use std::fmt::Write;
use std::time::{Duration, SystemTime};

/// Segments per index chunk.
pub const CHUNK_SEGMENTS: u64 = 512;
/// First line of every chunk.
const HEADER: &str = "amphi-recording-index 1";
/// Longest run of missing segments filled with gaps when resuming; a longer hole means the
/// index is not usable (the recording then restarts after the hole).
pub const MAX_GAP_SEGMENTS: u64 = 64;
/// Longest segment accepted from an index line (10 s in ticks; segments are at most 2 s).
const MAX_SEGMENT_TICKS: u64 = 480_000;
/// Latest program date time accepted from an index line (the year 3000, Unix microseconds).
const MAX_PDT_US: u64 = 32_503_680_000_000_000;
/// Storage key of the speaker turns, relative to the room's directory.
pub const TURNS_FILE: &str = "speakers.txt";
/// First line of the turns file this build writes.
const TURNS_HEADER: &str = "amphi-speaker-turns 2";
/// First line of the turns files written before identities were carried (still read).
const TURNS_HEADER_V1: &str = "amphi-speaker-turns 1";
/// Most turns read back (a day of one-second turns); more lines are refused.
pub const MAX_TURNS: usize = 86_400;
/// Longest turn accepted (a day, microseconds).
const MAX_TURN_US: u64 = 86_400_000_000;

/// The chunk holding segment `msn`.
pub fn chunk_of(msn: u64) -> u64 {
    msn / CHUNK_SEGMENTS
}

/// Key of chunk `chunk` relative to the rendition's directory.
pub fn chunk_name(chunk: u64) -> String {
    format!("index/{chunk}.txt")
}

/// Render chunk `chunk` from `history` (in media sequence order): the entries in its range.
pub fn render_chunk(history: &[SegmentSummary], chunk: u64) -> String {
    let from = history.partition_point(|s| chunk_of(s.msn) < chunk);
    let to = history.partition_point(|s| chunk_of(s.msn) <= chunk);
    let mut out = String::with_capacity(32 + (to - from) * 40);
    out.push_str(HEADER);
    out.push('\n');
    for s in &history[from..to] {
        let us = s
            .start
            .program_date_time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let flags = match (s.start.discontinuity, s.gap) {
            (false, false) => "-",
            (true, false) => "d",
            (false, true) => "g",
            (true, true) => "dg",
        };
        let _ = writeln!(out, "{} {us} {} {flags}", s.msn, s.duration);
    }
    out
}

/// Why a stored index chunk or turns file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    /// The first line is not a known version.
    #[error("unknown file (version line missing or unknown)")]
    Version,
    /// A line is malformed.
    #[error("line {0} is malformed")]
    Line(usize),
    /// More than [`MAX_TURNS`] turns.
    #[error("more than {MAX_TURNS} turns")]
    TooMany,
}

/// The non-empty lines of a stored text file after `header`, with their 1-based line numbers.
fn records<'a>(
    stored: &'a [u8],
    header: &str,
) -> Result<impl Iterator<Item = (usize, &'a str)>, IndexError> {
    let text = std::str::from_utf8(stored).map_err(|_| IndexError::Version)?;
    let mut lines = text.lines();
    if lines.next() != Some(header) {
        return Err(IndexError::Version);
    }
    Ok(lines
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| (i + 2, l)))
}

/// Parse a stored chunk. Storage is trusted but may be damaged: never panics.
pub fn parse_chunk(stored: impl AsRef<[u8]>) -> Result<Vec<SegmentSummary>, IndexError> {
    records(stored.as_ref(), HEADER)?
        .map(|(n, line)| parse_line(line).ok_or(IndexError::Line(n)))
        .collect()
}

/// Render speaker turns as a turns file.
pub fn render_turns(spans: &[SpeakerSpan]) -> String {
    let mut out = String::with_capacity(24 + spans.len() * 64);
    out.push_str(TURNS_HEADER);
    out.push('\n');
    for s in spans {
        let start = s
            .start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let _ = write!(out, "{} {start} {} ", s.speaker, s.duration.as_micros());
        if let Some(who) = &s.who {
            percent_encode(&who.user, &mut out);
            out.push(' ');
            percent_encode(&who.name, &mut out);
        } else {
            out.push(' ');
        }
        out.push('\n');
    }
    out
}

/// Append `text` with every byte outside `!`..`~`, and `%`, written as `%XX`.
fn percent_encode(text: &str, out: &mut String) {
    for b in text.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// The text [`percent_encode`] wrote; `None` unless canonical (only the bytes it encodes are
/// encoded, upper-case hex) and UTF-8.
fn percent_decode(field: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(field.len());
    let mut it = field.bytes();
    while let Some(b) = it.next() {
        if b != b'%' {
            if !(b'!'..=b'~').contains(&b) {
                return None;
            }
            bytes.push(b);
            continue;
        }
        let hex = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let v = (hex(it.next()?)? << 4) | hex(it.next()?)?;
        if (b'!'..=b'~').contains(&v) && v != b'%' {
            return None;
        }
        bytes.push(v);
    }
    String::from_utf8(bytes).ok()
}

/// Parse a turns file written by [`render_turns`] (or a version 1 file); never panics.
pub fn parse_turns(stored: impl AsRef<[u8]>) -> Result<Vec<SpeakerSpan>, IndexError> {
    let stored = stored.as_ref();
    let (lines, named) = match records(stored, TURNS_HEADER) {
        Ok(lines) => (lines, true),
        Err(_) => (records(stored, TURNS_HEADER_V1)?, false),
    };
    let mut spans = Vec::new();
    for (n, line) in lines {
        if spans.len() == MAX_TURNS {
            return Err(IndexError::TooMany);
        }
        spans.push(parse_turn(line, named).ok_or(IndexError::Line(n))?);
    }
    Ok(spans)
}

fn parse_turn(line: &str, named: bool) -> Option<SpeakerSpan> {
    let mut f = line.split(' ');
    let speaker = f.next()?.parse::<u32>().ok().filter(|&s| s != 0)?;
    let start = f
        .next()?
        .parse::<u64>()
        .ok()
        .filter(|&us| us <= MAX_PDT_US)?;
    let duration = f
        .next()?
        .parse::<u64>()
        .ok()
        .filter(|&d| d > 0 && d <= MAX_TURN_US)?;
    let who = if named {
        let (user, name) = (f.next()?, f.next()?);
        match (user, name) {
            ("", "") => None,
            ("", _) => return None,
            (user, name) => Some(Speaker {
                user: percent_decode(user)?,
                name: percent_decode(name)?,
            }),
        }
    } else {
        None
    };
    if f.next().is_some() {
        return None;
    }
    Some(SpeakerSpan {
        speaker,
        start: SystemTime::UNIX_EPOCH.checked_add(Duration::from_micros(start))?,
        duration: Duration::from_micros(duration),
        who,
    })
}

fn parse_line(line: &str) -> Option<SegmentSummary> {
    let mut f = line.split(' ');
    let msn = f.next()?.parse::<u64>().ok().filter(|&m| m <= MAX_MSN)?;
    let us = f
        .next()?
        .parse::<u64>()
        .ok()
        .filter(|&us| us <= MAX_PDT_US)?;
    let duration = f
        .next()?
        .parse::<u64>()
        .ok()
        .filter(|&d| d > 0 && d <= MAX_SEGMENT_TICKS)?;
    let flags = f.next()?;
    if f.next().is_some() || flags.is_empty() || !flags.bytes().all(|b| b"-dg".contains(&b)) {
        return None;
    }
    Some(SegmentSummary {
        msn,
        start: SegmentStart {
            program_date_time: SystemTime::UNIX_EPOCH.checked_add(Duration::from_micros(us))?,
            discontinuity: flags.contains('d'),
        },
        duration,
        gap: flags.contains('g'),
        naming: Naming::Audio,
    })
}

/// Media sequence number, part index (`None` for a segment) and naming of a stored media file
/// name (`seg{msn}.m4a`, `part{msn}.{i}.m4a`, or the `.m4s` of older recordings).
pub fn media_file_msn(name: &str) -> Option<(u64, Option<u32>, Naming)> {
    let (stem, ext) = name.rsplit_once('.')?;
    let naming = Naming::from_media_ext(ext)?;
    let msn = |n: &str| n.parse::<u64>().ok().filter(|&m| m <= MAX_MSN);
    if let Some(n) = stem.strip_prefix("seg") {
        return Some((msn(n)?, None, naming));
    }
    let (m, p) = stem.strip_prefix("part")?.split_once('.')?;
    Some((msn(m)?, Some(p.parse().ok()?), naming))
}

/// Where a restarted packager resumes a rendition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    /// The recording so far (indexed segments, then gaps for segments lost in the restart).
    pub history: Vec<SegmentSummary>,
    /// The next segment's media sequence number: after everything indexed or stored, so no
    /// URL the CDN may have cached is ever reused.
    pub next_msn: u64,
}

/// Plan the resumption of a rendition from its indexed segments (every chunk, any order) and
/// the file names stored in its directory. `part_ticks` estimates a gap's duration (a lost
/// segment is as long as the parts of it that were stored, at least one). An indexed segment
/// stored only under its older name (`.m4s`) keeps that name. `None`: nothing was stored, a
/// new room.
pub fn plan_resume<'a>(
    mut indexed: Vec<SegmentSummary>,
    stored_names: impl IntoIterator<Item = &'a str>,
    part_ticks: u32,
) -> Option<Resume> {
    indexed.sort_by_key(|s| s.msn);
    indexed.dedup_by_key(|s| s.msn);
    let mut highest: Option<u64> = None;
    let mut parts_after_index: Vec<(u64, u32)> = Vec::new();
    let indexed_last = indexed.last().map(|s| s.msn);
    let mut legacy_segments: Vec<u64> = Vec::new();
    for (msn, part, naming) in stored_names.into_iter().filter_map(media_file_msn) {
        highest = Some(highest.map_or(msn, |h| h.max(msn)));
        if part.is_none() && naming == Naming::Legacy {
            legacy_segments.push(msn);
        }
        if part.is_some() && indexed_last.is_none_or(|l| msn > l) {
            match parts_after_index.iter_mut().find(|(m, _)| *m == msn) {
                Some((_, n)) => *n += 1,
                None => parts_after_index.push((msn, 1)),
            }
        }
    }
    let next_msn = match (indexed_last, highest) {
        (None, None) => return None,
        (Some(l), Some(h)) => l.max(h) + 1,
        (Some(l), None) => l + 1,
        (None, Some(h)) => h + 1,
    };
    let Some(last) = indexed.last().copied() else {
        return Some(Resume {
            history: Vec::new(),
            next_msn,
        });
    };
    let missing = next_msn - last.msn - 1;
    if missing > MAX_GAP_SEGMENTS {
        // Too much is missing to bridge with gaps: the recording restarts after the hole.
        return Some(Resume {
            history: Vec::new(),
            next_msn,
        });
    }
    legacy_segments.sort_unstable();
    let mut history = indexed;
    for s in &mut history {
        if legacy_segments.binary_search(&s.msn).is_ok() {
            s.naming = Naming::Legacy;
        }
    }
    let mut at = last.start.program_date_time + crate::playlist::ticks_duration(last.duration);
    for msn in last.msn + 1..next_msn {
        let parts = parts_after_index
            .iter()
            .find(|(m, _)| *m == msn)
            .map_or(1, |(_, n)| (*n).max(1));
        let duration = u64::from(parts) * u64::from(part_ticks);
        history.push(SegmentSummary {
            msn,
            start: SegmentStart {
                program_date_time: at,
                discontinuity: false,
            },
            duration,
            gap: true,
            naming: Naming::Audio,
        });
        at += crate::playlist::ticks_duration(duration);
    }
    Some(Resume { history, next_msn })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_turn_files_are_errors() {
        assert_eq!(parse_turns(""), Err(IndexError::Version));
        assert_eq!(
            parse_turns("amphi-speaker-turns 3\n"),
            Err(IndexError::Version)
        );
        assert_eq!(parse_turns("amphi-speaker-turns 1\n"), Ok(vec![]));
        assert_eq!(parse_turns("amphi-speaker-turns 2\n"), Ok(vec![]));
        for bad in [
            "7 1 2",
            "7 1 2 u",
            "7 1 2  n",
            "7 1 2 u n x",
            "7 1 2 u%41 n",
            "7 1 2 u%2 n",
            "7 1 2 u%e9 n",
            "7 1 2 u n%FF",
            "7 1 2 u\tv n",
        ] {
            assert_eq!(
                parse_turns(format!("amphi-speaker-turns 2\n7 1 2 u n\n{bad}\n")),
                Err(IndexError::Line(3)),
                "{bad}"
            );
        }
        for bad in [
            "7 1 x",
            "7 1",
            "7 1 2 3",
            "0 1 2",
            "4294967296 1 2",
            "7 1 0",
            "7 99999999999999999999 2",
            "7 32503680000000001 2",
            "7 1 86400000001",
            "-7 1 2",
        ] {
            assert_eq!(
                parse_turns(format!("amphi-speaker-turns 1\n7 1 2\n{bad}\n")),
                Err(IndexError::Line(3)),
                "{bad}"
            );
        }
        let many = format!("amphi-speaker-turns 1\n{}", "7 1 2\n".repeat(MAX_TURNS + 1));
        assert_eq!(parse_turns(&many), Err(IndexError::TooMany));
    }

    fn seg(msn: u64, secs: u64, disc: bool) -> SegmentSummary {
        SegmentSummary {
            msn,
            start: SegmentStart {
                program_date_time: SystemTime::UNIX_EPOCH + Duration::from_millis(secs * 1000 + 7),
                discontinuity: disc,
            },
            duration: 96_000,
            gap: false,
            naming: Naming::Audio,
        }
    }

    #[test]
    fn chunks_round_trip_and_hold_their_range_only() {
        let history: Vec<_> = (510..515).map(|m| seg(m, 2 * m, m == 513)).collect();
        let first = render_chunk(&history, 0);
        assert_eq!(
            first,
            "amphi-recording-index 1\n510 1020007000 96000 -\n511 1022007000 96000 -\n"
        );
        let second = render_chunk(&history, 1);
        assert_eq!(parse_chunk(&second).unwrap(), history[2..]);
        assert_eq!(chunk_of(511), 0);
        assert_eq!(chunk_of(512), 1);
        assert_eq!(chunk_name(1), "index/1.txt");
    }

    #[test]
    fn damaged_chunks_are_refused() {
        assert_eq!(parse_chunk(""), Err(IndexError::Version));
        assert_eq!(
            parse_chunk("amphi-recording-index 2\n"),
            Err(IndexError::Version)
        );
        for bad in [
            "1 2 3",
            "1 2 0 -",
            "1 2 999999999 -",
            "1 2 3 x",
            "x 2 3 -",
            "1 -2 3 -",
            "1 2 3 - extra",
            "1 99999999999999999999 3 -",
            "1 40000000000000000 3 -",
            "2000000000000 2 3 -",
        ] {
            let text = format!("amphi-recording-index 1\n{bad}\n");
            assert_eq!(parse_chunk(&text), Err(IndexError::Line(2)), "{bad}");
        }
    }

    #[test]
    fn resume_continues_after_everything_stored_and_bridges_lost_segments_with_gaps() {
        let indexed = vec![seg(4, 8, false), seg(3, 6, false)];
        // Segment 5 was cut off by the restart after 3 of its parts were stored.
        let names = [
            "init.mp4",
            "seg3.m4s",
            "seg4.m4s",
            "part5.0.m4s",
            "part5.1.m4s",
            "part5.2.m4s",
            "index/0.txt",
        ];
        let r = plan_resume(indexed, names, 9_600).unwrap();
        assert_eq!(r.next_msn, 6);
        assert_eq!(r.history.len(), 3);
        let gap = r.history[2];
        assert_eq!((gap.msn, gap.gap, gap.duration), (5, true, 3 * 9_600));
        assert_eq!(
            gap.start.program_date_time,
            seg(4, 10, false).start.program_date_time,
            "a gap starts where the last indexed segment ended"
        );
        // Stored but never indexed (an older packager): numbering continues, no history.
        let r = plan_resume(Vec::new(), ["seg7.m4s", "part8.0.m4s"], 9_600).unwrap();
        assert_eq!((r.history.len(), r.next_msn), (0, 9));
        // Nothing stored: a new room.
        assert_eq!(plan_resume(Vec::new(), ["init.mp4"], 9_600), None);
        // A hole too large to bridge.
        let r = plan_resume(vec![seg(0, 0, false)], ["seg500.m4s"], 9_600).unwrap();
        assert_eq!((r.history.len(), r.next_msn), (0, 501));
        assert_eq!(
            media_file_msn("part12.3.m4a"),
            Some((12, Some(3), Naming::Audio))
        );
        assert_eq!(media_file_msn("seg12.m4a"), Some((12, None, Naming::Audio)));
        assert_eq!(
            media_file_msn("seg12.m4s"),
            Some((12, None, Naming::Legacy))
        );
        assert_eq!(media_file_msn("seg12.mp4"), None);
        assert_eq!(media_file_msn("init.m4a"), None);
        assert_eq!(media_file_msn("playlist.m3u8"), None);
    }

    #[test]
    fn resume_keeps_the_names_older_segments_were_stored_with() {
        // Segments 3 and 4 were stored by an older packager (`.m4s`), 5 by this one.
        let indexed = vec![seg(3, 6, false), seg(4, 8, false), seg(5, 10, true)];
        let names = [
            "init.mp4",
            "init.m4a",
            "seg3.m4s",
            "part4.0.m4s",
            "seg4.m4s",
            "seg5.m4a",
            "part6.0.m4a",
        ];
        let r = plan_resume(indexed, names, 9_600).unwrap();
        assert_eq!(r.next_msn, 7);
        let named: Vec<_> = r
            .history
            .iter()
            .map(|s| (s.naming.segment(s.msn), s.gap))
            .collect();
        assert_eq!(
            named,
            [
                ("seg3.m4s".to_string(), false),
                ("seg4.m4s".to_string(), false),
                ("seg5.m4a".to_string(), false),
                ("seg6.m4a".to_string(), true),
            ]
        );
    }
}
