//! Players nobody here wrote, in the headless Chromium that `scripts/test.sh` installs: Shaka
//! Player (npm, `tests/browser`) on a room's media playlists directly and on its multivariant
//! playlists, Chromium's own HLS player and hls.js on the per-codec multivariant playlists. A
//! packager in this process packages a live room fed a 440 Hz program in real time.

use amphi_testkit::packager as common;

use amphi_packager::{Packager, PackagerOptions};
use amphi_protocol::config::{OriginEndpoint, PackagerConfig};
use amphi_protocol::RoomId;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const ROOM: RoomId = RoomId(0x5a4b_a000_0000_0013);
/// Longest the program runs (the test stops it earlier).
const PROGRAM_SECS: usize = 240;

/// A packager with one live room fed a tone in real time; stopped on drop.
struct LiveRoom {
    base: String,
    page: String,
    shutdown: CancellationToken,
    feeder: tokio::task::JoinHandle<()>,
}

impl LiveRoom {
    async fn start(tag: &str) -> LiveRoom {
        let data_dir = common::scratch_dir(tag);
        let config = PackagerConfig {
            id: format!("players-{tag}"),
            origins: vec![OriginEndpoint {
                id: "unused".into(),
                addr: ([127, 0, 0, 1], 9).into(),
                server_name: "unused".into(),
            }],
            origin_addr: None,
            origin_server_name: None,
            http_listen: ([127, 0, 0, 1], 0).into(),
            data_dir,
            limits: Default::default(),
        };
        let shutdown = CancellationToken::new();
        let packager = Packager::start(&config, &PackagerOptions::default(), shutdown.clone())
            .await
            .unwrap();
        let http = packager.http_addr;
        let input = packager.input(ROOM).await.unwrap();
        let frames = common::tone_frames(440.0, 50);
        let sd = shutdown.clone();
        let feeder = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in 0..PROGRAM_SECS * 50 {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = sd.cancelled() => break,
                }
                input.frame(i as u32 * 960, &frames[i % frames.len()], 7);
            }
            drop(packager);
        });
        let base = format!("http://{http}/hls/{ROOM}");
        let room = LiveRoom {
            page: format!("http://{http}/healthz"),
            base,
            shutdown,
            feeder,
        };
        // Playable once a segment and a few parts are out.
        let media = format!("/hls/{ROOM}/opus/playlist.m3u8?_HLS_msn=1&_HLS_part=2");
        for _ in 0..40 {
            if common::http_get(http, &media).await.status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        room
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.feeder.await;
    }
}

/// Run `tests/browser/player_play.mjs` with `engine` on `url` for `seconds`; its JSON events.
async fn play(engine: &str, page: &str, url: &str, seconds: u32) -> Vec<serde_json::Value> {
    let env = [
        ("AMPHI_ENGINE", engine),
        ("AMPHI_PAGE", page),
        ("AMPHI_HLS_URL", url),
    ];
    run_node("player_play.mjs", &env, seconds).await
}

/// Run the node script `tests/browser/{script}` with `env` for `seconds`; its JSON events.
async fn run_node(script: &str, env: &[(&str, &str)], seconds: u32) -> Vec<serde_json::Value> {
    let script = format!("{}/../tests/browser/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .envs(env.iter().copied())
        .env("AMPHI_SECONDS", seconds.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    tokio::task::spawn_blocking(move || {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("node (scripts/test.sh installs it): {e}"));
        let out = child.stdout.take().unwrap();
        let events: Vec<serde_json::Value> = BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .take(10_000)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect();
        let status = child.wait().unwrap();
        assert!(status.success(), "{script} failed: {events:?}");
        events
    })
    .await
    .unwrap()
}

/// What one player run must show: playing, its clock advancing by `min_advance` seconds, no
/// error of any kind, and (Shaka) a single variant of codec `codec` as `audio/mp4`.
fn assert_played(what: &str, events: &[serde_json::Value], codec: Option<&str>, min_advance: f64) {
    let shown = || {
        events
            .iter()
            .filter(|e| e["ev"] != "status")
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        events.iter().any(|e| e["ev"] == "playing"),
        "{what}: never playing:\n{}",
        shown()
    );
    let errors: Vec<_> = events
        .iter()
        .filter(|e| {
            e["ev"] == "error"
                || (e["ev"] == "http" && !e["url"].as_str().unwrap_or("").ends_with("/favicon.ico"))
                || (e["ev"] == "log"
                    && e["level"] == "error"
                    && !e["text"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("Failed to load resource"))
        })
        .collect();
    assert!(errors.is_empty(), "{what}: errors {errors:?}\n{}", shown());
    let times: Vec<f64> = events
        .iter()
        .filter(|e| e["ev"] == "status")
        .filter_map(|e| e["currentTime"].as_f64())
        .filter(|t| *t > 0.0)
        .collect();
    let advanced = times.last().unwrap_or(&0.0) - times.first().unwrap_or(&0.0);
    assert!(
        advanced >= min_advance,
        "{what}: the clock advanced {advanced} s only:\n{}",
        shown()
    );
    if let Some(codec) = codec {
        let variants: Vec<_> = events.iter().filter(|e| e["ev"] == "variant").collect();
        assert!(!variants.is_empty(), "{what}: no variant:\n{}", shown());
        for v in variants {
            assert_eq!(
                v["codec"], codec,
                "{what}: codec switch or wrong codec: {v}"
            );
            assert_eq!(v["mime"], "audio/mp4", "{what}: {v}");
        }
    }
}

/// Run `tests/browser/hls_play.mjs` (hls.js from npm) on `url`; its JSON events.
async fn hls_js(page: &str, url: &str, seconds: u32) -> Vec<serde_json::Value> {
    run_node(
        "hls_play.mjs",
        &[("AMPHI_PAGE", page), ("AMPHI_HLS_URL", url)],
        seconds,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaka_native_and_hls_js_play_without_codec_switches() {
    let room = LiveRoom::start("players").await;
    let b = &room.base;
    const LISTEN: u32 = 8;
    // Shaka Player on the media playlists alone: it learns the codec from the file names.
    for (dir, codec) in [("opus", "opus"), ("aac", "mp4a.40.2")] {
        let url = format!("{b}/{dir}/playlist.m3u8");
        let ev = play("shaka", &room.page, &url, LISTEN).await;
        assert_played(&format!("Shaka on {url}"), &ev, Some(codec), 3.0);
    }
    // Shaka on the multivariant playlists: one codec each, never switched.
    for (name, codec) in [
        ("index.m3u8", "mp4a.40.2"),
        ("index-opus.m3u8", "opus"),
        ("index-aac.m3u8", "mp4a.40.2"),
    ] {
        let url = format!("{b}/{name}");
        let ev = play("shaka", &room.page, &url, LISTEN).await;
        assert_played(&format!("Shaka on {url}"), &ev, Some(codec), 3.0);
    }
    // Chromium's native HLS player on the main and the AAC multivariant playlists.
    for name in ["index.m3u8", "index-aac.m3u8"] {
        let url = format!("{b}/{name}");
        let ev = play("native", &room.page, &url, LISTEN).await;
        assert_eq!(
            ev.iter()
                .find(|e| e["ev"] == "support")
                .map(|e| &e["native"]),
            Some(&"maybe".into()),
            "this Chromium plays HLS natively"
        );
        assert_played(
            &format!("Chromium's native player on {url}"),
            &ev,
            None,
            3.0,
        );
    }
    // hls.js on the Opus multivariant playlist (what the web client gives it).
    let url = format!("{b}/index-opus.m3u8");
    let ev = hls_js(&room.page, &url, LISTEN).await;
    let levels: Vec<_> = ev.iter().filter(|e| e["ev"] == "level").collect();
    assert!(
        !levels.is_empty() && levels.iter().all(|l| l["codec"] == "opus"),
        "hls.js levels {levels:?}"
    );
    let fatal: Vec<_> = ev
        .iter()
        .filter(|e| e["ev"] == "error" && e["fatal"] == true)
        .collect();
    assert!(fatal.is_empty(), "hls.js: {fatal:?}");
    assert!(
        ev.iter().any(|e| e["ev"] == "playing"),
        "hls.js never playing: {ev:?}"
    );
    room.stop().await;
}
