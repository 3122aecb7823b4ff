//! The figures `audiocap bench` measured and the report around them: what ran, on
//! which device and build, how long setup took; as a table for the terminal and as
//! JSON.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use super::options::BenchPreset;
use crate::manifest::{Attention, ExportDtype};

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// `front_end`, `encoder`, `encoder_extras` (the encoder with its tags and
    /// embedding outputs bound), `prefill`, `decode`, `generate` or `end_to_end`.
    pub stage: &'static str,
    /// Clips or sequences per call.
    pub batch: usize,
    /// What `mean`, `min` and `max` count.
    pub unit: &'static str,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// The rate of each timed repetition.
    pub rates: Vec<f64>,
    /// Wall time of each timed repetition, in seconds.
    pub seconds: Vec<f64>,
}

impl Figure {
    pub(super) fn new(
        stage: &'static str,
        batch: usize,
        unit: &'static str,
        rates: Vec<f64>,
        seconds: Vec<f64>,
    ) -> Self {
        let n = rates.len().max(1) as f64;
        Self {
            stage,
            batch,
            unit,
            mean: rates.iter().sum::<f64>() / n,
            min: rates.iter().copied().fold(f64::INFINITY, f64::min),
            max: rates.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            rates,
            seconds,
        }
    }
}

/// The exported model that was measured.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub dir: PathBuf,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    /// Decoder parameters of the synthetic checkpoint (None for the fixture).
    pub decoder_parameters: Option<u64>,
    /// Bytes of `audio_encoder.onnx`, `embedding.onnx` and `decoder.onnx`, external
    /// data included.
    pub encoder_bytes: u64,
    pub embedding_bytes: u64,
    pub decoder_bytes: u64,
    /// Prompt length in decoder positions (text around the audio + audio embeddings).
    pub prompt_tokens: usize,
    pub audio_tokens: usize,
}

/// How long the model took to get ready, in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct SetupTimes {
    /// Writing the synthetic checkpoints (None: cached or the fixture).
    pub sources_s: Option<f64>,
    /// Exporting (None: a cached export was reused).
    pub export_s: Option<f64>,
    /// Loading the export into ONNX Runtime sessions.
    pub load_s: f64,
}

/// Everything `audiocap bench` measured, with what it ran on.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub preset: BenchPreset,
    /// The exported model benchmarked instead of the preset's (`--model`).
    pub model_dir: Option<PathBuf>,
    pub device: String,
    pub dtype: ExportDtype,
    pub attention: Attention,
    /// `release` or `debug` (how this binary was built).
    pub build_profile: &'static str,
    /// ONNX Runtime version and library file.
    pub onnxruntime: String,
    /// Logical CPUs of the machine.
    pub cpus: usize,
    pub intra_threads: Option<usize>,
    pub clip_seconds: f64,
    /// Sample rate of the test clips (resampled in the front end when it is not the
    /// model's).
    pub clip_rate_hz: u32,
    pub new_tokens: usize,
    pub warmup: usize,
    pub repetitions: usize,
    pub model: ModelSummary,
    pub setup: SetupTimes,
    pub figures: Vec<Figure>,
    /// ONNX Runtime profiles written by `--profile`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile_files: Vec<PathBuf>,
}

impl BenchReport {
    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// The figure of `stage` at `batch`, if measured.
    pub fn figure(&self, stage: &str, batch: usize) -> Option<&Figure> {
        self.figures
            .iter()
            .find(|f| f.stage == stage && f.batch == batch)
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.model;
        let what = match &self.model_dir {
            Some(dir) => format!("model {}", dir.display()),
            None => format!("preset {}", self.preset),
        };
        writeln!(
            f,
            "audiocap bench: {what} ({}), {} {} attention on {}, {} build, ONNX Runtime {}",
            m.name,
            fmt_dtype(self.dtype),
            fmt_attention(self.attention),
            self.device,
            self.build_profile,
            self.onnxruntime
        )?;
        writeln!(
            f,
            "model: decoder {} layers x {} hidden{}, vocab {}, prompt {} positions ({} audio); \
             files: encoder {}, embedding {}, decoder {}",
            m.num_layers,
            m.hidden_size,
            m.decoder_parameters
                .map(|p| format!(" ({:.2} B parameters)", p as f64 / 1e9))
                .unwrap_or_default(),
            m.vocab_size,
            m.prompt_tokens,
            m.audio_tokens,
            fmt_bytes(m.encoder_bytes),
            fmt_bytes(m.embedding_bytes),
            fmt_bytes(m.decoder_bytes),
        )?;
        writeln!(
            f,
            "{} CPUs, intra-op threads {}; {} s clips at {} Hz, {} new tokens; {} warm-up + {} timed runs per figure",
            self.cpus,
            self.intra_threads
                .map(|t| t.to_string())
                .unwrap_or_else(|| "default".into()),
            self.clip_seconds,
            self.clip_rate_hz,
            self.new_tokens,
            self.warmup,
            self.repetitions
        )?;
        let opt = |v: Option<f64>| {
            v.map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| "cached".into())
        };
        writeln!(
            f,
            "setup: sources {}, export {}, load {:.1} s",
            match (self.preset, self.setup.sources_s) {
                (BenchPreset::Fixture, _) => "the fixture's".to_string(),
                (_, s) => opt(s),
            },
            opt(self.setup.export_s),
            self.setup.load_s
        )?;
        writeln!(
            f,
            "{:<14} {:>6} {:>12} {:>12} {:>12}  unit",
            "stage", "batch", "mean", "min", "max"
        )?;
        for fig in &self.figures {
            writeln!(
                f,
                "{:<14} {:>6} {:>12} {:>12} {:>12}  {}",
                fig.stage,
                fig.batch,
                fmt_rate(fig.mean),
                fmt_rate(fig.min),
                fmt_rate(fig.max),
                fig.unit
            )?;
        }
        Ok(())
    }
}

pub(super) fn fmt_dtype(dtype: ExportDtype) -> &'static str {
    match dtype {
        ExportDtype::F32 => "f32",
        ExportDtype::F16 => "f16",
    }
}

pub(super) fn fmt_attention(attention: Attention) -> &'static str {
    match attention {
        Attention::Eager => "eager",
        Attention::Fused => "fused",
    }
}

pub(super) fn fmt_rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

fn fmt_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}
