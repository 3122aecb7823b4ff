//! The dataset as a whole: what every shard has committed (`audiocap status`) and the
//! dataset-level commit (`audiocap finalize`).
//!
//! A shard is committed when its newest commit record names exactly the shard's
//! visible parts (a record lists the parts of the killed runs it resumed from, and its
//! own). Finalizing checks that all N shards are committed, that one model and one set
//! of row-shaping settings wrote every part, then writes `_manifest.json` (every part
//! with its rows, error rows, bytes and SHA-256) and `_SUCCESS` last. Both are
//! deterministic, so finalizing twice, or twice at once, writes the same bytes. Parts
//! are deleted only by `run --retry-failed` ([`super::supersede`]), which removes
//! `_SUCCESS` and then the manifest first, so a reader that read `_SUCCESS` and then
//! the manifest finds every part it lists, complete (unless a retry starts between).

use std::collections::{BTreeMap, BTreeSet};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use parquet::file::metadata::ParquetMetaData;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::resume::read_footer;
use super::supersede::{footer_value, replaced_part};
use super::{
    COMMITS_DIR, DatasetError, ERROR_KINDS_KEY, FAILED_INPUTS_KEY, INPUTS_KEY, MAX_SHARD_COUNT,
    ShardCommitRecord, is_committed_part, list_objects, part_layout,
};

/// The dataset-level manifest, under the dataset prefix.
pub const MANIFEST_FILE: &str = "_manifest.json";
/// Written last by `finalize`: the manifest is complete and final.
pub const SUCCESS_FILE: &str = "_SUCCESS";
/// Parts read at once (footers, checksums).
const PARALLEL_PARTS: usize = 8;
/// The footer key the writer stores the model identity under.
const MODEL_KEY: &str = "audiocap.model";

/// Where one shard stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    /// Its newest commit record names exactly its visible parts.
    Committed,
    /// Parts without a commit record covering them: a run is writing, or was killed
    /// (re-run the shard: it resumes).
    InProgress,
    /// Nothing written.
    Missing,
    /// Its newest commit record names parts that are gone.
    Damaged,
}

impl std::fmt::Display for ShardState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShardState::Committed => "committed",
            ShardState::InProgress => "in progress",
            ShardState::Missing => "missing",
            ShardState::Damaged => "damaged",
        })
    }
}

/// One shard of the layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardStatus {
    pub index: u32,
    pub state: ShardState,
    /// Runs with a commit record, oldest first.
    pub committed_runs: Vec<String>,
    /// Visible parts.
    pub parts: usize,
    pub rows: u64,
    /// Rows whose `error` is set (from the parts' column statistics).
    pub error_rows: u64,
    /// Error rows by `error_kind`, from the parts' footers (`unrecorded`: parts
    /// written before kinds were recorded).
    pub error_rows_by_kind: BTreeMap<String, u64>,
    pub bytes: u64,
    /// Visible parts the newest commit record does not name.
    pub uncommitted_parts: Vec<String>,
    /// Parts the newest commit record names that are not there.
    pub missing_parts: Vec<String>,
}

/// Every shard, and whether the dataset can be finalized.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStatus {
    /// The shard count of the layout (from the newest commit record, else the parts);
    /// `None` for an empty dataset.
    pub shard_count: Option<u32>,
    pub shards: Vec<ShardStatus>,
    pub rows: u64,
    pub error_rows: u64,
    /// Error rows by `error_kind`, over every shard.
    pub error_rows_by_kind: BTreeMap<String, u64>,
    pub bytes: u64,
    /// Every shard committed and no problem.
    pub complete: bool,
    /// `_SUCCESS` is there.
    pub finalized: bool,
    /// What keeps the dataset from being one consistent whole (several layouts,
    /// several models or settings, damaged shards).
    pub problems: Vec<String>,
    /// The models that wrote the parts.
    pub models: Vec<String>,
}

impl DatasetStatus {
    /// Shards in `state`.
    pub fn count(&self, state: ShardState) -> usize {
        self.shards.iter().filter(|s| s.state == state).count()
    }
}

/// One part in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPart {
    /// File name under the dataset prefix.
    pub name: String,
    pub shard: u32,
    pub rows: u64,
    pub error_rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// `_manifest.json`: the finalized dataset. Deterministic (no timestamps), parts
/// sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetManifest {
    pub format: String,
    pub version: u32,
    pub shard_count: u32,
    pub model: String,
    pub config_digest: String,
    pub rows: u64,
    pub error_rows: u64,
    /// Error rows by `error_kind` (absent from manifests written before kinds were
    /// recorded).
    #[serde(default)]
    pub error_rows_by_kind: BTreeMap<String, u64>,
    pub bytes: u64,
    pub parts: Vec<ManifestPart>,
}

/// What `finalize` did.
#[derive(Debug, Clone, PartialEq)]
pub enum FinalizeOutcome {
    /// The manifest and `_SUCCESS` were written.
    Finalized(DatasetManifest),
    /// Already finalized with this very manifest: nothing written.
    AlreadyFinalized(DatasetManifest),
    /// Some shards are not committed yet: nothing written (retry later).
    Incomplete(DatasetStatus),
    /// The shards do not make one dataset: nothing written (retrying will not help).
    Inconsistent(DatasetStatus),
}

/// What one visible part holds, from its footer.
struct PartFacts {
    meta: ObjectMeta,
    name: String,
    shard: u32,
    shard_count: u32,
    rows: u64,
    error_rows: u64,
    error_kinds: BTreeMap<String, u64>,
    /// Inputs and inputs without a caption, when the footer records them.
    inputs: Option<(u64, u64)>,
    model: Option<String>,
    /// The part whose rows this one carries (`--retry-failed`).
    replaces: Option<String>,
}

/// Counts by kind, summed (saturating, as [`saturating_sum`]).
fn sum_kinds<'a>(counts: impl Iterator<Item = &'a BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
    let mut total = BTreeMap::new();
    for (kind, n) in counts.flatten() {
        let slot: &mut u64 = total.entry(kind.clone()).or_default();
        *slot = slot.saturating_add(*n);
    }
    total
}

/// Counts from footers of files we did not necessarily write: a sum that would
/// overflow stays at the maximum.
fn saturating_sum(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0, u64::saturating_add)
}

/// Rows and error rows of a footer: `error` non-null counts from the column
/// statistics (the writer always writes them).
pub(super) fn footer_counts(
    metadata: &ParquetMetaData,
    path: &str,
) -> Result<(u64, u64), DatasetError> {
    let rows = metadata.file_metadata().num_rows().max(0) as u64;
    let schema = metadata.file_metadata().schema_descr();
    let Some(column) = schema
        .columns()
        .iter()
        .position(|c| c.path().string() == "error")
    else {
        return Err(DatasetError::BadPart {
            path: path.to_string(),
            what: "no \"error\" column".into(),
        });
    };
    let mut errors = 0u64;
    for rg in metadata.row_groups() {
        let nulls = rg
            .column(column)
            .statistics()
            .and_then(|s| s.null_count_opt())
            .ok_or_else(|| DatasetError::BadPart {
                path: path.to_string(),
                what: "no null count for \"error\" in a row group's statistics".into(),
            })?;
        errors = errors.saturating_add((rg.num_rows().max(0) as u64).saturating_sub(nulls));
    }
    Ok((rows, errors))
}

async fn part_facts(store: &dyn ObjectStore, meta: ObjectMeta) -> Result<PartFacts, DatasetError> {
    let path = meta.location.to_string();
    let name = meta.location.filename().unwrap_or_default().to_string();
    let (shard, shard_count) = part_layout(&name).ok_or_else(|| DatasetError::BadPart {
        path: path.clone(),
        what: "not named part-<shard>-of-<shards>-… (not written by audiocap)".into(),
    })?;
    let metadata = read_footer(store, &meta).await?;
    let (rows, error_rows) = footer_counts(&metadata, &path)?;
    let footer = |key: &str| footer_value(&metadata, key);
    let model = footer(MODEL_KEY);
    let replaces = replaced_part(&metadata);
    let error_kinds = match footer(ERROR_KINDS_KEY) {
        Some(json) => serde_json::from_str(&json).map_err(|e| DatasetError::BadPart {
            path: path.clone(),
            what: format!("{ERROR_KINDS_KEY} is not a JSON object of counts: {e}"),
        })?,
        None if error_rows > 0 => BTreeMap::from([("unrecorded".to_string(), error_rows)]),
        None => BTreeMap::new(),
    };
    let count = |key: &str| footer(key).and_then(|v| v.parse::<u64>().ok());
    let inputs = count(INPUTS_KEY).zip(count(FAILED_INPUTS_KEY));
    Ok(PartFacts {
        meta,
        name,
        shard,
        shard_count,
        rows,
        error_rows,
        error_kinds,
        inputs,
        model,
        replaces,
    })
}

/// What the committed parts of one shard hold, from their footers: what a resumed
/// run adds its own counts to, so its summary and exit code speak for the shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ShardHistory {
    pub parts: u64,
    pub rows: u64,
    pub error_rows: u64,
    pub error_rows_by_kind: BTreeMap<String, u64>,
    /// Inputs and inputs without a caption, over the parts that record them.
    pub inputs: u64,
    pub failed_inputs: u64,
    /// Parts written before inputs were recorded in footers (not in the two above).
    pub unrecorded_parts: u64,
}

/// The [`ShardHistory`] of shard `index` of `count` under `prefix`.
pub async fn shard_history(
    store: &dyn ObjectStore,
    prefix: &Path,
    index: u32,
    count: u32,
) -> Result<ShardHistory, DatasetError> {
    let metas: Vec<ObjectMeta> = list_objects(store, prefix)
        .await?
        .into_iter()
        .filter(|o| {
            o.location
                .filename()
                .is_some_and(|n| is_committed_part(n) && part_layout(n) == Some((index, count)))
        })
        .collect();
    let parts: Vec<PartFacts> = futures::stream::iter(metas)
        .map(|meta| part_facts(store, meta))
        .buffer_unordered(PARALLEL_PARTS)
        .try_collect()
        .await?;
    let recorded = || parts.iter().filter_map(|p| p.inputs);
    Ok(ShardHistory {
        parts: parts.len() as u64,
        rows: saturating_sum(parts.iter().map(|p| p.rows)),
        error_rows: saturating_sum(parts.iter().map(|p| p.error_rows)),
        error_rows_by_kind: sum_kinds(parts.iter().map(|p| &p.error_kinds)),
        inputs: saturating_sum(recorded().map(|(n, _)| n)),
        failed_inputs: saturating_sum(recorded().map(|(_, f)| f)),
        unrecorded_parts: parts.iter().filter(|p| p.inputs.is_none()).count() as u64,
    })
}

/// Every commit record under `prefix/_commits/`.
async fn commit_records(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<Vec<ShardCommitRecord>, DatasetError> {
    let dir = prefix.clone().join(COMMITS_DIR);
    let listed: Vec<ObjectMeta> = store
        .list(Some(&dir))
        .try_collect()
        .await
        .map_err(|source| DatasetError::Store {
            op: "listing commit records",
            path: dir.to_string(),
            source,
        })?;
    // Records are small; fetch them concurrently (one per shard run).
    let mut records: Vec<ShardCommitRecord> = futures::stream::iter(
        listed
            .into_iter()
            .filter(|meta| meta.location.as_ref().ends_with(".json")),
    )
    .map(|meta| async move {
        let path = meta.location.to_string();
        let store_err = |source| DatasetError::Store {
            op: "reading commit record",
            path: path.clone(),
            source,
        };
        let bytes = store
            .get(&meta.location)
            .await
            .map_err(store_err)?
            .bytes()
            .await
            .map_err(store_err)?;
        serde_json::from_slice(&bytes).map_err(|source| DatasetError::Json { path, source })
    })
    .buffer_unordered(PARALLEL_PARTS)
    .try_collect()
    .await?;
    records.sort_by(|a, b| (a.committed_at_us, &a.run_id).cmp(&(b.committed_at_us, &b.run_id)));
    Ok(records)
}

/// Reads every part footer and commit record under `prefix` and says where each
/// shard stands.
pub async fn dataset_status(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<DatasetStatus, DatasetError> {
    let (status, _, _) = survey(store, prefix).await?;
    Ok(status)
}

/// The status, the facts of every visible part, and the commit records.
async fn survey(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<(DatasetStatus, Vec<PartFacts>, Vec<ShardCommitRecord>), DatasetError> {
    let listed = list_objects(store, prefix).await?;
    let finalized = listed
        .iter()
        .any(|o| o.location.filename() == Some(SUCCESS_FILE));
    let part_metas: Vec<ObjectMeta> = listed
        .into_iter()
        .filter(|o| o.location.filename().is_some_and(is_committed_part))
        .collect();
    let mut parts: Vec<PartFacts> = futures::stream::iter(part_metas)
        .map(|meta| part_facts(store, meta))
        .buffer_unordered(PARALLEL_PARTS)
        .try_collect()
        .await?;
    parts.sort_by(|a, b| a.name.cmp(&b.name));
    let records = commit_records(store, prefix).await?;

    let mut problems = Vec::new();
    let shard_count = records
        .last()
        .map(|r| r.shard_count)
        .or_else(|| parts.iter().map(|p| p.shard_count).max());
    let mut layouts: BTreeSet<u32> = parts.iter().map(|p| p.shard_count).collect();
    layouts.extend(records.iter().map(|r| r.shard_count));
    if layouts.len() > 1 {
        problems.push(format!(
            "parts or commit records of several shard counts ({}): a dataset is written \
             by one layout; finish it with the count it started with, or write to a new prefix",
            layouts
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for r in records.iter().filter(|r| r.shard_index >= r.shard_count) {
        problems.push(format!(
            "the commit record of run {} says shard {} of {}: an index must be below the count",
            r.run_id, r.shard_index, r.shard_count
        ));
    }
    for p in parts.iter().filter(|p| p.shard >= p.shard_count) {
        problems.push(format!(
            "part {} says shard {} of {}: an index must be below the count",
            p.name, p.shard, p.shard_count
        ));
    }
    let models: BTreeSet<String> = parts.iter().filter_map(|p| p.model.clone()).collect();
    if models.len() > 1 {
        problems.push(format!(
            "parts written by {} models ({}): one dataset needs one model",
            models.len(),
            models.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }

    let mut shards = Vec::new();
    if let Some(n) = shard_count.filter(|&n| n > MAX_SHARD_COUNT) {
        // A record (or part name) from a damaged or foreign file: one status per
        // shard would be a list of billions.
        problems.push(format!(
            "a commit record or part name says {n} shards, more than the {MAX_SHARD_COUNT} \
             a dataset may have: not a dataset audiocap wrote"
        ));
    } else if let Some(n) = shard_count {
        for index in 0..n {
            let mine: Vec<&PartFacts> = parts
                .iter()
                .filter(|p| p.shard == index && p.shard_count == n)
                .collect();
            let runs: Vec<&ShardCommitRecord> = records
                .iter()
                .filter(|r| r.shard_index == index && r.shard_count == n)
                .collect();
            shards.push(shard_status(index, &mine, &runs));
        }
    }
    let digests: BTreeSet<&str> = shards
        .iter()
        .filter_map(|s| {
            records
                .iter()
                .rev()
                .find(|r| Some(r.shard_count) == shard_count && r.shard_index == s.index)
        })
        .map(|r| r.config_digest.as_str())
        .filter(|d| !d.is_empty())
        .collect();
    if digests.len() > 1 {
        problems.push(format!(
            "shards committed with {} different row-shaping settings (pipeline digests {}): \
             every shard of a dataset must run the same pipeline file",
            digests.len(),
            digests.iter().copied().collect::<Vec<_>>().join(", ")
        ));
    }
    for s in shards.iter().filter(|s| s.state == ShardState::Damaged) {
        problems.push(format!(
            "shard {}: parts named by its commit record are gone: {}",
            s.index,
            s.missing_parts.join(", ")
        ));
    }
    let complete = shard_count.is_some()
        && problems.is_empty()
        && shards.iter().all(|s| s.state == ShardState::Committed);
    let status = DatasetStatus {
        shard_count,
        rows: saturating_sum(shards.iter().map(|s| s.rows)),
        error_rows: saturating_sum(shards.iter().map(|s| s.error_rows)),
        error_rows_by_kind: sum_kinds(shards.iter().map(|s| &s.error_rows_by_kind)),
        bytes: saturating_sum(shards.iter().map(|s| s.bytes)),
        shards,
        complete,
        finalized,
        problems,
        models: models.into_iter().collect(),
    };
    Ok((status, parts, records))
}

fn shard_status(index: u32, parts: &[&PartFacts], runs: &[&ShardCommitRecord]) -> ShardStatus {
    let visible: BTreeSet<&str> = parts.iter().map(|p| p.name.as_str()).collect();
    let (state, uncommitted, missing) = match runs.last() {
        None if visible.is_empty() => (ShardState::Missing, Vec::new(), Vec::new()),
        None => (
            ShardState::InProgress,
            visible.iter().map(|s| s.to_string()).collect(),
            Vec::new(),
        ),
        Some(last) => {
            // Records from before `shard_parts` existed: every record's own parts.
            let expected: BTreeSet<&str> = if last.shard_parts.is_empty() {
                runs.iter()
                    .flat_map(|r| r.parts.iter().map(|p| p.name.as_str()))
                    .collect()
            } else {
                last.shard_parts.iter().map(String::as_str).collect()
            };
            let uncommitted: Vec<String> = visible
                .difference(&expected)
                .map(|s| s.to_string())
                .collect();
            // A part a visible replacement carries is not lost (`--retry-failed`).
            let replaced: BTreeSet<&str> =
                parts.iter().filter_map(|p| p.replaces.as_deref()).collect();
            let missing: Vec<String> = expected
                .difference(&visible)
                .filter(|name| !replaced.contains(*name))
                .map(|s| s.to_string())
                .collect();
            let state = if !missing.is_empty() {
                ShardState::Damaged
            } else if !uncommitted.is_empty() {
                ShardState::InProgress
            } else {
                ShardState::Committed
            };
            (state, uncommitted, missing)
        }
    };
    ShardStatus {
        index,
        state,
        committed_runs: runs.iter().map(|r| r.run_id.clone()).collect(),
        parts: parts.len(),
        rows: saturating_sum(parts.iter().map(|p| p.rows)),
        error_rows: saturating_sum(parts.iter().map(|p| p.error_rows)),
        error_rows_by_kind: sum_kinds(parts.iter().map(|p| &p.error_kinds)),
        bytes: saturating_sum(parts.iter().map(|p| p.meta.size)),
        uncommitted_parts: uncommitted,
        missing_parts: missing,
    }
}

/// SHA-256 of a whole object, streamed.
async fn checksum(store: &dyn ObjectStore, location: &Path) -> Result<String, DatasetError> {
    let store_err = |source| DatasetError::Store {
        op: "checksumming part",
        path: location.to_string(),
        source,
    };
    let mut stream = store.get(location).await.map_err(store_err)?.into_stream();
    let mut hasher = Sha256::new();
    while let Some(chunk) = stream.try_next().await.map_err(store_err)? {
        hasher.update(&chunk);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Checks that every shard committed one consistent dataset, then writes
/// `_manifest.json` and `_SUCCESS` (last). Idempotent: an unchanged, finalized
/// dataset is left as it is.
pub async fn finalize(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<FinalizeOutcome, DatasetError> {
    let (status, parts, records) = survey(store, prefix).await?;
    if !status.problems.is_empty() {
        return Ok(FinalizeOutcome::Inconsistent(status));
    }
    if !status.complete {
        return Ok(FinalizeOutcome::Incomplete(status));
    }
    let shard_count = status.shard_count.unwrap_or(1);
    let sums: Vec<(String, String)> = futures::stream::iter(&parts)
        .map(|p| async move { Ok((p.name.clone(), checksum(store, &p.meta.location).await?)) })
        .buffer_unordered(PARALLEL_PARTS)
        .try_collect()
        .await?;
    let sums: BTreeMap<String, String> = sums.into_iter().collect();
    let manifest = DatasetManifest {
        format: "audiocap.dataset".into(),
        version: 1,
        shard_count,
        model: status.models.first().cloned().unwrap_or_default(),
        config_digest: records
            .iter()
            .rev()
            .map(|r| r.config_digest.clone())
            .find(|d| !d.is_empty())
            .unwrap_or_default(),
        rows: status.rows,
        error_rows: status.error_rows,
        error_rows_by_kind: status.error_rows_by_kind.clone(),
        bytes: status.bytes,
        parts: parts
            .iter()
            .map(|p| ManifestPart {
                name: p.name.clone(),
                shard: p.shard,
                rows: p.rows,
                error_rows: p.error_rows,
                bytes: p.meta.size,
                sha256: sums[&p.name].clone(),
            })
            .collect(),
    };
    let mut json = serde_json::to_vec_pretty(&manifest).map_err(|source| DatasetError::Json {
        path: MANIFEST_FILE.into(),
        source,
    })?;
    json.push(b'\n');
    let manifest_path = prefix.clone().join(MANIFEST_FILE);
    let success_path = prefix.clone().join(SUCCESS_FILE);
    if status.finalized {
        let existing = match store.get(&manifest_path).await {
            Ok(r) => Some(r.bytes().await.map_err(|source| DatasetError::Store {
                op: "reading manifest",
                path: manifest_path.to_string(),
                source,
            })?),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(source) => {
                return Err(DatasetError::Store {
                    op: "reading manifest",
                    path: manifest_path.to_string(),
                    source,
                });
            }
        };
        if existing.as_deref() == Some(json.as_slice()) {
            return Ok(FinalizeOutcome::AlreadyFinalized(manifest));
        }
    }
    let digest = hex::encode(Sha256::digest(&json));
    put(store, &manifest_path, json).await?;
    let success = serde_json::json!({"manifest": MANIFEST_FILE, "sha256": digest});
    put(store, &success_path, format!("{success}\n").into_bytes()).await?;
    Ok(FinalizeOutcome::Finalized(manifest))
}

async fn put(store: &dyn ObjectStore, path: &Path, bytes: Vec<u8>) -> Result<(), DatasetError> {
    store
        .put(path, PutPayload::from(bytes))
        .await
        .map(|_| ())
        .map_err(|source| DatasetError::Store {
            op: "writing",
            path: path.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;

    async fn put_record(store: &InMemory, name: &str, json: &str) {
        let path = Path::from(format!("out/{COMMITS_DIR}/{name}.json"));
        store
            .put(&path, PutPayload::from(json.to_string()))
            .await
            .unwrap();
    }

    fn record(index: u64, count: u64) -> String {
        format!(
            r#"{{"shard_index": {index}, "shard_count": {count}, "run_id": "r", "parts": [],
               "rows": 0, "inputs": 0, "bytes": 0, "committed_at_us": 1, "run": null}}"#
        )
    }

    #[tokio::test]
    async fn an_absurd_shard_count_is_an_inconsistent_dataset_not_a_huge_list() {
        let store = InMemory::new();
        put_record(&store, "a", &record(0, 4_000_000_000)).await;
        let status = dataset_status(&store, &Path::from("out")).await.unwrap();
        assert!(status.shards.is_empty(), "{:?}", status.shards.len());
        assert!(!status.complete);
        assert!(
            status
                .problems
                .iter()
                .any(|p| p.contains("says 4000000000 shards")),
            "{:?}",
            status.problems
        );
        let outcome = finalize(&store, &Path::from("out")).await.unwrap();
        assert!(
            matches!(outcome, FinalizeOutcome::Inconsistent(_)),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn an_index_beyond_the_count_is_a_problem() {
        let store = InMemory::new();
        put_record(&store, "a", &record(7, 4)).await;
        let status = dataset_status(&store, &Path::from("out")).await.unwrap();
        assert!(
            status
                .problems
                .iter()
                .any(|p| p.contains("says shard 7 of 4")),
            "{:?}",
            status.problems
        );
        assert!(!status.complete);
    }

    #[tokio::test]
    async fn bad_records_are_errors_naming_the_record() {
        for bad in [
            record(0, 1)[..40].to_string(),
            record(0, 1).replace("\"shard_count\": 1", "\"shard_count\": -1"),
            record(0, 1).replace("\"shard_count\": 1", "\"shard_count\": 4e9"),
            record(0, 1).replace("\"shard_count\": 1", "\"shard_count\": 99999999999"),
            record(0, 1).replace("\"rows\": 0", "\"rows\": \"many\""),
            "[]".to_string(),
            "\u{0}\u{ff}".to_string(),
        ] {
            let store = InMemory::new();
            put_record(&store, "bad", &bad).await;
            let error = dataset_status(&store, &Path::from("out"))
                .await
                .unwrap_err();
            assert!(
                matches!(&error, DatasetError::Json { path, .. } if path.ends_with("bad.json")),
                "{bad}: {error:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_part_that_is_not_parquet_or_not_named_as_ours_is_an_error() {
        let store = InMemory::new();
        let junk = PutPayload::from_static(b"PAR1 not a footer PAR1");
        let part = Path::from("out/part-00000-of-00001-r-00000.zstd.parquet");
        store.put(&part, junk.clone()).await.unwrap();
        let error = dataset_status(&store, &Path::from("out"))
            .await
            .unwrap_err();
        assert!(matches!(error, DatasetError::Parquet { .. }), "{error:?}");
        let store = InMemory::new();
        let part = Path::from("out/part-x-of-y.parquet");
        store.put(&part, junk).await.unwrap();
        let error = dataset_status(&store, &Path::from("out"))
            .await
            .unwrap_err();
        assert!(matches!(error, DatasetError::BadPart { .. }), "{error:?}");
    }

    #[test]
    fn sums_of_footer_counts_saturate() {
        assert_eq!(saturating_sum([u64::MAX, 5].into_iter()), u64::MAX);
        assert_eq!(
            part_layout("part-00001-of-00004-r-00000.zstd.parquet"),
            Some((1, 4))
        );
        assert_eq!(part_layout("part-99999999999-of-1-r"), None);
    }
}
