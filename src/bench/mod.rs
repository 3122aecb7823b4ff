//! `audiocap bench`: throughput of an exported model on ONNX Runtime, on models that
//! are built on the machine that runs the benchmark.
//!
//! The models are random-weight checkpoints in the published formats
//! ([`crate::model::synthetic`]), at real or reduced size, so no weights travel and
//! the normal exporter runs on them.
//!
//! - [`throughput`]: builds (or reuses) and exports a preset model, then measures the
//!   front end, the encoder, decoder prefill and decode, and end-to-end captioning.

pub mod throughput;

pub use throughput::{BenchOptions, BenchPreset, BenchReport, run_bench};
