//! The AAC-LC rendition for native Apple players: the program's Opus packets are decoded
//! (libopus) and re-encoded as AAC-LC (libfdk-aac), then cut into CMAF chunks that mirror the
//! Opus segmenter's parts and segments (same media sequence numbers, boundaries within one
//! 21.3 ms AAC frame).
//!
//! Sans-IO and deterministic: packets and segmenter outputs in, chunks out; no clock, no IO.
//!
//! Timeline: AAC frame `k` after a (re)start at extended timestamp `base` has decode time
//! `base + 1024 k`. A part takes every encoded frame that starts before the Opus part's end,
//! so parts hold 9 or 10 frames (at most 213.3 ms, the AAC `PART-TARGET`). When the Opus
//! timeline jumps (packets lost), the encoder restarts at the new timestamp, as the Opus
//! segmenter does.

use crate::fmp4::{init_segment_aac, ChunkWriter, MuxError, AAC_FRAME_SAMPLES};
use crate::segmenter::{PartReady, SegmentReady, SegmentStart, SegmenterOutput};
use amphi_protocol::audio::FRAME_SAMPLES;
use fdk_aac::enc::{AudioObjectType, BitRate, ChannelMode, Encoder, EncoderParams, Transport};
use std::collections::VecDeque;
use std::time::Duration;

/// AAC-LC bit rate (mono speech and music).
pub const AAC_BITRATE: u32 = 64_000;

/// Why the AAC rendition failed.
#[derive(Debug, thiserror::Error)]
pub enum AacError {
    /// libopus refused a packet or setting.
    #[error("opus decode: {0}")]
    Opus(#[from] opus::Error),
    /// libfdk-aac refused a setting or a frame.
    #[error("aac encode: {0}")]
    Encode(String),
    /// Muxing failed.
    #[error("mux: {0}")]
    Mux(#[from] MuxError),
}

fn new_encoder() -> Result<Encoder, AacError> {
    Encoder::new(EncoderParams {
        bit_rate: BitRate::Cbr(AAC_BITRATE),
        sample_rate: 48_000,
        transport: Transport::Raw,
        channels: ChannelMode::Mono,
        audio_object_type: AudioObjectType::Mpeg4LowComplexity,
    })
    .map_err(|e| AacError::Encode(e.to_string()))
}

/// One encoded AAC frame waiting for its part.
#[derive(Debug)]
struct Frame {
    ts: u64,
    range: (usize, usize),
}

/// Transcoder and chunker of one room's AAC rendition.
pub struct AacRendition {
    decoder: opus::Decoder,
    encoder: Encoder,
    asc: Vec<u8>,
    delay: u32,
    writer: ChunkWriter,
    pcm: Vec<i16>,
    scratch: Vec<u8>,
    /// Extended timestamp the next Opus packet should have; `None` before the first.
    expected: Option<u64>,
    /// Decode time of the next AAC frame the encoder will produce.
    next_frame_ts: u64,
    frames: VecDeque<Frame>,
    bytes: Vec<u8>,
    /// Segment in progress: its parts' bytes, duration, first decode time and part count.
    seg_buf: Vec<u8>,
    seg_ticks: u64,
    seg_first_ts: Option<u64>,
    seg_parts: u32,
    seg_start: Option<SegmentStart>,
}

impl std::fmt::Debug for AacRendition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AacRendition")
            .field("next_frame_ts", &self.next_frame_ts)
            .field("pending", &self.frames.len())
            .finish()
    }
}

impl AacRendition {
    /// A fresh transcoder (mono 48 kHz, AAC-LC 64 kbps).
    pub fn new() -> Result<Self, AacError> {
        let encoder = new_encoder()?;
        let info = encoder
            .info()
            .map_err(|e| AacError::Encode(e.to_string()))?;
        let asc = info.confBuf[..(info.confSize as usize).min(info.confBuf.len())].to_vec();
        Ok(AacRendition {
            decoder: opus::Decoder::new(48_000, opus::Channels::Mono)?,
            encoder,
            asc,
            delay: info.nDelay,
            writer: ChunkWriter::aac(),
            pcm: vec![0; FRAME_SAMPLES * 6],
            scratch: vec![0; 8192],
            expected: None,
            next_frame_ts: 0,
            frames: VecDeque::new(),
            bytes: Vec::new(),
            seg_buf: Vec::new(),
            seg_ticks: 0,
            seg_first_ts: None,
            seg_parts: 0,
            seg_start: None,
        })
    }

    /// The AudioSpecificConfig (`esds` decoder-specific info).
    pub fn audio_specific_config(&self) -> &[u8] {
        &self.asc
    }

    /// The initialization segment of the AAC rendition.
    pub fn init_segment(&self) -> Result<Vec<u8>, AacError> {
        Ok(init_segment_aac(&self.asc, AAC_BITRATE, self.delay)?)
    }

    /// One Opus program packet whose extended timestamp (as the Opus segmenter unwrapped it)
    /// is `ext`. Call after the segmenter accepted the packet and before [`Self::follow`]-ing
    /// the segmenter's outputs.
    pub fn push_opus(&mut self, packet: &[u8], ext: u64) -> Result<(), AacError> {
        if self.expected != Some(ext) {
            // First packet, or the timeline jumped: restart the encoder at `ext`.
            if self.expected.is_some() {
                self.encoder = new_encoder()?;
            }
            // Never before AAC frames already queued: a packet longer than its RTP step (a
            // 40 ms packet every 20 ms) would otherwise send the timeline back.
            self.next_frame_ts = ext.max(self.next_frame_ts);
        }
        let n = match self.decoder.decode(packet, &mut self.pcm, false) {
            Ok(n) => n,
            // A packet libopus cannot decode: conceal it so the timeline stays whole.
            Err(_) => self.decoder.decode(&[], &mut self.pcm, false)?,
        };
        let n = n.min(self.pcm.len());
        self.expected = Some(ext + n as u64);
        let mut off = 0;
        for _ in 0..16 {
            if off >= n {
                break;
            }
            let r = self
                .encoder
                .encode(&self.pcm[off..n], &mut self.scratch)
                .map_err(|e| AacError::Encode(e.to_string()))?;
            off += r.input_consumed;
            if r.output_size > 0 {
                let start = self.bytes.len();
                self.bytes.extend_from_slice(&self.scratch[..r.output_size]);
                self.frames.push_back(Frame {
                    ts: self.next_frame_ts,
                    range: (start, self.bytes.len()),
                });
                self.next_frame_ts += u64::from(AAC_FRAME_SAMPLES);
            }
            if r.input_consumed == 0 && r.output_size == 0 {
                break;
            }
        }
        Ok(())
    }

    /// The AAC counterpart of one Opus segmenter output, if it has any frames.
    pub fn follow(&mut self, o: &SegmenterOutput) -> Result<Option<SegmenterOutput>, AacError> {
        match o {
            SegmenterOutput::Part(p) => self.part(p),
            SegmenterOutput::Segment(s) => Ok(self.segment(s)),
        }
    }

    fn part(&mut self, p: &PartReady) -> Result<Option<SegmenterOutput>, AacError> {
        if p.index == 0 {
            self.seg_start = p.segment_start;
            self.seg_parts = 0;
        }
        let end = p.base_media_decode_time + u64::from(p.duration);
        let mut sizes = Vec::with_capacity(12);
        let mut payload = Vec::with_capacity(2048);
        let mut first = None;
        while let Some(f) = self.frames.front() {
            if f.ts >= end {
                break;
            }
            first.get_or_insert(f.ts);
            let (a, b) = f.range;
            sizes.push((b - a) as u32);
            payload.extend_from_slice(&self.bytes[a..b]);
            self.frames.pop_front();
        }
        if self.frames.is_empty() {
            self.bytes.clear();
        }
        let Some(base) = first else {
            return Ok(None);
        };
        let index = self.seg_parts;
        let mut bytes = Vec::with_capacity(payload.len() + 256);
        self.writer
            .write_chunk(base, &sizes, &payload, index == 0, &mut bytes)?;
        let duration = sizes.len() as u32 * AAC_FRAME_SAMPLES;
        let segment_start = if index == 0 {
            let opus = self.seg_start.unwrap_or(SegmentStart {
                program_date_time: std::time::SystemTime::UNIX_EPOCH,
                discontinuity: false,
            });
            let shift = base as i128 - p.base_media_decode_time as i128;
            let shift_us = shift * 1_000_000 / 48_000;
            let pdt = if shift_us >= 0 {
                opus.program_date_time + Duration::from_micros(shift_us as u64)
            } else {
                opus.program_date_time - Duration::from_micros((-shift_us) as u64)
            };
            let start = SegmentStart {
                program_date_time: pdt,
                discontinuity: opus.discontinuity,
            };
            self.seg_start = Some(start);
            self.seg_first_ts = Some(base);
            Some(start)
        } else {
            None
        };
        self.seg_buf.extend_from_slice(&bytes);
        self.seg_ticks += u64::from(duration);
        self.seg_parts += 1;
        Ok(Some(SegmenterOutput::Part(PartReady {
            msn: p.msn,
            index,
            frames: sizes.len() as u32,
            duration,
            base_media_decode_time: base,
            bytes,
            segment_start,
            last_arrival: p.last_arrival,
        })))
    }

    fn segment(&mut self, s: &SegmentReady) -> Option<SegmenterOutput> {
        let parts = std::mem::take(&mut self.seg_parts);
        let ticks = std::mem::take(&mut self.seg_ticks);
        let bytes = std::mem::take(&mut self.seg_buf);
        self.seg_first_ts = None;
        let start = self.seg_start.take()?;
        if parts == 0 {
            return None;
        }
        Some(SegmenterOutput::Segment(SegmentReady {
            msn: s.msn,
            parts,
            frames: (ticks / u64::from(AAC_FRAME_SAMPLES)) as u32,
            duration: ticks,
            start,
            bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::playlist::MediaPlaylist;
    use crate::segmenter::{ProgramFrame, Segmenter};
    use amphi_testkit::conformance::{check_media, Expect};
    use std::collections::HashMap;
    use std::time::{Instant, SystemTime};

    fn tone(n: usize) -> Vec<Vec<u8>> {
        let mut enc =
            opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio).unwrap();
        let mut pcm = [0i16; 960];
        (0..n)
            .map(|f| {
                for (i, s) in pcm.iter_mut().enumerate() {
                    let t = (f * 960 + i) as f64 / 48_000.0;
                    *s = (12_000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16;
                }
                enc.encode_vec(&pcm, 1500).unwrap()
            })
            .collect()
    }

    /// Drive the Opus segmenter and the AAC rendition as the room driver does.
    fn run(packets: &[(u32, Vec<u8>)]) -> (Vec<SegmenterOutput>, Vec<SegmenterOutput>) {
        let mut seg = Segmenter::default();
        let mut aac = AacRendition::new().unwrap();
        let (t0, w0) = (Instant::now(), SystemTime::UNIX_EPOCH);
        let (mut opus_out, mut aac_out) = (Vec::new(), Vec::new());
        for (rtp, p) in packets {
            let out = seg
                .push(
                    ProgramFrame {
                        rtp_ts: *rtp,
                        payload: p,
                    },
                    t0,
                    w0,
                )
                .unwrap();
            if let Some(ext) = seg.last_ext() {
                aac.push_opus(p, ext).unwrap();
            }
            for o in out {
                aac_out.extend(aac.follow(&o).unwrap());
                opus_out.push(o);
            }
        }
        for o in seg.stream_stopped().unwrap() {
            aac_out.extend(aac.follow(&o).unwrap());
            opus_out.push(o);
        }
        (opus_out, aac_out)
    }

    #[test]
    fn parts_mirror_opus_with_nine_or_ten_frames() {
        let packets: Vec<_> = tone(250)
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i as u32 * 960, p))
            .collect();
        let (opus_out, aac_out) = run(&packets);
        let ids = |v: &[SegmenterOutput]| -> Vec<(u64, u32)> {
            v.iter()
                .filter_map(|o| match o {
                    SegmenterOutput::Part(p) => Some((p.msn, p.index)),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(ids(&opus_out), ids(&aac_out), "same (msn, part) sequence");
        let mut next = 0;
        for o in &aac_out {
            match o {
                SegmenterOutput::Part(p) => {
                    assert_eq!(p.base_media_decode_time, next, "contiguous");
                    next += u64::from(p.duration);
                    let last = p.msn == 2 && p.index == 4;
                    assert!(
                        (9..=10).contains(&p.frames) || last,
                        "{}.{} has {} frames",
                        p.msn,
                        p.index,
                        p.frames
                    );
                }
                SegmenterOutput::Segment(s) => {
                    assert!(s.duration.abs_diff(96_000) < 2048 || s.msn == 2, "{s:?}");
                }
            }
        }
        // The parts decode as AAC with the mp4 crate reading the init segment.
        let aac = AacRendition::new().unwrap();
        assert_eq!(
            aac.audio_specific_config(),
            &[0x11, 0x88],
            "AAC-LC 48 kHz mono"
        );
        let init = aac.init_segment().unwrap();
        let mut file = init.clone();
        for o in &aac_out {
            if let SegmenterOutput::Segment(s) = o {
                file.extend_from_slice(&s.bytes);
            }
        }
        let size = file.len() as u64;
        let reader = mp4::Mp4Reader::read_header(std::io::Cursor::new(file), size).unwrap();
        let track = reader.tracks().values().next().unwrap();
        assert_eq!(track.media_type().unwrap(), mp4::MediaType::AAC);
        assert_eq!(
            track.sample_freq_index().unwrap(),
            mp4::SampleFreqIndex::Freq48000
        );
    }

    /// Walk a rendered AAC playlist the way a player builds its timeline (each segment and
    /// part starts where the printed durations before it end, from the first segment's start)
    /// and check every part and segment against where the media says it starts and ends.
    /// `truth`: `(msn, part or None) -> (start, end)` in ticks from the rendition's first part.
    fn check_timeline(text: &str, truth: &HashMap<(u64, Option<u32>), (u64, u64)>) {
        let ms = |ticks: u64| ticks as f64 * 1000.0 / 48_000.0;
        let parse_ms = |v: &str| -> u64 {
            let (a, b) = v.split_once('.').unwrap();
            a.parse::<u64>().unwrap() * 1000 + b.parse::<u64>().unwrap()
        };
        let mut msn: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
            .unwrap()
            .parse()
            .unwrap();
        // The player's clock: the first segment starts where it really starts (on the ms grid).
        let first = truth
            .get(&(msn, None))
            .or_else(|| truth.get(&(msn, Some(0))));
        let mut at = ms(first.unwrap().0).round() as u64;
        let (mut part, mut parts_ms, mut seg_start) = (0u32, 0u64, at);
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("#EXT-X-PART:DURATION=") {
                let d = parse_ms(v.split(',').next().unwrap());
                let (start, end) = truth[&(msn, Some(part))];
                let listed = at + parts_ms;
                assert!(
                    (listed as f64 - ms(start)).abs() <= 0.5 + 1e-9,
                    "part {msn}.{part} listed at {listed} ms, media at {} ms",
                    ms(start)
                );
                assert!(
                    ((listed + d) as f64 - ms(end)).abs() <= 0.5 + 1e-9,
                    "part {msn}.{part} listed to end at {} ms, media at {} ms",
                    listed + d,
                    ms(end)
                );
                parts_ms += d;
                part += 1;
            } else if let Some(v) = line.strip_prefix("#EXTINF:") {
                let d = parse_ms(v.trim_end_matches(','));
                let (start, end) = truth[&(msn, None)];
                assert!(
                    (seg_start as f64 - ms(start)).abs() <= 0.5 + 1e-9,
                    "segment {msn}"
                );
                assert!(
                    ((seg_start + d) as f64 - ms(end)).abs() <= 0.5 + 1e-9,
                    "segment {msn} listed to end at {} ms, media at {} ms",
                    seg_start + d,
                    ms(end)
                );
                if part > 0 {
                    assert_eq!(parts_ms, d, "the parts of {msn} add up to its EXTINF");
                }
                at = seg_start + d;
                seg_start = at;
                msn += 1;
                part = 0;
                parts_ms = 0;
            }
        }
    }

    #[test]
    fn aac_durations_add_up_exactly_over_many_parts_and_segments() {
        // 64 s of program: 32 segments of 10 parts of 9 or 10 AAC frames (21.333 ms each).
        let packets: Vec<_> = tone(3_200)
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i as u32 * 960, p))
            .collect();
        let (_, aac_out) = run(&packets);
        let mut pl = MediaPlaylist::new(crate::playlist::AAC, 0);
        let mut truth = HashMap::new();
        let mut origin = None;
        let mut next_tfdt = None;
        let mut seg_from = 0;
        let mut segments = 0;
        for o in &aac_out {
            match o {
                SegmenterOutput::Part(p) => {
                    // tfdt and trun: whole AAC frames, each part where the last one ended.
                    assert_eq!(p.duration, p.frames * AAC_FRAME_SAMPLES);
                    if let Some(t) = next_tfdt {
                        assert_eq!(p.base_media_decode_time, t, "{}.{}", p.msn, p.index);
                    }
                    next_tfdt = Some(p.base_media_decode_time + u64::from(p.duration));
                    let o = *origin.get_or_insert(p.base_media_decode_time);
                    let start = p.base_media_decode_time - o;
                    if p.index == 0 {
                        seg_from = start;
                    }
                    truth.insert(
                        (p.msn, Some(p.index)),
                        (start, start + u64::from(p.duration)),
                    );
                    pl.add_part(p.msn, p.index, p.duration, p.segment_start)
                        .unwrap();
                }
                SegmenterOutput::Segment(s) => {
                    truth.insert((s.msn, None), (seg_from, seg_from + s.duration));
                    pl.complete_segment(s.msn, s.start, s.duration).unwrap();
                    segments += 1;
                }
            }
            let text = pl.render(false, &[]);
            check_timeline(&text, &truth);
            check_media(&text, &Expect::live(crate::playlist::AAC.part_target_ms()))
                .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        }
        assert!(segments >= 31, "{segments} segments");
        pl.end();
        let vod = pl.render_vod(&[]);
        check_timeline(&vod, &truth);
        check_media(&vod, &Expect::vod()).unwrap();
    }

    #[test]
    fn packets_longer_than_their_step_never_send_the_timeline_back() {
        // Found by the program_stream fuzz target: 40 ms packets 20 ms apart restarted the
        // encoder 20 ms before the frames already queued, and a part started 1088 samples
        // before the previous one ended.
        let mut enc =
            opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio).unwrap();
        let pcm = [3000i16; 1920];
        let packets: Vec<_> = (0..40u32)
            .map(|i| (i * 960, enc.encode_vec(&pcm, 1500).unwrap()))
            .collect();
        let (_, aac_out) = run(&packets);
        let mut end = 0;
        let mut parts = 0;
        for o in &aac_out {
            if let SegmenterOutput::Part(p) = o {
                assert!(
                    p.base_media_decode_time >= end,
                    "part at {} before {end}",
                    p.base_media_decode_time
                );
                end = p.base_media_decode_time + u64::from(p.duration);
                parts += 1;
            }
        }
        assert!(parts >= 3, "{parts} parts");
    }

    #[test]
    fn a_gap_restarts_the_encoder_at_the_new_time() {
        let frames = tone(60);
        let mut packets: Vec<_> = frames[..25]
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u32 * 960, p.clone()))
            .collect();
        packets.extend(
            frames[27..]
                .iter()
                .enumerate()
                .map(|(i, p)| ((27 + i) as u32 * 960, p.clone())),
        );
        let (_, aac_out) = run(&packets);
        let starts: Vec<u64> = aac_out
            .iter()
            .filter_map(|o| match o {
                SegmenterOutput::Part(p) if p.index == 0 => Some(p.base_media_decode_time),
                _ => None,
            })
            .collect();
        assert_eq!(starts[0], 0);
        assert_eq!(
            starts[1],
            27 * 960,
            "segment after the gap starts at its real time"
        );
    }
}
