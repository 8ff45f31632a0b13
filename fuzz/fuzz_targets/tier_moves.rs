//! The edge's tier-move planner driven by generated sequences: listeners say how they listen
//! (`listening`, a client message), leave, the router's thresholds change, seats open and close,
//! and time passes. The planner never panics, offers only listeners it knows, movable, on a
//! lower tier than the one offered, at most `MOVES_PER_POLL` per room at a time, and never
//! more seats of a tier than the threshold leaves free.
#![no_main]
use amphi_edge::tier_moves::{TierCounts, TierMoves, MOVES_PER_POLL};
use amphi_protocol::api::RoomTiers;
use amphi_protocol::room::ListenTier;
use amphi_protocol::{ParticipantId, RoomId};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Tier {
    Interactive,
    Push,
    Hls,
}

impl Tier {
    fn wire(self) -> ListenTier {
        match self {
            Tier::Interactive => ListenTier::Interactive,
            Tier::Push => ListenTier::Push,
            Tier::Hls => ListenTier::Hls,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Listening {
        pid: u8,
        room: u8,
        tier: Tier,
        movable: bool,
    },
    Forget {
        pid: u8,
    },
    Thresholds(Vec<(u8, u8, u8)>),
    Counts {
        room: u8,
        interactive: u8,
        push: u8,
    },
    Advance {
        ms: u16,
    },
    Poll,
}

fuzz_target!(|ops: Vec<Op>| {
    let mut p = TierMoves::new();
    let mut now = Instant::now();
    // What the fuzzer told the planner: each listener's room, tier and movability.
    let mut known: HashMap<u8, (u8, ListenTier, bool)> = HashMap::new();
    let mut thresholds: HashMap<u8, (u32, u32)> = HashMap::new();
    let mut counts: HashMap<u8, (u32, u32)> = HashMap::new();
    for op in ops.into_iter().take(512) {
        match op {
            Op::Listening {
                pid,
                room,
                tier,
                movable,
            } => {
                p.listening(
                    ParticipantId(pid.into()),
                    RoomId(room.into()),
                    tier.wire(),
                    movable,
                    now,
                );
                known.insert(pid, (room, tier.wire(), movable));
            }
            Op::Forget { pid } => {
                p.forget(ParticipantId(pid.into()));
                known.remove(&pid);
            }
            Op::Thresholds(list) => {
                let list: Vec<RoomTiers> = list
                    .into_iter()
                    .take(16)
                    .map(|(room, interactive, push)| RoomTiers {
                        room: RoomId(room.into()),
                        interactive: interactive.into(),
                        push: push.into(),
                    })
                    .collect();
                thresholds = list
                    .iter()
                    .map(|t| (t.room.0 as u8, (t.interactive, t.push)))
                    .collect();
                p.set_thresholds(&list);
            }
            Op::Counts {
                room,
                interactive,
                push,
            } => {
                counts.insert(room, (interactive.into(), push.into()));
            }
            Op::Advance { ms } => now += Duration::from_millis(ms.into()),
            Op::Poll => {
                let moves = p.poll(now, |room| {
                    let (interactive, push) =
                        counts.get(&(room.0 as u8)).copied().unwrap_or((0, 0));
                    TierCounts { interactive, push }
                });
                let mut per_room: HashMap<u8, (usize, u32, u32)> = HashMap::new();
                for m in moves {
                    let pid = m.participant.0 as u8;
                    let (room, tier, movable) = *known
                        .get(&pid)
                        .expect("offered a listener it was never told of");
                    assert!(movable, "offered a pinned listener");
                    assert!(
                        m.tier < tier,
                        "offered {:?} to a listener on {tier:?}",
                        m.tier
                    );
                    let entry = per_room.entry(room).or_default();
                    entry.0 += 1;
                    match m.tier {
                        ListenTier::Interactive => entry.1 += 1,
                        _ => entry.2 += 1,
                    }
                }
                for (room, (n, to_interactive, to_push)) in per_room {
                    assert!(n <= MOVES_PER_POLL);
                    let (ti, tp) = thresholds
                        .get(&room)
                        .copied()
                        .expect("moves in a room without thresholds");
                    let (ci, cp) = counts.get(&room).copied().unwrap_or((0, 0));
                    assert!(
                        to_interactive <= ti.saturating_sub(ci),
                        "more interactive offers than free seats"
                    );
                    assert!(
                        to_push <= tp.saturating_sub(cp),
                        "more push offers than free seats"
                    );
                }
            }
        }
    }
});
