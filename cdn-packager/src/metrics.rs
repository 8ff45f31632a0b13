//! Packager metrics, rendered in the Prometheus text format at `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the publish-delay histogram buckets.
const DELAY_BUCKETS: [f64; 9] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0];
/// Upper bounds (seconds) of the blocking-release histogram buckets.
pub const RELEASE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
];

/// Counters and gauges shared by the ingest and HTTP sides.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Parts published (listed in a playlist).
    pub parts_published: AtomicU64,
    /// Segments published.
    pub segments_published: AtomicU64,
    /// Program frames received.
    pub frames_received: AtomicU64,
    /// Program streams accepted.
    pub streams_accepted: AtomicU64,
    /// Program streams dropped because of a bad record.
    pub bad_records: AtomicU64,
    /// Rooms with a live playlist.
    pub rooms_live: AtomicI64,
    /// Rooms known (live or ended).
    pub rooms_total: AtomicI64,
    /// Blocking playlist/part requests being held.
    pub blocking_in_flight: AtomicI64,
    /// Blocking requests that timed out (503).
    pub blocking_timeouts: AtomicU64,
    /// 1 while connected to the origin.
    pub origin_connected: AtomicI64,
    /// Origin connection attempts that failed or connections that dropped.
    pub origin_reconnects: AtomicU64,
    /// Objects stored.
    pub storage_puts: AtomicU64,
    /// Failed storage puts (each retried).
    pub storage_errors: AtomicU64,
    /// Bytes waiting for storage (all rooms).
    pub storage_buffered_bytes: AtomicI64,
    /// 1 while some upload is failing.
    pub storage_outage: AtomicI64,
    /// Parts not uploaded because the buffer was full (their segments are).
    pub storage_parts_skipped: AtomicU64,
    /// Recordings deleted by retention.
    pub recordings_expired: AtomicU64,
    release_buckets: [AtomicU64; RELEASE_BUCKETS.len()],
    release_count: AtomicU64,
    release_sum_us: AtomicU64,
    delay_buckets: [AtomicU64; DELAY_BUCKETS.len()],
    delay_count: AtomicU64,
    delay_sum_us: AtomicU64,
}

impl Metrics {
    /// Record one publish delay (last frame of a part arrived -> playlist updated).
    pub fn observe_publish_delay(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in DELAY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.delay_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.delay_count.fetch_add(1, Ordering::Relaxed);
        self.delay_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Record how long after a playlist state was published a held request was answered
    /// with it.
    pub fn observe_release(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in RELEASE_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.release_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.release_count.fetch_add(1, Ordering::Relaxed);
        self.release_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Render in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(2048);
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |s: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let g = |a: &AtomicI64| a.load(Ordering::Relaxed);
        counter(
            &mut s,
            "amphi_packager_parts_published_total",
            "LL-HLS parts published.",
            l(&self.parts_published),
        );
        counter(
            &mut s,
            "amphi_packager_segments_published_total",
            "Segments published.",
            l(&self.segments_published),
        );
        counter(
            &mut s,
            "amphi_packager_frames_received_total",
            "Program frames received from the origin.",
            l(&self.frames_received),
        );
        counter(
            &mut s,
            "amphi_packager_streams_accepted_total",
            "Program streams accepted.",
            l(&self.streams_accepted),
        );
        counter(
            &mut s,
            "amphi_packager_bad_records_total",
            "Program streams dropped for a malformed record.",
            l(&self.bad_records),
        );
        counter(
            &mut s,
            "amphi_packager_blocking_timeouts_total",
            "Blocking requests answered 503 after waiting.",
            l(&self.blocking_timeouts),
        );
        counter(
            &mut s,
            "amphi_packager_origin_reconnects_total",
            "Origin connections lost or failed.",
            l(&self.origin_reconnects),
        );
        counter(
            &mut s,
            "amphi_packager_storage_puts_total",
            "Objects stored.",
            l(&self.storage_puts),
        );
        counter(
            &mut s,
            "amphi_packager_storage_errors_total",
            "Failed storage puts (retried with backoff).",
            l(&self.storage_errors),
        );
        counter(
            &mut s,
            "amphi_packager_storage_parts_skipped_total",
            "Parts not uploaded because the upload buffer was full (their segments were).",
            l(&self.storage_parts_skipped),
        );
        counter(
            &mut s,
            "amphi_packager_recordings_expired_total",
            "Recordings deleted after their retention.",
            l(&self.recordings_expired),
        );
        gauge(
            &mut s,
            "amphi_packager_storage_buffered_bytes",
            "Bytes waiting to be stored.",
            g(&self.storage_buffered_bytes),
        );
        gauge(
            &mut s,
            "amphi_packager_storage_outage",
            "1 while uploads are failing.",
            g(&self.storage_outage),
        );
        gauge(
            &mut s,
            "amphi_packager_rooms_live",
            "Rooms with a live playlist.",
            g(&self.rooms_live),
        );
        gauge(
            &mut s,
            "amphi_packager_rooms",
            "Rooms known to the packager (live or ended).",
            g(&self.rooms_total),
        );
        gauge(
            &mut s,
            "amphi_packager_blocking_requests_in_flight",
            "Blocking requests being held.",
            g(&self.blocking_in_flight),
        );
        gauge(
            &mut s,
            "amphi_packager_origin_connected",
            "1 while connected to the origin.",
            g(&self.origin_connected),
        );
        let name = "amphi_packager_publish_delay_seconds";
        let _ = writeln!(
            s,
            "# HELP {name} Delay from a part's last frame arriving to the playlist listing it.\n# TYPE {name} histogram"
        );
        for (i, bound) in DELAY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                l(&self.delay_buckets[i])
            );
        }
        let count = l(&self.delay_count);
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(s, "{name}_sum {}", l(&self.delay_sum_us) as f64 / 1e6);
        let _ = writeln!(s, "{name}_count {count}");
        let name = "amphi_packager_blocking_release_seconds";
        let _ = writeln!(
            s,
            "# HELP {name} Delay from a playlist state's publication to a held request being answered with it.\n# TYPE {name} histogram"
        );
        for (i, bound) in RELEASE_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                l(&self.release_buckets[i])
            );
        }
        let count = l(&self.release_count);
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(s, "{name}_sum {}", l(&self.release_sum_us) as f64 / 1e6);
        let _ = writeln!(s, "{name}_count {count}");
        s
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
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_publish_delay(Duration::from_micros(1500));
        m.observe_publish_delay(Duration::from_millis(30));
        {
            let _g = GaugeGuard::new(&m.blocking_in_flight);
            assert!(m
                .render()
                .contains("amphi_packager_blocking_requests_in_flight 1\n"));
        }
        let text = m.render();
        assert!(text.contains("amphi_packager_publish_delay_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(text.contains("amphi_packager_publish_delay_seconds_bucket{le=\"0.002\"} 1\n"));
        assert!(text.contains("amphi_packager_publish_delay_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("amphi_packager_publish_delay_seconds_count 2\n"));
        assert!(text.contains("amphi_packager_publish_delay_seconds_sum 0.0315\n"));
        assert!(text.contains("amphi_packager_blocking_requests_in_flight 0\n"));
    }
}
