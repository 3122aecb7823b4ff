//! `audiocap caption`: files or folders captioned with an exported model on ONNX
//! Runtime into one Parquet table.

use std::path::PathBuf;

use anyhow::Context;
use audiocap::audio::segment::SegmentConfig;
use audiocap::config::DeviceSpec;
use audiocap::engine::captioner::{CaptionJobOptions, caption_files, collect_inputs, new_run_id};
use audiocap::engine::generate::GenerationParams;
use audiocap::engine::model::{EngineOptions, OnnxModel};
use audiocap::output::CaptionFileWriter;

use super::exit::Exit;

#[derive(clap::Args)]
pub struct CaptionArgs {
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

pub fn run(args: CaptionArgs) -> anyhow::Result<Exit> {
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
        return Ok(Exit::InvalidConfig);
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
        Exit::SomeInputsFailed
    } else {
        Exit::Ok
    })
}
