//! Ending a room through the geo-router: `POST /v1/rooms/{id}/end` with the host token marks the
//! directory and sends `RoomEnded` over the router's mTLS QUIC link to the room's origin, which
//! ends the HLS playlist; and a `RoomEnded` the origin hears from elsewhere marks the router's
//! directory too.

use amphi_testkit::mesh as support;

use amphi_common::mtls::{DevPki, MeshRole};
use amphi_protocol::config::{OriginConfig, OriginEndpoint, RouterConfig};
use amphi_protocol::control::{ControlDecoder, ControlMessage, PeerKind};
use amphi_protocol::token::TokenSigner;
use amphi_protocol::RoomId;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// POST with an optional bearer token; returns (status, JSON body).
fn post_end(url: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = ureq::post(url).timeout(Duration::from_secs(5));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = match req.send_string("") {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {url}: {e}"),
    };
    let status = resp.status();
    (status, resp.into_json().unwrap_or(serde_json::Value::Null))
}

fn get_json(url: &str) -> (u16, serde_json::Value) {
    let resp = match ureq::get(url).timeout(Duration::from_secs(5)).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let status = resp.status();
    (status, resp.into_json().unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_ends_room_via_router_and_origin_finishes_the_playlist() {
    let mesh = DevMesh::start(10_000, "room-end");
    let (room, host, hls_url) = mesh.create_room("to be ended");
    let speaker = mesh.token(&room, "speaker", "tone");
    let listener = mesh.token(&room, "listener", "ear");
    let route = mesh.route(&room, "us-east");
    let whip = route["whip_url"].as_str().unwrap().to_string();
    publish_tone(&whip, &speaker, 440.0, 3.0).await;
    let media_url = {
        let hls = hls_url.clone();
        tokio::task::spawn_blocking(move || media_playlist_url(&hls))
            .await
            .unwrap()
    };

    let end_url = format!("{}/v1/rooms/{room}/end", mesh.router());
    let (status, body) = post_end(&end_url, None);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = post_end(&end_url, Some(&listener));
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, body) = post_end(&end_url, Some("not.a.token"));
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = post_end(
        &format!("{}/v1/rooms/00000000000000ff/end", mesh.router()),
        Some(&host),
    );
    assert_eq!(status, 403, "a host token of another room: {body}");

    let (status, body) = post_end(&end_url, Some(&host));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ended");
    // Ending twice is harmless.
    let (status, body) = post_end(&end_url, Some(&host));
    assert_eq!((status, body["status"].as_str()), (200, Some("ended")));

    let (status, info) = get_json(&format!("{}/v1/rooms/{room}", mesh.router()));
    assert_eq!((status, info["status"].as_str()), (200, Some("ended")));
    let (status, _) = get_json(&format!("{}/v1/route?room={room}", mesh.router()));
    assert_eq!(status, 404, "no routes into an ended room");

    // The origin got RoomEnded from the router and told the packager: the playlist ends.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = tokio::task::spawn_blocking({
            let u = media_url.clone();
            move || String::from_utf8(get_bytes(&u)).unwrap()
        })
        .await
        .unwrap();
        if text.contains("#EXT-X-ENDLIST") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "playlist never ended:\n{text}\nlog:\n{}",
            mesh.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = mesh.log_text();
    assert!(
        log.contains("room end sent to origin"),
        "router link sent it: {log}"
    );
    assert_eq!(
        metric(&mesh.router(), "amphi_router_origin_links"),
        Some(1.0)
    );
}

/// A QUIC mesh peer (an edge, as far as the origin knows) that ends a room at the origin.
async fn edge_ends_room(pki: &DevPki, origin: SocketAddr, room: RoomId) {
    let tls = pki
        .issue("edge-test.amphi.internal", MeshRole::Edge)
        .unwrap();
    let quic_tls =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config().unwrap()).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic_tls)));
    let conn = endpoint
        .connect(origin, "origin.amphi.internal")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = ControlMessage::Hello {
        peer: PeerKind::Edge,
        id: "edge-test".into(),
        region: "eu-west".into(),
    };
    send.write_all(&hello.to_record()).await.unwrap();
    let mut dec = ControlDecoder::default();
    let mut buf = [0u8; 1024];
    let welcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(m) = dec.next_message().unwrap() {
                return m;
            }
            let n = recv.read(&mut buf).await.unwrap().unwrap();
            dec.feed(&buf[..n]);
        }
    })
    .await
    .unwrap();
    assert!(matches!(welcome, ControlMessage::Welcome { .. }));
    send.write_all(&ControlMessage::RoomEnded { room }.to_record())
        .await
        .unwrap();
    // Give the origin time to read it before closing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_end_reported_by_the_origin_marks_the_directory() {
    let pki = DevPki::generate().unwrap();
    let base = 11_000u16;
    let origin_addr: SocketAddr = format!("127.0.0.1:{}", 8300 + base).parse().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let origin = amphi_origin::OriginSetup {
        config: OriginConfig {
            id: "origin-1".into(),
            quic_listen: origin_addr,
            metrics_listen: format!("127.0.0.1:{}", 8301 + base).parse().unwrap(),
            idle_room_timeout_secs: 3600,
            max_sessions_per_user: 8,
        },
        mesh_tls: pki
            .issue("origin.amphi.internal", MeshRole::Origin)
            .unwrap(),
    };
    let origin_task = tokio::spawn(amphi_origin::run(origin, shutdown.clone()));
    let router_url = format!("http://127.0.0.1:{}", 8080 + base);
    let router = amphi_geo_router::RouterSetup {
        config: RouterConfig {
            http_listen: format!("127.0.0.1:{}", 8080 + base).parse().unwrap(),
            public_url: router_url.clone(),
            default_region: "us-east".into(),
            edges: vec![],
            packager_url: "http://127.0.0.1:9".into(),
            dev_mode: true,
            token_ttl_secs: 600,
            max_token_lifetime_secs: amphi_protocol::token::DEFAULT_MAX_LIFETIME_SECS,
            id: "router-test".into(),
            origins: vec![OriginEndpoint {
                id: "origin-1".into(),
                addr: origin_addr,
                server_name: "origin.amphi.internal".into(),
            }],
            geoip: vec![],
            trusted_proxies: vec![],
            load_threshold: 0.8,
            interactive_capacity: 500,
            room_affine: true,
            relay_fanout: 10,
            push_capacity: 10_000,
            api_keys: vec![],
            webhooks: vec![],
            room_idle_timeout_secs: 21_600,
            reminder_lead_secs: 600,
            redis_url: None,
            hls_base_url: None,
            http1_fast_path: true,
            https: Default::default(),
            limits: Default::default(),
        },
        signer: TokenSigner::generate("k1"),
        web: vec![],
        mesh_tls: Some(
            pki.issue("router-test.amphi.internal", MeshRole::Router)
                .unwrap(),
        ),
    };
    let router_task = tokio::spawn(amphi_geo_router::run(router, shutdown.clone()));

    let room = tokio::task::spawn_blocking({
        let url = router_url.clone();
        move || {
            let deadline = Instant::now() + Duration::from_secs(15);
            while metric(&url, "amphi_router_origin_links") != Some(1.0) {
                assert!(
                    Instant::now() < deadline,
                    "router never linked to the origin"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let v: serde_json::Value = ureq::post(&format!("{url}/v1/rooms"))
                .send_json(serde_json::json!({"title": "ended elsewhere"}))
                .unwrap()
                .into_json()
                .unwrap();
            v["room"].as_str().unwrap().to_string()
        }
    })
    .await
    .unwrap();

    edge_ends_room(&pki, origin_addr, room.parse().unwrap()).await;

    let ended = tokio::task::spawn_blocking({
        let url = format!("{router_url}/v1/rooms/{room}");
        move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (_, v) = get_json(&url);
                if v["status"] == "ended" {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
    .await
    .unwrap();
    assert!(ended, "the router never learned that the room ended");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), origin_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), router_task).await;
}

/// The highest segment number a live media playlist lists (media sequence + segments), and
/// whether it has ended.
fn playlist_head(url: &str) -> (u64, bool) {
    let text = String::from_utf8(get_bytes(url)).unwrap();
    let Ok(m3u8_rs::Playlist::MediaPlaylist(p)) = m3u8_rs::parse_playlist_res(text.as_bytes())
    else {
        panic!("{url} is not a media playlist:\n{text}");
    };
    (
        p.media_sequence + p.segments.len() as u64,
        text.contains("#EXT-X-ENDLIST"),
    )
}

/// A room whose only speaker left keeps a moving live playlist (new segments keep coming,
/// RFC 8216 §6.2.1) instead of freezing, and once idle for the configured timeout it ends the
/// normal way: the playlist gets `EXT-X-ENDLIST` and the directory says `ended`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_room_keeps_a_moving_playlist_then_ends_properly() {
    let mesh = DevMesh::start_with(21_500, "idle-room", &["--idle-room-timeout-secs", "15"]);
    let (room, _host, hls_url) = mesh.create_room("quiet room");
    let speaker = mesh.token(&room, "speaker", "tone");
    let whip = mesh.route(&room, "us-east")["whip_url"]
        .as_str()
        .unwrap()
        .to_string();
    // The speaker talks for 3 s and leaves (WHIP DELETE).
    publish_tone(&whip, &speaker, 440.0, 3.0).await;
    let left = Instant::now();
    let media_url = {
        let hls = hls_url.clone();
        tokio::task::spawn_blocking(move || media_playlist_url(&hls))
            .await
            .unwrap()
    };
    let head = |u: String| async move {
        tokio::task::spawn_blocking(move || playlist_head(&u))
            .await
            .unwrap()
    };
    let (first, ended) = head(media_url.clone()).await;
    assert!(!ended, "the room is still live");
    // Six seconds later, three more 2 s segments exist (give a loaded machine slack: >= 2).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (later, ended) = head(media_url.clone()).await;
    assert!(!ended, "the room is still live");
    assert!(
        later >= first + 2,
        "the playlist froze after the speaker left: segment {first} then {later}\n{}",
        mesh.log_text()
    );
    assert!(
        left.elapsed() < Duration::from_secs(15),
        "checked before the idle timeout"
    );
    // The idle timeout ends the room: ENDLIST and the directory's status.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if head(media_url.clone()).await.1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle room never ended\n{}",
            mesh.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let url = format!("{}/v1/rooms/{room}", mesh.router());
        let (_, info) = tokio::task::spawn_blocking(move || get_json(&url))
            .await
            .unwrap();
        if info["status"] == "ended" {
            break;
        }
        assert!(Instant::now() < deadline, "directory still says {info}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(mesh
        .log_text()
        .contains("room ended after its idle timeout"));
}
