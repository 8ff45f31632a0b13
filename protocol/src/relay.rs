//! Relay frame codec: one QUIC datagram (or one length-prefixed record on a program stream) per
//! Opus packet.
//!
//! Layout, little-endian:
//! `u8 version | u8 kind | u64 room | u32 speaker | u16 seq | u32 rtp_ts | u8 audio_level | payload`.
//!
//! Kind 3 ([`FrameKind::SpeakerRepeat`]) was added within version 1: a receiver that predates it
//! refuses such frames as an unknown kind, which only costs the protection it gives.
//!
//! Kind 4 ([`FrameKind::SpeakerIdentity`]) was added within version 1 too: a record on a program
//! stream (never a datagram) naming participant `speaker`, its payload a [`SpeakerIdentity`]. A
//! packager that predates it drops the program stream on it, so packagers are upgraded before
//! origins.

use crate::ids::RoomId;

/// The only version this build speaks.
pub const RELAY_VERSION: u8 = 1;
/// Bytes before the Opus payload.
pub const RELAY_HEADER_LEN: usize = 21;
/// Largest Opus payload we accept (RFC 6716 allows at most 1275 bytes per frame; 20 ms mono is far less).
pub const MAX_OPUS_PAYLOAD: usize = 1275;

/// What a relay frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// One speaker's Opus packet (edge -> origin, origin -> other edges).
    SpeakerAudio = 1,
    /// One frame of a room's mixed program stream (origin -> packager); `speaker` is the loudest
    /// speaker in that frame, or 0 for none.
    Program = 2,
    /// A second copy of a speaker's previous `SpeakerAudio` frame, sent by the edge with the next
    /// one (edge -> origin only) so a datagram lost on the relay costs no audio: the origin
    /// mixes it when the original is missing and never forwards it.
    SpeakerRepeat = 3,
    /// Who participant `speaker` is (origin -> packager, on the program stream, before the
    /// program frames it is loudest in): the payload is a [`SpeakerIdentity`]; `seq`, `rtp_ts`
    /// are 0 and `audio_level` 127.
    SpeakerIdentity = 4,
}

/// Longest user id carried (the API's `user_id` limit).
pub const MAX_IDENTITY_USER: usize = 128;

/// The payload of a [`FrameKind::SpeakerIdentity`] record: `u8 user_len | user | name`, both
/// UTF-8, the name taking the rest (at most [`MAX_OPUS_PAYLOAD`] bytes in all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpeakerIdentity<'a> {
    /// Stable user id (the token's `sub`, the application's `user_id`).
    pub user: &'a str,
    /// Display name.
    pub name: &'a str,
}

/// Why a [`SpeakerIdentity`] payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum IdentityError {
    /// The user id is empty, longer than [`MAX_IDENTITY_USER`] or longer than the payload.
    #[error("bad user id length")]
    UserLen,
    /// Not UTF-8.
    #[error("identity is not UTF-8")]
    Utf8,
    /// The encoded identity does not fit one record.
    #[error("identity too long")]
    TooLong,
}

impl<'a> SpeakerIdentity<'a> {
    /// Append the payload to `out`.
    pub fn encode_to_vec(&self, out: &mut Vec<u8>) -> Result<(), IdentityError> {
        if self.user.is_empty() || self.user.len() > MAX_IDENTITY_USER {
            return Err(IdentityError::UserLen);
        }
        if 1 + self.user.len() + self.name.len() > MAX_OPUS_PAYLOAD {
            return Err(IdentityError::TooLong);
        }
        out.push(self.user.len() as u8);
        out.extend_from_slice(self.user.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        Ok(())
    }

    /// Parse a payload; never panics, whatever the input.
    pub fn decode(payload: &'a [u8]) -> Result<Self, IdentityError> {
        let (&len, rest) = payload.split_first().ok_or(IdentityError::UserLen)?;
        let len = usize::from(len);
        if len == 0 || len > MAX_IDENTITY_USER || len > rest.len() {
            return Err(IdentityError::UserLen);
        }
        let (user, name) = rest.split_at(len);
        Ok(SpeakerIdentity {
            user: std::str::from_utf8(user).map_err(|_| IdentityError::Utf8)?,
            name: std::str::from_utf8(name).map_err(|_| IdentityError::Utf8)?,
        })
    }
}

/// A decoded relay frame borrowing its payload from the input buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayFrame<'a> {
    /// What this frame carries.
    pub kind: FrameKind,
    /// Room the packet belongs to.
    pub room: RoomId,
    /// Sender's participant id (see [`crate::ParticipantId`]).
    pub speaker: u32,
    /// RTP sequence number of the packet (or program frame counter).
    pub seq: u16,
    /// RTP timestamp, 48 kHz clock.
    pub rtp_ts: u32,
    /// RFC 6464 audio level: 0 (loudest, 0 dBov) to 127 (silence).
    pub audio_level: u8,
    /// One Opus packet.
    pub payload: &'a [u8],
}

/// Why a relay frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum RelayError {
    /// Shorter than the fixed header.
    #[error("relay frame too short: {0} bytes")]
    TooShort(usize),
    /// A version this build does not speak.
    #[error("unsupported relay version {0}")]
    Version(u8),
    /// An unknown kind byte.
    #[error("unknown relay frame kind {0}")]
    Kind(u8),
    /// Audio level outside 0..=127.
    #[error("audio level {0} out of range")]
    AudioLevel(u8),
    /// Payload empty or larger than an Opus packet can be.
    #[error("opus payload of {0} bytes out of range")]
    PayloadLen(usize),
    /// The output buffer cannot hold the frame.
    #[error("output buffer too small")]
    BufferTooSmall,
}

impl<'a> RelayFrame<'a> {
    /// Encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        RELAY_HEADER_LEN + self.payload.len()
    }

    /// Write the frame into `out`, returning the bytes written. Allocates nothing.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, RelayError> {
        if self.payload.is_empty() || self.payload.len() > MAX_OPUS_PAYLOAD {
            return Err(RelayError::PayloadLen(self.payload.len()));
        }
        let len = self.encoded_len();
        if out.len() < len {
            return Err(RelayError::BufferTooSmall);
        }
        out[0] = RELAY_VERSION;
        out[1] = self.kind as u8;
        out[2..10].copy_from_slice(&self.room.0.to_le_bytes());
        out[10..14].copy_from_slice(&self.speaker.to_le_bytes());
        out[14..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..20].copy_from_slice(&self.rtp_ts.to_le_bytes());
        out[20] = self.audio_level.min(127);
        out[RELAY_HEADER_LEN..len].copy_from_slice(self.payload);
        Ok(len)
    }

    /// Append the frame to `out` (convenience for owned buffers).
    pub fn encode_to_vec(&self, out: &mut Vec<u8>) -> Result<(), RelayError> {
        let start = out.len();
        out.resize(start + self.encoded_len(), 0);
        match self.encode_into(&mut out[start..]) {
            Ok(_) => Ok(()),
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// Parse a frame; never panics, whatever the input.
    pub fn decode(buf: &'a [u8]) -> Result<Self, RelayError> {
        if buf.len() < RELAY_HEADER_LEN {
            return Err(RelayError::TooShort(buf.len()));
        }
        if buf[0] != RELAY_VERSION {
            return Err(RelayError::Version(buf[0]));
        }
        let kind = match buf[1] {
            1 => FrameKind::SpeakerAudio,
            2 => FrameKind::Program,
            3 => FrameKind::SpeakerRepeat,
            4 => FrameKind::SpeakerIdentity,
            k => return Err(RelayError::Kind(k)),
        };
        let audio_level = buf[20];
        if audio_level > 127 {
            return Err(RelayError::AudioLevel(audio_level));
        }
        let payload = &buf[RELAY_HEADER_LEN..];
        if payload.is_empty() || payload.len() > MAX_OPUS_PAYLOAD {
            return Err(RelayError::PayloadLen(payload.len()));
        }
        Ok(RelayFrame {
            kind,
            room: RoomId(u64::from_le_bytes(buf[2..10].try_into().expect("8 bytes"))),
            speaker: u32::from_le_bytes(buf[10..14].try_into().expect("4 bytes")),
            seq: u16::from_le_bytes(buf[14..16].try_into().expect("2 bytes")),
            rtp_ts: u32::from_le_bytes(buf[16..20].try_into().expect("4 bytes")),
            audio_level,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RelayFrame<'static> {
        RelayFrame {
            kind: FrameKind::SpeakerAudio,
            room: RoomId(0x0102_0304_0506_0708),
            speaker: 0x0100_0007,
            seq: 65_535,
            rtp_ts: 0xdead_beef,
            audio_level: 30,
            payload: &[0xfc, 1, 2, 3],
        }
    }

    #[test]
    fn round_trip() {
        let f = sample();
        let mut buf = [0u8; 64];
        let n = f.encode_into(&mut buf).unwrap();
        assert_eq!(n, RELAY_HEADER_LEN + 4);
        assert_eq!(RelayFrame::decode(&buf[..n]).unwrap(), f);
    }

    #[test]
    fn layout_is_little_endian_as_documented() {
        let mut v = Vec::new();
        sample().encode_to_vec(&mut v).unwrap();
        assert_eq!(v[0], 1);
        assert_eq!(v[1], 1);
        assert_eq!(&v[2..10], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&v[14..16], &[0xff, 0xff]);
        assert_eq!(&v[16..20], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(v[20], 30);
    }

    #[test]
    fn repeat_kind_round_trips() {
        let f = RelayFrame {
            kind: FrameKind::SpeakerRepeat,
            ..sample()
        };
        let mut v = Vec::new();
        f.encode_to_vec(&mut v).unwrap();
        assert_eq!(v[1], 3);
        assert_eq!(RelayFrame::decode(&v).unwrap(), f);
    }

    #[test]
    fn identity_records_round_trip_and_bad_payloads_are_refused() {
        let id = SpeakerIdentity {
            user: "user-42",
            name: "Zoë \"Z\" Ångström",
        };
        let mut payload = Vec::new();
        id.encode_to_vec(&mut payload).unwrap();
        assert_eq!(payload[0], 7);
        let f = RelayFrame {
            kind: FrameKind::SpeakerIdentity,
            seq: 0,
            rtp_ts: 0,
            audio_level: 127,
            payload: &payload,
            ..sample()
        };
        let mut v = Vec::new();
        f.encode_to_vec(&mut v).unwrap();
        assert_eq!(v[1], 4);
        let back = RelayFrame::decode(&v).unwrap();
        assert_eq!(back.kind, FrameKind::SpeakerIdentity);
        assert_eq!(SpeakerIdentity::decode(back.payload), Ok(id));
        // An empty name is allowed; an empty or overlong user id, bad UTF-8 are not.
        assert_eq!(
            SpeakerIdentity::decode(b"\x01u"),
            Ok(SpeakerIdentity {
                user: "u",
                name: ""
            })
        );
        assert_eq!(SpeakerIdentity::decode(b""), Err(IdentityError::UserLen));
        assert_eq!(
            SpeakerIdentity::decode(b"\x00ab"),
            Err(IdentityError::UserLen)
        );
        assert_eq!(
            SpeakerIdentity::decode(b"\x05ab"),
            Err(IdentityError::UserLen)
        );
        assert_eq!(
            SpeakerIdentity::decode(b"\x01a\xff"),
            Err(IdentityError::Utf8)
        );
        let long = "x".repeat(MAX_IDENTITY_USER + 1);
        let bad = SpeakerIdentity {
            user: &long,
            name: "",
        };
        assert_eq!(
            bad.encode_to_vec(&mut Vec::new()),
            Err(IdentityError::UserLen)
        );
        let name = "n".repeat(MAX_OPUS_PAYLOAD);
        let bad = SpeakerIdentity {
            user: "u",
            name: &name,
        };
        assert_eq!(
            bad.encode_to_vec(&mut Vec::new()),
            Err(IdentityError::TooLong)
        );
    }

    #[test]
    fn rejects_bad_frames() {
        let mut v = Vec::new();
        sample().encode_to_vec(&mut v).unwrap();
        assert_eq!(RelayFrame::decode(&v[..5]), Err(RelayError::TooShort(5)));
        assert_eq!(
            RelayFrame::decode(&v[..RELAY_HEADER_LEN]),
            Err(RelayError::PayloadLen(0))
        );
        let mut bad = v.clone();
        bad[0] = 9;
        assert_eq!(RelayFrame::decode(&bad), Err(RelayError::Version(9)));
        let mut bad = v.clone();
        bad[1] = 0;
        assert_eq!(RelayFrame::decode(&bad), Err(RelayError::Kind(0)));
        bad[1] = 5;
        assert_eq!(RelayFrame::decode(&bad), Err(RelayError::Kind(5)));
        let mut bad = v.clone();
        bad[20] = 200;
        assert_eq!(RelayFrame::decode(&bad), Err(RelayError::AudioLevel(200)));
        let mut big = v[..RELAY_HEADER_LEN].to_vec();
        big.extend(std::iter::repeat_n(0, MAX_OPUS_PAYLOAD + 1));
        assert!(matches!(
            RelayFrame::decode(&big),
            Err(RelayError::PayloadLen(_))
        ));
        let mut small = [0u8; 10];
        assert_eq!(
            sample().encode_into(&mut small),
            Err(RelayError::BufferTooSmall)
        );
    }
}
