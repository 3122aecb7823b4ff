//! The BEATs front end: Kaldi-compatible log-mel filterbank features, normalised.
//!
//! This is `torchaudio.compliance.kaldi.fbank` with the arguments that BEATs'
//! `preprocess` passes (128 mel bins, 25 ms frames, 10 ms shift, every other option at
//! its default), followed by BEATs' normalisation `(fbank - mean) / (2 * std)`. Per
//! frame of the waveform (scaled by `input_scale`):
//!
//! 1. remove the DC offset (subtract the frame's mean);
//! 2. pre-emphasis `x[i] - p * x[i - 1]`, with `x[-1] = x[0]` (torchaudio's replicate
//!    padding);
//! 3. multiply by the Povey window and zero-pad to the FFT size;
//! 4. power spectrum `|rfft|^2`;
//! 5. triangular mel filters (Kaldi's `get_mel_banks`), `ln(max(energy, log_floor))`;
//! 6. normalise.
//!
//! Frames follow Kaldi's `snip_edges = true`: only whole frames are kept, so a clip
//! shorter than one frame gives zero frames. Dither is not supported (BEATs sets it to
//! 0), which keeps the features deterministic.
//!
//! The reference computes in float32; this implementation computes in float64 and
//! rounds the result to float32, so it is at least as accurate as the reference.

use std::fmt;
use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};
use serde::{Deserialize, Serialize};

use crate::config::ConfigProblem;

/// Largest accepted analysis window, in samples (a sanity bound for manifests).
const MAX_WINDOW_SIZE: usize = 1 << 20;
/// Largest accepted number of mel bins (a sanity bound for manifests).
const MAX_MEL_BINS: usize = 1 << 16;

/// Everything that determines the features. [`Default`] gives BEATs' values; the
/// config is written into the model manifest so that a model is always fed the
/// features it was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FbankConfig {
    /// Sample rate of the input waveform in Hz; other rates must be resampled first.
    /// BEATs: 16000.
    pub sample_rate: u32,
    /// Number of triangular mel filters, which is the width of every output frame.
    /// Kaldi requires more than 3. BEATs: 128.
    pub num_mel_bins: usize,
    /// Length of one analysis frame in milliseconds. The frame spans
    /// `trunc(sample_rate * frame_length_ms * 0.001)` samples, as in Kaldi.
    /// BEATs: 25 (400 samples at 16 kHz).
    pub frame_length_ms: f64,
    /// Distance between the starts of consecutive frames in milliseconds, truncated to
    /// whole samples like the frame length. BEATs: 10 (160 samples at 16 kHz).
    pub frame_shift_ms: f64,
    /// Analysis window applied to every frame. BEATs: `povey`.
    pub window: FbankWindow,
    /// Zero-pad each frame to the next power of two before the FFT (Kaldi's
    /// `round_to_power_of_two`); otherwise the FFT size is the frame length, which
    /// must then be even. BEATs: true (400 samples padded to 512).
    pub round_to_power_of_two: bool,
    /// Pre-emphasis coefficient `p` in `x[i] - p * x[i - 1]`, in [0, 1]; 0 disables
    /// it. BEATs: 0.97.
    pub preemphasis: f64,
    /// Subtract each frame's mean before pre-emphasis. BEATs: true.
    pub remove_dc_offset: bool,
    /// Lower edge of the lowest mel filter in Hz, in [0, nyquist). BEATs: 20.
    pub low_freq: f64,
    /// Upper edge of the highest mel filter in Hz. A value <= 0 is an offset from the
    /// Nyquist frequency (Kaldi's convention), so 0 means the Nyquist frequency.
    /// BEATs: 0 (8000 Hz at 16 kHz).
    pub high_freq: f64,
    /// Factor applied to the waveform before anything else. Waveforms arrive in
    /// [-1, 1]; Kaldi expects 16-bit sample values. BEATs: 32768 (2^15).
    pub input_scale: f64,
    /// Mel energies are clamped to at least this before the logarithm. BEATs (through
    /// torchaudio): `f32::EPSILON`, 1.1920929e-7.
    pub log_floor: f64,
    /// Mean subtracted from the log-mel energies. BEATs: 15.41663.
    pub norm_mean: f64,
    /// Standard deviation used in the normalisation. As in BEATs, the output is
    /// `(log_mel - norm_mean) / (2 * norm_std)`: the factor 2 is part of the
    /// definition, not of this value. BEATs: 6.55582.
    pub norm_std: f64,
}

impl Default for FbankConfig {
    fn default() -> Self {
        FbankConfig {
            sample_rate: 16_000,
            num_mel_bins: 128,
            frame_length_ms: 25.0,
            frame_shift_ms: 10.0,
            window: FbankWindow::Povey,
            round_to_power_of_two: true,
            preemphasis: 0.97,
            remove_dc_offset: true,
            low_freq: 20.0,
            high_freq: 0.0,
            input_scale: 32_768.0,
            log_floor: f64::from(f32::EPSILON),
            norm_mean: 15.41663,
            norm_std: 6.55582,
        }
    }
}

/// How the error of a clip too short to encode starts.
pub const TOO_SHORT: &str = "too short to caption";

/// The analysis window applied to each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FbankWindow {
    /// Kaldi's default: a symmetric Hann window raised to the power 0.85,
    /// `(0.5 - 0.5 cos(2 pi n / (N - 1)))^0.85`.
    Povey,
}

/// Why an [`Fbank`] could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FbankError {
    /// The configuration is invalid; every problem found is listed, each `at` the
    /// offending field of [`FbankConfig`].
    #[error("invalid fbank configuration: {}", join(problems))]
    InvalidConfig { problems: Vec<ConfigProblem> },
}

fn join(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Sizes and frequencies derived from a valid config.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    window_size: usize,
    window_shift: usize,
    fft_size: usize,
    low_freq: f64,
    /// `high_freq` with Kaldi's "<= 0 is an offset from Nyquist" resolved.
    high_freq: f64,
}

/// Whole samples in `ms` milliseconds, truncated, computed in the same order as
/// torchaudio (`int(sample_frequency * ms * 0.001)`) so edge cases round alike.
fn samples_in(sample_rate: u32, ms: f64) -> usize {
    // `as` saturates, and the callers bound the result.
    (f64::from(sample_rate) * ms * 0.001) as usize
}

impl FbankConfig {
    /// Checks the whole config and reports every problem at once.
    pub fn validate(&self) -> Result<(), FbankError> {
        self.geometry().map(|_| ())
    }

    fn geometry(&self) -> Result<Geometry, FbankError> {
        let mut problems = Vec::new();
        let mut problem = |field: &'static str, message: String| {
            problems.push(crate::config::problem(field, message))
        };

        if self.sample_rate == 0 {
            problem("sample_rate", "must be positive (Hz)".into());
        }
        if !(4..=MAX_MEL_BINS).contains(&self.num_mel_bins) {
            problem(
                "num_mel_bins",
                format!(
                    "is {}, must be between 4 and {MAX_MEL_BINS} (Kaldi needs more than 3)",
                    self.num_mel_bins
                ),
            );
        }

        let mut window_size = 0;
        if self.frame_length_ms.is_finite() && self.frame_length_ms > 0.0 {
            window_size = samples_in(self.sample_rate, self.frame_length_ms);
            if !(2..=MAX_WINDOW_SIZE).contains(&window_size) {
                problem(
                    "frame_length_ms",
                    format!(
                        "{} ms is {window_size} samples at {} Hz, must be between 2 and {MAX_WINDOW_SIZE}",
                        self.frame_length_ms, self.sample_rate
                    ),
                );
            }
        } else {
            problem(
                "frame_length_ms",
                format!("is {}, must be a positive number", self.frame_length_ms),
            );
        }

        let mut window_shift = 0;
        if self.frame_shift_ms.is_finite() && self.frame_shift_ms > 0.0 {
            window_shift = samples_in(self.sample_rate, self.frame_shift_ms);
            if !(1..=MAX_WINDOW_SIZE).contains(&window_shift) {
                problem(
                    "frame_shift_ms",
                    format!(
                        "{} ms is {window_shift} samples at {} Hz, must be between 1 and {MAX_WINDOW_SIZE}",
                        self.frame_shift_ms, self.sample_rate
                    ),
                );
            }
        } else {
            problem(
                "frame_shift_ms",
                format!("is {}, must be a positive number", self.frame_shift_ms),
            );
        }

        let fft_size = if self.round_to_power_of_two {
            window_size.next_power_of_two()
        } else {
            if window_size % 2 != 0 {
                problem(
                    "round_to_power_of_two",
                    format!(
                        "is false, so the FFT size is the frame length, {window_size} samples, which must be even"
                    ),
                );
            }
            window_size
        };

        if !(self.preemphasis.is_finite() && (0.0..=1.0).contains(&self.preemphasis)) {
            problem(
                "preemphasis",
                format!("is {}, must be in [0, 1]", self.preemphasis),
            );
        }

        let nyquist = 0.5 * f64::from(self.sample_rate);
        let high_freq = if self.high_freq > 0.0 {
            self.high_freq
        } else {
            nyquist + self.high_freq
        };
        if !(self.low_freq.is_finite() && self.low_freq >= 0.0 && self.low_freq < nyquist) {
            problem(
                "low_freq",
                format!(
                    "is {} Hz, must be in [0, {nyquist}) (the Nyquist frequency)",
                    self.low_freq
                ),
            );
        } else if !(high_freq.is_finite() && high_freq > self.low_freq && high_freq <= nyquist) {
            problem(
                "high_freq",
                format!(
                    "is {} Hz (resolves to {high_freq} Hz), must resolve to a frequency above \
                     low_freq ({} Hz) and at most {nyquist} Hz; values <= 0 are offsets from Nyquist",
                    self.high_freq, self.low_freq
                ),
            );
        }

        if !(self.input_scale.is_finite() && self.input_scale > 0.0) {
            problem(
                "input_scale",
                format!("is {}, must be a positive number", self.input_scale),
            );
        }
        if !(self.log_floor.is_finite() && self.log_floor > 0.0) {
            problem(
                "log_floor",
                format!("is {}, must be a positive number", self.log_floor),
            );
        }
        if !self.norm_mean.is_finite() {
            problem(
                "norm_mean",
                format!("is {}, must be a finite number", self.norm_mean),
            );
        }
        if !(self.norm_std.is_finite() && self.norm_std > 0.0) {
            problem(
                "norm_std",
                format!("is {}, must be a positive number", self.norm_std),
            );
        }

        if problems.is_empty() {
            Ok(Geometry {
                window_size,
                window_shift,
                fft_size,
                low_freq: self.low_freq,
                high_freq,
            })
        } else {
            Err(FbankError::InvalidConfig { problems })
        }
    }
}

/// One triangular mel filter, stored sparsely: its non-zero weights apply to the
/// power-spectrum bins `first_bin..first_bin + (end - start)`.
#[derive(Debug, Clone, Copy)]
struct MelFilter {
    first_bin: usize,
    /// Range of this filter's weights in [`Fbank::weights`].
    start: usize,
    end: usize,
}

/// A ready-to-run filterbank: built once from a validated [`FbankConfig`], then shared
/// freely between threads (it is immutable; every call uses its own scratch space).
#[derive(Clone)]
pub struct Fbank {
    config: FbankConfig,
    window_size: usize,
    window_shift: usize,
    /// The analysis window, `window_size` values.
    window: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
    filters: Vec<MelFilter>,
    weights: Vec<f64>,
    /// `1 / (2 * norm_std)`.
    norm_scale: f64,
}

impl fmt::Debug for Fbank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fbank")
            .field("config", &self.config)
            .field("window_size", &self.window_size)
            .field("window_shift", &self.window_shift)
            .field("fft_size", &self.fft.len())
            .finish_non_exhaustive()
    }
}

/// Features of one waveform: `num_frames` rows of `num_bins` values.
#[derive(Debug, Clone, PartialEq)]
pub struct FbankFrames {
    pub num_frames: usize,
    pub num_bins: usize,
    /// Row-major `[num_frames, num_bins]`.
    pub data: Vec<f32>,
}

impl FbankFrames {
    /// The features of frame `index`.
    ///
    /// # Panics
    /// If `index >= num_frames`.
    pub fn frame(&self, index: usize) -> &[f32] {
        &self.data[index * self.num_bins..(index + 1) * self.num_bins]
    }
}

/// Kaldi's mel scale.
fn mel(freq: f64) -> f64 {
    1127.0 * (1.0 + freq / 700.0).ln()
}

impl Fbank {
    /// Validates `config` and precomputes the window, the mel filters and the FFT plan.
    pub fn new(config: FbankConfig) -> Result<Self, FbankError> {
        let geometry = config.geometry()?;
        let window = match config.window {
            FbankWindow::Povey => povey_window(geometry.window_size),
        };
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(geometry.fft_size);
        let (filters, weights) = mel_filters(&config, &geometry);
        let norm_scale = 1.0 / (2.0 * config.norm_std);
        Ok(Fbank {
            config,
            window_size: geometry.window_size,
            window_shift: geometry.window_shift,
            window,
            fft,
            filters,
            weights,
            norm_scale,
        })
    }

    /// The config this filterbank was built from.
    pub fn config(&self) -> &FbankConfig {
        &self.config
    }

    /// Width of every output frame (the number of mel bins).
    pub fn num_bins(&self) -> usize {
        self.filters.len()
    }

    /// Samples per frame (400 for BEATs).
    pub fn window_size(&self) -> usize {
        self.window_size
    }

    /// Samples between frame starts (160 for BEATs).
    pub fn window_shift(&self) -> usize {
        self.window_shift
    }

    /// The error text of a waveform of `samples` samples whose `frames` fbank frames
    /// are fewer than the `min_frames` the encoder's one patch needs (it starts with
    /// [`TOO_SHORT`]).
    pub fn too_short_error(&self, samples: usize, frames: usize, min_frames: usize) -> String {
        format!(
            "{TOO_SHORT}: {:.3} s gives {frames} fbank frames, the encoder needs at least \
             {min_frames} ({:.2} s)",
            samples as f64 / f64::from(self.config.sample_rate),
            self.min_duration_for_frames(min_frames)
        )
    }

    /// Shortest clip, in seconds, that yields `frames` frames.
    pub fn min_duration_for_frames(&self, frames: usize) -> f64 {
        let samples = if frames == 0 {
            0
        } else {
            self.window_size + (frames - 1) * self.window_shift
        };
        samples as f64 / f64::from(self.config.sample_rate)
    }

    /// Frames produced for a waveform of `num_samples` samples: only whole frames
    /// (Kaldi's `snip_edges`), so zero when the clip is shorter than one frame.
    pub fn num_frames(&self, num_samples: usize) -> usize {
        if num_samples < self.window_size {
            0
        } else {
            1 + (num_samples - self.window_size) / self.window_shift
        }
    }

    /// The normalised log-mel features of `waveform` (mono, at `sample_rate`, in
    /// [-1, 1]).
    pub fn compute(&self, waveform: &[f32]) -> FbankFrames {
        let num_frames = self.num_frames(waveform.len());
        let num_bins = self.num_bins();
        let mut data = vec![0.0f32; num_frames * num_bins];
        if num_frames == 0 {
            return FbankFrames {
                num_frames,
                num_bins,
                data,
            };
        }

        // Scratch space, once per call. realfft uses `input` as scratch too, so it is
        // refilled completely (zero padding included) for every frame.
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0.0f64; spectrum.len()];

        let n = self.window_size;
        let scale = self.config.input_scale;
        let p = self.config.preemphasis;
        let floor = self.config.log_floor;
        let mean = self.config.norm_mean;

        for (index, row) in data.chunks_exact_mut(num_bins).enumerate() {
            let start = index * self.window_shift;
            let samples = &waveform[start..start + n];
            let (frame, padding) = input.split_at_mut(n);

            // DC removal, pre-emphasis and window in one pass over the samples. With
            // x = scale * s and d the frame's mean of x, pre-emphasis of x - d is
            // (x[i] - d) - p (x[i - 1] - d) = x[i] - p x[i - 1] - (1 - p) d, and
            // x[-1] = x[0] (replicate padding) makes the first value (1 - p)(x[0] - d).
            let dc = if self.config.remove_dc_offset {
                sum(samples) * scale / n as f64
            } else {
                0.0
            };
            let offset = (1.0 - p) * dc;
            frame[0] = ((1.0 - p) * f64::from(samples[0]) * scale - offset) * self.window[0];
            for ((x, pair), w) in frame[1..]
                .iter_mut()
                .zip(samples.windows(2))
                .zip(&self.window[1..])
            {
                let emphasised = f64::from(pair[1]) - p * f64::from(pair[0]);
                *x = (emphasised * scale - offset) * w;
            }
            padding.fill(0.0);

            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .expect("FFT buffers come from the plan itself, so their lengths match");
            for (e, c) in power.iter_mut().zip(&spectrum) {
                *e = Complex::norm_sqr(c);
            }

            for (out, filter) in row.iter_mut().zip(&self.filters) {
                let weights = &self.weights[filter.start..filter.end];
                let bins = &power[filter.first_bin..filter.first_bin + weights.len()];
                let energy: f64 = weights.iter().zip(bins).map(|(w, e)| w * e).sum();
                *out = ((energy.max(floor).ln() - mean) * self.norm_scale) as f32;
            }
        }

        FbankFrames {
            num_frames,
            num_bins,
            data,
        }
    }
}

/// Sum in f64, with independent partial sums so that it vectorises.
fn sum(samples: &[f32]) -> f64 {
    let mut partial = [0.0f64; 8];
    let chunks = samples.chunks_exact(partial.len());
    let tail: f64 = chunks.remainder().iter().map(|&s| f64::from(s)).sum();
    for chunk in chunks {
        for (acc, &s) in partial.iter_mut().zip(chunk) {
            *acc += f64::from(s);
        }
    }
    partial.iter().sum::<f64>() + tail
}

/// `(0.5 - 0.5 cos(2 pi n / (N - 1)))^0.85`: torch's `hann_window(periodic=False)`
/// raised to 0.85, as torchaudio builds it.
fn povey_window(size: usize) -> Vec<f64> {
    let denominator = (size - 1) as f64;
    (0..size)
        .map(|n| {
            let hann = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / denominator).cos();
            hann.powf(0.85)
        })
        .collect()
}

/// Kaldi's triangular mel filters (torchaudio's `get_mel_banks` without VTLN), over
/// the FFT bins `0..fft_size / 2`; the Nyquist bin always has weight 0. Each filter is
/// kept as its contiguous run of non-zero weights (possibly empty: at 16 kHz with a
/// 512-point FFT, BEATs' bin 3 falls between two FFT bins).
fn mel_filters(config: &FbankConfig, geometry: &Geometry) -> (Vec<MelFilter>, Vec<f64>) {
    let num_fft_bins = geometry.fft_size / 2;
    let fft_bin_width = f64::from(config.sample_rate) / geometry.fft_size as f64;
    let mel_low = mel(geometry.low_freq);
    let mel_high = mel(geometry.high_freq);
    let mel_delta = (mel_high - mel_low) / (config.num_mel_bins as f64 + 1.0);
    let bin_mels: Vec<f64> = (0..num_fft_bins)
        .map(|k| mel(fft_bin_width * k as f64))
        .collect();

    let mut filters = Vec::with_capacity(config.num_mel_bins);
    let mut weights = Vec::new();
    for m in 0..config.num_mel_bins {
        let left = mel_low + m as f64 * mel_delta;
        let center = mel_low + (m as f64 + 1.0) * mel_delta;
        let right = mel_low + (m as f64 + 2.0) * mel_delta;
        let start = weights.len();
        let mut first_bin = 0;
        for (k, &bin_mel) in bin_mels.iter().enumerate() {
            let up = (bin_mel - left) / (center - left);
            let down = (right - bin_mel) / (right - center);
            let weight = up.min(down).max(0.0);
            if weight > 0.0 {
                if weights.len() == start {
                    first_bin = k;
                }
                weights.push(weight);
            } else if weights.len() > start {
                // The triangle is convex in mel and the bins are sorted: it is over.
                break;
            }
        }
        filters.push(MelFilter {
            first_bin,
            start,
            end: weights.len(),
        });
    }
    (filters, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beats() -> Fbank {
        Fbank::new(FbankConfig::default()).expect("BEATs' config is valid")
    }

    /// The normalised value of an energy at the log floor.
    fn normalised_floor(config: &FbankConfig) -> f32 {
        ((config.log_floor.ln() - config.norm_mean) / (2.0 * config.norm_std)) as f32
    }

    /// Deterministic uniform noise in [-amplitude, amplitude].
    fn noise(len: usize, amplitude: f32, mut state: u64) -> Vec<f32> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * unit - 1.0) * f64::from(amplitude)) as f32
            })
            .collect()
    }

    fn tone(freq: f64, len: usize, amplitude: f64) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (amplitude * (2.0 * std::f64::consts::PI * freq * i as f64 / 16_000.0).sin()) as f32
            })
            .collect()
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Fbank>();
    }

    #[test]
    fn beats_geometry() {
        let fbank = beats();
        assert_eq!(fbank.window_size(), 400);
        assert_eq!(fbank.window_shift(), 160);
        assert_eq!(fbank.fft.len(), 512);
        assert_eq!(fbank.num_bins(), 128);
    }

    #[test]
    fn frame_count_follows_snip_edges() {
        let fbank = beats();
        for (samples, frames) in [
            (0, 0),
            (399, 0),
            (400, 1),
            (559, 1),
            (560, 2),
            (16_000, 98),
            (40_000, 248),
        ] {
            assert_eq!(fbank.num_frames(samples), frames, "{samples} samples");
        }
        let out = fbank.compute(&vec![0.1; 16_000]);
        assert_eq!((out.num_frames, out.num_bins), (98, 128));
        assert_eq!(out.data.len(), 98 * 128);
    }

    #[test]
    fn clip_shorter_than_a_frame_gives_zero_frames() {
        let fbank = beats();
        for len in [0, 1, 399] {
            let out = fbank.compute(&noise(len, 0.5, 7));
            assert_eq!(out.num_frames, 0);
            assert_eq!(out.num_bins, 128);
            assert!(out.data.is_empty());
        }
    }

    #[test]
    fn empty_mel_bin_gives_the_floor() {
        let fbank = beats();
        let empty: Vec<usize> = (0..fbank.num_bins())
            .filter(|&m| fbank.filters[m].start == fbank.filters[m].end)
            .collect();
        assert_eq!(
            empty,
            [3],
            "at 16 kHz with a 512-point FFT only bin 3 is empty"
        );

        let floor = normalised_floor(fbank.config());
        let out = fbank.compute(&noise(4_000, 0.5, 1));
        for f in 0..out.num_frames {
            let frame = out.frame(f);
            assert_eq!(frame[3], floor);
            assert!(
                frame
                    .iter()
                    .enumerate()
                    .all(|(m, &v)| m == 3 || v > floor + 1.0)
            );
        }
    }

    #[test]
    fn constant_signal_is_removed_by_dc_offset() {
        let fbank = beats();
        let floor = normalised_floor(fbank.config());
        let out = fbank.compute(&vec![0.25; 2_000]);
        assert_eq!(out.num_frames, 11);
        assert!(out.data.iter().all(|&v| v == floor), "{:?}", &out.data[..8]);

        // Without DC removal, the constant (reduced by pre-emphasis to 3% of itself)
        // is energy at 0 Hz: the lowest filter, which sees the window's main lobe
        // through FFT bin 1, gets the most; the rest only see side lobes.
        let config = FbankConfig {
            remove_dc_offset: false,
            ..FbankConfig::default()
        };
        let out = Fbank::new(config).unwrap().compute(&vec![0.25; 2_000]);
        let frame = out.frame(0);
        assert!(frame.iter().all(|&v| v <= frame[0]), "{frame:?}");
        assert!(frame[0] > frame[60] + 1.0, "{frame:?}");
    }

    #[test]
    fn pure_tone_peaks_at_its_mel_bin() {
        let fbank = beats();
        let config = fbank.config();
        let mel_low = mel(config.low_freq);
        let mel_delta = (mel(8_000.0) - mel_low) / 129.0;
        for bin in [10usize, 40, 60, 100, 120] {
            // The centre frequency of mel bin `bin`, from the mel scale alone.
            let center = mel_low + (bin as f64 + 1.0) * mel_delta;
            let freq = 700.0 * ((center / 1127.0).exp() - 1.0);
            let out = fbank.compute(&tone(freq, 4_000, 0.5));
            for f in 0..out.num_frames {
                let frame = out.frame(f);
                let peak = (0..frame.len())
                    .max_by(|&a, &b| frame[a].total_cmp(&frame[b]))
                    .unwrap();
                assert_eq!(peak, bin, "tone at {freq:.1} Hz, frame {f}");
            }
        }
    }

    #[test]
    fn matches_a_direct_transcription_of_torchaudio() {
        // Dense mel matrix, naive DFT, steps in torchaudio's order.
        let fbank = beats();
        let config = fbank.config().clone();
        let waveform = noise(1_000, 0.8, 99);
        let out = fbank.compute(&waveform);
        assert_eq!(out.num_frames, 4);

        let (n, padded) = (400usize, 512usize);
        let mel_low = mel(20.0);
        let delta = (mel(8_000.0) - mel_low) / 129.0;
        let mut max_diff = 0.0f64;
        for f in 0..out.num_frames {
            let mut x: Vec<f64> = waveform[f * 160..f * 160 + n]
                .iter()
                .map(|&s| f64::from(s) * 32_768.0)
                .collect();
            let dc = x.iter().sum::<f64>() / n as f64;
            x.iter_mut().for_each(|v| *v -= dc);
            let shifted: Vec<f64> = std::iter::once(x[0])
                .chain(x[..n - 1].iter().copied())
                .collect();
            let mut framed = vec![0.0; padded];
            for i in 0..n {
                let hann = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / 399.0).cos();
                framed[i] = (x[i] - 0.97 * shifted[i]) * hann.powf(0.85);
            }
            let power: Vec<f64> = (0..=padded / 2)
                .map(|k| {
                    let (mut re, mut im) = (0.0, 0.0);
                    for (i, v) in framed.iter().enumerate() {
                        let angle = -2.0 * std::f64::consts::PI * (k * i) as f64 / padded as f64;
                        re += v * angle.cos();
                        im += v * angle.sin();
                    }
                    re * re + im * im
                })
                .collect();
            for m in 0..128 {
                let (l, c, r) = (
                    mel_low + m as f64 * delta,
                    mel_low + (m + 1) as f64 * delta,
                    mel_low + (m + 2) as f64 * delta,
                );
                let energy: f64 = (0..256)
                    .map(|k| {
                        let bm = mel(31.25 * k as f64);
                        ((bm - l) / (c - l)).min((r - bm) / (r - c)).max(0.0) * power[k]
                    })
                    .sum();
                let expected = (energy.max(config.log_floor).ln() - config.norm_mean)
                    / (2.0 * config.norm_std);
                max_diff = max_diff.max((expected - f64::from(out.frame(f)[m])).abs());
            }
        }
        assert!(max_diff < 1e-5, "max difference {max_diff}");
    }

    #[test]
    fn config_round_trips_through_json() {
        let config = FbankConfig::default();
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"window\":\"povey\""), "{json}");
        let back: FbankConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        assert_eq!(back.log_floor, f64::from(f32::EPSILON));

        let unknown = json.replacen('{', "{\"dither\":1.0,", 1);
        assert!(serde_json::from_str::<FbankConfig>(&unknown).is_err());
    }

    #[test]
    fn validation_reports_every_problem() {
        let config = FbankConfig {
            num_mel_bins: 3,
            frame_shift_ms: 0.0,
            low_freq: 100.0,
            high_freq: 50.0,
            norm_std: 0.0,
            ..FbankConfig::default()
        };
        let Err(FbankError::InvalidConfig { problems }) = Fbank::new(config) else {
            panic!("expected an invalid config");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.at.as_str()).collect();
        assert_eq!(
            fields,
            ["num_mel_bins", "frame_shift_ms", "high_freq", "norm_std"]
        );
        let message = FbankError::InvalidConfig { problems }.to_string();
        assert!(message.contains("; high_freq: "), "{message}");

        let odd = FbankConfig {
            frame_length_ms: 25.0625, // 401 samples
            round_to_power_of_two: false,
            ..FbankConfig::default()
        };
        assert!(odd.validate().is_err());
        assert!(FbankConfig::default().validate().is_ok());
    }

    #[test]
    fn negative_high_freq_is_an_offset_from_nyquist() {
        let a = FbankConfig {
            high_freq: -1_000.0,
            ..FbankConfig::default()
        };
        let b = FbankConfig {
            high_freq: 7_000.0,
            ..FbankConfig::default()
        };
        let waveform = noise(1_000, 0.5, 3);
        assert_eq!(
            Fbank::new(a).unwrap().compute(&waveform),
            Fbank::new(b).unwrap().compute(&waveform)
        );
    }
}
