//! # thinkjson-grpo
//!
//! Group Relative Policy Optimization (DeepSeekMath; TRL's `GRPOTrainer` is the reference)
//! for a [`thinkjson_model::CausalLm`], with the `reward` crate's schema and format rewards
//! and, optionally, rollouts constrained to the schema by `decode`'s token masks.
//!
//! Key types: [`GrpoConfig`] (every field defaulted: G = 8, ε = 0.2, β = 0, μ = 1, `dapo`),
//! [`GrpoPrompt`] and [`encode_prompts`], [`GrpoRun`], [`Observer`], [`StepMetrics`] and the
//! [`train`] entry point; [`advantages`], [`token_weights`] and [`policy_loss`] are the math,
//! exposed for checking against TRL.
//!
//! Each step:
//! 1. take `prompts_per_step` prompts (seeded per-epoch shuffles) and sample G completions
//!    each — free, or under the JSON-schema / think-then-JSON constraint;
//! 2. score every completion with the [`thinkjson_reward::RewardSet`] (per-function scores
//!    kept) and turn rewards into group advantages `(r − mean) / (std + 1e-4)`;
//! 3. μ times: score the completion tokens under the policy, form the clipped surrogate (plus
//!    β · k3 KL to the frozen starting model), weigh tokens by `loss_type`, accumulate
//!    gradients over the micro-batches, and take one AdamW step (`thinkjson_model::train`,
//!    shared with SFT);
//! 4. report metrics; write checkpoints (HF layout + optimiser + state) atomically.
//!
//! ```
//! use thinkjson_grpo::{advantages, ScaleRewards};
//! // Two prompts, G = 2: the first group differs, the second teaches nothing.
//! let a = advantages(&[1.0, 0.0, 0.5, 0.5], 2, ScaleRewards::Group);
//! assert!(a.values[0] > 0.0 && a.values[1] < 0.0);
//! assert_eq!(a.zero_std_groups, 1);
//! ```

mod advantage;
mod config;
mod data;
mod error;
mod loss;
mod rollout;
pub mod shard;
mod trainer;

pub use advantage::{advantages, Advantages, STD_EPS};
pub use config::{GrpoConfig, LossType, RolloutConstraint, ScaleRewards};
pub use data::{encode_prompts, GrpoPrompt};
pub use error::{GrpoError, Result};
pub use loss::{policy_loss, token_weights, Surrogate, TokenInputs, TokenStats};
pub use rollout::{constraint_for, rollout_seed, sample_and_score, sample_and_score_at, MicroBatch, Rollout, Scored};
pub use trainer::{prompts_of_step, train, train_data_parallel, Control, GrpoRun, GrpoState, MeanStd, Observer, PlanFingerprint, RunInfo, Sample, StepMetrics, Summary, TimeSplit};
