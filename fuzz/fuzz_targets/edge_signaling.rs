//! The edge's signaling core driven by generated sequences: sessions join and leave, clients send
//! every room command, the origin link goes up and down, and the origin (a network peer) sends
//! snapshots (whole or split into parts, stray parts included), event batches, refusals and room
//! ends that may contradict each other and what the edge knows. The core never panics, says
//! nothing to the origin while the link is down, closes only sessions it then forgets, and its
//! counts agree with each other.
#![no_main]
#[path = "common/vocab.rs"]
mod vocab;

use amphi_edge::signaling::{JoinRequest, Output, SessionKind, SignalingCore};
use amphi_protocol::control::ControlMessage;
use amphi_protocol::room::RoomRole;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use vocab::{APart, AState, AToken, Cmd, Ev, Pid, Rid, Text, User};

#[derive(Arbitrary, Debug)]
enum Kind {
    WebSocket,
    Whip,
    Whep,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Join {
        pid: Pid,
        room: Rid,
        user: User,
        name: Text,
        role: AToken,
        kind: Kind,
    },
    Leave(Pid),
    Command(Pid, Cmd),
    LinkUp,
    LinkDown,
    /// A snapshot; `more` announces parts.
    Snapshot(AState, bool),
    /// The continuation of a split snapshot (or a stray one).
    Part {
        room: Rid,
        participants: Vec<APart>,
        hands: Vec<Pid>,
        banned: Vec<User>,
        more: bool,
    },
    Events(Rid, Vec<Ev>),
    Rejected {
        room: Rid,
        actor: Pid,
        request: u64,
        code: u8,
        message: Text,
    },
    RoomEnded(Rid),
    /// A message the origin has no business sending to an edge.
    Stray(Rid, Pid),
    Wait(u8),
}

const CODES: [&str; 6] = ["banned", "unavailable", "room_ended", "forbidden", "", "💥"];

fuzz_target!(|ops: Vec<Op>| {
    let mut core = SignalingCore::new("eu");
    let mut now = Instant::now();
    for op in ops {
        let link_was_up = core.is_link_up();
        let out = match op {
            Op::Join {
                pid,
                room,
                user,
                name,
                role,
                kind,
            } => {
                // The edge allocates participant ids: a registered id never joins again.
                if core.room_of(pid.id()).is_some() {
                    continue;
                }
                core.join(
                    JoinRequest {
                        participant: pid.id(),
                        room: room.id(),
                        user: user.name(),
                        name: name.text(),
                        role: role.role(),
                        kind: match kind {
                            Kind::WebSocket => SessionKind::WebSocket,
                            Kind::Whip => SessionKind::Whip,
                            Kind::Whep => SessionKind::Whep,
                        },
                    },
                    now,
                )
            }
            Op::Leave(pid) => core.leave(pid.id(), now),
            Op::Command(pid, cmd) => match core.command(pid.id(), cmd.command(), now) {
                Ok(out) => {
                    assert!(
                        core.room_of(pid.id()).is_some(),
                        "a stranger's command went out"
                    );
                    out
                }
                Err(refusal) => {
                    assert!(!refusal.code.is_empty());
                    Vec::new()
                }
            },
            Op::LinkUp => {
                let msgs = core.link_up();
                for m in &msgs {
                    match m {
                        ControlMessage::SubscribeRoom { room } => {
                            assert!(core.members_per_room().contains_key(room))
                        }
                        ControlMessage::RoomCommand { actor, room, .. } => {
                            assert_eq!(core.room_of(*actor), Some(*room))
                        }
                        other => panic!("link_up announced {other:?}"),
                    }
                }
                Vec::new()
            }
            Op::LinkDown => {
                core.link_down();
                Vec::new()
            }
            Op::Snapshot(state, more) => core.on_control(ControlMessage::RoomSnapshot {
                state: state.state(),
                more,
            }),
            Op::Part {
                room,
                participants,
                hands,
                banned,
                more,
            } => core.on_control(ControlMessage::RoomSnapshotPart {
                room: room.id(),
                participants: participants.iter().map(APart::participant).collect(),
                hands: hands.iter().map(|h| h.id()).collect(),
                banned: banned.iter().map(|u| u.name()).collect(),
                more,
            }),
            Op::Events(room, events) => core.on_control(ControlMessage::RoomEvents {
                room: room.id(),
                events: events.iter().map(Ev::event).collect(),
            }),
            Op::Rejected {
                room,
                actor,
                request,
                code,
                message,
            } => core.on_control(ControlMessage::CommandRejected {
                room: room.id(),
                actor: actor.id(),
                request,
                code: CODES[usize::from(code) % CODES.len()].to_string(),
                message: message.text(),
            }),
            Op::RoomEnded(room) => core.on_control(ControlMessage::RoomEnded { room: room.id() }),
            Op::Stray(room, pid) => {
                let mut out = core.on_control(ControlMessage::SubscribeRoom { room: room.id() });
                out.extend(core.on_control(ControlMessage::SpeakerLeft {
                    room: room.id(),
                    speaker: pid.id(),
                }));
                assert!(out.is_empty(), "a stray message had effects: {out:?}");
                out
            }
            Op::Wait(s) => {
                now += Duration::from_secs(u64::from(s));
                Vec::new()
            }
        };
        let closed: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Close { participant, .. } => Some(*participant),
                _ => None,
            })
            .collect();
        for o in &out {
            match o {
                Output::ToOrigin(m) => {
                    assert!(
                        link_was_up,
                        "sent to the origin while the link is down: {m:?}"
                    )
                }
                Output::Close { participant, .. } => assert_eq!(
                    core.room_of(*participant),
                    None,
                    "a closed session is still registered"
                ),
                Output::Joined { participant, view } => {
                    if !closed.contains(participant) {
                        assert_eq!(core.room_of(*participant), Some(view.state.room));
                    }
                    // A partial view leaves listeners out, never the joiner.
                    assert!(view.state.participants.iter().any(|p| p.id == *participant));
                }
                Output::ToClient(..) | Output::JoinRefused { .. } | Output::Permission { .. } => {}
            }
        }
        let census = core.census();
        let per_room = core.members_per_room();
        assert_eq!(census.rooms, per_room.len());
        assert_eq!(
            census.by_role.iter().sum::<usize>(),
            per_room.values().sum::<usize>(),
            "participants and rooms disagree"
        );
        for p in 1..=8 {
            let pid = Pid(p - 1).id();
            if core.may_send(pid) {
                assert!(core.role_of(pid).is_some_and(RoomRole::may_publish));
            }
        }
    }
});
