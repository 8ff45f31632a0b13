//! A WebTransport push session's URL (`CONNECT https://edge/v1/rooms/{room}/push?token=..`):
//! parsing never panics, and what it accepts names one room segment of a push path.
#![no_main]
use amphi_edge::push_wt::push_target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Arbitrary text as the path and query of the edge's URL, as a client may send them.
    let Ok(url) = url::Url::parse(&format!("https://edge.example:4433{text}")) else {
        return;
    };
    if let Ok(target) = push_target(&url) {
        assert!(!target.room.is_empty() && !target.room.contains('/'));
        assert_eq!(url.path(), format!("/v1/rooms/{}/push", target.room));
    }
});
