//! `x · w` of more rows than a decode step (a prefill's projections, the tied head over many
//! positions) by gemm, written straight into the result.
//!
//! burn-flex's matmul makes the same gemm call, but into `FlexTensor::empty`: a `Vec<u8>`
//! zero-filled, then copied once more to align it (cubecl's `Bytes::from_bytes_vec`), before
//! gemm overwrites every element. In a 2,048-token prefill those two passes were 6 % of the
//! `perf` samples. Here the output is allocated and left unfilled (gemm with `read_dst =
//! false` writes each element before it reads any), and handed to burn without a copy. The
//! call's arguments are burn's — strides as the layouts give them, `alpha = 0`, `beta = 1`,
//! rayon on all threads from 192³ multiply-adds on — so the bits are burn's.

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
    let parallelism = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_FROM { Parallelism::Rayon(0) } else { Parallelism::None };
    // gemm turns a row-major destination into the transposed problem `yᵀ = wᵀ · xᵀ`, and
    // when w is stored by columns (a transposed view: backward's `dy · Wᵀ`, the tied head's
    // `Eᵀ · dy`) it first copies wᵀ into panels one element at a time, on one thread: k·n
    // moves where the product has only m rows. Asked for a column-major destination, gemm
    // keeps `x · w`, reads w in place and copies x instead (nothing when x is stored by
    // columns too); y is then transposed into place. Same microkernel, same depth blocks
    // (gemm sizes them from k alone), so the same bits.
    let by_columns = b.row_stride == 1 && b.col_stride != 1 && (a.row_stride == 1 || m < n);
    let (dst_col_stride, dst_row_stride) = if by_columns { (m as isize, 1) } else { (1, n as isize) };
    // SAFETY: a and b name only elements inside their tensors' storage (checked by
    // `strided`), which `xf` and `wf` keep alive; y has room for m rows of n, which gemm
    // writes whole (k > 0 and read_dst = false: every element is stored before any is read),
    // so all `len` elements are initialised when the length is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            dst_col_stride,
            dst_row_stride,
            false,
            a.at,
            a.col_stride,
            a.row_stride,
            b.at,
            b.col_stride,
            b.row_stride,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        y.set_len(len);
    }
    if by_columns {
        y = row_major_of(&y, m, n);
    }
    tensor_of(y, [m, n])
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
    /// shapes on both sides of the threading threshold.
    #[test]
    fn gemm_products_equal_burns_matmul_bit_for_bit() {
        if !super::super::available() {
            return;
        }
        let device = Default::default();
        // Also a training step's shapes at 128 rows, where `x · wᵀ` takes the column-major
        // destination (backward's `dy · Wᵀ` of every projection), and one whose result is
        // large enough (≥ 2²⁰ elements) to be transposed into place on every thread.
        for (m, k, n) in [(33, 576, 192), (200, 64, 70), (2048, 576, 1536), (5, 7, 3), (128, 1536, 576), (128, 576, 1536), (576, 128, 1536), (700, 64, 1600)] {
            let x = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
            let wt = Tensor::<B, 2>::random([n, k + 3], Distribution::Normal(0.0, 1.0), &device).slice([0..n, 2..k + 2]).transpose();
            let xt = Tensor::<B, 2>::random([k, m], Distribution::Normal(0.0, 1.0), &device).transpose();
            for (lhs, rhs, what) in [(&x, &w, "x·w"), (&x, &wt, "x·(sliced w)ᵀ"), (&xt, &w, "(xᵀ)ᵀ·w")] {
                let got = matmul_gemm(lhs, rhs).expect("the plain CPU backend takes the gemm path");
                let expected = lhs.clone().matmul(rhs.clone());
                let (got, expected) = (got.into_data().to_vec::<f32>().unwrap(), expected.into_data().to_vec::<f32>().unwrap());
                assert!(got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()), "{what} {m}×{k}×{n}");
            }
        }
        let x = Tensor::<B, 2>::zeros([4, 0], &device);
        assert!(matmul_gemm(&x, &Tensor::<B, 2>::zeros([0, 8], &device)).is_none());
    }
}
