//! RFC 2198 RED (redundant audio) for Opus, sans-IO: parse a RED payload without allocating,
//! recover lost packets from the redundant blocks of the packet that follows them, and build a
//! RED payload (for the str0m WHIP client, which sends in RTP mode where str0m does not wrap).
//!
//! A RED payload is N redundant block headers (4 bytes: F=1, 7-bit PT, 14-bit timestamp offset,
//! 10-bit length), one primary header (1 byte: F=0, 7-bit PT), then the block payloads in the
//! same order (redundant blocks oldest first, the primary last). Browsers send one redundant
//! block: the previous packet.

/// Most redundant blocks accepted in one RED payload (browsers send one; libwebrtc caps at 32,
/// more would only let a peer make the edge do more work per packet).
pub const MAX_REDUNDANT: usize = 8;

/// Largest redundant block payload (10-bit length field).
const MAX_BLOCK_LEN: usize = 0x3ff;

/// Largest timestamp offset (14-bit field).
const MAX_TS_OFFSET: u32 = 0x3fff;

/// Why a RED payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum RedError {
    /// The headers run past the end of the payload (no primary header).
    #[error("RED headers truncated")]
    Truncated,
    /// More than [`MAX_REDUNDANT`] redundant blocks.
    #[error("more than {MAX_REDUNDANT} redundant blocks")]
    TooManyBlocks,
    /// A redundant block's length runs past the end of the payload.
    #[error("RED block length past the end")]
    LengthPastEnd,
}

/// One block of a RED payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Block<'a> {
    /// Payload type of the block.
    pub pt: u8,
    /// How far (RTP clock) before the primary this block's timestamp is; 0 for the primary.
    pub ts_offset: u32,
    /// The block's payload (one Opus packet).
    pub payload: &'a [u8],
}

/// A parsed RED payload: borrowed blocks, no allocation.
#[derive(Debug, Clone, Copy)]
pub struct RedPayload<'a> {
    redundant: [Block<'a>; MAX_REDUNDANT],
    count: usize,
    primary: Block<'a>,
}

impl<'a> RedPayload<'a> {
    /// The redundant blocks, oldest first.
    pub fn redundant(&self) -> &[Block<'a>] {
        &self.redundant[..self.count]
    }

    /// The primary block (the packet's own media).
    pub fn primary(&self) -> Block<'a> {
        self.primary
    }
}

/// Parse a RED payload. Never panics; allocates nothing.
pub fn parse(data: &[u8]) -> Result<RedPayload<'_>, RedError> {
    let mut redundant = [Block::default(); MAX_REDUNDANT];
    let mut lens = [0usize; MAX_REDUNDANT];
    let mut count = 0;
    let mut pos = 0;
    let primary_pt = loop {
        let Some(&first) = data.get(pos) else {
            return Err(RedError::Truncated);
        };
        if first & 0x80 == 0 {
            pos += 1;
            break first;
        }
        let Some(h) = data.get(pos..pos + 4) else {
            return Err(RedError::Truncated);
        };
        if count == MAX_REDUNDANT {
            return Err(RedError::TooManyBlocks);
        }
        redundant[count].pt = h[0] & 0x7f;
        redundant[count].ts_offset = (u32::from(h[1]) << 6) | (u32::from(h[2]) >> 2);
        lens[count] = (usize::from(h[2] & 0x03) << 8) | usize::from(h[3]);
        count += 1;
        pos += 4;
    };
    for (block, &len) in redundant.iter_mut().zip(&lens).take(count) {
        let Some(payload) = data.get(pos..pos + len) else {
            return Err(RedError::LengthPastEnd);
        };
        block.payload = payload;
        pos += len;
    }
    Ok(RedPayload {
        redundant,
        count,
        primary: Block {
            pt: primary_pt,
            ts_offset: 0,
            payload: &data[pos..],
        },
    })
}

/// A packet recovered from a redundant block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered<'a> {
    /// Its RTP sequence number.
    pub seq: u16,
    /// Its RTP timestamp.
    pub ts: u32,
    /// Its payload (one Opus packet).
    pub payload: &'a [u8],
}

/// The packets one RED packet recovered, oldest first (a fixed array: no allocation).
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovery<'a> {
    items: [Recovered<'a>; MAX_REDUNDANT],
    count: usize,
    already_recovered: bool,
}

impl<'a> Recovery<'a> {
    /// The recovered packets, oldest first.
    pub fn packets(&self) -> &[Recovered<'a>] {
        &self.items[..self.count]
    }

    /// Whether the packet itself arrived late after it had been recovered from a later packet's
    /// redundancy (reordering): it was forwarded already, so drop it.
    pub fn already_recovered(&self) -> bool {
        self.already_recovered
    }
}

/// Per-stream receive state: which packet came last, so a gap before the next one can be filled
/// from its redundant blocks, and which of the 63 packets before it were recovered.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedReceiver {
    last: Option<(u16, u32)>,
    /// Bit `k` set: the packet `k` before `last` was recovered.
    recovered: u64,
}

impl RedReceiver {
    /// A packet with sequence number `seq` and timestamp `ts` arrived carrying `red`; returns the
    /// packets lost just before it that its redundant blocks (of payload type `primary_pt`)
    /// recover, with their sequence numbers and timestamps. A block is placed at
    /// `seq - offset / duration`, the packet duration taken from the gap since the last packet
    /// (it must divide evenly; otherwise nothing is recovered). Late and duplicate packets
    /// recover nothing and do not move the state back.
    pub fn receive<'a>(
        &mut self,
        seq: u16,
        ts: u32,
        red: &RedPayload<'a>,
        primary_pt: u8,
    ) -> Recovery<'a> {
        let mut out = Recovery::default();
        let Some((last_seq, last_ts)) = self.last else {
            self.last = Some((seq, ts));
            return out;
        };
        let gap = seq.wrapping_sub(last_seq) as i16;
        if gap <= 0 {
            let bit = 1u64.checked_shl(u32::from(gap.unsigned_abs())).unwrap_or(0);
            out.already_recovered = self.recovered & bit != 0;
            self.recovered &= !bit;
            return out;
        }
        self.last = Some((seq, ts));
        let gap = gap as u32;
        self.recovered = self.recovered.checked_shl(gap).unwrap_or(0);
        if gap == 1 {
            return out;
        }
        let dts = ts.wrapping_sub(last_ts);
        if dts == 0 || dts % gap != 0 {
            return out;
        }
        let duration = dts / gap;
        let mut previous_k = u32::MAX;
        for b in red.redundant() {
            if b.pt != primary_pt || b.ts_offset == 0 || b.ts_offset % duration != 0 {
                continue;
            }
            let k = b.ts_offset / duration;
            // Oldest first: k strictly falls; a block outside the gap was not lost.
            if k >= gap || k >= previous_k || out.count == MAX_REDUNDANT {
                continue;
            }
            previous_k = k;
            self.recovered |= 1u64.checked_shl(k).unwrap_or(0);
            out.items[out.count] = Recovered {
                seq: seq.wrapping_sub(k as u16),
                ts: ts.wrapping_sub(b.ts_offset),
                payload: b.payload,
            };
            out.count += 1;
        }
        out
    }
}

/// Write into `out` (cleared first) a RED payload with primary `primary` of payload type `pt`
/// and, if it fits the RFC 2198 fields, one redundant block `previous` (`ts_offset` before the
/// primary, same payload type), as browsers send.
pub fn encode_into(out: &mut Vec<u8>, pt: u8, previous: Option<(u32, &[u8])>, primary: &[u8]) {
    out.clear();
    let previous = previous.filter(|(off, p)| {
        *off > 0 && *off <= MAX_TS_OFFSET && !p.is_empty() && p.len() <= MAX_BLOCK_LEN
    });
    if let Some((off, p)) = previous {
        out.push(0x80 | (pt & 0x7f));
        out.push((off >> 6) as u8);
        out.push((((off & 0x3f) << 2) as u8) | (p.len() >> 8) as u8);
        out.push(p.len() as u8);
    }
    out.push(pt & 0x7f);
    if let Some((_, p)) = previous {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(primary);
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPUS: u8 = 111;

    fn red(previous: Option<(u32, &[u8])>, primary: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_into(&mut v, OPUS, previous, primary);
        v
    }

    #[test]
    fn encode_parse_roundtrip() {
        let data = red(Some((960, b"prev")), b"primary");
        let p = parse(&data).unwrap();
        assert_eq!(
            p.redundant(),
            &[Block {
                pt: OPUS,
                ts_offset: 960,
                payload: b"prev"
            }]
        );
        assert_eq!(p.primary().payload, b"primary");
        assert_eq!(p.primary().pt, OPUS);
        let only = red(None, b"x");
        let p = parse(&only).unwrap();
        assert!(p.redundant().is_empty());
        assert_eq!(p.primary().payload, b"x");
    }

    #[test]
    fn chrome_style_bytes_parse() {
        // One block: PT 111, offset 960 (0x3c0), length 3; primary PT 111 with 2 bytes.
        let data = [0xef, 0x0f, 0x00, 0x03, 0x6f, 1, 2, 3, 9, 9];
        let p = parse(&data).unwrap();
        assert_eq!(p.redundant()[0].ts_offset, 960);
        assert_eq!(p.redundant()[0].payload, &[1, 2, 3]);
        assert_eq!(p.primary().payload, &[9, 9]);
    }

    #[test]
    fn oversized_or_zero_offset_redundancy_is_left_out() {
        let big = vec![0u8; MAX_BLOCK_LEN + 1];
        assert!(parse(&red(Some((960, &big)), b"p"))
            .unwrap()
            .redundant()
            .is_empty());
        assert!(parse(&red(Some((MAX_TS_OFFSET + 1, b"x")), b"p"))
            .unwrap()
            .redundant()
            .is_empty());
        assert!(parse(&red(Some((0, b"x")), b"p"))
            .unwrap()
            .redundant()
            .is_empty());
    }

    #[test]
    fn malformed_payloads_are_errors() {
        assert_eq!(parse(&[]).unwrap_err(), RedError::Truncated);
        assert_eq!(parse(&[0x80, 0, 0]).unwrap_err(), RedError::Truncated);
        assert_eq!(parse(&[0xef, 0x0f, 0x00]).unwrap_err(), RedError::Truncated);
        assert_eq!(
            parse(&[0xef, 0x0f, 0x00, 0x09, 0x6f, 1]).unwrap_err(),
            RedError::LengthPastEnd
        );
        let many: Vec<u8> = std::iter::repeat_n([0xef, 0, 0, 0], MAX_REDUNDANT + 1)
            .flatten()
            .chain([0x6f])
            .collect();
        assert_eq!(parse(&many).unwrap_err(), RedError::TooManyBlocks);
    }

    #[test]
    fn parser_never_panics_on_arbitrary_input() {
        let mut state = 0x1234_5678_u64;
        for n in 0..20_000usize {
            let len = n % 64;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // Mostly F=1 header bytes, so long header chains are exercised.
                    (state >> 56) as u8 | if n % 3 == 0 { 0x80 } else { 0 }
                })
                .collect();
            if let Ok(p) = parse(&data) {
                let total: usize = p.redundant().iter().map(|b| b.payload.len()).sum::<usize>()
                    + p.primary().payload.len()
                    + 4 * p.redundant().len()
                    + 1;
                assert_eq!(total, data.len());
            }
        }
    }

    /// Packets 0..20 with one block of redundancy; `lost` are never received.
    fn stream(lost: &[u16]) -> Vec<(u16, u32, Vec<u8>)> {
        (0..20u16)
            .map(|i| {
                let payload = vec![i as u8; 3];
                let prev = vec![i.wrapping_sub(1) as u8; 3];
                let ts = 5000u32.wrapping_add(960 * u32::from(i));
                let previous = (i > 0).then_some((960, prev.as_slice()));
                (i.wrapping_add(65530), ts, red(previous, &payload))
            })
            .enumerate()
            .filter(|(i, _)| !lost.contains(&(*i as u16)))
            .map(|(_, p)| p)
            .collect()
    }

    #[test]
    fn a_single_loss_is_recovered_with_its_seq_and_ts_across_wrap() {
        let mut rx = RedReceiver::default();
        let mut got = Vec::new();
        for (seq, ts, data) in stream(&[3, 6, 9]) {
            let p = parse(&data).unwrap();
            for r in rx.receive(seq, ts, &p, OPUS).packets() {
                got.push((r.seq, r.ts, r.payload.to_vec()));
            }
            got.push((seq, ts, p.primary().payload.to_vec()));
        }
        let want: Vec<_> = stream(&[])
            .into_iter()
            .map(|(s, t, d)| (s, t, parse(&d).unwrap().primary().payload.to_vec()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_burst_longer_than_the_redundancy_recovers_only_the_last() {
        let mut rx = RedReceiver::default();
        let mut seqs = Vec::new();
        for (seq, ts, data) in stream(&[4, 5]) {
            let p = parse(&data).unwrap();
            seqs.extend(
                rx.receive(seq, ts, &p, OPUS)
                    .packets()
                    .iter()
                    .map(|r| r.seq),
            );
        }
        assert_eq!(seqs, vec![65530u16.wrapping_add(5)]);
    }

    #[test]
    fn late_duplicate_and_foreign_blocks_recover_nothing() {
        let mut rx = RedReceiver::default();
        let s = stream(&[]);
        let (seq, ts, d) = &s[5];
        assert!(rx
            .receive(*seq, *ts, &parse(d).unwrap(), OPUS)
            .packets()
            .is_empty());
        // Late (older) and duplicate packets.
        for (seq, ts, d) in [&s[3], &s[5]] {
            assert!(rx
                .receive(*seq, *ts, &parse(d).unwrap(), OPUS)
                .packets()
                .is_empty());
        }
        // A gap, but the block is of another payload type.
        let (seq, ts, d) = &s[7];
        assert!(rx
            .receive(*seq, *ts, &parse(d).unwrap(), 0)
            .packets()
            .is_empty());
        // A gap whose timestamps do not divide evenly (a new talk spurt): nothing placed.
        let (seq, _, d) = &s[9];
        assert!(rx
            .receive(*seq, 1_000_003, &parse(d).unwrap(), OPUS)
            .packets()
            .is_empty());
    }

    #[test]
    fn a_recovered_packet_arriving_late_is_flagged_once() {
        let mut rx = RedReceiver::default();
        let s = stream(&[]);
        let recv = |rx: &mut RedReceiver, i: usize| {
            let (seq, ts, d) = &s[i];
            let r = rx.receive(*seq, *ts, &parse(d).unwrap(), OPUS);
            (r.packets().len(), r.already_recovered())
        };
        assert_eq!(recv(&mut rx, 3), (0, false));
        // 4 is late: 5 recovers it, then 4 arrives and is flagged, a second copy is not.
        assert_eq!(recv(&mut rx, 5), (1, false));
        assert_eq!(recv(&mut rx, 4), (0, true));
        assert_eq!(recv(&mut rx, 4), (0, false));
        // 5 itself was received, not recovered: a duplicate of it is not flagged.
        assert_eq!(recv(&mut rx, 5), (0, false));
        // Still flagged after the stream moved on (within 63 packets).
        assert_eq!(recv(&mut rx, 8), (1, false));
        assert_eq!(recv(&mut rx, 9), (0, false));
        assert_eq!(recv(&mut rx, 10), (0, false));
        assert_eq!(recv(&mut rx, 7), (0, true));
        assert_eq!(recv(&mut rx, 6), (0, false));
    }

    #[test]
    fn two_levels_fill_two_holes_oldest_first() {
        let mut rx = RedReceiver::default();
        let p0 = red(None, b"a");
        rx.receive(10, 0, &parse(&p0).unwrap(), OPUS);
        // Packet 13 carries 11 (offset 1920) and 12 (offset 960).
        let data = [
            0x80 | OPUS,
            (1920u32 >> 6) as u8,
            ((1920u32 & 0x3f) << 2) as u8,
            1,
            0x80 | OPUS,
            (960u32 >> 6) as u8,
            ((960u32 & 0x3f) << 2) as u8,
            1,
            OPUS,
            b'b',
            b'c',
            b'd',
        ];
        let p = parse(&data).unwrap();
        let r = rx.receive(13, 2880, &p, OPUS);
        assert_eq!(
            r.packets(),
            &[
                Recovered {
                    seq: 11,
                    ts: 960,
                    payload: b"b"
                },
                Recovered {
                    seq: 12,
                    ts: 1920,
                    payload: b"c"
                }
            ]
        );
        assert_eq!(p.primary().payload, b"d");
    }
}
