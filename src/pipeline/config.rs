//! Pipeline files: the TOML a user copies from `pipelines/` and edits.
//!
//! Loaded as every settings file is ([`crate::config`]): TOML and `--set`
//! overrides, every key checked on its own, then [`PipelineConfig::validate`] checks
//! values and combinations without any I/O; every problem is listed at once.
//!
//! Relative local paths in a pipeline file are relative to the working directory
//! the run starts in (as for every other command), not to the file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::audio::ffmpeg::{FfmpegOptions, FfmpegSetting};
use crate::audio::segment::SegmentConfig;
use crate::config::{
    self, ConfigErrors, ConfigProblem, DeviceSpec, Schema, check_section, check_sections, count_in,
    problem, seconds_in,
};
use crate::dataset::MAX_SHARD_COUNT;
use crate::engine::audio::{ClipRequest, TagRequest};
use crate::manifest::ModelManifest;
use crate::output::{EmbeddingColumn, EmbeddingDtype, EmbeddingKind, OutputColumns};

/// A whole pipeline file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// The exported model that writes the captions.
    pub model: ModelSection,
    /// Which audio to caption.
    pub input: InputSection,
    /// Object-storage client settings (endpoints, regions, retries).
    pub storage: crate::storage::StorageOptions,
    /// How long recordings are cut into windows.
    pub segments: SegmentConfig,
    /// The decoders: the ffmpeg fallback for formats no native decoder reads.
    pub decode: DecodeSection,
    /// How segments are grouped for the encoder and decoder.
    pub batching: BatchingSection,
    /// How captions are generated.
    pub generation: GenerationSection,
    /// Threads and concurrency of the stages before the model.
    pub workers: WorkersSection,
    /// Where and how the Parquet dataset is written.
    pub output: OutputSection,
    /// Sharding, resume and exit-code policy.
    pub run: RunSection,
    /// Progress display and log format.
    pub logging: LoggingSection,
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Exported model directory (`audiocap export` output, containing `model.json`).
    pub path: String,
    /// `cpu`, `cuda` or `cuda:N`. CUDA never falls back to the CPU silently.
    pub device: String,
    /// Threads inside each ONNX operator; unset lets ONNX Runtime choose.
    pub intra_threads: Option<usize>,
    /// Check every model file's SHA-256 against `model.json` before loading (once
    /// per copy: verified files are remembered by size and modification time), so
    /// a half-copied model is refused.
    pub verify: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            device: "cpu".to_string(),
            intra_threads: None,
            verify: true,
        }
    }
}

/// `[input]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputSection {
    /// Files, folders (walked recursively), globs (`/data/**/*.flac`,
    /// `s3://bucket/audio/*.wav`) and URLs (`s3://`, `gs://`, `az://`, `http(s)://`).
    pub sources: Vec<String>,
    /// Manifest files (Parquet, CSV or JSON lines) with one input URI per row.
    pub manifests: Vec<String>,
    /// Column of the manifests that holds the URIs (default: `uri`, then `path`,
    /// then `file_name`).
    pub manifest_column: Option<String>,
    /// Only inputs whose key (relative to the listed folder or prefix) matches one of
    /// these globs are taken; empty takes all.
    pub include: Vec<String>,
    /// Inputs whose key matches one of these globs are skipped.
    pub exclude: Vec<String>,
    /// File extensions taken when listing folders and prefixes (default: the common
    /// audio extensions). Explicit files and manifest entries are taken as given.
    pub extensions: Option<Vec<String>>,
}

/// `[decode]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeSection {
    /// The ffmpeg that decodes what no native decoder reads (WMA, AC-3, AMR, WavPack,
    /// ...): `true` finds `ffmpeg` on `PATH` (without one, such inputs are error rows
    /// that say so), `false` turns the fallback off, a string is the executable's path.
    pub ffmpeg: FfmpegSetting,
    /// Longest ffmpeg may keep a decode worker waiting on one input before it is
    /// stopped (the input is then an error row, `ffmpeg_timeout`).
    pub ffmpeg_timeout_seconds: f64,
}

impl Default for DecodeSection {
    fn default() -> Self {
        Self {
            ffmpeg: FfmpegSetting::Search,
            ffmpeg_timeout_seconds: crate::audio::ffmpeg::DEFAULT_TIMEOUT_SECONDS,
        }
    }
}

impl DecodeSection {
    /// The decoders' options (validated values).
    pub fn ffmpeg_options(&self) -> FfmpegOptions {
        FfmpegOptions {
            setting: self.ffmpeg.clone(),
            timeout: std::time::Duration::from_secs_f64(self.ffmpeg_timeout_seconds),
        }
    }
}

/// `[batching]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingSection {
    /// Segments per encoder/decoder batch.
    pub batch_size: usize,
    /// Batches queued for the model beyond the one it is running. More keeps the
    /// model busy through bursts; fewer holds less memory.
    pub max_inflight_batches: usize,
    /// Segments are sorted by length within a pool of this many batches, so a batch
    /// holds similar lengths and little padding.
    pub sort_pool_batches: usize,
    /// Decoder rows kept busy by continuous batching (models exported with fused
    /// attention, greedy decoding): as captions finish, waiting clips take their
    /// rows. Unset: `batch_size`. Other models caption each batch to its end.
    pub decoder_rows: Option<usize>,
    /// With continuous batching, runs the encoder on a thread of its own: on a GPU
    /// its work overlaps the decoder's and the decoder never waits for a batch to be
    /// encoded. Unset: on with CUDA, off on the CPU (where both would share the same
    /// cores).
    pub encoder_thread: Option<bool>,
}

impl Default for BatchingSection {
    fn default() -> Self {
        Self {
            batch_size: 16,
            max_inflight_batches: 2,
            sort_pool_batches: 4,
            decoder_rows: None,
            encoder_thread: None,
        }
    }
}

/// `[generation]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationSection {
    /// Cap on generated tokens per caption; unset uses the model manifest's.
    pub max_new_tokens: Option<usize>,
    /// Beam search width; 1 is greedy decoding.
    pub beams: usize,
    /// For benchmarks only: stop ids are ignored until a caption has this many
    /// tokens, so every caption has a fixed length (0: captions end where the model
    /// ends them).
    pub min_new_tokens: usize,
}

impl Default for GenerationSection {
    fn default() -> Self {
        Self {
            max_new_tokens: None,
            beams: 1,
            min_new_tokens: 0,
        }
    }
}

/// `[workers]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersSection {
    /// Threads decoding, resampling and computing fbanks; unset uses every core.
    pub decode_threads: Option<usize>,
    /// Objects fetched concurrently from storage.
    pub fetch_concurrency: usize,
    /// Objects up to this size are fetched into memory; larger ones are spooled to a
    /// temporary file so memory does not grow with object size.
    pub max_in_memory_mb: u64,
}

impl Default for WorkersSection {
    fn default() -> Self {
        Self {
            decode_threads: None,
            fetch_concurrency: 16,
            max_in_memory_mb: 64,
        }
    }
}

/// `[output]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSection {
    /// Dataset folder: a local path or an object-store URL (`s3://bucket/captions/`).
    pub uri: String,
    /// A part file is closed and committed once it reaches about this size.
    pub target_part_mb: u64,
    /// A part file is closed once it holds this many rows.
    pub max_rows_per_part: usize,
    /// An open part is committed at least this often, so a killed run loses at most
    /// this much work.
    pub commit_interval_seconds: f64,
    /// A `tags` column with each segment's K most probable sound-event tags (label
    /// and probability, by probability). Unset: 5 when the model has tags (its
    /// encoder is a fine-tuned tagger), none otherwise; 0: no column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<usize>,
    /// Tags below this probability are left out of `tags`.
    pub min_tag_score: f32,
    /// An `embedding` column: `none`, `encoder` (the mean encoder output over the
    /// segment's patches: BEATs' space, e.g. 768 values) or `projector` (the
    /// projected audio embedding the decoder reads, e.g. 4096 values).
    pub embedding: EmbeddingKind,
    /// How `embedding` stores its values: `f32`, or `f16` (half the bytes).
    pub embedding_dtype: EmbeddingDtype,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            uri: String::new(),
            target_part_mb: 128,
            max_rows_per_part: 1_000_000,
            commit_interval_seconds: 60.0,
            tags: None,
            min_tag_score: 0.0,
            embedding: EmbeddingKind::None,
            embedding_dtype: EmbeddingDtype::F32,
        }
    }
}

impl OutputSection {
    /// The tags and embedding asked for.
    pub fn clip_columns(&self) -> ClipColumns {
        ClipColumns {
            tags: self.tags,
            min_tag_score: self.min_tag_score,
            embedding: self.embedding,
            embedding_dtype: self.embedding_dtype,
        }
    }
}

/// Tags per segment when the model has tags and nothing else is said.
pub const DEFAULT_TAGS: usize = 5;
/// At most this many tags per segment (AudioSet has 527 labels).
const MAX_TAGS: usize = 100_000;

/// The tags and embedding columns as asked for (`[output]` of a pipeline, or
/// `audiocap caption`'s flags), before they meet a model.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClipColumns {
    /// `None`: [`DEFAULT_TAGS`] when the model has tags; `Some(0)`: none.
    pub tags: Option<usize>,
    pub min_tag_score: f32,
    pub embedding: EmbeddingKind,
    pub embedding_dtype: EmbeddingDtype,
}

impl ClipColumns {
    /// Every problem with the values alone, keys named `{prefix}tags` and so on.
    pub fn validate(&self, prefix: &str, p: &mut Vec<ConfigProblem>) {
        if let Some(k) = self.tags {
            count_in(p, &format!("{prefix}tags"), k, 0..=MAX_TAGS);
        }
        if !(0.0..=1.0).contains(&self.min_tag_score) {
            p.push(problem(
                format!("{prefix}min_tag_score"),
                format!(
                    "must be a probability between 0 and 1, got {}",
                    self.min_tag_score
                ),
            ));
        }
    }

    /// Whether these settings are the defaults (nothing asked for).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The columns and the encoder's request for `manifest`'s model; every setting
    /// the model cannot meet is a problem (keys named `{prefix}tags` ...): tags from
    /// a model without a tagging head, the encoder embedding from an export without
    /// that output.
    pub fn resolve(
        &self,
        manifest: &ModelManifest,
        prefix: &str,
    ) -> Result<(OutputColumns, ClipRequest), Vec<ConfigProblem>> {
        let mut p = Vec::new();
        let has_tags = manifest.tag_labels().is_some_and(|l| !l.is_empty());
        let top_k = match self.tags {
            None if has_tags => DEFAULT_TAGS,
            None | Some(0) => 0,
            Some(k) if has_tags => k,
            Some(_) => {
                p.push(problem(
                    format!("{prefix}tags"),
                    format!(
                        "the model {} has no tags: its encoder has no tagging head. Export a \
                         fine-tuned BEATs checkpoint (audiocap export keeps its predictor; \
                         --tag-labels names its labels), or set tags = 0",
                        manifest.name
                    ),
                ));
                0
            }
        };
        let embedding = match self.embedding {
            EmbeddingKind::None => None,
            kind => match manifest.embedding_dim(kind) {
                Some(dim) => Some(EmbeddingColumn {
                    kind,
                    dim,
                    dtype: self.embedding_dtype,
                }),
                None => {
                    p.push(problem(
                        format!("{prefix}embedding"),
                        format!(
                            "\"{}\": the model {}'s encoder graph has no encoder_embedding \
                             output (exported by audiocap {}, before it existed): re-export \
                             it with audiocap export, or use \"projector\"",
                            kind.name(),
                            manifest.name,
                            manifest.audiocap_version
                        ),
                    ));
                    None
                }
            },
        };
        if !p.is_empty() {
            return Err(p);
        }
        let columns = OutputColumns {
            tags: top_k > 0,
            embedding,
        };
        let request = ClipRequest {
            tags: (top_k > 0).then_some(TagRequest {
                top_k,
                min_score: self.min_tag_score,
            }),
            embedding: embedding.map_or(EmbeddingKind::None, |e| e.kind),
        };
        Ok((columns, request))
    }
}

/// `[run]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// This process's shard, 0-based. Unset: from `JOB_COMPLETION_INDEX`,
    /// `AWS_BATCH_JOB_ARRAY_INDEX` or `SLURM_ARRAY_TASK_ID`, else 0.
    pub shard_index: Option<u32>,
    /// Number of shards. Unset: from `AWS_BATCH_JOB_ARRAY_SIZE` or
    /// `SLURM_ARRAY_TASK_COUNT`, else 1.
    pub shard_count: Option<u32>,
    /// Skip inputs already committed to the output dataset.
    pub resume: bool,
    /// Exit with code 3 when more than this fraction of the shard's inputs failed
    /// (each failure is still a row with an error; with `resume`, earlier runs'
    /// committed failures count too). 0 flags any failure.
    pub max_failed_fraction: f64,
    /// Stop after this many new inputs (for trials); unset takes all.
    pub limit: Option<u64>,
    /// How long an input whose fetch keeps failing transiently (network,
    /// throttling, 5xx, timeouts) is fetched again, with exponential backoff and
    /// jitter, before the run gives it up: it is then not committed, the run stops
    /// taking inputs and exits with code 1, and the next run takes it again. A model
    /// that keeps failing (`crate::stages::recover`) is waited for as long.
    pub transient_retry_seconds: f64,
    /// Caption again the inputs whose committed rows failed (`--retry-failed`): they
    /// are taken out of the shard's parts first, so each input keeps only its newest
    /// rows. Needs `resume`.
    pub retry_failed: bool,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            shard_index: None,
            shard_count: None,
            resume: true,
            max_failed_fraction: 0.0,
            limit: None,
            transient_retry_seconds: 60.0,
            retry_failed: false,
        }
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgressMode {
    /// A bar on a terminal, periodic lines otherwise.
    #[default]
    Auto,
    /// Always a bar.
    Bar,
    /// Always periodic log lines.
    Lines,
    /// Only the final summary.
    Off,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[logging]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingSection {
    /// `auto`, `bar`, `lines` or `off`.
    pub progress: ProgressMode,
    /// `text` or `json` (one JSON object per line, for log collectors).
    pub format: LogFormat,
    /// `error`, `warn`, `info`, `debug` or `trace`, or a `tracing` filter directive
    /// such as `audiocap=debug`. `RUST_LOG` overrides it.
    pub level: String,
    /// Seconds between progress lines when not on a terminal.
    pub interval_seconds: f64,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            progress: ProgressMode::Auto,
            format: LogFormat::Text,
            level: "info".to_string(),
            interval_seconds: 30.0,
        }
    }
}

const SCHEMA: Schema<PipelineConfig> = Schema {
    check_keys,
    validate: PipelineConfig::validate,
    flat: false,
};

impl PipelineConfig {
    /// Reads, overrides and validates a pipeline file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigErrors> {
        config::load(path, overrides, &SCHEMA)
    }

    /// [`PipelineConfig::load`] on text already read; `file` names it in messages.
    pub fn parse(text: &str, file: &str, overrides: &[String]) -> Result<Self, ConfigErrors> {
        config::parse(text, file, overrides, &SCHEMA)
    }

    /// Checks values and their combinations; every problem at once. No I/O.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut p = Vec::new();
        if self.model.path.trim().is_empty() {
            p.push(problem(
                "model.path",
                "missing: the exported model directory (from `audiocap export`)",
            ));
        }
        if let Err(e) = self.model.device.parse::<DeviceSpec>() {
            p.push(problem("model.device", e.to_string()));
        }
        if let Some(n) = self.model.intra_threads {
            count_in(&mut p, "model.intra_threads", n, 1..=MAX_THREADS);
        }

        if self.input.sources.is_empty() && self.input.manifests.is_empty() {
            p.push(problem(
                "input",
                "nothing to caption: give `sources` (files, folders, globs, URLs) or \
                 `manifests`",
            ));
        }
        for (i, s) in self.input.sources.iter().enumerate() {
            if let Err(e) = check_location(s) {
                p.push(problem(format!("input.sources[{i}]"), e));
            }
        }
        for (i, s) in self.input.manifests.iter().enumerate() {
            if let Err(e) = check_location(s) {
                p.push(problem(format!("input.manifests[{i}]"), e));
            }
        }
        for (key, patterns) in [
            ("input.include", &self.input.include),
            ("input.exclude", &self.input.exclude),
        ] {
            for (i, pat) in patterns.iter().enumerate() {
                if let Err(e) = globset::Glob::new(pat) {
                    p.push(problem(format!("{key}[{i}]"), format!("bad glob: {e}")));
                }
            }
        }
        if let Some(ext) = &self.input.extensions {
            if ext.is_empty() {
                p.push(problem(
                    "input.extensions",
                    "empty: no listed file would be taken (remove the key for the default)",
                ));
            }
            for (i, e) in ext.iter().enumerate() {
                if e.is_empty() || e.contains(['/', '.', '*']) {
                    p.push(problem(
                        format!("input.extensions[{i}]"),
                        format!("`{e}` is not a bare extension (write `flac`, not `.flac`)"),
                    ));
                }
            }
        }
        if let Some(endpoint) = &self.storage.endpoint
            && url::Url::parse(endpoint).is_err()
        {
            p.push(problem(
                "storage.endpoint",
                "not a URL (e.g. http://127.0.0.1:9000)",
            ));
        }
        for (key, value) in [
            ("storage.timeout_secs", self.storage.timeout_secs),
            (
                "storage.connect_timeout_secs",
                self.storage.connect_timeout_secs,
            ),
        ] {
            if value == Some(0) {
                p.push(problem(key, "must be >= 1 second"));
            }
        }

        if let Err(errors) = self.segments.validate() {
            for e in errors {
                p.push(problem("segments", e));
            }
        }
        if self.segments.window_seconds > self.segments.max_seconds {
            p.push(problem(
                "segments",
                format!(
                    "window_seconds ({}) is longer than max_seconds ({}): recordings \
                     just over max_seconds would not be cut",
                    self.segments.window_seconds, self.segments.max_seconds
                ),
            ));
        }
        if self.segments.hop_seconds > self.segments.window_seconds {
            p.push(problem(
                "segments.hop_seconds",
                format!(
                    "{} is longer than window_seconds ({}): audio between windows would \
                     never be captioned",
                    self.segments.hop_seconds, self.segments.window_seconds
                ),
            ));
        }

        seconds_in(
            &mut p,
            "decode.ffmpeg_timeout_seconds",
            self.decode.ffmpeg_timeout_seconds,
            0.1..=MAX_SECONDS,
        );

        let b = &self.batching;
        count_in(&mut p, "batching.batch_size", b.batch_size, 1..=MAX_BATCH);
        count_in(
            &mut p,
            "batching.max_inflight_batches",
            b.max_inflight_batches,
            1..=256,
        );
        count_in(
            &mut p,
            "batching.sort_pool_batches",
            b.sort_pool_batches,
            1..=256,
        );
        if let Some(rows) = b.decoder_rows {
            count_in(&mut p, "batching.decoder_rows", rows, 1..=MAX_BATCH);
        }
        count_in(
            &mut p,
            "generation.beams",
            self.generation.beams,
            1..=MAX_BEAMS,
        );
        if let Some(n) = self.generation.max_new_tokens {
            count_in(&mut p, "generation.max_new_tokens", n, 1..=MAX_NEW_TOKENS);
        }
        if let Some(max) = self.generation.max_new_tokens
            && self.generation.min_new_tokens > max
        {
            p.push(problem(
                "generation.min_new_tokens",
                "must be <= generation.max_new_tokens",
            ));
        }
        if let Some(n) = self.workers.decode_threads {
            count_in(&mut p, "workers.decode_threads", n, 1..=MAX_THREADS);
        }
        count_in(
            &mut p,
            "workers.fetch_concurrency",
            self.workers.fetch_concurrency,
            1..=MAX_THREADS,
        );
        count_in(
            &mut p,
            "workers.max_in_memory_mb",
            self.workers.max_in_memory_mb,
            0..=MAX_MEGABYTES,
        );

        if self.output.uri.trim().is_empty() {
            p.push(problem(
                "output.uri",
                "missing: a local folder or an object-store URL for the dataset",
            ));
        } else if let Err(e) = check_location(&self.output.uri) {
            p.push(problem("output.uri", e));
        } else if self.output.uri.contains(['*', '?', '[']) {
            p.push(problem("output.uri", "must be a folder, not a glob"));
        }
        count_in(
            &mut p,
            "output.target_part_mb",
            self.output.target_part_mb,
            1..=MAX_MEGABYTES,
        );
        count_in(
            &mut p,
            "output.max_rows_per_part",
            self.output.max_rows_per_part,
            1..=1_000_000_000,
        );
        seconds_in(
            &mut p,
            "output.commit_interval_seconds",
            self.output.commit_interval_seconds,
            0.001..=MAX_SECONDS,
        );
        self.output.clip_columns().validate("output.", &mut p);

        match (self.run.shard_index, self.run.shard_count) {
            (_, Some(0)) => p.push(problem("run.shard_count", "must be >= 1")),
            (_, Some(n)) if n > MAX_SHARD_COUNT => p.push(problem(
                "run.shard_count",
                format!("{n}: at most {MAX_SHARD_COUNT} shards"),
            )),
            (Some(i), Some(n)) if i >= n => p.push(problem(
                "run.shard_index",
                format!("{i} is not below shard_count {n} (indices are 0-based)"),
            )),
            _ => {}
        }
        seconds_in(
            &mut p,
            "run.transient_retry_seconds",
            self.run.transient_retry_seconds,
            0.0..=86_400.0,
        );
        if self.run.retry_failed && !self.run.resume {
            p.push(problem(
                "run.retry_failed",
                "needs run.resume = true: the failed inputs are found among the committed ones",
            ));
        }
        if !(0.0..=1.0).contains(&self.run.max_failed_fraction) {
            p.push(problem(
                "run.max_failed_fraction",
                format!(
                    "must be between 0 and 1, got {}",
                    self.run.max_failed_fraction
                ),
            ));
        }
        seconds_in(
            &mut p,
            "logging.interval_seconds",
            self.logging.interval_seconds,
            0.1..=86_400.0,
        );
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            p.push(problem(
                "logging.level",
                format!(
                    "`{}` is not a level (error, warn, info, debug, trace) or a filter \
                     directive",
                    self.logging.level
                ),
            ));
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    /// The configuration as TOML (with every default filled in), for the dataset's
    /// metadata and the run summary.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# not serialisable: {e}"))
    }

    /// SHA-256 (hex) of the settings that decide which rows a dataset holds and what
    /// they say: the inputs, segmentation, generation, the output and the shard count.
    /// Every shard of one dataset has the same digest; where a shard runs (model path,
    /// device, workers, storage client, logging, its index) does not enter it.
    pub fn dataset_digest(&self, shard_count: u32) -> String {
        use sha2::{Digest, Sha256};
        #[derive(Serialize)]
        struct Shaping<'a> {
            input: &'a InputSection,
            segments: &'a SegmentConfig,
            generation: &'a GenerationSection,
            output_uri: &'a str,
            shard_count: u32,
            /// Only when asked for, so datasets without tags or embeddings keep their
            /// digest.
            #[serde(skip_serializing_if = "Option::is_none")]
            clip_columns: Option<ClipColumns>,
        }
        let text = toml::to_string(&Shaping {
            input: &self.input,
            segments: &self.segments,
            generation: &self.generation,
            output_uri: &self.output.uri,
            shard_count,
            clip_columns: Some(self.output.clip_columns()).filter(|c| !c.is_default()),
        })
        .unwrap_or_default();
        hex::encode(Sha256::digest(text.as_bytes()))
    }
}

// Upper bounds on counts and sizes: far beyond any real setting, low enough that no
// product of them overflows or sizes an absurd allocation (channel capacities, byte
// counts, durations).
const MAX_THREADS: usize = 1024;
const MAX_BATCH: usize = 4096;
const MAX_BEAMS: usize = 64;
const MAX_NEW_TOKENS: usize = 4096;
/// Sizes in MiB: 64 GiB.
const MAX_MEGABYTES: u64 = 65_536;
/// Durations: a year.
const MAX_SECONDS: f64 = 31_536_000.0;

/// URL schemes a location may have (see `storage::Location::parse`).
const SCHEMES: &[&str] = &[
    "file", "s3", "s3a", "gs", "az", "azure", "adl", "abfs", "abfss", "http", "https",
];

/// Checks the form of a local path or URL without touching it.
fn check_location(spec: &str) -> Result<(), String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err("empty".into());
    }
    // `C:\x` and `./a:b` are paths; a scheme is letters before `://`.
    let Some((scheme, _)) = spec.split_once("://") else {
        return Ok(());
    };
    if !scheme
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Ok(());
    }
    let scheme = scheme.to_ascii_lowercase();
    if !SCHEMES.contains(&scheme.as_str()) {
        return Err(format!(
            "unsupported scheme `{scheme}://` (supported: {}, or a local path)",
            SCHEMES.join(", ")
        ));
    }
    let url = url::Url::parse(spec).map_err(|e| format!("not a valid URL: {e}"))?;
    if scheme != "file" && url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "`{scheme}://` needs a bucket, container or host (e.g. {scheme}://name/prefix/)"
        ));
    }
    Ok(())
}

/// Deserialises every key of every section on its own, so that each unknown key and
/// each wrong type is reported, not only the first.
fn check_keys(table: &toml::Table) -> Vec<ConfigProblem> {
    check_sections(
        table,
        &[
            ("model", check_section::<ModelSection>),
            ("input", check_section::<InputSection>),
            ("storage", check_section::<crate::storage::StorageOptions>),
            ("segments", check_section::<SegmentConfig>),
            ("decode", check_section::<DecodeSection>),
            ("batching", check_section::<BatchingSection>),
            ("generation", check_section::<GenerationSection>),
            ("workers", check_section::<WorkersSection>),
            ("output", check_section::<OutputSection>),
            ("run", check_section::<RunSection>),
            ("logging", check_section::<LoggingSection>),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [model]
        path = "models/tiny"
        [input]
        sources = ["audio/"]
        [output]
        uri = "out/"
    "#;

    #[test]
    fn the_decode_section_takes_a_switch_or_a_path_and_lists_bad_values_with_the_rest() {
        let parsed = |set: &[&str]| {
            let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
            PipelineConfig::parse(MINIMAL, "m.toml", &set)
        };
        assert_eq!(parsed(&[]).unwrap().decode.ffmpeg, FfmpegSetting::Search);
        assert_eq!(
            parsed(&["decode.ffmpeg=false"]).unwrap().decode.ffmpeg,
            FfmpegSetting::Off
        );
        let path = parsed(&["decode.ffmpeg=\"/opt/ffmpeg/bin/ffmpeg\""]).unwrap();
        assert_eq!(
            path.decode.ffmpeg,
            FfmpegSetting::Path("/opt/ffmpeg/bin/ffmpeg".into())
        );
        // Written back as it was read (the dataset's metadata keeps the pipeline).
        assert!(
            path.to_toml()
                .contains("ffmpeg = \"/opt/ffmpeg/bin/ffmpeg\"")
        );
        let err = parsed(&[
            "decode.ffmpeg=3",
            "decode.ffmpeg_timeout_seconds=0",
            "decode.ffmpeg_path=\"x\"",
            "batching.batch_size=0",
        ])
        .unwrap_err();
        let text = err.to_string();
        for at in [
            "decode.ffmpeg:",
            "decode.ffmpeg_timeout_seconds",
            "decode.ffmpeg_path",
            "batching.batch_size",
        ] {
            assert!(text.contains(at), "{at} not in {text}");
        }
        assert!(text.contains("the path of the ffmpeg executable"), "{text}");
        let empty = parsed(&["decode.ffmpeg=\"\""]).unwrap_err().to_string();
        assert!(empty.contains("an empty path"), "{empty}");
    }

    /// Values that would overflow a duration, size a channel or an allocation
    /// absurdly, or make a timer spin are problems of the file, not panics later.
    #[test]
    fn values_that_would_overflow_or_spin_are_problems() {
        let set: Vec<String> = [
            "output.commit_interval_seconds=1e20",
            "logging.interval_seconds=1e-12",
            "run.transient_retry_seconds=nan",
            "batching.batch_size=18446744073709551615",
            "batching.max_inflight_batches=100000",
            "workers.fetch_concurrency=9223372036854775807",
            "workers.max_in_memory_mb=18446744073709551615",
            "output.target_part_mb=17592186044416",
            "generation.beams=100000",
            "generation.max_new_tokens=1000000",
            "segments.hop_seconds=1e-9",
            "segments.window_seconds=1e20",
            "run.shard_count=4000000000",
        ]
        .map(String::from)
        .into();
        let err = PipelineConfig::parse(MINIMAL, "m.toml", &set).unwrap_err();
        let ats: Vec<&str> = err.problems.iter().map(|p| p.at.as_str()).collect();
        for key in [
            "output.commit_interval_seconds",
            "logging.interval_seconds",
            "run.transient_retry_seconds",
            "batching.batch_size",
            "batching.max_inflight_batches",
            "workers.fetch_concurrency",
            "workers.max_in_memory_mb",
            "output.target_part_mb",
            "generation.beams",
            "generation.max_new_tokens",
            "run.shard_count",
        ] {
            assert!(ats.contains(&key), "{key} not in {err}");
        }
        let segments = err.problems.iter().filter(|p| p.at == "segments").count();
        assert!(segments >= 2, "{err}");
        // The edges themselves are fine.
        let edges: Vec<String> = [
            "output.commit_interval_seconds=31536000",
            "logging.interval_seconds=0.1",
            "batching.batch_size=4096",
            "workers.max_in_memory_mb=0",
            "segments.hop_seconds=0.1",
        ]
        .map(String::from)
        .into();
        PipelineConfig::parse(MINIMAL, "m.toml", &edges).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn a_minimal_file_fills_defaults() {
        let c = PipelineConfig::parse(MINIMAL, "m.toml", &[]).unwrap();
        assert_eq!(c.model.device, "cpu");
        assert_eq!(c.batching.batch_size, 16);
        assert!(c.run.resume);
        assert_eq!(c.segments, SegmentConfig::default());
    }

    #[test]
    fn the_transient_retry_budget_is_a_minute_and_bounded() {
        let c = PipelineConfig::parse(MINIMAL, "m.toml", &[]).unwrap();
        assert_eq!(c.run.transient_retry_seconds, 60.0);
        for bad in ["-1", "1e20", "nan"] {
            let err = PipelineConfig::parse(
                MINIMAL,
                "m.toml",
                &[format!("run.transient_retry_seconds={bad}")],
            )
            .unwrap_err();
            assert!(
                err.problems
                    .iter()
                    .any(|p| p.at == "run.transient_retry_seconds"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let text = r#"
            [model]
            path = ""
            device = "tpu"
            colour = "blue"
            [input]
            sources = []
            include = ["a[b"]
            [batching]
            batch_size = 0
            max_inflight_batches = "two"
            [segments]
            window_seconds = 5.0
            hop_seconds = 6.0
            [generation]
            max_new_tokens = 10
            min_new_tokens = 11
            [output]
            uri = "out/"
            commit_interval_seconds = -1
            [run]
            shard_index = 4
            shard_count = 4
            [nonsense]
            x = 1
        "#;
        let err = PipelineConfig::parse(text, "bad.toml", &[]).unwrap_err();
        let at: Vec<&str> = err.problems.iter().map(|p| p.at.as_str()).collect();
        // Key-level problems (unknown keys, wrong types) come first, and the value
        // checks of everything else in the same pass.
        let mut keys = at[..3].to_vec();
        keys.sort();
        assert_eq!(
            keys,
            ["batching.max_inflight_batches", "model.colour", "nonsense"],
            "{err}"
        );
        for expected in ["model.path", "batching.batch_size", "run.shard_index"] {
            assert!(at.contains(&expected), "{expected} missing from {err}");
        }
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("bad.toml: {} problems", err.problems.len())),
            "{shown}"
        );
        assert!(shown.contains("unknown field `colour`"), "{shown}");

        // With the key problems fixed, every value problem is listed.
        let text = text
            .replace("colour = \"blue\"", "")
            .replace("max_inflight_batches = \"two\"", "")
            .replace("[nonsense]\n            x = 1", "");
        let err = PipelineConfig::parse(&text, "bad.toml", &[]).unwrap_err();
        let at: Vec<&str> = err.problems.iter().map(|p| p.at.as_str()).collect();
        for expected in [
            "model.path",
            "model.device",
            "input",
            "input.include[0]",
            "batching.batch_size",
            "segments.hop_seconds",
            "generation.min_new_tokens",
            "output.commit_interval_seconds",
            "run.shard_index",
        ] {
            assert!(at.contains(&expected), "{expected} missing from {err}");
        }
    }

    #[test]
    fn retrying_failed_inputs_needs_resume() {
        let retry = "run.retry_failed=true".to_string();
        let c = PipelineConfig::parse(MINIMAL, "m.toml", std::slice::from_ref(&retry)).unwrap();
        assert!(c.run.retry_failed && c.run.resume);
        let err = PipelineConfig::parse(MINIMAL, "m.toml", &[retry, "run.resume=false".into()])
            .unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.at == "run.retry_failed"),
            "{err}"
        );
        // It only chooses which inputs to caption: the rows' shape is unchanged.
        let plain = PipelineConfig::parse(MINIMAL, "m.toml", &[]).unwrap();
        assert_eq!(c.dataset_digest(1), plain.dataset_digest(1));
    }

    #[test]
    fn overrides_are_typed_and_validated() {
        let c = PipelineConfig::parse(
            MINIMAL,
            "m.toml",
            &[
                "batching.batch_size=32".into(),
                "output.uri=s3://bucket/captions/".into(),
                "run.resume=false".into(),
                "input.include=[\"**/*.flac\"]".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.batching.batch_size, 32);
        assert_eq!(c.output.uri, "s3://bucket/captions/");
        assert!(!c.run.resume);
        assert_eq!(c.input.include, vec!["**/*.flac".to_string()]);

        let err = PipelineConfig::parse(
            MINIMAL,
            "m.toml",
            &["batching=3".into(), "batching.batch_size=0".into()],
        )
        .unwrap_err();
        assert!(err.problems[0].at.starts_with("--set batching=3"), "{err}");
    }

    #[test]
    fn round_trips_through_toml() {
        let c = PipelineConfig::parse(MINIMAL, "m.toml", &[]).unwrap();
        let again = PipelineConfig::parse(&c.to_toml(), "again.toml", &[]).unwrap();
        assert_eq!(c, again);
    }
}
