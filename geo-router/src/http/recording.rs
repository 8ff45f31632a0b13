//! Room recordings: watching for one after a room ends (`recording_ready`), and
//! `GET /v1/rooms/{id}/recording`.

use super::*;

/// Whether the packager holds `room`'s VOD recording (`HEAD /hls/{room}/recording.m3u8`).
pub(super) async fn recording_available(
    s: &AppState,
    room: RoomId,
) -> Result<bool, hyper_util::client::legacy::Error> {
    let uri: Uri = format!("{}/hls/{room}/recording.m3u8", s.config.packager_url)
        .parse()
        .expect("room ids make valid paths");
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

/// `GET /v1/rooms/{id}/recording`: the URL of the room's VOD recording (a multivariant
/// playlist of its Opus and AAC renditions) and of its speaker chapters (Podcasting 2.0 JSON
/// and WebVTT), once the packager has stored it.
pub(super) async fn recording(State(s): State<Shared>, Path(id): Path<String>) -> Answer {
    let room = parse_room(&id)?;
    match recording_available(&s, room).await {
        Ok(true) => Ok(Json(serde_json::json!({
            "room": room.to_string(),
            "url": recording_url(&s, room),
            "chapters_url": format!("{}/hls/{room}/chapters.json", s.hls_base()),
            "chapters_vtt_url": format!("{}/hls/{room}/chapters.vtt", s.hls_base()),
        }))
        .into_response()),
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
