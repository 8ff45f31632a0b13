//! The QUIC uplinks to the origins: one mTLS connection per configured origin, each with one
//! control stream, speaker datagrams to the room's owner.
//!
//! One task per origin keeps its link up (reconnecting with [`Backoff`]), writes `Hello`, answers
//! pings and hands relayed speaker datagrams to the media driver. One routing task decides, with
//! [`OriginRoutes`], which link each room's traffic takes (the rendezvous owner among healthy
//! origins): on a link's (re)connect it announces the rooms that origin owns (`SubscribeRoom`,
//! `Join` with `resume` from [`Sessions::announce`], publishers from [`MeshState`]); when a room
//! moves (its origin died) it announces the room to the new owner, whose room authority loads the
//! state from Redis. Room messages from the owner go to the signaling core.

use crate::lifecycle::{Backoff, RoomCache, RoomStatusAnswer};
use crate::media::api::MediaCommand;
use crate::media::driver::RelayTargets;
use crate::mesh::{MeshEvent, MeshState};
use crate::metrics::Metrics;
use crate::owners::{OriginRoutes, Plan};
use crate::push::PushOutput;
use crate::push_hub::PushHub;
use crate::sessions::Sessions;
use crate::shards::MediaShards;
use amphi_protocol::config::OriginEndpoint;
use amphi_protocol::control::{ControlDecoder, ControlMessage, PeerKind};
use amphi_protocol::ownership::HealthTiming;
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the link's round-trip time is copied into the metrics.
const RTT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Keep-alive interval of a mesh link.
const KEEP_ALIVE: Duration = Duration::from_millis(250);
/// A mesh link silent this long is dead: a killed origin is noticed within about a second, and
/// its rooms move [`HealthTiming::grace`] later.
const IDLE_TIMEOUT: Duration = Duration::from_millis(1200);

/// Everything the uplink tasks need.
pub(crate) struct Uplink {
    pub edge_id: String,
    pub region: String,
    /// Every origin, in configuration order (the hashing keys are their ids).
    pub origins: Vec<OriginEndpoint>,
    pub metrics: Arc<Metrics>,
    /// Where the media driver sends each room's speaker datagrams.
    pub targets_tx: watch::Sender<Arc<RelayTargets>>,
    pub mesh_rx: mpsc::UnboundedReceiver<MeshEvent>,
    pub media: MediaShards,
    /// Forgets rooms the origin reports ended.
    pub rooms: Arc<Mutex<RoomCache>>,
    /// The signaling core (room replicas, participants).
    pub sessions: Arc<Sessions>,
    /// Relayed speaker datagrams to the media driver.
    pub relayed_txs: Vec<mpsc::Sender<(Instant, Bytes)>>,
    /// Push listeners: program frames go there, their rooms' subscriptions come from there.
    pub push: Arc<PushHub>,
    /// The push listeners' subscriptions at the origins (rooms the relay tree does not feed),
    /// sent to every linked origin (only a room's owner mixes it, so only that one sends
    /// frames; after a failover the new owner already knows).
    pub push_rx: mpsc::UnboundedReceiver<PushOutput>,
    /// The rooms subscribed at the origins now, announced on every link that comes up.
    pub push_rooms: watch::Receiver<Vec<RoomId>>,
}

/// Transport settings of the mesh link: frequent keep-alives and a short idle timeout, so a dead
/// origin is noticed in about a second (the idle timeout is the smaller of both ends' settings).
pub(crate) fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("1.2 s is a valid idle timeout"),
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

/// From a link task to the routing task.
enum LinkEvent {
    /// Link `origin` is up (`Hello` written); `out` writes on its control stream.
    Up {
        origin: usize,
        conn: quinn::Connection,
        out: mpsc::UnboundedSender<ControlMessage>,
    },
    /// Link `origin` was lost.
    Down { origin: usize },
    /// A room message from origin `origin`.
    Control { origin: usize, msg: ControlMessage },
}

/// The room a control message is about.
fn room_of(msg: &ControlMessage) -> Option<RoomId> {
    match msg {
        ControlMessage::SpeakerJoined { room, .. }
        | ControlMessage::SpeakerLeft { room, .. }
        | ControlMessage::SubscribeRoom { room }
        | ControlMessage::UnsubscribeRoom { room }
        | ControlMessage::RoomEnded { room }
        | ControlMessage::RoomOpened { room }
        | ControlMessage::RoomCommand { room, .. }
        | ControlMessage::RoomEvents { room, .. }
        | ControlMessage::CommandRejected { room, .. }
        | ControlMessage::Revoke { room, .. }
        | ControlMessage::RoomSnapshotPart { room, .. } => Some(*room),
        ControlMessage::RoomSnapshot { state, .. } => Some(state.room),
        _ => None,
    }
}

impl Uplink {
    /// Keep a link to every origin up and route rooms over them until `shutdown`, using
    /// `endpoint` (see [`client_endpoint`]).
    pub(crate) async fn run(self, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut links = tokio::task::JoinSet::new();
        for (index, origin) in self.origins.iter().enumerate() {
            let link = Link {
                index,
                origin: origin.clone(),
                edge_id: self.edge_id.clone(),
                region: self.region.clone(),
                metrics: self.metrics.clone(),
                relayed_txs: self.relayed_txs.clone(),
                push: self.push.clone(),
                events: events_tx.clone(),
            };
            links.spawn(link.run(endpoint.clone(), shutdown.clone()));
        }
        drop(events_tx);
        self.route(events_rx, &shutdown).await;
        shutdown.cancel();
        while links.join_next().await.is_some() {}
        endpoint.close(0u32.into(), b"edge shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }

    /// The routing task.
    async fn route(
        mut self,
        mut events: mpsc::UnboundedReceiver<LinkEvent>,
        shutdown: &CancellationToken,
    ) {
        let ids = self.origins.iter().map(|o| o.id.clone()).collect();
        let mut router = Router {
            routes: OriginRoutes::new(ids, HealthTiming::default(), Instant::now()),
            outs: vec![None; self.origins.len()],
            targets: RelayTargets {
                links: vec![None; self.origins.len()],
                rooms: HashMap::new(),
            },
            state: MeshState::new(self.region.clone()),
        };
        loop {
            let now = Instant::now();
            let wake = router
                .routes
                .next_change(now)
                .unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = events.recv() => match ev {
                    Some(ev) => self.on_link_event(&mut router, ev),
                    None => return,
                },
                ev = self.mesh_rx.recv() => match ev {
                    Some(ev) => router.on_mesh_event(ev, Instant::now()),
                    None => return,
                },
                out = self.push_rx.recv() => match out {
                    Some(out) => router.push_subscription(out),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    let plan = router.routes.tick(Instant::now());
                    router.execute(plan, &self.sessions);
                }
            }
            router.publish_targets(&self.targets_tx);
        }
    }

    fn on_link_event(&self, router: &mut Router, ev: LinkEvent) {
        let now = Instant::now();
        match ev {
            LinkEvent::Up { origin, conn, out } => {
                // The push listeners' rooms first: their program frames come from the owner.
                for room in self.push_rooms.borrow().iter().copied() {
                    let _ = out.send(ControlMessage::SubscribeProgram { room });
                }
                router.outs[origin] = Some(out);
                router.targets.links[origin] = Some(conn);
                // The core may send room messages from now on (before its rooms are listed, so
                // a room joined meanwhile is either announced or sent, and a duplicate is stale).
                let _ = self.sessions.announce(&[]);
                let rooms = self.sessions.local_rooms();
                let plan = router.routes.link_up(origin, &rooms, now);
                router.execute(plan, &self.sessions);
                self.metrics.origin_link_established();
                self.metrics
                    .set_origin_links(router.routes.linked_count(), self.origins.len());
            }
            LinkEvent::Down { origin } => {
                router.outs[origin] = None;
                router.targets.links[origin] = None;
                let plan = router.routes.link_down(origin, now);
                router.execute(plan, &self.sessions);
                if router.routes.linked_count() == 0 {
                    self.sessions.link_down();
                }
                self.metrics
                    .set_origin_links(router.routes.linked_count(), self.origins.len());
            }
            LinkEvent::Control { origin, msg } => {
                // Only the room's owner speaks for it (a stand-in that just lost the room may
                // still send a last event).
                if let Some(room) = room_of(&msg) {
                    if router
                        .targets
                        .rooms
                        .get(&room)
                        .is_some_and(|o| *o != origin)
                    {
                        return;
                    }
                }
                self.on_control(msg);
            }
        }
    }

    /// A room message from the room's owner.
    fn on_control(&self, msg: ControlMessage) {
        match msg {
            ControlMessage::RoomSnapshot { .. }
            | ControlMessage::RoomSnapshotPart { .. }
            | ControlMessage::RoomEvents { .. }
            | ControlMessage::CommandRejected { .. } => self.sessions.on_control(msg),
            ControlMessage::RoomEnded { room } => {
                tracing::info!(%room, "origin ended room");
                self.sessions.on_control(ControlMessage::RoomEnded { room });
                self.push.room_ended(room);
                if let Ok(mut cache) = self.rooms.lock() {
                    cache.record(room, RoomStatusAnswer::Gone, Instant::now());
                }
                if !self.media.try_broadcast(|| MediaCommand::EndRoom { room }) {
                    tracing::warn!(%room, "media driver busy; room end not applied");
                }
            }
            ControlMessage::Revoke { room, user } => {
                tracing::info!(%room, "origin revoked a user's tokens");
                self.sessions
                    .revoke(room, &user, crate::sessions::now_unix());
            }
            ControlMessage::RevokeToken { jti, until } => {
                tracing::info!("origin revoked a token");
                self.sessions
                    .revoke_token(&jti, until, crate::sessions::now_unix());
            }
            ControlMessage::Error { code, message } => {
                tracing::warn!(%code, %message, "origin reported an error");
            }
            _ => {}
        }
    }
}

/// State of the routing task.
struct Router {
    routes: OriginRoutes,
    /// Each link's control stream writer, while up.
    outs: Vec<Option<mpsc::UnboundedSender<ControlMessage>>>,
    /// What the media driver last got (published when changed).
    targets: RelayTargets,
    state: MeshState,
}

impl Router {
    fn send(&self, origin: usize, msg: ControlMessage) {
        if let Some(out) = self.outs.get(origin).and_then(Option::as_ref) {
            let _ = out.send(msg);
        }
    }

    /// A push subscription change: every linked origin hears it.
    fn push_subscription(&self, out: PushOutput) {
        let msg = match out {
            PushOutput::Subscribe(room) => ControlMessage::SubscribeProgram { room },
            PushOutput::Unsubscribe(room) => ControlMessage::UnsubscribeProgram { room },
        };
        for origin in 0..self.outs.len() {
            self.send(origin, msg.clone());
        }
    }

    /// Carry out a plan: announcements to new owners and reconnected links, unsubscriptions at
    /// stand-ins that lost a room.
    fn execute(&mut self, plan: Plan, sessions: &Sessions) {
        for (origin, room) in plan.unsubscribe {
            tracing::info!(%room, origin = %self.routes.ids()[origin], "room moved away from origin");
            self.send(origin, ControlMessage::UnsubscribeRoom { room });
        }
        for (origin, rooms) in plan.announce {
            let list: Vec<RoomId> = rooms.iter().copied().collect();
            let (epoch, mut msgs) = sessions.announce(&list);
            // Rooms without a local participant any more are forgotten, not announced.
            let local: BTreeSet<RoomId> = msgs
                .iter()
                .filter_map(|m| match m {
                    ControlMessage::SubscribeRoom { room } => Some(*room),
                    _ => None,
                })
                .collect();
            for room in rooms.difference(&local) {
                self.routes.forget(*room);
                self.targets.rooms.remove(room);
            }
            msgs.extend(self.state.resync_rooms(&local));
            self.routes.announced(&local, epoch);
            tracing::info!(rooms = local.len(), origin = %self.routes.ids()[origin], "rooms announced to origin");
            for room in local {
                self.targets.rooms.insert(room, origin);
            }
            for m in msgs {
                self.send(origin, m);
            }
        }
    }

    /// A peer event: route its control messages to the room's owner.
    fn on_mesh_event(&mut self, ev: MeshEvent, now: Instant) {
        let epoch = match &ev {
            MeshEvent::Control { epoch, .. } => Some(*epoch),
            _ => None,
        };
        for msg in self.state.apply(ev) {
            let Some(room) = room_of(&msg) else {
                continue;
            };
            if epoch.is_some_and(|e| !self.routes.is_current(room, e)) {
                continue;
            }
            match self.routes.route(room, now) {
                Some(origin) => {
                    self.targets.rooms.insert(room, origin);
                    let leaving = matches!(msg, ControlMessage::UnsubscribeRoom { .. });
                    self.send(origin, msg);
                    if leaving {
                        self.routes.forget(room);
                        self.targets.rooms.remove(&room);
                    }
                }
                // The owner's link is down: its next announcement (reconnect or move) covers it.
                None => {
                    if matches!(msg, ControlMessage::UnsubscribeRoom { .. }) {
                        self.routes.forget(room);
                        self.targets.rooms.remove(&room);
                    }
                }
            }
        }
    }

    /// Give the media driver the current links and room owners, if they changed.
    fn publish_targets(&self, tx: &watch::Sender<Arc<RelayTargets>>) {
        tx.send_if_modified(|current| {
            let same = current.rooms == self.targets.rooms
                && current.links.len() == self.targets.links.len()
                && current.links.iter().zip(&self.targets.links).all(|(a, b)| {
                    a.as_ref().map(|c| c.stable_id()) == b.as_ref().map(|c| c.stable_id())
                });
            if !same {
                *current = Arc::new(self.targets.clone());
            }
            !same
        });
    }
}

/// Why a connected session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// One origin link.
struct Link {
    index: usize,
    origin: OriginEndpoint,
    edge_id: String,
    region: String,
    metrics: Arc<Metrics>,
    relayed_txs: Vec<mpsc::Sender<(Instant, Bytes)>>,
    push: Arc<PushHub>,
    events: mpsc::UnboundedSender<LinkEvent>,
}

impl Link {
    /// Keep the link up until `shutdown`.
    async fn run(self, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        let mut backoff = Backoff::uplink();
        loop {
            match self.connect(&endpoint, &shutdown).await {
                Ok(Some(conn)) => {
                    tracing::info!(origin = %self.origin.id, addr = %self.origin.addr, "origin link up");
                    let end = self.session(&conn, &mut backoff, &shutdown).await;
                    let _ = self.events.send(LinkEvent::Down { origin: self.index });
                    match end {
                        SessionEnd::Shutdown => {
                            conn.close(0u32.into(), b"edge shutting down");
                            return;
                        }
                        SessionEnd::Lost(why) => {
                            tracing::warn!(origin = %self.origin.id, reason = %why, "origin link lost");
                            conn.close(1u32.into(), b"control stream error");
                        }
                    }
                }
                Ok(None) => return,
                Err(why) => {
                    tracing::debug!(origin = %self.origin.id, reason = %why, "origin connect failed")
                }
            }
            let retry_at = backoff.on_failure(Instant::now());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(retry_at.into()) => {}
            }
        }
    }

    /// One connection attempt; `Ok(None)` on shutdown.
    async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
        shutdown: &CancellationToken,
    ) -> Result<Option<quinn::Connection>, String> {
        let connecting = endpoint
            .connect(self.origin.addr, &self.origin.server_name)
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
        &self,
        conn: &quinn::Connection,
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
        if let Err(e) = send.write_all(&hello.to_record()).await {
            return SessionEnd::Lost(e.to_string());
        }
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ControlMessage>();
        let up = LinkEvent::Up {
            origin: self.index,
            conn: conn.clone(),
            out: out_tx,
        };
        if self.events.send(up).is_err() {
            return SessionEnd::Shutdown;
        }
        let mut decoder = ControlDecoder::default();
        let mut buf = vec![0u8; 4096];
        let mut rtt_sample = tokio::time::interval(RTT_SAMPLE_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                _ = rtt_sample.tick() => self.metrics.set_origin_rtt(conn.rtt()),
                m = out_rx.recv() => {
                    let Some(m) = m else { return SessionEnd::Shutdown };
                    let mut record = m.to_record();
                    // Drain what is queued into one write.
                    while let Ok(m) = out_rx.try_recv() {
                        record.extend(m.to_record());
                    }
                    if let Err(e) = send.write_all(&record).await {
                        return SessionEnd::Lost(e.to_string());
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
                        Ok(f) if f.kind == FrameKind::Program => {
                            self.push.program_frame(f.room, f.rtp_ts, f.payload);
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
                                Ok(Some(ControlMessage::Welcome { origin })) => {
                                    backoff.on_success();
                                    tracing::info!(%origin, "origin welcomed edge");
                                }
                                Ok(Some(ControlMessage::Ping { nonce })) => {
                                    let pong = ControlMessage::Pong { nonce }.to_record();
                                    if let Err(e) = send.write_all(&pong).await {
                                        return SessionEnd::Lost(e.to_string());
                                    }
                                }
                                Ok(Some(msg)) => {
                                    let ev = LinkEvent::Control { origin: self.index, msg };
                                    if self.events.send(ev).is_err() {
                                        return SessionEnd::Shutdown;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_room_message_names_its_room() {
        let room = RoomId(9);
        for m in [
            ControlMessage::SubscribeRoom { room },
            ControlMessage::UnsubscribeRoom { room },
            ControlMessage::RoomEnded { room },
            ControlMessage::SpeakerLeft {
                room,
                speaker: amphi_protocol::ParticipantId(1),
            },
        ] {
            assert_eq!(room_of(&m), Some(room), "{m:?}");
        }
        assert_eq!(room_of(&ControlMessage::Ping { nonce: 1 }), None);
    }
}
