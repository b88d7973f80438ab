//! Group-relative advantages: each completion's reward against its prompt's group.

use serde::Serialize;

use crate::config::ScaleRewards;

/// TRL's `1e-4` in `(r − mean) / (std + 1e-4)`: keeps a zero-std group finite.
pub const STD_EPS: f64 = 1e-4;

/// A std this small counts as zero (torch's `isclose(std, 0)` tolerance).
const ZERO_STD: f64 = 1e-8;

/// Advantages of one generation batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Advantages {
    /// One per completion, in the rewards' order.
    pub values: Vec<f64>,
    /// Each group's reward std (unbiased, as `torch.std`).
    pub group_std: Vec<f64>,
    /// Groups whose rewards are all equal: their advantages are 0, so they teach nothing.
    pub zero_std_groups: usize,
}

impl Advantages {
    pub fn frac_zero_std(&self) -> f64 {
        self.zero_std_groups as f64 / self.group_std.len().max(1) as f64
    }
}

/// `rewards` holds consecutive groups of `group_size` completions of one prompt. The group
/// mean is always subtracted; `scale` picks the std that divides (none, the group's, or the
/// whole batch's).
pub fn advantages(rewards: &[f64], group_size: usize, scale: ScaleRewards) -> Advantages {
    let g = group_size.max(1);
    let group_std: Vec<f64> = rewards.chunks(g).map(unbiased_std).collect();
    let batch_std = unbiased_std(rewards);
    let values = rewards
        .chunks(g)
        .zip(&group_std)
        .flat_map(|(group, &std)| {
            let mean = group.iter().sum::<f64>() / group.len() as f64;
            let divisor = match scale {
                ScaleRewards::Group => std + STD_EPS,
                ScaleRewards::Batch => batch_std + STD_EPS,
                ScaleRewards::None => 1.0,
            };
            group.iter().map(move |r| (r - mean) / divisor)
        })
        .collect();
    let zero_std_groups = group_std.iter().filter(|s| s.abs() <= ZERO_STD).count();
    Advantages { values, group_std, zero_std_groups }
}

/// Sample standard deviation (n − 1); 0 for fewer than two values.
fn unbiased_std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_rewards_give_zero_advantages_and_count_as_no_signal() {
        let a = advantages(&[1.0, 1.0, 0.0, 2.0], 2, ScaleRewards::Group);
        assert_eq!(&a.values[..2], &[0.0, 0.0]);
        assert!(a.values[2] < 0.0 && a.values[3] > 0.0);
        assert_eq!(a.zero_std_groups, 1);
        assert_eq!(a.frac_zero_std(), 0.5);
    }
}
