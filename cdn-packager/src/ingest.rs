//! The QUIC links to the origins, one per configured origin: control stream (Hello/Welcome,
//! RoomOpened, RoomEnded, Ping) and one unidirectional program stream per room: program frames,
//! and `SpeakerIdentity` records naming the speakers those frames point at.
//!
//! Only the origin that owns a room mixes it, so the packager takes every room's program stream
//! from whichever origin sends it. When a room moves to another origin (its owner died), the new
//! owner's stream supersedes the old one (`RoomCore::start_stream`): the output continues with one
//! discontinuity, the way it does when an origin restarts.

use crate::metrics::Metrics;
use crate::room::Registry;
use crate::segmenter::ProgramFrame;
use crate::speakers::Speaker;
use amphi_protocol::config::{OriginEndpoint, PackagerConfig};
use amphi_protocol::control::{
    record_len, ControlDecoder, ControlMessage, PeerKind, MAX_PROGRAM_RECORD_LEN,
};
use amphi_protocol::relay::{FrameKind, RelayError, RelayFrame, SpeakerIdentity};
use amphi_protocol::RoomId;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// First reconnect delay.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Time allowed for connect + Hello/Welcome.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// After `RoomEnded`, how long a still-running program stream may take to finish.
const END_GRACE: Duration = Duration::from_secs(3);
/// How often the origin link's round-trip time is copied into the metrics.
const RTT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Why a session with the origin ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("control: {0}")]
    Control(#[from] amphi_protocol::control::ControlError),
    #[error("timed out")]
    Timeout,
    #[error("control stream closed")]
    Closed,
    #[error("origin refused: {0}")]
    Refused(String),
}

/// Why a program stream record was refused (the stream is then dropped).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProgramRecordError {
    /// Not a relay frame.
    #[error("{0}")]
    Relay(#[from] RelayError),
    /// A relay frame of another kind.
    #[error("not a program frame")]
    NotProgram,
    /// A frame of another room than the stream's first one.
    #[error("room changed mid-stream to {0}")]
    RoomChanged(RoomId),
}

/// One record of a program stream (the body after its `u32 LE` length prefix, itself checked
/// with [`record_len`] against [`MAX_PROGRAM_RECORD_LEN`]): a program frame or a speaker identity, of room `current`
/// once the stream's first frame named it.
pub fn program_record(
    body: &[u8],
    current: Option<RoomId>,
) -> Result<RelayFrame<'_>, ProgramRecordError> {
    let frame = RelayFrame::decode(body)?;
    if !matches!(frame.kind, FrameKind::Program | FrameKind::SpeakerIdentity) {
        return Err(ProgramRecordError::NotProgram);
    }
    match current {
        Some(room) if room != frame.room => Err(ProgramRecordError::RoomChanged(frame.room)),
        _ => Ok(frame),
    }
}

/// Everything the ingest side shares.
pub struct Ingest {
    /// Configuration.
    pub config: PackagerConfig,
    /// Rooms.
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Shutdown.
    pub shutdown: CancellationToken,
    /// Stream and timer tasks.
    pub tasks: TaskTracker,
    generation: AtomicU64,
}

impl Ingest {
    /// Bundle the ingest state.
    pub fn new(
        config: PackagerConfig,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Ingest {
            config,
            registry,
            metrics,
            shutdown,
            tasks,
            generation: AtomicU64::new(0),
        }
    }

    /// Link to every origin and stay connected (each link backs off 100 ms .. 5 s on its own)
    /// until shutdown.
    pub async fn run(
        self: Arc<Self>,
        origins: Vec<OriginEndpoint>,
        client: quinn::ClientConfig,
    ) -> std::io::Result<()> {
        let mut links = tokio::task::JoinSet::new();
        for origin in origins {
            let bind = match (origin.addr.is_ipv4(), origin.addr.ip().is_loopback()) {
                (true, true) => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                (true, false) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                (false, true) => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
                (false, false) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
            };
            let mut endpoint = quinn::Endpoint::client(bind)?;
            endpoint.set_default_client_config(client.clone());
            links.spawn(self.clone().link(origin, endpoint));
        }
        while links.join_next().await.is_some() {}
        Ok(())
    }

    /// Keep one origin link up until shutdown.
    async fn link(self: Arc<Self>, origin: OriginEndpoint, endpoint: quinn::Endpoint) {
        let mut backoff = MIN_BACKOFF;
        while !self.shutdown.is_cancelled() {
            let mut welcomed = false;
            let session = tokio::select! {
                r = self.session(&endpoint, &origin, &mut welcomed) => r,
                _ = self.shutdown.cancelled() => Ok(()),
            };
            match session {
                Ok(()) => break,
                Err(e) => {
                    self.metrics
                        .origin_reconnects
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(origin = %origin.id, addr = %origin.addr, error = %e, "origin session ended; reconnecting");
                }
            }
            if welcomed {
                backoff = MIN_BACKOFF;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }

    /// One connection; `Ok(())` only on shutdown.
    async fn session(
        self: &Arc<Self>,
        endpoint: &quinn::Endpoint,
        origin: &OriginEndpoint,
        welcomed: &mut bool,
    ) -> Result<(), SessionError> {
        let cfg = &self.config;
        let connecting = endpoint.connect(origin.addr, &origin.server_name)?;
        let (conn, mut send, mut recv, mut dec) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let conn = connecting.await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let hello = ControlMessage::Hello {
                peer: PeerKind::Packager,
                id: cfg.id.clone(),
                region: String::new(),
            };
            send.write_all(&hello.to_record()).await?;
            let mut dec = ControlDecoder::default();
            let mut buf = [0u8; 4096];
            loop {
                if let Some(msg) = dec.next_message()? {
                    return match msg {
                        ControlMessage::Welcome { origin } => {
                            tracing::info!(%origin, packager = %cfg.id, "connected to origin");
                            Ok((conn, send, recv, dec))
                        }
                        ControlMessage::Error { code, message } => {
                            Err(SessionError::Refused(format!("{code}: {message}")))
                        }
                        other => Err(SessionError::Refused(format!(
                            "expected welcome, got {other:?}"
                        ))),
                    };
                }
                match recv.read(&mut buf).await? {
                    Some(n) => dec.feed(&buf[..n]),
                    None => return Err(SessionError::Closed),
                }
            }
        })
        .await
        .map_err(|_| SessionError::Timeout)??;
        *welcomed = true;
        self.metrics.origin_link(true);
        let result = self.serve(&conn, &mut send, &mut recv, &mut dec).await;
        self.metrics.origin_link(false);
        if result.is_ok() {
            conn.close(0u32.into(), b"shutdown");
        }
        result
    }

    async fn serve(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        dec: &mut ControlDecoder,
    ) -> Result<(), SessionError> {
        let mut buf = [0u8; 4096];
        let mut rtt_sample = tokio::time::interval(RTT_SAMPLE_INTERVAL);
        loop {
            // Messages that arrived together with Welcome are handled first.
            while let Some(msg) = dec.next_message()? {
                match msg {
                    ControlMessage::RoomEnded { room } => self.room_ended(room).await,
                    ControlMessage::RoomOpened { room } => self.room_opened(room),
                    ControlMessage::Ping { nonce } => {
                        send.write_all(&ControlMessage::Pong { nonce }.to_record())
                            .await?;
                    }
                    other => tracing::debug!(?other, "ignoring control message"),
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = rtt_sample.tick() => self.metrics.set_origin_rtt(conn.rtt()),
                uni = conn.accept_uni() => {
                    let stream = uni?;
                    let gen = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                    self.metrics.streams_accepted.fetch_add(1, Ordering::Relaxed);
                    let me = self.clone();
                    self.tasks.spawn(async move { me.program_stream(stream, gen).await });
                }
                read = recv.read(&mut buf) => match read? {
                    Some(n) => dec.feed(&buf[..n]),
                    None => return Err(SessionError::Closed),
                },
            }
        }
    }

    /// The origin announced a live room: open its output now (off the control loop: opening
    /// reads storage), so blocking playlist requests are held until its media arrives.
    fn room_opened(self: &Arc<Self>, room: RoomId) {
        if self.registry.get(room).is_some() {
            return;
        }
        let registry = self.registry.clone();
        self.tasks.spawn(async move {
            match registry.get_or_open(room).await {
                Ok(_) => tracing::info!(%room, "room announced by the origin; output open"),
                Err(e) => tracing::error!(%room, error = %e, "cannot open room output"),
            }
        });
    }

    async fn room_ended(self: &Arc<Self>, room: RoomId) {
        let Some(handle) = self.registry.get(room) else {
            tracing::debug!(%room, "room ended before any program reached the packager");
            return;
        };
        if let Err(e) = handle.core().room_ended() {
            tracing::error!(%room, error = %e, "finishing the playlist failed");
        }
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(END_GRACE) => {
                    if let Err(e) = handle.core().force_end() {
                        tracing::error!(%room, error = %e, "finishing the playlist failed");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }

    /// Read one program stream until it finishes, breaks, or sends a bad record.
    async fn program_stream(self: Arc<Self>, mut recv: quinn::RecvStream, gen: u64) {
        let mut body = vec![0u8; MAX_PROGRAM_RECORD_LEN];
        let mut room: Option<(RoomId, Arc<crate::room::RoomHandle>)> = None;
        loop {
            let mut prefix = [0u8; 4];
            let read = tokio::select! {
                r = recv.read_exact(&mut prefix) => r,
                _ = self.shutdown.cancelled() => break,
            };
            match read {
                Ok(()) => {}
                Err(quinn::ReadExactError::FinishedEarly(0)) => {
                    tracing::info!(room = ?room.as_ref().map(|r| r.0), gen, "program stream finished");
                    break;
                }
                Err(e) => {
                    tracing::info!(room = ?room.as_ref().map(|r| r.0), gen, error = %e, "program stream broke");
                    break;
                }
            }
            let len = match record_len(prefix, MAX_PROGRAM_RECORD_LEN) {
                Ok(len) => len,
                Err(e) => {
                    self.bad_record(&mut recv, room.as_ref().map(|r| r.0), gen, &e);
                    break;
                }
            };
            if let Err(e) = recv.read_exact(&mut body[..len]).await {
                self.bad_record(&mut recv, room.as_ref().map(|r| r.0), gen, &e);
                break;
            }
            let current = room.as_ref().map(|r| r.0);
            let frame = match program_record(&body[..len], current) {
                Ok(f) => f,
                Err(e) => {
                    self.bad_record(&mut recv, current, gen, &e);
                    break;
                }
            };
            self.metrics.frames_received.fetch_add(1, Ordering::Relaxed);
            let handle = match &room {
                Some((_, h)) => h.clone(),
                None => match self.registry.get_or_open(frame.room).await {
                    Ok(h) => {
                        tracing::info!(room = %frame.room, gen, "program stream started");
                        if let Err(e) = h.core().start_stream(gen) {
                            tracing::error!(room = %frame.room, error = %e, "starting stream failed");
                        }
                        room = Some((frame.room, h.clone()));
                        h
                    }
                    Err(e) => {
                        tracing::error!(room = %frame.room, error = %e, "cannot open room output");
                        recv.stop(2u32.into()).ok();
                        break;
                    }
                },
            };
            if frame.kind == FrameKind::SpeakerIdentity {
                match SpeakerIdentity::decode(frame.payload) {
                    Ok(id) => handle.core().identify(
                        gen,
                        frame.speaker,
                        Speaker {
                            user: id.user.to_string(),
                            name: id.name.to_string(),
                        },
                    ),
                    Err(e) => {
                        self.metrics.bad_records.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(room = %frame.room, gen, error = %e, "speaker identity skipped");
                    }
                }
                continue;
            }
            let pf = ProgramFrame {
                rtp_ts: frame.rtp_ts,
                payload: frame.payload,
            };
            let mut core = handle.core();
            if let Err(e) = core.frame(gen, pf, frame.speaker, Instant::now(), SystemTime::now()) {
                tracing::error!(room = %core.room(), error = %e, "packaging failed");
            }
        }
        if let Some((id, handle)) = room {
            if let Err(e) = handle.core().stream_finished(gen) {
                tracing::error!(room = %id, error = %e, "flushing stream failed");
            }
        }
    }

    fn bad_record(
        &self,
        recv: &mut quinn::RecvStream,
        room: Option<RoomId>,
        gen: u64,
        error: &dyn std::fmt::Display,
    ) {
        self.metrics.bad_records.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(?room, gen, %error, "bad program record; dropping the stream");
        recv.stop(1u32.into()).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: FrameKind, room: u64) -> Vec<u8> {
        let mut out = Vec::new();
        RelayFrame {
            kind,
            room: RoomId(room),
            speaker: 3,
            seq: 1,
            rtp_ts: 960,
            audio_level: 40,
            payload: &[0xf8, 1, 2],
        }
        .encode_to_vec(&mut out)
        .unwrap();
        out
    }

    #[test]
    fn program_records_of_one_room_pass_and_anything_else_is_refused() {
        let ok = record(FrameKind::Program, 7);
        let f = program_record(&ok, None).unwrap();
        assert_eq!((f.room, f.payload), (RoomId(7), &[0xf8, 1, 2][..]));
        assert!(program_record(&ok, Some(RoomId(7))).is_ok());
        assert!(program_record(&record(FrameKind::SpeakerIdentity, 7), Some(RoomId(7))).is_ok());
        assert_eq!(
            program_record(&ok, Some(RoomId(8))),
            Err(ProgramRecordError::RoomChanged(RoomId(7)))
        );
        assert_eq!(
            program_record(&record(FrameKind::SpeakerAudio, 7), None),
            Err(ProgramRecordError::NotProgram)
        );
        assert!(matches!(
            program_record(&ok[..10], None),
            Err(ProgramRecordError::Relay(RelayError::TooShort(10)))
        ));
    }
}
