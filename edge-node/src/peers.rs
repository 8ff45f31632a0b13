//! Sans-IO demultiplexing of the shared media UDP socket: which peer does a datagram belong to?
//!
//! Every peer shares one UDP socket. A datagram from a known source address goes straight to its
//! peer (one hash lookup). A datagram from an unknown address must be a STUN binding request whose
//! USERNAME starts with the local ICE ufrag we generated for one of our peers; that address is then
//! bound to the peer. Anything else is dropped and counted.

use std::collections::HashMap;
use std::net::SocketAddr;

/// Most source addresses one peer may be reached from at once (NAT rebinding, several candidate
/// pairs). Binding one more evicts the oldest.
pub const MAX_ADDRS_PER_PEER: usize = 4;

/// Why a datagram was not handed to any peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A well-formed STUN binding request naming a ufrag no peer owns.
    UnknownPeer,
    /// From an unknown address and not a STUN binding request with a USERNAME.
    NotStun,
    /// The peer's WebRTC stack refused the datagram.
    RtcError,
    /// From a known peer but not demultiplexable (not STUN, DTLS, RTP or RTCP).
    Malformed,
    /// For another media shard whose queue was full.
    Overloaded,
}

impl DropReason {
    /// Every reason, for exporting all metric series.
    pub const ALL: [DropReason; 5] = [
        DropReason::UnknownPeer,
        DropReason::NotStun,
        DropReason::RtcError,
        DropReason::Malformed,
        DropReason::Overloaded,
    ];

    /// The `reason` label value used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::NotStun => "not_stun",
            DropReason::RtcError => "rtc_error",
            DropReason::Malformed => "malformed",
            DropReason::Overloaded => "overloaded",
        }
    }
}

/// The local ICE ufrag a STUN binding request is addressed to (the part of USERNAME before `:`).
///
/// Never panics, whatever the input; this is the routing decision for unknown addresses and is
/// called by the fuzz targets.
pub fn stun_local_ufrag(buf: &[u8]) -> Result<&str, DropReason> {
    // RFC 7983 demultiplexing: STUN starts with 0 or 1 and has a 20-byte header.
    if buf.len() < 20 || buf[0] > 1 {
        return Err(DropReason::NotStun);
    }
    let msg = str0m::ice::StunMessage::parse(buf).map_err(|_| DropReason::NotStun)?;
    if !msg.is_binding_request() {
        return Err(DropReason::NotStun);
    }
    let username = msg.username().ok_or(DropReason::NotStun)?;
    let (local, remote) = username.split_once(':').ok_or(DropReason::NotStun)?;
    if local.is_empty() || remote.is_empty() {
        return Err(DropReason::NotStun);
    }
    Ok(local)
}

/// Handle of a peer in a [`PeerTable`]; never reused within one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// Where a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To this peer, from an address already bound to it.
    Peer(PeerId),
    /// To this peer, whose ufrag the STUN request named; the source address is now bound to it.
    NewAddr(PeerId),
    /// Nowhere.
    Drop(DropReason),
}

struct Entry<P> {
    peer: P,
    ufrag: String,
    session: String,
    addrs: Vec<SocketAddr>,
}

/// All peers of one media socket, indexed by source address, local ICE ufrag and session id.
pub struct PeerTable<P> {
    next_id: u64,
    peers: HashMap<PeerId, Entry<P>>,
    by_addr: HashMap<SocketAddr, PeerId>,
    by_ufrag: HashMap<String, PeerId>,
    by_session: HashMap<String, PeerId>,
}

impl<P> Default for PeerTable<P> {
    fn default() -> Self {
        PeerTable {
            next_id: 1,
            peers: HashMap::new(),
            by_addr: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_session: HashMap::new(),
        }
    }
}

/// Why a peer could not be inserted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InsertError {
    /// Another peer already uses this local ICE ufrag.
    #[error("duplicate ICE ufrag")]
    DuplicateUfrag,
    /// Another peer already has this session id.
    #[error("duplicate session id")]
    DuplicateSession,
}

impl<P> PeerTable<P> {
    /// Add a peer known by its local ICE ufrag and its WHIP session id.
    pub fn insert(&mut self, ufrag: &str, session: &str, peer: P) -> Result<PeerId, InsertError> {
        if self.by_ufrag.contains_key(ufrag) {
            return Err(InsertError::DuplicateUfrag);
        }
        if self.by_session.contains_key(session) {
            return Err(InsertError::DuplicateSession);
        }
        let id = PeerId(self.next_id);
        self.next_id += 1;
        self.by_ufrag.insert(ufrag.to_string(), id);
        self.by_session.insert(session.to_string(), id);
        self.peers.insert(
            id,
            Entry {
                peer,
                ufrag: ufrag.to_string(),
                session: session.to_string(),
                addrs: Vec::with_capacity(1),
            },
        );
        Ok(id)
    }

    /// Decide where a datagram from `source` goes, binding `source` to a peer when it is a STUN
    /// binding request for that peer's ufrag.
    ///
    /// A STUN binding request from a known address that names another peer's ufrag moves the
    /// address to that peer (a client reusing its port for a new session).
    pub fn route(&mut self, source: SocketAddr, buf: &[u8]) -> Route {
        if let Some(&id) = self.by_addr.get(&source) {
            // Only STUN (first byte 0 or 1) can re-home an address; media takes the fast path.
            if buf.first().is_some_and(|b| *b < 2) {
                if let Some(&other) = stun_local_ufrag(buf)
                    .ok()
                    .and_then(|u| self.by_ufrag.get(u))
                {
                    if other != id {
                        self.unbind(id, source);
                        self.bind(other, source);
                        return Route::NewAddr(other);
                    }
                }
            }
            return Route::Peer(id);
        }
        let ufrag = match stun_local_ufrag(buf) {
            Ok(u) => u,
            Err(r) => return Route::Drop(r),
        };
        let Some(&id) = self.by_ufrag.get(ufrag) else {
            return Route::Drop(DropReason::UnknownPeer);
        };
        self.bind(id, source);
        Route::NewAddr(id)
    }

    fn unbind(&mut self, id: PeerId, addr: SocketAddr) {
        self.by_addr.remove(&addr);
        if let Some(entry) = self.peers.get_mut(&id) {
            entry.addrs.retain(|a| *a != addr);
        }
    }

    fn bind(&mut self, id: PeerId, addr: SocketAddr) {
        let Some(entry) = self.peers.get_mut(&id) else {
            return;
        };
        if entry.addrs.len() >= MAX_ADDRS_PER_PEER {
            let oldest = entry.addrs.remove(0);
            self.by_addr.remove(&oldest);
        }
        entry.addrs.push(addr);
        self.by_addr.insert(addr, id);
    }

    /// Route STUN for `ufrag` to peer `id` from now on (an ICE restart gave it new credentials);
    /// returns the ufrag it replaced.
    pub fn set_ufrag(&mut self, id: PeerId, ufrag: &str) -> Result<Option<String>, InsertError> {
        match self.by_ufrag.get(ufrag) {
            Some(other) if *other != id => return Err(InsertError::DuplicateUfrag),
            _ => {}
        }
        let Some(entry) = self.peers.get_mut(&id) else {
            return Ok(None);
        };
        let old = std::mem::replace(&mut entry.ufrag, ufrag.to_string());
        self.by_ufrag.remove(&old);
        self.by_ufrag.insert(ufrag.to_string(), id);
        Ok(Some(old))
    }

    /// The local ICE ufrag of peer `id`.
    pub fn ufrag(&self, id: PeerId) -> Option<&str> {
        self.peers.get(&id).map(|e| e.ufrag.as_str())
    }

    /// Whether a peer here owns `ufrag`.
    pub fn has_ufrag(&self, ufrag: &str) -> bool {
        self.by_ufrag.contains_key(ufrag)
    }

    /// Whether `addr` is bound to a peer here.
    pub fn knows_addr(&self, addr: SocketAddr) -> bool {
        self.by_addr.contains_key(&addr)
    }

    /// The peer, mutably.
    pub fn get_mut(&mut self, id: PeerId) -> Option<&mut P> {
        self.peers.get_mut(&id).map(|e| &mut e.peer)
    }

    /// The peer.
    pub fn get(&self, id: PeerId) -> Option<&P> {
        self.peers.get(&id).map(|e| &e.peer)
    }

    /// The peer owning a WHIP session id.
    pub fn by_session(&self, session: &str) -> Option<PeerId> {
        self.by_session.get(session).copied()
    }

    /// Remove a peer and every index entry pointing at it.
    pub fn remove(&mut self, id: PeerId) -> Option<P> {
        let entry = self.peers.remove(&id)?;
        self.by_ufrag.remove(&entry.ufrag);
        self.by_session.remove(&entry.session);
        for a in &entry.addrs {
            self.by_addr.remove(a);
        }
        Some(entry.peer)
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Ids of all peers (for periodic sweeps).
    pub fn ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// All peers with their ids, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (PeerId, &mut P)> {
        self.peers.iter_mut().map(|(id, e)| (*id, &mut e.peer))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A STUN binding request with USERNAME `user`, PRIORITY and a (fake) MESSAGE-INTEGRITY, laid
    /// out per RFC 5389 so str0m's parser accepts it.
    pub(crate) fn binding_request(user: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        let mut push_attr = |typ: u16, val: &[u8]| {
            attrs.extend_from_slice(&typ.to_be_bytes());
            attrs.extend_from_slice(&(val.len() as u16).to_be_bytes());
            attrs.extend_from_slice(val);
            while attrs.len() % 4 != 0 {
                attrs.push(0);
            }
        };
        push_attr(0x0006, user.as_bytes());
        push_attr(0x0024, &1u32.to_be_bytes());
        push_attr(0x0008, &[0u8; 20]);
        let mut out = Vec::new();
        out.extend_from_slice(&0x0001u16.to_be_bytes());
        out.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        out.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        out.extend_from_slice(&[7u8; 12]);
        out.extend_from_slice(&attrs);
        out
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn stun_ufrag_is_the_local_half_of_username() {
        assert_eq!(
            stun_local_ufrag(&binding_request("edgeufrag:remote")),
            Ok("edgeufrag")
        );
        assert_eq!(
            stun_local_ufrag(&binding_request("nocolon")),
            Err(DropReason::NotStun)
        );
        assert_eq!(
            stun_local_ufrag(&binding_request(":remote")),
            Err(DropReason::NotStun)
        );
    }

    #[test]
    fn garbage_and_truncated_stun_are_not_stun() {
        let req = binding_request("a:b");
        for n in 0..req.len() {
            assert_eq!(
                stun_local_ufrag(&req[..n]),
                Err(DropReason::NotStun),
                "len {n}"
            );
        }
        assert_eq!(stun_local_ufrag(&[0x80; 40]), Err(DropReason::NotStun));
        assert_eq!(stun_local_ufrag(&[]), Err(DropReason::NotStun));
        let mut bad_cookie = req.clone();
        bad_cookie[5] ^= 1;
        assert_eq!(stun_local_ufrag(&bad_cookie), Err(DropReason::NotStun));
    }

    #[test]
    fn unknown_address_is_bound_by_stun_ufrag_then_routed_directly() {
        let mut t = PeerTable::default();
        let a = t.insert("ufa", "sa", "peer-a").unwrap();
        let b = t.insert("ufb", "sb", "peer-b").unwrap();
        assert_eq!(
            t.route(addr(1), b"\x90rtp"),
            Route::Drop(DropReason::NotStun)
        );
        assert_eq!(
            t.route(addr(1), &binding_request("nobody:x")),
            Route::Drop(DropReason::UnknownPeer)
        );
        assert_eq!(
            t.route(addr(1), &binding_request("ufb:x")),
            Route::NewAddr(b)
        );
        assert_eq!(t.route(addr(1), b"\x90rtp"), Route::Peer(b));
        assert_eq!(
            t.route(addr(2), &binding_request("ufa:x")),
            Route::NewAddr(a)
        );
        assert_eq!(t.route(addr(2), b"anything"), Route::Peer(a));
        assert_eq!(t.by_session("sa"), Some(a));
        assert_eq!(t.get(b), Some(&"peer-b"));
    }

    #[test]
    fn an_ice_restart_moves_routing_to_the_new_ufrag() {
        let mut t = PeerTable::default();
        let a = t.insert("ufa", "sa", "peer-a").unwrap();
        let b = t.insert("ufb", "sb", "peer-b").unwrap();
        assert_eq!(t.set_ufrag(a, "ufb"), Err(InsertError::DuplicateUfrag));
        assert_eq!(t.set_ufrag(a, "ufa2").unwrap().as_deref(), Some("ufa"));
        assert!(t.has_ufrag("ufa2") && !t.has_ufrag("ufa"));
        assert_eq!(t.ufrag(a), Some("ufa2"));
        assert_eq!(
            t.route(addr(1), &binding_request("ufa:x")),
            Route::Drop(DropReason::UnknownPeer)
        );
        assert_eq!(
            t.route(addr(1), &binding_request("ufa2:x")),
            Route::NewAddr(a)
        );
        // The old ufrag is free for a new peer; removal forgets the new one.
        let c = t.insert("ufa", "sc", "peer-c").unwrap();
        t.remove(a);
        assert_eq!(
            t.route(addr(3), &binding_request("ufa2:x")),
            Route::Drop(DropReason::UnknownPeer)
        );
        assert_eq!(
            t.route(addr(4), &binding_request("ufa:x")),
            Route::NewAddr(c)
        );
        assert_eq!(t.by_session("sb"), Some(b));
    }

    #[test]
    fn a_known_address_moves_to_the_peer_its_stun_names() {
        let mut t = PeerTable::default();
        let a = t.insert("ufa", "sa", ()).unwrap();
        let b = t.insert("ufb", "sb", ()).unwrap();
        assert_eq!(
            t.route(addr(5), &binding_request("ufa:x")),
            Route::NewAddr(a)
        );
        // STUN for the same peer, or for nobody, keeps the binding.
        assert_eq!(t.route(addr(5), &binding_request("ufa:x")), Route::Peer(a));
        assert_eq!(t.route(addr(5), &binding_request("zzz:x")), Route::Peer(a));
        assert_eq!(
            t.route(addr(5), &binding_request("ufb:x")),
            Route::NewAddr(b)
        );
        assert_eq!(t.route(addr(5), b"\x90rtp"), Route::Peer(b));
        t.remove(a);
        assert_eq!(
            t.route(addr(5), b"\x90rtp"),
            Route::Peer(b),
            "a's removal leaves b's binding"
        );
    }

    #[test]
    fn removal_forgets_every_index() {
        let mut t = PeerTable::default();
        let a = t.insert("ufa", "sa", 1u8).unwrap();
        assert_eq!(
            t.route(addr(9), &binding_request("ufa:x")),
            Route::NewAddr(a)
        );
        assert_eq!(t.remove(a), Some(1));
        assert!(t.is_empty());
        assert_eq!(
            t.route(addr(9), b"\x90rtp"),
            Route::Drop(DropReason::NotStun)
        );
        assert_eq!(
            t.route(addr(9), &binding_request("ufa:x")),
            Route::Drop(DropReason::UnknownPeer)
        );
        assert_eq!(t.by_session("sa"), None);
        let again = t.insert("ufa", "sa", 2u8).unwrap();
        assert_ne!(again, a, "ids are never reused");
    }

    #[test]
    fn duplicates_are_refused_and_addresses_are_capped() {
        let mut t = PeerTable::default();
        let a = t.insert("ufa", "sa", ()).unwrap();
        assert_eq!(t.insert("ufa", "s2", ()), Err(InsertError::DuplicateUfrag));
        assert_eq!(
            t.insert("uf2", "sa", ()),
            Err(InsertError::DuplicateSession)
        );
        for port in 0..(MAX_ADDRS_PER_PEER as u16 + 1) {
            assert_eq!(
                t.route(addr(100 + port), &binding_request("ufa:x")),
                Route::NewAddr(a)
            );
        }
        // The oldest binding was evicted, the newest ones still route.
        assert_eq!(
            t.route(addr(100), b"\x90"),
            Route::Drop(DropReason::NotStun)
        );
        assert_eq!(
            t.route(addr(100 + MAX_ADDRS_PER_PEER as u16), b"\x90"),
            Route::Peer(a)
        );
    }
}
