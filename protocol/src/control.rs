//! Control messages between edges, origins and packagers.
//!
//! They ride a QUIC bidirectional stream as records `u32 little-endian length | JSON body`, body at
//! most [`MAX_CONTROL_LEN`] bytes. Program streams (origin -> packager, one QUIC unidirectional
//! stream per room) use the same record framing with a relay frame as the body.

use crate::ids::{ParticipantId, RoomId};
use crate::room::{RoomCommand, RoomEvent, RoomState};
use serde::{Deserialize, Serialize};

/// Largest control record body (64 KiB).
pub const MAX_CONTROL_LEN: usize = 64 * 1024;
/// Largest record on a program stream (one relay frame).
pub const MAX_PROGRAM_RECORD_LEN: usize =
    crate::relay::RELAY_HEADER_LEN + crate::relay::MAX_OPUS_PAYLOAD;

/// Which component opened a connection to an origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerKind {
    /// An edge node: sends speaker datagrams, receives other regions' speakers.
    Edge,
    /// A cdn-packager: receives program streams.
    Packager,
    /// A geo-router: ends rooms (`RoomEnded`) and learns which rooms ended elsewhere.
    Router,
}

impl PeerKind {
    /// The role a peer's mesh certificate must carry to say `Hello` as this kind.
    pub fn mesh_role(self) -> crate::mtls::MeshRole {
        match self {
            PeerKind::Edge => crate::mtls::MeshRole::Edge,
            PeerKind::Packager => crate::mtls::MeshRole::Packager,
            PeerKind::Router => crate::mtls::MeshRole::Router,
        }
    }
}

/// A message on a control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// First message from the connecting peer.
    Hello {
        /// What the peer is.
        peer: PeerKind,
        /// Stable id of the peer (e.g. `edge-us-east-1`).
        id: String,
        /// Region the peer serves.
        region: String,
    },
    /// The origin's answer to `Hello`.
    Welcome {
        /// The origin's id.
        origin: String,
    },
    /// Edge -> origin: a participant started publishing audio in a room.
    SpeakerJoined {
        /// The room.
        room: RoomId,
        /// Media id used in relay frames.
        speaker: ParticipantId,
        /// Display name.
        name: String,
        /// Region of the edge that hosts the speaker.
        region: String,
    },
    /// Edge -> origin: a participant stopped publishing.
    SpeakerLeft {
        /// The room.
        room: RoomId,
        /// Media id used in relay frames.
        speaker: ParticipantId,
    },
    /// Edge -> origin: relay this room's speakers from other edges to me.
    SubscribeRoom {
        /// The room.
        room: RoomId,
    },
    /// Edge -> origin: stop relaying this room to me.
    UnsubscribeRoom {
        /// The room.
        room: RoomId,
    },
    /// Either way: the room has ended.
    RoomEnded {
        /// The room.
        room: RoomId,
    },
    /// Origin -> packagers: a room is live (its first participant joined), possibly before any
    /// program media. The packager prepares the room's output so players' blocking playlist
    /// requests are held until media arrives instead of answered 404. Re-sent for every live
    /// room when a packager connects.
    RoomOpened {
        /// The room.
        room: RoomId,
    },
    /// Origin -> every edge and geo-router: `user`'s tokens for `room` are revoked (the user was
    /// kicked and is banned until the room ends). Edges refuse those tokens and end the user's
    /// sessions in the room; routers refuse to mint for the user. Each keeps the entry for its
    /// own token lifetime cap (every token issued before it has expired by then; the origin's
    /// ban refuses later ones). Re-sent for every live ban when an edge or router connects.
    Revoke {
        /// The room.
        room: RoomId,
        /// The user (token `sub`).
        user: String,
    },
    /// Liveness probe; answered with `Pong` carrying the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// The nonce of the `Ping`.
        nonce: u64,
    },
    /// Edge -> origin: a participant's command to the room authority. `request` is echoed in a
    /// `CommandRejected` if the authority refuses it.
    RoomCommand {
        /// The room.
        room: RoomId,
        /// The participant acting (for `Join`: the id the edge allocated).
        actor: ParticipantId,
        /// Edge-chosen request id.
        request: u64,
        /// What to do.
        command: RoomCommand,
    },
    /// Origin -> every edge subscribed to the room (the sender included): state changes, in
    /// authority order.
    RoomEvents {
        /// The room.
        room: RoomId,
        /// The changes.
        events: Vec<RoomEvent>,
    },
    /// Origin -> edge: the full state, after a successful `Join` from that edge (it follows the
    /// join's `RoomEvents` and already includes them; see `docs/signaling.md`).
    RoomSnapshot {
        /// The state.
        state: RoomState,
    },
    /// Origin -> edge: a command was refused and changed nothing.
    CommandRejected {
        /// The room.
        room: RoomId,
        /// The participant whose command it was.
        actor: ParticipantId,
        /// The request id of the command.
        request: u64,
        /// Machine-readable code (`forbidden`, `banned`, `not_found`, `ended`, `rate_limited`, ...).
        code: String,
        /// Human-readable explanation.
        message: String,
    },
    /// The peer refused something.
    Error {
        /// Machine-readable code.
        code: String,
        /// Human-readable explanation.
        message: String,
    },
}

/// Why a control record was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The length prefix exceeds the limit for this stream.
    #[error("record of {len} bytes exceeds the {max}-byte limit")]
    TooLong {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A zero-length record.
    #[error("empty record")]
    Empty,
    /// The body is not a valid control message.
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Read a record's length prefix and check it against `max`.
pub fn record_len(prefix: [u8; 4], max: usize) -> Result<usize, ControlError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 {
        return Err(ControlError::Empty);
    }
    if len > max {
        return Err(ControlError::TooLong { len, max });
    }
    Ok(len)
}

/// Write `body` as one record (`u32` LE length + body) onto `out`.
pub fn write_record(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

impl ControlMessage {
    /// Encode as one length-prefixed record.
    pub fn to_record(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("control messages always serialize");
        let mut out = Vec::with_capacity(4 + body.len());
        write_record(&body, &mut out);
        out
    }

    /// Decode a record body (without its length prefix).
    pub fn from_body(body: &[u8]) -> Result<Self, ControlError> {
        if body.len() > MAX_CONTROL_LEN {
            return Err(ControlError::TooLong {
                len: body.len(),
                max: MAX_CONTROL_LEN,
            });
        }
        Ok(serde_json::from_slice(body)?)
    }
}

/// Incremental decoder for a byte stream of control records; feed bytes, pull messages.
#[derive(Default)]
pub struct ControlDecoder {
    buf: Vec<u8>,
}

impl ControlDecoder {
    /// Append bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. After an error the stream
    /// is unusable and should be closed.
    pub fn next_message(&mut self) -> Result<Option<ControlMessage>, ControlError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = record_len(self.buf[..4].try_into().expect("4 bytes"), MAX_CONTROL_LEN)?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = ControlMessage::from_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_in_pieces() {
        let msgs = vec![
            ControlMessage::Hello {
                peer: PeerKind::Edge,
                id: "edge-us-east".into(),
                region: "us-east".into(),
            },
            ControlMessage::SpeakerJoined {
                room: RoomId(7),
                speaker: ParticipantId(0x0100_0001),
                name: "ada".into(),
                region: "us-east".into(),
            },
            ControlMessage::Ping { nonce: 42 },
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(m.to_record());
        }
        let mut dec = ControlDecoder::default();
        let mut out = Vec::new();
        for chunk in bytes.chunks(3) {
            dec.feed(chunk);
            while let Some(m) = dec.next_message().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
    }

    #[test]
    fn json_shape_is_tagged() {
        let v = serde_json::to_value(ControlMessage::RoomEnded { room: RoomId(1) }).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "room_ended", "room": "0000000000000001"})
        );
    }

    #[test]
    fn rejects_oversized_empty_and_garbage() {
        let mut dec = ControlDecoder::default();
        dec.feed(&((MAX_CONTROL_LEN as u32 + 1).to_le_bytes()));
        assert!(matches!(
            dec.next_message(),
            Err(ControlError::TooLong { .. })
        ));
        assert!(matches!(
            record_len([0, 0, 0, 0], 10),
            Err(ControlError::Empty)
        ));
        let mut dec = ControlDecoder::default();
        let mut rec = Vec::new();
        write_record(b"{\"type\":\"nope\"}", &mut rec);
        dec.feed(&rec);
        assert!(matches!(
            dec.next_message(),
            Err(ControlError::Malformed(_))
        ));
    }
}
