//! WHIP request bodies from the network: offer validation never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = amphi_edge::parse_whip_offer(data) {
        let status = e.status();
        assert!((400..500).contains(&status), "{status}");
        assert!(!e.code().is_empty());
    }
});
