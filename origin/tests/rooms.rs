//! The room authority end to end: a real origin on loopback, two quinn "edges" (us-east and
//! eu-west), a packager and dev mTLS. Joins, snapshots, permissions, mute gating of relayed audio,
//! kick + ban, an edge disconnect, and the host ending the room.

use amphi_common::mtls::{DevPki, MeshRole, MtlsMaterial};
use amphi_origin::{run, OriginSetup};
use amphi_protocol::config::OriginConfig;
use amphi_protocol::control::{ControlDecoder, ControlMessage, PeerKind};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::room::{RoomCommand, RoomEvent, RoomPhase, RoomRole};
use amphi_protocol::token::Role;
use amphi_protocol::{ParticipantId, RoomId};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const ORIGIN_NAME: &str = "origin.amphi.internal";
const ROOM: RoomId = RoomId(0x0123_4567_89ab_cdef);
const HOST: ParticipantId = ParticipantId(0x0100_0001);
const SPEAKER: ParticipantId = ParticipantId(0x0100_0002);
const LISTENER: ParticipantId = ParticipantId(0x0200_0001);
const LISTENER_AGAIN: ParticipantId = ParticipantId(0x0200_0002);
const VISITOR: ParticipantId = ParticipantId(0x0300_0001);

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Peer {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: ControlDecoder,
    request: u64,
    nonce: u64,
    _endpoint: quinn::Endpoint,
}

impl Peer {
    async fn hello(tls: &MtlsMaterial, origin: SocketAddr, peer: PeerKind, id: &str) -> Peer {
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config().unwrap())
                .unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let mut conn = None;
        for _ in 0..50 {
            if let Ok(connecting) = endpoint.connect(origin, ORIGIN_NAME) {
                if let Ok(Ok(c)) = timeout(Duration::from_secs(2), connecting).await {
                    conn = Some(c);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let conn = conn.expect("cannot connect to the origin");
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut p = Peer {
            conn,
            send,
            recv,
            decoder: ControlDecoder::default(),
            request: 0,
            nonce: 0,
            _endpoint: endpoint,
        };
        p.send_msg(&ControlMessage::Hello {
            peer,
            id: id.into(),
            region: id.trim_start_matches("edge-").into(),
        })
        .await;
        assert_eq!(
            p.next().await,
            Some(ControlMessage::Welcome {
                origin: "origin-rooms".into()
            })
        );
        p
    }

    async fn send_msg(&mut self, m: &ControlMessage) {
        self.send.write_all(&m.to_record()).await.unwrap();
    }

    /// Next control message, or None when the stream ends or nothing comes within 5 s.
    async fn next(&mut self) -> Option<ControlMessage> {
        let mut buf = [0u8; 4096];
        for _ in 0..100 {
            if let Some(m) = self.decoder.next_message().unwrap() {
                return Some(m);
            }
            match timeout(Duration::from_secs(5), self.recv.read(&mut buf)).await {
                Ok(Ok(Some(n))) => self.decoder.feed(&buf[..n]),
                _ => return None,
            }
        }
        None
    }

    /// Send a room command on behalf of `actor`; returns its request id.
    async fn command(&mut self, actor: ParticipantId, command: RoomCommand) -> u64 {
        self.request += 1;
        let request = self.request;
        self.send_msg(&ControlMessage::RoomCommand {
            room: ROOM,
            actor,
            request,
            command,
        })
        .await;
        request
    }

    /// The next message must be `RoomEvents` for the room with exactly `events`.
    async fn expect_events(&mut self, events: Vec<RoomEvent>) {
        assert_eq!(
            self.next().await,
            Some(ControlMessage::RoomEvents { room: ROOM, events })
        );
    }

    /// The next message must be a refusal of `request` with `code`.
    async fn expect_rejected(&mut self, actor: ParticipantId, request: u64, code: &str) {
        match self.next().await {
            Some(ControlMessage::CommandRejected {
                room,
                actor: a,
                request: r,
                code: c,
                message,
            }) => {
                assert_eq!((room, a, r, c.as_str()), (ROOM, actor, request, code));
                assert!(!message.is_empty());
            }
            other => panic!("expected {code} rejection, got {other:?}"),
        }
    }

    /// Round trip a ping: nothing else was queued for this peer before the pong.
    async fn expect_nothing_more(&mut self) {
        self.nonce += 1;
        let nonce = self.nonce;
        self.send_msg(&ControlMessage::Ping { nonce }).await;
        assert_eq!(self.next().await, Some(ControlMessage::Pong { nonce }));
    }

    async fn subscribe(&mut self) {
        self.send_msg(&ControlMessage::SubscribeRoom { room: ROOM })
            .await;
    }
}

fn join(user: &str, role: Role, region: &str) -> RoomCommand {
    RoomCommand::Join {
        user: user.into(),
        name: format!("{user} name"),
        role,
        region: region.into(),
        resume: None,
    }
}

fn datagram(speaker: ParticipantId, seq: u16) -> Bytes {
    let mut d = Vec::new();
    RelayFrame {
        kind: FrameKind::SpeakerAudio,
        room: ROOM,
        speaker: speaker.0,
        seq,
        rtp_ts: u32::from(seq) * 960,
        audio_level: 30,
        // An Opus TOC byte for a 20 ms SILK frame, then a little payload.
        payload: &[0x08, 0x00, 0x00],
    }
    .encode_to_vec(&mut d)
    .unwrap();
    Bytes::from(d)
}

async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_authority_over_two_edges() {
    let pki = DevPki::generate().unwrap();
    let quic = free_udp();
    let metrics = free_tcp();
    let shutdown = CancellationToken::new();
    let origin = tokio::spawn(run(
        OriginSetup {
            config: OriginConfig {
                id: "origin-rooms".into(),
                quic_listen: quic,
                metrics_listen: metrics,
                idle_room_timeout_secs: 3600,
                max_sessions_per_user: 8,
            },
            mesh_tls: pki.issue(ORIGIN_NAME, MeshRole::Origin).unwrap(),
        },
        shutdown.clone(),
    ));
    let mut packager = Peer::hello(
        &pki.issue("packager", MeshRole::Packager).unwrap(),
        quic,
        PeerKind::Packager,
        "pkg-1",
    )
    .await;
    packager.expect_nothing_more().await;
    let mut us = Peer::hello(
        &pki.issue("edge-us", MeshRole::Edge).unwrap(),
        quic,
        PeerKind::Edge,
        "edge-us-east",
    )
    .await;
    let mut eu = Peer::hello(
        &pki.issue("edge-eu", MeshRole::Edge).unwrap(),
        quic,
        PeerKind::Edge,
        "edge-eu-west",
    )
    .await;

    // A command for a room nobody joined.
    let r = us.command(HOST, RoomCommand::RaiseHand).await;
    us.expect_rejected(HOST, r, "not_found").await;

    // The host joins in us-east: events, then the snapshot that includes them.
    us.subscribe().await;
    us.command(HOST, join("hana", Role::Host, "us-east")).await;
    let host = match us.next().await {
        Some(ControlMessage::RoomEvents { room, mut events }) if room == ROOM => {
            match events.pop() {
                Some(RoomEvent::ParticipantJoined { participant }) if events.is_empty() => {
                    participant
                }
                other => panic!("unexpected events {other:?}"),
            }
        }
        other => panic!("expected RoomEvents, got {other:?}"),
    };
    assert_eq!(
        (host.id, host.role, host.muted),
        (HOST, RoomRole::Host, false)
    );
    assert_eq!(host.user, "hana");
    match us.next().await {
        Some(ControlMessage::RoomSnapshot { state, more: false }) => {
            assert_eq!(state.room, ROOM);
            assert_eq!(state.phase, RoomPhase::Live);
            assert_eq!(state.participants, vec![host.clone()]);
        }
        other => panic!("expected RoomSnapshot, got {other:?}"),
    }
    // The packager hears of the live room before any media (so it can hold players' blocking
    // reloads), and so does a packager that connects later.
    assert_eq!(
        packager.next().await,
        Some(ControlMessage::RoomOpened { room: ROOM })
    );
    let mut late_packager = Peer::hello(
        &pki.issue("packager-2", MeshRole::Packager).unwrap(),
        quic,
        PeerKind::Packager,
        "pkg-2",
    )
    .await;
    assert_eq!(
        late_packager.next().await,
        Some(ControlMessage::RoomOpened { room: ROOM })
    );

    // A listener joins in eu-west (without subscribing first: the join subscribes): both edges
    // get the event, the joining edge then gets the snapshot with both participants.
    eu.command(LISTENER, join("lena", Role::Listener, "eu-west"))
        .await;
    let joined = |id: ParticipantId, user: &str, role: RoomRole, region: &str| {
        RoomEvent::ParticipantJoined {
            participant: amphi_protocol::room::Participant {
                id,
                user: user.into(),
                name: format!("{user} name"),
                role,
                region: region.into(),
                muted: false,
            },
        }
    };
    let lena = joined(LISTENER, "lena", RoomRole::Listener, "eu-west");
    eu.expect_events(vec![lena.clone()]).await;
    match eu.next().await {
        Some(ControlMessage::RoomSnapshot { state, more: false }) => {
            let ids: Vec<_> = state.participants.iter().map(|p| p.id).collect();
            assert_eq!(ids, vec![HOST, LISTENER]);
        }
        other => panic!("expected RoomSnapshot, got {other:?}"),
    }
    us.expect_events(vec![lena]).await;
    us.command(SPEAKER, join("sam", Role::Speaker, "us-east"))
        .await;
    let sam = joined(SPEAKER, "sam", RoomRole::Speaker, "us-east");
    // The us edge holds the room's state since its first join: its second join gets the
    // events only, no second snapshot (the next record it gets is the hand below).
    us.expect_events(vec![sam.clone()]).await;
    eu.expect_events(vec![sam]).await;

    // The listener raises a hand; everyone sees it.
    eu.command(LISTENER, RoomCommand::RaiseHand).await;
    let raised = vec![RoomEvent::HandRaised { id: LISTENER }];
    eu.expect_events(raised.clone()).await;
    us.expect_events(raised).await;

    // A speaker may not promote: refused to its edge only, nothing broadcast.
    let promote = RoomCommand::Promote {
        target: LISTENER,
        role: RoomRole::Speaker,
    };
    let r = us.command(SPEAKER, promote.clone()).await;
    us.expect_rejected(SPEAKER, r, "forbidden").await;
    eu.expect_nothing_more().await;
    // An edge cannot act for a participant another edge announced.
    let r = eu.command(HOST, promote.clone()).await;
    eu.expect_rejected(HOST, r, "not_found").await;
    us.expect_nothing_more().await;
    // The host may.
    us.command(HOST, promote).await;
    let promoted = vec![
        RoomEvent::RoleChanged {
            id: LISTENER,
            role: RoomRole::Speaker,
            by: HOST,
        },
        RoomEvent::HandLowered { id: LISTENER },
    ];
    us.expect_events(promoted.clone()).await;
    eu.expect_events(promoted).await;

    // The promoted listener's audio reaches us-east; once the host mutes it, it does not.
    eu.conn.send_datagram(datagram(LISTENER, 1)).unwrap();
    let relayed = timeout(Duration::from_secs(5), us.conn.read_datagram())
        .await
        .expect("unmuted speaker not relayed")
        .unwrap();
    assert_eq!(relayed, datagram(LISTENER, 1));
    us.command(
        HOST,
        RoomCommand::Mute {
            target: Some(LISTENER),
        },
    )
    .await;
    let muted = vec![RoomEvent::Muted {
        id: LISTENER,
        by: HOST,
    }];
    us.expect_events(muted.clone()).await;
    eu.expect_events(muted).await;
    for seq in 2..7 {
        eu.conn.send_datagram(datagram(LISTENER, seq)).unwrap();
    }
    let name = "amphi_origin_relay_dropped_total{reason=\"not_audible\"}";
    let mut dropped = 0.0;
    for _ in 0..50 {
        dropped = metric(metrics, name).await;
        if dropped >= 5.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dropped, 5.0, "muted speaker's datagrams not dropped");
    assert!(
        timeout(Duration::from_millis(300), us.conn.read_datagram())
            .await
            .is_err(),
        "muted speaker relayed"
    );

    // The host kicks the (muted) speaker: everyone sees it leave; its user is banned.
    us.command(HOST, RoomCommand::Kick { target: LISTENER })
        .await;
    let kicked = vec![
        RoomEvent::Kicked {
            id: LISTENER,
            by: HOST,
        },
        RoomEvent::ParticipantLeft { id: LISTENER },
    ];
    us.expect_events(kicked.clone()).await;
    eu.expect_events(kicked).await;
    // Then every edge is told to revoke the kicked user's tokens.
    for edge in [&mut us, &mut eu] {
        match edge.next().await {
            Some(ControlMessage::Revoke { room, user }) => {
                assert_eq!((room, user.as_str()), (ROOM, "lena"));
            }
            other => panic!("expected a revoke, got {other:?}"),
        }
    }
    let r = eu
        .command(LISTENER_AGAIN, join("lena", Role::Listener, "eu-west"))
        .await;
    eu.expect_rejected(LISTENER_AGAIN, r, "banned").await;
    us.expect_nothing_more().await;

    // A third edge's participant leaves when that edge disconnects.
    let mut visitor_edge = Peer::hello(
        &pki.issue("edge-ap", MeshRole::Edge).unwrap(),
        quic,
        PeerKind::Edge,
        "edge-ap-south",
    )
    .await;
    // A newly connected edge first learns the live bans.
    assert!(matches!(
        visitor_edge.next().await,
        Some(ControlMessage::Revoke { user, .. }) if user == "lena"
    ));
    visitor_edge
        .command(VISITOR, join("vic", Role::Listener, "ap-south"))
        .await;
    let vic = joined(VISITOR, "vic", RoomRole::Listener, "ap-south");
    visitor_edge.expect_events(vec![vic.clone()]).await;
    assert!(matches!(
        visitor_edge.next().await,
        Some(ControlMessage::RoomSnapshot { .. })
    ));
    us.expect_events(vec![vic.clone()]).await;
    eu.expect_events(vec![vic]).await;
    visitor_edge.conn.close(0u32.into(), b"bye");
    let left = vec![RoomEvent::ParticipantLeft { id: VISITOR }];
    us.expect_events(left.clone()).await;
    eu.expect_events(left).await;

    // Only the host ends the room; then every edge, the packager and the room hear of it.
    let r = us.command(SPEAKER, RoomCommand::End).await;
    us.expect_rejected(SPEAKER, r, "forbidden").await;
    us.command(HOST, RoomCommand::End).await;
    for edge in [&mut us, &mut eu] {
        edge.expect_events(vec![RoomEvent::Ended { by: Some(HOST) }])
            .await;
        assert_eq!(
            edge.next().await,
            Some(ControlMessage::RoomEnded { room: ROOM })
        );
    }
    let mut packager_told = false;
    for _ in 0..5 {
        match packager.next().await {
            Some(ControlMessage::RoomEnded { room }) if room == ROOM => {
                packager_told = true;
                break;
            }
            Some(ControlMessage::RoomOpened { room }) => {
                panic!("{room} announced again after more joins")
            }
            Some(_) => continue,
            None => break,
        }
    }
    assert!(packager_told, "packager did not get RoomEnded");
    let r = eu
        .command(
            ParticipantId(0x0200_0003),
            join("late", Role::Listener, "eu-west"),
        )
        .await;
    eu.expect_rejected(ParticipantId(0x0200_0003), r, "room_ended")
        .await;
    let r = us
        .command(
            HOST,
            RoomCommand::Chat {
                text: "hello?".into(),
            },
        )
        .await;
    us.expect_rejected(HOST, r, "room_ended").await;

    // Applied: 4 joins, raise hand, promote, mute, kick, end (the disconnect's leave is internal).
    assert_eq!(
        metric(metrics, "amphi_origin_room_commands_total").await,
        9.0
    );
    assert_eq!(
        metric(metrics, "amphi_origin_room_commands_rejected_total").await,
        7.0
    );

    shutdown.cancel();
    timeout(Duration::from_secs(10), origin)
        .await
        .expect("origin did not stop")
        .unwrap()
        .unwrap();
}

/// A room far past what one 64 KiB control record can hold: 2,000 participants joined through
/// one edge get one small snapshot and then events only (before: a full snapshot per join, over
/// the record limit from about 400 participants, which made the edge drop its link); a second
/// edge joining late gets the whole room split into records under the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_of_2000_never_needs_an_oversized_record() {
    use amphi_protocol::control::{SnapshotAssembler, MAX_CONTROL_LEN};
    const N: u32 = 2_000;
    let pki = DevPki::generate().unwrap();
    let quic = free_udp();
    let shutdown = CancellationToken::new();
    let origin = tokio::spawn(run(
        OriginSetup {
            config: OriginConfig {
                id: "origin-rooms".into(),
                quic_listen: quic,
                metrics_listen: free_tcp(),
                idle_room_timeout_secs: 3600,
                max_sessions_per_user: 8,
            },
            mesh_tls: pki.issue(ORIGIN_NAME, MeshRole::Origin).unwrap(),
        },
        shutdown.clone(),
    ));
    let mut us = Peer::hello(
        &pki.issue("edge-us", MeshRole::Edge).unwrap(),
        quic,
        PeerKind::Edge,
        "edge-us-east",
    )
    .await;
    let mut eu = Peer::hello(
        &pki.issue("edge-eu", MeshRole::Edge).unwrap(),
        quic,
        PeerKind::Edge,
        "edge-eu-west",
    )
    .await;
    let mut batch = Vec::new();
    for i in 0..N {
        let user = format!("listener-{i}-{}", "x".repeat(40));
        let command = ControlMessage::RoomCommand {
            room: ROOM,
            actor: ParticipantId(0x0100_0000 + i),
            request: u64::from(i) + 1,
            command: join(&user, Role::Listener, "us-east"),
        };
        batch.extend(command.to_record());
    }
    us.send.write_all(&batch).await.unwrap();
    let (mut events, mut snapshots) = (0, 0);
    while events < N {
        // The decoder refuses any record over the limit: `next` would panic.
        match us.next().await {
            Some(ControlMessage::RoomEvents { events: e, .. }) => events += e.len() as u32,
            Some(ControlMessage::RoomSnapshot { state, more: false }) => {
                snapshots += 1;
                assert_eq!(state.participants.len(), 1, "only the first join's");
            }
            other => panic!("after {events} joins: {other:?}"),
        }
    }
    us.expect_nothing_more().await;
    assert_eq!(snapshots, 1, "one snapshot for the edge, not one per join");

    // A late edge gets the whole room in records under the limit.
    let late = ParticipantId(0x0200_0001);
    eu.command(late, join("late", Role::Listener, "eu-west"))
        .await;
    assert!(matches!(
        eu.next().await,
        Some(ControlMessage::RoomEvents { .. })
    ));
    let mut asm = SnapshotAssembler::default();
    let mut records = 0;
    let state = loop {
        let done = match eu.next().await {
            Some(
                m @ (ControlMessage::RoomSnapshot { .. } | ControlMessage::RoomSnapshotPart { .. }),
            ) => asm.feed(m).expect("within the limits"),
            other => panic!("expected the snapshot, got {other:?}"),
        };
        records += 1;
        if let Some(state) = done {
            break state;
        }
    };
    assert!(records > 1, "{N} participants do not fit one record");
    assert_eq!(state.participants.len(), N as usize + 1);
    assert!(serde_json::to_vec(&state).unwrap().len() > 2 * MAX_CONTROL_LEN);
    eu.expect_nothing_more().await;
    // The first edge kept its link and hears the late join.
    assert!(matches!(
        us.next().await,
        Some(ControlMessage::RoomEvents { .. })
    ));
    us.expect_nothing_more().await;
    shutdown.cancel();
    let _ = origin.await;
}
