//! `cargo xtask bench grpo`: where one GRPO step's time goes (real Qwen tokenizer, synthetic
//! prompts), free and think-then-JSON-constrained rollouts. On the CPU at the tiny preset;
//! `bench gpu` runs the same step at the 1.5B shape on CUDA.

use std::path::Path;

use anyhow::{bail, Result};
use thinkjson_grpo::{Control, GrpoConfig, GrpoRun, Observer, RolloutConstraint, StepMetrics, TimeSplit};
use thinkjson_model::burn::tensor::backend::AutodiffBackend;
use thinkjson_model::{CausalLm, CpuTrainBackend, ModelConfig, Tokenizer};
use thinkjson_reward::{LengthReward, RewardSet};

use crate::bench::{BenchArgs, Figure};

#[derive(Default)]
struct Times(Vec<TimeSplit>);

impl Observer for Times {
    fn on_step(&mut self, m: &StepMetrics) -> Control {
        self.0.push(m.time);
        Control::Continue
    }
}

pub fn grpo_suite(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    match &args.model {
        Some(model) => real_model_steps(args, model, figures),
        None => grpo_step::<CpuTrainBackend>(args.quick, "grpo/tiny", "tiny", &Default::default(), figures),
    }
}

/// GRPO steps of a real model on synthetic extraction prompts with its own tokenizer and chat
/// template: free rollouts, β = 0, dapo, default token budget, full fine-tuning, activation
/// checkpointing as asked; every step's phases, the
/// median of the steps after the first, and the process's peak RSS.
fn real_model_steps(args: &BenchArgs, model_arg: &Path, figures: &mut Vec<Figure>) -> Result<()> {
    let [prompts_per_step, g, len, steps] = args.grpo_shape[..] else {
        bail!("--grpo-shape takes four numbers: prompts per step, G, new tokens, steps (got {:?})", args.grpo_shape);
    };
    if steps < 2 || prompts_per_step == 0 || g < 2 || len == 0 {
        bail!("--grpo-shape: need ≥ 1 prompt, G ≥ 2, ≥ 1 new token and ≥ 2 steps (got {:?})", args.grpo_shape);
    }
    let pretrained = crate::model_ref::open(model_arg)?;
    let scratch = tempfile::tempdir()?;
    let tok_dir = crate::model_ref::tokenizer_dir(&pretrained, scratch.path())?;
    let tokenizer = Tokenizer::from_path(&tok_dir)?;
    let template = crate::cmd_decode::chat_template(&tok_dir)?;
    let rows = thinkjson_synth::generate(thinkjson_synth::SynthConfig { rows: 4 * prompts_per_step * steps, seed: 5, ..Default::default() })?;
    let (prompts, _) = thinkjson_grpo::encode_prompts(&tokenizer, &template, &rows, args.max_prompt_len)?;
    if prompts.len() < prompts_per_step {
        bail!("only {} synthetic prompts fit --max-prompt-len {}", prompts.len(), args.max_prompt_len);
    }
    let config = GrpoConfig {
        num_generations: g,
        prompts_per_step,
        max_steps: steps as u64,
        max_completion_len: len,
        constraint: RolloutConstraint::None,
        gradient_checkpointing: args.gradient_checkpointing,
        lr: 1e-6,
        save_every: 0,
        sample_every: 0,
        ..GrpoConfig::default()
    };
    if let Some(path) = &args.prompts_out {
        // The prompts in the order the run uses them, so the reference trains on the same ones.
        let mut text = String::new();
        for step in 0..steps as u64 {
            for i in thinkjson_grpo::prompts_of_step(prompts.len(), &config, step) {
                let p = &prompts[i];
                let rendered = tokenizer.decode(&p.prompt, false)?;
                text.push_str(&serde_json::to_string(&serde_json::json!({"id": p.id, "prompt": rendered, "prompt_ids": p.prompt}))?);
                text.push('\n');
            }
        }
        thinkjson_model::write_atomic(path, text.as_bytes())?;
    }
    let used: Vec<usize> = (0..steps as u64).flat_map(|s| thinkjson_grpo::prompts_of_step(prompts.len(), &config, s)).map(|i| prompts[i].prompt.len()).collect();
    let name = model_arg.file_name().map_or_else(|| model_arg.display().to_string(), |n| n.to_string_lossy().into_owned());
    let checkpointing = if args.gradient_checkpointing { ", checkpointing" } else { "" };
    let prefix = format!("grpo/{name}/{prompts_per_step}x{g} prompts x G, {len} new tokens{checkpointing}");
    let mut fig = |what: &str, value: f64, unit: &'static str| figures.push(Figure { name: format!("{prefix}/{what}"), value, unit });
    fig("prompt length (mean of those trained on)", used.iter().sum::<usize>() as f64 / used.len().max(1) as f64, "tokens");
    let device = Default::default();
    let model = crate::model_ref::load::<CpuTrainBackend>(&pretrained, None, &device)?;
    fig("tokens per pass (automatic budget)", config.settings().tokens_per_pass(model.config()) as f64, "tokens");
    let dir = tempfile::tempdir()?;
    let run = GrpoRun { config, checkpoint_root: dir.path().to_path_buf(), extra_files: Vec::new(), resume: false };
    let rewards = RewardSet::default().with(Box::new(LengthReward { target_chars: len * 3 }), 0.1);
    let mut times = Times::default();
    thinkjson_grpo::train(model, &tokenizer, &prompts, &rewards, &run, &mut times)?;
    for (i, t) in times.0.iter().enumerate() {
        fig(&format!("step {}", i + 1), t.total, "s");
    }
    let mut rest = times.0[1..].to_vec();
    rest.sort_by(|a, b| a.total.total_cmp(&b.total));
    let t = rest[rest.len() / 2];
    fig("median step after the first", t.total, "s");
    fig("generation", t.generation, "s");
    fig("log-probs (policy forward)", t.logprobs, "s");
    fig("backward", t.backward, "s");
    fig("optimizer", t.optimizer, "s");
    fig("peak RSS", crate::bench::peak_rss_mib(), "MiB");
    Ok(())
}

/// Median GRPO step (steps after the first) of `preset` on backend `B`, split by phase.
pub fn grpo_step<B: AutodiffBackend>(quick: bool, prefix: &str, preset: &str, device: &B::Device, figures: &mut Vec<Figure>) -> Result<()> {
    let (prompts_per_step, g, len, steps) = if quick { (1, 4, 32, 2) } else { (2, 8, 64, 3) };
    let assets = std::path::Path::new("assets/qwen");
    let tokenizer = Tokenizer::from_path(assets)?;
    let template = crate::cmd_decode::chat_template(assets)?;
    let rows = thinkjson_synth::generate(thinkjson_synth::SynthConfig { rows: 16, seed: 5, ..Default::default() })?;
    let (prompts, _) = thinkjson_grpo::encode_prompts(&tokenizer, &template, &rows, 4096)?;
    let mean_prompt = prompts.iter().map(|p| p.prompt.len()).sum::<usize>() as f64 / prompts.len().max(1) as f64;
    figures.push(Figure { name: format!("{prefix}/prompt length (mean)"), value: mean_prompt, unit: "tokens" });
    let config = ModelConfig::preset(preset)?.with_vocab_size(tokenizer.vocab_size());
    for (label, constraint) in [("free", RolloutConstraint::None), ("think-then-JSON", RolloutConstraint::ThinkThenJson)] {
        let dir = tempfile::tempdir()?;
        let run = GrpoRun {
            config: GrpoConfig {
                num_generations: g,
                prompts_per_step,
                max_steps: steps,
                max_completion_len: len,
                max_think_tokens: len / 2,
                constraint,
                lr: 1e-4,
                save_every: 0,
                sample_every: 0,
                ..GrpoConfig::default()
            },
            checkpoint_root: dir.path().to_path_buf(),
            extra_files: Vec::new(),
            resume: false,
        };
        let model = CausalLm::<B>::random(&config, 0, device)?;
        let mut times = Times::default();
        // A length term keeps reward variance in every group, so every step trains (a random
        // model's completions otherwise tie and the update is skipped).
        let rewards = RewardSet::default().with(Box::new(LengthReward { target_chars: len * 3 }), 0.1);
        thinkjson_grpo::train(model, &tokenizer, &prompts, &rewards, &run, &mut times)?;
        // The first step allocates the optimiser state; the median total of the rest.
        let mut rest = times.0[1..].to_vec();
        rest.sort_by(|a, b| a.total.total_cmp(&b.total));
        let t = rest[rest.len() / 2];
        let shape = format!("{prefix}/{label} {prompts_per_step}x{g} prompts x G, {len} new tokens");
        let mut fig = |what: &str, value: f64, unit: &'static str| figures.push(Figure { name: format!("{shape}/{what}"), value, unit });
        fig("step", t.total, "s");
        fig("generation", t.generation, "s");
        fig("reward", t.reward, "s");
        fig("log-probs (policy + reference forward)", t.logprobs, "s");
        fig("backward", t.backward, "s");
        fig("optimizer", t.optimizer, "s");
        fig("generation share", 100.0 * t.generation / t.total.max(1e-9), "%");
    }
    Ok(())
}
