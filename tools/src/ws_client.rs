//! The bed's WebSocket clients over `wss://` (trusting the bed CA): `amphi-tools ws`, a
//! signaling client that joins, sends the given client messages in order, stays connected for a
//! while and reports what it saw; and `amphi-tools push-listen`, a push listener that reports
//! the audio it received.

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Replace every string `"@name"` in `msg` by the id of the participant called `name` in the
/// room snapshot `state`.
pub fn resolve(msg: &mut Value, state: &Value) -> Result<()> {
    match msg {
        Value::String(s) if s.starts_with('@') => {
            let name = &s[1..];
            let id = state["participants"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .map(|p| p["id"].clone())
                .with_context(|| format!("no participant named {name} in {state}"))?;
            *msg = id;
        }
        Value::Object(m) => {
            for v in m.values_mut() {
                resolve(v, state)?;
            }
        }
        Value::Array(a) => {
            for v in a {
                resolve(v, state)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A WebSocket over TLS to `ws_url` (`wss://host:port/path`) with `?{query}`, trusting `ca`.
async fn connect(
    ws_url: &str,
    query: &str,
    ca: &Path,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
> {
    let rest = ws_url
        .strip_prefix("wss://")
        .with_context(|| format!("not a wss:// URL: {ws_url}"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .with_context(|| format!("no port in {ws_url}"))?;
    let port: u16 = port.parse()?;
    let mut tls = amphi_protocol::https::client_tls_config(Some(ca))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .context("TLS to the edge")?;
    let (ws, _) = tokio_tungstenite::client_async(format!("{ws_url}?{query}"), stream)
        .await
        .context("WebSocket upgrade")?;
    Ok(ws)
}

/// Join the signaling WebSocket `ws_url` with `token`, send `send` (JSON client messages;
/// `"@name"` strings become that participant's id) 300 ms apart, stay `seconds`, and report: the
/// edge's answer to the join (`snapshot` or `error`), every later server message, and whether
/// the edge closed the socket.
pub async fn session(
    ws_url: &str,
    token: &str,
    ca: &Path,
    send: &[String],
    seconds: f64,
) -> Result<Value> {
    let mut ws = connect(ws_url, &format!("token={token}"), ca).await?;
    ws.send(Message::Text(r#"{"type":"join"}"#.into())).await?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut answer = Value::Null;
    let mut events = Vec::new();
    let mut closed = false;
    let mut queue: Vec<Value> = send
        .iter()
        .map(|s| serde_json::from_str(s).with_context(|| format!("bad --send {s}")))
        .collect::<Result<_>>()?;
    queue.reverse();
    let mut next_send = Instant::now();
    let mut ping = tokio::time::interval(Duration::from_secs(5));
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wake = if answer["type"] == "snapshot" && !queue.is_empty() {
            next_send.min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {
                if answer["type"] == "snapshot" {
                    if let Some(mut m) = queue.pop() {
                        resolve(&mut m, &answer["state"])?;
                        ws.send(Message::Text(m.to_string().into())).await?;
                        next_send = Instant::now() + Duration::from_millis(300);
                    }
                }
            }
            _ = ping.tick() => {
                let _ = ws.send(Message::Text(r#"{"type":"ping"}"#.into())).await;
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if answer.is_null() && (v["type"] == "snapshot" || v["type"] == "error") {
                        if v["type"] == "error" {
                            return Ok(json!({"answer": v, "events": events, "closed": true}));
                        }
                        answer = v;
                        next_send = Instant::now();
                    } else if v["type"] != "pong" && v["type"] != "active_speakers" {
                        events.push(v);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    closed = true;
                    break;
                }
            },
        }
    }
    if answer.is_null() {
        bail!("no answer to the join within {seconds} s");
    }
    let _ = ws.close(None).await;
    Ok(json!({"answer": answer, "events": events, "closed": closed}))
}

/// Listen to the push stream `push_url` (`wss://`) with `token` for `seconds`; report the header,
/// the audio frames and messages received, the room timestamps' gaps, and whether the edge
/// closed the stream.
pub async fn push_listen(push_url: &str, token: &str, ca: &Path, seconds: f64) -> Result<Value> {
    let mut ws = connect(push_url, &format!("token={token}"), ca).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    let (mut header, mut frames, mut messages, mut gaps) = (Value::Null, 0u64, 0u64, 0u64);
    let mut last_ts: Option<u64> = None;
    let mut closed = false;
    while let Ok(m) = tokio::time::timeout_at(deadline, ws.next()).await {
        match m {
            Some(Ok(Message::Text(t))) => header = serde_json::from_str(t.as_str())?,
            Some(Ok(Message::Binary(b))) => {
                let m = amphi_protocol::push::AudioMessage::decode(&b)?;
                messages += 1;
                for f in m.frames() {
                    if last_ts.is_some_and(|t| f.ts != t + amphi_protocol::push::FRAME_SAMPLES) {
                        gaps += 1;
                    }
                    last_ts = Some(f.ts);
                    frames += 1;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                closed = true;
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(
        json!({"header": header, "frames": frames, "messages": messages, "gaps": gaps, "closed": closed}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_participant_ids() {
        let state = json!({"participants": [{"id": 7, "name": "sam"}, {"id": 9, "name": "bob"}]});
        let mut m = json!({"type": "promote", "target": "@sam", "nested": ["@bob", "x"]});
        resolve(&mut m, &state).unwrap();
        assert_eq!(
            m,
            json!({"type": "promote", "target": 7, "nested": [9, "x"]})
        );
        assert!(resolve(&mut json!("@nobody"), &state).is_err());
    }
}
