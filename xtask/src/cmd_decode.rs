//! `generate` and `schemas`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use thinkjson_decode::{Completion, Constraint, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::{ChatMessage, ChatTemplate, DeviceSpec, Pretrained, Tokenizer};

use crate::backend::{dispatch, OnBackend};

#[derive(Args)]
pub struct GenerateArgs {
    /// An HF model directory (config.json, safetensors, tokenizer.json), a GGUF file, or an
    /// embedded model name (smollm2-135m-instruct).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory to apply to --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// An optional system message.
    #[arg(long)]
    system: Option<String>,
    /// Constrain the output to this JSON Schema file.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// With --schema: `<think>` reasoning first, then the JSON inside `<answer>…</answer>`.
    #[arg(long)]
    think: bool,
    /// Token budget of the reasoning with --think.
    #[arg(long, default_value_t = 256)]
    max_think_tokens: usize,
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Print a JSON object (text, tokens, log-probs, finish reason, timings).
    #[arg(long)]
    json: bool,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let model = crate::model_ref::open(&args.model)?;
    let tokenizer = model.tokenizer().with_context(|| format!("tokenizer of {}", model.path().display()))?;
    let template = model.chat_template()?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::system(system.clone()));
    }
    messages.push(ChatMessage::user(args.prompt.clone()));
    let prompt = thinkjson_decode::chat_prompt(&template, &tokenizer, &messages)?;
    let constraint = match (&args.schema, args.think) {
        (None, true) => bail!("--think needs --schema"),
        (None, false) => Constraint::None,
        (Some(path), think) => {
            let schema = read_json(path)?;
            if think {
                Constraint::think_then_json(schema, args.max_think_tokens)
            } else {
                Constraint::json_schema(schema)
            }
        }
    };
    let config = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingConfig { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: args.seed, ..Default::default() },
        ..Default::default()
    };
    let job = GenerateJob { model, adapter: args.adapter.clone(), tokenizer, requests: vec![Request::new(prompt, constraint)], config };
    let (mut outs, stats) = dispatch(args.device, job)?;
    let out = outs.pop().context("no completion returned")?;
    if args.json {
        let v = json!({"text": out.text, "tokens": out.tokens, "logprobs": out.logprobs, "finish": out.finish,
            "error": out.error, "stats": {"steps": stats.steps, "generated_tokens": stats.generated_tokens,
            "forced_tokens": stats.forced_tokens, "total_secs": stats.total_secs}});
        crate::print_out(&serde_json::to_string_pretty(&v)?)
    } else {
        crate::print_out(&out.text)?;
        eprintln!(
            "[{:?}, {} tokens ({} forced) in {:.2}s]",
            out.finish,
            out.tokens.len(),
            stats.forced_tokens,
            stats.total_secs
        );
        Ok(())
    }
}

/// The model's own chat template, or ChatML when it ships none.
pub fn chat_template(dir: &Path) -> Result<ChatTemplate> {
    let config = dir.join("tokenizer_config.json");
    if config.exists() {
        Ok(ChatTemplate::from_tokenizer_config(&config)?)
    } else {
        Ok(ChatTemplate::chatml())
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

struct GenerateJob {
    model: Pretrained,
    adapter: Option<PathBuf>,
    tokenizer: Tokenizer,
    requests: Vec<Request>,
    config: GenerateConfig,
}

impl OnBackend for GenerateJob {
    type Output = (Vec<Completion>, thinkjson_decode::GenerationStats);
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        // Merged for decoding: the same function, without the adapters' extra matmuls per step.
        let model = crate::model_ref::load::<B>(&self.model, self.adapter.as_deref(), &device)?.merge_lora();
        let generator = Generator::for_model(&self.tokenizer, &model)?;
        Ok(generator.generate(&model, &self.requests, &self.config)?)
    }
}

pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0)
}

