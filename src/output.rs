//! The captions table: one explicit Arrow schema and a Parquet writer (zstd) that
//! makes its file visible only when complete (written under a staging name, then
//! renamed).
//!
//! Two columns are there only when asked for ([`OutputColumns`]): `tags`, the
//! segment's top sound-event tags (`list<struct<label: string, score: float>>`, by
//! score), and `embedding`, its audio embedding (`fixed_size_list<float32>` or
//! `<float16>`). Without them the schema is exactly [`schema`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    FixedSizeListBuilder, Float16Builder, Float32Builder, Float64Builder, ListBuilder,
    StringBuilder, StructBuilder, TimestampMicrosecondBuilder, UInt16Builder, UInt32Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

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
    /// The segment's top sound-event tags, by score (the `tags` column, when asked for).
    pub tags: Option<Vec<Tag>>,
    /// The segment's audio embedding (the `embedding` column, when asked for).
    pub embedding: Option<Vec<f32>>,
}

/// A sound-event tag of a segment: the label's name and its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Tag {
    pub label: String,
    pub score: f32,
}

/// The `k` most probable of `probs` (one per label of `labels`) that score at least
/// `min_score`, most probable first (ties in label order).
pub fn top_tags(probs: &[f32], labels: &[String], k: usize, min_score: f32) -> Vec<Tag> {
    let mut order: Vec<usize> = (0..probs.len().min(labels.len()))
        .filter(|&i| probs[i] >= min_score)
        .collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    order
        .into_iter()
        .take(k)
        .map(|i| Tag {
            label: labels[i].clone(),
            score: probs[i],
        })
        .collect()
}

/// Which audio embedding a row carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingKind {
    /// No `embedding` column.
    #[default]
    None,
    /// The mean encoder output over the segment's valid patches (BEATs' space,
    /// e.g. 768 values).
    Encoder,
    /// The projected audio embedding the decoder reads (the decoder's hidden size,
    /// e.g. 4096), averaged over its audio tokens.
    Projector,
}

impl EmbeddingKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Encoder => "encoder",
            Self::Projector => "projector",
        }
    }
}

/// How the `embedding` column stores its values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingDtype {
    #[default]
    F32,
    F16,
}

impl EmbeddingDtype {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }
}

/// The `embedding` column: which embedding, its width and storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingColumn {
    pub kind: EmbeddingKind,
    pub dim: usize,
    pub dtype: EmbeddingDtype,
}

/// The optional columns of a captions table; the default has neither, which is
/// [`schema`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputColumns {
    /// A `tags` column.
    pub tags: bool,
    /// An `embedding` column.
    pub embedding: Option<EmbeddingColumn>,
}

/// Footer keys that describe the `embedding` column.
pub const EMBEDDING_KIND_KEY: &str = "audiocap.embedding_kind";
pub const EMBEDDING_DIM_KEY: &str = "audiocap.embedding_dim";
pub const EMBEDDING_DTYPE_KEY: &str = "audiocap.embedding_dtype";

impl OutputColumns {
    /// The table's schema: [`schema`]'s columns, then `tags` and `embedding` when
    /// present.
    pub fn schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = base_fields();
        if self.tags {
            fields.push(Field::new("tags", tags_type(), true));
        }
        if let Some(e) = &self.embedding {
            fields.push(Field::new("embedding", embedding_type(e), true));
        }
        Arc::new(Schema::new(fields))
    }

    /// [`writer_properties`] for a table with these columns (`metadata` in the footer
    /// as given). The `embedding` values are stored without a dictionary: one of
    /// distinct floats costs more than the values (5.6 bytes per f32 value measured,
    /// against 3.7 without); f32 values also byte-stream-split, which zstd compresses
    /// better (not f16: DuckDB reads that encoding for FLOAT, DOUBLE and integers
    /// only). `benchmarks/row-bytes.sh` measures it.
    pub fn writer_properties(&self, metadata: Vec<(String, String)>) -> WriterProperties {
        let mut builder = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_key_value_metadata(Some(
                metadata
                    .into_iter()
                    .map(|(k, v)| KeyValue::new(k, v))
                    .collect(),
            ));
        if let Some(e) = &self.embedding {
            let values = ColumnPath::new(vec!["embedding".into(), "list".into(), "item".into()]);
            builder = builder.set_column_dictionary_enabled(values.clone(), false);
            if e.dtype == EmbeddingDtype::F32 {
                builder = builder.set_column_encoding(values, Encoding::BYTE_STREAM_SPLIT);
            }
        }
        builder.build()
    }

    /// Footer key/value pairs describing the optional columns (the embedding's kind,
    /// dimension and storage).
    pub fn metadata(&self) -> Vec<(String, String)> {
        match &self.embedding {
            Some(e) => vec![
                (EMBEDDING_KIND_KEY.into(), e.kind.name().into()),
                (EMBEDDING_DIM_KEY.into(), e.dim.to_string()),
                (EMBEDDING_DTYPE_KEY.into(), e.dtype.name().into()),
            ],
            None => Vec::new(),
        }
    }

    /// Rows as one record batch of [`Self::schema`]. A row's `tags` and `embedding`
    /// are ignored when the table has no such column; an embedding of another width
    /// than the column's is an error.
    pub fn record_batch(&self, rows: &[CaptionRow]) -> Result<RecordBatch, ArrowError> {
        let mut columns = base_columns(rows);
        if self.tags {
            columns.push(tags_column(rows));
        }
        if let Some(e) = &self.embedding {
            columns.push(embedding_column(rows, e)?);
        }
        RecordBatch::try_new(self.schema(), columns)
    }
}

fn tag_fields() -> Fields {
    Fields::from(vec![
        Field::new("label", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
    ])
}

fn tags_type() -> DataType {
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(tag_fields()),
        false,
    )))
}

fn embedding_type(e: &EmbeddingColumn) -> DataType {
    let value = match e.dtype {
        EmbeddingDtype::F32 => DataType::Float32,
        EmbeddingDtype::F16 => DataType::Float16,
    };
    DataType::FixedSizeList(Arc::new(Field::new("item", value, false)), e.dim as i32)
}

fn tags_column(rows: &[CaptionRow]) -> ArrayRef {
    let values = StructBuilder::from_fields(tag_fields(), rows.len() * 5);
    let item = Field::new("item", DataType::Struct(tag_fields()), false);
    let mut list = ListBuilder::new(values).with_field(Arc::new(item));
    for r in rows {
        match &r.tags {
            Some(tags) => {
                let entries = list.values();
                for t in tags {
                    entries
                        .field_builder::<StringBuilder>(0)
                        .expect("label column")
                        .append_value(&t.label);
                    entries
                        .field_builder::<Float32Builder>(1)
                        .expect("score column")
                        .append_value(t.score);
                    entries.append(true);
                }
                list.append(true);
            }
            None => list.append(false),
        }
    }
    Arc::new(list.finish())
}

fn embedding_column(rows: &[CaptionRow], e: &EmbeddingColumn) -> Result<ArrayRef, ArrowError> {
    let width = |r: &CaptionRow, v: &[f32]| {
        if v.len() == e.dim {
            Ok(())
        } else {
            Err(ArrowError::InvalidArgumentError(format!(
                "{} segment {}: an embedding of {} values for a column of {}",
                r.uri,
                r.segment_index,
                v.len(),
                e.dim
            )))
        }
    };
    let item = |dtype| Arc::new(Field::new("item", dtype, false));
    // A null row still holds `dim` (zero) values, as the layout requires.
    Ok(match e.dtype {
        EmbeddingDtype::F32 => {
            let values = Float32Builder::with_capacity(rows.len() * e.dim);
            let mut list = FixedSizeListBuilder::with_capacity(values, e.dim as i32, rows.len())
                .with_field(item(DataType::Float32));
            for r in rows {
                match &r.embedding {
                    Some(v) => {
                        width(r, v)?;
                        list.values().append_slice(v);
                        list.append(true);
                    }
                    None => {
                        list.values().append_value_n(0.0, e.dim);
                        list.append(false);
                    }
                }
            }
            Arc::new(list.finish())
        }
        EmbeddingDtype::F16 => {
            let values = Float16Builder::with_capacity(rows.len() * e.dim);
            let mut list = FixedSizeListBuilder::with_capacity(values, e.dim as i32, rows.len())
                .with_field(item(DataType::Float16));
            for r in rows {
                match &r.embedding {
                    Some(v) => {
                        width(r, v)?;
                        for &x in v {
                            list.values().append_value(half::f16::from_f32(x));
                        }
                        list.append(true);
                    }
                    None => {
                        list.values().append_value_n(half::f16::ZERO, e.dim);
                        list.append(false);
                    }
                }
            }
            Arc::new(list.finish())
        }
    })
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

    /// This row with the error that stopped it, and its kind (an error row has no
    /// tags or embedding).
    pub fn failed(&self, kind: RowFailure, error: impl Into<String>, stamp: i64) -> Self {
        Self {
            error: Some(error.into()),
            failure: Some(kind),
            processed_at_us: stamp,
            tags: None,
            embedding: None,
            ..self.clone()
        }
    }
}

/// The captions table's schema (without the optional columns: see
/// [`OutputColumns::schema`]).
pub fn schema() -> SchemaRef {
    OutputColumns::default().schema()
}

fn base_fields() -> Vec<Field> {
    vec![
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
    ]
}

/// Rows as one record batch of [`schema`].
pub fn to_record_batch(rows: &[CaptionRow]) -> Result<RecordBatch, ArrowError> {
    OutputColumns::default().record_batch(rows)
}

/// The columns of [`schema`].
fn base_columns(rows: &[CaptionRow]) -> Vec<ArrayRef> {
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
    vec![
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
    ]
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
    OutputColumns::default().writer_properties(metadata)
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
        Self::with_properties(path, schema, writer_properties(metadata))
    }

    /// [`Self::create`] with other settings than [`writer_properties`].
    pub fn with_properties(
        path: &Path,
        schema: SchemaRef,
        properties: WriterProperties,
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
        let writer = ArrowWriter::try_new(file, schema, Some(properties)).map_err(|source| {
            OutputError::Parquet {
                path: staging.path().to_path_buf(),
                source,
            }
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

/// The captions table as a [`ParquetFileWriter`] of [`schema`], or of
/// [`OutputColumns::schema`].
pub struct CaptionFileWriter {
    file: ParquetFileWriter,
    columns: OutputColumns,
}

impl CaptionFileWriter {
    /// `metadata`: key/value pairs stored in the file footer (the model manifest, the
    /// command or pipeline that produced it).
    pub fn create(path: &Path, metadata: Vec<(String, String)>) -> Result<Self, OutputError> {
        Self::with_columns(path, OutputColumns::default(), metadata)
    }

    /// [`Self::create`] with the optional `columns` (their description joins the
    /// footer's `metadata`).
    pub fn with_columns(
        path: &Path,
        columns: OutputColumns,
        mut metadata: Vec<(String, String)>,
    ) -> Result<Self, OutputError> {
        metadata.extend(columns.metadata());
        let properties = columns.writer_properties(metadata);
        Ok(Self {
            file: ParquetFileWriter::with_properties(path, columns.schema(), properties)?,
            columns,
        })
    }

    pub fn write(&mut self, rows: &[CaptionRow]) -> Result<(), OutputError> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = self
            .columns
            .record_batch(rows)
            .map_err(|source| OutputError::Arrow {
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

    #[test]
    fn top_tags_are_sorted_filtered_and_cut() {
        let labels: Vec<String> = ["a", "b", "c", "d"].map(String::from).into();
        let tags = top_tags(&[0.2, 0.9, f32::NAN, 0.9], &labels, 2, 0.1);
        assert_eq!(
            tags,
            [
                Tag {
                    label: "b".into(),
                    score: 0.9
                },
                Tag {
                    label: "d".into(),
                    score: 0.9
                }
            ]
        );
        assert_eq!(top_tags(&[0.2, 0.9, 0.0, 0.3], &labels, 5, 0.25).len(), 2);
        assert!(top_tags(&[0.2], &labels, 0, 0.0).is_empty());
    }

    #[test]
    fn optional_columns_round_trip_and_are_absent_unless_asked() {
        use arrow_array::cast::AsArray;
        use arrow_array::types::{Float16Type, Float32Type};
        let rows = vec![
            CaptionRow {
                uri: "a.wav".into(),
                caption: Some("a siren".into()),
                tags: Some(vec![
                    Tag {
                        label: "Siren".into(),
                        score: 0.75,
                    },
                    Tag {
                        label: "Engine".into(),
                        score: 0.5,
                    },
                ]),
                embedding: Some(vec![1.0, -2.0, 0.5]),
                ..Default::default()
            },
            CaptionRow {
                uri: "b.wav".into(),
                tags: Some(vec![Tag {
                    label: "x".into(),
                    score: 0.1,
                }]),
                embedding: Some(vec![1.0, 2.0, 3.0]),
                ..Default::default()
            }
            .failed(RowFailure::Model, "model: failed", 1),
        ];
        assert_eq!(OutputColumns::default().schema(), schema());
        // Without the columns, the rows' tags and embeddings are not written.
        assert_eq!(to_record_batch(&rows).unwrap().schema(), schema());
        for dtype in [EmbeddingDtype::F32, EmbeddingDtype::F16] {
            let columns = OutputColumns {
                tags: true,
                embedding: Some(EmbeddingColumn {
                    kind: EmbeddingKind::Encoder,
                    dim: 3,
                    dtype,
                }),
            };
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.parquet");
            let mut w = CaptionFileWriter::with_columns(&path, columns.clone(), vec![]).unwrap();
            w.write(&rows).unwrap();
            w.finish().unwrap();
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
            let kv = builder
                .metadata()
                .file_metadata()
                .key_value_metadata()
                .unwrap();
            let value = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
            assert_eq!(value(EMBEDDING_KIND_KEY).as_deref(), Some("encoder"));
            assert_eq!(value(EMBEDDING_DIM_KEY).as_deref(), Some("3"));
            assert_eq!(value(EMBEDDING_DTYPE_KEY).as_deref(), Some(dtype.name()));
            let batch = builder.build().unwrap().next().unwrap().unwrap();
            assert_eq!(batch.schema(), columns.schema());
            let tags = batch.column_by_name("tags").unwrap().as_list::<i32>();
            assert!(tags.is_null(1), "an error row has no tags");
            let first = tags.value(0);
            let first = first.as_struct();
            assert_eq!(first.column(0).as_string::<i32>().value(1), "Engine");
            assert_eq!(first.column(1).as_primitive::<Float32Type>().value(0), 0.75);
            let emb = batch
                .column_by_name("embedding")
                .unwrap()
                .as_fixed_size_list();
            assert!(emb.is_null(1));
            let values: Vec<f32> = match dtype {
                EmbeddingDtype::F32 => emb.value(0).as_primitive::<Float32Type>().values().to_vec(),
                EmbeddingDtype::F16 => emb
                    .value(0)
                    .as_primitive::<Float16Type>()
                    .values()
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
            };
            assert_eq!(values, [1.0, -2.0, 0.5]);
        }
        let columns = OutputColumns {
            tags: false,
            embedding: Some(EmbeddingColumn {
                kind: EmbeddingKind::Projector,
                dim: 4,
                dtype: EmbeddingDtype::F32,
            }),
        };
        let e = columns.record_batch(&rows).unwrap_err().to_string();
        assert!(
            e.contains("a.wav segment 0: an embedding of 3 values for a column of 4"),
            "{e}"
        );
    }
}
