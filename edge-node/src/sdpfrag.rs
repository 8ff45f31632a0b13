//! Trickle ICE and ICE restart over WHIP/WHEP `PATCH` (RFC 9725 §4.4, RFC 8840 fragments).
//!
//! Sans-IO: parse the client's `application/trickle-ice-sdpfrag` body, turn an ICE restart into a
//! full offer str0m can accept (the session's previous offer with the new credentials), and cut
//! the answer down to the fragment the client expects back.

/// Largest fragment body accepted.
pub const MAX_FRAGMENT_LEN: usize = 16 * 1024;
/// Longest ICE ufrag or password accepted (RFC 8839 allows 256 characters).
const MAX_CREDENTIAL_LEN: usize = 256;

/// The parts of a client fragment the edge acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceFragment {
    /// `a=ice-ufrag` and `a=ice-pwd`, when the fragment restarts ICE.
    pub credentials: Option<(String, String)>,
    /// Number of `a=candidate` lines (an ICE-lite edge learns addresses from the checks).
    pub candidates: usize,
}

/// Why a fragment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// The body is larger than [`MAX_FRAGMENT_LEN`].
    #[error("the fragment is larger than {MAX_FRAGMENT_LEN} bytes")]
    TooLarge,
    /// The body is not UTF-8 text.
    #[error("the fragment is not UTF-8 text")]
    NotText,
    /// A line is not an SDP `type=value` line.
    #[error("line {0} is not an SDP line")]
    BadLine(usize),
    /// Only one of `a=ice-ufrag` and `a=ice-pwd`, or an invalid value.
    #[error("an ICE restart needs one valid a=ice-ufrag and a=ice-pwd")]
    BadCredentials,
}

fn ice_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '+' || c == '/'
}

fn credential(value: &str, min: usize) -> Result<String, FragmentError> {
    let v = value.trim();
    if v.len() < min || v.len() > MAX_CREDENTIAL_LEN || !v.chars().all(ice_char) {
        return Err(FragmentError::BadCredentials);
    }
    Ok(v.to_string())
}

/// Parse a trickle-ice-sdpfrag body.
pub fn parse_fragment(body: &[u8]) -> Result<IceFragment, FragmentError> {
    if body.len() > MAX_FRAGMENT_LEN {
        return Err(FragmentError::TooLarge);
    }
    let text = std::str::from_utf8(body).map_err(|_| FragmentError::NotText)?;
    let (mut ufrag, mut pwd, mut candidates) = (None, None, 0);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let bytes = line.as_bytes();
        if bytes.len() < 2 || bytes[1] != b'=' || !bytes[0].is_ascii_lowercase() {
            return Err(FragmentError::BadLine(n + 1));
        }
        if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
            if ufrag.replace(credential(v, 4)?).is_some() {
                return Err(FragmentError::BadCredentials);
            }
        } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
            if pwd.replace(credential(v, 22)?).is_some() {
                return Err(FragmentError::BadCredentials);
            }
        } else if line.starts_with("a=candidate:") {
            candidates += 1;
        }
    }
    let credentials = match (ufrag, pwd) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => return Err(FragmentError::BadCredentials),
    };
    Ok(IceFragment {
        credentials,
        candidates,
    })
}

/// The session's previous offer with every `a=ice-ufrag` / `a=ice-pwd` replaced: accepting it
/// makes str0m restart ICE with fresh local credentials, exactly as a full re-offer would.
pub fn restart_offer(previous_offer: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(previous_offer.len() + 64);
    for line in previous_offer.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("a=ice-ufrag:") {
            out.push_str("a=ice-ufrag:");
            out.push_str(ufrag);
        } else if line.starts_with("a=ice-pwd:") {
            out.push_str("a=ice-pwd:");
            out.push_str(pwd);
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

/// The fragment answering an ICE restart, cut from the full SDP answer: `a=ice-lite`, the new
/// `a=ice-ufrag` / `a=ice-pwd`, then the first media section's `m=` and `a=mid` lines with the
/// candidates and `a=end-of-candidates` (the layout of RFC 9725's example).
pub fn answer_fragment(answer: &str) -> String {
    let mut head = String::new();
    let mut media = String::new();
    let (mut in_first_media, mut seen_media) = (false, false);
    for line in answer.lines().map(|l| l.trim_end_matches('\r')) {
        if line.starts_with("m=") {
            in_first_media = !seen_media;
            seen_media = true;
            if in_first_media {
                media.push_str(line);
                media.push_str("\r\n");
            }
            continue;
        }
        let ice = line == "a=ice-lite"
            || line.starts_with("a=ice-ufrag:")
            || line.starts_with("a=ice-pwd:");
        if ice && !head.contains(line.split(':').next().unwrap_or(line)) {
            head.push_str(line);
            head.push_str("\r\n");
        } else if in_first_media
            && (line.starts_with("a=mid:")
                || line.starts_with("a=candidate:")
                || line == "a=end-of-candidates")
        {
            media.push_str(line);
            media.push_str("\r\n");
        }
    }
    if !media.is_empty() && !media.contains("a=end-of-candidates") {
        media.push_str("a=end-of-candidates\r\n");
    }
    head + &media
}

#[cfg(test)]
mod tests {
    use super::*;

    const PWD: &str = "0b66f472495ef0ccac7bda1f7e6f14b1";

    #[test]
    fn restart_fragments_carry_credentials() {
        let body = format!(
            "a=ice-ufrag:EsAw\r\na=ice-pwd:{PWD}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host\r\na=end-of-candidates\r\n"
        );
        let f = parse_fragment(body.as_bytes()).unwrap();
        assert_eq!(f.credentials, Some(("EsAw".into(), PWD.into())));
        assert_eq!(f.candidates, 1);
    }

    #[test]
    fn trickle_fragments_have_no_credentials() {
        let f = parse_fragment(b"a=candidate:1 1 udp 1 192.0.2.1 5000 typ host\r\n").unwrap();
        assert_eq!(f.credentials, None);
        assert_eq!(f.candidates, 1);
        assert_eq!(parse_fragment(b"").unwrap().candidates, 0);
    }

    #[test]
    fn bad_fragments_are_errors() {
        assert_eq!(
            parse_fragment(b"a=ice-ufrag:abcd\r\n"),
            Err(FragmentError::BadCredentials)
        );
        assert_eq!(
            parse_fragment(format!("a=ice-ufrag:ab\r\na=ice-pwd:{PWD}").as_bytes()),
            Err(FragmentError::BadCredentials)
        );
        assert_eq!(
            parse_fragment(format!("a=ice-ufrag:ab;d\r\na=ice-pwd:{PWD}").as_bytes()),
            Err(FragmentError::BadCredentials)
        );
        assert_eq!(parse_fragment(b"hello\r\n"), Err(FragmentError::BadLine(1)));
        assert_eq!(parse_fragment(&[0xff, 0xfe]), Err(FragmentError::NotText));
        assert_eq!(
            parse_fragment(&vec![b'a'; MAX_FRAGMENT_LEN + 1]),
            Err(FragmentError::TooLarge)
        );
    }

    #[test]
    fn restart_offer_replaces_every_credential_line() {
        let offer = "v=0\r\na=ice-ufrag:old1\r\na=ice-pwd:oldpwd\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:old1\r\na=ice-pwd:oldpwd\r\na=mid:0\r\n";
        let new = restart_offer(offer, "new1", PWD);
        assert_eq!(new.matches("a=ice-ufrag:new1\r\n").count(), 2);
        assert_eq!(new.matches(&format!("a=ice-pwd:{PWD}\r\n")).count(), 2);
        assert!(!new.contains("old"));
        assert!(new.contains("a=mid:0\r\n"));
    }

    #[test]
    fn answer_fragment_keeps_ice_lines_of_the_first_media_section() {
        let answer = "v=0\r\na=ice-lite\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=ice-ufrag:NEW1\r\na=ice-pwd:pwpwpwpwpwpwpwpwpwpwpw\r\na=candidate:1 1 udp 2130706431 127.0.0.1 8201 typ host\r\na=rtpmap:111 opus/48000/2\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=ice-ufrag:NEW1\r\na=candidate:1 1 udp 2130706431 127.0.0.1 8201 typ host\r\n";
        let frag = answer_fragment(answer);
        assert_eq!(
            frag,
            "a=ice-lite\r\na=ice-ufrag:NEW1\r\na=ice-pwd:pwpwpwpwpwpwpwpwpwpwpw\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 8201 typ host\r\na=end-of-candidates\r\n"
        );
        let parsed = parse_fragment(frag.as_bytes()).unwrap();
        assert_eq!(parsed.credentials.unwrap().0, "NEW1");
    }
}
