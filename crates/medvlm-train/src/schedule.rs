//! Learning-rate schedules.
//!
//! [`WarmupCosine`] is the schedule of CLIP / open_clip (`cosine_lr` in open_clip's
//! `scheduler.py`, after Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm
//! Restarts", ICLR 2017, without restarts): linear warm-up
//! `lr(s) = base_lr * (s + 1) / warmup_steps` for `s < warmup_steps`, then half a cosine from
//! `base_lr` down to `min_lr` over the remaining `total_steps - warmup_steps` steps, and `min_lr`
//! afterwards. `s` is the 0-based index of the optimiser update about to be made, so the
//! schedule position is just the number of updates done (stored in checkpoints).

use serde::{Deserialize, Serialize};

/// Linear warm-up followed by cosine decay; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WarmupCosine {
    /// Peak learning rate, reached at the end of warm-up.
    pub base_lr: f64,
    /// Number of warm-up updates (0 disables warm-up).
    pub warmup_steps: u64,
    /// Total number of updates of the run.
    pub total_steps: u64,
    /// Final learning rate (default 0, as in open_clip).
    pub min_lr: f64,
}

impl WarmupCosine {
    /// Learning rate for update index `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        let e = step - self.warmup_steps;
        if decay_steps == 0 || e >= decay_steps {
            return self.min_lr;
        }
        let progress = e as f64 / decay_steps as f64;
        self.min_lr
            + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (self.base_lr - self.min_lr)
    }
}
