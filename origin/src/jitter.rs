//! Per-speaker jitter buffer keyed by RTP timestamp (sans-IO).
//!
//! Time is explicit: arrivals are given in nanoseconds since the mixer epoch, and the mix timeline
//! is a grid of 20 ms ticks (tick `k` is due at `k * 20 ms`). The first packet of a speaker anchors
//! its RTP clock onto that grid with [`JitterConfig::initial_delay`] of slack; afterwards the
//! playout delay follows the spread of observed arrival times over a sliding window, within
//! [`JitterConfig::min_delay`]..=[`JitterConfig::max_delay`]. Growing the delay conceals one frame;
//! shrinking it skips one, but only a quiet frame (RFC 6464 level of
//! [`JitterConfig::quiet_level`] or more, i.e. that many dB below full scale or quieter) or a
//! missing one in silence, so speech is never cut. While packets go
//! missing, the delay keeps one frame more so a lost frame can be rebuilt from the in-band FEC
//! data of the packet after it ([`Pop::Recover`]). Reordering, duplicates, loss, RTP timestamp
//! wrap-around and a stream that restarts with an unrelated timestamp are handled; nothing here
//! allocates after construction.
//!
//! Discontinuous transmission (Opus DTX, `usedtx=1`): a sender in silence sends a packet every
//! ~400 ms instead of every 20 ms. Such a pause shows as a timestamp jump with the next sequence
//! number (a loss skips sequence numbers too), so it neither counts as loss nor holds the extra
//! FEC frame; and once a stream has paused so, a frame missing after a quiet one plays as silence
//! at once: no concealment (PLC noise, decode work) for a speaker who is not talking.

use amphi_protocol::audio::FRAME_SAMPLES;
use amphi_protocol::relay::MAX_OPUS_PAYLOAD;
use std::time::Duration;

/// Length of one tick of the mix timeline, in nanoseconds.
pub const FRAME_NS: i64 = 20_000_000;
/// Slots in the ring (640 ms): packets mapped further ahead than this are out of range.
pub const SLOTS: usize = 32;
/// Arrival samples the delay estimate looks at (five seconds of 20 ms packets): a scheduling
/// hiccup keeps the delay up for that long instead of the delay pumping every second.
const WINDOW: usize = 250;
/// Packets after a gap during which the delay keeps one extra frame for FEC recovery (10 s).
const FEC_HOLD_PACKETS: u32 = 500;
/// Samples needed before the delay may shrink below the initial delay.
const MIN_SAMPLES: u32 = 5;
/// A packet this late (or mapped beyond the ring) does not fit the current mapping.
const RESYNC_LATE_NS: i64 = 1_000_000_000;
/// Two out-of-range packets this close in RTP time re-anchor the stream.
const RESYNC_MAX_STEP: i32 = 5 * FRAME_SAMPLES as i32;
/// ... and this close in arrival time.
const RESYNC_MAX_GAP_NS: i64 = 200_000_000;

/// Tuning of a [`JitterBuffer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JitterConfig {
    /// Slack between a stream's first packet and its playout, before any jitter is measured.
    pub initial_delay: Duration,
    /// Smallest playout delay the adaptation goes down to.
    pub min_delay: Duration,
    /// Largest playout delay the adaptation goes up to.
    pub max_delay: Duration,
    /// Safety margin added to the measured arrival spread.
    pub margin: Duration,
    /// Missing frames concealed (PLC) before the speaker is treated as silent.
    pub max_concealed: u32,
    /// Accepted packets between two one-frame reductions of the delay.
    pub decrease_every: u32,
    /// RFC 6464 level (0 loudest ..= 127 silence) from which on a frame counts as quiet, so it
    /// may be skipped to shrink the delay.
    pub quiet_level: u8,
}

impl Default for JitterConfig {
    fn default() -> Self {
        JitterConfig {
            initial_delay: Duration::from_millis(40),
            // 10 ms let packets of a clean path arrive late whenever the host was busy (7 late,
            // 20 concealed frames in 23 s at load average 11: PESQ-WB 3.64 instead of 3.84).
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            margin: Duration::from_millis(5),
            max_concealed: 5,
            decrease_every: 5,
            quiet_level: 60,
        }
    }
}

/// What happened to a pushed packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// Buffered for playout.
    Accepted,
    /// The same RTP timestamp is already buffered or was played: dropped.
    Duplicate,
    /// Its playout tick has already been mixed: dropped.
    Late,
    /// Far outside the current mapping (a jump): dropped, remembered as a possible restart.
    OutOfRange,
    /// The stream restarted (a second consistent out-of-range packet): re-anchored and buffered.
    /// The caller should reset its decoder.
    Restarted,
    /// Empty or oversized payload: dropped.
    Invalid,
}

/// What to play for one tick.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop<'a> {
    /// The packet scheduled for this tick.
    Packet(&'a [u8]),
    /// The packet is missing but the next one is buffered: decode this frame from the next
    /// packet's in-band FEC data (libopus `decode(next, fec = true)`; PLC if it carries none).
    Recover(&'a [u8]),
    /// The packet is missing but the speaker was just talking: run packet-loss concealment.
    Conceal,
    /// Nothing to play.
    Silent,
}

/// Counters of a buffer's life (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JitterStats {
    /// Packets buffered.
    pub accepted: u64,
    /// Packets dropped because their tick had passed.
    pub late: u64,
    /// Duplicate packets dropped.
    pub duplicate: u64,
    /// Frames missing at playout while a later packet was already buffered.
    pub lost: u64,
    /// Frames concealed with PLC.
    pub concealed: u64,
    /// Pauses of a DTX sender (a timestamp jump with no sequence number skipped).
    pub dtx_pauses: u64,
    /// Frames of those pauses played as silence (no concealment, nothing decoded).
    pub dtx_silent: u64,
    /// Missing frames rebuilt from the next packet's in-band FEC data.
    pub recovered: u64,
    /// Missing frames filled in time by the relay's repeated copy (`SpeakerRepeat`).
    pub repaired: u64,
    /// Buffered frames skipped when the delay shrank.
    pub skipped: u64,
    /// Stream restarts (re-anchors after a timestamp jump).
    pub restarts: u64,
    /// Packets dropped as out of range (timestamp jumps).
    pub out_of_range: u64,
}

impl JitterStats {
    /// Add `other` into `self`.
    pub fn add(&mut self, other: &JitterStats) {
        self.accepted += other.accepted;
        self.late += other.late;
        self.duplicate += other.duplicate;
        self.lost += other.lost;
        self.concealed += other.concealed;
        self.dtx_pauses += other.dtx_pauses;
        self.dtx_silent += other.dtx_silent;
        self.recovered += other.recovered;
        self.repaired += other.repaired;
        self.skipped += other.skipped;
        self.restarts += other.restarts;
        self.out_of_range += other.out_of_range;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Empty,
    Full,
    Consumed,
}

struct Slot {
    frame: i64,
    state: SlotState,
    level: u8,
    len: usize,
    data: [u8; MAX_OPUS_PAYLOAD],
}

/// Where the stream's RTP clock sits on the mix timeline.
#[derive(Clone, Copy)]
struct Anchor {
    /// Extended (unwrapped) timestamp of the anchor packet.
    ext: i64,
    /// Speaker frame number of the anchor packet.
    frame: i64,
    /// Highest extended timestamp seen, and its raw value (for unwrapping).
    highest_ext: i64,
    highest_raw: u32,
    /// Sequence number of the packet with the highest timestamp.
    highest_seq: u16,
}

impl Anchor {
    /// Where `rtp_ts` falls: (steps from the highest timestamp, extended timestamp, frame).
    fn place(&self, rtp_ts: u32) -> (i64, i64, i64) {
        let diff = i64::from(rtp_ts.wrapping_sub(self.highest_raw) as i32);
        let ext = self.highest_ext + diff;
        let frame = self.frame
            + (ext - self.ext + FRAME_SAMPLES as i64 / 2).div_euclid(FRAME_SAMPLES as i64);
        (diff, ext, frame)
    }
}

#[derive(Clone, Copy)]
struct Candidate {
    raw: u32,
    arrival_ns: i64,
}

/// One speaker's jitter buffer. See the module documentation.
pub struct JitterBuffer {
    cfg: JitterConfig,
    slots: Box<[Slot]>,
    anchor: Option<Anchor>,
    /// Mix tick = speaker frame + offset.
    offset: i64,
    last_popped: i64,
    /// `frame * FRAME_NS - arrival` of recent packets (offset-free slack).
    window: [i64; WINDOW],
    window_len: usize,
    window_pos: usize,
    since_change: u32,
    /// The delay should shrink by one frame at the next quiet or missing frame.
    want_shrink: bool,
    /// Packets since the last gap in the stream (saturating).
    since_gap: u32,
    delay_ns: i64,
    missing_run: u32,
    active: bool,
    /// The sender pauses in silence (DTX) rather than sending silence.
    dtx: bool,
    /// RFC 6464 level of the last packet played.
    last_level: u8,
    candidate: Option<Candidate>,
    stats: JitterStats,
}

fn ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn div_ceil(a: i64, b: i64) -> i64 {
    -((-a).div_euclid(b))
}

fn slot_index(frame: i64) -> usize {
    frame.rem_euclid(SLOTS as i64) as usize
}

impl JitterBuffer {
    /// An empty buffer.
    pub fn new(cfg: JitterConfig) -> Self {
        let slots = (0..SLOTS)
            .map(|_| Slot {
                frame: i64::MIN,
                state: SlotState::Empty,
                level: 127,
                len: 0,
                data: [0; MAX_OPUS_PAYLOAD],
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        JitterBuffer {
            cfg,
            slots,
            anchor: None,
            offset: 0,
            last_popped: 0,
            window: [0; WINDOW],
            window_len: 0,
            window_pos: 0,
            since_change: 0,
            want_shrink: false,
            since_gap: FEC_HOLD_PACKETS,
            delay_ns: ns(cfg.initial_delay),
            missing_run: 0,
            active: false,
            dtx: false,
            last_level: 127,
            candidate: None,
            stats: JitterStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// Current target playout delay (slack of the earliest-arriving packets).
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.max(0) as u64)
    }

    /// Buffer one packet (RTP sequence number `seq`, RFC 6464 level `level`) that arrived at
    /// `arrival_ns` (since the mixer epoch); `next_tick` is the next tick the mixer will produce.
    pub fn push(
        &mut self,
        seq: u16,
        rtp_ts: u32,
        payload: &[u8],
        level: u8,
        arrival_ns: i64,
        next_tick: u64,
    ) -> PushOutcome {
        if payload.is_empty() || payload.len() > MAX_OPUS_PAYLOAD {
            return PushOutcome::Invalid;
        }
        let next_tick = next_tick as i64;
        let Some(anchor) = self.anchor else {
            self.reanchor(
                seq,
                rtp_ts,
                arrival_ns,
                next_tick,
                ns(self.cfg.initial_delay),
            );
            self.store(0, payload, level);
            return PushOutcome::Accepted;
        };
        let (diff, ext, frame) = anchor.place(rtp_ts);
        let tick = frame + self.offset;
        let slack = tick * FRAME_NS - arrival_ns;
        if tick >= next_tick + SLOTS as i64 || slack < -RESYNC_LATE_NS {
            return self.out_of_range(seq, rtp_ts, payload, level, arrival_ns, next_tick);
        }
        self.candidate = None;
        let slot = &self.slots[slot_index(frame)];
        if slot.frame == frame && slot.state != SlotState::Empty {
            self.stats.duplicate += 1;
            return PushOutcome::Duplicate;
        }
        if diff > 0 {
            if diff > FRAME_SAMPLES as i64 * 3 / 2 {
                if seq == anchor.highest_seq.wrapping_add(1) {
                    // Nothing was sent in between: the sender paused in silence (DTX).
                    self.dtx = true;
                    self.stats.dtx_pauses += 1;
                } else {
                    // A hole: packets were lost (or are reordered); keep room for FEC recovery.
                    self.since_gap = 0;
                }
            }
            if let Some(a) = self.anchor.as_mut() {
                a.highest_ext = ext;
                a.highest_raw = rtp_ts;
                a.highest_seq = seq;
            }
        }
        self.since_gap = self.since_gap.saturating_add(1);
        self.record_arrival(frame * FRAME_NS - arrival_ns);
        self.adapt();
        if frame + self.offset < next_tick || frame <= self.last_popped {
            self.stats.late += 1;
            return PushOutcome::Late;
        }
        self.store(frame, payload, level);
        PushOutcome::Accepted
    }

    /// Buffer the relay's repeated copy of an earlier packet (`SpeakerRepeat`): it fills the
    /// frame only if the original is missing and its tick is still ahead. Its arrival time says
    /// nothing about the path (it is sent a frame late on purpose), so it does not move the delay;
    /// a repeat of a frame already buffered or played is expected and not counted.
    pub fn push_repeat(
        &mut self,
        rtp_ts: u32,
        payload: &[u8],
        level: u8,
        next_tick: u64,
    ) -> PushOutcome {
        if payload.is_empty() || payload.len() > MAX_OPUS_PAYLOAD {
            return PushOutcome::Invalid;
        }
        let Some(anchor) = self.anchor else {
            return PushOutcome::OutOfRange;
        };
        let (_, _, frame) = anchor.place(rtp_ts);
        let tick = frame + self.offset;
        if tick >= next_tick as i64 + SLOTS as i64 {
            return PushOutcome::OutOfRange;
        }
        let slot = &self.slots[slot_index(frame)];
        if slot.frame == frame && slot.state != SlotState::Empty {
            return PushOutcome::Duplicate;
        }
        if tick < next_tick as i64 || frame <= self.last_popped {
            return PushOutcome::Late;
        }
        self.store(frame, payload, level);
        self.stats.accepted -= 1;
        self.stats.repaired += 1;
        PushOutcome::Accepted
    }

    /// What to play at mix tick `tick` (ticks must be popped in increasing order).
    pub fn pop(&mut self, tick: u64) -> Pop<'_> {
        if self.anchor.is_none() {
            return Pop::Silent;
        }
        let mut frame = tick as i64 - self.offset;
        if self.want_shrink && frame == self.last_popped + 1 && self.skippable(frame) {
            // Shrink now, on a frame nobody will miss.
            self.offset -= 1;
            self.want_shrink = false;
            self.since_change = 0;
            frame += 1;
        }
        if frame <= self.last_popped {
            // The delay grew: stretch with concealment.
            return self.conceal(false);
        }
        for skipped in self.last_popped + 1..frame {
            let slot = &mut self.slots[slot_index(skipped)];
            if slot.frame == skipped && slot.state == SlotState::Full {
                slot.state = SlotState::Consumed;
                self.stats.skipped += 1;
            }
        }
        self.last_popped = frame;
        let idx = slot_index(frame);
        if self.slots[idx].frame == frame && self.slots[idx].state == SlotState::Full {
            self.slots[idx].state = SlotState::Consumed;
            self.missing_run = 0;
            self.active = true;
            let slot = &self.slots[idx];
            self.last_level = slot.level;
            return Pop::Packet(&slot.data[..slot.len]);
        }
        let later_buffered = self
            .slots
            .iter()
            .any(|s| s.state == SlotState::Full && s.frame > frame);
        let next = slot_index(frame + 1);
        if self.active
            && self.slots[next].frame == frame + 1
            && self.slots[next].state == SlotState::Full
        {
            self.stats.lost += 1;
            self.stats.recovered += 1;
            self.missing_run = 0;
            let slot = &self.slots[next];
            return Pop::Recover(&slot.data[..slot.len]);
        }
        self.conceal(later_buffered)
    }

    /// Whether `frame` may be dropped to shrink the delay: buffered and quiet, or missing while
    /// the speaker is silent (a frame lost mid-speech is rebuilt or concealed instead).
    fn skippable(&self, frame: i64) -> bool {
        let slot = &self.slots[slot_index(frame)];
        if slot.frame == frame && slot.state == SlotState::Full {
            slot.level >= self.cfg.quiet_level
        } else {
            !self.active
        }
    }

    fn conceal(&mut self, lost: bool) -> Pop<'static> {
        if self.dtx && (!self.active || self.last_level >= self.cfg.quiet_level) {
            // A DTX sender that went quiet: the missing frames are its pause, not a loss.
            self.active = false;
            self.stats.dtx_silent += 1;
            return Pop::Silent;
        }
        if lost {
            self.stats.lost += 1;
        }
        if self.active && self.missing_run < self.cfg.max_concealed {
            self.missing_run += 1;
            self.stats.concealed += 1;
            Pop::Conceal
        } else {
            self.active = false;
            Pop::Silent
        }
    }

    fn out_of_range(
        &mut self,
        seq: u16,
        rtp_ts: u32,
        payload: &[u8],
        level: u8,
        arrival_ns: i64,
        next_tick: i64,
    ) -> PushOutcome {
        if let Some(c) = self.candidate {
            let step = rtp_ts.wrapping_sub(c.raw) as i32;
            if step > 0 && step <= RESYNC_MAX_STEP && arrival_ns - c.arrival_ns <= RESYNC_MAX_GAP_NS
            {
                self.candidate = None;
                self.stats.restarts += 1;
                let delay = self.delay_ns;
                self.reanchor(seq, rtp_ts, arrival_ns, next_tick, delay);
                let frame = self.anchor.map_or(0, |a| a.frame);
                self.store(frame, payload, level);
                return PushOutcome::Restarted;
            }
        }
        self.candidate = Some(Candidate {
            raw: rtp_ts,
            arrival_ns,
        });
        self.stats.out_of_range += 1;
        PushOutcome::OutOfRange
    }

    /// Map `rtp_ts` (arriving at `arrival_ns`) onto the first tick at least `delay` later.
    fn reanchor(&mut self, seq: u16, rtp_ts: u32, arrival_ns: i64, next_tick: i64, delay: i64) {
        for s in self.slots.iter_mut() {
            s.state = SlotState::Empty;
            s.frame = i64::MIN;
        }
        let target_tick = next_tick.max(div_ceil(arrival_ns + delay, FRAME_NS));
        let frame = if self.anchor.is_some() {
            (target_tick - self.offset).max(self.last_popped + 1)
        } else {
            self.last_popped = -1;
            0
        };
        self.offset = target_tick - frame;
        self.anchor = Some(Anchor {
            ext: i64::from(rtp_ts),
            frame,
            highest_ext: i64::from(rtp_ts),
            highest_raw: rtp_ts,
            highest_seq: seq,
        });
        self.window_len = 0;
        self.window_pos = 0;
        self.since_change = 0;
        self.want_shrink = false;
        self.missing_run = 0;
        self.delay_ns = delay;
        self.record_arrival(frame * FRAME_NS - arrival_ns);
    }

    fn store(&mut self, frame: i64, payload: &[u8], level: u8) {
        let slot = &mut self.slots[slot_index(frame)];
        slot.frame = frame;
        slot.state = SlotState::Full;
        slot.level = level;
        slot.len = payload.len();
        slot.data[..payload.len()].copy_from_slice(payload);
        self.stats.accepted += 1;
    }

    fn record_arrival(&mut self, g: i64) {
        self.window[self.window_pos] = g;
        self.window_pos = (self.window_pos + 1) % WINDOW;
        self.window_len = (self.window_len + 1).min(WINDOW);
        self.since_change = self.since_change.saturating_add(1);
    }

    /// Re-derive the target delay from the window and move the offset toward it.
    fn adapt(&mut self) {
        let w = &self.window[..self.window_len];
        let (Some(&min_g), Some(&max_g)) = (w.iter().min(), w.iter().max()) else {
            return;
        };
        let settled = self.window_len as u32 >= MIN_SAMPLES;
        // After a gap, one frame more: the next packet is then buffered when a frame is missing,
        // and its FEC data rebuilds the lost frame.
        let fec = if self.since_gap < FEC_HOLD_PACKETS {
            FRAME_NS
        } else {
            0
        };
        let target = if settled {
            (max_g - min_g + ns(self.cfg.margin) + fec)
                .clamp(ns(self.cfg.min_delay), ns(self.cfg.max_delay))
        } else {
            (max_g - min_g + ns(self.cfg.margin) + fec)
                .max(ns(self.cfg.initial_delay))
                .min(ns(self.cfg.max_delay))
        };
        self.delay_ns = target;
        let desired = div_ceil(target - max_g, FRAME_NS);
        if desired > self.offset {
            self.offset = desired;
            self.since_change = 0;
            self.want_shrink = false;
        } else {
            self.want_shrink =
                desired < self.offset && settled && self.since_change >= self.cfg.decrease_every;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence number of a sender that sends every 20 ms frame: consecutive timestamps,
    /// consecutive numbers (a timestamp jump is then a loss, not a DTX pause).
    fn seq_for(rtp_ts: u32) -> u16 {
        (rtp_ts / 960) as u16
    }

    const MS: i64 = 1_000_000;
    /// RFC 6464 level of speech (never skipped) and of silence.
    const LOUD: u8 = 20;
    const QUIET: u8 = 127;

    fn pkt(i: u8) -> [u8; 3] {
        [0xf8, i, 0x55]
    }

    /// Pop ticks `from..to`, returning the second payload byte of each packet (or None).
    fn play(jb: &mut JitterBuffer, from: u64, to: u64) -> Vec<Option<u8>> {
        (from..to)
            .map(|t| match jb.pop(t) {
                Pop::Packet(p) => Some(p[1]),
                Pop::Recover(p) => Some(0xf0 | p[1]),
                Pop::Conceal => Some(0xcc),
                Pop::Silent => None,
            })
            .collect()
    }

    /// A DTX sender: speech, quiet frames, then packets only every 20 frames (the next sequence
    /// number after a timestamp jump), speech again with one packet lost. Returns what each tick
    /// played and the buffer.
    fn dtx_talk() -> (Vec<Option<u8>>, JitterBuffer) {
        // (frame, level); the sequence number counts packets sent.
        let mut sent: Vec<(i64, u8)> = (0..10).map(|f| (f, LOUD)).collect();
        sent.extend((10..15).map(|f| (f, 90)));
        sent.extend([34, 54, 74].map(|f| (f, 100)));
        sent.extend((80..90).filter(|f| *f != 85).map(|f| (f, LOUD)));
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let mut played = Vec::new();
        let mut next = 0;
        let mut seq = 0u16;
        for tick in 0..100u64 {
            // Packets arrive a frame early (so the one after a loss is buffered in time).
            while next < sent.len() && sent[next].0 * 20 * MS <= (tick as i64 + 1) * 20 * MS {
                let (frame, level) = sent[next];
                if frame == 86 {
                    seq = seq.wrapping_add(1); // 85 was sent and lost
                }
                jb.push(
                    seq,
                    frame as u32 * 960,
                    &pkt(frame as u8),
                    level,
                    frame * 20 * MS - 19 * MS,
                    tick,
                );
                seq = seq.wrapping_add(1);
                next += 1;
            }
            played.push(match jb.pop(tick) {
                Pop::Packet(p) => Some(p[1]),
                Pop::Recover(p) => Some(0xf0 | p[1]),
                Pop::Conceal => Some(0xcc),
                Pop::Silent => None,
            });
        }
        (played, jb)
    }

    #[test]
    fn dtx_pauses_are_silence_not_loss_and_a_loss_in_speech_is_still_rebuilt() {
        let (played, jb) = dtx_talk();
        let s = jb.stats();
        assert_eq!(s.dtx_pauses, 4, "14..34, 34..54, 54..74, 74..80: {s:?}");
        let concealed = |ticks: &[Option<u8>]| ticks.iter().filter(|p| **p == Some(0xcc)).count();
        let max = JitterConfig::default().max_concealed as usize;
        // Only the first pause, before the sender showed it pauses, is concealed (ticks up to
        // 36); the later pauses are silence; speech cut off at the end is concealed again.
        assert_eq!(concealed(&played[..36]), max, "{played:?}");
        assert_eq!(concealed(&played[36..90]), 0, "{played:?}");
        assert_eq!(concealed(&played[90..]), max, "{played:?}");
        assert!(s.dtx_silent >= 19 * 2, "{s:?}");
        // The loss in speech is a loss: rebuilt from the next packet's FEC data.
        assert_eq!((s.lost, s.recovered), (1, 1), "{s:?}");
        assert!(played.contains(&Some(0xf0 | 86)), "{played:?}");
        for f in [34u8, 54, 74, 80, 89] {
            assert!(played.contains(&Some(f)), "frame {f} played: {played:?}");
        }
    }

    #[test]
    fn a_timestamp_jump_with_skipped_sequence_numbers_is_a_loss() {
        // Ten frames, a jump of six frames, six more: the loss skips six numbers, the pause none.
        let frames: Vec<u32> = (0..10).chain(16..22).collect();
        let mut lossy = JitterBuffer::new(JitterConfig::default());
        let mut dtx = JitterBuffer::new(JitterConfig::default());
        for (n, &f) in frames.iter().enumerate() {
            let arrival = i64::from(f) * 20 * MS;
            lossy.push(f as u16, f * 960, &pkt(f as u8), QUIET, arrival, 0);
            dtx.push(n as u16, f * 960, &pkt(f as u8), QUIET, arrival, 0);
        }
        assert_eq!(lossy.stats().dtx_pauses, 0);
        assert_eq!(dtx.stats().dtx_pauses, 1);
        // The loss holds one more frame of delay for FEC recovery; the pause does not.
        assert!(
            lossy.delay() > dtx.delay(),
            "{:?} vs {:?}",
            lossy.delay(),
            dtx.delay()
        );
    }

    #[test]
    fn first_packet_gets_initial_delay() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        // Arrives at 5 ms: the first tick at least 40 ms later is tick 3 (60 ms).
        assert_eq!(
            jb.push(seq_for(1000), 1000, &pkt(1), LOUD, 5 * MS, 1),
            PushOutcome::Accepted
        );
        assert_eq!(play(&mut jb, 1, 4), vec![None, None, Some(1)]);
    }

    #[test]
    fn reorders_by_timestamp() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let order = [0u8, 2, 1, 4, 3, 5];
        for (n, &i) in order.iter().enumerate() {
            let ts = 7_000 + u32::from(i) * 960;
            assert_eq!(
                jb.push(seq_for(ts), ts, &pkt(i), LOUD, n as i64 * 20 * MS, 0),
                PushOutcome::Accepted
            );
        }
        let out = play(&mut jb, 0, 12);
        let got: Vec<u8> = out.into_iter().flatten().take(6).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn duplicates_are_dropped_once_buffered_or_played() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        assert_eq!(
            jb.push(seq_for(0), 0, &pkt(0), LOUD, 0, 0),
            PushOutcome::Accepted
        );
        assert_eq!(
            jb.push(seq_for(960), 960, &pkt(1), LOUD, 20 * MS, 0),
            PushOutcome::Accepted
        );
        assert_eq!(
            jb.push(seq_for(960), 960, &pkt(1), LOUD, 21 * MS, 0),
            PushOutcome::Duplicate
        );
        assert_eq!(play(&mut jb, 0, 4), vec![None, None, Some(0), Some(1)]);
        assert_eq!(
            jb.push(seq_for(960), 960, &pkt(1), LOUD, 70 * MS, 4),
            PushOutcome::Duplicate
        );
        assert_eq!(jb.stats().duplicate, 2);
    }

    #[test]
    fn lost_frame_is_recovered_from_the_next_packet_then_silent() {
        let cfg = JitterConfig::default();
        let mut jb = JitterBuffer::new(cfg);
        // Frames 0, 1, then 2 is lost, 3 arrives; then nothing for a while.
        for i in [0u8, 1, 3] {
            jb.push(
                seq_for(u32::from(i) * 960),
                u32::from(i) * 960,
                &pkt(i),
                LOUD,
                i64::from(i) * 20 * MS,
                0,
            );
        }
        let out = play(&mut jb, 2, 2 + 4 + 8);
        // Frame 2 is decoded from packet 3's FEC data.
        assert_eq!(&out[..4], &[Some(0), Some(1), Some(0xf3), Some(3)]);
        // After frame 3, `max_concealed` PLC frames, then silence.
        let tail = &out[4..];
        let plc = tail.iter().filter(|x| **x == Some(0xcc)).count();
        assert_eq!(plc as u32, cfg.max_concealed);
        assert_eq!(tail[tail.len() - 1], None);
        let s = jb.stats();
        assert_eq!(s.lost, 1);
        assert_eq!(s.recovered, 1);
        assert_eq!(s.concealed, u64::from(cfg.max_concealed));
    }

    #[test]
    fn missing_frame_without_the_next_packet_is_concealed() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.push(seq_for(0), 0, &pkt(0), LOUD, 0, 0);
        jb.push(seq_for(960), 960, &pkt(1), LOUD, 20 * MS, 0);
        // Frame 2 missing and frame 3 not here yet: PLC; frame 3 then plays.
        assert_eq!(play(&mut jb, 0, 4), vec![None, None, Some(0), Some(1)]);
        assert_eq!(play(&mut jb, 4, 5), vec![Some(0xcc)]);
        jb.push(seq_for(3 * 960), 3 * 960, &pkt(3), LOUD, 81 * MS, 5);
        assert!(play(&mut jb, 5, 8).contains(&Some(3)));
        assert_eq!(jb.stats().recovered, 0);
    }

    #[test]
    fn a_gap_keeps_one_more_frame_of_delay_for_fec() {
        let steady = |gap: bool| {
            let mut jb = JitterBuffer::new(JitterConfig::default());
            let mut tick = 0u64;
            for i in 0..100u32 {
                let arrival = i64::from(i) * 20 * MS + MS;
                while (tick as i64) * 20 * MS <= arrival {
                    jb.pop(tick);
                    tick += 1;
                }
                if gap && i == 60 {
                    continue;
                }
                jb.push(seq_for(i * 960), i * 960, &pkt(0), QUIET, arrival, tick);
            }
            jb.delay()
        };
        assert_eq!(steady(false), Duration::from_millis(20));
        assert_eq!(steady(true), Duration::from_millis(25));
    }

    #[test]
    fn relay_repeat_fills_a_lost_frame_only() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.push(seq_for(0), 0, &pkt(0), LOUD, 0, 0);
        // Frame 1's original is lost; frame 2 arrives with frame 1's repeat.
        jb.push(seq_for(1920), 1920, &pkt(2), LOUD, 40 * MS, 1);
        assert_eq!(jb.push_repeat(960, &pkt(1), LOUD, 1), PushOutcome::Accepted);
        // Frame 0's repeat comes after its original: ignored, not a duplicate in the counters.
        assert_eq!(jb.push_repeat(0, &pkt(0), LOUD, 1), PushOutcome::Duplicate);
        assert_eq!(
            play(&mut jb, 0, 5),
            vec![None, None, Some(0), Some(1), Some(2)]
        );
        // A repeat after its tick is late.
        assert_eq!(
            jb.push_repeat(1920, &pkt(2), LOUD, 5),
            PushOutcome::Duplicate
        );
        assert_eq!(jb.push_repeat(2880, &pkt(3), LOUD, 6), PushOutcome::Late);
        let s = jb.stats();
        assert_eq!((s.repaired, s.duplicate, s.lost, s.accepted), (1, 0, 0, 2));
        // Without an anchor a repeat cannot be placed.
        let mut fresh = JitterBuffer::new(JitterConfig::default());
        assert_eq!(
            fresh.push_repeat(0, &pkt(0), LOUD, 0),
            PushOutcome::OutOfRange
        );
    }

    #[test]
    fn speech_is_never_skipped_to_shrink_the_delay() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let mut tick = 0u64;
        let mut played = Vec::new();
        // 60 loud frames, then quiet ones, steady 1 ms after each tick: the delay wants to fall
        // from 40 ms to 10 ms at once, but frames go only when quiet.
        for i in 0..120u32 {
            let arrival = i64::from(i) * 20 * MS + MS;
            while (tick as i64) * 20 * MS <= arrival {
                if let Pop::Packet(p) = jb.pop(tick) {
                    played.push(p[1]);
                }
                tick += 1;
            }
            let level = if i < 60 { LOUD } else { QUIET };
            jb.push(
                seq_for(i * 960),
                i * 960,
                &pkt(i as u8),
                level,
                arrival,
                tick,
            );
        }
        let loud: Vec<u8> = played.iter().copied().filter(|&b| b < 60).collect();
        assert_eq!(loud, (0..60).collect::<Vec<u8>>());
        assert!(jb.stats().skipped >= 1);
        // Once quiet, the delay did shrink.
        let slack = (119 + jb.offset) * 20 * MS - (119 * 20 * MS + MS);
        assert!(slack < 40 * MS, "slack {slack}");
    }

    #[test]
    fn survives_timestamp_wrap_around() {
        let mut jb = JitterBuffer::new(JitterConfig {
            // Keep the delay fixed: this test is about timestamps only.
            min_delay: Duration::from_millis(40),
            ..JitterConfig::default()
        });
        let start = u32::MAX - 2 * 960 + 1;
        for i in 0..6u8 {
            let ts = start.wrapping_add(u32::from(i) * 960);
            assert_eq!(
                jb.push(
                    seq_for(ts),
                    ts,
                    &pkt(i),
                    LOUD,
                    i64::from(i) * 20 * MS,
                    u64::from(i)
                ),
                PushOutcome::Accepted,
                "packet {i}"
            );
        }
        let got: Vec<Option<u8>> = play(&mut jb, 0, 8);
        let expected: Vec<Option<u8>> = [None, None].into_iter().chain((0..6).map(Some)).collect();
        assert_eq!(got, expected);
        assert_eq!(jb.stats().lost, 0);
    }

    #[test]
    fn late_packet_is_dropped() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.push(seq_for(0), 0, &pkt(0), LOUD, 0, 0);
        jb.push(seq_for(1920), 1920, &pkt(2), LOUD, 40 * MS, 0);
        // Ticks 2 (frame 0), 3 (frame 1: missing -> FEC of frame 2) and 4 (frame 2) are mixed.
        assert_eq!(
            play(&mut jb, 0, 5),
            vec![None, None, Some(0), Some(0xf2), Some(2)]
        );
        // Frame 1 shows up after its tick.
        assert_eq!(
            jb.push(seq_for(960), 960, &pkt(1), LOUD, 95 * MS, 5),
            PushOutcome::Late
        );
        assert_eq!(jb.stats().late, 1);
    }

    #[test]
    fn delay_shrinks_on_steady_arrivals_and_grows_on_jitter() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let mut tick = 0u64;
        // Steady quiet packets, 1 ms after each tick: delay falls from 40 ms to the 20 ms floor.
        for i in 0..100u32 {
            let arrival = i64::from(i) * 20 * MS + MS;
            while (tick as i64) * 20 * MS <= arrival {
                jb.pop(tick);
                tick += 1;
            }
            assert_ne!(
                jb.push(seq_for(i * 960), i * 960, &pkt(0), QUIET, arrival, tick),
                PushOutcome::Late
            );
        }
        assert_eq!(jb.delay(), Duration::from_millis(20));
        // Latest packet (frame 99, arrived 1981 ms) plays at most 40 ms after arrival.
        let play_tick = 99 + jb.offset;
        let slack = play_tick * 20 * MS - (99 * 20 * MS + MS);
        assert!((20 * MS..40 * MS).contains(&slack), "slack {slack}");
        // A packet 35 ms late in the arrival pattern raises the delay.
        let arrival = 100 * 20 * MS + MS + 35 * MS;
        while (tick as i64) * 20 * MS <= arrival {
            jb.pop(tick);
            tick += 1;
        }
        jb.push(seq_for(100 * 960), 100 * 960, &pkt(0), QUIET, arrival, tick);
        assert!(jb.delay() >= Duration::from_millis(40), "{:?}", jb.delay());
        assert!(jb.stats().skipped > 0);
    }

    #[test]
    fn stream_restart_is_reanchored() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        for i in 0..5u32 {
            jb.push(
                seq_for(10_000 + i * 960),
                10_000 + i * 960,
                &pkt(i as u8),
                LOUD,
                i64::from(i) * 20 * MS,
                u64::from(i),
            );
            jb.pop(u64::from(i));
        }
        // The sender restarts with an unrelated timestamp.
        let base = 3_000_000_000u32;
        let t = 100 * MS;
        assert_eq!(
            jb.push(seq_for(base), base, &pkt(50), LOUD, t, 5),
            PushOutcome::OutOfRange
        );
        assert_eq!(
            jb.push(
                seq_for(base + 960),
                base + 960,
                &pkt(51),
                LOUD,
                t + 20 * MS,
                6
            ),
            PushOutcome::Restarted
        );
        assert_eq!(
            jb.push(
                seq_for(base + 1920),
                base + 1920,
                &pkt(52),
                LOUD,
                t + 40 * MS,
                6
            ),
            PushOutcome::Accepted
        );
        let got: Vec<u8> = play(&mut jb, 5, 20)
            .into_iter()
            .flatten()
            .filter(|&b| b >= 50 && b != 0xcc)
            .collect();
        // The frame before the new anchor comes from packet 51's FEC data (it carries 50).
        assert_eq!(got, vec![0xf3, 51, 52]);
        assert_eq!(jb.stats().restarts, 1);
    }

    #[test]
    fn invalid_payloads_are_refused() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        assert_eq!(
            jb.push(seq_for(0), 0, &[], LOUD, 0, 0),
            PushOutcome::Invalid
        );
        let big = vec![0u8; MAX_OPUS_PAYLOAD + 1];
        assert_eq!(
            jb.push(seq_for(0), 0, &big, LOUD, 0, 0),
            PushOutcome::Invalid
        );
    }
}
