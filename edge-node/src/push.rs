//! Push listeners (sans-IO): which rooms' program streams this edge needs from the origins, and the
//! messages every push listener of a room receives.
//!
//! [`PushCore`] counts each room's listeners. The first listener of a room makes it subscribe
//! (`SubscribeProgram` to the origins); a room without listeners for [`PushConfig::linger`] is
//! unsubscribed (a listener that reconnects meanwhile costs no round trip). Program frames from the
//! origin (`Program` relay frames, one per 20 ms) are gathered into audio messages of
//! [`PushConfig::frames_per_message`] frames, each encoded once, WebSocket framing included, as one
//! shared [`Bytes`] the driver writes to every listener of the room. A gap in the timestamps (a
//! lost datagram) closes the message early, so every message is a run of consecutive frames.
//!
//! A busy edge sends longer messages: from [`PushConfig::busy_listeners`] push listeners on
//! (until the count falls below three quarters of it) messages carry
//! [`PushConfig::busy_frames_per_message`] frames. The kernel's cost of a TCP write, not the
//! bytes, is most of what a push listener costs, so 5 frames instead of 3 cut the edge's CPU per
//! listener by about 40 % for at most 40 ms more delay.
//!
//! Room timestamps: the origin's 32-bit 48 kHz program timestamps are unwrapped into 64 bits, the
//! room timestamp a listener resumes after (`after`): the core keeps the last
//! [`PushConfig::backlog`] messages and hands a resuming listener those after its timestamp.

use amphi_protocol::push::{opcode, ws_server_frame, AudioMessage, PushFrame, PushHeader};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Tuning of [`PushCore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushConfig {
    /// Program frames (20 ms each) per audio message.
    pub frames_per_message: usize,
    /// Push listeners on this edge from which messages carry `busy_frames_per_message` frames.
    pub busy_listeners: usize,
    /// Program frames per audio message on a busy edge.
    pub busy_frames_per_message: usize,
    /// How long a room without listeners stays subscribed.
    pub linger: Duration,
    /// Messages kept per room for listeners that resume.
    pub backlog: usize,
    /// Push listeners this edge serves at most.
    pub max_listeners: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            frames_per_message: 3,
            busy_listeners: 1_000,
            busy_frames_per_message: 5,
            linger: Duration::from_secs(5),
            backlog: 32,
            max_listeners: 200_000,
        }
    }
}

/// A message the core wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushOutput {
    /// Ask the origins for this room's program frames.
    Subscribe(RoomId),
    /// Tell the origins this room's program is no longer needed.
    Unsubscribe(RoomId),
}

/// Why a listener was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PushRefusal {
    /// The edge serves [`PushConfig::max_listeners`] already.
    #[error("this edge serves its maximum of push listeners")]
    Full,
    /// The room ended.
    #[error("the room has ended")]
    Ended,
}

/// One audio message of a room, WebSocket-framed, with the timestamps it spans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Room timestamp of its first frame.
    pub first_ts: u64,
    /// Room timestamp of its last frame.
    pub last_ts: u64,
    /// The WebSocket binary frame, the same bytes for every listener.
    pub frame: Bytes,
}

#[derive(Debug, Default)]
struct PushRoom {
    listeners: usize,
    /// When the last listener left (the room is unsubscribed [`PushConfig::linger`] later).
    empty_since: Option<Instant>,
    /// The last frame's unwrapped timestamp.
    last_ts: Option<u64>,
    /// Frames of the message being gathered: timestamps and Opus bytes (reused buffers).
    pending_ts: Vec<u64>,
    pending: Vec<Vec<u8>>,
    seq: u32,
    /// The header frame, anchoring the room's first frame's timestamp at its arrival (Unix µs).
    header: Option<Bytes>,
    recent: VecDeque<Message>,
    /// Reused encoding buffer.
    scratch: Vec<u8>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct PushCore {
    cfg: PushConfig,
    rooms: HashMap<RoomId, PushRoom>,
    /// Rooms ended (refused until forgotten at the next [`PushCore::poll`] after an hour).
    ended: HashMap<RoomId, Instant>,
    listeners: usize,
    /// Whether messages carry [`PushConfig::busy_frames_per_message`] frames.
    busy: bool,
}

/// How long an ended room is remembered.
const ENDED_MEMORY: Duration = Duration::from_secs(3600);

/// Unwrap a 32-bit timestamp after `last` (a 64-bit timestamp): the nearest value with those low
/// 32 bits.
fn unwrap_ts(last: Option<u64>, ts: u32) -> u64 {
    let Some(last) = last else {
        return u64::from(ts);
    };
    let delta = ts.wrapping_sub(last as u32) as i32;
    last.checked_add_signed(i64::from(delta))
        .unwrap_or(u64::from(ts))
}

impl PushCore {
    /// No rooms yet.
    pub fn new(cfg: PushConfig) -> Self {
        PushCore {
            cfg,
            rooms: HashMap::new(),
            ended: HashMap::new(),
            listeners: 0,
            busy: false,
        }
    }

    /// Frames per audio message now (more on a busy edge).
    pub fn frames_per_message(&self) -> usize {
        let n = if self.busy {
            self.cfg.busy_frames_per_message
        } else {
            self.cfg.frames_per_message
        };
        n.clamp(1, amphi_protocol::push::MAX_FRAMES_PER_MESSAGE)
    }

    /// The listener count changed: an edge becomes busy at [`PushConfig::busy_listeners`] and
    /// stops being busy below three quarters of it (no flapping around the threshold).
    fn update_busy(&mut self) {
        let at = self.cfg.busy_listeners;
        if self.listeners >= at {
            self.busy = true;
        } else if self.listeners < at - at / 4 {
            self.busy = false;
        }
    }

    /// Push listeners served now.
    pub fn listeners(&self) -> usize {
        self.listeners
    }

    /// Push listeners per room, for rooms that have any.
    pub fn listeners_per_room(&self) -> BTreeMap<RoomId, u32> {
        self.rooms
            .iter()
            .filter(|(_, r)| r.listeners > 0)
            .map(|(room, r)| (*room, u32::try_from(r.listeners).unwrap_or(u32::MAX)))
            .collect()
    }

    /// Rooms subscribed now (every one is re-subscribed on a link that comes up).
    pub fn subscribed(&self) -> Vec<RoomId> {
        self.rooms.keys().copied().collect()
    }

    /// A listener of `room` connected, resuming after room timestamp `after` if given.
    /// Returns the messages to send it first (those after `after` still held), and whether the
    /// room must be subscribed now.
    pub fn join(
        &mut self,
        room: RoomId,
        after: Option<u64>,
    ) -> Result<(Vec<Message>, Option<PushOutput>), PushRefusal> {
        if self.ended.contains_key(&room) {
            return Err(PushRefusal::Ended);
        }
        if self.listeners >= self.cfg.max_listeners {
            return Err(PushRefusal::Full);
        }
        self.listeners += 1;
        self.update_busy();
        let new = !self.rooms.contains_key(&room);
        let r = self.rooms.entry(room).or_default();
        r.listeners += 1;
        r.empty_since = None;
        Ok((
            self.backlog(room, after),
            new.then_some(PushOutput::Subscribe(room)),
        ))
    }

    /// The messages of `room` still held that end after room timestamp `after` (none without).
    pub fn backlog(&self, room: RoomId, after: Option<u64>) -> Vec<Message> {
        match (self.rooms.get(&room), after) {
            (Some(r), Some(after)) => r
                .recent
                .iter()
                .filter(|m| m.last_ts > after)
                .cloned()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A listener of `room` disconnected at `now`.
    pub fn leave(&mut self, room: RoomId, now: Instant) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        if r.listeners == 0 {
            return;
        }
        r.listeners -= 1;
        if r.listeners == 0 {
            r.empty_since = Some(now);
        }
        self.listeners = self.listeners.saturating_sub(1);
        self.update_busy();
    }

    /// The room timestamp of `room`'s last frame (a feed resumes after it).
    pub fn last_ts(&self, room: RoomId) -> Option<u64> {
        self.rooms.get(&room)?.last_ts
    }

    /// The header a listener of `room` gets before its first message, once the room has a frame.
    pub fn header(&self, room: RoomId) -> Option<Bytes> {
        self.rooms.get(&room)?.header.clone()
    }

    /// The header frame anchoring room timestamp `ts` at `unix_us`; its `frames_per_message` is
    /// the most frames a message of this edge carries.
    fn encode_header(&self, room: RoomId, ts: u64, unix_us: u64) -> Option<Bytes> {
        let most = self
            .cfg
            .frames_per_message
            .max(self.cfg.busy_frames_per_message)
            .clamp(1, amphi_protocol::push::MAX_FRAMES_PER_MESSAGE);
        let header = PushHeader::opus(room.to_string(), most as u32, ts, unix_us);
        let json = serde_json::to_vec(&header).ok()?;
        let mut out = Vec::with_capacity(json.len() + 4);
        ws_server_frame(opcode::TEXT, &json, &mut out);
        Some(Bytes::from(out))
    }

    /// A program frame of `room` (its 32-bit timestamp and Opus packet) arrived at `unix_us`.
    /// Returns the message it completed, if any (also kept for resuming listeners). Frames of
    /// rooms without a subscription are ignored; a frame not after the last one is a duplicate.
    pub fn program_frame(
        &mut self,
        room: RoomId,
        rtp_ts: u32,
        opus: &[u8],
        unix_us: u64,
    ) -> Option<Message> {
        let last_ts = self.rooms.get(&room)?.last_ts;
        self.room_frame(room, unwrap_ts(last_ts, rtp_ts), opus, unix_us)
    }

    /// A frame of `room` with its room timestamp (from the parent edge's push stream), like
    /// [`PushCore::program_frame`].
    pub fn room_frame(
        &mut self,
        room: RoomId,
        ts: u64,
        opus: &[u8],
        unix_us: u64,
    ) -> Option<Message> {
        let cfg = self.cfg;
        let per_message = self.frames_per_message();
        let last_ts = self.rooms.get(&room)?.last_ts;
        if last_ts.is_some_and(|last| ts <= last) {
            return None;
        }
        let header = match last_ts {
            None => self.encode_header(room, ts, unix_us),
            Some(_) => None,
        };
        let r = self.rooms.get_mut(&room)?;
        let gap = r
            .last_ts
            .is_some_and(|last| ts != last + amphi_protocol::push::FRAME_SAMPLES);
        r.last_ts = Some(ts);
        if header.is_some() {
            r.header = header;
        }
        // A gap closes the message gathered so far (frames of one message are consecutive).
        let early = if gap { r.flush(cfg.backlog) } else { None };
        let i = r.pending_ts.len();
        r.pending_ts.push(ts);
        if r.pending.len() <= i {
            r.pending.push(Vec::new());
        }
        r.pending[i].clear();
        r.pending[i].extend_from_slice(opus);
        // After an early flush one frame is pending, so at most one message completes per
        // call (with one frame per message nothing is ever pending before a frame). An edge
        // that stopped being busy may hold more than it now sends: they go out together.
        if r.pending_ts.len() >= per_message {
            return r.flush(cfg.backlog);
        }
        early
    }

    /// `room` ended: its listeners are to be closed; the subscription goes.
    pub fn room_ended(&mut self, room: RoomId, now: Instant) -> Option<PushOutput> {
        self.ended.insert(room, now);
        let r = self.rooms.remove(&room)?;
        self.listeners = self.listeners.saturating_sub(r.listeners);
        self.update_busy();
        Some(PushOutput::Unsubscribe(room))
    }

    /// Whether `room` ended.
    pub fn is_ended(&self, room: RoomId) -> bool {
        self.ended.contains_key(&room)
    }

    /// Unsubscribe rooms without listeners for [`PushConfig::linger`]; forget long-ended rooms.
    pub fn poll(&mut self, now: Instant) -> Vec<PushOutput> {
        let linger = self.cfg.linger;
        let mut out = Vec::new();
        self.rooms.retain(|room, r| {
            let keep = r
                .empty_since
                .is_none_or(|since| now.saturating_duration_since(since) < linger);
            if !keep {
                out.push(PushOutput::Unsubscribe(*room));
            }
            keep
        });
        self.ended
            .retain(|_, at| now.saturating_duration_since(*at) < ENDED_MEMORY);
        out
    }
}

impl PushRoom {
    /// Encode the gathered frames as one message (kept in `recent`, at most `backlog`).
    fn flush(&mut self, backlog: usize) -> Option<Message> {
        let n = self.pending_ts.len();
        if n == 0 {
            return None;
        }
        let frames: Vec<PushFrame<'_>> = self
            .pending_ts
            .iter()
            .zip(&self.pending)
            .map(|(&ts, opus)| PushFrame { ts, opus })
            .collect();
        self.scratch.clear();
        let encoded = AudioMessage::encode(self.seq, &frames, &mut self.scratch);
        let (first_ts, last_ts) = (self.pending_ts[0], self.pending_ts[n - 1]);
        self.pending_ts.clear();
        encoded.ok()?;
        self.seq = self.seq.wrapping_add(1);
        let mut frame = Vec::with_capacity(self.scratch.len() + 4);
        ws_server_frame(opcode::BINARY, &self.scratch, &mut frame);
        let msg = Message {
            first_ts,
            last_ts,
            frame: Bytes::from(frame),
        };
        if self.recent.len() >= backlog.max(1) {
            self.recent.pop_front();
        }
        self.recent.push_back(msg.clone());
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphi_protocol::push::{AudioMessage, PushHeader};

    /// The audio message inside a WebSocket binary frame of the core (short frames: 2-byte
    /// header, or 4 with a 16-bit length).
    fn payload(frame: &[u8]) -> &[u8] {
        assert_eq!(frame[0], 0x82);
        match frame[1] {
            126 => &frame[4..],
            n => {
                assert!(n < 126);
                &frame[2..]
            }
        }
    }

    fn frames_of(m: &Message) -> Vec<(u64, Vec<u8>)> {
        AudioMessage::decode(payload(&m.frame))
            .unwrap()
            .frames()
            .map(|f| (f.ts, f.opus.to_vec()))
            .collect()
    }

    #[test]
    fn the_first_listener_subscribes_and_the_last_one_unsubscribes_after_the_linger() {
        let t0 = Instant::now();
        let mut core = PushCore::new(PushConfig::default());
        let room = RoomId(5);
        let (backlog, out) = core.join(room, None).unwrap();
        assert!(backlog.is_empty());
        assert_eq!(out, Some(PushOutput::Subscribe(room)));
        assert_eq!(core.join(room, None).unwrap().1, None);
        assert_eq!(core.listeners(), 2);
        assert_eq!(core.listeners_per_room(), BTreeMap::from([(room, 2)]));
        core.leave(room, t0);
        core.leave(room, t0 + Duration::from_secs(1));
        assert_eq!(core.listeners(), 0);
        assert!(core.poll(t0 + Duration::from_secs(5)).is_empty());
        // A listener back within the linger keeps the subscription.
        assert_eq!(core.join(room, None).unwrap().1, None);
        assert!(core.poll(t0 + Duration::from_secs(60)).is_empty());
        core.leave(room, t0 + Duration::from_secs(60));
        assert!(core.poll(t0 + Duration::from_secs(64)).is_empty());
        assert_eq!(
            core.poll(t0 + Duration::from_secs(66)),
            vec![PushOutput::Unsubscribe(room)]
        );
        assert!(core.subscribed().is_empty());
        // The next listener subscribes again.
        assert_eq!(
            core.join(room, None).unwrap().1,
            Some(PushOutput::Subscribe(room))
        );
    }

    #[test]
    fn frames_are_gathered_into_shared_messages_and_a_gap_closes_one_early() {
        let mut core = PushCore::new(PushConfig::default());
        let room = RoomId(5);
        // Frames of a room nobody listens to are ignored.
        assert_eq!(core.program_frame(room, 0, &[1], 10), None);
        core.join(room, None).unwrap();
        assert_eq!(core.header(room), None);
        assert_eq!(core.program_frame(room, 960, &[1], 1_000), None);
        assert_eq!(core.program_frame(room, 1920, &[2], 21_000), None);
        // A duplicate changes nothing.
        assert_eq!(core.program_frame(room, 1920, &[2], 21_500), None);
        let m = core.program_frame(room, 2880, &[3, 3], 41_000).unwrap();
        assert_eq!((m.first_ts, m.last_ts), (960, 2880));
        assert_eq!(
            frames_of(&m),
            vec![(960, vec![1]), (1920, vec![2]), (2880, vec![3, 3])]
        );
        assert_eq!(AudioMessage::decode(payload(&m.frame)).unwrap().seq, 0);
        // The header anchors timestamp 960 at its arrival.
        let h = core.header(room).unwrap();
        assert_eq!(h[0], 0x81);
        let json = if h[1] == 126 { &h[4..] } else { &h[2..] };
        let header: PushHeader = serde_json::from_slice(json).unwrap();
        assert_eq!((header.ts_base, header.ts_base_unix_us), (960, 1_000));
        // The most frames a message of this edge may carry (a busy edge's).
        assert_eq!(header.frames_per_message, 5);
        // Frame 4 arrives, 5 is lost: frame 6 closes a message of frame 4 alone.
        assert_eq!(core.program_frame(room, 3840, &[4], 61_000), None);
        let early = core.program_frame(room, 5760, &[6], 101_000).unwrap();
        assert_eq!(frames_of(&early), vec![(3840, vec![4])]);
        assert_eq!(AudioMessage::decode(payload(&early.frame)).unwrap().seq, 1);
        assert_eq!(core.program_frame(room, 6720, &[7], 121_000), None);
        let next = core.program_frame(room, 7680, &[8], 141_000).unwrap();
        assert_eq!(
            frames_of(&next),
            vec![(5760, vec![6]), (6720, vec![7]), (7680, vec![8])]
        );
    }

    #[test]
    fn a_busy_edge_sends_longer_messages_until_its_audience_shrinks_by_a_quarter() {
        let t0 = Instant::now();
        let mut core = PushCore::new(PushConfig {
            busy_listeners: 4,
            ..PushConfig::default()
        });
        let (room, other) = (RoomId(5), RoomId(6));
        let mut ts = 0u32;
        let mut next_message = |core: &mut PushCore| loop {
            ts = ts.wrapping_add(960);
            if let Some(m) = core.program_frame(room, ts, &[1], 0) {
                return frames_of(&m).len();
            }
        };
        for _ in 0..3 {
            core.join(room, None).unwrap();
        }
        assert_eq!(core.frames_per_message(), 3);
        assert_eq!(next_message(&mut core), 3);
        // The fourth listener (of any room) makes the edge busy.
        core.join(other, None).unwrap();
        assert_eq!(core.frames_per_message(), 5);
        assert_eq!(next_message(&mut core), 5);
        assert_eq!(next_message(&mut core), 5);
        // Three of four is not below three quarters: still busy.
        core.leave(other, t0);
        assert_eq!(core.frames_per_message(), 5);
        assert_eq!(next_message(&mut core), 5);
        // Two are: the pending frames complete at 3 again.
        core.leave(room, t0);
        assert_eq!(core.frames_per_message(), 3);
        for _ in 0..4 {
            assert_eq!(next_message(&mut core), 3);
        }
        // Back at four, then the room ends: its three listeners go and the edge is quiet.
        core.join(other, None).unwrap();
        core.join(other, None).unwrap();
        assert_eq!(core.frames_per_message(), 5);
        core.room_ended(room, t0);
        assert_eq!(core.listeners(), 2);
        assert_eq!(core.frames_per_message(), 3);
    }

    #[test]
    fn a_message_gathered_while_busy_goes_out_whole_when_the_edge_calms_down() {
        let t0 = Instant::now();
        let mut core = PushCore::new(PushConfig {
            busy_listeners: 2,
            ..PushConfig::default()
        });
        let room = RoomId(5);
        core.join(room, None).unwrap();
        core.join(room, None).unwrap();
        for i in 1..=4u32 {
            assert_eq!(core.program_frame(room, 960 * i, &[1], 0), None);
        }
        core.leave(room, t0);
        // Four frames held, three per message now: the fifth closes a message of all five.
        let m = core.program_frame(room, 960 * 5, &[1], 0).unwrap();
        assert_eq!(frames_of(&m).len(), 5);
        assert_eq!((m.first_ts, m.last_ts), (960, 4800));
    }

    #[test]
    fn timestamps_unwrap_past_32_bits_and_a_resuming_listener_gets_what_it_missed() {
        let cfg = PushConfig {
            frames_per_message: 1,
            backlog: 3,
            ..PushConfig::default()
        };
        let mut core = PushCore::new(cfg);
        let room = RoomId(9);
        core.join(room, None).unwrap();
        let start = u32::MAX - 960 * 2 + 1;
        let mut last = Vec::new();
        for i in 0..5u32 {
            let m = core
                .program_frame(room, start.wrapping_add(960 * i), &[i as u8 + 1], 0)
                .unwrap();
            last.push(m.last_ts);
        }
        let expect: Vec<u64> = (0..5).map(|i| u64::from(start) + 960 * i).collect();
        assert_eq!(last, expect);
        assert!(last[4] > u64::from(u32::MAX));
        // Resuming after the second frame: the backlog holds the last three; all are after it.
        let (backlog, out) = core.join(room, Some(expect[1])).unwrap();
        assert_eq!(out, None);
        let got: Vec<u64> = backlog.iter().map(|m| m.last_ts).collect();
        assert_eq!(got, expect[2..].to_vec());
        let (backlog, _) = core.join(room, Some(expect[3])).unwrap();
        assert_eq!(backlog.len(), 1);
    }

    #[test]
    fn ended_rooms_and_a_full_edge_refuse_listeners() {
        let t0 = Instant::now();
        let mut core = PushCore::new(PushConfig {
            max_listeners: 2,
            ..PushConfig::default()
        });
        let (a, b) = (RoomId(1), RoomId(2));
        core.join(a, None).unwrap();
        core.join(b, None).unwrap();
        assert_eq!(core.join(a, None), Err(PushRefusal::Full));
        assert_eq!(core.room_ended(a, t0), Some(PushOutput::Unsubscribe(a)));
        assert_eq!(core.listeners(), 1);
        assert_eq!(core.join(a, None), Err(PushRefusal::Ended));
        assert!(core.is_ended(a));
        // Leaving an ended room changes nothing.
        core.leave(a, t0);
        assert_eq!(core.listeners(), 1);
        core.poll(t0 + ENDED_MEMORY);
        assert!(!core.is_ended(a));
        assert!(core.join(a, None).is_ok());
    }
}
