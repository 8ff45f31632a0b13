//! The edge's HTTP listener: WHIP (RFC 9725) ingest, WHEP egress, the `/v1/ws` signaling
//! WebSocket ([`crate::ws`]), CORS, `/metrics`, `/healthz`.

// Helpers short-circuit handlers with a ready HTTP error response; boxing it buys nothing here.
#![allow(clippy::result_large_err)]

use crate::admission::{
    add_peer, answer_offer, api_error, check_live, display_name, unauthorized, AppState, REVOKED,
};
use crate::media::api::{MediaCommand, NewPeer, PatchOutcome, RemoveOutcome};
use crate::offer::{parse_client_offer, parse_whip_offer, OfferError, MAX_OFFER_LEN};
use crate::room::Refusal;
use crate::sdpfrag::IceFragment;
use crate::sessions::{now_unix, JoinOutcome};
use crate::shards::{MediaShards, ShardsGone};
use crate::signaling::{JoinRequest, SessionKind};
use amphi_protocol::room::RoomRole;
use amphi_protocol::token::Claims;
use amphi_protocol::{ParticipantId, RoomId};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a WHIP/WHEP POST waits for the room authority to accept the participant before
/// continuing with the token's role (origin unreachable or without authority).
const JOIN_WAIT: Duration = Duration::from_secs(3);

/// The HTTP router of an edge.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let whip = Router::new()
        .route(
            "/whip/{room}",
            post(whip_post).options(|| async { preflight(true) }),
        )
        .route(
            "/whip/{room}/{session}",
            axum::routing::delete(whip_delete)
                .patch(whip_patch)
                .options(|| async { preflight(false) }),
        )
        .route(
            "/whep/{room}",
            post(whep_post).options(|| async { preflight(true) }),
        )
        .route(
            "/whep/{room}/{session}",
            axum::routing::delete(whep_delete)
                .patch(whip_patch)
                .options(|| async { preflight(false) }),
        )
        .layer(axum::middleware::map_response(cors));
    Router::new()
        .merge(whip)
        .route("/v1/ws", get(crate::ws::ws_get))
        .route("/v1/rooms/{room}/push", get(crate::push_ws::push_get))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(axum::middleware::from_fn(amphi_common::redact::log_request))
        .with_state(state)
}

async fn cors(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, ETag, Link, Accept-Post, Accept-Patch"),
    );
    resp
}

/// The headers answering `OPTIONS` on a WHIP/WHEP endpoint (`endpoint`) or session URL
/// (RFC 9725 §4.2: CORS as in Fetch, `Accept-Post: application/sdp` on the endpoint). No
/// `Link: rel="ice-server"` headers: the edge is ICE-lite on a public address and configures no
/// STUN/TURN servers (§4.6).
pub(crate) fn options_headers(endpoint: bool) -> Vec<(header::HeaderName, &'static str)> {
    let mut h = vec![
        (
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "Authorization, Content-Type, If-Match",
        ),
        (header::ACCESS_CONTROL_MAX_AGE, "86400"),
    ];
    if endpoint {
        h.push((header::ACCESS_CONTROL_ALLOW_METHODS, "POST, OPTIONS"));
        h.push((header::ALLOW, "POST, OPTIONS"));
        h.push((
            header::HeaderName::from_static("accept-post"),
            "application/sdp",
        ));
    } else {
        h.push((
            header::ACCESS_CONTROL_ALLOW_METHODS,
            "PATCH, DELETE, OPTIONS",
        ));
        h.push((header::ALLOW, "PATCH, DELETE, OPTIONS"));
        h.push((
            header::HeaderName::from_static("accept-patch"),
            "application/trickle-ice-sdpfrag",
        ));
    }
    h
}

/// `200 OK` to `OPTIONS`, preflight or not, with [`options_headers`].
fn preflight(endpoint: bool) -> Response {
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    for (name, value) in options_headers(endpoint) {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    st.metrics.set_census(st.sessions.census());
    (
        [(header::CONTENT_TYPE, amphi_common::metrics::CONTENT_TYPE)],
        st.metrics.render(),
    )
        .into_response()
}

/// The bearer token of a request, if well-formed.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Verify the bearer token; the error is the 401 message (the reason is logged, never the token).
fn authorize(st: &AppState, headers: &HeaderMap, room: RoomId) -> Result<Claims, String> {
    let Some(token) = bearer(headers) else {
        return Err("missing bearer token".into());
    };
    let now = now_unix();
    let claims = st.tokens.verify(token, now).map_err(|e| {
        tracing::info!(%room, reason = %e, "token refused");
        format!("invalid token: {e}")
    })?;
    if st.sessions.is_revoked(&claims, now) {
        tracing::info!(%room, "revoked token refused");
        return Err(REVOKED.into());
    }
    Ok(claims)
}

fn is_sdp(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/sdp"))
}

/// The room id of a path, or a 404.
fn parse_room(room: &str) -> Result<RoomId, Response> {
    room.parse::<RoomId>().map_err(|_| {
        api_error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            "room ids are 16 hex digits",
        )
    })
}

/// Token, room and SDP checks shared by WHIP and WHEP POSTs; returns the claims and the body.
async fn check_post(
    st: &AppState,
    room: RoomId,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Claims, Bytes), Response> {
    let claims = authorize(st, headers, room).map_err(unauthorized)?;
    if claims.room != room {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token is for another room",
        ));
    }
    check_live(st, room).await?;
    if !is_sdp(headers) {
        return Err(api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be an SDP offer with Content-Type: application/sdp",
        ));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the offer must be at most {MAX_OFFER_LEN} bytes"),
        )
    };
    if declared.is_some_and(|n| n > MAX_OFFER_LEN as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, MAX_OFFER_LEN)
        .await
        .map_err(|_| too_large())?;
    Ok((claims, bytes))
}

fn offer_error(e: OfferError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    api_error(status, e.code(), e.to_string())
}

/// The HTTP status of a refusal from the room authority.
pub(crate) fn refusal_status(code: &str) -> StatusCode {
    match code {
        "room_ended" | "ended" => StatusCode::GONE,
        "not_found" => StatusCode::NOT_FOUND,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "token_revoked" => StatusCode::UNAUTHORIZED,
        "unavailable" | "capacity" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::FORBIDDEN,
    }
}

fn refusal_response(r: &Refusal) -> Response {
    let code = if r.code == "ended" {
        "room_ended"
    } else {
        r.code
    };
    api_error(refusal_status(r.code), code, r.message.clone())
}

fn allocate(st: &AppState) -> Result<ParticipantId, Response> {
    st.new_participant_id().ok_or_else(|| {
        api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "id allocator poisoned",
        )
    })
}

/// Join a WHIP/WHEP session as a participant. Returns its role and whether it may send audio.
/// Publishing (WHIP) fails closed: without the room authority's answer (origin unreachable or
/// slow) it is refused with 503 `origin_unavailable`, since only the authority knows whether
/// the user was kicked, banned or demoted. A WHEP listener continues degraded with its token's
/// role; a refusal that arrives later closes its session ([`crate::signaling::CloseWhy::Refused`]).
async fn join_http(
    st: &AppState,
    pid: ParticipantId,
    claims: &Claims,
    kind: SessionKind,
) -> Result<(RoomRole, bool), Response> {
    let token_role = RoomRole::from_token(claims.role);
    let degraded = (token_role, token_role.may_publish());
    let publishing = kind == SessionKind::Whip;
    let fail_closed = || {
        st.sessions.leave(pid);
        st.metrics.whip_refused_origin_unavailable();
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "origin_unavailable",
            "the room authority cannot be reached; publishing needs it, try again shortly",
        )
    };
    let rx = st.sessions.join(
        JoinRequest {
            participant: pid,
            room: claims.room,
            user: claims.sub.clone(),
            name: display_name(claims),
            role: claims.role,
            kind,
        },
        claims,
        None,
    );
    let mut rx = rx;
    if !st.sessions.is_link_up() {
        // Refusals known locally (banned, ended) are already decided.
        return match rx.try_recv() {
            Ok(JoinOutcome::Refused(r)) if r.code != "unavailable" => Err(refusal_response(&r)),
            _ if publishing => {
                tracing::warn!(room = %claims.room, participant = %pid, "origin link down: publishing refused");
                Err(fail_closed())
            }
            _ => Ok(degraded),
        };
    }
    match tokio::time::timeout(JOIN_WAIT, rx).await {
        Ok(Ok(JoinOutcome::Joined(view))) => {
            let p = view.state.participants.iter().find(|p| p.id == pid);
            let role = p.map_or(token_role, |p| p.role);
            Ok((role, role.may_publish() && !p.is_some_and(|p| p.muted)))
        }
        Ok(Ok(JoinOutcome::Refused(r))) if r.code == "unavailable" && publishing => {
            Err(fail_closed())
        }
        Ok(Ok(JoinOutcome::Refused(r))) if r.code == "unavailable" => Ok(degraded),
        Ok(Ok(JoinOutcome::Refused(r))) => Err(refusal_response(&r)),
        Ok(Err(_)) | Err(_) if publishing => {
            tracing::warn!(room = %claims.room, participant = %pid, "room authority did not answer: publishing refused");
            Err(fail_closed())
        }
        Ok(Err(_)) | Err(_) => {
            tracing::warn!(room = %claims.room, participant = %pid, "room authority did not answer; listening with the token role until it does");
            Ok(degraded)
        }
    }
}

fn created(kind: &str, room: RoomId, session: &str, ufrag: &str, answer: String) -> Response {
    let location = format!("/{kind}/{room}/{session}");
    let mut resp = (StatusCode::CREATED, answer).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/sdp"),
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{ufrag}\"")) {
        h.insert(header::ETAG, v);
    }
    resp
}

async fn whip_post(
    State(st): State<Arc<AppState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let room = match parse_room(&room) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let claims = match authorize(&st, &headers, room) {
        Ok(c) => c,
        Err(message) => return unauthorized(message),
    };
    if claims.room == room && !claims.role.may_publish() {
        return api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this role may not publish audio",
        );
    }
    let (claims, bytes) = match check_post(&st, room, &headers, body).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let offer = match parse_whip_offer(&bytes) {
        Ok(o) => o,
        Err(e) => return offer_error(e),
    };
    let participant = match allocate(&st) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let (role, may_send) = match join_http(&st, participant, &claims, SessionKind::Whip).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let fail = |resp: Response| {
        st.sessions.leave(participant);
        resp
    };
    if !role.may_publish() {
        return fail(api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a listener may not publish audio",
        ));
    }
    let (rtc, ufrag, answer, offer_sdp) = match answer_offer(&st, offer) {
        Ok(x) => x,
        Err(resp) => return fail(resp),
    };
    let answer = crate::sdpfrag::http_answer(&answer, true);
    let session = MediaShards::session_id(st.media.pick());
    let peer = NewPeer {
        session: session.clone(),
        ufrag: ufrag.clone(),
        rtc,
        room,
        participant,
        name: display_name(&claims),
        jti: claims.jti.clone(),
        kind: SessionKind::Whip,
        publishing: true,
        may_send,
        slots: Vec::new(),
        offer_sdp,
    };
    if let Err(resp) = add_peer(&st, peer).await {
        return fail(resp);
    }
    st.metrics.whip_session_created();
    tracing::info!(%room, %participant, "whip session created");
    created("whip", room, &session, &ufrag, answer)
}

async fn whep_post(
    State(st): State<Arc<AppState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let room = match parse_room(&room) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let (claims, bytes) = match check_post(&st, room, &headers, body).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    if st.occupancy.is_full() {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "this edge serves its maximum of interactive listeners; listen over HLS",
        );
    }
    let offer = match parse_client_offer(&bytes) {
        Ok(o) => o,
        Err(e) => return offer_error(e),
    };
    if offer.sends_audio {
        return api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "WHEP is receive-only: the offer must not send audio (publish with WHIP)",
        );
    }
    if offer.slots.is_empty() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_sdp",
            "the offer has no recvonly Opus audio m-line",
        );
    }
    let participant = match allocate(&st) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    if let Err(resp) = join_http(&st, participant, &claims, SessionKind::Whep).await {
        return resp;
    }
    let fail = |resp: Response| {
        st.sessions.leave(participant);
        resp
    };
    let slots = offer.slots.clone();
    let (rtc, ufrag, answer, offer_sdp) = match answer_offer(&st, offer.offer) {
        Ok(x) => x,
        Err(resp) => return fail(resp),
    };
    let answer = crate::sdpfrag::http_answer(&answer, false);
    let session = MediaShards::session_id(st.media.pick());
    let peer = NewPeer {
        session: session.clone(),
        ufrag: ufrag.clone(),
        rtc,
        room,
        participant,
        name: display_name(&claims),
        jti: claims.jti.clone(),
        kind: SessionKind::Whep,
        publishing: false,
        may_send: false,
        slots,
        offer_sdp,
    };
    if let Err(resp) = add_peer(&st, peer).await {
        return fail(resp);
    }
    st.metrics.whep_session_created();
    tracing::info!(%room, %participant, "whep session created");
    created("whep", room, &session, &ufrag, answer)
}

async fn whep_delete(
    st: State<Arc<AppState>>,
    path: Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    delete_session(st, path, headers, "no such WHEP session").await
}

async fn whip_delete(
    st: State<Arc<AppState>>,
    path: Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    delete_session(st, path, headers, "no such WHIP session").await
}

async fn delete_session(
    State(st): State<Arc<AppState>>,
    Path((room, session)): Path<(String, String)>,
    headers: HeaderMap,
    missing: &'static str,
) -> Response {
    let not_found = || api_error(StatusCode::NOT_FOUND, "not_found", missing);
    let Ok(room) = room.parse::<RoomId>() else {
        return not_found();
    };
    let claims = match authorize(&st, &headers, room) {
        Ok(c) => c,
        Err(message) => return unauthorized(message),
    };
    if claims.room != room {
        return api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token is for another room",
        );
    }
    let Some(shard) = st.media.shard_of(&session) else {
        return not_found();
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    let cmd = MediaCommand::Remove {
        session,
        room,
        jti: claims.jti,
        reply: reply_tx,
    };
    if st.media.send(shard, cmd).await.is_err() {
        return not_found();
    }
    match reply_rx.await {
        Ok(RemoveOutcome::Removed) => StatusCode::OK.into_response(),
        Ok(RemoveOutcome::Forbidden) => api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the session belongs to another token",
        ),
        Ok(RemoveOutcome::NotFound) | Err(_) => not_found(),
    }
}

/// `PATCH` on a WHIP or WHEP session (RFC 9725 §4.3): an `application/trickle-ice-sdpfrag` with
/// new `ice-ufrag`/`ice-pwd` restarts ICE (200 with the edge's new credentials and candidate, and
/// a new ETag); one with only candidates, or with the client's current credentials, is a trickle
/// answered 204 without a body (the ICE-lite edge learns client addresses from their checks).
/// `If-Match` is required (428) and must be `*` or the session's current ETag (412).
async fn whip_patch(
    State(st): State<Arc<AppState>>,
    Path((room, session)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let not_found = || api_error(StatusCode::NOT_FOUND, "not_found", "no such session");
    let Ok(room) = room.parse::<RoomId>() else {
        return not_found();
    };
    let claims = match authorize(&st, &headers, room) {
        Ok(c) => c,
        Err(message) => return unauthorized(message),
    };
    let is_fragment = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/trickle-ice-sdpfrag")
        });
    if !is_fragment {
        return api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "PATCH takes an application/trickle-ice-sdpfrag body",
        );
    }
    let body = match axum::body::to_bytes(body, crate::sdpfrag::MAX_FRAGMENT_LEN).await {
        Ok(b) => b,
        Err(_) => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the fragment is larger than 16 KiB",
            )
        }
    };
    let fragment = match crate::sdpfrag::parse_fragment(&body) {
        Ok(f) => f,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "bad_sdpfrag", e.to_string()),
    };
    let if_match = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string());
    let Some(shard) = st.media.shard_of(&session) else {
        return not_found();
    };
    let outcome = patch_session(&st, shard, session, room, claims, if_match, fragment).await;
    match outcome {
        Ok(PatchOutcome::Trickled) => StatusCode::NO_CONTENT.into_response(),
        Ok(PatchOutcome::Restarted { fragment, etag }) => {
            let mut resp = (StatusCode::OK, fragment).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/trickle-ice-sdpfrag"),
            );
            if let Ok(v) = HeaderValue::from_str(&etag) {
                h.insert(header::ETAG, v);
            }
            resp
        }
        Ok(PatchOutcome::PreconditionRequired) => api_error(
            StatusCode::PRECONDITION_REQUIRED,
            "precondition_required",
            "PATCH needs If-Match with the session's ETag (or * for an ICE restart)",
        ),
        Ok(PatchOutcome::PreconditionFailed) => api_error(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            "If-Match does not name this session's current ETag",
        ),
        Ok(PatchOutcome::Refused(message)) => {
            tracing::debug!(%message, "ICE restart refused");
            api_error(
                StatusCode::BAD_REQUEST,
                "bad_sdpfrag",
                "the ICE restart could not be applied",
            )
        }
        Ok(PatchOutcome::Forbidden) => api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the session belongs to another token",
        ),
        Ok(PatchOutcome::NotFound) | Err(ShardsGone) => not_found(),
        Ok(PatchOutcome::RefreshNeeded { .. }) => api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the session belongs to another token",
        ),
    }
}

/// Send a `PATCH` to the session's shard. When the request's token is not the session's, the
/// shard answers [`PatchOutcome::RefreshNeeded`]: signaling moves the participant's session to
/// the new token (refused: 403), then the `PATCH` is sent again, marked refreshed.
async fn patch_session(
    st: &AppState,
    shard: usize,
    session: String,
    room: RoomId,
    claims: Claims,
    if_match: Option<String>,
    fragment: IceFragment,
) -> Result<PatchOutcome, ShardsGone> {
    let mut refreshed = false;
    for _ in 0..2 {
        let (reply, outcome) = oneshot::channel();
        let cmd = MediaCommand::Patch {
            session: session.clone(),
            room,
            claims: Box::new(claims.clone()),
            refreshed,
            if_match: if_match.clone(),
            fragment: fragment.clone(),
            reply,
        };
        st.media.send(shard, cmd).await?;
        match outcome.await.map_err(|_| ShardsGone)? {
            PatchOutcome::RefreshNeeded { participant } if !refreshed => {
                if let Err(r) = st.sessions.refresh(participant, &claims, now_unix()) {
                    tracing::info!(%room, %participant, code = r.code, "token refresh refused");
                    return Ok(PatchOutcome::Forbidden);
                }
                tracing::info!(%room, %participant, "token refreshed");
                refreshed = true;
            }
            other => return Ok(other),
        }
    }
    Ok(PatchOutcome::Forbidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing_is_strict() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc.def"),
        );
        assert_eq!(bearer(&h), Some("abc.def"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  x"));
        assert_eq!(bearer(&h), Some("x"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn content_type_must_be_sdp() {
        let mut h = HeaderMap::new();
        assert!(!is_sdp(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/SDP; charset=utf-8"),
        );
        assert!(is_sdp(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_sdp(&h));
    }

    #[test]
    fn options_follow_rfc_9725() {
        let r = preflight(true);
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_METHODS], "POST, OPTIONS");
        assert_eq!(h["accept-post"], "application/sdp");
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "Authorization, Content-Type, If-Match"
        );
        assert!(!h.contains_key(header::LINK), "no ICE servers configured");
        let r = preflight(false);
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_METHODS],
            "PATCH, DELETE, OPTIONS"
        );
        assert_eq!(h["accept-patch"], "application/trickle-ice-sdpfrag");
        assert!(!h.contains_key("accept-post"));
        assert!(!h.contains_key(header::LINK));
    }

    #[test]
    fn whip_answer_to_a_sendrecv_offer_is_recvonly_rtcp_mux_only() {
        crate::install_crypto_provider();
        let offer = crate::offer::tests::offer_sdp(
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "a=rtpmap:111 opus/48000/2\r\n",
            "sendrecv",
        );
        let offer = parse_whip_offer(offer.as_bytes()).unwrap();
        let mut rtc =
            crate::admission::publisher_rtc(str0m::IceCreds::new(), std::time::Instant::now());
        let answer = rtc.sdp_api().accept_offer(offer).unwrap().to_sdp_string();
        // str0m mirrors the direction and writes no rtcp-mux-only: the fix-up is needed.
        assert!(answer.contains("a=sendrecv"), "{answer}");
        assert!(!answer.contains("a=rtcp-mux-only"), "{answer}");
        let fixed = crate::sdpfrag::http_answer(&answer, true);
        assert!(fixed.contains("a=recvonly\r\n"), "{fixed}");
        assert!(!fixed.contains("a=sendrecv"), "{fixed}");
        assert!(
            fixed.contains("a=rtcp-mux\r\na=rtcp-mux-only\r\n"),
            "{fixed}"
        );
        // The fixed answer is still SDP str0m reads.
        assert!(str0m::change::SdpAnswer::from_sdp_string(&fixed).is_ok());
    }
}
