//! From an audio file (or object bytes) to mono samples at the model's rate:
//! streaming decode, down-mix, and resampling as packets arrive.

use std::ops::ControlFlow;
use std::path::Path;

use super::decode::{AudioInfo, DecodeError, decode_stream_with_rate};
use super::resample::{ResampleError, Resampler};

#[derive(Debug, thiserror::Error)]
pub enum FrontEndError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("resampling: {0}")]
    Resample(#[from] ResampleError),
}

/// Decoded audio at the model's rate.
#[derive(Debug, Clone)]
pub struct ModelAudio {
    /// Mono samples at `rate`.
    pub samples: Vec<f32>,
    pub rate: u32,
    /// The source as decoded (its own rate, channels, codec, length).
    pub info: AudioInfo,
}

/// Decodes `source` and resamples it to `rate` while decoding.
pub fn decode_to_rate<R>(
    source: R,
    hint_extension: Option<&str>,
    rate: u32,
) -> Result<ModelAudio, FrontEndError>
where
    R: std::io::Read + std::io::Seek + Send + Sync,
{
    let mut samples = Vec::new();
    let mut resampler: Option<Resampler> = None;
    let mut failure: Option<ResampleError> = None;
    let info = decode_stream_with_rate(source, hint_extension, |source_rate, chunk| {
        if source_rate == rate {
            samples.extend_from_slice(chunk);
            return ControlFlow::Continue(());
        }
        if resampler.is_none() {
            match Resampler::new(source_rate, rate) {
                Ok(r) => resampler = Some(r),
                Err(e) => {
                    failure = Some(e);
                    return ControlFlow::Break(());
                }
            }
        }
        if let Some(r) = resampler.as_mut() {
            r.push(chunk, &mut samples);
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    if let Some(mut r) = resampler {
        r.finish(&mut samples);
    }
    Ok(ModelAudio {
        samples,
        rate,
        info,
    })
}

/// [`decode_to_rate`] for a local file.
pub fn decode_file_to_rate(path: &Path, rate: u32) -> Result<ModelAudio, FrontEndError> {
    let file = std::fs::File::open(path).map_err(|source| DecodeError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let hint = path.extension().and_then(|e| e.to_str());
    decode_to_rate(std::io::BufReader::new(file), hint, rate)
}

/// [`decode_to_rate`] for bytes in memory (an object fetched from storage).
pub fn decode_bytes_to_rate(
    bytes: &[u8],
    hint_extension: Option<&str>,
    rate: u32,
) -> Result<ModelAudio, FrontEndError> {
    decode_to_rate(std::io::Cursor::new(bytes), hint_extension, rate)
}
