//! The geo-router's HTTP driver: REST API (room directory, tokens, route, edge registry), the web
//! client, and the `/hls` proxy. Decisions are made by the sans-IO cores ([`crate::select`],
//! [`crate::registry`], [`crate::directory`], [`crate::client_ip`], [`crate::auth`]).

use crate::auth::{
    ApiKeys, ApiScope, AuthError, ReplayCache, KEY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use crate::bodies;
use crate::client_ip::client_ip;
use crate::directory::{
    topic_matches, Cursor, Expiry, LiveRooms, DEFAULT_PAGE, MAX_EXPIRED_PER_PASS, MAX_PAGE,
};
use crate::geoip::GeoIp;
use crate::metrics::{EdgeHealth, Metrics};
use crate::origins::{OriginEvent, OriginLinks};
use crate::registry::HEARTBEAT_INTERVAL;
use crate::reminders::SoonWindow;
use crate::select::{GeoPoint, Policy};
use crate::store::{EndOutcome, MemoryStore, Now, RedisStore, Store, StoreError, SYNC_INTERVAL};
use crate::webhooks::{EventKind, Webhooks};
use amphi_common::mtls::MtlsMaterial;
use amphi_protocol::api::{
    ApiError, CreateRoomResponse, EdgeHeartbeat, HeartbeatAnswer, RelayParent, RevokeTokenResponse,
    RoomStatus, RoomTiers, TokenResponse,
};
use amphi_protocol::config::{known_region, RouterConfig};
use amphi_protocol::https::{HttpsClient, Limiter};
use amphi_protocol::token::{Claims, RelayGrant, Role, TokenSigner, TokenVerifier};
use amphi_protocol::RoomId;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod edges;
mod end_room;
mod recording;
mod reminders;
mod reports;
mod route;
mod tasks;

use edges::{drain_edge, edge_heartbeat, list_edges};
use end_room::end_room;
use recording::{delete_recording, publish_recording, recording, watch_recording};
use route::{route, Front, RouteFront};
use tasks::{apply_origin_events, housekeeping, sync_store};

/// Prefix of every key the router keeps in Redis.
pub const REDIS_PREFIX: &str = "amphi:";
/// Largest request body the API accepts.
pub const MAX_BODY: usize = 16 * 1024;
/// A declared body over its route's limit but at most this large is read and dropped before the
/// 413, so a client that already sent it gets the answer rather than a reset connection; a
/// larger one is refused unread.
const MAX_DRAINED_BODY: usize = 64 * 1024;
/// Largest heartbeat body (it lists rooms).
const MAX_HEARTBEAT_BODY: usize = 256 * 1024;
/// How long after a room ends the router waits for its recording (`recording_ready` webhook).
pub const RECORDING_WAIT: std::time::Duration = std::time::Duration::from_secs(180);
/// How often the packager is asked whether an ended room's recording is there.
const RECORDING_POLL: std::time::Duration = std::time::Duration::from_secs(1);
/// Signed requests remembered (per router process) to refuse replays; beyond it, signed requests
/// are refused until the oldest leave the window.
const MAX_REMEMBERED_SIGNATURES: usize = 500_000;
/// Revoked (room, user) entries the router holds at most.
const MAX_REMEMBERED_REVOCATIONS: usize = 100_000;

/// A static file of the web client, embedded by the binary.
#[derive(Clone, Debug)]
pub struct WebAsset {
    /// URL path, e.g. `/` or `/app.js`.
    pub path: &'static str,
    /// Content type.
    pub content_type: &'static str,
    /// File contents.
    pub body: &'static [u8],
}

/// Everything the router needs to run.
pub struct RouterSetup {
    /// Configuration.
    pub config: RouterConfig,
    /// The token signing key.
    pub signer: TokenSigner,
    /// The web client's files.
    pub web: Vec<WebAsset>,
    /// Client certificate for the QUIC links to `config.origins` (required when origins are set).
    pub mesh_tls: Option<MtlsMaterial>,
}

/// Why the router could not run.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The listener could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Origins are configured but the links cannot be set up.
    #[error("origin links: {0}")]
    Links(String),
    /// The configuration cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// The HTTPS listener's certificate or key, or the clients' extra CA, is unusable.
    #[error("HTTPS: {0}")]
    Https(#[from] amphi_protocol::https::HttpsError),
    /// The shared store (Redis) cannot be reached.
    #[error("store: {0}")]
    Store(String),
    /// A GeoIP database cannot be opened.
    #[error(transparent)]
    GeoIp(#[from] crate::geoip::GeoIpError),
}

struct AppState {
    config: RouterConfig,
    signer: TokenSigner,
    verifier: TokenVerifier,
    links: OriginLinks,
    /// Room directory and edge registry (in memory, or shared through Redis).
    store: Arc<dyn Store>,
    geoip: GeoIp,
    trusted: Vec<IpNet>,
    api_keys: ApiKeys,
    /// Users the origins revoked (kicked), per room: no tokens are minted for them.
    revoked: std::sync::Mutex<amphi_protocol::token::Revocations>,
    /// Signatures accepted recently (a signed request is accepted once).
    replays: std::sync::Mutex<ReplayCache>,
    policy: Policy,
    /// The default region's coordinates (where unplaceable clients are put).
    anchor: Option<GeoPoint>,
    webhooks: Webhooks,
    web: Vec<WebAsset>,
    hls_client: HttpsClient<Body>,
    metrics: Metrics,
    /// Per-client-address connection and request budgets.
    limiter: Limiter,
    /// Rooms `/v1/route` saw live recently.
    live: std::sync::Mutex<LiveRooms>,
    /// `/v1/route` answers, while the registry stays as they were made at.
    answers: std::sync::Mutex<crate::answer_cache::AnswerCache<route::Routed>>,
    /// This state's id among the routers of the process (the worker threads' answer memos).
    memo_owner: u64,
    /// The registry's generation, read without its lock.
    generation: crate::registry::GenerationWatch,
    /// Rooms ended through this router (each end invalidates the threads' memo answers).
    ends: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Shared = Arc<AppState>;

/// A new [`AppState::memo_owner`].
fn next_memo_owner() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A failed request: answered with its status and a JSON [`ApiError`] body.
struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(ApiError::new(self.code, self.message))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Heartbeat(e) => {
                error(StatusCode::BAD_REQUEST, "bad_heartbeat", e.to_string())
            }
            e => {
                tracing::warn!(error = %e, "store failed");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the room directory is unavailable, retry shortly",
                )
            }
        }
    }
}

impl From<bodies::BodyError> for Failure {
    fn from(e: bodies::BodyError) -> Self {
        let status = match e.refusal {
            bodies::Refusal::BadRequest => StatusCode::BAD_REQUEST,
            bodies::Refusal::Forbidden => StatusCode::FORBIDDEN,
        };
        error(status, e.code, e.message)
    }
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        status,
        code,
        message: message.into(),
    }
}

/// What a handler answers: a response, or a JSON error.
type Answer = Result<Response, Failure>;

/// The request body, at most `max` bytes: a larger declared `Content-Length` is refused 413
/// (read and dropped first only up to [`MAX_DRAINED_BODY`]), and reading stops (413) at
/// `max + 1` bytes.
async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, Failure> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds {max} bytes"),
        )
    };
    let declared =
        header_str(headers, header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > max as u64) {
        if n <= MAX_DRAINED_BODY as u64 {
            let _ = axum::body::to_bytes(body, MAX_DRAINED_BODY).await;
        }
        return Err(too_large());
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        let e = e.into_inner();
        if e.is::<http_body_util::LengthLimitError>() {
            too_large()
        } else {
            tracing::debug!(error = %e, "request body unreadable");
            error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the request body could not be read",
            )
        }
    })
}

/// Parse a JSON body, answering 400 with a JSON error body (serde's message names the field or
/// position at fault, never server state).
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))
}

fn parse_room(id: &str) -> Result<RoomId, Failure> {
    id.parse()
        .map_err(|_| error(StatusCode::NOT_FOUND, "room_not_found", "no such room"))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The bearer token of a request, if well-formed.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl AppState {
    /// Where listeners fetch HLS: the CDN (`hls_base_url`), else this router's `/hls` proxy.
    fn hls_base(&self) -> &str {
        self.config
            .hls_base_url
            .as_deref()
            .unwrap_or(&self.config.public_url)
            .trim_end_matches('/')
    }

    fn hls_url(&self, room: RoomId) -> String {
        format!("{}/hls/{room}/index.m3u8", self.hls_base())
    }

    /// A token for `user` (the application's user id; `None`: a random one).
    fn mint(&self, room: RoomId, role: Role, name: &str, user: Option<String>) -> String {
        let now = now_unix();
        let jti: u128 = rand::random();
        self.metrics.tokens_minted.inc();
        self.signer.sign(&Claims {
            sub: user.unwrap_or_else(|| format!("u-{:016x}", rand::random::<u64>())),
            name: name.to_string(),
            room,
            role,
            iat: now,
            exp: now + self.config.token_ttl_secs,
            jti: format!("{jti:032x}"),
        })
    }

    async fn room_status(&self, room: RoomId) -> Result<Option<RoomStatus>, Failure> {
        let now = now_unix();
        Ok(self.store.room(room).await?.map(|r| r.status(now)))
    }

    /// Whether `room` is live, for `/v1/route`: trusted from [`LiveRooms`] for
    /// [`crate::directory::LIVE_TRUST`] after the store last said so.
    async fn route_live(&self, room: RoomId) -> Result<bool, Failure> {
        let now = Instant::now();
        if lock(&self.live).is_live(room, now) {
            return Ok(true);
        }
        let entry = self.store.room(room).await?;
        let live = entry
            .as_ref()
            .is_some_and(|e| e.status(now_unix()) == RoomStatus::Live);
        if live {
            let tiers = entry.and_then(|e| e.tiers);
            lock(&self.live).saw_live(room, now, tiers);
            // Someone is joining: the room is active (at most once per trust period here).
            self.touch(room).await;
        }
        Ok(live)
    }

    /// Activity in `room` (a route request, a token minted) keeps it from idle expiry.
    async fn touch(&self, room: RoomId) {
        if let Err(e) = self.store.touch(room, now_unix()).await {
            tracing::debug!(%room, error = %e, "room activity not recorded");
        }
    }

    /// `room` ended (through this router): routes stop at once.
    fn ended(&self, room: RoomId) {
        lock(&self.live).forget(room);
        self.ends.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// What a worker thread's remembered route answer must still match (read before the
    /// room's liveness is).
    fn memo_stamp(&self) -> crate::answer_cache::MemoStamp {
        crate::answer_cache::MemoStamp {
            owner: self.memo_owner,
            generation: self.generation.get(),
            ends: self.ends.load(std::sync::atomic::Ordering::Acquire),
        }
    }

    fn registry(&self) -> std::sync::RwLockReadGuard<'_, crate::registry::Registry> {
        crate::store::read(self.store.registry())
    }

    fn listeners(&self, room: RoomId) -> u32 {
        self.registry().room_sessions(room, Instant::now())
    }

    /// Check the API key signature of a request, that the key's scope allows `needs`, and that
    /// the signed request was not seen before. Returns the key id.
    fn check_api_key(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        needs: ApiScope,
    ) -> Result<String, Failure> {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let now = now_unix();
        let signature = header_str(headers, SIGNATURE_HEADER);
        let checked = self
            .api_keys
            .verify(
                header_str(headers, KEY_HEADER),
                header_str(headers, TIMESTAMP_HEADER),
                signature,
                method.as_str(),
                path,
                body,
                now,
            )
            .and_then(|(id, scope)| {
                if !scope.allows(needs) {
                    return Err(AuthError::Scope {
                        have: scope.as_str(),
                        needs: needs.as_str(),
                    });
                }
                // Reads change nothing: a poller may repeat one within a second. Every
                // request that changes state is accepted once.
                if !matches!(*method, Method::GET | Method::HEAD) {
                    self.replays
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .check(signature.unwrap_or_default(), now)?;
                }
                Ok(id.to_string())
            });
        checked.map_err(|e| {
            self.metrics.auth_failures.inc();
            tracing::info!(path, reason = %e, "API key refused");
            match e {
                AuthError::Scope { .. } => {
                    error(StatusCode::FORBIDDEN, "api_key_scope", e.to_string())
                }
                AuthError::Replayed => {
                    error(StatusCode::UNAUTHORIZED, "replayed_request", e.to_string())
                }
                _ => error(StatusCode::UNAUTHORIZED, "bad_api_signature", e.to_string()),
            }
        })
    }

    /// Auth first, then the body: in production a request without a known API key and a fresh
    /// timestamp is refused (401) before a byte of its body is read; then at most `max` bytes
    /// are read ([`read_body`]) and the signature over them checked.
    async fn signed_body(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Body,
        max: usize,
        needs: ApiScope,
    ) -> Result<Bytes, Failure> {
        if !self.config.dev_mode {
            self.api_keys
                .precheck(
                    header_str(headers, KEY_HEADER),
                    header_str(headers, TIMESTAMP_HEADER),
                    now_unix(),
                )
                .map_err(|e| {
                    self.metrics.auth_failures.inc();
                    tracing::info!(path = uri.path(), reason = %e, "API key refused before the body");
                    error(StatusCode::UNAUTHORIZED, "bad_api_signature", e.to_string())
                })?;
        }
        let bytes = read_body(headers, body, max).await?;
        self.require_api_key(method, uri, headers, &bytes, needs)?;
        Ok(bytes)
    }

    /// Production mode requires an API key whose scope allows `needs`; dev mode is open.
    fn require_api_key(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        needs: ApiScope,
    ) -> Result<(), Failure> {
        if self.config.dev_mode {
            return Ok(());
        }
        self.check_api_key(method, uri, headers, body, needs)
            .map(|_| ())
    }
}

async fn create_room(
    State(s): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let bytes = s
        .signed_body(&method, &uri, &headers, body, MAX_BODY, ApiScope::App)
        .await?;
    let now = now_unix();
    let bodies::NewRoom {
        entry,
        host_name,
        host_user_id,
    } = bodies::create_room(&bytes, now)?;
    let live = entry.status(now) == RoomStatus::Live;
    let scheduled_at = entry.scheduled_at;
    let room = s.store.create_room(entry).await?;
    s.metrics.rooms_created.inc();
    tracing::info!(%room, ?scheduled_at, "room created");
    if live {
        s.webhooks.emit(
            EventKind::RoomStarted,
            now,
            serde_json::json!({ "room": room }),
        );
    }
    let resp = CreateRoomResponse {
        room,
        host_token: s.mint(room, Role::Host, &host_name, host_user_id),
        hls_url: s.hls_url(room),
    };
    Ok((StatusCode::CREATED, Json(resp)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    topic: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /v1/rooms`: one page of the live and scheduled rooms (live newest first, then
/// scheduled soonest first), at most `limit` (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]);
/// `next_cursor` resumes the walk. A topic filter applies to the page, so a page may hold fewer
/// rooms than `limit` while `next_cursor` says more follow.
async fn list_rooms(
    State(s): State<Shared>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let bad = || {
        error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "malformed query string (topic, limit, cursor)",
        )
    };
    let Ok(Query(q)) = query else {
        return Err(bad());
    };
    let cursor = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(text) => Some(Cursor::parse(text).ok_or_else(bad)?),
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let now = now_unix();
    let page = s.store.page(cursor, limit, now).await?;
    let mut rooms: Vec<_> = {
        let reg = s.registry();
        let at = Instant::now();
        page.rooms
            .into_iter()
            .filter(|(_, r)| topic_matches(r, q.topic.as_deref()))
            .map(|(id, r)| r.info(id, s.hls_url(id), now, reg.room_sessions(id, at)))
            .collect()
    };
    let scheduled: Vec<_> = rooms
        .iter()
        .map(|r| (r.room, r.status == RoomStatus::Scheduled))
        .collect();
    for (info, n) in rooms
        .iter_mut()
        .zip(reminders::counts(&s, &scheduled).await)
    {
        info.reminder_subscribers = n;
    }
    Ok(Json(serde_json::json!({
        "rooms": rooms,
        "next_cursor": page.next.map(|c| c.encode()),
    }))
    .into_response())
}

async fn get_room(State(s): State<Shared>, Path(id): Path<String>) -> Answer {
    let room = parse_room(&id)?;
    let listeners = s.listeners(room);
    match s.store.room(room).await? {
        Some(entry) => {
            let now = now_unix();
            let mut info = entry.info(room, s.hls_url(room), now, listeners);
            let scheduled = [(room, info.status == RoomStatus::Scheduled)];
            info.reminder_subscribers = reminders::counts(&s, &scheduled).await[0];
            Ok(Json(info).into_response())
        }
        None => Err(error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            "no such room",
        )),
    }
}

async fn mint_token(
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
    let req = bodies::mint_token(&bytes, s.config.dev_mode, |user| {
        s.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_revoked(room, user, now_unix())
    })?;
    match s.room_status(room).await? {
        Some(RoomStatus::Live) | Some(RoomStatus::Scheduled) => s.touch(room).await,
        _ => {
            return Err(error(
                StatusCode::NOT_FOUND,
                "room_not_found",
                "no such live or scheduled room",
            ))
        }
    }
    Ok(Json(TokenResponse {
        token: s.mint(room, req.role, &req.name, req.user_id),
    })
    .into_response())
}

/// `POST /v1/tokens/revoke` (API key, `app` scope): the token (or its `jti`) is refused from now
/// until its `exp`. Stored (Redis: a key expiring with the token) and sent to every origin,
/// which passes it to every edge: edges refuse it on WebSocket, WHIP and WHEP and end the
/// sessions it opened.
async fn revoke_token(
    State(s): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let bytes = s
        .signed_body(&method, &uri, &headers, body, MAX_BODY, ApiScope::App)
        .await?;
    let now = now_unix();
    let r = bodies::revoke_token(&bytes, &s.verifier, now)?;
    let revoked = r.until > now;
    if revoked {
        s.store.revoke_token(r.jti.clone(), r.until, now).await?;
        let origins = s.links.revoke_token(&r.jti, r.until);
        s.metrics.tokens_revoked.inc();
        tracing::info!(until = r.until, origins, "token revoked through the API");
    }
    Ok(Json(RevokeTokenResponse {
        jti: r.jti,
        until: r.until,
        revoked,
    })
    .into_response())
}

async fn hls_proxy(State(s): State<Shared>, req: Request<Body>) -> Answer {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "GET only",
        ));
    }
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let Ok(uri) = format!("{}{}", s.config.packager_url, path_and_query).parse::<Uri>() else {
        return Err(error(StatusCode::BAD_REQUEST, "bad_path", "malformed path"));
    };
    let mut upstream = Request::builder().method(req.method().clone()).uri(uri);
    for name in [header::ACCEPT, header::RANGE, header::IF_NONE_MATCH] {
        if let Some(v) = req.headers().get(&name) {
            upstream = upstream.header(name, v.clone());
        }
    }
    let upstream = upstream.body(Body::empty()).expect("valid request");
    s.metrics.hls_proxied.inc();
    match s.hls_client.request(upstream).await {
        Ok(resp) => Ok(resp.map(Body::new).into_response()),
        Err(e) => {
            tracing::warn!(error = %e, "hls upstream failed");
            Err(error(
                StatusCode::BAD_GATEWAY,
                "hls_unavailable",
                "HLS origin unreachable",
            ))
        }
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    let now = now_unix();
    match s.store.counts(now).await {
        Ok(counts) => {
            s.metrics
                .live_rooms
                .set(i64::try_from(counts.live).unwrap_or(i64::MAX));
            s.metrics
                .scheduled_rooms
                .set(i64::try_from(counts.scheduled).unwrap_or(i64::MAX));
        }
        Err(e) => tracing::warn!(error = %e, "store unavailable for metrics"),
    }
    let (edges, available) = {
        let reg = s.registry();
        let list = reg.list(Instant::now());
        let edges: Vec<EdgeHealth> = list
            .iter()
            .map(|(e, healthy, _)| EdgeHealth {
                edge: e.beat.id.clone(),
                region: e.beat.region.clone(),
                healthy: *healthy,
                load: e.load(),
            })
            .collect();
        (edges, list.iter().filter(|e| e.2).count())
    };
    s.metrics.set_edges(&edges, available);
    s.metrics
        .origin_links
        .set(i64::try_from(s.links.connected()).unwrap_or(i64::MAX));
    (
        [(header::CONTENT_TYPE, amphi_common::metrics::CONTENT_TYPE)],
        s.metrics.render(),
    )
        .into_response()
}

async fn web_asset(State(s): State<Shared>, uri: Uri) -> Answer {
    match s.web.iter().find(|a| a.path == uri.path()) {
        Some(a) => Ok((
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(a.content_type),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            a.body,
        )
            .into_response()),
        None => Err(error(StatusCode::NOT_FOUND, "not_found", "no such path")),
    }
}

/// Every route the router serves as (method, OpenAPI path) — checked against `docs/openapi.yaml`.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/rooms"),
    ("get", "/v1/rooms"),
    ("get", "/v1/rooms/{id}"),
    ("patch", "/v1/rooms/{id}"),
    ("post", "/v1/rooms/{id}/reminders"),
    ("get", "/v1/rooms/{id}/reminders"),
    ("delete", "/v1/rooms/{id}/reminders/{user_id}"),
    ("post", "/v1/rooms/{id}/tokens"),
    ("post", "/v1/rooms/{id}/end"),
    ("post", "/v1/tokens/revoke"),
    ("get", "/v1/rooms/{id}/recording"),
    ("get", "/v1/rooms/{id}/reports"),
    ("delete", "/v1/rooms/{id}/recording"),
    ("post", "/v1/rooms/{id}/recording/publish"),
    ("get", "/v1/route"),
    ("get", "/v1/edges"),
    ("put", "/v1/edges/{id}"),
    ("post", "/v1/edges/{id}/drain"),
    ("get", "/hls/{path}"),
    ("head", "/hls/{path}"),
    ("get", "/metrics"),
    ("get", "/healthz"),
];

/// Build the router's axum application (exposed for in-process tests).
fn app(state: Shared) -> Router {
    Router::new()
        .route("/v1/rooms", post(create_room).get(list_rooms))
        .route("/v1/rooms/{id}", get(get_room).patch(reminders::reschedule))
        .route(
            "/v1/rooms/{id}/reminders",
            post(reminders::subscribe).get(reminders::list),
        )
        .route(
            "/v1/rooms/{id}/reminders/{user_id}",
            axum::routing::delete(reminders::unsubscribe),
        )
        .route("/v1/rooms/{id}/tokens", post(mint_token))
        .route("/v1/rooms/{id}/end", post(end_room))
        .route("/v1/tokens/revoke", post(revoke_token))
        .route(
            "/v1/rooms/{id}/recording",
            get(recording).delete(delete_recording),
        )
        .route("/v1/rooms/{id}/recording/publish", post(publish_recording))
        .route("/v1/rooms/{id}/reports", get(reports::list))
        .route("/v1/route", get(route))
        .route("/v1/edges", get(list_edges))
        .route("/v1/edges/{id}", put(edge_heartbeat))
        .route("/v1/edges/{id}/drain", post(drain_edge))
        .route("/hls/{*rest}", get(hls_proxy).head(hls_proxy))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(web_asset)
        .layer(DefaultBodyLimit::max(MAX_HEARTBEAT_BODY))
        // One middleware layer (each costs a boxed future and a service clone per request):
        // the budget, then the request log.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            rate_limit,
        ))
        .with_state(state)
}

/// The real client address of a request: forwarded by a trusted proxy, else the TCP peer.
/// `X-Forwarded-For` (a name made once: looking a header up by text parses the text).
const X_FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");

fn real_client(s: &AppState, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    // Only a trusted proxy's forwarding headers are read (no header lookup for the others).
    if !crate::client_ip::is_trusted(peer, &s.trusted) {
        return peer;
    }
    client_ip(
        peer,
        headers
            .get_all(header::FORWARDED)
            .iter()
            .map(|v| v.as_bytes()),
        headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .map(|v| v.as_bytes()),
        &s.trusted,
    )
    .map_or(peer, |(ip, _)| ip)
}

/// Spend one request of the real client's budget (behind `trusted_proxies`, the forwarded
/// address), else answer 429 with `Retry-After`; requests within it are logged by
/// [`amphi_common::redact::log_request`], refusals here.
async fn rate_limit(
    State(s): State<Shared>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(peer) = peer {
        let client = real_client(&s, peer, req.headers());
        if let Err(r) = s.limiter.request(client) {
            let resp = amphi_protocol::https::refusal_response(&r);
            tracing::debug!(
                target: amphi_common::redact::REQUEST_LOG_TARGET,
                method = %req.method(),
                path = req.uri().path(),
                status = resp.status().as_u16(),
                "request"
            );
            return resp;
        }
    }
    amphi_common::redact::log_request(req, next).await
}

/// Serve the geo-router until `shutdown` fires.
pub async fn run(setup: RouterSetup, shutdown: CancellationToken) -> Result<(), RouterError> {
    let addr = setup.config.http_listen;
    let trusted = setup
        .config
        .trusted_proxies
        .iter()
        .map(|n| {
            n.parse::<IpNet>()
                .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| RouterError::Config(format!("trusted_proxies: {n:?} is not a CIDR")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !(0.0..=1.0).contains(&setup.config.load_threshold) {
        return Err(RouterError::Config(
            "load_threshold must be within 0..=1".into(),
        ));
    }
    if !setup.config.dev_mode && setup.config.api_keys.is_empty() {
        return Err(RouterError::Config(
            "production mode needs at least one api_keys entry".into(),
        ));
    }
    if setup.config.token_ttl_secs > setup.config.max_token_lifetime_secs {
        return Err(RouterError::Config(
            "token_ttl_secs may not exceed max_token_lifetime_secs".into(),
        ));
    }
    let geoip = GeoIp::open(&setup.config.geoip)?;
    for (path, kind) in geoip.describe() {
        tracing::info!(path = %path.display(), %kind, "GeoIP database open");
    }
    let acceptor = match setup.config.https.listener().map_err(RouterError::Config)? {
        Some((cert, key)) => Some(amphi_protocol::https::acceptor(cert, key)?),
        None => None,
    };
    let client_tls =
        amphi_protocol::https::client_tls_config(setup.config.https.tls_ca.as_deref())?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RouterError::Bind { addr, source })?;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let links = match (&setup.mesh_tls, setup.config.origins.is_empty()) {
        (_, true) => OriginLinks::none(),
        (Some(tls), false) => OriginLinks::start(
            &setup.config.id,
            &setup.config.default_region,
            setup.config.origins.clone(),
            tls,
            events_tx,
            shutdown.clone(),
        )
        .map_err(|e| RouterError::Links(e.to_string()))?,
        (None, false) => {
            return Err(RouterError::Links(
                "origins are configured but no mesh TLS material was given".into(),
            ))
        }
    };
    let anchor = known_region(&setup.config.default_region)
        .or_else(|| {
            setup
                .config
                .edges
                .iter()
                .find(|e| e.region.name == setup.config.default_region)
                .map(|e| e.region.clone())
        })
        .map(|r| GeoPoint {
            latitude: r.latitude,
            longitude: r.longitude,
        });
    let store: Arc<dyn Store> = match &setup.config.redis_url {
        None => Arc::new(MemoryStore::new(&setup.config.edges)),
        Some(url) => Arc::new(
            RedisStore::connect_trusting(
                url,
                REDIS_PREFIX,
                &setup.config.edges,
                match &setup.config.https.tls_ca {
                    Some(ca) => Some(amphi_protocol::https::root_bundle_pem(Some(ca))?),
                    None => None,
                },
            )
            .await
            .map_err(|e| RouterError::Store(e.to_string()))?,
        ),
    };
    tracing::info!(
        backend = store.backend(),
        "room directory and edge registry"
    );
    if store.backend() != "memory" {
        tokio::spawn(sync_store(store.clone(), shutdown.clone()));
    }
    let metrics = Metrics::default();
    let mut verifier = setup.signer.verifier();
    verifier.set_max_lifetime(setup.config.max_token_lifetime_secs);
    // Trusted proxies carry many clients' connections: their own are never capped.
    let mut limits = setup.config.limits.clone();
    limits
        .rate_limit_exempt
        .extend(setup.config.trusted_proxies.iter().cloned());
    let limiter = Limiter::new(&limits, metrics.http_limits.clone())
        .map_err(|e| RouterError::Config(e.to_string()))?;
    let generation = crate::store::read(store.registry()).generation_watch();
    let state = Arc::new(AppState {
        verifier,
        replays: std::sync::Mutex::new(ReplayCache::new(MAX_REMEMBERED_SIGNATURES)),
        revoked: std::sync::Mutex::new(amphi_protocol::token::Revocations::new(
            MAX_REMEMBERED_REVOCATIONS,
        )),
        links,
        store,
        geoip,
        trusted,
        api_keys: ApiKeys::new(
            setup
                .config
                .api_keys
                .iter()
                .map(|k| (k.id.clone(), k.secret.clone(), k.scope)),
        ),
        policy: Policy {
            load_threshold: setup.config.load_threshold,
            interactive_capacity: setup.config.interactive_capacity,
            push_capacity: setup.config.push_capacity,
            room_affine: setup.config.room_affine,
        },
        anchor,
        webhooks: Webhooks::start(
            setup.config.webhooks.clone(),
            amphi_protocol::https::client_with(client_tls.clone()),
            metrics.webhook_counters(),
            shutdown.clone(),
        ),
        config: setup.config,
        signer: setup.signer,
        web: setup.web,
        hls_client: amphi_protocol::https::client_with(client_tls),
        metrics,
        limiter: limiter.clone(),
        live: std::sync::Mutex::new(LiveRooms::default()),
        answers: Default::default(),
        memo_owner: next_memo_owner(),
        generation,
        ends: Default::default(),
    });
    tokio::spawn(apply_origin_events(state.clone(), events_rx));
    tokio::spawn(housekeeping(state.clone(), shutdown.clone()));
    tracing::info!(%addr, https = acceptor.is_some(), "geo-router listening");
    let routes = app(state.clone());
    if acceptor.is_none() && state.config.http1_fast_path {
        // `GET /v1/route` on the HTTP/1.1 fast path, the rest through [`Front`].
        let front = Arc::new(RouteFront { state, routes });
        amphi_protocol::h1::serve_fast(listener, front, shutdown, limiter).await;
        return Ok(());
    }
    // Each connection's service: [`Front`] over the app.
    let make = move |peer| Front {
        state: state.clone(),
        app: amphi_protocol::https::app_service(routes.clone(), peer),
        peer,
    };
    match acceptor {
        Some(acceptor) => {
            amphi_protocol::https::serve_tls_with(listener, acceptor, make, shutdown, limiter)
                .await;
            Ok(())
        }
        None => {
            amphi_protocol::https::serve_plain_with(listener, make, shutdown, limiter).await;
            Ok(())
        }
    }
}
