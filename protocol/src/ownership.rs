//! Which origin owns a room (sans-IO, shared by geo-router, edges and packagers).
//!
//! A room's owner is the origin with the highest rendezvous score ([`crate::placement`]) among
//! the origins that are *healthy*. Every party (router, edge, packager) links to every origin and feeds its link
//! state into an [`OriginHealth`]; with the same origin list and the same rule they all reach the
//! same answer without talking to each other.
//!
//! Health rule (see [`HealthTiming`]):
//! - an origin whose link is up is healthy, except that an origin whose link was *lost* must stay
//!   up for `rejoin` before it is healthy again (flap damping: a flapping origin does not pull
//!   rooms back and forth);
//! - an origin whose link is down stays healthy for `grace` after the loss (a blip of the link
//!   does not move rooms), then is unhealthy;
//! - at start every origin counts as healthy for `grace` (links are still being dialled; a party
//!   that starts must not route rooms away from origins it has not reached yet).
//!
//! When an origin returns, the rooms it owned by hash move back to it once it has been up for
//! `rejoin`: ownership is a pure function of the healthy set, so parties never disagree about a
//! room (a sticky record would have to be shared, e.g. in Redis, for a party that first sees the
//! room after the return to find it). [`Ownership`] remembers each tracked room's last owner so a
//! driver learns which rooms moved and re-announces them.

use crate::placement::rendezvous_among;
use crate::RoomId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Timing of the health rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthTiming {
    /// How long an origin whose link is down still counts as healthy (also the start-up grace).
    pub grace: Duration,
    /// How long the link of an origin that was lost must stay up before it is healthy again.
    pub rejoin: Duration,
}

impl Default for HealthTiming {
    /// 1 s grace (a room moves 1 s after its origin's link is seen down: the link's QUIC idle
    /// timeout bounds how fast that is), 30 s rejoin.
    fn default() -> Self {
        HealthTiming {
            grace: Duration::from_secs(1),
            rejoin: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Up since this instant; `after_loss` when the link had been up and was lost before (the
    /// rejoin period applies).
    Up { since: Instant, after_loss: bool },
    /// Down: healthy until `healthy_until` (grace after a loss, or the start-up grace);
    /// `was_up` when the link has ever been up.
    Down {
        healthy_until: Instant,
        was_up: bool,
    },
}

/// Link state of every configured origin, fed by the driver (sans-IO).
#[derive(Debug, Clone)]
pub struct OriginHealth {
    timing: HealthTiming,
    /// Configured origin ids, in configuration order, with their link state.
    links: Vec<(String, Link)>,
}

impl OriginHealth {
    /// All `ids` start down at `now` (healthy for the start-up grace).
    pub fn new<I, S>(ids: I, timing: HealthTiming, now: Instant) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        OriginHealth {
            timing,
            links: ids
                .into_iter()
                .map(|id| {
                    let down = Link::Down {
                        healthy_until: now + timing.grace,
                        was_up: false,
                    };
                    (id.into(), down)
                })
                .collect(),
        }
    }

    /// The link to `id` came up at `now` (unknown ids and repeated reports are ignored).
    pub fn link_up(&mut self, id: &str, now: Instant) {
        if let Some((_, link)) = self.links.iter_mut().find(|(i, _)| i == id) {
            if let Link::Down { was_up, .. } = *link {
                *link = Link::Up {
                    since: now,
                    after_loss: was_up,
                };
            }
        }
    }

    /// The link to `id` was lost at `now` (unknown ids and repeated reports are ignored). It
    /// stays healthy for `grace` if it was healthy; its next `link_up` must last `rejoin`.
    pub fn link_down(&mut self, id: &str, now: Instant) {
        let timing = self.timing;
        if let Some((_, link)) = self.links.iter_mut().find(|(i, _)| i == id) {
            if let Link::Up { .. } = *link {
                let was_healthy = Self::healthy_at(timing, *link, now);
                *link = Link::Down {
                    // A link lost during its rejoin period never became healthy again: no grace.
                    healthy_until: if was_healthy { now + timing.grace } else { now },
                    was_up: true,
                };
            }
        }
    }

    fn healthy_at(timing: HealthTiming, link: Link, now: Instant) -> bool {
        match link {
            Link::Up { since, after_loss } => {
                !after_loss || now.saturating_duration_since(since) >= timing.rejoin
            }
            Link::Down { healthy_until, .. } => now < healthy_until,
        }
    }

    /// Whether `id` counts as healthy at `now` (unknown ids are not).
    pub fn is_healthy(&self, id: &str, now: Instant) -> bool {
        self.links
            .iter()
            .find(|(i, _)| i == id)
            .is_some_and(|(_, l)| Self::healthy_at(self.timing, *l, now))
    }

    /// Ids of the healthy origins at `now`, in configuration order.
    pub fn healthy(&self, now: Instant) -> impl Iterator<Item = &str> + '_ {
        self.links
            .iter()
            .filter(move |(_, l)| Self::healthy_at(self.timing, *l, now))
            .map(|(i, _)| i.as_str())
    }

    /// The owner of `room` at `now`: rendezvous hashing over the healthy origins. When none is
    /// healthy, over the origins whose link is up (still in their rejoin period: flap damping
    /// must not leave a room without any origin, e.g. the only origin restarting). `None` when
    /// no link is up either.
    pub fn owner(&self, room: RoomId, now: Instant) -> Option<&str> {
        let healthy = self
            .links
            .iter()
            .filter(|(_, l)| Self::healthy_at(self.timing, *l, now))
            .map(|(id, _)| id);
        let up = self
            .links
            .iter()
            .filter(|(_, l)| matches!(l, Link::Up { .. }))
            .map(|(id, _)| id);
        rendezvous_among(room, healthy)
            .or_else(|| rendezvous_among(room, up))
            .map(String::as_str)
    }

    /// The next instant after `now` at which health changes without a link event (a grace or
    /// rejoin period ends), so a driver knows when to re-evaluate ownership.
    pub fn next_change(&self, now: Instant) -> Option<Instant> {
        self.links
            .iter()
            .filter_map(|(_, l)| match *l {
                Link::Up {
                    since,
                    after_loss: true,
                } => Some(since + self.timing.rejoin),
                Link::Down { healthy_until, .. } => Some(healthy_until),
                Link::Up { .. } => None,
            })
            .filter(|t| *t > now)
            .min()
    }
}

/// A room whose owner changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerChange {
    /// The room.
    pub room: RoomId,
    /// Its previous owner.
    pub from: String,
    /// Its owner now (`None`: no origin is healthy).
    pub to: Option<String>,
}

/// The rooms a party is tracking and the owner each was last sent to (sans-IO): a driver asks
/// [`Ownership::owner`] where to send a room's traffic and calls [`Ownership::refresh`] after a
/// link event or at [`OriginHealth::next_change`] to learn which rooms moved.
#[derive(Debug, Clone)]
pub struct Ownership {
    health: OriginHealth,
    rooms: HashMap<RoomId, Option<String>>,
}

impl Ownership {
    /// Track rooms over `health`.
    pub fn new(health: OriginHealth) -> Self {
        Ownership {
            health,
            rooms: HashMap::new(),
        }
    }

    /// The link state (to feed link events).
    pub fn health_mut(&mut self) -> &mut OriginHealth {
        &mut self.health
    }

    /// The link state.
    pub fn health(&self) -> &OriginHealth {
        &self.health
    }

    /// The owner of `room` at `now`, and start tracking it. A tracked room keeps the owner it
    /// was last given until [`Ownership::refresh`] reports the move, so a driver never sends a
    /// room's traffic to a new owner before it has re-announced the room there.
    pub fn owner(&mut self, room: RoomId, now: Instant) -> Option<&str> {
        let health = &self.health;
        self.rooms
            .entry(room)
            .or_insert_with(|| health.owner(room, now).map(str::to_string))
            .as_deref()
    }

    /// Stop tracking `room` (it ended or has no local participant left).
    pub fn forget(&mut self, room: RoomId) {
        self.rooms.remove(&room);
    }

    /// Re-evaluate every tracked room at `now`: the rooms whose owner changed, each reported
    /// once (sorted by room id). A room without a healthy origin is reported once with `to:
    /// None` and gets an owner at a later refresh.
    pub fn refresh(&mut self, now: Instant) -> Vec<OwnerChange> {
        let mut changes = Vec::new();
        for (room, owner) in self.rooms.iter_mut() {
            let now_owner = self.health.owner(*room, now);
            if owner.as_deref() != now_owner {
                if let Some(from) = owner.take() {
                    changes.push(OwnerChange {
                        room: *room,
                        from,
                        to: now_owner.map(str::to_string),
                    });
                }
                *owner = now_owner.map(str::to_string);
            }
        }
        changes.sort_by_key(|c| c.room);
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::rendezvous;

    const MS: Duration = Duration::from_millis(1);

    fn timing() -> HealthTiming {
        HealthTiming {
            grace: Duration::from_millis(1000),
            rejoin: Duration::from_millis(30_000),
        }
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("origin-{i}")).collect()
    }

    /// A room owned (by hash over all of `ids(n)`) by `owner`.
    fn room_owned_by(n: usize, owner: &str) -> RoomId {
        let all = ids(n);
        (1..1000u64)
            .map(RoomId)
            .find(|r| rendezvous(*r, &all).map(String::as_str) == Some(owner))
            .expect("some room hashes to each origin")
    }

    #[test]
    fn start_grace_keeps_undialled_origins_then_drops_them() {
        let t0 = Instant::now();
        let mut h = OriginHealth::new(ids(2), timing(), t0);
        let room = room_owned_by(2, "origin-1");
        h.link_up("origin-0", t0 + 10 * MS);
        assert_eq!(
            h.owner(room, t0 + 999 * MS),
            Some("origin-1"),
            "still dialling"
        );
        assert_eq!(
            h.owner(room, t0 + 1000 * MS),
            Some("origin-0"),
            "never reached"
        );
        assert_eq!(h.next_change(t0), Some(t0 + 1000 * MS));
        // The first connection is healthy at once (no rejoin period).
        h.link_up("origin-1", t0 + 1500 * MS);
        assert_eq!(h.owner(room, t0 + 1500 * MS), Some("origin-1"));
        assert_eq!(h.next_change(t0 + 1500 * MS), None);
    }

    #[test]
    fn a_lost_origin_keeps_its_rooms_for_the_grace_then_the_next_by_hash_owns_them() {
        let t0 = Instant::now();
        let mut h = OriginHealth::new(ids(3), timing(), t0);
        for id in ids(3) {
            h.link_up(&id, t0);
        }
        let room = room_owned_by(3, "origin-2");
        let expected_next = rendezvous(room, &ids(2)).unwrap().clone();
        let other = room_owned_by(3, "origin-0");
        h.link_down("origin-2", t0 + 5000 * MS);
        h.link_down("origin-2", t0 + 5500 * MS); // repeated report: ignored
        assert!(h.is_healthy("origin-2", t0 + 5999 * MS));
        assert_eq!(h.owner(room, t0 + 5999 * MS), Some("origin-2"));
        assert!(!h.is_healthy("origin-2", t0 + 6000 * MS));
        assert_eq!(h.owner(room, t0 + 6000 * MS), Some(expected_next.as_str()));
        assert_eq!(
            h.owner(other, t0 + 6000 * MS),
            Some("origin-0"),
            "others stay"
        );
        assert!(!h.is_healthy("no-such-origin", t0));
    }

    #[test]
    fn a_blip_shorter_than_the_grace_moves_nothing_but_arms_the_rejoin() {
        let t0 = Instant::now();
        let mut h = OriginHealth::new(ids(2), timing(), t0);
        h.link_up("origin-0", t0);
        h.link_up("origin-1", t0);
        h.link_down("origin-1", t0 + 100 * MS);
        h.link_up("origin-1", t0 + 400 * MS);
        // Back within the grace, but a lost link must now stay up for `rejoin`.
        assert!(!h.is_healthy("origin-1", t0 + 1000 * MS));
        assert_eq!(h.next_change(t0 + 1000 * MS), Some(t0 + 30_400 * MS));
        assert!(h.is_healthy("origin-1", t0 + 30_400 * MS));
    }

    #[test]
    fn a_flapping_origin_never_becomes_healthy_and_gets_no_grace() {
        let t0 = Instant::now();
        let mut h = OriginHealth::new(ids(2), timing(), t0);
        h.link_up("origin-0", t0);
        h.link_up("origin-1", t0);
        let room = room_owned_by(2, "origin-1");
        let mut t = t0 + 1000 * MS;
        h.link_down("origin-1", t);
        for _ in 0..20 {
            t += 10_000 * MS;
            h.link_up("origin-1", t);
            assert_eq!(h.owner(room, t + 9_000 * MS), Some("origin-0"));
            t += 10_000 * MS;
            h.link_down("origin-1", t);
            assert!(!h.is_healthy("origin-1", t), "no grace during rejoin");
            assert_eq!(h.owner(room, t), Some("origin-0"));
        }
        // Finally stable: the room moves back by hash after the rejoin period.
        h.link_up("origin-1", t + MS);
        assert_eq!(h.owner(room, t + 30_000 * MS), Some("origin-0"));
        assert_eq!(h.owner(room, t + 30_001 * MS), Some("origin-1"));
    }

    #[test]
    fn with_no_healthy_origin_a_rejoining_one_owns_the_rooms_at_once() {
        let t0 = Instant::now();
        let mut h = OriginHealth::new(ids(1), timing(), t0);
        h.link_up("origin-0", t0);
        h.link_down("origin-0", t0 + 1000 * MS);
        assert_eq!(h.owner(RoomId(7), t0 + 2000 * MS), None, "nothing up");
        // The only origin restarted: it is in its rejoin period, and still the best there is.
        h.link_up("origin-0", t0 + 3000 * MS);
        assert!(!h.is_healthy("origin-0", t0 + 3000 * MS));
        assert_eq!(h.owner(RoomId(7), t0 + 3000 * MS), Some("origin-0"));
    }

    #[test]
    fn ownership_reports_each_move_once_and_parties_agree() {
        let t0 = Instant::now();
        let make = || {
            let mut h = OriginHealth::new(ids(2), timing(), t0);
            h.link_up("origin-0", t0);
            h.link_up("origin-1", t0);
            Ownership::new(h)
        };
        let (mut edge, mut packager) = (make(), make());
        let moving = room_owned_by(2, "origin-0");
        let staying = room_owned_by(2, "origin-1");
        for o in [&mut edge, &mut packager] {
            assert_eq!(o.owner(moving, t0), Some("origin-0"));
            assert_eq!(o.owner(staying, t0), Some("origin-1"));
        }
        // The two parties see the kill at slightly different times.
        edge.health_mut().link_down("origin-0", t0 + 2000 * MS);
        packager.health_mut().link_down("origin-0", t0 + 2300 * MS);
        assert!(edge.refresh(t0 + 2999 * MS).is_empty(), "grace");
        // Until refresh reports the move, the tracked room keeps its announced owner.
        assert_eq!(edge.owner(moving, t0 + 3000 * MS), Some("origin-0"));
        let moved = vec![OwnerChange {
            room: moving,
            from: "origin-0".into(),
            to: Some("origin-1".into()),
        }];
        assert_eq!(edge.refresh(t0 + 3000 * MS), moved);
        assert!(edge.refresh(t0 + 3001 * MS).is_empty(), "reported once");
        assert_eq!(packager.refresh(t0 + 3300 * MS), moved);
        for o in [&mut edge, &mut packager] {
            assert_eq!(o.owner(moving, t0 + 4000 * MS), Some("origin-1"));
            assert_eq!(o.owner(staying, t0 + 4000 * MS), Some("origin-1"));
        }
        // A party that first sees the room now agrees with those that tracked the move.
        let mut late = make();
        late.health_mut().link_down("origin-0", t0 + 2000 * MS);
        assert_eq!(late.owner(moving, t0 + 4000 * MS), Some("origin-1"));
        // A forgotten room is not reported.
        edge.forget(moving);
        edge.health_mut().link_down("origin-1", t0 + 5000 * MS);
        assert_eq!(
            edge.refresh(t0 + 6000 * MS),
            vec![OwnerChange {
                room: staying,
                from: "origin-1".into(),
                to: None,
            }]
        );
        assert!(edge.refresh(t0 + 6001 * MS).is_empty());
        // No origin healthy: the room gets one as soon as one returns, rejoin period or not.
        assert_eq!(edge.owner(staying, t0 + 6500 * MS), None);
        edge.health_mut().link_up("origin-1", t0 + 7000 * MS);
        assert!(
            edge.refresh(t0 + 7000 * MS).is_empty(),
            "no previous owner to report"
        );
        assert_eq!(edge.owner(staying, t0 + 7000 * MS), Some("origin-1"));
        assert!(edge.refresh(t0 + 37_000 * MS).is_empty());
    }
}
