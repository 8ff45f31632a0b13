//! amphi-edge: the WebRTC SFU edge.
//!
//! Speakers publish Opus over WebRTC (WHIP, RFC 9725, or a WebSocket-signaled PeerConnection) to
//! an edge; the edge terminates ICE-lite, DTLS-SRTP with str0m on one shared UDP socket, forwards
//! every allowed RTP packet to the origin as a relay frame in a QUIC datagram over an mTLS link,
//! and forwards the room's 3 loudest speakers (local, or relayed from other regions by the origin)
//! to its interactive listeners (WHEP or WebSocket). Client signaling (`/v1/ws`) keeps a replica
//! of each room's state, whose authority is the room's origin.
//!
//! Layout: sans-IO cores ([`peers`], [`lifecycle`], [`mesh`], [`offer`], [`room`], [`signaling`],
//! [`slots`]) make every decision; thin tokio drivers (media socket, QUIC uplink, HTTP and
//! WebSocket) carry them out. The str0m-based WHIP/WHEP clients the tests and load generators
//! use live in `amphi-testkit`.

#![warn(missing_docs)]

mod admission;
pub mod batch;
pub mod dtls;
mod http;
pub mod leases;
pub mod lifecycle;
mod media;
pub mod mesh;
pub mod metrics;
pub mod occupancy;
pub mod offer;
pub mod owners;
pub mod peers;
pub mod push;
mod push_fanout;
mod push_feed;
mod push_hub;
mod push_io;
pub mod push_tree;
mod push_ws;
pub mod push_wt;
pub mod red;
pub mod registration;
pub mod rejoin;
pub mod room;
pub mod sdpfrag;
mod sessions;
pub mod shards;
pub mod signaling;
pub mod slots;
mod srtp_out;
pub mod tier_moves;
mod uplink;
mod watched;
mod ws;

pub use occupancy::Occupancy;
pub use offer::{parse_client_offer, parse_whip_offer, OfferError};
pub use peers::{stun_local_ufrag, DropReason};

use amphi_common::mtls::MtlsMaterial;
use amphi_protocol::config::EdgeConfig;
use amphi_protocol::token::TokenVerifier;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Everything an edge needs to run.
pub struct EdgeSetup {
    /// Listeners, identity, origin and router addresses.
    pub config: EdgeConfig,
    /// Certificate and CA for the QUIC mTLS link to the origin.
    pub mesh_tls: MtlsMaterial,
    /// Public keys that verify room tokens.
    pub tokens: TokenVerifier,
}

/// Why the edge could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration cannot work.
    #[error("invalid edge configuration: {0}")]
    Config(String),
    /// The mesh TLS material is unusable.
    #[error("mesh TLS: {0}")]
    Tls(#[from] amphi_common::mtls::MtlsError),
    /// The HTTPS listener's certificate or key, or the clients' extra CA, is unusable.
    #[error("HTTPS: {0}")]
    Https(#[from] amphi_protocol::https::HttpsError),
    /// QUIC setup failed.
    #[error("QUIC: {0}")]
    Quic(String),
    /// The media driver's socket, runtime or thread could not be set up.
    #[error("media driver: {0}")]
    Media(String),
}

/// Install str0m's crypto provider once per process (idempotent): aws-lc-rs with DTLS on
/// OpenSSL ([`dtls::crypto_provider`]), so RSA peers connect too.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| dtls::crypto_provider().install_process_default());
}

/// Capacity of the HTTP -> media driver command queue.
const MEDIA_QUEUE: usize = 1024;

/// Binds `http_listen` (TCP; HTTPS when `tls_cert`/`tls_key` are set) and `media_listen` (UDP),
/// keeps a QUIC link to every origin, serves until `shutdown` is cancelled.
pub async fn run(setup: EdgeSetup, shutdown: CancellationToken) -> Result<(), EdgeError> {
    run_with(setup, None, Arc::default(), shutdown).await
}

/// [`run`], plus registration with the geo-router (heartbeats every second; `None`: no
/// registration) and draining through `drain` (see [`registration`]).
pub async fn run_with(
    setup: EdgeSetup,
    registration: Option<registration::RegistrationOptions>,
    drain: Arc<registration::DrainHandle>,
    shutdown: CancellationToken,
) -> Result<(), EdgeError> {
    install_crypto_provider();
    let EdgeSetup {
        config,
        mesh_tls,
        mut tokens,
    } = setup;
    tokens.set_max_lifetime(config.max_token_lifetime_secs);

    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(mesh_tls.client_config()?)
        .map_err(|e| EdgeError::Quic(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic_tls));
    client_config.transport_config(Arc::new(uplink::transport_config()));

    let http_listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| EdgeError::Bind {
            what: "http_listen",
            addr: config.http_listen,
            source,
        })?;
    let https_acceptor = match config.https.listener().map_err(EdgeError::Config)? {
        Some((cert, key)) => Some(amphi_protocol::https::acceptor(cert, key)?),
        None => None,
    };
    let client_tls = amphi_protocol::https::client_tls_config(config.https.tls_ca.as_deref())?;
    let shard_count = shards::shard_count(config.media_threads);
    let media_bind_error = |source| EdgeError::Bind {
        what: "media_listen",
        addr: config.media_listen,
        source,
    };
    let udp_sockets =
        shards::bind_reuseport(config.media_listen, shard_count).map_err(media_bind_error)?;
    let media_local = udp_sockets[0].local_addr().map_err(media_bind_error)?;
    if config.index > amphi_protocol::ids::MAX_EDGE_INDEX {
        return Err(EdgeError::Config(format!(
            "index {} is over {}: edge indexes are 12 bits",
            config.index,
            amphi_protocol::ids::MAX_EDGE_INDEX
        )));
    }
    if config.ice_connect_timeout_secs == 0 {
        return Err(EdgeError::Config(
            "ice_connect_timeout_secs must be at least 1".into(),
        ));
    }
    let connect_timeout = std::time::Duration::from_secs(config.ice_connect_timeout_secs);
    let candidate = config.media_public.unwrap_or(media_local);
    if candidate.ip().is_unspecified() || candidate.port() == 0 {
        return Err(EdgeError::Config(format!(
            "ICE candidate address {candidate} is not routable: set media_public"
        )));
    }
    tracing::info!(
        edge = %config.id,
        region = %config.region,
        http = %config.http_listen,
        https = https_acceptor.is_some(),
        media = %media_local,
        media_threads = shard_count,
        %candidate,
        "edge listening"
    );

    let origins = config
        .origin_endpoints()
        .map_err(|e| EdgeError::Config(e.to_string()))?;
    let endpoint = uplink::client_endpoint(origins[0].addr, client_config)
        .map_err(|e| EdgeError::Quic(format!("client endpoint: {e}")))?;
    let metrics = Arc::new(metrics::Metrics::new(&config.region));
    let rooms = Arc::new(Mutex::new(lifecycle::RoomCache::new(
        admission::ROOM_CACHE_TTL,
    )));
    let inner = shutdown.child_token();
    let (mesh_tx, mesh_rx) = mpsc::unbounded_channel();
    let (targets_tx, targets_rx) = watch::channel(Arc::default());
    let mut inputs = Vec::with_capacity(shard_count);
    let (mut command_txs, mut control_txs, mut relayed_txs, mut foreign_txs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..shard_count {
        let (command_tx, commands) = mpsc::channel(MEDIA_QUEUE);
        let (control_tx, control) = mpsc::unbounded_channel();
        let (relayed_tx, relayed) = mpsc::channel(media::driver::RELAY_QUEUE);
        let (foreign_tx, foreign) = mpsc::channel(media::driver::RELAY_QUEUE);
        command_txs.push(command_tx);
        control_txs.push(control_tx);
        relayed_txs.push(relayed_tx);
        foreign_txs.push(foreign_tx);
        inputs.push(media::driver::MediaInputs {
            commands,
            control,
            relayed,
            foreign,
        });
    }
    let load: Arc<[std::sync::atomic::AtomicUsize]> = (0..shard_count)
        .map(|_| std::sync::atomic::AtomicUsize::new(0))
        .collect();
    let media = shards::MediaShards::new(command_txs, control_txs, load.clone());
    let sessions = Arc::new(sessions::Sessions::new(
        &config.region,
        mesh_tx.clone(),
        media.clone(),
        config.max_token_lifetime_secs,
        config.token_expiry_grace_secs,
    ));
    tokio::spawn(sessions.clone().tick_loop(inner.clone()));
    let (signal_tx, signal_rx) = mpsc::unbounded_channel();
    tokio::spawn(sessions.clone().media_events(signal_rx, inner.clone()));
    // Interactive listeners per room (`Occupancy::listeners_per_room`), for load reports.
    let occupancy = Arc::new(Occupancy::new(config.interactive_capacity));

    let ufrags = Arc::new(shards::UfragDirectory::default());
    let mut media_done = Vec::with_capacity(shard_count);
    for (index, (socket, shard_inputs)) in udp_sockets.into_iter().zip(inputs).enumerate() {
        let core = media::core::MediaCore::new(
            std::time::Instant::now(),
            candidate,
            index,
            metrics.clone(),
        )
        .with_connect_timeout(connect_timeout);
        let driver = media::driver::MediaDriver::new(
            core,
            media::driver::Relay::new(targets_rx.clone()),
            metrics.clone(),
            media::driver::MediaOutputs {
                mesh_tx: mesh_tx.clone(),
                signal_tx: signal_tx.clone(),
                occupancy: occupancy.clone(),
            },
            shards::ShardLinks {
                index,
                relayed: relayed_txs.clone(),
                foreign: foreign_txs.clone(),
                ufrags: ufrags.clone(),
                load: load.clone(),
            },
        );
        media_done.push(spawn_media_thread(
            driver,
            socket,
            shard_inputs,
            inner.clone(),
        )?);
    }
    drop(mesh_tx);
    drop(signal_tx);
    // One push writer per runtime worker: each writes its share of the push listeners.
    let push_writers = tokio::runtime::Handle::current().metrics().num_workers();
    let (push, push_rx) = push_hub::PushHub::start(
        push::PushConfig::default(),
        push_writers,
        metrics.clone(),
        &inner,
    );
    tokio::spawn(push.clone().tick_loop(inner.clone()));
    // Moves of listeners up a tier as seats free, with the router's thresholds per room.
    let (tier_thresholds_tx, tier_thresholds) = tokio::sync::watch::channel(Vec::new());
    let (waiting_rooms_tx, waiting_rooms) = tokio::sync::watch::channel(Vec::new());
    let tier_counts: sessions::TierCountsSource = {
        let (occupancy, push) = (occupancy.clone(), push.clone());
        Box::new(move || (occupancy.listeners_per_room(), push.listeners_per_room()))
    };
    tokio::spawn(sessions.clone().tier_moves_loop(
        tier_counts,
        tier_thresholds,
        waiting_rooms_tx,
        metrics.clone(),
        inner.clone(),
    ));
    // The relay tree: the hub's subscriptions go to the parent edge the router names, or to the
    // origins.
    let (relay_parent_tx, relay_parent) = tokio::sync::watch::channel(None);
    let (to_origins, origin_push_rx) = tokio::sync::mpsc::unbounded_channel();
    let (origin_rooms_tx, origin_push_rooms) = tokio::sync::watch::channel(Vec::new());
    let feeds = push_feed::PushFeeds {
        hub: push.clone(),
        subscriptions: push_rx,
        parent: relay_parent,
        to_origins,
        origin_rooms: origin_rooms_tx,
        tls: Arc::new(client_tls.clone()),
        server_name: config.relay_server_name.clone(),
    };
    tokio::spawn(feeds.run(inner.clone()));
    let uplink = uplink::Uplink {
        push: push.clone(),
        push_rx: origin_push_rx,
        push_rooms: origin_push_rooms,
        edge_id: config.id.clone(),
        region: config.region.clone(),
        origins,
        metrics: metrics.clone(),
        targets_tx,
        mesh_rx,
        media: media.clone(),
        rooms: rooms.clone(),
        sessions: sessions.clone(),
        relayed_txs,
    };
    let uplink_task = tokio::spawn(uplink.run(endpoint, inner.clone()));
    let limiter = amphi_protocol::https::Limiter::new(&config.limits, metrics.http_limits.clone())
        .map_err(|e| EdgeError::Config(e.to_string()))?;
    let webtransport = match &config.webtransport {
        Some(wt) => {
            let (server, advertised) =
                push_wt::WebTransportServer::bind(wt, &config.public_url, limiter.clone())
                    .map_err(|e| EdgeError::Config(e.to_string()))?;
            tracing::info!(listen = %wt.listen, url = ?advertised.borrow().as_ref().map(|a| &a.url), "push over WebTransport");
            Some((server, advertised))
        }
        None => None,
    };
    if let Some(options) = registration {
        let registrar = registration::Registrar {
            router_url: config.router_url.clone(),
            client: amphi_protocol::https::client_with(client_tls.clone()),
            id: config.id.clone(),
            region: config.region.clone(),
            public_url: config.public_url.clone(),
            relay_url: config.relay_url.clone(),
            webtransport: webtransport
                .as_ref()
                .map(|(_, advertised)| advertised.clone()),
            relay_parent: relay_parent_tx,
            tier_thresholds: tier_thresholds_tx,
            waiting_rooms,
            options,
            metrics: metrics.clone(),
            occupancy: occupancy.clone(),
            push: push.clone(),
            drain: drain.clone(),
        };
        tokio::spawn(registrar.run(inner.clone()));
    }

    let state = Arc::new(admission::AppState {
        tokens,
        candidate,
        media,
        rooms,
        router: admission::RouterClient::new(
            &config.router_url,
            amphi_protocol::https::client_with(client_tls),
        ),
        metrics,
        ids: Mutex::new(lifecycle::ParticipantIds::new(config.index)),
        sessions,
        occupancy,
        push,
    });
    if let Some((server, _)) = webtransport {
        tokio::spawn(server.run(state.clone(), inner.clone()));
    }
    let app = http::router(state).layer(axum::middleware::from_fn(move |req, next| {
        registration::refuse_new_sessions(drain.clone(), req, next)
    }));
    let app = amphi_protocol::https::limit_requests_by_peer(app, limiter.clone());
    match https_acceptor {
        Some(acceptor) => {
            amphi_protocol::https::serve_tls(http_listener, acceptor, app, inner.clone(), limiter)
                .await
        }
        None => {
            amphi_protocol::https::serve_plain(http_listener, app, inner.clone(), limiter).await
        }
    }
    inner.cancel();
    for done in media_done {
        if done.await.is_err() {
            tracing::error!("media driver panicked");
        }
    }
    if let Err(e) = uplink_task.await {
        tracing::error!(error = %e, "uplink panicked");
    }
    tracing::info!(edge = %config.id, "edge stopped");
    Ok(())
}

/// Name of the media driver's OS thread (benchmarks read its CPU time from `/proc`).
pub const MEDIA_THREAD_NAME: &str = "edge-media";

/// Run the media driver on its own OS thread with a single-threaded runtime, so forwarding never
/// waits behind HTTP, signaling or QUIC work and its CPU time is accountable on its own. The
/// returned receiver resolves when the driver has stopped (an error if it panicked).
fn spawn_media_thread(
    driver: media::driver::MediaDriver,
    socket: std::net::UdpSocket,
    inputs: media::driver::MediaInputs,
    shutdown: CancellationToken,
) -> Result<tokio::sync::oneshot::Receiver<()>, EdgeError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EdgeError::Media(format!("media runtime: {e}")))?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(MEDIA_THREAD_NAME.into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::UdpSocket::from_std(socket) {
                    Ok(socket) => driver.run(socket, inputs, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "media socket not usable"),
                }
            });
            let _ = done_tx.send(());
        })
        .map_err(|e| EdgeError::Media(format!("media thread: {e}")))?;
    Ok(done_rx)
}
