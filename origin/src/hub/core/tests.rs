//! The hub core on simulated time, with recording links and sink: ownership, who may be heard,
//! fan-out, departures, the restart grace window, revocations, room ends and store outages.

use super::*;
use amphi_protocol::room::RoomRole;
use amphi_protocol::token::Role;

/// A peer whose control messages and datagrams the test reads.
#[derive(Clone, Default)]
struct Rec {
    control: Arc<Mutex<Vec<ControlMessage>>>,
    datagrams: Arc<Mutex<Vec<Bytes>>>,
}

impl Link for Rec {
    fn control(&self, msg: ControlMessage) {
        self.control.lock().expect("test lock").push(msg);
    }

    fn datagram(&self, datagram: Bytes) -> bool {
        self.datagrams.lock().expect("test lock").push(datagram);
        true
    }
}

impl Rec {
    /// Every control message so far, taken.
    fn take(&self) -> Vec<ControlMessage> {
        std::mem::take(&mut *self.control.lock().expect("test lock"))
    }

    /// How many datagrams arrived so far.
    fn datagram_count(&self) -> usize {
        self.datagrams.lock().expect("test lock").len()
    }
}

/// What the core told the mixer and the state writer.
#[derive(Clone, Default)]
struct Sunk {
    notes: Arc<Mutex<Vec<MixerNote>>>,
    saves: Arc<Mutex<Vec<String>>>,
}

impl HubSink for Sunk {
    fn mixer(&self, note: MixerNote) {
        self.notes.lock().expect("test lock").push(note);
    }

    fn program_ms(&self, room: RoomId) -> Option<u64> {
        // A program runs in room 4 only, 1.5 s in.
        (room == RoomId(4)).then_some(1_500)
    }

    fn save_changes(&self, room: &Room, events: &[RoomEvent]) {
        if !events.is_empty() {
            self.saves
                .lock()
                .expect("test lock")
                .push(format!("changes {}", room.id()));
        }
    }

    fn save(&self, room: &Room) {
        let line = format!("save {}", room.id());
        self.saves.lock().expect("test lock").push(line);
    }

    fn hold(&self, room: RoomId) {
        let line = format!("hold {room}");
        self.saves.lock().expect("test lock").push(line);
    }

    fn release(&self, room: RoomId) {
        let line = format!("release {room}");
        self.saves.lock().expect("test lock").push(line);
    }
}

impl Sunk {
    fn notes(&self) -> Vec<MixerNote> {
        std::mem::take(&mut *self.notes.lock().expect("test lock"))
    }

    fn saves(&self) -> Vec<String> {
        std::mem::take(&mut *self.saves.lock().expect("test lock"))
    }
}

fn wait_here(wait: &mut dyn FnMut()) {
    wait()
}

fn core_with(wait: Wait) -> (HubCore<Rec>, Sunk) {
    let sunk = Sunk::default();
    let core = HubCore::new(
        Arc::new(Metrics::default()),
        RoomsConfig::default(),
        wait,
        Box::new(sunk.clone()),
        0xfeed,
    );
    (core, sunk)
}

fn core() -> (HubCore<Rec>, Sunk) {
    core_with(wait_here)
}

/// Simulated time: `t0` plus `ms` milliseconds.
fn at(t0: Instant, ms: u64) -> Moment {
    Moment {
        at: t0 + Duration::from_millis(ms),
        unix_ms: 1_800_000_000_000 + ms,
    }
}

/// A connected edge.
fn edge(core: &HubCore<Rec>, conn: ConnId, t0: Instant) -> Rec {
    let link = Rec::default();
    core.connected(conn, PeerKind::Edge, link.clone(), at(t0, 0));
    link
}

fn join_as(core: &HubCore<Rec>, own: &Rec, conn: ConnId, room: RoomId, id: u32, role: Role) {
    let user = format!("u{id}");
    let join = RoomCommand::Join {
        user: user.clone(),
        name: user,
        role,
        region: "us-east".into(),
        resume: None,
    };
    core.room_command(
        at(Instant::now(), 0),
        conn,
        own,
        room,
        ParticipantId(id),
        1,
        join,
    );
}

/// A join through an unregistered link (the reply is dropped).
fn join(core: &HubCore<Rec>, conn: ConnId, room: RoomId, id: u32, role: Role) {
    join_as(core, &Rec::default(), conn, room, id, role);
}

fn route(
    core: &HubCore<Rec>,
    room: RoomId,
    speaker: u32,
    from: ConnId,
) -> Result<Vec<ConnId>, DropReason> {
    core.relay_read()
        .route(room, speaker, from)
        .map(<[ConnId]>::to_vec)
}

fn command(
    core: &HubCore<Rec>,
    own: &Rec,
    conn: ConnId,
    room: RoomId,
    actor: u32,
    cmd: RoomCommand,
) {
    core.room_command(
        at(Instant::now(), 0),
        conn,
        own,
        room,
        ParticipantId(actor),
        2,
        cmd,
    );
}

fn control(
    core: &HubCore<Rec>,
    conn: ConnId,
    peer: PeerKind,
    own: &Rec,
    msg: ControlMessage,
) -> Result<Option<ControlMessage>, Violation> {
    core.handle_control(at(Instant::now(), 0), conn, peer, "peer", own, msg)
}

fn events_of(msgs: &[ControlMessage], of: RoomId) -> Vec<RoomEvent> {
    msgs.iter()
        .filter_map(|m| match m {
            ControlMessage::RoomEvents { room, events } if *room == of => Some(events.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn the_relay_view_follows_the_authority() {
    let (core, _) = core();
    let room = RoomId(7);
    join(&core, 1, room, 1, Role::Speaker);
    join(&core, 2, room, 2, Role::Listener);
    assert_eq!(route(&core, room, 1, 1), Ok(vec![1, 2]));
    assert_eq!(route(&core, room, 1, 2), Err(DropReason::NotAnnounced));
    assert_eq!(route(&core, room, 2, 2), Err(DropReason::NotAudible));
    command(
        &core,
        &Rec::default(),
        1,
        room,
        1,
        RoomCommand::Mute { target: None },
    );
    assert_eq!(route(&core, room, 1, 1), Err(DropReason::NotAudible));
    // The speaker's edge goes: its participants leave, nobody relays for them.
    core.disconnected(1, PeerKind::Edge, "edge-1", true, at(Instant::now(), 0));
    assert_eq!(route(&core, room, 1, 1), Err(DropReason::NotAnnounced));
    assert!(core.relay_read().subs[&room] == vec![2]);
}

/// A speaker's packet goes to every other edge subscribed to its room, once, and nowhere else;
/// a repeat (relay loss protection) is mixed but never forwarded.
#[test]
fn a_speakers_packets_fan_out_to_the_other_subscribed_edges_only() {
    let (core, _) = core();
    let t0 = Instant::now();
    let (room, other) = (RoomId(1), RoomId(2));
    let edges: Vec<Rec> = (1..=4).map(|c| edge(&core, c, t0)).collect();
    join(&core, 1, room, 1, Role::Speaker);
    for conn in [2, 3] {
        let sub = ControlMessage::SubscribeRoom { room };
        assert_eq!(
            control(&core, conn, PeerKind::Edge, &edges[0], sub),
            Ok(None)
        );
    }
    let sub = ControlMessage::SubscribeRoom { room: other };
    assert_eq!(control(&core, 4, PeerKind::Edge, &edges[3], sub), Ok(None));
    let packet = Bytes::from_static(b"opus");
    for _ in 0..3 {
        assert_eq!(core.relay(room, 1, 1, true, &packet), Ok(()));
    }
    assert_eq!(core.relay(room, 1, 1, false, &packet), Ok(()));
    let counts: Vec<usize> = edges.iter().map(Rec::datagram_count).collect();
    assert_eq!(counts, [0, 3, 3, 0]);
    // Another edge cannot speak for that participant.
    assert_eq!(
        core.relay(room, 1, 2, true, &packet),
        Err(DropReason::NotAnnounced)
    );
}

/// A participant belongs to the edge that announced it: another connection's `SpeakerJoined`
/// for it is refused, its owner's is accepted and reaches the mixer with the authority's
/// identity, and only the owner's `SpeakerLeft` counts.
#[test]
fn a_speaker_belongs_to_the_connection_that_announced_it() {
    let (core, sunk) = core();
    let t0 = Instant::now();
    let room = RoomId(3);
    let (a, b) = (edge(&core, 1, t0), edge(&core, 2, t0));
    join(&core, 1, room, 5, Role::Speaker);
    let _ = sunk.notes();
    let announce = || ControlMessage::SpeakerJoined {
        room,
        speaker: ParticipantId(5),
        name: "u5".into(),
        region: "us-east".into(),
    };
    let refused = control(&core, 2, PeerKind::Edge, &b, announce());
    assert!(
        matches!(&refused, Ok(Some(ControlMessage::Error { code, .. })) if code == "forbidden"),
        "{refused:?}"
    );
    assert_eq!(control(&core, 1, PeerKind::Edge, &a, announce()), Ok(None));
    let notes = sunk.notes();
    assert!(
        matches!(
            notes.as_slice(),
            [MixerNote::SpeakerJoined { source: 1, identity: Some((user, _)), .. }] if user == "u5"
        ),
        "{notes:?}"
    );
    let stop = ControlMessage::SpeakerLeft {
        room,
        speaker: ParticipantId(5),
    };
    assert_eq!(
        control(&core, 2, PeerKind::Edge, &b, stop.clone()),
        Ok(None)
    );
    assert!(sunk.notes().is_empty(), "a stranger's SpeakerLeft counted");
    assert_eq!(control(&core, 1, PeerKind::Edge, &a, stop), Ok(None));
    assert!(matches!(
        sunk.notes().as_slice(),
        [MixerNote::SpeakerLeft { speaker: 5, .. }]
    ));
}

/// A host promotes a listener: the relay lets the new speaker be heard, every subscribed edge
/// sees the same events, and an edge cannot act for a participant it did not announce.
#[test]
fn promotion_makes_a_listener_audible_and_commands_come_only_from_the_owning_edge() {
    let (core, _) = core();
    let t0 = Instant::now();
    let room = RoomId(4);
    let (a, b) = (edge(&core, 1, t0), edge(&core, 2, t0));
    join_as(&core, &a, 1, room, 1, Role::Host);
    join_as(&core, &b, 2, room, 2, Role::Listener);
    let _ = (a.take(), b.take());
    assert_eq!(route(&core, room, 2, 2), Err(DropReason::NotAudible));
    let promote = RoomCommand::Promote {
        target: ParticipantId(2),
        role: RoomRole::Speaker,
    };
    // Edge 2 does not own the host: refused, nothing changes.
    command(&core, &b, 2, room, 1, promote.clone());
    assert!(matches!(
        b.take().as_slice(),
        [ControlMessage::CommandRejected { code, .. }] if code == "not_found"
    ));
    assert_eq!(route(&core, room, 2, 2), Err(DropReason::NotAudible));
    command(&core, &a, 1, room, 1, promote);
    assert_eq!(route(&core, room, 2, 2), Ok(vec![1, 2]));
    let (ea, eb) = (events_of(&a.take(), room), events_of(&b.take(), room));
    assert!(matches!(
        ea.first(),
        Some(RoomEvent::RoleChanged {
            role: RoomRole::Speaker,
            ..
        })
    ));
    assert_eq!(format!("{ea:?}"), format!("{eb:?}"));
}

/// A kick: the `Kicked` event first, then the user's tokens revoked on every edge and router.
#[test]
fn a_kick_reaches_the_edges_before_the_revocation_and_every_router_hears_it() {
    let (core, _) = core();
    let t0 = Instant::now();
    let room = RoomId(8);
    let (a, b) = (edge(&core, 1, t0), edge(&core, 2, t0));
    let router = Rec::default();
    core.connected(9, PeerKind::Router, router.clone(), at(t0, 0));
    join_as(&core, &a, 1, room, 1, Role::Host);
    join_as(&core, &b, 2, room, 2, Role::Listener);
    let _ = (a.take(), b.take());
    command(
        &core,
        &a,
        1,
        room,
        1,
        RoomCommand::Kick {
            target: ParticipantId(2),
        },
    );
    let got = b.take();
    let kicked = got
        .iter()
        .position(|m| matches!(m, ControlMessage::RoomEvents { events, .. } if events.iter().any(|e| matches!(e, RoomEvent::Kicked { .. }))));
    let revoked = got
        .iter()
        .position(|m| matches!(m, ControlMessage::Revoke { user, .. } if user == "u2"));
    assert!(
        kicked.is_some() && revoked.is_some() && kicked < revoked,
        "{got:?}"
    );
    assert!(
        matches!(router.take().as_slice(), [ControlMessage::Revoke { user, .. }] if user == "u2")
    );
    // An edge that connects later is told the ban at once.
    let late = edge(&core, 3, t0);
    assert!(
        matches!(late.take().as_slice(), [ControlMessage::Revoke { user, .. }] if user == "u2")
    );
}

/// A router's revoked token goes to every edge once, to edges that connect later while it is
/// live, and not after its expiry.
#[test]
fn revoked_tokens_reach_every_edge_until_they_expire() {
    let (core, _) = core();
    let t0 = Instant::now();
    let a = edge(&core, 1, t0);
    let router = Rec::default();
    core.connected(9, PeerKind::Router, router.clone(), at(t0, 0));
    let until = at(t0, 0).unix_ms / 1000 + 60;
    let revoke = ControlMessage::RevokeToken {
        jti: "t1".into(),
        until,
    };
    let now = at(t0, 0);
    let handle = |msg| core.handle_control(now, 9, PeerKind::Router, "router", &router, msg);
    assert_eq!(handle(revoke.clone()), Ok(None));
    assert_eq!(handle(revoke.clone()), Ok(None));
    assert_eq!(a.take().len(), 1, "told once");
    let late = Rec::default();
    core.connected(2, PeerKind::Edge, late.clone(), at(t0, 30_000));
    assert!(
        matches!(late.take().as_slice(), [ControlMessage::RevokeToken { jti, .. }] if jti == "t1")
    );
    let later = Rec::default();
    core.connected(3, PeerKind::Edge, later.clone(), at(t0, 61_000));
    assert!(later.take().is_empty(), "an expired revocation was sent");
    // Only routers may revoke tokens.
    assert!(control(&core, 1, PeerKind::Edge, &a, revoke).is_err());
}

/// A router ends a room: the subscribed edges get the `Ended` event and `RoomEnded`, the other
/// routers `RoomEnded`, the sender nothing back, the mixer `RoomEnded`; ending it again is
/// silent, and nobody is heard in it any more.
#[test]
fn a_room_ended_by_a_router_is_announced_once_to_everyone_else() {
    let (core, sunk) = core();
    let t0 = Instant::now();
    let room = RoomId(6);
    let a = edge(&core, 1, t0);
    let (r1, r2) = (Rec::default(), Rec::default());
    core.connected(8, PeerKind::Router, r1.clone(), at(t0, 0));
    core.connected(9, PeerKind::Router, r2.clone(), at(t0, 0));
    join_as(&core, &a, 1, room, 1, Role::Speaker);
    let _ = (a.take(), sunk.notes());
    let end = ControlMessage::RoomEnded { room };
    assert_eq!(
        control(&core, 8, PeerKind::Router, &r1, end.clone()),
        Ok(None)
    );
    let got = a.take();
    assert!(events_of(&got, room)
        .iter()
        .any(|e| matches!(e, RoomEvent::Ended { .. })));
    assert!(matches!(got.last(), Some(ControlMessage::RoomEnded { .. })));
    assert!(r1.take().is_empty());
    assert!(matches!(
        r2.take().as_slice(),
        [ControlMessage::RoomEnded { .. }]
    ));
    assert!(matches!(
        sunk.notes().as_slice(),
        [MixerNote::RoomEnded { .. }]
    ));
    assert_eq!(route(&core, room, 1, 1), Err(DropReason::NotAnnounced));
    assert_eq!(control(&core, 9, PeerKind::Router, &r2, end), Ok(None));
    assert!(a.take().is_empty() && r1.take().is_empty() && sunk.notes().is_empty());
}

/// An edge that goes away on the origin's own shutdown keeps its participants (they are
/// re-announced to the restarted origin); one that goes otherwise takes them with it.
#[test]
fn an_edge_gone_takes_its_participants_unless_the_origin_is_shutting_down() {
    let t0 = Instant::now();
    for leave in [false, true] {
        let (core, sunk) = core();
        let room = RoomId(2);
        let (a, b) = (edge(&core, 1, t0), edge(&core, 2, t0));
        join_as(&core, &a, 1, room, 1, Role::Speaker);
        join_as(&core, &b, 2, room, 2, Role::Listener);
        let _ = (b.take(), sunk.notes());
        core.disconnected(1, PeerKind::Edge, "edge-1", leave, at(t0, 5));
        let present = core.room_state(room).expect("held").participants.len();
        let left = events_of(&b.take(), room)
            .iter()
            .any(|e| matches!(e, RoomEvent::ParticipantLeft { id } if *id == ParticipantId(1)));
        assert_eq!((present, left), if leave { (1, true) } else { (2, false) });
        assert!(matches!(
            sunk.notes().as_slice(),
            [MixerNote::SourceGone { source: 1, .. }]
        ));
        assert_eq!(route(&core, room, 1, 1), Err(DropReason::NotAnnounced));
    }
}

/// After a restart a room comes back from the store; its participants that no edge
/// re-announces within [`RESUME_GRACE`] leave, the re-announced ones stay.
#[test]
fn participants_not_reannounced_within_the_grace_window_leave() {
    let t0 = Instant::now();
    let room = RoomId(11);
    let saved = {
        let (before, _) = core();
        join(&before, 1, room, 1, Role::Host);
        join(&before, 1, room, 2, Role::Listener);
        before
            .rooms
            .with(room, |held| held.room.persisted())
            .expect("held")
    };
    let (core, _) = core();
    assert!(core.needs_store_read(room));
    core.store_read(room, Some(saved), at(t0, 0));
    assert!(!core.needs_store_read(room));
    let a = edge(&core, 1, t0);
    // The host's edge re-announces it (a resumed join).
    let rejoin = RoomCommand::Join {
        user: "u1".into(),
        name: "u1".into(),
        role: Role::Host,
        region: "us-east".into(),
        resume: Some(RoomRole::Host),
    };
    core.room_command(at(t0, 1_000), 1, &a, room, ParticipantId(1), 3, rejoin);
    let grace = u64::try_from(RESUME_GRACE.as_millis()).expect("small");
    core.sweep_unclaimed(at(t0, grace - 1).at);
    assert_eq!(core.room_state(room).expect("held").participants.len(), 2);
    let _ = a.take();
    core.sweep_unclaimed(at(t0, grace).at);
    let st = core.room_state(room).expect("held");
    let ids: Vec<ParticipantId> = st.participants.iter().map(|p| p.id).collect();
    assert_eq!(ids, [ParticipantId(1)]);
    assert!(events_of(&a.take(), room)
        .iter()
        .any(|e| matches!(e, RoomEvent::ParticipantLeft { id } if *id == ParticipantId(2))));
}

/// The store cannot be read for a room: it runs unverified with its writes held; once the
/// store answers, the stored bans win (the banned user leaves), the writes are released and the
/// whole merged room is written.
#[test]
fn an_unverified_room_is_reconciled_with_the_stored_bans_when_the_store_returns() {
    let t0 = Instant::now();
    let room = RoomId(12);
    let saved = {
        let (before, _) = core();
        let host = Rec::default();
        join_as(&before, &host, 1, room, 1, Role::Host);
        join(&before, 1, room, 2, Role::Listener);
        command(
            &before,
            &host,
            1,
            room,
            1,
            RoomCommand::Kick {
                target: ParticipantId(2),
            },
        );
        before
            .rooms
            .with(room, |held| held.room.persisted())
            .expect("held")
    };
    let (core, sunk) = core();
    core.store_unreadable(room);
    assert_eq!(sunk.saves(), [format!("hold {room}")]);
    assert!(!core.needs_store_read(room));
    assert_eq!(core.unverified_rooms(), [room]);
    // During the outage the banned user joins the fresh room.
    let a = edge(&core, 1, t0);
    join_as(&core, &a, 1, room, 2, Role::Listener);
    let _ = (a.take(), sunk.saves());
    core.store_read(room, Some(saved), at(t0, 10_000));
    assert!(events_of(&a.take(), room)
        .iter()
        .any(|e| matches!(e, RoomEvent::ParticipantLeft { id } if *id == ParticipantId(2))));
    assert_eq!(
        sunk.saves(),
        [format!("release {room}"), format!("save {room}")]
    );
    assert!(core.unverified_rooms().is_empty());
    let st = core.room_state(room).expect("held");
    assert_eq!(st.banned, ["u2"]);
}

/// Each peer kind may send only its messages: a packager's room command is answered with an
/// error, a hello in mid-stream or a room event from a peer breaks the protocol.
#[test]
fn peers_may_send_only_their_own_messages() {
    let (core, _) = core();
    let own = Rec::default();
    let cmd = ControlMessage::SubscribeRoom { room: RoomId(1) };
    assert!(matches!(
        control(&core, 5, PeerKind::Packager, &own, cmd),
        Ok(Some(ControlMessage::Error { code, .. })) if code == "unexpected"
    ));
    let hello = ControlMessage::Hello {
        peer: PeerKind::Edge,
        id: "e".into(),
        region: "r".into(),
    };
    assert_eq!(
        control(&core, 1, PeerKind::Edge, &own, hello).map_err(|v| v.code),
        Err("unexpected")
    );
    let ping = ControlMessage::Ping { nonce: 7 };
    assert_eq!(
        control(&core, 1, PeerKind::Edge, &own, ping),
        Ok(Some(ControlMessage::Pong { nonce: 7 }))
    );
}

/// The relay decides where a datagram goes while the authority holds its state (a command
/// in a 10,000-member room, a persist in progress): it never waits for it.
#[test]
fn relaying_does_not_wait_for_the_room_authority() {
    let (core, _) = core();
    let (quiet, busy) = (RoomId(1), RoomId(2));
    join(&core, 1, quiet, 1, Role::Speaker);
    join(&core, 2, quiet, 2, Role::Listener);
    for i in 0..10_000u32 {
        join(&core, 1 + u64::from(i % 2), busy, 10 + i, Role::Listener);
    }
    // Both rooms' locks and the shared state held, as by commands in progress.
    core.rooms.with(busy, |_| {
        core.rooms.with(quiet, |_| {
            let held = core.state_write();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::scope(|s| {
                s.spawn(|| {
                    let _ = tx.send(route(&core, quiet, 1, 1));
                });
                // A failure detector, not a measurement: a relay that needs the
                // authority's locks would wait here for as long as they are held.
                let routed = rx.recv_timeout(Duration::from_secs(30));
                drop(held);
                assert_eq!(
                    routed,
                    Ok(Ok(vec![1, 2])),
                    "the relay waited for the authority"
                );
            });
        })
    });
}

/// While a command holds a 10,000-member room (a join or chat burst in progress there),
/// another room's joins, chat, mute, subscription, end and speaker announcement are all
/// handled, their events queued to that room's edge, and its datagrams routed.
#[test]
fn a_busy_room_stalls_no_other_rooms_commands_nor_the_relay() {
    let (core, _) = core();
    let t0 = Instant::now();
    let (quiet, busy, other) = (RoomId(1), RoomId(2), RoomId(3));
    let listener_edge = edge(&core, 2, t0);
    for i in 0..10_000u32 {
        join(&core, 3 + u64::from(i % 2), busy, 100 + i, Role::Listener);
    }
    join(&core, 1, quiet, 1, Role::Speaker);
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let core = &core;
        s.spawn(move || {
            core.rooms.with(busy, |_| {
                held_tx.send(()).expect("test alive");
                let _ = done_rx.recv_timeout(Duration::from_secs(120));
            })
        });
        held_rx.recv().expect("the busy room is held");
        s.spawn(move || {
            let own = Rec::default();
            join(core, 2, quiet, 2, Role::Listener);
            let chat = RoomCommand::Chat {
                text: "hello".into(),
            };
            command(core, &own, 1, quiet, 1, chat);
            command(core, &own, 1, quiet, 1, RoomCommand::Mute { target: None });
            let subscribe = ControlMessage::SubscribeRoom { room: other };
            let subscribed = control(core, 2, PeerKind::Edge, &own, subscribe);
            let announce = ControlMessage::SpeakerJoined {
                room: quiet,
                speaker: ParticipantId(1),
                name: "spk".into(),
                region: "us-east".into(),
            };
            let announced = control(core, 1, PeerKind::Edge, &own, announce);
            core.end_room(other, FROM_ORIGIN, at(Instant::now(), 0));
            let routed = route(core, quiet, 1, 1);
            let _ = tx.send((
                subscribed == Ok(None),
                announced == Ok(None),
                routed,
                own.take(),
            ));
        });
        // A failure detector, not a measurement: work that needed the busy room's lock
        // would wait here for as long as it is held.
        let got = rx.recv_timeout(Duration::from_secs(30));
        let _ = done_tx.send(());
        let (subscribed, announced, routed, replies) =
            got.expect("another room's work waited for the busy room");
        assert!(subscribed && announced, "{replies:?}");
        assert!(replies.is_empty(), "nothing refused: {replies:?}");
        // Muted: the speaker is not heard any more.
        assert_eq!(routed, Err(DropReason::NotAudible));
    });
    let kinds: Vec<_> = events_of(&listener_edge.take(), quiet)
        .into_iter()
        .map(|e| match e {
            RoomEvent::ParticipantJoined { participant } => format!("joined {}", participant.id),
            RoomEvent::Chat { text, .. } => format!("chat {text}"),
            RoomEvent::Muted { id, .. } => format!("muted {id}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["joined p2", "chat hello", "muted p1"]);
}

/// Commands waiting for a busy room's lock do not take the runtime's worker threads with
/// them (the driver's wait): with both workers of a two-worker runtime stuck behind a
/// 10,000-member room's lock, a relay task and another room's command still run.
#[test]
fn waiting_for_a_busy_room_does_not_stall_the_runtime() {
    let (core, _) = core_with(crate::hub::wait_in_place);
    let core = Arc::new(core);
    let (quiet, busy) = (RoomId(1), RoomId(2));
    join(&core, 1, quiet, 1, Role::Speaker);
    join(&core, 2, quiet, 2, Role::Listener);
    for i in 0..10_000u32 {
        join(&core, 3, busy, 100 + i, Role::Listener);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let core = core.clone();
        std::thread::spawn(move || {
            core.rooms.with(busy, |_| {
                held_tx.send(()).expect("test alive");
                let _ = done_rx.recv_timeout(Duration::from_secs(120));
            })
        })
    };
    held_rx.recv().expect("the busy room is held");
    // More commands for the busy room than the runtime has workers: each waits for its lock.
    for i in 0..4u32 {
        let core = core.clone();
        rt.spawn(async move {
            let chat = RoomCommand::Chat { text: "hi".into() };
            command(&core, &Rec::default(), 3, busy, 100 + i, chat);
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let core = core.clone();
        rt.spawn(async move {
            // Let the waiting commands take the workers first.
            tokio::task::yield_now().await;
            let routed = route(&core, quiet, 1, 1);
            let own = Rec::default();
            command(&core, &own, 2, quiet, 2, RoomCommand::RaiseHand);
            let _ = tx.send((routed, own.take()));
        });
    }
    // A failure detector, not a measurement.
    let got = rx.recv_timeout(Duration::from_secs(30));
    let _ = done_tx.send(());
    holder.join().expect("holder");
    rt.shutdown_timeout(Duration::from_secs(10));
    let (routed, replies) = got.expect("the runtime stalled behind the busy room");
    assert_eq!(routed, Ok(vec![1, 2]));
    assert!(
        replies.is_empty(),
        "the hand command was refused: {replies:?}"
    );
}

/// Commands for one room from two edges at once: both subscribed edges receive the room's
/// events in one and the same order, the order the room applied them (its snapshot's join
/// order).
#[test]
fn a_rooms_events_reach_every_edge_in_command_order() {
    let (core, _) = core();
    let t0 = Instant::now();
    let room = RoomId(5);
    let (first, second) = (edge(&core, 1, t0), edge(&core, 2, t0));
    core.subscribe(room, 1);
    core.subscribe(room, 2);
    std::thread::scope(|s| {
        for conn in [1u64, 2] {
            let core = &core;
            s.spawn(move || {
                for i in 0..500u32 {
                    let id = u32::try_from(conn).expect("small") * 1_000 + i;
                    join(core, conn, room, id, Role::Listener);
                }
            });
        }
    });
    let joins = |rx: &Rec| -> Vec<ParticipantId> {
        events_of(&rx.take(), room)
            .into_iter()
            .filter_map(|e| match e {
                RoomEvent::ParticipantJoined { participant } => Some(participant.id),
                _ => None,
            })
            .collect()
    };
    let (a, b) = (joins(&first), joins(&second));
    assert_eq!(a.len(), 1_000);
    assert_eq!(a, b);
    let order: Vec<ParticipantId> = core
        .room_state(room)
        .expect("held")
        .participants
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(order, a);
}

/// A join into a big room queues its snapshot as one message (only a clone is made under
/// the room's lock); the connection's writer splits it into records under the control
/// record limit that the edge reassembles into the whole room.
#[test]
fn a_big_rooms_join_snapshot_is_split_by_the_writer_not_under_the_lock() {
    use amphi_protocol::control::{ControlDecoder, SnapshotAssembler, MAX_CONTROL_LEN};
    let (core, _) = core();
    let room = RoomId(3);
    for i in 0..5_000u32 {
        join(&core, 1, room, 10 + i, Role::Listener);
    }
    let own = Rec::default();
    join_as(&core, &own, 9, room, 9, Role::Listener);
    let mut queued = own.take();
    assert!(
        matches!(
            queued.as_slice(),
            [ControlMessage::RoomSnapshot { more: false, .. }]
        ),
        "one queued snapshot message, got {} messages",
        queued.len()
    );
    let bytes = crate::hub::wire_bytes(queued.pop().expect("one"));
    let mut dec = ControlDecoder::default();
    dec.feed(&bytes);
    let (mut asm, mut records, mut done) = (SnapshotAssembler::default(), 0, None);
    while let Some(m) = dec.next_message().expect("valid records") {
        records += 1;
        assert!(m.to_record().len() - 4 <= MAX_CONTROL_LEN);
        assert!(matches!(
            m,
            ControlMessage::RoomSnapshot { .. } | ControlMessage::RoomSnapshotPart { .. }
        ));
        done = asm.feed(m).expect("in limits").or(done);
    }
    assert!(records > 1, "{records} records");
    let state = done.expect("reassembled");
    assert_eq!(state.participants.len(), 5_001);
}

/// A report reaches the room's edges as an event and every geo-router as `reported`, both
/// with the id and the program position the core stamped; a refused one reaches the sender
/// only.
#[test]
fn reports_go_to_the_edges_and_every_router_stamped() {
    use amphi_protocol::room::{ReportReason, ReportTarget};
    let (core, _) = core();
    let t0 = Instant::now();
    let room = RoomId(4);
    let edge_link = edge(&core, 1, t0);
    let routers: Vec<Rec> = (100..102)
        .map(|conn| {
            let link = Rec::default();
            core.connected(conn, PeerKind::Router, link.clone(), at(t0, 0));
            link
        })
        .collect();
    join(&core, 1, room, 1, Role::Speaker);
    join(&core, 1, room, 2, Role::Listener);
    let _ = edge_link.take();
    let own = Rec::default();
    let cmd = RoomCommand::Report {
        target: ReportTarget::User("u1".into()),
        reason: ReportReason::Spam,
        text: "ads".into(),
    };
    command(&core, &own, 1, room, 2, cmd.clone());
    command(&core, &own, 1, room, 2, cmd);
    let reports: Vec<_> = events_of(&edge_link.take(), room)
        .into_iter()
        .filter_map(|e| match e {
            RoomEvent::Reported { report } => Some(report),
            _ => None,
        })
        .collect();
    let [first, second] = &reports[..] else {
        panic!("two reports expected, got {reports:?}");
    };
    assert!(first.id.starts_with("000000000000feed-") && first.id != second.id);
    assert_eq!((first.reporter.as_str(), first.room), ("u2", room));
    assert_eq!(first.program_ms, Some(1_500));
    for router in routers {
        assert_eq!(
            router.take(),
            vec![
                ControlMessage::Reported {
                    report: first.clone()
                },
                ControlMessage::Reported {
                    report: second.clone()
                }
            ]
        );
    }
    assert!(own.take().is_empty());
    // Reporting oneself is refused to the sender only.
    let me = RoomCommand::Report {
        target: ReportTarget::User("u2".into()),
        reason: ReportReason::Spam,
        text: String::new(),
    };
    command(&core, &own, 1, room, 2, me);
    assert!(matches!(
        &own.take()[..],
        [ControlMessage::CommandRejected { code, .. }] if code == "invalid"
    ));
    assert!(edge_link.take().is_empty());
}

/// Program frames go once to every edge subscribed to the room's program, to no one else; an
/// unsubscribed or departed edge gets no more; only edges may subscribe; an edge with push
/// listeners only (no participants) hears the room end.
#[test]
fn program_frames_go_once_to_each_edge_that_subscribed_to_the_program() {
    let (core, _sunk) = core();
    let t0 = Instant::now();
    let room = RoomId(12);
    let (a, b, c) = (edge(&core, 1, t0), edge(&core, 2, t0), edge(&core, 3, t0));
    let frame = Bytes::from_static(b"program frame");
    assert_eq!(core.program_frame(room, &frame), 0);
    let sub = ControlMessage::SubscribeProgram { room };
    assert_eq!(control(&core, 1, PeerKind::Edge, &a, sub.clone()), Ok(None));
    // Subscribing twice changes nothing.
    assert_eq!(control(&core, 1, PeerKind::Edge, &a, sub.clone()), Ok(None));
    assert_eq!(control(&core, 2, PeerKind::Edge, &b, sub.clone()), Ok(None));
    assert_eq!(core.program_frame(room, &frame), 2);
    assert_eq!(core.program_frame(RoomId(13), &frame), 0);
    assert_eq!(
        (a.datagram_count(), b.datagram_count(), c.datagram_count()),
        (1, 1, 0)
    );
    let unsub = ControlMessage::UnsubscribeProgram { room };
    assert_eq!(control(&core, 1, PeerKind::Edge, &a, unsub), Ok(None));
    assert_eq!(core.program_frame(room, &frame), 1);
    assert_eq!((a.datagram_count(), b.datagram_count()), (1, 2));
    // Edge b has push listeners only: it hears the room end although no participant of it
    // joined through b; edge c, neither subscribed nor joined, hears nothing.
    join_as(&core, &c, 3, room, 1, Role::Host);
    let _ = (b.take(), c.take());
    core.end_room(room, FROM_ORIGIN, at(t0, 10));
    assert!(b
        .take()
        .iter()
        .any(|m| matches!(m, ControlMessage::RoomEnded { room: r } if *r == room)));
    core.disconnected(2, PeerKind::Edge, "b", true, at(t0, 20));
    assert_eq!(core.program_frame(room, &frame), 0);
    // A packager may not subscribe.
    let p = Rec::default();
    core.connected(9, PeerKind::Packager, p.clone(), at(t0, 0));
    assert!(matches!(
        control(&core, 9, PeerKind::Packager, &p, sub),
        Ok(Some(ControlMessage::Error { .. }))
    ));
}
