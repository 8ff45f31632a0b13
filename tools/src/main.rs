//! `amphi-tools`: what measures amphi, kept out of the shipped `amphi` binary.
//!
//! - `bench`, `loadgen` and `plan`: the benchmarks, load generators and capacity planner (see
//!   BENCHMARKS.md and docs/capacity.md). The ones that need a mesh start `amphi dev` from the
//!   `amphi` binary beside this one (or `$AMPHI_BIN`).
//! - The namespace test bed's helpers: `bed-setup` writes a run directory (configs rendered from
//!   the Terraform templates, PKI, emulator config); `netem-config` switches the partition; `api`,
//!   `whip-speak`, `whep-listen` and `ws` are clients meant to run inside a client namespace
//!   (`ip netns exec amb-client-... amphi-tools ...`), printing one JSON line.

use amphi_edge::rejoin::Rejoin;
use amphi_protocol::https::HttpsClient;
use amphi_testkit::whep_client::{WhepOptions, WhepSubscriber};
use amphi_testkit::whip_client::{WhipPublisher, CONNECT_TIMEOUT};
use amphi_tools::bed;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hmac::{Hmac, Mac};
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod bench;
mod bench_latency;
mod bench_mixer;
mod bench_quality;
mod bench_relay;
mod bench_route;
mod bench_udp;
mod child_mesh;
mod loadgen_hls;
mod loadgen_listeners;
mod loadgen_push;
mod loadgen_room;
mod loadgen_webrtc;
mod ogg;
mod plan;
mod tcp_floor;
mod ws_client;

#[derive(Parser)]
#[command(about = "amphi tools: benchmarks, load generators, capacity planner, test bed helpers")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    #[command(flatten)]
    Measure(Measure),
    #[command(flatten)]
    Bed(Cmd),
}

/// Benchmarks, load generators and the capacity planner.
#[derive(Subcommand)]
enum Measure {
    /// Benchmarks (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Load generators against a mesh or packager they start.
    #[command(subcommand)]
    Loadgen(LoadgenCommand),
    /// Capacity plan: fleet sizes and CDN egress for an audience (see docs/capacity.md).
    Plan(plan::PlanArgs),
}

/// The namespace test bed's helpers.
#[derive(Subcommand)]
enum Cmd {
    /// Write a run directory: hosts.tsv, netem.toml, PKI, and each role's config + env overlay.
    BedSetup {
        /// Repository root (for terraform/).
        #[arg(long)]
        repo: PathBuf,
        /// Run directory.
        #[arg(long)]
        run: PathBuf,
        /// API key secret of the bed.
        #[arg(long)]
        api_secret: String,
    },
    /// Rewrite the emulator config (`amphi-netem` reloads it).
    NetemConfig {
        /// The file.
        #[arg(long)]
        out: PathBuf,
        /// Drop everything between eu-west-1 and the origins.
        #[arg(long)]
        partition_eu_origins: bool,
        /// 5 % loss and 30 ms jitter on the us-east-1 edges' relay and the us-east-1 clients'
        /// uplink ([`bed::lossy_paths_toml`]).
        #[arg(long)]
        lossy: bool,
    },
    /// A signed API call; prints {"status", "body"}.
    Api {
        /// API key id.
        #[arg(long, default_value = bed::API_KEY_ID)]
        key_id: String,
        /// API key secret.
        #[arg(long, env = "AMB_API_SECRET")]
        secret: String,
        /// The bed's CA certificate (PEM), trusted besides the system roots.
        #[arg(long, env = "AMB_CA")]
        ca: PathBuf,
        /// Method.
        method: String,
        /// URL.
        url: String,
        /// JSON body.
        #[arg(long)]
        body: Option<String>,
    },
    /// Route through the geo-router as a speaker and publish tone bursts over WHIP.
    WhipSpeak {
        #[command(flatten)]
        client: ClientArgs,
        /// Tone frequency, Hz.
        #[arg(long, default_value_t = 440.0)]
        freq: f64,
        /// Bursts (200 ms tone, then silence until the next period).
        #[arg(long, default_value_t = 10)]
        bursts: u32,
        /// Burst period, ms (a multiple of 20, at least 500: listeners need 200 ms of silence
        /// between bursts to see an onset).
        #[arg(long, default_value_t = 1000)]
        period_ms: u32,
        /// On a failed or dropped session, ask the router again (at most this many times).
        #[arg(long, default_value_t = 0)]
        reconnects: u32,
    },
    /// Route as a listener, join over WebSocket signaling, send messages, report what came back.
    Ws {
        #[command(flatten)]
        client: ClientArgs,
        /// A client message (JSON) to send after the join, in order; a string "@name" in it
        /// becomes the id of the participant called name.
        #[arg(long)]
        send: Vec<String>,
        /// How long to stay connected, seconds.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Route as a listener and play the push stream the answer names (its `push_url`, over
    /// `wss://`) for a while; report the frames received.
    PushListen {
        #[command(flatten)]
        client: ClientArgs,
        /// Edges to avoid (the router's `avoid`, comma-separated ids).
        #[arg(long)]
        avoid: Option<String>,
        /// How long to listen, seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Route as a listener, subscribe over WHEP, decode (each sender's SSRC on its own), and
    /// report tone burst onsets.
    WhepListen {
        #[command(flatten)]
        client: ClientArgs,
        /// Tone frequency to detect, Hz (repeat for several speakers; `onsets_unix_ms` is the
        /// first one's, `onsets_by_freq` has them all).
        #[arg(long, default_values_t = [440.0])]
        freq: Vec<f64>,
        /// How long to listen, seconds.
        #[arg(long, default_value_t = 12.0)]
        seconds: f64,
        /// On a failed or dropped session, ask the router again (at most this many times).
        #[arg(long, default_value_t = 0)]
        reconnects: u32,
    },
}

/// `amphi-tools loadgen ...`
#[derive(Subcommand)]
enum LoadgenCommand {
    /// N receive-only WebRTC (WHEP) subscribers against one edge while 3 speakers talk.
    Webrtc(loadgen_webrtc::WebrtcArgs),
    /// N LL-HLS players (blocking reloads + part fetches) against a packager it starts.
    Hls(loadgen_hls::HlsArgs),
    /// One big room (default 10,000 WebSocket + 200 WebRTC participants over two edges of an
    /// `amphi dev` child): joins, hands, promotions, kicks, chat, listener paging; fails on any
    /// origin link drop.
    Room(loadgen_room::RoomArgs),
    /// N push listeners (WebSocket, or WebTransport with `--transport webtransport`) on one
    /// edge of an `amphi dev` child while a speaker talks: frames/s, late frames, edge CPU per
    /// listener, beside the same-run TCP write floor.
    Push(loadgen_push::PushArgs),
    /// Grow an existing room: N listeners join one after another on the tiers the router names
    /// (WHEP, push WebSocket, or counted as HLS), hold, then leave.
    Listeners(loadgen_listeners::ListenersArgs),
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Geo-router base URL.
    #[arg(long)]
    router: String,
    /// Room id.
    #[arg(long)]
    room: String,
    /// Room token.
    #[arg(long)]
    token: String,
    /// Public address the bed's "load balancer" reports for this client (X-Forwarded-For),
    /// placing it with the bed's GeoIP database.
    #[arg(long)]
    forwarded_for: Option<String>,
    /// The bed's CA certificate (PEM), trusted besides the system roots.
    #[arg(long, env = "AMB_CA")]
    ca: PathBuf,
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn sign(secret: &str, ts: u64, method: &str, path_and_query: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{ts}\n{method}\n{path_and_query}\n").as_bytes());
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The bed's HTTPS client: system roots plus the bed CA `ca`.
type Http = HttpsClient<Full<Bytes>>;

fn https_client(ca: &Path) -> Result<Http> {
    amphi_protocol::https::client(Some(ca)).with_context(|| format!("CA {}", ca.display()))
}

/// (status, JSON body); status 0 when the connection failed.
async fn call(
    http: &Http,
    method: &str,
    url: &str,
    body: Option<&str>,
    key: Option<(&str, &str)>,
    forwarded_for: Option<&str>,
) -> (u16, Value) {
    let mut req = Request::builder().method(method).uri(url);
    if let Some((id, secret)) = key {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = url
            .find("://")
            .and_then(|i| url[i + 3..].find('/').map(|j| &url[i + 3 + j..]))
            .unwrap_or("/");
        let sig = sign(secret, ts, method, path, body.unwrap_or("").as_bytes());
        req = req
            .header("x-amphi-key", id)
            .header("x-amphi-timestamp", ts.to_string())
            .header("x-amphi-signature", sig);
    }
    if let Some(ip) = forwarded_for {
        req = req.header("x-forwarded-for", ip);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let Ok(req) = req.body(Full::new(Bytes::from(body.unwrap_or("").to_owned()))) else {
        return (0, Value::Null);
    };
    let exchange = async {
        let resp = http.request(req).await.ok()?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        Some((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or((0, Value::Null))
}

/// The router's route answer for `role`, avoiding the edges in `avoid` (comma-separated; see
/// [`Rejoin::avoid`]).
async fn route_answer(http: &Http, c: &ClientArgs, role: &str, avoid: &str) -> Result<Value> {
    let mut url = format!("{}/v1/route?room={}&role={role}", c.router, c.room);
    if !avoid.is_empty() {
        url.push_str("&avoid=");
        url.push_str(avoid);
    }
    let (status, v) = call(http, "GET", &url, None, None, c.forwarded_for.as_deref()).await;
    if status != 200 {
        bail!("route: {status} {v}");
    }
    Ok(v)
}

/// [`route_answer`]'s (edge id, WHIP URL, WHEP URL).
async fn route(
    http: &Http,
    c: &ClientArgs,
    role: &str,
    avoid: &str,
) -> Result<(String, String, String)> {
    let v = route_answer(http, c, role, avoid).await?;
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Ok((s("edge"), s("whip_url"), s("whep_url")))
}

const BURST_FRAMES: u32 = 10;

async fn whip_speak(
    c: ClientArgs,
    freq: f64,
    bursts: u32,
    period_ms: u32,
    reconnects: u32,
) -> Result<Value> {
    if period_ms < 500 || period_ms % 20 != 0 {
        bail!("--period-ms must be a multiple of 20, at least 500");
    }
    let period_frames = period_ms / 20;
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio)?;
    enc.set_bitrate(opus::Bitrate::Bits(64_000))?;
    let mut pcm = [0i16; 960];
    let (mut tone, mut silence) = (Vec::new(), Vec::new());
    for f in 0..BURST_FRAMES as usize {
        for (i, s) in pcm.iter_mut().enumerate() {
            let t = (f * 960 + i) as f64 / 48_000.0;
            *s = (0.3 * (2.0 * std::f64::consts::PI * freq * t).sin() * 32767.0) as i16;
        }
        tone.push(enc.encode_vec(&pcm, 4000)?);
    }
    silence.push(enc.encode_vec(&[0i16; 960], 4000)?);
    let http = https_client(&c.ca)?;
    let mut sessions = Vec::new();
    let mut onsets = Vec::new();
    let total = bursts * period_frames;
    let mut frame = 0u32;
    let mut rejoin = Rejoin::new(reconnects);
    let mut next_try = None;
    while frame < total {
        if let Some(at) = next_try.take() {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        }
        let t0 = Instant::now();
        let (edge, whip, _) = match route(&http, &c, "speaker", &rejoin.avoid(t0)).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("whip-speak: {e:#}; asking again");
                next_try = Some(rejoin.failed(None, Instant::now()).ok_or(e)?);
                continue;
            }
        };
        let route_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let mut client = match WhipPublisher::connect_via(
            http.clone(),
            &whip,
            &c.token,
            CONNECT_TIMEOUT,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => match rejoin.failed(Some(&edge), Instant::now()) {
                Some(at) => {
                    eprintln!("whip-speak: {edge}: {e}; asking the router again");
                    next_try = Some(at);
                    continue;
                }
                None => bail!("WHIP {whip}: {e}"),
            },
        };
        rejoin.connected();
        if !sessions.is_empty() {
            // Back on air: start a burst now, so the time until a listener hears the speaker
            // again is not rounded up to the next 1 s burst.
            frame = frame.next_multiple_of(period_frames).min(total);
        }
        sessions.push(json!({"edge": edge, "route_ms": route_ms,
            "connect_ms": t0.elapsed().as_secs_f64() * 1000.0, "at_unix_ms": unix_ms()}));
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut lost = false;
        while frame < total {
            tick.tick().await;
            let k = frame % period_frames;
            let (payload, level) = if k < BURST_FRAMES {
                if k == 0 {
                    onsets.push(unix_ms());
                }
                (&tone[k as usize], 20)
            } else {
                (&silence[0], 127)
            };
            if client
                .send_opus(payload, frame.wrapping_mul(960), level)
                .await
                .is_err()
            {
                lost = true;
                break;
            }
            frame += 1;
        }
        if !lost {
            let _ = client.close().await;
            break;
        }
        // When the session was found dead (ICE consent checks unanswered).
        if let Some(s) = sessions.last_mut() {
            s["lost_unix_ms"] = json!(unix_ms());
        }
        match rejoin.failed(Some(&edge), Instant::now()) {
            Some(at) => next_try = Some(at),
            None => bail!("WHIP session to {edge} ended"),
        }
    }
    Ok(json!({"sessions": sessions, "onsets_unix_ms": onsets}))
}

/// Tone burst onsets in one sender's decoded audio, per frequency.
struct Bursts {
    dec: opus::Decoder,
    onsets: Onsets,
}

/// Frames (20 ms) without a tone before a tone frame counts as a burst onset.
const ONSET_QUIET_FRAMES: u32 = 10;

/// Onset detection for one sender (sans-IO): a tone frame is an onset when at least
/// [`ONSET_QUIET_FRAMES`] frames without that tone came before it, or when nothing at all arrived
/// from the sender for as long. A listener's stream slot that goes quiet mid-burst (its
/// speaker's edge died) and resumes with the speaker's next burst (re-joined elsewhere, mapped
/// to the same slot) has an onset there too.
struct Onsets {
    /// Frames since the last tone frame, per frequency.
    quiet: Vec<u32>,
    /// When the last frame arrived.
    last: Option<Instant>,
}

impl Onsets {
    fn new(freqs: usize) -> Self {
        Onsets {
            quiet: vec![u32::MAX; freqs],
            last: None,
        }
    }

    /// One decoded frame that arrived at `at`; `tone[i]` says whether it carries frequency `i`.
    /// Calls `onset(i)` for each frequency whose burst starts with it.
    fn frame(&mut self, at: Instant, tone: &[bool], mut onset: impl FnMut(usize)) {
        let silent_for = self
            .last
            .map_or(Duration::MAX, |l| at.saturating_duration_since(l));
        self.last = Some(at);
        if silent_for >= Duration::from_millis(20 * u64::from(ONSET_QUIET_FRAMES)) {
            self.quiet.iter_mut().for_each(|q| *q = u32::MAX);
        }
        for (i, &t) in tone.iter().enumerate() {
            if t {
                if self.quiet[i] >= ONSET_QUIET_FRAMES {
                    onset(i);
                }
                self.quiet[i] = 0;
            } else {
                self.quiet[i] = self.quiet[i].saturating_add(1);
            }
        }
    }
}

async fn whep_listen(
    c: ClientArgs,
    freqs: Vec<f64>,
    seconds: f64,
    reconnects: u32,
) -> Result<Value> {
    let http = https_client(&c.ca)?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut out = [0f32; 5760];
    let (mut packets, mut tone_frames) = (0u64, 0u64);
    let mut onsets: Vec<Vec<f64>> = vec![Vec::new(); freqs.len()];
    let mut senders: std::collections::HashMap<u32, Bursts> = std::collections::HashMap::new();
    let mut tones: Vec<bool> = Vec::with_capacity(freqs.len());
    let mut sessions: Vec<Value> = Vec::new();
    let mut rejoin = Rejoin::new(reconnects);
    let mut next_try = None;
    while Instant::now() < deadline {
        if let Some(at) = next_try.take() {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        }
        let (edge, _, whep) =
            match route(&http, &c, "listener", &rejoin.avoid(Instant::now())).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("whep-listen: {e:#}; asking again");
                    next_try = Some(rejoin.failed(None, Instant::now()).ok_or(e)?);
                    continue;
                }
            };
        let opts = WhepOptions {
            http: Some(http.clone()),
            ..WhepOptions::default()
        };
        let mut sub = match WhepSubscriber::connect_with(&whep, &c.token, opts).await {
            Ok(s) => s,
            Err(e) => match rejoin.failed(Some(&edge), Instant::now()) {
                Some(at) => {
                    eprintln!("whep-listen: {edge}: {e}; asking the router again");
                    next_try = Some(at);
                    continue;
                }
                None => bail!("WHEP {whep}: {e}"),
            },
        };
        rejoin.connected();
        sessions.push(json!({"edge": edge, "at_unix_ms": unix_ms()}));
        let ended = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(received) = tokio::time::timeout(left, sub.recv()).await else {
                break false;
            };
            let Some(p) = received else {
                break true;
            };
            packets += 1;
            let at = unix_ms() - p.at.elapsed().as_secs_f64() * 1000.0;
            let sender = match senders.entry(p.ssrc) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(Bursts {
                    dec: opus::Decoder::new(48_000, opus::Channels::Mono)?,
                    onsets: Onsets::new(freqs.len()),
                }),
            };
            let n = sender
                .dec
                .decode_float(&p.payload, &mut out, false)
                .unwrap_or(0);
            if n == 0 {
                continue;
            }
            let frame = &out[..n];
            let rms = (frame.iter().map(|x| x * x).sum::<f32>() / n as f32).sqrt();
            // A tone frame: loud, and most of its energy at the tone frequency.
            tones.clear();
            tones.extend(
                freqs
                    .iter()
                    .map(|&f| rms > 0.05 && tone_power(frame, f) > 0.25 * f64::from(rms * rms)),
            );
            if tones.first() == Some(&true) {
                tone_frames += 1;
            }
            sender.onsets.frame(p.at, &tones, |i| onsets[i].push(at));
        };
        if !ended {
            let _ = sub.close().await;
            break;
        }
        if let Some(s) = sessions.last_mut() {
            s["lost_unix_ms"] = json!(unix_ms());
        }
        match rejoin.failed(Some(&edge), Instant::now()) {
            Some(at) => next_try = Some(at),
            None => bail!("WHEP session to {edge} ended"),
        }
    }
    for o in &mut onsets {
        o.sort_by(f64::total_cmp);
    }
    let by_freq: serde_json::Map<String, Value> = freqs
        .iter()
        .zip(&onsets)
        .map(|(f, o)| (format!("{f}"), json!(o)))
        .collect();
    Ok(json!({
        "edge": sessions.first().map(|s| s["edge"].clone()).unwrap_or(Value::Null),
        "sessions": sessions, "packets": packets, "tone_frames": tone_frames,
        "onsets_unix_ms": onsets[0], "onsets_by_freq": by_freq,
    }))
}

/// Mean-square amplitude of `freq` in `samples` (Goertzel, scaled so a full sine of amplitude A
/// gives A²/2).
fn tone_power(samples: &[f32], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 48_000.0;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s0 = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let n = samples.len() as f64;
    2.0 * (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (n * n)
}

/// Run a benchmark, load generator or the planner: logs to stderr, a runtime on every core.
fn measure(command: Measure) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match command {
            Measure::Bench(args) => bench::run(args).await,
            Measure::Loadgen(LoadgenCommand::Webrtc(args)) => loadgen_webrtc::loadgen(args).await,
            Measure::Loadgen(LoadgenCommand::Hls(args)) => loadgen_hls::run(args).await,
            Measure::Loadgen(LoadgenCommand::Room(args)) => loadgen_room::run(args).await,
            Measure::Loadgen(LoadgenCommand::Push(args)) => loadgen_push::run(args).await,
            Measure::Loadgen(LoadgenCommand::Listeners(args)) => loadgen_listeners::run(args).await,
            Measure::Plan(args) => plan::run(args),
        }
    })
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Top::Measure(command) => measure(command),
        Top::Bed(command) => bed_helper(command),
    }
}

/// Run a test bed helper (two worker threads: the bed's client namespaces run many at once),
/// printing its one JSON line.
fn bed_helper(command: Cmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let v = match command {
        Cmd::BedSetup {
            repo,
            run,
            api_secret,
        } => {
            bed::setup(&repo, &run, &api_secret)?;
            return Ok(());
        }
        Cmd::NetemConfig {
            out,
            partition_eu_origins,
            lossy,
        } => {
            let mut text = bed::netem_toml(partition_eu_origins);
            if lossy {
                text += &bed::lossy_paths_toml();
            }
            std::fs::write(&out, text)?;
            return Ok(());
        }
        Cmd::Api {
            key_id,
            secret,
            ca,
            method,
            url,
            body,
        } => {
            let http = https_client(&ca)?;
            let (status, body) = rt.block_on(call(
                &http,
                &method,
                &url,
                body.as_deref(),
                Some((&key_id, &secret)),
                None,
            ));
            json!({"status": status, "body": body})
        }
        Cmd::WhipSpeak {
            client,
            freq,
            bursts,
            period_ms,
            reconnects,
        } => rt.block_on(whip_speak(client, freq, bursts, period_ms, reconnects))?,
        Cmd::WhepListen {
            client,
            freq,
            seconds,
            reconnects,
        } => rt.block_on(whep_listen(client, freq, seconds, reconnects))?,
        Cmd::Ws {
            client,
            send,
            seconds,
        } => rt.block_on(async {
            let http = https_client(&client.ca)?;
            let v = route_answer(&http, &client, "listener", "").await?;
            let ws_url = v["ws_url"].as_str().unwrap_or_default().to_string();
            let mut out =
                ws_client::session(&ws_url, &client.token, &client.ca, &send, seconds).await?;
            out["edge"] = v["edge"].clone();
            Ok::<_, anyhow::Error>(out)
        })?,
        Cmd::PushListen {
            client,
            avoid,
            seconds,
        } => rt.block_on(async {
            let http = https_client(&client.ca)?;
            let v =
                route_answer(&http, &client, "listener", avoid.as_deref().unwrap_or("")).await?;
            let push_url = v["push_url"].as_str().unwrap_or_default().to_string();
            let mut out =
                ws_client::push_listen(&push_url, &client.token, &client.ca, seconds).await?;
            out["edge"] = v["edge"].clone();
            Ok::<_, anyhow::Error>(out)
        })?,
    };
    println!("{v}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tone_power_finds_the_tone() {
        let s: Vec<f32> = (0..960)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 48_000.0).sin())
            .collect();
        let p = tone_power(&s, 440.0);
        assert!((p - 0.125).abs() < 0.01, "{p}");
        assert!(tone_power(&s, 1000.0) < 0.01);
    }

    /// Onsets of frequency 0 over `frames` (arrival offset in ms, tone or not).
    fn onsets_of(frames: &[(u64, bool)]) -> Vec<u64> {
        let t0 = Instant::now();
        let mut o = Onsets::new(1);
        let mut out = Vec::new();
        for &(ms, tone) in frames {
            o.frame(t0 + Duration::from_millis(ms), &[tone], |_| out.push(ms));
        }
        out
    }

    #[test]
    fn a_burst_after_quiet_frames_is_an_onset_and_its_tail_is_not() {
        let mut frames: Vec<(u64, bool)> = (0..50u64).map(|k| (k * 20, k % 25 < 10)).collect();
        // The tone flickers off for a frame inside a burst: no new onset.
        frames[3].1 = false;
        assert_eq!(onsets_of(&frames), [0, 500]);
    }

    #[test]
    fn a_stream_resuming_mid_tone_after_a_gap_has_an_onset() {
        // A burst cut at its fourth frame (the speaker's edge dies), nothing for 1.2 s, then the
        // speaker's next burst arrives on the same stream (re-joined on another edge).
        let mut frames: Vec<(u64, bool)> = (0..4u64).map(|k| (k * 20, true)).collect();
        frames.extend((0..10u64).map(|k| (1260 + k * 20, true)));
        assert_eq!(onsets_of(&frames), [0, 1260]);
        // A short gap (lost packets) is not a new burst.
        let frames: Vec<(u64, bool)> = (0..10u64).map(|k| (k * 20 + (k / 5) * 60, true)).collect();
        assert_eq!(onsets_of(&frames), [0]);
    }

    #[test]
    fn signatures_match_the_router_scheme() {
        // HMAC-SHA256("k", "1\nGET\n/v1/edges\n") as the router computes it.
        let sig = sign("k", 1, "GET", "/v1/edges", b"");
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64);
        assert_ne!(sig, sign("k", 2, "GET", "/v1/edges", b""));
    }
}
