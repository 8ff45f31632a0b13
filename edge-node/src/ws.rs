//! Client signaling over WebSocket at `GET /v1/ws?token=...` (JSON, see `docs/signaling.md`).
//!
//! The token is checked before the upgrade (401 JSON otherwise). The first message must be
//! `join`, answered by `snapshot` once the room authority accepted the participant. Then every
//! client message is either handled here (`offer`, `ping`) or pre-checked and forwarded to the
//! authority as a `RoomCommand`; refusals come back as `error` events. Malformed or oversized
//! messages get `error{code:"bad_message"}` and the connection stays up; a client that keeps
//! flooding is disconnected. Kicks and room ends send their event, then close the socket and the
//! participant's PeerConnection.

use crate::admission::{
    add_peer, answer_offer, api_error, check_live, display_name, unauthorized, AppState, REVOKED,
};
use crate::media::api::{MediaCommand, NewPeer};
use crate::offer::parse_client_offer;
use crate::room::{FloodGuard, FloodVerdict};
use crate::sessions::{now_unix, JoinOutcome, Outbound, CLIENT_QUEUE};
use crate::shards::MediaShards;
use crate::signaling::{CloseWhy, JoinRequest, SessionKind};
use amphi_protocol::room::{ClientMessage, RoomCommand, RoomRole, ServerMessage};
use amphi_protocol::token::Claims;
use amphi_protocol::ParticipantId;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Largest WebSocket frame accepted at all; messages above
/// [`amphi_protocol::room::MAX_CLIENT_MESSAGE_BYTES`] but below this get a `bad_message` error,
/// larger ones close the connection.
pub const WS_MAX_MESSAGE: usize = 1024 * 1024;
/// How long `join` waits for the room authority.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Close code sent to a kicked client.
pub const CLOSE_KICKED: u16 = 4001;
/// Close code sent when the room ended.
pub const CLOSE_ENDED: u16 = 4002;
/// Close code for a flooding client.
pub const CLOSE_FLOOD: u16 = 4008;
/// Close code when the session's token was revoked (by `jti`).
pub const CLOSE_TOKEN_REVOKED: u16 = 4003;
/// Close code when the session's token expired and was not refreshed.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4004;

/// `?token=` of the upgrade request.
#[derive(Deserialize)]
pub(crate) struct WsQuery {
    token: Option<String>,
}

/// `GET /v1/ws?token=...`.
pub(crate) async fn ws_get(
    State(st): State<Arc<AppState>>,
    Query(q): Query<WsQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(token) = q.token.filter(|t| !t.is_empty()) else {
        return unauthorized("missing token query parameter".into());
    };
    let now = now_unix();
    let claims = match st.tokens.verify(&token, now) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(reason = %e, "websocket token refused");
            return unauthorized(format!("invalid token: {e}"));
        }
    };
    if st.sessions.is_revoked(&claims, now) {
        tracing::info!(room = %claims.room, "revoked websocket token refused");
        // A browser cannot read the status of a refused upgrade: tell it over the socket.
        return match upgrade {
            Ok(u) => u.on_upgrade(|mut socket| async move {
                send(&mut socket, &error("banned", REVOKED)).await;
                close(&mut socket, CLOSE_KICKED, "banned").await;
            }),
            Err(_) => unauthorized(REVOKED.into()),
        };
    }
    if let Err(resp) = check_live(&st, claims.room).await {
        return resp;
    }
    // A listener is admitted when the edge's interactive seats are taken: the push and HLS tiers
    // join signaling too (the room's state, chat, hands). Its offer for media is what is refused.
    // Every WebSocket session holds a place until it closes, media or not.
    let Some(seat) = st.occupancy.admit_ws() else {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "this edge serves its maximum of WebSocket sessions; listen over HLS",
        );
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected a WebSocket upgrade: {e}"),
            )
        }
    };
    upgrade
        .max_message_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            Session::new(st, claims).run(socket).await;
            drop(seat);
        })
}

struct Session {
    st: Arc<AppState>,
    claims: Claims,
    pid: Option<ParticipantId>,
    registered: bool,
    joined: bool,
}

fn error(code: &str, message: impl Into<String>) -> ServerMessage {
    ServerMessage::Error {
        code: code.into(),
        message: message.into(),
    }
}

async fn send(socket: &mut WebSocket, msg: &ServerMessage) -> bool {
    match serde_json::to_string(msg) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => true,
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Map a client message to a room command (those not handled by the edge itself).
fn to_command(msg: ClientMessage) -> Option<RoomCommand> {
    Some(match msg {
        ClientMessage::RaiseHand => RoomCommand::RaiseHand,
        ClientMessage::LowerHand { target } => RoomCommand::LowerHand { target },
        ClientMessage::Promote { target, role } => RoomCommand::Promote { target, role },
        ClientMessage::Demote { target } => RoomCommand::Demote { target },
        ClientMessage::Mute { target } => RoomCommand::Mute { target },
        ClientMessage::Unmute => RoomCommand::Unmute,
        ClientMessage::Kick { target } => RoomCommand::Kick { target },
        ClientMessage::End => RoomCommand::End,
        ClientMessage::Chat { text } => RoomCommand::Chat { text },
        ClientMessage::React { emoji } => RoomCommand::React { emoji },
        ClientMessage::Report {
            target,
            reason,
            text,
        } => RoomCommand::Report {
            target,
            reason,
            text,
        },
        ClientMessage::Join
        | ClientMessage::Offer { .. }
        | ClientMessage::Ping
        | ClientMessage::RefreshToken { .. }
        | ClientMessage::Listening { .. }
        | ClientMessage::ListParticipants { .. } => return None,
    })
}

/// What the session loop does next.
enum Next {
    Continue,
    Close(u16, &'static str),
}

impl Session {
    fn new(st: Arc<AppState>, claims: Claims) -> Self {
        Session {
            st,
            claims,
            pid: None,
            registered: false,
            joined: false,
        }
    }

    async fn run(mut self, mut socket: WebSocket) {
        self.st.metrics.ws_session();
        let (tx, mut rx) = mpsc::channel::<Outbound>(CLIENT_QUEUE);
        let mut tx = Some(tx);
        let mut guard = FloodGuard::new(Instant::now());
        loop {
            tokio::select! {
                m = socket.recv() => {
                    let text = match m {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Binary(_))) => None,
                        Some(Ok(Message::Text(t))) => Some(t),
                    };
                    match guard.check(Instant::now()) {
                        FloodVerdict::Accept => {}
                        FloodVerdict::Refuse => {
                            if !send(&mut socket, &error("rate_limited", "slow down: too many messages")).await {
                                break;
                            }
                            continue;
                        }
                        FloodVerdict::Close => {
                            let _ = send(&mut socket, &error("rate_limited", "flooding: disconnected")).await;
                            close(&mut socket, CLOSE_FLOOD, "flood").await;
                            break;
                        }
                    }
                    let Some(text) = text else {
                        if !send(&mut socket, &error("bad_message", "send JSON text messages")).await {
                            break;
                        }
                        continue;
                    };
                    let msg = match ClientMessage::parse(text.as_str()) {
                        Ok(m) => m,
                        Err(e) => {
                            if !send(&mut socket, &error("bad_message", e.to_string())).await {
                                break;
                            }
                            continue;
                        }
                    };
                    match self.handle(&mut socket, msg, &mut tx).await {
                        Next::Continue => {}
                        Next::Close(code, reason) => {
                            close(&mut socket, code, reason).await;
                            break;
                        }
                    }
                }
                o = rx.recv(), if self.joined => match o {
                    Some(Outbound::Msg(m)) => {
                        if !send(&mut socket, &m).await {
                            break;
                        }
                    }
                    Some(Outbound::Close(why)) => {
                        let (code, reason) = match why {
                            CloseWhy::Kicked => (CLOSE_KICKED, "kicked"),
                            CloseWhy::Ended => (CLOSE_ENDED, "room ended"),
                            CloseWhy::Removed => (1000, "removed"),
                            CloseWhy::Refused => (1008, "join refused"),
                            CloseWhy::TokenRevoked => (CLOSE_TOKEN_REVOKED, "token revoked"),
                            CloseWhy::TokenExpired => (CLOSE_TOKEN_EXPIRED, "token expired"),
                        };
                        // The participant is gone from the room already.
                        self.registered = false;
                        close(&mut socket, code, reason).await;
                        break;
                    }
                    None => {
                        close(&mut socket, 1008, "too slow").await;
                        break;
                    }
                },
            }
        }
        if let Some(pid) = self.pid {
            if self.registered {
                self.st.sessions.leave(pid);
            }
            self.st
                .media
                .broadcast(|| MediaCommand::RemoveParticipant { participant: pid })
                .await;
        }
    }

    async fn handle(
        &mut self,
        socket: &mut WebSocket,
        msg: ClientMessage,
        tx: &mut Option<mpsc::Sender<Outbound>>,
    ) -> Next {
        let reply = match msg {
            ClientMessage::Ping => Some(ServerMessage::Pong),
            ClientMessage::Join => return self.join(socket, tx).await,
            _ if !self.joined => Some(error("not_joined", "send join first")),
            ClientMessage::Offer { sdp } => Some(self.offer(sdp).await),
            ClientMessage::RefreshToken { token } => Some(self.refresh(&token)),
            ClientMessage::Listening { tier, movable } => {
                let pid = self.pid.expect("joined participants have an id");
                self.st.sessions.listening(pid, tier, movable);
                None
            }
            ClientMessage::ListParticipants { after, limit } => {
                let pid = self.pid.expect("joined participants have an id");
                Some(
                    self.st
                        .sessions
                        .list_participants(pid, after, limit)
                        .unwrap_or_else(|r| error(r.code, r.message)),
                )
            }
            other => {
                let pid = self.pid.expect("joined participants have an id");
                match to_command(other) {
                    Some(cmd) => match self.st.sessions.command(pid, cmd) {
                        Ok(()) => None,
                        Err(r) => Some(error(r.code, r.message)),
                    },
                    None => Some(error("bad_message", "not a command")),
                }
            }
        };
        if let Some(reply) = reply {
            if !send(socket, &reply).await {
                return Next::Close(1011, "send failed");
            }
        }
        Next::Continue
    }

    async fn join(
        &mut self,
        socket: &mut WebSocket,
        tx: &mut Option<mpsc::Sender<Outbound>>,
    ) -> Next {
        if self.registered {
            let _ = send(socket, &error("bad_message", "already joined")).await;
            return Next::Continue;
        }
        let Some(pid) = self.st.new_participant_id() else {
            return Next::Close(1011, "internal error");
        };
        self.pid = Some(pid);
        self.registered = true;
        let rx: oneshot::Receiver<JoinOutcome> = self.st.sessions.join(
            JoinRequest {
                participant: pid,
                room: self.claims.room,
                user: self.claims.sub.clone(),
                name: display_name(&self.claims),
                role: self.claims.role,
                kind: SessionKind::WebSocket,
            },
            &self.claims,
            tx.take(),
        );
        match tokio::time::timeout(JOIN_TIMEOUT, rx).await {
            Ok(Ok(JoinOutcome::Joined(view))) => {
                self.joined = true;
                let snapshot = ServerMessage::Snapshot {
                    you: pid,
                    state: view.state,
                    counts: view.counts,
                    partial: view.partial,
                };
                if !send(socket, &snapshot).await {
                    return Next::Close(1011, "send failed");
                }
                tracing::info!(room = %self.claims.room, participant = %pid, "websocket participant joined");
                Next::Continue
            }
            Ok(Ok(JoinOutcome::Refused(r))) => {
                let _ = send(socket, &error(r.code, r.message)).await;
                Next::Close(1008, "join refused")
            }
            Ok(Err(_)) | Err(_) => {
                let _ = send(
                    socket,
                    &error("unavailable", "the room authority did not answer"),
                )
                .await;
                Next::Close(1011, "join timed out")
            }
        }
    }

    /// `refresh_token`: the session moves to the new token (same user and room, same role or
    /// lower) and ends at the new token's expiry instead.
    fn refresh(&mut self, token: &str) -> ServerMessage {
        let pid = self.pid.expect("joined participants have an id");
        let now = now_unix();
        let claims = match self.st.tokens.verify(token, now) {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(reason = %e, "refreshed websocket token refused");
                return error("unauthorized", format!("invalid token: {e}"));
            }
        };
        match self.st.sessions.refresh(pid, &claims, now) {
            Ok(()) => {
                let exp = claims.exp;
                self.claims = claims;
                ServerMessage::TokenRefreshed { exp }
            }
            Err(r) => error(r.code, r.message),
        }
    }

    /// An SDP offer: the first one creates the participant's PeerConnection, later ones
    /// renegotiate it (promotion adds a send track, demotion removes it).
    async fn offer(&mut self, sdp: String) -> ServerMessage {
        let pid = self.pid.expect("joined participants have an id");
        let parsed = match parse_client_offer(sdp.as_bytes()) {
            Ok(o) => o,
            Err(e) => return error(e.code(), e.to_string()),
        };
        let role = self.st.sessions.role_of(pid).unwrap_or(RoomRole::Listener);
        if parsed.sends_audio && !role.may_publish() {
            return error(
                "forbidden",
                "a listener's offer may not send audio: raise your hand and wait to be promoted",
            );
        }
        let owner = match self.st.media.owner_of(pid).await {
            Ok(owner) => owner,
            Err(_) => return error("unavailable", "the media engine is not running"),
        };
        if let Some(shard) = owner {
            let (reply, answer) = oneshot::channel();
            let cmd = MediaCommand::Renegotiate {
                participant: pid,
                offer: Box::new(parsed.offer),
                publishing: parsed.sends_audio,
                slots: parsed.slots,
                reply,
            };
            if self.st.media.send(shard, cmd).await.is_err() {
                return error("unavailable", "the media engine is not running");
            }
            return match answer.await {
                Ok(Ok(sdp)) => ServerMessage::Answer { sdp },
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "renegotiation offer not accepted");
                    error("bad_sdp", "the offer could not be accepted")
                }
                Err(_) => error("unavailable", "the media engine is not running"),
            };
        }
        if !parsed.slots.is_empty() && role == RoomRole::Listener && self.st.occupancy.is_full() {
            return error(
                "capacity",
                "this edge serves its maximum of interactive listeners; listen over HLS",
            );
        }
        let (rtc, ufrag, answer, offer_sdp) = match answer_offer(&self.st, parsed.offer) {
            Ok(x) => x,
            Err(_) => return error("bad_sdp", "the offer could not be accepted"),
        };
        let peer = NewPeer {
            session: MediaShards::session_id(self.st.media.pick()),
            ufrag,
            rtc,
            room: self.claims.room,
            participant: pid,
            name: display_name(&self.claims),
            jti: self.claims.jti.clone(),
            kind: SessionKind::WebSocket,
            publishing: parsed.sends_audio,
            may_send: self.st.sessions.may_send(pid),
            slots: parsed.slots,
            offer_sdp,
        };
        match add_peer(&self.st, peer).await {
            Ok(()) => ServerMessage::Answer { sdp: answer },
            Err(_) => error("unavailable", "the media engine is not accepting peers"),
        }
    }
}
