//! Interactive listener occupancy: receive-only sessions (WHEP, WebSocket PeerConnections with
//! listener slots) per room on this edge, against the configured capacity; and WebSocket
//! signaling sessions (with or without media), against [`WS_SESSIONS_PER_SEAT`] times it.

use amphi_protocol::RoomId;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Default `interactive_capacity` of an edge.
pub const DEFAULT_INTERACTIVE_CAPACITY: usize = 500;
/// WebSocket signaling sessions an edge admits per interactive media seat: a session without
/// media costs a socket, a task and its share of every room event, far less than forwarding
/// audio to it (an edge of the default capacity admits 10,000).
pub const WS_SESSIONS_PER_SEAT: usize = 20;

/// Interactive receive sessions per room, shared by the media driver (which adds and removes
/// them) and the HTTP layer (which refuses new ones beyond capacity) and load reports.
#[derive(Debug)]
pub struct Occupancy {
    capacity: usize,
    total: AtomicUsize,
    rooms: Mutex<BTreeMap<RoomId, u32>>,
    /// Open WebSocket sessions.
    ws: AtomicUsize,
}

/// One admitted WebSocket session; dropping it frees its place.
#[derive(Debug)]
pub struct WsSeat(Arc<Occupancy>);

impl Drop for WsSeat {
    fn drop(&mut self) {
        self.0.ws.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Occupancy {
    /// Occupancy with room for `capacity` interactive listeners.
    pub fn new(capacity: usize) -> Self {
        Occupancy {
            capacity,
            total: AtomicUsize::new(0),
            rooms: Mutex::new(BTreeMap::new()),
            ws: AtomicUsize::new(0),
        }
    }

    /// WebSocket sessions this edge admits at once.
    pub fn ws_capacity(&self) -> usize {
        self.capacity.saturating_mul(WS_SESSIONS_PER_SEAT)
    }

    /// Open WebSocket sessions.
    pub fn ws_sessions(&self) -> usize {
        self.ws.load(Ordering::Relaxed)
    }

    /// A place for one more WebSocket session, or `None` at [`Occupancy::ws_capacity`].
    pub fn admit_ws(self: &Arc<Self>) -> Option<WsSeat> {
        let cap = self.ws_capacity();
        self.ws
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| WsSeat(self.clone()))
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Receive sessions on this edge now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Whether a new receive session would exceed the capacity.
    pub fn is_full(&self) -> bool {
        self.total() >= self.capacity
    }

    /// Interactive listeners per room (rooms with none are absent). For the edge heartbeat.
    pub fn listeners_per_room(&self) -> BTreeMap<RoomId, u32> {
        self.rooms.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// A receive session started in `room`.
    pub fn add(&self, room: RoomId) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = self.rooms.lock() {
            *r.entry(room).or_insert(0) += 1;
        }
    }

    /// A receive session in `room` ended.
    pub fn remove(&self, room: RoomId) {
        if let Ok(mut r) = self.rooms.lock() {
            if let Some(n) = r.get_mut(&room) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    r.remove(&room);
                }
                let _ = self
                    .total
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_room_and_capacity() {
        let o = Occupancy::new(2);
        assert!(!o.is_full());
        o.add(RoomId(1));
        o.add(RoomId(2));
        assert!(o.is_full());
        assert_eq!(o.listeners_per_room().len(), 2);
        o.remove(RoomId(1));
        o.remove(RoomId(1));
        assert_eq!(o.total(), 1);
        assert_eq!(o.listeners_per_room(), BTreeMap::from([(RoomId(2), 1)]));
    }

    #[test]
    fn websocket_sessions_count_against_capacity() {
        let o = Arc::new(Occupancy::new(1));
        let seats: Vec<WsSeat> = (0..WS_SESSIONS_PER_SEAT)
            .map(|_| o.admit_ws().expect("room for it"))
            .collect();
        assert_eq!(o.ws_sessions(), WS_SESSIONS_PER_SEAT);
        assert!(o.admit_ws().is_none());
        drop(seats);
        assert_eq!(o.ws_sessions(), 0);
        assert!(o.admit_ws().is_some());
    }
}
