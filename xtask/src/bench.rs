//! `cargo xtask bench`: throughput figures written as JSON (`bench.json` by default).
//! Timings are reported, never asserted.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use thinkjson_model::burn::tensor::backend::{AutodiffBackend, Backend};
use thinkjson_model::{CausalLm, CpuBackend, CpuTrainBackend, KvCache, ModelConfig, Padding, TokenBatch};

#[derive(Args)]
pub struct BenchArgs {
    /// Which suite: `all` (model, decode, reward, sft, grpo), or one of `model`, `decode`,
    /// `sft`, `grpo`, `synth`, `reward`, `gguf` (import and load times of a GGUF file), `gpu`
    /// (CUDA; a binary built with --features cuda), `serve` (HTTP load on loopback,
    /// continuous batching vs one request at a time; `--model`, default a tiny random one).
    #[arg(default_value = "all")]
    suite: String,
    /// Small shapes and few steps (what CI runs).
    #[arg(long)]
    pub quick: bool,
    /// Comma-separated presets for the model suite (random weights); `--model` measures a real
    /// model instead.
    #[arg(long)]
    shapes: Option<String>,
    /// The model suite at real prompt lengths: for each length L (comma-separated, e.g.
    /// 2048,4096), prefill 1×L, decode batch 1 and 8 after L-token prompts and (models under
    /// 0.5B) a training forward+backward of 1×L with the peak RSS after it, instead of the
    /// short-prompt figures.
    #[arg(long, value_delimiter = ',')]
    context: Option<Vec<usize>>,
    /// The CUDA device of the `gpu` suite (cuda:0 when not given).
    #[arg(long)]
    pub device: Option<thinkjson_model::DeviceSpec>,
    /// Where to write the figures.
    #[arg(long, default_value = "bench.json")]
    out: PathBuf,
    /// The `gguf` suite: the GGUF file to measure (default: the embedded SmolLM2).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// A real model (HF directory, GGUF file or embedded name) for the `model` suite (its
    /// weights instead of a random preset) and the `grpo` suite (GRPO steps of it on synthetic
    /// prompts: free rollouts, β = 0, dapo, the default token budget, as
    /// `scripts/bench_trl_grpo.py` runs TRL on the same prompts).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `grpo --model`: prompts per step, completions per prompt (G), new tokens per completion
    /// and steps (the first is reported apart: it allocates the optimiser state).
    #[arg(long, value_delimiter = ',', default_value = "2,8,64,3")]
    pub grpo_shape: Vec<usize>,
    /// `grpo --model`: longest prompt kept, in tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_prompt_len: usize,
    /// `grpo --model`: activation checkpointing of the training passes (GRPO's
    /// `gradient_checkpointing`; TRL's `GRPOConfig` has it on by default).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// `grpo --model`: also write the prompts (chat-rendered text and ids) as JSONL, for
    /// `scripts/bench_trl_grpo.py --prompts`.
    #[arg(long)]
    pub prompts_out: Option<PathBuf>,
    /// `serve`: concurrent clients, requests per client, max_tokens per request.
    #[arg(long, value_delimiter = ',', default_value = "64,4,16")]
    pub serve_load: Vec<usize>,
    /// `serve`: `short` (40-token records) or `extraction` (the synthetic extraction prompts:
    /// document text and schema, several hundred tokens).
    #[arg(long, default_value = "short")]
    pub serve_prompts: String,
    /// Scratch folder of the `gguf` suite's child steps.
    #[arg(long, hide = true)]
    pub scratch: Option<PathBuf>,
}

#[derive(Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
}

#[derive(Serialize)]
struct Report {
    suite: String,
    backend: &'static str,
    cores: usize,
    figures: Vec<Figure>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let mut figures = Vec::new();
    match args.suite.as_str() {
        "model" => model_suite(&args, &mut figures)?,
        "synth" => synth_suite(&args, &mut figures)?,
        "reward" => reward_suite(&args, &mut figures)?,
        "decode" => decode_suite(&args, &mut figures)?,
        "sft" => sft_suite(&args, &mut figures)?,
        "grpo" => crate::bench_grpo::grpo_suite(&args, &mut figures)?,
        "gpu" => crate::bench_gpu::gpu_suite(&args, &mut figures)?,
        "gguf" => crate::bench_gguf::gguf_suite(&args, &mut figures)?,
        "serve" => crate::bench_serve::serve_suite(&args, &mut figures)?,
        "gguf-import" => crate::bench_gguf::import_step(&args, &mut figures)?,
        "gguf-load" => crate::bench_gguf::load_step(&args, &mut figures)?,
        "all" => {
            model_suite(&args, &mut figures)?;
            decode_suite(&args, &mut figures)?;
            reward_suite(&args, &mut figures)?;
            sft_suite(&args, &mut figures)?;
            crate::bench_grpo::grpo_suite(&args, &mut figures)?;
        }
        other => bail!("unknown bench suite `{other}` (all, model, decode, sft, grpo, synth, reward, gguf, gpu, serve)"),
    }
    let report = Report {
        suite: args.suite.clone(),
        backend: if args.suite == "gpu" { "cuda (burn-cuda, f32 and bf16)" } else { std::any::type_name::<CpuBackend>() },
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        figures,
    };
    let table: Vec<String> = report.figures.iter().map(|f| format!("{:<48} {:>12.2} {}", f.name, f.value, f.unit)).collect();
    crate::print_out(&table.join("\n"))?;
    let text = serde_json::to_string_pretty(&report)?;
    thinkjson_model::write_atomic(&args.out, text.as_bytes())?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn model_suite(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    let default = if args.quick { "tiny,smollm2-135m" } else { "smollm2-135m,qwen2.5-1.5b" };
    let shapes = args.shapes.clone().unwrap_or_else(|| default.to_string());
    let (prefill_len, steps) = if args.quick { (128, 8) } else { (512, 16) };
    // A real model (--model) is measured under its file name; presets get random weights.
    let pretrained = args.model.as_deref().map(crate::model_ref::open).transpose()?;
    let names: Vec<String> = match &args.model {
        Some(path) => vec![path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())],
        None => shapes.split(',').map(|s| s.trim().to_string()).collect(),
    };
    for name in names.iter().map(String::as_str) {
        let device = Default::default();
        let t = Instant::now();
        let model = match &pretrained {
            Some(p) => crate::model_ref::load::<CpuBackend>(p, None, &device)?,
            None => CausalLm::<CpuBackend>::random(&ModelConfig::preset(name)?, 0, &device)?,
        };
        let config = model.config().clone();
        let train_model = || -> Result<CausalLm<CpuTrainBackend>> {
            Ok(match &pretrained {
                Some(p) => crate::model_ref::load::<CpuTrainBackend>(p, None, &device)?,
                None => CausalLm::random(&config, 0, &device)?,
            })
        };
        push(figures, name, "init", t.elapsed().as_secs_f64(), "s");
        if let Some(lengths) = &args.context {
            for &len in lengths {
                // Best of two (as scripts/bench_torch_model.py takes it): one cold pass ranged
                // ±6 % between runs of the same binary.
                push(figures, name, &format!("prefill 1x{len}"), prefill_rate(&model, len, 2)?, "tokens/s");
                for b in [1usize, 8] {
                    let rate = decode_rate_at(&model, b, len, steps)?;
                    push(figures, name, &format!("decode batch {b} @ {len}"), rate, "tokens/s");
                }
                push(figures, name, "peak RSS so far", peak_rss_mib(), "MiB");
            }
            if config.num_parameters() < 500_000_000 {
                for &len in lengths {
                    let before = peak_rss_mib();
                    let rate = train_rate(train_model()?, len)?;
                    push(figures, name, &format!("train fwd+bwd 1x{len}"), rate, "tokens/s");
                    push(figures, name, &format!("peak RSS after train 1x{len} (was {before:.0})"), peak_rss_mib(), "MiB");
                }
            }
            continue;
        }

        // Prefill: hidden states for every position, logits for the last only (as engines do).
        let prompt: Vec<u32> = (0..prefill_len as u32).map(|i| (i * 7919) % 1000 + 10).collect();
        let batch = TokenBatch::new(std::slice::from_ref(&prompt), Padding::Left, 0)?;
        model.hidden_states(&TokenBatch::new(&[prompt[..16].to_vec()], Padding::Left, 0)?)?; // warm-up
        let reps = if config.num_parameters() > 500_000_000 { 1 } else { 3 };
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            let hidden = model.hidden_states(&batch)?;
            let _ = model.last_argmax(hidden)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        push(figures, name, &format!("prefill 1x{prefill_len}"), prefill_len as f64 / best, "tokens/s");

        for b in [1usize, 8] {
            let rate = decode_rate(&model, b, steps)?;
            push(figures, name, &format!("decode batch {b}"), rate, "tokens/s");
        }
        if config.num_parameters() < 500_000_000 {
            let rate = train_rate(train_model()?, if args.quick { 64 } else { 128 })?;
            push(figures, name, "train fwd+bwd 1x128", rate, "tokens/s");
        }
        push(figures, name, "peak RSS so far", peak_rss_mib(), "MiB");
    }
    Ok(())
}

/// Rows per second of the synthetic data generator (single thread).
fn synth_suite(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    let rows = if args.quick { 2000 } else { 20_000 };
    let generator = thinkjson_synth::Generator::new(thinkjson_synth::SynthConfig { rows, seed: 1, ..Default::default() });
    let t = Instant::now();
    let mut bytes = 0usize;
    for i in 0..rows as u64 {
        bytes += generator.candidate(i)?.text.len();
    }
    let secs = t.elapsed().as_secs_f64();
    figures.push(Figure { name: format!("synth/{rows} rows"), value: rows as f64 / secs, unit: "rows/s" });
    figures.push(Figure { name: "synth/mean text length".into(), value: bytes as f64 / rows as f64, unit: "bytes" });
    Ok(())
}

/// Completions scored per second: every schema new (validator cache miss) vs one schema
/// (cache hit), on synthetic rows with their correct completions.
fn reward_suite(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    use thinkjson_reward::{Context, RewardSet, ValidatorCache};
    let n = if args.quick { 300 } else { 3000 };
    let rows = thinkjson_synth::generate(thinkjson_synth::SynthConfig { rows: n, seed: 2, ..Default::default() })?;
    let completions: Vec<String> = rows.iter().map(|r| thinkjson_synth::prompt::completion(&r.reasoning, &r.object)).collect();
    let set = RewardSet::default();
    let cache = ValidatorCache::new();
    let t = Instant::now();
    for (r, c) in rows.iter().zip(&completions) {
        set.score(c, &Context { schema: &r.schema, reference: Some(&r.object), sample_id: None, validators: &cache });
    }
    let miss = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (r, c) in rows.iter().zip(&completions) {
        set.score(c, &Context { schema: &rows[0].schema, reference: Some(&r.object), sample_id: None, validators: &cache });
    }
    let hit = n as f64 / t.elapsed().as_secs_f64();
    figures.push(Figure { name: "reward/score, validator cache miss".into(), value: miss, unit: "completions/s" });
    figures.push(Figure { name: "reward/score, validator cache hit".into(), value: hit, unit: "completions/s" });
    Ok(())
}

/// Constrained vs unconstrained generation on the tiny preset with the real Qwen vocabulary,
/// and mask-computation times over the committed schema set.
fn decode_suite(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    use thinkjson_decode::{Constraint, GenerateConfig, Generator, Request, SamplingConfig};
    let tokenizer = thinkjson_model::Tokenizer::from_path("assets/qwen".as_ref())?;
    let model = CausalLm::<CpuBackend>::random(&ModelConfig::preset("tiny")?, 1, &Default::default())?;
    let generator = Generator::for_model(&tokenizer, &model)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut fig = |what: String, value: f64, unit: &'static str| figures.push(Figure { name: format!("decode/tiny/{what}"), value, unit });

    // Mask times over every committed schema, think-then-JSON, sampled.
    let mut schemas = Vec::new();
    for entry in std::fs::read_dir("fixtures/schemas")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            schemas.push(serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&path)?)?);
        }
    }
    let prompt = tokenizer.encode("Extract the record as JSON.")?;
    let budget = if args.quick { 32 } else { 128 };
    let sampled = |seed| SamplingConfig { temperature: 1.0, seed, ..Default::default() };
    let requests: Vec<Request> = schemas.iter().map(|s| Request::new(prompt.clone(), Constraint::think_then_json(s.clone(), 16))).collect();
    let mut masks = Vec::new();
    for chunk in requests.chunks(16) {
        let config = GenerateConfig { max_new_tokens: budget, sampling: sampled(3), ..Default::default() };
        masks.extend(generator.generate(&model, chunk, &config)?.1.mask_micros);
    }
    fig(format!("mask time p50 ({} schemas, Qwen vocab)", schemas.len()), crate::cmd_decode::percentile(&masks, 0.5), "µs");
    fig(format!("mask time p99 ({} schemas, Qwen vocab)", schemas.len()), crate::cmd_decode::percentile(&masks, 0.99), "µs");

    let schema = schemas.first().cloned().unwrap_or_else(|| serde_json::json!({"type": "object"}));
    let steps = if args.quick { 16 } else { 64 };
    for batch in [1usize, 16] {
        let mut per_step = [0.0f64; 2];
        for (i, constrained) in [false, true].into_iter().enumerate() {
            let constraint = if constrained { Constraint::think_then_json(schema.clone(), 24) } else { Constraint::None };
            let reqs = vec![Request::new(prompt.clone(), constraint); batch];
            let config = GenerateConfig { max_new_tokens: steps, sampling: sampled(5), ..Default::default() };
            generator.generate(&model, &reqs, &GenerateConfig { max_new_tokens: 4, ..config.clone() })?; // warm-up
            let (_, st) = generator.generate(&model, &reqs, &config)?;
            let label = if constrained { "constrained" } else { "unconstrained" };
            fig(format!("batch {batch} {label} tokens/s"), st.generated_tokens as f64 / st.total_secs, "tokens/s");
            per_step[i] = st.total_secs / st.steps.max(1) as f64;
            if constrained {
                let mask_secs: f64 = st.mask_micros.iter().sum::<f64>() * 1e-6 / cores;
                fig(format!("batch {batch} mask share of step time"), 100.0 * mask_secs / st.total_secs, "%");
                fig(format!("batch {batch} forced tokens share"), 100.0 * st.forced_tokens as f64 / st.generated_tokens.max(1) as f64, "%");
            }
        }
        fig(format!("batch {batch} constrained step-time overhead"), 100.0 * (per_step[1] / per_step[0] - 1.0), "%");
    }
    Ok(())
}

fn push(figures: &mut Vec<Figure>, shape: &str, what: &str, value: f64, unit: &'static str) {
    figures.push(Figure {
        name: format!("model/{shape}/{what}"),
        value,
        unit,
    });
}

/// Tokens/s of a 1×`len` prefill (hidden states, logits of the last position), best of `reps`.
fn prefill_rate<B: Backend>(model: &CausalLm<B>, len: usize, reps: usize) -> Result<f64> {
    let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 7919) % 1000 + 10).collect();
    let batch = TokenBatch::new(std::slice::from_ref(&prompt), Padding::Left, 0)?;
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let hidden = model.hidden_states(&batch)?;
        let _ = model.last_argmax(hidden)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(len as f64 / best)
}

/// Greedy-shaped decode: a 32-token prompt, then `steps` single-token steps with the KV cache.
pub fn decode_rate<B: Backend>(model: &CausalLm<B>, batch: usize, steps: usize) -> Result<f64> {
    decode_rate_at(model, batch, 32, steps)
}

/// Decode after `len`-token prompts (each row a few tokens shorter than the one before, so
/// the batch is left-padded): `steps` single-token steps with the KV cache, tokens/s. The
/// prefill is not timed.
pub fn decode_rate_at<B: Backend>(model: &CausalLm<B>, batch: usize, len: usize, steps: usize) -> Result<f64> {
    let prompts: Vec<Vec<u32>> =
        (0..batch).map(|b| (0..(len - b % 4).max(1) as u32).map(|i| (100 + i * 7 + b as u32) % 1000 + 10).collect()).collect();
    let mut cache = KvCache::new(batch, model.config().num_hidden_layers);
    let hidden = model.hidden_cached(&TokenBatch::new(&prompts, Padding::Left, 0)?, &mut cache)?;
    let mut next: Vec<u32> = model.last_argmax(hidden)?;
    let t = Instant::now();
    for _ in 0..steps {
        let step: Vec<Option<u32>> = next.iter().map(|&t| Some(t)).collect();
        let logits = model.forward_cached(&TokenBatch::step(&step, 0)?, &mut cache)?;
        next = argmax(logits)?;
    }
    Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
}

fn argmax<B: Backend>(logits: thinkjson_model::burn::tensor::Tensor<B, 3>) -> Result<Vec<u32>> {
    let ids = logits.argmax(2).into_data().convert::<i64>().to_vec::<i64>();
    let ids = ids.map_err(|e| anyhow::anyhow!("argmax: {e:?}"))?;
    Ok(ids.into_iter().map(|i| i as u32).collect())
}

/// One forward + backward of the mean next-token log-prob, batch 1 × `len`.
/// Whole SFT optimiser steps (completion-only loss on the second half of each sequence,
/// backward, global-norm clipping, AdamW) — the same work as `scripts/bench_torch_sft.py`.
fn sft_suite(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    use thinkjson_model::burn::optim::GradientsParams;
    use thinkjson_model::train::{AdamW, AdamWConfig};
    use thinkjson_sft::{completion_loss, MicroBatch, SftExample};
    let (batch, seq, steps) = if args.quick { (2, 128, 2) } else { (4, 256, 3) };
    let shapes = args.shapes.clone().unwrap_or_else(|| "tiny,smollm2-135m".into());
    for name in shapes.split(',') {
        let config = ModelConfig::preset(name)?;
        let examples: Vec<SftExample> = (0..batch)
            .map(|b| {
                let ids: Vec<u32> = (0..=seq as u32).map(|i| (i * 31 + b as u32 * 7) % 500 + 3).collect();
                SftExample { id: String::new(), prompt: ids[..seq / 2].to_vec(), completion: ids[seq / 2..].to_vec() }
            })
            .collect();
        let rows: Vec<Vec<usize>> = (0..batch).map(|b| vec![b]).collect();
        let mb = MicroBatch::build(&examples, &rows, 0, false)?;
        let mut model = CausalLm::<CpuTrainBackend>::random(&config, 0, &Default::default())?;
        let mut opt = AdamW::<CpuTrainBackend>::new(AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() });
        let mut times = Vec::new();
        for _ in 0..=steps {
            let t = Instant::now();
            let loss = completion_loss(&model, &mb, mb.targets.len(), 512)?;
            let grads = GradientsParams::from_grads(thinkjson_model::train::backward(loss), &model);
            model = opt.step(1e-4, model, grads)?.0;
            times.push(t.elapsed().as_secs_f64());
        }
        // The first step allocates the optimiser state; report the median of the rest.
        let mut rest = times[1..].to_vec();
        rest.sort_by(f64::total_cmp);
        let median = rest[rest.len() / 2];
        push(figures, name, &format!("sft step {batch}x{seq}"), (batch * seq) as f64 / median, "tokens/s");
        push(figures, name, "peak RSS so far", peak_rss_mib(), "MiB");
    }
    Ok(())
}

fn train_rate<B: AutodiffBackend>(model: CausalLm<B>, len: usize) -> Result<f64> {
    let ids: Vec<u32> = (0..len as u32).map(|i| (i * 31) % 500 + 3).collect();
    let targets: Vec<u32> = ids.iter().skip(1).copied().chain([1]).collect();
    let batch = TokenBatch::new(&[ids], Padding::Right, 0)?;
    // The vocabulary head in rows of the trainers' default (SFT's and GRPO's `logprob_chunk`).
    let chunk = thinkjson_sft::SftConfig::default().logprob_chunk;
    let mut best = f64::MAX;
    // Best of 4 at short lengths, where a pass takes about a second and the first still pays
    // one-time allocations (as `scripts/bench_torch_model.py` does); of 2 at long ones.
    for _ in 0..if len <= 512 { 4 } else { 2 } {
        let t = Instant::now();
        let loss = model.token_logprobs(&batch, &targets, chunk)?.mean().neg();
        let _grads = thinkjson_model::train::backward(loss);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(len as f64 / best)
}

/// Peak resident memory of this process (VmHWM), MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
