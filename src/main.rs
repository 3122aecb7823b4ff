//! The `audiocap` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use audiocap::audio::decode::decode_file;
use audiocap::caption::Captioner;
use audiocap::export::{ExportOptions, export_model};
use audiocap::manifest::ExportDtype;
use audiocap::model::projector::Pooling;
use audiocap::model::sources::ModelSources;
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
    /// Export a model (BEATs + projector + Llama with merged LoRA adapters) to an
    /// ONNX model directory that `audiocap caption` and `audiocap run` execute.
    Export(ExportArgs),
    /// Caption audio files with the candle reference implementation, straight from
    /// the checkpoints (BEATs, Llama directory, projector, PEFT adapters). Prints one
    /// JSON object per file. Use it to check checkpoints before exporting them.
    ReferenceCaption(ReferenceCaptionArgs),
}

#[derive(clap::Args)]
struct ExportArgs {
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
    /// Precision of the exported weights: f32, or f16 for GPUs.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ExportDtype,
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
struct ReferenceCaptionArgs {
    /// BEATs checkpoint (.pt as released, or .safetensors with its cfg beside it).
    #[arg(long)]
    beats: PathBuf,
    /// Hugging Face Llama directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    llm: PathBuf,
    /// Projector safetensors (keys 0.weight, 0.bias, 2.weight, 2.bias).
    #[arg(long)]
    projector: PathBuf,
    /// PEFT LoRA adapter directory; repeat to combine several with PEFT's `cat`.
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// Comma-separated weights for the adapters (default 1/K each).
    #[arg(long, value_delimiter = ',')]
    adapter_weights: Option<Vec<f64>>,
    /// Prompt template containing <|audio|> once (default: Llama 3 chat template
    /// around "Describe the following audio clip <|audio|>").
    #[arg(long)]
    prompt_template: Option<String>,
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
        Command::Export(args) => export(args),
        Command::ReferenceCaption(args) => reference_caption(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit::FATAL)
        }
    }
}

fn export(args: ExportArgs) -> anyhow::Result<u8> {
    if let Some(w) = &args.adapter_weights
        && w.len() != args.adapters.len()
    {
        bail!(
            "{} --adapter-weights for {} --adapter directories",
            w.len(),
            args.adapters.len()
        );
    }
    let options = ExportOptions {
        sources: ModelSources {
            beats: args.beats,
            llm: args.llm,
            projector: args.projector,
            adapters: args.adapters,
            adapter_weights: args.adapter_weights,
            prompt_template: args.prompt_template,
            pooling: Pooling::Mean,
        },
        dtype: args.dtype,
        name: args.name,
        out: args.out,
        overwrite: args.overwrite,
    };
    let manifest = export_model(&options).context("exporting the model")?;
    eprintln!(
        "exported {} to {} ({:?}; encoder {} bytes, decoder {} bytes{})",
        manifest.name,
        options.out.display(),
        manifest.onnx.dtype,
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

fn reference_caption(args: ReferenceCaptionArgs) -> anyhow::Result<u8> {
    let sources = ModelSources {
        beats: args.beats,
        llm: args.llm,
        projector: args.projector,
        adapters: args.adapters,
        adapter_weights: args.adapter_weights,
        prompt_template: args.prompt_template,
        pooling: Pooling::Mean,
    };
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
