//! One shard's writer: inputs go into size-targeted parts, each committed atomically.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use std::collections::BTreeSet;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectMeta;

use super::commit::{ensure_uncommitted, write_record};
use super::finalize::footer_counts;
use super::resume::read_footer;
use super::supersede::{Carried, carry_kept_rows, count_inputs, replaced_part};
use super::{
    CommittedPart, DatasetError, DatasetWriterOptions, ERROR_KINDS_KEY, FAILED_INPUTS_KEY,
    INPUTS_KEY, MANIFEST_FILE, REPLACES_KEY, STAGING_DIR, SUCCESS_FILE, ShardCommitRecord,
    StoreKind, commit_record_path, is_committed_part, is_replacement_name, is_shard_part,
    list_objects, local_path, part_layout, part_name, part_seq, replacement_part_name, retry_store,
    shard_part_prefix,
};
use crate::output::{CaptionRow, RowFailure};

/// Writes one shard's inputs as parts of the dataset under `prefix`.
///
/// An input's rows always land in one part, so a committed part holds whole inputs
/// and resuming by URI is exact. Parts become visible only when committed; a writer
/// dropped (or a process killed) with a part open leaves nothing visible, and its
/// inputs are simply not committed.
///
/// Encoding runs on the calling task (cheap per input; a row-group flush writes up to
/// `row_group_bytes`); closing a part runs on the blocking pool.
///
/// The async methods are not cancel-safe: a cancelled call, or one that fails,
/// discards the open part (its inputs are not committed, as after a kill).
pub struct DatasetWriter {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    kind: StoreKind,
    options: DatasetWriterOptions,
    props: WriterProperties,
    next_seq: u32,
    open: Option<OpenPart>,
    committed: Vec<CommittedPart>,
    /// This shard's parts (any run) that were already committed when it opened.
    inherited: Vec<ObjectMeta>,
}

impl DatasetWriter {
    /// Checks the options, refuses a run id this shard already committed, removes
    /// this shard's staging files left by killed runs (local disk), and continues
    /// part numbering after any parts this shard and run already committed.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        kind: StoreKind,
        options: DatasetWriterOptions,
    ) -> Result<Self, DatasetError> {
        options.validate()?;
        let (shard, shards, run_id) = (options.shard_index, options.shard_count, &options.run_id);
        let record = commit_record_path(&prefix, shard, shards, run_id);
        ensure_uncommitted(store.as_ref(), &record, run_id, options.transient_retry).await?;
        if let StoreKind::Local { root } = &kind {
            prepare_local(&local_path(root, &prefix), shard, shards)?;
        }
        let listed = list_objects(store.as_ref(), &prefix).await?;
        let names = listed.iter().filter_map(|o| o.location.filename());
        let other = names
            .clone()
            .filter(|n| is_committed_part(n))
            .find_map(|n| {
                part_layout(n)
                    .filter(|&(_, count)| count != shards)
                    .map(|(_, count)| (n, count))
            });
        if let Some((part, found)) = other {
            return Err(DatasetError::OtherLayout {
                prefix: prefix.to_string(),
                part: part.to_string(),
                found,
                asked: shards,
            });
        }
        let next_seq = names
            .filter_map(|name| part_seq(name, shard, shards, run_id))
            .max()
            .map_or(0, |seq| seq + 1);
        let mine: Vec<ObjectMeta> = listed
            .into_iter()
            .filter(|o| {
                o.location
                    .filename()
                    .is_some_and(|name| is_shard_part(name, shard, shards))
            })
            .collect();
        let inherited = finish_replacements(store.as_ref(), mine, options.transient_retry).await?;
        let mut metadata = options.metadata.clone();
        metadata.extend(options.columns.metadata());
        let props = options.columns.writer_properties(metadata);
        Ok(Self {
            store,
            prefix,
            kind,
            options,
            props,
            next_seq,
            open: None,
            committed: Vec::new(),
            inherited,
        })
    }

    /// Adds all rows (segments) of one input to the open part, then commits the part
    /// if it reached its size, row or age limit. No rows: nothing to write.
    pub async fn write_input(&mut self, rows: &[CaptionRow]) -> Result<(), DatasetError> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let mut part = match self.open.take() {
            Some(part) => part,
            None => self.new_part(None)?,
        };
        let batch = match self.options.columns.record_batch(rows) {
            Ok(batch) => batch,
            Err(source) => {
                let error = DatasetError::Arrow {
                    uri: first.uri.clone(),
                    path: part.location.to_string(),
                    source,
                };
                return Err(part.discard(error).await);
            }
        };
        if let Err(error) = part.write(&batch, self.store.as_ref(), &self.options).await {
            return Err(part.discard(error).await);
        }
        part.rows += rows.len() as u64;
        part.inputs += distinct_uris(rows);
        if rows.iter().all(|r| r.caption.is_none()) {
            part.failed_inputs += 1;
        }
        for row in rows.iter().filter(|r| r.error.is_some()) {
            let kind = row.failure.map_or("unknown", RowFailure::kind);
            *part.error_kinds.entry(kind.to_string()).or_default() += 1;
        }
        let due = part.encoded_bytes() >= self.options.target_part_bytes
            || part.rows >= self.options.max_rows_per_part
            || part.opened.elapsed() >= self.options.max_part_age;
        self.open = Some(part);
        if due {
            self.commit_open().await?;
        }
        Ok(())
    }

    /// Commits the open part if it is older than `max_part_age` (call it periodically
    /// when inputs arrive slowly). Returns the part committed, if any.
    pub async fn commit_if_due(&mut self) -> Result<Option<CommittedPart>, DatasetError> {
        match &self.open {
            Some(part) if part.opened.elapsed() >= self.options.max_part_age => {
                self.commit_open().await
            }
            _ => Ok(None),
        }
    }

    /// Commits the open part now, if any.
    pub async fn flush(&mut self) -> Result<Option<CommittedPart>, DatasetError> {
        self.commit_open().await
    }

    /// Commits the open part, then writes this shard run's commit record (create-only)
    /// holding every committed part and `run` (the caller's summary).
    pub async fn finish(
        mut self,
        run: serde_json::Value,
    ) -> Result<ShardCommitRecord, DatasetError> {
        self.commit_open().await?;
        let o = &self.options;
        let path = commit_record_path(&self.prefix, o.shard_index, o.shard_count, &o.run_id);
        let parts = std::mem::take(&mut self.committed);
        let mut shard_parts: Vec<String> = self.inherited.iter().map(part_file_name).collect();
        shard_parts.extend(parts.iter().map(|p| p.name.clone()));
        shard_parts.sort();
        shard_parts.dedup();
        let mut record =
            ShardCommitRecord::new(o.shard_index, o.shard_count, o.run_id.clone(), parts, run);
        record.shard_parts = shard_parts;
        record.model = o.model.clone();
        record.config_digest = o.config_digest.clone();
        write_record(self.store.as_ref(), &path, &record, o.transient_retry).await?;
        tracing::info!(
            path = %path,
            parts = record.parts.len(),
            rows = record.rows,
            inputs = record.inputs,
            bytes = record.bytes,
            "shard run committed"
        );
        Ok(record)
    }

    /// `--retry-failed`: takes every input with an error row out of this shard's
    /// committed parts, so that this run (which then finds them not done) captions
    /// them again and the dataset keeps only the new rows. Call it after `open`,
    /// before reading what the dataset holds. Each part with failed inputs is
    /// replaced by one of this run's holding its other rows ([`super::supersede`]);
    /// a finalized dataset loses its `_SUCCESS` and `_manifest.json` first, since the
    /// parts they list change (finalize again once every shard is done).
    pub async fn supersede_failed(&mut self) -> Result<SupersedeReport, DatasetError> {
        let budget = self.options.transient_retry;
        let store = self.store.clone();
        let mut report = SupersedeReport::default();
        let candidates: Vec<ObjectMeta> = std::mem::take(&mut self.inherited);
        let mut withdrawn = false;
        for (i, part) in candidates.iter().enumerate() {
            let name = part_file_name(part);
            let footer = read_footer(store.as_ref(), part).await?;
            let (_, error_rows) = footer_counts(&footer, part.location.as_ref())?;
            let carried = if error_rows == 0 {
                None
            } else {
                carry_kept_rows(
                    store.as_ref(),
                    &self.kind,
                    part,
                    self.options.columns.schema(),
                    budget,
                )
                .await?
            };
            let Some(carried) = carried else {
                self.inherited.push(part.clone());
                continue;
            };
            if !withdrawn {
                withdraw_finalized(store.as_ref(), &self.prefix, budget).await?;
                withdrawn = true;
            }
            let failed = carried.failed.len() as u64;
            let replacement = match self.replace(&name, carried).await {
                Ok(replacement) => replacement,
                Err(e) => {
                    // What was not replaced is still this shard's.
                    self.inherited.extend(candidates[i..].iter().cloned());
                    return Err(e);
                }
            };
            delete_part(store.as_ref(), &part.location, budget).await?;
            tracing::info!(
                part = %name,
                replacement = %replacement.name,
                failed_inputs = failed,
                "failed inputs taken out of a committed part, to be captioned again"
            );
            report.parts += 1;
            report.failed_inputs += failed;
        }
        Ok(report)
    }

    /// Writes `carried` (the kept rows of part `replaced`) as a replacement part and
    /// commits it.
    async fn replace(
        &mut self,
        replaced: &str,
        mut carried: Carried,
    ) -> Result<CommittedPart, DatasetError> {
        // Replacements come before any new rows; should a part be open, its rows
        // are committed first rather than mixed in.
        self.commit_open().await?;
        let mut part = self.new_part(Some(replaced.to_string()))?;
        let mut last_uri = None;
        while let Some(batch) = carried.batches.recv().await {
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => return Err(part.discard(e).await),
            };
            if let Err(e) = part.write(&batch, self.store.as_ref(), &self.options).await {
                return Err(part.discard(e).await);
            }
            part.rows += batch.num_rows() as u64;
            part.inputs += count_inputs(&batch, &mut last_uri);
        }
        // The kept inputs each have no error row, so no failed inputs and no error
        // kinds: the footer's counts stay zero.
        self.open = Some(part);
        let committed = self.commit_open().await?;
        committed.ok_or_else(|| DatasetError::BadPart {
            path: replaced.to_string(),
            what: "its replacement was not committed".into(),
        })
    }

    /// Parts committed so far by this writer.
    pub fn committed(&self) -> &[CommittedPart] {
        &self.committed
    }

    /// Rows in the open (uncommitted) part.
    pub fn open_rows(&self) -> u64 {
        self.open.as_ref().map_or(0, |p| p.rows)
    }

    /// A new part; `replaces` names the part whose rows it carries.
    fn new_part(&mut self, replaces: Option<String>) -> Result<OpenPart, DatasetError> {
        let o = &self.options;
        let name = if replaces.is_some() {
            replacement_part_name(o.shard_index, o.shard_count, &o.run_id, self.next_seq)
        } else {
            part_name(o.shard_index, o.shard_count, &o.run_id, self.next_seq)
        };
        self.next_seq += 1;
        let location = self.prefix.clone().join(name.as_str());
        let schema = self.options.columns.schema();
        let parquet_err = |op, source| DatasetError::Parquet {
            op,
            path: location.to_string(),
            source,
        };
        let writer = match &self.kind {
            StoreKind::Local { root } => {
                let dir = local_path(root, &self.prefix);
                let staging = dir.join(STAGING_DIR).join(&name);
                let file = File::create(&staging).map_err(|source| DatasetError::Io {
                    op: "creating staging part",
                    path: staging.clone(),
                    source,
                })?;
                let writer = ArrowWriter::try_new(file, schema.clone(), Some(self.props.clone()))
                    .map_err(|e| parquet_err("starting part", e))?;
                PartWriter::Local {
                    writer,
                    staging,
                    final_path: dir.join(&name),
                }
            }
            StoreKind::Object => PartWriter::Object {
                writer: ArrowWriter::try_new(Vec::new(), schema, Some(self.props.clone()))
                    .map_err(|e| parquet_err("starting part", e))?,
                pending: Vec::new(),
                upload: None,
                sent: 0,
            },
        };
        tracing::debug!(part = %location, "part opened");
        Ok(OpenPart {
            name,
            location,
            writer,
            opened: Instant::now(),
            rows: 0,
            inputs: 0,
            error_kinds: BTreeMap::new(),
            failed_inputs: 0,
            replaces,
        })
    }

    async fn commit_open(&mut self) -> Result<Option<CommittedPart>, DatasetError> {
        let Some(part) = self.open.take() else {
            return Ok(None);
        };
        let budget = self.options.transient_retry;
        let committed = part.commit(self.store.as_ref(), budget).await?;
        tracing::info!(
            part = %committed.name,
            rows = committed.rows,
            inputs = committed.inputs,
            bytes = committed.bytes,
            "part committed"
        );
        self.committed.push(committed.clone());
        Ok(Some(committed))
    }
}

/// Creates `dir/_staging` and removes this shard's staging files left there by killed
/// runs. Only this shard's files: other shards may be writing theirs right now.
fn prepare_local(dir: &FsPath, shard: u32, shards: u32) -> Result<(), DatasetError> {
    let staging = dir.join(STAGING_DIR);
    std::fs::create_dir_all(&staging).map_err(|source| DatasetError::Io {
        op: "creating staging folder",
        path: staging.clone(),
        source,
    })?;
    let entries = std::fs::read_dir(&staging).map_err(|source| DatasetError::Io {
        op: "listing staging folder",
        path: staging.clone(),
        source,
    })?;
    let mine = shard_part_prefix(shard, shards);
    for entry in entries {
        let entry = entry.map_err(|source| DatasetError::Io {
            op: "listing staging folder",
            path: staging.clone(),
            source,
        })?;
        if entry.file_name().to_string_lossy().starts_with(&mine) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| DatasetError::Io {
                op: "removing stale staging part",
                path: path.clone(),
                source,
            })?;
            tracing::info!(path = %path.display(), "removed stale staging part");
        }
    }
    Ok(())
}

/// What [`DatasetWriter::supersede_failed`] took out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SupersedeReport {
    /// Parts replaced.
    pub parts: u64,
    /// Inputs taken out of them, to be captioned again.
    pub failed_inputs: u64,
}

fn part_file_name(part: &ObjectMeta) -> String {
    part.location.filename().unwrap_or_default().to_string()
}

/// This shard's parts left once those that a visible replacement names are deleted
/// (a `--retry-failed` run killed after committing a replacement, before deleting
/// what it replaced), by name. Only replacements' footers are read.
async fn finish_replacements(
    store: &dyn ObjectStore,
    mine: Vec<ObjectMeta>,
    budget: Duration,
) -> Result<Vec<ObjectMeta>, DatasetError> {
    let replacements = mine
        .iter()
        .filter(|o| is_replacement_name(&part_file_name(o)));
    let replaced: BTreeSet<String> = futures::stream::iter(replacements)
        .map(|part| async move { read_footer(store, part).await.map(|f| replaced_part(&f)) })
        .buffer_unordered(8)
        .try_collect::<Vec<Option<String>>>()
        .await?
        .into_iter()
        .flatten()
        .collect();
    let mut left = Vec::new();
    for part in mine {
        let name = part_file_name(&part);
        if replaced.contains(&name) {
            delete_part(store, &part.location, budget).await?;
            tracing::info!(part = %name, "removed a part that a replacement already carries (a --retry-failed run was stopped)");
        } else {
            left.push(part);
        }
    }
    left.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(left)
}

/// Deletes a committed part; one already gone is fine.
async fn delete_part(
    store: &dyn ObjectStore,
    location: &Path,
    budget: Duration,
) -> Result<(), DatasetError> {
    match retry_store(budget, "deleting a replaced part", || {
        store.delete(location)
    })
    .await
    {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(DatasetError::Store {
            op: "deleting replaced part",
            path: location.to_string(),
            source,
        }),
    }
}

/// Removes `_SUCCESS`, then `_manifest.json`: the dataset is no longer final once
/// its parts change.
async fn withdraw_finalized(
    store: &dyn ObjectStore,
    prefix: &Path,
    budget: Duration,
) -> Result<(), DatasetError> {
    for file in [SUCCESS_FILE, MANIFEST_FILE] {
        let location = prefix.clone().join(file);
        match retry_store(budget, "withdrawing the finalized marker", || {
            store.delete(&location)
        })
        .await
        {
            Ok(()) => {
                tracing::info!(file = %location, "removed: the dataset changes, finalize it again")
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(DatasetError::Store {
                    op: "removing finalized marker",
                    path: location.to_string(),
                    source,
                });
            }
        }
    }
    Ok(())
}

fn distinct_uris(rows: &[CaptionRow]) -> u64 {
    let mut uris: Vec<&str> = rows.iter().map(|r| r.uri.as_str()).collect();
    uris.sort_unstable();
    uris.dedup();
    uris.len() as u64
}

struct OpenPart {
    name: String,
    /// The object path the part has once committed.
    location: Path,
    writer: PartWriter,
    opened: Instant,
    rows: u64,
    inputs: u64,
    /// Error rows by `error_kind`, recorded in the footer at commit
    /// ([`super::ERROR_KINDS_KEY`]) so status and finalize need not read the rows.
    error_kinds: BTreeMap<String, u64>,
    /// Inputs of the part with no caption at all ([`super::FAILED_INPUTS_KEY`]).
    failed_inputs: u64,
    /// The part whose rows this one carries ([`super::REPLACES_KEY`]).
    replaces: Option<String>,
}

enum PartWriter {
    /// Encoded into `staging`, renamed to `final_path` to commit. Not
    /// `crate::atomic`'s staging name: a part stages under `_staging/` with its own
    /// (already unique) part name, because that is where the next open of the same
    /// shard finds and removes a killed run's parts, and where resume ignores them;
    /// the commit also syncs the folder after the rename (see [`close_and_rename`]).
    Local {
        writer: ArrowWriter<File>,
        staging: PathBuf,
        final_path: PathBuf,
    },
    /// Encoded into memory and moved out after each input: held in `pending` until
    /// one upload chunk is full, then streamed through a multipart upload.
    Object {
        writer: ArrowWriter<Vec<u8>>,
        pending: Vec<u8>,
        upload: Option<WriteMultipart>,
        /// Bytes moved out of `writer` so far.
        sent: u64,
    },
}

impl OpenPart {
    fn encoded_bytes(&self) -> u64 {
        match &self.writer {
            PartWriter::Local { writer, .. } => encoded_bytes(writer),
            PartWriter::Object { writer, .. } => encoded_bytes(writer),
        }
    }

    async fn write(
        &mut self,
        batch: &RecordBatch,
        store: &dyn ObjectStore,
        options: &DatasetWriterOptions,
    ) -> Result<(), DatasetError> {
        let path = || self.location.to_string();
        match &mut self.writer {
            PartWriter::Local { writer, .. } => encode(writer, batch, options.row_group_bytes)
                .map_err(|source| DatasetError::Parquet {
                    op: "encoding part",
                    path: path(),
                    source,
                }),
            PartWriter::Object {
                writer,
                pending,
                upload,
                sent,
            } => {
                encode(writer, batch, options.row_group_bytes).map_err(|source| {
                    DatasetError::Parquet {
                        op: "encoding part",
                        path: path(),
                        source,
                    }
                })?;
                // Safe to move bytes out of the buffer: the writer only appends to it
                // (parquet's own async writer does the same).
                let encoded = std::mem::take(writer.inner_mut());
                *sent += encoded.len() as u64;
                let store_err = |op, source| DatasetError::Store {
                    op,
                    path: path(),
                    source,
                };
                match upload {
                    Some(upload) => upload.put(Bytes::from(encoded)),
                    None => {
                        pending.extend_from_slice(&encoded);
                        if pending.len() >= options.upload_chunk_bytes {
                            let location = &self.location;
                            let started = retry_store(
                                options.transient_retry,
                                "starting a multipart upload",
                                || store.put_multipart(location),
                            )
                            .await
                            .map_err(|e| store_err("starting multipart upload", e))?;
                            let mut multipart = WriteMultipart::new_with_chunk_size(
                                started,
                                options.upload_chunk_bytes,
                            );
                            multipart.put(Bytes::from(std::mem::take(pending)));
                            *upload = Some(multipart);
                        }
                    }
                }
                if let Some(upload) = upload {
                    upload
                        .wait_for_capacity(options.upload_concurrency)
                        .await
                        .map_err(|e| store_err("uploading part", e))?;
                }
                Ok(())
            }
        }
    }

    /// Closes the part and makes it visible; on failure nothing becomes visible.
    async fn commit(
        self,
        store: &dyn ObjectStore,
        transient_retry: Duration,
    ) -> Result<CommittedPart, DatasetError> {
        let OpenPart {
            name,
            location,
            mut writer,
            rows,
            inputs,
            error_kinds,
            failed_inputs,
            replaces,
            ..
        } = self;
        let kinds = serde_json::to_string(&error_kinds).unwrap_or_default();
        let mut footer = vec![
            KeyValue::new(ERROR_KINDS_KEY.to_string(), kinds),
            KeyValue::new(INPUTS_KEY.to_string(), inputs.to_string()),
            KeyValue::new(FAILED_INPUTS_KEY.to_string(), failed_inputs.to_string()),
        ];
        if let Some(replaced) = replaces {
            footer.push(KeyValue::new(REPLACES_KEY.to_string(), replaced));
        }
        for kv in footer {
            match &mut writer {
                PartWriter::Local { writer, .. } => writer.append_key_value_metadata(kv),
                PartWriter::Object { writer, .. } => writer.append_key_value_metadata(kv),
            }
        }
        let bytes = match writer {
            PartWriter::Local {
                writer,
                staging,
                final_path,
            } => {
                let task = tokio::task::spawn_blocking(move || {
                    let result = close_and_rename(writer, &staging, &final_path);
                    if result.is_err() {
                        // Best effort: the next open removes it anyway.
                        let _ = std::fs::remove_file(&staging);
                    }
                    result
                });
                task.await.map_err(|source| DatasetError::Task {
                    op: "committing part",
                    source,
                })??
            }
            PartWriter::Object {
                writer,
                mut pending,
                upload,
                sent,
            } => {
                let path = location.to_string();
                let closed = tokio::task::spawn_blocking(move || writer.into_inner()).await;
                let tail = match closed {
                    Ok(Ok(tail)) => tail,
                    Ok(Err(source)) => {
                        let error = DatasetError::Parquet {
                            op: "closing part",
                            path,
                            source,
                        };
                        return Err(abort(upload, error).await);
                    }
                    Err(source) => {
                        let error = DatasetError::Task {
                            op: "closing part",
                            source,
                        };
                        return Err(abort(upload, error).await);
                    }
                };
                let bytes = sent + tail.len() as u64;
                let done = match upload {
                    // `finish` aborts the upload itself when it fails.
                    Some(mut upload) => {
                        upload.put(Bytes::from(tail));
                        upload.finish().await
                    }
                    None => {
                        pending.extend_from_slice(&tail);
                        let payload = PutPayload::from(pending);
                        retry_store(transient_retry, "committing a part", || {
                            store.put(&location, payload.clone())
                        })
                        .await
                    }
                };
                done.map_err(|source| DatasetError::Store {
                    op: "committing part",
                    path,
                    source,
                })?;
                bytes
            }
        };
        Ok(CommittedPart {
            name,
            rows,
            inputs,
            bytes,
        })
    }

    /// Drops the part after `error`, cleaning up what it left; returns `error`.
    async fn discard(self, error: DatasetError) -> DatasetError {
        match self.writer {
            PartWriter::Local { staging, .. } => {
                let _ = std::fs::remove_file(&staging);
                error
            }
            PartWriter::Object { upload, .. } => abort(upload, error).await,
        }
    }
}

/// Aborts a started multipart upload (best effort) and returns `error`.
async fn abort(upload: Option<WriteMultipart>, error: DatasetError) -> DatasetError {
    if let Some(upload) = upload
        && let Err(e) = upload.abort().await
    {
        tracing::warn!(error = %e, "aborting multipart upload failed");
    }
    error
}

/// Bytes already written plus the estimated encoded size of the open row group.
fn encoded_bytes<W: Write + Send>(writer: &ArrowWriter<W>) -> u64 {
    (writer.bytes_written() + writer.in_progress_size()) as u64
}

fn encode<W: Write + Send>(
    writer: &mut ArrowWriter<W>,
    batch: &RecordBatch,
    row_group_bytes: u64,
) -> Result<(), parquet::errors::ParquetError> {
    writer.write(batch)?;
    if writer.in_progress_size() as u64 >= row_group_bytes {
        writer.flush()?;
    }
    Ok(())
}

/// Writes the footer, syncs, and renames the staging file into place (the commit).
/// Returns the file's size.
fn close_and_rename(
    writer: ArrowWriter<File>,
    staging: &FsPath,
    final_path: &FsPath,
) -> Result<u64, DatasetError> {
    let io_err = |op, path: &FsPath| {
        let path = path.to_path_buf();
        move |source| DatasetError::Io { op, path, source }
    };
    let file = writer
        .into_inner()
        .map_err(|source| DatasetError::Parquet {
            op: "closing part",
            path: staging.display().to_string(),
            source,
        })?;
    file.sync_all().map_err(io_err("syncing part", staging))?;
    let bytes = file
        .metadata()
        .map_err(io_err("reading part size", staging))?
        .len();
    drop(file);
    std::fs::rename(staging, final_path).map_err(io_err("committing part", final_path))?;
    // The rename itself must survive a power loss, not only a killed process.
    if let Some(dir) = final_path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing dataset folder", dir))?;
    }
    Ok(bytes)
}
