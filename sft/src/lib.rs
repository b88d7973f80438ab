//! # thinkjson-sft
//!
//! Supervised fine-tuning of a [`thinkjson_model::CausalLm`] on (prompt, completion) pairs —
//! the paper's `<think>…</think><answer>JSON</answer>` targets — with the loss on completion
//! tokens only, on any burn autodiff backend (CPU Flex or CUDA).
//!
//! Key types: [`SftConfig`] (every field defaulted), [`SftExample`] and [`Encoder`] (chat
//! template + tokenizer → ids), [`MicroBatch`] (padding or packing), [`SftRun`],
//! [`Observer`] and the [`train`] entry point. The optimiser, schedule and checkpoints are
//! `thinkjson_model::train`'s, shared with GRPO.
//!
//! The loop:
//! 1. encode rows with [`Encoder::encode_rows`] (long completions are cut, too-long prompts
//!    dropped and reported);
//! 2. [`train`] lays out every optimiser step from the seed ([`plan_steps`]), then for each:
//!    micro-batches → [`completion_loss`] → accumulated gradients → AdamW with warmup +
//!    cosine and global-norm clipping;
//! 3. it evaluates and writes checkpoints (HF layout + optimiser + trainer state,
//!    atomically) as configured; `resume` continues from the newest one exactly.
//!
//! ```
//! use thinkjson_sft::{plan_steps, SftConfig};
//! let config = SftConfig { batch_size: 2, grad_accum: 2, epochs: 1, ..SftConfig::default() };
//! config.validate()?;
//! // 8 examples → 4 micro-batches → 2 optimiser steps.
//! assert_eq!(plan_steps(&config, &[10; 8]).len(), 2);
//! # Ok::<(), thinkjson_sft::SftError>(())
//! ```

mod batching;
mod config;
mod data;
mod error;
mod loss;
mod trainer;

pub use batching::{plan_steps, MicroBatch, RowPlan, StepPlan};
pub use config::SftConfig;
pub use data::{chat_messages, EncodeReport, Encoded, Encoder, SftExample};
pub use error::{Result, SftError};
pub use loss::completion_loss;
pub use thinkjson_model::train::Control;
pub use trainer::{evaluate, mean_loss, train, train_data_parallel, EvalMetrics, Observer, PlanFingerprint, RunInfo, SftRun, StepMetrics, Summary, TrainerState};
