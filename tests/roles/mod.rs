//! A mesh of separate role processes (`amphi origin|edge|geo-router --config`) for tests that
//! restart or signal one role: a fresh mesh PKI and token signing key on disk, one TOML config per
//! role, every listener on 127.0.0.1 at `base + n`. Also a small WebSocket signaling client and
//! the Redis URL of the test run.
#![allow(dead_code)] // each test binary uses a different subset

use amphi_common::mtls::{DevPki, MeshRole, MtlsMaterial};
use amphi_protocol::room::ServerMessage;
use amphi_protocol::token::TokenSigner;
use futures_util::{SinkExt, StreamExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const ORIGIN_NAME: &str = "origin.amphi.internal";

/// The Redis of the test run (`scripts/test.sh` starts it), database `db`, emptied first.
pub fn redis_db(db: u8) -> String {
    let base = std::env::var("AMPHI_TEST_REDIS_URL")
        .expect("AMPHI_TEST_REDIS_URL is not set: run scripts/test.sh (it starts redis-server)");
    let url = format!("{}/{db}", base.trim_end_matches('/'));
    let out = Command::new("redis-cli")
        .args(["-u", &url, "FLUSHDB"])
        .output()
        .expect("redis-cli runs");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "FLUSHDB on {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    url
}

/// One role process; SIGTERM then SIGKILL on drop.
pub struct RoleProcess {
    child: Child,
    /// Its log file (stdout + stderr).
    pub log: PathBuf,
}

impl RoleProcess {
    /// Send a signal (`TERM`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }

    /// Wait up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        if self.running() {
            self.signal("TERM");
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Start `amphi <role> --config <config>`, its stdout and stderr appended to `log`.
pub fn spawn_role(role: &str, config: &Path, log: &Path) -> RoleProcess {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let child = Command::new(env!("CARGO_BIN_EXE_amphi"))
        .args([role, "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn amphi {role}: {e}"));
    RoleProcess {
        child,
        log: log.to_path_buf(),
    }
}

/// Files and ports of a role-process mesh.
pub struct RoleMesh {
    /// Scratch directory (configs, keys, logs).
    pub dir: PathBuf,
    /// Ports are `base + n`.
    pub base: u16,
    pki: DevPki,
    signer: TokenSigner,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

impl RoleMesh {
    /// A fresh PKI and signing key under a scratch directory for test `name`.
    pub fn new(name: &str, base: u16) -> RoleMesh {
        let dir = std::env::temp_dir().join(format!("amphi-roles-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = DevPki::generate().expect("dev PKI");
        let signer = TokenSigner::generate("k1");
        write(&dir.join("signing.pem"), &signer.to_pkcs8_pem());
        // Written once: role processes read it while later roles are being configured.
        let ca = pki.ca_pem();
        write(&dir.join("ca.pem"), &ca);
        RoleMesh {
            dir,
            base,
            pki,
            signer,
        }
    }

    /// A join token for `room` with `role`, signed with the mesh's key (`k1`), valid for an hour.
    pub fn token(&self, room: &str, role: amphi_protocol::token::Role) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.signer.sign(&amphi_protocol::token::Claims {
            sub: format!("u-{:016x}", rand_sub()),
            name: "test".into(),
            room: room.parse().expect("room id"),
            role,
            iat: now,
            exp: now + 3600,
            jti: format!("{:032x}", rand_sub()),
        })
    }

    /// Geo-router base URL.
    pub fn router(&self) -> String {
        format!("http://127.0.0.1:{}", self.base + 80)
    }

    /// Edge `i`'s HTTP base URL.
    pub fn edge(&self, i: u16) -> String {
        format!("http://127.0.0.1:{}", self.base + 10 + i)
    }

    /// Origin metrics base URL.
    pub fn origin_metrics(&self) -> String {
        format!("http://127.0.0.1:{}", self.base + 1)
    }

    /// Wait (at most 40 s) until the origin counts two connected edges; `what` names the wait.
    pub async fn wait_edges_on_origin(&self, what: &'static str) {
        let om = self.origin_metrics();
        tokio::task::spawn_blocking(move || {
            eventually(what, Duration::from_secs(40), || {
                (crate::support::metric(&om, "amphi_origin_connected_edges").unwrap_or(0.0) >= 2.0)
                    .then_some(())
            })
        })
        .await
        .unwrap();
    }

    /// Wait (at most 30 s) until the router answers `/healthz` and each of `edges` has its origin
    /// link; with `packager`, until the packager answers too; with `router_linked`, until the
    /// router has its origin link (it hears the origin's events: webhooks, reports).
    pub async fn wait_up(&self, edges: &[u16], packager: bool, router_linked: bool) {
        let router = self.router();
        let edges: Vec<String> = edges.iter().map(|&i| self.edge(i)).collect();
        let packager = packager.then(|| self.packager_url());
        tokio::task::spawn_blocking(move || {
            eventually("mesh up", Duration::from_secs(30), || {
                use crate::support::{get_status, metric};
                (get_status(&format!("{router}/healthz")) == 200
                    && edges
                        .iter()
                        .all(|e| metric(e, "amphi_edge_origin_connected").unwrap_or(0.0) >= 1.0)
                    && packager
                        .as_ref()
                        .is_none_or(|p| get_status(&format!("{p}/healthz")) == 200)
                    && (!router_linked
                        || metric(&router, "amphi_router_origin_links") == Some(1.0)))
                .then_some(())
            })
        })
        .await
        .unwrap();
    }

    /// Mesh TLS material from this mesh's CA for `dns` carrying `roles` (for test peers that
    /// speak the mesh protocol themselves).
    pub fn material(&self, dns: &str, roles: &[MeshRole]) -> MtlsMaterial {
        let issued = self
            .pki
            .issue_pem_for(&[dns.to_string()], roles)
            .expect("issue certificate");
        MtlsMaterial::from_pem(&issued.ca, &issued.cert, &issued.key).expect("material")
    }

    /// Write `name`'s certificate and key; returns the `[tls]` section.
    fn tls(&self, name: &str, dns: &str, role: MeshRole) -> String {
        let issued = self.pki.issue_pem(dns, role).expect("issue certificate");
        let (ca, cert, key) = (
            self.dir.join("ca.pem"),
            self.dir.join(format!("{name}.cert.pem")),
            self.dir.join(format!("{name}.key.pem")),
        );
        write(&cert, &issued.cert);
        write(&key, &issued.key);
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        )
    }

    fn spawn(&self, role: &str, name: &str, config: &str) -> RoleProcess {
        let path = self.dir.join(format!("{name}.toml"));
        write(&path, config);
        spawn_role(role, &path, &self.dir.join(format!("{name}.log")))
    }

    /// Start `amphi origin` (durable room state in `redis_url` if given).
    pub fn origin(&self, redis_url: Option<&str>) -> RoleProcess {
        let redis = redis_url
            .map(|u| format!("redis_url = {u:?}\n"))
            .unwrap_or_default();
        let config = format!(
            "[origin]\nid = \"origin-1\"\nquic_listen = \"127.0.0.1:{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n{redis}\n{}",
            self.base,
            self.base + 1,
            self.tls("origin", ORIGIN_NAME, MeshRole::Origin)
        );
        self.spawn("origin", "origin", &config)
    }

    /// Start `amphi packager` (HTTP on `base + 90`, files under the scratch directory).
    pub fn packager(&self) -> RoleProcess {
        self.packager_with("")
    }

    /// Like [`RoleMesh::packager`] with `extra` TOML in its `[packager]` section.
    pub fn packager_with(&self, extra: &str) -> RoleProcess {
        let config = format!(
            "[packager]\nid = \"packager-1\"\norigin_addr = \"127.0.0.1:{}\"\norigin_server_name = \"{ORIGIN_NAME}\"\nhttp_listen = \"127.0.0.1:{}\"\ndata_dir = {:?}\n{extra}\n\n{}",
            self.base,
            self.base + 90,
            self.dir.join("hls").display().to_string(),
            self.tls("packager", "packager-1.amphi.internal", MeshRole::Packager)
        );
        self.spawn("packager", "packager", &config)
    }

    /// Packager HTTP base URL.
    pub fn packager_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.base + 90)
    }

    /// Start `amphi geo-router` (dev mode: open API, `region=` overrides), linked to the origin.
    pub fn router_process(&self, redis_url: Option<&str>, extra: &str) -> RoleProcess {
        self.router_process_mode(redis_url, extra, true)
    }

    /// Like [`RoleMesh::router_process`]; `dev_mode = false` makes a production router (signed
    /// API; `extra` must then hold `[[router.api_keys]]` entries).
    pub fn router_process_mode(
        &self,
        redis_url: Option<&str>,
        extra: &str,
        dev_mode: bool,
    ) -> RoleProcess {
        let redis = redis_url
            .map(|u| format!("redis_url = {u:?}\n"))
            .unwrap_or_default();
        let config = format!(
            r#"[router]
id = "router-1"
http_listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
default_region = "us-east"
edges = []
packager_url = "http://127.0.0.1:{packager}"
dev_mode = {dev_mode}
{redis}{extra}
[[router.origins]]
id = "origin-1"
addr = "127.0.0.1:{origin}"
server_name = "{ORIGIN_NAME}"

[signing]
kid = "k1"
key_file = {key:?}

{tls}"#,
            port = self.base + 80,
            packager = self.base + 90,
            origin = self.base,
            key = self.dir.join("signing.pem").display().to_string(),
            tls = self.tls("router", "router-1.amphi.internal", MeshRole::Router),
        );
        self.spawn("geo-router", "router", &config)
    }

    /// Start `amphi edge` number `i` (index `i + 1`) in `region`, registering with the router;
    /// `registration` is extra TOML for its `[registration]` section.
    pub fn edge_process(&self, i: u16, region: &str, registration: &str) -> RoleProcess {
        self.edge_process_with(i, region, registration, "")
    }

    /// Like [`RoleMesh::edge_process`] with `extra` TOML in its `[edge]` section.
    pub fn edge_process_with(
        &self,
        i: u16,
        region: &str,
        registration: &str,
        extra: &str,
    ) -> RoleProcess {
        self.edge_process_as(i, &format!("edge-{region}"), region, registration, extra)
    }

    /// Like [`RoleMesh::edge_process_with`] with edge id `id` (several edges in one region).
    pub fn edge_process_as(
        &self,
        i: u16,
        id: &str,
        region: &str,
        registration: &str,
        extra: &str,
    ) -> RoleProcess {
        let config = format!(
            r#"[edge]
id = "{id}"
region = "{region}"
index = {index}
http_listen = "127.0.0.1:{http}"
public_url = "http://127.0.0.1:{http}"
media_listen = "127.0.0.1:{media}"
origin_addr = "127.0.0.1:{origin}"
origin_server_name = "{ORIGIN_NAME}"
router_url = "http://127.0.0.1:{router}"
{extra}

[registration]
{registration}

{tls}
[[tokens.public_keys]]
kid = "k1"
pem = """
{pem}"""
"#,
            index = i + 1,
            http = self.base + 10 + i,
            media = self.base + 20 + i,
            origin = self.base,
            router = self.base + 80,
            tls = self.tls(id, &format!("{id}.amphi.internal"), MeshRole::Edge),
            pem = self.signer.public_pem(),
        );
        self.spawn("edge", id, &config)
    }
}

/// Poll `f` every 100 ms for up to `limit` until it returns `Some`; panics with `what` after.
pub fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A room created through the geo-router: its id and the host token.
pub struct CreatedRoom {
    /// Room id.
    pub room: String,
    /// Token of the room's host.
    pub host_token: String,
}

/// `POST /v1/rooms` on `router` (asserting 201).
pub fn create_room(router: &str, title: &str) -> CreatedRoom {
    let (status, created) = call(
        "POST",
        &format!("{router}/v1/rooms"),
        Some(serde_json::json!({ "title": title })),
    );
    assert_eq!(status, 201, "{created}");
    CreatedRoom {
        room: created["room"].as_str().unwrap().to_string(),
        host_token: created["host_token"].as_str().unwrap().to_string(),
    }
}

/// A token for `role` named `name` in `room`, minted by the geo-router (asserting 200).
pub fn mint_token(router: &str, room: &str, role: &str, name: &str) -> String {
    let (status, v) = call(
        "POST",
        &format!("{router}/v1/rooms/{room}/tokens"),
        Some(serde_json::json!({"role": role, "name": name})),
    );
    assert_eq!(status, 200, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// (status, JSON body) of a request; status 0 if the connection failed.
pub fn call(method: &str, url: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let req = ureq::request(method, url).timeout(Duration::from_secs(5));
    let resp = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match resp {
        Ok(r) => (r.status(), r.into_json().unwrap_or(serde_json::Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
        Err(_) => (0, serde_json::Value::Null),
    }
}

type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket signaling client (`/v1/ws`).
pub struct Ws {
    s: Stream,
}

impl Ws {
    /// Connect to `edge` with `token` and join; returns the client and its snapshot
    /// (`Err(code)` if the join was refused with an `error` event).
    pub async fn join(edge: &str, token: &str) -> Result<(Ws, ServerMessage), String> {
        let url = format!("{}/v1/ws?token={token}", edge.replace("http://", "ws://"));
        let (s, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut ws = Ws { s };
        ws.send(serde_json::json!({"type": "join"})).await;
        loop {
            match ws.next().await {
                Some(m @ ServerMessage::Snapshot { .. }) => return Ok((ws, m)),
                Some(ServerMessage::Error { code, .. }) => return Err(code),
                Some(_) => continue,
                None => return Err("closed".into()),
            }
        }
    }

    /// Send one client message.
    pub async fn send(&mut self, v: serde_json::Value) {
        self.s
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("websocket send");
    }

    /// The next server message (`None` when closed or after 10 s of silence).
    pub async fn next(&mut self) -> Option<ServerMessage> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.s.next())
                .await
                .ok()??
                .ok()?;
            match m {
                Message::Text(t) => {
                    return Some(
                        serde_json::from_str(t.as_str())
                            .unwrap_or_else(|e| panic!("unreadable server message {t}: {e}")),
                    )
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Read messages until `f` accepts one (at most 200 messages).
    pub async fn until<T>(&mut self, mut f: impl FnMut(&ServerMessage) -> Option<T>) -> T {
        for _ in 0..200 {
            let m = self.next().await.expect("server message");
            if let Some(v) = f(&m) {
                return v;
            }
        }
        panic!("the expected server message never came");
    }
}

/// A fresh value for token `sub` and `jti` (time-based: tests need uniqueness, not secrecy).
fn rand_sub() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
