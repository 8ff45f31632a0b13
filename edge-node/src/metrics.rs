//! Edge metrics: one prometheus-client registry, served at `GET /metrics` in the OpenMetrics text
//! format. Every handle the media path touches is resolved once here (per-reason counters sit in
//! arrays, the forwarding-delay histogram is lock-free), so counting a packet never allocates or
//! looks up a label set.

use crate::peers::DropReason;
use crate::signaling::Census;
use amphi_common::metrics::MetricsRegistry;
use amphi_protocol::room::RoomRole;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds (microseconds) of the forwarding-delay histogram buckets.
pub const FORWARD_DELAY_BUCKETS_US: [u64; 17] = [
    5, 10, 20, 50, 100, 200, 300, 500, 750, 1_000, 1_250, 1_500, 2_000, 3_000, 5_000, 10_000,
    50_000,
];

/// Why a peer's RTP packet was refused at the edge (`amphi_edge_rtp_refused_total{reason}`).
const REFUSAL_REASONS: [&str; 3] = ["muted", "not_publisher", "bad_red"];

type ReasonLabel = [(&'static str, &'static str); 1];
type RoleRegionLabels = [(&'static str, String); 2];

/// A fixed-bucket histogram of durations kept in atomics: `observe` is a few relaxed adds, no lock.
#[derive(Clone, Debug)]
struct DelayHistogram(Arc<DelayBuckets>);

#[derive(Debug)]
struct DelayBuckets {
    /// Non-cumulative counts; the last one is `+Inf`.
    counts: [AtomicU64; FORWARD_DELAY_BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl DelayHistogram {
    fn new() -> Self {
        DelayHistogram(Arc::new(DelayBuckets {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }))
    }

    fn observe(&self, d: Duration) {
        let us = d.as_micros();
        let i = FORWARD_DELAY_BUCKETS_US
            .iter()
            .position(|b| us <= u128::from(*b))
            .unwrap_or(FORWARD_DELAY_BUCKETS_US.len());
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl EncodeMetric for DelayHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = FORWARD_DELAY_BUCKETS_US
            .iter()
            .map(|us| *us as f64 / 1e6)
            .chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds
            .zip(self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// All edge metrics, shared by the media driver, uplink, registration and HTTP layer.
#[derive(Debug)]
pub struct Metrics {
    registry: MetricsRegistry,
    /// Refusals of the per-address HTTP budgets.
    pub http_limits: amphi_common::metrics::LimiterMetrics,
    udp_datagrams: Counter,
    dropped: [Counter; DropReason::ALL.len()],
    rtp_packets_in: Counter,
    relay_frames_sent: Counter,
    relay_send_errors: Counter,
    relay_frames_received: Counter,
    relay_frames_invalid: Counter,
    /// Push listeners connected now.
    pub push_listeners: Gauge,
    /// Program frames per push message now (more on a busy edge).
    pub push_frames_per_message: Gauge,
    /// Program frames received from the origins for push listeners.
    pub push_program_frames: Counter,
    /// Program frames received from this edge's parent in the relay tree (feeds).
    pub push_feed_frames: Counter,
    /// Rooms whose program this edge pulls from its parent now (live feeds).
    pub push_fed_rooms: Gauge,
    /// Feeds from the parent that failed to open or dropped (the origins took over).
    pub push_feed_failures: Counter,
    /// Tier moves offered to listeners (`move`: a seat freed on a better tier).
    pub tier_moves_offered: Counter,
    /// Tier moves declined by the listener, or not taken in time.
    pub tier_moves_declined: Counter,
    /// Push audio messages encoded (once per room, written to every listener).
    pub push_messages: Counter,
    /// Push messages a slow listener skipped (its queue was full).
    pub push_skipped: Counter,
    /// Push listeners disconnected for being too slow.
    pub push_dropped: Counter,
    /// Push listeners that joined over WebTransport.
    pub push_webtransport_sessions: Counter,
    control_records_refused: Counter,
    origin_links: Counter,
    whip_sessions_created: Counter,
    whip_refused_origin_unavailable: Counter,
    peers: Gauge,
    origin_connected: Gauge,
    origin_rtt: Gauge<f64, AtomicU64>,
    rtp_forwarded: Counter,
    forward_flushes: Counter,
    red_recovered: Counter,
    refused: [Counter; REFUSAL_REASONS.len()],
    udp_send_errors: Counter,
    relay_queue_full: Counter,
    ws_sessions: Counter,
    whep_sessions: Counter,
    forward_delay: DelayHistogram,
    rooms: Gauge,
    participants: [Gauge; RoomRole::ALL.len()],
}

impl Metrics {
    /// Metrics of an edge in `region` (the `region` label of its participant gauges).
    pub fn new(region: &str) -> Self {
        let mut r = MetricsRegistry::default();
        let http_limits = amphi_common::metrics::LimiterMetrics::register(&mut r, "edge");
        let udp_datagrams = r.counter(
            "amphi_edge_udp_datagrams",
            "Datagrams read from the media UDP socket",
        );
        let dropped_family = Family::<ReasonLabel, Counter>::default();
        r.register(
            "amphi_edge_udp_dropped",
            "Media datagrams dropped, by reason",
            dropped_family.clone(),
        );
        let dropped =
            DropReason::ALL.map(|d| dropped_family.get_or_create_owned(&[("reason", d.label())]));
        let rtp_packets_in = r.counter(
            "amphi_edge_rtp_packets_in",
            "RTP packets received from publishers",
        );
        let relay_frames_sent = r.counter(
            "amphi_edge_relay_frames_sent",
            "Speaker relay frames sent to the origin as QUIC datagrams",
        );
        let relay_send_errors = r.counter(
            "amphi_edge_relay_send_errors",
            "Speaker relay frames that could not be sent to the origin",
        );
        let relay_frames_received = r.counter(
            "amphi_edge_relay_frames_received",
            "Speaker relay frames received from the origin",
        );
        let push_listeners = r.gauge(
            "amphi_edge_push_listeners",
            "Push listeners (WebSocket and WebTransport) connected to this edge",
        );
        let push_frames_per_message = r.gauge(
            "amphi_edge_push_frames_per_message",
            "Program frames (20 ms each) per push message now: more on a busy edge",
        );
        let push_program_frames = r.counter(
            "amphi_edge_push_program_frames",
            "Program frames received from the origins for push listeners",
        );
        let push_feed_frames = r.counter(
            "amphi_edge_push_feed_frames",
            "Program frames received from this edge's parent in the relay tree",
        );
        let push_fed_rooms = r.gauge(
            "amphi_edge_push_fed_rooms",
            "Rooms whose program this edge pulls from its parent in the relay tree now",
        );
        let push_feed_failures = r.counter(
            "amphi_edge_push_feed_failures",
            "Feeds from the parent edge that failed to open or dropped (the origins took over)",
        );
        let tier_moves_offered = r.counter(
            "amphi_edge_tier_moves_offered",
            "Moves to a better listener tier offered to push and HLS listeners as seats freed",
        );
        let tier_moves_declined = r.counter(
            "amphi_edge_tier_moves_declined",
            "Tier moves the listener declined or did not take in time",
        );
        let push_messages = r.counter(
            "amphi_edge_push_messages",
            "Push audio messages encoded, once per room (the same bytes go to every listener)",
        );
        let push_skipped = r.counter(
            "amphi_edge_push_skipped_messages",
            "Push messages slow listeners skipped because their queue was full",
        );
        let push_dropped = r.counter(
            "amphi_edge_push_dropped_listeners",
            "Push listeners disconnected for being too slow",
        );
        let push_webtransport_sessions = r.counter(
            "amphi_edge_push_webtransport_sessions",
            "Push listeners that joined over WebTransport (HTTP/3)",
        );
        let relay_frames_invalid = r.counter(
            "amphi_edge_relay_frames_invalid",
            "Undecodable datagrams received from the origin",
        );
        let control_records_refused = r.counter(
            "amphi_edge_control_records_refused",
            "Control records from the origin refused (oversized or malformed); the link stays up",
        );
        let origin_links = r.counter(
            "amphi_edge_origin_links",
            "Control links to the origin established (more than one: the link dropped)",
        );
        let whip_sessions_created =
            r.counter("amphi_edge_whip_sessions_created", "WHIP sessions created");
        let whip_refused_origin_unavailable = r.counter(
            "amphi_edge_whip_refused_origin_unavailable",
            "WHIP publishes refused because the room authority (origin) could not be asked",
        );
        let rtp_forwarded = r.counter(
            "amphi_edge_rtp_forwarded",
            "RTP packets written into interactive listeners' slots",
        );
        let forward_flushes = r.counter(
            "amphi_edge_forward_flushes",
            "str0m timeout runs that release forwarded packets, for listeners str0m protects \
             (AES-256-GCM, or until their ICE pair is known; the others take the SRTP fast path): \
             one per such listener per burst of packets read together",
        );
        let red_recovered = r.counter(
            "amphi_edge_red_recovered",
            "Lost publisher packets recovered from the RFC 2198 RED redundancy of the next packet",
        );
        let refused_family = Family::<ReasonLabel, Counter>::default();
        r.register(
            "amphi_edge_rtp_refused",
            "RTP packets from peers dropped at the edge, by reason (muted, not_publisher, bad_red)",
            refused_family.clone(),
        );
        let refused =
            REFUSAL_REASONS.map(|why| refused_family.get_or_create_owned(&[("reason", why)]));
        let udp_send_errors = r.counter(
            "amphi_edge_udp_send_errors",
            "Datagrams that could not be sent on the media socket",
        );
        let relay_queue_full = r.counter(
            "amphi_edge_relay_queue_full",
            "Relayed speaker datagrams dropped because the media driver was behind",
        );
        let ws_sessions = r.counter(
            "amphi_edge_ws_sessions",
            "WebSocket signaling sessions opened",
        );
        let whep_sessions = r.counter("amphi_edge_whep_sessions_created", "WHEP sessions created");
        let forward_delay = DelayHistogram::new();
        r.register(
            "amphi_edge_forward_delay_seconds",
            "Edge ingress to egress delay of forwarded packets",
            forward_delay.clone(),
        );
        let peers = r.gauge("amphi_edge_peers", "WebRTC peers on this edge");
        let origin_connected = r.gauge(
            "amphi_edge_origin_connected",
            "Origins whose QUIC link is up (the edge links to every configured origin)",
        );
        let origin_rtt = Gauge::<f64, AtomicU64>::default();
        r.register(
            "amphi_edge_origin_rtt_seconds",
            "Round-trip time of the QUIC uplink to the origin, sampled every second (0 while down)",
            origin_rtt.clone(),
        );
        let rooms = r.gauge(
            "amphi_edge_rooms",
            "Rooms with at least one participant on this edge",
        );
        let participants_family = Family::<RoleRegionLabels, Gauge>::default();
        r.register(
            "amphi_edge_participants",
            "Participants connected to this edge, by current role (region: this edge's region)",
            participants_family.clone(),
        );
        let participants = RoomRole::ALL.map(|role| {
            participants_family
                .get_or_create_owned(&[("role", role.as_str().into()), ("region", region.into())])
        });
        Metrics {
            registry: r,
            http_limits,
            udp_datagrams,
            dropped,
            rtp_packets_in,
            relay_frames_sent,
            relay_send_errors,
            relay_frames_received,
            push_listeners,
            push_frames_per_message,
            push_program_frames,
            push_feed_frames,
            push_fed_rooms,
            push_feed_failures,
            tier_moves_offered,
            tier_moves_declined,
            push_messages,
            push_skipped,
            push_dropped,
            push_webtransport_sessions,
            relay_frames_invalid,
            control_records_refused,
            origin_links,
            whip_sessions_created,
            whip_refused_origin_unavailable,
            peers,
            origin_connected,
            origin_rtt,
            rtp_forwarded,
            forward_flushes,
            red_recovered,
            refused,
            udp_send_errors,
            relay_queue_full,
            ws_sessions,
            whep_sessions,
            forward_delay,
            rooms,
            participants,
        }
    }

    /// One datagram read from the media socket.
    pub fn udp_datagram(&self) {
        self.udp_datagrams.inc();
    }

    /// One datagram dropped.
    pub fn dropped(&self, reason: DropReason) {
        self.dropped[drop_index(reason)].inc();
    }

    /// One RTP packet received from a publisher.
    pub fn rtp_in(&self) {
        self.rtp_packets_in.inc();
    }

    /// One relay frame handed to QUIC.
    pub fn relay_sent(&self) {
        self.relay_frames_sent.inc();
    }

    /// One relay frame that could not be sent (no origin, link error, bad payload).
    pub fn relay_send_error(&self) {
        self.relay_send_errors.inc();
    }

    /// One valid relay frame received from the origin.
    pub fn relay_received(&self) {
        self.relay_frames_received.inc();
    }

    /// One undecodable datagram received from the origin.
    pub fn relay_invalid(&self) {
        self.relay_frames_invalid.inc();
    }

    /// One control record from the origin refused.
    pub fn control_record_refused(&self) {
        self.control_records_refused.inc();
    }

    /// One WHIP session created.
    pub fn whip_session_created(&self) {
        self.whip_sessions_created.inc();
    }

    /// One WHIP publish refused: the origin was unreachable or did not answer in time.
    pub fn whip_refused_origin_unavailable(&self) {
        self.whip_refused_origin_unavailable.inc();
    }

    /// Set the current number of peers.
    pub fn set_peers(&self, n: usize) {
        self.peers.set(saturating_i64(n));
    }

    /// WebRTC peers on this edge now.
    pub fn peers(&self) -> usize {
        usize::try_from(self.peers.get()).unwrap_or(0)
    }

    /// A control link to an origin was established (more than one per origin: a link dropped).
    pub fn origin_link_established(&self) {
        self.origin_links.inc();
    }

    /// Set how many of the `configured` origin links are up (no link up clears the RTT).
    pub fn set_origin_links(&self, up: usize, configured: usize) {
        self.origin_connected
            .set(i64::try_from(up.min(configured)).unwrap_or(i64::MAX));
        if up == 0 {
            self.origin_rtt.set(0.0);
        }
    }

    /// The uplink's current round-trip time estimate.
    pub fn set_origin_rtt(&self, rtt: Duration) {
        self.origin_rtt.set(rtt.as_secs_f64());
    }

    /// Set the local room and participant counts.
    pub fn set_census(&self, census: Census) {
        self.rooms.set(saturating_i64(census.rooms));
        for (gauge, n) in self.participants.iter().zip(census.by_role) {
            gauge.set(saturating_i64(n));
        }
    }

    /// One RTP packet written into a listener's slot.
    pub fn rtp_forwarded(&self) {
        self.rtp_forwarded.inc();
    }

    /// One str0m timeout run that releases a listener's forwarded packets.
    pub fn forward_flush(&self) {
        self.forward_flushes.inc();
    }

    /// RTP packets written into listeners' slots and the timeout runs that released them.
    pub fn forwarding(&self) -> (u64, u64) {
        (self.rtp_forwarded.get(), self.forward_flushes.get())
    }

    /// One lost publisher packet recovered from RED redundancy.
    pub fn red_recovered(&self) {
        self.red_recovered.inc();
    }

    /// One RTP packet from a peer refused: `muted` (muted or no longer allowed to publish),
    /// `not_publisher` (a PeerConnection that never negotiated sending) or `bad_red` (a malformed
    /// RFC 2198 RED payload).
    pub fn rtp_refused(&self, reason: &'static str) {
        let i = REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(REFUSAL_REASONS.len() - 1);
        self.refused[i].inc();
    }

    /// `n` datagrams could not be sent on the media socket.
    pub fn udp_send_errors(&self, n: u64) {
        self.udp_send_errors.inc_by(n);
    }

    /// One relayed datagram dropped because the media driver's queue was full.
    pub fn relay_queue_full(&self) {
        self.relay_queue_full.inc();
    }

    /// One WebSocket signaling session opened.
    pub fn ws_session(&self) {
        self.ws_sessions.inc();
    }

    /// One WHEP session created.
    pub fn whep_session_created(&self) {
        self.whep_sessions.inc();
    }

    /// Delay of one forwarded packet from edge ingress to the send call.
    pub fn forward_delay(&self, d: Duration) {
        self.forward_delay.observe(d);
    }

    /// Packets refused because the sender was muted or not allowed to publish.
    pub fn refused_muted(&self) -> u64 {
        self.refused[0].get()
    }

    /// Current value of the dropped counter for `reason` (for tests and logs).
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped[drop_index(reason)].get()
    }

    /// Every sample name this edge can expose.
    pub fn sample_names(&self) -> &[String] {
        self.registry.sample_names()
    }

    /// Render everything in the OpenMetrics text format.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

fn drop_index(reason: DropReason) -> usize {
    DropReason::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or_default()
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series() {
        let m = Metrics::new("eu-west");
        m.udp_datagram();
        m.udp_datagram();
        m.dropped(DropReason::NotStun);
        m.rtp_refused("muted");
        m.rtp_refused("not_publisher");
        m.rtp_refused("not_publisher");
        m.set_peers(3);
        m.set_origin_links(1, 2);
        m.set_origin_rtt(Duration::from_micros(1500));
        m.set_census(Census {
            rooms: 2,
            by_role: [1, 0, 2, 5],
        });
        m.forward_delay(Duration::from_micros(7));
        m.forward_delay(Duration::from_millis(60));
        let text = m.render();
        for line in [
            "amphi_edge_udp_datagrams_total 2",
            "amphi_edge_udp_dropped_total{reason=\"not_stun\"} 1",
            "amphi_edge_udp_dropped_total{reason=\"unknown_peer\"} 0",
            "amphi_edge_rtp_refused_total{reason=\"muted\"} 1",
            "amphi_edge_rtp_refused_total{reason=\"not_publisher\"} 2",
            "amphi_edge_peers 3",
            "amphi_edge_origin_connected 1",
            "amphi_edge_origin_rtt_seconds 0.0015",
            "amphi_edge_rooms 2",
            "amphi_edge_participants{role=\"host\",region=\"eu-west\"} 1",
            "amphi_edge_participants{role=\"listener\",region=\"eu-west\"} 5",
            "amphi_edge_forward_delay_seconds_bucket{le=\"0.00001\"} 1",
            "amphi_edge_forward_delay_seconds_bucket{le=\"0.05\"} 1",
            "amphi_edge_forward_delay_seconds_bucket{le=\"+Inf\"} 2",
            "amphi_edge_forward_delay_seconds_count 2",
            "amphi_edge_rtp_packets_in_total 0",
            "amphi_edge_relay_frames_sent_total 0",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line} in\n{text}");
        }
        assert_eq!(m.refused_muted(), 1);
        m.set_origin_links(0, 2);
        assert!(m.render().contains("\namphi_edge_origin_rtt_seconds 0.0\n"));
        // Every sample line belongs to a declared name.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(m.sample_names().iter().any(|n| n == name), "{line}");
        }
    }
}
