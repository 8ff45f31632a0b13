//! The `/metrics` exposition every role serves: one prometheus-client [`Registry`] per role,
//! rendered in the OpenMetrics text format, plus the sample names each role declares (so docs,
//! alert rules and dashboards can be checked against them).
//!
//! Metric names are full Prometheus names (`amphi_<role>_...`, `_seconds` for durations);
//! counters are registered without the `_total` suffix, which the encoder appends.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{Atomic, Counter};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};

/// The `Content-Type` of every `/metrics` answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Shards of a [`ShardedCount`].
const COUNT_SHARDS: usize = 8;

/// One shard of a [`ShardedCount`], alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(std::sync::atomic::AtomicU64);

/// A count spread over shards, each thread adding to its own, summed when read: threads
/// counting the same event at once do not pass one cache line back and forth.
#[derive(Debug, Default)]
pub struct ShardedCount {
    shards: [Shard; COUNT_SHARDS],
}

impl ShardedCount {
    fn mine(&self) -> &std::sync::atomic::AtomicU64 {
        thread_local! {
            /// This thread's shard (threads take them in turn).
            static SHARD: usize = {
                static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % COUNT_SHARDS
            };
        }
        &self.shards[SHARD.with(|s| *s)].0
    }
}

impl Atomic<u64> for ShardedCount {
    fn inc(&self) -> u64 {
        self.inc_by(1)
    }

    fn inc_by(&self, v: u64) -> u64 {
        self.mine()
            .fetch_add(v, std::sync::atomic::Ordering::Relaxed)
    }

    fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(std::sync::atomic::Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// A counter that many threads add to per request (the router's route counts): exposed like
/// any counter, counted in per-thread shards ([`ShardedCount`]).
pub type HotCounter = Counter<u64, ShardedCount>;

/// A role's registry and the sample names its metric families expose.
#[derive(Debug, Default)]
pub struct MetricsRegistry {
    registry: Registry,
    samples: Vec<String>,
}

impl MetricsRegistry {
    /// Register `metric` as family `name` (a counter without its `_total`).
    pub fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        let family = name.to_string();
        match metric.metric_type() {
            MetricType::Counter => self.samples.push(format!("{family}_total")),
            MetricType::Histogram => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    self.samples.push(format!("{family}{suffix}"));
                }
            }
            _ => self.samples.push(family),
        }
        self.registry.register(name, help, metric);
    }

    /// A new counter registered as `name` (exposed as `name_total`).
    pub fn counter(&mut self, name: &str, help: &str) -> Counter {
        let c = Counter::default();
        self.register(name, help, c.clone());
        c
    }

    /// A new [`HotCounter`] registered as `name` (exposed as `name_total`).
    pub fn hot_counter(&mut self, name: &str, help: &str) -> HotCounter {
        let c = HotCounter::default();
        self.register(name, help, c.clone());
        c
    }

    /// A new integer gauge registered as `name`.
    pub fn gauge(&mut self, name: &str, help: &str) -> Gauge {
        let g = Gauge::default();
        self.register(name, help, g.clone());
        g
    }

    /// Every sample name the registered families can expose (`x_total`, `x_bucket`, `x`, ...).
    pub fn sample_names(&self) -> &[String] {
        &self.samples
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The counters of a role's per-address HTTP budgets (`amphi_protocol::limits`).
#[derive(Clone, Debug, Default)]
pub struct LimiterMetrics {
    /// Connections refused over `max_connections_per_ip`.
    pub connections_refused: Counter,
    /// Requests refused over the per-address request rate.
    pub rate_limited: Counter,
}

impl LimiterMetrics {
    /// Counters registered in `r` as `amphi_{role}_http_connections_refused` and
    /// `amphi_{role}_http_rate_limited`.
    pub fn register(r: &mut MetricsRegistry, role: &str) -> Self {
        LimiterMetrics {
            connections_refused: r.counter(
                &format!("amphi_{role}_http_connections_refused"),
                "HTTP connections refused: too many open from one client address",
            ),
            rate_limited: r.counter(
                &format!("amphi_{role}_http_rate_limited"),
                "HTTP requests refused 429: one client address over its request rate",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::histogram::Histogram;

    #[test]
    fn renders_openmetrics_and_lists_sample_names() {
        let mut r = MetricsRegistry::default();
        let c = r.counter("amphi_test_things", "Things seen");
        let g = r.gauge("amphi_test_level", "Current level");
        let h = Histogram::new([0.1, 1.0]);
        r.register("amphi_test_delay_seconds", "Delays", h.clone());
        let f = Family::<[(&'static str, &'static str); 1], Counter>::default();
        r.register("amphi_test_drops", "Drops by reason", f.clone());
        c.inc();
        g.set(-2);
        h.observe(0.5);
        f.get_or_create(&[("reason", "late")]).inc_by(3);
        let text = r.render();
        assert!(
            text.contains("# TYPE amphi_test_things counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP amphi_test_things Things seen.\n"),
            "{text}"
        );
        assert!(text.contains("\namphi_test_things_total 1\n"), "{text}");
        assert!(text.contains("\namphi_test_level -2\n"), "{text}");
        assert!(
            text.contains("amphi_test_delay_seconds_bucket{le=\"1.0\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("amphi_test_drops_total{reason=\"late\"} 3\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(
            r.sample_names(),
            [
                "amphi_test_things_total",
                "amphi_test_level",
                "amphi_test_delay_seconds_bucket",
                "amphi_test_delay_seconds_sum",
                "amphi_test_delay_seconds_count",
                "amphi_test_drops_total",
            ]
        );
    }

    #[test]
    fn a_hot_counter_sums_what_every_thread_counted() {
        let mut r = MetricsRegistry::default();
        let c = r.hot_counter("amphi_test_routes", "Routes");
        let f = Family::<[(&'static str, &'static str); 1], HotCounter>::default();
        r.register("amphi_test_decisions", "Decisions", f.clone());
        std::thread::scope(|scope| {
            for _ in 0..(COUNT_SHARDS + 3) {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        c.inc();
                    }
                    f.get_or_create(&[("region", "eu-west")]).inc_by(2);
                });
            }
        });
        c.inc_by(5);
        let threads = (COUNT_SHARDS + 3) as u64;
        assert_eq!(c.get(), threads * 1000 + 5);
        let text = r.render();
        assert!(
            text.contains("# TYPE amphi_test_routes counter\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "\namphi_test_routes_total {}\n",
                threads * 1000 + 5
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "amphi_test_decisions_total{{region=\"eu-west\"}} {}\n",
                threads * 2
            )),
            "{text}"
        );
    }
}
