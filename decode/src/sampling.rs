//! Turning one row of logits into a token: temperature, top-k, top-p, min-p, an optional
//! allowed-token mask, and a seeded RNG per sequence.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Sampling settings; `temperature = 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = none).
    pub min_p: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 0 }
    }
}

impl SamplingConfig {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }
}

/// `log_softmax(logits / t)[token]` over the whole vocabulary (no mask, no truncation): the
/// policy log-probability GRPO's ratio uses, as TRL computes it (`t = 1` for greedy).
pub fn token_logprob(logits: &[f32], token: usize, temperature: f32) -> f32 {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| (((l - max) / t) as f64).exp()).sum();
    logprob_with_lse(logits, token, temperature, max / t + sum.ln() as f32)
}

/// [`token_logprob`] given `lse = logsumexp(logits / t)` computed elsewhere (the generator
/// takes it from the device with the logits).
pub fn logprob_with_lse(logits: &[f32], token: usize, temperature: f32, lse: f32) -> f32 {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    logits.get(token).map_or(f32::NEG_INFINITY, |&x| x / t - lse)
}

/// `logsumexp(logits / temperature)` (temperature ≤ 0 counts as 1), reusing `lse` when it
/// was computed at that temperature (`computed_at`).
pub(crate) fn lse_at(logits: &[f32], temperature: f32, computed_at: f32, lse: f32) -> f32 {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    if t == computed_at {
        return lse;
    }
    let peak = logits.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x / t));
    let sum: f32 = logits.iter().map(|&x| (x / t - peak).exp()).sum();
    sum.ln() + peak
}

/// Picks a token from `logits`, restricted to `allowed` when given (ids as `u32`).
/// Returns `None` when no token is allowed.
pub fn sample(logits: &[f32], allowed: Option<&[u32]>, config: &SamplingConfig, rng: &mut ChaCha8Rng) -> Option<u32> {
    if config.temperature <= 0.0 {
        return argmax(logits, allowed);
    }
    let mut cands: Vec<(u32, f32)> = match allowed {
        Some(ids) => ids
            .iter()
            .filter_map(|&i| logits.get(i as usize).map(|&l| (i, l)))
            .filter(|(_, l)| l.is_finite())
            .collect(),
        None => logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect(),
    };
    if cands.is_empty() {
        return None;
    }
    let t = config.temperature;
    if config.top_k > 0 && config.top_k < cands.len() {
        cands.select_nth_unstable_by(config.top_k - 1, |a, b| b.1.total_cmp(&a.1));
        cands.truncate(config.top_k);
    }
    let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = cands.iter().map(|&(i, l)| (i, (((l - max) / t) as f64).exp())).collect();
    if config.min_p > 0.0 {
        // The largest weight is exp(0) = 1, so the threshold is min_p itself.
        let floor = config.min_p as f64;
        probs.retain(|p| p.1 >= floor);
    }
    if config.top_p < 1.0 {
        probs = nucleus(probs, config.top_p as f64);
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * total;
    for &(i, w) in &probs {
        if u < w {
            return Some(i);
        }
        u -= w;
    }
    probs.last().map(|p| p.0)
}

/// The most likely finite token (ties go to the lowest id, like torch's argmax).
fn argmax(logits: &[f32], allowed: Option<&[u32]>) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    let mut visit = |i: u32, l: f32| {
        if l.is_finite() && best.is_none_or(|(bi, bl)| l > bl || (l == bl && i < bi)) {
            best = Some((i, l));
        }
    };
    match allowed {
        Some(ids) => ids.iter().for_each(|&i| {
            if let Some(&l) = logits.get(i as usize) {
                visit(i, l)
            }
        }),
        None => logits.iter().enumerate().for_each(|(i, &l)| visit(i as u32, l)),
    }
    best.map(|b| b.0)
}

/// The smallest prefix (by descending weight) holding `p` of the mass. Sorting a full
/// vocabulary per step is slow, so try the top 256 first and sort everything only when
/// they do not reach `p`.
fn nucleus(mut probs: Vec<(u32, f64)>, p: f64) -> Vec<(u32, f64)> {
    let total: f64 = probs.iter().map(|x| x.1).sum();
    let target = p * total;
    let by_weight = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    const HEAD: usize = 256;
    if probs.len() > HEAD {
        probs.select_nth_unstable_by(HEAD - 1, by_weight);
        let head_mass: f64 = probs[..HEAD].iter().map(|x| x.1).sum();
        if head_mass >= target {
            probs.truncate(HEAD);
        }
    }
    probs.sort_unstable_by(by_weight);
    let mut acc = 0.0;
    let mut keep = probs.len();
    for (n, x) in probs.iter().enumerate() {
        acc += x.1;
        if acc >= target {
            keep = n + 1;
            break;
        }
    }
    probs.truncate(keep.max(1));
    probs
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(3)
    }

    #[test]
    fn greedy_is_argmax_within_mask() {
        let logits = [0.1, 3.0, 2.0, -1.0];
        let g = SamplingConfig::greedy();
        assert_eq!(sample(&logits, None, &g, &mut rng()), Some(1));
        assert_eq!(sample(&logits, Some(&[0, 2, 3]), &g, &mut rng()), Some(2));
        assert_eq!(sample(&logits, Some(&[]), &g, &mut rng()), None);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 0.1, 2.5, 2.4];
        for c in [
            SamplingConfig { top_k: 1, ..Default::default() },
            SamplingConfig { top_p: 1e-6, ..Default::default() },
            SamplingConfig { min_p: 0.99, ..Default::default() },
        ] {
            let mut r = rng();
            for _ in 0..50 {
                assert_eq!(sample(&logits, None, &c, &mut r), Some(2), "{c:?}");
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]
        let logits = [0.0f32, 3f32.ln()];
        let c = SamplingConfig::default();
        let mut r = rng();
        let ones = (0..20_000).filter(|_| sample(&logits, None, &c, &mut r) == Some(1)).count();
        let share = ones as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.015, "share {share}");
    }

    #[test]
    fn top_p_drops_the_tail() {
        // weights 0.5, 0.3, 0.2: top_p 0.7 keeps the first two only.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let c = SamplingConfig { top_p: 0.7, ..Default::default() };
        let mut r = rng();
        assert!((0..2000).all(|_| sample(&logits, None, &c, &mut r) != Some(2)));
    }

    #[test]
    fn logprob_matches_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((token_logprob(&logits, 2, 1.0) - (3.0 - z.ln())).abs() < 1e-6);
        let z2: f32 = logits.iter().map(|l| (l / 0.5).exp()).sum();
        assert!((token_logprob(&logits, 0, 0.5) - (2.0 - z2.ln())).abs() < 1e-5);
    }
}
