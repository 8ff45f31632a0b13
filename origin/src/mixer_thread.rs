//! Tokio driver of [`Programs`]: a dedicated thread that feeds inputs, wakes on the 20 ms tick grid
//! and hands program frames to one bounded queue per (packager, room) stream.

use crate::metrics::{DropReason, Metrics, SecondsCounter};
use crate::programs::{Admission, ProgramEvent, Programs, ProgramsConfig};
use amphi_protocol::control::ControlMessage;
use amphi_protocol::relay::{FrameKind, RelayFrame, SpeakerIdentity};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Program records queued per packager stream before frames are dropped (2 s).
const STREAM_QUEUE: usize = 100;
/// Commands handled at most between two checks of the tick deadline.
const BATCH: usize = 1024;

/// Where program frames go besides the packagers: the edges with push listeners (the hub).
pub(crate) trait ProgramFanout: Send + Sync {
    /// Send one program frame of `room` (a `Program` relay frame) to every edge that wants it.
    fn program_frame(&self, room: RoomId, datagram: &Bytes);
}

/// Input of the mixer thread.
pub(crate) enum MixerCmd {
    /// A valid `SpeakerAudio` relay frame and when it arrived.
    Packet { datagram: Bytes, at: Instant },
    /// `SpeakerJoined` from connection `source`; `identity` is the participant's user id and
    /// display name from the room authority (told to the packagers on the program stream).
    Joined {
        room: RoomId,
        speaker: u32,
        source: u64,
        identity: Option<(String, String)>,
        at: Instant,
    },
    /// `SpeakerLeft`.
    Left {
        room: RoomId,
        speaker: u32,
        at: Instant,
    },
    /// An edge connection closed.
    SourceGone { source: u64, at: Instant },
    /// `RoomEnded` from an edge.
    RoomEnded { room: RoomId, at: Instant },
    /// A participant joined a live room: announce the room to the packagers (once).
    RoomOpened { room: RoomId },
    /// A packager connected; `control` carries messages for its control stream.
    PackagerUp {
        id: u64,
        conn: quinn::Connection,
        control: crate::peerq::PeerSender,
    },
    /// A packager disconnected.
    PackagerDown { id: u64 },
}

struct PackagerLink {
    conn: quinn::Connection,
    control: crate::peerq::PeerSender,
    /// Dropping a sender finishes the stream once its queue is written.
    streams: HashMap<RoomId, mpsc::Sender<Bytes>>,
}

/// Write one room's program records to a new unidirectional stream, then finish it.
async fn program_writer(
    conn: quinn::Connection,
    room: RoomId,
    mut records: mpsc::Receiver<Bytes>,
    metrics: Arc<Metrics>,
) {
    let mut stream = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%room, error = %e, "cannot open program stream");
            return;
        }
    };
    while let Some(rec) = records.recv().await {
        if let Err(e) = stream.write_chunk(rec).await {
            tracing::debug!(%room, error = %e, "program stream write failed");
            return;
        }
        metrics.program_frames_sent.inc();
    }
    if stream.finish().is_ok() {
        tracing::debug!(%room, "program stream finished");
    }
}

/// Per-room mixing cost: each running room's CPU counter, and the thread CPU time when the room
/// currently being mixed started.
#[derive(Default)]
struct RoomCpu {
    counters: HashMap<RoomId, SecondsCounter>,
    mixing_since: Option<(RoomId, Duration)>,
}

impl RoomCpu {
    fn mixing(&mut self, room: RoomId) {
        self.mixing_since = Some((room, crate::thread_cpu_time()));
    }

    fn mixed(&mut self, room: RoomId, metrics: &Metrics) {
        let Some((r, since)) = self.mixing_since.take() else {
            return;
        };
        if r != room {
            return;
        }
        let spent = crate::thread_cpu_time().saturating_sub(since);
        self.counters
            .entry(room)
            .or_insert_with(|| metrics.room_mixer_cpu(room))
            .inc_by(spent.as_secs_f64());
    }

    fn stopped(&mut self, room: RoomId, metrics: &Metrics) {
        self.counters.remove(&room);
        metrics.forget_room_mixer_cpu(room);
    }
}

/// Where each running program is, in frames mixed since it started (so milliseconds in the
/// program and in its recording, which starts with the program's first frame): written by the
/// mixer thread (a room is added when its program starts, its counter bumped per frame, no
/// allocation), read by the hub to stamp reports with a pointer into the recording.
#[derive(Debug, Default)]
pub(crate) struct ProgramClock {
    rooms: RwLock<HashMap<RoomId, Arc<AtomicU64>>>,
}

impl ProgramClock {
    /// Milliseconds of `room`'s program mixed so far; `None` if no program runs for it.
    pub(crate) fn position_ms(&self, room: RoomId) -> Option<u64> {
        let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
        let frames = rooms.get(&room)?.load(Ordering::Relaxed);
        Some(frames.saturating_mul(crate::jitter::FRAME_NS as u64 / 1_000_000))
    }

    fn started(&self, room: RoomId) -> Arc<AtomicU64> {
        let counter = Arc::new(AtomicU64::new(0));
        self.rooms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room, counter.clone());
        counter
    }

    fn stopped(&self, room: RoomId) {
        self.rooms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&room);
    }
}

struct Driver {
    programs: Programs,
    /// The shared program positions, and this thread's handle on each running room's counter.
    clock: Arc<ProgramClock>,
    frames: HashMap<RoomId, Arc<AtomicU64>>,
    packagers: HashMap<u64, PackagerLink>,
    /// Live rooms announced to the packagers (`RoomOpened`), replayed to each new packager.
    opened: HashSet<RoomId>,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    room_cpu: RoomCpu,
    /// Rooms idle for `ProgramsConfig::idle_end`, for the hub to end.
    idle_tx: mpsc::UnboundedSender<RoomId>,
    /// The identity records (program stream records of kind `SpeakerIdentity`) of every speaker
    /// announced in a running room, sent first on each new program stream of the room.
    identities: HashMap<RoomId, HashMap<u32, Bytes>>,
    /// The edges with push listeners.
    fanout: Arc<dyn ProgramFanout>,
}

/// The program stream record (`u32 LE length | relay frame`) telling the packagers who
/// `speaker` is; `None` if the identity cannot be carried (an over-long name or user id).
fn identity_record(room: RoomId, speaker: u32, user: &str, name: &str) -> Option<Bytes> {
    let mut payload = Vec::with_capacity(1 + user.len() + name.len());
    SpeakerIdentity { user, name }
        .encode_to_vec(&mut payload)
        .ok()?;
    let frame = RelayFrame {
        kind: FrameKind::SpeakerIdentity,
        room,
        speaker,
        seq: 0,
        rtp_ts: 0,
        audio_level: 127,
        payload: &payload,
    };
    let mut record = (frame.encoded_len() as u32).to_le_bytes().to_vec();
    frame.encode_to_vec(&mut record).ok()?;
    Some(Bytes::from(record))
}

impl Driver {
    fn admit(&self, a: Admission) {
        match a {
            Admission::Mixed(_) => {}
            Admission::RoomEnded => self.metrics.dropped(DropReason::RoomEnded),
            Admission::TooManyRooms | Admission::TooManySpeakers => {
                self.metrics.dropped(DropReason::MixerLimit)
            }
        }
    }

    fn command(&mut self, cmd: MixerCmd) {
        match cmd {
            MixerCmd::Packet { datagram, at } => {
                if let Ok(frame) = RelayFrame::decode(&datagram) {
                    let a = self.programs.packet(&frame, at);
                    self.admit(a);
                }
            }
            MixerCmd::Joined {
                room,
                speaker,
                source,
                identity,
                at,
            } => {
                let a = self.programs.speaker_joined(room, speaker, source, at);
                if a != Admission::Mixed(crate::jitter::PushOutcome::Accepted) {
                    tracing::warn!(%room, speaker, ?a, "speaker not mixed");
                    return;
                }
                let record =
                    identity.and_then(|(user, name)| identity_record(room, speaker, &user, &name));
                if let Some(record) = record {
                    // Streams already running hear it now; new ones get it first.
                    for link in self.packagers.values() {
                        if let Some(tx) = link.streams.get(&room) {
                            if tx.try_send(record.clone()).is_err() {
                                self.metrics.program_frames_dropped.inc();
                            }
                        }
                    }
                    self.identities
                        .entry(room)
                        .or_default()
                        .insert(speaker, record);
                }
            }
            MixerCmd::Left { room, speaker, at } => {
                self.programs.speaker_left(room, speaker, at);
                if let Some(ids) = self.identities.get_mut(&room) {
                    ids.remove(&speaker);
                }
            }
            MixerCmd::SourceGone { source, at } => self.programs.source_gone(source, at),
            MixerCmd::RoomEnded { room, at } => {
                let was_running = self.programs.room_ended(room, at);
                self.opened.remove(&room);
                self.identities.remove(&room);
                tracing::info!(%room, was_running, "room ended");
                for link in self.packagers.values() {
                    let _ = link.control.send(ControlMessage::RoomEnded { room });
                }
            }
            MixerCmd::RoomOpened { room } => {
                if self.opened.insert(room) {
                    for link in self.packagers.values() {
                        let _ = link.control.send(ControlMessage::RoomOpened { room });
                    }
                }
            }
            MixerCmd::PackagerUp { id, conn, control } => {
                for &room in &self.opened {
                    let _ = control.send(ControlMessage::RoomOpened { room });
                }
                self.packagers.insert(
                    id,
                    PackagerLink {
                        conn,
                        control,
                        streams: HashMap::new(),
                    },
                );
            }
            MixerCmd::PackagerDown { id } => {
                self.packagers.remove(&id);
            }
        }
    }

    fn poll(&mut self, now: Instant) -> Result<(), crate::mixer::MixError> {
        let Driver {
            programs,
            packagers,
            metrics,
            runtime,
            room_cpu,
            idle_tx,
            identities,
            clock,
            frames,
            fanout,
            ..
        } = self;
        programs.poll(now, &mut |event| match event {
            ProgramEvent::Started(room) => {
                tracing::info!(%room, "program started");
                frames.insert(room, clock.started(room));
            }
            ProgramEvent::Mixing(room) => room_cpu.mixing(room),
            ProgramEvent::Frame(room, frame) => {
                room_cpu.mixed(room, metrics);
                if let Some(n) = frames.get(&room) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                let record = Bytes::copy_from_slice(frame.record);
                // The relay frame without its length prefix: one datagram per subscribed edge.
                fanout.program_frame(room, &record.slice(4..));
                for link in packagers.values_mut() {
                    let tx = link.streams.entry(room).or_insert_with(|| {
                        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
                        runtime.spawn(program_writer(link.conn.clone(), room, rx, metrics.clone()));
                        // Who the room's speakers are, before the frames naming them.
                        for record in identities.get(&room).into_iter().flat_map(|m| m.values()) {
                            if tx.try_send(record.clone()).is_err() {
                                metrics.program_frames_dropped.inc();
                            }
                        }
                        tx
                    });
                    if tx.try_send(record.clone()).is_err() {
                        metrics.program_frames_dropped.inc();
                    }
                }
            }
            ProgramEvent::Idle(room) => {
                tracing::info!(%room, "room idle without speakers: ending it");
                let _ = idle_tx.send(room);
            }
            ProgramEvent::Stopped(room) => {
                tracing::info!(%room, "program stopped");
                room_cpu.stopped(room, metrics);
                identities.remove(&room);
                frames.remove(&room);
                clock.stopped(room);
                for link in packagers.values_mut() {
                    link.streams.remove(&room);
                }
            }
        })?;
        metrics
            .rooms_running
            .set(i64::try_from(programs.running()).unwrap_or(i64::MAX));
        metrics.set_mix_stats(programs.stats());
        metrics.set_mixer_thread_cpu(crate::thread_cpu_time());
        Ok(())
    }
}

/// Run the mixer loop until `shutdown` or until both command channels close. Rooms idle for
/// `config.idle_end` are sent on `idle_tx` (the hub ends them); every running program's
/// position is kept in `clock`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn mixer_loop(
    mut packets: mpsc::Receiver<MixerCmd>,
    mut control: mpsc::UnboundedReceiver<MixerCmd>,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    config: ProgramsConfig,
    idle_tx: mpsc::UnboundedSender<RoomId>,
    clock: Arc<ProgramClock>,
    fanout: Arc<dyn ProgramFanout>,
    shutdown: CancellationToken,
) -> Result<(), crate::mixer::MixError> {
    let mut driver = Driver {
        programs: Programs::new(config, Instant::now()),
        clock,
        frames: HashMap::new(),
        idle_tx,
        packagers: HashMap::new(),
        opened: HashSet::new(),
        metrics,
        runtime,
        room_cpu: RoomCpu::default(),
        identities: HashMap::new(),
        fanout,
    };
    loop {
        let deadline = tokio::time::Instant::from_std(driver.programs.next_tick_at());
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            cmd = control.recv() => match cmd {
                Some(cmd) => driver.command(cmd),
                None => break,
            },
            // The tick goes before packets so a steady packet flow cannot starve it.
            _ = tokio::time::sleep_until(deadline) => {
                // Everything that arrived before the tick goes into it.
                while let Ok(cmd) = control.try_recv() {
                    driver.command(cmd);
                }
                for _ in 0..BATCH {
                    match packets.try_recv() {
                        Ok(cmd) => driver.command(cmd),
                        Err(_) => break,
                    }
                }
                driver.poll(Instant::now())?;
            }
            cmd = packets.recv() => match cmd {
                Some(cmd) => {
                    driver.command(cmd);
                    for _ in 0..BATCH {
                        match packets.try_recv() {
                            Ok(cmd) => driver.command(cmd),
                            Err(_) => break,
                        }
                    }
                }
                None => break,
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_records_are_program_stream_records_the_packager_decodes() {
        let room = RoomId(0x0102_0304_0506_0708);
        let record = identity_record(room, 7, "ada-1815", "Ada Lovelace").unwrap();
        let len = u32::from_le_bytes(record[..4].try_into().unwrap()) as usize;
        assert_eq!(len, record.len() - 4);
        let frame = RelayFrame::decode(&record[4..]).unwrap();
        assert_eq!(
            (frame.kind, frame.room, frame.speaker),
            (FrameKind::SpeakerIdentity, room, 7)
        );
        assert_eq!(
            SpeakerIdentity::decode(frame.payload),
            Ok(SpeakerIdentity {
                user: "ada-1815",
                name: "Ada Lovelace"
            })
        );
        // A user id the API would never mint cannot be carried.
        assert!(identity_record(room, 7, "", "x").is_none());
    }
}
