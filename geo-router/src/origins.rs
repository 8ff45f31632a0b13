//! The router's links to the origins: one QUIC (mTLS) client per origin, whose link state feeds
//! the shared ownership rule (`amphi_protocol::ownership`: rendezvous hashing over the healthy
//! origins, so the router sends a room's end to the origin edges and packagers use); each client that says `Hello{peer: router}`, sends `RoomEnded` for rooms ended
//! through the REST API and reports `RoomEnded` the origin learned elsewhere.

use amphi_common::mtls::MtlsMaterial;
use amphi_protocol::config::OriginEndpoint;
use amphi_protocol::control::{ControlDecoder, ControlMessage, PeerKind};
use amphi_protocol::ownership::{HealthTiming, OriginHealth};
use amphi_protocol::RoomId;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Room ends kept for an origin that is unreachable (oldest dropped beyond this).
const MAX_PENDING: usize = 4096;

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
    /// The link to `origin` came up (the router re-sends its token revocations).
    LinkUp {
        /// The origin's id.
        origin: String,
    },
    /// An origin revoked a user's tokens for a room (the user was kicked).
    Revoked {
        /// The room.
        room: RoomId,
        /// The user (token `sub`).
        user: String,
    },
    /// An origin's room authority accepted a participant's report.
    Reported {
        /// The report.
        report: Box<amphi_protocol::room::Report>,
    },
}

/// What the router tells an origin.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ToOrigin {
    /// The room ended through the REST API.
    End(RoomId),
    /// A token was revoked through the REST API.
    RevokeToken { jti: String, until: u64 },
}

impl ToOrigin {
    fn message(&self) -> ControlMessage {
        match self {
            ToOrigin::End(room) => ControlMessage::RoomEnded { room: *room },
            ToOrigin::RevokeToken { jti, until } => ControlMessage::RevokeToken {
                jti: jti.clone(),
                until: *until,
            },
        }
    }
}

/// Handle to every origin link: routes room ends to the owning origin, token revocations to
/// every origin.
#[derive(Clone)]
pub struct OriginLinks {
    health: Arc<Mutex<OriginHealth>>,
    senders: Arc<HashMap<String, mpsc::UnboundedSender<ToOrigin>>>,
    connected: Arc<AtomicUsize>,
}

/// Why the links could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TLS material unusable.
    #[error("mesh TLS: {0}")]
    Tls(#[from] amphi_common::mtls::MtlsError),
    /// quinn refused the configuration or socket.
    #[error("QUIC: {0}")]
    Quic(String),
}

/// Keep-alive interval of an origin link (as the edges' mesh links).
const LINK_KEEP_ALIVE: Duration = Duration::from_millis(250);
/// An origin link silent this long is dead: a killed origin is noticed within about a second and
/// its rooms move [`HealthTiming::grace`] later, when the edges and packagers move them too.
const LINK_IDLE_TIMEOUT: Duration = Duration::from_millis(1200);

impl OriginLinks {
    /// No origins (rooms end only in the directory).
    pub fn none() -> Self {
        OriginLinks {
            health: Arc::new(Mutex::new(OriginHealth::new(
                Vec::<String>::new(),
                HealthTiming::default(),
                Instant::now(),
            ))),
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
        transport.keep_alive_interval(Some(LINK_KEEP_ALIVE));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(LINK_IDLE_TIMEOUT)
                .map_err(|e| LinkError::Quic(e.to_string()))?,
        ));
        client.transport_config(Arc::new(transport));
        let connected = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Mutex::new(OriginHealth::new(
            origins.iter().map(|o| o.id.clone()),
            HealthTiming::default(),
            Instant::now(),
        )));
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
                health: health.clone(),
            };
            tokio::spawn(link.run(endpoint, shutdown.clone()));
        }
        Ok(OriginLinks {
            health,
            senders: Arc::new(senders),
            connected,
        })
    }

    /// Tell the room's origin that the room ended (queued while its link is down). Returns the
    /// origin's id, or `None` when no origin is configured or none is healthy.
    pub fn end_room(&self, room: RoomId) -> Option<String> {
        let origin = self.origin_of(room)?;
        if let Some(tx) = self.senders.get(&origin) {
            let _ = tx.send(ToOrigin::End(room));
        }
        Some(origin)
    }

    /// Tell every origin (queued while a link is down) that the token `jti` is revoked until
    /// `until`; each passes it to all its edges. Returns how many origins it was sent to.
    pub fn revoke_token(&self, jti: &str, until: u64) -> usize {
        for tx in self.senders.values() {
            let _ = tx.send(ToOrigin::RevokeToken {
                jti: jti.to_string(),
                until,
            });
        }
        self.senders.len()
    }

    /// Tell origin `origin` (its link just came up) that the token `jti` is revoked until
    /// `until`.
    pub fn revoke_token_at(&self, origin: &str, jti: &str, until: u64) {
        if let Some(tx) = self.senders.get(origin) {
            let _ = tx.send(ToOrigin::RevokeToken {
                jti: jti.to_string(),
                until,
            });
        }
    }

    /// The origin that owns `room` now (rendezvous hashing over the healthy origins).
    pub fn origin_of(&self, room: RoomId) -> Option<String> {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.owner(room, Instant::now()).map(str::to_string)
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
    ends: mpsc::UnboundedReceiver<ToOrigin>,
    /// Room ends and revocations not yet written to a live connection.
    pending: VecDeque<ToOrigin>,
    events: mpsc::UnboundedSender<OriginEvent>,
    connected: Arc<AtomicUsize>,
    health: Arc<Mutex<OriginHealth>>,
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

impl Link {
    fn queue(&mut self, msg: ToOrigin) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(msg);
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
                    self.health
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .link_down(&self.origin.id, Instant::now());
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
                        Some(msg) => self.queue(msg),
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
            // Flush pending messages once the origin has welcomed us.
            while let Some(next) = self.pending.front().filter(|_| welcomed) {
                if let Err(e) = send.write_all(&next.message().to_record()).await {
                    return SessionEnd::Lost(e.to_string());
                }
                match next {
                    ToOrigin::End(room) => {
                        tracing::info!(%room, origin = %self.origin.id, "room end sent to origin")
                    }
                    ToOrigin::RevokeToken { .. } => {
                        tracing::info!(origin = %self.origin.id, "token revocation sent to origin")
                    }
                }
                self.pending.pop_front();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                r = self.ends.recv() => match r {
                    Some(msg) => self.queue(msg),
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
                                        self.health
                                            .lock()
                                            .unwrap_or_else(|e| e.into_inner())
                                            .link_up(&self.origin.id, Instant::now());
                                        tracing::info!(%origin, "origin welcomed router");
                                        let _ = self.events.send(OriginEvent::LinkUp {
                                            origin: self.origin.id.clone(),
                                        });
                                    }
                                    ControlMessage::RoomEnded { room } => {
                                        tracing::info!(%room, origin = %self.origin.id, "origin reports room ended");
                                        let _ = self.events.send(OriginEvent::RoomEnded {
                                            room,
                                            origin: self.origin.id.clone(),
                                        });
                                    }
                                    ControlMessage::Revoke { room, user } => {
                                        let _ = self.events.send(OriginEvent::Revoked { room, user });
                                    }
                                    ControlMessage::Reported { report } => {
                                        let _ = self.events.send(OriginEvent::Reported {
                                            report: Box::new(report),
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
