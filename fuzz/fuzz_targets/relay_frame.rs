//! Relay frames from the network: decoding never panics, and what decodes re-encodes identically
//! (speaker identity payloads too).
#![no_main]
use amphi_protocol::relay::{RelayFrame, SpeakerIdentity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = RelayFrame::decode(data) {
        let mut out = vec![0u8; frame.encoded_len()];
        let n = frame
            .encode_into(&mut out)
            .expect("a decoded frame encodes");
        assert_eq!(&out[..n], data);
        if let Ok(id) = SpeakerIdentity::decode(frame.payload) {
            let mut again = Vec::new();
            id.encode_to_vec(&mut again)
                .expect("a decoded identity encodes");
            assert_eq!(again, frame.payload);
        }
    }
});
