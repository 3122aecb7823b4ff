//! Synthetic checkpoints: random weights (deterministic for a seed, generated at run
//! time, never committed) written in the formats the real checkpoints use, so that the
//! normal loaders and the exporter run on them unchanged.
//!
//! - BEATs: a `.safetensors` file with the released state dict's names and shapes
//!   (weight-normed `encoder.pos_conv.0.weight_g/_v`, `relative_attention_bias` in every
//!   layer, `grep_linear`, `grep_a`, ...) and its cfg as JSON beside it (`<stem>.json`).
//! - Llama: a Hugging Face model directory: legacy-style `config.json`,
//!   `model.safetensors` or shards with `model.safetensors.index.json`,
//!   `generation_config.json` (stop ids 128001 and 128009) and a copy of a real
//!   Llama 3 `tokenizer.json`.
//! - The projector: `0.weight` [H, D], `0.bias`, `2.weight` [H, H], `2.bias`.
//!
//! Safetensors files are written streaming: the header (every offset) first, then
//! each tensor's data chunk by chunk, so an 8B-parameter model never sits in memory.
//!
//! Values are drawn from their bit patterns, several per 64-bit random word: a random
//! sign, two random exponent bits and a random mantissa give matrix entries in
//! ±[2⁻⁸, 2⁻⁴) (standard deviation ≈ 0.027, like `initializer_range` 0.02), and
//! normalisation weights in [1, 1.125). That is cheap enough to write billions of
//! values even in a debug build, and keeps activations finite through deep stacks.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::beats::BeatsConfig;
use crate::model::projector::Pooling;
use crate::model::sources::ModelSources;

/// Hugging Face's default shard size for `save_pretrained` (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Bytes generated and written per step of the streaming writer.
const CHUNK_BYTES: usize = 8 << 20;

/// The stop ids of the Llama 3 instruct models (`<|end_of_text|>`, `<|eot_id|>`).
pub const LLAMA3_STOP_IDS: [u32; 2] = [128001, 128009];

/// Why a synthetic checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid synthetic model: {0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, SyntheticError>;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SyntheticError + '_ {
    move |source| SyntheticError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------
// Tensors and the streaming safetensors writer
// ---------------------------------------------------------------------------------

/// Element type of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceDtype {
    F32,
    F16,
    Bf16,
}

impl SourceDtype {
    pub fn size(self) -> usize {
        match self {
            SourceDtype::F32 => 4,
            SourceDtype::F16 | SourceDtype::Bf16 => 2,
        }
    }

    /// The safetensors header's name for the type.
    fn safetensors_name(self) -> &'static str {
        match self {
            SourceDtype::F32 => "F32",
            SourceDtype::F16 => "F16",
            SourceDtype::Bf16 => "BF16",
        }
    }

    /// `torch_dtype` of a Hugging Face config.
    fn torch_name(self) -> &'static str {
        match self {
            SourceDtype::F32 => "float32",
            SourceDtype::F16 => "float16",
            SourceDtype::Bf16 => "bfloat16",
        }
    }
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Matrix entries and biases: ±[2⁻⁸, 2⁻⁴), standard deviation ≈ 0.027.
    Weight,
    /// Normalisation weights and gates: [1, 1.125).
    NearOne,
}

/// One tensor of a checkpoint: its published name, shape and how it is drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorSpec {
    fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        }
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// A 64-bit word of lanes: `(random & mask) + base` per lane. Masks keep a sign, the
/// low exponent bits and mantissa bits; the base sets the exponent's floor. No lane
/// can carry into the next, so one addition serves every lane.
fn lane_pattern(dtype: SourceDtype, init: Init) -> (u64, u64) {
    const REPEAT16: u64 = 0x0001_0001_0001_0001;
    const REPEAT32: u64 = 0x0000_0001_0000_0001;
    match (dtype, init) {
        // bf16: sign 15, exponent 7..14 (bias 127), mantissa 0..6.
        // Exponent 119..122 gives magnitudes in [2^-8, 2^-4).
        (SourceDtype::Bf16, Init::Weight) => (0x81FF * REPEAT16, 0x3B80 * REPEAT16),
        (SourceDtype::Bf16, Init::NearOne) => (0x000F * REPEAT16, 0x3F80 * REPEAT16),
        // f16: sign 15, exponent 10..14 (bias 15), mantissa 0..9; exponent 7..10.
        (SourceDtype::F16, Init::Weight) => (0x8FFF * REPEAT16, 0x1C00 * REPEAT16),
        (SourceDtype::F16, Init::NearOne) => (0x007F * REPEAT16, 0x3C00 * REPEAT16),
        // f32: sign 31, exponent 23..30 (bias 127), mantissa 0..22; exponent 119..122.
        (SourceDtype::F32, Init::Weight) => (0x81FF_FFFF * REPEAT32, 0x3B80_0000 * REPEAT32),
        (SourceDtype::F32, Init::NearOne) => (0x000F_FFFF * REPEAT32, 0x3F80_0000 * REPEAT32),
    }
}

/// FNV-1a of a tensor name: each tensor's stream depends only on the seed and its
/// name, not on the order or the shard it is written in.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The random bytes of one tensor, produced a chunk at a time.
struct TensorStream {
    state: u64,
    mask: u64,
    base: u64,
    remaining: u64,
}

impl TensorStream {
    fn new(spec: &TensorSpec, dtype: SourceDtype, seed: u64) -> Self {
        // splitmix64 of seed and name: a well-mixed, non-zero xorshift state.
        let mut z = (seed ^ name_hash(&spec.name)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let (mask, base) = lane_pattern(dtype, spec.init);
        Self {
            state: z | 1,
            mask,
            base,
            remaining: spec.numel() * dtype.size() as u64,
        }
    }

    /// Fills `buf` with up to `buf.len()` of the remaining bytes; returns how many.
    fn fill(&mut self, buf: &mut [u8]) -> usize {
        let n = (buf.len() as u64).min(self.remaining) as usize;
        let (mask, base) = (self.mask, self.base);
        let mut x = self.state;
        let mut words = buf[..n].chunks_exact_mut(8);
        for word in &mut words {
            // xorshift64 (Marsaglia).
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&((x & mask) + base).to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = ((x & mask) + base).to_le_bytes();
            let len = tail.len();
            tail.copy_from_slice(&bytes[..len]);
        }
        self.state = x;
        self.remaining -= n as u64;
        n
    }
}

/// The values a tensor of `spec` gets for `seed`, as f32 (small tensors; tests).
pub fn tensor_values(spec: &TensorSpec, dtype: SourceDtype, seed: u64) -> Vec<f32> {
    let mut stream = TensorStream::new(spec, dtype, seed);
    let mut bytes = vec![0u8; spec.numel() as usize * dtype.size()];
    stream.fill(&mut bytes);
    match dtype {
        SourceDtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        SourceDtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        SourceDtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

#[derive(Serialize)]
struct HeaderEntry<'a> {
    dtype: &'static str,
    shape: &'a [usize],
    data_offsets: [u64; 2],
}

/// Writes `tensors` as a safetensors file, streaming: the header with every offset
/// first, then each tensor's random data in chunks. Returns the bytes of tensor data.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorSpec],
    dtype: SourceDtype,
    seed: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|e| SyntheticError::Invalid(e.to_string()))?,
        );
    }
    let mut offset = 0u64;
    for spec in tensors {
        let len = spec.numel() * dtype.size() as u64;
        let entry = HeaderEntry {
            dtype: dtype.safetensors_name(),
            shape: &spec.shape,
            data_offsets: [offset, offset + len],
        };
        let value =
            serde_json::to_value(entry).map_err(|e| SyntheticError::Invalid(e.to_string()))?;
        if header.insert(spec.name.clone(), value).is_some() {
            return Err(SyntheticError::Invalid(format!(
                "tensor `{}` appears twice",
                spec.name
            )));
        }
        offset += len;
    }
    let mut header =
        serde_json::to_vec(&header).map_err(|e| SyntheticError::Invalid(e.to_string()))?;
    // The data starts 8-byte aligned, as the reference writer pads it.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }

    let file = File::create(path).map_err(io_error(path))?;
    let mut out = BufWriter::with_capacity(CHUNK_BYTES, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io_error(path))?;
    out.write_all(&header).map_err(io_error(path))?;
    let mut chunk = vec![0u8; CHUNK_BYTES];
    for spec in tensors {
        let mut stream = TensorStream::new(spec, dtype, seed);
        loop {
            let n = stream.fill(&mut chunk);
            if n == 0 {
                break;
            }
            out.write_all(&chunk[..n]).map_err(io_error(path))?;
        }
    }
    out.flush().map_err(io_error(path))?;
    Ok(offset)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| SyntheticError::Invalid(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(io_error(path))
}

// ---------------------------------------------------------------------------------
// BEATs
// ---------------------------------------------------------------------------------

/// The released BEATs_iter3+ configuration (AS2M and AS20K checkpoints share it):
/// BEATs-base, about 90 M parameters.
pub fn beats_iter3_plus() -> BeatsConfig {
    BeatsConfig {
        input_patch_size: 16,
        embed_dim: 512,
        conv_bias: false,
        encoder_layers: 12,
        encoder_embed_dim: 768,
        encoder_ffn_embed_dim: 3072,
        encoder_attention_heads: 12,
        activation_fn: "gelu".into(),
        layer_norm_first: false,
        deep_norm: true,
        conv_pos: 128,
        conv_pos_groups: 16,
        relative_position_embedding: true,
        num_buckets: 320,
        max_distance: 800,
        gru_rel_pos: true,
        finetuned_model: false,
        ..BeatsConfig::default()
    }
}

/// The iter3+ switches at the size of the `beats-tiny` fixture: embed_dim 32 →
/// encoder_embed_dim 48, 3 layers, 4 heads.
pub fn beats_tiny() -> BeatsConfig {
    BeatsConfig {
        embed_dim: 32,
        encoder_layers: 3,
        encoder_embed_dim: 48,
        encoder_ffn_embed_dim: 96,
        encoder_attention_heads: 4,
        conv_pos: 16,
        conv_pos_groups: 4,
        num_buckets: 32,
        max_distance: 128,
        ..beats_iter3_plus()
    }
}

/// The state dict of a BEATs checkpoint for `cfg`, with the released names and shapes.
pub fn beats_tensors(cfg: &BeatsConfig) -> Result<Vec<TensorSpec>> {
    cfg.validate().map_err(SyntheticError::Invalid)?;
    let (p, e, d, f) = (
        cfg.input_patch_size,
        cfg.embed_dim,
        cfg.encoder_embed_dim,
        cfg.encoder_ffn_embed_dim,
    );
    let heads = cfg.encoder_attention_heads;
    let mut t = TensorList::default();
    t.weight("patch_embedding.weight", &[e, 1, p, p]);
    if cfg.conv_bias {
        t.weight("patch_embedding.bias", &[e]);
    }
    t.layer_norm("layer_norm", e);
    if e != d {
        t.linear("post_extract_proj", d, e);
    }
    t.weight("encoder.pos_conv.0.bias", &[d]);
    t.near_one("encoder.pos_conv.0.weight_g", &[1, 1, cfg.conv_pos]);
    t.weight(
        "encoder.pos_conv.0.weight_v",
        &[d, d / cfg.conv_pos_groups, cfg.conv_pos],
    );
    for i in 0..cfg.encoder_layers {
        let l = format!("encoder.layers.{i}");
        if cfg.gru_rel_pos {
            t.near_one(&format!("{l}.self_attn.grep_a"), &[1, heads, 1, 1]);
        }
        if cfg.relative_position_embedding {
            // Layer 0's table is shared; the released state dicts hold it in every layer.
            t.weight(
                &format!("{l}.self_attn.relative_attention_bias.weight"),
                &[cfg.num_buckets, heads],
            );
        }
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            t.linear(&format!("{l}.self_attn.{proj}"), d, d);
        }
        if cfg.gru_rel_pos {
            t.linear(&format!("{l}.self_attn.grep_linear"), 8, d / heads);
        }
        t.layer_norm(&format!("{l}.self_attn_layer_norm"), d);
        if cfg.activation_fn == "glu" {
            t.linear(&format!("{l}.fc1.linear"), 2 * f, d);
        } else {
            t.linear(&format!("{l}.fc1"), f, d);
        }
        t.linear(&format!("{l}.fc2"), d, f);
        t.layer_norm(&format!("{l}.final_layer_norm"), d);
    }
    t.layer_norm("encoder.layer_norm", d);
    Ok(t.0)
}

/// Builds a tensor list in state-dict order.
#[derive(Default)]
struct TensorList(Vec<TensorSpec>);

impl TensorList {
    fn weight(&mut self, name: &str, shape: &[usize]) {
        self.0.push(TensorSpec::new(name, shape, Init::Weight));
    }

    fn near_one(&mut self, name: &str, shape: &[usize]) {
        self.0.push(TensorSpec::new(name, shape, Init::NearOne));
    }

    /// `{prefix}.weight` [out, in] and `{prefix}.bias` [out].
    fn linear(&mut self, prefix: &str, out: usize, input: usize) {
        self.weight(&format!("{prefix}.weight"), &[out, input]);
        self.weight(&format!("{prefix}.bias"), &[out]);
    }

    /// `{prefix}.weight` near one and `{prefix}.bias` small.
    fn layer_norm(&mut self, prefix: &str, dim: usize) {
        self.near_one(&format!("{prefix}.weight"), &[dim]);
        self.weight(&format!("{prefix}.bias"), &[dim]);
    }
}

/// Writes a BEATs checkpoint: `path` (`.safetensors`) and its cfg as `<stem>.json`
/// beside it; a fine-tuned cfg (`finetuned_model`) gets its tagging head
/// (`predictor`, `predictor_class` labels). Returns the number of parameters.
pub fn write_beats(path: &Path, cfg: &BeatsConfig, dtype: SourceDtype, seed: u64) -> Result<u64> {
    let mut tensors = beats_tensors(cfg)?;
    if cfg.finetuned_model {
        let mut head = TensorList::default();
        head.linear("predictor", cfg.predictor_class, cfg.encoder_embed_dim);
        tensors.extend(head.0);
    }
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| SyntheticError::Invalid(format!("{}: no file name", path.display())))?;
    let cfg_path = path.with_file_name(format!("{stem}.json"));
    write_json(&cfg_path, cfg)?;
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(path, &tensors, dtype, seed, &metadata)?;
    Ok(tensors.iter().map(TensorSpec::numel).sum())
}

// ---------------------------------------------------------------------------------
// Llama
// ---------------------------------------------------------------------------------

/// The shape of a Llama 3 architecture decoder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    /// Llama 3.1/3.2 `rope_scaling` of type `llama3` with this factor (None: plain RoPE).
    pub llama3_rope_factor: Option<f64>,
    pub tie_word_embeddings: bool,
    pub rms_norm_eps: f64,
}

/// The Llama 3 tokenizer's vocabulary (and every Llama 3 model's `vocab_size`).
pub const LLAMA3_VOCAB: usize = 128_256;

impl LlamaSpec {
    /// Meta-Llama-3-8B(-Instruct): 8.0 B parameters.
    pub fn llama3_8b() -> Self {
        Self {
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            vocab_size: LLAMA3_VOCAB,
            max_position_embeddings: 8192,
            rope_theta: 500_000.0,
            llama3_rope_factor: None,
            tie_word_embeddings: false,
            rms_norm_eps: 1e-5,
        }
    }

    /// Llama-3.2-1B's shape: 1.24 B parameters, tied embeddings, `llama3` RoPE scaling.
    pub fn llama_1b() -> Self {
        Self {
            hidden_size: 2048,
            intermediate_size: 8192,
            num_hidden_layers: 16,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            max_position_embeddings: 131_072,
            llama3_rope_factor: Some(32.0),
            tie_word_embeddings: true,
            ..Self::llama3_8b()
        }
    }

    /// The `e2e-tiny` fixture's shape: hidden 64, 2 layers, 4 heads, 2 key/value heads.
    pub fn tiny() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            ..Self::llama3_8b()
        }
    }

    /// A Llama 3 shaped decoder of `hidden_size` (a multiple of 256) and `layers`:
    /// head_dim 64, 4 query heads per key/value head, intermediate ≈ 3.5 × hidden,
    /// the full vocabulary and an untied head.
    pub fn reduced(hidden_size: usize, layers: usize) -> Self {
        let heads = (hidden_size / 64).max(1);
        Self {
            hidden_size,
            intermediate_size: (hidden_size * 7 / 2).div_ceil(256) * 256,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: (heads / 4).max(1),
            ..Self::llama3_8b()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn validate(&self) -> Result<()> {
        let heads = self.num_attention_heads;
        let kv = self.num_key_value_heads;
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(SyntheticError::Invalid(format!(
                "{heads} attention heads for {kv} key/value heads"
            )));
        }
        if !self.hidden_size.is_multiple_of(heads) || !self.head_dim().is_multiple_of(2) {
            return Err(SyntheticError::Invalid(format!(
                "hidden size {} does not split into {heads} heads of even width",
                self.hidden_size
            )));
        }
        if self.num_hidden_layers == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return Err(SyntheticError::Invalid(
                "layers, vocabulary and intermediate size must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The tensors of `model.safetensors`, with the Hugging Face names.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.num_key_value_heads * self.head_dim();
        let mut t = TensorList::default();
        t.weight("model.embed_tokens.weight", &[v, h]);
        for layer in 0..self.num_hidden_layers {
            let l = format!("model.layers.{layer}");
            t.near_one(&format!("{l}.input_layernorm.weight"), &[h]);
            t.weight(&format!("{l}.self_attn.q_proj.weight"), &[q, h]);
            t.weight(&format!("{l}.self_attn.k_proj.weight"), &[kv, h]);
            t.weight(&format!("{l}.self_attn.v_proj.weight"), &[kv, h]);
            t.weight(&format!("{l}.self_attn.o_proj.weight"), &[h, q]);
            t.near_one(&format!("{l}.post_attention_layernorm.weight"), &[h]);
            t.weight(&format!("{l}.mlp.gate_proj.weight"), &[i, h]);
            t.weight(&format!("{l}.mlp.up_proj.weight"), &[i, h]);
            t.weight(&format!("{l}.mlp.down_proj.weight"), &[h, i]);
        }
        t.near_one("model.norm.weight", &[h]);
        if !self.tie_word_embeddings {
            t.weight("lm_head.weight", &[v, h]);
        }
        t.0
    }

    /// Number of parameters (a tied head counted once).
    pub fn num_parameters(&self) -> u64 {
        self.tensors().iter().map(TensorSpec::numel).sum()
    }

    /// `config.json` in the legacy style Llama 3 was published with.
    pub fn config_json(&self, dtype: SourceDtype) -> serde_json::Value {
        let rope_scaling = match self.llama3_rope_factor {
            Some(factor) => serde_json::json!({
                "factor": factor,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3"
            }),
            None => serde_json::Value::Null,
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 128000,
            "eos_token_id": LLAMA3_STOP_IDS,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": rope_scaling,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype.torch_name(),
            "use_cache": true,
            "vocab_size": self.vocab_size
        })
    }
}

/// How a Llama directory's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LlamaFiles {
    pub dtype: SourceDtype,
    /// Past this many bytes of weights, shards `model-0000i-of-0000n.safetensors`
    /// with `model.safetensors.index.json` are written instead of `model.safetensors`.
    pub max_shard_bytes: u64,
}

impl Default for LlamaFiles {
    fn default() -> Self {
        Self {
            dtype: SourceDtype::Bf16,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// Writes a Hugging Face Llama directory for `spec` into `dir` (created if need be):
/// `config.json`, the weights, `generation_config.json` and a copy of `tokenizer`
/// (a Llama 3 `tokenizer.json`). Returns the weight files written.
pub fn write_llama_dir(
    dir: &Path,
    spec: &LlamaSpec,
    files: &LlamaFiles,
    tokenizer: &Path,
    seed: u64,
) -> Result<Vec<PathBuf>> {
    spec.validate()?;
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    write_json(&dir.join("config.json"), &spec.config_json(files.dtype))?;
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({
            "bos_token_id": 128000,
            "eos_token_id": LLAMA3_STOP_IDS,
            "do_sample": false,
            "transformers_version": "4.40.0"
        }),
    )?;
    // Read and write rather than copy: the copy should not inherit a read-only mode.
    let bytes = std::fs::read(tokenizer).map_err(io_error(tokenizer))?;
    let tokenizer_dst = dir.join("tokenizer.json");
    std::fs::write(&tokenizer_dst, bytes).map_err(io_error(&tokenizer_dst))?;

    let tensors = spec.tensors();
    let size = files.dtype.size() as u64;
    let total: u64 = tensors.iter().map(|t| t.numel() * size).sum();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    if total <= files.max_shard_bytes {
        let path = dir.join("model.safetensors");
        write_safetensors(&path, &tensors, files.dtype, seed, &metadata)?;
        return Ok(vec![path]);
    }
    // Greedy sharding in tensor order, as `save_pretrained` does.
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let bytes = t.numel() * size;
        if current > 0 && current + bytes > files.max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(t);
        }
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut written = Vec::with_capacity(n);
    for (k, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let path = dir.join(&name);
        write_safetensors(&path, shard, files.dtype, seed, &metadata)?;
        for t in shard {
            weight_map.insert(t.name.clone(), name.clone());
        }
        written.push(path);
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map
        }),
    )?;
    Ok(written)
}

// ---------------------------------------------------------------------------------
// Projector and the whole captioner
// ---------------------------------------------------------------------------------

/// Writes the projector (`Linear(D, H) → GELU → Linear(H, H)`) as safetensors.
pub fn write_projector(
    path: &Path,
    encoder_dim: usize,
    hidden: usize,
    dtype: SourceDtype,
    seed: u64,
) -> Result<()> {
    let mut t = TensorList::default();
    t.linear("0", hidden, encoder_dim);
    t.linear("2", hidden, hidden);
    let tensors = t.0;
    write_safetensors(path, &tensors, dtype, seed, &BTreeMap::new())?;
    Ok(())
}

/// A whole synthetic captioner: encoder, decoder and how the decoder is stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyntheticModel {
    pub beats: BeatsConfig,
    pub llama: LlamaSpec,
    pub llama_files: LlamaFiles,
    pub seed: u64,
}

impl SyntheticModel {
    /// Writes `beats.safetensors` (+ `beats.json`), `llm/` and `projector.safetensors`
    /// into `dir` and returns them as export sources (no adapters, mean pooling).
    pub fn write(&self, dir: &Path, tokenizer: &Path) -> Result<ModelSources> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let beats = dir.join("beats.safetensors");
        write_beats(&beats, &self.beats, SourceDtype::F32, self.seed)?;
        let llm = dir.join("llm");
        write_llama_dir(&llm, &self.llama, &self.llama_files, tokenizer, self.seed)?;
        let projector = dir.join("projector.safetensors");
        write_projector(
            &projector,
            self.beats.encoder_embed_dim,
            self.llama.hidden_size,
            SourceDtype::F32,
            self.seed,
        )?;
        Ok(ModelSources {
            beats,
            llm,
            projector,
            adapters: Vec::new(),
            adapter_weights: None,
            prompt_template: None,
            pooling: Pooling::Mean,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::model::beats::Beats;
    use crate::model::llama::{Llama, open_checkpoint};
    use crate::model::lora::Adaptation;
    use crate::model::projector::Projector;
    use crate::test_util::random;

    /// The real Llama 3 tokenizer of the fixtures.
    fn tokenizer() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/e2e-tiny/llm/tokenizer.json")
    }

    fn all_finite(t: &Tensor) -> bool {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    }

    #[test]
    fn values_have_the_intended_scale_for_every_dtype() {
        let weight = TensorSpec::new("w", &[4099], Init::Weight);
        let norm = TensorSpec::new("n", &[1001], Init::NearOne);
        for dtype in [SourceDtype::F32, SourceDtype::F16, SourceDtype::Bf16] {
            let w = tensor_values(&weight, dtype, 7);
            assert_eq!(w.len(), 4099);
            assert!(
                w.iter().all(|v| v.abs() >= 0.0039 && v.abs() < 0.0625),
                "{dtype:?}"
            );
            let mean = w.iter().sum::<f32>() / w.len() as f32;
            let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
            assert!(mean.abs() < 0.003, "{dtype:?} mean {mean}");
            assert!((0.022..0.033).contains(&std), "{dtype:?} std {std}");
            let positive = w.iter().filter(|v| **v > 0.0).count();
            assert!((1800..2300).contains(&positive), "{dtype:?} {positive}");
            let n = tensor_values(&norm, dtype, 7);
            assert!(n.iter().all(|v| (1.0..1.13).contains(v)), "{dtype:?}");
            // Distinct values: the stream is not stuck.
            let mut sorted = n.clone();
            sorted.sort_by(f32::total_cmp);
            sorted.dedup();
            assert!(sorted.len() > 10, "{dtype:?}");
        }
        // Deterministic per seed and name; different for another seed or name.
        let a = tensor_values(&weight, SourceDtype::Bf16, 1);
        assert_eq!(a, tensor_values(&weight, SourceDtype::Bf16, 1));
        assert_ne!(a, tensor_values(&weight, SourceDtype::Bf16, 2));
        let other = TensorSpec::new("w2", &[4099], Init::Weight);
        assert_ne!(a, tensor_values(&other, SourceDtype::Bf16, 1));
    }

    #[test]
    fn safetensors_files_parse_and_hold_the_streamed_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        // Sizes that are not multiples of the 8-byte word, and one past a chunk.
        let specs = vec![
            TensorSpec::new("a", &[3], Init::Weight),
            TensorSpec::new("b", &[CHUNK_BYTES / 2 + 5], Init::Weight),
            TensorSpec::new("c", &[2, 3], Init::NearOne),
        ];
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = write_safetensors(&path, &specs, SourceDtype::Bf16, 3, &metadata).unwrap();
        assert_eq!(bytes, 2 * (3 + CHUNK_BYTES as u64 / 2 + 5 + 6));
        let data = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&data).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        for spec in &specs {
            let t = &tensors[&spec.name];
            assert_eq!(t.dims(), spec.shape.as_slice());
            assert_eq!(t.dtype(), DType::BF16);
            let got = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(
                got,
                tensor_values(spec, SourceDtype::Bf16, 3),
                "{}",
                spec.name
            );
        }
    }

    /// Training's differentiable kernels compute what the fused inference kernels do,
    /// for both normalisation orders, with and without padding.
    #[test]
    fn beats_differentiable_kernels_agree_with_the_fused_ones() {
        let dir = tempfile::tempdir().unwrap();
        for (i, layer_norm_first) in [false, true].into_iter().enumerate() {
            let path = dir.path().join(format!("beats{i}.safetensors"));
            let cfg = BeatsConfig {
                layer_norm_first,
                deep_norm: !layer_norm_first,
                ..beats_tiny()
            };
            write_beats(&path, &cfg, SourceDtype::F32, 4).unwrap();
            let fused = Beats::load(&path, DType::F32, &Device::Cpu).unwrap();
            let composed = Beats::load(&path, DType::F32, &Device::Cpu)
                .unwrap()
                .differentiable();
            let fbank = random(&[2, 64, 128], 6, 2.0, 0.0);
            let a = fused
                .extract_features_for_lengths(&fbank, &[64, 40])
                .unwrap();
            let b = composed
                .extract_features_for_lengths(&fbank, &[64, 40])
                .unwrap();
            let diff = crate::test_util::max_abs_diff(&a.features, &b.features);
            assert!(diff < 1e-4, "layer_norm_first {layer_norm_first}: {diff}");
        }
    }

    #[test]
    fn beats_checkpoints_load_and_give_finite_features() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("beats.safetensors");
        let cfg = beats_tiny();
        let params = write_beats(&path, &cfg, SourceDtype::F32, 1).unwrap();
        assert!(dir.path().join("beats.json").is_file());
        let beats = Beats::load(&path, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(beats.config(), &cfg);
        let fbank = random(&[2, 64, 128], 5, 2.0, 0.0);
        let out = beats.extract_features(&fbank, None).unwrap();
        assert_eq!(out.features.dims(), &[2, 32, 48]);
        assert!(all_finite(&out.features));
        assert!(params > 10_000);

        // The full-size configuration's state dict has the released shapes.
        let tensors = beats_tensors(&beats_iter3_plus()).unwrap();
        let shape = |name: &str| {
            tensors
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.shape.clone())
                .unwrap()
        };
        assert_eq!(shape("encoder.pos_conv.0.weight_g"), vec![1, 1, 128]);
        assert_eq!(shape("encoder.pos_conv.0.weight_v"), vec![768, 48, 128]);
        assert_eq!(
            shape("encoder.layers.11.self_attn.grep_linear.weight"),
            vec![8, 64]
        );
        assert_eq!(
            shape("encoder.layers.11.self_attn.grep_a"),
            vec![1, 12, 1, 1]
        );
        assert_eq!(
            shape("encoder.layers.5.self_attn.relative_attention_bias.weight"),
            vec![320, 12]
        );
        assert_eq!(shape("post_extract_proj.weight"), vec![768, 512]);
        let total: u64 = tensors.iter().map(TensorSpec::numel).sum();
        assert!((89_000_000..92_000_000).contains(&total), "{total}");
    }

    #[test]
    fn llama_presets_have_the_published_sizes() {
        let b8 = LlamaSpec::llama3_8b().num_parameters();
        assert_eq!(b8, 8_030_261_248);
        let b1 = LlamaSpec::llama_1b().num_parameters();
        assert_eq!(b1, 1_235_814_400);
        let reduced = LlamaSpec::reduced(2048, 5);
        assert_eq!(reduced.num_attention_heads, 32);
        assert_eq!(reduced.num_key_value_heads, 8);
        assert_eq!(reduced.intermediate_size, 7168);
    }

    #[test]
    fn llama_directories_load_single_file_and_sharded_alike() {
        let dir = tempfile::tempdir().unwrap();
        let spec = LlamaSpec::tiny();
        let single = dir.path().join("single");
        let files = LlamaFiles::default();
        let written = write_llama_dir(&single, &spec, &files, &tokenizer(), 9).unwrap();
        assert_eq!(written, vec![single.join("model.safetensors")]);

        let sharded = dir.path().join("sharded");
        let small_shards = LlamaFiles {
            max_shard_bytes: 8_000_000,
            ..files
        };
        let written = write_llama_dir(&sharded, &spec, &small_shards, &tokenizer(), 9).unwrap();
        assert!(written.len() >= 3, "{written:?}");
        assert!(sharded.join("model.safetensors.index.json").is_file());

        let (cfg, a) = open_checkpoint(&single, DType::F32, &Device::Cpu).unwrap();
        let (_, b) = open_checkpoint(&sharded, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cfg.num_key_value_heads(), 2);
        assert_eq!(cfg.eos_token_ids(), LLAMA3_STOP_IDS.to_vec());
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let x = a.get_any_shape(name).unwrap();
            let y = b.get_any_shape(name).unwrap();
            assert_eq!(crate::test_util::max_abs_diff(&x, &y), 0.0, "{name}");
        }

        let llama = Llama::load(&sharded, DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let ids = Tensor::new(&[[128000u32, 791, 4062, 128009]], &Device::Cpu).unwrap();
        let logits = llama.forward_ids(&ids, None).unwrap();
        assert_eq!(logits.dims(), &[1, 4, LLAMA3_VOCAB]);
        assert!(all_finite(&logits));
    }

    #[test]
    fn tied_llama_with_rope_scaling_loads() {
        let dir = tempfile::tempdir().unwrap();
        let spec = LlamaSpec {
            tie_word_embeddings: true,
            llama3_rope_factor: Some(32.0),
            max_position_embeddings: 131_072,
            ..LlamaSpec::tiny()
        };
        write_llama_dir(dir.path(), &spec, &LlamaFiles::default(), &tokenizer(), 2).unwrap();
        let llama = Llama::load(dir.path(), DType::F32, &Device::Cpu, &Adaptation::none()).unwrap();
        let ids = Tensor::new(&[[128000u32, 791]], &Device::Cpu).unwrap();
        assert!(all_finite(&llama.forward_ids(&ids, None).unwrap()));
    }

    #[test]
    fn whole_model_sources_load() {
        let dir = tempfile::tempdir().unwrap();
        let model = SyntheticModel {
            beats: beats_tiny(),
            llama: LlamaSpec::tiny(),
            llama_files: LlamaFiles::default(),
            seed: 4,
        };
        let sources = model.write(dir.path(), &tokenizer()).unwrap();
        let projector =
            Projector::load(&sources.projector, Pooling::Mean, DType::F32, &Device::Cpu).unwrap();
        assert_eq!((projector.in_dim(), projector.out_dim()), (48, 64));
        let beats = Beats::load(&sources.beats, DType::F32, &Device::Cpu).unwrap();
        let features = beats
            .extract_features(&random(&[1, 32, 128], 1, 2.0, 0.0), None)
            .unwrap()
            .features;
        let projected = projector.project(&features).unwrap();
        assert!(all_finite(&projected));
    }
}
