//! Data-parallel GRPO: each peer samples and scores whole prompt groups (prompt `i` of a
//! generation batch goes to rank `i mod world`, its completions seeded by their position in
//! the whole batch, so they are the completions one peer would draw), then the peers share
//! what the update needs from every completion — reward, per-function scores, flags, length —
//! in one reduction. Every peer then holds the same [`BatchView`] of the whole batch: the
//! advantages (exact for `scale_rewards = "batch"` too), the loss weights of every
//! normalisation (`dapo`'s global token count, `bnpo`'s per micro-batch counts) and the step
//! metrics are those of one peer with the whole batch.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use thinkjson_model::train::Collective;
use thinkjson_model::ModelError;

use crate::advantage::{advantages, Advantages};
use crate::config::GrpoConfig;
use crate::error::{GrpoError, Result};
use crate::rollout::Rollout;

/// What every peer knows about every completion of the generation batch, in batch order.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchView {
    /// Index in the batch of each of this peer's completions.
    pub global_of_local: Vec<usize>,
    pub rewards: Vec<f64>,
    /// Per reward function, one score per completion.
    pub parts: BTreeMap<String, Vec<f64>>,
    pub valid_json: Vec<bool>,
    pub schema_valid: Vec<bool>,
    pub truncated: Vec<bool>,
    /// Completion lengths in tokens.
    pub lens: Vec<usize>,
    /// Advantages of the whole batch.
    pub advantages: Advantages,
}

impl BatchView {
    /// The view of a peer that holds the whole batch.
    pub fn of_rollout(rollout: &Rollout) -> Self {
        let c = &rollout.completions;
        let mut parts: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for s in c {
            for (name, v) in &s.parts {
                parts.entry(name.clone()).or_default().push(*v);
            }
        }
        Self {
            global_of_local: (0..c.len()).collect(),
            rewards: c.iter().map(|s| s.reward).collect(),
            parts,
            valid_json: c.iter().map(|s| s.valid_json).collect(),
            schema_valid: c.iter().map(|s| s.schema_valid).collect(),
            truncated: c.iter().map(|s| s.truncated).collect(),
            lens: c.iter().map(|s| s.completion.tokens.len()).collect(),
            advantages: rollout.advantages.clone(),
        }
    }

    /// Loss-carrying tokens of each completion (0 for a truncated one when those are masked).
    pub fn active(&self, mask_truncated: bool) -> Vec<usize> {
        self.lens.iter().zip(&self.truncated).map(|(&n, &t)| if mask_truncated && t { 0 } else { n }).collect()
    }

    /// Index among this peer's completions of each completion of the batch (None: another peer's).
    pub fn local_of_global(&self) -> Vec<Option<usize>> {
        let mut out = vec![None; self.lens.len()];
        for (j, &c) in self.global_of_local.iter().enumerate() {
            if let Some(slot) = out.get_mut(c) {
                *slot = Some(j);
            }
        }
        out
    }
}

/// The prompt positions of a generation batch of `batch_prompts` that `rank` samples.
pub fn positions_of_rank(batch_prompts: usize, rank: usize, world: usize) -> Vec<usize> {
    (0..batch_prompts).filter(|i| i % world.max(1) == rank).collect()
}

/// Shares this peer's sampled completions (or its failure to sample them) with the others
/// and returns its rollout, with the batch's advantages, and the view of the whole batch.
/// `positions` are the batch positions of this peer's prompts; `names` the reward functions.
/// Every peer takes part even after a local failure, so a failed peer stops them all.
pub fn share<B: Backend>(
    local: Result<Rollout>,
    positions: &[usize],
    batch_prompts: usize,
    names: &[String],
    config: &GrpoConfig,
    device: &B::Device,
    collective: &mut dyn Collective<B>,
) -> Result<(Rollout, BatchView)> {
    let world = collective.world_size();
    if world == 1 {
        return local.map(|r| {
            let view = BatchView::of_rollout(&r);
            (r, view)
        });
    }
    let g = config.num_generations.max(1);
    let n = batch_prompts * g;
    // Per completion: reward (two f32: high part and rounding rest), one per reward function,
    // valid JSON, schema-valid, truncated, length.
    let width = 2 + names.len() + 4;
    let mut buffer = vec![0.0f32; n * width + world];
    let mut global_of_local = Vec::new();
    if let Ok(rollout) = &local {
        for (j, s) in rollout.completions.iter().enumerate() {
            let Some(&position) = positions.get(s.prompt_index) else {
                return Err(GrpoError::Data(format!("completion {j} belongs to no prompt of this peer")));
            };
            let c = position * g + j % g;
            global_of_local.push(c);
            let row = &mut buffer[c * width..(c + 1) * width];
            let hi = s.reward as f32;
            row[0] = hi;
            row[1] = (s.reward - f64::from(hi)) as f32;
            for (k, name) in names.iter().enumerate() {
                row[2 + k] = s.parts.get(name).copied().unwrap_or(0.0) as f32;
            }
            let base = 2 + names.len();
            row[base] = f32::from(u8::from(s.valid_json));
            row[base + 1] = f32::from(u8::from(s.schema_valid));
            row[base + 2] = f32::from(u8::from(s.truncated));
            row[base + 3] = s.completion.tokens.len() as f32;
        }
    } else {
        buffer[n * width + collective.rank()] = 1.0;
    }
    let len = buffer.len();
    let summed = collective
        .all_reduce_sum(Tensor::<B, 1>::from_data(TensorData::new(buffer, [len]), device))
        .map_err(GrpoError::Model)?
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| GrpoError::Model(ModelError::Input(format!("reading the shared rollouts: {e:?}"))))?;
    let failed: Vec<usize> = (0..world).filter(|&r| summed[n * width + r] != 0.0).collect();
    let mut rollout = local?;
    if !failed.is_empty() {
        return Err(GrpoError::Model(ModelError::Device(format!("peer(s) {failed:?} failed to sample this step; stopping every peer"))));
    }
    let rows: Vec<&[f32]> = summed[..n * width].chunks(width).collect();
    let base = 2 + names.len();
    let rewards: Vec<f64> = rows.iter().map(|r| f64::from(r[0]) + f64::from(r[1])).collect();
    let batch_advantages = advantages(&rewards, g, config.scale_rewards);
    for (j, &c) in global_of_local.iter().enumerate() {
        if let Some(slot) = rollout.advantages.values.get_mut(j) {
            *slot = batch_advantages.values[c];
        }
    }
    let view = BatchView {
        global_of_local,
        parts: names.iter().enumerate().map(|(k, name)| (name.clone(), rows.iter().map(|r| f64::from(r[2 + k])).collect())).collect(),
        valid_json: rows.iter().map(|r| r[base] != 0.0).collect(),
        schema_valid: rows.iter().map(|r| r[base + 1] != 0.0).collect(),
        truncated: rows.iter().map(|r| r[base + 2] != 0.0).collect(),
        lens: rows.iter().map(|r| r[base + 3].round() as usize).collect(),
        rewards,
        advantages: batch_advantages,
    };
    Ok((rollout, view))
}
