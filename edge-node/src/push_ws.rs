//! Push listeners over WebSocket: `GET /v1/rooms/{room}/push?token=...[&after=TS]`
//! (`docs/push.md`). The driver of [`PushCore`]: the uplink hands it program frames, it carries
//! the core's subscriptions to the uplink and writes each room's messages to its listeners.
//!
//! Every message is WebSocket-framed once by the core; a room's listeners share it through a
//! broadcast channel of [`PUSH_QUEUE`](crate::push_hub::PUSH_QUEUE) messages and write the same `Bytes` to their sockets (the
//! upgrade is done here, without a WebSocket library, so nothing is re-encoded per listener). A
//! listener whose socket does not keep up falls behind in the channel and skips the messages it
//! missed; one that missed more than [`MAX_SKIPPED`] in all is disconnected. Nobody waits for a
//! slow listener.

use crate::admission::{api_error, check_live, unauthorized, AppState, REVOKED};
use crate::push::{Message, PushRefusal};
use crate::push_hub::PushHub;
use crate::sessions::now_unix;
use amphi_protocol::push::{opcode, parse_client_frame, ws_server_frame, MAX_CLIENT_FRAME};
use amphi_protocol::RoomId;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use sha1::{Digest, Sha1};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

/// Messages a listener may skip in all before it is disconnected.
pub const MAX_SKIPPED: u64 = 64;
/// Close code sent when the room ended (as on `/v1/ws`).
const CLOSE_ENDED: u16 = 4002;
/// Close code sent to a listener disconnected for being too slow.
const CLOSE_TOO_SLOW: u16 = 4009;
/// A listener whose socket takes no bytes for this long is dropped (a peer that vanished without
/// closing its connection would otherwise hold its task until TCP gives up).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The query of a push request.
#[derive(Deserialize)]
pub(crate) struct PushQuery {
    token: Option<String>,
    /// Resume after this room timestamp.
    after: Option<u64>,
}

/// The bearer token of a request's `Authorization` header, if well-formed.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub(crate) fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// `GET /v1/rooms/{room}/push`: a listener token of that room (`?token=` or
/// `Authorization: Bearer`), the room live, then the WebSocket upgrade.
pub(crate) async fn push_get(
    State(st): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(q): Query<PushQuery>,
    mut req: Request<Body>,
) -> Response {
    let Ok(room) = room.parse::<RoomId>() else {
        return api_error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            "room ids are 16 hex digits",
        );
    };
    let headers = req.headers();
    let token = q
        .token
        .as_deref()
        .filter(|t| !t.is_empty())
        .or_else(|| bearer(headers));
    let Some(token) = token else {
        return unauthorized("missing token (token query parameter or bearer token)".into());
    };
    let now = now_unix();
    let claims = match st.tokens.verify(token, now) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%room, reason = %e, "push token refused");
            return unauthorized(format!("invalid token: {e}"));
        }
    };
    if st.sessions.is_revoked(&claims, now) {
        return unauthorized(REVOKED.into());
    }
    if claims.room != room {
        return api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token is for another room",
        );
    }
    if st.push.is_ended(room) {
        return api_error(StatusCode::GONE, "room_ended", "the room has ended");
    }
    if let Err(resp) = check_live(&st, room).await {
        return resp;
    }
    let headers = req.headers();
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let upgrade_ok = header_has(headers, header::UPGRADE, "websocket")
        && header_has(headers, header::CONNECTION, "upgrade")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let (Some(key), true) = (key, upgrade_ok) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected a WebSocket upgrade (version 13)",
        );
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "this connection cannot be upgraded",
        );
    };
    let (backlog, rx) = match st.push.join(room, q.after) {
        Ok(x) => x,
        Err(PushRefusal::Full) => {
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "capacity",
                "this edge serves its maximum of push listeners; listen over HLS",
            )
        }
        Err(PushRefusal::Ended) => {
            return api_error(StatusCode::GONE, "room_ended", "the room has ended")
        }
    };
    let listener = Listener {
        hub: st.push.clone(),
        room,
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = hyper_util::rt::TokioIo::new(upgraded);
                listener.serve(io, backlog, rx).await;
            }
            Err(e) => tracing::debug!(%room, error = %e, "push upgrade failed"),
        }
        drop(listener);
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// One listener's place in its room (left when dropped).
struct Listener {
    hub: Arc<PushHub>,
    room: RoomId,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.hub.leave(self.room);
    }
}

/// What the client sent, as far as the stream cares.
enum FromClient {
    /// Nothing that needs an answer.
    Nothing,
    /// Answer this pong.
    Pong(Vec<u8>),
    /// The client closed, broke the protocol or went away.
    Gone,
}

/// A close frame with `code` and `reason`.
fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    let mut out = Vec::new();
    ws_server_frame(opcode::CLOSE, &payload, &mut out);
    out
}

/// Parse what the client sent so far (`buf[..*filled]`), keeping an incomplete frame.
fn client_frames(buf: &mut [u8], filled: &mut usize) -> FromClient {
    let mut answer = FromClient::Nothing;
    loop {
        match parse_client_frame(&mut buf[..*filled]) {
            Ok(Some(f)) => {
                match f.opcode {
                    opcode::CLOSE => return FromClient::Gone,
                    opcode::PING => answer = FromClient::Pong(buf[f.payload.clone()].to_vec()),
                    // Text, binary and pongs carry nothing the stream uses.
                    _ => {}
                }
                buf.copy_within(f.consumed..*filled, 0);
                *filled -= f.consumed;
            }
            Ok(None) => return answer,
            Err(e) => {
                tracing::debug!(error = %e, "push listener sent a bad frame");
                return FromClient::Gone;
            }
        }
    }
}

impl Listener {
    async fn serve<S>(&self, mut io: S, backlog: Vec<Message>, mut rx: broadcast::Receiver<Bytes>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let metrics = &self.hub.metrics;
        let mut buf = vec![0u8; MAX_CLIENT_FRAME + 14];
        let mut filled = 0;
        let mut skipped = 0u64;
        let mut header_sent = false;
        let mut pending: std::collections::VecDeque<Bytes> =
            backlog.into_iter().map(|m| m.frame).collect();
        loop {
            let next = match pending.pop_front() {
                Some(frame) => Ok(frame),
                None => tokio::select! {
                    m = rx.recv() => m,
                    n = io.read(&mut buf[filled..]) => {
                        match n {
                            Ok(0) | Err(_) => return,
                            Ok(n) => filled += n,
                        }
                        match client_frames(&mut buf, &mut filled) {
                            FromClient::Nothing => {}
                            FromClient::Pong(payload) => {
                                let mut out = Vec::new();
                                ws_server_frame(opcode::PONG, &payload, &mut out);
                                if io.write_all(&out).await.is_err() {
                                    return;
                                }
                            }
                            FromClient::Gone => {
                                let _ = io.write_all(&close_frame(1000, "")).await;
                                return;
                            }
                        }
                        if filled == buf.len() {
                            return;
                        }
                        continue;
                    }
                },
            };
            let frame = match next {
                Ok(frame) => frame,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    metrics.push_skipped.inc_by(n);
                    skipped += n;
                    if skipped > MAX_SKIPPED {
                        metrics.push_dropped.inc();
                        let _ = io.write_all(&close_frame(CLOSE_TOO_SLOW, "too slow")).await;
                        return;
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = io.write_all(&close_frame(CLOSE_ENDED, "ended")).await;
                    return;
                }
            };
            if !header_sent {
                let Some(header) = self.hub.header(self.room) else {
                    continue;
                };
                if io.write_all(&header).await.is_err() {
                    return;
                }
                header_sent = true;
            }
            // The timer is only armed when the socket does not take the message at once.
            match tokio::time::timeout(WRITE_TIMEOUT, io.write_all(&frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    metrics.push_dropped.inc();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn client_frames_are_consumed_and_a_ping_is_answered() {
        // A masked ping "hi" and half of a close frame.
        let mut buf = vec![0x89, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2, 0x88, 0x80];
        buf.resize(64, 0);
        let mut filled = 10;
        match client_frames(&mut buf, &mut filled) {
            FromClient::Pong(p) => assert_eq!(p, b"hi"),
            _ => panic!("expected a pong"),
        }
        assert_eq!((filled, &buf[..2]), (2, &[0x88, 0x80][..]));
        buf[2..6].copy_from_slice(&[0, 0, 0, 0]);
        filled = 6;
        assert!(matches!(
            client_frames(&mut buf, &mut filled),
            FromClient::Gone
        ));
        // An unmasked frame breaks the protocol.
        let mut bad = vec![0x81, 0x01, b'a'];
        let mut filled = 3;
        assert!(matches!(
            client_frames(&mut bad, &mut filled),
            FromClient::Gone
        ));
    }
}
