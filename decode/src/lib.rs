//! # thinkjson-decode
//!
//! Batched text generation on any `thinkjson-model` backend, with per-sequence
//! constraints enforced by llguidance token masks: a JSON Schema, a Lark grammar, or the
//! paper's hybrid format — free reasoning in `<think>…</think>`, then JSON valid against
//! a schema inside `<answer>…</answer>`.
//!
//! Key types: [`Generator`] (one per tokenizer), [`Request`] (a prompt and its
//! [`Constraint`]), [`GenerateConfig`] / [`SamplingConfig`], [`Completion`] (tokens, text,
//! log-probs, [`FinishReason`]) and [`GenerationStats`]; for servers, [`Batcher`], a running
//! batch that [`Admission`]s join between forward passes (continuous batching).
//!
//! The loop inside [`Generator::generate`]:
//! 1. compile every constraint: the grammar enforces what it can express, and the keywords it
//!    cannot (`not`, `uniqueItems`, `if`/`then`, non-exclusive `oneOf`, …) are left to
//!    validation of the finished output against the full schema ([`schema_check`] has the
//!    table); an invalid schema or a remote `$ref` is an error naming the JSON pointer;
//! 2. prefill the left-padded prompts into a KV cache;
//! 3. per step and per sequence, in parallel: compute the allowed-token mask (while the
//!    forward pass that produces the logits runs), sample
//!    (greedy, temperature, top-k, top-p, min-p; seeded), advance the matcher, and append
//!    the tokens the grammar forces without sampling them;
//! 4. feed the new tokens of every live sequence in one forward pass; forced tokens get
//!    their log-probs from that same pass;
//! 5. near the end of the budget, measure on a copy of each constrained sequence's matcher
//!    how many tokens its grammar still needs; once that reaches the tokens left, stop
//!    sampling and close the grammar (`GenerateConfig::close_within_budget`), so that
//!    constrained output is complete, not cut at the length limit;
//! 6. stop each sequence on an end-of-sequence token, a stop string, the length limit or
//!    the end of its grammar;
//! 7. validate every finished JSON against the full schema; regenerate an invalid one with a
//!    new seed, up to `GenerateConfig::max_retries` times, or end it as a constraint error
//!    naming the keywords — constrained output is never invalid output.
//!
//! ```no_run
//! use thinkjson_decode::{Constraint, GenerateConfig, Generator, Request};
//! use thinkjson_model::{CausalLm, CpuBackend, ModelConfig, Tokenizer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tokenizer = Tokenizer::from_path("assets/qwen".as_ref())?;
//! let model = CausalLm::<CpuBackend>::random(&ModelConfig::preset("tiny")?, 1, &Default::default())?;
//! let generator = Generator::for_model(&tokenizer, &model)?;
//! let schema = serde_json::json!({"type": "object", "properties": {"lot": {"type": "string"}}, "required": ["lot"]});
//! let prompt = tokenizer.encode("Extract the lot number: lot A-17.")?;
//! let request = Request::new(prompt, Constraint::think_then_json(schema, 64));
//! let (out, _stats) = generator.generate(&model, &[request], &GenerateConfig::default())?;
//! println!("{} ({:?})", out[0].text, out[0].finish);
//! # Ok(()) }
//! ```

mod batcher;
mod closing;
mod constraint;
mod env;
mod error;
mod generate;
mod prompt;
mod sampling;
pub mod schema_check;

pub use batcher::{cache_position_budget, Admission, Batcher, DEFAULT_CACHE_BYTES};
pub use closing::MARGIN as CLOSING_MARGIN;
pub use constraint::{CompiledConstraint, Constraint, JsonStyle};
pub use env::ConstraintEnv;
pub use error::{DecodeError, Result};
pub use generate::{Completion, FinishReason, GenerateConfig, GenerationStats, Generator, Request};
pub use prompt::chat_prompt;
pub use sampling::{logprob_with_lse, sample, token_logprob, SamplingConfig};
pub use schema_check::{check_schema, plan_schema, KeywordAt, Relax, SchemaPlan, GRAMMAR_FORMATS, OPENAPI_FORMATS, VALIDATED_KEYWORDS};
