//! Fetch stage: several workers read inputs from storage concurrently (local files
//! are opened in place; objects come into memory, or into a spool file when large).
//!
//! A transient failure (the network, throttling, a 5xx, a timeout: what the storage
//! client still reports after its own per-request retries) is never an input's
//! final row. The input is fetched again with exponential backoff and jitter for
//! [`TransientRetry::budget`]; when the budget runs out the run gives the input up
//! *without committing anything for it*, stops taking new inputs, and fails (exit
//! code 1), so the next run takes that input and everything after it again. Only
//! permanent failures (not found, permission denied, empty, not a file) become
//! error rows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_channel::{Receiver, Sender};

use super::{BusyClock, InputTask, RunCounters};
use crate::retry::{Backoff, TransientRetry};
use crate::rng::SplitMix64;
use crate::storage::{FetchError, Fetched, SpoolOptions, fetch};

/// An input with what fetching it gave.
#[derive(Debug)]
pub struct FetchedInput {
    pub task: InputTask,
    pub result: Result<Fetched, FetchError>,
}

/// Inputs given up after transient failures: shared by the fetch workers and read
/// by the run at its end.
#[derive(Debug, Default)]
pub struct TransientFaults {
    /// Inputs whose budget ran out.
    pub given_up: AtomicU64,
    /// Inputs not fetched at all once one was given up (left for the next run).
    pub left: AtomicU64,
    /// Fetches retried after a transient failure, over all inputs.
    pub retries: AtomicU64,
    /// The last error given up on.
    last: Mutex<Option<String>>,
}

impl TransientFaults {
    pub fn any_given_up(&self) -> bool {
        self.given_up.load(Ordering::Relaxed) > 0
    }

    pub fn last_error(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What every fetch worker shares.
#[derive(Debug)]
pub struct FetchContext {
    pub spool: SpoolOptions,
    pub counters: Arc<RunCounters>,
    pub busy: Arc<BusyClock>,
    pub retry: TransientRetry,
    pub faults: Arc<TransientFaults>,
    /// Set when an input is given up, so the listing stops too.
    pub stop: Arc<AtomicBool>,
}

/// One fetch worker: runs until the input channel closes.
pub async fn run(inputs: Receiver<InputTask>, out: Sender<FetchedInput>, ctx: Arc<FetchContext>) {
    while let Ok(task) = inputs.recv().await {
        if ctx.faults.any_given_up() {
            // The storage is failing: what is queued is left for the next run.
            RunCounters::bump(&ctx.faults.left, 1);
            continue;
        }
        let started = Instant::now();
        let result = fetch_retrying(&task, &ctx.spool, ctx.retry, &ctx.faults).await;
        ctx.busy.add(started.elapsed());
        let Some(result) = result else {
            ctx.stop.store(true, Ordering::Relaxed);
            continue;
        };
        if let Ok(f) = &result {
            RunCounters::bump(&ctx.counters.bytes_fetched, f.size);
        }
        if out.send(FetchedInput { task, result }).await.is_err() {
            return;
        }
    }
}

/// The input's fetch, retried while it fails transiently and the budget lasts;
/// `None` when it is given up.
async fn fetch_retrying(
    task: &InputTask,
    spool: &SpoolOptions,
    retry: TransientRetry,
    faults: &TransientFaults,
) -> Option<Result<Fetched, FetchError>> {
    // Counted from the input's first failure.
    let mut backoff: Option<Backoff> = None;
    let mut jitter = SplitMix64::new(task.id ^ 0x5DEE_CE66_D1CE_4E5B);
    loop {
        let result = fetch(&task.input, spool).await;
        let error = match &result {
            Err(e) if e.is_transient() => e.to_string(),
            _ => return Some(result),
        };
        let backoff = backoff.get_or_insert_with(|| Backoff::start(retry));
        let Some(wait) = backoff.next_wait() else {
            tracing::error!(
                uri = %task.input.uri,
                error = %error,
                budget_s = retry.budget.as_secs_f64(),
                "giving the input up after transient failures; it is not committed and the next run takes it again"
            );
            RunCounters::bump(&faults.given_up, 1);
            *faults.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
            return None;
        };
        tracing::warn!(uri = %task.input.uri, error = %error, "transient failure, fetching again");
        RunCounters::bump(&faults.retries, 1);
        // Full jitter over [wait/2, wait], so workers that failed together do not
        // all come back at once.
        tokio::time::sleep(wait.mul_f64(0.5 + 0.5 * jitter.next_f64())).await;
    }
}
