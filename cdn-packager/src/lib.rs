//! amphi-packager: turns each room's program stream into LL-HLS — an Opus rendition (hls.js /
//! MSE) and an AAC-LC rendition (Safari / iOS) of CMAF fMP4 parts of 200 ms in segments of 2 s —
//! stores it (filesystem or S3), serves it with blocking playlist reload over HTTP/1.1 and
//! HTTP/2 (TLS), and keeps a VOD recording of every room that ends.
//!
//! Keys (the same under `{data_dir}/hls/`, under the S3 prefix, and over HTTP under `/hls/`):
//! `{room}/index.m3u8` (main multivariant: one codec), `{room}/index-{opus,aac}.m3u8`,
//! `{room}/{opus,aac}/playlist.m3u8`, `.../init.m4a`, `.../seg{msn}.m4a`,
//! `.../part{msn}.{part}.m4a` (older recordings: `init.mp4`, `.m4s`, still served); after the
//! room ends `{room}/recording.m3u8` and `{room}/recording-{opus,aac}.m3u8` (multivariants of
//! the recording), `{room}/{opus,aac}/vod.m3u8` and `{room}/recording.json`.
//!
//! Retention: the live playlist slides (last 10 segments, parts for the last 2 plus the segment
//! in progress); objects stay in storage so the VOD playlist can list the whole program, until
//! the recording's retention (`[packager.recording] retention_hours`) expires.
//!
//! Sans-IO cores: [`segmenter::Segmenter`], [`aac::AacRendition`], [`playlist::MediaPlaylist`],
//! [`speakers::SpeakerTimeline`], [`upload::Lane`] (upload order, memory budget, spilling,
//! retries), [`request::decide_reload`],
//! [`request::parse_hls_path`], [`request::parse_hls_query`], [`program_record`] (program stream
//! records), [`recording_index`]. Its LL-HLS conformance checker and synthetic sources live in
//! `amphi-testkit`.

#![deny(missing_docs)]

#[cfg(feature = "aac")]
pub mod aac;
pub mod chapters;
pub mod fmp4;
mod h1;
mod http;
mod ingest;
pub mod m4a;
pub mod metrics;
pub mod playlist;
pub mod recording_index;
mod recordings;
pub mod request;
mod room;
pub mod segmenter;
mod snapshot;
pub mod speakers;
pub mod spill;
pub mod storage;
mod tls;
pub mod upload;

pub use ingest::{program_record, ProgramRecordError};
pub use request::{decide_reload, parse_hls_path, parse_hls_query};
pub use snapshot::PUBLISHED_HEADER;
pub use storage::{Backend, StorageConfig};

use amphi_common::mtls::MtlsMaterial;
use amphi_protocol::config::PackagerConfig;
use amphi_protocol::token::TokenVerifier;
use amphi_protocol::RoomId;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Recording settings, `[packager.recording]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecordingConfig {
    /// Delete a recording (and every object of its room) this long after the room ended;
    /// absent: keep forever.
    #[serde(default)]
    pub retention_hours: Option<f64>,
    /// How often expired recordings are looked for (default 600 s).
    #[serde(default)]
    pub sweep_interval_secs: Option<u64>,
    /// A recording's playlists, chapters and file need the geo-router's signed URL (`?sig=`)
    /// until its host publishes it (default false: public once stored, as before).
    #[serde(default)]
    pub private_until_published: Option<bool>,
}

/// Packager settings beyond [`PackagerConfig`] (all optional in the TOML `[packager]` table).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PackagerOptions {
    /// `[packager.storage]`: filesystem (default) or S3.
    #[serde(default)]
    pub storage: StorageConfig,
    /// `[packager.recording]`: retention of recordings.
    #[serde(default)]
    pub recording: RecordingConfig,
    /// HTTPS listener (HTTP/2 and HTTP/1.1 by ALPN) serving the same resources.
    #[serde(default)]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for the HTTPS listener; absent: a self-signed certificate for
    /// `localhost`/`127.0.0.1` is generated and written to `{data_dir}/tls/packager.crt`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The plain HTTP listener answers `/hls/` requests on its own HTTP/1.1 fast path, writing
    /// held blocking reloads in one pass per publication (default); `false`: everything through
    /// hyper/axum, like the HTTPS listener.
    #[serde(default)]
    pub http1_fast_path: Option<bool>,
}

/// Everything `run` needs.
pub struct PackagerSetup {
    /// id, origins, http_listen, data_dir.
    pub config: PackagerConfig,
    /// Storage, recording and TLS listener settings.
    pub options: PackagerOptions,
    /// Mesh certificate, key and CA for the QUIC links to the origins.
    pub mesh_tls: MtlsMaterial,
    /// The geo-router's token verification keys: its recording grants (signed URLs of private
    /// recordings, publish and delete requests) are checked with them.
    pub tokens: TokenVerifier,
}

/// Why the packager could not run.
#[derive(Debug, thiserror::Error)]
pub enum PackagerError {
    /// TLS material unusable.
    #[error("mesh TLS: {0}")]
    Tls(#[from] amphi_common::mtls::MtlsError),
    /// rustls config not usable for QUIC.
    #[error("QUIC client config: {0}")]
    Quic(String),
    /// The HTTPS listener's certificate or key is unusable.
    #[error("HTTPS listener: {0}")]
    HttpsTls(String),
    /// Storage unusable.
    #[error("storage: {0}")]
    Storage(#[from] storage::StorageError),
    /// Filesystem or socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The origin list is unusable.
    #[error("config: {0}")]
    Config(#[from] amphi_protocol::config::OriginListError),
    /// The per-address HTTP budgets are misconfigured.
    #[error("HTTP limits: {0}")]
    Limits(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running packager core without the QUIC link: storage, rooms and the HTTP listeners.
/// [`run`] links it to the origins; benchmarks feed it directly through [`Packager::input`].
pub struct Packager {
    registry: Arc<room::Registry>,
    metrics: Arc<metrics::Metrics>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The bound plain HTTP address.
    pub http_addr: SocketAddr,
    /// The bound HTTPS address, if any.
    pub https_addr: Option<SocketAddr>,
}

/// Program input for one room, for drivers other than the QUIC ingest (benchmarks).
pub struct RoomInput {
    handle: Arc<room::RoomHandle>,
    gen: u64,
}

impl RoomInput {
    /// One 20 ms Opus program frame with RTP timestamp `rtp_ts`, `speaker` loudest.
    pub fn frame(&self, rtp_ts: u32, payload: &[u8], speaker: u32) {
        let f = segmenter::ProgramFrame { rtp_ts, payload };
        if let Err(e) =
            self.handle
                .core()
                .frame(self.gen, f, speaker, Instant::now(), SystemTime::now())
        {
            tracing::error!(room = %self.handle.room, error = %e, "packaging failed");
        }
    }

    /// The room ended.
    pub fn end(&self) {
        let mut core = self.handle.core();
        let _ = core.stream_finished(self.gen);
        let _ = core.room_ended();
    }
}

impl Packager {
    /// Open storage and start the HTTP (and HTTPS) listeners; no recording grant verifies
    /// (benchmarks, tests without a router).
    pub async fn start(
        config: &PackagerConfig,
        options: &PackagerOptions,
        shutdown: CancellationToken,
    ) -> Result<Packager, PackagerError> {
        Self::start_with(config, options, TokenVerifier::default(), shutdown).await
    }

    /// [`Packager::start`], checking the geo-router's recording grants with `tokens`.
    pub async fn start_with(
        config: &PackagerConfig,
        options: &PackagerOptions,
        tokens: TokenVerifier,
        shutdown: CancellationToken,
    ) -> Result<Packager, PackagerError> {
        let store = Arc::new(storage::Store::open(&options.storage, &config.data_dir).await?);
        let listener = tokio::net::TcpListener::bind(config.http_listen)
            .await
            .map_err(|source| PackagerError::Bind {
                addr: config.http_listen,
                source,
            })?;
        let http_addr = listener.local_addr()?;
        let tls = match options.tls_listen {
            Some(addr) => {
                let acceptor = tls::acceptor(options, &config.data_dir).await?;
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| PackagerError::Bind { addr, source })?;
                Some((l, acceptor))
            }
            None => None,
        };
        let https_addr = match &tls {
            Some((l, _)) => Some(l.local_addr()?),
            None => None,
        };
        let metrics = Arc::new(metrics::Metrics::default());
        let tasks = TaskTracker::new();
        let budget = options
            .storage
            .upload_memory_budget_bytes
            .unwrap_or(upload::DEFAULT_MEMORY_BUDGET);
        let spill_dir = options
            .storage
            .spill_dir
            .clone()
            .unwrap_or_else(|| config.data_dir.join("spill"));
        let held = Arc::new(h1::HeldReloads::new(metrics.clone()));
        tasks.spawn(h1::sweep_held(held.clone(), shutdown.clone()));
        let registry = Arc::new(room::Registry::new(
            store.clone(),
            metrics.clone(),
            budget,
            spill::SpillDir::new(spill_dir),
            held.clone(),
            shutdown.clone(),
            tasks.clone(),
        ));
        {
            let registry = registry.clone();
            tasks.spawn(async move { registry.load_stored_rooms(Duration::from_secs(5)).await });
        }
        let state = Arc::new(http::HttpState {
            registry: registry.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            recordings: Arc::new(recordings::Recordings::new(
                tokens,
                options.recording.private_until_published.unwrap_or(false),
            )),
        });
        let limiter =
            amphi_protocol::https::Limiter::new(&config.limits, metrics.http_limits.clone())
                .map_err(|e| PackagerError::Limits(e.to_string()))?;
        let app = amphi_protocol::https::limit_requests_by_peer(
            http::router(state.clone()),
            limiter.clone(),
        );
        if let Some((l, acceptor)) = tls {
            tasks.spawn(amphi_protocol::https::serve_tls(
                l,
                acceptor,
                app.clone(),
                shutdown.clone(),
                limiter.clone(),
            ));
        }
        if let Some(hours) = options.recording.retention_hours {
            let every = Duration::from_secs(options.recording.sweep_interval_secs.unwrap_or(600));
            tasks.spawn(sweep_recordings(
                registry.clone(),
                metrics.clone(),
                Duration::from_secs_f64(hours.max(0.0) * 3600.0),
                every,
                shutdown.clone(),
            ));
        }
        let server = if options.http1_fast_path.unwrap_or(true) {
            let front = Arc::new(h1::FastPath {
                http: state,
                held,
                limiter: limiter.clone(),
                app,
            });
            let sd = shutdown.clone();
            tokio::spawn(async move {
                amphi_protocol::h1::serve_fast(listener, front, sd, limiter).await;
                Ok(())
            })
        } else {
            let sd = shutdown.clone();
            tokio::spawn(async move {
                amphi_protocol::https::serve_plain(listener, app, sd, limiter).await;
                Ok(())
            })
        };
        tracing::info!(
            http = %http_addr,
            https = ?https_addr,
            storage = store.kind(),
            "packager listening"
        );
        Ok(Packager {
            registry,
            metrics,
            tasks,
            shutdown,
            server,
            http_addr,
            https_addr,
        })
    }

    /// Open `room` and start a program stream for it (benchmarks and in-process drivers).
    pub async fn input(&self, room: RoomId) -> Result<RoomInput, PackagerError> {
        let handle = self
            .registry
            .get_or_open(room)
            .await
            .map_err(|e| PackagerError::Io(std::io::Error::other(e.to_string())))?;
        let gen = 1;
        let _ = handle.core().start_stream(gen);
        Ok(RoomInput { handle, gen })
    }

    /// Prometheus text of the packager's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// Wait for the listeners and every room's uploads to stop (after `shutdown` fired).
    pub async fn stopped(self) -> Result<(), PackagerError> {
        self.shutdown.cancelled().await;
        let served = self
            .server
            .await
            .map_err(|e| std::io::Error::other(format!("http task: {e}")))?;
        self.tasks.close();
        self.tasks.wait().await;
        served?;
        Ok(())
    }
}

/// Delete recordings (every object of their room) once older than `retention`.
async fn sweep_recordings(
    registry: Arc<room::Registry>,
    metrics: Arc<metrics::Metrics>,
    retention: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    use storage::Storage;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let store = registry.store();
        let keys = match store.list("").await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "retention sweep: cannot list storage");
                continue;
            }
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for k in keys.iter().filter(|k| k.ends_with("/recording.json")) {
            let Some(room) = k.split('/').next() else {
                continue;
            };
            let ended_at = match store.get(k).await {
                Ok(Some(b)) => serde_json::from_slice::<serde_json::Value>(&b)
                    .ok()
                    .and_then(|v| v["ended_at"].as_u64()),
                _ => None,
            };
            let Some(ended_at) = ended_at else { continue };
            let live = room
                .parse::<RoomId>()
                .ok()
                .and_then(|id| registry.get(id))
                .is_some_and(|h| !h.recording_ready.load(std::sync::atomic::Ordering::Relaxed));
            if live {
                continue;
            }
            if !recording_expired(ended_at, now, retention) {
                continue;
            }
            let prefix = format!("{room}/");
            let mut removed = 0usize;
            for obj in keys.iter().filter(|o| o.starts_with(&prefix)) {
                if store.delete(obj).await.is_ok() {
                    removed += 1;
                }
            }
            if let Ok(id) = room.parse::<RoomId>() {
                registry.forget_stored(id);
            }
            metrics
                .recordings_expired
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(room, removed, "recording expired and deleted");
        }
    }
}

/// A recording of a room that ended at `ended_at` (Unix seconds) is past `retention` at `now`.
pub fn recording_expired(ended_at: u64, now: u64, retention: Duration) -> bool {
    now.saturating_sub(ended_at) >= retention.as_secs()
}

/// Run the packager until `shutdown` is cancelled.
pub async fn run(setup: PackagerSetup, shutdown: CancellationToken) -> Result<(), PackagerError> {
    let PackagerSetup {
        config,
        options,
        mesh_tls,
        tokens,
    } = setup;
    let tls = mesh_tls.client_config()?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| PackagerError::Quic(e.to_string()))?;
    let client = quinn::ClientConfig::new(Arc::new(quic));
    let origins = config.origin_endpoints()?;
    let packager = Packager::start_with(&config, &options, tokens, shutdown.clone()).await?;
    tracing::info!(
        packager = %config.id,
        origins = ?origins.iter().map(|o| &o.id).collect::<Vec<_>>(),
        data_dir = %config.data_dir.display(),
        "packager starting"
    );
    let ingest = Arc::new(ingest::Ingest::new(
        config,
        packager.registry.clone(),
        packager.metrics.clone(),
        shutdown.clone(),
        packager.tasks.clone(),
    ));
    let ingested = ingest.run(origins, client).await;
    shutdown.cancel();
    let stopped = packager.stopped().await;
    ingested?;
    stopped?;
    tracing::info!("packager stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_decision() {
        let day = Duration::from_secs(86_400);
        assert!(!recording_expired(1_000, 1_000 + 86_399, day));
        assert!(recording_expired(1_000, 1_000 + 86_400, day));
        assert!(!recording_expired(2_000, 1_000, day), "clock skew keeps it");
    }

    #[test]
    fn options_parse_from_toml_with_defaults() {
        let o: PackagerOptions = toml_like(
            r#"{"storage":{"backend":"s3","bucket":"b","endpoint":"http://127.0.0.1:9","path_style":true},
                "recording":{"retention_hours":48.0},"tls_listen":"127.0.0.1:8443"}"#,
        );
        assert_eq!(o.storage.backend, Backend::S3);
        assert_eq!(o.recording.retention_hours, Some(48.0));
        let d: PackagerOptions = toml_like("{}");
        assert_eq!(d.storage.backend, Backend::Filesystem);
        assert!(d.tls_listen.is_none());
    }

    fn toml_like(json: &str) -> PackagerOptions {
        serde_json::from_str(json).unwrap()
    }
}
