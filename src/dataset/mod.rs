//! The captions dataset: a folder (local or on an object store) of zstd Parquet parts
//! of [`crate::output::schema`], written by many shards and read by any Parquet reader.
//!
//! Layout under the dataset prefix:
//! - `part-{shard:05}-of-{shards:05}-{run_id}-{seq:05}.zstd.parquet`: committed parts.
//!   `prefix/*.parquet` is the dataset; a part that is visible is complete.
//! - `_staging/`: parts being written on local disk (renamed into place to commit).
//! - `_commits/shard-{shard:05}-of-{shards:05}/{run_id}.json`: one record per finished
//!   shard run, written last and create-only.
//!
//! Readers (polars, pyarrow, DuckDB) skip names starting with `_` or `.`, so only
//! committed parts are ever read. See [`DatasetWriter`] for writing and
//! [`committed_inputs`] for resuming.

mod commit;
mod finalize;
mod report;
mod resume;
mod supersede;
mod writer;

use std::path::PathBuf;
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore};

use crate::retry::{Backoff, TransientRetry};

pub use commit::{CommittedPart, ShardCommitRecord, commit_record_path};
pub use finalize::{
    DatasetManifest, DatasetStatus, FinalizeOutcome, MANIFEST_FILE, SUCCESS_FILE, ShardHistory,
    ShardState, ShardStatus, dataset_status, finalize, shard_history,
};
pub use report::{finalize_json, render_finalize, render_status};
pub use resume::committed_inputs;
pub use writer::{DatasetWriter, SupersedeReport};

/// Folder (under the prefix) of parts being written on local disk.
pub const STAGING_DIR: &str = "_staging";
/// Folder (under the prefix) of the per-shard commit records.
pub const COMMITS_DIR: &str = "_commits";
/// The most shards a dataset may have: `status` and `finalize` report on every shard,
/// so a commit record that claims more (a damaged or foreign file) makes the dataset
/// inconsistent instead of a list of billions.
pub const MAX_SHARD_COUNT: u32 = 100_000;
/// File name ending of every part.
pub const PART_SUFFIX: &str = ".zstd.parquet";

/// Where the store keeps its objects, which decides how a part is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// A `LocalFileSystem` rooted at `root` (object path `a/b` is `root/a/b`): parts
    /// are encoded under `_staging/` and renamed into place.
    Local { root: PathBuf },
    /// Any other store: parts are uploaded straight to their final key (multipart,
    /// invisible until completed), or with one `put` when small.
    Object,
}

/// The footer key of a part's error rows by `error_kind` (a JSON object).
pub const ERROR_KINDS_KEY: &str = "audiocap.error_kinds";
/// The footer keys of a part's inputs and of those with no caption at all.
pub const INPUTS_KEY: &str = "audiocap.inputs";
pub const FAILED_INPUTS_KEY: &str = "audiocap.failed_inputs";
/// The footer key of a part that carries another's rows (`--retry-failed`): the name
/// of the part it replaces ([`supersede`]).
pub const REPLACES_KEY: &str = "audiocap.replaces";

/// `call` until it succeeds, fails for good, or keeps failing transiently (an
/// `object_store::Error::Generic`: what the client reports once its own retries of a
/// transport error are spent) past `budget` ([`crate::retry`]'s waits).
pub(crate) async fn retry_store<T, F, Fut>(
    budget: Duration,
    what: &str,
    mut call: F,
) -> Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, object_store::Error>>,
{
    let mut backoff = Backoff::start(TransientRetry::with_budget(budget));
    loop {
        match call().await {
            Err(e @ object_store::Error::Generic { .. }) => {
                let Some(wait) = backoff.next_wait() else {
                    return Err(e);
                };
                tracing::warn!(error = %crate::storage::redact_text(&e.to_string()), "{what} failed; trying again");
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

/// How one shard writes its parts.
#[derive(Debug, Clone)]
pub struct DatasetWriterOptions {
    /// This shard, `0..shard_count`.
    pub shard_index: u32,
    pub shard_count: u32,
    /// Unique per run (letters, digits, `.`, `_`, `-`): part names and the commit
    /// record include it, so two runs never write the same object.
    pub run_id: String,
    /// A part is committed once its encoded size reaches this (an input is never
    /// split, so a part can pass it by one input's rows).
    pub target_part_bytes: u64,
    /// A part is committed once it holds this many rows (same caveat).
    pub max_rows_per_part: u64,
    /// A part is committed once it has been open this long: the most work a killed
    /// run loses.
    pub max_part_age: Duration,
    /// A row group is closed once its encoded size reaches this (bounds memory).
    pub row_group_bytes: u64,
    /// Object stores: multipart chunk size (S3 needs at least 5 MiB); a part smaller
    /// than one chunk is written with a single `put`.
    pub upload_chunk_bytes: usize,
    /// Object stores: chunks in flight at once per part.
    pub upload_concurrency: usize,
    /// Key/value pairs for every part's footer (model manifest, pipeline config).
    pub metadata: Vec<(String, String)>,
    /// The optional columns of the parts (`tags`, `embedding`); their description
    /// joins the footer's `metadata`.
    pub columns: crate::output::OutputColumns,
    /// How long a store call that fails transiently (the client's transport errors
    /// after its own short retries: a refused connection, a reset, a 5xx) is tried
    /// again, with backoff, before the run gives up. A short outage must not fail
    /// a commit.
    pub transient_retry: Duration,
    /// The model identity and the settings digest the commit record carries, for
    /// `audiocap finalize` to check that every shard wrote the same dataset.
    pub model: String,
    pub config_digest: String,
}

impl DatasetWriterOptions {
    /// Defaults: 128 MiB parts, at most 1M rows, committed at least every 10 minutes,
    /// 32 MiB row groups, 10 MiB upload chunks, 4 in flight.
    pub fn new(shard_index: u32, shard_count: u32, run_id: impl Into<String>) -> Self {
        Self {
            shard_index,
            shard_count,
            run_id: run_id.into(),
            target_part_bytes: 128 << 20,
            max_rows_per_part: 1 << 20,
            max_part_age: Duration::from_secs(600),
            row_group_bytes: 32 << 20,
            upload_chunk_bytes: 10 << 20,
            upload_concurrency: 4,
            metadata: Vec::new(),
            columns: Default::default(),
            transient_retry: Duration::from_secs(60),
            model: String::new(),
            config_digest: String::new(),
        }
    }

    /// Every problem at once, or `Ok`.
    pub fn validate(&self) -> Result<(), DatasetError> {
        let mut problems = Vec::new();
        if self.shard_count == 0 {
            problems.push("shard_count must be at least 1".to_string());
        } else if self.shard_index >= self.shard_count {
            problems.push(format!(
                "shard_index {} must be below shard_count {}",
                self.shard_index, self.shard_count
            ));
        }
        if !valid_run_id(&self.run_id) {
            problems.push(format!(
                "run_id {:?} must be 1 to 128 of letters, digits, '.', '_', '-', not starting with '.' or '_'",
                self.run_id
            ));
        }
        for (name, value) in [
            ("target_part_bytes", self.target_part_bytes),
            ("max_rows_per_part", self.max_rows_per_part),
            ("row_group_bytes", self.row_group_bytes),
            ("upload_chunk_bytes", self.upload_chunk_bytes as u64),
            ("upload_concurrency", self.upload_concurrency as u64),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DatasetError::InvalidOptions(problems.join("; ")))
        }
    }
}

fn valid_run_id(run_id: &str) -> bool {
    !run_id.is_empty()
        && run_id.len() <= 128
        && !run_id.starts_with(['.', '_'])
        && run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `part-{shard:05}-of-{shards:05}-`: the start of every part name of one shard layout.
fn shard_part_prefix(shard_index: u32, shard_count: u32) -> String {
    format!("part-{shard_index:05}-of-{shard_count:05}-")
}

/// `part-{i}-of-{n}-…`: the shard and layout a part name says.
fn part_layout(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix("part-")?;
    let (index, rest) = rest.split_once("-of-")?;
    let (count, _) = rest.split_once('-')?;
    Some((index.parse().ok()?, count.parse().ok()?))
}

/// The strings of a text column (any of Arrow's string layouts), or `None` when it
/// is not text.
fn strings(array: &arrow_array::ArrayRef) -> Option<Vec<Option<&str>>> {
    use arrow_array::cast::AsArray;
    if let Some(s) = array.as_string_opt::<i32>() {
        Some(s.iter().collect())
    } else if let Some(s) = array.as_string_opt::<i64>() {
        Some(s.iter().collect())
    } else {
        array.as_string_view_opt().map(|s| s.iter().collect())
    }
}

/// Whether `name` is a committed part of shard `index` of `count`.
fn is_shard_part(name: &str, index: u32, count: u32) -> bool {
    is_committed_part(name) && name.starts_with(&shard_part_prefix(index, count))
}

/// The file name of part `seq` of one shard and run.
pub fn part_name(shard_index: u32, shard_count: u32, run_id: &str, seq: u32) -> String {
    format!(
        "{}{run_id}-{seq:05}{PART_SUFFIX}",
        shard_part_prefix(shard_index, shard_count)
    )
}

/// The file name of the part that replaces another (`--retry-failed`): `r` before the
/// sequence number marks it, so an open finds replacements by name
/// ([`is_replacement_name`]) without reading every footer. Numbered with the run's
/// other parts.
fn replacement_part_name(shard_index: u32, shard_count: u32, run_id: &str, seq: u32) -> String {
    format!(
        "{}{run_id}-r{seq:05}{PART_SUFFIX}",
        shard_part_prefix(shard_index, shard_count)
    )
}

/// Whether a part name is a replacement's: its last `-` field is `r` and digits (a
/// run's own parts end in digits alone, whatever the run id).
fn is_replacement_name(name: &str) -> bool {
    name.strip_suffix(PART_SUFFIX)
        .and_then(|stem| stem.rsplit_once('-'))
        .and_then(|(_, last)| last.strip_prefix('r'))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The `seq` of `name` when it is a part (or a replacement) of this shard and run.
fn part_seq(name: &str, shard_index: u32, shard_count: u32, run_id: &str) -> Option<u32> {
    let rest = name.strip_prefix(&shard_part_prefix(shard_index, shard_count))?;
    let rest = rest
        .strip_prefix(run_id)?
        .strip_prefix('-')?
        .strip_suffix(PART_SUFFIX)?;
    let digits = rest.strip_prefix('r').unwrap_or(rest);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether an object name directly under the prefix is a committed part: a Parquet
/// file readers would read (not hidden by a leading `_` or `.`).
fn is_committed_part(name: &str) -> bool {
    name.ends_with(".parquet") && !name.starts_with(['_', '.'])
}

/// The local file of object path `path` in a `LocalFileSystem` rooted at `root`.
fn local_path(root: &std::path::Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for part in path.parts() {
        out.push(part.as_ref());
    }
    out
}

/// The objects directly under `prefix` (folders are not objects).
async fn list_objects(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<Vec<ObjectMeta>, DatasetError> {
    // `None` lists the store's root.
    let listed = store
        .list_with_delimiter((!prefix.is_root()).then_some(prefix))
        .await
        .map_err(|source| DatasetError::Store {
            op: "listing",
            path: prefix.to_string(),
            source,
        })?;
    Ok(listed.objects)
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset writer options: {0}")]
    InvalidOptions(String),
    #[error("{op} {path}: {source}")]
    Store {
        op: &'static str,
        path: String,
        source: object_store::Error,
    },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{op} {path}: {source}")]
    Parquet {
        op: &'static str,
        path: String,
        source: parquet::errors::ParquetError,
    },
    #[error("encoding rows of {uri} for {path}: {source}")]
    Arrow {
        uri: String,
        path: String,
        source: arrow_schema::ArrowError,
    },
    #[error("keeping {what}: {source}")]
    Keys {
        what: &'static str,
        source: crate::keyset::KeySetError,
    },
    #[error("{path}: {what}")]
    BadPart { path: String, what: String },
    #[error(
        "{prefix} holds parts of {found} shards (e.g. {part}), not {asked}: a dataset keeps \
         one shard count (resume reads a shard's own parts); run with shard_count = {found}, \
         or write the new count to a new output prefix"
    )]
    OtherLayout {
        prefix: String,
        part: String,
        found: u32,
        asked: u32,
    },
    #[error(
        "commit record {path} already exists: run {run_id} of this shard was already committed (use a new run id)"
    )]
    AlreadyCommitted { path: String, run_id: String },
    #[error("encoding commit record {path}: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{op}: background task failed: {source}")]
    Task {
        op: &'static str,
        source: tokio::task::JoinError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic() -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: "connection refused".into(),
        }
    }

    #[tokio::test]
    async fn a_store_call_failing_transiently_is_tried_again_within_its_budget() {
        let tries = std::cell::Cell::new(0);
        let result = retry_store(Duration::from_secs(60), "putting", || {
            tries.set(tries.get() + 1);
            let n = tries.get();
            async move { if n < 4 { Err(generic()) } else { Ok(n) } }
        })
        .await;
        assert_eq!(result.unwrap(), 4);

        // Past the budget the last error is the answer; a permanent one at once.
        tries.set(0);
        let result: Result<(), _> = retry_store(Duration::from_millis(600), "putting", || {
            tries.set(tries.get() + 1);
            async { Err(generic()) }
        })
        .await;
        assert!(matches!(result, Err(object_store::Error::Generic { .. })));
        // Tries at 0, 0.25 and 0.6 s (the last wait cut to what is left).
        assert_eq!(tries.get(), 3);
        tries.set(0);
        let result: Result<(), _> = retry_store(Duration::from_secs(60), "putting", || {
            tries.set(tries.get() + 1);
            async {
                Err(object_store::Error::NotFound {
                    path: "x".into(),
                    source: "gone".into(),
                })
            }
        })
        .await;
        assert!(matches!(result, Err(object_store::Error::NotFound { .. })));
        assert_eq!(tries.get(), 1);
    }

    #[test]
    fn part_names_parse_back_only_for_their_shard_and_run() {
        let name = part_name(3, 16, "run-1", 42);
        assert_eq!(name, "part-00003-of-00016-run-1-00042.zstd.parquet");
        assert_eq!(part_seq(&name, 3, 16, "run-1"), Some(42));
        assert_eq!(part_seq(&name, 3, 8, "run-1"), None);
        assert_eq!(part_seq(&name, 4, 16, "run-1"), None);
        assert_eq!(part_seq(&name, 3, 16, "run"), None);
        // A run id that extends another's must not be read as the shorter run's part.
        let longer = part_name(3, 16, "run-1-00007", 1);
        assert_eq!(part_seq(&longer, 3, 16, "run-1"), None);
        assert_eq!(part_seq(&longer, 3, 16, "run-1-00007"), Some(1));
        let replacement = replacement_part_name(3, 16, "run-1", 43);
        assert_eq!(replacement, "part-00003-of-00016-run-1-r00043.zstd.parquet");
        assert_eq!(part_seq(&replacement, 3, 16, "run-1"), Some(43));
        assert!(is_replacement_name(&replacement));
        assert!(!is_replacement_name(&name));
        // A run id ending in `-r` or holding `-r1` is still an ordinary part.
        assert!(!is_replacement_name(&part_name(3, 16, "x-r", 1)));
        assert!(!is_replacement_name(&part_name(3, 16, "x-r1", 1)));
        assert_eq!(part_seq(&part_name(3, 16, "x-r1", 2), 3, 16, "x"), None);
        assert!(is_committed_part(&name));
        assert!(!is_committed_part("_staging"));
        assert!(!is_committed_part(".part.parquet"));
        assert!(!is_committed_part("part.parquet#1"));
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut o = DatasetWriterOptions::new(2, 2, "bad/id");
        o.target_part_bytes = 0;
        let Err(DatasetError::InvalidOptions(msg)) = o.validate() else {
            panic!("accepted invalid options");
        };
        assert!(msg.contains("shard_index 2"), "{msg}");
        assert!(msg.contains("run_id"), "{msg}");
        assert!(msg.contains("target_part_bytes"), "{msg}");
        assert!(
            DatasetWriterOptions::new(1, 2, "2024-01-01T00.00.00Z_ab")
                .validate()
                .is_ok()
        );
        assert!(DatasetWriterOptions::new(0, 1, "_x").validate().is_err());
        assert!(DatasetWriterOptions::new(0, 0, "x").validate().is_err());
    }

    #[test]
    fn local_paths_follow_the_object_path() {
        let p = local_path(std::path::Path::new("/data"), &Path::from("out/captions/x"));
        assert_eq!(p, PathBuf::from("/data/out/captions/x"));
    }
}
