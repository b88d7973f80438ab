//! Causal self-attention for training whose backward pass recomputes the attention
//! probabilities a block of queries at a time instead of keeping them.
//!
//! Under burn's autodiff, `attention` falls back to matmul + mask + softmax and keeps every
//! `[batch, heads, seq, seq]` intermediate for the backward pass: at 1,024 tokens that is two
//! thirds of SmolLM2's training memory, and it grows with the square of the length. Here the
//! forward pass runs the backend's fused kernel and keeps only q, k and v; the backward pass
//! rebuilds `P = softmax(q kᵀ / √d)` for one block of queries at a time (flash-attention's
//! recomputation, without its tiling of the keys) and gives
//! `dV = Pᵀ dO`, `dS = P ∘ (dO vᵀ − rowsum(P ∘ dO vᵀ))`, `dQ = dS k / √d`, `dK = dSᵀ q / √d`.
//! Memory for attention becomes linear in the length.
//!
//! On the CPU with AVX2 and FMA both directions run the kernels of
//! `cpu_kernels/imp/training_attention.rs` (gemm's products on blocks of 64 queries, the
//! softmax and `dS` fused in place, dK and dV accumulated in place); burn's ops below are the
//! path everywhere else and the reference the kernels are tested against.
//!
//! burn has no public hook for a custom backward inside a model generic over `Backend`, so
//! [`causal_attention`] recognises the CPU training backend by type at run time and takes
//! this path there; every other backend (inference, CUDA) gets the plain fused call.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorData, TensorPrimitive};

/// Elements of one block's `[batch, heads, queries, keys]` score tensor in the backward pass
/// (64 MiB in f32): big enough for efficient matmuls, small beside the model.
const BLOCK_ELEMENTS: usize = 16 << 20;

/// `softmax(q kᵀ / √d + causal mask) v` for q `[batch, heads, queries, head_dim]` and k, v
/// `[batch, kv_heads, keys, head_dim]` (query head `i` reads KV head `i / (heads / kv_heads)`;
/// the training kernels read it in place, every other path repeats it), the queries being the last
/// `queries` of the `keys` positions (after a cached prefix). Same values as the fused kernel
/// on every backend; on the CPU training backend the backward pass keeps no
/// `queries × keys` tensor.
pub(crate) fn causal_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    match lean::<B, crate::CpuBackend>(q, k, v, None) {
        Ok(out) => out,
        Err((q, k, v)) => fused(q, k, v),
    }
}

/// burn's fused attention, its KV heads repeated to the query heads first.
fn fused<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    let rep = q.dims()[1] / k.dims()[1].max(1);
    let options = AttentionModuleOptions { is_causal: true, ..Default::default() };
    attention(q, repeat_kv(k, rep), repeat_kv(v, rep), None, None, options)
}

/// Query head `i` reads KV head `i / rep` (HF's `repeat_kv`): `[b, kv, s, d]` as
/// `[b, kv · rep, s, d]`.
pub(crate) fn repeat_kv<B: Backend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    if rep <= 1 {
        return x;
    }
    let [b, kv, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, kv, rep, s, d]).reshape([b, kv * rep, s, d])
}

/// The gradient of [`repeat_kv`]'s input from its output's: each KV head's query heads
/// summed in order, as burn's autodiff sums an expanded dimension (from zero, so the bits
/// are those of the repeated path).
fn sum_groups<B: Backend>(g: Tensor<B, 4>, kv: usize) -> Tensor<B, 4> {
    let [b, h, s, d] = g.dims();
    if kv == h {
        return g;
    }
    g.reshape([b, kv, h / kv, s, d]).sum_dim(2).reshape([b, kv, s, d])
}

/// burn's fused CPU kernel computes the (batch, head) pairs one after another on one thread.
/// Each pair is computed alone (its own scratch; the tiling depends on the lengths only), so
/// handing the pairs to rayon's threads gives the same bits in less time.
fn fused_by_heads<I: Backend>(q: Tensor<I, 4>, k: Tensor<I, 4>, v: Tensor<I, 4>) -> Tensor<I, 4> {
    let rep = q.dims()[1] / k.dims()[1].max(1);
    let inputs = [q, repeat_kv(k, rep), repeat_kv(v, rep)];
    let [out] = by_heads(&inputs, |[q, k, v]| [fused(q, k, v)]).unwrap_or_else(|| {
        let [q, k, v] = inputs;
        [fused(q, k, v)]
    });
    out
}

/// `f` applied to each (batch, head) pair of `inputs` (all `[batch, heads, …]`) on rayon's
/// threads, its outputs put back together as `[batch, heads, …]`; `None` where there is
/// nothing to split or no second thread.
#[cfg(feature = "flex")]
fn by_heads<I: Backend, const N: usize, const M: usize>(
    inputs: &[Tensor<I, 4>; N],
    f: impl Fn([Tensor<I, 4>; N]) -> [Tensor<I, 4>; M] + Sync,
) -> Option<[Tensor<I, 4>; M]> {
    use rayon::prelude::*;
    let [b, h, _, _] = inputs.first()?.dims();
    if b * h < 2 || rayon::current_num_threads() < 2 {
        return None;
    }
    let pair = |i: usize| inputs.clone().map(|t| t.slice([i / h..i / h + 1, i % h..i % h + 1]));
    let parts: Vec<[Tensor<I, 4>; M]> = (0..b * h).into_par_iter().map(|i| f(pair(i))).collect();
    Some(std::array::from_fn(|m| {
        let rows = parts.chunks(h).map(|heads| Tensor::cat(heads.iter().map(|out| out[m].clone()).collect(), 1)).collect();
        Tensor::cat(rows, 0)
    }))
}

#[cfg(not(feature = "flex"))]
fn by_heads<I: Backend, const N: usize, const M: usize>(
    _: &[Tensor<I, 4>; N],
    _: impl Fn([Tensor<I, 4>; N]) -> [Tensor<I, 4>; M] + Sync,
) -> Option<[Tensor<I, 4>; M]> {
    None
}

type Inner<I> = <I as BackendTypes>::FloatTensorPrimitive;
type Parts<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);
type Primitive<I> = <Autodiff<I> as BackendTypes>::FloatTensorPrimitive;

/// The recomputing path when `B` is `Autodiff<I>`; the inputs back otherwise. `block`
/// overrides the query block (tests).
fn lean<B: Backend, I: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, block: Option<usize>) -> Result<Tensor<B, 4>, Parts<B>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return Err((q, k, v));
    }
    let cast = |t: &Tensor<B, 4>| -> Option<Primitive<I>> {
        let primitive = t.clone().into_primitive().tensor();
        (&primitive as &dyn Any).downcast_ref::<Primitive<I>>().cloned()
    };
    let (Some(qa), Some(ka), Some(va)) = (cast(&q), cast(&k), cast(&v)) else {
        return Err((q, k, v));
    };
    let inner = |p: &Primitive<I>| Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(p.primitive.clone()));
    let (qi, ki, vi) = (inner(&qa), inner(&ka), inner(&va));
    let out = crate::cpu_kernels::attention_forward(&qi, &ki, &vi).unwrap_or_else(|| fused_by_heads(qi, ki, vi)).into_primitive().tensor();
    let [b, h, s, _] = q.dims();
    let keys = k.dims()[2];
    let block = block.unwrap_or_else(|| (BLOCK_ELEMENTS / (b * h * keys).max(1)).clamp(16, s.max(16)));
    let backward = RecomputedAttention { block };
    let out: Primitive<I> = match backward
        .prepare::<NoCheckpointing>([qa.node.clone(), ka.node.clone(), va.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((qa.primitive, ka.primitive, va.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    match (Box::new(out) as Box<dyn Any>).downcast::<<B as BackendTypes>::FloatTensorPrimitive>() {
        Ok(p) => Ok(Tensor::from_primitive(TensorPrimitive::Float(*p))),
        // Unreachable (B is Autodiff<I>), but the fused path is always correct.
        Err(_) => Err((q, k, v)),
    }
}

#[derive(Debug)]
struct RecomputedAttention {
    block: usize,
}

impl<I: Backend> Backward<I, 3> for RecomputedAttention {
    type State = (Inner<I>, Inner<I>, Inner<I>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let float = |p: Inner<I>| Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(p));
        let (q, k, v) = ops.state;
        let (q, k, v) = (float(q), float(k), float(v));
        let d_out = float(grads.consume::<I>(&ops.node));
        // The training kernel where it runs (the plain CPU backend with AVX2 and FMA); burn's
        // ops otherwise, pairs apart as in the forward pass: each pair's gradients are its
        // own ops on its own rows, with the same query blocks.
        let [dq, dk, dv] = crate::cpu_kernels::attention_backward(&q, &k, &v, &d_out).unwrap_or_else(|| {
            let block = self.block;
            let (h, kv) = (q.dims()[1], k.dims()[1]);
            let inputs = [q, repeat_kv(k, h / kv), repeat_kv(v, h / kv), d_out];
            let [dq, dk, dv] = by_heads(&inputs, |[q, k, v, d_out]| recomputed_grads(q, k, v, d_out, block)).unwrap_or_else(|| {
                let [q, k, v, d_out] = inputs;
                recomputed_grads(q, k, v, d_out, block)
            });
            [dq, sum_groups(dk, kv), sum_groups(dv, kv)]
        });
        let [pq, pk, pv] = ops.parents;
        for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<I>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

/// Gradients of q, k and v, one block of queries at a time. With `offset = keys − queries`,
/// query block `[start, end)` sees keys `[0, offset + end)` only (causal), so it touches the
/// first `offset + end` rows of dK and dV.
fn recomputed_grads<I: Backend>(q: Tensor<I, 4>, k: Tensor<I, 4>, v: Tensor<I, 4>, d_out: Tensor<I, 4>, block: usize) -> [Tensor<I, 4>; 3] {
    let [b, h, s, d] = q.dims();
    let keys = k.dims()[2];
    let offset = keys.saturating_sub(s);
    let device = q.device();
    let scale = 1.0 / (d as f64).sqrt();
    let mut dq_blocks = Vec::with_capacity(s.div_ceil(block.max(1)));
    let mut dk = Tensor::<I, 4>::zeros([b, h, keys, d], &device);
    let mut dv = Tensor::<I, 4>::zeros([b, h, keys, d], &device);
    let mut start = 0;
    while start < s {
        let end = (start + block.max(1)).min(s);
        let (n, seen) = (end - start, offset + end);
        let qb = q.clone().slice([0..b, 0..h, start..end, 0..d]);
        let kb = k.clone().slice([0..b, 0..h, 0..seen, 0..d]);
        let vb = v.clone().slice([0..b, 0..h, 0..seen, 0..d]);
        let gb = d_out.clone().slice([0..b, 0..h, start..end, 0..d]);
        // Query start + i sits at key position offset + start + i and sees the keys up to it.
        let blocked: Vec<bool> = (0..n).flat_map(|i| (0..seen).map(move |j| j > offset + start + i)).collect();
        let blocked = Tensor::<I, 4, Bool>::from_data(TensorData::new(blocked, [1, 1, n, seen]), &device);
        let scores = qb.clone().matmul(kb.clone().swap_dims(2, 3)).mul_scalar(scale);
        let p = softmax(scores.mask_fill(blocked.expand([b, h, n, seen]), f32::NEG_INFINITY), 3);
        let dp = gb.clone().matmul(vb.swap_dims(2, 3));
        let row = p.clone().mul(dp.clone()).sum_dim(3);
        let ds = p.clone().mul(dp.sub(row));
        dq_blocks.push(ds.clone().matmul(kb).mul_scalar(scale));
        let ranges = [0..b, 0..h, 0..seen, 0..d];
        let dk_part = ds.swap_dims(2, 3).matmul(qb).mul_scalar(scale);
        let dv_part = p.swap_dims(2, 3).matmul(gb);
        // One block covering every query writes the whole of dK and dV.
        let whole = start == 0 && end == s;
        dk = if whole { dk_part } else { dk.clone().slice_assign(ranges.clone(), dk.slice(ranges.clone()).add(dk_part)) };
        dv = if whole { dv_part } else { dv.clone().slice_assign(ranges.clone(), dv.slice(ranges).add(dv_part)) };
        start = end;
    }
    [Tensor::cat(dq_blocks, 2), dk, dv]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuBackend, CpuTrainBackend};
    use burn::tensor::Distribution;

    type T = CpuTrainBackend;

    /// The reference: burn's own differentiable fallback (keeps the scores).
    fn plain(q: Tensor<T, 4>, k: Tensor<T, 4>, v: Tensor<T, 4>) -> Tensor<T, 4> {
        let [_, _, s, d] = q.dims();
        let keys = k.dims()[2];
        let offset = keys - s;
        let blocked: Vec<bool> = (0..s).flat_map(|i| (0..keys).map(move |j| j > offset + i)).collect();
        let blocked = Tensor::<T, 4, Bool>::from_data(TensorData::new(blocked, [1, 1, s, keys]), &q.device());
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (d as f64).sqrt());
        let dims = scores.dims();
        softmax(scores.mask_fill(blocked.expand(dims), f32::NEG_INFINITY), 3).matmul(v)
    }

    fn max_diff(a: Tensor<CpuBackend, 4>, b: Tensor<CpuBackend, 4>) -> f32 {
        a.sub(b).abs().max().into_scalar()
    }

    #[test]
    fn values_and_gradients_match_the_kept_scores_path() {
        let device = Default::default();
        // (queries, keys, query block): square, one block, tiny, and after a cached prefix.
        for (s, keys, block) in [(37, 37, 16), (40, 40, 40), (9, 9, 128), (21, 50, 8), (5, 30, 128)] {
            let random = |n: usize| Tensor::<CpuBackend, 4>::random([2, 3, n, 8], Distribution::Normal(0.0, 1.0), &device);
            let inputs = [random(s), random(keys), random(keys), random(s)];
            let leaf = |i: usize| Tensor::<T, 4>::from_inner(inputs[i].clone()).require_grad();
            let run = |lean_path: bool| {
                let (q, k, v) = (leaf(0), leaf(1), leaf(2));
                let out = if lean_path {
                    lean::<T, CpuBackend>(q.clone(), k.clone(), v.clone(), Some(block)).unwrap_or_else(|_| panic!("not the training backend"))
                } else {
                    plain(q.clone(), k.clone(), v.clone())
                };
                // A weighted sum, so dO is not uniform.
                let loss = out.clone().mul(Tensor::from_inner(inputs[3].clone())).sum();
                let grads = loss.backward();
                let g = |t: &Tensor<T, 4>| t.grad(&grads).unwrap_or_else(|| panic!("no gradient"));
                (out.inner(), g(&q), g(&k), g(&v))
            };
            let (o1, q1, k1, v1) = run(true);
            let (o2, q2, k2, v2) = run(false);
            for (what, a, b) in [("output", o1, o2), ("dq", q1, q2), ("dk", k1, k2), ("dv", v1, v2)] {
                let diff = max_diff(a, b);
                assert!(diff < 1e-5, "{s} queries, {keys} keys, block {block}: {what} differs by {diff}");
            }
        }
    }

    /// The (batch, head) pairs apart on two threads give the one-thread kernels' bits: the
    /// output and all three gradients, with burn's naive and flash kernels (more than 512²
    /// scores), a cached prefix, lengths off the 8-lane grid and a strided query.
    #[cfg(feature = "flex")]
    #[test]
    fn pairs_on_threads_give_the_serial_bits() {
        let device = Default::default();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap_or_else(|e| panic!("{e}"));
        let bits = |t: Tensor<CpuBackend, 4>| t.into_data().to_vec::<f32>().unwrap_or_default().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (b, h, s, keys, d, block) in [(2, 3, 37, 37, 8, 16), (1, 2, 530, 530, 16, 200), (3, 2, 21, 50, 8, 8)] {
            let random = |shape: [usize; 4]| Tensor::<CpuBackend, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let q = random([b, s, h, d]).swap_dims(1, 2);
            let (k, v, g) = (random([b, h, keys, d]), random([b, h, keys, d]), random([b, h, s, d]));
            let serial = bits(fused(q.clone(), k.clone(), v.clone()));
            let parallel = bits(pool.install(|| fused_by_heads(q.clone(), k.clone(), v.clone())));
            assert!(!serial.is_empty() && serial == parallel, "{b}×{h}×{s}×{keys}: output");
            let serial = recomputed_grads(q.clone(), k.clone(), v.clone(), g.clone(), block);
            let parallel = pool
                .install(|| by_heads(&[q.clone(), k.clone(), v.clone(), g.clone()], |[q, k, v, g]| recomputed_grads(q, k, v, g, block)))
                .unwrap_or_else(|| panic!("two threads, several pairs: split"));
            for (i, what) in ["dq", "dk", "dv"].into_iter().enumerate() {
                let (a, b) = (bits(serial[i].clone()), bits(parallel[i].clone()));
                assert!(!a.is_empty() && a == b, "{what} ({s} queries, {keys} keys)");
            }
        }
    }

    /// The training kernels against burn's: the forward against its fused kernel, the
    /// backward against the recomputation above with burn's ops; square, one query, a cached
    /// prefix, a strided query, grouped KV heads, lengths around the kernels' query block
    /// (one sequence's queries cut in parts); and the backward's bits on two threads equal
    /// one thread's.
    #[cfg(all(feature = "flex", target_arch = "x86_64"))]
    #[test]
    fn training_kernels_match_burns_ops() {
        if !crate::cpu_kernels::available() {
            return;
        }
        let device = Default::default();
        let block = crate::cpu_kernels::TRAINING_QUERY_BLOCK;
        let pool = |n: usize| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap_or_else(|e| panic!("{e}"));
        let bits = |t: &Tensor<CpuBackend, 4>| t.to_data().to_vec::<f32>().unwrap_or_default().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (b, h, s, keys, d) in [(2, 3, 37, 37, 8), (1, 2, 1, 1, 16), (1, 1, 1, 20, 8), (3, 2, 21, 50, 8), (1, 2, block + 1, block + 1, 64), (2, 1, 2 * block + 5, 3 * block, 32)] {
            let random = |shape: [usize; 4]| Tensor::<CpuBackend, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let q = random([b, s, h, d]).swap_dims(1, 2);
            let (k, v, g) = (random([b, h, keys, d]), random([b, h, keys, d]), random([b, h, s, d]));
            let out = crate::cpu_kernels::attention_forward(&q, &k, &v).unwrap_or_else(|| panic!("the forward kernel did not run"));
            let diff = max_diff(out, fused(q.clone(), k.clone(), v.clone()));
            assert!(diff < 1e-5, "{b}×{h}×{s}×{keys}×{d}: output differs by {diff}");
            // Grouped query heads (a prefill's layout): one KV head read by 2h query heads,
            // against that head repeated to them.
            let (kg, vg) = (random([b, 1, keys, d]), random([b, 1, keys, d]));
            let qg = random([b, 2 * h, s, d]);
            let out = crate::cpu_kernels::attention_forward(&qg, &kg, &vg).unwrap_or_else(|| panic!("the grouped forward did not run"));
            let diff = max_diff(out, fused(qg.clone(), kg.clone().repeat_dim(1, 2 * h), vg.clone().repeat_dim(1, 2 * h)));
            assert!(diff < 1e-5, "{b}×{h}×{s}×{keys}×{d}: grouped output differs by {diff}");
            let reference = recomputed_grads(q.clone(), k.clone(), v.clone(), g.clone(), 7);
            let one = pool(1).install(|| crate::cpu_kernels::attention_backward(&q, &k, &v, &g)).unwrap_or_else(|| panic!("the kernel did not run"));
            let two = pool(2).install(|| crate::cpu_kernels::attention_backward(&q, &k, &v, &g)).unwrap_or_else(|| panic!("the kernel did not run"));
            for (i, what) in ["dq", "dk", "dv"].into_iter().enumerate() {
                let diff = max_diff(one[i].clone(), reference[i].clone());
                let size = reference[i].clone().abs().max().into_scalar();
                assert!(diff <= 1e-5 * size.max(1.0), "{b}×{h}×{s}×{keys}×{d}: {what} differs by {diff} (largest {size})");
                assert!(bits(&one[i]) == bits(&two[i]), "{b}×{h}×{s}×{keys}×{d}: {what} on two threads");
            }
        }
    }

    /// Grouped KV heads read in place give the bits of the same heads repeated to the query
    /// heads (the path before): output, dQ, and dK, dV summed over each group. SmolLM2's
    /// 9 query heads on 3 KV heads at a training length, a cached prefix, two sequences,
    /// KV heads as the strided view a layer hands over; on the kernels and, where they do
    /// not run, on burn's ops.
    #[test]
    fn grouped_heads_give_the_repeated_heads_bits() {
        let device = Default::default();
        let bits = |t: Tensor<CpuBackend, 4>| t.into_data().to_vec::<f32>().unwrap_or_default().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (b, h, kv, s, keys, d) in [(1, 9, 3, 128, 128, 64), (2, 4, 2, 21, 50, 8), (1, 6, 1, 70, 70, 16)] {
            let random = |shape: [usize; 4]| Tensor::<CpuBackend, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let inputs = [random([b, s, h, d]), random([b, keys, kv, d]), random([b, keys, kv, d]), random([b, h, s, d])];
            let run = |grouped: bool| {
                let leaf = |i: usize| Tensor::<T, 4>::from_inner(inputs[i].clone()).require_grad();
                let (q, k, v) = (leaf(0), leaf(1), leaf(2));
                let heads = |t: &Tensor<T, 4>| t.clone().swap_dims(1, 2);
                let (kh, vh) = if grouped { (heads(&k), heads(&v)) } else { (repeat_kv(heads(&k), h / kv), repeat_kv(heads(&v), h / kv)) };
                let out = lean::<T, CpuBackend>(heads(&q), kh, vh, None).unwrap_or_else(|_| panic!("not the training backend"));
                let grads = out.clone().mul(Tensor::from_inner(inputs[3].clone())).sum().backward();
                let g = |t: &Tensor<T, 4>| bits(t.grad(&grads).unwrap_or_else(|| panic!("no gradient")));
                [bits(out.inner()), g(&q), g(&k), g(&v)]
            };
            let (grouped, repeated) = (run(true), run(false));
            for (i, what) in ["output", "dq", "dk", "dv"].into_iter().enumerate() {
                assert!(!grouped[i].is_empty() && grouped[i] == repeated[i], "{b}×{h}/{kv}×{s}×{keys}×{d}: {what}");
            }
        }
    }

    #[test]
    fn other_backends_take_the_fused_path() {
        let device = Default::default();
        let t = || Tensor::<CpuBackend, 4>::random([1, 2, 5, 4], Distribution::Default, &device);
        assert!(lean::<CpuBackend, CpuBackend>(t(), t(), t(), None).is_err());
    }
}
