//! Scheduled rooms' reminders over HTTP: subscribe and unsubscribe users (API key), list them,
//! move a room's start (its host or an API key), and the notices the router sends as
//! `room_reminder` webhooks: `starting_soon` (housekeeping), `live` (the first participant
//! arrives), `rescheduled` and `cancelled`. Decisions live in [`crate::reminders`].

use super::{error, now_unix, parse_room, read_body, Answer, AppState, Failure, Shared, MAX_BODY};
use crate::auth::ApiScope;
use crate::bodies;
use crate::directory::{Rescheduled, RoomEntry};
use crate::reminders::{Notice, Reason, SoonWindow};
use crate::store::{reminder_ttl, Subscription};
use crate::webhooks::EventKind;
use amphi_protocol::api::RoomStatus;
use amphi_protocol::RoomId;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;

/// 404 `room_not_found`.
fn room_not_found() -> Failure {
    error(StatusCode::NOT_FOUND, "room_not_found", "no such room")
}

/// The room if it exists and is still scheduled at `now`: 404 / 409 otherwise.
async fn scheduled_room(s: &AppState, room: RoomId, now: u64) -> Result<RoomEntry, Failure> {
    let Some(entry) = s.store.room(room).await? else {
        return Err(room_not_found());
    };
    if entry.status(now) != RoomStatus::Scheduled {
        return Err(error(
            StatusCode::CONFLICT,
            "room_not_scheduled",
            "reminders are for rooms that have not started yet",
        ));
    }
    Ok(entry)
}

/// `POST /v1/rooms/{id}/reminders` (API key): subscribe `{"user_id"}` to the room's reminders.
pub(super) async fn subscribe(
    State(s): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let room = parse_room(&id)?;
    let bytes = s
        .signed_body(&method, &uri, &headers, body, MAX_BODY, ApiScope::App)
        .await?;
    let user = bodies::reminder_subscription(&bytes)?;
    let now = now_unix();
    let entry = scheduled_room(&s, room, now).await?;
    let keep = reminder_ttl(entry.scheduled_at.unwrap_or(now), now);
    let (subscribed_now, subscribers) =
        match s.store.subscribe_reminder(room, user.clone(), keep).await? {
            Subscription::Added(n) => (true, n),
            Subscription::Already(n) => (false, n),
            Subscription::Full => {
                return Err(error(
                    StatusCode::CONFLICT,
                    "reminders_full",
                    format!(
                        "this room has {} reminder subscribers, the most it takes",
                        crate::reminders::MAX_SUBSCRIBERS_PER_ROOM
                    ),
                ))
            }
        };
    let status = if subscribed_now {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(serde_json::json!({
            "room": room,
            "user_id": user,
            "subscribed": true,
            "subscribers": subscribers,
        })),
    )
        .into_response())
}

/// `DELETE /v1/rooms/{id}/reminders/{user_id}` (API key): unsubscribe a user.
pub(super) async fn unsubscribe(
    State(s): State<Shared>,
    Path((id, user)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Answer {
    let room = parse_room(&id)?;
    s.require_api_key(&method, &uri, &headers, b"", ApiScope::App)?;
    bodies::check_user_id("user_id", &user)?;
    let was_subscribed = s.store.unsubscribe_reminder(room, user.clone()).await?;
    Ok(Json(serde_json::json!({
        "room": room,
        "user_id": user,
        "subscribed": false,
        "was_subscribed": was_subscribed,
    }))
    .into_response())
}

/// `GET /v1/rooms/{id}/reminders` (API key): the room's subscribers.
pub(super) async fn list(
    State(s): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Answer {
    let room = parse_room(&id)?;
    s.require_api_key(&method, &uri, &headers, b"", ApiScope::App)?;
    if s.store.room(room).await?.is_none() {
        return Err(room_not_found());
    }
    let users = s.store.reminder_subscribers(room).await?;
    Ok(Json(serde_json::json!({
        "room": room,
        "subscribers": users.len(),
        "users": users,
    }))
    .into_response())
}

/// `PATCH /v1/rooms/{id}` (the room's host or an API key): `{"scheduled_at"}` moves a room
/// that has not started; its subscribers are told (`rescheduled`), and told `starting_soon`
/// at once when the new start is within the lead.
pub(super) async fn reschedule(
    State(s): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let room = parse_room(&id)?;
    let bytes = read_body(&headers, body, MAX_BODY).await?;
    let by = s
        .host_or_api_key(room, &method, &uri, &headers, &bytes)
        .await?;
    let now = now_unix();
    let at = bodies::reschedule(&bytes, now)?;
    let previous = match s.store.reschedule_room(room, at, now).await? {
        Rescheduled::NotFound => return Err(room_not_found()),
        Rescheduled::NotScheduled => {
            return Err(error(
                StatusCode::CONFLICT,
                "room_not_scheduled",
                "only a room that has not started can be rescheduled",
            ))
        }
        Rescheduled::Moved { previous } => previous,
    };
    tracing::info!(%room, by, previous, at, "room rescheduled");
    let Some(entry) = s.store.room(room).await? else {
        return Err(room_not_found());
    };
    notify(&s, room, &entry, Reason::Rescheduled, Some(previous), now).await;
    if at <= now.saturating_add(s.config.reminder_lead_secs) {
        notify(&s, room, &entry, Reason::StartingSoon, None, now).await;
    }
    let mut info = entry.info(room, s.hls_url(room), now, s.listeners(room));
    info.reminder_subscribers = s
        .store
        .reminder_counts(vec![room])
        .await
        .ok()
        .and_then(|c| c.first().copied())
        .unwrap_or(0);
    Ok(Json(info).into_response())
}

/// Tell `room`'s subscribers why (`previous` is the start before a reschedule), once per reason
/// and scheduled start over every replica. Store trouble is logged: the notice is skipped.
pub(super) async fn notify(
    s: &AppState,
    room: RoomId,
    entry: &RoomEntry,
    reason: Reason,
    previous: Option<u64>,
    now: u64,
) {
    let Some(at) = entry.scheduled_at else {
        return;
    };
    let claim = reason.claim_key(at);
    let users = match s.store.claim_once(&claim, room).await {
        Ok(true) => s.store.reminder_subscribers(room).await,
        Ok(false) => return,
        Err(e) => Err(e),
    };
    let users = match users {
        Ok(users) => users,
        Err(e) => {
            tracing::warn!(%room, reason = reason.as_str(), error = %e, "reminder not sent");
            return;
        }
    };
    let notice = Notice {
        room,
        reason,
        title: &entry.title,
        scheduled_at: Some(at),
        previous_scheduled_at: previous,
    };
    let batches = notice.batches(&users);
    for batch in &batches {
        match serde_json::to_value(batch) {
            Ok(data) => s.webhooks.emit(EventKind::RoomReminder, now, data),
            Err(e) => tracing::warn!(%room, error = %e, "reminder not encoded"),
        }
    }
    s.metrics.reminders_sent.inc_by(users.len() as u64);
    tracing::info!(%room, reason = reason.as_str(), subscribers = users.len(), batches = batches.len(), "reminder");
    if matches!(reason, Reason::Live | Reason::Cancelled) {
        if let Err(e) = s.store.clear_reminders(room).await {
            tracing::debug!(%room, error = %e, "reminder subscribers not cleared");
        }
    }
}

/// The first participant of `room` arrived on an edge: if it is a scheduled room, its
/// subscribers hear it is live.
pub(super) async fn on_first_participant(s: Shared, room: RoomId) {
    let now = now_unix();
    match s.store.room(room).await {
        Ok(Some(entry)) if entry.scheduled_at.is_some() && entry.ended_at.is_none() => {
            notify(&s, room, &entry, Reason::Live, None, now).await
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(%room, error = %e, "live reminder skipped"),
    }
}

/// One housekeeping pass of `starting_soon`: the starts that came within the lead since the
/// last successful pass.
pub(super) async fn remind_starting_soon(s: &AppState, window: &mut SoonWindow, now: u64) {
    let (after, until) = window.due(now);
    let rooms = match s.store.scheduled_between(after, until).await {
        Ok(rooms) => rooms,
        Err(e) => {
            tracing::warn!(error = %e, "store unavailable for reminders");
            return;
        }
    };
    for room in rooms {
        match s.store.room(room).await {
            Ok(Some(entry)) if entry.status(now) == RoomStatus::Scheduled => {
                notify(s, room, &entry, Reason::StartingSoon, None, now).await
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%room, error = %e, "store unavailable for reminders");
                return;
            }
        }
    }
    window.covered(now);
}

/// Subscriber counts of the scheduled rooms among `rooms` (0 when the store cannot say).
pub(super) async fn counts(s: &AppState, rooms: &[(RoomId, bool)]) -> Vec<u64> {
    let scheduled: Vec<RoomId> = rooms.iter().filter(|r| r.1).map(|r| r.0).collect();
    let mut found = match s.store.reminder_counts(scheduled).await {
        Ok(c) => c.into_iter(),
        Err(e) => {
            tracing::debug!(error = %e, "reminder counts unavailable");
            Vec::new().into_iter()
        }
    };
    rooms
        .iter()
        .map(|r| if r.1 { found.next().unwrap_or(0) } else { 0 })
        .collect()
}
