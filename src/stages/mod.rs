//! The stages of `audiocap run`, in the order data flows through them:
//!
//! `list → fetch → decode (+ resample, segment, fbank) → batch → model → sink`
//!
//! Each stage is a thin async loop between bounded `async-channel`s, so a slow stage
//! holds the ones before it back (back-pressure) instead of memory growing. CPU work
//! (decoding, fbank) runs on tokio's blocking pool; the ONNX sessions are owned by
//! one dedicated thread (`model`). The heavy lifting lives below, in `audio`,
//! `storage`, `engine` and `dataset`.

pub mod batch;
pub mod decode;
pub mod fetch;
pub mod list;
pub mod model;
pub mod recover;
pub mod sink;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::output::CaptionRow;
use crate::storage::InputRef;

/// An input picked for this run, numbered in listing order.
#[derive(Debug, Clone)]
pub struct InputTask {
    pub id: u64,
    pub input: InputRef,
}

/// One segment ready for the model: its row so far and its fbank frames.
#[derive(Debug, Clone)]
pub struct SegmentJob {
    pub input_id: u64,
    pub row: CaptionRow,
    /// Row-major [frames, mel bins].
    pub fbank: Vec<f32>,
    pub frames: usize,
}

/// What reaches the sink.
#[derive(Debug, Clone)]
pub enum SinkMessage {
    /// Finished rows of one input (captions, or errors).
    Rows {
        input_id: u64,
        rows: Vec<CaptionRow>,
    },
    /// Everything about an input is known: how many rows it will have in total.
    Done(InputDone),
}

/// The end of an input's front end.
#[derive(Debug, Clone)]
pub struct InputDone {
    pub input_id: u64,
    pub uri: String,
    /// Rows this input produces (segments, or the one error row).
    pub rows: usize,
    /// Seconds of audio decoded (0 when the input failed).
    pub audio_seconds: f64,
    /// Why the whole input failed, as a short kind for the summary
    /// (`not_found`, `unsupported_codec`, ...).
    pub failure: Option<&'static str>,
    /// The source as decoded (rate, channels, codec, length); `None` when it
    /// failed before decoding.
    pub info: Option<crate::audio::decode::AudioInfo>,
}

/// Time a stage spends working, summed over its workers.
#[derive(Debug, Default)]
pub struct BusyClock {
    nanos: AtomicU64,
}

impl BusyClock {
    pub fn add(&self, d: Duration) {
        self.nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Runs `f`, counting its time as busy.
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.add(start.elapsed());
        out
    }

    pub fn seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

/// Live counts of a run, updated by the stages and read by the progress display
/// and the summary.
#[derive(Debug, Default)]
pub struct RunCounters {
    /// Inputs listed (all shards).
    pub listed: AtomicU64,
    /// Inputs listed for this shard and taken into this run.
    pub queued: AtomicU64,
    /// Inputs skipped because they are already in the dataset.
    pub already_done: AtomicU64,
    /// Inputs listed twice (by two sources) and taken once.
    pub duplicates: AtomicU64,
    /// Inputs whose rows are committed or buffered for the next commit.
    pub inputs_done: AtomicU64,
    /// Inputs that produced no caption at all.
    pub inputs_failed: AtomicU64,
    /// Segments (rows) written, captions among them.
    pub rows: AtomicU64,
    pub captions: AtomicU64,
    /// Audio decoded, in milliseconds.
    pub audio_ms: AtomicU64,
    /// Bytes fetched from storage.
    pub bytes_fetched: AtomicU64,
    /// Set once the listing has ended (totals are final).
    pub listing_done: std::sync::atomic::AtomicBool,
    /// Files of this shard that folder listings left out for their extension, by
    /// extension (lower-cased, no dot; empty for none).
    pub skipped_by_extension: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl RunCounters {
    /// Counts one file left out for its `extension`.
    pub fn skipped(&self, extension: &str) {
        if let Ok(mut counts) = self.skipped_by_extension.lock() {
            *counts.entry(extension.to_string()).or_default() += 1;
        }
    }

    /// The counts of [`RunCounters::skipped`] so far.
    pub fn skipped_counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.skipped_by_extension
            .lock()
            .map(|counts| counts.clone())
            .unwrap_or_default()
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}
