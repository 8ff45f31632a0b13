//! Participants' reports: `GET /v1/rooms/{id}/reports` for the application's moderators.
//! Reports arrive from the origins (see `tasks::apply_origin_events`).

use super::*;
use crate::store::MAX_REPORTS_PER_ROOM;

/// Reports answered when the request names no limit.
const DEFAULT_REPORTS: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReportsQuery {
    limit: Option<usize>,
}

/// `GET /v1/rooms/{id}/reports` (app API key): the room's reports, newest first, at most
/// `limit` (default [`DEFAULT_REPORTS`], at most [`MAX_REPORTS_PER_ROOM`], which is also how
/// many are kept per room). A room without reports, or one the directory no longer holds,
/// answers an empty list: reports outlive the directory entry.
pub(super) async fn list(
    State(s): State<Shared>,
    Path(id): Path<String>,
    query: Result<Query<ReportsQuery>, axum::extract::rejection::QueryRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Answer {
    let room = parse_room(&id)?;
    s.require_api_key(&method, &uri, &headers, b"", ApiScope::App)?;
    let Ok(Query(q)) = query else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "malformed query string (limit)",
        ));
    };
    let limit = q
        .limit
        .unwrap_or(DEFAULT_REPORTS)
        .clamp(1, MAX_REPORTS_PER_ROOM);
    let reports = s.store.reports(room, limit).await?;
    Ok(Json(serde_json::json!({ "room": room, "reports": reports })).into_response())
}
