//! Inference kernels for the CPU backend: projections and the vocabulary head for up to
//! [`MAX_ROWS`] rows (a decode step), grouped-query attention for inference (decode steps
//! over the KV cache, and prefills), in-place writes into the KV cache's blocks, RoPE, and
//! SwiGLU's `silu(gate) · up` — which training uses too, with its backward pass, both with
//! burn's bits. Causal attention of many queries (training's forward and backward, a long
//! prefill without a cache before it) runs block products through gemm instead
//! (`imp/training_attention.rs`).
//!
//! A decode step multiplies one row per sequence by every weight of the model and reads every
//! cached key and value once: its floor is memory traffic, not arithmetic (SmolLM2-135M:
//! 540 MB of f32 weights per step; a batch of 16 at 600 tokens of context adds 440 MB of
//! cache). Measured on a 2-core AMD EPYC, such a step moved ~8 GB/s where the machine
//! streams ~38: the floor is not reached yet. burn-flex's GEMM packs its operands and runs products under 192³ multiply-adds on
//! one thread; on 2 cores it read decode-shaped weights at 4–6 GB/s, and its batched small
//! matmuls over cache blocks were the larger half of a step at 600 tokens. These kernels
//! stream each weight and each cache block once, on every core, with AVX2 and FMA (one path
//! on every x86-64 CPU that has them, AVX-512 ones included, so all sum alike; the
//! exponential and the row-major projections take sixteen lanes where AVX-512F is present,
//! with each lane's bits unchanged). In a prefill,
//! the attention kernel also spares the copies of burn's path (KV heads repeated to the
//! query heads, the mask expanded to every head).
//!
//! Recognised at run time as [`crate::lean_mlp`] is: only the plain CPU backend (no autodiff)
//! on f32 tensors, with AVX2 and FMA, takes these paths. Every function returns `None` when it
//! does not apply and the caller runs burn's ops, so other backends, dtypes and CPUs are
//! unchanged. Training reaches the SwiGLU kernels through [`crate::lean_mlp`]'s custom op,
//! which hands them the plain backend's tensors, and the target log-probs of the vocabulary
//! head (`log_softmax(logits / T)[target]` and its gradient, `imp/logprobs.rs`) through
//! [`crate::lean_logprobs`]'s.

/// Largest row count (batch × new positions) a projection sends to the streaming kernel;
/// more rows (a prefill) reuse each weight enough for gemm's packed products to pay off
/// (`matmul_gemm`).
pub(crate) const MAX_ROWS: usize = 32;

#[cfg(all(feature = "flex", target_arch = "x86_64"))]
mod imp;

#[cfg(all(feature = "flex", target_arch = "x86_64"))]
pub(crate) use imp::{attention, attention_backward, attention_forward, contiguous, embedding_grad, keep_sequences, matmul_few_rows, matmul_gemm, rope, rope_backward, swiglu, swiglu_backward, target_logprobs, target_logprobs_backward, transposed, write_positions, writes_in_place};

#[cfg(test)]
pub(crate) use imp::available;

#[cfg(all(test, feature = "flex", target_arch = "x86_64"))]
pub(crate) use imp::TRAINING_QUERY_BLOCK;

#[cfg(not(all(feature = "flex", target_arch = "x86_64")))]
mod imp {
    use burn::tensor::backend::Backend;
    use burn::tensor::{Bool, Tensor};

    #[cfg(test)]
    pub(crate) fn available() -> bool {
        false
    }

    pub(crate) fn matmul_few_rows<B: Backend>(_: &Tensor<B, 2>, _: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        None
    }

    pub(crate) fn matmul_gemm<B: Backend>(_: &Tensor<B, 2>, _: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        None
    }

    pub(crate) fn transposed<B: Backend>(_: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        None
    }

    pub(crate) fn embedding_grad<B: Backend>(existing: Option<Tensor<B, 2>>, _: &Tensor<B, 2>, _: &[usize], _: usize) -> Result<Tensor<B, 2>, Option<Tensor<B, 2>>> {
        Err(existing)
    }

    pub(crate) fn contiguous<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
        t
    }

    pub(crate) struct RowStats {
        pub(crate) lse: Vec<f32>,
        pub(crate) entropy: Option<Vec<f32>>,
    }

    pub(crate) fn target_logprobs<B: Backend>(_: &Tensor<B, 2>, _: &[u32], _: f32, _: bool) -> Option<(Tensor<B, 1>, RowStats)> {
        None
    }

    pub(crate) fn target_logprobs_backward<B: Backend>(_: &Tensor<B, 2>, _: &[u32], _: f32, _: &[f32], _: &Tensor<B, 1>) -> Option<Tensor<B, 2>> {
        None
    }

    pub(crate) fn writes_in_place<B: Backend>() -> bool {
        false
    }

    pub(crate) fn write_positions<B: Backend>(block: Tensor<B, 4>, _: usize, _: &Tensor<B, 4>) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
        Err(block)
    }

    pub(crate) fn keep_sequences<B: Backend>(block: Tensor<B, 4>, _: &[usize]) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
        Err(block)
    }

    pub(crate) fn rope<B: Backend>(_: &Tensor<B, 4>, _: &Tensor<B, 4>, _: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
        None
    }

    pub(crate) fn rope_backward<B: Backend>(_: &Tensor<B, 4>, _: &Tensor<B, 4>, _: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
        None
    }

    pub(crate) fn swiglu<B: Backend>(_: &Tensor<B, 3>, _: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
        None
    }

    pub(crate) type Gradients<B> = (Option<Tensor<B, 3>>, Option<Tensor<B, 3>>);

    pub(crate) fn swiglu_backward<B: Backend>(_: &Tensor<B, 3>, _: &Tensor<B, 3>, _: &Tensor<B, 3>, _: bool, _: bool) -> Option<Gradients<B>> {
        None
    }

    pub(crate) fn attention_forward<B: Backend>(_: &Tensor<B, 4>, _: &Tensor<B, 4>, _: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
        None
    }

    pub(crate) fn attention_backward<B: Backend>(_: &Tensor<B, 4>, _: &Tensor<B, 4>, _: &Tensor<B, 4>, _: &Tensor<B, 4>) -> Option<[Tensor<B, 4>; 3]> {
        None
    }

    pub(crate) fn attention<B: Backend>(
        _: &Tensor<B, 4>,
        _: &[(Tensor<B, 4>, Tensor<B, 4>)],
        _: usize,
        _: Option<&Tensor<B, 4, Bool>>,
    ) -> Option<Tensor<B, 4>> {
        None
    }
}

#[cfg(not(all(feature = "flex", target_arch = "x86_64")))]
pub(crate) use imp::{attention, attention_backward, attention_forward, contiguous, embedding_grad, keep_sequences, matmul_few_rows, matmul_gemm, rope, rope_backward, swiglu, swiglu_backward, target_logprobs, target_logprobs_backward, transposed, write_positions, writes_in_place};

/// Runs `f` — a forward pass, many parallel kernels in a row — on one of rayon's worker
/// threads, when `B` is the CPU backend (plain or autodiff) and the caller is not a worker
/// already. Called from outside the pool, every parallel kernel hands its work to the
/// workers and puts the caller to sleep until they finish: two context switches per kernel,
/// ~360 kernels per decode step of a 30-layer model, and on 2 cores the caller's wake-up
/// competes with the workers for them (a fifth of a batch-1 step's samples were the
/// scheduler's). On a worker, the kernels split their work with the other workers directly.
/// Only forward passes go here, never a wait on another thread (a data-parallel peer's
/// gradient sum would hold a worker that the peers' kernels need) and never a backward pass:
/// burn's autodiff holds its graph's lock while the backward kernels run, and a worker
/// waiting inside one of them may take up another thread's queued pass, whose end (burn's
/// clean-up of orphaned graphs locks every graph) would then wait on the lock its own thread
/// holds further down the stack. A forward holds no lock while its kernels run.
#[cfg(feature = "flex")]
pub(crate) fn on_workers<B: burn::tensor::backend::Backend, R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::any::TypeId;
    let cpu = TypeId::of::<B>() == TypeId::of::<crate::CpuBackend>() || TypeId::of::<B>() == TypeId::of::<crate::CpuTrainBackend>();
    if !cpu || rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// Runs `f` — a backward pass — on a rayon pool kept for backward passes alone, when `B` is
/// the CPU training backend, the caller is no pool's worker and no other thread's backward
/// pass holds that pool; otherwise on the caller's thread, as before. From outside a pool,
/// each of a backward pass's ~1,000 parallel kernels (a 30-layer model) puts the caller to
/// sleep and wakes a worker, then the caller again (on 2 cores the scheduler had ~8 % of a
/// 1×128 training step's samples; the workers' own sleeps between kernels, much of that,
/// stay). [`on_workers`]'s pool cannot take backward passes
/// (see there): there a worker waiting inside one could take up another thread's queued
/// forward, whose clean-up locks every graph, this one's included. This pool only ever
/// holds one backward pass (the `try_lock`) and the kernels it splits, so nothing of
/// another thread can be queued behind its graph's lock. Same thread count as the main
/// pool, so every kernel splits its work alike and the gradients keep their bits (tested).
#[cfg(feature = "flex")]
pub(crate) fn on_backward_workers<B: burn::tensor::backend::Backend, R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::any::TypeId;
    use std::sync::{Mutex, OnceLock, TryLockError};
    static POOL: OnceLock<Option<(Mutex<()>, rayon::ThreadPool)>> = OnceLock::new();
    if TypeId::of::<B>() != TypeId::of::<crate::CpuTrainBackend>() || rayon::current_thread_index().is_some() {
        return f();
    }
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("thinkjson-backward-{i}"))
            // The stack of a main thread, where backward passes ran before (a worker's
            // default is 2 MiB; reserved, touched only as used).
            .stack_size(8 << 20)
            .build()
            .ok()
            .map(|pool| (Mutex::new(()), pool))
    });
    let Some((lock, pool)) = pool else { return f() };
    let _held = match lock.try_lock() {
        Ok(guard) => guard,
        // A pass that panicked in the pool left it free: the guard only marks it taken.
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return f(),
    };
    pool.install(f)
}

/// Without the Flex backend there are no kernels of ours to gather onto the workers.
#[cfg(not(feature = "flex"))]
pub(crate) fn on_workers<B: burn::tensor::backend::Backend, R: Send>(f: impl FnOnce() -> R + Send) -> R {
    f()
}

/// Without the Flex backend there is no pool of ours to run backward passes on.
#[cfg(not(feature = "flex"))]
pub(crate) fn on_backward_workers<B: burn::tensor::backend::Backend, R: Send>(f: impl FnOnce() -> R + Send) -> R {
    f()
}
