//! The timed work of `audiocap bench`: the front end, the encoder, decoder prefill
//! and decode, end-to-end captioning and the `--profile` run, each recorded as a
//! [`Figure`] by a [`Runner`] (warm-up runs, then timed repetitions).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use ndarray::Array3;

use super::options::BenchOptions;
use super::report::{Figure, fmt_rate};
use crate::audio::decode::decode_file;
use crate::audio::fbank::{Fbank, FbankFrames};
use crate::audio::resample::resample;
use crate::engine::audio::{AudioEmbeds, ClipRequest, TagRequest};
use crate::engine::generate::{GenerationParams, generate};
use crate::engine::model::{EngineOptions, OnnxModel};
use crate::output::EmbeddingKind;

/// The front end is timed over at least this long per repetition.
const FRONT_END_MIN_SECONDS: f64 = 0.5;
/// Warm-up generations produce this many tokens (prefill and a decode step).
const WARMUP_TOKENS: usize = 2;

/// Times runs and collects the figures.
pub(super) struct Runner {
    pub(super) warmup: usize,
    pub(super) reps: usize,
    pub(super) quiet: bool,
    pub(super) figures: Vec<Figure>,
}

impl Runner {
    pub(super) fn progress(&self, message: &str) {
        if !self.quiet {
            eprintln!("bench: {message}");
        }
    }

    fn record(&mut self, figure: Figure) {
        self.progress(&format!(
            "{} batch {}: {} {} (min {}, max {})",
            figure.stage,
            figure.batch,
            fmt_rate(figure.mean),
            figure.unit,
            fmt_rate(figure.min),
            fmt_rate(figure.max)
        ));
        self.figures.push(figure);
    }

    /// Runs `f` `warmup` times untimed, then `reps` times timed; returns the seconds
    /// of each timed run.
    fn time(&self, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<f64>> {
        self.time_generation(usize::MAX, |_| f())
    }

    /// As [`Runner::time`] for a run that generates `tokens` tokens: warm-up runs
    /// generate at most [`WARMUP_TOKENS`] (enough to run prefill and a decode step).
    fn time_generation(
        &self,
        tokens: usize,
        mut f: impl FnMut(usize) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<f64>> {
        for _ in 0..self.warmup {
            f(tokens.min(WARMUP_TOKENS))?;
        }
        (0..self.reps)
            .map(|_| {
                let started = Instant::now();
                f(tokens)?;
                Ok(started.elapsed().as_secs_f64())
            })
            .collect()
    }
}

/// A figure whose every repetition did `work` units.
fn rate_figure(
    stage: &'static str,
    batch: usize,
    unit: &'static str,
    work: f64,
    seconds: Vec<f64>,
) -> Figure {
    let rates = seconds.iter().map(|&s| work / s.max(1e-9)).collect();
    Figure::new(stage, batch, unit, rates, seconds)
}

/// WAV decode, resampling to the model's rate if need be, and fbank of one clip.
pub(super) fn front_end(fbank: &Fbank, path: &Path) -> anyhow::Result<FbankFrames> {
    let audio = decode_file(path).with_context(|| format!("decoding {}", path.display()))?;
    let rate = fbank.config().sample_rate;
    if audio.info.sample_rate == rate {
        return Ok(fbank.compute(&audio.samples));
    }
    let samples = resample(&audio.samples, audio.info.sample_rate, rate)
        .with_context(|| format!("resampling {}", path.display()))?;
    Ok(fbank.compute(&samples))
}

/// The front end on one thread, over as many clips as fill [`FRONT_END_MIN_SECONDS`].
pub(super) fn measure_front_end(
    r: &mut Runner,
    fbank: &Fbank,
    clips: &[PathBuf],
) -> anyhow::Result<()> {
    let started = Instant::now();
    front_end(fbank, &clips[0])?;
    let one = started.elapsed().as_secs_f64().max(1e-6);
    let per_rep = ((FRONT_END_MIN_SECONDS / one).ceil() as usize).clamp(1, 10_000);
    let seconds = r.time(|| {
        for k in 0..per_rep {
            front_end(fbank, &clips[k % clips.len()])?;
        }
        Ok(())
    })?;
    r.record(rate_figure(
        "front_end",
        1,
        "clips/s/core",
        per_rep as f64,
        seconds,
    ));
    Ok(())
}

/// The encoder as a caption needs it (`encoder`: audio embeddings only), then, when
/// the export has them, with the tags (top 5) and the encoder embedding bound and
/// copied out too (`encoder_extras`).
pub(super) fn measure_encoder(
    r: &mut Runner,
    model: &mut OnnxModel,
    batch: &[(&[f32], usize)],
) -> anyhow::Result<()> {
    let seconds = r.time(|| {
        model.encode(batch)?;
        Ok(())
    })?;
    r.record(rate_figure(
        "encoder",
        batch.len(),
        "clips/s",
        batch.len() as f64,
        seconds,
    ));
    if model
        .manifest
        .embedding_dim(EmbeddingKind::Encoder)
        .is_none()
    {
        return Ok(());
    }
    let tags = model.manifest.tag_labels().is_some();
    model.request_clip_outputs(ClipRequest {
        tags: tags.then_some(TagRequest {
            top_k: 5,
            min_score: 0.0,
        }),
        embedding: EmbeddingKind::Encoder,
    })?;
    let seconds = r.time(|| {
        model.encode(batch)?.take_extras();
        Ok(())
    });
    model.request_clip_outputs(ClipRequest::default())?;
    r.record(rate_figure(
        "encoder_extras",
        batch.len(),
        "clips/s",
        batch.len() as f64,
        seconds?,
    ));
    Ok(())
}

/// Prefill alone, then fixed-length generation of `n` tokens, for the batch `audio`.
pub(super) fn measure_decoder(
    r: &mut Runner,
    model: &mut OnnxModel,
    audio: &Array3<f32>,
    n: usize,
) -> anyhow::Result<()> {
    let b = audio.dim().0;
    let prompt_tokens = model.prompt_len();
    // The batch's audio where the model runs, as the encoder leaves it.
    let audio = &AudioEmbeds::from_array(model.device(), audio.clone())?;
    let prefill = r.time(|| {
        let embeds = model.prompt(audio)?;
        let past = model.empty_past(b, model.cache_capacity(n))?;
        // As generation runs it: the greedy choice where the model runs.
        let (_, cache) = model.decode_greedy(embeds, past, 0, &vec![false; b])?;
        // Fused attention reuses the buffers (warm-up runs allocate them).
        model.recycle_cache(cache);
        Ok(())
    })?;
    let prefill_mean = prefill.iter().sum::<f64>() / prefill.len().max(1) as f64;
    r.record(rate_figure(
        "prefill",
        b,
        "tokens/s",
        (b * prompt_tokens) as f64,
        prefill,
    ));

    let generated = r.time_generation(n, |tokens| generate_fixed(model, audio, tokens))?;
    if n >= 2 {
        // The steps after prefill: generation time less the mean prefill time.
        let rates = generated
            .iter()
            .map(|&t| (b * (n - 1)) as f64 / (t - prefill_mean).max(1e-9))
            .collect();
        r.record(Figure::new(
            "decode",
            b,
            "tokens/s",
            rates,
            generated.clone(),
        ));
    }
    r.record(rate_figure(
        "generate",
        b,
        "tokens/s",
        (b * n) as f64,
        generated,
    ));
    Ok(())
}

/// Decode + fbank + encode + generate `n` tokens + detokenise, for a batch of clips.
pub(super) fn measure_end_to_end(
    r: &mut Runner,
    model: &mut OnnxModel,
    fbank: &Fbank,
    clips: &[&Path],
    n: usize,
) -> anyhow::Result<()> {
    let seconds = r.time_generation(n, |tokens| {
        let features = clips
            .iter()
            .map(|p| front_end(fbank, p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let inputs: Vec<(&[f32], usize)> = features
            .iter()
            .map(|f| (f.data.as_slice(), f.num_frames))
            .collect();
        let audio = model.encode(&inputs)?;
        let captions = generate(
            model,
            &audio,
            &GenerationParams {
                max_new_tokens: tokens,
                beams: 1,
                min_new_tokens: tokens,
            },
        )?;
        for c in &captions {
            model
                .tokenizer
                .decode(&c.token_ids, true)
                .map_err(|e| anyhow::anyhow!("detokenising: {e}"))?;
        }
        Ok(())
    })?;
    r.record(rate_figure(
        "end_to_end",
        clips.len(),
        "captions/s",
        clips.len() as f64,
        seconds,
    ));
    Ok(())
}

/// `--profile`: the model loaded again with ONNX Runtime's profiling on; two
/// encoder batches and two fixed-length generations (the first of each warms up);
/// the profile files moved into `dir`.
pub(super) fn profile_generation(
    export_dir: &Path,
    options: &BenchOptions,
    dir: &Path,
    encoder_batch: &[(&[f32], usize)],
    audio: &Array3<f32>,
    n: usize,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut model = OnnxModel::load(
        export_dir,
        &EngineOptions {
            device: options.device,
            intra_threads: options.intra_threads,
            profile_prefix: Some(dir.join("ort-profile")),
        },
    )
    .with_context(|| format!("loading {} with profiling", export_dir.display()))?;
    model.encode(encoder_batch)?;
    model.encode(encoder_batch)?;
    let audio = AudioEmbeds::from_array(model.device(), audio.clone())?;
    generate_fixed(&mut model, &audio, n)?;
    generate_fixed(&mut model, &audio, n)?;
    let mut files = Vec::new();
    for written in model.end_profiling()? {
        // ONNX Runtime may write beside the working directory; keep them together.
        let target = dir.join(written.file_name().unwrap_or(written.as_os_str()));
        if written != target {
            std::fs::rename(&written, &target)
                .or_else(|_| std::fs::copy(&written, &target).map(|_| ()))
                .with_context(|| format!("moving {}", written.display()))?;
        }
        files.push(target);
    }
    Ok(files)
}

/// `audio` [1, n, h] repeated to [b, n, h].
pub(super) fn tile(audio: &Array3<f32>, b: usize) -> Array3<f32> {
    let (_, n, h) = audio.dim();
    Array3::from_shape_fn((b, n, h), |(_, j, k)| audio[[0, j, k]])
}

/// Greedy generation of exactly `tokens` tokens per row.
fn generate_fixed(model: &mut OnnxModel, audio: &AudioEmbeds, tokens: usize) -> anyhow::Result<()> {
    let out = generate(
        model,
        audio,
        &GenerationParams {
            max_new_tokens: tokens,
            beams: 1,
            min_new_tokens: tokens,
        },
    )?;
    if let Some(short) = out.iter().find(|g| g.token_ids.len() != tokens) {
        bail!(
            "fixed-length generation gave {} tokens instead of {tokens}",
            short.token_ids.len()
        );
    }
    Ok(())
}
