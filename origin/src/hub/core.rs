//! The hub's decisions, without sockets, channels or clocks: which connection announced each
//! participant and speaker, who may be heard, who subscribes to which room, what every command,
//! departure and restart costs each room, and what the mesh peers and the mixer are told.
//!
//! [`HubCore`] is keyed by connection id. Its outputs go to the peers' [`Link`]s (control
//! messages and relayed datagrams) and to the [`HubSink`] (mixer notes and durable state), which
//! the driver implements with queues and the test stand-ins with recorders. They are handed out
//! *under the room's lock*, not returned after it, because that is what keeps every edge's view
//! of a room in command order while other rooms run in parallel on other threads. Time comes in
//! as a [`Moment`]; nothing here reads a clock or waits on IO.
//!
//! Locks, always taken in this order: a room's own lock (in [`Rooms`]), then the shared
//! `HubState`, then the `RelayTable`. No lock is held while another room's lock is waited
//! for; walks over all rooms copy the room list and lock one room at a time. Relaying a datagram
//! takes only the relay table's read lock.

use crate::metrics::{DropReason, Metrics};
use crate::persist::PersistedRoom;
use crate::room::{
    AuthorityCensus, Ending, Held, RejectCode, Rejection, Room, Rooms, RoomsConfig, Wait,
};
use crate::subs::{Subscribe, Subscriptions};
use amphi_protocol::control::{ControlMessage, PeerKind};
use amphi_protocol::room::{RoomCommand, RoomEvent, RoomPhase, RoomState};
use amphi_protocol::{ParticipantId, RoomId};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A mesh connection's id (the driver numbers connections from 1).
pub type ConnId = u64;

/// How often idle and long-ended rooms are forgotten.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);
/// `from` of a notice the origin itself originates (connection ids start at 1).
pub const FROM_ORIGIN: ConnId = 0;
/// After a room is restored from the store, participants whose edge has not re-announced them
/// within this long are taken to have left while the origin was away.
pub const RESUME_GRACE: Duration = Duration::from_secs(15);

/// When an input happens: the monotonic instant every timer is measured on, and the wall clock
/// in Unix milliseconds (chat timestamps, token expiry).
#[derive(Clone, Copy, Debug)]
pub struct Moment {
    /// Monotonic time.
    pub at: Instant,
    /// Wall-clock time, Unix milliseconds.
    pub unix_ms: u64,
}

impl Moment {
    fn unix_secs(self) -> u64 {
        self.unix_ms / 1000
    }
}

/// One mesh peer as the core reaches it.
pub trait Link: Clone + Send + Sync + 'static {
    /// Queue a control message to the peer (never waits).
    fn control(&self, msg: ControlMessage);
    /// Send a relayed speaker datagram to the peer; `false` if it could not be sent.
    fn datagram(&self, datagram: Bytes) -> bool;
}

/// What the mixer thread is told about rooms and speakers.
#[derive(Debug, Clone, PartialEq)]
pub enum MixerNote {
    /// A participant joined a live room: announce the room to the packagers (once).
    RoomOpened {
        /// The room.
        room: RoomId,
    },
    /// An edge announced a speaker; `identity` is the participant's user id and display name
    /// from the room authority (the packagers name chapters by it).
    SpeakerJoined {
        /// The room.
        room: RoomId,
        /// The speaker's participant id.
        speaker: u32,
        /// The announcing connection.
        source: ConnId,
        /// User id and display name.
        identity: Option<(String, String)>,
        /// When.
        at: Instant,
    },
    /// The speaker's edge said it stopped.
    SpeakerLeft {
        /// The room.
        room: RoomId,
        /// The speaker's participant id.
        speaker: u32,
        /// When.
        at: Instant,
    },
    /// An edge connection closed: its speakers are gone.
    SourceGone {
        /// The connection.
        source: ConnId,
        /// When.
        at: Instant,
    },
    /// The room ended.
    RoomEnded {
        /// The room.
        room: RoomId,
        /// When.
        at: Instant,
    },
}

/// Where the core's non-peer outputs go: the mixer and the durable state writer. Every method
/// only queues.
pub trait HubSink: Send + Sync {
    /// Tell the mixer thread.
    fn mixer(&self, note: MixerNote);
    /// Milliseconds of `room`'s program mixed so far (where a report points into the
    /// recording); `None` if no program runs for it.
    fn program_ms(&self, room: RoomId) -> Option<u64>;
    /// Store what `events` changed of `room`'s durable state ([`Room::changes`]).
    fn save_changes(&self, room: &Room, events: &[RoomEvent]);
    /// Store `room`'s whole durable state.
    fn save(&self, room: &Room);
    /// Hold `room`'s writes (its stored state could not be read: do not overwrite it).
    fn hold(&self, room: RoomId);
    /// Write `room`'s held and later changes again.
    fn release(&self, room: RoomId);
}

/// The driver broke the control protocol's rules for a peer: the peer is told and disconnected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Machine-readable code (`unexpected`).
    pub code: &'static str,
    /// What was wrong.
    pub message: String,
}

/// What the datagram relay needs, under its own lock: the connection that announced each
/// speaker, who may be heard, who subscribes to each room, and the links to send to. The
/// authority updates it (briefly, a map entry at a time) when those change; relaying a datagram
/// takes only its read lock, never the authority's, so no room's commands, joins or persistence
/// delay any room's audio.
struct RelayTable<L> {
    /// Edge links (datagram targets).
    links: HashMap<ConnId, L>,
    /// Subscribed edge connections per room (mirror of `HubState::subs`).
    subs: HashMap<RoomId, Vec<ConnId>>,
    /// The edge connection that announced each participant (mirror of every room's
    /// `RoomBook::owners`).
    owners: HashMap<(RoomId, u32), ConnId>,
    /// The edge connection that announced each speaker (`SpeakerJoined`). A relay frame is
    /// taken only from the connection that owns its speaker (in `owners`, or here for speakers
    /// the authority does not know).
    speakers: HashMap<(RoomId, u32), ConnId>,
    /// Speakers the authority lets be heard, for every room it holds; datagrams from anyone else
    /// in those rooms are neither relayed nor mixed.
    audible: HashMap<RoomId, HashSet<u32>>,
    /// Edge connections that want each room's program frames (mirror of
    /// `HubState::program_subs`).
    programs: HashMap<RoomId, Vec<ConnId>>,
}

impl<L> Default for RelayTable<L> {
    fn default() -> Self {
        RelayTable {
            links: HashMap::new(),
            subs: HashMap::new(),
            owners: HashMap::new(),
            speakers: HashMap::new(),
            audible: HashMap::new(),
            programs: HashMap::new(),
        }
    }
}

impl<L> RelayTable<L> {
    /// Whether connection `conn` announced `speaker` in `room`: the authority's owner of that
    /// participant if it has one, else the connection whose `SpeakerJoined` named it.
    fn announced_by(&self, room: RoomId, speaker: u32, conn: ConnId) -> bool {
        match self.owners.get(&(room, speaker)) {
            Some(&owner) => owner == conn,
            None => self.speakers.get(&(room, speaker)) == Some(&conn),
        }
    }

    /// The connections subscribed to `room` if connection `from` may relay `speaker`'s audio
    /// there (it announced the speaker, and the speaker may be heard), else why not.
    fn route(&self, room: RoomId, speaker: u32, from: ConnId) -> Result<&[ConnId], DropReason> {
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

/// What every room shares, behind one lock that is held briefly and never while a room's lock
/// is waited for: the links, who subscribes to which room, and which rooms were looked up in
/// the store.
struct HubState<L> {
    subs: Subscriptions,
    /// Which edges want which rooms' program frames (their push listeners).
    program_subs: Subscriptions,
    edges: HashMap<ConnId, L>,
    /// Geo-routers, told when a room ends.
    routers: HashMap<ConnId, L>,
    /// Single tokens the routers revoked by `jti` (until their `exp`): passed to every edge,
    /// and to each edge that connects later.
    revoked_tokens: amphi_protocol::token::RevokedTokens,
    /// Rooms looked up in the store since this origin started.
    looked_up: HashSet<RoomId>,
    /// Rooms restored from the store, and when (see [`RESUME_GRACE`]).
    restored: HashMap<RoomId, Instant>,
    /// Rooms whose stored state could not be read on first use (store unreachable): they run
    /// from a fresh state, their snapshots held, until they are reconciled.
    unverified: HashSet<RoomId>,
}

impl<L> Default for HubState<L> {
    fn default() -> Self {
        HubState {
            subs: Subscriptions::default(),
            program_subs: Subscriptions::default(),
            edges: HashMap::new(),
            routers: HashMap::new(),
            revoked_tokens: Default::default(),
            looked_up: HashSet::new(),
            restored: HashMap::new(),
            unverified: HashSet::new(),
        }
    }
}

impl<L: Link> HubState<L> {
    /// Queue `msg` to every edge subscribed to `room`.
    fn to_subscribers(&self, room: RoomId, msg: &ControlMessage) {
        for sub in self.subs.subscribers(room) {
            if let Some(link) = self.edges.get(sub) {
                link.control(msg.clone());
            }
        }
    }

    /// Tell every edge and geo-router that `user`'s tokens for `room` are revoked.
    fn revoke(&self, room: RoomId, user: String) {
        let msg = ControlMessage::Revoke { room, user };
        for link in self.edges.values().chain(self.routers.values()) {
            link.control(msg.clone());
        }
    }

    /// A geo-router revoked the token `jti` until `until`: remember it and tell every edge
    /// (once per revocation: a router re-sends its list when its link comes up).
    fn revoke_token(&mut self, jti: String, until: u64, now_secs: u64) {
        self.revoked_tokens.prune(now_secs);
        if !self.revoked_tokens.revoke(&jti, until, now_secs) {
            return;
        }
        let msg = ControlMessage::RevokeToken { jti, until };
        for link in self.edges.values() {
            link.control(msg.clone());
        }
    }

    /// Tell the edges subscribed to `room` and every geo-router, except connection `from`, that
    /// the room ended.
    fn room_ended_notice(&self, room: RoomId, from: ConnId) {
        for (&router, link) in &self.routers {
            if router != from {
                link.control(ControlMessage::RoomEnded { room });
            }
        }
        let room_subs = self.subs.subscribers(room);
        // Edges with push listeners only hear it too (they close those listeners).
        let push_only = self
            .program_subs
            .subscribers(room)
            .iter()
            .filter(|c| !room_subs.contains(c));
        for &sub in room_subs.iter().chain(push_only) {
            if sub == from {
                continue;
            }
            if let Some(link) = self.edges.get(&sub) {
                link.control(ControlMessage::RoomEnded { room });
            }
        }
    }
}

/// The hub's bookkeeping of one room, kept with the room under the room's own lock.
#[derive(Debug, Default)]
pub struct RoomBook {
    /// The edge connection that announced each participant (its `Leave` on disconnect).
    owners: HashMap<ParticipantId, ConnId>,
    /// Edge connections that were sent the room's snapshot since they subscribed to it: their
    /// later joins get events only.
    synced: HashSet<ConnId>,
}

/// A room as the hub holds it (see [`Rooms`]).
type HeldRoom = Held<RoomBook>;

fn len_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The hub's sans-IO core: the room authority ([`Rooms`]) and everything the hub decides around
/// it, keyed by connection id (see the module documentation for locks and outputs).
pub struct HubCore<L> {
    metrics: Arc<Metrics>,
    /// The room authority: every room behind its own lock.
    rooms: Rooms<RoomBook>,
    /// Links and subscriptions shared by all rooms.
    state: RwLock<HubState<L>>,
    /// The relay's view of the state (see [`RelayTable`]).
    relay: RwLock<RelayTable<L>>,
    /// When idle rooms are next forgotten.
    next_housekeeping: Mutex<Option<Instant>>,
    sink: Box<dyn HubSink>,
    /// Report ids are this (random per process, given by the driver) and a counter: unique
    /// over origins and restarts without coordination.
    report_nonce: u64,
    next_report: AtomicU64,
}

impl<L: Link> HubCore<L> {
    /// A core with no rooms and no peers; a busy room's lock is waited for through `wait`;
    /// report ids start with `report_nonce`.
    pub fn new(
        metrics: Arc<Metrics>,
        rooms: RoomsConfig,
        wait: Wait,
        sink: Box<dyn HubSink>,
        report_nonce: u64,
    ) -> Self {
        HubCore {
            metrics,
            rooms: Rooms::new(rooms).waiting_with(wait),
            state: RwLock::new(HubState::default()),
            relay: RwLock::new(RelayTable::default()),
            next_housekeeping: Mutex::new(None),
            sink,
            report_nonce,
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
                report.program_ms = self.sink.program_ms(room);
            }
        }
    }

    fn state_read(&self) -> std::sync::RwLockReadGuard<'_, HubState<L>> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn state_write(&self) -> std::sync::RwLockWriteGuard<'_, HubState<L>> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn relay_read(&self) -> std::sync::RwLockReadGuard<'_, RelayTable<L>> {
        self.relay.read().unwrap_or_else(|e| e.into_inner())
    }

    fn relay_write(&self) -> std::sync::RwLockWriteGuard<'_, RelayTable<L>> {
        self.relay.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The authoritative state of `room`, if it is held.
    pub fn room_state(&self, room: RoomId) -> Option<RoomState> {
        self.rooms.with(room, |held| held.room.snapshot())
    }

    /// The room authority's live rooms and participants (for metrics; one room locked at a
    /// time).
    pub fn census(&self) -> AuthorityCensus {
        self.rooms.census()
    }

    /// A mesh peer said hello on connection `conn`. Edges and routers are told every live ban
    /// (so they refuse those users' tokens from the start), edges also every revoked token;
    /// edges and routers are kept to send to. A packager is the mixer's, not the core's.
    pub fn connected(&self, conn: ConnId, peer: PeerKind, link: L, now: Moment) {
        if !matches!(peer, PeerKind::Edge | PeerKind::Router) {
            return;
        }
        // Room locks come before the shared state's: the bans first, then the revocations.
        for (room, user) in self.rooms.bans() {
            link.control(ControlMessage::Revoke { room, user });
        }
        let mut st = self.state_write();
        if peer == PeerKind::Router {
            st.routers.insert(conn, link);
            return;
        }
        for (jti, until) in st.revoked_tokens.live(now.unix_secs()) {
            link.control(ControlMessage::RevokeToken {
                jti: jti.to_string(),
                until,
            });
        }
        st.edges.insert(conn, link.clone());
        drop(st);
        self.relay_write().links.insert(conn, link);
    }

    /// Connection `conn` (a `peer`) closed. An edge's participants leave if `leave` (on the
    /// origin's own shutdown they stay in the stored state: their edges re-announce them to the
    /// restarted origin), and its speakers are gone from the mix.
    pub fn disconnected(
        &self,
        conn: ConnId,
        peer: PeerKind,
        peer_id: &str,
        leave: bool,
        now: Moment,
    ) {
        match peer {
            PeerKind::Edge => {
                self.edge_gone(conn, peer_id, leave, now);
                self.sink.mixer(MixerNote::SourceGone {
                    source: conn,
                    at: now.at,
                });
            }
            PeerKind::Router => {
                self.state_write().routers.remove(&conn);
            }
            PeerKind::Packager => {}
        }
    }

    /// Relay a speaker datagram (`room`, `speaker`, parsed by the driver) that arrived on edge
    /// connection `from` to every other subscribed edge (`forward`; repeats are mixed, never
    /// forwarded). `Err` says why it is neither relayed nor to be mixed.
    pub fn relay(
        &self,
        room: RoomId,
        speaker: u32,
        from: ConnId,
        forward: bool,
        datagram: &Bytes,
    ) -> Result<(), DropReason> {
        let relay = self.relay_read();
        let subs = relay.route(room, speaker, from)?;
        if !forward {
            return Ok(());
        }
        for &sub in subs {
            if sub == from {
                continue;
            }
            let Some(link) = relay.links.get(&sub) else {
                continue;
            };
            if link.datagram(datagram.clone()) {
                self.metrics.relay_forwarded.inc();
            } else {
                self.metrics.dropped(DropReason::SendFailed);
            }
        }
        Ok(())
    }

    /// Send one program frame of `room` (`datagram`, a `Program` relay frame) to every edge that
    /// subscribed to the room's program, once each; returns how many it went to.
    pub fn program_frame(&self, room: RoomId, datagram: &Bytes) -> usize {
        let relay = self.relay_read();
        let Some(subs) = relay.programs.get(&room) else {
            return 0;
        };
        let mut sent = 0;
        for sub in subs {
            let Some(link) = relay.links.get(sub) else {
                continue;
            };
            if link.datagram(datagram.clone()) {
                sent += 1;
            } else {
                self.metrics.dropped(DropReason::SendFailed);
            }
        }
        self.metrics.program_frames_to_edges.inc_by(sent as u64);
        sent
    }

    /// Mirror `room`'s program subscribers into the relay's view.
    fn sync_program_subs(&self, st: &HubState<L>, room: RoomId) {
        let subs = st.program_subs.subscribers(room);
        let mut relay = self.relay_write();
        if subs.is_empty() {
            relay.programs.remove(&room);
        } else {
            relay.programs.insert(room, subs.to_vec());
        }
    }

    /// Apply one control message from connection `conn` (a `peer` called `peer_id`), whose own
    /// link is `own`; returns the reply to queue to it, if any. The room it names must have been
    /// taken from the store first where one is configured ([`HubCore::needs_store_read`]).
    pub fn handle_control(
        &self,
        now: Moment,
        conn: ConnId,
        peer: PeerKind,
        peer_id: &str,
        own: &L,
        msg: ControlMessage,
    ) -> Result<Option<ControlMessage>, Violation> {
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
            | ControlMessage::CommandRejected { .. } => Err(Violation {
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
                self.state_write().revoke_token(jti, until, now.unix_secs());
                Ok(None)
            }
            ControlMessage::RevokeToken { .. } => Err(Violation {
                code: "unexpected",
                message: "revoke_token is only accepted from geo-routers".into(),
            }),
            ControlMessage::RoomEnded { room } if peer != PeerKind::Packager => {
                tracing::info!(%room, from = %peer_id, ?peer, "room ended");
                self.end_room(room, conn, now);
                Ok(None)
            }
            _ if peer != PeerKind::Edge => edge_only(kind_of(&msg)),
            ControlMessage::SpeakerJoined {
                room,
                speaker,
                name,
                region,
            } => Ok(self.speaker_joined(now, conn, peer_id, room, speaker, (&name, &region))),
            ControlMessage::SpeakerLeft { room, speaker } => {
                {
                    let mut relay = self.relay_write();
                    if relay.speakers.get(&(room, speaker.0)) != Some(&conn) {
                        // Not this connection's speaker: nothing to stop.
                        return Ok(None);
                    }
                    relay.speakers.remove(&(room, speaker.0));
                }
                tracing::info!(%room, %speaker, edge = %peer_id, "speaker left");
                self.sink.mixer(MixerNote::SpeakerLeft {
                    room,
                    speaker: speaker.0,
                    at: now.at,
                });
                Ok(None)
            }
            ControlMessage::SubscribeRoom { room } => match self.subscribe(room, conn) {
                Subscribe::Added | Subscribe::Already => Ok(None),
                Subscribe::LimitReached => Ok(Some(ControlMessage::Error {
                    code: "limit".into(),
                    message: format!("too many subscriptions, {room} refused"),
                })),
            },
            ControlMessage::UnsubscribeRoom { room } => {
                // The edge dropped its copy of the room: its next join gets a snapshot again.
                self.rooms.with(room, |held| held.book.synced.remove(&conn));
                let mut st = self.state_write();
                st.subs.unsubscribe(room, conn);
                self.sync_subs(&st, room);
                Ok(None)
            }
            ControlMessage::SubscribeProgram { room } => {
                let mut st = self.state_write();
                match st.program_subs.subscribe(room, conn) {
                    Subscribe::Added => {
                        tracing::info!(%room, edge = %peer_id, "edge subscribed to the program");
                        self.sync_program_subs(&st, room);
                        Ok(None)
                    }
                    Subscribe::Already => Ok(None),
                    Subscribe::LimitReached => Ok(Some(ControlMessage::Error {
                        code: "limit".into(),
                        message: format!("too many program subscriptions, {room} refused"),
                    })),
                }
            }
            ControlMessage::UnsubscribeProgram { room } => {
                let mut st = self.state_write();
                if st.program_subs.unsubscribe(room, conn) {
                    tracing::info!(%room, edge = %peer_id, "edge unsubscribed from the program");
                    self.sync_program_subs(&st, room);
                }
                Ok(None)
            }
            ControlMessage::RoomEnded { .. } => edge_only("room_ended"),
            ControlMessage::RoomCommand {
                room,
                actor,
                request,
                command,
            } => {
                self.room_command(now, conn, own, room, actor, request, command);
                Ok(None)
            }
        }
    }

    /// `SpeakerJoined` from edge connection `conn`: the speaker is this connection's unless
    /// another connection announced that participant; returns the refusal, if any.
    fn speaker_joined(
        &self,
        now: Moment,
        conn: ConnId,
        peer_id: &str,
        room: RoomId,
        speaker: ParticipantId,
        (name, region): (&str, &str),
    ) -> Option<ControlMessage> {
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
            let st = self.state_read();
            let mut relay = self.relay_write();
            let key = (room, speaker.0);
            // The relay's mirror of the room's owners.
            let owner = relay.owners.get(&key).copied();
            let claimed = relay.speakers.get(&key).copied();
            let other = owner
                .filter(|&c| c != conn)
                .or(claimed.filter(|&c| c != conn && st.edges.contains_key(&c)));
            if other.is_none() {
                relay.speakers.insert(key, conn);
            }
            other
        };
        if let Some(other) = other {
            self.metrics.speaker_claims_refused.inc();
            tracing::warn!(%room, %speaker, edge = %peer_id, other, "speaker announcement refused: another connection announced that participant");
            return Some(ControlMessage::Error {
                code: "forbidden".into(),
                message: format!("speaker {speaker} in {room} belongs to another connection"),
            });
        }
        tracing::info!(%room, %speaker, %name, %region, edge = %peer_id, "speaker joined");
        self.sink.mixer(MixerNote::SpeakerJoined {
            room,
            speaker: speaker.0,
            source: conn,
            identity,
            at: now.at,
        });
        None
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
        self.relay_write().audible.insert(r.id(), set);
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
        let mut relay = self.relay_write();
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
    fn set_owner(&self, held: &mut HeldRoom, id: ParticipantId, conn: ConnId) {
        held.book.owners.insert(id, conn);
        self.relay_write()
            .owners
            .insert((held.room.id(), id.0), conn);
    }

    /// Participant `id` of `held`'s room has no announcing connection any more.
    fn remove_owner(&self, held: &mut HeldRoom, id: ParticipantId) {
        held.book.owners.remove(&id);
        self.relay_write().owners.remove(&(held.room.id(), id.0));
    }

    /// Mirror `room`'s subscribers into the relay's view.
    fn sync_subs(&self, st: &HubState<L>, room: RoomId) {
        let subs = st.subs.subscribers(room);
        let mut relay = self.relay_write();
        if subs.is_empty() {
            relay.subs.remove(&room);
        } else {
            relay.subs.insert(room, subs.to_vec());
        }
    }

    /// Subscribe connection `conn` to `room` (the shared write lock only if it is not yet).
    fn subscribe(&self, room: RoomId, conn: ConnId) -> Subscribe {
        if self.state_read().subs.subscribers(room).contains(&conn) {
            return Subscribe::Already;
        }
        let mut st = self.state_write();
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
            let mut relay = self.relay_write();
            relay.owners.retain(|(r, _), _| *r != room);
            relay.speakers.retain(|(r, _), _| *r != room);
        }
        self.update_audible(&held.room, events);
        // What these events changed, not the whole room; chat writes nothing. Queued for the
        // writer: no store IO here, and none on the relay's path.
        self.sink.save_changes(&held.room, events);
        ended
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
            self.relay_write().forget_room(room);
        });
        if !gone.is_empty() {
            let mut st = self.state_write();
            for room in gone {
                st.looked_up.remove(&room);
                st.restored.remove(&room);
            }
        }
    }

    /// Refuse a command of `actor` in `room`: `CommandRejected` to the edge that sent it.
    fn refuse(&self, own: &L, room: RoomId, actor: ParticipantId, request: u64, rej: Rejection) {
        self.metrics.room_commands_rejected.inc();
        tracing::debug!(%room, %actor, code = %rej.code, message = %rej.message, "room command refused");
        own.control(ControlMessage::CommandRejected {
            room,
            actor,
            request,
            code: rej.code.as_str().into(),
            message: rej.message,
        });
    }

    /// Apply a participant's command from edge connection `conn` (whose link is `own`). After a
    /// successful `Join` the joining edge receives `RoomEvents` (with `ParticipantJoined`, like
    /// every subscribed edge) and, if it is the edge's first join in the room since it
    /// subscribed, `RoomSnapshot`, whose state already includes the join; after a refused one,
    /// `CommandRejected`. Only `room`'s lock is held while the command runs, and its events are
    /// queued to the subscribed edges before it is released, so they go out in command order.
    #[allow(clippy::too_many_arguments)]
    pub fn room_command(
        &self,
        now: Moment,
        conn: ConnId,
        own: &L,
        room: RoomId,
        actor: ParticipantId,
        request: u64,
        command: RoomCommand,
    ) {
        self.housekeeping(now.at);
        let is_join = matches!(command, RoomCommand::Join { .. });
        let create = is_join.then_some((now.at, now.unix_ms));
        let done = self.rooms.with_or_create(room, create, |held| {
            self.command_in(held, now, conn, own, actor, request, command);
        });
        if let Err(rej) = done {
            self.refuse(own, room, actor, request, rej);
        }
        self.metrics.rooms_known.set(len_i64(self.rooms.len()));
    }

    /// [`HubCore::room_command`] under the room's lock.
    #[allow(clippy::too_many_arguments)]
    fn command_in(
        &self,
        held: &mut HeldRoom,
        now: Moment,
        conn: ConnId,
        own: &L,
        actor: ParticipantId,
        request: u64,
        command: RoomCommand,
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
            held.room.apply(actor, command, now.at)
        };
        let mut events = match result {
            Ok(events) => events,
            Err(rej) => return self.refuse(own, room, actor, request, rej),
        };
        self.stamp_reports(room, &mut events);
        self.metrics.room_commands.inc();
        if is_join {
            // The packagers prepare the room's HLS output before any program media.
            self.sink.mixer(MixerNote::RoomOpened { room });
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
        let st = self.state_read();
        // Reports are stored and announced by the geo-routers (each deduplicates by id).
        for e in &events {
            if let RoomEvent::Reported { report } = e {
                tracing::info!(%room, id = %report.id, reason = report.reason.as_str(), "report");
                for link in st.routers.values() {
                    link.control(ControlMessage::Reported {
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
            own.control(ControlMessage::RoomSnapshot {
                state: held.room.snapshot(),
                more: false,
            });
            held.book.synced.insert(conn);
        }
        if ended {
            tracing::info!(%room, by = %actor, "room ended by its host");
            st.room_ended_notice(room, FROM_ORIGIN);
            self.sink.mixer(MixerNote::RoomEnded { room, at: now.at });
        }
    }

    /// The mixer found `room` without speakers for the configured idle timeout: end it as the
    /// API's `POST /v1/rooms/{id}/end` does (edges, geo-routers, packagers hear `RoomEnded`).
    pub fn end_idle_room(&self, room: RoomId, now: Moment) {
        tracing::info!(%room, "room ended after its idle timeout");
        self.end_room(room, FROM_ORIGIN, now);
    }

    /// `RoomEnded` from connection `from` (a geo-router or an edge): end the room's authority
    /// record, tell the subscribed edges (`RoomEvents` with `Ended`, then `RoomEnded`), the other
    /// routers and the packagers. A room that already ended here is not announced again.
    fn end_room(&self, room: RoomId, from: ConnId, now: Moment) {
        self.rooms
            .end(room, now.at, now.unix_ms, |held, ending| match ending {
                Ending::AlreadyEnded => {}
                ending => {
                    match (ending, held) {
                        (Ending::Ended(events), Some(held)) => {
                            self.after_events(held, &events);
                            let msg = ControlMessage::RoomEvents { room, events };
                            self.state_read().to_subscribers(room, &msg);
                        }
                        (_, Some(held)) => {
                            self.refresh_audible(held);
                            self.sink.save(&held.room);
                        }
                        (_, None) => {
                            // Not remembered (the origin is full): nobody is heard there.
                            self.relay_write().audible.remove(&room);
                        }
                    }
                    self.state_read().room_ended_notice(room, from);
                    self.sink.mixer(MixerNote::RoomEnded { room, at: now.at });
                }
            });
        self.metrics.rooms_known.set(len_i64(self.rooms.len()));
    }

    /// Edge connection `conn` closed: forget it, and (if `leave`) every participant it announced
    /// leaves. The shared state is released before the rooms are visited, one at a time.
    fn edge_gone(&self, conn: ConnId, peer_id: &str, leave: bool, now: Moment) {
        {
            let mut st = self.state_write();
            st.edges.remove(&conn);
            let rooms = st.subs.rooms_of(conn).to_vec();
            st.subs.remove_connection(conn);
            for room in rooms {
                self.sync_subs(&st, room);
            }
            let programs = st.program_subs.rooms_of(conn).to_vec();
            st.program_subs.remove_connection(conn);
            for room in programs {
                self.sync_program_subs(&st, room);
            }
        }
        {
            let mut relay = self.relay_write();
            relay.links.remove(&conn);
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
            for id in mine {
                self.leave(held, id, now.at);
            }
        });
        if left > 0 {
            tracing::info!(edge = %peer_id, participants = left, "edge gone: its participants left");
        }
    }

    /// Participant `id` of `held`'s room leaves (its edge went, or never re-announced it).
    fn leave(&self, held: &mut HeldRoom, id: ParticipantId, now: Instant) {
        let room = held.room.id();
        match held.room.apply(id, RoomCommand::Leave, now) {
            Ok(events) => {
                self.after_events(held, &events);
                if !events.is_empty() {
                    let msg = ControlMessage::RoomEvents { room, events };
                    self.state_read().to_subscribers(room, &msg);
                }
            }
            Err(_) => self.remove_owner(held, id),
        }
    }

    /// Whether `room`'s stored state must be read before a message naming it is handled: it was
    /// not looked up yet, is not waiting for reconciliation, and is not held.
    pub fn needs_store_read(&self, room: RoomId) -> bool {
        {
            let st = self.state_read();
            if st.looked_up.contains(&room) || st.unverified.contains(&room) {
                return false;
            }
        }
        !self.rooms.contains(room)
    }

    /// `room`'s stored state could not be read: the room runs unverified from a fresh state,
    /// its snapshots held so that they cannot overwrite bans and roles stored before.
    pub fn store_unreadable(&self, room: RoomId) {
        if self.state_write().unverified.insert(room) {
            self.sink.hold(room);
        }
    }

    /// Rooms running unverified (their stored state is to be read again).
    pub fn unverified_rooms(&self) -> Vec<RoomId> {
        self.state_read().unverified.iter().copied().collect()
    }

    /// The store answered for `room` with `saved`: restore it on first use, or reconcile it with
    /// the fresh state an unverified room ran from.
    pub fn store_read(&self, room: RoomId, saved: Option<PersistedRoom>, now: Moment) {
        if self.state_read().unverified.contains(&room) {
            self.reconcile(room, saved, now);
            return;
        }
        let mut restored = false;
        if let Some(saved) = saved {
            let (participants, hands, banned) = (
                saved.state.participants.len(),
                saved.state.hands.len(),
                saved.state.banned.len(),
            );
            let phase = saved.state.phase;
            if self.rooms.restore(saved, now.at, now.unix_ms, |held| {
                self.refresh_audible(held)
            }) {
                tracing::info!(%room, ?phase, participants, hands, banned, "room restored from the store");
                restored = true;
                self.metrics.rooms_known.set(len_i64(self.rooms.len()));
            }
        }
        // Marked looked up only now: a command that arrived meanwhile loads (and waits) too,
        // rather than creating the room before its stored state is in.
        let mut st = self.state_write();
        st.looked_up.insert(room);
        if restored {
            st.restored.insert(room, now.at);
        }
    }

    /// The store answers again for unverified `room`: merge what it holds into the room
    /// ([`crate::persist::reconcile`]), tell the edges what changed (banned users leave, roles
    /// stored before are back), and write its snapshots again.
    fn reconcile(&self, room: RoomId, saved: Option<PersistedRoom>, now: Moment) {
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
                held.room.reset(merged, now.at, now.unix_ms);
                self.refresh_audible(held);
                if !events.is_empty() {
                    let msg = ControlMessage::RoomEvents { room, events };
                    self.state_read().to_subscribers(room, &msg);
                }
                tracing::info!(%room, banned, "store reachable again: room reconciled with its stored state");
            }
            self.sink.release(room);
            self.sink.save(&held.room);
        });
        if held.is_none() {
            self.sink.release(room);
        }
        let mut st = self.state_write();
        st.unverified.remove(&room);
        st.looked_up.insert(room);
    }

    /// Participants of restored rooms that no edge re-announced within [`RESUME_GRACE`] leave.
    pub fn sweep_unclaimed(&self, now: Instant) {
        let due: Vec<RoomId> = {
            let mut st = self.state_write();
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
                    self.leave(held, id, now);
                }
            });
        }
    }
}

/// The name of a control message's kind, as on the wire.
pub(crate) fn kind_of(m: &ControlMessage) -> &'static str {
    match m {
        ControlMessage::Hello { .. } => "hello",
        ControlMessage::Welcome { .. } => "welcome",
        ControlMessage::SpeakerJoined { .. } => "speaker_joined",
        ControlMessage::SpeakerLeft { .. } => "speaker_left",
        ControlMessage::SubscribeRoom { .. } => "subscribe_room",
        ControlMessage::UnsubscribeRoom { .. } => "unsubscribe_room",
        ControlMessage::SubscribeProgram { .. } => "subscribe_program",
        ControlMessage::UnsubscribeProgram { .. } => "unsubscribe_program",
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
mod tests;
