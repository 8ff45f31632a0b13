//! The origin's room authority (`Rooms`, what `HubCore::handle_control` drives for every edge's
//! `RoomCommand`) fed generated sequences over three rooms: commands from any participant,
//! rooms restored or replaced from stored state (consistent or not, as Redis may hand it back),
//! stored state reconciled after an outage, ends from outside and housekeeping as time passes.
//! It never panics; a refusal changes nothing; rooms it built itself stay consistent; what it
//! persists reads back identically; reconciling keeps every ban and an ended phase.
#![no_main]
#[path = "common/vocab.rs"]
mod vocab;

use amphi_origin::persist::{reconcile, PersistedRoom};
use amphi_origin::room::{Ending, Rooms, RoomsConfig};
use amphi_protocol::room::{RoomCommand, RoomPhase, RoomRole};
use amphi_protocol::RoomId;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use vocab::{ARole, AState, Cmd, Pid, Rid, User};

/// A stored room as Redis may hold it.
#[derive(Arbitrary, Clone, Debug)]
struct Stored {
    state: AState,
    roles: Vec<(User, ARole)>,
}

impl Stored {
    fn persisted(&self) -> PersistedRoom {
        PersistedRoom {
            state: self.state.state(),
            roles: self
                .roles
                .iter()
                .map(|(u, r)| (u.name(), r.role()))
                .collect(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Apply(Rid, Pid, Cmd),
    Restore(Stored),
    Replace(Stored),
    /// The store answers again for a room that ran unverified: merge and replace.
    Reconcile(Stored),
    End(Rid),
    Housekeeping,
    Wait(u16),
}

fn check_consistent(p: &PersistedRoom) {
    let s = &p.state;
    let ids: HashSet<_> = s.participants.iter().map(|p| p.id).collect();
    assert_eq!(ids.len(), s.participants.len(), "duplicate participant");
    let hands: HashSet<_> = s.hands.iter().collect();
    assert_eq!(hands.len(), s.hands.len(), "a hand is up twice");
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

fuzz_target!(|ops: Vec<Op>| {
    let cfg = RoomsConfig {
        max_rooms: 2,
        ended_memory: Duration::from_secs(60),
        empty_idle: Duration::from_secs(30),
        ..RoomsConfig::default()
    };
    let rooms: Rooms = Rooms::new(cfg);
    let mut now = Instant::now();
    let unix_ms = 1_700_000_000_000;
    // Rooms whose state came from outside (possibly inconsistent).
    let mut tainted: HashSet<RoomId> = HashSet::new();
    for op in ops {
        match op {
            Op::Apply(room, actor, cmd) => {
                let room = room.id();
                let before = rooms.with(room, |h| h.room.persisted());
                let cmd = cmd.command();
                let create = matches!(cmd, RoomCommand::Join { .. }).then_some((now, unix_ms));
                let applied = rooms
                    .with_or_create(room, create, |h| h.room.apply(actor.id(), cmd, now))
                    .and_then(|applied| applied);
                match applied {
                    Ok(_) => assert!(rooms.contains(room)),
                    Err(rejection) => {
                        assert!(!rejection.message.is_empty());
                        assert_eq!(
                            rooms.with(room, |h| h.room.persisted()),
                            before,
                            "a refusal changed the room"
                        );
                    }
                }
            }
            Op::Restore(stored) => {
                let saved = stored.persisted();
                let id = saved.state.room;
                let held = rooms.contains(id);
                if rooms.restore(saved.clone(), now, unix_ms, |_| {}) {
                    assert!(!held);
                    // A second record of a participant id is ignored.
                    let mut expected = saved.state;
                    let mut seen = HashSet::new();
                    expected.participants.retain(|p| seen.insert(p.id));
                    assert_eq!(rooms.with(id, |h| h.room.persisted().state), Some(expected));
                    tainted.insert(id);
                }
            }
            Op::Replace(stored) => {
                let saved = stored.persisted();
                let id = saved.state.room;
                if rooms
                    .with(id, |h| h.room.reset(saved, now, unix_ms))
                    .is_some()
                {
                    tainted.insert(id);
                }
            }
            Op::Reconcile(stored) => {
                let stored = stored.persisted();
                let Some(ours) = rooms.with(stored.state.room, |h| h.room.persisted()) else {
                    continue;
                };
                let merged = reconcile(stored.clone(), ours.clone());
                for b in stored.state.banned.iter().chain(&ours.state.banned) {
                    assert!(merged.state.banned.contains(b), "a ban was lost");
                }
                if stored.state.phase == RoomPhase::Ended {
                    assert_eq!(merged.state.phase, RoomPhase::Ended);
                }
                assert!(merged
                    .state
                    .participants
                    .iter()
                    .all(|p| !merged.state.banned.contains(&p.user)));
                for h in &merged.state.hands {
                    assert!(merged.state.participants.iter().any(|p| p.id == *h));
                }
                let id = merged.state.room;
                assert!(rooms
                    .with(id, |h| h.room.reset(merged, now, unix_ms))
                    .is_some());
                tainted.insert(id);
            }
            Op::End(room) => {
                let room = room.id();
                let was = rooms.with(room, |h| h.room.phase());
                match rooms.end(room, now, unix_ms, |_, ending| ending) {
                    Ending::Ended(events) => {
                        assert_eq!(was, Some(RoomPhase::Live));
                        assert!(!events.is_empty());
                    }
                    Ending::AlreadyEnded => assert_eq!(was, Some(RoomPhase::Ended)),
                    Ending::Unknown => assert_eq!(was, None),
                }
                if let Some(phase) = rooms.with(room, |h| h.room.phase()) {
                    assert_eq!(phase, RoomPhase::Ended);
                }
            }
            Op::Housekeeping => {
                for gone in rooms.housekeeping(now, |_, _| {}) {
                    assert!(!rooms.contains(gone));
                    tainted.remove(&gone);
                }
            }
            Op::Wait(s) => now += Duration::from_secs(u64::from(s)),
        }
        assert!(rooms.len() <= 2);
        assert!(rooms.census().live_rooms <= rooms.len());
        for r in 1..=3 {
            let id = RoomId(r);
            let Some(p) = rooms.with(id, |h| h.room.persisted()) else {
                tainted.remove(&id);
                continue;
            };
            assert_eq!(p.state.room, id);
            let json = serde_json::to_vec(&p).expect("persisted rooms serialize");
            let back: PersistedRoom = serde_json::from_slice(&json).expect("and read back");
            assert_eq!(back, p, "a stored room reads back differently");
            if !tainted.contains(&id) {
                check_consistent(&p);
            }
        }
    }
});
