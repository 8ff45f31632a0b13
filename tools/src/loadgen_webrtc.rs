//! `amphi-tools loadgen webrtc` and `amphi-tools bench sfu`: real receive-only WebRTC subscribers (str0m WHEP
//! clients: ICE, DTLS-SRTP on loopback) against one edge while 3 WHIP speakers talk continuously
//! (50 packets/s each).
//!
//! The figures: the edge process's CPU time (from `/proc/<pid>/stat`, so the load generator's own
//! CPU is excluded: the edge runs in a separate `amphi dev` process) per audio packet the
//! subscribers actually received; loss (received vs. 3 x 50 packets/s per subscriber); the edge's
//! forwarding delay (ingress to send call) p50/p99 from its `amphi_edge_forward_delay_seconds`
//! histogram; subscribers served per core at < 1 % loss.

use crate::child_mesh::ChildMesh;
use amphi_testkit::whep_client::{WhepOptions, WhepStats, WhepSubscriber};
use amphi_testkit::whip_client::WhipPublisher;
use anyhow::{ensure, Context, Result};
use clap::Args;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Speakers talking during a run.
const SPEAKERS: usize = 3;
/// Packets per second per speaker (20 ms Opus frames).
const PPS: u64 = 50;
/// Subscribers connecting at once.
const CONNECT_BATCH: usize = 16;
/// Most datagrams sent when measuring the loopback send floor.
const FLOOR_MAX_DATAGRAMS: usize = 200_000;
/// Bytes an SRTP datagram adds to the Opus payload: RTP header with the audio-level and mid
/// extensions, and the AES-GCM tag.
const SRTP_OVERHEAD: usize = 40;

/// Options of `amphi-tools loadgen webrtc`.
#[derive(Args, Debug)]
pub struct WebrtcArgs {
    /// Geo-router base URL (creates the room, mints tokens).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    router: String,
    /// Edge base URL (WHIP and WHEP).
    #[arg(long, default_value = "http://127.0.0.1:8101")]
    edge: String,
    /// Pid of the process running the edge, to measure its CPU time.
    #[arg(long)]
    edge_pid: Option<u32>,
    /// Receive-only subscribers.
    #[arg(long, default_value_t = 50)]
    subscribers: usize,
    /// Measured seconds (after a 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// Options of `amphi-tools bench sfu`.
#[derive(Args, Debug)]
pub struct SfuArgs {
    /// Subscriber counts to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "25,50,100,200")]
    subscribers: Vec<usize>,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Port offset of the `amphi dev` mesh it starts.
    #[arg(long, default_value_t = 21_000)]
    port_offset: u16,
    /// Media driver threads of the edge, one run each, side by side (1: no sharding).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    media_threads: Vec<usize>,
    /// Short run for CI: 4 subscribers, 3 s, edge media threads 2.
    #[arg(long)]
    smoke: bool,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Subscribers connected.
    pub subscribers: usize,
    /// Measured wall time.
    pub wall: Duration,
    /// Packets the subscribers received in the window.
    pub delivered: u64,
    /// Packets they should have received.
    pub expected: u64,
    /// Edge process CPU times in the window (if its pid is known).
    pub cpu: Option<CpuTimes>,
    /// CPU times of the edge's media driver thread in the window (if its pid is known).
    pub media_cpu: Option<CpuTimes>,
    /// Mean size of the delivered RTP payloads, bytes.
    pub mean_payload: f64,
    /// Forwarding delay p50 and p99 upper bounds (µs) from the edge histogram.
    pub delay_us: Option<(f64, f64)>,
    /// Times the load generator's runtime threads (where the subscribers read their sockets)
    /// went to sleep in the window: each is a wake-up that, on loopback, the edge's send pays.
    pub receiver_sleeps: u64,
}

impl LoadReport {
    /// Fraction of expected packets not received.
    pub fn loss(&self) -> f64 {
        if self.expected == 0 {
            return 0.0;
        }
        (1.0 - self.delivered as f64 / self.expected as f64).max(0.0)
    }

    /// Microseconds of `seconds` per delivered packet.
    fn per_packet_us(&self, seconds: f64) -> Option<f64> {
        (self.delivered > 0).then(|| seconds * 1e6 / self.delivered as f64)
    }
}

/// User and system CPU seconds of a process or thread, from its `/proc/.../stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// Seconds in user mode (our code, str0m, crypto).
    pub user: f64,
    /// Seconds in the kernel (syscalls, and on loopback the receivers' softirq work too).
    pub system: f64,
}

impl CpuTimes {
    /// User plus system seconds.
    pub fn total(&self) -> f64 {
        self.user + self.system
    }

    fn minus(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }

    fn plus(self, other: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }
}

/// Command name and CPU times from the text of a `/proc/<pid>[/task/<tid>]/stat` file.
fn parse_stat(stat: &str) -> Result<(String, CpuTimes)> {
    let (head, rest) = stat.rsplit_once(')').context("bad /proc stat")?;
    let comm = head
        .split_once('(')
        .context("bad /proc stat")?
        .1
        .to_string();
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 13, "short /proc stat");
    let ticks = clock_ticks();
    let times = CpuTimes {
        user: f[11].parse::<u64>()? as f64 / ticks,
        system: f[12].parse::<u64>()? as f64 / ticks,
    };
    Ok((comm, times))
}

/// CPU times of a whole process so far.
pub(crate) fn process_cpu(pid: u32) -> Result<CpuTimes> {
    Ok(parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)?.1)
}

/// Summed CPU times of the process's threads named `name` (the edge media driver's thread).
fn threads_cpu(pid: u32, name: &str) -> Result<CpuTimes> {
    let mut sum = CpuTimes::default();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(text) = std::fs::read_to_string(task?.path().join("stat")) else {
            continue; // the thread exited meanwhile
        };
        let (comm, times) = parse_stat(&text)?;
        if comm == name {
            sum = sum.plus(times);
        }
    }
    Ok(sum)
}

/// Voluntary context switches (each a sleep, then a wake-up) of `pid`'s threads whose name
/// starts with `prefix`, summed.
pub(crate) fn thread_sleeps(pid: u32, prefix: &str) -> Result<u64> {
    let mut sum = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // the thread exited meanwhile
        };
        if !comm.starts_with(prefix) {
            continue;
        }
        sum += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(sum)
}

/// Name prefix of the load generator's tokio runtime threads (workers and blocking pool).
const RUNTIME_THREADS: &str = "tokio-r";

/// CPU times of the edge: the whole process and its media thread.
fn edge_cpu(pid: u32) -> Result<(CpuTimes, CpuTimes)> {
    Ok((
        process_cpu(pid)?,
        threads_cpu(pid, amphi_edge::MEDIA_THREAD_NAME)?,
    ))
}

/// CPU seconds (user + system) of the calling thread so far.
/// CPU time (user + system) of the calling thread, µs, at nanosecond resolution (`/proc`
/// counts whole clock ticks, too coarse for a few milliseconds of sending).
pub(crate) fn thread_cpu_us() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec that outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
}

/// How the floor's receiving sockets take their datagrams. On loopback the sender's `sendmmsg`
/// runs the receive path too, so this decides part of what the floor costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloorReceivers {
    /// Swept by one thread every 0.5 ms: nobody ever sleeps on a receiving socket, so the
    /// sender never pays a wake-up.
    Polled,
    /// Each socket read by its own task on a 2-worker tokio runtime that sleeps in `epoll_wait`
    /// between datagrams, as the load generator's subscribers do: the sender pays their wake-ups,
    /// as the edge does on loopback.
    Sleeping,
}

/// The kernel's CPU cost of the edge's send path alone: `datagrams` datagrams of `len` bytes
/// sent round-robin to `receivers` loopback sockets with the edge's own `sendmmsg` batching, one
/// round (a datagram to every receiver) per `round_every`, while `mode` drains the receivers.
/// On loopback the sending thread's CPU includes the receivers' softirq work, as it does for the
/// edge.
pub fn loopback_send_floor(
    receivers: usize,
    datagrams: usize,
    len: usize,
    mode: FloorReceivers,
    round_every: Duration,
) -> Result<SendCost> {
    loopback_send_cost(
        receivers,
        datagrams,
        len,
        mode,
        round_every,
        |sender, round| amphi_edge::batch::send_batches(sender, round, |(d, b)| (*d, b)).sent,
    )
}

/// What sending to loopback receivers cost.
#[derive(Debug, Clone, Copy)]
pub struct SendCost {
    /// CPU microseconds of the sending thread per sent datagram.
    pub us_per_datagram: f64,
    /// Datagrams sent.
    pub sent: usize,
    /// Times the receivers' threads went to sleep (and so were woken) meanwhile, for
    /// [`FloorReceivers::Sleeping`].
    pub receiver_sleeps: Option<u64>,
}

/// The cost of `send`, which is handed rounds of up to `receivers` datagrams (one per receiver,
/// `len` bytes each, a round per `round_every`) and returns how many it sent, until `datagrams`
/// were attempted; the receivers are drained as `mode` says meanwhile.
pub fn loopback_send_cost(
    receivers: usize,
    datagrams: usize,
    len: usize,
    mode: FloorReceivers,
    round_every: Duration,
    mut send: impl FnMut(&std::net::UdpSocket, &[(std::net::SocketAddr, &[u8])]) -> usize,
) -> Result<SendCost> {
    ensure!(receivers > 0 && datagrams > 0, "nothing to send");
    let sockets = (0..receivers)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let targets = sockets
        .iter()
        .map(|s| s.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let drain = match mode {
        FloorReceivers::Polled => {
            let stop = stop.clone();
            Drain::Thread(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    for s in &sockets {
                        while s.recv(&mut buf).is_ok() {}
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
            }))
        }
        FloorReceivers::Sleeping => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(FLOOR_RECEIVER_THREADS)
                .enable_io()
                .build()?;
            for s in sockets {
                let s = {
                    let _entered = runtime.enter();
                    tokio::net::UdpSocket::from_std(s)?
                };
                runtime.spawn(async move {
                    let mut buf = [0u8; 2048];
                    while s.recv(&mut buf).await.is_ok() {}
                });
            }
            Drain::Runtime(runtime)
        }
    };
    let sender = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sender.set_nonblocking(true)?;
    let payload = vec![0x5a_u8; len];
    let round: Vec<(std::net::SocketAddr, &[u8])> =
        targets.iter().map(|t| (*t, &payload[..])).collect();
    let sleeping = mode == FloorReceivers::Sleeping;
    let sleeps = || thread_sleeps(std::process::id(), FLOOR_RECEIVER_THREADS);
    let sleeps_before = if sleeping { sleeps()? } else { 0 };
    let before = thread_cpu_us();
    let (mut attempted, mut sent) = (0, 0);
    let mut next_round = Instant::now();
    while attempted < datagrams {
        let n = (datagrams - attempted).min(round.len());
        sent += send(&sender, &round[..n]);
        attempted += n;
        // Leave the receivers time to empty their buffers, as subscribers would.
        next_round += round_every;
        std::thread::sleep(next_round.saturating_duration_since(Instant::now()));
    }
    let used_us = thread_cpu_us() - before;
    let receiver_sleeps = sleeping
        .then(|| sleeps().map(|after| after.saturating_sub(sleeps_before)))
        .transpose()?;
    stop.store(true, Ordering::Relaxed);
    match drain {
        Drain::Thread(t) => {
            let _ = t.join();
        }
        Drain::Runtime(r) => r.shutdown_background(),
    }
    ensure!(sent > 0, "no datagram could be sent");
    Ok(SendCost {
        us_per_datagram: used_us / sent as f64,
        sent,
        receiver_sleeps,
    })
}

/// Name of the floor's receiving runtime threads.
const FLOOR_RECEIVER_THREADS: &str = "floor-receiver";

/// The send floor for receivers woken `wakes` times per datagram: the polled floor (never woken)
/// plus the sleeping floor's extra cost in proportion to its receivers' wake-ups per datagram
/// (linear in the wake-ups, the part of a loopback send that depends on the receiver).
pub fn wake_adjusted_floor(polled: &SendCost, sleeping: &SendCost, wakes: f64) -> f64 {
    let floor_wakes = sleeping.receiver_sleeps.unwrap_or(0) as f64 / sleeping.sent.max(1) as f64;
    if floor_wakes <= 0.0 {
        return polled.us_per_datagram;
    }
    let per_wake = (sleeping.us_per_datagram - polled.us_per_datagram).max(0.0) / floor_wakes;
    polled.us_per_datagram + per_wake * wakes.max(0.0)
}

/// `a / b` as `1.23x`, or `n/a`.
fn ratio(a: Option<f64>, b: f64) -> String {
    a.filter(|_| b > 0.0)
        .map_or("n/a".into(), |a| format!("{:.2}x", a / b))
}

/// What drains the floor's receiving sockets.
enum Drain {
    /// The sweeping thread of [`FloorReceivers::Polled`].
    Thread(std::thread::JoinHandle<()>),
    /// The runtime of [`FloorReceivers::Sleeping`].
    Runtime(tokio::runtime::Runtime),
}

/// Clock ticks per second of `/proc` CPU times (asked of `getconf` once per process).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Cumulative forwarding-delay histogram buckets (upper bound µs, count) from edge metrics.
fn delay_buckets(metrics: &str) -> Vec<(f64, u64)> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("amphi_edge_forward_delay_seconds_bucket{le=\"")?;
            let (le, rest) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse::<f64>().ok()? * 1e6
            };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect()
}

/// Percentile `p` (0..1) upper bound from the difference of two cumulative histograms.
fn percentile(before: &[(f64, u64)], after: &[(f64, u64)], p: f64) -> Option<f64> {
    let diff: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| {
            let b = before.iter().find(|(l, _)| l == le).map_or(0, |(_, n)| *n);
            (*le, n.saturating_sub(b))
        })
        .collect();
    let total = diff.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (total as f64 * p).ceil() as u64;
    diff.iter().find(|(_, n)| *n >= want).map(|(le, _)| *le)
}

fn get(url: &str) -> Result<String> {
    Ok(ureq::get(url)
        .timeout(Duration::from_secs(5))
        .call()?
        .into_string()?)
}

pub(crate) fn post_json(url: &str, body: serde_json::Value) -> Result<serde_json::Value> {
    Ok(ureq::post(url)
        .timeout(Duration::from_secs(5))
        .send_json(body)?
        .into_json()?)
}

/// Opus packets of a tone (20 ms each), looped by the speakers.
pub(crate) fn tone_packets(freq: f32, n: usize) -> Result<Vec<Vec<u8>>> {
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio)?;
    enc.set_bitrate(opus::Bitrate::Bits(32_000))?;
    let mut out = Vec::with_capacity(n);
    for f in 0..n {
        let pcm: Vec<i16> = (0..960)
            .map(|i| {
                let t = (f * 960 + i) as f32 / 48_000.0;
                ((t * freq * std::f32::consts::TAU).sin() * 8000.0) as i16
            })
            .collect();
        out.push(enc.encode_vec(&pcm, 1500)?);
    }
    Ok(out)
}

/// One load run: a fresh room, 3 speakers, `n` subscribers, `seconds` measured.
pub async fn run_load(
    router: &str,
    edge: &str,
    edge_pid: Option<u32>,
    n: usize,
    seconds: u64,
) -> Result<LoadReport> {
    let (router_s, edge_s) = (router.to_string(), edge.to_string());
    let (room, speaker_tokens, listener_tokens) =
        tokio::task::spawn_blocking(move || -> Result<_> {
            let created = post_json(
                &format!("{router_s}/v1/rooms"),
                serde_json::json!({"title": "sfu load"}),
            )?;
            let room = created["room"].as_str().context("room id")?.to_string();
            let mint = |role: &str, name: String| -> Result<String> {
                let t = post_json(
                    &format!("{router_s}/v1/rooms/{room}/tokens"),
                    serde_json::json!({"role": role, "name": name}),
                )?;
                Ok(t["token"].as_str().context("token")?.to_string())
            };
            let speakers = (0..SPEAKERS)
                .map(|i| mint("speaker", format!("speaker-{i}")))
                .collect::<Result<Vec<_>>>()?;
            let listeners = (0..n)
                .map(|i| mint("listener", format!("sub-{i}")))
                .collect::<Result<Vec<_>>>()?;
            Ok((room, speakers, listeners))
        })
        .await??;
    let whip = format!("{edge}/whip/{room}");
    let whep = format!("{edge}/whep/{room}");

    // Speakers: distinct levels so all three slots carry audio.
    let stop = Arc::new(AtomicBool::new(false));
    let mut speakers = tokio::task::JoinSet::new();
    for (i, token) in speaker_tokens.iter().enumerate() {
        let mut publisher = WhipPublisher::connect(&whip, token)
            .await
            .with_context(|| format!("speaker {i} WHIP"))?;
        let packets = tone_packets(330.0 + 110.0 * i as f32, 50)?;
        let stop = stop.clone();
        speakers.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / PPS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let p = &packets[k as usize % packets.len()];
                if publisher
                    .send_opus(p, k.wrapping_mul(960), 20 + 10 * i as u8)
                    .await
                    .is_err()
                {
                    break;
                }
                k += 1;
            }
            let _ = publisher.close().await;
        });
    }

    // Subscribers, a batch at a time.
    let mut subs: Vec<WhepSubscriber> = Vec::with_capacity(n);
    let opts = WhepOptions {
        keep_packets: false,
        // The subscribers stand in for browsers: Chrome checks a stable pair every 2.5 s.
        ice_check_every: Duration::from_millis(2_500),
        ..WhepOptions::default()
    };
    for chunk in listener_tokens.chunks(CONNECT_BATCH) {
        let mut set = tokio::task::JoinSet::new();
        for token in chunk {
            let (url, token, opts) = (whep.clone(), token.clone(), opts.clone());
            set.spawn(async move { WhepSubscriber::connect_with(&url, &token, opts).await });
        }
        while let Some(r) = set.join_next().await {
            subs.push(r?.context("WHEP subscriber")?);
        }
    }
    let stats: Vec<Arc<WhepStats>> = subs.iter().map(|s| s.stats()).collect();
    let total = |stats: &[Arc<WhepStats>]| stats.iter().map(|s| s.packets()).sum::<u64>();
    let total_bytes = |stats: &[Arc<WhepStats>]| stats.iter().map(|s| s.bytes()).sum::<u64>();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics_url = format!("{edge_s}/metrics");
    let m0 = {
        let u = metrics_url.clone();
        tokio::task::spawn_blocking(move || get(&u)).await??
    };
    let (t0, p0, b0) = (Instant::now(), total(&stats), total_bytes(&stats));
    let c0 = edge_pid.map(edge_cpu).transpose()?;
    let s0 = thread_sleeps(std::process::id(), RUNTIME_THREADS)?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (wall, p1, b1) = (t0.elapsed(), total(&stats), total_bytes(&stats));
    let c1 = edge_pid.map(edge_cpu).transpose()?;
    let s1 = thread_sleeps(std::process::id(), RUNTIME_THREADS)?;
    let m1 = {
        let u = metrics_url.clone();
        tokio::task::spawn_blocking(move || get(&u)).await??
    };

    stop.store(true, Ordering::Relaxed);
    while speakers.join_next().await.is_some() {}
    let mut closing = tokio::task::JoinSet::new();
    for s in subs {
        closing.spawn(async move {
            let _ = s.close().await;
        });
    }
    while closing.join_next().await.is_some() {}

    let (h0, h1) = (delay_buckets(&m0), delay_buckets(&m1));
    let delay_us = percentile(&h0, &h1, 0.5).zip(percentile(&h0, &h1, 0.99));
    let delivered = p1 - p0;
    let window = c0.zip(c1);
    Ok(LoadReport {
        subscribers: n,
        wall,
        delivered,
        expected: (n as f64 * SPEAKERS as f64 * PPS as f64 * wall.as_secs_f64()) as u64,
        cpu: window.map(|((a, _), (b, _))| b.minus(a)),
        media_cpu: window.map(|((_, a), (_, b))| b.minus(a)),
        mean_payload: (b1 - b0) as f64 / delivered.max(1) as f64,
        delay_us,
        receiver_sleeps: s1.saturating_sub(s0),
    })
}

fn describe(r: &LoadReport) -> String {
    let us = |t: Option<CpuTimes>| {
        t.and_then(|t| {
            Some(format!(
                "{:.2} us (user {:.2} + sys {:.2})",
                r.per_packet_us(t.total())?,
                r.per_packet_us(t.user)?,
                r.per_packet_us(t.system)?
            ))
        })
        .unwrap_or_else(|| "n/a".into())
    };
    let delay = r.delay_us.map_or("n/a".into(), |(a, b)| {
        format!("<= {a:.0} us / <= {b:.0} us")
    });
    format!(
        "subscribers {:>4}  delivered {:>8}  loss {:>6.2} %  per delivered packet: edge process {}, media thread {}  forward delay p50/p99 {}",
        r.subscribers,
        r.delivered,
        r.loss() * 100.0,
        us(r.cpu),
        us(r.media_cpu),
        delay
    )
}

/// `amphi-tools loadgen webrtc`.
pub async fn loadgen(args: WebrtcArgs) -> Result<()> {
    amphi_edge::install_crypto_provider();
    let r = run_load(
        &args.router,
        &args.edge,
        args.edge_pid,
        args.subscribers,
        args.seconds,
    )
    .await?;
    println!("{}", describe(&r));
    Ok(())
}

/// `amphi-tools bench sfu`: for each `--media-threads` value, start `amphi dev` (one region) as a child
/// process, measure a baseline with the 3 speakers only, then each subscriber count.
pub async fn bench(args: SfuArgs) -> Result<()> {
    amphi_edge::install_crypto_provider();
    let (counts, seconds, threads) = if args.smoke {
        (vec![4], 3, vec![2])
    } else {
        (
            args.subscribers.clone(),
            args.seconds,
            args.media_threads.clone(),
        )
    };
    ensure!(seconds >= 1, "--seconds must be at least 1");
    for media_threads in threads {
        bench_mesh(&counts, seconds, media_threads, args.port_offset).await?;
    }
    Ok(())
}

/// One `amphi-tools bench sfu` pass against an edge with `media_threads` media threads.
async fn bench_mesh(
    counts: &[usize],
    seconds: u64,
    media_threads: usize,
    offset: u16,
) -> Result<()> {
    // Room for every subscriber of the largest step (the dev default is 500).
    let capacity = counts.iter().max().copied().unwrap_or(0).max(500) + 10;
    let mesh = tokio::task::spawn_blocking(move || {
        let threads = media_threads.to_string();
        let capacity = capacity.to_string();
        ChildMesh::start(
            "bench-sfu",
            offset,
            &[
                "--regions",
                "us-east",
                "--media-threads",
                &threads,
                "--interactive-capacity",
                &capacity,
            ],
        )
    })
    .await??;
    let pid = mesh.pid();
    let router = mesh.router_url();
    let edge = mesh.edge_url(0);
    println!(
        "amphi-tools bench sfu: edge in `amphi dev --regions us-east --media-threads {media_threads}` (pid {pid}), {SPEAKERS} speakers x {PPS} packets/s, {seconds} s per step"
    );
    let base = run_load(&router, &edge, Some(pid), 0, seconds).await?;
    let base_rate = base.cpu.unwrap_or_default().total() / base.wall.as_secs_f64();
    println!(
        "baseline (speakers only, whole dev process incl. origin mixer and packager): {base_rate:.3} CPU s/s"
    );
    let mut best: Option<(LoadReport, f64)> = None;
    for &n in counts {
        let r = run_load(&router, &edge, Some(pid), n, seconds).await?;
        let cpu = r.cpu.unwrap_or_default().total();
        let marginal = (cpu - base_rate * r.wall.as_secs_f64()).max(0.0);
        println!(
            "{}  whole-process marginal over baseline {:.2} us/packet",
            describe(&r),
            r.per_packet_us(marginal).unwrap_or(0.0)
        );
        // The kernel's share, measured right after on the same machine: the same number of
        // datagrams of the same size through the edge's own sendmmsg path to n loopback sockets.
        let datagrams = (r.delivered as usize).clamp(1, FLOOR_MAX_DATAGRAMS);
        let len = r.mean_payload.round() as usize + SRTP_OVERHEAD;
        // Two floors: receivers swept by a polling thread (never woken), and receivers sleeping
        // in epoll as the subscribers do, sent to at the speakers' cadence (a round per speaker
        // packet). Idle receivers wake far more often than busy subscribers, so the floor
        // compared with is the polled one plus the wake-ups' share at the subscribers' rate.
        let media = r.media_cpu.and_then(|t| r.per_packet_us(t.total()));
        let subscriber_wakes = r.receiver_sleeps as f64 / r.delivered.max(1) as f64;
        let mut costs = Vec::new();
        for (mode, round_every, what) in [
            (
                FloorReceivers::Polled,
                Duration::from_millis(1),
                "receivers polled, a round per ms",
            ),
            (
                FloorReceivers::Sleeping,
                Duration::from_micros(1_000_000 / (SPEAKERS as u64 * PPS)),
                "receivers sleeping in epoll, a round per speaker packet",
            ),
        ] {
            let cost = tokio::task::spawn_blocking(move || {
                loopback_send_floor(n.max(1), datagrams, len, mode, round_every)
            })
            .await??;
            let wakes = cost.receiver_sleeps.map_or(String::new(), |s| {
                format!(
                    ", receivers woken {:.1} times per 1,000 datagrams",
                    s as f64 * 1000.0 / cost.sent.max(1) as f64
                )
            });
            println!(
                "  loopback send floor ({what}; {datagrams} datagrams of {len} B to {n} sockets, same sendmmsg path): {:.2} us/datagram{wakes}; media thread / floor {}",
                cost.us_per_datagram,
                ratio(media, cost.us_per_datagram)
            );
            costs.push(cost);
        }
        if let [polled, sleeping] = costs[..] {
            let floor = wake_adjusted_floor(&polled, &sleeping, subscriber_wakes);
            println!(
                "  floor at the subscribers' wake-ups ({:.1} per 1,000 packets): {floor:.2} us/datagram; media thread {}",
                subscriber_wakes * 1000.0,
                media.map_or("n/a".into(), |m| format!(
                    "{:.2} us/packet above it = {}",
                    m - floor,
                    ratio(Some(m), floor)
                ))
            );
        }
        if r.loss() < 0.01 && marginal > 0.0 {
            let per_core = r.subscribers as f64 * r.wall.as_secs_f64() / marginal;
            best = Some((r, per_core));
        }
    }
    match best {
        Some((r, per_core)) => println!(
            "subscribers per core at < 1 % loss: {per_core:.0} (from {} subscribers, whole-process CPU above the speakers-only baseline)",
            r.subscribers
        ),
        None => println!("no step stayed under 1 % loss"),
    }
    drop(mesh);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_from_metrics() {
        let before = "amphi_edge_forward_delay_seconds_bucket{le=\"0.00001\"} 5\n\
                      amphi_edge_forward_delay_seconds_bucket{le=\"0.0001\"} 10\n\
                      amphi_edge_forward_delay_seconds_bucket{le=\"+Inf\"} 10\n";
        let after = "amphi_edge_forward_delay_seconds_bucket{le=\"0.00001\"} 55\n\
                     amphi_edge_forward_delay_seconds_bucket{le=\"0.0001\"} 108\n\
                     amphi_edge_forward_delay_seconds_bucket{le=\"+Inf\"} 110\n";
        let (b, a) = (delay_buckets(before), delay_buckets(after));
        assert_eq!(b.len(), 3);
        assert_eq!(percentile(&b, &a, 0.5), Some(10.0));
        assert_eq!(percentile(&b, &a, 0.99), Some(f64::INFINITY));
        assert_eq!(percentile(&b, &a, 0.9), Some(100.0));
        assert_eq!(percentile(&b, &b, 0.5), None);
    }

    #[test]
    fn the_floor_is_adjusted_to_the_subscribers_wake_ups() {
        let polled = SendCost {
            us_per_datagram: 2.0,
            sent: 1_000,
            receiver_sleeps: None,
        };
        let sleeping = SendCost {
            us_per_datagram: 3.0,
            sent: 1_000,
            receiver_sleeps: Some(200),
        };
        // 1 µs more for 0.2 wake-ups per datagram: 5 µs per wake-up.
        assert!((wake_adjusted_floor(&polled, &sleeping, 0.0) - 2.0).abs() < 1e-9);
        assert!((wake_adjusted_floor(&polled, &sleeping, 0.02) - 2.1).abs() < 1e-9);
        assert!((wake_adjusted_floor(&polled, &sleeping, 0.2) - 3.0).abs() < 1e-9);
        let never_woken = SendCost {
            receiver_sleeps: Some(0),
            ..sleeping
        };
        assert_eq!(wake_adjusted_floor(&polled, &never_woken, 0.1), 2.0);
        assert_eq!(ratio(Some(3.0), 2.0), "1.50x");
        assert_eq!(ratio(None, 2.0), "n/a");
    }

    #[test]
    fn report_math() {
        let r = LoadReport {
            subscribers: 2,
            wall: Duration::from_secs(1),
            delivered: 297,
            expected: 300,
            cpu: Some(CpuTimes {
                user: 0.002,
                system: 0.001,
            }),
            media_cpu: None,
            mean_payload: 80.0,
            delay_us: None,
            receiver_sleeps: 0,
        };
        assert!((r.loss() - 0.01).abs() < 1e-9);
        assert!((r.per_packet_us(r.cpu.unwrap().total()).unwrap() - 10.1).abs() < 0.1);
    }

    #[test]
    fn stat_lines_give_name_and_times() {
        let ticks = clock_ticks();
        let line = "4242 (edge-media) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0 0";
        let (comm, t) = parse_stat(line).unwrap();
        assert_eq!(comm, "edge-media");
        assert!((t.user - 250.0 / ticks).abs() < 1e-9);
        assert!((t.system - 50.0 / ticks).abs() < 1e-9);
        // Names may hold spaces and parentheses.
        let (comm, _) = parse_stat("7 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 1 1 0 0").unwrap();
        assert_eq!(comm, "a (b) c");
        assert!(parse_stat("7 (x) R 1 2").is_err());
    }

    #[test]
    fn named_threads_are_measured_apart_from_the_process() {
        let me = std::process::id();
        let spinner = std::thread::Builder::new()
            .name("cpu-probe".into())
            .spawn(move || {
                let spin = Instant::now();
                while spin.elapsed() < Duration::from_millis(100) {}
                threads_cpu(me, "cpu-probe").unwrap()
            })
            .unwrap();
        let probe = spinner.join().unwrap();
        assert!(probe.total() > 0.0, "{probe:?}");
        // The whole process spent at least that too, give or take the kernel's tick rounding.
        let slack = 2.0 / clock_ticks();
        assert!(process_cpu(me).unwrap().total() + slack >= probe.total());
        assert_eq!(
            threads_cpu(me, "no-such-thread").unwrap(),
            CpuTimes::default()
        );
    }

    #[test]
    fn loopback_floor_is_positive() {
        for mode in [FloorReceivers::Polled, FloorReceivers::Sleeping] {
            let cost =
                loopback_send_floor(4, 2_000, 120, mode, Duration::from_micros(200)).unwrap();
            let floor = cost.us_per_datagram;
            assert!(floor > 0.0 && floor.is_finite(), "{mode:?}: {floor}");
            assert_eq!(cost.sent, 2_000);
            assert_eq!(
                cost.receiver_sleeps.is_some(),
                mode == FloorReceivers::Sleeping
            );
        }
    }
}
