//! End-to-end tests of the edge: real str0m WHIP publisher, real QUIC origin stand-in, fake
//! geo-router, all on 127.0.0.1.

mod common;

use amphi_common::mtls::DevPki;
use amphi_protocol::api::ApiError;
use amphi_protocol::control::ControlMessage;
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::token::{Claims, Role, TokenSigner};
use amphi_protocol::ParticipantId;
use amphi_testkit::whip_client::{ClientError, WhipPublisher};
use common::*;
use std::time::Duration;

const PACKETS: usize = 50;
const LEVEL: u8 = 30;

/// Publish `PACKETS` Opus packets, 20 ms apart, starting at `ts0`.
async fn publish(publisher: &mut WhipPublisher, packets: &[Vec<u8>], ts0: u32) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for (i, p) in packets.iter().enumerate() {
        tick.tick().await;
        publisher
            .send_opus(p, ts0.wrapping_add(960 * i as u32), LEVEL)
            .await
            .expect("send_opus");
    }
}

/// Drain relay datagrams until `want` arrived or `timeout` passed.
async fn collect_frames(origin: &mut FakeOrigin, want: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < want {
        match tokio::time::timeout_at(deadline, origin.datagrams.recv()).await {
            Ok(Some(d)) => out.push(d.to_vec()),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

fn check_frames(frames: &[Vec<u8>], speaker: ParticipantId) {
    assert!(
        frames.len() >= 40,
        "only {} relay frames arrived",
        frames.len()
    );
    let all: Vec<RelayFrame> = frames
        .iter()
        .map(|f| RelayFrame::decode(f).expect("valid relay frame"))
        .collect();
    // Relay protection: every packet is sent again (kind SpeakerRepeat) with the next one.
    let (repeats, decoded): (Vec<RelayFrame>, Vec<RelayFrame>) = all
        .into_iter()
        .partition(|f| f.kind == FrameKind::SpeakerRepeat);
    assert!(
        repeats.len() + 2 >= decoded.len() && !repeats.is_empty(),
        "{} repeats for {} packets",
        repeats.len(),
        decoded.len()
    );
    let first = decoded.first().map_or(0, |f| f.seq);
    for r in &repeats {
        let original = RelayFrame {
            kind: FrameKind::SpeakerAudio,
            ..*r
        };
        // The first repeat may be of a packet sent before collecting began (or reconnecting).
        let before_first = (first.wrapping_sub(r.seq) as i16) > 0;
        assert!(
            decoded.contains(&original) || before_first,
            "a repeat of a packet never sent: seq {}",
            r.seq
        );
    }
    for f in &decoded {
        assert_eq!(f.kind, FrameKind::SpeakerAudio);
        assert_eq!(f.room, LIVE_ROOM);
        assert_eq!(f.speaker, speaker.0);
        assert_eq!(f.audio_level, LEVEL);
        assert!(!f.payload.is_empty());
    }
    for w in decoded.windows(2) {
        let dseq = w[1].seq.wrapping_sub(w[0].seq);
        assert!(
            (1..100).contains(&dseq),
            "seq must increase: {} -> {}",
            w[0].seq,
            w[1].seq
        );
        assert_eq!(
            w[1].rtp_ts.wrapping_sub(w[0].rtp_ts),
            960 * dseq as u32,
            "rtp_ts steps of 960 per packet"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_audio_reaches_the_origin_and_garbage_is_dropped() {
    let pki = DevPki::generate().unwrap();
    let mut origin = start_origin(&pki, "127.0.0.1:0".parse().unwrap());
    let router = start_router().await;
    let edge = start_edge(&pki, origin.addr, router).await;

    let hello = expect_control(&mut origin, Duration::from_secs(10), |m| {
        matches!(m, ControlMessage::Hello { .. })
    })
    .await;
    assert_eq!(
        hello,
        ControlMessage::Hello {
            peer: amphi_protocol::control::PeerKind::Edge,
            id: "edge-test-1".into(),
            region: "us-east".into()
        }
    );

    // Garbage at the media port first: random bytes, truncated STUN, STUN for nobody.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let stun = stun_binding_request("nobody:x");
    for i in 0..20u8 {
        let junk: Vec<u8> = (0..(37 + i as usize)).map(|_| rand::random()).collect();
        udp.send_to(&junk, edge.media).unwrap();
    }
    udp.send_to(&stun[..stun.len() - 7], edge.media).unwrap();
    udp.send_to(&stun[..10], edge.media).unwrap();
    udp.send_to(&stun, edge.media).unwrap();
    let mut counted = false;
    for _ in 0..100 {
        let not_stun = metric(&edge, "amphi_edge_udp_dropped_total{reason=\"not_stun\"}").await;
        let unknown = metric(
            &edge,
            "amphi_edge_udp_dropped_total{reason=\"unknown_peer\"}",
        )
        .await;
        if not_stun >= 22 && unknown >= 1 {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(counted, "garbage datagrams were not counted as dropped");
    assert!(metric(&edge, "amphi_edge_udp_datagrams_total").await >= 23);

    // The edge keeps working: a real publisher connects and its audio is relayed.
    let token = edge.token(LIVE_ROOM, Role::Speaker, "ada");
    let mut publisher = WhipPublisher::connect(&edge.whip_url(LIVE_ROOM), &token)
        .await
        .expect("whip publish connects");
    assert!(publisher
        .resource_url()
        .path()
        .starts_with(&format!("/whip/{LIVE_ROOM}/")));
    assert!(publisher.etag().is_some());
    let sub = expect_control(&mut origin, Duration::from_secs(5), |m| {
        matches!(m, ControlMessage::SubscribeRoom { .. })
    })
    .await;
    assert_eq!(sub, ControlMessage::SubscribeRoom { room: LIVE_ROOM });
    let joined = expect_control(&mut origin, Duration::from_secs(5), |m| {
        matches!(m, ControlMessage::SpeakerJoined { .. })
    })
    .await;
    let ControlMessage::SpeakerJoined {
        room,
        speaker,
        name,
        region,
    } = joined
    else {
        unreachable!()
    };
    assert_eq!(room, LIVE_ROOM);
    assert_eq!(name, "ada");
    assert_eq!(region, "us-east");
    assert_eq!(speaker.0 >> 20, 1, "participant id carries the edge index");
    assert_eq!(metric(&edge, "amphi_edge_peers").await, 1);
    assert_eq!(metric(&edge, "amphi_edge_origin_connected").await, 1);

    let packets = opus_packets(PACKETS);
    publish(&mut publisher, &packets, 0xffff_f000).await;
    let frames = collect_frames(&mut origin, 2 * PACKETS - 1, Duration::from_secs(5)).await;
    check_frames(&frames, speaker);
    assert!(metric(&edge, "amphi_edge_rtp_packets_in_total").await >= 40);
    assert!(metric(&edge, "amphi_edge_relay_frames_sent_total").await >= 40);

    publisher.close().await.expect("DELETE answers 200");
    let left = expect_control(&mut origin, Duration::from_secs(5), |m| {
        matches!(m, ControlMessage::SpeakerLeft { .. })
    })
    .await;
    assert_eq!(
        left,
        ControlMessage::SpeakerLeft {
            room: LIVE_ROOM,
            speaker
        }
    );
    assert_eq!(metric(&edge, "amphi_edge_peers").await, 0);
    edge.stop().await;
}

fn api_error(body: &str) -> ApiError {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an ApiError ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_error_paths() {
    let pki = DevPki::generate().unwrap();
    let origin = start_origin(&pki, "127.0.0.1:0".parse().unwrap());
    let router = start_router().await;
    let edge = start_edge(&pki, origin.addr, router).await;
    wait_for_origin_link(&edge).await;
    let url = edge.whip_url(LIVE_ROOM);
    let offer = valid_offer().await;
    let speaker = edge.token(LIVE_ROOM, Role::Speaker, "sam");
    let auth = format!("Bearer {speaker}");
    let sdp = ("content-type", "application/sdp");

    let check = |status: u16, code: &str, got: &(u16, http::HeaderMap, String)| {
        assert_eq!(got.0, status, "body: {}", got.2);
        assert_eq!(got.1["content-type"], "application/json");
        assert_eq!(got.1["access-control-allow-origin"], "*");
        assert_eq!(api_error(&got.2).error, code);
    };

    // Room id not parseable.
    let r = request(
        &format!("{}/whip/nothex", edge.base()),
        "POST",
        &[sdp, ("authorization", &auth)],
        &offer,
    )
    .await
    .unwrap();
    check(404, "room_not_found", &r);
    // No token.
    let r = request(&url, "POST", &[sdp], &offer).await.unwrap();
    check(401, "unauthorized", &r);
    assert_eq!(r.1["www-authenticate"], "Bearer");
    // Forged: signed by another key with the same kid.
    let forger = TokenSigner::generate("k1");
    let now = now_unix();
    let claims = Claims {
        sub: "mallory".into(),
        name: "mallory".into(),
        room: LIVE_ROOM,
        role: Role::Host,
        iat: now,
        exp: now + 600,
        jti: "forged".into(),
    };
    let forged = format!("Bearer {}", forger.sign(&claims));
    let r = request(&url, "POST", &[sdp, ("authorization", &forged)], &offer)
        .await
        .unwrap();
    check(401, "unauthorized", &r);
    // Expired.
    let expired = format!(
        "Bearer {}",
        edge.signer.sign(&Claims {
            iat: now - 7200,
            exp: now - 3600,
            ..claims.clone()
        })
    );
    let r = request(&url, "POST", &[sdp, ("authorization", &expired)], &offer)
        .await
        .unwrap();
    check(401, "unauthorized", &r);
    // Token for another room.
    let other = format!("Bearer {}", edge.token(UNKNOWN_ROOM, Role::Speaker, "o"));
    let r = request(&url, "POST", &[sdp, ("authorization", &other)], &offer)
        .await
        .unwrap();
    check(403, "forbidden", &r);
    // Listener may not publish.
    let listener = edge.token(LIVE_ROOM, Role::Listener, "lee");
    let r = request(
        &url,
        "POST",
        &[sdp, ("authorization", &format!("Bearer {listener}"))],
        &offer,
    )
    .await
    .unwrap();
    check(403, "forbidden", &r);
    // The client surfaces the status and body.
    match WhipPublisher::connect(&url, &listener).await {
        Err(ClientError::Status { status, body }) => {
            assert_eq!(status, 403);
            assert_eq!(api_error(&body).error, "forbidden");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a listener must not publish"),
    }
    // Unknown and ended rooms.
    for room in [UNKNOWN_ROOM, ENDED_ROOM] {
        let tok = format!("Bearer {}", edge.token(room, Role::Host, "h"));
        let r = request(
            &edge.whip_url(room),
            "POST",
            &[sdp, ("authorization", &tok)],
            &offer,
        )
        .await
        .unwrap();
        check(404, "room_not_found", &r);
    }
    // Garbage body.
    let r = request(
        &url,
        "POST",
        &[sdp, ("authorization", &auth)],
        "this is not SDP",
    )
    .await
    .unwrap();
    check(400, "bad_sdp", &r);
    // PCMU-only offer.
    let pcmu = pcmu_only(&offer);
    let r = request(&url, "POST", &[sdp, ("authorization", &auth)], &pcmu)
        .await
        .unwrap();
    check(406, "unsupported_codec", &r);
    assert!(api_error(&r.2).message.contains("Opus"));
    // Too large.
    let huge = "a".repeat(64 * 1024 + 1);
    let r = request(&url, "POST", &[sdp, ("authorization", &auth)], &huge)
        .await
        .unwrap();
    check(413, "payload_too_large", &r);
    // DELETE and PATCH of an unknown session.
    let session_url = format!("{url}/0123456789abcdef0123456789abcdef");
    let r = request(&session_url, "DELETE", &[("authorization", &auth)], "")
        .await
        .unwrap();
    check(404, "not_found", &r);
    let r = request(&session_url, "DELETE", &[], "").await.unwrap();
    check(401, "unauthorized", &r);
    let r = request(
        &session_url,
        "PATCH",
        &[
            ("authorization", &auth),
            ("content-type", "application/trickle-ice-sdpfrag"),
        ],
        "a=end-of-candidates\r\n",
    )
    .await
    .unwrap();
    check(404, "not_found", &r);

    // CORS preflight on both routes (RFC 9725 §4.2: 200, the methods of each resource).
    for (u, methods) in [
        (&url, "POST, OPTIONS"),
        (&session_url, "PATCH, DELETE, OPTIONS"),
    ] {
        let r = request(
            u,
            "OPTIONS",
            &[
                ("origin", "http://127.0.0.1:8080"),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
            ],
            "",
        )
        .await
        .unwrap();
        assert_eq!(r.0, 200, "preflight status");
        let h = &r.1;
        assert_eq!(h["access-control-allow-origin"], "*");
        assert_eq!(h["access-control-allow-methods"], methods);
        assert_eq!(
            h["access-control-allow-headers"],
            "Authorization, Content-Type, If-Match"
        );
        assert_eq!(
            h["access-control-expose-headers"],
            "Location, ETag, Link, Accept-Post, Accept-Patch"
        );
        assert!(!h.contains_key("link"), "no ICE servers are configured");
    }
    // A plain OPTIONS (not a preflight) on the WHIP and WHEP endpoints and a session.
    let whep_url = format!("{}/whep/{LIVE_ROOM}", edge.base());
    for u in [&url, &whep_url] {
        let r = request(u, "OPTIONS", &[], "").await.unwrap();
        assert_eq!(r.0, 200, "{u}");
        assert_eq!(r.1["accept-post"], "application/sdp");
        assert_eq!(r.1["allow"], "POST, OPTIONS");
        assert!(!r.1.contains_key("link"), "no ICE servers are configured");
        assert!(r.2.is_empty());
    }
    let r = request(&session_url, "OPTIONS", &[], "").await.unwrap();
    assert_eq!(r.0, 200);
    assert_eq!(r.1["allow"], "PATCH, DELETE, OPTIONS");
    assert_eq!(r.1["accept-patch"], "application/trickle-ice-sdpfrag");
    // Other methods are reserved (RFC 9725 §4.2): 405.
    let r = request(&url, "GET", &[], "").await.unwrap();
    assert_eq!(r.0, 405);

    // A successful POST carries the WHIP headers; DELETE needs the same token.
    let r = request(&url, "POST", &[sdp, ("authorization", &auth)], &offer)
        .await
        .unwrap();
    assert_eq!(r.0, 201, "{}", r.2);
    assert_eq!(r.1["content-type"], "application/sdp");
    assert_eq!(
        r.1["access-control-expose-headers"],
        "Location, ETag, Link, Accept-Post, Accept-Patch"
    );
    assert!(r.1.contains_key("etag"));
    assert!(r.2.starts_with("v=0"));
    assert!(r.2.contains("a=ice-lite"), "{}", r.2);
    assert!(r.2.contains("opus/48000/2"), "{}", r.2);
    assert!(
        r.2.contains(&format!("{} typ host", edge.media.port())),
        "{}",
        r.2
    );
    let location = r.1["location"].to_str().unwrap().to_string();
    let session = location.rsplit('/').next().unwrap();
    assert_eq!(location, format!("/whip/{LIVE_ROOM}/{session}"));
    assert_eq!(session.len(), 32);
    let resource = format!("{}{location}", edge.base());
    let other_speaker = format!("Bearer {}", edge.token(LIVE_ROOM, Role::Speaker, "eve"));
    let r = request(
        &resource,
        "DELETE",
        &[("authorization", &other_speaker)],
        "",
    )
    .await
    .unwrap();
    check(403, "forbidden", &r);
    let r = request(&resource, "DELETE", &[("authorization", &auth)], "")
        .await
        .unwrap();
    assert_eq!(r.0, 200);
    let r = request(&resource, "DELETE", &[("authorization", &auth)], "")
        .await
        .unwrap();
    check(404, "not_found", &r);

    let r = request(&format!("{}/healthz", edge.base()), "GET", &[], "")
        .await
        .unwrap();
    assert_eq!(r.0, 200);
    edge.stop().await;
}

/// RFC 9725 §4.4 on a live WHIP session: trickled candidates (204, or 412 with a stale ETag), an
/// ICE restart (200, a fragment with the edge's new credentials and candidate, a new ETag, STUN
/// routed by the new ufrag only), and bad fragments refused without touching the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_patch_trickles_and_restarts_ice() {
    let pki = DevPki::generate().unwrap();
    let origin = start_origin(&pki, "127.0.0.1:0".parse().unwrap());
    let router = start_router().await;
    let edge = start_edge(&pki, origin.addr, router).await;
    wait_for_origin_link(&edge).await;
    let url = edge.whip_url(LIVE_ROOM);
    let auth = format!("Bearer {}", edge.token(LIVE_ROOM, Role::Speaker, "sam"));
    // A sendrecv offer (as some WHIP clients send): the answer is recvonly, rtcp-mux-only.
    let offer = valid_offer().await.replace("a=sendonly", "a=sendrecv");
    let r = request(
        &url,
        "POST",
        &[
            ("content-type", "application/sdp"),
            ("authorization", &auth),
        ],
        &offer,
    )
    .await
    .unwrap();
    assert_eq!(r.0, 201, "{}", r.2);
    assert!(r.2.contains("a=recvonly\r\n"), "{}", r.2);
    assert!(!r.2.contains("a=sendrecv"), "{}", r.2);
    assert!(r.2.contains("a=rtcp-mux-only\r\n"), "{}", r.2);
    assert!(!r.1.contains_key("link"), "no ICE servers are configured");
    let session_url = format!("{}{}", edge.base(), r.1["location"].to_str().unwrap());
    let etag = r.1["etag"].to_str().unwrap().to_string();
    let old_ufrag = etag.trim_matches('"').to_string();
    let frag = ("content-type", "application/trickle-ice-sdpfrag");
    let patch = |headers: Vec<(&'static str, String)>, body: String| {
        let url = session_url.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(&url, "PATCH", &h, &body).await.unwrap()
        }
    };
    let trickle =
        "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\na=end-of-candidates\r\n";

    // Trickle with the current ETag: accepted; with a stale one: 412.
    let r = patch(
        vec![
            ("authorization", auth.clone()),
            (frag.0, frag.1.into()),
            ("if-match", etag.clone()),
        ],
        trickle.into(),
    )
    .await;
    assert_eq!(r.0, 204, "{}", r.2);
    let r = patch(
        vec![
            ("authorization", auth.clone()),
            (frag.0, frag.1.into()),
            ("if-match", "\"stale\"".into()),
        ],
        trickle.into(),
    )
    .await;
    assert_eq!(r.0, 412, "{}", r.2);
    assert_eq!(api_error(&r.2).error, "precondition_failed");
    // No If-Match at all: 428 with a JSON error.
    let r = patch(
        vec![("authorization", auth.clone()), (frag.0, frag.1.into())],
        trickle.into(),
    )
    .await;
    assert_eq!(r.0, 428, "{}", r.2);
    assert_eq!(r.1["content-type"], "application/json");
    assert_eq!(api_error(&r.2).error, "precondition_required");
    // An RFC 8840 trickle fragment repeats the client's current ufrag/pwd: a trickle (204, no
    // body, no ETag), not an ICE restart: the session's ETag still matches afterwards.
    let (cu, cp) = amphi_edge::sdpfrag::offer_credentials(&offer).expect("offer credentials");
    let current = format!(
        "a=ice-ufrag:{cu}\r\na=ice-pwd:{cp}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 40002 typ host\r\na=end-of-candidates\r\n"
    );
    for tag in [etag.clone(), "*".to_string()] {
        let r = patch(
            vec![
                ("authorization", auth.clone()),
                (frag.0, frag.1.into()),
                ("if-match", tag),
            ],
            current.clone(),
        )
        .await;
        assert_eq!(r.0, 204, "{}", r.2);
        assert!(r.2.is_empty(), "204 has no body: {}", r.2);
        assert!(!r.1.contains_key("etag"));
    }
    let r = patch(
        vec![
            ("authorization", auth.clone()),
            (frag.0, frag.1.into()),
            ("if-match", etag.clone()),
        ],
        trickle.into(),
    )
    .await;
    assert_eq!(
        r.0, 204,
        "ICE was not restarted: the ETag is unchanged ({})",
        r.2
    );

    // Bad requests change nothing.
    let restart = "a=ice-ufrag:Zq9f\r\na=ice-pwd:asd88fgpdd777uzjYhagZg5l\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 40001 typ host\r\na=end-of-candidates\r\n";
    let r = patch(
        vec![
            ("authorization", auth.clone()),
            ("content-type", "application/sdp".into()),
        ],
        restart.into(),
    )
    .await;
    assert_eq!(r.0, 415, "{}", r.2);
    let r = patch(
        vec![("authorization", auth.clone()), (frag.0, frag.1.into())],
        "a=ice-ufrag:Zq9f\r\n".into(),
    )
    .await;
    assert_eq!(r.0, 400, "{}", r.2);
    assert_eq!(api_error(&r.2).error, "bad_sdpfrag");
    let other = format!("Bearer {}", edge.token(LIVE_ROOM, Role::Speaker, "eve"));
    let r = patch(
        vec![
            ("authorization", other),
            (frag.0, frag.1.into()),
            ("if-match", "*".into()),
        ],
        restart.into(),
    )
    .await;
    assert_eq!(r.0, 403, "{}", r.2);

    // The restart.
    let r = patch(
        vec![
            ("authorization", auth.clone()),
            (frag.0, frag.1.into()),
            ("if-match", "*".into()),
        ],
        restart.into(),
    )
    .await;
    assert_eq!(r.0, 200, "{}", r.2);
    assert_eq!(r.1["content-type"], "application/trickle-ice-sdpfrag");
    let new_etag = r.1["etag"].to_str().unwrap().to_string();
    assert_ne!(new_etag, etag);
    let new_ufrag = new_etag.trim_matches('"').to_string();
    let answer = amphi_edge::sdpfrag::parse_fragment(r.2.as_bytes()).unwrap();
    assert_eq!(
        answer.credentials.as_ref().map(|c| c.0.as_str()),
        Some(new_ufrag.as_str())
    );
    assert_eq!(answer.candidates, 1, "{}", r.2);
    assert!(
        r.2.contains(&format!(" {} typ host", edge.media.port())),
        "{}",
        r.2
    );
    assert!(r.2.contains("a=end-of-candidates"));

    // STUN naming the old ufrag is now an unknown peer; the new ufrag is routed to the session.
    let unknown = "amphi_edge_udp_dropped_total{reason=\"unknown_peer\"}";
    let before = metric(&edge, unknown).await;
    let probe = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    probe
        .send_to(
            &stun_binding_request(&format!("{old_ufrag}:Zq9f")),
            edge.media,
        )
        .await
        .unwrap();
    probe
        .send_to(
            &stun_binding_request(&format!("{new_ufrag}:Zq9f")),
            edge.media,
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric(&edge, unknown).await < before + 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(metric(&edge, unknown).await, before + 1);

    // The session survives the restart: DELETE with its token still ends it.
    let r = request(&session_url, "DELETE", &[("authorization", &auth)], "")
        .await
        .unwrap();
    assert_eq!(r.0, 200, "{}", r.2);
    edge.stop().await;
}

/// `ice_connect_timeout_secs` is honoured: a WHIP session whose client never starts ICE is
/// dropped after the configured 1 s (the default is 15 s), and its resource is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_never_connect_are_dropped_after_the_configured_timeout() {
    let pki = DevPki::generate().unwrap();
    let origin = start_origin(&pki, "127.0.0.1:0".parse().unwrap());
    let router = start_router().await;
    let opts = EdgeOpts {
        ice_connect_timeout_secs: 1,
        ..EdgeOpts::default()
    };
    let edge = start_edge_with(&pki, origin.addr, router, opts).await;
    wait_for_origin_link(&edge).await;
    let auth = format!("Bearer {}", edge.token(LIVE_ROOM, Role::Speaker, "sam"));
    let r = request(
        &edge.whip_url(LIVE_ROOM),
        "POST",
        &[
            ("content-type", "application/sdp"),
            ("authorization", &auth),
        ],
        &valid_offer().await,
    )
    .await
    .unwrap();
    assert_eq!(r.0, 201, "{}", r.2);
    let session_url = format!("{}{}", edge.base(), r.1["location"].to_str().unwrap());
    assert_eq!(metric(&edge, "amphi_edge_peers").await, 1);
    // Well under the 15 s default; generous for a loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&edge, "amphi_edge_peers").await > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&edge, "amphi_edge_peers").await,
        0,
        "session dropped"
    );
    let r = request(&session_url, "DELETE", &[("authorization", &auth)], "")
        .await
        .unwrap();
    assert_eq!(r.0, 404, "{}", r.2);
    edge.stop().await;
}

/// A real browser-shaped offer from str0m (sendonly Opus with audio level), as a string.
/// A stand-in origin, a router and an edge whose `Hello` the origin has received.
async fn linked_edge() -> (FakeOrigin, Edge) {
    let pki = DevPki::generate().unwrap();
    let mut origin = start_origin(&pki, "127.0.0.1:0".parse().unwrap());
    let router = start_router().await;
    let edge = start_edge(&pki, origin.addr, router).await;
    expect_control(&mut origin, Duration::from_secs(10), |m| {
        matches!(m, ControlMessage::Hello { .. })
    })
    .await;
    (origin, edge)
}

async fn valid_offer() -> String {
    amphi_edge::install_crypto_provider();
    let mut rtc = str0m::Rtc::builder().build(std::time::Instant::now());
    let addr = "127.0.0.1:40000".parse().unwrap();
    rtc.add_local_candidate(str0m::Candidate::host(addr, "udp").unwrap());
    let mut change = rtc.sdp_api();
    change.add_media(
        str0m::media::MediaKind::Audio,
        str0m::media::Direction::SendOnly,
        None,
        None,
        None,
    );
    let (offer, _pending) = change.apply().unwrap();
    offer.to_sdp_string()
}

/// The same offer with every payload type but PCMU removed.
fn pcmu_only(offer: &str) -> String {
    let mut out = String::new();
    for line in offer.split("\r\n").filter(|l| !l.is_empty()) {
        if line.starts_with("m=audio") {
            let mut parts: Vec<&str> = line.split(' ').take(3).collect();
            parts.push("0");
            out.push_str(&parts.join(" "));
        } else if line.starts_with("a=rtpmap:")
            || line.starts_with("a=fmtp:")
            || line.starts_with("a=rtcp-fb:")
        {
            continue;
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
        if line.starts_with("a=mid:") {
            out.push_str("a=rtpmap:0 PCMU/8000\r\n");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_reconnects_and_replays_publishers() {
    let pki = DevPki::generate().unwrap();
    let router = start_router().await;
    // The origin is down when the edge starts.
    let origin_addr = free_port().unwrap();
    let edge = start_edge(&pki, origin_addr, router).await;
    assert_eq!(metric(&edge, "amphi_edge_origin_connected").await, 0);

    // Publishing fails closed without the room authority: 503 with a JSON error.
    let token = edge.token(LIVE_ROOM, Role::Host, "hana");
    match WhipPublisher::connect(&edge.whip_url(LIVE_ROOM), &token).await {
        Err(ClientError::Status { status: 503, body }) => {
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
            assert_eq!(v["error"], "origin_unavailable", "{body}");
        }
        Err(e) => panic!("expected 503 origin_unavailable, got {e:?}"),
        Ok(_) => panic!("a publisher was admitted without the room authority"),
    }
    assert_eq!(
        metric(&edge, "amphi_edge_whip_refused_origin_unavailable_total").await,
        1
    );

    // The origin comes up: the edge connects within the backoff cap, the publisher is admitted.
    let mut origin = start_origin(&pki, origin_addr);
    expect_control(&mut origin, Duration::from_secs(10), |m| {
        matches!(m, ControlMessage::Hello { .. })
    })
    .await;
    let mut publisher = WhipPublisher::connect(&edge.whip_url(LIVE_ROOM), &token)
        .await
        .expect("publishing works with the origin up");
    let joined = expect_control(&mut origin, Duration::from_secs(5), |m| {
        matches!(m, ControlMessage::SpeakerJoined { .. })
    })
    .await;
    let ControlMessage::SpeakerJoined { speaker, name, .. } = joined else {
        unreachable!()
    };
    assert_eq!(name, "hana");
    let packets = opus_packets(PACKETS);
    publish(&mut publisher, &packets, 0).await;
    let frames = collect_frames(&mut origin, 2 * PACKETS - 1, Duration::from_secs(5)).await;
    check_frames(&frames, speaker);

    // The origin goes away: the started session survives, its frames count as send errors, and
    // the origin's return brings a new connection and a new replay.
    origin.endpoint.close(0u32.into(), b"bye");
    let _ = tokio::time::timeout(Duration::from_secs(2), origin.endpoint.wait_idle()).await;
    drop(origin);
    let mut down = false;
    for _ in 0..300 {
        if metric(&edge, "amphi_edge_origin_connected").await == 0 {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(down, "edge noticed the origin closing");
    let packets = opus_packets(10);
    publish(&mut publisher, &packets, 960 * PACKETS as u32).await;
    let mut errors = 0;
    for _ in 0..50 {
        errors = metric(&edge, "amphi_edge_relay_send_errors_total").await;
        if errors >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        errors >= 5,
        "frames without an origin count as send errors ({errors})"
    );
    let mut free = false;
    for _ in 0..100 {
        if std::net::UdpSocket::bind(origin_addr).is_ok() {
            free = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(free, "origin port released");
    let mut origin = start_origin(&pki, origin_addr);
    expect_control(
        &mut origin,
        Duration::from_secs(10),
        |m| matches!(m, ControlMessage::SpeakerJoined { speaker: s, .. } if *s == speaker),
    )
    .await;

    // The origin ends the room: the edge drops its peers there.
    origin
        .to_edge
        .send(ControlMessage::RoomEnded { room: LIVE_ROOM })
        .unwrap();
    let left = expect_control(&mut origin, Duration::from_secs(5), |m| {
        matches!(m, ControlMessage::SpeakerLeft { .. })
    })
    .await;
    assert_eq!(
        left,
        ControlMessage::SpeakerLeft {
            room: LIVE_ROOM,
            speaker
        }
    );
    assert_eq!(metric(&edge, "amphi_edge_peers").await, 0);
    match publisher.close().await {
        Err(ClientError::Status { status: 404, .. }) => {}
        other => panic!("the session is gone after RoomEnded: {other:?}"),
    }
    edge.stop().await;
}

/// A publisher must see the loss the edge measured (RTCP receiver reports), or a browser's Opus
/// encoder never turns in-band FEC on: every 10th packet is left out, and the edge's reports
/// must say about 10 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_sees_the_loss_the_edge_measured() {
    let (_origin, edge) = linked_edge().await;
    let token = edge.token(LIVE_ROOM, Role::Speaker, "ada");
    let mut publisher = WhipPublisher::connect(&edge.whip_url(LIVE_ROOM), &token)
        .await
        .expect("whip publish connects");
    let packets = opus_packets(10);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut reported = None;
    // str0m sends an audio receiver report every 5 s: up to 15 s of packets.
    for i in 0..750u64 {
        tick.tick().await;
        if i % 10 != 5 {
            publisher
                .send_opus_indexed(i, &packets[(i % 10) as usize], 960 * i as u32, LEVEL)
                .await
                .expect("send");
        }
        if let Some(loss) = publisher.remote_loss().filter(|l| *l > 0.0) {
            reported = Some(loss);
            break;
        }
    }
    let loss = reported.expect("no receiver report with loss reached the publisher in 15 s");
    assert!((0.05..0.2).contains(&loss), "reported loss {loss}");
    publisher.close().await.expect("DELETE answers 200");
}

/// RFC 2198 RED: a publisher that negotiated RED loses every 5th packet on the way to the edge
/// (left out deterministically in the client); the next packet carries it as redundancy, and
/// the edge relays every packet to the origin: the lost ones recovered with their own sequence
/// number, timestamp and Opus payload, all unwrapped to plain Opus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_recovers_a_publishers_lost_packets_before_the_relay() {
    let (mut origin, edge) = linked_edge().await;
    let token = edge.token(LIVE_ROOM, Role::Speaker, "ada");
    let mut publisher = WhipPublisher::connect_red(&edge.whip_url(LIVE_ROOM), &token)
        .await
        .expect("whip publish connects");
    assert!(publisher.red(), "the edge must accept RED for Opus");
    let packets = opus_packets(PACKETS);
    let ts0 = 1000u32;
    let ts = |i: usize| ts0.wrapping_add(960 * i as u32);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for (i, p) in packets.iter().enumerate() {
        tick.tick().await;
        if i % 5 == 2 {
            continue; // lost on the uplink
        }
        let previous = i.checked_sub(1).map(|j| (ts(j), packets[j].as_slice()));
        publisher
            .send_opus_indexed_red(i as u64, p, ts(i), LEVEL, previous)
            .await
            .expect("send");
    }
    // Relay datagrams: each packet once as SpeakerAudio (plus a SpeakerRepeat of each).
    let mut audio = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while audio.len() < PACKETS {
        match tokio::time::timeout_at(deadline, origin.datagrams.recv()).await {
            Ok(Some(d)) => {
                let f = RelayFrame::decode(&d).expect("valid relay frame");
                if f.kind == FrameKind::SpeakerAudio {
                    audio.insert(f.rtp_ts, (f.seq, f.payload.to_vec()));
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    assert_eq!(
        audio.len(),
        PACKETS,
        "packets relayed (timestamps {:?})",
        audio.keys().collect::<Vec<_>>()
    );
    let first_seq = audio[&ts(0)].0;
    for (i, p) in packets.iter().enumerate() {
        let (seq, payload) = &audio[&ts(i)];
        assert_eq!(*seq, first_seq.wrapping_add(i as u16), "seq of packet {i}");
        assert_eq!(payload, p, "Opus payload of packet {i}");
    }
    let recovered = metric(&edge, "amphi_edge_red_recovered_total").await;
    assert_eq!(recovered, (PACKETS / 5) as u64, "packets recovered");
    publisher.close().await.expect("DELETE answers 200");
    edge.stop().await;
}

/// WHIP sessions live on their token: one whose token is revoked by `jti` (the origin's
/// `revoke_token`) ends at once and the token is refused; one whose token expires ends after the
/// grace; one that `PATCH`ed a new token of the same user first stays (and answers to the new
/// token), while a new token of another user or a higher role is refused 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_sessions_end_with_their_token_unless_patched_with_a_new_one() {
    let pki = DevPki::generate().unwrap();
    let origin = start_origin(&pki, "127.0.0.1:0".parse().unwrap());
    let router = start_router().await;
    let opts = EdgeOpts {
        token_expiry_grace_secs: 1,
        ..EdgeOpts::default()
    };
    let edge = start_edge_with(&pki, origin.addr, router, opts).await;
    // Publishing needs the room authority: wait for the origin link.
    wait_for_origin_link(&edge).await;
    let token = |user: &str, role: Role, ttl: u64| {
        let now = now_unix();
        let jti = format!("jti-{user}-{}", rand::random::<u32>());
        let t = edge.signer.sign(&Claims {
            sub: user.into(),
            name: user.into(),
            room: LIVE_ROOM,
            role,
            iat: now,
            exp: now + ttl,
            jti: jti.clone(),
        });
        (format!("Bearer {t}"), jti)
    };
    let offer = valid_offer().await;
    let mut sessions = Vec::new();
    let mut tokens = Vec::new();
    for user in ["ann", "bob", "cal"] {
        let (auth, jti) = token(user, Role::Speaker, 5);
        let r = request(
            &edge.whip_url(LIVE_ROOM),
            "POST",
            &[
                ("content-type", "application/sdp"),
                ("authorization", &auth),
            ],
            &offer,
        )
        .await
        .unwrap();
        assert_eq!(r.0, 201, "{}", r.2);
        sessions.push(format!(
            "{}{}",
            edge.base(),
            r.1["location"].to_str().unwrap()
        ));
        tokens.push((auth, jti));
    }
    let patch = |url: String, auth: String| async move {
        request(
            &url,
            "PATCH",
            &[
                ("authorization", &auth),
                ("content-type", "application/trickle-ice-sdpfrag"),
                ("if-match", "*"),
            ],
            "",
        )
        .await
        .unwrap()
    };
    // Another user's token tells a live session (403) from a gone one (404).
    let (probe, _) = token("probe", Role::Listener, 600);
    let gone = |url: String| {
        let probe = probe.clone();
        async move {
            for _ in 0..100 {
                match patch(url.clone(), probe.clone()).await.0 {
                    404 => return true,
                    403 => tokio::time::sleep(Duration::from_millis(100)).await,
                    other => panic!("probe answered {other}"),
                }
            }
            false
        }
    };

    // cal's token is revoked by jti: the session ends, the token is refused.
    origin
        .to_edge
        .send(ControlMessage::RevokeToken {
            jti: tokens[2].1.clone(),
            until: now_unix() + 600,
        })
        .unwrap();
    assert!(
        gone(sessions[2].clone()).await,
        "the revoked session stayed"
    );
    let r = request(
        &edge.whip_url(LIVE_ROOM),
        "POST",
        &[
            ("content-type", "application/sdp"),
            ("authorization", &tokens[2].0),
        ],
        &offer,
    )
    .await
    .unwrap();
    assert_eq!(
        (r.0, api_error(&r.2).error.as_str()),
        (401, "token_revoked")
    );

    // ann refreshes with a new token of hers; bob's higher-role token is refused.
    let (ann_new, _) = token("ann", Role::Speaker, 600);
    let r = patch(sessions[0].clone(), ann_new.clone()).await;
    assert_eq!(r.0, 204, "{}", r.2);
    let (bob_host, _) = token("bob", Role::Host, 600);
    let r = patch(sessions[1].clone(), bob_host).await;
    assert_eq!(r.0, 403, "{}", r.2);

    // bob's session ends once his token is past the grace; ann's stays on her new token.
    assert!(
        gone(sessions[1].clone()).await,
        "the expired session stayed"
    );
    let r = patch(sessions[0].clone(), probe.clone()).await;
    assert_eq!(r.0, 403, "ann's session is still there: {}", r.2);
    let r = request(&sessions[0], "DELETE", &[("authorization", &ann_new)], "")
        .await
        .unwrap();
    assert_eq!(r.0, 200, "{}", r.2);
    edge.stop().await;
}
