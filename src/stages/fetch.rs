//! Fetch stage: several workers read inputs from storage concurrently (local files
//! are opened in place; objects come into memory, or into a spool file when large).

use std::sync::Arc;
use std::time::Instant;

use async_channel::{Receiver, Sender};

use super::{BusyClock, InputTask, RunCounters};
use crate::storage::{FetchError, Fetched, SpoolOptions, fetch};

/// An input with what fetching it gave.
#[derive(Debug)]
pub struct FetchedInput {
    pub task: InputTask,
    pub result: Result<Fetched, FetchError>,
}

/// One fetch worker: runs until the input channel closes.
pub async fn run(
    inputs: Receiver<InputTask>,
    out: Sender<FetchedInput>,
    spool: Arc<SpoolOptions>,
    counters: Arc<RunCounters>,
    busy: Arc<BusyClock>,
) {
    while let Ok(task) = inputs.recv().await {
        let started = Instant::now();
        let result = fetch(&task.input, &spool).await;
        busy.add(started.elapsed());
        if let Ok(f) = &result {
            RunCounters::bump(&counters.bytes_fetched, f.size);
        }
        if out.send(FetchedInput { task, result }).await.is_err() {
            return;
        }
    }
}
