//! BERT (Hugging Face `BertModel`) as an encoder, and its WordPiece tokenizer.
//!
//! Weights load by their published names (`embeddings.word_embeddings.weight`,
//! `encoder.layer.N.attention.self.query.weight`, ...) under any prefix the caller
//! picks with [`Weights::pp`], from safetensors or a torch checkpoint; the pooler
//! (`pooler.dense.*`) is never used and never loaded. The numbers follow transformers'
//! eager float32 path: post-norm blocks, an additive attention mask, exact (erf) GELU.
//! Only the last hidden state is returned: sentence embeddings (mean pooling) and
//! classifier heads ([CLS]) are the callers' (`eval::fense`).
//!
//! The tokenizer is the one of `BertTokenizer(Fast)`: the BERT normaliser (clean text,
//! CJK spacing, lower case and accent stripping for uncased models), the BERT
//! pre-tokenizer (whitespace and punctuation) and WordPiece (`##` continuations,
//! `[UNK]` for words longer than 100 characters or not covered). It is read from a
//! model directory's `tokenizer.json` when there is one, else built from `vocab.txt`
//! and the options of `tokenizer_config.json`, so a bare Hugging Face cache snapshot
//! works too.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;

use super::weights::{LoadError, Result, Weights, read_json_config};

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

/// A Hugging Face BERT `config.json`: the fields that change the numbers; others are
/// ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// `gelu` (erf), `gelu_new` / `gelu_pytorch_tanh` (tanh approximation) or `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Only `absolute` is supported.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn read(file: &Path) -> Result<Self> {
        let cfg: Self = read_json_config(file)?;
        cfg.check(file)?;
        Ok(cfg)
    }

    fn check(&self, file: &Path) -> Result<()> {
        let bad = |m: String| Err(LoadError::config(file, m));
        if self.hidden_size == 0 || self.num_attention_heads == 0 {
            return bad("hidden_size and num_attention_heads must be positive".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.max_position_embeddings < 2 || self.type_vocab_size == 0 {
            return bad(
                "max_position_embeddings must be at least 2, type_vocab_size positive".into(),
            );
        }
        if let Some(t) = &self.position_embedding_type
            && t != "absolute"
        {
            return bad(format!(
                "position_embedding_type {t:?} is not supported (only \"absolute\")"
            ));
        }
        Activation::parse(&self.hidden_act)
            .map(|_| ())
            .map_err(|m| LoadError::config(file, m))
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    Gelu,
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(format!(
                "hidden_act {other:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)"
            )),
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
        }
    }
}

// ---------------------------------------------------------------------------------
// Modules
// ---------------------------------------------------------------------------------

/// A linear layer applied to the last dimension of any-rank input as one matrix
/// product (candle's `Linear` batches a 3-D input as many small products).
#[derive(Debug, Clone)]
struct Dense {
    /// [in, out], contiguous: the product needs no transpose.
    weight_t: Tensor,
    bias: Tensor,
}

impl Dense {
    fn load(w: &Weights, input: usize, output: usize) -> Result<Self> {
        let weight = w.get("weight", (output, input))?;
        let weight_t = weight
            .t()
            .and_then(|t| t.contiguous())
            .map_err(|e| w.tensor_error("weight", e))?;
        Ok(Dense {
            weight_t,
            bias: w.get("bias", output)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let input = dims[dims.len() - 1];
        let rows = x.elem_count() / input.max(1);
        let y = x
            .reshape((rows, input))?
            .matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?;
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.bias.dim(0)?;
        y.reshape(out)
    }
}

/// `LayerNorm.weight`/`.bias`, or the `gamma`/`beta` of older TensorFlow-converted
/// checkpoints.
fn layer_norm(w: &Weights, dim: usize, eps: f64) -> Result<candle_nn::LayerNorm> {
    if !w.contains("weight") && w.contains("gamma") {
        let weight = w.get("gamma", dim)?;
        let bias = w.get("beta", dim)?;
        return Ok(candle_nn::LayerNorm::new(weight, bias, eps));
    }
    w.layer_norm(dim, eps)
}

#[derive(Debug, Clone)]
struct Embeddings {
    words: Tensor,
    positions: Tensor,
    /// Row 0 of the token-type table: every token is of type 0 here.
    token_type_0: Tensor,
    norm: candle_nn::LayerNorm,
}

impl Embeddings {
    fn load(w: &Weights, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let types = w.get("token_type_embeddings.weight", (cfg.type_vocab_size, h))?;
        let token_type_0 = types
            .narrow(0, 0, 1)
            .map_err(|e| w.tensor_error("token_type_embeddings.weight", e))?;
        Ok(Embeddings {
            words: w.get("word_embeddings.weight", (cfg.vocab_size, h))?,
            positions: w.get(
                "position_embeddings.weight",
                (cfg.max_position_embeddings, h),
            )?,
            token_type_0,
            norm: layer_norm(&w.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
        })
    }

    /// `ids` [B, T] u32 → [B, T, H].
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.words.dim(1)?;
        let words = self
            .words
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let positions = self.positions.narrow(0, 0, t)?.unsqueeze(0)?;
        let x = words
            .broadcast_add(&positions)?
            .broadcast_add(&self.token_type_0.unsqueeze(0)?)?;
        candle_core::Module::forward(&self.norm, &x)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attention_out: Dense,
    attention_norm: candle_nn::LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: candle_nn::LayerNorm,
    heads: usize,
    activation: Activation,
}

impl Layer {
    fn load(w: &Weights, cfg: &BertConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let attention = w.pp("attention");
        let this = attention.pp("self");
        Ok(Layer {
            query: Dense::load(&this.pp("query"), h, h)?,
            key: Dense::load(&this.pp("key"), h, h)?,
            value: Dense::load(&this.pp("value"), h, h)?,
            attention_out: Dense::load(&attention.pp("output").pp("dense"), h, h)?,
            attention_norm: layer_norm(
                &attention.pp("output").pp("LayerNorm"),
                h,
                cfg.layer_norm_eps,
            )?,
            intermediate: Dense::load(&w.pp("intermediate").pp("dense"), h, i)?,
            output: Dense::load(&w.pp("output").pp("dense"), i, h)?,
            output_norm: layer_norm(&w.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
            activation: Activation::parse(&cfg.hidden_act)
                .map_err(|m| LoadError::config(w.origin(), m))?,
        })
    }

    /// `x` [B, T, H], `mask` [B, 1, 1, T] additive (0 or a large negative number);
    /// the output [B, rows, H] holds the first `rows` positions only (each attends
    /// to all T; the rest of the block is per position).
    fn forward(&self, x: &Tensor, mask: &Tensor, rows: usize) -> candle_core::Result<Tensor> {
        let x_all = x;
        let (b, t, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |y: Tensor, len: usize| {
            y.reshape((b, len, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let x = if rows == t {
            x.clone()
        } else {
            x.narrow(1, 0, rows)?.contiguous()?
        };
        let q = split(self.query.forward(&x)?, rows)?;
        let k = split(self.key.forward(x_all)?, t)?;
        let v = split(self.value.forward(x_all)?, t)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, rows, h))?;
        let attended = self.attention_out.forward(&context)?;
        let x = candle_core::Module::forward(&self.attention_norm, &(attended + x)?)?;
        let inner = self.activation.apply(&self.intermediate.forward(&x)?)?;
        let out = self.output.forward(&inner)?;
        candle_core::Module::forward(&self.output_norm, &(out + x)?)
    }
}

/// The BERT encoder: embeddings and the transformer blocks.
#[derive(Debug, Clone)]
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    config: BertConfig,
}

impl BertModel {
    /// Loads `embeddings.*` and `encoder.layer.{0..N}.*` under `w`'s prefix.
    pub fn load(w: &Weights, config: &BertConfig) -> Result<Self> {
        let embeddings = Embeddings::load(&w.pp("embeddings"), config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(&w.pp("encoder").pp("layer").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(BertModel {
            embeddings,
            layers,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The last hidden state [B, T, H] of `ids` [B, T] (u32) where `mask` [B, T]
    /// (f32, 1 for a token, 0 for padding) says which positions are real. Every
    /// token has type 0.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        self.run(ids, mask, false)
    }

    /// The last hidden state of the first token ([CLS]) only, [B, H]: what a
    /// classifier head reads. The last block computes that one position (its keys
    /// and values still come from every token), so it costs less than
    /// [`BertModel::forward`] and gives the same numbers.
    pub fn forward_first_token(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        self.run(ids, mask, true)?.squeeze(1)
    }

    fn run(&self, ids: &Tensor, mask: &Tensor, first_only: bool) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            candle_core::bail!(
                "{t} tokens, more than the model's {} positions",
                self.config.max_position_embeddings
            );
        }
        // (1 - mask) * f32::MIN, as transformers' extended attention mask.
        let additive = ((mask.ones_like()? - mask)? * f64::from(f32::MIN))?
            .to_dtype(DType::F32)?
            .reshape((b, 1, 1, t))?;
        let mut x = self.embeddings.forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let last = i + 1 == self.layers.len();
            let rows = if first_only && last { 1 } else { t };
            x = layer.forward(&x, &additive, rows)?;
        }
        if first_only && self.layers.is_empty() {
            x = x.narrow(1, 0, 1)?;
        }
        Ok(x)
    }
}

/// Token ids of several sentences padded into one batch: `ids` [B, T] u32 (padding
/// `pad`), `mask` [B, T] f32 (1 real, 0 padding), with T the longest sentence.
pub fn pad_batch(
    sentences: &[&[u32]],
    pad: u32,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let t = sentences.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(sentences.len() * t);
    let mut mask = Vec::with_capacity(sentences.len() * t);
    for s in sentences {
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(pad, t - s.len()));
        mask.extend(std::iter::repeat_n(1f32, s.len()));
        mask.extend(std::iter::repeat_n(0f32, t - s.len()));
    }
    let shape = (sentences.len(), t);
    Ok((
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

/// Mean of the hidden states over the real tokens, [B, T, H] → [B, H]
/// (sentence-transformers' mean pooling: sum / count, count clamped at 1e-9).
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.unsqueeze(D::Minus1)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    sum.broadcast_div(&count)
}

// ---------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------

/// What a BERT tokenizer directory's `tokenizer_config.json` says about the
/// normaliser (used when the tokenizer is built from `vocab.txt`).
#[derive(Debug, Clone, Deserialize)]
struct TokenizerOptions {
    #[serde(default = "yes")]
    do_lower_case: bool,
    /// `null`: follow `do_lower_case`.
    #[serde(default)]
    strip_accents: Option<bool>,
    #[serde(default = "yes")]
    tokenize_chinese_chars: bool,
    #[serde(default = "unk")]
    unk_token: String,
}

impl Default for TokenizerOptions {
    fn default() -> Self {
        TokenizerOptions {
            do_lower_case: true,
            strip_accents: None,
            tokenize_chinese_chars: true,
            unk_token: unk(),
        }
    }
}

fn yes() -> bool {
    true
}
fn unk() -> String {
    "[UNK]".into()
}

/// A BERT WordPiece tokenizer that adds `[CLS]` … `[SEP]` and truncates.
#[derive(Clone)]
pub struct BertTokenizer {
    inner: tokenizers::Tokenizer,
    /// The file it was read from (`tokenizer.json` or `vocab.txt`).
    source: PathBuf,
    pub cls: u32,
    pub sep: u32,
    pub pad: u32,
}

impl std::fmt::Debug for BertTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertTokenizer")
            .field("source", &self.source)
            .finish()
    }
}

impl BertTokenizer {
    /// `dir/tokenizer.json`, else `dir/vocab.txt` with `dir/tokenizer_config.json`'s
    /// options (when present).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            let inner = tokenizers::Tokenizer::from_file(&json).map_err(|e| LoadError::Format {
                file: json.clone(),
                format: "tokenizer.json",
                message: e.to_string(),
            })?;
            return Self::new(inner, json);
        }
        let vocab = dir.join("vocab.txt");
        if !vocab.is_file() {
            return Err(LoadError::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no tokenizer.json or vocab.txt in this directory",
                ),
            ));
        }
        let config = dir.join("tokenizer_config.json");
        let options = if config.is_file() {
            read_json_config(&config)?
        } else {
            TokenizerOptions::default()
        };
        Self::from_vocab(&vocab, &options)
    }

    fn from_vocab(vocab: &Path, options: &TokenizerOptions) -> Result<Self> {
        use tokenizers::models::wordpiece::WordPiece;
        use tokenizers::normalizers::bert::BertNormalizer;
        use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
        let format = |message: String| LoadError::Format {
            file: vocab.to_path_buf(),
            format: "WordPiece vocab.txt",
            message,
        };
        let path = vocab
            .to_str()
            .ok_or_else(|| format("the path is not UTF-8".into()))?;
        let model = WordPiece::from_file(path)
            .unk_token(options.unk_token.clone())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| format(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner
            .with_normalizer(Some(BertNormalizer::new(
                true,
                options.tokenize_chinese_chars,
                options.strip_accents,
                options.do_lower_case,
            )))
            .map_err(|e| format(e.to_string()))?;
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        // Special tokens in the text are kept whole, as the Python tokenizer does.
        let specials: Vec<tokenizers::AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| tokenizers::AddedToken::from(t.to_string(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| format(e.to_string()))?;
        Self::new(inner, vocab.to_path_buf())
    }

    fn new(inner: tokenizers::Tokenizer, source: PathBuf) -> Result<Self> {
        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| {
                LoadError::config(&source, format!("the vocabulary has no {token} token"))
            })
        };
        Ok(BertTokenizer {
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            pad: id("[PAD]")?,
            inner,
            source,
        })
    }

    /// Where the tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// `[CLS] tokens… [SEP]`, the tokens cut so that the whole is at most `max_len`
    /// (≥ 2) ids, as `tokenizer(text, truncation=True, max_length=max_len)`.
    pub fn encode(&self, text: &str, max_len: usize) -> std::result::Result<Vec<u32>, String> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| format!("tokenizing {text:?}: {e}"))?;
        let body = encoding.get_ids();
        let keep = body.len().min(max_len.saturating_sub(2));
        let mut ids = Vec::with_capacity(keep + 2);
        ids.push(self.cls);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.sep);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/fense-tiny")
    }

    #[test]
    fn vocab_txt_and_tokenizer_json_tokenize_alike() {
        let dir = fixture().join("sbert");
        let json = BertTokenizer::from_dir(&dir).unwrap();
        assert!(json.source().ends_with("tokenizer.json"));
        let opts = read_json_config(&dir.join("tokenizer_config.json")).unwrap();
        let vocab = BertTokenizer::from_vocab(&dir.join("vocab.txt"), &opts).unwrap();
        for text in [
            "the café's door créaks open... slowly",
            "A Woman speaks, then a baby CRIES!",
            "中文字 and Ünïcödé, tabs\tand\u{0}control [CLS] [MASK]",
            &"x".repeat(101),
            "",
        ] {
            assert_eq!(
                json.encode(text, 128).unwrap(),
                vocab.encode(text, 128).unwrap(),
                "{text}"
            );
        }
        let ids = json.encode("a b c d e f", 5).unwrap();
        assert_eq!(ids.len(), 5);
        assert_eq!((ids[0], ids[4]), (json.cls, json.sep));
    }

    #[test]
    fn configs_outside_the_supported_set_are_errors_naming_the_file() {
        let cfg = BertConfig {
            vocab_size: 10,
            hidden_size: 30,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            intermediate_size: 8,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            max_position_embeddings: 16,
            type_vocab_size: 2,
            position_embedding_type: None,
        };
        let e = cfg.check(Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("c.json") && e.contains("not a multiple"), "{e}");
        let relative = BertConfig {
            hidden_size: 32,
            position_embedding_type: Some("relative_key".into()),
            ..cfg.clone()
        };
        assert!(relative.check(Path::new("c.json")).is_err());
        let swish = BertConfig {
            hidden_size: 32,
            hidden_act: "swish".into(),
            ..cfg
        };
        assert!(swish.check(Path::new("c.json")).is_err());
    }
}
