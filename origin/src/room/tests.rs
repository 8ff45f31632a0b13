use super::*;
use amphi_protocol::token::Role;

const H: ParticipantId = ParticipantId(1);
const H2: ParticipantId = ParticipantId(2);
const C: ParticipantId = ParticipantId(3);
const S: ParticipantId = ParticipantId(4);
const L: ParticipantId = ParticipantId(5);
const A: ParticipantId = ParticipantId(10);
const NOBODY: ParticipantId = ParticipantId(99);

fn join_cmd(user: &str, role: Role) -> RoomCommand {
    RoomCommand::Join {
        user: user.into(),
        name: user.to_uppercase(),
        role,
        region: "us-east".into(),
        resume: None,
    }
}

fn ok(room: &mut Room, actor: ParticipantId, cmd: RoomCommand, now: Instant) -> Vec<RoomEvent> {
    room.apply(actor, cmd.clone(), now)
        .unwrap_or_else(|e| panic!("{cmd:?} by {actor}: {e}"))
}

fn refused(room: &mut Room, actor: ParticipantId, cmd: RoomCommand, now: Instant) -> RejectCode {
    let before = room.snapshot();
    let err = room
        .apply(actor, cmd.clone(), now)
        .expect_err(&format!("{cmd:?} by {actor} should be refused"));
    assert_eq!(
        room.snapshot(),
        before,
        "{cmd:?} refused but changed the room"
    );
    err.code
}

/// Host H, host H2, co-host C, speaker S, listener L with a raised hand, and the actor A with `role`.
fn populated(role: RoomRole, t0: Instant) -> Room {
    let mut r = Room::new(RoomId(7), RoomLimits::default(), t0, 1_000);
    ok(&mut r, H, join_cmd("h", Role::Host), t0);
    ok(&mut r, H2, join_cmd("h2", Role::Host), t0);
    ok(&mut r, C, join_cmd("c", Role::Speaker), t0);
    ok(
        &mut r,
        H,
        RoomCommand::Promote {
            target: C,
            role: RoomRole::Cohost,
        },
        t0,
    );
    ok(&mut r, S, join_cmd("s", Role::Speaker), t0);
    ok(&mut r, L, join_cmd("l", Role::Listener), t0);
    ok(&mut r, L, RoomCommand::RaiseHand, t0);
    let token_role = match role {
        RoomRole::Host => Role::Host,
        RoomRole::Cohost | RoomRole::Speaker => Role::Speaker,
        RoomRole::Listener => Role::Listener,
    };
    ok(&mut r, A, join_cmd("a", token_role), t0);
    if role == RoomRole::Cohost {
        ok(
            &mut r,
            H,
            RoomCommand::Promote {
                target: A,
                role: RoomRole::Cohost,
            },
            t0,
        );
    }
    assert_eq!(r.participant(A).unwrap().role, role);
    r
}

#[derive(Clone, Copy)]
enum Prep {
    None,
    /// The actor raises its hand first (listeners only can).
    RaiseOwnHand,
    /// The actor mutes itself first (publishers only can).
    MuteSelf,
}

/// Every command for every role: allowed (events, state changed) or refused with `forbidden`
/// (state unchanged). Columns: host, cohost, speaker, listener.
#[test]
fn permission_table_command_by_role() {
    use RoomCommand as Cmd;
    let t0 = Instant::now();
    let table: Vec<(&str, Cmd, Prep, [bool; 4])> = vec![
        ("leave", Cmd::Leave, Prep::None, [true, true, true, true]),
        (
            "raise_hand",
            Cmd::RaiseHand,
            Prep::None,
            [false, false, false, true],
        ),
        (
            "lower_own_hand",
            Cmd::LowerHand { target: None },
            Prep::RaiseOwnHand,
            [false, false, false, true],
        ),
        (
            "lower_others_hand",
            Cmd::LowerHand { target: Some(L) },
            Prep::None,
            [true, true, false, false],
        ),
        (
            "promote_listener",
            Cmd::Promote {
                target: L,
                role: RoomRole::Speaker,
            },
            Prep::None,
            [true, true, false, false],
        ),
        (
            "name_cohost",
            Cmd::Promote {
                target: S,
                role: RoomRole::Cohost,
            },
            Prep::None,
            [true, false, false, false],
        ),
        (
            "promote_cohost_to_speaker",
            Cmd::Promote {
                target: C,
                role: RoomRole::Speaker,
            },
            Prep::None,
            [true, false, false, false],
        ),
        (
            "promote_host",
            Cmd::Promote {
                target: H2,
                role: RoomRole::Speaker,
            },
            Prep::None,
            [false, false, false, false],
        ),
        (
            "demote_speaker",
            Cmd::Demote { target: S },
            Prep::None,
            [true, true, false, false],
        ),
        (
            "demote_cohost",
            Cmd::Demote { target: C },
            Prep::None,
            [true, false, false, false],
        ),
        (
            "demote_host",
            Cmd::Demote { target: H2 },
            Prep::None,
            [false, false, false, false],
        ),
        (
            "demote_self",
            Cmd::Demote { target: A },
            Prep::None,
            [false, true, true, false],
        ),
        (
            "mute_self",
            Cmd::Mute { target: None },
            Prep::None,
            [true, true, true, false],
        ),
        (
            "mute_speaker",
            Cmd::Mute { target: Some(S) },
            Prep::None,
            [true, true, false, false],
        ),
        (
            "mute_cohost",
            Cmd::Mute { target: Some(C) },
            Prep::None,
            [true, false, false, false],
        ),
        (
            "mute_host",
            Cmd::Mute { target: Some(H2) },
            Prep::None,
            [false, false, false, false],
        ),
        (
            "unmute_self",
            Cmd::Unmute,
            Prep::MuteSelf,
            [true, true, true, false],
        ),
        (
            "kick_listener",
            Cmd::Kick { target: L },
            Prep::None,
            [true, true, false, false],
        ),
        (
            "kick_speaker",
            Cmd::Kick { target: S },
            Prep::None,
            [true, true, false, false],
        ),
        (
            "kick_cohost",
            Cmd::Kick { target: C },
            Prep::None,
            [true, false, false, false],
        ),
        (
            "kick_host",
            Cmd::Kick { target: H2 },
            Prep::None,
            [false, false, false, false],
        ),
        ("end", Cmd::End, Prep::None, [true, false, false, false]),
        (
            "chat",
            Cmd::Chat { text: "hi".into() },
            Prep::None,
            [true, true, true, true],
        ),
        (
            "react",
            Cmd::React {
                emoji: "👏".into()
            },
            Prep::None,
            [true, true, true, true],
        ),
        (
            "report_speaker",
            Cmd::Report {
                target: ReportTarget::User("s".into()),
                reason: ReportReason::Spam,
                text: String::new(),
            },
            Prep::None,
            [true, true, true, true],
        ),
        (
            "report_room",
            Cmd::Report {
                target: ReportTarget::Room,
                reason: ReportReason::Other,
                text: "off topic".into(),
            },
            Prep::None,
            [true, true, true, true],
        ),
    ];
    let roles = [
        RoomRole::Host,
        RoomRole::Cohost,
        RoomRole::Speaker,
        RoomRole::Listener,
    ];
    let mut checked = 0;
    for (name, cmd, prep, allowed) in &table {
        for (role, allowed) in roles.iter().zip(allowed) {
            let mut room = populated(*role, t0);
            match prep {
                Prep::None => {}
                Prep::RaiseOwnHand => {
                    let _ = room.apply(A, Cmd::RaiseHand, t0);
                }
                Prep::MuteSelf => {
                    let _ = room.apply(A, Cmd::Mute { target: None }, t0);
                }
            }
            let before = room.snapshot();
            match room.apply(A, cmd.clone(), t0) {
                Ok(events) => {
                    assert!(*allowed, "{name} by a {role:?} was allowed");
                    assert!(!events.is_empty(), "{name} by a {role:?}: no events");
                    // Chat, reactions and reports are transient: they change no state.
                    if !matches!(
                        cmd,
                        Cmd::Chat { .. } | Cmd::React { .. } | Cmd::Report { .. }
                    ) {
                        assert_ne!(room.snapshot(), before, "{name} by a {role:?}: no change");
                    }
                }
                Err(e) => {
                    assert!(!*allowed, "{name} by a {role:?} was refused: {e}");
                    assert_eq!(e.code, RejectCode::Forbidden, "{name} by a {role:?}: {e}");
                    assert_eq!(
                        room.snapshot(),
                        before,
                        "{name} by a {role:?} changed the room"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, table.len() * 4);
}

#[test]
fn join_produces_participant_and_resume_keeps_roles() {
    let t0 = Instant::now();
    let mut r = Room::new(RoomId(1), RoomLimits::default(), t0, 0);
    let ev = ok(&mut r, H, join_cmd("h", Role::Host), t0);
    let RoomEvent::ParticipantJoined { participant } = &ev[0] else {
        panic!("{ev:?}")
    };
    assert_eq!(
        (participant.id, participant.role, participant.muted),
        (H, RoomRole::Host, false)
    );
    assert_eq!(participant.name, "H");
    // Re-announcing the same participant changes nothing.
    assert!(ok(&mut r, H, join_cmd("h", Role::Host), t0).is_empty());
    // Another user cannot take the id.
    assert_eq!(
        refused(&mut r, H, join_cmd("mallory", Role::Host), t0),
        RejectCode::Invalid
    );
    // A promoted listener who reconnects with a new id keeps the speaker role.
    ok(&mut r, L, join_cmd("l", Role::Listener), t0);
    ok(
        &mut r,
        H,
        RoomCommand::Promote {
            target: L,
            role: RoomRole::Speaker,
        },
        t0,
    );
    ok(&mut r, L, RoomCommand::Leave, t0);
    ok(&mut r, ParticipantId(55), join_cmd("l", Role::Listener), t0);
    assert_eq!(
        r.participant(ParticipantId(55)).unwrap().role,
        RoomRole::Speaker
    );
    // A demotion sticks even against a speaker token.
    ok(&mut r, S, join_cmd("s", Role::Speaker), t0);
    ok(&mut r, H, RoomCommand::Demote { target: S }, t0);
    ok(&mut r, S, RoomCommand::Leave, t0);
    ok(&mut r, ParticipantId(56), join_cmd("s", Role::Speaker), t0);
    assert_eq!(
        r.participant(ParticipantId(56)).unwrap().role,
        RoomRole::Listener
    );
    // After an origin restart (no record), `resume` restores the role the edge knew.
    let mut fresh = Room::new(RoomId(1), RoomLimits::default(), t0, 0);
    let mut cmd = join_cmd("l", Role::Listener);
    if let RoomCommand::Join { resume, .. } = &mut cmd {
        *resume = Some(RoomRole::Speaker);
    }
    ok(&mut fresh, L, cmd, t0);
    assert_eq!(fresh.participant(L).unwrap().role, RoomRole::Speaker);
}

#[test]
fn join_validates_its_fields() {
    let t0 = Instant::now();
    let mut r = Room::new(RoomId(1), RoomLimits::default(), t0, 0);
    assert_eq!(
        refused(&mut r, A, join_cmd("", Role::Listener), t0),
        RejectCode::BadMessage
    );
    let long = "u".repeat(MAX_USER_BYTES + 1);
    assert_eq!(
        refused(&mut r, A, join_cmd(&long, Role::Listener), t0),
        RejectCode::BadMessage
    );
    let mut cmd = join_cmd("a", Role::Listener);
    if let RoomCommand::Join { name, region, .. } = &mut cmd {
        *name = format!("  {}\u{7}  ", "n".repeat(200));
        *region = "r".repeat(MAX_REGION_BYTES + 1);
    }
    assert_eq!(refused(&mut r, A, cmd.clone(), t0), RejectCode::BadMessage);
    if let RoomCommand::Join { region, .. } = &mut cmd {
        *region = "eu-west".into();
    }
    ok(&mut r, A, cmd, t0);
    assert_eq!(r.participant(A).unwrap().name, "n".repeat(MAX_NAME_CHARS));
    let limits = RoomLimits {
        max_participants: 1,
        ..RoomLimits::default()
    };
    let mut tiny = Room::new(RoomId(2), limits, t0, 0);
    ok(&mut tiny, A, join_cmd("a", Role::Listener), t0);
    assert_eq!(
        refused(&mut tiny, L, join_cmd("l", Role::Listener), t0),
        RejectCode::Limit
    );
}

#[test]
fn unknown_actor_or_target_is_not_found() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Host, t0);
    for cmd in [
        RoomCommand::Promote {
            target: NOBODY,
            role: RoomRole::Speaker,
        },
        RoomCommand::Demote { target: NOBODY },
        RoomCommand::Mute {
            target: Some(NOBODY),
        },
        RoomCommand::Kick { target: NOBODY },
        RoomCommand::LowerHand {
            target: Some(NOBODY),
        },
    ] {
        assert_eq!(refused(&mut r, A, cmd, t0), RejectCode::NotFound);
    }
    for cmd in [
        RoomCommand::Leave,
        RoomCommand::RaiseHand,
        RoomCommand::Chat { text: "x".into() },
        RoomCommand::End,
    ] {
        assert_eq!(refused(&mut r, NOBODY, cmd, t0), RejectCode::NotFound);
    }
}

#[test]
fn bad_requests_change_nothing() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Host, t0);
    let too_long = "x".repeat(MAX_CHAT_CHARS + 1);
    assert_eq!(
        refused(&mut r, A, RoomCommand::Chat { text: too_long }, t0),
        RejectCode::BadMessage
    );
    assert_eq!(
        refused(&mut r, A, RoomCommand::Chat { text: "   ".into() }, t0),
        RejectCode::BadMessage
    );
    assert_eq!(
        refused(
            &mut r,
            A,
            RoomCommand::Chat {
                text: "a\u{0}b".into()
            },
            t0
        ),
        RejectCode::BadMessage
    );
    // Exactly the limit (in characters, not bytes) is fine.
    ok(
        &mut r,
        A,
        RoomCommand::Chat {
            text: "é".repeat(MAX_CHAT_CHARS),
        },
        t0,
    );
    let emoji = "🎉".repeat(MAX_REACTION_CHARS + 1);
    assert_eq!(
        refused(&mut r, A, RoomCommand::React { emoji }, t0),
        RejectCode::BadMessage
    );
    assert_eq!(
        refused(
            &mut r,
            A,
            RoomCommand::React {
                emoji: String::new()
            },
            t0
        ),
        RejectCode::BadMessage
    );
    for role in [RoomRole::Host, RoomRole::Listener] {
        let cmd = RoomCommand::Promote { target: L, role };
        assert_eq!(refused(&mut r, A, cmd, t0), RejectCode::BadMessage);
    }
    assert_eq!(
        refused(&mut r, A, RoomCommand::Kick { target: A }, t0),
        RejectCode::Invalid
    );
    assert_eq!(
        refused(&mut r, A, RoomCommand::Mute { target: Some(L) }, t0),
        RejectCode::Invalid
    );
}

#[test]
fn hand_queue_keeps_order_and_promotion_lowers() {
    let t0 = Instant::now();
    let mut r = Room::new(RoomId(1), RoomLimits::default(), t0, 0);
    ok(&mut r, H, join_cmd("h", Role::Host), t0);
    let ids: Vec<ParticipantId> = (20..25).map(ParticipantId).collect();
    for (i, id) in ids.iter().enumerate() {
        ok(&mut r, *id, join_cmd(&format!("l{i}"), Role::Listener), t0);
    }
    for id in [ids[3], ids[0], ids[4], ids[1]] {
        assert_eq!(
            ok(&mut r, id, RoomCommand::RaiseHand, t0),
            vec![RoomEvent::HandRaised { id }]
        );
    }
    // Raising again keeps the place in the queue.
    assert!(ok(&mut r, ids[3], RoomCommand::RaiseHand, t0).is_empty());
    assert_eq!(r.snapshot().hands, vec![ids[3], ids[0], ids[4], ids[1]]);
    // Lowering one keeps the others in order; a moderator lowers someone else's.
    ok(&mut r, ids[0], RoomCommand::LowerHand { target: None }, t0);
    ok(&mut r, ids[2], RoomCommand::RaiseHand, t0);
    assert_eq!(
        ok(
            &mut r,
            H,
            RoomCommand::LowerHand {
                target: Some(ids[4])
            },
            t0
        ),
        vec![RoomEvent::HandLowered { id: ids[4] }]
    );
    assert_eq!(r.snapshot().hands, vec![ids[3], ids[1], ids[2]]);
    // Promotion lowers the hand, after the role change.
    assert_eq!(
        ok(
            &mut r,
            H,
            RoomCommand::Promote {
                target: ids[1],
                role: RoomRole::Speaker
            },
            t0
        ),
        vec![
            RoomEvent::RoleChanged {
                id: ids[1],
                role: RoomRole::Speaker,
                by: H
            },
            RoomEvent::HandLowered { id: ids[1] },
        ]
    );
    // Leaving lowers the hand before the participant goes.
    assert_eq!(
        ok(&mut r, ids[3], RoomCommand::Leave, t0),
        vec![
            RoomEvent::HandLowered { id: ids[3] },
            RoomEvent::ParticipantLeft { id: ids[3] }
        ]
    );
    assert_eq!(r.snapshot().hands, vec![ids[2]]);
}

#[test]
fn mute_unmute_and_who_is_heard() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Speaker, t0);
    assert!(r.may_be_heard(S) && r.may_be_heard(A) && !r.may_be_heard(L));
    assert_eq!(
        ok(&mut r, H, RoomCommand::Mute { target: Some(A) }, t0),
        vec![RoomEvent::Muted { id: A, by: H }]
    );
    assert!(!r.may_be_heard(A));
    assert!(r.participant(A).unwrap().muted);
    // Muting twice changes nothing; the speaker may unmute itself (like Clubhouse).
    assert!(ok(&mut r, H, RoomCommand::Mute { target: Some(A) }, t0).is_empty());
    assert_eq!(
        ok(&mut r, A, RoomCommand::Unmute, t0),
        vec![RoomEvent::Unmuted { id: A }]
    );
    assert!(r.may_be_heard(A));
    // Demotion silences; audible() lists publishers that are not muted.
    ok(&mut r, C, RoomCommand::Mute { target: Some(S) }, t0);
    ok(&mut r, H, RoomCommand::Demote { target: A }, t0);
    let mut heard: Vec<_> = r.audible().collect();
    heard.sort();
    assert_eq!(heard, vec![H, H2, C]);
}

#[test]
fn kick_bans_the_user_until_the_room_ends() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Cohost, t0);
    // The kicked user also has a second session (e.g. WHIP publisher + WebSocket client).
    let second = ParticipantId(77);
    ok(&mut r, second, join_cmd("l", Role::Listener), t0);
    let ev = ok(&mut r, A, RoomCommand::Kick { target: L }, t0);
    assert_eq!(
        ev,
        vec![
            RoomEvent::HandLowered { id: L },
            RoomEvent::Kicked { id: L, by: A },
            RoomEvent::ParticipantLeft { id: L },
            RoomEvent::Kicked { id: second, by: A },
            RoomEvent::ParticipantLeft { id: second },
        ]
    );
    let state = r.snapshot();
    assert_eq!(state.banned, vec!["l".to_string()]);
    assert!(state.participants.iter().all(|p| p.user != "l"));
    assert!(state.hands.is_empty());
    // Rejoining with the same identity, under any id, is refused.
    assert_eq!(
        refused(&mut r, L, join_cmd("l", Role::Listener), t0),
        RejectCode::Banned
    );
    assert_eq!(
        refused(&mut r, ParticipantId(78), join_cmd("l", Role::Host), t0),
        RejectCode::Banned
    );
    // The kicked participant can no longer act.
    assert_eq!(
        refused(&mut r, L, RoomCommand::Chat { text: "hey".into() }, t0),
        RejectCode::NotFound
    );
    // Others still join.
    ok(
        &mut r,
        ParticipantId(79),
        join_cmd("newcomer", Role::Listener),
        t0,
    );
}

#[test]
fn end_refuses_everything_after() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Host, t0);
    assert_eq!(
        ok(&mut r, A, RoomCommand::End, t0),
        vec![RoomEvent::Ended { by: Some(A) }]
    );
    let state = r.snapshot();
    assert_eq!(state.phase, RoomPhase::Ended);
    assert!(state.hands.is_empty());
    for (actor, cmd) in [
        (ParticipantId(80), join_cmd("late", Role::Listener)),
        (H, RoomCommand::End),
        (H, RoomCommand::Leave),
        (L, RoomCommand::RaiseHand),
        (
            H,
            RoomCommand::Chat {
                text: "still there?".into(),
            },
        ),
        (
            H,
            RoomCommand::Promote {
                target: L,
                role: RoomRole::Speaker,
            },
        ),
        (S, RoomCommand::Unmute),
    ] {
        assert_eq!(refused(&mut r, actor, cmd, t0), RejectCode::RoomEnded);
    }
    assert_eq!(r.end_by(None, t0).unwrap_err().code, RejectCode::RoomEnded);
}

#[test]
fn chat_and_reactions_are_rate_limited() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Listener, t0);
    let ms = Duration::from_millis;
    let chat = |t: &str| RoomCommand::Chat { text: t.into() };
    // 5 messages in 10 s, spread over 4 s.
    for i in 0..5u64 {
        let ev = ok(&mut r, A, chat("hello"), t0 + ms(i * 1000));
        assert_eq!(
            ev,
            vec![RoomEvent::Chat {
                from: A,
                name: "A".into(),
                text: "hello".into(),
                at_ms: 1_000 + i * 1000,
            }]
        );
    }
    assert_eq!(
        refused(&mut r, A, chat("flood"), t0 + ms(4_500)),
        RejectCode::RateLimited
    );
    assert_eq!(
        refused(&mut r, A, chat("flood"), t0 + ms(9_999)),
        RejectCode::RateLimited
    );
    // Another participant is not affected.
    ok(&mut r, L, chat("me too"), t0 + ms(9_999));
    // The oldest message leaves the window at 10 s: one more fits, then it is full again.
    ok(&mut r, A, chat("again"), t0 + ms(10_000));
    assert_eq!(
        refused(&mut r, A, chat("flood"), t0 + ms(10_500)),
        RejectCode::RateLimited
    );
    ok(&mut r, A, chat("again"), t0 + ms(11_000));
    // Reactions have their own budget of 10 per 10 s.
    for i in 0..10u64 {
        ok(
            &mut r,
            A,
            RoomCommand::React {
                emoji: "🔥".into()
            },
            t0 + ms(11_000 + i),
        );
    }
    let react = RoomCommand::React {
        emoji: "🔥".into()
    };
    assert_eq!(
        refused(&mut r, A, react.clone(), t0 + ms(12_000)),
        RejectCode::RateLimited
    );
    ok(&mut r, A, react, t0 + ms(21_000));
    // A refused (rate limited) message did not use the budget: after the window, 5 fit again.
    for i in 0..5u64 {
        ok(&mut r, A, chat("later"), t0 + ms(30_000 + i));
    }
}

fn report(target: ReportTarget, text: &str) -> RoomCommand {
    RoomCommand::Report {
        target,
        reason: ReportReason::Harassment,
        text: text.into(),
    }
}

fn reported(events: Vec<RoomEvent>) -> Report {
    match <[RoomEvent; 1]>::try_from(events) {
        Ok([RoomEvent::Reported { report }]) => report,
        Ok(other) => panic!("expected one report, got {other:?}"),
        Err(other) => panic!("expected one report, got {other:?}"),
    }
}

#[test]
fn a_report_carries_who_reported_whom_and_when() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Listener, t0);
    let at = t0 + Duration::from_millis(2_500);
    let got = reported(ok(
        &mut r,
        A,
        report(ReportTarget::User("s".into()), "  shouting slurs \n again "),
        at,
    ));
    assert_eq!(
        got,
        Report {
            id: String::new(),
            room: RoomId(7),
            reporter: "a".into(),
            reporter_name: "A".into(),
            reporter_id: A,
            target: ReportTarget::User("s".into()),
            target_name: Some("S".into()),
            reason: ReportReason::Harassment,
            text: "shouting slurs \n again".into(),
            at_ms: 3_500,
            program_ms: None,
        }
    );
    let room = reported(ok(&mut r, A, report(ReportTarget::Room, ""), at));
    assert_eq!((room.target, room.target_name), (ReportTarget::Room, None));
}

#[test]
fn reports_are_validated() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Listener, t0);
    let user = |u: &str| ReportTarget::User(u.into());
    // At most 500 characters (after trimming), no control characters but newlines.
    ok(&mut r, A, report(user("s"), &"é".repeat(500)), t0);
    assert_eq!(
        refused(&mut r, A, report(user("s"), &"é".repeat(501)), t0),
        RejectCode::BadMessage
    );
    assert_eq!(
        refused(&mut r, A, report(user("s"), "bell\u{7}"), t0),
        RejectCode::BadMessage
    );
    // Not oneself, not a user the room never saw, not by someone outside the room.
    assert_eq!(
        refused(&mut r, A, report(user("a"), ""), t0),
        RejectCode::Invalid
    );
    assert_eq!(
        refused(&mut r, A, report(user("stranger"), ""), t0),
        RejectCode::NotFound
    );
    assert_eq!(
        refused(&mut r, NOBODY, report(ReportTarget::Room, ""), t0),
        RejectCode::NotFound
    );
    // Refusals used none of the budget (3 per minute): two more fit.
    ok(&mut r, A, report(user("s"), ""), t0);
    ok(&mut r, A, report(user("l"), ""), t0);
}

#[test]
fn a_user_who_left_or_was_kicked_can_still_be_reported() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Listener, t0);
    ok(&mut r, S, RoomCommand::Leave, t0);
    ok(&mut r, H, RoomCommand::Kick { target: L }, t0);
    assert!(r.participant(L).is_none() && r.participant(S).is_none());
    let gone = reported(ok(
        &mut r,
        A,
        report(ReportTarget::User("s".into()), ""),
        t0,
    ));
    assert_eq!(gone.target_name, None);
    let kicked = reported(ok(
        &mut r,
        A,
        report(ReportTarget::User("l".into()), ""),
        t0,
    ));
    assert_eq!(kicked.target, ReportTarget::User("l".into()));
    // A kicked reporter is gone: it reports nothing.
    assert_eq!(
        refused(&mut r, L, report(ReportTarget::Room, ""), t0),
        RejectCode::NotFound
    );
}

#[test]
fn reports_are_rate_limited_per_user() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Listener, t0);
    // A second session of the same user shares the budget.
    ok(&mut r, ParticipantId(11), join_cmd("a", Role::Listener), t0);
    let s = Duration::from_secs;
    let cmd = report(ReportTarget::User("s".into()), "");
    ok(&mut r, A, cmd.clone(), t0);
    ok(&mut r, ParticipantId(11), cmd.clone(), t0 + s(10));
    ok(&mut r, A, cmd.clone(), t0 + s(20));
    assert_eq!(
        refused(&mut r, ParticipantId(11), cmd.clone(), t0 + s(30)),
        RejectCode::RateLimited
    );
    assert_eq!(
        refused(&mut r, A, cmd.clone(), t0 + s(59)),
        RejectCode::RateLimited
    );
    // Another user is not affected.
    ok(&mut r, L, cmd.clone(), t0 + s(30));
    // The first report leaves the window at 60 s: one more fits, then it is full again.
    ok(&mut r, A, cmd.clone(), t0 + s(60));
    assert_eq!(
        refused(&mut r, A, cmd.clone(), t0 + s(65)),
        RejectCode::RateLimited
    );
    // Chat has its own budget.
    ok(
        &mut r,
        A,
        RoomCommand::Chat { text: "hi".into() },
        t0 + s(65),
    );
}

#[test]
fn chat_and_reaction_budgets_are_per_user_not_per_session() {
    let t0 = Instant::now();
    let mut r = populated(RoomRole::Listener, t0);
    let ms = Duration::from_millis;
    let chat = |t: &str| RoomCommand::Chat { text: t.into() };
    // User "a" opens four more sessions: they share one budget of 5 per 10 s.
    let extra: Vec<ParticipantId> = (20..24).map(ParticipantId).collect();
    for id in &extra {
        ok(&mut r, *id, join_cmd("a", Role::Listener), t0);
    }
    ok(&mut r, A, chat("one"), t0);
    for (i, id) in extra.iter().enumerate() {
        ok(&mut r, *id, chat("more"), t0 + ms(i as u64 + 1));
    }
    for id in std::iter::once(&A).chain(&extra) {
        assert_eq!(
            refused(&mut r, *id, chat("flood"), t0 + ms(100)),
            RejectCode::RateLimited
        );
    }
    // Leaving and rejoining does not reset the budget.
    ok(&mut r, A, RoomCommand::Leave, t0 + ms(200));
    for id in &extra {
        ok(&mut r, *id, RoomCommand::Leave, t0 + ms(200));
    }
    ok(
        &mut r,
        ParticipantId(30),
        join_cmd("a", Role::Listener),
        t0 + ms(300),
    );
    assert_eq!(
        refused(&mut r, ParticipantId(30), chat("flood"), t0 + ms(400)),
        RejectCode::RateLimited
    );
    // Reactions: 10 per 10 s over all of the user's sessions.
    ok(&mut r, ParticipantId(31), join_cmd("a", Role::Listener), t0);
    let react = RoomCommand::React {
        emoji: "👏".into()
    };
    for i in 0..10u64 {
        let who = if i % 2 == 0 { 30 } else { 31 };
        ok(&mut r, ParticipantId(who), react.clone(), t0 + ms(500 + i));
    }
    assert_eq!(
        refused(&mut r, ParticipantId(31), react.clone(), t0 + ms(600)),
        RejectCode::RateLimited
    );
    // Another user is not affected.
    ok(&mut r, L, chat("me too"), t0 + ms(600));
    ok(&mut r, L, react, t0 + ms(600));
}

#[test]
fn sessions_per_user_are_capped() {
    let t0 = Instant::now();
    let limits = RoomLimits {
        max_sessions_per_user: 3,
        ..RoomLimits::default()
    };
    let mut r = Room::new(RoomId(3), limits, t0, 0);
    for id in 1..=3 {
        ok(&mut r, ParticipantId(id), join_cmd("u", Role::Listener), t0);
    }
    for id in 4..=600 {
        assert_eq!(
            r.apply(ParticipantId(id), join_cmd("u", Role::Listener), t0)
                .unwrap_err()
                .code,
            RejectCode::Limit
        );
    }
    assert_eq!(r.participants().len(), 3);
    // Another user joins; a re-announce of a present session is not a new one.
    ok(
        &mut r,
        ParticipantId(700),
        join_cmd("v", Role::Listener),
        t0,
    );
    assert!(ok(&mut r, ParticipantId(1), join_cmd("u", Role::Listener), t0).is_empty());
    // A session that leaves frees its slot; a restored room counts its sessions.
    ok(&mut r, ParticipantId(2), RoomCommand::Leave, t0);
    ok(&mut r, ParticipantId(4), join_cmd("u", Role::Listener), t0);
    let mut back = Room::restore(r.persisted(), limits, t0, 0);
    assert_eq!(
        refused(
            &mut back,
            ParticipantId(5),
            join_cmd("u", Role::Listener),
            t0
        ),
        RejectCode::Limit
    );
}

fn apply(
    rooms: &Rooms,
    room: RoomId,
    actor: ParticipantId,
    cmd: RoomCommand,
    t0: Instant,
) -> Result<Vec<RoomEvent>, Rejection> {
    let create = matches!(cmd, RoomCommand::Join { .. }).then_some((t0, 0));
    rooms.with_or_create(room, create, |h| h.room.apply(actor, cmd, t0))?
}

fn end(rooms: &Rooms, room: RoomId, t0: Instant) -> Ending {
    rooms.end(room, t0, 0, |_, ending| ending)
}

fn housekeeping(rooms: &Rooms, now: Instant) -> Vec<RoomId> {
    let mut seen = Vec::new();
    let mut gone = rooms.housekeeping(now, |id, _| seen.push(id));
    assert_eq!(seen, gone, "every forgotten room is shown to the caller");
    gone.sort();
    gone
}

#[test]
fn rooms_create_on_join_remember_ends_and_forget_idle() {
    let t0 = Instant::now();
    let cfg = RoomsConfig {
        max_rooms: 3,
        ended_memory: Duration::from_secs(60),
        empty_idle: Duration::from_secs(30),
        ..RoomsConfig::default()
    };
    let rooms = Rooms::new(cfg);
    let (a, b, c, d) = (RoomId(1), RoomId(2), RoomId(3), RoomId(4));
    // Only a join creates a room; a refused join creates nothing.
    assert_eq!(
        apply(&rooms, a, H, RoomCommand::Leave, t0)
            .unwrap_err()
            .code,
        RejectCode::NotFound
    );
    assert!(apply(&rooms, a, H, join_cmd("", Role::Host), t0).is_err());
    assert!(rooms.is_empty());
    apply(&rooms, a, H, join_cmd("h", Role::Host), t0).unwrap();
    apply(&rooms, b, H, join_cmd("h", Role::Host), t0).unwrap();
    apply(&rooms, b, H, RoomCommand::Leave, t0).unwrap();
    // Ending an unknown room remembers it as ended.
    assert_eq!(end(&rooms, c, t0), Ending::Unknown);
    assert_eq!(
        apply(&rooms, c, H, join_cmd("h", Role::Host), t0)
            .unwrap_err()
            .code,
        RejectCode::RoomEnded
    );
    assert_eq!(rooms.len(), 3);
    assert_eq!(
        apply(&rooms, d, H, join_cmd("h", Role::Host), t0)
            .unwrap_err()
            .code,
        RejectCode::Limit
    );
    assert_eq!(
        end(&rooms, a, t0),
        Ending::Ended(vec![RoomEvent::Ended { by: None }])
    );
    assert_eq!(end(&rooms, a, t0), Ending::AlreadyEnded);
    // The empty live room goes after 30 s, the ended ones after 60 s.
    assert!(housekeeping(&rooms, t0 + Duration::from_secs(29)).is_empty());
    assert_eq!(housekeeping(&rooms, t0 + Duration::from_secs(31)), vec![b]);
    assert_eq!(
        housekeeping(&rooms, t0 + Duration::from_secs(61)),
        vec![a, c]
    );
    assert!(rooms.is_empty());
}

/// While one room's lock is held (a command in progress there), every other room takes
/// commands, ends and housekeeping; housekeeping skips the busy room rather than wait for it.
#[test]
fn one_rooms_lock_does_not_stall_the_others() {
    let t0 = Instant::now();
    let cfg = RoomsConfig {
        empty_idle: Duration::from_secs(1),
        ..RoomsConfig::default()
    };
    let rooms: Rooms = Rooms::new(cfg);
    let rooms = &rooms;
    let (busy, quiet, empty) = (RoomId(1), RoomId(2), RoomId(3));
    for i in 0..10_000u32 {
        apply(
            rooms,
            busy,
            ParticipantId(100 + i),
            join_cmd(&format!("u{i}"), Role::Listener),
            t0,
        )
        .unwrap();
    }
    apply(rooms, busy, H, join_cmd("h", Role::Host), t0).unwrap();
    apply(rooms, busy, H, RoomCommand::Leave, t0).unwrap();
    apply(rooms, empty, H, join_cmd("h", Role::Host), t0).unwrap();
    apply(rooms, empty, H, RoomCommand::Leave, t0).unwrap();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(move || {
            rooms.with(busy, |_| {
                held_tx.send(()).unwrap();
                // Held until the other rooms' work is done (or the detector below gives up).
                let _ = done_rx.recv_timeout(Duration::from_secs(120));
            })
        });
        held_rx.recv().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || {
            let later = t0 + Duration::from_secs(5);
            let joined = apply(rooms, quiet, H, join_cmd("h", Role::Host), later);
            let chat = apply(
                rooms,
                quiet,
                H,
                RoomCommand::Chat { text: "hi".into() },
                later,
            );
            let gone = housekeeping(rooms, later);
            let ended = end(rooms, quiet, later);
            let _ = tx.send((joined.is_ok(), chat.is_ok(), gone, ended));
        });
        // A failure detector, not a measurement: work that needed the busy room's lock would
        // wait here for as long as it is held.
        let got = rx.recv_timeout(Duration::from_secs(30));
        done_tx.send(()).unwrap();
        let (joined, chat, gone, ended) = got.expect("another room's lock stalled them");
        assert!(joined && chat);
        assert_eq!(gone, vec![empty], "housekeeping skipped the busy room");
        assert_eq!(ended, Ending::Ended(vec![RoomEvent::Ended { by: None }]));
    });
}

#[test]
fn census_and_bans_walk_every_room() {
    let t0 = Instant::now();
    let rooms: Rooms = Rooms::default();
    let (a, b) = (RoomId(1), RoomId(2));
    apply(&rooms, a, H, join_cmd("h", Role::Host), t0).unwrap();
    apply(&rooms, a, L, join_cmd("l", Role::Listener), t0).unwrap();
    apply(&rooms, a, H, RoomCommand::Kick { target: L }, t0).unwrap();
    apply(&rooms, b, H, join_cmd("h", Role::Host), t0).unwrap();
    apply(&rooms, b, S, join_cmd("s", Role::Speaker), t0).unwrap();
    let census = rooms.census();
    assert_eq!(census.live_rooms, 2);
    assert_eq!(census.participants.values().sum::<usize>(), 3);
    assert_eq!(rooms.bans(), vec![(a, "l".to_string())]);
    end(&rooms, a, t0);
    assert!(
        rooms.bans().is_empty(),
        "an ended room's bans are not announced"
    );
    assert_eq!(rooms.census().live_rooms, 1);
}
