//! Sans-IO speaker timeline: who spoke when, from the `speaker` field the origin's program
//! frames carry (the loudest speaker's participant id, 0 when nobody speaks). A change counts
//! once the new speaker stays loudest for [`MIN_TURN`], so overlapping talk does not split the
//! recording into 20 ms turns.
//!
//! The turns are stored beside the recording index as `{room}/speakers.txt` (rewritten as
//! segments complete) so a restarted packager keeps them in the room's recording. Text, one
//! turn per line after a version line:
//!
//! ```text
//! amphi-speaker-turns 1
//! {participant id} {start, Unix microseconds} {duration, microseconds}
//! ```

use crate::playlist::SpeakerSpan;
use std::time::{Duration, SystemTime};

/// Shortest turn recorded.
pub const MIN_TURN: Duration = Duration::from_millis(1000);
/// Length of one program frame.
const FRAME: Duration = Duration::from_millis(20);
/// Storage key of the turns, relative to the room's directory.
pub const TURNS_FILE: &str = "speakers.txt";
/// First line of the turns file.
const TURNS_HEADER: &str = "amphi-speaker-turns 1";
/// Most turns read back (a day of one-second turns); more lines are refused.
const MAX_TURNS: usize = 86_400;
/// Latest start accepted (the year 3000, Unix microseconds).
const MAX_START_US: u64 = 32_503_680_000_000_000;
/// Longest turn accepted (a day, microseconds).
const MAX_TURN_US: u64 = 86_400_000_000;

/// Why a stored turns file was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TurnsError {
    /// The first line is not [`TURNS_HEADER`].
    #[error("not a speaker turns file (version line missing or unknown)")]
    Version,
    /// A line does not parse, or is out of range.
    #[error("line {0} is malformed")]
    Line(usize),
    /// More than [`MAX_TURNS`] lines.
    #[error("more than {MAX_TURNS} turns")]
    TooMany,
}

/// Render `spans` as a turns file.
pub fn render_turns(spans: &[SpeakerSpan]) -> String {
    let mut out = String::with_capacity(24 + spans.len() * 40);
    out.push_str(TURNS_HEADER);
    out.push('\n');
    for s in spans {
        let start = s
            .start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        out.push_str(&format!(
            "{} {start} {}\n",
            s.speaker,
            s.duration.as_micros()
        ));
    }
    out
}

/// Parse a turns file written by [`render_turns`].
pub fn parse_turns(text: &str) -> Result<Vec<SpeakerSpan>, TurnsError> {
    let mut lines = text.lines();
    if lines.next() != Some(TURNS_HEADER) {
        return Err(TurnsError::Version);
    }
    let mut spans = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.is_empty()) {
        if spans.len() == MAX_TURNS {
            return Err(TurnsError::TooMany);
        }
        let bad = || TurnsError::Line(i + 2);
        let mut f = line.split(' ');
        let mut num = || f.next().and_then(|v| v.parse::<u64>().ok()).ok_or_else(bad);
        let (speaker, start, duration) = (num()?, num()?, num()?);
        if f.next().is_some()
            || speaker == 0
            || speaker > u64::from(u32::MAX)
            || start > MAX_START_US
            || duration == 0
            || duration > MAX_TURN_US
        {
            return Err(bad());
        }
        spans.push(SpeakerSpan {
            speaker: speaker as u32,
            start: SystemTime::UNIX_EPOCH + Duration::from_micros(start),
            duration: Duration::from_micros(duration),
        });
    }
    Ok(spans)
}

/// The timeline of one room.
#[derive(Debug, Default, Clone)]
pub struct SpeakerTimeline {
    done: Vec<SpeakerSpan>,
    /// Current turn: speaker, start, time of its last frame.
    current: Option<(u32, SystemTime, SystemTime)>,
    /// A different speaker being loudest since.
    candidate: Option<(u32, SystemTime)>,
}

impl SpeakerTimeline {
    /// An empty timeline.
    pub fn new() -> Self {
        Self::default()
    }

    /// A timeline continuing after `done`, the turns stored before a packager restart (the
    /// turn in progress then ends where it was last stored).
    pub fn resume(done: Vec<SpeakerSpan>) -> Self {
        SpeakerTimeline {
            done,
            ..Self::default()
        }
    }

    /// The program frame starting at `at` had `speaker` loudest (0: nobody).
    pub fn push(&mut self, speaker: u32, at: SystemTime) {
        let Some((cur, start, _)) = self.current else {
            self.current = Some((speaker, at, at));
            return;
        };
        if cur == speaker {
            self.candidate = None;
            if let Some(c) = &mut self.current {
                c.2 = at;
            }
            return;
        }
        match self.candidate {
            Some((cand, since)) if cand == speaker => {
                if at.duration_since(since).unwrap_or_default() + FRAME >= MIN_TURN {
                    self.close(cur, start, since);
                    self.current = Some((speaker, since, at));
                    self.candidate = None;
                }
            }
            _ => self.candidate = Some((speaker, at)),
        }
    }

    /// The program stopped (the current turn ends with its last frame).
    pub fn stop(&mut self) {
        if let Some((s, start, last)) = self.current.take() {
            self.close(s, start, last + FRAME);
        }
        self.candidate = None;
    }

    fn close(&mut self, speaker: u32, start: SystemTime, end: SystemTime) {
        if speaker == 0 {
            return;
        }
        let duration = end.duration_since(start).unwrap_or_default();
        if duration.is_zero() {
            return;
        }
        self.done.push(SpeakerSpan {
            speaker,
            start,
            duration,
        });
    }

    /// Every finished turn plus the one in progress (up to its last frame).
    pub fn spans(&self) -> Vec<SpeakerSpan> {
        let mut v = self.done.clone();
        if let Some((s, start, last)) = self.current {
            if s != 0 {
                v.push(SpeakerSpan {
                    speaker: s,
                    start,
                    duration: (last + FRAME).duration_since(start).unwrap_or_default(),
                });
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
    }

    fn feed(tl: &mut SpeakerTimeline, speaker: u32, from_ms: u64, to_ms: u64) {
        let mut ms = from_ms;
        while ms < to_ms {
            tl.push(speaker, t(ms));
            ms += 20;
        }
    }

    #[test]
    fn turns_need_a_second_and_silence_is_not_a_turn() {
        let mut tl = SpeakerTimeline::new();
        feed(&mut tl, 7, 0, 3000);
        feed(&mut tl, 9, 3000, 3400); // a short interjection: not a turn
        feed(&mut tl, 7, 3400, 5000);
        feed(&mut tl, 9, 5000, 8000);
        feed(&mut tl, 0, 8000, 10_000);
        tl.stop();
        let spans = tl.spans();
        assert_eq!(
            spans,
            vec![
                SpeakerSpan {
                    speaker: 7,
                    start: t(0),
                    duration: Duration::from_millis(5000)
                },
                SpeakerSpan {
                    speaker: 9,
                    start: t(5000),
                    duration: Duration::from_millis(3000)
                },
            ]
        );
    }

    #[test]
    fn turns_survive_a_round_trip_and_a_resumed_timeline_continues_after_them() {
        let mut tl = SpeakerTimeline::new();
        feed(&mut tl, 7, 0, 3000);
        feed(&mut tl, 4_000_000_000, 3000, 4500);
        let text = render_turns(&tl.spans());
        assert_eq!(
            text,
            "amphi-speaker-turns 1\n7 1700000000000000 3000000\n\
             4000000000 1700000003000000 1500000\n"
        );
        let stored = parse_turns(&text).unwrap();
        assert_eq!(stored, tl.spans());
        let mut resumed = SpeakerTimeline::resume(stored.clone());
        feed(&mut resumed, 9, 10_000, 12_000);
        resumed.stop();
        let spans = resumed.spans();
        assert_eq!(spans[..2], stored[..]);
        assert_eq!(
            spans[2],
            SpeakerSpan {
                speaker: 9,
                start: t(10_000),
                duration: Duration::from_millis(2000)
            }
        );
    }

    #[test]
    fn bad_turn_files_are_errors() {
        assert_eq!(parse_turns(""), Err(TurnsError::Version));
        assert_eq!(
            parse_turns("amphi-speaker-turns 2\n"),
            Err(TurnsError::Version)
        );
        assert_eq!(parse_turns("amphi-speaker-turns 1\n"), Ok(vec![]));
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
                parse_turns(&format!("amphi-speaker-turns 1\n7 1 2\n{bad}\n")),
                Err(TurnsError::Line(3)),
                "{bad}"
            );
        }
        let many = format!("amphi-speaker-turns 1\n{}", "7 1 2\n".repeat(MAX_TURNS + 1));
        assert_eq!(parse_turns(&many), Err(TurnsError::TooMany));
    }

    #[test]
    fn the_turn_in_progress_is_reported() {
        let mut tl = SpeakerTimeline::new();
        feed(&mut tl, 5, 0, 500);
        assert_eq!(
            tl.spans(),
            vec![SpeakerSpan {
                speaker: 5,
                start: t(0),
                duration: Duration::from_millis(500)
            }]
        );
    }
}
