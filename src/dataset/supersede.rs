//! Superseding committed rows, for `audiocap run --retry-failed`: the inputs whose
//! committed rows failed are taken out of the shard's parts before the run captions
//! them again, so the dataset never holds two sets of rows for one input and the
//! newest rows are the only ones any reader (or `_manifest.json`) sees.
//!
//! A part P with failed inputs is replaced by a part P' of the current run holding P's
//! other rows, whose footer says `audiocap.replaces = "P"`. P' is committed first, then
//! P is deleted. A run killed between the two leaves both visible; the next open of the
//! shard finds P' and deletes P ([`super::DatasetWriter::open`]), and `status` counts a
//! deleted P as replaced, not missing. Either way every input has one set of rows or
//! none, and an input with none is simply work for the next run.

use std::collections::HashSet;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch, new_null_array};
use arrow_schema::SchemaRef;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::reader::ChunkReader;

use super::{DatasetError, REPLACES_KEY, StoreKind, local_path, retry_store, strings};

/// Rows decoded at once from a part being carried over (bounds memory with a
/// row group's worth of encoded bytes on top).
const CARRY_BATCH_ROWS: usize = 8192;
/// Batches decoded ahead of the writer.
const CARRY_AHEAD: usize = 2;

/// The value of footer key `key`, if any.
pub(super) fn footer_value(metadata: &ParquetMetaData, key: &str) -> Option<String> {
    metadata
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|e| e.key == key))
        .and_then(|e| e.value.clone())
}

/// The part whose rows this one carries, per its footer.
pub(super) fn replaced_part(metadata: &ParquetMetaData) -> Option<String> {
    footer_value(metadata, REPLACES_KEY).filter(|name| !name.is_empty())
}

/// Where a committed part's bytes are read from.
enum PartBytes {
    /// Opened anew for each pass.
    File(std::path::PathBuf),
    /// Fetched whole from an object store: at most one part (`output.target_part_mb`
    /// plus one input's rows).
    Memory(bytes::Bytes),
}

impl PartBytes {
    async fn fetch(
        store: &dyn ObjectStore,
        kind: &StoreKind,
        part: &ObjectMeta,
        budget: std::time::Duration,
    ) -> Result<Self, DatasetError> {
        match kind {
            StoreKind::Local { root } => Ok(PartBytes::File(local_path(root, &part.location))),
            StoreKind::Object => {
                let location = &part.location;
                let bytes = retry_store(budget, "reading a part to rewrite", || async move {
                    store.get(location).await?.bytes().await
                })
                .await
                .map_err(|source| DatasetError::Store {
                    op: "reading part",
                    path: location.to_string(),
                    source,
                })?;
                Ok(PartBytes::Memory(bytes))
            }
        }
    }
}

/// Decodes `columns` (all when `None`) of the part `open` reads, batch by batch.
fn decode<R, F>(
    open: &F,
    path: &str,
    columns: Option<&[&str]>,
    mut each: impl FnMut(RecordBatch) -> Result<(), DatasetError>,
) -> Result<(), DatasetError>
where
    R: ChunkReader + 'static,
    F: Fn() -> std::io::Result<R>,
{
    let parquet_err = |source| DatasetError::Parquet {
        op: "reading part to rewrite",
        path: path.to_string(),
        source,
    };
    let reader = open().map_err(|source| DatasetError::Io {
        op: "opening part to rewrite",
        path: path.into(),
        source,
    })?;
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(reader)
        .map_err(parquet_err)?
        .with_batch_size(CARRY_BATCH_ROWS);
    if let Some(columns) = columns {
        let descr = builder.metadata().file_metadata().schema_descr_ptr();
        let leaves: Vec<usize> = columns
            .iter()
            .map(|name| {
                descr
                    .columns()
                    .iter()
                    .position(|c| c.path().string() == *name)
                    .ok_or_else(|| DatasetError::BadPart {
                        path: path.to_string(),
                        what: format!("no {name:?} column"),
                    })
            })
            .collect::<Result<_, _>>()?;
        builder = builder.with_projection(ProjectionMask::leaves(&descr, leaves));
    }
    for batch in builder.build().map_err(parquet_err)? {
        each(batch.map_err(|e| parquet_err(e.into()))?)?;
    }
    Ok(())
}

/// The URIs of the inputs with at least one error row in a part.
fn failed_uris<R, F>(open: &F, path: &str) -> Result<HashSet<String>, DatasetError>
where
    R: ChunkReader + 'static,
    F: Fn() -> std::io::Result<R>,
{
    let mut failed = HashSet::new();
    decode(open, path, Some(&["uri", "error"]), |batch| {
        let (Some(uris), Some(errors)) = (
            batch.column_by_name("uri").and_then(strings),
            batch.column_by_name("error"),
        ) else {
            return Err(DatasetError::BadPart {
                path: path.to_string(),
                what: "\"uri\" is not a text column".into(),
            });
        };
        for (i, uri) in uris.into_iter().enumerate() {
            if let Some(uri) = uri
                && errors.is_valid(i)
            {
                failed.insert(uri.to_string());
            }
        }
        Ok(())
    })?;
    Ok(failed)
}

/// `batch` (a part's rows, of this or an older schema) as a batch of `target`, the
/// writer's schema (today's columns and this run's optional ones): columns the part
/// lacks are null. A column the target lacks (tags or an embedding this run does not
/// write) is an error: carrying the rows over would drop it.
fn to_current_schema(
    batch: &RecordBatch,
    target: &SchemaRef,
    path: &str,
) -> Result<RecordBatch, DatasetError> {
    if let Some(extra) = batch
        .schema()
        .fields()
        .iter()
        .find(|f| target.field_with_name(f.name()).is_err())
    {
        return Err(DatasetError::BadPart {
            path: path.to_string(),
            what: format!(
                "its column {:?} is not one this run writes (check [output] tags and embedding)",
                extra.name()
            ),
        });
    }
    let columns = target
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) if column.data_type() == field.data_type() => Ok(column.clone()),
            Some(column) => Err(format!(
                "column {:?} is {}, not {}",
                field.name(),
                column.data_type(),
                field.data_type()
            )),
            None if field.is_nullable() => Ok(new_null_array(field.data_type(), batch.num_rows())),
            None => Err(format!("no {:?} column", field.name())),
        })
        .collect::<Result<Vec<ArrayRef>, String>>()
        .map_err(|what| DatasetError::BadPart {
            path: path.to_string(),
            what,
        })?;
    RecordBatch::try_new(target.clone(), columns).map_err(|source| DatasetError::Arrow {
        uri: String::new(),
        path: path.to_string(),
        source,
    })
}

/// The rows of `part` whose inputs have no error row, streamed in batches of today's
/// schema, or `None` when none of its inputs failed.
pub(super) struct Carried {
    /// Inputs taken out (each will be captioned again).
    pub failed: HashSet<String>,
    pub batches: tokio::sync::mpsc::Receiver<Result<RecordBatch, DatasetError>>,
}

pub(super) async fn carry_kept_rows(
    store: &dyn ObjectStore,
    kind: &StoreKind,
    part: &ObjectMeta,
    target: SchemaRef,
    budget: std::time::Duration,
) -> Result<Option<Carried>, DatasetError> {
    let path = part.location.to_string();
    let bytes = PartBytes::fetch(store, kind, part, budget).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(CARRY_AHEAD);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    // One blocking task does both passes; the first answer is the failed set.
    tokio::task::spawn_blocking(move || match bytes {
        PartBytes::File(file) => {
            carry_blocking(&|| std::fs::File::open(&file), &path, &target, first_tx, tx)
        }
        PartBytes::Memory(bytes) => {
            carry_blocking(&|| Ok(bytes.clone()), &path, &target, first_tx, tx);
        }
    });
    match first_rx.await {
        Ok(Ok(failed)) if failed.is_empty() => Ok(None),
        Ok(Ok(failed)) => Ok(Some(Carried {
            failed,
            batches: rx,
        })),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(DatasetError::BadPart {
            path: part.location.to_string(),
            what: "reading it stopped unexpectedly".into(),
        }),
    }
}

type FailedAnswer = tokio::sync::oneshot::Sender<Result<HashSet<String>, DatasetError>>;

fn carry_blocking<R, F>(
    open: &F,
    path: &str,
    target: &SchemaRef,
    first: FailedAnswer,
    tx: tokio::sync::mpsc::Sender<Result<RecordBatch, DatasetError>>,
) where
    R: ChunkReader + 'static,
    F: Fn() -> std::io::Result<R>,
{
    let failed = match failed_uris(open, path) {
        Ok(failed) => failed,
        Err(e) => {
            let _ = first.send(Err(e));
            return;
        }
    };
    if failed.is_empty() {
        let _ = first.send(Ok(failed));
        return;
    }
    let drop: Arc<HashSet<String>> = Arc::new(failed.clone());
    if first.send(Ok(failed)).is_err() {
        return;
    }
    let sent = decode(open, path, None, |batch| {
        let keep = kept_mask(&batch, &drop, path)?;
        let kept = arrow_select::filter::filter_record_batch(&batch, &keep).map_err(|source| {
            DatasetError::Arrow {
                uri: String::new(),
                path: path.to_string(),
                source,
            }
        })?;
        if kept.num_rows() > 0 {
            let current = to_current_schema(&kept, target, path)?;
            // The writer gave up (its own error): nothing more to read.
            if tx.blocking_send(Ok(current)).is_err() {
                return Err(DatasetError::BadPart {
                    path: path.to_string(),
                    what: "the writer stopped".into(),
                });
            }
        }
        Ok(())
    });
    if let Err(e) = sent {
        let _ = tx.blocking_send(Err(e));
    }
}

fn kept_mask(
    batch: &RecordBatch,
    drop: &HashSet<String>,
    path: &str,
) -> Result<BooleanArray, DatasetError> {
    let uris = batch
        .column_by_name("uri")
        .and_then(strings)
        .ok_or_else(|| DatasetError::BadPart {
            path: path.to_string(),
            what: "\"uri\" is not a text column".into(),
        })?;
    Ok(uris
        .into_iter()
        .map(|uri| Some(!uri.is_some_and(|u| drop.contains(u))))
        .collect())
}

/// Inputs in `batch`'s `uri` column, counting a run of equal URIs once and
/// continuing the run from `last` (an input's rows are together in a part).
pub(super) fn count_inputs(batch: &RecordBatch, last: &mut Option<String>) -> u64 {
    let Some(uris) = batch.column_by_name("uri").and_then(strings) else {
        return 0;
    };
    let mut inputs = 0;
    for uri in uris.into_iter().flatten() {
        if last.as_deref() != Some(uri) {
            inputs += 1;
            *last = Some(uri.to_string());
        }
    }
    inputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{StringArray, UInt32Array};
    use arrow_schema::{DataType, Field, Schema};

    use crate::output::{
        CaptionRow, EmbeddingColumn, EmbeddingDtype, EmbeddingKind, OutputColumns, Tag, schema,
    };

    #[test]
    fn older_parts_gain_the_columns_they_lack_as_nulls() {
        let old = Arc::new(Schema::new(vec![
            Field::new("uri", DataType::Utf8, false),
            Field::new("segment_index", DataType::UInt32, false),
            Field::new("model", DataType::Utf8, false),
            Field::new("run_id", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            old.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(UInt32Array::from(vec![0, 0])),
                Arc::new(StringArray::from(vec!["m", "m"])),
                Arc::new(StringArray::from(vec!["r", "r"])),
            ],
        )
        .unwrap();
        // `processed_at` and the rest of today's required columns are missing.
        let err = to_current_schema(&batch, &schema(), "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no \"processed_at\" column"), "{err}");

        let full = RecordBatch::new_empty(schema());
        let dropped: Vec<usize> = ["warnings", "error_kind"]
            .iter()
            .map(|n| full.schema().index_of(n).unwrap())
            .collect();
        let keep: Vec<usize> = (0..full.num_columns())
            .filter(|i| !dropped.contains(i))
            .collect();
        let older = full.project(&keep).unwrap();
        let back = to_current_schema(&older, &schema(), "p").unwrap();
        assert_eq!(back.schema(), schema());
    }

    /// A run writing tags and embeddings carries a part without them (nulls there)
    /// and one with them (kept as they are); a run writing neither refuses a part
    /// with them rather than dropping them.
    #[test]
    fn optional_columns_are_carried_filled_or_refused() {
        let columns = OutputColumns {
            tags: true,
            embedding: Some(EmbeddingColumn {
                kind: EmbeddingKind::Encoder,
                dim: 2,
                dtype: EmbeddingDtype::F16,
            }),
        };
        let rows = vec![CaptionRow {
            uri: "a".into(),
            tags: Some(vec![Tag {
                label: "Siren".into(),
                score: 0.9,
            }]),
            embedding: Some(vec![0.5, 1.0]),
            ..Default::default()
        }];
        let target = columns.schema();
        let plain = crate::output::to_record_batch(&rows).unwrap();
        let filled = to_current_schema(&plain, &target, "p").unwrap();
        assert_eq!(filled.schema(), target);
        assert_eq!(filled.column_by_name("tags").unwrap().null_count(), 1);
        assert_eq!(filled.column_by_name("embedding").unwrap().null_count(), 1);
        let full = columns.record_batch(&rows).unwrap();
        let kept = to_current_schema(&full, &target, "p").unwrap();
        assert_eq!(kept, full);
        let err = to_current_schema(&full, &schema(), "p")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its column \"tags\" is not one this run writes"),
            "{err}"
        );
    }

    #[test]
    fn inputs_are_counted_across_batches() {
        let batch = |uris: Vec<&str>| {
            let schema = Arc::new(Schema::new(vec![Field::new("uri", DataType::Utf8, false)]));
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(uris))]).unwrap()
        };
        let mut last = None;
        assert_eq!(count_inputs(&batch(vec!["a", "a", "b"]), &mut last), 2);
        assert_eq!(count_inputs(&batch(vec!["b", "c"]), &mut last), 1);
        assert_eq!(last.as_deref(), Some("c"));
    }
}
