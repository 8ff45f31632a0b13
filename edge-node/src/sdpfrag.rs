//! Trickle ICE and ICE restart over WHIP/WHEP `PATCH` (RFC 9725 §4.3, RFC 8840 fragments), and
//! the RFC 9725 fix-ups of the SDP answer to a WHIP/WHEP `POST`.
//!
//! Sans-IO: parse the client's `application/trickle-ice-sdpfrag` body, decide whether a `PATCH`
//! trickles candidates or restarts ICE ([`decide_patch`]), turn an ICE restart into a full offer
//! str0m can accept (the session's previous offer with the new credentials), cut the answer down
//! to the fragment the client expects back, and adjust str0m's answer text ([`http_answer`]).

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

/// The client's current ICE credentials: the first `a=ice-ufrag` / `a=ice-pwd` of its (latest)
/// offer, session or media level.
pub fn offer_credentials(offer: &str) -> Option<(String, String)> {
    let (mut ufrag, mut pwd) = (None, None);
    for line in offer.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
            ufrag.get_or_insert_with(|| v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
            pwd.get_or_insert_with(|| v.trim().to_string());
        }
    }
    Some((ufrag?, pwd?))
}

/// Whether an `If-Match` field value (RFC 9110 §13.1.1) names `etag` (`"…"`, strong comparison)
/// or is `*`.
pub fn if_match_satisfied(if_match: &str, etag: &str) -> bool {
    let v = if_match.trim();
    v == "*" || v.split(',').any(|tag| tag.trim() == etag)
}

/// What a `PATCH` on a WHIP/WHEP session does (RFC 9725 §4.3.1, §4.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchDecision {
    /// No `If-Match`: 428 Precondition Required.
    PreconditionRequired,
    /// `If-Match` names another ICE session: 412 Precondition Failed.
    PreconditionFailed,
    /// Candidates for the current ICE session (no credentials, or the client's current ones):
    /// 204 No Content, ICE untouched.
    Trickle,
    /// New client credentials: restart ICE with them.
    Restart {
        /// The client's new `ice-ufrag`.
        ufrag: String,
        /// The client's new `ice-pwd`.
        pwd: String,
    },
}

/// Decide a `PATCH`: `if_match` is the request's header, `etag` the session's current entity-tag
/// (quoted), `current` the client's credentials in the session's offer. RFC 8840 fragments repeat
/// the current `ice-ufrag`/`ice-pwd`, so only credentials that differ restart ICE.
pub fn decide_patch(
    if_match: Option<&str>,
    etag: &str,
    fragment: &IceFragment,
    current: Option<(&str, &str)>,
) -> PatchDecision {
    let Some(if_match) = if_match else {
        return PatchDecision::PreconditionRequired;
    };
    if !if_match_satisfied(if_match, etag) {
        return PatchDecision::PreconditionFailed;
    }
    match &fragment.credentials {
        Some((u, p)) if current != Some((u.as_str(), p.as_str())) => PatchDecision::Restart {
            ufrag: u.clone(),
            pwd: p.clone(),
        },
        _ => PatchDecision::Trickle,
    }
}

/// str0m's answer to a WHIP (`publisher`) or WHEP offer, fixed up for RFC 9725:
///
/// - a WHIP answer is `recvonly` in every audio section, also when the client offered
///   `sendrecv` (the edge never sends media to a WHIP publisher; str0m mirrors the direction),
///   and asks the publisher for discontinuous transmission (`usedtx=1` in every Opus `a=fmtp`
///   line, RFC 7587 §6.1): in silence a browser then sends a packet every ~400 ms instead of 50
///   per second, and the edge, the relay and the mixer carry and decode next to nothing for a
///   speaker who is not talking;
/// - every bundled section that multiplexes RTCP carries `a=rtcp-mux-only` (RFC 9725 §4.5.1 asks
///   the endpoint for it; RFC 8858 §4.3 alone would forbid it in an answer, the WHIP/WHEP rule is
///   the more specific one). str0m never writes it.
pub fn http_answer(answer: &str, publisher: bool) -> String {
    let bundled: Vec<&str> = answer
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find_map(|l| l.strip_prefix("a=group:BUNDLE "))
        .map(|g| g.split_whitespace().collect())
        .unwrap_or_default();
    // Sections as (lines, mid): the session part first.
    let mut sections: Vec<Vec<&str>> = vec![Vec::new()];
    for line in answer.lines().map(|l| l.trim_end_matches('\r')) {
        if line.starts_with("m=") {
            sections.push(Vec::new());
        }
        if let Some(s) = sections.last_mut() {
            s.push(line);
        }
    }
    let opus = opus_payload_types(answer);
    let mut out = String::with_capacity(answer.len() + 64);
    for (k, section) in sections.iter().enumerate() {
        let media = k > 0;
        let audio = section.first().is_some_and(|l| l.starts_with("m=audio"));
        let in_bundle = section
            .iter()
            .find_map(|l| l.strip_prefix("a=mid:"))
            .is_some_and(|mid| bundled.contains(&mid.trim()));
        let has_mux_only = section.contains(&"a=rtcp-mux-only");
        for &line in section {
            let line = if media && publisher && audio && line == "a=sendrecv" {
                "a=recvonly"
            } else {
                line
            };
            out.push_str(line);
            if media && publisher && audio && wants_dtx(line, &opus) {
                out.push_str(";usedtx=1");
            }
            out.push_str("\r\n");
            if media && in_bundle && !has_mux_only && line == "a=rtcp-mux" {
                out.push_str("a=rtcp-mux-only\r\n");
            }
        }
    }
    out
}

/// The payload types an SDP maps to Opus (`a=rtpmap:<pt> opus/48000/2`).
fn opus_payload_types(sdp: &str) -> Vec<&str> {
    sdp.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("a=rtpmap:"))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, codec)| codec.to_ascii_lowercase().starts_with("opus/"))
        .map(|(pt, _)| pt)
        .collect()
}

/// Whether `line` is the `a=fmtp` line of an Opus payload type in `opus` that does not yet say
/// `usedtx`.
fn wants_dtx(line: &str, opus: &[&str]) -> bool {
    line.strip_prefix("a=fmtp:")
        .and_then(|l| l.split_once(' '))
        .is_some_and(|(pt, params)| opus.contains(&pt) && !params.contains("usedtx"))
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

    fn frag(creds: Option<(&str, &str)>) -> IceFragment {
        IceFragment {
            credentials: creds.map(|(u, p)| (u.to_string(), p.to_string())),
            candidates: 1,
        }
    }

    #[test]
    fn patch_decisions_follow_rfc_9725() {
        let etag = "\"e1\"";
        let cur = Some(("EsAw", PWD));
        // No If-Match: 428, whatever the body.
        assert_eq!(
            decide_patch(None, etag, &frag(None), cur),
            PatchDecision::PreconditionRequired
        );
        assert_eq!(
            decide_patch(None, etag, &frag(Some(("new1", PWD))), cur),
            PatchDecision::PreconditionRequired
        );
        // A stale or weak tag: 412.
        for stale in ["\"e0\"", "W/\"e1\"", "e1", ""] {
            assert_eq!(
                decide_patch(Some(stale), etag, &frag(None), cur),
                PatchDecision::PreconditionFailed,
                "{stale}"
            );
        }
        // The current tag (alone or in a list) or *: candidates only, or the current
        // credentials repeated (RFC 8840), trickle.
        for tag in [etag, "*", "\"x\", \"e1\""] {
            assert_eq!(
                decide_patch(Some(tag), etag, &frag(None), cur),
                PatchDecision::Trickle
            );
            assert_eq!(
                decide_patch(Some(tag), etag, &frag(Some(("EsAw", PWD))), cur),
                PatchDecision::Trickle
            );
        }
        // New credentials (either half) restart.
        assert_eq!(
            decide_patch(Some("*"), etag, &frag(Some(("new1", PWD))), cur),
            PatchDecision::Restart {
                ufrag: "new1".into(),
                pwd: PWD.into()
            }
        );
        assert!(matches!(
            decide_patch(
                Some(etag),
                etag,
                &frag(Some(("EsAw", "otherpwdotherpwdotherpwd"))),
                cur
            ),
            PatchDecision::Restart { .. }
        ));
        // Unknown current credentials: any credentials restart.
        assert!(matches!(
            decide_patch(Some("*"), etag, &frag(Some(("EsAw", PWD))), None),
            PatchDecision::Restart { .. }
        ));
    }

    #[test]
    fn offer_credentials_are_the_first_ones() {
        let offer = format!("v=0\r\na=ice-ufrag:EsAw\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-pwd:{PWD}\r\na=ice-ufrag:late\r\n");
        assert_eq!(
            offer_credentials(&offer),
            Some(("EsAw".to_string(), PWD.to_string()))
        );
        assert_eq!(offer_credentials("v=0\r\na=ice-ufrag:EsAw\r\n"), None);
    }

    const ANSWER: &str = "v=0\r\na=group:BUNDLE 0 1\r\na=ice-lite\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=sendonly\r\na=rtcp-mux\r\nm=audio 0 UDP/TLS/RTP/SAVPF 0\r\na=mid:2\r\na=inactive\r\na=rtcp-mux\r\n";

    #[test]
    fn whip_answers_are_recvonly_and_rtcp_mux_only() {
        let a = http_answer(ANSWER, true);
        assert_eq!(
            a,
            "v=0\r\na=group:BUNDLE 0 1\r\na=ice-lite\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=recvonly\r\na=rtcp-mux\r\na=rtcp-mux-only\r\na=rtpmap:111 opus/48000/2\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=sendonly\r\na=rtcp-mux\r\na=rtcp-mux-only\r\nm=audio 0 UDP/TLS/RTP/SAVPF 0\r\na=mid:2\r\na=inactive\r\na=rtcp-mux\r\n"
        );
        // Idempotent; a WHEP answer keeps its directions.
        assert_eq!(http_answer(&a, true), a);
        let whep = http_answer(ANSWER, false);
        assert!(whep.contains("a=mid:0\r\na=sendrecv\r\na=rtcp-mux\r\na=rtcp-mux-only\r\n"));
        assert_eq!(whep.matches("a=rtcp-mux-only").count(), 2);
    }

    #[test]
    fn whip_answers_ask_for_opus_dtx_and_whep_answers_do_not() {
        let answer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111 63\r\na=mid:0\r\na=sendrecv\r\na=rtpmap:111 OPUS/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\na=rtpmap:63 red/48000/2\r\na=fmtp:63 111/111\r\n";
        let whip = http_answer(answer, true);
        assert!(
            whip.contains("a=fmtp:111 minptime=10;useinbandfec=1;usedtx=1\r\n"),
            "{whip}"
        );
        assert!(
            whip.contains("a=fmtp:63 111/111\r\n"),
            "RED's fmtp is left alone: {whip}"
        );
        assert_eq!(http_answer(&whip, true), whip, "idempotent");
        assert!(!http_answer(answer, false).contains("usedtx"));
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
