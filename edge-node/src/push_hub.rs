//! The push listeners' hub: [`PushCore`] behind a lock, and the writers
//! ([`push_fanout::Writer`], one per runtime worker) that hold the listeners' sockets. The
//! uplink hands it program frames and reads its subscriptions; `push_ws` and `push_wt` reserve a
//! listener's place before the WebSocket upgrade or the WebTransport session and attach its
//! connection after it.

use crate::metrics::Metrics;
use crate::push::{Message, PushConfig, PushCore, PushOutput, PushRefusal};
use crate::push_fanout::{close_frame, Command, Inbox, Outbox, Writer, CLOSE_ENDED};
use crate::push_io::PushIo;
use amphi_protocol::push::AudioMessage;
use amphi_protocol::RoomId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often rooms without listeners are looked at.
const TICK: Duration = Duration::from_secs(1);

struct Inner {
    core: PushCore,
    /// Each room's listeners per writer.
    rooms: HashMap<RoomId, Vec<u32>>,
    /// Listeners per writer.
    load: Vec<usize>,
}

/// The push listeners of this edge: the core and the writers.
pub(crate) struct PushHub {
    inner: Mutex<Inner>,
    writers: Vec<Arc<Inbox<PushIo>>>,
    /// Subscriptions for the uplink.
    control: mpsc::UnboundedSender<PushOutput>,
    /// The edge's metrics (the writers count skips and drops here too).
    pub(crate) metrics: Arc<Metrics>,
}

/// A listener's place: reserved before the upgrade, given back when dropped (by the writer
/// once it let the connection go, or here if the upgrade failed).
pub(crate) struct Reservation {
    hub: Arc<PushHub>,
    room: RoomId,
    writer: Option<usize>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.hub.leave(self.room, self.writer);
    }
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl PushHub {
    /// A hub with `writers` writer tasks (spawned here, on the current runtime, until
    /// `shutdown`) whose subscriptions go to `control` (read by the uplink).
    pub(crate) fn start(
        cfg: PushConfig,
        writers: usize,
        metrics: Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<PushOutput>) {
        let (control, rx) = mpsc::unbounded_channel();
        let writers = writers.max(1);
        let inboxes: Vec<Arc<Inbox<PushIo>>> =
            (0..writers).map(|_| Arc::new(Inbox::default())).collect();
        for inbox in &inboxes {
            let writer = Writer::new(inbox.clone(), metrics.clone());
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = writer.run() => {}
                }
            });
        }
        let hub = PushHub {
            inner: Mutex::new(Inner {
                core: PushCore::new(cfg),
                rooms: HashMap::new(),
                load: vec![0; writers],
            }),
            writers: inboxes,
            control,
            metrics,
        };
        hub.set_gauge(&hub.lock());
        (Arc::new(hub), rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Push listeners per room (for the router's heartbeat).
    pub(crate) fn listeners_per_room(&self) -> std::collections::BTreeMap<RoomId, u32> {
        self.lock().core.listeners_per_room()
    }

    /// A program frame from an origin: a completed message goes to every writer holding
    /// listeners of the room.
    pub(crate) fn program_frame(&self, room: RoomId, rtp_ts: u32, opus: &[u8]) {
        self.metrics.push_program_frames.inc();
        let mut inner = self.lock();
        if let Some(msg) = inner.core.program_frame(room, rtp_ts, opus, unix_us()) {
            self.fan_out(&inner, room, msg);
        }
    }

    /// An audio message of `room` from this edge's parent in the relay tree: its frames, as if
    /// from an origin (frames the room already has are dropped by the core).
    pub(crate) fn feed_message(&self, room: RoomId, msg: &AudioMessage<'_>) {
        self.metrics.push_feed_frames.inc_by(msg.len() as u64);
        let at = unix_us();
        let mut inner = self.lock();
        for frame in msg.frames() {
            if let Some(msg) = inner.core.room_frame(room, frame.ts, frame.opus, at) {
                self.fan_out(&inner, room, msg);
            }
        }
    }

    /// The room timestamp of `room`'s last frame here.
    pub(crate) fn last_ts(&self, room: RoomId) -> Option<u64> {
        self.lock().core.last_ts(room)
    }

    /// A completed message goes to every writer holding listeners of the room.
    fn fan_out(&self, inner: &Inner, room: RoomId, msg: Message) {
        self.metrics.push_messages.inc();
        let (Some(per_writer), Some(header)) = (inner.rooms.get(&room), inner.core.header(room))
        else {
            return;
        };
        for (w, _) in per_writer.iter().enumerate().filter(|(_, &n)| n > 0) {
            self.writers[w].send(Command::Message {
                room,
                header: header.clone(),
                frame: msg.frame.clone(),
            });
        }
    }

    /// The origin ended `room`: its listeners are closed.
    pub(crate) fn room_ended(&self, room: RoomId) {
        let mut inner = self.lock();
        let out = inner.core.room_ended(room, Instant::now());
        if let Some(per_writer) = inner.rooms.get(&room) {
            for (w, _) in per_writer.iter().enumerate().filter(|(_, &n)| n > 0) {
                self.writers[w].send(Command::Ended(room));
            }
        }
        self.set_gauge(&inner);
        drop(inner);
        if let Some(out) = out {
            let _ = self.control.send(out);
        }
    }

    /// Reserve a listener's place in `room` (refused when the edge is full or the room ended).
    pub(crate) fn reserve(self: &Arc<Self>, room: RoomId) -> Result<Reservation, PushRefusal> {
        let mut inner = self.lock();
        let (_, out) = inner.core.join(room, None)?;
        self.set_gauge(&inner);
        drop(inner);
        if let Some(out) = out {
            let _ = self.control.send(out);
        }
        Ok(Reservation {
            hub: self.clone(),
            room,
            writer: None,
        })
    }

    /// Hand a reserved listener's connection to the least loaded writer, with the messages it
    /// missed after room timestamp `after`.
    pub(crate) fn attach(&self, mut place: Reservation, io: PushIo, after: Option<u64>) {
        let room = place.room;
        let mut inner = self.lock();
        let header = inner.core.header(room);
        let backlog = inner.core.backlog(room, after).into_iter().map(|m| m.frame);
        let mut outbox = Outbox::new(header, backlog);
        if inner.core.is_ended(room) {
            outbox.close(close_frame(CLOSE_ENDED, "ended"));
        }
        let w = (0..inner.load.len())
            .min_by_key(|&w| inner.load[w])
            .unwrap_or(0);
        inner.load[w] += 1;
        let writers = inner.load.len();
        inner.rooms.entry(room).or_insert_with(|| vec![0; writers])[w] += 1;
        place.writer = Some(w);
        // The command is queued under the lock: no message of the room can pass it.
        self.writers[w].send(Command::Join {
            room,
            io,
            outbox,
            guard: Box::new(place),
        });
    }

    fn leave(&self, room: RoomId, writer: Option<usize>) {
        let mut inner = self.lock();
        inner.core.leave(room, Instant::now());
        if let Some(w) = writer {
            inner.load[w] = inner.load[w].saturating_sub(1);
            if let Some(per_writer) = inner.rooms.get_mut(&room) {
                per_writer[w] = per_writer[w].saturating_sub(1);
                if per_writer.iter().all(|&n| n == 0) {
                    inner.rooms.remove(&room);
                }
            }
        }
        self.set_gauge(&inner);
    }

    fn set_gauge(&self, inner: &Inner) {
        self.metrics
            .push_listeners
            .set(i64::try_from(inner.core.listeners()).unwrap_or(i64::MAX));
        self.metrics
            .push_frames_per_message
            .set(i64::try_from(inner.core.frames_per_message()).unwrap_or(i64::MAX));
    }

    /// Whether the origin ended `room`.
    pub(crate) fn is_ended(&self, room: RoomId) -> bool {
        self.lock().core.is_ended(room)
    }

    /// Unsubscribe rooms without listeners for a while, until `shutdown`.
    pub(crate) async fn tick_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let outs = self.lock().core.poll(Instant::now());
            for out in outs {
                let _ = self.control.send(out);
            }
        }
    }
}
