//! Audio front end shared by the pipeline and the trainer: decoding, resampling,
//! segmentation and the fbank.

pub mod decode;
pub mod fbank;
pub mod frontend;
pub mod resample;
pub mod segment;
