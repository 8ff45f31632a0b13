//! The production configuration, run: `amphi geo-router`, `amphi edge`, `amphi origin` and
//! `amphi packager` as separate processes, each from the config its Terraform module renders
//! (`tools/src/tfrender.rs`: the module template, then the boot-time values and secrets user
//! data fills in), with TLS on every HTTP listener (a test CA made at start signs every node's
//! certificate, which the templates use for both the mesh and HTTPS), API keys, Redis over TLS
//! with an AUTH password, trusted proxies and a CDN base URL for `hls_url`.
//!
//! A WHIP join through `https://` works (the edge asked the router over HTTPS whether the room
//! exists), the edge's heartbeats register it, `/hls` through the router is proxied to the
//! packager over HTTPS, and the `hls_url` handed out is the CDN base.

mod roles;
use amphi_testkit::mesh as support;

use amphi_common::mtls::{DevPki, MeshRole};
use amphi_protocol::token::TokenSigner;
use amphi_tools::tfrender::{render_role_config, BootValues, TfRole};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use roles::{spawn_role, RoleProcess};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BASE: u16 = 28_200;
const ORIGIN_NAME: &str = "origin.amphi.internal";
const API_KEY_ID: &str = "edge";
const API_KEY_SECRET: &str = "prod-config-test-api-key-secret";
const REDIS_AUTH: &str = "prod-config-test-redis-auth";

fn port(n: u16) -> u16 {
    BASE + n
}

fn https(n: u16) -> String {
    format!("https://127.0.0.1:{}", port(n))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// One "host": its `/etc/amphi` (mesh certificate, also its HTTPS certificate) and
/// `/var/lib/amphi`, and the boot values user data would fill in.
fn host(dir: &Path, pki: &DevPki, name: &str, cert_name: &str, roles: &[MeshRole]) -> BootValues {
    let etc = dir.join(name).join("etc");
    let state = dir.join(name).join("state");
    std::fs::create_dir_all(etc.join("tls")).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let issued = pki
        .issue_pem_for(&[cert_name.to_string()], roles)
        .expect("issue");
    write(&etc.join("tls/ca.pem"), &issued.ca);
    write(&etc.join("tls/cert.pem"), &issued.cert);
    write(&etc.join("tls/key.pem"), &issued.key);
    BootValues {
        instance_id: format!("i-{name}"),
        private_ipv4: "127.0.0.1".into(),
        public_ipv4: "127.0.0.1".into(),
        node_number: 1,
        secrets: BTreeMap::from([
            ("API_KEY_SECRET".to_string(), API_KEY_SECRET.to_string()),
            ("REDIS_AUTH_TOKEN".to_string(), REDIS_AUTH.to_string()),
        ]),
        etc_dir: Some(etc),
        state_dir: Some(state),
        bind_ip: Some("127.0.0.1".into()),
    }
}

/// Render `role`'s Terraform template for `boot`'s host, write it to its `/etc/amphi`, start it.
fn start(dir: &Path, role: TfRole, vars: serde_json::Value, boot: &BootValues) -> RoleProcess {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = render_role_config(repo, role, &vars, boot).unwrap();
    let etc = boot.etc_dir.as_ref().unwrap();
    let path = etc.join(format!("{}.toml", role.subcommand()));
    write(&path, &text);
    spawn_role(
        role.subcommand(),
        &path,
        &dir.join(format!("{}.log", role.subcommand())),
    )
}

/// A TLS Redis (`redis-server --tls-port`) with an AUTH password; killed on drop.
struct TlsRedis(Child);

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tls_redis(dir: &Path, boot: &BootValues) -> TlsRedis {
    let tls = boot.etc_dir.as_ref().unwrap().join("tls");
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--tls-port",
            &port(70).to_string(),
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(tls.join("cert.pem"))
        .arg("--tls-key-file")
        .arg(tls.join("key.pem"))
        .arg("--tls-ca-cert-file")
        .arg(tls.join("ca.pem"))
        .args(["--requirepass", REDIS_AUTH])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (scripts/test.sh installs it)");
    TlsRedis(child)
}

/// HTTPS requests trusting the test CA only through the explicit extra bundle.
struct Client {
    http: amphi_protocol::https::HttpsClient<Full<Bytes>>,
}

impl Client {
    /// (status, body) of a request, signed with the API key when `signed`; status 0 if the
    /// connection failed.
    async fn call(
        &self,
        method: &str,
        url: &str,
        body: Option<serde_json::Value>,
        signed: bool,
    ) -> (u16, Vec<u8>) {
        let body = body.map(|b| b.to_string()).unwrap_or_default().into_bytes();
        let uri: hyper::http::Uri = url.parse().unwrap();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(uri.clone())
            .header("content-type", "application/json");
        if signed {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let path = uri.path_and_query().unwrap().as_str();
            let sig = amphi_geo_router::auth::sign(API_KEY_SECRET, ts, method, path, &body);
            req = req
                .header(amphi_geo_router::auth::KEY_HEADER, API_KEY_ID)
                .header(amphi_geo_router::auth::TIMESTAMP_HEADER, ts.to_string())
                .header(amphi_geo_router::auth::SIGNATURE_HEADER, sig);
        }
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_secs(10), self.http.request(req)).await
        else {
            return (0, Vec::new());
        };
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        (status, bytes)
    }

    async fn json(
        &self,
        method: &str,
        url: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let (status, bytes) = self.call(method, url, body, true).await;
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }
}

/// Join `room` over `wss://127.0.0.1:{port}/v1/ws` (TLS trusting `ca`, HTTP/1.1 upgrade) and
/// return its snapshot (or the `error` refusing the join).
async fn wss_join(ca: &Path, port: u16, token: &str) -> serde_json::Value {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut tls = amphi_protocol::https::client_tls_config(Some(ca)).unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS to the edge");
    let url = format!("wss://127.0.0.1:{port}/v1/ws?token={token}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("WebSocket upgrade over TLS");
    ws.send(Message::Text(r#"{"type":"join"}"#.into()))
        .await
        .unwrap();
    // The snapshot of the room (or an error), after any other events.
    for _ in 0..20 {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an answer within 10 s")
            .expect("open")
            .expect("a message");
        if let Message::Text(text) = msg {
            let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            if v["type"] == "snapshot" || v["type"] == "error" {
                return v;
            }
        }
    }
    panic!("no snapshot after 20 messages");
}

/// Poll `f` every 200 ms for up to `limit`; panics with `what` (and the logs) after.
async fn eventually<F, Fut>(what: &str, limit: Duration, logs: &[&RoleProcess], mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|p| p.log_text()).collect();
            panic!("{what}: not within {limit:?}\n{}", logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_rendered_roles_run_over_https_end_to_end() {
    let dir: PathBuf = support::scratch_dir("prod-config");
    let pki = DevPki::generate().expect("test CA");
    let origin_host = host(&dir, &pki, "origin", ORIGIN_NAME, &[MeshRole::Origin]);
    let packager_host = host(&dir, &pki, "packager", "127.0.0.1", &[MeshRole::Packager]);
    let router_host = host(&dir, &pki, "router", "127.0.0.1", &[MeshRole::Router]);
    let edge_host = host(&dir, &pki, "edge", "127.0.0.1", &[MeshRole::Edge]);
    let redis_host = host(&dir, &pki, "redis", "127.0.0.1", &[]);
    let ca = router_host.etc_dir.as_ref().unwrap().join("tls/ca.pem");
    let signer = TokenSigner::generate("k1");
    write(
        &router_host.etc_dir.as_ref().unwrap().join("signing.pem"),
        &signer.to_pkcs8_pem(),
    );
    let _redis = tls_redis(&dir, &redis_host);
    let redis_up = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port(70))).is_err() {
        assert!(
            Instant::now() < redis_up,
            "redis-server --tls-port did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let origins = serde_json::json!([{"id": "origin-1",
        "addr": format!("127.0.0.1:{}", port(0)), "server_name": ORIGIN_NAME}]);
    // The CDN base: in this test bed the packager's HTTPS listener stands in for CloudFront.
    let cdn = https(91);

    let origin = start(
        &dir,
        TfRole::Origin,
        // Room state in memory (the module's default, no redis_url).
        serde_json::json!({"id": "origin-1", "quic_port": port(0), "metrics_port": port(1),
            "idle_room_timeout_secs": 3600, "redis_url": ""}),
        &origin_host,
    );
    let packager = start(
        &dir,
        TfRole::Packager,
        // Storage on the local disk (no storage_bucket; the namespace bed runs S3).
        serde_json::json!({"id": "packager-1",
            "origins": origins,
            "http_port": port(90), "https_port": port(91),
            "storage_bucket": "", "storage_region": "", "storage_endpoint": "",
            "storage_static_keys": false,
            "token_public_keys": [{"kid": "k1", "pem": signer.public_pem()}]}),
        &packager_host,
    );
    let router = start(
        &dir,
        TfRole::Router,
        serde_json::json!({
            "region": "us-east", "http_port": port(80), "public_url": https(80),
            "default_region": "us-east", "packager_url": https(91), "hls_base_url": cdn,
            "token_ttl_secs": 3600, "signing_kid": "k1",
            "trusted_proxies": ["127.0.0.0/8"],
            "redis_url": format!("rediss://:@REDIS_AUTH_TOKEN@@127.0.0.1:{}/0", port(70)),
            "api_key_id": API_KEY_ID,
            "edges": [{"id": "edge-us-east", "region": "us-east", "public_url": https(10)}],
            "coordinates": {"us-east": {"latitude": 38.95, "longitude": -77.45}},
            "origins": origins,
            "geoip": [],
        }),
        &router_host,
    );
    let edge = start(
        &dir,
        TfRole::Edge,
        serde_json::json!({
            "region": "us-east", "http_port": port(10), "media_port": port(20),
            "webtransport_port": port(30), "tls_server_name": "edge.amphi.internal",
            "public_url": https(10),
            "origins": origins,
            "router_url": https(80), "interactive_capacity": 100, "ice_connect_timeout_secs": 15, "media_threads": 1,
            "backend_tls": true, "capacity": 100, "api_key_id": API_KEY_ID,
            "drain_grace_secs": 5, "vpc_cidr": "127.0.0.0/8",
            "token_public_keys": [{"kid": "k1", "pem": signer.public_pem()}],
        }),
        &edge_host,
    );
    let logs = [&router, &edge, &packager, &origin];
    let client = Client {
        http: amphi_protocol::https::client(Some(&ca)).unwrap(),
    };

    // Every HTTP listener speaks HTTPS (and only HTTPS).
    for (what, base) in [
        ("router", https(80)),
        ("edge", https(10)),
        ("packager", https(91)),
    ] {
        let url = format!("{base}/healthz");
        eventually(
            &format!("{what} answers over HTTPS"),
            Duration::from_secs(60),
            &logs,
            || {
                let (client, url) = (&client, url.clone());
                async move { client.call("GET", &url, None, false).await.0 == 200 }
            },
        )
        .await;
    }
    let plain = format!("http://127.0.0.1:{}/healthz", port(10));
    assert_eq!(
        client.call("GET", &plain, None, false).await.0,
        0,
        "edge in plain HTTP"
    );

    // The edge's signed heartbeats (over HTTPS) register it.
    let edge_id = "edge-us-east-i-edge";
    eventually("the edge registers", Duration::from_secs(30), &logs, || {
        let client = &client;
        async move {
            let (status, v) = client
                .json("GET", &format!("{}/v1/edges", https(80)), None)
                .await;
            status == 200
                && v["edges"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e.to_string().contains(edge_id)))
        }
    })
    .await;
    // A production router refuses unsigned API calls.
    let (status, _) = client
        .call(
            "POST",
            &format!("{}/v1/rooms", https(80)),
            Some(serde_json::json!({"title": "x"})),
            false,
        )
        .await;
    assert_eq!(status, 401);

    // A room through the API key; listeners are sent to the CDN.
    let (status, created) = client
        .json(
            "POST",
            &format!("{}/v1/rooms", https(80)),
            Some(serde_json::json!({"title": "prod"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap().to_string();
    let hls_url = created["hls_url"].as_str().unwrap().to_string();
    assert_eq!(hls_url, format!("{cdn}/hls/{room}/index.m3u8"));
    let (status, v) = client
        .json(
            "POST",
            &format!("{}/v1/rooms/{room}/tokens", https(80)),
            Some(serde_json::json!({"role": "speaker", "name": "spk", "user_id": "spk"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();

    // Wait for the edge's QUIC link to the origin, then join through WHIP over HTTPS: the edge
    // asks the router (HTTPS) whether the room exists before it accepts.
    eventually(
        "the edge links to the origin",
        Duration::from_secs(30),
        &logs,
        || {
            let client = &client;
            async move {
                let (_, body) = client
                    .call("GET", &format!("{}/metrics", https(10)), None, false)
                    .await;
                support::metric_in(
                    &String::from_utf8_lossy(&body),
                    "amphi_edge_origin_connected",
                )
                .unwrap_or(0.0)
                    >= 1.0
            }
        },
    )
    .await;
    // WebSocket signaling upgrades over TLS: a listener joins through wss://.
    let listener_token = {
        let (status, v) = client
            .json(
                "POST",
                &format!("{}/v1/rooms/{room}/tokens", https(80)),
                Some(serde_json::json!({"role": "listener", "name": "lis", "user_id": "lis"})),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        v["token"].as_str().unwrap().to_string()
    };
    let snapshot = wss_join(&ca, port(10), &listener_token).await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");

    let whip = format!("{}/whip/{room}", https(10));
    let publisher = amphi_testkit::whip_client::WhipPublisher::connect_trusting(
        &whip,
        &token,
        Duration::from_secs(20),
        Some(&ca),
    )
    .await
    .unwrap_or_else(|e| panic!("WHIP over HTTPS: {e}\n{}", edge.log_text()));
    let speaking = tokio::spawn(support::send_tone(publisher, 440.0, 20.0));

    // The program stream reaches the packager; the router proxies /hls to it over HTTPS, and
    // the CDN URL handed out serves the same playlist.
    let proxied = format!("{}/hls/{room}/index.m3u8", https(80));
    for url in [&proxied, &hls_url] {
        eventually(
            &format!("{url} serves the playlist"),
            Duration::from_secs(40),
            &logs,
            || {
                let client = &client;
                async move {
                    let (status, body) = client.call("GET", url, None, false).await;
                    status == 200 && body.starts_with(b"#EXTM3U")
                }
            },
        )
        .await;
    }
    // The speaker's audio is in it: the media playlist (through the router) lists parts.
    let (_, index) = client.call("GET", &proxied, None, false).await;
    let index = String::from_utf8(index).unwrap();
    let variant = index
        .lines()
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_else(|| panic!("no variant in {index}"));
    let media = support::join_url(&proxied, variant);
    eventually(
        "the media playlist lists parts",
        Duration::from_secs(40),
        &logs,
        || {
            let (client, media) = (&client, media.clone());
            async move {
                let (status, body) = client.call("GET", &media, None, false).await;
                status == 200 && String::from_utf8_lossy(&body).contains("#EXT-X-PART:")
            }
        },
    )
    .await;
    speaking.abort();
    for (name, mut p) in [
        ("router", router),
        ("edge", edge),
        ("packager", packager),
        ("origin", origin),
    ] {
        assert!(p.running(), "{name} stopped:\n{}", p.log_text());
    }
    // The processes are stopped (dropped) by now; the scratch files hold test secrets only.
    let _ = std::fs::remove_dir_all(&dir);
}
