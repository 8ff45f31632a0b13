//! Edge counters and gauges, rendered in the Prometheus text exposition format.

use crate::peers::DropReason;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (microseconds) of the forwarding-delay histogram buckets.
pub const FORWARD_DELAY_BUCKETS_US: [u64; 14] = [
    5, 10, 20, 50, 100, 200, 300, 500, 750, 1_000, 2_000, 5_000, 10_000, 50_000,
];

/// All edge metrics. Cheap relaxed atomics, shared by the media driver, uplink and HTTP layer.
#[derive(Debug, Default)]
pub struct Metrics {
    udp_datagrams: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    rtp_packets_in: AtomicU64,
    relay_frames_sent: AtomicU64,
    relay_send_errors: AtomicU64,
    relay_frames_received: AtomicU64,
    relay_frames_invalid: AtomicU64,
    whip_sessions_created: AtomicU64,
    peers: AtomicI64,
    origin_connected: AtomicI64,
    rtp_forwarded: AtomicU64,
    rtp_refused_muted: AtomicU64,
    rtp_refused_not_publisher: AtomicU64,
    udp_send_errors: AtomicU64,
    relay_queue_full: AtomicU64,
    ws_sessions: AtomicU64,
    whep_sessions: AtomicU64,
    delay_buckets: [AtomicU64; FORWARD_DELAY_BUCKETS_US.len() + 1],
    delay_sum_ns: AtomicU64,
}

fn idx(r: DropReason) -> usize {
    DropReason::ALL
        .iter()
        .position(|x| *x == r)
        .unwrap_or_default()
}

impl Metrics {
    /// One datagram read from the media socket.
    pub fn udp_datagram(&self) {
        self.udp_datagrams.fetch_add(1, Ordering::Relaxed);
    }

    /// One datagram dropped.
    pub fn dropped(&self, reason: DropReason) {
        self.dropped[idx(reason)].fetch_add(1, Ordering::Relaxed);
    }

    /// One RTP packet received from a publisher.
    pub fn rtp_in(&self) {
        self.rtp_packets_in.fetch_add(1, Ordering::Relaxed);
    }

    /// One relay frame handed to QUIC.
    pub fn relay_sent(&self) {
        self.relay_frames_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// One relay frame that could not be sent (no origin, link error, bad payload).
    pub fn relay_send_error(&self) {
        self.relay_send_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// One valid relay frame received from the origin.
    pub fn relay_received(&self) {
        self.relay_frames_received.fetch_add(1, Ordering::Relaxed);
    }

    /// One undecodable datagram received from the origin.
    pub fn relay_invalid(&self) {
        self.relay_frames_invalid.fetch_add(1, Ordering::Relaxed);
    }

    /// One WHIP session created.
    pub fn whip_session_created(&self) {
        self.whip_sessions_created.fetch_add(1, Ordering::Relaxed);
    }

    /// Set the current number of peers.
    pub fn set_peers(&self, n: usize) {
        self.peers.store(n as i64, Ordering::Relaxed);
    }

    /// WebRTC peers on this edge now.
    pub fn peers(&self) -> usize {
        self.peers.load(Ordering::Relaxed).max(0) as usize
    }

    /// Set whether the origin link is up.
    pub fn set_origin_connected(&self, up: bool) {
        self.origin_connected.store(up as i64, Ordering::Relaxed);
    }

    /// One RTP packet written into a listener's slot.
    pub fn rtp_forwarded(&self) {
        self.rtp_forwarded.fetch_add(1, Ordering::Relaxed);
    }

    /// One RTP packet from a peer refused: `muted` (muted or no longer allowed to publish) or
    /// `not_publisher` (a PeerConnection that never negotiated sending).
    pub fn rtp_refused(&self, reason: &'static str) {
        match reason {
            "muted" => &self.rtp_refused_muted,
            _ => &self.rtp_refused_not_publisher,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// `n` datagrams could not be sent on the media socket.
    pub fn udp_send_errors(&self, n: u64) {
        self.udp_send_errors.fetch_add(n, Ordering::Relaxed);
    }

    /// One relayed datagram dropped because the media driver's queue was full.
    pub fn relay_queue_full(&self) {
        self.relay_queue_full.fetch_add(1, Ordering::Relaxed);
    }

    /// One WebSocket signaling session opened.
    pub fn ws_session(&self) {
        self.ws_sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// One WHEP session created.
    pub fn whep_session_created(&self) {
        self.whep_sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// Delay of one forwarded packet from edge ingress to the send call.
    pub fn forward_delay(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = FORWARD_DELAY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(FORWARD_DELAY_BUCKETS_US.len());
        self.delay_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.delay_sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Packets refused because the sender was muted or not allowed to publish.
    pub fn refused_muted(&self) -> u64 {
        self.rtp_refused_muted.load(Ordering::Relaxed)
    }

    /// Current value of the dropped counter for `reason` (for tests and logs).
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped[idx(reason)].load(Ordering::Relaxed)
    }

    /// Render everything in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            );
        };
        counter(
            &mut out,
            "amphi_edge_udp_datagrams_total",
            "Datagrams read from the media UDP socket.",
            load(&self.udp_datagrams),
        );
        let _ = write!(
            out,
            "# HELP amphi_edge_udp_dropped_total Media datagrams dropped, by reason.\n\
             # TYPE amphi_edge_udp_dropped_total counter\n"
        );
        for r in DropReason::ALL {
            let _ = writeln!(
                out,
                "amphi_edge_udp_dropped_total{{reason=\"{}\"}} {}",
                r.label(),
                self.dropped_count(r)
            );
        }
        counter(
            &mut out,
            "amphi_edge_rtp_packets_in_total",
            "RTP packets received from publishers.",
            load(&self.rtp_packets_in),
        );
        counter(
            &mut out,
            "amphi_edge_relay_frames_sent_total",
            "Speaker relay frames sent to the origin as QUIC datagrams.",
            load(&self.relay_frames_sent),
        );
        counter(
            &mut out,
            "amphi_edge_relay_send_errors_total",
            "Speaker relay frames that could not be sent to the origin.",
            load(&self.relay_send_errors),
        );
        counter(
            &mut out,
            "amphi_edge_relay_frames_received_total",
            "Speaker relay frames received from the origin.",
            load(&self.relay_frames_received),
        );
        counter(
            &mut out,
            "amphi_edge_relay_frames_invalid_total",
            "Undecodable datagrams received from the origin.",
            load(&self.relay_frames_invalid),
        );
        counter(
            &mut out,
            "amphi_edge_whip_sessions_created_total",
            "WHIP sessions created.",
            load(&self.whip_sessions_created),
        );
        counter(
            &mut out,
            "amphi_edge_rtp_forwarded_total",
            "RTP packets written into interactive listeners' slots.",
            load(&self.rtp_forwarded),
        );
        let _ = write!(
            out,
            "# HELP amphi_edge_rtp_refused_total RTP packets from peers dropped at the edge, by reason.\n\
             # TYPE amphi_edge_rtp_refused_total counter\n\
             amphi_edge_rtp_refused_total{{reason=\"muted\"}} {}\n\
             amphi_edge_rtp_refused_total{{reason=\"not_publisher\"}} {}\n",
            load(&self.rtp_refused_muted),
            load(&self.rtp_refused_not_publisher),
        );
        counter(
            &mut out,
            "amphi_edge_udp_send_errors_total",
            "Datagrams that could not be sent on the media socket.",
            load(&self.udp_send_errors),
        );
        counter(
            &mut out,
            "amphi_edge_relay_queue_full_total",
            "Relayed speaker datagrams dropped because the media driver was behind.",
            load(&self.relay_queue_full),
        );
        counter(
            &mut out,
            "amphi_edge_ws_sessions_total",
            "WebSocket signaling sessions opened.",
            load(&self.ws_sessions),
        );
        counter(
            &mut out,
            "amphi_edge_whep_sessions_created_total",
            "WHEP sessions created.",
            load(&self.whep_sessions),
        );
        let _ = write!(
            out,
            "# HELP amphi_edge_forward_delay_seconds Edge ingress to egress delay of forwarded packets.\n\
             # TYPE amphi_edge_forward_delay_seconds histogram\n"
        );
        let mut cumulative = 0u64;
        for (i, b) in FORWARD_DELAY_BUCKETS_US.iter().enumerate() {
            cumulative += load(&self.delay_buckets[i]);
            let _ = writeln!(
                out,
                "amphi_edge_forward_delay_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *b as f64 / 1e6
            );
        }
        cumulative += load(&self.delay_buckets[FORWARD_DELAY_BUCKETS_US.len()]);
        let _ = writeln!(
            out,
            "amphi_edge_forward_delay_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "amphi_edge_forward_delay_seconds_sum {}",
            load(&self.delay_sum_ns) as f64 / 1e9
        );
        let _ = writeln!(out, "amphi_edge_forward_delay_seconds_count {cumulative}");
        gauge(
            &mut out,
            "amphi_edge_peers",
            "WebRTC peers on this edge.",
            self.peers.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "amphi_edge_origin_connected",
            "1 when the QUIC uplink to the origin is up.",
            self.origin_connected.load(Ordering::Relaxed),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series() {
        let m = Metrics::default();
        m.udp_datagram();
        m.udp_datagram();
        m.dropped(DropReason::NotStun);
        m.set_peers(3);
        m.set_origin_connected(true);
        let text = m.render();
        assert!(
            text.contains("amphi_edge_udp_datagrams_total 2\n"),
            "{text}"
        );
        assert!(text.contains("amphi_edge_udp_dropped_total{reason=\"not_stun\"} 1\n"));
        assert!(text.contains("amphi_edge_udp_dropped_total{reason=\"unknown_peer\"} 0\n"));
        assert!(text.contains("amphi_edge_peers 3\n"));
        assert!(text.contains("amphi_edge_origin_connected 1\n"));
        for name in [
            "amphi_edge_rtp_packets_in_total 0",
            "amphi_edge_relay_frames_sent_total 0",
            "amphi_edge_relay_send_errors_total 0",
            "amphi_edge_relay_frames_received_total 0",
        ] {
            assert!(text.contains(name), "{name}");
        }
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let name = name
                .strip_suffix("_bucket")
                .or_else(|| name.strip_suffix("_sum"))
                .or_else(|| name.strip_suffix("_count"))
                .filter(|n| n.ends_with("_seconds"))
                .unwrap_or(name);
            assert!(text.contains(&format!("# TYPE {name} ")), "{line}");
        }
    }
}
