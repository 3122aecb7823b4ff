//! `audiocap export`: the candle model written as ONNX graphs plus a manifest.

pub mod decoder;
pub mod encoder;
pub mod onnx;
