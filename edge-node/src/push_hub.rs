//! The push listeners' hub: [`PushCore`] behind a lock and each room's broadcast channel. The
//! uplink hands it program frames and reads its subscriptions; the WebSocket listeners of
//! `push_ws` join, leave and read their room's channel.

use crate::metrics::Metrics;
use crate::push::{Message, PushConfig, PushCore, PushOutput, PushRefusal};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Messages a room's channel holds for listeners that fall behind (about 2 s).
pub const PUSH_QUEUE: usize = 32;
/// How often rooms without listeners are looked at.
const TICK: Duration = Duration::from_secs(1);

struct Inner {
    core: PushCore,
    rooms: HashMap<RoomId, broadcast::Sender<Bytes>>,
}

/// The push listeners of this edge: the core and each room's channel.
pub(crate) struct PushHub {
    inner: Mutex<Inner>,
    /// Subscriptions for the uplink.
    control: mpsc::UnboundedSender<PushOutput>,
    /// The edge's metrics (the listeners count their skips and drops here too).
    pub(crate) metrics: Arc<Metrics>,
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl PushHub {
    /// A hub whose subscriptions go to `control` (read by the uplink).
    pub(crate) fn new(
        cfg: PushConfig,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<PushOutput>) {
        let (control, rx) = mpsc::unbounded_channel();
        let hub = PushHub {
            inner: Mutex::new(Inner {
                core: PushCore::new(cfg),
                rooms: HashMap::new(),
            }),
            control,
            metrics,
        };
        (Arc::new(hub), rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rooms subscribed now (announced again on every link that comes up).
    pub(crate) fn subscribed(&self) -> Vec<RoomId> {
        self.lock().core.subscribed()
    }

    /// A program frame from an origin.
    pub(crate) fn program_frame(&self, room: RoomId, rtp_ts: u32, opus: &[u8]) {
        self.metrics.push_program_frames.inc();
        let mut inner = self.lock();
        let Some(msg) = inner.core.program_frame(room, rtp_ts, opus, unix_us()) else {
            return;
        };
        self.metrics.push_messages.inc();
        if let Some(tx) = inner.rooms.get(&room) {
            // No receiver is not an error: the room is lingering.
            let _ = tx.send(msg.frame);
        }
    }

    /// The origin ended `room`: its listeners are closed (their channel goes).
    pub(crate) fn room_ended(&self, room: RoomId) {
        let mut inner = self.lock();
        let out = inner.core.room_ended(room, Instant::now());
        inner.rooms.remove(&room);
        self.metrics
            .push_listeners
            .set(i64::try_from(inner.core.listeners()).unwrap_or(i64::MAX));
        drop(inner);
        if let Some(out) = out {
            let _ = self.control.send(out);
        }
    }

    pub(crate) fn join(
        &self,
        room: RoomId,
        after: Option<u64>,
    ) -> Result<(Vec<Message>, broadcast::Receiver<Bytes>), PushRefusal> {
        let mut inner = self.lock();
        let (backlog, out) = inner.core.join(room, after)?;
        let rx = inner
            .rooms
            .entry(room)
            .or_insert_with(|| broadcast::channel(PUSH_QUEUE).0)
            .subscribe();
        self.metrics
            .push_listeners
            .set(i64::try_from(inner.core.listeners()).unwrap_or(i64::MAX));
        drop(inner);
        if let Some(out) = out {
            let _ = self.control.send(out);
        }
        Ok((backlog, rx))
    }

    pub(crate) fn leave(&self, room: RoomId) {
        let mut inner = self.lock();
        inner.core.leave(room, Instant::now());
        self.metrics
            .push_listeners
            .set(i64::try_from(inner.core.listeners()).unwrap_or(i64::MAX));
    }

    /// Whether the origin ended `room`.
    pub(crate) fn is_ended(&self, room: RoomId) -> bool {
        self.lock().core.is_ended(room)
    }

    pub(crate) fn header(&self, room: RoomId) -> Option<Bytes> {
        self.lock().core.header(room)
    }

    /// Unsubscribe rooms without listeners for a while, until `shutdown`.
    pub(crate) async fn tick_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut inner = self.lock();
            let outs = inner.core.poll(Instant::now());
            for out in &outs {
                if let PushOutput::Unsubscribe(room) = out {
                    inner.rooms.remove(room);
                }
            }
            drop(inner);
            for out in outs {
                let _ = self.control.send(out);
            }
        }
    }
}
