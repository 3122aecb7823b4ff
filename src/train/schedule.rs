//! Learning-rate schedule of the recipe: linear warm-up over the first fraction of
//! the steps (10%), then cosine decay to zero: the formula of Hugging Face's
//! `get_cosine_schedule_with_warmup` (half a cosine cycle), so runs compare with the
//! reference trainer step for step.

use serde::{Deserialize, Serialize};

/// Warm-up then cosine decay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    /// Learning rate at the end of the warm-up (3e-4 in the recipe).
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl CosineSchedule {
    /// The recipe's schedule for `total_steps` optimiser steps: warm-up over
    /// `warmup_fraction` of them (rounded up).
    pub fn new(peak_lr: f64, warmup_fraction: f64, total_steps: u64) -> Self {
        let warmup_steps = (warmup_fraction * total_steps as f64).ceil() as u64;
        Self {
            peak_lr,
            warmup_steps: warmup_steps.min(total_steps),
            total_steps,
        }
    }

    /// Learning rate for optimiser step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        // Clamped: past the last step the rate stays at zero (HF's formula would
        // start rising again; a run never gets there).
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak_lr * cosine.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_cosine_to_zero() {
        let s = CosineSchedule::new(3e-4, 0.1, 1000);
        assert_eq!(s.warmup_steps, 100);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(50) - 1.5e-4).abs() < 1e-15);
        assert!((s.lr(100) - 3e-4).abs() < 1e-15);
        // Half-way through the decay: half the peak.
        assert!((s.lr(550) - 1.5e-4).abs() < 1e-12);
        assert!(s.lr(1000).abs() < 1e-15);
        // Monotone after the peak; never negative past the end.
        let lrs: Vec<f64> = (100..=1100).map(|i| s.lr(i)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0] + 1e-18));
        assert!(lrs.iter().all(|&l| l >= 0.0));
    }

    #[test]
    fn degenerate_lengths_do_not_divide_by_zero() {
        let s = CosineSchedule::new(1e-3, 0.1, 0);
        assert!(s.lr(0).is_finite());
        let s = CosineSchedule::new(1e-3, 0.0, 10);
        assert_eq!(s.lr(0), 1e-3);
    }
}
