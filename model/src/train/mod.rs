//! The pieces every trainer shares, written once: [`AdamW`] (torch semantics, decay on
//! matrices only, clipping by the global gradient norm), [`LrSchedule`] (warmup then
//! cosine/linear/constant) and [`Checkpoints`] (atomic HF-layout checkpoints with the
//! optimiser and trainer state for an exact resume).
//!
//! The loop a trainer runs:
//! 1. for each micro-batch, [`backward`]`(loss)` and `GradientsParams::from_grads`, summed
//!    with burn's `GradientsAccumulator`;
//! 2. [`AdamW::step`] with `schedule.lr(step)` — it measures the global norm, refuses
//!    non-finite gradients, clips and updates;
//! 3. every so often, [`Checkpoints::save`] with [`write_training_state`].
//!
//! A micro-batch's forward/backward is cut into passes of at most `max_tokens_per_pass`
//! padded tokens ([`memory::token_pieces`]), so memory is bounded whatever the batch.
//!
//! [`start_or_resume`] and [`save_if_due`] are the skeleton around that loop: fresh run or
//! exact resume (full weights, or LoRA adapters onto the frozen base), and checkpoints.
//!
//! Data parallelism ([`Collective`], [`run_in_process`]): between steps 1 and 2 the peers sum
//! their gradients with [`all_reduce_step`] and clip by [`agreed_grad_norm`]; [`Solo`] is the
//! one-device group.

mod adamw;
mod backward;
mod checkpoint;
mod collective;
mod config;
pub mod memory;
mod schedule;
mod session;

pub use adamw::{AdamW, AdamWConfig, StepReport};
pub use backward::backward;
pub use checkpoint::{copy_into, read_trainer_state, write_training_state, Checkpoints, OPTIMIZER_FILE, TRAINER_STATE_FILE};
pub use collective::{agreed_grad_norm, all_reduce_scalar, all_reduce_step, check_in_sync, run_in_process, BurnPeer, Collective, Solo, StepTotals};
pub use config::TrainSettings;
pub use schedule::{Decay, LrSchedule};
pub use session::{attach_lora, restore_model, save_if_due, seed_step, start_or_resume, Control, Resumed, RunFiles};
