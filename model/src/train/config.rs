//! The hyper-parameters every trainer shares, declared once.
//!
//! [`trainer_config!`](crate::trainer_config) declares a trainer's config struct with the
//! shared fields first (documented here, once) followed by the trainer's own; the struct stays
//! flat, so config files keep `lr = …` next to the trainer's own keys and serde still rejects
//! unknown fields. [`TrainSettings`] is the shared part as one value, which the trainer
//! skeleton reads and validates.

use serde::{Deserialize, Serialize};

use super::adamw::AdamWConfig;
use super::schedule::{Decay, LrSchedule};
use crate::lora::LoraConfig;

/// The shared hyper-parameters of a run (see [`trainer_config!`](crate::trainer_config) for
/// each field's meaning and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub lr: f64,
    pub warmup_ratio: f64,
    pub decay: Decay,
    pub min_lr_ratio: f64,
    pub optimizer: AdamWConfig,
    pub seed: u64,
    pub save_every: u64,
    pub keep_last: usize,
    pub grad_accum: usize,
    pub logprob_chunk: usize,
    pub max_tokens_per_pass: usize,
    pub lora: Option<LoraConfig>,
}

impl TrainSettings {
    /// Rejects values that cannot train: `(field, reason)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let bad = |field: &'static str, reason: &str| Err((field, reason.to_string()));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", "must be in [0, 1]");
        }
        let o = &self.optimizer;
        if !((0.0..1.0).contains(&o.beta1) && (0.0..1.0).contains(&o.beta2)) {
            return bad("optimizer", "beta1 and beta2 must be in [0, 1)");
        }
        if !(o.eps.is_finite() && o.eps > 0.0 && o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return bad("optimizer", "eps must be positive and weight_decay non-negative");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1");
        }
        if self.logprob_chunk == 0 {
            return bad("logprob_chunk", "must be at least 1");
        }
        if let Some(lora) = &self.lora {
            lora.validate().map_err(|e| ("lora", e.to_string()))?;
        }
        Ok(())
    }

    /// The token budget of one forward/backward pass for `model` (the setting, or the
    /// automatic one when it is 0).
    pub fn tokens_per_pass(&self, model: &crate::ModelConfig) -> usize {
        super::memory::tokens_per_pass(self.max_tokens_per_pass, model)
    }

    /// Warmup over `warmup_ratio` of `total_updates`, then the decay down to `min_lr_ratio`.
    pub fn schedule(&self, total_updates: u64) -> LrSchedule {
        let warmup = (self.warmup_ratio * total_updates as f64).ceil() as u64;
        LrSchedule { min_lr_ratio: self.min_lr_ratio, ..LrSchedule::new(self.lr, warmup, total_updates, self.decay) }
    }
}

/// Declares a trainer's config: the shared fields below, then the trainer's own (given in the
/// macro call), and `settings()` returning the shared part. Each trainer sets the shared
/// fields' defaults in its `Default` impl, like TRL's configs override `TrainingArguments`.
#[macro_export]
macro_rules! trainer_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            /// Peak learning rate. Default: SFT 1e-5 (a fit for 1.5B models; transformers'
            /// `Trainer` uses 5e-5), GRPO 1e-6 (TRL's `GRPOConfig`).
            pub lr: f64,
            /// Share of the optimiser updates spent warming up linearly from 0. Default: SFT
            /// 0.03, GRPO 0.
            pub warmup_ratio: f64,
            /// Shape of the decay after warmup: `cosine`, `linear` or `constant`. Default: SFT
            /// cosine, GRPO linear (TRL's).
            pub decay: $crate::train::Decay,
            /// Floor of the decay as a share of `lr`. Default 0.
            pub min_lr_ratio: f64,
            /// AdamW (torch semantics): betas 0.9/0.999, eps 1e-8, weight decay 0 on matrices
            /// only, global-norm clipping at 1.0 by default.
            pub optimizer: $crate::train::AdamWConfig,
            /// Seeds the data order, sampling, LoRA initialisation and dropout. Default 0.
            pub seed: u64,
            /// Optimiser steps (GRPO: generation batches) between checkpoints; 0 saves only at
            /// the end. Default: SFT 500, GRPO 50.
            pub save_every: u64,
            /// Checkpoints kept; 0 keeps all. Default 3.
            pub keep_last: usize,
            /// Micro-batches summed into one optimiser update (SFT), or the micro-batches a
            /// generation batch is split into for the backward passes (GRPO). Default 1.
            pub grad_accum: usize,
            /// Vocabulary rows projected at once when scoring tokens (memory vs speed).
            /// Default 512.
            pub logprob_chunk: usize,
            /// Padded tokens (rows × longest row) one forward/backward pass may hold; a
            /// micro-batch bigger than this is cut into passes whose gradients are summed
            /// (same update, bounded memory; see `train::memory`). 0 derives it from the model
            /// so that a pass keeps about 4 GiB of activations (SmolLM2-135M: 1,354 tokens).
            /// Default 0.
            pub max_tokens_per_pass: usize,
            /// LoRA adapters instead of full fine-tuning (`[lora]` in a file: `r`, `alpha`,
            /// `dropout`, `target_modules`, `use_rslora`). Default: none — every weight trains.
            pub lora: ::core::option::Option<$crate::LoraConfig>,
            $( $(#[$fmeta])* pub $field : $ty, )*
        }

        impl $name {
            /// The shared hyper-parameters, as the trainer skeleton reads them.
            pub fn settings(&self) -> $crate::train::TrainSettings {
                $crate::train::TrainSettings {
                    lr: self.lr,
                    warmup_ratio: self.warmup_ratio,
                    decay: self.decay,
                    min_lr_ratio: self.min_lr_ratio,
                    optimizer: self.optimizer,
                    seed: self.seed,
                    save_every: self.save_every,
                    keep_last: self.keep_last,
                    grad_accum: self.grad_accum,
                    logprob_chunk: self.logprob_chunk,
                    max_tokens_per_pass: self.max_tokens_per_pass,
                    lora: self.lora.clone(),
                }
            }
        }
    };
}
