//! The benchmark's test clips: WAV files synthesised on the spot (a chirp over
//! noise, different per clip) at the rate and length the options ask for.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Writes `count` test clips of `seconds` at `rate` Hz (16-bit PCM WAV,
/// a chirp over noise, different per clip) and returns their paths.
pub(super) fn write_clips(
    dir: &Path,
    rate: u32,
    seconds: f64,
    count: usize,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let samples = (seconds * f64::from(rate)).round() as usize;
    (0..count.max(1))
        .map(|k| {
            let path = dir.join(format!("clip-{rate}hz-{seconds}s-{k}.wav"));
            if !path.is_file() {
                let wav = synthetic_wav(rate, samples, k as u64);
                crate::atomic::write_file(&path, |staging| std::fs::write(staging, &wav), |e| e)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(path)
        })
        .collect()
}

/// A mono 16-bit PCM WAV file: a rising chirp over white noise.
pub(super) fn synthetic_wav(rate: u32, samples: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let (f0, f1) = (200.0 + 50.0 * seed as f64, 4000.0);
    let duration = samples as f64 / f64::from(rate);
    let signal = (0..samples).map(move |i| {
        let t = i as f64 / f64::from(rate);
        let phase = 2.0 * std::f64::consts::PI * (f0 * t + (f1 - f0) * t * t / (2.0 * duration));
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        (0.3 * phase.sin() + 0.1 * noise) as f32
    });
    crate::audio::wav::encode_pcm16(signal, rate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::decode::decode_file;
    use crate::audio::fbank::Fbank;
    use crate::bench::measure::front_end;

    #[test]
    fn synthetic_wavs_decode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.wav");
        std::fs::write(&path, synthetic_wav(16_000, 16_000, 3)).unwrap();
        let audio = decode_file(&path).unwrap();
        assert_eq!(audio.info.sample_rate, 16_000);
        assert_eq!(audio.samples.len(), 16_000);
        let peak = audio.samples.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((0.3..0.45).contains(&peak), "{peak}");

        // A 44.1 kHz clip is resampled to the model's rate by the front end.
        let fbank = Fbank::new(crate::audio::fbank::FbankConfig::default()).unwrap();
        let path = dir.path().join("b.wav");
        std::fs::write(&path, synthetic_wav(44_100, 44_100, 3)).unwrap();
        let frames = front_end(&fbank, &path).unwrap();
        assert_eq!(frames.num_frames, fbank.num_frames(16_000));
        assert!(frames.data.iter().all(|v| v.is_finite()));
    }
}
