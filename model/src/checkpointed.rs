//! Activation checkpointing for GRPO's training passes ([`CheckpointedScores`]).
//!
//! A plain pass keeps every layer's activations for the backward pass (about 2 MB per token
//! on SmolLM2-135M). Here the forward runs untracked, keeping only each decoder layer's input
//! hidden states; the final norm and the vocabulary head run tracked, so the caller builds
//! its loss from the log-probs as usual. [`CheckpointedScores::backward`] then walks the
//! layers from the top: it reruns one layer tracked from its saved input, back-propagates
//! the gradient that arrived at the layer's output, hands the gradient of its input down,
//! and drops the layer's graph before the next. One layer's activations are alive at a time,
//! for one more forward pass of compute — TRL's `gradient_checkpointing`, per decoder layer.
//!
//! Each layer reruns the same ops on the same inputs as the untracked forward and as a
//! plain tracked pass, so the log-probs are the plain pass's bit for bit; the gradient
//! reaching a layer's output is the same sum, so the gradients match too (tested).

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::error::Result;
use crate::layers::LayerCache;
use crate::model::{CausalLm, PassInputs};

/// The log-probs of one [`CausalLm::checkpointed_continuation_scores`] pass and what its
/// backward pass needs: each layer's saved input, for the prompt and for the continuations.
pub struct CheckpointedScores<'a, B: AutodiffBackend> {
    /// Log-probs of the active continuation tokens, in [`CausalLm::continuation_scores`]'s
    /// order; tracked through the final norm and the head only.
    pub logps: Tensor<B, 1>,
    /// Their entropies (detached), when asked for.
    pub entropy: Option<Tensor<B, 1>>,
    model: &'a CausalLm<B>,
    /// The last layer's output for the continuation rows: the head's input, a graph leaf.
    head_input: Tensor<B, 3>,
    rows: Saved<B>,
    /// The prompt's first `P − 1` tokens, whose keys and values every row attends to.
    prefix: Option<Saved<B>>,
}

/// A sequence batch's constant inputs and each layer's input hidden states (untracked).
struct Saved<B: AutodiffBackend> {
    inputs: PassInputs<B>,
    layer_inputs: Vec<Tensor<B, 3>>,
}

impl<B: AutodiffBackend> CausalLm<B> {
    /// [`Self::continuation_scores`] with activation checkpointing: the same log-probs,
    /// but the caller differentiates its loss with [`CheckpointedScores::backward`] (not
    /// `loss.backward()`), which recomputes one decoder layer at a time.
    pub fn checkpointed_continuation_scores(
        &self,
        prompt: &[u32],
        continuations: &[Vec<u32>],
        active: &[usize],
        chunk: usize,
        temperature: f64,
        entropy: bool,
    ) -> Result<CheckpointedScores<'_, B>> {
        let pass = self.continuation_pass(prompt, continuations, active)?;
        let frozen = self.clone().no_grad();
        let g = pass.rows.batch;
        // The prompt once, filling every layer's cache, as `continuation_scores` does.
        let (prefix, caches) = match &pass.prefix {
            None => (None, None),
            Some(batch) => {
                let inputs = frozen.pass_inputs(batch, &[Vec::new()], &[0])?;
                let mut caches: Vec<LayerCache<B>> = vec![None; frozen.layers.len()];
                let mut layer_inputs = Vec::with_capacity(frozen.layers.len());
                let mut x = frozen.embed_tokens.forward(inputs.ids.clone());
                for (layer, slot) in frozen.layers.iter().zip(caches.iter_mut()) {
                    layer_inputs.push(x.clone());
                    x = layer.forward(x, &inputs.rope, inputs.mask.as_ref(), Some(slot));
                }
                (Some(Saved { inputs, layer_inputs }), Some(caches))
            }
        };
        let past = prefix.as_ref().map_or(0, |p| p.inputs.ids.dims()[1]);
        let past_valid = vec![vec![true; past]; g];
        let inputs = frozen.pass_inputs(&pass.rows, &past_valid, &vec![past; g])?;
        let mut layer_inputs = Vec::with_capacity(frozen.layers.len());
        let mut x = frozen.embed_tokens.forward(inputs.ids.clone());
        for (i, layer) in frozen.layers.iter().enumerate() {
            layer_inputs.push(x.clone());
            let mut slot = caches.as_ref().map(|c| c[i].as_ref().map(|kv| kv.select_rows(&vec![0; g])));
            x = layer.forward(x, &inputs.rope, inputs.mask.as_ref(), slot.as_mut());
        }
        drop(caches);
        let head_input = x.detach().require_grad();
        let n = pass.rows.batch * pass.rows.seq;
        let hidden = self.norm.forward(head_input.clone()).reshape([n, self.config().hidden_size]);
        let (logps, entropy) = self.scores_at(hidden, &pass.positions, &pass.targets, chunk, temperature, entropy);
        Ok(CheckpointedScores {
            logps,
            entropy,
            model: self,
            head_input,
            rows: Saved { inputs, layer_inputs },
            prefix,
        })
    }
}

impl<B: AutodiffBackend> CheckpointedScores<'_, B> {
    /// The gradients of `loss` (a function of [`Self::logps`]) for every trainable parameter,
    /// as `GradientsParams::from_grads(loss.backward(), model)` gives for a plain pass.
    /// On the CPU training backend all of it — the recomputed layers too — runs on
    /// [`crate::train::backward`]'s pool.
    pub fn backward(self, loss: Tensor<B, 1>) -> GradientsParams {
        crate::cpu_kernels::on_backward_workers::<B, _>(move || self.backward_here(loss))
    }

    fn backward_here(self, loss: Tensor<B, 1>) -> GradientsParams {
        let model = self.model;
        let mut sum = GradientsAccumulator::<CausalLm<B>>::new();
        let grads = loss.backward();
        let mut d_rows = self.head_input.grad(&grads).map(Tensor::<B, 3>::from_inner);
        sum.accumulate(model, GradientsParams::from_grads(grads, model));
        // The prompt's outputs feed no score: its gradient starts below the top layer.
        let mut d_prefix: Option<Tensor<B, 3>> = None;
        let g = self.rows.inputs.ids.dims()[0];
        for (i, layer) in model.layers.iter().enumerate().rev() {
            if d_rows.is_none() && d_prefix.is_none() {
                break;
            }
            let leaf = |t: &Tensor<B, 3>| t.clone().detach().require_grad();
            let rows_in = leaf(&self.rows.layer_inputs[i]);
            let (prefix_in, prefix_out, mut slot) = match &self.prefix {
                None => (None, None, None),
                Some(p) => {
                    let x = leaf(&p.layer_inputs[i]);
                    let mut cache: LayerCache<B> = None;
                    let out = layer.forward(x.clone(), &p.inputs.rope, p.inputs.mask.as_ref(), Some(&mut cache));
                    let rows_cache = cache.as_ref().map(|kv| kv.select_rows(&vec![0; g]));
                    (Some(x), Some(out), Some(rows_cache))
                }
            };
            let rows_out = layer.forward(rows_in.clone(), &self.rows.inputs.rope, self.rows.inputs.mask.as_ref(), slot.as_mut());
            // Σ out · d has gradient d at `out`: the layer back-propagates what reached it.
            let mut surrogate = d_rows.take().map(|d| (rows_out * d).sum());
            if let (Some(out), Some(d)) = (prefix_out, d_prefix.take()) {
                let term = (out * d).sum();
                surrogate = Some(match surrogate {
                    Some(s) => s + term,
                    None => term,
                });
            }
            let Some(surrogate) = surrogate else { break };
            let grads = surrogate.backward();
            d_rows = rows_in.grad(&grads).map(Tensor::from_inner);
            d_prefix = prefix_in.and_then(|x| x.grad(&grads)).map(Tensor::from_inner);
            sum.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        // The embeddings, when they train (full fine-tuning; LoRA leaves them frozen). The
        // rows' lookup, then the prompt's, each added on its own: the order in which a plain
        // pass sums the tied embedding's three gradients (head, rows, prompt).
        if model.embed_tokens.weight.val().is_require_grad() {
            let lookups = [(Some(&self.rows.inputs), d_rows), (self.prefix.as_ref().map(|p| &p.inputs), d_prefix)];
            for (inputs, d) in lookups {
                if let (Some(inputs), Some(d)) = (inputs, d) {
                    let surrogate = (crate::lean_embedding::lookup(&model.embed_tokens, inputs.ids.clone()) * d).sum();
                    sum.accumulate(model, GradientsParams::from_grads(surrogate.backward(), model));
                }
            }
        }
        sum.grads()
    }
}

#[cfg(test)]
mod tests {
    use burn::module::{ModuleVisitor, Param, ParamId};
    use burn::tensor::TensorData;

    use super::*;
    use crate::{CpuTrainBackend as T, LoraConfig, ModelConfig};

    /// Every parameter's gradient in `grads` (empty when it has none), in module order.
    fn all_grads(model: &CausalLm<T>, grads: &GradientsParams) -> Vec<(ParamId, Vec<f32>)> {
        struct Collect<'a> {
            grads: &'a GradientsParams,
            out: Vec<(ParamId, Vec<f32>)>,
        }
        impl ModuleVisitor<T> for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<T, D>>) {
                let values = self.grads.get::<<T as AutodiffBackend>::InnerBackend, D>(param.id).map(|g| g.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default());
                self.out.push((param.id, values.unwrap_or_default()));
            }
        }
        let mut visitor = Collect { grads, out: Vec::new() };
        model.visit(&mut visitor);
        visitor.out
    }

    fn host(t: &Tensor<T, 1>) -> Vec<f32> {
        t.clone().inner().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
    }

    /// Checkpointed passes give a plain pass's log-probs and gradients, bit for bit: full
    /// fine-tuning (the embeddings train too) and LoRA, with a shared prompt (cached
    /// prefix) and with a one-token prompt (no prefix).
    #[test]
    fn checkpointed_scores_and_gradients_equal_a_plain_pass() {
        let config = ModelConfig::preset("tiny").unwrap_or_else(|e| panic!("{e}")).with_vocab_size(97);
        let full = CausalLm::<T>::random(&config, 5, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let lora = full.clone().with_lora(&LoraConfig { r: 4, ..LoraConfig::default() }, 9).unwrap_or_else(|e| panic!("{e}"));
        let continuations = vec![(0..40u32).map(|i| (i * 5 + 1) % 97).collect::<Vec<_>>(), vec![4, 9, 16, 25, 36], vec![11, 12, 13]];
        let active = vec![40, 4, 3];
        let long_prompt: Vec<u32> = (0..45).map(|i| (i * 7 + 3) % 97).collect();
        for (case, (model, prompt)) in [(&full, long_prompt.clone()), (&lora, long_prompt), (&full, vec![17])].into_iter().enumerate() {
            let (plain, _) = model.continuation_scores(&prompt, &continuations, &active, 7, 0.9, false).unwrap_or_else(|e| panic!("{e}"));
            let pass = model.checkpointed_continuation_scores(&prompt, &continuations, &active, 7, 0.9, true).unwrap_or_else(|e| panic!("{e}"));
            assert!(pass.entropy.is_some());
            assert_eq!(host(&plain), host(&pass.logps), "log-probs differ");
            let n = host(&plain).len();
            let weights = Tensor::<T, 1>::from_data(TensorData::new((0..n).map(|i| 1.0 + (i % 5) as f32 * 0.3).collect::<Vec<f32>>(), [n]), &Default::default());
            let expected = GradientsParams::from_grads(plain.mul(weights.clone()).sum().backward(), model);
            let loss = pass.logps.clone().mul(weights).sum();
            let got = pass.backward(loss);
            let (expected, got) = (all_grads(model, &expected), all_grads(model, &got));
            let trained = expected.iter().filter(|(_, g)| g.iter().any(|v| *v != 0.0)).count();
            assert!(trained >= 2 * config.num_hidden_layers, "only {trained} parameters have gradients");
            for (k, ((id, e), (_, g))) in expected.iter().zip(&got).enumerate() {
                assert_eq!(e.len(), g.len(), "parameter {id}: gradient present in one pass only");
                let diff = e.iter().zip(g).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                assert!(diff == 0.0, "case {case}, parameter {k} ({id}, {} values): gradients differ by {diff}", e.len());
            }
        }
    }
}
