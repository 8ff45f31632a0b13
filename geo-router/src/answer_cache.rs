//! Whole `/v1/route` answers remembered (sans-IO). An answer is a function of the room, the
//! role, how the client address was learnt and where the databases put it ([`AnswerKey`]), the
//! router's configuration, and the edge registry's candidates at the instant of the request. The
//! registry's [`generation`](crate::registry::Registry::generation) changes with every change that
//! can change the candidates, and [`stable_until`](crate::registry::Registry::stable_until) says
//! when time alone will (an edge missing its heartbeats): an answer is served again only at the
//! generation it was made at, and before that instant. Answers carry no token or anything else
//! of the client's: two clients placed alike get the same bytes.
//!
//! Requests with `avoid` or a dev-mode `region` are not remembered (the caller decides).
//!
//! [`AnswerMemo`] is a small table in front of the cache, one per worker thread, holding each
//! answer with everything it must still match ([`MemoStamp`]) and the instant it holds until,
//! so that a repeated answer is served without any lock or shared write.

use crate::geoip::Place;
use amphi_protocol::RoomId;
use std::collections::HashMap;
use std::time::Instant;

/// Most answers remembered. When full, those of other generations or past their instant go,
/// and if none does, all.
pub const MAX_CACHED_ANSWERS: usize = 4096;

/// Where the databases put the client, as a key (coordinates by their bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PlaceKey {
    NotPublic,
    Unknown,
    Located {
        latitude: u64,
        longitude: u64,
        country: [u8; 2],
        source: usize,
    },
}

impl From<Place> for PlaceKey {
    fn from(p: Place) -> Self {
        match p {
            Place::NotPublic => PlaceKey::NotPublic,
            Place::Unknown => PlaceKey::Unknown,
            Place::Located {
                point,
                country,
                source,
            } => PlaceKey::Located {
                latitude: point.latitude.to_bits(),
                longitude: point.longitude.to_bits(),
                country,
                source,
            },
        }
    }
}

/// What, besides the registry and the configuration, a route answer depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AnswerKey {
    room: RoomId,
    listener: bool,
    explain: bool,
    source: &'static str,
    place: PlaceKey,
}

impl AnswerKey {
    /// A cheap mix of the key's fields (for [`AnswerMemo`]'s slot; equality decides a hit).
    fn mix(&self) -> u64 {
        let place = match self.place {
            PlaceKey::NotPublic => 1,
            PlaceKey::Unknown => 2,
            PlaceKey::Located {
                latitude,
                longitude,
                source,
                ..
            } => latitude ^ longitude.rotate_left(29) ^ source as u64,
        };
        let fields = self.room.0
            ^ place.rotate_left(17)
            ^ (self.source.len() as u64) << 1
            ^ u64::from(self.listener)
            ^ u64::from(self.explain) << 2;
        // Fibonacci hashing: the high bits of the product are well mixed.
        fields.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// The key of an answer for `room` to a listener (or a speaker or host), whose address was
    /// learnt as `source` says and placed at `place`; `explain`: the answer says why.
    pub fn new(
        room: RoomId,
        listener: bool,
        explain: bool,
        source: &'static str,
        place: Place,
    ) -> Self {
        AnswerKey {
            room,
            listener,
            explain,
            source,
            place: place.into(),
        }
    }
}

#[derive(Debug)]
struct Entry<V> {
    generation: u64,
    until: Option<Instant>,
    value: V,
}

impl<V> Entry<V> {
    fn holds(&self, generation: u64, now: Instant) -> bool {
        self.generation == generation && self.until.is_none_or(|u| now < u)
    }
}

/// Remembered answers (`V`: the answer and what counting it needs), at most
/// [`MAX_CACHED_ANSWERS`].
#[derive(Debug)]
pub struct AnswerCache<V> {
    entries: HashMap<AnswerKey, Entry<V>>,
}

impl<V> Default for AnswerCache<V> {
    fn default() -> Self {
        AnswerCache {
            entries: HashMap::new(),
        }
    }
}

impl<V> AnswerCache<V> {
    /// The answer for `key` if it was made at the registry's `generation` and `now` is before
    /// the instant it holds until.
    pub fn get(&self, key: &AnswerKey, generation: u64, now: Instant) -> Option<&V> {
        self.entries
            .get(key)
            .filter(|e| e.holds(generation, now))
            .map(|e| &e.value)
    }

    /// [`AnswerCache::get`], with the instant the answer holds until (`None`: until the
    /// registry changes).
    pub fn get_with_until(
        &self,
        key: &AnswerKey,
        generation: u64,
        now: Instant,
    ) -> Option<(V, Option<Instant>)>
    where
        V: Clone,
    {
        self.entries
            .get(key)
            .filter(|e| e.holds(generation, now))
            .map(|e| (e.value.clone(), e.until))
    }

    /// Remember `value` for `key`, made at `generation` at `now`, holding until `until` (the
    /// registry's [`stable_until`](crate::registry::Registry::stable_until) at `now`).
    pub fn put(
        &mut self,
        key: AnswerKey,
        generation: u64,
        now: Instant,
        until: Option<Instant>,
        value: V,
    ) {
        if self.entries.len() >= MAX_CACHED_ANSWERS && !self.entries.contains_key(&key) {
            self.entries.retain(|_, e| e.holds(generation, now));
            if self.entries.len() >= MAX_CACHED_ANSWERS {
                self.entries.clear();
            }
        }
        self.entries.insert(
            key,
            Entry {
                generation,
                until,
                value,
            },
        );
    }

    /// Answers remembered now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Slots of an [`AnswerMemo`] (answers for as many room, role and place combinations).
pub const MEMO_SLOTS: usize = 256;

/// What a memo entry was made under and must still match to be served: whose it is (one
/// router's state; threads can serve several in one process), the registry's generation, and
/// how many rooms this router had ended (an end through this router stops its routes at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoStamp {
    /// The router state the answer belongs to.
    pub owner: u64,
    /// The registry's [`generation`](crate::registry::Registry::generation).
    pub generation: u64,
    /// Rooms ended through this router so far.
    pub ends: u64,
}

#[derive(Debug)]
struct MemoEntry<V> {
    key: AnswerKey,
    stamp: MemoStamp,
    until: Instant,
    value: V,
}

/// One thread's answers (sans-IO): a direct-mapped table of [`MEMO_SLOTS`], each answer held
/// with its [`MemoStamp`] and served while the stamp is current and before its instant (the
/// registry's [`stable_until`](crate::registry::Registry::stable_until) or the end of the room's
/// trusted liveness, whichever is first). A new answer for a taken slot replaces the old one.
#[derive(Debug)]
pub struct AnswerMemo<V> {
    slots: Vec<Option<MemoEntry<V>>>,
}

impl<V> Default for AnswerMemo<V> {
    fn default() -> Self {
        AnswerMemo {
            slots: std::iter::repeat_with(|| None).take(MEMO_SLOTS).collect(),
        }
    }
}

impl<V> AnswerMemo<V> {
    fn slot(key: &AnswerKey) -> usize {
        // The top bits of the mix: MEMO_SLOTS is a power of two.
        (key.mix() >> (64 - MEMO_SLOTS.trailing_zeros())) as usize
    }

    /// The answer for `key` if it was made under `stamp` and `now` is before its instant.
    pub fn get(&self, key: &AnswerKey, stamp: MemoStamp, now: Instant) -> Option<&V> {
        self.slots[Self::slot(key)]
            .as_ref()
            .filter(|e| e.key == *key && e.stamp == stamp && now < e.until)
            .map(|e| &e.value)
    }

    /// Remember `value` for `key`, made under `stamp`, until `until`.
    pub fn put(&mut self, key: AnswerKey, stamp: MemoStamp, until: Instant, value: V) {
        self.slots[Self::slot(&key)] = Some(MemoEntry {
            key,
            stamp,
            until,
            value,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Registry, HEARTBEAT_INTERVAL, MISSED_HEARTBEATS};
    use crate::select::GeoPoint;
    use amphi_protocol::api::{EdgeHeartbeat, RoomLoad};
    use amphi_protocol::config::known_region;
    use std::time::Duration;

    const ROOM: RoomId = RoomId(7);

    fn beat(id: &str, region: &str, cpu_load: f32) -> EdgeHeartbeat {
        let r = known_region(region).unwrap();
        EdgeHeartbeat {
            id: id.into(),
            region: region.into(),
            latitude: r.latitude,
            longitude: r.longitude,
            public_url: format!("http://{id}"),
            participants: 10,
            cpu_load,
            capacity: 100,
            rooms: vec![RoomLoad {
                room: ROOM,
                sessions: 4,
                push: 0,
            }],
            draining: false,
            relay_url: None,
            webtransport: None,
        }
    }

    fn located(latitude: f64) -> Place {
        Place::Located {
            point: GeoPoint {
                latitude,
                longitude: -77.0,
            },
            country: *b"US",
            source: 0,
        }
    }

    fn key() -> AnswerKey {
        AnswerKey::new(ROOM, true, false, "peer", located(39.0))
    }

    /// The cache as the route path drives it: the answer (here the candidates' ids) from the
    /// cache, else from the registry, remembered.
    fn route(cache: &mut AnswerCache<Vec<String>>, r: &Registry, now: Instant) -> Vec<String> {
        if let Some(v) = cache.get(&key(), r.generation(), now) {
            return v.clone();
        }
        let v: Vec<String> = r
            .candidates(ROOM, now)
            .iter()
            .map(|c| format!("{} {:.2}", c.id, c.load))
            .collect();
        cache.put(key(), r.generation(), now, r.stable_until(now), v.clone());
        v
    }

    #[test]
    fn an_answer_is_kept_while_heartbeats_say_the_same_and_dropped_when_they_do_not() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        let mut cache = AnswerCache::default();
        r.heartbeat(beat("a", "us-east", 0.1), t0).unwrap();
        r.heartbeat(beat("b", "eu-west", 0.1), t0).unwrap();
        assert_eq!(route(&mut cache, &r, t0), ["a 0.10", "b 0.10"]);
        // The same beats again: the answer stands.
        let t1 = t0 + HEARTBEAT_INTERVAL;
        let g = r.generation();
        r.heartbeat(beat("a", "us-east", 0.1), t1).unwrap();
        assert_eq!(r.generation(), g);
        assert!(cache.get(&key(), r.generation(), t1).is_some());
        // The load changes: the next request sees it.
        r.heartbeat(beat("a", "us-east", 0.9), t1).unwrap();
        assert!(cache.get(&key(), r.generation(), t1).is_none());
        assert_eq!(route(&mut cache, &r, t1), ["a 0.90", "b 0.10"]);
        // So does a drain asked by an operator.
        assert!(r.request_drain("a"));
        assert_eq!(route(&mut cache, &r, t1), ["b 0.10"]);
        // And the room's sessions on an edge (listeners beyond capacity go to HLS).
        let mut full = beat("b", "eu-west", 0.1);
        full.rooms[0].sessions = 500;
        r.heartbeat(full, t1).unwrap();
        assert!(cache.get(&key(), r.generation(), t1).is_none());
    }

    #[test]
    fn an_answer_ends_when_an_edge_in_it_misses_its_heartbeats() {
        let t0 = Instant::now();
        let out = HEARTBEAT_INTERVAL * MISSED_HEARTBEATS;
        let mut r = Registry::default();
        let mut cache = AnswerCache::default();
        r.heartbeat(beat("a", "us-east", 0.1), t0).unwrap();
        let t1 = t0 + HEARTBEAT_INTERVAL;
        r.heartbeat(beat("b", "eu-west", 0.1), t1).unwrap();
        assert_eq!(route(&mut cache, &r, t1), ["a 0.10", "b 0.10"]);
        assert_eq!(r.stable_until(t1), Some(t0 + out));
        // a beats again (same figures): no new generation, the answer made at t1 still ends
        // at a's old deadline, a little early, never late.
        r.heartbeat(beat("a", "us-east", 0.1), t1).unwrap();
        let just_before = t0 + out - Duration::from_millis(1);
        assert!(cache.get(&key(), r.generation(), just_before).is_some());
        assert!(cache.get(&key(), r.generation(), t0 + out).is_none());
        // b stops beating, a goes on: no change to the registry, yet the answer without b
        // comes at b's deadline.
        let t2 = t1 + HEARTBEAT_INTERVAL;
        r.heartbeat(beat("a", "us-east", 0.1), t2).unwrap();
        assert_eq!(route(&mut cache, &r, t0 + out), ["a 0.10", "b 0.10"]);
        let b_out = t1 + out;
        assert_eq!(r.stable_until(t0 + out), Some(b_out));
        assert_eq!(route(&mut cache, &r, b_out), ["a 0.10"]);
        // Coming back is a change.
        let g = r.generation();
        r.heartbeat(beat("b", "eu-west", 0.1), b_out).unwrap();
        assert_ne!(r.generation(), g);
        assert_eq!(route(&mut cache, &r, b_out), ["a 0.10", "b 0.10"]);
    }

    #[test]
    fn a_mirror_of_the_shared_registry_changes_the_generation_only_when_something_differs() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        let beats = || vec![(beat("a", "us-east", 0.1), t0)];
        r.mirror(beats(), Default::default());
        let g = r.generation();
        r.mirror(beats(), Default::default());
        assert_eq!(r.generation(), g);
        // A newer beat (or any other instant), other figures, a drain: each a change.
        r.mirror(
            vec![(beat("a", "us-east", 0.1), t0 + HEARTBEAT_INTERVAL)],
            Default::default(),
        );
        assert_ne!(r.generation(), g);
        let g = r.generation();
        r.mirror(
            vec![(beat("a", "us-east", 0.1), t0 + HEARTBEAT_INTERVAL)],
            ["a".to_string()].into(),
        );
        assert_ne!(r.generation(), g);
        let g = r.generation();
        r.mirror(Vec::new(), Default::default());
        assert_ne!(r.generation(), g);
        // An edge forgotten by expiry is a change too.
        r.heartbeat(beat("b", "eu-west", 0.1), t0).unwrap();
        let g = r.generation();
        assert_eq!(r.expire(t0 + HEARTBEAT_INTERVAL * 61).len(), 1);
        assert_ne!(r.generation(), g);
    }

    #[test]
    fn answers_are_kept_per_room_role_source_and_place() {
        let t0 = Instant::now();
        let mut cache = AnswerCache::default();
        cache.put(key(), 1, t0, None, "a");
        assert_eq!(cache.get(&key(), 1, t0), Some(&"a"));
        for other in [
            AnswerKey::new(RoomId(8), true, false, "peer", located(39.0)),
            AnswerKey::new(ROOM, false, false, "peer", located(39.0)),
            AnswerKey::new(ROOM, true, false, "ip parameter", located(39.0)),
            AnswerKey::new(ROOM, true, false, "peer", located(39.5)),
            AnswerKey::new(ROOM, true, false, "peer", Place::Unknown),
        ] {
            assert_eq!(cache.get(&other, 1, t0), None, "{other:?}");
        }
        assert_eq!(cache.get(&key(), 2, t0), None);
    }

    #[test]
    fn the_cache_is_bounded() {
        let t0 = Instant::now();
        let mut cache = AnswerCache::default();
        let key = |i: usize| AnswerKey::new(RoomId(i as u64), true, false, "peer", Place::Unknown);
        for i in 0..MAX_CACHED_ANSWERS {
            cache.put(key(i), 1, t0, None, i);
        }
        assert_eq!(cache.len(), MAX_CACHED_ANSWERS);
        // Full of current answers: the next one starts over.
        cache.put(key(MAX_CACHED_ANSWERS), 1, t0, None, 0);
        assert_eq!(cache.len(), 1);
        // Full, half of them stale: only the stale ones go.
        for i in 0..MAX_CACHED_ANSWERS {
            let generation = if i % 2 == 0 { 1 } else { 2 };
            cache.put(key(i), generation, t0, None, i);
        }
        cache.put(key(MAX_CACHED_ANSWERS + 1), 2, t0, None, 0);
        assert_eq!(cache.len(), MAX_CACHED_ANSWERS / 2 + 1);
        assert_eq!(cache.get(&key(1), 2, t0), Some(&1));
        // Replacing a key never grows it.
        cache.put(key(1), 2, t0, None, 5);
        assert_eq!(cache.len(), MAX_CACHED_ANSWERS / 2 + 1);
        assert!(!cache.is_empty());
    }

    const STAMP: MemoStamp = MemoStamp {
        owner: 1,
        generation: 5,
        ends: 0,
    };

    #[test]
    fn a_memo_answer_is_served_only_under_its_stamp_and_before_its_instant() {
        let mut memo = AnswerMemo::default();
        let t0 = Instant::now();
        let until = t0 + Duration::from_millis(800);
        memo.put(key(), STAMP, until, "a");
        assert_eq!(memo.get(&key(), STAMP, t0), Some(&"a"));
        assert_eq!(
            memo.get(&key(), STAMP, until - Duration::from_nanos(1)),
            Some(&"a")
        );
        assert_eq!(memo.get(&key(), STAMP, until), None, "its instant passed");
        for other in [
            MemoStamp { owner: 2, ..STAMP },
            MemoStamp {
                generation: 6,
                ..STAMP
            },
            MemoStamp { ends: 1, ..STAMP },
        ] {
            assert_eq!(memo.get(&key(), other, t0), None, "{other:?}");
        }
    }

    #[test]
    fn a_memo_tells_keys_apart_and_a_new_answer_replaces_its_slot() {
        let mut memo = AnswerMemo::default();
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(1);
        let keys = [
            key(),
            AnswerKey::new(ROOM, false, false, "peer", located(39.0)),
            AnswerKey::new(RoomId(8), true, false, "peer", located(39.0)),
            AnswerKey::new(ROOM, true, false, "ip parameter", located(39.0)),
            AnswerKey::new(ROOM, true, false, "peer", located(51.5)),
            AnswerKey::new(ROOM, true, false, "peer", Place::Unknown),
        ];
        for (i, k) in keys.iter().enumerate() {
            memo.put(*k, STAMP, until, i);
            // Whatever slot it shares, a key only ever finds its own answer.
            for (j, other) in keys.iter().enumerate() {
                if let Some(v) = memo.get(other, STAMP, t0) {
                    assert_eq!(*v, j);
                }
            }
            assert_eq!(memo.get(k, STAMP, t0), Some(&i));
        }
        memo.put(key(), STAMP, until, 99);
        assert_eq!(memo.get(&key(), STAMP, t0), Some(&99));
    }
}
