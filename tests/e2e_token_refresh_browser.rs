//! The web client refreshes its token before it expires (headless Chromium, playwright-core):
//! joined with a token that expires in a few seconds, the room page mints a new one for the same
//! user through the router and hands it to the edge, so the edge does not end its session once the
//! first token is past its expiry and the grace. The browser side is `tests/browser/refresh.mjs`.

use amphi_testkit::mesh as support;

use amphi_protocol::token::{Claims, Role, TokenSigner};
use std::time::{SystemTime, UNIX_EPOCH};
use support::*;

const GRACE_SECS: u64 = 2;

#[test]
fn the_room_page_refreshes_its_token_before_it_expires() {
    let key = scratch_dir("refresh-browser-key").join("signing.pem");
    let signer = TokenSigner::generate("dev-1");
    std::fs::write(&key, signer.to_pkcs8_pem()).unwrap();
    let grace = GRACE_SECS.to_string();
    let mesh = DevMesh::start_with(
        8_000,
        "refresh-browser",
        &[
            "--signing-key",
            key.to_str().unwrap(),
            "--token-expiry-grace-secs",
            &grace,
        ],
    );
    let (room, _, _) = mesh.create_room("token refresh");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = signer.sign(&Claims {
        sub: "web-user-1".into(),
        name: "Wendy".into(),
        room: room.parse().unwrap(),
        role: Role::Listener,
        iat: now,
        exp: now + 10,
        jti: format!("web-{now}"),
    });

    let result = mesh.browser_result(
        "refresh.mjs",
        &[
            ("AMPHI_ROOM", &room),
            ("AMPHI_TOKEN", &token),
            ("AMPHI_GRACE_SECS", &grace),
        ],
    );
    eprintln!("token refresh result: {result}");
    assert_eq!(result["phase"], "joined", "{result}");
    assert!(result["closedReason"].is_null(), "{result}");
    assert!(result["refreshes"].as_u64().unwrap_or(0) >= 1, "{result}");
    assert!(
        result["exp"].as_u64().unwrap_or(0) > now + 3600,
        "the page lives on the minted token: {result}"
    );
}
