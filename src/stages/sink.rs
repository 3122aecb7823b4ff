//! Sink stage: gathers every row of an input (segments arrive from the model in
//! any order, error rows from the front end), completes them with what is known
//! only at the end of decoding, and writes them together, in segment order, to the
//! run's target: a dataset (an input is never split across two part files, what
//! makes resume exact) or one Parquet file (`audiocap caption`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::Receiver;

use super::decode::complete_rows;
use super::{BusyClock, InputDone, RunCounters, SinkMessage};
use crate::dataset::{DatasetError, DatasetWriter};
use crate::output::{CaptionFileWriter, CaptionRow, OutputError, RowFailure};

/// Where the rows go.
pub enum RowTarget {
    /// A dataset of committed parts (`audiocap run`).
    Dataset(Box<DatasetWriter>),
    /// One Parquet file, visible once finished (`audiocap caption`).
    File(Box<CaptionFileWriter>),
}

/// Why the sink could not write.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    File(#[from] OutputError),
}

impl RowTarget {
    async fn write_input(&mut self, rows: &[CaptionRow]) -> Result<(), SinkError> {
        match self {
            Self::Dataset(writer) => writer.write_input(rows).await?,
            Self::File(writer) => writer.write(rows)?,
        }
        Ok(())
    }

    async fn commit_if_due(&mut self) -> Result<(), SinkError> {
        if let Self::Dataset(writer) = self {
            writer.commit_if_due().await?;
        }
        Ok(())
    }
}

/// Failures by kind, for the summary.
pub type FailureCounts = std::collections::BTreeMap<String, u64>;

#[derive(Default)]
struct Pending {
    rows: Vec<CaptionRow>,
    done: Option<InputDone>,
}

/// What the sink saw.
#[derive(Debug, Default)]
pub struct SinkOutcome {
    /// Whole-input failures by kind.
    pub failed_inputs: FailureCounts,
    /// Failed segments (inputs that decoded but a segment did not caption) by kind.
    pub failed_segments: FailureCounts,
    /// Every error row by its `error_kind`.
    pub error_rows: FailureCounts,
}

/// Writes rows until the channel closes; commits an open part whenever it is due.
/// Returns the target (to be finished by the caller, with the run summary).
pub async fn run(
    messages: Receiver<SinkMessage>,
    mut writer: RowTarget,
    counters: Arc<RunCounters>,
    busy: Arc<BusyClock>,
) -> Result<(RowTarget, SinkOutcome), SinkError> {
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut outcome = SinkOutcome::default();
    // Commits are checked on a tick as well, so a slow trickle of inputs is still
    // committed on time.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            m = messages.recv() => match m {
                Ok(m) => m,
                Err(_closed) => break,
            },
            _ = tick.tick() => {
                let started = Instant::now();
                writer.commit_if_due().await?;
                busy.add(started.elapsed());
                continue;
            }
        };
        let input_id = match &message {
            SinkMessage::Rows { input_id, .. } => *input_id,
            SinkMessage::Done(done) => done.input_id,
        };
        let entry = pending.entry(input_id).or_default();
        match message {
            SinkMessage::Rows { rows, .. } => entry.rows.extend(rows),
            SinkMessage::Done(done) => entry.done = Some(done),
        }
        let complete = entry
            .done
            .as_ref()
            .is_some_and(|d| entry.rows.len() >= d.rows);
        if !complete {
            continue;
        }
        let Some(Pending {
            mut rows,
            done: Some(done),
        }) = pending.remove(&input_id)
        else {
            continue;
        };
        let started = Instant::now();
        rows.sort_by_key(|r| r.segment_index);
        if let Some(info) = &done.info {
            complete_rows(&mut rows, info);
        }
        record(&done, &rows, &counters, &mut outcome);
        writer.write_input(&rows).await?;
        writer.commit_if_due().await?;
        busy.add(started.elapsed());
    }
    if !pending.is_empty() {
        // Only possible if a stage before died mid-input; those inputs are not
        // committed, so the next run takes them again.
        tracing::warn!(
            inputs = pending.len(),
            "inputs left incomplete; they will be retried by the next run"
        );
    }
    Ok((writer, outcome))
}

fn record(done: &InputDone, rows: &[CaptionRow], counters: &RunCounters, out: &mut SinkOutcome) {
    let captions = rows.iter().filter(|r| r.caption.is_some()).count() as u64;
    RunCounters::bump(&counters.inputs_done, 1);
    RunCounters::bump(&counters.rows, rows.len() as u64);
    RunCounters::bump(&counters.captions, captions);
    RunCounters::bump(&counters.audio_ms, (done.audio_seconds * 1000.0) as u64);
    if let Some(kind) = done.failure {
        *out.failed_inputs.entry(kind.to_string()).or_default() += 1;
    }
    if captions == 0 {
        RunCounters::bump(&counters.inputs_failed, 1);
        if done.failure.is_none() {
            *out.failed_inputs.entry("no_caption".into()).or_default() += 1;
        }
    }
    for r in rows.iter().filter(|r| r.error.is_some()) {
        let kind = r.failure.map_or("unknown", RowFailure::kind);
        *out.error_rows.entry(kind.to_string()).or_default() += 1;
    }
    if done.failure.is_some() && captions == 0 {
        return;
    }
    for r in rows.iter().filter(|r| r.error.is_some()) {
        let kind = r.failure.map_or("input", RowFailure::segment_kind);
        *out.failed_segments.entry(kind.to_string()).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::RowFailure;

    #[test]
    fn segment_failures_are_counted_by_the_kind_their_rows_carry() {
        let done = InputDone {
            input_id: 0,
            uri: "a.wav".into(),
            rows: 4,
            audio_seconds: 12.0,
            failure: None,
            info: None,
        };
        let row = CaptionRow {
            uri: "a.wav".into(),
            ..Default::default()
        };
        let rows = [
            row.captioned("a dog barks".into(), -0.4, 3, 1),
            // The kind, not the text, decides: this message looks like a model error.
            row.failed(RowFailure::TooShort, "model: looks like one", 1),
            row.failed(RowFailure::Tokenizer, "decoding tokens to text: bad id", 1),
            row.failed(RowFailure::Model, "model: out of memory", 1),
        ];
        let counters = RunCounters::default();
        let mut outcome = SinkOutcome::default();
        record(&done, &rows, &counters, &mut outcome);
        let kinds: Vec<(&str, u64)> = outcome
            .failed_segments
            .iter()
            .map(|(k, n)| (k.as_str(), *n))
            .collect();
        assert_eq!(kinds, [("model", 1), ("tokenizer", 1), ("too_short", 1)]);
        assert!(outcome.failed_inputs.is_empty());
    }
}
