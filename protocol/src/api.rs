//! JSON bodies of the public HTTP APIs (geo-router REST, edge WHIP/WHEP errors).

use crate::ids::RoomId;
use crate::token::Role;
use serde::{Deserialize, Serialize};

/// Longest room title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest topic or display name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// `POST /v1/rooms` body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateRoomRequest {
    /// Room title shown in the lobby.
    pub title: String,
    /// Optional topic, used for discovery.
    #[serde(default)]
    pub topic: Option<String>,
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
}

/// `POST /v1/rooms/{id}/tokens` body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MintTokenRequest {
    /// Role to grant.
    pub role: Role,
    /// Display name.
    pub name: String,
}

/// A minted token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenResponse {
    /// The JWT.
    pub token: String,
}

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
