//! The media driver: one OS thread per shard owning the shard's UDP socket and feeding its
//! [`MediaCore`]. It reads datagrams (handing those of another shard's peers over), relay frames
//! from the uplink and the other shards, commands from admission and controls from signaling;
//! after each input it sends the core's datagrams in `sendmmsg` batches ([`crate::batch`]), its
//! relay frames over the QUIC link to each room's origin (and to the other shards), and its events
//! to signaling, the uplink, the shards' ufrag directory and the occupancy counts.

use super::api::{MediaCommand, MediaControl, MediaEvent};
use super::core::{Command, Event, MediaCore, RelayOut};
use crate::mesh::MeshEvent;
use crate::metrics::Metrics;
use crate::occupancy::Occupancy;
use crate::peers::{stun_local_ufrag, DropReason};
use crate::shards::{Foreign, ShardLinks};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Largest datagram read from the media socket.
const RECV_BUF_LEN: usize = 2048;
/// Datagrams (or relay frames) read in one turn of the loop before the core forwards them.
const SOCKET_BURST: usize = 64;
/// Capacity of the uplink -> media queue of relayed speaker datagrams.
pub(crate) const RELAY_QUEUE: usize = 4096;
/// Most remembered addresses of other shards' peers before the memory is cleared (it refills
/// from the clients' periodic STUN consent checks).
const FOREIGN_ADDRS_MAX: usize = 65_536;

/// Environment variable of the benchmark-only relay loss knob: `FRACTION[:SEED]` (e.g.
/// `0.05:1`) makes the edge drop that fraction of the speaker datagrams it relays to the origin,
/// chosen by a seeded generator. Unset (the default, and the only setting for production) drops
/// nothing. `amphi-tools bench quality --relay-loss` sets it on the dev mesh it starts.
pub const BENCH_RELAY_LOSS_ENV: &str = "AMPHI_BENCH_RELAY_LOSS";

/// Seeded random loss of relay datagrams, for benchmarks only (see [`BENCH_RELAY_LOSS_ENV`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BenchLoss {
    fraction: f64,
    state: u64,
}

impl BenchLoss {
    /// Parse `FRACTION[:SEED]`; `None` for a zero, negative or unparsable fraction.
    pub(crate) fn parse(v: &str) -> Option<BenchLoss> {
        let (f, seed) = v.split_once(':').unwrap_or((v, "1"));
        let fraction: f64 = f.trim().parse().ok()?;
        let seed: u64 = seed.trim().parse().ok()?;
        (fraction > 0.0 && fraction < 1.0).then_some(BenchLoss {
            fraction,
            state: seed ^ 0x5eed_1055,
        })
    }

    /// Whether to drop the next datagram (SplitMix64 draw).
    pub(crate) fn drop_next(&mut self) -> bool {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 / (1u64 << 53) as f64) < self.fraction
    }
}

/// Where relay frames go: the link to every origin (`None` while down) and each room's owner
/// (index into `links`), published by the uplink ([`crate::owners::OriginRoutes`]).
#[derive(Debug, Default, Clone)]
pub(crate) struct RelayTargets {
    /// The link to each configured origin.
    pub links: Vec<Option<quinn::Connection>>,
    /// Each room's owner.
    pub rooms: HashMap<RoomId, usize>,
}

impl RelayTargets {
    /// The connection `room`'s speaker datagrams go to now.
    fn conn(&self, room: RoomId) -> Option<&quinn::Connection> {
        let origin = *self.rooms.get(&room)?;
        self.links.get(origin)?.as_ref()
    }
}

/// Sends relay frames to each room's origin over its QUIC connection, if it is up.
pub(crate) struct Relay {
    targets: Arc<RelayTargets>,
    targets_rx: watch::Receiver<Arc<RelayTargets>>,
    bench_loss: Option<BenchLoss>,
}

impl Relay {
    /// Follow the uplink's published targets.
    pub(crate) fn new(targets_rx: watch::Receiver<Arc<RelayTargets>>) -> Self {
        let bench_loss = std::env::var(BENCH_RELAY_LOSS_ENV)
            .ok()
            .and_then(|v| BenchLoss::parse(&v));
        if let Some(l) = &bench_loss {
            tracing::warn!(
                fraction = l.fraction,
                "{BENCH_RELAY_LOSS_ENV} is set: dropping relay datagrams (benchmark setting)"
            );
        }
        Relay {
            targets: Arc::default(),
            targets_rx,
            bench_loss,
        }
    }

    /// Send one encoded frame of `room` to its origin, if connected.
    fn send(&mut self, room: RoomId, frame: Bytes, metrics: &Metrics) {
        if self.targets_rx.has_changed().unwrap_or(false) {
            self.targets = self.targets_rx.borrow_and_update().clone();
        }
        if self.bench_loss.as_mut().is_some_and(BenchLoss::drop_next) {
            return;
        }
        match self.targets.conn(room) {
            Some(conn) => match conn.send_datagram(frame) {
                Ok(()) => metrics.relay_sent(),
                Err(e) => {
                    metrics.relay_send_error();
                    tracing::debug!(%room, error = %e, "relay datagram not sent");
                }
            },
            None => metrics.relay_send_error(),
        }
    }
}

/// Channels feeding the driver.
pub(crate) struct MediaInputs {
    /// Commands from admission (HTTP, WebSocket) and the uplink.
    pub commands: mpsc::Receiver<MediaCommand>,
    /// Permission changes and closes from signaling.
    pub control: mpsc::UnboundedReceiver<MediaControl>,
    /// Speaker relay frames from the uplink and the other shards, with the time they were read.
    pub relayed: mpsc::Receiver<(Instant, Bytes)>,
    /// Datagrams other shards' sockets received for this shard's peers.
    pub foreign: mpsc::Receiver<Foreign>,
}

/// Where the driver sends what the core produced, besides datagrams.
pub(crate) struct MediaOutputs {
    /// Publisher announcements for the uplink.
    pub mesh_tx: mpsc::UnboundedSender<MeshEvent>,
    /// Events for signaling.
    pub signal_tx: mpsc::UnboundedSender<MediaEvent>,
    /// Interactive listeners per room, for load reports.
    pub occupancy: Arc<Occupancy>,
}

/// One shard's driver.
pub(crate) struct MediaDriver {
    core: MediaCore,
    relay: Relay,
    metrics: Arc<Metrics>,
    outputs: MediaOutputs,
    links: ShardLinks,
    /// Addresses whose peers live on another shard, and which.
    foreign_addrs: HashMap<SocketAddr, usize>,
}

impl MediaDriver {
    /// Drive `core` for the shard `links.index`.
    pub(crate) fn new(
        core: MediaCore,
        relay: Relay,
        metrics: Arc<Metrics>,
        outputs: MediaOutputs,
        links: ShardLinks,
    ) -> Self {
        MediaDriver {
            core,
            relay,
            metrics,
            outputs,
            links,
            foreign_addrs: HashMap::new(),
        }
    }

    /// Serve until `shutdown`, then remove every peer.
    pub(crate) async fn run(
        mut self,
        socket: UdpSocket,
        mut inputs: MediaInputs,
        shutdown: CancellationToken,
    ) {
        let mut buf = vec![0u8; RECV_BUF_LEN];
        let sleep = tokio::time::sleep_until(self.core.poll_timeout().into());
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().reset(self.core.poll_timeout().into());
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = inputs.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd, Instant::now()),
                    None => break,
                },
                Some(ctl) = inputs.control.recv() => {
                    self.core.handle_command(Instant::now(), Command::Control(ctl));
                }
                Some((at, d)) = inputs.relayed.recv() => {
                    let now = Instant::now();
                    self.core.handle_relay(now, at, &d);
                    // Drain whatever else is queued before going back to the socket.
                    let mut n = 1;
                    while n < SOCKET_BURST {
                        match inputs.relayed.try_recv() {
                            Ok((at, d)) => self.core.handle_relay(now, at, &d),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                }
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, source)) => {
                        let now = Instant::now();
                        self.receive(source, &buf[..n], now);
                        // Whatever else the socket holds (bounded) is read before the core
                        // forwards: one burst is forwarded in one pass and one `sendmmsg` batch.
                        for _ in 1..SOCKET_BURST {
                            match socket.try_recv_from(&mut buf) {
                                Ok((n, source)) => self.receive(source, &buf[..n], now),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "media socket read failed"),
                },
                Some(f) = inputs.foreign.recv() => self.core.handle_datagram(f.at, f.source, &f.data),
                _ = &mut sleep => self.core.handle_timeout(Instant::now()),
            }
            self.pump(&socket);
        }
        self.core.handle_command(Instant::now(), Command::Shutdown);
        self.pump(&socket);
    }

    /// Carry out what the core produced: datagrams, relay frames, events.
    fn pump(&mut self, socket: &UdpSocket) {
        if let Some(outbox) = self.core.poll_transmit() {
            crate::batch::send_all(socket, outbox, &self.metrics);
        }
        while let Some(out) = self.core.poll_relay() {
            match out {
                RelayOut::Speaker { room, frame, at } => {
                    if self.links.sharded() && !self.links.share(at, &frame) {
                        self.metrics.relay_queue_full();
                    }
                    self.relay.send(room, frame, &self.metrics);
                }
                RelayOut::Repeat { room, frame } => self.relay.send(room, frame, &self.metrics),
            }
        }
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::Signal(ev) => {
                    let _ = self.outputs.signal_tx.send(ev);
                }
                Event::Mesh(ev) => {
                    let _ = self.outputs.mesh_tx.send(ev);
                }
                Event::UfragUp(ufrag) => self.links.ufrags.insert(&ufrag, self.links.index),
                Event::UfragDown(ufrag) => self.links.ufrags.remove(&ufrag),
                Event::Receiving { room, on: true } => self.outputs.occupancy.add(room),
                Event::Receiving { room, on: false } => self.outputs.occupancy.remove(room),
                Event::Peers(n) => {
                    self.links.set_load(n);
                    self.metrics.set_peers(self.links.total_load());
                }
            }
        }
    }

    /// Hand a command to the core and its reply back.
    fn command(&mut self, cmd: MediaCommand, now: Instant) {
        let core = &mut self.core;
        match cmd {
            MediaCommand::Add { peer, reply } => {
                let _ = reply.send(core.add(now, *peer));
            }
            MediaCommand::Remove {
                session,
                room,
                jti,
                reply,
            } => {
                let _ = reply.send(core.remove_session(&session, room, &jti));
            }
            MediaCommand::Renegotiate {
                participant,
                offer,
                publishing,
                slots,
                reply,
            } => {
                let _ = reply.send(core.renegotiate(now, participant, *offer, publishing, slots));
            }
            MediaCommand::Patch {
                session,
                room,
                claims,
                refreshed,
                if_match,
                fragment,
                reply,
            } => {
                let outcome = core.patch(
                    now,
                    &session,
                    room,
                    &claims,
                    refreshed,
                    if_match.as_deref(),
                    fragment,
                );
                let _ = reply.send(outcome);
            }
            MediaCommand::HasPeer { participant, reply } => {
                let _ = reply.send(core.has_peer(participant));
            }
            MediaCommand::Supersede { participant } => {
                core.handle_command(now, Command::Supersede { participant })
            }
            MediaCommand::RemoveParticipant { participant } => {
                core.handle_command(now, Command::RemoveParticipant { participant })
            }
            MediaCommand::EndRoom { room } => core.handle_command(now, Command::EndRoom { room }),
        }
    }

    /// A datagram from this shard's socket: handle it, or hand it to the shard owning its peer.
    fn receive(&mut self, source: SocketAddr, data: &[u8], now: Instant) {
        match self.owner_shard(source, data) {
            Some(k) if k != self.links.index => {
                let foreign = Foreign {
                    source,
                    data: Bytes::copy_from_slice(data),
                    at: now,
                };
                if self.links.foreign[k].try_send(foreign).is_err() {
                    self.metrics.dropped(DropReason::Overloaded);
                }
            }
            _ => self.core.handle_datagram(now, source, data),
        }
    }

    /// Which other shard owns the peer of a datagram this shard's socket received, if one does:
    /// STUN by its ufrag (and the address is remembered), anything else by the remembered address.
    fn owner_shard(&mut self, source: SocketAddr, data: &[u8]) -> Option<usize> {
        if !self.links.sharded() {
            return None;
        }
        if data.first().is_some_and(|b| *b < 2) {
            let ufrag = stun_local_ufrag(data).ok()?;
            if self.core.has_ufrag(ufrag) {
                self.foreign_addrs.remove(&source);
                return None;
            }
            let owner = self.links.ufrags.owner(ufrag)?;
            if self.foreign_addrs.len() >= FOREIGN_ADDRS_MAX {
                self.foreign_addrs.clear();
            }
            self.foreign_addrs.insert(source, owner);
            return Some(owner);
        }
        if self.core.knows_addr(source) {
            return None;
        }
        self.foreign_addrs.get(&source).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_relay_loss_is_seeded_and_off_unless_set() {
        assert_eq!(BenchLoss::parse("0"), None);
        assert_eq!(BenchLoss::parse("nonsense"), None);
        assert_eq!(BenchLoss::parse("1.5:3"), None);
        let mut a = BenchLoss::parse("0.05:7").unwrap();
        let mut b = BenchLoss::parse("0.05:7").unwrap();
        let da: Vec<bool> = (0..4000).map(|_| a.drop_next()).collect();
        let db: Vec<bool> = (0..4000).map(|_| b.drop_next()).collect();
        assert_eq!(da, db);
        let dropped = da.iter().filter(|d| **d).count();
        assert!((120..280).contains(&dropped), "dropped {dropped}");
    }
}
