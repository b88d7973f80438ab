//! The decoder's building blocks. Linear weights are stored burn-style `[in, out]`;
//! `weights.rs` is the only place that converts from and to HF's `[out, in]`.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor};

use crate::lora::LoraAdapter;

/// RMSNorm computed like HF's: normalise in f32, cast back, then scale.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(weight: Tensor<B, 1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = x.dtype();
        let x32 = x.cast(DType::F32);
        let inv_rms = (x32.clone().square().mean_dim(2) + self.eps).sqrt().recip();
        (x32 * inv_rms).cast(dtype) * self.weight.val().unsqueeze::<3>()
    }
}

/// `x · W (+ b)` for `[batch, seq, in]` as one 2-D GEMM. Passing the 3-D tensor makes CPU
/// backends run a batched matmul against the broadcast weight — one pass over the weight per
/// sequence, which halved batched decode throughput.
pub fn project<B: Backend>(linear: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, s, d] = x.dims();
    let y = linear.forward(x.reshape([b * s, d]));
    let out = y.dims()[1];
    y.reshape([b, s, out])
}

/// One of the decoder's seven linear projections: the (frozen, under LoRA) base `Linear`
/// plus an optional low-rank adapter, `y = x·W (+ b) + s·(drop(x)·A)·B`.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    pub base: Linear<B>,
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Projection<B> {
    pub fn new(base: Linear<B>) -> Self {
        Self { base, lora: None }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lora {
            None => project(&self.base, x),
            Some(lora) => project(&self.base, x.clone()) + lora.forward(x),
        }
    }

    /// `[in, out]` of the base weight.
    pub fn dims(&self) -> [usize; 2] {
        self.base.weight.dims()
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Projection<B>,
    pub up_proj: Projection<B>,
    pub down_proj: Projection<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// Rotary position tables for one forward call, `[batch, seq, 1, head_dim]` (broadcast over heads).
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
}

impl<B: Backend> Rope<B> {
    /// HF's `rotate_half` convention: `x * cos + cat(-x2, x1) * sin`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..half]);
        let x2 = x.clone().slice([0..b, 0..s, 0..h, half..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// Keys and values of one layer kept between decoding steps, `[batch, kv_heads, len, head_dim]`.
pub type LayerCache<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// Grouped-query self-attention with optional q/k/v biases.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Projection<B>,
    pub k_proj: Projection<B>,
    pub v_proj: Projection<B>,
    pub o_proj: Projection<B>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// `mask` is `[batch, 1, seq, keys]` with `true` where attention is blocked; `None`
    /// means plain causal attention (no pad key precedes a real token).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // RoPE on the contiguous [b, s, heads, d] layout, then to [b, heads, s, d]: elementwise
        // ops on the swapped (strided) view are several times slower on CPU backends.
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, d]);
        let q = rope.apply(heads(self.q_proj.forward(x.clone()), h)).swap_dims(1, 2);
        let k = rope.apply(heads(self.k_proj.forward(x.clone()), kv)).swap_dims(1, 2);
        let v = heads(self.v_proj.forward(x), kv).swap_dims(1, 2);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let keys = k.dims()[2];
        let k = repeat_kv(k, h / kv);
        let v = repeat_kv(v, h / kv);
        let (mask, is_causal) = match mask {
            Some(m) => (Some(m.clone().expand([b, h, s, keys])), false),
            None => (None, true),
        };
        let options = AttentionModuleOptions {
            is_causal,
            ..Default::default()
        };
        let out = attention(q, k, v, mask, None, options);
        self.o_proj.forward(out.swap_dims(1, 2).reshape([b, s, h * d]))
    }
}

/// Query head `i` reads KV head `i / rep` (HF's `repeat_kv`), not a tiled copy.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    if rep == 1 {
        return x;
    }
    let [b, kv, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, rep, s, d])
        .reshape([b, kv * rep, s, d])
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), rope, mask, cache);
        let x = x + attn;
        let mlp = self.mlp.forward(self.post_attention_layernorm.forward(x.clone()));
        x + mlp
    }
}
