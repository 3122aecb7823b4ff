//! The `audiocap` command line: parse, dispatch to the command's module in
//! [`cli`], and exit with the code it maps its outcome to ([`cli::exit::Exit`]).

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::exit::Exit;

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
    Run(cli::run::RunArgs),
    /// Caption audio files or folders with an exported model on ONNX Runtime and
    /// write a Parquet table (uri, segment, caption, score, error, ...).
    Caption(cli::caption::CaptionArgs),
    /// Score captions against references with the DCASE metrics (BLEU-1..4, ROUGE-L,
    /// CIDEr-D): predictions from `audiocap caption` Parquet or CSV, references in the
    /// Clotho, AudioCaps or a generic layout.
    Eval(cli::eval::EvalArgs),
    /// Throughput benchmark: builds (or reuses) a preset model with random weights,
    /// exports it and measures the front end, encoder, prefill, decode and end to end.
    Bench(cli::bench::BenchArgs),
    /// Report which decoders read audio here (native formats, Opus, the ffmpeg
    /// fallback's path and version), which ONNX Runtime library is used, how it was
    /// found, its version and execution providers, and the GPUs the driver shows.
    Doctor(cli::doctor::DoctorArgs),
    /// Export a model (BEATs + projector + Llama with merged LoRA adapters) to an
    /// ONNX model directory that `audiocap caption` and `audiocap run` execute.
    Export(cli::export::ExportArgs),
    /// Caption audio files with the candle reference implementation, straight from
    /// the checkpoints (BEATs, Llama directory, projector, PEFT adapters). Prints one
    /// JSON object per file. Use it to check checkpoints before exporting them.
    ReferenceCaption(cli::reference_caption::ReferenceCaptionArgs),
    /// Merge PEFT LoRA adapters by concatenation (PEFT's `cat` combination): rank Σr,
    /// lora_alpha = Σr, ΔW = Σ wᵢ·(αᵢ/rᵢ)·BᵢAᵢ. The output is a PEFT adapter directory
    /// that Python PEFT and `audiocap export --adapter` both read.
    Merge(cli::merge::MergeArgs),
    /// Train the projector and LoRA adapters on the frozen encoder and decoder (the
    /// paper's recipe: stages, AdamW, warm-up + cosine, merged runs) from a training
    /// file (see pipelines/train-*.toml). Writes OUTPUT/final/{projector.safetensors,
    /// adapter/} for `audiocap export`.
    Train(cli::train::TrainArgs),
    /// Build (or check) the captioning corpus of the bundled model: freely licensed
    /// Debian sound packages, espeak-ng speech and synthetic signals, captioned by
    /// the rules in corpus/ and split into train / validation / test.
    #[command(subcommand)]
    Corpus(cli::corpus::CorpusCommand),
    /// Train the parts the captioner keeps frozen, from scratch: `decoder` (a small
    /// Llama-architecture language model on caption text, with its own BPE
    /// tokenizer, written as a Hugging Face Llama directory) and `encoder` (a
    /// BEATs-architecture multi-label tagger, written as a BEATs checkpoint).
    #[command(subcommand)]
    Pretrain(cli::pretrain::PretrainCommand),
    /// Where every shard of a dataset stands (committed, in progress, missing; rows,
    /// error rows, size). Exit code 0: all committed; 4: not yet; 2: the shards do
    /// not make one dataset.
    Status(cli::DatasetArgs),
    /// The dataset-level commit: checks that all shards committed with one model and
    /// one pipeline, then writes _manifest.json (parts, rows, SHA-256) and _SUCCESS
    /// last. Idempotent. Exit code 0: finalized; 4: shards not committed yet; 2:
    /// inconsistent shards.
    Finalize(cli::DatasetArgs),
}

fn main() -> ExitCode {
    match try_main(Cli::parse()) {
        Ok(exit) => exit.into(),
        Err(err) => {
            eprintln!("error: {err:#}");
            Exit::Fatal.into()
        }
    }
}

fn try_main(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Run(args) => cli::run::run(args),
        Command::Caption(args) => cli::caption::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Doctor(args) => cli::doctor::run(args),
        Command::Export(args) => cli::export::run(args),
        Command::ReferenceCaption(args) => cli::reference_caption::run(args),
        Command::Merge(args) => cli::merge::run(args),
        Command::Train(args) => cli::train::run(args),
        Command::Corpus(command) => cli::corpus::run(command),
        Command::Pretrain(command) => cli::pretrain::run(command),
        Command::Status(args) => cli::status::run(args),
        Command::Finalize(args) => cli::finalize::run(args),
    }
}
