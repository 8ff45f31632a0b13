//! Hostile token holders against real processes: a kicked user cannot come back (its other
//! sessions on every edge end, its old token and any fresh token for the same application user
//! are refused), one token cannot open more sessions than the per-user cap, chat budgets follow
//! the user rather than the session, and the production geo-router's API keys are scoped and
//! their signed requests cannot be replayed.

mod roles;
use amphi_testkit::mesh as support;

use amphi_protocol::room::{RoomEvent, ServerMessage};
use amphi_protocol::token::{Claims, TokenSigner};
use amphi_protocol::ParticipantId;
use roles::{RoleMesh, Ws};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::*;

/// Sessions one user may hold in a room in the dev mesh of these tests.
const CAP: usize = 4;

/// `POST {router}/v1/rooms/{room}/tokens` in dev mode: (status, body).
fn mint(router: &str, room: &str, user: &str) -> (u16, serde_json::Value) {
    roles::call(
        "POST",
        &format!("{router}/v1/rooms/{room}/tokens"),
        Some(serde_json::json!({"role": "listener", "name": user, "user_id": user})),
    )
}

/// The claims of `token`, verified with the signing key in `key` (kid `kid`).
fn claims(key: &std::path::Path, kid: &str, token: &str) -> Claims {
    let pem = std::fs::read_to_string(key).unwrap();
    TokenSigner::from_pkcs8_pem(kid, &pem)
        .unwrap()
        .verifier()
        .verify(token, now_unix())
        .expect("a valid token")
}

/// The participant id a snapshot assigns.
fn you(snapshot: &ServerMessage) -> ParticipantId {
    match snapshot {
        ServerMessage::Snapshot { you, .. } => *you,
        other => panic!("not a snapshot: {other:?}"),
    }
}

/// (status, code) of a WebSocket request with `token` that is not upgraded (the edge checks the
/// token before the upgrade).
fn ws_status(edge: &str, token: &str) -> (u16, String) {
    let (status, body) = roles::call("GET", &format!("{edge}/v1/ws?token={token}"), None);
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

/// Read until the server closes the session; the events seen before.
async fn until_closed(ws: &mut Ws) -> Vec<ServerMessage> {
    let mut seen = Vec::new();
    while let Some(m) = ws.next().await {
        seen.push(m);
        assert!(seen.len() < 200, "the session was never closed");
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicked_users_stay_out_and_one_token_cannot_flood_a_room() {
    let key = scratch_dir("hostile-identity-key").join("signing.pem");
    std::fs::write(&key, TokenSigner::generate("dev-1").to_pkcs8_pem()).unwrap();
    let cap = CAP.to_string();
    let mesh = tokio::task::spawn_blocking({
        let key = key.clone();
        move || {
            DevMesh::start_with(
                22_500,
                "hostile-identity",
                &[
                    "--signing-key",
                    key.to_str().unwrap(),
                    "--max-sessions-per-user",
                    &cap,
                ],
            )
        }
    })
    .await
    .unwrap();
    let router = mesh.router();
    let (edge0, edge1) = (mesh.edge(0), mesh.edge(1));
    let (room, host_token, _) = mesh.create_room("hostile identity");
    let (mut host, _) = Ws::join(&edge0, &host_token).await.expect("host joins");

    // The token carries the application's user id.
    let (status, v) = mint(&router, &room, "mallory");
    assert_eq!(status, 200, "{v}");
    let first = v["token"].as_str().unwrap().to_string();
    assert_eq!(claims(&key, "dev-1", &first).sub, "mallory");
    let second = mint(&router, &room, "mallory").1["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(
        claims(&key, "dev-1", &first).jti,
        claims(&key, "dev-1", &second).jti
    );
    // Mallory holds a session on each edge, each with its own token.
    let (mut m0, snap) = Ws::join(&edge0, &first)
        .await
        .expect("mallory joins edge 0");
    let target = you(&snap);
    let (mut m1, _) = Ws::join(&edge1, &second)
        .await
        .expect("mallory joins edge 1");

    // The host kicks one of them: both sessions end, on both edges.
    host.send(serde_json::json!({"type": "kick", "target": target}))
        .await;
    for (edge, ws) in [("edge 0", &mut m0), ("edge 1", &mut m1)] {
        let seen = tokio::time::timeout(Duration::from_secs(15), until_closed(ws))
            .await
            .unwrap_or_else(|_| panic!("mallory's session on {edge} did not end"));
        assert!(
            seen.iter()
                .any(|m| matches!(m, ServerMessage::Event(RoomEvent::Kicked { .. }))),
            "{edge}: {seen:?}"
        );
    }

    // The router mints nothing more for mallory in this room (it heard the revocation).
    let refused = roles::eventually("mint refused", Duration::from_secs(10), || {
        let (status, v) = mint(&router, &room, "mallory");
        (status != 200).then_some((status, v))
    });
    assert_eq!(refused.0, 403, "{}", refused.1);
    assert_eq!(refused.1["error"], "user_banned");
    // Both old tokens are refused by both edges before any upgrade (revoked).
    for edge in [&edge0, &edge1] {
        for token in [&first, &second] {
            assert_eq!(ws_status(edge, token), (401, "token_revoked".into()));
        }
    }
    // A fresh token for the same application user, signed with the real key (as a second
    // router replica or `amphi token mint` would), is refused too.
    let fresh = amphi(&[
        "token",
        "mint",
        "--key",
        key.to_str().unwrap(),
        "--kid",
        "dev-1",
        "--room",
        &room,
        "--role",
        "listener",
        "--name",
        "Mallory again",
        "--user",
        "mallory",
    ]);
    let fresh = fresh.trim();
    assert_eq!(claims(&key, "dev-1", fresh).sub, "mallory");
    assert_eq!(ws_status(&edge1, fresh), (401, "token_revoked".into()));
    // Other users still join.
    let carol = mint(&router, &room, "carol").1["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (mut carol_ws, _) = Ws::join(&edge1, &carol).await.expect("carol joins");

    // 600 joins from one token: the first CAP are admitted, every other one is refused.
    let flood = mint(&router, &room, "flooder").1["token"]
        .as_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    let (mut held, mut refused_codes) = (Vec::new(), Vec::new());
    for i in 0..600 {
        let edge = if i % 2 == 0 { &edge0 } else { &edge1 };
        match Ws::join(edge, &flood).await {
            Ok((ws, _)) => held.push(ws),
            Err(code) => refused_codes.push(code),
        }
    }
    eprintln!(
        "600 joins from one token: {} admitted, {} refused in {:?}",
        held.len(),
        refused_codes.len(),
        started.elapsed()
    );
    assert_eq!(held.len(), CAP);
    assert!(
        refused_codes.iter().all(|c| c == "limit"),
        "{:?}",
        refused_codes.iter().find(|c| *c != "limit")
    );
    // The room kept working for others: carol chats and the host hears it.
    carol_ws
        .send(serde_json::json!({"type": "chat", "text": "still here"}))
        .await;
    host.until(|m| match m {
        ServerMessage::Event(RoomEvent::Chat { text, .. }) if text == "still here" => Some(()),
        _ => None,
    })
    .await;

    // Chat budget per user: the flooder's sessions share one budget of 5 messages per 10 s
    // (each session alone stays within its own).
    for (i, ws) in held.iter_mut().enumerate() {
        for j in 0..2 {
            ws.send(serde_json::json!({"type": "chat", "text": format!("spam {i}.{j}")}))
                .await;
        }
    }
    let heard = drain_chats(&mut host, "spam").await;
    assert_eq!(
        heard, 5,
        "one user with {CAP} sessions sent {} chat messages in one window",
        heard
    );
    drop(mesh);
}

/// Chat messages starting with `prefix` a client receives within two seconds of quiet.
async fn drain_chats(ws: &mut Ws, prefix: &str) -> usize {
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            Ok(Some(ServerMessage::Event(RoomEvent::Chat { text, .. })))
                if text.starts_with(prefix) =>
            {
                n += 1
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    n
}

/// A signed request to the production router: (status, body).
fn signed(
    router: &str,
    method: &str,
    path: &str,
    body: &str,
    key: (&str, &str),
    ts: u64,
) -> (u16, serde_json::Value) {
    let sig = amphi_geo_router::auth::sign(key.1, ts, method, path, body.as_bytes());
    let req = ureq::request(method, &format!("{router}{path}"))
        .timeout(Duration::from_secs(5))
        .set(amphi_geo_router::auth::KEY_HEADER, key.0)
        .set(amphi_geo_router::auth::TIMESTAMP_HEADER, &ts.to_string())
        .set(amphi_geo_router::auth::SIGNATURE_HEADER, &sig)
        .set("content-type", "application/json");
    let resp = if body.is_empty() {
        req.call()
    } else {
        req.send_string(body)
    };
    match resp {
        Ok(r) => (r.status(), r.into_json().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn production_api_keys_are_scoped_and_signed_requests_are_not_replayable() {
    let mesh = RoleMesh::new("hostile-identity-keys", 26_700);
    let (edge_key, app_key, admin_key) = (
        ("edge-key", "edge-secret"),
        ("app-key", "app-secret"),
        ("admin-key", "admin-secret"),
    );
    let mut keys = String::new();
    for ((id, secret), scope) in [(edge_key, "edge"), (app_key, "app"), (admin_key, "admin")] {
        keys.push_str(&format!(
            "\n[[router.api_keys]]\nid = {id:?}\nsecret = {secret:?}\nscope = {scope:?}\n"
        ));
    }
    let _router = mesh.router_process_mode(None, &keys, false);
    let router = mesh.router();
    roles::eventually("router up", Duration::from_secs(30), || {
        (get_status(&format!("{router}/healthz")) == 200).then_some(())
    });

    // The edge key cannot create rooms; the app key can.
    let body = r#"{"title":"scoped"}"#;
    let (status, v) = signed(&router, "POST", "/v1/rooms", body, edge_key, now_unix());
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("api_key_scope")),
        "{v}"
    );
    let (status, created) = signed(&router, "POST", "/v1/rooms", body, app_key, now_unix());
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap();
    let path = format!("/v1/rooms/{room}/tokens");

    // An edge-scoped key cannot mint.
    let mint_body = r#"{"role":"listener","name":"Ann","user_id":"app-user-42"}"#;
    let (status, v) = signed(&router, "POST", &path, mint_body, edge_key, now_unix());
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("api_key_scope")),
        "{v}"
    );
    // Production callers must name the user.
    let (status, v) = signed(
        &router,
        "POST",
        &path,
        r#"{"role":"listener","name":"Ann"}"#,
        app_key,
        now_unix(),
    );
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("missing_user_id")),
        "{v}"
    );
    let (status, v) = signed(
        &router,
        "POST",
        &path,
        r#"{"role":"listener","name":"Ann","user_id":"has space"}"#,
        app_key,
        now_unix(),
    );
    assert_eq!(status, 400, "{v}");
    // The app key mints a token carrying the user id.
    let ts = now_unix();
    let (status, v) = signed(&router, "POST", &path, mint_body, app_key, ts);
    assert_eq!(status, 200, "{v}");
    let minted = v["token"].as_str().unwrap().to_string();
    assert_eq!(
        claims(
            &mesh.dir.join("signing.pem"),
            "k1",
            v["token"].as_str().unwrap()
        )
        .sub,
        "app-user-42"
    );
    // The same signed request again (captured and replayed) is refused.
    let (status, v) = signed(&router, "POST", &path, mint_body, app_key, ts);
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("replayed_request")),
        "{v}"
    );

    // Revoking a token takes the app key (an edge key cannot), without a key nothing.
    let revoke = serde_json::json!({ "token": minted }).to_string();
    let (status, v) = roles::call(
        "POST",
        &format!("{router}/v1/tokens/revoke"),
        Some(serde_json::json!({ "token": minted })),
    );
    assert_eq!(status, 401, "{v}");
    let (status, v) = signed(
        &router,
        "POST",
        "/v1/tokens/revoke",
        &revoke,
        edge_key,
        now_unix(),
    );
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("api_key_scope")),
        "{v}"
    );
    let (status, v) = signed(
        &router,
        "POST",
        "/v1/tokens/revoke",
        &revoke,
        app_key,
        now_unix(),
    );
    assert_eq!((status, v["revoked"].as_bool()), (200, Some(true)), "{v}");

    // Operator requests need the admin key.
    for key in [edge_key, app_key] {
        let (status, v) = signed(&router, "GET", "/v1/edges", "", key, now_unix());
        assert_eq!(
            (status, v["error"].as_str()),
            (403, Some("api_key_scope")),
            "{v}"
        );
    }
    let (status, v) = signed(&router, "GET", "/v1/edges", "", admin_key, now_unix());
    assert_eq!(status, 200, "{v}");
}

/// A token signed with the dev mesh's key for `user` in `room`, expiring `ttl` seconds from now.
fn sign(key: &std::path::Path, room: &str, user: &str, ttl: u64) -> String {
    let pem = std::fs::read_to_string(key).unwrap();
    let now = now_unix();
    TokenSigner::from_pkcs8_pem("dev-1", &pem)
        .unwrap()
        .sign(&Claims {
            sub: user.into(),
            name: user.into(),
            room: room.parse().unwrap(),
            role: amphi_protocol::token::Role::Listener,
            iat: now,
            exp: now + ttl,
            jti: format!("{user}-{}", rand_jti()),
        })
}

fn rand_jti() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Read until the server closes the session; the code of the last `error` event before it.
async fn closing_error(ws: &mut Ws) -> Option<String> {
    let seen = until_closed(ws).await;
    seen.iter().rev().find_map(|m| match m {
        ServerMessage::Error { code, .. } => Some(code.clone()),
        _ => None,
    })
}

/// A single token revoked through the router is refused by every edge and its open session is
/// closed, while the same user's other token keeps working; a session whose token expires is
/// closed after the edge's grace unless it refreshed its token first (and a refresh must keep
/// the user).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_tokens_end_their_sessions() {
    let key = scratch_dir("token-lifetime-key").join("signing.pem");
    std::fs::write(&key, TokenSigner::generate("dev-1").to_pkcs8_pem()).unwrap();
    let mesh = tokio::task::spawn_blocking({
        let key = key.clone();
        move || {
            DevMesh::start_with(
                9_000,
                "token-lifetime",
                &[
                    "--signing-key",
                    key.to_str().unwrap(),
                    "--token-expiry-grace-secs",
                    "2",
                ],
            )
        }
    })
    .await
    .unwrap();
    let router = mesh.router();
    let (edge0, edge1) = (mesh.edge(0), mesh.edge(1));
    let (room, _host_token, _) = mesh.create_room("token lifetime");

    // Revocation of one token: its session on edge 1 is closed; the user's other token works.
    let doomed = mint(&router, &room, "trent").1["token"]
        .as_str()
        .unwrap()
        .to_string();
    let spare = mint(&router, &room, "trent").1["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (mut doomed_ws, _) = Ws::join(&edge1, &doomed).await.expect("trent joins");
    let (mut spare_ws, _) = Ws::join(&edge0, &spare).await.expect("trent joins again");
    let (status, v) = roles::call(
        "POST",
        &format!("{router}/v1/tokens/revoke"),
        Some(serde_json::json!({ "token": doomed })),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["revoked"], true, "{v}");
    assert_eq!(v["jti"], claims(&key, "dev-1", &doomed).jti.as_str());
    let code = tokio::time::timeout(Duration::from_secs(15), closing_error(&mut doomed_ws))
        .await
        .expect("the revoked token's session was not closed");
    assert_eq!(code.as_deref(), Some("token_revoked"));
    for edge in [&edge0, &edge1] {
        // Every edge hears it from the origin (edge 1 already did).
        let refused = roles::eventually("revoked token refused", Duration::from_secs(10), || {
            let s = ws_status(edge, &doomed);
            (s.0 != 101 && s.1 == "token_revoked").then_some(s)
        });
        assert_eq!(refused, (401, "token_revoked".into()));
    }
    spare_ws.send(serde_json::json!({"type": "ping"})).await;
    spare_ws
        .until(|m| matches!(m, ServerMessage::Pong).then_some(()))
        .await;
    // By jti too (the application kept only the id), answered with what was stored.
    let jti = claims(&key, "dev-1", &spare).jti;
    let (status, v) = roles::call(
        "POST",
        &format!("{router}/v1/tokens/revoke"),
        Some(serde_json::json!({ "jti": jti })),
    );
    assert_eq!((status, v["revoked"].as_bool()), (200, Some(true)), "{v}");
    let code = tokio::time::timeout(Duration::from_secs(15), closing_error(&mut spare_ws))
        .await
        .expect("the session of the token revoked by jti was not closed");
    assert_eq!(code.as_deref(), Some("token_revoked"));

    // Expiry: three sessions on tokens that expire in a few seconds. One refreshes to a longer
    // token of the same user, one tries another user's token (refused), one does nothing.
    let (mut stays, _) = Ws::join(&edge0, &sign(&key, &room, "uma", 5))
        .await
        .expect("uma joins");
    let (mut lapses, _) = Ws::join(&edge0, &sign(&key, &room, "vic", 5))
        .await
        .expect("vic joins");
    let (mut cheats, _) = Ws::join(&edge1, &sign(&key, &room, "wes", 5))
        .await
        .expect("wes joins");
    stays
        .send(serde_json::json!({"type": "refresh_token", "token": sign(&key, &room, "uma", 600)}))
        .await;
    let exp = stays
        .until(|m| match m {
            ServerMessage::TokenRefreshed { exp } => Some(*exp),
            ServerMessage::Error { code, message } => panic!("refresh refused: {code} {message}"),
            _ => None,
        })
        .await;
    assert!(exp > now_unix() + 500);
    cheats
        .send(serde_json::json!({"type": "refresh_token", "token": sign(&key, &room, "uma", 600)}))
        .await;
    let refused = cheats
        .until(|m| match m {
            ServerMessage::Error { code, .. } => Some(code.clone()),
            ServerMessage::TokenRefreshed { .. } => panic!("another user's token was taken"),
            _ => None,
        })
        .await;
    assert_eq!(refused, "forbidden");
    // The unrefreshed sessions are closed once their token is past the grace...
    for (who, ws) in [("vic", &mut lapses), ("wes", &mut cheats)] {
        let code = tokio::time::timeout(Duration::from_secs(20), closing_error(ws))
            .await
            .unwrap_or_else(|_| panic!("{who}'s expired session was not closed"));
        assert_eq!(code.as_deref(), Some("token_expired"), "{who}");
    }
    // ...and the refreshed one, whose first token expired with theirs, still answers.
    stays.send(serde_json::json!({"type": "ping"})).await;
    stays
        .until(|m| matches!(m, ServerMessage::Pong).then_some(()))
        .await;
    drop(mesh);
}
