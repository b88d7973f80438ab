//! The training loop: micro-batches → completion-only loss → accumulated gradients → AdamW
//! step on the schedule; metrics, evaluations and checkpoints along the way.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ElementConversion;
use serde::{Deserialize, Serialize};
use thinkjson_decode::{Constraint, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_model::train::memory::token_pieces;
use thinkjson_model::train::{
    agreed_grad_norm, all_reduce_scalar, all_reduce_step, attach_lora, check_in_sync, save_if_due, seed_step, start_or_resume, AdamW, Collective, Control,
    RunFiles, Solo, StepTotals,
};
use thinkjson_model::{CausalLm, ModelError, Tokenizer};

use crate::batching::{plan_steps, MicroBatch, RowPlan, StepPlan};
use crate::config::SftConfig;
use crate::data::SftExample;
use crate::error::{Result, SftError};
use crate::loss::completion_loss;

/// Where and how a run keeps its checkpoints.
#[derive(Debug, Clone)]
pub struct SftRun {
    pub config: SftConfig,
    /// `step-NNNNNNNN` directories under this root; `config.keep_last` of them are kept.
    pub checkpoint_root: PathBuf,
    /// Files copied into every checkpoint (tokenizer.json, tokenizer_config.json) so each is a
    /// complete model directory.
    pub extra_files: Vec<PathBuf>,
    /// Continue from the newest checkpoint under `checkpoint_root`, if there is one.
    pub resume: bool,
}

impl SftRun {
    /// The files part of the run, for the shared trainer skeleton.
    pub fn files(&self) -> RunFiles {
        RunFiles::new(&self.checkpoint_root, self.config.keep_last, &self.extra_files, self.resume)
    }
}

/// Saved with every checkpoint: where the run is, and what it was planned from (a resume
/// with different data or batching would not replay the same steps, so it is refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u32,
    pub examples_seen: u64,
    pub tokens_seen: u64,
    pub plan: PlanFingerprint,
}

/// What determines the order of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanFingerprint {
    pub examples: usize,
    pub tokens: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub packing: bool,
    pub max_len: usize,
    pub epochs: u32,
    pub max_steps: Option<u64>,
}

impl PlanFingerprint {
    fn of(config: &SftConfig, examples: &[SftExample]) -> Self {
        Self {
            examples: examples.len(),
            tokens: examples.iter().map(SftExample::len).sum(),
            seed: config.seed,
            batch_size: config.batch_size,
            grad_accum: config.grad_accum,
            packing: config.packing,
            max_len: config.max_len,
            epochs: config.epochs,
            max_steps: config.max_steps,
        }
    }
}

/// Known before the first step.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub total_steps: u64,
    /// Steps already done (a resumed run starts after them).
    pub start_step: u64,
    pub resumed_from: Option<PathBuf>,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub warmup_steps: u64,
}

/// One optimiser step.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u32,
    /// Mean cross-entropy per completion token over the step.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub clip_scale: f64,
    /// Real input tokens of the step.
    pub tokens: usize,
    pub target_tokens: usize,
    pub tokens_per_sec: f64,
    pub examples_seen: u64,
    pub step_secs: f64,
    /// Of `step_secs`, the time in the peers' reductions (waiting for the slowest peer
    /// included); 0 with one peer.
    pub sync_secs: f64,
    /// Data-parallel peers that shared the step (1: a single-device run).
    pub peers: usize,
}

/// One evaluation on the held-out examples.
#[derive(Debug, Clone, Serialize)]
pub struct EvalMetrics {
    pub step: u64,
    pub eval_loss: f64,
    pub eval_examples: usize,
    pub generations: usize,
    /// Share of greedy generations whose answer parses as JSON.
    pub valid_json_rate: Option<f64>,
    /// Share with exactly one `<think>` block followed by one `<answer>` block.
    pub format_rate: Option<f64>,
    pub secs: f64,
}

/// Receives progress; the CLI turns it into a progress bar and a metrics file.
pub trait Observer {
    fn on_start(&mut self, _info: &RunInfo) {}
    fn on_step(&mut self, _metrics: &StepMetrics) -> Control {
        Control::Continue
    }
    fn on_eval(&mut self, _metrics: &EvalMetrics) {}
    fn on_checkpoint(&mut self, _step: u64, _dir: &Path) {}
}

impl Observer for () {}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub info: RunInfo,
    pub last_step: u64,
    pub stopped_early: bool,
    pub losses: Vec<f64>,
    pub last_checkpoint: Option<PathBuf>,
    pub final_eval: Option<EvalMetrics>,
}

/// Trains `model` on `train`, evaluating on `eval`. With `run.resume` and a checkpoint
/// under `run.checkpoint_root`, the weights, optimiser state and data position come from
/// it and the run continues where it stopped.
pub fn train<B: AutodiffBackend>(
    model: CausalLm<B>,
    tokenizer: &Tokenizer,
    train: &[SftExample],
    eval: &[SftExample],
    run: &SftRun,
    observer: &mut dyn Observer,
) -> Result<(CausalLm<B>, Summary)> {
    train_data_parallel(model, tokenizer, train, eval, run, observer, &mut Solo)
}

/// [`train`] as one peer of a data-parallel group: every peer calls it with the same model,
/// data and run, and each step's rows are dealt round-robin to the peers (row `i` of the
/// step to rank `i mod world`), so the config's `batch_size` stays the global batch. The
/// loss is normalised by the step's global target count and the gradients are summed before
/// the optimiser step, so N peers make the update one peer makes with the whole step (up to
/// float summation order). Rank 0 alone evaluates, reports to its observer and writes
/// checkpoints; the others should get `&mut ()`.
pub fn train_data_parallel<B: AutodiffBackend>(
    model: CausalLm<B>,
    tokenizer: &Tokenizer,
    train: &[SftExample],
    eval: &[SftExample],
    run: &SftRun,
    observer: &mut dyn Observer,
    collective: &mut dyn Collective<B::InnerBackend>,
) -> Result<(CausalLm<B>, Summary)> {
    let leader = collective.rank() == 0;
    let config = &run.config;
    config.validate()?;
    if train.is_empty() {
        return Err(SftError::Data("no training examples".into()));
    }
    let lengths: Vec<usize> = train.iter().map(SftExample::len).collect();
    let plan = plan_steps(config, &lengths);
    let total = plan.len() as u64;
    let settings = config.settings();
    let schedule = settings.schedule(total);
    let warmup_steps = schedule.warmup_steps;
    let fingerprint = PlanFingerprint::of(config, train);
    let model = attach_lora(model, settings.lora.as_ref(), settings.seed)?;
    let mut optimizer = AdamW::<B>::new(settings.optimizer);
    let (mut model, resumed) = start_or_resume(model, &mut optimizer, &run.files(), &fingerprint, |s: &TrainerState| &s.plan)?;
    let (mut state, resumed_from) = match resumed {
        Some(r) => (r.state, Some(r.dir)),
        None => (
            TrainerState { step: 0, total_steps: total, epoch: 0, examples_seen: 0, tokens_seen: 0, plan: fingerprint.clone() },
            None,
        ),
    };
    let info = RunInfo {
        total_steps: total,
        start_step: state.step,
        resumed_from,
        train_examples: train.len(),
        eval_examples: eval.len(),
        warmup_steps,
    };
    observer.on_start(&info);
    let pad_id = tokenizer.pad_id_for(model.config().vocab_size);
    let mut losses = Vec::new();
    let mut last_checkpoint = None;
    let mut final_eval = None;
    for (index, step_plan) in plan.iter().enumerate().skip(state.step as usize) {
        let started = Instant::now();
        let lr = schedule.lr(index as u64);
        seed_step::<B>(&model.device(), config.seed, index as u64);
        let StepOutcome { model: next, loss, report, tokens, targets, sync_secs } =
            train_step(model, &mut optimizer, train, step_plan, pad_id, lr, config, index as u64 + 1, collective)?;
        model = next;
        let step = index as u64 + 1;
        state.step = step;
        state.epoch = step_plan.epoch;
        state.examples_seen += step_plan.examples() as u64;
        state.tokens_seen += tokens as u64;
        losses.push(loss);
        let secs = started.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step,
            epoch: step_plan.epoch,
            loss,
            lr,
            grad_norm: report.grad_norm,
            clip_scale: report.clip_scale,
            tokens,
            target_tokens: targets,
            tokens_per_sec: tokens as f64 / secs.max(1e-9),
            examples_seen: state.examples_seen,
            step_secs: secs,
            sync_secs,
            peers: collective.world_size(),
        };
        let stop = leader && observer.on_step(&metrics) == Control::Stop;
        // Rank 0's observer decides for the group: no peer may wait for a step the others skip.
        let stop = all_reduce_scalar(f64::from(u8::from(stop)), &model.device(), collective)? > 0.0;
        if stop {
            return Ok((
                model,
                Summary {
                    info,
                    last_step: step,
                    stopped_early: true,
                    losses,
                    last_checkpoint,
                    final_eval,
                },
            ));
        }
        let last = step == total;
        if collective.world_size() > 1 && (last || step.is_multiple_of(SYNC_CHECK_EVERY)) {
            check_in_sync(&model, collective)?;
        }
        if !leader {
            continue;
        }
        if (last || (config.eval_every > 0 && step.is_multiple_of(config.eval_every))) && !eval.is_empty() {
            let m = evaluate(&model, tokenizer, eval, config, step)?;
            observer.on_eval(&m);
            final_eval = Some(m);
        }
        if let Some(dir) = save_if_due(&run.files(), step, config.save_every, last, &model, &optimizer, &state)? {
            observer.on_checkpoint(step, &dir);
            last_checkpoint = Some(dir);
        }
    }
    Ok((
        model,
        Summary {
            info,
            last_step: state.step,
            stopped_early: false,
            losses,
            last_checkpoint,
            final_eval,
        },
    ))
}

/// Steps between two comparisons of the peers' weights (and at the last step).
const SYNC_CHECK_EVERY: u64 = 10;

/// What one optimiser step hands back to the loop.
struct StepOutcome<B: AutodiffBackend> {
    model: CausalLm<B>,
    loss: f64,
    report: thinkjson_model::train::StepReport,
    tokens: usize,
    targets: usize,
    sync_secs: f64,
}

#[allow(clippy::too_many_arguments)]
fn train_step<B: AutodiffBackend>(
    model: CausalLm<B>,
    optimizer: &mut AdamW<B>,
    train: &[SftExample],
    plan: &StepPlan,
    pad_id: u32,
    lr: f64,
    config: &SftConfig,
    step: u64,
    collective: &mut dyn Collective<B::InnerBackend>,
) -> Result<StepOutcome<B>> {
    // This peer's rows of the step (all of them with one peer), each micro-batch in passes of
    // at most `budget` padded tokens. The loss is normalised by the step's global target
    // count, so the passes and the peers sum to the same update.
    let budget = config.settings().tokens_per_pass(model.config());
    let (rank, world) = (collective.rank(), collective.world_size());
    let device = model.device();
    let mut position = 0usize;
    let mut built: Result<Vec<MicroBatch>> = Ok(Vec::new());
    for rows in &plan.micro_batches {
        let mine: Vec<RowPlan> = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| (position + i) % world == rank)
            .map(|(_, row)| row.clone())
            .collect();
        position += rows.len();
        let widths: Vec<usize> = mine.iter().map(|row| row.iter().map(|&i| train[i].len().saturating_sub(1)).sum()).collect();
        for piece in token_pieces(&widths, budget) {
            if let Ok(batches) = built.as_mut() {
                match MicroBatch::build(train, &mine[piece], pad_id, config.packing) {
                    Ok(b) => batches.push(b),
                    Err(e) => built = Err(e),
                }
            }
        }
    }
    let local_targets = built.as_ref().map_or(0, |b| b.iter().map(|b| b.targets.len()).sum::<usize>());
    let synced = Instant::now();
    let targets = all_reduce_scalar(local_targets as f64, &device, collective)?.round() as usize;
    let mut sync_secs = synced.elapsed().as_secs_f64();
    let local = built.and_then(|batches| {
        let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
        let mut loss_total = 0.0;
        for batch in &batches {
            let loss = completion_loss(&model, batch, targets, config.logprob_chunk)?;
            let value = loss.clone().into_scalar().elem::<f64>();
            if !value.is_finite() {
                return Err(SftError::NonFinite { step, what: "loss", value });
            }
            loss_total += value;
            let grads = GradientsParams::from_grads(thinkjson_model::train::backward(loss), &model);
            accumulator.accumulate(&model, grads);
        }
        let tokens: usize = batches.iter().map(MicroBatch::input_tokens).sum();
        Ok((accumulator.grads(), StepTotals { loss: loss_total, tokens: tokens as f64 }))
    });
    let (grads, totals, failure) = match local {
        Ok((grads, totals)) => (grads, totals, None),
        Err(e) => (GradientsParams::new(), StepTotals::default(), Some(e)),
    };
    let synced = Instant::now();
    let reduced = all_reduce_step(&model, grads, totals, failure.is_some(), collective);
    sync_secs += synced.elapsed().as_secs_f64();
    if let Some(e) = failure {
        return Err(e);
    }
    let (grads, totals) = reduced?;
    let grad_norm = agreed_grad_norm(&model, &grads, collective)?;
    let (model, report) = optimizer.step_with_norm(lr, model, grads, grad_norm).map_err(|e| match e {
        ModelError::NonFinite(_) => SftError::NonFinite {
            step,
            what: "gradient norm",
            value: f64::NAN,
        },
        other => SftError::Model(other),
    })?;
    Ok(StepOutcome { model, loss: totals.loss, report, tokens: totals.tokens.round() as usize, targets, sync_secs })
}

/// Held-out loss (mean per completion token) and, for the first `eval_generations`
/// examples, the share of greedy generations with parseable JSON and the right layout.
pub fn evaluate<B: AutodiffBackend>(
    model: &CausalLm<B>,
    tokenizer: &Tokenizer,
    eval: &[SftExample],
    config: &SftConfig,
    step: u64,
) -> Result<EvalMetrics> {
    let started = Instant::now();
    let inner: CausalLm<B::InnerBackend> = model.valid();
    let (loss, _) = mean_loss(&inner, tokenizer.pad_id_for(inner.config().vocab_size), eval, config.batch_size, config.logprob_chunk)?;
    let n = config.eval_generations.min(eval.len());
    let (mut valid_json_rate, mut format_rate) = (None, None);
    if n > 0 {
        let generator = Generator::for_model(tokenizer, &inner)?;
        let requests: Vec<Request> = eval[..n]
            .iter()
            .map(|e| Request::new(e.prompt.clone(), Constraint::None))
            .collect();
        let gen_config = GenerateConfig {
            max_new_tokens: config.eval_max_new_tokens,
            sampling: SamplingConfig::greedy(),
            ..GenerateConfig::default()
        };
        let (completions, _) = generator.generate(&inner, &requests, &gen_config)?;
        let parsed: Vec<_> = completions.iter().map(|c| thinkjson_reward::parse::parse(&c.text)).collect();
        valid_json_rate = Some(parsed.iter().filter(|p| p.json.is_some()).count() as f64 / n as f64);
        format_rate = Some(parsed.iter().filter(|p| p.format_ok()).count() as f64 / n as f64);
    }
    Ok(EvalMetrics {
        step,
        eval_loss: loss,
        eval_examples: eval.len(),
        generations: n,
        valid_json_rate,
        format_rate,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Mean completion-token cross-entropy of `examples` (no gradients), and the token count.
pub fn mean_loss<B: Backend>(
    model: &CausalLm<B>,
    pad_id: u32,
    examples: &[SftExample],
    batch_size: usize,
    chunk: usize,
) -> Result<(f64, usize)> {
    let (mut sum, mut count) = (0.0, 0usize);
    let indices: Vec<Vec<usize>> = (0..examples.len()).map(|i| vec![i]).collect();
    for rows in indices.chunks(batch_size.max(1)) {
        let batch = MicroBatch::build(examples, rows, pad_id, false)?;
        // normaliser 1: the plain sum, divided once at the end.
        sum += completion_loss(model, &batch, 1, chunk)?.into_scalar().elem::<f64>();
        count += batch.targets.len();
    }
    Ok((sum / count.max(1) as f64, count))
}
