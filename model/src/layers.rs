//! The decoder's building blocks. Linear weights are stored burn-style `[in, out]`;
//! `weights.rs` is the only place that converts from and to HF's `[out, in]`.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Int, Tensor};

use crate::lean_attention::{causal_attention, repeat_kv};
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
/// sequence, which halved batched decode throughput. On the plain CPU backend a decode
/// step's few rows go to the streaming kernel ([`crate::cpu_kernels::matmul_few_rows`]) and
/// more rows to gemm without burn's output copies ([`crate::cpu_kernels::matmul_gemm`]); the
/// CPU training backend takes the same gemm calls forward and backward
/// ([`crate::lean_linear`]).
pub fn project<B: Backend>(linear: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, s, d] = x.dims();
    let x = x.reshape([b * s, d]);
    let weight = linear.weight.val();
    let kernel = crate::cpu_kernels::matmul_few_rows(&x, &weight)
        .or_else(|| crate::cpu_kernels::matmul_gemm(&x, &weight))
        .or_else(|| crate::lean_linear::matmul(&x, &weight));
    let y = match kernel {
        Some(y) => match &linear.bias {
            Some(bias) => y + bias.val().unsqueeze::<2>(),
            None => y,
        },
        None => linear.forward(x),
    };
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
        let act = crate::lean_mlp::swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(act)
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
        if let Some(out) = crate::cpu_kernels::rope(&x, &self.cos, &self.sin) {
            return out;
        }
        // Training on the CPU: the same kernel forward, and one for the backward pass.
        match crate::lean_rope::rope(x, &self.cos, &self.sin) {
            Ok(out) => out,
            Err(x) => self.apply_ops(x),
        }
    }

    /// [`Rope::apply`] by burn's tensor ops (other backends).
    pub(crate) fn apply_ops(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..half]);
        let x2 = x.clone().slice([0..b, 0..s, 0..h, half..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// Keys and values of one layer kept between decoding steps, as a list of blocks of
/// `[batch, kv_heads, n, head_dim]` (n ≤ [`CACHE_BLOCK`] except for a long prefill kept
/// whole). A step adds its positions to the last, open block; full blocks are never copied
/// again. Where blocks are written in place (the CPU backend, [`crate::cpu_kernels`]), a new
/// block is allocated with room for [`CACHE_BLOCK`] positions and each step writes its keys
/// into it, so a step costs its own keys; elsewhere the open block is rebuilt by
/// concatenation (one block per step, not the whole cache).
#[derive(Debug, Clone)]
pub struct LayerKv<B: Backend> {
    /// Every block but the last is full; the last holds `open` positions (and may have room
    /// after them, which no reader sees: see [`LayerKv::views`]).
    pub(crate) blocks: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    pub(crate) open: usize,
    pub(crate) len: usize,
}

pub type LayerCache<B> = Option<LayerKv<B>>;

/// Positions per cache block.
const CACHE_BLOCK: usize = 128;

impl<B: Backend> LayerKv<B> {
    /// A cache of one full block.
    pub(crate) fn whole(k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        let len = k.dims()[2];
        Self { blocks: vec![(k, v)], open: len, len }
    }

    /// The blocks as readers see them: the last cut to its filled positions (a view, no copy,
    /// on the CPU backend).
    pub(crate) fn views(&self) -> Vec<(Tensor<B, 4>, Tensor<B, 4>)> {
        let mut blocks = self.blocks.clone();
        if let Some((k, v)) = blocks.last_mut() {
            *k = filled_part(k.clone(), self.open);
            *v = filled_part(v.clone(), self.open);
        }
        blocks
    }

    /// One block holding every cached key and value (a copy when there are several).
    pub(crate) fn filled(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match self.views().as_slice() {
            [(k, v)] => (k.clone(), v.clone()),
            blocks => (
                Tensor::cat(blocks.iter().map(|(k, _)| k.clone()).collect(), 2),
                Tensor::cat(blocks.iter().map(|(_, v)| v.clone()).collect(), 2),
            ),
        }
    }

    /// The cache of `rows.len()` sequences where sequence `i` is this cache's sequence
    /// `rows[i]` (rows must be in range).
    pub(crate) fn select_rows(&self, rows: &[usize]) -> LayerKv<B> {
        let blocks = match self.blocks.first().map(|(k, _)| k.device()) {
            None => Vec::new(),
            Some(device) => {
                let idx = rows_index::<B>(rows, &device);
                self.blocks.iter().map(|(k, v)| (k.clone().select(0, idx.clone()), v.clone().select(0, idx.clone()))).collect()
            }
        };
        LayerKv { blocks, open: self.open, len: self.len }
    }

    /// Keeps sequences `keep` (strictly ascending, in range) only: moved down in place where
    /// blocks are written in place, selected into new blocks elsewhere.
    pub(crate) fn keep_sequences(self, keep: &[usize]) -> LayerKv<B> {
        let Some(device) = self.blocks.first().map(|(k, _)| k.device()) else { return self };
        let idx = rows_index::<B>(keep, &device);
        let keep_block = |t: Tensor<B, 4>| crate::cpu_kernels::keep_sequences(t, keep).unwrap_or_else(|t| t.select(0, idx.clone()));
        let blocks = self.blocks.into_iter().map(|(k, v)| (keep_block(k), keep_block(v))).collect();
        LayerKv { blocks, open: self.open, len: self.len }
    }

    /// Appends `[batch, kv_heads, s, head_dim]` keys and values to `slot`.
    fn append(slot: &mut LayerCache<B>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> &LayerKv<B> {
        let s = k.dims()[2];
        let room = crate::cpu_kernels::writes_in_place::<B>();
        let mut cache = slot.take().unwrap_or(LayerKv { blocks: Vec::new(), open: 0, len: 0 });
        // Block boundaries follow the positions, not the room, so they are the same on every
        // backend (attention sums block by block on some).
        let last = if cache.open + s <= CACHE_BLOCK { cache.blocks.pop() } else { None };
        match last {
            Some((pk, pv)) => {
                let at = cache.open;
                cache.blocks.push((extended(pk, at, k, room), extended(pv, at, v, room)));
                cache.open = at + s;
            }
            None => {
                // The open block is full from here on: readers see its filled positions only.
                if let Some((pk, pv)) = cache.blocks.last_mut() {
                    *pk = filled_part(pk.clone(), cache.open);
                    *pv = filled_part(pv.clone(), cache.open);
                }
                cache.blocks.push((new_block(k, room), new_block(v, room)));
                cache.open = s;
            }
        }
        cache.len += s;
        slot.insert(cache)
    }
}

fn rows_index<B: Backend>(rows: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(burn::tensor::TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]), device)
}

/// The first `n` positions of a block.
fn filled_part<B: Backend>(t: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    let [b, kv, cap, d] = t.dims();
    if cap == n {
        t
    } else {
        t.slice([0..b, 0..kv, 0..n, 0..d])
    }
}

/// `new` (`[b, kv, s, d]`) as a block of its own: with room up to [`CACHE_BLOCK`] positions
/// where blocks are written in place, row-major either way (a prefill's keys are a view of
/// the projection, `[b, s, kv, d]` swapped, and the CPU kernel reads a row-major block faster
/// on every later step).
fn new_block<B: Backend>(new: Tensor<B, 4>, room: bool) -> Tensor<B, 4> {
    let [b, kv, s, d] = new.dims();
    if room && s < CACHE_BLOCK {
        let free = Tensor::zeros([b, kv, CACHE_BLOCK - s, d], &new.device());
        Tensor::cat(vec![new, free], 2)
    } else {
        crate::cpu_kernels::contiguous(new)
    }
}

/// `block`'s first `at` positions followed by `new`'s: written into the block's room when it
/// has some and the cache alone holds it, else copied into a new block (with room where
/// blocks are written in place).
fn extended<B: Backend>(block: Tensor<B, 4>, at: usize, new: Tensor<B, 4>, room: bool) -> Tensor<B, 4> {
    let [b, kv, s, d] = new.dims();
    let block = if block.dims()[2] >= at + s {
        match crate::cpu_kernels::write_positions(block, at, &new) {
            Ok(written) => return written,
            Err(block) => block,
        }
    } else {
        block
    };
    let mut parts = if at == 0 { vec![new] } else { vec![filled_part(block, at), new] };
    if room && at + s < CACHE_BLOCK {
        parts.push(Tensor::zeros([b, kv, CACHE_BLOCK - at - s, d], &parts[0].device()));
    }
    Tensor::cat(parts, 2)
}

/// Inference attention goes to the CPU kernel ([`crate::cpu_kernels::attention`]) where it
/// applies; elsewhere, over a cache, up to this many new positions per sequence read the grouped KV
/// heads directly ([`grouped_attention`]) and longer runs (prefills) use the fused kernel.
const GROUPED_MAX_QUERIES: usize = 32;

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
        let merge_heads = |out: Tensor<B, 4>| self.o_proj.forward(out.swap_dims(1, 2).reshape([b, s, h * d]));
        let (k, v) = match cache {
            Some(slot) => {
                let cache = LayerKv::append(slot, k, v);
                let blocks = cache.views();
                let out = crate::cpu_kernels::attention(&q, &blocks, cache.len, mask).or_else(|| {
                    (s <= GROUPED_MAX_QUERIES).then(|| grouped_attention(q.clone(), &blocks, cache.len, mask))
                });
                if let Some(out) = out {
                    return merge_heads(out);
                }
                cache.filled()
            }
            None => {
                if let Some(out) = crate::cpu_kernels::attention(&q, &[(k.clone(), v.clone())], s, mask) {
                    return merge_heads(out);
                }
                (k, v)
            }
        };
        let keys = k.dims()[2];
        let out = match mask {
            Some(m) => {
                let mask = Some(m.clone().expand([b, h, s, keys]));
                attention(q, repeat_kv(k, h / kv), repeat_kv(v, h / kv), mask, None, AttentionModuleOptions::default())
            }
            // Each query head reads its KV head in place where the training kernels run.
            None => causal_attention(q, k, v),
        };
        merge_heads(out)
    }
}

/// Attention of a few new queries over a cache, without copying it: the query heads are
/// grouped by the KV head they read (`[b, kv, rep·s, d]`), so each block of each KV head's keys
/// and values is read in place by one strided matmul for all its query heads. `mask` is
/// `[b, 1, s, keys]` (`true` = blocked); without one, the queries are the last `s`
/// positions, causal. Returns `[b, h, s, d]`.
fn grouped_attention<B: Backend>(
    q: Tensor<B, 4>,
    blocks: &[(Tensor<B, 4>, Tensor<B, 4>)],
    keys: usize,
    mask: Option<&Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let [b, h, s, d] = q.dims();
    let kv = blocks.first().map_or(h, |(k, _)| k.dims()[1]);
    let rep = h / kv;
    let scale = 1.0 / (d as f64).sqrt();
    let q = q.reshape([b, kv, rep * s, d]);
    let parts: Vec<Tensor<B, 4>> = blocks.iter().map(|(k, _)| q.clone().matmul(k.clone().swap_dims(2, 3))).collect();
    let scores = Tensor::cat(parts, 3) * scale;
    let blocked = match mask {
        Some(m) => Some(m.clone().unsqueeze_dim::<5>(1)),
        None if s > 1 => {
            // Query i sits at position keys − s + i and sees keys up to it.
            let past = keys - s;
            let causal: Vec<bool> = (0..s).flat_map(|i| (0..keys).map(move |j| j > past + i)).collect();
            Some(Tensor::<B, 5, Bool>::from_data(burn::tensor::TensorData::new(causal, [1, 1, 1, s, keys]), &scores.device()))
        }
        None => None,
    };
    let scores = match blocked {
        Some(m) => {
            let shape = [b, kv, rep, s, keys];
            scores.reshape(shape).mask_fill(m.expand(shape), f32::NEG_INFINITY).reshape([b, kv, rep * s, keys])
        }
        None => scores,
    };
    let probs = softmax(scores, 3);
    let mut out = Tensor::<B, 4>::zeros([b, kv, rep * s, d], &probs.device());
    let mut start = 0;
    for (_, v) in blocks {
        let n = v.dims()[2];
        out = out + probs.clone().slice([0..b, 0..kv, 0..rep * s, start..start + n]).matmul(v.clone());
        start += n;
    }
    out.reshape([b, h, s, d])
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    type B = crate::CpuBackend;

    /// The CPU RoPE kernel rounds as burn's ops do: equal bit for bit, so greedy decoding
    /// does not change with it.
    #[test]
    fn rope_kernel_equals_the_tensor_ops_bit_for_bit() {
        let device = Default::default();
        for (b, s, h, d) in [(2, 5, 3, 8), (1, 7, 9, 64)] {
            let x = Tensor::<B, 4>::random([b, s, h, d], Distribution::Normal(0.0, 1.0), &device);
            let table = || Tensor::<B, 4>::random([b, s, 1, d], Distribution::Uniform(-1.0, 1.0), &device);
            let rope = Rope { cos: table(), sin: table() };
            let bits = |t: Tensor<B, 4>| t.into_data().to_vec::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>();
            let expected = bits(rope.apply_ops(x.clone()));
            match crate::cpu_kernels::rope(&x, &rope.cos, &rope.sin) {
                Some(out) => assert_eq!(bits(out), expected, "[{b}, {s}, {h}, {d}]"),
                None => assert!(!crate::cpu_kernels::available(), "the RoPE kernel declined on a CPU with AVX2 and FMA"),
            }
        }
    }

    /// The CPU decode kernel against the burn-op path it replaces: a first block that is a
    /// strided view (as a prefill leaves it), a contiguous second block, GQA, with a padding
    /// mask and without one (the causal rule for several new queries).
    #[test]
    fn attention_kernel_equals_grouped_attention() {
        // Head sizes of 4 vectors of 8 lanes, 8 (SmolLM2's 64), and 8 + 1.
        for d in [32, 64, 72] {
            attention_kernel_case(d);
        }
    }

    fn attention_kernel_case(d: usize) {
        let device = Default::default();
        let (b, h, kv) = (3, 6, 2);
        let normal = Distribution::Normal(0.0, 1.0);
        let block = |n: usize, strided: bool| {
            let make = || {
                if strided {
                    Tensor::<B, 4>::random([b, n, kv, d], normal, &device).swap_dims(1, 2)
                } else {
                    Tensor::<B, 4>::random([b, kv, n, d], normal, &device)
                }
            };
            (make(), make())
        };
        let blocks = vec![block(5, true), block(7, false), block(40, true)];
        let keys = 52;
        // 40 new queries: a prefill, cut into two runs of queries.
        for s in [1, 3, 40] {
            let q = Tensor::<B, 4>::random([b, h, s, d], normal, &device);
            // Sequence 1 has two pad keys at the front; every query sees itself.
            let blocked: Vec<bool> = (0..b * s * keys)
                .map(|i| {
                    let (bi, t, p) = (i / (s * keys), i / keys % s, i % keys);
                    (bi == 1 && p < 2) || p > keys - s + t
                })
                .collect();
            let mask = Tensor::<B, 4, Bool>::from_data(TensorData::new(blocked, [b, 1, s, keys]), &device);
            for mask in [None, Some(&mask)] {
                let expected = grouped_attention(q.clone(), &blocks, keys, mask);
                match crate::cpu_kernels::attention(&q, &blocks, keys, mask) {
                    Some(out) => {
                        let diff: f32 = (out - expected).abs().max().into_scalar();
                        assert!(diff < 1e-5, "d {d}, s {s}, mask {}: max |Δ| {diff}", mask.is_some());
                    }
                    None => assert!(!crate::cpu_kernels::available(), "the kernel declined on a CPU with AVX2 and FMA"),
                }
            }
        }
    }
}
