//! The packager's program streams (what an origin sends on its unidirectional QUIC streams):
//! `u32 LE length | relay frame` records, read exactly as `ingest::program_stream` reads them
//! (`record_len` against `MAX_PROGRAM_RECORD_LEN`, then `program_record`), and every accepted
//! frame packaged as `RoomCore::frame` does it: the Opus segmenter, then the AAC transcoder
//! following its parts and segments. Streams end cleanly, break off mid-record or carry a bad
//! record; each end stops the program like `RoomCore::stream_finished`.
//!
//! Records are generated (program frames of the stream's room or another one, other kinds, real
//! or corrupted Opus payloads, any RTP steps) and then corrupted with byte edits. Nothing panics,
//! packaging never fails, and the output timeline is monotonic with increasing part and segment
//! numbers.
#![no_main]
#[path = "common/opus_packets.rs"]
mod opus_packets;

use amphi_packager::aac::AacRendition;
use amphi_packager::program_record;
use amphi_packager::segmenter::{ProgramFrame, Segmenter, SegmenterOutput};
use amphi_protocol::audio::FRAME_SAMPLES;
use amphi_protocol::control::{record_len, MAX_PROGRAM_RECORD_LEN};
use amphi_protocol::relay::{FrameKind, RelayFrame, MAX_OPUS_PAYLOAD};
use amphi_protocol::RoomId;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant, SystemTime};

/// Frames packaged at most per input (each costs an AAC encode).
const MAX_FRAMES: usize = 120;

#[derive(Arbitrary, Debug)]
enum Ts {
    Next,
    Frames(i8),
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Valid(u8),
    Corrupt { packet: u8, at: u16, byte: u8 },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Program,
    SpeakerAudio,
    SpeakerRepeat,
}

#[derive(Arbitrary, Debug)]
enum Rec {
    Frame {
        other_room: bool,
        kind: Kind,
        speaker: u32,
        ts: Ts,
        level: u8,
        payload: Payload,
        /// A length prefix other than the record's own.
        bad_len: Option<u32>,
        /// One byte of the record replaced.
        flip: Option<(u16, u8)>,
    },
    /// Bytes of anything.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Stream {
    records: Vec<Rec>,
    /// Bytes cut off the end (the stream breaks mid-record).
    cut: u8,
    /// Milliseconds between two frames.
    pace_ms: u8,
}

fn payload(p: &Payload) -> Vec<u8> {
    let all = opus_packets::packets();
    match p {
        Payload::Valid(i) => all[usize::from(*i) % all.len()].clone(),
        Payload::Corrupt { packet, at, byte } => {
            let mut v = all[usize::from(*packet) % all.len()].clone();
            let i = usize::from(*at) % v.len();
            v[i] = *byte;
            v
        }
        Payload::Raw(v) => v[..v.len().min(MAX_OPUS_PAYLOAD + 2)].to_vec(),
    }
}

/// The bytes an origin would write for `stream` (frames of `room`).
fn wire(stream: &Stream, room: RoomId, rtp: &mut u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut body = Vec::new();
    for rec in &stream.records {
        match rec {
            Rec::Frame {
                other_room,
                kind,
                speaker,
                ts,
                level,
                payload: p,
                bad_len,
                flip,
            } => {
                *rtp = match ts {
                    Ts::Next => rtp.wrapping_add(FRAME_SAMPLES as u32),
                    Ts::Frames(n) => {
                        rtp.wrapping_add((i32::from(*n) * FRAME_SAMPLES as i32) as u32)
                    }
                    Ts::Raw(step) => rtp.wrapping_add(*step),
                };
                let bytes = payload(p);
                let frame = RelayFrame {
                    kind: match kind {
                        Kind::Program => FrameKind::Program,
                        Kind::SpeakerAudio => FrameKind::SpeakerAudio,
                        Kind::SpeakerRepeat => FrameKind::SpeakerRepeat,
                    },
                    room: if *other_room {
                        RoomId(room.0 + 1)
                    } else {
                        room
                    },
                    speaker: *speaker,
                    seq: 0,
                    rtp_ts: *rtp,
                    audio_level: level % 128,
                    payload: &bytes,
                };
                body.clear();
                if frame.encode_to_vec(&mut body).is_err() {
                    // Not encodable (payload empty or too long): send it anyway.
                    body.extend_from_slice(&[1, 2]);
                    body.extend_from_slice(&room.0.to_le_bytes());
                    body.extend_from_slice(&[0; 11]);
                    body.extend_from_slice(&bytes);
                }
                if let Some((at, b)) = flip {
                    let i = usize::from(*at) % body.len();
                    body[i] = *b;
                }
                let len = bad_len.unwrap_or(body.len() as u32);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&body);
            }
            Rec::Raw(v) => out.extend_from_slice(v),
        }
    }
    out.truncate(out.len().saturating_sub(usize::from(stream.cut % 8)));
    out
}

/// Checks the packaged output: part and segment numbers increase, the timeline never goes back.
#[derive(Default)]
struct Output {
    last_part: Option<(u64, u32)>,
    /// Decode time the next part may start at, at the earliest.
    timeline: u64,
    last_segment: Option<u64>,
}

impl Output {
    fn check(&mut self, o: &SegmenterOutput) {
        match o {
            SegmenterOutput::Part(p) => {
                assert!(p.frames >= 1 && !p.bytes.is_empty());
                if let Some(prev) = self.last_part {
                    assert!(
                        (p.msn, p.index) > prev,
                        "part {:?} after {prev:?}",
                        (p.msn, p.index)
                    );
                }
                assert!(
                    p.base_media_decode_time >= self.timeline,
                    "the timeline went back: {} < {}",
                    p.base_media_decode_time,
                    self.timeline
                );
                self.timeline = p.base_media_decode_time + u64::from(p.duration);
                self.last_part = Some((p.msn, p.index));
            }
            SegmenterOutput::Segment(s) => {
                assert!(s.parts >= 1 && !s.bytes.is_empty());
                assert_eq!(Some(s.msn), self.last_part.map(|p| p.0));
                if let Some(prev) = self.last_segment {
                    assert!(s.msn > prev);
                }
                self.last_segment = Some(s.msn);
            }
        }
    }
}

fuzz_target!(|streams: Vec<Stream>| {
    let room = RoomId(0x51);
    let mut segmenter = Segmenter::default();
    let mut aac = AacRendition::new().expect("AAC encoder");
    let mut opus_out = Output::default();
    let mut aac_out = Output::default();
    let t0 = Instant::now();
    let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut elapsed = Duration::ZERO;
    let mut rtp = 0x1234_5678u32;
    let mut frames = 0;
    for stream in &streams {
        let bytes = wire(stream, room, &mut rtp);
        // What `program_stream` does with one stream.
        let mut rest = &bytes[..];
        let mut current = None;
        while rest.len() >= 4 && frames < MAX_FRAMES {
            let prefix = [rest[0], rest[1], rest[2], rest[3]];
            let Ok(len) = record_len(prefix, MAX_PROGRAM_RECORD_LEN) else {
                break;
            };
            assert!(len >= 1 && len <= MAX_PROGRAM_RECORD_LEN);
            let Some(body) = rest.get(4..4 + len) else {
                break;
            };
            rest = &rest[4 + len..];
            let Ok(frame) = program_record(body, current) else {
                break;
            };
            assert_eq!(frame.kind, FrameKind::Program);
            assert!(current.is_none_or(|r| r == frame.room));
            current = Some(frame.room);
            if frame.room != room {
                // Another room's stream: packaged by that room's core.
                continue;
            }
            frames += 1;
            elapsed += Duration::from_millis(u64::from(stream.pace_ms % 41));
            let out = segmenter
                .push(
                    ProgramFrame {
                        rtp_ts: frame.rtp_ts,
                        payload: frame.payload,
                    },
                    t0 + elapsed,
                    w0 + elapsed,
                )
                .expect("segmenting never fails");
            if let Some(ext) = segmenter.last_ext() {
                aac.push_opus(frame.payload, ext)
                    .expect("transcoding never fails");
            }
            for o in &out {
                opus_out.check(o);
                if let Some(a) = aac.follow(o).expect("AAC output never fails") {
                    aac_out.check(&a);
                }
            }
        }
        if current != Some(room) {
            continue;
        }
        for o in &segmenter.stream_stopped().expect("stopping never fails") {
            opus_out.check(o);
            if let Some(a) = aac.follow(o).expect("AAC output never fails") {
                aac_out.check(&a);
            }
        }
    }
});
