//! The model being trained: frozen Llama with live LoRA paths whose A/B matrices are
//! trainable variables, and a trainable projector; the caption loss over a batch of
//! cached encoder features; greedy captions for validation.
//!
//! The frozen BEATs encoder is not here: its features come from the on-disk cache
//! ([`super::features`]). Only the variables in [`TrainableParams`] get gradients;
//! every frozen linear layer runs through [`crate::model::frozen`] so the backward
//! pass never computes a gradient for a base weight.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use tokenizers::Tokenizer;

use crate::caption::{Caption, CaptionError, greedy_decode};
use crate::model::init::{kaiming_uniform, uniform};
use crate::model::llama::{Llama, LlamaConfig, open_checkpoint};
use crate::model::lora::{
    Adaptation, AdapterConfig, LoraDropout, LoraModule, PeftAdapter, TargetModules,
};
use crate::model::projector::{Pooling, Projector};
use crate::model::prompt::{PromptIds, PromptTemplate, load_tokenizer};
use crate::model::sources::read_stop_ids;
use crate::model::weights::{LoadError, Weights};
use crate::rng::SplitMix64;

/// The LoRA settings of a run (PEFT's `LoraConfig` fields the recipe sets).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module-name suffixes: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`.
    pub target_modules: Vec<String>,
}

/// The module names a Llama decoder block has, with (in, out) dims.
pub fn llama_linear_dims(cfg: &LlamaConfig) -> Vec<(&'static str, &'static str, usize, usize)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.num_key_value_heads() * cfg.head_dim();
    vec![
        ("self_attn", "q_proj", h, q),
        ("self_attn", "k_proj", h, kv),
        ("self_attn", "v_proj", h, kv),
        ("self_attn", "o_proj", q, h),
        ("mlp", "gate_proj", h, i),
        ("mlp", "up_proj", h, i),
        ("mlp", "down_proj", i, h),
    ]
}

/// Where the trainable parameters start.
#[derive(Debug, Clone, Default)]
pub struct InitFrom {
    /// A projector safetensors file; else a fresh PyTorch-default initialisation.
    pub projector: Option<PathBuf>,
    /// A PEFT adapter directory; else fresh LoRA (A Kaiming-uniform, B zero, as PEFT).
    pub adapter: Option<PathBuf>,
}

/// The trainable variables: the projector's two linear layers and every LoRA A/B.
#[derive(Debug)]
pub struct TrainableParams {
    /// `0.weight` [H, D], `0.bias`, `2.weight` [O, H], `2.bias`: the key names of a
    /// PyTorch `nn.Sequential(Linear, GELU, Linear)`.
    pub projector: BTreeMap<String, Var>,
    /// Per module path (`model.layers.0.self_attn.q_proj`): A [r, in] and B [out, r].
    pub lora: BTreeMap<String, (Var, Var)>,
    pub adapter_config: AdapterConfig,
}

impl TrainableParams {
    /// Fresh or loaded parameters for a decoder with `llm` config and an encoder with
    /// `encoder_dim` features. `projector_hidden` = 0 means the decoder's width.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        llm: &LlamaConfig,
        encoder_dim: usize,
        projector_hidden: usize,
        lora: &LoraSettings,
        from: &InitFrom,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let var = |t: Tensor, origin: &Path| -> Result<Var, LoadError> {
            t.to_dtype(dtype)
                .and_then(|t| t.to_device(device))
                .and_then(|t| Var::from_tensor(&t))
                .map_err(|e| LoadError::tensor(origin, "parameter", e))
        };
        let fresh = Path::new("<fresh initialisation>");
        let mut rng = SplitMix64::derive(seed, 1);
        let out_dim = llm.hidden_size;
        let hidden = if projector_hidden == 0 {
            out_dim
        } else {
            projector_hidden
        };
        let mut projector = BTreeMap::new();
        match &from.projector {
            Some(path) => {
                let w = Weights::from_safetensors(
                    path,
                    std::slice::from_ref(path),
                    DType::F32,
                    &Device::Cpu,
                )?;
                let loaded = Projector::from_weights(&w, Pooling::Mean)?;
                if loaded.in_dim() != encoder_dim || loaded.out_dim() != out_dim {
                    return Err(LoadError::config(
                        path,
                        format!(
                            "projector maps {} → {}, the encoder gives {encoder_dim} and the decoder takes {out_dim}",
                            loaded.in_dim(),
                            loaded.out_dim()
                        ),
                    ));
                }
                for name in ["0.weight", "0.bias", "2.weight", "2.bias"] {
                    projector.insert(name.to_string(), var(w.get_any_shape(name)?, path)?);
                }
            }
            None => {
                let cpu = Device::Cpu;
                let t = |r: candle_core::Result<Tensor>| {
                    r.map_err(|e| LoadError::tensor(fresh, "projector", e))
                };
                let w0 = t(kaiming_uniform(hidden, encoder_dim, &mut rng, &cpu))?;
                let b0 = t(uniform(
                    &[hidden],
                    1.0 / (encoder_dim as f64).sqrt(),
                    &mut rng,
                    &cpu,
                ))?;
                let w2 = t(kaiming_uniform(out_dim, hidden, &mut rng, &cpu))?;
                let b2 = t(uniform(
                    &[out_dim],
                    1.0 / (hidden as f64).sqrt(),
                    &mut rng,
                    &cpu,
                ))?;
                for (name, value) in [
                    ("0.weight", w0),
                    ("0.bias", b0),
                    ("2.weight", w2),
                    ("2.bias", b2),
                ] {
                    projector.insert(name.to_string(), var(value, fresh)?);
                }
            }
        }

        let mut lora_vars = BTreeMap::new();
        let adapter_config = match &from.adapter {
            Some(dir) => {
                let adapter = PeftAdapter::load(dir)?;
                for (path, module) in &adapter.modules {
                    // Training keeps PEFT's scale α/r per module; a loaded adapter's
                    // own scale is what its config says, so the config is kept as is.
                    lora_vars.insert(
                        path.clone(),
                        (var(module.a.clone(), dir)?, var(module.b.clone(), dir)?),
                    );
                }
                adapter.config
            }
            None => {
                for layer in 0..llm.num_hidden_layers {
                    for (block, name, in_dim, out_dim) in llama_linear_dims(llm) {
                        if !lora.target_modules.iter().any(|t| t == name) {
                            continue;
                        }
                        let path = format!("model.layers.{layer}.{block}.{name}");
                        let a = kaiming_uniform(lora.r, in_dim, &mut rng, &Device::Cpu)
                            .map_err(|e| LoadError::tensor(fresh, &path, e))?;
                        let b = Tensor::zeros((out_dim, lora.r), DType::F32, &Device::Cpu)
                            .map_err(|e| LoadError::tensor(fresh, &path, e))?;
                        lora_vars.insert(path, (var(a, fresh)?, var(b, fresh)?));
                    }
                }
                fresh_adapter_config(lora)
            }
        };
        Ok(Self {
            projector,
            lora: lora_vars,
            adapter_config,
        })
    }

    /// The variables the optimiser updates, by a stable name: the projector's
    /// (`projector.0.weight`, ...) when `with_projector`, and every LoRA matrix
    /// (`lora.model.layers.0.self_attn.q_proj.A`, ...).
    pub fn trainable(&self, with_projector: bool) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        if with_projector {
            for (name, v) in &self.projector {
                out.push((format!("projector.{name}"), v.clone()));
            }
        }
        for (path, (a, b)) in &self.lora {
            out.push((format!("lora.{path}.A"), a.clone()));
            out.push((format!("lora.{path}.B"), b.clone()));
        }
        out
    }

    /// Multiplies the projector's last layer (weight and bias) by `factor`: its
    /// outputs scale by it.
    pub fn scale_projector_output(&self, factor: f64) -> candle_core::Result<()> {
        for name in ["2.weight", "2.bias"] {
            let var = &self.projector[name];
            var.set(&(var.as_tensor() * factor)?)?;
        }
        Ok(())
    }

    /// The projector as a model part, sharing this struct's variables.
    pub fn projector_model(&self) -> Result<Projector, LoadError> {
        let tensors: HashMap<String, Tensor> = self
            .projector
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let first = self.projector["0.weight"].as_tensor();
        let w = Weights::from_tensors("projector", tensors, first.dtype(), first.device());
        Projector::from_weights(&w, Pooling::Mean)
    }

    /// The adapter as PEFT modules sharing this struct's variables (for live paths),
    /// or detached copies (for saving) when `detached`.
    pub fn adapter(&self, dir: &Path, detached: bool) -> PeftAdapter {
        let modules = self
            .lora
            .iter()
            .map(|(path, (a, b))| {
                let (a, b) = if detached {
                    (a.as_detached_tensor(), b.as_detached_tensor())
                } else {
                    (a.as_tensor().clone(), b.as_tensor().clone())
                };
                let r = a.dims()[0];
                let scale = self.adapter_config.scaling(path, r);
                (path.clone(), LoraModule { a, b, scale })
            })
            .collect();
        PeftAdapter {
            dir: dir.to_path_buf(),
            config: self.adapter_config.clone(),
            modules,
        }
    }

    /// Writes `projector.safetensors` (f32, the fixture's key names).
    pub fn save_projector(&self, file: &Path) -> candle_core::Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .projector
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_detached_tensor().to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<_>>()?;
        candle_core::safetensors::save(&tensors, file)
    }

    /// Writes the adapter in PEFT's format (f32).
    pub fn save_adapter(&self, dir: &Path) -> Result<(), crate::model::lora::SaveError> {
        let mut adapter = self.adapter(dir, true);
        for module in adapter.modules.values_mut() {
            let f32 = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .map_err(|source| crate::model::lora::SaveError::Tensor {
                        path: dir.to_path_buf(),
                        source,
                    })
            };
            module.a = f32(&module.a)?;
            module.b = f32(&module.b)?;
        }
        adapter.save(dir)
    }
}

/// The `adapter_config.json` PEFT writes for a fresh `LoraConfig` of these settings.
fn fresh_adapter_config(lora: &LoraSettings) -> AdapterConfig {
    serde_json::from_value(serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": TargetModules::Names(lora.target_modules.clone()),
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
    }))
    .expect("a fixed-shape adapter config")
}

/// Caption text → ids (no special tokens, as the decoder continues the prompt), at
/// most `max_tokens`.
pub fn tokenize_caption(
    tokenizer: &Tokenizer,
    caption: &str,
    max_tokens: usize,
) -> ModelResult<Vec<u32>> {
    let mut ids = tokenizer
        .encode(caption.trim(), false)
        .map_err(|e| CaptionError::Mismatch(format!("tokenizing a caption: {e}")))?
        .get_ids()
        .to_vec();
    ids.truncate(max_tokens);
    Ok(ids)
}

/// One training example: a clip's cached encoder features and one caption's ids.
#[derive(Debug, Clone)]
pub struct Example {
    /// [P, D] patches, f32 on the CPU.
    pub features: Tensor,
    /// Caption token ids (without the terminator).
    pub caption: Vec<u32>,
}

/// A collated batch on the training device.
#[derive(Debug)]
pub struct Batch {
    /// [B, P, D]
    pub features: Tensor,
    /// [B, P], nonzero = padding; `None` when every clip has the same length.
    pub padding_mask: Option<Tensor>,
    /// [B, S] prompt + placeholder + caption + terminator, right-padded.
    pub ids: Tensor,
    /// [N] row indices into the flattened [B·S] hidden states whose next token is
    /// a label.
    pub label_rows: Tensor,
    /// [N] the label ids.
    pub labels: Tensor,
    /// N: caption tokens (terminators included) the loss is over.
    pub tokens: usize,
    /// Positions the decoder ran over, padding excluded (prompt + audio + caption).
    pub positions: usize,
}

/// The frozen decoder with live trainable LoRA paths, the trainable projector, the
/// prompt and tokenizer.
pub struct TrainableCaptioner {
    llm: Llama,
    projector: Projector,
    dropout: Arc<LoraDropout>,
    tokenizer: Tokenizer,
    prompt: PromptIds,
    stop_ids: Vec<u32>,
    /// The id every caption ends with in training (`<|eot_id|>` in Llama 3 Instruct):
    /// the first stop id the tokenizer knows as the chat turn's end, else the first.
    terminator: u32,
    /// The projector's dtype: features are converted to it.
    param_dtype: DType,
    device: Device,
}

/// Why the trainable captioner could not be assembled or run.
pub type ModelResult<T> = std::result::Result<T, CaptionError>;

impl TrainableCaptioner {
    /// The decoder at `llm_dir` (`dtype` on `device`) with `params`' LoRA paths live
    /// and their dropout `lora_dropout` (seeded by `seed`).
    pub fn new(
        llm_dir: &Path,
        params: &TrainableParams,
        prompt_template: &str,
        lora_dropout: f64,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> ModelResult<Self> {
        let (config, weights) = open_checkpoint(llm_dir, dtype, device)?;
        let dropout = Arc::new(LoraDropout::new(
            lora_dropout,
            SplitMix64::derive(seed, 2).state,
        ));
        let adapter = params.adapter(llm_dir, false);
        let adaptation = Adaptation::live(&[&adapter]).with_dropout(dropout.clone());
        let llm = Llama::from_weights(config, &weights, &adaptation)?;
        let projector = params.projector_model()?;
        if projector.out_dim() != llm.config().hidden_size {
            return Err(CaptionError::Mismatch(format!(
                "the projector gives {}-dim embeddings, the decoder takes {}",
                projector.out_dim(),
                llm.config().hidden_size
            )));
        }
        let tokenizer_file = llm_dir.join("tokenizer.json");
        let tokenizer = load_tokenizer(&tokenizer_file)?;
        let prompt =
            PromptTemplate::parse(prompt_template)?.tokenize(&tokenizer, &tokenizer_file)?;
        let stop_ids = read_stop_ids(llm_dir)?;
        let terminator = tokenizer
            .token_to_id("<|eot_id|>")
            .filter(|id| stop_ids.contains(id))
            .or_else(|| stop_ids.first().copied())
            .ok_or_else(|| {
                CaptionError::Mismatch(format!(
                    "{}: the decoder has no end-of-sequence id to end captions with",
                    llm_dir.display()
                ))
            })?;
        Ok(Self {
            llm,
            projector,
            dropout,
            tokenizer,
            prompt,
            stop_ids,
            terminator,
            param_dtype: params.projector["0.weight"].dtype(),
            device: device.clone(),
        })
    }

    pub fn llm(&self) -> &Llama {
        &self.llm
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dropout(&self) -> &LoraDropout {
        &self.dropout
    }

    /// Dropout on (training) or off (validation, captioning).
    pub fn set_training(&self, training: bool) {
        self.dropout.set_training(training);
    }

    /// Pads and stacks examples into a batch on the training device.
    pub fn collate(&self, examples: &[&Example]) -> ModelResult<Batch> {
        let cpu = Device::Cpu;
        let b = examples.len();
        let dim = examples[0].features.dim(1)?;
        let lengths: Vec<usize> = examples
            .iter()
            .map(|e| e.features.dim(0))
            .collect::<candle_core::Result<_>>()?;
        let max_patches = lengths.iter().copied().max().unwrap_or(0);
        let mut rows = Vec::with_capacity(b);
        for (e, &len) in examples.iter().zip(&lengths) {
            let f = e.features.to_dtype(self.param_dtype)?;
            rows.push(if len < max_patches {
                let pad = Tensor::zeros((max_patches - len, dim), self.param_dtype, &cpu)?;
                Tensor::cat(&[f, pad], 0)?
            } else {
                f
            });
        }
        let features = Tensor::stack(&rows, 0)?.to_device(&self.device)?;
        let padding_mask = if lengths.iter().all(|&l| l == max_patches) {
            None
        } else {
            let mask: Vec<u8> = lengths
                .iter()
                .flat_map(|&l| (0..max_patches).map(move |p| u8::from(p >= l)))
                .collect();
            Some(Tensor::from_vec(mask, (b, max_patches), &cpu)?.to_device(&self.device)?)
        };

        let audio_slots = self.projector.pooling().tokens_per_clip();
        let head = self.prompt.prefix.len() + audio_slots + self.prompt.suffix.len();
        let seq = head
            + examples
                .iter()
                .map(|e| e.caption.len() + 1)
                .max()
                .unwrap_or(1);
        let mut ids = Vec::with_capacity(b * seq);
        let mut label_rows = Vec::new();
        let mut labels = Vec::new();
        for (i, e) in examples.iter().enumerate() {
            let mut row: Vec<u32> = self.prompt.prefix.clone();
            // Placeholder ids where the audio embeddings go (replaced in `forward`).
            row.extend(std::iter::repeat_n(self.terminator, audio_slots));
            row.extend(&self.prompt.suffix);
            let targets: Vec<u32> = e.caption.iter().copied().chain([self.terminator]).collect();
            for (k, &t) in targets.iter().enumerate() {
                // Position head + k − 1 predicts the k-th target.
                label_rows.push((i * seq + head + k - 1) as u32);
                labels.push(t);
            }
            row.extend(&targets);
            row.resize(seq, self.terminator);
            ids.extend(row);
        }
        let tokens = labels.len();
        let positions = b * head + tokens;
        Ok(Batch {
            positions,
            features,
            padding_mask,
            ids: Tensor::from_vec(ids, (b, seq), &self.device)?,
            label_rows: Tensor::from_vec(label_rows, tokens, &self.device)?,
            labels: Tensor::from_vec(labels, tokens, &self.device)?,
            tokens,
        })
    }

    /// The summed cross-entropy (nats) of the batch's caption tokens: a scalar f32.
    /// Divide by the step's token count for the mean the recipe minimises.
    pub fn loss_sum(&self, batch: &Batch) -> ModelResult<Tensor> {
        let logits = self.label_logits(batch)?;
        Ok(super::loss::cross_entropy_sum(&logits, &batch.labels)?)
    }

    /// The logits [N, V] (f32 over f32, bf16 or f16 weights) at the positions that
    /// predict the batch's caption tokens, in label order: an example's first row
    /// is its prompt's next-token distribution. The audio embeddings (the
    /// projector's dtype) are cast into the decoder's where they are spliced.
    pub fn label_logits(&self, batch: &Batch) -> ModelResult<Tensor> {
        let audio = self
            .projector
            .forward(&batch.features, batch.padding_mask.as_ref())?; // [B, n, H]
        let embeds = self.llm.embed(&batch.ids)?; // [B, S, H]
        let (b, seq, hidden) = embeds.dims3()?;
        let start = self.prompt.prefix.len();
        let n = audio.dim(1)?;
        let embeds = Tensor::cat(
            &[
                embeds.narrow(1, 0, start)?,
                audio.to_dtype(embeds.dtype())?,
                embeds.narrow(1, start + n, seq - start - n)?,
            ],
            1,
        )?;
        let states = self.llm.forward_embeds(&embeds, None)?;
        // Only the positions that predict a caption token go through the output layer
        // (the vocabulary is 128k wide; the prompt positions would be wasted work).
        let picked = states
            .reshape((b * seq, hidden))?
            .index_select(&batch.label_rows, 0)?;
        Ok(self.llm.logits(&picked)?)
    }

    /// Root mean square of the audio embeddings of `batch` and of (up to 4,096 evenly
    /// spaced rows of) the decoder's token-embedding table.
    pub fn embedding_scales(&self, batch: &Batch) -> ModelResult<(f64, f64)> {
        let rms = |t: &Tensor| -> ModelResult<f64> {
            Ok(t.to_dtype(DType::F32)?
                .sqr()?
                .mean_all()?
                .sqrt()?
                .to_scalar::<f32>()? as f64)
        };
        let audio = self
            .projector
            .forward(&batch.features, batch.padding_mask.as_ref())?;
        let vocab = self.llm.config().vocab_size;
        let step = vocab.div_ceil(4096).max(1);
        let ids: Vec<u32> = (0..vocab).step_by(step).map(|i| i as u32).collect();
        let n = ids.len();
        let rows = self
            .llm
            .embed(&Tensor::from_vec(ids, (1, n), &self.device)?)?;
        Ok((rms(&audio)?, rms(&rows)?))
    }

    /// The audio embedding(s) [1, n, H] of one clip's features [P, D].
    pub fn audio_embedding(&self, features: &Tensor) -> ModelResult<Tensor> {
        let f = features
            .to_dtype(self.param_dtype)?
            .to_device(&self.device)?
            .unsqueeze(0)?;
        Ok(self.projector.forward(&f, None)?)
    }

    /// A greedy caption of one clip's features (dropout is switched off for it).
    pub fn caption(&self, features: &Tensor, max_new_tokens: usize) -> ModelResult<Caption> {
        let was_training = self.dropout.is_training();
        self.set_training(false);
        let result = self.caption_without_dropout(features, max_new_tokens);
        self.set_training(was_training);
        result
    }

    fn caption_without_dropout(
        &self,
        features: &Tensor,
        max_new_tokens: usize,
    ) -> ModelResult<Caption> {
        let audio = self.audio_embedding(features)?.detach();
        greedy_decode(
            &self.llm,
            &self.tokenizer,
            &self.prompt,
            &self.stop_ids,
            &audio,
            max_new_tokens,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::prompt::DEFAULT_PROMPT_TEMPLATE;
    use crate::test_util::random;
    use crate::train::optim::{AdamW, AdamWSettings, GradAccumulator};

    fn llm_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/e2e-tiny/llm")
    }

    fn settings(targets: &[&str]) -> LoraSettings {
        LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn setup(dtype: DType, targets: &[&str]) -> (TrainableParams, TrainableCaptioner) {
        setup_with(dtype, dtype, targets)
    }

    /// Trainable parameters in `param_dtype` over frozen weights in `frozen_dtype`.
    fn setup_with(
        param_dtype: DType,
        frozen_dtype: DType,
        targets: &[&str],
    ) -> (TrainableParams, TrainableCaptioner) {
        let config = LlamaConfig::from_file(&llm_dir().join("config.json")).unwrap();
        let params = TrainableParams::init(
            &config,
            48,
            0,
            &settings(targets),
            &InitFrom::default(),
            3,
            param_dtype,
            &Device::Cpu,
        )
        .unwrap();
        let model = TrainableCaptioner::new(
            &llm_dir(),
            &params,
            DEFAULT_PROMPT_TEMPLATE,
            0.0,
            3,
            frozen_dtype,
            &Device::Cpu,
        )
        .unwrap();
        (params, model)
    }

    fn examples() -> Vec<Example> {
        vec![
            Example {
                features: random(&[5, 48], 11, 2.0, 0.0),
                caption: vec![264, 5679, 293, 2130],
            },
            Example {
                features: random(&[7, 48], 12, 2.0, 0.0),
                caption: vec![11758, 17503],
            },
        ]
    }

    fn element(var: &Var, index: usize) -> f64 {
        var.as_tensor()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[index]
    }

    fn set_element(var: &Var, index: usize, value: f64) {
        let mut data = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        data[index] = value;
        var.set(&Tensor::from_vec(data, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }

    /// Central finite differences in f64 against the backward pass, for LoRA A and B
    /// of several modules and every projector tensor.
    #[test]
    fn gradients_match_finite_differences() {
        let (params, model) = setup(DType::F64, &["q_proj", "k_proj", "v_proj"]);
        // B starts at zero (so A's gradient would be zero too): give it values.
        for (i, (_, (_, b))) in params.lora.iter().enumerate() {
            let shape = b.dims().to_vec();
            let value = random(&shape, 100 + i as u64, 0.2, 0.0)
                .to_dtype(DType::F64)
                .unwrap();
            b.set(&value).unwrap();
        }
        let data = examples();
        let batch = model.collate(&data.iter().collect::<Vec<_>>()).unwrap();
        assert!(batch.padding_mask.is_some());
        assert_eq!(batch.tokens, 4 + 1 + 2 + 1);
        let loss = |m: &TrainableCaptioner| {
            m.loss_sum(&batch)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = model.loss_sum(&batch).unwrap().backward().unwrap();
        let vars = params.trainable(true);
        let mut checked = 0;
        for (name, var) in &vars {
            let wanted = name.contains("projector")
                || name.contains("layers.0.self_attn.q_proj")
                || name.contains("layers.1.self_attn.v_proj")
                || name.contains("layers.1.self_attn.k_proj.A");
            if !wanted {
                continue;
            }
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for index in [0, var.elem_count() / 2, var.elem_count() - 1] {
                let original = element(var, index);
                let eps = 1e-5;
                set_element(var, index, original + eps);
                let up = loss(&model);
                set_element(var, index, original - eps);
                let down = loss(&model);
                set_element(var, index, original);
                let numeric = (up - down) / (2.0 * eps);
                let analytic = grad[index];
                let tolerance = 1e-6 + 1e-4 * numeric.abs().max(analytic.abs());
                assert!(
                    (numeric - analytic).abs() < tolerance,
                    "{name}[{index}]: finite difference {numeric}, backward {analytic}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 24, "{checked} elements checked");
    }

    /// Training steps change the projector and LoRA, and leave every base weight
    /// bit-for-bit as loaded.
    #[test]
    fn training_steps_leave_base_weights_untouched() {
        let (params, model) = setup(DType::F32, &["q_proj", "k_proj"]);
        let snapshot = |m: &TrainableCaptioner| -> Vec<(String, Vec<u8>)> {
            m.llm()
                .frozen_tensors()
                .into_iter()
                .map(|(name, t)| {
                    let bytes = t
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect();
                    (name, bytes)
                })
                .collect()
        };
        let before = snapshot(&model);
        assert!(before.len() > 2 * 9);
        let projector_before = params.projector["2.weight"].as_tensor().copy().unwrap();

        let vars = params.trainable(true);
        assert!(
            vars.iter()
                .all(|(n, _)| n.starts_with("projector.") || n.starts_with("lora."))
        );
        let mut opt = AdamW::new(vars.clone(), AdamWSettings::default()).unwrap();
        let data = examples();
        let batch = model.collate(&data.iter().collect::<Vec<_>>()).unwrap();
        let mut losses = Vec::new();
        for _ in 0..3 {
            let loss = (model.loss_sum(&batch).unwrap() / batch.tokens as f64).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            let mut acc = GradAccumulator::new(vars.len());
            acc.add(&vars, &loss.backward().unwrap()).unwrap();
            let (grads, norm) = acc.finish(1.0).unwrap();
            assert!(norm > 0.0);
            opt.step(&grads, 1e-2).unwrap();
        }
        assert_eq!(before, snapshot(&model), "a base weight changed");
        let lora_b = params.lora.values().next().unwrap().1.as_tensor();
        assert!(
            lora_b
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        let moved = (params.projector["2.weight"].as_tensor() - projector_before)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(moved > 0.0);
        assert!(losses[2] < losses[0], "{losses:?}");
    }

    /// As `audiocap train` holds a GPU run: f32 projector and LoRA over bf16 frozen
    /// weights. Validation captions splice the f32 audio embedding into bf16 prompt
    /// embeddings (a dtype mismatch here once failed the CUDA bf16 run at its first
    /// validation).
    #[test]
    fn greedy_captions_work_over_bf16_frozen_weights() {
        let (_params, model) = setup_with(DType::F32, DType::BF16, &["q_proj", "k_proj"]);
        let caption = model.caption(&examples()[0].features, 3).unwrap();
        assert!(!caption.token_ids.is_empty() && caption.token_ids.len() <= 3);
        let data = examples();
        let batch = model.collate(&data.iter().collect::<Vec<_>>()).unwrap();
        let loss = model
            .loss_sum(&batch)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{loss}");
    }

    /// Scaling the projector's last layer by the ratio of the scales brings the audio
    /// embeddings to the decoder's token-embedding RMS.
    #[test]
    fn the_projector_scales_to_the_embedding_rms() {
        let (params, model) = setup(DType::F32, &["q_proj"]);
        let data = examples();
        let batch = model.collate(&data.iter().collect::<Vec<_>>()).unwrap();
        let (audio, tokens) = model.embedding_scales(&batch).unwrap();
        assert!(audio > 0.0 && tokens > 0.0);
        params.scale_projector_output(tokens / audio).unwrap();
        let (scaled, same) = model.embedding_scales(&batch).unwrap();
        assert!(
            (scaled - tokens).abs() < 1e-4 * tokens,
            "{scaled} vs {tokens}"
        );
        assert_eq!(same, tokens);
    }

    #[test]
    fn saved_adapter_and_projector_load_back() {
        let (params, _) = setup(DType::F32, &["q_proj", "k_proj"]);
        let dir = tempfile::tempdir().unwrap();
        params.save_adapter(&dir.path().join("adapter")).unwrap();
        params
            .save_projector(&dir.path().join("projector.safetensors"))
            .unwrap();
        let adapter = PeftAdapter::load(&dir.path().join("adapter")).unwrap();
        assert_eq!(adapter.modules.len(), 4);
        assert_eq!(adapter.config.r, 4);
        assert_eq!(adapter.config.lora_alpha, 8.0);
        // The same tensor names as the fixture adapters and projector.
        let fixture = PeftAdapter::load(&llm_dir().join("../adapters/a0")).unwrap();
        assert_eq!(
            adapter.modules.keys().collect::<Vec<_>>(),
            fixture.modules.keys().collect::<Vec<_>>()
        );
        let ours = crate::model::projector::Projector::load(
            &dir.path().join("projector.safetensors"),
            Pooling::Mean,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!((ours.in_dim(), ours.out_dim()), (48, 64));
        let reloaded = TrainableParams::init(
            &LlamaConfig::from_file(&llm_dir().join("config.json")).unwrap(),
            48,
            0,
            &settings(&["q_proj"]),
            &InitFrom {
                projector: Some(dir.path().join("projector.safetensors")),
                adapter: Some(dir.path().join("adapter")),
            },
            9,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(reloaded.lora.len(), 4);
    }
}
