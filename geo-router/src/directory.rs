//! The room directory (sans-IO, in memory): which rooms exist and whether they are live.

use amphi_protocol::api::{RoomInfo, RoomStatus};
use amphi_protocol::RoomId;
use std::collections::HashMap;

/// A room as the directory stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomEntry {
    /// Title.
    pub title: String,
    /// Topic.
    pub topic: Option<String>,
    /// Live or ended.
    pub status: RoomStatus,
    /// Creation time, Unix seconds.
    pub created_at: u64,
}

/// All rooms this router knows.
#[derive(Default)]
pub struct Directory {
    rooms: HashMap<RoomId, RoomEntry>,
}

impl Directory {
    /// Add a new live room and return its id.
    pub fn create(&mut self, title: String, topic: Option<String>, now_unix: u64) -> RoomId {
        let mut id = RoomId::random();
        while self.rooms.contains_key(&id) {
            id = RoomId::random();
        }
        self.rooms.insert(
            id,
            RoomEntry {
                title,
                topic,
                status: RoomStatus::Live,
                created_at: now_unix,
            },
        );
        id
    }

    /// Look a room up.
    pub fn get(&self, id: RoomId) -> Option<&RoomEntry> {
        self.rooms.get(&id)
    }

    /// Mark a room ended. Returns `true` if it was live (so this call ended it).
    pub fn end(&mut self, id: RoomId) -> bool {
        match self.rooms.get_mut(&id) {
            Some(r) if r.status != RoomStatus::Ended => {
                r.status = RoomStatus::Ended;
                true
            }
            _ => false,
        }
    }

    /// Live rooms, newest first.
    pub fn live(&self) -> Vec<(RoomId, &RoomEntry)> {
        let mut v: Vec<_> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.status == RoomStatus::Live)
            .map(|(id, r)| (*id, r))
            .collect();
        v.sort_by(|a, b| b.1.created_at.cmp(&a.1.created_at).then(a.0.cmp(&b.0)));
        v
    }
}

impl RoomEntry {
    /// The public view of this room.
    pub fn info(&self, room: RoomId, hls_url: String) -> RoomInfo {
        RoomInfo {
            room,
            title: self.title.clone(),
            topic: self.topic.clone(),
            status: self.status,
            created_at: self.created_at,
            hls_url,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_get_and_list_newest_first() {
        let mut d = Directory::default();
        let a = d.create("a".into(), None, 100);
        let b = d.create("b".into(), Some("music".into()), 200);
        assert_ne!(a, b);
        assert_eq!(d.get(a).unwrap().title, "a");
        assert_eq!(d.get(b).unwrap().status, RoomStatus::Live);
        let order: Vec<RoomId> = d.live().into_iter().map(|(id, _)| id).collect();
        assert_eq!(order, vec![b, a]);
        assert!(d.get(RoomId(1)).is_none() || a == RoomId(1) || b == RoomId(1));
    }
}
