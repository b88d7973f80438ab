//! `cargo xtask pipeline`: synthetic data → tokenizer → model → SFT → GRPO → evaluation
//! report, each stage with a manifest so `--resume` skips what is done and continues what
//! was interrupted.

mod config;
mod eval_stage;
mod manifest;
mod stages;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use thinkjson_model::DeviceSpec;
use thinkjson_synth::Split;

pub use config::PipelineFile;
use manifest::Manifest;

use crate::cmd_grpo::GrpoFile;
use crate::cmd_sft::SftFile;
use crate::train_common::stage_model;

#[derive(Args)]
pub struct PipelineArgs {
    /// pipeline.toml (every field defaulted: no file runs the embedded CPU default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory (overrides `out`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stages to run, in order: synth,tokenizer,model,sft,grpo,eval (default: all).
    #[arg(long, value_delimiter = ',')]
    stages: Option<Vec<String>>,
    /// Continue the run in OUT: finished stages are skipped, an interrupted one resumes.
    #[arg(long)]
    resume: bool,
    /// cpu, cuda or cuda:N (overrides `device`).
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// Data-parallel SFT and GRPO over these devices: `cpu,cpu` or `cuda:0,cuda:1,…` (overrides `devices`).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<DeviceSpec>,
}

pub const STAGES: [&str; 6] = ["synth", "tokenizer", "model", "sft", "grpo", "eval"];

/// What happened to a stage in this invocation.
struct Outcome {
    stage: &'static str,
    status: &'static str,
    secs: f64,
    summary: Value,
}

pub fn pipeline(args: PipelineArgs) -> Result<()> {
    let mut file = match &args.config {
        Some(p) => crate::train_common::read_config(p)?,
        None => PipelineFile::default(),
    };
    if let Some(out) = &args.out {
        file.out = out.clone();
    }
    if let Some(d) = args.device {
        file.device = d.to_string();
    }
    if !args.devices.is_empty() {
        file.devices = args.devices.iter().map(ToString::to_string).collect();
    }
    file.resolve_lora()?;
    let selected: Vec<String> = args.stages.clone().unwrap_or_else(|| STAGES.iter().map(|s| s.to_string()).collect());
    check_before_work(&file, &selected, args.resume)?;
    init_log(&file.out)?;
    tracing::info!(out = %file.out.display(), resume = args.resume, stages = ?selected, "pipeline start");
    std::fs::write(file.out.join("pipeline.toml"), toml::to_string(&file).context("writing the resolved config")?)
        .with_context(|| format!("writing {}", file.out.join("pipeline.toml").display()))?;

    let sequence = stage_sequence(&file);
    let keys = stage_keys(&file, &sequence);
    let bar = crate::metrics_log::progress().add(ProgressBar::new(sequence.len() as u64));
    bar.set_style(ProgressStyle::with_template("pipeline [{bar:12}] {pos}/{len} stages · {msg} · {elapsed}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let mut available = true;
    for (i, stage) in sequence.iter().enumerate() {
        bar.set_position(i as u64);
        bar.set_message(stage.to_string());
        let key = &keys[i];
        let inputs = manifest::hash_inputs(&file.out, &inputs_of(&file, stage)).unwrap_or_default();
        let previous = manifest::read(&file.out, stage);
        if let Some(m) = previous.as_ref().filter(|m| m.finished && &m.key == key && m.inputs == inputs).cloned() {
            tracing::info!(stage, "finished earlier with the same config and inputs: skipped");
            outcomes.push(Outcome { stage, status: "done earlier", secs: m.secs, summary: m.summary });
            continue;
        }
        if !selected.iter().any(|s| s == stage) {
            available = false;
            outcomes.push(Outcome { stage, status: "not run", secs: 0.0, summary: Value::Null });
            continue;
        }
        if !available {
            bail!("stage {stage} needs the stages before it, which have not finished with this config; include them in --stages");
        }
        // Same key, not finished: an interrupted stage, continued from its checkpoints.
        let resume = previous.as_ref().is_some_and(|m| !m.finished && &m.key == key);
        if !resume {
            clear_outputs(&file, stage)?;
        }
        let mut m = Manifest { stage: stage.to_string(), key: key.clone(), inputs, finished: false, secs: 0.0, summary: Value::Null };
        manifest::write(&file.out, &m)?;
        tracing::info!(stage, resume, "stage start");
        let t = Instant::now();
        bar.suspend(|| eprintln!("== {stage}{}", if resume { " (resuming)" } else { "" }));
        let summary = run_stage(&file, stage, resume).with_context(|| format!("stage {stage}"))?;
        m.secs = t.elapsed().as_secs_f64();
        m.finished = true;
        m.summary = summary.clone();
        manifest::write(&file.out, &m)?;
        tracing::info!(stage, secs = m.secs, summary = %summary, "stage finished");
        outcomes.push(Outcome { stage, status: if resume { "resumed" } else { "ran" }, secs: m.secs, summary });
    }
    bar.finish_and_clear();
    print_summary(&file, &outcomes, started.elapsed().as_secs_f64());
    tracing::info!(secs = started.elapsed().as_secs_f64(), "pipeline finished");
    Ok(())
}

/// Everything that can be checked before any work: stage names, hyper-parameters, the
/// model directory, the device, and that the output directory is writable and not another
/// run's (without --resume).
fn check_before_work(file: &PipelineFile, selected: &[String], resume: bool) -> Result<()> {
    for s in selected {
        if !STAGES.contains(&s.as_str()) {
            bail!("--stages: unknown stage `{s}` (stages: {})", STAGES.join(", "));
        }
    }
    file.sft.validate().context("[sft]")?;
    file.grpo.validate().context("[grpo]")?;
    let _: DeviceSpec = file.device.parse()?;
    crate::backend::device_group(&file.device, &file.devices).context("devices")?;
    if let Some(dir) = stages::own_hf_dir(file) {
        for needed in ["config.json", "tokenizer.json"] {
            if !dir.join(needed).exists() {
                bail!("model.dir {}: no {needed} there (need an HF model directory)", dir.display());
            }
        }
    } else if let Some(arg) = file.model.pretrained() {
        // A GGUF file or an embedded name: its header, config and tokenizer must be usable.
        let model = crate::model_ref::open(arg).context("model.dir")?;
        model.config().context("model.dir")?;
        model.tokenizer().context("model.dir")?;
    } else if !file.tokenizer.template_from.exists() {
        bail!("tokenizer.template_from {}: no such file", file.tokenizer.template_from.display());
    }
    std::fs::create_dir_all(&file.out).with_context(|| format!("output directory {} cannot be created", file.out.display()))?;
    let probe = file.out.join(".write-probe");
    std::fs::write(&probe, b"").with_context(|| format!("output directory {} is not writable", file.out.display()))?;
    let _ = std::fs::remove_file(&probe);
    if !resume && manifest::dir(&file.out).exists() {
        bail!("{} holds an earlier pipeline run; pass --resume to continue it, or choose another --out", file.out.display());
    }
    Ok(())
}

/// Logs (tracing) to OUT/pipeline.log.
fn init_log(out: &Path) -> Result<()> {
    let path = out.join("pipeline.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    let _ = tracing_subscriber::fmt().with_writer(std::sync::Mutex::new(log)).with_ansi(false).try_init();
    Ok(())
}

/// Each stage's key hashes its own settings and the key before it, so a change reruns that
/// stage and what follows, nothing earlier.
fn stage_keys(file: &PipelineFile, sequence: &[&str]) -> Vec<String> {
    fn v<T: serde::Serialize>(x: &T) -> Value {
        serde_json::to_value(x).unwrap_or_default()
    }
    let own = |stage: &str| match stage {
        "synth" => v(&file.synth),
        "tokenizer" => json!([v(&file.tokenizer), file.model.pretrained()]),
        "model" => v(&file.model),
        "sft" => v(&file.sft),
        "grpo" => v(&file.grpo),
        _ => v(&file.eval),
    };
    let mut keys: Vec<String> = Vec::new();
    for part in sequence.iter().map(|s| own(s)) {
        let part = &part;
        let upstream = json!(keys.last());
        keys.push(manifest::key_of(&[part, &upstream]));
    }
    keys
}

/// The stages in the order they run: the training stages as `order` says.
fn stage_sequence(file: &PipelineFile) -> Vec<&'static str> {
    let [first, second] = file.order.training();
    vec!["synth", "tokenizer", "model", first, second, "eval"]
}

/// The full model a training stage starts from: the base for the first, the first's output
/// for the second.
fn start_model(file: &PipelineFile, stage: &str) -> PathBuf {
    let [first, _] = file.order.training();
    if stage == first {
        stages::base_dir(file)
    } else {
        stage_model(&file.out.join(first))
    }
}

/// The evaluated models: base, after the first training stage, after both.
fn evaluated_models(file: &PipelineFile) -> [(String, PathBuf); 3] {
    let [first, second] = file.order.training();
    [
        ("base".to_string(), stages::base_dir(file)),
        (first.to_string(), stage_model(&file.out.join(first))),
        (format!("{first}+{second}"), stage_model(&file.out.join(second))),
    ]
}

/// Files a stage reads (hashed into its manifest).
fn inputs_of(file: &PipelineFile, stage: &str) -> Vec<PathBuf> {
    let out = &file.out;
    match stage {
        "tokenizer" => vec![stages::split_path(out, Split::Sft), stages::split_path(out, Split::Grpo)],
        "model" => {
            let mut inputs = vec![stages::tokenizer_dir(file).join("tokenizer.json")];
            // A GGUF file is hashed whole (its bytes are the model); an HF directory by config and sizes.
            if let Some(arg) = file.model.pretrained().filter(|_| stages::own_hf_dir(file).is_none()) {
                inputs.push(crate::model_ref::open(arg).map(|m| m.path().to_path_buf()).unwrap_or_else(|_| arg.to_path_buf()));
            }
            inputs
        }
        "sft" => vec![stages::split_path(out, Split::Sft), stages::split_path(out, Split::Eval), start_model(file, "sft")],
        "grpo" => vec![stages::split_path(out, Split::Grpo), start_model(file, "grpo")],
        "eval" => {
            let [_, last] = file.order.training();
            vec![stages::split_path(out, Split::Eval), stage_model(&out.join(last))]
        }
        _ => Vec::new(),
    }
}

/// Removes what a stage writes, before it runs from scratch.
fn clear_outputs(file: &PipelineFile, stage: &str) -> Result<()> {
    let dir = match stage {
        "synth" => file.out.join("synth"),
        "tokenizer" if stages::own_hf_dir(file).is_none() => file.out.join("tokenizer"),
        "model" if stages::own_hf_dir(file).is_none() => file.out.join("base"),
        "sft" => file.out.join("sft"),
        "grpo" => file.out.join("grpo"),
        "eval" => file.out.join("eval"),
        _ => return Ok(()),
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    Ok(())
}

fn run_stage(file: &PipelineFile, stage: &str, resume: bool) -> Result<Value> {
    let out = &file.out;
    match stage {
        "synth" => stages::synth(file),
        "tokenizer" => stages::tokenizer(file),
        "model" => stages::model(file),
        "sft" => {
            let sft = SftFile {
                model: Some(start_model(file, "sft")),
                preset: None,
                tokenizer: stages::tokenizer_dir(file),
                data: Some(stages::split_path(out, Split::Sft)),
                eval_data: Some(stages::split_path(out, Split::Eval)),
                eval_rows: file.eval.loss_rows,
                out: out.join("sft"),
                device: file.device.clone(),
                devices: file.devices.clone(),
                train: file.sft.clone(),
                ..SftFile::default()
            };
            let summary = crate::cmd_sft::run_sft(&sft, resume)?;
            merge_if_adapter(&start_model(file, "sft"), &out.join("sft"))?;
            Ok(serde_json::to_value(summary)?)
        }
        "grpo" => {
            let grpo = GrpoFile {
                model: Some(start_model(file, "grpo")),
                preset: None,
                tokenizer: stages::tokenizer_dir(file),
                data: Some(stages::split_path(out, Split::Grpo)),
                out: out.join("grpo"),
                device: file.device.clone(),
                devices: file.devices.clone(),
                train: file.grpo.clone(),
                ..GrpoFile::default()
            };
            let summary = crate::cmd_grpo::run_grpo(&grpo, resume, None)?;
            merge_if_adapter(&start_model(file, "grpo"), &out.join("grpo"))?;
            Ok(serde_json::to_value(summary)?)
        }
        "eval" => {
            let models = evaluated_models(file);
            let curves = file.order.training().map(|s| (s, out.join(s).join("metrics.jsonl")));
            eval_stage::run(file, &eval_stage::systems(&models), &curves)
        }
        other => bail!("unknown stage {other}"),
    }
}

/// After a LoRA stage, `stage_dir/final` is an adapter: the next stages read the full
/// model `stage_dir/merged` (base + adapter).
fn merge_if_adapter(base: &Path, stage_dir: &Path) -> Result<()> {
    let adapter = stage_dir.join("final");
    if adapter.join(thinkjson_model::lora::peft::ADAPTER_CONFIG_FILE).exists() {
        crate::train_common::write_merged(base, &adapter, &stage_dir.join("merged"), thinkjson_model::StorageDtype::Float32)?;
    }
    Ok(())
}

fn print_summary(file: &PipelineFile, outcomes: &[Outcome], secs: f64) {
    eprintln!("\n| stage | status | time | result |\n|---|---|---|---|");
    for o in outcomes {
        eprintln!("| {} | {} | {:.0} s | {} |", o.stage, o.status, o.secs, brief(o.stage, &o.summary));
    }
    if let Some(eval) = outcomes.iter().find(|o| o.stage == "eval") {
        if let Some(systems) = eval.summary.get("systems").and_then(Value::as_array) {
            eprintln!("\n| system | valid JSON | schema-valid | format-valid | mean match | closed by the decoder |\n|---|---|---|---|---|---|");
            for s in systems {
                let pct = |k: &str| s.get(k).and_then(Value::as_f64).map_or("-".into(), |x| format!("{:.1} %", 100.0 * x));
                let closed = s.get("closed_by_decoder").and_then(Value::as_u64).unwrap_or(0);
                let rows = s.get("rows").and_then(Value::as_u64).unwrap_or(0);
                let is_constrained = s.get("system").and_then(Value::as_str).is_some_and(|n| n.ends_with("constrained"));
                eprintln!(
                    "| {} | {} | {} | {} | {} | {} |",
                    s.get("system").and_then(Value::as_str).unwrap_or("?"),
                    pct("valid_json"),
                    pct("schema_valid"),
                    pct("format_valid"),
                    pct("mean_match"),
                    if is_constrained { format!("{closed} of {rows}") } else { "-".into() }
                );
            }
        }
    }
    eprintln!("\npipeline: {:.0} s; report: {}", secs, eval_stage::report_dir(&file.out).join("report.md").display());
}

/// One cell of the summary table.
fn brief(stage: &str, s: &Value) -> String {
    if s.is_null() {
        return "-".into();
    }
    let f = |k: &str| s.get(k).and_then(Value::as_f64);
    match stage {
        "synth" => format!("grpo {} / sft {} / eval {} rows", s["grpo"], s["sft"], s["eval"]),
        "tokenizer" => format!("vocab {}", s["vocab_size"]),
        "model" => format!("{}", s.get("parameters").or(s.get("dir")).cloned().unwrap_or(Value::Null)),
        "sft" => format!("{} steps, last loss {:.3}", s["last_step"], f("last_loss").unwrap_or(f64::NAN)),
        "grpo" => format!("{} steps, reward {:.3} → {:.3}", s["last_step"], f("first_reward").unwrap_or(f64::NAN), f("last_reward").unwrap_or(f64::NAN)),
        "eval" => format!("{}", s["report"]),
        _ => String::new(),
    }
}
