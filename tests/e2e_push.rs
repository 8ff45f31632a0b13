//! The push listener tier end to end: a real `amphi dev` mesh, our str0m WHIP client publishing
//! a tone at one edge, and a WebSocket push listener at the other edge that receives the room's
//! program (header, then audio messages of Opus frames with room timestamps), decodes it with
//! libopus and finds the tone. Token checks answer HTTP statuses with JSON errors.

use amphi_protocol::push::{parse_server_frame, AudioMessage, PushHeader, FRAME_SAMPLES};
use amphi_testkit::mesh::*;
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The Chromium tests of this file run one at a time: two multi-page browser runs side by side on
/// a 2-core box stall each other's audio (the tier-move test saw 100-470 ms gaps only then).
static ONE_BROWSER_TEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Hold while a browser test's pages run.
fn one_browser_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_BROWSER_TEST.lock().unwrap_or_else(|e| e.into_inner())
}

/// Status and JSON error code of a plain (non-upgrade) GET.
fn refused(url: &str) -> (u16, String) {
    match ureq::get(url).call() {
        Ok(r) => (r.status(), String::new()),
        Err(ureq::Error::Status(code, r)) => {
            let v: serde_json::Value = r.into_json().unwrap_or_default();
            (code, v["error"].as_str().unwrap_or("").to_string())
        }
        Err(e) => panic!("{url}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_listener_at_another_edge_hears_the_speakers_tone() {
    let mesh = DevMesh::start(16_500, "push-tone");
    let (room, _host, _hls) = mesh.create_room("push tone");
    let (other, _, _) = mesh.create_room("another room");
    let listener = mesh.token(&room, "listener", "push-1");
    let push = format!("{}/v1/rooms/{room}/push", mesh.edge(1));

    // No token, a bad token, another room's token: refused before any upgrade.
    let checks = {
        let (push, other_token) = (push.clone(), mesh.token(&other, "listener", "x"));
        tokio::task::spawn_blocking(move || {
            [
                refused(&push),
                refused(&format!("{push}?token=not-a-token")),
                refused(&format!("{push}?token={other_token}")),
            ]
        })
        .await
        .unwrap()
    };
    assert_eq!(checks[0], (401, "unauthorized".into()));
    assert_eq!(checks[1], (401, "unauthorized".into()));
    assert_eq!(checks[2], (403, "forbidden".into()));

    let url = format!("{}?token={listener}", push.replace("http://", "ws://"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("push upgrade");
    assert_eq!(resp.status(), 101);

    // The speaker at the other edge (us-east; the listener is at eu-west).
    let speaker = mesh.token(&room, "speaker", "tone-660");
    let whip = mesh.route(&room, "us-east")["whip_url"]
        .as_str()
        .unwrap()
        .to_string();
    let tone = tokio::spawn(async move { publish_tone(&whip, &speaker, 660.0, 6.0).await });

    let mut header: Option<PushHeader> = None;
    let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
    let mut samples: Vec<f32> = Vec::new();
    let mut pcm = vec![0f32; 5760];
    let (mut frames, mut messages, mut gaps) = (0usize, 0usize, 0usize);
    let mut last_ts: Option<u64> = None;
    let mut last_seq: Option<u32> = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while frames < 250 && Instant::now() < deadline {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a push message within 5 s")
            .expect("stream open")
            .expect("websocket message");
        match msg {
            Message::Text(text) => {
                assert!(header.is_none(), "one header only");
                header = Some(serde_json::from_str(&text).expect("header JSON"));
            }
            Message::Binary(bytes) => {
                let h = header.as_ref().expect("the header comes first");
                assert_eq!(h.room, room);
                let m = AudioMessage::decode(&bytes).expect("audio message decodes");
                assert!(m.len() <= h.frames_per_message as usize);
                if let Some(seq) = last_seq {
                    assert_eq!(m.seq, seq.wrapping_add(1), "no message skipped");
                }
                last_seq = Some(m.seq);
                messages += 1;
                for f in m.frames() {
                    assert!(f.ts >= h.ts_base);
                    if let Some(last) = last_ts {
                        assert!(f.ts > last, "timestamps increase");
                        if f.ts != last + FRAME_SAMPLES {
                            gaps += 1;
                        }
                    }
                    last_ts = Some(f.ts);
                    let n = decoder.decode_float(f.opus, &mut pcm, false).expect("opus");
                    samples.extend_from_slice(&pcm[..n]);
                    frames += 1;
                }
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
    tone.await.unwrap();
    let h = header.expect("a header");
    assert_eq!(
        (h.codec.as_str(), h.sample_rate, h.channels, h.frame_ms),
        ("opus", 48_000, 1, 20)
    );
    assert!(frames >= 250, "{frames} frames in {messages} messages");
    assert!(gaps <= 2, "{gaps} gaps in {frames} frames");
    let (freq, level) = dominant_frequency(&samples);
    assert!((freq - 660.0).abs() <= 5.0, "dominant frequency {freq} Hz");
    assert!(level > 0.02, "real energy expected, rms {level}");

    let m = metric(&mesh.edge(1), "amphi_edge_push_listeners").unwrap();
    assert_eq!(m, 1.0);
    drop(ws);
}

/// A push listener over WebTransport (HTTP/3, web-transport-quinn's client pinning the hash the
/// route answer carries): refused with the WebSocket's statuses for a bad token or another
/// room's, then the session's one stream brings the header and the room's audio, which decodes
/// to the speaker's tone; when the host ends the room the stream ends with a close frame 4002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_listener_over_webtransport_hears_the_tone_and_the_room_end() {
    // A mesh takes ports offset+8080 to offset+8401 (TCP and UDP): offsets at least 400 apart
    // do not collide with the other tests of this file running beside it.
    let mesh = DevMesh::start(14_000, "push-webtransport");
    let (room, host, _hls) = mesh.create_room("push over webtransport");
    let (other, _, _) = mesh.create_room("another room");
    // The edge's listener reaches route answers with its first heartbeat.
    let mut route = mesh.route(&room, "eu-west");
    for _ in 0..50 {
        if route["webtransport_url"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        route = mesh.route(&room, "eu-west");
    }
    let url = route["webtransport_url"]
        .as_str()
        .expect("webtransport_url");
    let hash = hex::decode(route["webtransport_cert_sha256"].as_str().expect("hash")).unwrap();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let client = web_transport_quinn::ClientBuilder::new()
        .with_server_certificate_hashes(vec![hash.clone()])
        .unwrap();
    let connect = |query: String| {
        let client = &client;
        let url = url::Url::parse(&format!("{url}?{query}")).unwrap();
        async move { client.connect(url).await }
    };
    let status = |r: Result<web_transport_quinn::Session, web_transport_quinn::ClientError>| match r
    {
        Err(web_transport_quinn::ClientError::HttpError(
            web_transport_quinn::ConnectError::ErrorStatus(s),
        ))
        | Err(web_transport_quinn::ClientError::HttpError(
            web_transport_quinn::ConnectError::ProtoError(
                web_transport_quinn::proto::ConnectError::WrongStatus(Some(s)),
            ),
        )) => s.as_u16(),
        Err(e) => panic!("refused without a status: {e}"),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(status(connect("token=not-a-token".into()).await), 401);
    let other_token = mesh.token(&other, "listener", "x");
    assert_eq!(status(connect(format!("token={other_token}")).await), 403);
    // A client that does not pin the hash (nor trusts the edge's own certificate) is refused
    // by TLS.
    let unpinned = web_transport_quinn::ClientBuilder::new()
        .with_server_certificate_hashes(vec![vec![0; 32]])
        .unwrap();
    assert!(unpinned
        .connect(url::Url::parse(url).unwrap())
        .await
        .is_err());

    let listener = mesh.token(&room, "listener", "wt-1");
    let session = connect(format!("token={listener}")).await.expect("session");
    let mut stream = session.accept_uni().await.expect("the edge's stream");

    let speaker = mesh.token(&room, "speaker", "tone-770");
    let whip = mesh.route(&room, "us-east")["whip_url"]
        .as_str()
        .unwrap()
        .to_string();
    let tone = tokio::spawn(async move { publish_tone(&whip, &speaker, 770.0, 6.0).await });

    let mut header: Option<PushHeader> = None;
    let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
    let mut samples: Vec<f32> = Vec::new();
    let mut pcm = vec![0f32; 5760];
    let mut frames = 0usize;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut close_code: Option<u16> = None;
    let mut ended_at: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while close_code.is_none() && Instant::now() < deadline {
        if frames >= 250 && ended_at.is_none() {
            // Heard enough: the host ends the room.
            let router = mesh.router();
            let (room, host) = (room.clone(), host.clone());
            let status = tokio::task::spawn_blocking(move || {
                ureq::post(&format!("{router}/v1/rooms/{room}/end"))
                    .set("Authorization", &format!("Bearer {host}"))
                    .send_string("")
                    .map(|r| r.status())
                    .unwrap_or_else(|e| panic!("end: {e}"))
            })
            .await
            .unwrap();
            assert_eq!(status, 200);
            ended_at = Some(Instant::now());
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("push bytes within 5 s")
            .expect("stream readable");
        let Some(n) = n else { break };
        buf.extend_from_slice(&chunk[..n]);
        // The stream carries the WebSocket's server frames.
        while let Some(frame) = parse_server_frame(&buf).expect("a server frame") {
            let (payload, taken) = (&buf[frame.payload.clone()], frame.consumed);
            match frame.opcode {
                1 => header = Some(serde_json::from_slice(payload).expect("header JSON")),
                2 if ended_at.is_none() => {
                    let h = header.as_ref().expect("the header comes first");
                    assert_eq!(h.room.to_string(), room);
                    let m = AudioMessage::decode(payload).expect("audio message decodes");
                    for f in m.frames() {
                        let n = decoder.decode_float(f.opus, &mut pcm, false).expect("opus");
                        samples.extend_from_slice(&pcm[..n]);
                        frames += 1;
                    }
                }
                2 => {}
                8 => close_code = Some(u16::from_be_bytes([payload[0], payload[1]])),
                other => panic!("unexpected opcode {other}"),
            }
            buf.drain(..taken);
        }
    }
    tone.abort();
    assert!(frames >= 250, "{frames} frames");
    let (freq, level) = dominant_frequency(&samples);
    assert!((freq - 770.0).abs() <= 5.0, "dominant frequency {freq} Hz");
    assert!(level > 0.02, "real energy expected, rms {level}");
    assert_eq!(close_code, Some(4002), "the room end reaches the listener");
    eprintln!(
        "webtransport: {frames} frames; room end reached the listener in {:?}",
        ended_at.map(|t| t.elapsed())
    );
    let sessions = metric(&mesh.edge(1), "amphi_edge_push_webtransport_sessions_total").unwrap();
    assert_eq!(sessions, 1.0, "refused sessions are not counted");
}

/// The room page's push mode in headless Chromium (`tests/browser/push_play.mjs`): web/push.js
/// plays the program from the edge over WebTransport; a second page asks for the WebSocket and a
/// third cannot open WebTransport sessions and falls back to it; each page hears the tone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_page_plays_the_push_stream_in_chromium() {
    let mesh = DevMesh::start(17_500, "push-browser");
    let (room, _host, _hls) = mesh.create_room("push in a browser");
    let speaker = mesh.token(&room, "speaker", "tone-550");
    let whip = mesh.route(&room, "us-east")["whip_url"]
        .as_str()
        .unwrap()
        .to_string();
    let tone = tokio::spawn(async move { publish_tone(&whip, &speaker, 550.0, 25.0).await });
    let result = tokio::task::block_in_place(|| {
        let _one = one_browser_test_at_a_time();
        mesh.browser_result(
            "push_play.mjs",
            &[("AMPHI_ROOM", &room), ("AMPHI_FREQ", "550")],
        )
    });
    tone.abort();
    eprintln!("push player: {result}");
    for (page, transport) in [
        ("webtransport", "webtransport"),
        ("websocket", "websocket"),
        ("fallback", "websocket"),
    ] {
        let stats = &result[page];
        assert!(
            stats["frames"].as_u64().unwrap_or(0) > 0,
            "{page}: {result}"
        );
        assert_eq!(stats["label"], "push", "{page}");
        assert_eq!(stats["transport"], transport, "{page}");
    }
}

/// Three listeners of one room on the three tiers the router picks (`tests/browser/three_tiers.mjs`):
/// with one interactive and one push seat per room and edge, the first listener at eu-west gets
/// WebRTC, the second the push stream, the third LL-HLS, and each room page hears the tone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_listeners_on_three_tiers_hear_the_same_tone() {
    let mesh = DevMesh::start_with(
        12_000,
        "three-tiers",
        &["--interactive-capacity", "1", "--push-capacity", "1"],
    );
    let (room, _host, _hls) = mesh.create_room("three tiers");
    let speaker = mesh.token(&room, "speaker", "tone-440");
    let whip = mesh.route(&room, "us-east")["whip_url"]
        .as_str()
        .unwrap()
        .to_string();
    let tone = tokio::spawn(async move { publish_tone(&whip, &speaker, 440.0, 90.0).await });
    let result = tokio::task::block_in_place(|| {
        let _one = one_browser_test_at_a_time();
        mesh.browser_result(
            "three_tiers.mjs",
            &[("AMPHI_ROOM", &room), ("AMPHI_FREQ", "440")],
        )
    });
    tone.abort();
    eprintln!("three tiers: {result}");
    assert_eq!(
        result["modes"],
        serde_json::json!(["webrtc", "push", "hls"]),
        "{result}"
    );
}

/// A room grows past both tier thresholds under `amphi-tools loadgen listeners` and shrinks
/// again (`tests/browser/tier_moves.mjs`): the room pages the router put on push and LL-HLS are
/// moved up by their edge as seats free (HLS -> push, push -> WebRTC) and keep hearing the
/// tone with no gap the page's analyser can tell. The room's own thresholds (2 and 2) reach the
/// edge through the router's heartbeat answers. Needs `amphi-tools` built (`./scripts/test.sh`
/// builds the workspace; else `cargo build -p amphi-tools`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_grows_past_both_tiers_and_moves_its_listeners_up_without_a_gap() {
    let mesh = DevMesh::start(13_000, "tier-moves");
    let created: serde_json::Value = ureq::post(&format!("{}/v1/rooms", mesh.router()))
        .send_json(serde_json::json!({
            "title": "tier moves",
            "tiers": {"interactive": 2, "push": 2}
        }))
        .expect("create room")
        .into_json()
        .unwrap();
    let room = created["room"].as_str().unwrap().to_string();
    let tools = tools_bin().expect("amphi-tools binary");
    let speaker = mesh.token(&room, "speaker", "tone-440");
    let whip = mesh.route(&room, "us-east")["whip_url"]
        .as_str()
        .unwrap()
        .to_string();
    let tone = tokio::spawn(async move { publish_tone(&whip, &speaker, 440.0, 150.0).await });
    let result = tokio::task::block_in_place(|| {
        let _one = one_browser_test_at_a_time();
        mesh.browser_result(
            "tier_moves.mjs",
            &[
                ("AMPHI_ROOM", &room),
                ("AMPHI_FREQ", "440"),
                ("AMPHI_TOOLS", tools.to_str().unwrap()),
            ],
        )
    });
    tone.abort();
    eprintln!("tier moves: {result}");
    assert_eq!(
        result["modes"],
        serde_json::json!(["push", "hls"]),
        "{result}"
    );
    let path = |page: &str| -> Vec<(String, String)> {
        result[page]["moves"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["from"].as_str().unwrap().to_string(),
                    m["to"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(path("a"), vec![pair("push", "webrtc")], "{result}");
    assert_eq!(
        path("b"),
        vec![pair("hls", "push"), pair("push", "webrtc")],
        "{result}"
    );
    // The eu-west edge offered exactly those three moves, and none was declined.
    let edge = mesh.edge(1);
    assert_eq!(
        metric(&edge, "amphi_edge_tier_moves_offered_total"),
        Some(3.0)
    );
    assert_eq!(
        metric(&edge, "amphi_edge_tier_moves_declined_total"),
        Some(0.0)
    );
    // From before the first move until after the last: no gap on either page, at the moves'
    // cross-overs or anywhere else.
    for page in ["a", "b"] {
        let longest = result[page]["longest_gap_ms"].as_u64().unwrap();
        assert!(
            longest <= MOVE_GAP_MAX_MS,
            "page {page} had a {longest} ms gap: {result}"
        );
    }
}

/// The longest run without the tone a page may have while it is moved: the analyser's 43 ms
/// window plus the slack of its 5 ms sampling timer, under a gap a listener hears as a dropout.
const MOVE_GAP_MAX_MS: u64 = 100;

/// Promotion from the push and HLS tiers in headless Chromium (`tests/browser/promote_latency.mjs`):
/// a listener on each tier raises a hand (its page pre-warms WebRTC), the host promotes it and
/// hears its microphone, then moves it back. Prints the click-to-heard times; the figure itself is
/// measured by `bench/promote/run.sh` (more trials, release build), not asserted here.
#[test]
fn a_listener_on_push_or_hls_is_promoted_and_heard() {
    let mesh = DevMesh::start(12_500, "promote");
    let wav = mesh.scratch.join("tone660.wav");
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg("sine=frequency=660:sample_rate=48000:duration=600")
        .args(["-ac", "1"])
        .arg(&wav)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg made no tone");
    let trials = std::env::var("AMPHI_PROMOTE_TRIALS").unwrap_or_else(|_| "1".into());
    let _one = one_browser_test_at_a_time();
    let result = mesh.browser_result(
        "promote_latency.mjs",
        &[
            ("AMPHI_WAV_GUEST", wav.to_str().unwrap()),
            ("AMPHI_TRIALS", &trials),
        ],
    );
    for tier in ["push_ms", "hls_ms"] {
        let mut ms: Vec<u64> = result[tier]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ms.len().to_string(), trials, "{result}");
        ms.sort_unstable();
        eprintln!(
            "promotion from {}: p50 {} ms, max {} ms over {} trials ({ms:?})",
            tier.trim_end_matches("_ms"),
            ms[ms.len() / 2],
            ms[ms.len() - 1],
            ms.len()
        );
    }
}
