//! WHIP/WHEP `PATCH` bodies (trickle-ice-sdpfrag) from the network: parsing never panics, and an
//! accepted ICE restart yields an offer and answer fragment that parse again.
#![no_main]
use amphi_edge::sdpfrag::{answer_fragment, parse_fragment, restart_offer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(fragment) = parse_fragment(data) {
        if let Some((ufrag, pwd)) = fragment.credentials {
            let offer = restart_offer(
                "v=0\r\na=ice-ufrag:old1\r\na=ice-pwd:oldpasswordoldpassword\r\n",
                &ufrag,
                &pwd,
            );
            let again =
                parse_fragment(answer_fragment(&offer).as_bytes()).expect("own fragment parses");
            assert_eq!(again.credentials, Some((ufrag, pwd)));
        }
    }
});
