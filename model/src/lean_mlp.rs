//! SwiGLU's `silu(gate) · up` for training with a backward pass that keeps only `gate` and
//! `up`.
//!
//! Composed from burn's ops, `silu(g) · u` keeps `g`, `sigmoid(g)`, `silu(g)` and `u` for the
//! backward pass: four intermediate-sized tensors per layer and token, the largest share of a
//! training pass's memory (SmolLM2: intermediate 1,536 vs hidden 576). Here the forward runs
//! on the inner backend and the backward rebuilds `σ(g)` from `g`:
//! `d_up = d · silu(g)`, `d_gate = d · u · σ(g) · (1 + g · (1 − σ(g)))`. On the CPU both
//! directions are one parallel pass each ([`crate::cpu_kernels`]), with the composed ops' bits.
//!
//! As for [`crate::lean_attention`], burn offers no custom-op hook in a `Backend`-generic
//! model, so the CPU training backend is recognised by type at run time; every other backend
//! gets the composed ops.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Tensor, TensorPrimitive};

/// `silu(gate) * up`. Same values on every backend; on the CPU training backend the
/// backward pass keeps two tensors instead of four.
pub(crate) fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    // Inference on the CPU: one parallel pass with burn's bits.
    if let Some(out) = crate::cpu_kernels::swiglu(&gate, &up) {
        return out;
    }
    match lean::<B, crate::CpuBackend>(gate, up) {
        Ok(out) => out,
        Err((gate, up)) => silu(gate) * up,
    }
}

type Inner<I> = <I as BackendTypes>::FloatTensorPrimitive;
type Primitive<I> = <Autodiff<I> as BackendTypes>::FloatTensorPrimitive;
type Pair<B> = (Tensor<B, 3>, Tensor<B, 3>);

fn lean<B: Backend, I: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Result<Tensor<B, 3>, Pair<B>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return Err((gate, up));
    }
    let cast = |t: &Tensor<B, 3>| -> Option<Primitive<I>> {
        let primitive = t.clone().into_primitive().tensor();
        (&primitive as &dyn Any).downcast_ref::<Primitive<I>>().cloned()
    };
    let (Some(ga), Some(ua)) = (cast(&gate), cast(&up)) else {
        return Err((gate, up));
    };
    let inner = |p: &Primitive<I>| Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(p.primitive.clone()));
    let (g, u) = (inner(&ga), inner(&ua));
    // On the CPU one parallel pass with burn's bits; the composed ops elsewhere.
    let out = crate::cpu_kernels::swiglu(&g, &u).unwrap_or_else(|| silu(g) * u).into_primitive().tensor();
    let out: Primitive<I> = match SwigluBackward.prepare::<NoCheckpointing>([ga.node.clone(), ua.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((ga.primitive, ua.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    match (Box::new(out) as Box<dyn Any>).downcast::<<B as BackendTypes>::FloatTensorPrimitive>() {
        Ok(p) => Ok(Tensor::from_primitive(TensorPrimitive::Float(*p))),
        Err(_) => Err((gate, up)),
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<I: Backend> Backward<I, 2> for SwigluBackward {
    type State = (Inner<I>, Inner<I>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let float = |p: Inner<I>| Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(p));
        let (gate, up) = ops.state;
        let (gate, up) = (float(gate), float(up));
        let d = float(grads.consume::<I>(&ops.node));
        let [p_gate, p_up] = ops.parents;
        // On the CPU one parallel pass with the bits of the ops below.
        if let Some((d_gate, d_up)) = crate::cpu_kernels::swiglu_backward(&gate, &up, &d, p_gate.is_some(), p_up.is_some()) {
            for (node, grad) in [(p_gate, d_gate), (p_up, d_up)] {
                if let (Some(node), Some(grad)) = (node, grad) {
                    grads.register::<I>(node.id, grad.into_primitive().tensor());
                }
            }
            return;
        }
        let sig = sigmoid(gate.clone());
        if let Some(node) = p_up {
            let d_up = d.clone() * gate.clone() * sig.clone();
            grads.register::<I>(node.id, d_up.into_primitive().tensor());
        }
        if let Some(node) = p_gate {
            // silu'(g) = σ(g) · (1 + g · (1 − σ(g)))
            let slope = sig.clone() * (gate * (sig.neg() + 1.0) + 1.0);
            let d_gate = d * up * slope;
            grads.register::<I>(node.id, d_gate.into_primitive().tensor());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuTrainBackend as T;
    use burn::tensor::Distribution;

    /// Values and gradients of both inputs match burn's composed `silu(g) * u`.
    #[test]
    fn matches_the_composed_ops() {
        let device = Default::default();
        let g0 = Tensor::<T, 3>::random([2, 5, 7], Distribution::Normal(0.0, 2.0), &device);
        let u0 = Tensor::<T, 3>::random([2, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<T, 3>::random([2, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        let run = |lean_path: bool| {
            let g = g0.clone().detach().require_grad();
            let u = u0.clone().detach().require_grad();
            let out = if lean_path { swiglu(g.clone(), u.clone()) } else { silu(g.clone()) * u.clone() };
            let grads = (out.clone() * w.clone()).sum().backward();
            let host = |t: Tensor<crate::CpuBackend, 3>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
            (host(out.inner()), host(g.grad(&grads).unwrap()), host(u.grad(&grads).unwrap()))
        };
        let (a, b) = (run(true), run(false));
        for (x, y) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2)] {
            let diff = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
            assert!(diff < 1e-5, "{diff}");
        }
    }
}
