//! RFC 2198 RED payloads from a publisher: the parser never panics, a parsed payload accounts
//! for every byte, recovery only fills sequence numbers inside the gap before the packet, and an
//! encoded payload parses back to what was encoded.
#![no_main]
use amphi_edge::red::{encode_into, parse, RedReceiver};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<8>() else {
        return;
    };
    let seq = u16::from_be_bytes([head[0], head[1]]);
    let ts = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
    let gap = u16::from(head[6] % 8) + 1;
    let step = u32::from(head[7]) * 120 + 1;
    if let Ok(p) = parse(body) {
        let blocks: usize = p.redundant().iter().map(|b| b.payload.len()).sum();
        assert_eq!(
            blocks + p.primary().payload.len() + 4 * p.redundant().len() + 1,
            body.len()
        );
        assert!(p.primary().pt < 0x80);
        let mut rx = RedReceiver::default();
        let first = seq.wrapping_sub(gap);
        rx.receive(first, ts.wrapping_sub(step * u32::from(gap)), &p, 111);
        let rec = rx.receive(seq, ts, &p, 111);
        let mut prev = first;
        for r in rec.packets() {
            let after_prev = r.seq.wrapping_sub(prev) as i16;
            let before_seq = seq.wrapping_sub(r.seq) as i16;
            assert!(
                after_prev > 0 && before_seq > 0,
                "recovered seq outside the gap"
            );
            prev = r.seq;
        }
    }
    let (a, b) = body.split_at(body.len() / 2);
    let mut out = Vec::new();
    let offset = u32::from(head[7]) * 64 + 1;
    encode_into(&mut out, 111, Some((offset, a)), b);
    let p = parse(&out).expect("encoded RED parses");
    assert_eq!(p.primary().payload, b);
    if !a.is_empty() && a.len() <= 0x3ff {
        assert_eq!(p.redundant().len(), 1);
        assert_eq!(p.redundant()[0].payload, a);
        assert_eq!(p.redundant()[0].ts_offset, offset);
    } else {
        assert!(p.redundant().is_empty());
    }
});
