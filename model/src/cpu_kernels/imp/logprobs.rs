//! `log_softmax(logits / T)[target]` of each row, and its gradient, in one parallel pass each
//! ([`crate::lean_logprobs`] makes them an autodiff op).
//!
//! Per row `i` of `z = logits / T`: `m = max z`, `s = Σ exp(z − m)` (eight lanes at a time by
//! [`super::softmax::exp8`], libm's bits per element), `lse = m + ln s`, the log-prob
//! `z[t] − lse` and, when asked, the entropy `lse − Σ exp(z − m)·z / s`. The gradient of
//! `g · logprob` is `g / T · (onehot(t) − exp(z − lse))`.

use std::arch::x86_64::*;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::softmax::exp8;
use super::{available, flex, tensor_of};

/// What the forward pass keeps for the backward one, besides the logits.
pub(crate) struct RowStats {
    /// `log Σ exp(z)` of each row.
    pub(crate) lse: Vec<f32>,
    /// Each row's entropy, when asked for.
    pub(crate) entropy: Option<Vec<f32>>,
}

/// The log-prob of `targets[i]` in row `i` of `logits` `[rows, vocab]` at `temperature`, with
/// the rows' statistics; `None` off the plain CPU backend, without AVX2/FMA, or for a target
/// outside the vocabulary or a count that does not match.
pub(crate) fn target_logprobs<B: Backend>(logits: &Tensor<B, 2>, targets: &[u32], temperature: f32, entropy: bool) -> Option<(Tensor<B, 1>, RowStats)> {
    let [rows, vocab] = logits.dims();
    if !available() || rows == 0 || vocab == 0 || targets.len() != rows || targets.iter().any(|&t| t as usize >= vocab) {
        return None;
    }
    let lf = flex(logits)?.to_contiguous();
    let values = lf.as_slice::<f32>()?;
    let per_row: Vec<(f32, f32, f32)> = values
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .with_min_len(rows.div_ceil(4 * rayon::current_num_threads()).max(1))
        // SAFETY: AVX2 and FMA were checked (`available`).
        .map(|(row, &t)| unsafe { row_forward(row, t as usize, temperature, entropy) })
        .collect();
    let logprobs = per_row.iter().map(|r| r.0).collect();
    let stats = RowStats { lse: per_row.iter().map(|r| r.1).collect(), entropy: entropy.then(|| per_row.iter().map(|r| r.2).collect()) };
    Some((tensor_of(logprobs, [rows])?, stats))
}

/// The gradient with respect to `logits` `[rows, vocab]` of `Σ grad[i] · logprob[i]`, given
/// the forward pass's `lse`; `None` where [`target_logprobs`] would be.
pub(crate) fn target_logprobs_backward<B: Backend>(logits: &Tensor<B, 2>, targets: &[u32], temperature: f32, lse: &[f32], grad: &Tensor<B, 1>) -> Option<Tensor<B, 2>> {
    let [rows, vocab] = logits.dims();
    if !available() || rows == 0 || vocab == 0 || targets.len() != rows || lse.len() != rows || targets.iter().any(|&t| t as usize >= vocab) {
        return None;
    }
    let lf = flex(logits)?.to_contiguous();
    let values = lf.as_slice::<f32>()?;
    let gf = flex(grad)?.to_contiguous();
    let g = gf.as_slice::<f32>()?;
    let mut out = vec![0f32; rows * vocab];
    out.par_chunks_mut(vocab)
        .zip(values.par_chunks(vocab))
        .enumerate()
        .with_min_len(rows.div_ceil(4 * rayon::current_num_threads()).max(1))
        // SAFETY: AVX2 and FMA were checked (`available`).
        .for_each(|(i, (d, row))| unsafe { row_backward(row, targets[i] as usize, temperature, lse[i], g[i], d) });
    tensor_of(out, [rows, vocab])
}

/// `(logprob, lse, entropy)` of one row (entropy 0 unless asked for).
#[target_feature(enable = "avx2,fma")]
unsafe fn row_forward(row: &[f32], target: usize, temperature: f32, entropy: bool) -> (f32, f32, f32) {
    let t = _mm256_set1_ps(temperature);
    let whole = row.len() / 8 * 8;
    let scaled = |i: usize| _mm256_div_ps(_mm256_loadu_ps(row.as_ptr().add(i)), t);
    let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..whole).step_by(8) {
        max = _mm256_max_ps(max, scaled(i));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), max);
    let m = row[whole..].iter().map(|&x| x / temperature).chain(lanes).fold(f32::NEG_INFINITY, f32::max);
    let (mut sum, mut weighted) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let shift = _mm256_set1_ps(m);
    let mut e = [0f32; 8];
    for i in (0..whole).step_by(8) {
        let z = scaled(i);
        exp8(_mm256_sub_ps(z, shift), e.as_mut_ptr());
        let ev = _mm256_loadu_ps(e.as_ptr());
        sum = _mm256_add_ps(sum, ev);
        if entropy {
            weighted = _mm256_fmadd_ps(ev, z, weighted);
        }
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut s: f32 = lanes.iter().sum();
    _mm256_storeu_ps(lanes.as_mut_ptr(), weighted);
    let mut w: f32 = lanes.iter().sum();
    for &x in &row[whole..] {
        let z = x / temperature;
        let ez = (z - m).exp();
        s += ez;
        w += ez * z;
    }
    let lse = m + s.ln();
    let h = if entropy { lse - w / s } else { 0.0 };
    (row[target] / temperature - lse, lse, h)
}

/// One row of the gradient: `c · (onehot(target) − exp(z − lse))` with `c = grad / T`.
#[target_feature(enable = "avx2,fma")]
unsafe fn row_backward(row: &[f32], target: usize, temperature: f32, lse: f32, grad: f32, out: &mut [f32]) {
    let c = grad / temperature;
    let (t, shift, minus_c) = (_mm256_set1_ps(temperature), _mm256_set1_ps(lse), _mm256_set1_ps(-c));
    let whole = row.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let z = _mm256_div_ps(_mm256_loadu_ps(row.as_ptr().add(i)), t);
        let p = out.as_mut_ptr().add(i);
        exp8(_mm256_sub_ps(z, shift), p);
        _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), minus_c));
    }
    for (d, &x) in out[whole..].iter_mut().zip(&row[whole..]) {
        *d = -c * (x / temperature - lse).exp();
    }
    out[target] += c;
}
