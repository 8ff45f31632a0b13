//! The geo-router's room-creation, token-mint, token-revocation, reminder and reschedule JSON
//! bodies (`POST /v1/rooms`, `POST /v1/rooms/{id}/tokens`, `POST /v1/tokens/revoke`,
//! `POST /v1/rooms/{id}/reminders`, `PATCH /v1/rooms/{id}`), generated field by field (missing, wrongly typed, unknown,
//! huge, blank, control characters, far-future schedules, user ids with spaces or banned) and as
//! raw bytes. A body is either accepted with every field within its limits, or refused with a
//! code and a message that serialize as the JSON error body; nothing panics.
#![no_main]
use amphi_geo_router::bodies::{
    create_room, mint_token, reminder_subscription, reschedule, revoke_token, Refusal,
    MAX_SCHEDULE_AHEAD_SECS,
};
use amphi_protocol::api::{
    valid_user_id, ApiError, RoomStatus, MAX_JTI_BYTES, MAX_NAME_CHARS, MAX_TITLE_CHARS,
};
use amphi_protocol::token::{Role, TokenVerifier};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

const PIECES: [&str; 8] = ["a", " ", "é", "\u{0}", "\n", "👏", "\"", "\\"];

/// A JSON value for one field.
#[derive(Arbitrary, Debug)]
enum Field {
    Absent,
    Null,
    Text { piece: u8, times: u16 },
    Number(u64),
    Negative(i64),
    Float(f64),
    Bool(bool),
    Role(u8),
    List,
}

impl Field {
    fn value(&self) -> Option<Value> {
        Some(match self {
            Field::Absent => return None,
            Field::Null => Value::Null,
            Field::Text { piece, times } => Value::String(
                PIECES[usize::from(*piece) % PIECES.len()].repeat(usize::from(*times) % 300),
            ),
            Field::Number(n) => json!(n),
            Field::Negative(n) => json!(n),
            Field::Float(f) => json!(f),
            Field::Bool(b) => json!(b),
            Field::Role(r) => {
                json!(["host", "speaker", "listener", "Host", ""][usize::from(*r) % 5])
            }
            Field::List => json!(["x"]),
        })
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Create-room fields.
    title: Field,
    topic: Field,
    scheduled_at: Field,
    host_name: Field,
    host_user_id: Field,
    /// Mint fields.
    role: Field,
    name: Field,
    user_id: Field,
    /// Whether the router runs in dev mode (user ids optional).
    dev_mode: bool,
    /// The user id the router holds as removed from the room.
    banned: Field,
    /// An extra field name (unknown fields).
    extra: Option<(u8, Field)>,
    /// Seconds added to the clock (the request time).
    now_offset: u32,
    raw: Vec<u8>,
}

fn body(fields: &[(&str, &Field)], extra: &Option<(u8, Field)>) -> Vec<u8> {
    let mut map = Map::new();
    for (k, f) in fields {
        if let Some(v) = f.value() {
            map.insert((*k).to_string(), v);
        }
    }
    if let Some((k, f)) = extra {
        if let Some(v) = f.value() {
            map.insert(
                ["user", "title", "exp", "role", "💥"][usize::from(*k) % 5].into(),
                v,
            );
        }
    }
    serde_json::to_vec(&Value::Object(map)).expect("serialize")
}

fn check_text(value: &str, max: usize) {
    assert!(!value.trim().is_empty());
    assert!(value.chars().count() <= max);
}

fn check_refusal(code: &str, message: &str) {
    assert!(
        code.starts_with("bad_") || code == "missing_user_id" || code == "user_banned",
        "code {code}"
    );
    assert!(!message.is_empty());
    let e = serde_json::to_value(ApiError::new(code, message)).expect("error body");
    assert_eq!(e["error"], code);
}

fn check_create(bytes: &[u8], now: u64) {
    match create_room(bytes, now) {
        Ok(r) => {
            check_text(&r.entry.title, MAX_TITLE_CHARS);
            if let Some(t) = &r.entry.topic {
                check_text(t, MAX_NAME_CHARS);
            }
            check_text(&r.host_name, MAX_NAME_CHARS);
            if let Some(user) = &r.host_user_id {
                assert!(valid_user_id(user));
            }
            assert_eq!(r.host_name, r.host_name.trim());
            assert_eq!(r.entry.created_at, now);
            assert_eq!(r.entry.ended_at, None);
            if let Some(at) = r.entry.scheduled_at {
                assert!(at > now && at - now <= MAX_SCHEDULE_AHEAD_SECS);
                assert_eq!(r.entry.status(now), RoomStatus::Scheduled);
            } else {
                assert_eq!(r.entry.status(now), RoomStatus::Live);
            }
        }
        Err(e) => check_refusal(e.code, &e.message),
    }
}

fn check_mint(bytes: &[u8], dev_mode: bool, banned: Option<&str>) {
    let is_banned = |user: &str| Some(user) == banned;
    match mint_token(bytes, dev_mode, is_banned) {
        Ok(req) => {
            assert_ne!(req.role, Role::Host);
            check_text(&req.name, MAX_NAME_CHARS);
            match &req.user_id {
                Some(user) => assert!(valid_user_id(user) && !is_banned(user)),
                None => assert!(dev_mode),
            }
        }
        Err(e) => {
            assert_eq!(e.refusal == Refusal::Forbidden, e.code == "user_banned");
            check_refusal(e.code, &e.message)
        }
    }
}

fn check_revoke(bytes: &[u8], now: u64) {
    let verifier = TokenVerifier::default();
    match revoke_token(bytes, &verifier, now) {
        Ok(r) => {
            assert!(!r.jti.is_empty() && r.jti.len() <= MAX_JTI_BYTES);
            assert!(r.until <= now + verifier.max_lifetime());
        }
        Err(e) => {
            assert_eq!(e.refusal, Refusal::BadRequest);
            check_refusal(e.code, &e.message)
        }
    }
}

fn check_reminder(bytes: &[u8]) {
    match reminder_subscription(bytes) {
        Ok(user) => assert!(valid_user_id(&user)),
        Err(e) => {
            assert_eq!(e.refusal, Refusal::BadRequest);
            check_refusal(e.code, &e.message)
        }
    }
}

fn check_reschedule(bytes: &[u8], now: u64) {
    match reschedule(bytes, now) {
        Ok(at) => assert!(at > now && at - now <= MAX_SCHEDULE_AHEAD_SECS),
        Err(e) => {
            assert_eq!(e.refusal, Refusal::BadRequest);
            check_refusal(e.code, &e.message)
        }
    }
}

fuzz_target!(|input: Input| {
    let now = 1_700_000_000 + u64::from(input.now_offset);
    let create = body(
        &[
            ("title", &input.title),
            ("topic", &input.topic),
            ("scheduled_at", &input.scheduled_at),
            ("host_name", &input.host_name),
            ("host_user_id", &input.host_user_id),
        ],
        &input.extra,
    );
    check_create(&create, now);
    check_create(&input.raw, now);
    let mint = body(
        &[
            ("role", &input.role),
            ("name", &input.name),
            ("user_id", &input.user_id),
        ],
        &input.extra,
    );
    let banned = match input.banned.value() {
        Some(Value::String(user)) => Some(user),
        _ => None,
    };
    check_mint(&mint, input.dev_mode, banned.as_deref());
    check_mint(&input.raw, input.dev_mode, banned.as_deref());
    // Revocation: `jti` and `exp`, or a `token` (never valid here: no key is known).
    let revoke = body(
        &[
            ("jti", &input.user_id),
            ("exp", &input.scheduled_at),
            ("token", &input.name),
        ],
        &input.extra,
    );
    check_revoke(&revoke, now);
    check_revoke(&input.raw, now);
    check_reminder(&body(&[("user_id", &input.user_id)], &input.extra));
    check_reminder(&input.raw);
    check_reschedule(
        &body(&[("scheduled_at", &input.scheduled_at)], &input.extra),
        now,
    );
    check_reschedule(&input.raw, now);
});
