//! The edge's test harness: a fake geo-router, a passive quinn origin stand-in and edges started
//! with `amphi_edge::run`.

use amphi_common::mtls::{DevPki, MeshRole};
use amphi_edge::{run, EdgeSetup};
use amphi_protocol::api::{ApiError, RoomInfo, RoomStatus};
use amphi_protocol::config::EdgeConfig;
use amphi_protocol::control::{ControlDecoder, ControlMessage};
use amphi_protocol::room::{Participant, RoomCommand, RoomPhase, RoomRole, RoomState};
use amphi_protocol::token::{Claims, Role, TokenSigner};
use amphi_protocol::RoomId;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::net::free_port;

/// The origin stand-ins' certificate name.
pub const ORIGIN_NAME: &str = "origin.amphi.test";
/// A room the fake geo-router says is live.
pub const LIVE_ROOM: RoomId = RoomId(0x00aa_bbcc_dd00_0001);
/// A room the fake geo-router says has ended.
pub const ENDED_ROOM: RoomId = RoomId(0x00aa_bbcc_dd00_0002);
/// A room the fake geo-router does not know.
pub const UNKNOWN_ROOM: RoomId = RoomId(0x00aa_bbcc_dd00_0003);

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[derive(Clone)]
struct Rooms {
    live: Vec<RoomId>,
    ended: Vec<RoomId>,
}

async fn room_handler(State(rooms): State<Arc<Rooms>>, Path(id): Path<String>) -> Response {
    let Ok(room) = id.parse::<RoomId>() else {
        return (
            StatusCode::NOT_FOUND,
            Json(ApiError::new("room_not_found", "bad id")),
        )
            .into_response();
    };
    let status = if rooms.live.contains(&room) {
        RoomStatus::Live
    } else if rooms.ended.contains(&room) {
        RoomStatus::Ended
    } else {
        return (
            StatusCode::NOT_FOUND,
            Json(ApiError::new("room_not_found", "no such room")),
        )
            .into_response();
    };
    Json(RoomInfo {
        room,
        title: "test".into(),
        topic: None,
        status,
        created_at: 0,
        hls_url: "http://127.0.0.1/hls".into(),
        scheduled_at: None,
        ended_at: None,
        listeners: 0,
        reminder_subscribers: 0,
        tiers: None,
    })
    .into_response()
}

/// A fake geo-router answering `/v1/rooms/{id}`: LIVE_ROOM live, ENDED_ROOM ended, others 404.
pub async fn start_router() -> SocketAddr {
    let rooms = Arc::new(Rooms {
        live: vec![LIVE_ROOM],
        ended: vec![ENDED_ROOM],
    });
    let app = axum::Router::new()
        .route("/v1/rooms/{id}", axum::routing::get(room_handler))
        .with_state(rooms);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// What the origin stand-in observed.
pub struct FakeOrigin {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Control messages the edges sent.
    pub control: mpsc::UnboundedReceiver<ControlMessage>,
    /// Relay datagrams the edges sent.
    pub datagrams: mpsc::UnboundedReceiver<Bytes>,
    /// Control messages to send to the (first) connected edge.
    pub to_edge: mpsc::UnboundedSender<ControlMessage>,
    /// Its QUIC endpoint.
    pub endpoint: quinn::Endpoint,
}

/// The stand-in's answer to a `Join`: every join is admitted with its token role (or the role
/// it resumes), answered with the room's `RoomSnapshot` (the edge publishes only once admitted).
fn admit(rooms: &mut BTreeMap<RoomId, RoomState>, msg: &ControlMessage) -> Option<ControlMessage> {
    let ControlMessage::RoomCommand {
        room,
        actor,
        command:
            RoomCommand::Join {
                user,
                name,
                role,
                region,
                resume,
            },
        ..
    } = msg
    else {
        return None;
    };
    let state = rooms.entry(*room).or_insert_with(|| RoomState {
        room: *room,
        phase: RoomPhase::Live,
        participants: Vec::new(),
        hands: Vec::new(),
        banned: Vec::new(),
    });
    state.participants.retain(|p| p.id != *actor);
    state.participants.push(Participant {
        id: *actor,
        user: user.clone(),
        name: name.clone(),
        role: resume.unwrap_or_else(|| RoomRole::from_token(*role)),
        region: region.clone(),
        muted: false,
    });
    Some(ControlMessage::RoomSnapshot {
        state: state.clone(),
        more: false,
    })
}

pub use amphi_origin::Authority;

/// The real room authority (the origin's hub and its sans-IO core, without the mixer) on
/// `bind`, with mTLS from `pki`; it runs as long as the test's runtime.
pub fn start_authority(pki: &DevPki, bind: SocketAddr) -> amphi_origin::Authority {
    let material = pki.issue(ORIGIN_NAME, MeshRole::Origin).unwrap();
    amphi_origin::Authority::start(&material, bind, CancellationToken::new()).unwrap()
}

/// A quinn server with mTLS from `pki` that answers Hello with Welcome and `Join` with a
/// snapshot admitting the participant ([`admit`]), and collects everything it receives.
pub fn start_origin(pki: &DevPki, bind: SocketAddr) -> FakeOrigin {
    let material = pki.issue(ORIGIN_NAME, MeshRole::Origin).unwrap();
    let tls = quinn::crypto::rustls::QuicServerConfig::try_from(material.server_config().unwrap())
        .unwrap();
    let server = quinn::ServerConfig::with_crypto(Arc::new(tls));
    let endpoint = quinn::Endpoint::server(server, bind).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (ctl_tx, control) = mpsc::unbounded_channel();
    let (dg_tx, datagrams) = mpsc::unbounded_channel();
    let (to_edge, to_edge_rx) = mpsc::unbounded_channel::<ControlMessage>();
    let to_edge_rx = Arc::new(std::sync::Mutex::new(Some(to_edge_rx)));
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let mut outbox = to_edge_rx.lock().unwrap().take();
            let ctl_tx = ctl_tx.clone();
            let dg_tx = dg_tx.clone();
            let c2 = conn.clone();
            tokio::spawn(async move {
                while let Ok(d) = c2.read_datagram().await {
                    let _ = dg_tx.send(d);
                }
            });
            tokio::spawn(async move {
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let mut dec = ControlDecoder::default();
                let mut buf = vec![0u8; 4096];
                let mut rooms = BTreeMap::new();
                loop {
                    let outgoing = async {
                        match outbox.as_mut() {
                            Some(rx) => rx.recv().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        m = outgoing => match m {
                            Some(m) => { let _ = send.write_all(&m.to_record()).await; }
                            None => outbox = None,
                        },
                        r = recv.read(&mut buf) => {
                            let Ok(Some(n)) = r else { break };
                            dec.feed(&buf[..n]);
                            while let Ok(Some(msg)) = dec.next_message() {
                                if matches!(msg, ControlMessage::Hello { .. }) {
                                    let welcome = ControlMessage::Welcome {
                                        origin: "origin-test".into(),
                                    };
                                    let _ = send.write_all(&welcome.to_record()).await;
                                }
                                if let Some(snapshot) = admit(&mut rooms, &msg) {
                                    let _ = send.write_all(&snapshot.to_record()).await;
                                }
                                let _ = ctl_tx.send(msg);
                            }
                        }
                    }
                }
            });
        }
    });
    FakeOrigin {
        addr,
        control,
        datagrams,
        to_edge,
        endpoint,
    }
}

/// A running edge.
pub struct Edge {
    /// Its HTTP listener.
    pub http: SocketAddr,
    /// Its WebRTC media socket.
    pub media: SocketAddr,
    /// The key its tokens are signed with.
    pub signer: TokenSigner,
    /// Stops it.
    pub shutdown: CancellationToken,
    /// Its `run` task.
    pub task: tokio::task::JoinHandle<Result<(), amphi_edge::EdgeError>>,
}

impl Edge {
    /// Its HTTP base URL.
    pub fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Its WHIP URL for `room`.
    pub fn whip_url(&self, room: RoomId) -> String {
        format!("{}/whip/{room}", self.base())
    }

    /// A one-hour token for `name` in `room` as `role`.
    pub fn token(&self, room: RoomId, role: Role, name: &str) -> String {
        let now = now_unix();
        self.signer.sign(&Claims {
            sub: format!("user-{name}"),
            name: name.into(),
            room,
            role,
            iat: now,
            exp: now + 3600,
            jti: format!("jti-{name}-{}", rand::random::<u32>()),
        })
    }

    /// Stop it and check that `run` returned `Ok` within 10 s.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("edge stops within 10 s")
            .expect("edge task did not panic");
        r.expect("edge run returned Ok");
    }
}

/// Start an edge whose origin is `origin_addr` and geo-router `router`.
pub async fn start_edge(pki: &DevPki, origin_addr: SocketAddr, router: SocketAddr) -> Edge {
    start_edge_with(pki, origin_addr, router, EdgeOpts::default()).await
}

/// Per-edge options of [`start_edge_with`].
pub struct EdgeOpts {
    /// Its index (edge id `edge-test-{index}`).
    pub index: u8,
    /// Its region.
    pub region: &'static str,
    /// Most WebRTC sessions it takes.
    pub capacity: usize,
    /// Token signer (share one between edges so a token works on both).
    pub signer: Option<TokenSigner>,
    /// `ice_connect_timeout_secs`.
    pub ice_connect_timeout_secs: u64,
    /// `token_expiry_grace_secs`.
    pub token_expiry_grace_secs: u64,
}

impl Default for EdgeOpts {
    fn default() -> Self {
        EdgeOpts {
            index: 1,
            region: "us-east",
            capacity: 500,
            signer: None,
            ice_connect_timeout_secs: 15,
            token_expiry_grace_secs: 30,
        }
    }
}

/// Start an edge with options.
pub async fn start_edge_with(
    pki: &DevPki,
    origin_addr: SocketAddr,
    router: SocketAddr,
    opts: EdgeOpts,
) -> Edge {
    let http = free_port().unwrap();
    let media = free_port().unwrap();
    let signer = opts.signer.unwrap_or_else(|| TokenSigner::generate("k1"));
    let id = format!("edge-test-{}", opts.index);
    let config = EdgeConfig {
        id: id.clone(),
        region: opts.region.into(),
        index: u16::from(opts.index),
        http_listen: http,
        public_url: format!("http://{http}"),
        relay_url: None,
        relay_server_name: None,
        webtransport: None,
        media_listen: media,
        media_public: None,
        origins: Vec::new(),
        origin_addr: Some(origin_addr),
        origin_server_name: Some(ORIGIN_NAME.into()),
        router_url: format!("http://{router}"),
        interactive_capacity: opts.capacity,
        media_threads: 2,
        https: Default::default(),
        limits: Default::default(),
        ice_connect_timeout_secs: opts.ice_connect_timeout_secs,
        max_token_lifetime_secs: amphi_protocol::token::DEFAULT_MAX_LIFETIME_SECS,
        token_expiry_grace_secs: opts.token_expiry_grace_secs,
    };
    let setup = EdgeSetup {
        config,
        mesh_tls: pki.issue(&id, MeshRole::Edge).unwrap(),
        tokens: signer.verifier(),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(setup, shutdown.clone()));
    let edge = Edge {
        http,
        media,
        signer,
        shutdown,
        task,
    };
    for _ in 0..100 {
        if let Ok((200, _, _)) = request(&format!("{}/healthz", edge.base()), "GET", &[], "").await
        {
            return edge;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("edge did not come up");
}

/// One HTTP request: (status, headers, body).
pub async fn request(
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, http::HeaderMap, String), String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// Wait (at most 10 s) until `edge` has its origin link: publishing and room commands need
/// the room authority.
pub async fn wait_for_origin_link(edge: &Edge) {
    for _ in 0..200 {
        if metric(edge, "amphi_edge_origin_connected").await == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Value of a metric sample line (exact name including labels) in `/metrics`.
pub async fn metric(edge: &Edge, sample: &str) -> u64 {
    let (status, _, text) = request(&format!("{}/metrics", edge.base()), "GET", &[], "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("metric {sample} missing in:\n{text}"))
}

/// `n` Opus packets of a 440 Hz tone, 20 ms each at 48 kHz mono ([`crate::synth::tone_packets`]).
pub fn opus_packets(n: usize) -> Vec<Vec<u8>> {
    crate::synth::tone_packets(440.0, 0.25, n).expect("opus encoder")
}

/// Receive the next control message matching `pred` within `timeout`.
pub async fn expect_control(
    origin: &mut FakeOrigin,
    timeout: Duration,
    mut pred: impl FnMut(&ControlMessage) -> bool,
) -> ControlMessage {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, origin.control.recv()).await {
            Ok(Some(m)) if pred(&m) => return m,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("origin control channel closed"),
            Err(_) => panic!("expected control message not received within {timeout:?}"),
        }
    }
}

/// A STUN binding request with USERNAME `user`, PRIORITY and a dummy MESSAGE-INTEGRITY.
pub fn stun_binding_request(user: &str) -> Vec<u8> {
    let mut attrs = Vec::new();
    for (typ, val) in [
        (0x0006u16, user.as_bytes().to_vec()),
        (0x0024, 1u32.to_be_bytes().to_vec()),
        (0x0008, vec![0u8; 20]),
    ] {
        attrs.extend_from_slice(&typ.to_be_bytes());
        attrs.extend_from_slice(&(val.len() as u16).to_be_bytes());
        attrs.extend_from_slice(&val);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(&0x0001u16.to_be_bytes());
    out.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    out.extend_from_slice(&[9u8; 12]);
    out.extend_from_slice(&attrs);
    out
}
