//! The captioning model in candle, one file per published component.
//!
//! `beats` (audio encoder) → `projector` (per-patch MLP + pooling) → `llama` (decoder,
//! with `lora` adapters folded in or applied on the fly). `weights` and `checkpoint`
//! load tensors from safetensors and torch zip checkpoints with errors that name the
//! file and the tensor. `synthetic` writes random-weight checkpoints in the same
//! published formats (for the benchmark, the pre-trainers and tests).

pub mod beats;
pub mod bert;
pub mod checkpoint;
pub mod frozen;
pub mod init;
pub mod llama;
pub mod lora;
mod pickle;
pub mod projector;
pub mod prompt;
pub mod sources;
pub mod synthetic;
pub mod weights;
