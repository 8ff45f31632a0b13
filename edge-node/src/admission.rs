//! Admission: what the HTTP (WHIP/WHEP) and WebSocket front ends share to let a peer in. The
//! handlers' state, token and room checks (the geo-router client and its cache), answering an
//! offer on a new edge `Rtc`, and handing the peer to its media shard. The front ends
//! ([`crate::http`], [`crate::ws`]) depend on this module; nothing here depends on them.

// Helpers short-circuit handlers with a ready HTTP error response; boxing it buys nothing here.
#![allow(clippy::result_large_err)]

use crate::lifecycle::{ParticipantIds, RoomCache, RoomStatusAnswer};
use crate::media::api::{MediaCommand, NewPeer};
use crate::metrics::Metrics;
use crate::occupancy::Occupancy;
use crate::sessions::Sessions;
use crate::shards::MediaShards;
use amphi_protocol::api::{ApiError, RoomInfo, RoomStatus};
use amphi_protocol::https::HttpsClient;
use amphi_protocol::token::{Claims, TokenVerifier};
use amphi_protocol::RoomId;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use str0m::rtp::{Extension, ExtensionMap};
use str0m::{Candidate, IceCreds, Rtc};
use tokio::sync::oneshot;

/// How long a positive "room is live" answer from the geo-router is trusted.
pub const ROOM_CACHE_TTL: Duration = Duration::from_secs(5);
/// Timeout of one geo-router lookup.
const ROUTER_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest geo-router answer read.
const MAX_ROUTER_BODY: usize = 64 * 1024;

/// Shared state of the HTTP handlers.
pub(crate) struct AppState {
    pub tokens: TokenVerifier,
    pub candidate: SocketAddr,
    pub media: MediaShards,
    pub rooms: Arc<Mutex<RoomCache>>,
    pub router: RouterClient,
    pub metrics: Arc<Metrics>,
    pub ids: Mutex<ParticipantIds>,
    pub sessions: Arc<Sessions>,
    pub occupancy: Arc<Occupancy>,
    /// Push listeners (`GET /v1/rooms/{room}/push`).
    pub push: Arc<crate::push_hub::PushHub>,
}

impl AppState {
    /// A participant id for a new session: the next of this edge's range no live local
    /// participant holds (`None` if the allocator is poisoned).
    pub(crate) fn new_participant_id(&self) -> Option<amphi_protocol::ParticipantId> {
        let in_use = |pid| self.sessions.role_of(pid).is_some();
        self.ids.lock().ok().map(|mut ids| ids.allocate(in_use))
    }
}

/// Asks the geo-router whether rooms exist.
pub(crate) struct RouterClient {
    base: String,
    client: HttpsClient<Empty<Bytes>>,
}

impl RouterClient {
    /// Ask the router at `base` (`https://` or `http://`) through `client`.
    pub(crate) fn new(base: &str, client: HttpsClient<Empty<Bytes>>) -> Self {
        RouterClient {
            base: base.trim_end_matches('/').to_string(),
            client,
        }
    }

    pub(crate) async fn room_status(&self, room: RoomId) -> Result<RoomStatusAnswer, String> {
        let uri = format!("{}/v1/rooms/{room}", self.base);
        let req = http::Request::get(uri)
            .header(header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(ROUTER_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| "geo-router timed out".to_string())?
            .map_err(|e| e.to_string())?;
        match resp.status() {
            StatusCode::OK => {
                let body = Limited::new(resp.into_body(), MAX_ROUTER_BODY)
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                let info: RoomInfo = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                if info.room == room && info.status == RoomStatus::Live {
                    Ok(RoomStatusAnswer::Live)
                } else {
                    Ok(RoomStatusAnswer::Gone)
                }
            }
            StatusCode::NOT_FOUND => Ok(RoomStatusAnswer::Gone),
            s => Err(format!("geo-router answered {s}")),
        }
    }
}

/// A JSON `ApiError` response.
pub(crate) fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::to_vec(&ApiError::new(code, message)).unwrap_or_default();
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// The 401 message for a revoked token.
pub(crate) const REVOKED: &str = "token revoked: you were removed from this room";

/// A 401: `token_revoked` for [`REVOKED`], else `unauthorized`.
pub(crate) fn unauthorized(message: String) -> Response {
    let code = if message == REVOKED {
        "token_revoked"
    } else {
        "unauthorized"
    };
    api_error(StatusCode::UNAUTHORIZED, code, message)
}

pub(crate) async fn room_is_live(st: &AppState, room: RoomId) -> Result<bool, String> {
    let cached = st
        .rooms
        .lock()
        .map_err(|_| "room cache poisoned".to_string())?
        .lookup(room, Instant::now());
    if cached == Some(RoomStatusAnswer::Live) {
        return Ok(true);
    }
    let answer = st.router.room_status(room).await?;
    if let Ok(mut c) = st.rooms.lock() {
        c.record(room, answer, Instant::now());
    }
    Ok(answer == RoomStatusAnswer::Live)
}

/// Build the edge's `Rtc` for one peer (WHIP publisher, WHEP or WebSocket listener): ICE-lite,
/// RTP mode, Opus with RFC 2198 RED when the peer offers it (a publisher's lost packet is
/// recovered from the next one, see [`crate::red`]), and only the RTP header extensions an audio
/// SFU uses (see [`audio_extensions`]).
pub(crate) fn publisher_rtc(creds: IceCreds, now: Instant) -> Rtc {
    Rtc::builder()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, true)
        .set_extension_map(audio_extensions())
        .set_local_ice_credentials(creds)
        .build(now)
}

/// RFC 6464 audio level (speaker selection, active speakers) and the BUNDLE `mid`. Transport-wide
/// congestion control is left out on purpose: the edge runs no bandwidth estimation for audio,
/// and negotiating it would make every subscriber send TWCC feedback the edge must parse and add
/// a sequence-number extension to every forwarded packet.
fn audio_extensions() -> ExtensionMap {
    let mut exts = ExtensionMap::empty();
    exts.set(1, Extension::AudioLevel);
    exts.set(4, Extension::RtpMid);
    exts
}

/// 404 if the geo-router says the room does not exist or ended, 503 if it cannot be asked.
pub(crate) async fn check_live(st: &AppState, room: RoomId) -> Result<(), Response> {
    match room_is_live(st, room).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(api_error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            "the room does not exist or has ended",
        )),
        Err(e) => {
            tracing::warn!(%room, error = %e, "geo-router lookup failed");
            Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "router_unavailable",
                "cannot check the room right now",
            ))
        }
    }
}

/// Display name from a token, bounded.
pub(crate) fn display_name(claims: &Claims) -> String {
    claims
        .name
        .chars()
        .take(amphi_protocol::api::MAX_NAME_CHARS)
        .collect()
}

/// Accept `offer` on a fresh `Rtc` with our candidate: (rtc, ufrag, answer SDP).
/// Accept `offer` on a new edge `Rtc`: the Rtc, its local ICE ufrag, the answer and the offer's
/// text (kept for ICE restarts).
pub(crate) fn answer_offer(
    st: &AppState,
    offer: str0m::change::SdpOffer,
) -> Result<(Rtc, String, String, String), Response> {
    let offer_sdp = offer.to_sdp_string();
    let creds = IceCreds::new();
    let ufrag = creds.ufrag.clone();
    let mut rtc = publisher_rtc(creds, Instant::now());
    let candidate = Candidate::host(st.candidate, "udp").map_err(|e| {
        tracing::error!(candidate = %st.candidate, error = %e, "bad media candidate address");
        api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "media address misconfigured",
        )
    })?;
    rtc.add_local_candidate(candidate);
    let answer = rtc.sdp_api().accept_offer(offer).map_err(|e| {
        // str0m's text can name internals: the client gets a fixed message.
        tracing::debug!(error = %e, "SDP offer not accepted");
        api_error(
            StatusCode::BAD_REQUEST,
            "bad_sdp",
            "the offer could not be accepted",
        )
    })?;
    Ok((rtc, ufrag, answer.to_sdp_string(), offer_sdp))
}

/// Hand a peer to the media driver.
pub(crate) async fn add_peer(st: &AppState, peer: NewPeer) -> Result<(), Response> {
    let (reply_tx, reply_rx) = oneshot::channel();
    let unavailable = || {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the media engine is not accepting peers",
        )
    };
    let shard = st.media.shard_of(&peer.session).unwrap_or(0);
    st.media.supersede(peer.participant, shard).await;
    st.media
        .send(
            shard,
            MediaCommand::Add {
                peer: Box::new(peer),
                reply: reply_tx,
            },
        )
        .await
        .map_err(|_| unavailable())?;
    match reply_rx.await {
        Ok(Ok(())) => Ok(()),
        _ => Err(unavailable()),
    }
}
