//! Batch stage: groups prepared segments of similar length for the model.
//!
//! Segments wait in a pool of a few batches; a batch is cut from the pool's most
//! similar lengths (least padding) when the pool is full, or at once whenever the
//! model is idle and nothing is queued for it, so the model never waits while
//! segments are waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_channel::{Receiver, Sender};

use super::SegmentJob;

/// How batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub batch_size: usize,
    /// The pool holds up to this many batches' worth of segments.
    pub pool_batches: usize,
}

/// Segments waiting for a batch.
#[derive(Default)]
pub struct Pool {
    segments: Vec<SegmentJob>,
}

impl Pool {
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn push(&mut self, segment: SegmentJob) {
        self.segments.push(segment);
    }

    /// Takes up to `size` segments whose lengths (fbank frames) are closest together.
    pub fn take_batch(&mut self, size: usize) -> Vec<SegmentJob> {
        let k = size.min(self.segments.len());
        if k == 0 {
            return Vec::new();
        }
        self.segments.sort_by_key(|s| s.frames);
        // The window of k consecutive lengths with the smallest spread; on ties the
        // longest window, so long segments don't starve behind a stream of short ones.
        let mut best = 0;
        let mut best_spread = usize::MAX;
        for start in 0..=self.segments.len() - k {
            let spread = self.segments[start + k - 1].frames - self.segments[start].frames;
            if spread <= best_spread {
                best = start;
                best_spread = spread;
            }
        }
        self.segments.drain(best..best + k).collect()
    }
}

/// Reads segments until the input closes, writes batches. `model_idle` is set by
/// the model stage while it waits for a batch.
pub async fn run(
    segments: Receiver<SegmentJob>,
    batches: Sender<Vec<SegmentJob>>,
    policy: BatchPolicy,
    model_idle: Arc<AtomicBool>,
) {
    let size = policy.batch_size.max(1);
    let capacity = size * policy.pool_batches.max(1);
    let mut pool = Pool::default();
    // How often the model's idleness is re-checked while no segment arrives.
    let tick = Duration::from_millis(5);
    loop {
        if pool.len() >= capacity {
            if batches.send(pool.take_batch(size)).await.is_err() {
                return;
            }
            continue;
        }
        let starving = model_idle.load(Ordering::Acquire) && batches.is_empty();
        if starving && !pool.is_empty() {
            if batches.send(pool.take_batch(size)).await.is_err() {
                return;
            }
            continue;
        }
        match tokio::time::timeout(tick, segments.recv()).await {
            Ok(Ok(segment)) => pool.push(segment),
            Ok(Err(_closed)) => break,
            Err(_timeout) => {}
        }
    }
    while !pool.is_empty() {
        if batches.send(pool.take_batch(size)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::CaptionRow;

    fn seg(frames: usize) -> SegmentJob {
        SegmentJob {
            input_id: frames as u64,
            row: CaptionRow::default(),
            fbank: Vec::new(),
            frames,
        }
    }

    #[test]
    fn batches_take_the_closest_lengths() {
        let mut pool = Pool::default();
        for f in [100, 990, 1000, 105, 998, 50] {
            pool.push(seg(f));
        }
        let b: Vec<usize> = pool.take_batch(3).iter().map(|s| s.frames).collect();
        assert_eq!(b, vec![990, 998, 1000]);
        let b: Vec<usize> = pool.take_batch(2).iter().map(|s| s.frames).collect();
        assert_eq!(b, vec![100, 105]);
        assert_eq!(pool.take_batch(5).len(), 1);
        assert!(pool.take_batch(5).is_empty());
    }

    #[tokio::test]
    async fn every_segment_comes_out_once_and_a_busy_model_gets_full_sorted_batches() {
        let (seg_tx, seg_rx) = async_channel::bounded(4);
        let (batch_tx, batch_rx) = async_channel::bounded(1);
        let idle = Arc::new(AtomicBool::new(false));
        let policy = BatchPolicy {
            batch_size: 4,
            pool_batches: 2,
        };
        let stage = tokio::spawn(run(seg_rx, batch_tx, policy, idle.clone()));
        let lengths: Vec<usize> = (0..22).map(|i| (i * 37) % 100 + 1).collect();
        let feeder = {
            let lengths = lengths.clone();
            tokio::spawn(async move {
                for f in lengths {
                    seg_tx.send(seg(f)).await.unwrap();
                }
            })
        };
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while let Ok(b) = batch_rx.recv().await {
            sizes.push(b.len());
            let f: Vec<usize> = b.iter().map(|s| s.frames).collect();
            assert!(f.windows(2).all(|w| w[0] <= w[1]), "unsorted batch {f:?}");
            got.extend(f);
        }
        feeder.await.unwrap();
        stage.await.unwrap();
        let mut expected = lengths;
        expected.sort();
        got.sort();
        assert_eq!(got, expected);
        // The model never reported idle: every batch but the last two is full.
        assert!(
            sizes[..sizes.len() - 2].iter().all(|&s| s == 4),
            "{sizes:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_model_gets_a_partial_batch_at_once() {
        let (seg_tx, seg_rx) = async_channel::bounded(4);
        let (batch_tx, batch_rx) = async_channel::bounded(1);
        let idle = Arc::new(AtomicBool::new(true));
        let policy = BatchPolicy {
            batch_size: 16,
            pool_batches: 4,
        };
        let stage = tokio::spawn(run(seg_rx, batch_tx, policy, idle));
        seg_tx.send(seg(10)).await.unwrap();
        // The input is still open: only the idle model makes the batch go.
        let b = tokio::time::timeout(Duration::from_secs(60), batch_rx.recv())
            .await
            .expect("a waiting segment must reach an idle model")
            .unwrap();
        assert_eq!(b.len(), 1);
        drop(seg_tx);
        stage.await.unwrap();
    }
}
