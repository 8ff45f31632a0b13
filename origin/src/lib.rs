//! amphi-origin: the room's home.
//!
//! * a QUIC hub (quinn, mTLS) for edges and packagers: one control stream per connection,
//!   speaker packets as datagrams;
//! * relay fan-out of every speaker datagram to the other edges subscribed to the room;
//! * one mixer per room (jitter buffers, Opus decode + PLC, mix, soft limiter, Opus encode at
//!   64 kbit/s) producing a continuous 50 frames/s program, streamed to every packager on one QUIC
//!   unidirectional stream per room;
//! * the room authority ([`room`]): participants, roles, hands, mutes, bans, chat, applied in
//!   order from every edge's `RoomCommand`s and broadcast as `RoomEvents`;
//! * Prometheus metrics on `GET /metrics`.
//!
//! Decision logic lives in sans-IO cores ([`hub::core`], [`jitter`], [`mixer`], [`programs`],
//! [`subs`], [`limiter`], [`room`]); the tokio drivers only move bytes and read clocks.

#![warn(missing_docs)]

pub mod hub;
pub mod jitter;
pub mod limiter;
pub mod metrics;
pub mod mixer;
mod mixer_thread;
mod peerq;
pub mod persist;
pub mod programs;
pub mod room;
pub mod subs;

use amphi_common::mtls::{MtlsError, MtlsMaterial};
use amphi_protocol::config::OriginConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Speaker packets queued for the mixer thread before they are dropped (about 1 s of 20 rooms x
/// 3 speakers).
const MIXER_QUEUE: usize = 4096;

/// Everything [`run`] needs.
pub struct OriginSetup {
    /// Origin id and listeners.
    pub config: OriginConfig,
    /// mTLS material of the mesh (server side; client certificates are required).
    pub mesh_tls: MtlsMaterial,
}

/// Optional parts of an origin.
#[derive(Clone, Debug, Default)]
pub struct OriginOptions {
    /// Redis URL (`redis://host:port/db`) for durable room state (roles, bans, hand queue), so a
    /// restarted origin takes its rooms back; none = rooms live in memory only.
    pub redis_url: Option<String>,
}

/// Prefix of every key the origin keeps in Redis.
pub const REDIS_PREFIX: &str = "amphi:";

/// Why the origin could not run.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The mesh TLS material is unusable.
    #[error("mesh TLS: {0}")]
    Tls(#[from] MtlsError),
    /// quinn refused the TLS configuration.
    #[error("QUIC configuration: {0}")]
    QuicConfig(String),
    /// The origin's own certificate does not carry `amphi-role:origin` (mesh peers would refuse it).
    #[error("mesh TLS: the certificate does not carry the URI SAN amphi-role:origin")]
    NotOrigin,
    /// A listener could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The room state store cannot be reached.
    #[error("room state store: {0}")]
    Store(#[from] persist::PersistError),
    /// The mixer thread could not start or failed.
    #[error("mixer: {0}")]
    Mixer(String),
}

/// CPU time consumed so far by the calling thread.
pub(crate) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn server_config(tls: &MtlsMaterial) -> Result<quinn::ServerConfig, OriginError> {
    if !tls.roles()?.contains(&amphi_common::mtls::MeshRole::Origin) {
        return Err(OriginError::NotOrigin);
    }
    let crypto = tls.server_config()?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|e| OriginError::QuicConfig(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // Peers open exactly one bidirectional control stream; program streams are ours.
    transport.max_concurrent_bidi_streams(4u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.datagram_receive_buffer_size(Some(4 << 20));
    transport.datagram_send_buffer_size(4 << 20);
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    let idle = quinn::IdleTimeout::try_from(Duration::from_secs(30))
        .map_err(|e| OriginError::QuicConfig(e.to_string()))?;
    transport.max_idle_timeout(Some(idle));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// The hub alone: the room authority and the speaker relay over QUIC with mTLS, the same
/// driver and core as [`run`], without the mixer, the packagers, metrics or a store. The edge
/// crate's tests run their edges against it; what the mixer would be told is dropped.
pub struct Authority {
    hub: Arc<hub::Hub>,
    addr: SocketAddr,
}

impl Authority {
    /// Listen on `bind` with the mesh material `mesh_tls` (which must carry
    /// `amphi-role:origin`) until `shutdown`. Must be called inside a tokio runtime.
    pub fn start(
        mesh_tls: &MtlsMaterial,
        bind: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<Self, OriginError> {
        let endpoint = quinn::Endpoint::server(server_config(mesh_tls)?, bind)
            .map_err(|source| OriginError::Bind { addr: bind, source })?;
        let addr = endpoint
            .local_addr()
            .map_err(|source| OriginError::Bind { addr: bind, source })?;
        let (packets_tx, mut packets_rx) = mpsc::channel(MIXER_QUEUE);
        let (control_tx, mut control_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    p = packets_rx.recv() => if p.is_none() { return },
                    c = control_rx.recv() => if c.is_none() { return },
                }
            }
        });
        let hub = Arc::new(hub::Hub::new(
            "authority".into(),
            Arc::new(metrics::Metrics::default()),
            packets_tx,
            control_tx,
            None,
            Arc::new(mixer_thread::ProgramClock::default()),
            room::RoomsConfig::default(),
        ));
        tokio::spawn(hub.clone().accept_loop(endpoint, shutdown));
        Ok(Authority { hub, addr })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The authoritative state of `room`, if it is held.
    pub fn room_state(
        &self,
        room: amphi_protocol::RoomId,
    ) -> Option<amphi_protocol::room::RoomState> {
        self.hub.room_state(room)
    }
}

/// Run the origin until `shutdown` is cancelled.
pub async fn run(setup: OriginSetup, shutdown: CancellationToken) -> Result<(), OriginError> {
    run_with(setup, OriginOptions::default(), shutdown).await
}

/// [`run`] with options (durable room state).
pub async fn run_with(
    setup: OriginSetup,
    options: OriginOptions,
    shutdown: CancellationToken,
) -> Result<(), OriginError> {
    let OriginSetup { config, mesh_tls } = setup;
    let durable = match &options.redis_url {
        Some(url) => {
            let store = persist::RoomStore::connect(url, REDIS_PREFIX).await?;
            let persister = persist::Persister::start(store.clone(), shutdown.clone());
            tracing::info!(origin = %config.id, "room state is durable (Redis)");
            Some((store, persister))
        }
        None => None,
    };
    let persister = durable.as_ref().map(|(_, p)| p.clone());
    let metrics = Arc::new(metrics::Metrics::default());
    let endpoint = quinn::Endpoint::server(server_config(&mesh_tls)?, config.quic_listen).map_err(
        |source| OriginError::Bind {
            addr: config.quic_listen,
            source,
        },
    )?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| OriginError::Bind {
            addr: config.metrics_listen,
            source,
        })?;
    tracing::info!(
        origin = %config.id,
        quic = %config.quic_listen,
        metrics = %config.metrics_listen,
        "origin listening"
    );

    // Everything below stops when `stop` is cancelled: on shutdown or when the mixer dies.
    let stop = shutdown.child_token();
    let (packets_tx, packets_rx) = mpsc::channel(MIXER_QUEUE);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    let mixer_metrics = metrics.clone();
    let programs_config = programs::ProgramsConfig {
        idle_end: (config.idle_room_timeout_secs > 0)
            .then(|| Duration::from_secs(config.idle_room_timeout_secs)),
        ..programs::ProgramsConfig::default()
    };
    let (idle_tx, mut idle_rx) = mpsc::unbounded_channel();
    let clock = Arc::new(mixer_thread::ProgramClock::default());
    let hub = Arc::new(hub::Hub::new(
        config.id.clone(),
        metrics.clone(),
        packets_tx,
        control_tx,
        durable,
        clock.clone(),
        room::RoomsConfig {
            room: room::RoomLimits {
                max_sessions_per_user: config.max_sessions_per_user.max(1),
                ..room::RoomLimits::default()
            },
            ..room::RoomsConfig::default()
        },
    ));
    let mixer_clock = clock;
    let fanout: Arc<dyn mixer_thread::ProgramFanout> = hub.clone();
    let mixer_stop = stop.clone();
    std::thread::Builder::new()
        .name("amphi-mixer".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(mixer_thread::mixer_loop(
                        packets_rx,
                        control_rx,
                        mixer_metrics,
                        runtime,
                        programs_config,
                        idle_tx,
                        mixer_clock,
                        fanout,
                        mixer_stop.clone(),
                    ))
                    .map_err(|e| e.to_string())
                });
            mixer_stop.cancel();
            let _ = done_tx.send(result);
        })
        .map_err(|e| OriginError::Mixer(e.to_string()))?;

    {
        // Rooms idle past `idle_room_timeout_secs` end like `POST /v1/rooms/{id}/end`: edges,
        // geo-routers (directory, webhooks) and packagers (ENDLIST) hear `RoomEnded`.
        let (hub, stop) = (hub.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    room = idle_rx.recv() => match room {
                        Some(room) => hub.end_idle_room(room),
                        None => return,
                    },
                }
            }
        });
    }
    {
        let (hub, stop) = (hub.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        hub.sweep_unclaimed(std::time::Instant::now());
                        hub.reverify().await;
                    }
                }
            }
        });
    }
    let exposition: Arc<dyn Fn() -> String + Send + Sync> = {
        let hub = hub.clone();
        Arc::new(move || {
            metrics.set_authority_census(&hub.census());
            if let Some(p) = &persister {
                metrics.set_state_writer(
                    p.backlog(),
                    p.written.load(std::sync::atomic::Ordering::Relaxed),
                    p.failed.load(std::sync::atomic::Ordering::Relaxed),
                );
            }
            metrics.render()
        })
    };
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, exposition, stop.clone()));
    hub.accept_loop(endpoint.clone(), stop.clone()).await;

    endpoint.close(0u32.into(), b"origin shutting down");
    let mixer_result = done_rx
        .await
        .unwrap_or_else(|_| Err("mixer thread vanished".into()));
    let _ = metrics_task.await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!(origin = %config.id, "origin stopped");
    mixer_result.map_err(OriginError::Mixer)
}
