//! Minimal Ogg reader: splits a single-stream Ogg file (RFC 3533) into packets and extracts the
//! Opus audio packets of an Ogg Opus file (RFC 7845). Page CRCs are not verified.

/// Why an Ogg file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OggError {
    /// A page does not start with `OggS`.
    #[error("bad capture pattern at byte {0}")]
    Capture(usize),
    /// Unsupported stream structure version.
    #[error("unsupported ogg version {0}")]
    Version(u8),
    /// The file ends inside a page.
    #[error("truncated page at byte {0}")]
    Truncated(usize),
    /// The first packets are not `OpusHead` / `OpusTags`.
    #[error("not an Ogg Opus stream")]
    NotOpus,
}

const HEADER_LEN: usize = 27;

/// Every packet of the (first) logical stream, in order. A packet still open at the end of the
/// file is returned as is.
pub fn packets(data: &[u8]) -> Result<Vec<Vec<u8>>, OggError> {
    let mut out = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut serial = None;
    let mut pos = 0;
    while pos < data.len() {
        let header = data
            .get(pos..pos + HEADER_LEN)
            .ok_or(OggError::Truncated(pos))?;
        if &header[..4] != b"OggS" {
            return Err(OggError::Capture(pos));
        }
        if header[4] != 0 {
            return Err(OggError::Version(header[4]));
        }
        let page_serial = u32::from_le_bytes([header[14], header[15], header[16], header[17]]);
        let segments = usize::from(header[26]);
        let table = data
            .get(pos + HEADER_LEN..pos + HEADER_LEN + segments)
            .ok_or(OggError::Truncated(pos))?;
        let body_len: usize = table.iter().map(|&l| usize::from(l)).sum();
        let body_start = pos + HEADER_LEN + segments;
        let body = data
            .get(body_start..body_start + body_len)
            .ok_or(OggError::Truncated(pos))?;
        pos = body_start + body_len;
        if *serial.get_or_insert(page_serial) != page_serial {
            continue; // another logical stream
        }
        let mut at = 0;
        for &lace in table {
            let lace = usize::from(lace);
            current.extend_from_slice(&body[at..at + lace]);
            at += lace;
            if lace < 255 {
                out.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    Ok(out)
}

/// The audio packets of an Ogg Opus file (the `OpusHead` and `OpusTags` headers skipped).
pub fn opus_packets(data: &[u8]) -> Result<Vec<Vec<u8>>, OggError> {
    let mut all = packets(data)?;
    if all.len() < 2 || !all[0].starts_with(b"OpusHead") || !all[1].starts_with(b"OpusTags") {
        return Err(OggError::NotOpus);
    }
    all.drain(..2);
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build one page holding `packets` (each may span several 255-byte lacing values).
    fn page(serial: u32, packets: &[&[u8]], continued_tail: Option<&[u8]>) -> Vec<u8> {
        let mut table = Vec::new();
        let mut body = Vec::new();
        for p in packets {
            let mut n = p.len();
            while n >= 255 {
                table.push(255u8);
                n -= 255;
            }
            table.push(n as u8);
            body.extend_from_slice(p);
        }
        if let Some(t) = continued_tail {
            // An unterminated packet: only full 255-byte segments.
            assert_eq!(t.len() % 255, 0);
            table.extend(std::iter::repeat_n(255u8, t.len() / 255));
            body.extend_from_slice(t);
        }
        let mut out = b"OggS".to_vec();
        out.push(0);
        out.push(0);
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&serial.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.push(table.len() as u8);
        out.extend(table);
        out.extend(body);
        out
    }

    #[test]
    fn splits_packets_across_lacing_and_pages() {
        let big = vec![7u8; 600];
        let mut file = page(1, &[b"OpusHead-xx", b"OpusTags"], None);
        file.extend(page(1, &[b"a", &big], Some(&[9u8; 255])));
        file.extend(page(2, &[b"other stream"], None));
        file.extend(page(1, &[b"tail", b""], None));
        let p = packets(&file).unwrap();
        assert_eq!(p.len(), 6);
        assert_eq!(p[2], b"a");
        assert_eq!(p[3], big);
        let mut spanning = vec![9u8; 255];
        spanning.extend_from_slice(b"tail");
        assert_eq!(p[4], spanning);
        assert!(p[5].is_empty());
        let audio = opus_packets(&file).unwrap();
        assert_eq!(audio.len(), 4);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert_eq!(packets(b"NotS").unwrap_err(), OggError::Truncated(0));
        let mut bad = page(1, &[b"x"], None);
        bad[0] = b'X';
        assert_eq!(packets(&bad).unwrap_err(), OggError::Capture(0));
        let good = page(1, &[b"xyz"], None);
        assert_eq!(
            packets(&good[..good.len() - 1]).unwrap_err(),
            OggError::Truncated(0)
        );
        assert_eq!(opus_packets(&good).unwrap_err(), OggError::NotOpus);
        let mut v = good.clone();
        v[4] = 1;
        assert_eq!(packets(&v).unwrap_err(), OggError::Version(1));
    }
}
