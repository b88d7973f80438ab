//! RoPE for training, forward and backward each one parallel pass with burn's bits.
//!
//! Composed from burn's ops, `x·cos + cat(−x₂, x₁)·sin` broadcasts the `[batch, seq, 1, d]`
//! tables over the heads through burn's strided iterator on one thread, forward and again
//! backward (the products' gradients, the slices padded back to full size and summed): about
//! a tenth of an SFT step on 2 cores, with the other core idle. Here the forward is the
//! inference kernel and the backward [`crate::cpu_kernels::rope_backward`], both tested equal
//! to the composed ops bit for bit.
//!
//! As for [`crate::lean_mlp`], the CPU training backend is recognised by type at run time;
//! every other backend keeps the composed ops. The tables are constants (built from the
//! positions), so only `x` gets a gradient.

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

/// `x·cos + rotate_half(x)·sin` through the kernels when `B` is the CPU training backend and
/// the kernels take these shapes; `x` back otherwise (the caller composes burn's ops).
pub(crate) fn rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    lean::<B, crate::CpuBackend>(x, cos, sin)
}

fn lean<B: Backend, I: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return Err(x);
    }
    let cast = |t: &Tensor<B, 4>| -> Option<Primitive<I>> {
        let primitive = t.clone().into_primitive().tensor();
        (&primitive as &dyn Any).downcast_ref::<Primitive<I>>().cloned()
    };
    let (Some(xa), Some(ca), Some(sa)) = (cast(&x), cast(cos), cast(sin)) else {
        return Err(x);
    };
    let inner = |p: &Primitive<I>| Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(p.primitive.clone()));
    let (c, s) = (inner(&ca), inner(&sa));
    let Some(out) = crate::cpu_kernels::rope(&inner(&xa), &c, &s) else {
        return Err(x);
    };
    let out = out.into_primitive().tensor();
    let out: Primitive<I> = match RopeBackward.prepare::<NoCheckpointing>([xa.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((ca.primitive, sa.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    match (Box::new(out) as Box<dyn Any>).downcast::<<B as BackendTypes>::FloatTensorPrimitive>() {
        Ok(p) => Ok(Tensor::from_primitive(TensorPrimitive::Float(*p))),
        // Unreachable (B is Autodiff<I>).
        Err(_) => Err(x),
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<I: Backend> Backward<I, 1> for RopeBackward {
    type State = (Inner<I>, Inner<I>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let float = |p: Inner<I>| Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(p));
        let (cos, sin) = ops.state;
        let (cos, sin) = (float(cos), float(sin));
        let g = float(grads.consume::<I>(&ops.node));
        let [Some(node)] = ops.parents else {
            return;
        };
        let dx = crate::cpu_kernels::rope_backward(&g, &cos, &sin).unwrap_or_else(|| {
            // rotate_halfᵀ: the first half takes the second's g·sin, the second −(the first's).
            let [b, s, h, d] = g.dims();
            let gs = g.clone() * sin;
            let back = Tensor::cat(vec![gs.clone().slice([0..b, 0..s, 0..h, d / 2..d]), gs.slice([0..b, 0..s, 0..h, 0..d / 2]).neg()], 3);
            g * cos + back
        });
        grads.register::<I>(node.id, dx.into_primitive().tensor());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Rope;
    use crate::CpuTrainBackend as T;
    use burn::tensor::{Distribution, TensorData};

    /// Output and gradient equal the composed ops' bit for bit: odd sizes, a position whose
    /// tables are exactly 1 and 0, and output gradients holding ±0 and values that cancel.
    #[test]
    fn matches_the_composed_ops_bit_for_bit() {
        let device = Default::default();
        for (b, s, h, d) in [(2, 5, 3, 8), (1, 7, 9, 64), (3, 2, 1, 6)] {
            let normal = Distribution::Normal(0.0, 1.0);
            let table = |offset: f32| {
                let values: Vec<f32> = (0..b * s * d).map(|i| if i % (s * d) < d { 1.0 - offset } else { ((i as f32) * 0.37 + offset).sin() }).collect();
                Tensor::<T, 4>::from_data(TensorData::new(values, [b, s, 1, d]), &device)
            };
            let tables = Rope { cos: table(0.0), sin: table(1.0) };
            let x0 = Tensor::<T, 4>::random([b, s, h, d], normal, &device);
            // Output gradients: random, with ±0 and a repeated value so that sums cancel.
            let w: Vec<f32> = Tensor::<crate::CpuBackend, 4>::random([b, s, h, d], normal, &device).into_data().to_vec::<f32>().unwrap_or_default();
            let w: Vec<f32> = w.iter().enumerate().map(|(i, &v)| match i % 7 { 0 => -0.0, 1 => 0.0, 2 => 0.5, _ => v }).collect();
            let w = Tensor::<T, 4>::from_data(TensorData::new(w, [b, s, h, d]), &device);
            let run = |kernels: bool| {
                let x = x0.clone().detach().require_grad();
                let out = if kernels { rope(x.clone(), &tables.cos, &tables.sin).unwrap_or_else(|_| panic!("the kernels declined {b}×{s}×{h}×{d}")) } else { tables.apply_ops(x.clone()) };
                let grads = (out.clone() * w.clone()).sum().backward();
                let bits = |t: Tensor<crate::CpuBackend, 4>| t.into_data().to_vec::<f32>().unwrap_or_default().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                (bits(out.inner()), bits(x.grad(&grads).unwrap_or_else(|| panic!("no gradient"))))
            };
            if crate::cpu_kernels::rope(&x0.clone().inner(), &tables.cos.clone().inner(), &tables.sin.clone().inner()).is_none() {
                // No kernels on this target: the composed ops run.
                assert!(rope(x0.clone(), &tables.cos, &tables.sin).is_err());
                continue;
            }
            let (kernels, composed) = (run(true), run(false));
            assert!(!kernels.0.is_empty() && kernels.0 == composed.0, "output {b}×{s}×{h}×{d}");
            assert!(kernels.1 == composed.1, "gradient {b}×{s}×{h}×{d}");
        }
    }
}
