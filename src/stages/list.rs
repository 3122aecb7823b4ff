//! List stage: streams the sources' inputs, keeps this shard's, drops those the
//! dataset already has (resume) and those listed twice, and numbers the rest.
//! Inputs that cannot even be listed become error rows straight away; files a folder
//! listing left out for their extension are counted by extension for the summary.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_channel::Sender;
use futures::StreamExt;

use super::{InputDone, InputTask, RunCounters, SinkMessage};
use crate::keyset::{KeySet, KeySetError};
use crate::output::{CaptionRow, RowFailure, now_us};
use crate::storage::{
    InputRef, ListOptions, Listed, ShardSpec, Source, StorageError, StorageOptions,
};

/// Where the inputs come from.
pub enum Inputs {
    /// Sources listed as they stream ([`crate::storage::list_inputs`]).
    Sources {
        sources: Vec<Source>,
        options: ListOptions,
        storage: StorageOptions,
    },
    /// Inputs named already (`audiocap caption`'s files).
    Given(Vec<InputRef>),
}

/// What to list and what to leave out.
pub struct ListPlan {
    pub inputs: Inputs,
    pub shard: ShardSpec,
    /// URIs already committed to the dataset (none: a fresh dataset, or no resume).
    pub committed: Option<KeySet>,
    /// Where the duplicate check spills the URIs it has seen (local disk).
    pub spill_dir: PathBuf,
    /// Stop after this many new inputs.
    pub limit: Option<u64>,
    /// Model and run fields of error rows.
    pub base_row: CaptionRow,
}

/// Lists until the sources end, `limit` is reached or `stop` is set. An `Err` is a
/// listing that failed as a whole (missing bucket, bad credentials).
pub async fn run(
    mut plan: ListPlan,
    inputs: Sender<InputTask>,
    sink: Sender<SinkMessage>,
    counters: Arc<RunCounters>,
    stop: Arc<AtomicBool>,
) -> Result<(), StorageError> {
    let result = list(&mut plan, &inputs, &sink, &counters, &stop).await;
    counters.listing_done.store(true, Ordering::Relaxed);
    result
}

async fn list(
    plan: &mut ListPlan,
    inputs: &Sender<InputTask>,
    sink: &Sender<SinkMessage>,
    counters: &RunCounters,
    stop: &AtomicBool,
) -> Result<(), StorageError> {
    let mut stream = match &plan.inputs {
        Inputs::Sources {
            sources,
            options,
            storage,
        } => crate::storage::list_inputs(sources, options, storage)?,
        Inputs::Given(given) => {
            futures::stream::iter(given.iter().cloned().map(|i| Ok(Listed::Input(i)))).boxed()
        }
    };
    let keys_err = |e: KeySetError| StorageError::ListFailed {
        spec: "the inputs".into(),
        message: format!("keeping the URIs listed: {e}"),
    };
    // URIs taken by this run; a URI listed again (two sources) is taken once.
    let mut taken = KeySet::new(&plan.spill_dir).map_err(keys_err)?;
    let mut next_id = 0u64;
    while let Some(item) = stream.next().await {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (uri, input, list_error) = match item? {
            Listed::Skipped { uri, extension } => {
                // Counted by the shard that would own it, so shards add up.
                if plan.shard.owns(&uri) {
                    counters.skipped(&extension);
                }
                continue;
            }
            Listed::Input(input) => (input.uri.clone(), Some(input), String::new()),
            Listed::Failed { uri, error } => {
                tracing::warn!(%uri, %error, "input cannot be listed");
                (uri, None, error.to_string())
            }
        };
        RunCounters::bump(&counters.listed, 1);
        if !plan.shard.owns(&uri) {
            continue;
        }
        if let Some(committed) = &mut plan.committed
            && committed.contains(&uri).map_err(keys_err)?
        {
            RunCounters::bump(&counters.already_done, 1);
            continue;
        }
        if !taken.insert(&uri).map_err(keys_err)? {
            RunCounters::bump(&counters.duplicates, 1);
            continue;
        }
        if plan.limit.is_some_and(|l| next_id >= l) {
            stop.store(true, Ordering::Relaxed);
            break;
        }
        let id = next_id;
        next_id += 1;
        RunCounters::bump(&counters.queued, 1);
        let sent = match input {
            Some(input) => inputs.send(InputTask { id, input }).await.is_ok(),
            None => {
                let row = CaptionRow {
                    uri: uri.clone(),
                    ..plan.base_row.clone()
                }
                .failed(RowFailure::Input("unlistable"), list_error, now_us());
                sink.send(SinkMessage::Rows {
                    input_id: id,
                    rows: vec![row],
                })
                .await
                .is_ok()
                    && sink
                        .send(SinkMessage::Done(InputDone {
                            input_id: id,
                            uri,
                            rows: 1,
                            audio_seconds: 0.0,
                            failure: Some("unlistable"),
                            info: None,
                        }))
                        .await
                        .is_ok()
            }
        };
        if !sent {
            break;
        }
    }
    Ok(())
}
