//! The end-to-end tests' harness: a real `amphi dev` mesh in a child process, HTTP helpers, tone
//! generation, HLS fetching and audio analysis with ffmpeg.

pub use crate::net::scratch_dir;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `amphi dev` child process; killed on drop.
pub struct DevMesh {
    child: Child,
    /// Port offset the mesh was started with.
    pub offset: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// A scratch directory beside the data directory.
    pub scratch: PathBuf,
    log: PathBuf,
}

impl DevMesh {
    /// Start `amphi dev --port-offset offset` and wait until every component is up and the edges
    /// are connected to the origin. A mesh takes ports 8080..=8401 plus `offset`, so meshes of
    /// tests in one test binary (which run in parallel) need offsets at least 1000 apart, and
    /// `amphi dev` accepts offsets up to 24000 (below the kernel's ephemeral port range).
    pub fn start(offset: u16, name: &str) -> DevMesh {
        Self::start_with(offset, name, &[])
    }

    /// Like [`DevMesh::start`] with extra `amphi dev` arguments.
    pub fn start_with(offset: u16, name: &str, extra: &[&str]) -> DevMesh {
        Self::start_logging(offset, name, extra, "info")
    }

    /// Like [`DevMesh::start_with`], logging with the `RUST_LOG` filter `log_filter`.
    pub fn start_logging(offset: u16, name: &str, extra: &[&str], log_filter: &str) -> DevMesh {
        let base = scratch_dir(name);
        let data_dir = base.join("data");
        let log = base.join("dev.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(amphi_bin().expect("amphi binary"))
            .args(["dev", "--port-offset", &offset.to_string(), "--data-dir"])
            .arg(&data_dir)
            .args(extra)
            .env("RUST_LOG", log_filter)
            .stdout(Stdio::from(log_file.try_clone().unwrap()))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn amphi dev");
        let mesh = DevMesh {
            child,
            offset,
            data_dir,
            scratch: base,
            log,
        };
        mesh.wait_ready();
        mesh
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = [self.router(), self.edge(0), self.edge(1), self.packager()]
                .iter()
                .all(|u| get_status(&format!("{u}/healthz")) == 200)
                && (0..2).all(|i| {
                    metric(&self.edge(i), "amphi_edge_origin_connected").unwrap_or(0.0) >= 1.0
                });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mesh not ready in 30 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The mesh's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run the browser script `tests/browser/{script}` with node against this mesh (`AMPHI_URL`
    /// is the router, plus `env`); panics with the mesh log if it fails. Returns the `result`
    /// object of the `{"result": …}` line it printed.
    pub fn browser_result(&self, script: &str, env: &[(&str, &str)]) -> serde_json::Value {
        let mut cmd = Command::new("node");
        cmd.arg(format!(
            "{}/../tests/browser/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .env("AMPHI_URL", self.router());
        for (name, value) in env {
            cmd.env(name, value);
        }
        let mut result = None;
        let status = run_streaming(cmd, |line| {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if v["result"].is_object() {
                    result = Some(v["result"].clone());
                }
            }
        });
        assert!(
            status.success(),
            "{script} failed; mesh log:\n{}",
            self.log_text()
        );
        result.unwrap_or_else(|| panic!("{script} reported no result"))
    }

    /// Geo-router base URL.
    pub fn router(&self) -> String {
        format!("http://127.0.0.1:{}", 8080 + self.offset)
    }

    /// Edge `i`'s HTTP base URL (0 = us-east, 1 = eu-west).
    pub fn edge(&self, i: u16) -> String {
        format!("http://127.0.0.1:{}", 8101 + i + self.offset)
    }

    /// Edge `i`'s WebRTC UDP address.
    pub fn edge_media(&self, i: u16) -> String {
        format!("127.0.0.1:{}", 8201 + i + self.offset)
    }

    /// Packager HTTP base URL.
    pub fn packager(&self) -> String {
        format!("http://127.0.0.1:{}", 8400 + self.offset)
    }

    /// Origin metrics base URL.
    pub fn origin_metrics(&self) -> String {
        format!("http://127.0.0.1:{}", 8301 + self.offset)
    }

    /// Create a room; returns (room id, host token, hls url).
    pub fn create_room(&self, title: &str) -> (String, String, String) {
        let v: serde_json::Value = ureq::post(&format!("{}/v1/rooms", self.router()))
            .send_json(serde_json::json!({"title": title, "topic": "tests"}))
            .expect("create room")
            .into_json()
            .unwrap();
        (
            v["room"].as_str().unwrap().to_string(),
            v["host_token"].as_str().unwrap().to_string(),
            v["hls_url"].as_str().unwrap().to_string(),
        )
    }

    /// Mint a token for `room`.
    pub fn token(&self, room: &str, role: &str, name: &str) -> String {
        let v: serde_json::Value = ureq::post(&format!("{}/v1/rooms/{room}/tokens", self.router()))
            .send_json(serde_json::json!({"role": role, "name": name}))
            .expect("mint token")
            .into_json()
            .unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    /// The route for `room` in `region`.
    pub fn route(&self, room: &str, region: &str) -> serde_json::Value {
        ureq::get(&format!(
            "{}/v1/route?room={room}&region={region}",
            self.router()
        ))
        .call()
        .expect("route")
        .into_json()
        .unwrap()
    }
}

impl Drop for DevMesh {
    fn drop(&mut self) {
        unsafe_kill_term(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ask a process to stop with SIGTERM (as Ctrl-C / systemd would).
fn unsafe_kill_term(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// The `amphi` server binary: `$AMPHI_BIN`, else `amphi` beside the running executable (a tool
/// in `target/<profile>/`) or one directory up (a test binary in `target/<profile>/deps/`).
/// `cargo test` of the root package builds it; other callers build it first
/// (`cargo build --bin amphi`).
pub fn amphi_bin() -> std::io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("AMPHI_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    [dir.join("amphi"), dir.join("../amphi")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no amphi binary beside {} (set AMPHI_BIN)", exe.display()),
            )
        })
}

/// The `amphi-tools` binary (load generators, benchmarks): `$AMPHI_TOOLS`, else beside the
/// `amphi` binary [`amphi_bin`] finds (`cargo build -p amphi-tools` builds it there).
pub fn tools_bin() -> std::io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("AMPHI_TOOLS") {
        return Ok(PathBuf::from(p));
    }
    let amphi = amphi_bin()?;
    let tools = amphi.with_file_name("amphi-tools");
    if tools.is_file() {
        Ok(tools)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no {} (build it: cargo build -p amphi-tools; or set AMPHI_TOOLS)",
                tools.display()
            ),
        ))
    }
}

/// Run `amphi` with `args`; return stdout (panics on failure).
pub fn amphi(args: &[&str]) -> String {
    let out = Command::new(amphi_bin().expect("amphi binary"))
        .args(args)
        .output()
        .expect("run amphi");
    assert!(
        out.status.success(),
        "amphi {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// HTTP status of a GET (0 if the connection failed).
pub fn get_status(url: &str) -> u16 {
    match ureq::get(url).timeout(Duration::from_secs(5)).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(_) => 0,
    }
}

/// GET a body as bytes (panics on non-200).
pub fn get_bytes(url: &str) -> Vec<u8> {
    let resp = ureq::get(url)
        .timeout(Duration::from_secs(15))
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let mut out = Vec::new();
    resp.into_reader().read_to_end(&mut out).unwrap();
    out
}

/// A metric's value (summed over label sets) from a Prometheus text endpoint.
pub fn metric(base: &str, name: &str) -> Option<f64> {
    let text = ureq::get(&format!("{base}/metrics"))
        .timeout(Duration::from_secs(5))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    metric_in(&text, name)
}

/// A metric's value (summed over label sets) in Prometheus text.
pub fn metric_in(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// `seconds` of a sine tone as 20 ms Opus packets (48 kHz mono, 64 kbps).
pub fn opus_tone(freq: f64, seconds: f64) -> Vec<Vec<u8>> {
    crate::synth::tone_packets(freq, 0.3, (seconds * 50.0) as usize).expect("opus encoder")
}

/// Publish Opus packets through WHIP in real time (20 ms apart) with our str0m client.
pub async fn publish_tone(whip_url: &str, token: &str, freq: f64, seconds: f64) {
    let client = crate::whip_client::WhipPublisher::connect(whip_url, token)
        .await
        .expect("WHIP connect");
    send_tone(client, freq, seconds).await;
}

/// Send `seconds` of a tone through a connected WHIP publisher in real time, then close it.
pub async fn send_tone(mut client: crate::whip_client::WhipPublisher, freq: f64, seconds: f64) {
    let packets = opus_tone(freq, seconds);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for (i, p) in packets.iter().enumerate() {
        tick.tick().await;
        client
            .send_opus(p, (i as u32).wrapping_mul(960), 20)
            .await
            .expect("send opus");
    }
    client.close().await.expect("WHIP close");
}

/// The LL-HLS Opus media playlist URL of a room, from its multivariant `index.m3u8` URL (the
/// main one offers AAC-LC only; `index-opus.m3u8` offers the Opus rendition).
pub fn media_playlist_url(hls_url: &str) -> String {
    let hls_url = &hls_url.replace("/index.m3u8", "/index-opus.m3u8");
    let text = String::from_utf8(get_bytes(hls_url)).unwrap();
    let parsed = m3u8_rs::parse_playlist_res(text.as_bytes()).expect("multivariant parses");
    let m3u8_rs::Playlist::MasterPlaylist(master) = parsed else {
        panic!("{hls_url} is not a multivariant playlist:\n{text}");
    };
    let variant = master.variants.first().expect("one variant");
    join_url(hls_url, &variant.uri)
}

/// Resolve `rel` against `base`.
pub fn join_url(base: &str, rel: &str) -> String {
    if rel.starts_with("http://") || rel.starts_with("https://") {
        return rel.to_string();
    }
    let dir = &base[..base.rfind('/').unwrap() + 1];
    format!("{dir}{rel}")
}

/// Poll a media playlist until it lists at least `segments` full segments; return its text.
pub fn wait_for_segments(url: &str, segments: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(resp) = ureq::get(url).timeout(Duration::from_secs(5)).call() {
            let text = resp.into_string().unwrap();
            if let Ok(m3u8_rs::Playlist::MediaPlaylist(p)) =
                m3u8_rs::parse_playlist_res(text.as_bytes())
            {
                if p.segments.len() >= segments {
                    return text;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "playlist {url} never had {segments} segments"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Download init + every full segment of a media playlist into one fMP4 file; return its path and the
/// individual (init, segments) bytes.
pub fn download_media(
    playlist_url: &str,
    text: &str,
    dir: &Path,
) -> (PathBuf, Vec<u8>, Vec<Vec<u8>>) {
    let m3u8_rs::Playlist::MediaPlaylist(p) =
        m3u8_rs::parse_playlist_res(text.as_bytes()).expect("media playlist parses")
    else {
        panic!("not a media playlist");
    };
    let map = p
        .segments
        .iter()
        .find_map(|s| s.map.as_ref())
        .expect("EXT-X-MAP");
    let init = get_bytes(&join_url(playlist_url, &map.uri));
    let mut all = init.clone();
    let mut segs = Vec::new();
    for s in &p.segments {
        let bytes = get_bytes(&join_url(playlist_url, &s.uri));
        all.extend_from_slice(&bytes);
        segs.push(bytes);
    }
    let path = dir.join("program.mp4");
    std::fs::write(&path, &all).unwrap();
    (path, init, segs)
}

/// Decode any media ffmpeg reads into 48 kHz mono f32 samples.
pub fn ffmpeg_decode(input: &str) -> Vec<f32> {
    let out = Command::new("ffmpeg")
        .args([
            "-v", "error", "-i", input, "-f", "f32le", "-ac", "1", "-ar", "48000", "-",
        ])
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "ffmpeg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `ffprobe` stream fields of the first audio stream (codec_name, sample_rate, channels).
pub fn ffprobe_audio(input: &str) -> (String, u32, u32) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "a:0",
            "-show_entries",
            "stream=codec_name,sample_rate,channels",
            "-of",
            "json",
            input,
        ])
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][0];
    (
        s["codec_name"].as_str().unwrap_or("").to_string(),
        s["sample_rate"].as_str().unwrap_or("0").parse().unwrap(),
        s["channels"].as_u64().unwrap_or(0) as u32,
    )
}

/// Power of `freq` in `samples` (Goertzel), normalised by length.
pub fn tone_power(samples: &[f32], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 48_000.0;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s0 = x as f64 + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (samples.len() as f64).powi(2)
}

/// The loudest frequency between 100 and 2000 Hz in the loudest 0.5 s window (2 Hz steps, then 0.5 Hz).
pub fn dominant_frequency(samples: &[f32]) -> (f64, f64) {
    let win = loudest_window(samples, 24_000);
    let coarse = (50..=1000)
        .map(|k| k as f64 * 2.0)
        .max_by(|a, b| tone_power(win, *a).total_cmp(&tone_power(win, *b)))
        .unwrap();
    let fine = (-8..=8)
        .map(|k| coarse + k as f64 * 0.5)
        .max_by(|a, b| tone_power(win, *a).total_cmp(&tone_power(win, *b)))
        .unwrap();
    (fine, rms(win))
}

/// Root mean square.
pub fn rms(samples: &[f32]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    (samples.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / samples.len() as f64).sqrt()
}

/// The `len`-sample window with the most energy.
pub fn loudest_window(samples: &[f32], len: usize) -> &[f32] {
    if samples.len() <= len {
        return samples;
    }
    let mut best = (0, -1.0);
    let mut start = 0;
    while start + len <= samples.len() {
        let e = rms(&samples[start..start + len]);
        if e > best.1 {
            best = (start, e);
        }
        start += len / 2;
    }
    &samples[best.0..best.0 + len]
}

/// Run a child process and stream its stdout lines to `on_line` until it exits; returns the status.
pub fn run_streaming(mut cmd: Command, mut on_line: impl FnMut(&str)) -> std::process::ExitStatus {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        on_line(&line);
    }
    child.wait().unwrap()
}

/// Poll `url` until it answers `want` (panics after `timeout`).
pub fn wait_status(url: &str, want: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while get_status(url) != want {
        assert!(Instant::now() < deadline, "{url} never answered {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Decode `seconds` of a live or VOD HLS URL with ffmpeg; assert the tone.
pub fn ffmpeg_hears(url: &str, freq: f64, seconds: &str) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i", url, "-t", seconds])
        .args(["-f", "f32le", "-ac", "1", "-ar", "48000", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "ffmpeg {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<f32> = out
        .stdout
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(samples.len() >= 48_000, "{url}: {} samples", samples.len());
    let (f, level) = dominant_frequency(&samples);
    assert!((f - freq).abs() <= 5.0, "{url}: dominant {f} Hz");
    assert!(level > 0.02, "{url}: rms {level}");
}

/// A real s3s-fs on loopback, killed on drop.
pub struct S3sFs {
    child: Option<Child>,
    /// The directory it serves (one subdirectory per bucket).
    pub root: PathBuf,
    port: u16,
}

/// Access key of the test s3s-fs.
pub const S3_KEY: &str = "amphi-test-access";
/// Secret key of the test s3s-fs.
pub const S3_SECRET: &str = "amphi-test-secret-key-1234";

impl S3sFs {
    /// `$AMPHI_S3S_FS`, else where `scripts/test.sh` installs it.
    pub fn binary() -> PathBuf {
        std::env::var_os("AMPHI_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").expect("HOME");
                Path::new(&home).join(".cache/amphi/s3s/bin/s3s-fs")
            })
    }

    /// Start one serving `root` on `port` (waits until it listens).
    pub fn start(root: PathBuf, port: u16) -> S3sFs {
        let mut s = S3sFs {
            child: None,
            root,
            port,
        };
        s.spawn();
        s
    }

    /// Start it (again).
    pub fn spawn(&mut self) {
        std::fs::create_dir_all(&self.root).unwrap();
        let bin = Self::binary();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} must be installed by scripts/test.sh: {e}",
                    bin.display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its endpoint URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The object `key` of bucket `bucket` as s3s-fs stored it on disk.
    pub fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join(bucket).join(key)).ok()
    }
}

impl S3sFs {
    /// Every object key s3s-fs holds on disk in `bucket` (its files, relative paths).
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let root = self.root.join(bucket);
        let mut out = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(d) = dirs.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if let Ok(rel) = p.strip_prefix(&root) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One webhook delivery as received.
pub struct Delivery {
    /// `X-Amphi-Webhook-Signature`.
    pub signature: String,
    /// The JSON body.
    pub body: serde_json::Value,
}

/// A tiny HTTP/1.1 receiver on `port`: answers 200 to every POST and passes deliveries on.
pub fn webhook_receiver(port: u16) -> std::sync::mpsc::Receiver<Delivery> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind webhook receiver");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let (mut length, mut signature) = (0usize, String::new());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("x-amphi-webhook-signature:") {
                    signature = line.split_once(':').unwrap().1.trim().to_string();
                }
                line.clear();
            }
            let mut body = vec![0; length.min(1 << 20)];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if let Ok(body) = serde_json::from_slice(&body) {
                if tx.send(Delivery { signature, body }).is_err() {
                    return;
                }
            }
        }
    });
    rx
}
