//! `audiocap caption`: files or folders captioned with an exported model on ONNX
//! Runtime into one Parquet table.

use std::path::PathBuf;

use audiocap::audio::segment::SegmentConfig;
use audiocap::config::DeviceSpec;
use audiocap::engine::model::EngineOptions;
use audiocap::output::{EmbeddingDtype, EmbeddingKind};
use audiocap::pipeline::caption::{CaptionOptions, caption_files};
use audiocap::pipeline::config::ClipColumns;

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
    /// A `tags` column with each segment's K most probable sound-event tags
    /// (default: 5 when the model's encoder is a tagger, else none; 0: none).
    #[arg(long, value_name = "K")]
    tags: Option<usize>,
    /// Tags below this probability are left out.
    #[arg(long, default_value_t = 0.0)]
    min_tag_score: f32,
    /// An `embedding` column: none, encoder (mean encoder output, e.g. 768 values) or
    /// projector (the decoder's audio embedding, e.g. 4096 values).
    #[arg(long, value_enum, default_value = "none")]
    embedding: EmbeddingArg,
    /// How the embedding is stored: f32, or f16 (half the bytes).
    #[arg(long, value_enum, default_value = "f32")]
    embedding_dtype: EmbeddingDtypeArg,
    /// Output Parquet file.
    #[arg(long)]
    out: PathBuf,
    /// The ffmpeg that decodes what no native decoder reads (WMA, AC-3, AMR, ...):
    /// `true` finds it on PATH, `false` turns the fallback off, or its path.
    #[arg(long, default_value = "true", value_parser = audiocap::audio::ffmpeg::FfmpegSetting::from_flag)]
    ffmpeg: audiocap::audio::ffmpeg::FfmpegSetting,
    /// Audio files or folders (walked recursively for audio files).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

/// The values of `--embedding` ([`EmbeddingKind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmbeddingArg {
    None,
    Encoder,
    Projector,
}

/// The values of `--embedding-dtype` ([`EmbeddingDtype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmbeddingDtypeArg {
    F32,
    F16,
}

pub fn run(args: CaptionArgs) -> anyhow::Result<Exit> {
    let options = CaptionOptions {
        model: args.model,
        engine: EngineOptions {
            device: args.device,
            intra_threads: args.intra_threads,
            profile_prefix: None,
        },
        verify: !args.no_verify,
        batch_size: args.batch_size,
        beams: args.beams,
        max_new_tokens: args.max_new_tokens,
        decode_threads: args.threads,
        segments: SegmentConfig {
            max_seconds: args.max_seconds,
            window_seconds: args.window_seconds,
            hop_seconds: args.hop_seconds,
            ..SegmentConfig::default()
        },
        ffmpeg: audiocap::audio::ffmpeg::FfmpegOptions {
            setting: args.ffmpeg,
            ..Default::default()
        },
        clip_columns: ClipColumns {
            tags: args.tags,
            min_tag_score: args.min_tag_score,
            embedding: match args.embedding {
                EmbeddingArg::None => EmbeddingKind::None,
                EmbeddingArg::Encoder => EmbeddingKind::Encoder,
                EmbeddingArg::Projector => EmbeddingKind::Projector,
            },
            embedding_dtype: match args.embedding_dtype {
                EmbeddingDtypeArg::F32 => EmbeddingDtype::F32,
                EmbeddingDtypeArg::F16 => EmbeddingDtype::F16,
            },
        },
        out: args.out,
        inputs: args.inputs,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    if let Err(problems) = options.validate() {
        eprintln!("error: invalid arguments:\n  - {}", problems.join("\n  - "));
        return Ok(Exit::InvalidConfig);
    }
    // Tags and embeddings the model cannot give are a bad argument, not a failed run.
    if let Ok(manifest) = audiocap::manifest::ModelManifest::read(&options.model)
        && let Err(problems) = options.clip_columns.resolve(&manifest, "--")
    {
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        eprintln!("error: invalid arguments:\n  - {}", problems.join("\n  - "));
        return Ok(Exit::InvalidConfig);
    }
    let summary = caption_files(&options)?;
    eprintln!(
        "{} inputs, {} segments: {} captioned, {} failed; {:.1} s of audio in {:.1} s ({:.1} captions/s) -> {}",
        summary.inputs,
        summary.segments,
        summary.captions,
        summary.failed_segments,
        summary.audio_seconds,
        summary.wall_seconds,
        summary.captions as f64 / summary.wall_seconds.max(1e-9),
        summary.path.display()
    );
    Ok(if summary.failed_segments > 0 {
        Exit::SomeInputsFailed
    } else {
        Exit::Ok
    })
}
