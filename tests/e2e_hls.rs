//! LL-HLS that real players trust, end to end through `amphi dev`: a str0m WHIP client speaks a
//! tone; hls.js (npm) plays the live Opus rendition in headless Chromium; ffmpeg decodes both
//! renditions live and the VOD recording; every playlist fetched passes the packager's
//! conformance checker and m3u8-rs, every part and init segment the `mp4` crate; S3 mode runs
//! against a real s3s-fs that is stopped for 20 s mid-room; bad requests do not disturb a room.

use amphi_testkit::mesh as support;

use amphi_packager::playlist::{Rendition, AAC, OPUS};
use amphi_testkit::conformance::{check_media, check_multivariant, Expect, MediaSummary};
use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

const RENDITIONS: [Rendition; 2] = [OPUS, AAC];

/// GET returning (status, body) for any status.
fn get_any(url: &str) -> (u16, Vec<u8>) {
    let resp = match ureq::get(url).timeout(Duration::from_secs(15)).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let status = resp.status();
    let mut body = Vec::new();
    resp.into_reader().read_to_end(&mut body).unwrap();
    (status, body)
}

/// GET with the request target sent byte for byte (no client-side `..` normalisation);
/// returns (status, body).
fn get_raw(host_port: &str, target: &str) -> (u16, Vec<u8>) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(host_port).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut b = &body[..];
        for _ in 0..10_000 {
            let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let n =
                usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
            b = &b[eol + 4 + n..];
        }
        body = out;
    }
    (status, body)
}

fn text(url: &str) -> String {
    String::from_utf8(get_bytes(url)).unwrap()
}

/// Check a media playlist with the conformance module and m3u8-rs.
fn conform(text: &str, expect: &Expect) -> MediaSummary {
    let sum = check_media(text, expect)
        .unwrap_or_else(|errs| panic!("playlist does not conform: {errs:#?}\n{text}"));
    m3u8_rs::parse_media_playlist_res(text.as_bytes())
        .unwrap_or_else(|e| panic!("m3u8-rs cannot parse: {e:?}\n{text}"));
    sum
}

/// Parse init + one fragment with the `mp4` crate; returns its sample count.
fn mp4_samples(init: &[u8], fragment: &[u8]) -> u32 {
    let mut file = init.to_vec();
    file.extend_from_slice(fragment);
    let size = file.len() as u64;
    let r = mp4::Mp4Reader::read_header(std::io::Cursor::new(file), size)
        .expect("mp4 crate parses init + fragment");
    let id = *r.tracks().keys().next().expect("one track");
    r.sample_count(id).unwrap()
}

/// Follow the live edge of a rendition like an LL-HLS player for `rounds` blocking reloads,
/// checking every playlist and every part/segment it names. Returns the last summary.
fn follow_live(base: &str, r: Rendition, rounds: usize) -> MediaSummary {
    let url = format!("{base}/{}/playlist.m3u8", r.dir);
    let expect = Expect::live(r.part_target_ms()).with_reports(1);
    let mut sum = conform(&text(&url), &expect);
    let init = get_bytes(&format!("{base}/{}/init.m4a", r.dir));
    let mut checked = std::collections::HashSet::new();
    for _ in 0..rounds {
        let hint = sum
            .preload_hint
            .clone()
            .expect("live playlist has a preload hint");
        let (msn, part) = hint
            .strip_prefix("part")
            .and_then(|h| h.strip_suffix(".m4a"))
            .and_then(|h| h.split_once('.'))
            .map(|(m, p)| (m.parse::<u64>().unwrap(), p.parse::<u32>().unwrap()))
            .expect("hint names a part");
        // The hinted part is held until it exists.
        let (st, part_bytes) = get_any(&format!("{base}/{}/{hint}", r.dir));
        assert_eq!(st, 200, "hinted part {hint}");
        assert!(mp4_samples(&init, &part_bytes) >= 1);
        let reload = format!("{url}?_HLS_msn={msn}&_HLS_part={part}");
        let (st, body) = get_any(&reload);
        assert_eq!(st, 200, "{reload}: {}", String::from_utf8_lossy(&body));
        sum = conform(&String::from_utf8(body).unwrap(), &expect);
        for (_, _, uri) in &sum.parts {
            if checked.insert(uri.clone()) {
                let b = get_bytes(&format!("{base}/{}/{uri}", r.dir));
                assert!(mp4_samples(&init, &b) >= 1, "{uri}");
            }
        }
        for s in &sum.segments {
            if checked.insert(s.uri.clone()) {
                let b = get_bytes(&format!("{base}/{}/{}", r.dir, s.uri));
                let n = mp4_samples(&init, &b);
                assert!(n >= 40, "{} has {n} samples", s.uri);
            }
        }
    }
    // A delta update conforms too.
    let (st, body) = get_any(&format!("{url}?_HLS_skip=YES"));
    assert_eq!(st, 200);
    conform(&String::from_utf8(body).unwrap(), &expect);
    sum
}

/// Run the hls.js player page; returns its JSON events.
fn hls_js(page: &str, url: &str, seconds: u32) -> Vec<serde_json::Value> {
    let mut cmd = Command::new("node");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/hls_play.mjs"
    ))
    .env("AMPHI_PAGE", page)
    .env("AMPHI_HLS_URL", url)
    .env("AMPHI_SECONDS", seconds.to_string());
    let mut events = Vec::new();
    let status = run_streaming(cmd, |line| {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            events.push(v);
        }
    });
    assert!(status.success(), "hls.js player failed: {events:?}");
    events
}

/// hls.js reached `playing`, time advanced and the analyser heard `freq`.
fn assert_hls_js_heard(events: &[serde_json::Value], freq: f64, min_time: f64) {
    assert!(
        events.iter().any(|e| e["ev"] == "playing"),
        "never playing: {events:?}"
    );
    let fatal: Vec<_> = events
        .iter()
        .filter(|e| e["ev"] == "error" && e["fatal"] == true)
        .collect();
    assert!(fatal.is_empty(), "fatal hls.js errors: {fatal:?}");
    let done = events.iter().find(|e| e["ev"] == "done").expect("done");
    let t = done["currentTime"].as_f64().unwrap();
    assert!(t >= min_time, "currentTime only reached {t}: {events:?}");
    let heard = events.iter().filter(|e| e["ev"] == "status").any(|e| {
        let hz = e["peakHz"].as_f64().unwrap_or(0.0);
        let db = e["peakDb"].as_f64().unwrap_or(-200.0);
        (hz - freq).abs() <= 12.0 && db > -50.0
    });
    assert!(heard, "the analyser never heard {freq} Hz: {events:?}");
}

fn speaker(mesh: &DevMesh, room: &str) -> (String, String) {
    let token = mesh.token(room, "speaker", "tone");
    let route = mesh.route(room, "us-east");
    (route["whip_url"].as_str().unwrap().to_string(), token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_js_plays_live_opus_and_ffmpeg_decodes_both_renditions() {
    let mesh = DevMesh::start(17_000, "hls-live");
    let (room, _host, hls_url) = mesh.create_room("hls live");
    let (whip, token) = speaker(&mesh, &room);
    let publisher = tokio::spawn(async move { publish_tone(&whip, &token, 660.0, 16.0).await });

    let packager = format!("{}/hls/{room}", mesh.packager());
    let page = format!("{}/healthz", mesh.router());
    let (mv, events, sums) = tokio::task::spawn_blocking(move || {
        wait_status(&hls_url, 200, Duration::from_secs(20));
        // One codec per multivariant playlist: the main one AAC-LC, then one per rendition.
        let mv = text(&hls_url);
        let uris = check_multivariant(&mv, 1).unwrap_or_else(|e| panic!("{e:?}\n{mv}"));
        assert_eq!(uris, ["aac/playlist.m3u8"]);
        let opus_url = hls_url.replace("/index.m3u8", "/index-opus.m3u8");
        let opus_mv = text(&opus_url);
        assert_eq!(
            check_multivariant(&opus_mv, 1).unwrap(),
            ["opus/playlist.m3u8"]
        );
        // A listener through the geo-router (same origin as the page), on the Opus playlist
        // as the web client gives it to hls.js.
        let player = std::thread::spawn(move || hls_js(&page, &opus_url, 9));
        // Meanwhile a protocol-following client on both renditions, straight at the packager.
        let sums: Vec<_> = RENDITIONS
            .iter()
            .map(|r| follow_live(&packager, *r, 12))
            .collect();
        for r in RENDITIONS {
            ffmpeg_hears(&format!("{packager}/{}/playlist.m3u8", r.dir), 660.0, "3");
        }
        (mv, player.join().unwrap(), sums)
    })
    .await
    .unwrap();
    assert!(mv.contains("CODECS=\"mp4a.40.2\"") && !mv.contains("CODECS=\"opus\""));
    for s in &sums {
        assert_eq!(s.reports.len(), 1, "a rendition report for the sibling");
        assert!(s.reports[0].1.is_some());
    }
    let levels: Vec<_> = events.iter().filter(|e| e["ev"] == "level").collect();
    assert!(!levels.is_empty(), "no level: {events:?}");
    assert!(
        levels.iter().all(|l| l["codec"] == "opus"),
        "hls.js plays the Opus rendition: {levels:?}"
    );
    assert_hls_js_heard(&events, 660.0, 3.0);
    publisher.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_do_not_disturb_a_live_room_and_the_end_leaves_a_vod_recording() {
    let mesh = DevMesh::start(18_000, "hls-vod");
    let (room, host, hls_url) = mesh.create_room("hls vod");
    let (whip, token) = speaker(&mesh, &room);
    let publisher = tokio::spawn(async move { publish_tone(&whip, &token, 550.0, 9.0).await });
    let packager = mesh.packager();
    let base = format!("{packager}/hls/{room}");
    let router = mesh.router();
    let room2 = room.clone();
    tokio::task::spawn_blocking(move || {
        let room = room2;
        wait_status(&hls_url, 200, Duration::from_secs(20));
        let playlist = format!("{base}/opus/playlist.m3u8");
        conform(
            &text(&playlist),
            &Expect::live(OPUS.part_target_ms()).with_reports(1),
        );
        let absurd = format!("{playlist}?{}", "_HLS_msn=1&".repeat(500));
        let cases: Vec<(String, u16)> = vec![
            (format!("{playlist}?_HLS_msn=900"), 400),
            (format!("{playlist}?_HLS_part=1"), 400),
            (format!("{playlist}?_HLS_msn=99999999999999999999999"), 400),
            (format!("{playlist}?_HLS_msn=1&_HLS_part=abc"), 400),
            (format!("{playlist}?_HLS_skip=maybe"), 400),
            (absurd, 400),
            (
                format!("{packager}/hls/ffffffffffffffff/opus/playlist.m3u8"),
                404,
            ),
            (format!("{packager}/hls/ffffffffffffffff/index.m3u8"), 404),
            (format!("{packager}/hls/{room}/opus/seg999999.m4a"), 404),
            (format!("{packager}/hls/{room}/opus/seg0.m4v"), 404),
            (
                format!("{router}/hls/{room}/opus/playlist.m3u8?_HLS_msn=900"),
                400,
            ),
        ];
        // Path traversal, sent raw.
        let hostport = packager.trim_start_matches("http://").to_string();
        for target in [
            format!("/hls/{room}/opus/../../../etc/passwd"),
            format!("/hls/{room}/opus/%2e%2e/index.m3u8"),
            format!("/hls/{room}/opus/..%2f..%2fopus/init.m4a"),
            format!("/hls/../{room}/index.m3u8"),
            "/hls/%2e%2e/%2e%2e/etc/passwd".to_string(),
        ] {
            let (st, body) = get_raw(&hostport, &target);
            assert_eq!(st, 404, "{target}: {}", String::from_utf8_lossy(&body));
            let _: amphi_protocol::api::ApiError = serde_json::from_slice(&body).unwrap();
        }
        for (url, want) in &cases {
            let (st, body) = get_any(url);
            assert_eq!(st, *want, "{url}: {}", String::from_utf8_lossy(&body));
            let err: amphi_protocol::api::ApiError = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{url}: not an ApiError ({e})"));
            assert!(!err.error.is_empty());
        }
        // The room is undisturbed: the live edge keeps moving and conforms.
        let sum = follow_live(&base, OPUS, 6);
        assert!(!sum.parts.is_empty());
    })
    .await
    .unwrap();
    publisher.await.unwrap();

    // The host ends the room through the geo-router; RoomEnded reaches the packager.
    let ended = ureq::post(&format!("{}/v1/rooms/{room}/end", mesh.router()))
        .set("Authorization", &format!("Bearer {host}"))
        .call();
    assert!(ended.is_ok(), "end room: {ended:?}");
    let recording_api = format!("{}/v1/rooms/{room}/recording", mesh.router());
    let page = format!("{}/healthz", mesh.router());
    let base = format!("{}/hls/{room}", mesh.packager());
    tokio::task::spawn_blocking(move || {
        wait_status(&recording_api, 200, Duration::from_secs(20));
        let v: serde_json::Value = ureq::get(&recording_api)
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        let url = v["url"].as_str().expect("recording url").to_string();
        assert!(
            url.ends_with(&format!("/hls/{room}/recording.m3u8")),
            "{url}"
        );
        let mv = text(&url);
        assert_eq!(check_multivariant(&mv, 1).unwrap(), ["aac/vod.m3u8"]);
        for r in RENDITIONS {
            let codec_mv =
                text(&url.replace("/recording.m3u8", &format!("/recording-{}.m3u8", r.dir)));
            let want = format!("{}/vod.m3u8", r.dir);
            assert_eq!(check_multivariant(&codec_mv, 1).unwrap(), [want]);
        }
        for r in RENDITIONS {
            let live = text(&format!("{base}/{}/playlist.m3u8", r.dir));
            conform(&live, &Expect::ended(r.part_target_ms()));
            let vod_url = format!("{base}/{}/vod.m3u8", r.dir);
            let vod = text(&vod_url);
            let sum = conform(&vod, &Expect::vod());
            assert!(sum.segments.len() >= 4, "{vod}");
            assert!(
                vod.contains("#EXT-X-DATERANGE:") && vod.contains("CLASS=\"com.amphi.speaker\""),
                "who spoke when: {vod}"
            );
            ffmpeg_hears(&vod_url, 550.0, "6");
        }
        let events = hls_js(&page, &url, 5);
        assert_hls_js_heard(&events, 550.0, 2.0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_storage_rides_out_a_20_second_outage_without_losing_anything() {
    let scratch = scratch_dir("hls-s3-store");
    let mut s3 = S3sFs::start(scratch.join("s3"), 19_950);
    std::env::set_var("AMPHI_DEV_S3_ACCESS_KEY", S3_KEY);
    std::env::set_var("AMPHI_DEV_S3_SECRET_KEY", S3_SECRET);
    let mesh = DevMesh::start_with(
        19_000,
        "hls-s3",
        &["--s3-endpoint", &s3.url(), "--s3-bucket", "amphi-test"],
    );
    let (room, _host, hls_url) = mesh.create_room("hls s3");
    let (whip, token) = speaker(&mesh, &room);
    let publisher = tokio::spawn(async move { publish_tone(&whip, &token, 440.0, 40.0).await });
    let base = format!("{}/hls/{room}", mesh.packager());
    let packager = mesh.packager();

    let s3 = tokio::task::spawn_blocking(move || {
        wait_status(&hls_url, 200, Duration::from_secs(20));
        follow_live(&base, OPUS, 10);
        // Outage: s3s-fs is gone for 20 s. The live playlists keep moving and the packager
        // serves every part and segment they name that is not stored yet.
        s3.stop();
        let outage = Instant::now();
        let mut polls = 0;
        let first = text(&format!("{base}/{}/playlist.m3u8", OPUS.dir));
        let first_edge = conform(&first, &Expect::live(OPUS.part_target_ms()).with_reports(1))
            .parts
            .last()
            .cloned();
        while outage.elapsed() < Duration::from_secs(20) && polls < 400 {
            polls += 1;
            for r in RENDITIONS {
                let text = text(&format!("{base}/{}/playlist.m3u8", r.dir));
                let sum = conform(&text, &Expect::live(r.part_target_ms()).with_reports(1));
                let uris = sum
                    .parts
                    .iter()
                    .map(|(_, _, u)| u)
                    .chain(sum.segments.iter().map(|s| &s.uri));
                for uri in uris.rev().take(3) {
                    let (status, body) = get_any(&format!("{base}/{}/{uri}", r.dir));
                    assert_eq!(status, 200, "{uri} listed, not served during the outage");
                    assert!(!body.is_empty());
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let last = text(&format!("{base}/{}/playlist.m3u8", OPUS.dir));
        let last_edge = conform(&last, &Expect::live(OPUS.part_target_ms()).with_reports(1))
            .parts
            .last()
            .cloned();
        assert_ne!(
            first_edge, last_edge,
            "the live edge stood still during the outage"
        );
        assert!(metric(&packager, "amphi_packager_storage_outage").unwrap() >= 1.0);
        assert!(metric(&packager, "amphi_packager_storage_buffered_bytes").unwrap() > 0.0);
        s3.spawn();
        s3
    })
    .await
    .unwrap();
    publisher.await.unwrap();

    let base = format!("{}/hls/{room}", mesh.packager());
    let packager = mesh.packager();
    let log = mesh.log_text();
    tokio::task::spawn_blocking(move || {
        // The buffer drains.
        let deadline = Instant::now() + Duration::from_secs(60);
        while metric(&packager, "amphi_packager_storage_buffered_bytes").unwrap_or(1.0) > 0.0 {
            assert!(Instant::now() < deadline, "upload buffer never drained");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            metric(&packager, "amphi_packager_storage_outage"),
            Some(0.0)
        );
        assert!(metric(&packager, "amphi_packager_storage_errors_total").unwrap() >= 1.0);
        assert_eq!(
            metric(&packager, "amphi_packager_storage_spilled_bytes"),
            Some(0.0)
        );
        assert!(log.contains("storage put failed; buffering uploads"));
        for r in RENDITIONS {
            let text = text(&format!("{base}/{}/playlist.m3u8", r.dir));
            let sum = conform(&text, &Expect::any(r.part_target_ms()).with_reports(1));
            let init = s3
                .object("amphi-test", &format!("hls/{room}/{}/init.m4a", r.dir))
                .expect("init in the bucket");
            // Every segment since the start is in the bucket (nothing lost in the outage),
            // and the whole program decodes.
            let last = sum.segments.last().expect("segments").msn;
            let mut file = init.clone();
            for msn in 0..=last {
                let seg = s3
                    .object("amphi-test", &format!("hls/{room}/{}/seg{msn}.m4a", r.dir))
                    .unwrap_or_else(|| panic!("{} seg{msn} missing from the bucket", r.dir));
                assert!(mp4_samples(&init, &seg) >= 1);
                file.extend_from_slice(&seg);
            }
            for (msn, i, uri) in &sum.parts {
                let part = s3
                    .object("amphi-test", &format!("hls/{room}/{}/{uri}", r.dir))
                    .unwrap_or_else(|| panic!("{} part {msn}.{i} missing", r.dir));
                assert!(mp4_samples(&init, &part) >= 1);
            }
            let path = s3.root.join(format!("{}-all.mp4", r.dir));
            std::fs::write(&path, &file).unwrap();
            let samples = ffmpeg_decode(path.to_str().unwrap());
            let secs = samples.len() as f64 / 48_000.0;
            assert!(
                secs >= 2.0 * (last + 1) as f64 - 2.5,
                "{}: {secs} s decoded",
                r.dir
            );
            let (f, _) = dominant_frequency(&samples);
            assert!((f - 440.0).abs() <= 5.0, "{}: {f} Hz", r.dir);
        }
    })
    .await
    .unwrap();
}
