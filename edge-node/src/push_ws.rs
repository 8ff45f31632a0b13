//! Push listeners over WebSocket: `GET /v1/rooms/{room}/push?token=...[&after=TS]`
//! (`docs/push.md`): the token and room checks, then the WebSocket upgrade, done here without a
//! WebSocket library so nothing is re-encoded per listener. The upgraded connection goes to the
//! [`PushHub`](crate::push_hub::PushHub), whose writers (`push_fanout`) write each room message,
//! framed once by the core, to every listener's socket.

use crate::admission::{api_error, check_live, unauthorized, AppState, REVOKED};
use crate::push::PushRefusal;
use crate::push_io::PushIo;
use crate::sessions::now_unix;
use amphi_protocol::RoomId;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use sha1::{Digest, Sha1};
use std::sync::Arc;

/// The query of a push request.
#[derive(Deserialize, Default)]
pub(crate) struct PushQuery {
    /// The listener's room token.
    pub(crate) token: Option<String>,
    /// A relay grant: another edge of the region pulling the room for its own listeners.
    pub(crate) relay: Option<String>,
    /// Resume after this room timestamp.
    pub(crate) after: Option<u64>,
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

/// The refusal of a request without a valid, unrevoked room token of `room` (`?token=` or
/// `Authorization: Bearer`); `None` when it has one.
fn room_token_refusal(
    st: &AppState,
    room: RoomId,
    query_token: Option<&str>,
    headers: &HeaderMap,
    now: u64,
) -> Option<Response> {
    let token = query_token
        .filter(|t| !t.is_empty())
        .or_else(|| bearer(headers));
    let Some(token) = token else {
        return Some(unauthorized(
            "missing token (token query parameter or bearer token)".into(),
        ));
    };
    let claims = match st.tokens.verify(token, now) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%room, reason = %e, "push token refused");
            return Some(unauthorized(format!("invalid token: {e}")));
        }
    };
    if st.sessions.is_revoked(&claims, now) {
        return Some(unauthorized(REVOKED.into()));
    }
    if claims.room != room {
        return Some(api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token is for another room",
        ));
    }
    None
}

/// The checks every push listener passes, over WebSocket or WebTransport: a listener token of
/// `room` (`?token=` or `Authorization: Bearer`) or a relay grant (`?relay=`, another edge's
/// feed), and the room live. The refusal is an API error response (its status is what a
/// WebTransport session is refused with).
pub(crate) async fn admit(
    st: &AppState,
    room: &str,
    q: &PushQuery,
    headers: &HeaderMap,
) -> Result<RoomId, Response> {
    let Ok(room) = room.parse::<RoomId>() else {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            "room ids are 16 hex digits",
        ));
    };
    let now = now_unix();
    if let Some(grant) = q.relay.as_deref() {
        // Another edge of the region (its parent in the relay tree is this edge).
        match st.tokens.verify_relay_grant(grant, now) {
            Ok(g) => tracing::debug!(%room, edge = %g.sub, "relay feed"),
            Err(e) => {
                tracing::info!(%room, reason = %e, "relay grant refused");
                return Err(unauthorized(format!("invalid relay grant: {e}")));
            }
        }
    } else if let Some(refusal) = room_token_refusal(st, room, q.token.as_deref(), headers, now) {
        return Err(refusal);
    }
    if st.push.is_ended(room) {
        return Err(ended());
    }
    check_live(st, room).await?;
    Ok(room)
}

fn ended() -> Response {
    api_error(StatusCode::GONE, "room_ended", "the room has ended")
}

/// The answer to a listener refused a place (the edge is full, the room ended).
pub(crate) fn refused_place(refusal: PushRefusal) -> Response {
    match refusal {
        PushRefusal::Full => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "this edge serves its maximum of push listeners; listen over HLS",
        ),
        PushRefusal::Ended => ended(),
    }
}

/// `GET /v1/rooms/{room}/push`: [`admit`], then the WebSocket upgrade.
pub(crate) async fn push_get(
    State(st): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(q): Query<PushQuery>,
    mut req: Request<Body>,
) -> Response {
    let room = match admit(&st, &room, &q, req.headers()).await {
        Ok(room) => room,
        Err(refusal) => return refusal,
    };
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
    let place = match st.push.reserve(room) {
        Ok(place) => place,
        Err(refusal) => return refused_place(refusal),
    };
    let hub = st.push.clone();
    let after = q.after;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => hub.attach(
                place,
                PushIo::WebSocket(hyper_util::rt::TokioIo::new(upgraded)),
                after,
            ),
            Err(e) => tracing::debug!(%room, error = %e, "push upgrade failed"),
        }
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
}
