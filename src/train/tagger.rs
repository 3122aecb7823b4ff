//! Encoder pre-training (`audiocap pretrain encoder`): a BEATs-architecture encoder
//! trained from scratch as a multi-label sound tagger, as BEATs' fine-tuned
//! checkpoints are (a `predictor` linear layer on every patch, logits averaged over
//! the clip's patches, sigmoid per label), then written as a BEATs checkpoint
//! (`encoder.safetensors` with the released tensor names + `encoder.json`, its cfg
//! with `finetuned_model` and `predictor_class`) that the captioning trainer and
//! `audiocap export` load like the released ones.
//!
//! Clips come from a manifest with `file_name` and `labels` (`;`-separated) columns,
//! as `audiocap corpus build` writes; their fbank is computed once and kept in
//! memory (f16) for all epochs.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, AdamWSettings};
pub use super::pretrain::PretrainError as TaggerError;
use super::pretrain::{load_settings, optimizer_step, publish_dir, schedule_problems, write_json};
use super::probe::{
    TagScores, TaggingBaselines, bce_with_logits, mean_average_precision, tagging_baselines, top1,
};
use super::schedule::CosineSchedule;
use crate::audio::fbank::{Fbank, FbankConfig};
use crate::audio::frontend::FrontEnd;
use crate::audio::segment::SegmentConfig;
use crate::config::{ConfigErrors, ConfigProblem, Schema, check_section, problem};
use crate::model::beats::{Beats, BeatsConfig};
use crate::model::init::normal;
use crate::model::synthetic::{Init, beats_iter3_plus, beats_tensors};
use crate::model::weights::Weights;
use crate::rng::SplitMix64;

/// The encoder's shape and how it is trained (`--settings FILE.toml`: any of these
/// keys; the rest keep their defaults). The shape keys are BEATs' own cfg keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaggerSettings {
    /// Patch-embedding width (BEATs `embed_dim`).
    pub embed_dim: usize,
    pub encoder_layers: usize,
    pub encoder_embed_dim: usize,
    pub encoder_ffn_embed_dim: usize,
    pub encoder_attention_heads: usize,
    pub conv_pos: usize,
    pub conv_pos_groups: usize,
    pub num_buckets: usize,
    pub max_distance: usize,
    /// Longest audio per clip (longer clips are cut).
    pub max_seconds: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub peak_lr: f64,
    pub warmup_fraction: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// SpecAugment on training clips: this many frequency bands, each up to
    /// `freq_mask_bins` wide, set to the normalised mean (0).
    pub freq_masks: usize,
    pub freq_mask_bins: usize,
    /// SpecAugment: this many time spans, each up to `time_mask_fraction` of the clip.
    pub time_masks: usize,
    pub time_mask_fraction: f64,
    /// Share of training clips mixed with another clip of their batch (fbank
    /// mixup with soft targets, as AST and BEATs fine-tuning do); 0 = off.
    pub mixup: f64,
}

impl Default for TaggerSettings {
    fn default() -> Self {
        Self {
            embed_dim: 128,
            encoder_layers: 3,
            encoder_embed_dim: 192,
            encoder_ffn_embed_dim: 384,
            encoder_attention_heads: 4,
            conv_pos: 32,
            conv_pos_groups: 4,
            num_buckets: 64,
            max_distance: 256,
            max_seconds: 10.0,
            epochs: 10,
            batch_size: 16,
            peak_lr: 5e-4,
            warmup_fraction: 0.05,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            seed: 1,
            freq_masks: 2,
            freq_mask_bins: 16,
            time_masks: 2,
            time_mask_fraction: 0.1,
            mixup: 0.5,
        }
    }
}

impl TaggerSettings {
    /// The BEATs cfg of the encoder: the iter3+ switches (deep norm, gated relative
    /// position bias, no conv bias) at this size.
    pub fn beats_config(&self, labels: usize) -> BeatsConfig {
        BeatsConfig {
            embed_dim: self.embed_dim,
            encoder_layers: self.encoder_layers,
            encoder_embed_dim: self.encoder_embed_dim,
            encoder_ffn_embed_dim: self.encoder_ffn_embed_dim,
            encoder_attention_heads: self.encoder_attention_heads,
            conv_pos: self.conv_pos,
            conv_pos_groups: self.conv_pos_groups,
            num_buckets: self.num_buckets,
            max_distance: self.max_distance,
            finetuned_model: true,
            predictor_class: labels,
            ..beats_iter3_plus()
        }
    }

    /// Settings from an optional file and `--set key=value` overrides, checked.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigErrors> {
        load_settings(
            path,
            overrides,
            &Schema {
                check_keys: |t| check_section::<TaggerSettings>("", t),
                validate: TaggerSettings::validate,
                flat: true,
            },
        )
    }

    /// Every problem with the settings, at once.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut p = Vec::new();
        if let Err(e) = self.beats_config(1).validate() {
            p.push(problem("", e));
        }
        if !(self.max_seconds >= 0.2 && self.max_seconds.is_finite()) {
            p.push(problem(
                "max_seconds",
                format!("{} must be at least 0.2", self.max_seconds),
            ));
        }
        if self.freq_mask_bins > 64 {
            p.push(problem(
                "freq_mask_bins",
                format!(
                    "{} must be at most 64 of the 128 mel bins",
                    self.freq_mask_bins
                ),
            ));
        }
        if !(0.0..=0.5).contains(&self.time_mask_fraction) {
            p.push(problem(
                "time_mask_fraction",
                format!("{} must be within 0..=0.5", self.time_mask_fraction),
            ));
        }
        if !(0.0..=1.0).contains(&self.mixup) {
            p.push(problem(
                "mixup",
                format!("{} must be within 0..=1", self.mixup),
            ));
        }
        schedule_problems(
            self.epochs,
            self.batch_size,
            self.peak_lr,
            self.warmup_fraction,
            &mut p,
        );
        if p.is_empty() { Ok(()) } else { Err(p) }
    }
}

/// A clip's normalised fbank [frames, bins] (f16, CPU) and its label indices.
#[derive(Debug, Clone)]
pub struct TaggedClip {
    pub key: String,
    pub fbank: Tensor,
    pub labels: Vec<usize>,
}

/// A tagging set: the clips that decoded, those that did not (and why).
#[derive(Debug, Clone)]
pub struct TaggingSet {
    pub clips: Vec<TaggedClip>,
    pub skipped: Vec<(String, String)>,
}

/// Reads a manifest (`file_name`, `labels` columns; CSV or Parquet) and computes
/// each clip's fbank; labels are mapped through `vocabulary` (labels outside it are
/// dropped, clips left with none are skipped).
pub fn load_tagging_set(
    manifest: &Path,
    audio_dir: &Path,
    vocabulary: &[String],
    max_seconds: f64,
) -> Result<TaggingSet, TaggerError> {
    let rows = read_label_rows(manifest)?;
    let index: HashMap<&str, usize> = vocabulary
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let config = FbankConfig::default();
    let fbank = Fbank::new(config.clone()).map_err(|e| TaggerError::Model(e.to_string()))?;
    let mut front_end = FrontEnd::new(config.sample_rate, SegmentConfig::default())
        .map_err(|e| TaggerError::Model(e.to_string()))?;
    let max_samples = (max_seconds * config.sample_rate as f64) as usize;
    let mut clips = Vec::new();
    let mut skipped = Vec::new();
    for (file, labels) in rows {
        let ids: Vec<usize> = labels
            .iter()
            .filter_map(|l| index.get(l.as_str()).copied())
            .collect();
        if ids.is_empty() {
            skipped.push((file, "no label in the vocabulary".to_string()));
            continue;
        }
        let path = audio_dir.join(&file);
        let decoded = std::fs::File::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                front_end
                    .decode_to_rate(
                        std::io::BufReader::new(f),
                        path.extension().and_then(|e| e.to_str()),
                    )
                    .map_err(|e| e.to_string())
            });
        let mut samples = match decoded {
            Ok(d) => d.samples,
            Err(why) => {
                skipped.push((file, why));
                continue;
            }
        };
        samples.truncate(max_samples);
        let frames = fbank.compute(&samples);
        if frames.num_frames < 16 {
            skipped.push((
                file,
                format!("too short ({} fbank frames)", frames.num_frames),
            ));
            continue;
        }
        let t = Tensor::from_vec(
            frames.data,
            (frames.num_frames, frames.num_bins),
            &Device::Cpu,
        )?
        .to_dtype(DType::F16)?;
        clips.push(TaggedClip {
            key: file,
            fbank: t,
            labels: ids,
        });
    }
    Ok(TaggingSet { clips, skipped })
}

/// `(file_name, labels)` of every row of a manifest.
fn read_label_rows(manifest: &Path) -> Result<Vec<(String, Vec<String>)>, TaggerError> {
    let data_err = |why: String| TaggerError::Data {
        path: manifest.to_path_buf(),
        why,
    };
    let table = crate::eval::files::read_table(manifest).map_err(|e| data_err(e.to_string()))?;
    let (Some(file), Some(labels)) = (table.column("file_name"), table.column("labels")) else {
        return Err(data_err(format!(
            "needs `file_name` and `labels` columns (found {})",
            table.columns.join(", ")
        )));
    };
    Ok(table
        .rows
        .iter()
        .filter_map(|row| {
            let f = row[file].as_deref()?.trim().to_string();
            let l = crate::eval::files::split_labels(row[labels].as_deref().unwrap_or(""));
            (!f.is_empty()).then_some((f, l))
        })
        .collect())
}

/// The sorted label vocabulary of a manifest (labels on at least `min_clips` rows).
pub fn label_vocabulary(manifest: &Path, min_clips: usize) -> Result<Vec<String>, TaggerError> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (_, labels) in read_label_rows(manifest)? {
        for l in labels.into_iter().collect::<BTreeSet<_>>() {
            *counts.entry(l).or_insert(0) += 1;
        }
    }
    let mut v: Vec<String> = counts
        .into_iter()
        .filter(|(_, n)| *n >= min_clips)
        .map(|(l, _)| l)
        .collect();
    v.sort();
    Ok(v)
}

/// The tagger as trained: variables by their BEATs names, rebuilt into a model each
/// step (the weight-normed positional convolution is derived from its variables).
struct TrainableTagger {
    cfg: BeatsConfig,
    params: Vec<(String, Var)>,
    device: Device,
}

impl TrainableTagger {
    fn new(cfg: BeatsConfig, seed: u64, device: &Device) -> Result<Self, TaggerError> {
        let mut rng = SplitMix64::new(seed);
        let mut params = Vec::new();
        let specs = beats_tensors(&cfg).map_err(|e| TaggerError::Model(e.to_string()))?;
        for t in specs {
            let value = match t.init {
                Init::Weight => normal(&t.shape, 0.02, &mut rng, device)?,
                Init::NearOne => Tensor::ones(t.shape.as_slice(), DType::F32, device)?,
            };
            params.push((t.name, Var::from_tensor(&value)?));
        }
        let d = cfg.encoder_embed_dim;
        params.push((
            "predictor.weight".into(),
            Var::from_tensor(&normal(&[cfg.predictor_class, d], 0.02, &mut rng, device)?)?,
        ));
        params.push((
            "predictor.bias".into(),
            Var::from_tensor(&Tensor::zeros(cfg.predictor_class, DType::F32, device)?)?,
        ));
        Ok(Self {
            cfg,
            params,
            device: device.clone(),
        })
    }

    /// Sets the predictor's bias to each label's training log-odds, so the first
    /// steps go to telling clips apart rather than to learning that most labels are
    /// absent (a zero bias starts every label at p = 0.5).
    fn start_at_the_prior(&self, train: &TaggingSet, labels: usize) -> Result<(), TaggerError> {
        let mut counts = vec![0usize; labels];
        for c in &train.clips {
            for &l in &c.labels {
                if l < labels {
                    counts[l] += 1;
                }
            }
        }
        let n = train.clips.len().max(1) as f64;
        let bias: Vec<f32> = counts
            .iter()
            .map(|&c| {
                let p = (c as f64 / n).clamp(1e-4, 1.0 - 1e-4);
                (p / (1.0 - p)).ln() as f32
            })
            .collect();
        let var = self
            .params
            .iter()
            .find(|(n, _)| n == "predictor.bias")
            .map(|(_, v)| v)
            .ok_or_else(|| TaggerError::Model("the tagger has no predictor.bias".into()))?;
        var.set(&Tensor::from_vec(bias, labels, &self.device)?)?;
        Ok(())
    }

    fn tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Clip logits [B, C] of padded fbank [B, T, bins]: the mean over each clip's
    /// valid patches of the per-patch predictor logits, as BEATs' fine-tuned model.
    /// `training`: computed so that gradients reach every variable (the encoder's
    /// differentiable kernels); otherwise with the fused inference kernels.
    fn logits(
        &self,
        fbank: &Tensor,
        lengths: &[usize],
        training: bool,
    ) -> Result<Tensor, TaggerError> {
        let tensors = self.tensors();
        let weights = Weights::from_tensors(
            "encoder (training)",
            tensors.clone(),
            DType::F32,
            &self.device,
        );
        let beats = Beats::from_weights(self.cfg.clone(), &weights)
            .map_err(|e| TaggerError::Model(e.to_string()))?;
        let beats = if training {
            beats.differentiable()
        } else {
            beats
        };
        let out = beats.extract_features_for_lengths(fbank, lengths)?;
        let w = &tensors["predictor.weight"];
        let b = &tensors["predictor.bias"];
        let per_patch = out.features.broadcast_matmul(&w.t()?)?.broadcast_add(b)?; // [B, P, C]
        let mask = out
            .padding_mask
            .ok_or_else(|| TaggerError::Model("the encoder gave no padding mask".into()))?;
        let valid = (1.0 - mask.to_dtype(DType::F32)?)?; // [B, P]
        let summed = per_patch
            .broadcast_mul(&valid.unsqueeze(D::Minus1)?)?
            .sum(1)?;
        let counts = valid.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?;
        Ok(summed.broadcast_div(&counts)?)
    }
}

/// A batch as padded fbank [B, T, bins] (zeros past each clip's length), the
/// lengths, and the targets [B, labels]; with `augment`, training augmentation too.
fn batch_tensors(
    clips: &[&TaggedClip],
    labels: usize,
    device: &Device,
    augment: Option<(&TaggerSettings, &mut SplitMix64)>,
) -> Result<(Tensor, Vec<usize>, Tensor), TaggerError> {
    let mut lengths = Vec::with_capacity(clips.len());
    let mut rows: Vec<Vec<f32>> = Vec::with_capacity(clips.len());
    let mut bins = 128;
    let mut targets = vec![0f32; clips.len() * labels];
    for (i, c) in clips.iter().enumerate() {
        let (t, b) = c.fbank.dims2()?;
        bins = b;
        lengths.push(t);
        rows.push(c.fbank.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?);
        for &l in &c.labels {
            targets[i * labels + l] = 1.0;
        }
    }
    if let Some((settings, rng)) = augment {
        augment_batch(
            settings,
            rng,
            bins,
            labels,
            &mut rows,
            &mut lengths,
            &mut targets,
        );
    }
    let longest = lengths.iter().copied().max().unwrap_or(16);
    let mut padded = vec![0f32; clips.len() * longest * bins];
    for (i, row) in rows.iter().enumerate() {
        padded[i * longest * bins..][..row.len()].copy_from_slice(row);
    }
    let fbank = Tensor::from_vec(padded, (clips.len(), longest, bins), device)?;
    let targets = Tensor::from_vec(targets, (clips.len(), labels), device)?;
    Ok((fbank, lengths, targets))
}

/// Training augmentation against over-fitting a small corpus: mixup (a clip mixed
/// with another of its batch, weight 0.25..0.75 so both stay audible, targets mixed
/// alike) then SpecAugment (frequency bands and time spans set to 0, the normalised
/// mean). `rows` are row-major [length, bins] fbanks.
fn augment_batch(
    settings: &TaggerSettings,
    rng: &mut SplitMix64,
    bins: usize,
    labels: usize,
    rows: &mut [Vec<f32>],
    lengths: &mut [usize],
    targets: &mut [f32],
) {
    let n = rows.len();
    if n > 1 && settings.mixup > 0.0 {
        let (clean, clean_lengths, clean_targets) =
            (rows.to_vec(), lengths.to_vec(), targets.to_vec());
        for i in 0..n {
            if rng.next_f64() >= settings.mixup {
                continue;
            }
            let j = (i + 1 + rng.below(n - 1)) % n;
            let lambda = 0.25 + 0.5 * rng.next_f64() as f32;
            let len = clean_lengths[i].max(clean_lengths[j]);
            let mut mixed = vec![0f32; len * bins];
            for (m, v) in mixed.iter_mut().zip(&clean[i]) {
                *m += lambda * v;
            }
            for (m, v) in mixed.iter_mut().zip(&clean[j]) {
                *m += (1.0 - lambda) * v;
            }
            rows[i] = mixed;
            lengths[i] = len;
            for l in 0..labels {
                targets[i * labels + l] = lambda * clean_targets[i * labels + l]
                    + (1.0 - lambda) * clean_targets[j * labels + l];
            }
        }
    }
    for (row, &len) in rows.iter_mut().zip(lengths.iter()) {
        for _ in 0..settings.freq_masks {
            let width = rng.below(settings.freq_mask_bins.min(bins) + 1);
            let start = rng.below(bins - width + 1);
            for frame in row.chunks_mut(bins) {
                frame[start..start + width].fill(0.0);
            }
        }
        let longest_span = (len as f64 * settings.time_mask_fraction) as usize;
        for _ in 0..settings.time_masks {
            let width = rng.below(longest_span + 1);
            let start = rng.below(len - width + 1);
            row[start * bins..(start + width) * bins].fill(0.0);
        }
    }
}

/// What a tagger run did (`pretrain.json` beside the checkpoint).
#[derive(Debug, Clone, Serialize)]
pub struct TaggerSummary {
    pub settings: TaggerSettings,
    pub labels: Vec<String>,
    pub parameters: u64,
    pub train_clips: usize,
    pub validation_clips: usize,
    pub skipped: Vec<(String, String)>,
    pub steps: u64,
    /// The epoch whose weights were written: the best validation mAP (the last
    /// epoch without validation clips).
    pub best_epoch: usize,
    /// Mean BCE per epoch over the training batches.
    pub train_loss: Vec<f64>,
    /// After each epoch: share of validation clips whose top-scoring label is one of
    /// theirs (chance: about the mean label count over the vocabulary size).
    pub validation_top1: Vec<f64>,
    /// After each epoch: validation mAP over the labels present (chance: about the
    /// labels' frequency).
    pub validation_map: Vec<f64>,
    pub clips_per_second: f64,
    pub checkpoint: PathBuf,
    /// The written epoch's validation scores (none without validation clips).
    pub best_validation: Option<TagScores>,
    /// The label prior and the fbank-statistics probe on the same validation clips
    /// (none without validation clips).
    pub baselines: Option<TaggingBaselines>,
}

/// Trains the tagger on `train` (scored on `validation` after every epoch) and
/// writes `out/encoder.safetensors`, `out/encoder.json`, `out/labels.json` and
/// `out/pretrain.json`.
pub fn pretrain_encoder(
    train: &TaggingSet,
    validation: &TaggingSet,
    labels: &[String],
    settings: &TaggerSettings,
    out: &Path,
    device: &Device,
) -> Result<TaggerSummary, TaggerError> {
    if let Err(problems) = settings.validate() {
        return Err(TaggerError::Settings(
            problems.iter().map(ToString::to_string).collect(),
        ));
    }
    if train.clips.is_empty() || labels.is_empty() {
        return Err(TaggerError::Settings(vec![
            "no training clips or labels".into(),
        ]));
    }
    let baselines = if validation.clips.is_empty() {
        None
    } else {
        Some(tagging_baselines(
            &train
                .clips
                .iter()
                .map(|c| (&c.fbank, c.labels.as_slice()))
                .collect::<Vec<_>>(),
            &validation
                .clips
                .iter()
                .map(|c| (&c.fbank, c.labels.as_slice()))
                .collect::<Vec<_>>(),
            labels.len(),
        )?)
    };
    if let Some(b) = &baselines {
        tracing::info!(
            label_prior_map = b.label_prior.map,
            probe_map = b.fbank_probe.map,
            probe_top1 = b.fbank_probe.top1,
            "encoder pre-training: baselines"
        );
    }
    let cfg = settings.beats_config(labels.len());
    let model = TrainableTagger::new(cfg.clone(), settings.seed, device)?;
    model.start_at_the_prior(train, labels.len())?;
    let mut optimizer = AdamW::new(
        model.params.clone(),
        AdamWSettings {
            weight_decay: settings.weight_decay,
            ..AdamWSettings::default()
        },
    )?;
    // Clips of similar length share a batch (less padding), batches in random order.
    let mut by_length: Vec<usize> = (0..train.clips.len()).collect();
    by_length.sort_by_key(|&i| train.clips[i].fbank.dim(0).unwrap_or(0));
    let batches: Vec<Vec<usize>> = by_length
        .chunks(settings.batch_size)
        .map(<[usize]>::to_vec)
        .collect();
    let total = (batches.len() * settings.epochs) as u64;
    let schedule = CosineSchedule::new(settings.peak_lr, settings.warmup_fraction, total);
    let mut rng = SplitMix64::new(settings.seed ^ 0x7A66);
    let mut augment_rng = SplitMix64::derive(settings.seed, 0xA06);
    let mut order: Vec<usize> = (0..batches.len()).collect();
    let mut train_loss = Vec::new();
    let mut validation_top1 = Vec::new();
    let mut validation_map = Vec::new();
    // The epoch with the best validation mAP is the one written (the last without
    // validation): a small corpus over-fits long before the schedule ends.
    let mut best: Option<(usize, f64, HashMap<String, Tensor>)> = None;
    let mut seen = 0usize;
    let started = Instant::now();
    for epoch in 0..settings.epochs {
        rng.shuffle(&mut order);
        let (mut sum, mut count) = (0.0f64, 0usize);
        for &b in &order {
            let clips: Vec<&TaggedClip> = batches[b].iter().map(|&i| &train.clips[i]).collect();
            let (fbank, lengths, targets) = batch_tensors(
                &clips,
                labels.len(),
                device,
                Some((settings, &mut augment_rng)),
            )?;
            let logits = model.logits(&fbank, &lengths, true)?;
            let lr = schedule.lr(optimizer.steps());
            let loss = optimizer_step(
                &mut optimizer,
                &model.params,
                &bce_with_logits(&logits, &targets)?,
                settings.max_grad_norm,
                lr,
            )?;
            sum += loss * clips.len() as f64;
            count += clips.len();
            seen += clips.len();
            if optimizer.steps().is_multiple_of(50) {
                tracing::info!(
                    step = optimizer.steps(),
                    of = total,
                    loss = sum / count as f64,
                    lr,
                    "encoder pre-training"
                );
            }
        }
        train_loss.push(sum / count.max(1) as f64);
        if !validation.clips.is_empty() {
            let (top1, map) = validate(
                &model,
                validation,
                labels.len(),
                settings.batch_size,
                device,
            )?;
            validation_top1.push(top1);
            validation_map.push(map);
            if best.as_ref().is_none_or(|(_, b, _)| map > *b) {
                best = Some((epoch + 1, map, detached(&model.params)?));
            }
        }
        tracing::info!(
            epoch = epoch + 1,
            train_loss = train_loss.last().copied().unwrap_or(f64::NAN),
            validation_top1 = validation_top1.last().copied().unwrap_or(f64::NAN),
            validation_map = validation_map.last().copied().unwrap_or(f64::NAN),
            "encoder pre-training"
        );
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let (best_epoch, tensors) = match best {
        Some((epoch, _, tensors)) => (epoch, tensors),
        None => (settings.epochs, detached(&model.params)?),
    };
    let best_validation = (!validation_map.is_empty()).then(|| TagScores {
        map: validation_map[best_epoch - 1],
        top1: validation_top1[best_epoch - 1],
    });

    let summary = TaggerSummary {
        settings: settings.clone(),
        labels: labels.to_vec(),
        parameters: model
            .params
            .iter()
            .map(|(_, v)| v.elem_count() as u64)
            .sum(),
        train_clips: train.clips.len(),
        validation_clips: validation.clips.len(),
        skipped: train
            .skipped
            .iter()
            .chain(&validation.skipped)
            .cloned()
            .collect(),
        steps: optimizer.steps(),
        best_epoch,
        train_loss,
        validation_top1,
        validation_map,
        clips_per_second: seen as f64 / elapsed,
        checkpoint: out.join("encoder.safetensors"),
        best_validation,
        baselines,
    };
    publish_dir(out, |dir| {
        candle_core::safetensors::save(&tensors, dir.join("encoder.safetensors"))?;
        write_json(dir, "encoder.json", &cfg)?;
        write_json(dir, "labels.json", &labels)?;
        write_json(dir, "pretrain.json", &summary)
    })?;
    Ok(summary)
}

/// A copy of the variables' current values (the optimiser goes on updating them).
fn detached(params: &[(String, Var)]) -> candle_core::Result<HashMap<String, Tensor>> {
    params
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?.detach())))
        .collect()
}

/// Validation scores of the tagger: top-1 (share of clips whose highest-scoring
/// label is one of theirs) and mAP (mean over the labels present of the average
/// precision of ranking the clips by that label's score).
fn validate(
    model: &TrainableTagger,
    set: &TaggingSet,
    labels: usize,
    batch_size: usize,
    device: &Device,
) -> Result<(f64, f64), TaggerError> {
    let mut scores: Vec<Vec<f32>> = Vec::with_capacity(set.clips.len());
    for chunk in set.clips.chunks(batch_size) {
        let clips: Vec<&TaggedClip> = chunk.iter().collect();
        let (fbank, lengths, _) = batch_tensors(&clips, labels, device, None)?;
        scores.extend(
            model
                .logits(&fbank, &lengths, false)?
                .detach()
                .to_vec2::<f32>()?,
        );
    }
    let truth: Vec<&[usize]> = set.clips.iter().map(|c| c.labels.as_slice()).collect();
    Ok((
        top1(&scores, &truth),
        mean_average_precision(&scores, &truth, labels),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_settings() -> TaggerSettings {
        TaggerSettings {
            embed_dim: 16,
            encoder_layers: 2,
            encoder_embed_dim: 32,
            encoder_ffn_embed_dim: 64,
            encoder_attention_heads: 2,
            conv_pos: 8,
            conv_pos_groups: 2,
            num_buckets: 16,
            max_distance: 64,
            ..TaggerSettings::default()
        }
    }

    fn noise_clip(frames: usize, seed: u64, labels: Vec<usize>) -> TaggedClip {
        let mut rng = SplitMix64::new(seed);
        let data: Vec<f32> = (0..frames * 128)
            .map(|_| rng.next_f64() as f32 - 0.5)
            .collect();
        TaggedClip {
            key: format!("{seed}"),
            fbank: Tensor::from_vec(data, (frames, 128), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap(),
            labels,
        }
    }

    /// The defect behind the first bundled encoder: candle's fused LayerNorm and
    /// softmax kernels have no backward pass, so with them only the predictor head
    /// learned and the encoder stayed at its random initialisation. Every variable
    /// must get a gradient, and a nonzero one.
    #[test]
    fn every_tagger_variable_gets_a_gradient() {
        let cfg = tiny_settings().beats_config(3);
        let model = TrainableTagger::new(cfg, 5, &Device::Cpu).unwrap();
        let a = noise_clip(48, 1, vec![0]);
        let b = noise_clip(32, 2, vec![2]);
        let (fbank, lengths, targets) = batch_tensors(&[&a, &b], 3, &Device::Cpu, None).unwrap();
        let logits = model.logits(&fbank, &lengths, true).unwrap();
        let grads = bce_with_logits(&logits, &targets)
            .unwrap()
            .backward()
            .unwrap();
        let mut missing = Vec::new();
        for (name, var) in &model.params {
            // BEATs reads the relative position table of layer 0 only; the state dict
            // holds one per layer, as the released checkpoints do.
            if name.ends_with("relative_attention_bias.weight")
                && !name.starts_with("encoder.layers.0.")
            {
                continue;
            }
            let norm = grads.get(var.as_tensor()).map(|g| {
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            });
            if !norm.is_some_and(|n| n > 0.0) {
                missing.push(format!("{name}: {norm:?}"));
            }
        }
        assert!(missing.is_empty(), "no gradient reached {missing:?}");
    }

    /// A clip's logits do not depend on what it is batched with: the pooling leaves
    /// out padded patches, in training and in validation.
    #[test]
    fn padding_does_not_change_a_clips_logits() {
        let cfg = tiny_settings().beats_config(3);
        let model = TrainableTagger::new(cfg, 6, &Device::Cpu).unwrap();
        let short = noise_clip(40, 3, vec![1]);
        let long = noise_clip(96, 4, vec![0]);
        for training in [true, false] {
            let (alone, lengths, _) = batch_tensors(&[&short], 3, &Device::Cpu, None).unwrap();
            let alone = model.logits(&alone, &lengths, training).unwrap();
            let (both, lengths, _) =
                batch_tensors(&[&short, &long], 3, &Device::Cpu, None).unwrap();
            let both = model.logits(&both, &lengths, training).unwrap();
            let alone = alone.to_vec2::<f32>().unwrap();
            let both = both.to_vec2::<f32>().unwrap();
            for (x, y) in alone[0].iter().zip(&both[0]) {
                assert!((x - y).abs() < 1e-4, "{training}: {alone:?} vs {both:?}");
            }
        }
    }

    /// Two classes the encoder can tell apart (a low tone, noise bursts): a tiny
    /// tagger learns them, and the checkpoint loads as a BEATs encoder.
    #[test]
    fn a_tiny_tagger_separates_two_sounds_and_its_checkpoint_loads() {
        let config = FbankConfig::default();
        let fbank = Fbank::new(config).unwrap();
        let mut clips = Vec::new();
        for i in 0..16 {
            let tone = i % 2 == 0;
            let mut state = 12345u64 + i as u64;
            let samples: Vec<f32> = (0..16_000)
                .map(|n| {
                    if tone {
                        0.3 * (n as f32 * 0.05 * (1.0 + 0.05 * i as f32)).sin()
                    } else {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        0.3 * ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                    }
                })
                .collect();
            let f = fbank.compute(&samples);
            clips.push(TaggedClip {
                key: format!("{i}"),
                fbank: Tensor::from_vec(f.data, (f.num_frames, f.num_bins), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F16)
                    .unwrap(),
                labels: vec![usize::from(!tone)],
            });
        }
        let validation = TaggingSet {
            clips: clips.split_off(12),
            skipped: vec![],
        };
        let train = TaggingSet {
            clips,
            skipped: vec![],
        };
        let settings = TaggerSettings {
            encoder_layers: 1,
            epochs: 25,
            batch_size: 4,
            peak_lr: 3e-3,
            // Soft mixup targets would put a floor under the loss this test bounds.
            mixup: 0.0,
            ..tiny_settings()
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("encoder");
        let labels = vec!["tone".to_string(), "noise".to_string()];
        let summary =
            pretrain_encoder(&train, &validation, &labels, &settings, &out, &Device::Cpu).unwrap();
        assert!(
            summary.train_loss.last().unwrap() < &(summary.train_loss[0] / 3.0),
            "{:?}",
            summary.train_loss
        );
        assert_eq!(*summary.validation_top1.last().unwrap(), 1.0, "{summary:?}");
        assert_eq!(*summary.validation_map.last().unwrap(), 1.0, "{summary:?}");
        // The written epoch is the first with the best validation mAP.
        let best = summary
            .validation_map
            .iter()
            .position(|&m| m == 1.0)
            .unwrap();
        assert_eq!(summary.best_epoch, best + 1, "{summary:?}");
        assert_eq!(
            summary.best_validation,
            Some(TagScores {
                map: 1.0,
                top1: 1.0
            })
        );
        // Tone against noise: the fbank statistics tell them apart too.
        let baselines = summary.baselines.as_ref().unwrap();
        assert_eq!(baselines.validation_clips, 4);
        assert_eq!(baselines.label_prior.map, 0.5, "{baselines:?}");
        assert_eq!(baselines.fbank_probe.map, 1.0, "{baselines:?}");
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("pretrain.json")).unwrap())
                .unwrap();
        assert_eq!(written["best_validation"]["map"], 1.0);
        assert_eq!(written["baselines"]["fbank_probe"]["map"], 1.0);
        let beats =
            Beats::load(&out.join("encoder.safetensors"), DType::F32, &Device::Cpu).unwrap();
        assert!(beats.config().finetuned_model);
        assert_eq!(beats.config().predictor_class, 2);
    }

    #[test]
    fn augmentation_mixes_pairs_and_masks_bands_and_spans() {
        let bins = 8;
        let mut rows = vec![vec![1.0f32; 10 * bins], vec![3.0f32; 6 * bins]];
        let mut lengths = vec![10, 6];
        let mut targets = vec![1.0, 0.0, 0.0, 1.0];
        let off = TaggerSettings {
            freq_masks: 0,
            time_masks: 0,
            mixup: 0.0,
            ..TaggerSettings::default()
        };
        let before = rows.clone();
        let mut rng = SplitMix64::new(7);
        augment_batch(
            &off,
            &mut rng,
            bins,
            2,
            &mut rows,
            &mut lengths,
            &mut targets,
        );
        assert_eq!(rows, before, "everything off leaves the batch alone");

        // Mixup only: both clips mixed with the other, to the longer length, with the
        // same weight on features and targets.
        let mix = TaggerSettings {
            mixup: 1.0,
            ..off.clone()
        };
        augment_batch(
            &mix,
            &mut rng,
            bins,
            2,
            &mut rows,
            &mut lengths,
            &mut targets,
        );
        assert_eq!(lengths, vec![10, 10]);
        for (i, row) in rows.iter().enumerate() {
            let lambda = targets[i * 2 + i];
            assert!((0.25..=0.75).contains(&lambda), "{targets:?}");
            assert!((targets[i * 2] + targets[i * 2 + 1] - 1.0).abs() < 1e-6);
            let own = if i == 0 { 1.0 } else { 3.0 };
            let other = 4.0 - own;
            // Frame 0 has both clips; frame 8 only clip 0 (clip 1 is 6 frames long).
            assert!((row[0] - (lambda * own + (1.0 - lambda) * other)).abs() < 1e-5);
            let tail = if i == 0 {
                lambda * own
            } else {
                (1.0 - lambda) * other
            };
            assert!((row[8 * bins] - tail).abs() < 1e-5);
        }

        // Masks only: whole bands and whole frames are zeroed, never more than asked.
        let mask = TaggerSettings {
            freq_masks: 1,
            freq_mask_bins: 3,
            time_masks: 1,
            time_mask_fraction: 0.5,
            ..off
        };
        let mut rows = vec![vec![1.0f32; 20 * bins]; 8];
        let mut lengths = vec![20; 8];
        let mut targets = vec![1.0; 8];
        augment_batch(
            &mask,
            &mut rng,
            bins,
            1,
            &mut rows,
            &mut lengths,
            &mut targets,
        );
        let mut masked_any = false;
        for row in &rows {
            let zero_bins = (0..bins)
                .filter(|&b| row.chunks(bins).all(|f| f[b] == 0.0))
                .count();
            let zero_frames = row
                .chunks(bins)
                .filter(|f| f.iter().all(|&v| v == 0.0))
                .count();
            let zeros = row.iter().filter(|&&v| v == 0.0).count();
            assert!(
                zero_bins <= 3 && zero_frames <= 10,
                "{zero_bins} {zero_frames}"
            );
            // Every zero lies in a zeroed band or a zeroed frame.
            assert_eq!(
                zeros,
                zero_bins * 20 + zero_frames * bins - zero_bins * zero_frames
            );
            masked_any |= zeros > 0;
        }
        assert!(masked_any);
        assert_eq!(targets, vec![1.0; 8], "masks leave targets alone");
    }
}
