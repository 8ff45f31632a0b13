//! `Range` headers and the `sig` query parameter the packager reads for a recording: parsing
//! never panics, and a range it serves always lies inside the object.
#![no_main]
use amphi_packager::request::{parse_range, query_sig, RangeAnswer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&len_byte, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    for len in [0u64, 1, u64::from(len_byte), 1 << 20, u64::MAX] {
        if let RangeAnswer::Partial { start, end } = parse_range(text, len) {
            assert!(
                start <= end && end < len,
                "{text:?} of {len}: {start}-{end}"
            );
        }
    }
    if let Some(sig) = query_sig(text) {
        assert!(!sig.contains('&') && !sig.is_empty());
    }
});
