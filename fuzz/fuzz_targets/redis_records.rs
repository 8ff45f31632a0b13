//! State read back from Redis, which anyone with access to it (or a bug in an older release)
//! could have altered: the origin's stored rooms (the fields of a room's hash, assembled into a
//! `PersistedRoom` and restored into the room authority), and the geo-router's stored room
//! entries (paged through the directory index), stored reports, and stored edges (mirrored into the edge registry, then used
//! for edge selection and listener counts).
//!
//! Records are generated well-formed and then corrupted with byte edits, so both the parsers and
//! what consumes their results get exercised. Nothing panics; a stored room restores to exactly
//! what was read; listing and selection answer from the records they were given.
#![no_main]
#[path = "common/vocab.rs"]
mod vocab;

use amphi_geo_router::directory::Directory;
use amphi_geo_router::registry::Registry;
use amphi_geo_router::select::{select_edge, ClientPlace, GeoPoint, Policy};
use amphi_geo_router::store::{decode_edge, decode_room, Now};
use amphi_origin::persist::{assemble, reconcile, PersistedRoom, RoomChanges};
use amphi_origin::room::Rooms;
use amphi_protocol::api::{EdgeHeartbeat, RoomLoad};
use amphi_protocol::RoomId;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use vocab::{ARole, AState, Cmd, Ev, Pid, Text, User};

/// Byte edits applied to a record's JSON: (position, new byte), or a cut.
#[derive(Arbitrary, Debug)]
enum Edit {
    Set(u16, u8),
    Cut(u16),
    Insert(u16, u8),
}

fn corrupt(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match *e {
            Edit::Set(at, b) => {
                if let Some(x) = bytes.get_mut(usize::from(at) % n) {
                    *x = b;
                }
            }
            Edit::Cut(at) => bytes.truncate(usize::from(at) % n),
            Edit::Insert(at, b) => bytes.insert(usize::from(at) % (bytes.len() + 1), b),
        }
    }
    bytes
}

#[derive(Arbitrary, Debug)]
struct StoredRoom {
    state: AState,
    roles: Vec<(User, ARole)>,
    edits: Vec<Edit>,
    /// Commands applied after the restore.
    commands: Vec<(Pid, Cmd)>,
}

#[derive(Arbitrary, Debug)]
struct Entry {
    title: Text,
    topic: Option<Text>,
    created_at: u64,
    scheduled_at: Option<u64>,
    ended_at: Option<u64>,
    edits: Vec<Edit>,
}

#[derive(Arbitrary, Debug)]
struct Edge {
    id: u8,
    region: u8,
    latitude: f64,
    longitude: f64,
    participants: u32,
    cpu_load: f32,
    capacity: u32,
    rooms: Vec<(u8, u32)>,
    draining: bool,
    seen_ago_ms: u64,
    edits: Vec<Edit>,
}

/// A report as the geo-router stores it (`reports:{room}` JSON), then edited.
#[derive(Arbitrary, Debug)]
struct StoredReport {
    report: Ev,
    edits: Vec<Edit>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    room: StoredRoom,
    report: StoredReport,
    /// Raw bytes in a room's place, as a wholly foreign value would be.
    raw: Vec<u8>,
    entries: Vec<Entry>,
    edges: Vec<Edge>,
    drains: Vec<u8>,
    now_secs: u32,
    listener: bool,
}

const REGIONS: [&str; 3] = ["eu-west", "us-east", "\u{1}"];

fuzz_target!(|input: Input| {
    // The router's stored reports (`GET /v1/rooms/{id}/reports` reads them back): edited
    // JSON is refused or reads back as a report that stores as itself.
    if let amphi_protocol::room::RoomEvent::Reported { report } = input.report.report.event() {
        let json = serde_json::to_vec(&report).expect("a report serializes");
        let back: amphi_protocol::room::Report = serde_json::from_slice(&json).expect("reads back");
        assert_eq!(back, report);
        let edited = corrupt(json, &input.report.edits);
        if let Ok(r) = serde_json::from_slice::<amphi_protocol::room::Report>(&edited) {
            let again = serde_json::to_vec(&r).expect("a report serializes");
            assert_eq!(
                serde_json::from_slice::<amphi_protocol::room::Report>(&again).ok(),
                Some(r)
            );
        }
    }
    let t0 = Instant::now();
    let unix_ms = 1_700_000_000_000 + u64::from(input.now_secs) * 1000;

    // The origin: `RoomStore::load` then `Rooms::restore` / `reconcile` (`Room::reset`).
    let id = RoomId(1);
    let saved = PersistedRoom {
        state: input.room.state.state(),
        roles: input
            .room
            .roles
            .iter()
            .map(|(u, r)| (u.name(), r.role()))
            .collect(),
    };
    // Stored as the fields of the room's hash (`RoomChanges::fields`), read back by `assemble`.
    let (fields, _) = RoomChanges::full(&saved).fields();
    let stored: HashMap<String, Vec<u8>> = fields.into_iter().collect();
    let read = assemble(id, &stored).expect("a room's own fields read back");
    assert_eq!(read.map(|r| r.state.room), Some(id));
    // A wholly foreign field, then byte edits to every stored value.
    let mut foreign = stored.clone();
    foreign.insert(
        String::from_utf8_lossy(&input.raw).into_owned(),
        input.raw.clone(),
    );
    let _ = assemble(id, &foreign);
    let edited: HashMap<String, Vec<u8>> = stored
        .into_iter()
        .map(|(k, v)| (k, corrupt(v, &input.room.edits)))
        .collect();
    if let Ok(Some(read)) = assemble(id, &edited) {
        assert_eq!(read.state.room, id);
        let rooms: Rooms = Rooms::default();
        assert!(rooms.restore(read.clone(), t0, unix_ms, |_| {}));
        assert_eq!(
            rooms.with(id, |h| h.room.persisted().state),
            Some(read.state.clone())
        );
        let mut now = t0;
        for (actor, cmd) in &input.room.commands {
            now += Duration::from_secs(1);
            let _ = rooms.with(id, |h| h.room.apply(actor.id(), cmd.command(), now));
        }
        let ours = rooms.with(id, |h| h.room.persisted()).expect("held");
        let merged = reconcile(read, ours);
        assert!(rooms
            .with(id, |h| h.room.reset(merged, now, unix_ms))
            .is_some());
        let _ = rooms.census();
    }

    // The geo-router's directory: `GET /v1/rooms` over stored entries.
    let now_unix = unix_ms / 1000;
    let mut rooms = Vec::new();
    for (i, e) in input.entries.iter().take(16).enumerate() {
        let json = serde_json::json!({
            "title": e.title.text(),
            "topic": e.topic.map(Text::text),
            "created_at": e.created_at,
            "scheduled_at": e.scheduled_at,
        })
        .to_string();
        let json = corrupt(json.into_bytes(), &e.edits);
        let Ok(text) = std::str::from_utf8(&json) else {
            continue;
        };
        if let Ok(entry) = decode_room(text, e.ended_at) {
            assert_eq!(entry.ended_at, e.ended_at);
            rooms.push((RoomId(i as u64 + 1), entry));
        }
    }
    let mut dir = Directory::default();
    for (id, entry) in &rooms {
        dir.put(*id, entry.clone());
    }
    let mut listed = Vec::new();
    let mut cursor = None;
    for _ in 0..=rooms.len() {
        let page = dir.page(cursor, 3, now_unix);
        assert!(page.rooms.len() <= 3);
        for (id, entry) in &page.rooms {
            assert!(entry.ended_at.is_none());
            let info = entry.info(*id, String::new(), now_unix, 0);
            assert_eq!(info.room, *id);
            listed.push(*id);
        }
        cursor = page.next;
        if cursor.is_none() {
            break;
        }
    }
    listed.sort();
    let mut open: Vec<RoomId> = rooms
        .iter()
        .filter(|(_, e)| e.ended_at.is_none())
        .map(|(id, _)| *id)
        .collect();
    open.sort();
    assert_eq!(listed, open, "the listing lost, repeated or invented rooms");

    // The geo-router's shared edge registry: `sync` mirrors the stored edges.
    let now = Now {
        instant: t0 + Duration::from_secs(3600),
        unix_ms,
    };
    let mut beats = Vec::new();
    for e in input.edges.iter().take(8) {
        let hb = EdgeHeartbeat {
            id: format!("edge-{}", e.id % 5),
            region: REGIONS[usize::from(e.region) % REGIONS.len()].to_string(),
            latitude: e.latitude,
            longitude: e.longitude,
            public_url: format!("https://e{}.example", e.id % 5),
            participants: e.participants,
            cpu_load: e.cpu_load,
            capacity: e.capacity,
            rooms: e
                .rooms
                .iter()
                .take(8)
                .map(|&(room, sessions)| RoomLoad {
                    room: RoomId(u64::from(room % 4) + 1),
                    sessions,
                    push: sessions.rotate_left(16),
                })
                .collect(),
            draining: e.draining,
            relay_url: None,
            webtransport: None,
        };
        // JSON has no NaN or infinity: such heartbeats cannot be stored.
        let Ok(json) = serde_json::to_string(&serde_json::json!({
            "beat": hb,
            "seen_ms": unix_ms.saturating_sub(e.seen_ago_ms),
        })) else {
            continue;
        };
        let json = corrupt(json.into_bytes(), &e.edits);
        if let Ok(text) = std::str::from_utf8(&json) {
            if let Some((beat, seen)) = decode_edge(text, now) {
                assert!(seen <= now.instant);
                beats.push((beat, seen));
            }
        }
    }
    let drains: BTreeSet<String> = input
        .drains
        .iter()
        .take(4)
        .map(|d| format!("edge-{}", d % 5))
        .collect();
    let mut registry = Registry::default();
    registry.mirror(beats, drains);
    for room in 1..=4 {
        let room = RoomId(room);
        let _ = registry.room_sessions(room, now.instant);
        let candidates = registry.candidates(room, now.instant);
        let place = ClientPlace::Located(GeoPoint {
            latitude: 48.8,
            longitude: 2.3,
        });
        let policy = Policy {
            load_threshold: 0.8,
            interactive_capacity: 100,
            push_capacity: 1_000,
            // Both settings, as the input has it.
            room_affine: input.listener,
        };
        match select_edge(place, None, "eu-west", &candidates, policy, input.listener) {
            Ok(choice) => assert_eq!(choice.edge.id, candidates[choice.index].id),
            Err(_) => assert!(candidates.is_empty()),
        }
    }
    let _ = registry.list(now.instant);
    let _ = registry.expire(now.instant + Duration::from_secs(86_400));
});
