//! Model stage: one thread owns the ONNX sessions (`Session::run` takes `&mut`),
//! takes batches, runs the encoder and the decoder, and hands rows to the sink.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use async_channel::{Receiver, Sender};

use super::{BusyClock, SegmentJob, SinkMessage};
use crate::engine::captioner::caption_segments;
use crate::engine::generate::GenerationParams;
use crate::engine::model::OnnxModel;
use crate::output::CaptionRow;

/// Starts the model thread. It ends when the batch channel closes (or the sink
/// is gone); `idle` is true while it waits for a batch, `busy` counts the time it
/// spends in the model.
pub fn spawn(
    mut model: OnnxModel,
    params: GenerationParams,
    batches: Receiver<Vec<SegmentJob>>,
    sink: Sender<SinkMessage>,
    idle: Arc<AtomicBool>,
    busy: Arc<BusyClock>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("audiocap-model".into())
        .spawn(move || {
            loop {
                idle.store(true, Ordering::Release);
                let Ok(batch) = batches.recv_blocking() else {
                    break;
                };
                idle.store(false, Ordering::Release);
                let segments: Vec<(&CaptionRow, &[f32], usize)> = batch
                    .iter()
                    .map(|s| (&s.row, s.fbank.as_slice(), s.frames))
                    .collect();
                let rows = busy.time(|| caption_segments(&mut model, &segments, &params));
                tracing::debug!(segments = rows.len(), "batch captioned");
                // Rows go to the sink grouped by input.
                let mut by_input: BTreeMap<u64, Vec<CaptionRow>> = BTreeMap::new();
                for (seg, row) in batch.iter().zip(rows) {
                    by_input.entry(seg.input_id).or_default().push(row);
                }
                for (input_id, rows) in by_input {
                    if sink
                        .send_blocking(SinkMessage::Rows { input_id, rows })
                        .is_err()
                    {
                        return;
                    }
                }
            }
            idle.store(true, Ordering::Release);
        })
}
