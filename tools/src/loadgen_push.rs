//! `amphi-tools loadgen push`: N push listeners (`/v1/rooms/{room}/push`) on one edge of an
//! `amphi dev` child while a WHIP speaker talks, bounded in count and time, over WebSocket
//! (`--transport websocket`, the default) or WebTransport (`--transport webtransport`).
//!
//! A WebSocket listener is a raw TCP client (the upgrade written by hand); a WebTransport
//! listener opens a session to the route answer's `webtransport_url` (pinning
//! `webtransport_cert_sha256`) and accepts the one unidirectional stream the edge opens, which
//! carries the same bytes. Either way the server frames are parsed with the push format's own
//! decoder and every message is timestamped on arrival. Reported: frames per
//! second delivered, late frames (arriving more than `--late-ms` after their program time, which
//! the stream's header anchors), the arrival delay p50/p99, and the mesh process's CPU per
//! listener per second (its CPU with the listeners minus its CPU with the speaker alone, measured
//! just before). Beside it, over the same seconds (or after the edge run, `--floor after`): the
//! kernel's TCP write floor, the same number of listeners fed messages of the same size at the
//! same rate by a thread that only `write`s them ([`crate::tcp_floor::FloorServer::start_push`]). It is a TCP floor for both transports (for
//! WebTransport it says what the same messages cost a kernel TCP writer, not a QUIC one).

use crate::child_mesh::ChildMesh;
use crate::loadgen_webrtc::{post_json, process_cpu, tone_packets};
use amphi_protocol::api::RouteResponse;
use amphi_protocol::push::{opcode, parse_server_frame, AudioMessage, PushHeader};
use amphi_testkit::whip_client::WhipPublisher;
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Options of `amphi-tools loadgen push`.
#[derive(Args, Debug)]
pub struct PushArgs {
    /// Concurrent push listeners (at most 9,000: this process holds the listeners' and the
    /// floor's sockets within the 20,000 open files the box allows).
    #[arg(long, default_value_t = 2_000)]
    listeners: usize,
    /// Measured seconds (after every listener connected).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Short run for CI: 50 listeners, 3 s.
    #[arg(long)]
    smoke: bool,
    /// A frame arriving more than this after its program time is late.
    #[arg(long, default_value_t = 200)]
    late_ms: u64,
    /// Listeners connected per 50 ms while ramping up.
    #[arg(long, default_value_t = 250)]
    ramp_batch: usize,
    /// Port offset of the `amphi dev` mesh it starts.
    #[arg(long, default_value_t = 18_600)]
    port_offset: u16,
    /// Skip the kernel floor.
    #[arg(long)]
    no_tcp_floor: bool,
    /// When the kernel floor is measured: over the same seconds as the edge, by a thread of this
    /// process writing to as many listeners of its own (the default: both see the same box), or
    /// after the edge run (needs fewer open files: 2 per listener instead of 3).
    #[arg(long, value_enum, default_value_t = FloorWhen::Alongside)]
    floor: FloorWhen,
    /// How the listeners get the stream: a WebSocket on the edge's HTTP port, or a WebTransport
    /// session (HTTP/3) on its UDP twin, as the router's `/v1/route` answer names it.
    #[arg(long, value_enum, default_value_t = Transport::Websocket)]
    transport: Transport,
    /// WebTransport: sessions per client QUIC endpoint (one UDP socket of this process each,
    /// its receive buffer raised as far as `net.core.rmem_max` allows).
    #[arg(long, default_value_t = 500)]
    sessions_per_socket: usize,
}

/// The push listeners' transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// `GET /v1/rooms/{room}/push` upgraded to a WebSocket (TCP).
    Websocket,
    /// A WebTransport session (HTTP/3 over QUIC) to the route answer's `webtransport_url`.
    Webtransport,
}

/// When `loadgen push` measures the kernel floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FloorWhen {
    /// Over the same measured seconds as the edge.
    Alongside,
    /// After the edge run, with the edge stopped.
    After,
}

/// Arrival delays are counted in buckets of this many µs.
const BUCKET_US: u64 = 5_000;
/// Buckets (the last one holds everything later).
const BUCKETS: usize = 400;

/// What every listener adds to while measuring.
struct Tally {
    measuring: AtomicBool,
    frames: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    late: AtomicU64,
    late_bound_us: u64,
    delays: Vec<AtomicU64>,
    /// Listeners that connected and got their `101` (or their WebTransport stream).
    upgraded: AtomicU64,
    /// Listeners whose stream ended or broke.
    ended: AtomicU64,
}

impl Tally {
    fn new(late_ms: u64) -> Arc<Tally> {
        Arc::new(Tally {
            measuring: AtomicBool::new(false),
            frames: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            late: AtomicU64::new(0),
            late_bound_us: late_ms * 1000,
            delays: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            upgraded: AtomicU64::new(0),
            ended: AtomicU64::new(0),
        })
    }

    /// Forget what was counted (the delays too).
    fn reset(&self) {
        for c in [&self.frames, &self.messages, &self.bytes, &self.late] {
            c.store(0, Ordering::Relaxed);
        }
        for c in &self.delays {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// The delay below which fraction `p` of the counted frames arrived, ms.
    fn percentile_ms(&self, p: f64) -> f64 {
        let counts: Vec<u64> = self
            .delays
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let want = (total as f64 * p).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want.max(1) {
                return ((i as u64 + 1) * BUCKET_US) as f64 / 1000.0;
            }
        }
        (BUCKETS as u64 * BUCKET_US) as f64 / 1000.0
    }
}

/// Where a listener gets its stream of server frames.
#[derive(Clone)]
enum Target {
    /// A WebSocket upgrade of `path` (token included) at `addr`: the edge, or the TCP floor.
    WebSocket { addr: SocketAddr, path: String },
    /// A WebTransport session to `url` (token included); listener `i` uses endpoint
    /// `i % clients.len()`.
    WebTransport {
        clients: Arc<Vec<web_transport_quinn::Client>>,
        url: url::Url,
    },
}

/// Listener `i`: connect, get the stream, then read until the deadline, tallying what arrives.
async fn listen(target: Target, i: usize, tally: Arc<Tally>, until: Instant) -> Result<()> {
    match target {
        Target::WebSocket { addr, path } => {
            let (s, buf, filled) = ws_upgrade(addr, &path, until).await?;
            tally.upgraded.fetch_add(1, Ordering::Relaxed);
            read_frames(s, buf, filled, &tally, until).await
        }
        Target::WebTransport { clients, url } => {
            let client = &clients[i % clients.len()];
            let session = tokio::time::timeout_at(until.into(), client.connect(url))
                .await
                .context("WebTransport session: timed out")?
                .context("WebTransport session")?;
            let stream = tokio::time::timeout_at(until.into(), session.accept_uni())
                .await
                .context("WebTransport stream: timed out")?
                .context("WebTransport stream")?;
            tally.upgraded.fetch_add(1, Ordering::Relaxed);
            // `session` lives until the reading ends.
            let read = read_frames(stream, vec![0u8; 64 * 1024], 0, &tally, until).await;
            drop(session);
            read
        }
    }
}

/// A WebSocket upgrade of `path` at `addr`: the stream, a buffer and how much of it holds bytes
/// that came after the response head.
async fn ws_upgrade(
    addr: SocketAddr,
    path: &str,
    until: Instant,
) -> Result<(TcpStream, Vec<u8>, usize)> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    loop {
        let n = tokio::time::timeout_at(until.into(), s.read(&mut buf[filled..])).await??;
        ensure!(n > 0, "closed during the upgrade");
        filled += n;
        if let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            ensure!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
            buf.copy_within(end + 4..filled, 0);
            filled -= end + 4;
            return Ok((s, buf, filled));
        }
        ensure!(filled < buf.len(), "response head too long");
    }
}

/// Read server frames from `s` until the deadline (`buf[..filled]` holds bytes already read),
/// tallying what arrives; the same for every transport.
async fn read_frames<R: AsyncRead + Unpin>(
    mut s: R,
    mut buf: Vec<u8>,
    mut filled: usize,
    tally: &Tally,
    until: Instant,
) -> Result<()> {
    let mut anchor: Option<(u64, u64)> = None;
    loop {
        while let Some(frame) = parse_server_frame(&buf[..filled])? {
            let (op, payload, taken) = (frame.opcode, frame.payload, frame.consumed);
            let now_us = crate::loadgen_hls::unix_us();
            match op {
                opcode::TEXT => {
                    let h: PushHeader = serde_json::from_slice(&buf[payload])?;
                    anchor = Some((h.ts_base, h.ts_base_unix_us));
                }
                opcode::BINARY if tally.measuring.load(Ordering::Relaxed) => {
                    let m = AudioMessage::decode(&buf[payload.clone()])?;
                    tally.messages.fetch_add(1, Ordering::Relaxed);
                    tally.bytes.fetch_add(taken as u64, Ordering::Relaxed);
                    tally.frames.fetch_add(m.len() as u64, Ordering::Relaxed);
                    if let Some((ts_base, base_us)) = anchor {
                        for f in m.frames() {
                            let program_us = base_us + f.ts.saturating_sub(ts_base) * 1000 / 48;
                            let delay = now_us.saturating_sub(program_us);
                            if delay > tally.late_bound_us {
                                tally.late.fetch_add(1, Ordering::Relaxed);
                            }
                            let b = ((delay / BUCKET_US) as usize).min(BUCKETS - 1);
                            tally.delays[b].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                opcode::BINARY => {}
                opcode::CLOSE => bail!("the server closed the stream"),
                other => bail!("unexpected opcode {other}"),
            }
            buf.copy_within(taken..filled, 0);
            filled -= taken;
        }
        let read = tokio::time::timeout_at(until.into(), s.read(&mut buf[filled..])).await;
        match read {
            Err(_) => return Ok(()),
            Ok(Ok(0)) => bail!("connection closed"),
            Ok(Ok(n)) => filled += n,
            Ok(Err(e)) => return Err(e.into()),
        }
    }
}

/// Start `n` listeners of `target` in batches; they read until `until`.
async fn start_listeners(
    target: &Target,
    n: usize,
    batch: usize,
    tally: &Arc<Tally>,
    until: Instant,
) -> Result<tokio::task::JoinSet<Result<()>>> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (target, tally) = (target.clone(), tally.clone());
        set.spawn(async move {
            let r = listen(target, i, tally.clone(), until).await;
            tally.ended.fetch_add(1, Ordering::Relaxed);
            r
        });
        if (i + 1) % batch.max(1) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while (tally.upgraded.load(Ordering::Relaxed) as usize) < n {
        if tally.ended.load(Ordering::Relaxed) > 0 {
            if let Some(Ok(Err(e))) = set.join_next().await {
                bail!("a listener failed: {e:#}");
            }
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} listeners connected in 30 s",
            tally.upgraded.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(set)
}

/// Push listeners held as background load for other figures ([`hold_websocket_listeners`]); they
/// stop when this is dropped.
pub(crate) struct HeldListeners {
    _set: tokio::task::JoinSet<Result<()>>,
    tally: Arc<Tally>,
}

impl HeldListeners {
    /// What they received since they connected.
    pub(crate) fn summary(&self) -> String {
        let t = &self.tally;
        format!(
            "{} frames in {} messages, delay p50 {:.0} ms, p99 {:.0} ms, {} late (> 200 ms), {} streams ended",
            t.frames.load(Ordering::Relaxed),
            t.messages.load(Ordering::Relaxed),
            t.percentile_ms(0.5),
            t.percentile_ms(0.99),
            t.late.load(Ordering::Relaxed),
            t.ended.load(Ordering::Relaxed),
        )
    }
}

/// `n` WebSocket push listeners of `room` at the edge `addr` (with a listener `token`), connected
/// before this returns, reading and counting until `until`.
pub(crate) async fn hold_websocket_listeners(
    addr: SocketAddr,
    room: &str,
    token: &str,
    n: usize,
    until: Instant,
) -> Result<HeldListeners> {
    let target = Target::WebSocket {
        addr,
        path: format!("/v1/rooms/{room}/push?token={token}"),
    };
    let tally = Tally::new(200);
    let set = start_listeners(&target, n, 250, &tally, until).await?;
    tally.measuring.store(true, Ordering::Relaxed);
    Ok(HeldListeners { _set: set, tally })
}

/// `amphi-tools loadgen push`.
pub async fn run(args: PushArgs) -> Result<()> {
    let (n, seconds) = if args.smoke {
        (args.listeners.min(50), args.seconds.min(3))
    } else {
        (args.listeners, args.seconds.clamp(1, 600))
    };
    ensure!((1..=9_000).contains(&n), "--listeners must be 1..=9000");
    let alongside = args.floor == FloorWhen::Alongside && !args.no_tcp_floor;
    // Each listener's socket, and each of the floor's listeners' two ends.
    let needed = if alongside { 3 * n } else { 2 * n } + 500;
    let files = crate::loadgen_room::raise_fd_limit();
    ensure!(
        files as usize >= needed,
        "{n} listeners need {needed} open files; the limit is {files}{}",
        if alongside {
            " (--floor after needs fewer)"
        } else {
            ""
        }
    );
    let offset = args.port_offset;
    let mesh = tokio::task::spawn_blocking(move || ChildMesh::start("loadgen-push", offset, &[]))
        .await??;
    let (router, edge) = (mesh.router_url(), mesh.edge_url(0));
    let pid = mesh.pid();
    let transport = args.transport;
    let (room, speaker, listener, route) = {
        let router = router.clone();
        tokio::task::spawn_blocking(move || -> Result<_> {
            let created = post_json(
                &format!("{router}/v1/rooms"),
                serde_json::json!({"title": "push load"}),
            )?;
            let room = created["room"].as_str().context("room id")?.to_string();
            let mint = |role: &str| -> Result<String> {
                let t = post_json(
                    &format!("{router}/v1/rooms/{room}/tokens"),
                    serde_json::json!({"role": role, "name": format!("push-{role}")}),
                )?;
                Ok(t["token"].as_str().context("token")?.to_string())
            };
            let (speaker, listener) = (mint("speaker")?, mint("listener")?);
            // WebTransport: where the router sends a listener of this room in the first
            // edge's region (the edge the WebSocket listeners use). Until the edge's first
            // heartbeat the router knows it only from its static list, without WebTransport:
            // ask again for a few heartbeats.
            let route = match transport {
                Transport::Websocket => None,
                Transport::Webtransport => {
                    let url =
                        format!("{router}/v1/route?room={room}&role=listener&region={EDGE_REGION}");
                    let deadline = Instant::now() + Duration::from_secs(5);
                    loop {
                        let route: RouteResponse = ureq::get(&url)
                            .timeout(Duration::from_secs(5))
                            .call()
                            .context("GET /v1/route")?
                            .into_json()
                            .context("the /v1/route answer")?;
                        if !route.webtransport_url.is_empty() || Instant::now() >= deadline {
                            break Some(route);
                        }
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
            };
            Ok((room.clone(), speaker, listener, route))
        })
        .await??
    };

    // The speaker talks for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let mut publisher = WhipPublisher::connect(&format!("{edge}/whip/{room}"), &speaker)
        .await
        .context("speaker WHIP")?;
    let packets = tone_packets(440.0, 50)?;
    let speaking = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let p = &packets[k as usize % packets.len()];
                if publisher
                    .send_opus(p, k.wrapping_mul(960), 30)
                    .await
                    .is_err()
                {
                    break;
                }
                k += 1;
            }
            let _ = publisher.close().await;
        })
    };

    // The mesh with the speaker alone: the baseline CPU.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base_secs = 3.0;
    let c0 = process_cpu(pid)?;
    tokio::time::sleep(Duration::from_secs_f64(base_secs)).await;
    let baseline = (process_cpu(pid)?.total() - c0.total()) / base_secs;

    let addr: SocketAddr = edge.strip_prefix("http://").context("edge URL")?.parse()?;
    let target = match route {
        None => Target::WebSocket {
            addr,
            path: format!("/v1/rooms/{room}/push?token={listener}"),
        },
        Some(route) => {
            let (url, sha256) = webtransport_target(&route, &listener, addr.port())?;
            let sockets = n.div_ceil(args.sessions_per_socket.max(1));
            let clients = (0..sockets)
                .map(|_| wt_client(sha256))
                .collect::<Result<Vec<_>>>()?;
            Target::WebTransport {
                clients: Arc::new(clients),
                url,
            }
        }
    };
    let tally = Tally::new(args.late_ms);
    let until = Instant::now() + Duration::from_secs(seconds + 60);
    let ramp = Instant::now();
    let mut set = start_listeners(&target, n, args.ramp_batch, &tally, until).await?;
    let ramp_secs = ramp.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut floor = if alongside {
        Some(Floor::start_like(&tally, n, args.ramp_batch, args.late_ms, seconds).await?)
    } else {
        None
    };
    let c1 = process_cpu(pid)?;
    let own1 = process_cpu(std::process::id())?;
    let udp1 = udp_rcvbuf_errors();
    let t1 = Instant::now();
    tally.measuring.store(true, Ordering::Relaxed);
    if let Some(f) = floor.as_mut() {
        f.measuring(true);
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    tally.measuring.store(false, Ordering::Relaxed);
    if let Some(f) = floor.as_mut() {
        f.measuring(false);
    }
    let elapsed = t1.elapsed().as_secs_f64();
    let cpu = process_cpu(pid)?;
    let own = (process_cpu(std::process::id())?.total() - own1.total()) / elapsed;
    let udp_drops = udp_rcvbuf_errors()
        .zip(udp1)
        .map(|(b, a)| b.saturating_sub(a));
    let loaded = (cpu.total() - c1.total()) / elapsed;
    let edge_metrics = ureq::get(&format!("{edge}/metrics"))
        .timeout(Duration::from_secs(5))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    set.abort_all();
    drop(target);
    stop.store(true, Ordering::Relaxed);
    let _ = speaking.await;
    drop(mesh);

    let frames = tally.frames.load(Ordering::Relaxed);
    let messages = tally.messages.load(Ordering::Relaxed).max(1);
    let late = tally.late.load(Ordering::Relaxed);
    let msg_bytes = tally.bytes.load(Ordering::Relaxed) / messages;
    let expected = n as f64 * 50.0 * elapsed;
    let per_listener_us = (loaded - baseline).max(0.0) * 1e6 / n as f64;
    let skipped = edge_metrics
        .lines()
        .find_map(|l| l.strip_prefix("amphi_edge_push_skipped_messages_total "))
        .unwrap_or("?")
        .to_string();
    let over = match args.transport {
        Transport::Websocket => "WebSocket",
        Transport::Webtransport => "WebTransport",
    };
    println!(
        "push listeners over {over}: {n} on one edge of an amphi dev child, one speaker, measured \
         {elapsed:.1} s (ramp {ramp_secs:.1} s)"
    );
    println!(
        "  frames: {:.0}/s delivered ({:.2}% of the {:.0}/s program x listeners), {} messages of \
         {msg_bytes} bytes, skipped at the edge {skipped}",
        frames as f64 / elapsed,
        100.0 * frames as f64 / expected,
        expected / elapsed,
        messages
    );
    println!(
        "  late (> {} ms after program time): {late} = {:.3}%; delay p50 {:.0} ms, p99 {:.0} ms \
         (5 ms buckets; includes batching {} frames per message)",
        args.late_ms,
        100.0 * late as f64 / frames.max(1) as f64,
        tally.percentile_ms(0.5),
        tally.percentile_ms(0.99),
        msg_frames(frames, messages),
    );
    // Too few listeners to lift the process above its baseline (smoke runs): say so rather than
    // print a per-core figure divided by nothing.
    let per_core = if per_listener_us > 0.0 {
        format!("{:.0} listeners per core", 1e6 / per_listener_us)
    } else {
        "listeners per core not measurable at this size".to_string()
    };
    println!(
        "  mesh process CPU: {:.1}% with the speaker alone, {:.1}% with the listeners: \
         {per_listener_us:.1} us per listener per second, {per_core}",
        baseline * 100.0,
        loaded * 100.0,
    );
    let whose = if floor.is_some() {
        "the clients of the edge and of the floor, and the floor"
    } else {
        "the clients"
    };
    println!(
        "  load generator CPU (this process: {whose}): {:.1}% = {:.1} us per listener per second",
        own * 100.0,
        own * 1e6 / n as f64,
    );
    if args.transport == Transport::Webtransport {
        let sessions = edge_metrics
            .lines()
            .find_map(|l| l.strip_prefix("amphi_edge_push_webtransport_sessions_total "))
            .unwrap_or("?");
        let drops = udp_drops.map_or("?".to_string(), |d| d.to_string());
        println!(
            "  WebTransport: {} client endpoints (UDP sockets), {sessions} sessions opened at the \
             edge; UDP datagrams dropped for a full receive buffer (whole box, measured seconds): \
             {drops}",
            n.div_ceil(args.sessions_per_socket.max(1)),
        );
    }
    let floor = match (floor, args.no_tcp_floor) {
        (_, true) => return Ok(()),
        (Some(floor), false) => floor.finish()?,
        (None, false) => {
            // After the edge run: the same listeners, messages of the same size at the same rate.
            let period = message_period(elapsed, n, messages);
            let until = Instant::now() + Duration::from_secs(seconds + 60);
            let mut floor = Floor::start(
                msg_bytes as usize,
                period,
                n,
                args.ramp_batch,
                args.late_ms,
                until,
            )
            .await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            floor.measuring(true);
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            floor.measuring(false);
            floor.finish()?
        }
    };
    let writes_per_listener_sec = messages as f64 / n as f64 / elapsed;
    let floor_per_listener = floor.us_per_write * writes_per_listener_sec;
    // The floor is a kernel TCP writer's: WebSocket's floor; for WebTransport only a reference.
    let (floor_name, ratio_name) = match args.transport {
        Transport::Websocket => ("kernel floor", "edge / floor"),
        Transport::Webtransport => ("kernel TCP floor", "edge (WebTransport) / TCP floor"),
    };
    let when = match args.floor {
        FloorWhen::Alongside => "over the same seconds",
        FloorWhen::After => "after the edge run",
    };
    println!(
        "{floor_name}, same run ({when}): {n} listeners, one thread writing {}-byte messages every \
         {:.0} ms to each socket: {:.2} us per write = {floor_per_listener:.1} us per listener per \
         second ({} messages delivered in {:.1} s)",
        floor.message_bytes,
        floor.period.as_secs_f64() * 1000.0,
        floor.us_per_write,
        floor.messages,
        floor.elapsed,
    );
    println!(
        "  {ratio_name}: {:.2}x (goal: >= 10,000 listeners per core within 1.3x the floor)",
        per_listener_us / floor_per_listener.max(0.001)
    );
    Ok(())
}

/// How often each of `n` listeners got a message, when together they got `messages` in `secs`.
fn message_period(secs: f64, n: usize, messages: u64) -> Duration {
    Duration::from_secs_f64(secs * n as f64 / messages.max(1) as f64)
}

/// The kernel floor ([`crate::tcp_floor::FloorServer::start_push`]) and its listeners.
struct Floor {
    server: crate::tcp_floor::FloorServer,
    tally: Arc<Tally>,
    set: tokio::task::JoinSet<Result<()>>,
    message_bytes: usize,
    period: Duration,
    /// When measuring last started.
    since: Option<Instant>,
    elapsed: f64,
}

/// What the floor measured.
struct FloorCost {
    /// Its thread's CPU per write while measuring, µs.
    us_per_write: f64,
    message_bytes: usize,
    period: Duration,
    /// Messages its listeners got while measuring.
    messages: u64,
    /// Seconds measured.
    elapsed: f64,
}

impl Floor {
    /// `n` listeners (connected before this returns, reading until `until`) fed a
    /// `message_bytes`-byte audio message every `period`.
    async fn start(
        message_bytes: usize,
        period: Duration,
        n: usize,
        batch: usize,
        late_ms: u64,
        until: Instant,
    ) -> Result<Floor> {
        let server =
            crate::tcp_floor::FloorServer::start_push(floor_message(message_bytes)?, period)?;
        let tally = Tally::new(late_ms);
        let target = Target::WebSocket {
            addr: server.addr,
            path: "/floor".into(),
        };
        let set = start_listeners(&target, n, batch, &tally, until)
            .await
            .context("floor listeners")?;
        Ok(Floor {
            server,
            tally,
            set,
            message_bytes,
            period,
            since: None,
            elapsed: 0.0,
        })
    }

    /// A floor for `n` listeners of the stream the `edge` listeners get: its messages' size and
    /// rate, learnt over 2 s (what `edge` counted then is forgotten); settled when this returns.
    async fn start_like(
        edge: &Tally,
        n: usize,
        batch: usize,
        late_ms: u64,
        seconds: u64,
    ) -> Result<Floor> {
        let t = Instant::now();
        edge.measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        edge.measuring.store(false, Ordering::Relaxed);
        let secs = t.elapsed().as_secs_f64();
        let (messages, bytes) = (
            edge.messages.load(Ordering::Relaxed),
            edge.bytes.load(Ordering::Relaxed),
        );
        edge.reset();
        ensure!(messages > 0, "the edge's listeners got no message in 2 s");
        let period = message_period(secs, n, messages);
        let until = Instant::now() + Duration::from_secs(seconds + 60);
        let floor = Floor::start(
            (bytes / messages) as usize,
            period,
            n,
            batch,
            late_ms,
            until,
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(floor)
    }

    /// Count (or stop counting) the floor's writes, CPU and delivered messages.
    fn measuring(&mut self, on: bool) {
        self.server.measuring.store(on, Ordering::Relaxed);
        self.tally.measuring.store(on, Ordering::Relaxed);
        match (on, self.since.take()) {
            (true, _) => self.since = Some(Instant::now()),
            (false, Some(since)) => self.elapsed += since.elapsed().as_secs_f64(),
            (false, None) => {}
        }
    }

    /// Stop the floor: what it measured.
    fn finish(mut self) -> Result<FloorCost> {
        self.set.abort_all();
        let cost = self.server.stop()?;
        ensure!(cost.writes > 0, "the floor wrote nothing");
        Ok(FloorCost {
            us_per_write: cost.cpu_us / cost.writes as f64,
            message_bytes: self.message_bytes,
            period: self.period,
            messages: self.tally.messages.load(Ordering::Relaxed),
            elapsed: self.elapsed,
        })
    }
}

/// A WebSocket binary frame of `len` bytes in all holding a valid audio message (one frame of
/// filler Opus bytes), so the floor's listeners read and decode it as they do the edge's.
fn floor_message(len: usize) -> Result<Vec<u8>> {
    // Frame header (4 bytes with a 16-bit length), message header, one frame header.
    let overhead =
        4 + amphi_protocol::push::AUDIO_HEADER_LEN + amphi_protocol::push::FRAME_HEADER_LEN;
    ensure!(
        len > overhead && len - 4 >= 126,
        "messages of {len} bytes cannot be imitated"
    );
    let opus = vec![0xf8u8; len - overhead];
    let mut payload = Vec::new();
    AudioMessage::encode(
        0,
        &[amphi_protocol::push::PushFrame { ts: 0, opus: &opus }],
        &mut payload,
    )?;
    let mut out = Vec::with_capacity(len);
    amphi_protocol::push::ws_server_frame(opcode::BINARY, &payload, &mut out);
    ensure!(
        out.len() == len,
        "floor message of {} bytes, not {len}",
        out.len()
    );
    Ok(out)
}

/// The region of the `amphi dev` child's first edge (its default `--regions` starts with it).
const EDGE_REGION: &str = "us-east";

/// A WebTransport listener's session URL (`webtransport_url?token=`) and pinned certificate
/// hash from a route answer, which must name the WebTransport listener on `edge_port` (the UDP
/// twin of the edge's HTTP port).
fn webtransport_target(
    route: &RouteResponse,
    token: &str,
    edge_port: u16,
) -> Result<(url::Url, [u8; 32])> {
    ensure!(
        !route.webtransport_url.is_empty(),
        "the /v1/route answer has no webtransport_url (5 s after the mesh came up): edge {} \
         does not serve push over WebTransport (is [edge.webtransport] configured?)",
        route.edge
    );
    let mut url = url::Url::parse(&route.webtransport_url)
        .with_context(|| format!("webtransport_url {}", route.webtransport_url))?;
    ensure!(
        url.scheme() == "https" && url.port() == Some(edge_port),
        "webtransport_url {} is not the first edge's (https, port {edge_port})",
        route.webtransport_url
    );
    url.query_pairs_mut().append_pair("token", token);
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(&route.webtransport_cert_sha256, &mut sha256).with_context(|| {
        format!(
            "webtransport_cert_sha256 {:?} is not 64 hex digits (a CA-issued certificate \
             is not pinned; this tool pins the edge's own)",
            route.webtransport_cert_sha256
        )
    })?;
    Ok((url, sha256))
}

/// A WebTransport client on its own UDP socket (loopback, receive buffer [`WT_RCVBUF`]) that
/// accepts only the certificate whose SHA-256 is `sha256`, as a browser's
/// `serverCertificateHashes` does. (`web_transport_quinn::ClientBuilder` binds its socket with
/// the kernel's default receive buffer, ~208 KB, which a few hundred sessions' bursts overflow.)
fn wt_client(sha256: [u8; 32]) -> Result<web_transport_quinn::Client> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let size: libc::c_int = WT_RCVBUF;
    // SAFETY: a valid socket and a c_int option value of the size given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(r == 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert { sha256, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![web_transport_quinn::ALPN.as_bytes().to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let config = quinn::ClientConfig::new(Arc::new(quic));
    Ok(web_transport_quinn::Client::new(endpoint, config))
}

/// Receive buffer asked for each WebTransport client socket (the kernel caps it at
/// `net.core.rmem_max` and doubles it).
const WT_RCVBUF: libc::c_int = 4 << 20;

/// Accepts the one server certificate whose SHA-256 is `sha256` (signatures still checked).
#[derive(Debug)]
struct PinnedCert {
    sha256: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        if sha2::Sha256::digest(end_entity.as_ref()).as_slice() == self.sha256 {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The kernel's count of UDP datagrams dropped for a full receive buffer, whole box
/// (`/proc/net/snmp`, `Udp: ... RcvbufErrors`).
fn udp_rcvbuf_errors() -> Option<u64> {
    snmp_udp_field(
        &std::fs::read_to_string("/proc/net/snmp").ok()?,
        "RcvbufErrors",
    )
}

/// Field `name` of the `Udp:` lines (names, then values) of `/proc/net/snmp` text.
fn snmp_udp_field(snmp: &str, name: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Frames per message, rounded.
fn msg_frames(frames: u64, messages: u64) -> String {
    format!("{:.1}", frames as f64 / messages.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_message_is_a_valid_audio_message_of_the_size_asked() {
        let m = floor_message(485).unwrap();
        assert_eq!(m.len(), 485);
        let frame = parse_server_frame(&m).unwrap().unwrap();
        assert_eq!((frame.opcode, frame.consumed), (opcode::BINARY, 485));
        assert_eq!(AudioMessage::decode(&m[frame.payload]).unwrap().len(), 1);
        assert!(floor_message(100).is_err());
    }

    fn route(webtransport_url: &str, sha256: &str) -> RouteResponse {
        serde_json::from_value(serde_json::json!({
            "region": "us-east", "edge": "edge-us-east",
            "whip_url": "", "whep_url": "", "ws_url": "", "hls_url": "",
            "push_url": "http://127.0.0.1:8101/v1/rooms/ab/push",
            "webtransport_url": webtransport_url, "webtransport_cert_sha256": sha256,
        }))
        .unwrap()
    }

    #[test]
    fn the_webtransport_target_comes_from_the_route_answer() {
        let hash = "0f".repeat(32);
        let r = route("https://127.0.0.1:8101/v1/rooms/ab/push", &hash);
        let (url, sha256) = webtransport_target(&r, "t.k-n_1", 8101).unwrap();
        assert_eq!(
            url.as_str(),
            "https://127.0.0.1:8101/v1/rooms/ab/push?token=t.k-n_1"
        );
        assert_eq!(sha256, [0x0f; 32]);
        // No WebTransport at the edge: said plainly.
        let e = webtransport_target(&route("", ""), "t", 8101).unwrap_err();
        assert!(format!("{e:#}").contains("no webtransport_url"), "{e:#}");
        // Another edge's listener, or no pinnable hash.
        assert!(webtransport_target(&r, "t", 8102).is_err());
        let r = route("https://127.0.0.1:8101/v1/rooms/ab/push", "");
        assert!(webtransport_target(&r, "t", 8101).is_err());
        let r = route("https://127.0.0.1:8101/v1/rooms/ab/push", &"0f".repeat(31));
        assert!(webtransport_target(&r, "t", 8101).is_err());
    }

    #[test]
    fn udp_receive_buffer_drops_are_read_from_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 39834377 18285 6848 39835569 6850 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 0 0\n";
        assert_eq!(snmp_udp_field(snmp, "RcvbufErrors"), Some(6850));
        assert_eq!(snmp_udp_field(snmp, "InDatagrams"), Some(39834377));
        assert_eq!(snmp_udp_field(snmp, "Nope"), None);
        assert_eq!(snmp_udp_field("", "RcvbufErrors"), None);
    }

    #[test]
    fn percentiles_come_from_the_buckets() {
        let t = Tally::new(200);
        t.delays[1].store(90, Ordering::Relaxed);
        t.delays[20].store(10, Ordering::Relaxed);
        assert_eq!(t.percentile_ms(0.5), 10.0);
        assert_eq!(t.percentile_ms(0.99), 105.0);
    }
}
