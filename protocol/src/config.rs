//! Configuration types of every role, deserialized from TOML (see `infra/config/`).

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// A named region with coordinates (degrees).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Region {
    /// Region name, e.g. `us-east`.
    pub name: String,
    /// Latitude in degrees.
    pub latitude: f64,
    /// Longitude in degrees.
    pub longitude: f64,
}

/// Built-in coordinates for the region names amphi knows (AWS regions and short aliases).
pub fn known_region(name: &str) -> Option<Region> {
    let (lat, lon) = match name {
        "us-east" | "us-east-1" => (38.95, -77.45), // N. Virginia
        "us-east-2" => (40.0, -83.0),               // Ohio
        "us-west" | "us-west-2" => (45.84, -119.7), // Oregon
        "us-west-1" => (37.35, -121.96),            // N. California
        "eu-west" | "eu-west-1" => (53.35, -6.26),  // Ireland
        "eu-west-2" => (51.51, -0.13),              // London
        "eu-central" | "eu-central-1" => (50.11, 8.68), // Frankfurt
        "ap-southeast" | "ap-southeast-1" => (1.29, 103.85), // Singapore
        "ap-southeast-2" => (-33.87, 151.21),       // Sydney
        "ap-northeast" | "ap-northeast-1" => (35.68, 139.69), // Tokyo
        "ap-south" | "ap-south-1" => (19.08, 72.88), // Mumbai
        "sa-east" | "sa-east-1" => (-23.55, -46.63), // São Paulo
        _ => return None,
    };
    Some(Region {
        name: name.to_string(),
        latitude: lat,
        longitude: lon,
    })
}

/// Paths of the PEM files for the QUIC mTLS link.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate that signs every mesh peer.
    pub ca: PathBuf,
    /// This node's certificate chain.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// HTTPS settings of a role's HTTP listener and HTTP clients (keys of its main section).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HttpTls {
    /// PEM certificate chain: with `tls_key`, `http_listen` speaks HTTPS only (HTTP/2 and
    /// HTTP/1.1 by ALPN); absent, plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Extra CA bundle (PEM) this role's TLS clients (HTTPS; the geo-router's `rediss://` Redis)
    /// trust besides the system roots: a private CA of the mesh's internal listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
}

impl HttpTls {
    /// The listener's certificate and key, when both are set; an error when only one is.
    pub fn listener(&self) -> Result<Option<(&std::path::Path, &std::path::Path)>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some((c, k))),
            (None, None) => Ok(None),
            _ => Err("tls_cert and tls_key go together".into()),
        }
    }
}

/// Per-client-address budgets of a role's HTTP listeners (keys of its main section; see
/// [`crate::limits`]). 0 turns a budget off.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections one address (IPv6: one /64) may hold open; past it, new ones get 503
    /// `too_many_connections` and are closed. Default 256.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: u32,
    /// Requests per second one client address may make, sustained (the geo-router keys it on
    /// the forwarded address behind `trusted_proxies`); past it, 429 `rate_limited` with
    /// `Retry-After`. Default 50.
    #[serde(default = "default_requests_per_second_per_ip")]
    pub requests_per_second_per_ip: u32,
    /// Requests one client address may make at once before the sustained rate applies.
    /// Default 200.
    #[serde(default = "default_request_burst_per_ip")]
    pub request_burst_per_ip: u32,
    /// Networks (CIDR or address) never limited: a load balancer or CDN in front, health
    /// checkers. Default loopback (`127.0.0.0/8`, `::1`).
    #[serde(default = "default_rate_limit_exempt")]
    pub rate_limit_exempt: Vec<String>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections_per_ip: default_max_connections_per_ip(),
            requests_per_second_per_ip: default_requests_per_second_per_ip(),
            request_burst_per_ip: default_request_burst_per_ip(),
            rate_limit_exempt: default_rate_limit_exempt(),
        }
    }
}

fn default_max_connections_per_ip() -> u32 {
    256
}

fn default_requests_per_second_per_ip() -> u32 {
    50
}

fn default_request_burst_per_ip() -> u32 {
    200
}

fn default_rate_limit_exempt() -> Vec<String> {
    vec!["127.0.0.0/8".into(), "::1/128".into()]
}

/// A token verification key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublicKeyConfig {
    /// Key id (`kid` in token headers).
    pub kid: String,
    /// SPKI PEM of the Ed25519 public key.
    pub pem: String,
}

/// `amphi edge` configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EdgeConfig {
    /// Edge id, unique in the mesh.
    pub id: String,
    /// Region this edge serves.
    pub region: String,
    /// Index of this edge (0..=4095), the high 12 bits of participant ids it allocates; unique
    /// per edge in the mesh.
    pub index: u16,
    /// HTTP listener (WHIP, WHEP, WebSocket).
    pub http_listen: SocketAddr,
    /// Public base URL of the HTTP listener (used in `Location` headers).
    pub public_url: String,
    /// This edge's own base URL for the other edges of its region (the push tier's relay tree:
    /// they pull rooms' program streams from it), sent in heartbeats. Without it the edge is
    /// never another edge's parent (it still pulls from its own parent).
    #[serde(default)]
    pub relay_url: Option<String>,
    /// The TLS server name checked on the certificates of `https://` parents in the relay tree,
    /// instead of their `relay_url`'s host: edges that serve one shared certificate (which names
    /// no instance's private address) set it to the name in that certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_server_name: Option<String>,
    /// Push listeners over WebTransport (`[edge.webtransport]`); absent: WebSocket only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webtransport: Option<WebTransportConfig>,
    /// UDP socket for all WebRTC media.
    pub media_listen: SocketAddr,
    /// Address advertised in ICE candidates (defaults to `media_listen`).
    #[serde(default)]
    pub media_public: Option<SocketAddr>,
    /// Every origin (`[[edge.origins]]`): the edge links to all of them and sends each room's
    /// traffic to the room's owner among the healthy ones, so a room whose origin dies moves to
    /// another. See [`EdgeConfig::origin_endpoints`].
    #[serde(default)]
    pub origins: Vec<OriginEndpoint>,
    /// One origin's QUIC address (older configs; use `origins`).
    #[serde(default)]
    pub origin_addr: Option<SocketAddr>,
    /// TLS server name of the `origin_addr` origin's certificate.
    #[serde(default)]
    pub origin_server_name: Option<String>,
    /// Geo-router base URL (room existence checks).
    pub router_url: String,
    /// Most interactive (WebRTC receive) listeners this edge serves; beyond it new WHEP and
    /// listener WebSocket sessions get 503 `capacity` (the route API sends them to HLS).
    #[serde(default = "default_interactive_capacity")]
    pub interactive_capacity: usize,
    /// Media driver threads ("shards"): peers are spread over them, each owning its peers' WebRTC
    /// state and sending their packets, all on the one `media_listen` port (`SO_REUSEPORT`).
    /// 0 (the default) means one per available core, at most 16.
    #[serde(default)]
    pub media_threads: usize,
    /// HTTPS listener and client settings (`tls_cert`, `tls_key`, `tls_ca`).
    #[serde(flatten)]
    pub https: HttpTls,
    /// Per-client-address connection and request budgets of `http_listen`.
    #[serde(flatten)]
    pub limits: HttpLimits,
    /// Seconds a WebRTC session (WHIP, WHEP, WebSocket) may take to connect (ICE + DTLS) after
    /// its answer before the edge drops it. Default 15.
    #[serde(default = "default_ice_connect_timeout_secs")]
    pub ice_connect_timeout_secs: u64,
    /// Tokens whose lifetime (`exp - iat`) exceeds this many seconds are refused. Default 86400.
    #[serde(default = "default_max_token_lifetime_secs")]
    pub max_token_lifetime_secs: u64,
    /// A session (WebSocket, WHIP, WHEP) ends this many seconds after its token's `exp` unless
    /// the client refreshed the token first (`refresh_token` message, or `PATCH` with the new
    /// bearer token). Default 30.
    #[serde(default = "default_token_expiry_grace_secs")]
    pub token_expiry_grace_secs: u64,
}

fn default_token_expiry_grace_secs() -> u64 {
    30
}

fn default_max_token_lifetime_secs() -> u64 {
    crate::token::DEFAULT_MAX_LIFETIME_SECS
}

impl EdgeConfig {
    /// The origins to link to: `origins`, or the single `origin_addr` / `origin_server_name`
    /// origin of an older config as a one-element list (id `origin`).
    pub fn origin_endpoints(&self) -> Result<Vec<OriginEndpoint>, OriginListError> {
        origin_list(
            &self.origins,
            self.origin_addr,
            self.origin_server_name.as_deref(),
        )
    }
}

fn default_ice_connect_timeout_secs() -> u64 {
    15
}

fn default_interactive_capacity() -> usize {
    500
}

/// The edge's WebTransport (HTTP/3) listener for push listeners (`docs/push.md`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebTransportConfig {
    /// UDP address (HTTP/3 over QUIC).
    pub listen: SocketAddr,
    /// Base URL browsers connect to (`https://host:port`). Default: `public_url`'s host with
    /// `listen`'s port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// PEM certificate chain browsers trust (a CA-issued one for the public name), with `key`.
    /// Without them the edge makes its own ECDSA P-256 certificate, valid 13 days and renewed
    /// every 6, and the router hands its SHA-256 to clients (`serverCertificateHashes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// `amphi origin` configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OriginConfig {
    /// Origin id.
    pub id: String,
    /// QUIC listener.
    pub quic_listen: SocketAddr,
    /// HTTP listener for `/metrics` (Prometheus text format).
    pub metrics_listen: SocketAddr,
    /// A live room without speakers for this many seconds is ended (ENDLIST, directory status
    /// `ended`, `room.ended` webhook), as if its host had ended it; until then its program keeps
    /// producing silence. 0: never. Default 3600.
    #[serde(default = "default_idle_room_timeout_secs")]
    pub idle_room_timeout_secs: u64,
    /// Sessions one user (token `sub`) may hold at once in one room, over every edge; further
    /// joins are refused with `limit`. Default 8.
    #[serde(default = "default_max_sessions_per_user")]
    pub max_sessions_per_user: usize,
}

fn default_max_sessions_per_user() -> usize {
    8
}

fn default_idle_room_timeout_secs() -> u64 {
    3600
}

/// `amphi packager` configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PackagerConfig {
    /// Packager id.
    pub id: String,
    /// Origins to take program streams from (`[[packager.origins]]`): the packager links to every
    /// one and packages each room from whichever origin owns it now, so a room that moves to
    /// another origin continues its HLS output. See [`PackagerConfig::origin_endpoints`].
    #[serde(default)]
    pub origins: Vec<OriginEndpoint>,
    /// One origin's QUIC address (older configs; use `origins`).
    #[serde(default)]
    pub origin_addr: Option<SocketAddr>,
    /// TLS server name of the `origin_addr` origin's certificate.
    #[serde(default)]
    pub origin_server_name: Option<String>,
    /// HTTP listener serving `/hls/...`.
    pub http_listen: SocketAddr,
    /// Directory for parts, segments, playlists and recordings.
    pub data_dir: PathBuf,
    /// Per-client-address connection and request budgets of the HTTP(S) listeners.
    #[serde(flatten)]
    pub limits: HttpLimits,
}

impl PackagerConfig {
    /// The origins to link to: `origins`, or the single `origin_addr` / `origin_server_name`
    /// origin of an older config as a one-element list (id `origin`).
    pub fn origin_endpoints(&self) -> Result<Vec<OriginEndpoint>, OriginListError> {
        origin_list(
            &self.origins,
            self.origin_addr,
            self.origin_server_name.as_deref(),
        )
    }
}

/// Why a role's origin list is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginListError {
    /// Neither `origins` nor `origin_addr` is set.
    #[error("no origin configured: set [[origins]] (or origin_addr and origin_server_name)")]
    Missing,
    /// Both forms are set.
    #[error("set either [[origins]] or origin_addr/origin_server_name, not both")]
    Both,
    /// `origin_addr` without `origin_server_name` or the reverse.
    #[error("origin_addr and origin_server_name go together")]
    Incomplete,
    /// Two origins share an id (the hashing key).
    #[error("origin id {0:?} appears twice")]
    DuplicateId(String),
}

/// One origin list from the list form or the single-origin form of a config.
fn origin_list(
    origins: &[OriginEndpoint],
    addr: Option<SocketAddr>,
    server_name: Option<&str>,
) -> Result<Vec<OriginEndpoint>, OriginListError> {
    match (origins.is_empty(), addr, server_name) {
        (true, None, None) => Err(OriginListError::Missing),
        (false, None, None) => {
            for (i, o) in origins.iter().enumerate() {
                if origins[..i].iter().any(|p| p.id == o.id) {
                    return Err(OriginListError::DuplicateId(o.id.clone()));
                }
            }
            Ok(origins.to_vec())
        }
        (false, _, _) => Err(OriginListError::Both),
        (true, Some(addr), Some(name)) => Ok(vec![OriginEndpoint {
            id: "origin".into(),
            addr,
            server_name: name.to_string(),
        }]),
        (true, _, _) => Err(OriginListError::Incomplete),
    }
}

/// An edge as the geo-router knows it (static list until the registry exists).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EdgeEndpoint {
    /// Edge id.
    pub id: String,
    /// Region and its coordinates.
    pub region: Region,
    /// Public HTTP base URL of the edge.
    pub public_url: String,
}

/// An origin as the geo-router knows it (rooms are assigned to origins by rendezvous hashing).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OriginEndpoint {
    /// Origin id (the hashing key: keep it stable).
    pub id: String,
    /// QUIC address of the origin.
    pub addr: SocketAddr,
    /// TLS server name of the origin certificate.
    pub server_name: String,
}

/// `amphi geo-router` configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RouterConfig {
    /// HTTP listener (REST API, web client, `/hls` proxy).
    pub http_listen: SocketAddr,
    /// Public base URL clients use to reach the router.
    pub public_url: String,
    /// Region for clients the router cannot place.
    pub default_region: String,
    /// Known edges (static entry points, e.g. a region's load balancer). Optional: edges that
    /// register themselves by heartbeat need no entry.
    #[serde(default)]
    pub edges: Vec<EdgeEndpoint>,
    /// Base URL of the packager's HTTP origin (proxied under `/hls`).
    pub packager_url: String,
    /// Dev mode: open API, `?region=` overrides.
    #[serde(default)]
    pub dev_mode: bool,
    /// Token lifetime in seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// Tokens whose lifetime (`exp - iat`) exceeds this many seconds are refused (host tokens on
    /// `POST /v1/rooms/{id}/end`); `token_ttl_secs` may not exceed it. Default 86400.
    #[serde(default = "default_max_token_lifetime_secs")]
    pub max_token_lifetime_secs: u64,
    /// This router's id (sent to origins in `Hello`).
    #[serde(default = "default_router_id")]
    pub id: String,
    /// Origins the router links to (mTLS QUIC, as a `router` peer) to end rooms and hear of ends.
    #[serde(default)]
    pub origins: Vec<OriginEndpoint>,
    /// GeoIP City databases (.mmdb, GeoIP2 or dbip flat schema), consulted in order.
    #[serde(default)]
    pub geoip: Vec<PathBuf>,
    /// Proxies (CIDR) whose `Forwarded` / `X-Forwarded-For` headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Edges at or above this load (0..=1) spill new sessions to the next nearest edge.
    #[serde(default = "default_load_threshold")]
    pub load_threshold: f64,
    /// Interactive sessions per room per edge; beyond it listeners are routed to the push tier.
    #[serde(default = "default_room_interactive_capacity")]
    pub interactive_capacity: u32,
    /// Push listeners per room per edge; beyond it listeners are routed to HLS (0: no push
    /// tier). Default 10000.
    #[serde(default = "default_room_push_capacity")]
    pub push_capacity: u32,
    /// Keep each room's sessions in a region on as few edges as possible (the edge of the
    /// region already holding most of the room, while under `load_threshold`). Default true.
    #[serde(default = "default_true")]
    pub room_affine: bool,
    /// Children per edge in each region's relay tree for the push tier: the region's edges that
    /// advertise a `relay_url`, in id order, form a tree of this fan-out whose root is fed by
    /// the origins and whose other edges pull from their parent (0: no tree, every edge is fed
    /// by the origins). Default 10.
    #[serde(default = "default_relay_fanout")]
    pub relay_fanout: u32,
    /// API keys (HMAC secrets) that may create rooms, mint tokens and operate edges in production.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Webhook receivers.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// Redis URL (`redis://127.0.0.1:6379/0`) for the shared room directory and edge registry;
    /// in memory when absent.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// A live room with no activity for this many seconds (after its start) is ended by the
    /// router. Activity: an edge heartbeat listing it (edges list rooms with interactive
    /// listeners), a route request or a token minted for it. Default 21600 (6 h).
    #[serde(default = "default_room_idle_timeout_secs")]
    pub room_idle_timeout_secs: u64,
    /// How long before a scheduled room's start its reminder subscribers are told
    /// (`room_reminder` webhook, reason `starting_soon`). Default 600 (10 min).
    #[serde(default = "default_reminder_lead_secs")]
    pub reminder_lead_secs: u64,
    /// Base URL of the HLS tier handed to listeners (`{hls_base_url}/hls/{room}/index.m3u8`):
    /// the CDN in production; absent, `public_url` (the router's own `/hls` proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hls_base_url: Option<String>,
    /// The plain HTTP listener answers `GET /v1/route` on its own HTTP/1.1 fast path (one
    /// write per answer, no hyper per request; default); `false`: everything through hyper,
    /// like the HTTPS listener.
    #[serde(default = "default_true")]
    pub http1_fast_path: bool,
    /// HTTPS listener and client settings (`tls_cert`, `tls_key`, `tls_ca`).
    #[serde(flatten)]
    pub https: HttpTls,
    /// Per-client-address connection and request budgets of `http_listen`.
    #[serde(flatten)]
    pub limits: HttpLimits,
}

/// What an API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiScope {
    /// An edge: heartbeats (registration) only.
    Edge,
    /// The application: create and end rooms, mint tokens, revoke tokens.
    App,
    /// An operator: everything (edges list and drain included).
    Admin,
}

impl ApiScope {
    /// Whether a key of this scope may make a request that needs `needed`.
    pub fn allows(self, needed: ApiScope) -> bool {
        self == ApiScope::Admin || self == needed
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiScope::Edge => "edge",
            ApiScope::App => "app",
            ApiScope::Admin => "admin",
        }
    }
}

/// An API key: requests are signed with HMAC-SHA256 under `secret` (see the OpenAPI document).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiKeyConfig {
    /// Key id, sent as `X-Amphi-Key`.
    pub id: String,
    /// Shared secret.
    pub secret: String,
    /// What the key may do: `edge` (heartbeats), `app` (rooms, tokens) or `admin` (everything).
    pub scope: ApiScope,
}

impl std::fmt::Debug for ApiKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyConfig")
            .field("id", &self.id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// A webhook receiver: events are POSTed as JSON, signed with HMAC-SHA256 under `secret`.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Receiver URL (`https://` or `http://`).
    pub url: String,
    /// Shared secret for `X-Amphi-Webhook-Signature`.
    pub secret: String,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn default_load_threshold() -> f64 {
    0.8
}

fn default_relay_fanout() -> u32 {
    10
}

fn default_room_push_capacity() -> u32 {
    10_000
}

fn default_true() -> bool {
    true
}

fn default_room_interactive_capacity() -> u32 {
    500
}

fn default_router_id() -> String {
    "geo-router".into()
}

fn default_room_idle_timeout_secs() -> u64 {
    21_600
}

fn default_reminder_lead_secs() -> u64 {
    600
}

fn default_token_ttl() -> u64 {
    6 * 3600
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn packager(extra: serde_json::Value) -> PackagerConfig {
        let mut v = json!({"id": "p", "http_listen": "127.0.0.1:1", "data_dir": "d"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn packager_takes_an_origin_list_or_the_old_single_origin() {
        let list = packager(json!({"origins": [
            {"id": "o1", "addr": "127.0.0.1:4433", "server_name": "a"},
            {"id": "o2", "addr": "127.0.0.1:4434", "server_name": "a"},
        ]}));
        let ids: Vec<_> = list
            .origin_endpoints()
            .unwrap()
            .into_iter()
            .map(|o| o.id)
            .collect();
        assert_eq!(ids, ["o1", "o2"]);
        let old = packager(json!({"origin_addr": "127.0.0.1:4433", "origin_server_name": "a"}));
        assert_eq!(
            old.origin_endpoints().unwrap(),
            vec![OriginEndpoint {
                id: "origin".into(),
                addr: "127.0.0.1:4433".parse().unwrap(),
                server_name: "a".into(),
            }]
        );
        let both = PackagerConfig {
            origins: list.origins.clone(),
            ..old.clone()
        };
        assert_eq!(both.origin_endpoints(), Err(OriginListError::Both));
        let none = PackagerConfig {
            origin_addr: None,
            origin_server_name: None,
            ..old.clone()
        };
        assert_eq!(none.origin_endpoints(), Err(OriginListError::Missing));
        let half = PackagerConfig {
            origin_server_name: None,
            ..old
        };
        assert_eq!(half.origin_endpoints(), Err(OriginListError::Incomplete));
        let mut dup = list;
        dup.origins[1].id = "o1".into();
        assert_eq!(
            dup.origin_endpoints(),
            Err(OriginListError::DuplicateId("o1".into()))
        );
    }

    #[test]
    fn edge_takes_an_origin_list_or_the_old_single_origin() {
        let edge = |extra: serde_json::Value| -> EdgeConfig {
            let mut v = json!({"id": "e", "region": "r", "index": 1,
                "http_listen": "127.0.0.1:1", "public_url": "http://e",
                "media_listen": "127.0.0.1:2", "router_url": "http://r"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            serde_json::from_value(v).unwrap()
        };
        let list = edge(json!({"origins": [
            {"id": "o1", "addr": "127.0.0.1:4433", "server_name": "a"},
            {"id": "o2", "addr": "127.0.0.1:4434", "server_name": "a"},
        ]}));
        let ids: Vec<_> = list
            .origin_endpoints()
            .unwrap()
            .into_iter()
            .map(|o| o.id)
            .collect();
        assert_eq!(ids, ["o1", "o2"]);
        let old = edge(json!({"origin_addr": "127.0.0.1:4433", "origin_server_name": "a"}));
        assert_eq!(old.origin_endpoints().unwrap().len(), 1);
        assert_eq!(
            edge(json!({})).origin_endpoints(),
            Err(OriginListError::Missing)
        );
    }
}
