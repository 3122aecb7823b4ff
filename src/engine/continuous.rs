//! Continuous batching: a fixed set of decoder rows ("slots") over one fused-
//! attention KV cache. Clips join free slots as others finish, so the decoder does
//! not run half-empty while clips wait; each row has its own length
//! (`GroupQueryAttention`'s `seqlens_k`).
//!
//! A join is a prefill of the new clips' prompts into a cache of their own, then a
//! copy of those rows into the running cache, in place where the model runs. Greedy
//! decoding only: beam search reorders rows and keeps its own batches.

use ort::value::DynValue;

use super::audio::{AudioEmbeds, AudioQueue};
use super::error::{EngineError, Result};
use super::generate::{Generated, GenerationParams};
use super::model::OnnxModel;
use crate::manifest::Attention;

/// One clip being captioned, with the caller's tag.
struct Slot<T> {
    tag: T,
    tokens: Vec<u32>,
    logprob_sum: f64,
    /// Positions of this row in the cache.
    length: usize,
    /// The token to feed at the next step.
    next: u32,
}

/// Greedy generation over `rows` slots; `T` tags each clip for the caller.
pub struct ContinuousBatcher<T> {
    rows: usize,
    capacity: usize,
    params: GenerationParams,
    stop_ids: Vec<u32>,
    /// Fed to free slots (their outputs are ignored).
    filler: u32,
    /// [rows, kv_heads, capacity, head_dim] per layer and kind; made on first use.
    cache: Option<Vec<DynValue>>,
    slots: Vec<Option<Slot<T>>>,
}

impl<T> ContinuousBatcher<T> {
    /// A batcher of `rows` slots for `model`, which must have fused attention.
    pub fn new(model: &OnnxModel, rows: usize, params: GenerationParams) -> Result<Self> {
        if model.attention() != Attention::Fused {
            return Err(EngineError::Input(
                "continuous batching needs an export with fused attention (audiocap export --attention fused)"
                    .into(),
            ));
        }
        if params.beams > 1 {
            return Err(EngineError::Input(
                "continuous batching decodes greedily; beam search runs in fixed batches".into(),
            ));
        }
        if rows == 0 || params.max_new_tokens == 0 {
            return Err(EngineError::Input(
                "continuous batching needs at least one row and one new token".into(),
            ));
        }
        let stop_ids = model.manifest.generation.stop_ids.clone();
        Ok(Self {
            rows,
            capacity: model.cache_capacity(params.max_new_tokens),
            filler: stop_ids.first().copied().unwrap_or(0),
            stop_ids,
            params,
            cache: None,
            slots: (0..rows).map(|_| None).collect(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Slots with a clip in them.
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    pub fn free(&self) -> usize {
        self.rows - self.active()
    }

    /// Prefills the clips of `audio` [n, audio_tokens, hidden] (n at most
    /// [`free`](Self::free)) into free slots. Returns the clips whose caption ended
    /// with its first token. On an engine error the clips stay in their slots:
    /// [`abandon`](Self::abandon) returns them with the others.
    pub fn admit(
        &mut self,
        model: &mut OnnxModel,
        audio: &AudioEmbeds,
        tags: Vec<T>,
    ) -> Result<Vec<(T, Generated)>> {
        let n = audio.clips();
        if tags.len() != n || n > self.free() {
            return Err(EngineError::Input(format!(
                "admitting {n} clips ({} tags) into {} free rows",
                tags.len(),
                self.free()
            )));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let prompt_len = model.prompt_len();
        // The clips take their slots first: if the model fails below, `abandon`
        // hands their tags back with the others'.
        let free: Vec<usize> = (0..self.rows)
            .filter(|&r| self.slots[r].is_none())
            .take(n)
            .collect();
        for (tag, &row) in tags.into_iter().zip(&free) {
            self.slots[row] = Some(Slot {
                tag,
                tokens: Vec::new(),
                logprob_sum: 0.0,
                length: prompt_len,
                next: self.filler,
            });
        }
        let embeds = model.prompt(audio)?;
        let suppress = vec![self.params.min_new_tokens > 0; n];
        let choice = if n == self.rows {
            // Every slot was free: prefill straight into the running cache.
            let cache = match self.cache.take() {
                Some(cache) => cache,
                None => model.empty_past(self.rows, self.capacity)?,
            };
            let (choice, cache) =
                model.decode_greedy_rows(embeds, cache, &vec![0; n], &suppress)?;
            self.cache = Some(cache);
            choice
        } else {
            let past = model.empty_past(n, self.capacity)?;
            let (choice, prefilled) =
                model.decode_greedy_rows(embeds, past, &vec![0; n], &suppress)?;
            let cache = match self.cache.take() {
                Some(cache) => cache,
                None => model.empty_past(self.rows, self.capacity)?,
            };
            let cache = model.insert_cache_rows(cache, &prefilled, &free)?;
            self.cache = Some(cache);
            model.recycle_cache(prefilled);
            choice
        };
        let mut finished = Vec::new();
        for (&row, (&token, &logprob)) in
            free.iter().zip(choice.tokens.iter().zip(&choice.logprobs))
        {
            if let Some(slot) = self.slots[row].as_mut() {
                slot.next = token;
            }
            if let Some(done) = self.record(row, token, logprob) {
                finished.push(done);
            }
        }
        Ok(finished)
    }

    /// One decoder step over every slot. Returns the clips that finished.
    pub fn step(&mut self, model: &mut OnnxModel) -> Result<Vec<(T, Generated)>> {
        let Some(cache) = self.cache.take() else {
            return Ok(Vec::new());
        };
        if self.active() == 0 {
            self.cache = Some(cache);
            return Ok(Vec::new());
        }
        let mut tokens = Vec::with_capacity(self.rows);
        let mut lengths = Vec::with_capacity(self.rows);
        let mut suppress = Vec::with_capacity(self.rows);
        for slot in &self.slots {
            match slot {
                Some(s) => {
                    tokens.push(s.next);
                    lengths.push(s.length);
                    suppress.push(s.tokens.len() < self.params.min_new_tokens);
                }
                // A free slot rewrites its first position and attends to it alone.
                None => {
                    tokens.push(self.filler);
                    lengths.push(0);
                    suppress.push(false);
                }
            }
        }
        let embeds = model.embed_step(&tokens)?;
        let (choice, cache) = model.decode_greedy_rows(embeds, cache, &lengths, &suppress)?;
        self.cache = Some(cache);
        let mut finished = Vec::new();
        for row in 0..self.rows {
            if let Some(slot) = self.slots[row].as_mut() {
                slot.length += 1;
                let (token, logprob) = (choice.tokens[row], choice.logprobs[row]);
                slot.next = token;
                if let Some(done) = self.record(row, token, logprob) {
                    finished.push(done);
                }
            }
        }
        Ok(finished)
    }

    /// Empties every slot after an engine failure and returns their tags (the
    /// caller reports them); the cache is rebuilt on the next admission.
    pub fn abandon(&mut self) -> Vec<T> {
        self.cache = None;
        self.slots
            .iter_mut()
            .filter_map(|s| s.take().map(|s| s.tag))
            .collect()
    }

    /// Appends a chosen token to row `row`; frees the slot and returns its caption
    /// when it stops or reaches the length limit.
    fn record(&mut self, row: usize, token: u32, logprob: f32) -> Option<(T, Generated)> {
        let slot = self.slots[row].as_mut()?;
        slot.tokens.push(token);
        slot.logprob_sum += logprob as f64;
        let done =
            self.stop_ids.contains(&token) || slot.tokens.len() >= self.params.max_new_tokens;
        if !done {
            return None;
        }
        let slot = self.slots[row].take()?;
        let n = slot.tokens.len();
        Some((
            slot.tag,
            Generated {
                token_ids: slot.tokens,
                score: (slot.logprob_sum / n as f64) as f32,
            },
        ))
    }
}

/// Captions for the clips of `batches` (encoder batches, in order) through `rows`
/// slots: clips join in order as slots free up, `refill` or more at a time (fewer at
/// the end), their audio taken from a queue on the device as the pipeline does. The
/// result is in the clips' order.
pub fn generate_continuous(
    model: &mut OnnxModel,
    batches: Vec<AudioEmbeds>,
    rows: usize,
    refill: usize,
    params: &GenerationParams,
) -> Result<Vec<Generated>> {
    let mut queue = AudioQueue::new();
    for batch in batches {
        queue.push(batch);
    }
    let total = queue.len();
    let mut batcher = ContinuousBatcher::new(model, rows, params.clone())?;
    let mut results: Vec<Option<Generated>> = vec![None; total];
    let mut next = 0;
    let refill = refill.max(1);
    while next < total || batcher.active() > 0 {
        let room = batcher.free().min(total - next);
        if room > 0 && (room >= refill || batcher.active() == 0 || next + room == total) {
            let chunk = queue.take(room)?;
            let tags: Vec<usize> = (next..next + room).collect();
            next += room;
            for (i, g) in batcher.admit(model, &chunk, tags)? {
                results[i] = Some(g);
            }
        }
        for (i, g) in batcher.step(model)? {
            results[i] = Some(g);
        }
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| EngineError::Input(format!("clip {i} was not captioned"))))
        .collect()
}
