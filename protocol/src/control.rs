//! Control messages between edges, origins and packagers.
//!
//! They ride a QUIC bidirectional stream as records `u32 little-endian length | JSON body`, body at
//! most [`MAX_CONTROL_LEN`] bytes. Program streams (origin -> packager, one QUIC unidirectional
//! stream per room) use the same record framing with a relay frame as the body.

use crate::ids::{ParticipantId, RoomId};
use crate::room::{Participant, Report, RoomCommand, RoomEvent, RoomState};
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
    pub fn mesh_role(self) -> amphi_common::mtls::MeshRole {
        match self {
            PeerKind::Edge => amphi_common::mtls::MeshRole::Edge,
            PeerKind::Packager => amphi_common::mtls::MeshRole::Packager,
            PeerKind::Router => amphi_common::mtls::MeshRole::Router,
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
    /// Edge -> origin: send me this room's program frames (one `Program` relay frame per 20 ms
    /// as a datagram) for the edge's push listeners. An edge subscribes at every origin it is
    /// linked to: only the room's owner mixes it, so only that one sends, and after a failover
    /// the new owner already knows.
    SubscribeProgram {
        /// The room.
        room: RoomId,
    },
    /// Edge -> origin: stop sending this room's program frames to me.
    UnsubscribeProgram {
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
    /// Geo-router -> every origin -> every edge: the single token `jti` is revoked until
    /// `until` (Unix seconds, the token's `exp`), through the router's `POST /v1/tokens/revoke`.
    /// Edges refuse it and end the sessions it opened. Origins re-send every live one when an
    /// edge connects; routers re-send theirs when an origin link comes up.
    RevokeToken {
        /// The token's `jti`.
        jti: String,
        /// Until when (Unix seconds).
        until: u64,
    },
    /// Origin -> every geo-router: a participant's report, accepted by the room authority (the
    /// routers store it, deduplicated by its id, and emit `report_created`).
    Reported {
        /// The report (its room inside).
        report: Report,
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
    /// Origin -> edge: the full state, after the first successful `Join` from that edge in the
    /// room (it follows the join's `RoomEvents` and already includes them; see
    /// `docs/signaling.md`). A state too large for one record is split by [`snapshot_records`]:
    /// `more` is then set and [`ControlMessage::RoomSnapshotPart`]s follow directly.
    RoomSnapshot {
        /// The state (the first part of it when `more` is set).
        state: RoomState,
        /// More of the state follows in `RoomSnapshotPart` records.
        #[serde(default, skip_serializing_if = "is_false")]
        more: bool,
    },
    /// Origin -> edge: the continuation of a split `RoomSnapshot` (its lists are appended).
    RoomSnapshotPart {
        /// The room.
        room: RoomId,
        /// More participants, in join order.
        #[serde(default)]
        participants: Vec<Participant>,
        /// More raised hands, oldest first.
        #[serde(default)]
        hands: Vec<ParticipantId>,
        /// More banned users.
        #[serde(default)]
        banned: Vec<String>,
        /// Another part follows.
        #[serde(default)]
        more: bool,
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

fn is_false(b: &bool) -> bool {
    !*b
}

/// Room state per snapshot record, in bytes of JSON: well below [`MAX_CONTROL_LEN`] so the
/// envelope and the largest single item (a participant with the longest user id and name) fit.
pub const SNAPSHOT_RECORD_BUDGET: usize = 48 * 1024;

/// `state` as one `RoomSnapshot` record, or, when it would exceed `budget` bytes of list items,
/// a `RoomSnapshot` with `more` followed by `RoomSnapshotPart`s, each within `budget` (plus the
/// envelope). Every record of a room of any size stays under [`MAX_CONTROL_LEN`] with
/// [`SNAPSHOT_RECORD_BUDGET`].
pub fn snapshot_records(state: RoomState, budget: usize) -> Vec<ControlMessage> {
    /// One list item with its JSON size (plus the separating comma).
    fn size<T: Serialize>(item: &T) -> usize {
        serde_json::to_vec(item).map(|v| v.len() + 1).unwrap_or(0)
    }
    let RoomState {
        room,
        phase,
        participants,
        hands,
        banned,
    } = state;
    let mut chunks: Vec<(Vec<Participant>, Vec<ParticipantId>, Vec<String>)> =
        vec![Default::default()];
    let mut used = 0;
    let mut room_for = |n: usize, chunks: &mut Vec<_>| {
        let last: &(Vec<Participant>, Vec<ParticipantId>, Vec<String>) =
            chunks.last().expect("one chunk");
        let empty = last.0.is_empty() && last.1.is_empty() && last.2.is_empty();
        if used + n > budget && !empty {
            chunks.push(Default::default());
            used = 0;
        }
        used += n;
    };
    for p in participants {
        room_for(size(&p), &mut chunks);
        chunks.last_mut().expect("one chunk").0.push(p);
    }
    for h in hands {
        room_for(size(&h), &mut chunks);
        chunks.last_mut().expect("one chunk").1.push(h);
    }
    for b in banned {
        room_for(size(&b), &mut chunks);
        chunks.last_mut().expect("one chunk").2.push(b);
    }
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, (participants, hands, banned))| {
            let more = i + 1 < n;
            if i == 0 {
                ControlMessage::RoomSnapshot {
                    state: RoomState {
                        room,
                        phase,
                        participants,
                        hands,
                        banned,
                    },
                    more,
                }
            } else {
                ControlMessage::RoomSnapshotPart {
                    room,
                    participants,
                    hands,
                    banned,
                    more,
                }
            }
        })
        .collect()
}

/// Most records one split snapshot may span (each under [`MAX_CONTROL_LEN`]).
pub const MAX_SNAPSHOT_PARTS: usize = 1024;
/// Most list items (participants, hands and bans together) one split snapshot may carry: the
/// origin's largest room limit with room to spare.
pub const MAX_SNAPSHOT_ITEMS: usize = 250_000;

/// A split snapshot grew past [`MAX_SNAPSHOT_PARTS`] or [`MAX_SNAPSHOT_ITEMS`]; it was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("split room snapshot too large: {parts} records, {items} items (limits {MAX_SNAPSHOT_PARTS}, {MAX_SNAPSHOT_ITEMS})")]
pub struct SnapshotTooLarge {
    /// Records received, this one included.
    pub parts: usize,
    /// List items received, this record's included.
    pub items: usize,
}

/// Reassembles a split snapshot (sans-IO): feed every `RoomSnapshot` / `RoomSnapshotPart` of a
/// room in arrival order; the complete state comes out with the last part. What it collects is
/// bounded by [`MAX_SNAPSHOT_PARTS`] and [`MAX_SNAPSHOT_ITEMS`].
#[derive(Debug, Default)]
pub struct SnapshotAssembler {
    pending: Option<RoomState>,
    /// Records of the pending snapshot so far.
    parts: usize,
}

fn items(state: &RoomState) -> usize {
    state.participants.len() + state.hands.len() + state.banned.len()
}

impl SnapshotAssembler {
    /// A `RoomSnapshot`: the complete state if `more` is unset, else `None` (parts follow). A
    /// new snapshot replaces an unfinished one.
    pub fn start(&mut self, state: RoomState, more: bool) -> Option<RoomState> {
        self.parts = 1;
        if more {
            self.pending = Some(state);
            None
        } else {
            self.pending = None;
            Some(state)
        }
    }

    /// A `RoomSnapshotPart`: the complete state when this was the last part. A part without a
    /// snapshot before it is ignored. A part that takes the snapshot past the limits drops it
    /// (later parts are then ignored until the next `RoomSnapshot`).
    pub fn part(
        &mut self,
        participants: Vec<Participant>,
        hands: Vec<ParticipantId>,
        banned: Vec<String>,
        more: bool,
    ) -> Result<Option<RoomState>, SnapshotTooLarge> {
        let Some(st) = self.pending.as_mut() else {
            return Ok(None);
        };
        self.parts += 1;
        let total = items(st) + participants.len() + hands.len() + banned.len();
        if self.parts > MAX_SNAPSHOT_PARTS || total > MAX_SNAPSHOT_ITEMS {
            self.pending = None;
            return Err(SnapshotTooLarge {
                parts: self.parts,
                items: total,
            });
        }
        st.participants.extend(participants);
        st.hands.extend(hands);
        st.banned.extend(banned);
        if more {
            Ok(None)
        } else {
            Ok(self.pending.take())
        }
    }

    /// Feed any control message: a `RoomSnapshot` or `RoomSnapshotPart` goes to
    /// [`SnapshotAssembler::start`] / [`SnapshotAssembler::part`]; anything else is `Ok(None)`.
    pub fn feed(&mut self, msg: ControlMessage) -> Result<Option<RoomState>, SnapshotTooLarge> {
        match msg {
            ControlMessage::RoomSnapshot { state, more } => Ok(self.start(state, more)),
            ControlMessage::RoomSnapshotPart {
                participants,
                hands,
                banned,
                more,
                ..
            } => self.part(participants, hands, banned, more),
            _ => Ok(None),
        }
    }

    /// Whether parts are awaited.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }
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
    /// Bytes of a refused (oversized) record still to be discarded.
    skip: usize,
}

impl ControlDecoder {
    /// Append bytes read from the stream (the rest of a refused record is dropped unbuffered).
    pub fn feed(&mut self, bytes: &[u8]) {
        let dropped = self.skip.min(bytes.len());
        self.skip -= dropped;
        self.buf.extend_from_slice(&bytes[dropped..]);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. Each error refuses one
    /// record only (an oversized one is skipped without being buffered, a malformed or empty
    /// one is consumed): the stream stays usable and the caller decides what to do.
    pub fn next_message(&mut self) -> Result<Option<ControlMessage>, ControlError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = match record_len(self.buf[..4].try_into().expect("4 bytes"), MAX_CONTROL_LEN) {
            Ok(len) => len,
            Err(e) => {
                let announced = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes"));
                self.buf.drain(..4);
                let here = (announced as usize).min(self.buf.len());
                self.buf.drain(..here);
                self.skip = announced as usize - here;
                return Err(e);
            }
        };
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

    fn big_state(n: u32) -> RoomState {
        RoomState {
            room: RoomId(9),
            phase: crate::room::RoomPhase::Live,
            participants: (0..n)
                .map(|i| Participant {
                    id: ParticipantId(0x0100_0000 + i),
                    user: format!("user-{i}-{}", "u".repeat(200)),
                    name: format!("name {i} {}", "n".repeat(50)),
                    role: crate::room::RoomRole::Listener,
                    region: "us-east".into(),
                    muted: false,
                })
                .collect(),
            hands: (0..n).map(|i| ParticipantId(0x0100_0000 + i)).collect(),
            banned: (0..n / 10).map(|i| format!("banned-{i}")).collect(),
        }
    }

    #[test]
    fn a_huge_snapshot_splits_into_records_under_the_limit_and_reassembles() {
        let state = big_state(10_000);
        let records = snapshot_records(state.clone(), SNAPSHOT_RECORD_BUDGET);
        assert!(records.len() > 10, "{} records", records.len());
        let mut bytes = Vec::new();
        for r in &records {
            let rec = r.to_record();
            assert!(rec.len() - 4 <= MAX_CONTROL_LEN, "{} bytes", rec.len());
            bytes.extend(rec);
        }
        let mut dec = ControlDecoder::default();
        dec.feed(&bytes);
        let mut asm = SnapshotAssembler::default();
        let mut done = None;
        while let Some(m) = dec.next_message().unwrap() {
            assert!(matches!(
                m,
                ControlMessage::RoomSnapshot { .. } | ControlMessage::RoomSnapshotPart { .. }
            ));
            let out = asm.feed(m).unwrap();
            if out.is_some() {
                assert!(done.is_none());
                done = out;
            }
        }
        assert_eq!(done, Some(state));
        assert!(!asm.is_pending());
        // A small room stays one record, as before.
        let small = snapshot_records(big_state(3), SNAPSHOT_RECORD_BUDGET);
        assert!(matches!(
            small.as_slice(),
            [ControlMessage::RoomSnapshot { more: false, .. }]
        ));
    }

    #[test]
    fn a_snapshot_that_never_ends_is_dropped_at_the_limits() {
        let start = |asm: &mut SnapshotAssembler| {
            assert_eq!(asm.start(big_state(2), true), None);
        };
        // Records: empty parts with `more` forever.
        let mut asm = SnapshotAssembler::default();
        start(&mut asm);
        let mut refused = None;
        for i in 0..MAX_SNAPSHOT_PARTS + 10 {
            match asm.part(Vec::new(), Vec::new(), Vec::new(), true) {
                Ok(None) => {}
                Ok(Some(_)) => panic!("complete without a last part"),
                Err(e) => {
                    refused = Some((i, e));
                    break;
                }
            }
        }
        let (i, e) = refused.expect("an endless snapshot is refused");
        assert_eq!(
            i + 2,
            MAX_SNAPSHOT_PARTS + 1,
            "refused at the first record past the limit"
        );
        assert_eq!(e.parts, MAX_SNAPSHOT_PARTS + 1);
        assert!(!asm.is_pending(), "what was collected is dropped");
        assert_eq!(
            asm.part(Vec::new(), Vec::new(), Vec::new(), false),
            Ok(None),
            "later parts are ignored"
        );
        // Items: a few huge parts.
        start(&mut asm);
        let bans = |n: usize| (0..n).map(|i| format!("u{i}")).collect::<Vec<_>>();
        assert_eq!(
            asm.part(Vec::new(), Vec::new(), bans(MAX_SNAPSHOT_ITEMS / 2), true),
            Ok(None)
        );
        let err = asm
            .part(Vec::new(), Vec::new(), bans(MAX_SNAPSHOT_ITEMS / 2), true)
            .expect_err("items past the limit");
        assert!(err.items > MAX_SNAPSHOT_ITEMS, "{err}");
        assert!(!asm.is_pending());
        // A new snapshot starts over.
        start(&mut asm);
        assert_eq!(
            asm.part(Vec::new(), Vec::new(), bans(1), false)
                .map(|s| s.map(|s| s.banned.len())),
            Ok(Some(1))
        );
    }

    #[test]
    fn an_oversized_record_is_refused_alone_and_the_stream_goes_on() {
        let mut dec = ControlDecoder::default();
        let big = vec![b'x'; MAX_CONTROL_LEN + 10];
        let mut bytes = Vec::new();
        write_record(&big, &mut bytes);
        bytes.extend(ControlMessage::Ping { nonce: 5 }.to_record());
        // Fed in pieces: the oversized body is skipped, not buffered.
        let (head, tail) = bytes.split_at(1000);
        dec.feed(head);
        assert!(matches!(
            dec.next_message(),
            Err(ControlError::TooLong { .. })
        ));
        assert_eq!(dec.next_message().unwrap(), None);
        for chunk in tail.chunks(4096) {
            dec.feed(chunk);
        }
        assert!(dec.buf.len() < 100);
        assert_eq!(
            dec.next_message().unwrap(),
            Some(ControlMessage::Ping { nonce: 5 })
        );
        // An empty record is consumed too.
        let mut dec = ControlDecoder::default();
        dec.feed(&[0, 0, 0, 0]);
        dec.feed(&ControlMessage::Ping { nonce: 6 }.to_record());
        assert!(matches!(dec.next_message(), Err(ControlError::Empty)));
        assert_eq!(
            dec.next_message().unwrap(),
            Some(ControlMessage::Ping { nonce: 6 })
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
