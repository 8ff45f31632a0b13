//! amphi-packager: turns each room's program stream into LL-HLS (CMAF fMP4 parts of 200 ms,
//! segments of 2 s) on local disk and serves it with blocking playlist reload.
//!
//! Files and URLs (the same layout on disk under `{data_dir}/hls/` and over HTTP under `/hls/`):
//! `{room}/index.m3u8` (multivariant), `{room}/opus/playlist.m3u8`, `{room}/opus/init.mp4`,
//! `{room}/opus/seg{msn}.m4s`, `{room}/opus/part{msn}.{part}.m4s`.
//!
//! Retention: the live playlist slides (last 10 segments, parts for the last 2 plus the segment
//! in progress) but no file is deleted, so a VOD playlist of the whole recording can be added
//! later without re-packaging.
//!
//! Sans-IO cores: [`segmenter::Segmenter`], [`playlist::MediaPlaylist`],
//! [`request::decide_reload`], [`request::parse_hls_path`], [`request::parse_hls_query`].

#![deny(missing_docs)]

pub mod fmp4;
mod http;
mod ingest;
pub mod metrics;
pub mod playlist;
pub mod request;
mod room;
pub mod segmenter;

pub use request::{decide_reload, parse_hls_path, parse_hls_query};

use amphi_protocol::config::PackagerConfig;
use amphi_protocol::mtls::MtlsMaterial;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything `run` needs.
pub struct PackagerSetup {
    /// id, origin_addr, origin_server_name, http_listen, data_dir.
    pub config: PackagerConfig,
    /// Mesh certificate, key and CA for the QUIC link to the origin.
    pub mesh_tls: MtlsMaterial,
}

/// Why the packager could not run.
#[derive(Debug, thiserror::Error)]
pub enum PackagerError {
    /// TLS material unusable.
    #[error("mesh TLS: {0}")]
    Tls(#[from] amphi_protocol::mtls::MtlsError),
    /// rustls config not usable for QUIC.
    #[error("QUIC client config: {0}")]
    Quic(String),
    /// Filesystem or socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Run the packager until `shutdown` is cancelled.
pub async fn run(setup: PackagerSetup, shutdown: CancellationToken) -> Result<(), PackagerError> {
    let PackagerSetup { config, mesh_tls } = setup;
    let tls = mesh_tls.client_config()?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| PackagerError::Quic(e.to_string()))?;
    let client = quinn::ClientConfig::new(Arc::new(quic));

    tokio::fs::create_dir_all(config.data_dir.join("hls")).await?;
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| PackagerError::Bind {
            addr: config.http_listen,
            source,
        })?;
    let metrics = Arc::new(metrics::Metrics::default());
    let registry = Arc::new(room::Registry::new(
        config.data_dir.clone(),
        metrics.clone(),
    ));
    let tasks = TaskTracker::new();
    tracing::info!(
        packager = %config.id,
        http = %config.http_listen,
        origin = %config.origin_addr,
        data_dir = %config.data_dir.display(),
        "packager starting"
    );

    let ingest = Arc::new(ingest::Ingest::new(
        config,
        registry.clone(),
        metrics.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    let ingest_task = tokio::spawn(ingest.run(client));

    let state = Arc::new(http::HttpState {
        registry,
        metrics,
        shutdown: shutdown.clone(),
    });
    let server = axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let served = server.await;

    shutdown.cancel();
    let ingested = ingest_task
        .await
        .map_err(|e| std::io::Error::other(format!("ingest task: {e}")))?;
    tasks.close();
    tasks.wait().await;
    served?;
    ingested?;
    tracing::info!("packager stopped");
    Ok(())
}
