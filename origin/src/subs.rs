//! Which edge connections want which rooms relayed (sans-IO).

use amphi_protocol::RoomId;
use std::collections::HashMap;

/// Rooms one connection may subscribe to at most.
pub const MAX_ROOMS_PER_CONNECTION: usize = 10_000;

/// Subscription table: room -> subscribed connections, and the reverse.
#[derive(Default, Debug)]
pub struct Subscriptions {
    by_room: HashMap<RoomId, Vec<u64>>,
    by_conn: HashMap<u64, Vec<RoomId>>,
}

/// Result of [`Subscriptions::subscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subscribe {
    /// Newly subscribed.
    Added,
    /// Was already subscribed.
    Already,
    /// The connection holds [`MAX_ROOMS_PER_CONNECTION`] subscriptions.
    LimitReached,
}

impl Subscriptions {
    /// Subscribe connection `conn` to `room`.
    pub fn subscribe(&mut self, room: RoomId, conn: u64) -> Subscribe {
        let rooms = self.by_conn.entry(conn).or_default();
        if rooms.contains(&room) {
            return Subscribe::Already;
        }
        if rooms.len() >= MAX_ROOMS_PER_CONNECTION {
            return Subscribe::LimitReached;
        }
        rooms.push(room);
        self.by_room.entry(room).or_default().push(conn);
        Subscribe::Added
    }

    /// Unsubscribe `conn` from `room`; returns whether it was subscribed.
    pub fn unsubscribe(&mut self, room: RoomId, conn: u64) -> bool {
        let Some(rooms) = self.by_conn.get_mut(&conn) else {
            return false;
        };
        let Some(i) = rooms.iter().position(|r| *r == room) else {
            return false;
        };
        rooms.swap_remove(i);
        if rooms.is_empty() {
            self.by_conn.remove(&conn);
        }
        self.drop_from_room(room, conn);
        true
    }

    fn drop_from_room(&mut self, room: RoomId, conn: u64) {
        if let Some(conns) = self.by_room.get_mut(&room) {
            conns.retain(|c| *c != conn);
            if conns.is_empty() {
                self.by_room.remove(&room);
            }
        }
    }

    /// Forget every subscription of `conn`.
    pub fn remove_connection(&mut self, conn: u64) {
        for room in self.by_conn.remove(&conn).unwrap_or_default() {
            self.drop_from_room(room, conn);
        }
    }

    /// Connections subscribed to `room`.
    pub fn subscribers(&self, room: RoomId) -> &[u64] {
        self.by_room.get(&room).map_or(&[], Vec::as_slice)
    }

    /// Rooms `conn` is subscribed to.
    pub fn rooms_of(&self, conn: u64) -> &[RoomId] {
        self.by_conn.get(&conn).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_unsubscribe_and_disconnect() {
        let mut s = Subscriptions::default();
        let (a, b) = (RoomId(1), RoomId(2));
        assert_eq!(s.subscribe(a, 10), Subscribe::Added);
        assert_eq!(s.subscribe(a, 10), Subscribe::Already);
        assert_eq!(s.subscribe(a, 11), Subscribe::Added);
        assert_eq!(s.subscribe(b, 10), Subscribe::Added);
        assert_eq!(s.subscribers(a), &[10, 11]);
        assert_eq!(s.rooms_of(10), &[a, b]);
        assert!(s.unsubscribe(a, 11));
        assert!(!s.unsubscribe(a, 11));
        assert_eq!(s.subscribers(a), &[10]);
        s.remove_connection(10);
        assert!(s.subscribers(a).is_empty());
        assert!(s.subscribers(b).is_empty());
        assert!(s.rooms_of(10).is_empty());
        assert!(s.by_room.is_empty() && s.by_conn.is_empty());
    }

    #[test]
    fn limit_per_connection() {
        let mut s = Subscriptions::default();
        for i in 0..MAX_ROOMS_PER_CONNECTION as u64 {
            assert_eq!(s.subscribe(RoomId(i), 1), Subscribe::Added);
        }
        assert_eq!(s.subscribe(RoomId(u64::MAX), 1), Subscribe::LimitReached);
    }
}
