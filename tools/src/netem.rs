//! The link emulator's decisions (sans-IO): which region a packet's addresses belong to, the
//! one-way delay (plus jitter) of the link between them, random loss, partitions, impairments
//! (extra loss and jitter between two groups of networks, e.g. one host's uplink), and a delay
//! queue releasing packets in order when they are due. Driven by `now` and a seeded RNG.

use serde::Deserialize;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// An IPv4 network (`10.77.1.0/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    addr: u32,
    mask: u32,
}

impl Net {
    /// Parse `a.b.c.d/len`.
    pub fn parse(s: &str) -> Result<Net, String> {
        let (a, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s}: not a CIDR"))?;
        let a: Ipv4Addr = a.parse().map_err(|_| format!("{s}: bad address"))?;
        let len: u32 = len.parse().map_err(|_| format!("{s}: bad prefix length"))?;
        if len > 32 {
            return Err(format!("{s}: prefix longer than 32"));
        }
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ok(Net {
            addr: u32::from(a) & mask,
            mask,
        })
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask == self.addr
    }
}

/// A link's behaviour, one way.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Link {
    /// One-way delay.
    pub delay: Duration,
    /// Uniform extra delay in `0..=jitter` (order on the link is kept: a packet never overtakes
    /// an earlier one).
    pub jitter: Duration,
    /// Drop probability, 0..=1.
    pub loss: f64,
}

/// The emulator's configuration file (TOML), re-read by the driver when it changes.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetemFile {
    /// Regions and the networks in them.
    pub regions: Vec<RegionFile>,
    /// Round-trip time inside a region, ms.
    #[serde(default = "default_inside_rtt")]
    pub inside_rtt_ms: f64,
    /// Round-trip times between regions.
    #[serde(default)]
    pub links: Vec<LinkFile>,
    /// Groups of networks between which everything is dropped (both ways).
    #[serde(default)]
    pub partitions: Vec<PartitionFile>,
    /// Extra loss and jitter between groups of networks, on top of their regions' link.
    #[serde(default)]
    pub impairments: Vec<ImpairmentFile>,
    /// RNG seed (loss and jitter decisions).
    #[serde(default)]
    pub seed: u64,
}

/// `[[impairments]]`: packets between any net of `a` and any net of `b` (both ways) are also
/// dropped with `loss_percent` and delayed by up to `jitter_ms` more (kept in order among
/// themselves).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImpairmentFile {
    /// One side (CIDRs).
    pub a: Vec<String>,
    /// The other side (CIDRs).
    pub b: Vec<String>,
    /// Extra jitter each way, ms.
    #[serde(default)]
    pub jitter_ms: f64,
    /// Extra loss each way, percent.
    #[serde(default)]
    pub loss_percent: f64,
}

fn default_inside_rtt() -> f64 {
    1.0
}

/// `[[regions]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegionFile {
    /// Region name.
    pub name: String,
    /// Its networks (CIDR).
    pub nets: Vec<String>,
}

/// `[[links]]`: a region pair, symmetric.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinkFile {
    /// One region.
    pub a: String,
    /// The other.
    pub b: String,
    /// Round-trip time, ms (each way gets half).
    pub rtt_ms: f64,
    /// Jitter each way, ms.
    #[serde(default)]
    pub jitter_ms: f64,
    /// Loss each way, percent.
    #[serde(default)]
    pub loss_percent: f64,
}

/// `[[partitions]]`: traffic between any net of `a` and any net of `b` is dropped.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartitionFile {
    /// One side (CIDRs).
    pub a: Vec<String>,
    /// The other side (CIDRs).
    pub b: Vec<String>,
}

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Release it at this time.
    DeliverAt(Instant),
    /// Drop it (loss or partition).
    Drop,
}

/// A small deterministic RNG (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Configuration errors.
#[derive(Debug, PartialEq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The emulator: classify, decide, and hold packets until they are due.
#[derive(Debug)]
pub struct Emulator {
    nets: Vec<(Net, usize)>,
    /// `links[a * n + b]`: from region a to region b.
    links: Vec<Link>,
    regions: usize,
    partitions: Vec<(Vec<Net>, Vec<Net>)>,
    /// Impairments: sides and the extra behaviour (delay unused).
    impairments: Vec<(Vec<Net>, Vec<Net>, Link)>,
    /// Latest release time per directed region pair (keeps order on a link).
    last_due: Vec<Option<Instant>>,
    /// Latest release time per impairment and direction (`2 * index + (a to b ? 0 : 1)`).
    last_due_impaired: Vec<Option<Instant>>,
    rng: Rng,
}

impl Emulator {
    /// Build from a configuration.
    pub fn new(file: &NetemFile) -> Result<Emulator, ConfigError> {
        let n = file.regions.len();
        let mut names = BTreeMap::new();
        let mut nets = Vec::new();
        for (i, r) in file.regions.iter().enumerate() {
            if names.insert(r.name.clone(), i).is_some() {
                return Err(ConfigError(format!("region {} twice", r.name)));
            }
            for s in &r.nets {
                nets.push((Net::parse(s).map_err(ConfigError)?, i));
            }
        }
        let half = |ms: f64| Duration::from_secs_f64((ms / 2.0).max(0.0) / 1000.0);
        let mut links = vec![Link::default(); n * n];
        for i in 0..n {
            links[i * n + i].delay = half(file.inside_rtt_ms);
        }
        for l in &file.links {
            let idx = |name: &str| {
                names
                    .get(name)
                    .copied()
                    .ok_or_else(|| ConfigError(format!("link names unknown region {name}")))
            };
            let (a, b) = (idx(&l.a)?, idx(&l.b)?);
            if !(0.0..=100.0).contains(&l.loss_percent) {
                return Err(ConfigError(format!("{}-{}: loss out of 0..=100", l.a, l.b)));
            }
            let link = Link {
                delay: half(l.rtt_ms),
                jitter: Duration::from_secs_f64(l.jitter_ms.max(0.0) / 1000.0),
                loss: l.loss_percent / 100.0,
            };
            links[a * n + b] = link;
            links[b * n + a] = link;
        }
        let parse_all = |v: &[String]| {
            v.iter()
                .map(|s| Net::parse(s).map_err(ConfigError))
                .collect::<Result<Vec<_>, _>>()
        };
        let partitions = file
            .partitions
            .iter()
            .map(|p| Ok((parse_all(&p.a)?, parse_all(&p.b)?)))
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let impairments = file
            .impairments
            .iter()
            .map(|i| {
                if !(0.0..=100.0).contains(&i.loss_percent) {
                    return Err(ConfigError("impairment loss out of 0..=100".into()));
                }
                let link = Link {
                    delay: Duration::ZERO,
                    jitter: Duration::from_secs_f64(i.jitter_ms.max(0.0) / 1000.0),
                    loss: i.loss_percent / 100.0,
                };
                Ok((parse_all(&i.a)?, parse_all(&i.b)?, link))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(Emulator {
            nets,
            links,
            regions: n,
            partitions,
            last_due_impaired: vec![None; 2 * impairments.len()],
            impairments,
            last_due: vec![None; n * n],
            rng: Rng::new(file.seed),
        })
    }

    fn region(&self, ip: Ipv4Addr) -> Option<usize> {
        self.nets
            .iter()
            .find(|(net, _)| net.contains(ip))
            .map(|(_, r)| *r)
    }

    /// The first impairment between `src` and `dst`: its direction key and behaviour.
    fn impairment(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Option<(usize, Link)> {
        let inside = |nets: &[Net], ip| nets.iter().any(|n| n.contains(ip));
        self.impairments
            .iter()
            .enumerate()
            .find_map(|(i, (a, b, link))| {
                if inside(a, src) && inside(b, dst) {
                    Some((2 * i, *link))
                } else if inside(b, src) && inside(a, dst) {
                    Some((2 * i + 1, *link))
                } else {
                    None
                }
            })
    }

    fn partitioned(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let inside = |nets: &[Net], ip| nets.iter().any(|n| n.contains(ip));
        self.partitions
            .iter()
            .any(|(a, b)| (inside(a, src) && inside(b, dst)) || (inside(b, src) && inside(a, dst)))
    }

    /// Decide a packet from `src` to `dst` arriving at `now`. Addresses outside every region
    /// pass at once.
    pub fn decide(&mut self, src: Ipv4Addr, dst: Ipv4Addr, now: Instant) -> Decision {
        if self.partitioned(src, dst) {
            return Decision::Drop;
        }
        let (Some(a), Some(b)) = (self.region(src), self.region(dst)) else {
            return Decision::DeliverAt(now);
        };
        let pair = a * self.regions + b;
        let link = self.links[pair];
        if link.loss > 0.0 && self.rng.unit() < link.loss {
            return Decision::Drop;
        }
        let mut jitter = if link.jitter.is_zero() {
            Duration::ZERO
        } else {
            link.jitter.mul_f64(self.rng.unit())
        };
        let impaired = self.impairment(src, dst);
        if let Some((_, extra)) = impaired {
            if extra.loss > 0.0 && self.rng.unit() < extra.loss {
                return Decision::Drop;
            }
            if !extra.jitter.is_zero() {
                jitter += extra.jitter.mul_f64(self.rng.unit());
            }
        }
        let mut at = now + link.delay + jitter;
        // Order is kept on the link, and among an impairment's packets on their own (so the
        // jitter of one impaired flow does not hold back the rest of the link).
        let last = match impaired {
            Some((key, _)) => &mut self.last_due_impaired[key],
            None => &mut self.last_due[pair],
        };
        if let Some(prev) = *last {
            at = at.max(prev);
        }
        *last = Some(at);
        Decision::DeliverAt(at)
    }
}

/// Packets waiting for their release time, released in (time, arrival) order.
#[derive(Debug)]
pub struct DelayQueue<T> {
    heap: BinaryHeap<Held<T>>,
    seq: u64,
}

#[derive(Debug)]
struct Held<T> {
    at: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Held<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Reversed: BinaryHeap is a max-heap, the earliest comes out first.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

impl<T> DelayQueue<T> {
    /// Empty, with room for `capacity` packets before it grows.
    pub fn with_capacity(capacity: usize) -> Self {
        DelayQueue {
            heap: BinaryHeap::with_capacity(capacity),
            seq: 0,
        }
    }

    /// Hold `item` until `at`.
    pub fn push(&mut self, at: Instant, item: T) {
        self.seq += 1;
        self.heap.push(Held {
            at,
            seq: self.seq,
            item,
        });
    }

    /// The next item due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.heap.peek()?.at <= now {
            self.heap.pop().map(|h| h.item)
        } else {
            None
        }
    }

    /// When the next item is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|h| h.at)
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// Source and destination of an IPv4 packet (`None` for anything else or a short header).
pub fn ipv4_addrs(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    Some((src, dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bed(extra: &str) -> NetemFile {
        toml::from_str(&format!(
            r#"
seed = 7
inside_rtt_ms = 1.0
[[regions]]
name = "us"
nets = ["10.77.1.0/24"]
[[regions]]
name = "eu"
nets = ["10.77.2.0/24"]
[[regions]]
name = "ap"
nets = ["10.77.3.0/24"]
[[links]]
a = "us"
b = "eu"
rtt_ms = 75.0
[[links]]
a = "us"
b = "ap"
rtt_ms = 220.0
{extra}
"#
        ))
        .unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn delays_are_half_the_configured_rtt_each_way() {
        let mut e = Emulator::new(&bed("")).unwrap();
        let t0 = Instant::now();
        let us = ip("10.77.1.6");
        let eu = ip("10.77.2.6");
        let ap = ip("10.77.3.6");
        assert_eq!(
            e.decide(us, eu, t0),
            Decision::DeliverAt(t0 + Duration::from_micros(37_500))
        );
        assert_eq!(
            e.decide(ap, us, t0),
            Decision::DeliverAt(t0 + Duration::from_millis(110))
        );
        assert_eq!(
            e.decide(us, ip("10.77.1.10"), t0),
            Decision::DeliverAt(t0 + Duration::from_micros(500))
        );
        // Outside every region (e.g. the core's own address space): no delay.
        assert_eq!(e.decide(ip("192.0.2.1"), us, t0), Decision::DeliverAt(t0));
        // eu <-> ap has no link entry: zero delay, not a panic.
        assert_eq!(e.decide(eu, ap, t0), Decision::DeliverAt(t0));
    }

    #[test]
    fn loss_is_close_to_the_configured_rate_and_reproducible() {
        let extra = "[[links]]\na = \"eu\"\nb = \"ap\"\nrtt_ms = 160.0\nloss_percent = 5.0\n";
        let run = || {
            let mut e = Emulator::new(&bed(extra)).unwrap();
            let t0 = Instant::now();
            (0..20_000)
                .map(|i| {
                    e.decide(
                        ip("10.77.2.6"),
                        ip("10.77.3.6"),
                        t0 + Duration::from_millis(i),
                    ) == Decision::Drop
                })
                .collect::<Vec<bool>>()
        };
        let a = run();
        let dropped = a.iter().filter(|d| **d).count();
        assert!((800..1200).contains(&dropped), "{dropped} of 20000");
        assert_eq!(a, run(), "same seed, same decisions");
    }

    #[test]
    fn jitter_never_reorders_a_link() {
        let extra = "[[links]]\na = \"eu\"\nb = \"ap\"\nrtt_ms = 160.0\njitter_ms = 30.0\n";
        let mut e = Emulator::new(&bed(extra)).unwrap();
        let t0 = Instant::now();
        let mut last = t0;
        let mut spread = Duration::ZERO;
        for i in 0..1000 {
            let now = t0 + Duration::from_millis(i);
            let Decision::DeliverAt(at) = e.decide(ip("10.77.2.6"), ip("10.77.3.6"), now) else {
                panic!("no loss configured");
            };
            assert!(at >= last, "packet {i} overtakes");
            assert!(at >= now + Duration::from_millis(80));
            assert!(at <= now + Duration::from_millis(110) + Duration::from_millis(30));
            spread = spread.max(at - now - Duration::from_millis(80));
            last = at;
        }
        assert!(
            spread > Duration::from_millis(20),
            "jitter applied: {spread:?}"
        );
    }

    #[test]
    fn impairments_add_loss_and_jitter_only_between_their_sides() {
        let extra = "[[impairments]]\na = [\"10.77.1.28/30\"]\nb = [\"10.77.1.8/30\"]\n\
                     loss_percent = 5.0\njitter_ms = 30.0\n";
        let mut e = Emulator::new(&bed(extra)).unwrap();
        let t0 = Instant::now();
        let (edge, origin, other) = (ip("10.77.1.30"), ip("10.77.1.10"), ip("10.77.1.14"));
        let (mut dropped, mut spread, mut last) = (0, Duration::ZERO, t0);
        for i in 0..4000u64 {
            let now = t0 + Duration::from_millis(i);
            let (src, dst) = if i % 2 == 0 {
                (edge, origin)
            } else {
                (origin, edge)
            };
            match e.decide(src, dst, now) {
                Decision::Drop => dropped += 1,
                Decision::DeliverAt(at) => {
                    assert!(at <= now + Duration::from_micros(500) + Duration::from_millis(30));
                    spread = spread.max(at - now);
                    if src == edge {
                        assert!(at >= last, "packet {i} overtakes");
                        last = at;
                    }
                }
            }
        }
        assert!((120..280).contains(&dropped), "{dropped} of 4000");
        assert!(spread > Duration::from_millis(20), "{spread:?}");
        // Another host in the same region: the plain 0.5 ms, never held back.
        for i in 0..100 {
            let now = t0 + Duration::from_millis(i);
            assert_eq!(
                e.decide(other, origin, now),
                Decision::DeliverAt(now + Duration::from_micros(500))
            );
        }
    }

    #[test]
    fn partitions_drop_both_ways_and_only_between_their_sides() {
        let extra =
            "[[partitions]]\na = [\"10.77.2.0/24\"]\nb = [\"10.77.1.8/30\", \"10.77.1.12/30\"]\n";
        let mut e = Emulator::new(&bed(extra)).unwrap();
        let t0 = Instant::now();
        let eu = ip("10.77.2.6");
        let origin = ip("10.77.1.10");
        assert_eq!(e.decide(eu, origin, t0), Decision::Drop);
        assert_eq!(e.decide(origin, eu, t0), Decision::Drop);
        assert_eq!(e.decide(ip("10.77.1.14"), eu, t0), Decision::Drop);
        assert!(matches!(
            e.decide(eu, ip("10.77.1.6"), t0),
            Decision::DeliverAt(_)
        ));
        assert!(matches!(
            e.decide(origin, ip("10.77.1.6"), t0),
            Decision::DeliverAt(_)
        ));
    }

    #[test]
    fn bad_configs_are_errors() {
        let mut f = bed("");
        f.links[0].b = "mars".into();
        assert!(Emulator::new(&f).is_err());
        let mut f = bed("");
        f.regions[0].nets[0] = "10.77.1.0/40".into();
        assert!(Emulator::new(&f).is_err());
        let mut f = bed("");
        f.links[0].loss_percent = 150.0;
        assert!(Emulator::new(&f).is_err());
    }

    #[test]
    fn delay_queue_releases_in_time_then_arrival_order() {
        let t0 = Instant::now();
        let mut q = DelayQueue::with_capacity(4);
        q.push(t0 + Duration::from_millis(10), "b");
        q.push(t0 + Duration::from_millis(5), "a");
        q.push(t0 + Duration::from_millis(10), "c");
        assert_eq!(q.next_due(), Some(t0 + Duration::from_millis(5)));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(4)), None);
        assert_eq!(q.pop_due(t0 + Duration::from_millis(5)), Some("a"));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(9)), None);
        assert_eq!(q.pop_due(t0 + Duration::from_millis(20)), Some("b"));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(20)), Some("c"));
        assert!(q.is_empty());
    }

    #[test]
    fn ipv4_header_addresses() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[10, 77, 1, 6]);
        p[16..20].copy_from_slice(&[10, 77, 2, 6]);
        assert_eq!(ipv4_addrs(&p), Some((ip("10.77.1.6"), ip("10.77.2.6"))));
        assert_eq!(ipv4_addrs(&p[..19]), None);
        p[0] = 0x60;
        assert_eq!(ipv4_addrs(&p), None);
    }
}
