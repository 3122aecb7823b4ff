//! `audiocap train`: the stages of a training file, run after run, with resumable
//! checkpoints, validation and a metrics log.
//!
//! Output folder:
//! ```text
//! OUTPUT/train.toml                      the configuration as run
//! OUTPUT/metrics.jsonl                   one JSON object per log step / validation
//! OUTPUT/feature-cache/ENCODER/…         frozen encoder features (unless features.cache)
//! OUTPUT/stages/NN-NAME/seed-S/checkpoint/   latest: projector, adapter, optimiser, state
//! OUTPUT/stages/NN-NAME/seed-S/best/     best validated projector + adapter
//! OUTPUT/stages/NN-NAME/seed-S/result/   what the run hands on (+ done.json)
//! OUTPUT/stages/NN-NAME/merged/          several runs merged by PEFT `cat`
//! OUTPUT/final/                          projector.safetensors + adapter/: export these
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::config::{BestMetric, DatasetSection, LoraInit, StageSection, TrainConfig};
use super::data::load_train_set;
use super::encode::{ClipEncoder, EncodedClip};
use super::model::{
    Example, InitFrom, LoraSettings, TrainableCaptioner, TrainableParams, tokenize_caption,
};
use super::optim::{AdamW, AdamWSettings, GradAccumulator};
use super::schedule::CosineSchedule;
use crate::atomic;
use crate::config::DeviceSpec;
use crate::eval::fense::{FenseModels, FensePaths};
use crate::model::llama::LlamaConfig;
use crate::model::lora::PeftAdapter;
use crate::model::prompt::load_tokenizer;
use crate::rng::SplitMix64;

/// How `audiocap train` was asked to run.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue a run in the same output folder from its checkpoints.
    pub resume: bool,
    /// Draw a progress bar (else log lines on stderr).
    pub progress_bar: bool,
    /// End this invocation after this many optimiser steps (counted over every
    /// stage and seed it runs), with a checkpoint that `resume` continues from: a
    /// job with a time limit trains in slices.
    pub stop_after_steps: Option<u64>,
}

/// Validation numbers of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub epoch: usize,
    /// Mean cross-entropy per caption token (nats).
    pub loss: f64,
    pub cider_d: Option<f64>,
    pub bleu_4: Option<f64>,
    pub rouge_l: Option<f64>,
    /// Fraction of captioned clips whose greedy caption equals one of its references
    /// (after trimming and lower-casing).
    pub exact_match: Option<f64>,
    /// FENSE of the greedy captions (with `training.fense_models`).
    #[serde(default)]
    pub fense: Option<f64>,
    #[serde(default)]
    pub sbert_sim: Option<f64>,
    /// Fraction of greedy captions the fluency-error detector flags.
    #[serde(default)]
    pub fluency_error_rate: Option<f64>,
    /// Clips captioned.
    pub clips: usize,
}

impl Validation {
    /// Larger is better.
    fn score(&self, metric: BestMetric) -> f64 {
        match metric {
            BestMetric::CiderD => self.cider_d.unwrap_or(f64::NEG_INFINITY),
            BestMetric::Fense => self.fense.unwrap_or(f64::NEG_INFINITY),
            BestMetric::Loss => -self.loss,
        }
    }
}

/// Where one run stands: saved in every checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RunState {
    /// The epoch in progress (0-based) and optimiser steps done in it.
    epoch: usize,
    step_in_epoch: usize,
    /// Optimiser steps done in this run.
    steps: u64,
    dropout_rng: Option<SplitMix64>,
    best: Option<Validation>,
    last_validation: Option<Validation>,
    /// Mean training loss of the first and the latest logged window.
    first_loss: Option<f64>,
    last_loss: Option<f64>,
}

/// What one run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedRunSummary {
    pub stage: String,
    pub seed: u64,
    pub steps: u64,
    pub epochs: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub best: Option<Validation>,
    /// Steps done in this process (0 when the run was already complete).
    pub steps_this_session: u64,
    pub tokens_per_second: f64,
    pub steps_per_second: f64,
    pub result: PathBuf,
}

/// How `train` ended.
#[derive(Debug, Clone)]
pub enum TrainOutcome {
    /// Every stage ran to its end: the final model is written.
    Finished(TrainSummary),
    /// `stop_after_steps` was reached first: a checkpoint holds where training stands.
    Stopped(StoppedAt),
}

/// Where a run stopped by `stop_after_steps` stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppedAt {
    pub stage: String,
    pub seed: u64,
    /// Optimiser steps done in that run, out of `total_steps`.
    pub steps: u64,
    pub total_steps: u64,
    /// Steps done by this invocation, over all its runs.
    pub steps_this_session: u64,
}

/// How one run ended.
enum RunOutcome {
    /// Boxed: the summary is large and the other variant small.
    Done(Box<SeedRunSummary>),
    Stopped(StoppedAt),
}

/// What the whole training file did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub runs: Vec<SeedRunSummary>,
    /// `final/projector.safetensors`
    pub projector: PathBuf,
    /// `final/adapter`
    pub adapter: PathBuf,
    /// Clips left out, per stage: (stage, key, why).
    pub skipped: Vec<(String, String, String)>,
}

/// A stage's (or the start's) projector and adapter.
#[derive(Debug, Clone, Default)]
struct Handoff {
    projector: Option<PathBuf>,
    adapter: Option<PathBuf>,
}

/// Everything the runs of one file share.
struct RunContext {
    config: TrainConfig,
    options: TrainOptions,
    llm_dir: PathBuf,
    llm_config: LlamaConfig,
    tokenizer: Tokenizer,
    device: Device,
    dtype: DType,
    /// FENSE's models for validation (`training.fense_models`), on the CPU.
    fense: Option<FenseModels>,
    metrics: std::fs::File,
    /// Optimiser steps this invocation has done, over all its runs.
    session_steps: u64,
}

/// Runs every stage of `config`.
pub fn train(config: &TrainConfig, options: &TrainOptions) -> anyhow::Result<TrainOutcome> {
    let out = config.output();
    let stages_dir = out.join("stages");
    if options.stop_after_steps == Some(0) {
        bail!("stop after 0 steps: give at least 1");
    }
    if stages_dir.exists() && !options.resume {
        bail!(
            "{} already holds a training run: pass --resume to continue it, or choose another model.output",
            out.display()
        );
    }
    // Everything that can fail on the configuration fails before the output exists.
    let device = make_device(&config.model.device)?;
    // The config refuses anything else (f16 included).
    let dtype = match config.model.dtype.as_str() {
        "bf16" => DType::BF16,
        _ => DType::F32,
    };
    let llm_dir = PathBuf::from(&config.model.llm);
    let llm_config = LlamaConfig::from_file(&llm_dir.join("config.json"))?;
    let tokenizer = load_tokenizer(&llm_dir.join("tokenizer.json"))?;
    if !Path::new(&config.model.beats).is_file() {
        bail!("model.beats: {} is not a file", config.model.beats);
    }
    let fense = match &config.training.fense_models {
        Some(dir) => {
            Some(FenseModels::load(&FensePaths::in_dir(dir)).context("training.fense_models")?)
        }
        None => None,
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("train.toml"), config.to_toml())
        .with_context(|| format!("writing {}", out.join("train.toml").display()))?;
    let metrics_file = out.join("metrics.jsonl");
    let metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_file)
        .with_context(|| format!("opening {}", metrics_file.display()))?;
    let mut ctx = RunContext {
        config: config.clone(),
        options: options.clone(),
        llm_dir,
        llm_config,
        tokenizer,
        device: device.clone(),
        dtype,
        fense,
        metrics,
        session_steps: 0,
    };
    // The encoder runs on the CPU unless training is on a GPU.
    let mut encoder = ClipEncoder::new(
        Path::new(&config.model.beats),
        &config.cache_dir(),
        config.features.max_seconds,
        &device,
    )?;

    let mut handoff = Handoff {
        projector: config.model.init_projector.as_ref().map(PathBuf::from),
        adapter: config.model.init_adapter.as_ref().map(PathBuf::from),
    };
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for (index, stage) in config.stages.iter().enumerate() {
        let stage_dir = stages_dir.join(format!("{index:02}-{}", stage.name));
        let (train_clips, mut left_out) =
            load_and_encode(&mut encoder, &stage.train, &stage.name, "train")?;
        let validation = match &stage.validation {
            Some(v) => {
                let (clips, more) = load_and_encode(&mut encoder, v, &stage.name, "validation")?;
                left_out.extend(more);
                Some(clips)
            }
            None => None,
        };
        skipped.extend(
            left_out
                .into_iter()
                .map(|(k, why)| (stage.name.clone(), k, why)),
        );
        if train_clips.is_empty() {
            bail!("stage {}: no training clip could be used", stage.name);
        }
        let train_examples = examples(&ctx, &train_clips)?;
        let val_examples = match &validation {
            Some(v) => examples(&ctx, v)?,
            None => Vec::new(),
        };
        let mut results = Vec::new();
        for seed in stage.run_seeds(config.training.seed) {
            let run_dir = stage_dir.join(format!("seed-{seed}"));
            let init = Handoff {
                projector: handoff.projector.clone(),
                adapter: match stage.lora_init {
                    LoraInit::Continue => handoff.adapter.clone(),
                    LoraInit::Fresh => None,
                },
            };
            let summary = match run_one(
                &mut ctx,
                stage,
                seed,
                &run_dir,
                &init,
                &encoder,
                &train_clips,
                &train_examples,
                validation.as_deref().unwrap_or(&[]),
                &val_examples,
            )? {
                RunOutcome::Done(summary) => *summary,
                RunOutcome::Stopped(at) => return Ok(TrainOutcome::Stopped(at)),
            };
            results.push(summary.result.clone());
            runs.push(summary);
        }
        // One run hands its model on as it is, unless it is to be merged with the
        // previous stage's adapter.
        handoff = if results.len() == 1 && !stage.merge_with_previous {
            Handoff {
                projector: Some(results[0].join("projector.safetensors")),
                adapter: Some(results[0].join("adapter")),
            }
        } else {
            let mut adapters: Vec<PathBuf> = Vec::new();
            if stage.merge_with_previous {
                adapters.extend(handoff.adapter.clone());
            }
            adapters.extend(results.iter().map(|r| r.join("adapter")));
            let merged_dir = stage_dir.join("merged");
            merge_into(&adapters, &merged_dir.join("adapter"))?;
            replace_file(
                &results[0].join("projector.safetensors"),
                &merged_dir.join("projector.safetensors"),
            )?;
            Handoff {
                projector: Some(merged_dir.join("projector.safetensors")),
                adapter: Some(merged_dir.join("adapter")),
            }
        };
    }

    let final_dir = out.join("final");
    std::fs::create_dir_all(&final_dir)?;
    let (Some(projector), Some(adapter)) = (&handoff.projector, &handoff.adapter) else {
        bail!("no stage produced a model");
    };
    replace_file(projector, &final_dir.join("projector.safetensors"))?;
    let final_adapter = final_dir.join("adapter");
    let loaded = PeftAdapter::load(adapter)?;
    replace_adapter(&loaded, &final_adapter)?;
    Ok(TrainOutcome::Finished(TrainSummary {
        runs,
        projector: final_dir.join("projector.safetensors"),
        adapter: final_adapter,
        skipped,
    }))
}

fn make_device(text: &str) -> anyhow::Result<Device> {
    match text.parse::<DeviceSpec>() {
        Ok(DeviceSpec::Cpu) => Ok(Device::Cpu),
        Ok(DeviceSpec::Cuda(ordinal)) => Device::new_cuda(ordinal).with_context(|| {
            format!(
                "model.device = {text:?}: CUDA is unavailable (build with `--features cuda` on a machine with the CUDA toolkit)"
            )
        }),
        Err(e) => bail!("model.device: {e}"),
    }
}

/// A clip left out of a set: (key, why).
type LeftOutClip = (String, String);

/// Matches a captions table to its audio and encodes it; returns the usable clips
/// and (key, why) of the ones left out.
fn load_and_encode(
    encoder: &mut ClipEncoder,
    dataset: &DatasetSection,
    stage: &str,
    role: &str,
) -> anyhow::Result<(Vec<EncodedClip>, Vec<LeftOutClip>)> {
    let set = load_train_set(
        Path::new(&dataset.captions),
        Path::new(&dataset.audio),
        dataset.key_column.as_deref(),
    )
    .with_context(|| format!("stage {stage}: reading the {role} set"))?;
    let mut left_out = set.missing_audio.clone();
    left_out.extend(
        set.without_captions
            .iter()
            .map(|k| (k.clone(), "no caption".to_string())),
    );
    let (clips, report) = encoder
        .encode_all(&set.clips, |_| {})
        .with_context(|| format!("stage {stage}: encoding the {role} audio"))?;
    left_out.extend(report.skipped.iter().cloned());
    eprintln!(
        "stage {stage}: {role} set: {} clips ({} from the feature cache, {} encoded), {} left out",
        clips.len(),
        report.cached,
        report.computed,
        left_out.len()
    );
    for (key, why) in left_out.iter().take(20) {
        eprintln!("  left out {key}: {why}");
    }
    if left_out.len() > 20 {
        eprintln!("  ... and {} more", left_out.len() - 20);
    }
    Ok((clips, left_out))
}

/// (clip index, caption ids) pairs: each caption of each clip is one example.
fn examples(ctx: &RunContext, clips: &[EncodedClip]) -> anyhow::Result<Vec<(usize, Vec<u32>)>> {
    let mut out = Vec::new();
    for (i, clip) in clips.iter().enumerate() {
        for caption in &clip.captions {
            let ids = tokenize_caption(
                &ctx.tokenizer,
                caption,
                ctx.config.training.max_caption_tokens,
            )?;
            if !ids.is_empty() {
                out.push((i, ids));
            }
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    ctx: &mut RunContext,
    stage: &StageSection,
    seed: u64,
    run_dir: &Path,
    init: &Handoff,
    encoder: &ClipEncoder,
    train_clips: &[EncodedClip],
    train: &[(usize, Vec<u32>)],
    val_clips: &[EncodedClip],
    val: &[(usize, Vec<u32>)],
) -> anyhow::Result<RunOutcome> {
    let cfg = ctx.config.clone();
    let t = &cfg.training;
    let result_dir = run_dir.join("result");
    let done_file = result_dir.join("done.json");
    if done_file.is_file() {
        let summary: SeedRunSummary = serde_json::from_slice(&std::fs::read(&done_file)?)
            .with_context(|| format!("reading {}", done_file.display()))?;
        eprintln!("stage {} seed {seed}: already complete", stage.name);
        return Ok(RunOutcome::Done(Box::new(SeedRunSummary {
            steps_this_session: 0,
            ..summary
        })));
    }
    let checkpoint_dir = run_dir.join("checkpoint");
    let resume_from = [checkpoint_dir.clone(), run_dir.join("checkpoint.old")]
        .into_iter()
        .find(|d| d.join("state.json").is_file());
    if resume_from.is_some() && !ctx.options.resume {
        bail!("{} has a checkpoint: pass --resume", run_dir.display());
    }
    let from = match &resume_from {
        Some(dir) => InitFrom {
            projector: Some(dir.join("projector.safetensors")),
            adapter: Some(dir.join("adapter")),
        },
        None => InitFrom {
            projector: init.projector.clone(),
            adapter: init.adapter.clone(),
        },
    };
    let encoder_dim = train_clips[0].shape.last().copied().unwrap_or(0);
    let lora = LoraSettings {
        r: cfg.lora.r,
        alpha: cfg.lora.alpha,
        dropout: cfg.lora.dropout,
        target_modules: cfg.lora.target_modules.clone(),
    };
    let mut params = TrainableParams::init(
        &ctx.llm_config,
        encoder_dim,
        cfg.model.projector_hidden,
        &lora,
        &from,
        seed,
        DType::F32,
        &ctx.device,
    )?;
    // As PEFT records it: the decoder the adapter was trained on.
    if params.adapter_config.base_model_name_or_path.is_none() {
        params.adapter_config.base_model_name_or_path = Some(cfg.model.llm.clone());
    }
    let model = TrainableCaptioner::new(
        &ctx.llm_dir,
        &params,
        &cfg.model.prompt_template,
        cfg.lora.dropout,
        seed,
        ctx.dtype,
        &ctx.device,
    )?;
    if from.projector.is_none() && cfg.model.projector_embedding_scale && stage.train_projector {
        // Clips spread over the training set (captions of one clip are adjacent).
        let n = t.batch_size.clamp(8, 32).min(train.len());
        let sample = (0..n)
            .map(|k| {
                let (clip, caption) = &train[k * train.len() / n];
                Ok(Example {
                    features: encoder.load(&train_clips[*clip])?,
                    caption: caption.clone(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let batch = model.collate(&sample.iter().collect::<Vec<_>>())?;
        let (audio_rms, token_rms) = model.embedding_scales(&batch)?;
        if audio_rms > 0.0 && token_rms > 0.0 {
            let factor = token_rms / audio_rms;
            params.scale_projector_output(factor)?;
            eprintln!(
                "stage {} seed {seed}: fresh projector scaled x{factor:.3} to the decoder's \
                 embedding scale (audio embedding RMS {audio_rms:.4} -> {token_rms:.4})",
                stage.name
            );
        }
    }
    let vars = params.trainable(stage.train_projector);
    let mut optimizer = AdamW::new(
        vars,
        AdamWSettings {
            beta1: cfg.optimizer.beta1,
            beta2: cfg.optimizer.beta2,
            eps: cfg.optimizer.eps,
            weight_decay: cfg.optimizer.weight_decay,
        },
    )?;
    let per_step = t.batch_size * t.grad_accumulation;
    let steps_per_epoch = train.len().div_ceil(per_step);
    let total_steps = (steps_per_epoch * stage.epochs) as u64;
    let schedule = CosineSchedule::new(
        stage.peak_lr.unwrap_or(cfg.optimizer.peak_lr),
        cfg.optimizer.warmup_fraction,
        total_steps,
    );
    let mut state = RunState::default();
    if let Some(dir) = &resume_from {
        state = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)
            .with_context(|| format!("reading {}", dir.join("state.json").display()))?;
        optimizer
            .load(&dir.join("optimizer.safetensors"), state.steps)
            .with_context(|| format!("restoring the optimiser from {}", dir.display()))?;
        if let Some(rng) = state.dropout_rng {
            model.dropout().set_rng_state(rng);
        }
        eprintln!(
            "stage {} seed {seed}: resuming at epoch {}, step {} of {total_steps}",
            stage.name,
            state.epoch + 1,
            state.steps
        );
    }

    let bar = if ctx.options.progress_bar {
        let bar = ProgressBar::new(total_steps);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!("{} seed {seed}", stage.name));
        bar.set_position(state.steps);
        bar
    } else {
        ProgressBar::hidden()
    };

    let started = Instant::now();
    let mut session_steps = 0u64;
    let mut session_tokens = 0usize;
    let mut window = (0.0f64, 0usize); // (loss sum, tokens) since the last log line
    model.set_training(true);
    while state.epoch < stage.epochs {
        let mut order: Vec<usize> = (0..train.len()).collect();
        SplitMix64::derive(seed, 1000 + state.epoch as u64).shuffle(&mut order);
        while state.step_in_epoch < steps_per_epoch {
            // Checked before a step, not after one: a run that ends on the last
            // allowed step still validates and writes its result.
            if ctx
                .options
                .stop_after_steps
                .is_some_and(|n| ctx.session_steps >= n)
            {
                state.dropout_rng = Some(model.dropout().rng_state());
                save_checkpoint(run_dir, &params, &optimizer, &state)?;
                bar.finish_and_clear();
                return Ok(RunOutcome::Stopped(StoppedAt {
                    stage: stage.name.clone(),
                    seed,
                    steps: state.steps,
                    total_steps,
                    steps_this_session: ctx.session_steps,
                }));
            }
            let start = state.step_in_epoch * per_step;
            let chosen = &order[start..(start + per_step).min(order.len())];
            let step_examples = chosen
                .iter()
                .map(|&i| {
                    Ok(Example {
                        features: encoder.load(&train_clips[train[i].0])?,
                        caption: train[i].1.clone(),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let lr = schedule.lr(state.steps);
            let outcome = train_step(
                &model,
                &mut optimizer,
                &step_examples,
                t.batch_size,
                cfg.optimizer.max_grad_norm,
                lr,
            )?;
            let (loss_sum, step_tokens, grad_norm) =
                (outcome.loss_sum, outcome.tokens, outcome.grad_norm);
            session_tokens += outcome.positions;
            state.steps += 1;
            state.step_in_epoch += 1;
            session_steps += 1;
            ctx.session_steps += 1;
            window.0 += loss_sum;
            window.1 += step_tokens;
            if !loss_sum.is_finite() {
                bail!(
                    "stage {} seed {seed}: the loss became {loss_sum} at step {}; lower the learning rate",
                    stage.name,
                    state.steps
                );
            }
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            if state.steps % t.log_every_steps == 0 || state.steps == total_steps {
                let mean = window.0 / window.1.max(1) as f64;
                state.first_loss.get_or_insert(mean);
                state.last_loss = Some(mean);
                window = (0.0, 0);
                let tokens_per_s = session_tokens as f64 / elapsed;
                bar.set_message(format!(
                    "loss {mean:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
                ));
                log_metrics(
                    ctx,
                    serde_json::json!({
                        "kind": "train", "stage": stage.name, "seed": seed,
                        "epoch": state.epoch + 1, "step": state.steps, "loss": mean, "lr": lr,
                        "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                        "steps_per_s": session_steps as f64 / elapsed,
                    }),
                )?;
                if !ctx.options.progress_bar {
                    eprintln!(
                        "stage {} seed {seed}: step {}/{total_steps} epoch {} loss {mean:.4} lr {lr:.2e} grad-norm {grad_norm:.3} {tokens_per_s:.0} tok/s",
                        stage.name,
                        state.steps,
                        state.epoch + 1
                    );
                }
            }
            bar.set_position(state.steps);
            if t.checkpoint_every_steps > 0
                && state.steps % t.checkpoint_every_steps == 0
                && state.step_in_epoch < steps_per_epoch
            {
                state.dropout_rng = Some(model.dropout().rng_state());
                save_checkpoint(run_dir, &params, &optimizer, &state)?;
            }
        }
        state.epoch += 1;
        state.step_in_epoch = 0;
        let last = state.epoch == stage.epochs;
        let due = t.eval_every_epochs > 0 && state.epoch % t.eval_every_epochs == 0;
        if !val.is_empty() && (due || last) {
            let v = validate(&model, ctx, encoder, val_clips, val, state.epoch)?;
            log_metrics(
                ctx,
                serde_json::json!({"kind": "validation", "stage": stage.name, "seed": seed, "validation": v}),
            )?;
            let mut line = format!(
                "stage {} seed {seed}: epoch {} validation loss {:.4} CIDEr-D {} exact {}",
                stage.name,
                state.epoch,
                v.loss,
                v.cider_d.map_or("-".into(), |c| format!("{c:.3}")),
                v.exact_match
                    .map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
            );
            if let (Some(fense), Some(fer)) = (v.fense, v.fluency_error_rate) {
                line.push_str(&format!(" FENSE {fense:.3} FER {fer:.2}"));
            }
            bar.println(&line);
            if !ctx.options.progress_bar {
                eprintln!("{line}");
            }
            let better = state
                .best
                .as_ref()
                .is_none_or(|b| v.score(t.best_metric) > b.score(t.best_metric));
            if better {
                save_model(&run_dir.join("best"), &params)?;
                state.best = Some(v.clone());
            }
            state.last_validation = Some(v);
        }
        state.dropout_rng = Some(model.dropout().rng_state());
        save_checkpoint(run_dir, &params, &optimizer, &state)?;
    }
    bar.finish_and_clear();

    // The run's result: its best validated model, else its last.
    let staged = atomic::Staging::new(&result_dir);
    let staging = staged.path();
    if state.best.is_some() && run_dir.join("best").is_dir() {
        copy_model(&run_dir.join("best"), staging)?;
    } else {
        write_model_files(staging, &params)?;
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let summary = SeedRunSummary {
        stage: stage.name.clone(),
        seed,
        steps: state.steps,
        epochs: stage.epochs,
        first_loss: state.first_loss,
        last_loss: state.last_loss,
        best: state.best.clone(),
        steps_this_session: session_steps,
        tokens_per_second: session_tokens as f64 / elapsed,
        steps_per_second: session_steps as f64 / elapsed,
        result: result_dir.clone(),
    };
    std::fs::write(
        staging.join("done.json"),
        serde_json::to_vec_pretty(&summary)?,
    )
    .with_context(|| format!("writing {}", staging.join("done.json").display()))?;
    staged
        .commit_dir()
        .with_context(|| format!("renaming to {}", result_dir.display()))?;
    Ok(RunOutcome::Done(Box::new(summary)))
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// Summed cross-entropy over the step's caption tokens (nats).
    pub loss_sum: f64,
    /// Caption tokens (terminators included) the loss is over.
    pub tokens: usize,
    /// Decoder positions run (prompt + audio + caption), padding excluded.
    pub positions: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// One optimiser step over `examples`, split into micro-batches of `batch_size`
/// (gradient accumulation): the step minimises the mean over all its caption
/// tokens, whatever the split.
pub fn train_step(
    model: &TrainableCaptioner,
    optimizer: &mut AdamW,
    examples: &[Example],
    batch_size: usize,
    max_grad_norm: f64,
    lr: f64,
) -> anyhow::Result<StepOutcome> {
    let step = step_gradients(model, optimizer.params(), examples, batch_size)?;
    let (grads, grad_norm) = step.gradients.finish(max_grad_norm)?;
    optimizer.step(&grads, lr)?;
    Ok(StepOutcome {
        loss_sum: step.loss_sum,
        tokens: step.tokens,
        positions: step.positions,
        grad_norm,
    })
}

/// The forward and backward half of a step: the loss and the gradients of `vars`.
#[derive(Debug)]
pub struct StepGradients {
    /// Summed cross-entropy over the step's caption tokens (nats).
    pub loss_sum: f64,
    /// Caption tokens (terminators included) the loss is over.
    pub tokens: usize,
    /// Decoder positions run, padding excluded.
    pub positions: usize,
    /// Gradients of the mean loss over the step's tokens, summed over micro-batches
    /// and not yet clipped; f32 whatever the frozen weights' dtype (they are the
    /// variables' dtype).
    pub gradients: GradAccumulator,
}

/// [`train_step`] without the update: forward and backward over `examples` in
/// micro-batches of `batch_size`.
pub fn step_gradients(
    model: &TrainableCaptioner,
    vars: &[(String, candle_core::Var)],
    examples: &[Example],
    batch_size: usize,
) -> anyhow::Result<StepGradients> {
    let tokens: usize = examples.iter().map(|e| e.caption.len() + 1).sum();
    let mut gradients = GradAccumulator::new(vars.len());
    let mut loss_sum = 0.0f64;
    let mut positions = 0;
    for micro in examples.chunks(batch_size) {
        let batch = model.collate(&micro.iter().collect::<Vec<_>>())?;
        let loss = model.loss_sum(&batch)?;
        loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grads = (loss / tokens as f64)?.backward()?;
        gradients.add(vars, &grads)?;
        positions += batch.positions;
    }
    Ok(StepGradients {
        loss_sum,
        tokens,
        positions,
        gradients,
    })
}

/// Validation: mean loss over every (clip, caption) pair, greedy captions of the
/// clips scored against all their references.
fn validate(
    model: &TrainableCaptioner,
    ctx: &RunContext,
    encoder: &ClipEncoder,
    clips: &[EncodedClip],
    pairs: &[(usize, Vec<u32>)],
    epoch: usize,
) -> anyhow::Result<Validation> {
    let t = &ctx.config.training;
    model.set_training(false);
    let mut loss_sum = 0.0f64;
    let mut tokens = 0usize;
    for chunk in pairs.chunks(t.batch_size) {
        let examples = chunk
            .iter()
            .map(|(i, ids)| {
                Ok(Example {
                    features: encoder.load(&clips[*i])?,
                    caption: ids.clone(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let batch = model.collate(&examples.iter().collect::<Vec<_>>())?;
        loss_sum += model
            .loss_sum(&batch)?
            .detach()
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        tokens += batch.tokens;
    }
    let limit = if t.eval_max_clips == 0 {
        clips.len()
    } else {
        t.eval_max_clips.min(clips.len())
    };
    let mut candidates = Vec::with_capacity(limit);
    let mut references = Vec::with_capacity(limit);
    for clip in &clips[..limit] {
        let caption = model.caption(&encoder.load(clip)?, t.eval_max_new_tokens)?;
        candidates.push(caption.text);
        references.push(clip.captions.clone());
    }
    model.set_training(true);
    let exact = candidates
        .iter()
        .zip(&references)
        .filter(|(c, refs)| {
            let c = normalise(c);
            refs.iter().any(|r| normalise(r) == c)
        })
        .count();
    let scores = crate::eval::score_corpus(&candidates, &references).ok();
    let fense = match &ctx.fense {
        Some(models) if limit > 0 => Some(
            models
                .score(&candidates, &references)
                .context("FENSE of the validation captions")?,
        ),
        _ => None,
    };
    Ok(Validation {
        fense: fense.as_ref().map(|f| f.fense),
        sbert_sim: fense.as_ref().map(|f| f.sbert_sim),
        fluency_error_rate: fense.as_ref().map(|f| f.fluency_error_rate),
        epoch,
        loss: loss_sum / tokens.max(1) as f64,
        cider_d: scores.as_ref().map(|s| s.cider_d),
        bleu_4: scores.as_ref().map(|s| s.bleu[3]),
        rouge_l: scores.as_ref().map(|s| s.rouge_l),
        exact_match: (limit > 0).then(|| exact as f64 / limit as f64),
        clips: limit,
    })
}

fn normalise(text: &str) -> String {
    text.trim()
        .trim_end_matches('.')
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn log_metrics(ctx: &mut RunContext, value: serde_json::Value) -> anyhow::Result<()> {
    writeln!(ctx.metrics, "{value}")?;
    ctx.metrics.flush()?;
    Ok(())
}

/// `projector.safetensors` + `adapter/` into `dir` (replaced as a whole).
fn save_model(dir: &Path, params: &TrainableParams) -> anyhow::Result<()> {
    let staging = atomic::Staging::new(dir);
    write_model_files(staging.path(), params)?;
    staging
        .commit_dir()
        .with_context(|| format!("renaming to {}", dir.display()))?;
    Ok(())
}

/// `projector.safetensors` + `adapter/` written into `dir` (created).
fn write_model_files(dir: &Path, params: &TrainableParams) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    params
        .save_projector(&dir.join("projector.safetensors"))
        .with_context(|| format!("writing {}", dir.join("projector.safetensors").display()))?;
    params
        .save_adapter(&dir.join("adapter"))
        .with_context(|| format!("writing {}", dir.join("adapter").display()))?;
    Ok(())
}

/// A checkpoint written beside the previous one and swapped in, so a kill at any
/// moment leaves one complete checkpoint (`checkpoint/`, else `checkpoint.old/`).
fn save_checkpoint(
    run_dir: &Path,
    params: &TrainableParams,
    optimizer: &AdamW,
    state: &RunState,
) -> anyhow::Result<()> {
    let current = run_dir.join("checkpoint");
    let old = run_dir.join("checkpoint.old");
    // The staging name and clean-up of `atomic`, but not its `commit_dir`: the old
    // checkpoint is kept as `checkpoint.old/` until the new one is in place, so a
    // kill between the two renames still leaves one complete checkpoint.
    let staged = atomic::Staging::new(&current);
    let staging = staged.path();
    write_model_files(staging, params)?;
    optimizer
        .save(&staging.join("optimizer.safetensors"))
        .with_context(|| format!("writing {}", staging.display()))?;
    // state.json last: a checkpoint folder without it is incomplete.
    std::fs::write(
        staging.join("state.json"),
        serde_json::to_vec_pretty(state)?,
    )?;
    let _ = std::fs::remove_dir_all(&old);
    if current.exists() {
        std::fs::rename(&current, &old)?;
    }
    staged.commit()?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn copy_model(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to.join("adapter"))?;
    std::fs::copy(
        from.join("projector.safetensors"),
        to.join("projector.safetensors"),
    )?;
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            from.join("adapter").join(name),
            to.join("adapter").join(name),
        )?;
    }
    Ok(())
}

fn replace_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    atomic::write_file(
        to,
        |staging| {
            std::fs::copy(from, staging)
                .map(|_| ())
                .with_context(|| format!("copying {}", from.display()))
        },
        anyhow::Error::from,
    )
}

fn replace_adapter(adapter: &PeftAdapter, dir: &Path) -> anyhow::Result<()> {
    let staging = atomic::Staging::new(dir);
    adapter.save(staging.path())?;
    staging.commit_dir()?;
    Ok(())
}

/// PEFT `cat` of `adapters` with equal weights, written to `out`.
fn merge_into(adapters: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let loaded = adapters
        .iter()
        .map(|d| PeftAdapter::load(d).with_context(|| format!("loading {}", d.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let weights = vec![1.0 / loaded.len() as f64; loaded.len()];
    let merged = PeftAdapter::cat(&loaded, &weights)?;
    replace_adapter(&merged, out)
}
