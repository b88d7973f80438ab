//! [`GrpoConfig`]: every field has a default (TRL's where TRL has one); unknown fields are an
//! error when read from a file.

use serde::{Deserialize, Serialize};
use thinkjson_model::train::{AdamWConfig, Decay};
use thinkjson_reward::RewardWeights;

use crate::error::{GrpoError, Result};

/// How the per-token losses of a micro-batch are summed into one number (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each completion's tokens, then over completions (DeepSeekMath): short
    /// completions weigh more per token.
    Grpo,
    /// Sum over the micro-batch's active tokens, divided by their count.
    Bnpo,
    /// Sum divided by completions × `max_completion_len` (Dr. GRPO): no length bias.
    DrGrpo,
    /// Sum divided by the active tokens of the whole generation batch (DAPO; TRL's default).
    Dapo,
}

/// Which standard deviation divides the advantages (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Each group's own std (DeepSeekMath).
    Group,
    /// One std over the whole generation batch (the mean stays per group).
    Batch,
    /// No scaling: advantages are `r − mean_group` (Dr. GRPO).
    None,
}

/// What constrains sampling during rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutConstraint {
    /// Free sampling (TRL's behaviour): the model must learn the format from the reward.
    None,
    /// Every completion is a JSON instance of the prompt's schema (token masks from llguidance).
    JsonSchema,
    /// `<think>` free text (at most `max_think_tokens`) `</think>`, then an `<answer>` that is
    /// a JSON instance of the schema.
    ThinkThenJson,
}

thinkjson_model::trainer_config! {
    /// Hyper-parameters of a GRPO run: the shared training fields and GRPO's own. One *step*
    /// is one generation batch: `prompts_per_step` prompts × `num_generations` completions,
    /// trained on for `num_iterations` optimiser updates.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct GrpoConfig {
        /// G: completions sampled per prompt. Default 8 (TRL's).
        pub num_generations: usize,
        /// Prompts per generation batch. Default 4.
        pub prompts_per_step: usize,
        /// Generation batches to train on (the schedule is laid out over them × `num_iterations`).
        /// Default 100.
        pub max_steps: u64,
        /// Longest completion in tokens. Default 512.
        pub max_completion_len: usize,
        /// Prompts longer than this many tokens are left out (and reported) when encoding.
        /// Default 1024.
        pub max_prompt_len: usize,
        /// Sampling temperature of the rollouts (and of the policy's log-probs). Default 1.0.
        pub temperature: f32,
        /// Nucleus sampling of the rollouts. Default 1.0 (off).
        pub top_p: f32,
        /// 0 keeps every token. Default 0.
        pub top_k: usize,
        /// Default `none` (free rollouts, as in TRL and the paper).
        pub constraint: RolloutConstraint,
        /// Think budget of `think_then_json` rollouts. Default 256.
        pub max_think_tokens: usize,
        /// ε_low: the ratio is clipped below at `1 − epsilon_low`. Default 0.2.
        pub epsilon_low: f64,
        /// ε_high: clipped above at `1 + epsilon_high` (DAPO's "clip higher" raises it). Default 0.2.
        pub epsilon_high: f64,
        /// Weight of the k3 KL to the frozen reference model; 0 keeps no reference model.
        /// With LoRA the reference is the base with the adapters off. Default 0 (TRL's).
        pub beta: f64,
        /// Default `dapo` (TRL's).
        pub loss_type: LossType,
        /// Default `group`.
        pub scale_rewards: ScaleRewards,
        /// μ: optimiser updates per generation batch, each against the rollout's log-probs. Default 1.
        pub num_iterations: usize,
        /// Completions cut by `max_completion_len` carry no loss (DAPO's overlong filtering). Default false.
        pub mask_truncated_completions: bool,
        /// Activation checkpointing of the training passes (TRL's `gradient_checkpointing`):
        /// the forward keeps only each decoder layer's input, and the backward reruns one
        /// layer at a time — a pass holds one layer's activations instead of all of them, for
        /// one more forward pass of compute. Same log-probs and gradients. Default false.
        pub gradient_checkpointing: bool,
        /// Weights of the reward functions (`[rewards]`); see `thinkjson_reward::RewardWeights`.
        pub rewards: RewardWeights,
        /// Steps between logged samples of completions (0: never). Default 10.
        pub sample_every: u64,
        /// Completions in each logged sample. Default 2.
        pub samples_logged: usize,
    }
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            num_generations: 8,
            prompts_per_step: 4,
            max_steps: 100,
            max_completion_len: 512,
            max_prompt_len: 1024,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            constraint: RolloutConstraint::None,
            max_think_tokens: 256,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            mask_truncated_completions: false,
            gradient_checkpointing: false,
            grad_accum: 1,
            lr: 1e-6,
            warmup_ratio: 0.0,
            decay: Decay::Linear,
            min_lr_ratio: 0.0,
            optimizer: AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() },
            rewards: RewardWeights::default(),
            seed: 0,
            save_every: 50,
            keep_last: 3,
            sample_every: 10,
            samples_logged: 2,
            logprob_chunk: 512,
            max_tokens_per_pass: 0,
            lora: None,
        }
    }
}

impl GrpoConfig {
    /// Completions per generation batch.
    pub fn completions_per_step(&self) -> usize {
        self.prompts_per_step * self.num_generations
    }

    /// Optimiser updates over the whole run.
    pub fn total_updates(&self) -> u64 {
        self.max_steps * self.num_iterations as u64
    }

    /// Rejects values that cannot train, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.settings().validate().map_err(|(field, reason)| GrpoError::Config { field, reason })?;
        let bad = |field: &'static str, reason: &str| Err(GrpoError::Config { field, reason: reason.into() });
        if self.num_generations < 2 {
            return bad("num_generations", "must be at least 2 (advantages compare completions of one prompt)");
        }
        if self.prompts_per_step == 0 {
            return bad("prompts_per_step", "must be at least 1");
        }
        if self.max_steps == 0 {
            return bad("max_steps", "must be at least 1");
        }
        if self.max_prompt_len == 0 {
            return bad("max_prompt_len", "must be at least 1");
        }
        if self.max_completion_len == 0 {
            return bad("max_completion_len", "must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad("temperature", "must be a positive number (GRPO needs sampled, differing completions)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(self.epsilon_low.is_finite() && (0.0..1.0).contains(&self.epsilon_low)) {
            return bad("epsilon_low", "must be in [0, 1)");
        }
        if !(self.epsilon_high.is_finite() && self.epsilon_high >= 0.0) {
            return bad("epsilon_high", "must be a non-negative number");
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad("beta", "must be a non-negative number");
        }
        if self.num_iterations == 0 {
            return bad("num_iterations", "must be at least 1");
        }
        if self.grad_accum == 0 || self.grad_accum > self.completions_per_step() {
            return bad("grad_accum", "must be between 1 and prompts_per_step × num_generations");
        }
        if self.gradient_checkpointing && self.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
            // The recomputed layer would draw another dropout mask than the forward did.
            return bad("gradient_checkpointing", "cannot be used with LoRA dropout > 0 (set `lora.dropout = 0`)");
        }
        let w = &self.rewards;
        let weights = [w.format, w.json_valid, w.schema, w.field_match, w.noise, w.length, w.feedback];
        if weights.iter().any(|x| !x.is_finite()) {
            return bad("rewards", "every weight must be a finite number");
        }
        Ok(())
    }
}
