//! The same suite against both storage backends: the in-memory default and Redis (a real
//! `redis-server`: `scripts/test.sh` starts one and sets `AMPHI_TEST_REDIS_URL`; without it this
//! test starts its own on a free loopback port). The store contract is checked directly, and the
//! REST API (rooms, tokens, route, heartbeats, failover, draining, ending) through a real router
//! on loopback. Two routers on one Redis must agree.

use amphi_geo_router::store::{EndOutcome, MemoryStore, Now, RedisStore, Store};
use amphi_geo_router::RouterSetup;
use amphi_protocol::api::{EdgeHeartbeat, RoomLoad};
use amphi_protocol::config::RouterConfig;
use amphi_protocol::token::TokenSigner;
use amphi_protocol::RoomId;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Redis: the one scripts/test.sh starts.

/// Base URL of the Redis under test (no database number).
fn redis_base() -> String {
    std::env::var("AMPHI_TEST_REDIS_URL")
        .expect("AMPHI_TEST_REDIS_URL is not set: run scripts/test.sh (it starts redis-server)")
        .trim_end_matches('/')
        .to_string()
}

/// A Redis URL for database `db`, emptied first (each test owns one database).
fn redis_db(db: u8) -> String {
    let url = format!("{}/{db}", redis_base());
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    redis::cmd("FLUSHDB").query::<()>(&mut c).unwrap();
    url
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Redis(u8),
}

// ---------------------------------------------------------------------------------------------
// The store contract.

fn entry(title: &str, scheduled_at: Option<u64>) -> amphi_geo_router::directory::RoomEntry {
    amphi_geo_router::directory::RoomEntry {
        title: title.into(),
        topic: Some("tests".into()),
        created_at: 1_000,
        scheduled_at,
        ended_at: None,
    }
}

fn beat(id: &str, region: &str, rooms: Vec<(RoomId, u32)>) -> EdgeHeartbeat {
    let r = amphi_protocol::config::known_region(region).unwrap();
    EdgeHeartbeat {
        id: id.into(),
        region: region.into(),
        latitude: r.latitude,
        longitude: r.longitude,
        public_url: format!("http://{id}.test"),
        participants: 3,
        cpu_load: 0.1,
        capacity: 100,
        rooms: rooms
            .into_iter()
            .map(|(room, sessions)| RoomLoad { room, sessions })
            .collect(),
        draining: false,
    }
}

async fn store_contract(store: &dyn Store) {
    let a = store.create_room(entry("a", None)).await.unwrap();
    let b = store.create_room(entry("b", Some(5_000))).await.unwrap();
    assert_ne!(a, b);
    assert_eq!(store.room(a).await.unwrap().unwrap().title, "a");
    assert_eq!(store.room(RoomId(0xdead)).await.unwrap(), None);
    let mut all: Vec<_> = store
        .rooms()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.0)
        .collect();
    all.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(all, want);
    assert_eq!(
        store.scheduled_between(4_000, 5_000).await.unwrap(),
        vec![b]
    );
    assert!(store
        .scheduled_between(5_000, 6_000)
        .await
        .unwrap()
        .is_empty());

    assert_eq!(store.end_room(a, 2_000).await.unwrap(), EndOutcome::Ended);
    assert_eq!(
        store.end_room(a, 2_001).await.unwrap(),
        EndOutcome::AlreadyEnded
    );
    assert_eq!(
        store.end_room(RoomId(0xdead), 2_000).await.unwrap(),
        EndOutcome::NotFound
    );
    assert_eq!(store.room(a).await.unwrap().unwrap().ended_at, Some(2_000));

    assert!(store.claim_once("room_started", b).await.unwrap());
    assert!(!store.claim_once("room_started", b).await.unwrap());
    assert!(store.claim_once("recording_ready", b).await.unwrap());

    let now = Now::read();
    let first = store
        .heartbeat(beat("e1", "us-east", vec![(a, 2)]), now)
        .await
        .unwrap();
    assert!(first.new && first.previous.is_empty() && !first.drain);
    let second = store
        .heartbeat(beat("e1", "us-east", vec![(a, 5)]), now)
        .await
        .unwrap();
    assert!(!second.new);
    assert_eq!(second.previous.get(&a), Some(&2));
    let mut bad = beat("e2", "eu-west", vec![]);
    bad.cpu_load = 7.0;
    assert!(store.heartbeat(bad, now).await.is_err());
    assert!(!store.request_drain("nope".into()).await.unwrap());
    assert!(store.request_drain("e1".into()).await.unwrap());
    let third = store
        .heartbeat(beat("e1", "us-east", vec![]), now)
        .await
        .unwrap();
    assert!(third.drain, "the drain request reaches the edge");
    store.sync(now).await.unwrap();
    let reg = store.registry().lock().unwrap();
    assert!(reg.knows("e1") && reg.drain_requested("e1"));
    assert!(
        reg.candidates(a, now.instant).is_empty(),
        "draining: no candidate"
    );
}

#[tokio::test]
async fn store_contract_in_memory() {
    store_contract(&MemoryStore::new(&[])).await;
}

#[tokio::test]
async fn store_contract_in_redis() {
    let url = redis_db(1);
    let store = RedisStore::connect(&url, "contract:", &[]).await.unwrap();
    store_contract(&store).await;
    // A second store on the same Redis sees the edges after one sync (nothing local).
    let other = RedisStore::connect(&url, "contract:", &[]).await.unwrap();
    assert!(other.registry().lock().unwrap().knows("e1"));
    // Another prefix sees nothing.
    let apart = RedisStore::connect(&url, "elsewhere:", &[]).await.unwrap();
    assert!(apart.rooms().await.unwrap().is_empty());
    assert!(!apart.registry().lock().unwrap().knows("e1"));
}

// ---------------------------------------------------------------------------------------------
// The REST API through a real router.

struct Router {
    base: String,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Router {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start_router(port: u16, backend: Backend, signer: TokenSigner) -> Router {
    let config = RouterConfig {
        http_listen: format!("127.0.0.1:{port}").parse().unwrap(),
        public_url: format!("http://127.0.0.1:{port}"),
        default_region: "us-east".into(),
        edges: vec![],
        packager_url: "http://127.0.0.1:9".into(),
        dev_mode: true,
        token_ttl_secs: 600,
        max_token_lifetime_secs: amphi_protocol::token::DEFAULT_MAX_LIFETIME_SECS,
        id: format!("router-{port}"),
        origins: vec![],
        geoip: vec![],
        trusted_proxies: vec![],
        load_threshold: 0.8,
        interactive_capacity: 500,
        api_keys: vec![],
        webhooks: vec![],
        redis_url: match backend {
            Backend::Memory => None,
            Backend::Redis(db) => Some(format!("{}/{db}", redis_base())),
        },
        hls_base_url: None,
        https: Default::default(),
        limits: Default::default(),
    };
    let setup = RouterSetup {
        config,
        signer,
        web: vec![],
        mesh_tls: None,
    };
    let stop = CancellationToken::new();
    let token = stop.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            amphi_geo_router::run(setup, token)
                .await
                .expect("router runs");
        });
    });
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while call("GET", &format!("{base}/healthz"), None).0 != 200 {
        assert!(Instant::now() < deadline, "router on {port} never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    Router {
        base,
        stop,
        thread: Some(thread),
    }
}

/// (status, JSON body) of a request; status 0 when the connection failed.
fn call(method: &str, url: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
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

fn heartbeat(base: &str, b: &EdgeHeartbeat) -> serde_json::Value {
    let (status, v) = call(
        "PUT",
        &format!("{base}/v1/edges/{}", b.id),
        Some(serde_json::to_value(b).unwrap()),
    );
    assert_eq!(status, 200, "heartbeat: {v}");
    v
}

/// Poll `f` every 100 ms for up to 10 s until it returns `Some`.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn api_suite(port: u16, backend: Backend) {
    let r = start_router(port, backend, TokenSigner::generate("k1"));
    let b = &r.base;
    let (status, created) = call(
        "POST",
        &format!("{b}/v1/rooms"),
        Some(serde_json::json!({"title": "suite", "topic": "music"})),
    );
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap().to_string();
    let (_, quiet) = call(
        "POST",
        &format!("{b}/v1/rooms"),
        Some(serde_json::json!({"title": "quiet", "topic": "music"})),
    );
    let quiet = quiet["room"].as_str().unwrap().to_string();
    let (status, later) = call(
        "POST",
        &format!("{b}/v1/rooms"),
        Some(serde_json::json!({"title": "later", "scheduled_at": Now::read().unix_secs() + 3600})),
    );
    assert_eq!(status, 201, "{later}");
    let (_, info) = call("GET", &format!("{b}/v1/rooms/{room}"), None);
    assert_eq!(
        (info["title"].as_str(), info["status"].as_str()),
        (Some("suite"), Some("live"))
    );

    // No edges yet: 503 no_edge. Then two edges heartbeat; the busy room ranks first.
    let (status, v) = call("GET", &format!("{b}/v1/route?room={room}"), None);
    assert_eq!((status, v["error"].as_str()), (503, Some("no_edge")), "{v}");
    let id: RoomId = room.parse().unwrap();
    let east = beat("edge-east", "us-east", vec![(id, 7)]);
    let west = beat("edge-west", "eu-west", vec![]);
    heartbeat(b, &east);
    heartbeat(b, &west);
    let (_, list) = call("GET", &format!("{b}/v1/rooms?topic=music"), None);
    let order: Vec<_> = list["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["room"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, vec![room.clone(), quiet.clone()], "{list}");
    assert_eq!(list["rooms"][0]["listeners"], 7);
    let (_, all) = call("GET", &format!("{b}/v1/rooms"), None);
    assert_eq!(all["rooms"].as_array().unwrap().len(), 3);
    assert_eq!(all["rooms"][2]["status"], "scheduled", "{all}");

    // Route and mint.
    let (status, v) = call(
        "GET",
        &format!("{b}/v1/route?room={room}&region=eu-west"),
        None,
    );
    assert_eq!(
        (status, v["edge"].as_str()),
        (200, Some("edge-west")),
        "{v}"
    );
    let (status, v) = call("GET", &format!("{b}/v1/route?room={room}"), None);
    assert_eq!(
        (status, v["edge"].as_str()),
        (200, Some("edge-east")),
        "{v}"
    );
    let (status, v) = call(
        "POST",
        &format!("{b}/v1/rooms/{room}/tokens"),
        Some(serde_json::json!({"role": "speaker", "name": "s"})),
    );
    assert_eq!(status, 200, "{v}");

    // Drain edge-east: routes avoid it, its next heartbeat is told.
    let (status, _) = call("POST", &format!("{b}/v1/edges/edge-east/drain"), None);
    assert_eq!(status, 202);
    let (status, v) = call("POST", &format!("{b}/v1/edges/edge-x/drain"), None);
    assert_eq!((status, v["error"].as_str()), (404, Some("edge_not_found")));
    assert_eq!(heartbeat(b, &east)["drain"], true);
    let (_, v) = call("GET", &format!("{b}/v1/route?room={room}"), None);
    assert_eq!(v["edge"], "edge-west", "{v}");

    // Failover: edge-west stops heartbeating (edge-east keeps going, draining): no edge once
    // three 0.5 s heartbeats are missed.
    let started = Instant::now();
    eventually("edge-west taken out", || {
        heartbeat(b, &east);
        let (status, v) = call("GET", &format!("{b}/v1/route?room={room}"), None);
        (status == 503).then_some(v)
    });
    assert!(started.elapsed() >= Duration::from_secs(1), "out too early");
    let (_, edges) = call("GET", &format!("{b}/v1/edges"), None);
    let west_row = edges["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "edge-west")
        .unwrap()
        .clone();
    assert_eq!(west_row["healthy"], false, "{edges}");

    // End: once, then 404 for routes and tokens; ending twice answers the ended room.
    let (status, v) = call("POST", &format!("{b}/v1/rooms/{room}/end"), None);
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let host = created["host_token"].as_str().unwrap();
    let end = |token: &str| match ureq::post(&format!("{b}/v1/rooms/{room}/end"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
    {
        Ok(r) => (r.status(), r.into_json::<serde_json::Value>().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    };
    let (status, v) = end(host);
    assert_eq!((status, v["status"].as_str()), (200, Some("ended")), "{v}");
    let (status, v) = end(host);
    assert_eq!((status, v["status"].as_str()), (200, Some("ended")), "{v}");
    let (status, _) = call(
        "GET",
        &format!("{b}/v1/route?room={room}&region=eu-west"),
        None,
    );
    assert_eq!(status, 404);
    let (status, _) = call(
        "POST",
        &format!("{b}/v1/rooms/{room}/tokens"),
        Some(serde_json::json!({"role": "listener", "name": "l"})),
    );
    assert_eq!(status, 404);
    let (_, all) = call("GET", &format!("{b}/v1/rooms"), None);
    assert_eq!(
        all["rooms"].as_array().unwrap().len(),
        2,
        "ended rooms are not listed"
    );
}

#[test]
fn rest_api_on_the_memory_backend() {
    api_suite(27_110, Backend::Memory);
}

#[test]
fn rest_api_on_the_redis_backend() {
    redis_db(2);
    api_suite(27_111, Backend::Redis(2));
}

#[test]
fn two_routers_on_one_redis_agree() {
    redis_db(3);
    let signer = TokenSigner::generate("k1");
    let pem = signer.to_pkcs8_pem();
    let a = start_router(27_120, Backend::Redis(3), signer);
    let b = start_router(
        27_121,
        Backend::Redis(3),
        TokenSigner::from_pkcs8_pem("k1", &pem).unwrap(),
    );
    // A room created on A: B knows it at once, mints for it and routes it.
    let (_, created) = call(
        "POST",
        &format!("{}/v1/rooms", a.base),
        Some(serde_json::json!({"title": "shared"})),
    );
    let room = created["room"].as_str().unwrap().to_string();
    let (status, info) = call("GET", &format!("{}/v1/rooms/{room}", b.base), None);
    assert_eq!(
        (status, info["title"].as_str()),
        (200, Some("shared")),
        "{info}"
    );
    let (status, v) = call(
        "POST",
        &format!("{}/v1/rooms/{room}/tokens", b.base),
        Some(serde_json::json!({"role": "speaker", "name": "s"})),
    );
    assert_eq!(status, 200, "{v}");
    // An edge heartbeats to A only; B routes to it.
    let edge = beat("edge-shared", "eu-west", vec![]);
    heartbeat(&a.base, &edge);
    let v = eventually("B routes to the edge that heartbeats to A", || {
        heartbeat(&a.base, &edge);
        let (status, v) = call(
            "GET",
            &format!("{}/v1/route?room={room}&region=eu-west", b.base),
            None,
        );
        (status == 200).then_some(v)
    });
    assert_eq!(v["edge"], "edge-shared", "{v}");
    // A drain asked on B reaches the edge through A.
    let (status, _) = call(
        "POST",
        &format!("{}/v1/edges/edge-shared/drain", b.base),
        None,
    );
    assert_eq!(status, 202);
    assert_eq!(heartbeat(&a.base, &edge)["drain"], true);
    // Ended on B (with A's host token): A sees it ended.
    let host = created["host_token"].as_str().unwrap();
    let resp = ureq::post(&format!("{}/v1/rooms/{room}/end", b.base))
        .set("Authorization", &format!("Bearer {host}"))
        .call()
        .expect("end on B");
    assert_eq!(resp.status(), 200);
    let (_, info) = call("GET", &format!("{}/v1/rooms/{room}", a.base), None);
    assert_eq!(info["status"], "ended", "{info}");
    let (_, list) = call("GET", &format!("{}/v1/rooms", a.base), None);
    assert!(list["rooms"].as_array().unwrap().is_empty(), "{list}");
}
