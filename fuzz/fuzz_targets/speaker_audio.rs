//! Speaker audio at the origin: arbitrary sequences of relay packets (sequence number, RTP
//! timestamp, arrival time, level, Opus payload; originals and relay repeats) from several speakers
//! of two rooms, with joins, leaves, lost connections, room ends and 20 ms polls, go through the
//! relay frame codec into `Programs` (jitter buffers, Opus decoders with PLC and FEC, mixer,
//! limiter, encoder). Nothing panics or fails, and every program frame is a well-formed record of
//! its room with consecutive frame numbers.
//!
//! Payloads are real Opus packets (SILK with in-band FEC, hybrid and CELT, as browsers send them),
//! corrupted copies of them, or raw bytes.
#![no_main]
#[path = "common/opus_packets.rs"]
mod opus_packets;

use amphi_origin::jitter::PushOutcome;
use amphi_origin::mixer::MixerConfig;
use amphi_origin::programs::{Admission, ProgramEvent, Programs, ProgramsConfig};
use amphi_protocol::audio::FRAME_SAMPLES;
use amphi_protocol::relay::{FrameKind, RelayFrame, MAX_OPUS_PAYLOAD};
use amphi_protocol::RoomId;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Simulated time per input is capped so one input stays cheap (each tick encodes a frame).
const MAX_TICKS: u64 = 10;

#[derive(Arbitrary, Debug)]
enum Ts {
    /// The next 20 ms frame.
    Next,
    /// A step of whole frames (negative: reordered, zero: duplicate).
    Frames(i8),
    /// Any step (a restart with an unrelated timestamp, wrap-around).
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Payload {
    /// A valid Opus packet.
    Valid(u8),
    /// A valid packet with one byte replaced.
    Corrupt { packet: u8, at: u16, byte: u8 },
    /// A valid packet cut short.
    Truncated { packet: u8, len: u16 },
    /// Anything (possibly empty or oversized).
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Event {
    /// A speaker packet relative to that speaker's previous one.
    Audio {
        room: bool,
        speaker: u8,
        seq_step: i8,
        ts: Ts,
        /// How long before the current time it arrived, in microseconds.
        age_us: u16,
        level: u8,
        payload: Payload,
        /// Sent as the relay's repeated copy (`SpeakerRepeat`).
        repeat: bool,
    },
    Join {
        room: bool,
        speaker: u8,
        source: u8,
    },
    Leave {
        room: bool,
        speaker: u8,
    },
    SourceGone {
        source: u8,
    },
    End {
        room: bool,
    },
    /// Advance the clock and poll.
    Poll {
        ms: u8,
    },
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
        Payload::Truncated { packet, len } => {
            let v = &all[usize::from(*packet) % all.len()];
            v[..usize::from(*len) % (v.len() + 1)].to_vec()
        }
        Payload::Raw(v) => v[..v.len().min(MAX_OPUS_PAYLOAD + 2)].to_vec(),
    }
}

fn room_id(second: bool) -> RoomId {
    RoomId(if second { 2 } else { 1 })
}

fuzz_target!(|events: Vec<Event>| {
    let epoch = Instant::now();
    let cfg = ProgramsConfig {
        mixer: MixerConfig {
            max_speakers: 3,
            ..MixerConfig::default()
        },
        max_rooms: 2,
        speaker_idle: Duration::from_millis(200),
        idle_end: Some(Duration::from_millis(300)),
        ended_memory: Duration::from_millis(250),
    };
    let mut programs = Programs::new(cfg, epoch);
    let mut now = epoch;
    // (room, speaker) -> (seq, rtp_ts) of its previous packet.
    let mut last: HashMap<(RoomId, u32), (u16, u32)> = HashMap::new();
    // room -> seq of its previous program frame.
    let mut frames: HashMap<RoomId, u16> = HashMap::new();
    let mut wire = Vec::new();
    for ev in events {
        match ev {
            Event::Audio {
                room,
                speaker,
                seq_step,
                ts,
                age_us,
                level,
                payload: p,
                repeat,
            } => {
                let room = room_id(room);
                let speaker = u32::from(speaker % 4) + 1;
                let (seq, rtp_ts) = last.get(&(room, speaker)).copied().unwrap_or((0, 4242));
                let rtp_ts = match ts {
                    Ts::Next => rtp_ts.wrapping_add(FRAME_SAMPLES as u32),
                    Ts::Frames(n) => {
                        rtp_ts.wrapping_add((i32::from(n) * FRAME_SAMPLES as i32) as u32)
                    }
                    Ts::Raw(step) => rtp_ts.wrapping_add(step),
                };
                let seq = seq.wrapping_add(seq_step as u16);
                last.insert((room, speaker), (seq, rtp_ts));
                let bytes = payload(&p);
                let frame = RelayFrame {
                    kind: if repeat {
                        FrameKind::SpeakerRepeat
                    } else {
                        FrameKind::SpeakerAudio
                    },
                    room,
                    speaker,
                    seq,
                    rtp_ts,
                    audio_level: level % 128,
                    payload: &bytes,
                };
                let valid = !bytes.is_empty() && bytes.len() <= MAX_OPUS_PAYLOAD;
                wire.clear();
                // What the hub hands the mixer: a decoded datagram. Invalid payloads cannot be
                // encoded; the mixer must refuse them anyway.
                let admission = if frame.encode_to_vec(&mut wire).is_ok() {
                    assert!(valid, "an invalid payload was encoded");
                    let decoded = RelayFrame::decode(&wire).expect("own encoding decodes");
                    assert_eq!(decoded, frame);
                    programs.packet(
                        &decoded,
                        now - Duration::from_micros(u64::from(age_us)).min(now - epoch),
                    )
                } else {
                    assert!(!valid, "a valid frame failed to encode");
                    programs.packet(&frame, now)
                };
                if !valid {
                    assert!(
                        matches!(
                            admission,
                            Admission::Mixed(PushOutcome::Invalid | PushOutcome::OutOfRange)
                                | Admission::RoomEnded
                                | Admission::TooManyRooms
                                | Admission::TooManySpeakers
                        ),
                        "invalid payload admitted: {admission:?}"
                    );
                }
            }
            Event::Join {
                room,
                speaker,
                source,
            } => {
                let _ = programs.speaker_joined(
                    room_id(room),
                    u32::from(speaker % 4) + 1,
                    u64::from(source % 3) + 1,
                    now,
                );
            }
            Event::Leave { room, speaker } => {
                programs.speaker_left(room_id(room), u32::from(speaker % 4) + 1, now)
            }
            Event::SourceGone { source } => programs.source_gone(u64::from(source % 3) + 1, now),
            Event::End { room } => {
                programs.room_ended(room_id(room), now);
            }
            Event::Poll { ms } => {
                let next = now + Duration::from_millis(u64::from(ms % 100));
                if next.duration_since(epoch) > Duration::from_millis(20 * MAX_TICKS) {
                    break;
                }
                now = next;
                let mut failure = None;
                programs
                    .poll(now, &mut |ev| {
                        if let ProgramEvent::Stopped(room) = ev {
                            // A later program of the room numbers its frames afresh.
                            frames.remove(&room);
                        }
                        if let ProgramEvent::Frame(room, f) = ev {
                            let check = (|| {
                                let len = u32::from_le_bytes(f.record[..4].try_into().ok()?);
                                let d = RelayFrame::decode(&f.record[4..]).ok()?;
                                (len as usize == f.record.len() - 4
                                    && d.kind == FrameKind::Program
                                    && d.room == room
                                    && d.payload == f.payload
                                    && d.seq == f.seq)
                                    .then_some(())
                            })();
                            if check.is_none() {
                                failure = Some(format!("malformed program record of {room}"));
                            }
                            if let Some(prev) = frames.insert(room, f.seq) {
                                if f.seq != prev.wrapping_add(1) {
                                    failure = Some(format!("{room}: frame {} after {prev}", f.seq));
                                }
                            }
                        }
                    })
                    .expect("mixing never fails");
                if let Some(f) = failure {
                    panic!("{f}");
                }
            }
        }
    }
});
