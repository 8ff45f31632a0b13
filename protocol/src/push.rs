//! The push listener tier's wire format: a room's program stream pushed to browsers over a
//! WebSocket (`GET /v1/rooms/{room}/push` on an edge, `docs/push.md`).
//!
//! The edge sends one text message first, a JSON [`PushHeader`] (codec, clock, frame duration, the
//! room timestamp base), then binary messages, each an [`AudioMessage`]: a few Opus frames of the
//! program with their room timestamps. Every listener of a room gets the same bytes: the edge
//! encodes each message (WebSocket framing included, server frames are unmasked) once and writes
//! it to every socket.
//!
//! Audio message layout, little-endian:
//! `u8 version | u8 kind | u16 count | u32 seq | count x (u64 ts | u16 len | opus[len])`.
//! `ts` is the frame's room timestamp on the 48 kHz program clock (frames since the room's program
//! started x 960): a listener that reconnects asks to resume after the last one it played
//! (`?after=`). `seq` counts the room's messages at this edge (a gap = messages skipped).
//!
//! The server side of WebSocket framing (RFC 6455 §5.2) lives here too: [`ws_server_frame`]
//! writes an unmasked frame, [`parse_client_frame`] reads the client's masked ones. Every parser
//! returns errors, never panics (`fuzz/fuzz_targets/push_message.rs`).

use crate::relay::MAX_OPUS_PAYLOAD;
use serde::{Deserialize, Serialize};

/// The only audio message version this build speaks.
pub const PUSH_VERSION: u8 = 1;
/// Kind byte of an [`AudioMessage`].
pub const KIND_AUDIO: u8 = 1;
/// Bytes before the first frame of an audio message.
pub const AUDIO_HEADER_LEN: usize = 8;
/// Bytes before each frame's Opus payload.
pub const FRAME_HEADER_LEN: usize = 10;
/// Most frames one audio message carries (1 s of 20 ms frames).
pub const MAX_FRAMES_PER_MESSAGE: usize = 50;
/// Program clock rate (Hz).
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples per program frame (20 ms at 48 kHz).
pub const FRAME_SAMPLES: u64 = 960;

/// The first message of a push stream (a WebSocket text message, JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushHeader {
    /// Always `push_header`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The room (16 hex digits).
    pub room: String,
    /// Codec of the frames: `opus`.
    pub codec: String,
    /// Clock rate of the timestamps and of the decoded audio (48000).
    pub sample_rate: u32,
    /// Channels of the decoded audio (1).
    pub channels: u8,
    /// Duration of one frame in milliseconds (20).
    pub frame_ms: u32,
    /// Frames per audio message (the edge batches this many; fewer after a gap).
    pub frames_per_message: u32,
    /// A room timestamp (48 kHz) and when the edge received that frame (Unix microseconds): the
    /// program time of frame `ts` is `ts_base_unix_us + (ts - ts_base) * 1000 / 48` µs, which
    /// lets a client tell how late a frame is.
    pub ts_base: u64,
    /// See [`PushHeader::ts_base`].
    pub ts_base_unix_us: u64,
}

impl PushHeader {
    /// The header of room `room` (its id's text form) for messages of `frames_per_message`
    /// frames, anchored at timestamp `ts_base` received at `ts_base_unix_us`.
    pub fn opus(room: String, frames_per_message: u32, ts_base: u64, ts_base_unix_us: u64) -> Self {
        PushHeader {
            kind: "push_header".into(),
            room,
            codec: "opus".into(),
            sample_rate: SAMPLE_RATE,
            channels: 1,
            frame_ms: 20,
            frames_per_message,
            ts_base,
            ts_base_unix_us,
        }
    }
}

/// Why a push message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum PushError {
    /// Shorter than its header or than its frames say.
    #[error("push message truncated")]
    Truncated,
    /// A version this build does not speak.
    #[error("unsupported push version {0}")]
    Version(u8),
    /// An unknown kind byte.
    #[error("unknown push message kind {0}")]
    Kind(u8),
    /// No frames, or more than [`MAX_FRAMES_PER_MESSAGE`].
    #[error("{0} frames in one message")]
    Count(usize),
    /// A frame's payload is empty or larger than an Opus packet can be.
    #[error("opus payload of {0} bytes out of range")]
    PayloadLen(usize),
    /// Bytes after the last frame.
    #[error("{0} bytes after the last frame")]
    Trailing(usize),
}

/// One program frame in an audio message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushFrame<'a> {
    /// Room timestamp (48 kHz program clock).
    pub ts: u64,
    /// One Opus packet (20 ms).
    pub opus: &'a [u8],
}

/// A decoded audio message, borrowing from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AudioMessage<'a> {
    /// The room's message counter at this edge.
    pub seq: u32,
    count: usize,
    /// The frames' bytes (validated by [`AudioMessage::decode`]).
    body: &'a [u8],
}

impl<'a> AudioMessage<'a> {
    /// Append the message of `frames` numbered `seq` to `out`.
    pub fn encode(seq: u32, frames: &[PushFrame<'_>], out: &mut Vec<u8>) -> Result<(), PushError> {
        if frames.is_empty() || frames.len() > MAX_FRAMES_PER_MESSAGE {
            return Err(PushError::Count(frames.len()));
        }
        if let Some(f) = frames
            .iter()
            .find(|f| f.opus.is_empty() || f.opus.len() > MAX_OPUS_PAYLOAD)
        {
            return Err(PushError::PayloadLen(f.opus.len()));
        }
        out.reserve(Self::encoded_len(frames));
        out.push(PUSH_VERSION);
        out.push(KIND_AUDIO);
        out.extend_from_slice(&(frames.len() as u16).to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        for f in frames {
            out.extend_from_slice(&f.ts.to_le_bytes());
            out.extend_from_slice(&(f.opus.len() as u16).to_le_bytes());
            out.extend_from_slice(f.opus);
        }
        Ok(())
    }

    /// Bytes [`AudioMessage::encode`] writes for `frames`.
    pub fn encoded_len(frames: &[PushFrame<'_>]) -> usize {
        AUDIO_HEADER_LEN
            + frames
                .iter()
                .map(|f| FRAME_HEADER_LEN + f.opus.len())
                .sum::<usize>()
    }

    /// Parse and validate a message; never panics, whatever the input.
    pub fn decode(buf: &'a [u8]) -> Result<Self, PushError> {
        if buf.len() < AUDIO_HEADER_LEN {
            return Err(PushError::Truncated);
        }
        if buf[0] != PUSH_VERSION {
            return Err(PushError::Version(buf[0]));
        }
        if buf[1] != KIND_AUDIO {
            return Err(PushError::Kind(buf[1]));
        }
        let count = usize::from(u16::from_le_bytes([buf[2], buf[3]]));
        if count == 0 || count > MAX_FRAMES_PER_MESSAGE {
            return Err(PushError::Count(count));
        }
        let seq = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let body = &buf[AUDIO_HEADER_LEN..];
        let mut rest = body;
        for _ in 0..count {
            let (frame, tail) = split_frame(rest)?;
            if frame.opus.is_empty() || frame.opus.len() > MAX_OPUS_PAYLOAD {
                return Err(PushError::PayloadLen(frame.opus.len()));
            }
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(PushError::Trailing(rest.len()));
        }
        Ok(AudioMessage { seq, count, body })
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no frames (never, for a decoded message).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The frames, in order.
    pub fn frames(&self) -> impl Iterator<Item = PushFrame<'a>> + 'a {
        let mut rest = self.body;
        (0..self.count).map_while(move |_| {
            let (frame, tail) = split_frame(rest).ok()?;
            rest = tail;
            Some(frame)
        })
    }
}

/// The first frame of `buf` and what follows it.
fn split_frame(buf: &[u8]) -> Result<(PushFrame<'_>, &[u8]), PushError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Err(PushError::Truncated);
    }
    let (head, rest) = buf.split_at(FRAME_HEADER_LEN);
    let ts = u64::from_le_bytes(head[..8].try_into().map_err(|_| PushError::Truncated)?);
    let len = usize::from(u16::from_le_bytes([head[8], head[9]]));
    if rest.len() < len {
        return Err(PushError::Truncated);
    }
    let (opus, tail) = rest.split_at(len);
    Ok((PushFrame { ts, opus }, tail))
}

/// WebSocket opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// Continuation frame.
    pub const CONTINUATION: u8 = 0x0;
    /// Text frame.
    pub const TEXT: u8 = 0x1;
    /// Binary frame.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// Append one final, unmasked WebSocket frame (a server's) of `opcode` carrying `payload`.
pub fn ws_server_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(payload.len() + 10);
    out.push(0x80 | (opcode & 0x0f));
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Largest client frame payload a push stream accepts (clients only send control frames and
/// short commands).
pub const MAX_CLIENT_FRAME: usize = 4096;

/// One frame read from a client (header decoded, payload unmasked into the caller's buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFrame {
    /// The FIN bit.
    pub fin: bool,
    /// The opcode (see [`opcode`]).
    pub opcode: u8,
    /// Bytes of the input the frame took.
    pub consumed: usize,
    /// Where its payload is in the input.
    pub payload: std::ops::Range<usize>,
}

/// Why a client's WebSocket frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum WsError {
    /// RFC 6455 §5.1: every client frame is masked.
    #[error("client frame not masked")]
    Unmasked,
    /// Reserved bits set (no extension was negotiated).
    #[error("reserved bits set")]
    Reserved,
    /// An opcode RFC 6455 reserves.
    #[error("reserved opcode {0}")]
    Opcode(u8),
    /// A control frame fragmented or longer than 125 bytes.
    #[error("bad control frame")]
    Control,
    /// Payload larger than [`MAX_CLIENT_FRAME`] (a client's) or [`MAX_SERVER_FRAME`] (a
    /// server's).
    #[error("frame of {0} bytes too large")]
    TooLarge(u64),
    /// RFC 6455 §5.1: a server never masks its frames.
    #[error("server frame masked")]
    Masked,
}

/// Parse the client frame at the start of `buf`, unmasking its payload in place. `Ok(None)`:
/// more bytes are needed. Never panics, whatever the input.
pub fn parse_client_frame(buf: &mut [u8]) -> Result<Option<ClientFrame>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Err(WsError::Reserved);
    }
    let op = b0 & 0x0f;
    match op {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if !fin || (b1 & 0x7f) > 125 {
                return Err(WsError::Control);
            }
        }
        other => return Err(WsError::Opcode(other)),
    }
    if b1 & 0x80 == 0 {
        return Err(WsError::Unmasked);
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > MAX_CLIENT_FRAME as u64 {
        return Err(WsError::TooLarge(len));
    }
    let len = len as usize;
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    at += 4;
    if buf.len() < at + len {
        return Ok(None);
    }
    for (i, b) in buf[at..at + len].iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok(Some(ClientFrame {
        fin,
        opcode: op,
        consumed: at + len,
        payload: at..at + len,
    }))
}

/// Largest server frame payload a push client accepts (an audio message is at most 50 frames).
pub const MAX_SERVER_FRAME: usize = 1 << 20;

/// One frame read from a server: what [`ws_server_frame`] writes, as a push client (a load
/// generator, a test, a WebTransport stream's reader) reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFrame {
    /// The opcode (see [`opcode`]).
    pub opcode: u8,
    /// Bytes of the input the frame took.
    pub consumed: usize,
    /// Where its payload is in the input.
    pub payload: std::ops::Range<usize>,
}

/// Parse the server frame at the start of `buf`. `Ok(None)`: more bytes are needed. Never
/// panics, whatever the input.
pub fn parse_server_frame(buf: &[u8]) -> Result<Option<ServerFrame>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[1] & 0x80 != 0 {
        return Err(WsError::Masked);
    }
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    if len > MAX_SERVER_FRAME as u64 {
        return Err(WsError::TooLarge(len));
    }
    let len = len as usize;
    if buf.len() < at + len {
        return Ok(None);
    }
    Ok(Some(ServerFrame {
        opcode: buf[0] & 0x0f,
        consumed: at + len,
        payload: at..at + len,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_frames_are_split_off_whole() {
        use super::{opcode, parse_server_frame, ws_server_frame};
        let split = |buf: &[u8]| {
            parse_server_frame(buf).map(|f| f.map(|f| (f.opcode, f.payload, f.consumed)))
        };
        let mut buf = Vec::new();
        ws_server_frame(opcode::TEXT, b"{}", &mut buf);
        ws_server_frame(opcode::BINARY, &[7; 300], &mut buf);
        let (op, payload, taken) = split(&buf).unwrap().unwrap();
        assert_eq!((op, &buf[payload], taken), (opcode::TEXT, &b"{}"[..], 4));
        let rest = &buf[taken..];
        assert_eq!(split(&rest[..100]).unwrap(), None);
        let (op, payload, taken) = split(rest).unwrap().unwrap();
        assert_eq!((op, payload.len(), taken), (opcode::BINARY, 300, 304));
        // A masked frame is not a server's.
        assert!(split(&[0x82, 0x81, 0, 0, 0, 0, 1]).is_err());
    }

    use super::*;

    fn frames() -> Vec<PushFrame<'static>> {
        vec![
            PushFrame {
                ts: 960 * 7,
                opus: &[0xfc, 1, 2],
            },
            PushFrame {
                ts: 960 * 8,
                opus: &[0xfc, 3],
            },
            PushFrame {
                ts: u64::from(u32::MAX) + 960,
                opus: &[0xf8],
            },
        ]
    }

    #[test]
    fn audio_messages_round_trip_with_the_documented_layout() {
        let mut out = Vec::new();
        AudioMessage::encode(0x0102_0304, &frames(), &mut out).unwrap();
        assert_eq!(out.len(), AudioMessage::encoded_len(&frames()));
        assert_eq!(&out[..8], &[1, 1, 3, 0, 4, 3, 2, 1]);
        assert_eq!(&out[8..16], &(960u64 * 7).to_le_bytes());
        assert_eq!(&out[16..18], &[3, 0]);
        let msg = AudioMessage::decode(&out).unwrap();
        assert_eq!(msg.seq, 0x0102_0304);
        assert_eq!(msg.len(), 3);
        assert_eq!(msg.frames().collect::<Vec<_>>(), frames());
    }

    #[test]
    fn bad_audio_messages_are_refused() {
        let mut good = Vec::new();
        AudioMessage::encode(1, &frames(), &mut good).unwrap();
        assert_eq!(AudioMessage::decode(&good[..5]), Err(PushError::Truncated));
        assert_eq!(
            AudioMessage::decode(&good[..good.len() - 1]),
            Err(PushError::Truncated)
        );
        let mut bad = good.clone();
        bad[0] = 2;
        assert_eq!(AudioMessage::decode(&bad), Err(PushError::Version(2)));
        let mut bad = good.clone();
        bad[1] = 9;
        assert_eq!(AudioMessage::decode(&bad), Err(PushError::Kind(9)));
        let mut bad = good.clone();
        bad[2] = 0;
        assert_eq!(AudioMessage::decode(&bad), Err(PushError::Count(0)));
        let mut bad = good.clone();
        bad[2] = 2;
        assert!(matches!(
            AudioMessage::decode(&bad),
            Err(PushError::Trailing(_))
        ));
        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(AudioMessage::decode(&bad), Err(PushError::Trailing(1)));
        // An empty payload.
        let mut bad = good[..8].to_vec();
        bad[2] = 1;
        bad.extend_from_slice(&[0; 10]);
        assert_eq!(AudioMessage::decode(&bad), Err(PushError::PayloadLen(0)));
        assert_eq!(
            AudioMessage::encode(1, &[], &mut Vec::new()),
            Err(PushError::Count(0))
        );
        assert_eq!(
            AudioMessage::encode(1, &[PushFrame { ts: 0, opus: &[] }], &mut Vec::new()),
            Err(PushError::PayloadLen(0))
        );
    }

    /// A client frame as a browser writes it: masked.
    fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn server_frames_have_the_rfc_6455_length_forms() {
        let mut out = Vec::new();
        ws_server_frame(opcode::BINARY, &[7; 5], &mut out);
        assert_eq!(&out[..2], &[0x82, 5]);
        let mut out = Vec::new();
        ws_server_frame(opcode::TEXT, &[7; 300], &mut out);
        assert_eq!(&out[..4], &[0x81, 126, 1, 44]);
        assert_eq!(out.len(), 304);
        let mut out = Vec::new();
        ws_server_frame(opcode::BINARY, &vec![0; 70_000], &mut out);
        assert_eq!(out[1], 127);
        assert_eq!(&out[2..10], &70_000u64.to_be_bytes());
    }

    #[test]
    fn client_frames_are_unmasked_and_bad_ones_refused() {
        let mut buf = client_frame(opcode::PING, b"hello", [1, 2, 3, 4]);
        buf.extend(client_frame(opcode::TEXT, &[b'x'; 200], [9, 8, 7, 6]));
        let f = parse_client_frame(&mut buf).unwrap().unwrap();
        assert_eq!((f.fin, f.opcode), (true, opcode::PING));
        assert_eq!(&buf[f.payload.clone()], b"hello");
        let rest = &mut buf[f.consumed..];
        let g = parse_client_frame(rest).unwrap().unwrap();
        assert_eq!(g.opcode, opcode::TEXT);
        assert_eq!(&rest[g.payload.clone()], &[b'x'; 200][..]);
        assert_eq!(g.consumed, rest.len());
        // Partial input asks for more.
        let mut whole = client_frame(opcode::CLOSE, &[3, 232], [5, 5, 5, 5]);
        for cut in 0..whole.len() {
            assert_eq!(parse_client_frame(&mut whole.clone()[..cut]), Ok(None));
        }
        assert!(parse_client_frame(&mut whole).unwrap().is_some());
        // Unmasked, reserved bits, reserved opcodes, long control frames, oversized frames.
        assert_eq!(
            parse_client_frame(&mut [0x81, 0x01, b'a']),
            Err(WsError::Unmasked)
        );
        assert_eq!(
            parse_client_frame(&mut [0xc1, 0x81, 0, 0, 0, 0, 0]),
            Err(WsError::Reserved)
        );
        assert_eq!(
            parse_client_frame(&mut [0x83, 0x80, 0, 0, 0, 0]),
            Err(WsError::Opcode(3))
        );
        assert_eq!(
            parse_client_frame(&mut [0x09, 0x80, 0, 0, 0, 0]),
            Err(WsError::Control)
        );
        let mut big = vec![0x82, 0x80 | 127];
        big.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(
            parse_client_frame(&mut big),
            Err(WsError::TooLarge(1 << 40))
        );
    }

    #[test]
    fn the_header_is_the_documented_json() {
        let h = PushHeader::opus("00000000000000ab".into(), 3, 960, 1_700_000_000_000_000);
        let v: serde_json::Value = serde_json::to_value(&h).unwrap();
        assert_eq!(v["type"], "push_header");
        assert_eq!(v["codec"], "opus");
        assert_eq!(v["sample_rate"], 48_000);
        assert_eq!(v["frame_ms"], 20);
        assert_eq!(v["ts_base"], 960);
        let back: PushHeader = serde_json::from_value(v).unwrap();
        assert_eq!(back, h);
    }
}
