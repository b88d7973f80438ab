//! Learning-rate schedules: linear warmup, then cosine, linear or constant.

use serde::{Deserialize, Serialize};

/// What follows the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Half a cosine from the peak down to `min_lr_ratio × peak` (transformers' `cosine`).
    #[default]
    Cosine,
    /// A straight line down to `min_lr_ratio × peak`.
    Linear,
    /// The peak until the end.
    Constant,
}

/// `lr(step)` for optimiser steps `0..total_steps`: a linear warmup from 0 over
/// `warmup_steps`, then `decay`. The same curve as transformers'
/// `get_cosine_schedule_with_warmup` / `get_linear_schedule_with_warmup` when
/// `min_lr_ratio = 0` — including its first warmup step at lr 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    pub fn new(peak: f64, warmup_steps: u64, total_steps: u64, decay: Decay) -> Self {
        Self {
            peak,
            warmup_steps,
            total_steps,
            decay,
            min_lr_ratio: 0.0,
        }
    }

    /// The learning rate of optimiser step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let shape = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
        };
        let floor = self.min_lr_ratio.clamp(0.0, 1.0);
        self.peak * (floor + (1.0 - floor) * shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule::new(1.0, 4, 14, Decay::Cosine);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(1) - 0.25).abs() < 1e-12);
        assert!((s.lr(3) - 0.75).abs() < 1e-12);
        assert!((s.lr(4) - 1.0).abs() < 1e-12);
        assert!((s.lr(9) - 0.5).abs() < 1e-12, "half way down the cosine");
        assert!(s.lr(13) < 0.03 && s.lr(13) > 0.0);
        assert_eq!(s.lr(100), 0.0);
        let floor = LrSchedule { min_lr_ratio: 0.1, ..s };
        assert!((floor.lr(100) - 0.1).abs() < 1e-12);
        let lin = LrSchedule::new(2.0, 0, 10, Decay::Linear);
        assert!((lin.lr(5) - 1.0).abs() < 1e-12);
        assert_eq!(LrSchedule::new(2.0, 0, 10, Decay::Constant).lr(9), 2.0);
    }
}
