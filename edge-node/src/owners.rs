//! Sans-IO routing of rooms over the edge's links to every origin.
//!
//! The edge links to every configured origin. Each room's traffic (control messages, speaker
//! datagrams) goes to the room's owner: rendezvous hashing over the *healthy* origins
//! ([`amphi_protocol::ownership`], the same rule the geo-router and the packagers follow, so all
//! parties agree without talking). [`OriginRoutes`] turns link events and the passing of time
//! into what the driver must do:
//!
//! - a link came up: announce on it every local room the origin owns (subscriptions, participants
//!   with their roles, publishers);
//! - a room moved (its owner's link was lost for longer than the grace, or a returning origin
//!   finished its rejoin period): announce the room to its new owner, and unsubscribe it at the
//!   old owner if that link is still up;
//! - a control message produced before the room's last announcement is stale (the announcement
//!   carried the state it changed) and is dropped; one for a room whose owner's link is down is
//!   dropped too (the next announcement covers it).

use amphi_protocol::ownership::{HealthTiming, OriginHealth, Ownership};
use amphi_protocol::RoomId;
use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

/// What the driver must do after an event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Announce these rooms on link `origin` (index in the configured list), one entry per link.
    pub announce: Vec<(usize, BTreeSet<RoomId>)>,
    /// Send `UnsubscribeRoom` for the room on link `origin` (its previous owner, still linked).
    pub unsubscribe: Vec<(usize, RoomId)>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.announce.is_empty() && self.unsubscribe.is_empty()
    }

    fn announce_on(&mut self, origin: usize, room: RoomId) {
        match self.announce.iter_mut().find(|(o, _)| *o == origin) {
            Some((_, rooms)) => {
                rooms.insert(room);
            }
            None => self.announce.push((origin, BTreeSet::from([room]))),
        }
    }
}

/// Where each room's traffic goes, over the links to every configured origin.
#[derive(Debug)]
pub struct OriginRoutes {
    ids: Vec<String>,
    linked: Vec<bool>,
    ownership: Ownership,
    /// Epoch of each room's last announcement.
    announced: HashMap<RoomId, u64>,
}

impl OriginRoutes {
    /// Routes over the origins `ids` (configuration order), none linked yet at `now`.
    pub fn new(ids: Vec<String>, timing: HealthTiming, now: Instant) -> Self {
        let health = OriginHealth::new(ids.iter().cloned(), timing, now);
        OriginRoutes {
            linked: vec![false; ids.len()],
            ids,
            ownership: Ownership::new(health),
            announced: HashMap::new(),
        }
    }

    /// Index of origin `id`.
    fn index(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|i| i == id)
    }

    /// The configured origin ids.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Number of links up.
    pub fn linked_count(&self) -> usize {
        self.linked.iter().filter(|l| **l).count()
    }

    /// Whether link `origin` is up.
    pub fn is_linked(&self, origin: usize) -> bool {
        self.linked.get(origin).copied().unwrap_or(false)
    }

    /// The owner of `room` at `now` (index), tracking the room.
    pub fn owner(&mut self, room: RoomId, now: Instant) -> Option<usize> {
        let id = self.ownership.owner(room, now)?.to_string();
        self.index(&id)
    }

    /// The link `room`'s traffic goes to now: its owner, when that link is up.
    pub fn route(&mut self, room: RoomId, now: Instant) -> Option<usize> {
        self.owner(room, now).filter(|o| self.linked[*o])
    }

    /// Whether a control message for `room` produced at `epoch` is still to be sent (it is stale
    /// when the room was announced at a later epoch).
    pub fn is_current(&self, room: RoomId, epoch: u64) -> bool {
        self.announced.get(&room).is_none_or(|a| epoch >= *a)
    }

    /// The rooms were announced at `epoch`.
    pub fn announced(&mut self, rooms: &BTreeSet<RoomId>, epoch: u64) {
        for r in rooms {
            self.announced.insert(*r, epoch);
        }
    }

    /// The edge has no participant in `room` any more.
    pub fn forget(&mut self, room: RoomId) {
        self.ownership.forget(room);
        self.announced.remove(&room);
    }

    /// Link `origin` came up at `now`; `rooms` are the edge's local rooms. Announces every room
    /// it owns on it, and any room that moved meanwhile.
    pub fn link_up(&mut self, origin: usize, rooms: &[RoomId], now: Instant) -> Plan {
        if origin >= self.ids.len() {
            return Plan::default();
        }
        self.linked[origin] = true;
        let id = self.ids[origin].clone();
        self.ownership.health_mut().link_up(&id, now);
        let mut plan = self.tick(now);
        for room in rooms {
            if self.owner(*room, now) == Some(origin) {
                plan.announce_on(origin, *room);
            }
        }
        plan
    }

    /// Link `origin` was lost at `now`.
    pub fn link_down(&mut self, origin: usize, now: Instant) -> Plan {
        if origin >= self.ids.len() {
            return Plan::default();
        }
        self.linked[origin] = false;
        let id = self.ids[origin].clone();
        self.ownership.health_mut().link_down(&id, now);
        self.tick(now)
    }

    /// Re-evaluate ownership at `now` (call at [`OriginRoutes::next_change`] and after events).
    pub fn tick(&mut self, now: Instant) -> Plan {
        let mut plan = Plan::default();
        for change in self.ownership.refresh(now) {
            if let Some(from) = self.index(&change.from).filter(|f| self.linked[*f]) {
                plan.unsubscribe.push((from, change.room));
            }
            if let Some(to) = change.to.as_deref().and_then(|t| self.index(t)) {
                if self.linked[to] {
                    plan.announce_on(to, change.room);
                }
            }
        }
        plan
    }

    /// When ownership may next change without a link event.
    pub fn next_change(&self, now: Instant) -> Option<Instant> {
        self.ownership.health().next_change(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphi_protocol::placement::rendezvous;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    fn timing() -> HealthTiming {
        HealthTiming {
            grace: 1000 * MS,
            rejoin: 30_000 * MS,
        }
    }

    fn ids() -> Vec<String> {
        vec!["origin-1".into(), "origin-2".into()]
    }

    fn room_of(owner: &str) -> RoomId {
        (1..1000u64)
            .map(RoomId)
            .find(|r| rendezvous(*r, &ids()).map(String::as_str) == Some(owner))
            .unwrap()
    }

    fn announce(origin: usize, rooms: &[RoomId]) -> (usize, BTreeSet<RoomId>) {
        (origin, rooms.iter().copied().collect())
    }

    #[test]
    fn each_link_announces_the_rooms_its_origin_owns() {
        let t0 = Instant::now();
        let (a, b) = (room_of("origin-1"), room_of("origin-2"));
        let mut r = OriginRoutes::new(ids(), timing(), t0);
        assert_eq!(r.route(a, t0), None, "nothing linked yet");
        let plan = r.link_up(0, &[a, b], t0 + 10 * MS);
        assert_eq!(plan.announce, vec![announce(0, &[a])]);
        assert_eq!(r.route(a, t0 + 10 * MS), Some(0));
        // origin-2 is still in its start-up grace: b waits for it.
        assert_eq!(r.route(b, t0 + 10 * MS), None);
        let plan = r.link_up(1, &[a, b], t0 + 200 * MS);
        assert_eq!(plan.announce, vec![announce(1, &[b])]);
        assert!(plan.unsubscribe.is_empty());
        assert_eq!(r.route(b, t0 + 200 * MS), Some(1));
        assert_eq!(r.linked_count(), 2);
    }

    #[test]
    fn a_dead_origin_s_rooms_move_after_the_grace_and_are_announced_to_the_survivor() {
        let t0 = Instant::now();
        let (a, b) = (room_of("origin-1"), room_of("origin-2"));
        let mut r = OriginRoutes::new(ids(), timing(), t0);
        r.link_up(0, &[a, b], t0);
        r.link_up(1, &[a, b], t0);
        assert_eq!(r.route(b, t0), Some(1));
        // origin-2 dies; its link is lost (QUIC idle timeout) at 5 s.
        let plan = r.link_down(1, t0 + 5000 * MS);
        assert!(plan.is_empty(), "grace: {plan:?}");
        assert_eq!(r.route(b, t0 + 5500 * MS), None, "owner unreachable");
        assert_eq!(r.next_change(t0 + 5500 * MS), Some(t0 + 6000 * MS));
        assert!(r.tick(t0 + 5999 * MS).is_empty());
        let plan = r.tick(t0 + 6000 * MS);
        assert_eq!(plan.announce, vec![announce(0, &[b])]);
        assert!(plan.unsubscribe.is_empty(), "the old owner is gone");
        assert_eq!(r.route(b, t0 + 6000 * MS), Some(0));
        assert_eq!(r.route(a, t0 + 6000 * MS), Some(0), "a never moved");
        assert!(r.tick(t0 + 6001 * MS).is_empty(), "reported once");
    }

    #[test]
    fn a_returning_origin_takes_its_rooms_back_after_the_rejoin_and_the_stand_in_lets_go() {
        let t0 = Instant::now();
        let b = room_of("origin-2");
        let mut r = OriginRoutes::new(ids(), timing(), t0);
        r.link_up(0, &[b], t0);
        r.link_up(1, &[b], t0);
        r.link_down(1, t0 + 1000 * MS);
        assert_eq!(r.tick(t0 + 2000 * MS).announce, vec![announce(0, &[b])]);
        // Back at 3 s: not healthy before its rejoin period is over.
        let plan = r.link_up(1, &[b], t0 + 3000 * MS);
        assert!(plan.is_empty(), "{plan:?}");
        assert_eq!(r.route(b, t0 + 3000 * MS), Some(0));
        assert_eq!(r.next_change(t0 + 3000 * MS), Some(t0 + 33_000 * MS));
        let plan = r.tick(t0 + 33_000 * MS);
        assert_eq!(plan.announce, vec![announce(1, &[b])]);
        assert_eq!(plan.unsubscribe, vec![(0, b)]);
        assert_eq!(r.route(b, t0 + 33_000 * MS), Some(1));
    }

    #[test]
    fn messages_older_than_a_room_s_announcement_are_stale() {
        let t0 = Instant::now();
        let (a, b) = (room_of("origin-1"), room_of("origin-2"));
        let mut r = OriginRoutes::new(ids(), timing(), t0);
        assert!(r.is_current(a, 0), "never announced");
        r.announced(&BTreeSet::from([a]), 4);
        assert!(!r.is_current(a, 3));
        assert!(r.is_current(a, 4));
        assert!(
            r.is_current(b, 1),
            "another room's announcement does not matter"
        );
        r.forget(a);
        assert!(r.is_current(a, 0));
        assert_eq!(r.link_up(7, &[a], t0), Plan::default(), "unknown link");
    }
}
