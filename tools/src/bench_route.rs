//! `amphi-tools bench route`: route lookups per second over HTTP on loopback, measured with `wrk`,
//! side by side with a hyper hello-world server in the same run and process.
//!
//! Method: one tokio runtime serves a geo-router (dev mode, in-memory store or the Redis
//! of `--redis-url` (the bench's room and edges stay there), GeoIP
//! databases if given; four edges registered by heartbeats, one live room) and two servers
//! answering `Hello, World!`: a bare hyper HTTP/1.1 connection (hyper's defaults), and the same
//! answer behind the roles' shared HTTP server (`amphi_protocol::https::serve_plain_with`: the
//! per-address connection cap, HTTP/1.1 or HTTP/2 prior knowledge, the header read timeout),
//! which every role, the router included, must keep. `wrk` (keep-alive, `--threads` x
//! `--connections`) loads each hello-world server, then
//! `GET /v1/route?room=ID&ip=8.8.8.8&role=listener`, each for `--seconds`, in `--rounds` rounds;
//! even rounds run the servers in reverse order, so that a machine that gets faster or slower
//! during a round favours no server over a pair of rounds.
//! Then a paced probe: `--probe-connections` connections (16), each waiting 1 ms after every
//! answer, load the shared-server hello-world and the route in turn: the same offered load for
//! both, far below saturation, so the latency is the request's own and not a queue's.
//! Goal: routes/s >= 90% of the hardened hello-world's in the same run (saturated), p50 within
//! 1.3x of its p50 at the same paced load; the saturated p50 ratio is printed too (at
//! saturation a closed loop's latency is mostly its queue). The ratio to the bare hyper server
//! is printed as well, with this process's CPU time per request of each server (`getrusage`: wrk
//! runs in its own process) and the machine's load average before and after.

use amphi_protocol::config::{known_region, RouterConfig};
use amphi_protocol::token::TokenSigner;
use anyhow::{bail, ensure, Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Options of the route benchmark.
pub struct RouteBenchOptions {
    /// Seconds of load per server.
    pub seconds: u32,
    /// wrk threads.
    pub threads: u32,
    /// wrk connections.
    pub connections: u32,
    /// Router port (the hello-world servers take the next two).
    pub port: u16,
    /// GeoIP databases for the router.
    pub geoip: Vec<PathBuf>,
    /// Redis for the router's directory and registry (in memory when `None`).
    pub redis_url: Option<String>,
    /// Rounds: each runs wrk on every server in turn; the ratios' medians are the figure.
    pub rounds: u32,
    /// Connections of the paced probe (each waits [`PACE_MS`] after every answer).
    pub probe_connections: u32,
    /// `/v1/route` through hyper (`http1_fast_path = false`) instead of the router's fast path.
    pub hyper_only: bool,
}

impl RouteBenchOptions {
    /// The paced probe's connections: at least one per wrk thread.
    fn paced_connections(&self) -> u32 {
        self.probe_connections.max(self.threads)
    }
}

/// What each connection of the paced probe waits after an answer before its next request.
const PACE_MS: u32 = 1;

/// wrk's script for the paced probe: a fixed wait between a connection's requests, so both
/// servers get the same offered load, far below saturation, and the latency is the request's
/// own, not the queue's.
fn pace_script() -> String {
    format!("function delay()\n  return {PACE_MS}\nend\n")
}

/// One wrk run.
struct WrkResult {
    requests_per_sec: f64,
    /// p50 latency as wrk prints it (`246.00us`).
    latency: String,
    /// p99 latency as wrk prints it.
    p99: String,
    requests: u64,
    /// This process's CPU time (user and system) during the run.
    cpu: Duration,
}

impl WrkResult {
    /// This process's CPU per request served, µs (the served requests; the edges' heartbeats
    /// are a few per second).
    fn cpu_per_request(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }
}

/// This process's CPU time so far (user and system, every thread).
fn process_cpu() -> Duration {
    // SAFETY: `rusage` is plain data; `getrusage` fills the one we own and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// The machine's load averages (`/proc/loadavg`'s first three fields).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// How wrk loads a server.
#[derive(Clone, Copy)]
enum Load<'a> {
    /// As fast as `--connections` connections go (saturation: the throughput figure).
    Saturate,
    /// `--probe-connections` connections, each waiting [`PACE_MS`] between requests (the
    /// script's path): the latency figure.
    Paced(&'a std::path::Path),
}

fn wrk(url: &str, o: &RouteBenchOptions, load: Load) -> Result<WrkResult> {
    let cpu_before = process_cpu();
    let connections = match load {
        Load::Saturate => o.connections,
        Load::Paced(_) => o.paced_connections(),
    };
    let mut command = Command::new("wrk");
    command.args([
        "-t",
        &o.threads.to_string(),
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{}s", o.seconds),
        "--latency",
    ]);
    if let Load::Paced(script) = load {
        command.arg("-s").arg(script);
    }
    let out = command
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk; scripts/test.sh installs it)")?;
    let cpu = process_cpu().saturating_sub(cpu_before);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        bail!("{url}: {line}\n{text}");
    }
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_string())
    };
    let requests_per_sec: f64 = field("Requests/sec:")
        .context("wrk printed no Requests/sec")?
        .parse()
        .context("Requests/sec")?;
    let latency = field("50%").unwrap_or_default();
    let p99 = field("99%").unwrap_or_default();
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(WrkResult {
        requests_per_sec,
        latency,
        p99,
        requests,
        cpu,
    })
}

/// A hyper HTTP/1.1 hello-world server until `stop`.
async fn hello_world(addr: SocketAddr, stop: CancellationToken) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            a = listener.accept() => a?,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"Hello, World!"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A fixed answer behind the roles' shared HTTP server (no request budget: that is the
/// router's own work, counted in its figure), until `stop`: `Hello, World!`, or (`json`) the
/// very bytes and content type of a route answer.
async fn hardened_hello_world(
    addr: SocketAddr,
    stop: CancellationToken,
    json: Option<Bytes>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    let make = move |_peer| {
        let json = json.clone();
        hyper::service::service_fn(move |_req| {
            let mut resp = axum::response::Response::new(axum::body::Body::from(
                json.clone()
                    .unwrap_or_else(|| Bytes::from_static(b"Hello, World!")),
            ));
            if json.is_some() {
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
            }
            async move { Ok::<_, std::convert::Infallible>(resp) }
        })
    };
    amphi_protocol::https::serve_plain_with(
        listener,
        make,
        stop,
        amphi_protocol::https::Limiter::unlimited(),
    )
    .await;
    Ok(())
}

/// The route's figures over a reference server's in one round.
#[derive(Clone, Copy)]
struct Ratios {
    /// Requests per second, route over reference.
    throughput: f64,
    /// p50 latency, route over reference.
    p50: f64,
    /// p99 latency, route over reference.
    p99: f64,
}

impl Ratios {
    fn of(route: &WrkResult, reference: &WrkResult) -> Ratios {
        let ratio = |r: &str, h: &str| match (micros(r), micros(h)) {
            (Some(r), Some(h)) if h > 0.0 => r / h,
            _ => f64::NAN,
        };
        Ratios {
            throughput: route.requests_per_sec / reference.requests_per_sec,
            p50: ratio(&route.latency, &reference.latency),
            p99: ratio(&route.p99, &reference.p99),
        }
    }

    /// The median of each ratio over `rounds`.
    fn median(rounds: &[Ratios]) -> Ratios {
        let of = |f: fn(&Ratios) -> f64| median_of(rounds.iter().map(f).collect());
        Ratios {
            throughput: of(|x| x.throughput),
            p50: of(|x| x.p50),
            p99: of(|x| x.p99),
        }
    }
}

/// `run` over `items` in order in odd rounds and in reverse in even ones; results in `items`'
/// order.
fn in_round_order<T, R>(
    round: u32,
    items: &[T],
    mut run: impl FnMut(&T) -> Result<R>,
) -> Result<Vec<R>> {
    let mut results: Vec<(usize, R)> = Vec::with_capacity(items.len());
    let order: Vec<usize> = if round % 2 == 0 {
        (0..items.len()).rev().collect()
    } else {
        (0..items.len()).collect()
    };
    for i in order {
        results.push((i, run(&items[i])?));
    }
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

/// The median of `values` (the mean of the middle two for an even count).
fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A wrk latency figure (`246.00us`, `1.05ms`, `2.00s`) in microseconds.
fn micros(text: &str) -> Option<f64> {
    let (value, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1_000.0,
        "s" => 1_000_000.0,
        _ => return None,
    };
    value.parse::<f64>().ok().map(|v| v * scale)
}

fn wait_healthy(url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ureq::get(url)
        .timeout(Duration::from_secs(1))
        .call()
        .is_err()
    {
        ensure!(Instant::now() < deadline, "{url} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One heartbeat from each of four edges (one per region).
fn heartbeats(base: &str) -> Result<()> {
    for region in ["us-east", "eu-west", "ap-southeast", "ap-southeast-2"] {
        let r = known_region(region).context("region")?;
        let id = format!("edge-{region}");
        ureq::put(&format!("{base}/v1/edges/{id}"))
            .timeout(Duration::from_secs(5))
            .send_json(serde_json::json!({
                "id": id, "region": region, "latitude": r.latitude,
                "longitude": r.longitude, "public_url": format!("https://{id}.example.com"),
                "participants": 10, "cpu_load": 0.1, "capacity": 1000,
            }))
            .context("heartbeat")?;
    }
    Ok(())
}

/// Run the benchmark and print both figures and their ratio.
pub async fn run(o: RouteBenchOptions) -> Result<()> {
    let router_addr: SocketAddr = ([127, 0, 0, 1], o.port).into();
    let hello_addr: SocketAddr = ([127, 0, 0, 1], o.port + 1).into();
    let hardened_addr: SocketAddr = ([127, 0, 0, 1], o.port + 2).into();
    let base = format!("http://{router_addr}");
    let stop = CancellationToken::new();
    let config = RouterConfig {
        http_listen: router_addr,
        public_url: base.clone(),
        default_region: "us-east".into(),
        edges: vec![],
        packager_url: "http://127.0.0.1:9".into(),
        dev_mode: true,
        token_ttl_secs: 3600,
        max_token_lifetime_secs: amphi_protocol::token::DEFAULT_MAX_LIFETIME_SECS,
        id: "bench-router".into(),
        origins: vec![],
        geoip: o.geoip.clone(),
        trusted_proxies: vec![],
        load_threshold: 0.8,
        interactive_capacity: 500,
        room_affine: true,
        relay_fanout: 10,
        push_capacity: 10_000,
        api_keys: vec![],
        webhooks: vec![],
        room_idle_timeout_secs: 21_600,
        reminder_lead_secs: 600,
        redis_url: o.redis_url.clone(),
        hls_base_url: None,
        http1_fast_path: !o.hyper_only,
        https: Default::default(),
        limits: Default::default(),
    };
    let setup = amphi_geo_router::RouterSetup {
        config,
        signer: TokenSigner::generate("bench"),
        web: vec![],
        mesh_tls: None,
    };
    let router = tokio::spawn(amphi_geo_router::run(setup, stop.clone()));
    let hello = tokio::spawn(hello_world(hello_addr, stop.clone()));
    let hardened = tokio::spawn(hardened_hello_world(hardened_addr, stop.clone(), None));
    let room = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || -> Result<String> {
            wait_healthy(&format!("{base}/healthz"))?;
            heartbeats(&base)?;
            let v: serde_json::Value = ureq::post(&format!("{base}/v1/rooms"))
                .send_json(serde_json::json!({"title": "bench"}))
                .context("create room")?
                .into_json()?;
            v["room"].as_str().map(str::to_string).context("room id")
        })
        .await??
    };
    // The edges keep heartbeating while wrk runs (they would be out after 3 s otherwise).
    let beating = {
        let (base, stop) = (base.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.is_cancelled() {
                if let Err(e) = heartbeats(&base) {
                    eprintln!("heartbeat failed: {e:#}");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let route_url = format!("{base}/v1/route?room={room}&ip=8.8.8.8&role=listener");
    let hello_url = format!("http://{hello_addr}/");
    let hardened_url = format!("http://{hardened_addr}/");
    let get_body = |u: String| {
        tokio::task::spawn_blocking(move || -> Result<Bytes> {
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut ureq::get(&u).call()?.into_reader(), &mut body)?;
            Ok(body.into())
        })
    };
    // What wrk gets, and the same answer explained (printed).
    let sample_body = get_body(route_url.clone()).await??;
    let sample: serde_json::Value =
        serde_json::from_slice(&get_body(format!("{route_url}&explain=1")).await??)?;
    let same_bytes_addr: SocketAddr = ([127, 0, 0, 1], o.port + 3).into();
    let same_bytes = tokio::spawn(hardened_hello_world(
        same_bytes_addr,
        stop.clone(),
        Some(sample_body.clone()),
    ));
    // The same request too: the floor reads the bytes the router reads.
    let same_bytes_url =
        format!("http://{same_bytes_addr}/v1/route?room={room}&ip=8.8.8.8&role=listener");
    println!(
        "route lookup over HTTP vs hyper hello-world (wrk -t{} -c{} -d{}s, loopback, same process, {} store, route {})",
        o.threads,
        o.connections,
        o.seconds,
        if o.redis_url.is_some() { "Redis" } else { "memory" },
        if o.hyper_only { "through hyper" } else { "on the HTTP/1.1 fast path" }
    );
    println!(
        "  sample route: edge {} ({})",
        sample["edge"], sample["why"]
    );
    println!("  load average before: {}", load_average());
    let names = [
        "hello-world (bare hyper)",
        "hello-world (shared server)",
        "same bytes (shared server)",
        "/v1/route",
    ];
    let urls = [hello_url, hardened_url, same_bytes_url, route_url];
    let script = std::env::temp_dir().join(format!("amphi-bench-route-{}.lua", std::process::id()));
    std::fs::write(&script, pace_script()).context("writing the paced probe's wrk script")?;
    let paced_connections = o.paced_connections();
    let mut saturated: Vec<[Ratios; 3]> = Vec::new();
    let mut paced: Vec<Ratios> = Vec::new();
    for round in 1..=o.rounds.max(1) {
        let (results, probe) = {
            let urls = urls.clone();
            let script = script.clone();
            let opts = RouteBenchOptions {
                geoip: vec![],
                redis_url: None,
                ..o
            };
            tokio::task::spawn_blocking(move || -> Result<(Vec<WrkResult>, Vec<WrkResult>)> {
                // Even rounds run the servers in reverse order (A B B A): a machine getting
                // faster or slower through a round favours neither side over two rounds.
                let saturated = in_round_order(round, &urls, |u| wrk(u, &opts, Load::Saturate))?;
                // The paced probe: the shared-server hello-world and the route.
                let paced = [urls[1].clone(), urls[3].clone()];
                let probe = in_round_order(round, &paced, |u| wrk(u, &opts, Load::Paced(&script)))?;
                Ok((saturated, probe))
            })
            .await??
        };
        let results = <[WrkResult; 4]>::try_from(results)
            .map_err(|_| anyhow::anyhow!("four wrk runs expected"))?;
        let [probe_hello, probe_route] = <[WrkResult; 2]>::try_from(probe)
            .map_err(|_| anyhow::anyhow!("two paced wrk runs expected"))?;
        println!(
            "  round {round}, saturated ({} connections):",
            o.connections
        );
        for (name, w) in names.iter().zip(&results) {
            let cpu_per_request = w.cpu_per_request();
            println!(
                "    {name:<28} {:>10.0} req/s  (p50 latency {}, {} requests, {cpu_per_request:.2} µs CPU per request)",
                w.requests_per_sec, w.latency, w.requests
            );
        }
        let [bare, hh, hj, r] = &results;
        let (to_hello, to_same) = (Ratios::of(r, hh), Ratios::of(r, hj));
        println!(
            "    /v1/route: {:.0}% of the shared-server hello-world (p50 {:.2}x), {:.0}% of the same {} \
             bytes served fixed (p50 {:.2}x)",
            to_hello.throughput * 100.0,
            to_hello.p50,
            to_same.throughput * 100.0,
            sample_body.len(),
            to_same.p50
        );
        println!(
            "  round {round}, paced ({paced_connections} connections, each waiting {PACE_MS} ms after an answer):"
        );
        for (name, w) in [
            ("hello-world (shared server)", &probe_hello),
            ("/v1/route", &probe_route),
        ] {
            println!(
                "    {name:<28} {:>10.0} req/s  (p50 latency {}, p99 {}, {:.2} µs CPU per request)",
                w.requests_per_sec,
                w.latency,
                w.p99,
                w.cpu_per_request()
            );
        }
        let probe = Ratios::of(&probe_route, &probe_hello);
        println!(
            "    /v1/route at the same offered load: p50 {:.2}x, p99 {:.2}x the hello-world's",
            probe.p50, probe.p99
        );
        saturated.push([Ratios::of(r, bare), to_hello, to_same]);
        paced.push(probe);
    }
    let _ = std::fs::remove_file(&script);
    println!("  load average after: {}", load_average());
    let median =
        |against: usize| Ratios::median(&saturated.iter().map(|r| r[against]).collect::<Vec<_>>());
    let (to_bare, to_hello, to_same) = (median(0), median(1), median(2));
    let probe = Ratios::median(&paced);
    let met = |yes: bool| if yes { "met" } else { "NOT met" };
    println!(
        "  median of {} rounds: routes/s = {:.0}% of the shared-server hello-world (goal >= 90%: {}), \
         {:.0}% of the same bytes served fixed, {:.0}% of bare hyper",
        saturated.len(),
        to_hello.throughput * 100.0,
        met(to_hello.throughput >= 0.9),
        to_same.throughput * 100.0,
        to_bare.throughput * 100.0
    );
    println!(
        "  p50 latency at the same paced load: {:.2}x the hello-world's (goal <= 1.3x: {}), p99 \
         {:.2}x; saturated: p50 {:.2}x (a queue of {} connections on shared cores)",
        probe.p50,
        met(probe.p50 <= 1.3),
        probe.p99,
        to_hello.p50,
        o.connections
    );
    stop.cancel();
    let _ = beating.join();
    let _ = router.await;
    let _ = hello.await;
    let _ = hardened.await;
    let _ = same_bytes.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_rounds_run_in_reverse_and_results_keep_the_items_order() {
        for (round, want) in [(1, vec![0, 1, 2]), (2, vec![2, 1, 0]), (3, vec![0, 1, 2])] {
            let mut ran = Vec::new();
            let results = in_round_order(round, &[10, 11, 12], |x| {
                ran.push(x - 10);
                Ok(x * 2)
            })
            .unwrap();
            assert_eq!(ran, want, "round {round}");
            assert_eq!(results, vec![20, 22, 24]);
        }
    }

    #[test]
    fn wrk_latencies_are_read_in_microseconds() {
        assert_eq!(micros("246.00us"), Some(246.0));
        assert_eq!(micros("1.05ms"), Some(1050.0));
        assert_eq!(micros("2.00s"), Some(2_000_000.0));
        assert_eq!(micros("12"), None);
        assert_eq!(median_of(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_of(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
