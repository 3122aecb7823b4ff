//! What `audiocap eval` writes: the terminal table, `metrics.json` and the per-clip
//! scores as Parquet. Files are written under a staging name and renamed into place,
//! so a reader never sees half a file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, StringBuilder};
use arrow_array::{ArrayRef, Float64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::files::Pair;
use super::jvm::Unavailable;
use super::{CorpusScores, JavaScores};
use crate::atomic;
use crate::output::ParquetFileWriter;

/// Separator between the reference captions in the per-clip file's `references` column.
pub const REFERENCE_SEPARATOR: &str = " | ";

/// Why an output file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    #[error("{}: {source}", path.display())]
    Arrow {
        path: PathBuf,
        source: arrow_schema::ArrowError,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Every corpus score as (name, value or why it is unavailable), in table order.
pub fn score_rows(
    scores: &CorpusScores,
    java: &JavaScores,
) -> Vec<(&'static str, Result<f64, Unavailable>)> {
    vec![
        ("BLEU-1", Ok(scores.bleu[0])),
        ("BLEU-2", Ok(scores.bleu[1])),
        ("BLEU-3", Ok(scores.bleu[2])),
        ("BLEU-4", Ok(scores.bleu[3])),
        (
            "METEOR",
            java.meteor.as_ref().map(|m| m.corpus).map_err(Clone::clone),
        ),
        ("ROUGE-L", Ok(scores.rouge_l)),
        ("CIDEr-D", Ok(scores.cider_d)),
        (
            "SPICE",
            java.spice.as_ref().map(|s| s.corpus).map_err(Clone::clone),
        ),
        ("SPIDEr", java.spider(scores).map(|(corpus, _)| corpus)),
    ]
}

/// The key of a metric in `metrics.json` and the per-clip file (`CIDEr-D` → `cider_d`).
pub fn metric_key(name: &str) -> String {
    name.to_lowercase().replace('-', "_")
}

/// The scores as an aligned text table; an unavailable metric shows its reason.
pub fn table(scores: &CorpusScores, java: &JavaScores) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:<9} {:>10}\n", "metric", "score"));
    out.push_str(&format!("{:-<9} {:->10}\n", "", ""));
    for (name, value) in score_rows(scores, java) {
        match value {
            Ok(v) => out.push_str(&format!("{name:<9} {v:>10.4}\n")),
            Err(why) => out.push_str(&format!("{name:<9} {:>10}  ({why})\n", "unavailable")),
        }
    }
    out
}

/// Per-clip columns after the native scores; null where the metric is unavailable.
const JAVA_COLUMNS: [&str; 3] = ["meteor", "spice", "spider"];

/// The per-clip file's schema.
pub fn per_clip_schema() -> SchemaRef {
    let score = |name: &str| Field::new(name, DataType::Float64, false);
    let mut fields = vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("reference_key", DataType::Utf8, false),
        Field::new("candidate", DataType::Utf8, false),
        Field::new("references", DataType::Utf8, false),
        score("bleu_1"),
        score("bleu_2"),
        score("bleu_3"),
        score("bleu_4"),
        score("rouge_l"),
        score("cider_d"),
    ];
    fields.extend(
        JAVA_COLUMNS
            .iter()
            .map(|name| Field::new(*name, DataType::Float64, true)),
    );
    Arc::new(Schema::new(fields))
}

/// Writes one row per pair with its scores (`scores.per_clip[i]` belongs to `pairs[i]`).
pub fn write_per_clip(
    path: &Path,
    pairs: &[Pair],
    scores: &CorpusScores,
    java: &JavaScores,
) -> Result<(), ReportError> {
    let n = pairs.len();
    let mut key = StringBuilder::with_capacity(n, n * 24);
    let mut reference_key = StringBuilder::with_capacity(n, n * 24);
    let mut candidate = StringBuilder::with_capacity(n, n * 64);
    let mut references = StringBuilder::with_capacity(n, n * 320);
    let mut metrics: Vec<Float64Builder> =
        (0..6).map(|_| Float64Builder::with_capacity(n)).collect();
    for (pair, clip) in pairs.iter().zip(&scores.per_clip) {
        key.append_value(&pair.key);
        reference_key.append_value(&pair.reference_key);
        candidate.append_value(&pair.candidate);
        references.append_value(pair.references.join(REFERENCE_SEPARATOR));
        let values = [
            clip.bleu[0],
            clip.bleu[1],
            clip.bleu[2],
            clip.bleu[3],
            clip.rouge_l,
            clip.cider_d,
        ];
        for (builder, v) in metrics.iter_mut().zip(values) {
            builder.append_value(v);
        }
    }
    let spider = java.spider(scores).ok().map(|(_, per_clip)| per_clip);
    let optional = [
        java.meteor.as_ref().ok().map(|m| m.per_clip.as_slice()),
        java.spice.as_ref().ok().map(|s| s.per_clip.as_slice()),
        spider.as_deref(),
    ];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(key.finish()),
        Arc::new(reference_key.finish()),
        Arc::new(candidate.finish()),
        Arc::new(references.finish()),
    ];
    columns.extend(metrics.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    for values in optional {
        let column: Float64Array = match values {
            Some(v) => v.iter().map(|&x| Some(x)).collect(),
            None => std::iter::repeat_n(None::<f64>, n).collect(),
        };
        columns.push(Arc::new(column));
    }
    let batch =
        RecordBatch::try_new(per_clip_schema(), columns).map_err(|source| ReportError::Arrow {
            path: path.to_path_buf(),
            source,
        })?;
    let mut writer = ParquetFileWriter::create(path, per_clip_schema(), Vec::new())?;
    writer.write_batch(&batch)?;
    writer.finish()?;
    Ok(())
}

/// Writes `value` as pretty JSON (synced to disk before it is renamed into place).
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ReportError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| ReportError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    atomic::write_synced(
        path,
        |file, staging| {
            serde_json::to_writer_pretty(&mut *file, value).map_err(|source| {
                ReportError::Json {
                    path: staging.to_path_buf(),
                    source,
                }
            })?;
            file.write_all(b"\n").map_err(|source| ReportError::Io {
                path: staging.to_path_buf(),
                source,
            })
        },
        |path, source| ReportError::Io {
            path: path.to_path_buf(),
            source,
        },
    )
}
