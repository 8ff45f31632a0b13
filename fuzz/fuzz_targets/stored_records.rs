//! What a restarted packager reads back from storage (S3 objects anyone with bucket access
//! could have altered): the recording index chunks and the speaker turns. Both parsers return
//! errors, never panic, and stored turns survive a render/parse round trip.
#![no_main]
use amphi_packager::recording_index::{parse_chunk, parse_turns, render_turns};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_chunk(data);
    if let Ok(spans) = parse_turns(data) {
        assert_eq!(parse_turns(&render_turns(&spans)), Ok(spans));
    }
});
