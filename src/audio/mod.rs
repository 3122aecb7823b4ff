//! Audio front end shared by the pipeline and the trainer: decoding, resampling,
//! segmentation and the fbank.

pub mod decode;
pub mod fbank;
pub mod ffmpeg;
pub mod files;
pub mod formats;
pub mod frontend;
pub mod opus;
pub mod resample;
pub mod segment;
pub mod wav;

/// File extensions taken when a folder or prefix is listed (explicit files are taken
/// whatever their extension): every format either decoder reads, native or ffmpeg
/// ([`formats::FORMATS`] says which reads what).
pub const AUDIO_EXTENSIONS: &[&str] = &[
    // Native.
    "wav", "wave", "bwf", "flac", "mp3", "mp2", "mp1", "mpa", "mpga", "ogg", "oga", "opus", "aac",
    "adts", "m4a", "m4b", "m4r", "mp4", "m4v", "mov", "alac", "aif", "aiff", "aifc", "caf", "mka",
    "mkv", "webm", "weba", // ffmpeg.
    "wma", "asf", "wmv", "ac3", "eac3", "ec3", "dts", "wv", "ape", "amr", "awb", "3gp", "3g2",
    "ra", "rm", "rmvb", "tta", "mpc", "spx", "au", "snd", "voc", "w64", "rf64", "dsf", "dff",
    "gsm", "avi", "flv", "mpg", "mpeg", "vob", "ts", "m2ts", "mts", "mxf", "dv", "ogv",
];
