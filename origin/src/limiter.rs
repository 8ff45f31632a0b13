//! Soft limiter and RFC 6464 audio level of a mixed frame (sans-IO, allocation-free).

use amphi_protocol::audio::SAMPLE_RATE;

/// Peak limiter without look-ahead: instantaneous attack (the gain drops at once to what keeps the
/// current sample under the threshold), exponential release back to unity. A final saturation to
/// full scale guarantees the output never exceeds it; nothing ever wraps.
#[derive(Clone, Debug)]
pub struct Limiter {
    threshold: f32,
    release: f32,
    gain: f32,
}

impl Limiter {
    /// A limiter with `threshold` (linear, full scale = 1.0) and a release time constant.
    pub fn new(threshold: f32, release_ms: f32) -> Self {
        let samples = (release_ms.max(0.01) / 1000.0) * SAMPLE_RATE as f32;
        Limiter {
            threshold: threshold.clamp(0.01, 1.0),
            release: 1.0 - (-1.0 / samples).exp(),
            gain: 1.0,
        }
    }

    /// Current gain (1.0 = no reduction).
    pub fn gain(&self) -> f32 {
        self.gain
    }

    /// Limit `buf` in place.
    pub fn process(&mut self, buf: &mut [f32]) {
        let thr = self.threshold;
        if self.gain >= 1.0 && peak(buf) <= thr {
            return; // fully released and nothing to limit
        }
        let mut gain = self.gain;
        for x in buf.iter_mut() {
            let a = x.abs();
            let needed = if a > thr { thr / a } else { 1.0 };
            if needed < gain {
                gain = needed;
            } else {
                gain += (needed - gain) * self.release;
                if gain > 0.9999 {
                    gain = 1.0;
                }
            }
            // NaN-free input stays finite; clamp saturates whatever is left.
            *x = (*x * gain).clamp(-1.0, 1.0);
        }
        self.gain = gain;
    }
}

impl Default for Limiter {
    /// -1 dBFS threshold, 80 ms release.
    fn default() -> Self {
        Limiter::new(0.891, 80.0)
    }
}

/// Largest absolute sample value (0 for an empty slice).
pub fn peak(samples: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = samples.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.max(x.abs());
        }
    }
    rest.iter().chain(&acc).fold(0f32, |m, x| m.max(x.abs()))
}

/// Sum of squares of `samples` (eight independent accumulators so it vectorizes).
pub fn energy(samples: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = samples.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|x| x * x).sum::<f32>()
}

/// RFC 6464 level of `samples` (full scale = 1.0): 0 (0 dBov) ..= 127 (-127 dBov or digital silence).
pub fn audio_level(samples: &[f32]) -> u8 {
    if samples.is_empty() {
        return 127;
    }
    let rms = (energy(samples) / samples.len() as f32).sqrt();
    if rms.is_nan() || rms <= 0.0 {
        return 127;
    }
    let dbov = 20.0 * rms.log10();
    (-dbov).round().clamp(0.0, 127.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f32::consts::TAU;

    #[test]
    fn three_full_scale_speakers_never_exceed_or_wrap() {
        let mut lim = Limiter::default();
        let mut buf = vec![0f32; 960];
        for frame in 0..50 {
            for (i, x) in buf.iter_mut().enumerate() {
                let t = (frame * 960 + i) as f32 / 48_000.0;
                *x = (TAU * 440.0 * t).sin() + (TAU * 660.0 * t).sin() + (TAU * 880.0 * t).sin();
            }
            let input = buf.clone();
            lim.process(&mut buf);
            for (y, x) in buf.iter().zip(&input) {
                assert!(y.abs() <= 1.0, "{y}");
                // Never wraps: the output keeps the input's sign.
                assert!(*y == 0.0 || y.signum() == x.signum(), "{x} -> {y}");
            }
        }
        assert!(lim.gain() < 0.5);
    }

    #[test]
    fn quiet_signal_passes_untouched_and_gain_recovers() {
        let mut lim = Limiter::default();
        let mut loud = vec![3.0f32; 960];
        lim.process(&mut loud);
        assert!(loud.iter().all(|&y| y <= 0.891 + 1e-6));
        let mut quiet = vec![0.1f32; 48_000];
        lim.process(&mut quiet);
        assert!((quiet[47_999] - 0.1).abs() < 1e-3);
    }

    #[test]
    fn peak_and_energy() {
        let v: Vec<f32> = (0..21)
            .map(|i| i as f32 * if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        assert_eq!(peak(&v), 20.0);
        assert_eq!(energy(&v), (0..21).map(|i| (i * i) as f32).sum::<f32>());
        assert_eq!(peak(&[]), 0.0);
    }

    #[test]
    fn levels() {
        assert_eq!(audio_level(&[0.0; 960]), 127);
        assert_eq!(audio_level(&[]), 127);
        assert_eq!(audio_level(&[1.0; 960]), 0);
        assert_eq!(audio_level(&[0.01; 960]), 40);
        assert_eq!(audio_level(&[1e-9; 960]), 127);
    }
}
