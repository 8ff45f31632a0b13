//! Per-client-address budgets of the HTTP listeners (sans-IO): how many connections one address
//! may hold open, and how many requests it may make (a token bucket: `requests_per_second_per_ip`
//! sustained, `request_burst_per_ip` at once). Driven with an explicit `now`; the listeners
//! (`https::Limiter`) call [`IpBudgets::open`] on accept, [`IpBudgets::close`] when the connection
//! ends, and [`IpBudgets::request`] per request, keyed on the real client address (behind a
//! trusted proxy, the forwarded one).
//!
//! IPv6 clients are budgeted per /64 (one subscriber's allocation), IPv4 per address.
//! Exempt networks (`rate_limit_exempt`: a load balancer, a CDN, health checkers, loopback) are
//! never limited. The table is bounded: idle entries (no connection, a full bucket) are dropped,
//! and past [`MAX_TRACKED`] addresses new ones are admitted untracked rather than refused.

use crate::config::HttpLimits;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most addresses tracked at once (about 64 bytes each).
pub const MAX_TRACKED: usize = 100_000;

/// Why an address was refused, and when it may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address already holds `max_connections_per_ip` connections.
    Connections {
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// The address spent its request budget.
    Rate {
        /// Time until one request is available again.
        retry_after: Duration,
    },
}

impl Refusal {
    /// The wait the client is told (`Retry-After`, whole seconds, at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        let d = match self {
            Refusal::Connections { retry_after } | Refusal::Rate { retry_after } => *retry_after,
        };
        d.as_secs_f64().ceil().max(1.0) as u64
    }

    /// The stable error code of the answer (`too_many_connections`, `rate_limited`).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Connections { .. } => "too_many_connections",
            Refusal::Rate { .. } => "rate_limited",
        }
    }

    /// The HTTP status of the answer: 503 for connections, 429 for requests.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Connections { .. } => 503,
            Refusal::Rate { .. } => 429,
        }
    }

    /// The human-readable message of the answer.
    pub fn message(&self) -> &'static str {
        match self {
            Refusal::Connections { .. } => "too many open connections from this address",
            Refusal::Rate { .. } => "too many requests from this address, slow down",
        }
    }
}

/// A configuration the budgets cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// An exempt entry is not a CIDR or an address.
    #[error("rate_limit_exempt: {0:?} is not a CIDR or an IP address")]
    Exempt(String),
    /// A positive rate with a zero burst would refuse everything.
    #[error("request_burst_per_ip must be at least 1 when requests_per_second_per_ip is set")]
    Burst,
}

#[derive(Debug)]
struct Entry {
    conns: u32,
    tokens: f64,
    last: Instant,
}

/// The budgets of one listener (or of every listener of a role): see the module docs.
#[derive(Debug)]
pub struct IpBudgets {
    max_conns: u32,
    rate: f64,
    burst: f64,
    exempt: Arc<[IpNet]>,
    table: HashMap<IpAddr, Entry>,
    last_prune: Option<Instant>,
}

/// Whether `ip` (an IPv4-mapped IPv6 address as IPv4) is in one of `networks`.
fn in_networks(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    networks.iter().any(|n| n.contains(&ip))
}

/// The clients whose requests [`IpBudgets::request`] always lets through: every one when no
/// request rate is set, else the exempt networks ([`IpBudgets::unmetered_requests`]).
#[derive(Clone, Debug)]
pub struct UnmeteredRequests {
    all: bool,
    exempt: Arc<[IpNet]>,
}

impl UnmeteredRequests {
    /// Whether a request from `ip` is never metered.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.all || in_networks(&self.exempt, ip)
    }
}

/// The address an entry is kept under: IPv4 as is (also IPv4-mapped IPv6), IPv6 by /64.
pub fn budget_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl IpBudgets {
    /// Budgets from `cfg` (0 turns a budget off).
    pub fn new(cfg: &HttpLimits) -> Result<Self, LimitsError> {
        let exempt = cfg
            .rate_limit_exempt
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| LimitsError::Exempt(s.clone()))
            })
            .collect::<Result<Arc<[_]>, _>>()?;
        if cfg.requests_per_second_per_ip > 0 && cfg.request_burst_per_ip == 0 {
            return Err(LimitsError::Burst);
        }
        Ok(IpBudgets {
            max_conns: cfg.max_connections_per_ip,
            rate: f64::from(cfg.requests_per_second_per_ip),
            burst: f64::from(cfg.request_burst_per_ip),
            exempt,
            table: HashMap::new(),
            last_prune: None,
        })
    }

    /// Whether `ip` is in an exempt network (never limited).
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        in_networks(&self.exempt, ip)
    }

    /// Who no request budget applies to, fixed for the budgets' life, so a caller can tell
    /// without taking the lock the budgets live behind.
    pub fn unmetered_requests(&self) -> UnmeteredRequests {
        UnmeteredRequests {
            all: self.rate <= 0.0,
            exempt: Arc::clone(&self.exempt),
        }
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.table.len()
    }

    /// The entry of `ip` with its bucket refilled to `now`; `None` when the table is full.
    fn entry(&mut self, ip: IpAddr, now: Instant) -> Option<&mut Entry> {
        let key = budget_key(ip);
        self.maybe_prune(now);
        if !self.table.contains_key(&key) && self.table.len() >= MAX_TRACKED {
            self.prune(now);
            if self.table.len() >= MAX_TRACKED {
                return None;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let e = self.table.entry(key).or_insert(Entry {
            conns: 0,
            tokens: burst,
            last: now,
        });
        let dt = now.saturating_duration_since(e.last).as_secs_f64();
        e.tokens = (e.tokens + dt * rate).min(burst);
        e.last = now;
        Some(e)
    }

    /// Amortized pruning: a table over half full is swept at most once a second.
    fn maybe_prune(&mut self, now: Instant) {
        let due = self
            .last_prune
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if self.table.len() > MAX_TRACKED / 2 && due {
            self.prune(now);
        }
    }

    /// Drop idle entries: no connection open and a full bucket.
    fn prune(&mut self, now: Instant) {
        self.last_prune = Some(now);
        let (rate, burst) = (self.rate, self.burst);
        self.table.retain(|_, e| {
            let dt = now.saturating_duration_since(e.last).as_secs_f64();
            e.conns > 0 || e.tokens + dt * rate < burst
        });
    }

    /// A connection from `ip` was accepted at `now`: counted, or refused over the cap. Every
    /// `Ok` must be matched by one [`IpBudgets::close`].
    pub fn open(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.max_conns == 0 || self.is_exempt(ip) {
            return Ok(());
        }
        let max = self.max_conns;
        let Some(e) = self.entry(ip, now) else {
            return Ok(());
        };
        if e.conns >= max {
            return Err(Refusal::Connections {
                retry_after: Duration::from_secs(1),
            });
        }
        e.conns += 1;
        Ok(())
    }

    /// A connection [`IpBudgets::open`] admitted ended.
    pub fn close(&mut self, ip: IpAddr, now: Instant) {
        if self.max_conns == 0 || self.is_exempt(ip) {
            return;
        }
        if let Some(e) = self.table.get_mut(&budget_key(ip)) {
            e.conns = e.conns.saturating_sub(1);
        }
        self.maybe_prune(now);
    }

    /// A request from `ip` (the real client address) at `now`: one token spent, or refused
    /// with the time until the next one.
    pub fn request(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.rate <= 0.0 || self.is_exempt(ip) {
            return Ok(());
        }
        let rate = self.rate;
        let Some(e) = self.entry(ip, now) else {
            return Ok(());
        };
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            return Ok(());
        }
        Err(Refusal::Rate {
            retry_after: Duration::from_secs_f64((1.0 - e.tokens) / rate),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(conns: u32, rate: u32, burst: u32, exempt: &[&str]) -> HttpLimits {
        HttpLimits {
            max_connections_per_ip: conns,
            requests_per_second_per_ip: rate,
            request_burst_per_ip: burst,
            rate_limit_exempt: exempt.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connections_are_capped_per_address_and_released_on_close() {
        let mut b = IpBudgets::new(&limits(2, 0, 0, &[])).unwrap();
        let t = Instant::now();
        let (a, other) = (ip("198.51.100.7"), ip("198.51.100.8"));
        assert_eq!(b.open(a, t), Ok(()));
        assert_eq!(b.open(a, t), Ok(()));
        let refused = b.open(a, t).unwrap_err();
        assert_eq!(refused.code(), "too_many_connections");
        assert_eq!(refused.status(), 503);
        assert_eq!(refused.retry_after_secs(), 1);
        // Another address is not affected.
        assert_eq!(b.open(other, t), Ok(()));
        b.close(a, t);
        assert_eq!(b.open(a, t), Ok(()));
        // Requests are unlimited with a zero rate.
        for _ in 0..10_000 {
            assert_eq!(b.request(a, t), Ok(()));
        }
    }

    #[test]
    fn request_bucket_refills_at_the_rate_in_simulated_time() {
        let mut b = IpBudgets::new(&limits(0, 10, 5, &[])).unwrap();
        let t0 = Instant::now();
        let a = ip("203.0.113.9");
        for _ in 0..5 {
            assert_eq!(b.request(a, t0), Ok(()));
        }
        let r = b.request(a, t0).unwrap_err();
        assert_eq!(r.code(), "rate_limited");
        assert_eq!(r.status(), 429);
        // One token every 100 ms.
        assert_eq!(
            r,
            Refusal::Rate {
                retry_after: Duration::from_millis(100)
            }
        );
        assert!(b.request(a, t0 + Duration::from_millis(50)).is_err());
        assert_eq!(b.request(a, t0 + Duration::from_millis(110)), Ok(()));
        assert!(b.request(a, t0 + Duration::from_millis(120)).is_err());
        // Sustained: over 10 s at 20 attempts/s, about 10/s get through.
        let mut ok = 0;
        for i in 1..=200u64 {
            if b.request(a, t0 + Duration::from_millis(200 + i * 50))
                .is_ok()
            {
                ok += 1;
            }
        }
        assert!((99..=106).contains(&ok), "{ok}");
        // The bucket never holds more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert_eq!(b.request(a, later), Ok(()));
        }
        assert!(b.request(a, later).is_err());
    }

    #[test]
    fn exempt_networks_and_ipv6_prefixes() {
        let mut b = IpBudgets::new(&limits(1, 1, 1, &["10.0.0.0/8", "2001:db8:ffff::1"])).unwrap();
        let t = Instant::now();
        for _ in 0..100 {
            assert_eq!(b.open(ip("10.1.2.3"), t), Ok(()));
            assert_eq!(b.request(ip("10.1.2.3"), t), Ok(()));
            assert_eq!(b.request(ip("::ffff:10.9.9.9"), t), Ok(()));
            assert_eq!(b.request(ip("2001:db8:ffff::1"), t), Ok(()));
        }
        assert_eq!(b.tracked(), 0);
        // Two addresses of one /64 share a budget; another /64 has its own.
        assert_eq!(b.request(ip("2001:db8:1:2::1"), t), Ok(()));
        assert!(b.request(ip("2001:db8:1:2::ffff"), t).is_err());
        assert_eq!(b.request(ip("2001:db8:1:3::1"), t), Ok(()));
        // IPv4-mapped IPv6 shares the IPv4 address's budget.
        assert_eq!(b.request(ip("192.0.2.1"), t), Ok(()));
        assert!(b.request(ip("::ffff:192.0.2.1"), t).is_err());
        assert!(IpBudgets::new(&limits(1, 1, 1, &["nonsense"])).is_err());
        assert_eq!(
            IpBudgets::new(&limits(1, 5, 0, &[])).unwrap_err(),
            LimitsError::Burst
        );
    }

    #[test]
    fn the_unmetered_requests_are_exactly_those_the_budgets_never_refuse() {
        let metered = IpBudgets::new(&limits(1, 1, 1, &["10.0.0.0/8", "::1"])).unwrap();
        let unmetered = metered.unmetered_requests();
        for (addr, exempt) in [
            ("10.1.2.3", true),
            ("::ffff:10.9.9.9", true),
            ("::1", true),
            ("192.0.2.1", false),
            ("2001:db8::1", false),
        ] {
            assert_eq!(unmetered.contains(ip(addr)), exempt, "{addr}");
            let mut b = IpBudgets::new(&limits(1, 1, 1, &["10.0.0.0/8", "::1"])).unwrap();
            let t = Instant::now();
            let refused = (0..3).any(|_| b.request(ip(addr), t).is_err());
            assert_eq!(refused, !exempt, "{addr}");
        }
        // No request rate: nobody is metered.
        let off = IpBudgets::new(&limits(1, 0, 0, &[])).unwrap();
        assert!(off.unmetered_requests().contains(ip("192.0.2.1")));
    }

    #[test]
    fn the_table_stays_bounded_and_admits_untracked_when_full() {
        let mut b = IpBudgets::new(&limits(1, 1, 1, &[])).unwrap();
        let t = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            let a = IpAddr::V4((0x0a00_0000 + i).into());
            b.open(a, t).unwrap();
        }
        assert_eq!(b.tracked(), MAX_TRACKED);
        // Full of busy entries: a new address is admitted, not tracked.
        let newcomer = ip("198.51.100.1");
        assert_eq!(b.open(newcomer, t), Ok(()));
        assert_eq!(b.tracked(), MAX_TRACKED);
        // Once those connections end and their buckets refill, they are pruned.
        for i in 0..MAX_TRACKED as u32 {
            b.close(
                IpAddr::V4((0x0a00_0000 + i).into()),
                t + Duration::from_secs(5),
            );
        }
        assert_eq!(b.open(newcomer, t + Duration::from_secs(7)), Ok(()));
        assert_eq!(b.tracked(), 1);
        assert!(b.open(newcomer, t + Duration::from_secs(7)).is_err());
    }
}
