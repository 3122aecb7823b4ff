//! The dataset a set of shard runs wrote, named by its pipeline file (its `[output]
//! uri` and `[storage]` settings) or by its URI with object-store client settings: for
//! `audiocap status` and `audiocap finalize`.

use std::path::Path;

use serde::Deserialize;

use super::PipelineConfig;
use crate::storage::{Location, StorageOptions};

/// A dataset named by a pipeline file or by its URI.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatasetTarget {
    /// The pipeline file that wrote the dataset, or the dataset's URI
    /// (`s3://bucket/captions/`, a folder).
    pub target: String,
    /// With a pipeline file: `KEY=VALUE` overrides (`output.uri=s3://other/`), as
    /// `run --set`.
    pub set: Vec<String>,
    /// With a URI: object-store client settings as `KEY=VALUE` (the `[storage]` keys
    /// of a pipeline file).
    pub storage: Vec<String>,
}

/// The dataset location `target` names; `Err` holds every problem.
pub fn dataset_location(target: &DatasetTarget) -> Result<Location, Vec<String>> {
    let as_file = Path::new(&target.target);
    if target.target.ends_with(".toml") && as_file.is_file() {
        if !target.storage.is_empty() {
            return Err(vec![
                "--storage is for a dataset URI; with a pipeline file, set [storage] keys with --set storage.KEY=VALUE".into(),
            ]);
        }
        let config = PipelineConfig::load(as_file, &target.set).map_err(|e| vec![e.to_string()])?;
        return Location::parse(&config.output.uri, &config.storage)
            .map_err(|e| vec![format!("output.uri: {e}")]);
    }
    if !target.set.is_empty() {
        return Err(vec![format!(
            "--set needs a pipeline file, and {:?} is not one",
            target.target
        )]);
    }
    let options = storage_options(&target.storage)?;
    Location::parse(&target.target, &options).map_err(|e| vec![e.to_string()])
}

/// `KEY=VALUE` pairs as [`StorageOptions`]: values are TOML (`true`, `30`) or bare
/// text; every bad pair is reported.
fn storage_options(pairs: &[String]) -> Result<StorageOptions, Vec<String>> {
    let mut table = toml::Table::new();
    let mut problems = Vec::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            problems.push(format!("--storage {pair:?}: expected KEY=VALUE"));
            continue;
        };
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        table.insert(key.trim().to_string(), value);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    StorageOptions::deserialize(toml::Value::Table(table))
        .map_err(|e| vec![format!("--storage: {}", e.message())])
}
