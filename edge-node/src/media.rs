//! The media driver: one task owning the shared UDP socket and every peer's `Rtc`.
//!
//! It demultiplexes datagrams with [`PeerTable`], feeds them to str0m, drains `poll_output`
//! (transmits, events, next timeout), relays publishers' RTP packets to the origin as relay frames,
//! and removes peers on DELETE, ICE disconnect or inactivity.

use crate::lifecycle::{CloseReason, PeerLiveness};
use crate::mesh::MeshEvent;
use crate::metrics::Metrics;
use crate::peers::{DropReason, InsertError, PeerId, PeerTable, Route};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::{ParticipantId, RoomId};
use bytes::BytesMut;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::net::{DatagramRecv, Protocol, Receive};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Bytes reserved at a time for outgoing relay frames; frames are split off it, so the buffer is
/// reused once quinn has sent (dropped) the earlier ones.
const RELAY_BUF_CAPACITY: usize = 64 * 1024;
/// Largest datagram read from the media socket.
const RECV_BUF_LEN: usize = 2048;
/// How often liveness is checked.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A negotiated peer handed from the HTTP layer to the driver.
pub(crate) struct NewPeer {
    /// WHIP session id (the last segment of `Location`).
    pub session: String,
    /// Local ICE ufrag given in the answer.
    pub ufrag: String,
    /// The str0m instance, offer accepted, local candidate added.
    pub rtc: Rtc,
    /// Room joined.
    pub room: RoomId,
    /// Media id.
    pub participant: ParticipantId,
    /// Display name from the token.
    pub name: String,
    /// `jti` of the token that created the session (DELETE must present the same token).
    pub jti: String,
    /// Whether RTP from this peer is relayed.
    pub publishing: bool,
}

/// Result of a DELETE.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RemoveOutcome {
    /// Torn down.
    Removed,
    /// No such session in that room.
    NotFound,
    /// The session exists but belongs to another token.
    Forbidden,
}

/// Requests to the driver.
pub(crate) enum MediaCommand {
    /// Start serving a peer.
    Add {
        peer: Box<NewPeer>,
        reply: oneshot::Sender<Result<(), InsertError>>,
    },
    /// Tear a session down (WHIP DELETE).
    Remove {
        session: String,
        room: RoomId,
        jti: String,
        reply: oneshot::Sender<RemoveOutcome>,
    },
    /// The origin says the room ended: drop its peers.
    EndRoom { room: RoomId },
}

struct Peer {
    rtc: Rtc,
    room: RoomId,
    participant: ParticipantId,
    name: String,
    jti: String,
    publishing: bool,
    announced: bool,
    liveness: PeerLiveness,
    next_timeout: Option<Instant>,
    dead: Option<CloseReason>,
}

/// Sends relay frames to the origin over the current QUIC connection, if any.
pub(crate) struct Relay {
    conn: Option<quinn::Connection>,
    conn_rx: watch::Receiver<Option<quinn::Connection>>,
    buf: BytesMut,
}

impl Relay {
    pub(crate) fn new(conn_rx: watch::Receiver<Option<quinn::Connection>>) -> Self {
        Relay {
            conn: None,
            conn_rx,
            buf: BytesMut::with_capacity(RELAY_BUF_CAPACITY),
        }
    }

    fn send(&mut self, frame: &RelayFrame<'_>, metrics: &Metrics) {
        if self.conn_rx.has_changed().unwrap_or(false) {
            self.conn = self.conn_rx.borrow_and_update().clone();
        }
        let Some(conn) = &self.conn else {
            metrics.relay_send_error();
            return;
        };
        let len = frame.encoded_len();
        if self.buf.capacity() < len {
            self.buf.reserve(RELAY_BUF_CAPACITY.max(len));
        }
        self.buf.resize(len, 0);
        match frame.encode_into(&mut self.buf[..]) {
            Ok(n) => {
                let bytes = self.buf.split_to(n).freeze();
                match conn.send_datagram(bytes) {
                    Ok(()) => metrics.relay_sent(),
                    Err(e) => {
                        metrics.relay_send_error();
                        tracing::debug!(room = %frame.room, speaker = frame.speaker, error = %e, "relay datagram not sent");
                    }
                }
            }
            Err(e) => {
                self.buf.clear();
                metrics.relay_send_error();
                tracing::debug!(room = %frame.room, speaker = frame.speaker, error = %e, "relay frame not encodable");
            }
        }
    }
}

/// RFC 6464 level (0 loudest .. 127 silence) from str0m's negative dBov value.
pub(crate) fn rfc6464_level(dbov: Option<i8>) -> u8 {
    match dbov {
        Some(v) => (-(v as i16)).clamp(0, 127) as u8,
        None => 127,
    }
}

/// The driver's state; the socket is passed in separately so reads and handling can interleave.
pub(crate) struct MediaDriver {
    local: SocketAddr,
    table: PeerTable<Peer>,
    timers: BTreeSet<(Instant, PeerId)>,
    relay: Relay,
    metrics: Arc<Metrics>,
    mesh_tx: mpsc::UnboundedSender<MeshEvent>,
    scratch: Vec<PeerId>,
}

impl MediaDriver {
    /// `local` is the address in our ICE candidate (the datagrams' destination as str0m sees it).
    pub(crate) fn new(
        local: SocketAddr,
        relay: Relay,
        metrics: Arc<Metrics>,
        mesh_tx: mpsc::UnboundedSender<MeshEvent>,
    ) -> Self {
        MediaDriver {
            local,
            table: PeerTable::default(),
            timers: BTreeSet::new(),
            relay,
            metrics,
            mesh_tx,
            scratch: Vec::new(),
        }
    }

    /// Serve until `shutdown`, then remove every peer.
    pub(crate) async fn run(
        mut self,
        socket: UdpSocket,
        mut commands: mpsc::Receiver<MediaCommand>,
        shutdown: CancellationToken,
    ) {
        let mut buf = vec![0u8; RECV_BUF_LEN];
        let sleep = tokio::time::sleep(SWEEP_INTERVAL);
        tokio::pin!(sleep);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self
                .timers
                .first()
                .map(|(t, _)| *t)
                .unwrap_or_else(|| Instant::now() + SWEEP_INTERVAL);
            sleep.as_mut().reset(next.into());
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.handle_command(&socket, cmd),
                    None => break,
                },
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, source)) => self.handle_datagram(&socket, source, &buf[..n], Instant::now()),
                    Err(e) => tracing::debug!(error = %e, "media socket read failed"),
                },
                _ = &mut sleep => self.handle_timeouts(&socket, Instant::now()),
                _ = sweep.tick() => self.sweep(Instant::now()),
            }
        }
        let ids: Vec<PeerId> = self.table.ids().collect();
        for id in ids {
            self.remove(id, CloseReason::Shutdown);
        }
    }

    fn handle_command(&mut self, socket: &UdpSocket, cmd: MediaCommand) {
        match cmd {
            MediaCommand::Add { peer, reply } => {
                let NewPeer {
                    session,
                    ufrag,
                    rtc,
                    room,
                    participant,
                    name,
                    jti,
                    publishing,
                } = *peer;
                let now = Instant::now();
                let peer = Peer {
                    rtc,
                    room,
                    participant,
                    name,
                    jti,
                    publishing,
                    announced: false,
                    liveness: PeerLiveness::new(now),
                    next_timeout: None,
                    dead: None,
                };
                match self.table.insert(&ufrag, &session, peer) {
                    Ok(id) => {
                        let _ = self.mesh_tx.send(MeshEvent::PeerAdded { room });
                        self.metrics.set_peers(self.table.len());
                        tracing::info!(%room, %participant, publishing, "peer added");
                        self.drain(socket, id, now);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            MediaCommand::Remove {
                session,
                room,
                jti,
                reply,
            } => {
                let outcome = match self.table.by_session(&session) {
                    Some(id) => match self.table.get(id) {
                        Some(p) if p.room != room => RemoveOutcome::NotFound,
                        Some(p) if p.jti != jti => RemoveOutcome::Forbidden,
                        Some(_) => {
                            self.remove(id, CloseReason::Deleted);
                            RemoveOutcome::Removed
                        }
                        None => RemoveOutcome::NotFound,
                    },
                    None => RemoveOutcome::NotFound,
                };
                let _ = reply.send(outcome);
            }
            MediaCommand::EndRoom { room } => {
                self.scratch.clear();
                self.scratch.extend(
                    self.table
                        .iter_mut()
                        .filter(|(_, p)| p.room == room)
                        .map(|(id, _)| id),
                );
                let ids = std::mem::take(&mut self.scratch);
                for &id in &ids {
                    self.remove(id, CloseReason::Disconnected);
                }
                self.scratch = ids;
            }
        }
    }

    fn handle_datagram(
        &mut self,
        socket: &UdpSocket,
        source: SocketAddr,
        data: &[u8],
        now: Instant,
    ) {
        self.metrics.udp_datagram();
        let id = match self.table.route(source, data) {
            Route::Peer(id) | Route::NewAddr(id) => id,
            Route::Drop(reason) => {
                self.metrics.dropped(reason);
                return;
            }
        };
        let Ok(contents) = DatagramRecv::try_from(data) else {
            self.metrics.dropped(DropReason::Malformed);
            return;
        };
        let Some(peer) = self.table.get_mut(id) else {
            return;
        };
        peer.liveness.on_traffic(now);
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        );
        if let Err(e) = peer.rtc.handle_input(input) {
            self.metrics.dropped(DropReason::RtcError);
            tracing::debug!(room = %peer.room, participant = %peer.participant, error = %e, "datagram refused");
        }
        self.drain(socket, id, now);
    }

    fn handle_timeouts(&mut self, socket: &UdpSocket, now: Instant) {
        self.scratch.clear();
        while let Some(&(t, id)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            if let Some(p) = self.table.get_mut(id) {
                p.next_timeout = None;
            }
            self.scratch.push(id);
        }
        let due = std::mem::take(&mut self.scratch);
        for &id in &due {
            if let Some(p) = self.table.get_mut(id) {
                if let Err(e) = p.rtc.handle_input(Input::Timeout(now)) {
                    tracing::debug!(room = %p.room, participant = %p.participant, error = %e, "timeout handling failed");
                    p.dead = Some(CloseReason::RtcFailed);
                }
            }
            self.drain(socket, id, now);
        }
        self.scratch = due;
    }

    fn sweep(&mut self, now: Instant) {
        self.scratch.clear();
        let mut reasons = Vec::new();
        for (id, p) in self.table.iter_mut() {
            let reason = p
                .dead
                .or_else(|| (!p.rtc.is_alive()).then_some(CloseReason::Disconnected))
                .or_else(|| p.liveness.check(now));
            if let Some(r) = reason {
                self.scratch.push(id);
                reasons.push(r);
            }
        }
        let ids = std::mem::take(&mut self.scratch);
        for (&id, &r) in ids.iter().zip(&reasons) {
            self.remove(id, r);
        }
        self.scratch = ids;
    }

    /// Drain `poll_output` to the next timeout; remove the peer if it died.
    fn drain(&mut self, socket: &UdpSocket, id: PeerId, now: Instant) {
        let Some(peer) = self.table.get_mut(id) else {
            return;
        };
        let next = loop {
            match peer.rtc.poll_output() {
                Ok(Output::Timeout(t)) => break Some(t),
                Ok(Output::Transmit(t)) => {
                    if let Err(e) = socket.try_send_to(&t.contents, t.destination) {
                        tracing::debug!(room = %peer.room, participant = %peer.participant, error = %e, "media send failed");
                    }
                }
                Ok(Output::Event(ev)) => {
                    on_event(peer, ev, &mut self.relay, &self.metrics, &self.mesh_tx)
                }
                Err(e) => {
                    tracing::debug!(room = %peer.room, participant = %peer.participant, error = %e, "poll_output failed");
                    peer.dead = Some(CloseReason::RtcFailed);
                    break None;
                }
            }
        };
        if let Some(old) = peer.next_timeout.take() {
            self.timers.remove(&(old, id));
        }
        if !peer.rtc.is_alive() && peer.dead.is_none() {
            peer.dead = Some(CloseReason::Disconnected);
        }
        if let Some(reason) = peer.dead {
            self.remove(id, reason);
            return;
        }
        // A timeout in the past is due now; never schedule before `now` to avoid spinning.
        let at = next.unwrap_or(now + SWEEP_INTERVAL).max(now);
        peer.next_timeout = Some(at);
        self.timers.insert((at, id));
    }

    fn remove(&mut self, id: PeerId, reason: CloseReason) {
        let Some(mut p) = self.table.remove(id) else {
            return;
        };
        if let Some(t) = p.next_timeout {
            self.timers.remove(&(t, id));
        }
        p.rtc.disconnect();
        if p.announced {
            let _ = self.mesh_tx.send(MeshEvent::PublisherDown {
                room: p.room,
                speaker: p.participant,
            });
        }
        let _ = self.mesh_tx.send(MeshEvent::PeerRemoved { room: p.room });
        self.metrics.set_peers(self.table.len());
        tracing::info!(room = %p.room, participant = %p.participant, reason = reason.as_str(), "peer removed");
    }
}

fn announce(peer: &mut Peer, mesh_tx: &mpsc::UnboundedSender<MeshEvent>) {
    if peer.publishing && !peer.announced {
        peer.announced = true;
        let _ = mesh_tx.send(MeshEvent::PublisherUp {
            room: peer.room,
            speaker: peer.participant,
            name: peer.name.clone(),
        });
    }
}

fn on_event(
    peer: &mut Peer,
    ev: Event,
    relay: &mut Relay,
    metrics: &Metrics,
    mesh_tx: &mpsc::UnboundedSender<MeshEvent>,
) {
    match ev {
        Event::Connected => {
            if peer.liveness.on_connected() {
                tracing::info!(room = %peer.room, participant = %peer.participant, "peer connected");
            }
            announce(peer, mesh_tx);
        }
        Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
            peer.dead = Some(CloseReason::Disconnected);
        }
        Event::Closed => {
            peer.dead = Some(CloseReason::Disconnected);
        }
        Event::RtpPacket(pkt) => {
            metrics.rtp_in();
            if !peer.publishing {
                return;
            }
            announce(peer, mesh_tx);
            let frame = RelayFrame {
                kind: FrameKind::SpeakerAudio,
                room: peer.room,
                speaker: peer.participant.0,
                seq: pkt.header.sequence_number,
                rtp_ts: pkt.header.timestamp,
                audio_level: rfc6464_level(pkt.header.ext_vals.audio_level),
                payload: &pkt.payload,
            };
            relay.send(&frame, metrics);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_level_maps_negative_dbov_to_rfc6464() {
        assert_eq!(rfc6464_level(Some(0)), 0);
        assert_eq!(rfc6464_level(Some(-42)), 42);
        assert_eq!(rfc6464_level(Some(-127)), 127);
        assert_eq!(rfc6464_level(Some(-128)), 127);
        assert_eq!(rfc6464_level(Some(5)), 0);
        assert_eq!(rfc6464_level(None), 127);
    }
}
