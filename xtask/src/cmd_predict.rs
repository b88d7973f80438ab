//! `cargo xtask predict`: batched predictions of a model over a dataset, in the JSONL that
//! `eval` reads (id, completion, latency_ms, tokens, closed). Rows run in a continuously
//! refilled batch; each prediction is appended and synced as it finishes, so a killed run
//! loses only the rows in flight, and `--resume` continues with the rows not yet written:
//! every row ends up exactly once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use thinkjson_decode::{cache_position_budget, chat_prompt, Admission, Batcher, Constraint, GenerateConfig, Generator, Request, SamplingConfig};
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
    /// Sequences generated together: a running batch that a new row joins as soon as there
    /// is room (continuous batching).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// KV-cache positions (sequences × padded width) the running batch may hold; a row
    /// joins only when it fits with room for every sequence's new tokens. 0: 2 GiB of cache
    /// for the model (SmolLM2-135M: 46,603 positions).
    #[arg(long, default_value_t = 0)]
    max_cached_positions: usize,
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
    /// The running batch's KV-cache budget in positions; 0: derived from the model
    /// ([`cache_position_budget`]).
    pub max_cached_positions: usize,
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
    /// The KV-cache budget the run used and the most positions its batch held (0 and 0 for
    /// an endpoint).
    pub cache_budget: usize,
    pub peak_cached_positions: usize,
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
        max_cached_positions: args.max_cached_positions,
        max_new_tokens: args.max_new_tokens,
        max_think_tokens: args.max_think_tokens,
        temperature: args.temperature,
        seed: args.seed,
    };
    predict_file(&spec, rows, &args.out, args.resume, args.device)
}

/// Predicts every row of `rows` not yet in `out` and appends it there.
pub fn predict_file(spec: &PredictSpec, rows: &[Row], out: &Path, resume: bool, device: DeviceSpec) -> Result<PredictSummary> {
    let mut summaries = predict_files(spec, &[(spec.constraint, out.to_path_buf())], rows, resume, device)?;
    summaries.pop().context("one output, one summary")
}

/// Predicts several decodings of one model (e.g. free and think-then-JSON) over the same
/// rows in one run, `spec.constraint` replaced by each output's. A row's prompt is prefilled
/// once and shared by its outputs, and sequences join and leave a running batch of about
/// `spec.batch_size` (continuous batching), so no row waits for the longest of a fixed
/// batch. Each prediction is appended and synced as it finishes: a kill loses only the rows
/// in flight, and `resume` continues every file.
pub fn predict_files(spec: &PredictSpec, outputs: &[(ConstraintKind, PathBuf)], rows: &[Row], resume: bool, device: DeviceSpec) -> Result<Vec<PredictSummary>> {
    let started = Instant::now();
    if spec.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut plans = Vec::with_capacity(outputs.len());
    let mut jobs = Vec::with_capacity(outputs.len());
    for (constraint, out) in outputs {
        let plan = plan(rows, out, resume)?;
        let pending = plan.pending.iter().map(|r| r.id.clone()).collect();
        jobs.push(OutputJob { constraint: *constraint, out: out.clone(), pending, kept: plan.kept });
        plans.push(plan);
    }
    // Every row some output still needs, in the data's order (repeated ids left out).
    let needed: HashSet<&str> = jobs.iter().flat_map(|j| j.pending.iter().map(String::as_str)).collect();
    let mut seen = HashSet::new();
    let rows: Vec<Row> = rows.iter().filter(|r| needed.contains(r.id.as_str()) && seen.insert(r.id.as_str())).cloned().collect();
    let done = dispatch(device, PredictJob { spec: spec.clone(), rows, outputs: jobs })?;
    let secs = started.elapsed().as_secs_f64();
    Ok(plans
        .into_iter()
        .zip(done.per_output)
        .zip(outputs)
        .map(|((plan, (written, failed)), (_, out))| PredictSummary {
            rows: plan.pending.len() + plan.kept + plan.skipped.len(),
            kept: plan.kept,
            written,
            skipped: plan.skipped,
            failed,
            out: out.clone(),
            secs,
            cache_budget: done.cache_budget,
            peak_cached_positions: done.peak_cached_positions,
        })
        .collect())
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

/// One output file of a [`PredictJob`] and the row ids it still needs.
struct OutputJob {
    constraint: ConstraintKind,
    out: PathBuf,
    pending: HashSet<String>,
    kept: usize,
}

struct PredictJob {
    spec: PredictSpec,
    rows: Vec<Row>,
    outputs: Vec<OutputJob>,
}

/// A row's sampling seed: the run's seed and the row's id, so it does not depend on the
/// batch a row lands in nor on whether the run was resumed.
fn row_seed(seed: u64, id: &str) -> u64 {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// What a [`PredictJob`] did.
struct JobDone {
    /// Per output: rows written, and ids of rows whose constraint was refused.
    per_output: Vec<(usize, Vec<String>)>,
    cache_budget: usize,
    peak_cached_positions: usize,
}

impl OnBackend for PredictJob {
    type Output = JobDone;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        let PredictJob { spec, rows, outputs } = self;
        let mut results: Vec<(usize, Vec<String>)> = vec![(0, Vec::new()); outputs.len()];
        if rows.is_empty() {
            return Ok(JobDone { per_output: results, cache_budget: 0, peak_cached_positions: 0 });
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
        let mut files = Vec::with_capacity(outputs.len());
        for o in &outputs {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(&o.out).with_context(|| format!("opening {}", o.out.display()))?;
            files.push(file);
        }
        let k_outputs = outputs.len();
        // Work left: each row with the outputs that still need it (and its prompt, once
        // rendered: a row that does not fit yet stays at the front).
        let mut queue: VecDeque<(usize, Vec<usize>, Option<Vec<u32>>)> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i, (0..k_outputs).filter(|&k| outputs[k].pending.contains(&r.id)).collect::<Vec<_>>(), None))
            .filter(|(_, ks, _)| !ks.is_empty())
            .collect();
        let todo: usize = queue.iter().map(|(_, ks, _)| ks.len()).sum();
        let kept: usize = outputs.iter().map(|o| o.kept).sum();
        let bar = crate::metrics_log::step_bar("predict", (todo + kept) as u64, kept as u64);
        let cap = spec.batch_size;
        let budget = cache_position_budget(spec.max_cached_positions, model.config());
        let mut batcher = Batcher::new(&model).with_position_budget(budget);
        let mut joined_at: HashMap<u64, Instant> = HashMap::new();
        while !queue.is_empty() || !batcher.is_empty() {
            // Join rows in groups (each join copies the running cache once) once a quarter
            // of the batch is free, or at once when the batch is empty.
            let free = cap.saturating_sub(batcher.len());
            let front = queue.front().map_or(0, |(_, ks, _)| ks.len());
            if front > 0 && (batcher.is_empty() || free >= front.max(cap / 4)) {
                let mut room = free.max(front);
                let mut joining = Vec::new();
                let mut longest = 0;
                while let Some((i, ks, prompt)) = queue.pop_front() {
                    if ks.len() > room {
                        queue.push_front((i, ks, prompt));
                        break;
                    }
                    let row = &rows[i];
                    let prompt = match prompt {
                        Some(p) => p,
                        None => {
                            let messages = thinkjson_synth::prompt::messages_with(&row.text, &row.schema, ChatMessage::new);
                            chat_prompt(&template, &tokenizer, &messages)?
                        }
                    };
                    // Within the cache budget, unless the batch is empty (a row always runs).
                    let alone = batcher.is_empty() && joining.is_empty();
                    if !alone && !batcher.fits(joining.len() + ks.len(), longest.max(prompt.len() + spec.max_new_tokens)) {
                        queue.push_front((i, ks, Some(prompt)));
                        break;
                    }
                    longest = longest.max(prompt.len() + spec.max_new_tokens);
                    room -= ks.len();
                    for k in ks {
                        let constraint = match outputs[k].constraint {
                            ConstraintKind::None => Constraint::None,
                            ConstraintKind::JsonSchema => Constraint::json_schema(row.schema.clone()),
                            ConstraintKind::ThinkThenJson => Constraint::think_then_json(row.schema.clone(), spec.max_think_tokens),
                        };
                        let id = (i * k_outputs + k) as u64;
                        let request = Request { prompt: prompt.clone(), constraint, seed: Some(row_seed(spec.seed, &row.id)) };
                        joining.push(Admission { id, request, config: config.clone() });
                        joined_at.insert(id, Instant::now());
                    }
                }
                for (id, e) in batcher.join(&generator, &model, joining)? {
                    let (i, k) = (id as usize / k_outputs, id as usize % k_outputs);
                    eprintln!("predict: row `{}` ({}): {e}; it gets no prediction", rows[i].id, outputs[k].out.display());
                    results[k].1.push(rows[i].id.clone());
                    bar.inc(1);
                }
            }
            batcher.step(&generator, &model)?;
            for (id, c) in batcher.take_finished(&generator, &model)? {
                let (i, k) = (id as usize / k_outputs, id as usize % k_outputs);
                let ms = joined_at.remove(&id).map(|t| 1000.0 * t.elapsed().as_secs_f64());
                let constrained = outputs[k].constraint != ConstraintKind::None;
                let p = Prediction { id: rows[i].id.clone(), completion: c.text, latency_ms: ms, tokens: Some(c.tokens.len() as f64), closed: constrained.then_some(c.closed) };
                let mut line = serde_json::to_string(&p)?;
                line.push('\n');
                // One write per prediction, synced: a kill leaves whole lines (or a cut last
                // line, which a resume drops).
                let out = &outputs[k].out;
                files[k].write_all(line.as_bytes()).with_context(|| format!("appending to {}", out.display()))?;
                files[k].sync_data().with_context(|| format!("syncing {}", out.display()))?;
                results[k].0 += 1;
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        Ok(JobDone { per_output: results, cache_budget: budget, peak_cached_positions: batcher.peak_cached_positions() })
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

#[cfg(test)]
mod tests {
    use super::*;
    use thinkjson_model::{CausalLm, CpuBackend, ModelConfig, StorageDtype};

    /// The eval stage's path: free and constrained outputs of one model predicted together
    /// (shared prefills, one running batch) are the outputs each gets predicted alone.
    #[test]
    fn outputs_predicted_together_equal_each_alone() {
        let dir = tempfile::tempdir().unwrap();
        let model_dir = dir.path().join("model");
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/qwen");
        let tokenizer = thinkjson_model::Tokenizer::from_path(&assets).unwrap();
        let config = ModelConfig::preset("tiny").unwrap().with_vocab_size(tokenizer.vocab_size());
        CausalLm::<CpuBackend>::random(&config, 3, &Default::default()).unwrap().save_pretrained(&model_dir, StorageDtype::Float32).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(assets.join(f), model_dir.join(f)).unwrap();
        }
        let rows = thinkjson_synth::generate(thinkjson_synth::SynthConfig { rows: 10, seed: 4, ..Default::default() }).unwrap();
        let spec = |constraint| PredictSpec {
            model: model_dir.clone(),
            adapter: None,
            constraint,
            batch_size: 4,
            max_cached_positions: 0,
            max_new_tokens: 24,
            max_think_tokens: 6,
            temperature: 0.0,
            seed: 0,
        };
        let kinds = [ConstraintKind::None, ConstraintKind::ThinkThenJson];
        let together: Vec<(ConstraintKind, PathBuf)> = kinds.iter().map(|&k| (k, dir.path().join(format!("together-{k:?}.jsonl")))).collect();
        let summaries = predict_files(&spec(ConstraintKind::None), &together, &rows, false, DeviceSpec::Cpu).unwrap();
        assert!(summaries.iter().all(|s| s.written == rows.len() && s.failed.is_empty()));
        let read = |p: &Path| -> HashMap<String, (String, Option<bool>)> {
            std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str::<Prediction>(l).unwrap()).map(|p| (p.id, (p.completion, p.closed))).collect()
        };
        for (k, path) in &together {
            let alone = dir.path().join(format!("alone-{k:?}.jsonl"));
            predict_file(&spec(*k), &rows, &alone, false, DeviceSpec::Cpu).unwrap();
            let (a, b) = (read(path), read(&alone));
            assert_eq!(a.len(), rows.len());
            assert_eq!(a, b, "{k:?}");
        }
        // A cache budget of two of the longest sequences: rows wait for room instead of the
        // cache growing past it, and the predictions are the same.
        let pretrained = Pretrained::open(&model_dir).unwrap();
        let template = pretrained.chat_template().unwrap();
        let longest = rows
            .iter()
            .map(|r| chat_prompt(&template, &tokenizer, &thinkjson_synth::prompt::messages_with(&r.text, &r.schema, ChatMessage::new)).unwrap().len())
            .max()
            .unwrap();
        let budget = 2 * (longest + 24);
        let unbounded = summaries[0].peak_cached_positions;
        assert!(unbounded > budget, "the run without a budget held {unbounded} positions, not more than {budget}");
        let bounded: Vec<(ConstraintKind, PathBuf)> = kinds.iter().map(|&k| (k, dir.path().join(format!("bounded-{k:?}.jsonl")))).collect();
        let summaries = predict_files(&PredictSpec { max_cached_positions: budget, ..spec(ConstraintKind::None) }, &bounded, &rows, false, DeviceSpec::Cpu).unwrap();
        for (s, ((_, path), (_, free))) in summaries.iter().zip(bounded.iter().zip(&together)) {
            assert_eq!((s.cache_budget, s.written), (budget, rows.len()));
            assert!(s.peak_cached_positions <= budget, "peak {} of {budget}", s.peak_cached_positions);
            assert_eq!(read(path), read(free));
        }
    }
}
