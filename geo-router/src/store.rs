//! Where the router keeps its shared state: the room directory and the edge registry, behind the
//! [`Store`] trait. [`MemoryStore`] (the embedded default) keeps them in this process;
//! [`RedisStore`] keeps them in Redis so that several geo-router replicas see the same rooms and
//! edges.
//!
//! Selection never waits on the network: every backend keeps a local [`Registry`] (in memory it
//! *is* the registry; with Redis it mirrors the shared one, refreshed by [`Store::sync`] every
//! [`SYNC_INTERVAL`] and updated at once by this router's own heartbeats). Room lookups go to the
//! backend, so a room created or ended through one replica is seen by the others immediately.
//!
//! Redis layout (every key starts with the store's prefix, `amphi:` by default):
//! `room:{id}` hash (`entry` JSON, `ended_at`, `idx` its member in `open`; rooms of releases
//! before this index, listed in the old `rooms` set, are indexed when a router connects), `open`
//! sorted set of
//! the rooms not ended (all scores 0, members [`index_member`]: start time and id, walked by
//! lexicographic range for paging and counted for metrics), `activity` sorted set of the open
//! rooms (score = last activity, Unix seconds: the start, then each edge heartbeat listing the
//! room; idle expiry reads its low end), `scheduled` sorted set
//! (score = start time), `edge:{id}` JSON `{beat, seen_ms}` with a TTL of [`EDGE_TTL`], `edges`
//! set of edge ids, `drain` set of edge ids an operator asked to drain, `once:{what}:{room}`
//! markers so that one replica only emits a webhook, `reports:{room}` hash (report id -> report
//! JSON) and `reportidx:{room}` sorted set (score = `at_ms`), at most [`MAX_REPORTS_PER_ROOM`]
//! per room and kept [`REPORT_TTL`] after the latest, `recording:{room}` the host's decision on
//! the room's recording (`published` or `deleted`, no TTL: a deleted recording stays 410).
//!
//! While Redis is unreachable a [`RedisStore`] keeps working from this replica's view
//! ([`Fallback`]): rooms are created, read, listed and ended locally (their directory writes
//! replayed in order by the next [`Store::sync`] once Redis answers), and edge heartbeats keep
//! the local registry, so routing goes on. Other replicas see rooms created meanwhile only after
//! the replay; `claim_once` and drain requests still need Redis.

use crate::directory::{
    index_member, parse_index_member, Cursor, Directory, Expiry, Page, Rescheduled, RoomCounts,
    RoomEntry,
};
use crate::registry::{validate, HeartbeatError, Registry, HEARTBEAT_INTERVAL, MISSED_HEARTBEATS};
use crate::reminders::MAX_SUBSCRIBERS_PER_ROOM;
use amphi_protocol::api::EdgeHeartbeat;
use amphi_protocol::config::EdgeEndpoint;
use amphi_protocol::room::Report;
use amphi_protocol::RoomId;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a shared backend's edge registry is mirrored into the local one.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(250);
/// How long Redis keeps an edge that stopped heartbeating (the registry forgets it then too).
pub const EDGE_TTL: Duration = Duration::from_secs(60);
/// How long Redis keeps an ended room.
pub const ENDED_ROOM_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a "done once" marker lives.
const ONCE_TTL_SECS: u64 = 7 * 24 * 3600;
/// Reports kept per room (the newest; an older one goes when a newer one arrives past this).
pub const MAX_REPORTS_PER_ROOM: usize = 1000;
/// How long Redis keeps a room's reports after its latest one.
pub const REPORT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// The host's decision on a room's recording (absent: undecided, private).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingDecision {
    /// Public: VOD playlists and the downloadable file.
    Published,
    /// Every object removed; the API answers 410.
    Deleted,
}

impl RecordingDecision {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordingDecision::Published => "published",
            RecordingDecision::Deleted => "deleted",
        }
    }

    /// A stored name read back (anything else: undecided).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "published" => Some(RecordingDecision::Published),
            "deleted" => Some(RecordingDecision::Deleted),
            _ => None,
        }
    }

    /// The decision in force after `wanted` is asked with `current` stored: a deletion is
    /// final, so publishing a deleted recording leaves it deleted.
    pub fn after(current: Option<Self>, wanted: Self) -> Self {
        match (current, wanted) {
            (Some(RecordingDecision::Deleted), _) => RecordingDecision::Deleted,
            (_, w) => w,
        }
    }
}

/// What a store operation answers.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The heartbeat was refused.
    #[error(transparent)]
    Heartbeat(#[from] HeartbeatError),
    /// The backend failed (Redis unreachable, timed out, refused the command).
    #[error("store backend: {0}")]
    Backend(String),
    /// The backend holds a record this router cannot read.
    #[error("store record {key}: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// The time of an operation, on both clocks (the memory backend keeps monotonic instants; a
/// shared backend needs the wall clock, which every replica agrees on).
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// Monotonic time.
    pub instant: Instant,
    /// Wall clock, Unix milliseconds.
    pub unix_ms: u64,
}

impl Now {
    /// Both clocks, read now.
    pub fn read() -> Self {
        Now {
            instant: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// The wall clock in Unix seconds.
    pub fn unix_secs(&self) -> u64 {
        self.unix_ms / 1000
    }
}

/// What a heartbeat did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Beat {
    /// The edge was new, or back after being out.
    pub new: bool,
    /// Sessions per room of the previous heartbeat (empty if the edge was out or new).
    pub previous: BTreeMap<RoomId, u32>,
    /// An operator asked this edge to drain.
    pub drain: bool,
}

/// What a reminder subscription did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subscription {
    /// Subscribed now; the room has this many subscribers.
    Added(u64),
    /// Was subscribed already; the room has this many subscribers.
    Already(u64),
    /// The room's list is full: not subscribed.
    Full,
}

/// What ending a room did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndOutcome {
    /// This call ended the room.
    Ended,
    /// It had already ended.
    AlreadyEnded,
    /// No such room.
    NotFound,
}

/// The router's shared state: room directory and edge registry. Object safe (futures are boxed)
/// so the router holds an `Arc<dyn Store>`.
pub trait Store: Send + Sync {
    /// Backend name for logs (`memory`, `redis`).
    fn backend(&self) -> &'static str;
    /// The local registry view used for selection (see the module documentation): read-locked
    /// by every route request, write-locked by heartbeats and syncs.
    fn registry(&self) -> &RwLock<Registry>;
    /// Add a room under a fresh id.
    fn create_room(&self, entry: RoomEntry) -> StoreFuture<'_, RoomId>;
    /// A room by id.
    fn room(&self, id: RoomId) -> StoreFuture<'_, Option<RoomEntry>>;
    /// Mark a room ended at `now_unix` (seconds) unless it already ended.
    fn end_room(&self, id: RoomId, now_unix: u64) -> StoreFuture<'_, EndOutcome>;
    /// Up to `limit` rooms not ended, from `cursor` on, in listing order (see
    /// [`crate::directory`]); read through the open-room index, never by scanning.
    fn page(&self, cursor: Option<Cursor>, limit: usize, now_unix: u64) -> StoreFuture<'_, Page>;
    /// Live and scheduled room counts at `now_unix`, from the index sizes.
    fn counts(&self, now_unix: u64) -> StoreFuture<'_, RoomCounts>;
    /// Activity in `room` at `now_unix` other than an edge heartbeat (a route request, a token
    /// minted): it stays alive.
    fn touch(&self, room: RoomId, now_unix: u64) -> StoreFuture<'_, ()>;
    /// Live rooms idle at `now_unix` under `expiry` (no edge heartbeat listed them), at most
    /// `max`: the caller ends them.
    fn idle_rooms(&self, expiry: Expiry, now_unix: u64, max: usize)
        -> StoreFuture<'_, Vec<RoomId>>;
    /// Scheduled rooms whose start time is in `(after, until]` (Unix seconds).
    fn scheduled_between(&self, after: u64, until: u64) -> StoreFuture<'_, Vec<RoomId>>;
    /// Record an edge heartbeat (the rooms it lists are active at `now`).
    fn heartbeat(&self, hb: EdgeHeartbeat, now: Now) -> StoreFuture<'_, Beat>;
    /// Ask edge `id` to drain; `false` if no such edge is known.
    fn request_drain(&self, id: String) -> StoreFuture<'_, bool>;
    /// `true` exactly once per (`what`, `room`) over every replica sharing the backend: the one
    /// replica that emits a webhook for something every replica notices.
    fn claim_once(&self, what: &str, room: RoomId) -> StoreFuture<'_, bool>;
    /// Move scheduled room `id`'s start to `at`, unless it started (at `now_unix`) or ended.
    fn reschedule_room(&self, id: RoomId, at: u64, now_unix: u64) -> StoreFuture<'_, Rescheduled>;
    /// Subscribe `user` to `room`'s reminders (at most
    /// [`crate::reminders::MAX_SUBSCRIBERS_PER_ROOM`] per room; kept `keep_secs`).
    fn subscribe_reminder(
        &self,
        room: RoomId,
        user: String,
        keep_secs: u64,
    ) -> StoreFuture<'_, Subscription>;
    /// Unsubscribe `user` from `room`'s reminders; whether they were subscribed.
    fn unsubscribe_reminder(&self, room: RoomId, user: String) -> StoreFuture<'_, bool>;
    /// Every subscriber of `room`'s reminders (sorted).
    fn reminder_subscribers(&self, room: RoomId) -> StoreFuture<'_, Vec<String>>;
    /// How many subscribe to each of `rooms`' reminders, in order.
    fn reminder_counts(&self, rooms: Vec<RoomId>) -> StoreFuture<'_, Vec<u64>>;
    /// Forget `room`'s reminder subscribers (it ended or went live).
    fn clear_reminders(&self, room: RoomId) -> StoreFuture<'_, ()>;
    /// Refresh the local registry view from the shared backend (nothing to do in memory).
    fn sync(&self, now: Now) -> StoreFuture<'_, ()>;
    /// Revoke the single token `jti` until `until_unix` (its `exp`; in Redis a key whose TTL
    /// ends then, shared by every replica).
    fn revoke_token(&self, jti: String, until_unix: u64, now_unix: u64) -> StoreFuture<'_, ()>;
    /// Whether the token `jti` is revoked at `now_unix`.
    fn is_token_revoked(&self, jti: String, now_unix: u64) -> StoreFuture<'_, bool>;
    /// The host's decision on `room`'s recording, if any.
    fn recording_decision(&self, room: RoomId) -> StoreFuture<'_, Option<RecordingDecision>>;
    /// Store the host's decision on `room`'s recording ([`RecordingDecision::after`]); answers
    /// the decision now in force.
    fn decide_recording(
        &self,
        room: RoomId,
        wanted: RecordingDecision,
    ) -> StoreFuture<'_, RecordingDecision>;
    /// Every token revocation in force at `now_unix`: (jti, until). Re-sent to an origin whose
    /// link comes up.
    fn revoked_tokens(&self, now_unix: u64) -> StoreFuture<'_, Vec<(String, u64)>>;
    /// Keep `report` with its room's (at most [`MAX_REPORTS_PER_ROOM`], the oldest dropped);
    /// `true` if it is new, `false` if a report with its id is there already (every router
    /// linked to the origin hears it; the one that stores it emits `report_created`).
    fn add_report(&self, report: Report) -> StoreFuture<'_, bool>;
    /// Up to `limit` of `room`'s reports, newest first.
    fn reports(&self, room: RoomId, limit: usize) -> StoreFuture<'_, Vec<Report>>;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read access to a registry (a poisoned lock still holds a usable registry).
pub fn read(r: &RwLock<Registry>) -> RwLockReadGuard<'_, Registry> {
    r.read().unwrap_or_else(|e| e.into_inner())
}

/// Write access to a registry.
pub fn write(r: &RwLock<Registry>) -> RwLockWriteGuard<'_, Registry> {
    r.write().unwrap_or_else(|e| e.into_inner())
}

/// Rooms of `id`'s last heartbeat if it is still healthy at `now`.
fn previous_rooms(reg: &Registry, id: &str, now: Instant) -> Option<BTreeMap<RoomId, u32>> {
    reg.list(now)
        .into_iter()
        .find(|(e, healthy, _)| e.beat.id == id && *healthy)
        .map(|(e, _, _)| e.rooms.clone())
}

/// The embedded default: everything in this process.
pub struct MemoryStore {
    directory: Mutex<Directory>,
    registry: RwLock<Registry>,
    claimed: Mutex<BTreeSet<(String, RoomId)>>,
    revoked: Mutex<amphi_protocol::token::RevokedTokens>,
    reminders: Mutex<HashMap<RoomId, BTreeSet<String>>>,
    /// Each room's reports, oldest first.
    reports: Mutex<HashMap<RoomId, VecDeque<Report>>>,
    recordings: Mutex<HashMap<RoomId, RecordingDecision>>,
}

impl MemoryStore {
    /// An empty store knowing the statically configured edges.
    pub fn new(static_edges: &[EdgeEndpoint]) -> Self {
        MemoryStore {
            directory: Mutex::new(Directory::default()),
            registry: RwLock::new(Registry::with_static(static_edges)),
            claimed: Mutex::new(BTreeSet::new()),
            revoked: Mutex::new(Default::default()),
            reminders: Mutex::new(HashMap::new()),
            reports: Mutex::new(HashMap::new()),
            recordings: Mutex::new(HashMap::new()),
        }
    }
}

impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn registry(&self) -> &RwLock<Registry> {
        &self.registry
    }

    fn create_room(&self, entry: RoomEntry) -> StoreFuture<'_, RoomId> {
        let id = lock(&self.directory).create(entry);
        Box::pin(async move { Ok(id) })
    }

    fn room(&self, id: RoomId) -> StoreFuture<'_, Option<RoomEntry>> {
        let r = lock(&self.directory).get(id).cloned();
        Box::pin(async move { Ok(r) })
    }

    fn end_room(&self, id: RoomId, now_unix: u64) -> StoreFuture<'_, EndOutcome> {
        let mut dir = lock(&self.directory);
        let out = if dir.get(id).is_none() {
            EndOutcome::NotFound
        } else if dir.end(id, now_unix) {
            EndOutcome::Ended
        } else {
            EndOutcome::AlreadyEnded
        };
        Box::pin(async move { Ok(out) })
    }

    fn page(&self, cursor: Option<Cursor>, limit: usize, now_unix: u64) -> StoreFuture<'_, Page> {
        let page = lock(&self.directory).page(cursor, limit, now_unix);
        Box::pin(async move { Ok(page) })
    }

    fn counts(&self, now_unix: u64) -> StoreFuture<'_, RoomCounts> {
        let counts = lock(&self.directory).counts(now_unix);
        Box::pin(async move { Ok(counts) })
    }

    fn touch(&self, room: RoomId, now_unix: u64) -> StoreFuture<'_, ()> {
        lock(&self.directory).touch([room], now_unix);
        Box::pin(async { Ok(()) })
    }

    fn idle_rooms(
        &self,
        expiry: Expiry,
        now_unix: u64,
        max: usize,
    ) -> StoreFuture<'_, Vec<RoomId>> {
        let ids = lock(&self.directory).idle(expiry, now_unix, max);
        Box::pin(async move { Ok(ids) })
    }

    fn scheduled_between(&self, after: u64, until: u64) -> StoreFuture<'_, Vec<RoomId>> {
        let ids = lock(&self.directory).scheduled_between(after, until);
        Box::pin(async move { Ok(ids) })
    }

    fn heartbeat(&self, hb: EdgeHeartbeat, now: Now) -> StoreFuture<'_, Beat> {
        let result = (|| {
            let mut reg = write(&self.registry);
            let previous = previous_rooms(&reg, &hb.id, now.instant).unwrap_or_default();
            let id = hb.id.clone();
            let rooms: Vec<RoomId> = hb.rooms.iter().map(|r| r.room).collect();
            let new = reg.heartbeat(hb, now.instant)?;
            lock(&self.directory).touch(rooms, now.unix_secs());
            Ok(Beat {
                new,
                previous,
                drain: reg.drain_requested(&id),
            })
        })();
        Box::pin(async move { result })
    }

    fn request_drain(&self, id: String) -> StoreFuture<'_, bool> {
        let ok = write(&self.registry).request_drain(&id);
        Box::pin(async move { Ok(ok) })
    }

    fn claim_once(&self, what: &str, room: RoomId) -> StoreFuture<'_, bool> {
        let fresh = lock(&self.claimed).insert((what.to_string(), room));
        Box::pin(async move { Ok(fresh) })
    }

    fn recording_decision(&self, room: RoomId) -> StoreFuture<'_, Option<RecordingDecision>> {
        let d = lock(&self.recordings).get(&room).copied();
        Box::pin(async move { Ok(d) })
    }

    fn decide_recording(
        &self,
        room: RoomId,
        wanted: RecordingDecision,
    ) -> StoreFuture<'_, RecordingDecision> {
        let mut map = lock(&self.recordings);
        let now = RecordingDecision::after(map.get(&room).copied(), wanted);
        map.insert(room, now);
        Box::pin(async move { Ok(now) })
    }

    fn reschedule_room(&self, id: RoomId, at: u64, now_unix: u64) -> StoreFuture<'_, Rescheduled> {
        let out = lock(&self.directory).reschedule(id, at, now_unix);
        Box::pin(async move { Ok(out) })
    }

    fn subscribe_reminder(
        &self,
        room: RoomId,
        user: String,
        _keep_secs: u64,
    ) -> StoreFuture<'_, Subscription> {
        let mut all = lock(&self.reminders);
        let subs = all.entry(room).or_default();
        let out = if subs.contains(&user) {
            Subscription::Already(subs.len() as u64)
        } else if subs.len() >= MAX_SUBSCRIBERS_PER_ROOM {
            Subscription::Full
        } else {
            subs.insert(user);
            Subscription::Added(subs.len() as u64)
        };
        Box::pin(async move { Ok(out) })
    }

    fn unsubscribe_reminder(&self, room: RoomId, user: String) -> StoreFuture<'_, bool> {
        let was = lock(&self.reminders)
            .get_mut(&room)
            .is_some_and(|subs| subs.remove(&user));
        Box::pin(async move { Ok(was) })
    }

    fn reminder_subscribers(&self, room: RoomId) -> StoreFuture<'_, Vec<String>> {
        let users = lock(&self.reminders)
            .get(&room)
            .map(|subs| subs.iter().cloned().collect())
            .unwrap_or_default();
        Box::pin(async move { Ok(users) })
    }

    fn reminder_counts(&self, rooms: Vec<RoomId>) -> StoreFuture<'_, Vec<u64>> {
        let all = lock(&self.reminders);
        let counts = rooms
            .iter()
            .map(|r| all.get(r).map_or(0, |subs| subs.len() as u64))
            .collect();
        Box::pin(async move { Ok(counts) })
    }

    fn clear_reminders(&self, room: RoomId) -> StoreFuture<'_, ()> {
        lock(&self.reminders).remove(&room);
        Box::pin(async { Ok(()) })
    }

    fn sync(&self, _now: Now) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn revoke_token(&self, jti: String, until_unix: u64, now_unix: u64) -> StoreFuture<'_, ()> {
        let mut r = lock(&self.revoked);
        r.prune(now_unix);
        r.revoke(&jti, until_unix, now_unix);
        Box::pin(async { Ok(()) })
    }

    fn is_token_revoked(&self, jti: String, now_unix: u64) -> StoreFuture<'_, bool> {
        let revoked = lock(&self.revoked).is_revoked(&jti, now_unix);
        Box::pin(async move { Ok(revoked) })
    }

    fn revoked_tokens(&self, now_unix: u64) -> StoreFuture<'_, Vec<(String, u64)>> {
        let list = lock(&self.revoked)
            .live(now_unix)
            .map(|(jti, until)| (jti.to_string(), until))
            .collect();
        Box::pin(async move { Ok(list) })
    }

    fn add_report(&self, report: Report) -> StoreFuture<'_, bool> {
        let mut all = lock(&self.reports);
        let list = all.entry(report.room).or_default();
        let new = !list.iter().any(|r| r.id == report.id);
        if new {
            list.push_back(report);
            while list.len() > MAX_REPORTS_PER_ROOM {
                list.pop_front();
            }
        }
        Box::pin(async move { Ok(new) })
    }

    fn reports(&self, room: RoomId, limit: usize) -> StoreFuture<'_, Vec<Report>> {
        let list = lock(&self.reports)
            .get(&room)
            .map(|l| l.iter().rev().take(limit).cloned().collect())
            .unwrap_or_default();
        Box::pin(async move { Ok(list) })
    }
}

/// An edge as stored in Redis.
#[derive(Serialize, Deserialize)]
struct StoredEdge {
    beat: EdgeHeartbeat,
    /// When the router that took the heartbeat received it, Unix milliseconds.
    seen_ms: u64,
}

/// A room read back from Redis: the JSON of its `entry` field and its separate `ended_at`.
pub fn decode_room(entry: &str, ended_at: Option<u64>) -> Result<RoomEntry, serde_json::Error> {
    let mut e: RoomEntry = serde_json::from_str(entry)?;
    e.ended_at = ended_at;
    Ok(e)
}

/// An edge read back from Redis (`edge:{id}`, written by whichever router took its heartbeat):
/// the heartbeat and the instant it was received, or `None` if the record is unreadable or the
/// heartbeat invalid (such edges are dropped from the shared registry).
pub fn decode_edge(json: &str, now: Now) -> Option<(EdgeHeartbeat, Instant)> {
    let e = serde_json::from_str::<StoredEdge>(json).ok()?;
    validate(&e.beat).ok()?;
    Some((e.beat, instant_at(now, e.seen_ms)))
}

/// The instant that was `age_ms` before `now` (saturating at the process start).
fn instant_at(now: Now, then_ms: u64) -> Instant {
    let age = Duration::from_millis(now.unix_ms.saturating_sub(then_ms));
    now.instant.checked_sub(age).unwrap_or(now.instant)
}

/// Most room entries a [`Fallback`] remembers (rooms created or read through this replica).
pub const FALLBACK_ROOMS: usize = 100_000;
/// Most directory writes a [`Fallback`] keeps for replay.
pub const FALLBACK_WRITES: usize = 100_000;

/// A directory write made while Redis was unreachable, replayed when it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirectoryWrite {
    /// A room created under this id.
    Create(RoomId, RoomEntry),
    /// A room ended at this time (Unix seconds).
    End(RoomId, u64),
}

/// What a Redis-backed router does while Redis is unreachable (sans-IO): rooms are created and
/// ended here, their writes kept in order and replayed when Redis answers again
/// ([`Fallback::next_write`]); rooms this replica created or read are answered from here
/// (other replicas learn about rooms created meanwhile once the writes are replayed).
#[derive(Debug, Default)]
pub struct Fallback {
    known: std::collections::HashMap<RoomId, RoomEntry>,
    writes: std::collections::VecDeque<DirectoryWrite>,
}

impl Fallback {
    /// Remember `entry` as Redis holds it (after a read or a create).
    pub fn remember(&mut self, id: RoomId, entry: RoomEntry) {
        if self.known.len() < FALLBACK_ROOMS || self.known.contains_key(&id) {
            self.known.insert(id, entry);
        }
    }

    /// Create a room while Redis is away; `false` if the write queue is full.
    pub fn create(&mut self, id: RoomId, entry: RoomEntry) -> bool {
        if self.writes.len() >= FALLBACK_WRITES {
            return false;
        }
        self.known.insert(id, entry.clone());
        self.writes.push_back(DirectoryWrite::Create(id, entry));
        true
    }

    /// End a room while Redis is away; `None` if this replica does not know it (or the write
    /// queue is full).
    pub fn end(&mut self, id: RoomId, now_unix: u64) -> Option<EndOutcome> {
        if self.writes.len() >= FALLBACK_WRITES {
            return None;
        }
        let e = self.known.get_mut(&id)?;
        if e.ended_at.is_some() {
            return Some(EndOutcome::AlreadyEnded);
        }
        e.ended_at = Some(now_unix);
        self.writes.push_back(DirectoryWrite::End(id, now_unix));
        Some(EndOutcome::Ended)
    }

    /// A room this replica knows.
    pub fn room(&self, id: RoomId) -> Option<&RoomEntry> {
        self.known.get(&id)
    }

    /// Whether writes about `id` wait for replay (this replica's view is newer than Redis').
    pub fn pending_for(&self, id: RoomId) -> bool {
        self.writes.iter().any(|w| match w {
            DirectoryWrite::Create(r, _) | DirectoryWrite::End(r, _) => *r == id,
        })
    }

    /// The oldest write to replay.
    pub fn next_write(&self) -> Option<&DirectoryWrite> {
        self.writes.front()
    }

    /// The oldest write was replayed.
    pub fn replayed(&mut self) {
        self.writes.pop_front();
    }
}

/// How long a room's reminder subscribers are kept: until a week after its start at `at`
/// (they are cleared sooner when the room ends or goes live).
pub fn reminder_ttl(at: u64, now_unix: u64) -> u64 {
    at.saturating_sub(now_unix)
        .saturating_add(ENDED_ROOM_TTL.as_secs())
}

/// Whether a store error means the backend is unreachable (as opposed to bad data).
fn unreachable(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(_))
}

/// Requests skip Redis for a while after it failed (the replica's [`Fallback`] answers), until
/// the periodic [`Store::sync`] reaches it again.
pub use amphi_common::breaker::{Breaker, BREAKER_OPEN};

/// Room directory and edge registry in Redis (shared by every geo-router replica).
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    registry: RwLock<Registry>,
    end_script: redis::Script,
    reschedule_script: redis::Script,
    subscribe_script: redis::Script,
    report_script: redis::Script,
    /// Directory writes and rooms kept while Redis is unreachable.
    fallback: Mutex<Fallback>,
    /// Whether requests try Redis now (the sync always does).
    breaker: Mutex<Breaker>,
}

/// Ends a room unless it ended: -1 unknown, 0 already ended, 1 ended now. Drops it from the
/// `scheduled`, `open` and `activity` indexes.
const END_ROOM_LUA: &str = r"
if redis.call('HEXISTS', KEYS[1], 'entry') == 0 then return -1 end
if redis.call('HSETNX', KEYS[1], 'ended_at', ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
local member = redis.call('HGET', KEYS[1], 'idx')
if member then redis.call('ZREM', KEYS[3], member) end
redis.call('ZREM', KEYS[4], ARGV[3])
return 1
";

/// Moves a scheduled room's start unless it is unknown (-1), ended or started (-2); answers the
/// previous start. KEYS: room hash, `open`, `scheduled`, `activity`, the reminder set.
/// ARGV: new entry JSON, new `idx` member, new start, room id, now, the reminder set's TTL.
const RESCHEDULE_ROOM_LUA: &str = r"
local e = redis.call('HMGET', KEYS[1], 'entry', 'ended_at', 'idx')
if not e[1] then return -1 end
if e[2] then return -2 end
local old = redis.call('ZSCORE', KEYS[3], ARGV[4])
if not old or tonumber(old) <= tonumber(ARGV[5]) then return -2 end
if e[3] then redis.call('ZREM', KEYS[2], e[3]) end
redis.call('HSET', KEYS[1], 'entry', ARGV[1], 'idx', ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('EXPIRE', KEYS[5], ARGV[6]) end
return tonumber(old)
";

/// Adds a reminder subscriber unless the set is full: {1, count} added, {0, count} already
/// there, {-1, count} full. KEYS: the set. ARGV: user, the limit, the set's TTL.
const SUBSCRIBE_REMINDER_LUA: &str = r"
local n = redis.call('SCARD', KEYS[1])
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return {0, n} end
if n >= tonumber(ARGV[2]) then return {-1, n} end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, n + 1}
";

/// Adds a report unless its id is there: 1 added, 0 already there. Keeps the newest ARGV[4]
/// of the room. KEYS: the room's report hash (id -> JSON), its index (sorted set, score =
/// `at_ms`). ARGV: id, JSON, `at_ms`, the limit, the TTL in seconds.
const ADD_REPORT_LUA: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, over - 1)
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
";

impl RedisStore {
    /// Connect to `url` (`redis://127.0.0.1:6379/0`) with every key under `prefix`, and load
    /// the shared edge registry once. Fails if Redis cannot be reached.
    pub async fn connect(
        url: &str,
        prefix: &str,
        static_edges: &[EdgeEndpoint],
    ) -> Result<Self, StoreError> {
        Self::connect_trusting(url, prefix, static_edges, None).await
    }

    /// [`RedisStore::connect`]; a `rediss://` (TLS) server's certificate must chain to one of
    /// the PEM roots in `roots` when given (the system roots otherwise).
    pub async fn connect_trusting(
        url: &str,
        prefix: &str,
        static_edges: &[EdgeEndpoint],
        roots: Option<Vec<u8>>,
    ) -> Result<Self, StoreError> {
        let client = match roots {
            Some(root_cert) if url.starts_with("rediss://") => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            ),
            _ => redis::Client::open(url),
        }
        .map_err(|e| StoreError::Backend(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        let store = RedisStore {
            conn,
            prefix: prefix.to_string(),
            registry: RwLock::new(Registry::with_static(static_edges)),
            end_script: redis::Script::new(END_ROOM_LUA),
            reschedule_script: redis::Script::new(RESCHEDULE_ROOM_LUA),
            subscribe_script: redis::Script::new(SUBSCRIBE_REMINDER_LUA),
            report_script: redis::Script::new(ADD_REPORT_LUA),
            fallback: Mutex::new(Fallback::default()),
            breaker: Mutex::new(Breaker::default()),
        };
        store.sync(Now::read()).await?;
        store.index_legacy_rooms(Now::read().unix_secs()).await?;
        Ok(store)
    }

    /// Rooms stored by a release before the `open` index are listed in the old `rooms` set:
    /// index every one still open (active as of `now_unix`, so idle expiry counts from the
    /// upgrade) and empty the old set. Idempotent, so replicas starting together may all run
    /// it; bounded by the old set's size.
    async fn index_legacy_rooms(&self, now_unix: u64) -> Result<usize, StoreError> {
        let mut c = self.conn();
        let legacy = self.key("rooms");
        let mut indexed = 0;
        // Each round takes up to 500 ids out of the old set; a set of n ids takes n/500 rounds.
        loop {
            let ids: Vec<String> = redis::cmd("SPOP")
                .arg(&legacy)
                .arg(500)
                .query_async(&mut c)
                .await?;
            if ids.is_empty() {
                break;
            }
            for id in ids.iter().filter_map(|s| s.parse::<RoomId>().ok()) {
                let room = self.key(format!("room:{id}"));
                let (entry, ended, idx): (Option<String>, Option<u64>, Option<String>) =
                    redis::cmd("HMGET")
                        .arg(&room)
                        .arg("entry")
                        .arg("ended_at")
                        .arg("idx")
                        .query_async(&mut c)
                        .await?;
                let (Some(entry), None, None) = (entry, ended, idx) else {
                    continue;
                };
                let entry = match self.decode_entry(id, &entry, None) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(%id, error = %e, "legacy room not indexed");
                        continue;
                    }
                };
                let mut p = redis::pipe();
                self.index_open_room(&mut p, id, &entry, now_unix.max(entry.start()));
                p.query_async::<()>(&mut c).await?;
                indexed += 1;
            }
        }
        if indexed > 0 {
            tracing::info!(
                rooms = indexed,
                "rooms stored by an earlier release indexed"
            );
        }
        Ok(indexed)
    }

    /// Queue on `p` what lists room `id` as open: its `idx` member in `open`, and its last
    /// activity (`active_at`, Unix seconds) in `activity`.
    fn index_open_room(
        &self,
        p: &mut redis::Pipeline,
        id: RoomId,
        entry: &RoomEntry,
        active_at: u64,
    ) {
        let member = index_member((entry.start(), id));
        p.cmd("HSET")
            .arg(self.key(format!("room:{id}")))
            .arg("idx")
            .arg(&member)
            .ignore()
            .cmd("ZADD")
            .arg(self.key("open"))
            .arg(0)
            .arg(&member)
            .ignore()
            .cmd("ZADD")
            .arg(self.key("activity"))
            .arg(active_at)
            .arg(id.to_string())
            .ignore();
    }

    /// Run a request's Redis call `call`, unless the [`Breaker`] is open (then the same
    /// unreachable error at once, so the caller falls back without waiting).
    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !lock(&self.breaker).allows(Instant::now()) {
            return Err(StoreError::Backend(
                "Redis unreachable (skipped until the next sync reaches it)".into(),
            ));
        }
        let out = call.await;
        let mut b = lock(&self.breaker);
        match &out {
            Err(e) if unreachable(e) => b.failed(Instant::now()),
            _ => b.answered(),
        }
        out
    }

    fn key(&self, rest: impl std::fmt::Display) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn decode_entry(
        &self,
        id: RoomId,
        entry: &str,
        ended_at: Option<u64>,
    ) -> Result<RoomEntry, StoreError> {
        decode_room(entry, ended_at).map_err(|e| StoreError::Corrupt {
            key: self.key(format!("room:{id}")),
            message: e.to_string(),
        })
    }
}

impl RedisStore {
    async fn redis_create(&self, entry: &RoomEntry) -> Result<RoomId, StoreError> {
        // Bounded: a random 64-bit id collides with a stored one practically never.
        for _ in 0..16 {
            let id = RoomId::random();
            if self.redis_insert(id, entry).await? {
                return Ok(id);
            }
        }
        Err(StoreError::Backend("no free room id".into()))
    }

    /// Store `entry` under `id` unless that id is taken (`false`).
    async fn redis_insert(&self, id: RoomId, entry: &RoomEntry) -> Result<bool, StoreError> {
        let mut c = self.conn();
        let json = serde_json::to_string(entry).map_err(|e| StoreError::Backend(e.to_string()))?;
        let fresh: bool = redis::cmd("HSETNX")
            .arg(self.key(format!("room:{id}")))
            .arg("entry")
            .arg(&json)
            .query_async(&mut c)
            .await?;
        if !fresh {
            return Ok(false);
        }
        let mut p = redis::pipe();
        self.index_open_room(&mut p, id, entry, entry.start());
        if let Some(at) = entry.scheduled_at {
            p.cmd("ZADD")
                .arg(self.key("scheduled"))
                .arg(at)
                .arg(id.to_string())
                .ignore();
        }
        p.query_async::<()>(&mut c).await?;
        Ok(true)
    }

    async fn redis_room(&self, id: RoomId) -> Result<Option<RoomEntry>, StoreError> {
        let mut c = self.conn();
        let (entry, ended): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.key(format!("room:{id}")))
            .arg("entry")
            .arg("ended_at")
            .query_async(&mut c)
            .await?;
        entry.map(|e| self.decode_entry(id, &e, ended)).transpose()
    }

    async fn redis_end(&self, id: RoomId, now_unix: u64) -> Result<EndOutcome, StoreError> {
        let mut c = self.conn();
        let r: i64 = self
            .end_script
            .key(self.key(format!("room:{id}")))
            .key(self.key("scheduled"))
            .key(self.key("open"))
            .key(self.key("activity"))
            .arg(now_unix)
            .arg(ENDED_ROOM_TTL.as_secs())
            .arg(id.to_string())
            .invoke_async(&mut c)
            .await?;
        Ok(match r {
            1 => EndOutcome::Ended,
            0 => EndOutcome::AlreadyEnded,
            _ => EndOutcome::NotFound,
        })
    }

    /// One page of the open-room index: ids by lexicographic range (live part newest first,
    /// then scheduled part soonest first), then their entries in one pipeline.
    async fn redis_page(
        &self,
        cursor: Option<Cursor>,
        limit: usize,
        now_unix: u64,
    ) -> Result<Page, StoreError> {
        let mut c = self.conn();
        let now_member = index_member((now_unix, RoomId(u64::MAX)));
        let mut keys: Vec<Cursor> = Vec::with_capacity(limit);
        let live_max = match cursor {
            None => Some(format!("[{now_member}")),
            Some(Cursor::Live(k)) => Some(format!("({}", index_member(k).min(now_member.clone()))),
            Some(Cursor::Scheduled(_)) => None,
        };
        if let Some(max) = live_max {
            let members: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
                .arg(self.key("open"))
                .arg(max)
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut c)
                .await?;
            keys.extend(
                members
                    .iter()
                    .filter_map(|m| parse_index_member(m).map(Cursor::Live)),
            );
        }
        if keys.len() < limit {
            let min = match cursor {
                Some(Cursor::Scheduled(k)) => index_member(k).max(now_member),
                _ => now_member,
            };
            let members: Vec<String> = redis::cmd("ZRANGEBYLEX")
                .arg(self.key("open"))
                .arg(format!("({min}"))
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(limit - keys.len())
                .query_async(&mut c)
                .await?;
            keys.extend(
                members
                    .iter()
                    .filter_map(|m| parse_index_member(m).map(Cursor::Scheduled)),
            );
        }
        let next = if keys.len() == limit {
            keys.last().copied()
        } else {
            None
        };
        if keys.is_empty() {
            return Ok(Page {
                rooms: Vec::new(),
                next,
            });
        }
        let mut p = redis::pipe();
        for k in &keys {
            let id = k.room();
            p.cmd("HMGET")
                .arg(self.key(format!("room:{id}")))
                .arg("entry")
                .arg("ended_at");
        }
        let rows: Vec<(Option<String>, Option<u64>)> = p.query_async(&mut c).await?;
        let mut rooms = Vec::with_capacity(keys.len());
        for (k, (entry, ended)) in keys.iter().zip(rows) {
            let id = k.room();
            // A room ended between the two reads is no longer open: skipped.
            if let (Some(e), None) = (entry, ended) {
                rooms.push((id, self.decode_entry(id, &e, None)?));
            }
        }
        Ok(Page { rooms, next })
    }

    /// Replay the directory writes made while Redis was unreachable, in order; stops at the
    /// first failure.
    async fn replay(&self) -> Result<(), StoreError> {
        for _ in 0..FALLBACK_WRITES {
            let Some(w) = lock(&self.fallback).next_write().cloned() else {
                return Ok(());
            };
            match &w {
                DirectoryWrite::Create(id, entry) => {
                    if !self.redis_insert(*id, entry).await? {
                        tracing::error!(%id, "room id taken in Redis meanwhile; this replica's room is not shared");
                    }
                }
                DirectoryWrite::End(id, at) => {
                    self.redis_end(*id, *at).await?;
                }
            }
            lock(&self.fallback).replayed();
            tracing::info!(write = ?w, "directory write made during the Redis outage stored");
        }
        Ok(())
    }
}

impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn registry(&self) -> &RwLock<Registry> {
        &self.registry
    }

    fn create_room(&self, entry: RoomEntry) -> StoreFuture<'_, RoomId> {
        Box::pin(async move {
            match self.guarded(self.redis_create(&entry)).await {
                Ok(id) => {
                    lock(&self.fallback).remember(id, entry);
                    Ok(id)
                }
                Err(e) if unreachable(&e) => {
                    let id = RoomId::random();
                    if !lock(&self.fallback).create(id, entry) {
                        return Err(e);
                    }
                    tracing::warn!(%id, error = %e, "Redis unreachable: room created here, stored when Redis is back");
                    Ok(id)
                }
                Err(e) => Err(e),
            }
        })
    }

    fn room(&self, id: RoomId) -> StoreFuture<'_, Option<RoomEntry>> {
        Box::pin(async move {
            let local = {
                let f = lock(&self.fallback);
                f.pending_for(id).then(|| f.room(id).cloned())
            };
            if let Some(local) = local {
                return Ok(local);
            }
            match self.guarded(self.redis_room(id)).await {
                Ok(Some(e)) => {
                    lock(&self.fallback).remember(id, e.clone());
                    Ok(Some(e))
                }
                Ok(None) => Ok(None),
                Err(e) if unreachable(&e) => match lock(&self.fallback).room(id) {
                    Some(entry) => Ok(Some(entry.clone())),
                    None => Err(e),
                },
                Err(e) => Err(e),
            }
        })
    }

    fn end_room(&self, id: RoomId, now_unix: u64) -> StoreFuture<'_, EndOutcome> {
        Box::pin(async move {
            let local = {
                let mut f = lock(&self.fallback);
                if f.pending_for(id) {
                    f.end(id, now_unix)
                } else {
                    None
                }
            };
            if let Some(out) = local {
                return Ok(out);
            }
            match self.guarded(self.redis_end(id, now_unix)).await {
                Ok(out) => {
                    if let Some(e) = lock(&self.fallback).known.get_mut(&id) {
                        e.ended_at.get_or_insert(now_unix);
                    }
                    Ok(out)
                }
                Err(e) if unreachable(&e) => match lock(&self.fallback).end(id, now_unix) {
                    Some(out) => Ok(out),
                    None => Err(e),
                },
                Err(e) => Err(e),
            }
        })
    }

    fn page(&self, cursor: Option<Cursor>, limit: usize, now_unix: u64) -> StoreFuture<'_, Page> {
        Box::pin(async move {
            match self.guarded(self.redis_page(cursor, limit, now_unix)).await {
                Err(e) if unreachable(&e) => {
                    // Redis is away: the rooms this replica knows.
                    let mut d = Directory::default();
                    for (id, e) in &lock(&self.fallback).known {
                        d.put(*id, e.clone());
                    }
                    Ok(d.page(cursor, limit, now_unix))
                }
                other => other,
            }
        })
    }

    fn counts(&self, now_unix: u64) -> StoreFuture<'_, RoomCounts> {
        Box::pin(async move {
            let mut c = self.conn();
            let (open, scheduled): (u64, u64) = redis::pipe()
                .cmd("ZCARD")
                .arg(self.key("open"))
                .cmd("ZLEXCOUNT")
                .arg(self.key("open"))
                .arg(format!("({}", index_member((now_unix, RoomId(u64::MAX)))))
                .arg("+")
                .query_async(&mut c)
                .await?;
            Ok(RoomCounts {
                live: open.saturating_sub(scheduled),
                scheduled,
            })
        })
    }

    fn touch(&self, room: RoomId, now_unix: u64) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut c = self.conn();
            self.guarded(async {
                redis::cmd("ZADD")
                    .arg(self.key("activity"))
                    .arg("XX")
                    .arg("GT")
                    .arg(now_unix)
                    .arg(room.to_string())
                    .query_async::<()>(&mut c)
                    .await
                    .map_err(StoreError::from)
            })
            .await
        })
    }

    fn idle_rooms(
        &self,
        expiry: Expiry,
        now_unix: u64,
        max: usize,
    ) -> StoreFuture<'_, Vec<RoomId>> {
        Box::pin(async move {
            let Some(cutoff) = expiry.cutoff(now_unix) else {
                return Ok(Vec::new());
            };
            let mut c = self.conn();
            let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.key("activity"))
                .arg("-inf")
                .arg(cutoff)
                .arg("LIMIT")
                .arg(0)
                .arg(max)
                .query_async(&mut c)
                .await?;
            Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
        })
    }

    fn scheduled_between(&self, after: u64, until: u64) -> StoreFuture<'_, Vec<RoomId>> {
        Box::pin(async move {
            let mut c = self.conn();
            let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.key("scheduled"))
                .arg(format!("({after}"))
                .arg(until)
                .query_async(&mut c)
                .await?;
            Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
        })
    }

    fn heartbeat(&self, hb: EdgeHeartbeat, now: Now) -> StoreFuture<'_, Beat> {
        Box::pin(async move {
            validate(&hb)?;
            // Routing never waits on Redis: this replica's mirror hears the beat first, so a
            // Redis that stops answering (each call then waits for its timeouts) cannot make
            // the edges look dead here.
            let local_previous = {
                let mut reg = write(&self.registry);
                let previous = previous_rooms(&reg, &hb.id, now.instant);
                let _ = reg.heartbeat(hb.clone(), now.instant);
                previous
            };
            let mut c = self.conn();
            let json = serde_json::to_string(&StoredEdge {
                beat: hb.clone(),
                seen_ms: now.unix_ms,
            })
            .map_err(|e| StoreError::Backend(e.to_string()))?;
            let mut p = redis::pipe();
            if !hb.rooms.is_empty() {
                // The rooms this edge holds are active (only rooms still open: XX).
                let at = now.unix_secs();
                p.cmd("ZADD").arg(self.key("activity")).arg("XX").arg("GT");
                for r in &hb.rooms {
                    p.arg(at).arg(r.room.to_string());
                }
                p.ignore();
            }
            p.cmd("SET")
                .arg(self.key(format!("edge:{}", hb.id)))
                .arg(json)
                .arg("PX")
                .arg(EDGE_TTL.as_millis() as u64)
                .arg("GET")
                .cmd("SADD")
                .arg(self.key("edges"))
                .arg(&hb.id)
                .ignore()
                .cmd("SISMEMBER")
                .arg(self.key("drain"))
                .arg(&hb.id);
            let stored: Result<(Option<String>, bool), StoreError> = self
                .guarded(async { p.query_async(&mut c).await.map_err(StoreError::from) })
                .await;
            let (old, drain) = match stored {
                Ok(v) => v,
                Err(e) if unreachable(&e) => {
                    // Redis is away: this replica keeps routing to the edges that beat here.
                    return Ok(Beat {
                        new: local_previous.is_none(),
                        previous: local_previous.unwrap_or_default(),
                        drain: false,
                    });
                }
                Err(e) => return Err(e),
            };
            let out_after = (HEARTBEAT_INTERVAL * MISSED_HEARTBEATS).as_millis() as u64;
            let previous = old
                .and_then(|o| serde_json::from_str::<StoredEdge>(&o).ok())
                .filter(|o| now.unix_ms.saturating_sub(o.seen_ms) < out_after)
                .map(|o| o.beat.rooms.iter().map(|r| (r.room, r.sessions)).collect());
            let new = previous.is_none();
            let id = hb.id.clone();
            let mut reg = write(&self.registry);
            // The mirror may be full while Redis is not; selection then misses this edge until
            // the registry shrinks, which the sync logs.
            let _ = reg.heartbeat(hb, now.instant);
            if drain {
                reg.request_drain(&id);
            }
            Ok(Beat {
                new,
                previous: previous.unwrap_or_default(),
                drain,
            })
        })
    }

    fn request_drain(&self, id: String) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let mut c = self.conn();
            let known_here = read(&self.registry).knows(&id);
            let known = known_here
                || redis::cmd("EXISTS")
                    .arg(self.key(format!("edge:{id}")))
                    .query_async::<bool>(&mut c)
                    .await?;
            if !known {
                return Ok(false);
            }
            redis::cmd("SADD")
                .arg(self.key("drain"))
                .arg(&id)
                .query_async::<()>(&mut c)
                .await?;
            write(&self.registry).request_drain(&id);
            Ok(true)
        })
    }

    fn recording_decision(&self, room: RoomId) -> StoreFuture<'_, Option<RecordingDecision>> {
        let key = self.key(format!("recording:{room}"));
        Box::pin(async move {
            let call = async {
                let mut c = self.conn();
                let v: Option<String> = redis::cmd("GET").arg(key).query_async(&mut c).await?;
                Ok(v.as_deref().and_then(RecordingDecision::parse))
            };
            self.guarded(call).await
        })
    }

    fn decide_recording(
        &self,
        room: RoomId,
        wanted: RecordingDecision,
    ) -> StoreFuture<'_, RecordingDecision> {
        let key = self.key(format!("recording:{room}"));
        Box::pin(async move {
            let call = async {
                let mut c = self.conn();
                // A deletion overwrites; a publication never overwrites a deletion.
                let set: Option<String> = match wanted {
                    RecordingDecision::Deleted => {
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(wanted.as_str())
                            .query_async(&mut c)
                            .await?
                    }
                    RecordingDecision::Published => {
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(wanted.as_str())
                            .arg("NX")
                            .query_async(&mut c)
                            .await?
                    }
                };
                if set.is_some() {
                    return Ok(wanted);
                }
                let v: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut c).await?;
                Ok(RecordingDecision::after(
                    v.as_deref().and_then(RecordingDecision::parse),
                    wanted,
                ))
            };
            self.guarded(call).await
        })
    }

    fn claim_once(&self, what: &str, room: RoomId) -> StoreFuture<'_, bool> {
        let key = self.key(format!("once:{what}:{room}"));
        Box::pin(async move {
            let mut c = self.conn();
            let set: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(ONCE_TTL_SECS)
                .query_async(&mut c)
                .await?;
            Ok(set.is_some())
        })
    }

    fn reschedule_room(&self, id: RoomId, at: u64, now_unix: u64) -> StoreFuture<'_, Rescheduled> {
        Box::pin(async move {
            let Some(entry) = self.room(id).await? else {
                return Ok(Rescheduled::NotFound);
            };
            let moved = RoomEntry {
                scheduled_at: Some(at),
                ..entry
            };
            let json =
                serde_json::to_string(&moved).map_err(|e| StoreError::Backend(e.to_string()))?;
            let call = async {
                let mut c = self.conn();
                let r: i64 = self
                    .reschedule_script
                    .key(self.key(format!("room:{id}")))
                    .key(self.key("open"))
                    .key(self.key("scheduled"))
                    .key(self.key("activity"))
                    .key(self.key(format!("reminders:{id}")))
                    .arg(&json)
                    .arg(index_member((moved.start(), id)))
                    .arg(at)
                    .arg(id.to_string())
                    .arg(now_unix)
                    .arg(reminder_ttl(at, now_unix))
                    .invoke_async(&mut c)
                    .await?;
                Ok::<_, StoreError>(r)
            };
            Ok(match self.guarded(call).await? {
                -1 => Rescheduled::NotFound,
                previous if previous >= 0 => {
                    lock(&self.fallback).remember(id, moved);
                    Rescheduled::Moved {
                        previous: previous as u64,
                    }
                }
                _ => Rescheduled::NotScheduled,
            })
        })
    }

    fn subscribe_reminder(
        &self,
        room: RoomId,
        user: String,
        keep_secs: u64,
    ) -> StoreFuture<'_, Subscription> {
        Box::pin(async move {
            let call = async {
                let mut c = self.conn();
                let (added, count): (i64, u64) = self
                    .subscribe_script
                    .key(self.key(format!("reminders:{room}")))
                    .arg(&user)
                    .arg(MAX_SUBSCRIBERS_PER_ROOM)
                    .arg(keep_secs.max(1))
                    .invoke_async(&mut c)
                    .await?;
                Ok::<_, StoreError>(match added {
                    1 => Subscription::Added(count),
                    0 => Subscription::Already(count),
                    _ => Subscription::Full,
                })
            };
            self.guarded(call).await
        })
    }

    fn unsubscribe_reminder(&self, room: RoomId, user: String) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let call = async {
                let mut c = self.conn();
                let removed: u64 = redis::cmd("SREM")
                    .arg(self.key(format!("reminders:{room}")))
                    .arg(&user)
                    .query_async(&mut c)
                    .await?;
                Ok::<_, StoreError>(removed > 0)
            };
            self.guarded(call).await
        })
    }

    fn reminder_subscribers(&self, room: RoomId) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let call = async {
                let mut c = self.conn();
                let mut users: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(self.key(format!("reminders:{room}")))
                    .query_async(&mut c)
                    .await?;
                users.sort_unstable();
                Ok::<_, StoreError>(users)
            };
            self.guarded(call).await
        })
    }

    fn reminder_counts(&self, rooms: Vec<RoomId>) -> StoreFuture<'_, Vec<u64>> {
        Box::pin(async move {
            if rooms.is_empty() {
                return Ok(Vec::new());
            }
            let call = async {
                let mut c = self.conn();
                let mut p = redis::pipe();
                for room in &rooms {
                    p.cmd("SCARD").arg(self.key(format!("reminders:{room}")));
                }
                Ok::<_, StoreError>(p.query_async::<Vec<u64>>(&mut c).await?)
            };
            self.guarded(call).await
        })
    }

    fn clear_reminders(&self, room: RoomId) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let call = async {
                let mut c = self.conn();
                redis::cmd("DEL")
                    .arg(self.key(format!("reminders:{room}")))
                    .query_async::<()>(&mut c)
                    .await?;
                Ok::<_, StoreError>(())
            };
            self.guarded(call).await
        })
    }

    fn revoke_token(&self, jti: String, until_unix: u64, now_unix: u64) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            if until_unix <= now_unix {
                return Ok(());
            }
            let call = async {
                let mut c = self.conn();
                // The key expires with the token; the index lists them for link re-sends.
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(self.key(format!("revoked:{jti}")))
                    .arg(until_unix)
                    .arg("EX")
                    .arg(until_unix - now_unix)
                    .ignore()
                    .cmd("ZADD")
                    .arg(self.key("revoked"))
                    .arg(until_unix)
                    .arg(&jti)
                    .ignore()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(self.key("revoked"))
                    .arg("-inf")
                    .arg(now_unix)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await?;
                Ok(())
            };
            self.guarded(call).await
        })
    }

    fn is_token_revoked(&self, jti: String, _now_unix: u64) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let call = async {
                let mut c = self.conn();
                let revoked: bool = redis::cmd("EXISTS")
                    .arg(self.key(format!("revoked:{jti}")))
                    .query_async(&mut c)
                    .await?;
                Ok(revoked)
            };
            self.guarded(call).await
        })
    }

    fn revoked_tokens(&self, now_unix: u64) -> StoreFuture<'_, Vec<(String, u64)>> {
        Box::pin(async move {
            let call = async {
                let mut c = self.conn();
                let flat: Vec<(String, u64)> = redis::cmd("ZRANGEBYSCORE")
                    .arg(self.key("revoked"))
                    .arg(format!("({now_unix}"))
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await?;
                Ok(flat)
            };
            self.guarded(call).await
        })
    }

    fn add_report(&self, report: Report) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let json = serde_json::to_string(&report).map_err(|e| StoreError::Corrupt {
                key: format!("reports:{}", report.room),
                message: e.to_string(),
            })?;
            let call = async {
                let mut c = self.conn();
                let added: i64 = self
                    .report_script
                    .key(self.key(format!("reports:{}", report.room)))
                    .key(self.key(format!("reportidx:{}", report.room)))
                    .arg(&report.id)
                    .arg(json)
                    .arg(report.at_ms)
                    .arg(MAX_REPORTS_PER_ROOM)
                    .arg(REPORT_TTL.as_secs())
                    .invoke_async(&mut c)
                    .await?;
                Ok::<_, StoreError>(added == 1)
            };
            self.guarded(call).await
        })
    }

    fn reports(&self, room: RoomId, limit: usize) -> StoreFuture<'_, Vec<Report>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let call = async {
                let mut c = self.conn();
                let ids: Vec<String> = redis::cmd("ZREVRANGE")
                    .arg(self.key(format!("reportidx:{room}")))
                    .arg(0)
                    .arg(limit - 1)
                    .query_async(&mut c)
                    .await?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let key = self.key(format!("reports:{room}"));
                let bodies: Vec<Option<String>> = redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&ids)
                    .query_async(&mut c)
                    .await?;
                // An id whose body went (trimmed meanwhile) is skipped.
                bodies
                    .into_iter()
                    .flatten()
                    .map(|json| {
                        serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                            key: key.clone(),
                            message: e.to_string(),
                        })
                    })
                    .collect()
            };
            self.guarded(call).await
        })
    }

    fn sync(&self, now: Now) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.replay().await?;
            let mut c = self.conn();
            let (ids, drains): (Vec<String>, Vec<String>) = redis::pipe()
                .cmd("SMEMBERS")
                .arg(self.key("edges"))
                .cmd("SMEMBERS")
                .arg(self.key("drain"))
                .query_async(&mut c)
                .await?;
            // Redis answers again: requests stop skipping it.
            lock(&self.breaker).answered();
            let mut beats = Vec::with_capacity(ids.len());
            let mut gone = Vec::new();
            if !ids.is_empty() {
                let keys: Vec<String> = ids
                    .iter()
                    .map(|id| self.key(format!("edge:{id}")))
                    .collect();
                let values: Vec<Option<String>> =
                    redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
                for (id, v) in ids.iter().zip(values) {
                    match v.and_then(|v| decode_edge(&v, now)) {
                        Some(beat) => beats.push(beat),
                        None => gone.push(id.clone()),
                    }
                }
            }
            if !gone.is_empty() {
                redis::pipe()
                    .cmd("SREM")
                    .arg(self.key("edges"))
                    .arg(&gone)
                    .ignore()
                    .cmd("SREM")
                    .arg(self.key("drain"))
                    .arg(&gone)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await?;
            }
            let drains: BTreeSet<String> =
                drains.into_iter().filter(|d| !gone.contains(d)).collect();
            let mut reg = write(&self.registry);
            let dropped = reg.mirror(beats, drains);
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    "edge registry full: some shared edges are not mirrored"
                );
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(title: &str) -> RoomEntry {
        RoomEntry {
            title: title.into(),
            topic: None,
            created_at: 1_000,
            scheduled_at: None,
            ended_at: None,
            tiers: None,
        }
    }

    #[test]
    fn fallback_creates_and_ends_rooms_and_replays_the_writes_in_order() {
        let mut f = Fallback::default();
        let (a, b) = (RoomId(1), RoomId(2));
        // Read from Redis before the outage: known, nothing to replay.
        f.remember(a, entry("a"));
        assert!(!f.pending_for(a));
        assert_eq!(f.next_write(), None);
        // During the outage: a room is created and one ended.
        assert!(f.create(b, entry("b")));
        assert_eq!(f.room(b), Some(&entry("b")));
        assert_eq!(f.end(a, 2_000), Some(EndOutcome::Ended));
        assert_eq!(f.end(a, 2_001), Some(EndOutcome::AlreadyEnded));
        assert_eq!(
            f.end(RoomId(3), 2_000),
            None,
            "unknown here: cannot be decided"
        );
        assert!(f.pending_for(a) && f.pending_for(b));
        assert_eq!(f.room(a).and_then(|e| e.ended_at), Some(2_000));
        // Replay, oldest first.
        assert_eq!(f.next_write(), Some(&DirectoryWrite::Create(b, entry("b"))));
        f.replayed();
        assert_eq!(f.next_write(), Some(&DirectoryWrite::End(a, 2_000)));
        f.replayed();
        assert_eq!(f.next_write(), None);
        assert!(!f.pending_for(a) && !f.pending_for(b));
        assert!(
            f.room(b).is_some(),
            "still answered while Redis is away again"
        );
    }

    #[test]
    fn fallback_is_bounded() {
        let mut f = Fallback::default();
        for i in 0..FALLBACK_WRITES as u64 {
            assert!(f.create(RoomId(i), entry("r")));
        }
        assert!(!f.create(RoomId(u64::MAX), entry("r")), "write queue full");
        assert_eq!(f.end(RoomId(0), 5), None);
        f.remember(RoomId(u64::MAX - 1), entry("x"));
        assert!(f.room(RoomId(u64::MAX - 1)).is_none(), "room cache full");
    }
}
