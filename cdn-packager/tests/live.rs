//! End to end: a quinn origin stand-in feeds `run(...)` program streams; the LL-HLS output is
//! fetched over HTTP (blocking reloads included), parsed with m3u8-rs and decoded by ffmpeg.

use amphi_testkit::packager as common;

use amphi_packager::playlist::{AAC, OPUS};
use amphi_protocol::api::ApiError;
use amphi_protocol::control::ControlMessage;
use amphi_protocol::RoomId;
use amphi_testkit::conformance::{check_media, Expect};
use common::{
    dominant_frequency, ffmpeg_stdout, http_get, program_record, s16le, tone_frames, Harness,
};
use std::time::{Duration, Instant};

const ROOM: RoomId = RoomId(0x1234_5678_9abc_def0);

async fn send_frames(uni: &mut quinn::SendStream, frames: &[Vec<u8>], first: u32, pace: Duration) {
    for (i, f) in frames.iter().enumerate() {
        uni.write_all(&program_record(ROOM, first + i as u32, f))
            .await
            .unwrap();
        tokio::time::sleep(pace).await;
    }
}

/// A last program stream on `conn` (RTP from 0), finished, then the room's end on `control`.
async fn last_stream_then_end(
    conn: &quinn::Connection,
    control: &mut quinn::SendStream,
    frames: &[Vec<u8>],
) {
    let mut uni = conn.open_uni().await.unwrap();
    send_frames(&mut uni, frames, 0, Duration::from_millis(5)).await;
    uni.finish().unwrap();
    control
        .write_all(&ControlMessage::RoomEnded { room: ROOM }.to_record())
        .await
        .unwrap();
}

/// The ended media playlist at `path` (waits for `#EXT-X-ENDLIST`), checked and parsed.
async fn ended_playlist(h: &Harness, path: &str) -> (String, m3u8_rs::MediaPlaylist) {
    let text = h
        .wait_until(path, |r| r.text().contains("#EXT-X-ENDLIST"))
        .await
        .text();
    conform(&text, Expect::ended(OPUS.part_target_ms()));
    let pl = m3u8_rs::parse_media_playlist_res(text.as_bytes()).unwrap();
    (text, pl)
}

/// Every playlist fetched passes the conformance checker.
fn conform(text: &str, expect: Expect) {
    if let Err(errs) = check_media(text, &expect) {
        panic!("playlist does not conform: {errs:#?}\n{text}");
    }
}

fn api_error(r: &common::Resp) -> ApiError {
    assert_eq!(r.header("content-type"), Some("application/json"));
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not an ApiError: {e}: {}", r.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_room_blocking_reload_discontinuity_and_end() {
    let mut h = Harness::start("live").await;
    let http = h.http;
    let room = ROOM.to_string();
    let playlist = format!("/hls/{room}/opus/playlist.m3u8");
    let frames = tone_frames(440.0, 175);

    // Stream A: 150 frames (3 s) at 4x real time.
    let mut uni = h.conn.open_uni().await.unwrap();
    send_frames(&mut uni, &frames[..3], 0, Duration::from_millis(5)).await;
    // The room is open, without a part yet.
    h.wait_until(&playlist, |r| r.text().contains("room_not_started"))
        .await;
    let blocked = tokio::spawn(async move {
        let t = Instant::now();
        let r = http_get(
            http,
            &format!("/hls/{}/opus/playlist.m3u8?_HLS_msn=0&_HLS_part=5", ROOM),
        )
        .await;
        (r, t.elapsed())
    });
    let hinted =
        tokio::spawn(
            async move { http_get(http, &format!("/hls/{}/opus/part0.0.m4a", ROOM)).await },
        );
    send_frames(&mut uni, &frames[3..120], 3, Duration::from_millis(5)).await;

    let (r, waited) = blocked.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        waited > Duration::from_millis(150),
        "the request was held ({waited:?})"
    );
    assert!(r.text().contains("part0.5.m4a"));
    conform(
        &r.text(),
        Expect::live(OPUS.part_target_ms()).with_reports(1),
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/vnd.apple.mpegurl")
    );
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let part = hinted.await.unwrap();
    assert_eq!(
        part.status, 200,
        "the preload-hinted part is held, then served"
    );
    assert_eq!(&part.body[4..8], b"styp");

    // While live: bad requests.
    let r = http_get(http, &format!("{playlist}?_HLS_msn=50")).await;
    assert_eq!(r.status, 400);
    assert_eq!(api_error(&r).error, "bad_request");
    let r = http_get(http, &format!("{playlist}?_HLS_part=1")).await;
    assert_eq!(r.status, 400);
    assert_eq!(api_error(&r).error, "bad_request");
    let r = http_get(http, &format!("{playlist}?_HLS_msn=abc")).await;
    assert_eq!(r.status, 400);
    for bad in [
        "/hls/../../etc/passwd".to_string(),
        format!("/hls/{room}/opus/%2e%2e/%2e%2e/init.m4a"),
        format!("/hls/{room}/opus/../index.m3u8"),
        "/hls/%2e%2e/x".to_string(),
    ] {
        let r = http_get(http, &bad).await;
        assert_eq!(r.status, 404, "{bad}");
        api_error(&r);
    }
    let r = http_get(http, "/hls/ffffffffffffffff/opus/playlist.m3u8").await;
    assert_eq!(r.status, 404);
    assert_eq!(api_error(&r).error, "room_not_found");

    send_frames(&mut uni, &frames[120..150], 120, Duration::from_millis(5)).await;
    uni.finish().unwrap();
    // The stop closes segment 1 with its trailing parts: msn=1 becomes available.
    let r = http_get(http, &format!("{playlist}?_HLS_msn=1")).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    conform(&text, Expect::live(OPUS.part_target_ms()).with_reports(1));
    let aac = http_get(http, &format!("/hls/{room}/aac/playlist.m3u8?_HLS_msn=1")).await;
    conform(
        &aac.text(),
        Expect::live(AAC.part_target_ms()).with_reports(1),
    );
    let pl = m3u8_rs::parse_media_playlist_res(text.as_bytes()).expect("m3u8-rs parses");
    assert_eq!(pl.target_duration, 2);
    assert_eq!(pl.media_sequence, 0);
    assert!(!pl.end_list);
    let uris: Vec<_> = pl.segments.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(uris, ["seg0.m4a", "seg1.m4a"]);
    assert!((pl.segments[0].duration - 2.0).abs() < 1e-6);
    assert!((pl.segments[1].duration - 1.0).abs() < 1e-6);
    assert!(pl.segments.iter().all(|s| s.program_date_time.is_some()));
    assert!(text.contains("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part2.0.m4a\""));
    assert_eq!(text.matches("#EXT-X-PART:").count(), 15);
    assert!(text.contains("#EXT-X-PART-INF:PART-TARGET=0.200"));

    // Every listed file is served, with immutable caching.
    let init = http_get(http, &format!("/hls/{room}/opus/init.m4a")).await;
    assert_eq!(init.status, 200);
    assert_eq!(
        init.header("cache-control"),
        Some("max-age=31536000, immutable")
    );
    assert_eq!(init.header("content-type"), Some("audio/mp4"));
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("#EXT-X-PART:") {
            let uri = rest
                .split("URI=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let r = http_get(http, &format!("/hls/{room}/opus/{uri}")).await;
            assert_eq!(r.status, 200, "{uri}");
            let mut file = init.body.clone();
            file.extend_from_slice(&r.body);
            let mp4 = mp4::Mp4Reader::read_header(std::io::Cursor::new(&file), file.len() as u64)
                .expect("part parses");
            assert_eq!(mp4.sample_count(1).unwrap(), 10, "{uri}");
        }
    }
    // One codec per multivariant playlist: the main one AAC-LC, then one per rendition.
    for (name, uri, codecs) in [
        ("index.m3u8", "aac/playlist.m3u8", "mp4a.40.2"),
        ("index-opus.m3u8", "opus/playlist.m3u8", "opus"),
        ("index-aac.m3u8", "aac/playlist.m3u8", "mp4a.40.2"),
    ] {
        let mv = http_get(http, &format!("/hls/{room}/{name}")).await;
        assert_eq!(mv.status, 200, "{name}");
        match m3u8_rs::parse_playlist_res(&mv.body).unwrap() {
            m3u8_rs::Playlist::MasterPlaylist(m) => {
                assert_eq!(m.variants.len(), 1, "{name}");
                assert_eq!(m.variants[0].uri, uri);
                assert_eq!(m.variants[0].codecs.as_deref(), Some(codecs));
            }
            other => panic!("{name} not multivariant: {other:?}"),
        }
    }

    // A held request for a segment that only the end of the room resolves.
    let held = tokio::spawn(async move {
        http_get(
            http,
            &format!("/hls/{}/opus/playlist.m3u8?_HLS_msn=3", ROOM),
        )
        .await
    });

    // Stream B after a stop: RTP restarts at 0; then the room ends.
    last_stream_then_end(&h.conn, &mut h.control_send, &frames[150..175]).await;
    let (text, pl) = ended_playlist(&h, &playlist).await;
    assert!(pl.end_list);
    let uris: Vec<_> = pl.segments.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(uris, ["seg0.m4a", "seg1.m4a", "seg2.m4a"]);
    assert!(pl.segments[2].discontinuity && !pl.segments[1].discontinuity);
    assert!((pl.segments[2].duration - 0.5).abs() < 1e-6);
    assert!(!text.contains("PRELOAD-HINT"));
    let held = held.await.unwrap();
    assert_eq!(held.status, 200);
    assert!(held.text().contains("#EXT-X-ENDLIST"));
    // Once ended, delivery directives are ignored.
    assert_eq!(
        http_get(http, &format!("{playlist}?_HLS_msn=50"))
            .await
            .status,
        200
    );

    // ffmpeg as an independent HLS client and Opus decoder.
    let url = format!("http://{http}{playlist}");
    let pcm = ffmpeg_stdout(
        "ffmpeg",
        [
            "-v", "error", "-i", &url, "-t", "2", "-f", "s16le", "-ac", "1", "-ar", "48000", "-",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )
    .await;
    let samples = s16le(&pcm);
    assert!(samples.len() >= 90_000, "decoded {} samples", samples.len());
    let (freq, rms) = dominant_frequency(&samples[24_000..72_000]);
    assert!((freq - 440.0).abs() <= 5.0, "dominant {freq} Hz");
    assert!(rms > 3000.0, "rms {rms}");

    let metrics = http_get(http, "/metrics").await.text();
    assert!(
        metrics.contains("amphi_packager_parts_published_total 18\n"),
        "{metrics}"
    );
    assert!(metrics.contains("amphi_packager_rooms_live 0\n"));
    assert!(metrics.contains("amphi_packager_publish_delay_seconds_count 18\n"));
    assert_eq!(http_get(http, "/healthz").await.status, 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_program_times_out_blocking_requests_and_bad_records_drop_the_stream() {
    let mut h = Harness::start("stall").await;
    let http = h.http;
    let playlist = format!("/hls/{ROOM}/opus/playlist.m3u8");
    let frames = tone_frames(440.0, 10);
    let mut uni = h.conn.open_uni().await.unwrap();
    send_frames(&mut uni, &frames, 0, Duration::from_millis(1)).await;
    h.wait_until(&playlist, |r| r.text().contains("part0.0.m4a"))
        .await;
    // No more frames: a request for part 0.5 is held 3 target durations, then 503.
    let t = Instant::now();
    let r = http_get(http, &format!("{playlist}?_HLS_msn=0&_HLS_part=5")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(t.elapsed() >= Duration::from_millis(5_900));
    assert_eq!(api_error(&r).error, "unavailable");

    // A malformed record (length prefix beyond the limit) drops the stream: the trailing part
    // is flushed as on any stop and the bad record is counted.
    uni.write_all(&[1, 0, 0, 0]).await.unwrap();
    uni.write_all(&100_000u32.to_le_bytes()).await.unwrap();
    let m = h
        .wait_until("/metrics", |r| {
            r.text().contains("amphi_packager_bad_records_total 1\n")
        })
        .await;
    assert!(m
        .text()
        .contains("amphi_packager_streams_accepted_total 1\n"));
    // The stream was stopped by the packager.
    let stopped = tokio::time::timeout(Duration::from_secs(5), uni.stopped()).await;
    assert!(matches!(stopped, Ok(Ok(Some(_)))), "{stopped:?}");

    // The origin goes away: the packager reconnects (first backoff 100 ms) and says hello again.
    h.conn.close(1u32.into(), b"origin restart");
    let t = Instant::now();
    let (conn, send, recv) = common::accept_packager(&h.endpoint).await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "reconnected after {:?}",
        t.elapsed()
    );
    h.wait_until("/metrics", |r| {
        r.text()
            .contains("amphi_packager_origin_reconnects_total 1\n")
            && r.text().contains("amphi_packager_origin_connected 1\n")
    })
    .await;
    h.conn = conn;
    h.control_send = send;
    h.control_recv = recv;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_room_without_media_holds_blocking_reloads_until_its_first_part() {
    const NEW: RoomId = RoomId(0x0bad_cafe_0000_0001);
    let mut h = Harness::start("announced").await;
    let http = h.http;
    let playlist = format!("/hls/{NEW}/opus/playlist.m3u8");
    // Unknown room: 404 room_not_found, nothing to retry.
    let r = http_get(http, &playlist).await;
    assert_eq!(r.status, 404);
    assert_eq!(api_error(&r).error, "room_not_found");
    assert_eq!(r.header("retry-after"), None);

    // The origin announces the room before any program media.
    h.control_send
        .write_all(&ControlMessage::RoomOpened { room: NEW }.to_record())
        .await
        .unwrap();
    let r = h
        .wait_until(&playlist, |r| r.text().contains("room_not_started"))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let index = http_get(http, &format!("/hls/{NEW}/index.m3u8")).await;
    assert_eq!(
        (index.status, api_error(&index).error.as_str()),
        (404, "room_not_started")
    );
    // A blocking reload for the first part is held (not answered 404)...
    let blocked = {
        let target = format!("{playlist}?_HLS_msn=0&_HLS_part=0");
        tokio::spawn(async move { http_get(http, &target).await })
    };
    h.wait_until("/metrics", |r| {
        r.text()
            .contains("amphi_packager_blocking_requests_in_flight 1\n")
    })
    .await;
    assert!(!blocked.is_finished());
    // ... until the program's first part is published.
    let mut uni = h.conn.open_uni().await.unwrap();
    for (i, f) in tone_frames(440.0, 12).iter().enumerate() {
        uni.write_all(&common::program_record(NEW, i as u32, f))
            .await
            .unwrap();
    }
    let r = blocked.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("part0.0.m4a"), "{}", r.text());
    conform(
        &r.text(),
        Expect::live(OPUS.part_target_ms()).with_reports(1),
    );
    h.stop().await;
}

/// Fault "origin dies": the room's owner stops mid-stream (no FIN, as after `kill -9`) and the
/// room's new owner, another origin the packager is linked to, starts its program stream with
/// fresh RTP timestamps. The output continues with exactly one discontinuity and no segment
/// listed twice or lost. Without a link to every origin the new owner's stream never arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_moving_to_another_origin_continues_with_one_discontinuity() {
    let dir = common::scratch_dir("owner-change");
    let mut h = Harness::start_origins(amphi_packager::PackagerOptions::default(), dir, 2).await;
    let http = h.http;
    let playlist = format!("/hls/{ROOM}/opus/playlist.m3u8");
    let frames = tone_frames(440.0, 170);

    // The first owner: 2.4 s, then it dies (the stream is never finished).
    let mut dying = h.conn.open_uni().await.unwrap();
    send_frames(&mut dying, &frames[..120], 0, Duration::from_millis(5)).await;
    h.wait_until(&playlist, |r| r.text().contains("seg0.m4a"))
        .await;

    // The new owner mixes the room from its state: 1 s, RTP from 0, then it ends the room.
    let new_owner = &mut h.others[0];
    last_stream_then_end(
        &new_owner.conn,
        &mut new_owner.control_send,
        &frames[120..170],
    )
    .await;
    let (text, pl) = ended_playlist(&h, &playlist).await;
    let uris: Vec<_> = pl.segments.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(uris, ["seg0.m4a", "seg1.m4a", "seg2.m4a"], "{text}");
    let discontinuities: Vec<bool> = pl.segments.iter().map(|s| s.discontinuity).collect();
    assert_eq!(discontinuities, [false, false, true], "{text}");
    let total: f32 = pl.segments.iter().map(|s| s.duration).sum();
    assert!((total - 3.4).abs() < 1e-3, "every frame kept: {total} s");
    for uri in uris {
        let seg = http_get(http, &format!("/hls/{ROOM}/opus/{uri}")).await;
        assert_eq!(seg.status, 200, "{uri} stored");
    }
    let metrics = http_get(http, "/metrics").await.text();
    assert!(
        metrics.contains("amphi_packager_origin_connected 2\n"),
        "{metrics}"
    );
    dying.reset(0u32.into()).ok();
    h.stop().await;
}
