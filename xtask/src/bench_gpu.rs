//! `cargo xtask bench gpu`: the CUDA path at the qwen2.5-1.5b shape (random weights) in f32
//! and bf16 — prefill, KV-cache decode against the HBM bound, constrained decode, an SFT step
//! with its MFU, a GRPO step's time split, GPU memory — and CUDA correctness against the
//! committed transformers fixtures and the CPU. `scripts/bench_torch_gpu.py` measures the
//! same with torch in the same device call.

use anyhow::{bail, Result};

use crate::bench::{BenchArgs, Figure};

pub fn gpu_suite(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    let index = match args.device {
        Some(thinkjson_model::DeviceSpec::Cuda(i)) => i,
        None => 0,
        Some(other) => bail!("bench gpu runs on a CUDA device, not {other}"),
    };
    thinkjson_model::probe_cuda(index)?;
    #[cfg(feature = "cuda")]
    {
        cuda::run(args, index, figures)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = figures;
        bail!("bench gpu needs a binary built with --features cuda")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::time::Instant;

    use anyhow::Result;
    use thinkjson_decode::{Constraint, GenerateConfig, Generator, Request, SamplingConfig};
    use thinkjson_model::burn::backend::cuda::CudaDevice;
    use thinkjson_model::burn::backend::Autodiff;
    use thinkjson_model::burn::module::Module;
    use thinkjson_model::burn::optim::GradientsParams;
    use thinkjson_model::burn::tensor::backend::{AutodiffBackend, Backend};
    use thinkjson_model::train::{AdamW, AdamWConfig};
    use thinkjson_model::{CausalLm, CpuBackend, CudaBackend, CudaBf16Backend, ModelConfig, Padding, TokenBatch, Tokenizer};

    use crate::bench::{BenchArgs, Figure};

/// One field of `nvidia-smi --query-gpu` for device `index` (`None`: no nvidia-smi, or no answer).
fn nvidia_smi(field: &str, index: usize) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args([&format!("--query-gpu={field}"), "--format=csv,noheader,nounits", "-i", &index.to_string()])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// HBM bandwidth in bytes/s (the batch-1 decode bound: every weight read per token): the H200's
/// HBM3e when nvidia-smi names that card, else the H100 SXM's HBM3.
fn hbm_bytes_per_sec(index: usize) -> f64 {
    if nvidia_smi("name", index).is_some_and(|n| n.contains("H200")) { 4.8e12 } else { 3.35e12 }
}
/// Dense bf16 tensor-core peak of the H100 SXM and the H200 alike, FLOP/s (the MFU denominator).
const PEAK_BF16_FLOPS: f64 = 989e12;

/// GPU memory in use (MiB) as nvidia-smi reports it. burn's pool keeps what it allocated,
/// so after a measurement this is close to the measurement's peak.
fn gpu_memory_mib(index: usize) -> f64 {
    nvidia_smi("memory.used", index).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN)
}

    /// One part of the suite: appends its figures.
    type Part<'a> = dyn Fn(&mut Vec<Figure>) -> Result<()> + 'a;

    pub fn run(args: &BenchArgs, index: usize, figures: &mut Vec<Figure>) -> Result<()> {
        let device = CudaDevice::new(index);
        // Each part's figures go to stderr as they come, so a part that fails or a run cut
        // short by a device lease still leaves the others'; the first error is returned.
        let mut first_error = None;
        let mut printed = 0;
        let parts: [(&str, &Part); 5] = [
            ("parity f32", &|f| parity::<CudaBackend>("f32", &device, f)),
            ("parity bf16", &|f| parity::<CudaBf16Backend>("bf16", &device, f)),
            ("greedy vs CPU", &|f| greedy_matches_cpu(&device, f)),
            ("f32", &|f| measure::<CudaBackend, Autodiff<CudaBackend>>(args, "f32", 4.0, &device, index, f)),
            ("bf16", &|f| measure::<CudaBf16Backend, Autodiff<CudaBf16Backend>>(args, "bf16", 2.0, &device, index, f)),
        ];
        for (name, part) in parts {
            let t = Instant::now();
            if let Err(e) = part(figures) {
                eprintln!("bench gpu: {name}: {e:#}");
                first_error.get_or_insert(e.context(format!("bench gpu: {name}")));
            }
            for f in &figures[printed..] {
                eprintln!("{:<64} {:>14.6} {}", f.name, f.value, f.unit);
            }
            printed = figures.len();
            eprintln!("bench gpu: {name} done in {:.1} s", t.elapsed().as_secs_f64());
        }
        first_error.map_or(Ok(()), Err)
    }

    fn sync<B: Backend>(t: thinkjson_model::burn::tensor::Tensor<B, 3>) -> Result<()> {
        // Reading one value (a reduction of the output) waits for every queued kernel.
        let _ = t.sum().into_data();
        Ok(())
    }

    /// Max |logit − transformers| over the committed fixtures (f32 weights cast to `B`'s float).
    fn parity<B: Backend>(label: &str, device: &B::Device, figures: &mut Vec<Figure>) -> Result<()> {
        for name in ["qwen2-small", "llama-small"] {
            let dir = std::path::Path::new("fixtures").join(name);
            if !dir.exists() {
                continue;
            }
            let model = CausalLm::<B>::from_pretrained(&dir, device)?;
            let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
            let seqs: Vec<Vec<u32>> = serde_json::from_value(exp["sequences"].clone())?;
            let expected: Vec<Vec<Vec<f32>>> = serde_json::from_value(exp["logits"].clone())?;
            let batch = TokenBatch::new(&seqs, Padding::Right, 0)?;
            let logits: Vec<f32> = model.forward(&batch)?.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let vocab = model.config().vocab_size;
            let mut worst = 0.0f32;
            for (b, rows) in expected.iter().enumerate().take(seqs.len()) {
                for (t, want) in rows.iter().enumerate().take(seqs[b].len()) {
                    let start = (b * batch.seq + t) * vocab;
                    for (x, y) in logits[start..start + vocab].iter().zip(want) {
                        worst = worst.max((x - y).abs());
                    }
                }
            }
            figures.push(Figure { name: format!("gpu/parity/{name} {label} max |logit - transformers|"), value: f64::from(worst), unit: "" });
        }
        Ok(())
    }

    /// Greedy decoding of one random tiny model (host-seeded weights, so equal on both devices)
    /// on CPU and CUDA (f32): the share of equal tokens. The preset's vocabulary is Qwen2.5's, which
    /// covers the Qwen tokenizer the generator needs.
    fn greedy_matches_cpu(device: &CudaDevice, figures: &mut Vec<Figure>) -> Result<()> {
        let tok = Tokenizer::from_path(std::path::Path::new("assets/qwen"))?;
        let tiny = ModelConfig::preset("tiny")?;
        let prompts: Vec<Vec<u32>> = vec![vec![5, 17, 3, 42, 8], vec![11, 2, 90, 33]];
        let config = GenerateConfig { max_new_tokens: 32, sampling: SamplingConfig::greedy(), ..GenerateConfig::default() };
        let requests: Vec<Request> = prompts.into_iter().map(|p| Request::new(p, Constraint::None)).collect();
        let cpu = CausalLm::<CpuBackend>::random(&tiny, 0, &Default::default())?;
        let gpu = CausalLm::<CudaBackend>::random(&tiny, 0, device)?;
        let (a, _) = Generator::for_model(&tok, &cpu)?.generate(&cpu, &requests, &config)?;
        let (b, _) = Generator::for_model(&tok, &gpu)?.generate(&gpu, &requests, &config)?;
        let (same, total) = a.iter().zip(&b).fold((0usize, 0usize), |(s, n), (x, y)| {
            (s + x.tokens.iter().zip(&y.tokens).filter(|(p, q)| p == q).count(), n + x.tokens.len().max(y.tokens.len()))
        });
        figures.push(Figure { name: "gpu/parity/greedy tokens equal to CPU (f32, 2 x 32)".into(), value: 100.0 * same as f64 / total.max(1) as f64, unit: "%" });
        Ok(())
    }

    fn median(mut xs: Vec<f64>) -> f64 {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    }

    /// `B` for inference, `A` (its autodiff wrapper) for the training steps.
    fn measure<B, A>(args: &BenchArgs, label: &str, bytes_per_param: f64, device: &CudaDevice, index: usize, figures: &mut Vec<Figure>) -> Result<()>
    where
        B: Backend<Device = CudaDevice>,
        A: AutodiffBackend<Device = CudaDevice>,
    {
        let config = ModelConfig::preset("qwen2.5-1.5b")?;
        let shape = format!("gpu/qwen2.5-1.5b/{label}");
        let mut fig = |what: &str, value: f64, unit: &'static str| figures.push(Figure { name: format!("{shape}/{what}"), value, unit });
        let model = CausalLm::<B>::random(&config, 0, device)?;
        let params = model.num_params() as f64;
        let reps = if args.quick { 2 } else { 4 };

        for batch in [1usize, 16] {
            let seqs: Vec<Vec<u32>> = (0..batch).map(|b| (0..512u32).map(|i| (i * 31 + b as u32) % 50_000 + 3).collect()).collect();
            let tb = TokenBatch::new(&seqs, Padding::Right, 0)?;
            sync(model.hidden_states(&tb)?)?; // warm-up (autotune, pools)
            let times: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    sync(model.hidden_states(&tb)?)?;
                    Ok(t.elapsed().as_secs_f64())
                })
                .collect::<Result<_>>()?;
            fig(&format!("prefill {batch}x512"), (batch * 512) as f64 / median(times), "tokens/s");
        }
        fig("GPU memory after prefill", gpu_memory_mib(index), "MiB");

        let steps = if args.quick { 16 } else { 64 };
        for batch in [1usize, 16, 64] {
            crate::bench::decode_rate(&model, batch, 4)?; // warm-up
            let rate = crate::bench::decode_rate(&model, batch, steps)?;
            fig(&format!("decode batch {batch}"), rate, "tokens/s");
            if batch == 1 {
                let bound = hbm_bytes_per_sec(index) / (params * bytes_per_param);
                fig("decode batch 1 HBM bound", bound, "tokens/s");
                fig("decode batch 1 share of HBM bound", 100.0 * rate / bound, "%");
            }
        }
        fig("GPU memory after decode", gpu_memory_mib(index), "MiB");

        let tok = Tokenizer::from_path(std::path::Path::new("assets/qwen"))?;
        let generator = Generator::for_model(&tok, &model)?;
        let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string("fixtures/schemas/domain_batch_record.json").unwrap_or_else(|_| "{\"type\":\"object\"}".into()))?;
        let prompt = tok.encode("Extract the batch record as JSON.")?;
        let new_tokens = if args.quick { 32 } else { 128 };
        let mut step_secs = [0.0f64; 2];
        for (i, constrained) in [false, true].into_iter().enumerate() {
            let c = if constrained { Constraint::think_then_json(schema.clone(), new_tokens / 2) } else { Constraint::None };
            let reqs = vec![Request::new(prompt.clone(), c); 16];
            let cfg = GenerateConfig { max_new_tokens: new_tokens, sampling: SamplingConfig { temperature: 1.0, seed: 1, ..Default::default() }, ..Default::default() };
            generator.generate(&model, &reqs, &GenerateConfig { max_new_tokens: 4, ..cfg.clone() })?;
            let (_, st) = generator.generate(&model, &reqs, &cfg)?;
            let what = if constrained { "think-then-JSON decode batch 16" } else { "sampled decode batch 16 (generator)" };
            fig(what, st.generated_tokens as f64 / st.total_secs, "tokens/s");
            step_secs[i] = st.total_secs / st.steps.max(1) as f64;
        }
        fig("constrained step-time overhead, batch 16", 100.0 * (step_secs[1] / step_secs[0] - 1.0), "%");
        drop(generator);
        drop(model);

        // One SFT step: loss on the second half of each sequence, backward, clip, AdamW.
        let (batch, seq) = if args.quick { (1, 256) } else { (4, 512) };
        let mut train = CausalLm::<A>::random(&config, 0, device)?;
        let examples: Vec<thinkjson_sft::SftExample> = (0..batch)
            .map(|b| {
                let ids: Vec<u32> = (0..=seq as u32).map(|i| (i * 31 + b as u32 * 7) % 50_000 + 3).collect();
                thinkjson_sft::SftExample { id: String::new(), prompt: ids[..seq / 2].to_vec(), completion: ids[seq / 2..].to_vec() }
            })
            .collect();
        let rows: Vec<Vec<usize>> = (0..batch).map(|b| vec![b]).collect();
        let mb = thinkjson_sft::MicroBatch::build(&examples, &rows, 0, false)?;
        let mut opt = AdamW::<A>::new(AdamWConfig::default());
        let mut times = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            let loss = thinkjson_sft::completion_loss(&train, &mb, mb.targets.len(), 2048)?;
            let grads = GradientsParams::from_grads(thinkjson_model::train::backward(loss), &train);
            train = opt.step(1e-5, train, grads)?.0;
            times.push(t.elapsed().as_secs_f64());
        }
        let t = median(times[1..].to_vec());
        let tokens = (batch * seq) as f64;
        fig(&format!("sft step {batch}x{seq}"), tokens / t, "tokens/s");
        fig(&format!("sft step {batch}x{seq} MFU (6·params·tokens / time / 989 TFLOP/s)"), 100.0 * 6.0 * params * tokens / t / PEAK_BF16_FLOPS, "%");
        fig("GPU memory after SFT steps", gpu_memory_mib(index), "MiB");
        drop(train);
        drop(opt);
        crate::bench_grpo::grpo_step::<A>(args.quick, &format!("{shape}/grpo"), "qwen2.5-1.5b", device, figures)?;
        figures.push(Figure { name: format!("{shape}/GPU memory after the GRPO step"), value: gpu_memory_mib(index), unit: "MiB" });
        Ok(())
    }
}
