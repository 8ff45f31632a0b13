//! Bad input against a real dev mesh: WHIP auth and validation errors answer with clear JSON errors,
//! and garbage at the WebRTC UDP port is dropped and counted without disturbing the edge.

use amphi_testkit::mesh as support;

use std::net::UdpSocket;
use support::*;

/// A syntactically valid browser-style offer that carries only PCMU audio.
const PCMU_ONLY_OFFER: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0\r\n\
a=msid-semantic: WMS\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n\
c=IN IP4 0.0.0.0\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:abcd\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=ice-options:trickle\r\n\
a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=sendonly\r\n\
a=rtcp-mux\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=ssrc:1001 cname:test\r\n";

/// POST a WHIP offer; returns (status, content type, body).
fn whip_post(url: &str, token: Option<&str>, body: &str) -> (u16, String, String) {
    let mut req = ureq::post(url).set("Content-Type", "application/sdp");
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = match req.send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {url}: {e}"),
    };
    let status = resp.status();
    let ct = resp.content_type().to_string();
    (status, ct, resp.into_string().unwrap_or_default())
}

fn assert_json_error(status: u16, ct: &str, body: &str, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "body: {body}");
    assert_eq!(ct, "application/json", "error bodies are JSON: {body}");
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON error body");
    assert_eq!(v["error"], want_code, "{body}");
    assert!(!v["message"].as_str().unwrap_or("").is_empty(), "{body}");
}

#[test]
fn whip_rejects_bad_tokens_rooms_and_offers_with_json_errors() {
    let scratch = scratch_dir("bad-input-keys");
    let key = scratch.join("signing.pem");
    let other_key = scratch.join("other.pem");
    amphi(&["token", "keygen", "--out", key.to_str().unwrap()]);
    amphi(&["token", "keygen", "--out", other_key.to_str().unwrap()]);
    let mesh = DevMesh::start_with(
        12_000,
        "bad-input",
        &["--signing-key", key.to_str().unwrap()],
    );
    let (room, _host, _) = mesh.create_room("bad input");
    let whip = format!("{}/whip/{room}", mesh.edge(0));
    let mint = |key: &std::path::Path, room: &str, role: &str, ttl: &str| {
        amphi(&[
            "token",
            "mint",
            "--key",
            key.to_str().unwrap(),
            "--kid",
            "dev-1",
            "--room",
            room,
            "--role",
            role,
            "--name",
            "t",
            "--ttl",
            ttl,
        ])
        .trim()
        .to_string()
    };
    let speaker = mesh.token(&room, "speaker", "s");

    let (s, ct, b) = whip_post(&whip, None, PCMU_ONLY_OFFER);
    assert_json_error(s, &ct, &b, 401, "unauthorized");
    let forged = mint(&other_key, &room, "speaker", "600");
    let (s, ct, b) = whip_post(&whip, Some(&forged), PCMU_ONLY_OFFER);
    assert_json_error(s, &ct, &b, 401, "unauthorized");
    let expired = mint(&key, &room, "speaker", "0");
    let (s, ct, b) = whip_post(&whip, Some(&expired), PCMU_ONLY_OFFER);
    assert_json_error(s, &ct, &b, 401, "unauthorized");
    let (s, ct, b) = whip_post(&whip, Some("not-a-jwt"), PCMU_ONLY_OFFER);
    assert_json_error(s, &ct, &b, 401, "unauthorized");

    // A valid token for a room the router never created.
    let ghost = "00000000deadbeef";
    let ghost_token = mint(&key, ghost, "speaker", "600");
    let (s, ct, b) = whip_post(
        &format!("{}/whip/{ghost}", mesh.edge(0)),
        Some(&ghost_token),
        PCMU_ONLY_OFFER,
    );
    assert_json_error(s, &ct, &b, 404, "room_not_found");
    let (s, ct, b) = whip_post(
        &format!("{}/whip/not-a-room", mesh.edge(0)),
        Some(&speaker),
        "",
    );
    assert_json_error(s, &ct, &b, 404, "room_not_found");

    // A token for another room, and a listener trying to publish.
    let (other_room, _, _) = mesh.create_room("other");
    let other_room_token = mesh.token(&other_room, "speaker", "x");
    let (s, ct, b) = whip_post(&whip, Some(&other_room_token), PCMU_ONLY_OFFER);
    assert_json_error(s, &ct, &b, 403, "forbidden");
    let listener = mesh.token(&room, "listener", "l");
    let (s, ct, b) = whip_post(&whip, Some(&listener), PCMU_ONLY_OFFER);
    assert_json_error(s, &ct, &b, 403, "forbidden");

    // Bad offers.
    let (s, ct, b) = whip_post(&whip, Some(&speaker), "this is not SDP \u{1}\u{2}");
    assert_json_error(s, &ct, &b, 400, "bad_sdp");
    let (s, ct, b) = whip_post(&whip, Some(&speaker), PCMU_ONLY_OFFER);
    assert_json_error(s, &ct, &b, 406, "unsupported_codec");
    assert!(
        b.to_lowercase().contains("opus"),
        "the message names Opus: {b}"
    );

    // CORS preflight from the web client's origin.
    let resp = ureq::request("OPTIONS", &whip)
        .set("Origin", &mesh.router())
        .set("Access-Control-Request-Method", "POST")
        .set(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .call()
        .expect("preflight answered");
    assert!(resp.status() == 200 || resp.status() == 204);
    assert!(resp.header("Access-Control-Allow-Origin").is_some());
    let methods = resp
        .header("Access-Control-Allow-Methods")
        .unwrap_or("")
        .to_uppercase();
    assert!(methods.contains("POST"), "{methods}");

    // The geo-router's own API errors are JSON too.
    let resp = ureq::post(&format!("{}/v1/rooms", mesh.router()))
        .set("Content-Type", "application/json")
        .send_string("{not json");
    let Err(ureq::Error::Status(400, r)) = resp else {
        panic!("bad JSON must be 400")
    };
    assert_eq!(r.content_type(), "application/json");
    assert_eq!(
        get_status(&format!("{}/v1/rooms/00000000deadbeef", mesh.router())),
        404
    );
}

#[test]
fn garbage_at_the_media_port_is_dropped_and_counted() {
    let mesh = DevMesh::start(13_000, "udp-garbage");
    let before = metric(&mesh.edge(0), "amphi_edge_udp_dropped_total").unwrap_or(0.0);
    let read_before = metric(&mesh.edge(0), "amphi_edge_udp_datagrams_total").unwrap_or(0.0);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = mesh.edge_media(0);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..300usize {
        let len = 1 + (i * 37) % 1400;
        let mut buf = vec![0u8; len];
        for b in buf.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        // Some look like STUN (first two bits zero, magic cookie) but are truncated.
        if i % 10 == 0 && len >= 8 {
            buf[0] = 0x00;
            buf[1] = 0x01;
            buf[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        }
        sock.send_to(&buf, &target).unwrap();
        // Paced, so the kernel's socket buffer never overflows and every datagram reaches the edge.
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut after = before;
    while std::time::Instant::now() < deadline {
        after = metric(&mesh.edge(0), "amphi_edge_udp_dropped_total").unwrap_or(0.0);
        if after - before >= 300.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let read = metric(&mesh.edge(0), "amphi_edge_udp_datagrams_total").unwrap_or(0.0) - read_before;
    assert_eq!(after - before, read, "every datagram read was dropped");
    assert!(
        after - before >= 300.0,
        "dropped counter moved by {}",
        after - before
    );
    assert_eq!(get_status(&format!("{}/healthz", mesh.edge(0))), 200);
    assert!(!mesh.log_text().contains("panicked"), "{}", mesh.log_text());
}
