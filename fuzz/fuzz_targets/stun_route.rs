//! Datagrams at the edge's media port from unknown addresses: STUN parsing and peer routing never
//! panic, and a datagram reaches a peer only if it is a STUN request naming that peer's ufrag.
#![no_main]
use amphi_edge::peers::{PeerTable, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut table: PeerTable<u8> = PeerTable::default();
    table.insert("fuzz", "session", 1).expect("fresh table");
    let source = "127.0.0.1:5000".parse().unwrap();
    let names_peer = amphi_edge::stun_local_ufrag(data) == Ok("fuzz");
    match table.route(source, data) {
        Route::Peer(_) => panic!("an unbound address routed without STUN"),
        Route::NewAddr(_) => assert!(names_peer),
        Route::Drop(_) => assert!(!names_peer),
    }
});
