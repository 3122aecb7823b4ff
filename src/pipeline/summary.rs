//! The run summary: printed at the end, stored in the shard's commit record beside
//! the dataset, and the basis of the exit code.

use serde::Serialize;

use super::progress::human_duration;
use crate::stages::sink::FailureCounts;

/// Inputs seen by the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InputCounts {
    /// Listed by the sources (every shard's).
    pub listed: u64,
    /// Belonging to this shard and not yet in the dataset: taken by this run.
    pub taken: u64,
    /// Skipped because the dataset already has them (resume).
    pub already_done: u64,
    /// Listed more than once and taken once.
    pub duplicates: u64,
    /// Written to the dataset by this run.
    pub written: u64,
    /// Of those, inputs with no caption at all (each has error rows).
    pub failed: u64,
}

/// Fraction of the wall time each stage's workers were busy (1 = always working;
/// for stages with several workers, averaged over them).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageBusy {
    pub fetch: f64,
    pub decode: f64,
    /// The model thread: encoder and decoder, or the decoder alone when the
    /// encoder has a thread of its own.
    pub model: f64,
    /// The encoder's own thread, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder: Option<f64>,
    pub sink: f64,
}

/// Everything a run reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub pipeline: String,
    pub model: String,
    pub output: String,
    pub shard_index: u32,
    pub shard_count: u32,
    pub inputs: InputCounts,
    /// Rows written: one per segment (or one error row per failed input).
    pub rows: u64,
    pub captions: u64,
    pub failed_rows: u64,
    /// Whole-input failures by kind (`not_found`, `unsupported_codec`, ...).
    pub failed_inputs_by_kind: FailureCounts,
    /// Failed segments of inputs that decoded, by kind (`too_short`, `model`).
    pub failed_segments_by_kind: FailureCounts,
    pub audio_hours: f64,
    pub wall_seconds: f64,
    pub captions_per_second: f64,
    /// Seconds of audio captioned per second of wall time.
    pub realtime_factor: f64,
    pub stage_busy: StageBusy,
    /// Part files this run committed.
    pub parts: Vec<String>,
    /// Whether the run was stopped early (signal or `run.limit`).
    pub stopped_early: bool,
}

impl RunSummary {
    /// Fraction of the inputs written by this run that failed.
    pub fn failed_fraction(&self) -> f64 {
        if self.inputs.written == 0 {
            0.0
        } else {
            self.inputs.failed as f64 / self.inputs.written as f64
        }
    }

    /// A few lines for the terminal.
    pub fn render(&self) -> String {
        let mut s = format!(
            "run {} (shard {}/{}) -> {}\n\
             inputs: {} listed, {} taken, {} already in the dataset, {} duplicates; \
             {} written, {} failed\n\
             rows: {} ({} captions, {} errors); {:.3} h of audio in {} \
             ({:.2} captions/s, {:.1}x realtime)\n\
             busy: fetch {:.0}%, decode {:.0}%, model {:.0}%{}, sink {:.0}%; {} part files committed",
            self.run_id,
            self.shard_index,
            self.shard_count,
            self.output,
            self.inputs.listed,
            self.inputs.taken,
            self.inputs.already_done,
            self.inputs.duplicates,
            self.inputs.written,
            self.inputs.failed,
            self.rows,
            self.captions,
            self.failed_rows,
            self.audio_hours,
            human_duration(self.wall_seconds),
            self.captions_per_second,
            self.realtime_factor,
            self.stage_busy.fetch * 100.0,
            self.stage_busy.decode * 100.0,
            self.stage_busy.model * 100.0,
            self.stage_busy
                .encoder
                .map(|e| format!(" (encoder thread {:.0}%)", e * 100.0))
                .unwrap_or_default(),
            self.stage_busy.sink * 100.0,
            self.parts.len(),
        );
        for (title, kinds) in [
            ("failed inputs", &self.failed_inputs_by_kind),
            ("failed segments", &self.failed_segments_by_kind),
        ] {
            if !kinds.is_empty() {
                let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
                s.push_str(&format!("\n{title}: {}", list.join(", ")));
            }
        }
        if self.stopped_early {
            s.push_str("\nstopped early: the next run continues where this one stopped");
        }
        s
    }
}
