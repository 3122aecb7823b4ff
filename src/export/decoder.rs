//! `embedding.onnx` and `decoder.onnx`: the Llama decoder with its LoRA adapters
//! folded into the weights, in the input/output layout of Hugging Face optimum and
//! ONNX Runtime GenAI.
//!
//! embedding: `input_ids` [batch, sequence] int64 → `inputs_embeds` [batch, sequence, hidden].
//! decoder: `inputs_embeds`, `attention_mask` [batch, total_sequence] int64,
//! `position_ids` [batch, sequence] int64, `past_key_values.{i}.key/.value`
//! [batch, kv_heads, past_sequence, head_dim], `suppress_stops` [batch] bool →
//! `logits` [batch, 1, vocab] f32 (the last position only: generation never needs the
//! others, and on a GPU the full [batch, sequence, vocab] tensor of a prefill is
//! gigabytes), `next_token` [batch] int64 and `next_token_logprob` [batch] f32 (the
//! greedy choice, made where the model runs so a GPU returns 16 bytes per row instead
//! of the logits; stop ids are excluded from it in rows whose `suppress_stops` is
//! set), `present.{i}.key/.value` [batch, kv_heads, total_sequence, head_dim].
//!
//! With fused attention ([`Attention::Fused`]) the decoder takes `seqlens_k` [batch]
//! int32 (each row's length after this call, minus one) and `total_sequence_length`
//! [] int32 (the longest row's) in place of `attention_mask`; the cache inputs and
//! outputs are one preallocated buffer per layer, [batch, kv_heads, capacity,
//! head_dim], bound as both past and present so ONNX Runtime's `GroupQueryAttention`
//! writes each row's new keys at that row's length, in place.
//!
//! Weights are read one tensor at a time from the memory-mapped checkpoint and
//! written straight into the graph (or its external-data file), so exporting an 8B
//! model needs little more memory than its largest tensor.

use candle_core::Tensor;

use super::encoder::GraphError;
use crate::graph_io::decoder::{self as io, FUSED_MAX_POSITIONS};
use crate::manifest::Attention;
use crate::model::llama::LlamaConfig;
use crate::model::lora::Adaptation;
use crate::model::weights::{LoadError, Weights};
use crate::onnx::{DataType, Dim, Graph, Value};

type Result<T> = std::result::Result<T, GraphError>;

/// The embedding table lookup.
pub fn build_embedding(g: &mut Graph, cfg: &LlamaConfig, w: &Weights) -> Result<()> {
    let table = w
        .pp("model.embed_tokens")
        .get("weight", (cfg.vocab_size, cfg.hidden_size))?;
    let table = g.weight("model.embed_tokens.weight", &table)?;
    let ids = g.input(
        io::INPUT_IDS,
        DataType::Int64,
        &[Dim::named("batch"), Dim::named("sequence")],
    );
    let embeds = g.gather(&table, &ids, 0);
    let float = g.float();
    g.output(
        &embeds,
        io::INPUTS_EMBEDS,
        float,
        &[
            Dim::named("batch"),
            Dim::named("sequence"),
            Dim::Fixed(cfg.hidden_size),
        ],
    );
    Ok(())
}

/// The decoder stack, final norm and LM head, and the greedy choice over `stop_ids`'
/// suppression. Returns the paths of the linear modules it wrote (for checking that
/// every adapter module was applied).
pub fn build_decoder(
    g: &mut Graph,
    cfg: &LlamaConfig,
    w: &Weights,
    adaptation: &Adaptation,
    stop_ids: &[u32],
    attention: Attention,
) -> Result<Vec<String>> {
    let float = g.float();
    let fused = attention == Attention::Fused;
    let hidden = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let kv_heads = cfg.num_key_value_heads();
    let head_dim = cfg.head_dim();
    let kv_dims = || {
        vec![
            Dim::named("batch"),
            Dim::Fixed(kv_heads),
            Dim::named(if fused { "capacity" } else { "past_sequence" }),
            Dim::Fixed(head_dim),
        ]
    };

    let embeds = g.input(
        io::INPUTS_EMBEDS,
        float,
        &[
            Dim::named("batch"),
            Dim::named("sequence"),
            Dim::Fixed(hidden),
        ],
    );
    // Eager: a 0/1 mask over every position; fused: each row's length.
    let lengths = if fused {
        let seqlens = g.input(io::SEQLENS_K, DataType::Int32, &[Dim::named("batch")]);
        let total = g.input(io::TOTAL_SEQUENCE_LENGTH, DataType::Int32, &[]);
        Lengths::Fused { seqlens, total }
    } else {
        Lengths::Eager(g.input(
            io::ATTENTION_MASK,
            DataType::Int64,
            &[Dim::named("batch"), Dim::named("total_sequence")],
        ))
    };
    // Eager graphs rotate queries and keys themselves, at `position_ids`; the fused
    // operator rotates them inside, at the positions the rows' lengths imply
    // (`seqlens_k`), from cos/sin tables written into the graph.
    let position_ids = (!fused).then(|| {
        g.input(
            io::POSITION_IDS,
            DataType::Int64,
            &[Dim::named("batch"), Dim::named("sequence")],
        )
    });
    let mut past = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let k = g.input(&io::past_key(i), float, &kv_dims());
        let v = g.input(&io::past_value(i), float, &kv_dims());
        past.push((k, v));
    }

    g.set_scope("rotary");
    let rope = cfg
        .rope()
        .map_err(|m| GraphError::Load(LoadError::config(w.origin().join("config.json"), m)))?;
    let inv_freq = rope.inv_freq(head_dim);
    let rotary = match (&position_ids, &lengths) {
        (Some(position_ids), Lengths::Eager(attention_mask)) => {
            let (cos, sin) = rotary_tables(g, position_ids, &inv_freq);
            g.set_scope("mask");
            let mask = attention_bias(g, &embeds, attention_mask);
            Rotary::Eager { cos, sin, mask }
        }
        _ => {
            let positions = cfg.max_position_embeddings.min(FUSED_MAX_POSITIONS);
            let (cos, sin) = rotary_caches(g, &inv_freq, positions);
            Rotary::Fused { cos, sin }
        }
    };

    let mut x = embeds;
    let mut linear_paths = Vec::new();
    let model = w.pp("model");
    for (i, (past_k, past_v)) in past.iter().enumerate() {
        g.set_scope(&format!("model.layers.{i}"));
        let layer = model.pp("layers").pp(i);
        let attn = layer.pp("self_attn");
        let h = rms_norm(
            g,
            &x,
            &layer.pp("input_layernorm"),
            hidden,
            cfg.rms_norm_eps,
        )?;
        let q_k_v = [
            ("q_proj", heads * head_dim),
            ("k_proj", kv_heads * head_dim),
            ("v_proj", kv_heads * head_dim),
        ];
        let out = match (&lengths, &rotary) {
            (Lengths::Fused { seqlens, total }, Rotary::Fused { cos, sin }) => {
                // One MatMul for q, k and v; the operator takes them packed.
                let qkv = fused_linear(
                    g,
                    &h,
                    &attn,
                    &q_k_v,
                    "qkv_proj",
                    hidden,
                    cfg.attention_bias,
                    adaptation,
                    &mut linear_paths,
                )?;
                let none = Value(String::new());
                let mut outs = g.contrib_op(
                    "GroupQueryAttention",
                    &[&qkv, &none, &none, past_k, past_v, seqlens, total, cos, sin],
                    vec![
                        crate::onnx::attr_int("num_heads", heads as i64),
                        crate::onnx::attr_int("kv_num_heads", kv_heads as i64),
                        crate::onnx::attr_int("do_rotary", 1),
                        crate::onnx::attr_int("rotary_interleaved", 0),
                    ],
                    3,
                );
                let present_v = outs.pop().expect("three outputs");
                let present_k = outs.pop().expect("three outputs");
                let dims = cache_dims(kv_heads, head_dim, "capacity");
                g.output(&present_k, &io::present_key(i), float, &dims);
                g.output(&present_v, &io::present_value(i), float, &dims);
                outs.pop().expect("three outputs")
            }
            (Lengths::Eager(_), Rotary::Eager { cos, sin, mask }) => {
                let mut proj = |g: &mut Graph, (name, out_dim): (&str, usize)| {
                    linear(
                        g,
                        &h,
                        &attn.pp(name),
                        hidden,
                        out_dim,
                        cfg.attention_bias,
                        adaptation,
                        &mut linear_paths,
                    )
                };
                let q = proj(g, q_k_v[0])?;
                let k = proj(g, q_k_v[1])?;
                let v = proj(g, q_k_v[2])?;
                let split = |g: &mut Graph, t: &Value, n: usize| {
                    let r = g.reshape_to(t, &[0, 0, n as i64, head_dim as i64]);
                    g.transpose(&r, &[0, 2, 1, 3])
                };
                let q = split(g, &q, heads);
                let k = split(g, &k, kv_heads);
                let v = split(g, &v, kv_heads);
                let q = apply_rotary(g, &q, cos, sin, head_dim);
                let k = apply_rotary(g, &k, cos, sin, head_dim);
                let k_all = g.concat(&[past_k, &k], 2);
                let v_all = g.concat(&[past_v, &v], 2);
                let dims = cache_dims(kv_heads, head_dim, "total_sequence");
                g.output(&k_all, &io::present_key(i), float, &dims);
                g.output(&v_all, &io::present_value(i), float, &dims);
                let k_rep = repeat_kv(g, &k_all, kv_heads, heads / kv_heads, head_dim);
                let v_rep = repeat_kv(g, &v_all, kv_heads, heads / kv_heads, head_dim);

                // Scores and softmax in f32, as transformers' eager attention does.
                let q32 = g.to_f32(&q);
                let k32 = g.to_f32(&k_rep);
                let kt = g.transpose(&k32, &[0, 1, 3, 2]);
                let scores = g.matmul(&q32, &kt);
                let scale = g.scalar_f32((head_dim as f32).powf(-0.5));
                let scores = g.mul(&scores, &scale);
                let scores = g.add(&scores, mask);
                let probs = g.softmax(&scores, -1);
                let probs = g.from_f32(&probs);
                let out = g.matmul(&probs, &v_rep);
                let out = g.transpose(&out, &[0, 2, 1, 3]);
                g.reshape_to(&out, &[0, 0, (heads * head_dim) as i64])
            }
            _ => unreachable!("the lengths and the rotary tables come from the same choice"),
        };
        let out = linear(
            g,
            &out,
            &attn.pp("o_proj"),
            heads * head_dim,
            hidden,
            cfg.attention_bias,
            adaptation,
            &mut linear_paths,
        )?;
        x = g.add(&x, &out);

        let h = rms_norm(
            g,
            &x,
            &layer.pp("post_attention_layernorm"),
            hidden,
            cfg.rms_norm_eps,
        )?;
        let mlp = layer.pp("mlp");
        // gate and up as one MatMul, split after.
        let inter = cfg.intermediate_size;
        let gate_up = fused_linear(
            g,
            &h,
            &mlp,
            &[("gate_proj", inter), ("up_proj", inter)],
            "gate_up_proj",
            hidden,
            cfg.mlp_bias,
            adaptation,
            &mut linear_paths,
        )?;
        let sizes = g.const_i64(&[inter as i64, inter as i64]);
        let mut halves = g.op_n(
            "Split",
            &[&gate_up, &sizes],
            vec![crate::onnx::attr_int("axis", -1)],
            2,
        );
        let up = halves.pop().expect("two halves");
        let gate = halves.pop().expect("two halves");
        let sig = g.sigmoid(&gate);
        let act = g.mul(&gate, &sig);
        let act = g.mul(&act, &up);
        let down = linear(
            g,
            &act,
            &mlp.pp("down_proj"),
            inter,
            hidden,
            cfg.mlp_bias,
            adaptation,
            &mut linear_paths,
        )?;
        x = g.add(&x, &down);
    }

    g.set_scope("lm_head");
    let last = g.slice(&x, 1, -1, i64::MAX);
    let x = rms_norm(g, &last, &model.pp("norm"), hidden, cfg.rms_norm_eps)?;
    let head: Tensor = if cfg.tie_word_embeddings || !w.contains("lm_head.weight") {
        model
            .pp("embed_tokens")
            .get("weight", (cfg.vocab_size, hidden))?
    } else {
        w.pp("lm_head").get("weight", (cfg.vocab_size, hidden))?
    };
    let logits = g.linear(&x, "lm_head", &head, None)?;
    let logits = g.to_f32(&logits);
    g.output(
        &logits,
        io::LOGITS,
        DataType::Float,
        &[
            Dim::named("batch"),
            Dim::Fixed(1),
            Dim::Fixed(cfg.vocab_size),
        ],
    );
    g.set_scope("greedy");
    greedy_choice(g, &logits, cfg.vocab_size, stop_ids)?;
    adaptation.check_all_applied(&linear_paths, w.origin())?;
    Ok(linear_paths)
}

/// `next_token` = argmax of the logits [B, 1, V] (the first of equal maxima, as the
/// host does), with the stop ids pushed to the lowest f32 in rows whose
/// `suppress_stops` is set; `next_token_logprob` = its log-probability under the
/// unsuppressed softmax.
fn greedy_choice(g: &mut Graph, logits: &Value, vocab: usize, stop_ids: &[u32]) -> Result<()> {
    let suppress = g.input(io::SUPPRESS_STOPS, DataType::Bool, &[Dim::named("batch")]);
    let mut stops = vec![0f32; vocab];
    for &id in stop_ids {
        let slot = stops.get_mut(id as usize).ok_or_else(|| {
            GraphError::Unsupported(format!(
                "stop id {id} is outside the vocabulary of {vocab} tokens"
            ))
        })?;
        *slot = f32::MIN;
    }
    let stops = g.const_float(&stops, &[vocab], DataType::Float);
    let suppress = g.cast(&suppress, DataType::Float);
    let suppress = g.unsqueeze(&suppress, &[1, 2]); // [B, 1, 1]
    let penalty = g.mul(&suppress, &stops); // [B, 1, V]
    let masked = g.add(logits, &penalty);
    let next = g.op(
        "ArgMax",
        &[&masked],
        vec![
            crate::onnx::attr_int("axis", -1),
            crate::onnx::attr_int("keepdims", 0),
        ],
    ); // [B, 1]
    let next = g.squeeze(&next, &[1]);
    g.output(
        &next,
        io::NEXT_TOKEN,
        DataType::Int64,
        &[Dim::named("batch")],
    );
    // log p = x - (m + log Σ exp(x - m)), m the row's maximum: stable in f32.
    let max = g.reduce_max(logits, &[-1], true);
    let shifted = g.sub(logits, &max);
    let exp = g.op("Exp", &[&shifted], vec![]);
    let sum = g.reduce_sum(&exp, &[-1], true);
    let log_sum = g.op("Log", &[&sum], vec![]);
    let log_z = g.add(&max, &log_sum); // [B, 1, 1]
    let best = g.reduce_max(&masked, &[-1], true);
    let logprob = g.sub(&best, &log_z);
    let logprob = g.reshape_to(&logprob, &[-1]);
    g.output(
        &logprob,
        io::NEXT_TOKEN_LOGPROB,
        DataType::Float,
        &[Dim::named("batch")],
    );
    Ok(())
}

/// How queries and keys are rotated: by the graph's own ops from per-call tables
/// (eager), or inside `GroupQueryAttention` from tables of every position (fused).
enum Rotary {
    Eager { cos: Value, sin: Value, mask: Value },
    Fused { cos: Value, sin: Value },
}

/// How a decoder call learns its rows' lengths.
enum Lengths {
    Eager(Value),
    Fused { seqlens: Value, total: Value },
}

fn cache_dims(kv_heads: usize, head_dim: usize, sequence: &str) -> Vec<Dim> {
    vec![
        Dim::named("batch"),
        Dim::Fixed(kv_heads),
        Dim::named(sequence),
        Dim::Fixed(head_dim),
    ]
}

/// A linear layer with its adapters folded in.
#[allow(clippy::too_many_arguments)]
fn linear(
    g: &mut Graph,
    x: &Value,
    w: &Weights,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    adaptation: &Adaptation,
    paths: &mut Vec<String>,
) -> Result<Value> {
    let (weight, bias) = folded(w, in_dim, out_dim, bias, adaptation, paths)?;
    Ok(g.linear(x, w.prefix(), &weight, bias.as_ref())?)
}

/// A linear module's weight [out, in] and bias with its adapters folded in; its path
/// joins `paths` (checked against the adapters' modules after the export).
fn folded(
    w: &Weights,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    adaptation: &Adaptation,
    paths: &mut Vec<String>,
) -> Result<(Tensor, Option<Tensor>)> {
    let layer = adaptation.linear(w, in_dim, out_dim, bias)?;
    if !layer.adapters.is_empty() {
        return Err(GraphError::Unsupported(
            "live LoRA paths cannot be exported; fold the adapters first".into(),
        ));
    }
    paths.push(w.prefix().to_string());
    Ok((layer.base.weight().clone(), layer.base.bias().cloned()))
}

/// Several linear layers over the same input as one MatMul: their folded weights
/// concatenated along the output axis (`parts`: module name and output size), in
/// that order. Written as `{prefix}.{name}`.
#[allow(clippy::too_many_arguments)]
fn fused_linear(
    g: &mut Graph,
    x: &Value,
    w: &Weights,
    parts: &[(&str, usize)],
    name: &str,
    in_dim: usize,
    bias: bool,
    adaptation: &Adaptation,
    paths: &mut Vec<String>,
) -> Result<Value> {
    let mut weights = Vec::with_capacity(parts.len());
    let mut biases = Vec::with_capacity(parts.len());
    for &(part, out_dim) in parts {
        let (weight, b) = folded(&w.pp(part), in_dim, out_dim, bias, adaptation, paths)?;
        weights.push(weight);
        biases.extend(b);
    }
    let tensor_error = |source| {
        GraphError::Onnx(crate::onnx::OnnxError::Tensor {
            name: format!("{}.{name}", w.prefix()),
            source: Box::new(source),
        })
    };
    let weight = Tensor::cat(&weights, 0).map_err(tensor_error)?;
    let bias = if biases.is_empty() {
        None
    } else {
        Some(Tensor::cat(&biases, 0).map_err(tensor_error)?)
    };
    Ok(g.linear(x, &format!("{}.{name}", w.prefix()), &weight, bias.as_ref())?)
}

/// `x / sqrt(mean(x²) + eps) · weight`, in f32.
fn rms_norm(g: &mut Graph, x: &Value, w: &Weights, dim: usize, eps: f64) -> Result<Value> {
    let weight = w.get("weight", dim)?;
    let x32 = g.to_f32(x);
    // Pow rather than x·x: ONNX Runtime fuses this pattern into one
    // SimplifiedLayerNormalization kernel.
    let two = g.scalar_f32(2.0);
    let sq = g.op("Pow", &[&x32, &two], vec![]);
    let mean = g.reduce_mean(&sq, &[-1], true);
    let eps = g.scalar_f32(eps as f32);
    let var = g.add(&mean, &eps);
    let rms = g.op("Sqrt", &[&var], vec![]);
    let normed = g.div(&x32, &rms);
    let normed = g.from_f32(&normed);
    let weight = g.weight(&format!("{}.weight", w.prefix()), &weight)?;
    Ok(g.mul(&normed, &weight))
}

/// cos and sin tables [batch, 1, sequence, head_dim] for the given positions.
fn rotary_tables(g: &mut Graph, position_ids: &Value, inv_freq: &[f32]) -> (Value, Value) {
    let inv = g.const_float(inv_freq, &[inv_freq.len()], DataType::Float);
    let pos = g.cast(position_ids, DataType::Float);
    let pos = g.unsqueeze(&pos, &[-1]); // [B, S, 1]
    let freqs = g.mul(&pos, &inv); // [B, S, D/2]
    let emb = g.concat(&[&freqs, &freqs], -1);
    let cos = g.op("Cos", &[&emb], vec![]);
    let sin = g.op("Sin", &[&emb], vec![]);
    let cos = g.unsqueeze(&cos, &[1]);
    let sin = g.unsqueeze(&sin, &[1]);
    (g.from_f32(&cos), g.from_f32(&sin))
}

/// `GroupQueryAttention`'s cos and sin caches [positions, head_dim / 2] (rotate-half
/// layout), computed as the eager graph computes its tables: angle = position ·
/// inv_freq in f32.
fn rotary_caches(g: &mut Graph, inv_freq: &[f32], positions: usize) -> (Value, Value) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for &f in inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let float = g.float();
    (
        g.const_float(&cos, &[positions, half], float),
        g.const_float(&sin, &[positions, half], float),
    )
}

/// `x · cos + rotate_half(x) · sin`, rotate_half(x) = [-x₂, x₁].
fn apply_rotary(g: &mut Graph, x: &Value, cos: &Value, sin: &Value, head_dim: usize) -> Value {
    let half = (head_dim / 2) as i64;
    let x1 = g.slice(x, -1, 0, half);
    let x2 = g.slice(x, -1, half, head_dim as i64);
    let neg = g.neg(&x2);
    let rotated = g.concat(&[&neg, &x1], -1);
    let a = g.mul(x, cos);
    let b = g.mul(&rotated, sin);
    g.add(&a, &b)
}

/// [B, kv, T, D] → [B, kv·n_rep, T, D] (grouped-query attention).
fn repeat_kv(g: &mut Graph, x: &Value, kv_heads: usize, n_rep: usize, head_dim: usize) -> Value {
    if n_rep == 1 {
        return x.clone();
    }
    let x5 = g.unsqueeze(x, &[2]); // [B, kv, 1, T, D]
    let batch = g.dim(x, 0);
    let total = g.dim(x, 2);
    let kv = g.const_i64(&[kv_heads as i64]);
    let rep = g.const_i64(&[n_rep as i64]);
    let d = g.const_i64(&[head_dim as i64]);
    let shape = g.concat(&[&batch, &kv, &rep, &total, &d], 0);
    let expanded = g.op("Expand", &[&x5, &shape], vec![]);
    g.reshape_to(
        &expanded,
        &[0, (kv_heads * n_rep) as i64, -1, head_dim as i64],
    )
}

/// Additive attention bias [B, 1, S, T] in f32: 0 where a query may attend (causal
/// and not padding), the most negative f32 elsewhere (as transformers does, so a
/// fully masked row stays finite).
fn attention_bias(g: &mut Graph, embeds: &Value, attention_mask: &Value) -> Value {
    let seq = g.dim(embeds, 1);
    let seq = g.squeeze(&seq, &[0]);
    let total = g.dim(attention_mask, 1);
    let total = g.squeeze(&total, &[0]);
    let past = g.sub(&total, &seq);
    let q_pos = g.range(&past, &total); // [S]
    let q_pos = g.unsqueeze(&q_pos, &[1]); // [S, 1]
    let zero = g.scalar_i64(0);
    let k_pos = g.range(&zero, &total); // [T]
    let k_pos = g.unsqueeze(&k_pos, &[0]); // [1, T]
    let causal = g.op("LessOrEqual", &[&k_pos, &q_pos], vec![]); // [S, T]
    let keep = g.cast(attention_mask, DataType::Bool);
    let keep = g.unsqueeze(&keep, &[1, 2]); // [B, 1, 1, T]
    let allowed = g.op("And", &[&causal, &keep], vec![]); // [B, 1, S, T]
    let open = g.scalar_f32(0.0);
    let closed = g.scalar_f32(f32::MIN);
    g.where_(&allowed, &open, &closed)
}

/// Writes `embedding.onnx` and `decoder.onnx` for a Hugging Face Llama directory with
/// `adaptation` folded in. Large models get external-data files.
pub fn export_decoder_files(
    cfg: &LlamaConfig,
    w: &Weights,
    adaptation: &Adaptation,
    stop_ids: &[u32],
    float: DataType,
    attention: Attention,
    out_dir: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>> {
    let bytes_per = float.size() as u64;
    let embed_bytes = (cfg.vocab_size * cfg.hidden_size) as u64 * bytes_per;
    let mut files = Vec::new();

    let path = out_dir.join("embedding.onnx");
    let mut g = if embed_bytes > crate::onnx::INLINE_LIMIT_BYTES {
        Graph::with_external_data("embedding", float, &out_dir.join("embedding.onnx.data"))?
    } else {
        Graph::new("embedding", float)
    };
    build_embedding(&mut g, cfg, w)?;
    files.extend(g.save(&path, env!("CARGO_PKG_VERSION"), &[])?);

    let layer_params = cfg.hidden_size
        * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads())
        * cfg.head_dim()
        + cfg.num_attention_heads * cfg.head_dim() * cfg.hidden_size
        + 3 * cfg.hidden_size * cfg.intermediate_size;
    let decoder_bytes = (layer_params * cfg.num_hidden_layers) as u64 * bytes_per + embed_bytes;
    let path = out_dir.join("decoder.onnx");
    let mut g = if decoder_bytes > crate::onnx::INLINE_LIMIT_BYTES {
        Graph::with_external_data("decoder", float, &out_dir.join("decoder.onnx.data"))?
    } else {
        Graph::new("decoder", float)
    };
    build_decoder(&mut g, cfg, w, adaptation, stop_ids, attention)?;
    files.extend(g.save(&path, env!("CARGO_PKG_VERSION"), &[])?);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeviceSpec;
    use crate::engine::model::host_greedy;
    use crate::engine::runtime::{init_runtime, session_builder};
    use ndarray::Array2;

    /// The graph's greedy choice equals the host's, with and without stop suppression,
    /// including a row whose best logit is a stop id and a tie (first index wins).
    #[test]
    fn greedy_choice_in_the_graph_matches_the_host() {
        init_runtime().expect("ONNX Runtime");
        let vocab = 6;
        let stops = [2u32, 5];
        let mut g = Graph::new("greedy", DataType::Float);
        let logits = g.input(
            io::LOGITS,
            DataType::Float,
            &[Dim::named("batch"), Dim::Fixed(1), Dim::Fixed(vocab)],
        );
        greedy_choice(&mut g, &logits, vocab, &stops).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("greedy.onnx");
        g.save(&path, "test", &[]).unwrap();
        let mut session = session_builder(&DeviceSpec::Cpu, Some(1))
            .unwrap()
            .commit_from_file(&path)
            .unwrap();

        let rows = [
            [0.5f32, 1.0, 3.0, -2.0, 0.0, 1.5], // best are stops 2 and 5
            [0.5, 1.0, 3.0, -2.0, 0.0, 1.5],    // same row, not suppressed
            [4.0, 4.0, -1.0, 0.0, 0.0, 9.0],    // best is stop 5, then a tie
            [-30.0, -1.0, -50.0, 2.0, -3.0, -4.0],
        ];
        let suppress = vec![true, false, true, false];
        let host_logits =
            Array2::from_shape_vec((4, vocab), rows.iter().flatten().copied().collect()).unwrap();
        let expected = host_greedy(&host_logits, &stops, &suppress);
        assert_eq!(expected.tokens, vec![1, 2, 0, 3]);

        let input = ort::value::Tensor::from_array((
            vec![4usize, 1, vocab],
            rows.iter().flatten().copied().collect::<Vec<f32>>(),
        ))
        .unwrap();
        let flags = ort::value::Tensor::from_array((vec![4usize], suppress.clone())).unwrap();
        let outputs = session
            .run(ort::inputs![io::LOGITS => input, io::SUPPRESS_STOPS => flags])
            .unwrap();
        let tokens: Vec<u32> = outputs[io::NEXT_TOKEN]
            .try_extract_array::<i64>()
            .unwrap()
            .iter()
            .map(|&t| t as u32)
            .collect();
        let logprobs: Vec<f32> = outputs[io::NEXT_TOKEN_LOGPROB]
            .try_extract_array::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        assert_eq!(tokens, expected.tokens);
        for (got, want) in logprobs.iter().zip(&expected.logprobs) {
            assert!(
                (got - want).abs() < 1e-5,
                "{logprobs:?} vs {:?}",
                expected.logprobs
            );
        }
    }

    #[test]
    fn a_stop_id_outside_the_vocabulary_is_refused() {
        let mut g = Graph::new("greedy", DataType::Float);
        let logits = g.input(io::LOGITS, DataType::Float, &[Dim::Fixed(1)]);
        let err = greedy_choice(&mut g, &logits, 4, &[7]).unwrap_err();
        assert!(err.to_string().contains("stop id 7"), "{err}");
    }
}
