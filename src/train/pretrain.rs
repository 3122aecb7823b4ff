//! What decoder pre-training ([`super::lm`]) and encoder pre-training
//! ([`super::tagger`]) share: their error type, the shared schedule settings'
//! checks, one optimiser step from a loss, and the output folder written beside
//! and renamed into place.

use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};
use serde::de::DeserializeOwned;

use super::optim::{AdamW, GradAccumulator};
use crate::config::{self, ConfigErrors, ConfigProblem, Schema, problem};

#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    #[error("pre-training settings:\n  - {}", .0.join("\n  - "))]
    Settings(Vec<String>),
    #[error("{path}: {why}")]
    Data { path: PathBuf, why: String },
    #[error(transparent)]
    Tokenizer(#[from] super::tokenizer::TokenizerTrainError),
    #[error("{0}")]
    Model(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PretrainError + '_ {
    move |source| PretrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Problems with the settings every pre-training run has.
pub fn schedule_problems(
    epochs: usize,
    batch_size: usize,
    peak_lr: f64,
    warmup_fraction: f64,
    problems: &mut Vec<ConfigProblem>,
) {
    for (name, v) in [("epochs", epochs), ("batch_size", batch_size)] {
        if v == 0 {
            problems.push(problem(name, "must be at least 1"));
        }
    }
    if !(peak_lr > 0.0 && peak_lr.is_finite()) {
        problems.push(problem("peak_lr", format!("{peak_lr} must be positive")));
    }
    if !(0.0..1.0).contains(&warmup_fraction) {
        problems.push(problem(
            "warmup_fraction",
            format!("{warmup_fraction} must be in [0, 1)"),
        ));
    }
}

/// Pre-training settings (flat keys, as [`crate::config`] loads every file): the
/// file's keys, if a file is given, and `--set key=value` overrides over the
/// defaults; every problem at once.
pub fn load_settings<T: DeserializeOwned>(
    path: Option<&Path>,
    overrides: &[String],
    schema: &Schema<T>,
) -> Result<T, ConfigErrors> {
    match path {
        Some(path) => config::load(path, overrides, schema),
        None => config::parse("", "the default settings", overrides, schema),
    }
}

/// Backward through `loss`, clip the gradients' global norm to `max_norm`, one
/// AdamW step at `lr`. Returns the loss value.
pub fn optimizer_step(
    optimizer: &mut AdamW,
    params: &[(String, Var)],
    loss: &Tensor,
    max_norm: f64,
    lr: f64,
) -> Result<f64, PretrainError> {
    let grads = loss.backward()?;
    let mut acc = GradAccumulator::new(params.len());
    acc.add(params, &grads)?;
    let (grads, _norm) = acc.finish(max_norm)?;
    optimizer.step(&grads, lr)?;
    Ok(loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Writes the output folder under a staging name beside `out` ([`crate::atomic`])
/// with `fill`, then renames it to `out` (replacing an older one), so `out` is never
/// half written; when `fill` fails, the staging folder is removed.
pub fn publish_dir(
    out: &Path,
    fill: impl FnOnce(&Path) -> Result<(), PretrainError>,
) -> Result<(), PretrainError> {
    let staging = crate::atomic::Staging::new(out);
    std::fs::create_dir_all(staging.path()).map_err(io(staging.path()))?;
    fill(staging.path())?;
    staging.commit_dir().map_err(io(out))
}

/// `dir/name` as pretty JSON.
pub fn write_json(
    dir: &Path,
    name: &str,
    value: &impl serde::Serialize,
) -> Result<(), PretrainError> {
    let path = dir.join(name);
    let text =
        serde_json::to_string_pretty(value).map_err(|e| PretrainError::Model(e.to_string()))?;
    std::fs::write(&path, text).map_err(io(&path))
}
