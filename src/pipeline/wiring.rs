//! The stage graph both intakes run: `list → fetch → decode → batch → model → sink`
//! for one loaded model, one listing and one row target. `audiocap run` ([`super::run`])
//! wraps it with shards, resume and a dataset; `audiocap caption`
//! ([`super::caption`]) with local files and one Parquet file.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::config::{BatchingSection, ProgressMode};
use super::progress;
use crate::audio::fbank::Fbank;
use crate::audio::segment::SegmentConfig;
use crate::config::DeviceSpec;
use crate::engine::generate::GenerationParams;
use crate::engine::model::OnnxModel;
use crate::output::CaptionRow;
use crate::retry::TransientRetry;
use crate::stages::fetch::{FetchContext, TransientFaults};
use crate::stages::list::ListPlan;
use crate::stages::model::{DecoderMode, ModelClocks, ModelThread, Recovery};
use crate::stages::recover::ModelFaults;
use crate::stages::sink::{RowTarget, SinkError, SinkOutcome};
use crate::stages::{self, BusyClock, RunCounters};
use crate::storage::{SpoolOptions, StorageError};

/// How the stages are sized and what the model generates.
#[derive(Debug, Clone)]
pub struct StageSettings {
    pub batching: BatchingSection,
    pub params: GenerationParams,
    pub segments: SegmentConfig,
    /// The fallback decoder for what no native decoder reads.
    pub ffmpeg: crate::audio::ffmpeg::FfmpegOptions,
    /// Threads decoding, resampling and computing fbanks.
    pub decode_threads: usize,
    /// Objects fetched at once.
    pub fetch_concurrency: usize,
    /// Objects up to this size are fetched into memory, larger ones spooled.
    pub max_in_memory_bytes: u64,
    /// How long a transiently failing fetch, or a failing model, is retried before
    /// the run gives up.
    pub transient_retry: Duration,
    pub progress: ProgressMode,
    pub progress_interval: Duration,
}

/// What a run of the stages left: the target to finish and what happened.
pub struct StagesRun {
    pub target: RowTarget,
    pub outcome: SinkOutcome,
    /// How the listing ended (`Err`: it failed as a whole).
    pub listing: Result<(), StorageError>,
    pub model_panicked: bool,
    pub counters: Arc<RunCounters>,
    /// Inputs whose fetch kept failing.
    pub faults: Arc<TransientFaults>,
    /// A model that kept failing.
    pub model_faults: Arc<ModelFaults>,
    pub mode: DecoderMode,
    pub busy: StagesBusy,
}

/// Busy clocks of the stages, for the summary.
pub struct StagesBusy {
    pub fetch: Arc<BusyClock>,
    pub decode: Arc<BusyClock>,
    pub model: ModelClocks,
    pub sink: Arc<BusyClock>,
}

/// A run id: time and process, unique enough to tell runs apart in one dataset.
pub fn new_run_id() -> String {
    format!("{:x}-{:x}", crate::output::now_us(), std::process::id())
}

/// The fields every row of a run shares: the model and the run id.
pub fn base_row(model: &OnnxModel, run_id: &str) -> CaptionRow {
    CaptionRow {
        model: model.identity.clone(),
        run_id: run_id.to_string(),
        ..Default::default()
    }
}

/// Runs the stages until the listing ends (or `stop` is set) and every stage has
/// drained. Inputs that fail are rows; `Err` is a target that could not be written.
pub async fn run_stages(
    model: OnnxModel,
    settings: &StageSettings,
    plan: ListPlan,
    target: RowTarget,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Result<StagesRun, SinkError>> {
    let started = Instant::now();
    let counters = Arc::new(RunCounters::default());
    let busy = StagesBusy {
        fetch: Arc::new(BusyClock::default()),
        decode: Arc::new(BusyClock::default()),
        model: ModelClocks::default(),
        sink: Arc::new(BusyClock::default()),
    };
    let batching = &settings.batching;
    let batch_size = batching.batch_size;
    let (input_tx, input_rx) = async_channel::bounded(settings.fetch_concurrency * 2);
    let (fetched_tx, fetched_rx) = async_channel::bounded(settings.decode_threads.max(2));
    let (segment_tx, segment_rx) = async_channel::bounded(batch_size * 2);
    let (batch_tx, batch_rx) = async_channel::bounded(batching.max_inflight_batches);
    let (sink_tx, sink_rx) = async_channel::bounded(1024);

    let decode_context = Arc::new(stages::decode::DecodeContext {
        fbank: Fbank::new(model.manifest.front_end.clone())
            .context("the model's front-end settings")?,
        segments: settings.segments,
        min_frames: model.manifest.encoder.min_frames,
        base_row: plan.base_row.clone(),
        ffmpeg: settings.ffmpeg.clone(),
    });

    // Stages, last to first, so each one's input exists before its producer starts.
    // The sink runs on this task, not a spawned one: the dataset writer's upload
    // state is not `Sync`, and one task is all it needs.
    let sink = stages::sink::run(sink_rx, target, counters.clone(), busy.sink.clone());
    let model_idle = Arc::new(AtomicBool::new(true));
    // The encoder on a thread of its own where its work can overlap the decoder's
    // (a GPU); on the CPU both would share the same cores.
    let encoder_thread = batching
        .encoder_thread
        .unwrap_or(matches!(model.device(), DeviceSpec::Cuda(_)));
    let mode = DecoderMode::for_model(
        &model,
        &settings.params,
        batching.decoder_rows.unwrap_or(batch_size),
        encoder_thread,
    );
    if batching.encoder_thread == Some(true) && mode == DecoderMode::FixedBatches {
        tracing::warn!(
            "batching.encoder_thread needs continuous batching (an export with fused \
             attention, beams = 1): the encoder runs on the model thread"
        );
    }
    tracing::info!(?mode, attention = ?model.attention(), "decoder");
    let model_faults = Arc::new(ModelFaults::default());
    let thread = ModelThread {
        params: settings.params.clone(),
        mode,
        idle: model_idle.clone(),
        clocks: busy.model.clone(),
        recovery: Recovery {
            retry: TransientRetry::with_budget(settings.transient_retry),
            faults: model_faults.clone(),
            stop: stop.clone(),
        },
    };
    let model_thread = stages::model::spawn(model, thread, batch_rx, sink_tx.clone())
        .context("starting the model thread")?;
    let batcher = tokio::spawn(stages::batch::run(
        segment_rx,
        batch_tx,
        stages::batch::BatchPolicy {
            batch_size,
            pool_batches: batching.sort_pool_batches,
        },
        model_idle,
    ));
    let mut decoders = Vec::new();
    for _ in 0..settings.decode_threads {
        decoders.push(tokio::spawn(stages::decode::run(
            fetched_rx.clone(),
            segment_tx.clone(),
            sink_tx.clone(),
            decode_context.clone(),
            busy.decode.clone(),
        )));
    }
    drop((fetched_rx, segment_tx));
    let faults = Arc::new(TransientFaults::default());
    let fetch_context = Arc::new(FetchContext {
        spool: SpoolOptions {
            memory_limit: settings.max_in_memory_bytes,
            dir: None,
        },
        counters: counters.clone(),
        busy: busy.fetch.clone(),
        retry: TransientRetry::with_budget(settings.transient_retry),
        faults: faults.clone(),
        stop: stop.clone(),
    });
    let mut fetchers = Vec::new();
    for _ in 0..settings.fetch_concurrency {
        fetchers.push(tokio::spawn(stages::fetch::run(
            input_rx.clone(),
            fetched_tx.clone(),
            fetch_context.clone(),
        )));
    }
    drop((input_rx, fetched_tx));

    let (progress_done, progress_rx) = tokio::sync::oneshot::channel();
    let progress = tokio::spawn(progress::report(
        counters.clone(),
        settings.progress,
        settings.progress_interval,
        started,
        progress_rx,
    ));

    let list_and_drain = async {
        let listed =
            stages::list::run(plan, input_tx, sink_tx, counters.clone(), stop.clone()).await;
        // The listing has ended (or failed): the stages drain in order.
        for f in fetchers {
            let _ = f.await;
        }
        for d in decoders {
            let _ = d.await;
        }
        let _ = batcher.await;
        let model_panicked = tokio::task::spawn_blocking(move || model_thread.join().is_err())
            .await
            .unwrap_or(true);
        (listed, model_panicked)
    };
    let ((listing, model_panicked), sink_result) = tokio::join!(list_and_drain, sink);
    let _ = progress_done.send(());
    let _ = progress.await;
    Ok(sink_result.map(|(target, outcome)| StagesRun {
        target,
        outcome,
        listing,
        model_panicked,
        counters,
        faults,
        model_faults,
        mode,
        busy,
    }))
}

/// The decode threads a setting asks for (unset: every core).
pub fn decode_threads(setting: Option<usize>) -> usize {
    setting.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// The async runtime the stages run on: two I/O threads and a blocking pool for
/// the decoders.
pub fn runtime(decode_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(decode_threads + 8)
        .thread_name("audiocap-io")
        .enable_all()
        .build()
}
