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
    /// Files of this shard that folder listings left out for their extension
    /// (`input.extensions`), by extension (no dot; `""` for a name without one).
    pub skipped_by_extension: std::collections::BTreeMap<String, u64>,
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
    /// With `--retry-failed`: the failed inputs taken out of committed parts to be
    /// captioned again (each is then among `inputs.taken`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retried: Option<crate::dataset::SupersedeReport>,
    /// The shard as a whole once this run is committed: what earlier runs it
    /// resumed from committed, plus this run. `None` without resume.
    pub shard: Option<ShardTotals>,
}

/// A shard's inputs and failures over every run that wrote it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ShardTotals {
    /// Inputs written (by parts that record it) and those with no caption at all.
    pub inputs: u64,
    pub failed_inputs: u64,
    pub error_rows: u64,
    pub error_rows_by_kind: std::collections::BTreeMap<String, u64>,
    /// Parts from before inputs were recorded (their inputs are not counted).
    pub unrecorded_parts: u64,
}

impl RunSummary {
    /// Fraction of the shard's inputs that failed: over every run it resumed from
    /// when it resumed, else over this run's. What `run.max_failed_fraction` (exit
    /// code 3) is held to.
    pub fn failed_fraction(&self) -> f64 {
        let (failed, written) = self.failed_of_written();
        if written == 0 {
            0.0
        } else {
            failed as f64 / written as f64
        }
    }

    /// (failed, written) inputs of the shard (or of this run, without resume).
    pub fn failed_of_written(&self) -> (u64, u64) {
        match &self.shard {
            Some(t) => (t.failed_inputs, t.inputs),
            None => (self.inputs.failed, self.inputs.written),
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
        if !self.inputs.skipped_by_extension.is_empty() {
            s.push('\n');
            s.push_str(&skipped_line(&self.inputs.skipped_by_extension));
        }
        for (title, kinds) in [
            ("failed inputs", &self.failed_inputs_by_kind),
            ("failed segments", &self.failed_segments_by_kind),
        ] {
            if !kinds.is_empty() {
                let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
                s.push_str(&format!("\n{title}: {}", list.join(", ")));
            }
        }
        if let Some(r) = &self.retried {
            s.push_str(&format!(
                "\nretried: {} failed input(s) taken out of {} committed part(s) to caption again",
                r.failed_inputs, r.parts
            ));
        }
        if let Some(t) = &self.shard {
            s.push_str(&format!(
                "\nshard so far: {} inputs, {} failed, {} error rows",
                t.inputs, t.failed_inputs, t.error_rows
            ));
            if !t.error_rows_by_kind.is_empty() {
                let list: Vec<String> = t
                    .error_rows_by_kind
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                s.push_str(&format!(" ({})", list.join(", ")));
            }
            if t.unrecorded_parts > 0 {
                s.push_str(&format!(
                    "; {} older part(s) do not record their inputs",
                    t.unrecorded_parts
                ));
            }
        }
        if self.stopped_early {
            s.push_str("\nstopped early: the next run continues where this one stopped");
        }
        s
    }
}

/// Most extensions the summary names one by one; the rest are added up.
const NAMED_EXTENSIONS: usize = 12;

/// `skipped by extension (input.extensions): 312 .wma, 4 .txt, 1 without one`, the
/// commonest first.
fn skipped_line(counts: &std::collections::BTreeMap<String, u64>) -> String {
    let mut by_count: Vec<(&String, &u64)> = counts.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut parts: Vec<String> = by_count
        .iter()
        .take(NAMED_EXTENSIONS)
        .map(|(ext, n)| match ext.as_str() {
            "" => format!("{n} without an extension"),
            ext => format!("{n} .{ext}"),
        })
        .collect();
    if by_count.len() > NAMED_EXTENSIONS {
        let rest: u64 = by_count[NAMED_EXTENSIONS..].iter().map(|(_, n)| **n).sum();
        parts.push(format!(
            "{rest} of {} other extensions",
            by_count.len() - NAMED_EXTENSIONS
        ));
    }
    format!(
        "skipped by extension (input.extensions): {}",
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_files_are_counted_by_extension_commonest_first() {
        let mut summary = RunSummary::default();
        assert!(!summary.render().contains("skipped by extension"));
        summary.inputs.skipped_by_extension = [("wma", 312), ("txt", 4), ("", 1)]
            .map(|(e, n)| (e.to_string(), n))
            .into();
        let rendered = summary.render();
        assert!(
            rendered.contains(
                "\nskipped by extension (input.extensions): 312 .wma, 4 .txt, 1 without an extension"
            ),
            "{rendered}"
        );
        let many: std::collections::BTreeMap<String, u64> =
            (0..20u64).map(|i| (format!("x{i:02}"), 100 - i)).collect();
        let line = skipped_line(&many);
        assert!(line.contains("100 .x00, 99 .x01"), "{line}");
        assert!(line.ends_with(", 676 of 8 other extensions"), "{line}");
    }
}
