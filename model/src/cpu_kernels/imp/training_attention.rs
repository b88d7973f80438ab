//! Causal attention for training, forward and backward, one block of queries at a time with
//! gemm's products and the elementwise steps fused: what [`crate::lean_attention`]
//! computes, without burn's whole-tensor passes.
//!
//! Profiled at 2,048 tokens on SmolLM2's shape, burn's ops spent a training pass's attention
//! on the backward's per-block chain of passes (the mask built as a `Vec<bool>`
//! and uploaded, `mask_fill`, softmax with scalar `expf`, `P ∘ dP`, its row sums, the
//! subtraction, the product, `slice_assign` of dK and dV), each allocating and streaming a
//! `queries × keys` tensor, with blocks cut large (up to 910 queries) so that ~70 % of the
//! square was computed where the causal triangle is half; and the forward's fused kernel,
//! scalar `expf` included (on the AVX-512 Xeon an intermediate build of these kernels took
//! that pass from 114.6 to 151 tokens/s, the vocabulary head still in rows of 64). Here a
//! block of [`QUERY_BLOCK`] queries computes `S = q kᵀ / √d`
//! and its softmax in place over the keys each row sees; the forward pass then `O = P v`; the
//! backward `dP = dO vᵀ`, `dS = P ∘ (dP − rowsum(P ∘ dP)) / √d` in place, and three products
//! that write dQ and add into dK and dV (gemm's accumulate) — in two `QUERY_BLOCK × keys`
//! scratch rows that stay in a core's L2 cache.
//!
//! The forward (a training pass's, and every long prefill's) lays its scores out keys ×
//! queries instead, `Sᵀ = k qᵀ / √d`, so that the softmax's sums, which must run key after
//! key to keep the scalar loop's bits, advance sixteen queries per instruction
//! ([`softmax_columns`]) rather than one add per key and row: the attention of a 4,096-token
//! prefill at SmolLM2's shape ran 1.19× (2,048: 1.21×) as fast, paired in one process. Each
//! score is the same 64-term dot product in either orientation and P v reads P through a
//! transposed view, so the output's bits are the row layout's (tested against it).
//!
//! Tasks are (sequence, head) pairs, each pair's queries cut in parts of equal work when
//! there are fewer than [`MIN_TASKS`] pairs (one sequence of 9 heads would leave a core of two
//! idle a tenth of the time); a part's dK and dV are added to its pair's after all are done,
//! in part order. The cut depends on the shapes alone and each part's products run on its
//! thread, so the bits do not depend on the number of threads.

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use gemm::Parallelism;
use rayon::prelude::*;

use super::softmax::{softmax_columns, softmax_rows};
use super::{flex, tensor_of, Out, View};

/// Queries per block: two `QUERY_BLOCK × keys` f32 scratch rows (1 MiB at 2,048 keys) fit a
/// core's L2 cache, and the diagonal blocks spend `QUERY_BLOCK / 2` masked keys per query
/// (3 % of the work at 2,048 tokens).
pub(crate) const QUERY_BLOCK: usize = 64;

/// Fewest tasks a call is cut into where its pairs have queries enough: fixed (not the
/// thread count), so that the bits are the same on every machine.
const MIN_TASKS: usize = 16;

/// `softmax(q kᵀ / √d + causal mask) v` for q `[b, h, s, d]` and k, v `[b, kv, keys, d]`
/// (query head `i` reads KV head `i / (h / kv)`), the queries being the last `s` of the
/// `keys` positions; any strides with contiguous rows. Written as `[b, s, h, d]` and handed
/// out as its `[b, h, s, d]` view, so the caller's merge of the heads is free. `None` where
/// it does not apply (another backend or dtype, a CPU without AVX2 and FMA, more queries
/// than keys). A long prefill takes this path too: its products run at gemm's speed where
/// the inference kernel takes one query row at a time.
pub(crate) fn attention_forward<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    let shape = Shape::of(q, k, v, q)?;
    let tensors = [flex(q)?, flex(k)?, flex(v)?];
    let [qv, kv, vv] = [&tensors[0], &tensors[1], &tensors[2]].map(View::of);
    let views = [qv?, kv?, vv?];
    let Shape { b, h, s, d, .. } = shape;
    let mut out = vec![0f32; b * s * h * d];
    let dst = Out(out.as_mut_ptr());
    shape.tasks().into_par_iter().with_max_len(1).for_each(|(pair, queries)| {
        let rows = shape.pair(&views, None, pair);
        // SAFETY: this task alone writes these queries' rows of this pair, inside `out`.
        unsafe { rows.forward(queries, shape.out_rows(dst, pair)) };
    });
    Some(tensor_of::<B, 4>(out, [b, s, h, d])?.swap_dims(1, 2))
}

/// `dQ, dK, dV` of [`attention_forward`] given `dO` `[b, h, s, d]`; dK and dV are
/// `[b, kv, keys, d]`, each KV head's the sum of its query heads' in head order, from zero —
/// as burn's autodiff sums the gradient of the KV heads repeated to the query heads, so the
/// bits are the repeated path's. dQ comes as the `[b, h, s, d]` view of `[b, s, h, d]`.
/// `None` where it does not apply.
pub(crate) fn attention_backward<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>, d_out: &Tensor<B, 4>) -> Option<[Tensor<B, 4>; 3]> {
    let shape = Shape::of(q, k, v, d_out)?;
    let Shape { b, h, kv, s, keys, d } = shape;
    let tensors = [flex(q)?, flex(k)?, flex(v)?, flex(d_out)?];
    let [qv, kv_, vv, gv] = [&tensors[0], &tensors[1], &tensors[2], &tensors[3]].map(View::of);
    let (views, g) = ([qv?, kv_?, vv?], gv?);
    let mut dq = vec![0f32; b * s * h * d];
    let dst = Out(dq.as_mut_ptr());
    // Each part keeps its own rows of dK and dV; they are added into the pair's in part order.
    let partials: Vec<(usize, PartGrads)> = shape
        .tasks()
        .into_par_iter()
        .with_max_len(1)
        .map(|(pair, queries)| {
            let seen = (keys - s + queries.end) * d;
            let (mut dk, mut dv) = (vec![0f32; seen], vec![0f32; seen]);
            let first = queries.start;
            // SAFETY: this task alone writes these queries' rows of dQ, inside `dq`.
            unsafe { shape.pair(&views, Some(&g), pair).backward(queries, shape.out_rows(dst, pair), &mut dk, &mut dv) };
            (pair, PartGrads { first, dk, dv })
        })
        .collect();
    let mut dk = vec![0f32; b * h * keys * d];
    let mut dv = vec![0f32; dk.len()];
    let mut by_pair: Vec<Vec<PartGrads>> = (0..b * h).map(|_| Vec::new()).collect();
    for (pair, part) in partials {
        by_pair[pair].push(part);
    }
    dk.par_chunks_mut(keys * d).zip(dv.par_chunks_mut(keys * d)).zip(by_pair.par_iter_mut()).for_each(|((dk, dv), parts)| {
        parts.sort_by_key(|part| part.first);
        for part in parts.iter() {
            add(&mut dk[..part.dk.len()], &part.dk);
            add(&mut dv[..part.dv.len()], &part.dv);
        }
    });
    let dq = tensor_of::<B, 4>(dq, [b, s, h, d])?.swap_dims(1, 2);
    if kv == h {
        return Some([dq, tensor_of(dk, [b, h, keys, d])?, tensor_of(dv, [b, h, keys, d])?]);
    }
    let (dk, dv) = (sum_groups(&dk, h / kv, keys * d), sum_groups(&dv, h / kv, keys * d));
    Some([dq, tensor_of(dk, [b, kv, keys, d])?, tensor_of(dv, [b, kv, keys, d])?])
}

/// Each group of `rep` consecutive `len`-element head gradients summed, from zero, in order.
fn sum_groups(per_head: &[f32], rep: usize, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; per_head.len() / rep];
    out.par_chunks_mut(len).zip(per_head.par_chunks(rep * len)).for_each(|(sum, heads)| {
        for head in heads.chunks(len) {
            add(sum, head);
        }
    });
    out
}

/// One part's share of its pair's dK and dV (the rows of the keys its queries see), and its
/// first query.
struct PartGrads {
    first: usize,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn add(dst: &mut [f32], src: &[f32]) {
    for (x, &y) in dst.iter_mut().zip(src) {
        *x += y;
    }
}

/// The sizes of a call: q `[b, h, s, d]`, k and v `[b, kv, keys, d]`.
#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    h: usize,
    kv: usize,
    s: usize,
    keys: usize,
    d: usize,
}

impl Shape {
    fn of<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>, fourth: &Tensor<B, 4>) -> Option<Self> {
        let [b, h, s, d] = q.dims();
        let [_, kv, keys, _] = k.dims();
        let fits = b * h * s * d * kv != 0 && h % kv == 0 && keys >= s && k.dims() == [b, kv, keys, d] && v.dims() == k.dims() && fourth.dims() == q.dims();
        fits.then_some(Self { b, h, kv, s, keys, d })
    }

    /// The rows of one (sequence, query head) pair in the views of q, k, v (and dO).
    fn pair<'a>(&self, [q, k, v]: &[View<'a>; 3], d_out: Option<&View<'a>>, pair: usize) -> Pair<'a> {
        let (bi, hi) = (pair / self.h, pair % self.h);
        let g = hi / (self.h / self.kv);
        Pair {
            q: Rows::of(q, bi, hi),
            k: Rows::of(k, bi, g),
            v: Rows::of(v, bi, g),
            d_out: d_out.map(|t| Rows::of(t, bi, hi)),
            queries: self.s,
            keys: self.keys,
            head_dim: self.d,
        }
    }

    /// Where the pair's output rows go in a `[b, s, h, d]` buffer: its first row and the
    /// stride between rows.
    fn out_rows(&self, dst: Out, pair: usize) -> (*mut f32, usize) {
        let (bi, hi) = (pair / self.h, pair % self.h);
        (dst.at((bi * self.s * self.h + hi) * self.d), self.h * self.d)
    }

    /// The tasks: (pair, its queries). Each pair's queries are cut at block boundaries into
    /// parts of about equal work (a block's work is its queries times the keys they see).
    fn tasks(&self) -> Vec<(usize, Range<usize>)> {
        let (s, pairs) = (self.s, self.b * self.h);
        let offset = self.keys - s;
        let blocks = s.div_ceil(QUERY_BLOCK);
        let parts = MIN_TASKS.div_ceil(pairs).clamp(1, blocks);
        let work = |end: usize| -> usize {
            (0..end).step_by(QUERY_BLOCK).map(|start| {
                let block_end = (start + QUERY_BLOCK).min(s);
                (block_end - start) * (offset + block_end)
            }).sum()
        };
        let total = work(s);
        // Part j ends at the first block boundary whose work reaches j/parts of the total.
        let mut bounds = vec![0];
        for j in 1..parts {
            let end = (1..blocks).map(|i| i * QUERY_BLOCK).find(|&e| work(e) * parts >= total * j).unwrap_or(s);
            if end > *bounds.last().unwrap_or(&0) && end < s {
                bounds.push(end);
            }
        }
        bounds.push(s);
        (0..pairs).flat_map(|pair| bounds.windows(2).map(move |w| (pair, w[0]..w[1]))).collect()
    }
}

/// One pair's rows of a tensor: row `t` starts at `start + t · stride` in `data`, and
/// [`View::of`] checked that every row of the tensor lies inside `data`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    stride: usize,
}

impl<'a> Rows<'a> {
    fn of(view: &View<'a>, a: usize, b: usize) -> Self {
        Self { data: view.data, start: view.start + a * view.strides[0] + b * view.strides[1], stride: view.strides[2] }
    }

    /// Rows from `t` on, as they are.
    fn from(&self, t: usize) -> Operand {
        Operand { at: self.data.as_ptr().wrapping_add(self.start + t * self.stride), row_stride: self.stride, col_stride: 1 }
    }

    /// Rows from 0 on, transposed.
    fn transposed(&self) -> Operand {
        self.transposed_from(0)
    }

    /// Rows from `t` on, transposed.
    fn transposed_from(&self, t: usize) -> Operand {
        Operand { at: self.data.as_ptr().wrapping_add(self.start + t * self.stride), row_stride: 1, col_stride: self.stride }
    }
}

/// One (sequence, query head) pair: q, dO `[queries, head_dim]` and its KV head's k, v
/// `[keys, head_dim]`.
struct Pair<'a> {
    q: Rows<'a>,
    k: Rows<'a>,
    v: Rows<'a>,
    d_out: Option<Rows<'a>>,
    queries: usize,
    keys: usize,
    head_dim: usize,
}

/// A matrix operand in memory: its first element and the strides of its rows and columns.
#[derive(Clone, Copy)]
struct Operand {
    at: *const f32,
    row_stride: usize,
    col_stride: usize,
}

impl Operand {
    /// A scratch row-major `[_, ld]` matrix, as it is.
    fn rows(at: &[f32], ld: usize) -> Self {
        Self { at: at.as_ptr(), row_stride: ld, col_stride: 1 }
    }

    /// A scratch row-major `[_, ld]` matrix, transposed.
    fn transposed(at: &[f32], ld: usize) -> Self {
        Self { at: at.as_ptr(), row_stride: 1, col_stride: ld }
    }
}

/// `dst[m × n] (+)= scale · a[m × inner] · b[inner × n]`, dst's rows `dst_ld` apart;
/// `accumulate` adds to what dst holds. On this thread.
///
/// # Safety
/// dst's m rows of n elements are writable and written by nobody else meanwhile; a and b
/// reach only elements inside live allocations.
unsafe fn product(dst: *mut f32, dst_ld: usize, accumulate: bool, [m, n, inner]: [usize; 3], a: Operand, b: Operand, scale: f32) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        inner,
        dst,
        1,
        dst_ld as isize,
        accumulate,
        a.at,
        a.col_stride as isize,
        a.row_stride as isize,
        b.at,
        b.col_stride as isize,
        b.row_stride as isize,
        1.0,
        scale,
        false,
        false,
        false,
        Parallelism::None,
    );
}

impl Pair<'_> {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// `P` of queries `[start, end)` into `p` (rows of `seen = offset + end` keys): query
    /// `start + i` sits at key position `offset + start + i` and sees the keys up to it; the
    /// keys past them get probability 0.
    fn probabilities(&self, start: usize, end: usize, p: &mut [f32]) {
        let offset = self.keys - self.queries;
        let seen = offset + end;
        assert!(p.len() >= (end - start) * seen, "scratch of {} for {}×{seen}", p.len(), end - start);
        // SAFETY: p holds the block (checked); q's and k's rows were bounds-checked by View.
        unsafe { product(p.as_mut_ptr(), seen, false, [end - start, seen, self.head_dim], self.q.from(start), self.k.transposed(), self.scale()) };
        {
            let mut rows: Vec<&mut [f32]> = p.chunks_exact_mut(seen).enumerate().map(|(i, row)| &mut row[..offset + start + i + 1]).collect();
            // SAFETY: `flex` hands out tensors only where `available()` found AVX2 and FMA.
            unsafe { softmax_rows(&mut rows) };
        }
        for (i, row) in p[..(end - start) * seen].chunks_exact_mut(seen).enumerate() {
            row[offset + start + i + 1..].fill(0.0);
        }
    }

    /// The blocks of `queries`: (start, end, keys seen).
    fn blocks(&self, queries: Range<usize>) -> impl Iterator<Item = (usize, usize, usize)> {
        let offset = self.keys - self.queries;
        queries.clone().step_by(QUERY_BLOCK).map(move |start| {
            let end = (start + QUERY_BLOCK).min(queries.end);
            (start, end, offset + end)
        })
    }

    /// `out` (row 0 of the pair's output and the stride between rows) = P v, for `queries`,
    /// each block's scores keys × queries (see the module's documentation).
    ///
    /// # Safety
    /// The rows of `queries` at `out` are this call's alone to write.
    unsafe fn forward(&self, queries: Range<usize>, (out, ld): (*mut f32, usize)) {
        let d = self.head_dim;
        let offset = self.keys - self.queries;
        let mut scores = vec![0f32; QUERY_BLOCK * (offset + queries.end)];
        for (start, end, seen) in self.blocks(queries) {
            let n = end - start;
            // Sᵀ = k qᵀ / √d (keys × queries), its softmax down each query's column, O = P v.
            let st = &mut scores[..seen * n];
            product(st.as_mut_ptr(), n, false, [seen, n, d], self.k.from(0), self.q.transposed_from(start), self.scale());
            // SAFETY: `flex` hands out tensors only where `available()` found AVX2 and FMA.
            softmax_columns(st, n, offset + start);
            product(out.wrapping_add(start * ld), ld, false, [n, d, seen], Operand::transposed(st, n), self.v.from(0), 1.0);
        }
    }

    /// dQ of `queries` into `dq` (row 0 of the pair's dQ and the stride between rows), and
    /// their share of dK and dV added into `dk`, `dv` (row-major, at least the rows of the
    /// keys they see).
    ///
    /// # Safety
    /// The rows of `queries` at `dq` are this call's alone to write.
    unsafe fn backward(&self, queries: Range<usize>, (dq, ld): (*mut f32, usize), dk: &mut [f32], dv: &mut [f32]) {
        let Some(g) = self.d_out else { return };
        let d = self.head_dim;
        let offset = self.keys - self.queries;
        let width = QUERY_BLOCK * (offset + queries.end);
        assert!(dk.len() >= (offset + queries.end) * d && dv.len() >= (offset + queries.end) * d, "dK, dV of {} for {} keys", dk.len(), offset + queries.end);
        let (mut probs, mut d_scores) = (vec![0f32; width], vec![0f32; width]);
        let scale = self.scale();
        for (start, end, seen) in self.blocks(queries) {
            let n = end - start;
            let (p, ds) = (&mut probs[..n * seen], &mut d_scores[..n * seen]);
            self.probabilities(start, end, p);
            // dP = dO vᵀ, then dS = P ∘ (dP − rowsum(P ∘ dP)) / √d in its place (0 where P is).
            product(ds.as_mut_ptr(), seen, false, [n, seen, d], g.from(start), self.v.transposed(), 1.0);
            for (i, (pr, dr)) in p.chunks_exact(seen).zip(ds.chunks_exact_mut(seen)).enumerate() {
                let visible = offset + start + i + 1;
                let centre = dot(&pr[..visible], &dr[..visible]);
                for (x, &w) in dr[..visible].iter_mut().zip(&pr[..visible]) {
                    *x = w * (*x - centre) * scale;
                }
                dr[visible..].fill(0.0);
            }
            // dQ = dS k, dK += dSᵀ q, dV += Pᵀ dO.
            product(dq.wrapping_add(start * ld), ld, false, [n, d, seen], Operand::rows(ds, seen), self.k.from(0), 1.0);
            product(dk.as_mut_ptr(), d, true, [seen, d, n], Operand::transposed(ds, seen), self.q.from(start), 1.0);
            product(dv.as_mut_ptr(), d, true, [seen, d, n], Operand::transposed(p, seen), g.from(start), 1.0);
        }
    }
}

/// `Σ a·b` in eight interleaved partial sums (a fixed order, so fixed bits).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use burn::tensor::Distribution;

    impl Pair<'_> {
        /// The forward as the backward recomputes it: P by rows ([`Pair::probabilities`]),
        /// then P v.
        unsafe fn forward_by_rows(&self, queries: Range<usize>, (out, ld): (*mut f32, usize)) {
            let mut probs = vec![0f32; QUERY_BLOCK * (self.keys - self.queries + queries.end)];
            for (start, end, seen) in self.blocks(queries) {
                let p = &mut probs[..(end - start) * seen];
                self.probabilities(start, end, p);
                product(out.wrapping_add(start * ld), ld, false, [end - start, self.head_dim, seen], Operand::rows(p, seen), self.v.from(0), 1.0);
            }
        }
    }

    /// The forward's keys × queries layout gives the bits of the queries × keys one (the
    /// backward's, and the forward's before): one query, a block and one, cached keys,
    /// grouped heads, head sizes 8 to 64, scores spread so far that lanes take `expf`'s
    /// special cases.
    #[test]
    fn forward_by_columns_equals_forward_by_rows_bit_for_bit() {
        if !crate::cpu_kernels::available() {
            return;
        }
        let device = Default::default();
        let shapes = [(1, 9, 3, 300, 300, 64), (2, 3, 3, 37, 37, 8), (1, 2, 2, 1, 1, 16), (1, 1, 1, 1, 20, 8), (3, 2, 1, 21, 50, 8), (1, 2, 2, 65, 65, 64), (2, 1, 1, 133, 192, 32)];
        for (b, h, kv, s, keys, d) in shapes {
            for spread in [1.0, 6.0] {
                let random = |shape: [usize; 4]| Tensor::<CpuBackend, 4>::random(shape, Distribution::Normal(0.0, spread), &device);
                let q = random([b, s, h, d]).swap_dims(1, 2);
                let (k, v) = (random([b, keys, kv, d]).swap_dims(1, 2), random([b, keys, kv, d]).swap_dims(1, 2));
                let shape = Shape::of(&q, &k, &v, &q).unwrap_or_else(|| panic!("shape"));
                let tensors = [&q, &k, &v].map(|t| flex(t).unwrap_or_else(|| panic!("not on Flex")));
                let views = [&tensors[0], &tensors[1], &tensors[2]].map(|t| View::of(t).unwrap_or_else(|| panic!("view")));
                let (mut columns, mut rows) = (vec![0f32; b * s * h * d], vec![0f32; b * s * h * d]);
                for (pair, queries) in shape.tasks() {
                    let p = shape.pair(&views, None, pair);
                    // SAFETY: one task at a time, each writing its own rows inside the buffers.
                    unsafe {
                        p.forward(queries.clone(), shape.out_rows(Out(columns.as_mut_ptr()), pair));
                        p.forward_by_rows(queries, shape.out_rows(Out(rows.as_mut_ptr()), pair));
                    }
                }
                let differ = columns.iter().zip(&rows).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                assert_eq!(differ, 0, "{b}×{h}/{kv}×{s}×{keys}×{d} (spread {spread}): {differ} of {} differ", rows.len());
            }
        }
    }
}
