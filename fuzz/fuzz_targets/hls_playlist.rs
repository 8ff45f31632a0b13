//! The packager's playlist conformance checker and attribute-list parser read arbitrary text
//! (playlists fetched over HTTP in tests): they return errors, never panic; storage keys that
//! pass validation never climb out of a room directory.
#![no_main]
use amphi_packager::playlist::{AAC, OPUS};
use amphi_testkit::conformance::{attributes, check_media, check_multivariant, Expect};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for e in [
        Expect::live(OPUS.part_target_ms()).with_reports(1),
        Expect::any(AAC.part_target_ms()),
        Expect::vod(),
    ] {
        let _ = check_media(text, &e);
    }
    let _ = check_multivariant(text, 2);
    let _ = attributes(text);
    if amphi_packager::storage::valid_key(text) {
        assert!(
            !text.split('/').any(|s| s == ".." || s.is_empty()),
            "{text}"
        );
    }
});
