//! `amphi-tools bench relay`: the origin's relay forwarding delay while one big room is busy.
//!
//! An origin runs in this process (durable room state in Redis with `--redis-url`), with four
//! QUIC "edges" (dev mTLS): edge A announces a speaker in a small room and sends it a relay
//! datagram every 2 ms carrying its send time; edge B subscribes to that room and times each
//! forwarded datagram (send → received, same clock). Edges C and D join `--members`
//! participants (half each) to one big room. Three phases of `--seconds` each: the big room
//! idle; every member chatting at the per-user limit (5 messages per 10 s, so 10,000 members
//! send 5,000 messages/s, each broadcast to C and D); churn: edge D drops its link (the origin
//! makes its half of the members leave) and reconnects, re-joining them, over and over. It
//! prints p50/p99/max of the delay in each phase and the ratios to the idle phase.
//!
//! Meanwhile a listener of the small room (through edge B) raises and lowers its hand, one
//! command at a time every 20 ms, and B times each command until its event comes back: the
//! small room's control round trip, idle against chatting and churning, shows whether the big
//! room's commands hold up another room's (they do when all rooms share one lock).
//!
//! Bounded: the counts and durations come from the options; every wait has a deadline.

use amphi_common::mtls::{DevPki, MeshRole, MtlsMaterial};
use amphi_protocol::config::OriginConfig;
use amphi_protocol::control::{ControlDecoder, ControlMessage, PeerKind};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::room::{RoomCommand, RoomEvent};
use amphi_protocol::token::Role;
use amphi_protocol::{ParticipantId, RoomId};
use amphi_testkit::net::free_port;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const ORIGIN_NAME: &str = "origin.amphi.internal";
const QUIET: RoomId = RoomId(0x0000_0000_0000_0a01);
const BIG: RoomId = RoomId(0x0000_0000_0000_0b16);
const SPEAKER: u32 = 1;
/// The small room's listener whose hand goes up and down.
const LISTENER: u32 = 2;
/// One hand command in the small room every this long during a phase.
const HAND_EVERY: Duration = Duration::from_millis(20);
/// One relay datagram every this long during a phase.
const SEND_EVERY: Duration = Duration::from_millis(2);
/// Chat pacing tick.
const CHAT_TICK: Duration = Duration::from_millis(10);
/// Per-user chat limit of the origin's rooms (messages per window).
const CHAT_PER_WINDOW: u64 = 5;
const CHAT_WINDOW: Duration = Duration::from_secs(10);

/// Options of `amphi-tools bench relay`.
#[derive(Args, Debug)]
pub struct RelayArgs {
    /// Members of the big room.
    #[arg(long, default_value_t = 10_000)]
    members: u32,
    /// Seconds per phase (idle, chatting, churning).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Keep room state in this Redis (`redis://127.0.0.1:6379/0`), as production origins do.
    #[arg(long)]
    redis_url: Option<String>,
    /// Short run for CI: 1,000 members, 2 s per phase.
    #[arg(long)]
    smoke: bool,
}

/// One mesh connection to the origin: its control stream's sending half and the connection.
struct Edge {
    conn: quinn::Connection,
    send: quinn::SendStream,
    _endpoint: quinn::Endpoint,
}

impl Edge {
    /// Connect, say hello, and drain the control stream in a task (counting `RoomEvents`).
    async fn connect(
        tls: &MtlsMaterial,
        origin: SocketAddr,
        id: &str,
        events: Arc<AtomicU64>,
        hands: Option<mpsc::UnboundedSender<Instant>>,
    ) -> Result<Edge> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config()?)?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let mut conn = None;
        for _ in 0..50 {
            if let Ok(connecting) = endpoint.connect(origin, ORIGIN_NAME) {
                if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), connecting).await {
                    conn = Some(c);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let conn = conn.context("cannot connect to the origin")?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = ControlMessage::Hello {
            peer: PeerKind::Edge,
            id: id.into(),
            region: "us-east".into(),
        };
        send.write_all(&hello.to_record()).await?;
        tokio::spawn(async move {
            let mut decoder = ControlDecoder::default();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                decoder.feed(&buf[..n]);
                while let Ok(Some(m)) = decoder.next_message() {
                    if let ControlMessage::RoomEvents { room, events: e } = m {
                        events.fetch_add(e.len() as u64, Relaxed);
                        let hand = |e: &RoomEvent| {
                            matches!(
                                e,
                                RoomEvent::HandRaised { .. } | RoomEvent::HandLowered { .. }
                            )
                        };
                        if let Some(hands) = hands.as_ref().filter(|_| room == QUIET) {
                            if e.iter().any(hand) {
                                let _ = hands.send(Instant::now());
                            }
                        }
                    }
                }
            }
        });
        Ok(Edge {
            conn,
            send,
            _endpoint: endpoint,
        })
    }

    async fn command(&mut self, room: RoomId, actor: u32, command: RoomCommand) -> Result<()> {
        let m = ControlMessage::RoomCommand {
            room,
            actor: ParticipantId(actor),
            request: 0,
            command,
        };
        self.send.write_all(&m.to_record()).await?;
        Ok(())
    }
}

fn join(user: String, role: Role) -> RoomCommand {
    RoomCommand::Join {
        name: user.clone(),
        user,
        role,
        region: "us-east".into(),
        resume: None,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Relay delays measured at edge B over one phase, the big room's load meanwhile (chat
/// messages sent, or churn cycles), and the small room's hand command round trips.
struct Phase {
    delays: Vec<Duration>,
    sent: u64,
    load: u64,
    commands: Vec<Duration>,
}

/// Every member of the big room chats at the per-user limit for `length`, round robin over
/// edges C and D, paced per tick; the messages sent.
async fn chat(c: &mut Edge, d: &mut Edge, members: u32, length: Duration) -> Result<u64> {
    let per_sec = u64::from(members) * CHAT_PER_WINDOW / CHAT_WINDOW.as_secs();
    let per_tick = (per_sec * CHAT_TICK.as_millis() as u64 / 1000).max(1);
    let mut tick = tokio::time::interval(CHAT_TICK);
    let end = Instant::now() + length;
    let (mut next, mut sent) = (0u32, 0u64);
    while Instant::now() < end {
        tick.tick().await;
        for _ in 0..per_tick {
            let member = next % members;
            next = next.wrapping_add(1);
            let edge = if member % 2 == 0 { &mut *c } else { &mut *d };
            let text = format!("message {sent}");
            edge.command(BIG, 1000 + member, RoomCommand::Chat { text })
                .await?;
            sent += 1;
        }
    }
    Ok(sent)
}

/// Join the big room's members of edge `d` (the odd ones).
async fn join_odd_members(d: &mut Edge, members: u32) -> Result<()> {
    for m in (1..members).step_by(2) {
        d.command(BIG, 1000 + m, join(format!("user-{m}"), Role::Listener))
            .await?;
    }
    Ok(())
}

/// Edge D drops its link (the origin makes its half of the big room leave) and comes back,
/// re-joining them, again and again for `length`; the cycles done.
async fn churn(
    d: &mut Edge,
    tls: &MtlsMaterial,
    origin: SocketAddr,
    events: &Arc<AtomicU64>,
    members: u32,
    length: Duration,
) -> Result<u64> {
    let end = Instant::now() + length;
    let mut cycles = 0;
    while Instant::now() < end {
        let start = events.load(Relaxed);
        d.conn.close(0u32.into(), b"churn");
        *d = Edge::connect(tls, origin, "edge-d", events.clone(), None).await?;
        join_odd_members(d, members).await?;
        // Until the origin has handled the cycle: C hears every member of D leave and join
        // again, D its members join (or 10 s).
        let handled = Instant::now() + Duration::from_secs(10);
        while events.load(Relaxed) - start < u64::from(members / 2) * 3 && Instant::now() < handled
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cycles += 1;
    }
    Ok(cycles)
}

/// The small room's listener on edge B, and the times B received its hand events.
struct Hands<'a> {
    edge: &'a mut Edge,
    events: &'a mut mpsc::UnboundedReceiver<Instant>,
    raised: bool,
}

impl Hands<'_> {
    /// Raise or lower the hand (alternately), one command at a time, every [`HAND_EVERY`] for
    /// `length`; each command's round trip until its event reaches B.
    async fn run(&mut self, length: Duration) -> Result<Vec<Duration>> {
        let mut tick = tokio::time::interval(HAND_EVERY);
        let end = Instant::now() + length;
        let mut trips = Vec::new();
        while Instant::now() < end {
            tick.tick().await;
            let command = if self.raised {
                RoomCommand::LowerHand { target: None }
            } else {
                RoomCommand::RaiseHand
            };
            let sent = Instant::now();
            self.edge.command(QUIET, LISTENER, command).await?;
            self.raised = !self.raised;
            let back = tokio::time::timeout(Duration::from_secs(10), self.events.recv())
                .await
                .context("a hand command got no event in 10 s")?
                .context("edge B is gone")?;
            trips.push(back.saturating_duration_since(sent));
        }
        trips.sort();
        Ok(trips)
    }
}

/// Send a timed datagram every [`SEND_EVERY`] from `a` for `length`, collecting what `b`
/// receives; if `chatters` is given, the big room's members chat at their limit meanwhile.
async fn phase(
    a: &quinn::Connection,
    b: &quinn::Connection,
    t0: Instant,
    length: Duration,
    load: impl std::future::Future<Output = Result<u64>>,
    hands: &mut Hands<'_>,
) -> Result<Phase> {
    let stop = CancellationToken::new();
    let rx = {
        let b = b.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut delays = Vec::new();
            loop {
                let d = tokio::select! {
                    _ = stop.cancelled() => break,
                    d = b.read_datagram() => match d {
                        Ok(d) => d,
                        Err(_) => break,
                    },
                };
                let now = t0.elapsed();
                if let Ok(f) = RelayFrame::decode(&d) {
                    if let Some(sent) = f.payload.get(..8) {
                        let sent = u64::from_le_bytes(sent.try_into().unwrap_or_default());
                        delays.push(now.saturating_sub(Duration::from_nanos(sent)));
                    }
                }
            }
            delays
        })
    };
    let send = async {
        let mut tick = tokio::time::interval(SEND_EVERY);
        let end = Instant::now() + length;
        let (mut seq, mut buf) = (0u16, Vec::with_capacity(64));
        while Instant::now() < end {
            tick.tick().await;
            let now = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let mut payload = [0u8; 40];
            payload[..8].copy_from_slice(&now.to_le_bytes());
            buf.clear();
            RelayFrame {
                kind: FrameKind::SpeakerAudio,
                room: QUIET,
                speaker: SPEAKER,
                seq,
                rtp_ts: u32::from(seq).wrapping_mul(960),
                audio_level: 30,
                payload: &payload,
            }
            .encode_to_vec(&mut buf)?;
            a.send_datagram(bytes::Bytes::copy_from_slice(&buf))?;
            seq = seq.wrapping_add(1);
        }
        Ok::<u64, anyhow::Error>(u64::from(seq))
    };
    let (sent, load, commands) = tokio::try_join!(send, load, hands.run(length))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let mut delays = rx.await?;
    delays.sort();
    Ok(Phase {
        delays,
        sent,
        load,
        commands,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `amphi-tools bench relay`.
pub async fn run(args: RelayArgs) -> Result<()> {
    let (members, seconds) = if args.smoke {
        (1_000, 2)
    } else {
        (args.members, args.seconds)
    };
    let pki = DevPki::generate()?;
    let quic = free_port()?;
    let shutdown = CancellationToken::new();
    let origin = tokio::spawn(amphi_origin::run_with(
        amphi_origin::OriginSetup {
            config: OriginConfig {
                id: "origin-bench".into(),
                quic_listen: quic,
                metrics_listen: free_port()?,
                idle_room_timeout_secs: 3600,
                max_sessions_per_user: 8,
            },
            mesh_tls: pki.issue(ORIGIN_NAME, MeshRole::Origin)?,
        },
        amphi_origin::OriginOptions {
            redis_url: args.redis_url.clone(),
        },
        shutdown.clone(),
    ));
    let events = Arc::new(AtomicU64::new(0));
    let (hands_tx, mut hands_rx) = mpsc::unbounded_channel();
    let mut edges = Vec::new();
    let mut tls_d = None;
    for name in ["edge-a", "edge-b", "edge-c", "edge-d"] {
        let tls = pki.issue(name, MeshRole::Edge)?;
        let hands = (name == "edge-b").then(|| hands_tx.clone());
        edges.push(Edge::connect(&tls, quic, name, events.clone(), hands).await?);
        tls_d = Some(tls);
    }
    let tls_d = tls_d.context("edge D's certificate")?;
    let [mut a, mut b, mut c, mut d]: [Edge; 4] = edges
        .try_into()
        .map_err(|_| anyhow::anyhow!("four edges"))?;
    // The small room: a speaker through A, B subscribed.
    a.command(QUIET, SPEAKER, join("speaker".into(), Role::Speaker))
        .await?;
    b.send
        .write_all(&ControlMessage::SubscribeRoom { room: QUIET }.to_record())
        .await?;
    b.command(QUIET, LISTENER, join("listener".into(), Role::Listener))
        .await?;
    // The big room: members over C and D.
    let started = Instant::now();
    for m in (0..members).step_by(2) {
        c.command(BIG, 1000 + m, join(format!("user-{m}"), Role::Listener))
            .await?;
    }
    join_odd_members(&mut d, members).await?;
    // Every member's join is broadcast to the big room's edges: wait until they stop coming.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (0, Instant::now());
    loop {
        let n = events.load(Relaxed);
        if n != last.0 {
            last = (n, Instant::now());
        } else if n >= u64::from(members) && last.1.elapsed() > Duration::from_secs(1) {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {n} join events arrived for {members} members");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{members} members joined the big room in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    let length = Duration::from_secs(seconds);
    let b_conn = b.conn.clone();
    let mut hands = Hands {
        edge: &mut b,
        events: &mut hands_rx,
        raised: false,
    };
    let idle = phase(&a.conn, &b_conn, t0, length, async { Ok(0) }, &mut hands).await?;
    let before = events.load(Relaxed);
    let load = chat(&mut c, &mut d, members, length);
    let busy = phase(&a.conn, &b_conn, t0, length, load, &mut hands).await?;
    let chat_events = events.load(Relaxed) - before;
    let load = churn(&mut d, &tls_d, quic, &events, members, length);
    let churning = phase(&a.conn, &b_conn, t0, length, load, &mut hands).await?;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), origin).await;
    let phases = [
        ("big room idle", &idle),
        ("big room chatting", &busy),
        ("big room churning", &churning),
    ];
    for (name, p) in phases {
        if p.delays.len() as u64 * 10 < p.sent * 9 {
            bail!(
                "{name}: only {} of {} datagrams were relayed",
                p.delays.len(),
                p.sent
            );
        }
    }
    let p99 = |p: &Phase| percentile(&p.delays, 0.99);
    for (name, p) in phases {
        println!(
            "{name}: {} of {} datagrams relayed, delay p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            p.delays.len(),
            p.sent,
            ms(percentile(&p.delays, 0.5)),
            ms(p99(p)),
            ms(p.delays.last().copied().unwrap_or_default()),
        );
    }
    for (name, p) in phases {
        println!(
            "{name}: small room's hand command round trip ({} commands) p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            p.commands.len(),
            ms(percentile(&p.commands, 0.5)),
            ms(percentile(&p.commands, 0.99)),
            ms(p.commands.last().copied().unwrap_or_default()),
        );
    }
    println!(
        "chat: {} messages sent ({:.0}/s), {} chat events delivered to the big room's two edges",
        busy.load,
        busy.load as f64 / seconds as f64,
        chat_events
    );
    println!(
        "churn: edge D dropped its link and re-joined its {} members {} times",
        members / 2,
        churning.load
    );
    println!(
        "relay delay p99 chatting / idle: {:.2}x (state {})",
        ms(p99(&busy)) / ms(p99(&idle)).max(1e-6),
        if args.redis_url.is_some() {
            "in Redis"
        } else {
            "in memory"
        }
    );
    let idle_trip = ms(percentile(&idle.commands, 0.99)).max(1e-6);
    println!(
        "small room's command round trip p99 chatting / idle: {:.2}x; churning / idle: {:.2}x",
        ms(percentile(&busy.commands, 0.99)) / idle_trip,
        ms(percentile(&churning.commands, 0.99)) / idle_trip,
    );
    println!(
        "relay delay p99 churning / idle: {:.2}x",
        ms(p99(&churning)) / ms(p99(&idle)).max(1e-6),
    );
    Ok(())
}
