//! Clients nobody here wrote, end to end: GStreamer's `webrtcbin` publishing over WHIP with its
//! RSA DTLS certificate (tests/gst/whip_publish.py), heard in LL-HLS by ffmpeg (`amphi dev`); the
//! legacy GStreamer `playbin` (hlsdemux) playing a live room's media playlist
//! (tests/gst/playbin_count.py, role processes).

mod roles;
use amphi_testkit::mesh as support;

use roles::*;
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

/// Legacy `playbin` (decodebin2 + the legacy `hlsdemux`) places the first segment it fetches at
/// that segment's position in the live playlist and qtdemux stamps the audio with the fMP4
/// decode time, so a syncing audio sink waits out the difference. The packager here starts 25 s
/// into the room's program (the origin's program clock is then at 25 s): the room's media must
/// still start at decode time 0, or playbin renders nothing for 25 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_gstreamer_playbin_hears_a_room_whose_packager_joined_late() {
    let mesh = RoleMesh::new("gst-playbin", 29_100);
    let _origin = mesh.origin(None);
    let _router = mesh.router_process(None, "");
    let _us = mesh.edge_process(0, "us-east", "");
    let (router, edge) = (mesh.router(), mesh.edge(0));
    mesh.wait_up(&[0], false, false).await;
    let CreatedRoom { room, .. } = create_room(&router, "legacy playbin");
    let speaker = mint_token(&router, &room, "speaker", "tone");
    let whip = format!("{edge}/whip/{room}");
    let publisher = tokio::spawn(async move { publish_tone(&whip, &speaker, 440.0, 60.0).await });
    tokio::time::sleep(Duration::from_secs(25)).await;
    let _packager = mesh.packager();
    let playlist = format!("{}/hls/{room}/opus/playlist.m3u8", mesh.packager_url());
    let out = tokio::task::spawn_blocking(move || {
        wait_for_segments(&playlist, 3, Duration::from_secs(30));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gst/playbin_count.py");
        Command::new(gst_python())
            .args([script, &playlist, "--buffers", "100", "--timeout", "15"])
            .output()
            .expect("run tests/gst/playbin_count.py (python3-gst-1.0)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let done: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "done")
        .unwrap_or_else(|| {
            panic!(
                "no result:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(
        done["demuxers"][0], "hlsdemux",
        "the legacy demuxer: {done}"
    );
    assert!(
        out.status.success() && done["buffers"].as_u64() >= Some(100),
        "legacy playbin rendered no audio: {stdout}"
    );
    assert!(
        done["first_pts"].as_f64().is_some_and(|pts| pts < 20.0),
        "the room's media starts near 0: {done}"
    );
    publisher.abort();
}
