//! Speaker chapters with names, end to end through `amphi dev`: a named speaker (a token carrying
//! the application's `user_id`) speaks, leaves, rejoins (a new participant id) and speaks again;
//! the recording's VOD playlist names her in its `EXT-X-DATERANGE`s with one stable user id, and
//! the chapters a podcast player reads (Podcasting 2.0 JSON, WebVTT), referenced from the API's
//! recording info, carry her name.

use amphi_testkit::mesh as support;

use std::time::Duration;
use support::*;

const NAME: &str = "Ada \"Countess\" Lovelace é";
const USER: &str = "ada-1815";

/// A speaker token for `room` with the display name and user id above.
fn named_token(mesh: &DevMesh, room: &str) -> String {
    let v: serde_json::Value = ureq::post(&format!("{}/v1/rooms/{room}/tokens", mesh.router()))
        .send_json(serde_json::json!({"role": "speaker", "name": NAME, "user_id": USER}))
        .expect("mint token")
        .into_json()
        .unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// The value of attribute `name` in an `EXT-X-DATERANGE` line.
fn attr<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(",{name}=\""))? + name.len() + 3;
    line[at..].split('"').next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_speaker_who_rejoins_gets_named_chapters_with_one_user_id() {
    let mesh = DevMesh::start(22_000, "chapters");
    let (room, host, hls_url) = mesh.create_room("chapters");
    let whip = mesh.route(&room, "us-east")["whip_url"]
        .as_str()
        .unwrap()
        .to_string();

    // Speaks, leaves (the WHIP session is deleted), rejoins with a new session and speaks again.
    publish_tone(&whip, &named_token(&mesh, &room), 440.0, 3.0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_tone(&whip, &named_token(&mesh, &room), 550.0, 3.0).await;
    {
        let hls_url = hls_url.clone();
        tokio::task::spawn_blocking(move || wait_status(&hls_url, 200, Duration::from_secs(20)))
            .await
            .unwrap();
    }
    let ended = ureq::post(&format!("{}/v1/rooms/{room}/end", mesh.router()))
        .set("Authorization", &format!("Bearer {host}"))
        .call();
    assert!(ended.is_ok(), "end room: {ended:?}");

    let recording_api = format!("{}/v1/rooms/{room}/recording", mesh.router());
    let base = format!("{}/hls/{room}", mesh.packager());
    let log = mesh.log_text();
    tokio::task::spawn_blocking(move || {
        wait_status(&recording_api, 200, Duration::from_secs(30));
        let info: serde_json::Value = ureq::get(&recording_api)
            .call()
            .unwrap()
            .into_json()
            .unwrap();

        // The VOD playlist: every turn named, one user id, two participant ids.
        let vod = String::from_utf8(get_bytes(&format!("{base}/opus/vod.m3u8"))).unwrap();
        let turns: Vec<&str> = vod
            .lines()
            .filter(|l| l.starts_with("#EXT-X-DATERANGE:"))
            .collect();
        assert!(turns.len() >= 2, "two turns at least:\n{vod}\n{log}");
        let quoted = NAME.replace('"', "'");
        let mut ids = std::collections::BTreeSet::new();
        for t in &turns {
            assert_eq!(attr(t, "X-SPEAKER-NAME"), Some(quoted.as_str()), "{t}");
            assert_eq!(attr(t, "X-SPEAKER-USER"), Some(USER), "{t}");
            ids.insert(attr(t, "X-SPEAKER-ID").unwrap().to_string());
        }
        assert!(ids.len() >= 2, "the rejoin is a new participant: {ids:?}");

        // Chapters for podcast players, from the API's recording info.
        let json_url = info["chapters_url"].as_str().expect("chapters_url");
        let vtt_url = info["chapters_vtt_url"].as_str().expect("chapters_vtt_url");
        assert!(
            json_url.ends_with(&format!("/hls/{room}/chapters.json")),
            "{info}"
        );
        let chapters: serde_json::Value = serde_json::from_slice(&get_bytes(json_url)).unwrap();
        assert_eq!(chapters["version"], "1.2.0", "{chapters}");
        let list = chapters["chapters"].as_array().unwrap();
        assert_eq!(list.len(), turns.len(), "{chapters}");
        let mut last = -1.0;
        for c in list {
            assert_eq!(c["title"], NAME, "{chapters}");
            let start = c["startTime"].as_f64().unwrap();
            assert!(
                start > last && c["endTime"].as_f64().unwrap() > start,
                "{chapters}"
            );
            last = start;
        }
        let vtt = String::from_utf8(get_bytes(vtt_url)).unwrap();
        assert!(vtt.starts_with("WEBVTT\n"), "{vtt}");
        assert_eq!(vtt.matches(" --> ").count(), turns.len(), "{vtt}");
        assert_eq!(vtt.matches(NAME).count(), turns.len(), "{vtt}");
    })
    .await
    .unwrap();
}
