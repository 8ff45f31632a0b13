//! Registration with the geo-router and draining.
//!
//! Every half second (or as often as the router's answer asks) the edge `PUT`s an [`EdgeHeartbeat`] (id, region, coordinates, public URL,
//! sessions, CPU load, capacity, per-room sessions, draining) to `{router_url}/v1/edges/{id}`;
//! signed with an API key when one is configured (production routers require it). An edge that
//! stops heartbeating is taken out of routing by the router after three missed beats (1.5 s).
//!
//! Draining (SIGTERM on `amphi edge`, or an operator's `POST /v1/edges/{id}/drain` at the router,
//! learned from the heartbeat answer): new sessions (WHIP, WHEP, WebSocket) get `503` with a JSON
//! `draining` error, current sessions continue; with `exit_when_drained` the edge stops once it has
//! no sessions left or the grace period is over ([`DrainPlan`], sans-IO).

use crate::metrics::Metrics;
use crate::occupancy::Occupancy;
use crate::watched::publish_if_changed;
use amphi_protocol::api::{
    ApiError, EdgeHeartbeat, HeartbeatAnswer, RelayParent, RoomLoad, RoomTiers,
    WebTransportEndpoint,
};
use amphi_protocol::config::known_region;
use amphi_protocol::https::HttpsClient;
use amphi_protocol::RoomId;
use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Heartbeat period until the router's answer asks for another ([`heartbeat_period`]).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Shortest and longest heartbeat period a router's answer may ask for.
const HEARTBEAT_PERIOD_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(10));

/// The heartbeat period a router asked for in its answer (`interval_ms`), kept within
/// 100 ms..=10 s so a broken answer can neither flood the router nor silence the edge.
pub fn heartbeat_period(interval_ms: u64) -> Duration {
    Duration::from_millis(interval_ms).clamp(HEARTBEAT_PERIOD_BOUNDS.0, HEARTBEAT_PERIOD_BOUNDS.1)
}
/// Timeout of one heartbeat request.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(900);
/// Default grace period of a drain.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(300);

/// How the edge registers.
#[derive(Clone, Debug)]
pub struct RegistrationOptions {
    /// Most WebRTC sessions this edge takes (reported as `capacity`).
    pub capacity: u32,
    /// API key (id, secret) that signs heartbeats; `None` for dev-mode routers.
    pub api_key: Option<(String, String)>,
    /// Stop the edge once drained (true for `amphi edge`; false inside `amphi dev`).
    pub exit_when_drained: bool,
    /// Longest a drain waits for sessions to end.
    pub drain_grace: Duration,
}

impl Default for RegistrationOptions {
    fn default() -> Self {
        RegistrationOptions {
            capacity: 1000,
            api_key: None,
            exit_when_drained: false,
            drain_grace: DEFAULT_DRAIN_GRACE,
        }
    }
}

/// Shared draining flag: set by a signal or the router, read by the HTTP layer.
#[derive(Debug, Default)]
pub struct DrainHandle {
    draining: AtomicBool,
    changed: Notify,
}

impl DrainHandle {
    /// Start draining (idempotent).
    pub fn start(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("edge draining: no new sessions");
            self.changed.notify_waiters();
        }
    }

    /// Whether the edge is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    async fn started(&self) {
        loop {
            let notified = self.changed.notified();
            if self.is_draining() {
                return;
            }
            notified.await;
        }
    }
}

/// When a draining edge may stop (sans-IO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    started: Instant,
    grace: Duration,
}

impl DrainPlan {
    /// A drain that started at `started`.
    pub fn new(started: Instant, grace: Duration) -> Self {
        DrainPlan { started, grace }
    }

    /// Whether the edge may stop now, with `sessions` still open.
    pub fn done(&self, sessions: usize, now: Instant) -> bool {
        sessions == 0 || now.saturating_duration_since(self.started) >= self.grace
    }
}

/// Axum middleware: while draining, refuse requests that would open a session.
pub async fn refuse_new_sessions(drain: Arc<DrainHandle>, req: Request, next: Next) -> Response {
    if drain.is_draining() && opens_session(req.method(), req.uri().path()) {
        let body = serde_json::to_vec(&ApiError::new(
            "draining",
            "this edge is draining: ask the geo-router for another edge",
        ))
        .unwrap_or_default();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::RETRY_AFTER, "1"),
            ],
            body,
        )
            .into_response();
    }
    next.run(req).await
}

/// Whether a request would open a new session: `POST /whip/{room}`, `POST /whep/{room}`, or the
/// WebSocket upgrade at `GET /v1/ws`.
fn opens_session(method: &Method, path: &str) -> bool {
    let one_segment = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
    };
    (method == Method::POST && (one_segment("/whip/") || one_segment("/whep/")))
        || (method == Method::GET && path == "/v1/ws")
}

/// Largest heartbeat answer read: it lists the tier thresholds of every room the beat named
/// (about 50 bytes each; the router takes beats of up to 256 KiB).
const MAX_ANSWER_BYTES: usize = 512 * 1024;

/// Process CPU use since the previous sample, as a fraction of the machine.
struct CpuSampler {
    last: Option<(Instant, f64)>,
    cpus: f64,
}

impl CpuSampler {
    fn new() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        CpuSampler { last: None, cpus }
    }

    /// Seconds of CPU (user + system) this process has used.
    fn process_cpu_secs() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = f.get(11)?.parse().ok()?;
        let stime: f64 = f.get(12)?.parse().ok()?;
        Some((utime + stime) / 100.0) // USER_HZ is 100 on Linux
    }

    fn sample(&mut self, now: Instant) -> f32 {
        let Some(cpu) = Self::process_cpu_secs() else {
            return 0.0;
        };
        let load = match self.last {
            Some((t, c)) if now > t => (cpu - c) / now.duration_since(t).as_secs_f64() / self.cpus,
            _ => 0.0,
        };
        self.last = Some((now, cpu));
        load.clamp(0.0, 1.0) as f32
    }
}

/// What the registration task reads and writes.
pub(crate) struct Registrar {
    pub router_url: String,
    /// The HTTP(S) client heartbeats go through.
    pub client: HttpsClient<Full<Bytes>>,
    pub id: String,
    pub region: String,
    pub public_url: String,
    /// This edge's base URL for the other edges of its region (relay tree).
    pub relay_url: Option<String>,
    /// Where the edge serves push listeners over WebTransport, and its certificate's hash
    /// (`None`: it does not).
    pub webtransport: Option<tokio::sync::watch::Receiver<Option<WebTransportEndpoint>>>,
    /// The router's latest choice of this edge's parent in the relay tree.
    pub relay_parent: tokio::sync::watch::Sender<Option<RelayParent>>,
    /// The router's tier thresholds for this edge's rooms (for moving listeners up a tier).
    pub tier_thresholds: tokio::sync::watch::Sender<Vec<RoomTiers>>,
    /// Rooms with listeners waiting for a better tier: listed in heartbeats so the router
    /// sends their thresholds.
    pub waiting_rooms: tokio::sync::watch::Receiver<Vec<RoomId>>,
    pub options: RegistrationOptions,
    pub metrics: Arc<Metrics>,
    pub occupancy: Arc<Occupancy>,
    /// The push listeners (their rooms are listed with their counts).
    pub push: Arc<crate::push_hub::PushHub>,
    pub drain: Arc<DrainHandle>,
}

/// The rooms of a heartbeat: every room with WebRTC sessions or push listeners here, and the
/// `waiting` rooms (listeners waiting for a better tier) with none.
fn room_loads(
    sessions: BTreeMap<RoomId, u32>,
    push: BTreeMap<RoomId, u32>,
    waiting: &[RoomId],
) -> Vec<RoomLoad> {
    let mut loads: BTreeMap<RoomId, RoomLoad> = sessions
        .into_iter()
        .map(|(room, sessions)| {
            (
                room,
                RoomLoad {
                    room,
                    sessions,
                    push: 0,
                },
            )
        })
        .collect();
    for (room, n) in push {
        loads
            .entry(room)
            .or_insert(RoomLoad {
                room,
                sessions: 0,
                push: 0,
            })
            .push = n;
    }
    for &room in waiting {
        loads.entry(room).or_insert(RoomLoad {
            room,
            sessions: 0,
            push: 0,
        });
    }
    loads.into_values().collect()
}

/// The last signed heartbeat (its second and body). The router accepts each signed request
/// once, and a signature covers only the second and the body: at the 500 ms period a beat
/// that repeats the previous one within the same second would be refused as a replay, so it
/// is not sent (the router already has exactly that state).
#[derive(Debug, Default)]
struct LastSigned {
    ts: u64,
    body: Vec<u8>,
}

impl LastSigned {
    /// Whether a beat of `body` signed at `ts` repeats the last one; otherwise remember it.
    fn repeats(&mut self, ts: u64, body: &[u8]) -> bool {
        if ts == self.ts && body == self.body.as_slice() {
            return true;
        }
        self.ts = ts;
        self.body.clear();
        self.body.extend_from_slice(body);
        false
    }
}

fn sign(secret: &str, ts: u64, method: &str, path: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{ts}\n{method}\n{path}\n").as_bytes());
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl Registrar {
    fn beat(&self, cpu_load: f32) -> EdgeHeartbeat {
        let (lat, lon) = known_region(&self.region)
            .map(|r| (r.latitude, r.longitude))
            .unwrap_or((0.0, 0.0));
        EdgeHeartbeat {
            id: self.id.clone(),
            region: self.region.clone(),
            latitude: lat,
            longitude: lon,
            public_url: self.public_url.clone(),
            participants: self.metrics.peers().try_into().unwrap_or(0),
            cpu_load,
            capacity: self.options.capacity,
            rooms: room_loads(
                self.occupancy.listeners_per_room(),
                self.push.listeners_per_room(),
                &self.waiting_rooms.borrow(),
            ),
            draining: self.drain.is_draining(),
            relay_url: self.relay_url.clone(),
            webtransport: self
                .webtransport
                .as_ref()
                .and_then(|advertised| advertised.borrow().clone()),
        }
    }

    /// Heartbeat until `stop`; when draining with `exit_when_drained`, cancel `stop` once drained.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let client = &self.client;
        let path = format!("/v1/edges/{}", self.id);
        let url = format!("{}{path}", self.router_url.trim_end_matches('/'));
        let mut cpu = CpuSampler::new();
        let mut period = HEARTBEAT_INTERVAL;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut plan: Option<DrainPlan> = None;
        let mut failures = 0u32;
        let mut last_signed = LastSigned::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.drain.started(), if plan.is_none() => {}
            }
            let now = Instant::now();
            if self.drain.is_draining() && plan.is_none() {
                plan = Some(DrainPlan::new(now, self.options.drain_grace));
            }
            if let (Some(p), true) = (plan, self.options.exit_when_drained) {
                let sessions = self.metrics.peers();
                if p.done(sessions, now) {
                    tracing::info!(sessions, "drained: stopping the edge");
                    stop.cancel();
                    return;
                }
            }
            let body =
                serde_json::to_vec(&self.beat(cpu.sample(now))).expect("heartbeat serializes");
            let mut req = http::Request::put(&url).header(header::CONTENT_TYPE, "application/json");
            if let Some((key, secret)) = &self.options.api_key {
                let ts = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                if last_signed.repeats(ts, &body) {
                    continue;
                }
                req = req
                    .header("x-amphi-key", key)
                    .header("x-amphi-timestamp", ts.to_string())
                    .header("x-amphi-signature", sign(secret, ts, "PUT", &path, &body));
            }
            let Ok(req) = req.body(Full::new(Bytes::from(body))) else {
                tracing::error!(%url, "bad router URL: registration disabled");
                return;
            };
            match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    if failures > 0 {
                        tracing::info!("geo-router reachable again");
                    }
                    failures = 0;
                    let answer = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                        .collect()
                        .await;
                    if let Ok(bytes) = answer {
                        if let Ok(a) = serde_json::from_slice::<HeartbeatAnswer>(&bytes.to_bytes())
                        {
                            if a.drain {
                                self.drain.start();
                            }
                            publish_if_changed(&self.relay_parent, a.relay_parent);
                            publish_if_changed(&self.tier_thresholds, a.tiers);
                            let asked = heartbeat_period(a.interval_ms);
                            if asked != period {
                                period = asked;
                                tick = tokio::time::interval_at(
                                    tokio::time::Instant::now() + period,
                                    period,
                                );
                                tick.set_missed_tick_behavior(
                                    tokio::time::MissedTickBehavior::Delay,
                                );
                            }
                        }
                    }
                }
                outcome => {
                    failures += 1;
                    if failures == 1 || failures % 60 == 0 {
                        let why = match outcome {
                            Ok(Ok(resp)) => format!("status {}", resp.status()),
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => "timed out".into(),
                        };
                        tracing::warn!(%url, reason = %why, failures, "heartbeat failed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_rooms_carry_webrtc_sessions_and_push_listeners() {
        let (a, b, c) = (RoomId(1), RoomId(2), RoomId(3));
        let loads = room_loads(
            BTreeMap::from([(a, 4), (b, 2)]),
            BTreeMap::from([(b, 9), (c, 30)]),
            &[c, RoomId(4)],
        );
        let got: Vec<(RoomId, u32, u32)> =
            loads.iter().map(|r| (r.room, r.sessions, r.push)).collect();
        assert_eq!(
            got,
            vec![(a, 4, 0), (b, 2, 9), (c, 0, 30), (RoomId(4), 0, 0)]
        );
    }

    #[test]
    fn heartbeat_period_follows_the_router_within_bounds() {
        assert_eq!(heartbeat_period(500), Duration::from_millis(500));
        assert_eq!(heartbeat_period(2000), Duration::from_secs(2));
        assert_eq!(heartbeat_period(0), Duration::from_millis(100));
        assert_eq!(heartbeat_period(u64::MAX), Duration::from_secs(10));
    }

    #[test]
    fn drain_ends_when_empty_or_after_grace() {
        let t0 = Instant::now();
        let p = DrainPlan::new(t0, Duration::from_secs(30));
        assert!(!p.done(2, t0));
        assert!(!p.done(1, t0 + Duration::from_secs(29)));
        assert!(p.done(0, t0 + Duration::from_secs(1)));
        assert!(p.done(5, t0 + Duration::from_secs(30)));
    }

    #[test]
    fn only_session_opening_requests_are_refused() {
        assert!(opens_session(&Method::POST, "/whip/00000000000000aa"));
        assert!(opens_session(&Method::POST, "/whep/00000000000000aa"));
        assert!(opens_session(&Method::GET, "/v1/ws"));
        // Ending or patching existing sessions, preflights and metrics go on.
        assert!(!opens_session(
            &Method::DELETE,
            "/whip/00000000000000aa/abc"
        ));
        assert!(!opens_session(&Method::POST, "/whip/00000000000000aa/abc"));
        assert!(!opens_session(&Method::OPTIONS, "/whip/00000000000000aa"));
        assert!(!opens_session(&Method::GET, "/metrics"));
        assert!(!opens_session(&Method::POST, "/whip/"));
    }

    #[test]
    fn drain_handle_is_idempotent() {
        let d = DrainHandle::default();
        assert!(!d.is_draining());
        d.start();
        d.start();
        assert!(d.is_draining());
    }

    #[test]
    fn heartbeat_signature_matches_the_router_scheme() {
        // Same message layout as the router's `auth::sign`: "{ts}\n{METHOD}\n{path}\n{body}".
        let s = sign("s3cret", 1000, "PUT", "/v1/edges/e1", b"{}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(b"1000\nPUT\n/v1/edges/e1\n{}");
        assert_eq!(
            s,
            format!("v1={}", hex::encode(mac.finalize().into_bytes()))
        );
        assert_ne!(s, sign("s3cret", 1001, "PUT", "/v1/edges/e1", b"{}"));
    }

    #[test]
    fn a_beat_repeating_the_last_within_its_second_is_not_signed_again() {
        let mut last = LastSigned::default();
        assert!(!last.repeats(1000, b"{\"a\":1}"));
        assert!(
            last.repeats(1000, b"{\"a\":1}"),
            "same second, same body: the router would refuse it as a replay"
        );
        assert!(!last.repeats(1000, b"{\"a\":2}"), "new state is sent");
        assert!(!last.repeats(1001, b"{\"a\":2}"), "next second is sent");
    }
}
