//! The `audiocap` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use audiocap::audio::decode::decode_file;
use audiocap::audio::segment::SegmentConfig;
use audiocap::caption::Captioner;
use audiocap::engine::captioner::{CaptionJobOptions, caption_files, collect_inputs, new_run_id};
use audiocap::engine::generate::GenerationParams;
use audiocap::engine::model::{EngineOptions, OnnxModel};
use audiocap::engine::runtime::DeviceSpec;
use audiocap::export::{ExportOptions, export_model};
use audiocap::manifest::{Attention, ExportDtype};
use audiocap::model::projector::Pooling;
use audiocap::model::sources::ModelSources;
use audiocap::output::CaptionFileWriter;
use candle_core::Device;
use clap::{Parser, Subcommand};

/// Exit codes a scheduler can act on.
mod exit {
    /// Every input captioned.
    pub const OK: u8 = 0;
    /// The run finished but some inputs failed (each has an error row).
    pub const SOME_INPUTS_FAILED: u8 = 3;
    /// Fatal: the model could not be loaded or the run could not proceed.
    pub const FATAL: u8 = 1;
    /// Invalid arguments or configuration (also clap's code for usage errors).
    pub const INVALID_CONFIG: u8 = 2;
}

#[derive(Parser)]
#[command(
    name = "audiocap",
    version,
    about = "Natural-language captions for audio archives"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline file (see pipelines/): list audio on disk or object storage,
    /// decode, segment, caption on ONNX Runtime and write a Parquet dataset, resuming
    /// where an earlier run of the same pipeline stopped.
    Run(RunArgs),
    /// Caption audio files or folders with an exported model on ONNX Runtime and
    /// write a Parquet table (uri, segment, caption, score, error, ...).
    Caption(CaptionArgs),
    /// Score captions against references with the DCASE metrics (BLEU-1..4, ROUGE-L,
    /// CIDEr-D): predictions from `audiocap caption` Parquet or CSV, references in the
    /// Clotho, AudioCaps or a generic layout.
    Eval(audiocap::eval::command::EvalArgs),
    /// Throughput benchmark: builds (or reuses) a preset model with random weights,
    /// exports it and measures the front end, encoder, prefill, decode and end to end.
    Bench(audiocap::bench::BenchOptions),
    /// Report which ONNX Runtime library is used, how it was found, its version and
    /// execution providers, and the GPUs the driver shows.
    Doctor,
    /// Export a model (BEATs + projector + Llama with merged LoRA adapters) to an
    /// ONNX model directory that `audiocap caption` and `audiocap run` execute.
    Export(ExportArgs),
    /// Caption audio files with the candle reference implementation, straight from
    /// the checkpoints (BEATs, Llama directory, projector, PEFT adapters). Prints one
    /// JSON object per file. Use it to check checkpoints before exporting them.
    ReferenceCaption(ReferenceCaptionArgs),
    /// Merge PEFT LoRA adapters by concatenation (PEFT's `cat` combination): rank Σr,
    /// lora_alpha = Σr, ΔW = Σ wᵢ·(αᵢ/rᵢ)·BᵢAᵢ. The output is a PEFT adapter directory
    /// that Python PEFT and `audiocap export --adapter` both read.
    Merge(MergeArgs),
    /// Train the projector and LoRA adapters on the frozen encoder and decoder (the
    /// paper's recipe: stages, AdamW, warm-up + cosine, merged runs) from a training
    /// file (see pipelines/train-*.toml). Writes OUTPUT/final/{projector.safetensors,
    /// adapter/} for `audiocap export`.
    Train(TrainArgs),
    /// Build (or check) the captioning corpus of the bundled model: freely licensed
    /// Debian sound packages, espeak-ng speech and synthetic signals, captioned by
    /// the rules in corpus/ and split into train / validation / test.
    #[command(subcommand)]
    Corpus(CorpusCommand),
    /// Train the parts the captioner keeps frozen, from scratch: `decoder` (a small
    /// Llama-architecture language model on caption text, with its own BPE
    /// tokenizer, written as a Hugging Face Llama directory) and `encoder` (a
    /// BEATs-architecture multi-label tagger, written as a BEATs checkpoint).
    #[command(subcommand)]
    Pretrain(PretrainCommand),
    /// Where every shard of a dataset stands (committed, in progress, missing; rows,
    /// error rows, size). Exit code 0: all committed; 4: not yet; 2: the shards do
    /// not make one dataset.
    Status(audiocap::dataset::command::DatasetArgs),
    /// The dataset-level commit: checks that all shards committed with one model and
    /// one pipeline, then writes _manifest.json (parts, rows, SHA-256) and _SUCCESS
    /// last. Idempotent. Exit code 0: finalized; 4: shards not committed yet; 2:
    /// inconsistent shards.
    Finalize(audiocap::dataset::command::DatasetArgs),
}

#[derive(clap::Subcommand)]
enum PretrainCommand {
    /// A small Llama decoder and its byte-level BPE tokenizer trained as a language
    /// model on the captions of a table (Clotho, AudioCaps or generic layout), in the
    /// captioner's prompt. Writes OUT/{config.json, generation_config.json,
    /// model.safetensors, tokenizer.json, pretrain.json}.
    Decoder(PretrainDecoderArgs),
    /// A BEATs-architecture encoder trained from scratch as a multi-label tagger on a
    /// manifest with `file_name` and `labels` (`;`-separated) columns, as `audiocap
    /// corpus build` writes. Writes OUT/{encoder.safetensors, encoder.json (the BEATs
    /// cfg), labels.json, pretrain.json}.
    Encoder(PretrainEncoderArgs),
}

#[derive(clap::Args)]
struct PretrainEncoderArgs {
    /// Training manifest (CSV or Parquet with `file_name` and `labels`).
    #[arg(long)]
    manifest: PathBuf,
    /// Folder with the manifest's audio files.
    #[arg(long)]
    audio: PathBuf,
    /// Validation manifest and its audio folder, scored after every epoch.
    #[arg(long, requires = "validation_audio")]
    validation: Option<PathBuf>,
    #[arg(long)]
    validation_audio: Option<PathBuf>,
    /// Labels on fewer training clips than this are left out of the vocabulary.
    #[arg(long, default_value_t = 3)]
    min_clips_per_label: usize,
    #[command(flatten)]
    common: PretrainCommonArgs,
}

#[derive(clap::Args)]
struct PretrainDecoderArgs {
    /// Training captions (CSV or Parquet; every caption column is used, and the
    /// `labels` column with `audio_slot = "labels"`).
    #[arg(long)]
    captions: PathBuf,
    /// Validation captions, scored after every epoch.
    #[arg(long)]
    validation: Option<PathBuf>,
    #[command(flatten)]
    common: PretrainCommonArgs,
}

/// What both `pretrain` commands take.
#[derive(clap::Args)]
struct PretrainCommonArgs {
    /// Shape and training settings (TOML: the keys of pipelines/pretrain-*-default.toml);
    /// unset keys keep their defaults.
    #[arg(long)]
    settings: Option<PathBuf>,
    /// Override a setting (`batch_size=16`), with or without --settings; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Output directory (replaced when it exists).
    #[arg(long)]
    out: PathBuf,
    /// Print the settings with every default filled in; train nothing.
    #[arg(long)]
    check: bool,
}

#[derive(clap::Subcommand)]
enum CorpusCommand {
    /// Fetch the pinned packages, cut and caption the clips, write OUT/{train,
    /// validation,test}.csv, OUT/audio/<split>/*.wav, labels.txt and corpus.json.
    Build(CorpusBuildArgs),
    /// Validate the corpus definition (every problem listed); build nothing.
    Check {
        /// The corpus definition folder.
        #[arg(long, default_value = "corpus")]
        catalog: PathBuf,
    },
}

#[derive(clap::Args)]
struct CorpusBuildArgs {
    /// The corpus definition folder (corpus.toml, sounds/, test-split.txt).
    #[arg(long, default_value = "corpus")]
    catalog: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// A folder of already downloaded .deb files, searched before `apt-get download`.
    #[arg(long)]
    debs: Option<PathBuf>,
    /// Downloaded and unpacked packages, reused by later builds (default:
    /// ${AUDIOCAP_HOME:-~/.local/share/audiocap}/corpus-cache).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Build only these parts (source ids, speech, synthetic, mixtures), comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Replace OUT if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Write the catalog's fixed test list from this build's split.
    #[arg(long)]
    write_test_split: bool,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Training file (TOML), e.g. pipelines/train-recipe.toml.
    config: PathBuf,
    /// Override one key: --set training.batch_size=4 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in model.output from its checkpoints.
    #[arg(long)]
    resume: bool,
    /// End after this many optimiser steps with a checkpoint (exit 0, nothing
    /// final written); `--resume` continues. For jobs with a time limit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    stop_after_steps: Option<u64>,
    /// Validate the file and print it with every default filled in; train nothing.
    #[arg(long)]
    check: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Pipeline file (TOML), e.g. pipelines/demo.toml.
    pipeline: PathBuf,
    /// Override one key for this run: --set batching.batch_size=32 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// This process's shard, 0-based (default: from JOB_COMPLETION_INDEX,
    /// AWS_BATCH_JOB_ARRAY_INDEX or SLURM_ARRAY_TASK_ID, else 0).
    #[arg(long)]
    shard_index: Option<u32>,
    /// Number of shards (default: from AWS_BATCH_JOB_ARRAY_SIZE or
    /// SLURM_ARRAY_TASK_COUNT, else 1).
    #[arg(long)]
    shard_count: Option<u32>,
    /// Run id recorded in every row and part name (default: time and process id).
    #[arg(long)]
    run_id: Option<String>,
    /// Validate the pipeline and print it with every default filled in; run nothing.
    #[arg(long)]
    check: bool,
}

#[derive(clap::Args)]
struct CaptionArgs {
    /// Exported model directory (from `audiocap export`).
    #[arg(long)]
    model: PathBuf,
    /// Where the model runs: cpu, cuda or cuda:N. CUDA never falls back to the CPU.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Segments per encoder/decoder batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Beam search width; 1 is greedy decoding.
    #[arg(long, default_value_t = 1)]
    beams: usize,
    /// Cap on generated tokens per caption (default: the model's manifest).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Threads decoding and computing fbanks (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Threads inside each ONNX operator (default: ONNX Runtime's choice).
    #[arg(long)]
    intra_threads: Option<usize>,
    /// Skip checking the model files' SHA-256 against model.json (as a pipeline's
    /// `model.verify = false`).
    #[arg(long)]
    no_verify: bool,
    /// Recordings longer than this many seconds are cut into windows.
    #[arg(long, default_value_t = 30.0)]
    max_seconds: f64,
    /// Window length for long recordings, in seconds.
    #[arg(long, default_value_t = 10.0)]
    window_seconds: f64,
    /// Distance between window starts, in seconds.
    #[arg(long, default_value_t = 10.0)]
    hop_seconds: f64,
    /// Output Parquet file.
    #[arg(long)]
    out: PathBuf,
    /// Audio files or folders (walked recursively for audio files).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

/// The checkpoints a model is assembled from.
#[derive(clap::Args)]
struct CheckpointArgs {
    /// BEATs checkpoint (.pt as released, or .safetensors with its cfg beside it).
    #[arg(long)]
    beats: PathBuf,
    /// Hugging Face Llama directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    llm: PathBuf,
    /// Projector safetensors (keys 0.weight, 0.bias, 2.weight, 2.bias).
    #[arg(long)]
    projector: PathBuf,
    /// PEFT LoRA adapter directory; repeat to merge several with PEFT's `cat`.
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// Comma-separated weights for the adapters (default 1/K each).
    #[arg(long, value_delimiter = ',')]
    adapter_weights: Option<Vec<f64>>,
    /// Prompt template containing <|audio|> once (default: the Llama 3 chat template
    /// around "Describe the following audio clip <|audio|>").
    #[arg(long)]
    prompt_template: Option<String>,
}

impl CheckpointArgs {
    fn into_sources(self) -> anyhow::Result<ModelSources> {
        if let Some(w) = &self.adapter_weights
            && w.len() != self.adapters.len()
        {
            bail!(
                "{} --adapter-weights for {} --adapter directories",
                w.len(),
                self.adapters.len()
            );
        }
        Ok(ModelSources {
            beats: self.beats,
            llm: self.llm,
            projector: self.projector,
            adapters: self.adapters,
            adapter_weights: self.adapter_weights,
            prompt_template: self.prompt_template,
            pooling: Pooling::Mean,
        })
    }
}

#[derive(clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    model: CheckpointArgs,
    /// Precision of the exported weights: f32, or f16 for GPUs.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ExportDtype,
    /// Attention: `fused` (ONNX Runtime's contrib operators: GroupQueryAttention in
    /// the decoder, cache updated in place, rows of different lengths: continuous
    /// batching, CUDA needs f16; MultiHeadAttention in the encoder) or `eager` (plain
    /// ONNX operators). Default: fused for f16, eager for f32.
    #[arg(long, value_enum)]
    attention: Option<Attention>,
    /// Model name recorded in the manifest and in every output row.
    #[arg(long)]
    name: String,
    /// Output directory (e.g. exported_models/NAME).
    #[arg(long)]
    out: PathBuf,
    /// Replace the output directory if it exists.
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors);
    /// repeat for each adapter.
    #[arg(long = "adapter", required = true)]
    adapters: Vec<PathBuf>,
    /// Comma-separated weights, one per adapter (default 1/K each).
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f64>>,
    /// Output adapter directory.
    #[arg(long)]
    out: PathBuf,
    /// Replace the output directory if it exists.
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct ReferenceCaptionArgs {
    #[command(flatten)]
    model: CheckpointArgs,
    /// Maximum number of generated tokens per caption.
    #[arg(long, default_value_t = 30)]
    max_new_tokens: usize,
    /// Audio files to caption.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(options) => audiocap::bench::run_bench(&options).map(|report| {
            println!("{report}");
            exit::OK
        }),
        Command::Caption(args) => caption(args),
        Command::Run(args) => return run(args),
        Command::Eval(args) => audiocap::eval::command::run_eval(&args).map(|outcome| {
            print!("{}", outcome.report());
            exit::OK
        }),
        Command::Doctor => {
            println!("{}", audiocap::engine::runtime::doctor_report());
            Ok(exit::OK)
        }
        Command::Export(args) => export(args),
        Command::ReferenceCaption(args) => reference_caption(args),
        Command::Merge(args) => merge(args),
        Command::Train(args) => train(args),
        Command::Corpus(command) => corpus(command),
        Command::Pretrain(PretrainCommand::Decoder(args)) => pretrain_decoder(args),
        Command::Pretrain(PretrainCommand::Encoder(args)) => pretrain_encoder(args),
        Command::Status(args) => audiocap::dataset::command::status_command(&args),
        Command::Finalize(args) => audiocap::dataset::command::finalize_command(&args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit::FATAL)
        }
    }
}

/// `audiocap run`: its own exit-code mapping (invalid configuration, fatal, some
/// inputs failed) and its own logging setup.
fn run(args: RunArgs) -> ExitCode {
    use audiocap::pipeline::{PipelineConfig, RunError, RunRequest, run_pipeline};
    let mut overrides = args.set.clone();
    if let Some(i) = args.shard_index {
        overrides.push(format!("run.shard_index={i}"));
    }
    if let Some(n) = args.shard_count {
        overrides.push(format!("run.shard_count={n}"));
    }
    let config = match PipelineConfig::load(&args.pipeline, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::INVALID_CONFIG);
        }
    };
    if args.check {
        // The model is part of what a check can see before any work starts.
        if let Err(e) =
            audiocap::manifest::ModelManifest::read(std::path::Path::new(&config.model.path))
        {
            eprintln!("error: {}: model.path: {e}", args.pipeline.display());
            return ExitCode::from(exit::INVALID_CONFIG);
        }
        println!("{}", config.to_toml());
        eprintln!("{}: valid", args.pipeline.display());
        return ExitCode::from(exit::OK);
    }
    init_logging(&config.logging);
    let threshold = config.run.max_failed_fraction;
    let request = RunRequest {
        pipeline_file: args.pipeline.display().to_string(),
        run_id: args.run_id,
    };
    match run_pipeline(config, request) {
        Ok(summary) => {
            println!("{}", summary.render());
            let fraction = summary.failed_fraction();
            if summary.inputs.failed > 0 && fraction > threshold {
                eprintln!(
                    "{} of {} inputs failed ({:.2}% > run.max_failed_fraction {:.2}%): exit code {}",
                    summary.inputs.failed,
                    summary.inputs.written,
                    fraction * 100.0,
                    threshold * 100.0,
                    exit::SOME_INPUTS_FAILED
                );
                ExitCode::from(exit::SOME_INPUTS_FAILED)
            } else {
                ExitCode::from(exit::OK)
            }
        }
        Err(RunError::Config(e)) => {
            eprintln!("error: invalid configuration: {e:#}");
            ExitCode::from(exit::INVALID_CONFIG)
        }
        Err(RunError::Fatal(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::FATAL)
        }
    }
}

/// `tracing` to stderr: text or JSON lines, level from the pipeline unless
/// `RUST_LOG` is set.
fn init_logging(logging: &audiocap::pipeline::config::LoggingSection) {
    use audiocap::pipeline::config::LogFormat;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&logging.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match logging.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn caption(args: CaptionArgs) -> anyhow::Result<u8> {
    let segments = SegmentConfig {
        max_seconds: args.max_seconds,
        window_seconds: args.window_seconds,
        hop_seconds: args.hop_seconds,
        ..SegmentConfig::default()
    };
    let mut problems = segments.validate().err().unwrap_or_default();
    if args.batch_size == 0 {
        problems.push("--batch-size must be at least 1".into());
    }
    if args.beams == 0 {
        problems.push("--beams must be at least 1".into());
    }
    if args.max_new_tokens == Some(0) {
        problems.push("--max-new-tokens must be at least 1".into());
    }
    if !problems.is_empty() {
        eprintln!("error: invalid arguments:\n  - {}", problems.join("\n  - "));
        return Ok(exit::INVALID_CONFIG);
    }
    let options = EngineOptions {
        device: args.device,
        intra_threads: args.intra_threads,
        profile_prefix: None,
    };
    if !args.no_verify {
        audiocap::manifest::ModelManifest::verify_dir(&args.model)
            .with_context(|| format!("verifying {}", args.model.display()))?;
    }
    let mut model = OnnxModel::load(&args.model, &options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let files = collect_inputs(&args.inputs);
    let job = CaptionJobOptions {
        batch_size: args.batch_size,
        params: GenerationParams {
            max_new_tokens: args
                .max_new_tokens
                .unwrap_or(model.manifest.generation.max_new_tokens),
            beams: args.beams,
            min_new_tokens: 0,
        },
        segments,
        prep_threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
    };
    let manifest_json = serde_json::to_string(&model.manifest)?;
    let metadata = vec![
        ("audiocap.model".to_string(), model.identity.clone()),
        ("audiocap.model_manifest".to_string(), manifest_json),
        (
            "audiocap.command".to_string(),
            std::env::args().collect::<Vec<_>>().join(" "),
        ),
    ];
    let mut writer = CaptionFileWriter::create(&args.out, metadata)?;
    let run_id = new_run_id();
    let summary = caption_files(&mut model, &files, &job, &run_id, &mut |rows| {
        Ok(writer.write(rows)?)
    })?;
    let path = writer.finish()?;
    eprintln!(
        "{} inputs, {} segments: {} captioned, {} failed; {:.1} s of audio in {:.1} s ({:.1} captions/s) -> {}",
        summary.inputs,
        summary.segments,
        summary.captions,
        summary.failed_segments,
        summary.audio_seconds,
        summary.wall_seconds,
        summary.captions as f64 / summary.wall_seconds.max(1e-9),
        path.display()
    );
    Ok(if summary.failed_segments > 0 {
        exit::SOME_INPUTS_FAILED
    } else {
        exit::OK
    })
}

fn export(args: ExportArgs) -> anyhow::Result<u8> {
    let options = ExportOptions {
        sources: args.model.into_sources()?,
        dtype: args.dtype,
        attention: args.attention.unwrap_or(Attention::default_for(args.dtype)),
        name: args.name,
        out: args.out,
        overwrite: args.overwrite,
    };
    let manifest = export_model(&options).context("exporting the model")?;
    eprintln!(
        "exported {} to {} ({:?}, {:?} attention; encoder {} bytes, decoder {} bytes{})",
        manifest.name,
        options.out.display(),
        manifest.onnx.dtype,
        manifest.onnx.attention,
        manifest.onnx.audio_encoder.file.bytes,
        manifest.onnx.decoder.file.bytes,
        if manifest.onnx.decoder.external_data.is_empty() {
            ""
        } else {
            " + external data"
        }
    );
    Ok(exit::OK)
}

fn train(args: TrainArgs) -> anyhow::Result<u8> {
    use audiocap::train::config::TrainConfig;
    use audiocap::train::run::{TrainOptions, TrainOutcome, train};
    use std::io::IsTerminal;
    let config = match TrainConfig::load(&args.config, &args.set) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(exit::INVALID_CONFIG);
        }
    };
    if args.check {
        println!("{}", config.to_toml());
        eprintln!("{}: valid", args.config.display());
        return Ok(exit::OK);
    }
    let options = TrainOptions {
        resume: args.resume,
        progress_bar: std::io::stderr().is_terminal(),
        stop_after_steps: args.stop_after_steps,
    };
    let summary = match train(&config, &options)? {
        TrainOutcome::Finished(summary) => summary,
        TrainOutcome::Stopped(at) => {
            println!(
                "stopped after {} steps: stage {} seed {} at step {} of {}, checkpoint written; \
                 the same command with --resume continues",
                at.steps_this_session, at.stage, at.seed, at.steps, at.total_steps
            );
            return Ok(exit::OK);
        }
    };
    for run in &summary.runs {
        println!(
            "stage {} seed {}: {} steps, loss {} → {}{}, {:.0} tokens/s",
            run.stage,
            run.seed,
            run.steps,
            run.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
            run.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
            run.best.as_ref().map_or(String::new(), |b| format!(
                ", best epoch {} (validation loss {:.4}, CIDEr-D {})",
                b.epoch,
                b.loss,
                b.cider_d.map_or("-".into(), |c| format!("{c:.3}"))
            )),
            run.tokens_per_second
        );
    }
    if !summary.skipped.is_empty() {
        println!("{} clips left out (listed above)", summary.skipped.len());
    }
    println!(
        "model: {} + {}\nexport it with: audiocap export --beats {} --llm {} --projector {} --adapter {} --out DIR",
        summary.projector.display(),
        summary.adapter.display(),
        config.model.beats,
        config.model.llm,
        summary.projector.display(),
        summary.adapter.display()
    );
    Ok(exit::OK)
}

fn corpus(command: CorpusCommand) -> anyhow::Result<u8> {
    use audiocap::corpus::{BuildOptions, build, catalog::Catalog};
    let (dir, args) = match command {
        CorpusCommand::Check { catalog } => (catalog, None),
        CorpusCommand::Build(args) => (args.catalog.clone(), Some(args)),
    };
    let catalog = match Catalog::load(&dir) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("error: {} problem(s) in {}:", problems.len(), dir.display());
            for p in problems {
                eprintln!("  - {p}");
            }
            return Ok(exit::INVALID_CONFIG);
        }
    };
    let Some(args) = args else {
        let rules: usize = catalog.rules.values().map(|r| r.rules.len()).sum();
        println!(
            "{}: valid ({} {}, {} sources, {} sound rules)",
            dir.display(),
            catalog.corpus.name,
            catalog.corpus.version,
            catalog.corpus.sources.len(),
            rules
        );
        return Ok(exit::OK);
    };
    // The Ogg demuxer logs every stream it opens, and malformed Vorbis comments,
    // which say nothing about the audio.
    init_logging(&audiocap::pipeline::config::LoggingSection {
        level: "info,symphonia_core=error,symphonia_format_ogg=error,symphonia_metadata=error,symphonia_codec_vorbis=error".to_string(),
        ..Default::default()
    });
    let cache = args.cache.unwrap_or_else(|| {
        std::env::var_os("AUDIOCAP_HOME")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/audiocap"))
            })
            .unwrap_or_else(|| PathBuf::from(".audiocap"))
            .join("corpus-cache")
    });
    let options = BuildOptions {
        out: args.out,
        debs: args.debs,
        cache,
        only: args.only,
        overwrite: args.overwrite,
        write_test_split: args.write_test_split,
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
    };
    let report = build(&catalog, &options)?;
    for split in audiocap::corpus::SPLITS {
        println!(
            "{split:<10} {:>6} clips {:>6} recordings {:>7.2} h",
            report.clips.get(split).copied().unwrap_or(0),
            report.recordings.get(split).copied().unwrap_or(0),
            report.hours.get(split).copied().unwrap_or(0.0)
        );
    }
    println!(
        "{} labels; left out: {} unmatched, {} skipped by rule, {} unusable (see corpus.json)",
        report.labels.len(),
        report.unmatched.values().sum::<usize>(),
        report.skipped_by_rule.values().sum::<usize>(),
        report.left_out.len()
    );
    println!("corpus: {}", options.out.display());
    Ok(exit::OK)
}

/// Pre-training settings as `load` reads them, every problem printed. `Err(code)`
/// ends the command: 2 for bad settings, 0 after `--check` printed them.
fn pretrain_settings<T: serde::Serialize>(
    load: impl FnOnce() -> Result<T, audiocap::config::ConfigErrors>,
    check: bool,
) -> Result<T, u8> {
    let settings = match load() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(exit::INVALID_CONFIG);
        }
    };
    if check {
        println!("{}", toml::to_string(&settings).unwrap_or_default());
        return Err(exit::OK);
    }
    Ok(settings)
}

fn pretrain_encoder(args: PretrainEncoderArgs) -> anyhow::Result<u8> {
    use audiocap::train::tagger::{
        TaggerSettings, TaggingSet, label_vocabulary, load_tagging_set, pretrain_encoder,
    };
    let settings = match pretrain_settings(
        || TaggerSettings::load(args.common.settings.as_deref(), &args.common.set),
        args.common.check,
    ) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    init_logging(&Default::default());
    let labels = label_vocabulary(&args.manifest, args.min_clips_per_label)?;
    let train = load_tagging_set(&args.manifest, &args.audio, &labels, settings.max_seconds)?;
    let validation = match (&args.validation, &args.validation_audio) {
        (Some(m), Some(a)) => load_tagging_set(m, a, &labels, settings.max_seconds)?,
        _ => TaggingSet {
            clips: Vec::new(),
            skipped: Vec::new(),
        },
    };
    for (key, why) in train.skipped.iter().chain(&validation.skipped) {
        eprintln!("left out {key}: {why}");
    }
    let summary = pretrain_encoder(
        &train,
        &validation,
        &labels,
        &settings,
        &args.common.out,
        &candle_core::Device::Cpu,
    )?;
    println!(
        "encoder: {} parameters, {} labels, {} steps over {} clips, loss {:.4} → {:.4}{}, {:.1} clips/s\n{}",
        summary.parameters,
        summary.labels.len(),
        summary.steps,
        summary.train_clips,
        summary.train_loss.first().copied().unwrap_or(f64::NAN),
        summary.train_loss.last().copied().unwrap_or(f64::NAN),
        match (
            summary.validation_top1.last(),
            summary.validation_map.last()
        ) {
            (Some(t), Some(m)) => format!(", validation top-1 {:.1}%, mAP {m:.3}", 100.0 * t),
            _ => String::new(),
        },
        summary.clips_per_second,
        summary.checkpoint.display()
    );
    Ok(exit::OK)
}

fn pretrain_decoder(args: PretrainDecoderArgs) -> anyhow::Result<u8> {
    use anyhow::Context;
    use audiocap::train::lm::{CaptionText, LmSettings, pretrain_decoder};
    let settings = match pretrain_settings(
        || LmSettings::load(args.common.settings.as_deref(), &args.common.set),
        args.common.check,
    ) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let with_labels = settings.audio_slot == audiocap::train::lm::AudioSlot::Labels;
    let read = |path: &PathBuf| -> anyhow::Result<Vec<CaptionText>> {
        let refs = audiocap::eval::files::read_references(path, None)
            .with_context(|| format!("reading captions from {}", path.display()))?;
        let labels = if with_labels {
            audiocap::eval::files::read_labels(path, "labels")
                .with_context(|| format!("reading labels from {}", path.display()))?
        } else {
            Default::default()
        };
        Ok(refs
            .clips
            .into_iter()
            .flat_map(|c| {
                let l = labels.get(&c.key).cloned().unwrap_or_default();
                c.captions.into_iter().map(move |caption| CaptionText {
                    caption,
                    labels: l.clone(),
                })
            })
            .collect())
    };
    let train = read(&args.captions)?;
    let validation = match &args.validation {
        Some(p) => read(p)?,
        None => Vec::new(),
    };
    init_logging(&Default::default());
    let summary = pretrain_decoder(
        &train,
        &validation,
        &settings,
        &args.common.out,
        &candle_core::Device::Cpu,
    )?;
    println!(
        "decoder: {} parameters, vocabulary {}, {} steps over {} captions, loss {:.3} → {:.3}{}, {:.0} tokens/s\n{}",
        summary.parameters,
        summary.vocab_size,
        summary.steps,
        summary.train_examples,
        summary.train_loss.first().copied().unwrap_or(f64::NAN),
        summary.train_loss.last().copied().unwrap_or(f64::NAN),
        summary
            .validation_loss
            .last()
            .map_or(String::new(), |v| format!(", validation {v:.3}")),
        summary.tokens_per_second,
        args.common.out.display()
    );
    Ok(exit::OK)
}

fn merge(args: MergeArgs) -> anyhow::Result<u8> {
    use audiocap::model::lora::PeftAdapter;
    let k = args.adapters.len();
    let weights = args.weights.unwrap_or_else(|| vec![1.0 / k as f64; k]);
    if weights.len() != k {
        eprintln!(
            "error: {} --weights for {k} --adapter directories",
            weights.len()
        );
        return Ok(exit::INVALID_CONFIG);
    }
    if args.out.exists() && !args.overwrite {
        eprintln!(
            "error: {} exists (pass --overwrite to replace it)",
            args.out.display()
        );
        return Ok(exit::INVALID_CONFIG);
    }
    let adapters = args
        .adapters
        .iter()
        .map(|dir| PeftAdapter::load(dir).with_context(|| format!("loading {}", dir.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let merged = PeftAdapter::cat(&adapters, &weights).context("merging the adapters")?;
    // Written beside the target and renamed, so a reader never sees half an adapter.
    let name = args
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let staging = args
        .out
        .with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    merged
        .save(&staging)
        .with_context(|| format!("writing {}", staging.display()))?;
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("replacing {}", args.out.display()))?;
    }
    std::fs::rename(&staging, &args.out)
        .with_context(|| format!("moving the adapter into {}", args.out.display()))?;
    println!(
        "merged {k} adapters (weights {weights:?}) into {}: rank {}",
        args.out.display(),
        merged.config.r
    );
    Ok(exit::OK)
}

fn reference_caption(args: ReferenceCaptionArgs) -> anyhow::Result<u8> {
    let sources = args.model.into_sources()?;
    let captioner = Captioner::load(&sources, &Device::Cpu).context("loading the model")?;
    let mut failed = 0usize;
    for input in &args.inputs {
        let row = match caption_file(&captioner, input, args.max_new_tokens) {
            Ok(caption) => serde_json::json!({
                "uri": input.display().to_string(),
                "caption": caption.text,
                "score": caption.score,
                "token_ids": caption.token_ids,
                "error": null,
            }),
            Err(err) => {
                failed += 1;
                serde_json::json!({
                    "uri": input.display().to_string(),
                    "caption": null,
                    "score": null,
                    "error": format!("{err:#}"),
                })
            }
        };
        println!("{row}");
    }
    Ok(if failed > 0 {
        exit::SOME_INPUTS_FAILED
    } else {
        exit::OK
    })
}

fn caption_file(
    captioner: &Captioner,
    path: &std::path::Path,
    max_new_tokens: usize,
) -> anyhow::Result<audiocap::caption::Caption> {
    let audio = decode_file(path)?;
    if audio.info.sample_rate != captioner.sample_rate() {
        bail!(
            "sample rate {} Hz; reference-caption takes {} Hz audio only: resample it first",
            audio.info.sample_rate,
            captioner.sample_rate()
        );
    }
    Ok(captioner.caption(&audio.samples, max_new_tokens)?)
}
