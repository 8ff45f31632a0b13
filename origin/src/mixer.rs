//! One room's mixer (sans-IO): jitter buffers, Opus decode with PLC, mix, limit, Opus encode.
//!
//! [`RoomMixer::push`] takes speaker packets with their arrival time; [`RoomMixer::mix`] produces
//! the program frame of one 20 ms tick of the mix timeline. Every buffer is allocated up front and
//! reused; neither call allocates (except when a new speaker appears).

use crate::jitter::{JitterBuffer, JitterConfig, JitterStats, Pop, PushOutcome};
use crate::limiter::{audio_level, energy, Limiter};
use amphi_protocol::audio::{FRAME_SAMPLES, PROGRAM_BITRATE, SAMPLE_RATE};
use amphi_protocol::relay::{
    FrameKind, RelayError, RelayFrame, MAX_OPUS_PAYLOAD, RELAY_HEADER_LEN,
};
use amphi_protocol::RoomId;
use opus::{Application, Bitrate, Channels, Decoder, Encoder};

/// Frame energy below which a speaker does not count as talking (RMS under -120 dBov).
const SILENCE_ENERGY: f32 = 1e-12 * FRAME_SAMPLES as f32;
/// Largest decoded packet (120 ms at 48 kHz); only the first 20 ms of a longer packet are mixed.
const MAX_DECODE_SAMPLES: usize = 5760;

/// Why mixing failed.
#[derive(Debug, thiserror::Error)]
pub enum MixError {
    /// libopus refused an encoder/decoder operation.
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),
    /// The program frame could not be encoded.
    #[error("relay frame: {0}")]
    Relay(#[from] RelayError),
    /// The room already has the maximum number of speakers.
    #[error("too many speakers in the room")]
    TooManySpeakers,
}

/// Tuning of a [`RoomMixer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixerConfig {
    /// Jitter buffer settings of every speaker.
    pub jitter: JitterConfig,
    /// Speakers mixed at most in one room.
    pub max_speakers: usize,
    /// libopus encoder complexity (0..=10) of the program stream. The default, 6, is the highest
    /// setting without libopus' tonality/speech analysis (run at 7 and above), which costs about a
    /// quarter of the encoder's CPU time for a marginal gain at 64 kbit/s.
    pub encoder_complexity: i32,
    /// Tell the program encoder its signal is speech (`OPUS_SIGNAL_VOICE`). At 64 kbit/s and
    /// complexity 6 this makes libopus code speech in hybrid (SILK + CELT) mode instead of
    /// CELT only: PESQ-WB of a re-encoded browser speaker rises from 3.40 to 3.87 (the fair
    /// ceiling, ffmpeg's libopus at complexity 10, is 3.83; `bench/quality/run.sh`). Off: libopus
    /// decides alone (better for music-heavy rooms).
    pub encoder_voice: bool,
}

impl Default for MixerConfig {
    fn default() -> Self {
        MixerConfig {
            jitter: JitterConfig::default(),
            max_speakers: 32,
            encoder_complexity: 6,
            encoder_voice: true,
        }
    }
}

/// Counters of a mixer (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MixStats {
    /// Program frames produced.
    pub frames: u64,
    /// Speaker packets libopus could not decode (concealed instead).
    pub decode_errors: u64,
    /// Jitter buffer counters of all speakers, past and present.
    pub jitter: JitterStats,
}

impl MixStats {
    /// Add `other` into `self`.
    pub fn add(&mut self, other: &MixStats) {
        self.frames += other.frames;
        self.decode_errors += other.decode_errors;
        self.jitter.add(&other.jitter);
    }
}

/// One program frame, borrowed from the mixer until the next call.
#[derive(Debug)]
pub struct ProgramFrame<'a> {
    /// Wrapping frame counter.
    pub seq: u16,
    /// `frame_index * 960` (48 kHz), wrapping.
    pub rtp_ts: u32,
    /// Loudest speaker of the frame, or 0.
    pub speaker: u32,
    /// RFC 6464 level of the mixed frame.
    pub audio_level: u8,
    /// The Opus packet.
    pub payload: &'a [u8],
    /// `u32 LE length | relay frame (kind Program)`: one program stream record.
    pub record: &'a [u8],
}

struct Speaker {
    id: u32,
    /// Connection that announced the speaker (`SpeakerJoined`), if any.
    source: Option<u64>,
    last_packet_ns: i64,
    jitter: JitterBuffer,
    decoder: Decoder,
}

/// One speaker packet as the relay delivers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpeakerPacket<'a> {
    /// RTP sequence number (tells a DTX pause from a loss).
    pub seq: u16,
    /// RTP timestamp, 48 kHz clock.
    pub rtp_ts: u32,
    /// One Opus packet.
    pub payload: &'a [u8],
    /// RFC 6464 audio level: 0 (loudest) to 127 (silence).
    pub level: u8,
}

/// The mixer of one room. See the module documentation.
pub struct RoomMixer {
    room: RoomId,
    cfg: MixerConfig,
    speakers: Vec<Speaker>,
    encoder: Encoder,
    limiter: Limiter,
    mix: Vec<f32>,
    pcm: Vec<f32>,
    packet: Vec<u8>,
    record: Vec<u8>,
    frame_index: u64,
    stats: MixStats,
    retired: JitterStats,
}

impl RoomMixer {
    /// A mixer for `room` with a 64 kbit/s, 20 ms, mono, 48 kHz Opus encoder.
    pub fn new(room: RoomId, cfg: MixerConfig) -> Result<Self, MixError> {
        let mut encoder = Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Audio)?;
        encoder.set_bitrate(Bitrate::Bits(PROGRAM_BITRATE))?;
        encoder.set_complexity(cfg.encoder_complexity.clamp(0, 10))?;
        if cfg.encoder_voice {
            encoder.set_signal(opus::Signal::Voice)?;
        }
        Ok(RoomMixer {
            room,
            cfg,
            speakers: Vec::new(),
            encoder,
            limiter: Limiter::default(),
            mix: vec![0.0; FRAME_SAMPLES],
            pcm: vec![0.0; MAX_DECODE_SAMPLES],
            packet: vec![0; MAX_OPUS_PAYLOAD],
            record: Vec::with_capacity(4 + RELAY_HEADER_LEN + MAX_OPUS_PAYLOAD),
            frame_index: 0,
            stats: MixStats::default(),
            retired: JitterStats::default(),
        })
    }

    /// The encoder's lookahead in samples (the pre-skip a player must drop).
    pub fn encoder_lookahead(&mut self) -> Result<i32, MixError> {
        Ok(self.encoder.get_lookahead()?)
    }

    /// Index of the next program frame.
    pub fn frame_index(&self) -> u64 {
        self.frame_index
    }

    /// Counters so far.
    pub fn stats(&self) -> MixStats {
        let mut s = self.stats;
        s.jitter = self.retired;
        for sp in &self.speakers {
            s.jitter.add(&sp.jitter.stats());
        }
        s
    }

    /// Speakers currently known to the mixer.
    pub fn speaker_count(&self) -> usize {
        self.speakers.len()
    }

    /// Whether any speaker announced by a connection (`SpeakerJoined`) is still present.
    pub fn has_joined_speakers(&self) -> bool {
        self.speakers.iter().any(|s| s.source.is_some())
    }

    fn find_or_add(&mut self, id: u32) -> Result<usize, MixError> {
        if let Some(i) = self.speakers.iter().position(|s| s.id == id) {
            return Ok(i);
        }
        if self.speakers.len() >= self.cfg.max_speakers {
            return Err(MixError::TooManySpeakers);
        }
        self.speakers.push(Speaker {
            id,
            source: None,
            last_packet_ns: i64::MIN,
            jitter: JitterBuffer::new(self.cfg.jitter),
            decoder: Decoder::new(SAMPLE_RATE, Channels::Mono)?,
        });
        Ok(self.speakers.len() - 1)
    }

    /// A connection (`source`) announced speaker `id`.
    pub fn join(&mut self, id: u32, source: u64) -> Result<(), MixError> {
        let i = self.find_or_add(id)?;
        self.speakers[i].source = Some(source);
        Ok(())
    }

    /// Speaker `id` left: its state is dropped.
    pub fn leave(&mut self, id: u32) {
        if let Some(i) = self.speakers.iter().position(|s| s.id == id) {
            let sp = self.speakers.swap_remove(i);
            self.retired.add(&sp.jitter.stats());
        }
    }

    /// Connection `source` went away: every speaker it announced leaves.
    pub fn source_gone(&mut self, source: u64) {
        while let Some(i) = self.speakers.iter().position(|s| s.source == Some(source)) {
            let sp = self.speakers.swap_remove(i);
            self.retired.add(&sp.jitter.stats());
        }
    }

    /// Drop speakers nobody announced that sent nothing for `idle_ns`.
    pub fn remove_idle(&mut self, now_ns: i64, idle_ns: i64) {
        while let Some(i) = self
            .speakers
            .iter()
            .position(|s| s.source.is_none() && now_ns.saturating_sub(s.last_packet_ns) >= idle_ns)
        {
            let sp = self.speakers.swap_remove(i);
            self.retired.add(&sp.jitter.stats());
        }
    }

    /// Buffer one speaker packet (RFC 6464 level `level`) that arrived at `arrival_ns`;
    /// `next_tick` is the next tick [`RoomMixer::mix`] will be called with.
    pub fn push(
        &mut self,
        speaker: u32,
        packet: SpeakerPacket<'_>,
        arrival_ns: i64,
        next_tick: u64,
    ) -> Result<PushOutcome, MixError> {
        let SpeakerPacket {
            seq,
            rtp_ts,
            payload,
            level,
        } = packet;
        let i = self.find_or_add(speaker)?;
        let sp = &mut self.speakers[i];
        sp.last_packet_ns = sp.last_packet_ns.max(arrival_ns);
        let outcome = sp
            .jitter
            .push(seq, rtp_ts, payload, level, arrival_ns, next_tick);
        if outcome == PushOutcome::Restarted {
            sp.decoder.reset_state()?;
        }
        Ok(outcome)
    }

    /// Buffer the relay's repeated copy of a speaker's earlier packet (see
    /// [`JitterBuffer::push_repeat`]); ignored for a speaker the mixer does not know.
    pub fn push_repeat(
        &mut self,
        speaker: u32,
        rtp_ts: u32,
        payload: &[u8],
        level: u8,
        next_tick: u64,
    ) -> PushOutcome {
        match self.speakers.iter_mut().find(|s| s.id == speaker) {
            Some(sp) => sp.jitter.push_repeat(rtp_ts, payload, level, next_tick),
            None => PushOutcome::OutOfRange,
        }
    }

    /// Mix tick `tick` into one program frame.
    pub fn mix(&mut self, tick: u64) -> Result<ProgramFrame<'_>, MixError> {
        self.mix.fill(0.0);
        let mut loudest: Option<(f32, u32)> = None;
        for sp in &mut self.speakers {
            let decoded = match sp.jitter.pop(tick) {
                Pop::Packet(p) => decode(&mut sp.decoder, p, false, &mut self.pcm, &mut self.stats),
                // The next packet's in-band FEC data (libopus conceals if it carries none).
                Pop::Recover(next) => decode(
                    &mut sp.decoder,
                    next,
                    true,
                    &mut self.pcm[..FRAME_SAMPLES],
                    &mut self.stats,
                ),
                Pop::Conceal => sp
                    .decoder
                    .decode_float(&[], &mut self.pcm[..FRAME_SAMPLES], false)
                    .unwrap_or(0),
                Pop::Silent => continue,
            };
            let pcm = &self.pcm[..decoded.min(FRAME_SAMPLES)];
            let e = energy(pcm);
            if e > SILENCE_ENERGY && loudest.is_none_or(|(l, _)| e > l) {
                loudest = Some((e, sp.id));
            }
            for (m, x) in self.mix.iter_mut().zip(pcm) {
                *m += x;
            }
        }
        self.limiter.process(&mut self.mix);
        let level = audio_level(&self.mix);
        let n = self.encoder.encode_float(&self.mix, &mut self.packet)?;
        let frame = RelayFrame {
            kind: FrameKind::Program,
            room: self.room,
            speaker: loudest.map_or(0, |(_, id)| id),
            seq: self.frame_index as u16,
            rtp_ts: self.frame_index.wrapping_mul(FRAME_SAMPLES as u64) as u32,
            audio_level: level,
            payload: &self.packet[..n],
        };
        let len = frame.encoded_len();
        self.record.clear();
        self.record.extend_from_slice(&(len as u32).to_le_bytes());
        self.record.resize(4 + len, 0);
        frame.encode_into(&mut self.record[4..])?;
        self.frame_index += 1;
        self.stats.frames += 1;
        Ok(ProgramFrame {
            seq: frame.seq,
            rtp_ts: frame.rtp_ts,
            speaker: frame.speaker,
            audio_level: level,
            payload: &self.packet[..n],
            record: &self.record,
        })
    }
}

/// Decode `packet` (its FEC data if `fec`) into `pcm`; on a libopus error count it and conceal.
fn decode(
    decoder: &mut Decoder,
    packet: &[u8],
    fec: bool,
    pcm: &mut [f32],
    stats: &mut MixStats,
) -> usize {
    match decoder.decode_float(packet, pcm, fec) {
        Ok(n) => n,
        Err(_) => {
            stats.decode_errors += 1;
            decoder
                .decode_float(&[], &mut pcm[..FRAME_SAMPLES], false)
                .unwrap_or(0)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use amphi_protocol::audio::OPUS_PRE_SKIP;
    use std::f32::consts::TAU;

    /// The sequence number of a sender that sends every 20 ms frame: consecutive timestamps,
    /// consecutive numbers.
    fn seq_for(rtp_ts: u32) -> u16 {
        (rtp_ts / 960) as u16
    }

    const MS: i64 = 1_000_000;

    /// Encode `frames` 20 ms frames of a sine (amplitude `amp`) as Opus packets.
    pub(crate) fn tone_packets(freq: f32, amp: f32, frames: usize, bitrate: i32) -> Vec<Vec<u8>> {
        let mut enc = Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Audio).unwrap();
        enc.set_bitrate(Bitrate::Bits(bitrate)).unwrap();
        let mut pcm = vec![0f32; FRAME_SAMPLES];
        (0..frames)
            .map(|f| {
                for (i, x) in pcm.iter_mut().enumerate() {
                    let t = (f * FRAME_SAMPLES + i) as f32 / SAMPLE_RATE as f32;
                    *x = amp * (TAU * freq * t).sin();
                }
                enc.encode_vec_float(&pcm, MAX_OPUS_PAYLOAD).unwrap()
            })
            .collect()
    }

    /// Goertzel power of `freq` in `samples`, normalised by length.
    pub(crate) fn tone_power(samples: &[f32], freq: f32) -> f32 {
        let w = TAU * freq / SAMPLE_RATE as f32;
        let coeff = 2.0 * w.cos();
        let (mut s1, mut s2) = (0f32, 0f32);
        for &x in samples {
            let s0 = x + coeff * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (samples.len() as f32).powi(2)
    }

    struct Run {
        frames: Vec<(u16, u32, u32, u8)>,
        pcm: Vec<f32>,
    }

    /// Feed each speaker's packets in real-time order, mix `ticks` ticks, decode the program.
    fn run(speakers: &[(u32, Vec<Vec<u8>>)], ticks: u64) -> (Run, RoomMixer) {
        let mut mixer = RoomMixer::new(RoomId(9), MixerConfig::default()).unwrap();
        let mut dec = Decoder::new(SAMPLE_RATE, Channels::Mono).unwrap();
        let mut out = Run {
            frames: Vec::new(),
            pcm: Vec::new(),
        };
        let mut buf = vec![0f32; MAX_DECODE_SAMPLES];
        for tick in 0..ticks {
            let now = tick as i64 * 20 * MS;
            for (id, packets) in speakers {
                if let Some(p) = packets.get(tick as usize) {
                    let ts = 5_000u32
                        .wrapping_add(*id * 77)
                        .wrapping_add(tick as u32 * 960);
                    mixer
                        .push(
                            *id,
                            SpeakerPacket {
                                seq: seq_for(ts),
                                rtp_ts: ts,
                                payload: p,
                                level: 30,
                            },
                            now - MS,
                            tick,
                        )
                        .unwrap();
                }
            }
            let f = mixer.mix(tick).unwrap();
            out.frames.push((f.seq, f.rtp_ts, f.speaker, f.audio_level));
            let decoded = RelayFrame::decode(&f.record[4..]).unwrap();
            assert_eq!(decoded.kind, FrameKind::Program);
            assert_eq!(decoded.payload, f.payload);
            assert_eq!(
                u32::from_le_bytes(f.record[..4].try_into().unwrap()) as usize,
                f.record.len() - 4
            );
            let n = dec.decode_float(f.payload, &mut buf, false).unwrap();
            out.pcm.extend_from_slice(&buf[..n]);
        }
        (out, mixer)
    }

    #[test]
    fn two_speakers_are_summed() {
        let a = tone_packets(440.0, 0.3, 100, 32_000);
        let b = tone_packets(660.0, 0.3, 100, 32_000);
        let (out, mixer) = run(&[(1, a), (2, b)], 100);
        let tail = &out.pcm[out.pcm.len() - 48_00 * 5..];
        let p440 = tone_power(tail, 440.0);
        let p660 = tone_power(tail, 660.0);
        let p550 = tone_power(tail, 550.0);
        assert!(p440 > 100.0 * p550, "440: {p440} 550: {p550}");
        assert!(p660 > 100.0 * p550, "660: {p660} 550: {p550}");
        assert!(out.frames[50].2 == 1 || out.frames[50].2 == 2);
        assert_eq!(mixer.stats().frames, 100);
    }

    #[test]
    fn three_full_scale_speakers_do_not_clip_or_wrap() {
        let speakers: Vec<(u32, Vec<Vec<u8>>)> = [(1, 300.0), (2, 450.0), (3, 700.0)]
            .into_iter()
            .map(|(id, f)| (id, tone_packets(f, 1.0, 60, 64_000)))
            .collect();
        let (out, _) = run(&speakers, 60);
        let tail = &out.pcm[48_000 / 5..];
        // Wrapping would show as full-scale jumps between neighbouring samples.
        let max_step = tail
            .windows(2)
            .map(|w| (w[1] - w[0]).abs())
            .fold(0f32, f32::max);
        let peak = tail.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(peak <= 1.05, "peak {peak}");
        assert!(max_step < 0.5, "step {max_step}");
        assert!(out.frames[30].3 < 10, "level {}", out.frames[30].3);
    }

    #[test]
    fn silence_in_gives_silence_out() {
        let silent = tone_packets(440.0, 0.0, 50, 32_000);
        let (out, _) = run(&[(1, silent)], 50);
        assert!(out.frames.iter().all(|f| f.3 == 127 && f.2 == 0));
        assert!(out.pcm.iter().all(|x| x.abs() < 1e-3));
        // No speaker at all: still one frame per tick.
        let (out, _) = run(&[], 10);
        assert_eq!(out.frames.len(), 10);
        assert!(out.frames.iter().all(|f| f.3 == 127));
    }

    #[test]
    fn program_frames_count_up() {
        let (out, _) = run(&[], 5);
        let seqs: Vec<(u16, u32)> = out.frames.iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(
            seqs,
            vec![(0, 0), (1, 960), (2, 1920), (3, 2880), (4, 3840)]
        );
    }

    #[test]
    fn loudest_speaker_is_reported() {
        let a = tone_packets(440.0, 0.05, 30, 32_000);
        let b = tone_packets(660.0, 0.5, 30, 32_000);
        let (out, _) = run(&[(7, a), (8, b)], 30);
        assert_eq!(out.frames[20].2, 8);
    }

    #[test]
    fn speaker_bookkeeping() {
        let mut m = RoomMixer::new(
            RoomId(1),
            MixerConfig {
                max_speakers: 2,
                ..MixerConfig::default()
            },
        )
        .unwrap();
        m.join(1, 10).unwrap();
        m.push(
            2,
            SpeakerPacket {
                seq: seq_for(0),
                rtp_ts: 0,
                payload: &[0xf8, 0xff, 0xfe],
                level: 127,
            },
            0,
            0,
        )
        .unwrap();
        assert!(matches!(m.join(3, 10), Err(MixError::TooManySpeakers)));
        assert!(m.has_joined_speakers());
        m.source_gone(10);
        assert!(!m.has_joined_speakers());
        assert_eq!(m.speaker_count(), 1);
        m.remove_idle(20_000 * MS, 10_000 * MS);
        assert_eq!(m.speaker_count(), 0);
    }

    #[test]
    fn lost_packet_is_rebuilt_from_the_next_packets_fec() {
        // A browser-like speaker: 32 kbit/s VOIP with in-band FEC, told about loss.
        let mut enc = Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Voip).unwrap();
        enc.set_bitrate(Bitrate::Bits(32_000)).unwrap();
        enc.set_inband_fec(true).unwrap();
        enc.set_packet_loss_perc(10).unwrap();
        let mut pcm = vec![0f32; FRAME_SAMPLES];
        let packets: Vec<Vec<u8>> = (0..60)
            .map(|f| {
                for (i, x) in pcm.iter_mut().enumerate() {
                    let t = (f * FRAME_SAMPLES + i) as f32 / SAMPLE_RATE as f32;
                    *x = 0.3 * (TAU * 300.0 * t).sin() * (TAU * 3.0 * t).sin().abs();
                }
                enc.encode_vec_float(&pcm, MAX_OPUS_PAYLOAD).unwrap()
            })
            .collect();
        let mut mixer = RoomMixer::new(RoomId(4), MixerConfig::default()).unwrap();
        for tick in 0..70u64 {
            // Packets arrive a tick early, so the next one is buffered when one is missing.
            let i = tick as usize + 1;
            if i < packets.len() && i != 30 {
                let arrival = tick as i64 * 20 * MS + MS;
                mixer
                    .push(
                        1,
                        SpeakerPacket {
                            seq: seq_for(i as u32 * 960),
                            rtp_ts: i as u32 * 960,
                            payload: &packets[i],
                            level: 20,
                        },
                        arrival,
                        tick,
                    )
                    .unwrap();
            }
            mixer.mix(tick).unwrap();
        }
        let s = mixer.stats();
        assert_eq!((s.jitter.lost, s.jitter.recovered), (1, 1), "{s:?}");
        assert_eq!(s.decode_errors, 0);
    }

    #[test]
    fn program_codes_speech_in_hybrid_mode() {
        // A speaker at the browser's 32 kbit/s: the program's Opus packets (TOC configs 12..=15
        // are hybrid, 16.. CELT only) code speech with SILK, which PESQ-WB rates 0.4 higher here.
        let a = tone_packets(220.0, 0.3, 50, 32_000);
        let mut mixer = RoomMixer::new(RoomId(3), MixerConfig::default()).unwrap();
        let mut configs = Vec::new();
        for (tick, p) in a.iter().enumerate() {
            let tick = tick as u64;
            mixer
                .push(
                    1,
                    SpeakerPacket {
                        seq: seq_for(tick as u32 * 960),
                        rtp_ts: tick as u32 * 960,
                        payload: p,
                        level: 30,
                    },
                    tick as i64 * 20 * MS - MS,
                    tick,
                )
                .unwrap();
            configs.push(mixer.mix(tick).unwrap().payload[0] >> 3);
        }
        let hybrid = configs[10..]
            .iter()
            .filter(|&&c| (12..=15).contains(&c))
            .count();
        assert!(hybrid > 30, "TOC configs {configs:?}");
    }

    #[test]
    fn pre_skip_matches_encoder_lookahead() {
        let mut m = RoomMixer::new(RoomId(1), MixerConfig::default()).unwrap();
        assert_eq!(m.encoder_lookahead().unwrap(), i32::from(OPUS_PRE_SKIP));
    }
}
