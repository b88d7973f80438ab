//! The eval stage: greedy completions of the held-out rows (by `predict`) from the base model
//! and the models after each training stage, each free and think-then-JSON constrained,
//! scored into one report with the training curves.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use thinkjson_eval::{evaluate, parse_jsonl, Curves, Prediction, Report, Sample};
use thinkjson_model::DeviceSpec;
use thinkjson_reward::ValidatorCache;
use thinkjson_synth::Split;

use super::config::PipelineFile;
use super::stages::split_path;
use crate::cmd_predict::{predict_files, ConstraintKind, PredictSpec};

/// One evaluated system: a model directory and a decoding mode.
pub struct System {
    pub name: String,
    pub model: PathBuf,
    pub constrained: bool,
}

pub fn systems(models: &[(String, PathBuf)]) -> Vec<System> {
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

/// Predicts (resuming what an interrupted run wrote) every system's rows and writes the report.
pub fn run(file: &PipelineFile, systems: &[System], curves: &[(&str, PathBuf)]) -> Result<Value> {
    let mut rows = crate::cmd_sft::read_rows(&split_path(&file.out, Split::Eval))?;
    rows.truncate(file.eval.rows.max(1));
    let device: DeviceSpec = file.device.parse()?;
    let pred_dir = file.out.join("eval").join("predictions");
    std::fs::create_dir_all(&pred_dir).with_context(|| format!("creating {}", pred_dir.display()))?;
    let samples: Vec<Sample> = rows
        .iter()
        .map(|r| Sample { id: r.id.clone(), kind: r.kind.clone(), style: r.style.clone(), schema: r.schema.clone(), object: r.object.clone() })
        .collect();
    // A model's systems run together: each prompt is prefilled once for its free and its
    // constrained output. Without a resume the stage's directory was cleared, so nothing is
    // reused; with one, finished files are kept and a file cut by a kill continues.
    let path_of = |s: &System| pred_dir.join(format!("{}.jsonl", s.name.replace(' ', "-")));
    let mut models: Vec<&Path> = Vec::new();
    for s in systems {
        if !models.contains(&s.model.as_path()) {
            models.push(&s.model);
        }
    }
    for model in models {
        let outputs: Vec<(ConstraintKind, PathBuf)> = systems
            .iter()
            .filter(|s| s.model == model)
            .map(|s| (if s.constrained { ConstraintKind::ThinkThenJson } else { ConstraintKind::None }, path_of(s)))
            .collect();
        let spec = PredictSpec {
            model: model.to_path_buf(),
            adapter: None,
            constraint: ConstraintKind::None,
            batch_size: file.eval.batch_size.max(1),
            max_cached_positions: file.eval.max_cached_positions,
            max_new_tokens: file.eval.max_new_tokens,
            max_think_tokens: file.eval.max_think_tokens,
            temperature: 0.0,
            seed: 0,
        };
        for summary in predict_files(&spec, &outputs, &rows, true, device).with_context(|| format!("predictions of {}", model.display()))? {
            if !summary.failed.is_empty() {
                bail!("{}: rows {:?} got no prediction", summary.out.display(), summary.failed);
            }
        }
    }
    let cache = ValidatorCache::new();
    let mut runs = Vec::new();
    // Constrained outputs that ran short of tokens and were closed by the decoder.
    let mut closed = Vec::new();
    for system in systems {
        let path = path_of(system);
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
