//! The backward pass every trainer runs, in one place.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

/// `loss.backward()`: the gradients of every tracked tensor the loss depends on. On the CPU
/// training backend the pass runs on a rayon pool kept for backward passes, so its parallel
/// kernels split work between workers directly instead of waking the caller after each one
/// (`cpu_kernels::on_backward_workers` says when it does and why that is safe); the
/// gradients are those of `loss.backward()` bit for bit. Other backends call it as is.
pub fn backward<B: AutodiffBackend, const D: usize>(loss: Tensor<B, D>) -> B::Gradients {
    crate::cpu_kernels::on_backward_workers::<B, _>(move || loss.backward())
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::GradientsParams;

    use crate::{CausalLm, CpuTrainBackend as T, ModelConfig, Padding, TokenBatch};

    /// Every parameter's gradient as bits, in module order (empty where it has none).
    fn gradient_bits(model: &CausalLm<T>, grads: <T as AutodiffBackend>::Gradients) -> Vec<Vec<u32>> {
        struct Collect {
            grads: GradientsParams,
            out: Vec<Vec<u32>>,
        }
        impl ModuleVisitor<T> for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<T, D>>) {
                let values = self.grads.get::<<T as AutodiffBackend>::InnerBackend, D>(param.id).map(|g| g.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default());
                self.out.push(values.unwrap_or_default().iter().map(|v| v.to_bits()).collect());
            }
        }
        let mut visitor = Collect { grads: GradientsParams::from_grads(grads, model), out: Vec::new() };
        model.visit(&mut visitor);
        visitor.out
    }

    fn loss(model: &CausalLm<T>, seed: u32) -> Tensor<T, 1> {
        let ids: Vec<u32> = (0..160u32).map(|i| (i * 7 + seed) % 900 + 3).collect();
        let targets: Vec<u32> = ids.iter().skip(1).copied().chain([1]).collect();
        let batch = TokenBatch::new(&[ids], Padding::Right, 0).expect("batch");
        model.token_logprobs(&batch, &targets, 64).expect("log-probs").mean().neg()
    }

    /// The pool's gradients are the caller's bit for bit, and passes from several threads at
    /// once (one takes the pool, the others run on their own threads) all finish with them.
    #[test]
    fn backward_on_the_pool_keeps_every_gradient_bit() {
        // 160 positions and 2,000 words: the projections and the head are large enough for gemm
        // to split them over the threads.
        let config = ModelConfig::preset("tiny").expect("preset").with_vocab_size(2000);
        let model: CausalLm<T> = CausalLm::random(&config, 3, &Default::default()).expect("model");
        let on_caller = gradient_bits(&model, loss(&model, 0).backward());
        assert!(on_caller.iter().filter(|g| g.iter().any(|&b| f32::from_bits(b) != 0.0)).count() > 10);
        assert_eq!(gradient_bits(&model, backward(loss(&model, 0))), on_caller);
        // The pool does take a pass (other tests may hold it for a moment).
        let on_pool = (0..500).any(|_| {
            let name = crate::cpu_kernels::on_backward_workers::<T, _>(|| std::thread::current().name().map(str::to_owned));
            name.is_some_and(|n| n.starts_with("thinkjson-backward")) || {
                std::thread::sleep(std::time::Duration::from_millis(10));
                false
            }
        });
        assert!(on_pool, "no backward pass ran on the backward pool");
        let expected: Vec<_> = (0..4).map(|seed| gradient_bits(&model, loss(&model, seed).backward())).collect();
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..4u32).map(|seed| { let model = &model; s.spawn(move || gradient_bits(model, backward(loss(model, seed)))) }).collect();
            for (seed, run) in runs.into_iter().enumerate() {
                assert_eq!(run.join().expect("a backward pass panicked"), expected[seed], "seed {seed}");
            }
        });
    }
}
