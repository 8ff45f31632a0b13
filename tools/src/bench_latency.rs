//! `amphi-tools bench latency`: how long after a speaker's packet reaches the edge is the LL-HLS part
//! holding it listed in the playlist?
//!
//! Method: start `amphi dev` as a child process and publish 20 ms Opus frames through WHIP, mostly
//! silence, with short tone bursts. Follow the media playlist like an LL-HLS player, with blocking
//! reloads on the next part, and note when each part first appears. Afterwards, decode the parts
//! (one Opus decoder across all of them, placed by `tfdt`) and find each burst's onset in the
//! program timeline. A burst whose first packet was sent at `T`, and whose onset lies `o` into its
//! part, had that part's first frame ingested at about `T - o`. The delay is
//! `listed - (T - o)`: part duration plus the pipeline's own latency. The goal is part duration
//! + 30 ms. Loopback sending is sub-millisecond, so the send time stands in for edge ingest.

use crate::child_mesh::ChildMesh;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Samples per LL-HLS part (200 ms at 48 kHz).
const PART_SAMPLES: u64 = 9_600;
/// Samples per 20 ms frame.
const FRAME: usize = 960;
/// Opus encoder lookahead at 48 kHz, the same for the speaker's and the mixer's encoders.
const LOOKAHEAD: u64 = amphi_protocol::audio::OPUS_PRE_SKIP as u64;

/// When each (msn, part) was first seen listed, and its URI.
type ListedParts = BTreeMap<(u64, u32), (Instant, String)>;

/// Options of the latency benchmark.
pub struct LatencyOptions {
    /// Tone bursts to measure.
    pub bursts: usize,
    /// Port offset of the dev mesh it starts.
    pub port_offset: u16,
}

fn get_bytes(url: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(
        &mut ureq::get(url)
            .timeout(Duration::from_secs(10))
            .call()
            .with_context(|| format!("GET {url}"))?
            .into_reader(),
        &mut out,
    )?;
    Ok(out)
}

/// The LL-HLS position a playlist has reached: complete segments and the parts after them.
#[derive(Debug, Default, PartialEq, Eq)]
struct LiveEdge {
    /// Parts listed, as (msn, part index, URI).
    parts: Vec<(u64, u32, String)>,
    /// Media sequence number of the segment in progress.
    next_msn: u64,
    /// Parts of the segment in progress listed so far.
    next_part: u32,
}

/// Read the parts a media playlist lists (m3u8-rs cannot: it drops `EXT-X-PART`).
fn parse_live_edge(text: &str) -> LiveEdge {
    let mut msn = 0u64;
    let mut part = 0u32;
    let mut edge = LiveEdge::default();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("#EXT-X-MEDIA-SEQUENCE:") {
            msn = v.trim().parse().unwrap_or(0);
        } else if let Some(attrs) = line.strip_prefix("#EXT-X-PART:") {
            if let Some(uri) = attrs
                .split(',')
                .find_map(|a| a.strip_prefix("URI=\""))
                .and_then(|u| u.strip_suffix('"'))
            {
                edge.parts.push((msn, part, uri.to_string()));
            }
            part += 1;
        } else if line.starts_with("#EXTINF:") {
            msn += 1;
            part = 0;
        }
    }
    edge.next_msn = msn;
    edge.next_part = part;
    edge
}

/// One fMP4 chunk's decode time and its samples.
struct Chunk {
    tfdt: u64,
    samples: Vec<Vec<u8>>,
}

fn boxes(mut data: &[u8]) -> impl Iterator<Item = (&[u8; 4], &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 8 {
            return None;
        }
        let size = u32::from_be_bytes(data[..4].try_into().ok()?) as usize;
        if size < 8 || size > data.len() {
            return None;
        }
        let kind: &[u8; 4] = data[4..8].try_into().ok()?;
        let body = &data[8..size];
        data = &data[size..];
        Some((kind, body))
    })
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Read a CMAF part (`styp`? `moof` `mdat`) into its `tfdt` and Opus packets.
fn read_chunk(data: &[u8]) -> Result<Chunk> {
    let mut tfdt = None;
    let mut sizes = Vec::new();
    let mut default_size = None;
    let mut payload: &[u8] = &[];
    for (kind, body) in boxes(data) {
        match kind {
            b"moof" => {
                for (k, traf) in boxes(body) {
                    if k != b"traf" {
                        continue;
                    }
                    for (k, b) in boxes(traf) {
                        let flags = be_u32(b, 0).unwrap_or(0) & 0x00ff_ffff;
                        match k {
                            b"tfdt" => {
                                tfdt = Some(if b.first() == Some(&1) {
                                    u64::from_be_bytes(b.get(4..12).context("tfdt")?.try_into()?)
                                } else {
                                    u64::from(be_u32(b, 4).context("tfdt")?)
                                });
                            }
                            b"tfhd" if flags & 0x10 != 0 => {
                                let mut at = 8;
                                for (bit, len) in [(0x1, 8), (0x2, 4), (0x8, 4)] {
                                    if flags & bit != 0 {
                                        at += len;
                                    }
                                }
                                default_size = be_u32(b, at);
                            }
                            b"trun" => {
                                let count = be_u32(b, 4).context("trun")? as usize;
                                let mut at = 8;
                                for bit in [0x1, 0x4] {
                                    if flags & bit != 0 {
                                        at += 4;
                                    }
                                }
                                let per: usize = [0x100, 0x200, 0x400, 0x800]
                                    .iter()
                                    .filter(|&&bit| flags & bit != 0)
                                    .count()
                                    * 4;
                                for i in 0..count {
                                    let mut field = at + i * per;
                                    if flags & 0x100 != 0 {
                                        field += 4;
                                    }
                                    let size = if flags & 0x200 != 0 {
                                        be_u32(b, field).context("trun sample size")?
                                    } else {
                                        default_size.context("no sample size")?
                                    };
                                    sizes.push(size as usize);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            b"mdat" => payload = body,
            _ => {}
        }
    }
    let mut samples = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for size in sizes {
        samples.push(
            payload
                .get(at..at + size)
                .context("mdat too short")?
                .to_vec(),
        );
        at += size;
    }
    Ok(Chunk {
        tfdt: tfdt.context("part without tfdt")?,
        samples,
    })
}

/// Program-time positions (48 kHz samples, tfdt scale, pre-skip removed) where tone bursts begin.
fn burst_onsets(chunks: &[Chunk]) -> Result<Vec<u64>> {
    let mut dec = opus::Decoder::new(48_000, opus::Channels::Mono)?;
    let mut pcm = vec![0f32; 5760];
    let mut onsets = Vec::new();
    let mut quiet_run = 0usize;
    let mut expected_next = None;
    for chunk in chunks {
        let mut t = chunk.tfdt;
        if let Some(next) = expected_next {
            ensure!(t == next, "gap in the followed parts at {next}");
        }
        for pkt in &chunk.samples {
            let n = dec.decode_float(pkt, &mut pcm, false)?;
            for (i, &x) in pcm[..n].iter().enumerate() {
                if x.abs() > 0.05 {
                    if quiet_run >= 4_800 {
                        // The decoder output lags its input by the mixer encoder's lookahead.
                        onsets.push((t + i as u64).saturating_sub(LOOKAHEAD));
                    }
                    quiet_run = 0;
                } else {
                    quiet_run += 1;
                }
            }
            t += n as u64;
        }
        expected_next = Some(t);
    }
    Ok(onsets)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Run the benchmark and print its figures.
pub async fn run(opts: LatencyOptions) -> Result<()> {
    ensure!(opts.bursts >= 1, "--bursts must be at least 1");
    let offset = opts.port_offset;
    let mesh = tokio::task::spawn_blocking(move || ChildMesh::start("bench-latency", offset, &[]))
        .await??;
    let router = mesh.router_url();
    let created: serde_json::Value = ureq::post(&format!("{router}/v1/rooms"))
        .send_json(serde_json::json!({"title": "latency bench"}))?
        .into_json()?;
    let room = created["room"].as_str().context("room id")?.to_string();
    let token: serde_json::Value = ureq::post(&format!("{router}/v1/rooms/{room}/tokens"))
        .send_json(serde_json::json!({"role": "speaker", "name": "bench"}))?
        .into_json()?;
    let token = token["token"].as_str().context("token")?.to_string();
    let route: serde_json::Value = ureq::get(&format!("{router}/v1/route?room={room}"))
        .call()?
        .into_json()?;
    let whip = route["whip_url"].as_str().context("whip_url")?.to_string();
    let base = format!("{router}/hls/{room}/opus/");

    let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio)?;
    enc.set_bitrate(opus::Bitrate::Bits(64_000))?;
    let silence = enc.encode_vec(&[0i16; FRAME], 4000)?;
    let mut tone_frames = Vec::new();
    for f in 0..10 {
        let pcm: Vec<i16> = (0..FRAME)
            .map(|i| {
                let t = (f * FRAME + i) as f64 / 48_000.0;
                (0.5 * (2.0 * std::f64::consts::PI * 1000.0 * t).sin() * 32767.0) as i16
            })
            .collect();
        tone_frames.push(enc.encode_vec(&pcm, 4000)?);
    }

    let mut publisher = amphi_testkit::whip_client::WhipPublisher::connect(&whip, &token).await?;
    // Follow the playlist from a separate thread, like a player.
    let listed: Arc<Mutex<ListedParts>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let listed = listed.clone();
        let stop = stop.clone();
        let base = base.clone();
        std::thread::spawn(move || -> Result<()> {
            let mut next: Option<(u64, u32)> = None;
            while !stop.load(Ordering::Relaxed) {
                let url = match next {
                    Some((msn, part)) => {
                        format!("{base}playlist.m3u8?_HLS_msn={msn}&_HLS_part={part}")
                    }
                    None => format!("{base}playlist.m3u8"),
                };
                let text = match ureq::get(&url).timeout(Duration::from_secs(10)).call() {
                    Ok(r) => r.into_string()?,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                let now = Instant::now();
                let edge = parse_live_edge(&text);
                let mut map = listed.lock().expect("listed lock");
                for (msn, part, uri) in edge.parts {
                    map.entry((msn, part)).or_insert((now, uri));
                }
                next = Some((edge.next_msn, edge.next_part));
            }
            Ok(())
        })
    };

    // Warm up with 3 s of silence, then bursts every 1.03 s, so onsets fall at many offsets within parts.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent_onsets = Vec::new();
    let total_frames = 150 + opts.bursts * 52 + 100;
    let mut next_burst = 150usize;
    let mut burst_left = 0usize;
    for i in 0..total_frames {
        tick.tick().await;
        if i == next_burst && sent_onsets.len() < opts.bursts {
            burst_left = 10;
            next_burst += 52 - (sent_onsets.len() % 3);
            sent_onsets.push(Instant::now());
        }
        let payload = if burst_left > 0 {
            burst_left -= 1;
            &tone_frames[9 - burst_left]
        } else {
            &silence
        };
        publisher
            .send_opus(
                payload,
                (i * FRAME) as u32,
                if burst_left > 0 { 10 } else { 127 },
            )
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::Relaxed);
    publisher.close().await?;
    tokio::task::spawn_blocking(move || follower.join())
        .await?
        .map_err(|_| anyhow::anyhow!("follower panicked"))??;

    let listed = std::mem::take(&mut *listed.lock().expect("listed lock"));
    ensure!(
        listed.len() > 10,
        "the follower saw only {} parts",
        listed.len()
    );
    // Parts seen after the follower's first full view, in order, decoded as one stream.
    let mut chunks = Vec::new();
    let mut part_times = Vec::new();
    for (_, (at, uri)) in listed.iter().skip(1) {
        let chunk = read_chunk(&get_bytes(&format!("{base}{uri}"))?)?;
        part_times.push((chunk.tfdt, *at));
        chunks.push(chunk);
    }
    let onsets = burst_onsets(&chunks)?;
    if onsets.len() != sent_onsets.len() {
        bail!(
            "found {} burst onsets in the program for {} bursts sent",
            onsets.len(),
            sent_onsets.len()
        );
    }
    let mut delays_ms = Vec::new();
    for (onset, sent) in onsets.iter().zip(&sent_onsets) {
        // The speaker's encoder delays the decoded onset by its lookahead too.
        let onset = onset.saturating_sub(LOOKAHEAD);
        let Some(&(tfdt, listed_at)) = part_times
            .iter()
            .find(|(t, _)| *t <= onset && onset < t + PART_SAMPLES)
        else {
            bail!("no followed part holds program time {onset}");
        };
        let into_part = Duration::from_secs_f64((onset - tfdt) as f64 / 48_000.0);
        let first_frame_ingest = *sent - into_part;
        delays_ms.push(listed_at.duration_since(first_frame_ingest).as_secs_f64() * 1000.0);
    }
    delays_ms.sort_by(f64::total_cmp);
    let (p50, p90, p99, max) = (
        percentile(&delays_ms, 0.5),
        percentile(&delays_ms, 0.9),
        percentile(&delays_ms, 0.99),
        delays_ms[delays_ms.len() - 1],
    );
    println!(
        "ingest at edge -> part listed in playlist, {} bursts, 200 ms parts (goal <= 230 ms)",
        delays_ms.len()
    );
    println!("  p50 {p50:.1} ms   p90 {p90:.1} ms   p99 {p99:.1} ms   max {max:.1} ms");
    println!(
        "  beyond the part duration: p50 {:.1} ms   p99 {:.1} ms",
        p50 - 200.0,
        p99 - 200.0
    );
    drop(mesh);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_edge_counts_segments_and_trailing_parts() {
        let text = "#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:4\n#EXT-X-PART:DURATION=0.2,URI=\"part4.0.m4a\",INDEPENDENT=YES\n\
                    #EXT-X-PART:DURATION=0.2,URI=\"part4.1.m4a\"\n#EXTINF:2.000,\nseg4.m4a\n\
                    #EXT-X-PART:DURATION=0.2,URI=\"part5.0.m4a\"\n\
                    #EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part5.1.m4a\"\n";
        let edge = parse_live_edge(text);
        assert_eq!(edge.next_msn, 5);
        assert_eq!(edge.next_part, 1);
        assert_eq!(
            edge.parts,
            vec![
                (4, 0, "part4.0.m4a".to_string()),
                (4, 1, "part4.1.m4a".to_string()),
                (5, 0, "part5.0.m4a".to_string())
            ]
        );
    }

    #[test]
    fn chunk_reader_rejects_truncated_input() {
        assert!(read_chunk(&[0, 0, 0, 8, b'm', b'o', b'o', b'f']).is_err());
        assert!(read_chunk(&[]).is_err());
    }
}
