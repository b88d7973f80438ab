//! `cargo xtask bench grpo`: where one GRPO step's time goes (real Qwen tokenizer, synthetic
//! prompts), free and think-then-JSON-constrained rollouts. On the CPU at the tiny preset;
//! `bench gpu` runs the same step at the 1.5B shape on CUDA.

use anyhow::Result;
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
    grpo_step::<CpuTrainBackend>(args.quick, "grpo/tiny", "tiny", &Default::default(), figures)
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
