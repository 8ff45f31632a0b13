//! The same suite against both storage backends: the in-memory default and Redis (a real
//! `redis-server`: `scripts/test.sh` starts one and sets `AMPHI_TEST_REDIS_URL`; without it this
//! test starts its own on a free loopback port). The store contract is checked directly, and the
//! REST API (rooms, tokens, route, heartbeats, failover, draining, ending) through a real router
//! on loopback. Two routers on one Redis must agree.

use amphi_geo_router::directory::{Expiry, RoomCounts};
use amphi_geo_router::store::{
    EndOutcome, MemoryStore, Now, RecordingDecision, RedisStore, Store, MAX_REPORTS_PER_ROOM,
};
use amphi_geo_router::RouterSetup;
use amphi_protocol::api::{EdgeHeartbeat, RoomLoad};
use amphi_protocol::config::RouterConfig;
use amphi_protocol::room::{Report, ReportReason, ReportTarget};
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
        tiers: None,
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
            .map(|(room, sessions)| RoomLoad {
                room,
                sessions,
                push: 0,
            })
            .collect(),
        draining: false,
        relay_url: None,
        webtransport: None,
    }
}

async fn store_contract(store: &dyn Store) {
    let a = store.create_room(entry("a", None)).await.unwrap();
    let tiers = amphi_protocol::api::TierThresholds {
        interactive: Some(3),
        push: Some(0),
    };
    let with_tiers = amphi_geo_router::directory::RoomEntry {
        tiers: Some(tiers),
        ..entry("b", Some(5_000))
    };
    let b = store.create_room(with_tiers).await.unwrap();
    assert_ne!(a, b);
    assert_eq!(store.room(a).await.unwrap().unwrap().title, "a");
    assert_eq!(store.room(a).await.unwrap().unwrap().tiers, None);
    assert_eq!(store.room(b).await.unwrap().unwrap().tiers, Some(tiers));
    assert_eq!(store.room(RoomId(0xdead)).await.unwrap(), None);
    let page = store.page(None, 100, 1_500).await.unwrap();
    let listed: Vec<_> = page.rooms.iter().map(|r| r.0).collect();
    assert_eq!(listed, vec![a, b], "live first, then scheduled");
    assert_eq!(page.next, None);
    let first = store.page(None, 1, 1_500).await.unwrap();
    assert_eq!(first.rooms[0].0, a);
    let second = store.page(first.next, 1, 1_500).await.unwrap();
    assert_eq!(second.rooms[0].0, b);
    assert_eq!(
        store.counts(1_500).await.unwrap(),
        RoomCounts {
            live: 1,
            scheduled: 1
        }
    );
    let expiry = Expiry { idle_secs: 600 };
    assert!(store
        .idle_rooms(expiry, 1_599, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.idle_rooms(expiry, 1_600, 10).await.unwrap(), vec![a]);
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
    let listed: Vec<_> = store
        .page(None, 100, 1_500)
        .await
        .unwrap()
        .rooms
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(listed, vec![b], "ended rooms leave the index");
    assert_eq!(store.counts(1_500).await.unwrap().live, 0);
    assert_eq!(store.idle_rooms(expiry, 5_600, 10).await.unwrap(), vec![b]);

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
    {
        let reg = store.registry().read().unwrap();
        assert!(reg.knows("e1") && reg.drain_requested("e1"));
        assert!(
            reg.candidates(a, now.instant).is_empty(),
            "draining: no candidate"
        );
    }
    // A heartbeat listing a room keeps it alive.
    let t = 100_000;
    let at = Now {
        instant: now.instant,
        unix_ms: t * 1000,
    };
    store
        .heartbeat(beat("e3", "us-east", vec![(b, 1)]), at)
        .await
        .unwrap();
    assert!(store
        .idle_rooms(expiry, t + 599, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.idle_rooms(expiry, t + 600, 10).await.unwrap(),
        vec![b]
    );

    // Token revocations: each until its token's expiry (Redis expires the key then), listed for
    // the re-sends to origins.
    let s = unix_now();
    store.revoke_token("j1".into(), s + 600, s).await.unwrap();
    store.revoke_token("old".into(), s - 1, s).await.unwrap();
    assert!(store.is_token_revoked("j1".into(), s).await.unwrap());
    assert!(!store.is_token_revoked("j2".into(), s).await.unwrap());
    assert!(!store.is_token_revoked("old".into(), s).await.unwrap());
    assert_eq!(
        store.revoked_tokens(s).await.unwrap(),
        vec![("j1".to_string(), s + 600)]
    );
    assert!(store.revoked_tokens(s + 600).await.unwrap().is_empty());

    reminder_contract(store).await;
}

/// Reminder subscriptions and rescheduling, the same on both backends.
async fn reminder_contract(store: &dyn Store) {
    use amphi_geo_router::directory::Rescheduled;
    use amphi_geo_router::store::Subscription;
    let now = unix_now();
    let at = now + 3_600;
    let room = store.create_room(entry("later", Some(at))).await.unwrap();
    let live = store.create_room(entry("now", None)).await.unwrap();
    let keep = amphi_geo_router::store::reminder_ttl(at, now);
    assert_eq!(
        store
            .subscribe_reminder(room, "ann".into(), keep)
            .await
            .unwrap(),
        Subscription::Added(1)
    );
    assert_eq!(
        store
            .subscribe_reminder(room, "bob".into(), keep)
            .await
            .unwrap(),
        Subscription::Added(2)
    );
    assert_eq!(
        store
            .subscribe_reminder(room, "ann".into(), keep)
            .await
            .unwrap(),
        Subscription::Already(2)
    );
    assert_eq!(
        store.reminder_subscribers(room).await.unwrap(),
        vec!["ann".to_string(), "bob".to_string()]
    );
    assert_eq!(
        store.reminder_counts(vec![live, room]).await.unwrap(),
        vec![0, 2]
    );
    assert!(store
        .unsubscribe_reminder(room, "bob".into())
        .await
        .unwrap());
    assert!(!store
        .unsubscribe_reminder(room, "bob".into())
        .await
        .unwrap());

    // Moving the start moves the room in the schedule (and the listing) and keeps subscribers.
    assert_eq!(
        store.reschedule_room(room, at + 600, now).await.unwrap(),
        Rescheduled::Moved { previous: at }
    );
    let moved = store.room(room).await.unwrap().unwrap();
    assert_eq!(moved.scheduled_at, Some(at + 600));
    assert_eq!(moved.title, "later");
    assert!(!store
        .scheduled_between(at - 1, at)
        .await
        .unwrap()
        .contains(&room));
    assert!(store
        .scheduled_between(at + 599, at + 600)
        .await
        .unwrap()
        .contains(&room));
    let listed = store.page(None, 100, now).await.unwrap();
    assert_eq!(listed.rooms.iter().filter(|(id, _)| *id == room).count(), 1);
    assert_eq!(store.reminder_counts(vec![room]).await.unwrap(), vec![1]);
    assert_eq!(
        store.reschedule_room(live, at, now).await.unwrap(),
        Rescheduled::NotScheduled
    );
    assert_eq!(
        store.reschedule_room(room, at, at + 601).await.unwrap(),
        Rescheduled::NotScheduled,
        "started rooms stay put"
    );
    assert_eq!(
        store
            .reschedule_room(RoomId(0xdead_beef), at, now)
            .await
            .unwrap(),
        Rescheduled::NotFound
    );
    // Keyed claims: once per key and room.
    assert!(store.claim_once("reminder_live:1", room).await.unwrap());
    assert!(!store.claim_once("reminder_live:1", room).await.unwrap());
    assert!(store.claim_once("reminder_live:2", room).await.unwrap());

    store.clear_reminders(room).await.unwrap();
    assert!(store.reminder_subscribers(room).await.unwrap().is_empty());
    assert_eq!(store.end_room(room, now).await.unwrap(), EndOutcome::Ended);
    assert_eq!(
        store.reschedule_room(room, at, now).await.unwrap(),
        Rescheduled::NotScheduled,
        "cancelled rooms stay cancelled"
    );
}

fn report(room: RoomId, id: &str, at_ms: u64) -> Report {
    Report {
        id: id.into(),
        room,
        reporter: "lis".into(),
        reporter_name: "Lis".into(),
        reporter_id: amphi_protocol::ParticipantId(2),
        target: ReportTarget::User("spk".into()),
        target_name: Some("Spk".into()),
        reason: ReportReason::Harassment,
        text: "shouting".into(),
        at_ms,
        program_ms: Some(40_000),
    }
}

/// Reports: stored once by id (every router hears each), listed newest first, bounded per room.
async fn report_contract(store: &dyn Store) {
    let (a, b) = (RoomId(0xa), RoomId(0xb));
    assert!(store.reports(a, 10).await.unwrap().is_empty());
    assert!(store.add_report(report(a, "r1", 1_000)).await.unwrap());
    assert!(
        !store.add_report(report(a, "r1", 1_000)).await.unwrap(),
        "the same report from a second router is not new"
    );
    assert!(store.add_report(report(a, "r2", 2_000)).await.unwrap());
    assert!(store.add_report(report(b, "r3", 1_500)).await.unwrap());
    let listed = store.reports(a, 10).await.unwrap();
    assert_eq!(listed, vec![report(a, "r2", 2_000), report(a, "r1", 1_000)]);
    assert_eq!(
        store.reports(a, 1).await.unwrap(),
        vec![report(a, "r2", 2_000)]
    );
    assert_eq!(
        store.reports(b, 10).await.unwrap(),
        vec![report(b, "r3", 1_500)]
    );
    // At most MAX_REPORTS_PER_ROOM per room: the oldest go.
    for i in 0..MAX_REPORTS_PER_ROOM as u64 {
        assert!(store
            .add_report(report(a, &format!("x{i}"), 10_000 + i))
            .await
            .unwrap());
    }
    let all = store.reports(a, usize::MAX / 2).await.unwrap();
    assert_eq!(all.len(), MAX_REPORTS_PER_ROOM);
    assert_eq!(all[0].id, format!("x{}", MAX_REPORTS_PER_ROOM - 1));
    assert!(
        all.iter().all(|r| r.id.starts_with('x')),
        "r1 and r2 dropped"
    );
}

#[tokio::test]
async fn reports_in_memory() {
    report_contract(&MemoryStore::new(&[])).await;
}

#[tokio::test]
async fn reports_in_redis_survive_the_router() {
    let url = redis_db(7);
    let room = RoomId(0xa);
    {
        let store = RedisStore::connect(&url, "reports:", &[]).await.unwrap();
        report_contract(&store).await;
    }
    // A new router process on the same Redis lists them (durable, not this process's memory).
    let again = RedisStore::connect(&url, "reports:", &[]).await.unwrap();
    assert_eq!(again.reports(room, 5).await.unwrap().len(), 5);
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("reports:reports:{room}"))
        .query(&mut c)
        .unwrap();
    assert!(ttl > 0, "reports expire eventually (TTL {ttl})");
}

/// In production the listing needs an app API key's signature: unsigned or signed with a bad
/// secret it answers 401, signed 200 with the room's reports.
#[test]
fn the_report_listing_needs_an_api_key_in_production() {
    const SECRET: &str = "app-secret";
    let r = start_router_with(27_150, Backend::Memory, TokenSigner::generate("k1"), |c| {
        c.dev_mode = false;
        c.api_keys = vec![amphi_protocol::config::ApiKeyConfig {
            id: "app".into(),
            secret: SECRET.into(),
            scope: amphi_protocol::config::ApiScope::App,
        }];
    });
    let path = "/v1/rooms/000000000000000a/reports?limit=5";
    let get = |secret: &str| {
        let now = unix_now();
        let sig = amphi_geo_router::auth::sign(secret, now, "GET", path, b"");
        let resp = ureq::get(&format!("{}{path}", r.base))
            .set("x-amphi-key", "app")
            .set("x-amphi-timestamp", &now.to_string())
            .set("x-amphi-signature", &sig)
            .call();
        match resp {
            Ok(r) => (r.status(), r.into_json::<serde_json::Value>().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    };
    let (status, body) = call("GET", &format!("{}{path}", r.base), None);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("bad_api_signature")),
        "{body}"
    );
    assert_eq!(get("wrong").0, 401);
    let (status, body) = get(SECRET);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"room": "000000000000000a", "reports": []})
    );
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The host's decision on a recording: undecided, published, then deleted for good (a later
/// publish leaves it deleted); `reopened` is another store on the same backend (a restart).
async fn recording_contract(store: &dyn Store, reopened: &dyn Store) {
    let (a, b) = (RoomId(0xa1), RoomId(0xb2));
    assert_eq!(store.recording_decision(a).await.unwrap(), None);
    let published = RecordingDecision::Published;
    let deleted = RecordingDecision::Deleted;
    assert_eq!(
        store.decide_recording(a, published).await.unwrap(),
        published
    );
    assert_eq!(
        store.decide_recording(a, published).await.unwrap(),
        published
    );
    assert_eq!(
        store.decide_recording(b, published).await.unwrap(),
        published
    );
    assert_eq!(store.decide_recording(b, deleted).await.unwrap(), deleted);
    assert_eq!(store.decide_recording(b, published).await.unwrap(), deleted);
    assert_eq!(
        reopened.recording_decision(a).await.unwrap(),
        Some(published)
    );
    assert_eq!(reopened.recording_decision(b).await.unwrap(), Some(deleted));
}

#[tokio::test]
async fn recording_decisions_in_memory() {
    let store = MemoryStore::new(&[]);
    recording_contract(&store, &store).await;
}

#[tokio::test]
async fn recording_decisions_in_redis_survive_a_restart() {
    let url = redis_db(13);
    let store = RedisStore::connect(&url, "rec:", &[]).await.unwrap();
    let reopened = RedisStore::connect(&url, "rec:", &[]).await.unwrap();
    recording_contract(&store, &reopened).await;
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
    // A revoked token's key lives as long as the token.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg("contract:revoked:j1")
        .query(&mut c)
        .unwrap();
    assert!((590..=600).contains(&ttl), "TTL {ttl}");
    // A second store on the same Redis sees the edges after one sync (nothing local).
    let other = RedisStore::connect(&url, "contract:", &[]).await.unwrap();
    assert!(other.registry().read().unwrap().knows("e1"));
    // Another prefix sees nothing.
    let apart = RedisStore::connect(&url, "elsewhere:", &[]).await.unwrap();
    assert!(apart.page(None, 10, 1_500).await.unwrap().rooms.is_empty());
    assert!(!apart.registry().read().unwrap().knows("e1"));
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
    start_router_idle(port, backend, signer, 900)
}

fn start_router_idle(port: u16, backend: Backend, signer: TokenSigner, idle_secs: u64) -> Router {
    start_router_with(port, backend, signer, |c| {
        c.room_idle_timeout_secs = idle_secs
    })
}

/// A router on `port` whose configuration `tweak` adjusts.
fn start_router_with(
    port: u16,
    backend: Backend,
    signer: TokenSigner,
    tweak: impl FnOnce(&mut RouterConfig),
) -> Router {
    let mut config = RouterConfig {
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
        room_affine: true,
        relay_fanout: 10,
        push_capacity: 10_000,
        api_keys: vec![],
        webhooks: vec![],
        room_idle_timeout_secs: 900,
        reminder_lead_secs: 600,
        redis_url: match backend {
            Backend::Memory => None,
            Backend::Redis(db) => Some(format!("{}/{db}", redis_base())),
        },
        hls_base_url: None,
        http1_fast_path: true,
        https: Default::default(),
        limits: Default::default(),
    };
    tweak(&mut config);
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

    // No edges yet: 503 no_edge. Then two edges heartbeat; listing carries the listeners.
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
    let mut want = vec![room.clone(), quiet.clone()];
    want.sort();
    let mut got = order.clone();
    got.sort();
    assert_eq!(got, want, "{list}");
    let busy = list["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room"] == room.as_str())
        .unwrap();
    assert_eq!(busy["listeners"], 7);
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

/// Route answers are remembered (per worker thread, and in the router's answer cache); a drain
/// and an end through this router must still change the very next answers.
#[test]
fn remembered_route_answers_end_with_a_drain_and_with_the_room() {
    let r = start_router(27_160, Backend::Memory, TokenSigner::generate("k1"));
    let b = &r.base;
    let (status, created) = call(
        "POST",
        &format!("{b}/v1/rooms"),
        Some(serde_json::json!({"title": "memo"})),
    );
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap().to_string();
    heartbeat(b, &beat("edge-east", "us-east", vec![]));
    heartbeat(b, &beat("edge-west", "eu-west", vec![]));
    // Enough requests, over fresh and kept connections, for both worker threads to remember.
    let routes = |want: (u16, Option<&str>)| {
        for i in 0..40 {
            let (status, v) = call("GET", &format!("{b}/v1/route?room={room}&ip=8.8.8.8"), None);
            assert_eq!((status, v["edge"].as_str()), want, "request {i}: {v}");
        }
    };
    routes((200, Some("edge-east")));
    let (status, _) = call("POST", &format!("{b}/v1/edges/edge-east/drain"), None);
    assert_eq!(status, 202);
    routes((200, Some("edge-west")));
    let host = created["host_token"].as_str().unwrap();
    let ended = ureq::post(&format!("{b}/v1/rooms/{room}/end"))
        .set("Authorization", &format!("Bearer {host}"))
        .call()
        .map(|r| r.status());
    assert_eq!(ended.ok(), Some(200));
    routes((404, None));
}

/// The HTTP/1.1 responses in `bytes`, in order: (status, content type, body).
fn http_responses(mut bytes: &[u8]) -> Vec<(u16, String, String)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = resp.parse(bytes) else {
            panic!("not a whole response: {}", String::from_utf8_lossy(bytes));
        };
        let value = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .unwrap_or_default()
        };
        let len: usize = value("content-length").parse().expect("a content length");
        assert!(!value("date").is_empty(), "a date");
        let body = String::from_utf8_lossy(&bytes[head..head + len]).into_owned();
        out.push((resp.code.unwrap_or(0), value("content-type"), body));
        bytes = &bytes[head + len..];
    }
    out
}

/// `GET /v1/route` is answered on the plain listener's HTTP/1.1 fast path; a connection's
/// first other request hands it to hyper. Pipelined requests, the trusted proxy's forwarded
/// address, errors and `Connection: close` read the same on both, and on a router with the
/// fast path off.
#[test]
fn route_answers_read_the_same_on_the_fast_path_and_through_hyper() {
    use std::io::{Read, Write};
    let trusted = |c: &mut RouterConfig| c.trusted_proxies = vec!["127.0.0.1/32".into()];
    let fast = start_router_with(
        27_180,
        Backend::Memory,
        TokenSigner::generate("k1"),
        trusted,
    );
    let hyper_only = start_router_with(27_181, Backend::Memory, TokenSigner::generate("k1"), |c| {
        trusted(c);
        c.http1_fast_path = false;
    });
    let mut answers = Vec::new();
    for r in [&fast, &hyper_only] {
        let b = &r.base;
        let (status, created) = call(
            "POST",
            &format!("{b}/v1/rooms"),
            Some(serde_json::json!({"title": "front"})),
        );
        assert_eq!(status, 201, "{created}");
        let room = created["room"].as_str().unwrap().to_string();
        heartbeat(b, &beat("edge-east", "us-east", vec![]));
        heartbeat(b, &beat("edge-west", "eu-west", vec![]));
        let route = format!(
            "GET /v1/route?room={room}&role=listener&explain=1 HTTP/1.1\r\nHost: a\r\n\
             X-Forwarded-For: 81.2.69.160\r\n\r\n"
        );
        // Two routes and a malformed one pipelined, then a request for hyper, then a route
        // through hyper on the same connection, which asks to close it.
        let requests = format!(
            "{route}{route}GET /v1/route?room=nothex HTTP/1.1\r\nHost: a\r\n\r\n\
             GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n{}",
            route.replace("Host: a", "Host: a\r\nConnection: close")
        );
        let mut conn = std::net::TcpStream::connect(b.trim_start_matches("http://")).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.write_all(requests.as_bytes()).unwrap();
        let mut read = Vec::new();
        conn.read_to_end(&mut read)
            .expect("the router closes after the last answer");
        let responses = http_responses(&read);
        let statuses: Vec<u16> = responses.iter().map(|r| r.0).collect();
        assert_eq!(statuses, [200, 200, 404, 200, 200], "{responses:?}");
        for i in [0, 1, 4] {
            assert_eq!(responses[i].1, "application/json");
            let v: serde_json::Value = serde_json::from_str(&responses[i].2).unwrap();
            assert_eq!(v["mode"], "interactive", "{v}");
            assert!(
                v["why"]
                    .as_str()
                    .is_some_and(|w| w.starts_with("forwarded by a trusted proxy")),
                "the forwarded address is used: {v}"
            );
        }
        assert_eq!(responses[0].2, responses[1].2);
        assert_eq!(
            responses[0].2, responses[4].2,
            "the fast path and hyper agree"
        );
        assert!(responses[2].2.contains("\"error\""), "{:?}", responses[2]);
        answers.push(
            responses
                .into_iter()
                .map(|(status, kind, body)| {
                    (
                        status,
                        kind,
                        body.replace(&room, "ROOM").replace(b, "ROUTER"),
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(answers[0], answers[1], "with the fast path off");
}

/// Room-affine placement through the real router: two edges in one region; a room that one of
/// them holds stays there though the other comes first, a room nobody holds goes to the first,
/// and a room spills when its edge is loaded past the threshold.
fn room_affine_suite(port: u16, backend: Backend) {
    let r = start_router(port, backend, TokenSigner::generate("k1"));
    let b = &r.base;
    let room = |title: &str| {
        let (status, created) = call(
            "POST",
            &format!("{b}/v1/rooms"),
            Some(serde_json::json!({ "title": title })),
        );
        assert_eq!(status, 201, "{created}");
        created["room"].as_str().unwrap().to_string()
    };
    let (held, fresh) = (room("held"), room("fresh"));
    let held_id: RoomId = held.parse().unwrap();
    // Same place and load: edge-east-a comes first by id; edge-east-b holds the room.
    let a = beat("edge-east-a", "us-east", vec![]);
    let mut b_edge = beat("edge-east-b", "us-east", vec![(held_id, 4)]);
    heartbeat(b, &a);
    heartbeat(b, &b_edge);
    let edge_of = |room: &str, role: &str| {
        let (status, v) = call(
            "GET",
            &format!("{b}/v1/route?room={room}&role={role}&ip=8.8.8.8&explain=1"),
            None,
        );
        assert_eq!(status, 200, "{v}");
        (
            v["edge"].as_str().unwrap().to_string(),
            v["why"].to_string(),
        )
    };
    for role in ["speaker", "listener"] {
        let (edge, why) = edge_of(&held, role);
        assert_eq!(edge, "edge-east-b", "{why}");
        assert!(why.contains("room-affine"), "{why}");
        assert_eq!(edge_of(&fresh, role).0, "edge-east-a");
    }
    // edge-east-b loaded past the threshold: the room spills to edge-east-a.
    b_edge.cpu_load = 0.95;
    heartbeat(b, &b_edge);
    heartbeat(b, &a);
    eventually("the loaded edge spills", || {
        (edge_of(&held, "listener").0 == "edge-east-a").then_some(())
    });
}

#[test]
fn rooms_stay_on_the_edge_of_a_region_that_holds_them_in_memory() {
    room_affine_suite(27_170, Backend::Memory);
}

#[test]
fn rooms_stay_on_the_edge_of_a_region_that_holds_them_in_redis() {
    redis_db(14);
    room_affine_suite(27_171, Backend::Redis(14));
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

/// Every room of a walk through `GET /v1/rooms` with `limit`.
fn walk_rooms(base: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    for _ in 0..10_000 {
        let (status, v) = call(
            "GET",
            &format!("{base}/v1/rooms?limit={limit}&cursor={cursor}"),
            None,
        );
        assert_eq!(status, 200, "{v}");
        let rooms = v["rooms"].as_array().unwrap();
        assert!(rooms.len() <= limit);
        out.extend(
            rooms
                .iter()
                .map(|r| r["room"].as_str().unwrap().to_string()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => return out,
        }
    }
    panic!("the walk never ended");
}

/// Calls of Redis commands so far (`INFO commandstats`), by command name.
fn redis_calls(url: &str, command: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[test]
fn a_thousand_rooms_in_redis_page_once_each_and_metrics_reads_no_room() {
    let url = redis_db(10);
    let now = Now::read().unix_secs();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut want: Vec<String> = rt.block_on(async {
        let store = RedisStore::connect(&url, "amphi:", &[]).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..1000u64 {
            let mut e = entry("r", None);
            // Many rooms share a start second; every fourth one is scheduled.
            e.created_at = now - 100 + i / 20;
            if i % 4 == 0 {
                e.scheduled_at = Some(now + 3600 + i / 9);
            }
            ids.push(store.create_room(e).await.unwrap().to_string());
        }
        ids
    });
    want.sort();
    let r = start_router(27_130, Backend::Redis(10), TokenSigner::generate("k1"));
    for limit in [1000, 37] {
        let mut got = walk_rooms(&r.base, limit);
        assert_eq!(got.len(), 1000, "limit {limit}");
        got.sort();
        assert_eq!(got, want, "limit {limit}: every room exactly once");
    }
    let (status, v) = call("GET", &format!("{}/v1/rooms?limit=5000", r.base), None);
    assert_eq!(status, 200);
    assert_eq!(v["rooms"].as_array().unwrap().len(), 1000, "capped at 1000");
    assert!(v["next_cursor"].is_string());
    let (status, v) = call("GET", &format!("{}/v1/rooms?cursor=nonsense", r.base), None);
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_query")));
    // /metrics counts from the index: no room is read (other tests may read a few meanwhile).
    let before = redis_calls(&url, "hmget") + redis_calls(&url, "hget");
    let metrics = ureq::get(&format!("{}/metrics", r.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let reads = redis_calls(&url, "hmget") + redis_calls(&url, "hget") - before;
    assert!(reads < 100, "/metrics read {reads} rooms");
    assert!(metrics.contains("amphi_router_live_rooms 750"), "{metrics}");
    assert!(metrics.contains("amphi_router_scheduled_rooms 250"));
}

fn idle_room_expires(port: u16, backend: Backend) {
    let r = start_router_idle(port, backend, TokenSigner::generate("k1"), 1);
    let (status, created) = call(
        "POST",
        &format!("{}/v1/rooms", r.base),
        Some(serde_json::json!({"title": "nobody comes"})),
    );
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap().to_string();
    eventually("the idle room ends", || {
        let (_, info) = call("GET", &format!("{}/v1/rooms/{room}", r.base), None);
        (info["status"] == "ended").then_some(())
    });
    let (_, list) = call("GET", &format!("{}/v1/rooms", r.base), None);
    assert!(list["rooms"].as_array().unwrap().is_empty(), "{list}");
    let metrics = ureq::get(&format!("{}/metrics", r.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("amphi_router_rooms_expired_total 1"),
        "{metrics}"
    );
}

#[test]
fn a_room_nobody_keeps_alive_expires_in_memory() {
    idle_room_expires(27_140, Backend::Memory);
}

#[test]
fn a_room_nobody_keeps_alive_expires_in_redis() {
    redis_db(11);
    idle_room_expires(27_141, Backend::Redis(11));
}

/// Rooms stored by a release before the `open` index (listed in the old `rooms` set) are listed
/// again once a router of this release connects, and the old set is emptied.
#[tokio::test]
async fn rooms_stored_before_the_index_are_listed_after_an_upgrade() {
    let url = redis_db(12);
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let (open, ended) = (RoomId(0x0123_4567), RoomId(0x0765_4321));
    for (id, ended_at) in [(open, None), (ended, Some(2_000u64))] {
        let mut e = entry("old", None);
        e.created_at = 1_500;
        let key = format!("amphi:room:{id}");
        redis::cmd("HSET")
            .arg(&key)
            .arg("entry")
            .arg(serde_json::to_string(&e).unwrap())
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        if let Some(at) = ended_at {
            redis::cmd("HSET")
                .arg(&key)
                .arg("ended_at")
                .arg(at)
                .query_async::<()>(&mut c)
                .await
                .unwrap();
        }
        redis::cmd("SADD")
            .arg("amphi:rooms")
            .arg(id.to_string())
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
    let store = RedisStore::connect(&url, "amphi:", &[]).await.unwrap();
    let page = store.page(None, 100, 10_000).await.unwrap();
    let listed: Vec<RoomId> = page.rooms.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        listed,
        vec![open],
        "the open legacy room is listed, the ended one is not"
    );
    assert_eq!(store.counts(10_000).await.unwrap().live, 1);
    let left: Vec<String> = redis::cmd("SMEMBERS")
        .arg("amphi:rooms")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(left.is_empty(), "the old set is emptied: {left:?}");
    // A second router connecting finds nothing more to do and lists the room once.
    let again = RedisStore::connect(&url, "amphi:", &[]).await.unwrap();
    assert_eq!(again.page(None, 100, 10_000).await.unwrap().rooms.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Scheduled rooms' reminders, end to end: a real router, a real webhook receiver.

/// A webhook receiver on loopback that keeps every event body it gets.
struct Receiver {
    url: String,
    events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    stop: CancellationToken,
}

impl Receiver {
    fn start() -> Self {
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let (kept, token) = (events.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new().route(
                    "/hook",
                    axum::routing::post(move |body: axum::body::Bytes| {
                        let kept = kept.clone();
                        async move {
                            if let Ok(v) = serde_json::from_slice(&body) {
                                kept.lock().unwrap().push(v);
                            }
                            "ok"
                        }
                    }),
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap().port()).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(token.cancelled_owned())
                    .await
                    .unwrap();
            });
        });
        let port = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Receiver {
            url: format!("http://127.0.0.1:{port}/hook"),
            events,
            stop,
        }
    }

    /// The `room_reminder` batches received for `room` with `reason`.
    fn reminders(&self, room: &str, reason: &str) -> Vec<serde_json::Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                e["event"] == "room_reminder"
                    && e["data"]["room"] == room
                    && e["data"]["reason"] == reason
            })
            .map(|e| e["data"].clone())
            .collect()
    }

    /// Every user named in those batches, sorted, once all `batches` of them arrived.
    fn users_told(&self, room: &str, reason: &str) -> Option<Vec<String>> {
        let got = self.reminders(room, reason);
        let batches = got.first()?["batches"].as_u64()? as usize;
        if got.len() < batches {
            return None;
        }
        assert_eq!(got.len(), batches, "{reason}: each batch once: {got:?}");
        let mut users: Vec<String> = got
            .iter()
            .flat_map(|b| b["users"].as_array().unwrap().iter())
            .map(|u| u.as_str().unwrap().to_string())
            .collect();
        users.sort();
        Some(users)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// PATCH `url` with `body` as the holder of `token`: (status, JSON body).
fn patch_as(token: &str, url: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let resp = ureq::request("PATCH", url)
        .set("Authorization", &format!("Bearer {token}"))
        .timeout(Duration::from_secs(5))
        .send_json(body);
    match resp {
        Ok(r) => (r.status(), r.into_json().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
        Err(e) => panic!("PATCH {url}: {e}"),
    }
}

fn reminder_router(port: u16, backend: Backend, hook: &str, pem: &str) -> Router {
    let hook = hook.to_string();
    start_router_with(
        port,
        backend,
        TokenSigner::from_pkcs8_pem("k1", pem).unwrap(),
        move |c| {
            c.reminder_lead_secs = 3;
            c.webhooks = vec![amphi_protocol::config::WebhookConfig {
                url: hook,
                secret: "hook-secret".into(),
            }];
        },
    )
}

/// Subscribers hear `rescheduled`, then `starting_soon` once at the new start minus the lead
/// (in batches of 500, from a router that restarted in between when the store is shared),
/// then `live` when the first participant arrives; a cancelled room's subscribers hear
/// `cancelled`. The directory shows subscriber counts; refusals are JSON errors.
fn reminders_suite(ports: (u16, u16), backend: Backend) {
    let hooks = Receiver::start();
    let pem = TokenSigner::generate("k1").to_pkcs8_pem();
    let first = reminder_router(ports.0, backend, &hooks.url, &pem);
    let b = first.base.clone();
    let now = unix_now();
    let (status, created) = call(
        "POST",
        &format!("{b}/v1/rooms"),
        Some(serde_json::json!({"title": "Town hall", "scheduled_at": now + 600})),
    );
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap().to_string();
    let users: Vec<String> = (0..501).map(|i| format!("user-{i:03}")).collect();
    for (i, user) in users.iter().enumerate() {
        let (status, v) = call(
            "POST",
            &format!("{b}/v1/rooms/{room}/reminders"),
            Some(serde_json::json!({ "user_id": user })),
        );
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["subscribers"], i as u64 + 1);
    }
    let (status, v) = call(
        "POST",
        &format!("{b}/v1/rooms/{room}/reminders"),
        Some(serde_json::json!({ "user_id": "user-000" })),
    );
    assert_eq!((status, v["subscribers"].as_u64()), (200, Some(501)), "{v}");
    for (body, code) in [
        (serde_json::json!({ "user_id": "two words" }), "bad_field"),
        (serde_json::json!({ "user": "x" }), "bad_json"),
    ] {
        let (status, v) = call(
            "POST",
            &format!("{b}/v1/rooms/{room}/reminders"),
            Some(body),
        );
        assert_eq!((status, v["error"].as_str()), (400, Some(code)), "{v}");
    }
    let (status, v) = call(
        "DELETE",
        &format!("{b}/v1/rooms/{room}/reminders/user-500"),
        None,
    );
    assert_eq!(
        (status, v["was_subscribed"].as_bool()),
        (200, Some(true)),
        "{v}"
    );
    let (status, v) = call(
        "POST",
        &format!("{b}/v1/rooms/{room}/reminders"),
        Some(serde_json::json!({ "user_id": "user-500" })),
    );
    assert_eq!(status, 201, "{v}");
    let (_, listed) = call("GET", &format!("{b}/v1/rooms"), None);
    let shown = listed["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room"] == room.as_str())
        .cloned()
        .unwrap();
    assert_eq!(shown["reminder_subscribers"], 501, "{shown}");
    assert_eq!(shown["status"], "scheduled");

    // The host moves it close: everyone hears of the move at once.
    let start = unix_now() + 6;
    let host = created["host_token"].as_str().unwrap();
    let (status, v) = call(
        "PATCH",
        &format!("{b}/v1/rooms/{room}"),
        Some(serde_json::json!({ "scheduled_at": start })),
    );
    assert_eq!(status, 401, "only its host or an API key: {v}");
    for body in [
        serde_json::json!({ "scheduled_at": 1 }),
        serde_json::json!({ "start": start }),
    ] {
        let (status, v) = patch_as(host, &format!("{b}/v1/rooms/{room}"), body);
        assert_eq!(status, 400, "{v}");
    }
    let (status, moved) = patch_as(
        host,
        &format!("{b}/v1/rooms/{room}"),
        serde_json::json!({ "scheduled_at": start }),
    );
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["scheduled_at"], start, "{moved}");
    assert_eq!(moved["reminder_subscribers"], 501);
    let told = eventually("rescheduled told", || {
        hooks.users_told(&room, "rescheduled")
    });
    assert_eq!(told, users);
    let batch = &hooks.reminders(&room, "rescheduled")[0];
    assert_eq!(batch["previous_scheduled_at"], now + 600);
    assert_eq!(batch["scheduled_at"], start);
    assert_eq!(batch["title"], "Town hall");

    // A shared store survives the router: another one sends what is due next.
    let second;
    let b = match backend {
        Backend::Memory => b,
        Backend::Redis(_) => {
            drop(first);
            second = reminder_router(ports.1, backend, &hooks.url, &pem);
            second.base.clone()
        }
    };
    let told = eventually("starting soon told", || {
        hooks.users_told(&room, "starting_soon")
    });
    assert_eq!(told, users);
    assert!(
        unix_now() + 3 >= start,
        "not before the start minus the lead"
    );
    assert_eq!(
        hooks.reminders(&room, "starting_soon")[1]["scheduled_at"],
        start
    );
    let (status, v) = call(
        "POST",
        &format!("{b}/v1/rooms/{room}/reminders"),
        Some(serde_json::json!({ "user_id": "late" })),
    );
    assert!(status == 201 || status == 409, "{v}");

    // It starts; the first participant arrives on an edge: live.
    eventually("the room is live", || {
        let (_, v) = call("GET", &format!("{b}/v1/rooms/{room}"), None);
        (v["status"] == "live").then_some(())
    });
    let (status, v) = call(
        "POST",
        &format!("{b}/v1/rooms/{room}/reminders"),
        Some(serde_json::json!({ "user_id": "too-late" })),
    );
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("room_not_scheduled")),
        "{v}"
    );
    let (status, v) = patch_as(
        host,
        &format!("{b}/v1/rooms/{room}"),
        serde_json::json!({ "scheduled_at": unix_now() + 60 }),
    );
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("room_not_scheduled")),
        "{v}"
    );
    let room_id: RoomId = room.parse().unwrap();
    heartbeat(&b, &beat("e1", "us-east", vec![(room_id, 1)]));
    let told = eventually("live told", || hooks.users_told(&room, "live"));
    assert!(told.len() >= 501 && users.iter().all(|u| told.contains(u)));
    heartbeat(&b, &beat("e2", "us-east", vec![(room_id, 1)]));
    let (_, v) = call("GET", &format!("{b}/v1/rooms/{room}/reminders"), None);
    assert_eq!(
        v["subscribers"], 0,
        "told they are live, the list is cleared: {v}"
    );

    // Cancelled before its start.
    let (_, other) = call(
        "POST",
        &format!("{b}/v1/rooms"),
        Some(serde_json::json!({"title": "Later", "scheduled_at": unix_now() + 3_600})),
    );
    let other_room = other["room"].as_str().unwrap().to_string();
    for user in ["ann", "bob"] {
        call(
            "POST",
            &format!("{b}/v1/rooms/{other_room}/reminders"),
            Some(serde_json::json!({ "user_id": user })),
        );
    }
    let resp = ureq::post(&format!("{b}/v1/rooms/{other_room}/end"))
        .set(
            "Authorization",
            &format!("Bearer {}", other["host_token"].as_str().unwrap()),
        )
        .call()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let told = eventually("cancelled told", || {
        hooks.users_told(&other_room, "cancelled")
    });
    assert_eq!(told, vec!["ann".to_string(), "bob".to_string()]);

    // Nothing was told twice.
    std::thread::sleep(Duration::from_secs(2));
    for reason in ["rescheduled", "starting_soon", "live"] {
        let batches = hooks.reminders(&room, reason);
        assert_eq!(
            batches.len() as u64,
            batches[0]["batches"].as_u64().unwrap(),
            "{reason}: {batches:?}"
        );
    }
    assert!(hooks.reminders(&room, "cancelled").is_empty());
}

#[test]
fn scheduled_rooms_remind_their_subscribers_in_memory() {
    reminders_suite((27_130, 27_131), Backend::Memory);
}

#[test]
fn scheduled_rooms_remind_their_subscribers_in_redis_across_a_router_restart() {
    redis_db(6);
    reminders_suite((27_132, 27_133), Backend::Redis(6));
}
