//! QUIC hub driver: accepts edge and packager connections, runs their control streams, relays
//! speaker datagrams to subscribed edges and feeds the mixer thread. It also drives the room
//! authority ([`Rooms`]): a room's `RoomCommand`s are applied in arrival order and their
//! `RoomEvents` are queued to every subscribed edge under that room's own lock, so every replica
//! sees the same sequence, and no room waits for another room's commands (see [`Hub`] for the
//! lock order).
//!
//! Every message to a peer goes through that peer's one outbound queue (replies too), so a peer
//! receives messages in the order the hub produced them. After a successful `Join` the joining
//! edge receives `RoomEvents` (with `ParticipantJoined`, like every subscribed edge) and, if it is
//! the edge's first join in the room since it subscribed, `RoomSnapshot` (split into
//! `RoomSnapshotPart`s when large), whose state already includes the join; after a refused one,
//! `CommandRejected`. An edge that already holds the room's state keeps it current from the
//! events, so a room of N participants costs O(N) snapshot bytes per edge, not per join.

use crate::metrics::{DropReason, Metrics};
use crate::mixer_thread::{MixerCmd, ProgramClock};
use crate::peerq::{peer_queue, PeerReceiver, PeerSender, TooSlow, PEER_QUEUE};
use crate::persist::{PersistedRoom, Persister, RoomStore};
use crate::room::{AuthorityCensus, Ending, Held, RejectCode, Rejection, Room, Rooms};
use crate::subs::{Subscribe, Subscriptions};
use amphi_common::mtls::roles_of;
use amphi_protocol::control::{
    snapshot_records, ControlDecoder, ControlError, ControlMessage, PeerKind,
    SNAPSHOT_RECORD_BUDGET,
};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::room::{RoomCommand, RoomEvent, RoomPhase};
use amphi_protocol::{ParticipantId, RoomId};
use rustls_pki_types::CertificateDer;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a new connection has to open its control stream and say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC application close code: normal shutdown.
const CLOSE_OK: u32 = 0;
/// QUIC application close code: protocol violation.
const CLOSE_PROTOCOL: u32 = 1;
/// How often idle and long-ended rooms are forgotten.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);
/// `from` of a notice the origin itself originates (connection ids start at 1).
const FROM_ORIGIN: u64 = 0;
/// After a room is restored from the store, participants whose edge has not re-announced them
/// within this long are taken to have left while the origin was away.
pub(crate) const RESUME_GRACE: Duration = Duration::from_secs(15);

struct EdgeLink {
    control: PeerSender,
}

/// What the datagram relay needs, under its own lock: the connection that announced each
/// speaker, who may be heard, who subscribes to each room, and the QUIC connections to send to.
/// The authority updates it (briefly, a map entry at a time) when those change; relaying a
/// datagram takes only its read lock, never the authority's, so no room's commands, joins or
/// persistence delay any room's audio.
#[derive(Default)]
struct RelayTable {
    /// Edge connections (datagram targets).
    conns: HashMap<u64, quinn::Connection>,
    /// Subscribed edge connections per room (mirror of `HubState::subs`).
    subs: HashMap<RoomId, Vec<u64>>,
    /// The edge connection that announced each participant (mirror of every room's
    /// `RoomBook::owners`).
    owners: HashMap<(RoomId, u32), u64>,
    /// The edge connection that announced each speaker (`SpeakerJoined`). A relay frame is
    /// taken only from the connection that owns its speaker (in `owners`, or here for speakers
    /// the authority does not know).
    speakers: HashMap<(RoomId, u32), u64>,
    /// Speakers the authority lets be heard, for every room it holds; datagrams from anyone else
    /// in those rooms are neither relayed nor mixed.
    audible: HashMap<RoomId, HashSet<u32>>,
}

impl RelayTable {
    /// Whether connection `conn` announced `speaker` in `room`: the authority's owner of that
    /// participant if it has one, else the connection whose `SpeakerJoined` named it.
    fn announced_by(&self, room: RoomId, speaker: u32, conn: u64) -> bool {
        match self.owners.get(&(room, speaker)) {
            Some(&owner) => owner == conn,
            None => self.speakers.get(&(room, speaker)) == Some(&conn),
        }
    }

    /// The connections subscribed to `room` if connection `from` may relay `speaker`'s audio
    /// there (it announced the speaker, and the speaker may be heard), else why not.
    fn route(&self, room: RoomId, speaker: u32, from: u64) -> Result<&[u64], DropReason> {
        if !self.announced_by(room, speaker, from) {
            return Err(DropReason::NotAnnounced);
        }
        // Muted speakers, listeners and strangers are not heard (the edge drops them first;
        // this is defense in depth). Rooms without an authority record pass.
        if self
            .audible
            .get(&room)
            .is_some_and(|heard| !heard.contains(&speaker))
        {
            return Err(DropReason::NotAudible);
        }
        Ok(self.subs.get(&room).map_or(&[], Vec::as_slice))
    }

    /// Forget everything about `room`.
    fn forget_room(&mut self, room: RoomId) {
        self.audible.remove(&room);
        self.owners.retain(|(r, _), _| *r != room);
        self.speakers.retain(|(r, _), _| *r != room);
    }
}

fn relay_read(t: &RwLock<RelayTable>) -> std::sync::RwLockReadGuard<'_, RelayTable> {
    t.read().unwrap_or_else(|e| e.into_inner())
}

fn relay_write(t: &RwLock<RelayTable>) -> std::sync::RwLockWriteGuard<'_, RelayTable> {
    t.write().unwrap_or_else(|e| e.into_inner())
}

/// What every room shares, behind one lock that is held briefly and never while a room's lock
/// is waited for: the connections, who subscribes to which room, and which rooms were looked up
/// in the store.
#[derive(Default)]
struct HubState {
    subs: Subscriptions,
    edges: HashMap<u64, EdgeLink>,
    /// Geo-routers, told when a room ends.
    routers: HashMap<u64, PeerSender>,
    /// Single tokens the routers revoked by `jti` (until their `exp`): passed to every edge,
    /// and to each edge that connects later.
    revoked_tokens: amphi_protocol::token::RevokedTokens,
    /// Rooms looked up in the store since this origin started.
    looked_up: HashSet<RoomId>,
    /// Rooms restored from the store, and when (see [`RESUME_GRACE`]).
    restored: HashMap<RoomId, Instant>,
    /// Rooms whose stored state could not be read on first use (store unreachable): they run
    /// from a fresh state, their snapshots held, until [`Hub::reverify`] reconciles them.
    unverified: HashSet<RoomId>,
}

impl HubState {
    /// Queue `msg` to every edge subscribed to `room`.
    fn to_subscribers(&self, room: RoomId, msg: &ControlMessage) {
        for sub in self.subs.subscribers(room) {
            if let Some(link) = self.edges.get(sub) {
                let _ = link.control.send(msg.clone());
            }
        }
    }

    /// Tell every edge and geo-router that `user`'s tokens for `room` are revoked.
    fn revoke(&self, room: RoomId, user: String) {
        let msg = ControlMessage::Revoke { room, user };
        for link in self.edges.values() {
            let _ = link.control.send(msg.clone());
        }
        for control in self.routers.values() {
            let _ = control.send(msg.clone());
        }
    }

    /// A geo-router revoked the token `jti` until `until`: remember it and tell every edge
    /// (once per revocation: a router re-sends its list when its link comes up).
    fn revoke_token(&mut self, jti: String, until: u64) {
        let now = unix_ms() / 1000;
        self.revoked_tokens.prune(now);
        if !self.revoked_tokens.revoke(&jti, until, now) {
            return;
        }
        let msg = ControlMessage::RevokeToken { jti, until };
        for link in self.edges.values() {
            let _ = link.control.send(msg.clone());
        }
    }

    /// Tell the edges subscribed to `room` and every geo-router, except connection `from`, that
    /// the room ended.
    fn room_ended_notice(&self, room: RoomId, from: u64) {
        for (&router, control) in &self.routers {
            if router != from {
                let _ = control.send(ControlMessage::RoomEnded { room });
            }
        }
        for &sub in self.subs.subscribers(room) {
            if sub == from {
                continue;
            }
            if let Some(link) = self.edges.get(&sub) {
                let _ = link.control.send(ControlMessage::RoomEnded { room });
            }
        }
    }
}

/// The hub's bookkeeping of one room, kept with the room under the room's own lock.
#[derive(Debug, Default)]
pub(crate) struct RoomBook {
    /// The edge connection that announced each participant (its `Leave` on disconnect).
    owners: HashMap<ParticipantId, u64>,
    /// Edge connections that were sent the room's snapshot since they subscribed to it: their
    /// later joins get events only.
    synced: HashSet<u64>,
}

/// A room as the hub holds it (see [`Rooms`]).
type HeldRoom = Held<RoomBook>;

/// Wait for a busy room's lock without stalling the runtime: on a multi-threaded tokio runtime
/// the waiting worker hands its other tasks (the relay's datagram loops, other rooms' control
/// streams, the QUIC endpoint) to another thread meanwhile. Elsewhere the thread just waits.
fn wait_in_place(wait: &mut dyn FnMut()) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// Wall clock in Unix milliseconds (chat timestamps of new rooms).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Shared state of all connection tasks.
///
/// Locks, always taken in this order: a room's own lock (in [`Rooms`]; a room's commands and
/// the events they produce are handled and queued under it, so every edge sees a room's events
/// in command order), then the shared [`HubState`], then the [`RelayTable`]. No lock is held
/// while another room's lock is waited for; walks over all rooms copy the room list and lock
/// one room at a time. The datagram relay takes only the relay table's read lock.
pub(crate) struct Hub {
    origin_id: String,
    metrics: Arc<Metrics>,
    /// The room authority: every room behind its own lock.
    rooms: Rooms<RoomBook>,
    /// Connections and subscriptions shared by all rooms.
    state: RwLock<HubState>,
    /// The relay's view of the state (see [`RelayTable`]).
    relay: RwLock<RelayTable>,
    /// When idle rooms are next forgotten.
    next_housekeeping: Mutex<Option<Instant>>,
    /// Writes what each command changed of its room's durable state (when a store is
    /// configured); queues only, never waits for the store.
    persister: Option<Arc<Persister>>,
    packets: mpsc::Sender<MixerCmd>,
    control: mpsc::UnboundedSender<MixerCmd>,
    next_id: AtomicU64,
    /// Where durable room state is loaded from.
    store: Option<RoomStore>,
    /// Where each room's program is (reports point into the recording with it).
    clock: Arc<ProgramClock>,
    /// Random per process: report ids are this and a counter (unique over origins and
    /// restarts without coordination).
    report_nonce: u64,
    next_report: AtomicU64,
}

/// Why a control stream is being closed.
enum Failure {
    /// The peer broke the protocol: tell it and close the connection.
    Protocol { code: &'static str, message: String },
    /// The stream or connection went away.
    Gone,
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        Failure::Protocol {
            code: "malformed",
            message: e.to_string(),
        }
    }
}

/// Reads control records from a stream.
struct ControlReader {
    recv: quinn::RecvStream,
    decoder: ControlDecoder,
    buf: Box<[u8; 4096]>,
}

impl ControlReader {
    /// The next message; `Ok(None)` when the peer finished the stream. Cancel-safe.
    async fn next(&mut self) -> Result<Option<ControlMessage>, Failure> {
        loop {
            match self.decoder.next_message() {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                // An oversized record is refused alone; the link goes on.
                Err(e @ ControlError::TooLong { .. }) => {
                    tracing::warn!(error = %e, "control record refused");
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            match self.recv.read(&mut self.buf[..]).await {
                Ok(Some(n)) => self.decoder.feed(&self.buf[..n]),
                Ok(None) => return Ok(None),
                Err(_) => return Err(Failure::Gone),
            }
        }
    }
}

/// The wire bytes of one queued control message. A whole `RoomSnapshot` (queued by a join
/// under the room's lock as one message) is split here into records under the control record
/// limit, so its serialisation never runs under that lock.
fn wire_bytes(msg: ControlMessage) -> Vec<u8> {
    match msg {
        ControlMessage::RoomSnapshot { state, more: false } => {
            let mut out = Vec::new();
            for record in snapshot_records(state, SNAPSHOT_RECORD_BUDGET) {
                out.extend(record.to_record());
            }
            out
        }
        other => other.to_record(),
    }
}

fn len_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn lock_read(state: &RwLock<HubState>) -> std::sync::RwLockReadGuard<'_, HubState> {
    state.read().unwrap_or_else(|e| e.into_inner())
}

fn lock_write(state: &RwLock<HubState>) -> std::sync::RwLockWriteGuard<'_, HubState> {
    state.write().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// A hub that sends mixer input to `packets` (bounded, lossy) and `control` (lossless).
    pub(crate) fn new(
        origin_id: String,
        metrics: Arc<Metrics>,
        packets: mpsc::Sender<MixerCmd>,
        control: mpsc::UnboundedSender<MixerCmd>,
        durable: Option<(RoomStore, Arc<Persister>)>,
        clock: Arc<ProgramClock>,
        rooms: crate::room::RoomsConfig,
    ) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let (store, persister) = durable.unzip();
        Hub {
            origin_id,
            metrics,
            rooms: Rooms::new(rooms).waiting_with(wait_in_place),
            state: RwLock::new(HubState::default()),
            relay: RwLock::new(RelayTable::default()),
            next_housekeeping: Mutex::new(None),
            persister,
            packets,
            control,
            next_id: AtomicU64::new(1),
            store,
            clock,
            report_nonce: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
            next_report: AtomicU64::new(1),
        }
    }

    /// Give the reports among `events` (the authority left them without) their id and where
    /// the room's program is now.
    fn stamp_reports(&self, room: RoomId, events: &mut [RoomEvent]) {
        for e in events {
            if let RoomEvent::Reported { report } = e {
                let n = self.next_report.fetch_add(1, Relaxed);
                report.id = format!("{:016x}-{n:x}", self.report_nonce);
                report.program_ms = self.clock.position_ms(room);
            }
        }
    }

    /// Queue `msg` to every edge subscribed to `room`.
    fn to_subscribers(&self, room: RoomId, msg: &ControlMessage) {
        lock_read(&self.state).to_subscribers(room, msg);
    }

    /// Recompute who may be heard in `held`'s room from every participant (a room restored,
    /// reconciled or remembered as ended: rare, whole-room changes).
    fn refresh_audible(&self, held: &HeldRoom) {
        let r = &held.room;
        let set: HashSet<u32> = if r.phase() == RoomPhase::Live {
            r.audible().map(|p| p.0).collect()
        } else {
            HashSet::new()
        };
        relay_write(&self.relay).audible.insert(r.id(), set);
    }

    /// Update who may be heard in `room` for the participants `events` touched: a join or a
    /// mute costs a lookup, not a rescan of the room.
    fn update_audible(&self, room: &Room, events: &[RoomEvent]) {
        let touches = |e: &RoomEvent| match e {
            RoomEvent::ParticipantJoined { participant } => Some(Some(participant.id)),
            RoomEvent::RoleChanged { id, .. }
            | RoomEvent::Muted { id, .. }
            | RoomEvent::Unmuted { id }
            | RoomEvent::ParticipantLeft { id } => Some(Some(*id)),
            RoomEvent::Ended { .. } => Some(None),
            RoomEvent::Kicked { .. }
            | RoomEvent::HandRaised { .. }
            | RoomEvent::HandLowered { .. }
            | RoomEvent::Chat { .. }
            | RoomEvent::Reaction { .. }
            | RoomEvent::Reported { .. } => None,
        };
        if !events.iter().any(|e| touches(e).is_some()) {
            return;
        }
        let live = room.phase() == RoomPhase::Live;
        let mut relay = relay_write(&self.relay);
        let heard = relay.audible.entry(room.id()).or_default();
        for touched in events.iter().filter_map(touches) {
            match touched {
                Some(id) if live && room.may_be_heard(id) => {
                    heard.insert(id.0);
                }
                Some(id) => {
                    heard.remove(&id.0);
                }
                None => heard.clear(),
            }
        }
    }

    /// Connection `conn` announced participant `id` of `held`'s room.
    fn set_owner(&self, held: &mut HeldRoom, id: ParticipantId, conn: u64) {
        held.book.owners.insert(id, conn);
        relay_write(&self.relay)
            .owners
            .insert((held.room.id(), id.0), conn);
    }

    /// Participant `id` of `held`'s room has no announcing connection any more.
    fn remove_owner(&self, held: &mut HeldRoom, id: ParticipantId) {
        held.book.owners.remove(&id);
        relay_write(&self.relay)
            .owners
            .remove(&(held.room.id(), id.0));
    }

    /// Mirror `room`'s subscribers into the relay's view.
    fn sync_subs(&self, st: &HubState, room: RoomId) {
        let subs = st.subs.subscribers(room);
        let mut relay = relay_write(&self.relay);
        if subs.is_empty() {
            relay.subs.remove(&room);
        } else {
            relay.subs.insert(room, subs.to_vec());
        }
    }

    /// Subscribe connection `conn` to `room` (the shared write lock only if it is not yet).
    fn subscribe(&self, room: RoomId, conn: u64) -> Subscribe {
        if lock_read(&self.state)
            .subs
            .subscribers(room)
            .contains(&conn)
        {
            return Subscribe::Already;
        }
        let mut st = lock_write(&self.state);
        let out = st.subs.subscribe(room, conn);
        if out == Subscribe::Added {
            self.sync_subs(&st, room);
        }
        out
    }

    /// Bookkeeping after the authority produced `events` for `held`'s room (under its lock);
    /// returns whether the room ended.
    fn after_events(&self, held: &mut HeldRoom, events: &[RoomEvent]) -> bool {
        let room = held.room.id();
        let mut ended = false;
        for e in events {
            match e {
                RoomEvent::ParticipantLeft { id } => self.remove_owner(held, *id),
                RoomEvent::Ended { .. } => ended = true,
                _ => {}
            }
        }
        if ended {
            held.book.owners.clear();
            let mut relay = relay_write(&self.relay);
            relay.owners.retain(|(r, _), _| *r != room);
            relay.speakers.retain(|(r, _), _| *r != room);
        }
        self.update_audible(&held.room, events);
        if let Some(p) = &self.persister {
            // What these events changed, not the whole room; chat writes nothing. Queued for
            // the writer task: no store IO here, and none on the relay's path.
            p.save_changes(room, held.room.changes(events));
        }
        ended
    }

    /// Queue `room`'s whole durable state for the store (never waits).
    fn persist(&self, room: &Room) {
        if let Some(p) = &self.persister {
            p.save(&room.persisted());
        }
    }

    /// Forget idle and long-ended rooms (at most every [`HOUSEKEEPING_EVERY`]); a room busy
    /// with a command is left for the next round. Never called under a room's lock.
    fn housekeeping(&self, now: Instant) {
        {
            let mut next = self
                .next_housekeeping
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if next.is_some_and(|t| now < t) {
                return;
            }
            *next = Some(now + HOUSEKEEPING_EVERY);
        }
        let gone = self.rooms.housekeeping(now, |room, _| {
            relay_write(&self.relay).forget_room(room);
        });
        if !gone.is_empty() {
            let mut st = lock_write(&self.state);
            for room in gone {
                st.looked_up.remove(&room);
                st.restored.remove(&room);
            }
        }
    }

    /// Refuse a command of `actor` in `room`: `CommandRejected` to the edge that sent it.
    fn refuse(
        &self,
        own: &PeerSender,
        room: RoomId,
        actor: ParticipantId,
        request: u64,
        rej: Rejection,
    ) {
        self.metrics.room_commands_rejected.inc();
        tracing::debug!(%room, %actor, code = %rej.code, message = %rej.message, "room command refused");
        let _ = own.send(ControlMessage::CommandRejected {
            room,
            actor,
            request,
            code: rej.code.as_str().into(),
            message: rej.message,
        });
    }

    /// Before a room's first use on this origin, take back its stored state (if a store is
    /// configured and holds it). A store failure is logged and the room starts afresh.
    async fn ensure_loaded(&self, room: RoomId) {
        {
            let st = lock_read(&self.state);
            if st.looked_up.contains(&room) || st.unverified.contains(&room) {
                return;
            }
        }
        if self.rooms.contains(room) {
            return;
        }
        self.load(room, false).await;
    }

    /// Read `room`'s stored state and take it: restore it (first use), or reconcile it with the
    /// fresh state an unverified room ran from. If the store cannot be read the room is
    /// unverified: it runs from a fresh state (rooms that start during a store outage work)
    /// and its snapshots are held so that they cannot overwrite bans and roles stored before.
    /// `false` if the store could not be read.
    async fn load(&self, room: RoomId, probe: bool) -> bool {
        let Some(store) = &self.store else {
            return true;
        };
        // A join does not wait on a Redis that failed moments ago; the reverification probes it.
        let read = async {
            if probe {
                store.load(room).await
            } else {
                store.load_unless_failing(room).await
            }
        };
        // The store bounds each read (a timeout is an error like any other).
        let saved = match read.await {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(%room, error = %e, "stored room state unavailable; the room runs unverified, its snapshots held");
                let mut st = lock_write(&self.state);
                if st.unverified.insert(room) {
                    if let Some(p) = &self.persister {
                        p.hold(room);
                    }
                }
                return false;
            }
        };
        let now = Instant::now();
        if lock_read(&self.state).unverified.contains(&room) {
            self.reconcile(room, saved, now);
            return true;
        }
        let mut restored = false;
        if let Some(saved) = saved {
            let (participants, hands, banned) = (
                saved.state.participants.len(),
                saved.state.hands.len(),
                saved.state.banned.len(),
            );
            let phase = saved.state.phase;
            if self
                .rooms
                .restore(saved, now, unix_ms(), |held| self.refresh_audible(held))
            {
                tracing::info!(%room, ?phase, participants, hands, banned, "room restored from the store");
                restored = true;
                self.metrics.rooms_known.set(len_i64(self.rooms.len()));
            }
        }
        // Marked looked up only now: a command that arrived meanwhile loads (and waits) too,
        // rather than creating the room before its stored state is in.
        let mut st = lock_write(&self.state);
        st.looked_up.insert(room);
        if restored {
            st.restored.insert(room, now);
        }
        true
    }

    /// The store answers again for unverified `room`: merge what it holds into the room
    /// ([`crate::persist::reconcile`]), tell the edges what changed (banned users leave, roles
    /// stored before are back), and write its snapshots again.
    fn reconcile(&self, room: RoomId, saved: Option<PersistedRoom>, now: Instant) {
        let held = self.rooms.with(room, |held| {
            if let Some(saved) = saved {
                let before = held.room.snapshot();
                let merged = crate::persist::reconcile(saved, held.room.persisted());
                let roles: HashMap<ParticipantId, _> = merged
                    .state
                    .participants
                    .iter()
                    .map(|m| (m.id, m.role))
                    .collect();
                let mut events = Vec::new();
                for p in &before.participants {
                    match roles.get(&p.id) {
                        None => events.push(RoomEvent::ParticipantLeft { id: p.id }),
                        Some(&role) if role != p.role => events.push(RoomEvent::RoleChanged {
                            id: p.id,
                            role,
                            by: p.id,
                        }),
                        Some(_) => {}
                    }
                }
                let banned = merged.state.banned.len();
                held.room.reset(merged, now, unix_ms());
                self.refresh_audible(held);
                if !events.is_empty() {
                    self.to_subscribers(room, &ControlMessage::RoomEvents { room, events });
                }
                tracing::info!(%room, banned, "store reachable again: room reconciled with its stored state");
            }
            if let Some(p) = &self.persister {
                p.release(room);
            }
            self.persist(&held.room);
        });
        if held.is_none() {
            if let Some(p) = &self.persister {
                p.release(room);
            }
        }
        let mut st = lock_write(&self.state);
        st.unverified.remove(&room);
        st.looked_up.insert(room);
    }

    /// Retry the stored state of unverified rooms (called every second); stops at the first
    /// failure (the store is still away).
    pub(crate) async fn reverify(&self) {
        let rooms: Vec<RoomId> = lock_read(&self.state).unverified.iter().copied().collect();
        for room in rooms {
            if !self.load(room, true).await {
                return;
            }
        }
    }

    /// The room authority's live rooms and participants (for metrics; one room locked at a
    /// time).
    pub(crate) fn census(&self) -> AuthorityCensus {
        self.rooms.census()
    }

    /// Participants of restored rooms that no edge re-announced within [`RESUME_GRACE`] leave.
    pub(crate) fn sweep_unclaimed(&self, now: Instant) {
        let due: Vec<RoomId> = {
            let mut st = lock_write(&self.state);
            let due: Vec<RoomId> = st
                .restored
                .iter()
                .filter(|(_, &t)| now.saturating_duration_since(t) >= RESUME_GRACE)
                .map(|(r, _)| *r)
                .collect();
            for room in &due {
                st.restored.remove(room);
            }
            due
        };
        for room in due {
            self.rooms.with(room, |held| {
                if held.room.phase() != RoomPhase::Live {
                    return;
                }
                let gone: Vec<ParticipantId> = held
                    .room
                    .participants()
                    .map(|p| p.id)
                    .filter(|id| !held.book.owners.contains_key(id))
                    .collect();
                if !gone.is_empty() {
                    tracing::info!(%room, participants = gone.len(), "not re-announced after the restart: they leave");
                }
                for id in gone {
                    if let Ok(events) = held.room.apply(id, RoomCommand::Leave, now) {
                        self.after_events(held, &events);
                        if !events.is_empty() {
                            self.to_subscribers(room, &ControlMessage::RoomEvents { room, events });
                        }
                    }
                }
            });
        }
    }

    /// Accept connections until `shutdown`.
    pub(crate) async fn accept_loop(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        shutdown: CancellationToken,
    ) {
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let hub = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => hub.connection(conn, shutdown).await,
                    Err(e) => tracing::debug!(%remote, error = %e, "QUIC handshake failed"),
                }
            });
        }
    }

    async fn connection(self: Arc<Self>, conn: quinn::Connection, shutdown: CancellationToken) {
        let id = self.next_id.fetch_add(1, Relaxed);
        let remote = conn.remote_address();
        let (mut send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok(streams)) => streams,
            _ => {
                tracing::debug!(%remote, "no control stream");
                conn.close(CLOSE_PROTOCOL.into(), b"no control stream");
                return;
            }
        };
        let mut reader = ControlReader {
            recv,
            decoder: ControlDecoder::default(),
            buf: Box::new([0; 4096]),
        };
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) | Ok(Err(Failure::Gone)) => return,
            Err(_) => Err(Failure::Protocol {
                code: "timeout",
                message: "no hello".into(),
            }),
            Ok(Err(f)) => Err(f),
        };
        let (peer, peer_id, region) = match hello {
            Ok(ControlMessage::Hello { peer, id, region }) => (peer, id, region),
            Ok(other) => {
                let f = Failure::Protocol {
                    code: "expected_hello",
                    message: format!("first record must be hello, got {}", kind_of(&other)),
                };
                self.fail(&conn, &mut send, f).await;
                return;
            }
            Err(f) => {
                self.fail(&conn, &mut send, f).await;
                return;
            }
        };
        if let Err(message) = peer_may_act_as(&conn, peer) {
            self.metrics.role_refusals.inc();
            tracing::warn!(%remote, peer = %peer_id, ?peer, %message, "mesh peer refused: its certificate does not allow the role it claims");
            let f = Failure::Protocol {
                code: "forbidden_role",
                message,
            };
            self.fail(&conn, &mut send, f).await;
            return;
        }
        let welcome = ControlMessage::Welcome {
            origin: self.origin_id.clone(),
        };
        if send.write_all(&welcome.to_record()).await.is_err() {
            return;
        }
        tracing::info!(%remote, peer = %peer_id, %region, ?peer, "mesh peer connected");
        let (ctl_tx, ctl_rx) = peer_queue(PEER_QUEUE, self.metrics.control_overflows.clone());
        let own = ctl_tx.clone();
        if matches!(peer, PeerKind::Edge | PeerKind::Router) {
            // Every live ban, so the peer refuses those users' tokens from the start.
            // Room locks come before the shared state's: the bans first, then the revocations.
            for (room, user) in self.rooms.bans() {
                let _ = ctl_tx.send(ControlMessage::Revoke { room, user });
            }
            if peer == PeerKind::Edge {
                let st = lock_read(&self.state);
                for (jti, until) in st.revoked_tokens.live(unix_ms() / 1000) {
                    let _ = ctl_tx.send(ControlMessage::RevokeToken {
                        jti: jti.to_string(),
                        until,
                    });
                }
            }
        }
        match peer {
            PeerKind::Edge => {
                lock_write(&self.state)
                    .edges
                    .insert(id, EdgeLink { control: ctl_tx });
                relay_write(&self.relay).conns.insert(id, conn.clone());
                self.metrics.edges.inc();
            }
            PeerKind::Packager => {
                let _ = self.control.send(MixerCmd::PackagerUp {
                    id,
                    conn: conn.clone(),
                    control: ctl_tx,
                });
                self.metrics.packagers.inc();
            }
            PeerKind::Router => {
                lock_write(&self.state).routers.insert(id, ctl_tx);
            }
        }
        let datagrams = tokio::spawn(self.clone().datagram_loop(conn.clone(), id, peer));
        let result = self
            .control_loop(
                id,
                peer,
                &peer_id,
                &mut reader,
                &mut send,
                (&own, ctl_rx),
                &shutdown,
            )
            .await;
        drop(own);
        match peer {
            PeerKind::Edge => {
                // On shutdown the participants stay in the stored state: their edges re-announce
                // them to the restarted origin.
                self.edge_gone(id, &peer_id, !shutdown.is_cancelled());
                let _ = self.control.send(MixerCmd::SourceGone {
                    source: id,
                    at: Instant::now(),
                });
                self.metrics.edges.dec();
            }
            PeerKind::Packager => {
                let _ = self.control.send(MixerCmd::PackagerDown { id });
                self.metrics.packagers.dec();
            }
            PeerKind::Router => {
                lock_write(&self.state).routers.remove(&id);
            }
        }
        match result {
            Err(f @ Failure::Protocol { .. }) => self.fail(&conn, &mut send, f).await,
            Err(Failure::Gone) => conn.close(CLOSE_OK.into(), b"control stream closed"),
            Ok(()) => {
                let _ = send.finish();
                conn.close(CLOSE_OK.into(), b"bye");
            }
        }
        datagrams.abort();
        tracing::info!(%remote, peer = %peer_id, "mesh peer disconnected");
    }

    /// Report a protocol violation to the peer and close its connection.
    async fn fail(&self, conn: &quinn::Connection, send: &mut quinn::SendStream, f: Failure) {
        let Failure::Protocol { code, message } = f else {
            conn.close(CLOSE_OK.into(), b"gone");
            return;
        };
        self.metrics.control_errors.inc();
        tracing::warn!(remote = %conn.remote_address(), code, %message, "closing mesh connection");
        let err = ControlMessage::Error {
            code: code.to_string(),
            message,
        };
        if send.write_all(&err.to_record()).await.is_ok() && send.finish().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
        }
        conn.close(CLOSE_PROTOCOL.into(), code.as_bytes());
    }

    #[allow(clippy::too_many_arguments)]
    async fn control_loop(
        &self,
        id: u64,
        peer: PeerKind,
        peer_id: &str,
        reader: &mut ControlReader,
        send: &mut quinn::SendStream,
        (own, mut outbound): (&PeerSender, PeerReceiver),
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        loop {
            // Queued messages go out before the peer's next command is read: rooms run in
            // parallel, so other connections can fill this peer's queue as fast as its own
            // commands do; writing first keeps the queue short (the peer's own commands wait,
            // not its events).
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                out = outbound.recv() => {
                    let Some(out) = out.map_err(|TooSlow| Failure::Protocol {
                        code: "too_slow",
                        message: format!("more than {PEER_QUEUE} control messages unread"),
                    })? else {
                        return Ok(());
                    };
                    send.write_all(&wire_bytes(out)).await.map_err(|_| Failure::Gone)?;
                    continue;
                }
                m = reader.next() => match m? {
                    Some(m) => m,
                    None => return Ok(()),
                },
            };
            match &msg {
                ControlMessage::RoomCommand { room, .. }
                | ControlMessage::RoomEnded { room }
                | ControlMessage::SubscribeRoom { room } => self.ensure_loaded(*room).await,
                _ => {}
            }
            // Replies share the outbound queue so they stay in order with broadcasts.
            if let Some(reply) = self.on_message(id, peer, peer_id, own, msg)? {
                let _ = own.send(reply);
            }
        }
    }

    /// Apply one control message; returns the reply to send, if any.
    fn on_message(
        &self,
        id: u64,
        peer: PeerKind,
        peer_id: &str,
        own: &PeerSender,
        msg: ControlMessage,
    ) -> Result<Option<ControlMessage>, Failure> {
        let now = Instant::now();
        let edge_only = |what: &str| {
            Ok(Some(ControlMessage::Error {
                code: "unexpected".into(),
                message: format!("{what} is only accepted from edges"),
            }))
        };
        match msg {
            ControlMessage::Hello { .. }
            | ControlMessage::Welcome { .. }
            | ControlMessage::RoomEvents { .. }
            | ControlMessage::RoomSnapshot { .. }
            | ControlMessage::RoomSnapshotPart { .. }
            | ControlMessage::RoomOpened { .. }
            | ControlMessage::Revoke { .. }
            | ControlMessage::Reported { .. }
            | ControlMessage::CommandRejected { .. } => Err(Failure::Protocol {
                code: "unexpected",
                message: format!("unexpected {}", kind_of(&msg)),
            }),
            ControlMessage::Ping { nonce } => Ok(Some(ControlMessage::Pong { nonce })),
            ControlMessage::Pong { .. } => Ok(None),
            ControlMessage::Error { code, message } => {
                tracing::warn!(peer = %peer_id, %code, %message, "peer reported an error");
                Ok(None)
            }
            ControlMessage::RevokeToken { jti, until } if peer == PeerKind::Router => {
                tracing::info!(from = %peer_id, "router revoked a token");
                lock_write(&self.state).revoke_token(jti, until);
                Ok(None)
            }
            ControlMessage::RevokeToken { .. } => Err(Failure::Protocol {
                code: "unexpected",
                message: "revoke_token is only accepted from geo-routers".into(),
            }),
            ControlMessage::RoomEnded { room } if peer != PeerKind::Packager => {
                tracing::info!(%room, from = %peer_id, ?peer, "room ended");
                self.end_room(room, id, now);
                Ok(None)
            }
            _ if peer != PeerKind::Edge => edge_only(kind_of(&msg)),
            ControlMessage::SpeakerJoined {
                room,
                speaker,
                name,
                region,
            } => {
                // Who this is, from the room authority (the packagers name chapters by it).
                let identity = self
                    .rooms
                    .with(room, |held| {
                        held.room
                            .participant(speaker)
                            .map(|p| (p.user.clone(), p.name.clone()))
                    })
                    .flatten();
                let other = {
                    let st = lock_read(&self.state);
                    let mut relay = relay_write(&self.relay);
                    let key = (room, speaker.0);
                    // The relay's mirror of the room's owners.
                    let owner = relay.owners.get(&key).copied();
                    let claimed = relay.speakers.get(&key).copied();
                    let other = owner
                        .filter(|&c| c != id)
                        .or(claimed.filter(|&c| c != id && st.edges.contains_key(&c)));
                    if other.is_none() {
                        relay.speakers.insert(key, id);
                    }
                    other
                };
                if let Some(other) = other {
                    self.metrics.speaker_claims_refused.inc();
                    tracing::warn!(%room, %speaker, edge = %peer_id, other, "speaker announcement refused: another connection announced that participant");
                    return Ok(Some(ControlMessage::Error {
                        code: "forbidden".into(),
                        message: format!(
                            "speaker {speaker} in {room} belongs to another connection"
                        ),
                    }));
                }
                tracing::info!(%room, %speaker, %name, %region, edge = %peer_id, "speaker joined");
                let _ = self.control.send(MixerCmd::Joined {
                    room,
                    speaker: speaker.0,
                    source: id,
                    identity,
                    at: now,
                });
                Ok(None)
            }
            ControlMessage::SpeakerLeft { room, speaker } => {
                {
                    let mut relay = relay_write(&self.relay);
                    if relay.speakers.get(&(room, speaker.0)) != Some(&id) {
                        // Not this connection's speaker: nothing to stop.
                        return Ok(None);
                    }
                    relay.speakers.remove(&(room, speaker.0));
                }
                tracing::info!(%room, %speaker, edge = %peer_id, "speaker left");
                let _ = self.control.send(MixerCmd::Left {
                    room,
                    speaker: speaker.0,
                    at: now,
                });
                Ok(None)
            }
            ControlMessage::SubscribeRoom { room } => match self.subscribe(room, id) {
                Subscribe::Added | Subscribe::Already => Ok(None),
                Subscribe::LimitReached => Ok(Some(ControlMessage::Error {
                    code: "limit".into(),
                    message: format!("too many subscriptions, {room} refused"),
                })),
            },
            ControlMessage::UnsubscribeRoom { room } => {
                // The edge dropped its copy of the room: its next join gets a snapshot again.
                self.rooms.with(room, |held| held.book.synced.remove(&id));
                let mut st = lock_write(&self.state);
                st.subs.unsubscribe(room, id);
                self.sync_subs(&st, room);
                Ok(None)
            }
            ControlMessage::RoomEnded { .. } => edge_only("room_ended"),
            ControlMessage::RoomCommand {
                room,
                actor,
                request,
                command,
            } => {
                self.room_command(id, own, room, actor, request, command, now);
                Ok(None)
            }
        }
    }

    /// Apply a participant's command from edge connection `conn`; see the module documentation
    /// for what is sent to whom. Only `room`'s lock is held while the command runs.
    #[allow(clippy::too_many_arguments)]
    fn room_command(
        &self,
        conn: u64,
        own: &PeerSender,
        room: RoomId,
        actor: ParticipantId,
        request: u64,
        command: RoomCommand,
        now: Instant,
    ) {
        self.housekeeping(now);
        let is_join = matches!(command, RoomCommand::Join { .. });
        let create = is_join.then(|| (now, unix_ms()));
        let done = self.rooms.with_or_create(room, create, |held| {
            self.command_in(held, conn, own, actor, request, command, now);
        });
        if let Err(rej) = done {
            self.refuse(own, room, actor, request, rej);
        }
        self.metrics.rooms_known.set(len_i64(self.rooms.len()));
    }

    /// [`Hub::room_command`] under the room's lock: the command's events are queued to the
    /// subscribed edges before the lock is released, so they go out in command order.
    #[allow(clippy::too_many_arguments)]
    fn command_in(
        &self,
        held: &mut HeldRoom,
        conn: u64,
        own: &PeerSender,
        actor: ParticipantId,
        request: u64,
        command: RoomCommand,
        now: Instant,
    ) {
        let room = held.room.id();
        let is_join = matches!(command, RoomCommand::Join { .. });
        // A kick revokes the target user's tokens on every edge and router.
        let kicked_user = match &command {
            RoomCommand::Kick { target } => held.room.participant(*target).map(|p| p.user.clone()),
            _ => None,
        };
        let live = held.room.phase() == RoomPhase::Live;
        // An edge acts only for the participants it announced.
        let result = if !is_join && live && held.book.owners.get(&actor) != Some(&conn) {
            Err(Rejection {
                code: RejectCode::NotFound,
                message: format!("participant {actor} is not connected through this edge"),
            })
        } else {
            held.room.apply(actor, command, now)
        };
        let mut events = match result {
            Ok(events) => events,
            Err(rej) => return self.refuse(own, room, actor, request, rej),
        };
        self.stamp_reports(room, &mut events);
        self.metrics.room_commands.inc();
        if is_join {
            // The packagers prepare the room's HLS output before any program media.
            let _ = self.control.send(MixerCmd::RoomOpened { room });
            self.set_owner(held, actor, conn);
            // The joining edge needs the room's events even if it did not subscribe first.
            if self.subscribe(room, conn) == Subscribe::LimitReached {
                tracing::warn!(%room, "joining edge has too many subscriptions");
            }
        }
        let ended = self.after_events(held, &events);
        let kicked =
            kicked_user.filter(|_| events.iter().any(|e| matches!(e, RoomEvent::Kicked { .. })));
        // A join that changed nothing (already present) is resolved by a snapshot only.
        let quiet = events.is_empty();
        let st = lock_read(&self.state);
        // Reports are stored and announced by the geo-routers (each deduplicates by id).
        for e in &events {
            if let RoomEvent::Reported { report } = e {
                tracing::info!(%room, id = %report.id, reason = report.reason.as_str(), "report");
                for control in st.routers.values() {
                    let _ = control.send(ControlMessage::Reported {
                        report: report.clone(),
                    });
                }
            }
        }
        if !quiet {
            st.to_subscribers(room, &ControlMessage::RoomEvents { room, events });
        }
        if let Some(user) = kicked {
            // After the events, so the kicked sessions hear `kicked` before they are closed.
            st.revoke(room, user);
        }
        if is_join && (quiet || !held.book.synced.contains(&conn)) {
            // One queued message; the connection's writer splits and encodes it (the linear
            // serialisation runs outside the room's lock).
            let _ = own.send(ControlMessage::RoomSnapshot {
                state: held.room.snapshot(),
                more: false,
            });
            held.book.synced.insert(conn);
        }
        if ended {
            tracing::info!(%room, by = %actor, "room ended by its host");
            st.room_ended_notice(room, FROM_ORIGIN);
            let _ = self.control.send(MixerCmd::RoomEnded { room, at: now });
        }
    }

    /// The mixer found `room` without speakers for the configured idle timeout: end it as the
    /// API's `POST /v1/rooms/{id}/end` does (edges, geo-routers, packagers hear `RoomEnded`).
    pub(crate) fn end_idle_room(&self, room: RoomId, now: Instant) {
        tracing::info!(%room, "room ended after its idle timeout");
        self.end_room(room, FROM_ORIGIN, now);
    }

    /// `RoomEnded` from connection `from` (a geo-router or an edge): end the room's authority
    /// record, tell the subscribed edges (`RoomEvents` with `Ended`, then `RoomEnded`), the other
    /// routers and the packagers. A room that already ended here is not announced again.
    fn end_room(&self, room: RoomId, from: u64, now: Instant) {
        self.rooms
            .end(room, now, unix_ms(), |held, ending| match ending {
                Ending::AlreadyEnded => {}
                ending => {
                    match (ending, held) {
                        (Ending::Ended(events), Some(held)) => {
                            self.after_events(held, &events);
                            self.to_subscribers(room, &ControlMessage::RoomEvents { room, events });
                        }
                        (_, Some(held)) => {
                            self.refresh_audible(held);
                            self.persist(&held.room);
                        }
                        (_, None) => {
                            // Not remembered (the origin is full): nobody is heard there.
                            relay_write(&self.relay).audible.remove(&room);
                        }
                    }
                    lock_read(&self.state).room_ended_notice(room, from);
                    let _ = self.control.send(MixerCmd::RoomEnded { room, at: now });
                }
            });
        self.metrics.rooms_known.set(len_i64(self.rooms.len()));
    }

    /// Edge connection `conn` closed: forget it, and (if `leave`) every participant it announced
    /// leaves. The shared state is released before the rooms are visited, one at a time.
    fn edge_gone(&self, conn: u64, peer_id: &str, leave: bool) {
        let now = Instant::now();
        {
            let mut st = lock_write(&self.state);
            st.edges.remove(&conn);
            let rooms = st.subs.rooms_of(conn).to_vec();
            st.subs.remove_connection(conn);
            for room in rooms {
                self.sync_subs(&st, room);
            }
        }
        {
            let mut relay = relay_write(&self.relay);
            relay.conns.remove(&conn);
            relay.speakers.retain(|_, c| *c != conn);
        }
        let mut left = 0;
        self.rooms.each(|held| {
            held.book.synced.remove(&conn);
            let mut mine: Vec<ParticipantId> = held
                .book
                .owners
                .iter()
                .filter(|(_, &c)| c == conn)
                .map(|(id, _)| *id)
                .collect();
            mine.sort();
            if !leave {
                for id in mine {
                    self.remove_owner(held, id);
                }
                return;
            }
            left += mine.len();
            let room = held.room.id();
            for id in mine {
                match held.room.apply(id, RoomCommand::Leave, now) {
                    Ok(events) => {
                        self.after_events(held, &events);
                        if !events.is_empty() {
                            self.to_subscribers(room, &ControlMessage::RoomEvents { room, events });
                        }
                    }
                    Err(_) => self.remove_owner(held, id),
                }
            }
        });
        if left > 0 {
            tracing::info!(edge = %peer_id, participants = left, "edge gone: its participants left");
        }
    }

    /// Receive datagrams: relay valid speaker packets to the other subscribed edges and hand them
    /// to the mixer; count and drop everything else.
    async fn datagram_loop(self: Arc<Self>, conn: quinn::Connection, id: u64, peer: PeerKind) {
        let m = &self.metrics;
        while let Ok(datagram) = conn.read_datagram().await {
            let at = Instant::now();
            m.relay_in.inc();
            if peer != PeerKind::Edge {
                m.dropped(DropReason::NotEdge);
                continue;
            }
            // Repeats (relay loss protection) are mixed, never forwarded.
            let (room, speaker, forward) = match RelayFrame::decode(&datagram) {
                Ok(f) if f.kind == FrameKind::SpeakerAudio => (f.room, f.speaker, true),
                Ok(f) if f.kind == FrameKind::SpeakerRepeat => (f.room, f.speaker, false),
                Ok(_) => {
                    m.dropped(DropReason::WrongKind);
                    continue;
                }
                Err(e) => {
                    m.dropped(DropReason::from(e));
                    continue;
                }
            };
            {
                // The relay's own lock: the room authority never holds it while it works.
                let relay = relay_read(&self.relay);
                let subs = match relay.route(room, speaker, id) {
                    Ok(subs) => subs,
                    Err(reason) => {
                        m.dropped(reason);
                        continue;
                    }
                };
                for &sub in subs {
                    if sub == id || !forward {
                        continue;
                    }
                    let Some(conn) = relay.conns.get(&sub) else {
                        continue;
                    };
                    match conn.send_datagram(datagram.clone()) {
                        Ok(()) => {
                            m.relay_forwarded.inc();
                        }
                        Err(_) => m.dropped(DropReason::SendFailed),
                    }
                }
            }
            match self.packets.try_send(MixerCmd::Packet { datagram, at }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => m.dropped(DropReason::MixerBusy),
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    }
}

/// `Ok` if the peer's certificate carries the mesh role of `peer`; else why not.
fn peer_may_act_as(conn: &quinn::Connection, peer: PeerKind) -> Result<(), String> {
    let role = peer.mesh_role();
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| "no peer certificate".to_string())?;
    let leaf = certs
        .first()
        .ok_or_else(|| "no peer certificate".to_string())?;
    let roles = roles_of(leaf).map_err(|e| e.to_string())?;
    if roles.contains(&role) {
        return Ok(());
    }
    let carried: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    Err(format!(
        "hello as {role} refused: the certificate carries {}",
        if carried.is_empty() {
            "no amphi-role".to_string()
        } else {
            format!("amphi-role {}", carried.join(", "))
        }
    ))
}

fn kind_of(m: &ControlMessage) -> &'static str {
    match m {
        ControlMessage::Hello { .. } => "hello",
        ControlMessage::Welcome { .. } => "welcome",
        ControlMessage::SpeakerJoined { .. } => "speaker_joined",
        ControlMessage::SpeakerLeft { .. } => "speaker_left",
        ControlMessage::SubscribeRoom { .. } => "subscribe_room",
        ControlMessage::UnsubscribeRoom { .. } => "unsubscribe_room",
        ControlMessage::RoomEnded { .. } => "room_ended",
        ControlMessage::RoomOpened { .. } => "room_opened",
        ControlMessage::Ping { .. } => "ping",
        ControlMessage::Pong { .. } => "pong",
        ControlMessage::Error { .. } => "error",
        ControlMessage::RoomCommand { .. } => "room_command",
        ControlMessage::RoomEvents { .. } => "room_events",
        ControlMessage::RoomSnapshot { .. } => "room_snapshot",
        ControlMessage::RoomSnapshotPart { .. } => "room_snapshot_part",
        ControlMessage::CommandRejected { .. } => "command_rejected",
        ControlMessage::Revoke { .. } => "revoke",
        ControlMessage::RevokeToken { .. } => "revoke_token",
        ControlMessage::Reported { .. } => "reported",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphi_protocol::token::Role;

    fn hub() -> Hub {
        let (packets, _) = mpsc::channel(8);
        let (control, _) = mpsc::unbounded_channel();
        Hub::new(
            "origin-test".into(),
            Arc::new(Metrics::default()),
            packets,
            control,
            None,
            Arc::new(ProgramClock::default()),
            crate::room::RoomsConfig::default(),
        )
    }

    fn join(hub: &Hub, conn: u64, room: RoomId, id: u32, user: &str, role: Role) {
        let (own, _rx) = peer_queue(PEER_QUEUE, Default::default());
        let join = RoomCommand::Join {
            user: user.into(),
            name: user.into(),
            role,
            region: "us-east".into(),
            resume: None,
        };
        hub.room_command(conn, &own, room, ParticipantId(id), 1, join, Instant::now());
    }

    fn route(hub: &Hub, room: RoomId, speaker: u32, from: u64) -> Result<Vec<u64>, DropReason> {
        relay_read(&hub.relay)
            .route(room, speaker, from)
            .map(<[u64]>::to_vec)
    }

    #[test]
    fn the_relay_view_follows_the_authority() {
        let hub = hub();
        let room = RoomId(7);
        join(&hub, 1, room, 1, "spk", Role::Speaker);
        join(&hub, 2, room, 2, "lis", Role::Listener);
        assert_eq!(route(&hub, room, 1, 1), Ok(vec![1, 2]));
        assert_eq!(route(&hub, room, 1, 2), Err(DropReason::NotAnnounced));
        assert_eq!(route(&hub, room, 2, 2), Err(DropReason::NotAudible));
        let (own, _rx) = peer_queue(PEER_QUEUE, Default::default());
        let mute = RoomCommand::Mute { target: None };
        hub.room_command(1, &own, room, ParticipantId(1), 2, mute, Instant::now());
        assert_eq!(route(&hub, room, 1, 1), Err(DropReason::NotAudible));
        // The speaker's edge goes: its participants leave, nobody relays for them.
        hub.edge_gone(1, "edge-1", true);
        assert_eq!(route(&hub, room, 1, 1), Err(DropReason::NotAnnounced));
        assert!(relay_read(&hub.relay).subs[&room] == vec![2]);
    }

    /// The relay decides where a datagram goes while the authority holds its state (a command
    /// in a 10,000-member room, a persist in progress): it never waits for it.
    #[test]
    fn relaying_does_not_wait_for_the_room_authority() {
        let hub = hub();
        let (quiet, busy) = (RoomId(1), RoomId(2));
        join(&hub, 1, quiet, 1, "spk", Role::Speaker);
        join(&hub, 2, quiet, 2, "lis", Role::Listener);
        for i in 0..10_000 {
            join(
                &hub,
                1 + i % 2,
                busy,
                10 + i as u32,
                &format!("u{i}"),
                Role::Listener,
            );
        }
        // Both rooms' locks and the shared state held, as by commands in progress.
        hub.rooms.with(busy, |_| {
            hub.rooms.with(quiet, |_| {
                let held = lock_write(&hub.state);
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let _ = tx.send(route(&hub, quiet, 1, 1));
                    });
                    // A failure detector, not a measurement: a relay that needs the
                    // authority's locks would wait here for as long as they are held.
                    let routed = rx.recv_timeout(Duration::from_secs(30));
                    drop(held);
                    assert_eq!(
                        routed,
                        Ok(Ok(vec![1, 2])),
                        "the relay waited for the authority"
                    );
                });
            })
        });
    }

    /// An edge connection whose control queue the test reads.
    fn edge(hub: &Hub, conn: u64) -> PeerReceiver {
        let (tx, rx) = peer_queue(PEER_QUEUE, Default::default());
        lock_write(&hub.state)
            .edges
            .insert(conn, EdgeLink { control: tx });
        rx
    }

    /// Every message queued so far for an edge (the queue stays open).
    fn queued(rx: &mut PeerReceiver) -> Vec<ControlMessage> {
        let mut out = Vec::new();
        while let Some(m) = rx.try_recv() {
            out.push(m);
        }
        out
    }

    /// A report reaches the room's edges as an event and every geo-router as `reported`, both
    /// with the id and the program position the hub stamped; a refused one reaches nobody.
    #[test]
    fn reports_go_to_the_edges_and_every_router_stamped() {
        use amphi_protocol::room::{ReportReason, ReportTarget};
        let hub = hub();
        let room = RoomId(4);
        let mut edge_rx = edge(&hub, 1);
        let routers: Vec<PeerReceiver> = (100..102)
            .map(|conn| {
                let (tx, rx) = peer_queue(PEER_QUEUE, Default::default());
                lock_write(&hub.state).routers.insert(conn, tx);
                rx
            })
            .collect();
        join(&hub, 1, room, 1, "spk", Role::Speaker);
        join(&hub, 1, room, 2, "lis", Role::Listener);
        queued(&mut edge_rx);
        let (own, mut own_rx) = peer_queue(PEER_QUEUE, Default::default());
        let cmd = RoomCommand::Report {
            target: ReportTarget::User("spk".into()),
            reason: ReportReason::Spam,
            text: "ads".into(),
        };
        let now = Instant::now();
        hub.room_command(1, &own, room, ParticipantId(2), 9, cmd.clone(), now);
        hub.room_command(1, &own, room, ParticipantId(2), 10, cmd, now);
        let events = queued(&mut edge_rx);
        let [ControlMessage::RoomEvents { events, .. }, ControlMessage::RoomEvents { events: second, .. }] =
            &events[..]
        else {
            panic!("two report events expected, got {events:?}");
        };
        let [RoomEvent::Reported { report }] = &events[..] else {
            panic!("one report expected, got {events:?}");
        };
        let [RoomEvent::Reported { report: report2 }] = &second[..] else {
            panic!("one report expected, got {second:?}");
        };
        assert!(!report.id.is_empty() && report.id != report2.id);
        assert_eq!((report.reporter.as_str(), report.room), ("lis", room));
        // No program runs in this test (no mixer): no pointer into a recording.
        assert_eq!(report.program_ms, None);
        for mut rx in routers {
            let got = queued(&mut rx);
            assert_eq!(
                got,
                vec![
                    ControlMessage::Reported {
                        report: report.clone()
                    },
                    ControlMessage::Reported {
                        report: report2.clone()
                    }
                ]
            );
        }
        assert!(queued(&mut own_rx).is_empty());
        // Reporting oneself is refused to the sender only.
        let me = RoomCommand::Report {
            target: ReportTarget::User("lis".into()),
            reason: ReportReason::Spam,
            text: String::new(),
        };
        hub.room_command(1, &own, room, ParticipantId(2), 11, me, now);
        assert!(matches!(
            &queued(&mut own_rx)[..],
            [ControlMessage::CommandRejected { code, request: 11, .. }] if code == "invalid"
        ));
        assert!(queued(&mut edge_rx).is_empty());
    }

    /// While a command holds a 10,000-member room (a join or chat burst in progress there),
    /// another room's joins, chat, mute, subscription, end and speaker announcement are all
    /// handled, their events queued to that room's edge, and its datagrams routed.
    #[test]
    fn a_busy_room_stalls_no_other_rooms_commands_nor_the_relay() {
        let hub = hub();
        let (quiet, busy, other) = (RoomId(1), RoomId(2), RoomId(3));
        let mut listener_edge = edge(&hub, 2);
        for i in 0..10_000u32 {
            join(
                &hub,
                3 + u64::from(i % 2),
                busy,
                100 + i,
                &format!("u{i}"),
                Role::Listener,
            );
        }
        join(&hub, 1, quiet, 1, "spk", Role::Speaker);
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let hub = &hub;
            s.spawn(move || {
                hub.rooms.with(busy, |_| {
                    held_tx.send(()).expect("test alive");
                    let _ = done_rx.recv_timeout(Duration::from_secs(120));
                })
            });
            held_rx.recv().expect("the busy room is held");
            s.spawn(move || {
                let (own, mut replies) = peer_queue(PEER_QUEUE, Default::default());
                join(hub, 2, quiet, 2, "lis", Role::Listener);
                let now = Instant::now();
                let chat = RoomCommand::Chat {
                    text: "hello".into(),
                };
                hub.room_command(1, &own, quiet, ParticipantId(1), 2, chat, now);
                let mute = RoomCommand::Mute { target: None };
                hub.room_command(1, &own, quiet, ParticipantId(1), 3, mute, now);
                let subscribe = ControlMessage::SubscribeRoom { room: other };
                let subscribed = hub.on_message(2, PeerKind::Edge, "edge-2", &own, subscribe);
                let announce = ControlMessage::SpeakerJoined {
                    room: quiet,
                    speaker: ParticipantId(1),
                    name: "spk".into(),
                    region: "us-east".into(),
                };
                let announced = hub.on_message(1, PeerKind::Edge, "edge-1", &own, announce);
                hub.end_room(other, FROM_ORIGIN, now);
                let routed = route(hub, quiet, 1, 1);
                let _ = tx.send((
                    subscribed.is_ok_and(|r| r.is_none()),
                    announced.is_ok_and(|r| r.is_none()),
                    routed,
                    queued(&mut replies),
                ));
            });
            // A failure detector, not a measurement: work that needed the busy room's lock
            // would wait here for as long as it is held.
            let got = rx.recv_timeout(Duration::from_secs(30));
            let _ = done_tx.send(());
            let (subscribed, announced, routed, replies) =
                got.expect("another room's work waited for the busy room");
            assert!(subscribed && announced, "{replies:?}");
            assert!(replies.is_empty(), "nothing refused: {replies:?}");
            // Muted: the speaker is not heard any more.
            assert_eq!(routed, Err(DropReason::NotAudible));
        });
        let kinds: Vec<_> = queued(&mut listener_edge)
            .into_iter()
            .flat_map(|m| match m {
                ControlMessage::RoomEvents { room, events } if room == quiet => events,
                _ => Vec::new(),
            })
            .map(|e| match e {
                RoomEvent::ParticipantJoined { participant } => {
                    format!("joined {}", participant.id)
                }
                RoomEvent::Chat { text, .. } => format!("chat {text}"),
                RoomEvent::Muted { id, .. } => format!("muted {id}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["joined p2", "chat hello", "muted p1"]);
    }

    /// Commands waiting for a busy room's lock do not take the runtime's worker threads with
    /// them: with both workers of a two-worker runtime stuck behind a 10,000-member room's
    /// lock, a relay task and another room's command still run.
    #[test]
    fn waiting_for_a_busy_room_does_not_stall_the_runtime() {
        let hub = Arc::new(hub());
        let (quiet, busy) = (RoomId(1), RoomId(2));
        join(&hub, 1, quiet, 1, "spk", Role::Speaker);
        join(&hub, 2, quiet, 2, "lis", Role::Listener);
        for i in 0..10_000u32 {
            join(&hub, 3, busy, 100 + i, &format!("u{i}"), Role::Listener);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                hub.rooms.with(busy, |_| {
                    held_tx.send(()).expect("test alive");
                    let _ = done_rx.recv_timeout(Duration::from_secs(120));
                })
            })
        };
        held_rx.recv().expect("the busy room is held");
        // More commands for the busy room than the runtime has workers: each waits for its lock.
        for i in 0..4u32 {
            let hub = hub.clone();
            rt.spawn(async move {
                let (own, _rx) = peer_queue(PEER_QUEUE, Default::default());
                let chat = RoomCommand::Chat { text: "hi".into() };
                hub.room_command(
                    3,
                    &own,
                    busy,
                    ParticipantId(100 + i),
                    1,
                    chat,
                    Instant::now(),
                );
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let hub = hub.clone();
            rt.spawn(async move {
                // Let the waiting commands take the workers first.
                tokio::task::yield_now().await;
                let routed = route(&hub, quiet, 1, 1);
                let (own, mut replies) = peer_queue(PEER_QUEUE, Default::default());
                let raise = RoomCommand::RaiseHand;
                hub.room_command(2, &own, quiet, ParticipantId(2), 1, raise, Instant::now());
                let _ = tx.send((routed, replies.try_recv()));
            });
        }
        // A failure detector, not a measurement.
        let got = rx.recv_timeout(Duration::from_secs(30));
        let _ = done_tx.send(());
        holder.join().expect("holder");
        rt.shutdown_timeout(Duration::from_secs(10));
        let (routed, reply) = got.expect("the runtime stalled behind the busy room");
        assert_eq!(routed, Ok(vec![1, 2]));
        assert!(reply.is_none(), "the hand command was refused: {reply:?}");
    }

    /// Commands for one room from two edges at once: both subscribed edges receive the room's
    /// events in one and the same order, the order the room applied them (its snapshot's join
    /// order).
    #[test]
    fn a_rooms_events_reach_every_edge_in_command_order() {
        let hub = hub();
        let room = RoomId(5);
        let (mut first, mut second) = (edge(&hub, 1), edge(&hub, 2));
        hub.subscribe(room, 1);
        hub.subscribe(room, 2);
        std::thread::scope(|s| {
            for conn in [1u64, 2] {
                let hub = &hub;
                s.spawn(move || {
                    for i in 0..500u32 {
                        let id = u32::try_from(conn).expect("small") * 1_000 + i;
                        join(hub, conn, room, id, &format!("u{id}"), Role::Listener);
                    }
                });
            }
        });
        let joins = |rx: &mut PeerReceiver| -> Vec<ParticipantId> {
            queued(rx)
                .into_iter()
                .flat_map(|m| match m {
                    ControlMessage::RoomEvents { events, .. } => events,
                    _ => Vec::new(),
                })
                .filter_map(|e| match e {
                    RoomEvent::ParticipantJoined { participant } => Some(participant.id),
                    _ => None,
                })
                .collect()
        };
        let (a, b) = (joins(&mut first), joins(&mut second));
        assert_eq!(a.len(), 1_000);
        assert_eq!(a, b);
        let order: Vec<ParticipantId> = hub
            .rooms
            .with(room, |held| {
                held.room.participants().map(|p| p.id).collect()
            })
            .expect("held");
        assert_eq!(order, a);
    }

    /// A join into a big room queues its snapshot as one message (only a clone is made under
    /// the room's lock); the connection's writer splits it into records under the control
    /// record limit that the edge reassembles into the whole room.
    #[tokio::test]
    async fn a_big_rooms_join_snapshot_is_split_by_the_writer_not_under_the_lock() {
        use amphi_protocol::control::{SnapshotAssembler, MAX_CONTROL_LEN};
        let hub = hub();
        let room = RoomId(3);
        for i in 0..5_000u32 {
            join(&hub, 1, room, 10 + i, &format!("u{i}"), Role::Listener);
        }
        let (own, mut rx) = peer_queue(PEER_QUEUE, Default::default());
        let cmd = RoomCommand::Join {
            user: "late".into(),
            name: "late".into(),
            role: Role::Listener,
            region: "us-east".into(),
            resume: None,
        };
        hub.room_command(9, &own, room, ParticipantId(9), 1, cmd, Instant::now());
        drop(own);
        let mut queued = Vec::new();
        while let Some(m) = rx.recv().await.expect("not overflowed") {
            queued.push(m);
        }
        assert!(
            matches!(
                queued.as_slice(),
                [ControlMessage::RoomSnapshot { more: false, .. }]
            ),
            "one queued snapshot message, got {} messages",
            queued.len()
        );
        let bytes = wire_bytes(queued.pop().expect("one"));
        let mut dec = ControlDecoder::default();
        dec.feed(&bytes);
        let (mut asm, mut records, mut done) = (SnapshotAssembler::default(), 0, None);
        while let Some(m) = dec.next_message().expect("valid records") {
            records += 1;
            assert!(m.to_record().len() - 4 <= MAX_CONTROL_LEN);
            assert!(matches!(
                m,
                ControlMessage::RoomSnapshot { .. } | ControlMessage::RoomSnapshotPart { .. }
            ));
            done = asm.feed(m).expect("in limits").or(done);
        }
        assert!(records > 1, "{records} records");
        let state = done.expect("reassembled");
        assert_eq!(state.participants.len(), 5_001);
    }
}
