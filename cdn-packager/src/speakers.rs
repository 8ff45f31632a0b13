//! Sans-IO speaker timeline: who spoke when, from the `speaker` field the origin's program
//! frames carry (the loudest speaker's participant id, 0 when nobody speaks). A change counts
//! once the new speaker stays loudest for [`MIN_TURN`], so overlapping talk does not split the
//! recording into 20 ms turns.
//! The turns are stored with the recording index
//! ([`crate::recording_index::render_turns`]) so a restarted packager keeps them.
//!
//! Who a participant is (user id and display name) comes in the program stream's
//! `SpeakerIdentity` records ([`SpeakerTimeline::identify`]); each turn carries it, so chapters
//! show a name and the same person rejoining (a new participant id) keeps one user id.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// A speaker's turn, rendered as `EXT-X-DATERANGE` in the VOD playlist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeakerSpan {
    /// Participant id of the loudest speaker (as the origin's program frames carry it).
    pub speaker: u32,
    /// Wall-clock start.
    pub start: SystemTime,
    /// Length.
    pub duration: Duration,
    /// Who the speaker is, when the origin said.
    pub who: Option<Speaker>,
}

/// Most identities remembered per room (participants announced as speakers); later ones are
/// not named.
pub const MAX_IDENTITIES: usize = 4096;

/// Who a speaker is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Speaker {
    /// Stable user id (the token's `sub`: the application's `user_id`).
    pub user: String,
    /// Display name.
    pub name: String,
}

/// `text` made safe for an HLS quoted-string attribute value (rfc8216bis §4.2: no `"`, CR or
/// LF): double quotes become single quotes, control characters spaces.
pub fn attribute_text(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' => '\'',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect()
}

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
    /// Who each participant id is, as the origin told.
    identities: HashMap<u32, Speaker>,
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

    /// Participant `speaker` is `who` (a later identity for the same id replaces it).
    pub fn identify(&mut self, speaker: u32, who: Speaker) {
        if speaker == 0
            || (self.identities.len() >= MAX_IDENTITIES && !self.identities.contains_key(&speaker))
        {
            return;
        }
        self.identities.insert(speaker, who);
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
            who: self.identities.get(&speaker).cloned(),
        });
    }

    /// Every finished turn plus the one in progress (up to its last frame). A turn whose
    /// speaker was identified only after it closed (the identity record came late) is named.
    pub fn spans(&self) -> Vec<SpeakerSpan> {
        let mut v = self.done.clone();
        for span in v.iter_mut().filter(|s| s.who.is_none()) {
            span.who = self.identities.get(&span.speaker).cloned();
        }
        if let Some((s, start, last)) = self.current {
            if s != 0 {
                v.push(SpeakerSpan {
                    speaker: s,
                    start,
                    duration: (last + FRAME).duration_since(start).unwrap_or_default(),
                    who: self.identities.get(&s).cloned(),
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
                    duration: Duration::from_millis(5000),
                    who: None,
                },
                SpeakerSpan {
                    speaker: 9,
                    start: t(5000),
                    duration: Duration::from_millis(3000),
                    who: None,
                },
            ]
        );
    }

    fn ada() -> Speaker {
        Speaker {
            user: "ada-42".into(),
            name: "Ada \"the\" Lovelace 100%".into(),
        }
    }

    #[test]
    fn turns_survive_a_round_trip_and_a_resumed_timeline_continues_after_them() {
        let mut tl = SpeakerTimeline::new();
        tl.identify(7, ada());
        feed(&mut tl, 7, 0, 3000);
        feed(&mut tl, 4_000_000_000, 3000, 4500);
        let text = render_turns(&tl.spans());
        assert_eq!(
            text,
            "amphi-speaker-turns 2\n7 1700000000000000 3000000 ada-42 \
             Ada%20\"the\"%20Lovelace%20100%25\n4000000000 1700000003000000 1500000  \n"
        );
        let stored = parse_turns(&text).unwrap();
        assert_eq!(stored, tl.spans());
        assert_eq!(stored[0].who, Some(ada()));
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
                duration: Duration::from_millis(2000),
                who: None,
            }
        );
    }

    #[test]
    fn version_one_turn_files_still_load_unnamed() {
        let v1 = "amphi-speaker-turns 1\n7 1700000000000000 3000000\n";
        assert_eq!(
            parse_turns(v1),
            Ok(vec![SpeakerSpan {
                speaker: 7,
                start: t(0),
                duration: Duration::from_millis(3000),
                who: None,
            }])
        );
    }

    #[test]
    fn a_rejoining_speaker_keeps_one_user_id_and_late_identities_name_earlier_turns() {
        let mut tl = SpeakerTimeline::new();
        tl.identify(7, ada());
        feed(&mut tl, 7, 0, 3000);
        feed(&mut tl, 0, 3000, 5000);
        // Ada rejoins: a new participant id, named only after her turn started.
        feed(&mut tl, 8, 5000, 6000);
        tl.identify(8, ada());
        feed(&mut tl, 8, 6000, 8000);
        tl.stop();
        let spans = tl.spans();
        assert_eq!(spans.len(), 2);
        assert_eq!((spans[0].speaker, spans[1].speaker), (7, 8));
        assert_eq!(spans[0].who, Some(ada()));
        assert_eq!(spans[1].who, Some(ada()));
        // Nobody (id 0) is never named, and identities are bounded.
        tl.identify(0, ada());
        for id in 1..=MAX_IDENTITIES as u32 + 10 {
            tl.identify(id, ada());
        }
        assert_eq!(tl.identities.len(), MAX_IDENTITIES);
        assert_eq!(attribute_text("a\"b\r\nc"), "a'b  c");
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
                duration: Duration::from_millis(500),
                who: None,
            }]
        );
    }
}
