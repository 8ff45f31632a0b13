//! `amphi-tools loadgen room`: one big room over two edges of an `amphi dev` mesh in a child process.
//! WebSocket participants (split over the two edges) and WebRTC listeners (WHEP, str0m) join;
//! listeners raise hands, the host promotes half of them and kicks the other half; the host and
//! the hand raisers chat; a late participant pages through the whole listener list. It fails if
//! any edge's link to the origin dropped (`amphi_edge_origin_links_total` moved), a record was
//! refused, a participant was disconnected that was not kicked, or an event did not arrive.
//!
//! Bounded: every wait has a deadline, counts are fixed by the options.

use crate::child_mesh::ChildMesh;
use amphi_testkit::whep_client::{WhepOptions, WhepSubscriber};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// WebSocket clients connecting at once.
const JOIN_BATCH: usize = 200;
/// Longest wait for any one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of `amphi-tools loadgen room`.
#[derive(Args, Debug)]
pub struct RoomArgs {
    /// WebSocket participants (listeners), half on each edge.
    #[arg(long, default_value_t = 10_000)]
    websockets: usize,
    /// WebRTC (WHEP) listeners, half on each edge.
    #[arg(long, default_value_t = 200)]
    webrtc: usize,
    /// Listeners who raise a hand (half promoted, half kicked).
    #[arg(long, default_value_t = 20)]
    hands: usize,
    /// Port offset of the `amphi dev` mesh it starts.
    #[arg(long, default_value_t = 23_000)]
    port_offset: u16,
    /// Short run for CI: 1,000 WebSocket participants (past the old single-record snapshot
    /// limit), 20 WebRTC listeners, 6 hands.
    #[arg(long)]
    smoke: bool,
}

/// Counters shared by every client task.
#[derive(Default)]
struct Tally {
    /// Server messages received.
    messages: AtomicU64,
    /// `chat` events received.
    chats: AtomicU64,
    /// Sessions closed by the edge other than by a kick.
    dropped: AtomicU64,
    /// Sessions closed with the kick code.
    kicked: AtomicU64,
    /// `error` messages received.
    errors: AtomicU64,
}

/// One joined WebSocket participant: its id and a way to send it text.
struct Client {
    id: u64,
    out: mpsc::UnboundedSender<String>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connect, join and wait for the snapshot.
async fn join(url: &str) -> Result<(Ws, Value)> {
    let (mut ws, _) = match tokio_tungstenite::connect_async(url).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            bail!(
                "websocket refused: {} {}",
                resp.status(),
                String::from_utf8_lossy(body)
            )
        }
        Err(e) => return Err(e).context("websocket connect"),
    };
    ws.send(Message::Text(json!({"type": "join"}).to_string().into()))
        .await?;
    while let Some(m) = ws.next().await {
        if let Message::Text(t) = m? {
            let v: Value = serde_json::from_str(&t)?;
            match v["type"].as_str() {
                Some("snapshot") => return Ok((ws, v)),
                Some("error") => bail!("join refused: {v}"),
                _ => {}
            }
        }
    }
    bail!("closed before the snapshot")
}

/// Run a joined client until its socket closes: count what arrives, send what `rx` gives,
/// forward every message to `events` if set (the host).
fn spawn_client(
    mut ws: Ws,
    tally: Arc<Tally>,
    events: Option<mpsc::UnboundedSender<Value>>,
) -> mpsc::UnboundedSender<String> {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                out = rx.recv() => match out {
                    Some(text) => {
                        if ws.send(Message::Text(text.into())).await.is_err() {
                            tally.dropped.fetch_add(1, Relaxed);
                            return;
                        }
                    }
                    None => {
                        let _ = ws.close(None).await;
                        return;
                    }
                },
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        tally.messages.fetch_add(1, Relaxed);
                        let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                        match v["type"].as_str() {
                            Some("chat") => { tally.chats.fetch_add(1, Relaxed); }
                            Some("error") => { tally.errors.fetch_add(1, Relaxed); }
                            _ => {}
                        }
                        if let Some(ev) = &events {
                            let _ = ev.send(v);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let kicked = frame.is_some_and(|f| u16::from(f.code) == 4001);
                        if kicked {
                            tally.kicked.fetch_add(1, Relaxed);
                        } else {
                            tally.dropped.fetch_add(1, Relaxed);
                        }
                        return;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        tally.dropped.fetch_add(1, Relaxed);
                        return;
                    }
                },
            }
        }
    });
    tx
}

/// Wait until the host saw an event matching `want` for every id in `ids`.
async fn await_events(
    host: &mut mpsc::UnboundedReceiver<Value>,
    kind: &str,
    ids: &[u64],
) -> Result<()> {
    let mut missing: std::collections::HashSet<u64> = ids.iter().copied().collect();
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while !missing.is_empty() {
        let v = tokio::time::timeout_at(deadline, host.recv())
            .await
            .with_context(|| format!("{} {kind} events missing", missing.len()))?
            .context("host gone")?;
        if v["type"] == kind {
            if let Some(id) = v["id"].as_u64() {
                missing.remove(&id);
            }
        }
    }
    Ok(())
}

fn metric(edge: &str, name: &str) -> Result<f64> {
    let text = ureq::get(&format!("{edge}/metrics"))
        .timeout(Duration::from_secs(5))
        .call()?
        .into_string()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("metric {name} missing at {edge}"))
}

/// Raise this process's open-file limit to its hard limit (the mesh child inherits it).
pub(crate) fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `amphi-tools loadgen room`.
pub async fn run(args: RoomArgs) -> Result<()> {
    let (n_ws, n_rtc, n_hands) = if args.smoke {
        (1_000, 20, 6)
    } else {
        (args.websockets, args.webrtc, args.hands)
    };
    ensure!(n_hands <= n_ws, "--hands exceeds --websockets");
    let fds = raise_fd_limit();
    // Per process: this one holds a socket per WebSocket client and two per WebRTC listener
    // (HTTP, UDP); the mesh child about as many (it inherits the limit).
    let need = (n_ws + 2 * n_rtc + 1000) as u64;
    ensure!(
        fds >= need,
        "open-file limit {fds} is below the {need} this run needs: raise `ulimit -Hn`"
    );
    let offset = args.port_offset;
    let mesh = tokio::task::spawn_blocking(move || {
        ChildMesh::start(
            "loadgen-room",
            offset,
            &["--regions", "us-east,eu-west", "--media-threads", "1"],
        )
    })
    .await??;
    let router = mesh.router_url();
    let edges = [mesh.edge_url(0), mesh.edge_url(1)];
    for e in &edges {
        let deadline = Instant::now() + Duration::from_secs(30);
        while metric(e, "amphi_edge_origin_connected").unwrap_or(0.0) < 1.0 {
            ensure!(
                Instant::now() < deadline,
                "edge {e} never linked to the origin"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let links_before: Vec<f64> = edges
        .iter()
        .map(|e| metric(e, "amphi_edge_origin_links_total"))
        .collect::<Result<_>>()?;

    // The room and every token (minted over the router's API, a few threads at a time).
    let started = Instant::now();
    let r2 = router.clone();
    let (room, host_token, tokens, rtc_tokens) =
        tokio::task::spawn_blocking(move || -> Result<_> {
            let post = |url: String, body: Value| -> Result<Value> {
                Ok(ureq::post(&url)
                    .timeout(Duration::from_secs(10))
                    .send_json(body)?
                    .into_json()?)
            };
            let created = post(format!("{r2}/v1/rooms"), json!({"title": "big room load"}))?;
            let room = created["room"].as_str().context("room id")?.to_string();
            let mint = |role: &str, name: String| -> Result<String> {
                let t = post(
                    format!("{r2}/v1/rooms/{room}/tokens"),
                    json!({"role": role, "name": name}),
                )?;
                Ok(t["token"].as_str().context("token")?.to_string())
            };
            let host = created["host_token"]
                .as_str()
                .context("host token")?
                .to_string();
            let mint_many = |role: &'static str, prefix: &'static str, n: usize| {
                std::thread::scope(|s| {
                    let parts: Vec<_> = (0..4)
                        .map(|k| {
                            let mint = &mint;
                            s.spawn(move || {
                                (0..n)
                                    .filter(|i| i % 4 == k)
                                    .map(|i| Ok((i, mint(role, format!("{prefix}-{i}"))?)))
                                    .collect::<Result<Vec<_>>>()
                            })
                        })
                        .collect();
                    let mut all = Vec::with_capacity(n);
                    for p in parts {
                        all.extend(p.join().expect("minting thread")?);
                    }
                    all.sort();
                    Ok::<_, anyhow::Error>(all.into_iter().map(|(_, t)| t).collect::<Vec<_>>())
                })
            };
            let ws = mint_many("listener", "ws", n_ws)?;
            let rtc = mint_many("listener", "rtc", n_rtc)?;
            Ok((room, host, ws, rtc))
        })
        .await??;
    println!(
        "room {room}: {} tokens minted in {:.1} s",
        n_ws + n_rtc + 1,
        started.elapsed().as_secs_f64()
    );
    let ws_url =
        |edge: &str, token: &str| format!("{}/v1/ws?token={token}", edge.replacen("http", "ws", 1));
    let tally = Arc::new(Tally::default());

    // The host, on the first edge.
    let (host_ws, _) = join(&ws_url(&edges[0], &host_token)).await?;
    let (host_tx, mut host_rx) = mpsc::unbounded_channel();
    let host = spawn_client(host_ws, tally.clone(), Some(host_tx));

    // WebSocket participants, alternating edges, JOIN_BATCH at a time.
    let join_started = Instant::now();
    let mut clients: Vec<Client> = Vec::with_capacity(n_ws);
    let mut latencies = Vec::with_capacity(n_ws);
    for (b, chunk) in tokens.chunks(JOIN_BATCH).enumerate() {
        let mut set = tokio::task::JoinSet::new();
        for (i, token) in chunk.iter().enumerate() {
            let url = ws_url(&edges[(b * JOIN_BATCH + i) % 2], token);
            set.spawn(async move {
                let t = Instant::now();
                let r = tokio::time::timeout(STEP_TIMEOUT, join(&url)).await;
                (t.elapsed(), r)
            });
        }
        while let Some(done) = set.join_next().await {
            let (took, r) = done?;
            let (ws, snap) = r.context("join timed out")??;
            latencies.push(took);
            let id = snap["you"].as_u64().context("snapshot without you")?;
            clients.push(Client {
                id,
                out: spawn_client(ws, tally.clone(), None),
            });
        }
    }
    let ws_join = join_started.elapsed();
    latencies.sort();
    println!(
        "{n_ws} WebSocket participants joined over 2 edges in {:.2} s ({:.0} joins/s); join latency p50 {:.1} ms, p99 {:.1} ms",
        ws_join.as_secs_f64(),
        n_ws as f64 / ws_join.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );

    // WebRTC listeners, alternating edges.
    let rtc_started = Instant::now();
    let mut subscribers = Vec::with_capacity(n_rtc);
    for (b, chunk) in rtc_tokens.chunks(16).enumerate() {
        let mut set = tokio::task::JoinSet::new();
        for (i, token) in chunk.iter().enumerate() {
            let url = format!("{}/whep/{room}", edges[(b * 16 + i) % 2]);
            let token = token.clone();
            set.spawn(async move {
                WhepSubscriber::connect_with(&url, &token, WhepOptions::default()).await
            });
        }
        while let Some(done) = set.join_next().await {
            subscribers.push(done?.context("WHEP listener")?);
        }
    }
    println!(
        "{n_rtc} WebRTC listeners connected in {:.2} s",
        rtc_started.elapsed().as_secs_f64()
    );

    // Moderation: hands up, half promoted, half kicked.
    let raisers: Vec<&Client> = clients
        .iter()
        .step_by(n_ws / n_hands.max(1))
        .take(n_hands)
        .collect();
    let ids: Vec<u64> = raisers.iter().map(|c| c.id).collect();
    for c in &raisers {
        let _ = c.out.send(json!({"type": "raise_hand"}).to_string());
    }
    await_events(&mut host_rx, "hand_raised", &ids)
        .await
        .with_context(|| {
            format!(
                "{} participants disconnected, {} error messages",
                tally.dropped.load(Relaxed),
                tally.errors.load(Relaxed)
            )
        })?;
    let (promote, kick) = ids.split_at(ids.len() / 2);
    for id in promote {
        let _ = host.send(json!({"type": "promote", "target": id}).to_string());
    }
    await_events(&mut host_rx, "role_changed", promote).await?;
    for id in kick {
        let _ = host.send(json!({"type": "kick", "target": id}).to_string());
    }
    await_events(&mut host_rx, "kicked", kick).await?;
    println!(
        "{n_hands} hands raised, {} promoted, {} kicked",
        promote.len(),
        kick.len()
    );

    // Chat: the host and the promoted speakers, one message each, to everyone left.
    let chats_before = tally.chats.load(Relaxed);
    let senders = 1 + promote.len();
    let _ = host.send(json!({"type": "chat", "text": "welcome"}).to_string());
    for c in raisers.iter().filter(|c| promote.contains(&c.id)) {
        let _ = c
            .out
            .send(json!({"type": "chat", "text": "thanks"}).to_string());
    }
    let receivers = 1 + n_ws - kick.len();
    let want = (senders * receivers) as u64;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while tally.chats.load(Relaxed) - chats_before < want {
        ensure!(
            Instant::now() < deadline,
            "chat: {} of {want} deliveries",
            tally.chats.load(Relaxed) - chats_before
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{senders} chat messages delivered {want} times");

    // A late participant sees the room's counts and pages through everyone.
    let (late_ws, snap) = join(&ws_url(&edges[1], &host_token)).await?;
    let expected = (1 + n_ws - kick.len() + n_rtc + 1) as u64;
    let counted = snap["counts"]["participants"].as_u64().unwrap_or(0);
    ensure!(
        counted == expected,
        "late joiner counts {counted} participants, expected {expected}"
    );
    ensure!(
        snap["partial"] == true,
        "a big room's snapshot must be partial"
    );
    let snap_bytes = snap.to_string().len();
    let (late_tx, mut late_rx) = mpsc::unbounded_channel();
    let late = spawn_client(late_ws, tally.clone(), Some(late_tx));
    let mut after = Value::Null;
    let mut listed = 0u64;
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let _ = late.send(json!({"type": "list_participants", "after": after}).to_string());
        let page = loop {
            let v = tokio::time::timeout_at(deadline, late_rx.recv())
                .await
                .context("no participants page")?
                .context("late participant gone")?;
            if v["type"] == "participants" {
                break v;
            }
        };
        listed += page["participants"]
            .as_array()
            .map_or(0, |a| a.len() as u64);
        after = page["next"].clone();
        if after.is_null() {
            break;
        }
    }
    ensure!(
        listed == expected,
        "paged {listed} participants, expected {expected}"
    );
    println!("late participant: snapshot {snap_bytes} bytes, {listed} participants in pages");

    // No link dropped, nothing refused, nobody lost who was not kicked.
    for (e, before) in edges.iter().zip(&links_before) {
        let links = metric(e, "amphi_edge_origin_links_total")?;
        ensure!(
            links == *before,
            "edge {e} lost its origin link ({before} -> {links} links)"
        );
        let refused = metric(e, "amphi_edge_control_records_refused_total")?;
        ensure!(refused == 0.0, "edge {e} refused {refused} control records");
    }
    let dropped = tally.dropped.load(Relaxed);
    ensure!(dropped == 0, "{dropped} participants were disconnected");
    ensure!(
        tally.kicked.load(Relaxed) == kick.len() as u64,
        "{} kicked sessions closed, expected {}",
        tally.kicked.load(Relaxed),
        kick.len()
    );
    let errors = tally.errors.load(Relaxed);
    ensure!(errors == 0, "{errors} error messages");
    println!(
        "OK: no link drop; {} server messages to WebSocket participants; total {:.1} s",
        tally.messages.load(Relaxed),
        started.elapsed().as_secs_f64()
    );
    drop(subscribers);
    drop(clients);
    drop(host);
    drop(late);
    drop(mesh);
    Ok(())
}
