//! The geo-router's HTTP driver: REST API, route API, web client, and the `/hls` proxy.

use crate::directory::Directory;
use crate::origins::{OriginEvent, OriginLinks};
use crate::select::{select_edge, ClientPlace, SelectError};
use amphi_protocol::api::{
    ApiError, CreateRoomRequest, CreateRoomResponse, MintTokenRequest, RouteResponse,
    TokenResponse, MAX_NAME_CHARS, MAX_TITLE_CHARS,
};
use amphi_protocol::config::RouterConfig;
use amphi_protocol::mtls::MtlsMaterial;
use amphi_protocol::token::{Claims, Role, TokenSigner, TokenVerifier};
use amphi_protocol::RoomId;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest request body the API accepts.
const MAX_BODY: usize = 16 * 1024;

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
    /// The server failed.
    #[error("serve: {0}")]
    Serve(std::io::Error),
    /// Origins are configured but the links cannot be set up.
    #[error("origin links: {0}")]
    Links(String),
}

#[derive(Default)]
struct Counters {
    rooms_created: AtomicU64,
    tokens_minted: AtomicU64,
    routes: AtomicU64,
    hls_proxied: AtomicU64,
    rooms_ended: AtomicU64,
}

struct AppState {
    config: RouterConfig,
    signer: TokenSigner,
    verifier: TokenVerifier,
    links: OriginLinks,
    directory: Mutex<Directory>,
    web: Vec<WebAsset>,
    hls_client: Client<HttpConnector, Body>,
    counters: Counters,
}

type Shared = Arc<AppState>;

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
        (self.status, Json(ApiError::new(self.code, self.message))).into_response()
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

/// Parse a JSON body, answering 400/413 with a JSON error body.
fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Failure> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "bad_body"
        };
        error(status, code, e.body_text())
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), Failure> {
    if value.trim().is_empty() || value.chars().count() > max {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_field",
            format!("{field} must be 1..={max} characters"),
        ));
    }
    Ok(())
}

fn parse_room(id: &str) -> Result<RoomId, Failure> {
    id.parse()
        .map_err(|_| error(StatusCode::NOT_FOUND, "room_not_found", "no such room"))
}

impl AppState {
    fn hls_url(&self, room: RoomId) -> String {
        format!("{}/hls/{room}/index.m3u8", self.config.public_url)
    }

    fn mint(&self, room: RoomId, role: Role, name: &str) -> String {
        let now = now_unix();
        let jti: u128 = rand::random();
        self.counters.tokens_minted.fetch_add(1, Ordering::Relaxed);
        self.signer.sign(&Claims {
            sub: format!("u-{:016x}", rand::random::<u64>()),
            name: name.to_string(),
            room,
            role,
            iat: now,
            exp: now + self.config.token_ttl_secs,
            jti: format!("{jti:032x}"),
        })
    }

    fn room_exists_live(&self, room: RoomId) -> bool {
        let dir = self.directory.lock().expect("directory lock");
        matches!(dir.get(room), Some(r) if r.status == amphi_protocol::api::RoomStatus::Live)
    }
}

async fn create_room(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Answer {
    let req: CreateRoomRequest = parse_json(body)?;
    check_text("title", &req.title, MAX_TITLE_CHARS)?;
    if let Some(topic) = &req.topic {
        check_text("topic", topic, MAX_NAME_CHARS)?;
    }
    let room = s
        .directory
        .lock()
        .expect("directory lock")
        .create(req.title, req.topic, now_unix());
    s.counters.rooms_created.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%room, "room created");
    let resp = CreateRoomResponse {
        room,
        host_token: s.mint(room, Role::Host, "host"),
        hls_url: s.hls_url(room),
    };
    Ok((StatusCode::CREATED, Json(resp)).into_response())
}

async fn list_rooms(State(s): State<Shared>) -> Response {
    let dir = s.directory.lock().expect("directory lock");
    let rooms: Vec<_> = dir
        .live()
        .into_iter()
        .map(|(id, r)| r.info(id, s.hls_url(id)))
        .collect();
    Json(serde_json::json!({ "rooms": rooms })).into_response()
}

async fn get_room(State(s): State<Shared>, Path(id): Path<String>) -> Answer {
    let room = parse_room(&id)?;
    let dir = s.directory.lock().expect("directory lock");
    match dir.get(room) {
        Some(entry) => Ok(Json(entry.info(room, s.hls_url(room))).into_response()),
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
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let room = parse_room(&id)?;
    let req: MintTokenRequest = parse_json(body)?;
    check_text("name", &req.name, MAX_NAME_CHARS)?;
    if req.role == Role::Host {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_role",
            "role must be listener or speaker; the host token comes with the room",
        ));
    }
    if !s.room_exists_live(room) {
        return Err(error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            "no such live room",
        ));
    }
    Ok(Json(TokenResponse {
        token: s.mint(room, req.role, &req.name),
    })
    .into_response())
}

/// The bearer token of a request, if well-formed.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// `POST /v1/rooms/{id}/end`: the room's host (Bearer host token) ends it.
async fn end_room(State(s): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Answer {
    let room = parse_room(&id)?;
    let Some(token) = bearer(&headers) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a host token (Authorization: Bearer) is required",
        ));
    };
    let claims = s.verifier.verify(token, now_unix()).map_err(|e| {
        tracing::info!(%room, reason = %e, "end refused");
        error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("invalid token: {e}"),
        )
    })?;
    if claims.room != room || claims.role != Role::Host {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only this room's host may end it",
        ));
    }
    let ended = {
        let mut dir = s.directory.lock().expect("directory lock");
        if dir.get(room).is_none() {
            return Err(error(
                StatusCode::NOT_FOUND,
                "room_not_found",
                "no such room",
            ));
        }
        dir.end(room)
    };
    if ended {
        s.counters.rooms_ended.fetch_add(1, Ordering::Relaxed);
        let origin = s.links.end_room(room);
        tracing::info!(%room, origin = ?origin, "room ended by its host");
    }
    let dir = s.directory.lock().expect("directory lock");
    let entry = dir.get(room).expect("room exists");
    Ok(Json(entry.info(room, s.hls_url(room))).into_response())
}

/// Apply what the origins report (room ends from elsewhere) to the directory.
async fn apply_origin_events(s: Shared, mut rx: mpsc::UnboundedReceiver<OriginEvent>) {
    while let Some(ev) = rx.recv().await {
        match ev {
            OriginEvent::RoomEnded { room, origin } => {
                let ended = s.directory.lock().expect("directory lock").end(room);
                if ended {
                    s.counters.rooms_ended.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%room, %origin, "room ended (reported by origin)");
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct RouteQuery {
    room: Option<String>,
    region: Option<String>,
}

fn ws_base(http: &str) -> String {
    if let Some(rest) = http.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = http.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        http.to_string()
    }
}

async fn route(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    query: Result<Query<RouteQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Ok(Query(q)) = query else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "malformed query string",
        ));
    };
    let Some(room) = q.room.as_deref() else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "room is required",
        ));
    };
    let room = parse_room(room)?;
    if !s.room_exists_live(room) {
        return Err(error(
            StatusCode::NOT_FOUND,
            "room_not_found",
            "no such live room",
        ));
    }
    let place = match q.region.as_deref() {
        Some(region) if s.config.dev_mode => ClientPlace::Region(region),
        _ => ClientPlace::Unknown,
    };
    let choice =
        select_edge(place, &s.config.edges, &s.config.default_region).map_err(|e| match e {
            SelectError::UnknownRegion(_) => {
                error(StatusCode::BAD_REQUEST, "unknown_region", e.to_string())
            }
            SelectError::NoEdge => error(StatusCode::SERVICE_UNAVAILABLE, "no_edge", e.to_string()),
        })?;
    s.counters.routes.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%room, %peer, edge = %choice.edge.id, why = %choice.why, "routed");
    let edge = choice.edge;
    Ok(Json(RouteResponse {
        region: edge.region.name.clone(),
        edge: edge.id.clone(),
        whip_url: format!("{}/whip/{room}", edge.public_url),
        whep_url: format!("{}/whep/{room}", edge.public_url),
        ws_url: format!("{}/v1/ws", ws_base(&edge.public_url)),
        hls_url: s.hls_url(room),
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
    s.counters.hls_proxied.fetch_add(1, Ordering::Relaxed);
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
    let c = &s.counters;
    let live = s.directory.lock().expect("directory lock").live().len();
    let text = format!(
        "# TYPE amphi_router_rooms_created_total counter\namphi_router_rooms_created_total {}\n\
         # TYPE amphi_router_tokens_minted_total counter\namphi_router_tokens_minted_total {}\n\
         # TYPE amphi_router_routes_total counter\namphi_router_routes_total {}\n\
         # TYPE amphi_router_hls_proxied_total counter\namphi_router_hls_proxied_total {}\n\
         # TYPE amphi_router_rooms_ended_total counter\namphi_router_rooms_ended_total {}\n\
         # TYPE amphi_router_origin_links gauge\namphi_router_origin_links {}\n\
         # TYPE amphi_router_live_rooms gauge\namphi_router_live_rooms {}\n",
        c.rooms_created.load(Ordering::Relaxed),
        c.tokens_minted.load(Ordering::Relaxed),
        c.routes.load(Ordering::Relaxed),
        c.hls_proxied.load(Ordering::Relaxed),
        c.rooms_ended.load(Ordering::Relaxed),
        s.links.connected(),
        live,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
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

/// Build the router's axum application (exposed for in-process tests).
fn app(state: Shared) -> Router {
    Router::new()
        .route("/v1/rooms", post(create_room).get(list_rooms))
        .route("/v1/rooms/{id}", get(get_room))
        .route("/v1/rooms/{id}/tokens", post(mint_token))
        .route("/v1/rooms/{id}/end", post(end_room))
        .route("/v1/route", get(route))
        .route("/hls/{*rest}", get(hls_proxy).head(hls_proxy))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(web_asset)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serve the geo-router until `shutdown` fires.
pub async fn run(setup: RouterSetup, shutdown: CancellationToken) -> Result<(), RouterError> {
    let addr = setup.config.http_listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RouterError::Bind { addr, source })?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
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
    let state = Arc::new(AppState {
        verifier: setup.signer.verifier(),
        links,
        config: setup.config,
        signer: setup.signer,
        directory: Mutex::new(Directory::default()),
        web: setup.web,
        hls_client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector),
        counters: Counters::default(),
    });
    tokio::spawn(apply_origin_events(state.clone(), events_rx));
    tracing::info!(%addr, "geo-router listening");
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
    .map_err(RouterError::Serve)
}
