//! A whole room through the web client in real browsers (headless Chromium, playwright-core, one
//! browser per fake-microphone tone): a us-east host speaks 440 Hz, an eu-west WebRTC listener and an
//! eu-west LL-HLS listener hear it, the WebRTC listener raises a hand, is promoted and speaks 660 Hz
//! that the host hears, is reported with the room by the LL-HLS listener (the host's page shows both),
//! is muted (the tone stops), kicked (its rejoin is refused), and the host ends the
//! room: everyone gets the ended event and the HLS playlist gets `EXT-X-ENDLIST`.
//! The browser side is `tests/browser/rooms.mjs`; screenshots land in `tests/artifacts/`.

use amphi_testkit::mesh as support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

fn tone_wav(path: &Path, freq: u32) {
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!(
            "sine=frequency={freq}:sample_rate=48000:duration=180"
        ))
        .args(["-ac", "1"])
        .arg(path)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg made no {freq} Hz tone");
}

#[test]
fn a_room_in_real_browsers_from_lobby_to_end() {
    let mesh = DevMesh::start(15_000, "rooms-browser");
    let host_wav = mesh.scratch.join("tone440.wav");
    let guest_wav = mesh.scratch.join("tone660.wav");
    tone_wav(&host_wav, 440);
    tone_wav(&guest_wav, 660);
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();

    let mut cmd = Command::new("node");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/rooms.mjs"
    ))
    .env("AMPHI_URL", mesh.router())
    .env("AMPHI_WAV_HOST", &host_wav)
    .env("AMPHI_WAV_GUEST", &guest_wav)
    .env("AMPHI_ARTIFACTS", &artifacts);
    let mut room = None;
    let mut result = None;
    let status = run_streaming(cmd, |line| {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(r) = v["room"].as_str() {
                room = Some(r.to_string());
            }
            if v["result"].is_object() {
                result = Some(v["result"].clone());
            }
        }
    });
    assert!(
        status.success(),
        "browser script failed; mesh log:\n{}",
        mesh.log_text()
    );
    let room = room.expect("the host's page reported its room");
    let result = result.expect("the script reported its result");
    eprintln!("rooms e2e result: {result}");

    // Functional, not a benchmark: the page sampled its analyser every 50 ms and saw the muted
    // speaker's tone gone by 500 ms after the `muted` event arrived (rooms.mjs asserts that window).
    let stopped = result["mute_to_silence_ms"].as_i64().expect("mute delay");
    assert!(stopped <= 500, "660 Hz stopped {stopped} ms after the mute");
    let codes = result["rejoin_error"].as_array().expect("rejoin errors");
    assert!(
        codes.iter().any(|c| c == "banned"),
        "rejoin refused with {codes:?}"
    );

    // The host's page got both reports made from the listener's page, each pointing into the
    // program (the room's recording); the router lists them.
    assert_eq!(
        result["reports"],
        serde_json::json!([["spam", "room", true], ["harassment", "user", true]]),
        "reports the host saw"
    );
    let listed: serde_json::Value =
        ureq::get(&format!("{}/v1/rooms/{room}/reports", mesh.router()))
            .call()
            .expect("reports listing")
            .into_json()
            .unwrap();
    assert_eq!(
        listed["reports"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );

    // The room ended everywhere: the directory says so and the HLS playlist is closed.
    let info: serde_json::Value = ureq::get(&format!("{}/v1/rooms/{room}", mesh.router()))
        .call()
        .expect("room info")
        .into_json()
        .unwrap();
    assert_eq!(info["status"], "ended", "room info after the end: {info}");
    let media = media_playlist_url(&format!("{}/hls/{room}/index.m3u8", mesh.router()));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = String::from_utf8(get_bytes(&media)).unwrap();
        if text.contains("#EXT-X-ENDLIST") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no EXT-X-ENDLIST 15 s after the end:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for shot in [
        "rooms-lobby.png",
        "rooms-host-before-speaking.png",
        "rooms-host-speaking.png",
        "rooms-host.png",
        "rooms-speaker.png",
        "rooms-hls-listener.png",
        "rooms-host-reports.png",
        "rooms-banned.png",
        "rooms-ended.png",
    ] {
        assert!(artifacts.join(shot).exists(), "screenshot {shot} missing");
    }
}

/// `amphi dev --port-offset 2000` would serve the web client on 10080, which Chromium refuses
/// (`ERR_UNSAFE_PORT`): the dev mesh refuses to start and says why, before binding anything.
#[test]
fn dev_refuses_port_offsets_that_browsers_block() {
    let scratch = scratch_dir("unsafe-port");
    let out = Command::new(env!("CARGO_BIN_EXE_amphi"))
        .args(["dev", "--port-offset", "2000", "--data-dir"])
        .arg(&scratch)
        .output()
        .expect("run amphi dev");
    assert!(!out.status.success(), "amphi dev started on port 10080");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("10080") && err.contains("ERR_UNSAFE_PORT") && err.contains("web client"),
        "{err}"
    );
}
