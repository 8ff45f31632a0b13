//! Durable room state: after every command the room authority applies, what it changed of the
//! room's durable state ([`RoomChanges`]: the participants it touched, the hand queue, bans,
//! phase, the roles of the users involved) is handed to a [`Persister`], whose writer task stores
//! it in Redis; a restarted origin loads a room on first use ([`RoomStore::load`]), so rooms,
//! roles, hands and bans survive it. Commands that change nothing durable (chat, reactions)
//! write nothing, and a join in a room of 10,000 writes one participant, not 10,000.
//!
//! Nothing here is on the media path, and nothing blocks the authority: [`Persister::save_changes`]
//! only merges the changes into the room's pending entry in a map bounded by [`MAX_PENDING`]
//! rooms (newer values of a field win) and wakes the writer.
//!
//! If Redis cannot be read when a room is first used (an outage), the room runs from a fresh
//! state ("unverified") and its changes are held ([`Persister::hold`]) so that they cannot
//! overwrite what is stored; once Redis answers, the hub merges the stored state in
//! ([`reconcile`]: bans, stored roles, an ended phase win) and writes the whole merged state
//! ([`Persister::save`]). An origin that already holds a room keeps writing its changes through
//! the outage (retried, merged with newer ones).
//!
//! Redis layout: `amphi:roomh:{room}` is a hash: `phase`, `hands`, `banned` (JSON), `p:{id}` (a
//! participant, JSON), `o:{id}` (its join stamp, which orders participants on load) and
//! `r:{user}` (the role the user last held, JSON). Its TTL is [`LIVE_TTL`] (refreshed by every
//! write) or [`ENDED_TTL`] once the room ended.

use amphi_common::breaker::Breaker;
use amphi_protocol::room::{Participant, RoomPhase, RoomRole, RoomState};
use amphi_protocol::{ParticipantId, RoomId};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Rooms whose changes may wait for the writer at once; beyond it new rooms' changes are
/// dropped (counted) until the writer catches up.
pub const MAX_PENDING: usize = 100_000;
/// How long a live room's state is kept after its last change.
pub const LIVE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an ended room's state is kept (joins are refused with `room_ended` meanwhile).
pub const ENDED_TTL: Duration = Duration::from_secs(6 * 3600);
/// Longest one Redis operation may take (each [`RoomStore`] call is bounded by it).
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// The writer's first retry delay after a failed write (doubling).
const WRITE_RETRY_FIRST: Duration = Duration::from_millis(100);
/// The writer's longest retry delay: how late, at most, changes made during a Redis outage are
/// written after it ends (plus one write).
const WRITE_RETRY_MAX: Duration = Duration::from_secs(1);

/// What is persisted of a room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedRoom {
    /// Participants, hands, bans, phase.
    pub state: RoomState,
    /// The role each user last held (a user who reconnects gets it back).
    pub roles: Vec<(String, RoomRole)>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Redis failed or timed out.
    #[error("redis: {0}")]
    Redis(String),
    /// Redis failed moments ago: reads skip it until it answers again (or the breaker's bound).
    #[error("redis unreachable moments ago; not asked again yet")]
    Skipped,
    /// A stored record cannot be read.
    #[error("stored room {room}: {message}")]
    Corrupt {
        /// The room.
        room: RoomId,
        /// What is wrong.
        message: String,
    },
}

impl From<redis::RedisError> for PersistError {
    fn from(e: redis::RedisError) -> Self {
        PersistError::Redis(e.to_string())
    }
}

/// Room state in Redis.
#[derive(Clone)]
pub struct RoomStore {
    conn: ConnectionManager,
    prefix: String,
    /// After a failed call, loads on the join path skip Redis (the room runs unverified at once
    /// instead of waiting for a timeout) until a write of the persister or a background load
    /// reaches it again.
    breaker: Arc<Mutex<Breaker>>,
}

impl RoomStore {
    /// Connect to `url` (`redis://host:port/db`); every key starts with `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, PersistError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(RoomStore {
            conn,
            prefix: prefix.to_string(),
            breaker: Arc::default(),
        })
    }

    fn key(&self, room: RoomId) -> String {
        format!("{}roomh:{room}", self.prefix)
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record how a call to Redis ended (an unanswered call opens the breaker).
    fn observe<T>(&self, r: Result<T, PersistError>) -> Result<T, PersistError> {
        match &r {
            Err(PersistError::Redis(_)) => self.breaker().failed(Instant::now()),
            _ => self.breaker().answered(),
        }
        r
    }

    /// The persisted state of `room`, if any, unless Redis failed moments ago (the breaker is
    /// open): then [`PersistError::Skipped`] at once. For requests that someone waits for.
    pub async fn load_unless_failing(
        &self,
        room: RoomId,
    ) -> Result<Option<PersistedRoom>, PersistError> {
        if !self.breaker().allows(Instant::now()) {
            return Err(PersistError::Skipped);
        }
        self.load(room).await
    }

    /// The persisted state of `room`, if any, asking Redis even while the breaker is open (a
    /// background probe: an answer closes the breaker).
    pub async fn load(&self, room: RoomId) -> Result<Option<PersistedRoom>, PersistError> {
        let mut c = self.conn.clone();
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.key(room));
        let read = cmd.query_async::<HashMap<String, Vec<u8>>>(&mut c);
        let fields = match tokio::time::timeout(OP_TIMEOUT, read).await {
            Ok(r) => r.map_err(PersistError::from),
            Err(_) => Err(PersistError::Redis("timed out".into())),
        };
        let fields = self.observe(fields)?;
        assemble(room, &fields).map_err(|message| PersistError::Corrupt { room, message })
    }

    /// Apply `changes` to what is stored of `room` (one atomic pipeline).
    pub async fn store(&self, room: RoomId, changes: &RoomChanges) -> Result<(), PersistError> {
        let (puts, dels) = changes.fields();
        let ttl = match changes.phase {
            Some(RoomPhase::Ended) => ENDED_TTL,
            _ => LIVE_TTL,
        };
        let key = self.key(room);
        let mut p = redis::pipe();
        p.atomic();
        if changes.reset {
            p.cmd("DEL").arg(&key).ignore();
        }
        if !puts.is_empty() {
            p.cmd("HSET").arg(&key);
            for (f, v) in &puts {
                p.arg(f).arg(v);
            }
            p.ignore();
        }
        if !dels.is_empty() {
            p.cmd("HDEL").arg(&key).arg(&dels).ignore();
        }
        p.cmd("EXPIRE").arg(&key).arg(ttl.as_secs()).ignore();
        let mut c = self.conn.clone();
        let written = match tokio::time::timeout(OP_TIMEOUT, p.query_async::<()>(&mut c)).await {
            Ok(r) => r.map_err(PersistError::from),
            Err(_) => Err(PersistError::Redis("timed out".into())),
        };
        self.observe(written)
    }
}

/// What changed of one room's durable state, waiting for the writer: fields set (`Some`) or
/// removed (participants `None`); `reset` replaces everything stored. Built by the authority
/// from a command's events ([`crate::room::Room::changes`]) or from a whole state
/// ([`RoomChanges::full`]); merged newest-wins ([`RoomChanges::merge`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomChanges {
    /// Everything stored is replaced by these fields.
    pub reset: bool,
    /// The room's phase.
    pub phase: Option<RoomPhase>,
    /// The hand queue.
    pub hands: Option<Vec<ParticipantId>>,
    /// The banned users.
    pub banned: Option<Vec<String>>,
    /// Participants present now (`Some`) or gone (`None`).
    pub participants: BTreeMap<ParticipantId, Option<Participant>>,
    /// Participants who joined, in join order, with their join stamp (filled in by
    /// [`Persister::save_changes`]; stamps order participants on load).
    pub joined: Vec<(ParticipantId, u64)>,
    /// The role each user involved last held.
    pub roles: BTreeMap<String, RoomRole>,
}

impl RoomChanges {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        *self == RoomChanges::default()
    }

    /// The whole durable state of a room, replacing what is stored.
    pub fn full(saved: &PersistedRoom) -> Self {
        RoomChanges {
            reset: true,
            phase: Some(saved.state.phase),
            hands: Some(saved.state.hands.clone()),
            banned: Some(saved.state.banned.clone()),
            participants: saved
                .state
                .participants
                .iter()
                .map(|p| (p.id, Some(p.clone())))
                .collect(),
            joined: saved.state.participants.iter().map(|p| (p.id, 0)).collect(),
            roles: saved.roles.iter().cloned().collect(),
        }
    }

    /// Lay `newer` over these changes (a reset drops everything older).
    pub fn merge(&mut self, newer: RoomChanges) {
        if newer.reset {
            *self = newer;
            return;
        }
        if newer.phase.is_some() {
            self.phase = newer.phase;
        }
        if newer.hands.is_some() {
            self.hands = newer.hands;
        }
        if newer.banned.is_some() {
            self.banned = newer.banned;
        }
        for (id, p) in newer.participants {
            if p.is_none() {
                self.joined.retain(|(j, _)| *j != id);
            }
            self.participants.insert(id, p);
        }
        self.joined.extend(newer.joined);
        self.roles.extend(newer.roles);
    }

    /// The hash fields to set and to delete.
    pub fn fields(&self) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
        let mut puts = Vec::new();
        let mut dels = Vec::new();
        if let Some(phase) = &self.phase {
            puts.push(("phase".to_string(), json(phase)));
        }
        if let Some(hands) = &self.hands {
            puts.push(("hands".to_string(), json(hands)));
        }
        if let Some(banned) = &self.banned {
            puts.push(("banned".to_string(), json(banned)));
        }
        for (id, p) in &self.participants {
            match p {
                Some(p) => puts.push((format!("p:{}", id.0), json(p))),
                None => {
                    dels.push(format!("p:{}", id.0));
                    dels.push(format!("o:{}", id.0));
                }
            }
        }
        for (id, stamp) in &self.joined {
            puts.push((format!("o:{}", id.0), stamp.to_string().into_bytes()));
        }
        for (user, role) in &self.roles {
            puts.push((format!("r:{user}"), json(role)));
        }
        (puts, dels)
    }
}

/// JSON of a field value (plain data: serializing it cannot fail).
fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// A room's durable state from its stored hash fields (see the module documentation); `None`
/// if nothing is stored, `Err` with what is wrong if a field cannot be read.
pub fn assemble(
    room: RoomId,
    fields: &HashMap<String, Vec<u8>>,
) -> Result<Option<PersistedRoom>, String> {
    fn parse<T: serde::de::DeserializeOwned>(name: &str, v: &[u8]) -> Result<T, String> {
        serde_json::from_slice(v).map_err(|e| format!("field {name}: {e}"))
    }
    if fields.is_empty() {
        return Ok(None);
    }
    let mut state = RoomState {
        room,
        phase: RoomPhase::Live,
        participants: Vec::new(),
        hands: Vec::new(),
        banned: Vec::new(),
    };
    let mut stamps: HashMap<u32, u64> = HashMap::new();
    let mut roles = Vec::new();
    for (name, v) in fields {
        match name.split_once(':') {
            None if name == "phase" => state.phase = parse(name, v)?,
            None if name == "hands" => state.hands = parse(name, v)?,
            None if name == "banned" => state.banned = parse(name, v)?,
            Some(("p", _)) => state.participants.push(parse(name, v)?),
            Some(("o", id)) => {
                let id = id.parse().map_err(|_| format!("field {name}: bad id"))?;
                let stamp = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("field {name}: bad stamp"))?;
                stamps.insert(id, stamp);
            }
            Some(("r", user)) => roles.push((user.to_string(), parse(name, v)?)),
            _ => return Err(format!("unknown field {name}")),
        }
    }
    state
        .participants
        .sort_by_key(|p| (stamps.get(&p.id.0).copied().unwrap_or(u64::MAX), p.id));
    roles.sort_by(|a: &(String, RoomRole), b| a.0.cmp(&b.0));
    Ok(Some(PersistedRoom { state, roles }))
}

/// The state of a room that this origin started afresh because its stored state could not be
/// read (the store was unreachable), merged with the stored state once it can be read, so that
/// nothing decided before the outage is lost or overwritten:
///
/// - an ended room stays ended;
/// - every ban stands (the union of both), and a banned user who joined meanwhile is removed
///   (with their raised hand);
/// - a user the stored record knows keeps the stored role (a demotion or promotion made before
///   the outage sticks; a token cannot undo it), users it does not know keep ours;
/// - presence (participants, hand order) is ours: it is what the edges announce now.
pub fn reconcile(stored: PersistedRoom, ours: PersistedRoom) -> PersistedRoom {
    let mut out = ours;
    if stored.state.phase == RoomPhase::Ended {
        out.state.phase = RoomPhase::Ended;
    }
    let mut banned = stored.state.banned;
    for u in out.state.banned.drain(..) {
        if !banned.contains(&u) {
            banned.push(u);
        }
    }
    out.state.banned = banned;
    let stored_roles: HashMap<String, RoomRole> = stored.roles.into_iter().collect();
    for (user, role) in &mut out.roles {
        if let Some(r) = stored_roles.get(user) {
            *role = *r;
        }
    }
    for (user, role) in stored_roles {
        if !out.roles.iter().any(|(u, _)| *u == user) {
            out.roles.push((user, role));
        }
    }
    out.roles.sort_by(|a, b| a.0.cmp(&b.0));
    let bans = out.state.banned.clone();
    out.state.participants.retain(|p| !bans.contains(&p.user));
    for p in &mut out.state.participants {
        if let Some((_, r)) = out.roles.iter().find(|(u, _)| *u == p.user) {
            p.role = *r;
        }
    }
    let present: Vec<_> = out.state.participants.iter().map(|p| p.id).collect();
    out.state.hands.retain(|h| present.contains(h));
    out
}

/// The pending changes the writer may store now: all but those of held rooms, which stay
/// pending.
pub fn take_writable(
    pending: &mut HashMap<RoomId, RoomChanges>,
    held: &std::collections::HashSet<RoomId>,
) -> Vec<(RoomId, RoomChanges)> {
    let ready: Vec<RoomId> = pending
        .keys()
        .filter(|r| !held.contains(r))
        .copied()
        .collect();
    ready
        .iter()
        .filter_map(|r| pending.remove(r).map(|c| (*r, c)))
        .collect()
}

/// Hands room changes to a writer task without ever waiting (see the module documentation).
pub struct Persister {
    pending: Mutex<HashMap<RoomId, RoomChanges>>,
    /// The next join stamp (starts at the wall clock in microseconds, so a restarted origin's
    /// stamps follow the stored ones).
    next_stamp: AtomicU64,
    /// Rooms whose snapshots must not be written: started afresh while their stored state was
    /// unreadable, until the stored state is merged in ([`reconcile`]).
    held: Mutex<std::collections::HashSet<RoomId>>,
    wake: Notify,
    /// Change sets written.
    pub written: AtomicU64,
    /// Write attempts that failed (retried).
    pub failed: AtomicU64,
    /// Change sets dropped because too many rooms were waiting.
    pub dropped: AtomicU64,
    /// Rooms of the writer's current pass (taken from `pending`, not yet known written); read
    /// and written under the `pending` lock.
    writing: AtomicUsize,
}

impl Persister {
    /// Start the writer task for `store`; it stops (after a last flush) when `shutdown` fires.
    pub fn start(store: RoomStore, shutdown: CancellationToken) -> Arc<Self> {
        let p = Arc::new(Persister::new());
        tokio::spawn(p.clone().writer(store, shutdown));
        p
    }

    /// A persister without a writer (the writer task is started by [`Persister::start`]).
    fn new() -> Self {
        let unix_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        Persister {
            pending: Mutex::new(HashMap::new()),
            next_stamp: AtomicU64::new(unix_us),
            held: Mutex::new(Default::default()),
            wake: Notify::new(),
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            writing: AtomicUsize::new(0),
        }
    }

    /// Queue a room's whole state for writing, replacing what is stored (after a reconcile or
    /// an end). Never blocks on IO.
    pub fn save(&self, saved: &PersistedRoom) {
        self.save_changes(saved.state.room, RoomChanges::full(saved));
    }

    /// Queue what a command changed of `room` for writing (merged with what is pending). Never
    /// blocks on IO; costs what changed, not the room's size.
    pub fn save_changes(&self, room: RoomId, mut changes: RoomChanges) {
        if changes.is_empty() {
            return;
        }
        for (_, stamp) in &mut changes.joined {
            *stamp = self.next_stamp.fetch_add(1, Relaxed);
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING && !pending.contains_key(&room) {
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        pending.entry(room).or_default().merge(changes);
        drop(pending);
        self.wake.notify_one();
    }

    /// Do not write `room`'s changes (its stored state could not be read): writing them
    /// would overwrite bans and roles stored before. They wait until [`Persister::release`].
    pub fn hold(&self, room: RoomId) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room);
    }

    /// `room`'s state was reconciled with the stored one: write its changes again.
    pub fn release(&self, room: RoomId) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&room);
        self.wake.notify_one();
    }

    /// Whether `room`'s changes are held.
    pub fn is_held(&self, room: RoomId) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&room)
    }

    /// Rooms whose changes wait for the writer.
    pub fn backlog(&self) -> usize {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.len() + self.writing.load(Relaxed)
    }

    async fn writer(self: Arc<Self>, store: RoomStore, shutdown: CancellationToken) {
        let mut backoff = WRITE_RETRY_FIRST;
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = self.wake.notified() => false,
            };
            let batch: Vec<(RoomId, RoomChanges)> = {
                let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let batch = take_writable(&mut pending, &held);
                self.writing.store(batch.len(), Relaxed);
                batch
            };
            let (failed, attempts) = self.write_batch(&store, batch).await;
            let retry = !failed.is_empty();
            {
                // Put them back, under what arrived meanwhile (newer values win); the backlog
                // never looks empty while a pass is under way.
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for (room, mut changes) in failed {
                    if let Some(newer) = pending.remove(&room) {
                        changes.merge(newer);
                    }
                    pending.insert(room, changes);
                }
                self.writing.store(0, Relaxed);
            }
            if stopping {
                return;
            }
            if !retry {
                backoff = WRITE_RETRY_FIRST;
                continue;
            }
            self.failed.fetch_add(attempts, Relaxed);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(WRITE_RETRY_MAX);
            self.wake.notify_one();
        }
    }

    /// Write `batch` room by room. Once Redis fails (an error or a timeout: unreachable, not
    /// one bad room), the rest of the batch is not tried: each try would cost the whole
    /// timeout, and a long pass would delay the retry after Redis returns. Answers what to put
    /// back and how many writes failed.
    async fn write_batch(
        &self,
        store: &RoomStore,
        batch: Vec<(RoomId, RoomChanges)>,
    ) -> (Vec<(RoomId, RoomChanges)>, u64) {
        let mut failed = Vec::new();
        let mut attempts_failed = 0;
        let mut rest = batch.into_iter();
        for (room, changes) in rest.by_ref() {
            // `store` bounds the call itself (a timeout is an error like any other).
            match store.store(room, &changes).await {
                Ok(()) => {
                    self.written.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    tracing::warn!(%room, error = %e, "room state not stored");
                    attempts_failed += 1;
                    failed.push((room, changes));
                    break;
                }
            }
        }
        failed.extend(rest);
        (failed, attempts_failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::{RejectCode, Room, RoomLimits};
    use amphi_protocol::room::RoomCommand;
    use amphi_protocol::token::Role;
    use amphi_protocol::ParticipantId;
    use std::time::Instant;

    fn join(user: &str, role: Role) -> RoomCommand {
        RoomCommand::Join {
            user: user.into(),
            name: user.into(),
            role,
            region: "us-east".into(),
            resume: None,
        }
    }

    #[test]
    fn a_room_started_afresh_in_an_outage_keeps_the_stored_bans_and_roles() {
        let t0 = Instant::now();
        let (h, s, l, k) = (
            ParticipantId(1),
            ParticipantId(2),
            ParticipantId(3),
            ParticipantId(4),
        );
        // Before the outage: troll banned, spk demoted, carol promoted.
        let mut before = Room::new(RoomId(9), RoomLimits::default(), t0, 1_000);
        before.apply(h, join("host", Role::Host), t0).unwrap();
        before.apply(s, join("spk", Role::Speaker), t0).unwrap();
        before.apply(l, join("carol", Role::Listener), t0).unwrap();
        before.apply(k, join("troll", Role::Listener), t0).unwrap();
        before
            .apply(h, RoomCommand::Demote { target: s }, t0)
            .unwrap();
        before
            .apply(
                h,
                RoomCommand::Promote {
                    target: l,
                    role: RoomRole::Speaker,
                },
                t0,
            )
            .unwrap();
        before
            .apply(h, RoomCommand::Kick { target: k }, t0)
            .unwrap();
        let stored = before.persisted();

        // The store is unreachable when a fresh origin first sees the room: it starts afresh;
        // everyone rejoins with their token's role, the troll too; a new user is banned.
        let mut ours = Room::new(RoomId(9), RoomLimits::default(), t0, 2_000);
        let (h2, s2, l2, k2, n2, m2) = (
            ParticipantId(11),
            ParticipantId(12),
            ParticipantId(13),
            ParticipantId(14),
            ParticipantId(15),
            ParticipantId(16),
        );
        ours.apply(h2, join("host", Role::Host), t0).unwrap();
        ours.apply(s2, join("spk", Role::Speaker), t0).unwrap();
        ours.apply(l2, join("carol", Role::Listener), t0).unwrap();
        ours.apply(k2, join("troll", Role::Listener), t0).unwrap();
        ours.apply(n2, join("newbie", Role::Listener), t0).unwrap();
        ours.apply(m2, join("spammer", Role::Listener), t0).unwrap();
        ours.apply(k2, RoomCommand::RaiseHand, t0).unwrap();
        ours.apply(n2, RoomCommand::RaiseHand, t0).unwrap();
        ours.apply(h2, RoomCommand::Kick { target: m2 }, t0)
            .unwrap();
        // Written as is, this would erase the troll's ban and spk's demotion.
        assert!(!ours.persisted().state.banned.contains(&"troll".to_string()));

        let merged = reconcile(stored, ours.persisted());
        assert_eq!(
            merged.state.banned,
            vec!["troll".to_string(), "spammer".to_string()]
        );
        let role = |id| {
            merged
                .state
                .participants
                .iter()
                .find(|p| p.id == id)
                .map(|p| p.role)
        };
        assert_eq!(role(s2), Some(RoomRole::Listener), "the demotion sticks");
        assert_eq!(role(l2), Some(RoomRole::Speaker), "the promotion sticks");
        assert_eq!(role(h2), Some(RoomRole::Host));
        assert_eq!(role(n2), Some(RoomRole::Listener), "new users keep theirs");
        assert_eq!(role(k2), None, "the banned troll is out");
        assert_eq!(merged.state.hands, vec![n2], "and its hand with it");
        // The merged room enforces it all.
        let mut back = Room::restore(merged.clone(), RoomLimits::default(), t0, 3_000);
        let err = back
            .apply(ParticipantId(20), join("troll", Role::Listener), t0)
            .unwrap_err();
        assert_eq!(err.code, RejectCode::Banned);
        back.apply(ParticipantId(21), join("spk", Role::Speaker), t0)
            .unwrap();
        assert_eq!(
            back.participant(ParticipantId(21)).unwrap().role,
            RoomRole::Listener
        );
        // An ended room stays ended; merging again changes nothing.
        let mut ended = merged.clone();
        ended.state.phase = RoomPhase::Ended;
        assert_eq!(
            reconcile(ended.clone(), merged.clone()).state.phase,
            RoomPhase::Ended
        );
        assert_eq!(reconcile(merged.clone(), merged.clone()), merged);
    }

    #[test]
    fn held_rooms_are_not_written_until_released() {
        let t0 = Instant::now();
        let mut pending = HashMap::new();
        for id in [1u64, 2, 3] {
            let r = Room::new(RoomId(id), RoomLimits::default(), t0, 0);
            pending.insert(RoomId(id), RoomChanges::full(&r.persisted()));
        }
        let held: std::collections::HashSet<RoomId> = [RoomId(2)].into();
        let mut out: Vec<u64> = take_writable(&mut pending, &held)
            .iter()
            .map(|(r, _)| r.0)
            .collect();
        out.sort();
        assert_eq!(out, vec![1, 3]);
        assert_eq!(pending.len(), 1, "the held snapshot waits");
        let out = take_writable(&mut pending, &Default::default());
        assert_eq!(out.len(), 1);
        assert!(pending.is_empty());
    }

    /// What Redis does with a room's change sets: one hash, fields set and deleted.
    fn write(hash: &mut HashMap<String, Vec<u8>>, changes: &RoomChanges) {
        if changes.reset {
            hash.clear();
        }
        let (puts, dels) = changes.fields();
        hash.extend(puts);
        for d in dels {
            hash.remove(&d);
        }
    }

    #[test]
    fn change_sets_rebuild_the_room_and_chat_writes_nothing() {
        let t0 = Instant::now();
        let p = Persister::new();
        let room = RoomId(9);
        let mut r = Room::new(room, RoomLimits::default(), t0, 1_000);
        let mut hash = HashMap::new();
        let apply = |r: &mut Room, actor: u32, cmd: RoomCommand, hash: &mut HashMap<_, _>| {
            let events = r.apply(ParticipantId(actor), cmd, t0).unwrap();
            let changes = r.changes(&events);
            p.save_changes(room, changes);
            let mut pending = p.pending.lock().unwrap();
            for (_, c) in take_writable(&mut pending, &Default::default()) {
                write(hash, &c);
            }
        };
        // Ids out of join order: the stamps, not the ids, order participants on load.
        apply(&mut r, 50, join("host", Role::Host), &mut hash);
        for (id, user) in [(7, "a"), (3, "b"), (9, "c"), (1, "troll"), (60, "d")] {
            apply(&mut r, id, join(user, Role::Listener), &mut hash);
        }
        apply(&mut r, 3, RoomCommand::RaiseHand, &mut hash);
        apply(&mut r, 9, RoomCommand::RaiseHand, &mut hash);
        let promote = RoomCommand::Promote {
            target: ParticipantId(3),
            role: RoomRole::Speaker,
        };
        apply(&mut r, 50, promote, &mut hash);
        apply(
            &mut r,
            50,
            RoomCommand::Kick {
                target: ParticipantId(1),
            },
            &mut hash,
        );
        apply(&mut r, 7, RoomCommand::Leave, &mut hash);
        apply(&mut r, 50, RoomCommand::Mute { target: None }, &mut hash);
        assert_eq!(assemble(room, &hash).unwrap(), Some(r.persisted()));

        // A join writes that participant and its user's role, not the room.
        let events = r
            .apply(ParticipantId(70), join("e", Role::Listener), t0)
            .unwrap();
        let (puts, dels) = r.changes(&events).fields();
        let mut names: Vec<&str> = puts.iter().map(|(f, _)| f.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["o:70", "p:70", "r:e"]);
        assert!(dels.is_empty());
        // Chat changes nothing durable.
        let chat = RoomCommand::Chat {
            text: "hello".into(),
        };
        let events = r.apply(ParticipantId(50), chat, t0).unwrap();
        assert!(!events.is_empty());
        assert!(r.changes(&events).is_empty());

        // Ending writes the whole room; a failed write put back under newer changes loses
        // none of them.
        let events = r.end_by(None, t0).unwrap();
        let ended = r.changes(&events);
        assert!(ended.reset);
        p.save_changes(room, ended);
        let mut failed = take_writable(&mut p.pending.lock().unwrap(), &Default::default());
        let (_, mut retried) = failed.pop().unwrap();
        retried.merge(RoomChanges::default());
        write(&mut hash, &retried);
        assert_eq!(assemble(room, &hash).unwrap(), Some(r.persisted()));
        assert_eq!(assemble(RoomId(1), &HashMap::new()).unwrap(), None);
        hash.insert("p:5".into(), b"{".to_vec());
        assert!(assemble(room, &hash).is_err(), "a bad field is an error");
    }

    #[test]
    fn a_restored_room_keeps_roles_hands_and_bans() {
        let t0 = Instant::now();
        let (h, s, l1, l2, k) = (
            ParticipantId(1),
            ParticipantId(2),
            ParticipantId(3),
            ParticipantId(4),
            ParticipantId(5),
        );
        let mut r = Room::new(RoomId(9), RoomLimits::default(), t0, 1_000);
        r.apply(h, join("host", Role::Host), t0).unwrap();
        r.apply(s, join("spk", Role::Speaker), t0).unwrap();
        r.apply(l1, join("l1", Role::Listener), t0).unwrap();
        r.apply(l2, join("l2", Role::Listener), t0).unwrap();
        r.apply(k, join("troll", Role::Listener), t0).unwrap();
        r.apply(l2, RoomCommand::RaiseHand, t0).unwrap();
        r.apply(l1, RoomCommand::RaiseHand, t0).unwrap();
        r.apply(h, RoomCommand::Demote { target: s }, t0).unwrap();
        r.apply(h, RoomCommand::Kick { target: k }, t0).unwrap();
        r.apply(h, RoomCommand::Mute { target: None }, t0).unwrap();

        let json = serde_json::to_vec(&r.persisted()).unwrap();
        let saved: PersistedRoom = serde_json::from_slice(&json).unwrap();
        let t1 = t0 + Duration::from_secs(30);
        let mut back = Room::restore(saved, RoomLimits::default(), t1, 31_000);
        assert_eq!(
            back.snapshot(),
            r.snapshot(),
            "participants, hands (in order), bans"
        );
        assert_eq!(back.snapshot().hands, vec![l2, l1]);
        // Edges re-announce their participants: nothing changes.
        let again = RoomCommand::Join {
            user: "spk".into(),
            name: "spk".into(),
            role: Role::Speaker,
            region: "us-east".into(),
            resume: Some(RoomRole::Speaker),
        };
        assert_eq!(back.apply(s, again.clone(), t1).unwrap(), vec![]);
        // The demotion sticks for a new session of the same user, whatever it claims.
        back.apply(s, RoomCommand::Leave, t1).unwrap();
        back.apply(ParticipantId(6), again, t1).unwrap();
        assert_eq!(
            back.participant(ParticipantId(6)).unwrap().role,
            RoomRole::Listener
        );
        // The ban holds.
        let err = back
            .apply(ParticipantId(7), join("troll", Role::Listener), t1)
            .unwrap_err();
        assert_eq!(err.code, RejectCode::Banned);
        assert!(
            !back.may_be_heard(h),
            "the host muted themself before the restart"
        );
    }
}
