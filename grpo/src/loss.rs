//! The clipped surrogate with a k3 KL penalty, per token, and how `loss_type` weighs tokens.
//!
//! Every loss type is a weighted sum `Σ_t w_t · loss_t` over a micro-batch's active tokens;
//! [`token_weights`] gives the `w_t` that reproduce TRL's normalisations under gradient
//! accumulation, so one code path serves all four.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::Serialize;

use crate::config::LossType;
use crate::error::{GrpoError, Result};

/// Clipping and KL settings of the surrogate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Surrogate {
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
}

/// One micro-batch's active completion tokens, flattened in order (sequence by sequence).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenInputs {
    /// Log-probs under the policy that sampled the tokens; `None` takes the current policy's,
    /// detached (μ = 1: the ratio is exactly 1, as in TRL).
    pub old: Option<Vec<f32>>,
    /// Log-probs under the frozen reference model (needed when β > 0).
    pub reference: Option<Vec<f32>>,
    /// The completion's advantage, repeated over its tokens.
    pub advantages: Vec<f32>,
    /// From [`token_weights`].
    pub weights: Vec<f32>,
}

/// Sums over one micro-batch's tokens, for the step's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TokenStats {
    pub tokens: usize,
    pub kl_sum: f64,
    /// Ratio below `1 − ε_low` with a negative advantage (the clip binds).
    pub clipped_low: usize,
    /// Ratio above `1 + ε_high` with a positive advantage.
    pub clipped_high: usize,
    /// Largest |ratio − 1|.
    pub max_ratio_dev: f64,
}

impl TokenStats {
    pub fn add(&mut self, o: &TokenStats) {
        self.tokens += o.tokens;
        self.kl_sum += o.kl_sum;
        self.clipped_low += o.clipped_low;
        self.clipped_high += o.clipped_high;
        self.max_ratio_dev = self.max_ratio_dev.max(o.max_ratio_dev);
    }

    pub fn kl_mean(&self) -> f64 {
        self.kl_sum / self.tokens.max(1) as f64
    }

    pub fn clip_low_frac(&self) -> f64 {
        self.clipped_low as f64 / self.tokens.max(1) as f64
    }

    pub fn clip_high_frac(&self) -> f64 {
        self.clipped_high as f64 / self.tokens.max(1) as f64
    }
}

/// Per-token weights for one micro-batch. `active[i]` is the number of loss-carrying tokens
/// of its i-th completion (0 for a masked one; it still counts as a completion);
/// `step_active` is the active-token count of the whole generation batch.
///
/// - `grpo`: `1 / (active_i · completions · grad_accum)` — mean per completion, then mean;
/// - `bnpo`: `1 / (Σ active · grad_accum)`;
/// - `dr_grpo`: `1 / (completions · max_completion_len · grad_accum)`;
/// - `dapo`: `1 / step_active` — one normaliser across the micro-batches.
pub fn token_weights(
    loss_type: LossType,
    active: &[usize],
    grad_accum: usize,
    step_active: usize,
    max_completion_len: usize,
) -> Vec<f32> {
    let n = active.len().max(1) as f64;
    let accum = grad_accum.max(1) as f64;
    let total: usize = active.iter().sum();
    let mut out = Vec::with_capacity(total);
    for &len in active {
        let w = match loss_type {
            LossType::Grpo => 1.0 / (len.max(1) as f64 * n * accum),
            LossType::Bnpo => 1.0 / (total.max(1) as f64 * accum),
            LossType::DrGrpo => 1.0 / (n * max_completion_len.max(1) as f64 * accum),
            LossType::Dapo => 1.0 / step_active.max(1) as f64,
        };
        out.extend(std::iter::repeat_n(w as f32, len));
    }
    out
}

/// `Σ_t w_t · (−min(ρ_t A_t, clip(ρ_t, 1−ε_low, 1+ε_high) A_t) + β · KL_t)` with
/// `ρ = exp(logp − old)` and `KL = exp(ref − logp) − (ref − logp) − 1`, as a one-element
/// tensor carrying the gradient of `logps`; and the token statistics.
pub fn policy_loss<B: Backend>(logps: Tensor<B, 1>, inputs: &TokenInputs, surrogate: &Surrogate) -> Result<(Tensor<B, 1>, TokenStats)> {
    let n = logps.dims()[0];
    let check = |what: &str, len: usize| {
        if len == n {
            Ok(())
        } else {
            Err(GrpoError::Data(format!("{what} has {len} entries for {n} tokens")))
        }
    };
    check("advantages", inputs.advantages.len())?;
    check("weights", inputs.weights.len())?;
    if let Some(old) = &inputs.old {
        check("old log-probs", old.len())?;
    }
    if surrogate.beta != 0.0 {
        match &inputs.reference {
            Some(r) => check("reference log-probs", r.len())?,
            None => return Err(GrpoError::Data("beta > 0 needs reference log-probs".into())),
        }
    }
    let device = logps.device();
    let host = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [n]), &device);
    let current: Vec<f32> = logps.clone().into_data().convert::<f32>().to_vec::<f32>().map_err(|e| GrpoError::Data(format!("{e:?}")))?;
    let old_values = inputs.old.clone().unwrap_or_else(|| current.clone());
    let old = host(&old_values);
    let adv = host(&inputs.advantages);
    let ratio = logps.clone().sub(old).exp();
    let clipped = ratio.clone().clamp(1.0 - surrogate.epsilon_low, 1.0 + surrogate.epsilon_high);
    let surrogate_term = ratio.mul(adv.clone()).min_pair(clipped.mul(adv)).neg();
    let mut per_token = surrogate_term;
    if surrogate.beta != 0.0 {
        if let Some(r) = &inputs.reference {
            let diff = host(r).sub(logps);
            let kl = diff.clone().exp().sub(diff).sub_scalar(1.0);
            per_token = per_token.add(kl.mul_scalar(surrogate.beta));
        }
    }
    let loss = per_token.mul(host(&inputs.weights)).sum();

    let mut stats = TokenStats { tokens: n, ..TokenStats::default() };
    for t in 0..n {
        let lp = f64::from(current[t]);
        let ratio = (lp - f64::from(old_values[t])).exp();
        let a = inputs.advantages[t];
        stats.clipped_low += usize::from(ratio < 1.0 - surrogate.epsilon_low && a < 0.0);
        stats.clipped_high += usize::from(ratio > 1.0 + surrogate.epsilon_high && a > 0.0);
        stats.max_ratio_dev = stats.max_ratio_dev.max((ratio - 1.0).abs());
        if let Some(r) = &inputs.reference {
            let d = f64::from(r[t]) - lp;
            stats.kl_sum += d.exp() - d - 1.0;
        }
    }
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_each_loss_type() {
        let active = [2, 0, 1];
        let w = token_weights(LossType::Grpo, &active, 2, 10, 4);
        assert_eq!(w.len(), 3);
        assert!((w[0] - 1.0 / 12.0).abs() < 1e-7 && (w[2] - 1.0 / 6.0).abs() < 1e-7);
        assert!(token_weights(LossType::Bnpo, &active, 1, 10, 4).iter().all(|&x| (x - 1.0 / 3.0).abs() < 1e-7));
        assert!(token_weights(LossType::DrGrpo, &active, 1, 10, 4).iter().all(|&x| (x - 1.0 / 12.0).abs() < 1e-7));
        assert!(token_weights(LossType::Dapo, &active, 2, 10, 4).iter().all(|&x| (x - 0.1).abs() < 1e-7));
    }
}
