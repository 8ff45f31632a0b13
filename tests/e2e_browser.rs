//! A real browser publishes: headless Chromium (playwright-core) opens the web client, creates a
//! room and, as its host, speaks a fake-microphone tone on its WebSocket-signaled PeerConnection;
//! the LL-HLS output carries that tone. (The test's name predates the WebSocket flow: the web client
//! published over WHIP until the rooms signaling landed.)

use amphi_testkit::mesh as support;

use std::process::Command;
use std::time::Duration;
use support::*;

#[test]
fn chromium_publishes_a_tone_through_whip_into_hls() {
    let mesh = DevMesh::start(14_000, "browser");
    let wav = mesh.scratch.join("tone523.wav");
    let status = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=523:sample_rate=48000:duration=10",
            "-ac",
            "1",
        ])
        .arg(&wav)
        .status()
        .unwrap();
    assert!(status.success());
    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();

    let mut cmd = Command::new("node");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/publish.mjs"
    ))
    .env("AMPHI_URL", mesh.router())
    .env("AMPHI_WAV", &wav)
    .env("AMPHI_SECONDS", "7")
    .env("AMPHI_ARTIFACTS", &artifacts);
    let mut room = None;
    let status = run_streaming(cmd, |line| {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            room = v["room"].as_str().map(str::to_string);
        }
    });
    assert!(
        status.success(),
        "browser script failed; mesh log:\n{}",
        mesh.log_text()
    );
    let room = room.expect("the page reported its room");

    let hls_url = format!("{}/hls/{room}/index.m3u8", mesh.router());
    let media_url = media_playlist_url(&hls_url);
    let text = wait_for_segments(&media_url, 3, Duration::from_secs(20));
    let (file, _, _) = download_media(&media_url, &text, &mesh.scratch);
    let samples = ffmpeg_decode(file.to_str().unwrap());
    let (freq, level) = dominant_frequency(&samples);
    assert!((freq - 523.0).abs() <= 5.0, "dominant frequency {freq} Hz");
    assert!(level > 0.01, "real energy expected, rms {level}");
    assert!(artifacts.join("lobby.png").exists() && artifacts.join("room.png").exists());
}
