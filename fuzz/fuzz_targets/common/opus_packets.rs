//! Real Opus packets of a 440 Hz tone in the modes browsers and the origin's program encoder
//! produce (SILK with in-band FEC, hybrid, CELT), so fuzzed payloads reach deep into libopus.

use amphi_protocol::audio::{FRAME_SAMPLES, SAMPLE_RATE};
use amphi_protocol::relay::MAX_OPUS_PAYLOAD;
use opus::{Application, Bitrate, Channels, Encoder};
use std::sync::OnceLock;

/// The packets (18: six consecutive frames of each of three modes).
pub fn packets() -> &'static [Vec<u8>] {
    static PACKETS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    PACKETS.get_or_init(|| {
        let mut out = Vec::new();
        for (app, bitrate, fec) in [
            (Application::Voip, 16_000, true),
            (Application::Voip, 32_000, true),
            (Application::Audio, 64_000, false),
        ] {
            let mut enc = Encoder::new(SAMPLE_RATE, Channels::Mono, app).expect("encoder");
            enc.set_bitrate(Bitrate::Bits(bitrate)).expect("bitrate");
            enc.set_inband_fec(fec).expect("fec");
            enc.set_packet_loss_perc(if fec { 20 } else { 0 })
                .expect("loss");
            let mut pcm = vec![0f32; FRAME_SAMPLES];
            for f in 0..6 {
                for (i, x) in pcm.iter_mut().enumerate() {
                    let t = (f * FRAME_SAMPLES + i) as f32 / SAMPLE_RATE as f32;
                    *x = 0.3 * (std::f32::consts::TAU * 440.0 * t).sin();
                }
                out.push(
                    enc.encode_vec_float(&pcm, MAX_OPUS_PAYLOAD)
                        .expect("encode"),
                );
            }
        }
        out
    })
}
