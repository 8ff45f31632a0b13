//! `amphi-netem`: the test bed's link emulator. Run in the core namespace behind an iptables
//! `FORWARD -j NFQUEUE` rule: every forwarded IPv4 packet is classified by source and destination
//! region, held for the link's one-way delay (+ jitter) or dropped (loss, partitions), then
//! accepted. The config file (TOML, see `amphi_tools::netem::NetemFile`) is re-read when it
//! changes, so partitions can be switched on and off while it runs.

use amphi_tools::netem::{ipv4_addrs, Decision, DelayQueue, Emulator, NetemFile};
use amphi_tools::nfqueue::{wait_readable, Queue, Verdict};
use anyhow::{Context, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Userspace link emulator on an NFQUEUE (delay, jitter, loss, partitions per region pair).
#[derive(Parser)]
struct Args {
    /// Emulator config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// NFQUEUE number (the iptables rule's `--queue-num`).
    #[arg(long, default_value_t = 0)]
    queue: u16,
    /// Write counters here (JSON) about once a second.
    #[arg(long)]
    stats: Option<PathBuf>,
}

fn load(path: &Path) -> Result<(Emulator, Option<SystemTime>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: NetemFile = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((Emulator::new(&file)?, mtime))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (mut emu, mut mtime) = load(&args.config)?;
    // 40 bytes: the IPv4 header is all the classifier reads.
    let mut queue = Queue::bind(args.queue, 40, 65_536).context("binding the NFQUEUE")?;
    let mut held: DelayQueue<u32> = DelayQueue::with_capacity(65_536);
    let mut batch = Vec::with_capacity(256);
    let (mut packets, mut dropped, mut max_held) = (0u64, 0u64, 0usize);
    let mut next_check = Instant::now();
    eprintln!("amphi-netem: queue {} bound", args.queue);
    loop {
        let now = Instant::now();
        while let Some(id) = held.pop_due(now) {
            queue.verdict(id, Verdict::Accept)?;
        }
        if now >= next_check {
            next_check = now + Duration::from_millis(200);
            let m = std::fs::metadata(&args.config)
                .and_then(|m| m.modified())
                .ok();
            if m != mtime {
                match load(&args.config) {
                    Ok((e, m)) => {
                        emu = e;
                        mtime = m;
                        eprintln!("amphi-netem: config reloaded");
                    }
                    Err(e) => eprintln!("amphi-netem: keeping the old config: {e:#}"),
                }
            }
            if let Some(path) = &args.stats {
                let text = format!(
                    "{{\"packets\":{packets},\"dropped\":{dropped},\"held\":{},\"max_held\":{max_held}}}\n",
                    held.len()
                );
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, text).is_ok() {
                    let _ = std::fs::rename(&tmp, path);
                }
            }
        }
        let wait = held
            .next_due()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(200))
            .min(next_check.saturating_duration_since(Instant::now()));
        if !wait_readable(queue.fd(), Some(wait))? {
            continue;
        }
        let now = Instant::now();
        while queue.recv_batch(&mut batch, ipv4_addrs)? {
            for (id, addrs) in batch.drain(..) {
                packets += 1;
                let decision = match addrs {
                    Some((src, dst)) => emu.decide(src, dst, now),
                    None => Decision::DeliverAt(now),
                };
                match decision {
                    Decision::Drop => {
                        dropped += 1;
                        queue.verdict(id, Verdict::Drop)?;
                    }
                    Decision::DeliverAt(at) if at <= now => queue.verdict(id, Verdict::Accept)?,
                    Decision::DeliverAt(at) => held.push(at, id),
                }
            }
            max_held = max_held.max(held.len());
        }
    }
}
