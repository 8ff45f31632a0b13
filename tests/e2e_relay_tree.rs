//! The push tier's relay tree across processes: an origin, a geo-router and three `amphi edge`
//! processes in one region, each advertising its own `relay_url`. The router makes the first edge
//! by id the region's hub: the other two pull the room's program from it (their feeds count as
//! two push listeners there) and the origin sends the program to the hub alone. Push listeners
//! at both leaves hear a speaker's tone. The hub is then killed (SIGKILL): each leaf falls back
//! to the origins at once, the router rebuilds the tree under the next edge, and the listeners,
//! still connected, hear the tone on with no repeated frame and a gap no longer than the switch.

mod roles;
use amphi_testkit::mesh as support;

use amphi_protocol::push::{AudioMessage, FRAME_SAMPLES};
use amphi_protocol::token::Role;
use futures_util::StreamExt;
use roles::*;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// One frame as a listener got it: when, its room timestamp, its Opus packet.
struct Heard {
    at: Instant,
    ts: u64,
    opus: Vec<u8>,
}

/// A push listener at `url` until `until`: every frame it receives.
async fn listen(url: String, until: Instant) -> Vec<Heard> {
    let (mut ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("push upgrade");
    assert_eq!(resp.status(), 101);
    let mut heard = Vec::new();
    while let Ok(msg) = tokio::time::timeout_at(until.into(), ws.next()).await {
        match msg
            .expect("the listener's stream stays open")
            .expect("message")
        {
            Message::Binary(bytes) => {
                let m = AudioMessage::decode(&bytes).expect("audio message decodes");
                let at = Instant::now();
                heard.extend(m.frames().map(|f| Heard {
                    at,
                    ts: f.ts,
                    opus: f.opus.to_vec(),
                }));
            }
            Message::Text(_) | Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected message {other:?}"),
        }
    }
    heard
}

fn metric(base: &str, name: &str) -> f64 {
    support::metric(base, name).unwrap_or(-1.0)
}

/// Wait (blocking, at most `limit`) until `ok` holds for the edges' metrics.
async fn wait_for(what: &'static str, limit: Duration, ok: impl Fn() -> bool + Send + 'static) {
    tokio::task::spawn_blocking(move || eventually(what, limit, || ok().then_some(())))
        .await
        .unwrap();
}

/// The largest arrival gap, the frames missing and the frames repeated, among `heard`.
fn continuity(heard: &[Heard]) -> (Duration, u64, usize) {
    let (mut gap, mut missing, mut repeated) = (Duration::ZERO, 0, 0);
    for w in heard.windows(2) {
        gap = gap.max(w[1].at - w[0].at);
        if w[1].ts <= w[0].ts {
            repeated += 1;
        } else {
            missing += (w[1].ts - w[0].ts) / FRAME_SAMPLES - 1;
        }
    }
    (gap, missing, repeated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_pull_from_the_hub_and_their_listeners_hear_on_when_it_dies() {
    let mesh = RoleMesh::new("relay-tree", 31_000);
    let _origin = mesh.origin(None);
    let _router = mesh.router_process(None, "");
    let ids = ["edge-eu-a", "edge-eu-b", "edge-eu-c"];
    let mut edges: Vec<RoleProcess> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let i = i as u16;
            let relay = format!("relay_url = \"{}\"", mesh.edge(i));
            mesh.edge_process_as(i, id, "eu-west", "", &relay)
        })
        .collect();
    mesh.wait_up(&[0, 1, 2], false, false).await;
    let router = mesh.router();
    let (hub, leaf_b, leaf_c) = (mesh.edge(0), mesh.edge(1), mesh.edge(2));
    let room = create_room(&router, "relay tree").room;

    // A relay grant is the only other way in: a forged one is refused.
    let refused = {
        let url = format!("{hub}/v1/rooms/{room}/push?relay=not-a-grant");
        tokio::task::spawn_blocking(move || support::get_status(&url))
            .await
            .unwrap()
    };
    assert_eq!(refused, 401);

    // The speaker at leaf c, for the whole test.
    let speaker = mesh.token(&room, Role::Speaker);
    let whip = format!("{leaf_c}/whip/{room}");
    let tone =
        tokio::spawn(async move { support::publish_tone(&whip, &speaker, 440.0, 40.0).await });

    let until = Instant::now() + Duration::from_secs(36);
    let ws_url = |edge: &str| {
        format!(
            "{}/v1/rooms/{room}/push?token={}",
            edge.replace("http://", "ws://"),
            mesh.token(&room, Role::Listener)
        )
    };
    let at_b = tokio::spawn(listen(ws_url(&leaf_b), until));
    let at_c = tokio::spawn(listen(ws_url(&leaf_c), until));

    // The tree: both leaves fed by the hub, whose two push "listeners" are their feeds.
    {
        let (hub, b, c) = (hub.clone(), leaf_b.clone(), leaf_c.clone());
        wait_for(
            "both leaves fed by the hub",
            Duration::from_secs(20),
            move || {
                metric(&b, "amphi_edge_push_fed_rooms") == 1.0
                    && metric(&c, "amphi_edge_push_fed_rooms") == 1.0
                    && metric(&hub, "amphi_edge_push_listeners") == 2.0
                    && metric(&hub, "amphi_edge_push_fed_rooms") == 0.0
            },
        )
        .await;
    }
    // One copy for the region: the origin sends the program (50 frames/s) to the hub only.
    let origin = mesh.origin_metrics();
    let sent = {
        let origin = origin.clone();
        tokio::task::spawn_blocking(move || {
            let name = "amphi_origin_program_frames_to_edges_total";
            let before = metric(&origin, name);
            std::thread::sleep(Duration::from_secs(2));
            metric(&origin, name) - before
        })
        .await
        .unwrap()
    };
    assert!(
        (60.0..150.0).contains(&sent),
        "{sent} program frames to edges in 2 s: one edge (~100) expected"
    );
    assert!(metric(&leaf_c, "amphi_edge_push_feed_frames_total") > 50.0);

    // The hub dies.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    edges[0].signal("KILL");
    assert!(edges[0].wait_exit(Duration::from_secs(5)).is_some());
    {
        let (b, c) = (leaf_b.clone(), leaf_c.clone());
        wait_for(
            "the tree rebuilt under edge b",
            Duration::from_secs(20),
            move || {
                metric(&b, "amphi_edge_push_fed_rooms") == 0.0
                    && metric(&c, "amphi_edge_push_fed_rooms") == 1.0
                    && metric(&b, "amphi_edge_push_listeners") == 2.0
            },
        )
        .await;
    }
    let rebuilt = killed.elapsed();
    assert!(
        metric(&leaf_b, "amphi_edge_push_feed_failures_total") >= 1.0
            && metric(&leaf_c, "amphi_edge_push_feed_failures_total") >= 1.0
    );

    for (name, heard) in [("b", at_b.await.unwrap()), ("c", at_c.await.unwrap())] {
        let (gap, missing, repeated) = continuity(&heard);
        let after: Vec<&Heard> = heard
            .iter()
            .filter(|h| h.at > killed + Duration::from_secs(1))
            .collect();
        eprintln!(
            "leaf {name}: {} frames, {} after the kill; largest gap {gap:?}, {missing} frames missing, {repeated} repeated; tree rebuilt {rebuilt:?} after the kill",
            heard.len(),
            after.len()
        );
        assert_eq!(repeated, 0, "leaf {name}: no frame twice");
        assert!(
            gap < Duration::from_millis(1500) && missing <= 50,
            "leaf {name}: a gap of {gap:?} ({missing} frames) is more than a switch"
        );
        assert!(
            after.len() >= 500,
            "leaf {name}: {} frames after the kill",
            after.len()
        );
        let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
        let mut pcm = vec![0f32; 5760];
        let mut samples = Vec::new();
        for h in after {
            let n = decoder
                .decode_float(&h.opus, &mut pcm, false)
                .expect("opus");
            samples.extend_from_slice(&pcm[..n]);
        }
        let (freq, level) = support::dominant_frequency(&samples);
        assert!(
            (freq - 440.0).abs() <= 5.0 && level > 0.02,
            "leaf {name} after the kill: {freq} Hz at rms {level}"
        );
    }
    tone.abort();
}
