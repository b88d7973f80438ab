//! The eval stage: greedy completions of the held-out rows from the base, SFT and SFT+GRPO
//! models, each free and think-then-JSON constrained, scored into one report with the
//! training curves.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use thinkjson_decode::{chat_prompt, Constraint, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_eval::{evaluate, parse_jsonl, Curves, Prediction, Report, Sample};
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::{CausalLm, DeviceSpec, Tokenizer};
use thinkjson_reward::ValidatorCache;
use thinkjson_synth::{Row, Split};

use super::config::{EvalSection, PipelineFile};
use super::stages::split_path;
use crate::backend::{dispatch, OnBackend};

/// One evaluated system: a model directory and a decoding mode.
pub struct System {
    pub name: String,
    pub model: PathBuf,
    pub constrained: bool,
}

pub fn systems(models: &[(&str, PathBuf)]) -> Vec<System> {
    models
        .iter()
        .flat_map(|(name, dir)| {
            [false, true].map(|constrained| System {
                name: if constrained { format!("{name} constrained") } else { name.to_string() },
                model: dir.clone(),
                constrained,
            })
        })
        .collect()
}

pub fn report_dir(out: &Path) -> PathBuf {
    out.join("eval").join("report")
}

/// Generates (or, resuming, reuses) every system's predictions and writes the report.
pub fn run(file: &PipelineFile, systems: &[System], curves: &[(&str, PathBuf)], reuse: bool) -> Result<Value> {
    let mut rows = crate::cmd_sft::read_rows(&split_path(&file.out, Split::Eval))?;
    rows.truncate(file.eval.rows.max(1));
    let device: DeviceSpec = file.device.parse()?;
    let pred_dir = file.out.join("eval").join("predictions");
    std::fs::create_dir_all(&pred_dir).with_context(|| format!("creating {}", pred_dir.display()))?;
    let samples: Vec<Sample> = rows
        .iter()
        .map(|r| Sample { id: r.id.clone(), kind: r.kind.clone(), style: r.style.clone(), schema: r.schema.clone(), object: r.object.clone() })
        .collect();
    let cache = ValidatorCache::new();
    let mut runs = Vec::new();
    // Constrained outputs that ran short of tokens and were closed by the decoder.
    let mut closed = Vec::new();
    for system in systems {
        let path = pred_dir.join(format!("{}.jsonl", system.name.replace(' ', "-")));
        if !(reuse && path.exists()) {
            let job = Predict { rows: rows.clone(), system_model: system.model.clone(), constrained: system.constrained, eval: file.eval.clone() };
            let preds = dispatch(device, job)?;
            let text: String = preds.iter().map(|p| serde_json::to_string(p).map(|l| l + "\n")).collect::<Result<_, _>>()?;
            thinkjson_model::write_atomic(&path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let (preds, skipped) = parse_jsonl::<Prediction>(&text);
        closed.push(preds.iter().filter(|p| p.closed == Some(true)).count());
        runs.push(evaluate(&system.name, &samples, &preds, skipped, &cache));
    }
    let curves: Vec<Curves> = curves
        .iter()
        .filter_map(|(name, p)| std::fs::read_to_string(p).ok().map(|t| Curves::from_jsonl(name, &t)))
        .collect();
    let report = Report { runs, curves };
    crate::cmd_eval::write_report(&report, &report_dir(&file.out))?;
    let table: Vec<Value> = report
        .runs
        .iter()
        .zip(&closed)
        .map(|(r, closed)| {
            let o = &r.overall;
            json!({"system": r.name, "rows": o.rows, "valid_json": o.valid_json, "schema_valid": o.schema_valid, "format_valid": o.format_valid, "mean_match": o.mean_match, "mean_tokens": o.mean_tokens, "closed_by_decoder": closed})
        })
        .collect();
    Ok(json!({"report": report_dir(&file.out).join("report.md"), "systems": table}))
}

struct Predict {
    rows: Vec<Row>,
    system_model: PathBuf,
    constrained: bool,
    eval: EvalSection,
}

impl OnBackend for Predict {
    type Output = Vec<Prediction>;
    fn run<B: Backend>(self, device: B::Device) -> Result<Vec<Prediction>> {
        let model = CausalLm::<B>::from_pretrained(&self.system_model, &device).with_context(|| format!("loading {}", self.system_model.display()))?;
        let tok = Tokenizer::from_path(&self.system_model)?;
        let template = crate::cmd_decode::chat_template(&self.system_model)?;
        let generator = Generator::for_model(&tok, &model)?;
        let config = GenerateConfig { max_new_tokens: self.eval.max_new_tokens, sampling: SamplingConfig::greedy(), ..GenerateConfig::default() };
        let mut out = Vec::with_capacity(self.rows.len());
        for chunk in self.rows.chunks(self.eval.batch_size.max(1)) {
            let mut requests = Vec::with_capacity(chunk.len());
            for row in chunk {
                let messages = thinkjson_sft::chat_messages(&row.text, &row.schema);
                let prompt = chat_prompt(&template, &tok, &messages)?;
                let constraint =
                    if self.constrained { Constraint::think_then_json(row.schema.clone(), self.eval.max_think_tokens) } else { Constraint::None };
                requests.push(Request::new(prompt, constraint));
            }
            let started = Instant::now();
            let (completions, _) = generator.generate(&model, &requests, &config)?;
            let ms = 1000.0 * started.elapsed().as_secs_f64() / chunk.len() as f64;
            for (row, c) in chunk.iter().zip(completions) {
                out.push(Prediction {
                    id: row.id.clone(),
                    completion: c.text,
                    latency_ms: Some(ms),
                    tokens: Some(c.tokens.len() as f64),
                    closed: self.constrained.then_some(c.closed),
                });
            }
        }
        Ok(out)
    }
}
