//! Audio front end shared by the pipeline and the trainer: decoding and the fbank.

pub mod decode;
pub mod fbank;
