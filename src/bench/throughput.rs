//! `audiocap bench`: builds (or reuses) a preset model, exports it with the normal
//! exporter, loads the export on a device and measures, each as its own figure:
//!
//! - front end: WAV decode (+ resampling when `--clip-rate` is not the model's rate)
//!   + fbank of one clip on one thread (clips/s per core);
//! - encoder: `audio_encoder.onnx` on a batch of clips (clips/s);
//! - prefill: the decoder over the whole prompt of a batch (prompt tokens/s);
//! - decode: the incremental steps of fixed-length greedy generation
//!   (`min_new_tokens = max_new_tokens`, so every row generates the same count):
//!   `batch · (N − 1) / (t_generate(N) − t_prefill)` tokens/s, token choice included;
//! - generate: the whole fixed-length generation, prefill included (tokens/s);
//! - end to end: decode + fbank + encode + generate N tokens + detokenise, one batch
//!   after the other on one thread of control (captions/s).
//!
//! Every figure has warm-up runs first and then a few timed repetitions; the report
//! gives the mean and the spread (min, max) over the repetitions.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use ndarray::Array3;
use serde::Serialize;

use super::synthetic::{LlamaFiles, LlamaSpec, SyntheticModel, beats_iter3_plus, beats_tiny};
use crate::audio::decode::decode_file;
use crate::audio::fbank::{Fbank, FbankFrames};
use crate::audio::resample::resample;
use crate::engine::audio::AudioEmbeds;
use crate::engine::generate::{GenerationParams, generate};
use crate::engine::model::{EngineOptions, OnnxModel};
use crate::engine::runtime::{DeviceSpec, init_runtime};
use crate::export::{ExportOptions, export_model};
use crate::manifest::{Attention, ExportDtype, ModelManifest};
use crate::model::projector::Pooling;
use crate::model::sources::ModelSources;

/// The model a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
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
    e2e_batch: usize,
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

    /// The synthetic model of a random-weight preset.
    fn synthetic(self, seed: u64) -> Option<SyntheticModel> {
        let (beats, llama) = match self {
            BenchPreset::Fixture => return None,
            BenchPreset::Tiny => (beats_tiny(), LlamaSpec::tiny()),
            BenchPreset::Small => (beats_iter3_plus(), LlamaSpec::llama_1b()),
            BenchPreset::Real => (beats_iter3_plus(), LlamaSpec::llama3_8b()),
        };
        Some(SyntheticModel {
            beats,
            llama,
            llama_files: LlamaFiles::default(),
            seed,
        })
    }
}

const DEFAULT_CLIP_SECONDS: f64 = 10.0;
const DEFAULT_NEW_TOKENS: usize = 20;
const DEFAULT_WARMUP: usize = 1;
const DEFAULT_SEED: u64 = 1;
/// The front end is timed over at least this long per repetition.
const FRONT_END_MIN_SECONDS: f64 = 0.5;
/// Warm-up generations produce this many tokens (prefill and a decode step).
const WARMUP_TOKENS: usize = 2;

/// The figures `audiocap bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct BenchOptions {
    /// Model to benchmark: fixture (the e2e-tiny fixture), tiny, small (BEATs-base +
    /// ~1B Llama, random weights, for CPUs) or real (BEATs-base + Llama-3-8B shape,
    /// random weights, f16, for GPUs).
    #[arg(long, value_enum, default_value_t = BenchPreset::Fixture)]
    pub preset: BenchPreset,
    /// An exported model directory to benchmark instead of a preset (e.g. the bundled
    /// default model in exported_models/); the preset's batch and repetition
    /// defaults still apply.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Precision of the export (default: f32, f16 for the real preset).
    #[arg(long, value_enum)]
    pub dtype: Option<ExportDtype>,
    /// Decoder batch sizes for prefill and decode, comma-separated
    /// (default: 1,16; 1,16,64 for the real preset).
    #[arg(long, value_delimiter = ',')]
    pub batch_sizes: Option<Vec<usize>>,
    /// Clips per encoder call (default: 16 fixture, 2 small, 32 real).
    #[arg(long)]
    pub encoder_batch: Option<usize>,
    /// Clips per end-to-end batch (default: 16 fixture, 4 small, 64 real).
    #[arg(long)]
    pub e2e_batch: Option<usize>,
    /// Length of the generated test clips in seconds.
    #[arg(long, default_value_t = DEFAULT_CLIP_SECONDS)]
    pub clip_seconds: f64,
    /// Sample rate of the generated test clips in Hz (default: the model's, so the
    /// front end is decode + fbank; e.g. 44100 adds resampling).
    #[arg(long)]
    pub clip_rate: Option<u32>,
    /// Tokens generated per caption (fixed length: stop ids are ignored).
    #[arg(long, default_value_t = DEFAULT_NEW_TOKENS)]
    pub new_tokens: usize,
    /// Timed repetitions per figure (default: 5 fixture, 2 small, 3 real).
    #[arg(long)]
    pub repetitions: Option<usize>,
    /// Untimed warm-up runs before each figure.
    #[arg(long, default_value_t = DEFAULT_WARMUP)]
    pub warmup: usize,
    /// Threads inside each ONNX operator (default: ONNX Runtime's, one per core).
    #[arg(long)]
    pub intra_threads: Option<usize>,
    /// Where synthetic checkpoints, exports and test clips are kept and reused
    /// (default: <temp dir>/audiocap-bench).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The reference fixtures (default: ../shared/fixtures beside the source tree).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// A Llama 3 tokenizer.json for the synthetic models (default: the fixtures').
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// The exported decoder's attention (default: fused for f16, eager for f32; see
    /// `audiocap export --attention`).
    #[arg(long, value_enum)]
    pub attention: Option<Attention>,
    /// Figures to measure, comma-separated (default: all). Fewer make a shorter run,
    /// e.g. one whose GPU kernels are traced (benchmarks/kernel-trace).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub stages: Option<Vec<BenchStage>>,
    /// Rebuild the synthetic checkpoints and the export even if cached ones match.
    #[arg(long)]
    pub rebuild: bool,
    /// After the figures, record ONNX Runtime's per-node profile of one generation at
    /// the largest batch size into this folder (`benchmarks/ort-profile-summary.py`
    /// sums it up).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
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
struct Plan {
    preset: BenchPreset,
    dtype: ExportDtype,
    attention: Attention,
    batch_sizes: Vec<usize>,
    encoder_batch: usize,
    e2e_batch: usize,
    repetitions: usize,
    work_dir: PathBuf,
    fixtures: PathBuf,
}

impl BenchOptions {
    fn plan(&self) -> anyhow::Result<Plan> {
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

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// `front_end`, `encoder`, `prefill`, `decode`, `generate` or `end_to_end`.
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
    fn new(
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
            "{:<12} {:>6} {:>12} {:>12} {:>12}  unit",
            "stage", "batch", "mean", "min", "max"
        )?;
        for fig in &self.figures {
            writeln!(
                f,
                "{:<12} {:>6} {:>12} {:>12} {:>12}  {}",
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

fn fmt_dtype(dtype: ExportDtype) -> &'static str {
    match dtype {
        ExportDtype::F32 => "f32",
        ExportDtype::F16 => "f16",
    }
}

fn fmt_attention(attention: Attention) -> &'static str {
    match attention {
        Attention::Eager => "eager",
        Attention::Fused => "fused",
    }
}

fn fmt_rate(v: f64) -> String {
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

/// Runs the benchmark that `options` describe and returns its report (also written as
/// JSON when `options.json` is set).
pub fn run_bench(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    let plan = options.plan()?;
    let runtime = init_runtime().context("loading ONNX Runtime")?;
    std::fs::create_dir_all(&plan.work_dir)
        .with_context(|| format!("creating {}", plan.work_dir.display()))?;
    let mut runner = Runner {
        warmup: options.warmup,
        reps: plan.repetitions,
        quiet: options.quiet,
        figures: Vec::new(),
    };

    let prepared = match &options.model {
        Some(dir) => Prepared {
            dir: dir.clone(),
            decoder_parameters: None,
            sources_s: None,
            export_s: None,
        },
        None => prepare_export(options, &plan, &|m| runner.progress(&m))?,
    };
    let export_dir = prepared.dir;
    runner.progress(&format!(
        "loading {} on {}",
        export_dir.display(),
        options.device
    ));
    let started = Instant::now();
    let mut model = OnnxModel::load(
        &export_dir,
        &EngineOptions {
            device: options.device,
            intra_threads: options.intra_threads,
            profile_prefix: None,
        },
    )
    .with_context(|| format!("loading {}", export_dir.display()))?;
    let load_s = started.elapsed().as_secs_f64();

    let manifest = model.manifest.clone();
    let clip_rate = options.clip_rate.unwrap_or(manifest.front_end.sample_rate);
    let clips = write_clips(
        &plan.work_dir.join("clips"),
        clip_rate,
        options.clip_seconds,
        plan.encoder_batch.max(plan.e2e_batch),
    )?;
    let fbank = Fbank::new(manifest.front_end.clone()).context("the export's front end")?;

    let wanted = |stage: BenchStage| {
        options
            .stages
            .as_ref()
            .is_none_or(|stages| stages.contains(&stage))
    };
    if wanted(BenchStage::FrontEnd) {
        measure_front_end(&mut runner, &fbank, &clips)?;
    }
    let features = clips
        .iter()
        .map(|p| front_end(&fbank, p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let batch: Vec<(&[f32], usize)> = (0..plan.encoder_batch)
        .map(|k| {
            let f = &features[k % features.len()];
            (f.data.as_slice(), f.num_frames)
        })
        .collect();
    if wanted(BenchStage::Encoder) {
        measure_encoder(&mut runner, &mut model, &batch)?;
    }
    let one_clip = model.encode(&batch[..1])?.to_array()?;
    let prompt_tokens = model.prompt_len();
    let n = options.new_tokens;
    if wanted(BenchStage::Decoder) {
        for &b in &plan.batch_sizes {
            measure_decoder(&mut runner, &mut model, &tile(&one_clip, b), n)?;
        }
    }
    if wanted(BenchStage::EndToEnd) {
        let e2e_clips: Vec<&Path> = (0..plan.e2e_batch)
            .map(|k| clips[k % clips.len()].as_path())
            .collect();
        measure_end_to_end(&mut runner, &mut model, &fbank, &e2e_clips, n)?;
    }
    let profile_files = match &options.profile {
        Some(dir) => {
            drop(model);
            let largest = plan.batch_sizes.iter().copied().max().unwrap_or(1);
            runner.progress(&format!(
                "profiling one generation at batch {largest} into {}",
                dir.display()
            ));
            profile_generation(
                &export_dir,
                options,
                dir,
                &batch,
                &tile(&one_clip, largest),
                n,
            )?
        }
        None => Vec::new(),
    };

    let file_bytes = |g: &crate::manifest::GraphFile| {
        g.file.bytes + g.external_data.iter().map(|f| f.bytes).sum::<u64>()
    };
    let report = BenchReport {
        preset: plan.preset,
        model_dir: options.model.clone(),
        device: options.device.to_string(),
        dtype: manifest.onnx.dtype,
        attention: manifest.onnx.attention,
        build_profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        onnxruntime: format!("{} ({})", runtime.version, runtime.library.display()),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        intra_threads: options.intra_threads,
        clip_seconds: options.clip_seconds,
        clip_rate_hz: clip_rate,
        new_tokens: n,
        warmup: runner.warmup,
        repetitions: runner.reps,
        model: ModelSummary {
            name: manifest.name.clone(),
            dir: export_dir,
            hidden_size: manifest.decoder.hidden_size,
            num_layers: manifest.decoder.num_layers,
            vocab_size: manifest.decoder.vocab_size,
            decoder_parameters: prepared.decoder_parameters,
            encoder_bytes: file_bytes(&manifest.onnx.audio_encoder),
            embedding_bytes: file_bytes(&manifest.onnx.embedding),
            decoder_bytes: file_bytes(&manifest.onnx.decoder),
            prompt_tokens,
            audio_tokens: one_clip.dim().1,
        },
        setup: SetupTimes {
            sources_s: prepared.sources_s,
            export_s: prepared.export_s,
            load_s,
        },
        figures: runner.figures,
        profile_files,
    };
    if let Some(path) = &options.json {
        report.write_json(path)?;
    }
    Ok(report)
}

/// Times runs and collects the figures.
struct Runner {
    warmup: usize,
    reps: usize,
    quiet: bool,
    figures: Vec<Figure>,
}

impl Runner {
    fn progress(&self, message: &str) {
        if !self.quiet {
            eprintln!("bench: {message}");
        }
    }

    fn record(&mut self, figure: Figure) {
        self.progress(&format!(
            "{} batch {}: {} {} (min {}, max {})",
            figure.stage,
            figure.batch,
            fmt_rate(figure.mean),
            figure.unit,
            fmt_rate(figure.min),
            fmt_rate(figure.max)
        ));
        self.figures.push(figure);
    }

    /// Runs `f` `warmup` times untimed, then `reps` times timed; returns the seconds
    /// of each timed run.
    fn time(&self, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<f64>> {
        self.time_generation(usize::MAX, |_| f())
    }

    /// As [`Runner::time`] for a run that generates `tokens` tokens: warm-up runs
    /// generate at most [`WARMUP_TOKENS`] (enough to run prefill and a decode step).
    fn time_generation(
        &self,
        tokens: usize,
        mut f: impl FnMut(usize) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<f64>> {
        for _ in 0..self.warmup {
            f(tokens.min(WARMUP_TOKENS))?;
        }
        (0..self.reps)
            .map(|_| {
                let started = Instant::now();
                f(tokens)?;
                Ok(started.elapsed().as_secs_f64())
            })
            .collect()
    }
}

/// A figure whose every repetition did `work` units.
fn rate_figure(
    stage: &'static str,
    batch: usize,
    unit: &'static str,
    work: f64,
    seconds: Vec<f64>,
) -> Figure {
    let rates = seconds.iter().map(|&s| work / s.max(1e-9)).collect();
    Figure::new(stage, batch, unit, rates, seconds)
}

/// WAV decode, resampling to the model's rate if need be, and fbank of one clip.
fn front_end(fbank: &Fbank, path: &Path) -> anyhow::Result<FbankFrames> {
    let audio = decode_file(path).with_context(|| format!("decoding {}", path.display()))?;
    let rate = fbank.config().sample_rate;
    if audio.info.sample_rate == rate {
        return Ok(fbank.compute(&audio.samples));
    }
    let samples = resample(&audio.samples, audio.info.sample_rate, rate)
        .with_context(|| format!("resampling {}", path.display()))?;
    Ok(fbank.compute(&samples))
}

/// The front end on one thread, over as many clips as fill [`FRONT_END_MIN_SECONDS`].
fn measure_front_end(r: &mut Runner, fbank: &Fbank, clips: &[PathBuf]) -> anyhow::Result<()> {
    let started = Instant::now();
    front_end(fbank, &clips[0])?;
    let one = started.elapsed().as_secs_f64().max(1e-6);
    let per_rep = ((FRONT_END_MIN_SECONDS / one).ceil() as usize).clamp(1, 10_000);
    let seconds = r.time(|| {
        for k in 0..per_rep {
            front_end(fbank, &clips[k % clips.len()])?;
        }
        Ok(())
    })?;
    r.record(rate_figure(
        "front_end",
        1,
        "clips/s/core",
        per_rep as f64,
        seconds,
    ));
    Ok(())
}

fn measure_encoder(
    r: &mut Runner,
    model: &mut OnnxModel,
    batch: &[(&[f32], usize)],
) -> anyhow::Result<()> {
    let seconds = r.time(|| {
        model.encode(batch)?;
        Ok(())
    })?;
    r.record(rate_figure(
        "encoder",
        batch.len(),
        "clips/s",
        batch.len() as f64,
        seconds,
    ));
    Ok(())
}

/// Prefill alone, then fixed-length generation of `n` tokens, for the batch `audio`.
fn measure_decoder(
    r: &mut Runner,
    model: &mut OnnxModel,
    audio: &Array3<f32>,
    n: usize,
) -> anyhow::Result<()> {
    let b = audio.dim().0;
    let prompt_tokens = model.prompt_len();
    // The batch's audio where the model runs, as the encoder leaves it.
    let audio = &AudioEmbeds::from_array(model.device(), audio.clone())?;
    let prefill = r.time(|| {
        let embeds = model.prompt(audio)?;
        let past = model.empty_past(b, model.cache_capacity(n))?;
        // As generation runs it: the greedy choice where the model runs.
        let (_, cache) = model.decode_greedy(embeds, past, 0, &vec![false; b])?;
        // Fused attention reuses the buffers (warm-up runs allocate them).
        model.recycle_cache(cache);
        Ok(())
    })?;
    let prefill_mean = prefill.iter().sum::<f64>() / prefill.len().max(1) as f64;
    r.record(rate_figure(
        "prefill",
        b,
        "tokens/s",
        (b * prompt_tokens) as f64,
        prefill,
    ));

    let generated = r.time_generation(n, |tokens| generate_fixed(model, audio, tokens))?;
    if n >= 2 {
        // The steps after prefill: generation time less the mean prefill time.
        let rates = generated
            .iter()
            .map(|&t| (b * (n - 1)) as f64 / (t - prefill_mean).max(1e-9))
            .collect();
        r.record(Figure::new(
            "decode",
            b,
            "tokens/s",
            rates,
            generated.clone(),
        ));
    }
    r.record(rate_figure(
        "generate",
        b,
        "tokens/s",
        (b * n) as f64,
        generated,
    ));
    Ok(())
}

/// Decode + fbank + encode + generate `n` tokens + detokenise, for a batch of clips.
fn measure_end_to_end(
    r: &mut Runner,
    model: &mut OnnxModel,
    fbank: &Fbank,
    clips: &[&Path],
    n: usize,
) -> anyhow::Result<()> {
    let seconds = r.time_generation(n, |tokens| {
        let features = clips
            .iter()
            .map(|p| front_end(fbank, p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let inputs: Vec<(&[f32], usize)> = features
            .iter()
            .map(|f| (f.data.as_slice(), f.num_frames))
            .collect();
        let audio = model.encode(&inputs)?;
        let captions = generate(
            model,
            &audio,
            &GenerationParams {
                max_new_tokens: tokens,
                beams: 1,
                min_new_tokens: tokens,
            },
        )?;
        for c in &captions {
            model
                .tokenizer
                .decode(&c.token_ids, true)
                .map_err(|e| anyhow::anyhow!("detokenising: {e}"))?;
        }
        Ok(())
    })?;
    r.record(rate_figure(
        "end_to_end",
        clips.len(),
        "captions/s",
        clips.len() as f64,
        seconds,
    ));
    Ok(())
}

/// `--profile`: the model loaded again with ONNX Runtime's profiling on; two
/// encoder batches and two fixed-length generations (the first of each warms up);
/// the profile files moved into `dir`.
fn profile_generation(
    export_dir: &Path,
    options: &BenchOptions,
    dir: &Path,
    encoder_batch: &[(&[f32], usize)],
    audio: &Array3<f32>,
    n: usize,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut model = OnnxModel::load(
        export_dir,
        &EngineOptions {
            device: options.device,
            intra_threads: options.intra_threads,
            profile_prefix: Some(dir.join("ort-profile")),
        },
    )
    .with_context(|| format!("loading {} with profiling", export_dir.display()))?;
    model.encode(encoder_batch)?;
    model.encode(encoder_batch)?;
    let audio = AudioEmbeds::from_array(model.device(), audio.clone())?;
    generate_fixed(&mut model, &audio, n)?;
    generate_fixed(&mut model, &audio, n)?;
    let mut files = Vec::new();
    for written in model.end_profiling()? {
        // ONNX Runtime may write beside the working directory; keep them together.
        let target = dir.join(written.file_name().unwrap_or(written.as_os_str()));
        if written != target {
            std::fs::rename(&written, &target)
                .or_else(|_| std::fs::copy(&written, &target).map(|_| ()))
                .with_context(|| format!("moving {}", written.display()))?;
        }
        files.push(target);
    }
    Ok(files)
}

/// `audio` [1, n, h] repeated to [b, n, h].
fn tile(audio: &Array3<f32>, b: usize) -> Array3<f32> {
    let (_, n, h) = audio.dim();
    Array3::from_shape_fn((b, n, h), |(_, j, k)| audio[[0, j, k]])
}

/// Greedy generation of exactly `tokens` tokens per row.
fn generate_fixed(model: &mut OnnxModel, audio: &AudioEmbeds, tokens: usize) -> anyhow::Result<()> {
    let out = generate(
        model,
        audio,
        &GenerationParams {
            max_new_tokens: tokens,
            beams: 1,
            min_new_tokens: tokens,
        },
    )?;
    if let Some(short) = out.iter().find(|g| g.token_ids.len() != tokens) {
        bail!(
            "fixed-length generation gave {} tokens instead of {tokens}",
            short.token_ids.len()
        );
    }
    Ok(())
}

/// A ready export and what it took to get it.
struct Prepared {
    dir: PathBuf,
    /// The synthetic decoder's parameters (None for the fixture).
    decoder_parameters: Option<u64>,
    /// Seconds spent writing the sources (None when cached or the fixture).
    sources_s: Option<f64>,
    /// Seconds spent exporting (None when cached).
    export_s: Option<f64>,
}

/// Builds or reuses the sources and the export.
fn prepare_export(
    options: &BenchOptions,
    plan: &Plan,
    progress: &impl Fn(String),
) -> anyhow::Result<Prepared> {
    let mut sources_s = None;
    let (sources, source_key, parameters) = match plan.preset.synthetic(options.seed) {
        None => {
            let e2e = plan.fixtures.join("e2e-tiny");
            if !e2e.is_dir() {
                bail!(
                    "the fixture preset needs the reference fixtures: {} does not exist (pass --fixtures)",
                    e2e.display()
                );
            }
            let sources = ModelSources {
                beats: plan.fixtures.join("beats-tiny/beats.pt"),
                llm: e2e.join("llm"),
                projector: e2e.join("projector.safetensors"),
                adapters: Vec::new(),
                adapter_weights: None,
                prompt_template: None,
                pooling: Pooling::Mean,
            };
            let key = serde_json::json!({ "fixtures": plan.fixtures });
            (sources, key, None)
        }
        Some(model) => {
            let dir = plan
                .work_dir
                .join("sources")
                .join(format!("{}-seed{}", plan.preset, options.seed));
            let marker = dir.join("synthetic.json");
            let key = serde_json::to_value(&model)?;
            let cached = !options.rebuild
                && std::fs::read(&marker)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some_and(|v| v == key);
            if cached {
                progress(format!(
                    "reusing synthetic checkpoints in {}",
                    dir.display()
                ));
            } else {
                let tokenizer = options
                    .tokenizer
                    .clone()
                    .unwrap_or_else(|| plan.fixtures.join("e2e-tiny/llm/tokenizer.json"));
                if !tokenizer.is_file() {
                    bail!(
                        "the synthetic models need a Llama 3 tokenizer.json: {} does not exist \
                         (pass --tokenizer or --fixtures)",
                        tokenizer.display()
                    );
                }
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("removing {}", dir.display()))?;
                }
                progress(format!(
                    "writing synthetic checkpoints ({:.2} B decoder parameters) to {}",
                    model.llama.num_parameters() as f64 / 1e9,
                    dir.display()
                ));
                let started = Instant::now();
                model
                    .write(&dir, &tokenizer)
                    .with_context(|| format!("writing {}", dir.display()))?;
                // The marker last: a half-written directory is never reused.
                std::fs::write(&marker, serde_json::to_vec_pretty(&key)?)
                    .with_context(|| format!("writing {}", marker.display()))?;
                sources_s = Some(started.elapsed().as_secs_f64());
            }
            let sources = ModelSources {
                beats: dir.join("beats.safetensors"),
                llm: dir.join("llm"),
                projector: dir.join("projector.safetensors"),
                adapters: Vec::new(),
                adapter_weights: None,
                prompt_template: None,
                pooling: Pooling::Mean,
            };
            (sources, key, Some(model.llama.num_parameters()))
        }
    };

    let name = format!(
        "bench-{}-{}-{}-seed{}",
        plan.preset,
        fmt_dtype(plan.dtype),
        fmt_attention(plan.attention),
        options.seed
    );
    let exports = plan.work_dir.join("exports");
    let out = exports.join(&name);
    let marker = exports.join(format!("{name}.bench.json"));
    let export_key = serde_json::json!({
        "sources": source_key,
        "dtype": plan.dtype,
        "attention": plan.attention,
        "audiocap_version": env!("CARGO_PKG_VERSION"),
        "graph_revision": crate::export::GRAPH_REVISION,
    });
    let cached = !options.rebuild
        && sources_s.is_none()
        && ModelManifest::read(&out).is_ok()
        && std::fs::read(&marker)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v == export_key);
    if cached {
        progress(format!("reusing the export in {}", out.display()));
        return Ok(Prepared {
            dir: out,
            decoder_parameters: parameters,
            sources_s,
            export_s: None,
        });
    }
    let _ = std::fs::remove_file(&marker);
    progress(format!(
        "exporting ({}) to {}",
        fmt_dtype(plan.dtype),
        out.display()
    ));
    let started = Instant::now();
    export_model(&ExportOptions {
        sources,
        dtype: plan.dtype,
        attention: plan.attention,
        name,
        out: out.clone(),
        overwrite: true,
    })
    .context("exporting the benchmark model")?;
    let export_s = started.elapsed().as_secs_f64();
    std::fs::write(&marker, serde_json::to_vec_pretty(&export_key)?)
        .with_context(|| format!("writing {}", marker.display()))?;
    Ok(Prepared {
        dir: out,
        decoder_parameters: parameters,
        sources_s,
        export_s: Some(export_s),
    })
}

/// Writes `count` test clips of `seconds` at `rate` Hz (16-bit PCM WAV,
/// a chirp over noise, different per clip) and returns their paths.
fn write_clips(dir: &Path, rate: u32, seconds: f64, count: usize) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let samples = (seconds * f64::from(rate)).round() as usize;
    (0..count.max(1))
        .map(|k| {
            let path = dir.join(format!("clip-{rate}hz-{seconds}s-{k}.wav"));
            if !path.is_file() {
                let wav = synthetic_wav(rate, samples, k as u64);
                let tmp = path.with_extension("wav.partial");
                std::fs::write(&tmp, wav).with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&tmp, &path)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(path)
        })
        .collect()
}

/// A mono 16-bit PCM WAV file: a rising chirp over white noise.
fn synthetic_wav(rate: u32, samples: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let (f0, f1) = (200.0 + 50.0 * seed as f64, 4000.0);
    let duration = samples as f64 / f64::from(rate);
    let signal = (0..samples).map(move |i| {
        let t = i as f64 / f64::from(rate);
        let phase = 2.0 * std::f64::consts::PI * (f0 * t + (f1 - f0) * t * t / (2.0 * duration));
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        (0.3 * phase.sin() + 0.1 * noise) as f32
    });
    crate::audio::wav::encode_pcm16(signal, rate)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchOptions,
    }

    #[test]
    fn defaults_match_the_command_line_defaults() {
        let parsed = Cli::parse_from(["bench"]).bench;
        assert_eq!(parsed, BenchOptions::default());
        let parsed = Cli::parse_from([
            "bench",
            "--preset",
            "real",
            "--device",
            "cuda:1",
            "--batch-sizes",
            "1,64,256",
            "--dtype",
            "f16",
        ])
        .bench;
        assert_eq!(parsed.preset, BenchPreset::Real);
        assert_eq!(parsed.device, DeviceSpec::Cuda(1));
        assert_eq!(parsed.batch_sizes, Some(vec![1, 64, 256]));
        assert_eq!(parsed.dtype, Some(ExportDtype::F16));
    }

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

    #[test]
    fn synthetic_wavs_decode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.wav");
        std::fs::write(&path, synthetic_wav(16_000, 16_000, 3)).unwrap();
        let audio = decode_file(&path).unwrap();
        assert_eq!(audio.info.sample_rate, 16_000);
        assert_eq!(audio.samples.len(), 16_000);
        let peak = audio.samples.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((0.3..0.45).contains(&peak), "{peak}");

        // A 44.1 kHz clip is resampled to the model's rate by the front end.
        let fbank = Fbank::new(crate::audio::fbank::FbankConfig::default()).unwrap();
        let path = dir.path().join("b.wav");
        std::fs::write(&path, synthetic_wav(44_100, 44_100, 3)).unwrap();
        let frames = front_end(&fbank, &path).unwrap();
        assert_eq!(frames.num_frames, fbank.num_frames(16_000));
        assert!(frames.data.iter().all(|v| v.is_finite()));
    }

    /// The whole benchmark on the tiny random model: every figure is there and finite,
    /// and a second run reuses the checkpoints and the export.
    #[test]
    fn tiny_preset_runs_and_reuses_its_export() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("report.json");
        let options = BenchOptions {
            preset: BenchPreset::Tiny,
            clip_seconds: 1.0,
            new_tokens: 3,
            repetitions: Some(1),
            batch_sizes: Some(vec![1, 2]),
            work_dir: Some(dir.path().join("work")),
            json: Some(json.clone()),
            quiet: true,
            ..BenchOptions::default()
        };
        let report = run_bench(&options).unwrap();
        assert!(report.setup.sources_s.is_some() && report.setup.export_s.is_some());
        for (stage, batch) in [
            ("front_end", 1),
            ("encoder", 2),
            ("prefill", 1),
            ("prefill", 2),
            ("decode", 1),
            ("decode", 2),
            ("generate", 2),
            ("end_to_end", 2),
        ] {
            let f = report
                .figure(stage, batch)
                .unwrap_or_else(|| panic!("{stage} {batch} missing"));
            assert!(f.mean.is_finite() && f.mean > 0.0, "{stage}: {}", f.mean);
            assert_eq!(f.rates.len(), 1);
        }
        assert_eq!(report.model.hidden_size, 64);
        assert_eq!(report.model.prompt_tokens, 17);
        eprintln!("{report}");
        let text = report.to_string();
        assert!(text.contains("end_to_end"), "{text}");
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(written["preset"], "tiny");

        // The second run reuses everything and measures only what `--stages` names.
        let again = run_bench(&BenchOptions {
            stages: Some(vec![BenchStage::Decoder]),
            ..options
        })
        .unwrap();
        assert!(again.setup.sources_s.is_none() && again.setup.export_s.is_none());
        let measured: Vec<&str> = again.figures.iter().map(|f| f.stage).collect();
        assert_eq!(
            measured,
            [
                "prefill", "decode", "generate", "prefill", "decode", "generate"
            ],
            "{again}"
        );
    }
}
