//! What the model stage does when a model call fails: tell the device's fault
//! (transient: never an input's final row) from one segment's (permanent: an error
//! row of kind `model`).
//!
//! 1. The same batch once more, after a short pause (a blip).
//! 2. A probe, a synthetic segment the model has no reason to refuse: while it
//!    fails the device is at fault; it is probed again with exponential backoff for
//!    [`TransientRetry::budget`](crate::retry::TransientRetry::budget). When the budget runs out the stage gives up: the
//!    batch's rows are never sent, so their inputs are not committed, the run stops
//!    taking inputs and fails (exit code 1), and the next run takes them again.
//! 3. Once the probe answers, the batch's segments one by one: one that still fails
//!    while the probe answers is at fault itself and becomes an error row.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::retry::{Backoff, TransientRetry};

/// What the model stage met, read by the run at its end.
#[derive(Debug, Default)]
pub struct ModelFaults {
    /// Set once the model failed past its budget: the run must fail.
    gave_up: AtomicBool,
    /// Model calls tried again after a failure.
    pub retries: AtomicU64,
    /// Segments that failed on their own while the model worked (error rows).
    pub segments_at_fault: AtomicU64,
    last: Mutex<Option<String>>,
}

impl ModelFaults {
    pub fn gave_up(&self) -> bool {
        self.gave_up.load(Ordering::Relaxed)
    }

    /// The last error of a failing model.
    pub fn last_error(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Gives the run up: a failure nothing here can retry.
    pub fn give_up(&self, error: String) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
        self.gave_up.store(true, Ordering::Relaxed);
    }
}

/// The rows of a batch the model failed on, or `None` when the stage gave up.
///
/// `run` captions some of the items (their rows, in order); `probe` runs the
/// synthetic segment; `at_fault` is the error row of an item that fails on its own.
pub fn recover<T, R>(
    items: &[T],
    error: String,
    mut run: impl FnMut(&[T]) -> Result<Vec<R>, String>,
    mut probe: impl FnMut() -> Result<(), String>,
    at_fault: impl Fn(&T, &str) -> R,
    retry: &TransientRetry,
    faults: &ModelFaults,
) -> Option<Vec<R>> {
    let started = Instant::now();
    tracing::warn!(segments = items.len(), %error, "model call failed; trying again");
    std::thread::sleep(retry.first_backoff.min(retry.budget));
    faults.retries.fetch_add(1, Ordering::Relaxed);
    if let Ok(rows) = run(items) {
        return Some(rows);
    }
    let mut rows = Vec::with_capacity(items.len());
    let mut next = 0;
    while next < items.len() {
        wait_for_probe(&mut probe, started, retry, faults)?;
        // The model answers: the items one by one, until one fails.
        while next < items.len() {
            let item = &items[next];
            faults.retries.fetch_add(1, Ordering::Relaxed);
            match run(std::slice::from_ref(item)) {
                Ok(mut one) => rows.append(&mut one),
                Err(error) => {
                    // The item's fault only if the model still answers the probe.
                    if probe().is_err() {
                        break;
                    }
                    tracing::warn!(%error, "a segment fails on its own; it becomes an error row");
                    faults.segments_at_fault.fetch_add(1, Ordering::Relaxed);
                    rows.push(at_fault(item, &error));
                }
            }
            next += 1;
        }
    }
    Some(rows)
}

/// Returns once `probe` succeeds; `None` (the stage gives up) when it keeps failing
/// past the budget, counted from `started`.
fn wait_for_probe(
    probe: &mut impl FnMut() -> Result<(), String>,
    started: Instant,
    retry: &TransientRetry,
    faults: &ModelFaults,
) -> Option<()> {
    let mut backoff = Backoff::since(*retry, started);
    loop {
        let error = match probe() {
            Ok(()) => return Some(()),
            Err(error) => error,
        };
        let Some(wait) = backoff.next_wait() else {
            tracing::error!(
                %error,
                budget_s = retry.budget.as_secs_f64(),
                "the model keeps failing; giving up: the inputs in flight are not committed \
                 and the next run takes them again"
            );
            faults.give_up(error);
            return None;
        };
        tracing::warn!(%error, "the model fails on a probe too; waiting for it");
        std::thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::time::Duration;

    fn quick(budget_ms: u64) -> TransientRetry {
        TransientRetry {
            budget: Duration::from_millis(budget_ms),
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
        }
    }

    /// A fake model: fails while `down` says so, and on any batch holding `poison`.
    struct Fake<'a> {
        down: &'a Cell<u32>,
        poison: Option<u32>,
    }

    impl Fake<'_> {
        fn run(&self, items: &[u32]) -> Result<Vec<String>, String> {
            if self.down.get() > 0 {
                self.down.set(self.down.get() - 1);
                return Err("device lost".to_string());
            }
            if self.poison.is_some_and(|p| items.contains(&p)) {
                return Err("shape mismatch".to_string());
            }
            Ok(items.iter().map(|i| format!("caption {i}")).collect())
        }

        fn probe(&self) -> Result<(), String> {
            if self.down.get() > 0 {
                self.down.set(self.down.get() - 1);
                Err("device lost".to_string())
            } else {
                Ok(())
            }
        }
    }

    type Run<'a> = Box<dyn FnMut(&[u32]) -> Result<Vec<String>, String> + 'a>;
    type Probe<'a> = Box<dyn FnMut() -> Result<(), String> + 'a>;

    fn model(down: &Cell<u32>, poison: Option<u32>) -> (Run<'_>, Probe<'_>) {
        let fake = std::rc::Rc::new(Fake { down, poison });
        let other = fake.clone();
        (
            Box::new(move |items: &[u32]| fake.run(items)),
            Box::new(move || other.probe()),
        )
    }

    fn at_fault(item: &u32, error: &str) -> String {
        format!("error {item}: {error}")
    }

    /// `recover` of items 1..=n on a fake model down for `down` calls and failing on
    /// any batch holding `poison`.
    fn recover_fake(
        n: u32,
        down: u32,
        poison: Option<u32>,
        budget_ms: u64,
    ) -> (Option<Vec<String>>, ModelFaults) {
        let down = Cell::new(down);
        let (run, probe) = model(&down, poison);
        let faults = ModelFaults::default();
        let items: Vec<u32> = (1..=n).collect();
        let rows = recover(
            &items,
            "x".into(),
            run,
            probe,
            at_fault,
            &quick(budget_ms),
            &faults,
        );
        (rows, faults)
    }

    #[test]
    fn a_blip_is_retried_and_every_segment_captioned() {
        let (rows, faults) = recover_fake(3, 0, None, 500);
        assert_eq!(rows.unwrap(), ["caption 1", "caption 2", "caption 3"]);
        assert!(!faults.gave_up());
    }

    #[test]
    fn a_segment_at_fault_is_an_error_row_and_the_others_are_captioned() {
        let (rows, faults) = recover_fake(3, 0, Some(2), 500);
        assert_eq!(
            rows.unwrap(),
            ["caption 1", "error 2: shape mismatch", "caption 3"]
        );
        assert_eq!(faults.segments_at_fault.load(Ordering::Relaxed), 1);
        assert!(!faults.gave_up());
    }

    #[test]
    fn a_device_that_comes_back_within_the_budget_loses_nothing() {
        // Down for the retry and a few probes, then up again.
        let (rows, faults) = recover_fake(2, 4, None, 5_000);
        assert_eq!(rows.unwrap(), ["caption 1", "caption 2"]);
        assert!(!faults.gave_up());
    }

    #[test]
    fn a_device_that_stays_down_gives_up_without_error_rows() {
        let started = Instant::now();
        let (rows, faults) = recover_fake(2, u32::MAX, None, 50);
        assert!(rows.is_none());
        assert!(faults.gave_up());
        assert_eq!(faults.last_error().as_deref(), Some("device lost"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_device_lost_while_segments_go_one_by_one_is_waited_for_not_blamed_on_them() {
        // Up for the probe, then down for one call in the middle of the one-by-one
        // pass (the failing call and its probe), then up.
        let down = Cell::new(0);
        let calls = Cell::new(0);
        let run = |items: &[u32]| {
            calls.set(calls.get() + 1);
            match calls.get() {
                1 => Err("blip".to_string()),
                3 => {
                    down.set(1);
                    Err("device lost".to_string())
                }
                _ => Ok(items.iter().map(|i| format!("caption {i}")).collect()),
            }
        };
        let probe = || {
            if down.get() > 0 {
                down.set(down.get() - 1);
                Err("device lost".to_string())
            } else {
                Ok(())
            }
        };
        let faults = ModelFaults::default();
        // The first call is the batch retry (fails), then 1 (ok), 2 (device lost).
        let rows = recover(
            &[1, 2, 3],
            "x".into(),
            run,
            probe,
            at_fault,
            &quick(5_000),
            &faults,
        );
        assert_eq!(rows.unwrap(), ["caption 1", "caption 2", "caption 3"]);
        assert_eq!(faults.segments_at_fault.load(Ordering::Relaxed), 0);
    }
}
