//! `audiocap export`: the checkpoints a model is assembled from (shared with
//! `reference-caption`), the export's precision and attention, and where it goes.

use std::path::PathBuf;

use anyhow::{Context, bail};
use audiocap::export::{ExportOptions, export_model};
use audiocap::manifest::{Attention, ExportDtype};
use audiocap::model::projector::Pooling;
use audiocap::model::sources::ModelSources;

use super::exit::Exit;

/// The checkpoints a model is assembled from.
#[derive(clap::Args)]
pub struct CheckpointArgs {
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
    pub fn into_sources(self) -> anyhow::Result<ModelSources> {
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
pub struct ExportArgs {
    #[command(flatten)]
    model: CheckpointArgs,
    /// Precision of the exported weights: f32, or f16 for GPUs.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Attention: `fused` (ONNX Runtime's contrib operators: GroupQueryAttention in
    /// the decoder, cache updated in place, rows of different lengths: continuous
    /// batching, CUDA needs f16; MultiHeadAttention in the encoder) or `eager` (plain
    /// ONNX operators). Default: fused for f16, eager for f32.
    #[arg(long, value_enum)]
    attention: Option<AttentionArg>,
    /// Model name recorded in the manifest and in every output row.
    #[arg(long)]
    name: String,
    /// Output directory (e.g. exported_models/NAME).
    #[arg(long)]
    out: PathBuf,
    /// Replace the output directory if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Names of a fine-tuned BEATs checkpoint's tag labels: AudioSet's
    /// class_labels_indices.csv (index,mid,display_name) or one name per line
    /// (default: class_0 ... class_N). The tagging head itself is kept whenever the
    /// checkpoint has one.
    #[arg(long, value_name = "FILE")]
    tag_labels: Option<PathBuf>,
}

/// The values of `--dtype` ([`ExportDtype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
}

impl From<DtypeArg> for ExportDtype {
    fn from(arg: DtypeArg) -> Self {
        match arg {
            DtypeArg::F32 => ExportDtype::F32,
            DtypeArg::F16 => ExportDtype::F16,
        }
    }
}

/// The values of `--attention` ([`Attention`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttentionArg {
    /// Plain ONNX operators, as transformers' eager attention: the cache grows by
    /// concatenation and every row of a batch has the same length. Runs on every
    /// provider in f32 and f16.
    Eager,
    /// ONNX Runtime's `GroupQueryAttention` (com.microsoft): fused, GQA-native, the
    /// cache a preallocated buffer [batch, kv_heads, capacity, head_dim] updated in
    /// place, each row with its own length (`seqlens_k`), which is what lets new clips
    /// join a batch as others finish. CPU: f32 and f16; CUDA: f16 only. The encoder
    /// runs `MultiHeadAttention` with BEATs' padding and gated position bias as one
    /// additive bias (exports since graph revision 2; earlier ones kept the eager
    /// encoder, which the engine runs the same way).
    Fused,
}

impl From<AttentionArg> for Attention {
    fn from(arg: AttentionArg) -> Self {
        match arg {
            AttentionArg::Eager => Attention::Eager,
            AttentionArg::Fused => Attention::Fused,
        }
    }
}

/// `audiocap export`: writes the model directory and says what it holds.
pub fn run(args: ExportArgs) -> anyhow::Result<Exit> {
    let dtype = args.dtype.into();
    let options = ExportOptions {
        sources: args.model.into_sources()?,
        dtype,
        attention: args
            .attention
            .map_or(Attention::default_for(dtype), Into::into),
        name: args.name,
        out: args.out,
        overwrite: args.overwrite,
        tag_labels: args.tag_labels,
    };
    let manifest = export_model(&options).context("exporting the model")?;
    eprintln!(
        "exported {} to {} ({:?}, {:?} attention; encoder {} bytes{}, decoder {} bytes{})",
        manifest.name,
        options.out.display(),
        manifest.onnx.dtype,
        manifest.onnx.attention,
        manifest.onnx.audio_encoder.file.bytes,
        match &manifest.encoder.tags {
            Some(tags) => format!(" with {} tags", tags.labels.len()),
            None => String::new(),
        },
        manifest.onnx.decoder.file.bytes,
        if manifest.onnx.decoder.external_data.is_empty() {
            ""
        } else {
            " + external data"
        }
    );
    Ok(Exit::Ok)
}
