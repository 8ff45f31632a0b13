//! The edge's HTTP listener: WHIP (RFC 9725) ingest, CORS, `/metrics`, `/healthz`.

use crate::lifecycle::{ParticipantIds, RoomCache, RoomStatusAnswer};
use crate::media::{MediaCommand, NewPeer, RemoveOutcome};
use crate::metrics::Metrics;
use crate::offer::{parse_whip_offer, MAX_OFFER_LEN};
use amphi_protocol::api::{ApiError, RoomInfo, RoomStatus};
use amphi_protocol::token::{Claims, TokenVerifier};
use amphi_protocol::RoomId;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use str0m::{Candidate, IceCreds, Rtc};
use tokio::sync::{mpsc, oneshot};

/// How long a positive "room is live" answer from the geo-router is trusted.
pub const ROOM_CACHE_TTL: Duration = Duration::from_secs(5);
/// Timeout of one geo-router lookup.
const ROUTER_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest geo-router answer read.
const MAX_ROUTER_BODY: usize = 64 * 1024;

/// Shared state of the HTTP handlers.
pub(crate) struct AppState {
    pub tokens: TokenVerifier,
    pub candidate: SocketAddr,
    pub media_tx: mpsc::Sender<MediaCommand>,
    pub rooms: Arc<Mutex<RoomCache>>,
    pub router: RouterClient,
    pub metrics: Arc<Metrics>,
    pub ids: Mutex<ParticipantIds>,
}

/// Asks the geo-router whether rooms exist.
pub(crate) struct RouterClient {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl RouterClient {
    pub(crate) fn new(base: &str) -> Self {
        RouterClient {
            base: base.trim_end_matches('/').to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn room_status(&self, room: RoomId) -> Result<RoomStatusAnswer, String> {
        let uri = format!("{}/v1/rooms/{room}", self.base);
        let req = http::Request::get(uri)
            .header(header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(ROUTER_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| "geo-router timed out".to_string())?
            .map_err(|e| e.to_string())?;
        match resp.status() {
            StatusCode::OK => {
                let body = Limited::new(resp.into_body(), MAX_ROUTER_BODY)
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                let info: RoomInfo = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                if info.room == room && info.status == RoomStatus::Live {
                    Ok(RoomStatusAnswer::Live)
                } else {
                    Ok(RoomStatusAnswer::Gone)
                }
            }
            StatusCode::NOT_FOUND => Ok(RoomStatusAnswer::Gone),
            s => Err(format!("geo-router answered {s}")),
        }
    }
}

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
        .layer(axum::middleware::map_response(cors));
    Router::new()
        .merge(whip)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
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
        HeaderValue::from_static("Location, ETag, Link"),
    );
    resp
}

fn preflight(endpoint: bool) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, DELETE, PATCH, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, If-Match"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    if endpoint {
        h.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
        h.insert("accept-post", HeaderValue::from_static("application/sdp"));
    } else {
        h.insert(
            header::ALLOW,
            HeaderValue::from_static("DELETE, PATCH, OPTIONS"),
        );
    }
    resp
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

/// A JSON `ApiError` response.
fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::to_vec(&ApiError::new(code, message)).unwrap_or_default();
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
    st.tokens.verify(token, now_unix()).map_err(|e| {
        tracing::info!(%room, reason = %e, "token refused");
        format!("invalid token: {e}")
    })
}

fn unauthorized(message: String) -> Response {
    api_error(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

async fn room_is_live(st: &AppState, room: RoomId) -> Result<bool, String> {
    let cached = st
        .rooms
        .lock()
        .map_err(|_| "room cache poisoned".to_string())?
        .lookup(room, Instant::now());
    if cached == Some(RoomStatusAnswer::Live) {
        return Ok(true);
    }
    let answer = st.router.room_status(room).await?;
    if let Ok(mut c) = st.rooms.lock() {
        c.record(room, answer, Instant::now());
    }
    Ok(answer == RoomStatusAnswer::Live)
}

fn is_sdp(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/sdp"))
}

fn new_session_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Build the edge's `Rtc` for one WHIP publisher: ICE-lite, RTP mode, Opus only.
pub(crate) fn publisher_rtc(creds: IceCreds, now: Instant) -> Rtc {
    Rtc::builder()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
        .set_local_ice_credentials(creds)
        .build(now)
}

async fn whip_post(
    State(st): State<Arc<AppState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(room) = room.parse::<RoomId>() else {
        return api_error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            "room ids are 16 hex digits",
        );
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
    if !claims.role.may_publish() {
        return api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this role may not publish audio",
        );
    }
    match room_is_live(&st, room).await {
        Ok(true) => {}
        Ok(false) => {
            return api_error(
                StatusCode::NOT_FOUND,
                "room_not_found",
                "the room does not exist or has ended",
            )
        }
        Err(e) => {
            tracing::warn!(%room, error = %e, "geo-router lookup failed");
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "router_unavailable",
                "cannot check the room right now",
            );
        }
    }
    if !is_sdp(&headers) {
        return api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be an SDP offer with Content-Type: application/sdp",
        );
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
        return too_large();
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_OFFER_LEN).await else {
        return too_large();
    };
    let offer = match parse_whip_offer(&bytes) {
        Ok(o) => o,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return api_error(status, e.code(), e.to_string());
        }
    };

    let creds = IceCreds::new();
    let ufrag = creds.ufrag.clone();
    let mut rtc = publisher_rtc(creds, Instant::now());
    let candidate = match Candidate::host(st.candidate, "udp") {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(candidate = %st.candidate, error = %e, "bad media candidate address");
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "media address misconfigured",
            );
        }
    };
    rtc.add_local_candidate(candidate);
    let answer = match rtc.sdp_api().accept_offer(offer) {
        Ok(a) => a,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "bad_sdp", e.to_string()),
    };
    let participant = match st.ids.lock() {
        Ok(mut ids) => ids.allocate(),
        Err(_) => {
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "id allocator poisoned",
            )
        }
    };
    let session = new_session_id();
    let name: String = claims
        .name
        .chars()
        .take(amphi_protocol::api::MAX_NAME_CHARS)
        .collect();
    let (reply_tx, reply_rx) = oneshot::channel();
    let cmd = MediaCommand::Add {
        peer: Box::new(NewPeer {
            session: session.clone(),
            ufrag: ufrag.clone(),
            rtc,
            room,
            participant,
            name,
            jti: claims.jti.clone(),
            publishing: true,
        }),
        reply: reply_tx,
    };
    let unavailable = || {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the media engine is not accepting peers",
        )
    };
    if st.media_tx.send(cmd).await.is_err() {
        return unavailable();
    }
    match reply_rx.await {
        Ok(Ok(())) => {}
        _ => return unavailable(),
    }
    st.metrics.whip_session_created();
    tracing::info!(%room, %participant, "whip session created");
    let location = format!("/whip/{room}/{session}");
    let mut resp = (StatusCode::CREATED, answer.to_sdp_string()).into_response();
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

async fn whip_delete(
    State(st): State<Arc<AppState>>,
    Path((room, session)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let not_found = || api_error(StatusCode::NOT_FOUND, "not_found", "no such WHIP session");
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
    let (reply_tx, reply_rx) = oneshot::channel();
    let cmd = MediaCommand::Remove {
        session,
        room,
        jti: claims.jti,
        reply: reply_tx,
    };
    if st.media_tx.send(cmd).await.is_err() {
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

async fn whip_patch() -> Response {
    let mut resp = api_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "trickle ICE and ICE restarts are not supported: the answer carries every candidate",
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("DELETE, OPTIONS"));
    resp
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
    fn session_ids_are_128_bit_hex_and_distinct() {
        let a = new_session_id();
        let b = new_session_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn preflight_lists_methods_and_headers() {
        let r = preflight(true);
        let methods = r.headers()[header::ACCESS_CONTROL_ALLOW_METHODS]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(methods, "POST, DELETE, PATCH, OPTIONS");
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "Authorization, Content-Type, If-Match"
        );
    }
}
