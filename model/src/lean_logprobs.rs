//! The log-prob of one target per row, `log_softmax(logits / T)[target]`, as one autodiff op
//! on the CPU training backend.
//!
//! Composed from burn's ops it is a division, a max, a subtraction, an exponential, a sum, a
//! logarithm and a subtraction over the whole `[rows, vocab]` logits, then a gather; its
//! backward a scatter into zeros and as many passes again: 95–160 ms of
//! a 0.9–1.5 s training pass of 128 tokens at the smollm2 shape (25 MB of logits), measured.
//! Here the forward pass is one parallel pass over the logits and the backward one more
//! ([`crate::cpu_kernels`]), keeping the logits and one `log Σ exp` per row. Values agree
//! with the composed ops to rounding (tested); every other backend keeps them.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

type Inner<I> = <I as BackendTypes>::FloatTensorPrimitive;
type Primitive<I> = <Autodiff<I> as BackendTypes>::FloatTensorPrimitive;

/// `log_softmax(logits / temperature)[i, targets[i]]` for each row `i` of `logits`
/// `[rows, vocab]`, and with `entropy` each row's entropy of that distribution (detached).
pub(crate) fn target_logprobs<B: Backend>(logits: Tensor<B, 2>, targets: &[u32], temperature: f64, entropy: bool) -> (Tensor<B, 1>, Option<Tensor<B, 1>>) {
    match lean::<B, crate::CpuBackend>(&logits, targets, temperature as f32, entropy) {
        Some(fused) => fused,
        None => composed(logits, targets, temperature, entropy),
    }
}

/// [`target_logprobs`] from burn's ops: what every backend but the CPU training one runs.
fn composed<B: Backend>(logits: Tensor<B, 2>, targets: &[u32], temperature: f64, entropy: bool) -> (Tensor<B, 1>, Option<Tensor<B, 1>>) {
    let [rows, _] = logits.dims();
    let device = logits.device();
    let logits = if temperature != 1.0 { logits.div_scalar(temperature) } else { logits };
    let lsm = log_softmax(logits, 1);
    let entropy = entropy.then(|| {
        let l = lsm.clone().detach();
        l.clone().exp().mul(l).sum_dim(1).neg().reshape([rows])
    });
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(targets.iter().map(|&t| t as i64).collect(), [rows, 1]), &device);
    (lsm.gather(1, t).reshape([rows]), entropy)
}

fn lean<B: Backend, I: Backend>(logits: &Tensor<B, 2>, targets: &[u32], temperature: f32, entropy: bool) -> Option<(Tensor<B, 1>, Option<Tensor<B, 1>>)> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return None;
    }
    let primitive = logits.clone().into_primitive().tensor();
    let la = (&primitive as &dyn Any).downcast_ref::<Primitive<I>>()?.clone();
    let inner = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(la.primitive.clone()));
    let (logprobs, stats) = crate::cpu_kernels::target_logprobs(&inner, targets, temperature, entropy)?;
    let device = logits.device();
    let entropy = stats.entropy.map(|h| Tensor::<B, 1>::from_data(TensorData::new(h, [targets.len()]), &device));
    let out = logprobs.into_primitive().tensor();
    let out: Primitive<I> = match LogprobBackward.prepare::<NoCheckpointing>([la.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((la.primitive, targets.to_vec(), stats.lse, temperature), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    let out = (Box::new(out) as Box<dyn Any>).downcast::<<B as BackendTypes>::FloatTensorPrimitive>().ok()?;
    Some((Tensor::from_primitive(TensorPrimitive::Float(*out)), entropy))
}

#[derive(Debug)]
struct LogprobBackward;

impl<I: Backend> Backward<I, 1> for LogprobBackward {
    /// The logits, the targets, each row's `log Σ exp(logits / T)` and T.
    type State = (Inner<I>, Vec<u32>, Vec<f32>, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets, lse, temperature) = ops.state;
        let logits = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(logits));
        let grad = Tensor::<I, 1>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let dlogits = crate::cpu_kernels::target_logprobs_backward(&logits, &targets, temperature, &lse, &grad)
            .unwrap_or_else(|| composed_backward(logits, &targets, temperature, &lse, grad));
        grads.register::<I>(node.id, dlogits.into_primitive().tensor());
    }
}

/// `grad / T · (onehot(target) − exp(logits / T − lse))` from burn's ops, where the kernel
/// declines (it does not once the forward kernel ran: same backend, same CPU).
fn composed_backward<I: Backend>(logits: Tensor<I, 2>, targets: &[u32], temperature: f32, lse: &[f32], grad: Tensor<I, 1>) -> Tensor<I, 2> {
    let [rows, vocab] = logits.dims();
    let device = logits.device();
    let lse = Tensor::<I, 1>::from_data(TensorData::new(lse.to_vec(), [rows]), &device).reshape([rows, 1]);
    let p = (logits.div_scalar(temperature) - lse).exp();
    let t = Tensor::<I, 2, Int>::from_data(TensorData::new(targets.iter().map(|&t| t as i64).collect(), [rows, 1]), &device);
    let onehot = Tensor::<I, 2>::zeros([rows, vocab], &device).scatter(1, t, Tensor::ones([rows, 1], &device), burn::tensor::IndexingUpdateOp::Add);
    (onehot - p) * grad.reshape([rows, 1]).div_scalar(temperature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuTrainBackend as T;
    use burn::tensor::Distribution;

    fn values<const D: usize>(t: Tensor<crate::CpuBackend, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    /// Log-probs, entropies and the logits' gradient agree with burn's composed ops at two
    /// temperatures, a vocabulary off the 8-lane grid and targets at both ends of a row.
    #[test]
    fn fused_logprobs_match_the_composed_ops() {
        let device = Default::default();
        for (rows, vocab) in [(5, 37), (64, 1000)] {
            let logits0 = Tensor::<T, 2>::random([rows, vocab], Distribution::Normal(0.0, 3.0), &device);
            let targets: Vec<u32> = (0..rows).map(|i| [0, vocab - 1, i * 7 % vocab][i % 3] as u32).collect();
            let weights = Tensor::<T, 1>::random([rows], Distribution::Normal(0.0, 1.0), &device);
            for temperature in [1.0, 0.7] {
                let run = |fused: bool| {
                    let logits = logits0.clone().detach().require_grad();
                    let (lp, h) = if fused { target_logprobs(logits.clone(), &targets, temperature, true) } else { composed(logits.clone(), &targets, temperature, true) };
                    let grads = (lp.clone() * weights.clone()).sum().backward();
                    (values(lp.inner()), values(h.expect("entropy asked for").inner()), values(logits.grad(&grads).expect("a gradient")))
                };
                let (fused, composed) = (run(true), run(false));
                for (what, a, b) in [("log-probs", &fused.0, &composed.0), ("entropy", &fused.1, &composed.1), ("gradient", &fused.2, &composed.2)] {
                    assert_eq!(a.len(), b.len(), "{what}");
                    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0f32, f32::max);
                    assert!(worst < 2e-5, "{what} {rows}×{vocab} at T = {temperature}: off by {worst:e}");
                }
            }
        }
    }

    /// Off the CPU training backend (here the plain one) the composed ops run.
    #[test]
    fn other_backends_keep_the_composed_ops() {
        let device = Default::default();
        let logits = Tensor::<crate::CpuBackend, 2>::random([3, 10], Distribution::Normal(0.0, 1.0), &device);
        assert!(lean::<crate::CpuBackend, crate::CpuBackend>(&logits, &[1, 2, 3], 1.0, false).is_none());
        let (lp, h) = target_logprobs(logits.clone(), &[1, 2, 3], 1.0, false);
        assert!(h.is_none());
        let expected = log_softmax(logits, 1).slice([0..3, 1..4]);
        let diag: Vec<f32> = values(expected).chunks(3).enumerate().map(|(i, r)| r[i]).collect();
        assert_eq!(values(lp), diag);
    }
}
