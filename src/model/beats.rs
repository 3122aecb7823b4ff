//! The BEATs audio encoder (Chen et al., 2022; microsoft/unilm `beats/`), frozen.
//!
//! fbank [B, T, 128] → 16×16 patch embedding → LayerNorm → (post_extract_proj) →
//! transformer encoder (convolutional positional embedding, relative position bias
//! shared from layer 0, optionally gated) → features [B, P, D] with patches
//! time-major (`t * 8 + f`).
//!
//! Weights load by their published names from the released checkpoints (a torch zip
//! `{"cfg": dict, "model": state_dict}`) or from safetensors with the cfg beside them.
//! Every switch of the reference code is honoured: `deep_norm` or `layer_norm_first`,
//! gated (`gru_rel_pos`) or plain relative position bias, `post_extract_proj` present
//! or absent, `conv_bias`, the activation function, and fine-tuned checkpoints
//! (`finetuned_model`): their `predictor` head gives sound-event tag probabilities
//! ([`Beats::tag_probabilities`]) beside the features.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear};
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::weights::{LoadError, Result, Weights};

/// LayerNorm epsilon of the reference (`torch.nn.LayerNorm` default).
const LAYER_NORM_EPS: f64 = 1e-5;
/// The reference attention subtracts the row maximum and rescales by this constant
/// for numerical stability (`alpha = 32` in `MultiheadAttention.forward`).
const ATTENTION_ALPHA: f64 = 32.0;

/// How LayerNorm and softmax are computed. candle's fused kernels
/// (`candle_nn::ops::layer_norm`, `softmax_last_dim`) have no backward pass: their
/// output is a new leaf, so no gradient reaches anything before them. Training needs
/// the same formulas composed of differentiable tensor ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    /// The fused kernels: inference (the default).
    Fused,
    /// Composed ops that backpropagate: training ([`Beats::differentiable`]).
    Differentiable,
}

impl Kernels {
    fn layer_norm(self, norm: &LayerNorm, x: &Tensor) -> candle_core::Result<Tensor> {
        match (self, norm.bias()) {
            (Kernels::Fused, _) => norm.forward(x),
            (Kernels::Differentiable, Some(bias)) => {
                candle_nn::ops::layer_norm_slow(x, norm.weight(), bias, LAYER_NORM_EPS as f32)
            }
            (Kernels::Differentiable, None) => candle_nn::ops::layer_norm_slow(
                x,
                norm.weight(),
                &norm.weight().zeros_like()?,
                LAYER_NORM_EPS as f32,
            ),
        }
    }

    fn softmax_last_dim(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Kernels::Differentiable => candle_nn::ops::softmax(x, D::Minus1),
            Kernels::Fused => candle_nn::ops::softmax_last_dim(x),
        }
    }
}

/// `BEATsConfig`, as stored in the checkpoint's `cfg` dict. Defaults are the
/// reference class's; unknown keys are accepted as the reference accepts them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BeatsConfig {
    /// Patch size of the patch embedding (square, stride = size).
    pub input_patch_size: usize,
    /// Patch embedding dimension.
    pub embed_dim: usize,
    /// Whether the patch embedding convolution has a bias.
    pub conv_bias: bool,
    pub encoder_layers: usize,
    pub encoder_embed_dim: usize,
    pub encoder_ffn_embed_dim: usize,
    pub encoder_attention_heads: usize,
    /// `gelu`, `gelu_accurate`, `relu`, `tanh`, `linear` or `glu`.
    pub activation_fn: String,
    pub layer_norm_first: bool,
    pub deep_norm: bool,
    /// Width of the convolutional positional embedding.
    pub conv_pos: usize,
    pub conv_pos_groups: usize,
    pub relative_position_embedding: bool,
    pub num_buckets: usize,
    pub max_distance: usize,
    /// Gate the relative position bias by the query (BEATs' gated relative position bias).
    pub gru_rel_pos: bool,
    /// A fine-tuned (tagging) checkpoint: it carries a `predictor` head
    /// (`predictor_class` labels) over the encoder's patches.
    pub finetuned_model: bool,
    pub predictor_class: usize,
}

impl Default for BeatsConfig {
    fn default() -> Self {
        Self {
            input_patch_size: 16,
            embed_dim: 512,
            conv_bias: false,
            encoder_layers: 12,
            encoder_embed_dim: 768,
            encoder_ffn_embed_dim: 3072,
            encoder_attention_heads: 12,
            activation_fn: "gelu".into(),
            layer_norm_first: false,
            deep_norm: false,
            conv_pos: 128,
            conv_pos_groups: 16,
            relative_position_embedding: false,
            num_buckets: 320,
            max_distance: 1280,
            gru_rel_pos: false,
            finetuned_model: false,
            predictor_class: 527,
        }
    }
}

impl BeatsConfig {
    /// Every problem with the configuration, at once.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut problems = Vec::new();
        if self.input_patch_size == 0 {
            problems.push("input_patch_size must be positive (the reference default -1 is not a usable value)".to_string());
        }
        if self.encoder_attention_heads == 0
            || !self
                .encoder_embed_dim
                .is_multiple_of(self.encoder_attention_heads)
        {
            problems.push(format!(
                "encoder_embed_dim {} is not divisible by encoder_attention_heads {}",
                self.encoder_embed_dim, self.encoder_attention_heads
            ));
        }
        if self.conv_pos_groups == 0 || !self.encoder_embed_dim.is_multiple_of(self.conv_pos_groups)
        {
            problems.push(format!(
                "encoder_embed_dim {} is not divisible by conv_pos_groups {}",
                self.encoder_embed_dim, self.conv_pos_groups
            ));
        }
        if self.deep_norm && self.layer_norm_first {
            problems.push("deep_norm and layer_norm_first cannot both be set".to_string());
        }
        if self.relative_position_embedding && (self.num_buckets < 4 || self.max_distance == 0) {
            problems.push(
                "relative position embedding needs num_buckets >= 4 and max_distance > 0"
                    .to_string(),
            );
        }
        if Activation::parse(&self.activation_fn).is_none() {
            problems.push(format!(
                "activation_fn {:?} is not supported",
                self.activation_fn
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    fn deep_norm_alpha(&self) -> f64 {
        if self.deep_norm {
            (2.0 * self.encoder_layers as f64).powf(0.25)
        } else {
            1.0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Activation {
    /// Exact GELU (erf form), `torch.nn.functional.gelu`.
    Gelu,
    /// Tanh approximation (`gelu_accurate`, also `gelu_fast`).
    GeluTanh,
    Relu,
    Tanh,
    Linear,
    /// fc1 is a GLU: `x[:, :n] * swish(x[:, n:])`.
    Glu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Activation::Gelu,
            "gelu_accurate" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "tanh" => Activation::Tanh,
            "linear" => Activation::Linear,
            "glu" => Activation::Glu,
            _ => return None,
        })
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Tanh => x.tanh(),
            Activation::Linear | Activation::Glu => Ok(x.clone()),
        }
    }
}

/// The first feed-forward layer: a plain linear layer, or BEATs' `GLU_Linear`.
struct FeedForwardIn {
    linear: Linear,
    glu_width: Option<usize>,
}

impl FeedForwardIn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.linear.forward(x)?;
        match self.glu_width {
            None => Ok(y),
            Some(n) => {
                let value = y.narrow(D::Minus1, 0, n)?;
                let gate = y.narrow(D::Minus1, n, n)?;
                value * candle_nn::ops::silu(&gate)?
            }
        }
    }
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    /// `grep_linear` and `grep_a` of the gated relative position bias.
    gate: Option<(Linear, Tensor)>,
    num_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn load(w: &Weights, cfg: &BeatsConfig) -> Result<Self> {
        let dim = cfg.encoder_embed_dim;
        let num_heads = cfg.encoder_attention_heads;
        let head_dim = dim / num_heads;
        let gate = if cfg.gru_rel_pos {
            Some((
                w.pp("grep_linear").linear(head_dim, 8, true)?,
                w.get("grep_a", (1, num_heads, 1, 1))?,
            ))
        } else {
            None
        };
        Ok(Self {
            q_proj: w.pp("q_proj").linear(dim, dim, true)?,
            k_proj: w.pp("k_proj").linear(dim, dim, true)?,
            v_proj: w.pp("v_proj").linear(dim, dim, true)?,
            out_proj: w.pp("out_proj").linear(dim, dim, true)?,
            gate,
            num_heads,
            head_dim,
        })
    }

    /// x [B, P, D]; `key_padding` [B, 1, 1, P] (1 = padding); `position_bias` [H, P, P].
    fn forward(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
        position_bias: Option<&Tensor>,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let (b, p, dim) = x.dims3()?;
        let (h, hd) = (self.num_heads, self.head_dim);
        let scaling = (hd as f64).powf(-0.5);
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, p, h, hd))?.transpose(1, 2)?.contiguous()
        };
        // The reference scales q by scaling/alpha and later multiplies the scores back
        // by alpha after subtracting the row maximum; the same order keeps its rounding.
        let q = heads(
            self.q_proj
                .forward(x)?
                .affine(scaling / ATTENTION_ALPHA, 0.0)?,
        )?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;

        let scores = q.matmul(&k.t()?)?;
        let row_max = scores.max_keepdim(D::Minus1)?;
        let mut scores = scores
            .broadcast_sub(&row_max)?
            .affine(ATTENTION_ALPHA, 0.0)?;
        if let Some(mask) = key_padding {
            let neg_inf = Tensor::new(f32::NEG_INFINITY, x.device())?
                .to_dtype(scores.dtype())?
                .broadcast_as(scores.shape())?;
            scores = mask
                .broadcast_as(scores.shape())?
                .where_cond(&neg_inf, &scores)?;
        }
        if let Some(bias) = position_bias {
            let bias = match &self.gate {
                None => bias.unsqueeze(0)?.broadcast_as((b, h, p, p))?,
                Some((grep_linear, grep_a)) => {
                    // The gate reads the unscaled query: q · alpha / scaling.
                    let query = q.affine(ATTENTION_ALPHA / scaling, 0.0)?;
                    let g = grep_linear
                        .forward(&query)?
                        .reshape((b, h, p, 2, 4))?
                        .sum(D::Minus1)?;
                    let g = candle_nn::ops::sigmoid(&g)?;
                    let gate_a = g.narrow(D::Minus1, 0, 1)?;
                    let gate_b = g.narrow(D::Minus1, 1, 1)?;
                    let gate = gate_b.broadcast_mul(grep_a)?.affine(1.0, -1.0)?;
                    let gate = (gate_a * gate)?.affine(1.0, 2.0)?; // [B, H, P, 1]
                    gate.broadcast_mul(&bias.unsqueeze(0)?)?
                }
            };
            scores = (scores + bias)?;
        }
        let probs = kernels.softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, p, dim))?;
        self.out_proj.forward(&out)
    }
}

struct EncoderLayer {
    self_attn: SelfAttention,
    self_attn_layer_norm: LayerNorm,
    fc1: FeedForwardIn,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    activation: Activation,
    layer_norm_first: bool,
    residual_scale: f64,
}

impl EncoderLayer {
    fn load(w: &Weights, cfg: &BeatsConfig, activation: Activation) -> Result<Self> {
        let dim = cfg.encoder_embed_dim;
        let ffn = cfg.encoder_ffn_embed_dim;
        let fc1 = if activation == Activation::Glu {
            FeedForwardIn {
                linear: w.pp("fc1").pp("linear").linear(dim, 2 * ffn, true)?,
                glu_width: Some(ffn),
            }
        } else {
            FeedForwardIn {
                linear: w.pp("fc1").linear(dim, ffn, true)?,
                glu_width: None,
            }
        };
        Ok(Self {
            self_attn: SelfAttention::load(&w.pp("self_attn"), cfg)?,
            self_attn_layer_norm: w
                .pp("self_attn_layer_norm")
                .layer_norm(dim, LAYER_NORM_EPS)?,
            fc1,
            fc2: w.pp("fc2").linear(ffn, dim, true)?,
            final_layer_norm: w.pp("final_layer_norm").layer_norm(dim, LAYER_NORM_EPS)?,
            activation,
            layer_norm_first: cfg.layer_norm_first,
            residual_scale: cfg.deep_norm_alpha(),
        })
    }

    fn feed_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self.activation.apply(&self.fc1.forward(x)?)?;
        self.fc2.forward(&hidden)
    }

    fn forward(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
        position_bias: Option<&Tensor>,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        if self.layer_norm_first {
            let attn = self.self_attn.forward(
                &kernels.layer_norm(&self.self_attn_layer_norm, x)?,
                key_padding,
                position_bias,
                kernels,
            )?;
            let x = (x + attn)?;
            let ff = self.feed_forward(&kernels.layer_norm(&self.final_layer_norm, &x)?)?;
            x + ff
        } else {
            // Post-norm; with deep_norm the residual is scaled by (2N)^(1/4).
            let attn = self
                .self_attn
                .forward(x, key_padding, position_bias, kernels)?;
            let x = kernels.layer_norm(
                &self.self_attn_layer_norm,
                &(x.affine(self.residual_scale, 0.0)? + attn)?,
            )?;
            let ff = self.feed_forward(&x)?;
            kernels.layer_norm(
                &self.final_layer_norm,
                &(x.affine(self.residual_scale, 0.0)? + ff)?,
            )
        }
    }
}

/// The frozen BEATs encoder.
pub struct Beats {
    cfg: BeatsConfig,
    /// Patch embedding as a matrix [embed_dim, patch²] (the conv kernel flattened).
    patch_weight: Tensor,
    patch_bias: Option<Tensor>,
    layer_norm: LayerNorm,
    post_extract_proj: Option<Linear>,
    /// Positional convolution weight [D, D/groups, K] with weight norm applied.
    pos_conv_weight: Tensor,
    pos_conv_bias: Tensor,
    encoder_layer_norm: LayerNorm,
    /// `relative_attention_bias` of layer 0, shared by all layers: [buckets, heads].
    relative_attention_bias: Option<Tensor>,
    layers: Vec<EncoderLayer>,
    /// The tagging head of a fine-tuned checkpoint: [predictor_class, D].
    predictor: Option<Linear>,
    device: Device,
    dtype: DType,
    kernels: Kernels,
}

/// Encoder output: features and, when a padding mask was given, which patches are padding.
pub struct BeatsOutput {
    /// [B, P, D]
    pub features: Tensor,
    /// [B, P] u8, 1 = padding (as the reference's `padding_mask`).
    pub padding_mask: Option<Tensor>,
}

impl Beats {
    /// Loads a BEATs checkpoint: a torch zip (`.pt`, `{"cfg", "model"}`) or a
    /// `.safetensors` file with its cfg in the file's metadata (key `cfg`) or in a JSON
    /// file beside it (`<stem>.json`, `<stem>.cfg.json`, `cfg.json` or `config.json`).
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (cfg, weights) = load_checkpoint(path, dtype, device)?;
        Self::from_weights(cfg, &weights)
    }

    /// Builds the encoder from a config and the state dict's tensors.
    pub fn from_weights(cfg: BeatsConfig, w: &Weights) -> Result<Self> {
        cfg.validate()
            .map_err(|m| LoadError::config(w.origin(), m))?;
        let activation = Activation::parse(&cfg.activation_fn)
            .ok_or_else(|| LoadError::config(w.origin(), "unsupported activation_fn"))?;
        let p = cfg.input_patch_size;
        let dim = cfg.encoder_embed_dim;

        let patch = w.pp("patch_embedding");
        let patch_weight = patch
            .get("weight", (cfg.embed_dim, 1, p, p))?
            .reshape((cfg.embed_dim, p * p))
            .map_err(|e| patch.tensor_error("weight", e))?;
        let patch_bias = if cfg.conv_bias {
            Some(patch.get("bias", cfg.embed_dim)?)
        } else {
            None
        };
        let post_extract_proj = if cfg.embed_dim != dim {
            Some(w.pp("post_extract_proj").linear(cfg.embed_dim, dim, true)?)
        } else {
            None
        };

        let enc = w.pp("encoder");
        let pos_conv = enc.pp("pos_conv").pp("0");
        let pos_conv_weight =
            load_weight_normed_conv(&pos_conv, (dim, dim / cfg.conv_pos_groups, cfg.conv_pos))?;
        let pos_conv_bias = pos_conv.get("bias", dim)?;
        let relative_attention_bias = if cfg.relative_position_embedding {
            Some(
                enc.pp("layers")
                    .pp(0)
                    .pp("self_attn")
                    .pp("relative_attention_bias")
                    .get("weight", (cfg.num_buckets, cfg.encoder_attention_heads))?,
            )
        } else {
            None
        };
        let layers = (0..cfg.encoder_layers)
            .map(|i| EncoderLayer::load(&enc.pp("layers").pp(i), &cfg, activation))
            .collect::<Result<Vec<_>>>()?;
        let predictor = if cfg.finetuned_model {
            if cfg.predictor_class == 0 {
                return Err(LoadError::config(
                    w.origin(),
                    "finetuned_model with predictor_class 0: a tagging head needs labels",
                ));
            }
            Some(w.pp("predictor").linear(dim, cfg.predictor_class, true)?)
        } else {
            None
        };

        Ok(Self {
            patch_weight,
            patch_bias,
            layer_norm: w
                .pp("layer_norm")
                .layer_norm(cfg.embed_dim, LAYER_NORM_EPS)?,
            post_extract_proj,
            pos_conv_weight,
            pos_conv_bias,
            encoder_layer_norm: enc.pp("layer_norm").layer_norm(dim, LAYER_NORM_EPS)?,
            relative_attention_bias,
            layers,
            predictor,
            device: w.device().clone(),
            dtype: w.dtype(),
            kernels: Kernels::Fused,
            cfg,
        })
    }

    /// The same encoder computing LayerNorm and softmax from differentiable ops, so
    /// gradients reach every weight (candle's fused kernels, used otherwise, have no
    /// backward pass and would leave all but the layers after the last norm
    /// untrained). Slower; the outputs agree to rounding.
    pub fn differentiable(mut self) -> Self {
        self.kernels = Kernels::Differentiable;
        self
    }

    pub fn config(&self) -> &BeatsConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the checkpoint carries a tagging head (a fine-tuned checkpoint).
    pub fn has_tagger(&self) -> bool {
        self.predictor.is_some()
    }

    /// Tag probabilities [B, predictor_class] of an encoder output, as the
    /// reference's `extract_features` returns them for a fine-tuned model: the
    /// predictor's logits per patch, averaged over the valid (non-padding) patches,
    /// through a sigmoid. `None` when the checkpoint has no tagging head.
    pub fn tag_probabilities(&self, out: &BeatsOutput) -> candle_core::Result<Option<Tensor>> {
        let Some(predictor) = &self.predictor else {
            return Ok(None);
        };
        let logits = predictor.forward(&out.features)?; // [B, P, C]
        let mean = mean_over_valid(&logits, out.padding_mask.as_ref())?;
        Ok(Some(candle_nn::ops::sigmoid(&mean)?))
    }

    /// Number of patches the encoder produces for `frames` fbank frames of `bins` bins.
    pub fn num_patches(&self, frames: usize, bins: usize) -> usize {
        let p = self.cfg.input_patch_size;
        (frames / p) * (bins / p)
    }

    /// `extract_features` from normalised fbank [B, T, bins]. `frame_padding` [B, T]
    /// (u8 or any integer/float dtype, nonzero = padding) marks padded frames; the
    /// output mask follows the reference's `forward_padding_mask`.
    pub fn extract_features(
        &self,
        fbank: &Tensor,
        frame_padding: Option<&Tensor>,
    ) -> candle_core::Result<BeatsOutput> {
        let (x, num_patches) = self.embed_patches(fbank)?;
        let padding_mask = match frame_padding {
            Some(mask) => Some(reduce_padding_mask(
                &reduce_padding_mask(mask, fbank.dim(1)?)?,
                num_patches,
            )?),
            None => None,
        };
        let features = self.encode(x, padding_mask.as_ref())?;
        Ok(BeatsOutput {
            features,
            padding_mask,
        })
    }

    /// Features of a batch of clips padded to a common length, each clip `i` having
    /// `frame_lengths[i]` valid frames. A patch is padding when it lies past the clip's
    /// last whole patch row, so every clip's features equal those it gets alone: what
    /// batched inference needs (the reference's waveform-mask mapping does not have
    /// that property).
    pub fn extract_features_for_lengths(
        &self,
        fbank: &Tensor,
        frame_lengths: &[usize],
    ) -> candle_core::Result<BeatsOutput> {
        let (b, t, bins) = fbank.dims3()?;
        if frame_lengths.len() != b {
            candle_core::bail!("{} frame lengths for a batch of {b}", frame_lengths.len());
        }
        let (x, num_patches) = self.embed_patches(fbank)?;
        let p = self.cfg.input_patch_size;
        let per_row = bins / p;
        let mut mask = vec![0u8; b * num_patches];
        for (i, &len) in frame_lengths.iter().enumerate() {
            let valid = (len.min(t) / p) * per_row;
            if valid == 0 {
                candle_core::bail!(
                    "clip {i} has {len} frames, too short for one encoder patch ({p} frames)"
                );
            }
            for m in &mut mask[i * num_patches + valid..(i + 1) * num_patches] {
                *m = 1;
            }
        }
        let mask = Tensor::from_vec(mask, (b, num_patches), &self.device)?;
        let features = self.encode(x, Some(&mask))?;
        Ok(BeatsOutput {
            features,
            padding_mask: Some(mask),
        })
    }

    /// Patch embedding, LayerNorm and `post_extract_proj`: [B, T, bins] → [B, P, D].
    fn embed_patches(&self, fbank: &Tensor) -> candle_core::Result<(Tensor, usize)> {
        let (b, t, bins) = fbank.dims3()?;
        let p = self.cfg.input_patch_size;
        let (pt, pf) = (t / p, bins / p);
        if pt == 0 || pf == 0 {
            candle_core::bail!(
                "input too short for one encoder patch: {t} frames x {bins} bins, need at least {p} x {p}"
            );
        }
        let num_patches = pt * pf;

        // Conv2d(kernel = stride = p) as one matmul over flattened patches.
        let patches = fbank
            .to_dtype(self.dtype)?
            .narrow(1, 0, pt * p)?
            .narrow(2, 0, pf * p)?
            .reshape((b, pt, p, pf, p))?
            .permute((0, 1, 3, 2, 4))?
            .contiguous()?
            .reshape((b * num_patches, p * p))?;
        let mut features = patches.matmul(&self.patch_weight.t()?)?;
        if let Some(bias) = &self.patch_bias {
            features = features.broadcast_add(bias)?;
        }
        let features = features.reshape((b, num_patches, self.cfg.embed_dim))?;
        let mut x = self.kernels.layer_norm(&self.layer_norm, &features)?;
        if let Some(proj) = &self.post_extract_proj {
            x = proj.forward(&x)?;
        }
        Ok((x, num_patches))
    }

    /// The transformer encoder (`TransformerEncoder.forward`).
    fn encode(&self, x: Tensor, padding_mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, p, _) = x.dims3()?;
        let x = match padding_mask {
            // `x[padding_mask] = 0`
            Some(mask) => x.broadcast_mul(&mask.eq(0u8)?.to_dtype(x.dtype())?.unsqueeze(2)?)?,
            None => x,
        };
        let k = self.cfg.conv_pos;
        let conv = x.transpose(1, 2)?.contiguous()?.conv1d(
            &self.pos_conv_weight,
            k / 2,
            1,
            1,
            self.cfg.conv_pos_groups,
        )?;
        let conv = conv.broadcast_add(&self.pos_conv_bias.reshape((1, (), 1))?)?;
        // SamePad: an even kernel yields one extra step, which the reference drops.
        let conv = conv.narrow(2, 0, p)?.gelu_erf()?.transpose(1, 2)?;
        let mut x = (x + conv)?;
        if !self.cfg.layer_norm_first {
            x = self.kernels.layer_norm(&self.encoder_layer_norm, &x)?;
        }

        let key_padding = match padding_mask {
            Some(mask) => Some(mask.ne(0u8)?.reshape((b, 1, 1, p))?),
            None => None,
        };
        let position_bias = match &self.relative_attention_bias {
            Some(table) => Some(self.position_bias(table, p)?),
            None => None,
        };
        for layer in &self.layers {
            x = layer.forward(
                &x,
                key_padding.as_ref(),
                position_bias.as_ref(),
                self.kernels,
            )?;
        }
        if self.cfg.layer_norm_first {
            x = self.kernels.layer_norm(&self.encoder_layer_norm, &x)?;
        }
        Ok(x)
    }

    /// The relative position bias [H, P, P] (`compute_bias`).
    fn position_bias(&self, table: &Tensor, p: usize) -> candle_core::Result<Tensor> {
        let mut buckets = Vec::with_capacity(p * p);
        for query in 0..p as i64 {
            for key in 0..p as i64 {
                buckets.push(relative_position_bucket(
                    key - query,
                    self.cfg.num_buckets,
                    self.cfg.max_distance,
                ));
            }
        }
        let ids = Tensor::from_vec(buckets, p * p, &self.device)?;
        table
            .index_select(&ids, 0)?
            .reshape((p, p, self.cfg.encoder_attention_heads))?
            .permute((2, 0, 1))?
            .contiguous()
    }
}

/// Reads a BEATs checkpoint's cfg and tensors: a torch zip (`.pt`, `{"cfg", "model"}`)
/// or a `.safetensors` file with its cfg in the file's metadata (key `cfg`) or in a
/// JSON file beside it (`<stem>.json`, `<stem>.cfg.json`, `cfg.json` or `config.json`).
pub fn load_checkpoint(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(BeatsConfig, Weights)> {
    let (cfg, weights) = if is_torch_zip(path)? {
        let value = checkpoint::read_torch_value(path)?;
        let cfg_value = value.get("cfg").cloned().ok_or_else(|| {
                LoadError::config(path, "the checkpoint has no `cfg` entry (expected {\"cfg\": dict, \"model\": state_dict})")
            })?;
        let cfg: BeatsConfig = serde_json::from_value(cfg_value)
            .map_err(|e| LoadError::config(path, format!("cfg: {e}")))?;
        let tensors = checkpoint::read_torch_state_dict(path, Some("model"))?;
        (cfg, Weights::from_tensors(path, tensors, dtype, device))
    } else {
        let cfg = read_safetensors_cfg(path)?;
        let weights = Weights::from_safetensors(path, &[path.to_path_buf()], dtype, device)?;
        (cfg, weights)
    };
    cfg.validate().map_err(|m| LoadError::config(path, m))?;
    Ok((cfg, weights))
}

/// T5-style bidirectional bucket of a relative position, computed in f32 exactly as
/// the reference does (the log-spaced boundaries depend on f32 rounding).
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let distance = relative.abs();
    let max_exact = half / 2;
    if distance < max_exact {
        bucket += distance;
    } else {
        let ratio = (distance as f32 / max_exact as f32).ln();
        let span = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
        let large = max_exact + ((ratio / span) * (half - max_exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as u32
}

/// The mean over each clip's valid patches: `x` [B, P, C], `padding_mask` [B, P]
/// (nonzero = padding; `None`: every patch is valid) → [B, C]. The clip embedding of
/// the encoder output (`features`), and the reference's logit averaging.
pub fn mean_over_valid(x: &Tensor, padding_mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let Some(mask) = padding_mask else {
        return x.mean(1);
    };
    let valid = mask.eq(0u8)?.to_dtype(x.dtype())?; // [B, P]
    let sum = x.broadcast_mul(&valid.unsqueeze(D::Minus1)?)?.sum(1)?;
    let count = valid.sum_keepdim(1)?;
    sum.broadcast_div(&count)
}

/// The reference's `forward_padding_mask`: drop the `len % target` trailing entries,
/// group the rest into `target` equal runs, and mark a target position as padding when
/// its whole run is padding. `mask` [B, N] → [B, target] u8.
pub fn reduce_padding_mask(mask: &Tensor, target: usize) -> candle_core::Result<Tensor> {
    let (b, n) = mask.dims2()?;
    if target == 0 || n < target {
        candle_core::bail!("cannot reduce a padding mask of length {n} to {target} positions");
    }
    let keep = n - n % target;
    let padding = mask.ne(0u8)?; // nonzero → 1
    padding
        .narrow(1, 0, keep)?
        .reshape((b, target, keep / target))?
        .min(D::Minus1)
}

/// The waveform padding mask for clips of `lengths` samples padded to `max_len`:
/// [B, max_len] u8, 1 = padding (what the reference's `padding_mask` argument holds).
pub fn waveform_padding_mask(
    lengths: &[usize],
    max_len: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut data = vec![0u8; lengths.len() * max_len];
    for (row, &len) in lengths.iter().enumerate() {
        for v in &mut data[row * max_len + len.min(max_len)..(row + 1) * max_len] {
            *v = 1;
        }
    }
    Tensor::from_vec(data, (lengths.len(), max_len), device)
}

/// `weight_norm(conv, dim=2)`: weight = g · v / ‖v‖, the norm over all dims but 2.
/// Accepts the classic `weight_g`/`weight_v` names, the parametrization names of newer
/// PyTorch (`parametrizations.weight.original0/1`), or an already folded `weight`.
pub fn load_weight_normed_conv(w: &Weights, shape: (usize, usize, usize)) -> Result<Tensor> {
    let (g_name, v_name) = if w.contains("weight_g") {
        ("weight_g", "weight_v")
    } else if w.contains("parametrizations.weight.original0") {
        (
            "parametrizations.weight.original0",
            "parametrizations.weight.original1",
        )
    } else {
        return w.get("weight", shape);
    };
    let g = w.get(g_name, (1, 1, shape.2))?;
    let v = w.get(v_name, shape)?;
    let fold = || -> candle_core::Result<Tensor> {
        let norm = v.sqr()?.sum_keepdim(0)?.sum_keepdim(1)?.sqrt()?; // [1, 1, K]
        v.broadcast_mul(&g.broadcast_div(&norm)?)
    };
    fold().map_err(|e| w.tensor_error(v_name, e))
}

/// Torch checkpoints are zip archives (`PK\x03\x04`).
fn is_torch_zip(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(|e| LoadError::io(path, e))?;
    Ok(n == 4 && &magic == b"PK\x03\x04")
}

/// The cfg of a safetensors BEATs file: its `cfg` metadata entry, else a JSON file
/// beside it.
fn read_safetensors_cfg(path: &Path) -> Result<BeatsConfig> {
    if let Some(json) = safetensors_metadata(path)?.and_then(|m| m.get("cfg").cloned()) {
        return serde_json::from_str(&json)
            .map_err(|e| LoadError::config(path, format!("metadata cfg: {e}")));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let candidates: Vec<PathBuf> = vec![
        dir.join(format!("{stem}.json")),
        dir.join(format!("{stem}.cfg.json")),
        dir.join("cfg.json"),
        dir.join("config.json"),
    ];
    for candidate in &candidates {
        if candidate.is_file() {
            let value: serde_json::Value = super::weights::read_json_config(candidate)?;
            // Accept either the bare cfg dict or `{"cfg": {...}}`.
            let value = value.get("cfg").cloned().unwrap_or(value);
            return serde_json::from_value(value)
                .map_err(|e| LoadError::config(candidate, e.to_string()));
        }
    }
    Err(LoadError::config(
        path,
        format!(
            "no BEATs cfg: none in the file's metadata and none of {} exists",
            candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

fn safetensors_metadata(path: &Path) -> Result<Option<std::collections::HashMap<String, String>>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| LoadError::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(LoadError::Format {
            file: path.to_path_buf(),
            format: "safetensors",
            message: format!("header length {len} is implausible"),
        });
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| LoadError::io(path, e))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| LoadError::Format {
            file: path.to_path_buf(),
            format: "safetensors",
            message: e.to_string(),
        })?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_the_reference_formula() {
        // num_buckets 320, max_distance 800 (BEATs_iter3+): half 160, max_exact 80.
        assert_eq!(relative_position_bucket(0, 320, 800), 0);
        assert_eq!(relative_position_bucket(-5, 320, 800), 5);
        assert_eq!(relative_position_bucket(5, 320, 800), 165);
        assert_eq!(relative_position_bucket(79, 320, 800), 160 + 79);
        // Far away positions saturate at half - 1.
        assert_eq!(relative_position_bucket(-100_000, 320, 800), 159);
        assert_eq!(relative_position_bucket(100_000, 320, 800), 319);
        // 32 buckets / 128 (tiny): half 16, max_exact 8; distance 16 → 8 + floor(ln2/ln16*8) = 10.
        assert_eq!(relative_position_bucket(-16, 32, 128), 10);
    }

    #[test]
    fn padding_mask_reduces_like_the_reference() {
        let mask = Tensor::new(
            &[[0u8, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]],
            &Device::Cpu,
        )
        .unwrap();
        // 7 % 3 = 1 trailing entry dropped; runs [0,0] [0,1] [1,1].
        let reduced = reduce_padding_mask(&mask, 3).unwrap();
        assert_eq!(
            reduced.to_vec2::<u8>().unwrap(),
            vec![vec![0, 0, 1], vec![0, 0, 0]]
        );
    }

    #[test]
    fn waveform_mask_marks_the_tail() {
        let m = waveform_padding_mask(&[2, 4], 4, &Device::Cpu).unwrap();
        assert_eq!(
            m.to_vec2::<u8>().unwrap(),
            vec![vec![0, 0, 1, 1], vec![0, 0, 0, 0]]
        );
    }

    #[test]
    fn config_problems_are_listed_together() {
        let cfg = BeatsConfig {
            encoder_embed_dim: 50,
            encoder_attention_heads: 4,
            deep_norm: true,
            layer_norm_first: true,
            activation_fn: "swish".into(),
            ..BeatsConfig::default()
        };
        let err = cfg.validate().unwrap_err();
        assert!(
            err.contains("divisible by encoder_attention_heads"),
            "{err}"
        );
        assert!(err.contains("deep_norm and layer_norm_first"), "{err}");
        assert!(err.contains("\"swish\""), "{err}");
    }
}
