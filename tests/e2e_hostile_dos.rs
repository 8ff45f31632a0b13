//! Cheap denial of service against real role processes (origin, production-mode geo-router, edge,
//! packager), each listener with small per-address budgets and loopback not exempt: one address
//! opening many connections is capped (503 JSON, `Retry-After`) while another address works; one
//! address over its request rate gets 429 while another works, and behind a trusted proxy the
//! router keys that budget on the forwarded client address; oversized unauthenticated bodies are
//! refused before a byte of them is sent; unknown room ids cost the packager no storage read; a
//! bad SDP gets a stable error that names no internals. Prints the request rate a legitimate client
//! gets while another address floods the router (BENCHMARKS.md).

mod roles;
use amphi_testkit::mesh as support;

use roles::*;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connections one address may hold on every listener of the test mesh.
const CONNS: usize = 8;
/// Sustained requests per second and burst per address.
const RATE: u32 = 5;
const BURST: u32 = 20;
/// The router's API key.
const KEY_ID: &str = "app";
const KEY_SECRET: &str = "dos-test-secret";

fn limits() -> String {
    format!(
        "max_connections_per_ip = {CONNS}\nrequests_per_second_per_ip = {RATE}\n\
         request_burst_per_ip = {BURST}\nrate_limit_exempt = []\n"
    )
}

/// A connection to `to` from the loopback address `from` (127.0.0.x: each is its own client).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    s.connect(to).await.unwrap()
}

/// An answer: status, headers (lowercase names), body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }
}

/// Read one HTTP/1.1 answer (Content-Length framed) from `s`, within 10 s.
async fn read_answer(s: &mut TcpStream) -> Answer {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let head = text[..end].to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    let status = head
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let body = String::from_utf8_lossy(&got[end + 4..end + 4 + len]).to_string();
                    return Answer { status, head, body };
                }
            }
            let n = s.read(&mut buf).await.unwrap_or(0);
            assert!(n > 0, "closed before a whole answer: {text:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer within 10 s")
}

/// `GET path` on `to` from address `from` over a fresh connection, with extra header lines.
async fn get_from(from: &str, to: SocketAddr, path: &str, extra: &str) -> Answer {
    let mut s = connect_from(from, to).await;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {to}\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    read_answer(&mut s).await
}

fn addr(base_url: &str) -> SocketAddr {
    base_url.trim_start_matches("http://").parse().unwrap()
}

/// `(method, path, headers)` of a request signed with the router's API key.
fn signed_headers(method: &str, path: &str, body: &[u8]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = amphi_geo_router::auth::sign(KEY_SECRET, now, method, path, body);
    format!("x-amphi-key: {KEY_ID}\r\nx-amphi-timestamp: {now}\r\nx-amphi-signature: {sig}\r\n")
}

struct Mesh {
    roles: RoleMesh,
    _procs: Vec<RoleProcess>,
}

impl Mesh {
    /// Origin, production-mode router (API key, `127.0.0.9` a trusted proxy), one edge and the
    /// packager, each with [`limits`].
    /// Ports `base..base + 100`; `name` names the scratch directory.
    async fn start(name: &str, base: u16) -> Mesh {
        let roles = RoleMesh::new(name, base);
        let origin = roles.origin(None);
        let router_config = format!(
            r#"[router]
id = "router-dos"
http_listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
default_region = "us-east"
edges = []
packager_url = "http://127.0.0.1:{packager}"
trusted_proxies = ["127.0.0.9"]
{limits}
[[router.api_keys]]
id = "{KEY_ID}"
secret = "{KEY_SECRET}"
scope = "admin"

[signing]
kid = "k1"
key_file = {key:?}
"#,
            port = base + 80,
            packager = base + 90,
            limits = limits(),
            key = roles.dir.join("signing.pem").display().to_string(),
        );
        let router_toml = roles.dir.join("router-dos.toml");
        std::fs::write(&router_toml, router_config).unwrap();
        let router = spawn_role(
            "geo-router",
            &router_toml,
            &roles.dir.join("router-dos.log"),
        );
        let edge = roles.edge_process_with(0, "us-east", "", &limits());
        let packager = roles.packager_with(&limits());
        let urls = [
            roles.router(),
            roles.edge(0),
            roles.packager_url(),
            roles.origin_metrics(),
        ];
        tokio::task::spawn_blocking(move || {
            eventually("every role answers", Duration::from_secs(60), || {
                urls.iter()
                    .all(|u| {
                        let path = if u.ends_with(&(base + 1).to_string()) {
                            "/metrics"
                        } else {
                            "/healthz"
                        };
                        support::get_status(&format!("{u}{path}")) == 200
                    })
                    .then_some(())
            })
        })
        .await
        .unwrap();
        Mesh {
            roles,
            _procs: vec![origin, router, edge, packager],
        }
    }

    fn listeners(&self) -> [(&'static str, SocketAddr, &'static str); 3] {
        [
            ("router", addr(&self.roles.router()), "/healthz"),
            ("edge", addr(&self.roles.edge(0)), "/healthz"),
            // The packager's HTTP/1.1 fast path answers /hls/ itself.
            (
                "packager",
                addr(&self.roles.packager_url()),
                "/hls/00000000000000aa/index.m3u8",
            ),
        ]
    }

    /// Create a room through the signed API; its id.
    async fn create_room(&self) -> String {
        let body = br#"{"title":"dos"}"#;
        let mut s = connect_from("127.0.0.1", addr(&self.roles.router())).await;
        let head = format!(
            "POST /v1/rooms HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n{}Connection: close\r\n\r\n",
            body.len(),
            signed_headers("POST", "/v1/rooms", body)
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let a = read_answer(&mut s).await;
        assert_eq!(a.status, 201, "{}", a.body);
        a.json()["room"].as_str().unwrap().to_string()
    }
}

fn assert_refusal(a: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {} {}", a.head, a.body);
    assert_eq!(a.json()["error"], code, "{what}: {}", a.body);
    let retry: u64 = a
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no Retry-After in {}", a.head));
    assert!(retry >= 1, "{what}");
    assert!(
        a.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{what}: {}",
        a.head
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_is_capped_and_rate_limited_while_others_work() {
    let mesh = Mesh::start("dos-budgets", 27_900).await;
    for (name, to, path) in mesh.listeners() {
        // 127.0.0.2 fills its connection budget with idle connections.
        let mut held = Vec::new();
        for _ in 0..CONNS {
            held.push(connect_from("127.0.0.2", to).await);
        }
        // The next one is answered 503 at accept and closed without being read.
        let mut extra = connect_from("127.0.0.2", to).await;
        let refused = read_answer(&mut extra).await;
        assert_refusal(&refused, 503, "too_many_connections", name);
        // Another address is served meanwhile.
        let ok = get_from("127.0.0.3", to, path, "").await;
        assert!(
            ok.status == 200 || ok.status == 404,
            "{name}: {}",
            ok.status
        );
        // Closing one frees a slot.
        held.pop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let again = get_from("127.0.0.2", to, path, "").await;
        assert!(
            again.status == 200 || again.status == 404,
            "{name}: {}",
            again.status
        );
        drop(held);

        // 127.0.0.4 spends its burst, then gets 429 while 127.0.0.5 is answered.
        let mut limited = None;
        for i in 0..(BURST as usize + 10) {
            let a = get_from("127.0.0.4", to, path, "").await;
            if a.status == 429 {
                limited = Some((i, a));
                break;
            }
        }
        let (after, a) = limited.unwrap_or_else(|| panic!("{name}: never rate limited"));
        assert!(after >= BURST as usize - 1, "{name}: limited after {after}");
        assert_refusal(&a, 429, "rate_limited", name);
        let other = get_from("127.0.0.5", to, path, "").await;
        assert_ne!(other.status, 429, "{name}: another address is limited");
    }
    // Behind the trusted proxy 127.0.0.9 the router budgets the forwarded client: one
    // forwarded client is limited, another through the same proxy is not.
    let router = addr(&mesh.roles.router());
    let mut limited = false;
    for _ in 0..(BURST + 10) {
        let a = get_from(
            "127.0.0.9",
            router,
            "/healthz",
            "X-Forwarded-For: 198.51.100.7\r\n",
        )
        .await;
        if a.status == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "the forwarded client was never limited");
    let other = get_from(
        "127.0.0.9",
        router,
        "/healthz",
        "X-Forwarded-For: 198.51.100.8\r\n",
    )
    .await;
    assert_eq!(other.status, 200, "another client behind the proxy");
    // `GET /v1/route` is answered below the router's middleware: the same budgets hold there,
    // for a direct client and for a client forwarded by the trusted proxy.
    for (from, extra) in [
        ("127.0.0.6", ""),
        ("127.0.0.9", "X-Forwarded-For: 198.51.100.9\r\n"),
    ] {
        let mut limited = None;
        for i in 0..(BURST as usize + 10) {
            let a = get_from(from, router, "/v1/route?room=00000000000000ab", extra).await;
            if a.status == 429 {
                limited = Some((i, a));
                break;
            }
            assert_eq!(a.status, 404, "route from {from}: {}", a.body);
        }
        let (after, a) = limited.unwrap_or_else(|| panic!("route from {from}: never limited"));
        assert!(
            after >= BURST as usize - 1,
            "route from {from}: limited after {after}"
        );
        assert_refusal(&a, 429, "rate_limited", "router /v1/route");
    }
    let other = get_from(
        "127.0.0.9",
        router,
        "/v1/route?room=00000000000000ab",
        "X-Forwarded-For: 198.51.100.10\r\n",
    )
    .await;
    assert_eq!(other.status, 404, "another client's route behind the proxy");
    for (name, base) in [
        ("router", mesh.roles.router()),
        ("edge", mesh.roles.edge(0)),
        ("packager", mesh.roles.packager_url()),
    ] {
        let text =
            tokio::task::spawn_blocking(move || support::get_bytes(&format!("{base}/metrics")))
                .await
                .unwrap();
        let text = String::from_utf8_lossy(&text).to_string();
        let role = if name == "router" { "router" } else { name };
        for m in ["http_connections_refused_total", "http_rate_limited_total"] {
            let v = support::metric_in(&text, &format!("amphi_{role}_{m}")).unwrap_or(0.0);
            assert!(v >= 1.0, "{name}: amphi_{role}_{m} = {v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_bodies_are_refused_before_being_sent_and_bad_sdp_names_no_internals() {
    let mesh = Mesh::start("dos-bodies", 28_000).await;
    let router = addr(&mesh.roles.router());
    let edge = addr(&mesh.roles.edge(0));
    // Only the head is sent, announcing 50 MB: the answer comes without a byte of body.
    let head_only = |from: &'static str, to: SocketAddr, head: String| async move {
        let mut s = connect_from(from, to).await;
        s.write_all(head.as_bytes()).await.unwrap();
        read_answer(&mut s).await
    };
    let big = 50_000_000;
    let a = head_only(
        "127.0.0.20",
        router,
        format!("POST /v1/rooms HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {big}\r\n\r\n"),
    )
    .await;
    assert_eq!(a.status, 401, "no API key: {}", a.body);
    assert_eq!(a.json()["error"], "bad_api_signature");
    // A known key and a fresh timestamp, but a body over the route's limit: 413 at once.
    let a = head_only(
        "127.0.0.20",
        router,
        format!(
            "POST /v1/rooms HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {big}\r\n{}\r\n",
            signed_headers("POST", "/v1/rooms", b"")
        ),
    )
    .await;
    assert_eq!(a.status, 413, "{}", a.body);
    assert_eq!(a.json()["error"], "body_too_large");
    // The same on the edge's WHIP: no token, then a token and an oversized offer.
    let room = mesh.create_room().await;
    let a = head_only(
        "127.0.0.21",
        edge,
        format!("POST /whip/{room} HTTP/1.1\r\nHost: x\r\ncontent-type: application/sdp\r\ncontent-length: {big}\r\n\r\n"),
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.body);
    let token = mesh
        .roles
        .token(&room, amphi_protocol::token::Role::Speaker);
    let a = head_only(
        "127.0.0.21",
        edge,
        format!("POST /whip/{room} HTTP/1.1\r\nHost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/sdp\r\ncontent-length: {big}\r\n\r\n"),
    )
    .await;
    assert_eq!(a.status, 413, "{}", a.body);
    // A bad SDP: 400 bad_sdp with a fixed message, no parser internals.
    for sdp in [
        "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n",
        "\u{0}\u{1}garbage",
        "v=0\r\nm=audio x y z\r\n",
    ] {
        let mut s = connect_from("127.0.0.22", edge).await;
        s.write_all(
            format!(
                "POST /whip/{room} HTTP/1.1\r\nHost: x\r\nauthorization: Bearer {token}\r\n\
                 content-type: application/sdp\r\ncontent-length: {}\r\nConnection: close\r\n\r\n{sdp}",
                sdp.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let a = read_answer(&mut s).await;
        assert_eq!(a.status, 400, "{sdp:?}: {}", a.body);
        assert_eq!(a.json()["error"], "bad_sdp", "{}", a.body);
        for leak in ["PointerOffset", "0x7f", "Parse error", "str0m"] {
            assert!(!a.body.contains(leak), "{sdp:?} leaks {leak}: {}", a.body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_room_ids_never_reach_storage() {
    let mesh = Mesh::start("dos-storage", 28_100).await;
    let packager = mesh.roles.packager_url();
    let reads = |base: String| async move {
        tokio::task::spawn_blocking(move || {
            support::metric(&base, "amphi_packager_storage_reads_total").unwrap_or(-1.0)
        })
        .await
        .unwrap()
    };
    // Storage is listed once at start; wait until unknown rooms no longer read it.
    let to = addr(&packager);
    let start = Instant::now();
    loop {
        let before = reads(packager.clone()).await;
        let a = get_from("127.0.0.30", to, "/hls/7000000000000001/index.m3u8", "").await;
        assert_eq!(a.status, 404);
        if reads(packager.clone()).await == before {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "still reading");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = reads(packager.clone()).await;
    assert!(
        before >= 0.0,
        "amphi_packager_storage_reads_total is exported"
    );
    // Many addresses (each under its request budget), many random rooms and resources.
    let mut n = 0;
    for host in 31..=80u8 {
        let from: &'static str = Box::leak(format!("127.0.0.{host}").into_boxed_str());
        // 6 rooms × 3 resources = 18 requests, under the address's burst of 20.
        for i in 0..6u64 {
            let room = format!("{:016x}", rand_room(host, i));
            for path in ["index.m3u8", "recording.m3u8", "opus/seg1.m4a"] {
                let a = get_from(from, to, &format!("/hls/{room}/{path}"), "").await;
                assert_eq!(a.status, 404, "{path}");
                assert_eq!(a.json()["error"], "room_not_found", "{path}");
                n += 1;
            }
        }
    }
    assert_eq!(
        reads(packager.clone()).await,
        before,
        "{n} unknown-room requests"
    );
}

fn rand_room(host: u8, i: u64) -> u64 {
    0x5eed_0000_0000_0000 ^ (u64::from(host) << 24) ^ (i * 0x9e37_79b9)
}

/// The request rate a legitimate client gets from the router alone, then while another
/// address floods it with 32 connections for 3 s (bounded); printed for BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn legitimate_client_rate_while_another_address_floods() {
    let mesh = Mesh::start("dos-flood", 28_200).await;
    let router = addr(&mesh.roles.router());
    let window = Duration::from_secs(3);
    // The legitimate client stays under its budget: one request every 250 ms is 4/s < 5/s.
    async fn client(router: SocketAddr, window: Duration) -> (u32, u32, Duration) {
        let (mut ok, mut total, mut worst) = (0, 0, Duration::ZERO);
        let start = Instant::now();
        while start.elapsed() < window {
            let t = Instant::now();
            let a = get_from("127.0.0.40", router, "/healthz", "").await;
            worst = worst.max(t.elapsed());
            total += 1;
            if a.status == 200 {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (ok, total, worst)
    }
    let quiet = client(router, window).await;
    let stop = Instant::now() + window;
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..32 {
        flood.spawn(async move {
            let (mut sent, mut refused) = (0u64, 0u64);
            while Instant::now() < stop {
                let Ok(s) = TcpSocket::new_v4() else { continue };
                if s.bind("127.0.0.41:0".parse().unwrap()).is_err() {
                    continue;
                }
                let Ok(mut c) = s.connect(router).await else {
                    continue;
                };
                let _ = c
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut buf)).await;
                sent += 1;
                if !buf.starts_with(b"HTTP/1.1 200") {
                    refused += 1;
                }
            }
            (sent, refused)
        });
    }
    let busy = client(router, window).await;
    let (mut sent, mut refused) = (0, 0);
    while let Some(r) = flood.join_next().await {
        let (s, f) = r.unwrap();
        sent += s;
        refused += f;
    }
    eprintln!(
        "legitimate client alone: {}/{} answered 200, slowest {:?}",
        quiet.0, quiet.1, quiet.2
    );
    eprintln!(
        "legitimate client during the flood: {}/{} answered 200, slowest {:?}; flood: {sent} requests ({:.0}/s), {refused} refused",
        busy.0,
        busy.1,
        busy.2,
        sent as f64 / window.as_secs_f64()
    );
    assert_eq!(quiet.0, quiet.1, "the client alone is always answered");
    assert_eq!(
        busy.0, busy.1,
        "the client is always answered during the flood"
    );
    assert!(refused > 0, "the flood was never refused");
}
