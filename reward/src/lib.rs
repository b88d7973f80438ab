//! # thinkjson-reward
//!
//! Scoring of completions in the `<think>…</think><answer>JSON</answer>` format: the GRPO
//! rewards, and the definitions evaluation reuses. No tensors.
//!
//! Key types: [`Parsed`] (a completion taken apart), [`RewardFn`] (one reward, with its
//! range), [`RewardSet`] (weighted sum, per-function scores kept), [`ValidatorCache`]
//! (compiled schemas; remote `$ref`s are never fetched), [`FeedbackReward`] (reviewers'
//! verdicts and corrections as a reward).
//!
//! ```
//! use thinkjson_reward::{Context, RewardSet, ValidatorCache};
//! let schema = serde_json::json!({"type": "object", "properties": {"lot": {"type": "string"}}, "required": ["lot"]});
//! let reference = serde_json::json!({"lot": "A-17"});
//! let cache = ValidatorCache::new();
//! let ctx = Context { schema: &schema, reference: Some(&reference), sample_id: None, validators: &cache };
//! let scored = RewardSet::default().score("<think>lot A-17</think><answer>{\"lot\": \"A-17\"}</answer>", &ctx);
//! assert!(scored.parts.iter().all(|p| p.score.value >= 0.0));
//! assert_eq!(scored.total, 0.5 + 0.5 + 1.0 + 1.0); // format, json, schema, match; no noise
//! ```

mod cache;
pub mod feedback;
pub mod parse;
mod rewards;
pub mod score;

pub use cache::{adherence, Compiled, ValidatorCache};
pub use feedback::{FeedbackReward, Review, Verdict};
pub use parse::{parse, parse_bytes, JsonForm, Parsed};
pub use rewards::{
    Context, FieldMatchReward, FormatReward, JsonValidReward, LengthReward, NoiseReward, Part, RewardFn, RewardSet,
    RewardWeights, SchemaReward, Score, Scored,
};
