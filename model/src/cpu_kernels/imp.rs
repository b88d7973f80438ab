//! The Flex/x86-64 implementation of [`super`]: tensor access by downcast, the AVX2/FMA
//! kernels, and their split over rayon's threads.

use std::any::{Any, TypeId};
use std::arch::x86_64::*;
use std::sync::OnceLock;

use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Bool, BoolStore, DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::MAX_ROWS;
use softmax::{softmax_in_place, softmax_rows};
#[cfg(test)]
pub(crate) use training_attention::QUERY_BLOCK as TRAINING_QUERY_BLOCK;
pub(crate) use training_attention::{attention_backward, attention_forward};
pub(crate) use cache::{keep_sequences, write_positions, writes_in_place};
pub(crate) use embedding_grad::embedding_grad;
pub(crate) use gemm_product::{matmul_gemm, transposed};
pub(crate) use logprobs::{target_logprobs, target_logprobs_backward};
pub(crate) use swiglu::{swiglu, swiglu_backward};

mod cache;
mod embedding_grad;
mod gemm_product;
mod logprobs;
mod projection16;
mod softmax;
mod swiglu;
mod training_attention;

/// Whether this CPU runs the kernels (AVX2 and FMA; checked once). Every x86-64 CPU with
/// AVX-512 has them too, so one code path gives the same sums on both kinds of machine.
pub(crate) fn available() -> bool {
    static AVX2_FMA: OnceLock<bool> = OnceLock::new();
    *AVX2_FMA.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
}

/// Whether this CPU has AVX-512F too (checked once). Only kernels whose every element comes
/// out with the bits of the AVX2 path take it (the exponential, the row-major projection of
/// a decode step; no sum changes order).
pub(crate) fn wide() -> bool {
    static AVX512F: OnceLock<bool> = OnceLock::new();
    *AVX512F.get_or_init(|| available() && std::arch::is_x86_feature_detected!("avx512f"))
}

/// The Flex tensor behind `t` when `B` is the plain CPU backend and `t` is f32.
fn flex<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    if TypeId::of::<B>() != TypeId::of::<crate::CpuBackend>() || !available() {
        return None;
    }
    let primitive = t.clone().into_primitive().tensor();
    let f = (&primitive as &dyn Any).downcast_ref::<FlexTensor>()?;
    (f.dtype() == DType::F32).then(|| f.clone())
}

/// The Flex tensor behind a mask stored one byte per element (what `storage::<u8>` reads).
fn flex_bool<B: Backend, const D: usize>(t: &Tensor<B, D, Bool>) -> Option<FlexTensor> {
    let primitive = t.clone().into_primitive();
    let f = (&primitive as &dyn Any).downcast_ref::<FlexTensor>()?;
    matches!(f.dtype(), DType::Bool(BoolStore::Native | BoolStore::U8)).then(|| f.clone())
}

fn tensor_of<B: Backend, const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Option<Tensor<B, D>> {
    let t = FlexTensor::from_data(TensorData::new(values, shape));
    let p = (Box::new(t) as Box<dyn Any>).downcast::<<B as BackendTypes>::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(*p)))
}

/// `t` laid out row-major, when the kernels run here (a view otherwise reads a strided
/// block of the cache on every decode step); `t` itself everywhere else.
pub(crate) fn contiguous<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    match flex(&t) {
        Some(f) if !f.is_contiguous() => {
            let shape = t.dims();
            let f = f.to_contiguous();
            match (Box::new(f) as Box<dyn Any>).downcast::<<B as BackendTypes>::FloatTensorPrimitive>() {
                Ok(p) => Tensor::from_primitive(TensorPrimitive::Float(*p)),
                Err(_) => {
                    debug_assert!(false, "a Flex tensor of {shape:?} did not downcast back");
                    t
                }
            }
        }
        _ => t,
    }
}

/// A raw output pointer that disjoint tasks write through.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes its own, disjoint elements, and the buffer outlives the tasks.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The element `i` places on (a method, so closures capture the whole `Out`).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `x · w` for `x` `[m, k]` with m ≤ [`MAX_ROWS`] and `w` `[k, n]`, stored row-major or as the
/// transposed view of a row-major `[n, k]` (a tied embedding). `None` where it does not apply.
pub(crate) fn matmul_few_rows<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let [m, k] = x.dims();
    let [k2, n] = w.dims();
    if m == 0 || m > MAX_ROWS || k != k2 || k == 0 || n == 0 {
        return None;
    }
    let wf = flex(w)?;
    let xf = flex(x)?.to_contiguous();
    let xs = xf.as_slice::<f32>()?;
    let mut y = vec![0f32; m * n];
    if let Some(ws) = wf.as_slice::<f32>() {
        xw(xs, ws, m, k, n, &mut y);
    } else {
        // The transposed view of a row-major [n, k]: strides (1, k).
        let layout = wf.layout();
        if layout.strides() != [1, k as isize] {
            return None;
        }
        let start = layout.start_offset();
        let ws = wf.storage::<f32>().get(start..start + n * k)?;
        xwt(xs, ws, m, k, n, &mut y);
    }
    tensor_of(y, [m, n])
}

/// Up to 5 rows, column tiles of 32 (four 8-lane vectors) and row blocks of 3: 12
/// accumulators in up to 12 independent chains, the 3 broadcast rows and one weight vector
/// fill AVX2's 16 registers.
const WIDE_COLS: usize = 32;
const WIDE_ROWS: usize = 3;

/// From 6 rows, column tiles of 16 (two vectors, one cache line of a weight row) and row
/// blocks of up to 6: each weight line read serves up to 12 FMAs, and a decode step's 16 rows
/// pass over the weights 3 times instead of 6. Fewer rows keep the 32-column tile, whose
/// four vectors per row give one row four independent chains instead of two.
const NARROW_COLS: usize = 16;
const NARROW_ROWS: usize = 6;

/// `y = x · w`, all row-major: sixteen lanes where AVX-512F is present, eight elsewhere —
/// the same FMA chains either way.
fn xw(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) {
    if wide() {
        projection16::xw16(x, w, m, k, n, y)
    } else {
        xw8(x, w, m, k, n, y)
    }
}

/// The panels of `y = x · w` (x `[m, k]`, w `[k, n]`, y `[m, n]`, all row-major): column tiles
/// of `cols_per_tile` columns split over rayon's threads, each tile's rows in blocks of at most
/// `block`, as even as they can be (16 rows in blocks of 6: 6, 5, 5), so no block is left with
/// one row and few chains. `panel(rows, x, w, y, cols)` gets a block's first row of x, the
/// tile's first column of w and the block's corner of y; it may read rows × k of x, k × cols
/// of w (row stride n) and write rows × cols of y (row stride n), which no other panel writes.
fn for_each_panel(x: &[f32], w: &[f32], y: &mut [f32], [m, k, n]: [usize; 3], (cols_per_tile, block): (usize, usize), panel: impl Fn(usize, *const f32, *const f32, *mut f32, usize) + Sync) {
    debug_assert!(x.len() >= m * k && w.len() >= k * n && y.len() >= m * n, "x · w: operands shorter than their shapes");
    let blocks = m.div_ceil(block);
    let (base, extra) = (m / blocks.max(1), m % blocks.max(1));
    let tiles = n.div_ceil(cols_per_tile);
    let out = Out(y.as_mut_ptr());
    let per_task = tiles.div_ceil(4 * rayon::current_num_threads()).max(1);
    (0..tiles).into_par_iter().with_min_len(per_task).for_each(|tile| {
        let j = tile * cols_per_tile;
        let cols = cols_per_tile.min(n - j);
        let mut r0 = 0;
        for bi in 0..blocks {
            let rows = base + usize::from(bi < extra);
            // In bounds: r0 + rows ≤ m and j + cols ≤ n, within the lengths the callers give.
            panel(rows, x.as_ptr().wrapping_add(r0 * k), w.as_ptr().wrapping_add(j), out.at(r0 * n + j), cols);
            r0 += rows;
        }
    });
}

/// [`xw`] on AVX2's eight lanes.
fn xw8(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) {
    let (cols_per_tile, block) = if m < NARROW_ROWS { (WIDE_COLS, WIDE_ROWS) } else { (NARROW_COLS, NARROW_ROWS) };
    for_each_panel(x, w, y, [m, k, n], (cols_per_tile, block), |rows, xp, wp, yp, cols| {
        let full = cols == cols_per_tile;
        // SAFETY: AVX2 and FMA were detected (`flex` checks them); `for_each_panel` hands
        // this panel rows ≤ `block` rows of x, cols ≤ `cols_per_tile` columns of w and the
        // matching block of y, which no other panel writes.
        unsafe {
            // A full panel (all but the last) has no masks in the loop: with them, the
            // accumulators did not fit the 16 registers and spilled to the stack.
            match (cols_per_tile == WIDE_COLS, full, rows) {
                (true, true, 1) => xw_tile_wide::<1, true>(xp, k, wp, n, cols, yp),
                (true, true, 2) => xw_tile_wide::<2, true>(xp, k, wp, n, cols, yp),
                (true, true, _) => xw_tile_wide::<3, true>(xp, k, wp, n, cols, yp),
                (true, false, 1) => xw_tile_wide::<1, false>(xp, k, wp, n, cols, yp),
                (true, false, 2) => xw_tile_wide::<2, false>(xp, k, wp, n, cols, yp),
                (true, false, _) => xw_tile_wide::<3, false>(xp, k, wp, n, cols, yp),
                (false, true, 1) => xw_tile_narrow::<1, true>(xp, k, wp, n, cols, yp),
                (false, true, 2) => xw_tile_narrow::<2, true>(xp, k, wp, n, cols, yp),
                (false, true, 3) => xw_tile_narrow::<3, true>(xp, k, wp, n, cols, yp),
                (false, true, 4) => xw_tile_narrow::<4, true>(xp, k, wp, n, cols, yp),
                (false, true, 5) => xw_tile_narrow::<5, true>(xp, k, wp, n, cols, yp),
                (false, true, _) => xw_tile_narrow::<6, true>(xp, k, wp, n, cols, yp),
                (false, false, 1) => xw_tile_narrow::<1, false>(xp, k, wp, n, cols, yp),
                (false, false, 2) => xw_tile_narrow::<2, false>(xp, k, wp, n, cols, yp),
                (false, false, 3) => xw_tile_narrow::<3, false>(xp, k, wp, n, cols, yp),
                (false, false, 4) => xw_tile_narrow::<4, false>(xp, k, wp, n, cols, yp),
                (false, false, 5) => xw_tile_narrow::<5, false>(xp, k, wp, n, cols, yp),
                (false, false, _) => xw_tile_narrow::<6, false>(xp, k, wp, n, cols, yp),
            }
        }
    });
}

/// Weight rows ahead of the one in use that a tile asks the cache for.
const PREFETCH_ROWS: usize = 16;

/// Asks for the panel's cache line `PREFETCH_ROWS` weight rows ahead: the rows lie `n`
/// floats apart (often more than a 4 KiB page), which the hardware prefetchers do not follow.
/// A prefetch never faults, so one past the end of `w` is harmless.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn prefetch_ahead(row: *const f32, n: usize) {
    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(PREFETCH_ROWS * n) as *const i8);
}

/// Lane mask of an 8-lane vector whose first `left` lanes (at most 8) are in bounds.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn lanes(left: usize) -> __m256i {
    _mm256_cmpgt_epi32(_mm256_set1_epi32(left.min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// Eight floats from `p`, or only the lanes of `mask` (the rest zero) when not `full`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load8(p: *const f32, full: bool, mask: __m256i) -> __m256 {
    if full {
        _mm256_loadu_ps(p)
    } else {
        _mm256_maskload_ps(p, mask)
    }
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// Eight [`hsum`]s at once: lane `j` is `hsum(v[j])`, by the same additions of the same
/// operands (high half onto low half, lanes 2–3 onto 0–1, lane 1 onto lane 0), so the same
/// bits; a score no longer waits on a chain of shuffles and adds of its own.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum8(v: &[__m256; 8]) -> __m256 {
    // [lo(a) + hi(a) | lo(b) + hi(b)]
    let halves = |a: __m256, b: __m256| _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(a, b), _mm256_permute2f128_ps::<0x31>(a, b));
    // Per 128-bit lane: [x0 + x2, x1 + x3, y0 + y2, y1 + y3]
    let pairs = |x: __m256, y: __m256| _mm256_add_ps(_mm256_shuffle_ps::<0b01_00_01_00>(x, y), _mm256_shuffle_ps::<0b11_10_11_10>(x, y));
    let (a, b, c, d) = (halves(v[0], v[4]), halves(v[1], v[5]), halves(v[2], v[6]), halves(v[3], v[7]));
    let (ab, cd) = (pairs(a, b), pairs(c, d));
    _mm256_add_ps(_mm256_shuffle_ps::<0b10_00_10_00>(ab, cd), _mm256_shuffle_ps::<0b11_01_11_01>(ab, cd))
}

/// `R` rows of `x` (row stride `k`) times a `[k, cols ≤ 32]` panel of `w` (row stride `n`)
/// into `R` rows of `y` (row stride `n`). Every output is one FMA chain over `k` in order,
/// as in [`xw_tile_narrow`], so the choice of tile never changes a result. A partial panel
/// (the last of a width off the grid) loads and stores through lane masks, so nothing
/// outside `cols` is touched.
#[target_feature(enable = "avx2,fma")]
unsafe fn xw_tile_wide<const R: usize, const FULL: bool>(x: *const f32, k: usize, w: *const f32, n: usize, cols: usize, y: *mut f32) {
    let masks = [lanes(cols), lanes(cols.saturating_sub(8)), lanes(cols.saturating_sub(16)), lanes(cols.saturating_sub(24))];
    let full = FULL;
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    for kk in 0..k {
        let row = w.add(kk * n);
        prefetch_ahead(row, n);
        prefetch_ahead(row.wrapping_add(16), n);
        let mut xv = [_mm256_setzero_ps(); R];
        for (r, v) in xv.iter_mut().enumerate() {
            *v = _mm256_set1_ps(*x.add(r * k + kk));
        }
        for c in 0..4 {
            // wrapping_add: in a partial panel a vector past `cols` loads no lane, and its
            // address may lie past the end of `w`, which `add` does not allow.
            let wv = load8(row.wrapping_add(c * 8), full, masks[c]);
            for r in 0..R {
                acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
            }
        }
    }
    store_rows(&acc, full, &masks, n, y);
}

/// As [`xw_tile_wide`] for a `[k, cols ≤ 16]` panel: two vectors per row, up to 6 rows.
#[target_feature(enable = "avx2,fma")]
unsafe fn xw_tile_narrow<const R: usize, const FULL: bool>(x: *const f32, k: usize, w: *const f32, n: usize, cols: usize, y: *mut f32) {
    let masks = [lanes(cols), lanes(cols.saturating_sub(8))];
    let full = FULL;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for kk in 0..k {
        let row = w.add(kk * n);
        prefetch_ahead(row, n);
        let w0 = load8(row, full, masks[0]);
        let w1 = load8(row.wrapping_add(8), full, masks[1]);
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = _mm256_set1_ps(*x.add(r * k + kk));
            acc[0] = _mm256_fmadd_ps(xv, w0, acc[0]);
            acc[1] = _mm256_fmadd_ps(xv, w1, acc[1]);
        }
    }
    store_rows(&acc, full, &masks, n, y);
}

/// Stores a tile's accumulators, row `r` at `y + r·n`, through the lane masks unless `full`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_rows<const R: usize, const V: usize>(acc: &[[__m256; V]; R], full: bool, masks: &[__m256i; V], n: usize, y: *mut f32) {
    for (r, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            if full {
                _mm256_storeu_ps(y.add(r * n + c * 8), a);
            } else {
                _mm256_maskstore_ps(y.wrapping_add(r * n + c * 8), masks[c], a);
            }
        }
    }
}

/// Rows of `wt` per tile of the transposed product, and rows of x per block: 12 accumulators.
const TILE_ROWS_T: usize = 4;
const ROW_BLOCK_T: usize = 3;

fn xwt(x: &[f32], wt: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) {
    let tiles = n.div_ceil(TILE_ROWS_T);
    let out = Out(y.as_mut_ptr());
    let per_task = tiles.div_ceil(4 * rayon::current_num_threads()).max(1);
    (0..tiles).into_par_iter().with_min_len(per_task).for_each(|tile| {
        let j = tile * TILE_ROWS_T;
        let cols = TILE_ROWS_T.min(n - j);
        for r0 in (0..m).step_by(ROW_BLOCK_T) {
            let rows = ROW_BLOCK_T.min(m - r0);
            // SAFETY: as in `xw`; wt is [n, k], and this task alone writes columns j..j + cols.
            unsafe {
                let (xp, wp, yp) = (x.as_ptr().add(r0 * k), wt.as_ptr().add(j * k), out.at(r0 * n + j));
                // Rows and columns as constants: with a run-time column count the loop
                // branched per column and two accumulators spilled to the stack.
                match (rows, cols) {
                    (1, 1) => xwt_tile::<1, 1>(xp, k, wp, n, yp),
                    (1, 2) => xwt_tile::<1, 2>(xp, k, wp, n, yp),
                    (1, 3) => xwt_tile::<1, 3>(xp, k, wp, n, yp),
                    (1, _) => xwt_tile::<1, 4>(xp, k, wp, n, yp),
                    (2, 1) => xwt_tile::<2, 1>(xp, k, wp, n, yp),
                    (2, 2) => xwt_tile::<2, 2>(xp, k, wp, n, yp),
                    (2, 3) => xwt_tile::<2, 3>(xp, k, wp, n, yp),
                    (2, _) => xwt_tile::<2, 4>(xp, k, wp, n, yp),
                    (_, 1) => xwt_tile::<3, 1>(xp, k, wp, n, yp),
                    (_, 2) => xwt_tile::<3, 2>(xp, k, wp, n, yp),
                    (_, 3) => xwt_tile::<3, 3>(xp, k, wp, n, yp),
                    (_, _) => xwt_tile::<3, 4>(xp, k, wp, n, yp),
                }
            }
        }
    });
}

/// `y[r, c] = x[r, :] · wt[c, :]` for `R` rows of x and `C ≤ 4` rows of wt (both of length
/// `k`), into `y` (row stride `n`): eight lane sums per output over whole vectors, then the
/// masked tail, then [`hsum`].
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // `r` and `c` index two arrays each
unsafe fn xwt_tile<const R: usize, const C: usize>(x: *const f32, k: usize, wt: *const f32, n: usize, y: *mut f32) {
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut kk = 0;
    while kk + 8 <= k {
        let mut xv = [_mm256_setzero_ps(); R];
        for (r, v) in xv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(x.add(r * k + kk));
        }
        for c in 0..C {
            let wv = _mm256_loadu_ps(wt.add(c * k + kk));
            for r in 0..R {
                acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
            }
        }
        kk += 8;
    }
    if kk < k {
        let mask = lanes(k - kk);
        let mut xv = [_mm256_setzero_ps(); R];
        for (r, v) in xv.iter_mut().enumerate() {
            *v = _mm256_maskload_ps(x.add(r * k + kk), mask);
        }
        for c in 0..C {
            let wv = _mm256_maskload_ps(wt.add(c * k + kk), mask);
            for r in 0..R {
                acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            *y.add(r * n + c) = hsum(a);
        }
    }
}

/// HF's rotate-half RoPE, `x·cos + cat(−x₂, x₁)·sin`, for a row-major `x` `[b, s, h, d]`
/// and tables `[b, s, 1, d]` (every head of a position rotated alike). Each term is rounded
/// as burn's element-wise ops round it (a product each, then their sum), so the result is
/// bit for bit theirs; burn's path broadcasts the tables through a strided iterator, 15 % of
/// a 600-token prefill here. `None` where it does not apply.
pub(crate) fn rope<B: Backend>(x: &Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    per_head_with_tables(x, cos, sin, |xh, c, sn, oh| {
        let half = xh.len() / 2;
        for j in 0..half {
            oh[j] = xh[j] * c[j] + (-xh[j + half]) * sn[j];
            oh[j + half] = xh[j + half] * c[j + half] + xh[j] * sn[j + half];
        }
    })
}

/// The gradient of [`rope`] with respect to `x`, for the gradient `g` of its output:
/// `g·cos + rotate_halfᵀ(g·sin)`, i.e. `g[j]·cos[j] + g[j+½]·sin[j+½]` in the first half of
/// a head and `g[j]·cos[j] + (−(g[j−½]·sin[j−½]))` in the second. Rounded as burn's autodiff
/// of the composed ops rounds it: each product, then the sum, then `+ 0` (burn adds each
/// slice's gradient padded with zeros, which turns a −0 sum into +0). `None` where it does
/// not apply.
pub(crate) fn rope_backward<B: Backend>(g: &Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    per_head_with_tables(g, cos, sin, |gh, c, sn, oh| {
        let half = gh.len() / 2;
        for j in 0..half {
            oh[j] = (gh[j] * c[j] + gh[j + half] * sn[j + half]) + 0.0;
            oh[j + half] = (gh[j + half] * c[j + half] + -(gh[j] * sn[j])) + 0.0;
        }
    })
}

/// `head(x_head, cos, sin, out_head)` for every head of a row-major `[b, s, h, d]` `x` with
/// its position's rows of the `[b, s, 1, d]` tables, positions split over rayon's threads;
/// `None` where the shapes or the backend do not fit.
fn per_head_with_tables<B: Backend>(x: &Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>, head: impl Fn(&[f32], &[f32], &[f32], &mut [f32]) + Sync) -> Option<Tensor<B, 4>> {
    let [b, s, h, d] = x.dims();
    if b * s * h * d == 0 || d % 2 != 0 || cos.dims() != [b, s, 1, d] || sin.dims() != [b, s, 1, d] {
        return None;
    }
    let (xf, cf, sf) = (flex(x)?.to_contiguous(), flex(cos)?.to_contiguous(), flex(sin)?.to_contiguous());
    let (xs, cs, ss) = (xf.as_slice::<f32>()?, cf.as_slice::<f32>()?, sf.as_slice::<f32>()?);
    if xs.len() != b * s * h * d || cs.len() != b * s * d || ss.len() != b * s * d {
        return None;
    }
    let row = h * d;
    let mut out = vec![0f32; b * s * row];
    let per_task = (b * s).div_ceil(4 * rayon::current_num_threads()).max(1);
    out.par_chunks_mut(row).with_min_len(per_task).enumerate().for_each(|(i, o)| {
        let (xr, c, sn) = (&xs[i * row..(i + 1) * row], &cs[i * d..(i + 1) * d], &ss[i * d..(i + 1) * d]);
        for (xh, oh) in xr.chunks_exact(d).zip(o.chunks_exact_mut(d)) {
            head(xh, c, sn, oh);
        }
    });
    tensor_of(out, [b, s, h, d])
}

/// A strided `[d0, d1, d2, d3]` f32 view whose last dimension is contiguous.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    strides: [usize; 3],
    dims: [usize; 4],
}

impl<'a> View<'a> {
    fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let s = layout.strides();
        let dims: [usize; 4] = layout.shape().to_vec().try_into().ok()?;
        if s.len() != 4 || s[3] != 1 || s[..3].iter().any(|&v| v < 0) {
            return None;
        }
        let strides = [s[0] as usize, s[1] as usize, s[2] as usize];
        let start = layout.start_offset();
        // Every element must lie inside the storage.
        let last = start + (0..3).map(|i| strides[i] * dims[i].saturating_sub(1)).sum::<usize>() + dims[3];
        let data = t.storage::<f32>();
        (last <= data.len()).then_some(Self { data, start, strides, dims })
    }

    /// The contiguous last-dimension row at `(a, b, c)`.
    #[inline(always)]
    fn row(&self, a: usize, b: usize, c: usize) -> &'a [f32] {
        let at = self.start + a * self.strides[0] + b * self.strides[1] + c * self.strides[2];
        &self.data[at..at + self.dims[3]]
    }
}

/// Attention of `q` `[b, h, s, d]` (s new queries per sequence) over blocks of `[b, kv, n, d]`
/// keys and values, `keys` in all (the cache and the new positions; one block without a
/// cache): the same result as `grouped_attention` (mask `[b, 1, s, keys]`, `true` = blocked;
/// without one the queries are the last `s` positions, causal). Each task is one (sequence,
/// KV head, run of queries) and reads each key and value row once for all the query heads
/// that share it. A causal prefill of [`GEMM_MIN_QUERIES`] or more positions with no cache
/// before it takes the block products of `training_attention` (the same values within
/// float rounding, not the same bits). `None` where it does not apply.
pub(crate) fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    blocks: &[(Tensor<B, 4>, Tensor<B, 4>)],
    keys: usize,
    mask: Option<&Tensor<B, 4, Bool>>,
) -> Option<Tensor<B, 4>> {
    // A long causal prefill without a cache before it: block products (gemm) instead of
    // one query row at a time.
    if let ([(k, v)], None) = (blocks, mask) {
        if q.dims()[2] >= GEMM_MIN_QUERIES && k.dims()[2] == q.dims()[2] {
            if let Some(out) = training_attention::attention_forward(q, k, v) {
                return Some(out);
            }
        }
    }
    attention_paths::<B, true>(q, blocks, keys, mask)
}

/// New positions from which a prefill's attention takes the block products: a block of
/// queries or more.
const GEMM_MIN_QUERIES: usize = training_attention::QUERY_BLOCK;

/// [`attention`], with (`FAST`) or without the paths for head sizes 32 and 64 and groups of
/// up to 3 heads; a test holds the two to equal bits.
fn attention_paths<B: Backend, const FAST: bool>(
    q: &Tensor<B, 4>,
    blocks: &[(Tensor<B, 4>, Tensor<B, 4>)],
    keys: usize,
    mask: Option<&Tensor<B, 4, Bool>>,
) -> Option<Tensor<B, 4>> {
    let [b, h, s, d] = q.dims();
    let qf = flex(q)?;
    let kv_of = |t: &Tensor<B, 4>| flex(t);
    let kvs: Vec<(FlexTensor, FlexTensor)> = blocks.iter().map(|(k, v)| Some((kv_of(k)?, kv_of(v)?))).collect::<Option<_>>()?;
    let first = kvs.first()?;
    let kv = first.0.layout().shape()[1];
    if b * h * s * d == 0 || d % 8 != 0 || d > MAX_HEAD_DIM || kv == 0 || h % kv != 0 || h / kv > MAX_REP {
        return None;
    }
    let qv = View::of(&qf)?;
    let views: Vec<(View, View)> = kvs.iter().map(|(k, v)| Some((View::of(k)?, View::of(v)?))).collect::<Option<_>>()?;
    let total: usize = views.iter().map(|(k, _)| k.dims[2]).sum();
    if total != keys || views.iter().any(|(k, v)| k.dims[..2] != [b, kv] || v.dims != k.dims || k.dims[3] != d) {
        return None;
    }
    let mask_f = match mask {
        Some(m) => {
            let f = flex_bool(m)?.to_contiguous();
            if f.layout().shape().to_vec() != [b, 1, s, keys] {
                return None;
            }
            Some(f)
        }
        None => None,
    };
    let blocked: Option<&[u8]> = match &mask_f {
        Some(f) => {
            let start = f.layout().start_offset();
            Some(f.storage::<u8>().get(start..start + b * s * keys)?)
        }
        None => None,
    };
    let rep = h / kv;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; b * h * s * d];
    // Tasks: (sequence, KV head, run of queries). A prefill has hundreds of queries per
    // sequence; cutting them into runs keeps every core busy when there are few sequences.
    let runs = s.div_ceil(QUERY_RUN);
    // Head sizes 32 and 64 (SmolLM2's 64): query positions in groups, keys and values in chunks.
    let grouped = FAST && (d == 64 || d == 32);
    let dst = Out(out.as_mut_ptr());
    (0..b * kv * runs).into_par_iter().for_each(|task| {
        let (bi, g, run) = (task / (kv * runs), task / runs % kv, task % runs);
        let end = ((run + 1) * QUERY_RUN).min(s);
        let qv = &qv;
        let queries = |t: usize| (0..rep).map(move |r| qv.row(bi, g * rep + r, t));
        let blocked_row = |t: usize| -> Option<&[u8]> { blocked.map(|m| &m[(bi * s + t) * keys..(bi * s + t + 1) * keys]) };
        // Without a mask the new positions are the last `s`, causal: later keys are blocked.
        let visible = |t: usize| if blocked.is_some() { keys } else { keys - s + t + 1 };
        // The output is laid out [b, s, h, d]: heads g·rep.. of position t are `rep`
        // consecutive rows from ((bi·s + t)·h + g·rep)·d.
        let out_at = |t: usize| dst.at(((bi * s + t) * h + g * rep) * d);
        if grouped {
            let (mut krows, mut vrows) = (Vec::with_capacity(keys), Vec::with_capacity(keys));
            for (k, v) in &views {
                for pos in 0..k.dims[2] {
                    krows.push(k.row(bi, g, pos).as_ptr());
                    vrows.push(v.row(bi, g, pos).as_ptr());
                }
            }
            // A decode step has one position per task: scores for that one only.
            let per_group = (GROUP_ROWS / rep).clamp(1, end - run * QUERY_RUN);
            let mut scores = vec![0f32; per_group * rep * keys];
            for first in (run * QUERY_RUN..end).step_by(per_group) {
                let positions = first..(first + per_group).min(end);
                let rows: Vec<&[f32]> = positions.clone().flat_map(queries).collect();
                let outs: Vec<*mut f32> = positions.clone().flat_map(|t| (0..rep).map(move |r| out_at(t).wrapping_add(r * d))).collect();
                let masks: Vec<Option<&[u8]>> = positions.clone().map(blocked_row).collect();
                let seen: Vec<usize> = positions.map(visible).collect();
                // SAFETY: AVX2 and FMA were detected; d is 32 or 64; every key and value row
                // pointer is a whole row of `d` floats in its block; this task alone writes these
                // positions' rows, inside `out` (zeroed).
                unsafe { attend_group(&rows, rep, &krows, &vrows, &masks, &seen, scale, &mut scores[..rows.len() * keys], &outs) };
            }
        } else {
            let mut scores = vec![0f32; rep * keys];
            for t in run * QUERY_RUN..end {
                let heads: Vec<&[f32]> = queries(t).collect();
                // SAFETY: AVX2 and FMA were detected; every row is `d` long, d % 8 == 0, d ≤ MAX_HEAD_DIM;
                // this task alone writes those `rep` rows, inside `out`.
                unsafe { attend::<FAST>(&heads, &views, bi, g, blocked_row(t), visible(t), scale, &mut scores, out_at(t)) };
            }
        }
    });
    // Written as [b, s, h, d] and handed out as its [b, h, s, d] view: the caller's merge of
    // the heads (swap back, reshape) is then free instead of a strided copy.
    Some(tensor_of::<B, 4>(out, [b, s, h, d])?.swap_dims(1, 2))
}

/// Queries of one sequence per attention task.
const QUERY_RUN: usize = 32;

/// Head sizes up to this take the attention kernel.
const MAX_HEAD_DIM: usize = 256;

/// One query position `t` of one (sequence `bi`, KV head `g`): the scores of its `rep` query
/// heads against each key read once, softmax, then each value row read once for all heads.
/// Head r's output goes to row `r` of `out` (`[rep, d]`).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend<const FAST: bool>(
    queries: &[&[f32]],
    views: &[(View, View)],
    bi: usize,
    g: usize,
    blocked: Option<&[u8]>,
    visible: usize,
    scale: f32,
    scores: &mut [f32],
    out: *mut f32,
) {
    let rep = queries.len();
    let d = queries[0].len();
    let keys = scores.len() / rep;
    // (Head sizes 32 and 64 take `attend_group` on the fast path.)
    let mut p = 0;
    for (kb, _) in views {
        for pos in 0..kb.dims[2] {
            let krow = kb.row(bi, g, pos).as_ptr();
            let open = p < visible && blocked.is_none_or(|m| m[p] == 0);
            for (r, q) in queries.iter().enumerate() {
                scores[r * keys + p] = if open {
                    // Two chains, so the sum does not wait on one FMA after another.
                    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    let mut c = 0;
                    while c + 16 <= d {
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(c)), _mm256_loadu_ps(krow.add(c)), a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(c + 8)), _mm256_loadu_ps(krow.add(c + 8)), a1);
                        c += 16;
                    }
                    if c < d {
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(c)), _mm256_loadu_ps(krow.add(c)), a0);
                    }
                    hsum(_mm256_add_ps(a0, a1)) * scale
                } else {
                    f32::NEG_INFINITY
                };
            }
            p += 1;
        }
    }
    // Keys from `visible` on are blocked for every head: their weights would be exactly 0.
    if FAST {
        let mut rows: Vec<&mut [f32]> = scores.chunks_mut(keys).map(|row| &mut row[..visible]).collect();
        softmax_rows(&mut rows);
    } else {
        for r in 0..rep {
            softmax_in_place(&mut scores[r * keys..r * keys + visible]);
        }
    }
    // Up to 3 heads (SmolLM2's groups) together, 32 columns at a time: each value row is
    // read once per 32 columns for all heads, and 12 accumulators stay in registers.
    if FAST && rep <= 3 && d.is_multiple_of(32) {
        for col in (0..d).step_by(32) {
            match rep {
                1 => weigh_values_heads::<1>(scores, keys, visible, views, bi, g, col, d, out),
                2 => weigh_values_heads::<2>(scores, keys, visible, views, bi, g, col, d, out),
                _ => weigh_values_heads::<3>(scores, keys, visible, views, bi, g, col, d, out),
            }
        }
        return;
    }
    // Otherwise one head at a time, so a chunk of its output stays in registers while the value rows
    // stream past (each value row is read once per head, from cache after the first).
    let lanes = d / 8;
    for r in 0..rep {
        let weights = &scores[r * keys..r * keys + visible];
        let row = out.add(r * d);
        let mut c0 = 0;
        while c0 + 8 <= lanes {
            weigh_values::<8>(weights, views, bi, g, c0 * 8, row);
            c0 += 8;
        }
        while c0 < lanes {
            weigh_values::<1>(weights, views, bi, g, c0 * 8, row);
            c0 += 1;
        }
    }
}

/// Query rows (position × head) the fast path takes together: each chunk of keys and values
/// is read by all of them while it is in L1.
const GROUP_ROWS: usize = 12;

/// Keys (and values) per chunk: 64 rows of SmolLM2's 64 floats are 16 KiB, half of L1.
const KEY_CHUNK: usize = 64;

/// A few consecutive query positions of one (sequence, KV head) for head sizes 32 and 64:
/// `queries` are their rows position-major (row `j` is position `j / rep`, head `j % rep`),
/// `krows`/`vrows` the sequence's key and value rows in order, `visible[i]` the keys position
/// `i` sees and `blocked[i]` its padding mask. The scores, softmax and weighed values are
/// [`attend`]'s element by element (each score is one query's two-chain dot product summed
/// as [`hsum`] sums it, each output sums the positions in order and skips zero weights), but
/// the work goes chunk by chunk of [`KEY_CHUNK`] keys over every row, so a key or value row is
/// fetched from memory once for the whole group instead of once per row. `scores` holds one
/// row of `krows.len()` per query row; `outs[j]` is row `j`'s output (`d` floats, zero on entry).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group(
    queries: &[&[f32]],
    rep: usize,
    krows: &[*const f32],
    vrows: &[*const f32],
    blocked: &[Option<&[u8]>],
    visible: &[usize],
    scale: f32,
    scores: &mut [f32],
    outs: &[*mut f32],
) {
    let keys = krows.len();
    let d = queries[0].len();
    let longest = visible.iter().copied().max().unwrap_or(0);
    for start in (0..longest).step_by(KEY_CHUNK) {
        for (j, q) in queries.iter().enumerate() {
            let end = visible[j / rep].min(start + KEY_CHUNK);
            if start >= end {
                continue;
            }
            let row = &mut scores[j * keys + start..j * keys + end];
            let mask = blocked[j / rep].map(|m| &m[start..end]);
            if d == 64 {
                chunk_scores::<8>(q, &krows[start..end], mask, scale, row);
            } else {
                chunk_scores::<4>(q, &krows[start..end], mask, scale, row);
            }
        }
    }
    let mut rows: Vec<&mut [f32]> = scores.chunks_mut(keys).enumerate().map(|(j, row)| &mut row[..visible[j / rep]]).collect();
    softmax_rows(&mut rows);
    let weights: Vec<&[f32]> = rows.into_iter().map(|r| &*r).collect();
    for start in (0..longest).step_by(KEY_CHUNK) {
        let chunk = &vrows[start..(start + KEY_CHUNK).min(longest)];
        for (w, o) in weights.chunks(6).zip(outs.chunks(6)) {
            for col in (0..d).step_by(16) {
                match w.len() {
                    1 => chunk_values::<1>(w, chunk, start, col, o),
                    2 => chunk_values::<2>(w, chunk, start, col, o),
                    3 => chunk_values::<3>(w, chunk, start, col, o),
                    4 => chunk_values::<4>(w, chunk, start, col, o),
                    5 => chunk_values::<5>(w, chunk, start, col, o),
                    _ => chunk_values::<6>(w, chunk, start, col, o),
                }
            }
        }
    }
}

/// Scores of one query head (`8·NV` wide, held in registers) against `krows`, written to
/// `row`: `q·k · scale`, or −∞ where `blocked`. Eight keys' lane sums go through [`hsum8`]
/// together, a last few through [`hsum`] (the same bits either way).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_scores<const NV: usize>(q: &[f32], krows: &[*const f32], blocked: Option<&[u8]>, scale: f32, row: &mut [f32]) {
    let mut qv = [_mm256_setzero_ps(); NV];
    for (c, v) in qv.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(q.as_ptr().add(c * 8));
    }
    // A blocked key's dot product is not taken (a row joining a running batch can be mostly
    // left padding); its lane sums are zero and its score is overwritten with −∞ below.
    let open = |p: usize| blocked.is_none_or(|m| m[p] == 0);
    let mut eights = krows.chunks_exact(8);
    let mut p = 0;
    for keys in eights.by_ref() {
        if (p..p + 8).any(open) {
            let lanes: [__m256; 8] = std::array::from_fn(|i| if open(p + i) { dot_lanes(&qv, keys[i]) } else { _mm256_setzero_ps() });
            _mm256_storeu_ps(row.as_mut_ptr().add(p), _mm256_mul_ps(hsum8(&lanes), _mm256_set1_ps(scale)));
        }
        p += 8;
    }
    for &k in eights.remainder() {
        if open(p) {
            row[p] = hsum(dot_lanes(&qv, k)) * scale;
        }
        p += 1;
    }
    if let Some(m) = blocked {
        for (x, &b) in row.iter_mut().zip(m) {
            if b != 0 {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// `q · k` before its horizontal sum: two FMA chains over alternate vectors of the row,
/// added lane by lane.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_lanes<const NV: usize>(qv: &[__m256; NV], krow: *const f32) -> __m256 {
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for c in (0..NV).step_by(2) {
        a0 = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(krow.add(c * 8)), a0);
        if c + 1 < NV {
            a1 = _mm256_fmadd_ps(qv[c + 1], _mm256_loadu_ps(krow.add(c * 8 + 8)), a1);
        }
    }
    _mm256_add_ps(a0, a1)
}

/// Columns `col..col + 16` of `Σ_p w[r][p] · V[p]` over the value rows `vrows` (positions
/// `start..`), added to `outs[r] + col`: `ROWS` × 2 accumulators, two value vectors and a
/// broadcast fit AVX2's 16 registers. A weight row ends where its position stops seeing
/// keys; a zero or missing weight is skipped, as [`weigh_values`] skips it.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn chunk_values<const ROWS: usize>(weights: &[&[f32]], vrows: &[*const f32], start: usize, col: usize, outs: &[*mut f32]) {
    let mut acc: [[__m256; 2]; ROWS] = std::array::from_fn(|r| [_mm256_loadu_ps(outs[r].add(col)), _mm256_loadu_ps(outs[r].add(col + 8))]);
    let weights: [&[f32]; ROWS] = std::array::from_fn(|r| weights[r]);
    for (i, &vrow) in vrows.iter().enumerate() {
        let p = start + i;
        let v = [_mm256_loadu_ps(vrow.add(col)), _mm256_loadu_ps(vrow.add(col + 8))];
        for r in 0..ROWS {
            let w = weights[r].get(p).copied().unwrap_or(0.0);
            if w != 0.0 {
                let wv = _mm256_set1_ps(w);
                acc[r][0] = _mm256_fmadd_ps(wv, v[0], acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(wv, v[1], acc[r][1]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(outs[r].add(col), a[0]);
        _mm256_storeu_ps(outs[r].add(col + 8), a[1]);
    }
}

/// Columns `col..col + 32` of `Σ_p w[r, p] · V[p]` for the `REP` heads of (sequence `bi`, KV
/// head `g`), weights `scores[r·keys..][..visible]`, stored at `out + r·d + col`. Each
/// element sums the positions in order and skips a zero weight, as [`weigh_values`] does,
/// so the results are the same.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn weigh_values_heads<const REP: usize>(scores: &[f32], keys: usize, visible: usize, views: &[(View, View)], bi: usize, g: usize, col: usize, d: usize, out: *mut f32) {
    let mut acc = [[_mm256_setzero_ps(); 4]; REP];
    let mut p = 0;
    'blocks: for (_, vb) in views {
        for pos in 0..vb.dims[2] {
            if p == visible {
                break 'blocks;
            }
            let mut w = [0f32; REP];
            for r in 0..REP {
                w[r] = scores[r * keys + p];
            }
            p += 1;
            if w.iter().all(|&x| x == 0.0) {
                continue;
            }
            let vrow = vb.row(bi, g, pos).as_ptr().add(col);
            let v = [_mm256_loadu_ps(vrow), _mm256_loadu_ps(vrow.add(8)), _mm256_loadu_ps(vrow.add(16)), _mm256_loadu_ps(vrow.add(24))];
            for r in 0..REP {
                if w[r] != 0.0 {
                    let wv = _mm256_set1_ps(w[r]);
                    for c in 0..4 {
                        acc[r][c] = _mm256_fmadd_ps(wv, v[c], acc[r][c]);
                    }
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(r * d + col + c * 8), a);
        }
    }
}

/// Columns `col..col + 8·CH` of `Σ_p weights[p] · V[p]` over the first `weights.len()` value
/// rows of (sequence `bi`, KV head `g`), stored at `row + col`. Positions are summed in order,
/// as a one-pass loop over all heads would.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn weigh_values<const CH: usize>(weights: &[f32], views: &[(View, View)], bi: usize, g: usize, col: usize, row: *mut f32) {
    let mut acc = [_mm256_setzero_ps(); CH];
    let mut p = 0;
    'blocks: for (_, vb) in views {
        for pos in 0..vb.dims[2] {
            if p == weights.len() {
                break 'blocks;
            }
            let w = weights[p];
            p += 1;
            if w != 0.0 {
                let vrow = vb.row(bi, g, pos).as_ptr().add(col);
                let wv = _mm256_set1_ps(w);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(vrow.add(c * 8)), *a);
                }
            }
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(row.add(col + c * 8), *a);
    }
}

/// Query heads per KV head the attention kernel takes (GQA groups; larger groups keep
/// burn's path).
const MAX_REP: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type B = crate::CpuBackend;

    fn max_diff(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Row counts across the row blocks, and widths off the 16-column and 8-lane grids.
    #[test]
    fn few_row_products_equal_burns_matmul() {
        let device = Default::default();
        for (m, k, n) in [(1, 40, 70), (3, 16, 64), (4, 576, 192), (5, 33, 129), (16, 64, 1), (MAX_ROWS, 24, 200)] {
            let x = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
            let wt = Tensor::<B, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
            let expected = x.clone().matmul(w.clone());
            let expected_t = x.clone().matmul(wt.clone().transpose());
            match (matmul_few_rows(&x, &w), matmul_few_rows(&x, &wt.clone().transpose())) {
                (Some(y), Some(yt)) => {
                    assert!(available());
                    assert!(max_diff(y, expected) < 1e-4, "x·w {m}×{k}×{n}");
                    assert!(max_diff(yt, expected_t) < 1e-4, "x·wtᵀ {m}×{k}×{n}");
                }
                (None, None) => assert!(!available(), "the kernels declined {m}×{k}×{n} on a CPU with AVX2 and FMA"),
                _ => panic!("one orientation ran and the other did not ({m}×{k}×{n})"),
            }
        }
        // More rows than a decode step: burn's GEMM.
        let x = Tensor::<B, 2>::zeros([MAX_ROWS + 1, 8], &device);
        assert!(matmul_few_rows(&x, &Tensor::<B, 2>::zeros([8, 8], &device)).is_none());
    }

    /// Each output of `x·w` is one FMA chain over k in order, and each of `x·wtᵀ` eight lane
    /// chains summed as `hsum` sums them: exact equality, so a change of tile shape that would
    /// change a result (and every greedy figure after it) fails here. Row counts cover every
    /// block size of both tile families (8 and 16 lanes), widths the partial panels.
    #[test]
    fn few_row_products_are_the_documented_fma_chains() {
        if !available() {
            return;
        }
        let value = |i: usize| ((i * 7919 % 1013) as f32 - 506.0) / 97.0;
        for (m, k, n) in [(16, 576, 40), (7, 33, 17), (13, 9, 48), (MAX_ROWS, 20, 5), (1, 70, 130), (2, 40, 67), (8, 96, 200)] {
            let x: Vec<f32> = (0..m * k).map(value).collect();
            let w: Vec<f32> = (0..k * n).map(|i| value(i + 5)).collect();
            let mut y = vec![0f32; m * n];
            xw8(&x, &w, m, k, n, &mut y);
            // The sixteen-lane tiles, where this CPU has them, must give the same chains.
            let mut y16 = vec![f32::NAN; m * n];
            if wide() {
                projection16::xw16(&x, &w, m, k, n, &mut y16);
                assert!(y16.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "16 lanes differ from 8 ({m}×{k}×{n})");
            }
            let mut yt = vec![0f32; m * n];
            // Read as wt [n, k]: the same values, transposed roles.
            xwt(&x, &w[..n * k], m, k, n, &mut yt);
            for r in 0..m {
                for c in 0..n {
                    let chain = (0..k).fold(0f32, |acc, i| x[r * k + i].mul_add(w[i * n + c], acc));
                    assert_eq!(y[r * n + c], chain, "x·w row {r} column {c} ({m}×{k}×{n})");
                    let mut lane = [0f32; 8];
                    for i in 0..k {
                        lane[i % 8] = x[r * k + i].mul_add(w[c * k + i], lane[i % 8]);
                    }
                    let s: Vec<f32> = (0..4).map(|l| lane[l] + lane[l + 4]).collect();
                    let summed = (s[0] + s[2]) + (s[1] + s[3]);
                    assert_eq!(yt[r * n + c], summed, "x·wtᵀ row {r} column {c} ({m}×{k}×{n})");
                }
            }
        }
    }


    /// The paths for head sizes 32 and 64 (query in registers, eight keys' sums at once,
    /// query positions in groups over chunks of keys and values) give the general path's
    /// bits: decode, a prefill in runs, pads and the causal mask.
    #[test]
    fn attention_fast_paths_equal_the_general_path_bit_for_bit() {
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        // Block lengths: keys within one chunk of the grouped path, and keys over three chunks
        // (off the 8-key grid) with a prefill longer than a run of queries.
        for (h, kv, d, lengths) in [(6, 2, 64, [9, 40]), (9, 3, 64, [9, 40]), (4, 2, 32, [9, 40]), (3, 3, 64, [9, 40]), (9, 3, 64, [128, 53]), (4, 1, 32, [61, 90])] {
            let b = 2;
            let blocks: Vec<(Tensor<B, 4>, Tensor<B, 4>)> = lengths
                .iter()
                .map(|&n| (Tensor::random([b, kv, n, d], normal, &device), Tensor::random([b, kv, n, d], normal, &device)))
                .collect();
            let keys: usize = lengths.iter().sum();
            // One query (decode), a prefill in runs and groups, and a count that leaves a short last group.
            for s in [1, 40, 5] {
                let q = Tensor::<B, 4>::random([b, h, s, d], normal, &device);
                let blocked: Vec<bool> = (0..b * s * keys).map(|i| (i / (s * keys) == 1 && i % keys < 3) || i % keys > keys - s + i / keys % s).collect();
                let mask = Tensor::<B, 4, Bool>::from_data(TensorData::new(blocked, [b, 1, s, keys]), &device);
                for mask in [None, Some(&mask)] {
                    let (Some(fast), Some(general)) = (attention_paths::<B, true>(&q, &blocks, keys, mask), attention_paths::<B, false>(&q, &blocks, keys, mask)) else {
                        assert!(!available(), "the kernel declined on a CPU with AVX2 and FMA");
                        return;
                    };
                    let (fast, general) = (fast.into_data().to_vec::<f32>().unwrap_or_default(), general.into_data().to_vec::<f32>().unwrap_or_default());
                    assert!(!fast.is_empty() && fast.len() == general.len());
                    let same = fast.iter().zip(&general).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "h {h}, kv {kv}, d {d}, s {s}, mask {}", mask.is_some());
                }
            }
        }
    }

    #[test]
    fn autodiff_tensors_are_left_to_burn() {
        type T = burn::backend::Autodiff<B>;
        let device = Default::default();
        let x = Tensor::<T, 2>::ones([2, 8], &device);
        assert!(matmul_few_rows(&x, &Tensor::<T, 2>::ones([8, 8], &device)).is_none());
    }
}

