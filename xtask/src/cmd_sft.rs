//! `cargo xtask sft`: supervised fine-tuning from a TOML config, with a progress bar, a
//! metrics JSONL and checkpoints under the output directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use thinkjson_model::burn::tensor::backend::AutodiffBackend;
use thinkjson_model::train::Collective;
use thinkjson_model::{DeviceSpec, LoraConfig, Tokenizer};
use thinkjson_sft::{Control, Encoder, EvalMetrics, Observer, RunInfo, SftConfig, SftExample, SftRun, StepMetrics};
use thinkjson_synth::Row;

use crate::train_common::LoraArgs;
use crate::backend::{dispatch_train_group, load_or_init, run_peers, tokenizer_dir, tokenizer_files, OnTrainBackend};
use crate::cmd_decode::chat_template;
use crate::metrics_log::MetricsLog;

#[derive(Args)]
pub struct SftArgs {
    /// TOML file: top-level `model`/`preset`, `data`, `eval_data`, `out`, … and a `[train]`
    /// table of hyper-parameters. Every field has a default; unknown fields are errors.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model to fine-tune: an HF directory, a GGUF file, or an embedded name (smollm2-135m-instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Start from seeded random weights of a preset shape instead of --model.
    #[arg(long)]
    preset: Option<String>,
    /// Training rows (synth JSONL: text, schema, object, reasoning).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out rows for the evaluation.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Output directory: metrics.jsonl, checkpoints/, final/.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the newest checkpoint in OUT/checkpoints.
    #[arg(long)]
    resume: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// Data-parallel over these devices, one peer each: `cpu,cpu` (threads of this process)
    /// or `cuda:0,cuda:1,…`. `batch_size` stays the global batch; each step's rows are dealt
    /// to the peers. Overrides --device.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<DeviceSpec>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    epochs: Option<u32>,
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    max_len: Option<usize>,
    /// Pack several examples per row.
    #[arg(long)]
    packing: bool,
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    lora: LoraArgs,
    /// Print the run summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// The TOML file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftFile {
    pub model: Option<PathBuf>,
    pub preset: Option<String>,
    /// Seed of the random weights when starting from a preset.
    pub init_seed: u64,
    /// A PEFT LoRA adapter on `model` to start from (and train).
    pub adapter: Option<PathBuf>,
    /// LoRA instead of full fine-tuning (also accepted as `[train.lora]`).
    pub lora: Option<LoraConfig>,
    /// Tokenizer directory when the model has none (presets): tokenizer.json + tokenizer_config.json.
    pub tokenizer: PathBuf,
    pub data: Option<PathBuf>,
    pub eval_data: Option<PathBuf>,
    /// At most this many held-out rows are used.
    pub eval_rows: usize,
    pub out: PathBuf,
    pub device: String,
    /// Data-parallel peers, one per device (`["cpu", "cpu"]`, `["cuda:0", "cuda:1"]`);
    /// empty: `device` alone.
    pub devices: Vec<String>,
    pub train: SftConfig,
}

impl Default for SftFile {
    fn default() -> Self {
        Self {
            model: None,
            preset: None,
            init_seed: 0,
            adapter: None,
            lora: None,
            tokenizer: PathBuf::from("assets/qwen"),
            data: None,
            eval_data: None,
            eval_rows: 64,
            out: PathBuf::from("runs/sft"),
            device: "cpu".into(),
            devices: Vec::new(),
            train: SftConfig::default(),
        }
    }
}

impl SftFile {
    pub fn read(path: &Path) -> Result<Self> {
        crate::train_common::read_config(path)
    }

    fn apply(&mut self, a: &SftArgs) {
        let t = &mut self.train;
        macro_rules! set {
            ($dst:expr, $src:expr) => {
                if let Some(v) = $src.clone() {
                    $dst = v;
                }
            };
        }
        if a.model.is_some() {
            self.model = a.model.clone();
            self.preset = None;
        }
        a.lora.apply(&mut self.lora, &mut self.adapter);
        if a.preset.is_some() {
            self.preset = a.preset.clone();
            self.model = None;
        }
        set!(self.data, a.data.clone().map(Some));
        set!(self.eval_data, a.eval_data.clone().map(Some));
        set!(self.out, a.out);
        set!(t.lr, a.lr);
        set!(t.epochs, a.epochs);
        set!(t.max_steps, a.max_steps.map(Some));
        set!(t.batch_size, a.batch_size);
        set!(t.grad_accum, a.grad_accum);
        set!(t.max_len, a.max_len);
        set!(t.seed, a.seed);
        if a.packing {
            t.packing = true;
        }
        if let Some(d) = a.device {
            self.device = d.to_string();
            self.devices.clear();
        }
        if !a.devices.is_empty() {
            self.devices = a.devices.iter().map(ToString::to_string).collect();
        }
    }
}

pub fn sft(args: SftArgs) -> Result<()> {
    let mut file = match &args.config {
        Some(p) => SftFile::read(p)?,
        None => SftFile::default(),
    };
    file.apply(&args);
    let summary = run_sft(&file, args.resume)?;
    if args.json {
        crate::print_out(&serde_json::to_string_pretty(&summary)?)?;
    } else {
        eprintln!(
            "sft: {} steps, last loss {:.4}, final {} in {}",
            summary.last_step,
            summary.last_loss.unwrap_or(f64::NAN),
            crate::train_common::final_kind(&summary.final_model),
            summary.final_model.display()
        );
    }
    Ok(())
}

/// Runs the SFT stage `file` describes (also the pipeline's SFT stage).
pub fn run_sft(file: &SftFile, resume: bool) -> Result<RunSummary> {
    let mut file = file.clone();
    crate::train_common::resolve_lora(&file.lora, &mut file.train.lora)?;
    let file = &file;
    file.train.validate()?;
    let devices = crate::backend::device_group(&file.device, &file.devices)?;
    let Some(data) = file.data.clone() else {
        bail!("no training data: set `data` in the config or pass --data FILE.jsonl");
    };
    std::fs::create_dir_all(&file.out).with_context(|| format!("creating {}", file.out.display()))?;
    let tok_dir = tokenizer_dir(file.model.as_deref(), &file.tokenizer, &file.out)?;
    let tokenizer = Tokenizer::from_path(&tok_dir).with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
    let template = chat_template(&tok_dir)?;
    let encoder = Encoder::new(&tokenizer, &template, file.train.max_len)?;
    let (train, report) = encoder.encode_rows(&read_rows(&data)?)?;
    eprintln!(
        "train: {} examples ({} prompt + {} completion tokens), {} completions cut at max_len {}, {} dropped",
        report.examples, report.prompt_tokens, report.completion_tokens, report.truncated, file.train.max_len, report.dropped.len()
    );
    for (id, why) in report.dropped.iter().take(5) {
        eprintln!("  dropped {id}: {why}");
    }
    let eval = match &file.eval_data {
        Some(p) => {
            let mut rows = read_rows(p)?;
            rows.truncate(file.eval_rows);
            encoder.encode_rows(&rows)?.0
        }
        None => Vec::new(),
    };
    std::fs::create_dir_all(&file.out).with_context(|| format!("creating {}", file.out.display()))?;
    let resolved = toml::to_string(&file).context("writing the resolved config")?;
    std::fs::write(file.out.join("sft-config.toml"), resolved).context("writing sft-config.toml")?;
    let extra_files = tokenizer_files(&tok_dir);
    let job = SftJob {
        file: file.clone(),
        tokenizer,
        train,
        eval,
        run: SftRun {
            config: file.train.clone(),
            checkpoint_root: file.out.join("checkpoints"),
            extra_files: extra_files.clone(),
            resume,
        },
    };
    dispatch_train_group(&devices, job)
}

/// Synth JSONL rows; malformed lines are reported and skipped.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (rows, bad) = thinkjson_eval::parse_jsonl::<Row>(&text);
    for s in bad.iter().take(10) {
        eprintln!("{}:{}: skipped: {}", path.display(), s.line, s.reason);
    }
    if bad.len() > 10 {
        eprintln!("{}: {} more malformed lines skipped", path.display(), bad.len() - 10);
    }
    if rows.is_empty() {
        bail!("{}: no usable rows", path.display());
    }
    Ok(rows)
}

#[derive(Debug, Serialize)]
pub struct RunSummary {
    pub last_step: u64,
    pub total_steps: u64,
    pub start_step: u64,
    pub last_loss: Option<f64>,
    pub final_eval: Option<EvalMetrics>,
    pub final_model: PathBuf,
    pub metrics: PathBuf,
}

struct SftJob {
    file: SftFile,
    tokenizer: Tokenizer,
    train: Vec<SftExample>,
    eval: Vec<SftExample>,
    run: SftRun,
}

impl OnTrainBackend for SftJob {
    type Output = RunSummary;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<RunSummary> {
        self.run_group::<B>(vec![device])
    }

    fn run_group<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<RunSummary> {
        let metrics_path = self.file.out.join("metrics.jsonl");
        let final_dir = self.file.out.join("final");
        let peer = |rank: usize, device: &B::Device, collective: &mut dyn Collective<B::InnerBackend>| -> Result<RunSummary> {
            let f = &self.file;
            let model = load_or_init::<B>(f.model.as_deref(), f.adapter.as_deref(), f.preset.as_deref(), f.init_seed, &self.tokenizer, device)?;
            // Rank 0 reports, writes checkpoints and the final model; the others only train.
            let mut observer = if rank == 0 { Some(CliObserver::new(&metrics_path)?) } else { None };
            let observing: &mut dyn Observer = match observer.as_mut() {
                Some(o) => o,
                None => &mut (),
            };
            let (model, summary) = thinkjson_sft::train_data_parallel(model, &self.tokenizer, &self.train, &self.eval, &self.run, observing, collective)
                .with_context(|| format!("sft peer {rank} of {}", collective.world_size()))?;
            if let Some(observer) = observer {
                observer.finish();
                crate::train_common::save_final(&model, &final_dir, &self.run.extra_files, f.model.as_deref())?;
            }
            Ok(RunSummary {
                last_step: summary.last_step,
                total_steps: summary.info.total_steps,
                start_step: summary.info.start_step,
                last_loss: summary.losses.last().copied(),
                final_eval: summary.final_eval,
                final_model: final_dir.clone(),
                metrics: metrics_path.clone(),
            })
        };
        run_peers::<B, _, _>("sft", &devices, peer)
    }
}

/// Progress bar on stderr and one JSON line per step / evaluation in metrics.jsonl.
struct CliObserver {
    log: MetricsLog,
    bar: ProgressBar,
}

impl CliObserver {
    fn new(path: &Path) -> Result<Self> {
        Ok(Self { log: MetricsLog::new(path), bar: ProgressBar::hidden() })
    }

    fn write(&mut self, value: serde_json::Value) {
        self.log.write(&value, &self.bar);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Observer for CliObserver {
    fn on_start(&mut self, info: &RunInfo) {
        self.log.open(info.start_step);
        if let Some(dir) = &info.resumed_from {
            eprintln!("resuming from {} (step {})", dir.display(), info.start_step);
        }
        self.bar = crate::metrics_log::step_bar("sft", info.total_steps, info.start_step);
    }

    fn on_step(&mut self, m: &StepMetrics) -> Control {
        self.bar.set_position(m.step);
        self.bar.set_message(format!("loss {:.4} · lr {:.2e} · {:.0} tok/s", m.loss, m.lr, m.tokens_per_sec));
        let mut v = serde_json::to_value(m).unwrap_or_default();
        v["kind"] = "step".into();
        self.write(v);
        Control::Continue
    }

    fn on_eval(&mut self, m: &EvalMetrics) {
        let rate = m.valid_json_rate.map_or("-".to_string(), |r| format!("{:.0}%", r * 100.0));
        let line = format!("eval @ {}: loss {:.4}, valid JSON {rate} of {}", m.step, m.eval_loss, m.generations);
        self.bar.suspend(|| eprintln!("{line}"));
        let mut v = serde_json::to_value(m).unwrap_or_default();
        v["kind"] = "eval".into();
        self.write(v);
    }

    fn on_checkpoint(&mut self, step: u64, dir: &Path) {
        self.bar.suspend(|| eprintln!("checkpoint @ {step}: {}", dir.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_rejects_unknown_fields_and_defaults_the_rest() {
        let ok: SftFile = toml::from_str("data = \"d.jsonl\"\n[train]\nlr = 0.001\n").unwrap();
        assert_eq!(ok.train.lr, 1e-3);
        assert_eq!(ok.train.batch_size, SftConfig::default().batch_size);
        let top = toml::from_str::<SftFile>("dta = \"d.jsonl\"\n").unwrap_err().to_string();
        assert!(top.contains("dta"), "{top}");
        let nested = toml::from_str::<SftFile>("[train]\nlearning_rate = 1.0\n").unwrap_err().to_string();
        assert!(nested.contains("learning_rate"), "{nested}");
        let opt = toml::from_str::<SftFile>("[train.optimizer]\nbeta3 = 1.0\n").unwrap_err().to_string();
        assert!(opt.contains("beta3"), "{opt}");
    }

    #[test]
    fn committed_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/sft-tiny.toml");
        let file = SftFile::read(&path).unwrap();
        file.train.validate().unwrap();
        assert_eq!(file.preset.as_deref(), Some("tiny"));
        assert_eq!(file.train.max_steps, Some(200));
    }

    #[test]
    fn committed_lora_config_reads_its_lora_table() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/sft-smollm2-lora.toml");
        let mut file = SftFile::read(&path).unwrap();
        crate::train_common::resolve_lora(&file.lora, &mut file.train.lora).unwrap();
        file.train.validate().unwrap();
        let lora = file.train.lora.expect("[lora]");
        assert_eq!((lora.r, lora.alpha), (16, 32.0));
        assert_eq!(lora.targets().unwrap().len(), 7);
        // `[lora]` and `[train.lora]` together are refused, not merged silently.
        let mut both: SftFile = toml::from_str("[lora]\nr = 4\n[train.lora]\nr = 8\n").unwrap();
        let err = crate::train_common::resolve_lora(&both.lora, &mut both.train.lora).unwrap_err().to_string();
        assert!(err.contains("set twice"), "{err}");
        // Unknown LoRA keys are errors naming the key.
        let bad = toml::from_str::<SftFile>("[lora]\nrank = 4\n").unwrap_err().to_string();
        assert!(bad.contains("rank"), "{bad}");
    }
}
