//! JSON bodies of the public HTTP APIs (geo-router REST, edge WHIP/WHEP errors).

use crate::ids::RoomId;
use crate::token::Role;
use serde::{Deserialize, Serialize};

/// Longest room title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest topic or display name, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest application user id (`user_id`, the token's `sub`), in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;

/// Whether `id` is a usable application user id: 1 to [`MAX_USER_ID_BYTES`] bytes of printable
/// ASCII without spaces (letters, digits, punctuation), so it is one unambiguous key for bans,
/// session caps and rate limits.
pub fn valid_user_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_USER_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

/// `POST /v1/rooms` body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateRoomRequest {
    /// Room title shown in the lobby.
    pub title: String,
    /// Optional topic, used for discovery.
    #[serde(default)]
    pub topic: Option<String>,
    /// Optional start time (Unix seconds) for a scheduled room; live until then it is not.
    #[serde(default)]
    pub scheduled_at: Option<u64>,
    /// The host's display name, carried in the host token (default "host").
    #[serde(default)]
    pub host_name: Option<String>,
    /// The host's user id in the calling application (the host token's `sub`); default a random
    /// id.
    #[serde(default)]
    pub host_user_id: Option<String>,
    /// The room's own tier thresholds; what it leaves out follows the router's settings.
    #[serde(default)]
    pub tiers: Option<TierThresholds>,
}

/// Most interactive listeners per room per edge a room may ask for.
pub const MAX_INTERACTIVE_THRESHOLD: u32 = 100_000;
/// Most push listeners per room per edge a room may ask for.
pub const MAX_PUSH_THRESHOLD: u32 = 1_000_000;

/// A room's tier thresholds, per edge: the first `interactive` listeners of the room on an
/// edge hear it over WebRTC, the next `push` over push, the rest over LL-HLS. An absent field
/// keeps the router's setting (`interactive_capacity`, `push_capacity`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct TierThresholds {
    /// Interactive (WebRTC) listeners per edge, up to [`MAX_INTERACTIVE_THRESHOLD`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactive: Option<u32>,
    /// Push listeners per edge after those, up to [`MAX_PUSH_THRESHOLD`] (0: no push tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<u32>,
}

/// `POST /v1/rooms` answer (`201 Created`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreateRoomResponse {
    /// The new room's id.
    pub room: RoomId,
    /// A host token for the creator.
    pub host_token: String,
    /// The room's LL-HLS multivariant/media playlist URL.
    pub hls_url: String,
}

/// Whether a room is running.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RoomStatus {
    /// Accepting participants.
    Live,
    /// Over; only the recording remains.
    Ended,
    /// Announced for a later `scheduled_at`.
    Scheduled,
}

/// A room as the directory shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomInfo {
    /// Room id.
    pub room: RoomId,
    /// Title.
    pub title: String,
    /// Topic.
    pub topic: Option<String>,
    /// Live or ended.
    pub status: RoomStatus,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// LL-HLS playlist URL.
    pub hls_url: String,
    /// Start time of a scheduled room, Unix seconds.
    #[serde(default)]
    pub scheduled_at: Option<u64>,
    /// When the room ended, Unix seconds.
    #[serde(default)]
    pub ended_at: Option<u64>,
    /// Interactive sessions in the room over all edges (discovery ranking).
    #[serde(default)]
    pub listeners: u32,
    /// Users subscribed to a scheduled room's reminder (0 once it started).
    #[serde(default)]
    pub reminder_subscribers: u64,
    /// The room's own tier thresholds, if it was created with any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<TierThresholds>,
}

/// `POST /v1/rooms/{id}/reminders` body: subscribe a user to a scheduled room's reminder.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReminderRequest {
    /// The user's id in the application (named in the `room_reminder` webhooks).
    pub user_id: String,
}

/// `PATCH /v1/rooms/{id}` body: move a scheduled room's start.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RescheduleRequest {
    /// The new start, Unix seconds (in the future, within a year).
    pub scheduled_at: u64,
}

/// `POST /v1/rooms/{id}/tokens` body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MintTokenRequest {
    /// Role to grant.
    pub role: Role,
    /// Display name.
    pub name: String,
    /// The user's id in the calling application, carried as the token's `sub`: kicks, bans,
    /// session caps and chat rate limits follow it. Required in production; dev mode makes a
    /// random one when absent.
    #[serde(default)]
    pub user_id: Option<String>,
}

/// A minted token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenResponse {
    /// The JWT.
    pub token: String,
}

/// `POST /v1/tokens/revoke` body: the token itself, or its `jti` and `exp`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RevokeTokenRequest {
    /// The token to revoke (its `jti` and `exp` are read from it after its signature is
    /// checked).
    #[serde(default)]
    pub token: Option<String>,
    /// The `jti` of the token to revoke (instead of `token`).
    #[serde(default)]
    pub jti: Option<String>,
    /// With `jti`: the token's `exp` (Unix seconds); absent, the lifetime cap from now.
    #[serde(default)]
    pub exp: Option<u64>,
}

/// `POST /v1/tokens/revoke` answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokeTokenResponse {
    /// The revoked token's `jti`.
    pub jti: String,
    /// Refused until then (Unix seconds); the token expires then anyway.
    pub until: u64,
    /// `false` when the token had already expired (nothing to refuse).
    pub revoked: bool,
}

/// Longest `jti` accepted by `POST /v1/tokens/revoke`, bytes.
pub const MAX_JTI_BYTES: usize = 128;

/// `GET /v1/route` answer: where a client should connect.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteResponse {
    /// Chosen region.
    pub region: String,
    /// Chosen edge id.
    pub edge: String,
    /// WHIP endpoint for publishing into the room.
    pub whip_url: String,
    /// WHEP endpoint for receive-only listening.
    pub whep_url: String,
    /// WebSocket signaling endpoint.
    pub ws_url: String,
    /// LL-HLS playlist of the room.
    pub hls_url: String,
    /// The room's program stream at the edge for push listeners (WebSocket, `docs/push.md`).
    #[serde(default)]
    pub push_url: String,
    /// The same stream over WebTransport (HTTP/3), when the edge serves it; else empty and left
    /// out. The session's one unidirectional stream carries the WebSocket's bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub webtransport_url: String,
    /// SHA-256 of the edge's WebTransport certificate (64 hex digits), when that certificate is
    /// the edge's own short-lived one: browsers accept it through `serverCertificateHashes`.
    /// Empty and left out when the certificate is a CA-issued one (or there is no WebTransport).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub webtransport_cert_sha256: String,
    /// The listener's tier: `interactive` (connect to the edge over WebRTC), `push` (the room's
    /// interactive seats on the edge are taken: play `push_url`) or `hls` (its push seats too:
    /// play `hls_url`). Speakers and hosts are always `interactive`.
    #[serde(default = "default_route_mode")]
    pub mode: String,
    /// Short explanation of the choice, for operators: only when the request asked for it
    /// (`explain=1`), else empty and left out.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
}

fn default_route_mode() -> String {
    "interactive".into()
}

/// The sessions of one room on an edge (part of [`EdgeHeartbeat`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomLoad {
    /// The room.
    pub room: RoomId,
    /// WebRTC sessions (speakers and interactive listeners) of the room on the edge.
    pub sessions: u32,
    /// Push listeners of the room on the edge (`GET /v1/rooms/{room}/push`); left out when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub push: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `PUT /v1/edges/{id}` body: an edge registers and heartbeats every second.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EdgeHeartbeat {
    /// Edge id (must match the path).
    pub id: String,
    /// Region name.
    pub region: String,
    /// Latitude of the edge, degrees.
    pub latitude: f64,
    /// Longitude of the edge, degrees.
    pub longitude: f64,
    /// Public HTTP base URL (WHIP, WHEP, WebSocket).
    pub public_url: String,
    /// WebRTC sessions on the edge now.
    pub participants: u32,
    /// Process CPU use, as a fraction of the machine (0..=1).
    pub cpu_load: f32,
    /// Most sessions the edge takes.
    pub capacity: u32,
    /// Sessions per room.
    #[serde(default)]
    pub rooms: Vec<RoomLoad>,
    /// The edge is draining: no new sessions, current ones continue.
    #[serde(default)]
    pub draining: bool,
    /// This edge's own base URL for other edges of its region (its relay tree's feeds,
    /// `GET /v1/rooms/{room}/push?relay=`): reachable inside the region, unlike `public_url`
    /// which may name a load balancer. Without it the edge is never another edge's parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_url: Option<String>,
    /// Where the edge serves push listeners over WebTransport; left out when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webtransport: Option<WebTransportEndpoint>,
}

/// An edge's WebTransport listener for push listeners (part of [`EdgeHeartbeat`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebTransportEndpoint {
    /// Base URL (`https://host:port`); a room's stream is `{url}/v1/rooms/{room}/push`.
    pub url: String,
    /// SHA-256 of the certificate (64 lowercase hex digits) when it is the edge's own
    /// short-lived one (browsers pin it with `serverCertificateHashes`); left out for a
    /// CA-issued certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
}

/// The router's answer to a heartbeat.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    /// An operator asked this edge to drain.
    pub drain: bool,
    /// Send the next heartbeat within this many milliseconds.
    pub interval_ms: u64,
    /// This edge's parent in its region's relay tree: pull push listeners' program streams from
    /// it instead of the origins. Left out for a tree's root (fed by the origins) and when the
    /// router builds no tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_parent: Option<RelayParent>,
    /// The listener tier thresholds of the heartbeat's rooms, as the router applies them to
    /// this edge (the room's own or the router's), so the edge can move its push and HLS
    /// listeners up when seats free. A room the router could not look up is left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<RoomTiers>,
}

/// The tier thresholds of one room on an edge (part of [`HeartbeatAnswer`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomTiers {
    /// The room.
    pub room: RoomId,
    /// Interactive (WebRTC) listeners per edge.
    pub interactive: u32,
    /// Push listeners per edge (0: no push tier).
    pub push: u32,
}

/// An edge's parent in its region's relay tree (part of [`HeartbeatAnswer`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayParent {
    /// The parent edge's id.
    pub id: String,
    /// The parent's `relay_url`.
    pub url: String,
    /// A relay grant for this edge (`token::RelayGrant`), renewed in every answer.
    pub grant: String,
}

/// Every HTTP error body: `{"error": "code", "message": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// Stable machine-readable code, e.g. `unauthorized`, `room_not_found`, `bad_sdp`.
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// Build an error body.
    pub fn new(error: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            error: error.into(),
            message: message.into(),
        }
    }
}
