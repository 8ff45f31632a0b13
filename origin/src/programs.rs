//! Every room's program on one mix timeline (sans-IO): start on demand, tick every 20 ms until the
//! room ends (a live room without speakers keeps producing encoded silence, so its LL-HLS playlist
//! keeps moving, RFC 8216 §6.2.1), report rooms idle for the configured time so the driver ends
//! them through the normal end path, remember ended rooms.
//!
//! The timeline is a grid of ticks `epoch + k * 20 ms`; [`Programs::poll`] mixes every tick that
//! is due at `now`, so a late wake-up catches up in a burst and the output stays at exactly 50
//! frames per second on average.

use crate::jitter::{PushOutcome, FRAME_NS};
use crate::mixer::{MixError, MixStats, MixerConfig, ProgramFrame, RoomMixer, SpeakerPacket};
use amphi_protocol::relay::{FrameKind, RelayFrame};
use amphi_protocol::RoomId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Ticks mixed at most in one poll; beyond that the timeline jumps ahead.
const MAX_BURST: u64 = 250;
/// How often (in ticks) idle bookkeeping runs.
const HOUSEKEEPING_TICKS: u64 = 50;

/// Default [`ProgramsConfig::idle_end`]: a room is ended after an hour without speakers.
pub const DEFAULT_IDLE_END: Duration = Duration::from_secs(3600);

/// Tuning of [`Programs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramsConfig {
    /// Mixer settings of every room.
    pub mixer: MixerConfig,
    /// A live room without speakers or packets for this long is reported idle
    /// ([`ProgramEvent::Idle`]) so that it is ended; `None`: never. The program itself only stops
    /// when the room ends.
    pub idle_end: Option<Duration>,
    /// Unannounced speakers (packets without `SpeakerJoined`) are forgotten after this long.
    pub speaker_idle: Duration,
    /// Ended rooms refuse packets and joins for this long.
    pub ended_memory: Duration,
    /// Rooms mixed at most at once.
    pub max_rooms: usize,
}

impl Default for ProgramsConfig {
    fn default() -> Self {
        ProgramsConfig {
            mixer: MixerConfig::default(),
            idle_end: Some(DEFAULT_IDLE_END),
            speaker_idle: Duration::from_secs(10),
            ended_memory: Duration::from_secs(600),
            max_rooms: 512,
        }
    }
}

/// What happened to an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Handed to the room's mixer (with the jitter buffer's verdict for packets).
    Mixed(PushOutcome),
    /// The room has ended: ignored.
    RoomEnded,
    /// Too many rooms running: ignored.
    TooManyRooms,
    /// Too many speakers in the room: ignored.
    TooManySpeakers,
}

/// Output of [`Programs::poll`].
#[derive(Debug)]
pub enum ProgramEvent<'a> {
    /// A room's program started; frames follow.
    Started(RoomId),
    /// A room's mixer is about to mix and encode one tick; its `Frame` follows (drivers bracket
    /// the work with these two events to measure each room's mixing cost).
    Mixing(RoomId),
    /// One program frame of a room.
    Frame(RoomId, ProgramFrame<'a>),
    /// A room had no speakers for [`ProgramsConfig::idle_end`] (reported once): end it through
    /// the normal end path; its program keeps running until then.
    Idle(RoomId),
    /// A room's program stopped (the room ended); its stream should be finished.
    Stopped(RoomId),
}

struct Program {
    mixer: RoomMixer,
    last_activity_ns: i64,
    announced: bool,
    idle_reported: bool,
}

/// All running programs. See the module documentation.
pub struct Programs {
    cfg: ProgramsConfig,
    epoch: Instant,
    next_tick: u64,
    rooms: HashMap<RoomId, Program>,
    ended: HashMap<RoomId, i64>,
    stopped: Vec<RoomId>,
    idle: Vec<RoomId>,
    retired: MixStats,
}

fn to_ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Programs {
    /// No programs yet; tick 0 is due at `epoch`.
    pub fn new(cfg: ProgramsConfig, epoch: Instant) -> Self {
        Programs {
            cfg,
            epoch,
            next_tick: 0,
            rooms: HashMap::new(),
            ended: HashMap::new(),
            stopped: Vec::new(),
            idle: Vec::new(),
            retired: MixStats::default(),
        }
    }

    fn ns(&self, t: Instant) -> i64 {
        to_ns(t.saturating_duration_since(self.epoch))
    }

    /// When the next tick is due.
    pub fn next_tick_at(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.next_tick.saturating_mul(FRAME_NS as u64))
    }

    /// Rooms whose program is running.
    pub fn running(&self) -> usize {
        self.rooms.len()
    }

    /// Whether `room`'s program is running.
    pub fn is_running(&self, room: RoomId) -> bool {
        self.rooms.contains_key(&room)
    }

    /// Counters of all mixers, past and present.
    pub fn stats(&self) -> MixStats {
        let mut s = self.retired;
        for p in self.rooms.values() {
            s.add(&p.mixer.stats());
        }
        s
    }

    fn room(&mut self, room: RoomId, now_ns: i64) -> Result<&mut Program, Admission> {
        if self.ended.contains_key(&room) {
            return Err(Admission::RoomEnded);
        }
        if !self.rooms.contains_key(&room) {
            if self.rooms.len() >= self.cfg.max_rooms {
                return Err(Admission::TooManyRooms);
            }
            let mixer =
                RoomMixer::new(room, self.cfg.mixer).map_err(|_| Admission::TooManyRooms)?;
            self.rooms.insert(
                room,
                Program {
                    mixer,
                    last_activity_ns: now_ns,
                    announced: false,
                    idle_reported: false,
                },
            );
        }
        let p = self.rooms.get_mut(&room).ok_or(Admission::TooManyRooms)?;
        p.last_activity_ns = p.last_activity_ns.max(now_ns);
        p.idle_reported = false;
        Ok(p)
    }

    /// Connection `source` announced `speaker` in `room` (starts the program if needed).
    pub fn speaker_joined(
        &mut self,
        room: RoomId,
        speaker: u32,
        source: u64,
        now: Instant,
    ) -> Admission {
        let now_ns = self.ns(now);
        match self.room(room, now_ns) {
            Ok(p) => match p.mixer.join(speaker, source) {
                Ok(()) => Admission::Mixed(PushOutcome::Accepted),
                Err(_) => Admission::TooManySpeakers,
            },
            Err(a) => a,
        }
    }

    /// `speaker` stopped publishing in `room`.
    pub fn speaker_left(&mut self, room: RoomId, speaker: u32, now: Instant) {
        let now_ns = self.ns(now);
        if let Some(p) = self.rooms.get_mut(&room) {
            p.mixer.leave(speaker);
            p.last_activity_ns = p.last_activity_ns.max(now_ns);
        }
    }

    /// Connection `source` went away: every speaker it announced leaves.
    pub fn source_gone(&mut self, source: u64, now: Instant) {
        let now_ns = self.ns(now);
        for p in self.rooms.values_mut() {
            if p.mixer.has_joined_speakers() {
                p.mixer.source_gone(source);
                p.last_activity_ns = p.last_activity_ns.max(now_ns);
            }
        }
    }

    /// A speaker packet (kind `SpeakerAudio`, or its relay repeat `SpeakerRepeat`) that arrived
    /// at `arrival`.
    pub fn packet(&mut self, frame: &RelayFrame<'_>, arrival: Instant) -> Admission {
        let now_ns = self.ns(arrival);
        let next_tick = self.next_tick;
        if frame.kind == FrameKind::SpeakerRepeat {
            // A repeat neither starts a program nor counts as activity.
            return match self.rooms.get_mut(&frame.room) {
                Some(p) => Admission::Mixed(p.mixer.push_repeat(
                    frame.speaker,
                    frame.rtp_ts,
                    frame.payload,
                    frame.audio_level,
                    next_tick,
                )),
                None if self.ended.contains_key(&frame.room) => Admission::RoomEnded,
                None => Admission::Mixed(PushOutcome::OutOfRange),
            };
        }
        match self.room(frame.room, now_ns) {
            Ok(p) => match p.mixer.push(
                frame.speaker,
                SpeakerPacket {
                    seq: frame.seq,
                    rtp_ts: frame.rtp_ts,
                    payload: frame.payload,
                    level: frame.audio_level,
                },
                now_ns,
                next_tick,
            ) {
                Ok(outcome) => Admission::Mixed(outcome),
                Err(_) => Admission::TooManySpeakers,
            },
            Err(a) => a,
        }
    }

    /// The room ended: its program stops at the next poll and later input is refused for a while.
    /// Returns whether a program was running.
    pub fn room_ended(&mut self, room: RoomId, now: Instant) -> bool {
        let now_ns = self.ns(now);
        self.ended.insert(room, now_ns);
        if self.rooms.contains_key(&room) {
            self.stopped.push(room);
            true
        } else {
            false
        }
    }

    /// Mix every tick due at `now`, reporting starts, frames and stops to `sink`.
    pub fn poll(
        &mut self,
        now: Instant,
        sink: &mut dyn FnMut(ProgramEvent<'_>),
    ) -> Result<(), MixError> {
        self.flush_stopped(sink);
        let now_ns = self.ns(now);
        let due = now_ns.div_euclid(FRAME_NS) + 1;
        let due = u64::try_from(due).unwrap_or(0);
        if due > self.next_tick + MAX_BURST {
            self.next_tick = due - 1;
        }
        while self.next_tick < due {
            let tick = self.next_tick;
            self.next_tick += 1;
            for (&room, p) in self.rooms.iter_mut() {
                if !p.announced {
                    p.announced = true;
                    sink(ProgramEvent::Started(room));
                }
                sink(ProgramEvent::Mixing(room));
                let frame = p.mixer.mix(tick)?;
                sink(ProgramEvent::Frame(room, frame));
            }
            if tick % HOUSEKEEPING_TICKS == 0 {
                self.housekeeping(now_ns);
                self.flush_stopped(sink);
            }
        }
        Ok(())
    }

    fn housekeeping(&mut self, now_ns: i64) {
        let speaker_idle = to_ns(self.cfg.speaker_idle);
        let idle_end = self.cfg.idle_end.map(to_ns);
        for (&room, p) in self.rooms.iter_mut() {
            p.mixer.remove_idle(now_ns, speaker_idle);
            if let Some(idle_end) = idle_end {
                if p.mixer.speaker_count() == 0
                    && !p.idle_reported
                    && now_ns.saturating_sub(p.last_activity_ns) >= idle_end
                {
                    p.idle_reported = true;
                    self.idle.push(room);
                }
            }
        }
        let memory = to_ns(self.cfg.ended_memory);
        self.ended
            .retain(|_, at| now_ns.saturating_sub(*at) < memory);
    }

    fn flush_stopped(&mut self, sink: &mut dyn FnMut(ProgramEvent<'_>)) {
        for room in self.idle.drain(..) {
            sink(ProgramEvent::Idle(room));
        }
        for room in self.stopped.drain(..) {
            if let Some(p) = self.rooms.remove(&room) {
                self.retired.add(&p.mixer.stats());
                if p.announced {
                    sink(ProgramEvent::Stopped(room));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphi_protocol::relay::FrameKind;

    fn audio(room: u64, speaker: u32, ts: u32, payload: &[u8]) -> RelayFrame<'_> {
        RelayFrame {
            kind: FrameKind::SpeakerAudio,
            room: RoomId(room),
            speaker,
            seq: 0,
            rtp_ts: ts,
            audio_level: 30,
            payload,
        }
    }

    #[derive(Default)]
    struct Seen {
        started: Vec<RoomId>,
        /// Rooms announced by `Mixing` and not yet followed by their `Frame`.
        mixing: Vec<RoomId>,
        frames: Vec<(RoomId, u32)>,
        stopped: Vec<RoomId>,
        idle: Vec<RoomId>,
    }

    fn poll(p: &mut Programs, now: Instant, seen: &mut Seen) {
        p.poll(now, &mut |e| match e {
            ProgramEvent::Started(r) => seen.started.push(r),
            ProgramEvent::Mixing(r) => seen.mixing.push(r),
            ProgramEvent::Frame(r, f) => {
                assert_eq!(seen.mixing.pop(), Some(r), "Mixing announces each Frame");
                seen.frames.push((r, f.rtp_ts));
            }
            ProgramEvent::Stopped(r) => seen.stopped.push(r),
            ProgramEvent::Idle(r) => seen.idle.push(r),
        })
        .unwrap();
    }

    #[test]
    fn program_runs_at_fifty_frames_per_second() {
        let t0 = Instant::now();
        let mut p = Programs::new(ProgramsConfig::default(), t0);
        let mut seen = Seen::default();
        assert_eq!(
            p.speaker_joined(RoomId(5), 1, 77, t0),
            Admission::Mixed(PushOutcome::Accepted)
        );
        // Irregular wake-ups over one second still give exactly 50 frames.
        let mut t = Duration::ZERO;
        for step in [7u64, 33, 20, 1, 90, 19, 20, 310, 500] {
            t += Duration::from_millis(step);
            poll(&mut p, t0 + t, &mut seen);
        }
        assert_eq!(t, Duration::from_millis(1000));
        assert_eq!(seen.started, vec![RoomId(5)]);
        assert_eq!(seen.frames.len(), 51); // ticks 0..=50
        let ts: Vec<u32> = seen.frames.iter().map(|f| f.1).collect();
        assert!(ts.windows(2).all(|w| w[1] == w[0] + 960));
    }

    /// A live room whose speakers all left keeps producing (the playlist must not freeze) until
    /// it has been idle for `idle_end`, is reported once, and stops only when it ends.
    #[test]
    fn rooms_without_speakers_keep_producing_until_ended() {
        let t0 = Instant::now();
        let cfg = ProgramsConfig {
            idle_end: Some(Duration::from_secs(600)),
            ..ProgramsConfig::default()
        };
        let mut p = Programs::new(cfg, t0);
        let mut seen = Seen::default();
        p.speaker_joined(RoomId(5), 1, 77, t0);
        poll(&mut p, t0 + Duration::from_secs(1), &mut seen);
        p.speaker_left(RoomId(5), 1, t0 + Duration::from_secs(1));
        // Nine minutes of silence, polled every second: 50 frames a second, no stop, no idle.
        let before = seen.frames.len();
        for s in 2..=540u64 {
            poll(&mut p, t0 + Duration::from_secs(s), &mut seen);
        }
        assert_eq!(seen.frames.len() - before, 539 * 50);
        assert!(seen.stopped.is_empty(), "a live room's program never stops");
        assert!(seen.idle.is_empty());
        let ts: Vec<u32> = seen.frames.iter().map(|f| f.1).collect();
        assert!(
            ts.windows(2).all(|w| w[1] == w[0] + 960),
            "one continuous timeline"
        );
        // Ten minutes after the last speaker left: reported idle once, still producing.
        for s in 541..=700u64 {
            poll(&mut p, t0 + Duration::from_secs(s), &mut seen);
        }
        assert_eq!(seen.idle, vec![RoomId(5)]);
        assert!(seen.stopped.is_empty());
        assert!(p.is_running(RoomId(5)));
        // The driver ends it: the program stops.
        p.room_ended(RoomId(5), t0 + Duration::from_secs(700));
        poll(&mut p, t0 + Duration::from_secs(701), &mut seen);
        assert_eq!(seen.stopped, vec![RoomId(5)]);
        assert_eq!(p.running(), 0);
    }

    #[test]
    fn activity_resets_the_idle_clock_and_none_never_reports() {
        let t0 = Instant::now();
        let cfg = ProgramsConfig {
            idle_end: Some(Duration::from_secs(10)),
            ..ProgramsConfig::default()
        };
        let mut p = Programs::new(cfg, t0);
        let mut seen = Seen::default();
        p.speaker_joined(RoomId(1), 1, 7, t0);
        p.speaker_left(RoomId(1), 1, t0);
        for s in 1..=8u64 {
            poll(&mut p, t0 + Duration::from_secs(s), &mut seen);
        }
        // A speaker comes back for a moment at 8 s: the idle clock restarts.
        p.speaker_joined(RoomId(1), 2, 7, t0 + Duration::from_secs(8));
        p.speaker_left(RoomId(1), 2, t0 + Duration::from_secs(8));
        for s in 9..=17u64 {
            poll(&mut p, t0 + Duration::from_secs(s), &mut seen);
        }
        assert!(seen.idle.is_empty());
        for s in 18..=20u64 {
            poll(&mut p, t0 + Duration::from_secs(s), &mut seen);
        }
        assert_eq!(seen.idle, vec![RoomId(1)]);

        let cfg = ProgramsConfig {
            idle_end: None,
            ..ProgramsConfig::default()
        };
        let mut p = Programs::new(cfg, t0);
        let mut seen = Seen::default();
        p.speaker_joined(RoomId(2), 1, 7, t0);
        p.speaker_left(RoomId(2), 1, t0);
        for s in 1..=200u64 {
            poll(&mut p, t0 + Duration::from_secs(s * 30), &mut seen);
        }
        assert!(seen.idle.is_empty() && seen.stopped.is_empty());
        assert!(p.is_running(RoomId(2)));
    }

    #[test]
    fn ended_rooms_refuse_input_and_stop() {
        let t0 = Instant::now();
        let mut p = Programs::new(ProgramsConfig::default(), t0);
        let mut seen = Seen::default();
        p.packet(&audio(1, 2, 0, &[0xf8, 1, 2]), t0);
        poll(&mut p, t0 + Duration::from_millis(50), &mut seen);
        assert!(p.room_ended(RoomId(1), t0 + Duration::from_millis(55)));
        poll(&mut p, t0 + Duration::from_millis(60), &mut seen);
        assert_eq!(seen.stopped, vec![RoomId(1)]);
        assert_eq!(
            p.packet(
                &audio(1, 2, 960, &[0xf8, 1, 2]),
                t0 + Duration::from_millis(70)
            ),
            Admission::RoomEnded
        );
        assert_eq!(
            p.speaker_joined(RoomId(1), 3, 1, t0 + Duration::from_millis(70)),
            Admission::RoomEnded
        );
        assert!(!p.room_ended(RoomId(2), t0));
    }

    #[test]
    fn connection_loss_removes_its_speakers() {
        let t0 = Instant::now();
        let cfg = ProgramsConfig {
            idle_end: Some(Duration::from_secs(1)),
            ..ProgramsConfig::default()
        };
        let mut p = Programs::new(cfg, t0);
        let mut seen = Seen::default();
        p.speaker_joined(RoomId(3), 1, 42, t0);
        poll(&mut p, t0 + Duration::from_secs(5), &mut seen);
        assert!(seen.idle.is_empty(), "joined speakers keep it active");
        p.source_gone(42, t0 + Duration::from_secs(5));
        poll(&mut p, t0 + Duration::from_secs(7), &mut seen);
        assert_eq!(seen.idle, vec![RoomId(3)]);
        assert!(seen.stopped.is_empty());
    }

    #[test]
    fn room_limit() {
        let t0 = Instant::now();
        let cfg = ProgramsConfig {
            max_rooms: 1,
            ..ProgramsConfig::default()
        };
        let mut p = Programs::new(cfg, t0);
        p.speaker_joined(RoomId(1), 1, 1, t0);
        assert_eq!(
            p.speaker_joined(RoomId(2), 1, 1, t0),
            Admission::TooManyRooms
        );
    }
}
