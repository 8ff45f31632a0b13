//! `POST /v1/rooms/{id}/end`, and who may act for a room's host (ending it, moving its start):
//! an API key signature, else a valid, unrevoked host token of that room. The decisions
//! ([`host_credential`], [`host_claims`]) are pure and unit-tested.

use super::{
    bearer, error, now_unix, parse_room, reminders, watch_recording, Answer, AppState, Failure,
    Shared,
};
use crate::auth::{ApiScope, KEY_HEADER};
use crate::reminders::Reason;
use crate::store::EndOutcome;
use crate::webhooks::EventKind;
use amphi_protocol::api::RoomStatus;
use amphi_protocol::token::{Claims, Role};
use amphi_protocol::RoomId;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;

/// What a request acting for a room's host carries, in the order it is looked at.
#[derive(Debug, PartialEq, Eq)]
enum HostCredential<'h> {
    /// An API key signature (its header is present; checked separately). It wins over a
    /// Bearer token.
    ApiKey,
    /// A Bearer token.
    Bearer(&'h str),
    /// Neither.
    Missing,
}

/// Which credential a host request is judged by.
fn host_credential(headers: &HeaderMap) -> HostCredential<'_> {
    if headers.contains_key(KEY_HEADER) {
        return HostCredential::ApiKey;
    }
    bearer(headers).map_or(HostCredential::Missing, HostCredential::Bearer)
}

/// Whether a verified token's claims may act for `room`'s host: only a host token of that
/// very room (403 otherwise).
fn host_claims(claims: &Claims, room: RoomId) -> Result<(), Failure> {
    if claims.room != room || claims.role != Role::Host {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only this room's host may do this",
        ));
    }
    Ok(())
}

impl AppState {
    /// A request acting for `room`'s host: signed with an API key (over `body`), or carrying a
    /// valid, unrevoked host token of this room. Answers who: `api_key` or `host`.
    pub(super) async fn host_or_api_key(
        &self,
        room: RoomId,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<&'static str, Failure> {
        let token = match host_credential(headers) {
            HostCredential::ApiKey => {
                let key = self.check_api_key(method, uri, headers, body, ApiScope::App)?;
                tracing::info!(%room, %key, path = uri.path(), "host request with an API key");
                return Ok("api_key");
            }
            HostCredential::Missing => {
                return Err(error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a host token (Authorization: Bearer) or an API key signature is required",
                ))
            }
            HostCredential::Bearer(token) => token,
        };
        let claims = self.verifier.verify(token, now_unix()).map_err(|e| {
            tracing::info!(%room, reason = %e, path = uri.path(), "host request refused");
            error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("invalid token: {e}"),
            )
        })?;
        host_claims(&claims, room)?;
        if self.store.is_token_revoked(claims.jti, now_unix()).await? {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "token_revoked",
                "this token was revoked",
            ));
        }
        Ok("host")
    }
}

/// `POST /v1/rooms/{id}/end`: the room's host (Bearer host token) or an API key ends it.
pub(super) async fn end_room(
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
    let now = now_unix();
    let before = s.store.room(room).await?;
    let outcome = s.store.end_room(room, now).await?;
    s.ended(room);
    let ended = match outcome {
        EndOutcome::NotFound => {
            return Err(error(
                StatusCode::NOT_FOUND,
                "room_not_found",
                "no such room",
            ))
        }
        EndOutcome::Ended => true,
        EndOutcome::AlreadyEnded => false,
    };
    if ended {
        s.metrics.rooms_ended.inc();
        tokio::spawn(watch_recording(s.clone(), room));
        let origin = s.links.end_room(room);
        tracing::info!(%room, origin = ?origin, "room ended through the API");
        s.webhooks.emit(
            EventKind::RoomEnded,
            now,
            serde_json::json!({ "room": room, "by": by }),
        );
        // A scheduled room ended before its start was cancelled: its subscribers are told.
        if let Some(entry) = before.filter(|e| e.status(now) == RoomStatus::Scheduled) {
            reminders::notify(&s, room, &entry, Reason::Cancelled, None, now).await;
        }
    }
    let listeners = s.listeners(room);
    let Some(entry) = s.store.room(room).await? else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            "no such room",
        ));
    };
    Ok(Json(entry.info(room, s.hls_url(room), now, listeners)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{header, HeaderValue};

    fn claims(room: u64, role: Role) -> Claims {
        Claims {
            sub: "u-1".into(),
            name: "Ada".into(),
            room: RoomId(room),
            role,
            iat: 0,
            exp: 60,
            jti: "j1".into(),
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn an_api_key_signature_wins_over_a_bearer_token() {
        let h = headers(&[(KEY_HEADER, "k1"), ("authorization", "Bearer abc")]);
        assert_eq!(host_credential(&h), HostCredential::ApiKey);
    }

    #[test]
    fn a_bearer_token_is_used_without_an_api_key() {
        let h = headers(&[("authorization", "bearer  abc ")]);
        assert_eq!(host_credential(&h), HostCredential::Bearer("abc"));
    }

    #[test]
    fn no_credential_or_another_scheme_or_an_empty_token_is_missing() {
        assert_eq!(host_credential(&HeaderMap::new()), HostCredential::Missing);
        let basic = headers(&[("authorization", "Basic abc")]);
        assert_eq!(host_credential(&basic), HostCredential::Missing);
        let empty = headers(&[("authorization", "Bearer ")]);
        assert_eq!(host_credential(&empty), HostCredential::Missing);
    }

    #[test]
    fn only_a_host_token_of_the_same_room_may_end_it() {
        assert!(host_claims(&claims(7, Role::Host), RoomId(7)).is_ok());
        for (room, role) in [(8, Role::Host), (7, Role::Speaker), (7, Role::Listener)] {
            let refused = host_claims(&claims(room, role), RoomId(7)).err();
            let refused = refused.map(|f| (f.status, f.code));
            assert_eq!(
                refused,
                Some((StatusCode::FORBIDDEN, "forbidden")),
                "room {room}, {role:?}"
            );
        }
        // The refusal is a 403 with the API's JSON error, not a 401 challenge.
        let resp = host_claims(&claims(8, Role::Host), RoomId(7))
            .err()
            .map(IntoResponse::into_response);
        assert_eq!(
            resp.as_ref().map(|r| r.status()),
            Some(StatusCode::FORBIDDEN)
        );
        assert!(resp.is_some_and(|r| !r.headers().contains_key(header::WWW_AUTHENTICATE)));
    }
}
