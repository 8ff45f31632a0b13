//! Origin metrics (atomics) and their Prometheus text exposition on `GET /metrics`.

use crate::mixer::MixStats;
use amphi_protocol::relay::RelayError;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why a relay datagram (or a packet inside the mixer) was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than a relay header.
    TooShort,
    /// Unknown relay version.
    Version,
    /// Unknown frame kind.
    Kind,
    /// Audio level out of range.
    AudioLevel,
    /// Payload empty or too large.
    PayloadLen,
    /// A valid frame of a kind edges must not send (Program).
    WrongKind,
    /// A datagram from a peer that is not an edge.
    NotEdge,
    /// Forwarding to a subscriber failed (connection lost, too large, unsupported).
    SendFailed,
    /// The mixer's input queue was full.
    MixerBusy,
    /// The room has ended.
    RoomEnded,
    /// Too many rooms or speakers to mix another.
    MixerLimit,
    /// The room authority does not let this speaker be heard (muted, a listener, or not in the
    /// room).
    NotAudible,
}

impl DropReason {
    const ALL: [DropReason; 12] = [
        DropReason::TooShort,
        DropReason::Version,
        DropReason::Kind,
        DropReason::AudioLevel,
        DropReason::PayloadLen,
        DropReason::WrongKind,
        DropReason::NotEdge,
        DropReason::SendFailed,
        DropReason::MixerBusy,
        DropReason::RoomEnded,
        DropReason::MixerLimit,
        DropReason::NotAudible,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::TooShort => "too_short",
            DropReason::Version => "version",
            DropReason::Kind => "kind",
            DropReason::AudioLevel => "audio_level",
            DropReason::PayloadLen => "payload_len",
            DropReason::WrongKind => "wrong_kind",
            DropReason::NotEdge => "not_edge",
            DropReason::SendFailed => "send_failed",
            DropReason::MixerBusy => "mixer_busy",
            DropReason::RoomEnded => "room_ended",
            DropReason::MixerLimit => "mixer_limit",
            DropReason::NotAudible => "not_audible",
        }
    }
}

impl From<RelayError> for DropReason {
    fn from(e: RelayError) -> Self {
        match e {
            RelayError::TooShort(_) | RelayError::BufferTooSmall => DropReason::TooShort,
            RelayError::Version(_) => DropReason::Version,
            RelayError::Kind(_) => DropReason::Kind,
            RelayError::AudioLevel(_) => DropReason::AudioLevel,
            RelayError::PayloadLen(_) => DropReason::PayloadLen,
        }
    }
}

/// Every origin metric. Gauges and mixer counters are stored, relay counters are incremented.
#[derive(Default)]
pub struct Metrics {
    /// Rooms whose program runs.
    pub rooms_running: AtomicU64,
    /// Connected edges.
    pub edges: AtomicU64,
    /// Connected packagers.
    pub packagers: AtomicU64,
    /// Relay datagrams received.
    pub relay_in: AtomicU64,
    /// Relay datagrams forwarded (one per subscriber).
    pub relay_forwarded: AtomicU64,
    relay_dropped: [AtomicU64; DropReason::ALL.len()],
    /// Control streams closed for a malformed or unexpected record.
    pub control_errors: AtomicU64,
    /// Program frames written to packager streams.
    pub program_frames_sent: AtomicU64,
    /// Program frames dropped because a packager stream's queue was full.
    pub program_frames_dropped: AtomicU64,
    /// Thread CPU time of the mixer, nanoseconds.
    pub mixer_cpu_ns: AtomicU64,
    /// Room commands applied by the room authority.
    pub room_commands: AtomicU64,
    /// Room commands the authority refused.
    pub room_commands_rejected: AtomicU64,
    /// Rooms held by the room authority (live and remembered ended ones).
    pub rooms_known: AtomicU64,
    mix: std::sync::Mutex<MixStats>,
}

impl Metrics {
    /// Count one dropped datagram.
    pub fn dropped(&self, reason: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|r| *r == reason) {
            self.relay_dropped[i].fetch_add(1, Relaxed);
        }
    }

    /// Dropped datagrams so far for `reason`.
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.relay_dropped[i].load(Relaxed))
    }

    /// Publish the mixer's counters.
    pub fn set_mix_stats(&self, stats: MixStats) {
        if let Ok(mut m) = self.mix.lock() {
            *m = stats;
        }
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mix = self.mix.lock().map(|m| *m).unwrap_or_default();
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            );
        };
        gauge(
            "amphi_origin_rooms_running",
            "Rooms whose program is being mixed.",
            self.rooms_running.load(Relaxed),
        );
        gauge(
            "amphi_origin_rooms_known",
            "Rooms held by the room authority, live and recently ended.",
            self.rooms_known.load(Relaxed),
        );
        gauge(
            "amphi_origin_connected_edges",
            "Edge connections.",
            self.edges.load(Relaxed),
        );
        gauge(
            "amphi_origin_connected_packagers",
            "Packager connections.",
            self.packagers.load(Relaxed),
        );
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            );
        };
        counter(
            "amphi_origin_relay_datagrams_received_total",
            "Relay datagrams received from edges.",
            self.relay_in.load(Relaxed),
        );
        counter(
            "amphi_origin_relay_datagrams_forwarded_total",
            "Relay datagrams forwarded to subscribed edges.",
            self.relay_forwarded.load(Relaxed),
        );
        counter(
            "amphi_origin_control_errors_total",
            "Connections closed for a malformed or unexpected control record.",
            self.control_errors.load(Relaxed),
        );
        counter(
            "amphi_origin_room_commands_total",
            "Room commands applied by the room authority.",
            self.room_commands.load(Relaxed),
        );
        counter(
            "amphi_origin_room_commands_rejected_total",
            "Room commands the room authority refused.",
            self.room_commands_rejected.load(Relaxed),
        );
        counter(
            "amphi_origin_program_frames_mixed_total",
            "Program frames produced by the mixer.",
            mix.frames,
        );
        counter(
            "amphi_origin_program_frames_sent_total",
            "Program frames written to packager streams.",
            self.program_frames_sent.load(Relaxed),
        );
        counter(
            "amphi_origin_program_frames_dropped_total",
            "Program frames dropped because a packager stream queue was full.",
            self.program_frames_dropped.load(Relaxed),
        );
        counter(
            "amphi_origin_opus_decode_errors_total",
            "Speaker packets libopus could not decode.",
            mix.decode_errors,
        );
        let j = mix.jitter;
        for (name, help, v) in [
            (
                "late",
                "Speaker frames dropped because their tick had passed.",
                j.late,
            ),
            ("lost", "Speaker frames missing at playout.", j.lost),
            (
                "concealed",
                "Speaker frames concealed with Opus PLC.",
                j.concealed,
            ),
            (
                "duplicate",
                "Duplicate speaker frames dropped.",
                j.duplicate,
            ),
            (
                "skipped",
                "Speaker frames skipped when the playout delay shrank.",
                j.skipped,
            ),
            (
                "restarts",
                "Speaker streams re-anchored after a timestamp jump.",
                j.restarts,
            ),
        ] {
            counter(&format!("amphi_origin_jitter_{name}_frames_total"), help, v);
        }
        let _ = write!(
            out,
            "# HELP amphi_origin_relay_dropped_total Relay datagrams dropped, by reason.\n\
             # TYPE amphi_origin_relay_dropped_total counter\n"
        );
        for (i, r) in DropReason::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "amphi_origin_relay_dropped_total{{reason=\"{}\"}} {}",
                r.label(),
                self.relay_dropped[i].load(Relaxed)
            );
        }
        let cpu = self.mixer_cpu_ns.load(Relaxed) as f64 / 1e9;
        let _ = write!(
            out,
            "# HELP amphi_origin_mixer_cpu_seconds_total CPU time of the mixer thread.\n\
             # TYPE amphi_origin_mixer_cpu_seconds_total counter\n\
             amphi_origin_mixer_cpu_seconds_total {cpu:.6}\n"
        );
        out
    }
}

fn respond(metrics: &Metrics, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = if req.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        )
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"method not allowed\n"),
        )
    } else {
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(metrics.render()),
        )
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    resp
}

/// Serve `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = respond(&metrics, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "metrics connection ended");
                },
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lists_every_family() {
        let m = Metrics::default();
        m.dropped(DropReason::TooShort);
        m.dropped(DropReason::from(RelayError::Version(3)));
        m.relay_in.store(5, Relaxed);
        let text = m.render();
        assert!(text.contains("amphi_origin_relay_dropped_total{reason=\"too_short\"} 1\n"));
        assert!(text.contains("amphi_origin_relay_dropped_total{reason=\"version\"} 1\n"));
        assert!(text.contains("amphi_origin_relay_datagrams_received_total 5\n"));
        assert!(text.contains("amphi_origin_mixer_cpu_seconds_total 0.000000\n"));
        assert!(text.contains("amphi_origin_jitter_concealed_frames_total 0\n"));
        assert_eq!(m.dropped_count(DropReason::TooShort), 1);
        // Every sample line has a value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let v = line.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }
}
