//! API key authentication (production mode): a request is signed with the key's secret as
//! `X-Amphi-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}\n{METHOD}\n{path?query}\n{body}")>`,
//! with `X-Amphi-Key: <key id>` and `X-Amphi-Timestamp: <Unix seconds>` (at most
//! [`MAX_SKEW_SECS`] from the router's clock). Secrets never reach logs.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header naming the API key id.
pub const KEY_HEADER: &str = "x-amphi-key";
/// Header with the request time, Unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-amphi-timestamp";
/// Header with the signature, `v1=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-amphi-signature";
/// Largest accepted clock difference, seconds.
pub const MAX_SKEW_SECS: u64 = 300;

type HmacSha256 = Hmac<Sha256>;

/// Why a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No API key headers.
    #[error("missing API key headers (x-amphi-key, x-amphi-timestamp, x-amphi-signature)")]
    Missing,
    /// The key id is not configured.
    #[error("unknown API key")]
    UnknownKey,
    /// The timestamp is malformed or too far from now.
    #[error("timestamp missing, malformed or more than 300 s off")]
    Timestamp,
    /// The signature is malformed or wrong.
    #[error("bad signature")]
    Signature,
}

/// The bytes a request signature covers.
fn signed_message(
    mac: &mut HmacSha256,
    timestamp: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) {
    mac.update(timestamp.as_bytes());
    mac.update(b"\n");
    mac.update(method.as_bytes());
    mac.update(b"\n");
    mac.update(path_and_query.as_bytes());
    mac.update(b"\n");
    mac.update(body);
}

/// Compute the `X-Amphi-Signature` value for a request (what clients do).
pub fn sign(
    secret: &str,
    timestamp: u64,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    signed_message(
        &mut mac,
        &timestamp.to_string(),
        method,
        path_and_query,
        body,
    );
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// HMAC-SHA256 of `body` as lowercase hex (webhook signatures).
pub fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The configured keys.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<(String, String)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids only: secrets never reach logs.
        f.debug_list()
            .entries(self.keys.iter().map(|(id, _)| id))
            .finish()
    }
}

impl ApiKeys {
    /// Keys as (id, secret) pairs.
    pub fn new(keys: impl IntoIterator<Item = (String, String)>) -> Self {
        ApiKeys {
            keys: keys.into_iter().collect(),
        }
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The checks that need no body, made before a request body is read: a known key id and a
    /// fresh timestamp. [`ApiKeys::verify`] still checks everything once the body is in.
    pub fn precheck(
        &self,
        key: Option<&str>,
        timestamp: Option<&str>,
        now_unix: u64,
    ) -> Result<(), AuthError> {
        let key = key.ok_or(AuthError::Missing)?;
        if !self.keys.iter().any(|(id, _)| id == key) {
            return Err(AuthError::UnknownKey);
        }
        let ts_text = timestamp.ok_or(AuthError::Timestamp)?;
        let ts: u64 = ts_text.parse().map_err(|_| AuthError::Timestamp)?;
        if ts.abs_diff(now_unix) > MAX_SKEW_SECS || ts_text.len() > 20 {
            return Err(AuthError::Timestamp);
        }
        Ok(())
    }

    /// Check a request's signature at `now_unix`; returns the key id.
    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        &self,
        key: Option<&str>,
        timestamp: Option<&str>,
        signature: Option<&str>,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        now_unix: u64,
    ) -> Result<&str, AuthError> {
        let (Some(key), Some(signature)) = (key, signature) else {
            return Err(AuthError::Missing);
        };
        let (id, secret) = self
            .keys
            .iter()
            .find(|(id, _)| id == key)
            .ok_or(AuthError::UnknownKey)?;
        let ts_text = timestamp.ok_or(AuthError::Timestamp)?;
        let ts: u64 = ts_text.parse().map_err(|_| AuthError::Timestamp)?;
        if ts.abs_diff(now_unix) > MAX_SKEW_SECS || ts_text.len() > 20 {
            return Err(AuthError::Timestamp);
        }
        let hex_sig = signature.strip_prefix("v1=").ok_or(AuthError::Signature)?;
        let sig = hex::decode(hex_sig).map_err(|_| AuthError::Signature)?;
        let mut mac =
            HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        signed_message(&mut mac, ts_text, method, path_and_query, body);
        mac.verify_slice(&sig).map_err(|_| AuthError::Signature)?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_requests_verify_and_tampering_does_not() {
        let keys = ApiKeys::new([("k1".to_string(), "s3cret".to_string())]);
        let sig = sign("s3cret", 1000, "POST", "/v1/rooms", b"{\"title\":\"a\"}");
        let ok = keys.verify(
            Some("k1"),
            Some("1000"),
            Some(&sig),
            "POST",
            "/v1/rooms",
            b"{\"title\":\"a\"}",
            1100,
        );
        assert_eq!(ok, Ok("k1"));
        let v = |k: Option<&str>, ts: Option<&str>, s: Option<&str>, body: &[u8], now: u64| {
            keys.verify(k, ts, s, "POST", "/v1/rooms", body, now)
        };
        assert_eq!(v(None, None, None, b"", 1000), Err(AuthError::Missing));
        assert_eq!(
            v(
                Some("k2"),
                Some("1000"),
                Some(&sig),
                b"{\"title\":\"a\"}",
                1000
            ),
            Err(AuthError::UnknownKey)
        );
        assert_eq!(
            v(
                Some("k1"),
                Some("1000"),
                Some(&sig),
                b"{\"title\":\"b\"}",
                1000
            ),
            Err(AuthError::Signature)
        );
        assert_eq!(
            v(
                Some("k1"),
                Some("1000"),
                Some(&sig),
                b"{\"title\":\"a\"}",
                1301
            ),
            Err(AuthError::Timestamp)
        );
        assert_eq!(
            v(Some("k1"), Some("x"), Some(&sig), b"", 1000),
            Err(AuthError::Timestamp)
        );
        assert_eq!(
            v(Some("k1"), Some("1000"), Some("v1=zz"), b"", 1000),
            Err(AuthError::Signature)
        );
        assert_eq!(
            v(Some("k1"), Some("1000"), Some(&sig[3..]), b"", 1000),
            Err(AuthError::Signature)
        );
        let other = sign("s3cret", 1000, "GET", "/v1/rooms", b"{\"title\":\"a\"}");
        assert_eq!(
            v(
                Some("k1"),
                Some("1000"),
                Some(&other),
                b"{\"title\":\"a\"}",
                1000
            ),
            Err(AuthError::Signature)
        );
        assert_eq!(format!("{keys:?}"), "[\"k1\"]", "secrets never print");
    }

    #[test]
    fn webhook_hmac_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            hmac_hex("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
