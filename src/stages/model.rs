//! Model stage: one thread owns the ONNX sessions (`Session::run` takes `&mut`),
//! takes batches, runs the encoder and the decoder, and hands rows to the sink.
//!
//! Two ways to run the decoder:
//! - fixed batches: each batch is encoded and captioned to its end (eager-attention
//!   exports, beam search);
//! - continuous batching (fused-attention exports, greedy): the decoder keeps
//!   `decoder_rows` rows busy; as captions finish, encoded clips waiting take their
//!   rows, so the decoder does not run half-empty while clips wait, and finished
//!   rows go to the sink at once.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use async_channel::{Receiver, Sender, TryRecvError};

use super::{BusyClock, SegmentJob, SinkMessage};
use crate::engine::audio::AudioQueue;
use crate::engine::captioner::{caption_segments, captioned_row, failed_row};
use crate::engine::continuous::ContinuousBatcher;
use crate::engine::generate::{Generated, GenerationParams};
use crate::engine::model::OnnxModel;
use crate::manifest::Attention;
use crate::output::{CaptionRow, now_us};

/// How the model thread runs the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderMode {
    FixedBatches,
    /// Continuous batching over this many decoder rows.
    Continuous {
        rows: usize,
    },
}

impl DecoderMode {
    /// Continuous batching where the export and the generation allow it.
    pub fn for_model(model: &OnnxModel, params: &GenerationParams, rows: usize) -> Self {
        if model.attention() == Attention::Fused && params.beams <= 1 && rows > 0 {
            DecoderMode::Continuous { rows }
        } else {
            DecoderMode::FixedBatches
        }
    }
}

/// Starts the model thread. It ends when the batch channel closes (or the sink
/// is gone); `idle` is true while it waits for a batch (with continuous batching:
/// while decoder rows are free and no clip waits for them), `busy` counts the time
/// it spends in the model.
pub fn spawn(
    model: OnnxModel,
    params: GenerationParams,
    mode: DecoderMode,
    batches: Receiver<Vec<SegmentJob>>,
    sink: Sender<SinkMessage>,
    idle: Arc<AtomicBool>,
    busy: Arc<BusyClock>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("audiocap-model".into())
        .spawn(move || {
            let stage = Stage {
                model,
                params,
                batches,
                sink,
                idle,
                busy,
            };
            match mode {
                DecoderMode::FixedBatches => stage.run_fixed(),
                DecoderMode::Continuous { rows } => stage.run_continuous(rows),
            }
        })
}

struct Stage {
    model: OnnxModel,
    params: GenerationParams,
    batches: Receiver<Vec<SegmentJob>>,
    sink: Sender<SinkMessage>,
    idle: Arc<AtomicBool>,
    busy: Arc<BusyClock>,
}

/// A clip encoded and waiting for a decoder row (or in one).
struct Waiting {
    input_id: u64,
    row: CaptionRow,
}

impl Stage {
    fn run_fixed(mut self) {
        loop {
            self.idle.store(true, Ordering::Release);
            let Ok(batch) = self.batches.recv_blocking() else {
                break;
            };
            self.idle.store(false, Ordering::Release);
            let segments: Vec<(&CaptionRow, &[f32], usize)> = batch
                .iter()
                .map(|s| (&s.row, s.fbank.as_slice(), s.frames))
                .collect();
            let (model, params) = (&mut self.model, &self.params);
            let rows = self
                .busy
                .time(|| caption_segments(model, &segments, params));
            tracing::debug!(segments = rows.len(), "batch captioned");
            let done = batch.iter().map(|s| s.input_id).zip(rows).collect();
            if !self.send(done) {
                return;
            }
        }
        self.idle.store(true, Ordering::Release);
    }

    fn run_continuous(mut self, rows: usize) {
        let mut batcher = match ContinuousBatcher::new(&self.model, rows, self.params.clone()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("continuous batching unavailable ({e}); running fixed batches");
                return self.run_fixed();
            }
        };
        // Clips join when this many rows are free (one prefill for several clips),
        // or whenever the decoder would otherwise run empty or the input has ended.
        let refill = (rows / 8).max(1);
        // Clips encoded and waiting for rows: their rows here, their audio on the
        // device, in the same order.
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        let mut audio = AudioQueue::new();
        let mut input_open = true;
        loop {
            // Encode enough batches to fill the free rows.
            while input_open && waiting.len() < batcher.free() {
                let next = if batcher.active() == 0 && waiting.is_empty() {
                    self.idle.store(true, Ordering::Release);
                    let r = self.batches.recv_blocking().ok();
                    self.idle.store(false, Ordering::Release);
                    r
                } else {
                    match self.batches.try_recv() {
                        Ok(batch) => Some(batch),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Closed) => None,
                    }
                };
                let Some(batch) = next else {
                    input_open = false;
                    break;
                };
                let failed = self.encode_into(batch, &mut waiting, &mut audio);
                if !failed.is_empty() && !self.send(failed) {
                    return;
                }
            }
            // The batch stage hands over partial batches while this is set: the
            // decoder has free rows and no clip waiting for them.
            self.idle.store(
                input_open && waiting.len() < batcher.free(),
                Ordering::Release,
            );
            let room = waiting.len().min(batcher.free());
            let mut done = Vec::new();
            if room > 0 && (room >= refill || batcher.active() == 0 || !input_open) {
                let tags: Vec<Waiting> = waiting.drain(..room).collect();
                let model = &mut self.model;
                let joining = self.busy.time(|| audio.take(room));
                match joining {
                    Ok(joining) => {
                        let result = self.busy.time(|| batcher.admit(model, &joining, tags));
                        if !self.collect(result, &mut batcher, &mut done, "prefill") {
                            return;
                        }
                    }
                    Err(e) => {
                        // Their audio is lost; the clips in the decoder go on.
                        let stamp = now_us();
                        let rows = tags
                            .into_iter()
                            .map(|w| {
                                (
                                    w.input_id,
                                    failed_row(&w.row, &format!("model: {e}"), stamp),
                                )
                            })
                            .collect();
                        if !self.send(rows) {
                            return;
                        }
                    }
                }
            }
            if batcher.active() > 0 {
                let model = &mut self.model;
                let result = self.busy.time(|| batcher.step(model));
                if !self.collect(result, &mut batcher, &mut done, "step") {
                    return;
                }
            }
            if !done.is_empty() {
                let stamp = now_us();
                let rows = done
                    .into_iter()
                    .map(|(w, g)| (w.input_id, captioned_row(&self.model, &w.row, &g, stamp)))
                    .collect();
                if !self.send(rows) {
                    return;
                }
            }
            if !input_open && waiting.is_empty() && batcher.active() == 0 {
                break;
            }
        }
        self.idle.store(true, Ordering::Release);
    }

    /// Runs the encoder on a batch; its clips join `waiting` (their audio joins
    /// `audio`), or come back as error rows when the encoder fails.
    fn encode_into(
        &mut self,
        batch: Vec<SegmentJob>,
        waiting: &mut VecDeque<Waiting>,
        audio: &mut AudioQueue,
    ) -> Vec<(u64, CaptionRow)> {
        let inputs: Vec<(&[f32], usize)> = batch
            .iter()
            .map(|s| (s.fbank.as_slice(), s.frames))
            .collect();
        let model = &mut self.model;
        match self.busy.time(|| model.encode(&inputs)) {
            Ok(encoded) => {
                audio.push(encoded);
                waiting.extend(batch.into_iter().map(|job| Waiting {
                    input_id: job.input_id,
                    row: job.row,
                }));
                Vec::new()
            }
            Err(e) => {
                let stamp = now_us();
                batch
                    .into_iter()
                    .map(|job| {
                        let row = failed_row(&job.row, &format!("model: {e}"), stamp);
                        (job.input_id, row)
                    })
                    .collect()
            }
        }
    }

    /// Keeps the captions a decoder call finished; when it failed, every clip in
    /// flight (joining ones too) becomes an error row for the sink. False when the
    /// sink is gone.
    fn collect(
        &self,
        result: crate::engine::model::Result<Vec<(Waiting, Generated)>>,
        batcher: &mut ContinuousBatcher<Waiting>,
        done: &mut Vec<(Waiting, Generated)>,
        call: &str,
    ) -> bool {
        match result {
            Ok(finished) => {
                done.extend(finished);
                true
            }
            Err(e) => {
                tracing::warn!("decoder {call} failed: {e}");
                let stamp = now_us();
                let error = format!("model: {e}");
                let rows = batcher
                    .abandon()
                    .into_iter()
                    .map(|w| (w.input_id, failed_row(&w.row, &error, stamp)))
                    .collect();
                self.send(rows)
            }
        }
    }

    /// Hands finished rows to the sink, grouped by input. False when the sink is gone.
    fn send(&self, rows: Vec<(u64, CaptionRow)>) -> bool {
        let mut by_input: BTreeMap<u64, Vec<CaptionRow>> = BTreeMap::new();
        for (input_id, row) in rows {
            by_input.entry(input_id).or_default().push(row);
        }
        by_input.into_iter().all(|(input_id, rows)| {
            self.sink
                .send_blocking(SinkMessage::Rows { input_id, rows })
                .is_ok()
        })
    }
}
