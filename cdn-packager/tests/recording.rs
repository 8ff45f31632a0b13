//! The end of a room with the quinn origin stand-in: `RoomEnded` finishes both live playlists
//! with `EXT-X-ENDLIST` and leaves a VOD recording (speaker turns as `EXT-X-DATERANGE`) that
//! ffmpeg decodes; the HTTPS listener serves it over HTTP/2; retention deletes it.

use amphi_testkit::packager as common;

use amphi_packager::playlist::{AAC, OPUS};
use amphi_packager::{PackagerOptions, RecordingConfig};
use amphi_protocol::control::ControlMessage;
use amphi_protocol::RoomId;
use amphi_testkit::conformance::{check_media, check_multivariant, Expect};
use common::{
    dominant_frequency, ffmpeg_decode, http_get, program_record_from, tone_frames, Harness,
};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const ROOM: RoomId = RoomId(0x0a0b_0c0d_0e0f_1011);
const ALICE: u32 = 0x0100_0007;
const BOB: u32 = 0x0200_0009;

/// Speak 6 s (Alice 3 s, then Bob 3 s) at 4x real time, then end the room.
async fn speak_and_end(h: &mut Harness) {
    let frames = tone_frames(440.0, 300);
    h.speak_and_end(ROOM, &frames, |i| if i < 150 { ALICE } else { BOB })
        .await;
}

/// GET over HTTPS with HTTP/2 (ALPN h2), trusting the packager's self-signed certificate.
async fn get_h2(addr: SocketAddr, cert_pem: &[u8], path: &str) -> (http::Version, u16, Vec<u8>) {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://localhost{path}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let version = resp.version();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (version, status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_end_leaves_a_vod_recording_served_over_http2() {
    let https = amphi_testkit::net::free_port().unwrap();
    let options = PackagerOptions {
        tls_listen: Some(https),
        ..Default::default()
    };
    let mut h = Harness::start_with("recording", options).await;
    let http = h.http;
    speak_and_end(&mut h).await;
    let rec = format!("/hls/{ROOM}/recording.m3u8");
    let mv = h.wait_until(&rec, |r| r.status == 200).await;
    assert_eq!(mv.header("cache-control"), Some("max-age=60"));
    assert_eq!(check_multivariant(&mv.text(), 1).unwrap(), ["aac/vod.m3u8"]);
    for r in [OPUS, AAC] {
        let codec = http_get(http, &format!("/hls/{ROOM}/recording-{}.m3u8", r.dir)).await;
        let want = format!("{}/vod.m3u8", r.dir);
        assert_eq!(check_multivariant(&codec.text(), 1).unwrap(), [want]);
    }
    for r in [OPUS, AAC] {
        let live = http_get(http, &format!("/hls/{ROOM}/{}/playlist.m3u8", r.dir)).await;
        check_media(&live.text(), &Expect::ended(r.part_target_ms()))
            .unwrap_or_else(|e| panic!("{e:?}"));
        let vod = http_get(http, &format!("/hls/{ROOM}/{}/vod.m3u8", r.dir)).await;
        let text = vod.text();
        let sum = check_media(&text, &Expect::vod()).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        assert_eq!(sum.segments.len(), 3, "6 s = 3 segments\n{text}");
        let parsed = m3u8_rs::parse_media_playlist_res(text.as_bytes()).unwrap();
        assert!(parsed.end_list);
        // Who spoke when: Alice then Bob, about 3 s each.
        assert_eq!(sum.dateranges.len(), 2, "{text}");
        assert!(
            text.contains(&format!("X-SPEAKER-ID=\"{ALICE}\"")),
            "{text}"
        );
        assert!(text.contains(&format!("X-SPEAKER-ID=\"{BOB}\"")), "{text}");
        // ffmpeg replays the recording.
        let samples = ffmpeg_decode(&format!("http://{http}/hls/{ROOM}/{}/vod.m3u8", r.dir)).await;
        assert!(samples.len() >= 5 * 48_000, "{}: {}", r.dir, samples.len());
        let (freq, rms) = dominant_frequency(&samples[48_000..144_000]);
        assert!((freq - 440.0).abs() <= 5.0, "{}: {freq} Hz", r.dir);
        assert!(rms > 2000.0, "{}: rms {rms}", r.dir);
    }
    // The same over HTTPS, negotiated as HTTP/2.
    let cert = std::fs::read(h.data_dir.join("tls/packager.crt")).expect("dev certificate");
    let plain = http_get(http, &format!("/hls/{ROOM}/opus/vod.m3u8")).await;
    let (version, status, body) = get_h2(https, &cert, &format!("/hls/{ROOM}/opus/vod.m3u8")).await;
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(status, 200);
    assert_eq!(body, plain.body);
    let (_, status, _) = get_h2(https, &cert, "/hls/../etc/passwd").await;
    assert_eq!(status, 404);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_an_expired_recording() {
    let options = PackagerOptions {
        recording: RecordingConfig {
            retention_hours: Some(0.0),
            sweep_interval_secs: Some(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut h = Harness::start_with("retention", options).await;
    speak_and_end(&mut h).await;
    let json = h.data_dir.join(format!("hls/{ROOM}/recording.json"));
    let seg = h.data_dir.join(format!("hls/{ROOM}/opus/seg0.m4a"));
    // The recording is written once the room ends, then swept (retention 0 h, every second):
    // the counter only moves for a recording.json that existed.
    let gone = h
        .wait_until("/metrics", |r| {
            r.text()
                .contains("amphi_packager_recordings_expired_total 1\n")
        })
        .await;
    assert!(gone.status == 200);
    assert!(
        !json.exists() && !seg.exists(),
        "every object of the room is deleted"
    );
    let r = http_get(h.http, &format!("/hls/{ROOM}/recording.m3u8")).await;
    assert_eq!(r.status, 404);
    h.stop().await;
}

/// Send `frames[range]` as program records (RTP from the range start) at 4x real time, with
/// `speaker` loudest.
async fn stream(
    h: &Harness,
    frames: &[Vec<u8>],
    range: std::ops::Range<usize>,
    speaker: u32,
) -> quinn::SendStream {
    let mut uni = h.conn.open_uni().await.unwrap();
    for i in range {
        uni.write_all(&program_record_from(ROOM, i as u32, &frames[i], speaker))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    uni
}

/// The base media decode time (`tfdt`, 48 kHz ticks) of a part or segment.
fn tfdt(media: &[u8]) -> u64 {
    use mp4_atom::{Any, Decode};
    let mut cur = std::io::Cursor::new(media);
    loop {
        match Any::decode(&mut cur).expect("an fMP4 box") {
            Any::Moof(moof) => {
                return moof.traf[0]
                    .tfdt
                    .as_ref()
                    .expect("tfdt")
                    .base_media_decode_time
            }
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packager_restart_mid_room_keeps_the_whole_recording() {
    let frames = tone_frames(440.0, 250);
    let live = format!("/hls/{ROOM}/opus/playlist.m3u8");
    // Before the restart: 5 s = segments 0 and 1, and 5 parts of segment 2.
    let h = Harness::start("restart").await;
    let _uni = stream(&h, &frames, 0..250, ALICE).await;
    h.wait_until(&live, |r| r.text().contains("part2.4.m4a"))
        .await;
    let data_dir = h.stop_keeping_files().await;

    // After: the same storage, a new program stream on a new timeline.
    let mut h = Harness::start_in(PackagerOptions::default(), data_dir).await;
    let mut uni = stream(&h, &frames, 0..150, BOB).await;
    let text = h
        .wait_until(&live, |r| r.text().contains("part4.0.m4a"))
        .await
        .text();
    let sum = check_media(&text, &Expect::live(OPUS.part_target_ms()).with_reports(1))
        .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    assert_eq!(
        sum.media_sequence, 0,
        "the segments from before are still listed\n{text}"
    );
    assert_eq!(sum.discontinuities, [3], "{text}");
    // Decode times start at 0 and continue after the media from before the restart (segments
    // 0 and 1 and half of 2: 5 s), though the new stream's RTP starts at 0 again.
    let at = |path: String| {
        let addr = h.http;
        async move { tfdt(&http_get(addr, &path).await.body) }
    };
    assert_eq!(at(format!("/hls/{ROOM}/opus/seg0.m4a")).await, 0);
    let resumed = at(format!("/hls/{ROOM}/opus/part3.0.m4a")).await;
    assert!(resumed >= 5 * 48_000, "tfdt {resumed} after the restart");
    uni.finish().unwrap();
    h.control_send
        .write_all(&ControlMessage::RoomEnded { room: ROOM }.to_record())
        .await
        .unwrap();
    h.wait_until(&format!("/hls/{ROOM}/recording.m3u8"), |r| r.status == 200)
        .await;
    for r in [OPUS, AAC] {
        let vod = http_get(h.http, &format!("/hls/{ROOM}/{}/vod.m3u8", r.dir)).await;
        let text = vod.text();
        let sum = check_media(&text, &Expect::vod()).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        let msns: Vec<u64> = sum.segments.iter().map(|s| s.msn).collect();
        assert_eq!(msns, [0, 1, 2, 3, 4], "{}: before and after\n{text}", r.dir);
        assert_eq!(sum.discontinuities, [3], "{}\n{text}", r.dir);
        // Alice's turn, stored before the restart, then Bob's.
        assert_eq!(
            sum.dateranges,
            ["speaker-0", "speaker-1"],
            "{}\n{text}",
            r.dir
        );
        let alice = text
            .find(&format!("X-SPEAKER-ID=\"{ALICE}\""))
            .unwrap_or_else(|| panic!("Alice's turn from before the restart\n{text}"));
        let bob = text
            .find(&format!("X-SPEAKER-ID=\"{BOB}\""))
            .unwrap_or_else(|| panic!("Bob's turn after it\n{text}"));
        assert!(alice < bob, "{text}");
        // Segment 2 was cut off by the restart: listed as a gap unless the stopping packager
        // still stored it; every other segment is media.
        assert!(
            sum.segments.iter().all(|s| !s.gap || s.msn == 2),
            "{}\n{text}",
            r.dir
        );
    }
    h.stop().await;
}

/// The packager's storage reads for HTTP answers so far (`amphi_packager_storage_reads_total`).
async fn storage_reads(h: &Harness) -> u64 {
    let text = http_get(h.http, "/metrics").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix("amphi_packager_storage_reads_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("storage reads counter")
}

/// Requests for room ids the packager never had are answered 404 from its room registry with no
/// storage read (no S3 GET amplification), while a restarted packager still serves the stored
/// recording of a room that ended before the restart (the rooms in storage are listed once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_rooms_cost_no_storage_read_and_old_recordings_stay_served() {
    let mut h = Harness::start("known-rooms").await;
    speak_and_end(&mut h).await;
    let rec = format!("/hls/{ROOM}/recording.m3u8");
    h.wait_until(&rec, |r| r.status == 200).await;
    let data_dir = h.stop_keeping_files().await;

    let h = Harness::start_in(PackagerOptions::default(), data_dir).await;
    let unknown = |i: u64| RoomId(0x7000_0000_0000_0000 + i);
    // Until storage is listed the registry cannot tell; the listing is one directory read.
    let mut settled = false;
    for i in 0..100 {
        let before = storage_reads(&h).await;
        let r = http_get(h.http, &format!("/hls/{}/index.m3u8", unknown(i))).await;
        assert_eq!(r.status, 404);
        if storage_reads(&h).await == before {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "unknown rooms kept reading storage");
    let before = storage_reads(&h).await;
    for i in 0..200 {
        let room = unknown(1000 + i);
        for path in [
            "index.m3u8",
            "recording.m3u8",
            "opus/playlist.m3u8",
            "opus/vod.m3u8",
            "aac/init.m4a",
            "opus/seg3.m4a",
            "opus/part3.1.m4a",
        ] {
            let r = http_get(h.http, &format!("/hls/{room}/{path}")).await;
            assert_eq!(r.status, 404, "{path}");
            assert_eq!(api_error_code(&r), "room_not_found", "{path}");
        }
    }
    assert_eq!(
        storage_reads(&h).await,
        before,
        "1,400 unknown-room requests"
    );
    // The recording from before the restart is read from storage and served.
    let r = http_get(h.http, &rec).await;
    assert_eq!(r.status, 200);
    assert_eq!(check_multivariant(&r.text(), 1).unwrap(), ["aac/vod.m3u8"]);
    let vod = http_get(h.http, &format!("/hls/{ROOM}/opus/vod.m3u8")).await;
    assert_eq!(vod.status, 200);
    assert_eq!(storage_reads(&h).await, before + 2);
    h.stop().await;
}

fn api_error_code(r: &common::Resp) -> String {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    v["error"].as_str().unwrap_or_default().to_string()
}
