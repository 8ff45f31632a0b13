//! The room directory (sans-IO, in memory): rooms, their schedule and status, the open-room
//! index that `GET /v1/rooms` pages through ([`Cursor`]), and the idle expiry of live rooms
//! nobody keeps alive ([`Expiry`]).
//!
//! Listing order (both backends): live rooms newest first (by start time: the later of creation
//! and schedule), then scheduled rooms soonest first; ties by id. The order only depends on
//! stored fields, so a cursor stays valid while rooms come and go: every room open for the
//! whole walk is returned exactly once.

use amphi_protocol::api::{RoomInfo, RoomStatus, TierThresholds};
use amphi_protocol::RoomId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;

/// A room as the directory stores it (and as a shared store serializes it; `ended_at` is kept
/// apart there so that ending is one atomic write).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomEntry {
    /// Title.
    pub title: String,
    /// Topic.
    pub topic: Option<String>,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Start time of a scheduled room, Unix seconds.
    pub scheduled_at: Option<u64>,
    /// When the room ended, Unix seconds.
    #[serde(skip)]
    pub ended_at: Option<u64>,
    /// The room's own tier thresholds (`POST /v1/rooms` `tiers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<TierThresholds>,
}

impl RoomEntry {
    /// Status at `now_unix`: ended, scheduled (start in the future) or live.
    pub fn status(&self, now_unix: u64) -> RoomStatus {
        match (self.ended_at, self.scheduled_at) {
            (Some(_), _) => RoomStatus::Ended,
            (None, Some(at)) if at > now_unix => RoomStatus::Scheduled,
            _ => RoomStatus::Live,
        }
    }

    /// When the room is (or was) live from, Unix seconds: the later of creation and schedule.
    /// The open-room index orders by it and idle expiry counts from it.
    pub fn start(&self) -> u64 {
        self.scheduled_at
            .unwrap_or(self.created_at)
            .max(self.created_at)
    }

    /// The public view of this room.
    pub fn info(&self, room: RoomId, hls_url: String, now_unix: u64, listeners: u32) -> RoomInfo {
        RoomInfo {
            room,
            title: self.title.clone(),
            topic: self.topic.clone(),
            status: self.status(now_unix),
            created_at: self.created_at,
            hls_url,
            scheduled_at: self.scheduled_at,
            ended_at: self.ended_at,
            listeners,
            reminder_subscribers: 0,
            tiers: self.tiers,
        }
    }
}

/// Whether `entry` matches a topic filter (case-insensitive, exact).
pub fn topic_matches(entry: &RoomEntry, topic: Option<&str>) -> bool {
    match topic {
        None => true,
        Some(t) => entry
            .topic
            .as_deref()
            .is_some_and(|have| have.eq_ignore_ascii_case(t)),
    }
}

/// Most rooms one page of `GET /v1/rooms` holds.
pub const MAX_PAGE: usize = 1000;
/// Rooms per page when the request names no limit.
pub const DEFAULT_PAGE: usize = 100;

/// The key of an open room in the index: start time, then id. Its text form
/// ([`index_member`]) sorts like the key, which is what the Redis index (a sorted set walked
/// by lexicographic range) relies on.
pub type IndexKey = (u64, RoomId);

/// The text form of an index key: 20 decimal digits of the start time, `:`, the 16 hex digits
/// of the id.
pub fn index_member(key: IndexKey) -> String {
    format!("{:020}:{}", key.0, key.1)
}

/// An index key read back from its text form.
pub fn parse_index_member(text: &str) -> Option<IndexKey> {
    let (start, id) = text.split_once(':')?;
    if start.len() != 20 || id.len() != 16 || !start.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((start.parse().ok()?, id.parse().ok()?))
}

/// Where a listing resumes: after this room, in the live part (walked newest first) or the
/// scheduled part (walked soonest first). Opaque to clients (`l` or `s`, then the index member).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cursor {
    /// Resume with the live rooms that start before this key.
    Live(IndexKey),
    /// Resume with the scheduled rooms that start after this key.
    Scheduled(IndexKey),
}

impl Cursor {
    /// The text handed to clients as `next_cursor`.
    pub fn encode(&self) -> String {
        match self {
            Cursor::Live(k) => format!("l{}", index_member(*k)),
            Cursor::Scheduled(k) => format!("s{}", index_member(*k)),
        }
    }

    /// The room this cursor points after.
    pub fn room(&self) -> RoomId {
        match self {
            Cursor::Live(k) | Cursor::Scheduled(k) => k.1,
        }
    }

    /// A cursor read back from a request; `None` if it is not one this router made.
    pub fn parse(text: &str) -> Option<Self> {
        match text.as_bytes().first()? {
            b'l' => parse_index_member(&text[1..]).map(Cursor::Live),
            b's' => parse_index_member(&text[1..]).map(Cursor::Scheduled),
            _ => None,
        }
    }
}

/// One page of the open-room index: `(key, entry)` in listing order, and where the next page
/// resumes (`None` when the walk is over).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The rooms of this page.
    pub rooms: Vec<(RoomId, RoomEntry)>,
    /// Where the next page resumes.
    pub next: Option<Cursor>,
}

/// Counts read from the index (no room is read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoomCounts {
    /// Live rooms.
    pub live: u64,
    /// Scheduled rooms that have not started.
    pub scheduled: u64,
}

/// Idle expiry of live rooms (sans-IO): a live room nobody keeps alive (no edge heartbeat
/// lists it, no route request or token names it) for `idle_secs` after its start or its last
/// activity is ended by the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    /// Seconds without activity after which a live room ends.
    pub idle_secs: u64,
}

impl Expiry {
    /// Rooms whose last activity (or start) is at or before this time are idle at `now_unix`.
    pub fn cutoff(&self, now_unix: u64) -> Option<u64> {
        now_unix.checked_sub(self.idle_secs)
    }

    /// Whether a room last active at `last_active` (Unix seconds) is idle at `now_unix`.
    pub fn idle(&self, last_active: u64, now_unix: u64) -> bool {
        self.cutoff(now_unix).is_some_and(|c| last_active <= c)
    }
}

/// Most rooms one expiry pass ends (the rest wait for the next pass).
pub const MAX_EXPIRED_PER_PASS: usize = 256;

/// How long `/v1/route` trusts that a room it saw live still is, without asking the store.
/// Ends made through this router forget the room at once; an end made through another replica
/// sharing Redis is seen by this one's routes within this time (joins to an ended room are
/// refused by the origin anyway).
pub const LIVE_TRUST: std::time::Duration = std::time::Duration::from_secs(1);
/// Most rooms [`LiveRooms`] remembers.
pub const MAX_LIVE_REMEMBERED: usize = 65_536;

/// Rooms recently seen live (sans-IO): `/v1/route` asks the store only about the others.
#[derive(Debug, Default)]
pub struct LiveRooms {
    /// When the store last said each room is live, and the room's own tier thresholds.
    seen: HashMap<RoomId, (std::time::Instant, Option<TierThresholds>)>,
}

impl LiveRooms {
    /// Whether `room` was seen live within [`LIVE_TRUST`] of `now`.
    pub fn is_live(&self, room: RoomId, now: std::time::Instant) -> bool {
        self.seen
            .get(&room)
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) < LIVE_TRUST)
    }

    /// The tier thresholds `room` was created with, if it was seen live and had any.
    pub fn tiers(&self, room: RoomId) -> Option<TierThresholds> {
        self.seen.get(&room).and_then(|(_, tiers)| *tiers)
    }

    /// The tier thresholds of `room` if it was ever seen live (its own, or `None` for the
    /// router's); `None` when it was not.
    pub fn known_tiers(&self, room: RoomId) -> Option<Option<TierThresholds>> {
        self.seen.get(&room).map(|(_, tiers)| *tiers)
    }

    /// Until when `room` is trusted live (seen live, plus [`LIVE_TRUST`]).
    pub fn live_until(&self, room: RoomId) -> Option<std::time::Instant> {
        self.seen.get(&room).map(|(t, _)| *t + LIVE_TRUST)
    }

    /// The store said `room` (with its own `tiers`, if any) is live at `now`. Bounded: when
    /// full, the stale entries go, and if none is stale, all.
    pub fn saw_live(
        &mut self,
        room: RoomId,
        now: std::time::Instant,
        tiers: Option<TierThresholds>,
    ) {
        if self.seen.len() >= MAX_LIVE_REMEMBERED && !self.seen.contains_key(&room) {
            self.seen
                .retain(|_, (t, _)| now.saturating_duration_since(*t) < LIVE_TRUST);
            if self.seen.len() >= MAX_LIVE_REMEMBERED {
                self.seen.clear();
            }
        }
        self.seen.insert(room, (now, tiers));
    }

    /// `room` ended (through this router): never trusted live again.
    pub fn forget(&mut self, room: RoomId) {
        self.seen.remove(&room);
    }
}

/// What a reschedule did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescheduled {
    /// No such room.
    NotFound,
    /// The room already started or ended (or was never scheduled): nothing moved.
    NotScheduled,
    /// The start moved; it was `previous` (Unix seconds).
    Moved {
        /// The start before the move.
        previous: u64,
    },
}

/// All rooms this router knows, with the open-room index and the activity clock.
#[derive(Default)]
pub struct Directory {
    rooms: HashMap<RoomId, RoomEntry>,
    /// Rooms not ended, by start time.
    open: BTreeSet<IndexKey>,
    /// Last activity of every open room (Unix seconds; the start until an edge reports it).
    active: HashMap<RoomId, u64>,
}

impl Directory {
    /// Add a new room and return its id.
    pub fn create(&mut self, entry: RoomEntry) -> RoomId {
        let mut id = RoomId::random();
        while self.rooms.contains_key(&id) {
            id = RoomId::random();
        }
        self.put(id, entry);
        id
    }

    /// Insert or replace a room under a known id.
    pub fn put(&mut self, id: RoomId, entry: RoomEntry) {
        if let Some(old) = self.rooms.get(&id) {
            self.open.remove(&(old.start(), id));
            self.active.remove(&id);
        }
        if entry.ended_at.is_none() {
            self.open.insert((entry.start(), id));
            self.active.insert(id, entry.start());
        }
        self.rooms.insert(id, entry);
    }

    /// Look a room up.
    pub fn get(&self, id: RoomId) -> Option<&RoomEntry> {
        self.rooms.get(&id)
    }

    /// Mark a room ended at `now_unix`. Returns `true` if this call ended it.
    pub fn end(&mut self, id: RoomId, now_unix: u64) -> bool {
        match self.rooms.get_mut(&id) {
            Some(r) if r.ended_at.is_none() => {
                r.ended_at = Some(now_unix);
                self.open.remove(&(r.start(), id));
                self.active.remove(&id);
                true
            }
            _ => false,
        }
    }

    /// Move scheduled room `id`'s start to `at`: only while it has neither started (at
    /// `now_unix`) nor ended.
    pub fn reschedule(&mut self, id: RoomId, at: u64, now_unix: u64) -> Rescheduled {
        let Some(entry) = self.rooms.get(&id) else {
            return Rescheduled::NotFound;
        };
        match (entry.status(now_unix), entry.scheduled_at) {
            (RoomStatus::Scheduled, Some(previous)) => {
                let moved = RoomEntry {
                    scheduled_at: Some(at),
                    ..entry.clone()
                };
                self.put(id, moved);
                Rescheduled::Moved { previous }
            }
            _ => Rescheduled::NotScheduled,
        }
    }

    /// Activity in `rooms` at `now_unix` (edges report sessions there, clients route or get
    /// tokens): they stay alive.
    pub fn touch(&mut self, rooms: impl IntoIterator<Item = RoomId>, now_unix: u64) {
        for id in rooms {
            if let Some(t) = self.active.get_mut(&id) {
                *t = (*t).max(now_unix);
            }
        }
    }

    /// Live rooms idle at `now_unix` under `expiry`, at most `max` (scheduled rooms count from
    /// their start, so they are never idle before it).
    pub fn idle(&self, expiry: Expiry, now_unix: u64, max: usize) -> Vec<RoomId> {
        self.active
            .iter()
            .filter(|(_, t)| expiry.idle(**t, now_unix))
            .map(|(id, _)| *id)
            .take(max)
            .collect()
    }

    /// Scheduled rooms not ended whose start time is in `(after, until]` (Unix seconds).
    pub fn scheduled_between(&self, after: u64, until: u64) -> Vec<RoomId> {
        if until <= after {
            return Vec::new();
        }
        self.open
            .range((
                Bound::Excluded((after, RoomId(u64::MAX))),
                Bound::Included((until, RoomId(u64::MAX))),
            ))
            .filter(|k| self.rooms[&k.1].scheduled_at.is_some())
            .map(|k| k.1)
            .collect()
    }

    /// Live and scheduled room counts at `now_unix`, from the index.
    pub fn counts(&self, now_unix: u64) -> RoomCounts {
        let scheduled = self
            .open
            .range((
                Bound::Excluded((now_unix, RoomId(u64::MAX))),
                Bound::Unbounded,
            ))
            .count() as u64;
        RoomCounts {
            live: self.open.len() as u64 - scheduled,
            scheduled,
        }
    }

    /// Up to `limit` open rooms from `cursor` (the start when `None`) in listing order.
    pub fn page(&self, cursor: Option<Cursor>, limit: usize, now_unix: u64) -> Page {
        let now_key = (now_unix, RoomId(u64::MAX));
        let live_upper = match cursor {
            None => Bound::Included(now_key),
            Some(Cursor::Live(k)) => Bound::Excluded(k.min(now_key)),
            Some(Cursor::Scheduled(_)) => Bound::Excluded((0, RoomId(0))),
        };
        let sched_lower = match cursor {
            Some(Cursor::Scheduled(k)) => Bound::Excluded(k.max(now_key)),
            _ => Bound::Excluded(now_key),
        };
        let live = self
            .open
            .range((Bound::Unbounded, live_upper))
            .rev()
            .map(|k| (Cursor::Live(*k), k.1));
        let scheduled = self
            .open
            .range((sched_lower, Bound::Unbounded))
            .map(|k| (Cursor::Scheduled(*k), k.1));
        let mut rooms = Vec::new();
        let mut last = None;
        for (c, id) in live.chain(scheduled).take(limit) {
            rooms.push((id, self.rooms[&id].clone()));
            last = Some(c);
        }
        let next = if rooms.len() == limit { last } else { None };
        Page { rooms, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(title: &str, topic: Option<&str>, created: u64, scheduled: Option<u64>) -> RoomEntry {
        RoomEntry {
            title: title.into(),
            topic: topic.map(Into::into),
            created_at: created,
            scheduled_at: scheduled,
            ended_at: None,
            tiers: None,
        }
    }

    fn walk(d: &Directory, limit: usize, now: u64) -> Vec<RoomId> {
        let mut out = Vec::new();
        let mut cursor = None;
        for _ in 0..10_000 {
            let p = d.page(cursor, limit, now);
            assert!(p.rooms.len() <= limit);
            out.extend(p.rooms.iter().map(|r| r.0));
            match p.next {
                Some(c) => cursor = Some(Cursor::parse(&c.encode()).unwrap()),
                None => return out,
            }
        }
        panic!("the walk never ended");
    }

    #[test]
    fn status_follows_schedule_and_end() {
        let mut d = Directory::default();
        let a = d.create(entry("a", None, 100, Some(500)));
        assert_eq!(d.get(a).unwrap().status(499), RoomStatus::Scheduled);
        assert_eq!(d.get(a).unwrap().status(500), RoomStatus::Live);
        assert!(d.end(a, 600));
        assert!(!d.end(a, 700), "ending twice changes nothing");
        assert_eq!(d.get(a).unwrap().status(800), RoomStatus::Ended);
        assert_eq!(d.get(a).unwrap().ended_at, Some(600));
        assert!(!d.end(RoomId(0xdead), 1));
    }

    #[test]
    fn listing_is_live_newest_first_then_scheduled_soonest_first() {
        let mut d = Directory::default();
        let old = d.create(entry("old", None, 100, None));
        let new = d.create(entry("new", None, 300, None));
        let later = d.create(entry("later", None, 50, Some(5000)));
        let sooner = d.create(entry("sooner", None, 60, Some(2000)));
        let ended = d.create(entry("ended", None, 400, None));
        d.end(ended, 900);
        assert_eq!(walk(&d, 100, 1000), vec![new, old, sooner, later]);
        assert_eq!(walk(&d, 1, 1000), vec![new, old, sooner, later]);
        // Once its time comes, a scheduled room is live from its start time.
        assert_eq!(walk(&d, 3, 2500), vec![sooner, new, old, later]);
        assert_eq!(
            d.counts(1000),
            RoomCounts {
                live: 2,
                scheduled: 2
            }
        );
        assert_eq!(
            d.counts(2000),
            RoomCounts {
                live: 3,
                scheduled: 1
            }
        );
    }

    #[test]
    fn paging_returns_every_room_once_while_rooms_come_and_go() {
        let mut d = Directory::default();
        let mut ids = Vec::new();
        for i in 0..1000u64 {
            // Many rooms share a start second; a third are scheduled.
            let scheduled = (i % 3 == 0).then_some(10_000 + i / 7);
            ids.push(d.create(entry("r", None, 1 + i / 10, scheduled)));
        }
        let mut all = walk(&d, 37, 5_000);
        assert_eq!(all.len(), 1000);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 1000, "no room twice");
        // Rooms created and ended between pages: the others still come exactly once.
        let first = d.page(None, 100, 5_000);
        for i in 0..50 {
            d.create(entry("new", None, 4_000 + i, None));
            d.end(ids[500 + i as usize], 5_000);
        }
        let mut seen: Vec<RoomId> = first.rooms.iter().map(|r| r.0).collect();
        let mut cursor = first.next;
        while let Some(c) = cursor {
            let p = d.page(Some(c), 100, 5_000);
            seen.extend(p.rooms.iter().map(|r| r.0));
            cursor = p.next;
        }
        for (i, id) in ids.iter().enumerate() {
            let n = seen.iter().filter(|s| *s == id).count();
            let ended_meanwhile = (500..550).contains(&i);
            assert!(
                n == 1 || (ended_meanwhile && n == 0),
                "room {i} seen {n} times"
            );
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        for c in [
            Cursor::Live((0, RoomId(0))),
            Cursor::Scheduled((u64::MAX, RoomId(u64::MAX))),
            Cursor::Live((1_700_000_000, RoomId(0xabc))),
        ] {
            assert_eq!(Cursor::parse(&c.encode()), Some(c));
        }
        for bad in [
            "",
            "x",
            "l",
            "l123:00000000000000ff",
            "s00000000000000000001:ff",
            "l0000000000000000000a:00000000000000ff",
            "l00000000000000000001-00000000000000ff",
            "é",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn live_rooms_are_trusted_briefly_forgotten_on_end_and_bounded() {
        let t0 = std::time::Instant::now();
        let mut l = LiveRooms::default();
        let (a, b) = (RoomId(1), RoomId(2));
        assert!(!l.is_live(a, t0));
        l.saw_live(a, t0, None);
        assert!(l.is_live(a, t0 + LIVE_TRUST / 2));
        assert!(!l.is_live(a, t0 + LIVE_TRUST), "stale: ask the store again");
        assert!(!l.is_live(b, t0));
        l.saw_live(b, t0, None);
        l.forget(b);
        assert!(!l.is_live(b, t0), "ended here: at once");
        for i in 0..MAX_LIVE_REMEMBERED as u64 + 10 {
            l.saw_live(RoomId(100 + i), t0, None);
        }
        assert!(l.seen.len() <= MAX_LIVE_REMEMBERED);
        assert!(l.is_live(RoomId(100 + MAX_LIVE_REMEMBERED as u64 + 9), t0));
    }

    #[test]
    fn a_live_room_keeps_its_own_tier_thresholds() {
        let t0 = std::time::Instant::now();
        let mut l = LiveRooms::default();
        let tiers = TierThresholds {
            interactive: Some(2),
            push: None,
        };
        l.saw_live(RoomId(1), t0, Some(tiers));
        l.saw_live(RoomId(2), t0, None);
        assert_eq!(l.tiers(RoomId(1)), Some(tiers));
        assert_eq!(l.tiers(RoomId(2)), None);
        assert_eq!(l.tiers(RoomId(3)), None);
        assert_eq!(l.known_tiers(RoomId(1)), Some(Some(tiers)));
        assert_eq!(l.known_tiers(RoomId(3)), None);
        let stored = RoomEntry {
            tiers: Some(tiers),
            ..entry("t", None, 1, None)
        };
        let json = serde_json::to_string(&stored).unwrap();
        assert!(json.contains(r#""tiers":{"interactive":2}"#), "{json}");
        assert_eq!(serde_json::from_str::<RoomEntry>(&json).unwrap(), stored);
        let plain = serde_json::to_string(&entry("t", None, 1, None)).unwrap();
        assert!(
            !plain.contains("tiers"),
            "entries without tiers are stored as before"
        );
        assert_eq!(
            stored.info(RoomId(1), String::new(), 1, 0).tiers,
            Some(tiers)
        );
    }

    #[test]
    fn a_live_room_nobody_keeps_alive_expires() {
        let expiry = Expiry { idle_secs: 600 };
        assert!(!expiry.idle(1_000, 1_599));
        assert!(expiry.idle(1_000, 1_600));
        assert!(!expiry.idle(1_000, 10), "clock before the room: not idle");
        let mut d = Directory::default();
        let quiet = d.create(entry("quiet", None, 1_000, None));
        let busy = d.create(entry("busy", None, 1_000, None));
        let later = d.create(entry("later", None, 1_000, Some(1_500)));
        assert!(d.idle(expiry, 1_599, 10).is_empty());
        d.touch([busy, RoomId(0xdead)], 1_300);
        assert_eq!(d.idle(expiry, 1_600, 10), vec![quiet]);
        let mut idle = d.idle(expiry, 2_100, 10);
        idle.sort();
        let mut want = vec![quiet, busy, later];
        want.sort();
        assert_eq!(idle, want, "the scheduled room counts from its start");
        assert_eq!(d.idle(expiry, 2_100, 1).len(), 1, "bounded per pass");
        assert!(d.end(quiet, 1_600));
        assert!(!d.idle(expiry, 2_100, 10).contains(&quiet), "ended: gone");
        d.touch([quiet], 2_000);
        assert!(!d.idle(expiry, 9_000, 10).contains(&quiet));
    }

    #[test]
    fn a_scheduled_room_moves_until_it_starts() {
        let mut d = Directory::default();
        let a = d.create(entry("a", None, 100, Some(500)));
        let live = d.create(entry("live", None, 100, None));
        assert_eq!(d.scheduled_between(400, 600), vec![a]);
        assert_eq!(
            d.reschedule(a, 900, 200),
            Rescheduled::Moved { previous: 500 }
        );
        assert_eq!(d.get(a).unwrap().scheduled_at, Some(900));
        assert!(
            d.scheduled_between(400, 600).is_empty(),
            "the old start is gone"
        );
        assert_eq!(d.scheduled_between(800, 900), vec![a]);
        assert_eq!(walk(&d, 10, 200), vec![live, a]);
        assert!(
            d.idle(Expiry { idle_secs: 60 }, 800, 10) == vec![live],
            "idle counts from the new start"
        );
        assert_eq!(d.reschedule(live, 900, 200), Rescheduled::NotScheduled);
        assert_eq!(
            d.reschedule(a, 1_000, 900),
            Rescheduled::NotScheduled,
            "started"
        );
        assert_eq!(
            d.reschedule(RoomId(0xdead), 900, 200),
            Rescheduled::NotFound
        );
        let b = d.create(entry("b", None, 100, Some(500)));
        assert!(d.end(b, 300));
        assert_eq!(
            d.reschedule(b, 900, 400),
            Rescheduled::NotScheduled,
            "cancelled"
        );
    }
}
