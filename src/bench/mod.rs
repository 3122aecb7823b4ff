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
//!
//! The models are random-weight checkpoints in the published formats
//! ([`crate::model::synthetic`]), at real or reduced size, so no weights travel and
//! the normal exporter runs on them.
//!
//! - [`options`]: the preset, the figures to take, the options and their plan;
//! - [`prepare`]: the synthetic checkpoints and their export, built once and reused;
//! - [`clips`]: the synthesised test clips;
//! - [`measure`]: the timed runs of each figure;
//! - [`report`]: the figures and what ran, as a table and as JSON;
//! - [`run`]: [`run_bench`], one benchmark from options to report.

mod clips;
mod measure;
mod options;
mod prepare;
mod report;
mod run;

pub use options::{BenchOptions, BenchPreset, BenchStage};
pub use report::{BenchReport, Figure, ModelSummary, SetupTimes};
pub use run::run_bench;
