//! Packager metrics: one prometheus-client registry, served at `GET /metrics` in the OpenMetrics
//! text format.
//!
//! The counters and gauges the ingest, upload and HTTP paths bump are registered handles that
//! dereference to their atomic ([`AtomicCounter`], [`AtomicGauge`]), so those paths keep their
//! plain `fetch_add`/`store` calls and never look a metric up.

use amphi_common::metrics::MetricsRegistry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::ops::Deref;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the publish-delay histogram buckets.
const DELAY_BUCKETS: [f64; 9] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0];
/// Upper bounds (seconds) of the blocking-release histogram buckets.
pub const RELEASE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
];
/// Upper bounds (seconds) of the storage upload-latency histogram buckets.
const UPLOAD_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A registered counter that dereferences to its atomic.
#[derive(Clone, Debug, Default)]
pub struct AtomicCounter(Counter);

impl Deref for AtomicCounter {
    type Target = AtomicU64;

    fn deref(&self) -> &AtomicU64 {
        self.0.inner()
    }
}

/// A registered integer gauge that dereferences to its atomic.
#[derive(Clone, Debug, Default)]
pub struct AtomicGauge(Gauge);

impl Deref for AtomicGauge {
    type Target = AtomicI64;

    fn deref(&self) -> &AtomicI64 {
        self.0.inner()
    }
}

/// Counters, gauges and histograms shared by the ingest, upload and HTTP sides.
#[derive(Debug)]
pub struct Metrics {
    registry: MetricsRegistry,
    /// Refusals of the per-address HTTP budgets.
    pub http_limits: amphi_common::metrics::LimiterMetrics,
    /// Parts published (listed in a playlist).
    pub parts_published: AtomicCounter,
    /// Segments published.
    pub segments_published: AtomicCounter,
    /// Program frames received.
    pub frames_received: AtomicCounter,
    /// Program streams accepted.
    pub streams_accepted: AtomicCounter,
    /// Program streams dropped because of a bad record.
    pub bad_records: AtomicCounter,
    /// Rooms with a live playlist.
    pub rooms_live: AtomicGauge,
    /// Rooms known (live or ended).
    pub rooms_total: AtomicGauge,
    /// Blocking playlist/part requests being held.
    pub blocking_in_flight: AtomicGauge,
    /// Blocking requests that timed out (503).
    pub blocking_timeouts: AtomicCounter,
    /// Origin links up (one per configured origin).
    pub origin_connected: AtomicGauge,
    /// Origin connection attempts that failed or connections that dropped.
    pub origin_reconnects: AtomicCounter,
    /// Objects stored.
    pub storage_puts: AtomicCounter,
    /// Failed storage puts (each retried).
    pub storage_errors: AtomicCounter,
    /// Bytes waiting for storage in memory (all rooms).
    pub storage_buffered_bytes: AtomicGauge,
    /// Bytes waiting for storage in spill files (all rooms).
    pub storage_spilled_bytes: AtomicGauge,
    /// Rooms whose uploads are failing.
    pub storage_outage: AtomicGauge,
    /// Spill files of an earlier run uploaded at start.
    pub storage_spill_recovered: AtomicCounter,
    /// Recordings deleted by retention.
    pub recordings_expired: AtomicCounter,
    /// Objects read from storage to answer HTTP requests.
    pub storage_reads: AtomicCounter,
    storage_retries: Counter,
    storage_upload: Histogram,
    origin_rtt: Gauge<f64, AtomicU64>,
    publish_delay: Histogram,
    release: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = MetricsRegistry::default();
        let http_limits = amphi_common::metrics::LimiterMetrics::register(&mut r, "packager");
        let mut counter = |name: &str, help: &str| {
            let c = AtomicCounter::default();
            r.register(name, help, c.0.clone());
            c
        };
        let parts_published = counter("amphi_packager_parts_published", "LL-HLS parts published");
        let segments_published = counter("amphi_packager_segments_published", "Segments published");
        let frames_received = counter(
            "amphi_packager_frames_received",
            "Program frames received from the origin",
        );
        let streams_accepted = counter(
            "amphi_packager_streams_accepted",
            "Program streams accepted",
        );
        let bad_records = counter(
            "amphi_packager_bad_records",
            "Program streams dropped for a malformed record",
        );
        let blocking_timeouts = counter(
            "amphi_packager_blocking_timeouts",
            "Blocking requests answered 503 after waiting",
        );
        let origin_reconnects = counter(
            "amphi_packager_origin_reconnects",
            "Origin connections lost or failed",
        );
        let storage_puts = counter("amphi_packager_storage_puts", "Objects stored");
        let storage_errors = counter(
            "amphi_packager_storage_errors",
            "Failed storage puts (retried with backoff)",
        );
        let storage_spill_recovered = counter(
            "amphi_packager_storage_spill_recovered",
            "Spill files left by an earlier run and uploaded at start",
        );
        let recordings_expired = counter(
            "amphi_packager_recordings_expired",
            "Recordings deleted after their retention",
        );
        let storage_reads = counter(
            "amphi_packager_storage_reads",
            "Objects read from storage to answer HTTP requests",
        );
        let mut gauge = |name: &str, help: &str| {
            let g = AtomicGauge::default();
            r.register(name, help, g.0.clone());
            g
        };
        let storage_buffered_bytes = gauge(
            "amphi_packager_storage_buffered_bytes",
            "Bytes waiting to be stored, held in memory",
        );
        let storage_spilled_bytes = gauge(
            "amphi_packager_storage_spilled_bytes",
            "Bytes waiting to be stored, spilled to disk beyond the memory budget",
        );
        let storage_outage = gauge(
            "amphi_packager_storage_outage",
            "Rooms whose uploads are failing (0 when storage works)",
        );
        let rooms_live = gauge("amphi_packager_rooms_live", "Rooms with a live playlist");
        let rooms_total = gauge(
            "amphi_packager_rooms",
            "Rooms known to the packager (live or ended)",
        );
        let blocking_in_flight = gauge(
            "amphi_packager_blocking_requests_in_flight",
            "Blocking requests being held",
        );
        let origin_connected = gauge(
            "amphi_packager_origin_connected",
            "Origin links up (one per configured origin)",
        );
        let storage_retries = r.counter(
            "amphi_packager_storage_retries",
            "Storage puts attempted again after a failure",
        );
        let storage_upload = Histogram::new(UPLOAD_BUCKETS);
        r.register(
            "amphi_packager_storage_upload_seconds",
            "Duration of each storage put attempt (S3 or filesystem), failed ones included",
            storage_upload.clone(),
        );
        let origin_rtt = Gauge::<f64, AtomicU64>::default();
        r.register(
            "amphi_packager_origin_rtt_seconds",
            "Round-trip time of the QUIC link to the origin, sampled every second (0 while down)",
            origin_rtt.clone(),
        );
        let publish_delay = Histogram::new(DELAY_BUCKETS);
        r.register(
            "amphi_packager_publish_delay_seconds",
            "Delay from a part's last frame arriving to the playlist listing it",
            publish_delay.clone(),
        );
        let release = Histogram::new(RELEASE_BUCKETS);
        r.register(
            "amphi_packager_blocking_release_seconds",
            "Delay from a playlist state's publication to a held request being answered with it",
            release.clone(),
        );
        Metrics {
            registry: r,
            http_limits,
            parts_published,
            segments_published,
            frames_received,
            streams_accepted,
            bad_records,
            rooms_live,
            rooms_total,
            blocking_in_flight,
            blocking_timeouts,
            origin_connected,
            origin_reconnects,
            storage_puts,
            storage_errors,
            storage_buffered_bytes,
            storage_spilled_bytes,
            storage_outage,
            storage_spill_recovered,
            recordings_expired,
            storage_reads,
            storage_retries,
            storage_upload,
            origin_rtt,
            publish_delay,
            release,
        }
    }
}

impl Metrics {
    /// Record one publish delay (last frame of a part arrived -> playlist updated).
    pub fn observe_publish_delay(&self, d: Duration) {
        self.publish_delay.observe(d.as_secs_f64());
    }

    /// Record how long after a playlist state was published a held request was answered
    /// with it.
    pub fn observe_release(&self, d: Duration) {
        self.release.observe(d.as_secs_f64());
    }

    /// Record how long one storage put attempt took.
    pub fn observe_upload(&self, d: Duration) {
        self.storage_upload.observe(d.as_secs_f64());
    }

    /// One storage put is about to be attempted again.
    pub fn storage_retry(&self) {
        self.storage_retries.inc();
    }

    /// One origin link came up (`true`) or went down (`false`); the RTT is cleared when the
    /// last link goes down.
    pub fn origin_link(&self, up: bool) {
        if up {
            self.origin_connected.fetch_add(1, Ordering::Relaxed);
        } else if self.origin_connected.fetch_sub(1, Ordering::Relaxed) <= 1 {
            self.origin_rtt.set(0.0);
        }
    }

    /// The origin link's current round-trip time estimate.
    pub fn set_origin_rtt(&self, rtt: Duration) {
        self.origin_rtt.set(rtt.as_secs_f64());
    }

    /// Every sample name the packager can expose.
    pub fn sample_names(&self) -> &[String] {
        self.registry.sample_names()
    }

    /// Render in the OpenMetrics text exposition format.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

/// Increments a gauge while alive.
pub struct GaugeGuard<'a>(&'a AtomicI64);

impl<'a> GaugeGuard<'a> {
    /// Increment `g` until the guard drops.
    pub fn new(g: &'a AtomicI64) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_handles_reach_the_exposition() {
        let m = Metrics::default();
        m.observe_publish_delay(Duration::from_micros(1500));
        m.observe_publish_delay(Duration::from_millis(30));
        m.parts_published.fetch_add(2, Ordering::Relaxed);
        {
            let _g = GaugeGuard::new(&m.blocking_in_flight);
            assert!(m
                .render()
                .contains("\namphi_packager_blocking_requests_in_flight 1\n"));
        }
        m.observe_upload(Duration::from_millis(3));
        m.storage_retry();
        m.origin_link(true);
        m.origin_link(true);
        m.origin_link(false);
        m.set_origin_rtt(Duration::from_millis(2));
        let text = m.render();
        for line in [
            "amphi_packager_publish_delay_seconds_bucket{le=\"0.001\"} 0",
            "amphi_packager_publish_delay_seconds_bucket{le=\"0.002\"} 1",
            "amphi_packager_publish_delay_seconds_bucket{le=\"0.05\"} 2",
            "amphi_packager_publish_delay_seconds_count 2",
            "amphi_packager_publish_delay_seconds_sum 0.0315",
            "amphi_packager_blocking_requests_in_flight 0",
            "amphi_packager_parts_published_total 2",
            "amphi_packager_storage_upload_seconds_bucket{le=\"0.005\"} 1",
            "amphi_packager_storage_retries_total 1",
            "amphi_packager_origin_connected 1",
            "amphi_packager_origin_rtt_seconds 0.002",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line} in\n{text}");
        }
        m.origin_link(false);
        assert!(m
            .render()
            .contains("\namphi_packager_origin_rtt_seconds 0.0\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(m.sample_names().iter().any(|n| n == name), "{line}");
        }
    }
}
