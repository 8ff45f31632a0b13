//! Redis outage (issue 11, fault 6): a geo-router, an origin (room state in Redis) and two edges,
//! each its own process, with a Redis of the test's own (append-only file on disk) that is
//! killed for a while and restarted on the same port and directory. Before and during the outage
//! the host kicks (bans) and promotes; a room is created during the outage and works (joins,
//! commands). After Redis is back, the origin is restarted so that every room must come from
//! Redis: no ban or role is lost or overwritten, and the room created during the outage is in
//! the shared directory (a restarted router knows it). What each API call answered during the
//! outage is printed as `FIGURE` lines.
//!
//! `AMPHI_REDIS_OUTAGE_SECS` (default 10) sets the outage length (30 for the figure).

mod roles;
use amphi_testkit::mesh as support;

use amphi_protocol::room::{RoomEvent, RoomRole, RoomState, ServerMessage};
use amphi_protocol::ParticipantId;
use roles::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A redis-server of this test (so that it can be killed and restarted), killed on drop.
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl OwnRedis {
    fn start(dir: PathBuf) -> OwnRedis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut r = OwnRedis {
            child: None,
            port,
            dir,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("redis-cli")
                .args(["-p", &self.port.to_string(), "PING"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"));
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn snapshot(m: ServerMessage) -> (ParticipantId, RoomState) {
    match m {
        ServerMessage::Snapshot { you, state, .. } => (you, state),
        other => panic!("not a snapshot: {other:?}"),
    }
}

fn edge_connected(edge: &str) -> bool {
    support::metric(edge, "amphi_edge_origin_connected").unwrap_or(0.0) >= 1.0
}

async fn wait_mesh(router: &str, edges: &[String]) {
    let (router, edges) = (router.to_string(), edges.to_vec());
    tokio::task::spawn_blocking(move || {
        eventually("mesh up", Duration::from_secs(40), || {
            (support::get_status(&format!("{router}/healthz")) == 200
                && edges.iter().all(|e| edge_connected(e)))
            .then_some(())
        })
    })
    .await
    .unwrap();
}

/// Join, retrying while the edge answers `unavailable` (its origin link coming back).
async fn join_eventually(edge: &str, token: &str) -> Result<(Ws, ServerMessage), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Ws::join(edge, token).await {
            Err(e) if e == "unavailable" && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

fn role_of(s: &RoomState, id: ParticipantId) -> RoomRole {
    s.participants
        .iter()
        .find(|p| p.id == id)
        .map(|p| p.role)
        .unwrap_or_else(|| panic!("{id} missing from {s:?}"))
}

/// Accepts the event of `id` joining (another edge's participant reaches this one's replica
/// through it).
fn joined(id: ParticipantId) -> impl FnMut(&ServerMessage) -> Option<()> {
    move |m| {
        matches!(m, ServerMessage::Event(RoomEvent::ParticipantJoined { participant }) if participant.id == id)
            .then_some(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_and_roles_survive_a_redis_outage_and_rooms_start_during_it() {
    let outage = Duration::from_secs(
        std::env::var("AMPHI_REDIS_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    let dir = std::env::temp_dir().join(format!("amphi-redis-outage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut redis = OwnRedis::start(dir.join("redis"));
    let url = redis.url();
    let mesh = RoleMesh::new("redis-outage", 27_800);
    let mut origin = mesh.origin(Some(&url));
    let mut router_proc = mesh.router_process(Some(&url), "");
    let _us = mesh.edge_process(0, "us-east", "");
    let _eu = mesh.edge_process(1, "eu-west", "");
    let (router, us, eu) = (mesh.router(), mesh.edge(0), mesh.edge(1));
    wait_mesh(&router, &[us.clone(), eu.clone()]).await;

    // Before the outage: the host bans the troll and promotes carol.
    let CreatedRoom { room, host_token } = create_room(&router, "before");
    let token = |role: &str, name: &str| mint_token(&router, &room, role, name);
    let (carol_t, troll_t, dave_t, spam_t) = (
        token("listener", "carol"),
        token("listener", "troll"),
        token("listener", "dave"),
        token("listener", "spammer"),
    );
    let (mut host, snap) = Ws::join(&us, &host_token).await.expect("host joins");
    let (host_id, _) = snapshot(snap);
    let (_carol, snap) = Ws::join(&eu, &carol_t).await.expect("carol joins");
    let (carol_id, _) = snapshot(snap);
    let (_troll, snap) = Ws::join(&eu, &troll_t).await.expect("troll joins");
    let (troll_id, _) = snapshot(snap);
    let (_dave, snap) = Ws::join(&eu, &dave_t).await.expect("dave joins");
    let (dave_id, _) = snapshot(snap);
    // The host's edge checks targets against its replica: it must have heard the joins.
    host.until(joined(dave_id)).await;
    host.send(serde_json::json!({"type": "kick", "target": troll_id.0}))
        .await;
    host.until(|m| {
        matches!(m, ServerMessage::Event(RoomEvent::ParticipantLeft { id }) if *id == troll_id)
            .then_some(())
    })
    .await;
    host.send(serde_json::json!({"type": "promote", "target": carol_id.0}))
        .await;
    host.until(|m| {
        matches!(m, ServerMessage::Event(RoomEvent::RoleChanged { id, .. }) if *id == carol_id)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The outage.
    redis.kill();
    let began = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    let mut record = |what: &str, status: u16| {
        seen.push(format!("{what}={status}"));
        status
    };
    // Moderation goes on in the live room: the spammer is banned, dave promoted.
    let (_spam, snap) = Ws::join(&eu, &spam_t)
        .await
        .expect("a token minted before the outage still joins");
    let (spam_id, _) = snapshot(snap);
    host.until(joined(spam_id)).await;
    host.send(serde_json::json!({"type": "kick", "target": spam_id.0}))
        .await;
    host.until(|m| {
        matches!(m, ServerMessage::Event(RoomEvent::ParticipantLeft { id }) if *id == spam_id)
            .then_some(())
    })
    .await;
    host.send(serde_json::json!({"type": "promote", "target": dave_id.0}))
        .await;
    host.until(|m| {
        matches!(m, ServerMessage::Event(RoomEvent::RoleChanged { id, .. }) if *id == dave_id)
            .then_some(())
    })
    .await;
    // The banned troll is still refused.
    assert_eq!(
        Ws::join(&eu, &troll_t).await.err().as_deref(),
        Some("banned")
    );
    // API calls answer.
    let (r1, _) = call("GET", &format!("{router}/v1/rooms/{room}"), None);
    record("get_room_known", r1);
    let (r2, _) = call(
        "POST",
        &format!("{router}/v1/rooms/{room}/tokens"),
        Some(serde_json::json!({"role": "listener", "name": "erin"})),
    );
    record("mint_token_known_room", r2);
    let (r3, _) = call("GET", &format!("{router}/v1/route?room={room}"), None);
    record("route", r3);
    let (r4, _) = call("GET", &format!("{router}/v1/rooms"), None);
    record("list_rooms", r4);
    for (what, status) in [("room", r1), ("token", r2), ("route", r3), ("list", r4)] {
        assert_eq!(status, 200, "{what} during the outage");
    }
    // A room starts during the outage and works.
    let (st, created) = call(
        "POST",
        &format!("{router}/v1/rooms"),
        Some(serde_json::json!({"title": "during"})),
    );
    assert_eq!(record("create_room", st), 201, "{created}");
    let room2 = created["room"].as_str().unwrap().to_string();
    let host2_t = created["host_token"].as_str().unwrap().to_string();
    let (mut host2, snap) = Ws::join(&us, &host2_t)
        .await
        .expect("the host joins the new room");
    let (host2_id, _) = snapshot(snap);
    let (st, v) = call(
        "POST",
        &format!("{router}/v1/rooms/{room2}/tokens"),
        Some(serde_json::json!({"role": "listener", "name": "zed"})),
    );
    assert_eq!(record("mint_token_new_room", st), 200, "{v}");
    let zed_t = v["token"].as_str().unwrap().to_string();
    let (_zed, snap) = Ws::join(&eu, &zed_t).await.expect("zed joins the new room");
    let (zed_id, _) = snapshot(snap);
    host2.until(joined(zed_id)).await;
    host2
        .send(serde_json::json!({"type": "kick", "target": zed_id.0}))
        .await;
    host2
        .until(|m| {
            matches!(m, ServerMessage::Event(RoomEvent::ParticipantLeft { id }) if *id == zed_id)
                .then_some(())
        })
        .await;
    let elapsed = began.elapsed();
    if elapsed < outage {
        tokio::time::sleep(outage - elapsed).await;
    }
    println!(
        "FIGURE redis-outage outage_s={} {}",
        began.elapsed().as_secs(),
        seen.join(" ")
    );

    // Redis is back (same port, same append-only file). Give the writers a moment.
    redis.spawn();
    tokio::time::sleep(Duration::from_secs(6)).await;

    // Every room now comes from Redis: restart the origin and the router.
    origin.signal("KILL");
    origin
        .wait_exit(Duration::from_secs(5))
        .expect("origin died");
    router_proc.signal("KILL");
    router_proc
        .wait_exit(Duration::from_secs(5))
        .expect("router died");
    let _origin2 = mesh.origin(Some(&url));
    let _router2 = mesh.router_process(Some(&url), "");
    wait_mesh(&router, &[us.clone(), eu.clone()]).await;
    mesh.wait_edges_on_origin("edges reconnect to the restarted origin")
        .await;

    // The room created during the outage is in the shared directory.
    let (st, v) = call("GET", &format!("{router}/v1/rooms/{room2}"), None);
    assert_eq!(st, 200, "room created during the outage: {v}");
    // Bans and roles of both rooms are intact.
    let (_, after) = snapshot(
        join_eventually(&eu, &mint_token(&router, &room, "listener", "erin"))
            .await
            .map(|(_, s)| s)
            .expect("erin joins after the outage"),
    );
    assert_eq!(after.banned.len(), 2, "banned before and during: {after:?}");
    assert_eq!(role_of(&after, host_id), RoomRole::Host);
    assert_eq!(
        role_of(&after, carol_id),
        RoomRole::Speaker,
        "promoted before"
    );
    assert_eq!(
        role_of(&after, dave_id),
        RoomRole::Speaker,
        "promoted during"
    );
    for t in [&troll_t, &spam_t] {
        assert_eq!(Ws::join(&eu, t).await.err().as_deref(), Some("banned"));
    }
    let (_, after2) = snapshot(
        join_eventually(&eu, &mint_token(&router, &room2, "listener", "yan"))
            .await
            .map(|(_, s)| s)
            .expect("a listener joins the room created during the outage"),
    );
    assert_eq!(after2.banned.len(), 1, "{after2:?}");
    assert_eq!(role_of(&after2, host2_id), RoomRole::Host);
    assert_eq!(Ws::join(&eu, &zed_t).await.err().as_deref(), Some("banned"));
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}
