//! What a restarted packager reads back from storage (S3 objects anyone with bucket access
//! could have altered): the recording index chunks and the speaker turns. Both parsers return
//! errors, never panic, and stored turns survive a render/parse round trip.
#![no_main]
use amphi_packager::recording_index::parse_chunk;
use amphi_packager::speakers::{parse_turns, render_turns};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_chunk(text);
    if let Ok(spans) = parse_turns(text) {
        assert_eq!(parse_turns(&render_turns(&spans)), Ok(spans));
    }
});
