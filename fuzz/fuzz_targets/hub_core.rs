//! The origin hub's sans-IO core (`HubCore`, what every mesh connection's control stream and
//! datagrams drive) fed generated sequences over four connections of any peer kind: room
//! commands from any participant, speaker announcements, subscriptions, room ends, revoked
//! tokens, relayed datagrams, departures, stored state read or unreadable, and the restart
//! sweep as time passes. It never panics; a datagram never goes back to the connection it came
//! from; a connection that left is sent nothing more, control messages nor datagrams.
#![no_main]
#[path = "common/vocab.rs"]
mod vocab;

use amphi_origin::hub::core::{HubCore, HubSink, Link, MixerNote, Moment};
use amphi_origin::metrics::Metrics;
use amphi_origin::persist::PersistedRoom;
use amphi_origin::room::{Room, RoomsConfig};
use amphi_protocol::control::{ControlMessage, PeerKind};
use amphi_protocol::room::RoomEvent;
use amphi_protocol::RoomId;
use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vocab::{AState, Cmd, Pid, Rid};

/// Connections 1..=4.
#[derive(Arbitrary, Clone, Copy, Debug)]
struct Conn(u8);

impl Conn {
    fn id(self) -> u64 {
        u64::from(self.0 % 4) + 1
    }
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Kind {
    Edge,
    Packager,
    Router,
}

impl Kind {
    fn peer(self) -> PeerKind {
        match self {
            Kind::Edge => PeerKind::Edge,
            Kind::Packager => PeerKind::Packager,
            Kind::Router => PeerKind::Router,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Msg {
    Command(Rid, Pid, Cmd),
    SpeakerJoined(Rid, Pid),
    SpeakerLeft(Rid, Pid),
    Subscribe(Rid),
    Unsubscribe(Rid),
    RoomEnded(Rid),
    RevokeToken(u8, u16),
    Ping(u64),
    Hello,
}

impl Msg {
    fn message(&self) -> ControlMessage {
        match self {
            Msg::Command(r, p, c) => ControlMessage::RoomCommand {
                room: r.id(),
                actor: p.id(),
                request: 1,
                command: c.command(),
            },
            Msg::SpeakerJoined(r, p) => ControlMessage::SpeakerJoined {
                room: r.id(),
                speaker: p.id(),
                name: "n".into(),
                region: "r".into(),
            },
            Msg::SpeakerLeft(r, p) => ControlMessage::SpeakerLeft {
                room: r.id(),
                speaker: p.id(),
            },
            Msg::Subscribe(r) => ControlMessage::SubscribeRoom { room: r.id() },
            Msg::Unsubscribe(r) => ControlMessage::UnsubscribeRoom { room: r.id() },
            Msg::RoomEnded(r) => ControlMessage::RoomEnded { room: r.id() },
            Msg::RevokeToken(j, secs) => ControlMessage::RevokeToken {
                jti: format!("t{j}"),
                until: 1_800_000_000 + u64::from(*secs),
            },
            Msg::Ping(nonce) => ControlMessage::Ping { nonce: *nonce },
            Msg::Hello => ControlMessage::Hello {
                peer: PeerKind::Edge,
                id: "e".into(),
                region: "r".into(),
            },
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Connect(Conn, Kind),
    Disconnect(Conn, bool),
    Control(Conn, Msg),
    Relay(Rid, Pid, Conn, bool),
    StoreRead(Rid, Option<AState>),
    StoreUnreadable(Rid),
    Sweep,
    EndIdle(Rid),
    Wait(u16),
}

/// One connection's inbox; `open` is false once it left.
#[derive(Clone)]
struct Rec {
    conn: u64,
    open: Arc<Mutex<bool>>,
    /// (receiving connection, was it open) for every datagram sent, and the datagram's origin.
    log: Arc<Mutex<Vec<(u64, bool)>>>,
}

impl Link for Rec {
    fn control(&self, _msg: ControlMessage) {
        let open = *self.open.lock().unwrap();
        self.log.lock().unwrap().push((self.conn, open));
    }

    fn datagram(&self, datagram: Bytes) -> bool {
        let open = *self.open.lock().unwrap();
        let from = u64::from(datagram[0]);
        assert_ne!(from, self.conn, "a datagram went back to its sender");
        self.log.lock().unwrap().push((self.conn, open));
        true
    }
}

struct Quiet;

impl HubSink for Quiet {
    fn mixer(&self, _note: MixerNote) {}
    fn program_ms(&self, _room: RoomId) -> Option<u64> {
        Some(1)
    }
    fn save_changes(&self, _room: &Room, _events: &[RoomEvent]) {}
    fn save(&self, _room: &Room) {}
    fn hold(&self, _room: RoomId) {}
    fn release(&self, _room: RoomId) {}
}

fn wait_here(wait: &mut dyn FnMut()) {
    wait()
}

fuzz_target!(|ops: Vec<Op>| {
    let core: HubCore<Rec> = HubCore::new(
        Arc::new(Metrics::default()),
        RoomsConfig::default(),
        wait_here,
        Box::new(Quiet),
        7,
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    // Connection id -> (its link, its kind) while connected.
    let mut conns: [Option<(Rec, PeerKind)>; 5] = Default::default();
    let t0 = Instant::now();
    let mut ms = 0u64;
    for op in ops.iter().take(256) {
        let now = Moment {
            at: t0 + Duration::from_millis(ms),
            unix_ms: 1_800_000_000_000 + ms,
        };
        match op {
            Op::Connect(c, kind) => {
                let id = c.id();
                if conns[id as usize].is_some() {
                    continue;
                }
                let link = Rec {
                    conn: id,
                    open: Arc::new(Mutex::new(true)),
                    log: log.clone(),
                };
                core.connected(id, kind.peer(), link.clone(), now);
                conns[id as usize] = Some((link, kind.peer()));
            }
            Op::Disconnect(c, leave) => {
                let id = c.id();
                if let Some((link, peer)) = conns[id as usize].take() {
                    core.disconnected(id, peer, "peer", *leave, now);
                    *link.open.lock().unwrap() = false;
                }
            }
            Op::Control(c, msg) => {
                let id = c.id();
                if let Some((link, peer)) = conns[id as usize].clone() {
                    let _ = core.handle_control(now, id, peer, "peer", &link, msg.message());
                }
            }
            Op::Relay(r, p, c, forward) => {
                let id = c.id();
                if matches!(conns[id as usize], Some((_, PeerKind::Edge))) {
                    let datagram = Bytes::from(vec![id as u8; 8]);
                    let _ = core.relay(r.id(), p.id().0, id, *forward, &datagram);
                }
            }
            Op::StoreRead(r, state) => {
                let saved = state.as_ref().map(|s| {
                    let mut state = s.state();
                    state.room = r.id();
                    PersistedRoom {
                        state,
                        roles: Vec::new(),
                    }
                });
                if core.needs_store_read(r.id()) || core.unverified_rooms().contains(&r.id()) {
                    core.store_read(r.id(), saved, now);
                }
            }
            Op::StoreUnreadable(r) => {
                if core.needs_store_read(r.id()) {
                    core.store_unreadable(r.id());
                }
            }
            Op::Sweep => core.sweep_unclaimed(now.at),
            Op::EndIdle(r) => core.end_idle_room(r.id(), now),
            Op::Wait(d) => ms += u64::from(*d) * 10,
        }
    }
    for (conn, open) in log.lock().unwrap().iter() {
        assert!(*open, "connection {conn} was sent something after it left");
    }
});
