//! The captions table: one explicit Arrow schema and a Parquet writer (zstd) that
//! makes its file visible only when complete (written under a staging name, then
//! renamed).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    Float32Builder, Float64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt16Builder,
    UInt32Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::atomic;

/// One output row: a caption or an error for one segment of one input.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptionRow {
    pub uri: String,
    pub segment_index: u32,
    pub start_s: Option<f64>,
    pub end_s: Option<f64>,
    pub duration_s: Option<f64>,
    pub source_sample_rate_hz: Option<u32>,
    pub channels: Option<u16>,
    pub codec: Option<String>,
    pub caption: Option<String>,
    /// Mean token log-probability of the caption.
    pub score: Option<f32>,
    pub num_tokens: Option<u32>,
    pub error: Option<String>,
    /// What a reader should know about the audio behind a caption (a truncated
    /// file, skipped corrupt packets), `; `-joined.
    pub warnings: Option<String>,
    /// `name@manifest-hash` of the model.
    pub model: String,
    pub run_id: String,
    /// Microseconds since the Unix epoch, UTC.
    pub processed_at_us: i64,
    /// What kind of failure `error` is (the `error_kind` column; the run summary
    /// counts rows by it). Set by [`CaptionRow::failed`] together with `error`.
    pub failure: Option<RowFailure>,
}

/// Why a row has no caption, as the run summary counts it and the `error_kind`
/// column records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowFailure {
    /// The input could not be listed, fetched or decoded (the row stands for the
    /// whole input, or for what is left of it), with the input's own kind
    /// (`not_found`, `unsupported_codec`, ...).
    Input(&'static str),
    /// The segment is shorter than the encoder's one patch.
    TooShort,
    /// The model failed on the segment's batch.
    Model,
    /// The generated tokens could not be turned into text.
    Tokenizer,
}

impl RowFailure {
    /// The name in the run summary's `failed_segments` (`input` for every kind of
    /// input failure).
    pub fn segment_kind(self) -> &'static str {
        match self {
            Self::Input(_) => "input",
            Self::TooShort => "too_short",
            Self::Model => "model",
            Self::Tokenizer => "tokenizer",
        }
    }

    /// The row's `error_kind`: an input failure's own kind, else the segment kind.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Input(kind) => kind,
            other => other.segment_kind(),
        }
    }
}

impl CaptionRow {
    /// This row with a caption, its mean token log-probability and length.
    pub fn captioned(&self, caption: String, score: f32, num_tokens: u32, stamp: i64) -> Self {
        Self {
            caption: Some(caption),
            score: Some(score),
            num_tokens: Some(num_tokens),
            processed_at_us: stamp,
            ..self.clone()
        }
    }

    /// This row with the error that stopped it, and its kind.
    pub fn failed(&self, kind: RowFailure, error: impl Into<String>, stamp: i64) -> Self {
        Self {
            error: Some(error.into()),
            failure: Some(kind),
            processed_at_us: stamp,
            ..self.clone()
        }
    }
}

/// The captions table's schema.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("uri", DataType::Utf8, false),
        Field::new("segment_index", DataType::UInt32, false),
        Field::new("start_s", DataType::Float64, true),
        Field::new("end_s", DataType::Float64, true),
        Field::new("duration_s", DataType::Float64, true),
        Field::new("source_sample_rate_hz", DataType::UInt32, true),
        Field::new("channels", DataType::UInt16, true),
        Field::new("codec", DataType::Utf8, true),
        Field::new("caption", DataType::Utf8, true),
        Field::new("score", DataType::Float32, true),
        Field::new("num_tokens", DataType::UInt32, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("error_kind", DataType::Utf8, true),
        Field::new("warnings", DataType::Utf8, true),
        Field::new("model", DataType::Utf8, false),
        Field::new("run_id", DataType::Utf8, false),
        Field::new(
            "processed_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// Rows as one record batch of [`schema`].
pub fn to_record_batch(rows: &[CaptionRow]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let mut uri = StringBuilder::with_capacity(n, n * 64);
    let mut segment = UInt32Builder::with_capacity(n);
    let mut start = Float64Builder::with_capacity(n);
    let mut end = Float64Builder::with_capacity(n);
    let mut duration = Float64Builder::with_capacity(n);
    let mut rate = UInt32Builder::with_capacity(n);
    let mut channels = UInt16Builder::with_capacity(n);
    let mut codec = StringBuilder::with_capacity(n, n * 8);
    let mut caption = StringBuilder::with_capacity(n, n * 64);
    let mut score = Float32Builder::with_capacity(n);
    let mut tokens = UInt32Builder::with_capacity(n);
    let mut error = StringBuilder::with_capacity(n, 0);
    let mut error_kind = StringBuilder::with_capacity(n, 0);
    let mut warnings = StringBuilder::with_capacity(n, 0);
    let mut model = StringBuilder::with_capacity(n, n * 24);
    let mut run = StringBuilder::with_capacity(n, n * 24);
    let mut at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    for r in rows {
        uri.append_value(&r.uri);
        segment.append_value(r.segment_index);
        start.append_option(r.start_s);
        end.append_option(r.end_s);
        duration.append_option(r.duration_s);
        rate.append_option(r.source_sample_rate_hz);
        channels.append_option(r.channels);
        codec.append_option(r.codec.as_deref());
        caption.append_option(r.caption.as_deref());
        score.append_option(r.score);
        tokens.append_option(r.num_tokens);
        error.append_option(r.error.as_deref());
        error_kind.append_option(r.failure.map(RowFailure::kind));
        warnings.append_option(r.warnings.as_deref());
        model.append_value(&r.model);
        run.append_value(&r.run_id);
        at.append_value(r.processed_at_us);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(uri.finish()),
        Arc::new(segment.finish()),
        Arc::new(start.finish()),
        Arc::new(end.finish()),
        Arc::new(duration.finish()),
        Arc::new(rate.finish()),
        Arc::new(channels.finish()),
        Arc::new(codec.finish()),
        Arc::new(caption.finish()),
        Arc::new(score.finish()),
        Arc::new(tokens.finish()),
        Arc::new(error.finish()),
        Arc::new(error_kind.finish()),
        Arc::new(warnings.finish()),
        Arc::new(model.finish()),
        Arc::new(run.finish()),
        Arc::new(at.finish()),
    ];
    RecordBatch::try_new(schema(), columns)
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("{}: {source}", path.display())]
    Arrow {
        path: PathBuf,
        source: arrow_schema::ArrowError,
    },
}

/// The Parquet settings every output file shares: zstd, and `metadata` as key/value
/// pairs in the footer.
pub fn writer_properties(metadata: Vec<(String, String)>) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(
            metadata
                .into_iter()
                .map(|(k, v)| KeyValue::new(k, v))
                .collect(),
        ))
        .build()
}

/// A zstd Parquet file of any schema, written under a staging name beside it
/// ([`atomic`]) and renamed to its final name by [`ParquetFileWriter::finish`], so a
/// reader never sees half a file; dropped unfinished, the staging file is removed.
pub struct ParquetFileWriter {
    path: PathBuf,
    staging: atomic::Staging,
    writer: ArrowWriter<File>,
    rows: usize,
}

impl ParquetFileWriter {
    /// `metadata`: key/value pairs stored in the file footer.
    pub fn create(
        path: &Path,
        schema: SchemaRef,
        metadata: Vec<(String, String)>,
    ) -> Result<Self, OutputError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| OutputError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let staging = atomic::Staging::new(path);
        let file = File::create(staging.path()).map_err(|source| OutputError::Io {
            path: staging.path().to_path_buf(),
            source,
        })?;
        let writer = ArrowWriter::try_new(file, schema, Some(writer_properties(metadata)))
            .map_err(|source| OutputError::Parquet {
                path: staging.path().to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            staging,
            writer,
            rows: 0,
        })
    }

    pub fn write_batch(&mut self, batch: &RecordBatch) -> Result<(), OutputError> {
        self.writer
            .write(batch)
            .map_err(|source| OutputError::Parquet {
                path: self.staging.path().to_path_buf(),
                source,
            })?;
        self.rows += batch.num_rows();
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Closes the file and renames it into place.
    pub fn finish(self) -> Result<PathBuf, OutputError> {
        self.writer.close().map_err(|source| OutputError::Parquet {
            path: self.staging.path().to_path_buf(),
            source,
        })?;
        self.staging.commit().map_err(|source| OutputError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.path)
    }
}

/// The captions table as a [`ParquetFileWriter`] of [`schema`].
pub struct CaptionFileWriter {
    file: ParquetFileWriter,
}

impl CaptionFileWriter {
    /// `metadata`: key/value pairs stored in the file footer (the model manifest, the
    /// command or pipeline that produced it).
    pub fn create(path: &Path, metadata: Vec<(String, String)>) -> Result<Self, OutputError> {
        Ok(Self {
            file: ParquetFileWriter::create(path, schema(), metadata)?,
        })
    }

    pub fn write(&mut self, rows: &[CaptionRow]) -> Result<(), OutputError> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = to_record_batch(rows).map_err(|source| OutputError::Arrow {
            path: self.file.staging.path().to_path_buf(),
            source,
        })?;
        self.file.write_batch(&batch)
    }

    pub fn rows(&self) -> usize {
        self.file.rows()
    }

    /// Closes the file and renames it into place.
    pub fn finish(self) -> Result<PathBuf, OutputError> {
        self.file.finish()
    }
}

/// Microseconds since the Unix epoch now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn rows_round_trip_and_appear_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/captions.parquet");
        let mut w =
            CaptionFileWriter::create(&path, vec![("audiocap.model".into(), "{}".into())]).unwrap();
        let rows = vec![
            CaptionRow {
                uri: "a.wav".into(),
                caption: Some("a dog barks".into()),
                score: Some(-0.5),
                model: "m@1".into(),
                run_id: "r".into(),
                processed_at_us: 1,
                ..Default::default()
            },
            CaptionRow {
                uri: "b.wav".into(),
                model: "m@1".into(),
                run_id: "r".into(),
                ..Default::default()
            }
            .failed(RowFailure::Input("corrupt"), "corrupt", 2),
        ];
        w.write(&rows).unwrap();
        assert!(!path.exists(), "visible before finish");
        let final_path = w.finish().unwrap();
        assert_eq!(final_path, path);
        let file = File::open(&path).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let kv = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .clone();
        assert!(kv.iter().any(|k| k.key == "audiocap.model"));
        let batch = builder.build().unwrap().next().unwrap().unwrap();
        assert_eq!(batch.schema(), schema());
        let caption = batch
            .column_by_name("caption")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(caption.value(0), "a dog barks");
        assert!(caption.is_null(1));
    }
}
