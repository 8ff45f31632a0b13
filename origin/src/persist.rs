//! Durable room state: after every command the room authority applies, the room's
//! [`PersistedRoom`] (participants, roles, hand queue, bans, phase) is handed to a [`Persister`],
//! whose writer task stores it in Redis; a restarted origin loads a room on first use
//! ([`RoomStore::load`]), so rooms, roles, hands and bans survive it.
//!
//! Nothing here is on the media path, and nothing blocks the authority: [`Persister::save`] only
//! replaces the room's pending snapshot in a map bounded by [`MAX_PENDING`] rooms (the newest
//! snapshot of a room wins; older ones were never worth writing) and wakes the writer.
//!
//! If Redis cannot be read when a room is first used (an outage), the room runs from a fresh
//! state ("unverified") and its snapshots are held ([`Persister::hold`]) so that they cannot
//! overwrite what is stored; once Redis answers, the hub merges the stored state in
//! ([`reconcile`]: bans, stored roles, an ended phase win) and writing resumes. An origin that
//! already holds a room keeps writing its snapshots through the outage (retried, newest wins).
//!
//! Redis layout: `amphi:roomstate:{room}` holds the JSON of a [`PersistedRoom`], with a TTL of
//! [`LIVE_TTL`] (refreshed by every write) or [`ENDED_TTL`] once the room ended.

use amphi_protocol::room::{RoomPhase, RoomRole, RoomState};
use amphi_protocol::RoomId;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Rooms whose snapshot may wait for the writer at once; beyond it new rooms' snapshots are
/// dropped (counted) until the writer catches up.
pub const MAX_PENDING: usize = 100_000;
/// How long a live room's state is kept after its last change.
pub const LIVE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an ended room's state is kept (joins are refused with `room_ended` meanwhile).
pub const ENDED_TTL: Duration = Duration::from_secs(6 * 3600);
/// Longest one Redis operation may take.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// What is persisted of a room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedRoom {
    /// Participants, hands, bans, phase.
    pub state: RoomState,
    /// The role each user last held (a user who reconnects gets it back).
    pub roles: Vec<(String, RoomRole)>,
}

impl PersistedRoom {
    /// Read the stored record of `room` (what [`RoomStore::load`] got from Redis): its JSON, and
    /// it must be that room's.
    pub fn decode(room: RoomId, bytes: &[u8]) -> Result<Self, PersistError> {
        let saved: PersistedRoom =
            serde_json::from_slice(bytes).map_err(|e| PersistError::Corrupt {
                room,
                message: e.to_string(),
            })?;
        if saved.state.room != room {
            return Err(PersistError::Corrupt {
                room,
                message: format!("holds room {}", saved.state.room),
            });
        }
        Ok(saved)
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Redis failed or timed out.
    #[error("redis: {0}")]
    Redis(String),
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
        })
    }

    fn key(&self, room: RoomId) -> String {
        format!("{}roomstate:{room}", self.prefix)
    }

    /// The persisted state of `room`, if any.
    pub async fn load(&self, room: RoomId) -> Result<Option<PersistedRoom>, PersistError> {
        let mut c = self.conn.clone();
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(room))
            .query_async(&mut c)
            .await?;
        let Some(bytes) = v else {
            return Ok(None);
        };
        PersistedRoom::decode(room, &bytes).map(Some)
    }

    /// Store `saved` (replacing what was there).
    pub async fn store(&self, saved: &PersistedRoom) -> Result<(), PersistError> {
        let json = serde_json::to_vec(saved).map_err(|e| PersistError::Corrupt {
            room: saved.state.room,
            message: e.to_string(),
        })?;
        let ttl = match saved.state.phase {
            RoomPhase::Live => LIVE_TTL,
            RoomPhase::Ended => ENDED_TTL,
        };
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(self.key(saved.state.room))
            .arg(json)
            .arg("EX")
            .arg(ttl.as_secs())
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }
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

/// The pending snapshots the writer may store now: all but those of held rooms, which stay
/// pending.
pub fn take_writable(
    pending: &mut HashMap<RoomId, PersistedRoom>,
    held: &std::collections::HashSet<RoomId>,
) -> Vec<PersistedRoom> {
    let ready: Vec<RoomId> = pending
        .keys()
        .filter(|r| !held.contains(r))
        .copied()
        .collect();
    ready.iter().filter_map(|r| pending.remove(r)).collect()
}

/// Hands snapshots to a writer task without ever waiting (see the module documentation).
pub struct Persister {
    pending: Mutex<HashMap<RoomId, PersistedRoom>>,
    /// Rooms whose snapshots must not be written: started afresh while their stored state was
    /// unreadable, until the stored state is merged in ([`reconcile`]).
    held: Mutex<std::collections::HashSet<RoomId>>,
    wake: Notify,
    /// Snapshots written.
    pub written: AtomicU64,
    /// Write attempts that failed (retried).
    pub failed: AtomicU64,
    /// Snapshots dropped because too many rooms were waiting.
    pub dropped: AtomicU64,
}

impl Persister {
    /// Start the writer task for `store`; it stops (after a last flush) when `shutdown` fires.
    pub fn start(store: RoomStore, shutdown: CancellationToken) -> Arc<Self> {
        let p = Arc::new(Persister {
            pending: Mutex::new(HashMap::new()),
            held: Mutex::new(Default::default()),
            wake: Notify::new(),
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        tokio::spawn(p.clone().writer(store, shutdown));
        p
    }

    /// Queue the newest state of a room for writing. Never blocks on IO.
    pub fn save(&self, saved: PersistedRoom) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let room = saved.state.room;
        if pending.len() >= MAX_PENDING && !pending.contains_key(&room) {
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        pending.insert(room, saved);
        drop(pending);
        self.wake.notify_one();
    }

    /// Do not write `room`'s snapshots (its stored state could not be read): writing them
    /// would overwrite bans and roles stored before. They wait until [`Persister::release`].
    pub fn hold(&self, room: RoomId) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room);
    }

    /// `room`'s state was reconciled with the stored one: write its snapshots again.
    pub fn release(&self, room: RoomId) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&room);
        self.wake.notify_one();
    }

    /// Whether `room`'s snapshots are held.
    pub fn is_held(&self, room: RoomId) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&room)
    }

    /// Snapshots waiting for the writer.
    pub fn backlog(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn writer(self: Arc<Self>, store: RoomStore, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = self.wake.notified() => false,
            };
            let batch: Vec<PersistedRoom> = {
                let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                take_writable(&mut pending, &held)
            };
            let mut failed = Vec::new();
            for saved in batch {
                match tokio::time::timeout(OP_TIMEOUT, store.store(&saved)).await {
                    Ok(Ok(())) => {
                        self.written.fetch_add(1, Relaxed);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(room = %saved.state.room, error = %e, "room state not stored");
                        failed.push(saved);
                    }
                    Err(_) => {
                        tracing::warn!(room = %saved.state.room, "room state store timed out");
                        failed.push(saved);
                    }
                }
            }
            if stopping {
                return;
            }
            if failed.is_empty() {
                backoff = Duration::from_millis(100);
                continue;
            }
            self.failed.fetch_add(failed.len() as u64, Relaxed);
            {
                // Put them back unless a newer snapshot arrived meanwhile.
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for saved in failed {
                    pending.entry(saved.state.room).or_insert(saved);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            self.wake.notify_one();
        }
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
            pending.insert(RoomId(id), r.persisted());
        }
        let held: std::collections::HashSet<RoomId> = [RoomId(2)].into();
        let mut out: Vec<u64> = take_writable(&mut pending, &held)
            .iter()
            .map(|p| p.state.room.0)
            .collect();
        out.sort();
        assert_eq!(out, vec![1, 3]);
        assert_eq!(pending.len(), 1, "the held snapshot waits");
        let out = take_writable(&mut pending, &Default::default());
        assert_eq!(out.len(), 1);
        assert!(pending.is_empty());
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
