//! `x · w` of more rows than a decode step (a prefill's projections, the tied head over many
//! positions) by gemm, written straight into the result.
//!
//! burn-flex's matmul makes the same gemm call, but into `FlexTensor::empty`: a `Vec<u8>`
//! zero-filled, then copied once more to align it (cubecl's `Bytes::from_bytes_vec`), before
//! gemm overwrites every element. In a 2,048-token prefill those two passes were 6 % of the
//! `perf` samples. Here the output is allocated and left unfilled (gemm with `read_dst =
//! false` writes each element before it reads any), and handed to burn without a copy. The
//! call's arguments are burn's — strides as the layouts give them, `alpha = 0`, `beta = 1` —
//! and from 192³ multiply-adds on, where burn has gemm thread, the product is split into
//! one gemm call per thread instead ([`split`]), which keeps every element's sum: the bits
//! are burn's.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_flex::FlexTensor;
use gemm::Parallelism;
use rayon::prelude::*;

use super::{flex, tensor_of};

/// burn-flex's threshold for running one product on every thread (its `PARALLEL_THRESHOLD`).
const PARALLEL_FROM: usize = 192 * 192 * 192;

/// An operand as gemm reads it: its first element and its strides.
struct Strided {
    at: *const f32,
    row_stride: isize,
    col_stride: isize,
}

/// `t` `[rows, cols]` read in place, if every element it names lies inside its storage
/// (non-negative strides only, as every layout the model makes has).
fn strided(t: &FlexTensor, rows: usize, cols: usize) -> Option<Strided> {
    let layout = t.layout();
    let &[row_stride, col_stride] = layout.strides() else { return None };
    let (rs, cs) = (usize::try_from(row_stride).ok()?, usize::try_from(col_stride).ok()?);
    let last = layout.start_offset().checked_add((rows - 1).checked_mul(rs)?)?.checked_add((cols - 1).checked_mul(cs)?)?;
    let storage = t.storage::<f32>();
    if last >= storage.len() {
        return None;
    }
    Some(Strided { at: storage[layout.start_offset()..].as_ptr(), row_stride, col_stride })
}

/// `x · w` for `x` `[m, k]` and `w` `[k, n]` (any non-negative strides) on the plain CPU
/// backend; `None` elsewhere, and for empty products.
pub(crate) fn matmul_gemm<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let [m, k] = x.dims();
    let [k2, n] = w.dims();
    if m == 0 || k == 0 || n == 0 || k != k2 {
        return None;
    }
    let (xf, wf) = (flex(x)?, flex(w)?);
    let (a, b) = (strided(&xf, m, k)?, strided(&wf, k, n)?);
    let len = m.checked_mul(n)?;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    // gemm turns a row-major destination into the transposed problem `yᵀ = wᵀ · xᵀ`, and
    // when w is stored by columns (a transposed view: backward's `dy · Wᵀ`, the tied head's
    // `Eᵀ · dy`) it first copies wᵀ into panels one element at a time, on one thread: k·n
    // moves where the product has only m rows. Asked for a column-major destination, gemm
    // keeps `x · w`, reads w in place and copies x instead (nothing when x is stored by
    // columns too); y is then transposed into place. Same microkernel, same depth blocks
    // (gemm sizes them from k alone), so the same bits.
    let by_columns = b.row_stride == 1 && b.col_stride != 1 && (a.row_stride == 1 || m < n);
    let (dst_col_stride, dst_row_stride) = if by_columns { (m as isize, 1) } else { (1, n as isize) };
    let product = Product { m, n, k, a, b, dst_row_stride, dst_col_stride };
    let parallel = m.saturating_mul(n).saturating_mul(k) >= PARALLEL_FROM;
    let parts = if parallel { split(m, n, rayon::current_num_threads()) } else { None };
    // SAFETY: a and b name only elements inside their tensors' storage (checked by
    // `strided`), which `xf` and `wf` keep alive; y has room for m rows of n, which gemm
    // writes whole (k > 0 and read_dst = false: every element is stored before any is read;
    // the parts of a split cover every row or column once), so all `len` elements are
    // initialised when the length is set.
    unsafe {
        let dst = Dst(y.as_mut_ptr());
        match parts {
            Some(split) => (0..split.parts).into_par_iter().for_each(|part| {
                let (from, to) = split.range(part);
                product.run_part(split.along_rows, from, to, Parallelism::None, &dst);
            }),
            // Too narrow to split: gemm's own threading where burn would use it.
            None => product.run_part(false, 0, n, if parallel { Parallelism::Rayon(0) } else { Parallelism::None }, &dst),
        }
        y.set_len(len);
    }
    if by_columns {
        y = row_major_of(&y, m, n);
    }
    tensor_of(y, [m, n])
}

/// Where a product's output is written; each part of a split writes its own rows or columns.
struct Dst(*mut f32);

// SAFETY: the parts of a split write disjoint elements of one buffer that outlives them.
unsafe impl Sync for Dst {}

/// A product as gemm is asked for it: operands, destination strides, shape.
struct Product {
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    dst_row_stride: isize,
    dst_col_stride: isize,
}

// SAFETY: the operands are only read, while the tensors that own them are alive.
unsafe impl Sync for Product {}

impl Product {
    /// Rows `from..to` of the product (`along_rows`), or its columns `from..to`.
    ///
    /// # Safety
    /// `dst` must have room for the whole `m × n` product at the destination strides, and the
    /// operands must name elements inside live storage.
    unsafe fn run_part(&self, along_rows: bool, from: usize, to: usize, parallelism: Parallelism, dst: &Dst) {
        let (rows, cols, at) = if along_rows { (to - from, self.n, from as isize * self.dst_row_stride) } else { (self.m, to - from, from as isize * self.dst_col_stride) };
        let a = if along_rows { self.a.at.wrapping_offset(from as isize * self.a.row_stride) } else { self.a.at };
        let b = if along_rows { self.b.at } else { self.b.at.wrapping_offset(from as isize * self.b.col_stride) };
        unsafe {
            gemm::gemm(
                rows,
                cols,
                self.k,
                dst.0.wrapping_offset(at),
                self.dst_col_stride,
                self.dst_row_stride,
                false,
                a,
                self.a.col_stride,
                self.a.row_stride,
                b,
                self.b.col_stride,
                self.b.row_stride,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// A product's rows or columns dealt out to the threads, one gemm call each.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Split {
    along_rows: bool,
    parts: usize,
    /// The length of the split side.
    len: usize,
}

impl Split {
    /// Part `part`'s rows or columns: even shares, cut at multiples of 16 (the microkernel's
    /// width), the last to the end.
    fn range(&self, part: usize) -> (usize, usize) {
        let cut = |i: usize| if i == self.parts { self.len } else { i * self.len / self.parts / 16 * 16 };
        (cut(part), cut(part + 1))
    }
}

/// How an `m × n` product splits over `threads`: its longer side in parts of at least 16,
/// at most one a thread; `None` when it runs whole (one thread, or no side long enough).
/// gemm's own threading meets at a barrier after each depth block's packing and its
/// products, and divides the microkernel's tiles between threads that each pack the operand
/// they share; independent parts, one gemm call per thread, ran the 128-row products of a
/// training step level to 42 % faster, the tied head's `Eᵀ · dy` 45–57 %, and a 512-row
/// prefill's ~5 %, in a throwaway probe. The bits are the same: gemm sizes its depth blocks
/// from k alone, except for products of at most 64 × 64, which it blocks by 512, and those
/// of one row or column (gemv) — never a part here: the side left whole is longer than 64
/// and each part at least 16 long — so each element is summed over the same blocks in the
/// same order.
fn split(m: usize, n: usize, threads: usize) -> Option<Split> {
    const MIN_PART: usize = 16;
    let (along_rows, len, other) = if m >= n { (true, m, n) } else { (false, n, m) };
    // Cuts at multiples of 16 between even shares of at least 16 leave parts of at least 16.
    let parts = threads.min(len / MIN_PART);
    (parts >= 2 && other > 64).then_some(Split { along_rows, parts, len })
}

/// `tᵀ` laid out row-major, for a row-major `[m, n]` `t` (a product's output) on the plain CPU
/// backend: the parallel copy of [`row_major_of`], where burn's `to_contiguous` of the
/// transposed view walks it on one thread. `None` elsewhere.
pub(crate) fn transposed<B: Backend>(t: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let [m, n] = t.dims();
    let tf = flex(t)?;
    if m == 0 || n == 0 || !tf.is_contiguous() {
        return None;
    }
    let values = tf.as_slice::<f32>()?;
    // Row-major [m, n] is [n, m] stored by columns.
    tensor_of(row_major_of(values, n, m), [n, m])
}

/// The row-major copy of `t`, an `[m, n]` matrix stored by columns: tiles of 16 columns,
/// so each pass reads 16 columns of `t` in step and writes whole cache lines of the copy;
/// spread over rayon's threads when it is large.
fn row_major_of(t: &[f32], m: usize, n: usize) -> Vec<f32> {
    const TILE: usize = 16;
    let mut y = vec![0f32; m * n];
    let rows_per_task = m.div_ceil(4 * rayon::current_num_threads()).max(1);
    let fill = |(task, chunk): (usize, &mut [f32])| {
        let r0 = task * rows_per_task;
        for j0 in (0..n).step_by(TILE) {
            for (i, row) in chunk.chunks_exact_mut(n).enumerate() {
                for j in j0..(j0 + TILE).min(n) {
                    row[j] = t[j * m + r0 + i];
                }
            }
        }
    };
    if m * n >= 1 << 20 {
        y.par_chunks_mut(rows_per_task * n).enumerate().for_each(fill);
    } else {
        y.chunks_mut(rows_per_task * n).enumerate().for_each(fill);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type B = crate::CpuBackend;

    /// Bit for bit burn's matmul: contiguous and transposed operands, a sliced (offset) one,
    /// shapes on both sides of the threading threshold, each run whole and split over two
    /// and three threads.
    #[test]
    fn gemm_products_equal_burns_matmul_bit_for_bit() {
        if !super::super::available() {
            return;
        }
        let device = Default::default();
        // Also a training step's shapes at 128 rows, where `x · wᵀ` takes the column-major
        // destination (backward's `dy · Wᵀ` of every projection), one whose result is large
        // enough (≥ 2²⁰ elements) to be transposed into place on every thread, sides that
        // leave a remainder to the last part, and a 64-wide one, too narrow to split.
        let shapes = [(33, 576, 192), (200, 64, 70), (2048, 576, 1536), (5, 7, 3), (128, 1536, 576), (128, 576, 1536), (576, 128, 1536), (700, 64, 1600), (200, 1536, 70), (161, 700, 100), (64, 1536, 1000)];
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                for &(m, k, n) in &shapes {
                    let x = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
                    let w = Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
                    let wt = Tensor::<B, 2>::random([n, k + 3], Distribution::Normal(0.0, 1.0), &device).slice([0..n, 2..k + 2]).transpose();
                    let xt = Tensor::<B, 2>::random([k, m], Distribution::Normal(0.0, 1.0), &device).transpose();
                    for (lhs, rhs, what) in [(&x, &w, "x·w"), (&x, &wt, "x·(sliced w)ᵀ"), (&xt, &w, "(xᵀ)ᵀ·w")] {
                        let got = matmul_gemm(lhs, rhs).expect("the plain CPU backend takes the gemm path");
                        let expected = lhs.clone().matmul(rhs.clone());
                        let (got, expected) = (got.into_data().to_vec::<f32>().unwrap(), expected.into_data().to_vec::<f32>().unwrap());
                        assert!(got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()), "{what} {m}×{k}×{n} on {threads} threads");
                    }
                }
            });
        }
        let x = Tensor::<B, 2>::zeros([4, 0], &device);
        assert!(matmul_gemm(&x, &Tensor::<B, 2>::zeros([0, 8], &device)).is_none());
    }

    /// Parts cover the split side once, each at least 16 long, at most one a thread; narrow
    /// products and single threads run whole.
    #[test]
    fn splits_cover_the_longer_side_once() {
        for (m, n, threads) in [(128, 576, 2), (576, 128, 2), (200, 70, 3), (161, 100, 2), (65, 100, 16), (1000, 65, 16), (49152, 128, 2)] {
            let split = split(m, n, threads).expect("a splittable product");
            assert_eq!(split.along_rows, m >= n);
            assert_eq!(split.len, m.max(n));
            assert!(split.parts >= 2 && split.parts <= threads);
            let mut next = 0;
            for part in 0..split.parts {
                let (from, to) = split.range(part);
                assert!(from == next && to - from >= 16, "{m}×{n} on {threads}: part {part} is {from}..{to}");
                next = to;
            }
            assert_eq!(next, split.len);
        }
        assert_eq!(split(128, 64, 2), None, "a side of 64 or less is never split against");
        assert_eq!(split(64, 5000, 16), None, "a side of 64 or less is never split against");
        assert_eq!(split(128, 576, 1), None);
    }
}
