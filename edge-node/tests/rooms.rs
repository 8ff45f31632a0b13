//! Rooms at the edge: WebSocket signaling against the real room authority (the origin hub without its mixer), WHEP listeners
//! across two edges, and bad input (forged/expired/other-room tokens, non-host moderation,
//! listener publishing, malformed/oversized messages, chat flood).

mod common;

use amphi_common::mtls::DevPki;
use amphi_protocol::room::{RoomEvent, RoomPhase, RoomRole, ServerMessage};
use amphi_protocol::token::{Claims, Role, TokenSigner};
use amphi_protocol::{ParticipantId, RoomId};
use amphi_testkit::whep_client::{WhepOptions, WhepSubscriber};
use amphi_testkit::whip_client::{ClientError, WhipPublisher};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Ws {
    s: Stream,
}

/// Open `/v1/ws?token=`; the HTTP status if the upgrade is refused.
async fn ws(edge: &Edge, token: &str) -> Result<Ws, u16> {
    let url = format!("ws://{}/v1/ws?token={token}", edge.http);
    match tokio_tungstenite::connect_async(url).await {
        Ok((s, _)) => Ok(Ws { s }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket connect failed: {e}"),
    }
}

impl Ws {
    async fn send(&mut self, v: serde_json::Value) {
        self.s
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    async fn send_raw(&mut self, m: Message) {
        self.s.send(m).await.unwrap();
    }

    /// The next server message other than `active_speakers`, within 5 s.
    async fn next(&mut self) -> ServerMessage {
        for _ in 0..100 {
            let m = tokio::time::timeout(Duration::from_secs(5), self.s.next())
                .await
                .expect("a server message within 5 s")
                .expect("connection open")
                .expect("no websocket error");
            match m {
                Message::Text(t) => {
                    let msg: ServerMessage = serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("bad server JSON {e}: {t}"));
                    if !matches!(msg, ServerMessage::ActiveSpeakers { .. }) {
                        return msg;
                    }
                }
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => {}
            }
        }
        panic!("only active_speakers messages")
    }

    async fn expect_error(&mut self, code: &str) {
        self.expect_error_of(&[code]).await;
    }

    /// Expect an error whose code is one of `codes`.
    async fn expect_error_of(&mut self, codes: &[&str]) {
        match self.next().await {
            ServerMessage::Error { code: c, .. } if codes.contains(&c.as_str()) => {}
            other => panic!("expected error {codes:?}, got {other:?}"),
        }
    }

    /// Wait for the close frame; returns its code.
    async fn closed(&mut self) -> u16 {
        for _ in 0..100 {
            match tokio::time::timeout(Duration::from_secs(5), self.s.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => return u16::from(f.code),
                Ok(Some(Ok(Message::Close(None)))) | Ok(None) | Ok(Some(Err(_))) => {
                    return u16::from(CloseCode::Normal)
                }
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("not closed within 5 s"),
            }
        }
        panic!("no close frame")
    }

    async fn join(&mut self) -> (ParticipantId, amphi_protocol::room::RoomState) {
        self.send(json!({"type": "join"})).await;
        match self.next().await {
            ServerMessage::Snapshot { you, state, .. } => (you, state),
            other => panic!("expected snapshot, got {other:?}"),
        }
    }
}

fn signer_copy(s: &TokenSigner) -> TokenSigner {
    TokenSigner::from_pkcs8_pem("k1", &s.to_pkcs8_pem()).unwrap()
}

/// A str0m offer with one audio m-line in `dir` (sendonly: publishing; recvonly: a slot).
fn offer(dirs: &[str0m::media::Direction]) -> String {
    amphi_edge::install_crypto_provider();
    let mut rtc = str0m::Rtc::builder().build(std::time::Instant::now());
    rtc.add_local_candidate(
        str0m::Candidate::host("127.0.0.1:40000".parse().unwrap(), "udp").unwrap(),
    );
    let mut change = rtc.sdp_api();
    for d in dirs {
        change.add_media(str0m::media::MediaKind::Audio, *d, None, None, None);
    }
    change.apply().unwrap().0.to_sdp_string()
}

async fn setup() -> (DevPki, Authority, std::net::SocketAddr) {
    let pki = DevPki::generate().unwrap();
    let authority = start_authority(&pki, "127.0.0.1:0".parse().unwrap());
    let router = start_router().await;
    (pki, authority, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_signaling_moderation_and_bad_input() {
    let (pki, authority, router) = setup().await;
    let edge = start_edge(&pki, authority.addr(), router).await;
    wait_for_origin_link(&edge).await;

    // Tokens refused before the upgrade.
    assert_eq!(ws(&edge, "").await.err(), Some(401));
    assert_eq!(ws(&edge, "not.a.token").await.err(), Some(401));
    let now = now_unix();
    let claims = Claims {
        sub: "mallory".into(),
        name: "mallory".into(),
        room: LIVE_ROOM,
        role: Role::Host,
        iat: now,
        exp: now + 600,
        jti: "f".into(),
    };
    let forged = TokenSigner::generate("k1").sign(&claims);
    assert_eq!(ws(&edge, &forged).await.err(), Some(401));
    let expired = edge.signer.sign(&Claims {
        iat: now - 7200,
        exp: now - 3600,
        ..claims.clone()
    });
    assert_eq!(ws(&edge, &expired).await.err(), Some(401));
    let ended = edge.token(ENDED_ROOM, Role::Host, "h");
    assert_eq!(ws(&edge, &ended).await.err(), Some(404));

    // Host, listener and speaker join; everyone sees the others arrive.
    let mut host = ws(&edge, &edge.token(LIVE_ROOM, Role::Host, "hana"))
        .await
        .unwrap();
    // Commands before join are refused.
    host.send(json!({"type": "raise_hand"})).await;
    host.expect_error("not_joined").await;
    let (host_id, state) = host.join().await;
    assert_eq!(state.participants.len(), 1);
    assert_eq!(state.participants[0].role, RoomRole::Host);
    assert_eq!(host_id.0 >> 20, 1, "ids carry the edge index");
    let mut lee = ws(&edge, &edge.token(LIVE_ROOM, Role::Listener, "lee"))
        .await
        .unwrap();
    let (lee_id, state) = lee.join().await;
    assert_eq!(state.participants.len(), 2);
    match host.next().await {
        ServerMessage::Event(RoomEvent::ParticipantJoined { participant }) => {
            assert_eq!(participant.id, lee_id);
            assert_eq!(participant.role, RoomRole::Listener);
        }
        other => panic!("{other:?}"),
    }
    let mut sam = ws(&edge, &edge.token(LIVE_ROOM, Role::Speaker, "sam"))
        .await
        .unwrap();
    let (sam_id, _) = sam.join().await;
    for c in [&mut host, &mut lee] {
        assert!(matches!(c.next().await,
            ServerMessage::Event(RoomEvent::ParticipantJoined { participant }) if participant.id == sam_id));
    }

    // Bad input: every refusal is an error event, nothing changes at the authority.
    let before = authority.room_state(LIVE_ROOM).unwrap();
    lee.send(json!({"type": "kick", "target": host_id.0})).await;
    lee.expect_error("forbidden").await;
    lee.send(json!({"type": "end"})).await;
    lee.expect_error("forbidden").await;
    lee.send(json!({"type": "promote", "target": lee_id.0}))
        .await;
    lee.expect_error("forbidden").await;
    sam.send(json!({"type": "mute", "target": host_id.0})).await;
    sam.expect_error("forbidden").await;
    sam.send(json!({"type": "kick", "target": lee_id.0})).await;
    sam.expect_error("forbidden").await;
    host.send(json!({"type": "kick", "target": 12345})).await;
    host.expect_error("not_found").await;
    lee.send_raw(Message::Text("{nope".into())).await;
    lee.expect_error("bad_message").await;
    lee.send(json!({"type": "fly"})).await;
    lee.expect_error("bad_message").await;
    lee.send(json!({"type": "chat", "text": "x".repeat(70 * 1024)}))
        .await;
    lee.expect_error("bad_message").await;
    lee.send(json!({"type": "chat", "text": "x".repeat(501)}))
        .await;
    lee.expect_error("bad_message").await;
    lee.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    lee.expect_error("bad_message").await;
    // A listener's offer that sends audio.
    let sending = offer(&[str0m::media::Direction::SendOnly]);
    lee.send(json!({"type": "offer", "sdp": sending})).await;
    lee.expect_error("forbidden").await;
    lee.send(json!({"type": "offer", "sdp": "garbage"})).await;
    lee.expect_error("bad_sdp").await;
    // Chat flood: five pass, the sixth is rate limited.
    for i in 0..5 {
        lee.send(json!({"type": "chat", "text": format!("hi {i}")}))
            .await;
    }
    for i in 0..5 {
        match lee.next().await {
            ServerMessage::Event(RoomEvent::Chat { text, from, .. }) => {
                assert_eq!(text, format!("hi {i}"));
                assert_eq!(from, lee_id);
            }
            other => panic!("{other:?}"),
        }
    }
    lee.send(json!({"type": "chat", "text": "one too many"}))
        .await;
    lee.expect_error("rate_limited").await;
    // The connection is still up.
    lee.send(json!({"type": "ping"})).await;
    assert_eq!(lee.next().await, ServerMessage::Pong);
    assert_eq!(
        authority.room_state(LIVE_ROOM).unwrap(),
        before,
        "nothing changed"
    );
    // The host saw only the five chats.
    for _ in 0..5 {
        assert!(matches!(
            host.next().await,
            ServerMessage::Event(RoomEvent::Chat { .. })
        ));
    }

    // Raise hand, promote (hand lowered), then a listener receive-only offer gets an answer.
    lee.send(json!({"type": "raise_hand"})).await;
    assert!(
        matches!(host.next().await, ServerMessage::Event(RoomEvent::HandRaised { id }) if id == lee_id)
    );
    assert!(
        matches!(lee.next().await, ServerMessage::Event(RoomEvent::HandRaised { id }) if id == lee_id)
    );
    // One client PeerConnection, renegotiated below.
    let mut pc = str0m::Rtc::builder().build(std::time::Instant::now());
    pc.add_local_candidate(
        str0m::Candidate::host("127.0.0.1:40001".parse().unwrap(), "udp").unwrap(),
    );
    let mut change = pc.sdp_api();
    for _ in 0..3 {
        change.add_media(
            str0m::media::MediaKind::Audio,
            str0m::media::Direction::RecvOnly,
            None,
            None,
            None,
        );
    }
    let (recv, pending) = change.apply().unwrap();
    lee.send(json!({"type": "offer", "sdp": recv.to_sdp_string()}))
        .await;
    match lee.next().await {
        ServerMessage::Answer { sdp } => {
            assert!(sdp.contains("a=sendonly"), "{sdp}");
            let answer = str0m::change::SdpAnswer::from_sdp_string(&sdp).unwrap();
            pc.sdp_api().accept_answer(pending, answer).unwrap();
        }
        other => panic!("{other:?}"),
    }
    host.send(json!({"type": "promote", "target": lee_id.0}))
        .await;
    for c in [&mut host, &mut lee] {
        assert!(matches!(c.next().await,
            ServerMessage::Event(RoomEvent::RoleChanged { id, role: RoomRole::Speaker, .. }) if id == lee_id));
        assert!(matches!(c.next().await,
            ServerMessage::Event(RoomEvent::HandLowered { id }) if id == lee_id));
    }
    // Promoted: the renegotiation that adds a microphone is accepted on the same PeerConnection.
    let mut change = pc.sdp_api();
    change.add_media(
        str0m::media::MediaKind::Audio,
        str0m::media::Direction::SendOnly,
        None,
        None,
        None,
    );
    let (with_mic, pending) = change.apply().unwrap();
    lee.send(json!({"type": "offer", "sdp": with_mic.to_sdp_string()}))
        .await;
    match lee.next().await {
        ServerMessage::Answer { sdp } => {
            let answer = str0m::change::SdpAnswer::from_sdp_string(&sdp).unwrap();
            pc.sdp_api().accept_answer(pending, answer).unwrap();
        }
        other => panic!("renegotiation refused: {other:?}"),
    }

    // Kick: the event, then the socket closes; rejoining with the same identity is refused.
    host.send(json!({"type": "kick", "target": lee_id.0})).await;
    assert!(
        matches!(lee.next().await, ServerMessage::Event(RoomEvent::Kicked { id, .. }) if id == lee_id)
    );
    assert_eq!(lee.closed().await, 4001);
    assert!(
        matches!(host.next().await, ServerMessage::Event(RoomEvent::Kicked { id, .. }) if id == lee_id)
    );
    // The authority removes a kicked participant in the same command.
    assert!(
        matches!(host.next().await, ServerMessage::Event(RoomEvent::ParticipantLeft { id }) if id == lee_id)
    );
    let mut again = ws(&edge, &edge.token(LIVE_ROOM, Role::Listener, "lee"))
        .await
        .unwrap();
    again.send(json!({"type": "join"})).await;
    // A kick bans the user at the authority and revokes the user's tokens of the room at every
    // edge: whichever of the two reaches this edge first refuses the join.
    again.expect_error_of(&["banned", "token_revoked"]).await;
    assert!(authority
        .room_state(LIVE_ROOM)
        .unwrap()
        .banned
        .contains(&"user-lee".to_string()));

    // End: everyone gets `ended`, then the sockets close.
    host.send(json!({"type": "end"})).await;
    assert!(matches!(
        host.next().await,
        ServerMessage::Event(RoomEvent::Ended { by: Some(b) }) if b == host_id
    ));
    assert_eq!(host.closed().await, 4002);
    // The speaker saw everything above (bounded), then the end.
    let mut seen = Vec::new();
    loop {
        let m = sam.next().await;
        if matches!(m, ServerMessage::Event(RoomEvent::Ended { by: Some(b) }) if b == host_id) {
            break;
        }
        seen.push(m);
        assert!(seen.len() < 20, "{seen:?}");
    }
    assert!(seen
        .iter()
        .any(|m| matches!(m, ServerMessage::Event(RoomEvent::Kicked { .. }))));
    assert_eq!(sam.closed().await, 4002);
    assert_eq!(
        authority.room_state(LIVE_ROOM).unwrap().phase,
        RoomPhase::Ended
    );
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_listener_in_eu_west_hears_us_east_speaker() {
    let (pki, authority, router) = setup().await;
    let us = start_edge(&pki, authority.addr(), router).await;
    let eu = start_edge_with(
        &pki,
        authority.addr(),
        router,
        EdgeOpts {
            index: 2,
            region: "eu-west",
            capacity: 1,
            signer: Some(signer_copy(&us.signer)),
            ..EdgeOpts::default()
        },
    )
    .await;
    for e in [&us, &eu] {
        wait_for_origin_link(e).await;
    }
    let whep_url = format!("{}/whep/{LIVE_ROOM}", eu.base());

    // Bad WHEP input.
    let now = now_unix();
    let claims = Claims {
        sub: "m".into(),
        name: "m".into(),
        room: LIVE_ROOM,
        role: Role::Listener,
        iat: now,
        exp: now + 600,
        jti: "j".into(),
    };
    let forged = TokenSigner::generate("k1").sign(&claims);
    let expired = us.signer.sign(&Claims {
        iat: now - 7200,
        exp: now - 3600,
        ..claims.clone()
    });
    let other_room = us.token(RoomId(0x77), Role::Listener, "o");
    for (tok, status) in [(&forged, 401), (&expired, 401), (&other_room, 403)] {
        match WhepSubscriber::connect(&whep_url, tok).await {
            Err(ClientError::Status { status: s, .. }) => assert_eq!(s, status),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted a bad token"),
        }
    }
    let listener = us.token(LIVE_ROOM, Role::Listener, "lena");
    let sdp = ("content-type", "application/sdp");
    let auth = format!("Bearer {listener}");
    let r = request(
        &whep_url,
        "POST",
        &[sdp, ("authorization", &auth)],
        &offer(&[str0m::media::Direction::SendOnly]),
    )
    .await
    .unwrap();
    assert_eq!(r.0, 403, "a WHEP offer that sends audio: {}", r.2);
    let r = request(&whep_url, "OPTIONS", &[], "").await.unwrap();
    assert_eq!(r.1["access-control-allow-origin"], "*");

    // The real listener: receive-only, 3 slots.
    let mut sub = WhepSubscriber::connect_with(&whep_url, &listener, WhepOptions::default())
        .await
        .expect("whep connects");
    assert!(sub
        .resource_url()
        .path()
        .starts_with(&format!("/whep/{LIVE_ROOM}/")));
    // Capacity 1: the next interactive listener is refused with 503 `capacity`.
    let second = us.token(LIVE_ROOM, Role::Listener, "second");
    match WhepSubscriber::connect(&whep_url, &second).await {
        Err(ClientError::Status { status, body }) => {
            assert_eq!(status, 503);
            assert!(body.contains("capacity"), "{body}");
        }
        other => panic!("expected 503: {:?}", other.err()),
    }

    // A us-east speaker talks.
    let speaker = us.token(LIVE_ROOM, Role::Speaker, "sam");
    let mut publisher = WhipPublisher::connect(&us.whip_url(LIVE_ROOM), &speaker)
        .await
        .expect("whip connects");
    let packets = opus_packets(100);
    let send = async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for (i, p) in packets.iter().enumerate() {
            tick.tick().await;
            publisher
                .send_opus(p, 960 * i as u32, 30)
                .await
                .expect("send");
        }
    };
    let recv = async {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        while got.len() < 60 {
            match tokio::time::timeout_at(deadline, sub.recv()).await {
                Ok(Some(p)) => got.push(p),
                _ => break,
            }
        }
        got
    };
    let ((), got) = tokio::join!(send, recv);
    assert!(
        got.len() >= 60,
        "only {} packets reached eu-west",
        got.len()
    );
    for p in &got {
        assert_eq!(p.slot, 0, "one speaker: slot 0");
        assert_eq!(p.audio_level, Some(30));
        assert!(
            packets.iter().any(|x| x[..] == p.payload[..]),
            "payload is one of the speaker's Opus packets"
        );
    }
    for w in got.windows(2) {
        let d = w[1].seq.wrapping_sub(w[0].seq);
        assert!((1..10).contains(&d), "seq {} -> {}", w[0].seq, w[1].seq);
        assert_eq!(w[1].ts.wrapping_sub(w[0].ts), 960 * u32::from(d));
        assert_eq!(w[1].ssrc, w[0].ssrc);
    }
    assert!(metric(&eu, "amphi_edge_rtp_forwarded_total").await >= 60);
    assert!(metric(&eu, "amphi_edge_relay_frames_received_total").await >= 60);
    assert!(
        metric(&eu, "amphi_edge_forward_delay_seconds_count").await >= 60,
        "forwarding delay is measured"
    );
    // Both WHIP and WHEP sessions are participants at the authority.
    let st = authority.room_state(LIVE_ROOM).unwrap();
    let regions: Vec<&str> = st.participants.iter().map(|p| p.region.as_str()).collect();
    assert!(
        regions.contains(&"us-east") && regions.contains(&"eu-west"),
        "{regions:?}"
    );

    sub.close().await.expect("DELETE 200");
    publisher.close().await.expect("DELETE 200");
    us.stop().await;
    eu.stop().await;
}
