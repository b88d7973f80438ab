//! The trainer skeleton both trainers share: start or resume a run, and save when due.
//!
//! - A fresh run refuses a checkpoint root that already holds checkpoints (a later
//!   `--resume` would take them for this run's).
//! - A resume reads the newest checkpoint's trainer state, refuses a different plan
//!   fingerprint (other data or batching would not replay the same steps), and restores the
//!   model — the full weights, or with LoRA only the adapters onto the base passed in — and
//!   the optimiser state.
//! - A checkpoint holds the full model in HF layout, or with LoRA the PEFT adapter alone,
//!   plus optimiser and trainer state, written atomically by [`Checkpoints::save`].

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::adamw::AdamW;
use super::checkpoint::{read_trainer_state, write_training_state, Checkpoints, OPTIMIZER_FILE};
use crate::error::{ModelError, Result};
use crate::lora::LoraConfig;
use crate::model::CausalLm;

/// What a trainer asks for after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// End the run now, without an evaluation or a checkpoint (as if it were killed).
    Stop,
}

/// Where and how a run keeps its checkpoints (the part of a run both trainers share).
#[derive(Debug, Clone)]
pub struct RunFiles {
    /// `step-NNNNNNNN` directories under this root.
    pub checkpoint_root: PathBuf,
    /// Checkpoints kept (0 keeps all).
    pub keep_last: usize,
    /// Files copied into every checkpoint (tokenizer files) so each is a complete model
    /// (or, with LoRA, adapter) directory.
    pub extra_files: Vec<PathBuf>,
    /// Continue from the newest checkpoint under `checkpoint_root`, if there is one.
    pub resume: bool,
}

impl RunFiles {
    pub fn new(checkpoint_root: &Path, keep_last: usize, extra_files: &[PathBuf], resume: bool) -> Self {
        Self { checkpoint_root: checkpoint_root.to_path_buf(), keep_last, extra_files: extra_files.to_vec(), resume }
    }
}

/// A run restored from a checkpoint.
#[derive(Debug, Clone)]
pub struct Resumed<S> {
    pub state: S,
    pub dir: PathBuf,
}

/// Starts a run or resumes it (see the module docs). `plan_of` reads the fingerprint out of
/// a saved state, so the caller's state type stays its own.
pub fn start_or_resume<B: AutodiffBackend, S: DeserializeOwned, P: PartialEq + Debug>(
    model: CausalLm<B>,
    optimizer: &mut AdamW<B>,
    files: &RunFiles,
    fingerprint: &P,
    plan_of: impl Fn(&S) -> &P,
) -> Result<(CausalLm<B>, Option<Resumed<S>>)> {
    let checkpoints = Checkpoints::new(&files.checkpoint_root, files.keep_last);
    let latest = checkpoints.latest()?;
    let Some((_, dir)) = latest else {
        return Ok((model, None));
    };
    if !files.resume {
        return Err(ModelError::Resume(format!(
            "{} already holds a checkpoint ({}); resume it or use another output directory",
            files.checkpoint_root.display(),
            dir.display()
        )));
    }
    let saved: S = read_trainer_state(&dir)?;
    if plan_of(&saved) != fingerprint {
        return Err(ModelError::Resume(format!(
            "{} was trained with a different plan ({:?}) than this run ({:?}); resume with the same data and settings",
            dir.display(),
            plan_of(&saved),
            fingerprint
        )));
    }
    let model = restore_model(model, &dir)?;
    optimizer.load(&model, &dir.join(OPTIMIZER_FILE))?;
    Ok((model, Some(Resumed { state: saved, dir })))
}

/// With `lora` set, freezes the base and attaches fresh adapters (seeded by `seed`) unless
/// the model already carries adapters (loaded with `--adapter`), which then train as they are;
/// adapters whose settings differ from `lora` are refused.
pub fn attach_lora<B: AutodiffBackend>(model: CausalLm<B>, lora: Option<&LoraConfig>, seed: u64) -> Result<CausalLm<B>> {
    match (lora, model.lora_config()) {
        (Some(wanted), None) => model.with_lora(wanted, seed),
        (Some(wanted), Some(have)) if have.r != wanted.r || have.targets()? != wanted.targets()? || have.scale() != wanted.scale() => {
            Err(ModelError::config(
                "lora",
                format!("the model came with adapters ({have:?}) that differ from the configured ones ({wanted:?}); drop `[lora]` to train the given adapters"),
            ))
        }
        _ => Ok(model),
    }
}

/// The model of checkpoint `dir`: its adapters onto `model`'s base when `model` has LoRA,
/// else its full weights.
pub fn restore_model<B: Backend>(model: CausalLm<B>, dir: &Path) -> Result<CausalLm<B>> {
    if model.lora_config().is_some() {
        model.reload_adapter(dir)
    } else {
        CausalLm::from_pretrained(dir, &model.device())
    }
}

/// Saves checkpoint `step` when `last` or every `every` steps (0: only the last).
pub fn save_if_due<B: AutodiffBackend, S: Serialize>(
    files: &RunFiles,
    step: u64,
    every: u64,
    last: bool,
    model: &CausalLm<B>,
    optimizer: &AdamW<B>,
    state: &S,
) -> Result<Option<PathBuf>> {
    if !(last || (every > 0 && step.is_multiple_of(every))) {
        return Ok(None);
    }
    let checkpoints = Checkpoints::new(&files.checkpoint_root, files.keep_last);
    let dir = checkpoints.save(step, |tmp| write_training_state(tmp, model, optimizer, state, &files.extra_files))?;
    Ok(Some(dir))
}

/// Seeds the backend's generator for `step` (LoRA dropout draws from it), so a resumed run
/// draws what the uninterrupted one drew.
pub fn seed_step<B: Backend>(device: &B::Device, seed: u64, step: u64) {
    B::seed(device, seed ^ step.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
}
