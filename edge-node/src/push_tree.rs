//! The push tier's relay tree (sans-IO): where each room's program stream comes from.
//!
//! The geo-router names this edge's parent in its region's tree in every heartbeat answer
//! ([`RelayParent`]; none for the tree's root and when there is no tree). [`TreePlan`] takes the
//! rooms [`PushCore`](crate::push::PushCore) subscribes and unsubscribes and decides, per room,
//! whether to pull the program from the parent (a *feed*: the parent's push stream of the room,
//! opened with the router's relay grant) or from the origins (`SubscribeProgram`):
//!
//! - with a parent, a room is fed by it; without one, by the origins;
//! - a feed that fails or drops falls back to the origins at once and is tried again after
//!   [`RETRY_FIRST`], doubling up to [`RETRY_MAX`];
//! - a new parent is make-before-break: the old feed (or the origins) keeps the room until the
//!   new feed delivers its first message, then it is closed.
//!
//! While two sources overlap the push core drops the frames it already has (by timestamp), so a
//! listener hears neither a gap nor a repeat. Feeds are numbered; an event about a feed that is
//! no longer the room's is ignored.

use crate::push::PushOutput;
use amphi_protocol::api::RelayParent;
use amphi_protocol::RoomId;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// The first wait before a failed feed is tried again.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between tries.
pub const RETRY_MAX: Duration = Duration::from_secs(16);

/// What the driver is to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeOutput {
    /// Subscribe or unsubscribe a room at the origins.
    Origins(PushOutput),
    /// Open feed `feed` of `room` from the parent at `url` with relay grant `grant`.
    Open {
        /// The room.
        room: RoomId,
        /// The feed's number.
        feed: u64,
        /// The parent's relay URL.
        url: String,
        /// The relay grant to present.
        grant: String,
    },
    /// Close feed `feed` of `room`.
    Close {
        /// The room.
        room: RoomId,
        /// The feed's number.
        feed: u64,
    },
}

#[derive(Clone, Debug)]
struct Feed {
    id: u64,
    /// It delivered a message.
    live: bool,
}

#[derive(Debug, Default)]
struct Source {
    /// Subscribed at the origins.
    origins: bool,
    /// The feed from the current parent.
    feed: Option<Feed>,
    /// A live feed from the previous parent, kept until `feed` is live.
    previous: Option<u64>,
    /// Failed feeds in a row (for the retry's back-off).
    failures: u32,
    /// When to try a feed again.
    retry_at: Option<Instant>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct TreePlan {
    parent: Option<RelayParent>,
    rooms: BTreeMap<RoomId, Source>,
    next_feed: u64,
    out: VecDeque<TreeOutput>,
}

impl TreePlan {
    /// No rooms, no parent.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rooms subscribed at the origins now (announced again on every origin link that comes up).
    pub fn from_origins(&self) -> Vec<RoomId> {
        self.rooms
            .iter()
            .filter(|(_, s)| s.origins)
            .map(|(room, _)| *room)
            .collect()
    }

    /// Whether `room` is subscribed.
    pub fn is_subscribed(&self, room: RoomId) -> bool {
        self.rooms.contains_key(&room)
    }

    /// Rooms fed by a parent now (a live feed).
    pub fn fed_rooms(&self) -> usize {
        self.rooms
            .values()
            .filter(|s| s.feed.as_ref().is_some_and(|f| f.live) || s.previous.is_some())
            .count()
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<TreeOutput> {
        self.out.pop_front()
    }

    /// The next retry's time, if one is waiting.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.rooms.values().filter_map(|s| s.retry_at).min()
    }

    /// The push core subscribed `room` (its first listener arrived).
    pub fn subscribe(&mut self, room: RoomId) {
        if self.rooms.contains_key(&room) {
            return;
        }
        self.rooms.insert(room, Source::default());
        if self.parent.is_some() {
            self.open(room);
        } else {
            self.origins(room, true);
        }
    }

    /// The push core unsubscribed `room` (no listener for a while, or the room ended).
    pub fn unsubscribe(&mut self, room: RoomId) {
        let Some(s) = self.rooms.remove(&room) else {
            return;
        };
        for feed in s.feed.map(|f| f.id).into_iter().chain(s.previous) {
            self.out.push_back(TreeOutput::Close { room, feed });
        }
        if s.origins {
            self.out
                .push_back(TreeOutput::Origins(PushOutput::Unsubscribe(room)));
        }
    }

    /// The router named `parent` (a heartbeat answer). The same parent again only renews the
    /// grant; another one moves every room to it, make-before-break; none moves them to the
    /// origins.
    pub fn set_parent(&mut self, parent: Option<RelayParent>) {
        let same = match (&self.parent, &parent) {
            (Some(a), Some(b)) => a.id == b.id && a.url == b.url,
            (None, None) => true,
            _ => false,
        };
        self.parent = parent;
        if same {
            return;
        }
        let rooms: Vec<RoomId> = self.rooms.keys().copied().collect();
        for room in rooms {
            let Some(s) = self.rooms.get_mut(&room) else {
                continue;
            };
            s.failures = 0;
            s.retry_at = None;
            let mut closing = Vec::new();
            match s.feed.take() {
                // A live feed carries the room until the new one is live.
                Some(f) if f.live && self.parent.is_some() => {
                    closing.extend(s.previous.replace(f.id));
                }
                Some(f) => closing.push(f.id),
                None => {}
            }
            if self.parent.is_none() {
                closing.extend(s.previous.take());
            }
            for feed in closing {
                self.out.push_back(TreeOutput::Close { room, feed });
            }
            if self.parent.is_some() {
                self.open(room);
            } else {
                self.origins(room, true);
            }
        }
    }

    /// Feed `feed` of `room` delivered its first message: it carries the room from now on.
    pub fn feed_live(&mut self, room: RoomId, feed: u64) {
        let Some(s) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(f) = s.feed.as_mut().filter(|f| f.id == feed) else {
            return;
        };
        f.live = true;
        s.failures = 0;
        let previous = s.previous.take();
        let origins = std::mem::take(&mut s.origins);
        if let Some(old) = previous {
            self.out.push_back(TreeOutput::Close { room, feed: old });
        }
        if origins {
            self.out
                .push_back(TreeOutput::Origins(PushOutput::Unsubscribe(room)));
        }
    }

    /// Feed `feed` of `room` failed to open or dropped at `now`: the origins take the room
    /// (unless a previous parent's feed still does) and the feed is tried again later.
    pub fn feed_lost(&mut self, room: RoomId, feed: u64, now: Instant) {
        let Some(s) = self.rooms.get_mut(&room) else {
            return;
        };
        if s.previous == Some(feed) {
            s.previous = None;
            if !s.feed.as_ref().is_some_and(|f| f.live) {
                self.origins(room, true);
            }
            return;
        }
        if s.feed.as_ref().is_none_or(|f| f.id != feed) {
            return;
        }
        s.feed = None;
        let wait = RETRY_FIRST
            .saturating_mul(1 << s.failures.min(8))
            .min(RETRY_MAX);
        s.failures = s.failures.saturating_add(1);
        s.retry_at = Some(now + wait);
        if s.previous.is_none() {
            self.origins(room, true);
        }
    }

    /// Retries due at `now` open their feeds again.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, s)| s.retry_at.is_some_and(|t| t <= now))
            .map(|(room, _)| *room)
            .collect();
        for room in due {
            if let Some(s) = self.rooms.get_mut(&room) {
                s.retry_at = None;
            }
            if self.parent.is_some() {
                self.open(room);
            }
        }
    }

    /// Open a new feed of `room` from the parent.
    fn open(&mut self, room: RoomId) {
        let Some(parent) = &self.parent else {
            return;
        };
        let Some(s) = self.rooms.get_mut(&room) else {
            return;
        };
        self.next_feed += 1;
        let feed = self.next_feed;
        s.feed = Some(Feed {
            id: feed,
            live: false,
        });
        self.out.push_back(TreeOutput::Open {
            room,
            feed,
            url: parent.url.clone(),
            grant: parent.grant.clone(),
        });
    }

    /// Subscribe `room` at the origins (once).
    fn origins(&mut self, room: RoomId, on: bool) {
        let Some(s) = self.rooms.get_mut(&room) else {
            return;
        };
        if s.origins != on {
            s.origins = on;
            let out = if on {
                PushOutput::Subscribe(room)
            } else {
                PushOutput::Unsubscribe(room)
            };
            self.out.push_back(TreeOutput::Origins(out));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: RoomId = RoomId(0xab);

    fn parent(id: &str) -> Option<RelayParent> {
        Some(RelayParent {
            id: id.into(),
            url: format!("http://{id}:8080"),
            grant: format!("grant-for-{id}"),
        })
    }

    fn drain(plan: &mut TreePlan) -> Vec<TreeOutput> {
        std::iter::from_fn(|| plan.poll_output()).collect()
    }

    fn open(feed: u64, id: &str) -> TreeOutput {
        TreeOutput::Open {
            room: ROOM,
            feed,
            url: format!("http://{id}:8080"),
            grant: format!("grant-for-{id}"),
        }
    }

    fn close(feed: u64) -> TreeOutput {
        TreeOutput::Close { room: ROOM, feed }
    }

    const SUB: TreeOutput = TreeOutput::Origins(PushOutput::Subscribe(ROOM));
    const UNSUB: TreeOutput = TreeOutput::Origins(PushOutput::Unsubscribe(ROOM));

    #[test]
    fn without_a_parent_rooms_come_from_the_origins() {
        let mut plan = TreePlan::new();
        plan.subscribe(ROOM);
        plan.subscribe(ROOM);
        assert_eq!(drain(&mut plan), [SUB]);
        assert_eq!(plan.from_origins(), [ROOM]);
        plan.unsubscribe(ROOM);
        assert_eq!(drain(&mut plan), [UNSUB]);
        assert!(plan.from_origins().is_empty());
    }

    #[test]
    fn a_leaf_pulls_from_its_parent_and_falls_back_to_the_origins_when_it_dies() {
        let t0 = Instant::now();
        let mut plan = TreePlan::new();
        plan.set_parent(parent("hub"));
        plan.subscribe(ROOM);
        assert_eq!(drain(&mut plan), [open(1, "hub")]);
        assert!(plan.from_origins().is_empty());
        plan.feed_live(ROOM, 1);
        assert_eq!(drain(&mut plan), []);
        assert_eq!(plan.fed_rooms(), 1);
        // The hub dies: the origins at once, the hub again after 1 s, 2 s, 4 s...
        plan.feed_lost(ROOM, 1, t0);
        assert_eq!(drain(&mut plan), [SUB]);
        assert_eq!(plan.poll_timeout(), Some(t0 + RETRY_FIRST));
        plan.handle_timeout(t0 + RETRY_FIRST);
        assert_eq!(drain(&mut plan), [open(2, "hub")]);
        let t1 = t0 + RETRY_FIRST;
        plan.feed_lost(ROOM, 2, t1);
        assert_eq!(drain(&mut plan), []);
        assert_eq!(plan.poll_timeout(), Some(t1 + RETRY_FIRST * 2));
        // The router names the next edge: tried at once; the origins go once it is live.
        plan.set_parent(parent("next"));
        assert_eq!(drain(&mut plan), [open(3, "next")]);
        assert_eq!(plan.poll_timeout(), None);
        // An event of an old feed changes nothing.
        plan.feed_live(ROOM, 2);
        plan.feed_lost(ROOM, 1, t1);
        assert_eq!(drain(&mut plan), []);
        plan.feed_live(ROOM, 3);
        assert_eq!(drain(&mut plan), [UNSUB]);
        assert!(plan.from_origins().is_empty());
    }

    #[test]
    fn a_new_parent_takes_over_before_the_old_feed_closes() {
        let t0 = Instant::now();
        let mut plan = TreePlan::new();
        plan.set_parent(parent("a"));
        plan.subscribe(ROOM);
        plan.feed_live(ROOM, 1);
        drain(&mut plan);
        // The same parent with a renewed grant: nothing moves.
        let mut renewed = parent("a");
        renewed.as_mut().unwrap().grant = "newer".into();
        plan.set_parent(renewed);
        assert_eq!(drain(&mut plan), []);
        // Another parent: the old feed stays until the new one is live.
        plan.set_parent(parent("b"));
        assert_eq!(drain(&mut plan), [open(2, "b")]);
        plan.feed_live(ROOM, 2);
        assert_eq!(drain(&mut plan), [close(1)]);
        // And if the new feed fails first, the old parent's feed carries on alone; when that
        // one drops too, the origins.
        plan.set_parent(parent("c"));
        assert_eq!(drain(&mut plan), [open(3, "c")]);
        plan.feed_lost(ROOM, 3, t0);
        assert_eq!(drain(&mut plan), []);
        plan.feed_lost(ROOM, 2, t0);
        assert_eq!(drain(&mut plan), [SUB]);
        // No parent any more: the retry is dropped, the origins keep the room.
        plan.set_parent(None);
        assert_eq!(drain(&mut plan), []);
        plan.handle_timeout(t0 + RETRY_MAX);
        assert_eq!(drain(&mut plan), []);
        assert_eq!(plan.from_origins(), [ROOM]);
    }

    #[test]
    fn losing_the_parent_moves_live_rooms_to_the_origins_and_unsubscribing_closes_all() {
        let mut plan = TreePlan::new();
        plan.set_parent(parent("a"));
        plan.subscribe(ROOM);
        plan.feed_live(ROOM, 1);
        plan.set_parent(parent("b"));
        drain(&mut plan);
        plan.set_parent(None);
        assert_eq!(drain(&mut plan), [close(2), close(1), SUB]);
        plan.set_parent(parent("c"));
        assert_eq!(drain(&mut plan), [open(3, "c")]);
        plan.unsubscribe(ROOM);
        assert_eq!(drain(&mut plan), [close(3), UNSUB]);
        assert_eq!(plan.fed_rooms(), 0);
    }

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let mut t = Instant::now();
        let mut plan = TreePlan::new();
        plan.set_parent(parent("a"));
        plan.subscribe(ROOM);
        let mut waits = Vec::new();
        for feed in 1..=7 {
            plan.feed_lost(ROOM, feed, t);
            let next = plan.poll_timeout().unwrap();
            waits.push((next - t).as_secs());
            t = next;
            plan.handle_timeout(t);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 16, 16]);
    }
}
