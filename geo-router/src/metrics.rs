//! Geo-router metrics: one prometheus-client registry, served at `GET /metrics` in the OpenMetrics
//! text format. Edge health gauges (`amphi_router_edge_healthy`, `amphi_router_edge_load`) carry
//! `edge` and `region` labels; an edge's series are removed once the registry forgets it.

use crate::webhooks::WebhookCounters;
use amphi_common::metrics::{HotCounter, MetricsRegistry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

/// How a route request ended (`outcome` label of `amphi_router_route_decisions_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteOutcome {
    /// Sent to an edge for WebRTC.
    WebRtc,
    /// Sent to an edge for the room's push stream (its interactive seats there are taken).
    Push,
    /// Sent to an edge's region but told to listen over HLS (room full there).
    Hls,
    /// No healthy edge could take the client (503, or no edge in the requested region).
    NoEdge,
}

impl RouteOutcome {
    fn label(self) -> &'static str {
        match self {
            RouteOutcome::WebRtc => "webrtc",
            RouteOutcome::Push => "push",
            RouteOutcome::Hls => "hls",
            RouteOutcome::NoEdge => "no_edge",
        }
    }
}

/// Most (region, outcome) series whose handles [`Metrics::route_decision`] keeps.
const MAX_CACHED_ROUTE_SERIES: usize = 256;

/// The `region` label of route decisions that chose no edge.
pub const NO_REGION: &str = "none";

/// One registered edge's state at a scrape.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeHealth {
    /// Edge id.
    pub edge: String,
    /// Its region.
    pub region: String,
    /// Heartbeating recently.
    pub healthy: bool,
    /// Load as a fraction (the larger of CPU and sessions/capacity).
    pub load: f64,
}

type RegionOutcomeLabels = [(&'static str, String); 2];
type EdgeLabels = [(&'static str, String); 2];
type EdgeSeries = (Gauge, Gauge<f64, AtomicU64>);

/// Every geo-router metric.
#[derive(Debug)]
pub struct Metrics {
    registry: MetricsRegistry,
    /// Refusals of the per-address HTTP budgets.
    pub http_limits: amphi_common::metrics::LimiterMetrics,
    /// Rooms created through the API.
    pub rooms_created: Counter,
    /// Tokens minted.
    pub tokens_minted: Counter,
    /// Tokens revoked through `POST /v1/tokens/revoke`.
    pub tokens_revoked: Counter,
    /// Subscribers named in `room_reminder` webhooks.
    pub reminders_sent: Counter,
    /// Route requests answered with an edge.
    pub routes: HotCounter,
    /// Of those, clients placed by GeoIP.
    pub routes_located: HotCounter,
    /// Of those, listeners sent to HLS.
    pub routes_hls: HotCounter,
    /// HLS requests proxied to the packager.
    pub hls_proxied: Counter,
    /// Rooms ended.
    pub rooms_ended: Counter,
    /// Edge heartbeats received.
    pub heartbeats: Counter,
    /// Requests refused for a bad API key or signature.
    pub auth_failures: Counter,
    /// QUIC links to origins that are up.
    pub origin_links: Gauge,
    /// Live rooms in the directory.
    pub live_rooms: Gauge,
    /// Scheduled rooms that have not started.
    pub scheduled_rooms: Gauge,
    /// Live rooms ended because no edge kept them alive.
    pub rooms_expired: Counter,
    route_decisions: Family<RegionOutcomeLabels, HotCounter>,
    /// Handles of `route_decisions` series by (region, outcome).
    route_series: Mutex<Vec<(String, RouteOutcome, HotCounter)>>,
    webhooks: WebhookCounters,
    healthy_edges: Gauge,
    available_edges: Gauge,
    edge_healthy: Family<EdgeLabels, Gauge>,
    edge_load: Family<EdgeLabels, Gauge<f64, AtomicU64>>,
    /// Edge series set so far, by (edge, region).
    edge_series: Mutex<BTreeMap<(String, String), EdgeSeries>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = MetricsRegistry::default();
        let http_limits = amphi_common::metrics::LimiterMetrics::register(&mut r, "router");
        let rooms_created = r.counter(
            "amphi_router_rooms_created",
            "Rooms created through the API",
        );
        let tokens_minted = r.counter("amphi_router_tokens_minted", "Join tokens minted");
        let tokens_revoked = r.counter(
            "amphi_router_tokens_revoked",
            "Tokens revoked through POST /v1/tokens/revoke",
        );
        let reminders_sent = r.counter(
            "amphi_router_reminders_sent",
            "Subscribers named in room_reminder webhooks",
        );
        let routes = r.hot_counter(
            "amphi_router_routes",
            "Route requests answered with an edge",
        );
        let routes_located = r.hot_counter(
            "amphi_router_routes_located",
            "Route requests whose client GeoIP placed",
        );
        let routes_hls = r.hot_counter(
            "amphi_router_routes_hls",
            "Route requests of listeners sent to HLS",
        );
        let route_decisions = Family::<RegionOutcomeLabels, HotCounter>::default();
        r.register(
            "amphi_router_route_decisions",
            "Route decisions by chosen region (none when no edge) and outcome (webrtc, push, hls, no_edge)",
            route_decisions.clone(),
        );
        let hls_proxied = r.counter(
            "amphi_router_hls_proxied",
            "HLS requests proxied to the packager",
        );
        let rooms_ended = r.counter("amphi_router_rooms_ended", "Rooms ended");
        let heartbeats = r.counter("amphi_router_heartbeats", "Edge heartbeats received");
        let auth_failures = r.counter(
            "amphi_router_auth_failures",
            "Requests refused for a bad API key or signature",
        );
        let webhooks = WebhookCounters::default();
        r.register(
            "amphi_router_webhooks_delivered",
            "Webhook deliveries that succeeded",
            webhooks.delivered.clone(),
        );
        r.register(
            "amphi_router_webhooks_failed",
            "Webhook deliveries abandoned after every attempt failed",
            webhooks.failed.clone(),
        );
        r.register(
            "amphi_router_webhooks_dropped",
            "Webhook events dropped because the queue was full",
            webhooks.dropped.clone(),
        );
        let origin_links = r.gauge(
            "amphi_router_origin_links",
            "QUIC links to origins that are up",
        );
        let live_rooms = r.gauge("amphi_router_live_rooms", "Live rooms in the directory");
        let scheduled_rooms = r.gauge(
            "amphi_router_scheduled_rooms",
            "Scheduled rooms that have not started",
        );
        let rooms_expired = r.counter(
            "amphi_router_rooms_expired",
            "Live rooms ended because no edge kept them alive",
        );
        let healthy_edges = r.gauge(
            "amphi_router_healthy_edges",
            "Registered edges heartbeating recently",
        );
        let available_edges = r.gauge(
            "amphi_router_available_edges",
            "Healthy edges that take new sessions (not draining)",
        );
        let edge_healthy = Family::<EdgeLabels, Gauge>::default();
        r.register(
            "amphi_router_edge_healthy",
            "1 while a registered edge is heartbeating, 0 when it is not",
            edge_healthy.clone(),
        );
        let edge_load = Family::<EdgeLabels, Gauge<f64, AtomicU64>>::default();
        r.register(
            "amphi_router_edge_load",
            "A registered edge's load as a fraction: the larger of CPU and sessions/capacity",
            edge_load.clone(),
        );
        Metrics {
            registry: r,
            http_limits,
            rooms_created,
            tokens_minted,
            tokens_revoked,
            reminders_sent,
            routes,
            routes_located,
            routes_hls,
            hls_proxied,
            rooms_ended,
            heartbeats,
            auth_failures,
            origin_links,
            live_rooms,
            scheduled_rooms,
            rooms_expired,
            route_decisions,
            route_series: Mutex::new(Vec::new()),
            webhooks,
            healthy_edges,
            available_edges,
            edge_healthy,
            edge_load,
            edge_series: Mutex::default(),
        }
    }
}

impl Metrics {
    /// The webhook dispatcher's counters (registered here).
    pub fn webhook_counters(&self) -> WebhookCounters {
        self.webhooks.clone()
    }

    /// Count one route decision for `region` (the chosen edge's, or [`NO_REGION`]).
    pub fn route_decision(&self, region: &str, outcome: RouteOutcome) {
        self.route_series(region, outcome).inc();
    }

    /// The series of route decisions for `region` and `outcome` (counting on the handle is
    /// [`Metrics::route_decision`]).
    pub fn route_series(&self, region: &str, outcome: RouteOutcome) -> HotCounter {
        // The series handles of the first regions seen are kept: counting a decision then
        // allocates nothing (regions are few; the family takes any beyond the cache).
        {
            let cache = self.route_series.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, c)) = cache.iter().find(|(r, o, _)| *o == outcome && r == region) {
                return c.clone();
            }
        }
        let counter = self
            .route_decisions
            .get_or_create(&[
                ("region", region.to_string()),
                ("outcome", outcome.label().to_string()),
            ])
            .clone();
        let mut cache = self.route_series.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() < MAX_CACHED_ROUTE_SERIES {
            cache.push((region.to_string(), outcome, counter.clone()));
        }
        counter
    }

    /// Publish every registered edge's health and load, and the healthy and available counts;
    /// series of edges no longer registered are removed.
    pub fn set_edges(&self, edges: &[EdgeHealth], available: usize) {
        let healthy = edges.iter().filter(|e| e.healthy).count();
        self.healthy_edges
            .set(i64::try_from(healthy).unwrap_or(i64::MAX));
        self.available_edges
            .set(i64::try_from(available).unwrap_or(i64::MAX));
        let Ok(mut series) = self.edge_series.lock() else {
            return;
        };
        let current: BTreeMap<(String, String), &EdgeHealth> = edges
            .iter()
            .map(|e| ((e.edge.clone(), e.region.clone()), e))
            .collect();
        series.retain(|(edge, region), _| {
            let keep = current.contains_key(&(edge.clone(), region.clone()));
            if !keep {
                let labels = [("edge", edge.clone()), ("region", region.clone())];
                self.edge_healthy.remove(&labels);
                self.edge_load.remove(&labels);
            }
            keep
        });
        for (key, e) in current {
            let (healthy, load) = series.entry(key).or_insert_with(|| {
                let labels = [("edge", e.edge.clone()), ("region", e.region.clone())];
                (
                    self.edge_healthy.get_or_create_owned(&labels),
                    self.edge_load.get_or_create_owned(&labels),
                )
            });
            healthy.set(i64::from(e.healthy));
            load.set(e.load);
        }
    }

    /// Every sample name the geo-router can expose.
    pub fn sample_names(&self) -> &[String] {
        self.registry.sample_names()
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(id: &str, region: &str, healthy: bool, load: f64) -> EdgeHealth {
        EdgeHealth {
            edge: id.into(),
            region: region.into(),
            healthy,
            load,
        }
    }

    #[test]
    fn route_decisions_and_edge_health_are_labelled() {
        let m = Metrics::default();
        m.route_decision("eu-west", RouteOutcome::WebRtc);
        m.route_decision("eu-west", RouteOutcome::WebRtc);
        m.route_decision(NO_REGION, RouteOutcome::NoEdge);
        m.webhook_counters().delivered.inc();
        m.set_edges(
            &[
                edge("edge-a", "us-east", true, 0.25),
                edge("edge-b", "eu-west", false, 0.0),
            ],
            1,
        );
        let text = m.render();
        for line in [
            "amphi_router_route_decisions_total{region=\"eu-west\",outcome=\"webrtc\"} 2",
            "amphi_router_route_decisions_total{region=\"none\",outcome=\"no_edge\"} 1",
            "amphi_router_webhooks_delivered_total 1",
            "amphi_router_edge_healthy{edge=\"edge-a\",region=\"us-east\"} 1",
            "amphi_router_edge_healthy{edge=\"edge-b\",region=\"eu-west\"} 0",
            "amphi_router_edge_load{edge=\"edge-a\",region=\"us-east\"} 0.25",
            "amphi_router_healthy_edges 1",
            "amphi_router_available_edges 1",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line} in\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(m.sample_names().iter().any(|n| n == name), "{line}");
        }
        // edge-b is forgotten: its series go.
        m.set_edges(&[edge("edge-a", "us-east", true, 0.5)], 1);
        let text = m.render();
        assert!(!text.contains("edge-b"), "{text}");
        assert!(text.contains("\namphi_router_edge_load{edge=\"edge-a\",region=\"us-east\"} 0.5\n"));
    }
}
