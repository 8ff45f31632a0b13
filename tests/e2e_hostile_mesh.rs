//! Hostile mesh peers and an unreachable room authority, against real `amphi` role processes:
//! a peer with a valid mesh certificate but the wrong `amphi-role:` (a packager certificate
//! acting as an edge, a certificate without a role) is refused by the origin; relay frames for
//! speakers a connection did not announce (or in rooms it did not announce them in) are dropped
//! and counted; WHIP publishing fails closed while the origin is stopped (slow) or gone; and a
//! refusal that reaches the edge after it admitted a WHEP listener closes that session.

mod roles;
use amphi_testkit::mesh as support;

use amphi_common::mtls::{MeshRole, MtlsMaterial};
use amphi_protocol::control::{ControlDecoder, ControlMessage, PeerKind};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::{ParticipantId, RoomId};
use amphi_testkit::whep_client::WhepSubscriber;
use amphi_testkit::whip_client::{ClientError, WhipPublisher};
use roles::*;
use std::sync::Arc;
use std::time::Duration;

const ORIGIN_NAME: &str = "origin.amphi.internal";

/// A test process speaking the mesh protocol to the origin itself.
struct Peer {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: ControlDecoder,
    _endpoint: quinn::Endpoint,
}

impl Peer {
    /// Connect with `tls`, say `Hello` as `peer`; returns the peer and the origin's first answer.
    async fn hello(
        origin: &str,
        tls: &MtlsMaterial,
        peer: PeerKind,
        id: &str,
    ) -> (Peer, ControlMessage) {
        let quic_tls =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config().unwrap())
                .unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic_tls)));
        let conn = endpoint
            .connect(origin.parse().unwrap(), ORIGIN_NAME)
            .unwrap()
            .await
            .expect("TLS handshake with the origin (the CA is valid)");
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let hello = ControlMessage::Hello {
            peer,
            id: id.into(),
            region: "us-east".into(),
        };
        send.write_all(&hello.to_record()).await.unwrap();
        let mut p = Peer {
            conn,
            send,
            recv,
            dec: ControlDecoder::default(),
            _endpoint: endpoint,
        };
        let first = p.next().await.expect("the origin answers the hello");
        (p, first)
    }

    async fn send(&mut self, m: ControlMessage) {
        self.send.write_all(&m.to_record()).await.unwrap();
    }

    /// The next control message (`None` if the stream ended or 5 s passed).
    async fn next(&mut self) -> Option<ControlMessage> {
        let mut buf = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(m) = self.dec.next_message().unwrap() {
                    return Some(m);
                }
                match self.recv.read(&mut buf).await {
                    Ok(Some(n)) => self.dec.feed(&buf[..n]),
                    _ => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Send `n` audio frames of `speaker` in `room`, payload tagged with `mark`.
    fn frames(&self, room: RoomId, speaker: u32, mark: u8, n: u16) {
        for i in 0..n {
            let payload = [mark, 0xfc, 0xff, 0xfe];
            let mut d = Vec::new();
            RelayFrame {
                kind: FrameKind::SpeakerAudio,
                room,
                speaker,
                seq: i,
                rtp_ts: u32::from(i) * 960,
                audio_level: 30,
                payload: &payload,
            }
            .encode_to_vec(&mut d)
            .unwrap();
            self.conn.send_datagram(d.into()).unwrap();
        }
    }
}

/// Wait until the origin process serves its metrics.
async fn origin_up(mesh: &RoleMesh) {
    let om = mesh.origin_metrics();
    tokio::task::spawn_blocking(move || {
        eventually("origin up", Duration::from_secs(20), || {
            (support::get_status(&format!("{om}/metrics")) == 200).then_some(())
        })
    })
    .await
    .unwrap();
}

fn origin_metric(mesh: &RoleMesh, name: &str) -> f64 {
    support::metric(&mesh.origin_metrics(), name).unwrap_or(0.0)
}

fn origin_addr(mesh: &RoleMesh) -> String {
    format!("127.0.0.1:{}", mesh.base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_mesh_peers_with_the_wrong_role_are_refused_by_the_origin() {
    let mesh = RoleMesh::new("hostile-mesh-roles", 30_500);
    let origin = mesh.origin(None);
    origin_up(&mesh).await;
    let addr = origin_addr(&mesh);

    // Every certificate below is signed by the mesh CA: only its role differs.
    let forged = [
        // A packager's certificate acting as an edge.
        (MeshRole::Packager, Some(MeshRole::Packager), PeerKind::Edge),
        // A certificate without any role.
        (MeshRole::Router, None, PeerKind::Router),
        // An edge's certificate acting as a packager (would receive every program stream).
        (MeshRole::Edge, Some(MeshRole::Edge), PeerKind::Packager),
    ];
    for (i, (name_role, role, claim)) in forged.into_iter().enumerate() {
        let roles: Vec<MeshRole> = role.into_iter().collect();
        let tls = mesh.material(&format!("{name_role}-x.amphi.internal"), &roles);
        let (peer, answer) = Peer::hello(&addr, &tls, claim, &format!("forged-{i}")).await;
        match answer {
            ControlMessage::Error { code, message } => {
                assert_eq!(code, "forbidden_role", "{message}");
                assert!(
                    message.contains(&claim.mesh_role().to_string()),
                    "{message}"
                );
            }
            other => panic!("hello as {claim:?} with roles {roles:?} was answered {other:?}"),
        }
        let closed = tokio::time::timeout(Duration::from_secs(5), peer.conn.closed())
            .await
            .expect("the origin closes the forged peer's connection");
        assert!(
            matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
            "{closed:?}"
        );
    }
    assert_eq!(
        origin_metric(&mesh, "amphi_origin_mesh_role_refusals_total"),
        3.0
    );
    let log = origin.log_text();
    assert!(
        log.contains("mesh peer refused") && log.contains("forged-0"),
        "the refusals are logged:\n{log}"
    );

    // A genuine edge certificate is welcomed, and its hello as an edge goes through.
    let tls = mesh.material("edge-ok.amphi.internal", &[MeshRole::Edge]);
    let (_peer, answer) = Peer::hello(&addr, &tls, PeerKind::Edge, "edge-ok").await;
    assert!(
        matches!(answer, ControlMessage::Welcome { .. }),
        "{answer:?}"
    );
    assert_eq!(origin_metric(&mesh, "amphi_origin_connected_edges"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_frames_for_speakers_a_connection_did_not_announce_are_dropped() {
    let mesh = RoleMesh::new("hostile-mesh-frames", 30_600);
    let _origin = mesh.origin(None);
    origin_up(&mesh).await;
    let addr = origin_addr(&mesh);
    let edge = |n: &str| mesh.material(&format!("{n}.amphi.internal"), &[MeshRole::Edge]);
    let (room, other_room) = (RoomId(0x7e57_0000_0000_0001), RoomId(0x7e57_0000_0000_0002));

    // A publishes speaker 7 in the room; B listens to the room; C (a compromised edge) announced
    // only its own speaker 9, in another room.
    let (mut a, w) = Peer::hello(&addr, &edge("edge-a"), PeerKind::Edge, "edge-a").await;
    assert!(matches!(w, ControlMessage::Welcome { .. }));
    let (mut b, w) = Peer::hello(&addr, &edge("edge-b"), PeerKind::Edge, "edge-b").await;
    assert!(matches!(w, ControlMessage::Welcome { .. }));
    let (mut c, w) = Peer::hello(&addr, &edge("edge-c"), PeerKind::Edge, "edge-c").await;
    assert!(matches!(w, ControlMessage::Welcome { .. }));
    let joined = |room, speaker| ControlMessage::SpeakerJoined {
        room,
        speaker: ParticipantId(speaker),
        name: format!("s{speaker}"),
        region: "us-east".into(),
    };
    a.send(ControlMessage::SubscribeRoom { room }).await;
    a.send(joined(room, 7)).await;
    b.send(ControlMessage::SubscribeRoom { room }).await;
    c.send(ControlMessage::SubscribeRoom { room }).await;
    c.send(joined(other_room, 9)).await;
    // Control records are applied in order: a ping answered means the rest was too.
    for p in [&mut a, &mut b, &mut c] {
        p.send(ControlMessage::Ping { nonce: 1 }).await;
        assert_eq!(p.next().await, Some(ControlMessage::Pong { nonce: 1 }));
    }

    let heard = tokio::spawn({
        let conn = b.conn.clone();
        async move {
            let (mut from_a, mut from_c) = (0, 0);
            while let Ok(Ok(d)) =
                tokio::time::timeout(Duration::from_secs(2), conn.read_datagram()).await
            {
                let f = RelayFrame::decode(&d).expect("a relay frame");
                match f.payload[0] {
                    0xa0 => from_a += 1,
                    _ => from_c += 1,
                }
            }
            (from_a, from_c)
        }
    });
    let dropped = r#"amphi_origin_relay_dropped_total{reason="not_announced"}"#;
    let before = origin_metric(&mesh, dropped);
    // C injects speaker 7 (A's) and its own speaker 9 in a room it did not announce it in.
    c.frames(room, 7, 0xc0, 40);
    c.frames(room, 9, 0xc9, 40);
    a.frames(room, 7, 0xa0, 40);
    // C then tries to claim speaker 7: refused, and its frames stay dropped.
    c.send(joined(room, 7)).await;
    match c.next().await {
        Some(ControlMessage::Error { code, .. }) => assert_eq!(code, "forbidden"),
        other => panic!("claiming another edge's speaker was answered {other:?}"),
    }
    c.frames(room, 7, 0xc0, 20);
    let (from_a, from_c) = heard.await.unwrap();
    assert_eq!(from_c, 0, "injected frames reached another edge");
    assert!(
        from_a >= 30,
        "the announced speaker is relayed ({from_a}/40)"
    );
    let counted = origin_metric(&mesh, dropped) - before;
    assert!(
        counted >= 80.0,
        "injected frames are counted as not_announced ({counted})"
    );
    assert_eq!(
        origin_metric(&mesh, "amphi_origin_speaker_claims_refused_total"),
        1.0
    );
}

/// Wait until the geo-router answers.
async fn router_up(router: &str) {
    let router = router.to_string();
    tokio::task::spawn_blocking(move || {
        eventually("router up", Duration::from_secs(30), || {
            (support::get_status(&format!("{router}/healthz")) == 200).then_some(())
        })
    })
    .await
    .unwrap();
}

/// Wait until edge `edge` says whether its origin link is up (`up`).
async fn edge_link(edge: &str, up: bool, what: &'static str) {
    let edge = edge.to_string();
    tokio::task::spawn_blocking(move || {
        eventually(what, Duration::from_secs(30), || {
            let v = support::metric(&edge, "amphi_edge_origin_connected").unwrap_or(-1.0);
            ((v >= 1.0) == up && v >= 0.0).then_some(())
        })
    })
    .await
    .unwrap();
}

/// A WHIP publish that must be refused with 503 `origin_unavailable`.
async fn whip_refused(whip: &str, token: &str) {
    match WhipPublisher::connect(whip, token).await {
        Err(ClientError::Status { status, body }) => {
            let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON error body");
            assert_eq!(
                (status, v["error"].as_str()),
                (503, Some("origin_unavailable")),
                "{body}"
            );
        }
        Err(e) => panic!("WHIP failed otherwise: {e}"),
        Ok(_) => panic!("a publisher was admitted without the room authority's answer"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_fails_closed_when_the_origin_is_slow_or_down() {
    let mesh = RoleMesh::new("hostile-mesh-whip", 30_700);
    let mut origin = mesh.origin(None);
    let _router = mesh.router_process(None, "");
    let _edge = mesh.edge_process(0, "us-east", "");
    let (router, edge) = (mesh.router(), mesh.edge(0));
    edge_link(&edge, true, "edge linked to the origin").await;
    router_up(&router).await;
    let CreatedRoom { room, .. } = create_room(&router, "fail closed");
    let speaker = mint_token(&router, &room, "speaker", "spk");
    let listener = mint_token(&router, &room, "listener", "lis");
    let whip = format!("{edge}/whip/{room}");

    // The origin is stopped (as slow as can be): the edge waits for its answer, then refuses.
    origin.signal("STOP");
    whip_refused(&whip, &speaker).await;
    origin.signal("CONT");
    // With the origin answering, the same publisher is admitted.
    let publisher = WhipPublisher::connect(&whip, &speaker)
        .await
        .expect("publishing with the origin up");
    publisher.close().await.expect("WHIP close");

    // The origin is gone: publishing is refused at once, listening continues degraded.
    origin.signal("KILL");
    origin
        .wait_exit(Duration::from_secs(5))
        .expect("origin died");
    edge_link(&edge, false, "edge notices the origin is gone").await;
    whip_refused(&whip, &speaker).await;
    let sub = WhepSubscriber::connect(&format!("{edge}/whep/{room}"), &listener)
        .await
        .expect("a listener is admitted with its token role");
    sub.close().await.expect("WHEP close");
    assert!(
        support::metric(&edge, "amphi_edge_whip_refused_origin_unavailable_total").unwrap_or(0.0)
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_refusal_from_the_origin_closes_the_started_session() {
    let mesh = RoleMesh::new("hostile-mesh-late", 30_800);
    let origin = mesh.origin(None);
    let _router = mesh.router_process(None, "");
    let _us = mesh.edge_process(0, "us-east", "");
    let (router, us) = (mesh.router(), mesh.edge(0));
    edge_link(&us, true, "us-east linked").await;
    router_up(&router).await;
    let CreatedRoom { room, .. } = create_room(&router, "late refusal");
    let troll_t = mint_token(&router, &room, "listener", "troll");

    // The troll fills its per-user session cap (8) on the edge.
    let mut held = Vec::new();
    for _ in 0..8 {
        let (ws, _) = Ws::join(&us, &troll_t).await.expect("troll joins");
        held.push(ws);
    }

    // The origin stalls; the troll listens with the same token, a ninth session. The edge stops
    // waiting and admits the listener with its token role. The stall outlasts the mesh link's
    // idle timeout, so the edge reconnects and re-joins its participants in the order they
    // came (the held eight first): whether the refusal answers the first join or the re-join,
    // it is the ninth session that is refused...
    origin.signal("STOP");
    let sub = WhepSubscriber::connect(&format!("{us}/whep/{room}"), &troll_t).await;
    origin.signal("CONT");
    let sub = sub.expect("the edge admits a listener while the origin is silent");
    // ...and the origin's refusal (over the cap), when it comes, ends that session.
    {
        let us = us.clone();
        tokio::task::spawn_blocking(move || {
            eventually(
                "the refused listener's session closes",
                Duration::from_secs(20),
                || (support::metric(&us, "amphi_edge_peers") == Some(0.0)).then_some(()),
            )
        })
        .await
        .unwrap();
    }
    match sub.close().await {
        Err(ClientError::Status { status: 404, .. }) => {}
        other => panic!("the refused session is gone: {other:?}"),
    }
}
