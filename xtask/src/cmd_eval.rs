//! `eval` and `report`: files around the `thinkjson-eval` library.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use thinkjson_eval::{curves_svg, evaluate, markdown, metrics_svg, parse_jsonl, spread, spread_markdown, Curves, Prediction, Report, Sample};
use thinkjson_reward::ValidatorCache;

#[derive(Args)]
pub struct EvalArgs {
    /// Dataset JSONL (rows with id, schema, object; kind and style used for breakdowns).
    #[arg(long)]
    data: PathBuf,
    /// Predictions JSONL (id, completion, optional latency_ms and tokens); repeat for several
    /// runs; `NAME=FILE` names a run (default: the file stem).
    #[arg(long, required = true)]
    predictions: Vec<String>,
    /// Training metrics JSONL to plot as curves (`NAME=FILE`); repeatable.
    #[arg(long)]
    metrics: Vec<String>,
    /// Report directory (created): report.md, report.json, metrics.svg, curve_*.svg.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct ReportArgs {
    /// Eval directories, each with a report.json.
    #[arg(long, required = true, num_args = 1..)]
    runs: Vec<PathBuf>,
    /// The runs are repeats of the same systems (e.g. the pipeline with three seeds): write
    /// spread.md and spread.json, each system's metrics as the mean over the runs and the
    /// lowest and highest run, instead of one merged report.
    #[arg(long)]
    spread: bool,
    #[arg(long)]
    out: PathBuf,
}

fn named(arg: &str) -> (String, PathBuf) {
    match arg.split_once('=') {
        Some((name, path)) if !name.is_empty() => (name.to_string(), PathBuf::from(path)),
        _ => {
            let p = PathBuf::from(arg);
            let name = p.file_stem().map_or_else(|| arg.to_string(), |s| s.to_string_lossy().into_owned());
            (name, p)
        }
    }
}

fn read(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // Model output may not be UTF-8: keep the line, replace bad bytes.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let (samples, bad) = parse_jsonl::<Sample>(&read(&args.data)?);
    for s in &bad {
        eprintln!("{}:{}: skipped dataset row: {}", args.data.display(), s.line, s.reason);
    }
    if samples.is_empty() {
        bail!("{}: no dataset rows", args.data.display());
    }
    let cache = ValidatorCache::new();
    let mut runs = Vec::new();
    for arg in &args.predictions {
        let (name, path) = named(arg);
        let (preds, skipped) = parse_jsonl::<Prediction>(&read(&path)?);
        for s in &skipped {
            eprintln!("{}:{}: skipped prediction: {}", path.display(), s.line, s.reason);
        }
        runs.push(evaluate(&name, &samples, &preds, skipped, &cache));
    }
    let mut curves = Vec::new();
    for arg in &args.metrics {
        let (name, path) = named(arg);
        curves.push(Curves::from_jsonl(&name, &read(&path)?));
    }
    write_report(&Report { runs, curves }, &args.out)
}

pub fn report(args: ReportArgs) -> Result<()> {
    let mut reports = Vec::with_capacity(args.runs.len());
    for dir in &args.runs {
        let path = dir.join("report.json");
        let r: Report = serde_json::from_str(&read(&path)?).with_context(|| format!("{}: not a report", path.display()))?;
        reports.push((dir.display().to_string(), r));
    }
    if args.spread {
        return write_spread(&reports, &args.out);
    }
    let mut merged = Report { runs: Vec::new(), curves: Vec::new() };
    for (_, r) in reports {
        merged.runs.extend(r.runs);
        merged.curves.extend(r.curves);
    }
    write_report(&merged, &args.out)
}

/// spread.json and spread.md of repeated runs; the mean table goes to stderr too.
fn write_spread(reports: &[(String, Report)], out: &Path) -> Result<()> {
    let spread = spread(reports).map_err(|e| anyhow::anyhow!("--spread: {e}"))?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let markdown = spread_markdown(&spread);
    thinkjson_model::write_atomic(&out.join("spread.json"), serde_json::to_string_pretty(&spread)?.as_bytes()).context("writing spread.json")?;
    thinkjson_model::write_atomic(&out.join("spread.md"), markdown.as_bytes()).context("writing spread.md")?;
    let mean_table = markdown.split("\n### ").next().unwrap_or_default();
    eprintln!("{mean_table}");
    eprintln!("spread written to {}", out.join("spread.md").display());
    Ok(())
}

pub fn write_report(report: &Report, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let write = |name: &str, text: &str| -> Result<()> {
        thinkjson_model::write_atomic(&out.join(name), text.as_bytes()).with_context(|| format!("writing {name}"))
    };
    write("report.json", &serde_json::to_string_pretty(report)?)?;
    write("report.md", &markdown(report))?;
    write("metrics.svg", &metrics_svg(report).map_err(|e| anyhow::anyhow!("metrics chart: {e}"))?)?;
    for (name, svg) in curves_svg(&report.curves).map_err(|e| anyhow::anyhow!("curves: {e}"))? {
        write(&name, &svg)?;
    }
    for run in &report.runs {
        let o = &run.overall;
        eprintln!(
            "{:<16} rows {:>5}  valid JSON {:>5.1} %  schema-valid {:>5.1} %  match {:>5.1} %  noise {:>5.1} %",
            run.name, o.rows, 100.0 * o.valid_json, 100.0 * o.schema_valid, 100.0 * o.mean_match, 100.0 * o.mean_noise
        );
    }
    eprintln!("report written to {}", out.join("report.md").display());
    Ok(())
}
