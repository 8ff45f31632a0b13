//! Token leases (sans-IO): every edge session lives on the token that opened it and ends when
//! that token expires, [`TokenLeases::grace`] seconds after its `exp`, unless the client replaced
//! it with a newer token of the same user and room (role the same or lower) first: a
//! WebSocket `refresh_token` message, or a WHIP/WHEP `PATCH` with the new bearer token. A token
//! revoked by `jti` ends the sessions living on it at once ([`TokenLeases::with_jti`]).
//!
//! Times are Unix seconds, as in tokens; the driver ([`crate::sessions::Sessions`]) passes `now`
//! from its periodic tick.

use amphi_protocol::token::{Claims, Role};
use amphi_protocol::{ParticipantId, RoomId};
use std::collections::{BTreeSet, HashMap};

/// Default seconds a session outlives its token's `exp` (the edge's `token_expiry_grace_secs`).
pub const DEFAULT_GRACE_SECS: u64 = 30;

/// The token a session lives on.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lease {
    sub: String,
    room: RoomId,
    role: Role,
    jti: String,
    exp: u64,
}

impl Lease {
    fn of(claims: &Claims) -> Self {
        Lease {
            sub: claims.sub.clone(),
            room: claims.room,
            role: claims.role,
            jti: claims.jti.clone(),
            exp: claims.exp,
        }
    }
}

/// Why a refreshed token was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The session is gone (or never joined).
    #[error("no session lives on a token here")]
    NoSession,
    /// The new token names another user.
    #[error("the new token is for another user")]
    OtherUser,
    /// The new token names another room.
    #[error("the new token is for another room")]
    OtherRoom,
    /// The new token carries a higher role than the session's token.
    #[error("the new token carries a higher role")]
    HigherRole,
}

impl RefreshError {
    /// Machine-readable code for error answers.
    pub fn code(self) -> &'static str {
        match self {
            RefreshError::NoSession => "not_joined",
            RefreshError::OtherUser | RefreshError::OtherRoom | RefreshError::HigherRole => {
                "forbidden"
            }
        }
    }
}

/// The token of every session on this edge, by participant, ordered by expiry.
#[derive(Debug)]
pub struct TokenLeases {
    grace: u64,
    leases: HashMap<ParticipantId, Lease>,
    /// (exp, participant) of every lease.
    by_exp: BTreeSet<(u64, ParticipantId)>,
}

impl TokenLeases {
    /// No sessions; a session ends `grace_secs` after its token's `exp`.
    pub fn new(grace_secs: u64) -> Self {
        TokenLeases {
            grace: grace_secs,
            leases: HashMap::new(),
            by_exp: BTreeSet::new(),
        }
    }

    /// Seconds a session outlives its token.
    pub fn grace(&self) -> u64 {
        self.grace
    }

    /// `participant`'s session opened with `claims` (replacing what it held).
    pub fn open(&mut self, participant: ParticipantId, claims: &Claims) {
        self.close(participant);
        let lease = Lease::of(claims);
        self.by_exp.insert((lease.exp, participant));
        self.leases.insert(participant, lease);
    }

    /// `participant`'s session ended.
    pub fn close(&mut self, participant: ParticipantId) {
        if let Some(old) = self.leases.remove(&participant) {
            self.by_exp.remove(&(old.exp, participant));
        }
    }

    /// The session of `participant` moves to the (verified) token `claims`: the same user and
    /// room, the same role or a lower one. Returns the token's `jti` it lived on before.
    pub fn refresh(
        &mut self,
        participant: ParticipantId,
        claims: &Claims,
    ) -> Result<String, RefreshError> {
        let lease = self
            .leases
            .get_mut(&participant)
            .ok_or(RefreshError::NoSession)?;
        if claims.sub != lease.sub {
            return Err(RefreshError::OtherUser);
        }
        if claims.room != lease.room {
            return Err(RefreshError::OtherRoom);
        }
        if !claims.role.at_most(lease.role) {
            return Err(RefreshError::HigherRole);
        }
        self.by_exp.remove(&(lease.exp, participant));
        let old = std::mem::replace(lease, Lease::of(claims));
        self.by_exp.insert((lease.exp, participant));
        Ok(old.jti)
    }

    /// The sessions whose token expired more than the grace before `now_unix`: they are
    /// forgotten here and the caller ends them.
    pub fn expired(&mut self, now_unix: u64) -> Vec<ParticipantId> {
        let mut out = Vec::new();
        while let Some(&(exp, pid)) = self.by_exp.first() {
            if exp.saturating_add(self.grace) > now_unix {
                break;
            }
            self.by_exp.pop_first();
            self.leases.remove(&pid);
            out.push(pid);
        }
        out
    }

    /// The sessions living on the token `jti`.
    pub fn with_jti(&self, jti: &str) -> Vec<ParticipantId> {
        self.leases
            .iter()
            .filter(|(_, l)| l.jti == jti)
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: RoomId = RoomId(7);

    fn claims(sub: &str, role: Role, jti: &str, exp: u64) -> Claims {
        Claims {
            sub: sub.into(),
            name: sub.into(),
            room: R,
            role,
            iat: exp.saturating_sub(600),
            exp,
            jti: jti.into(),
        }
    }

    #[test]
    fn a_session_ends_a_grace_after_its_token_expires() {
        let mut l = TokenLeases::new(30);
        let (a, b) = (ParticipantId(1), ParticipantId(2));
        l.open(a, &claims("ann", Role::Listener, "j1", 1000));
        l.open(b, &claims("bob", Role::Listener, "j2", 1100));
        assert!(l.expired(999).is_empty());
        assert!(l.expired(1029).is_empty(), "within the grace");
        assert_eq!(l.expired(1030), vec![a]);
        assert!(l.expired(1030).is_empty(), "reported once");
        assert!(l.with_jti("j1").is_empty());
        assert_eq!(l.expired(5000), vec![b]);
        assert!(l.is_empty());
    }

    #[test]
    fn a_refreshed_session_lives_on_the_new_token() {
        let mut l = TokenLeases::new(30);
        let a = ParticipantId(1);
        l.open(a, &claims("ann", Role::Speaker, "j1", 1000));
        assert_eq!(
            l.refresh(a, &claims("ann", Role::Speaker, "j2", 2000)),
            Ok("j1".to_string())
        );
        assert!(
            l.expired(1500).is_empty(),
            "the old expiry no longer counts"
        );
        assert_eq!(l.with_jti("j2"), vec![a]);
        assert!(l.with_jti("j1").is_empty());
        assert_eq!(l.expired(2030), vec![a]);
    }

    #[test]
    fn a_refresh_keeps_the_user_the_room_and_at_most_the_role() {
        let mut l = TokenLeases::new(30);
        let a = ParticipantId(1);
        l.open(a, &claims("ann", Role::Speaker, "j1", 1000));
        assert_eq!(
            l.refresh(a, &claims("eve", Role::Speaker, "j2", 2000)),
            Err(RefreshError::OtherUser)
        );
        let mut other_room = claims("ann", Role::Speaker, "j2", 2000);
        other_room.room = RoomId(8);
        assert_eq!(l.refresh(a, &other_room), Err(RefreshError::OtherRoom));
        assert_eq!(
            l.refresh(a, &claims("ann", Role::Host, "j2", 2000)),
            Err(RefreshError::HigherRole)
        );
        assert_eq!(
            l.refresh(ParticipantId(9), &claims("ann", Role::Speaker, "j2", 2000)),
            Err(RefreshError::NoSession)
        );
        assert_eq!(l.expired(1030), vec![a], "refused refreshes change nothing");
        l.open(a, &claims("ann", Role::Speaker, "j1", 1000));
        assert!(l
            .refresh(a, &claims("ann", Role::Listener, "j3", 2000))
            .is_ok());
        assert_eq!(
            l.refresh(a, &claims("ann", Role::Speaker, "j4", 3000)),
            Err(RefreshError::HigherRole),
            "a lowered session cannot climb back"
        );
    }

    #[test]
    fn closed_sessions_are_forgotten() {
        let mut l = TokenLeases::new(0);
        let a = ParticipantId(1);
        l.open(a, &claims("ann", Role::Listener, "j1", 1000));
        l.open(a, &claims("ann", Role::Listener, "j1", 1200));
        assert_eq!(l.len(), 1);
        l.close(a);
        assert!(l.expired(5000).is_empty());
        assert!(l.with_jti("j1").is_empty());
    }
}
