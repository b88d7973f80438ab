//! `schemas`: which schemas of a folder tree the constrained decoder accepts, per folder;
//! with `--model`, whether the outputs it returns are valid under the full schema.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::Value;
use thinkjson_decode::{Completion, Constraint, DecodeError, FinishReason, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::{ChatMessage, DeviceSpec, Pretrained, Tokenizer};

use crate::backend::{dispatch, OnBackend};
use crate::cmd_decode::percentile;

#[derive(Args)]
pub struct SchemasArgs {
    /// A folder of JSON Schema files (searched recursively for `*.json`); each immediate
    /// subfolder is reported on its own (e.g. JSONSchemaBench's `data/`).
    #[arg(long)]
    dir: PathBuf,
    /// Also generate with this model (HF directory, GGUF file or embedded name) and check
    /// every returned output against the full schema with `jsonschema`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter directory to apply to --model.
    #[arg(long, requires = "model")]
    adapter: Option<PathBuf>,
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
    /// Regenerations of an output invalid under the full schema (see `GenerateConfig`).
    #[arg(long, default_value_t = 3)]
    max_retries: usize,
    /// The prompt shows at most this many characters of the schema (the grammar always has
    /// all of it).
    #[arg(long, default_value_t = 2000)]
    prompt_schema_chars: usize,
    /// At most this many accepted schemas per folder are generated for (0 = all).
    #[arg(long, default_value_t = 0)]
    per_folder: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// One folder's figures.
#[derive(Debug, Default, Serialize)]
struct Folder {
    files: usize,
    /// Fail their own meta-schema (or are not JSON): not counted against acceptance.
    invalid: usize,
    accepted: usize,
    /// Accepted schemas with keywords the grammar leaves to validation.
    validated_after: usize,
    /// Accepted schemas with a `format` kept as an annotation.
    format_annotations: usize,
    rejected: BTreeMap<String, usize>,
    generated: usize,
    valid: usize,
    constraint_errors: usize,
    length_cut: usize,
    /// Returned as constrained and valid JSON, yet invalid under the full schema (must be 0).
    invalid_returned: usize,
    retries: usize,
    #[serde(skip)]
    masks: Vec<f64>,
    mask_p50_us: f64,
    mask_p99_us: f64,
}

impl Folder {
    fn accepted_share(&self) -> f64 {
        100.0 * self.accepted as f64 / (self.files - self.invalid).max(1) as f64
    }
}

struct Accepted {
    folder: String,
    path: PathBuf,
    schema: Value,
    constraint: Constraint,
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
    let mut folders: BTreeMap<String, Folder> = BTreeMap::new();
    let mut accepted = Vec::new();
    for path in &files {
        let folder = folder_of(&args.dir, path);
        let f = folders.entry(folder.clone()).or_default();
        f.files += 1;
        let Some(schema) = std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()) else {
            f.invalid += 1;
            continue;
        };
        let constraint = if args.think {
            Constraint::think_then_json(schema.clone(), args.max_think_tokens)
        } else {
            Constraint::json_schema(schema.clone())
        };
        match generator.compile(&constraint) {
            Ok(compiled) => {
                f.accepted += 1;
                if compiled.is_some_and(|c| !c.validated_keywords().is_empty()) {
                    f.validated_after += 1;
                }
                if thinkjson_decode::plan_schema(&schema, thinkjson_decode::Relax::default()).is_ok_and(|p| !p.annotations.is_empty()) {
                    f.format_annotations += 1;
                }
                accepted.push(Accepted { folder, path: path.clone(), schema, constraint });
            }
            Err(DecodeError::InvalidSchema { .. }) => f.invalid += 1,
            Err(e) => *f.rejected.entry(reason(&e)).or_default() += 1,
        }
    }
    if let Some(model) = model {
        generate_all(&args, model, &tokenizer, &accepted, &mut folders)?;
    }
    for f in folders.values_mut() {
        f.mask_p50_us = percentile(&f.masks, 0.5);
        f.mask_p99_us = percentile(&f.masks, 0.99);
    }
    if args.json {
        return crate::print_out(&serde_json::to_string_pretty(&folders)?);
    }
    crate::print_out(&table(&folders, args.model.is_some()))
}

fn generate_all(args: &SchemasArgs, model: Pretrained, tokenizer: &Tokenizer, accepted: &[Accepted], folders: &mut BTreeMap<String, Folder>) -> Result<()> {
    let template = model.chat_template()?;
    let mut chosen: Vec<&Accepted> = Vec::new();
    let mut taken: BTreeMap<&str, usize> = BTreeMap::new();
    for a in accepted {
        let n = taken.entry(&a.folder).or_default();
        if args.per_folder == 0 || *n < args.per_folder {
            *n += 1;
            chosen.push(a);
        }
    }
    let mut requests = Vec::new();
    for a in &chosen {
        let name = a.path.file_stem().unwrap_or_default().to_string_lossy();
        // The schema text is cut at `prompt_schema_chars`: benchmark schemas run to hundreds of
        // kilobytes, and a batch of such prompts would not fit in memory.
        let text = a.schema.to_string();
        let shown: String = text.chars().take(args.prompt_schema_chars).collect();
        let messages = [ChatMessage::user(format!("Produce a JSON value for the schema `{name}`:\n{shown}"))];
        requests.push(Request::new(thinkjson_decode::chat_prompt(&template, tokenizer, &messages)?, a.constraint.clone()));
    }
    let config = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        max_retries: args.max_retries,
        sampling: SamplingConfig { temperature: args.temperature, seed: args.seed, ..Default::default() },
        ..Default::default()
    };
    let job = SchemaRunJob { model, adapter: args.adapter.clone(), tokenizer: tokenizer.clone(), requests, config, batch: args.batch.max(1) };
    let (outs, masks) = dispatch(args.device, job)?;
    for ((a, out), masks) in chosen.iter().zip(&outs).zip(masks) {
        let Some(f) = folders.get_mut(&a.folder) else { continue };
        f.generated += 1;
        f.retries += out.retries;
        f.masks.extend(masks);
        match out.finish {
            FinishReason::ConstraintError => f.constraint_errors += 1,
            FinishReason::Length => f.length_cut += 1,
            _ if valid_under_full_schema(&a.schema, out, args.think) => f.valid += 1,
            _ => {
                f.invalid_returned += 1;
                eprintln!("invalid output returned for {}: {:?}", a.path.display(), out.text);
            }
        }
    }
    Ok(())
}

/// Checked here with `jsonschema` directly, independently of the generator's own check.
fn valid_under_full_schema(schema: &Value, out: &Completion, think: bool) -> bool {
    let text = if think { answer(&out.text) } else { Some(out.text.as_str()) };
    jsonschema::validator_for(schema)
        .ok()
        .zip(text.and_then(|t| serde_json::from_str::<Value>(t).ok()))
        .is_some_and(|(v, value)| v.is_valid(&value))
}

fn table(folders: &BTreeMap<String, Folder>, generated: bool) -> String {
    let mut lines = vec![
        "| folder | schemas | pass meta-schema | accepted | accepted % | validated after generation | format annotations | rejected (reasons) |".to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    let mut total = Folder::default();
    for (name, f) in folders {
        let reasons: Vec<String> = f.rejected.iter().map(|(why, n)| format!("{n} {why}")).collect();
        lines.push(format!(
            "| {name} | {} | {} | {} | {:.1} | {} | {} | {} |",
            f.files,
            f.files - f.invalid,
            f.accepted,
            f.accepted_share(),
            f.validated_after,
            f.format_annotations,
            reasons.join("; ")
        ));
        total.files += f.files;
        total.invalid += f.invalid;
        total.accepted += f.accepted;
        total.validated_after += f.validated_after;
        total.format_annotations += f.format_annotations;
    }
    lines.push(format!(
        "| all | {} | {} | {} | {:.1} | {} | {} | |",
        total.files,
        total.files - total.invalid,
        total.accepted,
        total.accepted_share(),
        total.validated_after,
        total.format_annotations
    ));
    if generated {
        lines.push(String::new());
        lines.push("| folder | generated | valid under the full schema | constraint errors | cut at length | invalid returned | retries | mask p50 / p99 µs |".into());
        lines.push("|---|---|---|---|---|---|---|---|".into());
        for (name, f) in folders.iter().filter(|(_, f)| f.generated > 0) {
            lines.push(format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {:.0} / {:.0} |",
                f.generated, f.valid, f.constraint_errors, f.length_cut, f.invalid_returned, f.retries, f.mask_p50_us, f.mask_p99_us
            ));
        }
    }
    lines.join("\n")
}

/// The immediate subfolder of `root` holding `path` (`.` for files directly in it).
fn folder_of(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let mut parts = rel.components();
    match (parts.next(), parts.next()) {
        (Some(first), Some(_)) => first.as_os_str().to_string_lossy().into_owned(),
        _ => ".".into(),
    }
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

struct SchemaRunJob {
    model: Pretrained,
    adapter: Option<PathBuf>,
    tokenizer: Tokenizer,
    requests: Vec<Request>,
    config: GenerateConfig,
    batch: usize,
}

impl OnBackend for SchemaRunJob {
    /// Each completion and the mask times of its batch (attributed to every member).
    type Output = (Vec<Completion>, Vec<Vec<f64>>);
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        let model = crate::model_ref::load::<B>(&self.model, self.adapter.as_deref(), &device)?.merge_lora();
        let generator = Generator::for_model(&self.tokenizer, &model)?;
        let bar = indicatif::ProgressBar::new(self.requests.len() as u64);
        let mut outs = Vec::with_capacity(self.requests.len());
        let mut masks = Vec::with_capacity(self.requests.len());
        for chunk in self.requests.chunks(self.batch) {
            let (o, stats) = generator.generate(&model, chunk, &self.config)?;
            let per = stats.mask_micros.len().div_ceil(chunk.len().max(1));
            for (i, c) in o.into_iter().enumerate() {
                masks.push(stats.mask_micros.iter().skip(i * per).take(per).copied().collect());
                outs.push(c);
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok((outs, masks))
    }
}
