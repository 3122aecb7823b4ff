//! `audiocap caption`: a preset of the staged pipeline for local files. The files
//! and folders given (folders walked for audio files, [`audio_files`]) are the
//! listing; the same fetch, decode, batch and model stages as `audiocap run` caption
//! them; the sink writes one Parquet file of the captions schema, visible only once
//! complete. Every input's rows come out together and in segment order; a file that
//! is missing, unreadable or not audio is an error row, as in a run.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::config::{BatchingSection, ClipColumns, ProgressMode};
use super::wiring::{self, StageSettings};
use crate::audio::files::audio_files;
use crate::audio::segment::SegmentConfig;
use crate::engine::generate::GenerationParams;
use crate::engine::model::{EngineOptions, OnnxModel};
use crate::manifest::ModelManifest;
use crate::output::CaptionFileWriter;
use crate::stages::RunCounters;
use crate::stages::list::{Inputs, ListPlan};
use crate::stages::sink::RowTarget;
use crate::storage::{InputRef, InputSource, ShardSpec};

/// What `audiocap caption` was asked to do.
#[derive(Debug, Clone)]
pub struct CaptionOptions {
    /// Exported model directory.
    pub model: PathBuf,
    pub engine: EngineOptions,
    /// Check the model files against model.json before loading.
    pub verify: bool,
    /// Segments per encoder/decoder batch (and decoder rows, with continuous batching).
    pub batch_size: usize,
    /// Beam search width; 1 is greedy decoding.
    pub beams: usize,
    /// Cap on generated tokens per caption (unset: the model manifest's).
    pub max_new_tokens: Option<usize>,
    /// Threads decoding and computing fbanks (unset: every core).
    pub decode_threads: Option<usize>,
    pub segments: SegmentConfig,
    /// The fallback decoder for what no native decoder reads.
    pub ffmpeg: crate::audio::ffmpeg::FfmpegOptions,
    /// The `tags` and `embedding` columns asked for.
    pub clip_columns: ClipColumns,
    /// The Parquet file written.
    pub out: PathBuf,
    /// Files (taken whatever their extension) and folders.
    pub inputs: Vec<PathBuf>,
    /// The command line, kept in the file's metadata.
    pub command: String,
}

impl CaptionOptions {
    /// Every problem with the options at once (flag names as the command line has
    /// them). No I/O.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = self.segments.validate().err().unwrap_or_default();
        if self.batch_size == 0 {
            problems.push("--batch-size must be at least 1".into());
        }
        if self.beams == 0 {
            problems.push("--beams must be at least 1".into());
        }
        if self.max_new_tokens == Some(0) {
            problems.push("--max-new-tokens must be at least 1".into());
        }
        let mut columns = Vec::new();
        self.clip_columns.validate("--", &mut columns);
        problems.extend(columns.into_iter().map(|mut p| {
            p.at = p.at.replace('_', "-");
            p.to_string()
        }));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// What a caption job did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CaptionSummary {
    pub inputs: u64,
    /// Rows written (segments, and one error row per input that failed as a whole).
    pub segments: u64,
    pub captions: u64,
    /// Rows with an error instead of a caption.
    pub failed_segments: u64,
    pub audio_seconds: f64,
    pub wall_seconds: f64,
    /// The file written.
    pub path: PathBuf,
}

/// The files to caption, in order: files as given (a missing one becomes an error
/// row), folders walked for audio files; a folder that cannot be read is an input
/// that fails.
pub fn caption_inputs(inputs: &[PathBuf]) -> Vec<InputRef> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            files.extend(audio_files(input).into_iter().map(|item| match item {
                Ok(path) => path,
                Err(unreadable) => unreadable.path,
            }));
        } else {
            files.push(input.clone());
        }
    }
    files
        .into_iter()
        .map(|path| InputRef {
            uri: path.display().to_string(),
            source: InputSource::Local(path),
            size: None,
        })
        .collect()
}

/// Captions the inputs into one Parquet file. Inputs that fail are error rows;
/// `Err` is a model that cannot load or a file that cannot be written.
pub fn caption_files(options: &CaptionOptions) -> anyhow::Result<CaptionSummary> {
    let started = Instant::now();
    if options.verify {
        ModelManifest::verify_dir(&options.model)
            .with_context(|| format!("verifying {}", options.model.display()))?;
    }
    let mut model = OnnxModel::load(&options.model, &options.engine)
        .with_context(|| format!("loading {}", options.model.display()))?;
    let (columns, request) = options
        .clip_columns
        .resolve(&model.manifest, "--")
        .map_err(|problems| {
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("{}", problems.join("; "))
        })?;
    // Before the probe, so that it runs the encoder as the inputs will.
    model.request_clip_outputs(request)?;
    crate::stages::model::check_model(&mut model).with_context(|| {
        format!(
            "{}: the model cannot caption a silent clip",
            options.model.display()
        )
    })?;
    let metadata = vec![
        ("audiocap.model".to_string(), model.identity.clone()),
        (
            "audiocap.model_manifest".to_string(),
            serde_json::to_string(&model.manifest)?,
        ),
        ("audiocap.command".to_string(), options.command.clone()),
    ];
    let writer = CaptionFileWriter::with_columns(&options.out, columns, metadata)?;
    let decode_threads = wiring::decode_threads(options.decode_threads);
    let settings = StageSettings {
        batching: BatchingSection {
            batch_size: options.batch_size,
            decoder_rows: Some(options.batch_size),
            ..BatchingSection::default()
        },
        params: GenerationParams {
            max_new_tokens: options
                .max_new_tokens
                .unwrap_or(model.manifest.generation.max_new_tokens),
            beams: options.beams,
            min_new_tokens: 0,
        },
        segments: options.segments,
        ffmpeg: options.ffmpeg.clone(),
        decode_threads,
        // Local files: a few reads at once keep the decoders fed.
        fetch_concurrency: decode_threads.clamp(2, 16),
        max_in_memory_bytes: 64 << 20,
        transient_retry: Duration::from_secs(60),
        progress: ProgressMode::Off,
        progress_interval: Duration::from_secs(30),
    };
    let plan = ListPlan {
        inputs: Inputs::Given(caption_inputs(&options.inputs)),
        shard: ShardSpec { index: 0, count: 1 },
        committed: None,
        spill_dir: std::env::temp_dir(),
        limit: None,
        base_row: wiring::base_row(&model, &wiring::new_run_id()),
    };
    let runtime = wiring::runtime(decode_threads).context("starting the runtime")?;
    let ran = runtime
        .block_on(wiring::run_stages(
            model,
            &settings,
            plan,
            RowTarget::File(Box::new(writer)),
            // No signal watch: an interrupted caption job leaves no file behind.
            Arc::new(AtomicBool::new(false)),
        ))?
        .context("writing the captions")?;
    ran.listing.context("listing the inputs")?;
    if ran.model_panicked {
        anyhow::bail!("the model thread panicked");
    }
    if ran.model_faults.gave_up() {
        anyhow::bail!(
            "the model kept failing (last error: {}); no file written",
            ran.model_faults.last_error().unwrap_or_default()
        );
    }
    if ran.faults.any_given_up() {
        anyhow::bail!(
            "reading inputs kept failing (last error: {}); no file written",
            ran.faults.last_error().unwrap_or_default()
        );
    }
    let RowTarget::File(writer) = ran.target else {
        unreachable!("a caption job's target is its file");
    };
    let path = writer.finish()?;
    let get = RunCounters::get;
    let counters = &ran.counters;
    let rows = get(&counters.rows);
    let captions = get(&counters.captions);
    Ok(CaptionSummary {
        inputs: get(&counters.queued),
        segments: rows,
        captions,
        failed_segments: rows - captions,
        audio_seconds: get(&counters.audio_ms) as f64 / 1000.0,
        wall_seconds: started.elapsed().as_secs_f64(),
        path,
    })
}
