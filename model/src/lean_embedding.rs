//! The token embedding lookup for training, whose backward pass adds each position's row into
//! the weight's gradient in place.
//!
//! burn's backward builds a dense `[vocab, hidden]` gradient for every lookup (zero-filled,
//! then copied whole to add the rows) and its autodiff adds it to what the weight already has
//! — the tied head's gradient, with SmolLM2's tied embedding: three passes over 113 MB for
//! the 128 rows of a 128-token pass. Here the rows go into the existing gradient in place
//! (`cpu_kernels/imp/embedding_grad.rs`), with burn's bits (tested). The forward pass is
//! burn's. As for [`crate::lean_attention`], the CPU training backend is recognised by type
//! at run time; every other backend keeps burn's op.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::nn::Embedding;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::module::embedding;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

type Primitive<I> = <Autodiff<I> as BackendTypes>::FloatTensorPrimitive;

/// `table.forward(ids)`: the rows of `ids` `[batch, seq]`, `[batch, seq, hidden]`.
pub(crate) fn lookup<B: Backend>(table: &Embedding<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    match lean::<B, crate::CpuBackend>(table, &ids) {
        Some(out) => out,
        None => table.forward(ids),
    }
}

fn lean<B: Backend, I: Backend>(table: &Embedding<B>, ids: &Tensor<B, 2, Int>) -> Option<Tensor<B, 3>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return None;
    }
    let weight = table.weight.val().into_primitive().tensor();
    let wa = (&weight as &dyn Any).downcast_ref::<Primitive<I>>()?.clone();
    let id_values: Vec<usize> = ids.to_data().convert::<i64>().to_vec::<i64>().ok()?.iter().map(|&t| usize::try_from(t).ok()).collect::<Option<_>>()?;
    let [b, s] = ids.dims();
    let inner_ids = Tensor::<I, 2, Int>::from_data(TensorData::new(id_values.iter().map(|&t| t as i64).collect(), [b, s]), &Default::default());
    let inner = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(wa.primitive.clone()));
    let out = embedding(inner, inner_ids).into_primitive().tensor();
    let out: Primitive<I> = match LookupBackward.prepare::<NoCheckpointing>([wa.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((wa, id_values), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    let out = (Box::new(out) as Box<dyn Any>).downcast::<<B as BackendTypes>::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(*out)))
}

#[derive(Debug)]
struct LookupBackward;

impl<I: Backend> Backward<I, 1> for LookupBackward {
    /// The weight (its node names the gradient to add into) and the looked-up ids.
    type State = (Primitive<I>, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (weight, ids) = ops.state;
        let d_out = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let [vocab, hidden] = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(weight.primitive.clone())).dims();
        let rows = d_out.reshape([ids.len(), hidden]);
        // What the weight has so far (the tied head's gradient, which the backward pass
        // reaches first), taken out so that the rows go into it.
        let existing = grads.remove::<I>(&weight).map(|p| Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(p)));
        let grad = crate::cpu_kernels::embedding_grad(existing, &rows, &ids, vocab).unwrap_or_else(|existing| {
            // burn's own backward, and the addition `Gradients::register` makes.
            let ids = Tensor::<I, 2, Int>::from_data(TensorData::new(ids.iter().map(|&t| t as i64).collect(), [1, ids.len()]), &rows.device());
            let rows = rows.reshape([1, ids.dims()[1], hidden]).into_primitive().tensor();
            let dense = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(I::embedding_backward(weight.primitive, rows, ids.into_primitive())));
            match existing {
                Some(e) => dense + e,
                None => dense,
            }
        });
        grads.register::<I>(node.id, grad.into_primitive().tensor());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuBackend, CpuTrainBackend as T};
    use burn::module::Param;
    use burn::tensor::ops::ModuleOps;
    use burn::tensor::Distribution;

    fn bits<const D: usize>(t: Tensor<CpuBackend, D>) -> Vec<u32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default().iter().map(|v| v.to_bits()).collect()
    }

    /// The rows of `ids` in `e`, `[ids.len(), hidden]`, off the autodiff graph.
    fn burns_rows(e: &Tensor<T, 2>, ids: &[i64], hidden: usize) -> Tensor<CpuBackend, 2> {
        let ids = Tensor::<CpuBackend, 1, Int>::from_data(TensorData::new(ids.to_vec(), [ids.len()]), &Default::default());
        e.clone().inner().select(0, ids).reshape([-1, hidden as i32])
    }

    /// A tied embedding — looked up, then the head `x · Eᵀ` — gives burn's output and
    /// gradient bits: tokens repeated and absent, two sequences, a vocabulary large enough for
    /// the parallel pass; and a frozen table takes no gradient.
    #[test]
    fn tied_lookup_gives_burns_bits() {
        let device = Default::default();
        let (vocab, hidden) = (3000, 48);
        let e0 = Tensor::<T, 2>::random([vocab, hidden], Distribution::Normal(0.0, 0.1), &device);
        let ids: Vec<i64> = (0..40).map(|i| (i * 37 % 23) * 101 % vocab as i64).collect();
        let probe = Tensor::<T, 2>::random([40, vocab], Distribution::Normal(0.0, 1.0), &device);
        let run = |lean_path: bool, train: bool, lean_head: bool| {
            let e = if train { e0.clone().detach().require_grad() } else { e0.clone().detach() };
            let table = Embedding { weight: Param::from_tensor(e.clone()).set_require_grad(train) };
            let ids = Tensor::<T, 2, Int>::from_data(TensorData::new(ids.clone(), [2, 20]), &device);
            let x = if lean_path { lookup(&table, ids) } else { table.forward(ids) };
            let e = table.weight.val();
            // The model's head (its gradient row-major: the rows go in place) or burn's
            // (a transposed view: burn's path).
            let rows = x.clone().reshape([40, hidden]);
            let logits = if lean_head { crate::lean_linear::matmul_transposed(&e, &rows.transpose()).expect("the lean head") } else { rows.matmul(e.clone().transpose()) };
            let grads = (logits * probe.clone()).sum().backward();
            (bits(x.inner()), e.grad(&grads).map(bits))
        };
        for lean_head in [true, false] {
            let (lean, burns) = (run(true, true, lean_head), run(false, true, lean_head));
            assert!(!lean.0.is_empty() && lean.0 == burns.0, "lookup");
            assert!(lean.1.is_some() && lean.1 == burns.1, "the tied weight's gradient (lean head: {lean_head})");
        }
        let burns = run(false, true, false);
        let head_only = {
            let e = e0.clone().detach().require_grad();
            let x = Tensor::<T, 2>::from_inner(burns_rows(&e0, &ids, hidden));
            let grads = (x.matmul(e.clone().transpose()) * probe.clone()).sum().backward();
            e.grad(&grads).map(bits)
        };
        assert!(head_only != burns.1, "the lookup's rows reach the tied gradient");
        let (lean, burns) = (run(true, false, true), run(false, false, true));
        assert!(lean.0 == burns.0, "frozen table: lookup");
        assert!(lean.1.is_none() && burns.1.is_none(), "frozen table: a gradient {:?} {:?}", lean.1.map(|g| g.len()), burns.1.map(|g| g.len()));
    }

    /// The kernel against burn's `embedding_backward` plus the autodiff's addition, on a
    /// gradient holding −0, +0 and a NaN, with and without a gradient to add into.
    #[cfg(all(feature = "flex", target_arch = "x86_64"))]
    #[test]
    fn kernel_adds_rows_with_burns_bits() {
        if !crate::cpu_kernels::available() {
            return;
        }
        let device = Default::default();
        let (vocab, hidden) = (7, 5);
        let ids = [3usize, 0, 3, 6, 3];
        let rows = Tensor::<CpuBackend, 2>::random([ids.len(), hidden], Distribution::Normal(0.0, 1.0), &device);
        let mut existing: Vec<f32> = (0..vocab * hidden).map(|i| (i as f32 - 9.0) * 0.37).collect();
        existing[2] = -0.0;
        existing[hidden + 1] = -0.0;
        existing[3 * hidden] = -0.0;
        existing[4] = 0.0;
        existing[5 * hidden + 2] = f32::NAN;
        let weight = Tensor::<CpuBackend, 2>::zeros([vocab, hidden], &device);
        let burns = |add: bool| {
            let ids_t = Tensor::<CpuBackend, 2, Int>::from_data(TensorData::new(ids.iter().map(|&t| t as i64).collect(), [1, ids.len()]), &device);
            let dense = Tensor::<CpuBackend, 2>::from_primitive(TensorPrimitive::Float(CpuBackend::embedding_backward(
                weight.clone().into_primitive().tensor(),
                rows.clone().reshape([1, ids.len(), hidden]).into_primitive().tensor(),
                ids_t.into_primitive(),
            )));
            if add { dense + Tensor::from_data(TensorData::new(existing.clone(), [vocab, hidden]), &device) } else { dense }
        };
        for add in [true, false] {
            let start = add.then(|| Tensor::<CpuBackend, 2>::from_data(TensorData::new(existing.clone(), [vocab, hidden]), &device));
            let got = crate::cpu_kernels::embedding_grad(start, &rows, &ids, vocab).unwrap_or_else(|_| panic!("the kernel did not run"));
            assert_eq!(bits(got), bits(burns(add)), "added into a gradient: {add}");
        }
    }
}
