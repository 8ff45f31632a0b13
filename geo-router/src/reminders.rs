//! Reminders for scheduled rooms (sans-IO): which starts are due for a "starting soon"
//! reminder at a given time, the once-only claim key of each notice, and the batched
//! `room_reminder` webhook bodies.
//!
//! Users subscribe to a scheduled room's reminder by user id (the application notifies them;
//! amphi has no address for anyone). A subscriber hears, each at most once per schedule:
//! `starting_soon` at the start minus the configured lead, `live` when the room's first
//! participant arrives, and `rescheduled` / `cancelled` when the host moves or cancels it.
//! Claims are keyed by the scheduled start, so a rescheduled room reminds again for its new
//! time; they live in the shared store, so replicas and restarts do not repeat a notice.

use amphi_protocol::RoomId;
use serde::Serialize;

/// Most subscribers one room's reminder list holds (a subscription beyond it is refused).
pub const MAX_SUBSCRIBERS_PER_ROOM: usize = 100_000;
/// Most user ids one `room_reminder` webhook carries (a notice to more is split in batches).
pub const USERS_PER_WEBHOOK: usize = 500;

/// Why subscribers are told about a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The room starts within the configured lead.
    StartingSoon,
    /// The room's first participant arrived.
    Live,
    /// The host moved the start.
    Rescheduled,
    /// The host cancelled the room before it started.
    Cancelled,
}

impl Reason {
    /// The wire name (as in the webhook body).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::StartingSoon => "starting_soon",
            Reason::Live => "live",
            Reason::Rescheduled => "rescheduled",
            Reason::Cancelled => "cancelled",
        }
    }

    /// The store's once-only claim name for this notice about the start `scheduled_at`: one
    /// notice per reason and schedule, whichever replica gets there first.
    pub fn claim_key(self, scheduled_at: u64) -> String {
        format!("reminder_{}:{scheduled_at}", self.as_str())
    }
}

/// Which scheduled starts are due for `starting_soon`, tick after tick.
///
/// A start is due once it is within `lead_secs` of now and still ahead. Each tick asks for the
/// starts not covered by the previous successful tick; the first tick after a (re)start covers
/// everything due now, and the claims drop what an earlier run already sent.
#[derive(Clone, Debug)]
pub struct SoonWindow {
    lead_secs: u64,
    covered_until: Option<u64>,
}

impl SoonWindow {
    /// No tick yet; reminders go out `lead_secs` before each start.
    pub fn new(lead_secs: u64) -> Self {
        SoonWindow {
            lead_secs,
            covered_until: None,
        }
    }

    /// The scheduled starts to look up at `now_unix`, as `(after, until]` Unix seconds (an
    /// empty range when `until <= after`). Starts already reached are left to `live`.
    pub fn due(&self, now_unix: u64) -> (u64, u64) {
        let until = now_unix.saturating_add(self.lead_secs);
        let after = self.covered_until.unwrap_or(now_unix).max(now_unix);
        (after, until)
    }

    /// The lookup for `now_unix` succeeded (and its notices were claimed): the next tick
    /// starts where this one ended.
    pub fn covered(&mut self, now_unix: u64) {
        let (_, until) = self.due(now_unix);
        self.covered_until = Some(until);
    }
}

/// One `room_reminder` webhook body: a batch of at most [`USERS_PER_WEBHOOK`] subscribers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReminderBatch<'a> {
    /// The room.
    pub room: RoomId,
    /// Why the subscribers are told.
    pub reason: Reason,
    /// The room's title.
    pub title: &'a str,
    /// The (new) scheduled start, Unix seconds (`None` when the room had none).
    pub scheduled_at: Option<u64>,
    /// The start before a reschedule, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_scheduled_at: Option<u64>,
    /// The subscribers' user ids in this batch.
    pub users: &'a [String],
    /// This batch's position, from 1.
    pub batch: usize,
    /// How many batches this notice has.
    pub batches: usize,
}

/// What a notice says besides its subscribers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notice<'a> {
    /// The room.
    pub room: RoomId,
    /// Why.
    pub reason: Reason,
    /// The room's title.
    pub title: &'a str,
    /// The (new) scheduled start.
    pub scheduled_at: Option<u64>,
    /// The start before a reschedule.
    pub previous_scheduled_at: Option<u64>,
}

impl<'a> Notice<'a> {
    /// The webhook bodies telling `users` (none when nobody subscribed).
    pub fn batches(self, users: &'a [String]) -> Vec<ReminderBatch<'a>> {
        let batches = users.len().div_ceil(USERS_PER_WEBHOOK);
        users
            .chunks(USERS_PER_WEBHOOK)
            .enumerate()
            .map(|(i, chunk)| ReminderBatch {
                room: self.room,
                reason: self.reason,
                title: self.title,
                scheduled_at: self.scheduled_at,
                previous_scheduled_at: self.previous_scheduled_at,
                users: chunk,
                batch: i + 1,
                batches,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Rooms scheduled at the given times, and the `starting_soon` notices a router ticking
    /// every `step` seconds from `from` to `to` claims (once per start, like the store).
    fn simulate(
        starts: &[u64],
        lead: u64,
        ticks: impl Iterator<Item = u64>,
        window: &mut SoonWindow,
        claimed: &mut BTreeSet<String>,
    ) -> Vec<(u64, u64)> {
        let mut sent = Vec::new();
        for now in ticks {
            let (after, until) = window.due(now);
            for &at in starts.iter().filter(|&&at| at > after && at <= until) {
                if claimed.insert(Reason::StartingSoon.claim_key(at)) {
                    sent.push((now, at));
                }
            }
            window.covered(now);
            assert!(until == now + lead);
        }
        sent
    }

    #[test]
    fn each_start_is_reminded_once_within_the_lead() {
        let mut window = SoonWindow::new(600);
        let mut claimed = BTreeSet::new();
        let starts = [10_000, 10_001, 12_000];
        let sent = simulate(
            &starts,
            600,
            (9_000..13_000).step_by(2),
            &mut window,
            &mut claimed,
        );
        assert_eq!(
            sent,
            vec![(9_400, 10_000), (9_402, 10_001), (11_400, 12_000)]
        );
    }

    #[test]
    fn a_restart_catches_up_without_repeating_what_was_sent() {
        let starts = [10_000, 10_300];
        let mut claimed = BTreeSet::new();
        let mut before = SoonWindow::new(600);
        let sent = simulate(
            &starts,
            600,
            (9_000..9_500).step_by(2),
            &mut before,
            &mut claimed,
        );
        assert_eq!(sent, vec![(9_400, 10_000)]);
        // Down from 9,500 to 9,800: 10,300 came within the lead meanwhile.
        let mut after = SoonWindow::new(600);
        let sent = simulate(
            &starts,
            600,
            (9_800..10_400).step_by(2),
            &mut after,
            &mut claimed,
        );
        assert_eq!(sent, vec![(9_800, 10_300)]);
    }

    #[test]
    fn starts_already_reached_are_not_starting_soon() {
        let mut window = SoonWindow::new(60);
        window.covered(1_000);
        // A long stall: the next tick comes after 1,200 started.
        let (after, until) = window.due(1_300);
        assert_eq!((after, until), (1_300, 1_360));
        assert!(!(1_200 > after && 1_200 <= until));
    }

    #[test]
    fn a_rescheduled_room_is_reminded_again_for_its_new_start() {
        let mut claimed = BTreeSet::new();
        assert!(claimed.insert(Reason::StartingSoon.claim_key(10_000)));
        assert!(!claimed.insert(Reason::StartingSoon.claim_key(10_000)));
        assert!(claimed.insert(Reason::StartingSoon.claim_key(20_000)));
        assert!(claimed.insert(Reason::Live.claim_key(20_000)));
    }

    #[test]
    fn notices_are_split_in_bounded_batches() {
        let users: Vec<String> = (0..1_201).map(|i| format!("user-{i}")).collect();
        let notice = Notice {
            room: RoomId(7),
            reason: Reason::Rescheduled,
            title: "Town hall",
            scheduled_at: Some(2_000),
            previous_scheduled_at: Some(1_000),
        };
        let batches = notice.batches(&users);
        assert_eq!(batches.len(), 3);
        assert_eq!(
            batches.iter().map(|b| b.users.len()).collect::<Vec<_>>(),
            vec![500, 500, 201]
        );
        assert!(batches.iter().all(|b| b.batches == 3));
        assert_eq!(batches[2].batch, 3);
        assert_eq!(batches[2].users[200], "user-1200");
        let json = serde_json::to_value(&batches[0]).unwrap();
        assert_eq!(json["reason"], "rescheduled");
        assert_eq!(json["previous_scheduled_at"], 1_000);
        assert_eq!(json["room"], serde_json::to_value(RoomId(7)).unwrap());
        assert!(notice.batches(&[]).is_empty());
        let soon = Notice {
            reason: Reason::StartingSoon,
            previous_scheduled_at: None,
            ..notice
        };
        let json = serde_json::to_value(&soon.batches(&users[..1])[0]).unwrap();
        assert!(json.get("previous_scheduled_at").is_none());
    }
}
