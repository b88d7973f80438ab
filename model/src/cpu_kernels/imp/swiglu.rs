//! SwiGLU's `silu(gate) · up` and its backward pass, on every core, with burn's bits.
//!
//! burn-flex runs `silu` as `x · sigmoid(x)` through a scalar, one-thread unary op whose
//! `sigmoid` calls `expf` per element (`1 / (1 + e^−x)` for x ≥ 0, `e^x / (1 + e^x)` below),
//! then multiplies by `up` in another pass: together about 5 % of a prefill's `perf` samples.
//! The backward of [`crate::lean_mlp`] composed from burn's ops is ten passes over
//! intermediate-sized tensors (the `sigmoid` again, then each product and sum); in training
//! both run here in one pass each (about 2 % of an SFT step's `perf` samples saved).
//! Here each lane does the same operations in the same order, `expf` by
//! [`super::softmax::exp8`] (libm's bits), so the outputs equal burn's bit for bit (tested):
//! training results do not move. With AVX-512F the same operations run sixteen lanes at a
//! time ([`super::softmax::exp16`]), with the same bits.

use std::arch::x86_64::*;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::softmax::{exp16, exp8};
use super::{flex, tensor_of};

/// Elements per task: a few tasks per core at SmolLM2's 1,536-wide rows.
const CHUNK: usize = 8192;

/// `silu(gate) · up` for two tensors of one shape. `None` where the kernels do not apply.
pub(crate) fn swiglu<B: Backend>(gate: &Tensor<B, 3>, up: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
    let dims = gate.dims();
    if up.dims() != dims {
        return None;
    }
    let (g, u) = (flex(gate)?.to_contiguous(), flex(up)?.to_contiguous());
    let (gs, us) = (g.as_slice::<f32>()?, u.as_slice::<f32>()?);
    if gs.len() != us.len() {
        return None;
    }
    let mut out = vec![0f32; gs.len()];
    out.par_chunks_mut(CHUNK).zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK))).for_each(|(o, (g, u))| {
        // SAFETY: `flex` returned tensors only because AVX2 and FMA were detected; the three
        // chunks have one length.
        unsafe { swiglu_run(g, u, o) }
    });
    tensor_of(out, dims)
}

/// `(d_gate, d_up)`, each present when asked for.
pub(crate) type Gradients<B> = (Option<Tensor<B, 3>>, Option<Tensor<B, 3>>);

/// The gradients of `silu(gate) · up` for the upstream gradient `d`: `(d_gate, d_up)`, each
/// computed only when asked for, as [`crate::lean_mlp`]'s composed ops do:
/// `d_up = d · g · σ(g)`, `d_gate = d · u · (σ(g) · (g · (−σ(g) + 1) + 1))`, left to right.
/// `None` where the kernels do not apply.
pub(crate) fn swiglu_backward<B: Backend>(
    gate: &Tensor<B, 3>,
    up: &Tensor<B, 3>,
    d: &Tensor<B, 3>,
    want_gate: bool,
    want_up: bool,
) -> Option<Gradients<B>> {
    let dims = gate.dims();
    if up.dims() != dims || d.dims() != dims {
        return None;
    }
    let (g, u, dd) = (flex(gate)?.to_contiguous(), flex(up)?.to_contiguous(), flex(d)?.to_contiguous());
    let (gs, us, ds) = (g.as_slice::<f32>()?, u.as_slice::<f32>()?, dd.as_slice::<f32>()?);
    let n = gs.len();
    if us.len() != n || ds.len() != n {
        return None;
    }
    let mut d_gate = if want_gate { vec![0f32; n] } else { Vec::new() };
    let mut d_up = if want_up { vec![0f32; n] } else { Vec::new() };
    let tasks = n.div_ceil(CHUNK).max(1);
    let (gate_chunks, up_chunks) = (output_chunks(&mut d_gate, tasks), output_chunks(&mut d_up, tasks));
    gate_chunks.into_par_iter().zip(up_chunks).enumerate().for_each(|(t, (dg, du))| {
        let range = t * CHUNK..((t + 1) * CHUNK).min(n);
        // SAFETY: `flex` returned tensors only because AVX2 and FMA were detected; each output
        // chunk is empty or as long as the range.
        unsafe { swiglu_backward_run(&gs[range.clone()], &us[range.clone()], &ds[range], dg, du) }
    });
    let wrap = |v: Vec<f32>, wanted: bool| if wanted { tensor_of(v, dims).map(Some) } else { Some(None) };
    Some((wrap(d_gate, want_gate)?, wrap(d_up, want_up)?))
}

/// One chunk of `v` per task, or an empty slice per task for an output not asked for.
fn output_chunks(v: &mut [f32], tasks: usize) -> Vec<&mut [f32]> {
    if v.is_empty() {
        (0..tasks).map(|_| <&mut [f32]>::default()).collect()
    } else {
        v.chunks_mut(CHUNK).collect()
    }
}

/// burn's `sigmoid` of one element.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// burn's `sigmoid` of eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sigmoid8(x: __m256) -> __m256 {
    let mut e = [0f32; 8];
    // e^−|x|: burn's e^−x where x ≥ 0, its e^x below.
    exp8(_mm256_or_ps(x, _mm256_set1_ps(-0.0)), e.as_mut_ptr());
    let ev = _mm256_loadu_ps(e.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let numerator = _mm256_blendv_ps(ev, one, _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_setzero_ps()));
    _mm256_div_ps(numerator, _mm256_add_ps(one, ev))
}

/// [`sigmoid8`] of sixteen lanes (AVX-512F), the same operations lane for lane.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sigmoid16(x: __m512) -> __m512 {
    let mut e = [0f32; 16];
    exp16(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN))), e.as_mut_ptr());
    let ev = _mm512_loadu_ps(e.as_ptr());
    let one = _mm512_set1_ps(1.0);
    let numerator = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_setzero_ps()), ev, one);
    _mm512_div_ps(numerator, _mm512_add_ps(one, ev))
}

/// [`swiglu_backward_run`]'s eight-lane loop sixteen lanes at a time, over the whole
/// sixteens; returns how many elements it did.
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_backward16(g: &[f32], u: &[f32], d: &[f32], d_gate: &mut [f32], d_up: &mut [f32], n: usize) -> usize {
    let (want_gate, want_up) = (d_gate.len() >= n, d_up.len() >= n);
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i + 16 <= n {
        let x = _mm512_loadu_ps(g.as_ptr().add(i));
        let dv = _mm512_loadu_ps(d.as_ptr().add(i));
        let sig = sigmoid16(x);
        if want_up {
            _mm512_storeu_ps(d_up.as_mut_ptr().add(i), _mm512_mul_ps(_mm512_mul_ps(dv, x), sig));
        }
        if want_gate {
            let negated = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sig), _mm512_set1_epi32(i32::MIN)));
            let one_minus = _mm512_add_ps(negated, one);
            let slope = _mm512_mul_ps(sig, _mm512_add_ps(_mm512_mul_ps(x, one_minus), one));
            let du = _mm512_mul_ps(dv, _mm512_loadu_ps(u.as_ptr().add(i)));
            _mm512_storeu_ps(d_gate.as_mut_ptr().add(i), _mm512_mul_ps(du, slope));
        }
        i += 16;
    }
    i
}

/// [`swiglu_run`]'s eight-lane loop sixteen lanes at a time, over the whole sixteens;
/// returns how many elements it did.
#[target_feature(enable = "avx512f")]
unsafe fn swiglu16(g: &[f32], u: &[f32], out: &mut [f32], n: usize) -> usize {
    let mut i = 0;
    while i + 16 <= n {
        let x = _mm512_loadu_ps(g.as_ptr().add(i));
        let y = _mm512_mul_ps(_mm512_mul_ps(x, sigmoid16(x)), _mm512_loadu_ps(u.as_ptr().add(i)));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), y);
        i += 16;
    }
    i
}

/// [`swiglu_backward`] over one chunk; `d_gate` and `d_up` are either empty (not asked for)
/// or as long as `g`.
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_backward_run(g: &[f32], u: &[f32], d: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    let n = g.len().min(u.len()).min(d.len());
    let (want_gate, want_up) = (d_gate.len() >= n, d_up.len() >= n);
    let one = _mm256_set1_ps(1.0);
    let mut i = if super::wide() { swiglu_backward16(g, u, d, d_gate, d_up, n) } else { 0 };
    while i + 8 <= n {
        let x = _mm256_loadu_ps(g.as_ptr().add(i));
        let dv = _mm256_loadu_ps(d.as_ptr().add(i));
        let sig = sigmoid8(x);
        if want_up {
            _mm256_storeu_ps(d_up.as_mut_ptr().add(i), _mm256_mul_ps(_mm256_mul_ps(dv, x), sig));
        }
        if want_gate {
            let one_minus = _mm256_add_ps(_mm256_xor_ps(sig, _mm256_set1_ps(-0.0)), one);
            let slope = _mm256_mul_ps(sig, _mm256_add_ps(_mm256_mul_ps(x, one_minus), one));
            let du = _mm256_mul_ps(dv, _mm256_loadu_ps(u.as_ptr().add(i)));
            _mm256_storeu_ps(d_gate.as_mut_ptr().add(i), _mm256_mul_ps(du, slope));
        }
        i += 8;
    }
    for j in i..n {
        let (x, dv) = (g[j], d[j]);
        let sig = sigmoid(x);
        if want_up {
            d_up[j] = dv * x * sig;
        }
        if want_gate {
            d_gate[j] = dv * u[j] * (sig * (x * (-sig + 1.0) + 1.0));
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_run(g: &[f32], u: &[f32], out: &mut [f32]) {
    let n = out.len().min(g.len()).min(u.len());
    let mut i = if super::wide() { swiglu16(g, u, out, n) } else { 0 };
    while i + 8 <= n {
        let x = _mm256_loadu_ps(g.as_ptr().add(i));
        let sig = sigmoid8(x);
        let y = _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u.as_ptr().add(i)));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
        i += 8;
    }
    for j in i..n {
        out[j] = g[j] * sigmoid(g[j]) * u[j];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::{sigmoid, silu};
    use burn::tensor::{Distribution, TensorData};

    type B = crate::CpuBackend;

    /// Normal values at three scales, a length off the 8-lane grid, and the edges: ±0, |x|
    /// around 88 and beyond, infinities. burn's ops give the reference.
    #[test]
    fn swiglu_equals_burns_silu_times_up_bit_for_bit() {
        let device = Default::default();
        for (shape, scale) in [([2, 3, 1536], 1.0), ([1, 7, 33], 8.0), ([3, 1, 200], 40.0)] {
            let gate = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, scale), &device);
            let up = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            check(gate, up);
        }
        let edges = vec![0.0, -0.0, 87.9, 88.0, 88.5, -88.0, -88.5, 103.5, -104.0, 150.0, -150.0, f32::INFINITY, f32::NEG_INFINITY, 1e-30, -1e-30, 3.0, -3.0];
        let n = edges.len();
        let gate = Tensor::<B, 3>::from_data(TensorData::new(edges, [1, 1, n]), &device);
        check(gate, Tensor::<B, 3>::ones([1, 1, n], &device));
    }

    /// The backward pass equals `lean_mlp`'s composed burn ops bit for bit, for each output
    /// alone and both together, on the inputs of the forward test.
    #[test]
    fn swiglu_backward_equals_the_composed_ops_bit_for_bit() {
        let device = Default::default();
        let mut cases = Vec::new();
        for (shape, scale) in [([2, 3, 1536], 1.0), ([1, 7, 33], 8.0), ([3, 1, 200], 40.0)] {
            let gate = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, scale), &device);
            let up = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let d = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 0.01), &device);
            cases.push((gate, up, d));
        }
        let edges = vec![0.0, -0.0, 87.9, 88.0, 88.5, -88.0, -88.5, 103.5, -104.0, 150.0, -150.0, f32::INFINITY, f32::NEG_INFINITY, 1e-30, -1e-30, 3.0, -3.0];
        let n = edges.len();
        let gate = Tensor::<B, 3>::from_data(TensorData::new(edges, [1, 1, n]), &device);
        cases.push((gate, Tensor::<B, 3>::ones([1, 1, n], &device), Tensor::<B, 3>::full([1, 1, n], 0.5, &device)));
        for (gate, up, d) in cases {
            // The composed ops, as `SwigluBackward` ran them before this kernel.
            let sig = sigmoid(gate.clone());
            let d_up = d.clone() * gate.clone() * sig.clone();
            let slope = sig.clone() * (gate.clone() * (sig.neg() + 1.0) + 1.0);
            let d_gate = d.clone() * up.clone() * slope;
            for (want_gate, want_up) in [(true, true), (true, false), (false, true)] {
                let Some((got_gate, got_up)) = swiglu_backward(&gate, &up, &d, want_gate, want_up) else {
                    assert!(!super::super::available(), "the kernel declined on a CPU with AVX2 and FMA");
                    return;
                };
                assert_eq!((got_gate.is_some(), got_up.is_some()), (want_gate, want_up));
                for (got, expected) in [(got_gate, &d_gate), (got_up, &d_up)] {
                    if let Some(got) = got {
                        same_bits(got, expected.clone());
                    }
                }
            }
        }
    }

    fn same_bits(got: Tensor<B, 3>, expected: Tensor<B, 3>) {
        let expected = expected.into_data().to_vec::<f32>().unwrap_or_default();
        let got = got.into_data().to_vec::<f32>().unwrap_or_default();
        assert!(!got.is_empty() && got.len() == expected.len());
        for (j, (a, b)) in got.iter().zip(&expected).enumerate() {
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "element {j}: {a:e} vs burn {b:e}");
        }
    }

    fn check(gate: Tensor<B, 3>, up: Tensor<B, 3>) {
        let Some(got) = swiglu(&gate, &up) else {
            assert!(!super::super::available(), "the kernel declined on a CPU with AVX2 and FMA");
            return;
        };
        same_bits(got, silu(gate) * up);
    }
}
