//! Streaming sample-rate conversion of mono `f32` audio to the model's rate.
//!
//! [`Resampler`] takes the decoder's packets as they come (any size, including empty
//! ones), appends the converted samples to a caller's buffer, and on [`Resampler::finish`]
//! flushes the tail. The output is time-aligned with the input (the filter delay is
//! removed) and a stream of `n` input samples gives exactly `round(n * to / from)`
//! output samples. Internal buffers have a fixed size chosen at construction, so memory
//! does not grow with the stream; `push` allocates nothing beyond growing the caller's
//! output `Vec`. After `finish` the resampler is reset and can take the next stream,
//! which saves rebuilding the filter and the FFT plans for every file.
//!
//! # Engines
//!
//! Equal rates are a plain copy, with no filtering at all.
//!
//! Otherwise the ratio is fixed for the whole stream, so the default engine is
//! `rubato`'s synchronous [`rubato::Fft`] resampler: it convolves blocks with a
//! windowed-sinc anti-aliasing filter (Blackman-Harris squared window) in the frequency
//! domain and changes the rate by truncating or zero-padding the spectrum. It costs
//! `O(log n)` per sample where a sinc interpolator costs one dot product of the filter
//! length per output sample, so it is several times faster at the same quality, and its
//! filter delay is a whole number of output samples, so removing it is exact. Its block
//! size is a multiple of `from / gcd(from, to)` input samples. For every common rate
//! (8 k, 11.025 k, 22.05 k, 44.1 k, 48 k, ... 768 kHz) that is small; blocks are
//! grown until both sides have at least `MIN_FFT_BLOCK` samples, which sets the
//! filter length and hence the transition band (stopband from the output Nyquist
//! frequency on, more than 100 dB down).
//!
//! For an odd rate whose block would exceed `MAX_FFT_BLOCK` samples (above ~65 kHz with
//! a tiny common divisor, e.g. 96001 Hz) the FFT buffers would grow with the rate, so
//! such rates use `rubato`'s asynchronous sinc interpolator instead, with a filter of the
//! same quality: `SINC_LEN_AT_OUTPUT` taps measured at the lower of the two rates and
//! the same window. Its delay is removed to the nearest output sample.

use std::fmt;

use rubato::audioadapter_buffers::direct::SequentialSlice;
use rubato::{
    Async, Fft, FixedAsync, FixedSync, Indexing, SincInterpolationParameters,
    SincInterpolationType, WindowFunction,
};

/// Lowest accepted sample rate, input or output, in Hz.
pub const MIN_RATE_HZ: u32 = 1_000;
/// Highest accepted sample rate, input or output, in Hz.
pub const MAX_RATE_HZ: u32 = 768_000;

/// Smallest FFT block, in samples on either side. The anti-aliasing filter is one block
/// long, so this sets its sharpness: from 512 on, the cutoff is at least 97% of the lower
/// Nyquist frequency (7.79 kHz at 16 kHz) and the response is flat to 7 kHz.
const MIN_FFT_BLOCK: usize = 512;
/// Largest FFT block, in samples on either side, before the sinc engine takes over
/// (a few MiB of FFT buffers).
const MAX_FFT_BLOCK: usize = 1 << 17;
/// Length of the sinc engine's filter, counted in samples of the lower of the two rates.
const SINC_LEN_AT_OUTPUT: usize = 256;
/// Sinc table points per input sample when not downsampling; scaled down with the
/// ratio when downsampling, where the stretched sinc is smoother.
const SINC_OVERSAMPLING: usize = 128;
/// Input chunk of the sinc engine, in samples.
const SINC_CHUNK: usize = 2048;
/// Anti-aliasing window of both engines.
const WINDOW: WindowFunction = WindowFunction::BlackmanHarris2;

/// Why a resampler could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ResampleError {
    /// A sample rate outside [`MIN_RATE_HZ`]`..=`[`MAX_RATE_HZ`].
    #[error(
        "unsupported {which} sample rate {rate_hz} Hz (supported: {MIN_RATE_HZ}..={MAX_RATE_HZ} Hz)"
    )]
    UnsupportedRate {
        /// `"input"` or `"output"`.
        which: &'static str,
        /// The rejected rate.
        rate_hz: u32,
    },
    /// `rubato` refused the configuration.
    #[error("cannot build a {from_hz} Hz -> {to_hz} Hz resampler: {source}")]
    Build {
        /// Input rate in Hz.
        from_hz: u32,
        /// Output rate in Hz.
        to_hz: u32,
        /// What `rubato` reported.
        #[source]
        source: rubato::ResamplerConstructionError,
    },
}

/// A streaming mono resampler from `from_hz` to `to_hz`.
pub struct Resampler {
    from_hz: u32,
    to_hz: u32,
    /// `None` when the rates are equal (pass-through).
    stream: Option<Stream>,
}

impl fmt::Debug for Resampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Resampler");
        s.field("from_hz", &self.from_hz)
            .field("to_hz", &self.to_hz);
        match &self.stream {
            None => s.field("engine", &"identity"),
            Some(stream) => s
                .field("engine", &stream.engine)
                .field("chunk_in", &stream.chunk_in)
                .field("delay", &stream.delay),
        };
        s.finish()
    }
}

/// Which `rubato` engine a [`Stream`] drives (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EngineKind {
    Fft,
    Sinc,
}

/// State of a non-identity conversion: a `rubato` resampler fed fixed-size chunks.
struct Stream {
    engine: EngineKind,
    rubato: Box<dyn rubato::Resampler<f32>>,
    /// Input samples per `rubato` call (fixed for both engines as configured).
    chunk_in: usize,
    /// Input not yet handed to `rubato`; always shorter than `chunk_in`.
    pending: Vec<f32>,
    /// Output of one `rubato` call, `output_frames_max` long.
    scratch: Vec<f32>,
    /// The engine's delay (with the lead-in), in output samples.
    delay: usize,
    /// Zeros fed ahead of every stream to make `delay` a whole number of samples.
    lead_in: usize,
    /// Delay samples still to drop from the start of the output.
    to_skip: usize,
    /// Input samples received in this stream.
    n_in: u64,
    /// Output samples emitted in this stream.
    n_out: u64,
}

impl Resampler {
    /// A resampler from `from_hz` to `to_hz`; both must be in
    /// [`MIN_RATE_HZ`]`..=`[`MAX_RATE_HZ`]. Equal rates give a pass-through.
    pub fn new(from_hz: u32, to_hz: u32) -> Result<Self, ResampleError> {
        check_rate("input", from_hz)?;
        check_rate("output", to_hz)?;
        let stream = if from_hz == to_hz {
            None
        } else {
            Some(Stream::new(from_hz, to_hz)?)
        };
        Ok(Self {
            from_hz,
            to_hz,
            stream,
        })
    }

    /// Input rate in Hz.
    pub fn from_hz(&self) -> u32 {
        self.from_hz
    }

    /// Output rate in Hz.
    pub fn to_hz(&self) -> u32 {
        self.to_hz
    }

    /// Feeds the next samples of the stream (any length, empty included) and appends
    /// whatever output is ready to `out`.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<f32>) {
        match &mut self.stream {
            None => out.extend_from_slice(input),
            Some(stream) => stream.push(input, out),
        }
    }

    /// Ends the stream: appends the remaining output to `out`, so that the whole stream
    /// gave `round(n_in * to_hz / from_hz)` samples, then resets the resampler for the
    /// next stream.
    pub fn finish(&mut self, out: &mut Vec<f32>) {
        if let Some(stream) = &mut self.stream {
            stream.finish(self.from_hz, self.to_hz, out);
        }
    }

    /// Drops any buffered input and starts a new stream.
    pub fn reset(&mut self) {
        if let Some(stream) = &mut self.stream {
            stream.reset();
        }
    }
}

/// Resamples a whole clip: `round(input.len() * to_hz / from_hz)` samples, time-aligned
/// with the input. For many clips at the same rates, reuse one [`Resampler`] instead.
pub fn resample(input: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>, ResampleError> {
    let mut resampler = Resampler::new(from_hz, to_hz)?;
    let mut out = Vec::with_capacity(output_len(input.len() as u64, from_hz, to_hz) as usize + 1);
    resampler.push(input, &mut out);
    resampler.finish(&mut out);
    Ok(out)
}

fn check_rate(which: &'static str, rate_hz: u32) -> Result<(), ResampleError> {
    if (MIN_RATE_HZ..=MAX_RATE_HZ).contains(&rate_hz) {
        Ok(())
    } else {
        Err(ResampleError::UnsupportedRate { which, rate_hz })
    }
}

/// `round(n_in * to / from)`, halves rounded up, in exact integer arithmetic.
fn output_len(n_in: u64, from_hz: u32, to_hz: u32) -> u64 {
    let num = 2 * u128::from(n_in) * u128::from(to_hz) + u128::from(from_hz);
    let len = num / (2 * u128::from(from_hz));
    // At most n_in * 768: fits in u64 for any stream that fits in memory.
    u64::try_from(len).unwrap_or(u64::MAX)
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A configured `rubato` resampler and how to line its output up with its input.
struct Engine {
    kind: EngineKind,
    rubato: Box<dyn rubato::Resampler<f32>>,
    /// Output samples to drop from the start of every stream.
    delay: usize,
    /// Zeros to feed ahead of every stream.
    lead_in: usize,
}

impl Engine {
    fn new(from_hz: u32, to_hz: u32) -> Result<Self, ResampleError> {
        let (from, to) = (from_hz as usize, to_hz as usize);
        let g = gcd(from, to);
        let (unit_in, unit_out) = (from / g, to / g);
        // Blocks are `k` units. `k` is even so that both block sizes are even: the filter
        // is centred on sample `block_in / 2`, and the delay is then exactly
        // `block_out / 2` output samples.
        let k = MIN_FFT_BLOCK
            .div_ceil(unit_in.min(unit_out))
            .next_multiple_of(2);
        let (block_in, block_out) = (k * unit_in, k * unit_out);
        let built = if block_in.max(block_out) <= MAX_FFT_BLOCK {
            Self::fft(from, to, block_in)
        } else {
            Self::sinc(from, to)
        };
        built.map_err(|source| ResampleError::Build {
            from_hz,
            to_hz,
            source,
        })
    }

    fn fft(
        from: usize,
        to: usize,
        block_in: usize,
    ) -> Result<Self, rubato::ResamplerConstructionError> {
        // With `FixedSync::Both` one call is one FFT block of `block_in` samples.
        let fft = Fft::<f32>::new_custom(from, to, block_in, 1, 1, WINDOW, FixedSync::Both)?;
        Ok(Self {
            kind: EngineKind::Fft,
            // `block_out / 2`, exact since the blocks are even.
            delay: rubato::Resampler::output_delay(&fft),
            lead_in: 0,
            rubato: Box::new(fft),
        })
    }

    fn sinc(from: usize, to: usize) -> Result<Self, rubato::ResamplerConstructionError> {
        let ratio = to as f64 / from as f64;
        let down = ratio.min(1.0);
        // The filter spans SINC_LEN_AT_OUTPUT samples of the lower rate, so its transition
        // band (and the cutoff that keeps aliasing out) is that of a SINC_LEN_AT_OUTPUT-tap
        // filter there. rubato's automatic cutoff assumes the length is counted in input
        // samples, so it is set explicitly; rubato scales it by the ratio when
        // downsampling. rubato rounds the length up to a multiple of 8; doing it here
        // keeps `sinc_len` the length it uses.
        let sinc_len = (SINC_LEN_AT_OUTPUT as f64 / down).ceil() as usize;
        let sinc_len = sinc_len.next_multiple_of(8);
        let oversampling = ((SINC_OVERSAMPLING as f64 * down).ceil() as usize).max(16);
        let cutoff = rubato::calculate_cutoff::<f32>(SINC_LEN_AT_OUTPUT, WINDOW);
        let params = SincInterpolationParameters::new(sinc_len, WINDOW)
            .f_cutoff(cutoff)
            .oversampling_factor(oversampling)
            .interpolation(SincInterpolationType::Cubic);
        let sinc = Async::<f32>::new_sinc(ratio, 1.0, &params, SINC_CHUNK, 1, FixedAsync::Input)?;
        // The filter is centred `sinc_len / 2` input samples in, and rubato steps its read
        // position forward before computing the first output sample, which takes one
        // output sample off. rubato's `output_delay` truncates `sinc_len * ratio / 2` and
        // misses that step (a full sample late at 768 kHz). When downsampling, a few zeros
        // fed ahead of each stream add `ratio` output samples each and bring the delay to
        // within `ratio / 2` of a whole sample, which is then dropped exactly. There are
        // at most `1 / ratio` (768) of them, well under a chunk.
        let exact = sinc_len as f64 * ratio / 2.0 - 1.0;
        let lead_in = if ratio < 1.0 {
            ((exact.ceil() - exact) / ratio).round() as usize
        } else {
            0
        };
        Ok(Self {
            kind: EngineKind::Sinc,
            delay: (exact + lead_in as f64 * ratio).round().max(0.0) as usize,
            lead_in,
            rubato: Box::new(sinc),
        })
    }
}

impl Stream {
    fn new(from_hz: u32, to_hz: u32) -> Result<Self, ResampleError> {
        let Engine {
            kind,
            rubato,
            delay,
            lead_in,
        } = Engine::new(from_hz, to_hz)?;
        let chunk_in = rubato.input_frames_next();
        let mut stream = Self {
            engine: kind,
            chunk_in,
            pending: Vec::with_capacity(chunk_in),
            scratch: vec![0.0; rubato.output_frames_max()],
            delay,
            // `pending` must stay shorter than a chunk (it always is, see `Engine::sinc`).
            lead_in: lead_in.min(chunk_in.saturating_sub(1)),
            to_skip: delay,
            n_in: 0,
            n_out: 0,
            rubato,
        };
        stream.reset();
        Ok(stream)
    }

    fn push(&mut self, mut input: &[f32], out: &mut Vec<f32>) {
        self.n_in += input.len() as u64;
        if !self.pending.is_empty() {
            let take = (self.chunk_in - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() < self.chunk_in {
                return;
            }
            let pending = std::mem::take(&mut self.pending);
            self.run(&pending, None, out);
            self.pending = pending;
            self.pending.clear();
        }
        // Whole chunks straight from the caller's slice, without copying.
        let mut chunks = input.chunks_exact(self.chunk_in);
        for chunk in &mut chunks {
            self.run(chunk, None, out);
        }
        self.pending.extend_from_slice(chunks.remainder());
    }

    fn finish(&mut self, from_hz: u32, to_hz: u32, out: &mut Vec<f32>) {
        let target = output_len(self.n_in, from_hz, to_hz);
        let start = out.len();
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            self.run(&pending, Some(pending.len()), out);
            self.pending = pending;
        }
        // Zeros push the tail through the filter.
        while self.n_out < target {
            if self.run(&[], Some(0), out) == 0 {
                break;
            }
        }
        if self.n_out > target {
            let excess = usize::try_from(self.n_out - target).unwrap_or(usize::MAX);
            out.truncate(out.len().saturating_sub(excess).max(start));
        }
        self.reset();
    }

    fn reset(&mut self) {
        self.rubato.reset();
        self.pending.clear();
        self.pending.resize(self.lead_in, 0.0);
        self.to_skip = self.delay;
        self.n_in = 0;
        self.n_out = 0;
    }

    /// One `rubato` call on `chunk` (`chunk_in` samples, or fewer with `partial`, which
    /// pads with zeros), appending the output minus any remaining delay to `out`.
    /// Returns the number of samples `rubato` produced, delay included.
    fn run(&mut self, chunk: &[f32], partial: Option<usize>, out: &mut Vec<f32>) -> usize {
        let indexing = partial.map(|n| Indexing::new().partial_len(n));
        let produced = SequentialSlice::new(chunk, 1, chunk.len())
            .ok()
            .and_then(|input| {
                let len = self.scratch.len();
                let mut output = SequentialSlice::new_mut(&mut self.scratch, 1, len).ok()?;
                self.rubato
                    .process_into_buffer(&input, &mut output, indexing.as_ref())
                    .ok()
            });
        // Both adapters and the buffer sizes come from rubato's own
        // `input_frames_next`/`output_frames_max`, so rubato has nothing to reject here.
        debug_assert!(
            produced.is_some(),
            "rubato rejected a correctly sized chunk"
        );
        let n = produced.map_or(0, |(_, n_out)| n_out);
        let skip = self.to_skip.min(n);
        self.to_skip -= skip;
        out.extend_from_slice(&self.scratch[skip..n]);
        self.n_out += (n - skip) as u64;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    const OUT_HZ: u32 = 16_000;

    fn sine(freq: f64, rate: u32, n: usize, amp: f64) -> Vec<f32> {
        (0..n)
            .map(|i| (amp * (2.0 * PI * freq * i as f64 / f64::from(rate)).sin()) as f32)
            .collect()
    }

    /// RMS of the middle 80% (the steady state, away from the edges).
    fn rms_mid(x: &[f32]) -> f64 {
        let mid = &x[x.len() / 10..x.len() * 9 / 10];
        (mid.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / mid.len() as f64).sqrt()
    }

    fn db(ratio: f64) -> f64 {
        20.0 * ratio.log10()
    }

    /// Deterministic xorshift so the chunking test needs no `rand`.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn engine(from: u32, to: u32) -> EngineKind {
        let r = Resampler::new(from, to).unwrap();
        r.stream.as_ref().map(|s| s.engine).unwrap()
    }

    #[test]
    fn engines_are_chosen_as_documented() {
        for from in [
            8_000, 11_025, 22_050, 44_100, 48_000, 96_000, 705_600, 768_000, 44_101,
        ] {
            assert_eq!(engine(from, OUT_HZ), EngineKind::Fft, "{from}");
        }
        for from in [96_001, 767_999] {
            assert_eq!(engine(from, OUT_HZ), EngineKind::Sinc, "{from}");
        }
    }

    #[test]
    fn rejects_unsupported_rates() {
        for (from, to) in [
            (0, 16_000),
            (16_000, 0),
            (999, 16_000),
            (768_001, 16_000),
            (u32::MAX, 16_000),
        ] {
            let err = Resampler::new(from, to).unwrap_err();
            assert!(
                matches!(err, ResampleError::UnsupportedRate { .. }),
                "{err}"
            );
        }
        assert!(resample(&[0.0; 10], 0, 16_000).is_err());
        assert!(Resampler::new(1_000, 16_000).is_ok());
        assert!(Resampler::new(768_000, 16_000).is_ok());
    }

    #[test]
    fn identity_is_exact() {
        let mut rng = XorShift(7);
        let x: Vec<f32> = (0..10_007)
            .map(|_| (rng.next() % 20_001) as f32 / 10_000.0 - 1.0)
            .collect();
        assert_eq!(resample(&x, 16_000, 16_000).unwrap(), x);

        let mut r = Resampler::new(16_000, 16_000).unwrap();
        let mut out = Vec::new();
        for chunk in x.chunks(333) {
            r.push(chunk, &mut out);
            r.push(&[], &mut out);
        }
        r.finish(&mut out);
        assert_eq!(out, x);
    }

    #[test]
    fn passband_level_is_kept() {
        // Amplitude 0.5, 1 s: 1 kHz, and a tone near the top of the passband (7 kHz, or
        // 3.5 kHz for 8 kHz input). 96001 and 767999 Hz run the sinc engine.
        for (from, freq) in [
            (44_100, 1_000.0),
            (48_000, 1_000.0),
            (22_050, 1_000.0),
            (8_000, 1_000.0),
            (96_001, 1_000.0),
            (767_999, 1_000.0),
            (44_100, 7_000.0),
            (48_000, 7_000.0),
            (22_050, 7_000.0),
            (8_000, 3_500.0),
            (96_001, 7_000.0),
        ] {
            let x = sine(freq, from, from as usize, 0.5);
            let y = resample(&x, from, OUT_HZ).unwrap();
            let gain_db = db(rms_mid(&y) / rms_mid(&x));
            println!("passband {freq} Hz {from} -> {OUT_HZ}: {gain_db:+.5} dB");
            assert!(gain_db.abs() < 0.1, "{from}, {freq} Hz: {gain_db} dB");
        }
    }

    #[test]
    fn out_of_band_tones_are_rejected() {
        for (from, freq) in [
            (44_100, 12_000.0),
            (48_000, 9_000.0),
            (22_050, 9_000.0),
            (44_100, 8_500.0),
            (96_001, 9_000.0),
            (767_999, 9_000.0),
        ] {
            let x = sine(freq, from, from as usize, 0.5);
            let y = resample(&x, from, OUT_HZ).unwrap();
            let atten_db = db(rms_mid(&y) / rms_mid(&x));
            println!("stopband {freq} Hz {from} -> {OUT_HZ}: {atten_db:.1} dB");
            assert!(atten_db < -60.0, "{from}, {freq} Hz: {atten_db} dB");
        }
    }

    #[test]
    fn output_length_is_rounded_ratio() {
        let x = vec![0.1; 50_003];
        for from in [
            44_100, 48_000, 22_050, 8_000, 1_000, 768_000, 96_001, 16_000,
        ] {
            // One resampler per rate, reused across streams.
            let mut r = Resampler::new(from, OUT_HZ).unwrap();
            for n in [0usize, 1, 2, 7, 441, 1_000, 12_345, 50_003] {
                let mut y = Vec::new();
                r.push(&x[..n], &mut y);
                r.finish(&mut y);
                let want = output_len(n as u64, from, OUT_HZ) as usize;
                assert_eq!(y.len(), want, "{from} Hz, n = {n}");
            }
        }
        assert_eq!(output_len(1, 44_100, 16_000), 0);
        assert_eq!(output_len(3, 48_000, 16_000), 1);
        assert_eq!(output_len(2, 48_000, 16_000), 1); // 0.667 rounds up
        assert_eq!(output_len(44_100, 44_100, 16_000), 16_000);
    }

    #[test]
    fn chunked_streaming_matches_one_shot() {
        for from in [44_100, 48_000, 8_000, 96_001] {
            let mut rng = XorShift(u64::from(from));
            let n = from as usize * 3 / 2;
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    let t = i as f32 / from as f32;
                    0.4 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()
                        + 0.1 * ((rng.next() % 2_001) as f32 / 1_000.0 - 1.0)
                })
                .collect();
            let whole = resample(&x, from, OUT_HZ).unwrap();

            let mut r = Resampler::new(from, OUT_HZ).unwrap();
            // Twice, to check that `finish` leaves the resampler ready for a new stream.
            for round in 0..2 {
                let mut out = Vec::new();
                let mut rest = &x[..];
                while !rest.is_empty() {
                    let len = match rng.next() % 8 {
                        0 => 0,
                        1 => 1,
                        2 => (rng.next() % 8) as usize,
                        _ => (rng.next() % 5_000) as usize,
                    }
                    .min(rest.len());
                    r.push(&rest[..len], &mut out);
                    rest = &rest[len..];
                }
                r.finish(&mut out);
                assert_eq!(out.len(), whole.len(), "{from} Hz round {round}");
                let max_diff = out
                    .iter()
                    .zip(&whole)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                println!(
                    "chunked vs one-shot {from} -> {OUT_HZ} round {round}: max diff {max_diff:e}"
                );
                assert!(max_diff <= 1e-6, "{from} Hz round {round}: {max_diff}");
            }
        }
    }

    #[test]
    fn impulse_lands_at_its_time() {
        // Impulse at input sample p, where p * to / from is a whole output sample.
        for (from, to, p) in [
            (44_100, OUT_HZ, 441 * 37),
            (48_000, OUT_HZ, 3 * 1_234),
            (22_050, OUT_HZ, 441 * 21),
            (8_000, OUT_HZ, 2_345),
            (96_001, OUT_HZ, 96_001),
            (767_999, OUT_HZ, 767_999),
            (16_000, 130_003, 16_000),
        ] {
            let mut x = vec![0.0f32; p + from as usize / 4];
            x[p] = 1.0;
            let y = resample(&x, from, to).unwrap();
            let peak = y
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap();
            let want = p * to as usize / from as usize;
            println!("impulse {from} -> {to}: peak at {peak}, expected {want}");
            assert!(peak.abs_diff(want) <= 1, "{from} -> {to}: {peak} vs {want}");
            if engine(from, to) == EngineKind::Fft {
                assert_eq!(peak, want, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn tone_phase_is_aligned() {
        // Fit the output tone's phase against the ideal tone sampled at the output
        // times; the phase difference is the residual delay. 96001, 130003 and 767999 Hz
        // run the sinc engine.
        let freq = 1_000.0;
        for (from, to) in [
            (44_100, OUT_HZ),
            (48_000, OUT_HZ),
            (22_050, OUT_HZ),
            (8_000, OUT_HZ),
            (11_025, OUT_HZ),
            (96_001, OUT_HZ),
            (130_003, OUT_HZ),
            (767_999, OUT_HZ),
            (16_000, 44_100),
            (16_000, 130_003),
        ] {
            let x = sine(freq, from, from as usize, 0.5);
            let y = resample(&x, from, to).unwrap();
            let (lo, hi) = (y.len() / 10, y.len() * 9 / 10);
            let (mut s, mut c) = (0.0, 0.0);
            for (i, &v) in y.iter().enumerate().take(hi).skip(lo) {
                let w = 2.0 * PI * freq * i as f64 / f64::from(to);
                s += f64::from(v) * w.sin();
                c += f64::from(v) * w.cos();
            }
            // y ~ sin(w - phi) = sin(w)cos(phi) - cos(w)sin(phi): phi = atan2(-c, s).
            let phi = (-c).atan2(s);
            let delay = phi / (2.0 * PI * freq) * f64::from(to);
            let kind = engine(from, to);
            println!("tone phase {from} -> {to} ({kind:?}): delay {delay:+.4} output samples");
            // The FFT engine's delay is exact; the sinc engine's is rounded to within
            // `ratio / 2` when downsampling (lead-in zeros) and half a sample otherwise.
            let ratio = f64::from(to) / f64::from(from);
            let bound = match kind {
                EngineKind::Fft => 0.01,
                EngineKind::Sinc => ratio.min(1.0) / 2.0 + 0.01,
            };
            assert!(delay.abs() < bound, "{from} -> {to}: delay {delay}");
        }
    }

    #[test]
    fn buffers_stay_bounded() {
        let mut r = Resampler::new(44_100, OUT_HZ).unwrap();
        let (chunk_in, cap) = {
            let s = r.stream.as_ref().unwrap();
            (s.chunk_in, s.pending.capacity())
        };
        let x = sine(300.0, 44_100, 4_410, 0.5);
        let mut out = Vec::new();
        for i in 0..1_000 {
            r.push(&x[..(i * 7) % 4_410], &mut out);
            out.clear();
        }
        let s = r.stream.as_ref().unwrap();
        assert!(s.pending.len() < chunk_in);
        assert_eq!(s.pending.capacity(), cap);
    }

    #[test]
    fn throughput() {
        // Rough figures for the report (release: `cargo test --release --lib resample
        // -- --nocapture`); nothing is asserted about time. 96001 and 767999 Hz run the
        // sinc engine.
        let secs = if cfg!(debug_assertions) { 1 } else { 20 };
        for from in [44_100, 48_000, 22_050, 8_000, 96_001, 767_999] {
            let x = sine(1_000.0, from, from as usize * secs, 0.5);
            let mut r = Resampler::new(from, OUT_HZ).unwrap();
            let mut out = Vec::with_capacity(OUT_HZ as usize * secs + 1);
            let start = std::time::Instant::now();
            for packet in x.chunks(1_152) {
                r.push(packet, &mut out);
            }
            r.finish(&mut out);
            let elapsed = start.elapsed().as_secs_f64();
            println!(
                "throughput {from} -> {OUT_HZ} ({:?}): {secs} s in {:.1} ms = {:.0}x realtime",
                engine(from, OUT_HZ),
                elapsed * 1e3,
                secs as f64 / elapsed
            );
            assert_eq!(out.len(), OUT_HZ as usize * secs);
        }
    }
}
