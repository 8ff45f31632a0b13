//! Room recordings: watching for one after a room ends (`recording_ready`),
//! `GET /v1/rooms/{id}/recording`, and the host's decision: `POST /v1/rooms/{id}/recording/publish`
//! (the packager writes the downloadable `recording.m4a` and makes the recording public;
//! `recording_published`) or `DELETE /v1/rooms/{id}/recording` (every object of it removed from
//! storage, the API answers 410 from then on; `recording_deleted`).
//!
//! The decision is stored first in the router's store (memory or Redis, no expiry), so a
//! restarted router keeps it; the packager is asked with a short-lived [`RecordingGrant`] signed
//! with the router's token key (`POST {packager_url}/recordings/{room}/{publish|delete}`,
//! `Authorization: Bearer`). Until the host decides, the host (or an API key) gets signed URLs
//! (`?sig=`, a read grant of [`SIGNED_URL_SECS`]) that a packager keeping recordings private
//! (`private_until_published`) requires.

use super::*;
use crate::store::RecordingDecision;
use amphi_protocol::token::{RecordingAction, RecordingGrant};
use http_body_util::BodyExt;

/// Lifetime of the signed URLs handed to the host for a private recording.
pub const SIGNED_URL_SECS: u64 = 3600;
/// Lifetime of the grant of one publish or delete request to the packager (and of the read
/// grant the router checks availability with).
const CONTROL_GRANT_SECS: u64 = 60;
/// Largest answer read from the packager's control endpoint.
const MAX_CONTROL_ANSWER: usize = 16 * 1024;

impl AppState {
    /// A grant of `act` on `room`'s recording, valid `secs` from now.
    fn recording_grant(&self, room: RoomId, act: RecordingAction, secs: u64) -> String {
        let now = now_unix();
        self.signer.sign_grant(&RecordingGrant {
            room,
            act,
            iat: now,
            exp: now + secs,
        })
    }
}

/// Whether the packager holds `room`'s VOD recording (`HEAD /hls/{room}/recording.m3u8`, with
/// a read grant so a private recording counts too).
pub(super) async fn recording_available(
    s: &AppState,
    room: RoomId,
) -> Result<bool, hyper_util::client::legacy::Error> {
    let sig = s.recording_grant(room, RecordingAction::Read, CONTROL_GRANT_SECS);
    let uri: Uri = format!(
        "{}/hls/{room}/recording.m3u8?sig={sig}",
        s.config.packager_url
    )
    .parse()
    .expect("room ids and grants make valid paths");
    let head = Request::builder()
        .method(Method::HEAD)
        .uri(uri)
        .body(Body::empty())
        .expect("valid request");
    Ok(s.hls_client.request(head).await?.status() == StatusCode::OK)
}

pub(super) fn recording_url(s: &AppState, room: RoomId) -> String {
    format!("{}/hls/{room}/recording.m3u8", s.hls_base())
}

/// After `room` ended: ask the packager every [`RECORDING_POLL`], for at most
/// [`RECORDING_WAIT`], whether its recording is there; when it is, emit `recording_ready` (once
/// over every replica sharing the store).
pub(super) async fn watch_recording(s: Shared, room: RoomId) {
    if s.webhooks.is_empty() {
        return;
    }
    let deadline = Instant::now() + RECORDING_WAIT;
    while Instant::now() < deadline {
        tokio::time::sleep(RECORDING_POLL).await;
        match recording_available(&s, room).await {
            Ok(true) => {
                match s.store.claim_once("recording_ready", room).await {
                    Ok(true) => {
                        tracing::info!(%room, "recording ready");
                        s.webhooks.emit(
                            EventKind::RecordingReady,
                            now_unix(),
                            serde_json::json!({ "room": room, "url": recording_url(&s, room) }),
                        );
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(%room, error = %e, "recording_ready not emitted"),
                }
                return;
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(%room, error = %e, "packager unreachable (recording)"),
        }
    }
    tracing::info!(%room, "no recording within the wait: no recording_ready");
}

/// 410 `recording_deleted`.
fn gone() -> Failure {
    error(
        StatusCode::GONE,
        "recording_deleted",
        "the host deleted this recording",
    )
}

/// The recording info: its URLs (with `sig` when `signed` is given), the downloadable file's
/// once published, and its status.
fn info(s: &AppState, room: RoomId, status: &str, sig: Option<&str>) -> serde_json::Value {
    let base = format!("{}/hls/{room}", s.hls_base());
    let q = sig.map_or(String::new(), |g| format!("?sig={g}"));
    let mut v = serde_json::json!({
        "room": room.to_string(),
        "status": status,
        "url": format!("{base}/recording.m3u8{q}"),
        "chapters_url": format!("{base}/chapters.json{q}"),
        "chapters_vtt_url": format!("{base}/chapters.vtt{q}"),
    });
    if status == RecordingDecision::Published.as_str() {
        v["download_url"] = format!("{base}/recording.m4a").into();
    }
    if sig.is_some() {
        v["expires_in_secs"] = SIGNED_URL_SECS.into();
    }
    v
}

/// `GET /v1/rooms/{id}/recording`: the URLs of the room's VOD recording (a multivariant
/// playlist of its Opus and AAC renditions) and of its speaker chapters, once the packager has
/// stored it; 410 once its host deleted it. `status` is `private` until the host decides, then
/// `published` (with `download_url`, the M4A file). A private recording's URLs are signed
/// (`?sig=`, [`SIGNED_URL_SECS`]) when the request acts for the room's host (Bearer host token
/// or API key signature).
pub(super) async fn recording(
    State(s): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Answer {
    let room = parse_room(&id)?;
    let decision = s.store.recording_decision(room).await?;
    if decision == Some(RecordingDecision::Deleted) {
        return Err(gone());
    }
    let host = if bearer(&headers).is_some() || headers.contains_key(crate::auth::KEY_HEADER) {
        s.host_or_api_key(room, &method, &uri, &headers, b"")
            .await?;
        true
    } else {
        false
    };
    match recording_available(&s, room).await {
        Ok(true) => {
            let published = decision == Some(RecordingDecision::Published);
            let sig = (host && !published)
                .then(|| s.recording_grant(room, RecordingAction::Read, SIGNED_URL_SECS));
            let status = if published { "published" } else { "private" };
            Ok(Json(info(&s, room, status, sig.as_deref())).into_response())
        }
        Ok(false) => Err(error(
            StatusCode::NOT_FOUND,
            "recording_not_found",
            "no recording for this room (it is live, or never had a program)",
        )),
        Err(e) => {
            tracing::warn!(error = %e, "packager unreachable for a recording lookup");
            Err(error(
                StatusCode::BAD_GATEWAY,
                "hls_unavailable",
                "HLS origin unreachable",
            ))
        }
    }
}

/// Ask the packager to carry out `act` on `room`'s recording; its JSON answer on success.
async fn packager_control(
    s: &AppState,
    room: RoomId,
    act: RecordingAction,
) -> Result<serde_json::Value, Failure> {
    let name = match act {
        RecordingAction::Publish => "publish",
        RecordingAction::Delete => "delete",
        RecordingAction::Read => "read",
    };
    let uri: Uri = format!("{}/recordings/{room}/{name}", s.config.packager_url)
        .parse()
        .expect("room ids make valid paths");
    let grant = s.recording_grant(room, act, CONTROL_GRANT_SECS);
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {grant}"))
        .body(Body::empty())
        .expect("valid request");
    let unreachable = |e: String| {
        tracing::warn!(%room, error = %e, "packager unreachable for a recording {name}");
        error(
            StatusCode::BAD_GATEWAY,
            "hls_unavailable",
            "HLS origin unreachable",
        )
    };
    let resp = s
        .hls_client
        .request(req)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_CONTROL_ANSWER)
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    match status {
        StatusCode::OK => Ok(answer),
        StatusCode::NOT_FOUND => Err(error(
            StatusCode::NOT_FOUND,
            "recording_not_found",
            "no recording of this room is stored (yet)",
        )),
        StatusCode::CONFLICT => Err(error(
            StatusCode::CONFLICT,
            "recording_unavailable",
            answer["message"]
                .as_str()
                .unwrap_or("the recording cannot be published")
                .to_string(),
        )),
        StatusCode::GONE => Err(gone()),
        other => {
            tracing::warn!(%room, status = %other, answer = %answer, "packager refused a recording {name}");
            Err(error(
                StatusCode::BAD_GATEWAY,
                "hls_unavailable",
                "the HLS origin could not do it",
            ))
        }
    }
}

/// The room of a host's decision: it must have ended (409 `room_live`); one the directory no
/// longer lists (ended long ago) is left to the packager.
async fn ended_room(s: &AppState, room: RoomId) -> Result<(), Failure> {
    match s.store.room(room).await? {
        Some(entry) if entry.ended_at.is_none() => Err(error(
            StatusCode::CONFLICT,
            "room_live",
            "the room has not ended: its recording is not written yet",
        )),
        _ => Ok(()),
    }
}

/// `POST /v1/rooms/{id}/recording/publish`: the room's host (or an API key) publishes its
/// recording: the packager writes `recording.m4a` (AAC-LC, chapters by speaker) and serves the
/// recording without a signature from then on. Publishing again rewrites the file; a deleted
/// recording answers 410.
pub(super) async fn publish_recording(
    State(s): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Answer {
    let room = parse_room(&id)?;
    let by = s
        .host_or_api_key(room, &method, &uri, &headers, b"")
        .await?;
    if s.store.recording_decision(room).await? == Some(RecordingDecision::Deleted) {
        return Err(gone());
    }
    ended_room(&s, room).await?;
    let done = packager_control(&s, room, RecordingAction::Publish).await?;
    let now = s
        .store
        .decide_recording(room, RecordingDecision::Published)
        .await?;
    if now == RecordingDecision::Deleted {
        // Deleted meanwhile: the deletion stands.
        return Err(gone());
    }
    let body = info(&s, room, now.as_str(), None);
    tracing::info!(%room, by, file_bytes = %done["bytes"], "recording published");
    if s.store.claim_once("recording_published", room).await? {
        let mut data = body.clone();
        data["by"] = by.into();
        s.webhooks
            .emit(EventKind::RecordingPublished, now_unix(), data);
    }
    Ok(Json(body).into_response())
}

/// `DELETE /v1/rooms/{id}/recording`: the room's host (or an API key) deletes its recording:
/// the decision is stored first (the API answers 410 from then on, whatever happens next), then
/// the packager removes every object of the room from storage. Repeating it repeats the
/// removal (after a packager failure, 502).
pub(super) async fn delete_recording(
    State(s): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Answer {
    let room = parse_room(&id)?;
    let by = s
        .host_or_api_key(room, &method, &uri, &headers, b"")
        .await?;
    ended_room(&s, room).await?;
    s.store
        .decide_recording(room, RecordingDecision::Deleted)
        .await?;
    let done = packager_control(&s, room, RecordingAction::Delete).await;
    let removed = match done {
        Ok(answer) => answer["removed_objects"].as_u64().unwrap_or(0),
        // Nothing stored (any more): deleted all the same.
        Err(f) if f.status == StatusCode::NOT_FOUND => 0,
        Err(f) => return Err(f),
    };
    tracing::info!(%room, by, removed, "recording deleted");
    if s.store.claim_once("recording_deleted", room).await? {
        s.webhooks.emit(
            EventKind::RecordingDeleted,
            now_unix(),
            serde_json::json!({ "room": room, "by": by, "removed_objects": removed }),
        );
    }
    Ok(Json(serde_json::json!({
        "room": room.to_string(),
        "status": RecordingDecision::Deleted.as_str(),
        "removed_objects": removed,
    }))
    .into_response())
}
