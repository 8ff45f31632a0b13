//! Split room snapshots (origin -> edge, `RoomSnapshot` + `RoomSnapshotPart`). A generated room
//! (participants with names and user ids up to their limits) split by `snapshot_records` at any
//! budget up to `SNAPSHOT_RECORD_BUDGET` gives records the control decoder accepts, and they
//! reassemble through `SnapshotAssembler` into exactly the room. Any sequence of snapshots and
//! parts a peer may send (stray parts, restarts, endless `more`) is reassembled as a simple model
//! says, and control-stream bytes fed to an assembler never panic.
#![no_main]
use amphi_protocol::api::{MAX_NAME_CHARS, MAX_USER_ID_BYTES};
use amphi_protocol::control::{
    snapshot_records, ControlDecoder, ControlMessage, SnapshotAssembler, MAX_CONTROL_LEN,
    SNAPSHOT_RECORD_BUDGET,
};
use amphi_protocol::room::{Participant, RoomPhase, RoomRole, RoomState};
use amphi_protocol::{ParticipantId, RoomId};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

/// Characters names are made of: one to four bytes of UTF-8, and JSON escapes of up to six.
const NAME_PIECES: [&str; 6] = ["a", "é", "👏", "\"", "\u{1}", "\u{202e}"];

/// One participant; names and user ids reach their limits.
#[derive(Arbitrary, Debug)]
struct Person {
    id: u32,
    user_len: u8,
    name_piece: u8,
    name_len: u8,
    role: u8,
    muted: bool,
}

impl Person {
    fn participant(&self, copy: u32) -> Participant {
        Participant {
            id: ParticipantId(self.id.wrapping_add(copy)),
            user: "u".repeat(usize::from(self.user_len) % MAX_USER_ID_BYTES + 1),
            name: NAME_PIECES[usize::from(self.name_piece) % NAME_PIECES.len()]
                .repeat(usize::from(self.name_len) % MAX_NAME_CHARS + 1),
            role: [
                RoomRole::Host,
                RoomRole::Cohost,
                RoomRole::Speaker,
                RoomRole::Listener,
            ][usize::from(self.role) % 4],
            region: "eu-west".into(),
            muted: self.muted,
        }
    }
}

/// A whole room.
#[derive(Arbitrary, Debug)]
struct Room {
    id: u64,
    ended: bool,
    people: Vec<Person>,
    /// How many times the people repeat (with shifted ids): large rooms from short inputs.
    copies: u8,
    hands: Vec<u32>,
    banned: Vec<u8>,
    budget: u16,
}

impl Room {
    fn state(&self) -> RoomState {
        let people = &self.people[..self.people.len().min(64)];
        let copies = u32::from(self.copies % 8) + 1;
        RoomState {
            room: RoomId(self.id),
            phase: if self.ended {
                RoomPhase::Ended
            } else {
                RoomPhase::Live
            },
            participants: (0..copies)
                .flat_map(|c| people.iter().map(move |p| p.participant(c << 24)))
                .collect(),
            hands: self
                .hands
                .iter()
                .take(256)
                .map(|h| ParticipantId(*h))
                .collect(),
            banned: self
                .banned
                .iter()
                .take(256)
                .map(|n| "b".repeat(usize::from(*n) % MAX_USER_ID_BYTES + 1))
                .collect(),
        }
    }

    /// The split budget: small ones split often, the real one is the largest.
    fn budget(&self) -> usize {
        match self.budget % 4 {
            0 => SNAPSHOT_RECORD_BUDGET,
            _ => usize::from(self.budget) % (SNAPSHOT_RECORD_BUDGET + 1),
        }
    }
}

/// What a peer may send to an edge's assembler, in any order.
#[derive(Arbitrary, Debug)]
enum Op {
    Start {
        people: Vec<Person>,
        more: bool,
    },
    Part {
        people: Vec<Person>,
        hands: Vec<u32>,
        banned: Vec<u8>,
        more: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    room: Room,
    ops: Vec<Op>,
    stream: Vec<u8>,
}

fn people(list: &[Person]) -> Vec<Participant> {
    list.iter().take(8).map(|p| p.participant(0)).collect()
}

/// A generated room survives splitting, encoding, decoding and reassembly unchanged.
fn round_trip(room: &Room) {
    let state = room.state();
    let records = snapshot_records(state.clone(), room.budget());
    assert!(!records.is_empty());
    let mut stream = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let more = match r {
            ControlMessage::RoomSnapshot { more, .. } => {
                assert_eq!(i, 0, "a snapshot after the first record");
                *more
            }
            ControlMessage::RoomSnapshotPart { room, more, .. } => {
                assert!(i > 0, "a part first");
                assert_eq!(*room, state.room);
                *more
            }
            other => panic!("snapshot_records made {other:?}"),
        };
        assert_eq!(
            more,
            i + 1 < records.len(),
            "more is set on all but the last"
        );
        let record = r.to_record();
        assert!(
            record.len() - 4 <= MAX_CONTROL_LEN,
            "a {}-byte record at budget {}",
            record.len() - 4,
            room.budget()
        );
        stream.extend_from_slice(&record);
    }
    let mut decoder = ControlDecoder::default();
    decoder.feed(&stream);
    let mut asm = SnapshotAssembler::default();
    let mut done = None;
    while let Some(msg) = decoder.next_message().expect("own records decode") {
        assert!(done.is_none(), "state complete before the last part");
        done = asm.feed(msg).ok().flatten();
    }
    assert_eq!(done, Some(state));
    assert!(!asm.is_pending());
}

fuzz_target!(|input: Input| {
    round_trip(&input.room);

    // Peer sequences against a model: pending state extended by parts, replaced by snapshots.
    let mut asm = SnapshotAssembler::default();
    let mut model: Option<RoomState> = None;
    for op in input.ops.iter().take(64) {
        let got = match op {
            Op::Start { people: list, more } => {
                let state = RoomState {
                    room: RoomId(1),
                    phase: RoomPhase::Live,
                    participants: people(list),
                    hands: Vec::new(),
                    banned: Vec::new(),
                };
                let want = if *more {
                    model = Some(state.clone());
                    None
                } else {
                    model = None;
                    Some(state.clone())
                };
                (asm.start(state, *more), want)
            }
            Op::Part {
                people: list,
                hands,
                banned,
                more,
            } => {
                let participants = people(list);
                let hands: Vec<_> = hands.iter().take(8).map(|h| ParticipantId(*h)).collect();
                let banned: Vec<_> = banned.iter().take(8).map(|b| b.to_string()).collect();
                if let Some(m) = model.as_mut() {
                    m.participants.extend(participants.iter().cloned());
                    m.hands.extend(hands.iter().copied());
                    m.banned.extend(banned.iter().cloned());
                }
                let want = if *more { None } else { model.take() };
                let got = asm
                    .part(participants, hands, banned, *more)
                    .expect("64 small records stay within the limits");
                (got, want)
            }
        };
        assert_eq!(got.0, got.1);
        assert_eq!(asm.is_pending(), model.is_some());
    }

    // Bytes from the network: every snapshot message decoded goes to the assembler.
    let mut decoder = ControlDecoder::default();
    decoder.feed(&input.stream);
    let mut asm = SnapshotAssembler::default();
    for _ in 0..input.stream.len() + 1 {
        match decoder.next_message() {
            Ok(Some(msg)) => {
                asm.feed(msg).ok().flatten();
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
});
