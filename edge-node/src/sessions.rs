//! Driver of the [`SignalingCore`]: holds it behind a mutex and carries out its outputs (control
//! messages to the uplink, events to WebSocket clients, join outcomes, media permission changes).
//! Every output is a non-blocking channel send, so the lock is never held across an await.

use crate::leases::{RefreshError, TokenLeases};
use crate::media::api::{MediaControl, MediaEvent};
use crate::mesh::MeshEvent;
use crate::metrics::Metrics;
use crate::room::{ClientView, Refusal};
use crate::shards::MediaShards;
use crate::signaling::{Census, CloseWhy, JoinRequest, Output, SignalingCore};
use crate::tier_moves::{TierCounts, TierMoves};
use crate::watched::publish_if_changed;
use amphi_protocol::api::RoomTiers;
use amphi_protocol::control::ControlMessage;
use amphi_protocol::room::{ActiveSpeaker, ListenTier, RoomCommand, RoomRole, ServerMessage};
use amphi_protocol::token::{Claims, Revocations, RevokedTokens};
use amphi_protocol::{ParticipantId, RoomId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Capacity of one WebSocket client's outbound queue; a client that falls this far behind is
/// disconnected.
pub(crate) const CLIENT_QUEUE: usize = 1024;

/// To a WebSocket session task.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Send this message.
    Msg(ServerMessage),
    /// Close the session (after the event explaining why was sent).
    Close(CloseWhy),
}

/// How a join ended.
#[derive(Debug)]
pub(crate) enum JoinOutcome {
    /// The authority accepted it: what the client is sent.
    Joined(ClientView),
    /// Refused.
    Refused(Refusal),
}

/// Reports of a room's active speakers closer together than this are the other media shards'
/// copies of the same period (they report every [`crate::media::core::ACTIVE_SPEAKERS_INTERVAL`]).
const ACTIVE_SPEAKERS_DEDUP: Duration = Duration::from_millis(200);
/// Rooms remembered for that before stale ones are forgotten.
const ACTIVE_SENT_MAX: usize = 4096;
/// Revoked (room, user) entries an edge holds at most.
const MAX_REVOCATIONS: usize = 100_000;
/// Tokens revoked by `jti` an edge holds at most.
const MAX_REVOKED_TOKENS: usize = 100_000;
/// The message a session ended by its token's revocation is sent.
pub(crate) const TOKEN_REVOKED: &str = "token revoked";
/// The message a session ended by its token's expiry is sent.
pub(crate) const TOKEN_EXPIRED: &str =
    "token expired: refresh it before it expires (refresh_token, or PATCH with the new token)";

/// How often freed tier seats are looked for (`TierMoves::poll`).
const TIER_POLL: Duration = Duration::from_millis(500);

/// Each room's WebRTC receive sessions and push listeners on this edge (for the tier moves).
pub(crate) type TierCountsSource =
    Box<dyn Fn() -> (BTreeMap<RoomId, u32>, BTreeMap<RoomId, u32>) + Send + Sync>;

/// The wall clock in Unix seconds (token times).
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct Inner {
    core: SignalingCore,
    epoch: u64,
    clients: HashMap<ParticipantId, mpsc::Sender<Outbound>>,
    pending: HashMap<ParticipantId, oneshot::Sender<JoinOutcome>>,
    /// The token every session lives on (ends it when the token expires or is revoked).
    leases: TokenLeases,
    /// Movable listeners below the interactive tier and the moves offered to them.
    tiers: TierMoves,
}

/// The edge's signaling state, shared by HTTP handlers, the media driver and the uplink.
pub(crate) struct Sessions {
    inner: Mutex<Inner>,
    mesh_tx: mpsc::UnboundedSender<MeshEvent>,
    media: MediaShards,
    /// When each room's active speakers were last sent (every media shard reports them; the
    /// first report of each period wins).
    active_sent: Mutex<HashMap<RoomId, Instant>>,
    /// Users whose tokens the origin revoked (kicked), per room.
    revoked: Mutex<Revocations>,
    /// How long a revocation is kept: the token lifetime cap (every token it covers has
    /// expired by then).
    revocation_secs: u64,
    /// Single tokens revoked by `jti` (the router's `POST /v1/tokens/revoke`), each until its
    /// `exp`.
    revoked_tokens: Mutex<RevokedTokens>,
}

impl Sessions {
    pub(crate) fn new(
        region: &str,
        mesh_tx: mpsc::UnboundedSender<MeshEvent>,
        media: MediaShards,
        revocation_secs: u64,
        expiry_grace_secs: u64,
    ) -> Self {
        Sessions {
            revoked: Mutex::new(Revocations::new(MAX_REVOCATIONS)),
            revocation_secs,
            revoked_tokens: Mutex::new(RevokedTokens::new(MAX_REVOKED_TOKENS)),
            inner: Mutex::new(Inner {
                core: SignalingCore::new(region),
                epoch: 0,
                clients: HashMap::new(),
                pending: HashMap::new(),
                leases: TokenLeases::new(expiry_grace_secs),
                tiers: TierMoves::new(),
            }),
            mesh_tx,
            media,
            active_sent: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dispatch(&self, inner: &mut Inner, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::ToOrigin(msg) => {
                    let _ = self.mesh_tx.send(MeshEvent::Control {
                        epoch: inner.epoch,
                        msg,
                    });
                }
                Output::ToClient(pid, msg) => {
                    let full = match inner.clients.get(&pid) {
                        Some(tx) => tx.try_send(Outbound::Msg(msg)).is_err(),
                        None => false,
                    };
                    if full {
                        // Too slow or gone: dropping the sender closes its session.
                        tracing::info!(participant = %pid, "client queue full; disconnecting");
                        inner.clients.remove(&pid);
                    }
                }
                Output::Joined { participant, view } => {
                    if let Some(tx) = inner.pending.remove(&participant) {
                        let _ = tx.send(JoinOutcome::Joined(view));
                    }
                }
                Output::JoinRefused {
                    participant,
                    refusal,
                } => {
                    if let Some(tx) = inner.pending.remove(&participant) {
                        let _ = tx.send(JoinOutcome::Refused(refusal));
                    }
                }
                Output::Close { participant, why } => {
                    inner.leases.close(participant);
                    if let Some(tx) = inner.clients.remove(&participant) {
                        let _ = tx.try_send(Outbound::Close(why));
                    }
                    self.media.control(MediaControl::Close { participant });
                }
                Output::Permission {
                    participant,
                    may_send,
                } => {
                    self.media.control(MediaControl::Permission {
                        participant,
                        may_send,
                    });
                }
            }
        }
    }

    /// Register a participant, living on the token `claims`, and ask the authority; the
    /// receiver resolves with the outcome. `client` receives room events once joined (WebSocket
    /// sessions). A token revoked since its admission check is refused here: the check and the
    /// lease happen under the lock [`Sessions::revoke_token`] takes to end a token's sessions.
    pub(crate) fn join(
        &self,
        req: JoinRequest,
        claims: &Claims,
        client: Option<mpsc::Sender<Outbound>>,
    ) -> oneshot::Receiver<JoinOutcome> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        if self.is_revoked(claims, now_unix()) {
            let refusal = Refusal::new("token_revoked", TOKEN_REVOKED);
            let _ = tx.send(JoinOutcome::Refused(refusal));
            return rx;
        }
        let pid = req.participant;
        inner.leases.open(pid, claims);
        inner.pending.insert(pid, tx);
        if let Some(c) = client {
            inner.clients.insert(pid, c);
        }
        let outs = inner.core.join(req, Instant::now());
        self.dispatch(&mut inner, outs);
        rx
    }

    /// A session ended.
    pub(crate) fn leave(&self, pid: ParticipantId) {
        let mut inner = self.lock();
        inner.clients.remove(&pid);
        inner.pending.remove(&pid);
        inner.leases.close(pid);
        inner.tiers.forget(pid);
        let outs = inner.core.leave(pid, Instant::now());
        self.dispatch(&mut inner, outs);
    }

    /// A joined participant's command.
    pub(crate) fn command(&self, pid: ParticipantId, cmd: RoomCommand) -> Result<(), Refusal> {
        let mut inner = self.lock();
        let outs = inner.core.command(pid, cmd, Instant::now())?;
        self.dispatch(&mut inner, outs);
        Ok(())
    }

    /// A joined participant says how it hears the room (`listening`). Only listeners are ever
    /// moved.
    pub(crate) fn listening(&self, pid: ParticipantId, tier: ListenTier, movable: bool) {
        let mut inner = self.lock();
        let Some(room) = inner.core.room_of(pid) else {
            return;
        };
        let movable = movable && inner.core.role_of(pid) == Some(RoomRole::Listener);
        inner
            .tiers
            .listening(pid, room, tier, movable, Instant::now());
    }

    /// Offer movable listeners the tier seats that freed (`move`), every [`TIER_POLL`] until
    /// `shutdown`: seats are the router's `thresholds` for this edge's rooms minus `counts`.
    /// Publishes the rooms with listeners waiting for a seat in `waiting` (the heartbeat lists
    /// them so the router sends their thresholds).
    pub(crate) async fn tier_moves_loop(
        self: Arc<Self>,
        counts: TierCountsSource,
        mut thresholds: watch::Receiver<Vec<RoomTiers>>,
        waiting: watch::Sender<Vec<RoomId>>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut declined = 0;
        let mut every = tokio::time::interval(TIER_POLL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let (interactive, push) = counts();
            let mut inner = self.lock();
            if thresholds.has_changed().unwrap_or(false) {
                let t = thresholds.borrow_and_update();
                inner.tiers.set_thresholds(&t);
            }
            let moves = inner.tiers.poll(Instant::now(), |room| TierCounts {
                interactive: interactive.get(&room).copied().unwrap_or(0),
                push: push.get(&room).copied().unwrap_or(0),
            });
            let mut outs = Vec::with_capacity(moves.len());
            for m in moves {
                if inner.core.role_of(m.participant) != Some(RoomRole::Listener) {
                    inner.tiers.forget(m.participant);
                    continue;
                }
                tracing::debug!(participant = %m.participant, tier = m.tier.as_str(), "tier move offered");
                metrics.tier_moves_offered.inc();
                outs.push(Output::ToClient(
                    m.participant,
                    ServerMessage::Move { tier: m.tier },
                ));
            }
            self.dispatch(&mut inner, outs);
            let now_declined = inner.tiers.declined();
            metrics
                .tier_moves_declined
                .inc_by(now_declined.saturating_sub(declined));
            declined = now_declined;
            let rooms = inner.tiers.waiting_rooms();
            drop(inner);
            publish_if_changed(&waiting, rooms);
        }
    }

    /// One page of the participant's room (its `list_participants`).
    pub(crate) fn list_participants(
        &self,
        pid: ParticipantId,
        after: Option<ParticipantId>,
        limit: Option<u32>,
    ) -> Result<ServerMessage, Refusal> {
        self.lock().core.list_participants(pid, after, limit)
    }

    /// Send large rooms' changed counts to their clients, and end the sessions whose token
    /// expired (past the grace), every [`crate::signaling::COUNTS_EVERY`] / 2, until `shutdown`.
    pub(crate) async fn tick_loop(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(crate::signaling::COUNTS_EVERY / 2);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {
                    let mut inner = self.lock();
                    let outs = inner.core.tick(Instant::now());
                    self.dispatch(&mut inner, outs);
                    drop(inner);
                    self.expire(now_unix());
                }
            }
        }
    }

    /// Carry out the media shards' events until `shutdown` (or every shard is gone).
    pub(crate) async fn media_events(
        self: std::sync::Arc<Self>,
        mut events: mpsc::UnboundedReceiver<MediaEvent>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = events.recv() => match ev {
                    Some(ev) => self.on_media(ev),
                    None => return,
                },
            }
        }
    }

    /// One event from a media shard.
    pub(crate) fn on_media(&self, ev: MediaEvent) {
        match ev {
            MediaEvent::ActiveSpeakers { room, speakers } => self.active_speakers(room, &speakers),
            MediaEvent::PeerGone { participant } => self.leave(participant),
        }
    }

    /// A control message from the origin.
    pub(crate) fn on_control(&self, msg: ControlMessage) {
        let mut inner = self.lock();
        let outs = inner.core.on_control(msg);
        self.dispatch(&mut inner, outs);
    }

    /// The origin revoked `user`'s tokens for `room` at `now_unix`: refuse them from now on and
    /// end the user's sessions in the room on this edge.
    pub(crate) fn revoke(&self, room: RoomId, user: &str, now_unix: u64) {
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
            revoked.prune(now_unix);
            revoked.revoke_user(
                room,
                user,
                now_unix.saturating_add(self.revocation_secs),
                now_unix,
            );
        }
        let mut inner = self.lock();
        let outs = inner.core.revoke_user(room, user, Instant::now());
        self.dispatch(&mut inner, outs);
    }

    /// Whether the token behind `claims` was revoked: its user (a kick), or the token itself
    /// (by `jti`).
    pub(crate) fn is_revoked(&self, claims: &Claims, now_unix: u64) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_revoked(claims.room, &claims.sub, now_unix)
            || self
                .revoked_tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_revoked(&claims.jti, now_unix)
    }

    /// The token `jti` is revoked until `until_unix`: refuse it from now on and end the sessions
    /// living on it (WebSocket: an `error{code:"token_revoked"}` event, then the close; WHIP/WHEP:
    /// the PeerConnection). A revocation already known (re-sent when a link comes up) changes
    /// nothing: no session can have opened on that token since.
    pub(crate) fn revoke_token(&self, jti: &str, until_unix: u64, now_unix: u64) {
        {
            let mut revoked = self
                .revoked_tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            revoked.prune(now_unix);
            if !revoked.revoke(jti, until_unix, now_unix) {
                return;
            }
        }
        let mut inner = self.lock();
        let pids = inner.leases.with_jti(jti);
        for pid in pids {
            tracing::info!(participant = %pid, "session ended: its token was revoked");
            self.end(&mut inner, pid, CloseWhy::TokenRevoked, TOKEN_REVOKED);
        }
    }

    /// End the sessions whose token expired more than the grace before `now_unix`.
    pub(crate) fn expire(&self, now_unix: u64) {
        let mut inner = self.lock();
        let pids = inner.leases.expired(now_unix);
        for pid in pids {
            tracing::info!(participant = %pid, "session ended: its token expired");
            self.end(&mut inner, pid, CloseWhy::TokenExpired, TOKEN_EXPIRED);
        }
    }

    /// End `pid`'s session for `why`: a pending join is refused, a WebSocket client is sent
    /// an `error` event (code [`CloseWhy::code`]) before its close, the participant leaves.
    fn end(&self, inner: &mut Inner, pid: ParticipantId, why: CloseWhy, message: &str) {
        let code = why.code();
        let mut outs = vec![
            Output::JoinRefused {
                participant: pid,
                refusal: Refusal::new(code, message),
            },
            Output::ToClient(
                pid,
                ServerMessage::Error {
                    code: code.into(),
                    message: message.into(),
                },
            ),
        ];
        outs.extend(inner.core.leave(pid, Instant::now()));
        outs.push(Output::Close {
            participant: pid,
            why,
        });
        self.dispatch(inner, outs);
    }

    /// Move `pid`'s session to the verified token `claims` (a refresh before expiry): refused
    /// when the token is revoked, or names another user or room, or a higher role.
    pub(crate) fn refresh(
        &self,
        pid: ParticipantId,
        claims: &Claims,
        now_unix: u64,
    ) -> Result<(), Refusal> {
        if self.is_revoked(claims, now_unix) {
            return Err(Refusal::new("token_revoked", TOKEN_REVOKED));
        }
        self.lock()
            .leases
            .refresh(pid, claims)
            .map(|_| ())
            .map_err(|e: RefreshError| Refusal::new(e.code(), e.to_string()))
    }

    /// A link to an origin is up and `rooms` are to be announced on it: the new epoch (messages
    /// of an earlier one for these rooms are covered) and the messages.
    pub(crate) fn announce(&self, rooms: &[RoomId]) -> (u64, Vec<ControlMessage>) {
        let mut inner = self.lock();
        inner.epoch += 1;
        let msgs = inner.core.announce(rooms);
        (inner.epoch, msgs)
    }

    /// The rooms with a participant on this edge.
    pub(crate) fn local_rooms(&self) -> Vec<RoomId> {
        self.lock().core.local_rooms()
    }

    /// Every origin link is down.
    pub(crate) fn link_down(&self) {
        self.lock().core.link_down();
    }

    /// Whether the origin link is up.
    pub(crate) fn is_link_up(&self) -> bool {
        self.lock().core.is_link_up()
    }

    /// Current role of a participant.
    pub(crate) fn role_of(&self, pid: ParticipantId) -> Option<RoomRole> {
        self.lock().core.role_of(pid)
    }

    /// Local rooms and participants by role (for metrics).
    pub(crate) fn census(&self) -> Census {
        self.lock().core.census()
    }

    /// Whether a participant may send audio now.
    pub(crate) fn may_send(&self, pid: ParticipantId) -> bool {
        self.lock().core.may_send(pid)
    }

    /// Send the active-speaker list to the room's WebSocket clients.
    pub(crate) fn active_speakers(&self, room: RoomId, speakers: &[ActiveSpeaker]) {
        {
            let now = Instant::now();
            let mut sent = self.active_sent.lock().unwrap_or_else(|p| p.into_inner());
            if sent
                .get(&room)
                .is_some_and(|t| now.saturating_duration_since(*t) < ACTIVE_SPEAKERS_DEDUP)
            {
                return;
            }
            if sent.len() >= ACTIVE_SENT_MAX {
                sent.retain(|_, t| now.saturating_duration_since(*t) < ACTIVE_SPEAKERS_DEDUP);
            }
            sent.insert(room, now);
        }
        let mut inner = self.lock();
        let clients: Vec<ParticipantId> = inner.core.clients(room).collect();
        let outs = clients
            .into_iter()
            .map(|pid| {
                Output::ToClient(
                    pid,
                    ServerMessage::ActiveSpeakers {
                        speakers: speakers.to_vec(),
                    },
                )
            })
            .collect();
        self.dispatch(&mut inner, outs);
    }
}
