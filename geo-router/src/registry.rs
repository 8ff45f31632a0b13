//! The edge registry (sans-IO): edges heartbeat every half second; one that misses
//! [`MISSED_HEARTBEATS`] is out; draining edges take no new sessions. Edges listed in the static
//! configuration count as healthy until an edge heartbeats for them ([`claims`]: the same id, or
//! the same public URL, as every instance behind a region's load balancer does); from then on the
//! heartbeating edges are the entry and the heartbeat rules apply. A static entry comes back once
//! every edge that claimed it has been forgotten.

use crate::select::{Candidate, GeoPoint};
use amphi_protocol::api::EdgeHeartbeat;
use amphi_protocol::config::EdgeEndpoint;
use amphi_protocol::RoomId;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Heartbeat period asked of edges (in every heartbeat answer).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Missed heartbeats after which an edge is out (1.5 s: a dead edge leaves routing fast; a
/// client that lost its edge need not wait for it, it asks `/v1/route` with `avoid`).
pub const MISSED_HEARTBEATS: u32 = 3;
/// Most edges the registry holds.
pub const MAX_EDGES: usize = 1024;
/// Most rooms one heartbeat may list.
pub const MAX_ROOMS_PER_HEARTBEAT: usize = 4096;

/// Why a heartbeat was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeartbeatError {
    /// A field is out of range.
    #[error("bad heartbeat: {0}")]
    Invalid(&'static str),
    /// The registry is full.
    #[error("too many edges")]
    Full,
}

/// One registered edge.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeRecord {
    /// The last heartbeat.
    pub beat: EdgeHeartbeat,
    /// When it arrived (`None` for a static edge that never heartbeated).
    pub last_seen: Option<Instant>,
    /// Per-room sessions, for capacity checks.
    pub rooms: BTreeMap<RoomId, u32>,
    /// Per-room push listeners, for the push tier's capacity.
    pub push: BTreeMap<RoomId, u32>,
}

impl EdgeRecord {
    /// The record of heartbeat `beat`, received at `last_seen`.
    fn of(beat: EdgeHeartbeat, last_seen: Option<Instant>) -> Self {
        let rooms = beat.rooms.iter().map(|r| (r.room, r.sessions)).collect();
        let push = beat
            .rooms
            .iter()
            .filter(|r| r.push > 0)
            .map(|r| (r.room, r.push))
            .collect();
        EdgeRecord {
            beat,
            last_seen,
            rooms,
            push,
        }
    }

    /// Load as a fraction: the larger of CPU and sessions/capacity.
    pub fn load(&self) -> f64 {
        let sessions = if self.beat.capacity == 0 {
            0.0
        } else {
            f64::from(self.beat.participants) / f64::from(self.beat.capacity)
        };
        sessions.max(f64::from(self.beat.cpu_load))
    }
}

/// Whether a heartbeat is well-formed.
pub fn validate(hb: &EdgeHeartbeat) -> Result<(), HeartbeatError> {
    let ok_text =
        |s: &str, max: usize| !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control);
    let ok_url =
        |s: &str| (s.starts_with("http://") || s.starts_with("https://")) && ok_text(s, 512);
    if !ok_text(&hb.id, 128) {
        return Err(HeartbeatError::Invalid(
            "id must be 1..=128 printable characters",
        ));
    }
    if !ok_text(&hb.region, 64) {
        return Err(HeartbeatError::Invalid(
            "region must be 1..=64 printable characters",
        ));
    }
    if !ok_url(&hb.public_url) {
        return Err(HeartbeatError::Invalid("public_url must be an http(s) URL"));
    }
    if hb.relay_url.as_deref().is_some_and(|u| !ok_url(u)) {
        return Err(HeartbeatError::Invalid("relay_url must be an http(s) URL"));
    }
    if let Some(wt) = &hb.webtransport {
        if !(wt.url.starts_with("https://") && ok_text(&wt.url, 512)) {
            return Err(HeartbeatError::Invalid(
                "webtransport.url must be an https URL",
            ));
        }
        let is_sha256 = |h: &str| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if wt.cert_sha256.as_deref().is_some_and(|h| !is_sha256(h)) {
            return Err(HeartbeatError::Invalid(
                "webtransport.cert_sha256 must be 64 lowercase hex digits",
            ));
        }
    }
    if !(-90.0..=90.0).contains(&hb.latitude) || !(-180.0..=180.0).contains(&hb.longitude) {
        return Err(HeartbeatError::Invalid("coordinates out of range"));
    }
    if !(0.0..=1.0).contains(&hb.cpu_load) {
        return Err(HeartbeatError::Invalid("cpu_load must be within 0..=1"));
    }
    if hb.rooms.len() > MAX_ROOMS_PER_HEARTBEAT {
        return Err(HeartbeatError::Invalid("too many rooms"));
    }
    Ok(())
}

/// Whether an edge heartbeating `hb` stands for the statically configured `edge`: the same id,
/// or the same public URL (the configured entry is a region's load balancer; the instances
/// behind it register as `{id}-{instance}` with its URL).
pub fn claims(hb: &EdgeHeartbeat, edge: &EdgeEndpoint) -> bool {
    hb.id == edge.id || hb.public_url.trim_end_matches('/') == edge.public_url.trim_end_matches('/')
}

fn static_record(e: &EdgeEndpoint) -> EdgeRecord {
    EdgeRecord {
        beat: EdgeHeartbeat {
            id: e.id.clone(),
            region: e.region.name.clone(),
            latitude: e.region.latitude,
            longitude: e.region.longitude,
            public_url: e.public_url.clone(),
            participants: 0,
            cpu_load: 0.0,
            capacity: 0,
            rooms: Vec::new(),
            draining: false,
            relay_url: None,
            webtransport: None,
        },
        last_seen: None,
        rooms: BTreeMap::new(),
        push: BTreeMap::new(),
    }
}

/// Every edge the router knows.
#[derive(Debug, Default)]
pub struct Registry {
    edges: BTreeMap<String, EdgeRecord>,
    /// The statically configured edges (listed while no heartbeat claims them).
    statics: Vec<EdgeEndpoint>,
    /// Edges an operator asked to drain (told in the heartbeat answer).
    drain_requested: BTreeSet<String>,
    /// Bumped by every change that can change a selection (see [`Registry::generation`]).
    generation: u64,
    /// The same number, readable without the registry's lock.
    watch: GenerationWatch,
}

/// A registry's [`generation`](Registry::generation), read without taking the lock the
/// registry lives behind (`/v1/route`'s per-thread answers check it on every request).
#[derive(Clone, Debug, Default)]
pub struct GenerationWatch(Arc<AtomicU64>);

impl GenerationWatch {
    /// The registry's generation now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

impl Registry {
    /// A registry holding the statically configured edges.
    pub fn with_static(edges: &[EdgeEndpoint]) -> Self {
        let mut r = Registry {
            statics: edges.to_vec(),
            ..Registry::default()
        };
        r.restore_unclaimed_statics();
        r
    }

    /// List every static edge no heartbeat-fed entry claims.
    fn restore_unclaimed_statics(&mut self) {
        for e in &self.statics {
            let claimed = self
                .edges
                .values()
                .any(|r| r.last_seen.is_some() && claims(&r.beat, e));
            if !claimed {
                self.edges
                    .entry(e.id.clone())
                    .or_insert_with(|| static_record(e));
            }
        }
    }

    /// Record a heartbeat at `now`. Returns whether the edge was new (or back after being out).
    pub fn heartbeat(&mut self, hb: EdgeHeartbeat, now: Instant) -> Result<bool, HeartbeatError> {
        validate(&hb)?;
        let previous = self.edges.get(&hb.id);
        let was_healthy = previous.is_some_and(|e| self.is_healthy(e, now));
        // Only the time of the beat is new: every selection made since the last beat stands
        // (the edge stays in them for longer, see [`Registry::stable_until`]).
        let same = was_healthy
            && previous.is_some_and(|e| e.beat == hb && e.last_seen.is_some_and(|t| t <= now));
        if previous.is_none() && self.edges.len() >= MAX_EDGES {
            return Err(HeartbeatError::Full);
        }
        if !same {
            self.bump_generation();
        }
        // The static entries this edge stands for are now this edge.
        let mut claimed = false;
        for e in &self.statics {
            if e.id != hb.id && claims(&hb, e) {
                if let Some(r) = self.edges.get(&e.id) {
                    if r.last_seen.is_none() {
                        self.edges.remove(&e.id);
                        claimed = true;
                    }
                }
            }
        }
        if claimed {
            self.bump_generation();
        }
        self.edges
            .insert(hb.id.clone(), EdgeRecord::of(hb, Some(now)));
        Ok(!was_healthy)
    }

    /// Ask `id` to drain (it learns so from its next heartbeat answer). `false` if unknown.
    pub fn request_drain(&mut self, id: &str) -> bool {
        if !self.edges.contains_key(id) {
            return false;
        }
        if self.drain_requested.insert(id.to_string()) {
            self.bump_generation();
        }
        true
    }

    /// Whether an operator asked `id` to drain.
    pub fn drain_requested(&self, id: &str) -> bool {
        self.drain_requested.contains(id)
    }

    /// Whether `id` is registered (statically or by heartbeat).
    pub fn knows(&self, id: &str) -> bool {
        self.edges.contains_key(id)
    }

    /// Replace the heartbeat-fed entries with a shared registry's: `beats` (each with the instant
    /// it was received) and the edges asked to drain. Static edges that no beat claims stay.
    /// Returns how many beats did not fit in [`MAX_EDGES`].
    pub fn mirror(
        &mut self,
        beats: Vec<(EdgeHeartbeat, Instant)>,
        drains: BTreeSet<String>,
    ) -> usize {
        let before = std::mem::take(&mut self.edges);
        let mut dropped = 0;
        for (hb, seen) in beats {
            if self.edges.len() >= MAX_EDGES {
                dropped += 1;
                continue;
            }
            self.edges
                .insert(hb.id.clone(), EdgeRecord::of(hb, Some(seen)));
        }
        self.restore_unclaimed_statics();
        // The beats' instants are read again from the shared registry each time: any change,
        // even of an instant, counts (an edge seen out may be back).
        if self.edges != before || self.drain_requested != drains {
            self.bump_generation();
        }
        self.drain_requested = drains;
        dropped
    }

    /// A number that changes whenever the registry changes in a way that can change what
    /// [`Registry::candidates`] gives for some room at some instant (an edge new, gone, back,
    /// or heartbeating other figures; a drain). A heartbeat that only says the same again
    /// leaves it: with [`Registry::stable_until`], a selection made at one generation holds
    /// until the next.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A handle that reads [`Registry::generation`] without the registry.
    pub fn generation_watch(&self) -> GenerationWatch {
        self.watch.clone()
    }

    fn bump_generation(&mut self) {
        self.generation += 1;
        self.watch.0.store(self.generation, Ordering::Release);
    }

    /// Until when the candidates at `now` stay the candidates without any change to the
    /// registry: the first instant a heartbeat-fed edge healthy at `now` goes out for missing
    /// its heartbeats (`None`: never, only static or out edges).
    pub fn stable_until(&self, now: Instant) -> Option<Instant> {
        self.edges
            .values()
            .filter(|e| self.is_healthy(e, now))
            .filter_map(|e| e.last_seen)
            .map(|t| t + HEARTBEAT_INTERVAL * MISSED_HEARTBEATS)
            .min()
    }

    fn is_healthy(&self, e: &EdgeRecord, now: Instant) -> bool {
        match e.last_seen {
            None => true,
            Some(t) => now.saturating_duration_since(t) < HEARTBEAT_INTERVAL * MISSED_HEARTBEATS,
        }
    }

    /// Whether an edge may take new sessions: healthy and not draining.
    fn is_available(&self, e: &EdgeRecord, now: Instant) -> bool {
        self.is_healthy(e, now) && !e.beat.draining && !self.drain_requested.contains(&e.beat.id)
    }

    /// Forget edges that have been out for a long time (60 missed heartbeats); returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let gone: Vec<String> = self
            .edges
            .iter()
            .filter(|(_, e)| {
                e.last_seen.is_some_and(|t| {
                    now.saturating_duration_since(t) > HEARTBEAT_INTERVAL * (20 * MISSED_HEARTBEATS)
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.edges.remove(id);
            self.drain_requested.remove(id);
        }
        if !gone.is_empty() {
            self.bump_generation();
            self.restore_unclaimed_statics();
        }
        gone
    }

    /// Edges that may take new sessions, as selection candidates for `room`.
    pub fn candidates(&self, room: RoomId, now: Instant) -> Vec<Candidate<'_>> {
        self.edges
            .values()
            .filter(|e| self.is_available(e, now))
            .map(|e| Candidate {
                id: &e.beat.id,
                region: &e.beat.region,
                point: GeoPoint {
                    latitude: e.beat.latitude,
                    longitude: e.beat.longitude,
                },
                public_url: &e.beat.public_url,
                webtransport: e.beat.webtransport.as_ref(),
                load: e.load(),
                room_interactive: e.rooms.get(&room).copied().unwrap_or(0),
                room_push: e.push.get(&room).copied().unwrap_or(0),
            })
            .collect()
    }

    /// Edge `id`'s parent in its region's relay tree at `now` (`None`: fed by the origins).
    /// The tree's members are the region's available edges with a `relay_url`, in id order;
    /// member `p > 0` pulls from member `(p - 1) / fanout`, so a parent's id always sorts
    /// before its child's and no two edges' views can make a cycle. An edge that is not a
    /// member (draining, out, without a `relay_url`) and the root are fed by the origins, as is
    /// every edge when `fanout` is 0.
    pub fn relay_parent(&self, id: &str, fanout: u32, now: Instant) -> Option<&EdgeRecord> {
        let me = self.edges.get(id)?;
        if fanout == 0 || me.beat.relay_url.is_none() || !self.is_available(me, now) {
            return None;
        }
        // BTreeMap order is id order.
        let members = self.edges.values().filter(|e| {
            e.beat.region == me.beat.region
                && e.beat.relay_url.is_some()
                && self.is_available(e, now)
        });
        let position = members.clone().position(|e| e.beat.id == id)?;
        let parent = position.checked_sub(1)? / fanout as usize;
        members.clone().nth(parent)
    }

    /// Every edge with its state at `now`: (record, healthy, available).
    pub fn list(&self, now: Instant) -> Vec<(&EdgeRecord, bool, bool)> {
        self.edges
            .values()
            .map(|e| (e, self.is_healthy(e, now), self.is_available(e, now)))
            .collect()
    }

    /// Sessions of `room` over every healthy edge (listener count for discovery), saturating:
    /// the counts come from heartbeats (and Redis), which may claim anything.
    pub fn room_sessions(&self, room: RoomId, now: Instant) -> u32 {
        self.edges
            .values()
            .filter(|e| self.is_healthy(e, now))
            .filter_map(|e| e.rooms.get(&room))
            .fold(0u32, |sum, n| sum.saturating_add(*n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphi_protocol::api::{RoomLoad, WebTransportEndpoint};
    use amphi_protocol::config::known_region;

    fn beat(id: &str, region: &str) -> EdgeHeartbeat {
        let r = known_region(region).unwrap();
        EdgeHeartbeat {
            id: id.into(),
            region: region.into(),
            latitude: r.latitude,
            longitude: r.longitude,
            public_url: format!("http://{id}"),
            participants: 10,
            cpu_load: 0.1,
            capacity: 100,
            rooms: vec![RoomLoad {
                room: RoomId(7),
                sessions: 4,
                push: 0,
            }],
            draining: false,
            relay_url: None,
            webtransport: None,
        }
    }

    #[test]
    fn three_missed_heartbeats_take_an_edge_out() {
        let t0 = Instant::now();
        let out = HEARTBEAT_INTERVAL * MISSED_HEARTBEATS;
        assert_eq!(out, Duration::from_millis(1500));
        let mut r = Registry::default();
        assert_eq!(r.heartbeat(beat("a", "us-east"), t0), Ok(true));
        assert_eq!(r.heartbeat(beat("b", "eu-west"), t0), Ok(true));
        let t1 = t0 + HEARTBEAT_INTERVAL;
        assert_eq!(r.heartbeat(beat("a", "us-east"), t1), Ok(false));
        let ids = |r: &Registry, t| {
            r.candidates(RoomId(7), t)
                .iter()
                .map(|c| c.id.to_string())
                .collect::<Vec<_>>()
        };
        let ms = Duration::from_millis(1);
        assert_eq!(ids(&r, t0 + out - ms), ["a", "b"]);
        // b's last beat was at t0: out at t0 + 1.5 s; a's at t1: out at t1 + 1.5 s.
        assert_eq!(ids(&r, t0 + out), ["a"]);
        assert_eq!(ids(&r, t1 + out), Vec::<String>::new());
        // Coming back makes it healthy (and reports it as new).
        let t2 = t1 + out + HEARTBEAT_INTERVAL;
        assert_eq!(r.heartbeat(beat("b", "eu-west"), t2), Ok(true));
        assert_eq!(ids(&r, t2), ["b"]);
        assert_eq!(r.room_sessions(RoomId(7), t2), 4);
        // Forgotten after 60 missed beats.
        assert_eq!(
            r.expire(t1 + HEARTBEAT_INTERVAL * 61),
            vec!["a".to_string()]
        );
    }

    #[test]
    fn room_sessions_saturate_instead_of_overflowing() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        for id in ["a", "b"] {
            let mut b = beat(id, "us-east");
            b.rooms[0].sessions = u32::MAX - 1;
            r.heartbeat(b, t0).unwrap();
        }
        assert_eq!(r.room_sessions(RoomId(7), t0), u32::MAX);
    }

    #[test]
    fn each_regions_relay_tree_hangs_off_its_first_edge_by_id() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        for id in ["e1", "e2", "e3", "e4", "e5", "e6", "e7"] {
            let mut b = beat(id, "eu-west");
            b.relay_url = Some(format!("http://10.0.0.{}:8080", &id[1..]));
            r.heartbeat(b, t0).unwrap();
        }
        let mut other = beat("u1", "us-east");
        other.relay_url = Some("http://10.1.0.1:8080".into());
        r.heartbeat(other, t0).unwrap();
        // Without a relay_url: never a member, fed by the origins.
        r.heartbeat(beat("e0", "eu-west"), t0).unwrap();
        let parent = |r: &Registry, id: &str, fanout: u32, now: Instant| {
            r.relay_parent(id, fanout, now).map(|e| e.beat.id.clone())
        };
        let tree = |r: &Registry, fanout: u32, now: Instant| {
            ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7", "u1"]
                .map(|id| parent(r, id, fanout, now))
        };
        let s = |id: &str| Some(id.to_string());
        // Fan-out 2: e1 is the root; e2, e3 under it; e4, e5 under e2; e6, e7 under e3.
        assert_eq!(
            tree(&r, 2, t0),
            [
                None,
                None,
                s("e1"),
                s("e1"),
                s("e2"),
                s("e2"),
                s("e3"),
                s("e3"),
                None
            ]
        );
        assert_eq!(
            r.relay_parent("e7", 2, t0)
                .unwrap()
                .beat
                .relay_url
                .as_deref(),
            Some("http://10.0.0.3:8080")
        );
        // Fan-out 0: no tree.
        assert!(tree(&r, 0, t0).iter().all(Option::is_none));
        // The root drains: the tree is rebuilt from e2.
        assert!(r.request_drain("e1"));
        assert_eq!(
            tree(&r, 2, t0),
            [
                None,
                None,
                None,
                s("e2"),
                s("e2"),
                s("e3"),
                s("e3"),
                s("e4"),
                None
            ]
        );
        // The others keep beating; e1 (drained) and e3 stop: out after 1.5 s, the tree closes up.
        let t1 = t0 + HEARTBEAT_INTERVAL * MISSED_HEARTBEATS;
        for id in ["e2", "e4", "e5", "e6", "e7"] {
            let mut b = beat(id, "eu-west");
            b.relay_url = Some(format!("http://10.0.0.{}:8080", &id[1..]));
            r.heartbeat(b, t1).unwrap();
        }
        assert_eq!(
            tree(&r, 2, t1),
            [
                None,
                None,
                None,
                None,
                s("e2"),
                s("e2"),
                s("e4"),
                s("e4"),
                None
            ]
        );
        assert_eq!(parent(&r, "unknown", 2, t1), None);
    }

    #[test]
    fn draining_edges_take_no_new_sessions() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        let mut b = beat("a", "us-east");
        b.draining = true;
        r.heartbeat(b, t0).unwrap();
        r.heartbeat(beat("b", "eu-west"), t0).unwrap();
        assert_eq!(r.candidates(RoomId(7), t0).len(), 1);
        assert!(r.request_drain("b"));
        assert!(!r.request_drain("nope"));
        assert!(r.drain_requested("b"));
        assert!(r.candidates(RoomId(7), t0).is_empty());
        // Still healthy (listed), just unavailable.
        assert!(r
            .list(t0)
            .iter()
            .all(|(_, healthy, avail)| *healthy && !*avail));
    }

    #[test]
    fn static_edges_count_until_they_heartbeat_and_load_is_the_max() {
        let t0 = Instant::now();
        let e = EdgeEndpoint {
            id: "s".into(),
            region: known_region("eu-west").unwrap(),
            public_url: "http://s".into(),
        };
        let mut r = Registry::with_static(&[e]);
        assert_eq!(
            r.candidates(RoomId(1), t0 + Duration::from_secs(3600))
                .len(),
            1
        );
        let mut b = beat("s", "eu-west");
        b.participants = 90;
        r.heartbeat(b, t0).unwrap();
        let c = r.candidates(RoomId(7), t0);
        assert!((c[0].load - 0.9).abs() < 1e-9);
        assert_eq!(c[0].room_interactive, 4);
        assert!(r
            .candidates(RoomId(7), t0 + HEARTBEAT_INTERVAL * MISSED_HEARTBEATS)
            .is_empty());
    }

    #[test]
    fn a_static_entry_point_and_the_edges_heartbeating_for_it_are_one_entry() {
        let t0 = Instant::now();
        // A region's load balancer, configured; its instances register as "{id}-{instance}"
        // with the load balancer's URL.
        let lb = EdgeEndpoint {
            id: "edge-us-east".into(),
            region: known_region("us-east").unwrap(),
            public_url: "https://edge-us-east.example.com".into(),
        };
        let instance = |n: &str| {
            let mut b = beat(&format!("edge-us-east-{n}"), "us-east");
            b.public_url = "https://edge-us-east.example.com/".into();
            b
        };
        let mut r = Registry::with_static(std::slice::from_ref(&lb));
        let listed = |r: &Registry, t| {
            r.list(t)
                .iter()
                .map(|(e, healthy, _)| (e.beat.id.clone(), *healthy))
                .collect::<Vec<_>>()
        };
        assert_eq!(listed(&r, t0), [("edge-us-east".to_string(), true)]);
        r.heartbeat(instance("a"), t0).unwrap();
        r.heartbeat(instance("b"), t0).unwrap();
        assert_eq!(
            listed(&r, t0),
            [
                ("edge-us-east-a".to_string(), true),
                ("edge-us-east-b".to_string(), true)
            ]
        );
        // Both instances die: the region is out of routing, not kept alive by its static entry.
        let dead = t0 + HEARTBEAT_INTERVAL * MISSED_HEARTBEATS;
        assert!(r.candidates(RoomId(7), dead).is_empty());
        assert_eq!(listed(&r, dead).len(), 2);
        // Once both are forgotten the configured entry point is back.
        let forgotten = t0 + HEARTBEAT_INTERVAL * 61;
        assert_eq!(r.expire(forgotten).len(), 2);
        assert_eq!(listed(&r, forgotten), [("edge-us-east".to_string(), true)]);
        // An edge with another URL claims nothing.
        r.heartbeat(beat("edge-us-east-c", "us-east"), forgotten)
            .unwrap();
        assert_eq!(listed(&r, forgotten).len(), 2);
    }

    #[test]
    fn mirror_replaces_heartbeat_entries_and_keeps_silent_static_edges() {
        let t0 = Instant::now();
        let statics = [
            EdgeEndpoint {
                id: "s".into(),
                region: known_region("eu-west").unwrap(),
                public_url: "http://s".into(),
            },
            EdgeEndpoint {
                id: "a".into(),
                region: known_region("us-east").unwrap(),
                public_url: "http://a".into(),
            },
            EdgeEndpoint {
                id: "lb".into(),
                region: known_region("eu-west").unwrap(),
                public_url: "http://b".into(),
            },
        ];
        let mut r = Registry::with_static(&statics);
        r.heartbeat(beat("old", "us-east"), t0).unwrap();
        let dropped = r.mirror(
            vec![(beat("a", "us-east"), t0), (beat("b", "eu-west"), t0)],
            ["b".to_string()].into(),
        );
        assert_eq!(dropped, 0);
        let ids: Vec<_> = r
            .list(t0)
            .iter()
            .map(|(e, _, _)| e.beat.id.clone())
            .collect();
        assert_eq!(
            ids,
            ["a", "b", "s"],
            "old is gone, a is heartbeat-fed, b claims lb (same URL), s stays static"
        );
        assert!(r.drain_requested("b") && r.knows("s") && !r.knows("old") && !r.knows("lb"));
        let avail: Vec<_> = r
            .candidates(RoomId(7), t0)
            .iter()
            .map(|c| c.id.to_string())
            .collect();
        assert_eq!(avail, ["a", "s"]);
        assert_eq!(r.room_sessions(RoomId(7), t0), 8);
    }

    #[test]
    fn bad_heartbeats_are_refused() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        type Mutation = Box<dyn Fn(&mut EdgeHeartbeat)>;
        let cases: Vec<Mutation> = vec![
            Box::new(|b| b.id.clear()),
            Box::new(|b| b.id = "x".repeat(200)),
            Box::new(|b| b.region = "a\nb".into()),
            Box::new(|b| b.public_url = "ftp://x".into()),
            Box::new(|b| b.latitude = 91.0),
            Box::new(|b| b.longitude = f64::NAN),
            Box::new(|b| b.cpu_load = 1.5),
            Box::new(|b| {
                b.webtransport = Some(WebTransportEndpoint {
                    url: "http://plain:4433".into(),
                    cert_sha256: None,
                })
            }),
            Box::new(|b| {
                b.webtransport = Some(WebTransportEndpoint {
                    url: "https://e:4433".into(),
                    cert_sha256: Some("AB".repeat(32)),
                })
            }),
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut b = beat("a", "us-east");
            f(&mut b);
            assert!(
                matches!(r.heartbeat(b, t0), Err(HeartbeatError::Invalid(_))),
                "case {i}"
            );
        }
        assert!(r.list(t0).is_empty());
    }
}
