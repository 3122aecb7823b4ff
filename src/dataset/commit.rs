//! What a shard run committed, and its create-only commit record.

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use serde::{Deserialize, Serialize};

use super::{COMMITS_DIR, DatasetError, retry_store};

/// One committed part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedPart {
    /// File name, directly under the dataset prefix.
    pub name: String,
    pub rows: u64,
    /// Inputs (distinct URIs) whose rows are all in this part.
    pub inputs: u64,
    /// Size of the committed file.
    pub bytes: u64,
}

/// The record a shard run writes last, at `_commits/shard-{i}-of-{n}/{run_id}.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardCommitRecord {
    pub shard_index: u32,
    pub shard_count: u32,
    pub run_id: String,
    pub parts: Vec<CommittedPart>,
    pub rows: u64,
    pub inputs: u64,
    pub bytes: u64,
    /// Microseconds since the Unix epoch, UTC.
    pub committed_at_us: i64,
    /// The caller's JSON (run summary, config digest).
    pub run: serde_json::Value,
    /// Every part of this shard when the record was written: the parts of earlier
    /// (killed, resumed) runs and this run's. `audiocap finalize` checks that the
    /// shard's visible parts are exactly these.
    #[serde(default)]
    pub shard_parts: Vec<String>,
    /// The model's identity (content hash) that wrote the rows.
    #[serde(default)]
    pub model: String,
    /// Digest of the pipeline settings that shape the rows (the same for every shard
    /// of one dataset).
    #[serde(default)]
    pub config_digest: String,
}

impl ShardCommitRecord {
    pub fn new(
        shard_index: u32,
        shard_count: u32,
        run_id: String,
        parts: Vec<CommittedPart>,
        run: serde_json::Value,
    ) -> Self {
        Self {
            shard_index,
            shard_count,
            run_id,
            rows: parts.iter().map(|p| p.rows).sum(),
            inputs: parts.iter().map(|p| p.inputs).sum(),
            bytes: parts.iter().map(|p| p.bytes).sum(),
            parts,
            committed_at_us: crate::output::now_us(),
            shard_parts: Vec::new(),
            model: String::new(),
            config_digest: String::new(),
            run,
        }
    }
}

/// `prefix/_commits/shard-{i:05}-of-{n:05}/{run_id}.json`.
pub fn commit_record_path(prefix: &Path, shard_index: u32, shard_count: u32, run_id: &str) -> Path {
    prefix
        .clone()
        .join(COMMITS_DIR)
        .join(format!("shard-{shard_index:05}-of-{shard_count:05}"))
        .join(format!("{run_id}.json"))
}

/// Writes `record` at `path` only if nothing is there yet. A transient failure is
/// tried again for `budget`; when a try that failed had in fact written the record,
/// the next one finds it there: it is ours when it says our run.
pub(super) async fn write_record(
    store: &dyn ObjectStore,
    path: &Path,
    record: &ShardCommitRecord,
    budget: std::time::Duration,
) -> Result<(), DatasetError> {
    let json = serde_json::to_vec_pretty(record).map_err(|source| DatasetError::Json {
        path: path.to_string(),
        source,
    })?;
    let payload = PutPayload::from(json.clone());
    let mut tries = 0u32;
    let put = retry_store(budget, "writing the commit record", || {
        tries += 1;
        store.put_opts(path, payload.clone(), PutMode::Create.into())
    })
    .await;
    match put {
        Ok(_) => Ok(()),
        Err(object_store::Error::AlreadyExists { .. }) => {
            let ours = tries > 1 && stored_bytes(store, path).await.as_deref() == Some(&json[..]);
            if ours {
                Ok(())
            } else {
                Err(DatasetError::AlreadyCommitted {
                    path: path.to_string(),
                    run_id: record.run_id.clone(),
                })
            }
        }
        Err(source) => Err(DatasetError::Store {
            op: "writing commit record",
            path: path.to_string(),
            source,
        }),
    }
}

/// The bytes at `path`, if they can be read.
async fn stored_bytes(store: &dyn ObjectStore, path: &Path) -> Option<Vec<u8>> {
    let got = store.get(path).await.ok()?;
    got.bytes().await.ok().map(|b| b.to_vec())
}

/// Fails with [`DatasetError::AlreadyCommitted`] when `path` exists.
pub(super) async fn ensure_uncommitted(
    store: &dyn ObjectStore,
    path: &Path,
    run_id: &str,
    budget: std::time::Duration,
) -> Result<(), DatasetError> {
    match retry_store(budget, "checking the commit record", || store.head(path)).await {
        Ok(_) => Err(DatasetError::AlreadyCommitted {
            path: path.to_string(),
            run_id: run_id.to_string(),
        }),
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(DatasetError::Store {
            op: "checking commit record",
            path: path.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use std::time::Duration;

    #[tokio::test]
    async fn records_are_create_only_and_sum_their_parts() {
        let store = InMemory::new();
        let path = commit_record_path(&Path::from("out"), 1, 4, "r1");
        assert_eq!(path.as_ref(), "out/_commits/shard-00001-of-00004/r1.json");
        let part = |name: &str, rows, bytes| CommittedPart {
            name: name.into(),
            rows,
            inputs: rows / 2,
            bytes,
        };
        let record = ShardCommitRecord::new(
            1,
            4,
            "r1".into(),
            vec![part("a", 10, 100), part("b", 4, 50)],
            serde_json::json!({"config": "abc"}),
        );
        assert_eq!((record.rows, record.inputs, record.bytes), (14, 7, 150));
        ensure_uncommitted(&store, &path, "r1", Duration::ZERO)
            .await
            .unwrap();
        write_record(&store, &path, &record, Duration::ZERO)
            .await
            .unwrap();
        let again = write_record(&store, &path, &record, Duration::ZERO).await;
        assert!(
            matches!(again, Err(DatasetError::AlreadyCommitted { .. })),
            "{again:?}"
        );
        assert!(
            ensure_uncommitted(&store, &path, "r1", Duration::ZERO)
                .await
                .is_err()
        );
        let stored = store.get(&path).await.unwrap().bytes().await.unwrap();
        let back: ShardCommitRecord = serde_json::from_slice(&stored).unwrap();
        assert_eq!(back, record);
    }
}
