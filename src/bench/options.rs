//! `audiocap bench` options: the preset a run measures, the figures it takes, and
//! [`BenchOptions`] with the preset's defaults filled in and checked as a plan.

use std::fmt;
use std::path::PathBuf;

use anyhow::bail;
use serde::Serialize;

use crate::config::DeviceSpec;
use crate::manifest::{Attention, ExportDtype};
use crate::model::synthetic::{
    LlamaFiles, LlamaSpec, SyntheticModel, beats_iter3_plus, beats_tiny,
};

/// The model a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchPreset {
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

impl fmt::Display for BenchPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BenchPreset::Fixture => "fixture",
            BenchPreset::Tiny => "tiny",
            BenchPreset::Small => "small",
            BenchPreset::Real => "real",
        })
    }
}

/// What the options leave to the preset.
struct PresetDefaults {
    dtype: ExportDtype,
    batch_sizes: &'static [usize],
    encoder_batch: usize,
    pub(super) e2e_batch: usize,
    repetitions: usize,
}

impl BenchPreset {
    fn defaults(self) -> PresetDefaults {
        match self {
            BenchPreset::Fixture => PresetDefaults {
                dtype: ExportDtype::F32,
                batch_sizes: &[1, 16],
                encoder_batch: 16,
                e2e_batch: 16,
                repetitions: 5,
            },
            BenchPreset::Tiny => PresetDefaults {
                dtype: ExportDtype::F32,
                batch_sizes: &[1, 4],
                encoder_batch: 2,
                e2e_batch: 2,
                repetitions: 2,
            },
            BenchPreset::Small => PresetDefaults {
                dtype: ExportDtype::F32,
                batch_sizes: &[1, 16],
                encoder_batch: 2,
                e2e_batch: 4,
                repetitions: 2,
            },
            BenchPreset::Real => PresetDefaults {
                dtype: ExportDtype::F16,
                batch_sizes: &[1, 16, 64],
                encoder_batch: 32,
                e2e_batch: 64,
                repetitions: 3,
            },
        }
    }

    /// The synthetic model of a random-weight preset. Its BEATs is fine-tuned, as the
    /// AudioSet checkpoints people caption with (AS2M cpt2: a 527-label tagging head).
    pub(super) fn synthetic(self, seed: u64) -> Option<SyntheticModel> {
        let (beats, llama) = match self {
            BenchPreset::Fixture => return None,
            BenchPreset::Tiny => (beats_tiny(), LlamaSpec::tiny()),
            BenchPreset::Small => (beats_iter3_plus(), LlamaSpec::llama_1b()),
            BenchPreset::Real => (beats_iter3_plus(), LlamaSpec::llama3_8b()),
        };
        let beats = crate::model::beats::BeatsConfig {
            finetuned_model: true,
            predictor_class: AUDIOSET_LABELS,
            ..beats
        };
        Some(SyntheticModel {
            beats,
            llama,
            llama_files: LlamaFiles::default(),
            seed,
        })
    }
}

/// Labels of the AudioSet tagging head the synthetic encoders carry.
const AUDIOSET_LABELS: usize = 527;
const DEFAULT_CLIP_SECONDS: f64 = 10.0;
const DEFAULT_NEW_TOKENS: usize = 20;
const DEFAULT_WARMUP: usize = 1;
const DEFAULT_SEED: u64 = 1;

/// The figures `audiocap bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchStage {
    /// Decode + resample + fbank, one thread.
    FrontEnd,
    /// The encoder graph on a batch of clips.
    Encoder,
    /// Prefill, decode and generation at each decoder batch size.
    Decoder,
    /// Front end, encoder and generation in one serial loop.
    EndToEnd,
}

/// `audiocap bench` options. Options left out take the preset's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// Model to benchmark: fixture (the e2e-tiny fixture), tiny, small (BEATs-base +
    /// ~1B Llama, random weights, for CPUs) or real (BEATs-base + Llama-3-8B shape,
    /// random weights, f16, for GPUs).
    pub preset: BenchPreset,
    /// An exported model directory to benchmark instead of a preset (e.g. the bundled
    /// default model in exported_models/); the preset's batch and repetition
    /// defaults still apply.
    pub model: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    pub device: DeviceSpec,
    /// Precision of the export (default: f32, f16 for the real preset).
    pub dtype: Option<ExportDtype>,
    /// Decoder batch sizes for prefill and decode, comma-separated
    /// (default: 1,16; 1,16,64 for the real preset).
    pub batch_sizes: Option<Vec<usize>>,
    /// Clips per encoder call (default: 16 fixture, 2 small, 32 real).
    pub encoder_batch: Option<usize>,
    /// Clips per end-to-end batch (default: 16 fixture, 4 small, 64 real).
    pub e2e_batch: Option<usize>,
    /// Length of the generated test clips in seconds.
    pub clip_seconds: f64,
    /// Sample rate of the generated test clips in Hz (default: the model's, so the
    /// front end is decode + fbank; e.g. 44100 adds resampling).
    pub clip_rate: Option<u32>,
    /// Tokens generated per caption (fixed length: stop ids are ignored).
    pub new_tokens: usize,
    /// Timed repetitions per figure (default: 5 fixture, 2 small, 3 real).
    pub repetitions: Option<usize>,
    /// Untimed warm-up runs before each figure.
    pub warmup: usize,
    /// Threads inside each ONNX operator (default: ONNX Runtime's, one per core).
    pub intra_threads: Option<usize>,
    /// Where synthetic checkpoints, exports and test clips are kept and reused
    /// (default: <temp dir>/audiocap-bench).
    pub work_dir: Option<PathBuf>,
    /// The reference fixtures (default: ../shared/fixtures beside the source tree).
    pub fixtures: Option<PathBuf>,
    /// A Llama 3 tokenizer.json for the synthetic models (default: the fixtures').
    pub tokenizer: Option<PathBuf>,
    /// Seed of the synthetic weights.
    pub seed: u64,
    /// The exported decoder's attention (default: fused for f16, eager for f32; see
    /// `audiocap export --attention`).
    pub attention: Option<Attention>,
    /// Figures to measure, comma-separated (default: all). Fewer make a shorter run,
    /// e.g. one whose GPU kernels are traced (benchmarks/kernel-trace).
    pub stages: Option<Vec<BenchStage>>,
    /// Rebuild the synthetic checkpoints and the export even if cached ones match.
    pub rebuild: bool,
    /// After the figures, record ONNX Runtime's per-node profile of one generation at
    /// the largest batch size into this folder (`benchmarks/ort-profile-summary.py`
    /// sums it up).
    pub profile: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    pub json: Option<PathBuf>,
    /// No progress lines on stderr.
    pub quiet: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            preset: BenchPreset::Fixture,
            model: None,
            device: DeviceSpec::Cpu,
            dtype: None,
            batch_sizes: None,
            encoder_batch: None,
            e2e_batch: None,
            clip_seconds: DEFAULT_CLIP_SECONDS,
            clip_rate: None,
            new_tokens: DEFAULT_NEW_TOKENS,
            repetitions: None,
            warmup: DEFAULT_WARMUP,
            intra_threads: None,
            work_dir: None,
            fixtures: None,
            tokenizer: None,
            seed: DEFAULT_SEED,
            attention: None,
            stages: None,
            profile: None,
            rebuild: false,
            json: None,
            quiet: false,
        }
    }
}

/// The options with the preset's defaults filled in and checked.
pub(super) struct Plan {
    pub(super) preset: BenchPreset,
    pub(super) dtype: ExportDtype,
    pub(super) attention: Attention,
    pub(super) batch_sizes: Vec<usize>,
    pub(super) encoder_batch: usize,
    pub(super) e2e_batch: usize,
    pub(super) repetitions: usize,
    pub(super) work_dir: PathBuf,
    pub(super) fixtures: PathBuf,
}

impl BenchOptions {
    pub(super) fn plan(&self) -> anyhow::Result<Plan> {
        let d = self.preset.defaults();
        let dtype = self.dtype.unwrap_or(d.dtype);
        let plan = Plan {
            preset: self.preset,
            dtype,
            attention: self.attention.unwrap_or(Attention::default_for(dtype)),
            batch_sizes: self
                .batch_sizes
                .clone()
                .unwrap_or_else(|| d.batch_sizes.to_vec()),
            encoder_batch: self.encoder_batch.unwrap_or(d.encoder_batch),
            e2e_batch: self.e2e_batch.unwrap_or(d.e2e_batch),
            repetitions: self.repetitions.unwrap_or(d.repetitions),
            work_dir: self
                .work_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("audiocap-bench")),
            fixtures: self.fixtures.clone().unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
            }),
        };
        let mut problems = Vec::new();
        if plan.batch_sizes.is_empty() || plan.batch_sizes.contains(&0) {
            problems.push(format!(
                "--batch-sizes {:?}: give at least one size, each at least 1",
                plan.batch_sizes
            ));
        }
        for (name, value) in [
            ("--encoder-batch", plan.encoder_batch),
            ("--e2e-batch", plan.e2e_batch),
            ("--repetitions", plan.repetitions),
            ("--new-tokens", self.new_tokens),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        if !(self.clip_seconds.is_finite()
            && self.clip_seconds >= 0.5
            && self.clip_seconds <= 600.0)
        {
            problems.push(format!(
                "--clip-seconds {}: give a length between 0.5 and 600",
                self.clip_seconds
            ));
        }
        let rates = crate::audio::resample::MIN_RATE_HZ..=crate::audio::resample::MAX_RATE_HZ;
        if let Some(rate) = self.clip_rate.filter(|r| !rates.contains(r)) {
            problems.push(format!(
                "--clip-rate {rate}: give a rate between {} and {} Hz",
                rates.start(),
                rates.end()
            ));
        }
        if !problems.is_empty() {
            bail!("invalid bench options: {}", problems.join("; "));
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_options_are_reported_together() {
        let options = BenchOptions {
            batch_sizes: Some(vec![1, 0]),
            repetitions: Some(0),
            clip_seconds: 0.0,
            clip_rate: Some(10),
            ..BenchOptions::default()
        };
        let err = options.plan().err().unwrap().to_string();
        assert!(err.contains("--batch-sizes"), "{err}");
        assert!(err.contains("--repetitions"), "{err}");
        assert!(err.contains("--clip-seconds"), "{err}");
        assert!(err.contains("--clip-rate 10"), "{err}");
    }
}
