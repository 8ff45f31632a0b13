//! Bearer tokens, recording grants (a URL's `sig`, the packager's control requests) and relay
//! grants (another edge's `?relay=`) from the
//! network: verification never panics and never accepts a token the fuzzer made up (it cannot
//! know the private key).
#![no_main]
use amphi_protocol::token::TokenSigner;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static VERIFIER: OnceLock<amphi_protocol::token::TokenVerifier> = OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| TokenSigner::generate("k1").verifier());
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(verifier.verify(text, 1_700_000_000).is_err());
        assert!(verifier.verify_grant(text, 1_700_000_000).is_err());
        assert!(verifier.verify_relay_grant(text, 1_700_000_000).is_err());
    }
});
