//! `amphi-tools bench mixer`: our mixer against `ffmpeg -filter_complex amix` + libopus on the same Opus
//! inputs (three speakers by default), each on one thread, CPU time compared.
//!
//! The inputs are generated once per run with ffmpeg (tones and pink noise, libopus 32 kbit/s,
//! 20 ms frames, Ogg), their packets read back with [`crate::ogg`], and fed to the origin's
//! [`RoomMixer`] in real-time order on simulated time (no sleeping).

use crate::loadgen_webrtc::thread_cpu_us;
use crate::ogg::{opus_packets, OggError};
use amphi_origin::jitter::FRAME_NS;
use amphi_origin::mixer::{MixError, MixerConfig, RoomMixer, SpeakerPacket};
use amphi_protocol::audio::FRAME_SAMPLES;
use amphi_protocol::RoomId;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Options of [`run_mixer_bench`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixerBenchOptions {
    /// Seconds of audio per speaker (60 for the full run, 5 for a smoke run).
    pub seconds: u32,
    /// Speakers in the room (1..=16): tones and pink noise.
    pub speakers: usize,
}

impl MixerBenchOptions {
    /// The 5 s smoke run with 3 speakers.
    pub fn smoke() -> Self {
        MixerBenchOptions {
            seconds: 5,
            speakers: 3,
        }
    }
}

impl Default for MixerBenchOptions {
    /// 60 s of audio, 3 speakers.
    fn default() -> Self {
        MixerBenchOptions {
            seconds: 60,
            speakers: 3,
        }
    }
}

/// The ffmpeg binary: `$AMPHI_FFMPEG`, else `/usr/bin/ffmpeg` if present, else `ffmpeg` on `PATH`.
fn ffmpeg_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AMPHI_FFMPEG") {
        return PathBuf::from(p);
    }
    let debian = Path::new("/usr/bin/ffmpeg");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("ffmpeg")
    }
}

/// Results of [`run_mixer_bench`].
#[derive(Clone, Debug)]
pub struct MixerBenchReport {
    /// Speakers mixed.
    pub speakers: usize,
    /// Program frames our mixer produced.
    pub frames: u64,
    /// Seconds of audio mixed (input length).
    pub audio_seconds: f64,
    /// Our mixer's thread CPU time (decode, mix, limit, encode).
    pub ours_cpu: Duration,
    /// ffmpeg's CPU time (user + system) for the same mix, libopus at its default complexity (10).
    pub ffmpeg_cpu: Duration,
    /// Our encoder complexity.
    pub ours_complexity: i32,
    /// ffmpeg's CPU time with libopus at our complexity (`-compression_level`).
    pub ffmpeg_cpu_same_complexity: Duration,
    /// Bytes of Opus our mixer produced.
    pub ours_bytes: u64,
}

impl MixerBenchReport {
    /// ffmpeg CPU time / our CPU time (> 1: we are faster).
    pub fn speedup(&self) -> f64 {
        self.ffmpeg_cpu.as_secs_f64() / self.ours_cpu.as_secs_f64().max(1e-9)
    }

    /// Same, with ffmpeg's libopus at our encoder complexity.
    pub fn speedup_same_complexity(&self) -> f64 {
        self.ffmpeg_cpu_same_complexity.as_secs_f64() / self.ours_cpu.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for MixerBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rt = |cpu: Duration| self.audio_seconds / cpu.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "mixer bench: {} speakers, {:.1} s of audio ({} program frames, {} bytes), one thread each",
            self.speakers, self.audio_seconds, self.frames, self.ours_bytes
        )?;
        let c = self.ours_complexity;
        for (name, cpu) in [
            (
                format!("amphi mixer, encoder complexity {c}"),
                self.ours_cpu,
            ),
            (
                "ffmpeg amix + libopus, complexity 10".to_string(),
                self.ffmpeg_cpu,
            ),
            (
                format!("ffmpeg amix + libopus, complexity {c}"),
                self.ffmpeg_cpu_same_complexity,
            ),
        ] {
            writeln!(
                f,
                "  {name:<40} cpu {:.3} s  {:>5.0}x realtime",
                cpu.as_secs_f64(),
                rt(cpu)
            )?;
        }
        write!(
            f,
            "  ratio ffmpeg / ours: {:.2}x (ffmpeg defaults), {:.2}x (same encoder complexity)",
            self.speedup(),
            self.speedup_same_complexity()
        )
    }
}

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// File or process IO.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// ffmpeg exited with an error.
    #[error("ffmpeg failed: {0}")]
    Ffmpeg(String),
    /// An input could not be read back.
    #[error("reading input: {0}")]
    Ogg(#[from] OggError),
    /// Our mixer failed.
    #[error("mixer: {0}")]
    Mix(#[from] MixError),
    /// The Opus encoder of the DTX benchmark failed.
    #[error("opus encoder: {0}")]
    Encoder(String),
}

/// User + system CPU time of waited-for children so far.
fn children_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn ffmpeg(bin: &Path, args: &[&str]) -> Result<(), BenchError> {
    let out = Command::new(bin)
        .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Ffmpeg(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Mix the speakers with our mixer and with ffmpeg; see the module documentation.
pub fn run_mixer_bench(opts: MixerBenchOptions) -> Result<MixerBenchReport, BenchError> {
    let seconds = opts.seconds.max(1);
    let speakers = opts.speakers.clamp(1, 16);
    let bin = ffmpeg_bin();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = TempDir(
        std::env::temp_dir().join(format!("amphi-mixer-bench-{}-{nanos}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0)?;
    let mut inputs = Vec::new();
    for i in 0..speakers {
        let src = if i % 3 == 2 {
            format!(
                "anoisesrc=color=pink:amplitude=0.2:seed={i}:sample_rate=48000:duration={seconds}"
            )
        } else {
            format!(
                "sine=frequency={}:sample_rate=48000:duration={seconds}",
                440 + 110 * i
            )
        };
        let path = dir
            .0
            .join(format!("in{i}.opus"))
            .to_string_lossy()
            .into_owned();
        let args = format!("-f lavfi -i {src} -ac 1 -c:a libopus -b:a 32k -frame_duration 20");
        let mut args: Vec<&str> = args.split_whitespace().collect();
        args.push(&path);
        ffmpeg(&bin, &args)?;
        inputs.push(path);
    }
    let mut packets = Vec::new();
    for path in &inputs {
        packets.push(opus_packets(&std::fs::read(path)?)?);
    }

    let cfg = MixerConfig::default();
    let complexity = cfg.encoder_complexity;
    let (frames, ours_cpu, ours_bytes) = mix_ours(&packets, cfg)?;

    let out = dir.0.join("amix.opus").to_string_lossy().into_owned();
    let amix = |extra: &str| -> Result<Duration, BenchError> {
        let mut args = vec!["-filter_threads", "1", "-filter_complex_threads", "1"];
        for input in &inputs {
            args.extend_from_slice(&["-threads", "1", "-i", input]);
        }
        let filter = format!("amix=inputs={speakers}:duration=longest");
        args.extend_from_slice(&["-filter_complex", &filter]);
        let encode = format!(
            "-ac 1 -ar 48000 -c:a libopus -b:a 64k -frame_duration 20 -application audio \
             -threads 1 {extra} -f ogg"
        );
        args.extend(encode.split_whitespace());
        args.push(&out);
        let before = children_cpu();
        ffmpeg(&bin, &args)?;
        Ok(children_cpu().saturating_sub(before))
    };
    let ffmpeg_cpu = amix("")?;
    let ffmpeg_cpu_same_complexity = amix(&format!("-compression_level {complexity}"))?;

    let input_frames = packets.iter().map(Vec::len).max().unwrap_or(0);
    Ok(MixerBenchReport {
        speakers: packets.len(),
        frames,
        audio_seconds: input_frames as f64 * 0.02,
        ours_cpu,
        ffmpeg_cpu,
        ours_complexity: complexity,
        ffmpeg_cpu_same_complexity,
        ours_bytes,
    })
}

/// Feed `inputs` (one packet list per speaker) to one room mixer in real-time order on simulated
/// time; returns (frames, thread CPU time, output bytes).
fn mix_ours(inputs: &[Vec<Vec<u8>>], cfg: MixerConfig) -> Result<(u64, Duration, u64), BenchError> {
    let mut mixer = RoomMixer::new(RoomId(1), cfg)?;
    let len = inputs.iter().map(Vec::len).max().unwrap_or(0) as u64;
    // The jitter buffer holds at most 3 ticks at the start; mix until everything played out.
    let ticks = len + 4;
    let mut bytes = 0u64;
    let start = thread_cpu_us();
    for tick in 0..ticks {
        for (s, packets) in inputs.iter().enumerate() {
            if let Some(p) = packets.get(tick as usize) {
                let arrival = tick as i64 * FRAME_NS + (s as i64 + 1) * 1_000_000;
                let ts = (s as u32 * 123_457)
                    .wrapping_add((tick as u32).wrapping_mul(FRAME_SAMPLES as u32));
                mixer.push(
                    s as u32 + 1,
                    SpeakerPacket {
                        seq: tick as u16,
                        rtp_ts: ts,
                        payload: p,
                        level: 30,
                    },
                    arrival,
                    tick,
                )?;
            }
        }
        bytes += mixer.mix(tick)?.payload.len() as u64;
    }
    let cpu = Duration::from_secs_f64((thread_cpu_us() - start).max(0.0) / 1e6);
    Ok((mixer.frame_index(), cpu, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_run_measures_both() {
        let report = run_mixer_bench(MixerBenchOptions::smoke()).unwrap();
        assert_eq!(report.speakers, 3);
        assert!((4.9..=5.1).contains(&report.audio_seconds), "{report}");
        assert!(report.frames >= 250);
        assert!(report.ours_cpu > Duration::ZERO);
        assert!(report.ffmpeg_cpu > Duration::ZERO);
        assert!(report.ffmpeg_cpu_same_complexity > Duration::ZERO);
        assert!(report.ours_bytes > 250 * 100, "{report}");
        assert!(report.to_string().contains("ratio ffmpeg / ours"));
    }
}

/// Results of [`run_dtx_bench`]: one room of ten speakers who take turns, its senders with and
/// without Opus DTX, mixed side by side.
#[derive(Clone, Debug)]
pub struct DtxBenchReport {
    /// Speakers in the room (one talks at a time).
    pub speakers: usize,
    /// Seconds of audio per speaker.
    pub audio_seconds: f64,
    /// Without DTX, then with: (packets sent per second over all speakers, the mixer's thread
    /// CPU per second of audio, frames concealed, frames of DTX pauses played as silence).
    pub runs: [(f64, Duration, u64, u64); 2],
}

impl fmt::Display for DtxBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dtx bench: {} speakers taking turns, {:.0} s, libopus 32 kbit/s VoIP with in-band FEC",
            self.speakers, self.audio_seconds
        )?;
        for (name, (pps, cpu, concealed, silent)) in
            ["without DTX", "with DTX"].iter().zip(self.runs)
        {
            writeln!(
                f,
                "  {name:<12} relay {pps:>6.1} packets/s   mixer cpu {:>6.3} ms per audio second   concealed {concealed}   DTX silence {silent}",
                cpu.as_secs_f64() * 1e3 / self.audio_seconds
            )?;
        }
        let [(pps0, cpu0, ..), (pps1, cpu1, ..)] = self.runs;
        write!(
            f,
            "  with DTX / without: relay packets {:.2}x, mixer cpu {:.2}x",
            pps1 / pps0.max(1e-9),
            cpu1.as_secs_f64() / cpu0.as_secs_f64().max(1e-9)
        )
    }
}

/// A libopus encoder (VoIP, mono, 32 kbit/s, in-band FEC) with DTX on or off.
struct DtxEncoder(std::ptr::NonNull<opusic_sys::OpusEncoder>);

impl DtxEncoder {
    fn new(dtx: bool) -> Result<Self, BenchError> {
        let mut err = 0;
        // SAFETY: valid sample rate, channel count and application; `err` outlives the call.
        let enc = unsafe {
            opusic_sys::opus_encoder_create(48_000, 1, opusic_sys::OPUS_APPLICATION_VOIP, &mut err)
        };
        let enc = std::ptr::NonNull::new(enc)
            .filter(|_| err == opusic_sys::OPUS_OK)
            .ok_or_else(|| BenchError::Encoder(format!("opus_encoder_create: {err}")))?;
        let encoder = DtxEncoder(enc);
        for (request, value) in [
            (opusic_sys::OPUS_SET_BITRATE_REQUEST, 32_000),
            (opusic_sys::OPUS_SET_INBAND_FEC_REQUEST, 1),
            (opusic_sys::OPUS_SET_DTX_REQUEST, i32::from(dtx)),
        ] {
            // SAFETY: a live encoder; these requests take one int argument.
            let r = unsafe { opusic_sys::opus_encoder_ctl(encoder.0.as_ptr(), request, value) };
            if r != opusic_sys::OPUS_OK {
                return Err(BenchError::Encoder(format!(
                    "opus_encoder_ctl({request}): {r}"
                )));
            }
        }
        Ok(encoder)
    }

    /// Encode one 20 ms frame into `out`; the packet's length.
    fn encode(&mut self, pcm: &[i16; FRAME_SAMPLES], out: &mut [u8]) -> Result<usize, BenchError> {
        // SAFETY: a live encoder, a full frame of samples, and `out` with its true length.
        let n = unsafe {
            opusic_sys::opus_encode(
                self.0.as_ptr(),
                pcm.as_ptr(),
                FRAME_SAMPLES as i32,
                out.as_mut_ptr(),
                out.len() as i32,
            )
        };
        usize::try_from(n).map_err(|_| BenchError::Encoder(format!("opus_encode: {n}")))
    }
}

impl Drop for DtxEncoder {
    fn drop(&mut self) {
        // SAFETY: created by opus_encoder_create and destroyed once.
        unsafe { opusic_sys::opus_encoder_destroy(self.0.as_ptr()) }
    }
}

/// Speaker `speaker`'s 20 ms frame `frame` of a room where each of `speakers` talks for
/// `turn_frames` in turn: a voice-like harmonic tone with a 4 Hz syllable envelope while talking,
/// room noise at about -66 dBFS otherwise.
fn turn_frame(
    speaker: usize,
    speakers: usize,
    frame: u64,
    turn_frames: u64,
    out: &mut [i16; FRAME_SAMPLES],
) {
    let talking = (frame / turn_frames) as usize % speakers == speaker;
    let pitch = 110.0 + 15.0 * speaker as f32;
    let mut noise = (frame as u32).wrapping_mul(2_654_435_761) ^ speaker as u32;
    for (i, s) in out.iter_mut().enumerate() {
        let t = (frame as f32 * FRAME_SAMPLES as f32 + i as f32) / 48_000.0;
        noise ^= noise << 13;
        noise ^= noise >> 17;
        noise ^= noise << 5;
        let hiss = (noise as i32 >> 22) as f32 / 512.0 * 16.0;
        let voice = if talking {
            let envelope = 0.55 + 0.45 * (std::f32::consts::TAU * 4.0 * t).sin();
            (1..=6)
                .map(|h| (std::f32::consts::TAU * pitch * h as f32 * t).sin() / h as f32)
                .sum::<f32>()
                * 6_000.0
                * envelope
        } else {
            0.0
        };
        *s = (voice + hiss).clamp(-32_768.0, 32_767.0) as i16;
    }
}

/// RFC 6464 level (0 loudest ..= 127 silence, -dBov) of a frame, as a browser reports it.
fn frame_level(pcm: &[i16; FRAME_SAMPLES]) -> u8 {
    let energy: f64 = pcm.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    let rms = (energy / FRAME_SAMPLES as f64).sqrt() / 32_768.0;
    if rms <= 0.0 {
        return 127;
    }
    (-20.0 * rms.log10()).clamp(0.0, 127.0) as u8
}

/// What one sender puts on the wire, frame by frame: `None` where DTX sends nothing (libopus
/// packets of two bytes or less, which WebRTC does not transmit), else (sequence number, level,
/// packet).
type Sent = Vec<Option<(u16, u8, Vec<u8>)>>;

fn encode_turns(
    speakers: usize,
    frames: u64,
    turn_frames: u64,
    dtx: bool,
) -> Result<Vec<Sent>, BenchError> {
    let mut out = Vec::with_capacity(speakers);
    let mut pcm = [0i16; FRAME_SAMPLES];
    let mut buf = [0u8; 1500];
    for s in 0..speakers {
        let mut enc = DtxEncoder::new(dtx)?;
        let mut seq = 0u16;
        let mut sent = Vec::with_capacity(frames as usize);
        for frame in 0..frames {
            turn_frame(s, speakers, frame, turn_frames, &mut pcm);
            let n = enc.encode(&pcm, &mut buf)?;
            if n <= 2 {
                sent.push(None);
            } else {
                sent.push(Some((seq, frame_level(&pcm), buf[..n].to_vec())));
                seq = seq.wrapping_add(1);
            }
        }
        out.push(sent);
    }
    Ok(out)
}

/// Mix what the senders sent on simulated time (no sleeping): (packets, mixer CPU, concealed,
/// DTX silence).
fn mix_sent(senders: &[Sent], cfg: MixerConfig) -> Result<(u64, Duration, u64, u64), BenchError> {
    let mut mixer = RoomMixer::new(RoomId(1), cfg)?;
    let frames = senders.iter().map(Vec::len).max().unwrap_or(0) as u64;
    let mut packets = 0u64;
    let start = thread_cpu_us();
    for tick in 0..frames + 4 {
        for (s, sent) in senders.iter().enumerate() {
            if let Some(Some((seq, level, payload))) = sent.get(tick as usize) {
                let arrival = tick as i64 * FRAME_NS + (s as i64 + 1) * 1_000_000;
                let rtp_ts = (s as u32 * 123_457)
                    .wrapping_add((tick as u32).wrapping_mul(FRAME_SAMPLES as u32));
                let packet = SpeakerPacket {
                    seq: *seq,
                    rtp_ts,
                    payload,
                    level: *level,
                };
                mixer.push(s as u32 + 1, packet, arrival, tick)?;
                packets += 1;
            }
        }
        mixer.mix(tick)?;
    }
    let cpu = Duration::from_secs_f64((thread_cpu_us() - start).max(0.0) / 1e6);
    let stats = mixer.stats().jitter;
    Ok((packets, cpu, stats.concealed, stats.dtx_silent))
}

/// Ten speakers who take 2 s turns, encoded with libopus without and with DTX, mixed by our
/// mixer side by side: relay packets per second and mixer CPU.
pub fn run_dtx_bench(seconds: u32) -> Result<DtxBenchReport, BenchError> {
    const SPEAKERS: usize = 10;
    let frames = u64::from(seconds.max(1)) * 50;
    let mut runs = [(0.0, Duration::ZERO, 0, 0); 2];
    for (run, dtx) in runs.iter_mut().zip([false, true]) {
        let senders = encode_turns(SPEAKERS, frames, 100, dtx)?;
        let (packets, cpu, concealed, silent) = mix_sent(&senders, MixerConfig::default())?;
        *run = (
            packets as f64 / f64::from(seconds.max(1)),
            cpu,
            concealed,
            silent,
        );
    }
    Ok(DtxBenchReport {
        speakers: SPEAKERS,
        audio_seconds: f64::from(seconds.max(1)),
        runs,
    })
}
