//! Push listener wire input: audio messages from an edge (the players' and load generators'
//! decoder), WebSocket frames from a client (the edge's parser) and from a server (the push
//! clients' parser, also over WebTransport). Decoding never panics, what decodes re-encodes
//! identically, and a frame's ranges stay inside the input.
#![no_main]
use amphi_protocol::push::{
    parse_client_frame, parse_server_frame, ws_server_frame, AudioMessage, PushFrame,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = AudioMessage::decode(data) {
        let frames: Vec<PushFrame<'_>> = m.frames().collect();
        assert_eq!(frames.len(), m.len());
        let mut again = Vec::new();
        AudioMessage::encode(m.seq, &frames, &mut again).expect("a decoded message encodes");
        assert_eq!(again, data);
    }
    let mut buf = data.to_vec();
    let mut at = 0;
    while at < buf.len() {
        match parse_client_frame(&mut buf[at..]) {
            Ok(Some(f)) => {
                assert!(f.consumed > 0 && at + f.consumed <= data.len());
                assert!(f.payload.end <= f.consumed);
                at += f.consumed;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let mut at = 0;
    while let Ok(Some(f)) = parse_server_frame(&data[at..]) {
        assert!(f.consumed > 0 && at + f.consumed <= data.len());
        assert!(f.payload.end == f.consumed);
        let mut again = Vec::new();
        ws_server_frame(f.opcode, &data[at..][f.payload.clone()], &mut again);
        assert_eq!(
            parse_server_frame(&again).unwrap().unwrap().payload.len(),
            f.payload.len()
        );
        at += f.consumed;
    }
});
