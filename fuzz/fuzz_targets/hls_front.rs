//! The plain listener's HTTP/1.1 front (request heads) and the stored recording index: parsing
//! never panics; the front only takes complete `GET /hls/...` heads it can account for; an index
//! chunk that parses renders back to the same segments and plans a resumption without panicking.
#![no_main]
use amphi_packager::recording_index::{chunk_of, parse_chunk, plan_resume, render_chunk};
use amphi_packager::{parse_request_head, RequestHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let RequestHead::Fast(req, len) = parse_request_head(data) {
        assert!(len <= data.len());
        assert!(req.target.starts_with("/hls/"), "{}", req.target);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut segments) = parse_chunk(text) {
        segments.sort_by_key(|s| s.msn);
        segments.dedup_by_key(|s| s.msn);
        if let Some(first) = segments.first() {
            let chunk = chunk_of(first.msn);
            let same: Vec<_> = segments
                .iter()
                .filter(|s| chunk_of(s.msn) == chunk)
                .copied()
                .collect();
            assert_eq!(parse_chunk(&render_chunk(&same, chunk)), Ok(same));
        }
        let _ = plan_resume(segments, text.lines(), 9_600);
    }
});
