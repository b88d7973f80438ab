//! `cargo xtask grpo`: GRPO from a TOML config, with a progress bar, metrics and sample
//! JSONL files and checkpoints under the output directory; `--feedback` adds reviewers'
//! verdicts as a reward, `--export-samples` writes completions for them to review.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use thinkjson_grpo::{Control, GrpoConfig, GrpoPrompt, GrpoRun, Observer, Rollout, RunInfo, Sample, StepMetrics};
use thinkjson_model::burn::tensor::backend::AutodiffBackend;
use thinkjson_model::{DeviceSpec, LoraConfig, Tokenizer};
use thinkjson_reward::{FeedbackReward, Review, RewardSet};

use crate::train_common::LoraArgs;
use crate::backend::{dispatch_train_group, load_or_init, run_peers, tokenizer_dir, tokenizer_files, OnTrainBackend};
use thinkjson_model::train::Collective;
use crate::cmd_decode::chat_template;
use crate::cmd_sft::read_rows;
use crate::metrics_log::{step_bar, MetricsLog};

#[derive(Args)]
pub struct GrpoArgs {
    /// TOML file: top-level `model`/`preset`, `data`, `out`, … and a `[train]` table of
    /// hyper-parameters (with `[train.rewards]` weights). Unknown fields are errors.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model to train: an HF directory (e.g. the SFT stage's `final/`), a GGUF file, or an
    /// embedded name (smollm2-135m-instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Start from seeded random weights of a preset shape instead of --model.
    #[arg(long)]
    preset: Option<String>,
    /// Prompt rows (synth JSONL: text, schema, object).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory: metrics.jsonl, samples.jsonl, checkpoints/, final/.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the newest checkpoint in OUT/checkpoints.
    #[arg(long)]
    resume: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// Data-parallel over these devices, one peer each: `cpu,cpu` (threads of this process)
    /// or `cuda:0,cuda:1,…`. `prompts_per_step` stays the whole batch; its prompt groups are
    /// dealt to the peers. Overrides --device.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<DeviceSpec>,
    /// Reviewers' verdicts (JSONL, the `reward` crate's review format) added as the `feedback` reward.
    #[arg(long)]
    feedback: Option<PathBuf>,
    /// Write one completion per prompt and step, in the review format, for reviewers.
    #[arg(long)]
    export_samples: Option<PathBuf>,
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long)]
    lr: Option<f64>,
    /// G: completions per prompt.
    #[arg(long)]
    num_generations: Option<usize>,
    #[arg(long)]
    prompts_per_step: Option<usize>,
    #[arg(long)]
    max_completion_len: Option<usize>,
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
pub struct GrpoFile {
    pub model: Option<PathBuf>,
    pub preset: Option<String>,
    pub init_seed: u64,
    /// A PEFT LoRA adapter on `model` to start from (and train).
    pub adapter: Option<PathBuf>,
    /// LoRA instead of full fine-tuning (also accepted as `[train.lora]`).
    pub lora: Option<LoraConfig>,
    /// Tokenizer directory when the model has none (presets).
    pub tokenizer: PathBuf,
    pub data: Option<PathBuf>,
    /// At most this many prompt rows are used (0: all).
    pub max_prompts: usize,
    pub feedback: Option<PathBuf>,
    pub out: PathBuf,
    pub device: String,
    /// Data-parallel peers, one per device (`["cpu", "cpu"]`, `["cuda:0", "cuda:1"]`);
    /// empty: `device` alone.
    pub devices: Vec<String>,
    pub train: GrpoConfig,
}

impl Default for GrpoFile {
    fn default() -> Self {
        Self {
            model: None,
            preset: None,
            init_seed: 0,
            adapter: None,
            lora: None,
            tokenizer: PathBuf::from("assets/qwen"),
            data: None,
            max_prompts: 0,
            feedback: None,
            out: PathBuf::from("runs/grpo"),
            device: "cpu".into(),
            devices: Vec::new(),
            train: GrpoConfig::default(),
        }
    }
}

impl GrpoFile {
    pub fn read(path: &Path) -> Result<Self> {
        crate::train_common::read_config(path)
    }

    fn apply(&mut self, a: &GrpoArgs) {
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
        set!(self.feedback, a.feedback.clone().map(Some));
        set!(self.out, a.out);
        set!(t.max_steps, a.max_steps);
        set!(t.lr, a.lr);
        set!(t.num_generations, a.num_generations);
        set!(t.prompts_per_step, a.prompts_per_step);
        set!(t.max_completion_len, a.max_completion_len);
        set!(t.seed, a.seed);
        if let Some(d) = a.device {
            self.device = d.to_string();
            self.devices.clear();
        }
        if !a.devices.is_empty() {
            self.devices = a.devices.iter().map(ToString::to_string).collect();
        }
    }
}

pub fn grpo(args: GrpoArgs) -> Result<()> {
    let mut file = match &args.config {
        Some(p) => GrpoFile::read(p)?,
        None => GrpoFile::default(),
    };
    file.apply(&args);
    let summary = run_grpo(&file, args.resume, args.export_samples.as_deref())?;
    if args.json {
        crate::print_out(&serde_json::to_string_pretty(&summary)?)?;
    } else {
        eprintln!(
            "grpo: {} steps, reward {:.3} → {:.3}, final {} in {}",
            summary.last_step,
            summary.first_reward.unwrap_or(f64::NAN),
            summary.last_reward.unwrap_or(f64::NAN),
            crate::train_common::final_kind(&summary.final_model),
            summary.final_model.display()
        );
    }
    Ok(())
}

/// Runs the GRPO stage `file` describes (also the pipeline's GRPO stage).
pub fn run_grpo(file: &GrpoFile, resume: bool, export_samples: Option<&Path>) -> Result<RunSummary> {
    let mut file = file.clone();
    crate::train_common::resolve_lora(&file.lora, &mut file.train.lora)?;
    let file = &file;
    file.train.validate()?;
    let devices = crate::backend::device_group(&file.device, &file.devices)?;
    let Some(data) = file.data.clone() else {
        bail!("no prompts: set `data` in the config or pass --data FILE.jsonl");
    };
    if let Some(arg) = &file.model {
        // Fails early, before prompts are encoded, on a model that cannot be opened.
        crate::model_ref::open(arg)?.config()?;
    }
    std::fs::create_dir_all(&file.out).with_context(|| format!("creating {}", file.out.display()))?;
    let tok_dir = tokenizer_dir(file.model.as_deref(), &file.tokenizer, &file.out)?;
    let tokenizer = Tokenizer::from_path(&tok_dir).with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
    let template = chat_template(&tok_dir)?;
    let mut rows = read_rows(&data)?;
    if file.max_prompts > 0 {
        rows.truncate(file.max_prompts);
    }
    let (prompts, dropped) = thinkjson_grpo::encode_prompts(&tokenizer, &template, &rows, file.train.max_prompt_len)?;
    eprintln!("grpo: {} prompts, {} dropped", prompts.len(), dropped.len());
    for (id, why) in dropped.iter().take(5) {
        eprintln!("  dropped {id}: {why}");
    }
    let mut rewards = RewardSet::from_weights(&file.train.rewards);
    if let Some(path) = &file.feedback {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let (feedback, bad) = FeedbackReward::from_jsonl(&text);
        for (line, why) in bad.iter().take(10) {
            eprintln!("{}:{line}: skipped: {why}", path.display());
        }
        eprintln!("feedback: {} reviews (weight {})", feedback.len(), file.train.rewards.feedback);
        if feedback.is_empty() {
            bail!("{}: no usable reviews", path.display());
        }
        rewards = rewards.with(Box::new(feedback), file.train.rewards.feedback);
    }
    std::fs::create_dir_all(&file.out).with_context(|| format!("creating {}", file.out.display()))?;
    std::fs::write(file.out.join("grpo-config.toml"), toml::to_string(&file).context("writing the resolved config")?)
        .with_context(|| format!("writing {}", file.out.join("grpo-config.toml").display()))?;
    let export = match export_samples {
        Some(p) => Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => None,
    };
    let job = GrpoJob {
        run: GrpoRun {
            config: file.train.clone(),
            checkpoint_root: file.out.join("checkpoints"),
            extra_files: tokenizer_files(&tok_dir),
            resume,
        },
        file: file.clone(),
        tokenizer,
        prompts,
        rewards,
        export: std::sync::Mutex::new(export),
    };
    dispatch_train_group(&devices, job)
}

#[derive(Debug, Serialize)]
pub struct RunSummary {
    pub last_step: u64,
    pub total_steps: u64,
    pub start_step: u64,
    pub first_reward: Option<f64>,
    pub last_reward: Option<f64>,
    pub final_model: PathBuf,
    pub metrics: PathBuf,
}

struct GrpoJob {
    file: GrpoFile,
    tokenizer: Tokenizer,
    prompts: Vec<GrpoPrompt>,
    rewards: RewardSet,
    run: GrpoRun,
    /// Taken by rank 0's observer.
    export: std::sync::Mutex<Option<std::fs::File>>,
}

impl OnTrainBackend for GrpoJob {
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
            let mut observer = (rank == 0).then(|| CliObserver {
                metrics: MetricsLog::new(&metrics_path),
                samples: MetricsLog::new(&f.out.join("samples.jsonl")),
                export: self.export.lock().ok().and_then(|mut e| e.take()),
                bar: ProgressBar::hidden(),
            });
            let observing: &mut dyn Observer = match observer.as_mut() {
                Some(o) => o,
                None => &mut (),
            };
            let (model, summary) = thinkjson_grpo::train_data_parallel(model, &self.tokenizer, &self.prompts, &self.rewards, &self.run, observing, collective)
                .with_context(|| format!("grpo peer {rank} of {}", collective.world_size()))?;
            if let Some(observer) = observer {
                observer.bar.finish_and_clear();
                crate::train_common::save_final(&model, &final_dir, &self.run.extra_files, f.model.as_deref())?;
            }
            Ok(RunSummary {
                last_step: summary.last_step,
                total_steps: summary.info.total_steps,
                start_step: summary.info.start_step,
                first_reward: summary.reward_means.first().copied(),
                last_reward: summary.reward_means.last().copied(),
                final_model: final_dir.clone(),
                metrics: metrics_path.clone(),
            })
        };
        run_peers::<B, _, _>("grpo", &devices, peer)
    }
}

/// Progress bar on stderr; metrics.jsonl (one line per step), samples.jsonl (logged
/// completions) and, with --export-samples, review lines.
struct CliObserver {
    metrics: MetricsLog,
    samples: MetricsLog,
    export: Option<std::fs::File>,
    bar: ProgressBar,
}

impl Observer for CliObserver {
    fn on_start(&mut self, info: &RunInfo) {
        self.metrics.open(info.start_step);
        self.samples.open(info.start_step);
        if let Some(dir) = &info.resumed_from {
            eprintln!("resuming from {} (step {})", dir.display(), info.start_step);
        }
        eprintln!(
            "grpo: {} steps × {} completions, rewards: {}",
            info.total_steps,
            info.completions_per_step,
            info.reward_functions.join(", ")
        );
        self.bar = step_bar("grpo", info.total_steps, info.start_step);
    }

    fn on_rollout(&mut self, step: u64, prompts: &[&GrpoPrompt], rollout: &Rollout) {
        let Some(f) = &mut self.export else { return };
        let g = rollout.completions.len() / prompts.len().max(1);
        for s in rollout.completions.iter().step_by(g.max(1)) {
            let review = Review {
                id: prompts[s.prompt_index].id.clone(),
                output: thinkjson_reward::parse(&s.completion.text).json.unwrap_or(serde_json::Value::Null),
                verdict: None,
                corrected: None,
                fields: Default::default(),
                completion: Some(s.completion.text.clone()),
                reward: Some(s.reward),
                step: Some(step),
            };
            let line = serde_json::to_string(&review).unwrap_or_default();
            if let Err(e) = writeln!(f, "{line}") {
                self.bar.suspend(|| eprintln!("warning: cannot write exported samples: {e}"));
            }
        }
    }

    fn on_step(&mut self, m: &StepMetrics) -> Control {
        self.bar.set_position(m.step);
        self.bar.set_message(format!(
            "reward {:.3} · valid JSON {:.0}% · zero-std {:.0}% · {:.1}s (gen {:.0}%)",
            m.reward_mean,
            m.valid_json_rate * 100.0,
            m.frac_zero_std * 100.0,
            m.time.total,
            100.0 * m.time.generation / m.time.total.max(1e-9)
        ));
        self.metrics.write(&serde_json::to_value(m).unwrap_or_default(), &self.bar);
        Control::Continue
    }

    fn on_samples(&mut self, samples: &[Sample]) {
        for s in samples {
            self.samples.write(&serde_json::to_value(s).unwrap_or_default(), &self.bar);
        }
    }

    fn on_checkpoint(&mut self, step: u64, dir: &Path) {
        self.bar.suspend(|| eprintln!("checkpoint @ {step}: {}", dir.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinkjson_grpo::LossType;

    #[test]
    fn config_file_defaults_match_the_issue_and_unknown_fields_are_rejected() {
        let ok: GrpoFile = toml::from_str("data = \"p.jsonl\"\n[train]\nmax_steps = 3\n").unwrap();
        let t = &ok.train;
        assert_eq!((t.num_generations, t.epsilon_low, t.epsilon_high, t.beta, t.num_iterations), (8, 0.2, 0.2, 0.0, 1));
        assert_eq!((t.loss_type, t.lr, t.max_steps), (LossType::Dapo, 1e-6, 3));
        for (text, field) in [
            ("modle = \"x\"\n", "modle"),
            ("[train]\nepsilon = 0.2\n", "epsilon"),
            ("[train.rewards]\nschema_valid = 1.0\n", "schema_valid"),
            ("[train.optimizer]\nbeta3 = 1.0\n", "beta3"),
        ] {
            let err = toml::from_str::<GrpoFile>(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
        let bad = toml::from_str::<GrpoFile>("[train]\nloss_type = \"ppo\"\n").unwrap_err().to_string();
        assert!(bad.contains("ppo"), "{bad}");
    }

    #[test]
    fn committed_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/grpo-tiny.toml");
        let file = GrpoFile::read(&path).unwrap();
        file.train.validate().unwrap();
        assert_eq!(file.preset.as_deref(), Some("tiny"));
    }
}
