//! The HTTP origin: `/hls/...` with blocking playlist reload and blocking preload-hinted parts,
//! `/metrics`, `/healthz`.

use crate::metrics::{GaugeGuard, Metrics};
use crate::playlist::{part_name, render_multivariant, segment_name, RENDITIONS, TARGET_DURATION};
use crate::request::{decide_reload, parse_hls_path, parse_hls_query, HlsResource, ReloadDecision};
use crate::room::{room_dir, Registry, RoomHandle, Snapshot};
use amphi_protocol::api::ApiError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{header, HeaderValue, Method, StatusCode};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a blocking request is held: three target durations (rfc8216bis 6.2.5.2).
pub const BLOCK_TIMEOUT: Duration = Duration::from_secs(3 * TARGET_DURATION as u64);

const PLAYLIST_TYPE: &str = "application/vnd.apple.mpegurl";
const MEDIA_TYPE: &str = "video/mp4";
const IMMUTABLE: &str = "max-age=31536000, immutable";
const PLAYLIST_CACHE: &str = "max-age=1";
const BLOCKING_PLAYLIST_CACHE: &str = "max-age=6";

/// Shared state of the HTTP handlers.
pub struct HttpState {
    /// Rooms.
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled on shutdown: held requests give up.
    pub shutdown: CancellationToken,
}

/// The router: one fallback handler that dispatches on the raw path.
pub fn router(state: Arc<HttpState>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(state)
}

fn response(status: StatusCode, content_type: &str, cache: &str, body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(cache) {
        h.insert(header::CACHE_CONTROL, v);
    }
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::to_vec(&ApiError::new(code, message)).unwrap_or_default();
    response(status, "application/json", "no-store", Body::from(body))
}

async fn handle(State(st): State<Arc<HttpState>>, req: Request) -> Response {
    match *req.method() {
        Method::GET | Method::HEAD => {}
        Method::OPTIONS => {
            let mut r = response(
                StatusCode::NO_CONTENT,
                "text/plain",
                "max-age=86400",
                Body::empty(),
            );
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, HEAD, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("*"),
            );
            return r;
        }
        _ => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "only GET and HEAD",
            )
        }
    }
    let path = req.uri().path();
    match path {
        "/healthz" => response(StatusCode::OK, "text/plain", "no-store", Body::from("ok\n")),
        "/metrics" => response(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            "no-store",
            Body::from(st.metrics.render()),
        ),
        _ if path.starts_with("/hls/") => hls(&st, path, req.uri().query().unwrap_or("")).await,
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such resource"),
    }
}

async fn hls(st: &HttpState, path: &str, query: &str) -> Response {
    let Ok(p) = parse_hls_path(path) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such HLS resource");
    };
    let room = p.room;
    let handle = st.registry.get(room);
    let base = room_dir(st.registry.data_dir(), room);
    match p.resource {
        HlsResource::Multivariant => {
            if handle.is_some()
                || tokio::fs::try_exists(base.join("index.m3u8"))
                    .await
                    .unwrap_or(false)
            {
                response(
                    StatusCode::OK,
                    PLAYLIST_TYPE,
                    PLAYLIST_CACHE,
                    Body::from(render_multivariant(RENDITIONS)),
                )
            } else {
                room_not_found(room)
            }
        }
        HlsResource::MediaPlaylist(r) => {
            let q = match parse_hls_query(query) {
                Ok(q) => q,
                Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            };
            let Some(handle) = handle else {
                // Not live in this process (e.g. before a restart): serve what is on disk.
                return match tokio::fs::read(base.join(r.dir()).join("playlist.m3u8")).await {
                    Ok(b) => response(StatusCode::OK, PLAYLIST_TYPE, PLAYLIST_CACHE, Body::from(b)),
                    Err(_) => room_not_found(room),
                };
            };
            let Some(msn) = q.msn else {
                return playlist_response(&handle.rx.borrow(), q.skip, PLAYLIST_CACHE);
            };
            let mut rx = handle.rx.clone();
            let decision = decide_reload(msn, q.part, &rx.borrow().status);
            match decision {
                ReloadDecision::Ready => {
                    playlist_response(&rx.borrow(), q.skip, BLOCKING_PLAYLIST_CACHE)
                }
                ReloadDecision::TooFar => error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("_HLS_msn={msn} is too far ahead of the live edge"),
                ),
                ReloadDecision::Wait => {
                    let _g = GaugeGuard::new(&st.metrics.blocking_in_flight);
                    let waited = tokio::select! {
                        r = tokio::time::timeout(
                            BLOCK_TIMEOUT,
                            rx.wait_for(|s| decide_reload(msn, q.part, &s.status) != ReloadDecision::Wait),
                        ) => r.ok().and_then(|r| r.ok().map(|s| s.clone())),
                        _ = st.shutdown.cancelled() => None,
                    };
                    match waited {
                        Some(snap) => playlist_response(&snap, q.skip, BLOCKING_PLAYLIST_CACHE),
                        None => {
                            st.metrics.blocking_timeouts.fetch_add(1, Ordering::Relaxed);
                            error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "unavailable",
                                "the requested segment or part did not appear in time",
                            )
                        }
                    }
                }
            }
        }
        HlsResource::Init(r) => file(base.join(r.dir()).join("init.mp4")).await,
        HlsResource::Segment(r, msn) => file(base.join(r.dir()).join(segment_name(msn))).await,
        HlsResource::Part(r, msn, part) => {
            let path = base.join(r.dir()).join(part_name(msn, part));
            if let Some(handle) = handle {
                wait_for_hinted_part(st, &handle, msn, part).await;
            }
            file(path).await
        }
    }
}

fn part_published(s: &Snapshot, msn: u64, part: u32) -> bool {
    s.status.ended
        || s.status.current_msn > msn
        || (s.status.current_msn == msn && s.status.current_parts > part)
}

/// A request for the preload-hinted part is held until the part exists (rfc8216bis 6.2.6).
async fn wait_for_hinted_part(st: &HttpState, handle: &RoomHandle, msn: u64, part: u32) {
    let mut rx = handle.rx.clone();
    let hinted_and_missing = {
        let s = rx.borrow();
        s.hint == Some((msn, part)) && !part_published(&s, msn, part)
    };
    if !hinted_and_missing {
        return;
    }
    let _g = GaugeGuard::new(&st.metrics.blocking_in_flight);
    tokio::select! {
        _ = tokio::time::timeout(BLOCK_TIMEOUT, rx.wait_for(|s| part_published(s, msn, part))) => {}
        _ = st.shutdown.cancelled() => {}
    }
}

fn playlist_response(s: &Snapshot, skip: bool, cache: &str) -> Response {
    let text = match (&s.delta, skip) {
        (Some(d), true) => d.clone(),
        _ => s.full.clone(),
    };
    response(StatusCode::OK, PLAYLIST_TYPE, cache, Body::from(text))
}

fn room_not_found(room: amphi_protocol::RoomId) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "room_not_found",
        format!("no HLS output for room {room}"),
    )
}

async fn file(path: std::path::PathBuf) -> Response {
    match tokio::fs::read(&path).await {
        Ok(b) => response(StatusCode::OK, MEDIA_TYPE, IMMUTABLE, Body::from(b)),
        Err(_) => error(StatusCode::NOT_FOUND, "not_found", "no such file"),
    }
}
