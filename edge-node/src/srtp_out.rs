//! The forwarding fast path's own RTP packetization and SRTP protection (RFC 3550, RFC 3711,
//! RFC 7714), sans-IO: a forwarded Opus packet is written as one SRTP datagram straight into a
//! reused buffer, without str0m's per-packet pipeline (send queue, pacer, a timeout run that walks
//! ICE, DTLS, SCTP and every stream of the peer, and an allocation per datagram).
//!
//! The session keys come from the DTLS-SRTP keying material our DTLS provider exported
//! ([`crate::dtls::take_exported_keying`]); they are derived here exactly as str0m derives its own
//! (AES-CM key derivation of RFC 3711 §4.3 with str0m's crypto provider), so the receiver cannot
//! tell which of the two protected a packet. AEAD_AES_128_GCM packets are sealed with `ring`
//! (already linked through quinn and rustls): timed inside the edge's fan-out to 200 listeners,
//! one protected ~100-byte packet took ~0.39 µs with it against ~0.9 µs through str0m's aws-lc
//! cipher. AES128_CM_SHA1_80 stays on str0m's provider. The SRTP index of a packet is its
//! extended sequence number, which the media core keeps per listener stream starting at 1
//! (rollover counter 0), so a late joiner's receiver never has to guess a rollover counter (the
//! trap of str0m PR #1036).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use str0m::crypto::dtls::SrtpProfile;
use str0m::crypto::{
    AeadAes128Gcm, Aes128CmSha1_80, Aes128CmSha1_80Cipher, CryptoProvider, Sha1HmacProvider,
};

/// RFC 3711 §4.3.1 key derivation labels (SRTP).
const LABEL_RTP_ENCRYPTION: u8 = 0;
const LABEL_RTP_AUTHENTICATION: u8 = 1;
const LABEL_RTP_SALT: u8 = 2;
/// Scratch the AES-CM cipher may write past the ciphertext (one AES block less one byte).
const CTR_SCRATCH: usize = 15;

/// Protects one peer's outgoing RTP: its SRTP sender context.
pub(crate) struct SrtpSender {
    cipher: Cipher,
}

// The AES-GCM key stays inline: in the peer, next to the other fields the fan-out reads for each
// listener, rather than behind one more pointer to chase per packet.
#[allow(clippy::large_enum_variant)]
enum Cipher {
    Gcm128 {
        salt: [u8; AeadAes128Gcm::SALT_LEN],
        key: LessSafeKey,
    },
    CmSha1_80 {
        salt: [u8; Aes128CmSha1_80::SALT_LEN],
        auth: [u8; Aes128CmSha1_80::HMAC_KEY_LEN],
        enc: Box<dyn Aes128CmSha1_80Cipher>,
        hmac: &'static dyn Sha1HmacProvider,
    },
}

impl std::fmt::Debug for SrtpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let profile = match self.cipher {
            Cipher::Gcm128 { .. } => "AEAD_AES_128_GCM",
            Cipher::CmSha1_80 { .. } => "AES128_CM_SHA1_80",
        };
        f.debug_struct("SrtpSender")
            .field("profile", &profile)
            .finish_non_exhaustive()
    }
}

/// The master key and salt of one direction out of the DTLS-SRTP keying material, laid out
/// `[client key, server key, client salt, server salt]` (RFC 5764 §4.2); the DTLS client
/// (`active`) sends with the client's.
fn master<const K: usize, const S: usize>(
    material: &[u8],
    active: bool,
) -> Option<([u8; K], [u8; S])> {
    if material.len() != 2 * K + 2 * S {
        return None;
    }
    let (k, s) = if active { (0, 2 * K) } else { (K, 2 * K + S) };
    let mut key = [0; K];
    let mut salt = [0; S];
    key.copy_from_slice(&material[k..k + K]);
    salt.copy_from_slice(&material[s..s + S]);
    Some((key, salt))
}

/// RFC 3711 §4.3.3 AES-CM key derivation (key derivation rate 0) of `label` into `out`.
fn derive(provider: &CryptoProvider, key: &[u8; 16], salt: &[u8], label: u8, out: &mut [u8]) {
    let mut input = [0u8; 16];
    input[..salt.len()].copy_from_slice(salt);
    input[7] ^= label;
    let mut block = [0u8; 32];
    for (round, chunk) in out.chunks_mut(16).enumerate() {
        input[14..].copy_from_slice(&(round as u16).to_be_bytes());
        provider
            .srtp_provider
            .srtp_aes_128_ecb_round(key, &input, &mut block);
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

impl SrtpSender {
    /// The sender context for `profile` from the DTLS keying material, as the DTLS client
    /// (`active`) or server; `None` for a profile the fast path does not implement
    /// (AEAD_AES_256_GCM: str0m then protects that peer's packets itself).
    pub(crate) fn new(
        provider: &CryptoProvider,
        profile: SrtpProfile,
        material: &[u8],
        active: bool,
    ) -> Option<SrtpSender> {
        let cipher = match profile {
            SrtpProfile::AEAD_AES_128_GCM => {
                let (key, master_salt) = master::<16, 12>(material, active)?;
                let mut session_key = [0u8; 16];
                derive(
                    provider,
                    &key,
                    &master_salt,
                    LABEL_RTP_ENCRYPTION,
                    &mut session_key,
                );
                let mut salt = [0u8; 12];
                derive(provider, &key, &master_salt, LABEL_RTP_SALT, &mut salt);
                Cipher::Gcm128 {
                    salt,
                    key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &session_key).ok()?),
                }
            }
            SrtpProfile::AES128_CM_SHA1_80 => {
                let (key, master_salt) = master::<16, 14>(material, active)?;
                let mut session_key = [0u8; 16];
                derive(
                    provider,
                    &key,
                    &master_salt,
                    LABEL_RTP_ENCRYPTION,
                    &mut session_key,
                );
                let mut auth = [0u8; 20];
                derive(
                    provider,
                    &key,
                    &master_salt,
                    LABEL_RTP_AUTHENTICATION,
                    &mut auth,
                );
                let mut salt = [0u8; 14];
                derive(provider, &key, &master_salt, LABEL_RTP_SALT, &mut salt);
                Cipher::CmSha1_80 {
                    salt,
                    auth,
                    enc: provider
                        .srtp_provider
                        .aes_128_cm_sha1_80()
                        .create_cipher(session_key, true),
                    hmac: provider.sha1_hmac_provider,
                }
            }
            _ => return None,
        };
        Some(SrtpSender { cipher })
    }

    /// Append one SRTP packet to `out`: the RTP header `header` (already written by
    /// [`write_header`], in the clear) followed by `payload` encrypted and the tag, for `ssrc` at
    /// SRTP index `index` (the extended sequence number). Returns the packet's length; `out` is
    /// unchanged on a cipher error. Allocates nothing once `out` has grown to its working size.
    pub(crate) fn protect(
        &mut self,
        out: &mut Vec<u8>,
        header: &RtpHeaderOut<'_>,
        payload: &[u8],
        index: u64,
    ) -> Option<usize> {
        let start = out.len();
        let header_len = write_header(out, header);
        let body = start + header_len;
        let ok = match &mut self.cipher {
            Cipher::Gcm128 { salt, key } => {
                let iv =
                    AeadAes128Gcm::rtp_iv(*salt, header.ssrc, (index >> 16) as u32, index as u16);
                out.extend_from_slice(payload);
                let (aad, text) = out[start..].split_at_mut(header_len);
                let nonce = Nonce::assume_unique_for_key(iv);
                match key.seal_in_place_separate_tag(nonce, Aad::from(&*aad), text) {
                    Ok(tag) => {
                        out.extend_from_slice(tag.as_ref());
                        true
                    }
                    Err(_) => false,
                }
            }
            Cipher::CmSha1_80 {
                salt,
                auth,
                enc,
                hmac,
            } => {
                let iv = Aes128CmSha1_80::rtp_iv(*salt, header.ssrc, index);
                out.resize(body + payload.len() + CTR_SCRATCH, 0);
                let encrypted = enc.encrypt(&iv, payload, &mut out[body..]).is_ok();
                if encrypted {
                    let tag_at = header_len + payload.len();
                    Aes128CmSha1_80::rtp_hmac(
                        |k: &[u8], p: &[&[u8]]| hmac.sha1_hmac(k, p),
                        &auth[..],
                        &mut out[start..],
                        index,
                        tag_at,
                    );
                    out.truncate(start + tag_at + Aes128CmSha1_80::HMAC_TAG_LEN);
                }
                encrypted
            }
        };
        if !ok {
            out.truncate(start);
            return None;
        }
        Some(out.len() - start)
    }
}

/// The RTP header of one forwarded packet (no marker, no CSRC), with the RFC 6464 audio level
/// and the RFC 8843 mid as one-byte header extensions (RFC 8285) when negotiated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RtpHeaderOut<'a> {
    pub(crate) pt: u8,
    pub(crate) seq: u16,
    pub(crate) ts: u32,
    pub(crate) ssrc: u32,
    /// Extension id and the level byte (voice activity flag in the top bit, level 0..=127).
    pub(crate) audio_level: Option<(u8, u8)>,
    /// Extension id and the mid (1 to 16 bytes).
    pub(crate) mid: Option<(u8, &'a [u8])>,
}

/// The RFC 6464 one-byte audio level element: voice activity flag and level (0 loudest).
pub(crate) fn audio_level_byte(level: u8, voice: bool) -> u8 {
    (u8::from(voice) << 7) | level.min(127)
}

/// Append `h` to `out`; returns its length (12 fixed bytes, plus, with extensions, their 4-byte
/// header and the elements padded to 32-bit words: at most 36).
pub(crate) fn write_header(out: &mut Vec<u8>, h: &RtpHeaderOut<'_>) -> usize {
    let start = out.len();
    let level = h.audio_level.filter(|(id, _)| (1..=14).contains(id));
    let mid = h
        .mid
        .filter(|(id, m)| (1..=14).contains(id) && (1..=16).contains(&m.len()));
    let extended = level.is_some() || mid.is_some();
    out.push(if extended { 0x90 } else { 0x80 });
    out.push(h.pt & 0x7f);
    out.extend_from_slice(&h.seq.to_be_bytes());
    out.extend_from_slice(&h.ts.to_be_bytes());
    out.extend_from_slice(&h.ssrc.to_be_bytes());
    if extended {
        out.extend_from_slice(&[0xbe, 0xde, 0, 0]);
        let elements = out.len();
        if let Some((id, value)) = level {
            out.extend_from_slice(&[id << 4, value]);
        }
        if let Some((id, m)) = mid {
            out.push((id << 4) | (m.len() as u8 - 1));
            out.extend_from_slice(m);
        }
        while (out.len() - elements) % 4 != 0 {
            out.push(0);
        }
        let words = ((out.len() - elements) / 4) as u16;
        out[elements - 2..elements].copy_from_slice(&words.to_be_bytes());
    }
    out.len() - start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> CryptoProvider {
        crate::dtls::crypto_provider()
    }

    #[test]
    fn key_derivation_matches_rfc_3711_appendix_b3() {
        // RFC 3711 B.3: master key and salt, the session encryption key, salt and auth key.
        let key: [u8; 16] = hex("E1F97A0D3E018BE0D64FA32C06DE4139");
        let salt: [u8; 14] = hex("0EC675AD498AFEEBB6960B3AABE6");
        let mut enc = [0u8; 16];
        derive(&provider(), &key, &salt, LABEL_RTP_ENCRYPTION, &mut enc);
        assert_eq!(enc, hex::<16>("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut session_salt = [0u8; 14];
        derive(&provider(), &key, &salt, LABEL_RTP_SALT, &mut session_salt);
        assert_eq!(session_salt, hex::<14>("30CBBC08863D8C85D49DB34A9AE1"));
        let mut auth = [0u8; 20];
        derive(
            &provider(),
            &key,
            &salt,
            LABEL_RTP_AUTHENTICATION,
            &mut auth,
        );
        assert_eq!(auth, hex::<20>("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4"));
    }

    #[test]
    fn the_dtls_client_and_server_take_their_own_halves_of_the_keying_material() {
        let material: Vec<u8> = (0u8..56).collect();
        let (k, s) = master::<16, 12>(&material, true).unwrap();
        assert_eq!(k[0], 0);
        assert_eq!(s[0], 32);
        let (k, s) = master::<16, 12>(&material, false).unwrap();
        assert_eq!(k[0], 16);
        assert_eq!(s[0], 44);
        assert!(master::<16, 14>(&material, true).is_none(), "wrong length");
    }

    #[test]
    fn headers_carry_level_and_mid_padded_to_words() {
        let mut out = vec![0xff];
        let h = RtpHeaderOut {
            pt: 111,
            seq: 0x0102,
            ts: 0x0304_0506,
            ssrc: 0x0708_090a,
            audio_level: Some((1, audio_level_byte(30, true))),
            mid: Some((3, b"1")),
        };
        let n = write_header(&mut out, &h);
        assert_eq!(n, 12 + 4 + 4);
        assert_eq!(
            &out[1..],
            &[
                0x90,
                111,
                1,
                2,
                3,
                4,
                5,
                6,
                7,
                8,
                9,
                10,
                0xbe,
                0xde,
                0,
                1,
                0x10,
                0x80 | 30,
                0x30,
                b'1'
            ]
        );
        let mut plain = Vec::new();
        let n = write_header(
            &mut plain,
            &RtpHeaderOut {
                audio_level: None,
                mid: None,
                ..h
            },
        );
        assert_eq!((n, plain[0]), (12, 0x80));
    }

    /// An SRTP receiver built the way str0m builds its own (its crypto provider, the other half
    /// of the keying material) opens what the fast path protected, across a rollover.
    #[test]
    fn gcm_packets_open_with_the_receivers_keys_across_a_rollover() {
        let p = provider();
        let material: Vec<u8> = (0u8..56).map(|i| i.wrapping_mul(7)).collect();
        let mut tx = SrtpSender::new(&p, SrtpProfile::AEAD_AES_128_GCM, &material, false).unwrap();
        // The receiver is the DTLS client: it opens with the server's half.
        let (key, master_salt) = master::<16, 12>(&material, false).unwrap();
        let mut session_key = [0u8; 16];
        derive(
            &p,
            &key,
            &master_salt,
            LABEL_RTP_ENCRYPTION,
            &mut session_key,
        );
        let mut salt = [0u8; 12];
        derive(&p, &key, &master_salt, LABEL_RTP_SALT, &mut salt);
        let mut dec = p
            .srtp_provider
            .aead_aes_128_gcm()
            .create_cipher(session_key, false);
        let mut out = Vec::new();
        for index in [1u64, 65_535, 65_536, 65_537] {
            out.clear();
            let h = RtpHeaderOut {
                pt: 111,
                seq: index as u16,
                ts: 960 * index as u32,
                ssrc: 42,
                audio_level: Some((1, 0x85)),
                mid: Some((3, b"0")),
            };
            let payload = [index as u8; 40];
            let n = tx.protect(&mut out, &h, &payload, index).unwrap();
            assert_eq!(n, out.len());
            let hlen = 20;
            assert_eq!(n, hlen + 40 + AeadAes128Gcm::TAG_LEN);
            let iv = AeadAes128Gcm::rtp_iv(salt, 42, (index >> 16) as u32, index as u16);
            let mut plain = [0u8; 40 + 16];
            let len = dec
                .decrypt(&iv, &[&out[..hlen]], &out[hlen..], &mut plain)
                .unwrap();
            assert_eq!(&plain[..len], &payload[..], "index {index}");
            // A wrong rollover counter does not open it.
            let wrong = AeadAes128Gcm::rtp_iv(salt, 42, (index >> 16) as u32 + 1, index as u16);
            assert!(dec
                .decrypt(&wrong, &[&out[..hlen]], &out[hlen..], &mut plain)
                .is_err());
        }
    }

    #[test]
    fn cm_sha1_packets_carry_the_rfc_3711_tag() {
        let p = provider();
        let material: Vec<u8> = (0u8..60).collect();
        let mut tx = SrtpSender::new(&p, SrtpProfile::AES128_CM_SHA1_80, &material, true).unwrap();
        let (key, master_salt) = master::<16, 14>(&material, true).unwrap();
        let mut auth = [0u8; 20];
        derive(&p, &key, &master_salt, LABEL_RTP_AUTHENTICATION, &mut auth);
        let mut session_key = [0u8; 16];
        derive(
            &p,
            &key,
            &master_salt,
            LABEL_RTP_ENCRYPTION,
            &mut session_key,
        );
        let mut salt = [0u8; 14];
        derive(&p, &key, &master_salt, LABEL_RTP_SALT, &mut salt);
        let h = RtpHeaderOut {
            pt: 111,
            seq: 3,
            ts: 77,
            ssrc: 9,
            audio_level: None,
            mid: None,
        };
        let payload = [5u8; 33];
        let mut out = Vec::new();
        let n = tx.protect(&mut out, &h, &payload, 65_539).unwrap();
        assert_eq!(n, 12 + 33 + 10);
        let hmac = |k: &[u8], parts: &[&[u8]]| p.sha1_hmac_provider.sha1_hmac(k, parts);
        assert!(Aes128CmSha1_80::rtp_verify(
            hmac,
            &auth,
            &out[..12 + 33],
            65_539,
            &out[12 + 33..]
        ));
        let mut dec = p
            .srtp_provider
            .aes_128_cm_sha1_80()
            .create_cipher(session_key, false);
        let iv = Aes128CmSha1_80::rtp_iv(salt, 9, 65_539);
        let mut plain = [0u8; 33 + CTR_SCRATCH];
        dec.decrypt(&iv, &out[12..12 + 33], &mut plain).unwrap();
        assert_eq!(&plain[..33], &payload[..]);
    }

    #[test]
    fn aes_256_gcm_is_left_to_str0m() {
        let material = [0u8; 88];
        assert!(
            SrtpSender::new(&provider(), SrtpProfile::AEAD_AES_256_GCM, &material, true).is_none()
        );
    }

    fn hex<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0u8; N];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
