//! Resume: the inputs (URIs) a shard's committed parts already hold.

use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::errors::ParquetError;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::reader::{ChunkReader, Length};

use super::{DatasetError, is_shard_part, list_objects, strings};
use crate::keyset::KeySet;

/// The column resume reads.
const URI: &str = "uri";
/// Bytes fetched from the end of a part, first try at its footer.
const FOOTER_GUESS: u64 = 64 << 10;
/// Parts read at once.
const PARALLEL_PARTS: usize = 8;

/// Every `uri` in the committed parts of shard `index` of `count` under `prefix`: a
/// dataset has one shard layout (`finalize` refuses several), and an input belongs
/// to one shard, so the other shards' parts cannot hold this shard's inputs. Anything
/// hidden (`_staging/`, `_commits/`, `.`-names) is not a part; a visible part is
/// complete.
///
/// Each part's footer and its `uri` column chunks are fetched with ranged reads (on
/// local disk as on object stores) and decoded with `parquet`, so resuming reads the
/// URI column, not the dataset; the URIs go into a [`KeySet`] spilling under
/// `spill_dir`, so memory grows by a few dozen bytes per input, not by the URIs.
pub async fn committed_inputs(
    store: Arc<dyn ObjectStore>,
    prefix: &Path,
    index: u32,
    count: u32,
    spill_dir: &FsPath,
) -> Result<KeySet, DatasetError> {
    let parts: Vec<ObjectMeta> = list_objects(store.as_ref(), prefix)
        .await?
        .into_iter()
        .filter(|o| {
            o.location
                .filename()
                .is_some_and(|n| is_shard_part(n, index, count))
        })
        .collect();
    let spill_err = |source| DatasetError::Keys {
        what: "the inputs already in the dataset",
        source,
    };
    let mut uris = KeySet::new(spill_dir).map_err(spill_err)?;
    let mut reads = futures::stream::iter(parts)
        .map(|part| part_uris(store.as_ref(), part))
        .buffer_unordered(PARALLEL_PARTS);
    while let Some(part) = reads.try_next().await? {
        for uri in part {
            uris.insert(&uri).map_err(spill_err)?;
        }
    }
    Ok(uris)
}

/// The footer (metadata) of one part, with one ranged read when it fits the first
/// guess, two otherwise.
pub(super) async fn read_footer(
    store: &dyn ObjectStore,
    part: &ObjectMeta,
) -> Result<ParquetMetaData, DatasetError> {
    let path = part.location.to_string();
    let (location, size) = (&part.location, part.size);
    let get = |range: Range<u64>| async {
        store
            .get_range(location, range)
            .await
            .map_err(|source| DatasetError::Store {
                op: "reading part",
                path: path.clone(),
                source,
            })
    };
    let parquet_err = |source| DatasetError::Parquet {
        op: "reading footer",
        path: path.clone(),
        source,
    };
    let tail = get(size.saturating_sub(FOOTER_GUESS)..size).await?;
    let mut reader = ParquetMetaDataReader::new().with_page_index_policy(PageIndexPolicy::Skip);
    match reader.try_parse_sized(&tail, size) {
        Ok(()) => {}
        Err(ParquetError::NeedMoreData(needed)) => {
            let tail = get(size.saturating_sub(needed as u64)..size).await?;
            reader.try_parse_sized(&tail, size).map_err(parquet_err)?;
        }
        Err(e) => return Err(parquet_err(e)),
    }
    reader.finish().map_err(parquet_err)
}

/// The URIs of one part on an object store, from its footer and `uri` column chunks.
async fn part_uris(store: &dyn ObjectStore, part: ObjectMeta) -> Result<Vec<String>, DatasetError> {
    let path = part.location.to_string();
    let size = part.size;
    let parquet_err = |op, source| DatasetError::Parquet {
        op,
        path: path.clone(),
        source,
    };
    let metadata = read_footer(store, &part).await?;
    let column = uri_leaf(&metadata).ok_or_else(|| DatasetError::BadPart {
        path: path.clone(),
        what: format!("no {URI:?} column"),
    })?;
    // The footer may come from a file we did not write: a chunk must lie in the part.
    let ranges: Vec<Range<u64>> = metadata
        .row_groups()
        .iter()
        .map(|rg| {
            let (start, len) = rg.column(column).byte_range();
            start
                .checked_add(len)
                .filter(|&end| end <= size)
                .map(|end| start..end)
                .ok_or_else(|| DatasetError::BadPart {
                    path: path.clone(),
                    what: format!(
                        "the footer puts a {URI:?} chunk at bytes {start}+{len}, outside the \
                         {size}-byte file"
                    ),
                })
        })
        .collect::<Result<_, _>>()?;
    let chunks = store
        .get_ranges(&part.location, &ranges)
        .await
        .map_err(|source| DatasetError::Store {
            op: "reading uri column",
            path: path.clone(),
            source,
        })?;
    let file = SparseFile {
        len: size,
        chunks: ranges.iter().map(|r| r.start).zip(chunks).collect(),
    };
    let decode = move || decode_uris(file, metadata, column);
    tokio::task::spawn_blocking(decode)
        .await
        .map_err(|source| DatasetError::Task {
            op: "decoding uri column",
            source,
        })?
        .map_err(|e| match e {
            UriColumnError::Parquet(source) => parquet_err("decoding uri column", source),
            UriColumnError::NotStrings => DatasetError::BadPart {
                path: path.clone(),
                what: format!("{URI:?} is not a string column"),
            },
        })
}

fn uri_leaf(metadata: &ParquetMetaData) -> Option<usize> {
    let schema = metadata.file_metadata().schema_descr();
    schema
        .columns()
        .iter()
        .position(|c| c.path().string() == URI)
}

enum UriColumnError {
    Parquet(ParquetError),
    NotStrings,
}

fn decode_uris<R: ChunkReader + 'static>(
    file: R,
    metadata: ParquetMetaData,
    column: usize,
) -> Result<Vec<String>, UriColumnError> {
    let arrow = ArrowReaderMetadata::try_new(Arc::new(metadata), ArrowReaderOptions::new())
        .map_err(UriColumnError::Parquet)?;
    let mask = ProjectionMask::leaves(arrow.metadata().file_metadata().schema_descr(), [column]);
    let batches = ParquetRecordBatchReaderBuilder::new_with_metadata(file, arrow)
        .with_projection(mask)
        .build()
        .map_err(UriColumnError::Parquet)?;
    // An input's rows are together in a part: one URI per input.
    let mut uris: Vec<String> = Vec::new();
    for batch in batches {
        let batch = batch.map_err(|e| UriColumnError::Parquet(e.into()))?;
        let column = strings(batch.column(0)).ok_or(UriColumnError::NotStrings)?;
        for uri in column.into_iter().flatten() {
            if uris.last().map(String::as_str) != Some(uri) {
                uris.push(uri.to_owned());
            }
        }
    }
    Ok(uris)
}

/// A file of which only some byte ranges were fetched; reading outside them is an
/// error (it would mean the reader wants more than the projected column).
struct SparseFile {
    len: u64,
    /// `(offset, bytes)`, one per fetched range.
    chunks: Vec<(u64, Bytes)>,
}

impl SparseFile {
    fn slice(&self, start: u64, len: Option<usize>) -> Result<Bytes, ParquetError> {
        for (offset, bytes) in &self.chunks {
            let end = offset + bytes.len() as u64;
            if start < *offset || start > end {
                continue;
            }
            let from = (start - offset) as usize;
            let to = match len {
                Some(len) if from.checked_add(len).is_some_and(|to| to <= bytes.len()) => {
                    from + len
                }
                Some(_) => continue,
                None => bytes.len(),
            };
            return Ok(bytes.slice(from..to));
        }
        Err(ParquetError::General(format!(
            "bytes {start}..{} were not fetched",
            len.map_or(start, |l| start.saturating_add(l as u64))
        )))
    }
}

impl Length for SparseFile {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for SparseFile {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> Result<Self::T, ParquetError> {
        Ok(self.slice(start, None)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> Result<Bytes, ParquetError> {
        self.slice(start, Some(length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_serves_only_fetched_ranges() {
        let file = SparseFile {
            len: 100,
            chunks: vec![
                (10, Bytes::from_static(b"abcdef")),
                (50, Bytes::from_static(b"xyz")),
            ],
        };
        assert_eq!(file.get_bytes(12, 3).unwrap(), Bytes::from_static(b"cde"));
        assert_eq!(file.get_bytes(50, 3).unwrap(), Bytes::from_static(b"xyz"));
        assert!(file.get_bytes(14, 3).is_err(), "runs past the chunk");
        assert!(file.get_bytes(0, 1).is_err(), "not fetched");
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut file.get_read(13).unwrap(), &mut rest).unwrap();
        assert_eq!(rest, b"def");
    }

    #[test]
    fn lengths_near_the_limits_are_errors_not_overflows() {
        let file = SparseFile {
            len: 100,
            chunks: vec![(10, Bytes::from_static(b"abcdef"))],
        };
        assert!(file.get_bytes(12, usize::MAX).is_err());
        assert!(file.get_bytes(u64::MAX, 2).is_err());
        assert!(file.get_read(u64::MAX).is_err());
    }
}
