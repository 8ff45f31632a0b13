//! Sans-IO decisions about time: peer liveness, uplink reconnect backoff, the room-existence
//! cache and participant id allocation. Every method takes `now` explicitly.

use amphi_protocol::ids::{EDGE_INDEX_BITS, MAX_EDGE_INDEX};
use amphi_protocol::{ParticipantId, RoomId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A peer that sends nothing for this long is removed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of the edge's `ice_connect_timeout_secs`: a peer whose ICE+DTLS has not connected
/// this long after the answer is removed.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a peer is being removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent `DELETE` on its WHIP session.
    Deleted,
    /// No datagram for [`IDLE_TIMEOUT`].
    Idle,
    /// ICE+DTLS never connected within the connect timeout (see [`PeerLiveness::new`]).
    NeverConnected,
    /// ICE reported the connection lost, or DTLS closed.
    Disconnected,
    /// The WebRTC stack failed.
    RtcFailed,
    /// The DTLS handshake failed (the reason is logged when it happens).
    DtlsFailed,
    /// The edge is shutting down.
    Shutdown,
}

impl CloseReason {
    /// Short text for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Deleted => "deleted",
            CloseReason::Idle => "idle",
            CloseReason::NeverConnected => "never_connected",
            CloseReason::Disconnected => "disconnected",
            CloseReason::RtcFailed => "rtc_failed",
            CloseReason::DtlsFailed => "dtls_failed",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// Liveness of one peer: when it was created, last heard from, and whether it connected.
#[derive(Clone, Debug)]
pub struct PeerLiveness {
    created: Instant,
    connect_timeout: Duration,
    last_rx: Instant,
    connected: bool,
}

impl PeerLiveness {
    /// A peer created (answer sent) at `now`, removed if ICE+DTLS has not connected within
    /// `connect_timeout`.
    pub fn new(now: Instant, connect_timeout: Duration) -> Self {
        PeerLiveness {
            created: now,
            connect_timeout,
            last_rx: now,
            connected: false,
        }
    }

    /// A datagram from this peer arrived at `now`.
    pub fn on_traffic(&mut self, now: Instant) {
        if now > self.last_rx {
            self.last_rx = now;
        }
    }

    /// ICE+DTLS connected. Returns true the first time only.
    pub fn on_connected(&mut self) -> bool {
        !std::mem::replace(&mut self.connected, true)
    }

    /// Whether ICE+DTLS connected.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether the peer must be removed at `now`, and why.
    pub fn check(&self, now: Instant) -> Option<CloseReason> {
        if !self.connected && now.saturating_duration_since(self.created) >= self.connect_timeout {
            return Some(CloseReason::NeverConnected);
        }
        if now.saturating_duration_since(self.last_rx) >= IDLE_TIMEOUT {
            return Some(CloseReason::Idle);
        }
        None
    }
}

/// Exponential reconnect backoff: `min`, `2*min`, ... capped at `max`; reset after a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// The uplink schedule: 100 ms doubling up to 5 s.
    pub fn uplink() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// A schedule from `min` doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// An attempt failed at `now`: when to try again.
    pub fn on_failure(&mut self, now: Instant) -> Instant {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        now + wait
    }

    /// An attempt succeeded: the next failure waits `min` again.
    pub fn on_success(&mut self) {
        self.next = self.min;
    }
}

/// What the geo-router said about a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoomStatusAnswer {
    /// The room exists and is live.
    Live,
    /// The room does not exist or has ended.
    Gone,
}

/// Positive cache of "room is live" answers from the geo-router (negative answers are not cached,
/// so a freshly created room is usable at once).
#[derive(Debug)]
pub struct RoomCache {
    ttl: Duration,
    live_until: HashMap<RoomId, Instant>,
}

/// Entries beyond which expired ones are pruned on insert.
const ROOM_CACHE_PRUNE_AT: usize = 1024;

impl RoomCache {
    /// A cache keeping positive answers for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        RoomCache {
            ttl,
            live_until: HashMap::new(),
        }
    }

    /// `Some(Live)` if a fresh positive answer is cached, else `None` (ask the router).
    pub fn lookup(&self, room: RoomId, now: Instant) -> Option<RoomStatusAnswer> {
        match self.live_until.get(&room) {
            Some(until) if now < *until => Some(RoomStatusAnswer::Live),
            _ => None,
        }
    }

    /// Record the router's answer at `now`.
    pub fn record(&mut self, room: RoomId, answer: RoomStatusAnswer, now: Instant) {
        match answer {
            RoomStatusAnswer::Live => {
                if self.live_until.len() >= ROOM_CACHE_PRUNE_AT {
                    self.live_until.retain(|_, until| now < *until);
                }
                self.live_until.insert(room, now + self.ttl);
            }
            RoomStatusAnswer::Gone => {
                self.live_until.remove(&room);
            }
        }
    }

    /// Number of cached entries (fresh or not).
    pub fn len(&self) -> usize {
        self.live_until.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.live_until.is_empty()
    }
}

/// Highest counter of a participant id (the low 20 bits).
const MAX_COUNTER: u32 = (1 << (32 - EDGE_INDEX_BITS)) - 1;
/// Ids tried at most per allocation when the next ones are still in use.
const MAX_TRIES: usize = 64;

/// Allocates participant ids `edge_index << 20 | counter`, counter in `1..2^20`, wrapping
/// (after 1,048,575 sessions on one edge); after a wrap, ids still held by a live participant
/// are skipped.
#[derive(Debug)]
pub struct ParticipantIds {
    index: u16,
    counter: u32,
}

impl ParticipantIds {
    /// Allocator for the edge with this index (its low 12 bits; configs are checked for
    /// [`MAX_EDGE_INDEX`]).
    pub fn new(index: u16) -> Self {
        ParticipantIds {
            index: index & MAX_EDGE_INDEX,
            counter: 0,
        }
    }

    /// The next id that `in_use` does not claim (of the next [`MAX_TRIES`]; the last of
    /// them if all are).
    pub fn allocate(&mut self, in_use: impl Fn(ParticipantId) -> bool) -> ParticipantId {
        let mut id = self.next();
        for _ in 1..MAX_TRIES {
            if !in_use(id) {
                break;
            }
            id = self.next();
        }
        id
    }

    fn next(&mut self) -> ParticipantId {
        self.counter = (self.counter % MAX_COUNTER) + 1;
        ParticipantId(u32::from(self.index) << (32 - EDGE_INDEX_BITS) | self.counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_removes_idle_and_never_connected_peers() {
        let t0 = Instant::now();
        let mut p = PeerLiveness::new(t0, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(p.check(t0 + Duration::from_secs(5)), None);
        p.on_traffic(t0 + Duration::from_secs(10));
        assert_eq!(p.check(t0 + Duration::from_millis(14_999)), None);
        assert_eq!(
            p.check(t0 + Duration::from_secs(15)),
            Some(CloseReason::NeverConnected)
        );
        assert!(p.on_connected());
        assert!(!p.on_connected(), "only the first connect counts");
        assert!(p.is_connected());
        assert_eq!(p.check(t0 + Duration::from_secs(39)), None);
        assert_eq!(
            p.check(t0 + Duration::from_secs(10) + IDLE_TIMEOUT),
            Some(CloseReason::Idle)
        );
        // Traffic keeps it alive indefinitely.
        let mut now = t0;
        for _ in 0..100 {
            now += Duration::from_secs(20);
            p.on_traffic(now);
            assert_eq!(p.check(now + Duration::from_secs(1)), None);
        }
        // Out-of-order timestamps never move last_rx backwards.
        p.on_traffic(t0);
        assert_eq!(p.check(now + Duration::from_secs(29)), None);
    }

    #[test]
    fn connect_timeout_is_the_configured_one() {
        let t0 = Instant::now();
        let p = PeerLiveness::new(t0, Duration::from_secs(2));
        assert_eq!(p.check(t0 + Duration::from_millis(1999)), None);
        assert_eq!(
            p.check(t0 + Duration::from_secs(2)),
            Some(CloseReason::NeverConnected)
        );
        // Traffic without a connection (STUN only) does not keep it.
        let mut p = PeerLiveness::new(t0, Duration::from_secs(40));
        p.on_traffic(t0 + Duration::from_secs(20));
        assert_eq!(p.check(t0 + Duration::from_secs(39)), None);
        assert_eq!(
            p.check(t0 + Duration::from_secs(40)),
            Some(CloseReason::NeverConnected)
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let t0 = Instant::now();
        let mut b = Backoff::uplink();
        let waits: Vec<u64> = (0..9)
            .map(|_| b.on_failure(t0).duration_since(t0).as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.on_success();
        assert_eq!(b.on_failure(t0) - t0, Duration::from_millis(100));
    }

    #[test]
    fn room_cache_keeps_positive_answers_for_the_ttl_only() {
        let t0 = Instant::now();
        let mut c = RoomCache::new(Duration::from_secs(5));
        let r = RoomId(7);
        assert_eq!(c.lookup(r, t0), None);
        c.record(r, RoomStatusAnswer::Gone, t0);
        assert_eq!(c.lookup(r, t0), None, "negative answers are not cached");
        c.record(r, RoomStatusAnswer::Live, t0);
        assert_eq!(
            c.lookup(r, t0 + Duration::from_millis(4999)),
            Some(RoomStatusAnswer::Live)
        );
        assert_eq!(c.lookup(r, t0 + Duration::from_secs(5)), None);
        c.record(r, RoomStatusAnswer::Gone, t0);
        assert_eq!(c.lookup(r, t0), None, "a room seen ended is forgotten");
    }

    #[test]
    fn room_cache_prunes_expired_entries() {
        let t0 = Instant::now();
        let mut c = RoomCache::new(Duration::from_secs(5));
        for i in 0..ROOM_CACHE_PRUNE_AT as u64 {
            c.record(RoomId(i), RoomStatusAnswer::Live, t0);
        }
        assert_eq!(c.len(), ROOM_CACHE_PRUNE_AT);
        c.record(
            RoomId(u64::MAX),
            RoomStatusAnswer::Live,
            t0 + Duration::from_secs(6),
        );
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn participant_ids_carry_the_edge_index_wrap_without_zero_and_skip_ids_in_use() {
        let free = |_| false;
        let mut ids = ParticipantIds::new(3);
        assert_eq!(ids.allocate(free), ParticipantId(0x0030_0001));
        assert_eq!(ids.allocate(free), ParticipantId(0x0030_0002));
        ids.counter = 0x000f_fffe;
        assert_eq!(ids.allocate(free), ParticipantId(0x003f_ffff));
        assert_eq!(ids.allocate(free), ParticipantId(0x0030_0001));
        // The highest index fills the top 12 bits; the counter never reaches into them.
        let mut top = ParticipantIds::new(MAX_EDGE_INDEX);
        top.counter = MAX_COUNTER - 1;
        assert_eq!(top.allocate(free), ParticipantId(0xffff_ffff));
        assert_eq!(top.allocate(free), ParticipantId(0xfff0_0001));
        // After a wrap, ids still held are skipped.
        let held = [ParticipantId(0x0030_0002), ParticipantId(0x0030_0003)];
        assert_eq!(
            ids.allocate(|id| held.contains(&id)),
            ParticipantId(0x0030_0004)
        );
        // Distinct edges never share an id.
        let (mut a, mut b) = (ParticipantIds::new(1), ParticipantIds::new(2));
        assert_ne!(a.allocate(free), b.allocate(free));
    }
}
