//! The production runtime: the exported model on ONNX Runtime (`ort`), CUDA where
//! there is a GPU and the CPU elsewhere.

pub mod audio;
pub mod captioner;
pub mod continuous;
pub mod generate;
pub mod kv_cache;
pub mod model;
pub mod runtime;
