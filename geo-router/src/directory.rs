//! The room directory (sans-IO, in memory): rooms, their schedule and status, and the discovery
//! ranking (live rooms by listener count, then recency; scheduled rooms by start time).

use amphi_protocol::api::{RoomInfo, RoomStatus};
use amphi_protocol::RoomId;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A room as the directory stores it (and as a shared store serializes it; `ended_at` is kept
/// apart there so that ending is one atomic write).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomEntry {
    /// Title.
    pub title: String,
    /// Topic.
    pub topic: Option<String>,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Start time of a scheduled room, Unix seconds.
    pub scheduled_at: Option<u64>,
    /// When the room ended, Unix seconds.
    #[serde(skip)]
    pub ended_at: Option<u64>,
}

impl RoomEntry {
    /// Status at `now_unix`: ended, scheduled (start in the future) or live.
    pub fn status(&self, now_unix: u64) -> RoomStatus {
        match (self.ended_at, self.scheduled_at) {
            (Some(_), _) => RoomStatus::Ended,
            (None, Some(at)) if at > now_unix => RoomStatus::Scheduled,
            _ => RoomStatus::Live,
        }
    }

    /// The public view of this room.
    pub fn info(&self, room: RoomId, hls_url: String, now_unix: u64, listeners: u32) -> RoomInfo {
        RoomInfo {
            room,
            title: self.title.clone(),
            topic: self.topic.clone(),
            status: self.status(now_unix),
            created_at: self.created_at,
            hls_url,
            scheduled_at: self.scheduled_at,
            ended_at: self.ended_at,
            listeners,
        }
    }
}

/// Discovery order of two rooms: live before scheduled; live by listeners (more first), then
/// recency (newer first); scheduled by start time (sooner first); then id.
pub fn discovery_order(
    a: (RoomId, &RoomEntry, u32),
    b: (RoomId, &RoomEntry, u32),
    now_unix: u64,
) -> std::cmp::Ordering {
    let live = |e: &RoomEntry| e.status(now_unix) == RoomStatus::Live;
    live(b.1)
        .cmp(&live(a.1))
        .then_with(|| {
            if live(a.1) {
                b.2.cmp(&a.2).then(
                    b.1.scheduled_at
                        .unwrap_or(b.1.created_at)
                        .max(b.1.created_at)
                        .cmp(
                            &a.1.scheduled_at
                                .unwrap_or(a.1.created_at)
                                .max(a.1.created_at),
                        ),
                )
            } else {
                a.1.scheduled_at.cmp(&b.1.scheduled_at)
            }
        })
        .then(a.0.cmp(&b.0))
}

/// Whether `entry` matches a topic filter (case-insensitive, exact).
pub fn topic_matches(entry: &RoomEntry, topic: Option<&str>) -> bool {
    match topic {
        None => true,
        Some(t) => entry
            .topic
            .as_deref()
            .is_some_and(|have| have.eq_ignore_ascii_case(t)),
    }
}

/// Live and scheduled rooms of `rooms` matching `topic`, in discovery order; `listeners` gives
/// each room's listener count.
pub fn rank(
    rooms: Vec<(RoomId, RoomEntry)>,
    topic: Option<&str>,
    now_unix: u64,
    listeners: impl Fn(RoomId) -> u32,
) -> Vec<(RoomId, RoomEntry, u32)> {
    let mut v: Vec<_> = rooms
        .into_iter()
        .filter(|(_, r)| r.status(now_unix) != RoomStatus::Ended && topic_matches(r, topic))
        .map(|(id, r)| {
            let n = listeners(id);
            (id, r, n)
        })
        .collect();
    v.sort_by(|a, b| discovery_order((a.0, &a.1, a.2), (b.0, &b.1, b.2), now_unix));
    v
}

/// All rooms this router knows.
#[derive(Default)]
pub struct Directory {
    rooms: HashMap<RoomId, RoomEntry>,
}

impl Directory {
    /// Add a new room and return its id.
    pub fn create(&mut self, entry: RoomEntry) -> RoomId {
        let mut id = RoomId::random();
        while self.rooms.contains_key(&id) {
            id = RoomId::random();
        }
        self.rooms.insert(id, entry);
        id
    }

    /// Insert or replace a room under a known id.
    pub fn put(&mut self, id: RoomId, entry: RoomEntry) {
        self.rooms.insert(id, entry);
    }

    /// Look a room up.
    pub fn get(&self, id: RoomId) -> Option<&RoomEntry> {
        self.rooms.get(&id)
    }

    /// Mark a room ended at `now_unix`. Returns `true` if this call ended it.
    pub fn end(&mut self, id: RoomId, now_unix: u64) -> bool {
        match self.rooms.get_mut(&id) {
            Some(r) if r.ended_at.is_none() => {
                r.ended_at = Some(now_unix);
                true
            }
            _ => false,
        }
    }

    /// Live and scheduled rooms matching `topic`, in discovery order; `listeners` gives each
    /// room's listener count.
    pub fn discover(
        &self,
        topic: Option<&str>,
        now_unix: u64,
        listeners: impl Fn(RoomId) -> u32,
    ) -> Vec<(RoomId, &RoomEntry, u32)> {
        let mut v: Vec<_> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.status(now_unix) != RoomStatus::Ended && topic_matches(r, topic))
            .map(|(id, r)| (*id, r, listeners(*id)))
            .collect();
        v.sort_by(|a, b| discovery_order(*a, *b, now_unix));
        v
    }

    /// Every room, cloned.
    pub fn all(&self) -> Vec<(RoomId, RoomEntry)> {
        self.rooms.iter().map(|(id, r)| (*id, r.clone())).collect()
    }

    /// Rooms that are live at `now_unix`.
    pub fn live_count(&self, now_unix: u64) -> usize {
        self.rooms
            .values()
            .filter(|r| r.status(now_unix) == RoomStatus::Live)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(title: &str, topic: Option<&str>, created: u64, scheduled: Option<u64>) -> RoomEntry {
        RoomEntry {
            title: title.into(),
            topic: topic.map(Into::into),
            created_at: created,
            scheduled_at: scheduled,
            ended_at: None,
        }
    }

    #[test]
    fn status_follows_schedule_and_end() {
        let mut d = Directory::default();
        let a = d.create(entry("a", None, 100, Some(500)));
        assert_eq!(d.get(a).unwrap().status(499), RoomStatus::Scheduled);
        assert_eq!(d.get(a).unwrap().status(500), RoomStatus::Live);
        assert!(d.end(a, 600));
        assert!(!d.end(a, 700), "ending twice changes nothing");
        assert_eq!(d.get(a).unwrap().status(800), RoomStatus::Ended);
        assert_eq!(d.get(a).unwrap().ended_at, Some(600));
        assert!(!d.end(RoomId(0xdead), 1));
    }

    #[test]
    fn discovery_ranks_by_listeners_then_recency_then_schedule() {
        let mut d = Directory::default();
        let old_busy = d.create(entry("old busy", Some("Music"), 100, None));
        let new_quiet = d.create(entry("new quiet", Some("music"), 300, None));
        let old_quiet = d.create(entry("old quiet", Some("tech"), 200, None));
        let later = d.create(entry("later", Some("music"), 50, Some(5000)));
        let sooner = d.create(entry("sooner", None, 60, Some(2000)));
        let ended = d.create(entry("ended", Some("music"), 400, None));
        d.end(ended, 900);
        let listeners = |id: RoomId| if id == old_busy { 50 } else { 0 };
        let order: Vec<RoomId> = d
            .discover(None, 1000, listeners)
            .iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(order, vec![old_busy, new_quiet, old_quiet, sooner, later]);
        let music: Vec<RoomId> = d
            .discover(Some("MUSIC"), 1000, listeners)
            .iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(music, vec![old_busy, new_quiet, later]);
        assert_eq!(d.live_count(1000), 3);
        // Once its time comes, a scheduled room ranks as live from its start time.
        let order: Vec<RoomId> = d
            .discover(None, 2500, listeners)
            .iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(order, vec![old_busy, sooner, new_quiet, old_quiet, later]);
    }
}
