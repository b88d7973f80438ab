//! A projection's `x · W` for training on the CPU, its three products written straight
//! into their outputs by gemm ([`crate::cpu_kernels::matmul_gemm`]).
//!
//! burn's autodiff `linear` runs the forward `x · W` and the backward `dy · Wᵀ` and `xᵀ · dy`
//! through burn-flex's matmul, whose output buffer is zero-filled and then copied once more
//! before gemm overwrites it: two extra passes over every product, 4–7 % of a training pass
//! at the smollm2 shape. Here the same three gemm calls, with the same operands, strides and
//! threading, write into unfilled buffers, so values and gradients keep burn's bits (tested).
//! Like burn's op it keeps `x` only when `W` wants a gradient and `W` only when `x` does
//! (under LoRA the frozen base keeps no activations here).
//!
//! As for [`crate::lean_mlp`], the CPU training backend is recognised by type at run time;
//! every other backend keeps burn's `linear`.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Tensor, TensorPrimitive};

type Inner<I> = <I as BackendTypes>::FloatTensorPrimitive;
type Primitive<I> = <Autodiff<I> as BackendTypes>::FloatTensorPrimitive;

/// `x · w` (`[m, k]` by `[k, n]`, either a transposed view) on the CPU training backend, with
/// the gradients of burn's `linear` and `matmul` (the same products); `None` on every other
/// backend (the caller runs burn's op).
pub(crate) fn matmul<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    lean::<B, crate::CpuBackend>(x, w, false)
}

/// `(x · w)ᵀ` `[n, m]`, laid out row-major: [`matmul`]'s product and gradients, its output
/// transposed by a parallel copy. For the tied head, `(E · hᵀ)ᵀ`: the logits `[rows, vocab]`,
/// which a transposed view would leave to burn's one-thread copy (25 MB at 128 rows of
/// SmolLM2's vocabulary, ~28 ms of a ~1.1 s training pass).
pub(crate) fn matmul_transposed<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    lean::<B, crate::CpuBackend>(x, w, true)
}

fn lean<B: Backend, I: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>, transposed: bool) -> Option<Tensor<B, 2>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return None;
    }
    let cast = |t: &Tensor<B, 2>| -> Option<Primitive<I>> {
        let primitive = t.clone().into_primitive().tensor();
        (&primitive as &dyn Any).downcast_ref::<Primitive<I>>().cloned()
    };
    let (xa, wa) = (cast(x)?, cast(w)?);
    let inner = |p: &Primitive<I>| Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(p.primitive.clone()));
    let out = crate::cpu_kernels::matmul_gemm(&inner(&xa), &inner(&wa))?;
    let out = if transposed { crate::cpu_kernels::transposed(&out)? } else { out }.into_primitive().tensor();
    let (x_tracked, w_tracked) = (xa.is_tracked(), wa.is_tracked());
    let out: Primitive<I> = match (LinearBackward { transposed }).prepare::<NoCheckpointing>([xa.node.clone(), wa.node.clone()]).compute_bound().stateful() {
        // x is only needed for W's gradient, and W only for x's.
        OpsKind::Tracked(prep) => prep.finish((w_tracked.then_some(xa.primitive), x_tracked.then_some(wa.primitive)), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    let out = (Box::new(out) as Box<dyn Any>).downcast::<<B as BackendTypes>::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(*out)))
}

#[derive(Debug)]
struct LinearBackward {
    /// The output is `(x · w)ᵀ` ([`matmul_transposed`]).
    transposed: bool,
}

impl<I: Backend> Backward<I, 2> for LinearBackward {
    type State = (Option<Inner<I>>, Option<Inner<I>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let float = |p: Inner<I>| Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(p));
        let d = float(grads.consume::<I>(&ops.node));
        // `(x · w)ᵀ`'s gradient as a view of `x · w`'s: the operand a transposed view of the
        // product would have handed back, so the products below keep their bits.
        let d = if self.transposed { d.transpose() } else { d };
        let (x, w) = ops.state;
        let [p_x, p_w] = ops.parents;
        // burn's `linear_x_backward` and `linear_weight_backward`: the same products of the
        // same (transposed-view) operands, which gemm takes in place.
        let product = |a: Tensor<I, 2>, b: Tensor<I, 2>| crate::cpu_kernels::matmul_gemm(&a, &b).unwrap_or_else(|| a.matmul(b));
        if let (Some(node), Some(w)) = (p_x, w) {
            let dx = product(d.clone(), float(w).transpose());
            grads.register::<I>(node.id, dx.into_primitive().tensor());
        }
        if let (Some(node), Some(x)) = (p_w, x) {
            let dw = product(float(x).transpose(), d);
            grads.register::<I>(node.id, dw.into_primitive().tensor());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuTrainBackend as T;
    use burn::tensor::Distribution;

    fn bits(t: Tensor<crate::CpuBackend, 2>) -> Vec<u32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// Value and both gradients equal burn's `linear` bit for bit — with a bias, without, and
    /// with a frozen weight (LoRA's base) or a frozen input — on both sides of gemm's
    /// threading threshold.
    #[test]
    fn matches_burns_linear_bit_for_bit() {
        let device = Default::default();
        for (m, k, n) in [(40, 24, 33), (300, 576, 192)] {
            let x0 = Tensor::<T, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
            let w0 = Tensor::<T, 2>::random([k, n], Distribution::Normal(0.0, 0.1), &device);
            let b0 = Tensor::<T, 1>::random([n], Distribution::Normal(0.0, 0.1), &device);
            let probe = Tensor::<T, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &device);
            for (x_grad, w_grad, bias) in [(true, true, false), (true, true, true), (true, false, false), (false, true, true)] {
                let run = |lean_path: bool| {
                    let x = if x_grad { x0.clone().detach().require_grad() } else { x0.clone().detach() };
                    let w = if w_grad { w0.clone().detach().require_grad() } else { w0.clone().detach() };
                    let b = bias.then(|| b0.clone().detach().require_grad());
                    let y = if lean_path {
                        let y = matmul(&x, &w).expect("the CPU training backend takes the lean op");
                        match &b {
                            Some(b) => y + b.clone().unsqueeze::<2>(),
                            None => y,
                        }
                    } else {
                        burn::tensor::module::linear(x.clone(), w.clone(), b.clone())
                    };
                    let grads = (y.clone() * probe.clone()).sum().backward();
                    let dx = x_grad.then(|| bits(x.grad(&grads).unwrap()));
                    let dw = w_grad.then(|| bits(w.grad(&grads).unwrap()));
                    let db = b.map(|b| bits(b.grad(&grads).unwrap().unsqueeze::<2>()));
                    (bits(y.inner()), dx, dw, db)
                };
                let (lean, burns) = (run(true), run(false));
                let what = format!("{m}×{k}×{n}, x grad {x_grad}, w grad {w_grad}, bias {bias}");
                assert!(lean.0 == burns.0, "value: {what}");
                assert!(lean.1 == burns.1, "x's gradient: {what}");
                assert!(lean.2 == burns.2, "w's gradient: {what}");
                assert!(lean.3 == burns.3, "bias's gradient: {what}");
            }
        }
    }

    /// The tied head's product `E · hᵀ` (a transposed view on the right) equals burn's
    /// autodiff `matmul`, value and both gradients, bit for bit.
    #[test]
    fn matches_burns_matmul_on_a_transposed_view() {
        let device = Default::default();
        let (vocab, hidden, rows) = (300, 64, 48);
        let e0 = Tensor::<T, 2>::random([vocab, hidden], Distribution::Normal(0.0, 0.1), &device);
        let h0 = Tensor::<T, 2>::random([rows, hidden], Distribution::Normal(0.0, 1.0), &device);
        let probe = Tensor::<T, 2>::random([vocab, rows], Distribution::Normal(0.0, 1.0), &device);
        let run = |lean_path: bool| {
            let (e, h) = (e0.clone().detach().require_grad(), h0.clone().detach().require_grad());
            let ht = h.clone().transpose();
            let y = if lean_path { matmul(&e, &ht).expect("the lean op") } else { e.clone().matmul(ht) };
            let grads = (y.clone() * probe.clone()).sum().backward();
            (bits(y.inner()), bits(e.grad(&grads).unwrap()), bits(h.grad(&grads).unwrap()))
        };
        let (lean, burns) = (run(true), run(false));
        assert!(lean.0 == burns.0, "value");
        assert!(lean.1 == burns.1, "E's gradient");
        assert!(lean.2 == burns.2, "h's gradient");
    }

    /// The head's logits laid out `[rows, vocab]` by [`matmul_transposed`] have the bits of
    /// the product's transposed view, and so do E's and h's gradients through them: a small
    /// head and one large enough (≥ 2²⁰ logits) for the copy to run on every thread.
    #[test]
    fn transposed_output_keeps_the_bits_of_the_transposed_view() {
        let device = Default::default();
        for (vocab, hidden, rows) in [(300, 64, 48), (9000, 64, 128)] {
            let e0 = Tensor::<T, 2>::random([vocab, hidden], Distribution::Normal(0.0, 0.1), &device);
            let h0 = Tensor::<T, 2>::random([rows, hidden], Distribution::Normal(0.0, 1.0), &device);
            let probe = Tensor::<T, 2>::random([rows, vocab], Distribution::Normal(0.0, 1.0), &device);
            let run = |laid_out: bool| {
                let (e, h) = (e0.clone().detach().require_grad(), h0.clone().detach().require_grad());
                let ht = h.clone().transpose();
                let y = if laid_out { matmul_transposed(&e, &ht).expect("the lean op") } else { matmul(&e, &ht).expect("the lean op").transpose() };
                let grads = (y.clone() * probe.clone()).sum().backward();
                (bits(y.inner()), bits(e.grad(&grads).unwrap()), bits(h.grad(&grads).unwrap()))
            };
            let (laid_out, view) = (run(true), run(false));
            assert!(laid_out.0 == view.0, "{vocab}×{rows}: value");
            assert!(laid_out.1 == view.1, "{vocab}×{rows}: E's gradient");
            assert!(laid_out.2 == view.2, "{vocab}×{rows}: h's gradient");
        }
    }
}
