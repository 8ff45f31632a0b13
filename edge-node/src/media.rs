//! The media driver: one task owning the shared UDP socket and every peer's `Rtc`.
//!
//! It demultiplexes datagrams with [`PeerTable`], feeds them to str0m, drains `poll_output`
//! (transmits, events, next timeout), relays allowed publishers' RTP packets to the origin as relay
//! frames, forwards the room's loudest speakers (local publishers and speakers relayed from other
//! regions by the origin) into every interactive listener's slots, and removes peers on DELETE,
//! kick, room end, ICE disconnect or inactivity. Decisions live in the sans-IO cores
//! ([`crate::slots`], [`crate::lifecycle`], [`crate::peers`]).

use crate::lifecycle::{CloseReason, PeerLiveness};
use crate::mesh::MeshEvent;
use crate::metrics::Metrics;
use crate::occupancy::Occupancy;
use crate::peers::{stun_local_ufrag, DropReason, InsertError, PeerId, PeerTable, Route};
use crate::red::RedReceiver;
use crate::sdpfrag::{IceFragment, PatchDecision};
use crate::sessions::{MediaControl, Sessions};
use crate::shards::{Foreign, ShardLinks};
use crate::signaling::SessionKind;
use crate::slots::{SlotSelector, SlotStream};
use amphi_protocol::relay::{FrameKind, RelayFrame, RELAY_HEADER_LEN};
use amphi_protocol::room::{ActiveSpeaker, LISTENER_AUDIO_SLOTS};
use amphi_protocol::token::Claims;
use amphi_protocol::{ParticipantId, RoomId};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::SdpOffer;
use str0m::format::Codec;
use str0m::media::{ExtensionValues, Mid, Pt};
use str0m::net::{DatagramRecv, DatagramSend, Protocol, Receive};
use str0m::rtp::{RtpWrite, Ssrc};
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
/// Cadence of `active_speakers` messages.
pub(crate) const ACTIVE_SPEAKERS_INTERVAL: Duration = Duration::from_millis(300);
/// Capacity of the uplink -> media queue of relayed speaker datagrams.
pub(crate) const RELAY_QUEUE: usize = 4096;

/// A negotiated peer handed from the HTTP layer to the driver.
pub(crate) struct NewPeer {
    /// Session id (WHIP/WHEP: the last segment of `Location`).
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
    /// What kind of session owns the PeerConnection.
    pub kind: SessionKind,
    /// Whether the offer sends audio (a publisher).
    pub publishing: bool,
    /// Whether its audio may be forwarded now (publishing role, not muted).
    pub may_send: bool,
    /// Mids of the receive slots (the client's recvonly audio m-lines), at most
    /// [`LISTENER_AUDIO_SLOTS`].
    pub slots: Vec<Mid>,
    /// The accepted offer, kept to answer an ICE restart sent as a WHIP/WHEP `PATCH` fragment.
    pub offer_sdp: String,
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

/// Result of a `PATCH`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PatchOutcome {
    /// Candidates accepted (an ICE-lite edge learns client addresses from its checks): 204.
    Trickled,
    /// ICE restarted: 200 with this answer fragment and the new ETag (the new local ufrag).
    Restarted { fragment: String, etag: String },
    /// No `If-Match`: 428.
    PreconditionRequired,
    /// `If-Match` names another ETag: 412.
    PreconditionFailed,
    /// The restart offer was refused: 400 with this message.
    Refused(String),
    /// No such session in that room.
    NotFound,
    /// The session belongs to another token.
    Forbidden,
}

/// Requests to the driver.
pub(crate) enum MediaCommand {
    /// Start serving a peer.
    Add {
        peer: Box<NewPeer>,
        reply: oneshot::Sender<Result<(), InsertError>>,
    },
    /// Tear a session down (WHIP/WHEP DELETE).
    Remove {
        session: String,
        room: RoomId,
        jti: String,
        reply: oneshot::Sender<RemoveOutcome>,
    },
    /// A new offer on an existing PeerConnection (promotion, demotion, ICE restart).
    Renegotiate {
        participant: ParticipantId,
        offer: Box<SdpOffer>,
        publishing: bool,
        slots: Vec<Mid>,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Whether the participant already has a PeerConnection here.
    HasPeer {
        participant: ParticipantId,
        reply: oneshot::Sender<bool>,
    },
    /// A WHIP/WHEP `PATCH` (RFC 9725 §4.4): trickled candidates or an ICE restart; with a new
    /// token of the session's user, also a token refresh.
    Patch {
        session: String,
        room: RoomId,
        /// The verified bearer token of the request.
        claims: Box<Claims>,
        /// The `If-Match` header, if any.
        if_match: Option<String>,
        fragment: IceFragment,
        reply: oneshot::Sender<PatchOutcome>,
    },
    /// The participant has a newer PeerConnection on another shard: drop the one here, keeping
    /// the participant.
    Supersede { participant: ParticipantId },
    /// The participant's WebSocket closed: drop its PeerConnection.
    RemoveParticipant { participant: ParticipantId },
    /// The origin says the room ended: drop its peers.
    EndRoom { room: RoomId },
}

/// One forwarding slot of a receiving peer.
#[derive(Clone, Copy, Debug)]
struct SlotOut {
    mid: Mid,
    pt: Pt,
    /// Subtracted from the room slot's sequence numbers so this peer's stream starts at 1 (ROC 0).
    offset: Option<u64>,
    /// The send stream's SSRC once looked up by mid: a map lookup per packet instead of a scan.
    ssrc: Option<Ssrc>,
}

struct Peer {
    rtc: Rtc,
    room: RoomId,
    participant: ParticipantId,
    name: String,
    jti: String,
    kind: SessionKind,
    publishing: bool,
    may_send: bool,
    announced: bool,
    offer_sdp: String,
    slots: [Option<SlotOut>; LISTENER_AUDIO_SLOTS],
    receiving: bool,
    liveness: PeerLiveness,
    next_timeout: Option<Instant>,
    dead: Option<CloseReason>,
    /// The relay frame of this publisher's previous packet, repeated with the next one.
    last_relayed: Option<Bytes>,
    /// RFC 2198 RED, if the publisher negotiated it.
    red: Option<RedIn>,
}

/// RFC 2198 RED negotiated with a publisher: the payload types and the loss recovery state.
#[derive(Clone, Copy, Debug)]
struct RedIn {
    red_pt: Pt,
    opus_pt: Pt,
    rx: RedReceiver,
}

/// The RED state for a peer that negotiated RED for Opus (str0m drops RED from the session's
/// codec config when the remote did not offer it).
fn red_in(rtc: &Rtc) -> Option<RedIn> {
    let opus = rtc
        .codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == Codec::Opus)?;
    Some(RedIn {
        red_pt: opus.red()?,
        opus_pt: opus.pt(),
        rx: RedReceiver::default(),
    })
}

/// Per-room forwarding state on this edge.
#[derive(Default)]
struct MediaRoom {
    peers: usize,
    receivers: Vec<PeerId>,
    selector: SlotSelector,
    streams: [SlotStream; LISTENER_AUDIO_SLOTS],
    active_nonempty: bool,
}

/// A speaker packet waiting to be forwarded into slots.
struct Inbound {
    room: RoomId,
    speaker: u32,
    seq: u16,
    ts: u32,
    level: u8,
    payload: Arc<[u8]>,
    at: Instant,
}

/// Environment variable of the benchmark-only relay loss knob: `FRACTION[:SEED]` (e.g.
/// `0.05:1`) makes the edge drop that fraction of the speaker datagrams it relays to the origin,
/// chosen by a seeded generator. Unset (the default, and the only setting for production) drops
/// nothing. `amphi bench quality --relay-loss` sets it on the dev mesh it starts.
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
    buf: BytesMut,
    bench_loss: Option<BenchLoss>,
}

impl Relay {
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
            buf: BytesMut::with_capacity(RELAY_BUF_CAPACITY),
            bench_loss,
        }
    }

    /// Encode `frame` and send it to the origin (if connected); returns the encoded frame so
    /// other media shards can forward it too.
    fn send(&mut self, frame: &RelayFrame<'_>, metrics: &Metrics) -> Option<Bytes> {
        if self.targets_rx.has_changed().unwrap_or(false) {
            self.targets = self.targets_rx.borrow_and_update().clone();
        }
        let len = frame.encoded_len();
        if self.buf.capacity() < len {
            self.buf.reserve(RELAY_BUF_CAPACITY.max(len));
        }
        self.buf.resize(len, 0);
        let bytes = match frame.encode_into(&mut self.buf[..]) {
            Ok(n) => self.buf.split_to(n).freeze(),
            Err(e) => {
                self.buf.clear();
                metrics.relay_send_error();
                tracing::debug!(room = %frame.room, speaker = frame.speaker, error = %e, "relay frame not encodable");
                return None;
            }
        };
        if self.bench_loss.as_mut().is_some_and(BenchLoss::drop_next) {
            return Some(bytes);
        }
        match self.targets.conn(frame.room) {
            Some(conn) => match conn.send_datagram(bytes.clone()) {
                Ok(()) => metrics.relay_sent(),
                Err(e) => {
                    metrics.relay_send_error();
                    tracing::debug!(room = %frame.room, speaker = frame.speaker, error = %e, "relay datagram not sent");
                }
            },
            None => metrics.relay_send_error(),
        }
        Some(bytes)
    }

    /// Send `previous` (an encoded `SpeakerAudio` frame of `room`) again as a `SpeakerRepeat`
    /// frame.
    fn repeat(&mut self, room: RoomId, previous: &[u8], metrics: &Metrics) {
        if previous.len() < RELAY_HEADER_LEN {
            return;
        }
        if self.buf.capacity() < previous.len() {
            self.buf.reserve(RELAY_BUF_CAPACITY.max(previous.len()));
        }
        self.buf.clear();
        self.buf.extend_from_slice(previous);
        self.buf[1] = FrameKind::SpeakerRepeat as u8;
        let bytes = self.buf.split().freeze();
        if self.bench_loss.as_mut().is_some_and(BenchLoss::drop_next) {
            return;
        }
        match self.targets.conn(room) {
            Some(conn) => match conn.send_datagram(bytes) {
                Ok(()) => metrics.relay_sent(),
                Err(_) => metrics.relay_send_error(),
            },
            None => metrics.relay_send_error(),
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

/// The negotiated Opus payload type of `mid`, if any.
fn opus_pt(rtc: &Rtc, mid: Mid) -> Option<Pt> {
    let media = rtc.media(mid)?;
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == Codec::Opus && media.remote_pts().contains(&p.pt()))
        .map(|p| p.pt())
}

/// Where one publisher's Opus packets go: the relay to the origin (and the other shards), and
/// the queue of packets for this edge's listeners.
struct Ingest<'a> {
    relay: &'a mut Relay,
    links: &'a ShardLinks,
    metrics: &'a Metrics,
    inbound: &'a mut VecDeque<Inbound>,
    last_relayed: &'a mut Option<Bytes>,
    room: RoomId,
    speaker: u32,
    level: u8,
    at: Instant,
}

impl Ingest<'_> {
    /// Relay and queue one Opus packet; `shared` gives the payload as the `Arc` the listeners'
    /// writes share (the packet's own for plain Opus; one copy of the Opus block out of a RED
    /// payload, as str0m's `RtpWrite` takes a whole `Arc<[u8]>`).
    fn packet(&mut self, seq: u16, ts: u32, payload: &[u8], shared: impl FnOnce() -> Arc<[u8]>) {
        let frame = RelayFrame {
            kind: FrameKind::SpeakerAudio,
            room: self.room,
            speaker: self.speaker,
            seq,
            rtp_ts: ts,
            audio_level: self.level,
            payload,
        };
        let encoded = self.relay.send(&frame, self.metrics);
        // Relay protection: the previous packet rides again with this one.
        if let Some(prev) = std::mem::replace(self.last_relayed, encoded.clone()) {
            self.relay.repeat(self.room, &prev, self.metrics);
        }
        if let Some(encoded) = encoded.filter(|_| self.links.sharded()) {
            if !self.links.share(self.at, &encoded) {
                self.metrics.relay_queue_full();
            }
        }
        self.inbound.push_back(Inbound {
            room: self.room,
            speaker: self.speaker,
            seq,
            ts,
            level: self.level,
            payload: shared(),
            at: self.at,
        });
    }
}

/// Channels feeding the driver.
pub(crate) struct MediaInputs {
    pub commands: mpsc::Receiver<MediaCommand>,
    pub control: mpsc::UnboundedReceiver<MediaControl>,
    pub relayed: mpsc::Receiver<(Instant, Bytes)>,
    /// Datagrams other shards' sockets received for this shard's peers.
    pub foreign: mpsc::Receiver<Foreign>,
}

/// Most remembered addresses of other shards' peers before the memory is cleared (it refills
/// from the clients' periodic STUN consent checks).
const FOREIGN_ADDRS_MAX: usize = 65_536;

/// The driver's state; the socket is passed in separately so reads and handling can interleave.
pub(crate) struct MediaDriver {
    local: SocketAddr,
    table: PeerTable<Peer>,
    timers: BTreeSet<(Instant, PeerId)>,
    relay: Relay,
    metrics: Arc<Metrics>,
    mesh_tx: mpsc::UnboundedSender<MeshEvent>,
    sessions: Arc<Sessions>,
    occupancy: Arc<Occupancy>,
    rooms: HashMap<RoomId, MediaRoom>,
    by_participant: HashMap<ParticipantId, PeerId>,
    permissions: HashMap<ParticipantId, bool>,
    inbound: VecDeque<Inbound>,
    outbox: Vec<(SocketAddr, DatagramSend, Option<Instant>)>,
    scratch: Vec<PeerId>,
    active: Vec<ActiveSpeaker>,
    links: ShardLinks,
    /// Addresses whose peers live on another shard, and which.
    foreign_addrs: HashMap<SocketAddr, usize>,
    /// A peer whose ICE+DTLS has not connected this long after its answer is removed.
    connect_timeout: Duration,
}

impl MediaDriver {
    /// `local` is the address in our ICE candidate (the datagrams' destination as str0m sees it).
    pub(crate) fn new(
        local: SocketAddr,
        relay: Relay,
        metrics: Arc<Metrics>,
        mesh_tx: mpsc::UnboundedSender<MeshEvent>,
        sessions: Arc<Sessions>,
        occupancy: Arc<Occupancy>,
        links: ShardLinks,
    ) -> Self {
        MediaDriver {
            connect_timeout: crate::lifecycle::DEFAULT_CONNECT_TIMEOUT,
            local,
            table: PeerTable::default(),
            timers: BTreeSet::new(),
            relay,
            metrics,
            mesh_tx,
            sessions,
            occupancy,
            rooms: HashMap::new(),
            by_participant: HashMap::new(),
            permissions: HashMap::new(),
            inbound: VecDeque::with_capacity(64),
            outbox: Vec::with_capacity(256),
            scratch: Vec::new(),
            active: Vec::new(),
            links,
            foreign_addrs: HashMap::new(),
        }
    }

    /// Drop peers whose ICE+DTLS has not connected `timeout` after their answer (the edge's
    /// `ice_connect_timeout_secs`).
    pub(crate) fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Serve until `shutdown`, then remove every peer.
    pub(crate) async fn run(
        mut self,
        socket: UdpSocket,
        mut inputs: MediaInputs,
        shutdown: CancellationToken,
    ) {
        let mut buf = vec![0u8; RECV_BUF_LEN];
        let sleep = tokio::time::sleep(SWEEP_INTERVAL);
        tokio::pin!(sleep);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut speakers_tick = tokio::time::interval(ACTIVE_SPEAKERS_INTERVAL);
        speakers_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self
                .timers
                .first()
                .map(|(t, _)| *t)
                .unwrap_or_else(|| Instant::now() + SWEEP_INTERVAL);
            sleep.as_mut().reset(next.into());
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = inputs.commands.recv() => match cmd {
                    Some(cmd) => self.handle_command(cmd),
                    None => break,
                },
                Some(ctl) = inputs.control.recv() => self.handle_control(ctl),
                Some((at, d)) = inputs.relayed.recv() => {
                    self.handle_relayed(&d, at);
                    // Drain whatever else is queued before going back to the socket.
                    let mut n = 0;
                    while n < 64 {
                        match inputs.relayed.try_recv() {
                            Ok((at, d)) => self.handle_relayed(&d, at),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                }
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, source)) => self.receive(source, &buf[..n], Instant::now()),
                    Err(e) => tracing::debug!(error = %e, "media socket read failed"),
                },
                Some(f) = inputs.foreign.recv() => self.handle_datagram(f.source, &f.data, f.at),
                _ = &mut sleep => self.handle_timeouts(Instant::now()),
                _ = sweep.tick() => self.sweep(Instant::now()),
                _ = speakers_tick.tick() => self.active_speakers(Instant::now()),
            }
            self.forward_inbound(&socket);
            self.flush(&socket);
        }
        let ids: Vec<PeerId> = self.table.ids().collect();
        for id in ids {
            self.remove(id, CloseReason::Shutdown);
        }
        self.flush(&socket);
    }

    /// Send every queued datagram.
    fn flush(&mut self, socket: &UdpSocket) {
        if self.outbox.is_empty() {
            return;
        }
        crate::batch::send_all(socket, &mut self.outbox, &self.metrics);
    }

    fn handle_command(&mut self, cmd: MediaCommand) {
        match cmd {
            MediaCommand::Add { peer, reply } => {
                let result = self.add(*peer);
                let _ = reply.send(result);
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
            MediaCommand::Renegotiate {
                participant,
                offer,
                publishing,
                slots,
                reply,
            } => {
                let r = self.renegotiate(participant, *offer, publishing, slots);
                let _ = reply.send(r);
            }
            MediaCommand::Patch {
                session,
                room,
                claims,
                if_match,
                fragment,
                reply,
            } => {
                let outcome = self.patch(&session, room, &claims, if_match.as_deref(), fragment);
                let _ = reply.send(outcome);
            }
            MediaCommand::Supersede { participant } => {
                if let Some(&id) = self.by_participant.get(&participant) {
                    self.remove_peer_only(id);
                }
            }
            MediaCommand::HasPeer { participant, reply } => {
                let _ = reply.send(self.by_participant.contains_key(&participant));
            }
            MediaCommand::RemoveParticipant { participant } => {
                self.permissions.remove(&participant);
                if let Some(&id) = self.by_participant.get(&participant) {
                    self.remove(id, CloseReason::Deleted);
                }
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

    fn handle_control(&mut self, ctl: MediaControl) {
        match ctl {
            MediaControl::Permission {
                participant,
                may_send,
            } => {
                self.permissions.insert(participant, may_send);
                if let Some(&id) = self.by_participant.get(&participant) {
                    if let Some(p) = self.table.get_mut(id) {
                        p.may_send = may_send;
                        let room = p.room;
                        if !may_send {
                            if let Some(r) = self.rooms.get_mut(&room) {
                                r.selector.remove(participant.0);
                            }
                        }
                    }
                }
            }
            MediaControl::Close { participant } => {
                self.permissions.remove(&participant);
                if let Some(&id) = self.by_participant.get(&participant) {
                    self.remove(id, CloseReason::Deleted);
                }
            }
        }
    }

    fn set_slots(peer: &mut Peer, mids: &[Mid]) {
        let mut next = [None; LISTENER_AUDIO_SLOTS];
        for (k, mid) in mids.iter().take(LISTENER_AUDIO_SLOTS).enumerate() {
            let Some(pt) = opus_pt(&peer.rtc, *mid) else {
                continue;
            };
            // Keep the stream continuous if the slot's mid is unchanged.
            let kept = peer.slots[k].filter(|s| s.mid == *mid);
            next[k] = Some(SlotOut {
                mid: *mid,
                pt,
                offset: kept.and_then(|s| s.offset),
                ssrc: kept.and_then(|s| s.ssrc),
            });
        }
        peer.slots = next;
    }

    fn add(&mut self, new: NewPeer) -> Result<(), InsertError> {
        let NewPeer {
            session,
            ufrag,
            rtc,
            room,
            participant,
            name,
            jti,
            kind,
            publishing,
            may_send,
            slots,
            offer_sdp,
        } = new;
        let now = Instant::now();
        let may_send = self
            .permissions
            .get(&participant)
            .copied()
            .unwrap_or(may_send);
        let red = red_in(&rtc);
        let mut peer = Peer {
            red,
            rtc,
            room,
            participant,
            name,
            jti,
            kind,
            publishing,
            may_send,
            announced: false,
            offer_sdp,
            slots: [None; LISTENER_AUDIO_SLOTS],
            receiving: false,
            liveness: PeerLiveness::new(now, self.connect_timeout),
            next_timeout: None,
            dead: None,
            last_relayed: None,
        };
        Self::set_slots(&mut peer, &slots);
        let receiving = peer.slots.iter().any(Option::is_some);
        peer.receiving = receiving;
        let id = self.table.insert(&ufrag, &session, peer)?;
        self.links.ufrags.insert(&ufrag, self.links.index);
        self.links.set_load(self.table.len());
        let r = self.rooms.entry(room).or_default();
        r.peers += 1;
        if receiving {
            r.receivers.push(id);
            self.occupancy.add(room);
        }
        if let Some(old) = self.by_participant.insert(participant, id) {
            // A participant has one PeerConnection: the newer one replaces it.
            self.remove_peer_only(old);
        }
        self.metrics.set_peers(self.links.total_load());
        tracing::info!(%room, %participant, publishing, receiving, kind = ?kind, shard = self.links.index, "peer added");
        self.drain(id, now);
        Ok(())
    }

    fn renegotiate(
        &mut self,
        participant: ParticipantId,
        offer: SdpOffer,
        publishing: bool,
        slots: Vec<Mid>,
    ) -> Result<String, String> {
        let Some(&id) = self.by_participant.get(&participant) else {
            return Err("no PeerConnection to renegotiate".into());
        };
        let Some(peer) = self.table.get_mut(id) else {
            return Err("no PeerConnection to renegotiate".into());
        };
        let offer_sdp = offer.to_sdp_string();
        let answer = peer
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| e.to_string())?;
        peer.offer_sdp = offer_sdp;
        // An offer with new ICE credentials restarts ICE: STUN now names the new local ufrag.
        let ufrag = peer.rtc.direct_api().local_ice_credentials().ufrag;
        let peer = match self.table.set_ufrag(id, &ufrag) {
            Ok(old) => {
                self.moved_ufrag(old, &ufrag);
                self.table.get_mut(id).ok_or("the PeerConnection is gone")?
            }
            Err(e) => return Err(e.to_string()),
        };
        let room = peer.room;
        let was_publishing = peer.publishing;
        peer.publishing = publishing;
        let unannounce = was_publishing && !publishing && peer.announced;
        if unannounce {
            peer.announced = false;
        }
        Self::set_slots(peer, &slots);
        let receiving = peer.slots.iter().any(Option::is_some);
        let was_receiving = std::mem::replace(&mut peer.receiving, receiving);
        if unannounce {
            let _ = self.mesh_tx.send(MeshEvent::PublisherDown {
                room,
                speaker: participant,
            });
            if let Some(r) = self.rooms.get_mut(&room) {
                r.selector.remove(participant.0);
            }
        }
        if let Some(r) = self.rooms.get_mut(&room) {
            if receiving && !was_receiving {
                r.receivers.push(id);
                self.occupancy.add(room);
            } else if !receiving && was_receiving {
                r.receivers.retain(|x| *x != id);
                self.occupancy.remove(room);
            }
        }
        tracing::info!(%room, %participant, publishing, receiving, "renegotiated");
        self.drain(id, Instant::now());
        Ok(answer.to_sdp_string())
    }

    /// Keep the shards' ufrag directory in step with an ICE restart.
    fn moved_ufrag(&self, old: Option<String>, new: &str) {
        if let Some(old) = old.filter(|o| o != new) {
            self.links.ufrags.remove(&old);
        }
        self.links.ufrags.insert(new, self.links.index);
    }

    /// Apply a WHIP/WHEP `PATCH` to a session (RFC 9725 §4.3, decided by
    /// [`crate::sdpfrag::decide_patch`]). An ICE restart re-accepts the session's offer with the
    /// client's new credentials; trickled candidates (also those repeating the current
    /// credentials) need nothing from an ICE-lite edge, which learns addresses from checks.
    /// A request whose token is not the session's refreshes it (same user and room, same role or
    /// lower: [`Sessions::refresh`]) before the fragment is applied; another user's is refused.
    fn patch(
        &mut self,
        session: &str,
        room: RoomId,
        claims: &Claims,
        if_match: Option<&str>,
        fragment: IceFragment,
    ) -> PatchOutcome {
        let Some(id) = self.table.by_session(session) else {
            return PatchOutcome::NotFound;
        };
        let Some(peer) = self.table.get_mut(id) else {
            return PatchOutcome::NotFound;
        };
        if peer.room != room {
            return PatchOutcome::NotFound;
        }
        if peer.jti != claims.jti {
            let now = crate::http::now_unix();
            if let Err(r) = self.sessions.refresh(peer.participant, claims, now) {
                tracing::info!(room = %peer.room, participant = %peer.participant, code = r.code, "token refresh refused");
                return PatchOutcome::Forbidden;
            }
            tracing::info!(room = %peer.room, participant = %peer.participant, "token refreshed");
            peer.jti = claims.jti.clone();
        }
        let etag = format!(
            "\"{}\"",
            peer.rtc.direct_api().local_ice_credentials().ufrag
        );
        let current = crate::sdpfrag::offer_credentials(&peer.offer_sdp);
        let current = current.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        let (ufrag, pwd) = match crate::sdpfrag::decide_patch(if_match, &etag, &fragment, current) {
            PatchDecision::PreconditionRequired => return PatchOutcome::PreconditionRequired,
            PatchDecision::PreconditionFailed => return PatchOutcome::PreconditionFailed,
            PatchDecision::Trickle => return PatchOutcome::Trickled,
            PatchDecision::Restart { ufrag, pwd } => (ufrag, pwd),
        };
        let restart = crate::sdpfrag::restart_offer(&peer.offer_sdp, &ufrag, &pwd);
        let offer = match SdpOffer::from_sdp_string(&restart) {
            Ok(o) => o,
            Err(e) => return PatchOutcome::Refused(e.to_string()),
        };
        let answer = match peer.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => a.to_sdp_string(),
            Err(e) => return PatchOutcome::Refused(e.to_string()),
        };
        peer.offer_sdp = restart;
        let (participant, room) = (peer.participant, peer.room);
        let ufrag = peer.rtc.direct_api().local_ice_credentials().ufrag;
        match self.table.set_ufrag(id, &ufrag) {
            Ok(old) => self.moved_ufrag(old, &ufrag),
            Err(e) => return PatchOutcome::Refused(e.to_string()),
        }
        tracing::info!(%room, %participant, "ICE restarted");
        self.drain(id, Instant::now());
        PatchOutcome::Restarted {
            fragment: crate::sdpfrag::answer_fragment(&answer),
            etag: format!("\"{ufrag}\""),
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
            _ => self.handle_datagram(source, data, now),
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
            if self.table.has_ufrag(ufrag) {
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
        if self.table.knows_addr(source) {
            return None;
        }
        self.foreign_addrs.get(&source).copied()
    }

    fn handle_datagram(&mut self, source: SocketAddr, data: &[u8], now: Instant) {
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
            // The DTLS provider keeps why a handshake failed (this thread, this datagram).
            if let Some(reason) = crate::dtls::take_handshake_failure() {
                tracing::info!(room = %peer.room, participant = %peer.participant, %reason, "DTLS handshake failed");
                peer.dead = Some(CloseReason::DtlsFailed);
            } else {
                tracing::debug!(room = %peer.room, participant = %peer.participant, error = %e, "datagram refused");
            }
        }
        self.drain(id, now);
    }

    /// A relay frame from the origin (another region's speaker).
    fn handle_relayed(&mut self, datagram: &[u8], at: Instant) {
        let frame = match RelayFrame::decode(datagram) {
            Ok(f) if f.kind == FrameKind::SpeakerAudio => f,
            _ => return,
        };
        if !self.rooms.contains_key(&frame.room)
            || self
                .by_participant
                .contains_key(&ParticipantId(frame.speaker))
        {
            return;
        }
        self.inbound.push_back(Inbound {
            room: frame.room,
            speaker: frame.speaker,
            seq: frame.seq,
            ts: frame.rtp_ts,
            level: frame.audio_level,
            payload: Arc::from(frame.payload),
            at,
        });
    }

    /// Forward queued speaker packets into the slots of the room's receivers. The outbox is sent
    /// whenever a full `sendmmsg` batch is queued, so the first receivers of a large room don't
    /// wait for the whole fan-out.
    fn forward_inbound(&mut self, socket: &UdpSocket) {
        while let Some(pkt) = self.inbound.pop_front() {
            let now = Instant::now();
            let Some(room) = self.rooms.get_mut(&pkt.room) else {
                continue;
            };
            let Some(k) = room.selector.observe(pkt.speaker, pkt.level, now) else {
                continue;
            };
            let (seq, ts) = room.streams[k].rewrite(pkt.speaker, pkt.seq, pkt.ts, now);
            self.scratch.clear();
            self.scratch.extend_from_slice(&room.receivers);
            let targets = std::mem::take(&mut self.scratch);
            let ext = ExtensionValues {
                audio_level: Some(-(pkt.level.min(127) as i8)),
                voice_activity: Some(pkt.level < 127),
                ..Default::default()
            };
            for &id in &targets {
                let Some(peer) = self.table.get_mut(id) else {
                    continue;
                };
                if peer.participant.0 == pkt.speaker || !peer.liveness.is_connected() {
                    continue;
                }
                let Some(slot) = peer.slots[k].as_mut() else {
                    continue;
                };
                let offset = *slot.offset.get_or_insert(seq.saturating_sub(1));
                if seq <= offset {
                    continue;
                }
                let (mid, pt) = (slot.mid, slot.pt);
                let mut api = peer.rtc.direct_api();
                let stream = match slot.ssrc {
                    Some(ssrc) => api.stream_tx(&ssrc),
                    None => api.stream_tx_by_mid(mid, None).inspect(|s| {
                        slot.ssrc = Some(s.ssrc());
                    }),
                };
                let Some(stream) = stream else {
                    continue;
                };
                stream.write_rtp(
                    RtpWrite::new(pt, (seq - offset).into(), ts, now, pkt.payload.clone())
                        .ext_vals(ext.clone()),
                );
                self.metrics.rtp_forwarded();
                // str0m releases queued media on its next timeout: run it now so the packet
                // leaves in this batch instead of on the next loop turn.
                if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
                    tracing::debug!(participant = %peer.participant, error = %e, "timeout after write failed");
                }
                self.drain_tagged(id, now, Some(pkt.at));
                if self.outbox.len() >= crate::batch::BATCH {
                    self.flush(socket);
                }
            }
            self.scratch = targets;
        }
    }

    fn handle_timeouts(&mut self, now: Instant) {
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
            self.drain(id, now);
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

    fn active_speakers(&mut self, now: Instant) {
        let mut list = std::mem::take(&mut self.active);
        for (room_id, room) in self.rooms.iter_mut() {
            room.selector.active(now, &mut list);
            if !list.is_empty() || room.active_nonempty {
                room.active_nonempty = !list.is_empty();
                self.sessions.active_speakers(*room_id, &list);
            }
        }
        self.active = list;
    }

    fn drain(&mut self, id: PeerId, now: Instant) {
        self.drain_tagged(id, now, None);
    }

    /// Drain `poll_output` to the next timeout, queueing transmits (tagged with the ingress time
    /// of the forwarded packet, for the forwarding-delay histogram); remove the peer if it died.
    fn drain_tagged(&mut self, id: PeerId, now: Instant, ingress: Option<Instant>) {
        let Some(peer) = self.table.get_mut(id) else {
            return;
        };
        let next = loop {
            match peer.rtc.poll_output() {
                Ok(Output::Timeout(t)) => break Some(t),
                Ok(Output::Transmit(t)) => {
                    self.outbox.push((t.destination, t.contents, ingress));
                }
                Ok(Output::Event(ev)) => match ev {
                    Event::Connected => {
                        if peer.liveness.on_connected() {
                            tracing::info!(room = %peer.room, participant = %peer.participant, "peer connected");
                        }
                        announce(peer, &self.mesh_tx);
                    }
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        peer.dead = Some(CloseReason::Disconnected);
                    }
                    Event::Closed => {
                        peer.dead = Some(CloseReason::Disconnected);
                    }
                    Event::RtpPacket(pkt) => {
                        self.metrics.rtp_in();
                        if !peer.publishing {
                            self.metrics.rtp_refused("not_publisher");
                            continue;
                        }
                        if !peer.may_send {
                            self.metrics.rtp_refused("muted");
                            continue;
                        }
                        announce(peer, &self.mesh_tx);
                        let level = rfc6464_level(pkt.header.ext_vals.audio_level);
                        let mut sink = Ingest {
                            relay: &mut self.relay,
                            links: &self.links,
                            metrics: &self.metrics,
                            inbound: &mut self.inbound,
                            last_relayed: &mut peer.last_relayed,
                            room: peer.room,
                            speaker: peer.participant.0,
                            level,
                            at: pkt.timestamp,
                        };
                        let (seq, ts) = (pkt.header.sequence_number, pkt.header.timestamp);
                        let Some(red) = peer
                            .red
                            .as_mut()
                            .filter(|r| r.red_pt == pkt.header.payload_type)
                        else {
                            sink.packet(seq, ts, &pkt.payload, || pkt.payload.clone());
                            continue;
                        };
                        // RED: forward the packets its redundancy recovers, then the primary.
                        let Ok(parsed) = crate::red::parse(&pkt.payload) else {
                            self.metrics.rtp_refused("bad_red");
                            continue;
                        };
                        let recovery = red.rx.receive(seq, ts, &parsed, *red.opus_pt);
                        if recovery.already_recovered() {
                            continue;
                        }
                        for r in recovery.packets() {
                            self.metrics.red_recovered();
                            sink.packet(r.seq, r.ts, r.payload, || Arc::from(r.payload));
                        }
                        let primary = parsed.primary().payload;
                        sink.packet(seq, ts, primary, || Arc::from(primary));
                    }
                    _ => {}
                },
                Err(e) => {
                    // A handshake that fails on a timer (OpenSSL gives up retransmitting).
                    if let Some(reason) = crate::dtls::take_handshake_failure() {
                        tracing::info!(room = %peer.room, participant = %peer.participant, %reason, "DTLS handshake failed");
                        peer.dead = Some(CloseReason::DtlsFailed);
                    } else {
                        tracing::debug!(room = %peer.room, participant = %peer.participant, error = %e, "poll_output failed");
                        peer.dead = Some(CloseReason::RtcFailed);
                    }
                    break None;
                }
            }
        };
        if !peer.rtc.is_alive() && peer.dead.is_none() {
            peer.dead = Some(CloseReason::Disconnected);
        }
        if let Some(reason) = peer.dead {
            self.remove(id, reason);
            return;
        }
        // A timeout in the past is due now; never schedule before `now` to avoid spinning.
        let at = next.unwrap_or(now + SWEEP_INTERVAL).max(now);
        if peer.next_timeout == Some(at) {
            return;
        }
        if let Some(old) = peer.next_timeout.replace(at) {
            self.timers.remove(&(old, id));
        }
        self.timers.insert((at, id));
    }

    /// Remove the peer without touching the participant's room membership (it was replaced).
    fn remove_peer_only(&mut self, id: PeerId) {
        if let Some(p) = self.table.get_mut(id) {
            // Make `remove` keep the participant: it has a newer PeerConnection.
            p.kind = SessionKind::WebSocket;
        }
        self.remove(id, CloseReason::Deleted);
    }

    fn remove(&mut self, id: PeerId, reason: CloseReason) {
        if let Some(ufrag) = self.table.ufrag(id) {
            self.links.ufrags.remove(ufrag);
        }
        let Some(mut p) = self.table.remove(id) else {
            return;
        };
        self.links.set_load(self.table.len());
        if let Some(t) = p.next_timeout {
            self.timers.remove(&(t, id));
        }
        p.rtc.disconnect();
        if self.by_participant.get(&p.participant) == Some(&id) {
            self.by_participant.remove(&p.participant);
        }
        if p.announced {
            let _ = self.mesh_tx.send(MeshEvent::PublisherDown {
                room: p.room,
                speaker: p.participant,
            });
        }
        if let Some(r) = self.rooms.get_mut(&p.room) {
            r.peers = r.peers.saturating_sub(1);
            if p.receiving {
                r.receivers.retain(|x| *x != id);
                self.occupancy.remove(p.room);
            }
            if p.publishing {
                r.selector.remove(p.participant.0);
            }
            if r.peers == 0 {
                self.rooms.remove(&p.room);
            }
        }
        if p.kind != SessionKind::WebSocket {
            // WHIP/WHEP sessions are participants: their end is a Leave.
            self.permissions.remove(&p.participant);
            self.sessions.leave(p.participant);
        }
        self.metrics.set_peers(self.links.total_load());
        tracing::info!(room = %p.room, participant = %p.participant, name = %p.name, reason = reason.as_str(), "peer removed");
    }
}

fn announce(peer: &mut Peer, mesh_tx: &mpsc::UnboundedSender<MeshEvent>) {
    if peer.publishing && peer.may_send && !peer.announced {
        peer.announced = true;
        let _ = mesh_tx.send(MeshEvent::PublisherUp {
            room: peer.room,
            speaker: peer.participant,
            name: peer.name.clone(),
        });
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
