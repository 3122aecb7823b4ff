//! `audiocap export`: the candle model written as ONNX graphs plus a manifest.
//!
//! The model directory holds `audio_encoder.onnx` (BEATs + projector + pooling),
//! `embedding.onnx`, `decoder.onnx` (Llama with the adapters folded in),
//! `tokenizer.json` and `model.json` (see [`crate::manifest`]). It is written under a
//! staging name and renamed into place when complete, so a killed export never
//! leaves a directory that looks usable.

pub mod decoder;
pub mod encoder;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::audio::fbank::FbankConfig;
use crate::manifest::{
    AdapterProvenance, Attention, DecoderInfo, EncoderInfo, ExportDtype, FileDigest,
    GenerationInfo, GraphFile, ManifestError, ModelManifest, OnnxInfo, ProjectorInfo, PromptInfo,
    Provenance, TagsInfo, default_tag_labels, digest_file, now_rfc3339, read_tag_labels,
};
use crate::model::lora::{Adaptation, TargetModules};
use crate::model::prompt::{DEFAULT_PROMPT_TEMPLATE, PromptError, PromptTemplate, load_tokenizer};
use crate::model::sources::{AssemblyError, ModelSources, combine_adapters, read_stop_ids};
use crate::model::weights::{LoadError, Weights};
use crate::onnx;
pub use encoder::GraphError;

/// Default cap on generated tokens recorded in the manifest.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 30;

/// Revision of the graphs this exporter writes, bumped when they change without a
/// manifest format change (an export cached by `audiocap bench` is rebuilt when it
/// differs). 2: fused attention in the encoder too (`MultiHeadAttention`). 3: the
/// encoder's `encoder_embedding` output, and `tag_probs` for a tagging checkpoint.
pub const GRAPH_REVISION: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Assembly(#[from] AssemblyError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: already exists and is not empty; choose another --out or pass --overwrite", .0.display())]
    Exists(PathBuf),
    #[error("model mismatch: {0}")]
    Mismatch(String),
}

/// What to export and where.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub sources: ModelSources,
    pub dtype: ExportDtype,
    /// The decoder's attention (see [`Attention`]).
    pub attention: Attention,
    pub name: String,
    pub out: PathBuf,
    /// Replace an existing, non-empty output directory.
    pub overwrite: bool,
    /// Names of the tagging head's labels (`--tag-labels`: AudioSet's
    /// `class_labels_indices.csv` layout or one name per line); without it a
    /// fine-tuned checkpoint's tags are `class_0 … class_N`.
    pub tag_labels: Option<PathBuf>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Exports the model and returns its manifest.
pub fn export_model(options: &ExportOptions) -> Result<ModelManifest, ExportError> {
    let out = &options.out;
    if out.exists() {
        let non_empty = std::fs::read_dir(out)
            .map_err(io_error(out))?
            .next()
            .is_some();
        if non_empty && !options.overwrite {
            return Err(ExportError::Exists(out.clone()));
        }
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    // Removed when the export fails (dropped uncommitted).
    let staging = crate::atomic::Staging::new(out);
    std::fs::create_dir_all(staging.path()).map_err(io_error(staging.path()))?;
    let manifest = write_model_dir(options, staging.path())?;
    staging.commit_dir().map_err(io_error(out))?;
    Ok(manifest)
}

fn write_model_dir(options: &ExportOptions, dir: &Path) -> Result<ModelManifest, ExportError> {
    let sources = &options.sources;
    let device = Device::Cpu;
    let float = match options.dtype {
        ExportDtype::F32 => onnx::DataType::Float,
        ExportDtype::F16 => onnx::DataType::Float16,
    };

    let (beats_cfg, beats) =
        crate::model::beats::load_checkpoint(&sources.beats, DType::F32, &device)?;
    let tags = match (&options.tag_labels, beats_cfg.finetuned_model) {
        (Some(file), false) => {
            return Err(ExportError::Mismatch(format!(
                "--tag-labels {}: {} has no tagging head (its cfg has finetuned_model = false)",
                file.display(),
                sources.beats.display()
            )));
        }
        (Some(file), true) => Some(TagsInfo {
            labels: read_tag_labels(file, beats_cfg.predictor_class)?,
            labels_file: Some(digest_file(file, &file.display().to_string())?),
        }),
        (None, true) => Some(TagsInfo {
            labels: default_tag_labels(beats_cfg.predictor_class),
            labels_file: None,
        }),
        (None, false) => None,
    };
    let projector = Weights::from_safetensors(
        &sources.projector,
        std::slice::from_ref(&sources.projector),
        DType::F32,
        &device,
    )?;
    let projector_in = projector.pp("0").get_any_shape("weight")?.dims().to_vec();
    let projector_out = projector.pp("2").get_any_shape("weight")?.dims().to_vec();
    let (llm_cfg, llm) = crate::model::llama::open_checkpoint(&sources.llm, DType::F32, &device)?;
    if projector_in.get(1) != Some(&beats_cfg.encoder_embed_dim) {
        return Err(ExportError::Mismatch(format!(
            "{}: the projector takes {:?}-shaped input weights, the encoder gives {}-dim features",
            sources.projector.display(),
            projector_in,
            beats_cfg.encoder_embed_dim
        )));
    }
    if projector_out.first() != Some(&llm_cfg.hidden_size) {
        return Err(ExportError::Mismatch(format!(
            "{}: the projector gives {:?}-shaped output, the decoder's hidden size is {}",
            sources.projector.display(),
            projector_out,
            llm_cfg.hidden_size
        )));
    }

    let adapter = combine_adapters(&sources.adapters, sources.adapter_weights.as_deref())?;
    let adaptation = match &adapter {
        Some(a) => Adaptation::folded(&[a])
            .map_err(|e| LoadError::tensor(&sources.adapters[0], "lora", e))?,
        None => Adaptation::none(),
    };

    // Prompt and tokenizer.
    let tokenizer_src = sources.llm.join("tokenizer.json");
    let tokenizer = load_tokenizer(&tokenizer_src)?;
    let template_text = sources
        .prompt_template
        .clone()
        .unwrap_or_else(|| DEFAULT_PROMPT_TEMPLATE.to_string());
    let template = PromptTemplate::parse(&template_text)?;
    let prompt_ids = template.tokenize(&tokenizer, &tokenizer_src)?;
    let stop_ids = read_stop_ids(&sources.llm)?;
    let tokenizer_dst = dir.join("tokenizer.json");
    // Read and write rather than copy: the copy should not inherit a read-only mode.
    let bytes = std::fs::read(&tokenizer_src).map_err(io_error(&tokenizer_src))?;
    std::fs::write(&tokenizer_dst, bytes).map_err(io_error(&tokenizer_dst))?;

    // Graphs.
    let front_end = FbankConfig::default();
    let encoder_path = dir.join("audio_encoder.onnx");
    let mut graph = onnx::Graph::new("audio_encoder", float);
    let clip_outputs = encoder::build_encoder(
        &mut graph,
        &beats_cfg,
        &beats,
        &projector,
        sources.pooling,
        front_end.num_mel_bins,
        options.attention,
    )?;
    let encoder_files = graph
        .save(&encoder_path, env!("CARGO_PKG_VERSION"), &[])
        .map_err(GraphError::from)?;
    let decoder_files = decoder::export_decoder_files(
        &llm_cfg,
        &llm,
        &adaptation,
        &stop_ids,
        float,
        options.attention,
        dir,
    )?;

    let digest = |path: &Path| -> Result<FileDigest, ManifestError> {
        let name = path
            .strip_prefix(dir)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        digest_file(path, &name)
    };
    let graph_file = |files: &[PathBuf], main: &str| -> Result<GraphFile, ManifestError> {
        let mut graph = None;
        let mut external = Vec::new();
        for f in files {
            if f.file_name().is_some_and(|n| n == main) {
                graph = Some(digest(f)?);
            } else if f
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(main))
            {
                external.push(digest(f)?);
            }
        }
        let file = graph.ok_or_else(|| ManifestError::Invalid {
            path: dir.join(main),
            message: "graph file was not written".into(),
        })?;
        Ok(GraphFile {
            file,
            external_data: external,
        })
    };

    let source_digest = |path: &Path| digest_file(path, &path.display().to_string());
    let mut llm_files = vec![source_digest(&sources.llm.join("config.json"))?];
    for entry in std::fs::read_dir(&sources.llm).map_err(io_error(&sources.llm))? {
        let path = entry.map_err(io_error(&sources.llm))?.path();
        if path.extension().is_some_and(|e| e == "safetensors")
            || path
                .file_name()
                .is_some_and(|n| n == "model.safetensors.index.json")
        {
            llm_files.push(source_digest(&path)?);
        }
    }
    llm_files.sort_by(|a, b| a.path.cmp(&b.path));

    let k = sources.adapters.len();
    let weights = sources
        .adapter_weights
        .clone()
        .unwrap_or_else(|| vec![1.0 / k as f64; k]);
    let mut adapters = Vec::new();
    for (dir_path, weight) in sources.adapters.iter().zip(&weights) {
        let loaded = crate::model::lora::PeftAdapter::load(dir_path)?;
        let mut files = vec![source_digest(&dir_path.join("adapter_config.json"))?];
        for name in ["adapter_model.safetensors", "adapter_model.bin"] {
            if dir_path.join(name).is_file() {
                files.push(source_digest(&dir_path.join(name))?);
            }
        }
        adapters.push(AdapterProvenance {
            dir: dir_path.display().to_string(),
            weight: *weight,
            r: loaded.config.r,
            lora_alpha: loaded.config.lora_alpha,
            target_modules: match &loaded.config.target_modules {
                TargetModules::Names(n) => serde_json::json!(n),
                TargetModules::Regex(r) => serde_json::json!(r),
            },
            files,
        });
    }

    let manifest = ModelManifest {
        format_version: crate::manifest::FORMAT_VERSION,
        name: options.name.clone(),
        audiocap_version: env!("CARGO_PKG_VERSION").to_string(),
        created_at: now_rfc3339(),
        front_end,
        encoder: EncoderInfo {
            architecture: "BEATs".into(),
            min_frames: beats_cfg.input_patch_size,
            config: beats_cfg,
            embedding_dim: Some(clip_outputs.embedding_dim),
            tags,
        },
        projector: ProjectorInfo {
            pooling: sources.pooling,
            audio_tokens: sources.pooling.tokens_per_clip(),
            input_dim: projector_in[1],
            output_dim: projector_out[0],
        },
        decoder: DecoderInfo {
            architecture: "llama".into(),
            hidden_size: llm_cfg.hidden_size,
            num_layers: llm_cfg.num_hidden_layers,
            num_attention_heads: llm_cfg.num_attention_heads,
            num_key_value_heads: llm_cfg.num_key_value_heads(),
            head_dim: llm_cfg.head_dim(),
            vocab_size: llm_cfg.vocab_size,
            max_position_embeddings: llm_cfg.max_position_embeddings,
        },
        prompt: PromptInfo {
            template: template.text(),
            ids: prompt_ids,
        },
        generation: GenerationInfo {
            stop_ids,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
        },
        onnx: OnnxInfo {
            opset: onnx::OPSET,
            ir_version: onnx::IR_VERSION,
            dtype: options.dtype,
            attention: options.attention,
            audio_encoder: graph_file(&encoder_files, "audio_encoder.onnx")?,
            embedding: graph_file(&decoder_files, "embedding.onnx")?,
            decoder: graph_file(&decoder_files, "decoder.onnx")?,
            tokenizer: digest(&tokenizer_dst)?,
        },
        provenance: Provenance {
            beats: source_digest(&sources.beats)?,
            llm_dir: sources.llm.display().to_string(),
            llm_files,
            projector: source_digest(&sources.projector)?,
            combination: (k > 0).then(|| "cat".to_string()),
            adapters,
        },
    };
    manifest.write(dir)?;
    Ok(manifest)
}
