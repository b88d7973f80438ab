//! The completion-only cross-entropy.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use thinkjson_model::CausalLm;

use crate::batching::MicroBatch;
use crate::error::Result;

/// `−Σ log p(target)` over the micro-batch's completion tokens, divided by `normaliser`
/// (the completion-token count of the whole optimiser step, so accumulated micro-batches
/// add up to the step's mean — transformers' `num_items_in_batch`).
pub fn completion_loss<B: Backend>(model: &CausalLm<B>, batch: &MicroBatch, normaliser: usize, chunk: usize) -> Result<Tensor<B, 1>> {
    let lp = model.selected_logprobs(&batch.tokens, &batch.positions, &batch.targets, chunk)?;
    Ok(lp.sum().neg().div_scalar(normaliser.max(1) as f64))
}
