//! Manifests: files that list inputs, one URI (or path) per row.
//!
//! The format comes from the extension: `.parquet`/`.pq` (only the URI column is
//! read, one record batch at a time), `.csv` / `.tsv` (with a header row),
//! `.jsonl`/`.ndjson`/`.json` (JSON lines, one object per line), `.txt`/`.lst` (one
//! entry per line; empty lines and `#` comments skipped). The column is the one
//! given, else the first of `uri`, `path`, `file_name` that exists; a missing column
//! is an error that lists the columns there are.
//!
//! Entries with a scheme (`s3://...`) are used as they are. Relative entries resolve
//! against the manifest's folder. An entry starting with `/` is a local path when the
//! manifest is local, and a key from the bucket's root when the manifest is on object
//! storage. A manifest on object storage is first streamed into a temporary file
//! (never into memory), then read like a local one.
//!
//! A bad row (empty value, a CSV or JSON line that does not parse) becomes a
//! [`Listed::Failed`] item; a manifest that cannot be opened or decoded ends the
//! listing with an error.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::{Array, LargeStringArray, StringArray, StringViewArray};
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::fetch::{SpoolFile, download};
use super::input::{InputRef, InputSource, Listed};
use super::location::{Location, LocationKind, StorageOptions, absolute};
use super::{StorageError, has_scheme, redact};

/// Column names tried, in order, when none is given.
pub const DEFAULT_COLUMNS: &[&str] = &["uri", "path", "file_name"];

/// Rows per batch sent from the reader thread.
const BATCH: usize = 1024;

/// Longest line a text, CSV or JSON-lines manifest may have: a longer one (a file
/// that is not a manifest) ends the listing with an error instead of being read
/// into memory whole.
const MAX_LINE: usize = 1 << 20;

/// A reader that fails once more than [`MAX_LINE`] bytes pass without a newline.
struct LineLimit<R> {
    inner: R,
    /// Bytes since the last newline.
    run: usize,
}

impl<R> LineLimit<R> {
    fn new(inner: R) -> Self {
        LineLimit { inner, run: 0 }
    }
}

impl<R: std::io::Read> std::io::Read for LineLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            self.run = if b == b'\n' { 0 } else { self.run + 1 };
            if self.run > MAX_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a line longer than {MAX_LINE} bytes (is this a manifest?)"),
                ));
            }
        }
        Ok(n)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Parquet,
    Csv(u8),
    JsonLines,
    Text,
}

impl Format {
    fn of(key: &str) -> Option<Format> {
        let ext = key.rsplit_once('.')?.1.to_ascii_lowercase();
        Some(match ext.as_str() {
            "parquet" | "pq" => Format::Parquet,
            "csv" => Format::Csv(b','),
            "tsv" => Format::Csv(b'\t'),
            "jsonl" | "ndjson" | "json" => Format::JsonLines,
            "txt" | "lst" => Format::Text,
            _ => return None,
        })
    }
}

/// One manifest row: its 1-based number and its value, or why it has none.
type Row = (u64, Result<String, String>);

/// The inputs a manifest lists, lazily. Fails now if the format is unknown.
pub(crate) fn entries(
    manifest: Location,
    column: Option<String>,
    storage: StorageOptions,
) -> Result<BoxStream<'static, Result<Listed, StorageError>>, StorageError> {
    let shown = manifest.to_string();
    let format = Format::of(manifest.prefix.as_ref()).ok_or_else(|| StorageError::Manifest {
        manifest: shown.clone(),
        message: "unknown manifest format: name it .parquet, .csv, .tsv, .jsonl, .ndjson, .json, .txt or .lst".into(),
    })?;
    let stream = stream::once(async move {
        let (file, spool) = match local_copy(&manifest, &shown).await {
            Ok(found) => found,
            Err(e) => return stream::iter([Err(e)]).boxed(),
        };
        let rows = read_rows(file, spool, format, column, shown.clone());
        let resolver = Arc::new(Resolver {
            manifest,
            shown,
            storage,
        });
        rows.flat_map(move |batch| {
            let items: Vec<Result<Listed, StorageError>> = match batch {
                Ok(rows) => rows
                    .into_iter()
                    .map(|row| Ok(resolver.resolve(row)))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            stream::iter(items)
        })
        .boxed()
    })
    .flatten();
    Ok(stream.boxed())
}

/// The manifest as a local file (a spool copy for objects, kept alive with it).
async fn local_copy(
    manifest: &Location,
    shown: &str,
) -> Result<(PathBuf, Option<SpoolFile>), StorageError> {
    match &manifest.kind {
        LocationKind::Local { root } => Ok((root.clone(), None)),
        LocationKind::Object { .. } => {
            let ext = manifest.prefix.extension();
            let spool = download(manifest.store.as_ref(), &manifest.prefix, shown, None, ext)
                .await
                .map_err(|e| StorageError::Manifest {
                    manifest: shown.to_string(),
                    message: format!("cannot read it: {e}"),
                })?;
            Ok((spool.path().to_path_buf(), Some(spool)))
        }
    }
}

/// Reads `file` on a thread, sending batches of rows through a bounded channel.
fn read_rows(
    file: PathBuf,
    spool: Option<SpoolFile>,
    format: Format,
    column: Option<String>,
    shown: String,
) -> BoxStream<'static, Result<Vec<Row>, StorageError>> {
    let (tx, rx) = async_channel::bounded(4);
    let spec = shown.clone();
    let spawned = std::thread::Builder::new()
        .name("audiocap-manifest".into())
        .spawn(move || {
            let sink = |rows: Vec<Row>| tx.send_blocking(Ok(rows)).is_ok();
            let result = match format {
                Format::Parquet => read_parquet(&file, column.as_deref(), &shown, sink),
                Format::Csv(delimiter) => {
                    read_csv(&file, delimiter, column.as_deref(), &shown, sink)
                }
                Format::JsonLines => read_json_lines(&file, column.as_deref(), &shown, sink),
                Format::Text => read_text(&file, &shown, sink),
            };
            if let Err(e) = result {
                let _ = tx.send_blocking(Err(e));
            }
            // The spool copy lives until the whole manifest was read.
            drop(spool);
        });
    match spawned {
        Ok(_) => rx.boxed(),
        Err(e) => stream::iter([Err(StorageError::Manifest {
            manifest: spec,
            message: format!("cannot start the reader thread: {e}"),
        })])
        .boxed(),
    }
}

fn manifest_error(shown: &str, message: impl ToString) -> StorageError {
    StorageError::Manifest {
        manifest: shown.to_string(),
        message: message.to_string(),
    }
}

/// The column to read among `names`: the one asked for, else the first default.
fn pick_column(names: &[String], wanted: Option<&str>, shown: &str) -> Result<usize, StorageError> {
    let candidates: Vec<&str> = match wanted {
        Some(w) => vec![w],
        None => DEFAULT_COLUMNS.to_vec(),
    };
    candidates
        .iter()
        .find_map(|c| names.iter().position(|n| n == c))
        .ok_or_else(|| StorageError::ManifestColumn {
            manifest: shown.to_string(),
            wanted: candidates.join(" / "),
            columns: names.join(", "),
        })
}

/// Batches rows into `sink`; stops early (Ok) when the consumer went away.
struct Batcher<F: FnMut(Vec<Row>) -> bool> {
    rows: Vec<Row>,
    sink: F,
}

impl<F: FnMut(Vec<Row>) -> bool> Batcher<F> {
    fn new(sink: F) -> Self {
        Batcher {
            rows: Vec::with_capacity(BATCH),
            sink,
        }
    }

    /// False when the consumer is gone.
    fn push(&mut self, row: Row) -> bool {
        self.rows.push(row);
        self.rows.len() < BATCH || self.flush()
    }

    fn flush(&mut self) -> bool {
        if self.rows.is_empty() {
            return true;
        }
        (self.sink)(std::mem::replace(&mut self.rows, Vec::with_capacity(BATCH)))
    }
}

fn read_parquet(
    path: &std::path::Path,
    column: Option<&str>,
    shown: &str,
    sink: impl FnMut(Vec<Row>) -> bool,
) -> Result<(), StorageError> {
    let file = File::open(path).map_err(|e| manifest_error(shown, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| manifest_error(shown, e))?;
    let names: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let index = pick_column(&names, column, shown)?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(BATCH)
        .build()
        .map_err(|e| manifest_error(shown, e))?;
    let mut out = Batcher::new(sink);
    let mut row = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| manifest_error(shown, e))?;
        let values = batch.column(0);
        let get: Box<dyn Fn(usize) -> Option<String> + '_> =
            if let Some(a) = values.as_any().downcast_ref::<StringArray>() {
                Box::new(move |i| a.is_valid(i).then(|| a.value(i).to_string()))
            } else if let Some(a) = values.as_any().downcast_ref::<LargeStringArray>() {
                Box::new(move |i| a.is_valid(i).then(|| a.value(i).to_string()))
            } else if let Some(a) = values.as_any().downcast_ref::<StringViewArray>() {
                Box::new(move |i| a.is_valid(i).then(|| a.value(i).to_string()))
            } else {
                return Err(manifest_error(
                    shown,
                    format!(
                        "column {} holds {}, not strings",
                        names[index],
                        values.data_type()
                    ),
                ));
            };
        for i in 0..values.len() {
            row += 1;
            let value = get(i).ok_or_else(|| "null value".to_string());
            if !out.push((row, value)) {
                return Ok(());
            }
        }
    }
    out.flush();
    Ok(())
}

fn read_csv(
    path: &std::path::Path,
    delimiter: u8,
    column: Option<&str>,
    shown: &str,
    sink: impl FnMut(Vec<Row>) -> bool,
) -> Result<(), StorageError> {
    let file = File::open(path).map_err(|e| manifest_error(shown, e))?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .from_reader(LineLimit::new(file));
    let names: Vec<String> = reader
        .headers()
        .map_err(|e| manifest_error(shown, e))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let index = pick_column(&names, column, shown)?;
    let mut out = Batcher::new(sink);
    for (n, record) in reader.records().enumerate() {
        let value = match record {
            Ok(r) => r
                .get(index)
                .map(str::to_string)
                .ok_or_else(|| format!("only {} fields", r.len())),
            // The file cannot be read on (or a line is too long): not one bad row.
            Err(e) if e.is_io_error() => return Err(manifest_error(shown, e)),
            Err(e) => Err(e.to_string()),
        };
        if !out.push((n as u64 + 1, value)) {
            return Ok(());
        }
    }
    out.flush();
    Ok(())
}

fn read_json_lines(
    path: &std::path::Path,
    column: Option<&str>,
    shown: &str,
    sink: impl FnMut(Vec<Row>) -> bool,
) -> Result<(), StorageError> {
    let file = File::open(path).map_err(|e| manifest_error(shown, e))?;
    let mut out = Batcher::new(sink);
    let mut key: Option<String> = None;
    let mut row = 0u64;
    for line in BufReader::new(LineLimit::new(file)).lines() {
        let line = line.map_err(|e| manifest_error(shown, e))?;
        if line.trim().is_empty() {
            continue;
        }
        row += 1;
        let value = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(serde_json::Value::Object(map)) => {
                // The first object decides the column; a wrong one fails the manifest.
                let key = match &key {
                    Some(k) => k.clone(),
                    None => {
                        let names: Vec<String> = map.keys().cloned().collect();
                        let k = names[pick_column(&names, column, shown)?].clone();
                        key = Some(k.clone());
                        k
                    }
                };
                match map.get(&key) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(other) => Err(format!("{key} is {other}, not a string")),
                    None => Err(format!("no {key} field")),
                }
            }
            Ok(_) => Err("not a JSON object".to_string()),
            Err(e) => Err(format!("invalid JSON: {e}")),
        };
        if !out.push((row, value)) {
            return Ok(());
        }
    }
    out.flush();
    Ok(())
}

fn read_text(
    path: &std::path::Path,
    shown: &str,
    sink: impl FnMut(Vec<Row>) -> bool,
) -> Result<(), StorageError> {
    let file = File::open(path).map_err(|e| manifest_error(shown, e))?;
    let mut out = Batcher::new(sink);
    for (n, line) in BufReader::new(LineLimit::new(file)).lines().enumerate() {
        let line = line.map_err(|e| manifest_error(shown, e))?;
        let entry = line.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        if !out.push((n as u64 + 1, Ok(entry.to_string()))) {
            return Ok(());
        }
    }
    out.flush();
    Ok(())
}

/// Turns manifest rows into inputs.
struct Resolver {
    manifest: Location,
    shown: String,
    storage: StorageOptions,
}

impl Resolver {
    fn resolve(&self, (row, value): Row) -> Listed {
        let bad = |message: String| Listed::Failed {
            uri: format!("{}#row={row}", self.shown),
            error: StorageError::BadEntry {
                manifest: self.shown.clone(),
                row,
                message,
            },
        };
        let entry = match value {
            Ok(v) if v.trim().is_empty() => return bad("empty value".into()),
            Ok(v) => v.trim().to_string(),
            Err(message) => return bad(message),
        };
        if has_scheme(&entry) {
            return match Location::parse(&entry, &self.storage) {
                Ok(location) => Listed::Input(input_at(&location)),
                Err(error) => Listed::Failed {
                    uri: redact(&entry),
                    error,
                },
            };
        }
        match &self.manifest.kind {
            LocationKind::Local { root } => {
                let folder = root.parent().unwrap_or(root);
                match absolute(&folder.join(&entry)) {
                    Ok(path) => Listed::Input(InputRef {
                        uri: path.to_string_lossy().into_owned(),
                        source: InputSource::Local(path),
                        size: None,
                    }),
                    Err(message) => bad(message),
                }
            }
            LocationKind::Object { base } => {
                let key = if entry.starts_with('/') {
                    normalize_key("", &entry)
                } else {
                    let parent = self
                        .manifest
                        .prefix
                        .as_ref()
                        .rsplit_once('/')
                        .map_or("", |p| p.0);
                    normalize_key(parent, &entry)
                };
                match key {
                    Some(key) => Listed::Input(InputRef {
                        uri: format!("{base}/{key}"),
                        source: InputSource::Object {
                            store: Arc::clone(&self.manifest.store),
                            path: Path::from(key.as_str()),
                        },
                        size: None,
                    }),
                    None => bad(format!("{entry} climbs above the bucket root")),
                }
            }
        }
    }
}

/// An explicit location as an input (no existence check: the fetch reports that).
fn input_at(location: &Location) -> InputRef {
    match &location.kind {
        LocationKind::Local { root } => InputRef {
            uri: root.to_string_lossy().into_owned(),
            source: InputSource::Local(root.clone()),
            size: None,
        },
        LocationKind::Object { .. } => InputRef {
            uri: location.uri(),
            source: InputSource::Object {
                store: Arc::clone(&location.store),
                path: location.prefix.clone(),
            },
            size: None,
        },
    }
}

/// `parent` + `/` + `entry` with `.` and `..` resolved; `None` above the root.
fn normalize_key(parent: &str, entry: &str) -> Option<String> {
    let mut parts: Vec<&str> = parent.split('/').filter(|p| !p.is_empty()).collect();
    for part in entry.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_extensions() {
        assert_eq!(Format::of("a/m.PARQUET"), Some(Format::Parquet));
        assert_eq!(Format::of("m.tsv"), Some(Format::Csv(b'\t')));
        assert_eq!(Format::of("m.ndjson"), Some(Format::JsonLines));
        assert_eq!(Format::of("m.lst"), Some(Format::Text));
        assert_eq!(Format::of("m.xlsx"), None);
        assert_eq!(Format::of("noext"), None);
    }

    #[test]
    fn normalizes_relative_keys() {
        assert_eq!(normalize_key("a/b", "c.wav").as_deref(), Some("a/b/c.wav"));
        assert_eq!(normalize_key("a/b", "../c.wav").as_deref(), Some("a/c.wav"));
        assert_eq!(
            normalize_key("a/b", "./x/./y.wav").as_deref(),
            Some("a/b/x/y.wav")
        );
        assert_eq!(normalize_key("", "/k/z.wav").as_deref(), Some("k/z.wav"));
        assert_eq!(normalize_key("a", "../../z.wav"), None);
    }

    #[test]
    fn column_choice() {
        let names: Vec<String> = ["id", "path", "uri"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(pick_column(&names, None, "m").unwrap(), 2);
        assert_eq!(pick_column(&names, Some("path"), "m").unwrap(), 1);
        let err = pick_column(&names, Some("audio"), "m.csv").unwrap_err();
        assert_eq!(
            err.to_string(),
            "manifest m.csv: no URI column audio (columns: id, path, uri)"
        );
        let err = pick_column(&names[..1], None, "m.csv").unwrap_err();
        assert!(err.to_string().contains("uri / path / file_name"), "{err}");
    }

    /// Every row of manifest `bytes` read as `format`, or the error that ended it.
    fn read_all(format: Format, bytes: &[u8]) -> Result<Vec<Row>, StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, bytes).unwrap();
        let mut rows = Vec::new();
        let sink = |batch: Vec<Row>| {
            rows.extend(batch);
            true
        };
        match format {
            Format::Parquet => read_parquet(&path, None, "m", sink),
            Format::Csv(d) => read_csv(&path, d, None, "m", sink),
            Format::JsonLines => read_json_lines(&path, None, "m", sink),
            Format::Text => read_text(&path, "m", sink),
        }?;
        Ok(rows)
    }

    #[test]
    fn a_huge_line_ends_the_listing_with_an_error_not_an_allocation() {
        let mut huge = b"uri\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_LINE + 10));
        huge.extend(b"\nb.wav\n");
        for format in [Format::Text, Format::JsonLines, Format::Csv(b',')] {
            let e = match read_all(format, &huge) {
                Ok(rows) => panic!("{format:?}: {} rows, no error", rows.len()),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains("a line longer than 1048576 bytes"),
                "{format:?}: {e}"
            );
        }
        let mut fine = b"uri\n".to_vec();
        fine.extend(std::iter::repeat_n(b'a', 1000));
        fine.extend(b"\nb.wav\n");
        assert_eq!(read_all(Format::Text, &fine).unwrap().len(), 3);
    }

    #[test]
    fn bad_bytes_are_bad_rows_or_a_clear_error() {
        let e = read_all(Format::Text, b"a.wav\n\xff\xfe.wav\n").unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
        let rows = read_all(Format::Csv(b','), b"uri,n\n\"a.wav,1\nb\"\"c,2\n\"").unwrap();
        assert!(rows.len() <= 2, "{rows:?}");
        let rows = read_all(
            Format::JsonLines,
            b"{\"uri\": \"a.wav\"}\n{\"uri\": 3}\n{\n",
        )
        .unwrap();
        assert_eq!(rows[0].1, Ok("a.wav".to_string()));
        assert!(rows[1].1.is_err() && rows[2].1.is_err(), "{rows:?}");
        for junk in [
            &b""[..],
            b"PAR1",
            b"PAR1\x00\x00\x00\x00PAR1",
            b"not parquet at all",
        ] {
            let e = read_all(Format::Parquet, junk).unwrap_err();
            assert!(matches!(e, StorageError::Manifest { .. }), "{e:?}");
        }
    }
}
