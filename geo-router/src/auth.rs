//! API key authentication (production mode): a request is signed with the key's secret as
//! `X-Amphi-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}\n{METHOD}\n{path?query}\n{body}")>`,
//! with `X-Amphi-Key: <key id>` and `X-Amphi-Timestamp: <Unix seconds>` (at most
//! [`MAX_SKEW_SECS`] from the router's clock). Secrets never reach logs.
//!
//! Every key has a scope ([`ApiScope`]): an `edge` key only heartbeats, an `app` key creates
//! rooms and mints tokens, an `admin` key does everything. A signature is accepted once: a
//! [`ReplayCache`] remembers the signatures seen within the skew window, so a captured request
//! cannot be sent again (one router process; replicas keep their own caches).

pub use amphi_protocol::config::ApiScope;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};

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
    /// This exact signed request was already accepted.
    #[error("replayed request (each signed request is accepted once)")]
    Replayed,
    /// The key's scope does not allow this request.
    #[error("this API key's scope ({have}) does not allow this request (needs {needs})")]
    Scope {
        /// The key's scope.
        have: &'static str,
        /// The scope the request needs.
        needs: &'static str,
    },
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
    keys: Vec<(String, String, ApiScope)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids only: secrets never reach logs.
        f.debug_list()
            .entries(self.keys.iter().map(|(id, _, _)| id))
            .finish()
    }
}

impl ApiKeys {
    /// Keys as (id, secret, scope).
    pub fn new(keys: impl IntoIterator<Item = (String, String, ApiScope)>) -> Self {
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
        if !self.keys.iter().any(|(id, _, _)| id == key) {
            return Err(AuthError::UnknownKey);
        }
        let ts_text = timestamp.ok_or(AuthError::Timestamp)?;
        let ts: u64 = ts_text.parse().map_err(|_| AuthError::Timestamp)?;
        if ts.abs_diff(now_unix) > MAX_SKEW_SECS || ts_text.len() > 20 {
            return Err(AuthError::Timestamp);
        }
        Ok(())
    }

    /// Check a request's signature at `now_unix`; returns the key id and its scope. (Replays
    /// and scopes are checked by the caller: [`ReplayCache`], [`ApiScope::allows`].)
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
    ) -> Result<(&str, ApiScope), AuthError> {
        let (Some(key), Some(signature)) = (key, signature) else {
            return Err(AuthError::Missing);
        };
        let (id, secret, scope) = self
            .keys
            .iter()
            .find(|(id, _, _)| id == key)
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
        Ok((id, *scope))
    }
}

/// Signatures accepted within the last `2 * MAX_SKEW_SECS` (sans-IO: the caller passes `now`).
/// A signature covers the timestamp, so one older than the window is refused as stale anyway.
#[derive(Debug)]
pub struct ReplayCache {
    seen: HashMap<u128, u64>,
    order: VecDeque<(u64, u128)>,
    max: usize,
}

impl ReplayCache {
    /// An empty cache holding at most `max` signatures; when full, new requests are refused
    /// (fail closed) until old entries expire.
    pub fn new(max: usize) -> Self {
        ReplayCache {
            seen: HashMap::new(),
            order: VecDeque::new(),
            max,
        }
    }

    /// Record the (verified) `signature` of a request at `now_unix`: `Err(Replayed)` if it was
    /// seen within the window (or the cache is full of live entries).
    pub fn check(&mut self, signature: &str, now_unix: u64) -> Result<(), AuthError> {
        let window = 2 * MAX_SKEW_SECS;
        while let Some((at, _)) = self.order.front() {
            if at + window < now_unix {
                let (_, sig) = self.order.pop_front().expect("front exists");
                self.seen.remove(&sig);
            } else {
                break;
            }
        }
        // 128 bits of the HMAC identify a request (an attacker cannot aim at a collision).
        let key = signature
            .strip_prefix("v1=")
            .and_then(|h| h.get(..32))
            .and_then(|h| u128::from_str_radix(h, 16).ok())
            .ok_or(AuthError::Signature)?;
        if self.seen.contains_key(&key) || self.seen.len() >= self.max {
            return Err(AuthError::Replayed);
        }
        self.seen.insert(key, now_unix);
        self.order.push_back((now_unix, key));
        Ok(())
    }

    /// Signatures remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_requests_verify_and_tampering_does_not() {
        let keys = ApiKeys::new([("k1".to_string(), "s3cret".to_string(), ApiScope::App)]);
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
        assert_eq!(ok, Ok(("k1", ApiScope::App)));
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
    fn a_signature_is_accepted_once_within_the_window() {
        let sig = |c: char| format!("v1={}", c.to_string().repeat(64));
        let (aa, bb, cc, dd) = (sig('a'), sig('b'), sig('c'), sig('d'));
        let mut cache = ReplayCache::new(2);
        assert_eq!(cache.check(&aa, 1000), Ok(()));
        assert_eq!(cache.check(&aa, 1000), Err(AuthError::Replayed));
        let edge = 1000 + 2 * MAX_SKEW_SECS;
        assert_eq!(cache.check(&aa, edge), Err(AuthError::Replayed));
        assert_eq!(cache.check(&bb, 1001), Ok(()));
        // Past the window the first entry is forgotten (its timestamp is stale by then anyway).
        assert_eq!(cache.check(&aa, edge + 1), Ok(()));
        assert_eq!(cache.len(), 2);
        // Full of live entries: fail closed.
        assert_eq!(cache.check(&cc, edge + 2), Ok(()));
        assert_eq!(cache.check(&dd, edge + 2), Err(AuthError::Replayed));
        assert_eq!(cache.check("v1=zz", edge + 2), Err(AuthError::Signature));
    }

    #[test]
    fn scopes_allow_their_own_requests_and_admin_allows_all() {
        use ApiScope::*;
        assert!(Edge.allows(Edge) && !Edge.allows(App) && !Edge.allows(Admin));
        assert!(App.allows(App) && !App.allows(Edge) && !App.allows(Admin));
        assert!(Admin.allows(Edge) && Admin.allows(App) && Admin.allows(Admin));
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
