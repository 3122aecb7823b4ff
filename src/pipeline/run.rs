//! `audiocap run`: builds the stages from a validated pipeline and runs them to the
//! end of the listing (or a stop signal), then commits and summarises.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;

use super::config::PipelineConfig;
use super::summary::{InputCounts, RunSummary, ShardTotals, StageBusy};
use super::wiring::{self, StageSettings};
use crate::config::DeviceSpec;
use crate::dataset::{
    DatasetWriter, DatasetWriterOptions, StoreKind, committed_inputs, shard_history,
};
use crate::engine::generate::GenerationParams;
use crate::engine::model::{EngineOptions, OnnxModel};
use crate::stages::sink::RowTarget;
use crate::stages::{self, BusyClock, RunCounters};
use crate::storage::{ListOptions, Location, LocationKind, ShardSpec, Source};

/// Why a run could not finish; the binary maps these to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is wrong in a way only visible once resolved (shard
    /// variables, output location).
    #[error("invalid configuration: {0:#}")]
    Config(anyhow::Error),
    /// Anything else that stops the run: model, storage, dataset.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
}

/// What the caller passes besides the config.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// The pipeline file as given, for the summary and the dataset metadata.
    pub pipeline_file: String,
    /// Run id; a fresh one when `None`.
    pub run_id: Option<String>,
}

/// Runs a pipeline to the end. Inputs that fail are rows with errors, not errors
/// here; `Err` means the run itself could not go on.
pub fn run_pipeline(config: PipelineConfig, request: RunRequest) -> Result<RunSummary, RunError> {
    let decode_threads = wiring::decode_threads(config.workers.decode_threads);
    let runtime = wiring::runtime(decode_threads)
        .map_err(|e| RunError::Fatal(anyhow::Error::new(e).context("starting the runtime")))?;
    runtime.block_on(run_async(config, request, decode_threads))
}

async fn run_async(
    config: PipelineConfig,
    request: RunRequest,
    decode_threads: usize,
) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let shard = ShardSpec::resolve(config.run.shard_index, config.run.shard_count, &|k| {
        std::env::var(k).ok()
    })
    .map_err(|e| RunError::Config(anyhow::Error::new(e).context("resolving the shard")))?;
    let run_id = request.run_id.clone().unwrap_or_else(wiring::new_run_id);
    let output = Location::parse(&config.output.uri, &config.storage)
        .map_err(|e| RunError::Config(anyhow::Error::new(e).context("output.uri")))?;
    let store_kind = match &output.kind {
        // Local locations are paths inside a `LocalFileSystem` rooted at `/`.
        LocationKind::Local { .. } => StoreKind::Local {
            root: std::path::PathBuf::from("/"),
        },
        LocationKind::Object { .. } => StoreKind::Object,
    };
    let fatal = |what: &'static str| move |e: anyhow::Error| RunError::Fatal(e.context(what));

    // The model first: nothing is listed or written if it cannot load.
    let device: DeviceSpec = config
        .model
        .device
        .parse()
        .map_err(|e| RunError::Config(anyhow::Error::new(e)))?;
    let model_dir = std::path::PathBuf::from(&config.model.path);
    let engine_options = EngineOptions {
        device,
        intra_threads: config.model.intra_threads,
        profile_prefix: None,
    };
    // The tags and embedding asked for must be ones the model has: a configuration
    // problem, found before the model loads.
    let manifest = crate::manifest::ModelManifest::read(&model_dir).ok();
    let (columns, clip_request) = match &manifest {
        Some(manifest) => config
            .output
            .clip_columns()
            .resolve(manifest, "output.")
            .map_err(|problems| {
                RunError::Config(anyhow::anyhow!(
                    "{}",
                    problems
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            })?,
        // Loading says what is wrong with it.
        None => Default::default(),
    };
    let verify = config.model.verify;
    let model = tokio::task::spawn_blocking(move || {
        if verify {
            let hashed = crate::manifest::ModelManifest::verify_dir(&model_dir)?;
            tracing::info!(
                files_hashed = hashed,
                "model files verified against model.json"
            );
        }
        let mut model = OnnxModel::load(&model_dir, &engine_options)?;
        model
            .request_clip_outputs(clip_request)
            .context("asking the encoder for tags and embeddings")?;
        stages::model::check_model(&mut model).context("the model cannot caption a silent clip")?;
        anyhow::Ok(model)
    })
    .await
    .map_err(|e| RunError::Fatal(anyhow::Error::new(e)))?
    .with_context(|| format!("loading the model {}", config.model.path))
    .map_err(RunError::Fatal)?;
    tracing::info!(model = %model.identity, %device, "model loaded");

    let mut options = DatasetWriterOptions::new(shard.index, shard.count, &run_id);
    options.model = model.identity.clone();
    options.config_digest = config.dataset_digest(shard.count);
    options.columns = columns;
    options.target_part_bytes = config.output.target_part_mb << 20;
    options.max_rows_per_part = config.output.max_rows_per_part as u64;
    options.max_part_age =
        std::time::Duration::from_secs_f64(config.output.commit_interval_seconds);
    options.transient_retry =
        std::time::Duration::from_secs_f64(config.run.transient_retry_seconds);
    options.metadata = vec![
        (
            "audiocap.model_manifest".into(),
            serde_json::to_string(&model.manifest).unwrap_or_default(),
        ),
        ("audiocap.model".into(), model.identity.clone()),
        ("audiocap.pipeline".into(), config.to_toml()),
        (
            "audiocap.pipeline_file".into(),
            request.pipeline_file.clone(),
        ),
        ("audiocap.run_id".into(), run_id.clone()),
        (
            "audiocap.shard".into(),
            format!("{}/{}", shard.index, shard.count),
        ),
    ];
    let mut writer = DatasetWriter::open(
        output.store.clone(),
        output.prefix.clone(),
        store_kind.clone(),
        options,
    )
    .await
    .map_err(|e| match e {
        // Not worth a retry: the settings and the dataset disagree.
        e @ crate::dataset::DatasetError::OtherLayout { .. } => {
            RunError::Config(anyhow::Error::new(e))
        }
        e => {
            RunError::Fatal(anyhow::Error::new(e).context(format!("opening the dataset {output}")))
        }
    })?;
    let spill_dir = std::env::temp_dir();
    // Before resume reads the dataset: inputs taken out here are then not done.
    let retried = if config.run.retry_failed {
        let report = writer
            .supersede_failed()
            .await
            .context("taking failed inputs out of the shard's parts (--retry-failed)")
            .map_err(fatal("retry failed"))?;
        tracing::info!(
            inputs = report.failed_inputs,
            parts = report.parts,
            "failed inputs to caption again"
        );
        Some(report)
    } else {
        None
    };

    let (committed, history) = if config.run.resume {
        let set = committed_inputs(
            output.store.clone(),
            &output.prefix,
            shard.index,
            shard.count,
            &spill_dir,
        )
        .await
        .context("reading the inputs already in the dataset")
        .map_err(fatal("resume"))?;
        tracing::info!(inputs = set.len(), "inputs already in the dataset");
        // What this shard's earlier runs committed: the summary and exit code 3 speak
        // for the shard, not only for this run.
        let history = shard_history(
            output.store.as_ref(),
            &output.prefix,
            shard.index,
            shard.count,
        )
        .await
        .context("reading the shard's committed parts")
        .map_err(fatal("resume"))?;
        (Some(set), Some(history))
    } else {
        (None, None)
    };

    let stop = Arc::new(AtomicBool::new(false));
    spawn_signal_watch(stop.clone());
    let settings = StageSettings {
        batching: config.batching.clone(),
        params: GenerationParams {
            max_new_tokens: config
                .generation
                .max_new_tokens
                .unwrap_or(model.manifest.generation.max_new_tokens),
            beams: config.generation.beams,
            min_new_tokens: config.generation.min_new_tokens,
        },
        segments: config.segments,
        ffmpeg: config.decode.ffmpeg_options(),
        decode_threads,
        fetch_concurrency: config.workers.fetch_concurrency,
        max_in_memory_bytes: config.workers.max_in_memory_mb << 20,
        transient_retry: std::time::Duration::from_secs_f64(config.run.transient_retry_seconds),
        progress: config.logging.progress,
        progress_interval: std::time::Duration::from_secs_f64(config.logging.interval_seconds),
    };
    let model_identity = model.identity.clone();

    let mut sources: Vec<Source> = config
        .input
        .sources
        .iter()
        .cloned()
        .map(Source::Path)
        .collect();
    sources.extend(config.input.manifests.iter().map(|m| Source::Manifest {
        manifest: m.clone(),
        column: config.input.manifest_column.clone(),
    }));
    let plan = stages::list::ListPlan {
        inputs: stages::list::Inputs::Sources {
            sources,
            options: ListOptions {
                include: config.input.include.clone(),
                exclude: config.input.exclude.clone(),
                extensions: config.input.extensions.clone(),
            },
            storage: config.storage.clone(),
        },
        shard,
        committed,
        spill_dir,
        limit: config.run.limit,
        base_row: wiring::base_row(&model, &run_id),
    };
    let ran = wiring::run_stages(
        model,
        &settings,
        plan,
        RowTarget::Dataset(Box::new(writer)),
        stop.clone(),
    )
    .await
    .map_err(RunError::Fatal)?
    .context("writing the dataset")
    .map_err(RunError::Fatal)?;
    let RowTarget::Dataset(writer) = ran.target else {
        unreachable!("the run's target is its dataset");
    };
    let listing = ran
        .listing
        .context("listing the inputs")
        .map_err(RunError::Fatal);
    if ran.model_panicked {
        return Err(RunError::Fatal(anyhow::anyhow!(
            "the model thread panicked; committed parts are kept and the next run resumes"
        )));
    }

    let wall = started.elapsed().as_secs_f64();
    let counters = &ran.counters;
    let get = RunCounters::get;
    let fraction = |clock: &BusyClock, workers: usize| {
        (clock.seconds() / (wall * workers.max(1) as f64)).min(1.0)
    };
    let audio_hours = get(&counters.audio_ms) as f64 / 3.6e6;
    let mut summary = RunSummary {
        run_id: run_id.clone(),
        pipeline: request.pipeline_file.clone(),
        model: model_identity,
        output: output.to_string(),
        shard_index: shard.index,
        shard_count: shard.count,
        inputs: InputCounts {
            listed: get(&counters.listed),
            taken: get(&counters.queued),
            already_done: get(&counters.already_done),
            duplicates: get(&counters.duplicates),
            written: get(&counters.inputs_done),
            failed: get(&counters.inputs_failed),
            skipped_by_extension: counters.skipped_counts(),
        },
        rows: get(&counters.rows),
        captions: get(&counters.captions),
        failed_rows: get(&counters.rows) - get(&counters.captions),
        failed_inputs_by_kind: ran.outcome.failed_inputs,
        failed_segments_by_kind: ran.outcome.failed_segments,
        audio_hours,
        wall_seconds: wall,
        captions_per_second: get(&counters.captions) as f64 / wall.max(1e-9),
        realtime_factor: audio_hours * 3600.0 / wall.max(1e-9),
        stage_busy: StageBusy {
            fetch: fraction(&ran.busy.fetch, config.workers.fetch_concurrency),
            decode: fraction(&ran.busy.decode, decode_threads),
            model: fraction(&ran.busy.model.model, 1),
            encoder: matches!(
                ran.mode,
                stages::model::DecoderMode::Continuous {
                    encoder_thread: true,
                    ..
                }
            )
            .then(|| fraction(&ran.busy.model.encoder, 1)),
            sink: fraction(&ran.busy.sink, 1),
        },
        parts: Vec::new(),
        stopped_early: stop.load(Ordering::Relaxed),
        retried,
        shard: history.map(|h| {
            let mut kinds = h.error_rows_by_kind;
            for (kind, n) in &ran.outcome.error_rows {
                *kinds.entry(kind.clone()).or_default() += n;
            }
            ShardTotals {
                inputs: h.inputs + get(&counters.inputs_done),
                failed_inputs: h.failed_inputs + get(&counters.inputs_failed),
                error_rows: h.error_rows + get(&counters.rows) - get(&counters.captions),
                error_rows_by_kind: kinds,
                unrecorded_parts: h.unrecorded_parts,
            }
        }),
    };
    if let Err(e) = listing {
        // What was written is committed so the next run resumes; the run fails.
        let mut writer = writer;
        let _ = writer.flush().await;
        return Err(e);
    }
    let gave_up = if ran.faults.any_given_up() {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        Some(format!(
            "storage kept failing: {} input(s) given up after {} s of retries and {} \
             not fetched, none of them committed; {} written inputs are committed and the \
             next run takes the rest (last error: {})",
            get(&ran.faults.given_up),
            config.run.transient_retry_seconds,
            get(&ran.faults.left),
            summary.inputs.written,
            ran.faults.last_error().unwrap_or_default()
        ))
    } else if ran.model_faults.gave_up() {
        Some(format!(
            "the model kept failing for {} s (last error: {}): the inputs in flight are \
             not committed; {} written inputs are committed and the next run takes the rest",
            config.run.transient_retry_seconds,
            ran.model_faults.last_error().unwrap_or_default(),
            summary.inputs.written,
        ))
    } else {
        None
    };
    if let Some(why) = gave_up {
        // As for a failed listing: parts are committed, the shard is not (its commit
        // record would call it complete), the run fails and the next one resumes.
        let mut writer = writer;
        writer
            .flush()
            .await
            .context("committing the last part")
            .map_err(RunError::Fatal)?;
        return Err(RunError::Fatal(anyhow::anyhow!(why)));
    }
    let record = serde_json::to_value(&summary).unwrap_or_default();
    let committed = writer
        .finish(record)
        .await
        .context("committing the last part and the shard's commit record")
        .map_err(RunError::Fatal)?;
    summary.parts = committed.parts.iter().map(|p| p.name.clone()).collect();
    Ok(summary)
}

/// SIGINT/SIGTERM (Ctrl-C, Kubernetes eviction, Slurm pre-emption): stop listing,
/// let what is in flight finish and commit. A second signal exits at once (what
/// is committed stays; the next run resumes).
fn spawn_signal_watch(stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let interrupted = async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{SignalKind, signal};
                match (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    (Ok(mut term), Ok(mut int)) => {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = int.recv() => {}
                        }
                    }
                    _ => std::future::pending::<()>().await,
                }
            }
            #[cfg(not(unix))]
            {
                let _ = tokio::signal::ctrl_c().await;
            }
        };
        interrupted.await;
        tracing::warn!("stop requested: finishing the inputs in flight, then committing");
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::signal::ctrl_c().await;
        tracing::warn!("second stop request: exiting now");
        std::process::exit(130);
    });
}
