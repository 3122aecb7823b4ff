//! Decoder pre-training (`audiocap pretrain decoder`): a small Llama-architecture
//! decoder trained from scratch as a language model on caption text, with its own
//! byte-level BPE tokenizer ([`super::tokenizer`]), then written as a Hugging Face
//! Llama directory (`config.json`, `generation_config.json`, `model.safetensors`,
//! `tokenizer.json`) that the captioning trainer, `audiocap export` and Python
//! `transformers` all read.
//!
//! Each example is the captioner's own prompt, then the caption and `<|eot_id|>`:
//! the decoder learns the caption language in the very context it will caption in,
//! and the loss covers the caption tokens and the terminator only. The prompt's
//! `<|audio|>` slot is left out ([`AudioSlot::None`]) or filled with a hint of what
//! the clip holds ([`AudioSlot::Labels`]: the mean embedding of its label words), so
//! that the decoder learns to read that position as an instruction-tuned LLM reads
//! its prompt; the captioner's projector then maps audio into what the decoder
//! already reads there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::optim::{AdamW, AdamWSettings};
pub use super::pretrain::PretrainError as LmError;
use super::pretrain::{load_settings, optimizer_step, publish_dir, schedule_problems, write_json};
use super::schedule::CosineSchedule;
use crate::config::{ConfigErrors, ConfigProblem, Schema, check_section, problem};
use crate::model::init::normal;
use crate::model::llama::Llama;
use crate::model::lora::Adaptation;
use crate::model::prompt::{DEFAULT_PROMPT_TEMPLATE, PromptIds, PromptTemplate};
use crate::model::synthetic::{Init, LlamaSpec, SourceDtype};
use crate::model::weights::Weights;
use crate::rng::SplitMix64;

/// The decoder's shape and how it is trained (`audiocap pretrain decoder --settings
/// FILE.toml`: any of these keys; the rest keep their defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmSettings {
    /// Tokenizer size: 256 byte symbols + merges + 5 special tokens.
    pub vocab_size: usize,
    /// Merges seen fewer times than this are not learnt.
    pub min_frequency: u64,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Longest sequence (prompt + caption) the model is configured for.
    pub max_position_embeddings: usize,
    /// Caption tokens kept per example.
    pub max_caption_tokens: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub peak_lr: f64,
    pub warmup_fraction: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// The captioner's prompt (with its `<|audio|>` placeholder).
    pub prompt_template: String,
    /// What fills the `<|audio|>` slot during pre-training.
    pub audio_slot: AudioSlot,
    /// With `audio_slot = "labels"`: share of examples whose slot is a zero vector
    /// instead, so the decoder also captions without a usable hint.
    pub audio_slot_dropout: f64,
}

/// What the decoder sees at the prompt's `<|audio|>` position while pre-training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioSlot {
    /// No slot: the prompt without its placeholder (a caption language model whose
    /// prompt never varies, so nothing teaches it to read the prompt).
    #[default]
    None,
    /// One embedding at the slot: the mean of the token embeddings of the clip's
    /// labels (`dog, barking`), learnt with the rest. Needs a `labels` column.
    Labels,
}

/// One training text: a caption, and the labels of its clip (for
/// [`AudioSlot::Labels`]; may be empty).
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionText {
    pub caption: String,
    pub labels: Vec<String>,
}

impl CaptionText {
    /// A caption with no labels.
    pub fn plain(caption: impl Into<String>) -> Self {
        Self {
            caption: caption.into(),
            labels: Vec::new(),
        }
    }
}

/// The training texts of a caption table (Clotho, AudioCaps or a generic layout, read
/// as `audiocap eval` reads references): every caption of every clip, with the clip's
/// `labels` column (`;`-separated) when `with_labels`.
pub fn read_caption_texts(path: &Path, with_labels: bool) -> anyhow::Result<Vec<CaptionText>> {
    use anyhow::Context;
    let refs = crate::eval::files::read_references(path, None)
        .with_context(|| format!("reading captions from {}", path.display()))?;
    let labels = if with_labels {
        crate::eval::files::read_labels(path, "labels")
            .with_context(|| format!("reading labels from {}", path.display()))?
    } else {
        Default::default()
    };
    Ok(refs
        .clips
        .into_iter()
        .flat_map(|c| {
            let l = labels.get(&c.key).cloned().unwrap_or_default();
            c.captions.into_iter().map(move |caption| CaptionText {
                caption,
                labels: l.clone(),
            })
        })
        .collect())
}

impl Default for LmSettings {
    fn default() -> Self {
        Self {
            vocab_size: 2048,
            min_frequency: 2,
            hidden_size: 256,
            intermediate_size: 704,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 256,
            max_caption_tokens: 48,
            epochs: 10,
            batch_size: 32,
            peak_lr: 1e-3,
            warmup_fraction: 0.05,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            seed: 1,
            prompt_template: DEFAULT_PROMPT_TEMPLATE.to_string(),
            audio_slot: AudioSlot::None,
            audio_slot_dropout: 0.2,
        }
    }
}

impl LmSettings {
    /// Settings from an optional file and `--set key=value` overrides, checked.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigErrors> {
        load_settings(
            path,
            overrides,
            &Schema {
                check_keys: |t| check_section::<LmSettings>("", t),
                validate: LmSettings::validate,
                flat: true,
            },
        )
    }

    /// Every problem with the settings, at once.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut p = Vec::new();
        let heads = self.num_attention_heads;
        if heads == 0
            || self.num_key_value_heads == 0
            || !heads.is_multiple_of(self.num_key_value_heads)
        {
            p.push(problem(
                "num_attention_heads",
                format!(
                    "{heads} must be a positive multiple of num_key_value_heads ({})",
                    self.num_key_value_heads
                ),
            ));
        }
        if heads > 0
            && (!self.hidden_size.is_multiple_of(heads)
                || !(self.hidden_size / heads).is_multiple_of(2))
        {
            p.push(problem(
                "hidden_size",
                format!(
                    "{} must split into {heads} heads of even width",
                    self.hidden_size
                ),
            ));
        }
        for (name, v) in [
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("max_caption_tokens", self.max_caption_tokens),
        ] {
            if v == 0 {
                p.push(problem(name, "must be at least 1"));
            }
        }
        schedule_problems(
            self.epochs,
            self.batch_size,
            self.peak_lr,
            self.warmup_fraction,
            &mut p,
        );
        if let Err(e) = PromptTemplate::parse(&self.prompt_template) {
            p.push(problem("prompt_template", e.to_string()));
        }
        if !(0.0..1.0).contains(&self.audio_slot_dropout) {
            p.push(problem(
                "audio_slot_dropout",
                format!("{} must be within 0..1", self.audio_slot_dropout),
            ));
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    fn spec(&self, vocab_size: usize) -> LlamaSpec {
        LlamaSpec {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            rope_theta: 500_000.0,
            llama3_rope_factor: None,
            tie_word_embeddings: false,
            rms_norm_eps: 1e-5,
        }
    }
}

/// What a pre-training run did (`pretrain.json` in the output).
#[derive(Debug, Clone, Serialize)]
pub struct LmSummary {
    pub settings: LmSettings,
    pub vocab_size: usize,
    pub parameters: u64,
    pub train_examples: usize,
    pub validation_examples: usize,
    pub steps: u64,
    /// Mean loss (nats per caption token) of each epoch's training batches.
    pub train_loss: Vec<f64>,
    /// Mean loss over the validation captions after each epoch.
    pub validation_loss: Vec<f64>,
    pub tokens_per_second: f64,
    pub out: PathBuf,
}

/// One example: the whole token sequence, where its caption starts, and with a
/// slot, its position and the ids whose mean embedding fills it (empty: zeros).
struct LmExample {
    ids: Vec<u32>,
    caption_start: usize,
    slot: Option<(usize, Vec<u32>)>,
}

/// The decoder as trained: the model over `Var`-backed weights and the variables.
struct TrainableDecoder {
    llm: Llama,
    params: Vec<(String, Var)>,
}

impl TrainableDecoder {
    fn new(
        spec: &LlamaSpec,
        config: &serde_json::Value,
        seed: u64,
        device: &Device,
    ) -> Result<Self, LmError> {
        let mut rng = SplitMix64::new(seed);
        let mut params = Vec::new();
        let mut tensors = HashMap::new();
        for t in spec.tensors() {
            // Hugging Face's Llama initialisation: N(0, 0.02) weights, unit norms.
            let value = match t.init {
                Init::Weight => normal(&t.shape, 0.02, &mut rng, device)?,
                Init::NearOne => Tensor::ones(t.shape.as_slice(), DType::F32, device)?,
            };
            let var = Var::from_tensor(&value)?;
            tensors.insert(t.name.clone(), var.as_tensor().clone());
            params.push((t.name, var));
        }
        let llm = build_llama(config, tensors, device)?;
        Ok(Self { llm, params })
    }

    /// Summed cross-entropy over the caption tokens of `batch`, and their count.
    /// `drop_slot` says, per example, whether its slot hint is replaced by zeros.
    fn loss_sum(
        &self,
        batch: &[&LmExample],
        drop_slot: &[bool],
    ) -> Result<(Tensor, usize), LmError> {
        let device = self.llm.device();
        let seq = batch.iter().map(|e| e.ids.len() - 1).max().unwrap_or(1);
        let pad = *batch[0].ids.last().unwrap_or(&0);
        let mut ids = Vec::with_capacity(batch.len() * seq);
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for (b, e) in batch.iter().enumerate() {
            let inputs = &e.ids[..e.ids.len() - 1];
            ids.extend_from_slice(inputs);
            ids.extend(std::iter::repeat_n(pad, seq - inputs.len()));
            // Position t predicts token t + 1: the caption tokens and the terminator.
            for t in e.caption_start - 1..inputs.len() {
                rows.push((b * seq + t) as u32);
                labels.push(e.ids[t + 1]);
            }
        }
        let ids = Tensor::from_vec(ids, (batch.len(), seq), device)?;
        let mut embeds = self.llm.embed(&ids)?;
        if let Some((slot, _)) = batch[0].slot {
            embeds = self.fill_slot(embeds, slot, batch, drop_slot)?;
        }
        let hidden = self.llm.forward_embeds(&embeds, None)?;
        let width = hidden.dim(2)?;
        let rows_t = Tensor::from_vec(rows, labels.len(), device)?;
        let picked = hidden
            .reshape((batch.len() * seq, width))?
            .index_select(&rows_t, 0)?;
        let logits = self.llm.logits(&picked)?;
        let n = labels.len();
        let labels = Tensor::from_vec(labels, n, device)?;
        Ok((super::loss::cross_entropy_sum(&logits, &labels)?, n))
    }

    /// `embeds` [B, S, H] with position `slot` replaced by each example's hint: the
    /// mean embedding of its hint ids (zeros when it has none or `drop_slot`).
    fn fill_slot(
        &self,
        embeds: Tensor,
        slot: usize,
        batch: &[&LmExample],
        drop_slot: &[bool],
    ) -> Result<Tensor, LmError> {
        let device = self.llm.device();
        let (b, seq, _) = embeds.dims3()?;
        let hints: Vec<&[u32]> = batch
            .iter()
            .zip(drop_slot)
            .map(|(e, &dropped)| match &e.slot {
                Some((_, h)) if !dropped => h.as_slice(),
                _ => &[],
            })
            .collect();
        let longest = hints.iter().map(|h| h.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; b * longest];
        let mut weights = vec![0f32; b * longest];
        for (i, h) in hints.iter().enumerate() {
            for (k, &id) in h.iter().enumerate() {
                ids[i * longest + k] = id;
                weights[i * longest + k] = 1.0 / h.len() as f32;
            }
        }
        let hint_embeds = self
            .llm
            .embed(&Tensor::from_vec(ids, (b, longest), device)?)?; // [B, L, H]
        let weights =
            Tensor::from_vec(weights, (b, longest, 1), device)?.to_dtype(hint_embeds.dtype())?;
        let hint = hint_embeds.broadcast_mul(&weights)?.sum_keepdim(1)?; // [B, 1, H]
        Ok(Tensor::cat(
            &[
                embeds.narrow(1, 0, slot)?,
                hint,
                embeds.narrow(1, slot + 1, seq - slot - 1)?,
            ],
            1,
        )?)
    }
}

fn build_llama(
    config: &serde_json::Value,
    tensors: HashMap<String, Tensor>,
    device: &Device,
) -> Result<Llama, LmError> {
    let config: crate::model::llama::LlamaConfig =
        serde_json::from_value(config.clone()).map_err(|e| LmError::Model(e.to_string()))?;
    config.validate().map_err(LmError::Settings)?;
    let weights = Weights::from_tensors("decoder (training)", tensors, DType::F32, device);
    Llama::from_weights(config, &weights, &Adaptation::none())
        .map_err(|e| LmError::Model(e.to_string()))
}

fn examples(
    texts: &[CaptionText],
    tokenizer: &Tokenizer,
    prompt: &PromptIds,
    eot: u32,
    settings: &LmSettings,
) -> Result<Vec<LmExample>, LmError> {
    let with_slot = settings.audio_slot == AudioSlot::Labels;
    let tokenize = |text: &str| -> Result<Vec<u32>, LmError> {
        Ok(tokenizer
            .encode(text, false)
            .map_err(|e| LmError::Model(format!("tokenizing {text:?}: {e}")))?
            .get_ids()
            .to_vec())
    };
    texts
        .iter()
        .filter(|t| !t.caption.trim().is_empty())
        .map(|t| {
            let mut caption = tokenize(t.caption.trim())?;
            caption.truncate(settings.max_caption_tokens);
            let mut ids = prompt.prefix.clone();
            let slot = if with_slot {
                // The placeholder id is never embedded: the slot is replaced.
                ids.push(eot);
                Some((prompt.prefix.len(), tokenize(&t.labels.join(", "))?))
            } else {
                None
            };
            ids.extend_from_slice(&prompt.suffix);
            let caption_start = ids.len();
            ids.extend(caption);
            ids.push(eot);
            Ok(LmExample {
                ids,
                caption_start,
                slot,
            })
        })
        .collect()
}

/// Trains the tokenizer and the decoder on `train` captions (scored on
/// `validation` after every epoch) and writes the Llama directory to `out`.
pub fn pretrain_decoder(
    train: &[CaptionText],
    validation: &[CaptionText],
    settings: &LmSettings,
    out: &Path,
    device: &Device,
) -> Result<LmSummary, LmError> {
    if let Err(problems) = settings.validate() {
        return Err(LmError::Settings(
            problems.iter().map(ToString::to_string).collect(),
        ));
    }
    let template = PromptTemplate::parse(&settings.prompt_template)
        .map_err(|e| LmError::Settings(vec![e.to_string()]))?;
    // The prompt's words go into the tokenizer's training text, so the template
    // becomes a few tokens instead of bytes.
    let prompt_words: String = template
        .text()
        .split("<|")
        .map(|part| part.split_once("|>").map_or(part, |(_, rest)| rest))
        .collect::<Vec<_>>()
        .join(" ");
    if settings.audio_slot == AudioSlot::Labels && train.iter().all(|t| t.labels.is_empty()) {
        return Err(LmError::Settings(vec![
            "audio_slot = \"labels\" needs labels with the training captions (a `labels` column)"
                .to_string(),
        ]));
    }
    // Label words are tokenized too, so they go into the tokenizer's training text.
    let mut tokenizer_text: Vec<String> = train.iter().map(|t| t.caption.clone()).collect();
    tokenizer_text.extend(
        train
            .iter()
            .filter(|t| !t.labels.is_empty())
            .map(|t| t.labels.join(", ")),
    );
    tokenizer_text.extend(std::iter::repeat_n(prompt_words, 100));
    let tokenizer = super::tokenizer::train_tokenizer(
        &tokenizer_text,
        settings.vocab_size,
        settings.min_frequency,
    )?;
    let vocab = tokenizer.get_vocab_size(true);
    let special = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| LmError::Model(format!("tokenizer lacks {t}")))
    };
    let (bos, eos, eot) = (
        special("<|begin_of_text|>")?,
        special("<|end_of_text|>")?,
        special("<|eot_id|>")?,
    );
    let prompt = template
        .tokenize(&tokenizer, Path::new("tokenizer.json"))
        .map_err(|e| LmError::Model(e.to_string()))?;
    let train_examples = examples(train, &tokenizer, &prompt, eot, settings)?;
    let validation_examples = examples(validation, &tokenizer, &prompt, eot, settings)?;
    if train_examples.is_empty() {
        return Err(LmError::Settings(vec!["no training captions".to_string()]));
    }
    let longest = train_examples
        .iter()
        .chain(&validation_examples)
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(0);
    if longest > settings.max_position_embeddings {
        return Err(LmError::Settings(vec![format!(
            "max_position_embeddings ({}) is below the longest example ({longest} tokens)",
            settings.max_position_embeddings
        )]));
    }

    let spec = settings.spec(vocab);
    let mut config = spec.config_json(SourceDtype::F32);
    config["bos_token_id"] = bos.into();
    config["eos_token_id"] = serde_json::json!([eos, eot]);
    let model = TrainableDecoder::new(&spec, &config, settings.seed, device)?;
    let mut optimizer = AdamW::new(
        model.params.clone(),
        AdamWSettings {
            weight_decay: settings.weight_decay,
            ..AdamWSettings::default()
        },
    )?;
    let batches_per_epoch = train_examples.len().div_ceil(settings.batch_size);
    let total = (batches_per_epoch * settings.epochs) as u64;
    let schedule = CosineSchedule::new(settings.peak_lr, settings.warmup_fraction, total);
    let mut rng = SplitMix64::new(settings.seed ^ 0x5EED);
    let mut slot_rng = SplitMix64::derive(settings.seed, 0x5107);
    let mut order: Vec<usize> = (0..train_examples.len()).collect();
    let mut train_loss = Vec::new();
    let mut validation_loss = Vec::new();
    let mut tokens = 0usize;
    let started = Instant::now();
    for epoch in 0..settings.epochs {
        rng.shuffle(&mut order);
        let (mut sum, mut count) = (0.0f64, 0usize);
        for chunk in order.chunks(settings.batch_size) {
            let batch: Vec<&LmExample> = chunk.iter().map(|&i| &train_examples[i]).collect();
            let drop: Vec<bool> = batch
                .iter()
                .map(|_| slot_rng.next_f64() < settings.audio_slot_dropout)
                .collect();
            let (loss_sum, n) = model.loss_sum(&batch, &drop)?;
            let lr = schedule.lr(optimizer.steps());
            let loss = optimizer_step(
                &mut optimizer,
                &model.params,
                &(loss_sum / n as f64)?,
                settings.max_grad_norm,
                lr,
            )?;
            sum += loss * n as f64;
            count += n;
            tokens += batch.iter().map(|e| e.ids.len()).sum::<usize>();
            if optimizer.steps().is_multiple_of(50) {
                tracing::info!(
                    step = optimizer.steps(),
                    of = total,
                    loss = sum / count.max(1) as f64,
                    lr,
                    tokens_per_second = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
                    "decoder pre-training"
                );
            }
        }
        train_loss.push(sum / count.max(1) as f64);
        if !validation_examples.is_empty() {
            let (mut vsum, mut vcount) = (0.0f64, 0usize);
            for chunk in validation_examples.chunks(settings.batch_size) {
                let batch: Vec<&LmExample> = chunk.iter().collect();
                let (l, n) = model.loss_sum(&batch, &vec![false; batch.len()])?;
                vsum += l.detach().to_scalar::<f32>()? as f64;
                vcount += n;
            }
            validation_loss.push(vsum / vcount.max(1) as f64);
        }
        tracing::info!(
            epoch = epoch + 1,
            train_loss = train_loss.last().copied().unwrap_or(f64::NAN),
            validation_loss = validation_loss.last().copied().unwrap_or(f64::NAN),
            "decoder pre-training"
        );
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);

    let summary = LmSummary {
        settings: settings.clone(),
        vocab_size: vocab,
        parameters: spec.num_parameters(),
        train_examples: train_examples.len(),
        validation_examples: validation_examples.len(),
        steps: optimizer.steps(),
        train_loss,
        validation_loss,
        tokens_per_second: tokens as f64 / elapsed,
        out: out.to_path_buf(),
    };
    // The Hugging Face directory, written beside and renamed into place.
    publish_dir(out, |dir| {
        write_json(dir, "config.json", &config)?;
        write_json(
            dir,
            "generation_config.json",
            &serde_json::json!({"bos_token_id": bos, "eos_token_id": [eos, eot], "do_sample": false}),
        )?;
        let weights: HashMap<String, Tensor> = model
            .params
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect();
        candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
        let tokenizer_path = dir.join("tokenizer.json");
        tokenizer
            .save(&tokenizer_path, true)
            .map_err(|e| LmError::Model(format!("{}: {e}", tokenizer_path.display())))?;
        write_json(dir, "pretrain.json", &summary)
    })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy_captions() -> Vec<String> {
        let subjects = ["a dog", "a bell", "the rain", "a man"];
        let verbs = ["barks", "rings", "falls", "speaks"];
        (0..4)
            .flat_map(|i| {
                let s = subjects[i];
                let v = verbs[i];
                [
                    format!("{s} {v} loudly"),
                    format!("{s} {v} twice"),
                    format!("{s} {v} nearby"),
                ]
            })
            .collect()
    }

    fn tiny() -> LmSettings {
        LmSettings {
            vocab_size: 300,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 128,
            epochs: 60,
            batch_size: 4,
            peak_lr: 3e-3,
            ..LmSettings::default()
        }
    }

    #[test]
    fn every_weight_gets_a_gradient_through_the_var_backed_model() {
        let settings = tiny();
        let spec = settings.spec(300);
        let config = spec.config_json(SourceDtype::F32);
        let model = TrainableDecoder::new(&spec, &config, 1, &Device::Cpu).unwrap();
        let ex = LmExample {
            ids: vec![1, 2, 3, 4, 5, 6],
            caption_start: 3,
            slot: Some((1, vec![7, 8])),
        };
        let (loss, n) = model.loss_sum(&[&ex], &[false]).unwrap();
        assert_eq!(n, 3);
        let grads = loss.backward().unwrap();
        for (name, var) in &model.params {
            let g = grads.get(var.as_tensor());
            assert!(g.is_some(), "{name} has no gradient");
        }
    }

    #[test]
    fn a_tiny_decoder_learns_the_captions_and_loads_back_as_a_llama_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("decoder");
        let captions = toy_captions();
        let texts: Vec<CaptionText> = captions.iter().map(CaptionText::plain).collect();
        let summary = pretrain_decoder(&texts, &texts[..4], &tiny(), &out, &Device::Cpu).unwrap();
        let first = summary.train_loss[0];
        let last = *summary.train_loss.last().unwrap();
        // A handful of captions of ~5 tokens: near-memorised after 60 epochs.
        assert!(last < first / 4.0, "{first} → {last}");
        for f in [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "pretrain.json",
        ] {
            assert!(out.join(f).exists(), "{f}");
        }
        // The directory loads as any Llama checkpoint, and greedy decoding after the
        // prompt continues with a caption of the training set.
        let llm = Llama::load(&out, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let tokenizer = crate::model::prompt::load_tokenizer(&out.join("tokenizer.json")).unwrap();
        let template = PromptTemplate::parse(DEFAULT_PROMPT_TEMPLATE).unwrap();
        let prompt = template.tokenize(&tokenizer, Path::new("t")).unwrap();
        let mut ids: Vec<u32> = prompt
            .prefix
            .iter()
            .chain(&prompt.suffix)
            .copied()
            .collect();
        let eot = tokenizer.token_to_id("<|eot_id|>").unwrap();
        let start = ids.len();
        for _ in 0..40 {
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = llm.forward_ids(&input, None).unwrap();
            let last = logits.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
            let next = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            if next == eot {
                break;
            }
            ids.push(next);
        }
        let text = tokenizer.decode(&ids[start..], true).unwrap();
        assert!(
            captions.contains(&text),
            "{text:?} {:?} {:?}",
            &ids[start..],
            summary.train_loss
        );
    }

    #[test]
    fn bad_settings_are_all_reported() {
        let settings = LmSettings {
            num_attention_heads: 3,
            num_key_value_heads: 2,
            epochs: 0,
            peak_lr: 0.0,
            ..LmSettings::default()
        };
        let problems = settings.validate().unwrap_err();
        assert!(problems.len() >= 4, "{problems:?}");
        let ats: Vec<&str> = problems.iter().map(|p| p.at.as_str()).collect();
        assert!(
            ats.contains(&"num_attention_heads") && ats.contains(&"epochs"),
            "{ats:?}"
        );
    }

    /// With `audio_slot = "labels"` the decoder learns to read the slot: the same
    /// prompt captions a dog with the hint "dog" and a bell with the hint "bell".
    #[test]
    fn a_decoder_pretrained_with_label_hints_captions_what_the_slot_names() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("decoder");
        let texts: Vec<CaptionText> = toy_captions()
            .into_iter()
            .map(|c| {
                let label = c.split(' ').nth(1).unwrap().to_string();
                CaptionText {
                    caption: c,
                    labels: vec![label],
                }
            })
            .collect();
        let settings = LmSettings {
            audio_slot: AudioSlot::Labels,
            audio_slot_dropout: 0.1,
            epochs: 150,
            ..tiny()
        };
        pretrain_decoder(&texts, &texts[..4], &settings, &out, &Device::Cpu).unwrap();
        let pretrain: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("pretrain.json")).unwrap()).unwrap();
        assert_eq!(pretrain["settings"]["audio_slot"], "labels");

        let llm = Llama::load(&out, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let tokenizer = crate::model::prompt::load_tokenizer(&out.join("tokenizer.json")).unwrap();
        let prompt = PromptTemplate::parse(DEFAULT_PROMPT_TEMPLATE)
            .unwrap()
            .tokenize(&tokenizer, Path::new("t"))
            .unwrap();
        let eot = tokenizer.token_to_id("<|eot_id|>").unwrap();
        let embed = |ids: &[u32]| {
            llm.embed(
                &Tensor::new(ids, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap()
        };
        for (subject, word) in [("rain", "falls"), ("dog", "barks"), ("bell", "rings")] {
            let hint_ids = tokenizer.encode(subject, false).unwrap().get_ids().to_vec();
            let hint = embed(&hint_ids).mean_keepdim(1).unwrap();
            let mut generated: Vec<u32> = Vec::new();
            for _ in 0..20 {
                let tail: Vec<u32> = prompt.suffix.iter().chain(&generated).copied().collect();
                let embeds =
                    Tensor::cat(&[embed(&prompt.prefix), hint.clone(), embed(&tail)], 1).unwrap();
                let hidden = llm.forward_embeds(&embeds, None).unwrap();
                let last = hidden.narrow(1, hidden.dim(1).unwrap() - 1, 1).unwrap();
                let logits = llm.logits(&last.squeeze(1).unwrap()).unwrap();
                let next = logits
                    .squeeze(0)
                    .unwrap()
                    .argmax(0)
                    .unwrap()
                    .to_scalar::<u32>()
                    .unwrap();
                if next == eot {
                    break;
                }
                generated.push(next);
            }
            let text = tokenizer.decode(&generated, true).unwrap();
            assert!(
                text.contains(subject) && text.contains(word),
                "hint {subject:?} gave {text:?}"
            );
        }
    }
}
