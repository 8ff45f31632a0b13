//! A room past the size where the origin's join snapshot no longer fit one 64 KiB control record
//! (about 400–600 participants; the edge then dropped its origin link and every participant it
//! held, in every room): `amphi loadgen room --smoke` joins 800 WebSocket participants and 4 WebRTC
//! listeners over two edges of an `amphi dev` child, raises hands, promotes, kicks, chats and pages
//! through the listener list, and fails on any origin link drop or lost participant.

use std::process::Command;

#[test]
fn an_800_participant_room_joins_moderates_and_chats_without_a_link_drop() {
    let out = Command::new(env!("CARGO_BIN_EXE_amphi"))
        .args(["loadgen", "room", "--smoke", "--port-offset", "23700"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run amphi loadgen room");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "loadgen room failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("OK: no link drop"), "{stdout}");
}
