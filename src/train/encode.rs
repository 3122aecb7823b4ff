//! Training clips through the frozen encoder, once: decode (the pipeline's front end:
//! symphonia, down-mix, resampling to 16 kHz), cut to `max_seconds`, fbank, BEATs,
//! then the [`FeatureCache`]. Later epochs and stages read the cache only.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::data::TrainClip;
use super::features::{CacheError, FeatureCache, Lookup, encoder_identity};
use crate::audio::fbank::{Fbank, FbankConfig};
use crate::audio::frontend::FrontEnd;
use crate::audio::segment::SegmentConfig;
use crate::model::beats::Beats;
use crate::model::weights::LoadError;

/// A clip ready for training: where its encoder features are cached, and its
/// captions. Features stay on disk until a step needs them (AudioCaps' would take
/// ~75 GB of memory), so memory does not grow with the training set.
#[derive(Debug, Clone)]
pub struct EncodedClip {
    pub key: String,
    /// The feature cache key (the audio's SHA-256).
    pub cache_key: String,
    /// [P, D] of the cached features.
    pub shape: Vec<usize>,
    pub captions: Vec<String>,
}

/// What encoding a set did.
#[derive(Debug, Clone, Default)]
pub struct EncodeReport {
    /// Clips found in the cache.
    pub cached: usize,
    /// Clips run through the encoder now.
    pub computed: usize,
    /// (key, why) of clips left out: undecodable, too short, ...
    pub skipped: Vec<(String, String)>,
}

/// The frozen encoder and its front end.
pub struct ClipEncoder {
    beats: Option<Beats>,
    beats_path: std::path::PathBuf,
    front_end: FrontEnd,
    fbank: Fbank,
    max_samples: usize,
    cache: FeatureCache,
    device: Device,
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Setup(String),
}

/// Why one clip could not be encoded (reported, the clip is skipped).
#[derive(Debug, thiserror::Error)]
enum ClipError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{0}")]
    Clip(String),
    /// The encoder itself cannot run: fails the whole set.
    #[error("{0}")]
    Encoder(String),
}

impl ClipEncoder {
    /// The encoder at `beats` with its cache under `cache_root`. The checkpoint is
    /// loaded only when a clip misses the cache.
    pub fn new(
        beats: &Path,
        cache_root: &Path,
        max_seconds: f64,
        device: &Device,
    ) -> Result<Self, EncodeError> {
        let fbank_config = FbankConfig::default();
        let rate = fbank_config.sample_rate;
        let front_end = FrontEnd::new(rate, SegmentConfig::default())
            .map_err(|e| EncodeError::Setup(e.to_string()))?;
        let fbank =
            Fbank::new(fbank_config.clone()).map_err(|e| EncodeError::Setup(e.to_string()))?;
        let identity = encoder_identity(
            beats,
            &serde_json::json!({
                "fbank": format!("{fbank_config:?}"),
                "max_seconds": max_seconds,
                "rate": rate,
            })
            .to_string(),
        )?;
        Ok(Self {
            beats: None,
            beats_path: beats.to_path_buf(),
            front_end,
            fbank,
            max_samples: (max_seconds * rate as f64).round() as usize,
            cache: FeatureCache::open(cache_root, &identity)?,
            device: device.clone(),
        })
    }

    /// Encodes every clip (cache first). A clip that fails is reported in the
    /// report's `skipped` and left out; only a broken encoder or cache folder fails
    /// the whole call. `progress` is called after each clip.
    pub fn encode_all(
        &mut self,
        clips: &[TrainClip],
        mut progress: impl FnMut(usize),
    ) -> Result<(Vec<EncodedClip>, EncodeReport), EncodeError> {
        let mut out = Vec::with_capacity(clips.len());
        let mut report = EncodeReport::default();
        for (i, clip) in clips.iter().enumerate() {
            match self.encode(&clip.audio) {
                Ok((cache_key, shape, lookup)) => {
                    match lookup {
                        Lookup::Hit => report.cached += 1,
                        Lookup::Computed => report.computed += 1,
                    }
                    out.push(EncodedClip {
                        key: clip.key.clone(),
                        cache_key,
                        shape,
                        captions: clip.captions.clone(),
                    });
                }
                Err(ClipError::Clip(why)) => report.skipped.push((clip.key.clone(), why)),
                Err(ClipError::Cache(CacheError::Io { path, source })) if path == clip.audio => {
                    report
                        .skipped
                        .push((clip.key.clone(), format!("cannot read the audio: {source}")))
                }
                Err(ClipError::Cache(e)) => return Err(e.into()),
                Err(ClipError::Encoder(why)) => return Err(EncodeError::Setup(why)),
            }
            progress(i + 1);
        }
        Ok((out, report))
    }

    /// The features of an encoded clip, read from the cache ([P, D] f32, CPU).
    pub fn load(&self, clip: &EncodedClip) -> Result<Tensor, EncodeError> {
        self.cache.get(&clip.cache_key).ok_or_else(|| {
            EncodeError::Setup(format!(
                "the cached features of {} ({}) are gone or damaged; run again to recompute them",
                clip.key, clip.cache_key
            ))
        })
    }

    fn encode(&mut self, audio: &Path) -> Result<(String, Vec<usize>, Lookup), ClipError> {
        let cache = self.cache.clone();
        cache.get_or_compute(audio, || self.compute(audio))
    }

    fn compute(&mut self, audio: &Path) -> Result<Tensor, ClipError> {
        let file = std::fs::File::open(audio)
            .map_err(|e| ClipError::Clip(format!("cannot open {}: {e}", audio.display())))?;
        let hint = audio.extension().and_then(|e| e.to_str());
        let decoded = self
            .front_end
            .decode_to_rate(std::io::BufReader::new(file), hint)
            .map_err(|e| ClipError::Clip(e.to_string()))?;
        let mut samples = decoded.samples;
        samples.truncate(self.max_samples);
        if samples.iter().any(|s| !s.is_finite()) {
            return Err(ClipError::Clip(
                "the audio has NaN or infinite samples".into(),
            ));
        }
        if self.beats.is_none() {
            let beats = Beats::load(&self.beats_path, DType::F32, &self.device)
                .map_err(|e| ClipError::Encoder(format!("loading the encoder: {e}")))?;
            self.beats = Some(beats);
        }
        let beats = self.beats.as_ref().expect("loaded above");
        let frames = self.fbank.compute(&samples);
        let min_frames = beats.config().input_patch_size;
        if frames.num_frames < min_frames {
            return Err(ClipError::Clip(self.fbank.too_short_error(
                samples.len(),
                frames.num_frames,
                min_frames,
            )));
        }
        let run = || -> candle_core::Result<Tensor> {
            let fbank = Tensor::from_vec(
                frames.data,
                (1, frames.num_frames, frames.num_bins),
                &self.device,
            )?;
            let out = beats.extract_features(&fbank, None)?;
            out.features
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)
        };
        run().map_err(|e| ClipError::Clip(format!("encoder: {e}")))
    }
}
