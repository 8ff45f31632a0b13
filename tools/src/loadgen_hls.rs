//! `amphi-tools loadgen hls`: N LL-HLS players against a packager origin, following the protocol like
//! a real player: a blocking playlist reload for the preload-hinted part
//! (`_HLS_msn`/`_HLS_part`), then that part, over one keep-alive HTTP/1.1 connection each.
//!
//! By default it starts its own packager in a child process (`--serve-packager`, one
//! single-threaded tokio runtime = one core) fed a synthetic 20 ms Opus program, so the
//! packager's RSS and CPU are measured alone. Reports: blocking requests held at once, the delay
//! from a part's publication (the `x-amphi-published-us` header of the playlist state) to its
//! delivery to players (per response and per part over all waiting players: p50/p99), requests
//! per second, packager RSS and CPU.

use crate::child_mesh::ChildMesh;
use crate::tcp_floor::FloorReads;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The room the synthetic program is packaged into.
const BENCH_ROOM: u64 = 0x00be_ac00_0000_0001;

/// Options of `amphi-tools loadgen hls`.
#[derive(Args, Debug)]
pub struct HlsArgs {
    /// Concurrent players.
    #[arg(long, default_value_t = 10_000)]
    players: usize,
    /// Measured seconds (after every player started).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Short run for CI: 50 players, 3 s.
    #[arg(long)]
    smoke: bool,
    /// Players started per 50 ms while ramping up.
    #[arg(long, default_value_t = 500)]
    ramp_batch: usize,
    /// Port of the packager this command starts (ignored with `--url`).
    #[arg(long, default_value_t = 18_490)]
    port: u16,
    /// Load an existing packager instead: its media playlist URL
    /// (`http://host:port/hls/{room}/opus/playlist.m3u8`, plain HTTP).
    #[arg(long)]
    url: Option<String>,
    /// Players only issue blocking reloads (parts come from the CDN/S3 in production); by
    /// default each player also fetches every part from the packager.
    #[arg(long)]
    skip_parts: bool,
    /// Instead of the player load: glass-to-glass latency through an `amphi dev` mesh it starts,
    /// from a tone burst's first packet sent to the edge (WHIP, loopback) to hls.js in headless
    /// Chromium playing it (WebAudio onset).
    #[arg(long)]
    glass_to_glass: bool,
    /// Tone bursts timed by `--glass-to-glass` (one every 2 s).
    #[arg(long, default_value_t = 20)]
    bursts: usize,
    /// hls.js config (JSON) for `--glass-to-glass`, merged over `{"lowLatencyMode": true}`.
    #[arg(long, default_value = "{}")]
    hls_config: String,
    /// Play hls.js without the room page's live-latency keeper (`web/latency.js`, which plays
    /// at 1.1x while the player sits more than 0.1 s behind PART-HOLD-BACK).
    #[arg(long)]
    no_latency_keeper: bool,
    /// With `--glass-to-glass`: also two push listeners (the room page's `#listen=push`,
    /// web/push.js), one over WebTransport and one over the WebSocket, hearing the same bursts in
    /// the same run, side by side with hls.js.
    #[arg(long)]
    push: bool,
    /// With `--glass-to-glass --push`: this many more WebSocket push listeners of the room on the
    /// same edge (raw clients that read and count), to measure a busy edge (from 1,000 it sends
    /// 5 frames per message instead of 3).
    #[arg(long, default_value_t = 0)]
    busy_push: usize,
    /// Port offset of the dev mesh `--glass-to-glass` starts.
    #[arg(long, default_value_t = 22_000)]
    port_offset: u16,
    /// Serve the child packager's plain HTTP listener through hyper/axum only (the server
    /// without the HTTP/1.1 fast path), for side-by-side comparisons.
    #[arg(long)]
    hyper_only: bool,
    /// Skip the kernel floor measured after the player load (the same players held by a minimal
    /// server that only writes the packager's response to each in turn).
    #[arg(long)]
    no_tcp_floor: bool,
    /// How the floor server reads requests between its write passes, one floor run per entry
    /// after each packager run (`epoll`: as a server does, the packager's syscalls; `polled`:
    /// the older floor that read every socket every few milliseconds). Ratios are to the first.
    #[arg(long, value_delimiter = ',', default_value = "epoll")]
    floor_reads: Vec<FloorReads>,
    /// Packager runs, each followed by its floor run; with more than one, the median of the
    /// rounds' packager / floor ratios is printed too (this shared machine's noise moves a
    /// single pair by ±20 %).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Run the players on CPU 0 and each server under test (the child packager, then the
    /// floor's thread) on CPU 1, so that neither server shares its CPU with the load generator
    /// and the scheduler's choices between them stay out of the ratio (needs two CPUs).
    #[arg(long)]
    pin: bool,
    /// Internal: the child packager runs on this CPU only.
    #[arg(long, hide = true)]
    pin_cpu: Option<usize>,
    /// Internal: run the packager with a synthetic program on this address (child mode).
    #[arg(long, hide = true)]
    serve_packager: Option<SocketAddr>,
    /// Internal: data directory of the child packager.
    #[arg(long, hide = true)]
    data_dir: Option<PathBuf>,
    /// Internal: the child stops after this many seconds.
    #[arg(long, hide = true, default_value_t = 120)]
    serve_seconds: u64,
}

/// With `--pin`: the CPU of the players (the load generator's runtime).
const PLAYERS_CPU: usize = 0;
/// With `--pin`: the CPU of the server under test (the child packager, the floor's thread).
const SERVER_CPU: usize = 1;

/// `amphi-tools loadgen hls`.
pub async fn run(args: HlsArgs) -> Result<()> {
    if let Some(addr) = args.serve_packager {
        let dir = args.data_dir.clone().context("--data-dir is required")?;
        let secs = args.serve_seconds;
        let fast_path = !args.hyper_only;
        if let Some(cpu) = args.pin_cpu {
            crate::tcp_floor::pin_process(cpu)?;
        }
        return tokio::task::spawn_blocking(move || serve_packager(addr, dir, secs, fast_path))
            .await
            .context("packager thread")?;
    }
    if args.glass_to_glass {
        let bursts = if args.smoke {
            3
        } else {
            args.bursts.clamp(1, 1000)
        };
        let keeper = !args.no_latency_keeper;
        return glass_to_glass(
            bursts,
            args.port_offset,
            args.hls_config.clone(),
            keeper,
            args.push,
            args.busy_push,
        )
        .await;
    }
    let (players, seconds) = if args.smoke {
        (args.players.min(50), args.seconds.min(3))
    } else {
        (args.players, args.seconds)
    };
    if players == 0 || players > 60_000 {
        bail!("--players must be 1..=60000");
    }
    ensure!((1..=10).contains(&args.rounds), "--rounds must be 1..=10");
    if args.pin {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        ensure!(cpus >= 2, "--pin needs two CPUs, this machine has {cpus}");
        crate::tcp_floor::pin_process(PLAYERS_CPU)?;
    }
    ensure!(
        !args.floor_reads.is_empty(),
        "--floor-reads needs at least one"
    );
    // Per floor kind, each round's packager / floor ratios.
    let mut ratios: Vec<Vec<(f64, f64)>> = vec![Vec::new(); args.floor_reads.len()];
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            println!("round {round} of {}", args.rounds);
        }
        let round = packager_and_floor(&args, players, seconds).await?;
        for (kind, r) in ratios.iter_mut().zip(round) {
            kind.push(r);
        }
    }
    for (reads, ratios) in args.floor_reads.iter().zip(&ratios) {
        if ratios.len() < 2 {
            continue;
        }
        // Each round's ratios in order, then the median of them.
        let summary = |pick: fn(&(f64, f64)) -> f64| {
            let mut v: Vec<f64> = ratios.iter().map(pick).collect();
            let each = list(&v);
            v.sort_by(f64::total_cmp);
            format!("{each} (median {:.2}x)", v[v.len() / 2])
        };
        println!(
            "packager / floor ({reads:?} reads) over {} rounds, to all waiting: p50 {}, p99 {}",
            ratios.len(),
            summary(|r| r.0),
            summary(|r| r.1),
        );
    }
    Ok(())
}

/// Ratios as `1.23x / 1.10x / …`.
fn list(v: &[f64]) -> String {
    v.iter()
        .map(|r| format!("{r:.2}x"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// One packager run (a child packager unless `--url`), then its floors unless `--no-tcp-floor`:
/// per floor of `--floor-reads`, the packager / floor ratios of delivery to all waiting players
/// (p50, p99).
async fn packager_and_floor(
    args: &HlsArgs,
    players: usize,
    seconds: u64,
) -> Result<Vec<(f64, f64)>> {
    let mut child = None;
    let url = match &args.url {
        Some(u) => u.clone(),
        None => {
            let addr: SocketAddr = ([127, 0, 0, 1], args.port).into();
            let dir =
                std::env::temp_dir().join(format!("amphi-loadgen-hls-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.args(["loadgen", "hls", "--serve-packager", &addr.to_string()]);
            if args.hyper_only {
                cmd.arg("--hyper-only");
            }
            if args.pin {
                cmd.args(["--pin-cpu", &SERVER_CPU.to_string()]);
            }
            let mut c = cmd
                .arg("--data-dir")
                .arg(&dir)
                .args(["--serve-seconds", &(seconds + 60).to_string()])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting the packager child")?;
            let stdout = c.stdout.take().context("child stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            match lines.next() {
                Some(Ok(l)) if l.starts_with("ready") => {}
                other => bail!("packager child did not start: {other:?}"),
            }
            child = Some((c, dir));
            format!(
                "http://{addr}/hls/{}/opus/playlist.m3u8",
                amphi_protocol::RoomId(BENCH_ROOM)
            )
        }
    };
    let result = drive(
        &url,
        players,
        seconds,
        args.ramp_batch,
        !args.skip_parts,
        child.as_ref().map(|c| c.0.id()),
    )
    .await;
    if let Some((mut c, dir)) = child {
        let _ = c.kill();
        let _ = c.wait();
        let _ = std::fs::remove_dir_all(dir);
    }
    let run = result?;
    if args.no_tcp_floor {
        return Ok(Vec::new());
    }
    let mut ratios = Vec::new();
    for &reads in &args.floor_reads {
        let cpu = args.pin.then_some(SERVER_CPU);
        ratios.push(tcp_floor(&run, players, seconds, args.ramp_batch, reads, cpu).await?);
    }
    Ok(ratios)
}

/// What the player load measured, for the side-by-side floor.
struct PackagerRun {
    /// Bytes of one blocking-reload response on the wire.
    response_len: usize,
    /// Per part, publication -> delivered to all waiting players: (p50, p99) ms.
    all_waiting_ms: (f64, f64),
}

/// The kernel floor beside the packager run: the same number of players each hold a request
/// against [`crate::tcp_floor::FloorServer`], which writes a response of the packager's size
/// to every waiting socket once per part duration.
async fn tcp_floor(
    run: &PackagerRun,
    players: usize,
    seconds: u64,
    ramp_batch: usize,
    reads: FloorReads,
    cpu: Option<usize>,
) -> Result<(f64, f64)> {
    let period = Duration::from_millis(200);
    let server = crate::tcp_floor::FloorServer::start(
        run.response_len,
        period,
        amphi_packager::PUBLISHED_HEADER,
        reads,
        cpu,
    )?;
    let addr = server.addr.to_string();
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(players);
    for i in 0..players {
        let (addr, measuring, stop) = (addr.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut out: Vec<(u64, u32)> = Vec::new();
            let Ok(mut cn) = Conn::open(&addr).await else {
                return out;
            };
            while !stop.load(Ordering::Relaxed) {
                let Ok(r) = cn.get("/floor").await else {
                    break;
                };
                if let (true, Some(p)) = (measuring.load(Ordering::Relaxed), r.published_us) {
                    let got = r.received_us.unwrap_or_else(unix_us);
                    out.push((p, got.saturating_sub(p).min(u64::from(u32::MAX)) as u32));
                }
            }
            out
        }));
        if (i + 1) % ramp_batch.max(1) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    measuring.store(true, Ordering::Relaxed);
    server.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    server.measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for t in tasks {
        if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(10), t).await {
            samples.extend(v);
        }
    }
    let cost = server.stop()?;
    let mut per_response: Vec<u32> = samples.iter().map(|s| s.1).collect();
    per_response.sort_unstable();
    // Every floor player was waiting: it asks for the next answer as soon as it has one.
    let PerPublication {
        full,
        all_waiting: to_all,
        ..
    } = per_publication(
        samples
            .iter()
            .map(|&(published, delay)| (published, delay, true)),
    );
    let floor_us_per_write = cost.cpu_us / cost.writes.max(1) as f64;
    println!(
        "kernel floor, same run ({reads:?} reads): {players} players each holding a request \
         against a minimal blocking server that writes the same {}-byte response to every \
         waiting socket every 200 ms and does nothing else",
        run.response_len
    );
    println!(
        "  floor publication -> delivery, per response: p50 {:.1} ms, p99 {:.1} ms; to all \
         waiting players, per round: p50 {:.1} ms, p99 {:.1} ms ({} rounds of {full}); \
         CPU {floor_us_per_write:.2} us per write",
        percentile(&per_response, 0.5),
        percentile(&per_response, 0.99),
        percentile(&to_all, 0.5),
        percentile(&to_all, 0.99),
        to_all.len(),
    );
    if to_all.is_empty() {
        bail!("the floor server answered no round");
    }
    let ratios = (
        run.all_waiting_ms.0 / percentile(&to_all, 0.5),
        run.all_waiting_ms.1 / percentile(&to_all, 0.99),
    );
    println!(
        "  packager / floor, to all waiting: p50 {:.2}x, p99 {:.2}x",
        ratios.0, ratios.1
    );
    Ok(ratios)
}

/// Delivery delays grouped by publication.
struct PerPublication {
    /// Responses to the most-requested publication (every player, joins and rejoins aside).
    full: u32,
    /// Per publication every player asked for: the latest delivery to a waiting player, sorted.
    all_waiting: Vec<u32>,
    /// The same, over every player that asked (late ones too), sorted.
    all_players: Vec<u32>,
    /// Waiting players per such publication, on average.
    waiting_mean: f64,
}

/// Group `(publication, delay µs, waited)` samples by publication. Only publications that at
/// least 90 % of the largest number of players asked for count, so joins and rejoins at the
/// edges of the measured window don't pass for fast deliveries.
fn per_publication<K: std::hash::Hash + Eq>(
    samples: impl Iterator<Item = (K, u32, bool)>,
) -> PerPublication {
    // (responses, latest delivery, waiting players, latest delivery to them)
    let mut groups: HashMap<K, (u32, u32, u32, u32)> = HashMap::new();
    for (key, delay, waited) in samples {
        let e = groups.entry(key).or_insert((0, 0, 0, 0));
        e.0 += 1;
        e.1 = e.1.max(delay);
        if waited {
            e.2 += 1;
            e.3 = e.3.max(delay);
        }
    }
    let full = groups.values().map(|v| v.0).max().unwrap_or(0);
    let complete: Vec<&(u32, u32, u32, u32)> =
        groups.values().filter(|v| v.0 * 10 >= full * 9).collect();
    let sorted = |pick: fn(&(u32, u32, u32, u32)) -> u32| {
        let mut v: Vec<u32> = complete.iter().map(|g| pick(g)).collect();
        v.sort_unstable();
        v
    };
    PerPublication {
        full,
        all_waiting: sorted(|g| g.3),
        all_players: sorted(|g| g.1),
        waiting_mean: complete.iter().map(|v| f64::from(v.2)).sum::<f64>()
            / (complete.len().max(1) as f64),
    }
}

/// Child mode: a packager on one single-threaded runtime, fed a 440 Hz program in real time;
/// `fast_path`: the plain listener's HTTP/1.1 fast path (else hyper/axum only).
fn serve_packager(
    addr: SocketAddr,
    data_dir: PathBuf,
    seconds: u64,
    fast_path: bool,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let config = amphi_protocol::config::PackagerConfig {
            id: "loadgen-packager".into(),
            origins: vec![amphi_protocol::config::OriginEndpoint {
                id: "unused".into(),
                addr: ([127, 0, 0, 1], 9).into(),
                server_name: "unused".into(),
            }],
            origin_addr: None,
            origin_server_name: None,
            http_listen: addr,
            data_dir,
            limits: Default::default(),
        };
        let options = amphi_packager::PackagerOptions {
            http1_fast_path: Some(fast_path),
            ..Default::default()
        };
        let packager = amphi_packager::Packager::start(&config, &options, shutdown.clone()).await?;
        let input = packager.input(amphi_protocol::RoomId(BENCH_ROOM)).await?;
        let packets = amphi_testkit::synth::tone_packets(440.0, 0.3, 500)?;
        println!("ready {}", packager.http_addr);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let frames = seconds * 50;
        for i in 0..frames {
            tick.tick().await;
            let p = &packets[i as usize % packets.len()];
            input.frame((i as u32).wrapping_mul(960), p, 1);
        }
        input.end();
        shutdown.cancel();
        packager.stopped().await?;
        Ok(())
    })
}

async fn json(
    conn: &mut Conn,
    method: &str,
    target: &str,
    body: &str,
) -> Result<serde_json::Value> {
    let r = conn.request(method, target, body.as_bytes()).await?;
    if r.status / 100 != 2 {
        bail!(
            "{method} {target}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    Ok(serde_json::from_slice(&r.body)?)
}

/// A token for `room` minted over the router's API (`body`: its role and name).
async fn mint(conn: &mut Conn, room: &str, body: &str) -> Result<String> {
    let tok = json(conn, "POST", &format!("/v1/rooms/{room}/tokens"), body).await?;
    Ok(tok["token"].as_str().context("token")?.to_string())
}

/// Glass-to-glass: tone bursts through WHIP -> edge -> origin -> packager -> hls.js.
/// The room page's live-latency keeper, which the glass-to-glass player loads beside hls.js.
const LATENCY_KEEPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../web/latency.js");

async fn glass_to_glass(
    bursts: usize,
    offset: u16,
    hls_config: String,
    latency_keeper: bool,
    push: bool,
    busy_push: usize,
) -> Result<()> {
    ensure!(busy_push <= 9_000, "--busy-push must be at most 9000");
    if busy_push > 0 {
        crate::loadgen_room::raise_fd_limit();
    }
    let mesh = tokio::task::spawn_blocking(move || ChildMesh::start("g2g", offset, &[])).await??;
    let router = format!("127.0.0.1:{}", 8080 + offset);
    let mut conn = Conn::open(&router).await?;
    let room = json(
        &mut conn,
        "POST",
        "/v1/rooms",
        r#"{"title":"glass to glass","topic":"bench"}"#,
    )
    .await?;
    let room = room["room"].as_str().context("room id")?.to_string();
    let token = mint(&mut conn, &room, r#"{"role":"speaker","name":"g2g"}"#).await?;
    let route = json(
        &mut conn,
        "GET",
        &format!("/v1/route?room={room}&region=us-east"),
        "",
    )
    .await?;
    let whip = route["whip_url"].as_str().context("whip_url")?.to_string();
    let mut publisher = amphi_testkit::whip_client::WhipPublisher::connect(&whip, &token)
        .await
        .map_err(|e| anyhow::anyhow!("WHIP: {e}"))?;
    // The background listeners, on the edge the pages are routed to (the speaker's, us-east).
    let edge: SocketAddr = whip
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .context("whip_url's edge address")?
        .parse()?;
    let busy = if busy_push > 0 {
        let listener = mint(&mut conn, &room, r#"{"role":"listener","name":"busy"}"#).await?;
        let until = Instant::now() + Duration::from_secs(bursts as u64 * 2 + 120);
        Some(
            crate::loadgen_push::hold_websocket_listeners(edge, &room, &listener, busy_push, until)
                .await?,
        )
    } else {
        None
    };
    let tone = amphi_testkit::synth::tone_packets(660.0, 0.4, 20)?;
    let silence = amphi_testkit::synth::tone_packets(660.0, 0.0, 1)?;
    // 4 s of silence first so the program and the playlist exist before the player starts.
    let lead_in = 200usize;
    let total = lead_in + bursts * 100 + 150;
    let mut sent_onsets: Vec<u64> = Vec::with_capacity(bursts);
    let hls_url = format!("http://{router}/hls/{room}/index-opus.m3u8");
    let page = format!("http://{router}/healthz");
    let player_secs = (total as u64 * 20 / 1000).saturating_sub(3).max(5);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/browser/hls_play.mjs");
    let mut player: Option<std::thread::JoinHandle<Result<Vec<u64>>>> = None;
    let mut push_players = Vec::new();
    for transport in ["webtransport", "websocket"].into_iter().filter(|_| push) {
        let (base, room) = (format!("http://{router}"), room.clone());
        let seconds = (total as u64 * 20 / 1000).saturating_sub(2).max(5);
        push_players.push((
            transport,
            std::thread::spawn(move || {
                let script = concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../tests/browser/push_onsets.mjs"
                );
                let out = Command::new("node")
                    .arg(script)
                    .env("AMPHI_URL", base)
                    .env("AMPHI_ROOM", room)
                    .env("AMPHI_REGION", "us-east")
                    .env("AMPHI_SECONDS", seconds.to_string())
                    .env("AMPHI_PUSH_TRANSPORT", transport)
                    .stderr(Stdio::null())
                    .output()
                    .context("running node tests/browser/push_onsets.mjs")?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                let played = stdout
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["ev"] == "done")
                    .map(|v| v["stats"]["transport"].clone());
                ensure!(
                    played.as_ref().and_then(|t| t.as_str()) == Some(transport),
                    "the push listener asked for {transport} played over {played:?}"
                );
                Ok(onsets(&stdout))
            }),
        ));
    }
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        tick.tick().await;
        if i == 100 {
            let (page, hls_url, cfg) = (page.clone(), hls_url.clone(), hls_config.clone());
            player = Some(std::thread::spawn(move || {
                let mut node = Command::new("node");
                if latency_keeper {
                    node.env("AMPHI_LATENCY_KEEPER", LATENCY_KEEPER);
                }
                let out = node
                    .arg(script)
                    .env("AMPHI_PAGE", page)
                    .env("AMPHI_HLS_URL", hls_url)
                    .env("AMPHI_SECONDS", player_secs.to_string())
                    .env("AMPHI_HLS_CONFIG", cfg)
                    .stderr(Stdio::null())
                    .output()
                    .context("running node tests/browser/hls_play.mjs")?;
                Ok(onsets(&String::from_utf8_lossy(&out.stdout)))
            }));
        }
        let in_burst = i >= lead_in && i < lead_in + bursts * 100 && (i - lead_in) % 100 < 20;
        if in_burst && (i - lead_in) % 100 == 0 {
            sent_onsets.push(unix_us() / 1000);
        }
        let (pkt, level) = if in_burst {
            (&tone[(i - lead_in) % 100], 10)
        } else {
            (&silence[0], 127)
        };
        publisher
            .send_opus(pkt, (i as u32).wrapping_mul(960), level)
            .await
            .map_err(|e| anyhow::anyhow!("send: {e}"))?;
    }
    let _ = publisher.close().await;
    if let Some(busy) = &busy {
        let metrics = tokio::task::spawn_blocking(move || {
            ureq::get(&format!("http://{edge}/metrics"))
                .timeout(Duration::from_secs(5))
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
        })
        .await?
        .unwrap_or_default();
        let per_message = metrics
            .lines()
            .find_map(|l| l.strip_prefix("amphi_edge_push_frames_per_message "))
            .unwrap_or("?");
        println!(
            "busy edge: {busy_push} more WebSocket push listeners of the room on the pages' edge, \
             {per_message} frames per push message at the end; they got {}",
            busy.summary()
        );
    }
    drop(busy);
    let heard = |p: Option<std::thread::JoinHandle<Result<Vec<u64>>>>| -> Result<Vec<u64>> {
        match p {
            Some(p) => p.join().map_err(|_| anyhow::anyhow!("player thread"))?,
            None => Ok(Vec::new()),
        }
    };
    let hls = burst_latencies(&sent_onsets, &heard(player)?);
    println!(
        "glass-to-glass (WHIP packet sent to the edge -> hls.js playing it, Chromium WebAudio onset): {}",
        hls.summary(sent_onsets.len())
    );
    for (transport, player) in push_players {
        let pushed = burst_latencies(&sent_onsets, &heard(Some(player))?);
        println!(
            "glass-to-glass (same bursts -> the room page's push listener over {transport}, web/push.js, playing them): {}",
            pushed.summary(sent_onsets.len())
        );
        println!(
            "  push ({transport}) p50 / LL-HLS p50 = {:.2} (goal: push p50 <= 350 ms: {})",
            pushed.quantile(0.5) / hls.quantile(0.5),
            if pushed.quantile(0.5) <= 350.0 {
                "met"
            } else {
                "NOT met"
            }
        );
        if pushed.sorted_ms.is_empty() {
            bail!("the push listener over {transport} heard no burst");
        }
    }
    drop(mesh);
    if hls.sorted_ms.is_empty() {
        bail!("hls.js heard no burst");
    }
    Ok(())
}

/// The `onset` times (Unix ms) a browser player script printed as JSON lines.
fn onsets(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["ev"] == "onset")
        .filter_map(|v| v["at"].as_f64().map(|a| a as u64))
        .collect()
}

/// Glass-to-glass latencies of the bursts a player heard, sorted.
struct BurstLatencies {
    sorted_ms: Vec<u32>,
}

/// Match each burst sent to the first onset heard after it (within 1.9 s, before the next burst).
fn burst_latencies(sent: &[u64], detected: &[u64]) -> BurstLatencies {
    let mut lat: Vec<u32> = Vec::new();
    for (k, &at) in sent.iter().enumerate() {
        let next = sent.get(k + 1).copied().unwrap_or(u64::MAX);
        if let Some(&heard) = detected
            .iter()
            .find(|&&d| d > at && d < next.min(at + 1900))
        {
            lat.push(u32::try_from(heard - at).unwrap_or(u32::MAX));
        }
    }
    lat.sort_unstable();
    BurstLatencies { sorted_ms: lat }
}

impl BurstLatencies {
    fn quantile(&self, q: f64) -> f64 {
        if self.sorted_ms.is_empty() {
            return f64::NAN;
        }
        f64::from(self.sorted_ms[((self.sorted_ms.len() - 1) as f64 * q).round() as usize])
    }

    fn summary(&self, bursts: usize) -> String {
        format!(
            "p50 {:.0} ms, p90 {:.0} ms, min {:.0} ms, max {:.0} ms ({} of {} bursts heard)",
            self.quantile(0.5),
            self.quantile(0.9),
            self.quantile(0.0),
            self.quantile(1.0),
            self.sorted_ms.len(),
            bursts
        )
    }
}

/// A minimal keep-alive HTTP/1.1 client connection (Content-Length and chunked bodies).
struct Conn {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Kernel receive timestamp of the last bytes read.
    received_us: Option<u64>,
}

/// A response.
struct Resp {
    status: u16,
    published_us: Option<u64>,
    /// When its last bytes reached the player's socket (kernel receive timestamp, Unix µs).
    received_us: Option<u64>,
    body: Vec<u8>,
    /// Bytes of the whole response on the wire (head and body).
    wire_len: usize,
}

impl Conn {
    async fn open(addr: &str) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        enable_receive_timestamps(&stream)?;
        Ok(Conn {
            stream,
            host: addr.to_string(),
            buf: Vec::with_capacity(8192),
            out: Vec::with_capacity(256),
            received_us: None,
        })
    }

    async fn get(&mut self, target: &str) -> std::io::Result<Resp> {
        self.request("GET", target, b"").await
    }

    async fn request(&mut self, method: &str, target: &str, body: &[u8]) -> std::io::Result<Resp> {
        use std::io::Write as _;
        // One buffer per connection, reused: this runs once per request of every player.
        self.out.clear();
        write!(
            self.out,
            "{method} {target} HTTP/1.1\r\nHost: {}\r\n",
            self.host
        )?;
        if !body.is_empty() {
            write!(
                self.out,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )?;
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body);
        self.stream.write_all(&self.out).await?;
        loop {
            if let Some((head_len, resp_head)) = parse_head(&self.buf)? {
                let total = match resp_head.length {
                    BodyLength::Known(n) => head_len + n,
                    BodyLength::Chunked => match chunked_len(&self.buf[head_len..]) {
                        Some(n) => head_len + n,
                        None => usize::MAX,
                    },
                };
                if self.buf.len() >= total {
                    let body = match resp_head.length {
                        BodyLength::Known(_) => self.buf[head_len..total].to_vec(),
                        BodyLength::Chunked => dechunk(&self.buf[head_len..total]),
                    };
                    self.buf.drain(..total);
                    return Ok(Resp {
                        status: resp_head.status,
                        published_us: resp_head.published_us,
                        received_us: self.received_us,
                        body,
                        wire_len: total,
                    });
                }
            }
            // Read straight into the spare capacity (no zeroed scratch buffer, no extra copy),
            // with the kernel's receive timestamp.
            self.buf.reserve(16 * 1024);
            let (n, at) = loop {
                self.stream.readable().await?;
                let buf = &mut self.buf;
                let fd = std::os::fd::AsRawFd::as_raw_fd(&self.stream);
                match self
                    .stream
                    .try_io(tokio::io::Interest::READABLE, || recv_timestamped(fd, buf))
                {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => break r?,
                }
            };
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.received_us = at;
        }
    }
}

/// Ask the kernel to timestamp received data (`SO_TIMESTAMPNS`): a response's delivery is
/// then the instant it reached the player's socket, not when this process (sharing the CPU with
/// the packager and 10^4 other players) got around to reading it.
fn enable_receive_timestamps(stream: &TcpStream) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `recvmsg` into `buf`'s spare capacity; returns the bytes read and the kernel receive
/// timestamp (Unix µs) of the last of them, if the kernel attached one.
fn recv_timestamped(
    fd: std::os::fd::RawFd,
    buf: &mut Vec<u8>,
) -> std::io::Result<(usize, Option<u64>)> {
    let spare = buf.spare_capacity_mut();
    let mut iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    // u64s: the control buffer must be aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: fd is an open socket; msg describes writable memory of the stated sizes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialized the first n bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    let mut at = None;
    // SAFETY: walking the control messages the kernel wrote into `control`, bounded by
    // msg_controllen; the timestamp is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                at = Some(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n, at))
}

enum BodyLength {
    Known(usize),
    Chunked,
}

struct Head {
    status: u16,
    length: BodyLength,
    published_us: Option<u64>,
}

/// Sans-IO: parse a response head at the start of `buf` if it is complete.
fn parse_head(buf: &[u8]) -> std::io::Result<Option<(usize, Head)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("response head too long"));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(std::io::Error::other)?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let mut length = BodyLength::Known(0);
    let mut published_us = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            length = BodyLength::Known(v.parse().map_err(std::io::Error::other)?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked") {
            length = BodyLength::Chunked;
        } else if k.eq_ignore_ascii_case(amphi_packager::PUBLISHED_HEADER) {
            published_us = v.parse().ok();
        }
    }
    Ok(Some((
        end + 4,
        Head {
            status,
            length,
            published_us,
        },
    )))
}

/// Length of a complete chunked body at the start of `b`, if complete.
fn chunked_len(b: &[u8]) -> Option<usize> {
    let mut pos = 0;
    for _ in 0..100_000 {
        let eol = b[pos..].windows(2).position(|w| w == b"\r\n")?;
        let n =
            usize::from_str_radix(std::str::from_utf8(&b[pos..pos + eol]).ok()?.trim(), 16).ok()?;
        pos += eol + 2 + n + 2;
        if pos > b.len() {
            return None;
        }
        if n == 0 {
            return Some(pos);
        }
    }
    None
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let Some(n) = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
        else {
            break;
        };
        if n == 0 || b.len() < eol + 2 + n {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
    out
}

/// The part named by `EXT-X-PRELOAD-HINT` in a playlist (searched from the end, where the
/// writer puts it: this runs once per response for every simulated player).
fn preload_hint(body: &[u8]) -> Option<(u64, u32)> {
    const TAG: &[u8] = b"#EXT-X-PRELOAD-HINT:";
    let at = body.windows(TAG.len()).rposition(|w| w == TAG)?;
    let rest = &body[at..];
    let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let line = std::str::from_utf8(&rest[..end]).ok()?;
    let uri = line.split("URI=\"").nth(1)?.split('"').next()?;
    let (m, p) = uri
        .strip_prefix("part")?
        .strip_suffix(".m4a")?
        .split_once('.')?;
    Some((m.parse().ok()?, p.parse().ok()?))
}

/// Wall clock, Unix µs.
pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Counters {
    playlists: AtomicU64,
    parts: AtomicU64,
    part_bytes: AtomicU64,
    errors: AtomicU64,
}

/// One player until `stop`; returns `(msn, part, delay_us, waited)` of measured blocking
/// reloads (`waited`: the request was sent before the part's publication, so the packager held
/// it; otherwise the player was late and got the playlist at once).
async fn player(
    host: String,
    path: String,
    dir: String,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    c: Arc<Counters>,
    fetch_parts: bool,
) -> Vec<(u64, u32, u32, bool)> {
    let mut out = Vec::new();
    let mut conn = None;
    for _ in 0..1_000_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let cn = match &mut conn {
            Some(c) => c,
            None => match Conn::open(&host).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        // Join at the live edge.
        let mut hint = match cn.get(&path).await {
            Ok(r) if r.status == 200 => preload_hint(&r.body),
            _ => None,
        };
        let Some(_) = hint else {
            c.errors.fetch_add(1, Ordering::Relaxed);
            conn = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while let Some((msn, part)) = hint {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let sent = unix_us();
            let r = match cn
                .get(&format!("{path}?_HLS_msn={msn}&_HLS_part={part}"))
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                    break;
                }
            };
            let got = r.received_us.unwrap_or_else(unix_us);
            if r.status != 200 {
                c.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            c.playlists.fetch_add(1, Ordering::Relaxed);
            if measuring.load(Ordering::Relaxed) {
                if let Some(p) = r.published_us {
                    let delay = got.saturating_sub(p).min(u32::MAX as u64) as u32;
                    out.push((msn, part, delay, sent < p));
                }
            }
            if fetch_parts {
                match cn.get(&format!("{dir}part{msn}.{part}.m4a")).await {
                    Ok(p) if p.status == 200 => {
                        c.parts.fetch_add(1, Ordering::Relaxed);
                        c.part_bytes
                            .fetch_add(p.body.len() as u64, Ordering::Relaxed);
                    }
                    _ => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            hint = preload_hint(&r.body);
        }
    }
    out
}

/// Cumulative buckets `(le seconds, count)` of `amphi_packager_blocking_release_seconds`
/// (`+Inf` as infinity, last).
fn release_histogram(metrics: &[u8]) -> Vec<(f64, u64)> {
    let text = String::from_utf8_lossy(metrics);
    text.lines()
        .filter_map(|l| l.strip_prefix("amphi_packager_blocking_release_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect()
}

/// The smallest bucket bound (ms) holding quantile `q` of cumulative `buckets`.
fn bucket_quantile(buckets: &[(f64, u64)], q: f64) -> String {
    let total = buckets.last().map_or(0, |b| b.1);
    if total == 0 {
        return "n/a".into();
    }
    let want = (total as f64 * q).ceil() as u64;
    match buckets.iter().find(|(_, n)| *n >= want) {
        Some((le, _)) if le.is_finite() => format!("{}", le * 1000.0),
        _ => "inf".into(),
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// (RSS kB, peak RSS kB, CPU seconds) of a process.
fn proc_stats(pid: u32) -> Option<(u64, u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let cpu = crate::loadgen_webrtc::process_cpu(pid).ok()?.total();
    Some((kb("VmRSS:")?, kb("VmHWM:")?, cpu))
}

async fn drive(
    url: &str,
    players: usize,
    seconds: u64,
    ramp_batch: usize,
    fetch_parts: bool,
    packager_pid: Option<u32>,
) -> Result<PackagerRun> {
    let rest = url
        .strip_prefix("http://")
        .context("--url must be a plain http:// media playlist URL")?;
    let (host, path) = rest.split_at(rest.find('/').context("URL has no path")?);
    let dir = path[..path.rfind('/').unwrap_or(0) + 1].to_string();
    let (host, path) = (host.to_string(), path.to_string());
    let metrics_path = "/metrics".to_string();
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    // Wait until the playlist has a part; keep the size of a blocking reload's response.
    let deadline = Instant::now() + Duration::from_secs(15);
    let response_len = loop {
        if let Ok(mut c) = Conn::open(&host).await {
            if let Ok(r) = c.get(&path).await {
                if let Some((msn, part)) = preload_hint(&r.body).filter(|h| *h != (0, 0)) {
                    let held = format!("{path}?_HLS_msn={msn}&_HLS_part={part}");
                    if let Ok(r) = c.get(&held).await.map(|r| r.wire_len) {
                        break r;
                    }
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{url} never listed a part");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("loadgen hls: {players} players against {url}, ramping up ({ramp_batch} per 50 ms)");
    let mut tasks = Vec::with_capacity(players);
    let ramp_start = Instant::now();
    for i in 0..players {
        tasks.push(tokio::spawn(player(
            host.clone(),
            path.clone(),
            dir.clone(),
            measuring.clone(),
            stop.clone(),
            counters.clone(),
            fetch_parts,
        )));
        if (i + 1) % ramp_batch.max(1) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Let every player reach the live edge, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ramp = ramp_start.elapsed();
    let before = packager_pid.and_then(proc_stats);
    let own_before = proc_stats(std::process::id());
    let base = (
        counters.playlists.load(Ordering::Relaxed),
        counters.parts.load(Ordering::Relaxed),
        counters.errors.load(Ordering::Relaxed),
    );
    let release_before = match Conn::open(&host).await {
        Ok(mut c) => c
            .get(&metrics_path)
            .await
            .ok()
            .map(|r| release_histogram(&r.body)),
        Err(_) => None,
    };
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let mut held_max = 0f64;
    let mut held_sum = 0f64;
    let mut held_n = 0u32;
    let mut mconn = Conn::open(&host).await.ok();
    while t0.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(c) = &mut mconn {
            if let Ok(r) = c.get(&metrics_path).await {
                let text = String::from_utf8_lossy(&r.body);
                if let Some(v) = text
                    .lines()
                    .find(|l| l.starts_with("amphi_packager_blocking_requests_in_flight "))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok())
                {
                    held_max = held_max.max(v);
                    held_sum += v;
                    held_n += 1;
                }
            }
        }
    }
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let release_after = match &mut mconn {
        Some(c) => c
            .get(&metrics_path)
            .await
            .ok()
            .map(|r| release_histogram(&r.body)),
        None => None,
    };
    let after = packager_pid.and_then(proc_stats);
    let own_after = proc_stats(std::process::id());
    let totals = (
        counters.playlists.load(Ordering::Relaxed) - base.0,
        counters.parts.load(Ordering::Relaxed) - base.1,
        counters.errors.load(Ordering::Relaxed) - base.2,
    );
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for t in tasks {
        if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(10), t).await {
            samples.extend(v);
        }
    }
    let mut per_response: Vec<u32> = samples.iter().map(|s| s.2).collect();
    per_response.sort_unstable();
    let PerPublication {
        full,
        all_waiting,
        all_players,
        waiting_mean,
    } = per_publication(samples.iter().map(|&(m, p, d, waited)| ((m, p), d, waited)));
    println!(
        "ramp-up {:.1} s, measured {:.1} s",
        ramp.as_secs_f64(),
        elapsed
    );
    println!(
        "blocking playlist requests held by the packager: peak {held_max:.0}, mean {:.0} (sampled every 100 ms)",
        if held_n > 0 { held_sum / f64::from(held_n) } else { f64::NAN }
    );
    println!(
        "throughput: {:.0} blocking reloads/s, {:.0} part fetches/s, {} errors",
        totals.0 as f64 / elapsed,
        totals.1 as f64 / elapsed,
        totals.2
    );
    println!("delivery = kernel receive timestamp of the response in the player's socket (SO_TIMESTAMPNS)");
    println!(
        "publication -> delivery, per response: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} responses)",
        percentile(&per_response, 0.5),
        percentile(&per_response, 0.99),
        percentile(&per_response, 1.0),
        per_response.len()
    );
    println!(
        "publication -> delivered to all waiting players (request sent before the publication), per part: p50 {:.1} ms, p99 {:.1} ms ({} parts, {} players each, {:.0} of them waiting on average)",
        percentile(&all_waiting, 0.5),
        percentile(&all_waiting, 0.99),
        all_waiting.len(),
        full,
        waiting_mean
    );
    println!(
        "publication -> delivered to every player that asked for the part (late ones too), per part: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&all_players, 0.5),
        percentile(&all_players, 0.99),
    );
    if let (Some(b), Some(a)) = (release_before, release_after) {
        let delta: Vec<(f64, u64)> = a
            .iter()
            .zip(&b)
            .map(|((le, n1), (_, n0))| (*le, n1.saturating_sub(*n0)))
            .collect();
        println!(
            "packager side, publication -> held request answered (histogram bucket upper bounds): p50 <= {} ms, p99 <= {} ms ({} answers)",
            bucket_quantile(&delta, 0.5),
            bucket_quantile(&delta, 0.99),
            delta.last().map_or(0, |d| d.1)
        );
    }
    if let (Some(b), Some(a)) = (before, after) {
        let cpu = (a.2 - b.2) / elapsed * 100.0;
        let requests = totals.0 + totals.1;
        let per_request = (a.2 - b.2) * 1e6 / requests.max(1) as f64;
        println!(
            "packager process: RSS {:.1} MiB (peak {:.1} MiB), CPU {cpu:.0}% of one core (single-threaded runtime), {per_request:.1} us per request",
            a.0 as f64 / 1024.0,
            a.1 as f64 / 1024.0
        );
    }
    if let (Some(b), Some(a)) = (own_before, own_after) {
        let cpu = (a.2 - b.2) / elapsed * 100.0;
        println!(
            "load generator process (the players): CPU {cpu:.0}% of one core; machine load average {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if totals.0 == 0 {
        bail!("no blocking reload completed");
    }
    Ok(PackagerRun {
        response_len,
        all_waiting_ms: (
            percentile(&all_waiting, 0.5),
            percentile(&all_waiting, 0.99),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_bodies_and_hints_parse() {
        let raw =
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-amphi-published-us: 17\r\n\r\nabcHTTP";
        let (n, h) = parse_head(raw).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.published_us, Some(17));
        assert!(matches!(h.length, BodyLength::Known(3)));
        assert_eq!(&raw[n..n + 3], b"abc");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n").unwrap().is_none());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        let chunked = b"3\r\nabc\r\n0\r\n\r\nrest";
        assert_eq!(chunked_len(chunked), Some(chunked.len() - 4));
        assert_eq!(dechunk(chunked), b"abc");
        assert_eq!(chunked_len(b"3\r\nab"), None);
        let pl = b"#EXTM3U\n#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part12.3.m4a\"\n";
        assert_eq!(preload_hint(pl), Some((12, 3)));
        assert_eq!(preload_hint(b"#EXTM3U\n#EXT-X-ENDLIST\n"), None);
        assert_eq!(percentile(&[1000, 2000, 3000], 0.5), 2.0);
        let m = b"x 1\namphi_packager_blocking_release_seconds_bucket{le=\"0.001\"} 5\n\
amphi_packager_blocking_release_seconds_bucket{le=\"0.01\"} 99\n\
amphi_packager_blocking_release_seconds_bucket{le=\"+Inf\"} 100\n";
        let h = release_histogram(m);
        assert_eq!(h.len(), 3);
        assert_eq!(bucket_quantile(&h, 0.5), "10");
        assert_eq!(bucket_quantile(&h, 0.999), "inf");
    }
}
