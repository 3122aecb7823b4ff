//! The one policy for transient faults (a store that refuses connections, a
//! throttled fetch, a model that fails): tries again with doubling waits until a
//! time budget, counted from the first failure, is spent. The fetch stage, the
//! model stage and the dataset writer all wait through a [`Backoff`]. Uses nothing
//! from the crate.

use std::time::{Duration, Instant};

/// How long a transient fault is retried, and how the waits grow.
#[derive(Debug, Clone, Copy)]
pub struct TransientRetry {
    /// Time from the first failure after which the caller gives up.
    pub budget: Duration,
    /// First wait between tries; doubled each time up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl TransientRetry {
    /// Waits from 250 ms doubling to 8 s, for `budget`.
    pub fn with_budget(budget: Duration) -> Self {
        Self {
            budget,
            first_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
        }
    }
}

/// The waits of one fault, from its first failure.
#[derive(Debug, Clone)]
pub struct Backoff {
    retry: TransientRetry,
    started: Instant,
    next: Duration,
}

impl Backoff {
    /// A fault that began now.
    pub fn start(retry: TransientRetry) -> Self {
        Self::since(retry, Instant::now())
    }

    /// A fault that began at `started`.
    pub fn since(retry: TransientRetry, started: Instant) -> Self {
        Self {
            retry,
            started,
            next: retry.first_backoff,
        }
    }

    /// How long to wait before the next try (never past the budget's end), or
    /// `None` once the budget is spent.
    pub fn next_wait(&mut self) -> Option<Duration> {
        let left = self.retry.budget.checked_sub(self.started.elapsed())?;
        if left.is_zero() {
            return None;
        }
        let wait = self.next.min(left);
        self.next = (self.next * 2).min(self.retry.max_backoff);
        Some(wait)
    }

    /// The budget this fault is held to.
    pub fn budget(&self) -> Duration {
        self.retry.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_end_with_the_budget() {
        let retry = TransientRetry {
            budget: Duration::from_secs(3600),
            first_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(1),
        };
        let mut backoff = Backoff::start(retry);
        let waits: Vec<u128> = (0..5)
            .map(|_| backoff.next_wait().unwrap().as_millis())
            .collect();
        assert_eq!(waits, [250, 500, 1000, 1000, 1000]);

        // A fault older than its budget waits no more.
        let old = Instant::now() - Duration::from_secs(10);
        let mut spent = Backoff::since(TransientRetry::with_budget(Duration::from_secs(5)), old);
        assert_eq!(spent.next_wait(), None);
        // Near the end, the wait is what is left.
        let near = Instant::now() - Duration::from_millis(4_900);
        let mut near = Backoff::since(TransientRetry::with_budget(Duration::from_secs(5)), near);
        assert!(near.next_wait().unwrap() <= Duration::from_millis(100));
        assert_eq!(
            Backoff::start(TransientRetry::with_budget(Duration::ZERO)).next_wait(),
            None
        );
    }
}
