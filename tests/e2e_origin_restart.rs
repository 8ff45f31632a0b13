//! Durable room state: an origin (its own process, room state in a real Redis) is killed with
//! SIGKILL mid-room and started again. The room, its roles, hand queue and bans are intact; the
//! edges reconnect and re-announce their participants; a speaker publishing through one edge is
//! heard again through the origin's relay at the other edge. Token revocations reach edges that
//! connect later, also through an origin restarted since.

mod roles;
use amphi_testkit::mesh as support;

use amphi_protocol::room::{RoomEvent, RoomRole, RoomState, ServerMessage};
use amphi_protocol::ParticipantId;
use roles::*;
use std::time::Duration;

fn snapshot(m: ServerMessage) -> (ParticipantId, RoomState) {
    match m {
        ServerMessage::Snapshot { you, state, .. } => (you, state),
        other => panic!("not a snapshot: {other:?}"),
    }
}

fn edge_connected(edge: &str) -> bool {
    support::metric(edge, "amphi_edge_origin_connected").unwrap_or(0.0) >= 1.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_origin_keeps_its_rooms_roles_hands_and_bans() {
    let redis = redis_db(4);
    let mesh = RoleMesh::new("origin-restart", 27_300);
    let mut origin = mesh.origin(Some(&redis));
    let _router = mesh.router_process(None, "");
    let _us = mesh.edge_process(0, "us-east", "");
    let _eu = mesh.edge_process(1, "eu-west", "");
    let (router, us, eu) = (mesh.router(), mesh.edge(0), mesh.edge(1));
    mesh.wait_up(&[0, 1], false, false).await;

    let CreatedRoom { room, host_token } = create_room(&router, "durable");
    let token = |role: &str, name: &str| mint_token(&router, &room, role, name);
    let (bob_t, alice_t, carol_t, troll_t, spk_t, dave_t) = (
        token("listener", "bob"),
        token("listener", "alice"),
        token("listener", "carol"),
        token("listener", "troll"),
        token("speaker", "spk"),
        token("listener", "dave"),
    );

    // The host on us-east; listeners on eu-west.
    let (mut host, snap) = Ws::join(&us, &host_token).await.expect("host joins");
    let (host_id, _) = snapshot(snap);
    let (mut bob, snap) = Ws::join(&eu, &bob_t).await.expect("bob joins");
    let (bob_id, _) = snapshot(snap);
    let (mut alice, snap) = Ws::join(&eu, &alice_t).await.expect("alice joins");
    let (alice_id, _) = snapshot(snap);
    let (_carol, snap) = Ws::join(&eu, &carol_t).await.expect("carol joins");
    let (carol_id, _) = snapshot(snap);
    let (_troll, snap) = Ws::join(&eu, &troll_t).await.expect("troll joins");
    let (troll_id, _) = snapshot(snap);
    bob.send(serde_json::json!({"type": "raise_hand"})).await;
    host.until(|m| {
        matches!(m, ServerMessage::Event(RoomEvent::HandRaised { id }) if *id == bob_id)
            .then_some(())
    })
    .await;
    alice.send(serde_json::json!({"type": "raise_hand"})).await;
    host.until(|m| {
        matches!(m, ServerMessage::Event(RoomEvent::HandRaised { id }) if *id == alice_id)
            .then_some(())
    })
    .await;
    host.send(serde_json::json!({"type": "promote", "target": carol_id.0}))
        .await;
    host.until(|m| {
        matches!(m, ServerMessage::Event(RoomEvent::RoleChanged { id, .. }) if *id == carol_id)
            .then_some(())
    })
    .await;
    host.send(serde_json::json!({"type": "kick", "target": troll_id.0}))
        .await;
    host.until(|m| {
        matches!(m, ServerMessage::Event(RoomEvent::ParticipantLeft { id }) if *id == troll_id)
            .then_some(())
    })
    .await;

    // A speaker publishes through us-east for the whole test; eu-west hears it via the origin.
    let whip = format!("{us}/whip/{room}");
    let publisher =
        tokio::spawn(async move { support::publish_tone(&whip, &spk_t, 440.0, 120.0).await });
    let relayed =
        |edge: &str| support::metric(edge, "amphi_edge_relay_frames_received_total").unwrap_or(0.0);
    {
        let eu = eu.clone();
        tokio::task::spawn_blocking(move || {
            let start = relayed(&eu);
            eventually("eu-west hears the speaker", Duration::from_secs(15), || {
                (relayed(&eu) - start >= 50.0).then_some(())
            })
        })
        .await
        .unwrap();
    }
    let (_, before) = snapshot(
        Ws::join(&us, &dave_t)
            .await
            .map(|(_, s)| s)
            .expect("dave joins"),
    );
    assert_eq!(before.hands, vec![bob_id, alice_id]);
    assert_eq!(before.banned.len(), 1);

    // Crash the origin and start it again at once (the edges' next packets to the old
    // connection meet a stateless reset; they reconnect and re-announce).
    origin.signal("KILL");
    origin
        .wait_exit(Duration::from_secs(5))
        .expect("origin died");
    let restarted = mesh.origin(Some(&redis));
    mesh.wait_edges_on_origin("edges reconnect to the new origin")
        .await;

    // The speaker is heard again at eu-west, through the restarted origin.
    {
        let eu = eu.clone();
        tokio::task::spawn_blocking(move || {
            let start = relayed(&eu);
            eventually(
                "eu-west hears the speaker again",
                Duration::from_secs(20),
                || (relayed(&eu) - start >= 100.0).then_some(()),
            )
        })
        .await
        .unwrap();
    }

    // A new participant sees the same room: everyone, the roles, the hand queue in order, the ban.
    let (mut erin, snap) = Ws::join(&eu, &token("listener", "erin"))
        .await
        .expect("erin joins after the restart");
    let (erin_id, after) = snapshot(snap);
    let role = |s: &RoomState, id: ParticipantId| {
        s.participants
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.role)
            .unwrap_or_else(|| panic!("{id} missing from {s:?}"))
    };
    assert_eq!(role(&after, host_id), RoomRole::Host);
    assert_eq!(role(&after, carol_id), RoomRole::Speaker);
    assert_eq!(role(&after, bob_id), RoomRole::Listener);
    assert_eq!(role(&after, erin_id), RoomRole::Listener);
    assert_eq!(after.hands, vec![bob_id, alice_id], "hand queue intact");
    assert_eq!(after.banned, before.banned, "bans intact");
    assert!(after.participants.iter().all(|p| p.id != troll_id));
    let speakers = after
        .participants
        .iter()
        .filter(|p| p.role == RoomRole::Speaker)
        .count();
    assert_eq!(speakers, 2, "carol and the WHIP speaker: {after:?}");
    // The banned user is still refused.
    assert_eq!(
        Ws::join(&eu, &troll_t).await.err().as_deref(),
        Some("banned")
    );
    // The restored authority still takes commands: the host lowers bob's hand.
    host.send(serde_json::json!({"type": "lower_hand", "target": bob_id.0}))
        .await;
    erin.until(|m| {
        matches!(m, ServerMessage::Event(RoomEvent::HandLowered { id }) if *id == bob_id)
            .then_some(())
    })
    .await;
    assert!(
        restarted
            .log_text()
            .contains("room restored from the store"),
        "{}",
        restarted.log_text()
    );
    publisher.abort();
}

/// A token revoked through the router is refused by an edge that connects afterwards (the origin
/// re-sends its revocations to a new edge), and by an edge that connects to an origin restarted
/// since (the restarted origin knows nothing: the router re-sends them when its link comes back).
#[test]
fn token_revocations_reach_edges_that_connect_later_and_survive_an_origin_restart() {
    let mesh = RoleMesh::new("revocation-resend", 27_200);
    let mut origin = mesh.origin(None);
    let _router = mesh.router_process(None, "");
    let _us = mesh.edge_process(0, "us-east", "");
    let (router, us, eu, west) = (mesh.router(), mesh.edge(0), mesh.edge(1), mesh.edge(2));
    eventually("mesh up", Duration::from_secs(30), || {
        (support::get_status(&format!("{router}/healthz")) == 200 && edge_connected(&us))
            .then_some(())
    });
    let token = mesh.token("00000000000000aa", amphi_protocol::token::Role::Listener);
    let refused = |edge: &str| {
        let (status, v) = call("GET", &format!("{edge}/v1/ws?token={token}"), None);
        status == 401 && v["error"] == "token_revoked"
    };
    assert!(!refused(&us));
    let (status, v) = call(
        "POST",
        &format!("{router}/v1/tokens/revoke"),
        Some(serde_json::json!({ "token": token })),
    );
    assert_eq!((status, v["revoked"].as_bool()), (200, Some(true)), "{v}");
    eventually("us-east refuses the token", Duration::from_secs(10), || {
        refused(&us).then_some(())
    });

    // An edge that connects afterwards hears it from the origin.
    let _eu = mesh.edge_process(1, "eu-west", "");
    eventually("eu-west refuses the token", Duration::from_secs(30), || {
        (edge_connected(&eu) && refused(&eu)).then_some(())
    });

    // The origin restarts empty; an edge that only ever knew the restarted origin refuses the
    // token too.
    origin.signal("KILL");
    origin
        .wait_exit(Duration::from_secs(5))
        .expect("origin died");
    let _restarted = mesh.origin(None);
    let _west = mesh.edge_process(2, "us-west", "");
    eventually("us-west refuses the token", Duration::from_secs(40), || {
        (edge_connected(&west) && refused(&west)).then_some(())
    });
}
