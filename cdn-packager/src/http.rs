//! The HTTP origin: `/hls/...` with blocking playlist reload and blocking preload-hinted parts,
//! `/metrics`, `/healthz`. This is the hyper/axum service of the HTTPS listener and of whatever
//! the plain listener's HTTP/1.1 front ([`crate::h1`]) does not answer itself; the front answers
//! other `/hls/` requests with [`hls`] too.

use crate::m4a::RECORDING_M4A;
use crate::metrics::{GaugeGuard, Metrics};
use crate::playlist::{main_renditions, render_multivariant};
use crate::recordings::{authorises, Access, ControlError, Recordings};
use crate::request::{
    decide_reload, parse_hls_path, parse_hls_query, parse_range, query_sig, HlsResource,
    RangeAnswer, ReloadDecision,
};
use crate::room::{key, Registry, RoomHandle};
use crate::snapshot::{
    Snapshot, BLOCKING_PLAYLIST_CACHE, BLOCK_TIMEOUT, PLAYLIST_TYPE, PUBLISHED_HEADER,
};
use crate::storage::Storage;
use amphi_protocol::api::ApiError;
use amphi_protocol::token::RecordingAction;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{header, HeaderValue, Method, StatusCode};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

const MEDIA_TYPE: &str = crate::storage::content_type::MEDIA;
const IMMUTABLE: &str = crate::storage::IMMUTABLE;
/// Live playlists without delivery directives: about half a part (CDNs round to a second).
const PLAYLIST_CACHE: &str = "max-age=1";
/// Recordings do not change once written.
const VOD_CACHE: &str = "max-age=60";
/// `Retry-After` of a known room without media: one target duration.
const RETRY_AFTER_SECS: &str = "2";

/// Shared state of the HTTP handlers.
pub struct HttpState {
    /// Rooms.
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled on shutdown: held requests give up.
    pub shutdown: CancellationToken,
    /// Who may read recordings; publishing and deleting them.
    pub recordings: Arc<Recordings>,
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
    response(
        status,
        "application/json",
        "no-store",
        Body::from(error_body(code, message)),
    )
}

/// The JSON body of an error answer.
fn error_body(code: &str, message: impl Into<String>) -> Vec<u8> {
    serde_json::to_vec(&ApiError::new(code, message)).unwrap_or_default()
}

async fn handle(State(st): State<Arc<HttpState>>, req: Request) -> Response {
    if req.method() == Method::POST {
        if let Some(rest) = req.uri().path().strip_prefix("/recordings/") {
            return recording_control(&st, rest, req.headers()).await;
        }
    }
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
            amphi_common::metrics::CONTENT_TYPE,
            "no-store",
            Body::from(st.metrics.render()),
        ),
        _ if path.starts_with("/hls/") => {
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok());
            hls(&st, path, req.uri().query().unwrap_or(""), range).await
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such resource"),
    }
}

/// Answer a request under `/hls/` (`path` and `query` raw, as sent; `range`: the `Range`
/// header, honoured for the recording's file).
pub async fn hls(st: &HttpState, path: &str, query: &str, range: Option<&str>) -> Response {
    let Ok(p) = parse_hls_path(path) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such HLS resource");
    };
    let room = p.room;
    if st.recordings.deleted(room) {
        return recording_deleted();
    }
    let handle = st.registry.get(room);
    if handle.is_none() && !st.registry.may_have(room) {
        // Never open here, nothing stored from before: no storage read (random room ids
        // must not turn into S3 GETs).
        return error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            format!("no HLS output for room {room}"),
        );
    }
    // A recording is private until its host publishes it (then public), gone once deleted.
    let sig = query_sig(query);
    if p.resource.is_recording() {
        match st
            .recordings
            .access(&st.registry, room, sig, now_unix())
            .await
        {
            Ok(Access::Allowed) => {}
            Ok(Access::Private) => {
                return error(
                    StatusCode::FORBIDDEN,
                    "recording_private",
                    "this recording is private until its host publishes it (use the signed URL)",
                )
            }
            Ok(Access::Deleted) => return recording_deleted(),
            Err(e) => {
                tracing::warn!(%room, error = %e, "storage read failed (recording access)");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "storage is unavailable",
                );
            }
        }
    }
    match p.resource {
        HlsResource::Multivariant => match &handle {
            // Players (and pages waiting for a room to become playable) see the room once it
            // has media, as with the media playlists.
            Some(h) if !h.rx.iter().any(|rx| rx.borrow().status.has_media()) => not_started(room),
            Some(h) => response(
                StatusCode::OK,
                PLAYLIST_TYPE,
                PLAYLIST_CACHE,
                Body::from(render_multivariant(
                    main_renditions(h.renditions),
                    "playlist.m3u8",
                )),
            ),
            None => room_playlist(st, &key(room, "index.m3u8"), PLAYLIST_CACHE).await,
        },
        HlsResource::CodecMultivariant(r) => match &handle {
            Some(h) => match h.renditions.iter().find(|x| x.dir == r.dir()) {
                Some(_) if !h.rx.iter().any(|rx| rx.borrow().status.has_media()) => {
                    not_started(room)
                }
                Some(rendition) => response(
                    StatusCode::OK,
                    PLAYLIST_TYPE,
                    PLAYLIST_CACHE,
                    Body::from(render_multivariant(
                        std::slice::from_ref(rendition),
                        "playlist.m3u8",
                    )),
                ),
                None => error(StatusCode::NOT_FOUND, "not_found", "no such rendition"),
            },
            None => {
                let k = key(room, &format!("index-{}.m3u8", r.dir()));
                room_playlist(st, &k, PLAYLIST_CACHE).await
            }
        },
        HlsResource::Recording => {
            let r = stored(st, &key(room, "recording.m3u8"), PLAYLIST_TYPE, VOD_CACHE).await;
            signed_multivariant(r, sig).await
        }
        HlsResource::CodecRecording(r) => {
            let k = key(room, &format!("recording-{}.m3u8", r.dir()));
            let r = stored(st, &k, PLAYLIST_TYPE, VOD_CACHE).await;
            signed_multivariant(r, sig).await
        }
        HlsResource::RecordingM4a => download(st, room, range).await,
        HlsResource::ChaptersJson => {
            let json = crate::storage::content_type::JSON;
            stored(
                st,
                &key(room, crate::chapters::CHAPTERS_JSON),
                json,
                VOD_CACHE,
            )
            .await
        }
        HlsResource::ChaptersVtt => {
            let vtt = crate::storage::content_type::VTT;
            stored(
                st,
                &key(room, crate::chapters::CHAPTERS_VTT),
                vtt,
                VOD_CACHE,
            )
            .await
        }
        HlsResource::Vod(r) => {
            stored(
                st,
                &format!("{room}/{}/vod.m3u8", r.dir()),
                PLAYLIST_TYPE,
                VOD_CACHE,
            )
            .await
        }
        HlsResource::MediaPlaylist(r) => {
            let q = match parse_hls_query(query) {
                Ok(q) => q,
                Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            };
            let Some((handle, ri)) = handle
                .as_ref()
                .and_then(|h| h.rendition_index(r.dir()).map(|i| (h, i)))
            else {
                // Not live in this process (ended before a restart): serve what is stored.
                return room_playlist(
                    st,
                    &format!("{room}/{}/playlist.m3u8", r.dir()),
                    PLAYLIST_CACHE,
                )
                .await;
            };
            let Some(msn) = q.msn else {
                return playlist_response(&handle.rx[ri].borrow(), q.skip, PLAYLIST_CACHE);
            };
            let mut rx = handle.rx[ri].clone();
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
                        Some(snap) => {
                            if let Ok(d) =
                                std::time::SystemTime::now().duration_since(snap.published_at)
                            {
                                st.metrics.observe_release(d);
                            }
                            playlist_response(&snap, q.skip, BLOCKING_PLAYLIST_CACHE)
                        }
                        None => {
                            st.metrics.blocking_timeouts.fetch_add(1, Ordering::Relaxed);
                            block_timed_out()
                        }
                    }
                }
            }
        }
        HlsResource::Init(..) | HlsResource::Segment(..) => {
            let key = p.resource.media_key(room).unwrap_or_default();
            object(st, handle.as_deref(), key).await
        }
        HlsResource::Part(r, msn, part, _) => {
            if let Some(h) = &handle {
                if let Some(ri) = h.rendition_index(r.dir()) {
                    wait_for_hinted_part(st, h, ri, msn, part).await;
                }
            }
            let key = p.resource.media_key(room).unwrap_or_default();
            object(st, handle.as_deref(), key).await
        }
    }
}

/// Seconds since the Unix epoch.
fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// 410 `recording_deleted`.
fn recording_deleted() -> Response {
    error(
        StatusCode::GONE,
        "recording_deleted",
        "the host deleted this recording",
    )
}

/// A recording's multivariant playlist fetched with a signed URL: its media playlist URIs carry
/// the same `sig`, so a player reaches them too.
async fn signed_multivariant(r: Response, sig: Option<&str>) -> Response {
    let Some(sig) = sig else { return r };
    if r.status() != StatusCode::OK {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "playlist too large",
        );
    };
    let text = String::from_utf8_lossy(&bytes);
    let signed = with_sig(&text, sig);
    // The signed copy must not be cached for others.
    parts.headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(signed))
}

/// `playlist` with `?sig=` appended to every URI line.
pub fn with_sig(playlist: &str, sig: &str) -> String {
    let mut out = String::with_capacity(playlist.len() + 8 * sig.len());
    for line in playlist.lines() {
        out.push_str(line);
        if !line.is_empty() && !line.starts_with('#') {
            out.push_str(if line.contains('?') { "&sig=" } else { "?sig=" });
            out.push_str(sig);
        }
        out.push('\n');
    }
    out
}

/// `GET /hls/{room}/recording.m4a`: the published file, with single byte ranges (206,
/// `Content-Range`; 416 past the end) and `Accept-Ranges: bytes`.
async fn download(st: &HttpState, room: amphi_protocol::RoomId, range: Option<&str>) -> Response {
    st.metrics.storage_reads.fetch_add(1, Ordering::Relaxed);
    let file = match st.registry.store().get(&key(room, RECORDING_M4A)).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no downloadable file (the host has not published this recording)",
            )
        }
        Err(e) => {
            tracing::warn!(%room, error = %e, "storage read failed");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "storage is unavailable",
            );
        }
    };
    let len = file.len() as u64;
    let cache = crate::storage::ObjectMeta::DOWNLOAD.cache_control;
    let mut r = match range.map_or(RangeAnswer::Full, |v| parse_range(v, len)) {
        RangeAnswer::Full => response(StatusCode::OK, MEDIA_TYPE, cache, Body::from(file)),
        RangeAnswer::Partial { start, end } => {
            let body = file.slice(start as usize..=end as usize);
            let mut r = response(
                StatusCode::PARTIAL_CONTENT,
                MEDIA_TYPE,
                cache,
                Body::from(body),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r
        }
        RangeAnswer::Unsatisfiable => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                "the range starts past the end of the file",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r
        }
    };
    r.headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    r
}

/// `POST /recordings/{room}/publish` and `POST /recordings/{room}/delete` (`rest` is what
/// follows `/recordings/`): the geo-router, for the room's host, with a grant of that action
/// for that room (`Authorization: Bearer`).
async fn recording_control(st: &HttpState, rest: &str, headers: &http::HeaderMap) -> Response {
    let Some((room, action)) = rest.split_once('/') else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such resource");
    };
    let Ok(room) = room.parse::<amphi_protocol::RoomId>() else {
        return error(StatusCode::NOT_FOUND, "not_found", "bad room id");
    };
    let act = match action {
        "publish" => RecordingAction::Publish,
        "delete" => RecordingAction::Delete,
        _ => return error(StatusCode::NOT_FOUND, "not_found", "no such resource"),
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let grant = match token {
        Some(t) => st.recordings.tokens.verify_grant(t, now_unix()),
        None => Err(amphi_protocol::token::TokenError::Malformed),
    };
    if !authorises(&grant, room, act) {
        tracing::info!(%room, ?act, "recording control refused: no valid grant");
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a grant of the geo-router for this room and action is required",
        );
    }
    let done = match act {
        RecordingAction::Delete => st.recordings.delete(&st.registry, room).await.map(
            |removed| serde_json::json!({ "room": room.to_string(), "removed_objects": removed }),
        ),
        _ => st.recordings.publish(&st.registry, room).await.map(|p| {
            serde_json::json!({
                "room": room.to_string(),
                "file": RECORDING_M4A,
                "bytes": p.m4a_bytes,
                "chapters": p.chapters,
            })
        }),
    };
    match done {
        Ok(body) => response(
            StatusCode::OK,
            "application/json",
            "no-store",
            Body::from(body.to_string()),
        ),
        Err(ControlError::Live) => error(StatusCode::CONFLICT, "room_live", "the room is live"),
        Err(ControlError::NotFound) => error(
            StatusCode::NOT_FOUND,
            "recording_not_found",
            "no recording of this room is stored",
        ),
        Err(ControlError::NoMedia(why)) => {
            error(StatusCode::CONFLICT, "recording_without_media", why)
        }
        Err(ControlError::Storage(e)) => {
            tracing::warn!(%room, error = %e, "recording control: storage failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "storage is unavailable",
            )
        }
    }
}

/// What a blocking request whose part did not appear within [`BLOCK_TIMEOUT`] is answered:
/// status, error code and message.
const BLOCK_TIMED_OUT: (StatusCode, &str, &str) = (
    StatusCode::SERVICE_UNAVAILABLE,
    "unavailable",
    "the requested segment or part did not appear in time",
);

/// The answer to a blocking request whose part did not appear within [`BLOCK_TIMEOUT`].
pub fn block_timed_out() -> Response {
    let (status, code, message) = BLOCK_TIMED_OUT;
    error(status, code, message)
}

/// [`block_timed_out`] as the bytes of a whole HTTP/1.1 response, for the fast path.
pub fn block_timed_out_bytes() -> bytes::Bytes {
    let (status, code, message) = BLOCK_TIMED_OUT;
    let (parts, _) = block_timed_out().into_parts();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_bytes()));
    amphi_protocol::h1::response_bytes_with(status, headers, &error_body(code, message), false)
}

fn part_published(s: &Snapshot, msn: u64, part: u32) -> bool {
    s.status.ended
        || s.status.current_msn > msn
        || (s.status.current_msn == msn && s.status.current_parts > part)
}

/// A request for the preload-hinted part is held until the part exists (rfc8216bis 6.2.6).
async fn wait_for_hinted_part(st: &HttpState, handle: &RoomHandle, ri: usize, msn: u64, part: u32) {
    let mut rx = handle.rx[ri].clone();
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

/// A room the packager knows (announced by the origin, or resumed) whose playlist lists no
/// media yet: 404 `room_not_started` with `Retry-After` (one target duration), so a player
/// polls again instead of giving up; CDNs must not cache it (`no-store`).
fn not_started(room: amphi_protocol::RoomId) -> Response {
    let mut r = error(
        StatusCode::NOT_FOUND,
        "room_not_started",
        format!("room {room} has no media yet"),
    );
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    r
}

fn playlist_response(s: &Snapshot, skip: bool, cache: &str) -> Response {
    if !s.status.has_media() {
        return not_started(s.room);
    }
    let text = match (&s.delta, skip) {
        (Some(d), true) => d.clone(),
        _ => s.full.clone(),
    };
    let mut r = response(StatusCode::OK, PLAYLIST_TYPE, cache, Body::from(text));
    if let Ok(d) = s.published_at.duration_since(std::time::UNIX_EPOCH) {
        if let Ok(v) = HeaderValue::from_str(&d.as_micros().to_string()) {
            r.headers_mut().insert(PUBLISHED_HEADER, v);
        }
    }
    r
}

/// A stored object: from the room's memory cache, else from storage.
async fn object(st: &HttpState, handle: Option<&RoomHandle>, key: String) -> Response {
    if let Some(b) = handle.and_then(|h| h.cached(&key)) {
        return response(StatusCode::OK, MEDIA_TYPE, IMMUTABLE, Body::from(b));
    }
    stored(st, &key, MEDIA_TYPE, IMMUTABLE).await
}

/// A stored playlist of a room this process does not have live; 404 `room_not_found` if absent.
async fn room_playlist(st: &HttpState, key: &str, cache: &str) -> Response {
    let r = stored(st, key, PLAYLIST_TYPE, cache).await;
    if r.status() == StatusCode::NOT_FOUND {
        let room = key.split('/').next().unwrap_or("");
        return error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            format!("no HLS output for room {room}"),
        );
    }
    r
}

async fn stored(st: &HttpState, key: &str, content_type: &str, cache: &str) -> Response {
    st.metrics.storage_reads.fetch_add(1, Ordering::Relaxed);
    match st.registry.store().get(key).await {
        Ok(Some(b)) => response(StatusCode::OK, content_type, cache, Body::from(b)),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", "no such HLS resource"),
        Err(e) => {
            tracing::warn!(key, error = %e, "storage read failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "storage is unavailable",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_multivariant_signs_its_media_playlist_uris_only() {
        let mv = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS=\"opus\"\nopus/vod.m3u8\n\
                  #EXT-X-STREAM-INF:BANDWIDTH=1\naac/vod.m3u8?x=1\n";
        let signed = with_sig(mv, "g.h.i");
        assert_eq!(
            signed,
            "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS=\"opus\"\nopus/vod.m3u8?sig=g.h.i\n\
             #EXT-X-STREAM-INF:BANDWIDTH=1\naac/vod.m3u8?x=1&sig=g.h.i\n"
        );
    }
}
