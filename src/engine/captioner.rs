//! A batch of segments through the encoder and the decoder: each segment's row comes
//! back with its caption, score and token count. An engine failure is the batch's
//! `Err`: whether it is the device's fault or one segment's is for the caller to
//! find out (`crate::stages::recover`).

use super::error::EngineError;
use super::generate::{Generated, GenerationParams, generate};
use super::model::OnnxModel;
use crate::output::{CaptionRow, RowFailure, now_us};

/// Captions segments given as (row so far, fbank frames, number of frames): the
/// rows come back completed with caption, score and token count (or a tokenizer
/// error), and the tags and embedding the model was asked for, in order.
pub fn caption_segments(
    model: &mut OnnxModel,
    segments: &[(&CaptionRow, &[f32], usize)],
    params: &GenerationParams,
) -> Result<Vec<CaptionRow>, EngineError> {
    let inputs: Vec<(&[f32], usize)> = segments.iter().map(|s| (s.1, s.2)).collect();
    let mut audio = model.encode(&inputs)?;
    let extras = audio.take_extras();
    let generated = generate(model, &audio, params)?;
    let stamp = now_us();
    Ok(segments
        .iter()
        .zip(generated)
        .zip(extras)
        .map(|((&(row, _, _), g), extras)| {
            let mut row = row.clone();
            extras.apply(&mut row);
            captioned_row(model, &row, &g, stamp)
        })
        .collect())
}

/// `row` completed with a generated caption (or the error of turning its tokens
/// into text).
pub fn captioned_row(model: &OnnxModel, row: &CaptionRow, g: &Generated, stamp: i64) -> CaptionRow {
    let text = model
        .tokenizer
        .decode(&g.token_ids, true)
        .map(|t| t.trim().to_string());
    match text {
        Ok(text) => row.captioned(text, g.score, g.token_ids.len() as u32, stamp),
        Err(e) => row.failed(
            RowFailure::Tokenizer,
            format!("decoding tokens to text: {e}"),
            stamp,
        ),
    }
}
