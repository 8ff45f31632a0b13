//! The router's links to the origins: rendezvous hashing (room -> origin, sans-IO) and one QUIC
//! (mTLS) client per origin that says `Hello{peer: router}`, sends `RoomEnded` for rooms ended
//! through the REST API and reports `RoomEnded` the origin learned elsewhere.

use amphi_protocol::config::OriginEndpoint;
use amphi_protocol::control::{ControlDecoder, ControlMessage, PeerKind};
use amphi_protocol::mtls::MtlsMaterial;
use amphi_protocol::RoomId;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Room ends kept for an origin that is unreachable (oldest dropped beyond this).
const MAX_PENDING: usize = 4096;

/// 64-bit FNV-1a, stable across processes and versions (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The splitmix64 finalizer: spreads the bits of a combined hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rendezvous (highest random weight) score of `origin_id` for `room`.
pub fn rendezvous_score(origin_id: &str, room: RoomId) -> u64 {
    mix(fnv1a(origin_id.as_bytes(), 0) ^ mix(room.0))
}

/// The origin that owns `room`: highest rendezvous score, ties broken by id. `None` if there are
/// no origins. Every router computes the same answer from the same origin list, and removing an
/// origin only moves the rooms it owned.
pub fn origin_for(room: RoomId, origins: &[OriginEndpoint]) -> Option<&OriginEndpoint> {
    origins.iter().max_by(|a, b| {
        rendezvous_score(&a.id, room)
            .cmp(&rendezvous_score(&b.id, room))
            .then_with(|| b.id.cmp(&a.id))
    })
}

/// Reconnect delays: `min` doubling up to `max` (sans-IO).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A schedule from `min` doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// An attempt failed at `now`: when to try again.
    pub fn on_failure(&mut self, now: Instant) -> Instant {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        now + wait
    }

    /// An attempt succeeded: the next failure waits `min` again.
    pub fn on_success(&mut self) {
        self.next = self.min;
    }
}

/// What the origin links report to the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginEvent {
    /// An origin says the room ended (ended by an edge's host, or by another router).
    RoomEnded {
        /// The room.
        room: RoomId,
        /// Which origin said so.
        origin: String,
    },
}

/// Handle to every origin link: routes room ends to the owning origin.
#[derive(Clone)]
pub struct OriginLinks {
    origins: Arc<Vec<OriginEndpoint>>,
    senders: Arc<HashMap<String, mpsc::UnboundedSender<RoomId>>>,
    connected: Arc<AtomicUsize>,
}

/// Why the links could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TLS material unusable.
    #[error("mesh TLS: {0}")]
    Tls(#[from] amphi_protocol::mtls::MtlsError),
    /// quinn refused the configuration or socket.
    #[error("QUIC: {0}")]
    Quic(String),
}

impl OriginLinks {
    /// No origins (rooms end only in the directory).
    pub fn none() -> Self {
        OriginLinks {
            origins: Arc::new(Vec::new()),
            senders: Arc::new(HashMap::new()),
            connected: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Start one link task per origin; they run until `shutdown`.
    pub fn start(
        router_id: &str,
        region: &str,
        origins: Vec<OriginEndpoint>,
        tls: &MtlsMaterial,
        events: mpsc::UnboundedSender<OriginEvent>,
        shutdown: CancellationToken,
    ) -> Result<Self, LinkError> {
        let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config()?)
            .map_err(|e| LinkError::Quic(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic_tls));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(2)));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(10))
                .map_err(|e| LinkError::Quic(e.to_string()))?,
        ));
        client.transport_config(Arc::new(transport));
        let connected = Arc::new(AtomicUsize::new(0));
        let mut senders = HashMap::new();
        for o in &origins {
            let bind: IpAddr = match (o.addr.ip().is_loopback(), o.addr) {
                (true, SocketAddr::V4(_)) => Ipv4Addr::LOCALHOST.into(),
                (true, SocketAddr::V6(_)) => Ipv6Addr::LOCALHOST.into(),
                (false, SocketAddr::V4(_)) => Ipv4Addr::UNSPECIFIED.into(),
                (false, SocketAddr::V6(_)) => Ipv6Addr::UNSPECIFIED.into(),
            };
            let mut endpoint = quinn::Endpoint::client(SocketAddr::new(bind, 0))
                .map_err(|e| LinkError::Quic(e.to_string()))?;
            endpoint.set_default_client_config(client.clone());
            let (tx, rx) = mpsc::unbounded_channel();
            senders.insert(o.id.clone(), tx);
            let link = Link {
                router_id: router_id.to_string(),
                region: region.to_string(),
                origin: o.clone(),
                ends: rx,
                pending: VecDeque::new(),
                events: events.clone(),
                connected: connected.clone(),
            };
            tokio::spawn(link.run(endpoint, shutdown.clone()));
        }
        Ok(OriginLinks {
            origins: Arc::new(origins),
            senders: Arc::new(senders),
            connected,
        })
    }

    /// Tell the room's origin that the room ended (queued while its link is down). Returns the
    /// origin's id, or `None` when no origin is configured.
    pub fn end_room(&self, room: RoomId) -> Option<String> {
        let origin = origin_for(room, &self.origins)?;
        if let Some(tx) = self.senders.get(&origin.id) {
            let _ = tx.send(room);
        }
        Some(origin.id.clone())
    }

    /// The origin that owns `room`.
    pub fn origin_of(&self, room: RoomId) -> Option<&str> {
        origin_for(room, &self.origins).map(|o| o.id.as_str())
    }

    /// How many origin links are up.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }
}

/// One origin link's task state.
struct Link {
    router_id: String,
    region: String,
    origin: OriginEndpoint,
    ends: mpsc::UnboundedReceiver<RoomId>,
    /// Room ends not yet written to a live connection.
    pending: VecDeque<RoomId>,
    events: mpsc::UnboundedSender<OriginEvent>,
    connected: Arc<AtomicUsize>,
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

impl Link {
    fn queue(&mut self, room: RoomId) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(room);
    }

    async fn run(mut self, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let connecting = endpoint.connect(self.origin.addr, &self.origin.server_name);
            let attempt = match connecting {
                Ok(c) => tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = tokio::time::timeout(CONNECT_TIMEOUT, c) => match r {
                        Ok(Ok(conn)) => Ok(conn),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("connect timed out".to_string()),
                    },
                },
                Err(e) => Err(e.to_string()),
            };
            match attempt {
                Ok(conn) => {
                    self.connected.fetch_add(1, Ordering::Relaxed);
                    let end = self.session(&conn, &mut backoff, &shutdown).await;
                    self.connected.fetch_sub(1, Ordering::Relaxed);
                    match end {
                        SessionEnd::Shutdown => {
                            conn.close(0u32.into(), b"router shutting down");
                            break;
                        }
                        SessionEnd::Lost(why) => {
                            tracing::warn!(origin = %self.origin.id, reason = %why, "origin link lost");
                            conn.close(1u32.into(), b"link lost");
                        }
                    }
                }
                Err(why) => {
                    tracing::debug!(origin = %self.origin.id, reason = %why, "origin connect failed")
                }
            }
            let retry_at = backoff.on_failure(Instant::now());
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        endpoint.close(0u32.into(), b"router shutting down");
                        return;
                    }
                    r = self.ends.recv() => match r {
                        Some(room) => self.queue(room),
                        None => return,
                    },
                    _ = tokio::time::sleep_until(retry_at.into()) => break,
                }
            }
        }
        endpoint.close(0u32.into(), b"router shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }

    async fn session(
        &mut self,
        conn: &quinn::Connection,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return SessionEnd::Lost(e.to_string()),
        };
        let hello = ControlMessage::Hello {
            peer: PeerKind::Router,
            id: self.router_id.clone(),
            region: self.region.clone(),
        };
        if let Err(e) = send.write_all(&hello.to_record()).await {
            return SessionEnd::Lost(e.to_string());
        }
        let mut decoder = ControlDecoder::default();
        let mut buf = vec![0u8; 4096];
        let mut welcomed = false;
        loop {
            // Flush pending ends once the origin has welcomed us.
            while let Some(&room) = self.pending.front().filter(|_| welcomed) {
                let msg = ControlMessage::RoomEnded { room };
                if let Err(e) = send.write_all(&msg.to_record()).await {
                    return SessionEnd::Lost(e.to_string());
                }
                tracing::info!(%room, origin = %self.origin.id, "room end sent to origin");
                self.pending.pop_front();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                r = self.ends.recv() => match r {
                    Some(room) => self.queue(room),
                    None => return SessionEnd::Shutdown,
                },
                r = recv.read(&mut buf) => match r {
                    Ok(Some(n)) => {
                        decoder.feed(&buf[..n]);
                        loop {
                            match decoder.next_message() {
                                Ok(Some(msg)) => match msg {
                                    ControlMessage::Welcome { origin } => {
                                        welcomed = true;
                                        backoff.on_success();
                                        tracing::info!(%origin, "origin welcomed router");
                                    }
                                    ControlMessage::RoomEnded { room } => {
                                        tracing::info!(%room, origin = %self.origin.id, "origin reports room ended");
                                        let _ = self.events.send(OriginEvent::RoomEnded {
                                            room,
                                            origin: self.origin.id.clone(),
                                        });
                                    }
                                    ControlMessage::Ping { nonce } => {
                                        let pong = ControlMessage::Pong { nonce };
                                        if let Err(e) = send.write_all(&pong.to_record()).await {
                                            return SessionEnd::Lost(e.to_string());
                                        }
                                    }
                                    ControlMessage::Error { code, message } => {
                                        tracing::warn!(origin = %self.origin.id, %code, %message, "origin reported an error");
                                    }
                                    _ => {}
                                },
                                Ok(None) => break,
                                Err(e) => return SessionEnd::Lost(format!("bad control record: {e}")),
                            }
                        }
                    }
                    Ok(None) => return SessionEnd::Lost("control stream finished".into()),
                    Err(e) => return SessionEnd::Lost(e.to_string()),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(n: usize) -> Vec<OriginEndpoint> {
        (0..n)
            .map(|i| OriginEndpoint {
                id: format!("origin-{i}"),
                addr: SocketAddr::from(([127, 0, 0, 1], 8300 + i as u16)),
                server_name: "origin.amphi.internal".into(),
            })
            .collect()
    }

    #[test]
    fn rendezvous_is_stable_balanced_and_minimal_on_removal() {
        let three = origins(3);
        let mut counts = HashMap::new();
        let mut moved = 0;
        let two: Vec<_> = three[..2].to_vec();
        for r in 0..3000u64 {
            let room = RoomId(r.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let o = origin_for(room, &three).unwrap();
            assert_eq!(o, origin_for(room, &three).unwrap(), "deterministic");
            *counts.entry(o.id.clone()).or_insert(0) += 1;
            let after = origin_for(room, &two).unwrap();
            if o.id != "origin-2" {
                assert_eq!(after.id, o.id, "rooms of surviving origins stay put");
            } else {
                moved += 1;
            }
        }
        for (id, c) in &counts {
            assert!((800..1200).contains(c), "{id} owns {c} of 3000");
        }
        assert_eq!(moved, counts["origin-2"]);
        assert!(origin_for(RoomId(1), &[]).is_none());
        // Pinned (computed independently): routers of different versions must agree.
        assert_eq!(
            rendezvous_score("origin-1", RoomId(42)),
            0x35f3_e691_1276_d649
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let t0 = Instant::now();
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        assert_eq!(b.on_failure(t0), t0 + Duration::from_millis(100));
        assert_eq!(b.on_failure(t0), t0 + Duration::from_millis(200));
        assert_eq!(b.on_failure(t0), t0 + Duration::from_millis(350));
        assert_eq!(b.on_failure(t0), t0 + Duration::from_millis(350));
        b.on_success();
        assert_eq!(b.on_failure(t0), t0 + Duration::from_millis(100));
    }
}
