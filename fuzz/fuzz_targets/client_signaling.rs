//! Client input at the edge: WHEP / WebSocket `offer` SDP and WebSocket JSON messages never panic,
//! and refusals carry a 4xx status and a code.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match amphi_edge::parse_client_offer(data) {
        Ok(o) => assert!(o.slots.len() <= amphi_protocol::room::LISTENER_AUDIO_SLOTS),
        Err(e) => {
            assert!((400..500).contains(&e.status()));
            assert!(!e.code().is_empty());
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = amphi_protocol::room::ClientMessage::parse(text);
    }
});
