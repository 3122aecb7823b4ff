//! Audio front end shared by the pipeline and the trainer: decoding, resampling,
//! segmentation and the fbank.

pub mod decode;
pub mod fbank;
pub mod files;
pub mod frontend;
pub mod resample;
pub mod segment;
pub mod wav;

/// File extensions taken when a folder or prefix is listed (explicit files are taken
/// whatever their extension).
pub const AUDIO_EXTENSIONS: &[&str] = &[
    "wav", "wave", "flac", "mp3", "ogg", "oga", "opus", "m4a", "mp4", "aac", "alac", "aif", "aiff",
    "caf", "mka", "mkv", "webm",
];
