//! Control-stream bytes from the network, in arbitrary chunks: the decoder never panics, decoded
//! messages encode back to themselves, and a refused record does not end the stream.
#![no_main]
use amphi_protocol::control::ControlDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = ControlDecoder::default();
    let split = data.first().copied().unwrap_or(1).max(1) as usize;
    for chunk in data.chunks(split) {
        decoder.feed(chunk);
        loop {
            match decoder.next_message() {
                Ok(Some(msg)) => {
                    let mut again = ControlDecoder::default();
                    again.feed(&msg.to_record());
                    assert_eq!(again.next_message().unwrap(), Some(msg));
                }
                Ok(None) => break,
                // One refused record: the stream stays usable.
                Err(_) => {}
            }
        }
    }
});
