//! The gradient of a token embedding lookup, added into the gradient its weight already has
//! ([`crate::lean_embedding`] makes the lookup an autodiff op).
//!
//! burn's `embedding_backward` zero-fills a `[vocab, hidden]` tensor, copies it whole inside
//! `select_add` to add each position's row, and the autodiff then adds that to the tied
//! head's gradient: three passes over 113 MB at SmolLM2's shape (40–60 ms of a ~1.1 s
//! training pass of 128 tokens, in a probe that ran beside other work) for 128 rows of
//! data. Here each token's rows are summed as `select_add` sums them (from zero, in
//! position order) and added to the weight's gradient in place; the other rows get the
//! `0 + g` of burn's addition, which only turns a `−0` into `+0`. The bits are burn's
//! (tested).

use std::any::Any;

use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{flex, tensor_of};

/// Each distinct token's rows summed from zero in position order, and a map token → its
/// sum (`u32::MAX` for a token that does not occur).
fn token_sums(rows: &[f32], ids: &[usize], vocab: usize, hidden: usize) -> (Vec<f32>, Vec<u32>) {
    let mut slot = vec![u32::MAX; vocab];
    let mut sums: Vec<f32> = Vec::new();
    for (i, &t) in ids.iter().enumerate() {
        if slot[t] == u32::MAX {
            slot[t] = (sums.len() / hidden) as u32;
            sums.resize(sums.len() + hidden, 0.0);
        }
        let at = slot[t] as usize * hidden;
        for (s, &r) in sums[at..at + hidden].iter_mut().zip(&rows[i * hidden..(i + 1) * hidden]) {
            *s += r;
        }
    }
    (sums, slot)
}

/// `existing + embedding_backward(d_out, ids)` (`existing` absent: as if zeros) for a weight
/// `[vocab, hidden]`, `d_out` the lookup's output gradient as `[ids.len(), hidden]` rows.
/// `existing` is written in place when this tensor holds it alone, row-major; `Err` gives it
/// back otherwise, and where the kernels do not run (the caller runs burn's ops).
pub(crate) fn embedding_grad<B: Backend>(existing: Option<Tensor<B, 2>>, d_out: &Tensor<B, 2>, ids: &[usize], vocab: usize) -> Result<Tensor<B, 2>, Option<Tensor<B, 2>>> {
    let [n, hidden] = d_out.dims();
    let fits = n == ids.len() && hidden > 0 && ids.iter().all(|&t| t < vocab) && existing.as_ref().is_none_or(|e| e.dims() == [vocab, hidden]);
    let Some(rows) = fits.then(|| flex(d_out)).flatten() else { return Err(existing) };
    let rows = rows.to_contiguous();
    let Some(values) = rows.as_slice::<f32>() else { return Err(existing) };
    let (sums, slot) = token_sums(values, ids, vocab, hidden);
    let sum_of = |t: usize| (slot[t] != u32::MAX).then(|| &sums[slot[t] as usize * hidden..(slot[t] as usize + 1) * hidden]);
    let Some(existing) = existing else {
        let mut out = vec![0f32; vocab * hidden];
        for t in 0..vocab {
            if let Some(s) = sum_of(t) {
                out[t * hidden..(t + 1) * hidden].copy_from_slice(s);
            }
        }
        return tensor_of(out, [vocab, hidden]).ok_or(None);
    };
    // The weight's gradient, owned: written in place when nothing else shares its storage.
    let primitive = existing.into_primitive().tensor();
    let mut owned = match (Box::new(primitive) as Box<dyn Any>).downcast::<FlexTensor>() {
        Ok(f) => *f,
        Err(p) => return Err(back::<B>(p)),
    };
    let in_place = owned.is_contiguous() && owned.layout().start_offset() == 0 && owned.dtype() == burn::tensor::DType::F32;
    let Some(grad) = in_place.then(|| owned.try_storage_mut::<f32>()).flatten() else {
        return Err(back::<B>(Box::new(owned)));
    };
    // `s + g`, burn's operand order (of two NaNs x86 keeps the first's payload).
    #[allow(clippy::assign_op_pattern)]
    grad[..vocab * hidden].par_chunks_mut(hidden).enumerate().for_each(|(t, row)| match sum_of(t) {
        Some(s) => row.iter_mut().zip(s).for_each(|(g, &s)| *g = s + *g),
        None => row.iter_mut().filter(|g| g.to_bits() == (-0f32).to_bits()).for_each(|g| *g = 0.0),
    });
    back::<B>(Box::new(owned)).ok_or(None)
}

/// A Flex primitive as `B`'s tensor (`B` is the plain CPU backend wherever this runs).
fn back<B: Backend>(p: Box<dyn Any>) -> Option<Tensor<B, 2>> {
    let p = p.downcast::<<B as BackendTypes>::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(*p)))
}
