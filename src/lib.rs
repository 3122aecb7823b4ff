//! audiocap: natural-language captions for large audio archives.
//!
//! The crate is layered so dependencies point one way, from the command-line edge
//! down: `cli → pipeline → stages → engine (ONNX Runtime) | storage | dataset →
//! audio`, and `caption → model (candle) → audio` for the reference path.
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
//! config rng onnx graph_io atomic retry keyset
//! layers:end
//!
//! From the top layer down:
//!
//! - the binary (`src/main.rs`, `src/cli/`): parse, dispatch, exit code; one module
//!   per command.
//! - [`bench`]: `audiocap bench`: throughput of the front end, encoder, decoder and
//!   end to end on synthetic checkpoints.
//! - [`pipeline`]: the staged pipeline and its two intakes: `audiocap run` (pipeline
//!   files, shards, resume, a dataset) and `audiocap caption` (given files, one
//!   Parquet file); progress and the run summary.
//! - [`train`]: `audiocap train` (projector and LoRA on the frozen model) and
//!   `audiocap pretrain` (a decoder and an encoder from scratch).
//! - [`corpus`]: `audiocap corpus build`: the captioning corpus made from freely
//!   licensed Debian sound packages, espeak-ng speech and synthetic signals.
//! - [`stages`]: list, fetch, decode, batch, model, sink: async loops between bounded
//!   channels.
//! - [`eval`]: `audiocap eval`: the DCASE caption metrics.
//! - [`dataset`]: the captions dataset on local disk or an object store: size-targeted
//!   Parquet parts committed atomically, per-shard commit records, resume by URI.
//! - [`caption`]: the prompt template and greedy captioning on candle (the reference
//!   path that the ONNX export is checked against).
//! - [`engine`]: the exported model on ONNX Runtime.
//! - [`export`]: the model written as ONNX graphs with a manifest (`audiocap export`).
//! - [`manifest`]: `model.json` of an exported model, and the check of its files.
//! - [`model`]: the published architecture in candle: BEATs encoder, projector and
//!   pooling, Llama 3 decoder, LoRA adapters, and the checkpoint readers they share.
//! - [`storage`]: local and object-store locations, streaming listing, manifests,
//!   shards, fetching.
//! - [`output`]: the captions table: its schema, rows and failure kinds, the file
//!   writer.
//! - [`audio`]: the folder walk, waveform decoding and the BEATs front end (Kaldi
//!   fbank).
//! - [`config`]: the one settings-file loader (TOML, `--set`, every problem listed)
//!   and the one device grammar.
//! - [`onnx`]: ONNX protobuf messages and a graph builder (external data for large
//!   models), for the exporter's graphs and the engine's small helper graphs.
//! - [`graph_io`]: the contract between export and engine: the names of the graphs'
//!   inputs and outputs and the limits both hold to.
//! - [`rng`]: the one seeded random-number generator (SplitMix64).
//! - [`keyset`]: sets of input URIs at a hash and an offset per key in memory, the
//!   keys spilled to local disk (resume and the listing's duplicate check).
//! - [`retry`]: the one policy for transient faults (a budget, doubling waits).
//! - [`atomic`]: writing a file or folder beside its final name and renaming it into
//!   place (one staging-name rule).

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
pub mod graph_io;
pub mod keyset;
pub mod manifest;
pub mod model;
pub mod onnx;
pub mod output;
pub mod pipeline;
pub mod retry;
pub mod rng;
pub mod stages;
pub mod storage;
pub mod train;

#[cfg(test)]
mod test_util;
