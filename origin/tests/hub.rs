//! End to end: a real origin on loopback, quinn "edge" and "packager" clients with dev mTLS.

use amphi_common::mtls::{DevPki, MeshRole, MtlsMaterial};
use amphi_origin::{run, OriginSetup};
use amphi_protocol::config::OriginConfig;
use amphi_protocol::control::{ControlDecoder, ControlMessage, PeerKind, MAX_PROGRAM_RECORD_LEN};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::{ParticipantId, RoomId};
use bytes::Bytes;
use std::f32::consts::TAU;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const ORIGIN_NAME: &str = "origin.amphi.internal";
const ROOM: RoomId = RoomId(0x00ab_cdef_0123_4567);
const SPEAKER: u32 = 0x0100_0001;
const SILENT_PACKETS: usize = 50;

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
    _endpoint: quinn::Endpoint,
}

impl Peer {
    async fn connect(
        tls: &MtlsMaterial,
        origin: SocketAddr,
    ) -> (quinn::Endpoint, quinn::Connection) {
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config().unwrap())
                .unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        for _ in 0..50 {
            if let Ok(connecting) = endpoint.connect(origin, ORIGIN_NAME) {
                if let Ok(Ok(conn)) = timeout(Duration::from_secs(2), connecting).await {
                    return (endpoint, conn);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot connect to the origin");
    }

    async fn hello(tls: &MtlsMaterial, origin: SocketAddr, peer: PeerKind, id: &str) -> Peer {
        let (endpoint, conn) = Self::connect(tls, origin).await;
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut p = Peer {
            conn,
            send,
            recv,
            decoder: ControlDecoder::default(),
            _endpoint: endpoint,
        };
        p.send_msg(&ControlMessage::Hello {
            peer,
            id: id.into(),
            region: "us-east".into(),
        })
        .await;
        assert_eq!(
            p.next().await,
            Some(ControlMessage::Welcome {
                origin: "origin-test".into()
            })
        );
        p
    }

    async fn send_msg(&mut self, m: &ControlMessage) {
        self.send.write_all(&m.to_record()).await.unwrap();
    }

    /// Next control message, or None when the stream ends or nothing comes within 5 s.
    async fn next(&mut self) -> Option<ControlMessage> {
        let mut buf = [0u8; 2048];
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

    /// Round trip a ping: everything sent before has been applied by the origin.
    async fn sync(&mut self, nonce: u64) {
        self.send_msg(&ControlMessage::Ping { nonce }).await;
        assert_eq!(self.next().await, Some(ControlMessage::Pong { nonce }));
    }
}

fn tone_packets(freq: f32, frames: usize) -> Vec<Vec<u8>> {
    let mut enc =
        opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio).unwrap();
    enc.set_bitrate(opus::Bitrate::Bits(32_000)).unwrap();
    let mut pcm = vec![0f32; 960];
    (0..frames)
        .map(|f| {
            for (i, x) in pcm.iter_mut().enumerate() {
                *x = 0.4 * (TAU * freq * (f * 960 + i) as f32 / 48_000.0).sin();
            }
            enc.encode_vec_float(&pcm, 1275).unwrap()
        })
        .collect()
}

fn goertzel(samples: &[f32], freq: f32) -> f32 {
    let coeff = 2.0 * (TAU * freq / 48_000.0).cos();
    let (mut s1, mut s2) = (0f32, 0f32);
    for &x in samples {
        let s0 = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

struct ProgramFrameOwned {
    received: tokio::time::Instant,
    kind: FrameKind,
    room: RoomId,
    speaker: u32,
    rtp_ts: u32,
    seq: u16,
    payload: Vec<u8>,
}

/// Read up to `n` program records from a stream (bounded by `limit`).
async fn read_program(
    stream: &mut quinn::RecvStream,
    n: usize,
    limit: Duration,
) -> Vec<ProgramFrameOwned> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while out.len() < n {
        let mut len = [0u8; 4];
        match tokio::time::timeout_at(deadline, stream.read_exact(&mut len)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
        let len = u32::from_le_bytes(len) as usize;
        assert!(
            len > 0 && len <= MAX_PROGRAM_RECORD_LEN,
            "record length {len}"
        );
        let mut body = vec![0u8; len];
        tokio::time::timeout_at(deadline, stream.read_exact(&mut body))
            .await
            .unwrap()
            .unwrap();
        let f = RelayFrame::decode(&body).unwrap();
        out.push(ProgramFrameOwned {
            received: tokio::time::Instant::now(),
            kind: f.kind,
            room: f.room,
            speaker: f.speaker,
            rtp_ts: f.rtp_ts,
            seq: f.seq,
            payload: f.payload.to_vec(),
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_packager_relay_mix_and_metrics() {
    let pki = DevPki::generate().unwrap();
    let quic = free_udp();
    let metrics_addr = free_tcp();
    let shutdown = CancellationToken::new();
    let origin = tokio::spawn(run(
        OriginSetup {
            config: OriginConfig {
                id: "origin-test".into(),
                quic_listen: quic,
                metrics_listen: metrics_addr,
                idle_room_timeout_secs: 3600,
                max_sessions_per_user: 8,
            },
            mesh_tls: pki.issue(ORIGIN_NAME, MeshRole::Origin).unwrap(),
        },
        shutdown.clone(),
    ));

    // A packager first, then two edges subscribed to the room.
    let mut packager = Peer::hello(
        &pki.issue("packager", MeshRole::Packager).unwrap(),
        quic,
        PeerKind::Packager,
        "pkg-1",
    )
    .await;
    packager.sync(1).await;
    let mut edge1 = Peer::hello(
        &pki.issue("edge-1", MeshRole::Edge).unwrap(),
        quic,
        PeerKind::Edge,
        "edge-1",
    )
    .await;
    let mut edge2 = Peer::hello(
        &pki.issue("edge-2", MeshRole::Edge).unwrap(),
        quic,
        PeerKind::Edge,
        "edge-2",
    )
    .await;
    for (e, nonce) in [(&mut edge1, 2), (&mut edge2, 3)] {
        e.send_msg(&ControlMessage::SubscribeRoom { room: ROOM })
            .await;
        e.sync(nonce).await;
    }
    edge1
        .send_msg(&ControlMessage::SpeakerJoined {
            room: ROOM,
            speaker: ParticipantId(SPEAKER),
            name: "ada".into(),
            region: "us-east".into(),
        })
        .await;
    edge1.sync(4).await;

    // The program stream opens as soon as the room runs.
    let mut program = timeout(Duration::from_secs(5), packager.conn.accept_uni())
        .await
        .expect("program stream")
        .unwrap();

    // ~100 speaker packets at real-time pace, plus malformed datagrams.
    // One second of silence (the jitter buffer settles), then two seconds of 440 Hz.
    let mut packets = tone_packets(440.0, 150);
    for p in packets.iter_mut().take(SILENT_PACKETS) {
        *p = tone_packets(0.0, 1).remove(0);
    }
    let reader = tokio::spawn(async move {
        let frames = read_program(&mut program, 200, Duration::from_secs(8)).await;
        (program, frames)
    });
    let mut first_tone_sent = None;
    let mut sent = Vec::new();
    let sender = edge1.conn.clone();
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    for (i, p) in packets.iter().enumerate() {
        pace.tick().await;
        let mut d = Vec::new();
        RelayFrame {
            kind: FrameKind::SpeakerAudio,
            room: ROOM,
            speaker: SPEAKER,
            seq: 1000 + i as u16,
            rtp_ts: 0xffff_0000u32.wrapping_add(i as u32 * 960),
            audio_level: 20,
            payload: p,
        }
        .encode_to_vec(&mut d)
        .unwrap();
        let d = Bytes::from(d);
        sender.send_datagram(d.clone()).unwrap();
        if i == SILENT_PACKETS {
            first_tone_sent = Some(tokio::time::Instant::now());
        }
        sent.push(d);
        if i == 50 {
            sender.send_datagram(Bytes::from_static(b"short")).unwrap();
            let mut bad_version = sent[0].to_vec();
            bad_version[0] = 9;
            sender.send_datagram(Bytes::from(bad_version)).unwrap();
            let mut program_kind = sent[0].to_vec();
            program_kind[1] = FrameKind::Program as u8;
            sender.send_datagram(Bytes::from(program_kind)).unwrap();
        }
    }

    // The other edge gets every speaker packet, unchanged.
    let mut relayed = Vec::new();
    while relayed.len() < sent.len() {
        match timeout(Duration::from_secs(2), edge2.conn.read_datagram()).await {
            Ok(Ok(d)) => relayed.push(d),
            _ => break,
        }
    }
    assert!(
        relayed.len() >= 95,
        "relayed {} of {}",
        relayed.len(),
        sent.len()
    );
    assert!(relayed.iter().all(|d| sent.contains(d)));
    // The sender does not get its own packets back.
    assert!(
        timeout(Duration::from_millis(300), edge1.conn.read_datagram())
            .await
            .is_err(),
        "sender received its own datagram"
    );

    // The program: continuous frames with a dominant 440 Hz while the speaker talks.
    let (mut program, frames) = reader.await.unwrap();
    assert!(frames.len() >= 180, "got {} program frames", frames.len());
    for w in frames.windows(2) {
        assert_eq!(w[1].rtp_ts, w[0].rtp_ts.wrapping_add(960));
        assert_eq!(w[1].seq, w[0].seq.wrapping_add(1));
    }
    assert!(frames
        .iter()
        .all(|f| f.kind == FrameKind::Program && f.room == ROOM));
    let mut dec = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
    let mut pcm = Vec::new();
    let mut buf = vec![0f32; 5760];
    let mut talking = Vec::new();
    for f in &frames {
        let n = dec.decode_float(&f.payload, &mut buf, false).unwrap();
        if f.speaker == SPEAKER {
            talking.push(pcm.len()..pcm.len() + n);
        }
        pcm.extend_from_slice(&buf[..n]);
    }
    // Ingest-to-program latency, printed for the reader only: a shared machine makes any bound
    // on it flaky. The jitter buffer's adaptation is unit-tested in simulated time
    // (`origin/src/jitter.rs`) and the latency is a benchmark (`amphi-tools bench latency`).
    let first_talking = frames.iter().find(|f| f.speaker == SPEAKER).unwrap();
    let latency = first_talking.received - first_tone_sent.unwrap();
    println!("ingest -> program latency: {latency:?}");
    assert!(
        talking.len() >= 90,
        "speaker marked in {} frames",
        talking.len()
    );
    let mid = talking[10].start..talking[talking.len() - 10].end;
    let audio = &pcm[mid];
    let p440 = goertzel(audio, 440.0);
    for other in [330.0, 550.0, 660.0, 880.0] {
        assert!(
            p440 > 50.0 * goertzel(audio, other),
            "440 Hz not dominant over {other}"
        );
    }

    // Metrics count the malformed datagrams and the traffic.
    let text = http_get(metrics_addr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for reason in ["too_short", "version", "wrong_kind"] {
        assert_eq!(
            metric(
                &text,
                &format!("amphi_origin_relay_dropped_total{{reason=\"{reason}\"}}")
            ),
            1.0,
            "{reason}"
        );
    }
    assert!(metric(&text, "amphi_origin_relay_datagrams_received_total") >= 153.0);
    assert!(metric(&text, "amphi_origin_relay_datagrams_forwarded_total") >= 140.0);
    assert_eq!(metric(&text, "amphi_origin_connected_edges"), 2.0);
    assert_eq!(metric(&text, "amphi_origin_connected_packagers"), 1.0);
    assert_eq!(metric(&text, "amphi_origin_rooms_running"), 1.0);
    assert!(metric(&text, "amphi_origin_program_frames_sent_total") >= 180.0);
    assert!(metric(&text, "amphi_origin_mixer_cpu_seconds_total") > 0.0);
    let room_cpu = format!("amphi_origin_room_mixer_cpu_seconds_total{{room=\"{ROOM}\"}}");
    assert!(metric(&text, &room_cpu) > 0.0, "per-room mixer CPU");
    assert!(http_get(metrics_addr, "/nope")
        .await
        .starts_with("HTTP/1.1 404"));

    // A malformed control record: Error, then the connection is closed and counted.
    let mut rogue = Peer::hello(
        &pki.issue("edge-3", MeshRole::Edge).unwrap(),
        quic,
        PeerKind::Edge,
        "edge-3",
    )
    .await;
    let mut garbage = Vec::new();
    amphi_protocol::control::write_record(b"{not json", &mut garbage);
    rogue.send.write_all(&garbage).await.unwrap();
    assert!(matches!(
        rogue.next().await,
        Some(ControlMessage::Error { .. })
    ));
    let closed = timeout(Duration::from_secs(5), rogue.conn.closed()).await;
    assert!(closed.is_ok(), "rogue connection not closed");
    let text = http_get(metrics_addr, "/metrics").await;
    assert_eq!(metric(&text, "amphi_origin_control_errors_total"), 1.0);

    // RoomEnded from an edge reaches the packager and finishes the program stream.
    edge1
        .send_msg(&ControlMessage::RoomEnded { room: ROOM })
        .await;
    let mut ended = false;
    for _ in 0..5 {
        match packager.next().await {
            Some(ControlMessage::RoomEnded { room }) if room == ROOM => {
                ended = true;
                break;
            }
            Some(_) => continue,
            None => break,
        }
    }
    assert!(ended, "packager did not get RoomEnded");
    assert_eq!(
        edge2.next().await,
        Some(ControlMessage::RoomEnded { room: ROOM }),
        "subscribed edge not told"
    );
    // read_to_end only succeeds once the origin finished the stream.
    timeout(Duration::from_secs(5), program.read_to_end(10 << 20))
        .await
        .expect("program stream not finished")
        .expect("program stream reset instead of finished");

    shutdown.cancel();
    timeout(Duration::from_secs(10), origin)
        .await
        .expect("origin did not stop")
        .unwrap()
        .unwrap();
}
