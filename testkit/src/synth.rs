//! A synthetic program for benchmarks and load generators: a sine tone as 20 ms Opus packets,
//! as the origin's mixer would send it.

/// `count` consecutive 20 ms Opus packets (48 kHz mono, 64 kbps) of a `freq` Hz tone at
/// `amplitude` (0..1 of full scale).
pub fn tone_packets(freq: f64, amplitude: f64, count: usize) -> Result<Vec<Vec<u8>>, opus::Error> {
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio)?;
    enc.set_bitrate(opus::Bitrate::Bits(64_000))?;
    let mut pcm = [0i16; 960];
    let mut out = Vec::with_capacity(count);
    for f in 0..count {
        for (i, s) in pcm.iter_mut().enumerate() {
            let t = (f * 960 + i) as f64 / 48_000.0;
            *s = (amplitude * 32_767.0 * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16;
        }
        out.push(enc.encode_vec(&pcm, 1500)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn packets_decode_back_to_the_tone_length() {
        let p = super::tone_packets(440.0, 0.3, 5).unwrap();
        assert_eq!(p.len(), 5);
        let mut dec = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
        let mut pcm = [0i16; 960];
        assert_eq!(dec.decode(&p[0], &mut pcm, false).unwrap(), 960);
    }
}
