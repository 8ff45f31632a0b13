//! SIGTERM drains an edge end to end: `amphi edge` (its own process, registered with a geo-router
//! by heartbeats) gets SIGTERM while a WHIP speaker publishes through it. New routes avoid it, new
//! WHIP sessions get 503 `draining`, the speaker keeps being relayed to the origin, and the process
//! exits by itself once that session ends.

mod roles;
use amphi_testkit::mesh as support;

use roles::*;
use std::time::Duration;

fn registered(router: &str) -> Vec<serde_json::Value> {
    let (_, edges) = call("GET", &format!("{router}/v1/edges"), None);
    edges["edges"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_edge_and_it_exits_when_its_last_session_ends() {
    let mesh = RoleMesh::new("edge-sigterm", 27_400);
    let _origin = mesh.origin(None);
    let _router = mesh.router_process(None, "");
    let mut us = mesh.edge_process(0, "us-east", "drain_grace_secs = 120");
    let _eu = mesh.edge_process(1, "eu-west", "");
    let router = mesh.router();
    {
        let router = router.clone();
        tokio::task::spawn_blocking(move || {
            eventually("both edges registered", Duration::from_secs(30), || {
                let edges = registered(&router);
                (edges
                    .iter()
                    .filter(|e| e["healthy"] == true && e["available"] == true)
                    .count()
                    == 2)
                    .then_some(())
            })
        })
        .await
        .unwrap();
    }
    let room = create_room(&router, "sigterm").room;
    let token = |role: &str, name: &str| mint_token(&router, &room, role, name);
    let (speaker, late) = (token("speaker", "tone"), token("speaker", "late"));
    // The default region is us-east: unplaced clients go there.
    let (_, route) = call("GET", &format!("{router}/v1/route?room={room}"), None);
    assert_eq!(route["edge"], "edge-us-east", "{route}");
    let whip = route["whip_url"].as_str().unwrap().to_string();
    let publisher =
        tokio::spawn(async move { support::publish_tone(&whip, &speaker, 440.0, 10.0).await });
    let edge0 = mesh.edge(0);
    {
        let edge0 = edge0.clone();
        tokio::task::spawn_blocking(move || {
            eventually("the speaker is relayed", Duration::from_secs(10), || {
                (support::metric(&edge0, "amphi_edge_relay_frames_sent_total").unwrap_or(0.0)
                    >= 50.0)
                    .then_some(())
            })
        })
        .await
        .unwrap();
    }

    let sent_before = support::metric(&edge0, "amphi_edge_relay_frames_sent_total").unwrap();
    us.signal("TERM");

    // New routes avoid the draining edge (it says so in its next heartbeat).
    {
        let (router, room) = (router.clone(), room.clone());
        tokio::task::spawn_blocking(move || {
            eventually(
                "routes avoid the draining edge",
                Duration::from_secs(5),
                || {
                    let (status, v) = call("GET", &format!("{router}/v1/route?room={room}"), None);
                    (status == 200 && v["edge"] == "edge-eu-west").then_some(())
                },
            );
            let e = registered(&router)
                .into_iter()
                .find(|e| e["id"] == "edge-us-east")
                .expect("still listed");
            assert_eq!(
                (e["draining"].as_bool(), e["healthy"].as_bool()),
                (Some(true), Some(true)),
                "{e}"
            );
        })
        .await
        .unwrap();
    }
    // New sessions on it get 503 `draining`.
    let whip_url = format!("{edge0}/whip/{room}");
    let refusal = tokio::task::spawn_blocking(move || {
        match ureq::post(&whip_url)
            .set("Content-Type", "application/sdp")
            .set("Authorization", &format!("Bearer {late}"))
            .timeout(Duration::from_secs(5))
            .send_string("v=0\r\n")
        {
            Err(ureq::Error::Status(code, r)) => {
                (code, r.into_json::<serde_json::Value>().unwrap())
            }
            Ok(r) => panic!("a draining edge took a new session: {}", r.status()),
            Err(e) => panic!("WHIP POST failed: {e}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(
        (refusal.0, refusal.1["error"].as_str()),
        (503, Some("draining")),
        "{refusal:?}"
    );
    assert!(us.running(), "the edge must wait for its session");

    // The speaker keeps going through the draining edge; when it hangs up, the edge exits.
    publisher.await.expect("publisher finished cleanly");
    let sent_after = support::metric(&edge0, "amphi_edge_relay_frames_sent_total").unwrap_or(0.0);
    assert!(
        sent_after - sent_before >= 200.0,
        "the draining edge stopped relaying: {sent_before} -> {sent_after}"
    );
    let status = tokio::task::spawn_blocking(move || {
        let s = us.wait_exit(Duration::from_secs(30));
        (s, us.log_text())
    })
    .await
    .unwrap();
    let (exit, log) = status;
    let exit = exit.unwrap_or_else(|| panic!("the drained edge did not exit; log:\n{log}"));
    assert!(exit.success(), "{exit:?}; log:\n{log}");
    assert!(log.contains("drained"), "{log}");
}
