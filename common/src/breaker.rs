//! A circuit breaker for a shared backend (Redis), sans-IO with an explicit `now`. A backend
//! that stops answering costs each call its timeouts (seconds); after one such failure, calls
//! skip it (the caller's fallback answers) until a background task reaches it again, or for at
//! most [`BREAKER_OPEN`], after which calls probe it again. Used by the geo-router's store and
//! the origin's room store.

use std::time::{Duration, Instant};

/// How long calls skip the backend after it failed, unless it answers sooner.
pub const BREAKER_OPEN: Duration = Duration::from_secs(15);

/// Whether calls may try the backend now.
#[derive(Debug, Default)]
pub struct Breaker {
    open_until: Option<Instant>,
}

impl Breaker {
    /// Whether a call may go to the backend at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        self.open_until.is_none_or(|until| now >= until)
    }

    /// A call failed as unreachable at `now`: skip the backend for a while.
    pub fn failed(&mut self, now: Instant) {
        self.open_until = Some(now + BREAKER_OPEN);
    }

    /// The backend answered: calls go to it again.
    pub fn answered(&mut self) {
        self.open_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_skips_the_backend_after_a_failure_until_it_answers_or_the_bound_passes() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert!(b.allows(t0));
        b.failed(t0);
        assert!(!b.allows(t0 + Duration::from_secs(1)));
        // A background task reached the backend.
        b.answered();
        assert!(b.allows(t0 + Duration::from_secs(1)));
        // No success meanwhile: calls probe again after the bound.
        b.failed(t0);
        assert!(!b.allows(t0 + BREAKER_OPEN - Duration::from_millis(1)));
        assert!(b.allows(t0 + BREAKER_OPEN));
    }
}
