//! Room tokens: JWTs signed with Ed25519 (`alg: EdDSA`), carrying a `kid` so keys can rotate.
//!
//! The geo-router (or `amphi token`) signs with a private key; edges verify with public keys only.

use crate::ids::RoomId;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Clock skew tolerated on `iat`, seconds.
pub const CLOCK_SKEW_SECS: u64 = 60;
/// Default cap on a token's lifetime (`exp - iat`), seconds (24 h).
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 24 * 3600;

/// What a participant may do in a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the room: publish, moderate, end.
    Host,
    /// Publishes audio.
    Speaker,
    /// Subscribes only.
    Listener,
}

impl Role {
    /// Whether this role may publish audio.
    pub fn may_publish(self) -> bool {
        matches!(self, Role::Host | Role::Speaker)
    }

    /// Whether this role is `other` or a lower one (listener < speaker < host): what a refreshed
    /// token may carry.
    pub fn at_most(self, other: Role) -> bool {
        self.rank() <= other.rank()
    }

    fn rank(self) -> u8 {
        match self {
            Role::Listener => 0,
            Role::Speaker => 1,
            Role::Host => 2,
        }
    }
}

/// The claims of a room token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Stable user identity.
    pub sub: String,
    /// Display name.
    pub name: String,
    /// The room this token admits to.
    pub room: RoomId,
    /// Role in that room.
    pub role: Role,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
}

/// The JWT `typ` of a [`RecordingGrant`]; a room token's is `JWT`, so neither passes for the other.
pub const GRANT_TYP: &str = "amphi-recording";

/// What a [`RecordingGrant`] allows on a room's recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingAction {
    /// Read the recording while it is private (a signed URL the router hands to the host).
    Read,
    /// Make it public and write its downloadable file (the router, for the host).
    Publish,
    /// Remove every object of it (the router, for the host).
    Delete,
}

/// A short-lived grant the geo-router signs with its token key for one room's recording:
/// the signed URL of a private recording (`?sig=`) and the router's publish/delete requests
/// to the packager (`Authorization: Bearer`). JWT with `typ` [`GRANT_TYP`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordingGrant {
    /// The room whose recording this is.
    pub room: RoomId,
    /// What it allows.
    pub act: RecordingAction,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
}

/// The JWT `typ` of a [`RelayGrant`].
pub const RELAY_GRANT_TYP: &str = "amphi-relay";

/// A short-lived grant the geo-router signs with its token key in its heartbeat answer to an
/// edge: it lets that edge (`sub`) pull any live room's program stream from its parent edge in
/// the region's relay tree (`GET /v1/rooms/{room}/push?relay=`). JWT with `typ`
/// [`RELAY_GRANT_TYP`]; neither a room token nor a recording grant passes for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayGrant {
    /// The edge the grant was issued to.
    pub sub: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: Option<String>,
    kid: Option<String>,
}

/// Why a token was refused. Displayed texts never include the token itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts of sane JSON.
    #[error("malformed token")]
    Malformed,
    /// `alg` other than EdDSA.
    #[error("unsupported token algorithm")]
    Algorithm,
    /// No configured key has this `kid`.
    #[error("unknown signing key")]
    UnknownKey,
    /// Signature does not verify.
    #[error("bad token signature")]
    Signature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `iat` is in the future beyond the allowed skew.
    #[error("token not yet valid")]
    NotYetValid,
    /// `exp - iat` exceeds the verifier's lifetime cap.
    #[error("token lifetime exceeds the allowed maximum")]
    Lifetime,
}

/// Why key material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("bad key material: {0}")]
pub struct KeyError(String);

/// Signs tokens with one Ed25519 private key.
pub struct TokenSigner {
    key: SigningKey,
    kid: String,
}

impl TokenSigner {
    /// A fresh random key (dev mode).
    pub fn generate(kid: impl Into<String>) -> Self {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        TokenSigner {
            key: SigningKey::from_bytes(&seed),
            kid: kid.into(),
        }
    }

    /// Load a PKCS#8 PEM private key.
    pub fn from_pkcs8_pem(kid: impl Into<String>, pem: &str) -> Result<Self, KeyError> {
        let key = SigningKey::from_pkcs8_pem(pem).map_err(|e| KeyError(e.to_string()))?;
        Ok(TokenSigner {
            key,
            kid: kid.into(),
        })
    }

    /// The private key as PKCS#8 PEM (to write a key file).
    pub fn to_pkcs8_pem(&self) -> String {
        self.key
            .to_pkcs8_pem(Default::default())
            .expect("ed25519 keys encode")
            .to_string()
    }

    /// The key id written into every token header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as SPKI PEM, for verifiers.
    pub fn public_pem(&self) -> String {
        self.key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .expect("ed25519 keys encode")
    }

    /// A verifier that knows this signer's public key.
    pub fn verifier(&self) -> TokenVerifier {
        let mut v = TokenVerifier::default();
        v.add_key(self.kid.clone(), self.key.verifying_key());
        v
    }

    /// Sign `claims` into a compact JWT.
    pub fn sign(&self, claims: &Claims) -> String {
        self.sign_typed("JWT", claims)
    }

    /// Sign a recording grant (a JWT of `typ` [`GRANT_TYP`]).
    pub fn sign_grant(&self, grant: &RecordingGrant) -> String {
        self.sign_typed(GRANT_TYP, grant)
    }

    /// Sign a relay grant (a JWT of `typ` [`RELAY_GRANT_TYP`]).
    pub fn sign_relay_grant(&self, grant: &RelayGrant) -> String {
        self.sign_typed(RELAY_GRANT_TYP, grant)
    }

    fn sign_typed<T: Serialize>(&self, typ: &str, claims: &T) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            typ: Some(typ.into()),
            kid: Some(self.kid.clone()),
        };
        let mut out = B64.encode(serde_json::to_vec(&header).expect("header serializes"));
        out.push('.');
        out.push_str(&B64.encode(serde_json::to_vec(claims).expect("claims serialize")));
        let sig = self.key.sign(out.as_bytes());
        out.push('.');
        out.push_str(&B64.encode(sig.to_bytes()));
        out
    }
}

/// Verifies tokens against a set of public keys, by `kid`, refusing tokens whose lifetime
/// (`exp - iat`) exceeds a cap ([`DEFAULT_MAX_LIFETIME_SECS`] unless set).
#[derive(Clone)]
pub struct TokenVerifier {
    keys: Vec<(String, VerifyingKey)>,
    max_lifetime_secs: u64,
}

impl Default for TokenVerifier {
    fn default() -> Self {
        TokenVerifier {
            keys: Vec::new(),
            max_lifetime_secs: DEFAULT_MAX_LIFETIME_SECS,
        }
    }
}

impl TokenVerifier {
    /// Refuse tokens whose `exp - iat` exceeds `secs`.
    pub fn set_max_lifetime(&mut self, secs: u64) {
        self.max_lifetime_secs = secs;
    }

    /// The lifetime cap, seconds.
    pub fn max_lifetime(&self) -> u64 {
        self.max_lifetime_secs
    }

    /// Add a public key from SPKI PEM.
    pub fn add_public_pem(&mut self, kid: impl Into<String>, pem: &str) -> Result<(), KeyError> {
        let key = VerifyingKey::from_public_key_pem(pem).map_err(|e| KeyError(e.to_string()))?;
        self.add_key(kid.into(), key);
        Ok(())
    }

    fn add_key(&mut self, kid: String, key: VerifyingKey) {
        self.keys.retain(|(k, _)| *k != kid);
        self.keys.push((kid, key));
    }

    /// Check signature, algorithm and lifetime at `now_unix`; return the claims.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, TokenError> {
        let (header, claims): (Header, Claims) = self.verify_signed(token)?;
        if matches!(header.typ.as_deref(), Some(GRANT_TYP | RELAY_GRANT_TYP)) {
            return Err(TokenError::Malformed);
        }
        check_times(claims.iat, claims.exp, now_unix, self.max_lifetime_secs)?;
        Ok(claims)
    }

    /// Check a recording grant's signature, `typ` and lifetime at `now_unix`. Network-facing
    /// (a URL's `sig`, a Bearer header): never panics, whatever the input (fuzzed).
    pub fn verify_grant(&self, token: &str, now_unix: u64) -> Result<RecordingGrant, TokenError> {
        let (header, grant): (Header, RecordingGrant) = self.verify_signed(token)?;
        if header.typ.as_deref() != Some(GRANT_TYP) {
            return Err(TokenError::Malformed);
        }
        check_times(grant.iat, grant.exp, now_unix, self.max_lifetime_secs)?;
        Ok(grant)
    }

    /// Check a relay grant's signature, `typ` and lifetime at `now_unix`. Network-facing (a
    /// URL's `relay`): never panics, whatever the input.
    pub fn verify_relay_grant(&self, token: &str, now_unix: u64) -> Result<RelayGrant, TokenError> {
        let (header, grant): (Header, RelayGrant) = self.verify_signed(token)?;
        if header.typ.as_deref() != Some(RELAY_GRANT_TYP) {
            return Err(TokenError::Malformed);
        }
        check_times(grant.iat, grant.exp, now_unix, self.max_lifetime_secs)?;
        Ok(grant)
    }

    /// The header and body of a compact JWT whose EdDSA signature one of the keys checks.
    fn verify_signed<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
    ) -> Result<(Header, T), TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if header.alg != "EdDSA" {
            return Err(TokenError::Algorithm);
        }
        let key = match header.kid.as_deref() {
            Some(kid) => self.keys.iter().find(|(k, _)| k == kid),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .map(|(_, key)| key)
        .ok_or(TokenError::UnknownKey)?;
        let sig_bytes: [u8; 64] = B64
            .decode(s)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(TokenError::Malformed)?;
        let signed_len = h.len() + 1 + c.len();
        // Strict: refuses small-order keys and non-canonical signatures (malleability).
        key.verify_strict(
            &token.as_bytes()[..signed_len],
            &Signature::from_bytes(&sig_bytes),
        )
        .map_err(|_| TokenError::Signature)?;
        let claims: T = B64
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        Ok((header, claims))
    }
}

/// A token issued at `iat`, expiring at `exp`, is usable at `now` under a lifetime cap.
fn check_times(iat: u64, exp: u64, now: u64, max_lifetime: u64) -> Result<(), TokenError> {
    if exp <= now {
        return Err(TokenError::Expired);
    }
    if iat > now + CLOCK_SKEW_SECS {
        return Err(TokenError::NotYetValid);
    }
    if exp.saturating_sub(iat) > max_lifetime {
        return Err(TokenError::Lifetime);
    }
    Ok(())
}

/// Revoked users' tokens, per room, each until an expiry (sans-IO: the caller passes `now`).
/// Bounded: when full, the entry expiring soonest is dropped (the origin's ban stays the
/// authority).
#[derive(Debug, Clone)]
pub struct Revocations {
    users: std::collections::HashMap<(RoomId, String), u64>,
    max: usize,
}

impl Revocations {
    /// An empty list of at most `max` entries.
    pub fn new(max: usize) -> Self {
        Revocations {
            users: std::collections::HashMap::new(),
            max,
        }
    }

    /// Refuse `user`'s tokens for `room` until `until_unix` (keeping a later expiry).
    pub fn revoke_user(&mut self, room: RoomId, user: &str, until_unix: u64, now_unix: u64) {
        let key = (room, user.to_string());
        if !self.users.contains_key(&key) && self.users.len() >= self.max {
            self.users.retain(|_, until| *until > now_unix);
            if self.users.len() >= self.max {
                if let Some(soonest) = self
                    .users
                    .iter()
                    .min_by_key(|(_, until)| **until)
                    .map(|(k, _)| k.clone())
                {
                    self.users.remove(&soonest);
                }
            }
        }
        let until = self.users.entry(key).or_insert(until_unix);
        *until = (*until).max(until_unix);
    }

    /// Whether `user`'s tokens for `room` are revoked at `now_unix`.
    pub fn is_revoked(&self, room: RoomId, user: &str, now_unix: u64) -> bool {
        self.users
            .get(&(room, user.to_string()))
            .is_some_and(|until| *until > now_unix)
    }

    /// Forget expired entries.
    pub fn prune(&mut self, now_unix: u64) {
        self.users.retain(|_, until| *until > now_unix);
    }

    /// Entries held (expired ones included until [`Revocations::prune`]).
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Tokens revoked by `jti` a [`RevokedTokens::default`] list holds at most.
pub const DEFAULT_MAX_REVOKED_TOKENS: usize = 100_000;

/// Single tokens revoked by `jti`, each until its `exp` (sans-IO: the caller passes `now`).
/// Bounded: when full, the entry expiring soonest is dropped.
#[derive(Debug, Clone)]
pub struct RevokedTokens {
    jtis: std::collections::HashMap<String, u64>,
    max: usize,
}

impl Default for RevokedTokens {
    fn default() -> Self {
        RevokedTokens::new(DEFAULT_MAX_REVOKED_TOKENS)
    }
}

impl RevokedTokens {
    /// An empty list of at most `max` entries.
    pub fn new(max: usize) -> Self {
        RevokedTokens {
            jtis: std::collections::HashMap::new(),
            max,
        }
    }

    /// Refuse the token `jti` until `until_unix` (keeping a later expiry). Returns whether the
    /// entry is new (or extended).
    pub fn revoke(&mut self, jti: &str, until_unix: u64, now_unix: u64) -> bool {
        if until_unix <= now_unix {
            return false;
        }
        if !self.jtis.contains_key(jti) && self.jtis.len() >= self.max {
            self.jtis.retain(|_, until| *until > now_unix);
            if self.jtis.len() >= self.max {
                if let Some(soonest) = self
                    .jtis
                    .iter()
                    .min_by_key(|(_, until)| **until)
                    .map(|(k, _)| k.clone())
                {
                    self.jtis.remove(&soonest);
                }
            }
        }
        let until = self.jtis.entry(jti.to_string()).or_insert(0);
        let fresh = *until < until_unix;
        *until = (*until).max(until_unix);
        fresh
    }

    /// Whether the token `jti` is revoked at `now_unix`.
    pub fn is_revoked(&self, jti: &str, now_unix: u64) -> bool {
        self.jtis.get(jti).is_some_and(|until| *until > now_unix)
    }

    /// Every entry still in force at `now_unix`: (jti, until).
    pub fn live(&self, now_unix: u64) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.jtis
            .iter()
            .filter(move |(_, until)| **until > now_unix)
            .map(|(jti, until)| (jti.as_str(), *until))
    }

    /// Forget expired entries.
    pub fn prune(&mut self, now_unix: u64) {
        self.jtis.retain(|_, until| *until > now_unix);
    }

    /// Entries held (expired ones included until [`RevokedTokens::prune`]).
    pub fn len(&self) -> usize {
        self.jtis.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.jtis.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: u64) -> Claims {
        Claims {
            sub: "u1".into(),
            name: "Ada".into(),
            room: RoomId(5),
            role: Role::Speaker,
            iat: now,
            exp: now + 3600,
            jti: "j1".into(),
        }
    }

    fn grant(act: RecordingAction, now: u64) -> RecordingGrant {
        RecordingGrant {
            room: RoomId(5),
            act,
            iat: now,
            exp: now + 600,
        }
    }

    #[test]
    fn a_recording_grant_verifies_and_is_never_a_room_token_nor_the_reverse() {
        let signer = TokenSigner::generate("k1");
        let mut verifier = TokenVerifier::default();
        verifier.add_public_pem("k1", &signer.public_pem()).unwrap();
        let g = signer.sign_grant(&grant(RecordingAction::Publish, 1000));
        assert_eq!(
            verifier.verify_grant(&g, 1001),
            Ok(grant(RecordingAction::Publish, 1000))
        );
        assert_eq!(verifier.verify(&g, 1001), Err(TokenError::Malformed));
        let t = signer.sign(&claims(1000));
        assert_eq!(verifier.verify_grant(&t, 1001), Err(TokenError::Malformed));
        assert_eq!(verifier.verify_grant(&g, 1600), Err(TokenError::Expired));
        let other = TokenSigner::generate("k1");
        let forged = other.sign_grant(&grant(RecordingAction::Delete, 1000));
        assert_eq!(
            verifier.verify_grant(&forged, 1001),
            Err(TokenError::Signature)
        );
        assert_eq!(verifier.verify_grant("", 1001), Err(TokenError::Malformed));
    }

    #[test]
    fn a_relay_grant_verifies_and_passes_for_nothing_else() {
        let signer = TokenSigner::generate("k1");
        let verifier = signer.verifier();
        let relay = RelayGrant {
            sub: "edge-eu-2".into(),
            iat: 1000,
            exp: 1600,
        };
        let r = signer.sign_relay_grant(&relay);
        assert_eq!(verifier.verify_relay_grant(&r, 1001), Ok(relay.clone()));
        assert_eq!(verifier.verify(&r, 1001), Err(TokenError::Malformed));
        assert_eq!(verifier.verify_grant(&r, 1001), Err(TokenError::Malformed));
        let t = signer.sign(&claims(1000));
        assert_eq!(
            verifier.verify_relay_grant(&t, 1001),
            Err(TokenError::Malformed)
        );
        let g = signer.sign_grant(&grant(RecordingAction::Read, 1000));
        assert_eq!(
            verifier.verify_relay_grant(&g, 1001),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            verifier.verify_relay_grant(&r, 1600),
            Err(TokenError::Expired)
        );
        let forged = TokenSigner::generate("k1").sign_relay_grant(&relay);
        assert_eq!(
            verifier.verify_relay_grant(&forged, 1001),
            Err(TokenError::Signature)
        );
    }

    #[test]
    fn sign_then_verify_with_public_key_only() {
        let signer = TokenSigner::generate("k1");
        let mut verifier = TokenVerifier::default();
        verifier.add_public_pem("k1", &signer.public_pem()).unwrap();
        let t = signer.sign(&claims(1000));
        assert_eq!(verifier.verify(&t, 1001).unwrap(), claims(1000));
    }

    #[test]
    fn strict_verification_refuses_forgeries_under_a_weak_key() {
        // A small-order public key (here the identity point) lets anyone forge: R = identity,
        // S = 0 satisfies the lax equation for every message. `verify_strict` refuses it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut v = TokenVerifier::default();
        v.add_key("weak".into(), VerifyingKey::from_bytes(&identity).unwrap());
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&identity);
        let forged = format!(
            "{}.{}.{}",
            B64.encode(br#"{"alg":"EdDSA","kid":"weak"}"#),
            B64.encode(serde_json::to_vec(&claims(1000)).unwrap()),
            B64.encode(sig)
        );
        assert_eq!(v.verify(&forged, 1001), Err(TokenError::Signature));
    }

    #[test]
    fn revocations_hold_until_their_expiry_and_stay_bounded() {
        let mut r = Revocations::new(2);
        r.revoke_user(RoomId(1), "u", 2000, 1000);
        assert!(r.is_revoked(RoomId(1), "u", 1999));
        assert!(!r.is_revoked(RoomId(1), "u", 2000), "expired");
        assert!(!r.is_revoked(RoomId(2), "u", 1500), "another room");
        assert!(!r.is_revoked(RoomId(1), "v", 1500), "another user");
        r.revoke_user(RoomId(1), "u", 1500, 1000);
        assert!(r.is_revoked(RoomId(1), "u", 1999), "a later expiry is kept");
        r.revoke_user(RoomId(1), "v", 3000, 1000);
        // Full: the entry expiring soonest goes.
        r.revoke_user(RoomId(1), "w", 4000, 1000);
        assert_eq!(r.len(), 2);
        assert!(!r.is_revoked(RoomId(1), "u", 1500));
        assert!(r.is_revoked(RoomId(1), "v", 1500) && r.is_revoked(RoomId(1), "w", 1500));
        r.prune(3500);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn revoked_tokens_hold_until_their_expiry_and_stay_bounded() {
        let mut r = RevokedTokens::new(2);
        assert!(
            !r.revoke("old", 1000, 1000),
            "already expired: nothing to hold"
        );
        assert!(r.is_empty());
        assert!(r.revoke("a", 2000, 1000));
        assert!(r.is_revoked("a", 1999));
        assert!(!r.is_revoked("a", 2000), "expired");
        assert!(!r.is_revoked("b", 1500), "another token");
        assert!(
            !r.revoke("a", 1500, 1000),
            "an earlier expiry changes nothing"
        );
        assert!(r.is_revoked("a", 1999));
        assert!(r.revoke("b", 3000, 1000));
        // Full: the entry expiring soonest goes.
        assert!(r.revoke("c", 4000, 1000));
        assert_eq!(r.len(), 2);
        assert!(!r.is_revoked("a", 1500));
        let mut live: Vec<_> = r.live(3500).collect();
        live.sort();
        assert_eq!(live, vec![("c", 4000)]);
        r.prune(3500);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn roles_order_listener_speaker_host() {
        assert!(Role::Listener.at_most(Role::Speaker));
        assert!(Role::Speaker.at_most(Role::Speaker));
        assert!(Role::Speaker.at_most(Role::Host));
        assert!(!Role::Host.at_most(Role::Speaker));
        assert!(!Role::Speaker.at_most(Role::Listener));
    }

    #[test]
    fn lifetime_is_capped() {
        let signer = TokenSigner::generate("k1");
        let mut v = signer.verifier();
        v.set_max_lifetime(3600);
        let mut c = claims(1000);
        assert!(v.verify(&signer.sign(&c), 1001).is_ok(), "exactly the cap");
        c.exp += 1;
        assert_eq!(v.verify(&signer.sign(&c), 1001), Err(TokenError::Lifetime));
        c.exp = u64::MAX;
        assert_eq!(v.verify(&signer.sign(&c), 1001), Err(TokenError::Lifetime));
        let default = signer.verifier();
        assert_eq!(default.max_lifetime(), DEFAULT_MAX_LIFETIME_SECS);
    }

    #[test]
    fn pem_round_trip_keeps_the_key() {
        let signer = TokenSigner::generate("k1");
        let again = TokenSigner::from_pkcs8_pem("k1", &signer.to_pkcs8_pem()).unwrap();
        assert_eq!(again.public_pem(), signer.public_pem());
    }

    #[test]
    fn refuses_forged_expired_and_foreign_tokens() {
        let signer = TokenSigner::generate("k1");
        let v = signer.verifier();
        let t = signer.sign(&claims(1000));
        assert_eq!(v.verify(&t, 1000 + 3600), Err(TokenError::Expired));
        assert_eq!(v.verify(&t, 1000 - 61), Err(TokenError::NotYetValid));
        let other = TokenSigner::generate("k1");
        assert_eq!(
            v.verify(&other.sign(&claims(1000)), 1001),
            Err(TokenError::Signature)
        );
        let rotated = TokenSigner::generate("k2");
        assert_eq!(
            v.verify(&rotated.sign(&claims(1000)), 1001),
            Err(TokenError::UnknownKey)
        );
        // Tamper with the claims: role escalation must not verify.
        let mut parts: Vec<&str> = t.split('.').collect();
        let mut c = claims(1000);
        c.role = Role::Host;
        let forged_claims = B64.encode(serde_json::to_vec(&c).unwrap());
        parts[1] = &forged_claims;
        assert_eq!(v.verify(&parts.join("."), 1001), Err(TokenError::Signature));
        let none_alg = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none"}"#),
            B64.encode(serde_json::to_vec(&c).unwrap())
        );
        assert_eq!(v.verify(&none_alg, 1001), Err(TokenError::Algorithm));
        for junk in ["", "a.b", "a.b.c.d", "....", "\u{0}.\u{0}.\u{0}"] {
            assert_eq!(v.verify(junk, 1001), Err(TokenError::Malformed), "{junk:?}");
        }
    }
}
