//! Recordings stored before the packager named its files `.m4a` (`init.mp4`, `seg{n}.m4s`,
//! `part{n}.{i}.m4s`, and VOD playlists naming them) are still served as stored, and ffmpeg
//! replays them through the packager.

use amphi_testkit::packager as common;

use amphi_protocol::RoomId;
use common::{dominant_frequency, ffmpeg_decode, http_get, tone_frames, Harness};
use std::path::Path;

const ROOM: RoomId = RoomId(0x0a0b_0c0d_0e0f_4d34);

/// Turn a rendition directory written now into what an older packager left: media files
/// renamed to the older names, playlists naming them.
fn make_legacy(dir: &Path) -> usize {
    let mut renamed = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name == "init.m4a" {
            std::fs::rename(&path, dir.join("init.mp4")).unwrap();
        } else if let Some(stem) = name.strip_suffix(".m4a") {
            std::fs::rename(&path, dir.join(format!("{stem}.m4s"))).unwrap();
            renamed += 1;
        } else if name.ends_with(".m3u8") {
            let text = std::fs::read_to_string(&path).unwrap();
            let old = text.replace("init.m4a", "init.mp4").replace(".m4a", ".m4s");
            std::fs::write(&path, old).unwrap();
        }
    }
    renamed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_stored_under_older_names_are_still_served() {
    let mut h = Harness::start("legacy-names").await;
    let frames = tone_frames(440.0, 250);
    h.speak_and_end(ROOM, &frames, |_| 0).await;
    h.wait_until(&format!("/hls/{ROOM}/recording.m3u8"), |r| r.status == 200)
        .await;
    let data_dir = h.stop_keeping_files().await;
    for dir in ["opus", "aac"] {
        let n = make_legacy(&data_dir.join(format!("hls/{ROOM}/{dir}")));
        assert!(n >= 20, "{dir}: only {n} media files renamed");
    }

    let h = Harness::start_in(Default::default(), data_dir).await;
    let http = h.http;
    for dir in ["opus", "aac"] {
        let vod = http_get(http, &format!("/hls/{ROOM}/{dir}/vod.m3u8")).await;
        assert_eq!(vod.status, 200);
        let text = vod.text();
        assert!(
            text.contains("URI=\"init.mp4\"") && text.contains("seg0.m4s"),
            "{text}"
        );
        let init = http_get(http, &format!("/hls/{ROOM}/{dir}/init.mp4")).await;
        assert_eq!(init.status, 200, "{dir}/init.mp4");
        assert_eq!(init.header("content-type"), Some("audio/mp4"));
        for seg in text.lines().filter(|l| l.starts_with("seg")) {
            let r = http_get(http, &format!("/hls/{ROOM}/{dir}/{seg}")).await;
            assert_eq!(r.status, 200, "{dir}/{seg}");
        }
        let part = http_get(http, &format!("/hls/{ROOM}/{dir}/part0.0.m4s")).await;
        assert_eq!(part.status, 200, "{dir}/part0.0.m4s");
        // ...and not under the names the packager writes now.
        let now = http_get(http, &format!("/hls/{ROOM}/{dir}/seg0.m4a")).await;
        assert_eq!(now.status, 404);
        let samples = ffmpeg_decode(&format!("http://{http}/hls/{ROOM}/{dir}/vod.m3u8")).await;
        assert!(samples.len() >= 3 * 48_000, "{dir}: {}", samples.len());
        let (freq, _) = dominant_frequency(&samples[24_000..120_000]);
        assert!((freq - 440.0).abs() <= 5.0, "{dir}: {freq} Hz");
    }
    h.stop().await;
}
