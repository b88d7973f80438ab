//! `generate` and `schemas`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use thinkjson_decode::{Completion, Constraint, DecodeError, FinishReason, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::{ChatMessage, ChatTemplate, DeviceSpec, Pretrained, Tokenizer};

use crate::backend::{dispatch, OnBackend};

#[derive(Args)]
pub struct GenerateArgs {
    /// An HF model directory (config.json, safetensors, tokenizer.json), a GGUF file, or an
    /// embedded model name (smollm2-135m-instruct).
    #[arg(long)]
    model: PathBuf,
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
    let job = GenerateJob { model, tokenizer, requests: vec![Request::new(prompt, constraint)], config };
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
    tokenizer: Tokenizer,
    requests: Vec<Request>,
    config: GenerateConfig,
}

impl OnBackend for GenerateJob {
    type Output = (Vec<Completion>, thinkjson_decode::GenerationStats);
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        let model = self.model.load::<B>(&device).with_context(|| format!("loading {}", self.model.path().display()))?;
        let generator = Generator::for_model(&self.tokenizer, &model)?;
        Ok(generator.generate(&model, &self.requests, &self.config)?)
    }
}

#[derive(Args)]
pub struct SchemasArgs {
    /// A folder of JSON Schema files (searched recursively for `*.json`).
    #[arg(long)]
    dir: PathBuf,
    /// Also generate with this model (HF directory, GGUF file or embedded name) and check the
    /// outputs validate.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokenizer to compile against without --model (default: the committed Qwen one).
    #[arg(long, default_value = "assets/qwen")]
    tokenizer: PathBuf,
    /// Think-then-JSON instead of plain JSON.
    #[arg(long)]
    think: bool,
    /// Token budget of the reasoning with --think.
    #[arg(long, default_value_t = 32)]
    max_think_tokens: usize,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

pub fn schemas(args: SchemasArgs) -> Result<()> {
    let mut files = Vec::new();
    collect_json(&args.dir, &mut files)?;
    files.sort();
    if files.is_empty() {
        bail!("no *.json files under {}", args.dir.display());
    }
    let model = args.model.as_deref().map(crate::model_ref::open).transpose()?;
    let (tokenizer, n_vocab) = match &model {
        Some(m) => (m.tokenizer()?, m.config()?.vocab_size),
        None => {
            let t = Tokenizer::from_path(&args.tokenizer).with_context(|| format!("tokenizer at {}", args.tokenizer.display()))?;
            let n = t.vocab_size();
            (t, n)
        }
    };
    let generator = Generator::new(&tokenizer, n_vocab, &[])?;
    let mut rejected: BTreeMap<String, usize> = BTreeMap::new();
    let mut accepted = Vec::new();
    for path in &files {
        let schema = match std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
            Some(s) => s,
            None => {
                *rejected.entry("not readable as JSON".into()).or_default() += 1;
                continue;
            }
        };
        let constraint = if args.think { Constraint::think_then_json(schema.clone(), args.max_think_tokens) } else { Constraint::json_schema(schema.clone()) };
        match generator.compile(&constraint) {
            Ok(_) => accepted.push((path.clone(), schema, constraint)),
            Err(e) => *rejected.entry(reason(&e)).or_default() += 1,
        }
    }
    let mut lines = vec![format!("{} schema files under {}", files.len(), args.dir.display())];
    lines.push(format!("compiled: {} ({:.1} %)", accepted.len(), 100.0 * accepted.len() as f64 / files.len() as f64));
    lines.push(format!("rejected: {}", files.len() - accepted.len()));
    let mut reasons: Vec<_> = rejected.into_iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (why, n) in reasons {
        lines.push(format!("  {n:>6}  {why}"));
    }
    crate::print_out(&lines.join("\n"))?;
    let Some(model) = model else { return Ok(()) };

    let template = model.chat_template()?;
    let config = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingConfig { temperature: args.temperature, seed: args.seed, ..Default::default() },
        ..Default::default()
    };
    let mut requests = Vec::new();
    for (path, schema, constraint) in &accepted {
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        let messages = [ChatMessage::user(format!("Produce a JSON value for the schema `{name}`:\n{schema}"))];
        requests.push(Request::new(thinkjson_decode::chat_prompt(&template, &tokenizer, &messages)?, constraint.clone()));
    }
    let job = SchemaRunJob { model, tokenizer, requests, config, batch: args.batch.max(1) };
    let (outs, masks) = dispatch(args.device, job)?;
    let (mut finished, mut valid, mut length) = (0, 0, 0);
    let mut invalid = Vec::new();
    for ((path, schema, _), out) in accepted.iter().zip(&outs) {
        if out.finish == FinishReason::Length {
            length += 1;
            continue;
        }
        finished += 1;
        let text = if args.think { answer(&out.text) } else { Some(out.text.as_str()) };
        let ok = jsonschema::validator_for(schema)
            .ok()
            .zip(text.and_then(|t| serde_json::from_str::<Value>(t).ok()))
            .is_some_and(|(v, value)| v.is_valid(&value));
        if ok {
            valid += 1;
        } else {
            invalid.push(path.display().to_string());
        }
    }
    let pct = |q: f64| percentile(&masks, q);
    let mut lines = vec![
        format!("generated: {} (finished {finished}, length-limited {length})", outs.len()),
        format!("finished outputs valid: {valid} / {finished} ({:.1} %)", 100.0 * valid as f64 / finished.max(1) as f64),
        format!("mask time: p50 {:.0} µs, p99 {:.0} µs over {} masks", pct(0.5), pct(0.99), masks.len()),
    ];
    lines.extend(invalid.iter().map(|p| format!("  invalid: {p}")));
    crate::print_out(&lines.join("\n"))
}

fn answer(text: &str) -> Option<&str> {
    let start = text.find("<answer>\n")? + "<answer>\n".len();
    let end = text.rfind("\n</answer>")?;
    text.get(start..end)
}

/// The group a rejection is counted under.
fn reason(e: &DecodeError) -> String {
    match e {
        DecodeError::UnsupportedKeyword { keyword, .. } => format!("unsupported keyword `{keyword}`"),
        DecodeError::RemoteRef { .. } => "remote $ref".into(),
        DecodeError::UnknownFormat { format, .. } => format!("unsupported format `{format}`"),
        DecodeError::InvalidSchema { .. } => "invalid schema".into(),
        DecodeError::Grammar(m) => format!("grammar: {}", m.lines().next().unwrap_or("").chars().take(80).collect::<String>()),
        other => other.to_string(),
    }
}

fn collect_json(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_json(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    Ok(())
}

pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0)
}

struct SchemaRunJob {
    model: Pretrained,
    tokenizer: Tokenizer,
    requests: Vec<Request>,
    config: GenerateConfig,
    batch: usize,
}

impl OnBackend for SchemaRunJob {
    type Output = (Vec<Completion>, Vec<f64>);
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        let model = self.model.load::<B>(&device).with_context(|| format!("loading {}", self.model.path().display()))?;
        let generator = Generator::for_model(&self.tokenizer, &model)?;
        let bar = indicatif::ProgressBar::new(self.requests.len() as u64);
        let mut outs = Vec::with_capacity(self.requests.len());
        let mut masks = Vec::new();
        for chunk in self.requests.chunks(self.batch) {
            let (o, stats) = generator.generate(&model, chunk, &self.config)?;
            outs.extend(o);
            masks.extend(stats.mask_micros);
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok((outs, masks))
    }
}
