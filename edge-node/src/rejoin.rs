//! When and where a client whose session ended joins again (sans-IO), for the str0m WHIP/WHEP
//! clients: the first try goes at once, asking the geo-router's `/v1/route` to `avoid` the edges
//! that just failed (a dead edge stays in routing until the router misses its heartbeats); later
//! tries back off exponentially; the number of tries is bounded.

use std::time::{Duration, Instant};

/// How long an edge that failed stays on the avoid list.
pub const AVOID_FOR: Duration = Duration::from_secs(30);
/// Most edges on the avoid list (the router accepts 8).
const MAX_AVOID: usize = 8;
/// Wait before the second consecutive try; it doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between tries.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The rejoin state of one client.
#[derive(Clone, Debug)]
pub struct Rejoin {
    tries_left: u32,
    failures: u32,
    avoid: Vec<(String, Instant)>,
}

impl Rejoin {
    /// A client that may try again at most `tries` times over its life.
    pub fn new(tries: u32) -> Self {
        Rejoin {
            tries_left: tries,
            failures: 0,
            avoid: Vec::new(),
        }
    }

    /// A session ended or a join failed at `now` (`edge`: the edge it was on or tried, `None`
    /// when the router itself failed). Returns when to ask the router again, or `None` when no
    /// try is left.
    pub fn failed(&mut self, edge: Option<&str>, now: Instant) -> Option<Instant> {
        if self.tries_left == 0 {
            return None;
        }
        self.tries_left -= 1;
        if let Some(edge) = edge {
            self.avoid.retain(|(e, _)| e != edge);
            self.avoid.push((edge.to_string(), now));
            if self.avoid.len() > MAX_AVOID {
                self.avoid.remove(0);
            }
        }
        let wait = match self.failures {
            0 => Duration::ZERO,
            n => BACKOFF_FIRST
                .saturating_mul(1 << (n - 1).min(16))
                .min(BACKOFF_MAX),
        };
        self.failures += 1;
        Some(now + wait)
    }

    /// A session is up: the next loss is retried at once again.
    pub fn connected(&mut self) {
        self.failures = 0;
    }

    /// The `avoid` value for a route request at `now`: comma-separated edges that failed in the
    /// last [`AVOID_FOR`] (empty when none).
    pub fn avoid(&self, now: Instant) -> String {
        self.avoid
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(*at) < AVOID_FOR)
            .map(|(e, _)| e.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_session_is_retried_at_once_avoiding_its_edge() {
        let t0 = Instant::now();
        let mut r = Rejoin::new(10);
        assert_eq!(r.avoid(t0), "");
        // The edge dies: ask the router again now, avoiding it.
        assert_eq!(r.failed(Some("edge-a"), t0), Some(t0));
        assert_eq!(r.avoid(t0), "edge-a");
        // The router still sent us to a dead edge (or the join failed): back off, avoid both.
        let t1 = t0 + Duration::from_millis(50);
        assert_eq!(r.failed(Some("edge-b"), t1), Some(t1 + BACKOFF_FIRST));
        assert_eq!(r.avoid(t1), "edge-a,edge-b");
        let t2 = t1 + BACKOFF_FIRST;
        assert_eq!(r.failed(None, t2), Some(t2 + 2 * BACKOFF_FIRST));
        // Connected: the next loss goes at once again.
        r.connected();
        let t3 = t2 + Duration::from_secs(5);
        assert_eq!(r.failed(Some("edge-c"), t3), Some(t3));
        // Failed edges leave the list after AVOID_FOR.
        assert_eq!(r.avoid(t0 + AVOID_FOR + Duration::from_secs(1)), "edge-c");
    }

    #[test]
    fn backoff_is_capped_and_tries_are_bounded() {
        let t0 = Instant::now();
        let mut r = Rejoin::new(30);
        let mut last = Duration::ZERO;
        for _ in 0..30 {
            let at = r.failed(Some("edge-a"), t0).expect("a try left");
            last = at - t0;
            assert!(last <= BACKOFF_MAX);
        }
        assert_eq!(last, BACKOFF_MAX);
        assert_eq!(r.failed(Some("edge-a"), t0), None);
        assert_eq!(Rejoin::new(0).failed(None, t0), None);
    }

    #[test]
    fn the_avoid_list_is_bounded() {
        let t0 = Instant::now();
        let mut r = Rejoin::new(20);
        for i in 0..12 {
            r.failed(Some(&format!("e{i}")), t0);
        }
        assert_eq!(r.avoid(t0), "e4,e5,e6,e7,e8,e9,e10,e11");
        // The same edge failing again is listed once, as the newest.
        r.failed(Some("e4"), t0);
        assert_eq!(r.avoid(t0), "e5,e6,e7,e8,e9,e10,e11,e4");
    }
}
