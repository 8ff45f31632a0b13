//! Validation of SDP offers: WHIP offers must send Opus audio; WHEP and WebSocket offers are
//! summarized into receive slots and whether they send.

use amphi_protocol::room::LISTENER_AUDIO_SLOTS;
use str0m::change::SdpOffer;
use str0m::format::Codec;
use str0m::media::{Direction, Mid};

/// Largest accepted WHIP request body (64 KiB).
pub const MAX_OFFER_LEN: usize = 64 * 1024;

/// Why a WHIP offer was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OfferError {
    /// Larger than [`MAX_OFFER_LEN`].
    #[error("offer of {0} bytes exceeds the {MAX_OFFER_LEN}-byte limit")]
    TooLarge(usize),
    /// Not UTF-8 or not parseable as SDP.
    #[error("body is not a valid SDP offer: {0}")]
    BadSdp(String),
    /// Parseable, but no m-line sends Opus audio because the only codecs offered are others.
    #[error("{0}")]
    UnsupportedCodec(String),
    /// An Opus m-line exists but none of them sends (recvonly or inactive).
    #[error("the offer does not send audio (direction must be sendonly or sendrecv)")]
    NotSending,
}

impl OfferError {
    /// The HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        match self {
            OfferError::TooLarge(_) => 413,
            OfferError::BadSdp(_) | OfferError::NotSending => 400,
            OfferError::UnsupportedCodec(_) => 406,
        }
    }

    /// The machine-readable `ApiError` code.
    pub fn code(&self) -> &'static str {
        match self {
            OfferError::TooLarge(_) => "payload_too_large",
            OfferError::BadSdp(_) | OfferError::NotSending => "bad_sdp",
            OfferError::UnsupportedCodec(_) => "unsupported_codec",
        }
    }
}

/// Parse SDP text. The parser's own error text names internal pointers
/// (`Parse error at PointerOffset(0x7f…)`): the client gets a fixed message, the detail goes to
/// the debug log.
fn parse_sdp(text: &str) -> Result<SdpOffer, OfferError> {
    SdpOffer::from_sdp_string(text).map_err(|e| {
        tracing::debug!(error = %e, "unparseable SDP offer");
        OfferError::BadSdp("the SDP could not be parsed".into())
    })
}

/// Parse and check a WHIP request body: UTF-8 SDP, at least one enabled m-line that offers Opus
/// and sends (sendonly or sendrecv).
///
/// Never panics, whatever the input; called by the fuzz targets.
pub fn parse_whip_offer(body: &[u8]) -> Result<SdpOffer, OfferError> {
    if body.len() > MAX_OFFER_LEN {
        return Err(OfferError::TooLarge(body.len()));
    }
    let text = std::str::from_utf8(body).map_err(|_| OfferError::BadSdp("not UTF-8".into()))?;
    if text.trim().is_empty() {
        return Err(OfferError::BadSdp("empty body".into()));
    }
    let offer = parse_sdp(text)?;
    if offer.media_lines.is_empty() {
        return Err(OfferError::BadSdp("no m-lines".into()));
    }
    let mut opus_lines = 0usize;
    let mut other_audio: Vec<String> = Vec::new();
    let mut video = false;
    for line in offer.media_lines.iter().filter(|l| !l.disabled) {
        let params = line.rtp_params();
        let has_opus = params.iter().any(|p| p.spec().codec == Codec::Opus);
        if has_opus {
            opus_lines += 1;
            if matches!(line.direction(), Direction::SendOnly | Direction::SendRecv) {
                return Ok(offer);
            }
            continue;
        }
        for p in &params {
            let codec = p.spec().codec;
            if codec.is_audio() {
                let name = codec.to_string();
                if !other_audio.contains(&name) {
                    other_audio.push(name);
                }
            } else if codec.is_video() {
                video = true;
            }
        }
    }
    if opus_lines > 0 {
        return Err(OfferError::NotSending);
    }
    let found = if !other_audio.is_empty() {
        format!("audio codecs offered: {}", other_audio.join(", "))
    } else if video {
        "only video was offered".to_string()
    } else {
        "no usable audio m-line".to_string()
    };
    Err(OfferError::UnsupportedCodec(format!(
        "amphi accepts Opus audio only (48 kHz, RFC 7587); {found}"
    )))
}

/// What a client (WHEP or WebSocket) offer asks for.
#[derive(Debug)]
pub struct ClientOffer {
    /// The parsed offer.
    pub offer: SdpOffer,
    /// Whether an Opus audio m-line sends (sendonly or sendrecv): the client wants to publish.
    pub sends_audio: bool,
    /// Mids of the recvonly Opus audio m-lines, the listener slots (at most
    /// [`LISTENER_AUDIO_SLOTS`]; extra ones get no audio).
    pub slots: Vec<Mid>,
}

/// Parse a WHEP or WebSocket `offer` SDP: UTF-8, at most [`MAX_OFFER_LEN`], at least one enabled
/// Opus audio m-line.
///
/// Never panics, whatever the input; called by the fuzz targets.
pub fn parse_client_offer(body: &[u8]) -> Result<ClientOffer, OfferError> {
    if body.len() > MAX_OFFER_LEN {
        return Err(OfferError::TooLarge(body.len()));
    }
    let text = std::str::from_utf8(body).map_err(|_| OfferError::BadSdp("not UTF-8".into()))?;
    if text.trim().is_empty() {
        return Err(OfferError::BadSdp("empty body".into()));
    }
    let offer = parse_sdp(text)?;
    let mut sends_audio = false;
    let mut slots = Vec::new();
    let mut opus_lines = 0usize;
    for line in offer.media_lines.iter().filter(|l| !l.disabled) {
        let has_opus = line
            .rtp_params()
            .iter()
            .any(|p| p.spec().codec == Codec::Opus);
        if !has_opus {
            continue;
        }
        opus_lines += 1;
        match line.direction() {
            Direction::SendOnly | Direction::SendRecv => sends_audio = true,
            Direction::RecvOnly => {
                if slots.len() < LISTENER_AUDIO_SLOTS {
                    slots.push(line.mid());
                }
            }
            Direction::Inactive => {}
        }
    }
    if opus_lines == 0 {
        return Err(OfferError::UnsupportedCodec(
            "amphi accepts Opus audio only (48 kHz, RFC 7587); no Opus audio m-line".into(),
        ));
    }
    Ok(ClientOffer {
        offer,
        sends_audio,
        slots,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal browser-like offer with one audio m-line using `rtpmaps` and `dir`.
    pub(crate) fn offer_sdp(mline: &str, rtpmaps: &str, dir: &str) -> String {
        format!(
            "v=0\r\n\
             o=- 1 2 IN IP4 127.0.0.1\r\n\
             s=-\r\n\
             t=0 0\r\n\
             a=group:BUNDLE 0\r\n\
             a=fingerprint:sha-256 6B:8B:5D:EA:59:04:20:23:29:C8:87:1C:CC:87:32:BE:DD:8C:66:A5:8E:50:55:EA:8C:D3:B6:5C:09:5E:D6:BC\r\n\
             a=ice-ufrag:abcd\r\n\
             a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
             {mline}\r\n\
             c=IN IP4 0.0.0.0\r\n\
             a=rtcp:9 IN IP4 0.0.0.0\r\n\
             a=mid:0\r\n\
             a=setup:actpass\r\n\
             a=rtcp-mux\r\n\
             a={dir}\r\n\
             {rtpmaps}"
        )
    }

    pub(crate) fn opus_offer() -> String {
        offer_sdp(
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n",
            "sendonly",
        )
    }

    #[test]
    fn accepts_opus_sendonly_and_sendrecv() {
        assert!(parse_whip_offer(opus_offer().as_bytes()).is_ok());
        let sendrecv = opus_offer().replace("a=sendonly", "a=sendrecv");
        assert!(parse_whip_offer(sendrecv.as_bytes()).is_ok());
    }

    #[test]
    fn refuses_pcmu_only_and_video_only_with_406() {
        let pcmu = offer_sdp(
            "m=audio 9 UDP/TLS/RTP/SAVPF 0",
            "a=rtpmap:0 PCMU/8000\r\n",
            "sendonly",
        );
        let e = parse_whip_offer(pcmu.as_bytes()).unwrap_err();
        assert_eq!(e.status(), 406);
        assert_eq!(e.code(), "unsupported_codec");
        assert!(e.to_string().contains("Opus"), "{e}");
        assert!(e.to_string().to_lowercase().contains("pcmu"), "{e}");
        let video = offer_sdp(
            "m=video 9 UDP/TLS/RTP/SAVPF 96",
            "a=rtpmap:96 VP8/90000\r\n",
            "sendonly",
        );
        let e = parse_whip_offer(video.as_bytes()).unwrap_err();
        assert_eq!(e.status(), 406);
        assert!(e.to_string().contains("video"), "{e}");
    }

    #[test]
    fn refuses_recvonly_opus() {
        let recv = opus_offer().replace("a=sendonly", "a=recvonly");
        assert_eq!(
            parse_whip_offer(recv.as_bytes()),
            Err(OfferError::NotSending)
        );
    }

    #[test]
    fn refuses_garbage_empty_non_utf8_and_huge() {
        for body in [
            &b""[..],
            b"   ",
            b"hello world",
            b"\xff\xfe\x00",
            b"v=0\r\n",
        ] {
            let e = parse_whip_offer(body).unwrap_err();
            assert_eq!(e.status(), 400, "{body:?}: {e}");
            assert_eq!(e.code(), "bad_sdp");
        }
        // Parser failures answer without the parser's internals (pointer offsets).
        for body in [&b"hello world"[..], b"v=0\r\n", b"v=0\r\nm=audio x\r\n"] {
            for e in [
                parse_whip_offer(body).unwrap_err(),
                parse_client_offer(body).unwrap_err(),
            ] {
                let text = e.to_string();
                assert!(
                    !text.contains("PointerOffset") && !text.contains("0x"),
                    "{text}"
                );
            }
        }
        let huge = vec![b'a'; MAX_OFFER_LEN + 1];
        assert_eq!(parse_whip_offer(&huge).unwrap_err().status(), 413);
    }

    #[test]
    fn never_panics_on_truncations_of_a_valid_offer() {
        let o = opus_offer();
        for n in 0..o.len() {
            let _ = parse_whip_offer(&o.as_bytes()[..n]);
            let _ = parse_client_offer(&o.as_bytes()[..n]);
        }
    }

    #[test]
    fn client_offers_are_summarized() {
        let send = parse_client_offer(opus_offer().as_bytes()).unwrap();
        assert!(send.sends_audio);
        assert!(send.slots.is_empty());
        let recv = opus_offer().replace("a=sendonly", "a=recvonly");
        let recv = parse_client_offer(recv.as_bytes()).unwrap();
        assert!(!recv.sends_audio);
        assert_eq!(recv.slots.len(), 1);
        let pcmu = offer_sdp(
            "m=audio 9 UDP/TLS/RTP/SAVPF 0",
            "a=rtpmap:0 PCMU/8000\r\n",
            "recvonly",
        );
        assert_eq!(
            parse_client_offer(pcmu.as_bytes()).unwrap_err().status(),
            406
        );
        assert_eq!(parse_client_offer(b"nope").unwrap_err().status(), 400);
    }
}
