//! From an audio file (or object bytes) to mono samples at the model's rate:
//! streaming decode (native, or the ffmpeg fallback for what no native decoder reads:
//! [`FrontEnd::with_ffmpeg`], on by default when `ffmpeg` is on PATH), down-mix,
//! resampling as packets arrive, and segmentation.
//!
//! The pipeline's decode stage calls [`FrontEnd::decode_segments`] (or the one-shot
//! [`decode_segments`]) on a blocking thread: it streams the input packet by packet and
//! hands each segment to a callback as soon as it is complete, so memory stays bounded
//! by one segment window (see [`Segmenter`]) whatever the input's length.
//! [`decode_to_rate`] collects a whole clip instead, for callers that want it in memory.

use std::io::{Read, Seek};
use std::ops::ControlFlow;
use std::path::Path;

use super::decode::{AudioInfo, DecodeError, Fallback, decode_stream_or_ffmpeg};
use super::ffmpeg::FfmpegOptions;
use super::resample::{ResampleError, Resampler};
use super::segment::{SegmentAudio, SegmentConfig, Segmenter};

#[derive(Debug, thiserror::Error)]
pub enum FrontEndError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("resampling: {0}")]
    Resample(#[from] ResampleError),
    /// The segmentation settings are unusable (every problem, `; `-separated).
    #[error("invalid segment config: {0}")]
    SegmentConfig(String),
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

/// A reusable front end for one worker thread: decoding, resampling to the model's
/// rate and segmentation, keeping the resampler (filter and FFT plans) from one input
/// to the next when their sample rates agree.
#[derive(Debug)]
pub struct FrontEnd {
    rate: u32,
    segments: SegmentConfig,
    /// The last resampler built; rebuilt when an input's rate differs.
    resampler: Option<Resampler>,
    /// Peak buffered samples of the segmenter over every input so far.
    peak_buffered: usize,
    /// The fallback for inputs no native decoder reads.
    ffmpeg: FfmpegOptions,
}

impl FrontEnd {
    /// A front end producing mono audio at `rate` Hz cut as `segments` says.
    pub fn new(rate: u32, segments: SegmentConfig) -> Result<Self, FrontEndError> {
        segments
            .validate()
            .map_err(|problems| FrontEndError::SegmentConfig(problems.join("; ")))?;
        Ok(Self {
            rate,
            segments,
            resampler: None,
            peak_buffered: 0,
            ffmpeg: FfmpegOptions::default(),
        })
    }

    /// Sets the ffmpeg fallback (default: `ffmpeg` on `PATH`, if there is one).
    pub fn with_ffmpeg(mut self, ffmpeg: FfmpegOptions) -> Self {
        self.ffmpeg = ffmpeg;
        self
    }

    /// The model's sample rate, in Hz.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// The most model-rate samples the segmenter has held at once, over every input so
    /// far: the front end's memory bound in action.
    pub fn peak_buffered(&self) -> usize {
        self.peak_buffered
    }

    /// Decodes `source`, resamples it to the model's rate and hands out its segments
    /// (as [`plan_segments`](super::segment::plan_segments) cuts the whole stream) in
    /// order, each as soon as it is complete; the last one after the stream ends.
    ///
    /// `hint_extension` (e.g. `"mp3"`, no dot) speeds up the probe but is not trusted.
    /// `on_segment` returns [`ControlFlow::Break`] to stop early; the result then
    /// describes what was decoded up to then. An empty but valid stream gives one empty
    /// segment (the caller decides whether a segment is long enough to caption).
    /// Segment samples are copied out, so memory stays bounded by about one window.
    pub fn decode_segments<R>(
        &mut self,
        source: R,
        hint_extension: Option<&str>,
        on_segment: impl FnMut(SegmentAudio) -> ControlFlow<()>,
    ) -> Result<AudioInfo, FrontEndError>
    where
        R: Read + Seek + Send + Sync,
    {
        self.decode_segments_at(source, hint_extension, None, on_segment)
    }

    /// [`FrontEnd::decode_segments`] of a source that is the local file `path`, when
    /// it is one (ffmpeg, if it has to read it, then reads the file in place).
    pub fn decode_segments_at<R>(
        &mut self,
        source: R,
        hint_extension: Option<&str>,
        path: Option<&Path>,
        mut on_segment: impl FnMut(SegmentAudio) -> ControlFlow<()>,
    ) -> Result<AudioInfo, FrontEndError>
    where
        R: Read + Seek + Send + Sync,
    {
        let mut segmenter = Segmenter::new(self.rate, &self.segments);
        let mut stopped = false;
        let info = self.decode_at_rate(source, hint_extension, path, &mut |chunk| {
            let flow = segmenter.push(chunk, &mut on_segment);
            stopped = flow.is_break();
            flow
        })?;
        if !stopped {
            let _ = segmenter.finish(&mut on_segment);
        }
        self.peak_buffered = self.peak_buffered.max(segmenter.peak_buffered());
        Ok(info)
    }

    /// [`FrontEnd::decode_segments`] for a local file (its extension is the hint).
    pub fn decode_file_segments(
        &mut self,
        path: &Path,
        on_segment: impl FnMut(SegmentAudio) -> ControlFlow<()>,
    ) -> Result<AudioInfo, FrontEndError> {
        let file = open(path)?;
        let hint = path.extension().and_then(|e| e.to_str());
        self.decode_segments_at(std::io::BufReader::new(file), hint, Some(path), on_segment)
    }

    /// Decodes a whole input to the model's rate, in memory.
    pub fn decode_to_rate<R>(
        &mut self,
        source: R,
        hint_extension: Option<&str>,
    ) -> Result<ModelAudio, FrontEndError>
    where
        R: Read + Seek + Send + Sync,
    {
        let mut samples = Vec::new();
        let info = self.decode_at_rate(source, hint_extension, None, &mut |chunk| {
            samples.extend_from_slice(chunk);
            ControlFlow::Continue(())
        })?;
        Ok(ModelAudio {
            samples,
            rate: self.rate,
            info,
        })
    }

    /// Streams `source` through the decoder and the resampler, handing model-rate
    /// chunks to `on_chunk` (the resampler's tail included, unless `on_chunk` stopped).
    fn decode_at_rate<R>(
        &mut self,
        source: R,
        hint_extension: Option<&str>,
        path: Option<&Path>,
        on_chunk: &mut dyn FnMut(&[f32]) -> ControlFlow<()>,
    ) -> Result<AudioInfo, FrontEndError>
    where
        R: Read + Seek + Send + Sync,
    {
        let rate = self.rate;
        let mut resampled = Vec::new();
        let mut failure: Option<ResampleError> = None;
        let mut stopped = false;
        // Set up on the first packet, when the source's rate is known.
        let mut ready = false;
        let cached = &mut self.resampler;
        let fallback = Fallback {
            ffmpeg: &self.ffmpeg,
            rate,
            path,
        };
        let info =
            decode_stream_or_ffmpeg(source, hint_extension, &fallback, |source_rate, chunk| {
                if !ready {
                    match cached {
                        Some(r) if r.from_hz() == source_rate => r.reset(),
                        _ => match Resampler::new(source_rate, rate) {
                            Ok(r) => *cached = Some(r),
                            Err(e) => {
                                failure = Some(e);
                                return ControlFlow::Break(());
                            }
                        },
                    }
                    ready = true;
                }
                let Some(resampler) = cached.as_mut() else {
                    return ControlFlow::Break(());
                };
                resampled.clear();
                resampler.push(chunk, &mut resampled);
                let flow = on_chunk(&resampled);
                stopped = flow.is_break();
                flow
            })?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        if let Some(resampler) = self.resampler.as_mut().filter(|_| ready) {
            resampled.clear();
            resampler.finish(&mut resampled);
            if !stopped {
                let _ = on_chunk(&resampled);
            }
        }
        Ok(info)
    }
}

fn open(path: &Path) -> Result<std::fs::File, DecodeError> {
    let open_error = |source| DecodeError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(open_error)?;
    if file.metadata().map_err(open_error)?.is_dir() {
        return Err(open_error(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory",
        )));
    }
    Ok(file)
}

/// Decodes `source` to mono at `rate` Hz and hands out its segments as `config` cuts
/// them; see [`FrontEnd::decode_segments`]. A worker that decodes many inputs should
/// keep one [`FrontEnd`] instead, which reuses the resampler.
pub fn decode_segments<R>(
    source: R,
    hint_extension: Option<&str>,
    rate: u32,
    config: &SegmentConfig,
    on_segment: impl FnMut(SegmentAudio) -> ControlFlow<()>,
) -> Result<AudioInfo, FrontEndError>
where
    R: Read + Seek + Send + Sync,
{
    FrontEnd::new(rate, *config)?.decode_segments(source, hint_extension, on_segment)
}

/// [`decode_segments`] for a local file.
pub fn decode_file_segments(
    path: &Path,
    rate: u32,
    config: &SegmentConfig,
    on_segment: impl FnMut(SegmentAudio) -> ControlFlow<()>,
) -> Result<AudioInfo, FrontEndError> {
    FrontEnd::new(rate, *config)?.decode_file_segments(path, on_segment)
}

/// Decodes `source` and resamples it to `rate` while decoding.
pub fn decode_to_rate<R>(
    source: R,
    hint_extension: Option<&str>,
    rate: u32,
) -> Result<ModelAudio, FrontEndError>
where
    R: Read + Seek + Send + Sync,
{
    FrontEnd::new(rate, SegmentConfig::default())?.decode_to_rate(source, hint_extension)
}

/// [`decode_to_rate`] for a local file.
pub fn decode_file_to_rate(path: &Path, rate: u32) -> Result<ModelAudio, FrontEndError> {
    let file = open(path)?;
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
