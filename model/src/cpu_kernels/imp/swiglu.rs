//! SwiGLU's `silu(gate) · up` at inference, on every core, with burn's bits.
//!
//! burn-flex runs `silu` as `x · sigmoid(x)` through a scalar, one-thread unary op whose
//! `sigmoid` calls `expf` per element (`1 / (1 + e^−x)` for x ≥ 0, `e^x / (1 + e^x)` below),
//! then multiplies by `up` in another pass: together about 5 % of a prefill's `perf` samples.
//! Here each lane does the same operations in the same order, `expf` by
//! [`super::softmax::exp8`] (libm's bits), so the output equals burn's bit for bit (tested).

use std::arch::x86_64::*;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::softmax::exp8;
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

/// burn's `sigmoid` of one element.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_run(g: &[f32], u: &[f32], out: &mut [f32]) {
    let n = out.len().min(g.len()).min(u.len());
    let mut e = [0f32; 8];
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(g.as_ptr().add(i));
        // e^−|x|: burn's e^−x where x ≥ 0, its e^x below.
        exp8(_mm256_or_ps(x, _mm256_set1_ps(-0.0)), e.as_mut_ptr());
        let ev = _mm256_loadu_ps(e.as_ptr());
        let one = _mm256_set1_ps(1.0);
        let numerator = _mm256_blendv_ps(ev, one, _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_setzero_ps()));
        let sig = _mm256_div_ps(numerator, _mm256_add_ps(one, ev));
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
    use burn::tensor::activation::silu;
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

    fn check(gate: Tensor<B, 3>, up: Tensor<B, 3>) {
        let Some(got) = swiglu(&gate, &up) else {
            assert!(!super::super::available(), "the kernel declined on a CPU with AVX2 and FMA");
            return;
        };
        let expected = (silu(gate) * up).into_data().to_vec::<f32>().unwrap_or_default();
        let got = got.into_data().to_vec::<f32>().unwrap_or_default();
        assert!(!got.is_empty() && got.len() == expected.len());
        for (j, (a, b)) in got.iter().zip(&expected).enumerate() {
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "element {j}: {a:e} vs burn {b:e}");
        }
    }
}
