//! The plain listeners' HTTP/1.1 front (request heads, as the packager and the geo-router use
//! it) and the stored recording index: parsing never panics; the front only takes complete
//! `GET` heads of the targets it accepts, keeping only the headers asked for; an index
//! chunk that parses renders back to the same segments and plans a resumption without panicking.
#![no_main]
use amphi_packager::recording_index::{chunk_of, parse_chunk, plan_resume, render_chunk};
use amphi_protocol::h1::{parse_request_head, RequestHead};
use http::header::{HeaderName, FORWARDED};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let RequestHead::Fast(req, len) = parse_request_head(data, |t| t.starts_with("/hls/"), &[]) {
        assert!(len <= data.len());
        assert!(req.uri.path().starts_with("/hls/"), "{}", req.uri);
        assert!(req.headers.is_empty());
    }
    let kept = [FORWARDED, HeaderName::from_static("x-forwarded-for")];
    let route = |t: &str| {
        t.strip_prefix("/v1/route")
            .is_some_and(|r| r.is_empty() || r.starts_with('?'))
    };
    if let RequestHead::Fast(req, len) = parse_request_head(data, route, &kept) {
        assert!(len <= data.len());
        assert_eq!(req.uri.path(), "/v1/route");
        assert!(req.headers.keys().all(|k| kept.contains(k)));
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
