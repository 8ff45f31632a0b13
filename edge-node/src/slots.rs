//! Sans-IO listener slots: which speakers an interactive listener hears, and how their packets are
//! renumbered.
//!
//! Every interactive listener receives [`LISTENER_AUDIO_SLOTS`] audio streams. Per room, a
//! [`SlotSelector`] puts the loudest speakers (RFC 6464 levels, smoothed) into those slots with
//! hysteresis: a speaker keeps its slot index while it talks; a quieter occupant is replaced only
//! after it held the slot [`MIN_DWELL`] and a challenger is louder by [`SWITCH_MARGIN`]; an occupant
//! silent for [`STALE_AFTER`] frees its slot at once. A [`SlotStream`] per slot rewrites sequence
//! numbers and timestamps so each slot stays one continuous RTP stream across speaker switches.
//! The same selector answers the active-speaker list sent to clients about every 300 ms.

use amphi_protocol::room::{ActiveSpeaker, LISTENER_AUDIO_SLOTS};
use amphi_protocol::ParticipantId;
use std::time::{Duration, Instant};

/// An occupant must hold its slot this long before a louder speaker may take it.
pub const MIN_DWELL: Duration = Duration::from_millis(500);
/// A challenger must be louder than the quietest occupant by this many dB (RFC 6464 units).
pub const SWITCH_MARGIN: f32 = 6.0;
/// A speaker not heard for this long no longer holds a slot.
pub const STALE_AFTER: Duration = Duration::from_millis(1000);
/// A speaker counts as active if heard within this window with a level above silence.
pub const ACTIVE_WINDOW: Duration = Duration::from_millis(400);
/// Smoothed RFC 6464 level at or above which a speaker is considered silent.
pub const SILENT_LEVEL: f32 = 120.0;
/// Most speakers tracked per room (the oldest silent one is forgotten beyond it).
pub const MAX_TRACKED: usize = 64;
/// Weight of the newest packet in the smoothed loudness.
const EMA_WEIGHT: f32 = 0.25;

#[derive(Clone, Debug)]
struct SpeakerStat {
    id: u32,
    /// Smoothed loudness, `127 - level` (0 silence .. 127 loudest).
    loudness: f32,
    last: Instant,
}

/// The loudest-speaker slots of one room.
#[derive(Clone, Debug)]
pub struct SlotSelector {
    speakers: Vec<SpeakerStat>,
    slots: [Option<u32>; LISTENER_AUDIO_SLOTS],
    since: [Option<Instant>; LISTENER_AUDIO_SLOTS],
}

impl Default for SlotSelector {
    fn default() -> Self {
        SlotSelector {
            speakers: Vec::with_capacity(8),
            slots: [None; LISTENER_AUDIO_SLOTS],
            since: [None; LISTENER_AUDIO_SLOTS],
        }
    }
}

impl SlotSelector {
    /// A packet of `speaker` with RFC 6464 `level` (0 loudest, 127 silent) arrived at `now`.
    /// Returns the slot the packet goes to, if any.
    pub fn observe(&mut self, speaker: u32, level: u8, now: Instant) -> Option<usize> {
        let loud = 127.0 - f32::from(level.min(127));
        let idx = match self.speakers.iter().position(|s| s.id == speaker) {
            Some(i) => {
                let s = &mut self.speakers[i];
                s.loudness += EMA_WEIGHT * (loud - s.loudness);
                s.last = now;
                i
            }
            None => {
                if self.speakers.len() >= MAX_TRACKED {
                    self.forget_oldest();
                }
                self.speakers.push(SpeakerStat {
                    id: speaker,
                    loudness: loud,
                    last: now,
                });
                self.speakers.len() - 1
            }
        };
        if let Some(k) = self.slot_of(speaker) {
            return Some(k);
        }
        let my_loudness = self.speakers[idx].loudness;
        // A free slot, or one whose occupant went quiet for good.
        for k in 0..LISTENER_AUDIO_SLOTS {
            let free = match self.slots[k] {
                None => true,
                Some(o) => self
                    .stat(o)
                    .is_none_or(|s| now.saturating_duration_since(s.last) >= STALE_AFTER),
            };
            if free {
                self.slots[k] = Some(speaker);
                self.since[k] = Some(now);
                return Some(k);
            }
        }
        // Replace the quietest occupant that has dwelt long enough, if clearly louder.
        let mut weakest: Option<(usize, f32)> = None;
        for k in 0..LISTENER_AUDIO_SLOTS {
            let (Some(o), Some(since)) = (self.slots[k], self.since[k]) else {
                continue;
            };
            if now.saturating_duration_since(since) < MIN_DWELL {
                continue;
            }
            let l = self.stat(o).map_or(0.0, |s| s.loudness);
            if weakest.is_none_or(|(_, w)| l < w) {
                weakest = Some((k, l));
            }
        }
        match weakest {
            Some((k, l)) if my_loudness > l + SWITCH_MARGIN => {
                self.slots[k] = Some(speaker);
                self.since[k] = Some(now);
                Some(k)
            }
            _ => None,
        }
    }

    /// The slot `speaker` holds.
    pub fn slot_of(&self, speaker: u32) -> Option<usize> {
        self.slots.iter().position(|s| *s == Some(speaker))
    }

    /// Current occupants by slot.
    pub fn slots(&self) -> [Option<u32>; LISTENER_AUDIO_SLOTS] {
        self.slots
    }

    /// Forget a speaker (it left or may no longer publish); frees its slot.
    pub fn remove(&mut self, speaker: u32) {
        self.speakers.retain(|s| s.id != speaker);
        for k in 0..LISTENER_AUDIO_SLOTS {
            if self.slots[k] == Some(speaker) {
                self.slots[k] = None;
                self.since[k] = None;
            }
        }
    }

    /// Speakers heard within [`ACTIVE_WINDOW`] above silence, loudest first, into `out`.
    pub fn active(&self, now: Instant, out: &mut Vec<ActiveSpeaker>) {
        out.clear();
        for s in &self.speakers {
            let level = 127.0 - s.loudness;
            if now.saturating_duration_since(s.last) < ACTIVE_WINDOW && level < SILENT_LEVEL {
                out.push(ActiveSpeaker {
                    id: ParticipantId(s.id),
                    level: level.round().clamp(0.0, 127.0) as u8,
                });
            }
        }
        out.sort_by_key(|a| (a.level, a.id.0));
    }

    /// Whether no speaker is tracked.
    pub fn is_empty(&self) -> bool {
        self.speakers.is_empty()
    }

    fn stat(&self, id: u32) -> Option<&SpeakerStat> {
        self.speakers.iter().find(|s| s.id == id)
    }

    fn forget_oldest(&mut self) {
        let slotted = self.slots;
        if let Some(i) = self
            .speakers
            .iter()
            .enumerate()
            .filter(|(_, s)| !slotted.contains(&Some(s.id)))
            .min_by_key(|(_, s)| s.last)
            .map(|(i, _)| i)
        {
            self.speakers.swap_remove(i);
        }
    }
}

/// Extends 16-bit RTP sequence numbers to 64 bits.
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqExtender {
    last: Option<u64>,
}

impl SeqExtender {
    /// The extended value of `seq`, closest to the previous one.
    pub fn extend(&mut self, seq: u16) -> u64 {
        let Some(last) = self.last else {
            // Start one cycle up so reordered packets never go below zero.
            let v = (1u64 << 16) | u64::from(seq);
            self.last = Some(v);
            return v;
        };
        let mut v = (last & !0xffff) | u64::from(seq);
        if v + 0x8000 < last {
            v += 1 << 16;
        } else if v > last + 0x8000 && v >= 1 << 16 {
            v -= 1 << 16;
        }
        if v > last {
            self.last = Some(v);
        }
        v
    }
}

/// Packets a source may arrive late by (sequence numbers) and still be its stream.
const MAX_REORDER: i16 = 64;
/// Sequence numbers a source may skip (lost packets) and still be its stream.
const MAX_SEQ_GAP: i16 = 3_000;
/// RTP time (48 kHz) a late packet may lie behind the source's last one: 2 s.
const MAX_TS_BACK: i32 = 96_000;
/// RTP time a source may jump forward (loss, an Opus DTX pause) and still be its stream: 10 min.
const MAX_TS_GAP: i32 = 48_000 * 600;

/// Rewrites packets of whichever speaker holds one slot into one continuous stream.
#[derive(Clone, Debug, Default)]
pub struct SlotStream {
    source: Option<u32>,
    /// The source's last packet as it came in (sequence number, timestamp).
    last_in: Option<(u16, u32)>,
    ext: SeqExtender,
    seq_delta: u64,
    ts_delta: u32,
    last_seq: u64,
    last_ts: u32,
    last_at: Option<Instant>,
}

impl SlotStream {
    /// Output (extended sequence number, RTP timestamp) for a packet of `speaker` with `seq` and
    /// `ts` arriving at `now`. Sequence numbers start at 1 and grow by one per packet across
    /// speaker switches; timestamps keep advancing by the wall time between switches. A speaker
    /// whose own stream restarted (a new PeerConnection after a re-promotion: new random sequence
    /// and timestamp bases, the same participant id) counts as a switch too.
    pub fn rewrite(&mut self, speaker: u32, seq: u16, ts: u32, now: Instant) -> (u64, u32) {
        let restarted = self.last_in.is_some_and(|(last_seq, last_ts)| {
            let seq_step = seq.wrapping_sub(last_seq) as i16;
            let ts_step = ts.wrapping_sub(last_ts) as i32;
            !(-MAX_REORDER..=MAX_SEQ_GAP).contains(&seq_step)
                || !(-MAX_TS_BACK..=MAX_TS_GAP).contains(&ts_step)
        });
        if self.source != Some(speaker) || restarted {
            self.source = Some(speaker);
            self.last_in = None;
            self.ext = SeqExtender::default();
            let ext = self.ext.extend(seq);
            let out_seq = self.last_seq + 1;
            self.seq_delta = out_seq.wrapping_sub(ext);
            let gap = self
                .last_at
                .map(|t| now.saturating_duration_since(t).as_micros() as u64 * 48 / 1000)
                .unwrap_or(960)
                .clamp(960, u64::from(u32::MAX / 2)) as u32;
            let out_ts = self.last_ts.wrapping_add(gap);
            self.ts_delta = out_ts.wrapping_sub(ts);
        }
        let ext = self.ext.extend(seq);
        let out_seq = ext.wrapping_add(self.seq_delta);
        let out_ts = ts.wrapping_add(self.ts_delta);
        if self
            .last_in
            .is_none_or(|(last_seq, _)| (seq.wrapping_sub(last_seq) as i16) > 0)
        {
            self.last_in = Some((seq, ts));
        }
        if out_seq > self.last_seq {
            self.last_seq = out_seq;
            self.last_ts = out_ts;
            self.last_at = Some(now);
        }
        (out_seq, out_ts)
    }

    /// The speaker whose packets this slot carries now.
    pub fn source(&self) -> Option<u32> {
        self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn three_loudest_fill_slots_and_keep_their_index() {
        let t0 = Instant::now();
        let mut s = SlotSelector::default();
        assert_eq!(s.observe(1, 40, t0), Some(0));
        assert_eq!(s.observe(2, 30, t0), Some(1));
        assert_eq!(s.observe(3, 50, t0), Some(2));
        // A fourth, barely louder speaker does not displace anyone (dwell and margin).
        assert_eq!(s.observe(4, 45, t0 + 10 * MS), None);
        assert_eq!(s.observe(4, 20, t0 + 100 * MS), None, "dwell not reached");
        // Keep everyone talking for a while.
        let mut now = t0;
        for _ in 0..40 {
            now += 20 * MS;
            s.observe(1, 40, now);
            s.observe(2, 30, now);
            s.observe(3, 50, now);
        }
        // Speaker 4 now shouts: it takes the quietest (3) slot, index 2.
        let mut got = None;
        for _ in 0..10 {
            now += 20 * MS;
            got = got.or(s.observe(4, 10, now));
        }
        assert_eq!(got, Some(2));
        assert_eq!(s.slots(), [Some(1), Some(2), Some(4)]);
        assert_eq!(s.slot_of(3), None);
        // A speaker that stops talking frees its slot for the next one after STALE_AFTER.
        now += STALE_AFTER;
        s.observe(2, 30, now);
        s.observe(4, 10, now);
        assert_eq!(s.observe(5, 90, now), Some(0), "speaker 1 went stale");
        s.remove(2);
        assert_eq!(s.slots(), [Some(5), None, Some(4)]);
    }

    #[test]
    fn similar_levels_do_not_flap() {
        let t0 = Instant::now();
        let mut s = SlotSelector::default();
        let mut now = t0;
        let mut switches = 0;
        let mut prev = s.slots();
        for i in 0..500u32 {
            now += 20 * MS;
            // Four speakers at nearly the same level, jittering by +-3 dB.
            for sp in 1..=4u32 {
                let level = 40 + ((i * 7 + sp * 13) % 7) as u8;
                s.observe(sp, level, now);
            }
            if s.slots() != prev {
                switches += 1;
                prev = s.slots();
            }
        }
        assert!(switches <= 4, "{switches} switches");
    }

    #[test]
    fn active_speakers_are_recent_and_sorted() {
        let t0 = Instant::now();
        let mut s = SlotSelector::default();
        s.observe(1, 50, t0);
        s.observe(2, 20, t0);
        s.observe(3, 127, t0);
        let mut out = Vec::new();
        s.active(t0, &mut out);
        assert_eq!(
            out.iter().map(|a| a.id.0).collect::<Vec<_>>(),
            vec![2, 1],
            "silent speaker 3 is not active"
        );
        assert_eq!(out[0].level, 20);
        s.active(t0 + ACTIVE_WINDOW, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn seq_extension_handles_wrap_and_reorder() {
        let mut e = SeqExtender::default();
        let a = e.extend(65534);
        assert_eq!(e.extend(65535), a + 1);
        assert_eq!(e.extend(0), a + 2);
        assert_eq!(e.extend(1), a + 3);
        assert_eq!(e.extend(65535), a + 1, "late packet before the wrap");
        assert_eq!(e.extend(2), a + 4);
    }

    #[test]
    fn slot_stream_is_continuous_across_switches() {
        let t0 = Instant::now();
        let mut st = SlotStream::default();
        let mut now = t0;
        let mut outs = Vec::new();
        for i in 0..5u16 {
            outs.push(st.rewrite(7, 60_000 + i, 1_000_000 + 960 * u32::from(i), now));
            now += 20 * MS;
        }
        assert_eq!(outs[0].0, 1, "first packet is sequence 1");
        // Switch to a speaker with unrelated numbering, after a 100 ms gap.
        now += 80 * MS;
        for i in 0..5u16 {
            outs.push(st.rewrite(9, 65_533u16.wrapping_add(i), 42 + 960 * u32::from(i), now));
            now += 20 * MS;
        }
        for w in outs.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "{outs:?}");
        }
        assert_eq!(
            outs[5].1.wrapping_sub(outs[4].1),
            960 * 5,
            "gap kept in time"
        );
        for w in outs[5..].windows(2) {
            assert_eq!(w[1].1.wrapping_sub(w[0].1), 960);
        }
        assert_eq!(st.source(), Some(9));
        // A reordered (late) packet keeps its relative number.
        let late = st.rewrite(9, 65_533u16.wrapping_add(3), 42 + 960 * 3, now);
        assert_eq!(late.0, outs[8].0);
    }

    #[test]
    fn a_speaker_whose_stream_restarts_stays_one_continuous_stream() {
        let t0 = Instant::now();
        let mut st = SlotStream::default();
        let mut now = t0;
        let mut outs = Vec::new();
        for i in 0..5u16 {
            outs.push(st.rewrite(7, 40_000 + i, 3_000_000_000 + 960 * u32::from(i), now));
            now += 20 * MS;
        }
        // A DTX pause (the timestamp jumps 30 s, the sequence goes on) is the same stream.
        outs.push(st.rewrite(7, 40_005, 3_000_000_000 + 960 * 5 + 48_000 * 30, now));
        assert_eq!(outs[5].1.wrapping_sub(outs[4].1), 960 + 48_000 * 30);
        now += 1_000 * MS;
        // The same participant comes back on a new PeerConnection: lower sequence numbers and
        // timestamps. Its packets continue the slot's stream instead of going backwards.
        for i in 0..5u16 {
            outs.push(st.rewrite(7, 1_000 + i, 5_000 + 960 * u32::from(i), now));
            now += 20 * MS;
        }
        for w in outs.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "{outs:?}");
        }
        assert_eq!(
            outs[6].1.wrapping_sub(outs[5].1),
            48_000,
            "the second between the streams"
        );
        for w in outs[6..].windows(2) {
            assert_eq!(w[1].1.wrapping_sub(w[0].1), 960);
        }
    }
}
