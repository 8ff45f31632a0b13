//! A real browser publishes: headless Chromium (playwright-core) opens the web client, creates a
//! room and, as its host, speaks a fake-microphone tone on its WebSocket-signaled PeerConnection;
//! the LL-HLS output carries that tone. (The test's name predates the WebSocket flow: the web client
//! published over WHIP until the rooms signaling landed.)

use amphi_testkit::mesh as support;

use std::process::Command;
use std::time::Duration;
use support::*;

/// Write a mono 48 kHz WAV at `out` from ffmpeg inputs (and filters) `args`.
fn make_wav(args: &[&str], out: &std::path::Path) {
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .args(["-ac", "1"])
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
}

/// The browser script that creates a room on `mesh` and speaks `wav` for `seconds` as its host.
fn publisher(
    mesh: &DevMesh,
    wav: &std::path::Path,
    seconds: &str,
    artifacts: &std::path::Path,
) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/publish.mjs"
    ))
    .env("AMPHI_URL", mesh.router())
    .env("AMPHI_WAV", wav)
    .env("AMPHI_SECONDS", seconds)
    .env("AMPHI_ARTIFACTS", artifacts);
    cmd
}

#[test]
fn chromium_publishes_a_tone_through_whip_into_hls() {
    let mesh = DevMesh::start(14_000, "browser");
    let wav = mesh.scratch.join("tone523.wav");
    make_wav(
        &[
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=523:sample_rate=48000:duration=10",
        ],
        &wav,
    );
    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();

    let cmd = publisher(&mesh, &wav, "7", &artifacts);
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

/// The edge asks publishers for Opus DTX and the web client applies it: a real Chromium that
/// speaks one second and then is silent sends a packet every ~400 ms in the silence, instead of
/// 50 per second (counted from the page's own RTP statistics).
#[test]
fn chromium_pauses_in_silence_with_opus_dtx() {
    let mesh = DevMesh::start(24_000, "browser-dtx");
    let wav = mesh.scratch.join("beep-then-silence.wav");
    make_wav(
        &[
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=48000:duration=1",
            "-f",
            "lavfi",
            "-i",
            "anullsrc=sample_rate=48000:channel_layout=mono:duration=14",
            "-filter_complex",
            "[0][1]concat=n=2:v=0:a=1",
        ],
        &wav,
    );
    let artifacts = mesh.scratch.join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let mut cmd = publisher(&mesh, &wav, "10", &artifacts);
    cmd.env("AMPHI_SENT_STATS", "1");
    let mut sent: Vec<u64> = Vec::new();
    let status = run_streaming(cmd, |line| {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(a) = v["sent"].as_array() {
                sent = a.iter().filter_map(|n| n.as_u64()).collect();
            }
        }
    });
    assert!(
        status.success(),
        "browser script failed; mesh log:\n{}",
        mesh.log_text()
    );
    assert!(sent.len() >= 12, "packet counts: {sent:?}");
    // The fewest packets sent in any 3 s (six samples apart): 150 without DTX.
    let quietest = sent.windows(7).map(|w| w[6] - w[0]).min().unwrap();
    println!("audio packets sent every 500 ms: {sent:?}; fewest in 3 s: {quietest}");
    assert!(
        quietest < 40,
        "Chromium kept sending in silence ({quietest} packets in 3 s): {sent:?}"
    );
}
