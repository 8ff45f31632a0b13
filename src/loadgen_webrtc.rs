//! `amphi loadgen webrtc` and `amphi bench sfu`: real receive-only WebRTC subscribers (str0m WHEP
//! clients: ICE, DTLS-SRTP on loopback) against one edge while 3 WHIP speakers talk continuously
//! (50 packets/s each).
//!
//! The figures: the edge process's CPU time (from `/proc/<pid>/stat`, so the load generator's own
//! CPU is excluded: the edge runs in a separate `amphi dev` process) per audio packet the
//! subscribers actually received; loss (received vs. 3 x 50 packets/s per subscriber); the edge's
//! forwarding delay (ingress to send call) p50/p99 from its `amphi_edge_forward_delay_seconds`
//! histogram; subscribers served per core at < 1 % loss.

use crate::child_mesh::ChildMesh;
use amphi_edge::whep_client::{WhepOptions, WhepStats, WhepSubscriber};
use amphi_edge::whip_client::WhipPublisher;
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

/// Options of `amphi loadgen webrtc`.
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

/// Options of `amphi bench sfu`.
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
    /// Short run for CI: 4 subscribers, 3 s.
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
    /// Edge process CPU seconds in the window (if its pid is known).
    pub cpu_s: Option<f64>,
    /// Forwarding delay p50 and p99 upper bounds (µs) from the edge histogram.
    pub delay_us: Option<(f64, f64)>,
}

impl LoadReport {
    /// Fraction of expected packets not received.
    pub fn loss(&self) -> f64 {
        if self.expected == 0 {
            return 0.0;
        }
        (1.0 - self.delivered as f64 / self.expected as f64).max(0.0)
    }

    /// Edge CPU microseconds per delivered packet.
    pub fn cpu_us_per_packet(&self) -> Option<f64> {
        let cpu = self.cpu_s?;
        (self.delivered > 0).then(|| cpu * 1e6 / self.delivered as f64)
    }
}

/// CPU seconds (user + system) of a process so far.
fn process_cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 13, "short /proc stat");
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
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

fn post_json(url: &str, body: serde_json::Value) -> Result<serde_json::Value> {
    Ok(ureq::post(url)
        .timeout(Duration::from_secs(5))
        .send_json(body)?
        .into_json()?)
}

/// Opus packets of a tone (20 ms each), looped by the speakers.
fn tone_packets(freq: f32, n: usize) -> Result<Vec<Vec<u8>>> {
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

    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics_url = format!("{edge_s}/metrics");
    let m0 = {
        let u = metrics_url.clone();
        tokio::task::spawn_blocking(move || get(&u)).await??
    };
    let (t0, p0) = (Instant::now(), total(&stats));
    let c0 = edge_pid.map(process_cpu_s).transpose()?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (wall, p1) = (t0.elapsed(), total(&stats));
    let c1 = edge_pid.map(process_cpu_s).transpose()?;
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

    let (b0, b1) = (delay_buckets(&m0), delay_buckets(&m1));
    let delay_us = percentile(&b0, &b1, 0.5).zip(percentile(&b0, &b1, 0.99));
    Ok(LoadReport {
        subscribers: n,
        wall,
        delivered: p1 - p0,
        expected: (n as f64 * SPEAKERS as f64 * PPS as f64 * wall.as_secs_f64()) as u64,
        cpu_s: c0.zip(c1).map(|(a, b)| b - a),
        delay_us,
    })
}

fn describe(r: &LoadReport) -> String {
    let cpu = r
        .cpu_us_per_packet()
        .map_or("n/a".into(), |v| format!("{v:.2} us"));
    let delay = r.delay_us.map_or("n/a".into(), |(a, b)| {
        format!("<= {a:.0} us / <= {b:.0} us")
    });
    format!(
        "subscribers {:>4}  delivered {:>8}  loss {:>6.2} %  edge cpu {:>7}  per delivered packet {:>10}  forward delay p50/p99 {}",
        r.subscribers,
        r.delivered,
        r.loss() * 100.0,
        r.cpu_s.map_or("n/a".into(), |c| format!("{c:.2} s")),
        cpu,
        delay
    )
}

/// `amphi loadgen webrtc`.
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

/// `amphi bench sfu`: start `amphi dev` (one region) as a child process, measure a baseline with
/// the 3 speakers only, then each subscriber count.
pub async fn bench(args: SfuArgs) -> Result<()> {
    amphi_edge::install_crypto_provider();
    let (counts, seconds) = if args.smoke {
        (vec![4], 3)
    } else {
        (args.subscribers.clone(), args.seconds)
    };
    ensure!(seconds >= 1, "--seconds must be at least 1");
    let offset = args.port_offset;
    let mesh = tokio::task::spawn_blocking(move || {
        ChildMesh::start("bench-sfu", offset, &["--regions", "us-east"])
    })
    .await??;
    let pid = mesh.pid();
    let router = mesh.router_url();
    let edge = mesh.edge_url(0);
    println!(
        "amphi bench sfu: edge in `amphi dev --regions us-east` (pid {pid}), {SPEAKERS} speakers x {PPS} packets/s, {seconds} s per step"
    );
    let base = run_load(&router, &edge, Some(pid), 0, seconds).await?;
    let base_rate = base.cpu_s.unwrap_or(0.0) / base.wall.as_secs_f64();
    println!(
        "baseline (speakers only, whole dev process incl. origin mixer and packager): {:.3} CPU s/s",
        base_rate
    );
    let mut best: Option<(LoadReport, f64)> = None;
    for n in counts {
        let r = run_load(&router, &edge, Some(pid), n, seconds).await?;
        let cpu = r.cpu_s.unwrap_or(0.0);
        let marginal = (cpu - base_rate * r.wall.as_secs_f64()).max(0.0);
        let marginal_us = if r.delivered > 0 {
            marginal * 1e6 / r.delivered as f64
        } else {
            0.0
        };
        println!("{}  marginal {:.2} us/packet", describe(&r), marginal_us);
        if r.loss() < 0.01 && cpu > 0.0 {
            let per_core = r.subscribers as f64 * r.wall.as_secs_f64() / cpu;
            best = Some((r, per_core));
        }
    }
    match best {
        Some((r, per_core)) => println!(
            "subscribers per core at < 1 % loss: {per_core:.0} (from {} subscribers using {:.2} CPU s/s of the whole dev process)",
            r.subscribers,
            r.cpu_s.unwrap_or(0.0) / r.wall.as_secs_f64()
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
    fn report_math() {
        let r = LoadReport {
            subscribers: 2,
            wall: Duration::from_secs(1),
            delivered: 297,
            expected: 300,
            cpu_s: Some(0.003),
            delay_us: None,
        };
        assert!((r.loss() - 0.01).abs() < 1e-9);
        assert!((r.cpu_us_per_packet().unwrap() - 10.1).abs() < 0.1);
    }
}
