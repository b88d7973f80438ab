//! The row-major projection `x · w` of a decode step ([`super::xw`]) on sixteen lanes, where
//! AVX-512F is present.
//!
//! A decode step's projections stream every weight once. At batch 8 the AVX2 tiles (16
//! columns: one 64-byte line of each weight row, then a jump of a whole row to the next)
//! spent ~80 % of their `perf` samples on those two loads, and read the weights at ~8 GB/s on
//! a machine that streams 25. These tiles take 64 columns — four adjacent lines of each row —
//! with 4 × up to 6 accumulators in AVX-512's 32 registers, and ask for the lines 32 rows
//! ahead. Each output is still one FMA chain over `k` in order from zero, the AVX2 tiles'
//! sums bit for bit, so the CPU that ran a step never changes its tokens.

use std::arch::x86_64::*;

/// 16-lane vectors per weight row of a tile: 64 columns, four cache lines side by side.
const VECTORS: usize = 4;
const COLS: usize = 16 * VECTORS;
/// Rows of `x` per block: 24 accumulators, four weight vectors and a broadcast fit the 32
/// registers.
const ROWS: usize = 6;

/// Weight rows ahead of the one in use that a tile asks the cache for (a row lies `n` floats
/// past the one before, often past a 4 KiB page, where the hardware prefetchers stop).
const PREFETCH_ROWS: usize = 32;

/// `y = x · w` for `x` `[m, k]`, `w` `[k, n]` and `y` `[m, n]`, all row-major; `y` is written
/// whole. Callers check [`super::wide`] first.
pub(super) fn xw16(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) {
    super::for_each_panel(x, w, y, [m, k, n], (COLS, ROWS), |rows, xp, wp, yp, cols| {
        // SAFETY: the caller checked AVX-512F; `for_each_panel` hands this panel rows ≤ ROWS
        // rows of x, cols ≤ COLS columns of w and the matching block of y, which no other
        // panel writes.
        unsafe {
            match rows {
                1 => tile16::<1>(xp, k, wp, n, cols, yp),
                2 => tile16::<2>(xp, k, wp, n, cols, yp),
                3 => tile16::<3>(xp, k, wp, n, cols, yp),
                4 => tile16::<4>(xp, k, wp, n, cols, yp),
                5 => tile16::<5>(xp, k, wp, n, cols, yp),
                _ => tile16::<6>(xp, k, wp, n, cols, yp),
            }
        }
    });
}

/// `R` rows of `x` (row stride `k`) times a `[k, cols ≤ 64]` panel of `w` (row stride `n`)
/// into `R` rows of `y` (row stride `n`). Loads and stores go through lane masks, so a
/// partial panel touches nothing past `cols` (a masked lane of an AVX-512 load never faults).
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // `r` and `c` index two arrays each
unsafe fn tile16<const R: usize>(x: *const f32, k: usize, w: *const f32, n: usize, cols: usize, y: *mut f32) {
    let masks: [__mmask16; VECTORS] = std::array::from_fn(|c| lanes16(cols.saturating_sub(16 * c)));
    let mut acc = [[_mm512_setzero_ps(); VECTORS]; R];
    for kk in 0..k {
        let row = w.add(kk * n);
        for c in 0..VECTORS {
            // A prefetch never faults, so one past the end of `w` is harmless.
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(PREFETCH_ROWS * n + 16 * c) as *const i8);
        }
        // wrapping_add: a vector past `cols` loads no lane, and its address may lie past
        // the end of `w`, which `add` does not allow.
        let wv: [__m512; VECTORS] = std::array::from_fn(|c| _mm512_maskz_loadu_ps(masks[c], row.wrapping_add(16 * c)));
        for r in 0..R {
            let xv = _mm512_set1_ps(*x.add(r * k + kk));
            for c in 0..VECTORS {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..VECTORS {
            _mm512_mask_storeu_ps(y.wrapping_add(r * n + 16 * c), masks[c], acc[r][c]);
        }
    }
}

/// Mask of a 16-lane vector whose first `left` lanes (at most 16) are in bounds.
fn lanes16(left: usize) -> __mmask16 {
    if left >= 16 {
        u16::MAX
    } else {
        (1u16 << left) - 1
    }
}
