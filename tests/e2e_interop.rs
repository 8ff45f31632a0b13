//! Clients nobody here wrote, end to end through `amphi dev`: GStreamer's `webrtcbin` publishing
//! over WHIP with its RSA DTLS certificate (tests/gst/whip_publish.py), heard in LL-HLS by ffmpeg.

mod support;

use std::process::Command;
use std::time::Duration;
use support::*;

/// The Python that has GStreamer's introspection bindings (Debian's `python3-gst-1.0`), not a
/// pyenv/venv one: `AMPHI_GST_PYTHON` or /usr/bin/python3.
fn gst_python() -> String {
    std::env::var("AMPHI_GST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
}

#[test]
fn gstreamer_webrtcbin_publishes_over_whip_with_an_rsa_certificate_and_is_heard_in_hls() {
    let mesh = DevMesh::start(19_000, "gst-whip");
    let (room, _host, hls_url) = mesh.create_room("gstreamer");
    let token = mesh.token(&room, "speaker", "gst");
    let route = mesh.route(&room, "us-east");
    let whip = route["whip_url"].as_str().unwrap().to_string();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gst/whip_publish.py");
    let publisher = std::thread::spawn(move || {
        Command::new(gst_python())
            .args([script, &whip, &token, "--loopback", "--seconds", "12"])
            .args(["--freq", "660", "--timeout", "20"])
            .output()
            .expect("run tests/gst/whip_publish.py (python3-gst-1.0)")
    });

    wait_status(&hls_url, 200, Duration::from_secs(25));
    let packager = format!("{}/hls/{room}", mesh.packager());
    for dir in ["opus", "aac"] {
        wait_for_segments(
            &format!("{packager}/{dir}/playlist.m3u8"),
            2,
            Duration::from_secs(25),
        );
        ffmpeg_hears(&format!("{packager}/{dir}/playlist.m3u8"), 660.0, "3");
    }

    let out = publisher.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "GStreamer publisher failed:\n{stdout}\n{}\nmesh log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        mesh.log_text()
    );
    assert!(stdout.contains(r#""state": "connected""#), "{stdout}");
    let log = mesh.log_text();
    assert!(!log.contains("DTLS handshake failed"), "{log}");
}
