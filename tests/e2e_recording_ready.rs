//! `recording_ready`: a room with a speaker is ended through the geo-router; once the packager
//! (its own process, fed by the origin's program) has written the VOD recording, the router POSTs
//! a signed `recording_ready` webhook, with the recording's URL, to a local receiver.

mod roles;
use amphi_testkit::mesh as support;

use roles::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_ready_is_posted_once_the_vod_is_written() {
    let mesh = RoleMesh::new("recording-ready", 27_600);
    let hook_port = 27_650;
    let deliveries = support::webhook_receiver(hook_port);
    let _origin = mesh.origin(None);
    let _packager = mesh.packager();
    let _router = mesh.router_process(
        None,
        &format!(
            "webhooks = [{{ url = \"http://127.0.0.1:{hook_port}/hooks\", secret = \"hook-secret\" }}]\n"
        ),
    );
    let _us = mesh.edge_process(0, "us-east", "");
    let (router, edge) = (mesh.router(), mesh.edge(0));
    mesh.wait_up(&[0], true, true).await;
    let CreatedRoom {
        room,
        host_token: host,
    } = create_room(&router, "recorded");
    let speaker = mint_token(&router, &room, "speaker", "tone");
    // Three seconds of tone through the edge: the packager records the room's program.
    support::publish_tone(&format!("{edge}/whip/{room}"), &speaker, 440.0, 3.0).await;
    let (status, _) = call("GET", &format!("{router}/v1/rooms/{room}/recording"), None);
    assert_eq!(status, 404, "no recording while the room is live");

    let ended = tokio::task::spawn_blocking({
        let url = format!("{router}/v1/rooms/{room}/end");
        move || {
            ureq::post(&url)
                .set("Authorization", &format!("Bearer {host}"))
                .call()
                .map(|r| r.status())
                .unwrap_or(0)
        }
    })
    .await
    .unwrap();
    assert_eq!(ended, 200);

    // room_ended first, then recording_ready with the URL; each signed.
    let (kinds, ready) = tokio::task::spawn_blocking(move || {
        let mut kinds = Vec::new();
        for _ in 0..20 {
            let Ok(d) = deliveries.recv_timeout(Duration::from_secs(60)) else {
                break;
            };
            assert!(d.signature.starts_with("sha256="), "{}", d.signature);
            let kind = d.body["event"].as_str().unwrap_or("").to_string();
            kinds.push(kind.clone());
            if kind == "recording_ready" {
                return (kinds, Some(d.body));
            }
        }
        (kinds, None)
    })
    .await
    .unwrap();
    let ready = ready.unwrap_or_else(|| panic!("no recording_ready; got {kinds:?}"));
    assert!(kinds.contains(&"room_ended".to_string()), "{kinds:?}");
    assert_eq!(ready["data"]["room"], room.as_str(), "{ready}");
    let url = ready["data"]["url"].as_str().unwrap().to_string();
    assert!(
        url.ends_with(&format!("/hls/{room}/recording.m3u8")),
        "{url}"
    );
    let (status, info) = call("GET", &format!("{router}/v1/rooms/{room}/recording"), None);
    assert_eq!(
        (status, info["url"].as_str()),
        (200, Some(url.as_str())),
        "{info}"
    );
    let playlist = String::from_utf8(
        tokio::task::spawn_blocking(move || support::get_bytes(&url))
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(playlist.starts_with("#EXTM3U"), "{playlist}");
}
