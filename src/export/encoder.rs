//! `audio_encoder.onnx`: normalised fbank frames (+ valid lengths) → audio embeddings
//! for the decoder. BEATs, the projector and the pooling in one graph.
//!
//! Inputs: `fbank` [batch, frames, mel_bins] f32, `fbank_lengths` [batch] int64.
//! Outputs: `audio_embeds` [batch, audio_tokens, hidden], `audio_embeds_mask`
//! [batch, audio_tokens] int64 (1 = valid); `encoder_embedding` [batch, encoder_dim]
//! f32 (the mean encoder output over the clip's valid patches); and, for a
//! fine-tuned checkpoint, `tag_probs` [batch, labels] f32 (the sigmoid of the
//! predictor's logits averaged over the valid patches, as the reference's
//! `extract_features`: the predictor is linear, so it is applied once to the mean).
//! Outputs nobody binds cost a mean and a small matmul per clip.
//!
//! Padding follows [`Beats::extract_features_for_lengths`](crate::model::beats::Beats::extract_features_for_lengths):
//! a patch past a clip's last whole patch row is padding, so a clip's embedding does
//! not depend on what it is batched with.
//!
//! Attention is either the reference's formulation operator by operator (eager) or
//! ONNX Runtime's fused `MultiHeadAttention` with the padding and the gated relative
//! position bias as one additive bias (fused: on a GPU the eager form's f32 score
//! tensors, [batch, heads, patches, patches] passed through eight operators per layer,
//! are most of the encoder's memory traffic).

use candle_core::Tensor;

use crate::graph_io::encoder as io;
use crate::manifest::Attention;
use crate::model::beats::{BeatsConfig, load_weight_normed_conv};
use crate::model::projector::Pooling;
use crate::model::weights::{LoadError, Weights};
use crate::onnx::{DataType, Dim, Graph, OnnxError, Value, attr_float, attr_int, attr_ints};

const LAYER_NORM_EPS: f64 = 1e-5;
const ATTENTION_ALPHA: f32 = 32.0;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error("{0}")]
    Unsupported(String),
}

type Result<T> = std::result::Result<T, GraphError>;

/// The encoder graph's optional outputs, as built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipOutputs {
    /// Width of `encoder_embedding`.
    pub embedding_dim: usize,
    /// Labels of `tag_probs`, when the checkpoint has a tagging head.
    pub tags: Option<usize>,
}

/// Adds the encoder to `g`: BEATs (`beats` weights at the state-dict root), the
/// projector (`projector` weights, keys `0.*`, `2.*`) and pooling; for a fine-tuned
/// checkpoint its tagging head (`predictor.*`) too.
pub fn build_encoder(
    g: &mut Graph,
    cfg: &BeatsConfig,
    beats: &Weights,
    projector: &Weights,
    pooling: Pooling,
    mel_bins: usize,
    attention: Attention,
) -> Result<ClipOutputs> {
    let p = cfg.input_patch_size;
    let per_row = mel_bins / p;
    if per_row == 0 {
        return Err(GraphError::Unsupported(format!(
            "{mel_bins} mel bins cannot hold one {p}x{p} patch"
        )));
    }
    let fbank = g.input(
        io::FBANK,
        DataType::Float,
        &[
            Dim::named("batch"),
            Dim::named("frames"),
            Dim::Fixed(mel_bins),
        ],
    );
    let lengths = g.input(io::FBANK_LENGTHS, DataType::Int64, &[Dim::named("batch")]);

    // Patch embedding: crop to whole patches, regroup, one matmul.
    g.set_scope("patch_embedding");
    let x = g.from_f32(&fbank);
    let frames = g.dim(&x, 1);
    let patch = g.const_i64(&[p as i64]);
    let rows = g.div(&frames, &patch);
    let kept = g.mul(&rows, &patch);
    let zero = g.const_i64(&[0]);
    let x = g.slice_dynamic(&x, 1, &zero, &kept);
    let x = g.slice(&x, 2, 0, (per_row * p) as i64);
    let x = g.reshape_to(&x, &[0, -1, p as i64, per_row as i64, p as i64]);
    let x = g.transpose(&x, &[0, 1, 3, 2, 4]);
    let x = g.reshape_to(&x, &[0, -1, (p * p) as i64]);
    let conv = beats.pp("patch_embedding");
    let weight = conv.get("weight", (cfg.embed_dim, 1, p, p))?;
    let weight = weight
        .reshape((cfg.embed_dim, p * p))
        .map_err(|e| conv.tensor_error("weight", e))?;
    let bias = if cfg.conv_bias {
        Some(conv.get("bias", cfg.embed_dim)?)
    } else {
        None
    };
    let x = g.linear(&x, "patch_embedding", &weight, bias.as_ref())?;
    let x = layer_norm(g, &x, beats, "layer_norm", cfg.embed_dim)?;
    let dim = cfg.encoder_embed_dim;
    let x = if cfg.embed_dim != dim {
        linear(g, &x, beats, "post_extract_proj", cfg.embed_dim, dim, true)?
    } else {
        x
    };

    // Valid patches: (length / p) whole rows of `per_row` patches.
    g.set_scope("padding");
    let patch_scalar = g.scalar_i64(p as i64);
    let rows_valid = g.div(&lengths, &patch_scalar);
    let per_row_scalar = g.scalar_i64(per_row as i64);
    let valid_count = g.mul(&rows_valid, &per_row_scalar); // [B]
    let valid_count = g.unsqueeze(&valid_count, &[1]); // [B, 1]
    let num_patches = g.dim(&x, 1);
    let num_patches_scalar = g.squeeze(&num_patches, &[0]);
    let zero_scalar = g.scalar_i64(0);
    let positions = g.range(&zero_scalar, &num_patches_scalar); // [P]
    let positions = g.unsqueeze(&positions, &[0]); // [1, P]
    let valid = g.op("Less", &[&positions, &valid_count], vec![]); // [B, P] bool
    let float = g.float();
    let keep = g.cast(&valid, float);
    let keep = g.unsqueeze(&keep, &[2]); // [B, P, 1]

    // Transformer encoder.
    g.set_scope("encoder");
    let x = g.mul(&x, &keep); // x[padding_mask] = 0
    let x = positional_conv(g, &x, cfg, beats)?;
    let mut x = x;
    if !cfg.layer_norm_first {
        x = layer_norm(g, &x, beats, "encoder.layer_norm", dim)?;
    }
    let key_valid = g.unsqueeze(&valid, &[1, 2]); // [B, 1, 1, P]
    let position_bias = if cfg.relative_position_embedding {
        Some(relative_position_bias(g, &positions, cfg, beats)?)
    } else {
        None
    };
    let keys = match attention {
        Attention::Eager => Keys::Valid(key_valid),
        Attention::Fused => {
            // Padding keys as an additive bias: the lowest finite value of the
            // graph's float type, which softmax turns into an exact zero.
            let lowest = match g.float() {
                DataType::Float16 => f32::from(half::f16::MIN),
                _ => f32::MIN,
            };
            let zero = g.scalar(0.0);
            let lowest = g.scalar(lowest);
            Keys::Bias(g.where_(&key_valid, &zero, &lowest))
        }
    };
    for i in 0..cfg.encoder_layers {
        g.set_scope(&format!("encoder.layers.{i}"));
        x = encoder_layer(
            g,
            &x,
            cfg,
            &beats.pp("encoder.layers").pp(i),
            &keys,
            position_bias.as_ref(),
        )?;
    }
    if cfg.layer_norm_first {
        x = layer_norm(g, &x, beats, "encoder.layer_norm", dim)?;
    }
    let outputs = clip_outputs(g, &x, &valid, cfg, beats)?;

    // Projector per patch, then pooling over valid patches.
    g.set_scope("projector");
    let hidden_in = projector.pp("0").get_any_shape("weight")?;
    let (h1, d_in) = (hidden_in.dims()[0], hidden_in.dims()[1]);
    if d_in != dim {
        return Err(GraphError::Unsupported(format!(
            "the projector takes {d_in}-dim features, the encoder gives {dim}"
        )));
    }
    let out = projector.pp("2").get_any_shape("weight")?;
    let hidden = out.dims()[0];
    let y = g.linear(
        &x,
        "projector.0",
        &hidden_in,
        Some(&projector.pp("0").get("bias", h1)?),
    )?;
    let y = g.gelu_erf(&y);
    let y = g.linear(
        &y,
        "projector.2",
        &out,
        Some(&projector.pp("2").get("bias", hidden)?),
    )?;
    g.set_scope("pooling");
    let pooled = match pooling {
        Pooling::Mean => {
            let masked = g.mul(&y, &keep);
            let sum = g.reduce_sum(&masked, &[1], true); // [B, 1, H]
            let count = g.reduce_sum(&keep, &[1], true); // [B, 1, 1]
            g.div(&sum, &count)
        }
    };
    let pooled = g.to_f32(&pooled);
    let tokens = pooling.tokens_per_clip();
    let batch = g.dim(&pooled, 0);
    let tokens_v = g.const_i64(&[tokens as i64]);
    let mask_shape = g.concat(&[&batch, &tokens_v], 0);
    let one = g.scalar_i64(1);
    let mask = g.op("Expand", &[&one, &mask_shape], vec![]);
    g.output(
        &pooled,
        io::AUDIO_EMBEDS,
        DataType::Float,
        &[Dim::named("batch"), Dim::Fixed(tokens), Dim::Fixed(hidden)],
    );
    g.output(
        &mask,
        io::AUDIO_EMBEDS_MASK,
        DataType::Int64,
        &[Dim::named("batch"), Dim::Fixed(tokens)],
    );
    Ok(outputs)
}

/// `encoder_embedding` (the mean of the encoder output `x` [B, P, D] over the valid
/// patches, `valid` [B, P] bool) and, with a tagging head, `tag_probs`, all in f32
/// (a sum over a 30 s clip's ~1,500 patches loses too much in f16).
fn clip_outputs(
    g: &mut Graph,
    x: &Value,
    valid: &Value,
    cfg: &BeatsConfig,
    beats: &Weights,
) -> Result<ClipOutputs> {
    g.set_scope("clip_embedding");
    let dim = cfg.encoder_embed_dim;
    let x = g.to_f32(x);
    let keep = g.cast(valid, DataType::Float);
    let keep = g.unsqueeze(&keep, &[2]); // [B, P, 1]
    let masked = g.mul(&x, &keep);
    let sum = g.reduce_sum(&masked, &[1], false); // [B, D]
    let count = g.reduce_sum(&keep, &[1], false); // [B, 1]
    let embedding = g.div(&sum, &count);
    g.output(
        &embedding,
        io::ENCODER_EMBEDDING,
        DataType::Float,
        &[Dim::named("batch"), Dim::Fixed(dim)],
    );
    let tags = if cfg.finetuned_model {
        g.set_scope("predictor");
        let labels = cfg.predictor_class;
        let head = beats.pp("predictor");
        let weight = head.get("weight", (labels, dim))?;
        let weight = weight
            .t()
            .and_then(|w| w.contiguous())
            .map_err(|e| head.tensor_error("weight", e))?;
        let bias = head.get("bias", labels)?;
        let weight = g.weight_f32("predictor.weight", &weight)?;
        let bias = g.weight_f32("predictor.bias", &bias)?;
        // mean(W·x + b) over the valid patches = W·mean(x) + b.
        let logits = g.matmul(&embedding, &weight);
        let logits = g.add(&logits, &bias);
        let probs = g.sigmoid(&logits);
        g.output(
            &probs,
            io::TAG_PROBS,
            DataType::Float,
            &[Dim::named("batch"), Dim::Fixed(labels)],
        );
        Some(labels)
    } else {
        None
    };
    Ok(ClipOutputs {
        embedding_dim: dim,
        tags,
    })
}

fn linear(
    g: &mut Graph,
    x: &Value,
    w: &Weights,
    name: &str,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<Value> {
    let w = w.pp(name);
    let weight = w.get("weight", (out_dim, in_dim))?;
    let b = if bias {
        Some(w.get("bias", out_dim)?)
    } else {
        None
    };
    Ok(g.linear(x, w.prefix(), &weight, b.as_ref())?)
}

fn layer_norm(g: &mut Graph, x: &Value, w: &Weights, name: &str, dim: usize) -> Result<Value> {
    let w = w.pp(name);
    let weight: Tensor = w.get("weight", dim)?;
    let bias: Tensor = w.get("bias", dim)?;
    Ok(g.layer_norm(x, w.prefix(), &weight, &bias, LAYER_NORM_EPS)?)
}

/// Weight-normed grouped Conv1d over patches, SamePad, GELU, residual add.
fn positional_conv(g: &mut Graph, x: &Value, cfg: &BeatsConfig, beats: &Weights) -> Result<Value> {
    let dim = cfg.encoder_embed_dim;
    let k = cfg.conv_pos;
    let conv = beats.pp("encoder.pos_conv.0");
    let weight = load_weight_normed_conv(&conv, (dim, dim / cfg.conv_pos_groups, k))?;
    let bias = conv.get("bias", dim)?;
    let w = g.weight("encoder.pos_conv.weight", &weight)?;
    let b = g.weight("encoder.pos_conv.bias", &bias)?;
    let xt = g.transpose(x, &[0, 2, 1]);
    let pad = (k / 2) as i64;
    let y = g.op(
        "Conv",
        &[&xt, &w, &b],
        vec![
            attr_int("group", cfg.conv_pos_groups as i64),
            attr_ints("kernel_shape", &[k as i64]),
            attr_ints("pads", &[pad, pad]),
        ],
    );
    // An even kernel yields one step more than the input; SamePad drops it.
    let y = if k.is_multiple_of(2) {
        g.slice(&y, 2, 0, -1)
    } else {
        y
    };
    let y = g.gelu_erf(&y);
    let y = g.transpose(&y, &[0, 2, 1]);
    Ok(g.add(x, &y))
}

/// The shared relative position bias [1, H, P, P], bucketed in the graph as the
/// reference does (f32 log, truncation towards zero).
fn relative_position_bias(
    g: &mut Graph,
    positions: &Value,
    cfg: &BeatsConfig,
    beats: &Weights,
) -> Result<Value> {
    g.set_scope("encoder.relative_position_bias");
    let half = (cfg.num_buckets / 2) as i64;
    let max_exact = half / 2;
    let query = g.transpose(positions, &[1, 0]); // [P, 1]
    let relative = g.sub(positions, &query); // key - query, [P, P]
    let zero = g.scalar_i64(0);
    let positive = g.op("Greater", &[&relative, &zero], vec![]);
    let positive = g.cast(&positive, DataType::Int64);
    let half_v = g.scalar_i64(half);
    let sign_bucket = g.mul(&positive, &half_v);
    let distance = g.op("Abs", &[&relative], vec![]);
    let max_exact_v = g.scalar_i64(max_exact);
    let is_small = g.op("Less", &[&distance, &max_exact_v], vec![]);
    let distance_f = g.cast(&distance, DataType::Float);
    let max_exact_f = g.scalar_f32(max_exact as f32);
    let ratio = g.div(&distance_f, &max_exact_f);
    let log = g.op("Log", &[&ratio], vec![]);
    let span = g.scalar_f32(((cfg.max_distance as f64) / (max_exact as f64)).ln() as f32);
    let scaled = g.div(&log, &span);
    let width = g.scalar_f32((half - max_exact) as f32);
    let scaled = g.mul(&scaled, &width);
    // Distance 0 gives log(0) = -inf here; the Where below never selects it, but keep
    // the cast well defined.
    let floor = g.scalar_f32(0.0);
    let scaled = g.op("Max", &[&scaled, &floor], vec![]);
    let large = g.cast(&scaled, DataType::Int64);
    let large = g.add(&large, &max_exact_v);
    let cap = g.scalar_i64(half - 1);
    let large = g.op("Min", &[&large, &cap], vec![]);
    let within = g.where_(&is_small, &distance, &large);
    let bucket = g.add(&sign_bucket, &within);
    let table = beats
        .pp("encoder.layers.0.self_attn.relative_attention_bias")
        .get("weight", (cfg.num_buckets, cfg.encoder_attention_heads))?;
    let table = g.weight("encoder.relative_attention_bias", &table)?;
    let bias = g.gather(&table, &bucket, 0); // [P, P, H]
    Ok(g.transpose(&bias, &[2, 0, 1])) // [H, P, P]
}

/// How attention leaves out padding keys.
enum Keys {
    /// Eager attention: [B, 1, 1, P] bool, true for a valid key.
    Valid(Value),
    /// Fused attention: [B, 1, 1, P] in the graph's float type, 0 for a valid key
    /// and the type's lowest value for padding.
    Bias(Value),
}

fn encoder_layer(
    g: &mut Graph,
    x: &Value,
    cfg: &BeatsConfig,
    w: &Weights,
    keys: &Keys,
    position_bias: Option<&Value>,
) -> Result<Value> {
    let dim = cfg.encoder_embed_dim;
    let residual_scale = if cfg.deep_norm {
        (2.0 * cfg.encoder_layers as f64).powf(0.25) as f32
    } else {
        1.0
    };
    let ln = |g: &mut Graph, x: &Value, name: &str| layer_norm(g, x, w, name, dim);
    if cfg.layer_norm_first {
        let h = ln(g, x, "self_attn_layer_norm")?;
        let a = self_attention(g, &h, cfg, &w.pp("self_attn"), keys, position_bias)?;
        let x = g.add(x, &a);
        let h = ln(g, &x, "final_layer_norm")?;
        let f = feed_forward(g, &h, cfg, w)?;
        Ok(g.add(&x, &f))
    } else {
        let a = self_attention(g, x, cfg, &w.pp("self_attn"), keys, position_bias)?;
        let scale = g.scalar(residual_scale);
        let r = g.mul(x, &scale);
        let x = g.add(&r, &a);
        let x = ln(g, &x, "self_attn_layer_norm")?;
        let f = feed_forward(g, &x, cfg, w)?;
        let r = g.mul(&x, &scale);
        let x = g.add(&r, &f);
        ln(g, &x, "final_layer_norm")
    }
}

fn feed_forward(g: &mut Graph, x: &Value, cfg: &BeatsConfig, w: &Weights) -> Result<Value> {
    let dim = cfg.encoder_embed_dim;
    let ffn = cfg.encoder_ffn_embed_dim;
    let prefix = w.prefix().to_string();
    let h = match cfg.activation_fn.as_str() {
        "glu" => {
            let y = linear(g, x, w, "fc1.linear", dim, 2 * ffn, true)?;
            let value = g.slice(&y, -1, 0, ffn as i64);
            let gate = g.slice(&y, -1, ffn as i64, 2 * ffn as i64);
            let sig = g.sigmoid(&gate);
            let swish = g.mul(&gate, &sig);
            g.mul(&value, &swish)
        }
        act => {
            let y = linear(g, x, w, "fc1", dim, ffn, true)?;
            match act {
                "gelu" => g.gelu_erf(&y),
                "gelu_accurate" | "gelu_fast" => gelu_tanh(g, &y),
                "relu" => g.op("Relu", &[&y], vec![]),
                "tanh" => g.op("Tanh", &[&y], vec![]),
                "linear" => y,
                other => {
                    return Err(GraphError::Unsupported(format!(
                        "{prefix}: activation_fn {other:?} cannot be exported"
                    )));
                }
            }
        }
    };
    linear(g, &h, w, "fc2", ffn, dim, true)
}

/// BEATs' gate on the relative position bias, from the unscaled query [B, H, P, D]:
/// `a · (b · grep_a - 1) + 2` with `(a, b)` = sigmoid of the two 4-wide sums of
/// `grep_linear(query)`, [B, H, P, 1] in f32.
fn position_gate(
    g: &mut Graph,
    query: &Value,
    cfg: &BeatsConfig,
    w: &Weights,
    head_dim: usize,
) -> Result<Value> {
    let lin = w.pp("grep_linear");
    let gw = lin.get("weight", (8, head_dim))?;
    let gb = lin.get("bias", 8)?;
    let grep_a = w.get("grep_a", (1, cfg.encoder_attention_heads, 1, 1))?;
    let gate = g.linear(
        query,
        &format!("{}.grep_linear", w.prefix()),
        &gw,
        Some(&gb),
    )?;
    let gate = g.to_f32(&gate);
    let gate = g.reshape_to(&gate, &[0, 0, 0, 2, 4]);
    let gate = g.reduce_sum(&gate, &[-1], false);
    let gate = g.sigmoid(&gate); // [B, H, P, 2]
    let gate_a = g.slice(&gate, -1, 0, 1);
    let gate_b = g.slice(&gate, -1, 1, 2);
    let grep_a = g.weight_f32(&format!("{}.grep_a", w.prefix()), &grep_a)?;
    let one = g.scalar_f32(1.0);
    let two = g.scalar_f32(2.0);
    let t = g.mul(&gate_b, &grep_a);
    let t = g.sub(&t, &one);
    let t = g.mul(&gate_a, &t);
    Ok(g.add(&t, &two))
}

fn self_attention(
    g: &mut Graph,
    x: &Value,
    cfg: &BeatsConfig,
    w: &Weights,
    keys: &Keys,
    position_bias: Option<&Value>,
) -> Result<Value> {
    match keys {
        Keys::Valid(key_valid) => eager_attention(g, x, cfg, w, key_valid, position_bias),
        Keys::Bias(key_bias) => fused_attention(g, x, cfg, w, key_bias, position_bias),
    }
}

/// The reference's formulation, operator by operator: scores in f32, shifted by
/// their row maximum, scaled back by alpha, masked, plus the gated bias.
fn eager_attention(
    g: &mut Graph,
    x: &Value,
    cfg: &BeatsConfig,
    w: &Weights,
    key_valid: &Value,
    position_bias: Option<&Value>,
) -> Result<Value> {
    let dim = cfg.encoder_embed_dim;
    let heads = cfg.encoder_attention_heads as i64;
    let head_dim = (dim / cfg.encoder_attention_heads) as i64;
    let scaling = (head_dim as f32).powf(-0.5);
    let split = |g: &mut Graph, v: &Value| {
        let r = g.reshape_to(v, &[0, 0, heads, head_dim]);
        g.transpose(&r, &[0, 2, 1, 3]) // [B, H, P, D]
    };
    let q = linear(g, x, w, "q_proj", dim, dim, true)?;
    let q_scale = g.scalar(scaling / ATTENTION_ALPHA);
    let q = g.mul(&q, &q_scale);
    let q = split(g, &q);
    let k = linear(g, x, w, "k_proj", dim, dim, true)?;
    let k = split(g, &k);
    let v = linear(g, x, w, "v_proj", dim, dim, true)?;
    let v = split(g, &v);

    // Scores in f32: (q·k - rowmax) · alpha, padding keys at -inf, plus the bias.
    let q32 = g.to_f32(&q);
    let k32 = g.to_f32(&k);
    let kt = g.transpose(&k32, &[0, 1, 3, 2]);
    let scores = g.matmul(&q32, &kt);
    let row_max = g.reduce_max(&scores, &[-1], true);
    let scores = g.sub(&scores, &row_max);
    let alpha = g.scalar_f32(ATTENTION_ALPHA);
    let scores = g.mul(&scores, &alpha);
    let neg_inf = g.scalar_f32(f32::NEG_INFINITY);
    let mut scores = g.where_(key_valid, &scores, &neg_inf);
    if let Some(bias) = position_bias {
        let bias32 = g.to_f32(bias);
        let bias = if cfg.gru_rel_pos {
            let unscale = g.scalar_f32(ATTENTION_ALPHA / scaling);
            let query = g.mul(&q32, &unscale);
            let query = g.from_f32(&query);
            let gate = position_gate(g, &query, cfg, w, head_dim as usize)?; // [B, H, P, 1]
            g.mul(&gate, &bias32)
        } else {
            bias32
        };
        scores = g.add(&scores, &bias);
    }
    let probs = g.softmax(&scores, -1);
    let probs = g.from_f32(&probs);
    let out = g.matmul(&probs, &v);
    let out = g.transpose(&out, &[0, 2, 1, 3]);
    let out = g.reshape_to(&out, &[0, 0, dim as i64]);
    linear(g, &out, w, "out_proj", dim, dim, true)
}

/// ONNX Runtime's `MultiHeadAttention` (com.microsoft) with the padding and the
/// gated position bias as one additive `attention_bias` [B, H, P, P]. The same
/// softmax as the reference: its row-maximum shift and alpha rescaling guard f16
/// overflow and cancel out (softmax ignores a per-row constant), and the fused
/// kernel keeps its own running maximum.
fn fused_attention(
    g: &mut Graph,
    x: &Value,
    cfg: &BeatsConfig,
    w: &Weights,
    key_bias: &Value,
    position_bias: Option<&Value>,
) -> Result<Value> {
    let dim = cfg.encoder_embed_dim;
    let heads = cfg.encoder_attention_heads;
    let head_dim = dim / heads;
    let q = linear(g, x, w, "q_proj", dim, dim, true)?;
    let k = linear(g, x, w, "k_proj", dim, dim, true)?;
    let v = linear(g, x, w, "v_proj", dim, dim, true)?;
    let bias = match position_bias {
        Some(bias) => {
            let bias = if cfg.gru_rel_pos {
                let query = g.reshape_to(&q, &[0, 0, heads as i64, head_dim as i64]);
                let query = g.transpose(&query, &[0, 2, 1, 3]); // [B, H, P, D]
                let gate = position_gate(g, &query, cfg, w, head_dim)?; // [B, H, P, 1]
                let bias32 = g.to_f32(bias);
                let gated = g.mul(&gate, &bias32);
                g.from_f32(&gated)
            } else {
                g.unsqueeze(bias, &[0])
            };
            g.add(&bias, key_bias) // [B, H, P, P]
        }
        None => key_bias.clone(),
    };
    let none = Value(String::new());
    let mut out = g.contrib_op(
        "MultiHeadAttention",
        &[&q, &k, &v, &none, &none, &bias],
        vec![
            attr_int("num_heads", heads as i64),
            attr_float("scale", (head_dim as f32).powf(-0.5)),
        ],
        1,
    );
    let out = out.pop().expect("one output");
    linear(g, &out, w, "out_proj", dim, dim, true)
}

/// `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³)))` (`gelu_accurate`); the Gelu op
/// needs opset 20.
fn gelu_tanh(g: &mut Graph, x: &Value) -> Value {
    let c = g.scalar((2.0f32 / std::f32::consts::PI).sqrt());
    let k = g.scalar(0.044715);
    let half = g.scalar(0.5);
    let one = g.scalar(1.0);
    let x2 = g.mul(x, x);
    let x3 = g.mul(&x2, x);
    let kx3 = g.mul(&x3, &k);
    let inner = g.add(x, &kx3);
    let inner = g.mul(&inner, &c);
    let t = g.op("Tanh", &[&inner], vec![]);
    let t = g.add(&t, &one);
    let y = g.mul(x, &t);
    g.mul(&y, &half)
}

/// Writes `audio_encoder.onnx` for a BEATs checkpoint and a projector.
pub fn export_audio_encoder(
    beats_checkpoint: &std::path::Path,
    projector_file: &std::path::Path,
    pooling: Pooling,
    mel_bins: usize,
    float: DataType,
    attention: Attention,
    out: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>> {
    let device = candle_core::Device::Cpu;
    let (cfg, beats) =
        crate::model::beats::load_checkpoint(beats_checkpoint, candle_core::DType::F32, &device)?;
    let projector = Weights::from_safetensors(
        projector_file,
        &[projector_file.to_path_buf()],
        candle_core::DType::F32,
        &device,
    )?;
    let mut g = Graph::new("audio_encoder", float);
    build_encoder(
        &mut g, &cfg, &beats, &projector, pooling, mel_bins, attention,
    )?;
    Ok(g.save(out, env!("CARGO_PKG_VERSION"), &[])?)
}
