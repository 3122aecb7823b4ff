//! What `audiocap eval` writes: the terminal table, `metrics.json` and the per-clip
//! scores as Parquet. Files are written under a staging name and renamed into place,
//! so a reader never sees half a file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, StringBuilder};
use arrow_array::{ArrayRef, Float64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::fense::FenseScores;
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

/// Everything `audiocap eval` scored: the native metrics, the Java ones and FENSE.
#[derive(Debug, Clone, Copy)]
pub struct AllScores<'a> {
    pub native: &'a CorpusScores,
    pub java: &'a JavaScores,
    pub fense: &'a Result<FenseScores, Unavailable>,
}

impl AllScores<'_> {
    /// SPIDEr-FL (corpus, per candidate): SPIDEr times FENSE's fluency penalty.
    pub fn spider_fl(&self) -> Result<(f64, Vec<f64>), Unavailable> {
        let (_, spider) = self.java.spider(self.native).map_err(|_| {
            Unavailable(
                "SPIDEr-FL is SPIDEr × the fluency penalty and SPIDEr is unavailable".into(),
            )
        })?;
        let fense = self.fense.as_ref().map_err(|_| {
            Unavailable(
                "SPIDEr-FL is SPIDEr × the fluency penalty and the fluency-error detector is \
                 unavailable (see fense)"
                    .into(),
            )
        })?;
        Ok(fense.spider_fl(&spider))
    }
}

/// One line of the table: display name, key in `metrics.json`, value or why not.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRow {
    pub name: &'static str,
    pub key: &'static str,
    pub value: Result<f64, Unavailable>,
}

/// Every corpus score, in table order.
pub fn score_rows(all: AllScores<'_>) -> Vec<ScoreRow> {
    let (scores, java) = (all.native, all.java);
    let fense = |f: fn(&FenseScores) -> f64| all.fense.as_ref().map(f).map_err(Clone::clone);
    let row = |name, key, value| ScoreRow { name, key, value };
    vec![
        row("BLEU-1", "bleu_1", Ok(scores.bleu[0])),
        row("BLEU-2", "bleu_2", Ok(scores.bleu[1])),
        row("BLEU-3", "bleu_3", Ok(scores.bleu[2])),
        row("BLEU-4", "bleu_4", Ok(scores.bleu[3])),
        row(
            "METEOR",
            "meteor",
            java.meteor.as_ref().map(|m| m.corpus).map_err(Clone::clone),
        ),
        row("ROUGE-L", "rouge_l", Ok(scores.rouge_l)),
        row("CIDEr-D", "cider_d", Ok(scores.cider_d)),
        row(
            "SPICE",
            "spice",
            java.spice.as_ref().map(|s| s.corpus).map_err(Clone::clone),
        ),
        row(
            "SPIDEr",
            "spider",
            java.spider(scores).map(|(corpus, _)| corpus),
        ),
        row("SPIDEr-FL", "spider_fl", all.spider_fl().map(|(c, _)| c)),
        row("SBERT-sim", "sbert_sim", fense(|f| f.sbert_sim)),
        row("FER", "fluency_error_rate", fense(|f| f.fluency_error_rate)),
        row("FENSE", "fense", fense(|f| f.fense)),
    ]
}

/// The scores as an aligned text table; an unavailable metric shows its reason (once
/// when several rows share it).
pub fn table(all: AllScores<'_>) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:<9} {:>10}\n", "metric", "score"));
    out.push_str(&format!("{:-<9} {:->10}\n", "", ""));
    let mut previous: Option<Unavailable> = None;
    for ScoreRow { name, value, .. } in score_rows(all) {
        match value {
            Ok(v) => {
                out.push_str(&format!("{name:<9} {v:>10.4}\n"));
                previous = None;
            }
            Err(why) => {
                let shown = if previous.as_ref() == Some(&why) {
                    "as above".to_string()
                } else {
                    why.0.clone()
                };
                out.push_str(&format!("{name:<9} {:>10}  ({shown})\n", "unavailable"));
                previous = Some(why);
            }
        }
    }
    out
}

/// Per-clip columns after the native scores; null where the metric is unavailable.
const OPTIONAL_COLUMNS: [&str; 7] = [
    "meteor",
    "spice",
    "spider",
    "spider_fl",
    "sbert_sim",
    "p_error",
    "fense",
];

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
        OPTIONAL_COLUMNS
            .iter()
            .map(|name| Field::new(*name, DataType::Float64, true)),
    );
    Arc::new(Schema::new(fields))
}

/// Writes one row per pair with its scores (`scores.per_clip[i]` belongs to `pairs[i]`).
pub fn write_per_clip(path: &Path, pairs: &[Pair], all: AllScores<'_>) -> Result<(), ReportError> {
    let (scores, java) = (all.native, all.java);
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
    let spider_fl = all.spider_fl().ok().map(|(_, per_clip)| per_clip);
    let fense = all.fense.as_ref().ok();
    let fense_column = |f: fn(&super::fense::FenseClip) -> f64| {
        fense.map(|s| s.per_clip.iter().map(f).collect::<Vec<f64>>())
    };
    let (sbert_sim, p_error, fense_score) = (
        fense_column(|c| c.sbert_sim),
        fense_column(|c| c.p_error),
        fense_column(|c| c.fense),
    );
    let optional = [
        java.meteor.as_ref().ok().map(|m| m.per_clip.as_slice()),
        java.spice.as_ref().ok().map(|s| s.per_clip.as_slice()),
        spider.as_deref(),
        spider_fl.as_deref(),
        sbert_sim.as_deref(),
        p_error.as_deref(),
        fense_score.as_deref(),
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
