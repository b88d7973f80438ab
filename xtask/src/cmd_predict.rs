//! `cargo xtask predict`: batched predictions of a model over a dataset, in the JSONL that
//! `eval` reads (id, completion, latency_ms, tokens, closed). Each batch is appended and
//! synced before the next starts, so a killed run loses at most one batch, and `--resume`
//! continues with the rows not yet written: every row ends up exactly once.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use thinkjson_decode::{chat_prompt, Constraint, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_eval::Prediction;
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::{ChatMessage, DeviceSpec, Pretrained};
use thinkjson_synth::Row;

use crate::backend::{dispatch, OnBackend};

/// What constrains each row's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ConstraintKind {
    /// Free generation.
    None,
    /// The output is a JSON instance of the row's schema.
    #[value(alias = "json-schema")]
    JsonSchema,
    /// `<think>` reasoning (at most --max-think-tokens), then the JSON inside `<answer>`.
    #[value(alias = "think-then-json")]
    ThinkThenJson,
}

#[derive(Args)]
pub struct PredictArgs {
    /// An HF model directory, a GGUF file, or an embedded model name (smollm2-135m-instruct).
    #[arg(long, required_unless_present = "endpoint", conflicts_with = "endpoint")]
    model: Option<PathBuf>,
    #[command(flatten)]
    remote: crate::cmd_predict_endpoint::EndpointArgs,
    /// A PEFT LoRA adapter directory to apply to --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Rows to predict (the JSONL `eval` reads: id, text, schema, object, …). Malformed
    /// lines are reported and skipped.
    #[arg(long)]
    data: PathBuf,
    /// Predictions JSONL (id, completion, latency_ms, tokens, closed).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "none")]
    constraint: ConstraintKind,
    /// Rows generated together.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Reasoning budget with --constraint think_then_json.
    #[arg(long, default_value_t = 256)]
    max_think_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue OUT: rows already there are kept, the rest are predicted.
    #[arg(long)]
    resume: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

/// How to predict: the model and the decoding settings.
#[derive(Debug, Clone)]
pub struct PredictSpec {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub constraint: ConstraintKind,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    pub max_think_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct PredictSummary {
    pub rows: usize,
    /// Rows found already written (a resumed run).
    pub kept: usize,
    pub written: usize,
    /// Rows left out: a repeated id.
    pub skipped: Vec<String>,
    /// Rows that got no prediction (an endpoint kept failing); a `--resume` retries them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    pub out: PathBuf,
    pub secs: f64,
}

pub fn predict(args: PredictArgs) -> Result<()> {
    let rows = crate::cmd_sft::read_rows(&args.data)?;
    let summary = match args.model.clone() {
        Some(model) => predict_model(model, &args, &rows)?,
        None => crate::cmd_predict_endpoint::predict_endpoint(&args.remote, &Decoding::of(&args), &rows, &args.out, args.resume)?,
    };
    if args.json {
        crate::print_out(&serde_json::to_string_pretty(&summary)?)?;
    } else {
        eprintln!(
            "predict: {} rows ({} kept from before, {} written) in {:.1} s → {}",
            summary.rows,
            summary.kept,
            summary.written,
            summary.secs,
            summary.out.display()
        );
    }
    if !summary.failed.is_empty() {
        bail!("{} rows got no prediction (listed above); run again with --resume to retry them", summary.failed.len());
    }
    Ok(())
}

/// The decoding settings an endpoint is asked for.
pub struct Decoding {
    pub constraint: ConstraintKind,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
}

impl Decoding {
    fn of(args: &PredictArgs) -> Self {
        Self { constraint: args.constraint, max_new_tokens: args.max_new_tokens, temperature: args.temperature, seed: args.seed }
    }
}

fn predict_model(model: PathBuf, args: &PredictArgs, rows: &[Row]) -> Result<PredictSummary> {
    let spec = PredictSpec {
        model,
        adapter: args.adapter.clone(),
        constraint: args.constraint,
        batch_size: args.batch_size,
        max_new_tokens: args.max_new_tokens,
        max_think_tokens: args.max_think_tokens,
        temperature: args.temperature,
        seed: args.seed,
    };
    predict_file(&spec, rows, &args.out, args.resume, args.device)
}

/// Predicts every row of `rows` not yet in `out` and appends it there, batch by batch.
pub fn predict_file(spec: &PredictSpec, rows: &[Row], out: &Path, resume: bool, device: DeviceSpec) -> Result<PredictSummary> {
    let started = Instant::now();
    if spec.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let Plan { pending, kept, skipped } = plan(rows, out, resume)?;
    let job = PredictJob { spec: spec.clone(), rows: pending, out: out.to_path_buf(), kept };
    let written = dispatch(device, job)?;
    Ok(PredictSummary { rows: rows.len(), kept, written, skipped, failed: Vec::new(), out: out.to_path_buf(), secs: started.elapsed().as_secs_f64() })
}

/// The rows a run still has to predict.
pub struct Plan {
    pub pending: Vec<Row>,
    /// Rows found already written (a resumed run).
    pub kept: usize,
    /// Repeated ids, left out.
    pub skipped: Vec<String>,
}

/// Which rows of `rows` are not yet in `out` (which must not exist unless `resume`); a
/// repeated id is reported and left out. Creates `out`'s folder.
pub fn plan(rows: &[Row], out: &Path, resume: bool) -> Result<Plan> {
    let done = if out.exists() {
        if !resume {
            bail!("{} already exists; pass --resume to continue it, or choose another --out", out.display());
        }
        done_ids(out)?
    } else {
        HashSet::new()
    };
    let mut seen = HashSet::new();
    let mut skipped = Vec::new();
    let mut pending = Vec::new();
    for row in rows {
        if !seen.insert(row.id.as_str()) {
            eprintln!("predict: row id `{}` appears again; the repeat is skipped", row.id);
            skipped.push(row.id.clone());
        } else if !done.contains(&row.id) {
            pending.push(row.clone());
        }
    }
    let kept = rows.len() - skipped.len() - pending.len();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(Plan { pending, kept, skipped })
}

/// Ids of the complete lines of a predictions file. A last line cut by a kill (no newline,
/// or not JSON) is removed from the file; a malformed line before it is an error.
fn done_ids(out: &Path) -> Result<HashSet<String>> {
    let bytes = std::fs::read(out).with_context(|| format!("reading {}", out.display()))?;
    let mut ids = HashSet::new();
    let mut good_end = 0;
    let mut line_no = 0;
    let mut start = 0;
    while start < bytes.len() {
        line_no += 1;
        let Some(len) = bytes[start..].iter().position(|&b| b == b'\n') else { break };
        let line = &bytes[start..start + len];
        let parsed = std::str::from_utf8(line).ok().and_then(|l| serde_json::from_str::<Prediction>(l).ok());
        match parsed {
            Some(p) => {
                ids.insert(p.id);
                good_end = start + len + 1;
            }
            None if start + len + 1 == bytes.len() => break,
            None => bail!("{}:{line_no}: not a prediction line; the file is not one `predict` wrote", out.display()),
        }
        start += len + 1;
    }
    if good_end < bytes.len() {
        eprintln!("predict: {}: dropping a partial last line (an interrupted write)", out.display());
        let f = std::fs::OpenOptions::new().write(true).open(out).with_context(|| format!("opening {}", out.display()))?;
        f.set_len(good_end as u64).with_context(|| format!("truncating {}", out.display()))?;
    }
    Ok(ids)
}

struct PredictJob {
    spec: PredictSpec,
    rows: Vec<Row>,
    out: PathBuf,
    kept: usize,
}

impl OnBackend for PredictJob {
    type Output = usize;
    fn run<B: Backend>(self, device: B::Device) -> Result<usize> {
        let spec = &self.spec;
        if self.rows.is_empty() {
            return Ok(0);
        }
        let pretrained = crate::model_ref::open(&spec.model)?;
        // Merged: the adapter's function without its extra matmuls at every decoding step.
        let model = crate::model_ref::load::<B>(&pretrained, spec.adapter.as_deref(), &device)?.merge_lora();
        let tokenizer = tokenizer_of(&pretrained, spec.adapter.as_deref())?;
        let template = pretrained.chat_template()?;
        let generator = Generator::for_model(&tokenizer, &model)?;
        let sampling = if spec.temperature > 0.0 {
            SamplingConfig { temperature: spec.temperature, seed: spec.seed, ..SamplingConfig::default() }
        } else {
            SamplingConfig::greedy()
        };
        let config = GenerateConfig { max_new_tokens: spec.max_new_tokens, sampling, ..GenerateConfig::default() };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.out)
            .with_context(|| format!("opening {}", self.out.display()))?;
        let total = (self.rows.len() + self.kept) as u64;
        let bar = crate::metrics_log::step_bar("predict", total, self.kept as u64);
        let mut written = 0;
        for chunk in self.rows.chunks(spec.batch_size) {
            let mut requests = Vec::with_capacity(chunk.len());
            for row in chunk {
                let messages = thinkjson_synth::prompt::messages_with(&row.text, &row.schema, ChatMessage::new);
                let prompt = chat_prompt(&template, &tokenizer, &messages)?;
                let constraint = match spec.constraint {
                    ConstraintKind::None => Constraint::None,
                    ConstraintKind::JsonSchema => Constraint::json_schema(row.schema.clone()),
                    ConstraintKind::ThinkThenJson => Constraint::think_then_json(row.schema.clone(), spec.max_think_tokens),
                };
                requests.push(Request::new(prompt, constraint));
            }
            let started = Instant::now();
            let (completions, _) = generator.generate(&model, &requests, &config)?;
            let ms = 1000.0 * started.elapsed().as_secs_f64() / chunk.len() as f64;
            let constrained = spec.constraint != ConstraintKind::None;
            let mut text = String::new();
            for (row, c) in chunk.iter().zip(completions) {
                let p = Prediction { id: row.id.clone(), completion: c.text, latency_ms: Some(ms), tokens: Some(c.tokens.len() as f64), closed: constrained.then_some(c.closed) };
                text.push_str(&serde_json::to_string(&p)?);
                text.push('\n');
            }
            // One write per batch, synced: a kill leaves whole batches (or a cut last line,
            // which a resume drops).
            file.write_all(text.as_bytes()).with_context(|| format!("appending to {}", self.out.display()))?;
            file.sync_data().with_context(|| format!("syncing {}", self.out.display()))?;
            written += chunk.len();
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(written)
    }
}

/// The tokenizer of the model, or the one saved beside the adapter when the model has none
/// (a preset-shaped base).
pub fn tokenizer_of(model: &Pretrained, adapter: Option<&Path>) -> Result<thinkjson_model::Tokenizer> {
    match model.tokenizer() {
        Ok(t) => Ok(t),
        Err(e) => match adapter.filter(|a| a.join("tokenizer.json").exists()) {
            Some(a) => Ok(thinkjson_model::Tokenizer::from_path(a)?),
            None => Err(e).with_context(|| format!("tokenizer of {}", model.path().display())),
        },
    }
}
