//! Synthetic signals: tones, beeps, sweeps, noise, rumble and near silence, each
//! recording with its own seeded parameters (length, pitch, level).

use std::f64::consts::TAU;

use super::catalog::SignalKind;
use crate::rng::SplitMix64;

/// One generated recording.
pub fn generate(kind: SignalKind, rate: u32, max_seconds: f64, rng: &mut SplitMix64) -> Vec<f32> {
    let seconds = 2.0 + rng.next_f64() * (max_seconds - 2.0).max(0.0);
    let n = (seconds * rate as f64) as usize;
    let level = 0.1 + 0.4 * rng.next_f64();
    let sr = rate as f64;
    let between = |rng: &mut SplitMix64, lo: f64, hi: f64| lo + (hi - lo) * rng.next_f64();
    let mut out = vec![0f32; n];
    match kind {
        SignalKind::LowTone | SignalKind::HighTone => {
            let f = if kind == SignalKind::LowTone {
                between(rng, 80.0, 300.0)
            } else {
                between(rng, 1500.0, 4000.0)
            };
            for (i, s) in out.iter_mut().enumerate() {
                *s = (level * (TAU * f * i as f64 / sr).sin()) as f32;
            }
            fade(&mut out, rate);
        }
        SignalKind::Beeps => {
            let f = between(rng, 600.0, 2500.0);
            let on = between(rng, 0.08, 0.3);
            let period = on + between(rng, 0.1, 0.6);
            for (i, s) in out.iter_mut().enumerate() {
                let t = i as f64 / sr;
                if t % period < on {
                    *s = (level * (TAU * f * t).sin()) as f32;
                }
            }
        }
        SignalKind::RisingSweep | SignalKind::FallingSweep => {
            let (lo, hi) = (between(rng, 100.0, 400.0), between(rng, 2000.0, 6000.0));
            let (f0, f1) = if kind == SignalKind::RisingSweep {
                (lo, hi)
            } else {
                (hi, lo)
            };
            // Exponential sweep: the phase is the integral of the frequency.
            let k = (f1 / f0).ln() / seconds;
            for (i, s) in out.iter_mut().enumerate() {
                let t = i as f64 / sr;
                let phase = TAU * f0 * ((k * t).exp() - 1.0) / k;
                *s = (level * phase.sin()) as f32;
            }
            fade(&mut out, rate);
        }
        SignalKind::WhiteNoise => {
            for s in out.iter_mut() {
                *s = (level * 0.5 * (2.0 * rng.next_f64() - 1.0)) as f32;
            }
            fade(&mut out, rate);
        }
        SignalKind::Rumble => {
            // Brown noise: leaky integral of white noise, normalised to the level.
            let mut acc = 0f64;
            for s in out.iter_mut() {
                acc = 0.995 * acc + 0.05 * (2.0 * rng.next_f64() - 1.0);
                *s = acc as f32;
            }
            let r = super::clips::rms(&out).max(1e-9);
            let g = (level * 0.5) as f32 / r;
            out.iter_mut().for_each(|s| *s *= g);
            fade(&mut out, rate);
        }
        SignalKind::Silence => {
            // A faint noise floor (about -70 dBFS): real "silent" recordings are never
            // digital zero.
            for s in out.iter_mut() {
                *s = (3e-4 * (2.0 * rng.next_f64() - 1.0)) as f32;
            }
        }
    }
    super::clips::limit_peak(&mut out);
    out
}

/// 20 ms fades at both ends, so a clip does not start or stop with a click.
fn fade(samples: &mut [f32], rate: u32) {
    let n = (rate as usize / 50).min(samples.len() / 2);
    for i in 0..n {
        let g = i as f32 / n as f32;
        samples[i] *= g;
        let j = samples.len() - 1 - i;
        samples[j] *= g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frequency of the strongest spectral peak, by brute-force DFT on a short frame.
    fn dominant_hz(x: &[f32], rate: u32) -> f64 {
        let frame = &x[x.len() / 2..x.len() / 2 + 2048];
        (1..1024)
            .map(|k| {
                let (mut re, mut im) = (0f64, 0f64);
                for (i, &s) in frame.iter().enumerate() {
                    let a = TAU * k as f64 * i as f64 / 2048.0;
                    re += s as f64 * a.cos();
                    im += s as f64 * a.sin();
                }
                (k as f64 * rate as f64 / 2048.0, re * re + im * im)
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(f, _)| f)
            .unwrap_or(0.0)
    }

    #[test]
    fn tones_are_in_their_band_and_silence_is_faint() {
        let mut rng = SplitMix64::new(1);
        for _ in 0..3 {
            let low = generate(SignalKind::LowTone, 16_000, 10.0, &mut rng);
            let f = dominant_hz(&low, 16_000);
            assert!((70.0..=310.0).contains(&f), "{f}");
            let high = generate(SignalKind::HighTone, 16_000, 10.0, &mut rng);
            let f = dominant_hz(&high, 16_000);
            assert!((1490.0..=4010.0).contains(&f), "{f}");
            let quiet = generate(SignalKind::Silence, 16_000, 10.0, &mut rng);
            assert!(super::super::clips::rms(&quiet) < 1e-3);
            assert!(quiet.len() >= 32_000 && quiet.len() <= 160_000);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_signal() {
        let a = generate(SignalKind::Rumble, 16_000, 5.0, &mut SplitMix64::new(7));
        let b = generate(SignalKind::Rumble, 16_000, 5.0, &mut SplitMix64::new(7));
        assert_eq!(a, b);
        let c = generate(SignalKind::Rumble, 16_000, 5.0, &mut SplitMix64::new(8));
        assert_ne!(a, c);
    }
}
