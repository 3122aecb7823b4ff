//! The Llama 3 decoder (Hugging Face `LlamaForCausalLM`), with LoRA adapters on every
//! linear layer of the decoder blocks.
//!
//! Weights load by their published names from a Hugging Face model directory
//! (`config.json` plus `model.safetensors` or the shards of
//! `model.safetensors.index.json`), so Llama 3, 3.1 and 3.2 checkpoints load as
//! published. The numbers follow transformers' eager float32 path: RMSNorm in f32,
//! RoPE in the `rotate_half` convention with `inv_freq` computed in f32, attention
//! scores and softmax in f32, grouped-query attention by repeating key/value heads.
//!
//! Everything is built from differentiable candle tensor ops (no fused kernels
//! without a backward pass), so the forward pass can be trained through: gradients
//! reach the input embeddings and live LoRA parameters.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Module, Tensor};
use serde::{Deserialize, Serialize};

use super::lora::{Adaptation, LoraLinear};
use super::weights::{LoadError, Result, Weights, read_json_config};

const CONFIG_FILE: &str = "config.json";
const WEIGHTS_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

/// A Hugging Face Llama `config.json`: the fields that change the numbers. Unknown
/// fields are accepted and kept in `extra`; both the legacy RoPE style (top-level
/// `rope_theta` and `rope_scaling`) and the newer `rope_parameters` are read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// The epsilon of every RMSNorm.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Number of tokens of the embedding and the output layer.
    pub vocab_size: usize,
    /// The context length the model was trained for.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Whether the output layer shares the token embedding's weight.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether the attention projections have biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether the MLP projections have biases.
    #[serde(default)]
    pub mlp_bias: bool,
    /// The MLP activation; Llama uses `silu` and nothing else is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// One id or a list (Llama 3 instruct models stop at several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Legacy style: the RoPE base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Legacy style: the RoPE scaling (`null` for plain RoPE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    /// Newer style (transformers 5): base and scaling together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Everything else the file holds, kept so a re-saved config loses nothing.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_position_embeddings() -> usize {
    2048
}

/// A token id or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

/// `rope_scaling` / `rope_parameters` as written in `config.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RopeParameters {
    /// `default`, `linear` or `llama3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    /// The RoPE base (only in `rope_parameters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Fields of other rope types, kept but not used.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The rotary embedding a config asks for, resolved from either style.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `default`: plain RoPE.
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// `llama3` (Llama 3.1 / 3.2): low frequencies divided by `factor`, high ones
    /// kept, a smooth blend in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl LlamaConfig {
    /// Reads and validates `config.json`; every problem is reported at once, naming
    /// the file.
    pub fn from_file(file: &Path) -> Result<Self> {
        let config: Self = read_json_config(file)?;
        config
            .validate()
            .map_err(|problems| LoadError::config(file, problems.join("; ")))?;
        Ok(config)
    }

    /// Every reason this config cannot describe a working model.
    pub fn validate(&self) -> std::result::Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads();
        if kv_heads == 0 {
            problems.push("num_key_value_heads must be at least 1".into());
        } else if !heads.is_multiple_of(kv_heads) {
            problems.push(format!(
                "num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        match self.head_dim {
            Some(0) => problems.push("head_dim must be at least 1".into()),
            Some(d) if !d.is_multiple_of(2) => problems.push(format!("head_dim ({d}) must be even for RoPE")),
            Some(_) => {}
            None if heads == 0 => {}
            None if !self.hidden_size.is_multiple_of(heads) => problems.push(format!(
                "hidden_size ({}) is not a multiple of num_attention_heads ({heads}) and no head_dim is given",
                self.hidden_size
            )),
            None if !(self.hidden_size / heads).is_multiple_of(2) => problems.push(format!(
                "head_dim (hidden_size / num_attention_heads = {}) must be even for RoPE",
                self.hidden_size / heads
            )),
            None => {}
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            problems.push(format!(
                "rms_norm_eps must be positive, not {}",
                self.rms_norm_eps
            ));
        }
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            problems.push(format!(
                "hidden_act is {act:?}; Llama uses \"silu\" and nothing else is supported"
            ));
        }
        if let Err(problem) = self.rope() {
            problems.push(problem);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or_else(|| self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The ids that end a generation (possibly none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            None => Vec::new(),
            Some(TokenIds::One(id)) => vec![*id],
            Some(TokenIds::Many(ids)) => ids.clone(),
        }
    }

    /// The rotary embedding, from `rope_parameters` when present, else from the
    /// legacy `rope_theta` / `rope_scaling`.
    pub fn rope(&self) -> std::result::Result<Rope, String> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("rope_theta must be positive, not {theta}"));
        }
        let Some(params) = params else {
            return Ok(Rope {
                theta,
                scaling: RopeScaling::None,
            });
        };
        let rope_type = params
            .rope_type
            .as_deref()
            .or(params.legacy_type.as_deref())
            .unwrap_or("default");
        let positive = |name: &str, value: Option<f64>| match value {
            None => Err(format!("rope type {rope_type:?} needs `{name}`")),
            Some(v) if v.is_finite() && v > 0.0 => Ok(v),
            Some(v) => Err(format!("rope `{name}` must be positive, not {v}")),
        };
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: positive("factor", params.factor)?,
            },
            "llama3" => {
                let factor = positive("factor", params.factor)?;
                let low_freq_factor = positive("low_freq_factor", params.low_freq_factor)?;
                let high_freq_factor = positive("high_freq_factor", params.high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "rope high_freq_factor ({high_freq_factor}) must be larger than low_freq_factor ({low_freq_factor})"
                    ));
                }
                let original = match params.original_max_position_embeddings {
                    None => {
                        return Err(format!(
                            "rope type {rope_type:?} needs `original_max_position_embeddings`"
                        ));
                    }
                    Some(0) => {
                        return Err(
                            "rope original_max_position_embeddings must be at least 1".into()
                        );
                    }
                    Some(n) => n,
                };
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: original,
                }
            }
            other => {
                return Err(format!(
                    "unsupported rope type {other:?} (supported: \"default\", \"linear\", \"llama3\")"
                ));
            }
        };
        Ok(Rope { theta, scaling })
    }
}

impl Rope {
    /// The rotation frequencies of one head, `[head_dim / 2]`, computed in f32 step by
    /// step as transformers' `_compute_*_rope_parameters` do.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base = self.theta as f32;
        let dim = head_dim as f32;
        let plain = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim));
        match self.scaling {
            RopeScaling::None => plain.collect(),
            RopeScaling::Linear { factor } => plain.map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let factor = factor as f32;
                let low = low_freq_factor as f32;
                let high = high_freq_factor as f32;
                let old_context = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_context / low;
                let high_freq_wavelen = old_context / high;
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                plain
                    .map(|f| {
                        let wavelen = two_pi / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (old_context / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------

/// The precision numerically sensitive steps run in: f32, or f64 for an f64 model
/// (the trainer's gradient check runs the whole model in f64).
fn upcast(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `weight * (x / sqrt(mean(x²) + eps))`, normalised in f32.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", dim)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(upcast(x.dtype()))?;
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_rms = (variance + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv_rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)
    }
}

/// cos/sin of the rotary embedding for a run of positions, computed when needed
/// (no table over the whole context).
#[derive(Debug, Clone)]
struct RotaryEmbedding {
    inv_freq: Vec<f32>,
}

impl RotaryEmbedding {
    /// cos and sin `[len, head_dim]` for positions `start..start + len`, in `dtype`.
    fn cos_sin(
        &self,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * 2 * half);
        let mut sin = Vec::with_capacity(len * 2 * half);
        for position in start..start + len {
            let freqs: Vec<f32> = self.inv_freq.iter().map(|&f| position as f32 * f).collect();
            // `cat((freqs, freqs), -1)` as in transformers.
            for _ in 0..2 {
                cos.extend(freqs.iter().map(|f| f.cos()));
                sin.extend(freqs.iter().map(|f| f.sin()));
            }
        }
        let cos = Tensor::from_vec(cos, (len, 2 * half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, 2 * half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// `x * cos + rotate_half(x) * sin` for `x` [B, heads, S, D] and cos/sin [S, D].
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// [B, kv_heads, T, D] → [B, kv_heads * n_rep, T, D], each kv head repeated for the
/// query heads of its group.
fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv_heads, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv_heads, n_rep, t, d))?
        .reshape((b, kv_heads * n_rep, t, d))
}

/// Additive mask [S, past + S]: query `i` (at position `past + i`) sees every key up
/// to its own position.
fn causal_mask(past: usize, len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = past + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, total), device)
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn load(
        w: &Weights,
        cfg: &LlamaConfig,
        adaptation: &Adaptation,
        paths: &mut Vec<String>,
    ) -> Result<Self> {
        let (hidden, head_dim) = (cfg.hidden_size, cfg.head_dim());
        let q_out = cfg.num_attention_heads * head_dim;
        let kv_out = cfg.num_key_value_heads() * head_dim;
        let bias = cfg.attention_bias;
        let mut linear = |name: &str, in_dim: usize, out_dim: usize| {
            let w = w.pp(name);
            paths.push(w.prefix().to_string());
            adaptation.linear(&w, in_dim, out_dim, bias)
        };
        Ok(Self {
            q_proj: linear("q_proj", hidden, q_out)?,
            k_proj: linear("k_proj", hidden, kv_out)?,
            v_proj: linear("v_proj", hidden, kv_out)?,
            o_proj: linear("o_proj", q_out, hidden)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads(),
            head_dim,
        })
    }

    /// Attends `x` [B, S, H] to the cached keys/values plus its own; returns the
    /// output and the keys/values including the new positions (before repetition).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        past: Option<&(Tensor, Tensor)>,
    ) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
        let (b, s, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| {
            t.reshape((b, s, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(x)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        let (k, v) = match past {
            Some((past_k, past_v)) => (
                Tensor::cat(&[past_k, &k], 2)?,
                Tensor::cat(&[past_v, &v], 2)?,
            ),
            None => (k, v),
        };
        let n_rep = self.num_heads / self.num_kv_heads;
        let keys = repeat_kv(&k, n_rep)?;
        let values = repeat_kv(&v, n_rep)?;

        // Scores and softmax in f32 whatever the compute dtype.
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = q
            .to_dtype(upcast(keys.dtype()))?
            .matmul(&keys.to_dtype(upcast(keys.dtype()))?.t()?)?
            .affine(scale, 0.0)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(values.dtype())?;
        let out = probs.matmul(&values.contiguous()?)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.head_dim))?;
        Ok((self.o_proj.forward(&out)?, (k, v)))
    }
}

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl Mlp {
    fn load(
        w: &Weights,
        cfg: &LlamaConfig,
        adaptation: &Adaptation,
        paths: &mut Vec<String>,
    ) -> Result<Self> {
        let (hidden, inter, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let mut linear = |name: &str, in_dim: usize, out_dim: usize| {
            let w = w.pp(name);
            paths.push(w.prefix().to_string());
            adaptation.linear(&w, in_dim, out_dim, bias)
        };
        Ok(Self {
            gate_proj: linear("gate_proj", hidden, inter)?,
            up_proj: linear("up_proj", hidden, inter)?,
            down_proj: linear("down_proj", inter, hidden)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(
        w: &Weights,
        cfg: &LlamaConfig,
        adaptation: &Adaptation,
        paths: &mut Vec<String>,
    ) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), cfg.hidden_size, eps)?,
            self_attn: SelfAttention::load(&w.pp("self_attn"), cfg, adaptation, paths)?,
            post_attention_layernorm: RmsNorm::load(
                &w.pp("post_attention_layernorm"),
                cfg.hidden_size,
                eps,
            )?,
            mlp: Mlp::load(&w.pp("mlp"), cfg, adaptation, paths)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        past: Option<&(Tensor, Tensor)>,
    ) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
        let (attn, kv) =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, cos, sin, mask, past)?;
        let x = (x + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok(((x + mlp)?, kv))
    }
}

// ---------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------

/// Keys and values of the positions seen so far, per layer, for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values [B, kv_heads, len, head_dim].
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(config: &LlamaConfig) -> Self {
        Self {
            layers: vec![None; config.num_hidden_layers],
            len: 0,
        }
    }

    /// Number of positions seen; the next token is at this position.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|layer| *layer = None);
        self.len = 0;
    }
}

/// Hugging Face `LlamaForCausalLM`.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: candle_nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: candle_nn::Linear,
    rotary: RotaryEmbedding,
    linear_paths: Vec<String>,
    dtype: DType,
    device: Device,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Llama {
    /// Loads a Hugging Face model directory: `config.json` and `model.safetensors`
    /// or the shards named by `model.safetensors.index.json`, converted to `dtype`
    /// (f32, f16 or bf16) on `device`, with `adaptation` applied to every linear
    /// layer of the decoder blocks.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        adaptation: &Adaptation,
    ) -> Result<Self> {
        let (config, weights) = open_checkpoint(dir, dtype, device)?;
        Self::from_weights(config, &weights, adaptation)
    }

    /// Builds the model from `weights` holding the published tensor names
    /// (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, ...).
    /// `config` must have passed [`LlamaConfig::validate`].
    pub fn from_weights(
        config: LlamaConfig,
        weights: &Weights,
        adaptation: &Adaptation,
    ) -> Result<Self> {
        let origin = weights.origin().to_path_buf();
        let dtype = weights.dtype();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(LoadError::config(
                origin,
                format!("compute dtype {dtype:?} is not a float type (use f32, f16 or bf16)"),
            ));
        }
        let rope = config
            .rope()
            .map_err(|message| LoadError::config(origin.join(CONFIG_FILE), message))?;
        let (hidden, vocab) = (config.hidden_size, config.vocab_size);
        let model = weights.pp("model");
        let embed_weight = model.pp("embed_tokens").get("weight", (vocab, hidden))?;
        let mut linear_paths = Vec::new();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                DecoderLayer::load(
                    &model.pp("layers").pp(i),
                    &config,
                    adaptation,
                    &mut linear_paths,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&model.pp("norm"), hidden, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings || !weights.contains("lm_head.weight") {
            candle_nn::Linear::new(embed_weight.clone(), None)
        } else {
            weights.pp("lm_head").linear(hidden, vocab, false)?
        };
        adaptation.check_all_applied(&linear_paths, &origin)?;
        Ok(Self {
            embed_tokens: candle_nn::Embedding::new(embed_weight, hidden),
            layers,
            norm,
            lm_head,
            rotary: RotaryEmbedding {
                inv_freq: rope.inv_freq(config.head_dim()),
            },
            linear_paths,
            dtype,
            device: weights.device().clone(),
            config,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The compute dtype of the weights and hidden states.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Module paths of every linear layer LoRA can adapt
    /// (`model.layers.0.self_attn.q_proj`, ...).
    pub fn linear_module_paths(&self) -> &[String] {
        &self.linear_paths
    }

    /// Every frozen tensor of the model by its published name (LoRA paths excluded):
    /// what a trainer checks it never modified.
    pub fn frozen_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.embeddings().clone(),
        )];
        let mut linear = |name: String, l: &LoraLinear| {
            out.push((format!("{name}.weight"), l.base.weight().clone()));
            if let Some(b) = l.base.bias() {
                out.push((format!("{name}.bias"), b.clone()));
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &layer.self_attn;
            for (n, l) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                linear(format!("{p}.self_attn.{n}"), l);
            }
            let m = &layer.mlp;
            for (n, l) in [
                ("gate_proj", &m.gate_proj),
                ("up_proj", &m.up_proj),
                ("down_proj", &m.down_proj),
            ] {
                linear(format!("{p}.mlp.{n}"), l);
            }
        }
        out.push(("lm_head.weight".to_string(), self.lm_head.weight().clone()));
        for (i, layer) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                layer.input_layernorm.weight.clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.clone()));
        out
    }

    /// Token embeddings: ids [B, S] (u32) → [B, S, H].
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// Runs the decoder blocks over `embeds` [B, S, H] and returns the final-normed
    /// hidden states [B, S, H]. With a cache, the new positions follow the cached ones,
    /// attend to all of them, and are appended to the cache.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (_, len, hidden) = embeds.dims3()?;
        if hidden != self.config.hidden_size {
            candle_core::bail!(
                "embeddings have width {hidden}, the model {}",
                self.config.hidden_size
            );
        }
        if len == 0 {
            candle_core::bail!("cannot run the decoder over an empty sequence");
        }
        let past = match &cache {
            Some(cache) if cache.layers.len() != self.layers.len() => candle_core::bail!(
                "the KV cache has {} layers, the model {}",
                cache.layers.len(),
                self.layers.len()
            ),
            Some(cache) => cache.len,
            None => 0,
        };
        let (cos, sin) = self.rotary.cos_sin(past, len, self.dtype, &self.device)?;
        let mask = if len > 1 {
            Some(causal_mask(past, len, &self.device)?)
        } else {
            None
        };
        let mut x = embeds.to_dtype(self.dtype)?;
        let mut new_kv = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_past = cache.as_ref().and_then(|c| c.layers[i].as_ref());
            let (y, kv) = layer.forward(&x, &cos, &sin, mask.as_ref(), layer_past)?;
            x = y;
            new_kv.push(Some(kv));
        }
        // The cache changes only once every layer has succeeded.
        if let Some(cache) = cache {
            cache.layers = new_kv;
            cache.len += len;
        }
        self.norm.forward(&x)
    }

    /// The output layer: hidden states [.., H] → logits [.., vocab], in f32.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let logits = super::frozen::forward(&self.lm_head, hidden)?;
        logits.to_dtype(upcast(logits.dtype()))
    }

    /// ids [B, S] → logits [B, S, vocab] in f32, through the cache when given.
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.forward_embeds(&self.embed(ids)?, cache)?;
        self.logits(&hidden)
    }
}

/// The safetensors files of a model directory: `model.safetensors`, else every shard
/// named in `model.safetensors.index.json`.
/// A Hugging Face model directory's validated config and its (memory-mapped) tensors,
/// without building the model: what the exporter streams weights from.
pub fn open_checkpoint(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(LlamaConfig, Weights)> {
    let config = LlamaConfig::from_file(&dir.join(CONFIG_FILE))?;
    let files = weight_files(dir)?;
    let weights = Weights::from_safetensors(dir, &files, dtype, device)?;
    Ok((config, weights))
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_file = dir.join(INDEX_FILE);
    if !index_file.is_file() {
        return Err(LoadError::io(
            single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} is in the model directory"),
            ),
        ));
    }
    let index: ShardIndex = read_json_config(&index_file)?;
    let shards: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
    if shards.is_empty() {
        return Err(LoadError::config(&index_file, "weight_map is empty"));
    }
    Ok(shards.into_iter().map(|shard| dir.join(shard)).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Var;

    use super::*;
    use crate::model::lora::{AdapterConfig, LoraModule, PeftAdapter};
    use crate::test_util::{max_abs_diff, random};

    /// A fresh, empty directory under the system temp dir.
    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("audiocap-llama-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A tiny GQA model: hidden 32, 4 query heads, 2 kv heads, 2 layers, vocab 50.
    fn tiny_config(extra: serde_json::Value) -> serde_json::Value {
        let mut config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "vocab_size": 50,
            "max_position_embeddings": 64,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "rope_theta": 10000.0,
            "rope_scaling": null,
            "tie_word_embeddings": false
        });
        for (key, value) in extra.as_object().unwrap() {
            config[key] = value.clone();
        }
        config
    }

    /// Random weights with the published names for `config`, in bf16 like real
    /// checkpoints.
    fn tiny_weights(config: &LlamaConfig, with_lm_head: bool) -> HashMap<String, Tensor> {
        let (h, i, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let q = config.num_attention_heads * config.head_dim();
        let kv = config.num_key_value_heads() * config.head_dim();
        let mut seed = 0;
        let mut tensors = HashMap::new();
        let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| {
            seed += 1;
            let t = random(shape, seed, scale, offset);
            tensors.insert(name, t.to_dtype(DType::BF16).unwrap());
        };
        put("model.embed_tokens.weight".into(), &[v, h], 2.0, 0.0);
        put("model.norm.weight".into(), &[h], 0.4, 1.0);
        put("lm_head.weight".into(), &[v, h], 0.4, 0.0);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            put(format!("{p}.input_layernorm.weight"), &[h], 0.4, 1.0);
            put(
                format!("{p}.post_attention_layernorm.weight"),
                &[h],
                0.4,
                1.0,
            );
            put(format!("{p}.self_attn.q_proj.weight"), &[q, h], 0.6, 0.0);
            put(format!("{p}.self_attn.k_proj.weight"), &[kv, h], 0.6, 0.0);
            put(format!("{p}.self_attn.v_proj.weight"), &[kv, h], 0.6, 0.0);
            put(format!("{p}.self_attn.o_proj.weight"), &[h, q], 0.6, 0.0);
            put(format!("{p}.mlp.gate_proj.weight"), &[i, h], 0.6, 0.0);
            put(format!("{p}.mlp.up_proj.weight"), &[i, h], 0.6, 0.0);
            put(format!("{p}.mlp.down_proj.weight"), &[h, i], 0.6, 0.0);
        }
        if !with_lm_head {
            tensors.remove("lm_head.weight");
        }
        tensors
    }

    /// Writes `config.json` and the weights, in one file or in `shards` shards with an
    /// index. Returns the directory.
    fn write_model(
        name: &str,
        config: &serde_json::Value,
        tensors: &HashMap<String, Tensor>,
        shards: usize,
    ) -> PathBuf {
        let dir = temp_dir(name);
        std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
        if shards <= 1 {
            candle_core::safetensors::save(tensors, dir.join(WEIGHTS_FILE)).unwrap();
            return dir;
        }
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut weight_map = serde_json::Map::new();
        for shard in 0..shards {
            let file = format!("model-{:05}-of-{shards:05}.safetensors", shard + 1);
            let part: HashMap<String, Tensor> = names
                .iter()
                .enumerate()
                .filter(|(k, _)| k % shards == shard)
                .map(|(_, &n)| (n.clone(), tensors[n].clone()))
                .collect();
            for n in part.keys() {
                weight_map.insert(n.clone(), file.clone().into());
            }
            candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        dir
    }

    fn parse(config: serde_json::Value) -> LlamaConfig {
        serde_json::from_value(config).unwrap()
    }

    fn ids(rows: &[&[u32]]) -> Tensor {
        let seq = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), seq), &Device::Cpu).unwrap()
    }

    const PROMPT: [&[u32]; 2] = [&[1, 7, 3, 44, 9, 12, 30, 5], &[1, 49, 0, 18, 18, 2, 33, 6]];

    #[test]
    fn parses_legacy_config() {
        // The fixture's config.json (transformers 4.40 style).
        let config = parse(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 128000,
            "eos_token_id": [128001, 128009], "hidden_act": "silu", "hidden_size": 64,
            "initializer_range": 0.02, "intermediate_size": 128,
            "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama",
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "pad_token_id": null, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "tie_word_embeddings": false, "vocab_size": 128256, "rope_theta": 500000.0,
            "rope_scaling": null, "torch_dtype": "bfloat16"
        }));
        config.validate().unwrap();
        assert_eq!(config.head_dim(), 16);
        assert_eq!(config.num_key_value_heads(), 2);
        assert_eq!(config.eos_token_ids(), vec![128001, 128009]);
        assert_eq!(config.bos_token_id, Some(128000));
        assert!(!config.tie_word_embeddings);
        assert_eq!(
            config.rope().unwrap(),
            Rope {
                theta: 500000.0,
                scaling: RopeScaling::None
            }
        );
        assert_eq!(config.extra["torch_dtype"], "bfloat16");

        // Llama-3-8B: no num_key_value_heads default needed, 8 kv heads.
        let mut llama3_8b = tiny_config(serde_json::json!({
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 8192, "rope_theta": 500000.0,
            "eos_token_id": 128001
        }));
        parse(llama3_8b.clone()).validate().unwrap();
        assert_eq!(parse(llama3_8b.clone()).head_dim(), 128);
        assert_eq!(parse(llama3_8b.clone()).eos_token_ids(), vec![128001]);
        // Without num_key_value_heads every head has its own keys.
        llama3_8b
            .as_object_mut()
            .unwrap()
            .remove("num_key_value_heads");
        assert_eq!(parse(llama3_8b).num_key_value_heads(), 32);
    }

    #[test]
    fn parses_legacy_llama3_rope_scaling() {
        // Llama 3.1 as published, and with the older `type` key that some tools write
        // next to (or instead of) `rope_type`.
        for scaling in [
            serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
            serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "type": "llama3",
                "rope_type": "llama3"}),
            serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "type": "llama3"}),
        ] {
            let config = parse(tiny_config(serde_json::json!({
                "rope_theta": 500000.0, "rope_scaling": scaling,
                "max_position_embeddings": 131072
            })));
            config.validate().unwrap();
            assert_eq!(
                config.rope().unwrap(),
                Rope {
                    theta: 500000.0,
                    scaling: RopeScaling::Llama3 {
                        factor: 8.0,
                        low_freq_factor: 1.0,
                        high_freq_factor: 4.0,
                        original_max_position_embeddings: 8192
                    }
                }
            );
        }
    }

    #[test]
    fn parses_rope_parameters_style() {
        // Llama 3.2 1B as transformers 5 writes it: tied, head_dim given, no top-level
        // rope_theta.
        let config = parse(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000,
            "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
            "hidden_size": 2048, "intermediate_size": 8192,
            "max_position_embeddings": 131072, "model_type": "llama",
            "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {"factor": 32.0, "high_freq_factor": 4.0,
                "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
                "rope_theta": 500000.0, "rope_type": "llama3"},
            "tie_word_embeddings": true, "dtype": "bfloat16", "vocab_size": 128256
        }));
        config.validate().unwrap();
        assert!(config.tie_word_embeddings);
        assert_eq!(config.head_dim(), 64);
        assert_eq!(
            config.rope().unwrap(),
            Rope {
                theta: 500000.0,
                scaling: RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192
                }
            }
        );
        // Plain RoPE in the new style; linear scaling.
        let plain = parse(tiny_config(serde_json::json!({
            "rope_theta": null,
            "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}
        })));
        assert_eq!(
            plain.rope().unwrap(),
            Rope {
                theta: 123.0,
                scaling: RopeScaling::None
            }
        );
        let linear = parse(tiny_config(serde_json::json!({
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}
        })));
        assert_eq!(
            linear.rope().unwrap().scaling,
            RopeScaling::Linear { factor: 2.0 }
        );
        let inv = linear.rope().unwrap().inv_freq(4);
        assert_eq!(inv, vec![0.5, 0.05]);
    }

    #[test]
    fn llama3_inv_freq_matches_hand_derivation() {
        // Llama 3.1 8B: theta 500000, head_dim 128, factor 8, low 1, high 4, old
        // context 8192. Wavelength bounds: 8192 / 1 and 8192 / 4 = 2048.
        let rope = Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let inv = rope.inv_freq(128);
        assert_eq!(inv.len(), 64);
        let plain = |i: usize| 500000f64.powf(-((2 * i) as f64) / 128.0);
        let tau = 2.0 * std::f64::consts::PI;
        // A medium frequency: blend (1 - s) f / 8 + s f with s = (8192 / λ - 1) / 3.
        let medium = |i: usize| {
            let f = plain(i);
            let s = (8192.0 / (tau / f) - 1.0) / 3.0;
            (1.0 - s) * f / 8.0 + s * f
        };
        let expected = [
            // i = 0: f = 1, λ = 2π, high frequency, kept.
            (0, 1.0),
            // i = 28: f = 500000^(-7/16) ≈ 3.2114e-3, λ ≈ 1956.5 < 2048, kept.
            (28, plain(28)),
            // i = 29: λ ≈ 2401.7, s ≈ 0.8036.
            (29, medium(29)),
            // i = 32: f = 1/√500000, λ = 2π√500000 ≈ 4442.9, s ≈ 0.2813,
            // f' = f (0.7187 / 8 + 0.2813) ≈ 5.2485e-4.
            (
                32,
                (1.0 / 500000f64.sqrt()) * ((1.0 - 0.281_282_6) / 8.0 + 0.281_282_6),
            ),
            (34, medium(34)),
            // i = 35: λ ≈ 8218.7 > 8192, divided by 8.
            (35, plain(35) / 8.0),
            // i = 63: f ≈ 2.4551e-6, λ ≈ 2.56e6, divided by 8 ≈ 3.0689e-7.
            (63, plain(63) / 8.0),
        ];
        for (i, want) in expected {
            let got = inv[i] as f64;
            assert!(
                ((got - want) / want).abs() < 2e-6,
                "inv_freq[{i}] = {got:e}, expected {want:e}"
            );
        }
        assert!((inv[32] as f64 - 5.248_461_6e-4).abs() < 1e-9);
        // Plain RoPE is the unscaled frequency everywhere.
        let default = Rope {
            theta: 500000.0,
            scaling: RopeScaling::None,
        }
        .inv_freq(128);
        for i in [0, 28, 35, 63] {
            assert!(((default[i] as f64 - plain(i)) / plain(i)).abs() < 2e-6);
        }
    }

    #[test]
    fn rejects_bad_configs() {
        let cases = [
            (
                serde_json::json!({"num_key_value_heads": 3}),
                "num_attention_heads (4) is not a multiple of num_key_value_heads (3)",
            ),
            (
                serde_json::json!({"hidden_size": 30}),
                "hidden_size (30) is not a multiple of num_attention_heads (4)",
            ),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
                "unsupported rope type \"yarn\"",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
                "unsupported rope type \"dynamic\"",
            ),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
                "needs `low_freq_factor`",
            ),
            (
                serde_json::json!({"hidden_act": "gelu"}),
                "hidden_act is \"gelu\"",
            ),
            (
                serde_json::json!({"num_hidden_layers": 0}),
                "num_hidden_layers must be at least 1",
            ),
            (
                serde_json::json!({"head_dim": 7}),
                "head_dim (7) must be even",
            ),
            (serde_json::json!({"vocab_size": "many"}), "invalid type"),
        ];
        for (i, (change, message)) in cases.into_iter().enumerate() {
            let dir = temp_dir(&format!("bad-config-{i}"));
            std::fs::write(dir.join(CONFIG_FILE), tiny_config(change).to_string()).unwrap();
            let err = Llama::load(&dir, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap_err();
            assert!(matches!(err, LoadError::Config { .. }), "{err}");
            let text = err.to_string();
            assert!(
                text.starts_with(&dir.join(CONFIG_FILE).display().to_string()),
                "{text}"
            );
            assert!(text.contains(message), "{text}");
            let _ = std::fs::remove_dir_all(&dir);
        }
        // All problems at once.
        let both = parse(tiny_config(serde_json::json!({
            "num_key_value_heads": 3, "rms_norm_eps": 0.0
        })));
        assert_eq!(both.validate().unwrap_err().len(), 2);
    }

    #[test]
    fn single_file_and_shards_load_alike() {
        let config_json = tiny_config(serde_json::json!({}));
        let config = parse(config_json.clone());
        let tensors = tiny_weights(&config, true);
        let single = write_model("single", &config_json, &tensors, 1);
        let sharded = write_model("sharded", &config_json, &tensors, 3);
        let a = Llama::load(&single, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let b = Llama::load(&sharded, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let la = a.forward_ids(&ids(&PROMPT), None).unwrap();
        let lb = b.forward_ids(&ids(&PROMPT), None).unwrap();
        assert_eq!(la.dims(), &[2, 8, 50]);
        assert_eq!(max_abs_diff(&la, &lb), 0.0);
        assert_eq!(a.linear_module_paths().len(), 14);
        assert_eq!(
            a.linear_module_paths()[0],
            "model.layers.0.self_attn.q_proj"
        );
        let _ = std::fs::remove_dir_all(&single);
        let _ = std::fs::remove_dir_all(&sharded);
    }

    #[test]
    fn tied_embeddings_serve_as_output_layer() {
        for (tie, name) in [(true, "tied"), (false, "no-lm-head")] {
            let config_json = tiny_config(serde_json::json!({"tie_word_embeddings": tie}));
            let config = parse(config_json.clone());
            let tensors = tiny_weights(&config, false);
            let dir = write_model(name, &config_json, &tensors, 1);
            let model = Llama::load(&dir, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
            let hidden = model.forward_embeds(&model.embed(&ids(&PROMPT)).unwrap(), None);
            let hidden = hidden.unwrap();
            let embed = tensors["model.embed_tokens.weight"]
                .to_dtype(DType::F32)
                .unwrap();
            let expected = hidden.broadcast_matmul(&embed.t().unwrap()).unwrap();
            assert!(max_abs_diff(&model.logits(&hidden).unwrap(), &expected) < 1e-5);
            let _ = std::fs::remove_dir_all(&dir);
        }
        // A tied config ignores a stray lm_head.weight, as transformers does.
        let config_json = tiny_config(serde_json::json!({"tie_word_embeddings": true}));
        let config = parse(config_json.clone());
        let with_head = write_model("tied-stray", &config_json, &tiny_weights(&config, true), 1);
        let without_head =
            write_model("tied-plain", &config_json, &tiny_weights(&config, false), 1);
        let a = Llama::load(&with_head, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let b = Llama::load(&without_head, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let la = a.forward_ids(&ids(&PROMPT), None).unwrap();
        let lb = b.forward_ids(&ids(&PROMPT), None).unwrap();
        assert_eq!(max_abs_diff(&la, &lb), 0.0);
        let _ = std::fs::remove_dir_all(&with_head);
        let _ = std::fs::remove_dir_all(&without_head);
    }

    #[test]
    fn kv_cache_decoding_matches_full_pass() {
        // llama3 rope with a small old context so that all three frequency bands occur.
        let config_json = tiny_config(serde_json::json!({
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        }));
        let config = parse(config_json.clone());
        let dir = write_model("kv-cache", &config_json, &tiny_weights(&config, true), 1);
        let model = Llama::load(&dir, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let prompt = ids(&PROMPT);
        let full = model.forward_ids(&prompt, None).unwrap();

        // One token at a time.
        let mut cache = KvCache::new(model.config());
        let mut steps = Vec::new();
        for t in 0..8 {
            assert_eq!(cache.len(), t);
            let step = prompt.narrow(1, t, 1).unwrap();
            steps.push(model.forward_ids(&step, Some(&mut cache)).unwrap());
        }
        assert_eq!(cache.len(), 8);
        let stepwise = Tensor::cat(&steps, 1).unwrap();
        let err = max_abs_diff(&full, &stepwise);
        assert!(err < 1e-5, "step-by-step logits differ by {err}");

        // A prefill of 3, then a block of 5 (causal within the block, all of the past).
        cache.reset();
        assert!(cache.is_empty());
        let head = model
            .forward_ids(&prompt.narrow(1, 0, 3).unwrap(), Some(&mut cache))
            .unwrap();
        let tail = model
            .forward_ids(&prompt.narrow(1, 3, 5).unwrap(), Some(&mut cache))
            .unwrap();
        let chunked = Tensor::cat(&[head, tail], 1).unwrap();
        let err = max_abs_diff(&full, &chunked);
        assert!(err < 1e-5, "chunked logits differ by {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn causality_and_batch_independence() {
        let config_json = tiny_config(serde_json::json!({}));
        let config = parse(config_json.clone());
        let dir = write_model("causal", &config_json, &tiny_weights(&config, true), 1);
        let model = Llama::load(&dir, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let both = model.forward_ids(&ids(&PROMPT), None).unwrap();
        // A row alone gives what it gave in the batch; a prefix gives the same logits
        // as the prefix of the whole.
        let first = model.forward_ids(&ids(&[PROMPT[0]]), None).unwrap();
        assert!(max_abs_diff(&both.narrow(0, 0, 1).unwrap(), &first) < 1e-5);
        let prefix = model.forward_ids(&ids(&[&PROMPT[1][..5]]), None).unwrap();
        let whole = both.narrow(0, 1, 1).unwrap().narrow(1, 0, 5).unwrap();
        assert!(max_abs_diff(&whole, &prefix) < 1e-5);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bf16_compute_stays_close_to_f32() {
        let config_json = tiny_config(serde_json::json!({}));
        let config = parse(config_json.clone());
        let dir = write_model("bf16", &config_json, &tiny_weights(&config, true), 1);
        let f32_model = Llama::load(&dir, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let bf16_model = Llama::load(&dir, DType::BF16, &Device::Cpu, &Adaptation::none()).unwrap();
        assert_eq!(bf16_model.dtype(), DType::BF16);
        let reference = f32_model.forward_ids(&ids(&PROMPT), None).unwrap();
        let hidden = bf16_model
            .forward_embeds(&bf16_model.embed(&ids(&PROMPT)).unwrap(), None)
            .unwrap();
        assert_eq!(hidden.dtype(), DType::BF16);
        let logits = bf16_model.logits(&hidden).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let scale: f32 = reference
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        let err = max_abs_diff(&reference, &logits);
        assert!(
            err < 0.05 * scale,
            "bf16 logits differ by {err} (scale {scale})"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gradients_reach_embeddings_and_live_lora() {
        let config_json = tiny_config(serde_json::json!({}));
        let config = parse(config_json.clone());
        let dir = write_model("grad", &config_json, &tiny_weights(&config, true), 1);
        let a = Var::from_tensor(&random(&[2, 32], 100, 0.5, 0.0)).unwrap();
        let b = Var::from_tensor(&random(&[16, 2], 101, 0.5, 0.0)).unwrap();
        let adapter_config: AdapterConfig = serde_json::from_value(serde_json::json!({
            "r": 2, "lora_alpha": 4.0, "target_modules": ["k_proj"]
        }))
        .unwrap();
        let path = "model.layers.1.self_attn.k_proj".to_string();
        let adapter = PeftAdapter {
            dir: PathBuf::from("adapter"),
            config: adapter_config,
            modules: [(
                path.clone(),
                LoraModule {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale: 2.0,
                },
            )]
            .into_iter()
            .collect(),
        };
        let live = Adaptation::live(&[&adapter]);
        let model = Llama::load(&dir, DType::F32, &Device::Cpu, &live).unwrap();
        let plain = Llama::load(&dir, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let folded = Llama::load(
            &dir,
            DType::F32,
            &Device::Cpu,
            &Adaptation::folded(&[&adapter]).unwrap(),
        )
        .unwrap();

        let embeds = Var::from_tensor(&model.embed(&ids(&PROMPT)).unwrap()).unwrap();
        let logits = model
            .logits(&model.forward_embeds(embeds.as_tensor(), None).unwrap())
            .unwrap();
        let folded_logits = folded
            .logits(&folded.forward_embeds(embeds.as_tensor(), None).unwrap())
            .unwrap();
        let plain_logits = plain
            .logits(&plain.forward_embeds(embeds.as_tensor(), None).unwrap())
            .unwrap();
        assert!(max_abs_diff(&logits, &folded_logits) < 1e-4);
        assert!(max_abs_diff(&logits, &plain_logits) > 1e-3);

        let loss = logits.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in [("embeds", &embeds), ("lora A", &a), ("lora B", &b)] {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}"));
            let norm: f32 = grad.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm.is_finite() && norm > 0.0, "{name}: {norm}");
        }

        // An adapter for a module the model does not have is an error.
        let mut stray = adapter.clone();
        let module = stray.modules.remove(&path).unwrap();
        stray
            .modules
            .insert("model.layers.7.self_attn.k_proj".into(), module);
        let err = Llama::load(&dir, DType::F32, &Device::Cpu, &Adaptation::live(&[&stray]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.layers.7.self_attn.k_proj"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn weight_errors_name_file_and_tensor() {
        let config_json = tiny_config(serde_json::json!({}));
        let config = parse(config_json.clone());

        let mut missing = tiny_weights(&config, true);
        missing.remove("model.layers.1.mlp.up_proj.weight");
        let dir = write_model("missing-tensor", &config_json, &missing, 3);
        let err = Llama::load(&dir, DType::F32, &Device::Cpu, &Adaptation::none())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
            "{err}"
        );
        assert!(err.starts_with(&dir.display().to_string()), "{err}");
        let _ = std::fs::remove_dir_all(&dir);

        let mut wrong = tiny_weights(&config, true);
        wrong.insert(
            "model.layers.0.self_attn.k_proj.weight".into(),
            random(&[32, 32], 1, 1.0, 0.0),
        );
        let dir = write_model("wrong-shape", &config_json, &wrong, 1);
        let err = Llama::load(&dir, DType::F32, &Device::Cpu, &Adaptation::none())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}: tensor `model.layers.0.self_attn.k_proj.weight` has shape [32, 32], expected [16, 32]",
                dir.join(WEIGHTS_FILE).display()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);

        // No weights at all.
        let dir = temp_dir("no-weights");
        std::fs::write(dir.join(CONFIG_FILE), config_json.to_string()).unwrap();
        let err = Llama::load(&dir, DType::F32, &Device::Cpu, &Adaptation::none())
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither model.safetensors nor"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
