//! The QUIC uplink to the origin: one mTLS connection, one control stream, speaker datagrams.
//!
//! Reconnects with [`Backoff`] whenever the origin is unreachable or the link drops, and on every
//! new connection re-announces rooms and participants ([`Sessions::link_up`]: `SubscribeRoom`, then
//! `Join` with `resume`) and publishers ([`MeshState::resync`]). Room messages from the origin go
//! to the signaling core; relayed speaker datagrams go to the media driver.

use crate::lifecycle::{Backoff, RoomCache, RoomStatusAnswer};
use crate::media::MediaCommand;
use crate::mesh::{MeshEvent, MeshState};
use crate::metrics::Metrics;
use crate::sessions::Sessions;
use crate::shards::MediaShards;
use amphi_protocol::control::{ControlDecoder, ControlMessage, PeerKind};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use bytes::Bytes;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the link's round-trip time is copied into the metrics.
const RTT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Everything the uplink task needs.
pub(crate) struct Uplink {
    pub edge_id: String,
    pub region: String,
    pub origin_addr: SocketAddr,
    pub server_name: String,
    pub metrics: Arc<Metrics>,
    pub conn_tx: watch::Sender<Option<quinn::Connection>>,
    pub mesh_rx: mpsc::UnboundedReceiver<MeshEvent>,
    pub media: MediaShards,
    /// Forgets rooms the origin reports ended.
    pub rooms: Arc<Mutex<RoomCache>>,
    /// The signaling core (room replicas, participants).
    pub sessions: Arc<Sessions>,
    /// Relayed speaker datagrams to the media driver.
    pub relayed_txs: Vec<mpsc::Sender<(Instant, Bytes)>>,
}

/// Transport settings of the mesh link: keep-alives so a dead origin is noticed within seconds.
pub(crate) fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10))
            .expect("10 s is a valid idle timeout"),
    ));
    t
}

/// A QUIC client endpoint for reaching `origin_addr` (bound to loopback when the origin is).
pub(crate) fn client_endpoint(
    origin_addr: SocketAddr,
    client_config: quinn::ClientConfig,
) -> std::io::Result<quinn::Endpoint> {
    let bind_ip: IpAddr = match (origin_addr.ip().is_loopback(), origin_addr) {
        (true, SocketAddr::V4(_)) => Ipv4Addr::LOCALHOST.into(),
        (true, SocketAddr::V6(_)) => Ipv6Addr::LOCALHOST.into(),
        (false, SocketAddr::V4(_)) => Ipv4Addr::UNSPECIFIED.into(),
        (false, SocketAddr::V6(_)) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let mut endpoint = quinn::Endpoint::client(SocketAddr::new(bind_ip, 0))?;
    endpoint.set_default_client_config(client_config);
    Ok(endpoint)
}

/// Why a connected session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

impl Uplink {
    /// Keep the origin link up until `shutdown`, using `endpoint` (see [`client_endpoint`]).
    pub(crate) async fn run(mut self, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        let mut state = MeshState::new(self.region.clone());
        let mut backoff = Backoff::uplink();
        loop {
            match self.connect(&endpoint, &shutdown).await {
                Ok(Some(conn)) => {
                    tracing::info!(origin = %self.origin_addr, "origin link up");
                    let end = self
                        .session(&conn, &mut state, &mut backoff, &shutdown)
                        .await;
                    self.conn_tx.send_replace(None);
                    self.sessions.link_down();
                    self.metrics.set_origin_connected(false);
                    match end {
                        SessionEnd::Shutdown => {
                            conn.close(0u32.into(), b"edge shutting down");
                            break;
                        }
                        SessionEnd::Lost(why) => {
                            tracing::warn!(origin = %self.origin_addr, reason = %why, "origin link lost");
                            conn.close(1u32.into(), b"control stream error");
                        }
                    }
                }
                Ok(None) => break,
                Err(why) => {
                    tracing::debug!(origin = %self.origin_addr, reason = %why, "origin connect failed")
                }
            }
            let retry_at = backoff.on_failure(Instant::now());
            // Keep absorbing peer events while waiting, so the resync is current.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        endpoint.close(0u32.into(), b"edge shutting down");
                        return;
                    }
                    ev = self.mesh_rx.recv() => match ev {
                        // Control messages are covered by the next link_up resync.
                        Some(MeshEvent::Control { .. }) => {}
                        Some(ev) => { state.apply(ev); }
                        None => return,
                    },
                    _ = tokio::time::sleep_until(retry_at.into()) => break,
                }
            }
        }
        endpoint.close(0u32.into(), b"edge shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }

    /// One connection attempt; `Ok(None)` on shutdown.
    async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
        shutdown: &CancellationToken,
    ) -> Result<Option<quinn::Connection>, String> {
        let connecting = endpoint
            .connect(self.origin_addr, &self.server_name)
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = shutdown.cancelled() => Ok(None),
            r = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => match r {
                Ok(Ok(conn)) => Ok(Some(conn)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("connect timed out".into()),
            },
        }
    }

    async fn session(
        &mut self,
        conn: &quinn::Connection,
        state: &mut MeshState,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return SessionEnd::Lost(e.to_string()),
        };
        let hello = ControlMessage::Hello {
            peer: PeerKind::Edge,
            id: self.edge_id.clone(),
            region: self.region.clone(),
        };
        let mut out = hello.to_record();
        let (epoch, announce) = self.sessions.link_up();
        for m in announce.iter().chain(state.resync().iter()) {
            out.extend(m.to_record());
        }
        if let Err(e) = send.write_all(&out).await {
            return SessionEnd::Lost(e.to_string());
        }
        self.conn_tx.send_replace(Some(conn.clone()));
        self.metrics.set_origin_connected(true);
        let mut decoder = ControlDecoder::default();
        let mut buf = vec![0u8; 4096];
        let mut rtt_sample = tokio::time::interval(RTT_SAMPLE_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                _ = rtt_sample.tick() => self.metrics.set_origin_rtt(conn.rtt()),
                ev = self.mesh_rx.recv() => {
                    let Some(ev) = ev else { return SessionEnd::Shutdown };
                    if let MeshEvent::Control { epoch: e, .. } = &ev {
                        if *e != epoch {
                            continue;
                        }
                    }
                    for m in state.apply(ev) {
                        if let Err(e) = send.write_all(&m.to_record()).await {
                            return SessionEnd::Lost(e.to_string());
                        }
                    }
                }
                d = conn.read_datagram() => match d {
                    Ok(bytes) => match RelayFrame::decode(&bytes) {
                        Ok(f) if f.kind == FrameKind::SpeakerAudio => {
                            self.metrics.relay_received();
                            let now = Instant::now();
                            for tx in &self.relayed_txs {
                                if tx.try_send((now, bytes.clone())).is_err() {
                                    self.metrics.relay_queue_full();
                                }
                            }
                        }
                        _ => self.metrics.relay_invalid(),
                    },
                    Err(e) => return SessionEnd::Lost(e.to_string()),
                },
                r = recv.read(&mut buf) => match r {
                    Ok(Some(n)) => {
                        decoder.feed(&buf[..n]);
                        loop {
                            match decoder.next_message() {
                                Ok(Some(msg)) => {
                                    if let Some(reply) = self.on_control(msg, backoff) {
                                        if let Err(e) = send.write_all(&reply.to_record()).await {
                                            return SessionEnd::Lost(e.to_string());
                                        }
                                    }
                                }
                                Ok(None) => break,
                                // One bad record is refused alone: dropping the link would
                                // evict this edge's participants in every room.
                                Err(e) => {
                                    self.metrics.control_record_refused();
                                    tracing::warn!(error = %e, "control record from the origin refused");
                                }
                            }
                        }
                    }
                    Ok(None) => return SessionEnd::Lost("control stream finished".into()),
                    Err(e) => return SessionEnd::Lost(e.to_string()),
                },
            }
        }
    }

    /// React to a control message from the origin; returns a reply to send, if any.
    fn on_control(&self, msg: ControlMessage, backoff: &mut Backoff) -> Option<ControlMessage> {
        match msg {
            ControlMessage::Welcome { origin } => {
                backoff.on_success();
                tracing::info!(%origin, "origin welcomed edge");
                None
            }
            ControlMessage::Ping { nonce } => Some(ControlMessage::Pong { nonce }),
            ControlMessage::RoomSnapshot { .. }
            | ControlMessage::RoomSnapshotPart { .. }
            | ControlMessage::RoomEvents { .. }
            | ControlMessage::CommandRejected { .. } => {
                self.sessions.on_control(msg);
                None
            }
            ControlMessage::RoomEnded { room } => {
                tracing::info!(%room, "origin ended room");
                self.sessions.on_control(ControlMessage::RoomEnded { room });
                if let Ok(mut cache) = self.rooms.lock() {
                    cache.record(room, RoomStatusAnswer::Gone, Instant::now());
                }
                if !self.media.try_broadcast(|| MediaCommand::EndRoom { room }) {
                    tracing::warn!(%room, "media driver busy; room end not applied");
                }
                None
            }
            ControlMessage::Error { code, message } => {
                tracing::warn!(%code, %message, "origin reported an error");
                None
            }
            _ => None,
        }
    }
}
