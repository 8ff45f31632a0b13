//! Reports end to end, over separate role processes (origin, packager, a geo-router on Redis with
//! a webhook receiver, an edge): a listener reports a speaker over the WebSocket; the room's host
//! gets the `reported` event with a pointer into the program (the recording); the router stores
//! it in Redis, POSTs a signed `report_created` webhook to a real local receiver and lists it at
//! `GET /v1/rooms/{id}/reports`; a user the host kicked can still be reported; a burst of reports
//! is refused with `rate_limited`.

mod roles;
use amphi_testkit::mesh as support;

use amphi_protocol::room::{Report, ReportReason, ReportTarget, RoomEvent, ServerMessage};
use roles::*;
use serde_json::json;
use std::sync::mpsc;
use std::time::Duration;

/// The next `report_created` delivery (other events skipped), at most 30 s away.
async fn next_report_hook(
    rx: mpsc::Receiver<support::Delivery>,
) -> (mpsc::Receiver<support::Delivery>, serde_json::Value) {
    tokio::task::spawn_blocking(move || {
        for _ in 0..50 {
            let support::Delivery { signature, body } = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("a report_created webhook");
            if body["event"] == "report_created" {
                assert!(signature.starts_with("sha256="), "{signature}");
                return (rx, body);
            }
        }
        panic!("no report_created among 50 deliveries");
    })
    .await
    .unwrap()
}

/// The `reported` event the host's client gets next (other messages skipped).
async fn reported(host: &mut Ws) -> Report {
    host.until(|m| match m {
        ServerMessage::Event(RoomEvent::Reported { report }) => Some(report.clone()),
        _ => None,
    })
    .await
}

fn listing(router: &str, room: &str) -> Vec<Report> {
    let (status, v) = call("GET", &format!("{router}/v1/rooms/{room}/reports"), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["room"], room, "{v}");
    serde_json::from_value(v["reports"].clone()).expect("reports as documented")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_report_speakers_and_hosts_webhooks_and_the_api_hear_of_it() {
    let mesh = RoleMesh::new("reports", 29_000);
    let hook_port = 29_050;
    let hooks = support::webhook_receiver(hook_port);
    let redis = redis_db(7);
    let _origin = mesh.origin(None);
    let _packager = mesh.packager();
    let _router = mesh.router_process(
        Some(&redis),
        &format!(
            "webhooks = [{{ url = \"http://127.0.0.1:{hook_port}/hooks\", secret = \"hook-secret\" }}]\n"
        ),
    );
    let _us = mesh.edge_process(0, "us-east", "");
    let (router, edge) = (mesh.router(), mesh.edge(0));
    mesh.wait_up(&[0], false, true).await;
    let CreatedRoom {
        room,
        host_token: host,
    } = create_room(&router, "reported");
    let (mut host, _) = Ws::join(&edge, &host).await.expect("host joins");
    let lis = mint_token(&router, &room, "listener", "Lis");
    let (mut lis, _) = Ws::join(&edge, &lis).await.expect("listener joins");
    let troll = mint_token(&router, &room, "listener", "Troll");
    let (mut troll, troll_snapshot) = Ws::join(&edge, &troll).await.expect("troll joins");
    let ServerMessage::Snapshot { you: troll_id, .. } = troll_snapshot else {
        unreachable!("join answers a snapshot")
    };

    // A speaker talks for two seconds (the program runs from its first packet), then leaves.
    let speaker = mint_token(&router, &room, "speaker", "Tone");
    support::publish_tone(&format!("{edge}/whip/{room}"), &speaker, 440.0, 2.0).await;
    let (speaker_user, troll_user) = {
        let mut users = (None, None);
        while users.0.is_none() || users.1.is_none() {
            host.until(|m| match m {
                ServerMessage::Event(RoomEvent::ParticipantJoined { participant }) => {
                    match participant.name.as_str() {
                        "Tone" => users.0 = Some(participant.user.clone()),
                        "Troll" => users.1 = Some(participant.user.clone()),
                        _ => {}
                    }
                    Some(())
                }
                _ => None,
            })
            .await;
        }
        (users.0.unwrap(), users.1.unwrap())
    };

    // The listener reports the speaker (gone by now): the host hears it live, stamped with
    // where the program was.
    lis.send(json!({
        "type": "report",
        "target": {"user": speaker_user},
        "reason": "harassment",
        "text": "insults during the Q&A",
    }))
    .await;
    let first = reported(&mut host).await;
    assert_eq!(first.target, ReportTarget::User(speaker_user.clone()));
    assert_eq!(
        (
            first.reason,
            first.text.as_str(),
            first.reporter_name.as_str()
        ),
        (ReportReason::Harassment, "insults during the Q&A", "Lis")
    );
    assert_eq!(first.room.to_string(), room);
    let program_ms = first
        .program_ms
        .expect("a program runs: a recording pointer");
    assert!(
        program_ms >= 1_000,
        "the tone played before: {program_ms} ms"
    );

    // A real receiver gets report_created with the report; the API lists it.
    let (hooks, hook) = next_report_hook(hooks).await;
    assert_eq!(hook["data"]["id"], first.id.as_str(), "{hook}");
    assert_eq!(
        hook["data"]["target"]["user"],
        speaker_user.as_str(),
        "{hook}"
    );
    assert_eq!(hook["data"]["program_ms"], program_ms, "{hook}");
    assert_eq!(listing(&router, &room), vec![first.clone()]);

    // The host kicks the troll; reporting the kicked user still lands.
    host.send(json!({"type": "kick", "target": troll_id})).await;
    host.until(|m| {
        matches!(m, ServerMessage::Event(RoomEvent::Kicked { id, .. }) if *id == troll_id)
            .then_some(())
    })
    .await;
    troll
        .until(|m| matches!(m, ServerMessage::Event(RoomEvent::Kicked { .. })).then_some(()))
        .await;
    lis.send(json!({"type": "report", "target": {"user": troll_user}, "reason": "spam"}))
        .await;
    let second = reported(&mut host).await;
    assert_eq!(second.target, ReportTarget::User(troll_user.clone()));
    let (hooks, hook) = next_report_hook(hooks).await;
    assert_eq!(hook["data"]["id"], second.id.as_str(), "{hook}");

    // A third report (the room) fits the budget of 3 a minute; a fourth is refused.
    lis.send(json!({"type": "report", "target": "room", "reason": "other", "text": "off topic"}))
        .await;
    let third = reported(&mut host).await;
    assert_eq!(third.target, ReportTarget::Room);
    lis.send(json!({"type": "report", "target": "room", "reason": "spam"}))
        .await;
    let code = lis
        .until(|m| match m {
            ServerMessage::Error { code, .. } => Some(code.clone()),
            _ => None,
        })
        .await;
    assert_eq!(code, "rate_limited");
    let (_hooks, hook) = next_report_hook(hooks).await;
    assert_eq!(hook["data"]["id"], third.id.as_str(), "{hook}");
    assert_eq!(
        listing(&router, &room),
        vec![third, second, first],
        "newest first"
    );
}
