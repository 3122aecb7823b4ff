//! Batched generation with a KV cache: greedy or beam search, stop ids, and
//! sequences that leave the batch as soon as they finish.
//!
//! Every prompt has the same length (same template, same number of audio
//! embeddings), so a batch needs no padding: all rows share one position counter.

use ndarray::{Array2, ArrayView1};

use super::audio::AudioEmbeds;
use super::error::Result;
use super::model::OnnxModel;

/// How captions are generated.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    /// 1 = greedy; K > 1 = beam search with K beams.
    pub beams: usize,
    /// Stop ids are ignored until this many tokens exist (benchmarks use it to
    /// generate a fixed length).
    pub min_new_tokens: usize,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 30,
            beams: 1,
            min_new_tokens: 0,
        }
    }
}

/// One finished caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Generated ids, including the stop id when generation stopped on one.
    pub token_ids: Vec<u32>,
    /// Mean log-probability of the generated tokens.
    pub score: f32,
}

/// Log-softmax of one row of logits, in f64 for a stable normaliser.
fn log_softmax(row: ArrayView1<'_, f32>) -> Vec<f32> {
    let max = row
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    row.iter().map(|&v| (v as f64 - log_z) as f32).collect()
}

/// Stop ids may not be chosen before `min_new_tokens`.
fn suppress_stops(
    logprobs: &mut [f32],
    stop_ids: &[u32],
    generated: usize,
    params: &GenerationParams,
) {
    if generated < params.min_new_tokens {
        for &s in stop_ids {
            if let Some(v) = logprobs.get_mut(s as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
    }
}

/// Captions for a batch of clips' audio embeddings [B, audio_tokens, hidden].
pub fn generate(
    model: &mut OnnxModel,
    audio: &AudioEmbeds,
    params: &GenerationParams,
) -> Result<Vec<Generated>> {
    if params.beams <= 1 {
        greedy(model, audio, params)
    } else {
        beam_search(model, audio, params)
    }
}

fn greedy(
    model: &mut OnnxModel,
    audio: &AudioEmbeds,
    params: &GenerationParams,
) -> Result<Vec<Generated>> {
    let batch = audio.clips();
    let stop_ids = model.manifest.generation.stop_ids.clone();
    let prompt_len = model.prompt_len();
    let embeds = model.prompt(audio)?;
    let capacity = model.cache_capacity(params.max_new_tokens);
    let past = model.empty_past(batch, capacity)?;
    // Stop ids may not be chosen before `min_new_tokens` (all rows advance together).
    let suppress = |generated: usize, rows: usize| vec![generated < params.min_new_tokens; rows];
    let (mut choice, mut cache) = model.decode_greedy(embeds, past, 0, &suppress(0, batch))?;
    let mut position = prompt_len;

    let mut results: Vec<Option<Generated>> = vec![None; batch];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut sums = vec![0f64; batch];
    // Batch row → clip index, for the rows still generating (or kept, finished, in
    // the batch: see `keeps_finished_rows`; they are fed a stop id and ignored).
    let mut active: Vec<usize> = (0..batch).collect();
    let mut finished = vec![false; batch];
    let keep_finished = model.keeps_finished_rows();
    let filler = stop_ids.first().copied().unwrap_or(0);
    let mut generated = 0;
    while !active.is_empty() {
        generated += 1;
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (row, &clip) in active.iter().enumerate() {
            if finished[clip] {
                keep.push(row);
                next.push(filler);
                continue;
            }
            let token = choice.tokens[row];
            tokens[clip].push(token);
            sums[clip] += choice.logprobs[row] as f64;
            let stopped = stop_ids.contains(&token);
            if stopped || tokens[clip].len() >= params.max_new_tokens {
                let n = tokens[clip].len();
                results[clip] = Some(Generated {
                    token_ids: std::mem::take(&mut tokens[clip]),
                    score: (sums[clip] / n as f64) as f32,
                });
                finished[clip] = true;
                if keep_finished {
                    keep.push(row);
                    next.push(filler);
                }
            } else {
                keep.push(row);
                next.push(token);
            }
        }
        if finished.iter().all(|&f| f) {
            break;
        }
        if keep.len() != active.len() {
            cache = model.select_cache_rows(cache, &keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
        }
        let step = model.embed_step(&next)?;
        let (c, k) =
            model.decode_greedy(step, cache, position, &suppress(generated, next.len()))?;
        choice = c;
        cache = k;
        position += 1;
    }
    model.recycle_cache(cache);
    Ok(results
        .into_iter()
        .map(|r| {
            r.unwrap_or(Generated {
                token_ids: Vec::new(),
                score: 0.0,
            })
        })
        .collect())
}

/// A live beam: its tokens and summed log-probability.
#[derive(Clone)]
struct Beam {
    tokens: Vec<u32>,
    sum: f64,
}

/// Beam search as transformers does it with length_penalty 1: hypotheses are ranked
/// by mean token log-probability; a clip is done when it has `beams` finished
/// hypotheses and no live beam can still beat the worst of them.
fn beam_search(
    model: &mut OnnxModel,
    audio: &AudioEmbeds,
    params: &GenerationParams,
) -> Result<Vec<Generated>> {
    let batch = audio.clips();
    let k = params.beams;
    let stop_ids = model.manifest.generation.stop_ids.clone();
    let prompt_len = model.prompt_len();
    let embeds = model.prompt(audio)?;
    let past = model.empty_past(batch, model.cache_capacity(params.max_new_tokens))?;
    let (first_logits, cache) = model.decode(embeds, past, 0)?;
    let mut position = prompt_len;

    let mut finished: Vec<Vec<Generated>> = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    // Live beams per clip; the cache holds one row per live beam, clip-major.
    let mut live: Vec<Vec<Beam>> = vec![Vec::new(); batch];
    let mut parent_rows: Vec<usize> = Vec::new();
    let mut next_tokens: Vec<u32> = Vec::new();

    // First step: each clip has one row (the prompt); its K best tokens start the beams.
    let mut row_beams: Vec<(usize, Beam)> = (0..batch)
        .map(|c| {
            (
                c,
                Beam {
                    tokens: Vec::new(),
                    sum: 0.0,
                },
            )
        })
        .collect();
    let mut logits: Array2<f32> = first_logits;
    let mut cache = cache;
    loop {
        // Candidates per clip from every row that belongs to it.
        let mut candidates: Vec<Vec<(f64, usize, u32)>> = vec![Vec::new(); batch];
        for (row, (clip, beam)) in row_beams.iter().enumerate() {
            let mut lp = log_softmax(logits.row(row));
            suppress_stops(&mut lp, &stop_ids, beam.tokens.len(), params);
            for (token, v) in top_k(&lp, 2 * k) {
                candidates[*clip].push((beam.sum + v as f64, row, token));
            }
        }
        parent_rows.clear();
        next_tokens.clear();
        let mut new_row_beams = Vec::new();
        for clip in 0..batch {
            if done[clip] {
                continue;
            }
            let cands = &mut candidates[clip];
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            live[clip].clear();
            for (rank, &(sum, row, token)) in cands.iter().enumerate() {
                let mut tokens = row_beams[row].1.tokens.clone();
                tokens.push(token);
                let len = tokens.len();
                if len >= params.max_new_tokens {
                    // Out of length: the K best continuations are final.
                    if rank < k {
                        finished[clip].push(Generated {
                            token_ids: tokens,
                            score: (sum / len as f64) as f32,
                        });
                        continue;
                    }
                    break;
                }
                if stop_ids.contains(&token) {
                    // As transformers: a stop only counts among the K best candidates.
                    if rank < k {
                        finished[clip].push(Generated {
                            token_ids: tokens,
                            score: (sum / len as f64) as f32,
                        });
                    }
                    continue;
                }
                live[clip].push(Beam { tokens, sum });
                parent_rows.push(row);
                next_tokens.push(token);
                if live[clip].len() >= k {
                    break;
                }
            }
            // Done when K hypotheses are finished and no live beam can catch up: a
            // live beam's mean can only fall below its current best continuation,
            // bounded here by its mean so far (log-probabilities are ≤ 0).
            finished[clip].sort_by(|a, b| b.score.total_cmp(&a.score));
            finished[clip].truncate(k);
            let worst_kept = if finished[clip].len() >= k {
                finished[clip].last().map(|g| g.score as f64)
            } else {
                None
            };
            let best_live = live[clip]
                .iter()
                .map(|b| b.sum / b.tokens.len().max(1) as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            if live[clip].is_empty() || worst_kept.is_some_and(|w| w >= best_live) {
                done[clip] = true;
                // Drop the rows this clip added.
                let added = live[clip].len();
                for _ in 0..added {
                    parent_rows.pop();
                    next_tokens.pop();
                }
                live[clip].clear();
            } else {
                for beam in &live[clip] {
                    new_row_beams.push((clip, beam.clone()));
                }
            }
        }
        if parent_rows.is_empty() {
            break;
        }
        cache = model.select_cache_rows(cache, &parent_rows)?;
        row_beams = new_row_beams;
        let step = model.embed_step(&next_tokens)?;
        let (l, c) = model.decode(step, cache, position)?;
        logits = l;
        cache = c;
        position += 1;
    }
    model.recycle_cache(cache);
    Ok(finished
        .into_iter()
        .map(|mut hyps| {
            hyps.sort_by(|a, b| b.score.total_cmp(&a.score));
            hyps.into_iter().next().unwrap_or(Generated {
                token_ids: Vec::new(),
                score: 0.0,
            })
        })
        .collect())
}

/// The `n` largest finite entries, best first.
fn top_k(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &v) in values.iter().enumerate() {
        if !v.is_finite() {
            continue;
        }
        if best.len() < n || v > best[best.len() - 1].1 {
            let pos = best.partition_point(|&(_, b)| b >= v);
            best.insert(pos, (i as u32, v));
            best.truncate(n);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_skips_non_finite() {
        let v = [0.1, f32::NAN, 3.0, -1.0, 2.0, f32::NEG_INFINITY];
        assert_eq!(top_k(&v, 2), vec![(2, 3.0), (4, 2.0)]);
        assert_eq!(top_k(&v, 10).len(), 4);
    }

    #[test]
    fn log_softmax_normalises() {
        let row = ndarray::arr1(&[1.0f32, 2.0, 3.0]);
        let lp = log_softmax(row.view());
        let total: f64 = lp.iter().map(|&v| (v as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(lp[2] > lp[1] && lp[1] > lp[0]);
    }
}
