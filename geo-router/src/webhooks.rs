//! Signed webhooks: events are queued without waiting, in one bounded queue per receiver (a full
//! queue drops and counts the event, so nothing on the request or media path ever blocks on a
//! receiver), and a fixed set of delivery tasks per receiver POSTs them as JSON with `X-Amphi-Webhook-Signature: sha256=<hex HMAC-SHA256(secret, body)>`, retried
//! with exponential backoff.

use crate::auth::hmac_hex;
use amphi_common::redact::url_origin;
use amphi_protocol::config::WebhookConfig;
use amphi_protocol::https::HttpsClient;
use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Events waiting for delivery, per receiver, before new ones are dropped.
const QUEUE: usize = 1024;
/// Delivery attempts per event and receiver.
pub const MAX_ATTEMPTS: u32 = 6;
/// Timeout of one delivery attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The event kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A room went live.
    RoomStarted,
    /// A room ended.
    RoomEnded,
    /// Sessions of a room on an edge went up (from edge heartbeats).
    ParticipantJoined,
    /// Sessions of a room on an edge went down (from edge heartbeats).
    ParticipantLeft,
    /// A recording is ready.
    RecordingReady,
    /// The host published a recording (public, with its downloadable file).
    RecordingPublished,
    /// The host deleted a recording (every object removed).
    RecordingDeleted,
    /// Subscribers of a scheduled room's reminder are to be told (batched; see
    /// [`crate::reminders`]).
    RoomReminder,
    /// A participant reported a user or a room (`data` is the report).
    ReportCreated,
}

/// One webhook delivery body.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Unique id (receivers deduplicate retries with it).
    pub id: String,
    /// Kind.
    pub event: EventKind,
    /// Unix seconds.
    pub at: u64,
    /// Event details (`room`, `edge`, `sessions`, ...).
    pub data: serde_json::Value,
}

/// Delay before retry `attempt` (1-based): 250 ms doubling, capped at 8 s.
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(250u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(8))
}

/// What the dispatcher counts (registered metrics; clones share their values).
#[derive(Clone, Debug, Default)]
pub struct WebhookCounters {
    /// Events dropped because the queue was full.
    pub dropped: Counter,
    /// Deliveries that succeeded (2xx).
    pub delivered: Counter,
    /// Deliveries abandoned after every attempt failed.
    pub failed: Counter,
}

/// An event ready to send: its JSON body, serialized once for every receiver.
struct Queued {
    id: String,
    kind: EventKind,
    body: Bytes,
}

/// Handle to the webhook dispatcher: one bounded queue per receiver, drained by
/// [`WORKERS_PER_RECEIVER`] delivery tasks (a slow or dead receiver holds at most that many
/// deliveries in flight and fills only its own queue).
#[derive(Clone)]
pub struct Webhooks {
    queues: Vec<mpsc::Sender<Arc<Queued>>>,
    dropped: Counter,
}

/// Delivery tasks per receiver.
pub const WORKERS_PER_RECEIVER: usize = 4;

impl Webhooks {
    /// Start the dispatcher (no task when there are no receivers), delivering through `client`
    /// (`https://` and `http://` receivers), counting into `counters`.
    pub fn start(
        receivers: Vec<WebhookConfig>,
        client: HttpsClient<Full<Bytes>>,
        counters: WebhookCounters,
        shutdown: CancellationToken,
    ) -> Self {
        let WebhookCounters {
            dropped,
            delivered,
            failed,
        } = counters;
        let mut queues = Vec::with_capacity(receivers.len());
        for r in receivers {
            let (tx, rx) = mpsc::channel::<Arc<Queued>>(QUEUE);
            queues.push(tx);
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            let r = Arc::new(r);
            for _ in 0..WORKERS_PER_RECEIVER {
                let (rx, r, client) = (rx.clone(), r.clone(), client.clone());
                let (delivered, failed, sd) = (delivered.clone(), failed.clone(), shutdown.clone());
                tokio::spawn(async move {
                    loop {
                        let next = tokio::select! {
                            _ = sd.cancelled() => return,
                            ev = async { rx.lock().await.recv().await } => ev,
                        };
                        let Some(ev) = next else { return };
                        if deliver(&client, &r, &ev, &sd).await {
                            delivered.inc();
                        } else if !sd.is_cancelled() {
                            failed.inc();
                        }
                    }
                });
            }
        }
        Webhooks { queues, dropped }
    }

    /// Whether no receiver is configured (events go nowhere).
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Queue an event for every receiver; never waits (a receiver whose queue is full misses
    /// it, counted in `dropped`).
    pub fn emit(&self, event: EventKind, at: u64, data: serde_json::Value) {
        if self.queues.is_empty() {
            return;
        }
        let ev = Event {
            id: format!("{:032x}", rand::random::<u128>()),
            event,
            at,
            data,
        };
        let queued = Arc::new(Queued {
            body: Bytes::from(serde_json::to_vec(&ev).expect("events serialize")),
            id: ev.id,
            kind: event,
        });
        for q in &self.queues {
            if q.try_send(queued.clone()).is_err() {
                self.dropped.inc();
            }
        }
    }
}

/// POST `ev` to receiver `r`, at most [`MAX_ATTEMPTS`] times with backoff; whether it was
/// accepted (2xx). Gives up at once on `shutdown`.
async fn deliver(
    client: &HttpsClient<Full<Bytes>>,
    r: &WebhookConfig,
    ev: &Queued,
    shutdown: &CancellationToken,
) -> bool {
    let kind = ev.kind;
    let sig = format!("sha256={}", hmac_hex(&r.secret, &ev.body));
    for attempt in 1..=MAX_ATTEMPTS {
        let req = http::Request::post(&r.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-amphi-webhook-signature", &sig)
            .header("x-amphi-webhook-id", &ev.id)
            .header("x-amphi-webhook-attempt", attempt.to_string())
            .body(Full::new(ev.body.clone()));
        let Ok(req) = req else {
            tracing::warn!(url = %url_origin(&r.url), "bad webhook URL");
            return false;
        };
        let outcome = tokio::select! {
            o = tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(req)) => o,
            _ = shutdown.cancelled() => return false,
        };
        match outcome {
            Ok(Ok(resp)) if resp.status().is_success() => return true,
            Ok(Ok(resp)) => {
                tracing::info!(url = %url_origin(&r.url), ?kind, status = %resp.status(), attempt, "webhook refused")
            }
            Ok(Err(e)) => {
                tracing::info!(url = %url_origin(&r.url), ?kind, error = %e, attempt, "webhook failed")
            }
            Err(_) => {
                tracing::info!(url = %url_origin(&r.url), ?kind, attempt, "webhook timed out")
            }
        }
        if attempt < MAX_ATTEMPTS {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(retry_delay(attempt)) => {}
            }
        }
    }
    tracing::warn!(url = %url_origin(&r.url), ?kind, "webhook abandoned after {MAX_ATTEMPTS} attempts");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_with_a_cap() {
        let d: Vec<u64> = (1..=8).map(|a| retry_delay(a).as_millis() as u64).collect();
        assert_eq!(d, [250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
    }

    /// A webhook receiver served over HTTPS with a private CA's certificate: delivered through the
    /// shared HTTPS client trusting that CA, with the signature over the exact body.
    #[tokio::test]
    async fn events_are_delivered_to_https_receivers() {
        use amphi_protocol::https;
        let dir = std::env::temp_dir().join(format!("amphi-webhook-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = amphi_common::mtls::DevPki::generate().unwrap();
        let issued = pki.issue_pem_for(&["127.0.0.1".into()], &[]).unwrap();
        let (ca, cert, key) = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        std::fs::write(&ca, &issued.ca).unwrap();
        std::fs::write(&cert, &issued.cert).unwrap();
        std::fs::write(&key, &issued.key).unwrap();

        let (got_tx, mut got_rx) = mpsc::unbounded_channel::<(String, Bytes)>();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let got_tx = got_tx.clone();
                async move {
                    let sig = headers
                        .get("x-amphi-webhook-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let _ = got_tx.send((sig, body));
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(https::serve_tls(
            listener,
            https::acceptor(&cert, &key).unwrap(),
            app,
            shutdown.clone(),
            https::Limiter::unlimited(),
        ));

        let counters = WebhookCounters::default();
        let hooks = Webhooks::start(
            vec![WebhookConfig {
                url: format!("https://127.0.0.1:{}/hook", addr.port()),
                secret: "s3cret".into(),
            }],
            https::client(Some(&ca)).unwrap(),
            counters.clone(),
            shutdown.clone(),
        );
        hooks.emit(
            EventKind::RoomStarted,
            7,
            serde_json::json!({"room": "00000000000000aa"}),
        );
        let (sig, body) = tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
            .await
            .expect("delivered within 10 s")
            .unwrap();
        assert_eq!(sig, format!("sha256={}", hmac_hex("s3cret", &body)));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["event"], "room_started");
        for _ in 0..100 {
            if counters.delivered.get() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(counters.delivered.get(), 1);
        shutdown.cancel();
        server.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A receiver that accepts connections and never answers: at most
    /// [`WORKERS_PER_RECEIVER`] deliveries are in flight, and events past the queue are dropped
    /// and counted instead of spawning work.
    #[tokio::test]
    async fn a_dead_receiver_holds_fixed_workers_and_a_bounded_queue() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(s);
            }
        });
        let counters = WebhookCounters::default();
        let shutdown = CancellationToken::new();
        let hooks = Webhooks::start(
            vec![WebhookConfig {
                url: format!("http://{addr}/hook"),
                secret: "s".into(),
            }],
            amphi_protocol::https::client(None).unwrap(),
            counters.clone(),
            shutdown.clone(),
        );
        let extra = 50;
        for i in 0..QUEUE + extra {
            hooks.emit(
                EventKind::ParticipantJoined,
                i as u64,
                serde_json::json!({}),
            );
        }
        // Emitting never yields: the queue holds QUEUE events, the rest are dropped.
        assert_eq!(counters.dropped.get(), extra as u64);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while accepted.load(std::sync::atomic::Ordering::SeqCst) < WORKERS_PER_RECEIVER {
            assert!(
                tokio::time::Instant::now() < deadline,
                "workers never connected"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            WORKERS_PER_RECEIVER
        );
        shutdown.cancel();
        server.abort();
    }

    #[test]
    fn events_serialize_with_snake_case_kinds() {
        let ev = Event {
            id: "x".into(),
            event: EventKind::ParticipantJoined,
            at: 5,
            data: serde_json::json!({"room": "00000000000000aa"}),
        };
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["event"], "participant_joined");
        assert_eq!(v["data"]["room"], "00000000000000aa");
    }
}
