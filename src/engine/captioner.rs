//! A batch of segments through the encoder and the decoder: each segment's row comes
//! back with its caption, score and token count, or with the error that stopped it.
//! The model stage of the pipeline (`crate::stages::model`) calls it.

use super::generate::{Generated, GenerationParams, generate};
use super::model::OnnxModel;
use crate::output::{CaptionRow, RowFailure, now_us};

/// Captions segments given as (row so far, fbank frames, number of frames): the
/// rows come back completed with caption, score and token count, or with the error
/// that stopped them (an engine failure is the error of every row in the batch).
pub fn caption_segments(
    model: &mut OnnxModel,
    segments: &[(&CaptionRow, &[f32], usize)],
    params: &GenerationParams,
) -> Vec<CaptionRow> {
    let inputs: Vec<(&[f32], usize)> = segments.iter().map(|s| (s.1, s.2)).collect();
    let result = model
        .encode(&inputs)
        .and_then(|audio| generate(model, &audio, params));
    let stamp = now_us();
    match result {
        Ok(generated) => segments
            .iter()
            .zip(generated)
            .map(|(&(row, _, _), g)| captioned_row(model, row, &g, stamp))
            .collect(),
        Err(e) => segments
            .iter()
            .map(|&(row, _, _)| row.failed(RowFailure::Model, format!("model: {e}"), stamp))
            .collect(),
    }
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
