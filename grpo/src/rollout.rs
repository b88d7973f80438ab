//! One generation batch: sample G completions per prompt, score them, and lay them out as
//! per-token training inputs.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::backend::Backend;
use serde::Serialize;
use thinkjson_decode::{Completion, Constraint, FinishReason, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_model::{CausalLm, Padding, TokenBatch};
use thinkjson_reward::{adherence, Context, RewardSet, ValidatorCache};

use crate::advantage::{advantages, Advantages};
use crate::config::{GrpoConfig, RolloutConstraint};
use crate::data::GrpoPrompt;
use crate::error::{GrpoError, Result};

/// The constraint a prompt's rollouts are sampled under.
pub fn constraint_for(config: &GrpoConfig, prompt: &GrpoPrompt) -> Constraint {
    match config.constraint {
        RolloutConstraint::None => Constraint::None,
        RolloutConstraint::JsonSchema => Constraint::json_schema(prompt.schema.clone()),
        RolloutConstraint::ThinkThenJson => Constraint::think_then_json(prompt.schema.clone(), config.max_think_tokens),
    }
}

/// Seed of completion `index` of generation batch `step`: a pure function of the run's seed,
/// so a resumed run samples exactly what the uninterrupted one did.
pub fn rollout_seed(seed: u64, step: u64, index: usize) -> u64 {
    let mut x = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    // splitmix64 finaliser: nearby inputs give unrelated seeds.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A scored completion.
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub prompt_index: usize,
    pub completion: Completion,
    pub reward: f64,
    /// Per reward function, unweighted.
    pub parts: BTreeMap<String, f64>,
    pub valid_json: bool,
    pub schema_valid: bool,
    pub truncated: bool,
}

/// A sampled and scored generation batch.
pub struct Rollout {
    /// `prompts.len() × G` completions, grouped by prompt.
    pub completions: Vec<Scored>,
    pub advantages: Advantages,
    pub generation_secs: f64,
    pub reward_secs: f64,
}

/// Samples `G` completions for each of `prompts` with `model` and scores them.
pub fn sample_and_score<B: Backend>(
    model: &CausalLm<B>,
    generator: &Generator,
    prompts: &[&GrpoPrompt],
    rewards: &RewardSet,
    validators: &ValidatorCache,
    config: &GrpoConfig,
    step: u64,
) -> Result<Rollout> {
    let positions: Vec<usize> = (0..prompts.len()).collect();
    sample_and_score_at(model, generator, prompts, &positions, rewards, validators, config, step)
}

/// [`sample_and_score`] for prompts at `positions` of the generation batch (a data-parallel
/// peer's share): each completion is seeded by its position in the whole batch.
#[allow(clippy::too_many_arguments)]
pub fn sample_and_score_at<B: Backend>(
    model: &CausalLm<B>,
    generator: &Generator,
    prompts: &[&GrpoPrompt],
    positions: &[usize],
    rewards: &RewardSet,
    validators: &ValidatorCache,
    config: &GrpoConfig,
    step: u64,
) -> Result<Rollout> {
    if positions.len() != prompts.len() {
        return Err(GrpoError::Data(format!("{} prompts but {} batch positions", prompts.len(), positions.len())));
    }
    let g = config.num_generations;
    let started = Instant::now();
    let requests: Vec<Request> = prompts
        .iter()
        .zip(positions)
        .flat_map(|(p, &i)| {
            let constraint = constraint_for(config, p);
            (0..g).map(move |k| Request {
                prompt: p.prompt.clone(),
                constraint: constraint.clone(),
                seed: Some(rollout_seed(config.seed, step, i * g + k)),
            })
        })
        .collect();
    let gen_config = GenerateConfig {
        max_new_tokens: config.max_completion_len,
        sampling: SamplingConfig {
            temperature: config.temperature,
            top_k: config.top_k,
            top_p: config.top_p,
            min_p: 0.0,
            seed: config.seed,
        },
        // Constrained rollouts close their JSON inside the budget, so none is scored truncated.
        ..GenerateConfig::default()
    };
    let (completions, _) = generator.generate(model, &requests, &gen_config)?;
    let generation_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let scored: Vec<Scored> = completions
        .into_iter()
        .enumerate()
        .map(|(j, completion)| {
            let prompt = prompts[j / g];
            let ctx = Context {
                schema: &prompt.schema,
                reference: prompt.reference.as_ref(),
                sample_id: Some(&prompt.id),
                validators,
            };
            let result = rewards.score(&completion.text, &ctx);
            let parsed = thinkjson_reward::parse(&completion.text);
            let schema_valid = parsed
                .json
                .as_ref()
                .is_some_and(|json| adherence(&validators.get(&prompt.schema), json).1.is_none());
            Scored {
                prompt_index: j / g,
                reward: result.total,
                parts: result.parts.iter().map(|p| (p.name.clone(), p.score.value)).collect(),
                valid_json: parsed.json.is_some(),
                schema_valid,
                truncated: completion.finish == FinishReason::Length,
                completion,
            }
        })
        .collect();
    let totals: Vec<f64> = scored.iter().map(|s| s.reward).collect();
    let advantages = advantages(&totals, g, config.scale_rewards);
    Ok(Rollout { completions: scored, advantages, generation_secs, reward_secs: started.elapsed().as_secs_f64() })
}

/// The training inputs of a group of completions: prompt + completion rows, right-padded,
/// and the flattened positions and targets of their loss-carrying tokens.
pub struct MicroBatch {
    pub tokens: TokenBatch,
    pub positions: Vec<usize>,
    pub targets: Vec<u32>,
    /// Loss-carrying tokens per completion (0 for a masked one).
    pub active: Vec<usize>,
    /// Index into the rollout's completions of each row.
    pub rows: Vec<usize>,
}

impl MicroBatch {
    /// Builds rows `rows` of `rollout`; a truncated completion carries no loss when `mask_truncated`.
    pub fn build(rollout: &Rollout, prompts: &[&GrpoPrompt], rows: &[usize], mask_truncated: bool, pad_id: u32) -> Result<Self> {
        let mut seqs = Vec::with_capacity(rows.len());
        let mut active = Vec::with_capacity(rows.len());
        for &j in rows {
            let s = &rollout.completions[j];
            let mut seq = prompts[s.prompt_index].prompt.clone();
            seq.extend_from_slice(&s.completion.tokens);
            seqs.push(seq);
            let carries = !(mask_truncated && s.truncated);
            active.push(if carries { s.completion.tokens.len() } else { 0 });
        }
        let tokens = TokenBatch::new(&seqs, Padding::Right, pad_id)?;
        let width = tokens.seq;
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (r, &j) in rows.iter().enumerate() {
            let s = &rollout.completions[j];
            let prompt_len = prompts[s.prompt_index].prompt.len();
            for (k, &t) in s.completion.tokens.iter().take(active[r]).enumerate() {
                positions.push(r * width + prompt_len + k - 1);
                targets.push(t);
            }
        }
        Ok(Self { tokens, positions, targets, active, rows: rows.to_vec() })
    }

    /// The decoder's log-probs of the active tokens: the "old" policy's, from the rollout.
    pub fn rollout_logprobs(&self, rollout: &Rollout) -> Vec<f32> {
        self.rows
            .iter()
            .zip(&self.active)
            .flat_map(|(&j, &n)| rollout.completions[j].completion.logprobs[..n].iter().copied())
            .collect()
    }

    /// Each active token's completion advantage.
    pub fn token_advantages(&self, rollout: &Rollout) -> Vec<f32> {
        self.rows
            .iter()
            .zip(&self.active)
            .flat_map(|(&j, &n)| std::iter::repeat_n(rollout.advantages.values[j] as f32, n))
            .collect()
    }
}
