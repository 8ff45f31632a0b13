//! `/metrics` of every role during a real room: an `amphi dev` mesh, a speaker publishing over
//! WHIP, a WHEP listener and a WebSocket listener on the same edge, an HLS listener through the
//! geo-router, and route requests. The router, edge, origin and packager are scraped before and
//! during the room; the OpenMetrics text is parsed, the counters must have moved and the labelled
//! series the operators' dashboards rely on must exist. The mesh's log must hold no token.

use amphi_testkit::mesh as support;

use amphi_testkit::whep_client::WhepSubscriber;
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;
use tokio_tungstenite::tungstenite::Message;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One parsed exposition: sample (`name{labels}` as written, labels sorted) -> value, and the
/// declared family types.
#[derive(Debug, Default)]
struct Exposition {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parse the OpenMetrics text format (as prometheus-client writes it: no timestamps or
    /// exemplars). Panics on anything malformed.
    fn parse(text: &str) -> Exposition {
        assert!(text.ends_with("# EOF\n"), "no # EOF terminator:\n{text}");
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                e.types.insert(name.into(), kind.into());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let key = match series.split_once('{') {
                None => series.to_string(),
                Some((name, labels)) => {
                    let labels = labels.strip_suffix('}').expect("labels end with }");
                    format!("{name}{{{}}}", canonical_labels(labels))
                }
            };
            assert!(
                e.samples.insert(key, value).is_none(),
                "duplicate sample {line}"
            );
        }
        for key in e.samples.keys() {
            let name = key.split('{').next().unwrap_or_default();
            let family_declared = e.types.keys().any(|family| {
                name == family
                    || ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(family))
            });
            assert!(family_declared, "{key} has no # TYPE");
        }
        e
    }

    /// The value of `series` (`name` or `name{k="v",...}`, any label order).
    fn get(&self, series: &str) -> Option<f64> {
        let key = match series.split_once('{') {
            None => series.to_string(),
            Some((name, labels)) => format!(
                "{name}{{{}}}",
                canonical_labels(labels.strip_suffix('}').unwrap_or(labels))
            ),
        };
        self.samples.get(&key).copied()
    }

    /// Like [`Exposition::get`], panicking with the whole exposition when absent.
    fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("{series} missing from {:#?}", self.samples))
    }
}

/// `k="v"` pairs sorted by key (values never contain `",` in our metrics; escapes are kept).
fn canonical_labels(labels: &str) -> String {
    let mut pairs: Vec<&str> = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in labels.char_indices() {
        match c {
            '\\' if in_quotes => escaped = !escaped,
            '"' if !escaped => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                pairs.push(&labels[start..i]);
                start = i + 1;
            }
            _ => escaped = false,
        }
        if c != '\\' {
            escaped = false;
        }
    }
    if start < labels.len() {
        pairs.push(&labels[start..]);
    }
    for p in &pairs {
        let (k, v) = p.split_once('=').expect("label k=v");
        assert!(
            !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
            "bad label {p}"
        );
    }
    pairs.sort();
    pairs.join(",")
}

/// GET `{base}/metrics`, checking the OpenMetrics content type.
fn scrape(base: &str) -> Exposition {
    let resp = ureq::get(&format!("{base}/metrics"))
        .timeout(Duration::from_secs(5))
        .call()
        .unwrap_or_else(|e| panic!("scrape {base}: {e}"));
    assert_eq!(resp.header("content-type"), Some(OPENMETRICS), "{base}");
    Exposition::parse(&resp.into_string().expect("metrics body"))
}

/// Scrapes of (router, edge us-east, origin, packager).
struct Scrape {
    router: Exposition,
    edge: Exposition,
    origin: Exposition,
    packager: Exposition,
}

async fn scrape_all(mesh: &DevMesh) -> Scrape {
    let urls = [
        mesh.router(),
        mesh.edge(0),
        mesh.origin_metrics(),
        mesh.packager(),
    ];
    let [router, edge, origin, packager] =
        tokio::task::spawn_blocking(move || urls.map(|u| scrape(&u)))
            .await
            .expect("scrape task");
    Scrape {
        router,
        edge,
        origin,
        packager,
    }
}

/// `series` grew between two scrapes (absent before counts as 0).
fn moved(before: &Exposition, after: &Exposition, series: &str) {
    let (b, a) = (before.get(series).unwrap_or(0.0), after.value(series));
    assert!(a > b, "{series} did not move: {b} -> {a}");
}

/// Join `room` as a WebSocket client of `edge` (token in the query string, as browsers do).
async fn ws_join(
    edge: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("{}/v1/ws?token={token}", edge.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connect");
    ws.send(Message::Text(r#"{"type":"join"}"#.into()))
        .await
        .expect("send join");
    let snapshot = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                if t.contains(r#""type":"snapshot""#) {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(snapshot, Ok(true), "no snapshot after join");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_exposes_moving_metrics_during_a_room() {
    let mesh = DevMesh::start_logging(
        19_000,
        "metrics",
        &[],
        "info,amphi_edge=debug,amphi_geo_router=debug,amphi::request=debug",
    );
    let (room, host, hls_url) = mesh.create_room("observed");
    let before = scrape_all(&mesh).await;

    let speaker = mesh.token(&room, "speaker", "tone");
    let whep_listener = mesh.token(&room, "listener", "whep-ear");
    let ws_listener = mesh.token(&room, "listener", "ws-ear");
    let route = mesh.route(&room, "us-east");
    assert_eq!(route["region"], "us-east");
    let whip = route["whip_url"].as_str().unwrap().to_string();
    let whep = route["whep_url"].as_str().unwrap().to_string();

    let mut ws = ws_join(&mesh.edge(0), &ws_listener).await;
    let mut subscriber = WhepSubscriber::connect(&whep, &whep_listener)
        .await
        .expect("WHEP connect");
    let publisher = {
        let speaker = speaker.clone();
        tokio::spawn(async move { publish_tone(&whip, &speaker, 440.0, 8.0).await })
    };
    // An HLS listener through the router, and the audio reaching the WHEP listener.
    let media = {
        let hls = hls_url.clone();
        tokio::task::spawn_blocking(move || {
            // The playlist appears once the speaker's program reaches the packager.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while get_status(&hls) != 200 {
                assert!(std::time::Instant::now() < deadline, "no playlist at {hls}");
                std::thread::sleep(Duration::from_millis(100));
            }
            let media = media_playlist_url(&hls);
            wait_for_segments(&media, 1, Duration::from_secs(20));
            media
        })
        .await
        .expect("hls listener")
    };
    assert!(media.contains(&room), "{media}");
    let heard = tokio::time::timeout(Duration::from_secs(10), subscriber.recv()).await;
    assert!(matches!(heard, Ok(Some(_))), "WHEP listener heard nothing");
    // Let the one-second RTT samplers and the heartbeats run while the room is live.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = scrape_all(&mesh).await;

    // Geo-router: route decisions by region, edge health, proxied HLS.
    let (b, a) = (&before.router, &after.router);
    moved(
        b,
        a,
        r#"amphi_router_route_decisions_total{region="us-east",outcome="webrtc"}"#,
    );
    for series in [
        "amphi_router_routes_total",
        "amphi_router_tokens_minted_total",
        "amphi_router_hls_proxied_total",
        "amphi_router_heartbeats_total",
    ] {
        moved(b, a, series);
    }
    assert_eq!(
        a.value(r#"amphi_router_edge_healthy{edge="edge-us-east",region="us-east"}"#),
        1.0
    );
    assert_eq!(
        a.value(r#"amphi_router_edge_healthy{edge="edge-eu-west",region="eu-west"}"#),
        1.0
    );
    let load = a.value(r#"amphi_router_edge_load{edge="edge-us-east",region="us-east"}"#);
    assert!((0.0..=1.0).contains(&load), "load {load}");
    assert!(a.value("amphi_router_live_rooms") >= 1.0);
    assert_eq!(a.value("amphi_router_healthy_edges"), 2.0);

    // Edge us-east: packets in, out, forwarding delay, participants by role and region, RTT.
    let (b, a) = (&before.edge, &after.edge);
    for series in [
        "amphi_edge_udp_datagrams_total",
        "amphi_edge_rtp_packets_in_total",
        "amphi_edge_relay_frames_sent_total",
        "amphi_edge_rtp_forwarded_total",
        "amphi_edge_forward_delay_seconds_count",
        r#"amphi_edge_forward_delay_seconds_bucket{le="+Inf"}"#,
        "amphi_edge_whip_sessions_created_total",
        "amphi_edge_whep_sessions_created_total",
        "amphi_edge_ws_sessions_total",
    ] {
        moved(b, a, series);
    }
    assert!(a
        .get(r#"amphi_edge_udp_dropped_total{reason="not_stun"}"#)
        .is_some());
    assert_eq!(
        a.value(r#"amphi_edge_participants{role="speaker",region="us-east"}"#),
        1.0
    );
    assert_eq!(
        a.value(r#"amphi_edge_participants{role="listener",region="us-east"}"#),
        2.0
    );
    assert_eq!(a.value("amphi_edge_rooms"), 1.0);
    assert_eq!(a.value("amphi_edge_origin_connected"), 1.0);
    let rtt = a.value("amphi_edge_origin_rtt_seconds");
    assert!(rtt > 0.0 && rtt < 1.0, "edge relay RTT {rtt}");

    // Origin: relay in, mix, per-room mixer CPU, authority participants by role and region.
    let (b, a) = (&before.origin, &after.origin);
    for series in [
        "amphi_origin_relay_datagrams_received_total",
        "amphi_origin_program_frames_mixed_total",
        "amphi_origin_program_frames_sent_total",
        "amphi_origin_mixer_cpu_seconds_total",
        "amphi_origin_room_commands_total",
    ] {
        moved(b, a, series);
    }
    let room_cpu = format!(r#"amphi_origin_room_mixer_cpu_seconds_total{{room="{room}"}}"#);
    assert!(a.value(&room_cpu) > 0.0, "per-room mixer CPU");
    assert_eq!(
        a.value(r#"amphi_origin_participants{role="speaker",region="us-east"}"#),
        1.0
    );
    assert_eq!(
        a.value(r#"amphi_origin_participants{role="listener",region="us-east"}"#),
        2.0
    );
    assert!(a.value("amphi_origin_rooms_live") >= 1.0);
    assert!(a.value("amphi_origin_rooms_running") >= 1.0);

    // Packager: parts and their publish delay, storage uploads, RTT to the origin.
    let (b, a) = (&before.packager, &after.packager);
    for series in [
        "amphi_packager_frames_received_total",
        "amphi_packager_parts_published_total",
        "amphi_packager_publish_delay_seconds_count",
        "amphi_packager_storage_puts_total",
        "amphi_packager_storage_upload_seconds_count",
    ] {
        moved(b, a, series);
    }
    assert_eq!(a.value("amphi_packager_storage_retries_total"), 0.0);
    assert!(a.value("amphi_packager_rooms_live") >= 1.0);
    let rtt = a.value("amphi_packager_origin_rtt_seconds");
    assert!(rtt > 0.0 && rtt < 1.0, "packager relay RTT {rtt}");

    publisher.await.expect("publisher");
    subscriber.close().await.expect("WHEP close");
    ws.close(None).await.expect("websocket close");

    // Requests were logged (debug) without their tokens.
    let log = mesh.log_text();
    assert!(
        log.contains("token=<redacted>"),
        "the WebSocket request was not logged with its token redacted"
    );
    for (what, token) in [
        ("host", &host),
        ("speaker", &speaker),
        ("WHEP listener", &whep_listener),
        ("WebSocket listener", &ws_listener),
    ] {
        assert!(!log.contains(token.as_str()), "{what} token in the log");
    }
}

#[test]
fn parser_reads_labels_in_any_order_and_checks_families() {
    let text = "# TYPE a counter\na_total{x=\"1\",y=\"a,b\"} 2\n# TYPE g gauge\ng 0.5\n# EOF\n";
    let e = Exposition::parse(text);
    assert_eq!(e.get("a_total{y=\"a,b\",x=\"1\"}"), Some(2.0));
    assert_eq!(e.get("g"), Some(0.5));
    assert_eq!(e.get("a_total"), None);
    let undeclared = std::panic::catch_unwind(|| Exposition::parse("h 1\n# EOF\n"));
    assert!(undeclared.is_err(), "a sample without # TYPE is refused");
}
