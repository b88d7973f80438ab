//! The order of training: examples shuffled per epoch (seeded), optionally packed into rows,
//! grouped into micro-batches and optimiser steps. The whole plan is a pure function of the
//! config and the example lengths, so a resumed run replays exactly the same steps.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thinkjson_model::{Padding, TokenBatch};

use crate::config::SftConfig;
use crate::data::SftExample;
use crate::error::Result;

/// One row of a micro-batch: the indices of the examples packed in it (one without packing).
pub type RowPlan = Vec<usize>;

/// One optimiser step: its micro-batches, each a list of rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub epoch: u32,
    pub micro_batches: Vec<Vec<RowPlan>>,
}

impl StepPlan {
    pub fn examples(&self) -> usize {
        self.micro_batches.iter().flatten().map(Vec::len).sum()
    }
}

/// Every optimiser step of a run, in order (cut at `max_steps`).
pub fn plan_steps(config: &SftConfig, lengths: &[usize]) -> Vec<StepPlan> {
    let mut steps = Vec::new();
    if lengths.is_empty() {
        return steps;
    }
    let limit = config.max_steps.unwrap_or(u64::MAX) as usize;
    let mut epoch = 0u32;
    // With max_steps set, epochs repeat until the steps are there.
    while steps.len() < limit && (epoch < config.epochs || config.max_steps.is_some()) {
        let order = shuffled(lengths.len(), config.seed, epoch);
        let rows: Vec<RowPlan> = if config.packing {
            pack(&order, lengths, config.max_len)
        } else {
            order.into_iter().map(|i| vec![i]).collect()
        };
        let micro: Vec<Vec<RowPlan>> = rows.chunks(config.batch_size).map(<[RowPlan]>::to_vec).collect();
        for group in micro.chunks(config.grad_accum) {
            if steps.len() >= limit {
                break;
            }
            steps.push(StepPlan {
                epoch,
                micro_batches: group.to_vec(),
            });
        }
        epoch += 1;
    }
    steps
}

fn shuffled(n: usize, seed: u64, epoch: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (u64::from(epoch) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// Greedy packing in the given order: an example joins the current row while it fits.
fn pack(order: &[usize], lengths: &[usize], max_len: usize) -> Vec<RowPlan> {
    let mut rows = Vec::new();
    let mut row: RowPlan = Vec::new();
    let mut used = 0;
    for &i in order {
        // A sequence of n tokens is n − 1 inputs (the last token is only a target).
        let need = lengths[i].saturating_sub(1).max(1);
        if !row.is_empty() && used + need > max_len {
            rows.push(std::mem::take(&mut row));
            used = 0;
        }
        row.push(i);
        used += need;
    }
    if !row.is_empty() {
        rows.push(row);
    }
    rows
}

/// A micro-batch ready for the model: inputs, and where the completion-token targets are.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub tokens: TokenBatch,
    /// Flattened input positions (`row * seq + t`) whose next token is a completion token.
    pub positions: Vec<usize>,
    /// The completion token each of `positions` predicts.
    pub targets: Vec<u32>,
}

impl MicroBatch {
    /// Inputs are each sequence without its last token; targets the completion tokens, each
    /// predicted from the position before it — transformers' shift with prompt labels at -100.
    pub fn build(examples: &[SftExample], rows: &[RowPlan], pad_id: u32, packed: bool) -> Result<Self> {
        let mut inputs: Vec<Vec<Vec<u32>>> = Vec::with_capacity(rows.len());
        let mut wanted: Vec<Vec<(usize, u32)>> = Vec::with_capacity(rows.len());
        for row in rows {
            let mut segs = Vec::with_capacity(row.len());
            let mut row_targets = Vec::new();
            let mut offset = 0;
            for &i in row {
                let e = &examples[i];
                let full: Vec<u32> = e.prompt.iter().chain(&e.completion).copied().collect();
                let input = full[..full.len() - 1].to_vec();
                for t in e.prompt.len().saturating_sub(1)..input.len() {
                    row_targets.push((offset + t, full[t + 1]));
                }
                offset += input.len();
                segs.push(input);
            }
            inputs.push(segs);
            wanted.push(row_targets);
        }
        let tokens = if packed {
            TokenBatch::packed(&inputs, pad_id)?
        } else {
            let flat: Vec<Vec<u32>> = inputs.into_iter().map(|r| r.concat()).collect();
            TokenBatch::new(&flat, Padding::Right, pad_id)?
        };
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (r, row) in wanted.into_iter().enumerate() {
            for (t, id) in row {
                positions.push(r * tokens.seq + t);
                targets.push(id);
            }
        }
        Ok(Self {
            tokens,
            positions,
            targets,
        })
    }

    /// Real input tokens (what tokens/s counts).
    pub fn input_tokens(&self) -> usize {
        self.tokens.mask.iter().filter(|&&m| m).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(prompt: &[u32], completion: &[u32]) -> SftExample {
        SftExample {
            id: String::new(),
            prompt: prompt.to_vec(),
            completion: completion.to_vec(),
        }
    }

    #[test]
    fn targets_are_the_completion_shifted_by_one() {
        let examples = vec![ex(&[1, 2, 3], &[4, 5]), ex(&[6], &[7])];
        let mb = MicroBatch::build(&examples, &[vec![0], vec![1]], 0, false).unwrap();
        assert_eq!(mb.tokens.seq, 4);
        assert_eq!(mb.tokens.ids, vec![1, 2, 3, 4, 6, 0, 0, 0]);
        assert_eq!(mb.positions, vec![2, 3, 4]);
        assert_eq!(mb.targets, vec![4, 5, 7]);
        let packed = MicroBatch::build(&examples, &[vec![0, 1]], 0, true).unwrap();
        assert_eq!(packed.tokens.ids, vec![1, 2, 3, 4, 6]);
        assert_eq!(packed.positions, vec![2, 3, 4]);
        assert_eq!(packed.targets, vec![4, 5, 7]);
    }

    #[test]
    fn plan_is_seeded_and_covers_every_example_each_epoch() {
        let config = SftConfig {
            batch_size: 2,
            grad_accum: 2,
            epochs: 2,
            seed: 3,
            ..SftConfig::default()
        };
        let lengths = vec![5; 9];
        let a = plan_steps(&config, &lengths);
        assert_eq!(a, plan_steps(&config, &lengths));
        // 9 examples → 5 micro-batches → 3 steps per epoch.
        assert_eq!(a.len(), 6);
        let mut first: Vec<usize> = a.iter().filter(|s| s.epoch == 0).flat_map(|s| s.micro_batches.concat().concat()).collect();
        first.sort();
        assert_eq!(first, (0..9).collect::<Vec<_>>());
        assert_ne!(a[0], plan_steps(&SftConfig { seed: 4, ..config.clone() }, &lengths)[0]);
        let capped = plan_steps(&SftConfig { max_steps: Some(10), ..config }, &lengths);
        assert_eq!(capped.len(), 10, "max_steps repeats epochs as needed");
    }

    #[test]
    fn packing_fills_rows_up_to_max_len() {
        let rows = pack(&[0, 1, 2, 3], &[4, 4, 6, 2], 8);
        assert_eq!(rows, vec![vec![0, 1], vec![2, 3]]);
    }
}
