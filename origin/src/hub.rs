//! QUIC hub driver: accepts edge and packager connections, runs their control streams, relays
//! speaker datagrams to subscribed edges and feeds the mixer thread.

use crate::metrics::{DropReason, Metrics};
use crate::mixer_thread::MixerCmd;
use crate::subs::{Subscribe, Subscriptions};
use amphi_protocol::control::{ControlDecoder, ControlError, ControlMessage, PeerKind};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::RoomId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a new connection has to open its control stream and say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC application close code: normal shutdown.
const CLOSE_OK: u32 = 0;
/// QUIC application close code: protocol violation.
const CLOSE_PROTOCOL: u32 = 1;

struct EdgeLink {
    conn: quinn::Connection,
    control: mpsc::UnboundedSender<ControlMessage>,
}

#[derive(Default)]
struct HubState {
    subs: Subscriptions,
    edges: HashMap<u64, EdgeLink>,
    /// Geo-routers, told when a room ends.
    routers: HashMap<u64, mpsc::UnboundedSender<ControlMessage>>,
}

/// Shared state of all connection tasks.
pub(crate) struct Hub {
    origin_id: String,
    metrics: Arc<Metrics>,
    state: RwLock<HubState>,
    packets: mpsc::Sender<MixerCmd>,
    control: mpsc::UnboundedSender<MixerCmd>,
    next_id: AtomicU64,
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
            if let Some(m) = self.decoder.next_message()? {
                return Ok(Some(m));
            }
            match self.recv.read(&mut self.buf[..]).await {
                Ok(Some(n)) => self.decoder.feed(&self.buf[..n]),
                Ok(None) => return Ok(None),
                Err(_) => return Err(Failure::Gone),
            }
        }
    }
}

fn lock_read(state: &RwLock<HubState>) -> std::sync::RwLockReadGuard<'_, HubState> {
    state.read().unwrap_or_else(|e| e.into_inner())
}

fn lock_write(state: &RwLock<HubState>) -> std::sync::RwLockWriteGuard<'_, HubState> {
    state.write().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// A hub that sends mixer input to `packets` (bounded, lossy) and `control` (lossless).
    pub(crate) fn new(
        origin_id: String,
        metrics: Arc<Metrics>,
        packets: mpsc::Sender<MixerCmd>,
        control: mpsc::UnboundedSender<MixerCmd>,
    ) -> Self {
        Hub {
            origin_id,
            metrics,
            state: RwLock::new(HubState::default()),
            packets,
            control,
            next_id: AtomicU64::new(1),
        }
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
        let welcome = ControlMessage::Welcome {
            origin: self.origin_id.clone(),
        };
        if send.write_all(&welcome.to_record()).await.is_err() {
            return;
        }
        tracing::info!(%remote, peer = %peer_id, %region, ?peer, "mesh peer connected");
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        match peer {
            PeerKind::Edge => {
                lock_write(&self.state).edges.insert(
                    id,
                    EdgeLink {
                        conn: conn.clone(),
                        control: ctl_tx,
                    },
                );
                self.metrics.edges.fetch_add(1, Relaxed);
            }
            PeerKind::Packager => {
                let _ = self.control.send(MixerCmd::PackagerUp {
                    id,
                    conn: conn.clone(),
                    control: ctl_tx,
                });
                self.metrics.packagers.fetch_add(1, Relaxed);
            }
            PeerKind::Router => {
                lock_write(&self.state).routers.insert(id, ctl_tx);
            }
        }
        let datagrams = tokio::spawn(self.clone().datagram_loop(conn.clone(), id, peer));
        let result = self
            .control_loop(
                id,
                peer,
                &peer_id,
                &mut reader,
                &mut send,
                ctl_rx,
                &shutdown,
            )
            .await;
        match peer {
            PeerKind::Edge => {
                {
                    let mut st = lock_write(&self.state);
                    st.edges.remove(&id);
                    st.subs.remove_connection(id);
                }
                let _ = self.control.send(MixerCmd::SourceGone {
                    source: id,
                    at: Instant::now(),
                });
                self.metrics.edges.fetch_sub(1, Relaxed);
            }
            PeerKind::Packager => {
                let _ = self.control.send(MixerCmd::PackagerDown { id });
                self.metrics.packagers.fetch_sub(1, Relaxed);
            }
            PeerKind::Router => {
                lock_write(&self.state).routers.remove(&id);
            }
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
        self.metrics.control_errors.fetch_add(1, Relaxed);
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
        mut outbound: mpsc::UnboundedReceiver<ControlMessage>,
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                Some(out) = outbound.recv() => {
                    send.write_all(&out.to_record()).await.map_err(|_| Failure::Gone)?;
                    continue;
                }
                m = reader.next() => match m? {
                    Some(m) => m,
                    None => return Ok(()),
                },
            };
            if let Some(reply) = self.on_message(id, peer, peer_id, msg)? {
                send.write_all(&reply.to_record())
                    .await
                    .map_err(|_| Failure::Gone)?;
            }
        }
    }

    /// Apply one control message; returns the reply to send, if any.
    fn on_message(
        &self,
        id: u64,
        peer: PeerKind,
        peer_id: &str,
        msg: ControlMessage,
    ) -> Result<Option<ControlMessage>, Failure> {
        let now = Instant::now();
        let edge_only = |what: &str| {
            Ok(Some(ControlMessage::Error {
                code: "unexpected".into(),
                message: format!("{what} is only accepted from edges"),
            }))
        };
        match msg {
            ControlMessage::Hello { .. }
            | ControlMessage::Welcome { .. }
            | ControlMessage::RoomEvents { .. }
            | ControlMessage::RoomSnapshot { .. }
            | ControlMessage::CommandRejected { .. } => {
                Err(Failure::Protocol {
                    code: "unexpected",
                    message: format!("unexpected {}", kind_of(&msg)),
                })
            }
            ControlMessage::Ping { nonce } => Ok(Some(ControlMessage::Pong { nonce })),
            ControlMessage::Pong { .. } => Ok(None),
            ControlMessage::Error { code, message } => {
                tracing::warn!(peer = %peer_id, %code, %message, "peer reported an error");
                Ok(None)
            }
            ControlMessage::RoomEnded { room } if peer != PeerKind::Packager => {
                tracing::info!(%room, from = %peer_id, ?peer, "room ended");
                self.forward_room_ended(room, id);
                let _ = self.control.send(MixerCmd::RoomEnded { room, at: now });
                Ok(None)
            }
            _ if peer != PeerKind::Edge => edge_only(kind_of(&msg)),
            ControlMessage::SpeakerJoined {
                room,
                speaker,
                name,
                region,
            } => {
                tracing::info!(%room, %speaker, %name, %region, edge = %peer_id, "speaker joined");
                let _ = self.control.send(MixerCmd::Joined {
                    room,
                    speaker: speaker.0,
                    source: id,
                    at: now,
                });
                Ok(None)
            }
            ControlMessage::SpeakerLeft { room, speaker } => {
                tracing::info!(%room, %speaker, edge = %peer_id, "speaker left");
                let _ = self.control.send(MixerCmd::Left {
                    room,
                    speaker: speaker.0,
                    at: now,
                });
                Ok(None)
            }
            ControlMessage::SubscribeRoom { room } => {
                match lock_write(&self.state).subs.subscribe(room, id) {
                    Subscribe::Added | Subscribe::Already => Ok(None),
                    Subscribe::LimitReached => Ok(Some(ControlMessage::Error {
                        code: "limit".into(),
                        message: format!("too many subscriptions, {room} refused"),
                    })),
                }
            }
            ControlMessage::UnsubscribeRoom { room } => {
                lock_write(&self.state).subs.unsubscribe(room, id);
                Ok(None)
            }
            ControlMessage::RoomEnded { .. } => edge_only("room_ended"),
            ControlMessage::RoomCommand {
                room,
                actor,
                request,
                ..
            } => Ok(Some(ControlMessage::CommandRejected {
                room,
                actor,
                request,
                code: "unavailable".into(),
                message: "this origin has no room authority".into(),
            })),
        }
    }

    /// Tell the other edges subscribed to `room`, and every geo-router, that it ended.
    fn forward_room_ended(&self, room: RoomId, from: u64) {
        let st = lock_read(&self.state);
        for (&router, control) in &st.routers {
            if router != from {
                let _ = control.send(ControlMessage::RoomEnded { room });
            }
        }
        for &sub in st.subs.subscribers(room) {
            if sub == from {
                continue;
            }
            if let Some(link) = st.edges.get(&sub) {
                let _ = link.control.send(ControlMessage::RoomEnded { room });
            }
        }
    }

    /// Receive datagrams: relay valid speaker packets to the other subscribed edges and hand them
    /// to the mixer; count and drop everything else.
    async fn datagram_loop(self: Arc<Self>, conn: quinn::Connection, id: u64, peer: PeerKind) {
        let m = &self.metrics;
        while let Ok(datagram) = conn.read_datagram().await {
            let at = Instant::now();
            m.relay_in.fetch_add(1, Relaxed);
            if peer != PeerKind::Edge {
                m.dropped(DropReason::NotEdge);
                continue;
            }
            let room = match RelayFrame::decode(&datagram) {
                Ok(f) if f.kind == FrameKind::SpeakerAudio => f.room,
                Ok(_) => {
                    m.dropped(DropReason::WrongKind);
                    continue;
                }
                Err(e) => {
                    m.dropped(DropReason::from(e));
                    continue;
                }
            };
            {
                let st = lock_read(&self.state);
                for &sub in st.subs.subscribers(room) {
                    if sub == id {
                        continue;
                    }
                    let Some(link) = st.edges.get(&sub) else {
                        continue;
                    };
                    match link.conn.send_datagram(datagram.clone()) {
                        Ok(()) => {
                            m.relay_forwarded.fetch_add(1, Relaxed);
                        }
                        Err(_) => m.dropped(DropReason::SendFailed),
                    }
                }
            }
            match self.packets.try_send(MixerCmd::Packet { datagram, at }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => m.dropped(DropReason::MixerBusy),
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    }
}

fn kind_of(m: &ControlMessage) -> &'static str {
    match m {
        ControlMessage::Hello { .. } => "hello",
        ControlMessage::Welcome { .. } => "welcome",
        ControlMessage::SpeakerJoined { .. } => "speaker_joined",
        ControlMessage::SpeakerLeft { .. } => "speaker_left",
        ControlMessage::SubscribeRoom { .. } => "subscribe_room",
        ControlMessage::UnsubscribeRoom { .. } => "unsubscribe_room",
        ControlMessage::RoomEnded { .. } => "room_ended",
        ControlMessage::Ping { .. } => "ping",
        ControlMessage::Pong { .. } => "pong",
        ControlMessage::Error { .. } => "error",
        ControlMessage::RoomCommand { .. } => "room_command",
        ControlMessage::RoomEvents { .. } => "room_events",
        ControlMessage::RoomSnapshot { .. } => "room_snapshot",
        ControlMessage::CommandRejected { .. } => "command_rejected",
    }
}
