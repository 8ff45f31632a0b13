//! `amphi-tools plan`: fleet sizes and CDN egress for a target audience, from the per-node figures in
//! `docs/capacity-figures.toml` (measured rows of BENCHMARKS.md, measured figures of dependencies, and marked
//! assumptions). The computation is a pure function of its inputs; the command prints it with the
//! arithmetic and the figure each line rests on (docs/capacity.md is that output).

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The figures table, embedded at build time.
pub const FIGURES_TOML: &str = include_str!("../../docs/capacity-figures.toml");

/// Opus frames (and relay packets) per second of one speaker: 20 ms frames.
const PACKETS_PER_SPEAKER_S: f64 = 50.0;
/// LL-HLS parts per second: 200 ms parts.
const PARTS_PER_S: f64 = 5.0;
/// Speakers an interactive listener receives: the loudest three (ARCHITECTURE.md).
const FORWARDED_SPEAKERS: f64 = 3.0;
/// Seconds in an hour.
const HOUR_S: f64 = 3600.0;
/// Push messages per second to one push listener: 5 frames of 20 ms per message, as a busy edge
/// (1,000 push listeners or more) sends them.
const PUSH_MESSAGES_PER_S: f64 = 50.0 / 5.0;

/// One figure of the table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Figure {
    /// The value.
    pub value: f64,
    /// What it measures.
    pub unit: String,
    /// `BENCHMARKS.md: <row>`, `dependency: <crate>` or `assumed: <why>` (or `--figure` override).
    pub source: String,
}

/// The per-node figures a plan rests on.
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    /// By name.
    pub by_name: BTreeMap<String, Figure>,
}

/// Names every figures table must define.
pub const FIGURE_NAMES: [&str; 14] = [
    "mixer_realtime_factor",
    "program_bitrate_bps",
    "opus_encode_us",
    "opus_decode_us",
    "origin_datagrams_per_core_s",
    "edge_packets_per_core_s",
    "packager_requests_per_core_s",
    "speaker_packet_wire_bytes",
    "part_overhead_bytes",
    "playlist_response_bytes",
    "http_response_overhead_bytes",
    "edge_push_listener_us_s",
    "push_message_bytes",
    "push_message_overhead_bytes",
];

impl Figures {
    /// Parse a figures table and check it defines every figure with a positive value.
    pub fn parse(text: &str) -> Result<Figures> {
        let by_name: BTreeMap<String, Figure> =
            toml::from_str(text).context("parsing the capacity figures table")?;
        for name in FIGURE_NAMES {
            let f = by_name
                .get(name)
                .with_context(|| format!("figure {name} is missing"))?;
            if !(f.value.is_finite() && f.value > 0.0) {
                bail!("figure {name} must be positive, not {}", f.value);
            }
        }
        if let Some(extra) = by_name.keys().find(|k| !FIGURE_NAMES.contains(&k.as_str())) {
            bail!("unknown figure {extra}");
        }
        Ok(Figures { by_name })
    }

    /// The embedded table.
    pub fn embedded() -> Figures {
        Figures::parse(FIGURES_TOML).expect("docs/capacity-figures.toml is valid (unit tested)")
    }

    /// Replace a figure's value (`name=value` from `--figure`).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (name, value) = assignment
            .split_once('=')
            .context("--figure takes name=value")?;
        let value: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("--figure {name}: not a number"))?;
        if !(value.is_finite() && value > 0.0) {
            bail!("--figure {name}: must be positive");
        }
        let f = self
            .by_name
            .get_mut(name.trim())
            .with_context(|| format!("--figure: unknown figure {name}"))?;
        f.value = value;
        f.source = "--figure (command line)".into();
        Ok(())
    }

    fn v(&self, name: &str) -> f64 {
        self.by_name[name].value
    }

    fn src(&self, name: &str) -> &str {
        &self.by_name[name].source
    }
}

/// What to plan for.
#[derive(Clone, Debug, PartialEq)]
pub struct Inputs {
    /// Concurrent listeners, all rooms together.
    pub listeners: u64,
    /// Concurrent live rooms.
    pub rooms: u64,
    /// Regions with an edge group, and the share of participants each serves (sums to 1).
    pub regions: Vec<(String, f64)>,
    /// Speakers per room.
    pub speakers_per_room: u32,
    /// Interactive (WebRTC) listeners per room; the next ones listen over push.
    pub interactive_per_room: u32,
    /// Push listeners per room (WebSocket at the edges); the rest listen over LL-HLS through the
    /// CDN.
    pub push_per_room: u32,
    /// Fraction of a node's cores the plan fills (headroom for bursts and failover).
    pub target_utilization: f64,
    /// Cores of an edge node.
    pub edge_cores: u32,
    /// Cores of an origin.
    pub origin_cores: u32,
    /// Cores of a packager.
    pub packager_cores: u32,
    /// Minimum edge nodes per region (redundancy).
    pub min_edges_per_region: u32,
    /// The router puts a room's participants of one region on one edge (until it fills), instead
    /// of the load balancer spreading them: each edge then receives only its rooms' speakers.
    pub room_affine: bool,
    /// CDN regional caches that each fetch every playlist update from the packager.
    pub cdn_fill_caches: u32,
    /// US dollars per GB of CDN egress.
    pub cdn_usd_per_gb: f64,
    /// US dollars per 10,000 CDN HTTPS requests.
    pub cdn_usd_per_10k_requests: f64,
    /// US dollars per GB of edge (EC2 internet) egress.
    pub edge_usd_per_gb: f64,
    /// Hours the concurrency is sustained in a month (730 = all month).
    pub hours_per_month: f64,
}

/// One region's edge group.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionPlan {
    /// Region name.
    pub name: String,
    /// Share of participants.
    pub share: f64,
    /// Interactive listeners connected to the region's edges.
    pub interactive: f64,
    /// Speakers connected to the region's edges.
    pub speakers: f64,
    /// Push listeners connected to the region's edges.
    pub push: f64,
    /// Distinct edges of this region a room's push listeners sit on (each takes the room's
    /// program from the origin).
    pub push_edges_per_room: f64,
    /// Edge cores serving push listeners (included in `cores`).
    pub push_cores: f64,
    /// Distinct edges of this region a room's participants sit on (relay fan-out targets).
    pub edges_per_room: f64,
    /// SRTP packets out per second (to listeners and speakers).
    pub packets_out_s: f64,
    /// Packets in per second (speaker uplinks and relay frames from the origin).
    pub packets_in_s: f64,
    /// Cores needed at the target utilization.
    pub cores: f64,
    /// Edge nodes.
    pub nodes: u64,
    /// Egress to clients, bit/s.
    pub egress_bps: f64,
}

/// The computed plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The inputs it was computed from.
    pub inputs: Inputs,
    /// The figures it rests on.
    pub figures: Figures,
    /// Listeners per room.
    pub listeners_per_room: f64,
    /// Interactive listeners per room (capped by the audience).
    pub interactive_per_room: f64,
    /// Push listeners per room (capped by the audience left).
    pub push_per_room: f64,
    /// Passive (LL-HLS) listeners, all rooms.
    pub passive: f64,
    /// Edge groups.
    pub regions: Vec<RegionPlan>,
    /// Mixer CPU of one room, in cores.
    pub mixer_cores_per_room: f64,
    /// Mixer cores for all rooms at the target utilization.
    pub mixer_cores: f64,
    /// Relay datagrams per second through the origins (in + out).
    pub relay_datagrams_s: f64,
    /// Relay cores at the target utilization.
    pub relay_cores: f64,
    /// Origins.
    pub origins: u64,
    /// Playlist requests per second reaching the packagers (CDN fills).
    pub packager_requests_s: f64,
    /// Packagers (at least one per origin).
    pub packagers: u64,
    /// CDN bytes per second to one passive listener, as bit/s.
    pub bps_per_listener: f64,
    /// CDN egress, bit/s.
    pub cdn_egress_bps: f64,
    /// CDN requests per second.
    pub cdn_requests_s: f64,
    /// CDN egress per month, GB.
    pub cdn_gb_month: f64,
    /// CDN egress cost per month, USD.
    pub cdn_egress_usd_month: f64,
    /// CDN request cost per month, USD.
    pub cdn_requests_usd_month: f64,
    /// Edge egress, all regions, bit/s.
    pub edge_egress_bps: f64,
    /// Edge egress cost per month, USD.
    pub edge_egress_usd_month: f64,
    /// What one listener-hour costs on each tier.
    pub tiers: [TierCost; 3],
}

/// One listener tier's cost per listener-hour.
#[derive(Clone, Debug, PartialEq)]
pub struct TierCost {
    /// `WebRTC`, `push` or `LL-HLS`.
    pub tier: &'static str,
    /// Bits per second to the listener, on the wire.
    pub bps: f64,
    /// HTTP requests per second the listener makes (LL-HLS only).
    pub requests_s: f64,
    /// Edge cores per 1,000 listeners (before the utilization target).
    pub edge_cores_per_1000: f64,
    /// Egress and request cost of one listener-hour, USD.
    pub usd_per_hour: f64,
}

impl Inputs {
    fn check(&self) -> Result<()> {
        if self.listeners == 0 || self.rooms == 0 {
            bail!("listeners and rooms must be positive");
        }
        if self.speakers_per_room == 0 {
            bail!("a room needs at least one speaker");
        }
        if self.regions.is_empty() {
            bail!("at least one region");
        }
        let total: f64 = self.regions.iter().map(|r| r.1).sum();
        if (total - 1.0).abs() > 1e-6 || self.regions.iter().any(|r| r.1 <= 0.0) {
            bail!("region shares must be positive and sum to 1 (they sum to {total})");
        }
        if !(self.target_utilization > 0.0 && self.target_utilization <= 1.0) {
            bail!("target utilization must be in (0, 1]");
        }
        if self.edge_cores == 0 || self.origin_cores == 0 || self.packager_cores == 0 {
            bail!("node core counts must be positive");
        }
        Ok(())
    }
}

fn nodes(cores: f64, per_node: u32) -> u64 {
    // A hair of tolerance so 12.000000001 cores stays 12.
    ((cores / per_node as f64) - 1e-9).ceil().max(0.0) as u64
}

/// Compute a plan.
pub fn compute(inputs: &Inputs, figures: &Figures) -> Result<Plan> {
    inputs.check()?;
    let f = figures;
    let u = inputs.target_utilization;
    let rooms = inputs.rooms as f64;
    let speakers = inputs.speakers_per_room as f64;
    let listeners_per_room = inputs.listeners as f64 / rooms;
    let interactive_per_room = (inputs.interactive_per_room as f64).min(listeners_per_room);
    let push_per_room =
        (inputs.push_per_room as f64).min(listeners_per_room - interactive_per_room);
    let passive = inputs.listeners as f64 - (interactive_per_room + push_per_room) * rooms;
    let push_wire_bytes = f.v("push_message_bytes") + f.v("push_message_overhead_bytes");

    // Edges: every interactive listener gets the loudest three speakers, every speaker the others
    // (up to three); every edge holding a room's participants receives every speaker packet of it.
    let per_listener = FORWARDED_SPEAKERS.min(speakers);
    let per_speaker = FORWARDED_SPEAKERS.min(speakers - 1.0);
    let mut regions = Vec::new();
    for (name, share) in &inputs.regions {
        let interactive = interactive_per_room * rooms * share;
        let spk = speakers * rooms * share;
        let participants_per_room = (interactive_per_room + speakers) * share;
        // First estimate of the group size, then the fan-out it implies: a room's participants in
        // this region spread over at most that many edges.
        let packets_out_s =
            PACKETS_PER_SPEAKER_S * (interactive * per_listener + spk * per_speaker);
        let base_cores =
            (packets_out_s + spk * PACKETS_PER_SPEAKER_S) / (f.v("edge_packets_per_core_s") * u);
        let base_nodes =
            nodes(base_cores, inputs.edge_cores).max(inputs.min_edges_per_region as u64) as f64;
        let edges_per_room = if inputs.room_affine {
            1.0
        } else {
            participants_per_room.clamp(1.0, base_nodes.max(1.0))
        };
        let relay_in = rooms * speakers * PACKETS_PER_SPEAKER_S * edges_per_room;
        let packets_in_s = spk * PACKETS_PER_SPEAKER_S + relay_in;
        let push = push_per_room * rooms * share;
        let push_cores = push * f.v("edge_push_listener_us_s") / 1e6 / u;
        let cores =
            (packets_out_s + packets_in_s) / (f.v("edge_packets_per_core_s") * u) + push_cores;
        let n = nodes(cores, inputs.edge_cores).max(inputs.min_edges_per_region as u64);
        // Each edge holding push listeners of a room subscribes to its program at the origin;
        // like the other participants, they spread over the region's edges unless room-affine.
        let in_region = push_per_room * share;
        let push_edges_per_room = if in_region <= 0.0 {
            0.0
        } else if inputs.room_affine {
            1.0
        } else {
            in_region.clamp(1.0, n as f64)
        };
        let egress_bps = packets_out_s * f.v("speaker_packet_wire_bytes") * 8.0
            + push * PUSH_MESSAGES_PER_S * push_wire_bytes * 8.0;
        regions.push(RegionPlan {
            name: name.clone(),
            share: *share,
            interactive,
            speakers: spk,
            push,
            push_edges_per_room,
            push_cores,
            edges_per_room,
            packets_out_s,
            packets_in_s,
            cores,
            nodes: n,
            egress_bps,
        });
    }

    // Origins: the mixer scales with the speakers decoded; the relay with the fan-out.
    let enc = f.v("opus_encode_us");
    let dec = f.v("opus_decode_us");
    let mixer_cores_per_room =
        (1.0 / f.v("mixer_realtime_factor")) * (enc + speakers * dec) / (enc + 3.0 * dec);
    let mixer_cores = rooms * mixer_cores_per_room / u;
    let fanout: f64 = regions.iter().map(|r| r.edges_per_room).sum();
    let push_fanout: f64 = regions.iter().map(|r| r.push_edges_per_room).sum();
    let relay_datagrams_s = rooms * speakers * PACKETS_PER_SPEAKER_S * (1.0 + fanout)
        + rooms * PACKETS_PER_SPEAKER_S * (1.0 + push_fanout);
    let relay_cores = relay_datagrams_s / (f.v("origin_datagrams_per_core_s") * u);
    let origins = nodes(mixer_cores + relay_cores, inputs.origin_cores).max(1);

    // Packagers: the CDN's regional caches each fetch every playlist update once.
    let packager_requests_s = rooms * PARTS_PER_S * inputs.cdn_fill_caches as f64;
    let packager_cores = packager_requests_s / (f.v("packager_requests_per_core_s") * u);
    let packagers = nodes(packager_cores, inputs.packager_cores).max(origins);

    // CDN: each passive listener fetches every part and every playlist update (LL-HLS).
    let http = f.v("http_response_overhead_bytes");
    let bps_per_listener = f.v("program_bitrate_bps")
        + PARTS_PER_S * 8.0 * (f.v("part_overhead_bytes") + http)
        + PARTS_PER_S * 8.0 * (f.v("playlist_response_bytes") + http);
    let cdn_egress_bps = passive * bps_per_listener;
    let cdn_requests_s = passive * PARTS_PER_S * 2.0;
    let month_s = inputs.hours_per_month * HOUR_S;
    let cdn_gb_month = cdn_egress_bps / 8.0 * month_s / 1e9;
    let cdn_egress_usd_month = cdn_gb_month * inputs.cdn_usd_per_gb;
    let cdn_requests_usd_month = cdn_requests_s * month_s / 1e4 * inputs.cdn_usd_per_10k_requests;
    let edge_egress_bps: f64 = regions.iter().map(|r| r.egress_bps).sum();
    let edge_egress_usd_month = edge_egress_bps / 8.0 * month_s / 1e9 * inputs.edge_usd_per_gb;
    let hour_gb = |bps: f64| bps / 8.0 * HOUR_S / 1e9;
    let webrtc_bps = PACKETS_PER_SPEAKER_S
        * FORWARDED_SPEAKERS.min(speakers)
        * f.v("speaker_packet_wire_bytes")
        * 8.0;
    let push_bps = PUSH_MESSAGES_PER_S * push_wire_bytes * 8.0;
    let hls_requests_s = PARTS_PER_S * 2.0;
    let tiers = [
        TierCost {
            tier: "WebRTC",
            bps: webrtc_bps,
            requests_s: 0.0,
            edge_cores_per_1000: 1000.0 * PACKETS_PER_SPEAKER_S * FORWARDED_SPEAKERS.min(speakers)
                / f.v("edge_packets_per_core_s"),
            usd_per_hour: hour_gb(webrtc_bps) * inputs.edge_usd_per_gb,
        },
        TierCost {
            tier: "push",
            bps: push_bps,
            requests_s: 0.0,
            edge_cores_per_1000: 1000.0 * f.v("edge_push_listener_us_s") / 1e6,
            usd_per_hour: hour_gb(push_bps) * inputs.edge_usd_per_gb,
        },
        TierCost {
            tier: "LL-HLS",
            bps: bps_per_listener,
            requests_s: hls_requests_s,
            edge_cores_per_1000: 0.0,
            usd_per_hour: hour_gb(bps_per_listener) * inputs.cdn_usd_per_gb
                + hls_requests_s * HOUR_S / 1e4 * inputs.cdn_usd_per_10k_requests,
        },
    ];

    Ok(Plan {
        inputs: inputs.clone(),
        figures: figures.clone(),
        listeners_per_room,
        interactive_per_room,
        push_per_room,
        passive,
        regions,
        mixer_cores_per_room,
        mixer_cores,
        relay_datagrams_s,
        relay_cores,
        origins,
        packager_requests_s,
        packagers,
        bps_per_listener,
        cdn_egress_bps,
        cdn_requests_s,
        cdn_gb_month,
        cdn_egress_usd_month,
        cdn_requests_usd_month,
        edge_egress_bps,
        edge_egress_usd_month,
        tiers,
    })
}

/// A number with thousands separators and `decimals` decimals.
fn n(x: f64, decimals: usize) -> String {
    let s = format!("{:.*}", decimals, x.abs());
    let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(a, b)| (a, b));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if x < 0.0 {
        out.insert(0, '-');
    }
    out
}

/// Render a plan with its arithmetic; every line names the figure it rests on.
pub fn render(p: &Plan) -> String {
    let i = &p.inputs;
    let f = &p.figures;
    let u = i.target_utilization;
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(
        w,
        "amphi capacity plan: {} listeners in {} rooms, {} speakers per room, regions {}",
        n(i.listeners as f64, 0),
        n(i.rooms as f64, 0),
        i.speakers_per_room,
        i.regions
            .iter()
            .map(|(r, s)| format!("{r} ({:.0}%)", s * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        w,
        "nodes filled to {:.0}% of their cores; edge {} cores, origin {}, packager {}\n",
        u * 100.0,
        i.edge_cores,
        i.origin_cores,
        i.packager_cores
    );
    let _ = writeln!(w, "figures");
    for name in FIGURE_NAMES {
        let fig = &f.by_name[name];
        let _ = writeln!(
            w,
            "  {name} = {}  ({}) [{}]",
            n(fig.value, 0),
            fig.unit,
            fig.source
        );
    }

    let _ = writeln!(w, "\naudience");
    let _ = writeln!(
        w,
        "  listeners per room = {} / {} = {}",
        n(i.listeners as f64, 0),
        n(i.rooms as f64, 0),
        n(p.listeners_per_room, 1)
    );
    let _ = writeln!(
        w,
        "  interactive (WebRTC) per room = min({}, {}) = {}; push per room = min({}, the rest) = {}; passive (LL-HLS) = {} - ({} + {}) x {} = {}",
        i.interactive_per_room,
        n(p.listeners_per_room, 1),
        n(p.interactive_per_room, 1),
        i.push_per_room,
        n(p.push_per_room, 1),
        n(i.listeners as f64, 0),
        n(p.interactive_per_room, 1),
        n(p.push_per_room, 1),
        n(i.rooms as f64, 0),
        n(p.passive, 0)
    );

    let _ = writeln!(w, "\nedges (per region)");
    let _ = writeln!(
        w,
        "  packets out/s = 50 x (interactive x {} + speakers x {}); packets in/s = speakers x 50 + rooms x {} x 50 x edges per room",
        n(FORWARDED_SPEAKERS.min(i.speakers_per_room as f64), 0),
        n(FORWARDED_SPEAKERS.min(i.speakers_per_room as f64 - 1.0), 0),
        i.speakers_per_room
    );
    let _ = writeln!(
        w,
        "  edges per room = {}",
        if i.room_affine {
            "1 (room-affine placement)"
        } else {
            "min(the room's participants in the region, the region's edges): the load balancer spreads them"
        }
    );
    let _ = writeln!(
        w,
        "  cores = (out + in) / (edge_packets_per_core_s {} x {u}) + push listeners x edge_push_listener_us_s {} / 1e6 / {u} [{}; {}]",
        n(f.v("edge_packets_per_core_s"), 0),
        f.v("edge_push_listener_us_s"),
        f.src("edge_packets_per_core_s"),
        f.src("edge_push_listener_us_s")
    );
    if i.push_per_room > 0 {
        let _ = writeln!(
            w,
            "  push egress = push listeners x 50/5 messages/s x (push_message_bytes {} + push_message_overhead_bytes {}) x 8 [{}; {}]",
            n(f.v("push_message_bytes"), 0),
            n(f.v("push_message_overhead_bytes"), 0),
            f.src("push_message_bytes"),
            f.src("push_message_overhead_bytes")
        );
    }
    for r in &p.regions {
        if r.push > 0.0 {
            let _ = writeln!(
                w,
                "  {}: push {} -> {} cores; a room's push listeners on {} edges",
                r.name,
                n(r.push, 0),
                n(r.push_cores, 1),
                n(r.push_edges_per_room, 1)
            );
        }
        let _ = writeln!(
            w,
            "  {}: interactive {} + speakers {}; edges per room {}; out {} + in {} pkt/s -> {} cores -> {} nodes; egress {} Gbit/s (x {} B/pkt)",
            r.name,
            n(r.interactive, 0),
            n(r.speakers, 0),
            n(r.edges_per_room, 1),
            n(r.packets_out_s, 0),
            n(r.packets_in_s, 0),
            n(r.cores, 1),
            r.nodes,
            n(r.egress_bps / 1e9, 2),
            n(f.v("speaker_packet_wire_bytes"), 0)
        );
    }
    let total_edges: u64 = p.regions.iter().map(|r| r.nodes).sum();
    let _ = writeln!(w, "  total edge nodes = {total_edges}");
    let most_edges = u64::from(amphi_protocol::ids::MAX_EDGE_INDEX) + 1;
    if total_edges > most_edges {
        let _ = writeln!(
            w,
            "  WARNING: more than {most_edges} edges: the edge index (the high 12 bits of participant ids) runs out; use bigger edge nodes (--edge-cores)"
        );
    }

    let _ = writeln!(w, "\norigins");
    let _ = writeln!(
        w,
        "  mixer cores per room = (1 / mixer_realtime_factor {}) x (encode {} + {} x decode {}) / ({} + 3 x {}) = {} [{}; {}; {}]",
        n(f.v("mixer_realtime_factor"), 0),
        n(f.v("opus_encode_us"), 0),
        i.speakers_per_room,
        n(f.v("opus_decode_us"), 0),
        n(f.v("opus_encode_us"), 0),
        n(f.v("opus_decode_us"), 0),
        n(p.mixer_cores_per_room, 5),
        f.src("mixer_realtime_factor"),
        f.src("opus_encode_us"),
        f.src("opus_decode_us")
    );
    let _ = writeln!(
        w,
        "  mixer cores = {} rooms x {} / {u} = {}",
        n(i.rooms as f64, 0),
        n(p.mixer_cores_per_room, 5),
        n(p.mixer_cores, 1)
    );
    let fanout: f64 = p.regions.iter().map(|r| r.edges_per_room).sum();
    let _ = writeln!(
        w,
        "  relay datagrams/s = rooms x {} speakers x 50 x (1 in + {} edges out) + rooms x 50 program x (1 packager + {} push edges) = {}",
        i.speakers_per_room,
        n(fanout, 1),
        n(p.regions.iter().map(|r| r.push_edges_per_room).sum::<f64>(), 1),
        n(p.relay_datagrams_s, 0)
    );
    let _ = writeln!(
        w,
        "  relay cores = {} / (origin_datagrams_per_core_s {} x {u}) = {} [{}]",
        n(p.relay_datagrams_s, 0),
        n(f.v("origin_datagrams_per_core_s"), 0),
        n(p.relay_cores, 1),
        f.src("origin_datagrams_per_core_s")
    );
    let _ = writeln!(
        w,
        "  origins = ceil(({} + {}) / {} cores) = {}",
        n(p.mixer_cores, 1),
        n(p.relay_cores, 1),
        i.origin_cores,
        p.origins
    );

    let _ = writeln!(w, "\npackagers");
    let _ = writeln!(
        w,
        "  playlist fills/s = {} rooms x 5 parts/s x {} CDN regional caches = {}",
        n(i.rooms as f64, 0),
        i.cdn_fill_caches,
        n(p.packager_requests_s, 0)
    );
    let _ = writeln!(
        w,
        "  packagers = max(origins {}, ceil({} / (packager_requests_per_core_s {} x {u}) / {} cores)) = {} [{}]",
        p.origins,
        n(p.packager_requests_s, 0),
        n(f.v("packager_requests_per_core_s"), 0),
        i.packager_cores,
        p.packagers,
        f.src("packager_requests_per_core_s")
    );

    let _ = writeln!(
        w,
        "\nCDN (passive listeners, LL-HLS: every part and every playlist update)"
    );
    let _ = writeln!(
        w,
        "  bit/s per listener = program {} + 5 x 8 x (part headers {} + HTTP {}) + 5 x 8 x (playlist {} + HTTP {}) = {} [{}; {}; {}; {}]",
        n(f.v("program_bitrate_bps"), 0),
        n(f.v("part_overhead_bytes"), 0),
        n(f.v("http_response_overhead_bytes"), 0),
        n(f.v("playlist_response_bytes"), 0),
        n(f.v("http_response_overhead_bytes"), 0),
        n(p.bps_per_listener, 0),
        f.src("program_bitrate_bps"),
        f.src("part_overhead_bytes"),
        f.src("playlist_response_bytes"),
        f.src("http_response_overhead_bytes")
    );
    let _ = writeln!(
        w,
        "  egress = {} x {} = {} Gbit/s",
        n(p.passive, 0),
        n(p.bps_per_listener, 0),
        n(p.cdn_egress_bps / 1e9, 2)
    );
    let _ = writeln!(
        w,
        "  per month ({} h) = {} Gbit/s / 8 x {} s = {} GB; x ${}/GB = ${}",
        n(i.hours_per_month, 0),
        n(p.cdn_egress_bps / 1e9, 2),
        n(i.hours_per_month * HOUR_S, 0),
        n(p.cdn_gb_month, 0),
        i.cdn_usd_per_gb,
        n(p.cdn_egress_usd_month, 0)
    );
    let _ = writeln!(
        w,
        "  requests/s = {} x (5 parts + 5 playlists) = {}; per month x ${}/10k = ${}",
        n(p.passive, 0),
        n(p.cdn_requests_s, 0),
        i.cdn_usd_per_10k_requests,
        n(p.cdn_requests_usd_month, 0)
    );
    let _ = writeln!(
        w,
        "  edge egress (WebRTC and push) = {} Gbit/s; per month x ${}/GB = ${}",
        n(p.edge_egress_bps / 1e9, 2),
        i.edge_usd_per_gb,
        n(p.edge_egress_usd_month, 0)
    );

    let _ = writeln!(
        w,
        "\ncost per listener-hour (egress at ${}/GB from edges, ${}/GB and ${}/10k requests from the CDN; compute not priced)",
        i.edge_usd_per_gb, i.cdn_usd_per_gb, i.cdn_usd_per_10k_requests
    );
    for t in &p.tiers {
        let _ = writeln!(
            w,
            "  {:<7} {} kbit/s, {} requests/s, {} edge cores per 1,000 listeners: ${:.5} per listener-hour",
            t.tier,
            n(t.bps / 1e3, 1),
            n(t.requests_s, 0),
            n(t.edge_cores_per_1000, 2),
            t.usd_per_hour
        );
    }

    let _ = writeln!(w, "\nsummary");
    let _ = writeln!(
        w,
        "  edges {}; origins {} x {} cores; packagers {} x {} cores",
        p.regions
            .iter()
            .map(|r| format!("{} {}", r.name, r.nodes))
            .collect::<Vec<_>>()
            .join(", "),
        p.origins,
        i.origin_cores,
        p.packagers,
        i.packager_cores
    );
    let _ = writeln!(
        w,
        "  CDN egress {} Gbit/s, ${} per month (+ ${} requests); edge egress {} Gbit/s, ${} per month",
        n(p.cdn_egress_bps / 1e9, 2),
        n(p.cdn_egress_usd_month, 0),
        n(p.cdn_requests_usd_month, 0),
        n(p.edge_egress_bps / 1e9, 2),
        n(p.edge_egress_usd_month, 0)
    );
    o
}

/// Options of `amphi-tools plan`.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Concurrent listeners, all rooms together.
    #[arg(long)]
    listeners: u64,
    /// Concurrent live rooms.
    #[arg(long)]
    rooms: u64,
    /// Regions with an edge group.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "us-east-1,us-west-2,eu-west-1,ap-southeast-1,ap-southeast-2"
    )]
    regions: Vec<String>,
    /// Share of participants per region, in --regions order (default: equal shares).
    #[arg(long, value_delimiter = ',')]
    region_shares: Vec<f64>,
    /// Speakers per room.
    #[arg(long, default_value_t = 3)]
    speakers_per_room: u32,
    /// Interactive (WebRTC) listeners per room; the next ones listen over push.
    #[arg(long, default_value_t = 50)]
    interactive_per_room: u32,
    /// Push listeners per room (WebSocket at the edges); the rest listen over LL-HLS.
    #[arg(long, default_value_t = 0)]
    push_per_room: u32,
    /// Fraction of each node's cores the plan fills.
    #[arg(long, default_value_t = 0.6)]
    target_utilization: f64,
    /// Cores per edge node (c6i.xlarge: 4).
    #[arg(long, default_value_t = 4)]
    edge_cores: u32,
    /// Cores per origin (c6i.4xlarge: 16).
    #[arg(long, default_value_t = 16)]
    origin_cores: u32,
    /// Cores per packager (c6i.xlarge: 4).
    #[arg(long, default_value_t = 4)]
    packager_cores: u32,
    /// Minimum edge nodes per region.
    #[arg(long, default_value_t = 2)]
    min_edges_per_region: u32,
    /// Assume the router places a room's participants in a region on one edge (not built yet:
    /// today the load balancer spreads them over the region's edges).
    #[arg(long)]
    room_affine: bool,
    /// CDN regional caches that each fetch every playlist update (CloudFront has 13).
    #[arg(long, default_value_t = 13)]
    cdn_fill_caches: u32,
    /// US dollars per GB of CDN egress.
    #[arg(long, default_value_t = 0.02)]
    usd_per_gb: f64,
    /// US dollars per 10,000 CDN HTTPS requests.
    #[arg(long, default_value_t = 0.01)]
    usd_per_10k_requests: f64,
    /// US dollars per GB of edge (EC2 internet) egress.
    #[arg(long, default_value_t = 0.05)]
    edge_usd_per_gb: f64,
    /// Hours per month the concurrency is sustained.
    #[arg(long, default_value_t = 730.0)]
    hours_per_month: f64,
    /// Override a per-node figure: NAME=VALUE (names in docs/capacity-figures.toml); repeatable.
    #[arg(long = "figure")]
    figures: Vec<String>,
}

impl PlanArgs {
    /// The plan inputs and figures these options describe.
    pub fn resolve(&self) -> Result<(Inputs, Figures)> {
        let mut figures = Figures::embedded();
        for a in &self.figures {
            figures.set(a)?;
        }
        let shares = if self.region_shares.is_empty() {
            vec![1.0 / self.regions.len().max(1) as f64; self.regions.len()]
        } else if self.region_shares.len() == self.regions.len() {
            self.region_shares.clone()
        } else {
            bail!("--region-shares needs one share per region");
        };
        let inputs = Inputs {
            listeners: self.listeners,
            rooms: self.rooms,
            regions: self.regions.iter().cloned().zip(shares).collect(),
            speakers_per_room: self.speakers_per_room,
            interactive_per_room: self.interactive_per_room,
            push_per_room: self.push_per_room,
            target_utilization: self.target_utilization,
            edge_cores: self.edge_cores,
            origin_cores: self.origin_cores,
            packager_cores: self.packager_cores,
            min_edges_per_region: self.min_edges_per_region,
            room_affine: self.room_affine,
            cdn_fill_caches: self.cdn_fill_caches,
            cdn_usd_per_gb: self.usd_per_gb,
            cdn_usd_per_10k_requests: self.usd_per_10k_requests,
            edge_usd_per_gb: self.edge_usd_per_gb,
            hours_per_month: self.hours_per_month,
        };
        Ok((inputs, figures))
    }
}

/// Run `amphi-tools plan`.
pub fn run(args: PlanArgs) -> Result<()> {
    let (inputs, figures) = args.resolve()?;
    print!("{}", render(&compute(&inputs, &figures)?));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        plan: PlanArgs,
    }

    fn args(line: &str) -> PlanArgs {
        Cli::try_parse_from(std::iter::once("plan").chain(line.split_whitespace()))
            .unwrap()
            .plan
    }

    fn plan(line: &str) -> Plan {
        let (i, f) = args(line).resolve().unwrap();
        compute(&i, &f).unwrap()
    }

    /// The command docs/capacity.md shows the output of.
    const DOC_COMMAND: &str = "--listeners 1000000 --rooms 10000 --speakers-per-room 3 \
        --regions us-east-1,us-west-2,eu-west-1,ap-southeast-1,ap-southeast-2 \
        --region-shares 0.3,0.15,0.25,0.15,0.15";

    #[test]
    fn embedded_figures_parse_and_name_their_source() {
        let f = Figures::embedded();
        for name in FIGURE_NAMES {
            let s = &f.by_name[name].source;
            assert!(
                s.starts_with("BENCHMARKS.md: ")
                    || s.starts_with("dependency: ")
                    || s.starts_with("assumed: "),
                "{name}: {s}"
            );
        }
    }

    #[test]
    fn benchmark_sourced_figures_match_their_benchmarks_md_row() {
        let bench =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md"))
                .expect("BENCHMARKS.md");
        let f = Figures::embedded();
        let mut checked = 0;
        for (name, fig) in &f.by_name {
            let Some(row) = fig.source.strip_prefix("BENCHMARKS.md: ") else {
                continue;
            };
            let line = bench
                .lines()
                .find(|l| l.starts_with('|') && l.contains(row))
                .unwrap_or_else(|| panic!("{name}: no BENCHMARKS.md row names `{row}`"));
            let value = n(fig.value, 0);
            let plain = format!("{}", fig.value);
            assert!(
                line.contains(&value) || line.contains(&plain),
                "{name} = {} is not in its row: {line}",
                fig.value
            );
            checked += 1;
        }
        assert!(checked >= 2);
    }

    #[test]
    fn bad_tables_and_overrides_are_refused() {
        assert!(Figures::parse("").is_err());
        let mut t: toml::Table = FIGURES_TOML.parse().unwrap();
        t["opus_decode_us"]["value"] = toml::Value::Float(-1.0);
        assert!(Figures::parse(&t.to_string()).is_err());
        let mut t: toml::Table = FIGURES_TOML.parse().unwrap();
        t.insert("nonsense".into(), t["opus_decode_us"].clone());
        assert!(Figures::parse(&t.to_string()).is_err());
        let mut f = Figures::embedded();
        assert!(f.set("nope=1").is_err());
        assert!(f.set("opus_decode_us").is_err());
        assert!(f.set("opus_decode_us=x").is_err());
        assert!(f.set("opus_decode_us=0").is_err());
        f.set("opus_decode_us=20").unwrap();
        assert_eq!(f.v("opus_decode_us"), 20.0);
        assert_eq!(f.src("opus_decode_us"), "--figure (command line)");
    }

    #[test]
    fn bad_inputs_are_refused() {
        let (mut i, f) = args("--listeners 10 --rooms 1").resolve().unwrap();
        i.rooms = 0;
        assert!(compute(&i, &f).is_err());
        let (mut i, f) = args("--listeners 10 --rooms 1").resolve().unwrap();
        i.regions[0].1 = 0.9;
        assert!(compute(&i, &f).is_err());
        assert!(args("--listeners 10 --rooms 1 --region-shares 1")
            .resolve()
            .is_err());
        let (mut i, f) = args("--listeners 10 --rooms 1").resolve().unwrap();
        i.target_utilization = 1.5;
        assert!(compute(&i, &f).is_err());
    }

    #[test]
    fn small_audiences_are_all_interactive_and_keep_the_minimum_fleet() {
        let p = plan("--listeners 200 --rooms 10 --regions eu-west-1");
        assert_eq!(p.listeners_per_room, 20.0);
        assert_eq!(p.interactive_per_room, 20.0);
        assert_eq!(p.passive, 0.0);
        assert_eq!(p.cdn_egress_bps, 0.0);
        assert_eq!(p.regions[0].nodes, 2);
        assert_eq!(p.origins, 1);
        assert_eq!(p.packagers, 1);
    }

    #[test]
    fn arithmetic_by_hand_for_one_region() {
        // 1 region, 100 rooms of 3 speakers, 10 interactive listeners each, no minimum fleet.
        let p = plan(
            "--listeners 100000 --rooms 100 --regions r --interactive-per-room 10 \
             --min-edges-per-region 1 --target-utilization 0.5 --edge-cores 2 \
             --figure edge_packets_per_core_s=10000",
        );
        let r = &p.regions[0];
        // out: 50 x (1,000 listeners x 3 + 300 speakers x 2) = 180,000 pkt/s
        assert_eq!(r.packets_out_s, 180_000.0);
        // base: (180,000 + 15,000) / 5,000 = 39 cores = 20 nodes; participants per room 13
        assert_eq!(r.edges_per_room, 13.0);
        // in: 300 x 50 + 100 x 3 x 50 x 13 = 15,000 + 195,000
        assert_eq!(r.packets_in_s, 210_000.0);
        assert_eq!(r.cores, 78.0);
        assert_eq!(r.nodes, 39);
        // passive: 100,000 - 1,000; each gets 64,451 + 40 x 510 + 40 x 1,550 = 146,851 bit/s
        assert_eq!(p.passive, 99_000.0);
        assert_eq!(p.bps_per_listener, 146_851.0);
        assert!((p.cdn_egress_bps - 99_000.0 * 146_851.0).abs() < 1.0);
        // mixer: 100 rooms / 187 / 0.5
        assert!((p.mixer_cores - 100.0 / 187.0 / 0.5).abs() < 1e-9);
        // relay: 100 x 3 x 50 x (1 + 13) + 100 x 50
        assert_eq!(p.relay_datagrams_s, 215_000.0);
    }

    #[test]
    fn more_speakers_cost_more_mixer_cpu_and_a_higher_price_costs_more() {
        let a = plan("--listeners 100000 --rooms 1000");
        let b = plan("--listeners 100000 --rooms 1000 --speakers-per-room 8");
        assert!(b.mixer_cores_per_room > a.mixer_cores_per_room);
        let c = plan("--listeners 100000 --rooms 1000 --usd-per-gb 0.04");
        assert!((c.cdn_egress_usd_month - 2.0 * a.cdn_egress_usd_month).abs() < 1e-6);
        assert!(
            (a.mixer_cores_per_room - 1.0 / 187.0).abs() < 1e-12,
            "3 speakers is the benchmark itself"
        );
    }

    #[test]
    fn docs_capacity_md_shows_the_current_plan() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/capacity.md"))
                .expect("docs/capacity.md");
        let out = render(&plan(DOC_COMMAND));
        assert!(
            doc.contains(&out),
            "docs/capacity.md is out of date: paste the output of\n  amphi-tools plan {DOC_COMMAND}\n\n{out}"
        );
        let p = plan(DOC_COMMAND);
        assert_eq!(p.regions.len(), 5);
        assert_eq!(p.passive, 1_000_000.0 - 50.0 * 10_000.0);
        let affine = render(&plan(&format!("{DOC_COMMAND} --room-affine")));
        assert!(
            doc.contains(&affine),
            "docs/capacity.md is out of date: paste the output of\n  amphi-tools plan {DOC_COMMAND} --room-affine\n\n{affine}"
        );
        let push = render(&plan(&format!(
            "{DOC_COMMAND} --push-per-room 40 --room-affine"
        )));
        assert!(
            doc.contains(&push),
            "docs/capacity.md is out of date: paste the output of\n  amphi-tools plan {DOC_COMMAND} --push-per-room 40 --room-affine\n\n{push}"
        );
    }

    #[test]
    fn push_listeners_by_hand_and_per_tier_costs() {
        // 1 region, 100 rooms of 100 listeners: 10 WebRTC, 30 push, 60 LL-HLS.
        let p = plan(
            "--listeners 10000 --rooms 100 --regions r --interactive-per-room 10 \
             --push-per-room 30 --min-edges-per-region 1 --target-utilization 0.5",
        );
        assert_eq!((p.push_per_room, p.passive), (30.0, 6_000.0));
        let r = &p.regions[0];
        assert_eq!(r.push, 3_000.0);
        // 3,000 listeners x 65.2 us/s / 0.5
        assert!((r.push_cores - 3_000.0 * 65.2e-6 / 0.5).abs() < 1e-9);
        // spread: a room's 30 push listeners over min(30, the region's nodes) edges
        assert_eq!(r.push_edges_per_room, 30.0_f64.min(r.nodes as f64));
        // the program to the packager and to each edge with push listeners
        let speakers = 100.0 * 3.0 * 50.0 * (1.0 + r.edges_per_room);
        assert_eq!(
            p.relay_datagrams_s,
            speakers + 100.0 * 50.0 * (1.0 + r.push_edges_per_room)
        );
        // push: 50/5 messages/s x (802 + 74) bytes x 8 = 70,080 bit/s
        let [webrtc, push, hls] = &p.tiers;
        assert!((push.bps - 50.0 / 5.0 * 876.0 * 8.0).abs() < 1e-6);
        assert_eq!(webrtc.bps, 50.0 * 3.0 * 150.0 * 8.0);
        assert_eq!((hls.bps, hls.requests_s), (146_851.0, 10.0));
        // LL-HLS: 36,000 requests an hour at $0.01 per 10k dominate its cost
        assert!((hls.usd_per_hour - (146_851.0 / 8.0 * 3600.0 / 1e9 * 0.02 + 0.036)).abs() < 1e-9);
        assert!(push.usd_per_hour < webrtc.usd_per_hour && webrtc.usd_per_hour < hls.usd_per_hour);
        // No push asked: none planned, and the relay carries the program once.
        let none = plan("--listeners 10000 --rooms 100 --regions r");
        assert_eq!(
            (none.push_per_room, none.regions[0].push_edges_per_room),
            (0.0, 0.0)
        );
    }

    #[test]
    fn room_affine_placement_cuts_the_relay_fan_out() {
        let spread = plan(DOC_COMMAND);
        let affine = plan(&format!("{DOC_COMMAND} --room-affine"));
        for (s, a) in spread.regions.iter().zip(&affine.regions) {
            assert_eq!(a.edges_per_room, 1.0);
            assert!(a.packets_in_s < s.packets_in_s);
            assert_eq!(a.packets_out_s, s.packets_out_s);
            assert!(a.nodes <= s.nodes);
        }
        assert!(affine.relay_datagrams_s < spread.relay_datagrams_s);
    }
}
