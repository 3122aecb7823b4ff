//! Training files: the TOML `audiocap train --config` reads (examples in
//! `pipelines/train-*.toml`, every key documented in `pipelines/README.md`).
//!
//! Loaded like pipeline files: `--set section.key=value` overrides, every key of
//! every section deserialised on its own, then one pure [`TrainConfig::validate`], so
//! a bad file gets every problem listed at once. Relative paths are relative to the
//! working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{
    self, ConfigErrors, ConfigProblem, DeviceSpec, Schema, check_section, check_sections, count_in,
    problem,
};
use crate::model::prompt::{AUDIO_PLACEHOLDER, DEFAULT_PROMPT_TEMPLATE};

/// A whole training file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Checkpoints the run starts from.
    pub model: CheckpointsSection,
    /// The LoRA adapters trained on the frozen decoder.
    pub lora: LoraSection,
    /// The cache of frozen encoder features.
    pub features: FeaturesSection,
    /// AdamW and the learning-rate schedule.
    pub optimizer: OptimizerSection,
    /// Batches, seeds, logging, checkpoints and validation.
    pub training: TrainingSection,
    /// The stages, run in order; each starts from the previous one's result.
    pub stages: Vec<StageSection>,
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointsSection {
    /// BEATs checkpoint (`.pt` as published, or `.safetensors`).
    pub beats: String,
    /// Hugging Face Llama directory (config.json, safetensors, tokenizer.json).
    pub llm: String,
    /// Prompt with one `<|audio|>`; default: the recipe's prompt in the Llama 3 chat template.
    pub prompt_template: String,
    /// The frozen weights' dtype on the device: `f32` or `bf16` (trainable
    /// parameters, their gradients and the optimiser state are f32 in both; f16 is
    /// refused until a reference checks it).
    pub dtype: String,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    pub device: String,
    /// Hidden width of the projector; 0 = the decoder's hidden size.
    pub projector_hidden: usize,
    /// Start the first stage from this projector instead of a fresh one.
    pub init_projector: Option<String>,
    /// A fresh projector's last layer is scaled before the first step so its audio
    /// embeddings have the RMS of the decoder's token embeddings (PyTorch's default
    /// initialisation gives ~10x more on a small decoder, which the decoder's RMS
    /// norms hide from the gradient while it swamps the residual stream).
    pub projector_embedding_scale: bool,
    /// Start the first stage from this PEFT adapter instead of a fresh one.
    pub init_adapter: Option<String>,
    /// Where the run writes checkpoints, metrics and its result.
    pub output: String,
}

impl Default for CheckpointsSection {
    fn default() -> Self {
        Self {
            beats: String::new(),
            llm: String::new(),
            prompt_template: DEFAULT_PROMPT_TEMPLATE.to_string(),
            dtype: "f32".to_string(),
            device: "cpu".to_string(),
            projector_hidden: 0,
            init_projector: None,
            projector_embedding_scale: true,
            init_adapter: None,
            output: String::new(),
        }
    }
}

/// `[lora]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    pub r: usize,
    pub alpha: f64,
    /// Dropout on the LoRA paths' input while training.
    pub dropout: f64,
    /// Llama module names to adapt.
    pub target_modules: Vec<String>,
}

impl Default for LoraSection {
    /// The recipe: r = 16, dropout 0.05 on q and k projections (alpha 32, PEFT's
    /// common 2r).
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: vec!["q_proj".into(), "k_proj".into()],
        }
    }
}

/// `[features]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeaturesSection {
    /// Cache folder; default `<output>/feature-cache`. Share it between runs.
    pub cache: Option<String>,
    /// Clips are cut to at most this many seconds before the encoder.
    pub max_seconds: f64,
}

impl Default for FeaturesSection {
    fn default() -> Self {
        Self {
            cache: None,
            max_seconds: 30.0,
        }
    }
}

/// `[optimizer]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSection {
    /// Learning rate at the end of the warm-up.
    pub peak_lr: f64,
    /// Fraction of each run's steps spent warming up linearly.
    pub warmup_fraction: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 = none.
    pub max_grad_norm: f64,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            peak_lr: 3e-4,
            warmup_fraction: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
        }
    }
}

/// Which validation number picks the best checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BestMetric {
    /// Highest CIDEr-D of greedy captions.
    #[default]
    CiderD,
    /// Lowest validation loss.
    Loss,
    /// Highest FENSE of greedy captions (needs `training.fense_models`).
    Fense,
}

/// `[training]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSection {
    /// (clip, caption) pairs per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accumulation: usize,
    /// Seed of shuffling, initialisation and dropout (stages may list their own).
    pub seed: u64,
    /// Captions longer than this (in tokens) are cut.
    pub max_caption_tokens: usize,
    /// A progress/metrics line every N optimiser steps.
    pub log_every_steps: u64,
    /// A resumable checkpoint every N optimiser steps (and at every epoch end); 0 =
    /// epoch ends only.
    pub checkpoint_every_steps: u64,
    /// Validation every N epochs (and after the last); 0 = only after the last.
    pub eval_every_epochs: usize,
    /// Greedy-caption length limit in validation.
    pub eval_max_new_tokens: usize,
    /// Validation clips captioned (the loss uses all); 0 = all.
    pub eval_max_clips: usize,
    /// What picks the best checkpoint.
    pub best_metric: BestMetric,
    /// A folder with FENSE's models (the layout of `audiocap eval --fense-models`):
    /// validation then reports FENSE, SBERT-sim and the fluency error rate.
    pub fense_models: Option<String>,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            batch_size: 8,
            grad_accumulation: 1,
            seed: 42,
            max_caption_tokens: 64,
            log_every_steps: 10,
            checkpoint_every_steps: 500,
            eval_every_epochs: 1,
            eval_max_new_tokens: 30,
            eval_max_clips: 0,
            best_metric: BestMetric::CiderD,
            fense_models: None,
        }
    }
}

/// A captions table and its audio.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetSection {
    /// Clotho CSV (`file_name, caption_1..5`), AudioCaps CSV (`audiocap_id,
    /// youtube_id, start_time, caption`) or a generic manifest (Parquet/CSV/JSON lines).
    pub captions: String,
    /// Folder the audio files are in (searched recursively).
    pub audio: String,
    /// Column naming the audio in a generic manifest (default: detected).
    pub key_column: Option<String>,
}

/// How a stage's LoRA starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// From the previous stage's adapter (or `model.init_adapter`).
    #[default]
    Continue,
    /// A fresh adapter per run (the recipe's extra runs that are merged).
    Fresh,
}

/// `[[stages]]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageSection {
    /// Folder name of the stage under `<output>/stages/`.
    pub name: String,
    pub train: DatasetSection,
    /// Scored every `training.eval_every_epochs`; none = the last epoch is kept.
    pub validation: Option<DatasetSection>,
    pub epochs: usize,
    /// Whether the projector trains in this stage (false: fixed, as in stage 3).
    pub train_projector: bool,
    pub lora_init: LoraInit,
    /// One run per seed (default: one run with `training.seed`). Several runs are
    /// merged by PEFT `cat` with equal weights.
    pub seeds: Vec<u64>,
    /// With several runs: also merge the previous stage's adapter (the recipe's
    /// "five in all").
    pub merge_with_previous: bool,
    /// Overrides `optimizer.peak_lr` for this stage.
    pub peak_lr: Option<f64>,
}

impl Default for StageSection {
    fn default() -> Self {
        Self {
            name: String::new(),
            train: DatasetSection::default(),
            validation: None,
            epochs: 1,
            train_projector: true,
            lora_init: LoraInit::Continue,
            seeds: Vec::new(),
            merge_with_previous: false,
            peak_lr: None,
        }
    }
}

impl StageSection {
    /// The seeds of this stage's runs.
    pub fn run_seeds(&self, default: u64) -> Vec<u64> {
        if self.seeds.is_empty() {
            vec![default]
        } else {
            self.seeds.clone()
        }
    }
}

const SCHEMA: Schema<TrainConfig> = Schema {
    check_keys,
    validate: TrainConfig::validate,
    flat: false,
};

impl TrainConfig {
    /// Reads, overrides and validates a training file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigErrors> {
        config::load(path, overrides, &SCHEMA)
    }

    /// [`TrainConfig::load`] on text already read.
    pub fn parse(text: &str, file: &str, overrides: &[String]) -> Result<Self, ConfigErrors> {
        config::parse(text, file, overrides, &SCHEMA)
    }

    /// Checks values and combinations; every problem at once. No I/O.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut p = Vec::new();
        let m = &self.model;
        for (key, value) in [
            ("model.beats", &m.beats),
            ("model.llm", &m.llm),
            ("model.output", &m.output),
        ] {
            if value.trim().is_empty() {
                p.push(problem(key, "missing"));
            }
        }
        if m.prompt_template.matches(AUDIO_PLACEHOLDER).count() != 1 {
            p.push(problem(
                "model.prompt_template",
                format!("must contain {AUDIO_PLACEHOLDER} exactly once"),
            ));
        }
        if m.dtype == "f16" {
            p.push(problem(
                "model.dtype",
                "f16 frozen weights are not supported for training (no reference run \
                 checks them, and f16 activations of an 8B Llama can overflow): use bf16 \
                 or f32",
            ));
        } else if !matches!(m.dtype.as_str(), "f32" | "bf16") {
            p.push(problem("model.dtype", "expected f32 or bf16"));
        }
        if let Err(e) = m.device.parse::<DeviceSpec>() {
            p.push(problem("model.device", e.to_string()));
        }
        let l = &self.lora;
        count_in(&mut p, "lora.r", l.r, 1..=1024);
        if !positive(l.alpha) {
            p.push(problem("lora.alpha", "must be positive"));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            p.push(problem("lora.dropout", "must be in [0, 1)"));
        }
        if l.target_modules.is_empty() {
            p.push(problem("lora.target_modules", "name at least one module"));
        }
        for t in &l.target_modules {
            if !LLAMA_MODULES.contains(&t.as_str()) {
                p.push(problem(
                    "lora.target_modules",
                    format!(
                        "`{t}` is not a Llama linear layer ({})",
                        LLAMA_MODULES.join(", ")
                    ),
                ));
            }
        }
        if !(positive(self.features.max_seconds) && self.features.max_seconds <= 3600.0) {
            p.push(problem(
                "features.max_seconds",
                "must be positive and at most 3600",
            ));
        }
        let o = &self.optimizer;
        if !positive(o.peak_lr) {
            p.push(problem("optimizer.peak_lr", "must be positive"));
        }
        if !(0.0..=1.0).contains(&o.warmup_fraction) {
            p.push(problem("optimizer.warmup_fraction", "must be in [0, 1]"));
        }
        if !non_negative(o.weight_decay) {
            p.push(problem("optimizer.weight_decay", "must be zero or more"));
        }
        for (key, beta) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                p.push(problem(key, "must be in [0, 1)"));
            }
        }
        if !positive(o.eps) {
            p.push(problem("optimizer.eps", "must be positive"));
        }
        if !non_negative(o.max_grad_norm) {
            p.push(problem(
                "optimizer.max_grad_norm",
                "must be zero (off) or positive",
            ));
        }
        let t = &self.training;
        // Upper bounds far beyond real runs keep step counts and buffer sizes from
        // overflowing.
        for (key, value) in [
            ("training.batch_size", t.batch_size),
            ("training.grad_accumulation", t.grad_accumulation),
            ("training.max_caption_tokens", t.max_caption_tokens),
            ("training.eval_max_new_tokens", t.eval_max_new_tokens),
        ] {
            count_in(&mut p, key, value, 1..=4096);
        }
        count_in(
            &mut p,
            "training.log_every_steps",
            t.log_every_steps,
            1..=1_000_000_000,
        );
        if t.best_metric == BestMetric::Fense && t.fense_models.is_none() {
            p.push(problem(
                "training.best_metric",
                "\"fense\" needs training.fense_models (a folder with sbert/, \
                 echecker_clotho_audiocaps_base.ckpt and bert-base-uncased/)",
            ));
        }
        if t.fense_models.as_ref().is_some_and(|d| d.trim().is_empty()) {
            p.push(problem(
                "training.fense_models",
                "empty; leave it out or name a folder",
            ));
        }
        if self.stages.is_empty() {
            p.push(problem("stages", "add at least one [[stages]] table"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.stages.iter().enumerate() {
            let at = |key: &str| format!("stages[{i}].{key}");
            if s.name.trim().is_empty() {
                p.push(problem(at("name"), "missing"));
            } else if !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                p.push(problem(at("name"), "use letters, digits, - and _ only"));
            } else if !names.insert(s.name.clone()) {
                p.push(problem(
                    at("name"),
                    format!("`{}` names two stages", s.name),
                ));
            }
            for (key, d) in std::iter::once(("train", &s.train))
                .chain(s.validation.as_ref().map(|v| ("validation", v)))
            {
                if d.captions.trim().is_empty() {
                    p.push(problem(at(&format!("{key}.captions")), "missing"));
                }
                if d.audio.trim().is_empty() {
                    p.push(problem(at(&format!("{key}.audio")), "missing"));
                }
            }
            count_in(&mut p, &at("epochs"), s.epochs, 1..=100_000);
            if s.peak_lr.is_some_and(|lr| !positive(lr)) {
                p.push(problem(at("peak_lr"), "must be positive"));
            }
            let runs = s.run_seeds(t.seed).len();
            if runs > 1 && s.train_projector {
                p.push(problem(
                    at("seeds"),
                    "several runs share one projector: set train_projector = false",
                ));
            }
            if s.merge_with_previous && i == 0 && m.init_adapter.is_none() {
                p.push(problem(
                    at("merge_with_previous"),
                    "the first stage has no previous adapter (set model.init_adapter)",
                ));
            }
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    pub fn output(&self) -> PathBuf {
        PathBuf::from(&self.model.output)
    }

    /// The feature cache folder.
    pub fn cache_dir(&self) -> PathBuf {
        match &self.features.cache {
            Some(c) => PathBuf::from(c),
            None => self.output().join("feature-cache"),
        }
    }

    /// The file as TOML (written next to the run's results).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// `x > 0`, false for NaN.
fn positive(x: f64) -> bool {
    x > 0.0
}

/// `x >= 0`, false for NaN.
fn non_negative(x: f64) -> bool {
    x >= 0.0
}

/// Module names `lora.target_modules` may use.
pub const LLAMA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn check_keys(table: &toml::Table) -> Vec<ConfigProblem> {
    // `[[stages]]` is an array of tables: each stage is checked on its own.
    let mut problems = Vec::new();
    let mut sections = table.clone();
    match sections.remove("stages") {
        Some(toml::Value::Array(stages)) => {
            for (i, stage) in stages.iter().enumerate() {
                let at = format!("stages[{i}]");
                match stage {
                    toml::Value::Table(t) => problems.extend(check_section::<StageSection>(&at, t)),
                    _ => problems.push(problem(at, "must be a table (`[[stages]]`)")),
                }
            }
        }
        Some(_) => problems.push(problem(
            "stages",
            "must be an array of tables (`[[stages]]`)",
        )),
        None => {}
    }
    problems.extend(check_sections(
        &sections,
        &[
            ("model", check_section::<CheckpointsSection>),
            ("lora", check_section::<LoraSection>),
            ("features", check_section::<FeaturesSection>),
            ("optimizer", check_section::<OptimizerSection>),
            ("training", check_section::<TrainingSection>),
            ("stages", |_, _| Vec::new()),
        ],
    ));
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [model]
        beats = "beats.pt"
        llm = "llm/"
        output = "runs/x"
        [[stages]]
        name = "clotho"
        epochs = 2
        train = { captions = "dev.csv", audio = "dev/" }
    "#;

    #[test]
    fn counts_beyond_any_real_run_are_problems_not_overflows() {
        let set: Vec<String> = [
            "training.batch_size=18446744073709551615",
            "training.grad_accumulation=100000",
            "training.log_every_steps=0",
            "lora.r=100000",
            "features.max_seconds=1e20",
        ]
        .map(String::from)
        .into();
        let mut text = MINIMAL.replace("epochs = 2", "epochs = 9223372036854775807");
        text.push('\n');
        let err = TrainConfig::parse(&text, "t.toml", &set).unwrap_err();
        let ats: Vec<&str> = err.problems.iter().map(|p| p.at.as_str()).collect();
        for key in [
            "training.batch_size",
            "training.grad_accumulation",
            "training.log_every_steps",
            "lora.r",
            "features.max_seconds",
            "stages[0].epochs",
        ] {
            assert!(ats.contains(&key), "{key} not in {err}");
        }
    }

    #[test]
    fn a_minimal_file_takes_the_recipe_defaults() {
        let c = TrainConfig::parse(MINIMAL, "t.toml", &[]).unwrap();
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.lora.dropout, 0.05);
        assert_eq!(c.lora.target_modules, ["q_proj", "k_proj"]);
        assert_eq!(c.optimizer.peak_lr, 3e-4);
        assert_eq!(c.optimizer.warmup_fraction, 0.1);
        assert_eq!(c.model.prompt_template, DEFAULT_PROMPT_TEMPLATE);
        assert_eq!(c.stages[0].run_seeds(c.training.seed), vec![42]);
        assert_eq!(c.cache_dir(), PathBuf::from("runs/x/feature-cache"));
        let again = TrainConfig::parse(&c.to_toml(), "again.toml", &[]).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn f16_frozen_weights_are_refused_with_the_reason() {
        let bf16 = TrainConfig::parse(MINIMAL, "t.toml", &["model.dtype=\"bf16\"".into()]);
        assert_eq!(bf16.unwrap().model.dtype, "bf16");
        let err =
            TrainConfig::parse(MINIMAL, "t.toml", &["model.dtype=\"f16\"".into()]).unwrap_err();
        let problem = err.problems.iter().find(|p| p.at == "model.dtype").unwrap();
        assert!(problem.to_string().contains("use bf16 or f32"), "{err}");
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let text = r#"
            [model]
            beats = ""
            llm = "llm/"
            output = "o"
            dtype = "int8"
            colour = "red"
            [lora]
            r = 0
            target_modules = ["q_proj", "qkv"]
            [optimizer]
            peak_lr = "fast"
            [[stages]]
            name = "a b"
            epochs = 0
            seeds = [1, 2]
            [[stages]]
            name = "x"
            train = { captions = "c.csv", audio = "a/" }
            dataset = 3
        "#;
        let err = TrainConfig::parse(text, "t.toml", &[]).unwrap_err();
        let at: Vec<&str> = err.problems.iter().map(|p| p.at.as_str()).collect();
        assert!(at.contains(&"model.colour"), "{err}");
        assert!(at.contains(&"optimizer.peak_lr"), "{err}");
        assert!(at.contains(&"stages[1].dataset"), "{err}");
        // Value problems are listed once the keys are right.
        let fixed = text
            .replace("colour = \"red\"", "")
            .replace("peak_lr = \"fast\"", "")
            .replace("dataset = 3", "");
        let err = TrainConfig::parse(&fixed, "t.toml", &[]).unwrap_err();
        let at: Vec<&str> = err.problems.iter().map(|p| p.at.as_str()).collect();
        for expected in [
            "model.beats",
            "model.dtype",
            "lora.r",
            "lora.target_modules",
            "stages[0].name",
            "stages[0].train.captions",
            "stages[0].epochs",
            "stages[0].seeds",
        ] {
            assert!(at.contains(&expected), "{expected} missing from {err}");
        }
    }

    #[test]
    fn best_metric_fense_needs_the_models() {
        let set = ["training.best_metric=\"fense\"".to_string()];
        let err = TrainConfig::parse(MINIMAL, "t.toml", &set).unwrap_err();
        let p = err.problems.iter().find(|p| p.at == "training.best_metric");
        assert!(
            p.is_some_and(|p| p.to_string().contains("fense_models")),
            "{err}"
        );
        let with = [
            set[0].clone(),
            "training.fense_models=\"models/fense\"".into(),
        ];
        let c = TrainConfig::parse(MINIMAL, "t.toml", &with).unwrap();
        assert_eq!(c.training.best_metric, BestMetric::Fense);
        assert_eq!(c.training.fense_models.as_deref(), Some("models/fense"));
    }

    #[test]
    fn overrides_reach_stage_free_sections() {
        let c = TrainConfig::parse(
            MINIMAL,
            "t.toml",
            &["training.batch_size=2".into(), "lora.r=4".into()],
        )
        .unwrap();
        assert_eq!((c.training.batch_size, c.lora.r), (2, 4));
        // The pipeline files' device grammar: any case, `cuda:N`.
        for device in ["CUDA", "cuda:1"] {
            let set = [format!("model.device={device}")];
            assert!(
                TrainConfig::parse(MINIMAL, "t.toml", &set).is_ok(),
                "{device}"
            );
        }
        let err = TrainConfig::parse(MINIMAL, "t.toml", &["model.device=tpu".into()]).unwrap_err();
        assert_eq!(err.problems[0].at, "model.device", "{err}");
    }
}
