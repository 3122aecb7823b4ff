//! Captioning on candle: the prompt template with its audio placeholder, the audio
//! embedding (fbank → BEATs → projector → pooling) and greedy decoding.
//!
//! This is the reference path: the ONNX export is checked against it, and it lets a
//! user check real checkpoints before exporting them.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::audio::fbank::{Fbank, FbankConfig};
use crate::model::beats::Beats;
use crate::model::llama::{KvCache, Llama};
use crate::model::lora::Adaptation;
use crate::model::projector::Projector;
use crate::model::prompt::{
    DEFAULT_PROMPT_TEMPLATE, PromptError, PromptIds, PromptTemplate, load_tokenizer,
};
use crate::model::sources::{AssemblyError, ModelSources, combine_adapters, read_stop_ids};
use crate::model::weights::LoadError;

#[derive(Debug, thiserror::Error)]
pub enum CaptionError {
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Assembly(#[from] AssemblyError),
    #[error("model mismatch: {0}")]
    Mismatch(String),
    #[error("{0}")]
    Audio(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CaptionError>;

/// One generated caption.
#[derive(Debug, Clone, Serialize)]
pub struct Caption {
    /// Generated ids, including the stop id when generation stopped on one.
    pub token_ids: Vec<u32>,
    /// Decoded text, special tokens skipped.
    pub text: String,
    /// Gap between the best and second-best logit at each step.
    pub top2_margins: Vec<f32>,
    /// Mean log-probability of the generated tokens.
    pub score: f32,
}

/// BEATs → projector → Llama with adapters folded in, on candle.
pub struct Captioner {
    fbank: Fbank,
    beats: Beats,
    projector: Projector,
    llm: Llama,
    tokenizer: Tokenizer,
    prompt: PromptIds,
    stop_ids: Vec<u32>,
    device: Device,
}

impl Captioner {
    pub fn load(sources: &ModelSources, device: &Device) -> Result<Self> {
        let dtype = DType::F32;
        let beats = Beats::load(&sources.beats, dtype, device)?;
        let projector = Projector::load(&sources.projector, sources.pooling, dtype, device)?;
        let adapter = combine_adapters(&sources.adapters, sources.adapter_weights.as_deref())?;
        let adaptation = match &adapter {
            Some(a) => Adaptation::folded(&[a])?,
            None => Adaptation::none(),
        };
        let llm = Llama::load(&sources.llm, dtype, device, &adaptation)?;

        let encoder_dim = beats.config().encoder_embed_dim;
        if projector.in_dim() != encoder_dim {
            return Err(CaptionError::Mismatch(format!(
                "{}: projector takes {}-dim features but the encoder {} gives {encoder_dim}",
                sources.projector.display(),
                projector.in_dim(),
                sources.beats.display()
            )));
        }
        if projector.out_dim() != llm.config().hidden_size {
            return Err(CaptionError::Mismatch(format!(
                "{}: projector gives {}-dim embeddings but the decoder {} has hidden size {}",
                sources.projector.display(),
                projector.out_dim(),
                sources.llm.display(),
                llm.config().hidden_size
            )));
        }

        let tokenizer_file = sources.llm.join("tokenizer.json");
        let tokenizer = load_tokenizer(&tokenizer_file)?;
        let template = PromptTemplate::parse(
            sources
                .prompt_template
                .as_deref()
                .unwrap_or(DEFAULT_PROMPT_TEMPLATE),
        )?;
        let prompt = template.tokenize(&tokenizer, &tokenizer_file)?;
        let stop_ids = read_stop_ids(&sources.llm)?;
        let fbank =
            Fbank::new(FbankConfig::default()).map_err(|e| CaptionError::Audio(e.to_string()))?;
        Ok(Self {
            fbank,
            beats,
            projector,
            llm,
            tokenizer,
            prompt,
            stop_ids,
            device: device.clone(),
        })
    }

    pub fn prompt_ids(&self) -> &PromptIds {
        &self.prompt
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The sample rate the front end expects.
    pub fn sample_rate(&self) -> u32 {
        self.fbank.config().sample_rate
    }

    /// Audio embedding(s) [1, n, hidden] of one clip's normalised fbank [1, T, bins].
    pub fn audio_embedding_from_fbank(&self, fbank: &Tensor) -> Result<Tensor> {
        let encoded = self.beats.extract_features(fbank, None)?;
        Ok(self
            .projector
            .forward(&encoded.features, encoded.padding_mask.as_ref())?)
    }

    /// Audio embedding(s) [1, n, hidden] of a mono waveform at [`Self::sample_rate`].
    pub fn audio_embedding(&self, waveform: &[f32]) -> Result<Tensor> {
        let frames = self.fbank.compute(waveform);
        let min_frames = self.beats.config().input_patch_size;
        if frames.num_frames < min_frames {
            return Err(CaptionError::Audio(format!(
                "clip too short: {} samples give {} fbank frames, the encoder needs at least {min_frames}",
                waveform.len(),
                frames.num_frames
            )));
        }
        let fbank = Tensor::from_vec(
            frames.data,
            (1, frames.num_frames, frames.num_bins),
            &self.device,
        )?;
        self.audio_embedding_from_fbank(&fbank)
    }

    /// Greedy decoding after the prompt with `audio` [1, n, hidden] spliced in.
    pub fn generate(&self, audio: &Tensor, max_new_tokens: usize) -> Result<Caption> {
        greedy_decode(
            &self.llm,
            &self.tokenizer,
            &self.prompt,
            &self.stop_ids,
            audio,
            max_new_tokens,
        )
    }

    /// The prompt's embeddings [1, L, hidden] with `audio` [1, n, hidden] spliced in.
    pub fn prompt_embeds(&self, audio: &Tensor) -> Result<Tensor> {
        prompt_embeds(&self.llm, &self.prompt, audio)
    }

    /// Logits [vocab] at the last position of a full prompt's embeddings [1, L, hidden].
    pub fn prompt_logits(&self, embeds: &Tensor) -> Result<Vec<f32>> {
        let hidden = self.llm.forward_embeds(embeds, None)?;
        let seq = hidden.dim(1)?;
        Ok(self
            .llm
            .logits(&hidden.narrow(1, seq - 1, 1)?)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    }

    /// Caption of an audio file at [`Self::sample_rate`] (the reference path does not
    /// resample: a file at another rate is an error saying so).
    pub fn caption_file(&self, path: &std::path::Path, max_new_tokens: usize) -> Result<Caption> {
        let audio = crate::audio::decode::decode_file(path)
            .map_err(|e| CaptionError::Audio(format!("{}: {e}", path.display())))?;
        if audio.info.sample_rate != self.sample_rate() {
            return Err(CaptionError::Audio(format!(
                "sample rate {} Hz; reference-caption takes {} Hz audio only: resample it first",
                audio.info.sample_rate,
                self.sample_rate()
            )));
        }
        self.caption(&audio.samples, max_new_tokens)
    }

    /// Caption of a mono waveform at [`Self::sample_rate`].
    pub fn caption(&self, waveform: &[f32], max_new_tokens: usize) -> Result<Caption> {
        let audio = self.audio_embedding(waveform)?;
        self.generate(&audio, max_new_tokens)
    }
}

/// `prompt`'s embeddings with `audio` [B, n, hidden] spliced in: [B, L, hidden].
pub fn prompt_embeds(llm: &Llama, prompt: &PromptIds, audio: &Tensor) -> Result<Tensor> {
    let batch = audio.dim(0)?;
    let text = |ids: &[u32]| -> Result<Tensor> {
        let ids = Tensor::new(ids, llm.device())?.unsqueeze(0)?;
        let embeds = llm.embed(&ids)?;
        let (_, n, h) = embeds.dims3()?;
        Ok(embeds.broadcast_as((batch, n, h))?)
    };
    let mut parts = Vec::with_capacity(3);
    if !prompt.prefix.is_empty() {
        parts.push(text(&prompt.prefix)?);
    }
    // The audio embeddings come from the (f32) projector; the decoder may hold bf16/f16.
    parts.push(audio.to_dtype(llm.dtype())?);
    if !prompt.suffix.is_empty() {
        parts.push(text(&prompt.suffix)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Greedy decoding with `llm` after `prompt` with `audio` [1, n, hidden] spliced in:
/// the candle captioner's and the trainer's validation decoding.
pub fn greedy_decode(
    llm: &Llama,
    tokenizer: &Tokenizer,
    prompt: &PromptIds,
    stop_ids: &[u32],
    audio: &Tensor,
    max_new_tokens: usize,
) -> Result<Caption> {
    let ids = |ids: &[u32]| Tensor::new(ids, llm.device())?.unsqueeze(0);
    let embeds = prompt_embeds(llm, prompt, audio)?;
    let mut cache = KvCache::new(llm.config());
    let mut hidden = llm.forward_embeds(&embeds, Some(&mut cache))?;
    let mut caption = Caption {
        token_ids: Vec::new(),
        text: String::new(),
        top2_margins: Vec::new(),
        score: 0.0,
    };
    let mut logprob_sum = 0.0f64;
    for step in 0..max_new_tokens {
        let seq = hidden.dim(1)?;
        let logits = llm
            .logits(&hidden.narrow(1, seq - 1, 1)?)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let choice = greedy_choice(&logits).ok_or_else(|| {
            CaptionError::Mismatch("the decoder produced no finite logits".into())
        })?;
        caption.token_ids.push(choice.token);
        caption.top2_margins.push(choice.margin);
        logprob_sum += choice.logprob;
        if stop_ids.contains(&choice.token) || step + 1 == max_new_tokens {
            break;
        }
        hidden = llm.forward_embeds(&llm.embed(&ids(&[choice.token])?)?, Some(&mut cache))?;
    }
    if !caption.token_ids.is_empty() {
        caption.score = (logprob_sum / caption.token_ids.len() as f64) as f32;
    }
    caption.text = tokenizer
        .decode(&caption.token_ids, true)
        .map_err(|e| PromptError::Tokenizer {
            file: PathBuf::from("tokenizer.json"),
            message: e.to_string(),
        })?
        .trim()
        .to_string();
    Ok(caption)
}

/// The greedy pick at one step: best token, its margin over the runner-up and its
/// log-probability.
struct Choice {
    token: u32,
    margin: f32,
    logprob: f64,
}

fn greedy_choice(logits: &[f32]) -> Option<Choice> {
    let mut best: Option<(usize, f32)> = None;
    let mut second = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_finite() {
            continue;
        }
        match best {
            Some((_, b)) if v <= b => second = second.max(v),
            Some((_, b)) => {
                second = b;
                best = Some((i, v));
            }
            None => best = Some((i, v)),
        }
    }
    let (token, top) = best?;
    let max = top as f64;
    let log_sum_exp = max
        + logits
            .iter()
            .filter(|v| v.is_finite())
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    Some(Choice {
        token: token as u32,
        margin: top - second,
        logprob: top as f64 - log_sum_exp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_choice_reports_margin_and_logprob() {
        let c = greedy_choice(&[0.0, 2.0, 1.5, f32::NAN]).unwrap();
        assert_eq!(c.token, 1);
        assert!((c.margin - 0.5).abs() < 1e-6);
        let expected = 2.0 - (1f64 + 2f64.exp() + 1.5f64.exp()).ln();
        assert!((c.logprob - expected).abs() < 1e-9);
        assert!(greedy_choice(&[f32::NAN]).is_none());
    }
}
