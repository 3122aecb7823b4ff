//! From a decoded recording to clips: silence trimmed at both ends, long recordings
//! cut into evenly spaced crops, two clips mixed, 16-bit WAV written.

use std::io::Write;
use std::path::Path;

/// Amplitude of a level in dB below full scale.
pub fn db_to_amplitude(db: f64) -> f32 {
    10f64.powf(db / 20.0) as f32
}

/// Root mean square of a signal (0 for an empty one).
pub fn rms(samples: &[f32]) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: f64 = samples.iter().map(|&s| (s as f64) * (s as f64)).sum();
    (sum / samples.len() as f64).sqrt() as f32
}

/// The part between the first and the last 10 ms window whose RMS reaches
/// `threshold`, with 50 ms of margin; `None` when no window does.
pub fn trim_silence(samples: &[f32], rate: u32, threshold: f32) -> Option<&[f32]> {
    let window = (rate as usize / 100).max(1);
    let loud =
        |i: usize| rms(&samples[i * window..((i + 1) * window).min(samples.len())]) >= threshold;
    let windows = samples.len().div_ceil(window);
    let first = (0..windows).find(|&i| loud(i))?;
    let last = (0..windows).rev().find(|&i| loud(i))?;
    let margin = rate as usize / 20;
    let start = (first * window).saturating_sub(margin);
    let end = ((last + 1) * window + margin).min(samples.len());
    Some(&samples[start..end])
}

/// Start offsets of at most `max_crops` crops of `crop_len` samples, evenly spread
/// over a recording of `len` samples (first at 0, last ending at the end). A
/// recording no longer than one crop is one clip starting at 0.
pub fn crop_starts(len: usize, crop_len: usize, max_crops: usize) -> Vec<usize> {
    if len <= crop_len || max_crops <= 1 {
        return vec![0];
    }
    let n = len.div_ceil(crop_len).min(max_crops).max(1);
    let span = len - crop_len;
    (0..n).map(|i| span * i / (n - 1).max(1)).collect()
}

/// Scales a clip down so its peak stays below full scale (-1 dBFS); quieter clips
/// keep their level.
pub fn limit_peak(samples: &mut [f32]) {
    let peak = samples.iter().fold(0f32, |m, &s| m.max(s.abs()));
    let ceiling = db_to_amplitude(-1.0);
    if peak > ceiling {
        let g = ceiling / peak;
        samples.iter_mut().for_each(|s| *s *= g);
    }
}

/// `a` with `b` added `quieter_db` below it (levels compared by RMS), starting at
/// `offset` samples into `a`; `b` is cut where `a` ends. The result's peak is limited.
pub fn mix(a: &[f32], b: &[f32], quieter_db: f64, offset: usize) -> Vec<f32> {
    let (ra, rb) = (rms(a), rms(b));
    let gain = if rb > 0.0 {
        ra / rb * db_to_amplitude(-quieter_db)
    } else {
        0.0
    };
    let mut out = a.to_vec();
    for (o, &s) in out.iter_mut().skip(offset).zip(b) {
        *o += gain * s;
    }
    limit_peak(&mut out);
    out
}

/// Writes mono 16-bit PCM WAV, synced to disk.
pub fn write_wav(path: &Path, samples: &[f32], rate: u32) -> std::io::Result<()> {
    let bytes = crate::audio::wav::encode_pcm16(samples.iter().copied(), rate);
    let mut file = std::fs::File::create(path)?;
    file.write_all(&bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_trimmed_with_a_margin_and_all_silence_is_none() {
        let rate = 1000;
        let mut x = vec![0.0f32; 3000];
        for s in &mut x[1000..1500] {
            *s = 0.5;
        }
        let t = trim_silence(&x, rate, 0.01).unwrap();
        // 500 loud samples plus 50 ms (50 samples) each side.
        assert_eq!(t.len(), 600);
        assert!(trim_silence(&vec![1e-5; 3000], rate, 0.01).is_none());
    }

    #[test]
    fn crops_spread_evenly_and_stay_inside() {
        assert_eq!(crop_starts(50, 100, 3), vec![0]);
        assert_eq!(crop_starts(250, 100, 3), vec![0, 75, 150]);
        assert_eq!(crop_starts(1000, 100, 3), vec![0, 450, 900]);
        assert_eq!(crop_starts(150, 100, 3), vec![0, 50]);
        assert_eq!(crop_starts(1000, 100, 1), vec![0]);
    }

    #[test]
    fn the_second_clip_sits_below_the_first_by_rms() {
        let a = vec![0.1f32; 100];
        let b = vec![0.5f32; 40];
        let m = mix(&a, &b, 6.0, 10);
        let added = m[20] - 0.1;
        assert!((20.0 * (added / 0.1).log10() + 6.0).abs() < 1e-3);
        assert_eq!(m[5], 0.1);
        assert_eq!(m[60], 0.1);
        assert_eq!(m.len(), 100);
    }

    #[test]
    fn wav_round_trips_through_the_decoder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wav");
        let x: Vec<f32> = (0..1600).map(|i| (i as f32 * 0.05).sin() * 0.5).collect();
        write_wav(&path, &x, 16_000).unwrap();
        let decoded = crate::audio::decode::decode_file(&path).unwrap();
        assert_eq!(decoded.info.sample_rate, 16_000);
        assert_eq!(decoded.samples.len(), 1600);
        for (a, b) in x.iter().zip(&decoded.samples) {
            assert!((a - b).abs() < 1e-4);
        }
    }
}
