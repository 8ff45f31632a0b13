//! `amphi-tools bench quality`: what a speaker's voice sounds like after amphi, for PESQ scoring.
//!
//! One run publishes a reference WAV (48 kHz mono 16-bit) through a dev mesh it starts, the way a
//! browser would: Opus 32 kbit/s, `VOIP` application, 20 ms frames, in-band FEC on and the
//! encoder told the loss rate when the path is lossy (a browser learns it from the edge's RTCP
//! receiver reports, within their 5 s interval; the run prints the loss the last one carried). A WHEP listener on the same edge receives the forwarded packets and decodes
//! them like a browser (Opus FEC from the next packet when one is missing, else PLC); after the
//! room ends, `ffmpeg` decodes the recording's Opus and AAC renditions. It writes `speaker.wav`
//! (the speaker's packets decoded locally: the single-encode ceiling), `whep.wav`, `hls_opus.wav`
//! and `hls_aac.wav` to `--out`; `bench/quality/run.sh` aligns and scores them.
//!
//! Loss and jitter are injected in the test client, seeded: `--uplink-loss` leaves packets out
//! (their sequence numbers are skipped, as on a real lossy path), `--jitter-ms` delays each packet
//! by a uniform random 0..=J ms (so packets reorder when J > 20). Relay loss (edge -> origin) is
//! the edge's bench-only knob `AMPHI_BENCH_RELAY_LOSS` (see `edge-node/src/media/driver.rs`), set here on
//! the dev mesh's environment from `--relay-loss`.

use crate::child_mesh::ChildMesh;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Samples per 20 ms frame at 48 kHz.
const FRAME: usize = 960;
/// Sample rate of every WAV this bench reads and writes.
const RATE: u32 = 48_000;

/// Options of the quality benchmark (`amphi-tools bench quality`).
#[derive(clap::Args)]
pub struct QualityOptions {
    /// Reference speech: 48 kHz mono 16-bit PCM WAV.
    #[arg(long)]
    pub wav: PathBuf,
    /// Directory the degraded WAVs are written to.
    #[arg(long)]
    pub out: PathBuf,
    /// Fraction of the speaker's packets lost on the uplink (0..1, seeded).
    #[arg(long, default_value_t = 0.0)]
    pub uplink_loss: f64,
    /// Uniform random extra delay of each uplink packet, 0..=this many ms.
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u32,
    /// Fraction of relay datagrams the edge drops toward the origin (0..1, seeded, bench only).
    #[arg(long, default_value_t = 0.0)]
    pub relay_loss: f64,
    /// Seed of the loss and jitter patterns.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Publish with RFC 2198 RED (each packet carries the previous one, as browsers send), so
    /// the edge recovers a packet lost on the uplink from the next one.
    #[arg(long)]
    pub red: bool,
    /// Port offset of the dev mesh it starts.
    #[arg(long, default_value_t = 23_000)]
    pub port_offset: u16,
}

/// SplitMix64: a small seeded generator, so runs repeat exactly.
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    /// Uniform in `0.0..1.0`.
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Read a 48 kHz mono 16-bit PCM WAV.
pub fn read_wav(path: &Path) -> Result<Vec<i16>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        data.len() >= 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WAVE",
        "{} is not a WAV file",
        path.display()
    );
    let mut at = 12;
    let mut format_ok = false;
    while at + 8 <= data.len() {
        let id = &data[at..at + 4];
        let len = u32::from_le_bytes(data[at + 4..at + 8].try_into()?) as usize;
        let body = data
            .get(at + 8..(at + 8 + len).min(data.len()))
            .context("chunk")?;
        if id == b"fmt " {
            ensure!(body.len() >= 16, "short fmt chunk");
            let fmt = u16::from_le_bytes(body[0..2].try_into()?);
            let channels = u16::from_le_bytes(body[2..4].try_into()?);
            let rate = u32::from_le_bytes(body[4..8].try_into()?);
            let bits = u16::from_le_bytes(body[14..16].try_into()?);
            format_ok = fmt == 1 && channels == 1 && rate == RATE && bits == 16;
        } else if id == b"data" {
            ensure!(format_ok, "{}: need 48 kHz mono s16 PCM", path.display());
            return Ok(body
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect());
        }
        at += 8 + len + (len & 1);
    }
    bail!("{}: no data chunk", path.display())
}

/// Write a 48 kHz mono 16-bit PCM WAV.
pub fn write_wav(path: &Path, pcm: &[i16]) -> Result<()> {
    let bytes = (pcm.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + pcm.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + bytes).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&RATE.to_le_bytes());
    out.extend_from_slice(&(RATE * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&bytes.to_le_bytes());
    for s in pcm {
        out.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// One packet to send: its index in the stream, when (offset from the start), and its frame.
#[derive(Debug, PartialEq)]
struct Send {
    index: u64,
    at: Duration,
}

/// The uplink schedule: frame `i` is due at `i * 20 ms` plus a uniform jitter, left out with
/// probability `loss`; sorted by send time (so jitter beyond 20 ms reorders).
fn schedule(frames: usize, loss: f64, jitter_ms: u32, seed: u64) -> Vec<Send> {
    let mut rng = SplitMix::new(seed);
    let mut out: Vec<Send> = (0..frames as u64)
        .filter_map(|i| {
            let lost = rng.next_f64() < loss;
            let extra = rng.next_f64() * f64::from(jitter_ms) / 1000.0;
            (!lost).then(|| Send {
                index: i,
                at: Duration::from_millis(i * 20) + Duration::from_secs_f64(extra),
            })
        })
        .collect();
    out.sort_by_key(|s| s.at);
    out
}

/// Encode `pcm` like a browser speaker: 20 ms Opus frames, VOIP, 32 kbit/s, in-band FEC, told
/// the expected loss. Returns each frame's packet and RFC 6464 level.
fn encode_speaker(pcm: &[i16], loss: f64) -> Result<Vec<(Vec<u8>, u8)>> {
    let mut enc = opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Voip)?;
    enc.set_bitrate(opus::Bitrate::Bits(32_000))?;
    enc.set_inband_fec(true)?;
    enc.set_packet_loss_perc((loss * 100.0).round() as i32)?;
    let mut frame = [0i16; FRAME];
    pcm.chunks(FRAME)
        .map(|chunk| {
            frame.fill(0);
            frame[..chunk.len()].copy_from_slice(chunk);
            let energy: f64 = frame.iter().map(|&x| f64::from(x).powi(2)).sum();
            let rms = (energy / FRAME as f64).sqrt() / 32768.0;
            let level = if rms > 0.0 {
                (-20.0 * rms.log10()).round().clamp(0.0, 127.0) as u8
            } else {
                127
            };
            Ok((enc.encode_vec(&frame, 1500)?, level))
        })
        .collect()
}

/// Decode received packets (RTP timestamp, payload) into PCM the way a WebRTC receiver does:
/// placed by timestamp, a missing frame recovered from the next packet's FEC data when that one
/// arrived, concealed otherwise.
pub fn decode_received(mut packets: Vec<(u32, Vec<u8>)>) -> Result<Vec<i16>> {
    let Some(&(first, _)) = packets.first() else {
        return Ok(Vec::new());
    };
    let frame_of = |ts: u32| i64::from(ts.wrapping_sub(first) as i32) / FRAME as i64;
    packets.sort_by_key(|(ts, _)| frame_of(*ts));
    packets.dedup_by_key(|(ts, _)| frame_of(*ts));
    let start = packets.first().map_or(0, |(ts, _)| frame_of(*ts));
    let mut by_frame = std::collections::BTreeMap::new();
    for (ts, p) in packets {
        by_frame.insert(frame_of(ts) - start, p);
    }
    let last = by_frame.keys().next_back().copied().unwrap_or(0);
    let mut dec = opus::Decoder::new(RATE, opus::Channels::Mono)?;
    let mut out = Vec::new();
    let mut buf = vec![0i16; 5760];
    for f in 0..=last {
        let n = match (by_frame.get(&f), by_frame.get(&(f + 1))) {
            (Some(p), _) => dec.decode(p, &mut buf, false)?,
            (None, Some(next)) => dec.decode(next, &mut buf[..FRAME], true)?,
            (None, None) => dec.decode(&[], &mut buf[..FRAME], false)?,
        };
        out.extend_from_slice(&buf[..n.min(FRAME)]);
    }
    Ok(out)
}

fn post_json(url: &str, body: serde_json::Value) -> Result<serde_json::Value> {
    Ok(ureq::post(url)
        .timeout(Duration::from_secs(10))
        .send_json(body)
        .with_context(|| format!("POST {url}"))?
        .into_json()?)
}

/// Decode an HLS playlist with ffmpeg into a 48 kHz mono 16-bit WAV.
fn ffmpeg_decode(url: &str, out: &Path) -> Result<()> {
    let status = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-y", "-i", url])
        .args(["-ac", "1", "-ar", "48000", "-c:a", "pcm_s16le"])
        .arg(out)
        .status()
        .context("running ffmpeg")?;
    ensure!(status.success(), "ffmpeg could not decode {url}");
    Ok(())
}

/// Run one condition and write the degraded WAVs.
pub async fn run(opts: QualityOptions) -> Result<()> {
    ensure!(
        (0.0..1.0).contains(&opts.uplink_loss) && (0.0..1.0).contains(&opts.relay_loss),
        "loss fractions must be in 0..1"
    );
    let reference = read_wav(&opts.wav)?;
    ensure!(
        reference.len() >= RATE as usize,
        "reference shorter than 1 s"
    );
    std::fs::create_dir_all(&opts.out)?;
    let frames = encode_speaker(&reference, opts.uplink_loss)?;
    // The speaker's own encode, decoded without a network: the single-encode ceiling.
    let own: Vec<(u32, Vec<u8>)> = frames
        .iter()
        .enumerate()
        .map(|(i, (p, _))| ((i * FRAME) as u32, p.clone()))
        .collect();
    write_wav(&opts.out.join("speaker.wav"), &decode_received(own)?)?;
    let plan = schedule(frames.len(), opts.uplink_loss, opts.jitter_ms, opts.seed);

    let offset = opts.port_offset;
    let relay_loss = format!("{}:{}", opts.relay_loss, opts.seed);
    let mesh = tokio::task::spawn_blocking(move || {
        ChildMesh::start_with_env(
            "bench-quality",
            offset,
            &[],
            &[("AMPHI_BENCH_RELAY_LOSS", relay_loss.as_str())],
        )
    })
    .await??;
    let router = mesh.router_url();
    let created = post_json(
        &format!("{router}/v1/rooms"),
        serde_json::json!({"title": "quality bench"}),
    )?;
    let room = created["room"].as_str().context("room id")?.to_string();
    let host = created["host_token"]
        .as_str()
        .context("host token")?
        .to_string();
    let token = |role: &str| -> Result<String> {
        let t = post_json(
            &format!("{router}/v1/rooms/{room}/tokens"),
            serde_json::json!({"role": role, "name": format!("bench-{role}")}),
        )?;
        Ok(t["token"].as_str().context("token")?.to_string())
    };
    let (speaker_token, listener_token) = (token("speaker")?, token("listener")?);
    let route: serde_json::Value = ureq::get(&format!("{router}/v1/route?room={room}"))
        .call()?
        .into_json()?;
    let whip = route["whip_url"].as_str().context("whip_url")?.to_string();
    let whep = route["whep_url"].as_str().context("whep_url")?.to_string();

    let mut listener =
        amphi_testkit::whep_client::WhepSubscriber::connect(&whep, &listener_token).await?;
    let mut publisher = if opts.red {
        let p =
            amphi_testkit::whip_client::WhipPublisher::connect_red(&whip, &speaker_token).await?;
        ensure!(p.red(), "the edge did not accept RED");
        p
    } else {
        amphi_testkit::whip_client::WhipPublisher::connect(&whip, &speaker_token).await?
    };
    // Let the room's program and the listener's slots settle before speech starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = tokio::time::Instant::now();
    for s in &plan {
        tokio::time::sleep_until(start + s.at).await;
        let (payload, level) = &frames[s.index as usize];
        // With RED the previous frame (sent or lost) rides along as redundancy.
        let previous = s
            .index
            .checked_sub(1)
            .map(|j| ((j * FRAME as u64) as u32, frames[j as usize].0.as_slice()));
        publisher
            .send_opus_indexed_red(
                s.index,
                payload,
                (s.index * FRAME as u64) as u32,
                *level,
                previous,
            )
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let reported_loss = publisher.remote_loss();
    publisher.close().await?;
    // What the origin's jitter buffer did with the speaker's frames (the mixer's hop).
    let metrics = ureq::get(&format!("http://127.0.0.1:{}/metrics", 8301 + offset))
        .timeout(Duration::from_secs(5))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    let jitter: Vec<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("amphi_origin_jitter_"))
        .filter_map(|l| l.split_once("_frames_total "))
        .map(|(name, v)| format!("{name} {v}"))
        .collect();

    // The WHEP listener: the slot that carried our speaker.
    let mut received = Vec::new();
    while let Some(p) = listener.try_recv() {
        received.push(p);
    }
    let _ = listener.close().await;
    let mut slots = std::collections::HashMap::<usize, usize>::new();
    for p in &received {
        *slots.entry(p.slot).or_default() += 1;
    }
    let slot = slots.into_iter().max_by_key(|(_, n)| *n).map(|(s, _)| s);
    let packets: Vec<(u32, Vec<u8>)> = received
        .into_iter()
        .filter(|p| Some(p.slot) == slot)
        .map(|p| (p.ts, p.payload.to_vec()))
        .collect();
    let whep_packets = packets.len();
    write_wav(&opts.out.join("whep.wav"), &decode_received(packets)?)?;

    // End the room; its recording holds the whole program.
    ureq::post(&format!("{router}/v1/rooms/{room}/end"))
        .set("Authorization", &format!("Bearer {host}"))
        .timeout(Duration::from_secs(10))
        .call()
        .context("ending the room")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("{router}/v1/rooms/{room}/recording"))
        .timeout(Duration::from_secs(5))
        .call()
        .is_err()
    {
        ensure!(Instant::now() < deadline, "no recording 30 s after the end");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (rendition, file) in [("opus", "hls_opus.wav"), ("aac", "hls_aac.wav")] {
        let url = format!("{router}/hls/{room}/{rendition}/vod.m3u8");
        let out = opts.out.join(file);
        tokio::task::spawn_blocking(move || ffmpeg_decode(&url, &out)).await??;
    }
    println!(
        "quality run: {} frames, {} sent (uplink loss {:.1} %, jitter 0..{} ms, relay loss {:.1} %), \
         loss in the edge's last receiver report {}; WHEP listener got {whep_packets}; \
         origin jitter buffer frames: {}; WAVs in {}",
        frames.len(),
        plan.len(),
        opts.uplink_loss * 100.0,
        opts.jitter_ms,
        opts.relay_loss * 100.0,
        reported_loss.map_or("(none yet)".to_string(), |l| format!("{:.1} %", l * 100.0)),
        jitter.join(", "),
        opts.out.display()
    );
    drop(mesh);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_seeded_drops_about_the_loss_rate_and_reorders_with_jitter() {
        let a = schedule(2000, 0.05, 30, 7);
        assert_eq!(a, schedule(2000, 0.05, 30, 7));
        let lost = 2000 - a.len();
        assert!((60..140).contains(&lost), "lost {lost}");
        assert!(a.windows(2).any(|w| w[1].index < w[0].index));
        let clean = schedule(100, 0.0, 0, 1);
        assert_eq!(clean.len(), 100);
        assert!(clean.iter().enumerate().all(|(i, s)| s.index == i as u64));
    }

    #[test]
    fn wav_round_trips() {
        let dir = std::env::temp_dir().join(format!("amphi-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pcm: Vec<i16> = (0..4800).map(|i| (i * 7 % 3000) as i16 - 1500).collect();
        write_wav(&dir.join("a.wav"), &pcm).unwrap();
        assert_eq!(read_wav(&dir.join("a.wav")).unwrap(), pcm);
        std::fs::write(dir.join("b.wav"), b"RIFF\0\0\0\0WAVE").unwrap();
        assert!(read_wav(&dir.join("b.wav")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn receiver_recovers_a_lost_frame_from_fec() {
        let tone: Vec<i16> = (0..FRAME * 20)
            .map(|i| ((i as f32 * 0.05).sin() * 8000.0) as i16)
            .collect();
        let frames = encode_speaker(&tone, 0.2).unwrap();
        let all: Vec<(u32, Vec<u8>)> = frames
            .iter()
            .enumerate()
            .map(|(i, (p, _))| ((i * FRAME) as u32, p.clone()))
            .collect();
        let mut lossy = all.clone();
        lossy.remove(10);
        let full = decode_received(all).unwrap();
        let got = decode_received(lossy).unwrap();
        assert_eq!(got.len(), full.len());
        // The recovered frame carries the tone (PLC of a lost frame would too, but FEC is close
        // to the original).
        let err: f64 = (FRAME * 10..FRAME * 11)
            .map(|i| f64::from(got[i] - full[i]).powi(2))
            .sum::<f64>()
            / FRAME as f64;
        let pow: f64 = (FRAME * 10..FRAME * 11)
            .map(|i| f64::from(full[i]).powi(2))
            .sum::<f64>()
            / FRAME as f64;
        assert!(err < pow, "error {err} vs power {pow}");
    }
}
