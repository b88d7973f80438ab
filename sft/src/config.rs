//! [`SftConfig`]: every field has a default; unknown fields are an error when read from a file.

use serde::{Deserialize, Serialize};
use thinkjson_model::train::{AdamWConfig, Decay};

use crate::error::{Result, SftError};

thinkjson_model::trainer_config! {
    /// Hyper-parameters of a supervised fine-tuning run: the shared training fields (learning
    /// rate, schedule, optimiser, seed, checkpoints, accumulation, LoRA) and SFT's own.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct SftConfig {
        /// Passes over the training set. Default 1.
        pub epochs: u32,
        /// Stops after this many optimiser steps (the schedule is laid out over them). Default: none.
        pub max_steps: Option<u64>,
        /// Sequences per micro-batch; with `packing`, packed rows per micro-batch. Default 4.
        pub batch_size: usize,
        /// Longest sequence (prompt + completion); longer completions are cut at the end. Default 2048.
        pub max_len: usize,
        /// Packs several examples into each row of `max_len` tokens (attention never crosses
        /// examples). Default false.
        pub packing: bool,
        /// Optimiser steps between evaluations (0: only at the end). Default 0.
        pub eval_every: u64,
        /// Greedy generations scored for the valid-JSON rate at each evaluation (0: loss only). Default 8.
        pub eval_generations: usize,
        /// Token budget of those generations. Default 512.
        pub eval_max_new_tokens: usize,
    }
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            warmup_ratio: 0.03,
            decay: Decay::Cosine,
            min_lr_ratio: 0.0,
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            max_len: 2048,
            packing: false,
            optimizer: AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            seed: 0,
            save_every: 500,
            keep_last: 3,
            eval_every: 0,
            eval_generations: 8,
            eval_max_new_tokens: 512,
            logprob_chunk: 512,
            max_tokens_per_pass: 0,
            lora: None,
        }
    }
}

impl SftConfig {
    /// Rejects values that cannot train, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.settings().validate().map_err(|(field, reason)| SftError::Config { field, reason })?;
        let bad = |field: &'static str, reason: &str| Err(SftError::Config { field, reason: reason.into() });
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.max_len < 2 {
            return bad("max_len", "must be at least 2");
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs", "must be at least 1 (or set max_steps)");
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be at least 1");
        }
        Ok(())
    }
}
