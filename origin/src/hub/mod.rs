//! QUIC hub driver: accepts edge, packager and geo-router connections, runs their control
//! streams, relays speaker datagrams to subscribed edges and feeds the mixer thread. What to do
//! with each message, datagram and departure is decided by the sans-IO [`core::HubCore`]; this
//! module moves bytes, reads the clock and the store, and carries the core's outputs to the
//! peers' queues (`PeerLink`) and to the mixer and the state writer (`DriverSink`).
//!
//! Every message to a peer goes through that peer's one outbound queue (replies too), so a peer
//! receives messages in the order the hub produced them. An edge that already holds a room's
//! state keeps it current from the events, so a room of N participants costs O(N) snapshot bytes
//! per edge, not per join.

pub mod core;

use self::core::{kind_of, HubCore, HubSink, Link, MixerNote, Moment, Violation};
use crate::metrics::{DropReason, Metrics};
use crate::mixer_thread::{MixerCmd, ProgramClock};
use crate::peerq::{peer_queue, PeerReceiver, PeerSender, TooSlow, PEER_QUEUE};
use crate::persist::{Persister, RoomStore};
use crate::room::{AuthorityCensus, Room};
use amphi_common::mtls::roles_of;
use amphi_protocol::control::{
    snapshot_records, ControlDecoder, ControlError, ControlMessage, PeerKind,
    SNAPSHOT_RECORD_BUDGET,
};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::room::RoomEvent;
use amphi_protocol::RoomId;
use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a new connection has to open its control stream and say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC application close code: normal shutdown.
const CLOSE_OK: u32 = 0;
/// QUIC application close code: protocol violation.
const CLOSE_PROTOCOL: u32 = 1;

/// Wait for a busy room's lock without stalling the runtime: on a multi-threaded tokio runtime
/// the waiting worker hands its other tasks (the relay's datagram loops, other rooms' control
/// streams, the QUIC endpoint) to another thread meanwhile. Elsewhere the thread just waits.
fn wait_in_place(wait: &mut dyn FnMut()) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// The clock, read once per input.
fn moment() -> Moment {
    Moment {
        at: Instant::now(),
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }
}

/// A mesh peer as the driver reaches it: its control queue and, for edges, its QUIC
/// connection (datagrams).
#[derive(Clone)]
pub(crate) struct PeerLink {
    control: PeerSender,
    datagrams: Option<quinn::Connection>,
}

impl Link for PeerLink {
    fn control(&self, msg: ControlMessage) {
        // An overflow is the receiving loop's to act on (it disconnects the peer).
        let _ = self.control.send(msg);
    }

    fn datagram(&self, datagram: Bytes) -> bool {
        self.datagrams
            .as_ref()
            .is_some_and(|c| c.send_datagram(datagram).is_ok())
    }
}

/// The mixer thread's lossless queue, its program positions and the state writer, as the
/// core's sink.
struct DriverSink {
    mixer: mpsc::UnboundedSender<MixerCmd>,
    clock: Arc<ProgramClock>,
    persister: Option<Arc<Persister>>,
}

impl HubSink for DriverSink {
    fn mixer(&self, note: MixerNote) {
        let _ = self.mixer.send(MixerCmd::from(note));
    }

    fn program_ms(&self, room: RoomId) -> Option<u64> {
        self.clock.position_ms(room)
    }

    fn save_changes(&self, room: &Room, events: &[RoomEvent]) {
        if let Some(p) = &self.persister {
            p.save_changes(room.id(), room.changes(events));
        }
    }

    fn save(&self, room: &Room) {
        if let Some(p) = &self.persister {
            p.save(&room.persisted());
        }
    }

    fn hold(&self, room: RoomId) {
        if let Some(p) = &self.persister {
            p.hold(room);
        }
    }

    fn release(&self, room: RoomId) {
        if let Some(p) = &self.persister {
            p.release(room);
        }
    }
}

/// The hub: the core and what drives it.
pub(crate) struct Hub {
    origin_id: String,
    metrics: Arc<Metrics>,
    core: HubCore<PeerLink>,
    /// Speaker packets for the mixer (bounded, lossy).
    packets: mpsc::Sender<MixerCmd>,
    /// Packagers coming and going, for the mixer (lossless).
    control: mpsc::UnboundedSender<MixerCmd>,
    next_id: AtomicU64,
    /// Where durable room state is loaded from.
    store: Option<RoomStore>,
}

/// Why a control stream is being closed.
enum Failure {
    /// The peer broke the protocol: tell it and close the connection.
    Protocol { code: &'static str, message: String },
    /// The stream or connection went away.
    Gone,
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        Failure::Protocol {
            code: "malformed",
            message: e.to_string(),
        }
    }
}

/// Reads control records from a stream.
struct ControlReader {
    recv: quinn::RecvStream,
    decoder: ControlDecoder,
    buf: Box<[u8; 4096]>,
}

impl ControlReader {
    /// The next message; `Ok(None)` when the peer finished the stream. Cancel-safe.
    async fn next(&mut self) -> Result<Option<ControlMessage>, Failure> {
        loop {
            match self.decoder.next_message() {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                // An oversized record is refused alone; the link goes on.
                Err(e @ ControlError::TooLong { .. }) => {
                    tracing::warn!(error = %e, "control record refused");
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            match self.recv.read(&mut self.buf[..]).await {
                Ok(Some(n)) => self.decoder.feed(&self.buf[..n]),
                Ok(None) => return Ok(None),
                Err(_) => return Err(Failure::Gone),
            }
        }
    }
}

/// The wire bytes of one queued control message. A whole `RoomSnapshot` (queued by a join
/// under the room's lock as one message) is split here into records under the control record
/// limit, so its serialisation never runs under that lock.
fn wire_bytes(msg: ControlMessage) -> Vec<u8> {
    match msg {
        ControlMessage::RoomSnapshot { state, more: false } => {
            let mut out = Vec::new();
            for record in snapshot_records(state, SNAPSHOT_RECORD_BUDGET) {
                out.extend(record.to_record());
            }
            out
        }
        other => other.to_record(),
    }
}

impl Hub {
    /// A hub that sends mixer input to `packets` (bounded, lossy) and `control` (lossless).
    pub(crate) fn new(
        origin_id: String,
        metrics: Arc<Metrics>,
        packets: mpsc::Sender<MixerCmd>,
        control: mpsc::UnboundedSender<MixerCmd>,
        durable: Option<(RoomStore, Arc<Persister>)>,
        clock: Arc<ProgramClock>,
        rooms: crate::room::RoomsConfig,
    ) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let (store, persister) = durable.unzip();
        let sink = DriverSink {
            mixer: control.clone(),
            clock,
            persister,
        };
        // Random per process: report ids are this and a counter (unique over origins and
        // restarts without coordination).
        let report_nonce = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Hub {
            origin_id,
            core: HubCore::new(
                metrics.clone(),
                rooms,
                wait_in_place,
                Box::new(sink),
                report_nonce,
            ),
            metrics,
            packets,
            control,
            next_id: AtomicU64::new(1),
            store,
        }
    }

    /// Before a room's first use on this origin, take back its stored state (if a store is
    /// configured and holds it). A store failure is logged and the room starts afresh.
    async fn ensure_loaded(&self, room: RoomId) {
        if self.store.is_some() && self.core.needs_store_read(room) {
            self.load(room, false).await;
        }
    }

    /// Read `room`'s stored state and hand it to the core. If the store cannot be read the
    /// room runs unverified ([`HubCore::store_unreadable`]). `false` if the store could not be
    /// read.
    async fn load(&self, room: RoomId, probe: bool) -> bool {
        let Some(store) = &self.store else {
            return true;
        };
        // A join does not wait on a Redis that failed moments ago; the reverification probes it.
        let read = async {
            if probe {
                store.load(room).await
            } else {
                store.load_unless_failing(room).await
            }
        };
        // The store bounds each read (a timeout is an error like any other).
        match read.await {
            Ok(saved) => {
                self.core.store_read(room, saved, moment());
                true
            }
            Err(e) => {
                tracing::warn!(%room, error = %e, "stored room state unavailable; the room runs unverified, its snapshots held");
                self.core.store_unreadable(room);
                false
            }
        }
    }

    /// Retry the stored state of unverified rooms (called every second); stops at the first
    /// failure (the store is still away).
    pub(crate) async fn reverify(&self) {
        for room in self.core.unverified_rooms() {
            if !self.load(room, true).await {
                return;
            }
        }
    }

    /// The authoritative state of `room`, if it is held.
    pub(crate) fn room_state(&self, room: RoomId) -> Option<amphi_protocol::room::RoomState> {
        self.core.room_state(room)
    }

    /// The room authority's live rooms and participants (for metrics).
    pub(crate) fn census(&self) -> AuthorityCensus {
        self.core.census()
    }

    /// Participants of restored rooms that no edge re-announced in time leave.
    pub(crate) fn sweep_unclaimed(&self, now: Instant) {
        self.core.sweep_unclaimed(now);
    }

    /// The mixer found `room` idle past its timeout: end it.
    pub(crate) fn end_idle_room(&self, room: RoomId) {
        self.core.end_idle_room(room, moment());
    }

    /// Accept connections until `shutdown`.
    pub(crate) async fn accept_loop(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        shutdown: CancellationToken,
    ) {
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let hub = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => hub.connection(conn, shutdown).await,
                    Err(e) => tracing::debug!(%remote, error = %e, "QUIC handshake failed"),
                }
            });
        }
    }

    async fn connection(self: Arc<Self>, conn: quinn::Connection, shutdown: CancellationToken) {
        let id = self.next_id.fetch_add(1, Relaxed);
        let remote = conn.remote_address();
        let (mut send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok(streams)) => streams,
            _ => {
                tracing::debug!(%remote, "no control stream");
                conn.close(CLOSE_PROTOCOL.into(), b"no control stream");
                return;
            }
        };
        let mut reader = ControlReader {
            recv,
            decoder: ControlDecoder::default(),
            buf: Box::new([0; 4096]),
        };
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) | Ok(Err(Failure::Gone)) => return,
            Err(_) => Err(Failure::Protocol {
                code: "timeout",
                message: "no hello".into(),
            }),
            Ok(Err(f)) => Err(f),
        };
        let (peer, peer_id, region) = match hello {
            Ok(ControlMessage::Hello { peer, id, region }) => (peer, id, region),
            Ok(other) => {
                let f = Failure::Protocol {
                    code: "expected_hello",
                    message: format!("first record must be hello, got {}", kind_of(&other)),
                };
                self.fail(&conn, &mut send, f).await;
                return;
            }
            Err(f) => {
                self.fail(&conn, &mut send, f).await;
                return;
            }
        };
        if let Err(message) = peer_may_act_as(&conn, peer) {
            self.metrics.role_refusals.inc();
            tracing::warn!(%remote, peer = %peer_id, ?peer, %message, "mesh peer refused: its certificate does not allow the role it claims");
            let f = Failure::Protocol {
                code: "forbidden_role",
                message,
            };
            self.fail(&conn, &mut send, f).await;
            return;
        }
        let welcome = ControlMessage::Welcome {
            origin: self.origin_id.clone(),
        };
        if send.write_all(&welcome.to_record()).await.is_err() {
            return;
        }
        tracing::info!(%remote, peer = %peer_id, %region, ?peer, "mesh peer connected");
        let (ctl_tx, ctl_rx) = peer_queue(PEER_QUEUE, self.metrics.control_overflows.clone());
        let own = PeerLink {
            control: ctl_tx.clone(),
            datagrams: (peer == PeerKind::Edge).then(|| conn.clone()),
        };
        match peer {
            PeerKind::Edge => {
                self.metrics.edges.inc();
            }
            PeerKind::Packager => {
                let _ = self.control.send(MixerCmd::PackagerUp {
                    id,
                    conn: conn.clone(),
                    control: ctl_tx,
                });
                self.metrics.packagers.inc();
            }
            PeerKind::Router => {}
        }
        self.core.connected(id, peer, own.clone(), moment());
        let datagrams = tokio::spawn(self.clone().datagram_loop(conn.clone(), id, peer));
        let result = self
            .control_loop(
                id,
                peer,
                &peer_id,
                &mut reader,
                &mut send,
                (&own, ctl_rx),
                &shutdown,
            )
            .await;
        drop(own);
        // On shutdown an edge's participants stay in the stored state: their edges re-announce
        // them to the restarted origin.
        let leave = !shutdown.is_cancelled();
        self.core.disconnected(id, peer, &peer_id, leave, moment());
        match peer {
            PeerKind::Edge => {
                self.metrics.edges.dec();
            }
            PeerKind::Packager => {
                let _ = self.control.send(MixerCmd::PackagerDown { id });
                self.metrics.packagers.dec();
            }
            PeerKind::Router => {}
        }
        match result {
            Err(f @ Failure::Protocol { .. }) => self.fail(&conn, &mut send, f).await,
            Err(Failure::Gone) => conn.close(CLOSE_OK.into(), b"control stream closed"),
            Ok(()) => {
                let _ = send.finish();
                conn.close(CLOSE_OK.into(), b"bye");
            }
        }
        datagrams.abort();
        tracing::info!(%remote, peer = %peer_id, "mesh peer disconnected");
    }

    /// Report a protocol violation to the peer and close its connection.
    async fn fail(&self, conn: &quinn::Connection, send: &mut quinn::SendStream, f: Failure) {
        let Failure::Protocol { code, message } = f else {
            conn.close(CLOSE_OK.into(), b"gone");
            return;
        };
        self.metrics.control_errors.inc();
        tracing::warn!(remote = %conn.remote_address(), code, %message, "closing mesh connection");
        let err = ControlMessage::Error {
            code: code.to_string(),
            message,
        };
        if send.write_all(&err.to_record()).await.is_ok() && send.finish().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
        }
        conn.close(CLOSE_PROTOCOL.into(), code.as_bytes());
    }

    #[allow(clippy::too_many_arguments)]
    async fn control_loop(
        &self,
        id: u64,
        peer: PeerKind,
        peer_id: &str,
        reader: &mut ControlReader,
        send: &mut quinn::SendStream,
        (own, mut outbound): (&PeerLink, PeerReceiver),
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        loop {
            // Queued messages go out before the peer's next command is read: rooms run in
            // parallel, so other connections can fill this peer's queue as fast as its own
            // commands do; writing first keeps the queue short (the peer's own commands wait,
            // not its events).
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                out = outbound.recv() => {
                    let Some(out) = out.map_err(|TooSlow| Failure::Protocol {
                        code: "too_slow",
                        message: format!("more than {PEER_QUEUE} control messages unread"),
                    })? else {
                        return Ok(());
                    };
                    send.write_all(&wire_bytes(out)).await.map_err(|_| Failure::Gone)?;
                    continue;
                }
                m = reader.next() => match m? {
                    Some(m) => m,
                    None => return Ok(()),
                },
            };
            match &msg {
                ControlMessage::RoomCommand { room, .. }
                | ControlMessage::RoomEnded { room }
                | ControlMessage::SubscribeRoom { room } => self.ensure_loaded(*room).await,
                _ => {}
            }
            // Replies share the outbound queue so they stay in order with broadcasts.
            let reply = self
                .core
                .handle_control(moment(), id, peer, peer_id, own, msg)
                .map_err(|Violation { code, message }| Failure::Protocol { code, message })?;
            if let Some(reply) = reply {
                own.control(reply);
            }
        }
    }

    /// Receive datagrams: relay valid speaker packets to the other subscribed edges and hand them
    /// to the mixer; count and drop everything else.
    async fn datagram_loop(self: Arc<Self>, conn: quinn::Connection, id: u64, peer: PeerKind) {
        let m = &self.metrics;
        while let Ok(datagram) = conn.read_datagram().await {
            let at = Instant::now();
            m.relay_in.inc();
            if peer != PeerKind::Edge {
                m.dropped(DropReason::NotEdge);
                continue;
            }
            // Repeats (relay loss protection) are mixed, never forwarded.
            let (room, speaker, forward) = match RelayFrame::decode(&datagram) {
                Ok(f) if f.kind == FrameKind::SpeakerAudio => (f.room, f.speaker, true),
                Ok(f) if f.kind == FrameKind::SpeakerRepeat => (f.room, f.speaker, false),
                Ok(_) => {
                    m.dropped(DropReason::WrongKind);
                    continue;
                }
                Err(e) => {
                    m.dropped(DropReason::from(e));
                    continue;
                }
            };
            // The relay's own lock: the room authority never holds it while it works.
            if let Err(reason) = self.core.relay(room, speaker, id, forward, &datagram) {
                m.dropped(reason);
                continue;
            }
            match self.packets.try_send(MixerCmd::Packet { datagram, at }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => m.dropped(DropReason::MixerBusy),
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    }
}

impl crate::mixer_thread::ProgramFanout for Hub {
    fn program_frame(&self, room: RoomId, datagram: &Bytes) {
        self.core.program_frame(room, datagram);
    }
}

/// `Ok` if the peer's certificate carries the mesh role of `peer`; else why not.
fn peer_may_act_as(conn: &quinn::Connection, peer: PeerKind) -> Result<(), String> {
    let role = peer.mesh_role();
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| "no peer certificate".to_string())?;
    let leaf = certs
        .first()
        .ok_or_else(|| "no peer certificate".to_string())?;
    let roles = roles_of(leaf).map_err(|e| e.to_string())?;
    if roles.contains(&role) {
        return Ok(());
    }
    let carried: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    Err(format!(
        "hello as {role} refused: the certificate carries {}",
        if carried.is_empty() {
            "no amphi-role".to_string()
        } else {
            format!("amphi-role {}", carried.join(", "))
        }
    ))
}

impl From<MixerNote> for MixerCmd {
    fn from(note: MixerNote) -> Self {
        match note {
            MixerNote::RoomOpened { room } => MixerCmd::RoomOpened { room },
            MixerNote::SpeakerJoined {
                room,
                speaker,
                source,
                identity,
                at,
            } => MixerCmd::Joined {
                room,
                speaker,
                source,
                identity,
                at,
            },
            MixerNote::SpeakerLeft { room, speaker, at } => MixerCmd::Left { room, speaker, at },
            MixerNote::SourceGone { source, at } => MixerCmd::SourceGone { source, at },
            MixerNote::RoomEnded { room, at } => MixerCmd::RoomEnded { room, at },
        }
    }
}
