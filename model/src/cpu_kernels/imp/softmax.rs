//! Softmax of a row of attention scores, with `expf` computed eight lanes at a time and
//! giving libm's bits ([`exp8`], which SwiGLU's kernel uses too).
//!
//! Scalar `expf` and the loop around it were 4–7 % of a prefill's and of a decode step's
//! `perf` samples. Changing the last bit of a probability would change greedy tokens here
//! and there and GRPO's sampled draws everywhere, and with them every figure measured on the
//! scalar loop. So each lane computes what glibc's `expf` computes on x86-64 CPUs with FMA
//! (the `__expf_fma` variant its resolver picks on every CPU these kernels run on): x
//! widened to f64, `x·32/ln 2` split by a rounding constant into an integer k and a
//! remainder r, `2^(k/32)` as a 32-entry table of `2^(i/32)` with k's high bits added to the
//! exponent, a cubic in r, the product rounded to f32 — the same operations in the same
//! order, FMAs where it fuses. Lanes that path hands to its special cases (|x| ≥ 88, NaN) go
//! to `f32::exp` itself, and −∞ (a blocked key) gives its exact 0. The row's sum is still
//! taken in order, one element after another, as the scalar loop took it.
//!
//! On CPUs with AVX-512F the same operations run on eight doubles at a time ([`exp16`]):
//! each lane's bits are unchanged, so outputs do not depend on which CPU ran them, and the
//! row's sum keeps its order.
//!
//! A test holds [`softmax_in_place`] to the scalar loop bit for bit, and both exponentials to
//! `f32::exp` over a sweep of the range softmax feeds it (on glibc; other C libraries have
//! other `expf`s, and there the scalar cases use theirs).

use std::arch::x86_64::*;

/// 32/ln 2: `x` times this is the exponent in 32nds.
const SCALE: f64 = f64::from_bits(0x4047_1547_652b_82fe);
/// 1.5·2^52: added to a double below 2^51 in magnitude, it rounds it to an integer held in
/// the low mantissa bits.
const ROUND: f64 = f64::from_bits(0x4338_0000_0000_0000);
/// The cubic's coefficients of r³ and r², and of r (the constant term is 1), for r in 32nds.
const CUBE: f64 = f64::from_bits(0x3ebc_6af8_4b91_2394);
const SQUARE: f64 = f64::from_bits(0x3f2e_bfce_50fa_c4f3);
const LINEAR: f64 = f64::from_bits(0x3f96_2e42_ff0c_52d6);

/// `2^(i/32)` rounded to f64, less `i·2^47`: adding `k·2^47` (k ≡ i mod 32) then puts
/// `k / 32`'s integer part into the exponent.
const POWERS: [u64; 32] = [
    0x3ff0_0000_0000_0000,
    0x3fef_d9b0_d315_8574,
    0x3fef_b558_6cf9_890f,
    0x3fef_9301_d012_5b51,
    0x3fef_72b8_3c7d_517b,
    0x3fef_5487_3168_b9aa,
    0x3fef_387a_6e75_6238,
    0x3fef_1e9d_f51f_dee1,
    0x3fef_06fe_0a31_b715,
    0x3fee_f1a7_373a_a9cb,
    0x3fee_dea6_4c12_3422,
    0x3fee_ce08_6061_892d,
    0x3fee_bfda_d536_2a27,
    0x3fee_b42b_569d_4f82,
    0x3fee_ab07_dd48_5429,
    0x3fee_a47e_b03a_5585,
    0x3fee_a09e_667f_3bcd,
    0x3fee_9f75_e8ec_5f74,
    0x3fee_a114_73eb_0187,
    0x3fee_a589_994c_ce13,
    0x3fee_ace5_422a_a0db,
    0x3fee_b737_b0cd_c5e5,
    0x3fee_c491_82a3_f090,
    0x3fee_d503_b23e_255d,
    0x3fee_e89f_995a_d3ad,
    0x3fee_ff76_f2fb_5e47,
    0x3fef_199b_dd85_529c,
    0x3fef_3720_dcef_9069,
    0x3fef_5818_dcfb_a487,
    0x3fef_7c97_337b_9b5f,
    0x3fef_a4af_a2a4_90da,
    0x3fef_d076_5b6e_4540,
];

/// |x| from this bit pattern on (88.0) takes `expf`'s special cases.
const SPECIAL_FROM: i32 = 0x42b0_0000;

/// `expf` of four lanes with |x| < 88.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp4(x: __m128) -> __m128 {
    let xd = _mm256_cvtps_pd(x);
    let shifted = _mm256_fmadd_pd(_mm256_set1_pd(SCALE), xd, _mm256_set1_pd(ROUND));
    let k = _mm256_castpd_si256(shifted);
    let kd = _mm256_sub_pd(shifted, _mm256_set1_pd(ROUND));
    let r = _mm256_fmsub_pd(_mm256_set1_pd(SCALE), xd, kd);
    let index = _mm256_and_si256(k, _mm256_set1_epi64x(31));
    let power = _mm256_i64gather_epi64::<8>(POWERS.as_ptr().cast::<i64>(), index);
    let s = _mm256_castsi256_pd(_mm256_add_epi64(power, _mm256_slli_epi64::<47>(k)));
    let high = _mm256_fmadd_pd(_mm256_set1_pd(CUBE), r, _mm256_set1_pd(SQUARE));
    let r2 = _mm256_mul_pd(r, r);
    let low = _mm256_fmadd_pd(r, _mm256_set1_pd(LINEAR), _mm256_set1_pd(1.0));
    let poly = _mm256_fmadd_pd(high, r2, low);
    _mm256_cvtpd_ps(_mm256_mul_pd(poly, s))
}

/// `expf` of eight lanes, written to `out`: [`exp4`] in its range, 0 for −∞, `f32::exp` for
/// the lanes `expf` treats apart (|x| ≥ 88, NaN; scores that far below the row's maximum
/// occur, behind attention sinks, so the other lanes keep the vector path).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp8(x: __m256, out: *mut f32) {
    let magnitude = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(i32::MAX));
    let special = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(SPECIAL_FROM - 1));
    let minus_inf = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(x, _mm256_set1_ps(f32::NEG_INFINITY)));
    let e = _mm256_set_m128(exp4(_mm256_extractf128_ps::<1>(x)), exp4(_mm256_castps256_ps128(x)));
    _mm256_storeu_ps(out, _mm256_andnot_ps(_mm256_castsi256_ps(minus_inf), e));
    let apart = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(minus_inf, special)));
    if apart != 0 {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), x);
        for (j, v) in lanes.iter().enumerate() {
            if apart & (1 << j) != 0 {
                *out.add(j) = v.exp();
            }
        }
    }
}

/// [`exp4`]'s operations on eight doubles at once (AVX-512F): each lane's bits are exp4's,
/// the table read by two two-register permutes instead of a gather.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp8_wide(x: __m256) -> __m256 {
    let xd = _mm512_cvtps_pd(x);
    let shifted = _mm512_fmadd_pd(_mm512_set1_pd(SCALE), xd, _mm512_set1_pd(ROUND));
    let k = _mm512_castpd_si512(shifted);
    let kd = _mm512_sub_pd(shifted, _mm512_set1_pd(ROUND));
    let r = _mm512_fmsub_pd(_mm512_set1_pd(SCALE), xd, kd);
    let index = _mm512_and_si512(k, _mm512_set1_epi64(31));
    let table = POWERS.as_ptr().cast::<__m512i>();
    let (t0, t1, t2, t3) = (_mm512_loadu_si512(table), _mm512_loadu_si512(table.add(1)), _mm512_loadu_si512(table.add(2)), _mm512_loadu_si512(table.add(3)));
    let first_half = _mm512_permutex2var_epi64(t0, index, t1);
    let second_half = _mm512_permutex2var_epi64(t2, index, t3);
    let power = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(index, _mm512_set1_epi64(16)), first_half, second_half);
    let s = _mm512_castsi512_pd(_mm512_add_epi64(power, _mm512_slli_epi64::<47>(k)));
    let high = _mm512_fmadd_pd(_mm512_set1_pd(CUBE), r, _mm512_set1_pd(SQUARE));
    let r2 = _mm512_mul_pd(r, r);
    let low = _mm512_fmadd_pd(r, _mm512_set1_pd(LINEAR), _mm512_set1_pd(1.0));
    let poly = _mm512_fmadd_pd(high, r2, low);
    _mm512_cvtpd_ps(_mm512_mul_pd(poly, s))
}

/// [`exp8`] of sixteen lanes with AVX-512F, the same bits lane for lane: half the
/// instructions per element on the CPUs that have it (a 2,048-token prefill spent 10 % of its
/// samples in the eight-lane loop).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp16(x: __m512, out: *mut f32) {
    let magnitude = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MAX));
    let special = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(SPECIAL_FROM - 1));
    let minus_inf = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, _mm512_set1_ps(f32::NEG_INFINITY));
    let xd = _mm512_castps_pd(x);
    let low = _mm256_castps_pd(exp8_wide(_mm256_castpd_ps(_mm512_castpd512_pd256(xd))));
    let high = _mm256_castps_pd(exp8_wide(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(xd))));
    let e = _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(low), high));
    _mm512_storeu_ps(out, _mm512_maskz_mov_ps(!minus_inf, e));
    let apart = special & !minus_inf;
    if apart != 0 {
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), x);
        for (j, v) in lanes.iter().enumerate() {
            if apart & (1 << j) != 0 {
                *out.add(j) = v.exp();
            }
        }
    }
}

/// `exp(x − shift)` of `n` floats from `p` in place, sixteen at a time (the whole sixteens
/// only); returns how many it did.
#[target_feature(enable = "avx512f")]
unsafe fn shifted_exp16(p: *mut f32, n: usize, shift: f32) -> usize {
    let shift = _mm512_set1_ps(shift);
    let mut i = 0;
    while i + 16 <= n {
        exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), shift), p.add(i));
        i += 16;
    }
    i
}

/// Softmax of a row with at least one finite score (every query sees itself), in place:
/// `exp(x − max)`, summed in order, times `1 / sum` — the scalar loop's bits.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softmax_in_place(scores: &mut [f32]) {
    shifted_exp_in_place(scores);
    let mut sum = 0f32;
    for &x in scores.iter() {
        sum += x;
    }
    scale_in_place(scores, 1.0 / sum);
}

/// [`softmax_in_place`] of each row, the rows' sums interleaved: every row is still summed
/// in order by its own chain (the same bits), but up to six chains overlap instead of each
/// add waiting on the one before (a row of 2,048 keys is 2,048 dependent adds).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softmax_rows(rows: &mut [&mut [f32]]) {
    for row in rows.iter_mut() {
        shifted_exp_in_place(row);
    }
    for chunk in rows.chunks_mut(6) {
        let sums: Vec<f32> = match chunk {
            [a] => row_sums([&**a]).to_vec(),
            [a, b] => row_sums([&**a, &**b]).to_vec(),
            [a, b, c] => row_sums([&**a, &**b, &**c]).to_vec(),
            [a, b, c, d] => row_sums([&**a, &**b, &**c, &**d]).to_vec(),
            [a, b, c, d, e] => row_sums([&**a, &**b, &**c, &**d, &**e]).to_vec(),
            [a, b, c, d, e, f] => row_sums([&**a, &**b, &**c, &**d, &**e, &**f]).to_vec(),
            _ => Vec::new(),
        };
        for (row, sum) in chunk.iter_mut().zip(sums) {
            scale_in_place(row, 1.0 / sum);
        }
    }
}

/// Softmax down the columns of `scores`: `keys` rows of `width` floats, column `i` one
/// query's scores, the query seeing keys `0..=diagonal + i` (`keys = diagonal + width`, the
/// causal block of a prefill laid out keys × queries). Each column gets
/// [`softmax_in_place`]'s bits on its visible keys, the keys past them 0: the maximum;
/// `exp(x − max)` lane by lane; the sum taken key after key from 0 — in each lane, so a
/// column is summed in the scalar loop's order while sixteen columns advance per
/// instruction (the rows' version chains one add per key, which was ~6 % of a 4,096-token
/// prefill) — blocked keys adding exact zeros after the visible ones; then `1 / sum` times each.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softmax_columns(scores: &mut [f32], width: usize, diagonal: usize) {
    let keys = diagonal + width;
    assert!(width > 0 && scores.len() >= keys * width, "{} scores for {keys} keys × {width} queries", scores.len());
    let scores = &mut scores[..keys * width];
    // Key `diagonal + t` is blocked for the queries before column t.
    for (t, row) in scores[diagonal * width..].chunks_exact_mut(width).enumerate() {
        row[..t].fill(f32::NEG_INFINITY);
    }
    let mut max = vec![f32::NEG_INFINITY; width];
    for row in scores.chunks_exact(width) {
        column_max(&mut max, row);
    }
    let mut sums = vec![0f32; width];
    for row in scores.chunks_exact_mut(width) {
        exp_less(row, &max);
        for (sum, &x) in sums.iter_mut().zip(row.iter()) {
            *sum += x;
        }
    }
    let inverses: Vec<f32> = sums.iter().map(|&sum| 1.0 / sum).collect();
    for row in scores.chunks_exact_mut(width) {
        for (x, &inv) in row.iter_mut().zip(&inverses) {
            *x *= inv;
        }
    }
}

/// `max[i] = max(max[i], row[i])`, eight lanes at a time.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn column_max(max: &mut [f32], row: &[f32]) {
    let n = max.len().min(row.len());
    let (m, r) = (max.as_mut_ptr(), row.as_ptr());
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(m.add(i), _mm256_max_ps(_mm256_loadu_ps(m.add(i)), _mm256_loadu_ps(r.add(i))));
        i += 8;
    }
    for (top, &x) in max[i..n].iter_mut().zip(&row[i..n]) {
        *top = top.max(x);
    }
}

/// `row[i] = exp(row[i] − shift[i])` in place: sixteen lanes where the CPU has them, eight
/// for the rest, the tail one by one (each element's bits the same on every path).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_less(row: &mut [f32], shift: &[f32]) {
    let n = row.len().min(shift.len());
    let (p, s) = (row.as_mut_ptr(), shift.as_ptr());
    let mut i = if super::wide() { exp_less16(p, s, n) } else { 0 };
    while i + 8 <= n {
        exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), _mm256_loadu_ps(s.add(i))), p.add(i));
        i += 8;
    }
    for (x, &m) in row[i..n].iter_mut().zip(&shift[i..n]) {
        *x = (*x - m).exp();
    }
}

/// [`exp_less`]'s whole sixteens with AVX-512F; returns how many it did.
#[target_feature(enable = "avx512f")]
unsafe fn exp_less16(p: *mut f32, shift: *const f32, n: usize) -> usize {
    let mut i = 0;
    while i + 16 <= n {
        exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), _mm512_loadu_ps(shift.add(i))), p.add(i));
        i += 16;
    }
    i
}

/// Each row summed in order from 0, the rows side by side up to the shortest, then each
/// row's tail.
#[inline]
fn row_sums<const N: usize>(rows: [&[f32]; N]) -> [f32; N] {
    let common = rows.iter().map(|r| r.len()).min().unwrap_or(0);
    let heads = rows.map(|r| &r[..common]);
    let mut sums = [0f32; N];
    for i in 0..common {
        for (sum, row) in sums.iter_mut().zip(&heads) {
            *sum += row[i];
        }
    }
    for (sum, row) in sums.iter_mut().zip(&rows) {
        for &x in &row[common..] {
            *sum += x;
        }
    }
    sums
}

/// `exp(x − max)` of a row in place (the maximum taken in any order: it is exact).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn shifted_exp_in_place(scores: &mut [f32]) {
    let n = scores.len();
    let p = scores.as_mut_ptr();
    let mut i = 0;
    // Four running maxima, so the loads do not wait on one chain of `max` latencies.
    let mut tops = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
    while i + 32 <= n {
        for (j, top) in tops.iter_mut().enumerate() {
            *top = _mm256_max_ps(*top, _mm256_loadu_ps(p.add(i + 8 * j)));
        }
        i += 32;
    }
    let mut top = _mm256_max_ps(_mm256_max_ps(tops[0], tops[1]), _mm256_max_ps(tops[2], tops[3]));
    while i + 8 <= n {
        top = _mm256_max_ps(top, _mm256_loadu_ps(p.add(i)));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), top);
    let max = lanes.iter().chain(&scores[i..]).copied().fold(f32::NEG_INFINITY, f32::max);
    // Sixteen lanes where the CPU has them, eight for the rest: each element's bits are the
    // same either way.
    i = if super::wide() { shifted_exp16(p, n, max) } else { 0 };
    let shift = _mm256_set1_ps(max);
    while i + 8 <= n {
        exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), shift), p.add(i));
        i += 8;
    }
    for x in &mut scores[i..] {
        *x = (*x - max).exp();
    }
}

#[inline]
fn scale_in_place(scores: &mut [f32], inv: f32) {
    for x in scores.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop this module replaced.
    fn scalar_softmax(scores: &mut [f32]) {
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in scores.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in scores.iter_mut() {
            *x *= inv;
        }
    }

    /// Up to 13 rows of unequal lengths at once (two chunks): each row's bits are those of
    /// the scalar loop on that row alone.
    #[test]
    fn softmax_rows_equal_the_scalar_loop_bit_for_bit() {
        if !super::super::available() {
            return;
        }
        let value = |i: usize| ((i * 7919 % 1013) as f32 - 506.0) / 37.0;
        for count in [1, 2, 3, 5, 6, 7, 13] {
            let rows: Vec<Vec<f32>> = (0..count)
                .map(|r| (0..(37 + 5 * r) % 41 + 1).map(|i| if i % 9 == 4 { f32::NEG_INFINITY } else { value(i * (r + 3)) }).collect())
                .collect();
            let mut got = rows.clone();
            let mut views: Vec<&mut [f32]> = got.iter_mut().map(|r| r.as_mut_slice()).collect();
            // SAFETY: AVX2 and FMA were detected.
            unsafe { softmax_rows(&mut views) };
            for (r, (row, got)) in rows.iter().zip(&got).enumerate() {
                let mut expected = row.clone();
                scalar_softmax(&mut expected);
                let same = got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same && got.len() == expected.len(), "{count} rows: row {r} (length {})", row.len());
            }
        }
    }

    /// Blocks of a causal prefill laid out keys × queries, widths around the 8 and 16 lanes,
    /// no cached keys and many, scores spread wide enough that some lanes take `expf`'s
    /// special cases: each column's visible keys have the scalar loop's bits on them alone,
    /// the keys past them 0.
    #[test]
    fn softmax_columns_equal_the_scalar_loop_bit_for_bit() {
        if !super::super::available() {
            return;
        }
        let value = |i: usize| ((i * 7919 % 1013) as f32 - 506.0) / 5.0;
        for (width, diagonal) in [(1, 0), (1, 9), (7, 0), (13, 3), (16, 0), (37, 41), (64, 0), (64, 130)] {
            let keys = diagonal + width;
            let scores: Vec<f32> = (0..keys * width).map(|i| value(i * 31 + width)).collect();
            let mut got = scores.clone();
            // SAFETY: AVX2 and FMA were detected.
            unsafe { softmax_columns(&mut got, width, diagonal) };
            for i in 0..width {
                let visible = diagonal + i + 1;
                let mut expected: Vec<f32> = (0..visible).map(|j| scores[j * width + i]).collect();
                scalar_softmax(&mut expected);
                expected.resize(keys, 0.0);
                let column: Vec<f32> = (0..keys).map(|j| got[j * width + i]).collect();
                let same = column.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{keys} keys × {width} queries: column {i}");
            }
        }
    }

    /// Every float of [−104, 0] at a stride of 61 bit patterns (about 18 M inputs), the
    /// special cases around them, and ±0: exact equality with libm, for eight lanes and (where
    /// the CPU has AVX-512F) sixteen.
    #[test]
    #[cfg(target_env = "gnu")]
    fn exp8_and_exp16_equal_libm_expf() {
        if !super::super::available() {
            return;
        }
        let mut inputs: Vec<f32> = (0..=104f32.to_bits()).step_by(61).map(|b| -f32::from_bits(b)).collect();
        inputs.extend([0.0, -0.0, f32::NEG_INFINITY, -87.99, -88.0, -88.01, -103.5, -103.98, -104.5, -200.0, 1.0, 50.0, 88.5, f32::MIN_POSITIVE]);
        while !inputs.len().is_multiple_of(8) {
            inputs.push(-1.5);
        }
        let mut out = vec![0f32; inputs.len()];
        for (x, y) in inputs.chunks(8).zip(out.chunks_mut(8)) {
            // SAFETY: AVX2 and FMA were detected; `y` holds 8 floats.
            unsafe { exp8(_mm256_loadu_ps(x.as_ptr()), y.as_mut_ptr()) };
        }
        for (x, y) in inputs.iter().zip(&out) {
            assert_eq!(y.to_bits(), x.exp().to_bits(), "expf({x:e}) = {:e}, libm {:e}", y, x.exp());
        }
        if !super::super::wide() {
            return;
        }
        // The sixteen-lane path, each input once in each half of the vector.
        for shift in [0, 8] {
            let mut lanes = inputs[shift..].to_vec();
            while !lanes.len().is_multiple_of(16) {
                lanes.push(-1.5);
            }
            let mut wide_out = vec![0f32; lanes.len()];
            for (x, y) in lanes.chunks(16).zip(wide_out.chunks_mut(16)) {
                // SAFETY: AVX-512F was detected; `y` holds 16 floats.
                unsafe { exp16(_mm512_loadu_ps(x.as_ptr()), y.as_mut_ptr()) };
            }
            for (x, y) in lanes.iter().zip(&wide_out) {
                assert_eq!(y.to_bits(), x.exp().to_bits(), "16 lanes: expf({x:e}) = {:e}, libm {:e}", y, x.exp());
            }
        }
    }

    /// Rows of every length mod 8, with blocked (−∞) keys, far-below-max scores and ties:
    /// the scalar loop's bits.
    #[test]
    fn softmax_equals_the_scalar_loop_bit_for_bit() {
        if !super::super::available() {
            return;
        }
        let value = |i: usize| ((i * 7919 % 1013) as f32 - 506.0) / 37.0;
        for n in (1..40).chain([127, 128, 600]) {
            for pattern in 0..3 {
                let row: Vec<f32> = (0..n)
                    .map(|i| match pattern {
                        1 if i % 5 == 2 && i != 0 => f32::NEG_INFINITY,
                        2 if i % 7 == 3 => -200.0,
                        _ => value(i + n),
                    })
                    .collect();
                let mut expected = row.clone();
                scalar_softmax(&mut expected);
                let mut got = row.clone();
                // SAFETY: AVX2 and FMA were detected.
                unsafe { softmax_in_place(&mut got) };
                for (j, (a, b)) in got.iter().zip(&expected).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "length {n}, pattern {pattern}, element {j}: {a:e} vs {b:e}");
                }
            }
        }
    }
}
