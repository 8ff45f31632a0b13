//! `docs/signaling.md` stays true: every JSON example parses as the type its block names
//! (`json client` = `ClientMessage`, `json server` = `ServerMessage`, `json control` =
//! `ControlMessage`), and every field it shows survives a round trip (no misspelled fields,
//! which serde would silently ignore).

use amphi_protocol::control::ControlMessage;
use amphi_protocol::room::{ClientMessage, ServerMessage};
use serde_json::Value;

/// Every key and value of `doc` is in `actual` (which may have more keys, e.g. defaults).
fn covered(doc: &Value, actual: &Value, path: &str) -> Result<(), String> {
    match (doc, actual) {
        (Value::Object(d), Value::Object(a)) => {
            for (k, v) in d {
                let Some(av) = a.get(k) else {
                    return Err(format!("{path}.{k} is not a field"));
                };
                covered(v, av, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(d), Value::Array(a)) if d.len() == a.len() => d
            .iter()
            .zip(a)
            .enumerate()
            .try_for_each(|(i, (d, a))| covered(d, a, &format!("{path}[{i}]"))),
        (d, a) if d == a => Ok(()),
        (d, a) => Err(format!("{path}: documented {d}, serialized {a}")),
    }
}

fn check<T: serde::de::DeserializeOwned + serde::Serialize>(json: &str) -> Result<(), String> {
    let doc: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let parsed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&parsed).map_err(|e| e.to_string())?;
    covered(&doc, &back, "$")
}

#[test]
fn every_documented_message_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/signaling.md");
    let text = std::fs::read_to_string(path).expect("docs/signaling.md");
    let mut types: [std::collections::BTreeSet<String>; 3] = Default::default();
    let mut lines = text.lines();
    let mut failures = Vec::new();
    while let Some(line) = lines.next() {
        let kind = match line.trim() {
            "```json client" => 0,
            "```json server" => 1,
            "```json control" => 2,
            l if l.starts_with("```json") => panic!("untyped JSON block: {l}"),
            _ => continue,
        };
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        let json = body.join("\n");
        let result = match kind {
            0 => check::<ClientMessage>(&json).and_then(|()| {
                ClientMessage::parse(&json)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
            1 => check::<ServerMessage>(&json),
            _ => check::<ControlMessage>(&json),
        };
        if let Err(e) = result {
            failures.push(format!("{json}\n  -> {e}"));
        }
        if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(&json) {
            if let Some(Value::String(t)) = o.get("type") {
                types[kind].insert(t.clone());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "bad examples:\n{}",
        failures.join("\n")
    );
    // Every client message type and every server message/event type has an example.
    let expect = |names: &[&str]| -> std::collections::BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    };
    assert_eq!(
        types[0],
        expect(&[
            "join",
            "offer",
            "raise_hand",
            "lower_hand",
            "promote",
            "demote",
            "mute",
            "unmute",
            "kick",
            "end",
            "chat",
            "react",
            "ping",
            "refresh_token",
            "list_participants",
            "report",
            "listening"
        ])
    );
    assert_eq!(
        types[1],
        expect(&[
            "snapshot",
            "answer",
            "active_speakers",
            "error",
            "pong",
            "participant_joined",
            "participant_left",
            "role_changed",
            "hand_raised",
            "hand_lowered",
            "muted",
            "unmuted",
            "chat",
            "reaction",
            "kicked",
            "ended",
            "counts",
            "participant",
            "participants",
            "token_refreshed",
            "reported",
            "move"
        ])
    );
    assert_eq!(
        types[2],
        expect(&[
            "subscribe_room",
            "subscribe_program",
            "unsubscribe_program",
            "room_command",
            "room_events",
            "room_snapshot",
            "room_snapshot_part",
            "command_rejected",
            "room_ended",
            "revoke_token",
            "reported"
        ])
    );
}
