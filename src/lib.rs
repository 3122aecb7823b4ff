//! audiocap: natural-language captions for large audio archives.
//!
//! The crate is layered so data flows one way:
//! `main (cli) → pipeline → stages → engine (ONNX Runtime) | storage | dataset → audio`,
//! and `caption → model (candle) → audio` for the reference path.
//!
//! Layers, highest first (`scripts/check-layers.py`, run by CI, holds the code to
//! them): a module uses only modules on lines below its own, never one beside it.
//!
//! layers:begin
//! main
//! bench
//! pipeline train
//! corpus stages
//! eval dataset
//! caption engine export
//! manifest
//! model storage output
//! audio
//! config rng onnx graph_io atomic
//! layers:end
//!
//! - [`atomic`]: writing a file or folder beside its final name and renaming it into
//!   place (one staging-name rule).
//! - [`audio`]: waveform decoding and the BEATs front end (Kaldi fbank).
//! - [`model`]: the published architecture in candle: BEATs encoder, projector and
//!   pooling, Llama 3 decoder, LoRA adapters, and the checkpoint readers they share.
//! - [`caption`]: the prompt template and greedy captioning on candle (the reference
//!   path that the ONNX export is checked against).
//! - [`config`]: the one settings-file loader (TOML, `--set`, every problem listed)
//!   and the one device grammar.
//! - [`corpus`]: `audiocap corpus build`: the captioning corpus made from freely
//!   licensed Debian sound packages, espeak-ng speech and synthetic signals.
//! - [`export`]: the model written as ONNX graphs with a manifest (`audiocap export`).
//! - [`engine`]: the exported model on ONNX Runtime (`audiocap caption`).
//! - [`rng`]: the one seeded random-number generator (SplitMix64).
//! - [`pipeline`]: `audiocap run`: pipeline files, the wiring of the stages, progress
//!   and the run summary.
//! - [`stages`]: list, fetch, decode, batch, model, sink: async loops between bounded
//!   channels.
//! - [`storage`]: local and object-store locations, streaming listing, manifests,
//!   shards, fetching.
//! - [`dataset`]: the captions dataset on local disk or an object store: size-targeted
//!   Parquet parts committed atomically, per-shard commit records, resume by URI.

pub mod atomic;
pub mod audio;
pub mod bench;
pub mod caption;
pub mod config;
pub mod corpus;
pub mod dataset;
pub mod engine;
pub mod eval;
pub mod export;
pub mod manifest;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod rng;
pub mod stages;
pub mod storage;
pub mod train;

#[cfg(test)]
mod test_util;
