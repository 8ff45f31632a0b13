//! Moving listeners up a tier as seats free (sans-IO).
//!
//! The router places each new listener on the best tier with a seat on its edge (interactive,
//! then push, then HLS; `docs/signaling.md`, "Listener tiers"). When a room shrinks, the
//! listeners it placed on push or HLS would stay there; this planner offers them the freed
//! seats. A listener tells the edge how it hears the room (`listening`); the planner sends
//! `move` offers and counts each offered seat as taken until the listener says it plays the new
//! tier, declines, or the offer expires. Growth moves nobody down: a listener keeps the tier it
//! has, and only newcomers land lower.
//!
//! Decisions (all with an explicit `now`):
//! * seats per room are the router's thresholds for this edge (`HeartbeatAnswer::tiers`) minus
//!   the edge's own counts (WebRTC receive sessions, push listeners) minus offers in flight;
//! * a seat must stay free for [`SETTLE`] before it is offered (a listener whose WebRTC session
//!   restarts frees its seat for a moment only);
//! * push listeners are offered interactive seats before HLS listeners, then longest-waiting
//!   first; an HLS listener takes an interactive seat if one is free, else a push seat;
//! * at most [`MOVES_PER_POLL`] offers per room at a time; the room's remaining free seats then
//!   settle again before the next offers;
//! * an offer not taken within [`OFFER_TIMEOUT`], or declined, is not repeated to that
//!   listener for [`DECLINED_FOR`].

use amphi_protocol::api::RoomTiers;
use amphi_protocol::room::ListenTier;
use amphi_protocol::{ParticipantId, RoomId};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// How long a seat must stay free before it is offered.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How long an offered seat is held for the listener.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a listener who declined (or let an offer expire) is not offered again.
pub const DECLINED_FOR: Duration = Duration::from_secs(30);
/// Most offers per room per poll.
pub const MOVES_PER_POLL: usize = 20;

/// A room's listeners on this edge, by tier, as the edge counts them itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierCounts {
    /// WebRTC receive sessions (what the heartbeat reports as `sessions`).
    pub interactive: u32,
    /// Push listeners (the heartbeat's `push`).
    pub push: u32,
}

/// One move to offer: send `participant` a `move` to `tier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    /// Who.
    pub participant: ParticipantId,
    /// Where to.
    pub tier: ListenTier,
}

#[derive(Clone, Copy, Debug)]
struct Listener {
    room: RoomId,
    tier: ListenTier,
    since: Instant,
    /// An offer in flight: its tier and until when the seat is held.
    offer: Option<(ListenTier, Instant)>,
    /// Not offered anything before this.
    quiet_until: Option<Instant>,
}

/// The planner: movable listeners below the interactive tier, the rooms' thresholds, and the
/// offers in flight.
#[derive(Debug, Default)]
pub struct TierMoves {
    thresholds: HashMap<RoomId, (u32, u32)>,
    listeners: HashMap<ParticipantId, Listener>,
    /// Since when each room has had a seat a waiting listener could take.
    open_since: HashMap<RoomId, Instant>,
    /// Offers declined or expired so far.
    declined: u64,
}

impl TierMoves {
    /// An empty planner.
    pub fn new() -> Self {
        Self::default()
    }

    /// The router's thresholds for this edge's rooms (each heartbeat answer replaces them; a
    /// room left out gets no moves).
    pub fn set_thresholds(&mut self, tiers: &[RoomTiers]) {
        self.thresholds = tiers
            .iter()
            .map(|t| (t.room, (t.interactive, t.push)))
            .collect();
    }

    /// `participant` of `room` plays `tier` now; `movable` says whether it may be moved (a
    /// listener who chose its tier itself is not). Ends its offer in flight: taken if it
    /// names the offered tier, else declined.
    pub fn listening(
        &mut self,
        participant: ParticipantId,
        room: RoomId,
        tier: ListenTier,
        movable: bool,
        now: Instant,
    ) {
        let previous = self.listeners.remove(&participant);
        if !movable || tier == ListenTier::Interactive {
            return;
        }
        let declined = previous
            .and_then(|p| p.offer)
            .is_some_and(|(offered, _)| offered != tier);
        self.declined += u64::from(declined);
        let since = previous.filter(|p| p.room == room).map_or(now, |p| p.since);
        self.listeners.insert(
            participant,
            Listener {
                room,
                tier,
                since,
                offer: None,
                quiet_until: declined.then_some(now + DECLINED_FOR),
            },
        );
    }

    /// `participant` left (its offer's seat is free again).
    pub fn forget(&mut self, participant: ParticipantId) {
        self.listeners.remove(&participant);
    }

    /// Offers declined, or not taken within [`OFFER_TIMEOUT`], so far.
    pub fn declined(&self) -> u64 {
        self.declined
    }

    /// Rooms with a movable listener waiting below the interactive tier: the heartbeat lists
    /// them (with no sessions) so the router sends their thresholds.
    pub fn waiting_rooms(&self) -> Vec<RoomId> {
        let mut rooms: Vec<RoomId> = self.listeners.values().map(|l| l.room).collect();
        rooms.sort_unstable();
        rooms.dedup();
        rooms
    }

    /// The moves to offer now, given each room's counts on this edge.
    pub fn poll(&mut self, now: Instant, counts: impl Fn(RoomId) -> TierCounts) -> Vec<Move> {
        // Offers not taken in time: the seat is free again and the listener rests.
        for l in self.listeners.values_mut() {
            if l.offer.is_some_and(|(_, until)| now >= until) {
                self.declined += 1;
                l.offer = None;
                l.quiet_until = Some(now + DECLINED_FOR);
            }
        }
        let mut by_room: BTreeMap<RoomId, Vec<(ParticipantId, Listener)>> = BTreeMap::new();
        for (&pid, l) in &self.listeners {
            by_room.entry(l.room).or_default().push((pid, *l));
        }
        let mut moves = Vec::new();
        for (room, mut waiting) in by_room {
            let Some(&(interactive_seats, push_seats)) = self.thresholds.get(&room) else {
                self.open_since.remove(&room);
                continue;
            };
            let c = counts(room);
            let offered = |tier| {
                waiting
                    .iter()
                    .filter(|(_, l)| l.offer.is_some_and(|(t, _)| t == tier))
                    .count() as u32
            };
            let mut free_interactive =
                interactive_seats.saturating_sub(c.interactive + offered(ListenTier::Interactive));
            let mut free_push = push_seats.saturating_sub(c.push + offered(ListenTier::Push));
            waiting.retain(|(_, l)| l.offer.is_none() && l.quiet_until.is_none_or(|q| now >= q));
            let could_move = waiting
                .iter()
                .any(|(_, l)| free_interactive > 0 || (l.tier == ListenTier::Hls && free_push > 0));
            if !could_move {
                self.open_since.remove(&room);
                continue;
            }
            let since = *self.open_since.entry(room).or_insert(now);
            if now.saturating_duration_since(since) < SETTLE {
                continue;
            }
            waiting.sort_by_key(|(pid, l)| (l.tier, l.since, *pid));
            let before = moves.len();
            for (pid, l) in waiting {
                if moves.len() - before >= MOVES_PER_POLL {
                    break;
                }
                let to = if free_interactive > 0 {
                    free_interactive -= 1;
                    ListenTier::Interactive
                } else if l.tier == ListenTier::Hls && free_push > 0 {
                    free_push -= 1;
                    ListenTier::Push
                } else {
                    continue;
                };
                if let Some(l) = self.listeners.get_mut(&pid) {
                    l.offer = Some((to, now + OFFER_TIMEOUT));
                }
                moves.push(Move {
                    participant: pid,
                    tier: to,
                });
            }
            self.open_since.remove(&room);
        }
        moves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: RoomId = RoomId(7);

    fn planner(interactive: u32, push: u32) -> TierMoves {
        let mut p = TierMoves::new();
        p.set_thresholds(&[RoomTiers {
            room: ROOM,
            interactive,
            push,
        }]);
        p
    }

    fn counts(interactive: u32, push: u32) -> impl Fn(RoomId) -> TierCounts {
        move |_| TierCounts { interactive, push }
    }

    fn pid(n: u32) -> ParticipantId {
        ParticipantId(n)
    }

    #[test]
    fn a_freed_seat_is_offered_after_it_settles_push_listeners_first() {
        let t0 = Instant::now();
        let mut p = planner(2, 2);
        p.listening(pid(1), ROOM, ListenTier::Hls, true, t0);
        p.listening(
            pid(2),
            ROOM,
            ListenTier::Push,
            true,
            t0 + Duration::from_secs(1),
        );
        // Full: nothing to offer.
        assert!(p.poll(t0, counts(2, 2)).is_empty());
        // One interactive seat frees: not offered before it settles.
        let t1 = t0 + Duration::from_secs(5);
        assert!(p.poll(t1, counts(1, 2)).is_empty());
        let moves = p.poll(t1 + SETTLE, counts(1, 2));
        // The push listener goes first, though the HLS listener waited longer.
        assert_eq!(
            moves,
            vec![Move {
                participant: pid(2),
                tier: ListenTier::Interactive
            }]
        );
        // The seat is held for it: nothing more while the edge's counts lag.
        assert!(p.poll(t1 + SETTLE * 3, counts(1, 2)).is_empty());
        // It took the seat (the edge counts it) and left push: the HLS listener gets push.
        p.listening(pid(2), ROOM, ListenTier::Interactive, true, t1 + SETTLE * 4);
        assert!(p.poll(t1 + SETTLE * 4, counts(2, 1)).is_empty());
        assert_eq!(
            p.poll(t1 + SETTLE * 5, counts(2, 1)),
            vec![Move {
                participant: pid(1),
                tier: ListenTier::Push
            }]
        );
    }

    #[test]
    fn a_seat_that_frees_for_a_moment_is_not_offered() {
        let t0 = Instant::now();
        let mut p = planner(1, 0);
        p.listening(pid(1), ROOM, ListenTier::Hls, true, t0);
        assert!(p.poll(t0, counts(0, 0)).is_empty());
        // Taken again before it settled (a WebRTC session restarting).
        assert!(p.poll(t0 + SETTLE / 2, counts(1, 0)).is_empty());
        assert!(p.poll(t0 + SETTLE * 2, counts(0, 0)).is_empty());
        assert_eq!(p.poll(t0 + SETTLE * 3, counts(0, 0)).len(), 1);
    }

    #[test]
    fn an_hls_listener_takes_an_interactive_seat_before_a_push_seat() {
        let t0 = Instant::now();
        let mut p = planner(3, 3);
        p.listening(pid(1), ROOM, ListenTier::Hls, true, t0);
        p.listening(pid(2), ROOM, ListenTier::Hls, true, t0);
        p.poll(t0, counts(2, 3));
        let moves = p.poll(t0 + SETTLE, counts(2, 2));
        assert_eq!(
            moves,
            vec![
                Move {
                    participant: pid(1),
                    tier: ListenTier::Interactive
                },
                Move {
                    participant: pid(2),
                    tier: ListenTier::Push
                }
            ]
        );
    }

    #[test]
    fn declined_or_expired_offers_rest_then_are_made_again() {
        let t0 = Instant::now();
        let mut p = planner(1, 0);
        p.listening(pid(1), ROOM, ListenTier::Push, true, t0);
        p.poll(t0, counts(0, 1));
        assert_eq!(p.poll(t0 + SETTLE, counts(0, 1)).len(), 1);
        // It could not connect and says it still plays push: declined.
        let t1 = t0 + SETTLE * 2;
        p.listening(pid(1), ROOM, ListenTier::Push, true, t1);
        assert_eq!(p.declined(), 1);
        p.poll(t1, counts(0, 1));
        assert!(p.poll(t1 + SETTLE, counts(0, 1)).is_empty());
        let t2 = t1 + DECLINED_FOR;
        p.poll(t2, counts(0, 1));
        assert_eq!(p.poll(t2 + SETTLE, counts(0, 1)).len(), 1, "offered again");
        // This time it never answers: after the timeout the seat is free and it rests.
        let t3 = t2 + SETTLE + OFFER_TIMEOUT;
        assert!(p.poll(t3, counts(0, 1)).is_empty());
        assert_eq!(p.declined(), 2);
        p.poll(t3 + DECLINED_FOR, counts(0, 1));
        assert_eq!(p.poll(t3 + DECLINED_FOR + SETTLE, counts(0, 1)).len(), 1);
    }

    #[test]
    fn pinned_listeners_unknown_rooms_and_departed_listeners_are_never_moved() {
        let t0 = Instant::now();
        let mut p = planner(5, 5);
        p.listening(pid(1), ROOM, ListenTier::Hls, false, t0);
        p.listening(pid(2), RoomId(8), ListenTier::Hls, true, t0);
        p.listening(pid(3), ROOM, ListenTier::Push, true, t0);
        p.forget(pid(3));
        assert_eq!(p.waiting_rooms(), vec![RoomId(8)]);
        p.poll(t0, counts(0, 0));
        assert!(p.poll(t0 + SETTLE, counts(0, 0)).is_empty());
        // The router sends room 8's thresholds: its listener moves.
        p.set_thresholds(&[RoomTiers {
            room: RoomId(8),
            interactive: 1,
            push: 0,
        }]);
        p.poll(t0 + SETTLE * 2, counts(0, 0));
        assert_eq!(p.poll(t0 + SETTLE * 3, counts(0, 0)).len(), 1);
    }

    #[test]
    fn growth_moves_nobody_and_offers_are_bounded_per_poll() {
        let t0 = Instant::now();
        let mut p = planner(1_000, 0);
        for n in 0..100 {
            p.listening(pid(n), ROOM, ListenTier::Push, true, t0);
        }
        // The room grew past its push seats: nobody is moved down, nobody up.
        p.set_thresholds(&[RoomTiers {
            room: ROOM,
            interactive: 10,
            push: 50,
        }]);
        p.poll(t0, counts(10, 100));
        assert!(p.poll(t0 + SETTLE, counts(10, 100)).is_empty());
        // It shrinks to nothing: offers go out MOVES_PER_POLL at a time.
        p.set_thresholds(&[RoomTiers {
            room: ROOM,
            interactive: 1_000,
            push: 0,
        }]);
        p.poll(t0 + SETTLE * 2, counts(0, 100));
        assert_eq!(
            p.poll(t0 + SETTLE * 3, counts(0, 100)).len(),
            MOVES_PER_POLL
        );
        p.poll(t0 + SETTLE * 4, counts(0, 100));
        assert_eq!(
            p.poll(t0 + SETTLE * 5, counts(0, 100)).len(),
            MOVES_PER_POLL
        );
    }
}
