//! The production runtime: the exported model on ONNX Runtime (`ort`), CUDA where
//! there is a GPU and the CPU elsewhere.
//!
//! Files, lowest first (each uses only those above it): `runtime` (the library,
//! session builders, the doctor report), `error`, `session` (runs bound on the
//! device, helper graphs), `kv_cache` and `audio` (values kept where the model runs),
//! `model` (an export's sessions), `generate` and `continuous` (decoding),
//! `captioner` (a batch of segments to rows).

pub mod audio;
pub mod captioner;
pub mod continuous;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod model;
pub mod runtime;
mod session;
