//! FENSE, SBERT-sim, the fluency error rate and SPIDEr-FL, as aac-metrics 0.6.0
//! (`aac_metrics.functional.fense`, `fer`, `sbert_sim`, `spider_fl`) computes them
//! with the original FENSE models (Zhou et al., 2022).
//!
//! - SBERT-sim: every caption (raw text) is embedded by a Sentence-BERT
//!   (`paraphrase-TinyBERT-L6-v2`): BERT, mean pooling over the real tokens, L2
//!   normalisation. A candidate's similarity is the mean cosine with its references
//!   (however many it has).
//! - The fluency-error detector (`echecker_clotho_audiocaps_base.ckpt`): the candidate
//!   with punctuation removed and lower-cased, at most 64 tokens, BERT's [CLS] hidden
//!   state, a linear layer, a sigmoid; the last output is P(error). A candidate is
//!   flagged when P(error) > 0.9 (strict).
//! - FENSE = SBERT-sim × (1 − 0.9 × flagged), i.e. ×0.1 when flagged; SPIDEr-FL is
//!   SPIDEr × the same factor. Corpus scores are plain means over the candidates.
//!
//! Both models run on candle ([`crate::model::bert`]) on the CPU. Each distinct
//! sentence is embedded once, and sentences are batched by token length so padding
//! costs almost nothing (padding is masked and does not change the numbers).
//! Nothing is downloaded: the user places the published files (see [`FensePaths`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::jvm::Unavailable;
use super::{EvalError, check_pairs};
use crate::model::bert::{BertConfig, BertModel, BertTokenizer, mean_pool, pad_batch};
use crate::model::checkpoint::{read_torch_state_dict, read_torch_value};
use crate::model::weights::{LoadError, Weights, read_json_config};

/// The Sentence-BERT folder inside the models folder.
pub const SBERT_DIR: &str = "sbert";
/// The fluency-error detector's file name, as published.
pub const DETECTOR_FILE: &str = "echecker_clotho_audiocaps_base.ckpt";
/// P(error) above this flags a candidate.
pub const ERROR_THRESHOLD: f64 = 0.9;
/// A flagged candidate's score is multiplied by `1 - PENALTY`.
pub const PENALTY: f64 = 0.9;
/// The detector's input length (its training length; longer inputs are cut).
pub const DETECTOR_MAX_TOKENS: usize = 64;
/// Tokens (sentences × padded length) per forward pass.
const BATCH_TOKENS: usize = 8192;
/// Sentences per forward pass at most.
const BATCH_SENTENCES: usize = 512;

const SETUP: &str = "FENSE needs two published models, placed once in a folder given with \
    --fense-models DIR: DIR/sbert/ = the whole Hugging Face repository \
    sentence-transformers/paraphrase-TinyBERT-L6-v2 (modules.json, 1_Pooling/config.json, \
    sentence_bert_config.json, config.json, model.safetensors or pytorch_model.bin, \
    tokenizer.json or vocab.txt); DIR/echecker_clotho_audiocaps_base.ckpt = the fluency-error \
    detector from the fense project's release \
    (https://github.com/blmoistawinde/fense/releases/download/V0.1/echecker_clotho_audiocaps_base.ckpt, \
    sha256 1a719f09…74a2fa); DIR/bert-base-uncased/ = config.json and vocab.txt or \
    tokenizer.json of the Hugging Face model bert-base-uncased (no weights needed). \
    --sbert, --fluency-detector and --fluency-detector-base override each part";

/// Where the FENSE models are. `models` holds the published layout; the others
/// override one part each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FensePaths {
    /// A folder with `sbert/`, `echecker_clotho_audiocaps_base.ckpt` and a folder
    /// named after the detector's `model_type` (`bert-base-uncased/`).
    pub models: Option<PathBuf>,
    /// A sentence-transformers model folder (default `models/sbert`).
    pub sbert: Option<PathBuf>,
    /// The detector checkpoint (default `models/echecker_clotho_audiocaps_base.ckpt`).
    pub detector: Option<PathBuf>,
    /// The detector's base model folder: `config.json` + tokenizer files (default: the
    /// folder named after its `model_type` in `models`, else beside the checkpoint).
    pub detector_base: Option<PathBuf>,
}

impl FensePaths {
    /// Whether any location was given.
    pub fn is_configured(&self) -> bool {
        self.models.is_some()
            || self.sbert.is_some()
            || self.detector.is_some()
            || self.detector_base.is_some()
    }

    /// All parts under one models folder.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        FensePaths {
            models: Some(dir.into()),
            ..Default::default()
        }
    }
}

/// Why the FENSE models could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FenseError {
    /// No location was given.
    #[error("{SETUP}")]
    NotConfigured,
    /// A part is not where it should be.
    #[error("FENSE: no {what} at {} ({SETUP})", path.display())]
    Missing { what: &'static str, path: PathBuf },
    /// A part is there but cannot be read.
    #[error("FENSE: {0}")]
    Load(#[from] LoadError),
    /// A model folder is laid out in a way this port does not compute.
    #[error("FENSE: {}: {message}", file.display())]
    Unsupported { file: PathBuf, message: String },
    #[error(transparent)]
    Input(#[from] EvalError),
    /// The models failed while scoring.
    #[error("FENSE: {0}")]
    Compute(String),
}

impl FenseError {
    /// The reason as the report shows it.
    pub fn unavailable(&self) -> Unavailable {
        Unavailable(self.to_string())
    }
}

fn compute(e: impl std::fmt::Display) -> FenseError {
    FenseError::Compute(e.to_string())
}

fn existing(path: PathBuf, what: &'static str) -> Result<PathBuf, FenseError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(FenseError::Missing { what, path })
    }
}

// ---------------------------------------------------------------------------------
// Sentence-BERT
// ---------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Default, Deserialize)]
struct SentenceBertConfig {
    #[serde(default)]
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Debug, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

/// The weights of a Hugging Face BERT folder: `model.safetensors`, else
/// `pytorch_model.bin` (a torch zip checkpoint), with the `BertModel` names under no
/// prefix or under `bert.`.
fn bert_weights(dir: &Path, device: &Device) -> Result<Weights, FenseError> {
    let safetensors = dir.join("model.safetensors");
    let bin = dir.join("pytorch_model.bin");
    let weights = if safetensors.is_file() {
        Weights::from_safetensors(dir, &[safetensors], DType::F32, device)?
    } else if bin.is_file() {
        let tensors = read_torch_state_dict(&bin, None)?;
        Weights::from_tensors(&bin, tensors, DType::F32, device)
    } else {
        return Err(FenseError::Missing {
            what: "model.safetensors or pytorch_model.bin",
            path: dir.to_path_buf(),
        });
    };
    Ok(
        if weights.contains("bert.embeddings.word_embeddings.weight") {
            weights.pp("bert")
        } else {
            weights
        },
    )
}

/// A sentence-transformers model of a BERT and mean pooling.
#[derive(Debug, Clone)]
pub struct SentenceBert {
    model: BertModel,
    tokenizer: BertTokenizer,
    max_seq_length: usize,
    lower_case: bool,
    dir: PathBuf,
}

impl SentenceBert {
    /// Reads a sentence-transformers folder as published: `modules.json` (a
    /// Transformer, a mean Pooling and optionally a Normalize), the Transformer's
    /// `sentence_bert_config.json`, `config.json`, weights and tokenizer.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, FenseError> {
        let modules_file = existing(
            dir.join("modules.json"),
            "sentence-transformers modules.json",
        )?;
        let modules: Vec<ModuleEntry> = read_json_config(&modules_file)?;
        let unsupported = |message: String| FenseError::Unsupported {
            file: modules_file.clone(),
            message,
        };
        let mut transformer = None;
        let mut pooling = None;
        for m in &modules {
            match m.kind.rsplit('.').next().unwrap_or("") {
                "Transformer" if transformer.is_none() => transformer = Some(dir.join(&m.path)),
                "Pooling" if pooling.is_none() => pooling = Some(dir.join(&m.path)),
                "Normalize" => {} // the embeddings are normalised anyway
                _ => {
                    return Err(unsupported(format!(
                        "module {} is not supported (a Transformer, a Pooling and a Normalize are)",
                        m.kind
                    )));
                }
            }
        }
        let (Some(model_dir), Some(pooling_dir)) = (transformer, pooling) else {
            return Err(unsupported(
                "needs a Transformer and a Pooling module".to_string(),
            ));
        };
        let pooling_file = existing(pooling_dir.join("config.json"), "pooling config.json")?;
        let p: PoolingConfig = read_json_config(&pooling_file)?;
        if !p.pooling_mode_mean_tokens
            || p.pooling_mode_cls_token
            || p.pooling_mode_max_tokens
            || p.pooling_mode_mean_sqrt_len_tokens
            || p.pooling_mode_weightedmean_tokens
            || p.pooling_mode_lasttoken
        {
            return Err(FenseError::Unsupported {
                file: pooling_file,
                message: "only mean pooling (pooling_mode_mean_tokens alone) is supported"
                    .to_string(),
            });
        }
        let st_file = model_dir.join("sentence_bert_config.json");
        let st: SentenceBertConfig = if st_file.is_file() {
            read_json_config(&st_file)?
        } else {
            SentenceBertConfig::default()
        };
        let config = BertConfig::read(&existing(model_dir.join("config.json"), "config.json")?)?;
        let weights = bert_weights(&model_dir, device)?;
        let model = BertModel::load(&weights, &config)?;
        let tokenizer = BertTokenizer::from_dir(&model_dir)?;
        let max_seq_length = st
            .max_seq_length
            .unwrap_or(config.max_position_embeddings)
            .clamp(2, config.max_position_embeddings);
        Ok(SentenceBert {
            model,
            tokenizer,
            max_seq_length,
            lower_case: st.do_lower_case,
            dir: dir.to_path_buf(),
        })
    }

    /// A model from its parts (the benchmark's random weights).
    pub fn from_parts(
        model: BertModel,
        tokenizer: BertTokenizer,
        max_seq_length: usize,
        dir: PathBuf,
    ) -> Self {
        SentenceBert {
            model,
            tokenizer,
            max_seq_length,
            lower_case: false,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The BERT underneath (for checks of its hidden states).
    pub fn model(&self) -> &BertModel {
        &self.model
    }

    /// The padding id of its tokenizer.
    pub fn pad_id(&self) -> u32 {
        self.tokenizer.pad
    }

    /// Token ids of one sentence, as sentence-transformers feeds them.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, FenseError> {
        let lowered;
        let text = if self.lower_case {
            lowered = text.to_lowercase();
            &lowered
        } else {
            text
        };
        self.tokenizer
            .encode(text, self.max_seq_length)
            .map_err(FenseError::Compute)
    }

    /// L2-normalised embeddings, one row per sentence.
    pub fn embed(&self, sentences: &[&str]) -> Result<Vec<Vec<f32>>, FenseError> {
        let ids = sentences
            .iter()
            .map(|s| self.tokenize(s))
            .collect::<Result<Vec<_>, _>>()?;
        let pooled = run_batches(&ids, self.tokenizer.pad, |batch_ids, mask| {
            let hidden = self.model.forward(batch_ids, mask)?;
            let pooled = mean_pool(&hidden, mask)?;
            // F.normalize: x / max(‖x‖, 1e-12).
            let norm = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            pooled.broadcast_div(&norm)
        })?;
        Ok(pooled)
    }
}

/// Runs `forward` over `ids` in batches of similar length and returns its rows in the
/// order of `ids`.
fn run_batches(
    ids: &[Vec<u32>],
    pad: u32,
    forward: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Vec<Vec<f32>>, FenseError> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| (ids[i].len(), i));
    let mut rows: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
    let mut start = 0;
    while start < order.len() {
        // Sorted by length: the batch's last sentence is its longest.
        let mut end = start + 1;
        while end < order.len()
            && end - start < BATCH_SENTENCES
            && (end + 1 - start) * ids[order[end]].len() <= BATCH_TOKENS
        {
            end += 1;
        }
        let batch: Vec<&[u32]> = order[start..end].iter().map(|&i| &ids[i][..]).collect();
        let (batch_ids, mask) = pad_batch(&batch, pad, &Device::Cpu).map_err(compute)?;
        let out = forward(&batch_ids, &mask)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec2::<f32>())
            .map_err(compute)?;
        for (&i, row) in order[start..end].iter().zip(out) {
            rows[i] = row;
        }
        start = end;
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------
// The fluency-error detector
// ---------------------------------------------------------------------------------

/// FENSE's `BERTFlatClassifier`: a BERT and a linear layer on its [CLS] state.
#[derive(Debug, Clone)]
pub struct FluencyDetector {
    encoder: BertModel,
    /// [C, H] and [C].
    clf_weight: Tensor,
    clf_bias: Tensor,
    tokenizer: BertTokenizer,
    source: PathBuf,
}

impl FluencyDetector {
    /// Reads the published checkpoint (a torch zip pickle of `{"model_type",
    /// "num_classes", "state_dict"}`) and the base model folder its `model_type`
    /// names: `base` when given, else `models/<model_type>`, else
    /// `<checkpoint's folder>/<model_type>`.
    pub fn load(
        checkpoint: &Path,
        base: Option<&Path>,
        models: Option<&Path>,
        device: &Device,
    ) -> Result<Self, FenseError> {
        let checkpoint = existing(
            checkpoint.to_path_buf(),
            "fluency-error detector checkpoint",
        )?;
        let header = read_torch_value(&checkpoint)?;
        let field = |key: &str| {
            header.get(key).cloned().ok_or_else(|| {
                LoadError::config(&checkpoint, format!("the checkpoint has no {key:?} entry"))
            })
        };
        let model_type = field("model_type")?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| LoadError::config(&checkpoint, "model_type is not a string"))?;
        // A hub name (`bert-base-uncased`, `org/name`) names a folder: never one
        // outside the folders it is looked up in.
        if model_type.is_empty()
            || Path::new(&model_type)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(LoadError::config(
                &checkpoint,
                format!("model_type {model_type:?} is not a model name"),
            )
            .into());
        }
        let num_classes = field("num_classes")?
            .as_u64()
            .filter(|&n| (1..=4096).contains(&n))
            .ok_or_else(|| LoadError::config(&checkpoint, "num_classes is not a small count"))?
            as usize;
        let base = match base {
            Some(b) => existing(b.to_path_buf(), "detector base model folder")?,
            None => {
                // `model_type` is a hub name (`bert-base-uncased`, maybe `org/name`):
                // a folder of that name.
                let candidates: Vec<PathBuf> = models
                    .into_iter()
                    .map(Path::to_path_buf)
                    .chain(checkpoint.parent().map(Path::to_path_buf))
                    .map(|d| d.join(&model_type))
                    .collect();
                match candidates.iter().find(|d| d.join("config.json").is_file()) {
                    Some(d) => d.clone(),
                    None => {
                        return Err(FenseError::Missing {
                            what: "folder with the detector's base model config.json and \
                                   tokenizer (named after the checkpoint's model_type)",
                            path: candidates.into_iter().next().unwrap_or_default(),
                        });
                    }
                }
            }
        };
        let config = BertConfig::read(&existing(base.join("config.json"), "config.json")?)?;
        let tokenizer = BertTokenizer::from_dir(&base)?;
        let tensors = read_torch_state_dict(&checkpoint, Some("state_dict"))?;
        let weights = Weights::from_tensors(&checkpoint, tensors, DType::F32, device);
        Ok(Self::from_parts(&weights, &config, tokenizer, num_classes)?)
    }

    /// A detector from weights named as the checkpoint's state dict (`encoder.*`,
    /// `clf.weight`, `clf.bias`).
    pub fn from_parts(
        weights: &Weights,
        config: &BertConfig,
        tokenizer: BertTokenizer,
        num_classes: usize,
    ) -> Result<Self, LoadError> {
        let encoder = BertModel::load(&weights.pp("encoder"), config)?;
        let clf = weights.pp("clf");
        Ok(FluencyDetector {
            encoder,
            clf_weight: clf.get("weight", (num_classes, config.hidden_size))?,
            clf_bias: clf.get("bias", num_classes)?,
            tokenizer,
            source: weights.origin().to_path_buf(),
        })
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The BERT underneath (for checks of its hidden states).
    pub fn encoder(&self) -> &BertModel {
        &self.encoder
    }

    /// Token ids of one candidate as the detector sees it.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, FenseError> {
        self.tokenizer
            .encode(&detector_text(text), DETECTOR_MAX_TOKENS)
            .map_err(FenseError::Compute)
    }

    /// Sigmoid outputs per sentence (all classes; the last is P(error)).
    pub fn probabilities(&self, sentences: &[&str]) -> Result<Vec<Vec<f32>>, FenseError> {
        let ids = sentences
            .iter()
            .map(|s| self.tokenize(s))
            .collect::<Result<Vec<_>, _>>()?;
        run_batches(&ids, self.tokenizer.pad, |batch_ids, mask| {
            let cls = self.encoder.forward_first_token(batch_ids, mask)?;
            let logits = cls
                .matmul(&self.clf_weight.t()?)?
                .broadcast_add(&self.clf_bias)?;
            candle_nn::ops::sigmoid(&logits)
        })
    }
}

/// The detector's input: `re.sub(r"[^\w\s]", "", text).lower()`: everything but
/// letters, digits, `_` and whitespace removed, then lower case. (Python's `\w` is
/// `str.isalnum()`; Rust's alphanumerics differ from it only on some combining vowel
/// signs of Indic scripts.)
pub fn detector_text(text: &str) -> String {
    text.chars()
        .filter(|&c| {
            c.is_alphanumeric() || c == '_' || c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
        })
        .collect::<String>()
        .to_lowercase()
}

// ---------------------------------------------------------------------------------
// Scores
// ---------------------------------------------------------------------------------

/// FENSE's numbers for one candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct FenseClip {
    /// Mean cosine similarity with the references.
    pub sbert_sim: f64,
    /// The detector's P(error).
    pub p_error: f64,
    /// `p_error > 0.9`.
    pub has_error: bool,
    /// `sbert_sim × penalty_factor`.
    pub fense: f64,
}

impl FenseClip {
    /// 0.1 when flagged, else 1.
    pub fn penalty_factor(&self) -> f64 {
        penalty_factor(self.has_error)
    }
}

/// `1 - 0.9 × has_error`.
pub fn penalty_factor(has_error: bool) -> f64 {
    1.0 - PENALTY * f64::from(u8::from(has_error))
}

/// Corpus FENSE scores and the per-candidate numbers they are the means of.
#[derive(Debug, Clone, PartialEq)]
pub struct FenseScores {
    pub sbert_sim: f64,
    /// Fraction of candidates flagged.
    pub fluency_error_rate: f64,
    pub fense: f64,
    pub per_clip: Vec<FenseClip>,
}

impl FenseScores {
    /// SPIDEr-FL (corpus mean, per candidate) from per-candidate SPIDEr.
    pub fn spider_fl(&self, spider: &[f64]) -> (f64, Vec<f64>) {
        let per_clip: Vec<f64> = spider
            .iter()
            .zip(&self.per_clip)
            .map(|(s, c)| s * c.penalty_factor())
            .collect();
        (mean(&per_clip), per_clip)
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Both FENSE models, loaded.
#[derive(Debug, Clone)]
pub struct FenseModels {
    pub sbert: SentenceBert,
    pub detector: FluencyDetector,
}

impl FenseModels {
    /// Loads the models from `paths` on the CPU.
    pub fn load(paths: &FensePaths) -> Result<Self, FenseError> {
        if !paths.is_configured() {
            return Err(FenseError::NotConfigured);
        }
        let part = |given: &Option<PathBuf>, name: &str, what: &'static str| match (
            given,
            &paths.models,
        ) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(m)) => Ok(m.join(name)),
            (None, None) => Err(FenseError::Missing {
                what,
                path: PathBuf::from(format!("DIR/{name}")),
            }),
        };
        let device = Device::Cpu;
        let sbert_dir = part(&paths.sbert, SBERT_DIR, "Sentence-BERT folder (--sbert)")?;
        let sbert = SentenceBert::load(&existing(sbert_dir, "Sentence-BERT folder")?, &device)?;
        let checkpoint = part(
            &paths.detector,
            DETECTOR_FILE,
            "fluency-error detector (--fluency-detector)",
        )?;
        let detector = FluencyDetector::load(
            &checkpoint,
            paths.detector_base.as_deref(),
            paths.models.as_deref(),
            &device,
        )?;
        Ok(FenseModels { sbert, detector })
    }

    /// Scores `candidates[i]` against `references[i]` (any number each, at least one).
    pub fn score<'a>(
        &self,
        candidates: &'a [String],
        references: &'a [Vec<String>],
    ) -> Result<FenseScores, FenseError> {
        check_pairs(candidates, references)?;
        if let Some(index) = references.iter().position(Vec::is_empty) {
            return Err(EvalError::NoReferences { index }.into());
        }
        // Every distinct sentence is embedded once.
        let mut slot: HashMap<&str, usize> = HashMap::new();
        let mut unique: Vec<&str> = Vec::new();
        let mut slot_of = |s: &'a str| -> usize {
            *slot.entry(s).or_insert_with(|| {
                unique.push(s);
                unique.len() - 1
            })
        };
        let cand_slots: Vec<usize> = candidates.iter().map(|c| slot_of(c)).collect();
        let ref_slots: Vec<Vec<usize>> = references
            .iter()
            .map(|rs| rs.iter().map(|r| slot_of(r)).collect())
            .collect();
        let embeddings = self.sbert.embed(&unique)?;

        // The detector sees each distinct candidate once.
        let mut cand_index: HashMap<&str, usize> = HashMap::new();
        let mut distinct: Vec<&str> = Vec::new();
        let cand_rows: Vec<usize> = candidates
            .iter()
            .map(|c| {
                *cand_index.entry(c.as_str()).or_insert_with(|| {
                    distinct.push(c);
                    distinct.len() - 1
                })
            })
            .collect();
        let probabilities = self.detector.probabilities(&distinct)?;

        let per_clip: Vec<FenseClip> = cand_slots
            .iter()
            .zip(&ref_slots)
            .zip(&cand_rows)
            .map(|((&c, refs), &row)| {
                let cand = &embeddings[c];
                let sims: Vec<f64> = refs
                    .iter()
                    .map(|&r| f64::from(dot(cand, &embeddings[r])))
                    .collect();
                let sbert_sim = mean(&sims);
                let p_error = probabilities[row].last().copied().map_or(0.0, f64::from);
                let has_error = p_error > ERROR_THRESHOLD;
                FenseClip {
                    sbert_sim,
                    p_error,
                    has_error,
                    fense: sbert_sim * penalty_factor(has_error),
                }
            })
            .collect();
        let column = |f: fn(&FenseClip) -> f64| mean(&per_clip.iter().map(f).collect::<Vec<_>>());
        Ok(FenseScores {
            sbert_sim: column(|c| c.sbert_sim),
            fluency_error_rate: column(|c| f64::from(u8::from(c.has_error))),
            fense: column(|c| c.fense),
            per_clip,
        })
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPIDEr-FL of the fixture's given per-candidate SPIDEr values and flags.
    #[test]
    fn spider_fl_is_spider_times_the_penalty() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/fense-tiny/reference.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
        let number = |v: &serde_json::Value| v.as_f64().unwrap();
        let cands = reference["candidates"].as_array().unwrap();
        let scores = FenseScores {
            sbert_sim: 0.0,
            fluency_error_rate: 0.0,
            fense: 0.0,
            per_clip: cands
                .iter()
                .map(|c| FenseClip {
                    sbert_sim: 0.0,
                    p_error: number(&c["p_error"]),
                    has_error: c["has_error"].as_bool().unwrap(),
                    fense: 0.0,
                })
                .collect(),
        };
        let spider: Vec<f64> = cands.iter().map(|c| number(&c["spider_input"])).collect();
        let (corpus, per_clip) = scores.spider_fl(&spider);
        for ((ours, c), clip) in per_clip.iter().zip(cands).zip(&scores.per_clip) {
            assert!((ours - number(&c["spider_fl"])).abs() <= 1e-9, "{ours} {c}");
            assert_eq!(clip.penalty_factor(), number(&c["penalty_factor"]));
        }
        let want = number(&reference["corpus"]["spider_fl"]);
        assert!((corpus - want).abs() <= 1e-9, "{corpus} {want}");
        assert!(cands.iter().any(|c| c["has_error"] == true));
    }

    #[test]
    fn the_detector_text_drops_punctuation_keeps_letters_digits_and_underscores() {
        assert_eq!(
            detector_text("The Café's door, créaks open... 3_times!"),
            "the cafés door créaks open 3_times"
        );
        assert_eq!(detector_text("a\tb\nc"), "a\tb\nc");
    }
}
