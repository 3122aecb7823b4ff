//! The checkpoint files a captioner is assembled from, and the steps shared by the
//! candle captioner and the exporter: combining adapters, reading stop ids.

use std::path::{Path, PathBuf};

use super::lora::{MergeError, PeftAdapter};
use super::projector::Pooling;
use super::weights::LoadError;

#[derive(Debug, thiserror::Error)]
pub enum AssemblyError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("combining adapters: {0}")]
    Merge(#[from] MergeError),
    #[error("model mismatch: {0}")]
    Mismatch(String),
}

/// The checkpoint files a captioner is assembled from.
#[derive(Debug, Clone)]
pub struct ModelSources {
    /// BEATs checkpoint (`.pt` or `.safetensors`).
    pub beats: PathBuf,
    /// Hugging Face Llama directory (config.json, safetensors, tokenizer.json).
    pub llm: PathBuf,
    /// Projector safetensors (`0.*`, `2.*`).
    pub projector: PathBuf,
    /// PEFT adapter directories; several are combined with PEFT's `cat`.
    pub adapters: Vec<PathBuf>,
    /// Per-adapter weights for the combination (default 1/K each).
    pub adapter_weights: Option<Vec<f64>>,
    /// Prompt template with one `<|audio|>`; default [`DEFAULT_PROMPT_TEMPLATE`](super::prompt::DEFAULT_PROMPT_TEMPLATE).
    pub prompt_template: Option<String>,
    pub pooling: Pooling,
}

/// Loads the adapters and combines them into one (PEFT `cat`, weights 1/K unless
/// given). `None` when there are no adapters.
pub fn combine_adapters(
    dirs: &[PathBuf],
    weights: Option<&[f64]>,
) -> Result<Option<PeftAdapter>, AssemblyError> {
    if dirs.is_empty() {
        if weights.is_some_and(|w| !w.is_empty()) {
            return Err(AssemblyError::Mismatch(
                "adapter weights given without adapters".into(),
            ));
        }
        return Ok(None);
    }
    let adapters = dirs
        .iter()
        .map(|d| PeftAdapter::load(d))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let default_weights = vec![1.0 / adapters.len() as f64; adapters.len()];
    let weights = weights.unwrap_or(&default_weights);
    Ok(Some(PeftAdapter::cat(&adapters, weights)?))
}

/// Stop ids: `eos_token_id` of `generation_config.json`, else of `config.json`.
pub fn read_stop_ids(llm_dir: &Path) -> Result<Vec<u32>, AssemblyError> {
    for name in ["generation_config.json", "config.json"] {
        let file = llm_dir.join(name);
        if !file.is_file() {
            continue;
        }
        let value: serde_json::Value = super::weights::read_json_config(&file)?;
        let ids = match value.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]),
            Some(serde_json::Value::Array(items)) => {
                items.iter().map(|v| v.as_u64().map(|v| v as u32)).collect()
            }
            _ => None,
        };
        if let Some(ids) = ids.filter(|ids| !ids.is_empty()) {
            return Ok(ids);
        }
    }
    Err(LoadError::config(
        llm_dir,
        "no eos_token_id in generation_config.json or config.json",
    )
    .into())
}
