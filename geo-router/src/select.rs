//! Edge selection (sans-IO): nearest healthy edge by great-circle distance, spilling to the next
//! nearest when an edge is above its load threshold, with deterministic tie-breaks and a short
//! `why` for operators. Listeners beyond a room's interactive capacity on the chosen edge are sent
//! to HLS.

use amphi_protocol::api::{TierThresholds, WebTransportEndpoint};
use std::fmt::Write;

/// Bytes reserved for a choice's `why`.
const WHY_CAPACITY: usize = 256;

/// Mean Earth radius in kilometres.
const EARTH_RADIUS_KM: f64 = 6371.0;

/// A point on Earth in degrees.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GeoPoint {
    /// Latitude, degrees.
    pub latitude: f64,
    /// Longitude, degrees.
    pub longitude: f64,
}

/// Great-circle distance in kilometres (haversine).
pub fn distance_km(a: GeoPoint, b: GeoPoint) -> f64 {
    let (la1, la2) = (a.latitude.to_radians(), b.latitude.to_radians());
    let dlat = la2 - la1;
    let dlon = (b.longitude - a.longitude).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// `value` with `decimals` (0, 1 or 2) digits after the point, exactly as `{:.N}` writes it
/// (the binary value rounded half to even, the sign of a negative zero kept), without the
/// standard library's general float formatting, which costs more than the rest of a route.
#[derive(Clone, Copy, Debug)]
pub struct Fixed(pub f64, pub u8);

impl Fixed {
    /// `(negative, |value| x 10^decimals rounded half to even)`, or `None` when the value is not
    /// finite, too large for the integer path, or `decimals` is over 2.
    fn scaled(self) -> Option<(bool, u128)> {
        let Fixed(x, decimals) = self;
        let scale: u128 = match decimals {
            0 => 1,
            1 => 10,
            2 => 100,
            _ => return None,
        };
        if !x.is_finite() {
            return None;
        }
        let bits = x.to_bits();
        let negative = bits >> 63 == 1;
        let exponent = ((bits >> 52) & 0x7ff) as i32;
        let fraction = bits & ((1u64 << 52) - 1);
        // x = mantissa * 2^power exactly.
        let (mantissa, power) = match exponent {
            0 => (fraction, -1074),
            e => (fraction | (1u64 << 52), e - 1075),
        };
        let v = u128::from(mantissa) * scale;
        if power >= 0 {
            // v < 2^60: up to 60 more bits fit.
            return (power <= 60).then(|| (negative, v << power));
        }
        let shift = power.unsigned_abs();
        if shift >= 127 {
            // Under half of the last place (v < 2^60).
            return Some((negative, 0));
        }
        let q = v >> shift;
        let rest = v - (q << shift);
        let half = 1u128 << (shift - 1);
        let up = rest > half || (rest == half && q & 1 == 1);
        Some((negative, q + u128::from(up)))
    }
}

/// Bytes [`Fixed::digits`] needs at most (sign, 39 digits, point).
pub const FIXED_MAX: usize = 48;

impl Fixed {
    /// The text, written into the end of `buf`, when the integer path applies and the scaled
    /// value fits 64 bits (else `None`: use `Display`).
    pub fn digits(self, buf: &mut [u8; FIXED_MAX]) -> Option<&str> {
        let (negative, n) = self.scaled()?;
        // 64-bit division when it fits (it always does for coordinates, loads and distances).
        let mut n = u64::try_from(n).ok()?;
        let mut at = buf.len();
        let mut put = |b: u8| {
            at -= 1;
            buf[at] = b;
        };
        for _ in 0..self.1 {
            put(b'0' + (n % 10) as u8);
            n /= 10;
        }
        if self.1 > 0 {
            put(b'.');
        }
        loop {
            put(b'0' + (n % 10) as u8);
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if negative {
            put(b'-');
        }
        // Digits, point and sign are ASCII.
        std::str::from_utf8(&buf[at..]).ok()
    }
}

impl std::fmt::Display for Fixed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; FIXED_MAX];
        match self.digits(&mut buf) {
            Some(text) => f.write_str(text),
            None => write!(f, "{:.*}", usize::from(self.1), self.0),
        }
    }
}

/// What the caller knows about the client.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClientPlace<'a> {
    /// A region was asked for explicitly (dev mode override); its edges only.
    Region(&'a str),
    /// The client's location is known.
    Located(GeoPoint),
    /// Nothing known (loopback, private or unknown address): the default region.
    Unknown,
}

/// A healthy, non-draining edge that may take new sessions.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<'a> {
    /// Edge id.
    pub id: &'a str,
    /// Region name.
    pub region: &'a str,
    /// Where the edge is.
    pub point: GeoPoint,
    /// Public HTTP base URL.
    pub public_url: &'a str,
    /// Its WebTransport listener for push listeners, if any.
    pub webtransport: Option<&'a WebTransportEndpoint>,
    /// Load as a fraction of what the edge can take (max of CPU and participants/capacity).
    pub load: f64,
    /// Interactive sessions of the room being routed, on this edge.
    pub room_interactive: u32,
    /// Push listeners of the room being routed, on this edge.
    pub room_push: u32,
}

/// Selection policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Edges at or above this load take no new sessions while a less loaded one is available.
    pub load_threshold: f64,
    /// Interactive listeners per room per edge; beyond it listeners get push.
    pub interactive_capacity: u32,
    /// Push listeners per room per edge; beyond it listeners get HLS (0: no push tier).
    pub push_capacity: u32,
    /// Keep a room's sessions in a region on as few edges as possible: among the chosen edge's
    /// region's edges under the load threshold, the one already holding most of the room wins.
    pub room_affine: bool,
}

impl Policy {
    /// This policy with a room's own tier thresholds in place of the router's, where it set
    /// them.
    pub fn for_room(self, tiers: Option<TierThresholds>) -> Policy {
        let Some(t) = tiers else {
            return self;
        };
        Policy {
            interactive_capacity: t.interactive.unwrap_or(self.interactive_capacity),
            push_capacity: t.push.unwrap_or(self.push_capacity),
            ..self
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            load_threshold: 0.8,
            interactive_capacity: 500,
            push_capacity: 10_000,
            room_affine: true,
        }
    }
}

/// How a listener hears the room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// WebRTC at the edge (speakers and hosts always).
    Interactive,
    /// The room's program stream over a WebSocket at the edge (`/v1/rooms/{room}/push`).
    Push,
    /// LL-HLS through the CDN.
    Hls,
}

impl Tier {
    /// The route answer's `mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Interactive => "interactive",
            Tier::Push => "push",
            Tier::Hls => "hls",
        }
    }
}

/// The chosen edge and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice<'a> {
    /// Index of the edge in the candidate slice.
    pub index: usize,
    /// The edge.
    pub edge: Candidate<'a>,
    /// How the client listens: interactive unless the room's interactive seats on this edge are
    /// taken (push), and its push seats too (HLS).
    pub tier: Tier,
    /// Short explanation for operators.
    pub why: String,
}

/// Why no edge could be chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    /// No healthy edge at all.
    #[error("no healthy edge available")]
    NoEdge,
    /// The requested region has no healthy edge.
    #[error("no healthy edge in region {0}")]
    UnknownRegion(String),
}

/// Most edge ids one route request may ask to avoid.
pub const MAX_AVOID: usize = 8;

/// Parse a route request's `avoid` value: comma-separated edge ids a client could not reach (its
/// last edge died, or a join failed), at most [`MAX_AVOID`], each 1..=128 printable characters.
pub fn parse_avoid(value: &str) -> Result<Vec<&str>, &'static str> {
    let ids: Vec<&str> = value.split(',').filter(|id| !id.is_empty()).collect();
    if ids.len() > MAX_AVOID {
        return Err("avoid lists at most 8 edge ids");
    }
    if ids
        .iter()
        .any(|id| id.len() > 128 || id.chars().any(char::is_control))
    {
        return Err("avoid ids must be 1..=128 printable characters");
    }
    Ok(ids)
}

/// Drop the edges a client asked to avoid from `candidates`, unless that would leave none (a
/// client-side failure must not route it nowhere: the avoided edge may still be the only one).
pub fn without_avoided<'a>(candidates: Vec<Candidate<'a>>, avoid: &[&str]) -> Vec<Candidate<'a>> {
    if avoid.is_empty() || candidates.iter().all(|c| avoid.contains(&c.id)) {
        return candidates;
    }
    candidates
        .into_iter()
        .filter(|c| !avoid.contains(&c.id))
        .collect()
}

/// Pick an edge for a client. `anchor` is where [`ClientPlace::Unknown`] and
/// [`ClientPlace::Region`] clients are placed (the region's coordinates; `None` when unknown).
/// Order: distance, then load, then id — so equal inputs give equal answers.
pub fn select_edge<'a>(
    place: ClientPlace<'_>,
    anchor: Option<GeoPoint>,
    default_region: &str,
    candidates: &[Candidate<'a>],
    policy: Policy,
    listener: bool,
) -> Result<Choice<'a>, SelectError> {
    // One allocation for the usual `why` (~60 to ~200 bytes), not one per growth step.
    let mut why = String::with_capacity(WHY_CAPACITY);
    let (from, only_region) = match place {
        ClientPlace::Located(p) => {
            why.push_str("located client");
            (Some(p), None)
        }
        ClientPlace::Region(r) => {
            let _ = write!(why, "region {r} requested");
            (anchor, Some(r))
        }
        ClientPlace::Unknown => {
            let _ = write!(
                why,
                "client location unknown: default region {default_region}"
            );
            (anchor, None)
        }
    };
    let home = match place {
        ClientPlace::Unknown => Some(default_region),
        _ => only_region,
    };
    // (index, distance km, in the home region) of every eligible edge.
    let mut order: Vec<(usize, f64, bool)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| only_region.is_none_or(|r| c.region == r))
        .map(|(i, c)| {
            let d = from.map(|p| distance_km(p, c.point)).unwrap_or(0.0);
            (i, d, home.is_some_and(|h| c.region == h))
        })
        .collect();
    if order.is_empty() {
        return Err(match only_region {
            Some(r) => SelectError::UnknownRegion(r.to_string()),
            None => SelectError::NoEdge,
        });
    }
    order.sort_by(|a, b| {
        // Home-region edges first (unknown clients), then nearest, least loaded, id.
        b.2.cmp(&a.2)
            .then(a.1.total_cmp(&b.1))
            .then(candidates[a.0].load.total_cmp(&candidates[b.0].load))
            .then(candidates[a.0].id.cmp(candidates[b.0].id))
    });
    let under = order
        .iter()
        .position(|&(i, _, _)| candidates[i].load < policy.load_threshold);
    let mut pick = match under {
        Some(pos) => pos,
        // Everything is above the threshold: the least loaded, nearest first on ties.
        None => {
            let mut best = 0;
            for (pos, &(i, _, _)) in order.iter().enumerate() {
                if candidates[i].load < candidates[order[best].0].load {
                    best = pos;
                }
            }
            best
        }
    };
    let nearest = pick;
    let affine = under
        .filter(|_| policy.room_affine)
        .and_then(|_| room_affine(candidates, &order, pick, policy, listener));
    if let Some(pos) = affine {
        pick = pos;
    }
    let (index, dist, _) = order[pick];
    let edge = candidates[index].clone();
    let _ = write!(
        why,
        "; {} of {} candidates, {} km, load {}",
        edge.id,
        order.len(),
        Fixed(dist, 0),
        Fixed(edge.load, 2)
    );
    if affine.is_some() {
        let _ = write!(
            why,
            "; room-affine: {} of the room's sessions there",
            edge.room_interactive
        );
    }
    for &(i, _, _) in &order[..nearest] {
        let _ = write!(
            why,
            "; skipped {} (load {} >= {})",
            candidates[i].id,
            Fixed(candidates[i].load, 2),
            Fixed(policy.load_threshold, 2)
        );
    }
    if under.is_none() {
        why.push_str("; every candidate above the load threshold");
    }
    let tier = if !listener || edge.room_interactive < policy.interactive_capacity {
        Tier::Interactive
    } else if edge.room_push < policy.push_capacity {
        Tier::Push
    } else {
        Tier::Hls
    };
    if tier != Tier::Interactive {
        let _ = write!(
            why,
            "; room full on {} ({} >= {} interactive",
            edge.id, edge.room_interactive, policy.interactive_capacity
        );
        if tier == Tier::Hls {
            let _ = write!(why, ", {} >= {} push", edge.room_push, policy.push_capacity);
        }
        let _ = write!(why, "): {}", tier.as_str());
    }
    Ok(Choice {
        index,
        edge,
        tier,
        why,
    })
}

/// The position in `order` of the edge of `order[pick]`'s region, under the load threshold,
/// that holds the most of the room (nearest first on ties), where a listener still fits
/// interactively; `None` when no such edge holds any of the room.
fn room_affine(
    candidates: &[Candidate<'_>],
    order: &[(usize, f64, bool)],
    pick: usize,
    policy: Policy,
    listener: bool,
) -> Option<usize> {
    let region = candidates[order[pick].0].region;
    let mut best: Option<(usize, u32)> = None;
    for (pos, &(i, _, _)) in order.iter().enumerate() {
        let c = &candidates[i];
        let fits = c.region == region
            && c.load < policy.load_threshold
            && c.room_interactive > 0
            && !(listener && c.room_interactive >= policy.interactive_capacity);
        if fits && best.is_none_or(|(_, most)| c.room_interactive > most) {
            best = Some((pos, c.room_interactive));
        }
    }
    best.map(|(pos, _)| pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_writes_what_std_formatting_writes() {
        let mut values = vec![
            0.0,
            -0.0,
            0.125,
            0.375,
            0.5,
            1.5,
            2.5,
            0.005,
            0.045,
            2.675,
            151.005,
            37.4219,
            -122.0841,
            -0.001,
            3865.5,
            1e-300,
            5e-324,
            1e15,
            1e17,
            1e300,
            f64::MAX,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        // Pseudo-random bit patterns (every exponent) and coordinates, loads and distances.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            values.push(f64::from_bits(state));
            values.push((state % 36_000_000) as f64 / 100_000.0 - 180.0);
            values.push(i as f64 / 1000.0);
            values.push((state % 20_000_000) as f64 / 1000.0 + 0.5);
        }
        for x in values {
            for d in 0..=2u8 {
                assert_eq!(
                    Fixed(x, d).to_string(),
                    format!("{:.*}", usize::from(d), x),
                    "{x:e} with {d} decimals"
                );
            }
        }
    }
    use amphi_protocol::config::known_region;

    fn point(region: &str) -> GeoPoint {
        let r = known_region(region).unwrap();
        GeoPoint {
            latitude: r.latitude,
            longitude: r.longitude,
        }
    }

    fn cand(id: &'static str, region: &'static str, load: f64) -> Candidate<'static> {
        Candidate {
            id,
            region,
            point: point(region),
            public_url: "http://edge",
            webtransport: None,
            load,
            room_interactive: 0,
            room_push: 0,
        }
    }

    #[test]
    fn avoided_edges_are_skipped_unless_nothing_else_is_left() {
        let two = vec![
            cand("edge-us-east-1-a", "us-east-1", 0.1),
            cand("edge-us-east-1-b", "us-east-1", 0.5),
        ];
        let choose = |c: &[Candidate<'static>]| {
            select_edge(
                ClientPlace::Located(point("us-east-1")),
                None,
                "us-east-1",
                c,
                Policy::default(),
                false,
            )
            .unwrap()
            .edge
            .id
        };
        assert_eq!(choose(&two), "edge-us-east-1-a");
        let left = without_avoided(two.clone(), &["edge-us-east-1-a"]);
        assert_eq!(choose(&left), "edge-us-east-1-b");
        // Avoiding every edge leaves them all: the client gets one rather than none.
        let all = without_avoided(two.clone(), &["edge-us-east-1-a", "edge-us-east-1-b"]);
        assert_eq!(all, two);
        assert_eq!(without_avoided(two.clone(), &[]), two);
    }

    #[test]
    fn avoid_lists_are_bounded_and_printable() {
        assert_eq!(parse_avoid("a,b").unwrap(), vec!["a", "b"]);
        assert_eq!(parse_avoid("").unwrap(), Vec::<&str>::new());
        assert_eq!(parse_avoid("a,,b,").unwrap(), vec!["a", "b"]);
        assert!(parse_avoid(&["e"; 9].join(",")).is_err());
        assert!(parse_avoid(&"x".repeat(129)).is_err());
        assert!(parse_avoid("a\nb").is_err());
    }

    fn four() -> Vec<Candidate<'static>> {
        vec![
            cand("edge-ap-southeast-2", "ap-southeast-2", 0.1),
            cand("edge-eu-west", "eu-west", 0.1),
            cand("edge-us-east", "us-east", 0.1),
            cand("edge-ap-southeast", "ap-southeast", 0.1),
        ]
    }

    fn pick(
        place: ClientPlace<'_>,
        c: &[Candidate<'static>],
    ) -> Result<Choice<'static>, SelectError> {
        let anchor = match place {
            ClientPlace::Region(r) => known_region(r).map(|_| point(r)),
            _ => Some(point("us-east")),
        };
        select_edge(place, anchor, "us-east", c, Policy::default(), false)
    }

    const PARIS: GeoPoint = GeoPoint {
        latitude: 48.86,
        longitude: 2.35,
    };

    #[test]
    fn distance_is_plausible() {
        let nyc = GeoPoint {
            latitude: 40.71,
            longitude: -74.0,
        };
        let d = distance_km(nyc, point("eu-west-2"));
        assert!((d - 5570.0).abs() < 30.0, "{d}");
        assert_eq!(distance_km(nyc, nyc), 0.0);
    }

    #[test]
    fn nearest_healthy_edge_wins() {
        let c = four();
        let ch = pick(ClientPlace::Located(PARIS), &c).unwrap();
        assert_eq!(ch.edge.id, "edge-eu-west");
        assert!(ch.why.contains("of 4 candidates"), "{}", ch.why);
        let melbourne = GeoPoint {
            latitude: -37.8,
            longitude: 144.96,
        };
        assert_eq!(
            pick(ClientPlace::Located(melbourne), &c).unwrap().edge.id,
            "edge-ap-southeast-2"
        );
        // Without eu-west (unhealthy edges are simply not candidates) Paris goes to us-east.
        let fewer: Vec<_> = c
            .iter()
            .filter(|e| e.id != "edge-eu-west")
            .cloned()
            .collect();
        assert_eq!(
            pick(ClientPlace::Located(PARIS), &fewer).unwrap().edge.id,
            "edge-us-east"
        );
    }

    #[test]
    fn loaded_edges_spill_to_the_next_nearest() {
        let mut c = four();
        c[1].load = 0.95; // eu-west
        let ch = pick(ClientPlace::Located(PARIS), &c).unwrap();
        assert_eq!(ch.edge.id, "edge-us-east");
        assert!(
            ch.why.contains("skipped edge-eu-west (load 0.95"),
            "{}",
            ch.why
        );
        // All loaded: the least loaded one, whatever the distance.
        for e in &mut c {
            e.load = 0.9;
        }
        c[0].load = 0.85;
        let ch = pick(ClientPlace::Located(PARIS), &c).unwrap();
        assert_eq!(ch.edge.id, "edge-ap-southeast-2");
        assert!(ch.why.contains("every candidate above"), "{}", ch.why);
    }

    #[test]
    fn ties_break_on_load_then_id_whatever_the_input_order() {
        let mut c = vec![
            cand("edge-eu-west-b", "eu-west", 0.2),
            cand("edge-eu-west-a", "eu-west", 0.2),
            cand("edge-eu-west-c", "eu-west", 0.1),
        ];
        assert_eq!(
            pick(ClientPlace::Located(PARIS), &c).unwrap().edge.id,
            "edge-eu-west-c"
        );
        c[2].load = 0.2;
        for _ in 0..3 {
            c.rotate_left(1);
            assert_eq!(
                pick(ClientPlace::Located(PARIS), &c).unwrap().edge.id,
                "edge-eu-west-a"
            );
        }
    }

    #[test]
    fn unknown_clients_go_to_the_default_region_then_nearest_to_it() {
        let c = four();
        let ch = pick(ClientPlace::Unknown, &c).unwrap();
        assert_eq!(ch.edge.id, "edge-us-east");
        assert!(ch.why.contains("default region us-east"), "{}", ch.why);
        let mut c2 = c.clone();
        c2[2].load = 0.99;
        // The default region's only edge is loaded: nearest other edge to Virginia.
        assert_eq!(
            pick(ClientPlace::Unknown, &c2).unwrap().edge.id,
            "edge-eu-west"
        );
        let none_home: Vec<_> = c
            .iter()
            .filter(|e| e.region != "us-east")
            .cloned()
            .collect();
        assert_eq!(
            pick(ClientPlace::Unknown, &none_home).unwrap().edge.id,
            "edge-eu-west"
        );
        assert_eq!(pick(ClientPlace::Unknown, &[]), Err(SelectError::NoEdge));
    }

    #[test]
    fn region_override_and_errors() {
        let c = four();
        assert_eq!(
            pick(ClientPlace::Region("eu-west"), &c).unwrap().edge.id,
            "edge-eu-west"
        );
        assert_eq!(
            pick(ClientPlace::Region("mars"), &c),
            Err(SelectError::UnknownRegion("mars".into()))
        );
    }

    #[test]
    fn listeners_beyond_interactive_capacity_get_push_then_hls() {
        let mut c = four();
        c[1].room_interactive = 2;
        let policy = Policy {
            interactive_capacity: 2,
            push_capacity: 3,
            ..Policy::default()
        };
        let at = ClientPlace::Located(PARIS);
        let tier = |c: &[Candidate<'static>], policy: Policy, listener: bool| {
            select_edge(at, None, "us-east", c, policy, listener).unwrap()
        };
        let listener = tier(&c, policy, true);
        assert_eq!(listener.tier, Tier::Push);
        assert!(listener.why.contains("): push"), "{}", listener.why);
        assert_eq!(tier(&c, policy, false).tier, Tier::Interactive);
        c[1].room_push = 3;
        let listener = tier(&c, policy, true);
        assert_eq!(listener.tier, Tier::Hls);
        assert!(
            listener.why.contains("3 >= 3 push): hls"),
            "{}",
            listener.why
        );
        // Speakers always get WebRTC; without a push tier full rooms go straight to HLS.
        assert_eq!(tier(&c, policy, false).tier, Tier::Interactive);
        c[1].room_push = 0;
        let no_push = Policy {
            push_capacity: 0,
            ..policy
        };
        assert_eq!(tier(&c, no_push, true).tier, Tier::Hls);
        c[1].room_interactive = 1;
        assert_eq!(tier(&c, policy, true).tier, Tier::Interactive);
    }

    #[test]
    fn a_rooms_own_thresholds_replace_the_routers_where_set() {
        let router = Policy {
            interactive_capacity: 500,
            push_capacity: 10_000,
            ..Policy::default()
        };
        assert_eq!(router.for_room(None), router);
        let small = router.for_room(Some(TierThresholds {
            interactive: Some(1),
            push: None,
        }));
        assert_eq!(
            (small.interactive_capacity, small.push_capacity),
            (1, 10_000)
        );
        let no_push = router.for_room(Some(TierThresholds {
            interactive: None,
            push: Some(0),
        }));
        assert_eq!(
            (no_push.interactive_capacity, no_push.push_capacity),
            (500, 0)
        );
        // The second listener of a room that keeps one interactive listener per edge: push.
        let mut c = four();
        c[1].room_interactive = 1;
        let at = ClientPlace::Located(PARIS);
        let pick = select_edge(at, None, "us-east", &c, small, true).unwrap();
        assert_eq!(pick.tier, Tier::Push);
        let pick = select_edge(at, None, "us-east", &c, router, true).unwrap();
        assert_eq!(pick.tier, Tier::Interactive);
    }

    #[test]
    fn a_room_stays_on_the_edge_of_its_region_that_holds_it_until_that_edge_is_full() {
        // Two edges in eu-west: a is nearer to Paris, b holds the room.
        let near_b = GeoPoint {
            latitude: 53.0,
            longitude: -8.0,
        };
        let mut c = vec![
            cand("edge-eu-west-a", "eu-west", 0.1),
            Candidate {
                point: near_b,
                ..cand("edge-eu-west-b", "eu-west", 0.2)
            },
            cand("edge-us-east", "us-east", 0.1),
        ];
        c[1].room_interactive = 5;
        let at = ClientPlace::Located(PARIS);
        let policy = Policy::default();
        let chosen = |c: &[Candidate<'static>], policy: Policy, listener: bool| {
            select_edge(at, None, "us-east", c, policy, listener).unwrap()
        };
        for listener in [false, true] {
            let ch = chosen(&c, policy, listener);
            assert_eq!(ch.edge.id, "edge-eu-west-b");
            assert!(ch.why.contains("room-affine: 5"), "{}", ch.why);
        }
        // Without affinity the nearest edge wins.
        let plain = Policy {
            room_affine: false,
            ..policy
        };
        assert_eq!(chosen(&c, plain, false).edge.id, "edge-eu-west-a");
        // The edge holding most of the room wins over one holding less.
        c[0].room_interactive = 3;
        assert_eq!(chosen(&c, policy, false).edge.id, "edge-eu-west-b");
        // Spill: b at the load threshold, or full for interactive listeners.
        c[1].load = 0.8;
        assert_eq!(chosen(&c, policy, false).edge.id, "edge-eu-west-a");
        c[1].load = 0.2;
        let full = Policy {
            interactive_capacity: 5,
            ..policy
        };
        assert_eq!(chosen(&c, full, true).edge.id, "edge-eu-west-a");
        assert_eq!(chosen(&c, full, false).edge.id, "edge-eu-west-b");
        // Affinity never crosses regions: the room on us-east does not pull a Paris client.
        c[0].room_interactive = 0;
        c[1].room_interactive = 0;
        c[2].room_interactive = 40;
        assert_eq!(chosen(&c, policy, false).edge.id, "edge-eu-west-a");
    }
}
