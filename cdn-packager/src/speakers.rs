//! Sans-IO speaker timeline: who spoke when, from the `speaker` field the origin's program
//! frames carry (the loudest speaker's participant id, 0 when nobody speaks). A change counts
//! once the new speaker stays loudest for [`MIN_TURN`], so overlapping talk does not split the
//! recording into 20 ms turns.
//! The turns are stored with the recording index
//! ([`crate::recording_index::render_turns`]) so a restarted packager keeps them.

use crate::playlist::SpeakerSpan;
use std::time::{Duration, SystemTime};

/// Shortest turn recorded.
pub const MIN_TURN: Duration = Duration::from_millis(1000);
/// Length of one program frame.
const FRAME: Duration = Duration::from_millis(20);
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
    use crate::recording_index::{parse_turns, render_turns};

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
