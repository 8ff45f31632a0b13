//! The origin's room authority fed arbitrary command sequences from arbitrary actors at arbitrary
//! times (commands come from edges over the network): it never panics, a refusal never changes
//! the state, and the state stays consistent.
#![no_main]
use amphi_origin::room::{Room, RoomLimits};
use amphi_protocol::room::{ReportReason, ReportTarget, RoomCommand, RoomPhase, RoomRole};
use amphi_protocol::token::Role;
use amphi_protocol::{ParticipantId, RoomId};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

const ROLES: [RoomRole; 4] = [
    RoomRole::Host,
    RoomRole::Cohost,
    RoomRole::Speaker,
    RoomRole::Listener,
];
const TOKEN_ROLES: [Role; 3] = [Role::Host, Role::Speaker, Role::Listener];
const USERS: [&str; 5] = ["ann", "bob", "cy", "dee", ""];
const TEXTS: [&str; 4] = ["hi", "", "  \u{7} ", "👏"];

fn command(b: [u8; 4]) -> RoomCommand {
    let target = ParticipantId(u32::from(b[2] % 8));
    let role = ROLES[usize::from(b[3] % 4)];
    match b[1] % 16 {
        0 => RoomCommand::Join {
            user: USERS[usize::from(b[2] % 5)].into(),
            name: "n".repeat(usize::from(b[3])),
            role: TOKEN_ROLES[usize::from(b[3] % 3)],
            region: "r".into(),
            resume: (b[3] & 0x80 != 0).then_some(role),
        },
        1 => RoomCommand::Leave,
        2 => RoomCommand::RaiseHand,
        3 => RoomCommand::LowerHand {
            target: (b[3] & 1 == 1).then_some(target),
        },
        4 => RoomCommand::Promote { target, role },
        5 => RoomCommand::Demote { target },
        6 => RoomCommand::Mute {
            target: (b[3] & 1 == 1).then_some(target),
        },
        7 => RoomCommand::Unmute,
        8 => RoomCommand::Kick { target },
        9 => RoomCommand::End,
        10 | 11 => RoomCommand::Chat {
            text: TEXTS[usize::from(b[3] % 4)].repeat(usize::from(b[2]) * 3),
        },
        12 | 13 => RoomCommand::React {
            emoji: TEXTS[usize::from(b[3] % 4)].repeat(usize::from(b[2] % 20)),
        },
        _ => RoomCommand::Report {
            target: if b[3] & 1 == 1 {
                ReportTarget::User(USERS[usize::from(b[2] % 5)].into())
            } else {
                ReportTarget::Room
            },
            reason: ReportReason::ALL[usize::from(b[3] >> 1) % ReportReason::ALL.len()],
            text: TEXTS[usize::from(b[3] % 4)].repeat(usize::from(b[2]) * 3),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut room = Room::new(RoomId(1), RoomLimits::default(), t0, 0);
    for chunk in data.chunks_exact(4) {
        let b = [chunk[0], chunk[1], chunk[2], chunk[3]];
        now += Duration::from_millis(u64::from(b[0] & 0x0f) * 250);
        let actor = ParticipantId(u32::from(b[0] >> 4) % 8);
        let before = room.snapshot();
        match room.apply(actor, command(b), now) {
            Ok(_) => {}
            Err(_) => assert_eq!(room.snapshot(), before, "a refusal changed the room"),
        }
        let s = room.snapshot();
        let mut ids: Vec<_> = s.participants.iter().map(|p| p.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), s.participants.len(), "duplicate participant");
        for h in &s.hands {
            let p = s
                .participants
                .iter()
                .find(|p| p.id == *h)
                .expect("hand of a stranger");
            assert_eq!(p.role, RoomRole::Listener, "a non-listener's hand is up");
        }
        assert!(s.participants.iter().all(|p| !s.banned.contains(&p.user)));
        if s.phase == RoomPhase::Ended {
            assert!(s.hands.is_empty());
        }
    }
});
