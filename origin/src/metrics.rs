//! Origin metrics (one prometheus-client registry) and their OpenMetrics exposition on
//! `GET /metrics`.
//!
//! `amphi_origin_room_mixer_cpu_seconds_total` carries a `room` label: a series exists only while
//! the room's program runs and is removed when it stops, so cardinality is bounded by the running
//! rooms (at most `ProgramsConfig::max_rooms`).

use crate::jitter::JitterStats;
use crate::mixer::MixStats;
use crate::room::AuthorityCensus;
use amphi_common::metrics::{MetricsRegistry, CONTENT_TYPE};
use amphi_protocol::relay::RelayError;
use amphi_protocol::room::RoomRole;
use amphi_protocol::RoomId;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
    /// A frame for a speaker (in a room) the sending connection did not announce.
    NotAnnounced,
}

impl DropReason {
    const ALL: [DropReason; 13] = [
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
        DropReason::NotAnnounced,
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
            DropReason::NotAnnounced => "not_announced",
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

type ReasonLabel = [(&'static str, &'static str); 1];
type RoomLabel = [(&'static str, String); 1];
type ParticipantLabels = [(&'static str, String); 2];
/// A counter of seconds.
pub type SecondsCounter = Counter<f64, AtomicU64>;

/// Every origin metric. Connection gauges and relay counters are updated in place; mixer
/// counters are advanced from the mixer's cumulative [`MixStats`].
#[derive(Debug)]
pub struct Metrics {
    registry: MetricsRegistry,
    /// Rooms whose program runs.
    pub rooms_running: Gauge,
    /// Connected edges.
    pub edges: Gauge,
    /// Connected packagers.
    pub packagers: Gauge,
    /// Relay datagrams received.
    pub relay_in: Counter,
    /// Relay datagrams forwarded (one per subscriber).
    pub relay_forwarded: Counter,
    relay_dropped: [Counter; DropReason::ALL.len()],
    /// Control streams closed for a malformed or unexpected record.
    pub control_errors: Counter,
    /// Mesh peers refused because their certificate does not carry the role their `Hello` claimed.
    pub role_refusals: Counter,
    /// `SpeakerJoined` refused because another connection announced that participant.
    pub speaker_claims_refused: Counter,
    /// Mesh peers disconnected because their control queue overflowed (not reading).
    pub control_overflows: Counter,
    /// Program frames written to packager streams.
    pub program_frames_sent: Counter,
    /// Program frames dropped because a packager stream's queue was full.
    pub program_frames_dropped: Counter,
    /// Program frames sent as datagrams to edges with push listeners (one per edge and frame).
    pub program_frames_to_edges: Counter,
    /// Room commands applied by the room authority.
    pub room_commands: Counter,
    /// Room commands the authority refused.
    pub room_commands_rejected: Counter,
    /// Rooms held by the room authority (live and remembered ended ones).
    pub rooms_known: Gauge,
    rooms_live: Gauge,
    participants: Family<ParticipantLabels, Gauge>,
    /// Participant gauges set so far, zeroed when their (role, region) empties.
    participant_series: Mutex<BTreeMap<(RoomRole, String), Gauge>>,
    mixer_cpu: SecondsCounter,
    mixer_cpu_seen_ns: AtomicU64,
    state_backlog: Gauge,
    state_writes: Counter,
    state_writes_seen: AtomicU64,
    state_write_failures: Counter,
    state_write_failures_seen: AtomicU64,
    room_mixer_cpu: Family<RoomLabel, SecondsCounter>,
    frames_mixed: Counter,
    decode_errors: Counter,
    jitter: [Counter; JITTER_COUNTERS.len()],
    mix_seen: Mutex<MixStats>,
}

/// A jitter-buffer counter: name part, help, and its value in [`JitterStats`].
type JitterCounter = (&'static str, &'static str, fn(&JitterStats) -> u64);

/// The jitter-buffer counters exported.
const JITTER_COUNTERS: [JitterCounter; 8] = [
    (
        "late",
        "Speaker frames dropped because their tick had passed",
        |j| j.late,
    ),
    ("lost", "Speaker frames missing at playout", |j| j.lost),
    ("concealed", "Speaker frames concealed with Opus PLC", |j| {
        j.concealed
    }),
    (
        "recovered",
        "Missing speaker frames rebuilt from the next packet's Opus in-band FEC",
        |j| j.recovered,
    ),
    (
        "repaired",
        "Missing speaker frames filled by the edge's repeated relay copy",
        |j| j.repaired,
    ),
    ("duplicate", "Duplicate speaker frames dropped", |j| {
        j.duplicate
    }),
    (
        "skipped",
        "Speaker frames skipped when the playout delay shrank",
        |j| j.skipped,
    ),
    (
        "restarts",
        "Speaker streams re-anchored after a timestamp jump",
        |j| j.restarts,
    ),
];

impl Default for Metrics {
    fn default() -> Self {
        let mut r = MetricsRegistry::default();
        let rooms_running = r.gauge(
            "amphi_origin_rooms_running",
            "Rooms whose program is being mixed",
        );
        let rooms_known = r.gauge(
            "amphi_origin_rooms_known",
            "Rooms held by the room authority, live and recently ended",
        );
        let rooms_live = r.gauge(
            "amphi_origin_rooms_live",
            "Live rooms held by the room authority",
        );
        let participants = Family::<ParticipantLabels, Gauge>::default();
        r.register(
            "amphi_origin_participants",
            "Participants of live rooms held by the room authority, by role and region of their edge",
            participants.clone(),
        );
        let state_backlog = r.gauge(
            "amphi_origin_state_backlog",
            "Rooms whose durable state (Redis) has changes not written yet",
        );
        let state_writes = r.counter(
            "amphi_origin_state_writes",
            "Room state change sets written to Redis",
        );
        let state_write_failures = r.counter(
            "amphi_origin_state_write_failures",
            "Room state writes that failed (kept and retried)",
        );
        let edges = r.gauge("amphi_origin_connected_edges", "Edge connections");
        let packagers = r.gauge("amphi_origin_connected_packagers", "Packager connections");
        let relay_in = r.counter(
            "amphi_origin_relay_datagrams_received",
            "Relay datagrams received from edges",
        );
        let relay_forwarded = r.counter(
            "amphi_origin_relay_datagrams_forwarded",
            "Relay datagrams forwarded to subscribed edges",
        );
        let dropped = Family::<ReasonLabel, Counter>::default();
        r.register(
            "amphi_origin_relay_dropped",
            "Relay datagrams dropped, by reason",
            dropped.clone(),
        );
        let relay_dropped =
            DropReason::ALL.map(|d| dropped.get_or_create_owned(&[("reason", d.label())]));
        let control_errors = r.counter(
            "amphi_origin_control_errors",
            "Connections closed for a malformed or unexpected control record",
        );
        let role_refusals = r.counter(
            "amphi_origin_mesh_role_refusals",
            "Mesh peers refused: their certificate does not carry the role their hello claimed",
        );
        let speaker_claims_refused = r.counter(
            "amphi_origin_speaker_claims_refused",
            "Speaker announcements refused: the participant belongs to another connection",
        );
        let control_overflows = r.counter(
            "amphi_origin_control_overflows",
            "Mesh peers disconnected: their control queue overflowed (they stopped reading)",
        );
        let room_commands = r.counter(
            "amphi_origin_room_commands",
            "Room commands applied by the room authority",
        );
        let room_commands_rejected = r.counter(
            "amphi_origin_room_commands_rejected",
            "Room commands the room authority refused",
        );
        let frames_mixed = r.counter(
            "amphi_origin_program_frames_mixed",
            "Program frames produced by the mixer",
        );
        let program_frames_sent = r.counter(
            "amphi_origin_program_frames_sent",
            "Program frames written to packager streams",
        );
        let program_frames_dropped = r.counter(
            "amphi_origin_program_frames_dropped",
            "Program frames dropped because a packager stream queue was full",
        );
        let program_frames_to_edges = r.counter(
            "amphi_origin_program_frames_to_edges",
            "Program frames sent as datagrams to edges with push listeners, one per edge and frame",
        );
        let decode_errors = r.counter(
            "amphi_origin_opus_decode_errors",
            "Speaker packets libopus could not decode",
        );
        let jitter = JITTER_COUNTERS
            .map(|(name, help, _)| r.counter(&format!("amphi_origin_jitter_{name}_frames"), help));
        let mixer_cpu = SecondsCounter::default();
        r.register(
            "amphi_origin_mixer_cpu_seconds",
            "CPU time of the mixer thread",
            mixer_cpu.clone(),
        );
        let room_mixer_cpu = Family::<RoomLabel, SecondsCounter>::default();
        r.register(
            "amphi_origin_room_mixer_cpu_seconds",
            "CPU time spent mixing and encoding each running room's program (series removed when the program stops)",
            room_mixer_cpu.clone(),
        );
        Metrics {
            registry: r,
            rooms_running,
            edges,
            packagers,
            relay_in,
            relay_forwarded,
            relay_dropped,
            control_errors,
            role_refusals,
            speaker_claims_refused,
            control_overflows,
            program_frames_sent,
            program_frames_dropped,
            program_frames_to_edges,
            room_commands,
            room_commands_rejected,
            rooms_known,
            rooms_live,
            participants,
            participant_series: Mutex::default(),
            mixer_cpu,
            mixer_cpu_seen_ns: AtomicU64::new(0),
            state_backlog,
            state_writes,
            state_writes_seen: AtomicU64::new(0),
            state_write_failures,
            state_write_failures_seen: AtomicU64::new(0),
            room_mixer_cpu,
            frames_mixed,
            decode_errors,
            jitter,
            mix_seen: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Count one dropped datagram.
    pub fn dropped(&self, reason: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|r| *r == reason) {
            self.relay_dropped[i].inc();
        }
    }

    /// Dropped datagrams so far for `reason`.
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.relay_dropped[i].get())
    }

    /// Publish the mixer's cumulative counters.
    pub fn set_mix_stats(&self, stats: MixStats) {
        let Ok(mut seen) = self.mix_seen.lock() else {
            return;
        };
        let advance = |c: &Counter, now: u64, before: u64| {
            c.inc_by(now.saturating_sub(before));
        };
        advance(&self.frames_mixed, stats.frames, seen.frames);
        advance(&self.decode_errors, stats.decode_errors, seen.decode_errors);
        for (c, (_, _, value)) in self.jitter.iter().zip(JITTER_COUNTERS) {
            advance(c, value(&stats.jitter), value(&seen.jitter));
        }
        *seen = stats;
    }

    /// Publish the mixer thread's total CPU time.
    pub fn set_mixer_thread_cpu(&self, total: Duration) {
        let now = u64::try_from(total.as_nanos()).unwrap_or(u64::MAX);
        let before = self.mixer_cpu_seen_ns.swap(now, Ordering::Relaxed);
        self.mixer_cpu
            .inc_by(now.saturating_sub(before) as f64 / 1e9);
    }

    /// Publish the durable-state writer's progress: rooms waiting, and the totals of writes
    /// and failed writes so far.
    pub fn set_state_writer(&self, backlog: usize, writes: u64, failures: u64) {
        self.state_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        let before = self.state_writes_seen.swap(writes, Ordering::Relaxed);
        self.state_writes.inc_by(writes.saturating_sub(before));
        let before = self
            .state_write_failures_seen
            .swap(failures, Ordering::Relaxed);
        self.state_write_failures
            .inc_by(failures.saturating_sub(before));
    }

    /// The CPU-seconds counter of `room`'s mixer (created on first use; resolve it once per
    /// program and keep it).
    pub fn room_mixer_cpu(&self, room: RoomId) -> SecondsCounter {
        self.room_mixer_cpu
            .get_or_create_owned(&[("room", room.to_string())])
    }

    /// `room`'s program stopped: drop its CPU series so label cardinality stays bounded.
    pub fn forget_room_mixer_cpu(&self, room: RoomId) {
        self.room_mixer_cpu.remove(&[("room", room.to_string())]);
    }

    /// Publish the room authority's live rooms and participants.
    pub fn set_authority_census(&self, census: &AuthorityCensus) {
        self.rooms_live
            .set(i64::try_from(census.live_rooms).unwrap_or(i64::MAX));
        let Ok(mut series) = self.participant_series.lock() else {
            return;
        };
        for gauge in series.values() {
            gauge.set(0);
        }
        for ((role, region), n) in &census.participants {
            let gauge = series.entry((*role, region.clone())).or_insert_with(|| {
                self.participants.get_or_create_owned(&[
                    ("role", role.as_str().to_string()),
                    ("region", region.clone()),
                ])
            });
            gauge.set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    /// Every sample name the origin can expose.
    pub fn sample_names(&self) -> &[String] {
        self.registry.sample_names()
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

fn respond(
    exposition: &dyn Fn() -> String,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
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
        (StatusCode::OK, CONTENT_TYPE, Bytes::from(exposition()))
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    resp
}

/// Longest a scraper may take to send a request head (from the accepted connection or the end of
/// the previous answer); slower connections are dropped (slow-loris).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serve `GET /metrics` on `listener` until `shutdown`, answering with `exposition()` (which
/// refreshes scrape-time gauges and renders the registry).
pub async fn serve(
    listener: TcpListener,
    exposition: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) {
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
        let exposition = exposition.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = respond(exposition.as_ref(), &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
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

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    }

    #[test]
    fn exposition_lists_every_family() {
        let m = Metrics::default();
        m.dropped(DropReason::TooShort);
        m.dropped(DropReason::from(RelayError::Version(3)));
        m.relay_in.inc_by(5);
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                "amphi_origin_relay_dropped_total{reason=\"too_short\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "amphi_origin_relay_dropped_total{reason=\"version\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(&text, "amphi_origin_relay_datagrams_received_total"),
            5.0
        );
        assert_eq!(sample(&text, "amphi_origin_mixer_cpu_seconds_total"), 0.0);
        assert_eq!(
            sample(&text, "amphi_origin_jitter_concealed_frames_total"),
            0.0
        );
        assert_eq!(m.dropped_count(DropReason::TooShort), 1);
        // Every sample line has a value and a declared name.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = name.split('{').next().unwrap_or_default();
            assert!(m.sample_names().iter().any(|n| n == name), "{line}");
        }
    }

    #[test]
    fn mixer_counters_advance_from_cumulative_stats() {
        let m = Metrics::default();
        let mut stats = MixStats {
            frames: 50,
            jitter: JitterStats {
                lost: 2,
                ..JitterStats::default()
            },
            ..MixStats::default()
        };
        m.set_mix_stats(stats);
        stats.frames = 80;
        m.set_mix_stats(stats);
        m.set_mixer_thread_cpu(Duration::from_millis(250));
        m.set_mixer_thread_cpu(Duration::from_millis(500));
        let text = m.render();
        assert_eq!(
            sample(&text, "amphi_origin_program_frames_mixed_total"),
            80.0
        );
        assert_eq!(sample(&text, "amphi_origin_jitter_lost_frames_total"), 2.0);
        assert_eq!(sample(&text, "amphi_origin_mixer_cpu_seconds_total"), 0.5);
    }

    #[test]
    fn room_cpu_series_lives_as_long_as_the_program() {
        let m = Metrics::default();
        let room = RoomId(0xab);
        m.room_mixer_cpu(room).inc_by(0.25);
        let series = format!("amphi_origin_room_mixer_cpu_seconds_total{{room=\"{room}\"}}");
        assert_eq!(sample(&m.render(), &series), 0.25);
        m.forget_room_mixer_cpu(room);
        assert!(!m.render().contains(&series));
    }

    #[test]
    fn participants_by_role_and_region_are_zeroed_when_they_leave() {
        let m = Metrics::default();
        let mut census = AuthorityCensus {
            live_rooms: 2,
            participants: BTreeMap::new(),
        };
        census
            .participants
            .insert((RoomRole::Speaker, "eu-west".into()), 3);
        census
            .participants
            .insert((RoomRole::Listener, "us-east".into()), 7);
        m.set_authority_census(&census);
        let text = m.render();
        assert_eq!(sample(&text, "amphi_origin_rooms_live"), 2.0);
        let speakers = "amphi_origin_participants{role=\"speaker\",region=\"eu-west\"}";
        let listeners = "amphi_origin_participants{role=\"listener\",region=\"us-east\"}";
        assert_eq!(sample(&text, speakers), 3.0);
        assert_eq!(sample(&text, listeners), 7.0);
        census
            .participants
            .remove(&(RoomRole::Speaker, "eu-west".into()));
        m.set_authority_census(&census);
        let text = m.render();
        assert_eq!(sample(&text, speakers), 0.0);
        assert_eq!(sample(&text, listeners), 7.0);
    }
}
