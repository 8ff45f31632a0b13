//! HLS request paths and delivery-directive query strings: parsing never panics and never yields
//! a path outside a room directory.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = text.split_once('?').unwrap_or((text, ""));
    if let Ok(parsed) = amphi_packager::parse_hls_path(path) {
        let rendered = format!("{parsed:?}");
        assert!(!rendered.contains(".."), "{rendered}");
    }
    let _ = amphi_packager::parse_hls_query(query);
});
