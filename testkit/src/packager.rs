//! The packager's test harness: a packager started with `amphi_packager::run` behind a quinn
//! origin stand-in, program-stream records, a minimal HTTP/1.1 client, a pitch detector, and
//! ffmpeg wrappers.

use amphi_common::mtls::{DevPki, MeshRole};
use amphi_packager::{run, PackagerError, PackagerOptions, PackagerSetup};
use amphi_protocol::config::PackagerConfig;
use amphi_protocol::control::{ControlDecoder, ControlMessage, PeerKind};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::RoomId;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::net::scratch_dir;

/// `n` consecutive 20 ms Opus packets of a `freq` Hz sine at half scale, 64 kbps mono.
pub fn tone_frames(freq: f64, n: usize) -> Vec<Vec<u8>> {
    crate::synth::tone_packets(freq, 0.5, n).expect("opus encoder")
}

/// One program-stream record: `u32 LE length | relay frame (Program)`.
pub fn program_record(room: RoomId, index: u32, payload: &[u8]) -> Vec<u8> {
    program_record_from(room, index, payload, 0)
}

/// Like [`program_record`] with `speaker` as the loudest speaker.
pub fn program_record_from(room: RoomId, index: u32, payload: &[u8], speaker: u32) -> Vec<u8> {
    let frame = RelayFrame {
        kind: FrameKind::Program,
        room,
        speaker,
        seq: index as u16,
        rtp_ts: index.wrapping_mul(960),
        audio_level: 20,
        payload,
    };
    let mut body = Vec::new();
    frame.encode_to_vec(&mut body).unwrap();
    let mut rec = (body.len() as u32).to_le_bytes().to_vec();
    rec.extend_from_slice(&body);
    rec
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Resp {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`; the raw path is sent untouched.
pub async fn http_get(addr: SocketAddr, path: &str) -> Resp {
    tokio::time::timeout(Duration::from_secs(15), async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("header end");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        let chunked = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
        if chunked {
            body = dechunk(&body);
        }
        Resp {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("HTTP request timed out")
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let len =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if len == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + len]);
        b = &b[eol + 2 + len + 2..];
    }
    out
}

/// Goertzel power of `freq` in `x`.
fn power(x: &[f64], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 48_000.0;
    let c = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &v in x {
        let s0 = v + c * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - c * s1 * s2
}

/// Dominant frequency (Hz) between 50 and 2000 Hz, and the RMS of the samples.
pub fn dominant_frequency(samples: &[i16]) -> (f64, f64) {
    let x: Vec<f64> = samples.iter().map(|&s| f64::from(s)).collect();
    let rms = (x.iter().map(|v| v * v).sum::<f64>() / x.len().max(1) as f64).sqrt();
    let mut best = (0.0, 0.0);
    let mut f = 50.0;
    while f <= 2000.0 {
        let p = power(&x, f);
        if p > best.1 {
            best = (f, p);
        }
        f += 5.0;
    }
    let mut fine = best;
    let mut f = best.0 - 5.0;
    while f <= best.0 + 5.0 {
        let p = power(&x, f);
        if p > fine.1 {
            fine = (f, p);
        }
        f += 0.25;
    }
    (fine.0, rms)
}

/// s16le samples from raw bytes.
pub fn s16le(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Run `ffmpeg` with `args` (blocking, in a worker thread) and return its stdout.
pub async fn ffmpeg_stdout(program: &'static str, args: Vec<String>) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("{program} must be installed: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    })
    .await
    .unwrap()
}

/// Decode the media at `url` (a file or an HLS playlist) with ffmpeg into 48 kHz mono samples.
pub async fn ffmpeg_decode(url: &str) -> Vec<i16> {
    let args = [
        "-v", "error", "-i", url, "-f", "s16le", "-ac", "1", "-ar", "48000", "-",
    ];
    let pcm = ffmpeg_stdout("ffmpeg", args.iter().map(|s| s.to_string()).collect()).await;
    s16le(&pcm)
}

/// Accept the packager's connection on `endpoint`, check its Hello and answer Welcome
/// (bounded: 10 s).
pub async fn accept_packager(
    endpoint: &quinn::Endpoint,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    tokio::time::timeout(Duration::from_secs(10), async {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut dec = ControlDecoder::default();
        let mut buf = [0u8; 1024];
        let hello = loop {
            if let Some(m) = dec.next_message().unwrap() {
                break m;
            }
            let n = recv.read(&mut buf).await.unwrap().unwrap();
            dec.feed(&buf[..n]);
        };
        assert_eq!(
            hello,
            ControlMessage::Hello {
                peer: PeerKind::Packager,
                id: "packager-test".into(),
                region: String::new()
            }
        );
        send.write_all(
            &ControlMessage::Welcome {
                origin: "origin-test".into(),
            }
            .to_record(),
        )
        .await
        .unwrap();
        (conn, send, recv)
    })
    .await
    .expect("packager connects and says hello")
}

/// A running packager plus the origin side of its QUIC link.
pub struct Harness {
    /// The packager's HTTP listener.
    pub http: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Stops it.
    pub shutdown: CancellationToken,
    /// Its `run` task.
    pub packager: JoinHandle<Result<(), PackagerError>>,
    /// The packager's connection to the first origin stand-in.
    pub conn: quinn::Connection,
    /// The origin side of its control stream, sending half.
    pub control_send: quinn::SendStream,
    /// The origin side of its control stream, receiving half.
    pub control_recv: quinn::RecvStream,
    /// The first origin stand-in's endpoint.
    pub endpoint: quinn::Endpoint,
    /// Further origin stand-ins (see [`Harness::start_origins`]).
    pub others: Vec<OriginSide>,
}

/// The origin side of one more packager link.
pub struct OriginSide {
    /// Its endpoint.
    pub endpoint: quinn::Endpoint,
    /// The packager's connection.
    pub conn: quinn::Connection,
    /// The control stream, sending half.
    pub control_send: quinn::SendStream,
    /// The control stream, receiving half.
    pub control_recv: quinn::RecvStream,
}

impl Harness {
    /// Send `frames` as one program stream of `room` (5 ms apart; frame `i`'s loudest speaker
    /// is `speaker(i)`), finish it, then tell the packager the room ended.
    pub async fn speak_and_end(
        &mut self,
        room: RoomId,
        frames: &[Vec<u8>],
        speaker: impl Fn(usize) -> u32,
    ) {
        let mut uni = self.conn.open_uni().await.unwrap();
        for (i, f) in frames.iter().enumerate() {
            uni.write_all(&program_record_from(room, i as u32, f, speaker(i)))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        uni.finish().unwrap();
        self.control_send
            .write_all(&ControlMessage::RoomEnded { room }.to_record())
            .await
            .unwrap();
    }

    /// Start an origin stand-in and `run(...)`, and accept the packager.
    pub async fn start(tag: &str) -> Harness {
        Self::start_with(tag, PackagerOptions::default()).await
    }

    /// Like [`Harness::start`] with packager options (storage, TLS listener).
    pub async fn start_with(tag: &str, options: PackagerOptions) -> Harness {
        Self::start_in(options, scratch_dir(tag)).await
    }

    /// Like [`Harness::start_with`] on an existing data directory (a packager restart).
    pub async fn start_in(options: PackagerOptions, data_dir: PathBuf) -> Harness {
        Self::start_origins(options, data_dir, 1).await
    }

    /// A packager linked to `origins` origin stand-ins: the first is the harness's own
    /// (`conn`, `control_send`, ...), the others are in `others`.
    pub async fn start_origins(
        options: PackagerOptions,
        data_dir: PathBuf,
        origins: usize,
    ) -> Harness {
        let pki = DevPki::generate().unwrap();
        let origin_tls = pki
            .issue("origin.amphi.internal", MeshRole::Origin)
            .unwrap();
        let packager_tls = pki.issue("packager-test", MeshRole::Packager).unwrap();
        let server =
            quinn::crypto::rustls::QuicServerConfig::try_from(origin_tls.server_config().unwrap())
                .unwrap();
        let server = quinn::ServerConfig::with_crypto(Arc::new(server));
        let endpoints: Vec<_> = (0..origins.max(1))
            .map(|_| {
                quinn::Endpoint::server(server.clone(), "127.0.0.1:0".parse().unwrap()).unwrap()
            })
            .collect();
        let http = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let shutdown = CancellationToken::new();
        let setup = PackagerSetup {
            config: PackagerConfig {
                id: "packager-test".into(),
                origins: endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, e)| amphi_protocol::config::OriginEndpoint {
                        id: format!("origin-test-{i}"),
                        addr: e.local_addr().unwrap(),
                        server_name: "origin.amphi.internal".into(),
                    })
                    .collect(),
                origin_addr: None,
                origin_server_name: None,
                http_listen: http,
                data_dir: data_dir.clone(),
                limits: Default::default(),
            },
            options,
            mesh_tls: packager_tls,
            tokens: Default::default(),
        };
        let packager = tokio::spawn(run(setup, shutdown.clone()));
        let mut endpoints = endpoints.into_iter();
        let endpoint = endpoints.next().unwrap();
        let (conn, control_send, control_recv) = accept_packager(&endpoint).await;
        let mut others = Vec::new();
        for endpoint in endpoints {
            let (conn, control_send, control_recv) = accept_packager(&endpoint).await;
            others.push(OriginSide {
                endpoint,
                conn,
                control_send,
                control_recv,
            });
        }
        // The HTTP listener is bound before the QUIC link starts.
        Harness {
            http,
            data_dir,
            shutdown,
            packager,
            conn,
            control_send,
            control_recv,
            endpoint,
            others,
        }
    }

    /// Poll `path` until `pred` holds (bounded: 200 x 25 ms).
    pub async fn wait_until(&self, path: &str, pred: impl Fn(&Resp) -> bool) -> Resp {
        for _ in 0..200 {
            let r = http_get(self.http, path).await;
            if pred(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{path} never satisfied the condition");
    }

    /// Stop the packager and remove its files.
    pub async fn stop(self) {
        let dir = self.stop_keeping_files().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Stop the packager; its data directory stays (returned).
    pub async fn stop_keeping_files(self) -> PathBuf {
        self.shutdown.cancel();
        let res = tokio::time::timeout(Duration::from_secs(10), self.packager)
            .await
            .expect("packager stops within 10 s")
            .unwrap();
        assert!(res.is_ok(), "run returned {res:?}");
        self.conn.close(0u32.into(), b"done");
        self.data_dir
    }
}
