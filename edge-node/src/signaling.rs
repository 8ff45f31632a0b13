//! Sans-IO signaling core: this edge's participants, its room replicas, and the traffic between
//! them, the clients and the origin's room authority.
//!
//! Every session (WebSocket client, WHIP publisher, WHEP listener) is a participant. Joining sends
//! `SubscribeRoom` (first participant of the room here) then `RoomCommand::Join`; the authority's
//! `RoomSnapshot` / `ParticipantJoined` resolves the join, a `CommandRejected` refuses it. Client
//! commands are pre-checked against the replica and rate-limited, then forwarded. Authority events
//! update the replica and fan out to this edge's WebSocket clients of the room; kicks and room ends
//! close the affected sessions. After a (re)connect, [`SignalingCore::link_up`] re-announces every
//! room and participant (`Join` with `resume` = its current role).

use crate::room::{precheck, ClientView, Refusal, RoomReplica, WindowLimiter};
use amphi_protocol::control::{ControlMessage, SnapshotAssembler};
use amphi_protocol::room::{RoomCommand, RoomEvent, RoomRole, RoomState, ServerMessage};
use amphi_protocol::token::Role;
use amphi_protocol::{ParticipantId, RoomId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// How long a departed participant's role is remembered so a fresh session of the same user
/// (speaker network drop) resumes it.
pub const RESUME_WINDOW: Duration = Duration::from_secs(120);
/// A large room's clients get new counts at most this often.
pub const COUNTS_EVERY: Duration = Duration::from_secs(1);

/// What kind of session a participant is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionKind {
    /// `/v1/ws` client: receives events.
    WebSocket,
    /// WHIP publisher.
    Whip,
    /// WHEP listener.
    Whep,
}

/// A session asking to join a room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    /// Id the edge allocated.
    pub participant: ParticipantId,
    /// Room from the token.
    pub room: RoomId,
    /// Token `sub`.
    pub user: String,
    /// Display name from the token.
    pub name: String,
    /// Role from the token.
    pub role: Role,
    /// Session kind.
    pub kind: SessionKind,
}

/// Why a session is being closed by the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseWhy {
    /// Kicked by a moderator.
    Kicked,
    /// The room ended.
    Ended,
    /// The authority removed the participant.
    Removed,
    /// The authority refused the participant's join after its session had started (an answer
    /// that came after the edge stopped waiting, or a refused re-join after a reconnect).
    Refused,
    /// The token the session lives on was revoked by `jti`.
    TokenRevoked,
    /// The token the session lives on expired (past the grace) and was not refreshed.
    TokenExpired,
}

impl CloseWhy {
    /// The code of the `error` event a WebSocket client is sent before the close (token
    /// ends only; other closes follow a room event).
    pub fn code(self) -> &'static str {
        match self {
            CloseWhy::Kicked => "kicked",
            CloseWhy::Ended => "room_ended",
            CloseWhy::Removed => "removed",
            CloseWhy::Refused => "refused",
            CloseWhy::TokenRevoked => "token_revoked",
            CloseWhy::TokenExpired => "token_expired",
        }
    }
}

/// Something the driver must carry out.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send to the origin (on the ordered control stream).
    ToOrigin(ControlMessage),
    /// Send to one WebSocket client.
    ToClient(ParticipantId, ServerMessage),
    /// A pending join succeeded.
    Joined {
        /// Who.
        participant: ParticipantId,
        /// The room as of the join, as the client is sent it.
        view: ClientView,
    },
    /// A pending join was refused. For `unavailable` (the origin has no room authority) the
    /// participant stays registered, so a session may continue degraded with its token role.
    JoinRefused {
        /// Who.
        participant: ParticipantId,
        /// Why.
        refusal: Refusal,
    },
    /// Close the session and its PeerConnection.
    Close {
        /// Who.
        participant: ParticipantId,
        /// Why.
        why: CloseWhy,
    },
    /// Whether a participant may send audio changed (or became known).
    Permission {
        /// Who.
        participant: ParticipantId,
        /// Publishing role and not muted.
        may_send: bool,
    },
}

/// Local participants and rooms, as counted by the signaling core.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Rooms with at least one participant on this edge.
    pub rooms: usize,
    /// Participants on this edge by current role, in [`RoomRole::ALL`] order.
    pub by_role: [usize; RoomRole::ALL.len()],
}

struct Member {
    room: RoomId,
    user: String,
    name: String,
    role: Role,
    kind: SessionKind,
    joined: bool,
    /// Request id of the latest `Join` sent for this participant (its refusal is recognised).
    join_request: Option<u64>,
    resume: Option<RoomRole>,
    chat: WindowLimiter,
    reactions: WindowLimiter,
}

#[derive(Default)]
struct LocalRoom {
    replica: Option<RoomReplica>,
    /// A split snapshot being received.
    assembler: SnapshotAssembler,
    members: BTreeSet<ParticipantId>,
    /// A large room's counts changed since they were last sent to its clients.
    counts_dirty: bool,
    /// When counts were last sent.
    counts_sent: Option<Instant>,
}

/// The signaling state of one edge.
pub struct SignalingCore {
    region: String,
    link_up: bool,
    next_request: u64,
    rooms: BTreeMap<RoomId, LocalRoom>,
    members: HashMap<ParticipantId, Member>,
    remembered: HashMap<(RoomId, String), (RoomRole, Instant)>,
}

impl SignalingCore {
    /// Core of an edge in `region` (carried in `Join`).
    pub fn new(region: impl Into<String>) -> Self {
        SignalingCore {
            region: region.into(),
            link_up: false,
            next_request: 1,
            rooms: BTreeMap::new(),
            members: HashMap::new(),
            remembered: HashMap::new(),
        }
    }

    /// Whether the origin link is up.
    pub fn is_link_up(&self) -> bool {
        self.link_up
    }

    fn request_id(&mut self) -> u64 {
        let r = self.next_request;
        self.next_request += 1;
        r
    }

    fn join_message(
        &mut self,
        id: ParticipantId,
        resume: Option<RoomRole>,
    ) -> Option<ControlMessage> {
        let request = self.request_id();
        let m = self.members.get_mut(&id)?;
        m.join_request = Some(request);
        let (room, user, name, role) = (m.room, m.user.clone(), m.name.clone(), m.role);
        Some(ControlMessage::RoomCommand {
            room,
            actor: id,
            request,
            command: RoomCommand::Join {
                user,
                name,
                role,
                region: self.region.clone(),
                resume,
            },
        })
    }

    /// A session wants to join. Pre-checks against the replica (banned user, ended room).
    pub fn join(&mut self, req: JoinRequest, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        let pid = req.participant;
        let replica = self.rooms.get(&req.room).and_then(|r| r.replica.as_ref());
        if let Some(r) = replica {
            if r.ended() {
                out.push(Output::JoinRefused {
                    participant: pid,
                    refusal: Refusal::new("room_ended", "the room has ended"),
                });
                return out;
            }
            if r.state().banned.contains(&req.user) {
                out.push(Output::JoinRefused {
                    participant: pid,
                    refusal: Refusal::new("banned", "you were removed from this room"),
                });
                return out;
            }
        }
        self.remembered
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < RESUME_WINDOW);
        let token_role = RoomRole::from_token(req.role);
        // Another live session of the same user here, or a recent one, keeps its role.
        let resume = replica
            .and_then(|r| r.by_user(&req.user))
            .map(|p| p.role)
            .or_else(|| {
                self.remembered
                    .get(&(req.room, req.user.clone()))
                    .map(|(role, _)| *role)
            })
            .filter(|r| *r != token_role);
        let room = self.rooms.entry(req.room).or_default();
        let first = room.members.is_empty();
        room.members.insert(pid);
        self.members.insert(
            pid,
            Member {
                room: req.room,
                user: req.user,
                name: req.name,
                role: req.role,
                kind: req.kind,
                joined: false,
                join_request: None,
                resume,
                chat: WindowLimiter::chat(),
                reactions: WindowLimiter::reactions(),
            },
        );
        if self.link_up {
            if first {
                out.push(Output::ToOrigin(ControlMessage::SubscribeRoom {
                    room: req.room,
                }));
            }
            if let Some(m) = self.join_message(pid, resume) {
                out.push(Output::ToOrigin(m));
            }
        }
        out
    }

    /// A session ended (WebSocket closed, WHIP/WHEP deleted or timed out).
    pub fn leave(&mut self, pid: ParticipantId, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(m) = self.members.remove(&pid) else {
            return out;
        };
        let Some(room) = self.rooms.get_mut(&m.room) else {
            return out;
        };
        room.members.remove(&pid);
        if let Some(p) = room.replica.as_ref().and_then(|r| r.participant(pid)) {
            self.remembered
                .insert((m.room, m.user.clone()), (p.role, now));
        }
        let empty = room.members.is_empty();
        if empty {
            self.rooms.remove(&m.room);
        }
        if self.link_up {
            let request = self.request_id();
            out.push(Output::ToOrigin(ControlMessage::RoomCommand {
                room: m.room,
                actor: pid,
                request,
                command: RoomCommand::Leave,
            }));
            if empty {
                out.push(Output::ToOrigin(ControlMessage::UnsubscribeRoom {
                    room: m.room,
                }));
            }
        }
        out
    }

    /// The origin revoked `user`'s tokens for `room` (a kick): every session of that user in the
    /// room on this edge ends (closed as kicked; a pending join is refused as banned), whether
    /// or not the origin already removed it.
    pub fn revoke_user(&mut self, room: RoomId, user: &str, now: Instant) -> Vec<Output> {
        let pids: Vec<(ParticipantId, bool)> = self
            .rooms
            .get(&room)
            .map(|local| {
                local
                    .members
                    .iter()
                    .filter_map(|pid| {
                        let m = self.members.get(pid)?;
                        (m.user == user).then_some((*pid, m.joined))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::new();
        for (pid, joined) in pids {
            if !joined {
                out.push(Output::JoinRefused {
                    participant: pid,
                    refusal: Refusal::new("banned", "you were removed from this room"),
                });
            }
            out.extend(self.leave(pid, now));
            out.push(Output::Close {
                participant: pid,
                why: CloseWhy::Kicked,
            });
        }
        out
    }

    /// A joined participant's command (mapped from a client message).
    pub fn command(
        &mut self,
        pid: ParticipantId,
        command: RoomCommand,
        now: Instant,
    ) -> Result<Vec<Output>, Refusal> {
        let Some(m) = self.members.get_mut(&pid) else {
            return Err(Refusal::new("not_joined", "join the room first"));
        };
        if !m.joined {
            return Err(Refusal::new("not_joined", "join the room first"));
        }
        if matches!(command, RoomCommand::Join { .. } | RoomCommand::Leave) {
            return Err(Refusal::new("bad_message", "not a client command"));
        }
        let room = m.room;
        let replica = self
            .rooms
            .get(&room)
            .and_then(|r| r.replica.as_ref())
            .ok_or_else(|| Refusal::new("unavailable", "the room state is not known yet"))?;
        precheck(replica, pid, &command)?;
        let m = self.members.get_mut(&pid).expect("checked above");
        let allowed = match command {
            RoomCommand::Chat { .. } => m.chat.allow(now),
            RoomCommand::React { .. } => m.reactions.allow(now),
            _ => true,
        };
        if !allowed {
            return Err(Refusal::new(
                "rate_limited",
                "too many messages: chat 5 per 10 s, reactions 10 per 10 s",
            ));
        }
        if !self.link_up {
            return Err(Refusal::new(
                "unavailable",
                "the edge is reconnecting to the room's origin",
            ));
        }
        let request = self.request_id();
        Ok(vec![Output::ToOrigin(ControlMessage::RoomCommand {
            room,
            actor: pid,
            request,
            command,
        })])
    }

    /// The replica of `room`, if this edge has one.
    pub fn replica(&self, room: RoomId) -> Option<&RoomReplica> {
        self.rooms.get(&room).and_then(|r| r.replica.as_ref())
    }

    /// The room of a registered participant.
    pub fn room_of(&self, pid: ParticipantId) -> Option<RoomId> {
        self.members.get(&pid).map(|m| m.room)
    }

    /// The participant's current role: the replica's, else its token's.
    pub fn role_of(&self, pid: ParticipantId) -> Option<RoomRole> {
        let m = self.members.get(&pid)?;
        Some(
            self.replica(m.room)
                .and_then(|r| r.participant(pid))
                .map(|p| p.role)
                .unwrap_or_else(|| RoomRole::from_token(m.role)),
        )
    }

    /// Whether the participant may send audio now (publishing role, not muted); without a
    /// replica entry (origin without authority) the token role decides.
    pub fn may_send(&self, pid: ParticipantId) -> bool {
        let Some(m) = self.members.get(&pid) else {
            return false;
        };
        match self.replica(m.room).and_then(|r| r.participant(pid)) {
            Some(p) => p.role.may_publish() && !p.muted,
            None => RoomRole::from_token(m.role).may_publish(),
        }
    }

    /// WebSocket participants of `room` that joined (receivers of events).
    pub fn clients(&self, room: RoomId) -> impl Iterator<Item = ParticipantId> + '_ {
        self.rooms
            .get(&room)
            .into_iter()
            .flat_map(|r| r.members.iter().copied())
            .filter(|p| {
                self.members
                    .get(p)
                    .is_some_and(|m| m.joined && m.kind == SessionKind::WebSocket)
            })
    }

    /// Participants here per room (for load reports).
    pub fn members_per_room(&self) -> BTreeMap<RoomId, usize> {
        self.rooms
            .iter()
            .map(|(r, l)| (*r, l.members.len()))
            .collect()
    }

    /// Rooms with participants here, and participants here by current role.
    pub fn census(&self) -> Census {
        let mut census = Census {
            rooms: self
                .rooms
                .values()
                .filter(|r| !r.members.is_empty())
                .count(),
            ..Census::default()
        };
        for pid in self.members.keys() {
            if let Some(i) = self
                .role_of(*pid)
                .and_then(|role| RoomRole::ALL.iter().position(|r| *r == role))
            {
                census.by_role[i] += 1;
            }
        }
        census
    }

    /// The origin link came up: everything to announce, in order (subscriptions, then a `Join`
    /// with `resume` for every participant).
    pub fn link_up(&mut self) -> Vec<ControlMessage> {
        let rooms = self.local_rooms();
        self.announce(&rooms)
    }

    /// The rooms with a participant on this edge.
    pub fn local_rooms(&self) -> Vec<RoomId> {
        self.rooms.keys().copied().collect()
    }

    /// A link to an origin is up and `rooms` (those it owns, see [`crate::owners`]) are to be
    /// announced on it: for each local one, its subscription then a `Join` with `resume` for
    /// every participant.
    pub fn announce(&mut self, rooms: &[RoomId]) -> Vec<ControlMessage> {
        self.link_up = true;
        let mut out = Vec::new();
        for room in rooms {
            let Some(local) = self.rooms.get(room) else {
                continue;
            };
            let members: Vec<ParticipantId> = local.members.iter().copied().collect();
            out.push(ControlMessage::SubscribeRoom { room: *room });
            for pid in members {
                let current = self
                    .replica(*room)
                    .and_then(|r| r.participant(pid))
                    .map(|p| p.role);
                let resume = current.or_else(|| self.members.get(&pid).and_then(|m| m.resume));
                if let Some(m) = self.join_message(pid, resume) {
                    out.push(m);
                }
            }
        }
        out
    }

    /// Every origin link is down.
    pub fn link_down(&mut self) {
        self.link_up = false;
    }

    fn close_room(&mut self, room: RoomId, out: &mut Vec<Output>) {
        let Some(local) = self.rooms.remove(&room) else {
            return;
        };
        for pid in local.members {
            if let Some(m) = self.members.remove(&pid) {
                if !m.joined {
                    out.push(Output::JoinRefused {
                        participant: pid,
                        refusal: Refusal::new("room_ended", "the room has ended"),
                    });
                }
            }
            out.push(Output::Close {
                participant: pid,
                why: CloseWhy::Ended,
            });
        }
    }

    fn permissions(&self, room: RoomId, out: &mut Vec<Output>) {
        if let Some(local) = self.rooms.get(&room) {
            for &pid in &local.members {
                out.push(Output::Permission {
                    participant: pid,
                    may_send: self.may_send(pid),
                });
            }
        }
    }

    /// A control message from the origin.
    pub fn on_control(&mut self, msg: ControlMessage) -> Vec<Output> {
        let mut out = Vec::new();
        match msg {
            ControlMessage::RoomSnapshot { state, more } => {
                let room = state.room;
                let Some(local) = self.rooms.get_mut(&room) else {
                    return out;
                };
                if let Some(state) = local.assembler.start(state, more) {
                    self.install(room, state, &mut out);
                }
            }
            ControlMessage::RoomSnapshotPart {
                room,
                participants,
                hands,
                banned,
                more,
            } => {
                let Some(local) = self.rooms.get_mut(&room) else {
                    return out;
                };
                match local.assembler.part(participants, hands, banned, more) {
                    Ok(Some(state)) => self.install(room, state, &mut out),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(%room, error = %e, "room snapshot dropped"),
                }
            }
            ControlMessage::RoomEvents { room, events } => {
                for ev in events {
                    self.on_event(room, ev, &mut out);
                }
            }
            ControlMessage::CommandRejected {
                room,
                actor,
                request,
                code,
                message,
            } => {
                let Some(m) = self.members.get(&actor) else {
                    return out;
                };
                if m.room != room {
                    return out;
                }
                let refusal = Refusal {
                    code: static_code(&code),
                    message,
                };
                let join_refused = m.join_request == Some(request) && refusal.code != "unavailable";
                let (joined, kind) = (m.joined, m.kind);
                if joined && join_refused {
                    // A re-join (after a reconnect) refused: the participant is no longer in the
                    // room, so its session ends.
                    if kind == SessionKind::WebSocket {
                        out.push(Output::ToClient(
                            actor,
                            ServerMessage::Error {
                                code,
                                message: refusal.message,
                            },
                        ));
                    }
                    self.forget(room, actor, &mut out);
                    out.push(Output::Permission {
                        participant: actor,
                        may_send: false,
                    });
                    out.push(Output::Close {
                        participant: actor,
                        why: CloseWhy::Refused,
                    });
                } else if joined {
                    if kind == SessionKind::WebSocket {
                        out.push(Output::ToClient(
                            actor,
                            ServerMessage::Error {
                                code,
                                message: refusal.message,
                            },
                        ));
                    }
                } else {
                    let unavailable = refusal.code == "unavailable";
                    if !unavailable {
                        // A refused join leaves nothing behind.
                        self.forget(room, actor, &mut out);
                    }
                    out.push(Output::JoinRefused {
                        participant: actor,
                        refusal,
                    });
                    if !unavailable && kind != SessionKind::WebSocket {
                        // A WHIP/WHEP handler that stopped waiting may have started the session
                        // (a listener admitted with its token role): the refusal ends it.
                        out.push(Output::Close {
                            participant: actor,
                            why: CloseWhy::Refused,
                        });
                    }
                }
            }
            ControlMessage::RoomEnded { room } if self.rooms.contains_key(&room) => {
                let ended = ServerMessage::Event(RoomEvent::Ended { by: None });
                for pid in self.clients(room).collect::<Vec<_>>() {
                    out.push(Output::ToClient(pid, ended.clone()));
                }
                self.close_room(room, &mut out);
            }
            _ => {}
        }
        out
    }

    /// Forget participant `pid` of `room` (unsubscribing from a room left without members).
    fn forget(&mut self, room: RoomId, pid: ParticipantId, out: &mut Vec<Output>) {
        self.members.remove(&pid);
        if let Some(local) = self.rooms.get_mut(&room) {
            local.members.remove(&pid);
            if local.members.is_empty() {
                self.rooms.remove(&room);
                if self.link_up {
                    out.push(Output::ToOrigin(ControlMessage::UnsubscribeRoom { room }));
                }
            }
        }
    }

    /// A complete snapshot of `room` arrived: it replaces the replica and resolves the joins it
    /// includes.
    fn install(&mut self, room: RoomId, state: RoomState, out: &mut Vec<Output>) {
        let Some(local) = self.rooms.get_mut(&room) else {
            return;
        };
        let replica = RoomReplica::from_snapshot(state);
        for &pid in &local.members {
            if let Some(m) = self.members.get_mut(&pid) {
                if !m.joined && replica.participant(pid).is_some() {
                    m.joined = true;
                    out.push(Output::Joined {
                        participant: pid,
                        view: replica.client_view(pid),
                    });
                }
            }
        }
        let ended = replica.ended();
        local.replica = Some(replica);
        if ended {
            self.close_room(room, out);
        } else {
            self.permissions(room, out);
        }
    }

    /// Time passed: large rooms whose counts changed send them to their clients (at most every
    /// [`COUNTS_EVERY`]).
    pub fn tick(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        let due: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, l)| {
                l.counts_dirty
                    && l.counts_sent
                        .is_none_or(|t| now.saturating_duration_since(t) >= COUNTS_EVERY)
            })
            .map(|(r, _)| *r)
            .collect();
        for room in due {
            let Some(counts) = self.replica(room).map(|r| r.counts()) else {
                continue;
            };
            let msg = ServerMessage::Counts { counts };
            for pid in self.clients(room).collect::<Vec<_>>() {
                out.push(Output::ToClient(pid, msg.clone()));
            }
            if let Some(local) = self.rooms.get_mut(&room) {
                local.counts_dirty = false;
                local.counts_sent = Some(now);
            }
        }
        out
    }

    /// One page of the room's participants for joined participant `pid` (its
    /// `list_participants`).
    pub fn list_participants(
        &self,
        pid: ParticipantId,
        after: Option<ParticipantId>,
        limit: Option<u32>,
    ) -> Result<ServerMessage, Refusal> {
        let m = self
            .members
            .get(&pid)
            .filter(|m| m.joined)
            .ok_or_else(|| Refusal::new("not_joined", "join the room first"))?;
        let replica = self
            .replica(m.room)
            .ok_or_else(|| Refusal::new("unavailable", "the room state is not known yet"))?;
        let (participants, next) = replica.page(after, limit);
        Ok(ServerMessage::Participants {
            participants,
            next,
            counts: replica.counts(),
        })
    }

    fn on_event(&mut self, room: RoomId, ev: RoomEvent, out: &mut Vec<Output>) {
        let Some(local) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(replica) = local.replica.as_mut() else {
            // The snapshot that follows includes this event.
            return;
        };
        let was_large = replica.is_large();
        // A large room's listeners come and go without an event to every client: counts
        // follow (see `tick`), the list is fetched on request.
        let quiet = match &ev {
            RoomEvent::ParticipantJoined { participant } => participant.role == RoomRole::Listener,
            RoomEvent::ParticipantLeft { id } => {
                replica.participant(*id).map(|p| p.role) == Some(RoomRole::Listener)
            }
            _ => false,
        };
        replica.apply(&ev);
        let large = was_large || replica.is_large();
        // Clients of a small room count from the events they all get; only large rooms' clients
        // need the counts sent.
        if large
            && matches!(
                ev,
                RoomEvent::ParticipantJoined { .. }
                    | RoomEvent::ParticipantLeft { .. }
                    | RoomEvent::Kicked { .. }
                    | RoomEvent::RoleChanged { .. }
            )
        {
            local.counts_dirty = true;
        }
        // Details of a listener the clients of a large room may not have, before an event
        // about it.
        let intro = match &ev {
            RoomEvent::HandRaised { id } | RoomEvent::RoleChanged { id, .. } if large => replica
                .participant(*id)
                .map(|p| ServerMessage::Participant {
                    participant: p.clone(),
                }),
            _ => None,
        };
        let msg = ServerMessage::Event(ev.clone());
        // A participant learns about itself from its snapshot, not from its own join event.
        let skip = match &ev {
            RoomEvent::ParticipantJoined { participant } => Some(participant.id),
            _ => None,
        };
        // Reports are for the room's hosts and co-hosts only.
        let moderators_only = matches!(ev, RoomEvent::Reported { .. });
        if !(large && quiet) {
            for pid in self.clients(room).collect::<Vec<_>>() {
                if moderators_only
                    && !self
                        .replica(room)
                        .and_then(|r| r.participant(pid))
                        .is_some_and(|p| p.role.may_moderate())
                {
                    continue;
                }
                if Some(pid) != skip {
                    if let Some(intro) = &intro {
                        out.push(Output::ToClient(pid, intro.clone()));
                    }
                    out.push(Output::ToClient(pid, msg.clone()));
                }
            }
        }
        match ev {
            RoomEvent::ParticipantJoined { participant } => {
                if let Some(m) = self.members.get_mut(&participant.id) {
                    if m.room == room && !m.joined {
                        m.joined = true;
                        let view = self
                            .replica(room)
                            .map(|r| r.client_view(participant.id))
                            .expect("replica exists");
                        out.push(Output::Joined {
                            participant: participant.id,
                            view,
                        });
                        out.push(Output::Permission {
                            participant: participant.id,
                            may_send: self.may_send(participant.id),
                        });
                    }
                }
            }
            RoomEvent::RoleChanged { id, .. }
            | RoomEvent::Muted { id, .. }
            | RoomEvent::Unmuted { id }
                if self.members.get(&id).is_some_and(|m| m.room == room) =>
            {
                out.push(Output::Permission {
                    participant: id,
                    may_send: self.may_send(id),
                });
            }
            RoomEvent::Kicked { id, .. } | RoomEvent::ParticipantLeft { id } => {
                let why = if matches!(ev, RoomEvent::Kicked { .. }) {
                    CloseWhy::Kicked
                } else {
                    CloseWhy::Removed
                };
                if self
                    .members
                    .get(&id)
                    .is_some_and(|m| m.room == room && m.joined)
                {
                    self.forget(room, id, out);
                    out.push(Output::Permission {
                        participant: id,
                        may_send: false,
                    });
                    out.push(Output::Close {
                        participant: id,
                        why,
                    });
                }
            }
            RoomEvent::Ended { .. } => self.close_room(room, out),
            _ => {}
        }
    }
}

/// Known refusal codes as static strings (others become `refused`, the text is kept in the
/// message sent to clients as-is).
fn static_code(code: &str) -> &'static str {
    const KNOWN: [&str; 13] = [
        "forbidden",
        "banned",
        "not_found",
        "ended",
        "room_ended",
        "rate_limited",
        "unavailable",
        "bad_message",
        "not_joined",
        "full",
        "capacity",
        "invalid",
        "limit",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("refused")
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphi_protocol::room::{Participant, RoomPhase};

    const R: RoomId = RoomId(0x42);

    fn req(id: u32, user: &str, role: Role, kind: SessionKind) -> JoinRequest {
        JoinRequest {
            participant: ParticipantId(id),
            room: R,
            user: user.into(),
            name: user.into(),
            role,
            kind,
        }
    }

    fn part(id: u32, user: &str, role: RoomRole) -> Participant {
        Participant {
            id: ParticipantId(id),
            user: user.into(),
            name: user.into(),
            role,
            region: "us-east".into(),
            muted: false,
        }
    }

    fn snapshot(parts: Vec<Participant>) -> ControlMessage {
        ControlMessage::RoomSnapshot {
            state: RoomState {
                room: R,
                phase: RoomPhase::Live,
                participants: parts,
                hands: vec![],
                banned: vec![],
            },
            more: false,
        }
    }

    fn to_origin(out: &[Output]) -> Vec<ControlMessage> {
        out.iter()
            .filter_map(|o| match o {
                Output::ToOrigin(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn census_counts_rooms_and_participants_by_current_role() {
        let mut c = joined_core();
        assert_eq!(
            c.census(),
            Census {
                rooms: 1,
                by_role: [1, 0, 0, 1]
            }
        );
        c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::RoleChanged {
                id: ParticipantId(2),
                role: RoomRole::Speaker,
                by: ParticipantId(1),
            }],
        });
        assert_eq!(c.census().by_role, [1, 0, 1, 0]);
        c.leave(ParticipantId(1), Instant::now());
        c.leave(ParticipantId(2), Instant::now());
        assert_eq!(c.census(), Census::default());
    }

    fn joined_core() -> SignalingCore {
        let mut c = SignalingCore::new("us-east");
        assert!(c.link_up().is_empty());
        let now = Instant::now();
        c.join(req(1, "host", Role::Host, SessionKind::WebSocket), now);
        c.join(req(2, "lee", Role::Listener, SessionKind::WebSocket), now);
        c.on_control(snapshot(vec![
            part(1, "host", RoomRole::Host),
            part(2, "lee", RoomRole::Listener),
        ]));
        c
    }

    #[test]
    fn a_small_room_gets_its_events_and_no_counts() {
        let mut c = joined_core();
        let out = c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::RoleChanged {
                id: ParticipantId(2),
                role: RoomRole::Speaker,
                by: ParticipantId(1),
            }],
        });
        assert_eq!(client_msgs(&out, 2).len(), 1, "the event itself");
        assert!(c.tick(Instant::now() + COUNTS_EVERY * 2).is_empty());
    }

    #[test]
    fn a_report_goes_to_the_rooms_hosts_only() {
        use amphi_protocol::room::{Report, ReportReason, ReportTarget};
        let mut c = joined_core();
        let report = Report {
            id: "r".into(),
            room: R,
            reporter: "lee".into(),
            reporter_name: "Lee".into(),
            reporter_id: ParticipantId(2),
            target: ReportTarget::Room,
            target_name: None,
            reason: ReportReason::Spam,
            text: String::new(),
            at_ms: 1,
            program_ms: Some(20),
        };
        let ev = RoomEvent::Reported { report };
        let out = c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![ev.clone()],
        });
        assert_eq!(client_msgs(&out, 1), vec![ServerMessage::Event(ev)]);
        assert!(
            client_msgs(&out, 2).is_empty(),
            "the listener hears nothing"
        );
    }

    fn client_msgs(out: &[Output], to: u32) -> Vec<ServerMessage> {
        out.iter()
            .filter_map(|o| match o {
                Output::ToClient(p, m) if p.0 == to => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_large_room_arrives_in_parts_and_sends_listeners_on_request_and_counts() {
        use amphi_protocol::control::{snapshot_records, SNAPSHOT_RECORD_BUDGET};
        use amphi_protocol::room::{RoomCounts, FULL_LIST_MAX_PARTICIPANTS};
        let n = 3_000u32;
        let mut c = SignalingCore::new("us-east");
        c.link_up();
        let t0 = Instant::now();
        c.join(req(1, "host", Role::Host, SessionKind::WebSocket), t0);
        c.join(req(5000, "me", Role::Listener, SessionKind::WebSocket), t0);
        let mut parts = vec![part(1, "host", RoomRole::Host)];
        parts.extend((100..100 + n).map(|i| part(i, &format!("l{i}"), RoomRole::Listener)));
        parts.push(part(5000, "me", RoomRole::Listener));
        let records = snapshot_records(
            RoomState {
                room: R,
                phase: RoomPhase::Live,
                participants: parts,
                hands: vec![],
                banned: vec![],
            },
            SNAPSHOT_RECORD_BUDGET,
        );
        assert!(records.len() > 1);
        let last = records.len() - 1;
        let mut joined = Vec::new();
        for (i, r) in records.into_iter().enumerate() {
            let out = c.on_control(r);
            if i < last {
                assert!(out.is_empty(), "nothing resolves before the last part");
            }
            joined.extend(out.into_iter().filter_map(|o| match o {
                Output::Joined { participant, view } => Some((participant.0, view)),
                _ => None,
            }));
        }
        assert_eq!(joined.len(), 2);
        let (_, view) = joined.iter().find(|(p, _)| *p == 5000).unwrap();
        assert!(view.partial);
        let ids: Vec<u32> = view.state.participants.iter().map(|p| p.id.0).collect();
        assert_eq!(ids, vec![1, 5000], "hosts and oneself, no other listener");
        assert_eq!(
            view.counts,
            RoomCounts {
                participants: n + 2,
                listeners: n + 1
            }
        );
        assert!(n as usize > FULL_LIST_MAX_PARTICIPANTS);

        // A listener joining is not sent to every client; the counts follow on the tick.
        let out = c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::ParticipantJoined {
                participant: part(9000, "new", RoomRole::Listener),
            }],
        });
        assert!(client_msgs(&out, 1).is_empty());
        let t1 = t0 + COUNTS_EVERY;
        let out = c.tick(t1);
        assert_eq!(
            client_msgs(&out, 1),
            vec![ServerMessage::Counts {
                counts: RoomCounts {
                    participants: n + 3,
                    listeners: n + 2
                }
            }]
        );
        assert!(c.tick(t1).is_empty(), "nothing new");
        // A raised hand comes with the listener's details first.
        let out = c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::HandRaised {
                id: ParticipantId(9000),
            }],
        });
        assert_eq!(
            client_msgs(&out, 1),
            vec![
                ServerMessage::Participant {
                    participant: part(9000, "new", RoomRole::Listener)
                },
                ServerMessage::Event(RoomEvent::HandRaised {
                    id: ParticipantId(9000)
                }),
            ]
        );
        // Listeners on request, in pages.
        let mut seen = 0;
        let mut after = None;
        loop {
            match c
                .list_participants(ParticipantId(1), after, Some(1000))
                .unwrap()
            {
                ServerMessage::Participants {
                    participants, next, ..
                } => {
                    assert!(participants.len() <= 500);
                    seen += participants.len();
                    if next.is_none() {
                        break;
                    }
                    after = next;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, n as usize + 3);
    }

    #[test]
    fn join_subscribes_once_and_resolves_on_snapshot_or_event() {
        let mut c = SignalingCore::new("us-east");
        c.link_up();
        let now = Instant::now();
        let out = c.join(req(1, "ada", Role::Host, SessionKind::WebSocket), now);
        let msgs = to_origin(&out);
        assert_eq!(msgs[0], ControlMessage::SubscribeRoom { room: R });
        assert!(matches!(
            &msgs[1],
            ControlMessage::RoomCommand { actor, command: RoomCommand::Join { user, region, resume: None, .. }, .. }
                if *actor == ParticipantId(1) && user == "ada" && region == "us-east"
        ));
        let out = c.join(req(2, "bob", Role::Listener, SessionKind::Whep), now);
        assert_eq!(to_origin(&out).len(), 1, "no second SubscribeRoom");
        // The event before the snapshot is skipped; the snapshot resolves both.
        let out = c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::ParticipantJoined {
                participant: part(1, "ada", RoomRole::Host),
            }],
        });
        assert!(out.is_empty());
        let out = c.on_control(snapshot(vec![
            part(1, "ada", RoomRole::Host),
            part(2, "bob", RoomRole::Listener),
        ]));
        let joined: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Joined { participant, .. } => Some(participant.0),
                _ => None,
            })
            .collect();
        assert_eq!(joined, vec![1, 2]);
        assert!(out.contains(&Output::Permission {
            participant: ParticipantId(1),
            may_send: true
        }));
        assert!(out.contains(&Output::Permission {
            participant: ParticipantId(2),
            may_send: false
        }));
        // A third joins after the snapshot: resolved by its ParticipantJoined event, and the
        // WebSocket client (1) gets the event, the WHEP listener (2) does not.
        c.join(req(3, "cy", Role::Speaker, SessionKind::Whip), now);
        let out = c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::ParticipantJoined {
                participant: part(3, "cy", RoomRole::Speaker),
            }],
        });
        assert!(
            matches!(&out[0], Output::ToClient(p, ServerMessage::Event(RoomEvent::ParticipantJoined { .. })) if p.0 == 1)
        );
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Joined { participant, .. } if participant.0 == 3)));
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Output::ToClient(..)))
                .count(),
            1
        );
    }

    #[test]
    fn commands_are_prechecked_rate_limited_and_forwarded() {
        let mut c = joined_core();
        let now = Instant::now();
        let e = c
            .command(
                ParticipantId(2),
                RoomCommand::Kick {
                    target: ParticipantId(1),
                },
                now,
            )
            .unwrap_err();
        assert_eq!(e.code, "forbidden");
        let out = c
            .command(
                ParticipantId(1),
                RoomCommand::Promote {
                    target: ParticipantId(2),
                    role: RoomRole::Speaker,
                },
                now,
            )
            .unwrap();
        assert!(
            matches!(&to_origin(&out)[0], ControlMessage::RoomCommand { actor, command: RoomCommand::Promote { .. }, .. } if actor.0 == 1)
        );
        for _ in 0..5 {
            c.command(
                ParticipantId(2),
                RoomCommand::Chat { text: "hi".into() },
                now,
            )
            .unwrap();
        }
        let e = c
            .command(
                ParticipantId(2),
                RoomCommand::Chat { text: "hi".into() },
                now,
            )
            .unwrap_err();
        assert_eq!(e.code, "rate_limited");
        assert!(c
            .command(
                ParticipantId(2),
                RoomCommand::Chat {
                    text: "later".into()
                },
                now + Duration::from_secs(10)
            )
            .is_ok());
        let e = c
            .command(ParticipantId(9), RoomCommand::RaiseHand, now)
            .unwrap_err();
        assert_eq!(e.code, "not_joined");
        c.link_down();
        let e = c
            .command(ParticipantId(2), RoomCommand::RaiseHand, now)
            .unwrap_err();
        assert_eq!(e.code, "unavailable");
    }

    #[test]
    fn rejections_reach_the_client_or_refuse_the_join() {
        let mut c = joined_core();
        let now = Instant::now();
        let out = c.on_control(ControlMessage::CommandRejected {
            room: R,
            actor: ParticipantId(2),
            request: 5,
            code: "forbidden".into(),
            message: "no".into(),
        });
        assert_eq!(
            out,
            vec![Output::ToClient(
                ParticipantId(2),
                ServerMessage::Error {
                    code: "forbidden".into(),
                    message: "no".into()
                }
            )]
        );
        c.join(
            req(3, "mallory", Role::Listener, SessionKind::WebSocket),
            now,
        );
        let out = c.on_control(ControlMessage::CommandRejected {
            room: R,
            actor: ParticipantId(3),
            request: 9,
            code: "banned".into(),
            message: "kicked earlier".into(),
        });
        assert!(matches!(&out[0], Output::JoinRefused { refusal, .. } if refusal.code == "banned"));
        assert_eq!(c.room_of(ParticipantId(3)), None);
        // `unavailable` keeps the participant for a degraded session.
        c.join(req(4, "deg", Role::Speaker, SessionKind::Whip), now);
        let out = c.on_control(ControlMessage::CommandRejected {
            room: R,
            actor: ParticipantId(4),
            request: 10,
            code: "unavailable".into(),
            message: "no authority".into(),
        });
        assert!(
            matches!(&out[0], Output::JoinRefused { refusal, .. } if refusal.code == "unavailable")
        );
        assert_eq!(c.room_of(ParticipantId(4)), Some(R));
        assert!(
            c.may_send(ParticipantId(4)),
            "token role decides without a replica entry"
        );
    }

    /// The request id of the `Join` for `pid` among `msgs`.
    fn join_request_of(msgs: &[ControlMessage], pid: u32) -> u64 {
        msgs.iter()
            .find_map(|m| match m {
                ControlMessage::RoomCommand {
                    actor,
                    request,
                    command: RoomCommand::Join { .. },
                    ..
                } if actor.0 == pid => Some(*request),
                _ => None,
            })
            .expect("a join")
    }

    #[test]
    fn a_late_refusal_or_a_refused_rejoin_closes_the_session() {
        let mut c = joined_core();
        let now = Instant::now();
        // A WHEP listener admitted with its token role after the edge stopped waiting: the
        // authority's refusal arrives late and ends the media session.
        let out = c.join(req(5, "eve", Role::Listener, SessionKind::Whep), now);
        let request = join_request_of(&to_origin(&out), 5);
        let refuse = |actor: u32, request: u64, code: &str| ControlMessage::CommandRejected {
            room: R,
            actor: ParticipantId(actor),
            request,
            code: code.into(),
            message: "no".into(),
        };
        let out = c.on_control(refuse(5, request, "banned"));
        assert!(matches!(&out[0], Output::JoinRefused { refusal, .. } if refusal.code == "banned"));
        assert!(out.contains(&Output::Close {
            participant: ParticipantId(5),
            why: CloseWhy::Refused
        }));
        assert_eq!(c.room_of(ParticipantId(5)), None);

        // A refused ordinary command of a joined participant closes nothing.
        let out = c.on_control(refuse(2, 999, "rate_limited"));
        assert!(!out.iter().any(|o| matches!(o, Output::Close { .. })));
        assert_eq!(c.room_of(ParticipantId(2)), Some(R));

        // After a reconnect the re-join of a joined participant is refused (the room ended
        // while the link was down, or the user was banned): its session ends too.
        c.link_down();
        let msgs = c.link_up();
        let rejoin = join_request_of(&msgs, 2);
        let out = c.on_control(refuse(2, rejoin, "room_ended"));
        assert!(out.contains(&Output::Permission {
            participant: ParticipantId(2),
            may_send: false
        }));
        assert!(out.contains(&Output::Close {
            participant: ParticipantId(2),
            why: CloseWhy::Refused
        }));
        assert!(
            matches!(&out[0], Output::ToClient(_, ServerMessage::Error { code, .. }) if code == "room_ended")
        );
        assert_eq!(c.room_of(ParticipantId(2)), None);
        // The host stays.
        assert_eq!(c.room_of(ParticipantId(1)), Some(R));
    }

    #[test]
    fn the_session_cap_refusal_keeps_its_code() {
        assert_eq!(static_code("limit"), "limit");
        assert_eq!(static_code("something new"), "refused");
    }

    #[test]
    fn revocation_ends_every_session_of_the_user_in_the_room() {
        let mut c = joined_core();
        let now = Instant::now();
        // "lee" also has a pending WHEP session (e.g. admitted while the origin was away).
        c.join(req(3, "lee", Role::Listener, SessionKind::Whep), now);
        let out = c.revoke_user(R, "lee", now);
        assert!(out.contains(&Output::Close {
            participant: ParticipantId(2),
            why: CloseWhy::Kicked
        }));
        assert!(out.contains(&Output::Close {
            participant: ParticipantId(3),
            why: CloseWhy::Kicked
        }));
        assert!(out.iter().any(|o| matches!(o,
            Output::JoinRefused { participant, refusal }
                if *participant == ParticipantId(3) && refusal.code == "banned")));
        assert_eq!(c.room_of(ParticipantId(2)), None);
        assert_eq!(c.room_of(ParticipantId(3)), None);
        assert_eq!(c.room_of(ParticipantId(1)), Some(R), "others stay");
        assert!(c.revoke_user(R, "lee", now).is_empty());
    }

    #[test]
    fn kick_closes_and_bans_end_closes_everyone() {
        let mut c = joined_core();
        let now = Instant::now();
        let out = c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::Kicked {
                id: ParticipantId(2),
                by: ParticipantId(1),
            }],
        });
        assert!(out.contains(&Output::ToClient(
            ParticipantId(2),
            ServerMessage::Event(RoomEvent::Kicked {
                id: ParticipantId(2),
                by: ParticipantId(1)
            })
        )));
        assert!(out.contains(&Output::Close {
            participant: ParticipantId(2),
            why: CloseWhy::Kicked
        }));
        // Rejoining with the same identity is refused locally.
        let out = c.join(req(5, "lee", Role::Listener, SessionKind::WebSocket), now);
        assert!(matches!(&out[0], Output::JoinRefused { refusal, .. } if refusal.code == "banned"));
        let out = c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::Ended {
                by: Some(ParticipantId(1)),
            }],
        });
        assert!(
            matches!(&out[0], Output::ToClient(p, ServerMessage::Event(RoomEvent::Ended { .. })) if p.0 == 1)
        );
        assert!(out.contains(&Output::Close {
            participant: ParticipantId(1),
            why: CloseWhy::Ended
        }));
        assert!(c.members_per_room().is_empty());
    }

    #[test]
    fn reconnect_reannounces_rooms_and_participants_with_their_roles() {
        let mut c = joined_core();
        c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::RoleChanged {
                id: ParticipantId(2),
                role: RoomRole::Speaker,
                by: ParticipantId(1),
            }],
        });
        c.link_down();
        let msgs = c.link_up();
        assert_eq!(msgs[0], ControlMessage::SubscribeRoom { room: R });
        let resumes: Vec<_> = msgs[1..]
            .iter()
            .map(|m| match m {
                ControlMessage::RoomCommand {
                    actor,
                    command: RoomCommand::Join { resume, .. },
                    ..
                } => (actor.0, *resume),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            resumes,
            vec![(1, Some(RoomRole::Host)), (2, Some(RoomRole::Speaker))]
        );
    }

    #[test]
    fn a_room_announced_to_its_new_owner_carries_only_its_participants() {
        let mut c = joined_core();
        assert_eq!(c.local_rooms(), vec![R]);
        assert!(
            c.announce(&[RoomId(R.0 + 1)]).is_empty(),
            "not a local room"
        );
        let msgs = c.announce(&[R]);
        assert_eq!(
            msgs.len(),
            c.link_up().len(),
            "as a reconnect, for this room"
        );
        assert_eq!(msgs[0], ControlMessage::SubscribeRoom { room: R });
        let joins: Vec<u32> = msgs[1..]
            .iter()
            .map(|m| match m {
                ControlMessage::RoomCommand {
                    room,
                    actor,
                    command: RoomCommand::Join { .. },
                    ..
                } if *room == R => actor.0,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(joins, vec![1, 2]);
    }

    #[test]
    fn a_fresh_session_of_a_departed_speaker_resumes_its_role() {
        let mut c = joined_core();
        let now = Instant::now();
        c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::RoleChanged {
                id: ParticipantId(2),
                role: RoomRole::Speaker,
                by: ParticipantId(1),
            }],
        });
        let out = c.leave(ParticipantId(2), now);
        assert!(matches!(
            &to_origin(&out)[0],
            ControlMessage::RoomCommand {
                command: RoomCommand::Leave,
                ..
            }
        ));
        c.on_control(ControlMessage::RoomEvents {
            room: R,
            events: vec![RoomEvent::ParticipantLeft {
                id: ParticipantId(2),
            }],
        });
        let out = c.join(req(7, "lee", Role::Listener, SessionKind::WebSocket), now);
        assert!(matches!(
            &to_origin(&out)[0],
            ControlMessage::RoomCommand {
                command: RoomCommand::Join {
                    resume: Some(RoomRole::Speaker),
                    ..
                },
                ..
            }
        ));
        // After the window it is forgotten.
        c.leave(ParticipantId(7), now);
        let out = c.join(
            req(8, "lee", Role::Listener, SessionKind::WebSocket),
            now + RESUME_WINDOW,
        );
        assert!(matches!(
            &to_origin(&out)[0],
            ControlMessage::RoomCommand {
                command: RoomCommand::Join { resume: None, .. },
                ..
            }
        ));
    }
}
