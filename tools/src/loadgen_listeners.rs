//! `amphi-tools loadgen listeners`: grow an existing room. N listeners join one after another,
//! each on the tier the router names for it (`/v1/route` `mode`): `interactive` ones over WHEP
//! (str0m), `push` ones over the room's push WebSocket; `hls` ones are counted and hold nothing
//! at the edge (`loadgen hls` loads that tier). They hold for `--seconds`, then leave (WHEP
//! `DELETE`, WebSocket close; at once on SIGINT), so the room shrinks again. Bounded: at most
//! [`MAX_LISTENERS`] listeners and [`MAX_SECONDS`] of holding.

use crate::loadgen_webrtc::post_json;
use amphi_protocol::push::AudioMessage;
use amphi_testkit::whep_client::{WhepOptions, WhepSubscriber};
use anyhow::{ensure, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Most listeners one run joins.
pub const MAX_LISTENERS: usize = 2_000;
/// Most seconds one run holds them.
pub const MAX_SECONDS: u64 = 600;

/// Options of `amphi-tools loadgen listeners`.
#[derive(Args, Debug)]
pub struct ListenersArgs {
    /// Geo-router base URL (a dev router, or one that mints tokens without an API key).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    router: String,
    /// The room to grow (16 hex digits).
    #[arg(long)]
    room: String,
    /// Listeners to join.
    #[arg(long, default_value_t = 10)]
    listeners: usize,
    /// Region to ask the router for (`region=`, honoured by dev routers).
    #[arg(long)]
    region: Option<String>,
    /// Pause between joins, ms: the router counts a listener once its edge's heartbeat (every
    /// 0.5 s) has, so joins faster than that can all land on one tier.
    #[arg(long, default_value_t = 1_200)]
    join_every_ms: u64,
    /// Seconds to hold every listener after the last join, before they leave.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// One joined listener.
enum Joined {
    Interactive(Box<WhepSubscriber>),
    Push(tokio::task::JoinHandle<()>),
    Hls,
}

/// Read a push stream, counting its Opus frames, until the edge closes it.
async fn play_push(url: String, frames: Arc<AtomicU64>) -> Result<tokio::task::JoinHandle<()>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .context("push upgrade")?;
    Ok(tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Binary(b) = m {
                if let Ok(a) = AudioMessage::decode(&b) {
                    frames.fetch_add(a.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }))
}

/// `amphi-tools loadgen listeners`.
pub async fn run(args: ListenersArgs) -> Result<()> {
    amphi_edge::install_crypto_provider();
    ensure!(
        args.listeners <= MAX_LISTENERS,
        "--listeners is at most {MAX_LISTENERS}"
    );
    ensure!(
        args.seconds <= MAX_SECONDS,
        "--seconds is at most {MAX_SECONDS}"
    );
    let router = args.router.trim_end_matches('/').to_string();
    let push_frames = Arc::new(AtomicU64::new(0));
    let mut joined: Vec<Joined> = Vec::with_capacity(args.listeners);
    let mut tiers: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..args.listeners {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(args.join_every_ms)).await;
        }
        let (router, room, region) = (router.clone(), args.room.clone(), args.region.clone());
        let (token, route) = tokio::task::spawn_blocking(move || -> Result<_> {
            let t = post_json(
                &format!("{router}/v1/rooms/{room}/tokens"),
                serde_json::json!({"role": "listener", "name": format!("load-{i}")}),
            )?;
            let token = t["token"].as_str().context("token")?.to_string();
            let mut url = format!("{router}/v1/route?room={room}&role=listener");
            if let Some(r) = region {
                url.push_str(&format!("&region={r}"));
            }
            let route: serde_json::Value = ureq::get(&url)
                .timeout(Duration::from_secs(5))
                .call()?
                .into_json()?;
            Ok((token, route))
        })
        .await??;
        let mode = route["mode"].as_str().unwrap_or("interactive").to_string();
        let listener = match mode.as_str() {
            "interactive" => {
                let whep = route["whep_url"].as_str().context("whep_url")?;
                let opts = WhepOptions {
                    keep_packets: false,
                    ice_check_every: Duration::from_millis(2_500),
                    ..WhepOptions::default()
                };
                Joined::Interactive(Box::new(
                    WhepSubscriber::connect_with(whep, &token, opts)
                        .await
                        .with_context(|| format!("listener {i}: WHEP"))?,
                ))
            }
            "push" => {
                let push = route["push_url"].as_str().context("push_url")?;
                let url = format!("{}?token={token}", push.replacen("http", "ws", 1));
                Joined::Push(
                    play_push(url, push_frames.clone())
                        .await
                        .with_context(|| format!("listener {i}: push"))?,
                )
            }
            _ => Joined::Hls,
        };
        *tiers.entry(mode.clone()).or_default() += 1;
        eprintln!("listener {i}: {mode}");
        joined.push(listener);
    }
    println!("{}", serde_json::json!({ "joined": tiers }));
    // Hold, or leave early on SIGINT (the tier-move test shrinks the room that way).
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(args.seconds)) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let mut rtp_packets = 0;
    for l in joined {
        match l {
            Joined::Interactive(sub) => {
                rtp_packets += sub.stats().packets();
                let _ = sub.close().await;
            }
            Joined::Push(task) => task.abort(),
            Joined::Hls => {}
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "left": tiers,
            "received": {
                "interactive_rtp_packets": rtp_packets,
                "push_frames": push_frames.load(Ordering::Relaxed),
            }
        })
    );
    Ok(())
}
