//! Model stage: one thread owns the ONNX sessions (`Session::run` takes `&mut`),
//! takes batches, runs the encoder and the decoder, and hands rows to the sink.
//!
//! Two ways to run the decoder:
//! - fixed batches: each batch is encoded and captioned to its end (eager-attention
//!   exports, beam search);
//! - continuous batching (fused-attention exports, greedy): the decoder keeps
//!   `decoder_rows` rows busy; as captions finish, encoded clips waiting take their
//!   rows, so the decoder does not run half-empty while clips wait, and finished
//!   rows go to the sink at once. The encoder may run on a thread of its own
//!   (`encoder_thread`): on a GPU its work then overlaps the decoder's (each
//!   session has its own stream) and the decoder never waits for a batch to encode;
//!   the audio embeddings stay in device memory on the way.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use async_channel::{Receiver, Sender, TryRecvError};

use super::recover::{ModelFaults, recover};
use super::{BusyClock, SegmentJob, SinkMessage};
use crate::engine::audio::{AudioEmbeds, AudioEncoder, AudioQueue};
use crate::engine::captioner::{caption_segments, captioned_row};
use crate::engine::continuous::ContinuousBatcher;
use crate::engine::generate::{Generated, GenerationParams};
use crate::engine::model::OnnxModel;
use crate::manifest::Attention;
use crate::output::{CaptionRow, RowFailure, now_us};
use crate::retry::TransientRetry;

/// Encoded batches the encoder thread may hold ready for the decoder.
const ENCODED_AHEAD: usize = 4;

/// How the model thread runs the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderMode {
    FixedBatches,
    /// Continuous batching over this many decoder rows, the encoder on its own
    /// thread or not.
    Continuous {
        rows: usize,
        encoder_thread: bool,
    },
}

impl DecoderMode {
    /// Continuous batching where the export and the generation allow it.
    pub fn for_model(
        model: &OnnxModel,
        params: &GenerationParams,
        rows: usize,
        encoder_thread: bool,
    ) -> Self {
        if model.attention() == Attention::Fused && params.beams <= 1 && rows > 0 {
            DecoderMode::Continuous {
                rows,
                encoder_thread,
            }
        } else {
            DecoderMode::FixedBatches
        }
    }
}

/// Time the model stage's threads spend working.
#[derive(Debug, Default, Clone)]
pub struct ModelClocks {
    /// The model thread (encoder and decoder, or the decoder alone).
    pub model: Arc<BusyClock>,
    /// The encoder thread, when there is one.
    pub encoder: Arc<BusyClock>,
}

/// What the model thread is told besides its model and channels.
pub struct ModelThread {
    pub params: GenerationParams,
    pub mode: DecoderMode,
    /// True while it waits for a batch (with continuous batching: while decoder rows
    /// are free and no clip waits for them).
    pub idle: Arc<AtomicBool>,
    /// Time spent in the model.
    pub clocks: ModelClocks,
    pub recovery: Recovery,
}

/// Starts the model thread. It ends when the batch channel closes (or the sink
/// is gone, or the model kept failing).
pub fn spawn(
    model: OnnxModel,
    thread: ModelThread,
    batches: Receiver<Vec<SegmentJob>>,
    sink: Sender<SinkMessage>,
) -> std::io::Result<JoinHandle<()>> {
    let ModelThread {
        params,
        mode,
        idle,
        clocks,
        recovery,
    } = thread;
    std::thread::Builder::new()
        .name("audiocap-model".into())
        .spawn(move || {
            let probe = probe_segment(&model);
            let stage = Stage {
                model,
                params,
                sink,
                idle,
                busy: clocks.model,
                recovery,
                probe,
            };
            match mode {
                DecoderMode::FixedBatches => stage.run_fixed(batches),
                DecoderMode::Continuous {
                    rows,
                    encoder_thread,
                } => {
                    let encoder_clock = encoder_thread.then_some(clocks.encoder);
                    stage.run_continuous(batches, rows, encoder_clock)
                }
            }
        })
}

/// How the stage meets a failing model ([`super::recover`]).
#[derive(Debug, Clone)]
pub struct Recovery {
    pub retry: TransientRetry,
    pub faults: Arc<ModelFaults>,
    /// Set when the stage gives up, so the listing stops too.
    pub stop: Arc<AtomicBool>,
}

struct Stage {
    model: OnnxModel,
    params: GenerationParams,
    sink: Sender<SinkMessage>,
    idle: Arc<AtomicBool>,
    busy: Arc<BusyClock>,
    recovery: Recovery,
    /// The probe's fbank: silence, one encoder patch long.
    probe: (Vec<f32>, usize),
}

/// A segment no model has a reason to refuse: silence (normalised fbank zeros) as
/// long as the encoder's shortest input.
fn probe_segment(model: &OnnxModel) -> (Vec<f32>, usize) {
    let frames = model.manifest.encoder.min_frames.max(1);
    let bins = model.manifest.front_end.num_mel_bins;
    (vec![0.0; frames * bins], frames)
}

/// Captions the probe once, two tokens long. A model that cannot caption silence (a
/// graph whose outputs have other shapes than its manifest says, or that fails on
/// every input) is refused before any input is listed or written, rather than waited
/// for as a failing device mid-run.
pub fn check_model(model: &mut OnnxModel) -> Result<(), crate::engine::error::EngineError> {
    let (fbank, frames) = probe_segment(model);
    let row = CaptionRow::default();
    let params = GenerationParams {
        max_new_tokens: 2,
        beams: 1,
        min_new_tokens: 0,
    };
    caption_segments(model, &[(&row, fbank.as_slice(), frames)], &params).map(|_| ())
}

/// A clip encoded and waiting for a decoder row (or in one).
struct Waiting {
    input_id: u64,
    row: CaptionRow,
    /// Kept until the caption is done, so a clip a failing model dropped can be
    /// captioned again.
    fbank: Vec<f32>,
    frames: usize,
}

impl Waiting {
    fn into_job(self) -> SegmentJob {
        SegmentJob {
            input_id: self.input_id,
            row: self.row,
            fbank: self.fbank,
            frames: self.frames,
        }
    }
}

/// A batch's clips and their audio embeddings, where the model runs.
struct Encoded {
    clips: Vec<Waiting>,
    audio: AudioEmbeds,
}

/// Where the decoder loop gets encoded clips.
enum Intake {
    /// The decoder's thread encodes each batch as it arrives.
    Inline(Receiver<Vec<SegmentJob>>),
    /// The encoder thread hands them over.
    Thread(Receiver<Encoded>),
}

/// What the intake had.
enum Next {
    Clips(Encoded),
    /// Nothing ready (only when not waiting for it).
    Empty,
    /// The input has ended.
    Closed,
}

impl Stage {
    fn run_fixed(mut self, batches: Receiver<Vec<SegmentJob>>) {
        loop {
            self.idle.store(true, Ordering::Release);
            let Ok(batch) = batches.recv_blocking() else {
                break;
            };
            self.idle.store(false, Ordering::Release);
            let Some(rows) = self.caption_recovering(&batch) else {
                // The model is gone: what is queued is left for the next run.
                return self.drain(batches);
            };
            tracing::debug!(segments = rows.len(), "batch captioned");
            let done = batch.iter().map(|s| s.input_id).zip(rows).collect();
            if !self.send(done) {
                return;
            }
        }
        self.idle.store(true, Ordering::Release);
    }

    /// The rows of `batch`; a failure is met as [`super::recover`] says. `None` when
    /// the stage gave up.
    fn caption_recovering(&mut self, batch: &[SegmentJob]) -> Option<Vec<CaptionRow>> {
        let (model, params) = (&mut self.model, &self.params);
        let first = self.busy.time(|| caption_jobs(model, batch, params));
        let error = match first {
            Ok(rows) => return Some(rows),
            Err(e) => e,
        };
        let Stage {
            model,
            params,
            busy,
            recovery,
            probe,
            ..
        } = self;
        let model = std::cell::RefCell::new(model);
        recover(
            batch,
            error,
            |jobs| busy.time(|| caption_jobs(&mut model.borrow_mut(), jobs, params)),
            || {
                let row = CaptionRow::default();
                let segment = [(&row, probe.0.as_slice(), probe.1)];
                caption_segments(&mut model.borrow_mut(), &segment, params)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
            |job, error| {
                job.row
                    .failed(RowFailure::Model, format!("model: {error}"), now_us())
            },
            &recovery.retry,
            &recovery.faults,
        )
        .or_else(|| {
            recovery.stop.store(true, Ordering::Relaxed);
            None
        })
    }

    /// Takes the batches left without captioning them (their inputs are not
    /// committed), so the stages before can finish.
    fn drain(&self, batches: Receiver<Vec<SegmentJob>>) {
        let mut left = 0usize;
        while let Ok(batch) = batches.recv_blocking() {
            left += batch.len();
        }
        tracing::warn!(segments = left, "segments left for the next run");
        self.idle.store(true, Ordering::Release);
    }

    fn run_continuous(
        mut self,
        batches: Receiver<Vec<SegmentJob>>,
        rows: usize,
        encoder_clock: Option<Arc<BusyClock>>,
    ) {
        let batcher = match ContinuousBatcher::new(&self.model, rows, self.params.clone()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("continuous batching unavailable ({e}); running fixed batches");
                return self.run_fixed(batches);
            }
        };
        let encoder = encoder_clock.and_then(|clock| self.start_encoder(&batches, clock));
        match encoder {
            Some((rx, handle)) => {
                // The encoder thread holds its own handle on the batches.
                drop(batches);
                self.decode_continuously(batcher, Intake::Thread(rx));
                // The intake is dropped: the encoder thread ends at its next send.
                let _ = handle.join();
            }
            None => self.decode_continuously(batcher, Intake::Inline(batches)),
        }
        self.idle.store(true, Ordering::Release);
    }

    /// Moves the encoder to a thread of its own, fed by `batches`. `None` (the
    /// encoder stays here) when there is no encoder to move or no thread to be had.
    fn start_encoder(
        &mut self,
        batches: &Receiver<Vec<SegmentJob>>,
        clock: Arc<BusyClock>,
    ) -> Option<(Receiver<Encoded>, JoinHandle<()>)> {
        let (tx, rx) = async_channel::bounded(ENCODED_AHEAD);
        let (give, receive) = std::sync::mpsc::sync_channel::<AudioEncoder>(1);
        let (batches, sink) = (batches.clone(), self.sink.clone());
        let (recovery, probe) = (self.recovery.clone(), self.probe.clone());
        let thread = std::thread::Builder::new()
            .name("audiocap-encoder".into())
            .spawn(move || {
                if let Ok(encoder) = receive.recv() {
                    run_encoder(encoder, batches, tx, sink, clock, recovery, probe);
                }
            });
        let handle = match thread {
            Ok(handle) => handle,
            Err(e) => {
                tracing::warn!("no encoder thread ({e}); encoding on the model thread");
                return None;
            }
        };
        let encoder = self.model.take_encoder()?;
        // The thread is waiting for it.
        give.send(encoder).ok()?;
        Some((rx, handle))
    }

    fn decode_continuously(&mut self, mut batcher: ContinuousBatcher<Waiting>, intake: Intake) {
        let rows = batcher.rows();
        // Clips join when this many rows are free (one prefill for several clips),
        // or whenever the decoder would otherwise run empty or the input has ended.
        let refill = (rows / 8).max(1);
        // Clips encoded and waiting for rows: their rows here, their audio on the
        // device, in the same order.
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        let mut audio = AudioQueue::new();
        let mut input_open = true;
        loop {
            // Take in enough encoded clips to fill the free rows.
            while input_open && waiting.len() < batcher.free() {
                let block = batcher.active() == 0 && waiting.is_empty();
                match self.next_encoded(&intake, block) {
                    Some(Next::Clips(encoded)) => {
                        audio.push(encoded.audio);
                        waiting.extend(encoded.clips);
                    }
                    Some(Next::Empty) => break,
                    Some(Next::Closed) => input_open = false,
                    None => return,
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
                        // Their audio is lost; they are captioned apart, and the clips
                        // in the decoder go on.
                        tracing::warn!("joining clips to the decoder failed: {e}");
                        let jobs = tags.into_iter().map(Waiting::into_job).collect();
                        if !self.recover_jobs(jobs) {
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
    }

    /// The next encoded batch from `intake`, waiting for it when `block` (and
    /// telling the batch stage so). `None` when the sink is gone.
    fn next_encoded(&mut self, intake: &Intake, block: bool) -> Option<Next> {
        loop {
            let batch = match intake {
                Intake::Thread(rx) => {
                    return Some(match wait_or_try(rx, block, &self.idle) {
                        Some(Ok(encoded)) => Next::Clips(encoded),
                        Some(Err(())) => Next::Closed,
                        None => Next::Empty,
                    });
                }
                Intake::Inline(rx) => match wait_or_try(rx, block, &self.idle) {
                    Some(Ok(batch)) => batch,
                    Some(Err(())) => return Some(Next::Closed),
                    None => return Some(Next::Empty),
                },
            };
            let model = &mut self.model;
            match self.busy.time(|| encode_batch(batch, |c| model.encode(c))) {
                Ok(encoded) => return Some(Next::Clips(encoded)),
                Err((jobs, _)) => {
                    // Captioned apart (whole, one by one) or the stage gives up.
                    if !self.recover_jobs(jobs) {
                        return None;
                    }
                }
            }
        }
    }

    /// Keeps the captions a decoder call finished; when it failed, the clips in
    /// flight (joining ones too) are captioned apart ([`Self::recover_jobs`]). False
    /// when the sink is gone or the stage gave up.
    fn collect(
        &mut self,
        result: crate::engine::error::Result<Vec<(Waiting, Generated)>>,
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
                let jobs = batcher
                    .abandon()
                    .into_iter()
                    .map(Waiting::into_job)
                    .collect();
                self.recover_jobs(jobs)
            }
        }
    }

    /// Clips a failed model call dropped, captioned apart as [`super::recover`]
    /// says and sent. False when the sink is gone or the stage gave up (the rows
    /// are not sent: their inputs are left for the next run).
    fn recover_jobs(&mut self, jobs: Vec<SegmentJob>) -> bool {
        if jobs.is_empty() {
            return true;
        }
        if !self.model.has_encoder() {
            // The encoder runs on its own thread: the clips cannot be encoded again
            // here. Never an error row: the run gives up and the next one takes them.
            tracing::error!("a decoder call failed with the encoder on its own thread; giving up");
            self.recovery
                .faults
                .give_up("a decoder call failed (the encoder runs on its own thread)".into());
            self.recovery.stop.store(true, Ordering::Relaxed);
            return false;
        }
        match self.caption_recovering(&jobs) {
            Some(rows) => self.send(jobs.iter().map(|j| j.input_id).zip(rows).collect()),
            None => false,
        }
    }

    /// Hands finished rows to the sink, grouped by input. False when the sink is gone.
    fn send(&self, rows: Vec<(u64, CaptionRow)>) -> bool {
        send_rows(&self.sink, rows)
    }
}

/// The rows of some jobs, or the model's failure (as text).
fn caption_jobs(
    model: &mut OnnxModel,
    jobs: &[SegmentJob],
    params: &GenerationParams,
) -> Result<Vec<CaptionRow>, String> {
    let segments: Vec<(&CaptionRow, &[f32], usize)> = jobs
        .iter()
        .map(|s| (&s.row, s.fbank.as_slice(), s.frames))
        .collect();
    caption_segments(model, &segments, params).map_err(|e| e.to_string())
}

/// Rows to the sink, grouped by input. False when the sink is gone.
fn send_rows(sink: &Sender<SinkMessage>, rows: Vec<(u64, CaptionRow)>) -> bool {
    let mut by_input: BTreeMap<u64, Vec<CaptionRow>> = BTreeMap::new();
    for (input_id, row) in rows {
        by_input.entry(input_id).or_default().push(row);
    }
    by_input.into_iter().all(|(input_id, rows)| {
        sink.send_blocking(SinkMessage::Rows { input_id, rows })
            .is_ok()
    })
}

/// The next message of `rx`: waiting for it when `block` (with `idle` set while
/// waiting), else only if one is ready. `Some(Err(()))` when the channel has closed,
/// `None` when nothing was ready.
fn wait_or_try<T>(rx: &Receiver<T>, block: bool, idle: &AtomicBool) -> Option<Result<T, ()>> {
    if block {
        idle.store(true, Ordering::Release);
        let r = rx.recv_blocking().map_err(|_| ());
        idle.store(false, Ordering::Release);
        Some(r)
    } else {
        match rx.try_recv() {
            Ok(v) => Some(Ok(v)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Closed) => Some(Err(())),
        }
    }
}

/// Encodes a batch's fbank into clips waiting for decoder rows; on failure, the
/// batch back with the error.
fn encode_batch(
    batch: Vec<SegmentJob>,
    encode: impl FnOnce(&[(&[f32], usize)]) -> crate::engine::error::Result<AudioEmbeds>,
) -> Result<Encoded, (Vec<SegmentJob>, String)> {
    let inputs: Vec<(&[f32], usize)> = batch
        .iter()
        .map(|s| (s.fbank.as_slice(), s.frames))
        .collect();
    match encode(&inputs) {
        Ok(mut audio) => Ok(Encoded {
            clips: batch
                .into_iter()
                .zip(audio.take_extras())
                .map(|(job, extras)| {
                    let mut row = job.row;
                    extras.apply(&mut row);
                    Waiting {
                        input_id: job.input_id,
                        row,
                        fbank: job.fbank,
                        frames: job.frames,
                    }
                })
                .collect(),
            audio,
        }),
        Err(e) => Err((batch, e.to_string())),
    }
}

/// The encoder thread: encodes batches as they come and hands them to the decoder
/// (up to [`ENCODED_AHEAD`] ahead); a batch it cannot encode goes to the sink as
/// error rows. Ends when the batches end, the decoder is gone or the sink is.
fn run_encoder(
    mut encoder: AudioEncoder,
    batches: Receiver<Vec<SegmentJob>>,
    encoded: Sender<Encoded>,
    sink: Sender<SinkMessage>,
    busy: Arc<BusyClock>,
    recovery: Recovery,
    probe: (Vec<f32>, usize),
) {
    /// A clip (or a batch of them) encoded, or one that failed on its own.
    enum Outcome {
        Encoded(Encoded),
        AtFault(u64, Box<CaptionRow>),
    }
    while let Ok(batch) = batches.recv_blocking() {
        let (jobs, error) = match busy.time(|| encode_batch(batch, |c| encoder.encode(c))) {
            Ok(clips) => {
                if encoded.send_blocking(clips).is_err() {
                    return;
                }
                continue;
            }
            Err(failed) => failed,
        };
        let encoder = std::cell::RefCell::new(&mut encoder);
        let outcomes = recover(
            &jobs,
            error,
            |some| {
                busy.time(|| encode_batch(some.to_vec(), |c| encoder.borrow_mut().encode(c)))
                    .map(|e| vec![Outcome::Encoded(e)])
                    .map_err(|(_, error)| error)
            },
            || {
                let clip = [(probe.0.as_slice(), probe.1)];
                encoder
                    .borrow_mut()
                    .encode(&clip)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
            |job, error| {
                let row = job
                    .row
                    .failed(RowFailure::Model, format!("model: {error}"), now_us());
                Outcome::AtFault(job.input_id, Box::new(row))
            },
            &recovery.retry,
            &recovery.faults,
        );
        let Some(outcomes) = outcomes else {
            recovery.stop.store(true, Ordering::Relaxed);
            // What is queued is left for the next run.
            while batches.recv_blocking().is_ok() {}
            return;
        };
        for outcome in outcomes {
            let sent = match outcome {
                Outcome::Encoded(clips) => encoded.send_blocking(clips).is_ok(),
                Outcome::AtFault(input_id, row) => send_rows(&sink, vec![(input_id, *row)]),
            };
            if !sent {
                return;
            }
        }
    }
}
