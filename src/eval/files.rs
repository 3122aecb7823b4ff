//! Reading the inputs of `audiocap eval`: predictions (an audiocap captions Parquet
//! file or a `file_name, caption` CSV) and references (Clotho, AudioCaps or a generic
//! key + caption columns table, CSV or Parquet), and joining them by file name.
//!
//! Keys are compared by file name (the last path component); when the exact names
//! differ, by stem (the name without its extension), so `a.wav` matches `a` or
//! `a.flac`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Why an input file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: reading CSV: {source}", path.display())]
    Csv { path: PathBuf, source: csv::Error },
    #[error("{}: reading Parquet: {source}", path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("{}: reading Parquet: {source}", path.display())]
    Arrow {
        path: PathBuf,
        source: arrow_schema::ArrowError,
    },
    #[error("{}: column `{column}` has type {data_type}, which is not text or a number", path.display())]
    ColumnType {
        path: PathBuf,
        column: String,
        data_type: DataType,
    },
    #[error("{}: {what}; found columns: [{}]", path.display(), found.join(", "))]
    Layout {
        path: PathBuf,
        what: String,
        found: Vec<String>,
    },
}

/// A table read as text: column names and rows of optional cells.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub columns: Vec<String>,
    /// Parquet column types (empty for CSV, where every cell is text).
    pub types: Vec<Option<DataType>>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    /// Position of the column named `name` (compared trimmed and case-insensitively).
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns
            .iter()
            .position(|c| c.trim().eq_ignore_ascii_case(name))
    }

    /// Fails when column `i` is of a type that is read as empty cells.
    fn require_text(&self, path: &Path, i: usize) -> Result<(), InputError> {
        match self.types.get(i) {
            Some(Some(t)) if !is_text_like(t) => Err(InputError::ColumnType {
                path: path.to_path_buf(),
                column: self.columns[i].clone(),
                data_type: t.clone(),
            }),
            _ => Ok(()),
        }
    }
}

fn is_text_like(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Float32
            | DataType::Float64
    )
}

/// Reads a `.parquet` file with the Parquet reader, anything else as CSV with a header.
pub fn read_table(path: &Path) -> Result<Table, InputError> {
    let is_parquet = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    if is_parquet {
        read_parquet(path)
    } else {
        read_csv(path)
    }
}

fn read_csv(path: &Path) -> Result<Table, InputError> {
    let csv_err = |source| InputError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|source| InputError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
    let columns: Vec<String> = reader
        .headers()
        .map_err(csv_err)?
        .iter()
        // A UTF-8 byte-order mark would otherwise stick to the first column's name.
        .map(|h| h.trim_start_matches('\u{feff}').trim().to_string())
        .collect();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        let row = (0..columns.len())
            .map(|i| record.get(i).map(str::to_string))
            .collect();
        rows.push(row);
    }
    Ok(Table {
        columns,
        types: Vec::new(),
        rows,
    })
}

fn read_parquet(path: &Path) -> Result<Table, InputError> {
    let file = File::open(path).map_err(|source| InputError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let pq_err = |source| InputError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(pq_err)?
        .build()
        .map_err(pq_err)?;
    let mut table = Table::default();
    let mut first = true;
    for batch in reader {
        let batch = batch.map_err(|source| InputError::Arrow {
            path: path.to_path_buf(),
            source,
        })?;
        if first {
            let schema = batch.schema();
            table.columns = schema.fields().iter().map(|f| f.name().clone()).collect();
            table.types = schema
                .fields()
                .iter()
                .map(|f| Some(f.data_type().clone()))
                .collect();
            first = false;
        }
        let cells: Vec<Vec<Option<String>>> = batch
            .columns()
            .iter()
            .zip(&table.columns)
            .map(|(array, _)| column_as_text(array))
            .collect();
        for r in 0..batch.num_rows() {
            table
                .rows
                .push(cells.iter().map(|c| c[r].clone()).collect());
        }
    }
    Ok(table)
}

fn column_as_text(array: &ArrayRef) -> Vec<Option<String>> {
    fn cells<T: ToString>(array: &dyn Array, value: impl Fn(usize) -> T) -> Vec<Option<String>> {
        (0..array.len())
            .map(|i| (!array.is_null(i)).then(|| value(i).to_string()))
            .collect()
    }
    let a = array.as_ref();
    match array.data_type() {
        DataType::Utf8 => cells(a, |i| array.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => cells(a, |i| array.as_string::<i64>().value(i)),
        DataType::Utf8View => cells(a, |i| array.as_string_view().value(i)),
        DataType::Int8 => cells(a, |i| array.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => cells(a, |i| array.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => cells(a, |i| array.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => cells(a, |i| array.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => cells(a, |i| array.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => cells(a, |i| array.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => cells(a, |i| array.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => cells(a, |i| array.as_primitive::<UInt64Type>().value(i)),
        DataType::Float32 => cells(a, |i| array.as_primitive::<Float32Type>().value(i)),
        DataType::Float64 => cells(a, |i| array.as_primitive::<Float64Type>().value(i)),
        // Columns of other types (timestamps, lists, ...) are read as empty cells and
        // noted, so that an unused column does not stop the read; a needed one is
        // rejected by `Table::require_text`.
        _ => vec![None; array.len()],
    }
}

/// The `;`-separated labels of each clip of a manifest (column `column`), keyed by
/// the file name of its `file_name` (or `uri`) cell; clips with no label are left out.
pub fn read_labels(path: &Path, column: &str) -> Result<HashMap<String, Vec<String>>, InputError> {
    let table = read_table(path)?;
    let layout = |what: String| InputError::Layout {
        path: path.to_path_buf(),
        what,
        found: table.columns.clone(),
    };
    let labels_col = table
        .column(column)
        .ok_or_else(|| layout(format!("no column `{column}`")))?;
    let key_col = table
        .column("file_name")
        .or_else(|| table.column("uri"))
        .ok_or_else(|| layout("labels need a `file_name` or `uri` column".to_string()))?;
    let mut labels = HashMap::new();
    for row in &table.rows {
        let (Some(key), Some(cell)) = (row[key_col].as_deref(), row[labels_col].as_deref()) else {
            continue;
        };
        let list = split_labels(cell);
        if !list.is_empty() {
            labels.insert(file_name(key.trim()).to_string(), list);
        }
    }
    Ok(labels)
}

/// A labels cell (`dog; barking`) as its non-empty, trimmed labels.
pub fn split_labels(cell: &str) -> Vec<String> {
    cell.split(';')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// The last path component of a URI or path (`s3://b/x/a.wav` → `a.wav`).
pub fn file_name(uri: &str) -> &str {
    let trimmed = uri.trim().trim_end_matches(['/', '\\']);
    trimmed.rsplit(['/', '\\']).next().unwrap_or(trimmed)
}

/// A file name without its extension (`a.wav` → `a`; `.hidden` and `a` stay whole).
pub fn stem(name: &str) -> &str {
    match name.rfind('.') {
        Some(i) if i > 0 => &name[..i],
        _ => name,
    }
}

/// Predictions keyed by file name.
#[derive(Debug, Clone, Default)]
pub struct Predictions {
    /// `audiocap captions Parquet` or `CSV file_name, caption`.
    pub format: String,
    /// (file name, caption), one per key, in input order.
    pub captions: Vec<(String, String)>,
    /// (file name, reason) of rows with an error or no caption.
    pub failed: Vec<(String, String)>,
    /// Number of URIs with more than one segment (only segment 0 is used).
    pub multi_segment: usize,
    /// Keys that appeared more than once (after the first, ignored).
    pub duplicates: Vec<String>,
}

/// Reads predictions: a table with `uri, caption` (an audiocap captions file; `error`
/// and `segment_index` used when present) or `file_name, caption`.
pub fn read_predictions(path: &Path) -> Result<Predictions, InputError> {
    let table = read_table(path)?;
    let caption = table.column("caption");
    let (key, format) = match (table.column("uri"), table.column("file_name")) {
        (Some(uri), _) => (Some(uri), "audiocap captions (uri, caption)"),
        (None, Some(name)) => (Some(name), "file_name, caption"),
        (None, None) => (None, ""),
    };
    let (Some(key), Some(caption)) = (key, caption) else {
        return Err(InputError::Layout {
            path: path.to_path_buf(),
            what: "predictions need a `uri` or `file_name` column and a `caption` column"
                .to_string(),
            found: table.columns.clone(),
        });
    };
    let segment = table.column("segment_index");
    let error = table.column("error");
    for i in [Some(key), Some(caption), segment, error]
        .into_iter()
        .flatten()
    {
        table.require_text(path, i)?;
    }

    // Per key: the row of the lowest segment index seen, and how many segments.
    let mut order: Vec<String> = Vec::new();
    let mut chosen: HashMap<String, (u64, usize, String)> = HashMap::new();
    let mut segments: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut duplicates = Vec::new();
    for (row_index, row) in table.rows.iter().enumerate() {
        let Some(uri) = row[key].as_deref().filter(|u| !u.trim().is_empty()) else {
            continue;
        };
        let seg = segment
            .and_then(|s| row[s].as_deref())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let name = file_name(uri).to_string();
        segments.entry(uri.to_string()).or_default().insert(seg);
        match chosen.get_mut(&name) {
            None => {
                order.push(name.clone());
                chosen.insert(name, (seg, row_index, uri.to_string()));
            }
            Some(entry) if entry.2 == uri => {
                if seg < entry.0 {
                    *entry = (seg, row_index, uri.to_string());
                }
            }
            Some(_) => duplicates.push(uri.to_string()),
        }
    }
    let mut out = Predictions {
        format: format.to_string(),
        multi_segment: segments.values().filter(|s| s.len() > 1).count(),
        duplicates,
        ..Default::default()
    };
    for name in order {
        let (_, row_index, _) = &chosen[&name];
        let row = &table.rows[*row_index];
        let err = error
            .and_then(|e| row[e].as_deref())
            .filter(|e| !e.is_empty());
        let text = row[caption].as_deref().filter(|c| !c.trim().is_empty());
        match (err, text) {
            (Some(e), _) => out.failed.push((name, e.to_string())),
            (None, None) => out.failed.push((name, "no caption".to_string())),
            (None, Some(c)) => out.captions.push((name, c.to_string())),
        }
    }
    Ok(out)
}

/// How the reference table was laid out.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// `file_name, caption_1..caption_5`.
    Clotho,
    /// `audiocap_id, youtube_id, start_time, caption`, several rows per clip.
    AudioCaps,
    /// A key column and every column whose name starts with `caption`.
    Generic { key: String, captions: Vec<String> },
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::Clotho => write!(f, "Clotho (file_name, caption_1..caption_5)"),
            Layout::AudioCaps => write!(
                f,
                "AudioCaps (audiocap_id, youtube_id, start_time, caption; one row per caption)"
            ),
            Layout::Generic { key, captions } => {
                write!(
                    f,
                    "generic (key `{key}`, captions [{}])",
                    captions.join(", ")
                )
            }
        }
    }
}

/// One reference clip: its display key, the names it may be matched by, its captions.
#[derive(Debug, Clone)]
pub struct RefClip {
    pub key: String,
    pub names: Vec<String>,
    pub captions: Vec<String>,
    /// The key cell as written (a generic table's full path or URI; the Clotho file
    /// name; the AudioCaps id), for tools that must find the audio itself.
    pub written_key: String,
}

/// The references, grouped per clip in input order.
#[derive(Debug, Clone)]
pub struct References {
    pub layout: Layout,
    pub clips: Vec<RefClip>,
    /// Keys of clips with no non-empty caption (left out of `clips`).
    pub empty: Vec<String>,
}

/// Reads references, detecting the layout from the header. `key_column` forces the
/// generic layout with that key.
pub fn read_references(path: &Path, key_column: Option<&str>) -> Result<References, InputError> {
    let table = read_table(path)?;
    let layout_err = |what: String| InputError::Layout {
        path: path.to_path_buf(),
        what,
        found: table.columns.clone(),
    };
    let caption_cols: Vec<usize> = (0..table.columns.len())
        .filter(|&i| {
            table.columns[i]
                .trim()
                .to_ascii_lowercase()
                .starts_with("caption")
        })
        .collect();
    let caption_names: Vec<String> = caption_cols
        .iter()
        .map(|&i| table.columns[i].clone())
        .collect();
    let audiocaps = ["audiocap_id", "youtube_id", "start_time", "caption"].map(|c| table.column(c));
    let clotho_names: Vec<String> = (1..=5).map(|i| format!("caption_{i}")).collect();
    let is_clotho = table.column("file_name").is_some()
        && caption_names.len() == 5
        && caption_names
            .iter()
            .zip(&clotho_names)
            .all(|(a, b)| a.trim().eq_ignore_ascii_case(b));

    let layout = if key_column.is_none() && is_clotho {
        Layout::Clotho
    } else if key_column.is_none() && audiocaps.iter().all(Option::is_some) {
        Layout::AudioCaps
    } else {
        let key = match key_column {
            Some(k) => k.to_string(),
            None if table.column("file_name").is_some() => "file_name".to_string(),
            None if table.column("uri").is_some() => "uri".to_string(),
            None => {
                return Err(layout_err(
                    "references need a key column (`file_name`, `uri`, or one named with \
                     --key-column), or the AudioCaps columns `audiocap_id, youtube_id, \
                     start_time, caption`"
                        .to_string(),
                ));
            }
        };
        if table.column(&key).is_none() {
            return Err(layout_err(format!(
                "no key column `{key}` in the references"
            )));
        }
        Layout::Generic {
            key,
            captions: caption_names.clone(),
        }
    };
    if caption_cols.is_empty() {
        return Err(layout_err(
            "references need at least one caption column (a name starting with `caption`)"
                .to_string(),
        ));
    }

    let key_cols = match &layout {
        Layout::AudioCaps => audiocaps.iter().flatten().copied().collect(),
        Layout::Clotho => table.column("file_name").into_iter().collect(),
        Layout::Generic { key, .. } => table.column(key).into_iter().collect::<Vec<_>>(),
    };
    for &i in key_cols.iter().chain(&caption_cols) {
        table.require_text(path, i)?;
    }

    // Group rows per clip, keeping the first appearance's order.
    let mut clips: Vec<RefClip> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for row in &table.rows {
        let cell = |i: usize| row[i].as_deref().map(str::trim).unwrap_or("");
        let (key, names, written_key) = match &layout {
            Layout::AudioCaps => {
                let [Some(id), Some(yt), Some(start), _] = audiocaps else {
                    continue;
                };
                let (id, yt, start) = (cell(id), cell(yt), cell(start));
                let mut names = vec![id.to_string(), format!("{yt}_{start}")];
                // `30.0` and `30` are the same start time in a file name.
                if let Ok(s) = start.parse::<f64>()
                    && s.fract() == 0.0
                {
                    names.push(format!("{yt}_{}", s as i64));
                    names.push(format!("{yt}_{}.000", s as i64));
                }
                (id.to_string(), names, id.to_string())
            }
            Layout::Clotho | Layout::Generic { .. } => {
                let key_name = match &layout {
                    Layout::Generic { key, .. } => key.as_str(),
                    _ => "file_name",
                };
                let Some(k) = table.column(key_name) else {
                    continue;
                };
                let name = file_name(cell(k)).to_string();
                (name.clone(), vec![name], cell(k).to_string())
            }
        };
        if key.is_empty() {
            continue;
        }
        let captions = caption_cols
            .iter()
            .map(|&i| cell(i))
            .filter(|c| !c.is_empty())
            .map(str::to_string);
        match index.get(&key) {
            Some(&i) => clips[i].captions.extend(captions),
            None => {
                index.insert(key.clone(), clips.len());
                clips.push(RefClip {
                    key,
                    names,
                    captions: captions.collect(),
                    written_key,
                });
            }
        }
    }
    let (clips, empty): (Vec<RefClip>, Vec<RefClip>) =
        clips.into_iter().partition(|c| !c.captions.is_empty());
    Ok(References {
        layout,
        clips,
        empty: empty.into_iter().map(|c| c.key).collect(),
    })
}

/// One matched prediction and its references.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// The prediction's file name.
    pub key: String,
    /// The reference clip's key.
    pub reference_key: String,
    pub candidate: String,
    pub references: Vec<String>,
}

/// The result of joining predictions with references.
#[derive(Debug, Clone, Default)]
pub struct Joined {
    pub pairs: Vec<Pair>,
    /// Prediction keys with no reference clip.
    pub predictions_without_references: Vec<String>,
    /// Reference keys with no prediction.
    pub references_without_predictions: Vec<String>,
    /// Predictions whose reference clip was already matched by another prediction.
    pub duplicate_matches: Vec<String>,
    /// Indices into the references' clips that no caption matched: those without a
    /// prediction and those whose prediction failed (an error row or no caption).
    pub unmatched_references: Vec<usize>,
}

/// Joins by exact file name first, then by stem.
pub fn join(predictions: &Predictions, references: &References) -> Joined {
    let mut exact: HashMap<&str, usize> = HashMap::new();
    let mut by_stem: HashMap<&str, usize> = HashMap::new();
    for (i, clip) in references.clips.iter().enumerate() {
        for name in &clip.names {
            exact.entry(name.as_str()).or_insert(i);
            by_stem.entry(name.as_str()).or_insert(i);
            by_stem.entry(stem(name)).or_insert(i);
        }
    }
    let mut used = vec![false; references.clips.len()];
    let mut joined = Joined::default();
    for (key, caption) in &predictions.captions {
        let found = exact
            .get(key.as_str())
            .or_else(|| by_stem.get(stem(key)))
            .copied();
        match found {
            None => joined.predictions_without_references.push(key.clone()),
            Some(i) if used[i] => joined.duplicate_matches.push(key.clone()),
            Some(i) => {
                used[i] = true;
                let clip = &references.clips[i];
                joined.pairs.push(Pair {
                    key: key.clone(),
                    reference_key: clip.key.clone(),
                    candidate: caption.clone(),
                    references: clip.captions.clone(),
                });
            }
        }
    }
    // A failed prediction still "has" a prediction: its clip is not reported as missing.
    let failed: HashSet<&str> = predictions
        .failed
        .iter()
        .flat_map(|(k, _)| [k.as_str(), stem(k)])
        .collect();
    joined.references_without_predictions = references
        .clips
        .iter()
        .zip(&used)
        .filter(|(clip, used)| {
            !**used
                && !clip
                    .names
                    .iter()
                    .any(|n| failed.contains(n.as_str()) || failed.contains(stem(n)))
        })
        .map(|(clip, _)| clip.key.clone())
        .collect();
    joined.unmatched_references = (0..references.clips.len()).filter(|&i| !used[i]).collect();
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_and_stems() {
        assert_eq!(file_name("s3://bucket/dir/a.wav"), "a.wav");
        assert_eq!(file_name("C:\\x\\b.flac"), "b.flac");
        assert_eq!(file_name("plain"), "plain");
        assert_eq!(stem("a.b.wav"), "a.b");
        assert_eq!(stem("noext"), "noext");
        assert_eq!(stem(".hidden"), ".hidden");
    }

    #[test]
    fn join_matches_exact_names_then_stems() {
        let predictions = Predictions {
            captions: vec![
                ("a.wav".into(), "x".into()),
                ("b.flac".into(), "y".into()),
                ("c.wav".into(), "z".into()),
            ],
            ..Default::default()
        };
        let clip = |k: &str| RefClip {
            key: k.into(),
            names: vec![k.into()],
            captions: vec![format!("ref {k}")],
            written_key: k.into(),
        };
        let references = References {
            layout: Layout::Clotho,
            clips: vec![clip("a.wav"), clip("b.wav"), clip("d.wav")],
            empty: vec![],
        };
        let joined = join(&predictions, &references);
        let keys: Vec<_> = joined
            .pairs
            .iter()
            .map(|p| p.reference_key.as_str())
            .collect();
        assert_eq!(keys, ["a.wav", "b.wav"]);
        assert_eq!(joined.predictions_without_references, ["c.wav"]);
        assert_eq!(joined.references_without_predictions, ["d.wav"]);
        assert_eq!(joined.unmatched_references, [2]);
    }
}
