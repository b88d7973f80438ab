//! [`SftConfig`]: every field has a default; unknown fields are an error when read from a file.

use serde::{Deserialize, Serialize};
use thinkjson_model::train::{AdamWConfig, Decay};

use crate::error::{Result, SftError};

/// Hyper-parameters of a supervised fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Peak learning rate (transformers' default for `Trainer` is 5e-5; 1e-5 suits 1.5B models).
    pub lr: f64,
    /// Share of the optimiser steps spent warming up linearly from 0.
    pub warmup_ratio: f64,
    pub decay: Decay,
    /// Floor of the decay as a share of `lr`.
    pub min_lr_ratio: f64,
    pub epochs: u32,
    /// Stops after this many optimiser steps (the schedule is laid out over them).
    pub max_steps: Option<u64>,
    /// Sequences per micro-batch; with `packing`, packed rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches summed into one optimiser step.
    pub grad_accum: usize,
    /// Longest sequence (prompt + completion); longer completions are cut at the end.
    pub max_len: usize,
    /// Packs several examples into each row of `max_len` tokens (attention never crosses examples).
    pub packing: bool,
    pub optimizer: AdamWConfig,
    /// Seeds the shuffling of each epoch.
    pub seed: u64,
    /// Optimiser steps between checkpoints (0: only at the end).
    pub save_every: u64,
    /// Checkpoints kept (0 keeps all).
    pub keep_last: usize,
    /// Optimiser steps between evaluations (0: only at the end).
    pub eval_every: u64,
    /// Greedy generations scored for the valid-JSON rate at each evaluation (0: loss only).
    pub eval_generations: usize,
    pub eval_max_new_tokens: usize,
    /// Vocabulary rows projected at once when computing the loss (memory vs speed).
    pub logprob_chunk: usize,
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
        }
    }
}

impl SftConfig {
    /// Rejects values that cannot train, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: &str| Err(SftError::Config { field, reason: reason.into() });
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1)");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1");
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
        if self.logprob_chunk == 0 {
            return bad("logprob_chunk", "must be at least 1");
        }
        Ok(())
    }
}
