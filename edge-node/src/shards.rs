//! Media shards: the edge's peers spread over several media driver threads.
//!
//! Every shard is a complete [`crate::media::driver::MediaDriver`] on its own OS thread with its own UDP
//! socket, all bound to the one `media_listen` port with `SO_REUSEPORT`, so clients see a single
//! ICE candidate and firewalls a single port. A new peer goes to the least loaded shard, which owns
//! its `Rtc` for life; the first hex digit of its session id names the shard.
//!
//! The kernel spreads incoming datagrams over the sockets by address hash, so a datagram may reach
//! a shard that does not own its peer: STUN is matched to its owner through the shared
//! [`UfragDirectory`] (the owning shard is remembered per address), then handed over as a
//! [`Foreign`] datagram. Speaker packets reach every shard: relayed ones from the uplink, local
//! publishers' from the shard that received them, so each shard forwards to its own listeners.

use crate::media::api::{MediaCommand, MediaControl};
use amphi_protocol::ParticipantId;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Most shards an edge runs (one hex digit of the session id).
pub const MAX_SHARDS: usize = 16;

/// Number of shards for a configured `media_threads` (0: one per available core).
pub fn shard_count(configured: usize) -> usize {
    let n = if configured == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        configured
    };
    n.clamp(1, MAX_SHARDS)
}

/// Which shard owns each local ICE ufrag, for STUN from addresses a shard does not know.
#[derive(Debug, Default)]
pub(crate) struct UfragDirectory(Mutex<HashMap<String, usize>>);

impl UfragDirectory {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `ufrag` now belongs to `shard`.
    pub(crate) fn insert(&self, ufrag: &str, shard: usize) {
        self.map().insert(ufrag.to_string(), shard);
    }

    /// `ufrag` is gone (peer removed or ICE restarted).
    pub(crate) fn remove(&self, ufrag: &str) {
        self.map().remove(ufrag);
    }

    /// The shard owning `ufrag`.
    pub(crate) fn owner(&self, ufrag: &str) -> Option<usize> {
        self.map().get(ufrag).copied()
    }
}

/// A datagram that reached another shard's socket, handed to the shard owning its peer.
pub(crate) struct Foreign {
    /// The client address it came from.
    pub source: SocketAddr,
    /// Its bytes.
    pub data: Bytes,
    /// When it was read.
    pub at: Instant,
}

/// What one shard needs to reach its siblings.
pub(crate) struct ShardLinks {
    /// This shard's index.
    pub index: usize,
    /// Speaker packets (encoded relay frames) into each shard, this one included.
    pub relayed: Vec<mpsc::Sender<(Instant, Bytes)>>,
    /// Misdelivered datagrams into each shard, this one included.
    pub foreign: Vec<mpsc::Sender<Foreign>>,
    /// Owner of every local ufrag.
    pub ufrags: Arc<UfragDirectory>,
    /// Peers per shard (written by each shard, read when placing a new peer).
    pub load: Arc<[AtomicUsize]>,
}

impl ShardLinks {
    /// Whether there is more than one shard.
    pub(crate) fn sharded(&self) -> bool {
        self.relayed.len() > 1
    }

    /// Record this shard's peer count.
    pub(crate) fn set_load(&self, peers: usize) {
        if let Some(l) = self.load.get(self.index) {
            l.store(peers, Ordering::Relaxed);
        }
    }

    /// Peers over all shards.
    pub(crate) fn total_load(&self) -> usize {
        self.load.iter().map(|l| l.load(Ordering::Relaxed)).sum()
    }

    /// Hand a local publisher's packet to every other shard; false if one of them was full.
    pub(crate) fn share(&self, at: Instant, frame: &Bytes) -> bool {
        let mut all = true;
        for (k, tx) in self.relayed.iter().enumerate() {
            if k != self.index && tx.try_send((at, frame.clone())).is_err() {
                all = false;
            }
        }
        all
    }
}

/// A fresh random session id (32 hex digits).
fn new_session_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The shards' command queues, used by the HTTP, WebSocket and uplink tasks.
#[derive(Clone)]
pub(crate) struct MediaShards {
    commands: Vec<mpsc::Sender<MediaCommand>>,
    control: Vec<mpsc::UnboundedSender<MediaControl>>,
    load: Arc<[AtomicUsize]>,
}

/// The shards are gone (the edge is stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShardsGone;

impl MediaShards {
    /// Queues of `commands.len()` shards and their shared load counters.
    pub(crate) fn new(
        commands: Vec<mpsc::Sender<MediaCommand>>,
        control: Vec<mpsc::UnboundedSender<MediaControl>>,
        load: Arc<[AtomicUsize]>,
    ) -> Self {
        MediaShards {
            commands,
            control,
            load,
        }
    }

    /// The shard a new peer should go to: the one with the fewest peers.
    pub(crate) fn pick(&self) -> usize {
        (0..self.commands.len())
            .min_by_key(|k| self.load.get(*k).map_or(0, |l| l.load(Ordering::Relaxed)))
            .unwrap_or(0)
    }

    /// A fresh session id (32 hex digits) whose first digit names `shard`.
    pub(crate) fn session_id(shard: usize) -> String {
        let id = new_session_id();
        format!("{:x}{}", shard % MAX_SHARDS, &id[1..])
    }

    /// The shard a session id names, if it is one of ours.
    pub(crate) fn shard_of(&self, session: &str) -> Option<usize> {
        let k = session.chars().next()?.to_digit(16)? as usize;
        (k < self.commands.len()).then_some(k)
    }

    /// Send a command to one shard.
    pub(crate) async fn send(&self, shard: usize, cmd: MediaCommand) -> Result<(), ShardsGone> {
        let tx = self.commands.get(shard).ok_or(ShardsGone)?;
        tx.send(cmd).await.map_err(|_| ShardsGone)
    }

    /// Send a command to every shard (`make` builds one per shard).
    pub(crate) async fn broadcast(&self, make: impl Fn() -> MediaCommand) {
        for tx in &self.commands {
            let _ = tx.send(make()).await;
        }
    }

    /// Like [`MediaShards::broadcast`] without waiting: false if a queue was full.
    pub(crate) fn try_broadcast(&self, make: impl Fn() -> MediaCommand) -> bool {
        let mut all = true;
        for tx in &self.commands {
            all &= tx.try_send(make()).is_ok();
        }
        all
    }

    /// The shard holding the participant's PeerConnection, if any.
    pub(crate) async fn owner_of(
        &self,
        participant: ParticipantId,
    ) -> Result<Option<usize>, ShardsGone> {
        for (k, tx) in self.commands.iter().enumerate() {
            let (reply, answer) = oneshot::channel();
            tx.send(MediaCommand::HasPeer { participant, reply })
                .await
                .map_err(|_| ShardsGone)?;
            if answer.await.map_err(|_| ShardsGone)? {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// Tell every shard but `except` to drop the participant's older PeerConnection.
    pub(crate) async fn supersede(&self, participant: ParticipantId, except: usize) {
        for (k, tx) in self.commands.iter().enumerate() {
            if k != except {
                let _ = tx.send(MediaCommand::Supersede { participant }).await;
            }
        }
    }

    /// A permission change or teardown for every shard.
    pub(crate) fn control(&self, ctl: MediaControl) {
        for tx in &self.control {
            let _ = tx.send(ctl.clone());
        }
    }
}

/// Bind `count` UDP sockets to `addr` with `SO_REUSEPORT` (the first may pick the port when
/// `addr`'s port is 0; the others join it), non-blocking, ready for tokio.
pub(crate) fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out: Vec<std::net::UdpSocket> = Vec::with_capacity(count);
    let mut at = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(at), Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        let std_socket: std::net::UdpSocket = socket.into();
        at = std_socket.local_addr()?;
        out.push(std_socket);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_128_bit_hex_and_distinct() {
        let a = new_session_id();
        let b = new_session_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    fn shards(n: usize) -> (MediaShards, Vec<mpsc::Receiver<MediaCommand>>) {
        let (mut txs, mut rxs) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let (tx, rx) = mpsc::channel(8);
            txs.push(tx);
            rxs.push(rx);
        }
        let load: Arc<[AtomicUsize]> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        (MediaShards::new(txs, Vec::new(), load), rxs)
    }

    #[test]
    fn session_ids_name_their_shard() {
        let (s, _rx) = shards(3);
        for k in 0..3 {
            let id = MediaShards::session_id(k);
            assert_eq!(id.len(), 32);
            assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
            assert_eq!(s.shard_of(&id), Some(k));
        }
        assert_eq!(s.shard_of("f0000000000000000000000000000000"), None);
        assert_eq!(s.shard_of("z"), None);
        assert_eq!(s.shard_of(""), None);
    }

    #[test]
    fn new_peers_go_to_the_least_loaded_shard() {
        let (s, _rx) = shards(3);
        s.load[0].store(5, Ordering::Relaxed);
        s.load[1].store(2, Ordering::Relaxed);
        s.load[2].store(4, Ordering::Relaxed);
        assert_eq!(s.pick(), 1);
        s.load[1].store(9, Ordering::Relaxed);
        assert_eq!(s.pick(), 2);
    }

    #[test]
    fn shard_counts_are_bounded() {
        assert_eq!(shard_count(3), 3);
        assert_eq!(shard_count(100), MAX_SHARDS);
        assert!((1..=MAX_SHARDS).contains(&shard_count(0)));
    }

    #[test]
    fn the_ufrag_directory_tracks_owners() {
        let d = UfragDirectory::default();
        d.insert("abcd", 2);
        assert_eq!(d.owner("abcd"), Some(2));
        d.remove("abcd");
        assert_eq!(d.owner("abcd"), None);
    }

    #[test]
    fn reuseport_sockets_share_one_port() {
        let socks = bind_reuseport("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = socks[0].local_addr().unwrap().port();
        assert!(port != 0);
        assert!(socks.iter().all(|s| s.local_addr().unwrap().port() == port));
        // Every datagram sent to the port reaches one of them.
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..20u8 {
            tx.send_to(&[i], ("127.0.0.1", port)).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut got = 0;
        let mut buf = [0u8; 4];
        for s in &socks {
            while s.recv(&mut buf).is_ok() {
                got += 1;
            }
        }
        assert_eq!(got, 20);
    }
}
