//! The JSON bodies of the room API, checked before anything is stored or signed (sans-IO):
//! `POST /v1/rooms` ([`create_room`]), `POST /v1/rooms/{id}/tokens` ([`mint_token`]) and
//! `POST /v1/tokens/revoke` ([`revoke_token`]), `POST /v1/rooms/{id}/reminders`
//! ([`reminder_subscription`]) and `PATCH /v1/rooms/{id}` ([`reschedule`]). Every
//! refusal is answered with its [`Refusal`] status and a JSON [`amphi_protocol::api::ApiError`]
//! body of its code and message.

use crate::directory::RoomEntry;
use amphi_protocol::api::{
    valid_user_id, CreateRoomRequest, MintTokenRequest, ReminderRequest, RescheduleRequest,
    RevokeTokenRequest, TierThresholds, MAX_INTERACTIVE_THRESHOLD, MAX_JTI_BYTES, MAX_NAME_CHARS,
    MAX_PUSH_THRESHOLD, MAX_TITLE_CHARS, MAX_USER_ID_BYTES,
};
use amphi_protocol::token::{Role, TokenError, TokenVerifier};
use serde::de::DeserializeOwned;

/// Furthest ahead a room may be scheduled (one year).
pub const MAX_SCHEDULE_AHEAD_SECS: u64 = 366 * 24 * 3600;

/// The HTTP status a refused body is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `400 Bad Request`: the body is malformed or a field is out of bounds.
    BadRequest,
    /// `403 Forbidden`: the body is well formed but names a user removed from the room.
    Forbidden,
}

/// Why a body was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct BodyError {
    /// The status to answer with.
    pub refusal: Refusal,
    /// Machine-readable code: `bad_json`, `bad_field`, `bad_role`, `missing_user_id`
    /// (`400`) or `user_banned` (`403`).
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> BodyError {
    BodyError {
        refusal: Refusal::BadRequest,
        code,
        message: message.into(),
    }
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BodyError> {
    serde_json::from_slice(bytes).map_err(|e| refuse("bad_json", e.to_string()))
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), BodyError> {
    if value.trim().is_empty() || value.chars().count() > max {
        return Err(refuse(
            "bad_field",
            format!("{field} must be 1..={max} characters"),
        ));
    }
    Ok(())
}

/// Refuse `value` unless it is a valid application user id.
pub fn check_user_id(field: &str, value: &str) -> Result<(), BodyError> {
    if valid_user_id(value) {
        Ok(())
    } else {
        Err(refuse(
            "bad_field",
            format!(
                "{field} must be 1 to {MAX_USER_ID_BYTES} printable ASCII characters without spaces"
            ),
        ))
    }
}

/// A room to create, from a valid `POST /v1/rooms` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRoom {
    /// The directory entry (created now; scheduled only if its start is still ahead).
    pub entry: RoomEntry,
    /// Display name carried in the host token (`host` unless the body names one).
    pub host_name: String,
    /// The host's user id in the application, carried in the host token when given.
    pub host_user_id: Option<String>,
}

/// Check a `POST /v1/rooms` body received at `now_unix` (Unix seconds).
pub fn create_room(bytes: &[u8], now_unix: u64) -> Result<NewRoom, BodyError> {
    let req: CreateRoomRequest = parse(bytes)?;
    if let Some(user) = &req.host_user_id {
        check_user_id("host_user_id", user)?;
    }
    check_text("title", &req.title, MAX_TITLE_CHARS)?;
    if let Some(topic) = &req.topic {
        check_text("topic", topic, MAX_NAME_CHARS)?;
    }
    let host_name = match req.host_name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => {
            check_text("host_name", name, MAX_NAME_CHARS)?;
            name.to_string()
        }
        _ => "host".to_string(),
    };
    if let Some(at) = req.scheduled_at {
        if at > now_unix.saturating_add(MAX_SCHEDULE_AHEAD_SECS) {
            return Err(refuse("bad_field", "scheduled_at must be within a year"));
        }
    }
    if let Some(t) = &req.tiers {
        if t.interactive.is_some_and(|n| n > MAX_INTERACTIVE_THRESHOLD) {
            return Err(refuse(
                "bad_field",
                format!("tiers.interactive must be at most {MAX_INTERACTIVE_THRESHOLD}"),
            ));
        }
        if t.push.is_some_and(|n| n > MAX_PUSH_THRESHOLD) {
            return Err(refuse(
                "bad_field",
                format!("tiers.push must be at most {MAX_PUSH_THRESHOLD}"),
            ));
        }
    }
    Ok(NewRoom {
        entry: RoomEntry {
            title: req.title,
            topic: req.topic,
            created_at: now_unix,
            scheduled_at: req.scheduled_at.filter(|at| *at > now_unix),
            ended_at: None,
            tiers: req.tiers.filter(|t| *t != TierThresholds::default()),
        },
        host_name,
        host_user_id: req.host_user_id,
    })
}

/// Check a `POST /v1/rooms/{id}/reminders` body: the subscribing user's id.
pub fn reminder_subscription(bytes: &[u8]) -> Result<String, BodyError> {
    let req: ReminderRequest = parse(bytes)?;
    check_user_id("user_id", &req.user_id)?;
    Ok(req.user_id)
}

/// Check a `PATCH /v1/rooms/{id}` body received at `now_unix`: the new start, in the future
/// and within [`MAX_SCHEDULE_AHEAD_SECS`].
pub fn reschedule(bytes: &[u8], now_unix: u64) -> Result<u64, BodyError> {
    let req: RescheduleRequest = parse(bytes)?;
    let at = req.scheduled_at;
    if at <= now_unix || at > now_unix.saturating_add(MAX_SCHEDULE_AHEAD_SECS) {
        return Err(refuse(
            "bad_field",
            "scheduled_at must be in the future and within a year",
        ));
    }
    Ok(at)
}

/// Check a `POST /v1/rooms/{id}/tokens` body: a listener or speaker token with a display name
/// and, unless `dev_mode`, the user's id in the application. `revoked` answers whether that user
/// was removed from the room (refused `403 user_banned`).
pub fn mint_token(
    bytes: &[u8],
    dev_mode: bool,
    revoked: impl FnOnce(&str) -> bool,
) -> Result<MintTokenRequest, BodyError> {
    let req: MintTokenRequest = parse(bytes)?;
    check_text("name", &req.name, MAX_NAME_CHARS)?;
    match &req.user_id {
        Some(user) => {
            check_user_id("user_id", user)?;
            if revoked(user) {
                return Err(BodyError {
                    refusal: Refusal::Forbidden,
                    code: "user_banned",
                    message: "this user was removed from the room".into(),
                });
            }
        }
        None if !dev_mode => {
            return Err(refuse(
                "missing_user_id",
                "user_id (the user's id in your application) is required",
            ))
        }
        None => {}
    }
    if req.role == Role::Host {
        return Err(refuse(
            "bad_role",
            "role must be listener or speaker; the host token comes with the room",
        ));
    }
    Ok(req)
}

/// A token to revoke: its `jti`, refused until `until` (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRevocation {
    /// The token's `jti`.
    pub jti: String,
    /// Its `exp`, at most the lifetime cap from now (no valid token lives longer).
    pub until: u64,
}

/// Check a `POST /v1/tokens/revoke` body at `now_unix`: either `token` (verified by `verifier`:
/// a forged or expired one is refused `400 bad_token`), or a `jti` with an optional `exp`
/// (default and cap: `verifier`'s lifetime cap from now). `until` may be in the past (nothing
/// left to refuse).
pub fn revoke_token(
    bytes: &[u8],
    verifier: &TokenVerifier,
    now_unix: u64,
) -> Result<TokenRevocation, BodyError> {
    let req: RevokeTokenRequest = parse(bytes)?;
    let cap = now_unix.saturating_add(verifier.max_lifetime());
    match (req.token, req.jti) {
        (Some(token), None) => {
            if req.exp.is_some() {
                return Err(refuse("bad_field", "exp goes with jti, not with token"));
            }
            let claims = verifier.verify(&token, now_unix).map_err(|e| {
                let message = match e {
                    TokenError::Expired => "the token already expired".to_string(),
                    e => format!("invalid token: {e}"),
                };
                refuse("bad_token", message)
            })?;
            Ok(TokenRevocation {
                jti: claims.jti,
                until: claims.exp.min(cap),
            })
        }
        (None, Some(jti)) => {
            if jti.is_empty() || jti.len() > MAX_JTI_BYTES || jti.chars().any(char::is_control) {
                return Err(refuse(
                    "bad_field",
                    format!("jti must be 1..={MAX_JTI_BYTES} bytes without control characters"),
                ));
            }
            Ok(TokenRevocation {
                jti,
                until: req.exp.unwrap_or(cap).min(cap),
            })
        }
        _ => Err(refuse("bad_field", "give either token or jti (with exp)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_may_set_its_own_tier_thresholds_within_bounds() {
        let r = create_room(
            br#"{"title":"T","tiers":{"interactive":2,"push":300}}"#,
            NOW,
        );
        assert_eq!(
            r.unwrap().entry.tiers,
            Some(TierThresholds {
                interactive: Some(2),
                push: Some(300)
            })
        );
        let one = create_room(br#"{"title":"T","tiers":{"push":0}}"#, NOW).unwrap();
        assert_eq!(one.entry.tiers.and_then(|t| t.interactive), None);
        assert_eq!(one.entry.tiers.and_then(|t| t.push), Some(0));
        let empty = create_room(br#"{"title":"T","tiers":{}}"#, NOW).unwrap();
        assert_eq!(
            empty.entry.tiers, None,
            "nothing set: the router's settings"
        );
        for (body, code) in [
            (
                format!(
                    r#"{{"title":"T","tiers":{{"interactive":{}}}}}"#,
                    MAX_INTERACTIVE_THRESHOLD + 1
                ),
                "bad_field",
            ),
            (
                format!(
                    r#"{{"title":"T","tiers":{{"push":{}}}}}"#,
                    MAX_PUSH_THRESHOLD + 1
                ),
                "bad_field",
            ),
            (
                r#"{"title":"T","tiers":{"interactive":-1}}"#.into(),
                "bad_json",
            ),
            (r#"{"title":"T","tiers":{"hls":5}}"#.into(), "bad_json"),
        ] {
            assert_eq!(
                create_room(body.as_bytes(), NOW).unwrap_err().code,
                code,
                "{body}"
            );
        }
    }

    #[test]
    fn reminder_bodies_name_a_valid_user_and_a_future_start() {
        assert_eq!(
            reminder_subscription(br#"{"user_id":"u-42"}"#),
            Ok("u-42".to_string())
        );
        for bad in [
            &br#"{"user_id":""}"#[..],
            br#"{"user_id":"two words"}"#,
            br#"{"user":"u"}"#,
            br#"{"user_id":"u","extra":1}"#,
            b"{",
        ] {
            assert_eq!(
                reminder_subscription(bad).unwrap_err().refusal,
                Refusal::BadRequest
            );
        }
        let at = NOW + 3_600;
        assert_eq!(
            reschedule(format!(r#"{{"scheduled_at":{at}}}"#).as_bytes(), NOW),
            Ok(at)
        );
        for bad in [NOW, NOW - 1, NOW + MAX_SCHEDULE_AHEAD_SECS + 1] {
            let body = format!(r#"{{"scheduled_at":{bad}}}"#);
            assert_eq!(
                reschedule(body.as_bytes(), NOW).unwrap_err().code,
                "bad_field"
            );
        }
        assert_eq!(
            reschedule(br#"{"scheduled_at":-1}"#, NOW).unwrap_err().code,
            "bad_json"
        );
    }

    #[test]
    fn a_revocation_names_one_token_until_its_expiry() {
        let signer = amphi_protocol::token::TokenSigner::generate("k1");
        let mut v = signer.verifier();
        v.set_max_lifetime(3600);
        let claims = amphi_protocol::token::Claims {
            sub: "u".into(),
            name: "U".into(),
            room: amphi_protocol::RoomId(1),
            role: Role::Listener,
            iat: NOW,
            exp: NOW + 600,
            jti: "j-1".into(),
        };
        let token = signer.sign(&claims);
        let body = serde_json::json!({ "token": token }).to_string();
        assert_eq!(
            revoke_token(body.as_bytes(), &v, NOW + 1),
            Ok(TokenRevocation {
                jti: "j-1".into(),
                until: NOW + 600
            })
        );
        assert_eq!(
            revoke_token(body.as_bytes(), &v, NOW + 600)
                .unwrap_err()
                .code,
            "bad_token",
            "expired"
        );
        let forged = signer.sign(&claims).replace('.', ".x");
        let body = serde_json::json!({ "token": forged }).to_string();
        assert_eq!(
            revoke_token(body.as_bytes(), &v, NOW).unwrap_err().code,
            "bad_token"
        );
        let r = revoke_token(br#"{"jti":"j-2","exp":1}"#, &v, NOW).unwrap();
        assert_eq!((r.jti.as_str(), r.until), ("j-2", 1));
        let r = revoke_token(br#"{"jti":"j-2"}"#, &v, NOW).unwrap();
        assert_eq!(r.until, NOW + 3600, "the cap by default");
        let r = revoke_token(br#"{"jti":"j-2","exp":18446744073709551615}"#, &v, NOW).unwrap();
        assert_eq!(r.until, NOW + 3600, "and at most the cap");
        for bad in [
            r#"{}"#.to_string(),
            r#"{"jti":""}"#.to_string(),
            format!(r#"{{"jti":"{}"}}"#, "x".repeat(MAX_JTI_BYTES + 1)),
            r#"{"jti":"a\u0000"}"#.to_string(),
            format!(r#"{{"jti":"j","token":"{token}"}}"#),
            format!(r#"{{"token":"{token}","exp":5}}"#),
            r#"{"jti":"j","other":1}"#.to_string(),
        ] {
            assert!(revoke_token(bad.as_bytes(), &v, NOW).is_err(), "{bad}");
        }
    }

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn a_room_body_becomes_an_entry() {
        let r = create_room(br#"{"title":"Talk","host_name":"  Ann "}"#, NOW).unwrap();
        assert_eq!(r.host_name, "Ann");
        assert_eq!(r.entry.title, "Talk");
        assert_eq!((r.entry.created_at, r.entry.scheduled_at), (NOW, None));
        let r = create_room(br#"{"title":"T","scheduled_at":1}"#, NOW).unwrap();
        assert_eq!((r.host_name.as_str(), r.entry.scheduled_at), ("host", None));
        let at = NOW + 60;
        let body = format!(r#"{{"title":"T","scheduled_at":{at}}}"#);
        assert_eq!(
            create_room(body.as_bytes(), NOW)
                .unwrap()
                .entry
                .scheduled_at,
            Some(at)
        );
    }

    #[test]
    fn bad_room_bodies_are_refused_with_a_code() {
        for (body, code) in [
            (&br#"{"title":"  "}"#[..], "bad_field"),
            (br#"{"title":"T","topic":""}"#, "bad_field"),
            (
                br#"{"title":"T","scheduled_at":18446744073709551615}"#,
                "bad_field",
            ),
            (br#"{"title":1}"#, "bad_json"),
            (b"\xff", "bad_json"),
        ] {
            assert_eq!(create_room(body, NOW).unwrap_err().code, code);
        }
        let long = format!(r#"{{"title":"{}"}}"#, "é".repeat(MAX_TITLE_CHARS + 1));
        assert_eq!(
            create_room(long.as_bytes(), NOW).unwrap_err().code,
            "bad_field"
        );
        // The schedule limit saturates instead of overflowing at the end of time.
        assert!(create_room(br#"{"title":"T","scheduled_at":5}"#, u64::MAX).is_ok());
    }

    #[test]
    fn host_user_ids_are_checked_and_kept() {
        let r = create_room(br#"{"title":"T","host_user_id":"u-1"}"#, NOW).unwrap();
        assert_eq!(r.host_user_id.as_deref(), Some("u-1"));
        assert_eq!(
            create_room(br#"{"title":"T"}"#, NOW).unwrap().host_user_id,
            None
        );
        for body in [
            &br#"{"title":"T","host_user_id":""}"#[..],
            br#"{"title":"T","host_user_id":"a b"}"#,
        ] {
            assert_eq!(create_room(body, NOW).unwrap_err().code, "bad_field");
        }
        let long = format!(
            r#"{{"title":"T","host_user_id":"{}"}}"#,
            "u".repeat(MAX_USER_ID_BYTES + 1)
        );
        assert_eq!(
            create_room(long.as_bytes(), NOW).unwrap_err().code,
            "bad_field"
        );
        // The user id is checked before the title, as the handler always did.
        let both = create_room(br#"{"title":" ","host_user_id":"a b"}"#, NOW).unwrap_err();
        assert!(both.message.starts_with("host_user_id"), "{both}");
    }

    #[test]
    fn tokens_are_minted_for_listeners_and_speakers_only() {
        let never = |_: &str| false;
        let req = mint_token(
            br#"{"role":"speaker","name":"Bo","user_id":"u-2"}"#,
            false,
            never,
        )
        .unwrap();
        assert_eq!((req.role, req.name.as_str()), (Role::Speaker, "Bo"));
        assert_eq!(req.user_id.as_deref(), Some("u-2"));
        let host = mint_token(br#"{"role":"host","name":"Bo"}"#, true, never).unwrap_err();
        assert_eq!((host.code, host.refusal), ("bad_role", Refusal::BadRequest));
        assert_eq!(
            mint_token(br#"{"role":"listener","name":" "}"#, true, never)
                .unwrap_err()
                .code,
            "bad_field"
        );
        assert_eq!(mint_token(b"{}", true, never).unwrap_err().code, "bad_json");
    }

    #[test]
    fn production_mints_need_a_valid_user_id_that_is_not_banned() {
        let never = |_: &str| false;
        let anon = br#"{"role":"listener","name":"Bo"}"#;
        assert_eq!(
            mint_token(anon, false, never).unwrap_err().code,
            "missing_user_id"
        );
        assert_eq!(mint_token(anon, true, never).unwrap().user_id, None);
        let bad = br#"{"role":"listener","name":"Bo","user_id":"a b"}"#;
        assert_eq!(mint_token(bad, true, never).unwrap_err().code, "bad_field");
        let banned = br#"{"role":"host","name":"Bo","user_id":"kicked"}"#;
        let e = mint_token(banned, false, |user| user == "kicked").unwrap_err();
        // A banned user hears 403 before the role is looked at, as the handler always answered.
        assert_eq!((e.code, e.refusal), ("user_banned", Refusal::Forbidden));
        let other = br#"{"role":"listener","name":"Bo","user_id":"fine"}"#;
        assert!(mint_token(other, false, |user| user == "kicked").is_ok());
    }
}
