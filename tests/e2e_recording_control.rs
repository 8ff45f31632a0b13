//! Recordings the host controls, end to end through `amphi dev` storing in S3 (a real s3s-fs),
//! with private recordings and a real webhook receiver: a room with two named speakers ends; its
//! recording is private (the plain URL is refused, the host's signed URL works); a non-host
//! cannot publish it; the host publishes it: the downloadable M4A carries one chapter per
//! speaker named by display name (ffprobe), decodes whole (ffmpeg), answers byte ranges (206),
//! and `recording_published` arrives. Another room's host deletes its recording: every object of
//! the room is gone from the s3s-fs directory, the API and the media paths answer 410, and
//! `recording_deleted` arrives.

use amphi_testkit::mesh::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// `amphi dev --port-offset` of this test (ports 28580..=28901).
const OFFSET: u16 = 20_500;
const S3_PORT: u16 = 29_550;
const HOOK_PORT: u16 = 29_560;
const BUCKET: &str = "amphi-recctl";
const ADA: &str = "Ada Lovelace";
const GRACE: &str = "Grace Hopper é";

/// A speaker token for `room` naming its holder.
fn named_token(mesh: &DevMesh, room: &str, name: &str, user: &str) -> String {
    let v: serde_json::Value = ureq::post(&format!("{}/v1/rooms/{room}/tokens", mesh.router()))
        .send_json(serde_json::json!({"role": "speaker", "name": name, "user_id": user}))
        .expect("mint token")
        .into_json()
        .unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// `method url` with an optional Bearer token: status, JSON body (null if none), headers.
fn call(method: &str, url: &str, bearer: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = ureq::request(method, url);
    if let Some(t) = bearer {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    (status, resp.into_json().unwrap_or(serde_json::Value::Null))
}

/// The deliveries until one of kind `kind` (bounded in count and time).
fn wait_hook(hooks: &std::sync::mpsc::Receiver<Delivery>, kind: &str) -> serde_json::Value {
    let mut seen = Vec::new();
    for _ in 0..50 {
        let Ok(d) = hooks.recv_timeout(Duration::from_secs(60)) else {
            break;
        };
        assert!(d.signature.starts_with("sha256="), "{}", d.signature);
        let k = d.body["event"].as_str().unwrap_or("").to_string();
        if k == kind {
            return d.body;
        }
        seen.push(k);
    }
    panic!("no {kind} webhook; got {seen:?}")
}

/// The speakers in turn, then the host ends the room: room id, host token, and the token of a
/// speaker who never spoke (minted before the end).
async fn record(
    mesh: &DevMesh,
    title: &str,
    speakers: &[(&str, &str, f64)],
) -> (String, String, String) {
    let (room, host, hls_url) = mesh.create_room(title);
    let whip = mesh.route(&room, "us-east")["whip_url"]
        .as_str()
        .unwrap()
        .to_string();
    for (name, user, freq) in speakers {
        let token = named_token(mesh, &room, name, user);
        publish_tone(&whip, &token, *freq, 3.0).await;
    }
    tokio::task::spawn_blocking(move || wait_status(&hls_url, 200, Duration::from_secs(20)))
        .await
        .unwrap();
    let silent = named_token(mesh, &room, "Eve", "eve-1");
    let (status, _) = call(
        "POST",
        &format!("{}/v1/rooms/{room}/end", mesh.router()),
        Some(&host),
    );
    assert_eq!(status, 200);
    (room, host, silent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_publishes_one_recording_and_deletes_another() {
    let scratch = scratch_dir("rec-control");
    let s3 = S3sFs::start(scratch.join("s3"), S3_PORT);
    let hooks = webhook_receiver(HOOK_PORT);
    std::env::set_var("AMPHI_DEV_S3_ACCESS_KEY", S3_KEY);
    std::env::set_var("AMPHI_DEV_S3_SECRET_KEY", S3_SECRET);
    let hook_url = format!("http://127.0.0.1:{HOOK_PORT}/hooks");
    let mesh = DevMesh::start_with(
        OFFSET,
        "rec-control",
        &[
            "--s3-endpoint",
            &s3.url(),
            "--s3-bucket",
            BUCKET,
            "--private-recordings",
            "--webhook-url",
            &hook_url,
        ],
    );
    let two = [(ADA, "ada-1815", 440.0), (GRACE, "grace-1906", 660.0)];
    let (kept, host, speaker) = record(&mesh, "kept", &two).await;
    let (dropped, dropped_host, _) = record(&mesh, "dropped", &[(ADA, "ada-1815", 550.0)]).await;
    let router = mesh.router();
    let packager = mesh.packager();
    let file = scratch.join("kept.m4a");
    let log = mesh.log_text();

    let s3 = tokio::task::spawn_blocking(move || {
        let api = format!("{router}/v1/rooms/{kept}/recording");
        let deadline = Instant::now() + Duration::from_secs(60);
        let info = loop {
            let (status, info) = call("GET", &api, Some(&host));
            if status == 200 {
                break info;
            }
            assert!(
                Instant::now() < deadline,
                "no recording: {status} {info}\n{log}"
            );
            std::thread::sleep(Duration::from_millis(250));
        };

        // Private: the plain URL is refused, the host's signed URL plays.
        assert_eq!(info["status"], "private", "{info}");
        let signed = info["url"].as_str().unwrap().to_string();
        assert!(signed.contains("/recording.m3u8?sig="), "{signed}");
        let plain = format!("{packager}/hls/{kept}/recording.m3u8");
        assert_eq!(call("GET", &plain, None).0, 403);
        assert_eq!(
            call("GET", &format!("{packager}/hls/{kept}/aac/vod.m3u8"), None).0,
            403
        );
        let multivariant = String::from_utf8(get_bytes(&signed)).unwrap();
        let media = multivariant
            .lines()
            .find(|l| !l.starts_with('#') && !l.is_empty())
            .unwrap();
        assert!(media.contains("vod.m3u8?sig="), "{multivariant}");
        let vod = String::from_utf8(get_bytes(&join_url(&signed, media))).unwrap();
        assert!(vod.contains("#EXT-X-ENDLIST"), "{vod}");
        // Anonymous callers get the plain URLs.
        let (status, anon) = call("GET", &api, None);
        let proxied = format!("{router}/hls/{kept}/recording.m3u8");
        assert_eq!(
            (status, anon["url"].as_str()),
            (200, Some(proxied.as_str()))
        );

        // Nobody but this room's host may publish it.
        let publish = format!("{api}/publish");
        assert_eq!(call("POST", &publish, None).0, 401);
        assert_eq!(call("POST", &publish, Some(&speaker)).0, 403);
        assert_eq!(call("POST", &publish, Some(&dropped_host)).0, 403);
        assert_eq!(call("GET", &plain, None).0, 403, "still private");

        // The host publishes: public, with the downloadable file.
        let (status, published) = call("POST", &publish, Some(&host));
        assert_eq!(status, 200, "{published}");
        assert_eq!(published["status"], "published");
        assert_eq!(call("GET", &plain, None).0, 200);
        let (_, info) = call("GET", &api, None);
        assert_eq!(info["status"], "published", "{info}");
        let download = info["download_url"].as_str().unwrap().to_string();
        assert!(download.ends_with(&format!("/hls/{kept}/recording.m4a")));
        let bytes = get_bytes(&download);
        std::fs::write(&file, &bytes).unwrap();

        // Chapters by display name, as ffprobe reads them.
        let probe = Command::new("ffprobe")
            .args(["-v", "error", "-show_chapters", "-of", "json"])
            .arg(&file)
            .output()
            .expect("ffprobe");
        assert!(probe.status.success(), "{probe:?}");
        let chapters: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
        let titles: Vec<&str> = chapters["chapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["tags"]["title"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(titles, [ADA, GRACE], "{chapters}");
        let starts: Vec<f64> = chapters["chapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["start_time"].as_str().unwrap().parse().unwrap())
            .collect();
        assert!(starts[1] >= starts[0] + 2.0, "{chapters}");

        // ffmpeg decodes the whole file without an error: both three-second turns.
        let decode = Command::new("ffmpeg")
            .args(["-v", "error", "-xerror", "-i"])
            .arg(&file)
            .args(["-f", "f32le", "-ac", "1", "-ar", "48000", "-"])
            .output()
            .expect("ffmpeg");
        assert!(
            decode.status.success(),
            "{:?}",
            String::from_utf8_lossy(&decode.stderr)
        );
        assert!(
            decode.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&decode.stderr)
        );
        let seconds = decode.stdout.len() as f64 / 4.0 / 48_000.0;
        assert!(seconds >= 5.5, "{seconds} s decoded");

        // Byte ranges, through the router's /hls proxy.
        let resp = ureq::get(&download)
            .set("Range", "bytes=100-199")
            .call()
            .unwrap();
        assert_eq!(resp.status(), 206);
        assert_eq!(resp.header("accept-ranges"), Some("bytes"));
        let want = format!("bytes 100-199/{}", bytes.len());
        assert_eq!(resp.header("content-range"), Some(want.as_str()));
        let mut part = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut part).unwrap();
        assert_eq!(part, bytes[100..200]);
        let past = format!("bytes={}-", bytes.len());
        let refused = ureq::get(&download).set("Range", &past).call();
        assert!(
            matches!(refused, Err(ureq::Error::Status(416, _))),
            "{refused:?}"
        );

        let hook = wait_hook(&hooks, "recording_published");
        assert_eq!(hook["data"]["room"], kept.as_str(), "{hook}");
        assert_eq!(hook["data"]["download_url"], download.as_str(), "{hook}");

        // The other room's host deletes its recording: everything of it leaves S3.
        let api = format!("{router}/v1/rooms/{dropped}/recording");
        let deadline = Instant::now() + Duration::from_secs(60);
        while call("GET", &api, Some(&dropped_host)).0 != 200 {
            assert!(Instant::now() < deadline, "no recording of {dropped}");
            std::thread::sleep(Duration::from_millis(250));
        }
        let prefix = format!("hls/{dropped}/");
        let of_room = |s3: &S3sFs| -> Vec<String> {
            s3.keys(BUCKET)
                .into_iter()
                .filter(|k| k.starts_with(&prefix))
                .collect()
        };
        let stored = of_room(&s3);
        assert!(
            stored.iter().any(|k| k.ends_with("aac/init.m4a")),
            "{stored:?}"
        );
        assert_eq!(call("DELETE", &api, Some(&speaker)).0, 403);
        assert_eq!(
            call("DELETE", &api, Some(&host)).0,
            403,
            "another room's host"
        );
        let (status, deleted) = call("DELETE", &api, Some(&dropped_host));
        assert_eq!(status, 200, "{deleted}");
        assert_eq!(deleted["removed_objects"], stored.len(), "{deleted}");
        assert_eq!(of_room(&s3), Vec::<String>::new());
        assert_eq!(call("GET", &api, None).0, 410);
        assert_eq!(call("GET", &api, Some(&dropped_host)).0, 410);
        assert_eq!(
            call("POST", &format!("{api}/publish"), Some(&dropped_host)).0,
            410
        );
        for media in [
            "recording.m3u8",
            "aac/vod.m3u8",
            "aac/init.m4a",
            "opus/seg0.m4a",
        ] {
            let url = format!("{packager}/hls/{dropped}/{media}");
            assert_eq!(call("GET", &url, None).0, 410, "{url}");
        }
        let hook = wait_hook(&hooks, "recording_deleted");
        assert_eq!(hook["data"]["room"], dropped.as_str(), "{hook}");
        // The published one is untouched.
        assert!(s3
            .keys(BUCKET)
            .contains(&format!("hls/{kept}/recording.m4a")));
        s3
    })
    .await
    .unwrap();
    drop(mesh);
    drop(s3);
}
