//! The media core: every peer's str0m `Rtc` of one shard, slot selection and fan-out, as a
//! deterministic state machine in the quinn-proto mould. It is fed inputs with an explicit `now`
//! ([`MediaCore::handle_datagram`], [`MediaCore::handle_relay`], [`MediaCore::handle_command`] and
//! the request/reply commands such as [`MediaCore::add`], [`MediaCore::handle_timeout`]) and
//! drained by the driver ([`MediaCore::poll_transmit`] for batches of datagrams,
//! [`MediaCore::poll_relay`] for relay frames, [`MediaCore::poll_event`] for what the rest of the
//! edge must learn, [`MediaCore::poll_timeout`] for when to call again). No sockets, channels,
//! locks or clock reads: [`crate::media::driver`] does the I/O.
//!
//! It demultiplexes datagrams with [`PeerTable`], feeds them to str0m, drains `poll_output`
//! (transmits, events, next timeout), encodes allowed publishers' RTP packets as relay frames for
//! the origin and the other shards, forwards the room's loudest speakers (local publishers and
//! speakers relayed from other regions by the origin) into every interactive listener's slots
//! (as SRTP it protects itself, [`crate::srtp_out`], when it holds the listener's keys), and
//! removes peers on DELETE, kick, room end, ICE disconnect or inactivity. Decisions live in the
//! sans-IO parts ([`crate::slots`], [`crate::lifecycle`], [`crate::peers`]).

use super::api::{MediaControl, MediaEvent, NewPeer, PatchOutcome, RemoveOutcome};
use crate::batch::{Datagram, Outbox};
use crate::lifecycle::{CloseReason, PeerLiveness};
use crate::mesh::MeshEvent;
use crate::metrics::Metrics;
use crate::peers::{DropReason, InsertError, PeerId, PeerTable, Route};
use crate::red::RedReceiver;
use crate::sdpfrag::{IceFragment, PatchDecision};
use crate::signaling::SessionKind;
use crate::slots::{SlotSelector, SlotStream};
use crate::srtp_out::{RtpHeaderOut, SrtpSender};
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
use str0m::net::{DatagramRecv, Protocol, Receive};
use str0m::rtp::Extension;
use str0m::rtp::{RtpWrite, Ssrc};
use str0m::{Event as RtcEvent, IceConnectionState, Input, Output, Rtc};

/// Bytes reserved at a time for outgoing relay frames; frames are split off it, so the buffer is
/// reused once quinn has sent (dropped) the earlier ones.
const RELAY_BUF_CAPACITY: usize = 64 * 1024;
/// How often liveness is checked.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Cadence of `active_speakers` messages.
pub(crate) const ACTIVE_SPEAKERS_INTERVAL: Duration = Duration::from_millis(300);

/// Bytes reserved up front for the datagrams the fast path writes in one turn.
const OUTBOX_BYTES: usize = 64 * 1024;

/// A relay frame for the origin owning its room.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RelayOut {
    /// A local publisher's packet (an encoded `SpeakerAudio` frame), read at `at`; also for the
    /// other shards' listeners.
    Speaker {
        room: RoomId,
        frame: Bytes,
        at: Instant,
    },
    /// The publisher's previous frame again (`SpeakerRepeat`), for the origin only.
    Repeat { room: RoomId, frame: Bytes },
}

/// What the core tells its driver besides datagrams and relay frames.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// For signaling (active speakers, a WHIP/WHEP peer gone).
    Signal(MediaEvent),
    /// For the uplink's publisher announcements.
    Mesh(MeshEvent),
    /// A local ICE ufrag now belongs to this shard (for the shards' ufrag directory).
    UfragUp(String),
    /// A local ICE ufrag is gone.
    UfragDown(String),
    /// An interactive listener joined (`on`) or left a room's slots (for the occupancy counts).
    Receiving { room: RoomId, on: bool },
    /// This shard now serves this many peers.
    Peers(usize),
}

/// Fire-and-forget commands (those with a reply are methods: [`MediaCore::add`],
/// [`MediaCore::remove_session`], [`MediaCore::renegotiate`], [`MediaCore::patch`],
/// [`MediaCore::has_peer`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    /// The participant has a newer PeerConnection on another shard: drop the one here, keeping
    /// the participant.
    Supersede { participant: ParticipantId },
    /// The participant's WebSocket closed: drop its PeerConnection.
    RemoveParticipant { participant: ParticipantId },
    /// The origin says the room ended: drop its peers.
    EndRoom { room: RoomId },
    /// A permission change or close from signaling.
    Control(MediaControl),
    /// The edge is stopping: remove every peer.
    Shutdown,
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
    /// The negotiated one-byte extension ids of the audio level and the mid (looked up with the
    /// SSRC), for packets the fast path writes itself.
    level_ext: Option<u8>,
    mid_ext: Option<u8>,
}

struct Peer {
    /// Boxed: str0m's `Rtc` is ~11 KB, and inline it spread the fan-out's per-listener fields
    /// (key, participant, liveness, slots, SRTP context) one `Rtc` apart in the peer table, a
    /// cache miss each for every listener of every forwarded packet.
    rtc: Box<Rtc>,
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
    /// Packets were written to this peer's streams since its last timeout run: the ingress time
    /// of the earliest (see [`MediaCore::forward_inbound`]).
    written: Option<Instant>,
    /// The forwarding fast path's SRTP context, from the keys our DTLS provider exported when
    /// this peer's handshake finished (none for AES-256-GCM: str0m then sends its packets).
    srtp: Option<SrtpSender>,
    /// Where str0m sends this peer's DTLS, RTCP and RTP: the ICE pair the client nominated
    /// (learnt from str0m's non-STUN transmits; forgotten on an ICE restart until str0m shows
    /// it again), the fast path's destination.
    send_to: Option<SocketAddr>,
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

/// Per-room forwarding state on this shard.
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

/// Encodes relay frames into a reused buffer and queues them for the driver.
struct RelayEncoder {
    buf: BytesMut,
    out: VecDeque<RelayOut>,
}

impl RelayEncoder {
    /// Encode and queue `frame`; returns the encoded frame (to repeat with the next one).
    fn send(&mut self, frame: &RelayFrame<'_>, at: Instant, metrics: &Metrics) -> Option<Bytes> {
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
        self.out.push_back(RelayOut::Speaker {
            room: frame.room,
            frame: bytes.clone(),
            at,
        });
        Some(bytes)
    }

    /// Queue `previous` (an encoded `SpeakerAudio` frame of `room`) again as a `SpeakerRepeat`.
    fn repeat(&mut self, room: RoomId, previous: &[u8]) {
        if previous.len() < RELAY_HEADER_LEN {
            return;
        }
        if self.buf.capacity() < previous.len() {
            self.buf.reserve(RELAY_BUF_CAPACITY.max(previous.len()));
        }
        self.buf.clear();
        self.buf.extend_from_slice(previous);
        self.buf[1] = FrameKind::SpeakerRepeat as u8;
        let frame = self.buf.split().freeze();
        self.out.push_back(RelayOut::Repeat { room, frame });
    }
}

/// Where one publisher's Opus packets go: the relay encoder (origin and other shards), and the
/// queue of packets for this shard's listeners.
struct Ingest<'a> {
    relay: &'a mut RelayEncoder,
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
        let encoded = self.relay.send(&frame, self.at, self.metrics);
        // Relay protection: the previous packet rides again with this one.
        if let Some(prev) = std::mem::replace(self.last_relayed, encoded) {
            self.relay.repeat(self.room, &prev);
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

/// One media shard's state.
pub(crate) struct MediaCore {
    local: SocketAddr,
    shard: usize,
    table: PeerTable<Peer>,
    timers: BTreeSet<(Instant, PeerId)>,
    relay: RelayEncoder,
    metrics: Arc<Metrics>,
    rooms: HashMap<RoomId, MediaRoom>,
    by_participant: HashMap<ParticipantId, PeerId>,
    permissions: HashMap<ParticipantId, bool>,
    inbound: VecDeque<Inbound>,
    outbox: Outbox,
    events: VecDeque<Event>,
    scratch: Vec<PeerId>,
    /// Peers with packets written since their last timeout run, in write order.
    written: Vec<PeerId>,
    /// The time of the latest input: queued packets are forwarded at it when outputs are polled.
    now: Instant,
    active: Vec<ActiveSpeaker>,
    next_sweep: Instant,
    next_speakers: Instant,
    /// A peer whose ICE+DTLS has not connected this long after its answer is removed.
    connect_timeout: Duration,
}

impl MediaCore {
    /// Shard `shard`'s core at `now`; `local` is the address in our ICE candidate (the
    /// datagrams' destination as str0m sees it).
    pub(crate) fn new(
        now: Instant,
        local: SocketAddr,
        shard: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        MediaCore {
            local,
            shard,
            table: PeerTable::default(),
            timers: BTreeSet::new(),
            relay: RelayEncoder {
                buf: BytesMut::with_capacity(RELAY_BUF_CAPACITY),
                out: VecDeque::with_capacity(64),
            },
            metrics,
            rooms: HashMap::new(),
            by_participant: HashMap::new(),
            permissions: HashMap::new(),
            inbound: VecDeque::with_capacity(64),
            outbox: Outbox::with_capacity(256, OUTBOX_BYTES),
            events: VecDeque::new(),
            scratch: Vec::new(),
            written: Vec::with_capacity(256),
            now,
            active: Vec::new(),
            next_sweep: now + SWEEP_INTERVAL,
            next_speakers: now + ACTIVE_SPEAKERS_INTERVAL,
            connect_timeout: crate::lifecycle::DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Drop peers whose ICE+DTLS has not connected `timeout` after their answer (the edge's
    /// `ice_connect_timeout_secs`).
    pub(crate) fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The datagrams queued since the last call, if any: the driver sends them and clears the
    /// outbox (its capacity is kept, so the hot path allocates nothing). Speaker packets that
    /// arrived since the last call are forwarded first, all of them together (see
    /// [`MediaCore::forward_inbound`]).
    pub(crate) fn poll_transmit(&mut self) -> Option<&mut Outbox> {
        self.forward_inbound(self.now);
        (!self.outbox.is_empty()).then_some(&mut self.outbox)
    }

    /// The next relay frame for the origin (and, for a speaker frame, the other shards).
    pub(crate) fn poll_relay(&mut self) -> Option<RelayOut> {
        self.relay.out.pop_front()
    }

    /// The next event for the rest of the edge (forwarding what arrived first, as
    /// [`MediaCore::poll_transmit`] does: a listener can die on it).
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.forward_inbound(self.now);
        self.events.pop_front()
    }

    /// When [`MediaCore::handle_timeout`] is due: the earliest peer timer, liveness sweep or
    /// active-speaker report.
    pub(crate) fn poll_timeout(&self) -> Instant {
        let periodic = self.next_sweep.min(self.next_speakers);
        self.timers
            .first()
            .map_or(periodic, |(t, _)| (*t).min(periodic))
    }

    /// Run what is due at `now`: str0m timers, the liveness sweep, the active-speaker report.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.handle_timeouts(now);
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_INTERVAL;
            self.sweep(now);
        }
        if now >= self.next_speakers {
            self.next_speakers = now + ACTIVE_SPEAKERS_INTERVAL;
            self.active_speakers(now);
        }
    }

    /// Whether the peer of a STUN request naming `ufrag` is this shard's.
    pub(crate) fn has_ufrag(&self, ufrag: &str) -> bool {
        self.table.has_ufrag(ufrag)
    }

    /// Whether `addr` is a known address of one of this shard's peers.
    pub(crate) fn knows_addr(&self, addr: SocketAddr) -> bool {
        self.table.knows_addr(addr)
    }

    /// Whether the participant has a PeerConnection on this shard.
    pub(crate) fn has_peer(&self, participant: ParticipantId) -> bool {
        self.by_participant.contains_key(&participant)
    }

    /// Tear a session down (WHIP/WHEP DELETE) if `room` and `jti` are the session's.
    pub(crate) fn remove_session(
        &mut self,
        session: &str,
        room: RoomId,
        jti: &str,
    ) -> RemoveOutcome {
        match self.table.by_session(session) {
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
        }
    }

    /// Apply a fire-and-forget command.
    pub(crate) fn handle_command(&mut self, now: Instant, cmd: Command) {
        self.now = self.now.max(now);
        match cmd {
            Command::Supersede { participant } => {
                if let Some(&id) = self.by_participant.get(&participant) {
                    self.remove_peer_only(id);
                }
            }
            Command::RemoveParticipant { participant }
            | Command::Control(MediaControl::Close { participant }) => {
                self.permissions.remove(&participant);
                if let Some(&id) = self.by_participant.get(&participant) {
                    self.remove(id, CloseReason::Deleted);
                }
            }
            Command::EndRoom { room } => {
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
            Command::Control(MediaControl::Permission {
                participant,
                may_send,
            }) => {
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
            Command::Shutdown => {
                let ids: Vec<PeerId> = self.table.ids().collect();
                for id in ids {
                    self.remove(id, CloseReason::Shutdown);
                }
            }
        }
    }

    fn loaded(&mut self) {
        self.events.push_back(Event::Peers(self.table.len()));
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
                level_ext: kept.and_then(|s| s.level_ext),
                mid_ext: kept.and_then(|s| s.mid_ext),
            });
        }
        peer.slots = next;
    }

    /// Start serving a negotiated peer.
    pub(crate) fn add(&mut self, now: Instant, new: NewPeer) -> Result<(), InsertError> {
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
        let may_send = self
            .permissions
            .get(&participant)
            .copied()
            .unwrap_or(may_send);
        let red = red_in(&rtc);
        let mut peer = Peer {
            red,
            rtc: Box::new(rtc),
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
            written: None,
            srtp: None,
            send_to: None,
        };
        Self::set_slots(&mut peer, &slots);
        let receiving = peer.slots.iter().any(Option::is_some);
        peer.receiving = receiving;
        let id = self.table.insert(&ufrag, &session, peer)?;
        self.events.push_back(Event::UfragUp(ufrag));
        self.loaded();
        let r = self.rooms.entry(room).or_default();
        r.peers += 1;
        if receiving {
            r.receivers.push(id);
            self.events.push_back(Event::Receiving { room, on: true });
        }
        if let Some(old) = self.by_participant.insert(participant, id) {
            // A participant has one PeerConnection: the newer one replaces it.
            self.remove_peer_only(old);
        }
        tracing::info!(%room, %participant, publishing, receiving, kind = ?kind, shard = self.shard, "peer added");
        self.drain(id, now);
        Ok(())
    }

    /// A new offer on the participant's PeerConnection (promotion, demotion, ICE restart): the
    /// answer SDP.
    pub(crate) fn renegotiate(
        &mut self,
        now: Instant,
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
                let restarted = old.as_deref() != Some(ufrag.as_str());
                self.moved_ufrag(old, &ufrag);
                let peer = self.table.get_mut(id).ok_or("the PeerConnection is gone")?;
                if restarted {
                    // A restarted ICE may nominate another pair: learn it from str0m again.
                    peer.send_to = None;
                }
                peer
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
            self.events.push_back(Event::Mesh(MeshEvent::PublisherDown {
                room,
                speaker: participant,
            }));
            if let Some(r) = self.rooms.get_mut(&room) {
                r.selector.remove(participant.0);
            }
        }
        if let Some(r) = self.rooms.get_mut(&room) {
            if receiving && !was_receiving {
                r.receivers.push(id);
                self.events.push_back(Event::Receiving { room, on: true });
            } else if !receiving && was_receiving {
                r.receivers.retain(|x| *x != id);
                self.events.push_back(Event::Receiving { room, on: false });
            }
        }
        tracing::info!(%room, %participant, publishing, receiving, "renegotiated");
        self.drain(id, now);
        Ok(answer.to_sdp_string())
    }

    /// Keep the shards' ufrag directory in step with an ICE restart.
    fn moved_ufrag(&mut self, old: Option<String>, new: &str) {
        if let Some(old) = old.filter(|o| o != new) {
            self.events.push_back(Event::UfragDown(old));
        }
        self.events.push_back(Event::UfragUp(new.to_string()));
    }

    /// Apply a WHIP/WHEP `PATCH` to a session (RFC 9725 §4.3, decided by
    /// [`crate::sdpfrag::decide_patch`]). An ICE restart re-accepts the session's offer with the
    /// client's new credentials; trickled candidates (also those repeating the current
    /// credentials) need nothing from an ICE-lite edge, which learns addresses from checks.
    /// A request whose token is not the session's is answered [`PatchOutcome::RefreshNeeded`]
    /// until signaling has moved the session to it (same user and room, same role or lower:
    /// [`crate::sessions::Sessions::refresh`]) and says so with `refreshed`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &mut self,
        now: Instant,
        session: &str,
        room: RoomId,
        claims: &Claims,
        refreshed: bool,
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
            if !refreshed {
                return PatchOutcome::RefreshNeeded {
                    participant: peer.participant,
                };
            }
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
        if let Some(peer) = self.table.get_mut(id) {
            // A restarted ICE may nominate another pair: learn it from str0m again.
            peer.send_to = None;
        }
        tracing::info!(%room, %participant, "ICE restarted");
        self.drain(id, now);
        PatchOutcome::Restarted {
            fragment: crate::sdpfrag::answer_fragment(&answer),
            etag: format!("\"{ufrag}\""),
        }
    }

    /// A datagram from a client (read by this shard's socket, or handed over by another shard).
    /// A publisher's packet in it is forwarded when outputs are next polled.
    pub(crate) fn handle_datagram(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        self.now = self.now.max(now);
        self.datagram(now, source, data);
    }

    fn datagram(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        self.metrics.udp_datagram();
        let (id, new_addr) = match self.table.route(source, data) {
            Route::Peer(id) => (id, false),
            Route::NewAddr(id) => (id, true),
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
        if new_addr {
            // The client may move to this address: str0m's packets show where it sends next.
            peer.send_to = None;
        }
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

    /// A relay frame (another region's speaker from the origin, or a local publisher's from
    /// another shard) read at `at`.
    /// It is forwarded when outputs are next polled.
    pub(crate) fn handle_relay(&mut self, now: Instant, at: Instant, datagram: &[u8]) {
        self.now = self.now.max(now);
        self.relayed(datagram, at);
    }

    fn relayed(&mut self, datagram: &[u8], at: Instant) {
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

    /// Forward queued speaker packets into the slots of the room's receivers; the datagrams wait
    /// in the outbox for [`MediaCore::poll_transmit`]. A receiver on the SRTP fast path (its
    /// DTLS keys taken from our provider, its ICE pair known) gets each packet packetized and
    /// protected straight into the outbox's buffer ([`crate::srtp_out`]), str0m untouched. For
    /// the others every packet queued since the last call is written into str0m first, then each
    /// receiver that got any runs str0m's timeout and is drained once: str0m releases written
    /// media on a timeout, and that timeout walks the whole peer (ICE, DTLS, SCTP, every
    /// stream), so a burst costs one walk per receiver, not one per packet.
    fn forward_inbound(&mut self, now: Instant) {
        // Draining a receiver that also publishes can queue its packets: forward them too.
        while !self.inbound.is_empty() {
            self.forward_queued(now);
        }
    }

    /// One round of [`MediaCore::forward_inbound`]: the packets queued now.
    fn forward_queued(&mut self, now: Instant) {
        while let Some(pkt) = self.inbound.pop_front() {
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
            let level_byte = crate::srtp_out::audio_level_byte(pkt.level, pkt.level < 127);
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
                if slot.ssrc.is_none() {
                    learn_send_stream(&mut peer.rtc, slot);
                }
                let Some(ssrc) = slot.ssrc else {
                    continue;
                };
                // The stream's own sequence number is also its SRTP index: it starts at 1 for
                // every listener, so its rollover counter is 0 until 65,535 packets later.
                let index = seq - offset;
                if let (Some(srtp), Some(dest)) = (peer.srtp.as_mut(), peer.send_to) {
                    let header = RtpHeaderOut {
                        pt: *slot.pt,
                        seq: index as u16,
                        ts,
                        ssrc: *ssrc,
                        audio_level: slot.level_ext.map(|id| (id, level_byte)),
                        mid: slot.mid_ext.map(|id| (id, slot.mid.as_bytes())),
                    };
                    let start = self.outbox.buf.len();
                    if let Some(len) =
                        srtp.protect(&mut self.outbox.buf, &header, &pkt.payload, index)
                    {
                        let data = Datagram::Written {
                            start: start as u32,
                            len: len as u32,
                        };
                        self.outbox.items.push((dest, data, Some(pkt.at)));
                        self.metrics.rtp_forwarded();
                    }
                    continue;
                }
                let pt = slot.pt;
                let mut api = peer.rtc.direct_api();
                let Some(stream) = api.stream_tx(&ssrc) else {
                    continue;
                };
                stream.write_rtp(
                    RtpWrite::new(pt, index.into(), ts, now, pkt.payload.clone())
                        .ext_vals(ext.clone()),
                );
                self.metrics.rtp_forwarded();
                if peer.written.is_none() {
                    peer.written = Some(pkt.at);
                    self.written.push(id);
                }
            }
            self.scratch = targets;
        }
        // str0m releases written media on its next timeout: run it now, once per receiver, so
        // the packets leave in this batch instead of on the next loop turn.
        let written = std::mem::take(&mut self.written);
        for &id in &written {
            let Some(peer) = self.table.get_mut(id) else {
                continue;
            };
            let ingress = peer.written.take();
            self.metrics.forward_flush();
            if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
                tracing::debug!(participant = %peer.participant, error = %e, "timeout after write failed");
            }
            self.drain_tagged(id, now, ingress);
        }
        self.written = written;
        self.written.clear();
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
                self.events
                    .push_back(Event::Signal(MediaEvent::ActiveSpeakers {
                        room: *room_id,
                        speakers: list.clone(),
                    }));
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
        // Keys exported now are this peer's (a test's client may have left its own).
        drop(crate::dtls::take_exported_keying());
        let next = loop {
            match peer.rtc.poll_output() {
                Ok(Output::Timeout(t)) => break Some(t),
                Ok(Output::Transmit(t)) => {
                    // STUN answers go to whoever checked; everything else to the nominated pair.
                    if !is_stun(&t.contents) {
                        peer.send_to = Some(t.destination);
                    }
                    self.outbox
                        .items
                        .push((t.destination, Datagram::Rtc(t.contents), ingress));
                }
                Ok(Output::Event(ev)) => match ev {
                    RtcEvent::Connected => {
                        if peer.liveness.on_connected() {
                            tracing::info!(room = %peer.room, participant = %peer.participant, "peer connected");
                        }
                        announce(peer, &mut self.events);
                    }
                    RtcEvent::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        peer.dead = Some(CloseReason::Disconnected);
                    }
                    RtcEvent::Closed => {
                        peer.dead = Some(CloseReason::Disconnected);
                    }
                    RtcEvent::RtpPacket(pkt) => {
                        self.metrics.rtp_in();
                        if !peer.publishing {
                            self.metrics.rtp_refused("not_publisher");
                            continue;
                        }
                        if !peer.may_send {
                            self.metrics.rtp_refused("muted");
                            continue;
                        }
                        announce(peer, &mut self.events);
                        let level = rfc6464_level(pkt.header.ext_vals.audio_level);
                        let mut sink = Ingest {
                            relay: &mut self.relay,
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
        if let Some(keys) = crate::dtls::take_exported_keying() {
            peer.srtp = SrtpSender::new(
                &crate::dtls::crypto_provider(),
                keys.profile,
                &keys.material,
                keys.active,
            );
            tracing::info!(room = %peer.room, participant = %peer.participant, profile = %keys.profile, fast_path = peer.srtp.is_some(), "SRTP keys");
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
            self.events.push_back(Event::UfragDown(ufrag.to_string()));
        }
        let Some(mut p) = self.table.remove(id) else {
            return;
        };
        self.loaded();
        if let Some(t) = p.next_timeout {
            self.timers.remove(&(t, id));
        }
        p.rtc.disconnect();
        if self.by_participant.get(&p.participant) == Some(&id) {
            self.by_participant.remove(&p.participant);
        }
        if p.announced {
            self.events.push_back(Event::Mesh(MeshEvent::PublisherDown {
                room: p.room,
                speaker: p.participant,
            }));
        }
        if let Some(r) = self.rooms.get_mut(&p.room) {
            r.peers = r.peers.saturating_sub(1);
            if p.receiving {
                r.receivers.retain(|x| *x != id);
                self.events.push_back(Event::Receiving {
                    room: p.room,
                    on: false,
                });
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
            self.events.push_back(Event::Signal(MediaEvent::PeerGone {
                participant: p.participant,
            }));
        }
        tracing::info!(room = %p.room, participant = %p.participant, name = %p.name, reason = reason.as_str(), "peer removed");
    }
}

/// Whether a datagram str0m sends is STUN (RFC 7983: first byte 0..=3).
fn is_stun(data: &[u8]) -> bool {
    data.first().is_some_and(|b| *b <= 3)
}

/// Look up a slot's send stream: its SSRC, and the audio level and mid extension ids the fast
/// path writes.
fn learn_send_stream(rtc: &mut Rtc, slot: &mut SlotOut) {
    slot.ssrc = rtc
        .direct_api()
        .stream_tx_by_mid(slot.mid, None)
        .map(|s| s.ssrc());
    if let Some(media) = rtc.media(slot.mid) {
        let exts = media.remote_extmap();
        slot.level_ext = exts.id_of(Extension::AudioLevel);
        slot.mid_ext = exts.id_of(Extension::RtpMid);
    }
}

fn announce(peer: &mut Peer, events: &mut VecDeque<Event>) {
    if peer.publishing && peer.may_send && !peer.announced {
        peer.announced = true;
        events.push_back(Event::Mesh(MeshEvent::PublisherUp {
            room: peer.room,
            speaker: peer.participant,
            name: peer.name.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    //! The core driven with real str0m client peers over simulated time: datagrams are carried
    //! between the clients' `Rtc`s and the core by hand, `now` advances by explicit steps.

    use super::*;
    use str0m::media::{Direction, MediaKind};
    use str0m::{Candidate, IceCreds};

    const EDGE: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40_000);
    const ROOM: RoomId = RoomId(0x00ab_cdef_0123_4567);
    const STEP: Duration = Duration::from_millis(5);

    /// A client: its str0m peer, its address, its send mid (a publisher) and what it received.
    struct Client {
        rtc: Rtc,
        addr: SocketAddr,
        participant: ParticipantId,
        send: Option<Mid>,
        connected: bool,
        /// (mid, sequence number, payload) of every RTP packet received.
        received: Vec<(Mid, u64, Vec<u8>)>,
        next_seq: u64,
        /// Whether it still answers (a client that stops answering drops everything).
        alive: bool,
    }

    impl Client {
        /// Drain the client's outputs: its datagrams for the edge go to `to_edge` (unless it
        /// stopped answering), its events are recorded.
        fn poll(&mut self, to_edge: &mut Vec<(SocketAddr, Vec<u8>)>) {
            loop {
                match self.rtc.poll_output().unwrap() {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) => {
                        if self.alive {
                            to_edge.push((self.addr, t.contents.to_vec()));
                        }
                    }
                    Output::Event(RtcEvent::Connected) => self.connected = true,
                    Output::Event(RtcEvent::RtpPacket(p)) => {
                        let mid = p.header.ext_vals.mid.unwrap_or(Mid::from("?"));
                        self.received.push((mid, *p.seq_no, p.payload.to_vec()));
                    }
                    Output::Event(_) => {}
                }
            }
        }
    }

    /// A harness: one core and its clients.
    struct Bed {
        core: MediaCore,
        /// Participant id of the first client (ids must differ between beds used together).
        first_id: u32,
        clients: Vec<Client>,
        now: Instant,
        events: Vec<Event>,
        relays: Vec<RelayOut>,
    }

    impl Bed {
        fn new() -> Bed {
            crate::install_crypto_provider();
            let now = Instant::now();
            let metrics = Arc::new(Metrics::new("test"));
            Bed {
                core: MediaCore::new(now, EDGE, 0, metrics),
                first_id: 100,
                clients: Vec::new(),
                now,
                events: Vec::new(),
                relays: Vec::new(),
            }
        }

        /// Add a client with `slots` receive m-lines, publishing if `publish`; returns its index.
        fn join(&mut self, publish: bool, slots: usize) -> usize {
            let k = self.clients.len();
            let addr = SocketAddr::new(EDGE.ip(), 50_000 + k as u16);
            let mut rtc = Rtc::builder()
                .set_rtp_mode(true)
                .clear_codecs()
                .enable_opus(true, false)
                .build(self.now);
            rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
            let mut change = rtc.sdp_api();
            let send = publish
                .then(|| change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
            let recv: Vec<Mid> = (0..slots)
                .map(|_| change.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None))
                .collect();
            let (offer, pending) = change.apply().unwrap();
            let offer_sdp = offer.to_sdp_string();
            let creds = IceCreds::new();
            let ufrag = creds.ufrag.clone();
            let mut edge = crate::admission::publisher_rtc(creds, self.now);
            edge.add_local_candidate(Candidate::host(EDGE, "udp").unwrap());
            let answer = edge.sdp_api().accept_offer(offer).unwrap();
            rtc.sdp_api().accept_answer(pending, answer).unwrap();
            let participant = ParticipantId(self.first_id + k as u32);
            let peer = NewPeer {
                session: format!("{k:032x}"),
                ufrag,
                rtc: edge,
                room: ROOM,
                participant,
                name: format!("client {k}"),
                jti: format!("jti-{k}"),
                kind: if publish {
                    SessionKind::Whip
                } else {
                    SessionKind::Whep
                },
                publishing: publish,
                may_send: publish,
                slots: recv,
                offer_sdp,
            };
            self.core.add(self.now, peer).unwrap();
            self.clients.push(Client {
                rtc,
                addr,
                participant,
                send,
                connected: false,
                received: Vec::new(),
                next_seq: 1,
                alive: true,
            });
            k
        }

        /// Carry datagrams both ways until nothing moves, then advance `now` by `STEP` and run
        /// what is due; `steps` times.
        fn run(&mut self, steps: usize) {
            self.run_by(steps, STEP);
        }

        /// [`Bed::run`] with steps of `step`.
        fn run_by(&mut self, steps: usize, step: Duration) {
            for _ in 0..steps {
                for _ in 0..100 {
                    let mut moved = false;
                    let mut to_edge = Vec::new();
                    for c in &mut self.clients {
                        c.poll(&mut to_edge);
                    }
                    for (addr, data) in to_edge.drain(..) {
                        moved = true;
                        self.core.handle_datagram(self.now, addr, &data);
                    }
                    if let Some(out) = self.core.poll_transmit() {
                        moved = true;
                        let batch = std::mem::take(out);
                        for (dest, data, _) in &batch.items {
                            let dest = *dest;
                            let Some(c) = self.clients.iter_mut().find(|c| c.addr == dest) else {
                                continue;
                            };
                            if !c.alive {
                                continue;
                            }
                            let input = Input::Receive(
                                self.now,
                                Receive {
                                    proto: Protocol::Udp,
                                    source: EDGE,
                                    destination: dest,
                                    contents: DatagramRecv::try_from(batch.bytes(data)).unwrap(),
                                },
                            );
                            c.rtc.handle_input(input).unwrap();
                            // str0m wants its outputs drained after every input.
                            c.poll(&mut to_edge);
                        }
                        for (addr, data) in to_edge.drain(..) {
                            self.core.handle_datagram(self.now, addr, &data);
                        }
                    }
                    while let Some(ev) = self.core.poll_event() {
                        self.events.push(ev);
                    }
                    while let Some(r) = self.core.poll_relay() {
                        self.relays.push(r);
                    }
                    if !moved {
                        break;
                    }
                }
                self.now += step;
                for c in &mut self.clients {
                    c.rtc.handle_input(Input::Timeout(self.now)).unwrap();
                }
                if self.core.poll_timeout() <= self.now {
                    self.core.handle_timeout(self.now);
                }
            }
        }

        /// Client `k` sends one Opus packet at RFC 6464 level `level`.
        fn speak(&mut self, k: usize, level: u8) {
            let now = self.now;
            let c = &mut self.clients[k];
            let mid = c.send.unwrap();
            let seq = c.next_seq;
            c.next_seq += 1;
            let pt = c.rtc.codec_config().params()[0].pt();
            let mut api = c.rtc.direct_api();
            let stream = api.stream_tx_by_mid(mid, None).unwrap();
            let ext = ExtensionValues {
                audio_level: Some(-(level as i8)),
                voice_activity: Some(level < 127),
                ..Default::default()
            };
            stream.write_rtp(
                RtpWrite::new(
                    pt,
                    seq.into(),
                    (seq * 960) as u32,
                    now,
                    vec![k as u8, seq as u8],
                )
                .ext_vals(ext),
            );
        }

        fn connected(&self) -> bool {
            self.clients.iter().all(|c| c.connected)
        }

        /// Speakers (by client index, from the payload) client `k` heard, in order.
        fn heard(&self, k: usize) -> Vec<u8> {
            self.clients[k]
                .received
                .iter()
                .map(|(_, _, p)| p[0])
                .collect()
        }
    }

    /// An encoded relay frame of `speaker` in `room`.
    fn relay_frame(room: RoomId, speaker: u32, seq: u16, payload: &[u8]) -> Vec<u8> {
        let frame = RelayFrame {
            kind: FrameKind::SpeakerAudio,
            room,
            speaker,
            seq,
            rtp_ts: u32::from(seq) * 960,
            audio_level: 20,
            payload,
        };
        let mut buf = vec![0; frame.encoded_len()];
        let n = frame.encode_into(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn a_louder_speaker_takes_a_slot_only_after_the_dwell_and_margin() {
        let mut bed = Bed::new();
        let quiet: Vec<usize> = (0..LISTENER_AUDIO_SLOTS)
            .map(|_| bed.join(true, 0))
            .collect();
        let loud = bed.join(true, 0);
        let _listener = bed.join(false, LISTENER_AUDIO_SLOTS);
        bed.run(200);
        assert!(bed.connected());
        let id = |bed: &Bed, k: usize| bed.clients[k].participant.0;
        // The quiet speakers fill the slots; the loud one arrives at once and must wait.
        let mut took = None;
        for round in 0..60 {
            for &k in &quiet {
                bed.speak(k, 60);
            }
            bed.speak(loud, 10);
            bed.run(4);
            let slots = bed.core.rooms[&ROOM].selector.slots();
            if took.is_none() && slots.contains(&Some(id(&bed, loud))) {
                took = Some(round);
            }
        }
        let took = took.expect("the loud speaker got a slot");
        // 20 ms a round: the first slot holders have held their slots MIN_DWELL by round 25.
        let dwell_rounds = (crate::slots::MIN_DWELL.as_millis() / 20) as usize;
        assert!(
            took + 1 >= dwell_rounds,
            "switched after {took} rounds, before the dwell"
        );
        assert!(
            took <= dwell_rounds + 5,
            "switched only after {took} rounds"
        );
        // Exactly one quiet speaker lost its slot; the other two kept theirs to the end.
        let slots = bed.core.rooms[&ROOM].selector.slots();
        let kept = quiet
            .iter()
            .filter(|&&k| slots.contains(&Some(id(&bed, k))))
            .count();
        assert_eq!(kept, LISTENER_AUDIO_SLOTS - 1, "{slots:?}");
    }

    #[test]
    fn relayed_speakers_reach_listeners_and_local_echoes_are_dropped() {
        let mut bed = Bed::new();
        let speaker = bed.join(true, 0);
        let listener = bed.join(false, LISTENER_AUDIO_SLOTS);
        bed.run(200);
        assert!(bed.connected());
        let (now, local) = (bed.now, bed.clients[speaker].participant.0);
        for seq in 1..=5u16 {
            bed.core
                .handle_relay(now, now, &relay_frame(ROOM, 9_000, seq, &[77, seq as u8]));
            // The origin echoing a local publisher, another room, garbage: all dropped.
            bed.core
                .handle_relay(now, now, &relay_frame(ROOM, local, seq, &[66, seq as u8]));
            bed.core.handle_relay(
                now,
                now,
                &relay_frame(RoomId(1), 9_001, seq, &[55, seq as u8]),
            );
            bed.core.handle_relay(now, now, &[0xff, 1, 2]);
            bed.run(4);
        }
        assert_eq!(bed.heard(listener), vec![77; 5]);
        assert!(
            bed.relays.is_empty(),
            "relayed speakers are not relayed again"
        );
    }

    /// Three speakers' packets that arrive in one turn of the driver's loop are written into
    /// every listener's slots first; each listener then runs str0m's timeout once (not once per
    /// packet) and still receives all three.
    #[test]
    fn a_burst_of_speaker_packets_is_protected_by_the_fast_path_without_str0m_runs() {
        let mut bed = Bed::new();
        let listeners = [
            bed.join(false, LISTENER_AUDIO_SLOTS),
            bed.join(false, LISTENER_AUDIO_SLOTS),
            bed.join(false, LISTENER_AUDIO_SLOTS),
        ];
        bed.run(200);
        assert!(bed.connected());
        let ids: Vec<PeerId> = bed.core.table.ids().collect();
        for &id in &ids {
            let peer = bed.core.table.get_mut(id).unwrap();
            assert!(
                peer.srtp.is_some() && peer.send_to.is_some(),
                "fast path ready"
            );
        }
        // The third listener goes through str0m (as a peer on AES-256-GCM would).
        bed.core.table.get_mut(ids[2]).unwrap().srtp = None;
        let now = bed.now;
        let (forwarded, flushes) = bed.core.metrics.forwarding();
        for (i, speaker) in [9_000u32, 9_001, 9_002].into_iter().enumerate() {
            let frame = relay_frame(ROOM, speaker, 1, &[70 + i as u8]);
            bed.core.handle_relay(now, now, &frame);
        }
        bed.run(1);
        let (forwarded_after, flushes_after) = bed.core.metrics.forwarding();
        assert_eq!(forwarded_after - forwarded, 9, "3 packets x 3 listeners");
        assert_eq!(
            flushes_after - flushes,
            1,
            "one timeout run, for the listener str0m protects"
        );
        for k in listeners {
            let mut heard = bed.heard(k);
            heard.sort_unstable();
            assert_eq!(heard, [70, 71, 72]);
        }
    }

    /// The fast path's SRTP index is the listener's own extended sequence number: str0m's
    /// receiver opens packets past 65,535 (rollover counter 1), and a listener that joins then
    /// starts its stream at 1 (rollover counter 0), as a receiver expects (str0m PR #1036).
    #[test]
    fn listeners_open_packets_across_a_rollover_and_late_joiners_start_at_zero() {
        let mut bed = Bed::new();
        let early = bed.join(false, LISTENER_AUDIO_SLOTS);
        bed.run(200);
        assert!(bed.connected());
        // Jumps of 2,900 (a loss a stream may have: under the 3,000 after which the slot takes
        // it for a restarted stream) carry the slot's stream past 65,535 in 24 packets.
        const STEP: u16 = 2_900;
        let mut seq = 1u16;
        let mut send = |bed: &mut Bed, payload: u8| {
            let now = bed.now;
            let frame = RelayFrame {
                kind: FrameKind::SpeakerAudio,
                room: ROOM,
                speaker: 9_000,
                seq,
                rtp_ts: u32::from(payload) * u32::from(STEP) * 960,
                audio_level: 20,
                payload: &[payload],
            };
            let mut buf = vec![0; frame.encoded_len()];
            let n = frame.encode_into(&mut buf).unwrap();
            bed.core.handle_relay(now, now, &buf[..n]);
            bed.run(1);
            seq = seq.wrapping_add(STEP);
        };
        for i in 0..24 {
            send(&mut bed, i);
        }
        let late = bed.join(false, LISTENER_AUDIO_SLOTS);
        bed.run(200);
        assert!(bed.connected());
        for i in 24..26 {
            send(&mut bed, i);
        }
        assert_eq!(bed.heard(early), (0..26).collect::<Vec<u8>>());
        assert_eq!(bed.heard(late), [24, 25]);
        let seqs =
            |k: usize| -> Vec<u64> { bed.clients[k].received.iter().map(|(_, s, _)| *s).collect() };
        let expect: Vec<u64> = (0..26).map(|i| 1 + i * u64::from(STEP)).collect();
        assert!(expect[23] > 65_535, "past the rollover");
        assert_eq!(seqs(early), expect);
        assert_eq!(seqs(late), [1, 1 + u64::from(STEP)]);
    }

    #[test]
    fn a_speaker_on_one_shard_reaches_listeners_on_another() {
        let mut a = Bed::new();
        let mut b = Bed::new();
        b.first_id = 200;
        let speaker = a.join(true, 0);
        let listener = b.join(false, LISTENER_AUDIO_SLOTS);
        a.run(200);
        b.run(200);
        assert!(a.connected() && b.connected());
        for _ in 0..6 {
            a.speak(speaker, 20);
            a.run(4);
            for out in a.relays.drain(..) {
                if let RelayOut::Speaker { frame, at, .. } = out {
                    b.core.handle_relay(b.now, at, &frame);
                }
            }
            b.run(4);
        }
        assert_eq!(b.heard(listener), vec![speaker as u8; 6]);
    }

    #[test]
    fn a_peer_that_stops_answering_is_removed_and_signaling_told() {
        let mut bed = Bed::new();
        let speaker = bed.join(true, 0);
        let listener = bed.join(false, LISTENER_AUDIO_SLOTS);
        bed.run(200);
        assert!(bed.connected());
        bed.clients[listener].alive = false;
        let gone = Event::Signal(MediaEvent::PeerGone {
            participant: bed.clients[listener].participant,
        });
        let step = Duration::from_millis(250);
        let mut waited = Duration::ZERO;
        while !bed.events.contains(&gone) && waited < crate::lifecycle::IDLE_TIMEOUT * 2 {
            bed.speak(speaker, 20);
            bed.run_by(1, step);
            waited += step;
        }
        assert!(bed.events.contains(&gone), "listener removed");
        assert!(waited <= crate::lifecycle::IDLE_TIMEOUT + Duration::from_secs(2));
        assert!(bed.events.contains(&Event::Receiving {
            room: ROOM,
            on: false
        }));
        assert!(bed.core.has_peer(bed.clients[speaker].participant));
        assert!(!bed.core.has_peer(bed.clients[listener].participant));
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

    #[test]
    fn a_publisher_fans_out_to_every_listener_and_to_the_relay() {
        let mut bed = Bed::new();
        let speaker = bed.join(true, 0);
        let listeners: Vec<usize> = (0..8).map(|_| bed.join(false, 3)).collect();
        bed.run(200);
        assert!(bed.connected(), "every client connected");
        for _ in 0..10 {
            bed.speak(speaker, 20);
            bed.run(4);
        }
        for &k in &listeners {
            let got = &bed.clients[k].received;
            assert_eq!(got.len(), 10, "listener {k} got every packet");
            assert!(got.iter().all(|(_, _, p)| p[0] == speaker as u8));
        }
        let speakers = bed
            .relays
            .iter()
            .filter(|r| matches!(r, RelayOut::Speaker { room, .. } if *room == ROOM))
            .count();
        assert_eq!(speakers, 10, "each packet relayed to the origin once");
        let repeats = bed
            .relays
            .iter()
            .filter(|r| matches!(r, RelayOut::Repeat { .. }))
            .count();
        assert_eq!(
            repeats, 9,
            "each packet but the first repeats the previous one"
        );
        assert!(bed.events.contains(&Event::Mesh(MeshEvent::PublisherUp {
            room: ROOM,
            speaker: bed.clients[speaker].participant,
            name: format!("client {speaker}"),
        })));
    }
}
