//! `audiocap bench`: the flags of [`audiocap::bench::BenchOptions`]; the report goes
//! to stdout.

use std::path::PathBuf;

use audiocap::bench::{BenchOptions, BenchPreset, BenchStage, run_bench};
use audiocap::config::DeviceSpec;

use super::exit::Exit;
use super::export::{AttentionArg, DtypeArg};

/// `audiocap bench` options. Options left out take the preset's defaults.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct BenchArgs {
    /// Model to benchmark: fixture (the e2e-tiny fixture), tiny, small (BEATs-base +
    /// ~1B Llama, random weights, for CPUs) or real (BEATs-base + Llama-3-8B shape,
    /// random weights, f16, for GPUs).
    #[arg(long, value_enum, default_value_t = PresetArg::Fixture)]
    preset: PresetArg,
    /// An exported model directory to benchmark instead of a preset (e.g. the bundled
    /// default model in exported_models/); the preset's batch and repetition
    /// defaults still apply.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Precision of the export (default: f32, f16 for the real preset).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Decoder batch sizes for prefill and decode, comma-separated
    /// (default: 1,16; 1,16,64 for the real preset).
    #[arg(long, value_delimiter = ',')]
    batch_sizes: Option<Vec<usize>>,
    /// Clips per encoder call (default: 16 fixture, 2 small, 32 real).
    #[arg(long)]
    encoder_batch: Option<usize>,
    /// Clips per end-to-end batch (default: 16 fixture, 4 small, 64 real).
    #[arg(long)]
    e2e_batch: Option<usize>,
    /// Length of the generated test clips in seconds.
    #[arg(long, default_value_t = BenchOptions::default().clip_seconds)]
    clip_seconds: f64,
    /// Sample rate of the generated test clips in Hz (default: the model's, so the
    /// front end is decode + fbank; e.g. 44100 adds resampling).
    #[arg(long)]
    clip_rate: Option<u32>,
    /// Tokens generated per caption (fixed length: stop ids are ignored).
    #[arg(long, default_value_t = BenchOptions::default().new_tokens)]
    new_tokens: usize,
    /// Timed repetitions per figure (default: 5 fixture, 2 small, 3 real).
    #[arg(long)]
    repetitions: Option<usize>,
    /// Untimed warm-up runs before each figure.
    #[arg(long, default_value_t = BenchOptions::default().warmup)]
    warmup: usize,
    /// Threads inside each ONNX operator (default: ONNX Runtime's, one per core).
    #[arg(long)]
    intra_threads: Option<usize>,
    /// Where synthetic checkpoints, exports and test clips are kept and reused
    /// (default: <temp dir>/audiocap-bench).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The reference fixtures (default: ../shared/fixtures beside the source tree).
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// A Llama 3 tokenizer.json for the synthetic models (default: the fixtures').
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = BenchOptions::default().seed)]
    seed: u64,
    /// The exported decoder's attention (default: fused for f16, eager for f32; see
    /// `audiocap export --attention`).
    #[arg(long, value_enum)]
    attention: Option<AttentionArg>,
    /// Figures to measure, comma-separated (default: all). Fewer make a shorter run,
    /// e.g. one whose GPU kernels are traced (benchmarks/kernel-trace).
    #[arg(long, value_enum, value_delimiter = ',')]
    stages: Option<Vec<StageArg>>,
    /// Rebuild the synthetic checkpoints and the export even if cached ones match.
    #[arg(long)]
    rebuild: bool,
    /// After the figures, record ONNX Runtime's per-node profile of one generation at
    /// the largest batch size into this folder (`benchmarks/ort-profile-summary.py`
    /// sums it up).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

/// The values of `--preset` ([`BenchPreset`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PresetArg {
    /// The `e2e-tiny` fixture captioner (beats-tiny + a 2-layer Llama 3), exported.
    Fixture,
    /// Random weights at the fixture's size (for tests of the benchmark itself).
    Tiny,
    /// BEATs iter3+ (base) and a Llama-3.2-1B-shaped decoder, random weights: the
    /// CPU configuration, with small default batch and repetition counts.
    Small,
    /// BEATs iter3+ and a Llama-3-8B-shaped decoder, random weights, f16: for GPUs.
    Real,
}

impl From<PresetArg> for BenchPreset {
    fn from(arg: PresetArg) -> Self {
        match arg {
            PresetArg::Fixture => BenchPreset::Fixture,
            PresetArg::Tiny => BenchPreset::Tiny,
            PresetArg::Small => BenchPreset::Small,
            PresetArg::Real => BenchPreset::Real,
        }
    }
}

/// The values of `--stages` ([`BenchStage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StageArg {
    /// Decode + resample + fbank, one thread.
    FrontEnd,
    /// The encoder graph on a batch of clips.
    Encoder,
    /// Prefill, decode and generation at each decoder batch size.
    Decoder,
    /// Front end, encoder and generation in one serial loop.
    EndToEnd,
}

impl From<StageArg> for BenchStage {
    fn from(arg: StageArg) -> Self {
        match arg {
            StageArg::FrontEnd => BenchStage::FrontEnd,
            StageArg::Encoder => BenchStage::Encoder,
            StageArg::Decoder => BenchStage::Decoder,
            StageArg::EndToEnd => BenchStage::EndToEnd,
        }
    }
}

impl From<BenchArgs> for BenchOptions {
    fn from(args: BenchArgs) -> Self {
        BenchOptions {
            preset: args.preset.into(),
            model: args.model,
            device: args.device,
            dtype: args.dtype.map(Into::into),
            batch_sizes: args.batch_sizes,
            encoder_batch: args.encoder_batch,
            e2e_batch: args.e2e_batch,
            clip_seconds: args.clip_seconds,
            clip_rate: args.clip_rate,
            new_tokens: args.new_tokens,
            repetitions: args.repetitions,
            warmup: args.warmup,
            intra_threads: args.intra_threads,
            work_dir: args.work_dir,
            fixtures: args.fixtures,
            tokenizer: args.tokenizer,
            seed: args.seed,
            attention: args.attention.map(Into::into),
            stages: args
                .stages
                .map(|stages| stages.into_iter().map(Into::into).collect()),
            rebuild: args.rebuild,
            profile: args.profile,
            json: args.json,
            quiet: args.quiet,
        }
    }
}

/// `audiocap bench`: runs the benchmark and prints its report.
pub fn run(args: BenchArgs) -> anyhow::Result<Exit> {
    let report = run_bench(&args.into())?;
    println!("{report}");
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use audiocap::manifest::ExportDtype;
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct BenchCli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchOptions {
        BenchCli::parse_from(args).bench.into()
    }

    #[test]
    fn defaults_match_the_command_line_defaults() {
        assert_eq!(parse(&["bench"]), BenchOptions::default());
        let parsed = parse(&[
            "bench",
            "--preset",
            "real",
            "--device",
            "cuda:1",
            "--batch-sizes",
            "1,64,256",
            "--dtype",
            "f16",
        ]);
        assert_eq!(parsed.preset, BenchPreset::Real);
        assert_eq!(parsed.device, DeviceSpec::Cuda(1));
        assert_eq!(parsed.batch_sizes, Some(vec![1, 64, 256]));
        assert_eq!(parsed.dtype, Some(ExportDtype::F16));
    }
}
