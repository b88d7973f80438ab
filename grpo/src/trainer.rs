//! The GRPO loop: generation batch → rewards → group advantages → μ clipped-surrogate
//! updates → metrics and checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use burn::tensor::ElementConversion;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use thinkjson_decode::Generator;
pub use thinkjson_model::train::Control;
use thinkjson_model::train::{
    agreed_grad_norm, all_reduce_scalar, all_reduce_step, attach_lora, check_in_sync, save_if_due, seed_step, start_or_resume, AdamW, Collective, RunFiles, Solo,
    StepTotals,
};
use thinkjson_model::{CausalLm, CheckpointedScores, ModelError, Tokenizer};
use thinkjson_reward::{RewardSet, ValidatorCache};

use crate::config::GrpoConfig;
use crate::data::GrpoPrompt;
use crate::error::{GrpoError, Result};
use crate::loss::{policy_loss, token_weights, Surrogate, TokenInputs, TokenStats};
use crate::rollout::{constraint_for, sample_and_score_at, MicroBatch, Rollout};
use crate::shard::{positions_of_rank, share, BatchView};

/// Where and how a run keeps its checkpoints.
#[derive(Debug, Clone)]
pub struct GrpoRun {
    pub config: GrpoConfig,
    /// `step-NNNNNNNN` directories under this root.
    pub checkpoint_root: PathBuf,
    /// Files copied into every checkpoint (tokenizer files) so each is a complete model directory.
    pub extra_files: Vec<PathBuf>,
    /// Continue from the newest checkpoint under `checkpoint_root`, if there is one.
    pub resume: bool,
}

impl GrpoRun {
    /// The files part of the run, for the shared trainer skeleton.
    pub fn files(&self) -> RunFiles {
        RunFiles::new(&self.checkpoint_root, self.config.keep_last, &self.extra_files, self.resume)
    }
}

/// Saved with every checkpoint. Every random draw (prompt order, sampled tokens) is derived
/// from `plan.seed` and the step, so the step is the whole RNG and data position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoState {
    pub step: u64,
    pub updates: u64,
    pub total_steps: u64,
    pub plan: PlanFingerprint,
}

/// What determines the order of training; a resume with a different one is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanFingerprint {
    pub prompts: usize,
    pub prompt_tokens: usize,
    pub seed: u64,
    pub prompts_per_step: usize,
    pub num_generations: usize,
    pub num_iterations: usize,
    pub max_steps: u64,
}

impl PlanFingerprint {
    fn of(config: &GrpoConfig, prompts: &[GrpoPrompt]) -> Self {
        Self {
            prompts: prompts.len(),
            prompt_tokens: prompts.iter().map(|p| p.prompt.len()).sum(),
            seed: config.seed,
            prompts_per_step: config.prompts_per_step,
            num_generations: config.num_generations,
            num_iterations: config.num_iterations,
            max_steps: config.max_steps,
        }
    }
}

/// Known before the first step.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub total_steps: u64,
    pub start_step: u64,
    pub resumed_from: Option<PathBuf>,
    pub prompts: usize,
    pub completions_per_step: usize,
    pub reward_functions: Vec<String>,
}

/// Mean and std of one quantity over a generation batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
}

impl MeanStd {
    fn of(xs: &[f64]) -> Self {
        let n = xs.len().max(1) as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Self { mean, std: var.sqrt() }
    }
}

/// Seconds per phase of a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TimeSplit {
    pub generation: f64,
    pub reward: f64,
    /// Forward passes that score tokens: the policy's (graph built) and the reference's.
    pub logprobs: f64,
    pub backward: f64,
    /// AdamW updates.
    pub optimizer: f64,
    /// Data-parallel reductions: shared rollouts and summed gradients, waiting for the
    /// slowest peer included (0 with one peer).
    pub sync: f64,
    pub total: f64,
}

/// One generation batch and its updates.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Optimiser updates so far.
    pub updates: u64,
    pub lr: f64,
    /// Summed surrogate loss of the step's last update.
    pub loss: f64,
    pub grad_norm: f64,
    pub clip_scale: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Per reward function (unweighted scores).
    pub rewards: BTreeMap<String, MeanStd>,
    /// Groups whose completions all scored the same: no learning signal.
    pub frac_zero_std: f64,
    /// Mean k3 KL to the reference over the active tokens (0 when β = 0: not computed).
    pub kl: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    /// Largest |ratio − 1| seen over the step's updates.
    pub max_ratio_dev: f64,
    /// Mean per-token entropy of the policy at the first update.
    pub entropy: f64,
    pub completion_len_mean: f64,
    pub completion_len_max: usize,
    pub truncated_share: f64,
    pub valid_json_rate: f64,
    pub schema_valid_rate: f64,
    /// Tokens that carried loss.
    pub active_tokens: usize,
    /// Updates skipped because no completion carried signal (all advantages 0, β = 0).
    pub skipped_updates: usize,
    pub time: TimeSplit,
}

/// A logged completion.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub step: u64,
    pub prompt_id: String,
    pub completion: String,
    pub reward: f64,
    pub advantage: f64,
    pub parts: BTreeMap<String, f64>,
}

/// Receives progress; the CLI turns it into a progress bar and JSONL files.
pub trait Observer {
    fn on_start(&mut self, _info: &RunInfo) {}
    /// Every completion of the step, after scoring (for `--export-samples`).
    fn on_rollout(&mut self, _step: u64, _prompts: &[&GrpoPrompt], _rollout: &Rollout) {}
    fn on_step(&mut self, _metrics: &StepMetrics) -> Control {
        Control::Continue
    }
    fn on_samples(&mut self, _samples: &[Sample]) {}
    fn on_checkpoint(&mut self, _step: u64, _dir: &Path) {}
}

impl Observer for () {}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub info: RunInfo,
    pub last_step: u64,
    pub stopped_early: bool,
    pub reward_means: Vec<f64>,
    pub last_checkpoint: Option<PathBuf>,
}

/// The prompts of generation batch `step`: consecutive positions in a sequence of seeded
/// per-epoch shuffles.
pub fn prompts_of_step(n: usize, config: &GrpoConfig, step: u64) -> Vec<usize> {
    let per = config.prompts_per_step;
    let start = step as usize * per;
    let mut out = Vec::with_capacity(per);
    let mut cached: Option<(usize, Vec<usize>)> = None;
    for pos in start..start + per {
        let epoch = pos / n;
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            order.shuffle(&mut rng);
            cached = Some((epoch, order));
        }
        if let Some((_, order)) = &cached {
            out.push(order[pos % n]);
        }
    }
    out
}

/// Trains `model` with GRPO on `prompts`, scored by `rewards`. With β > 0 the model as
/// passed in is the frozen reference (also on resume: pass the same starting weights);
/// with `config.lora` it is that model with its adapters switched off.
pub fn train<B: AutodiffBackend>(
    model: CausalLm<B>,
    tokenizer: &Tokenizer,
    prompts: &[GrpoPrompt],
    rewards: &RewardSet,
    run: &GrpoRun,
    observer: &mut dyn Observer,
) -> Result<(CausalLm<B>, Summary)> {
    train_data_parallel(model, tokenizer, prompts, rewards, run, observer, &mut Solo)
}

/// [`train`] as one peer of a data-parallel group: every peer calls it with the same model,
/// prompts and run. Each samples and scores its share of every generation batch (whole
/// prompt groups, see [`crate::shard`]), the peers share the batch's rewards and lengths,
/// train on their own completions with the loss weights of the whole batch, and sum their
/// gradients before each update, so N peers make the updates one peer makes with the whole
/// batch. Rank 0 alone reports to its observer (metrics of the whole batch; clip, KL and
/// entropy figures over its own tokens) and writes checkpoints; the others get `&mut ()`.
pub fn train_data_parallel<B: AutodiffBackend>(
    model: CausalLm<B>,
    tokenizer: &Tokenizer,
    prompts: &[GrpoPrompt],
    rewards: &RewardSet,
    run: &GrpoRun,
    observer: &mut dyn Observer,
    collective: &mut dyn Collective<B::InnerBackend>,
) -> Result<(CausalLm<B>, Summary)> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let leader = rank == 0;
    let config = &run.config;
    config.validate()?;
    if config.prompts_per_step < world {
        return Err(GrpoError::Config {
            field: "prompts_per_step",
            reason: format!("{} prompt groups per step cannot be shared by {world} peers (each samples whole groups)", config.prompts_per_step),
        });
    }
    if prompts.is_empty() {
        return Err(GrpoError::Data("no prompts".into()));
    }
    if let Some(p) = prompts.iter().find(|p| p.prompt.is_empty()) {
        return Err(GrpoError::Data(format!("prompt {} is empty", p.id)));
    }
    let generator = Generator::for_model(tokenizer, &model)?;
    // A schema the constraint cannot compile fails the run now, naming the prompt.
    let mut seen = std::collections::HashSet::new();
    for p in prompts {
        if seen.insert(serde_json::to_string(&p.schema).unwrap_or_default()) {
            generator
                .compile(&constraint_for(config, p))
                .map_err(|e| GrpoError::Data(format!("prompt {}: schema rejected: {e}", p.id)))?;
        }
    }
    let total = config.max_steps;
    let updates_total = config.total_updates();
    let settings = config.settings();
    let schedule = settings.schedule(updates_total);
    let fingerprint = PlanFingerprint::of(config, prompts);
    let model = attach_lora(model, settings.lora.as_ref(), settings.seed)?;
    // The reference is the starting policy. With LoRA it is the base with the adapters
    // switched off: the same weights, shared, not a second copy of the model.
    // (TRL with PEFT does the same: the reference is the adapter-free base.)
    let reference: Option<CausalLm<B::InnerBackend>> = (config.beta != 0.0).then(|| model.valid().without_lora());
    let mut optimizer = AdamW::<B>::new(settings.optimizer);
    let (mut model, resumed) = start_or_resume(model, &mut optimizer, &run.files(), &fingerprint, |s: &GrpoState| &s.plan)?;
    let (mut state, resumed_from) = match resumed {
        Some(r) => (r.state, Some(r.dir)),
        None => (GrpoState { step: 0, updates: 0, total_steps: total, plan: fingerprint.clone() }, None),
    };
    let info = RunInfo {
        total_steps: total,
        start_step: state.step,
        resumed_from,
        prompts: prompts.len(),
        completions_per_step: config.completions_per_step(),
        reward_functions: rewards.names(),
    };
    observer.on_start(&info);
    let device = model.device();
    let pad_id = tokenizer.pad_id_for(model.config().vocab_size);
    let budget = settings.tokens_per_pass(model.config());
    let validators = ValidatorCache::new();
    let surrogate = Surrogate { epsilon_low: config.epsilon_low, epsilon_high: config.epsilon_high, beta: config.beta };
    let names = rewards.names();
    let mut reward_means = Vec::new();
    let mut last_checkpoint = None;
    for index in state.step..total {
        let step = index + 1;
        let started = Instant::now();
        seed_step::<B>(&device, config.seed, index);
        let batch = prompts_of_step(prompts.len(), config, index);
        let positions = positions_of_rank(batch.len(), rank, world);
        let chosen: Vec<&GrpoPrompt> = positions.iter().map(|&i| &prompts[batch[i]]).collect();
        let inner = model.valid();
        let sampled = sample_and_score_at(&inner, &generator, &chosen, &positions, rewards, &validators, config, index)
            .and_then(|r| check_rollout(&r, step).map(|()| r));
        drop(inner);
        let synced = Instant::now();
        let (rollout, view) = share(sampled, &positions, batch.len(), &names, config, &device, collective)?;
        let sync_share = synced.elapsed().as_secs_f64();
        if leader {
            observer.on_rollout(step, &chosen, &rollout);
        }
        let mut time = TimeSplit { generation: rollout.generation_secs, reward: rollout.reward_secs, sync: sync_share, ..TimeSplit::default() };

        let step_active: usize = view.active(config.mask_truncated_completions).iter().sum();
        let t_ref = Instant::now();
        // A local failure from here on is carried into the next reduction (see `all_reduce_step`).
        let mut pending: Option<GrpoError> = None;
        let (step_passes, reference_logps) = match prepare(&rollout, &view, &chosen, config, pad_id, budget, reference.as_ref()) {
            Ok(prepared) => prepared,
            Err(e) => {
                pending = Some(e);
                (Vec::new(), Vec::new())
            }
        };
        time.logprobs += t_ref.elapsed().as_secs_f64();

        let mut stats = TokenStats::default();
        let (mut entropy_sum, mut entropy_tokens) = (0.0, 0usize);
        let (mut loss_value, mut grad_norm, mut clip_scale, mut lr, mut skipped) = (0.0, 0.0, 1.0, schedule.lr(state.updates), 0);
        for iteration in 0..config.num_iterations {
            let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
            let mut trained_tokens = 0usize;
            loss_value = 0.0;
            if pending.is_none() {
                let mut local = || -> Result<()> {
                    for ((m, weights), reference) in step_passes.iter().zip(&reference_logps) {
                        let advantages = m.token_advantages(&rollout);
                        let signal = config.beta != 0.0 || advantages.iter().any(|&a| a != 0.0);
                        if m.positions.is_empty() || !signal {
                            continue;
                        }
                        let t0 = Instant::now();
                        let (logps, entropy, checkpointed) = if config.gradient_checkpointing {
                            let pass = checkpointed_pass_scores(&model, m, &rollout, &chosen, config, iteration == 0)?;
                            (pass.logps.clone(), pass.entropy.clone(), Some(pass))
                        } else {
                            let (logps, entropy) = pass_scores(&model, m, &rollout, &chosen, config, iteration == 0)?;
                            (logps, entropy, None)
                        };
                        if let Some(e) = entropy {
                            entropy_sum += e.sum().into_scalar().elem::<f64>();
                            entropy_tokens += m.positions.len();
                        }
                        let inputs = TokenInputs {
                            // μ = 1 trains on fresh samples: old = current, detached (ratio exactly 1).
                            old: (config.num_iterations > 1).then(|| m.rollout_logprobs(&rollout)),
                            reference: reference.clone(),
                            advantages,
                            weights: weights.clone(),
                        };
                        let (loss, micro_stats) = policy_loss(logps, &inputs, &surrogate)?;
                        let value = loss.clone().into_scalar().elem::<f64>();
                        if !value.is_finite() {
                            return Err(GrpoError::NonFinite { step, what: "loss", value });
                        }
                        time.logprobs += t0.elapsed().as_secs_f64();
                        let t1 = Instant::now();
                        let grads = match checkpointed {
                            Some(pass) => pass.backward(loss),
                            None => GradientsParams::from_grads(thinkjson_model::train::backward(loss), &model),
                        };
                        accumulator.accumulate(&model, grads);
                        time.backward += t1.elapsed().as_secs_f64();
                        loss_value += value;
                        stats.add(&micro_stats);
                        trained_tokens += m.positions.len();
                    }
                    Ok(())
                };
                if let Err(e) = local() {
                    pending = Some(e);
                }
            }
            lr = schedule.lr(state.updates);
            state.updates += 1;
            // Every peer joins the reduction, with or without gradients of its own; an update
            // happens when any peer's completions carried signal.
            let totals = StepTotals { loss: loss_value, tokens: trained_tokens as f64 };
            let grads = if pending.is_none() { accumulator.grads() } else { GradientsParams::new() };
            let synced = Instant::now();
            let reduced = all_reduce_step(&model, grads, totals, pending.is_some(), collective);
            time.sync += synced.elapsed().as_secs_f64();
            if let Some(e) = pending.take() {
                return Err(e);
            }
            let (grads, totals) = reduced?;
            loss_value = totals.loss;
            if totals.tokens == 0.0 {
                skipped += 1;
                continue;
            }
            let t2 = Instant::now();
            let agreed_norm = agreed_grad_norm(&model, &grads, collective)?;
            let (next, report) = optimizer.step_with_norm(lr, model, grads, agreed_norm).map_err(|e| match e {
                ModelError::NonFinite(_) => GrpoError::NonFinite { step, what: "gradient norm", value: f64::NAN },
                other => GrpoError::Model(other),
            })?;
            model = next;
            time.optimizer += t2.elapsed().as_secs_f64();
            grad_norm = report.grad_norm;
            clip_scale = report.clip_scale;
        }
        state.step = step;
        time.total = started.elapsed().as_secs_f64();
        let metrics = step_metrics(&view, &stats, StepExtras {
            step,
            updates: state.updates,
            lr,
            loss: loss_value,
            grad_norm,
            clip_scale,
            entropy: entropy_sum / entropy_tokens.max(1) as f64,
            active_tokens: step_active,
            skipped,
            time,
            beta: config.beta,
        });
        reward_means.push(metrics.reward_mean);
        if leader && config.sample_every > 0 && (step.is_multiple_of(config.sample_every) || step == 1) && config.samples_logged > 0 {
            let samples: Vec<Sample> = rollout
                .completions
                .iter()
                .enumerate()
                .step_by(config.num_generations.max(1))
                .take(config.samples_logged)
                .map(|(j, s)| Sample {
                    step,
                    prompt_id: chosen[s.prompt_index].id.clone(),
                    completion: s.completion.text.clone(),
                    reward: s.reward,
                    advantage: rollout.advantages.values[j],
                    parts: s.parts.clone(),
                })
                .collect();
            observer.on_samples(&samples);
        }
        let stop = leader && observer.on_step(&metrics) == Control::Stop;
        // Rank 0's observer decides for the group: no peer may wait for a step the others skip.
        if all_reduce_scalar(f64::from(u8::from(stop)), &device, collective)? > 0.0 {
            return Ok((model, Summary { info, last_step: step, stopped_early: true, reward_means, last_checkpoint }));
        }
        if world > 1 && (step == total || step.is_multiple_of(SYNC_CHECK_EVERY)) {
            check_in_sync(&model, collective)?;
        }
        if !leader {
            continue;
        }
        if let Some(dir) = save_if_due(&run.files(), step, config.save_every, step == total, &model, &optimizer, &state)? {
            observer.on_checkpoint(step, &dir);
            last_checkpoint = Some(dir);
        }
    }
    Ok((model, Summary { info, last_step: state.step, stopped_early: false, reward_means, last_checkpoint }))
}

/// Steps between two comparisons of the peers' weights (and at the last step).
const SYNC_CHECK_EVERY: u64 = 10;

/// Non-finite sampler log-probs or rewards stop the run. Weights gone non-finite show first
/// in the sampler's log-probs (a NaN model still "samples", and its all-equal rewards would
/// otherwise skip every update).
fn check_rollout(rollout: &Rollout, step: u64) -> Result<()> {
    if let Some(bad) = rollout.completions.iter().flat_map(|s| s.completion.logprobs.iter()).find(|lp| !lp.is_finite()) {
        return Err(GrpoError::NonFinite { step, what: "rollout log-prob", value: f64::from(*bad) });
    }
    for s in &rollout.completions {
        if let Some((name, v)) = s.parts.iter().find(|(_, v)| !v.is_finite()) {
            return Err(GrpoError::NonFiniteReward { step, function: name.clone(), value: *v });
        }
    }
    Ok(())
}

type PreparedPasses = (Vec<(MicroBatch, Vec<f32>)>, Vec<Option<Vec<f32>>>);

/// This peer's training passes and, with β > 0, the reference's log-probs of their tokens.
fn prepare<B: Backend>(
    rollout: &Rollout,
    view: &BatchView,
    chosen: &[&GrpoPrompt],
    config: &GrpoConfig,
    pad_id: u32,
    budget: usize,
    reference: Option<&CausalLm<B>>,
) -> Result<PreparedPasses> {
    let step_passes = passes(rollout, view, chosen, config, pad_id, budget)?;
    let reference_logps = match reference {
        Some(r) => step_passes
            .iter()
            .map(|(m, _)| {
                if m.positions.is_empty() {
                    return Ok(None);
                }
                let lp = pass_scores(r, m, rollout, chosen, config, false)?.0;
                Ok(Some(to_host(lp)?))
            })
            .collect::<Result<_>>()?,
        None => vec![None; step_passes.len()],
    };
    Ok((step_passes, reference_logps))
}

/// This peer's share of the generation batch as forward/backward passes, each with its
/// tokens' loss weights. The `grad_accum` micro-batches are cut from the whole batch and fix
/// the weights (TRL's normalisations), so a peer's tokens weigh what they weigh with one
/// peer; each peer's part of a micro-batch is cut into passes over one prompt's completions
/// ([`CausalLm::continuation_scores`] runs that prompt once per pass) of at most `budget`
/// tokens (`P − 1 + rows × longest completion`). The cuts change memory and speed, not the loss.
fn passes(rollout: &Rollout, view: &BatchView, prompts: &[&GrpoPrompt], config: &GrpoConfig, pad_id: u32, budget: usize) -> Result<Vec<(MicroBatch, Vec<f32>)>> {
    let active = view.active(config.mask_truncated_completions);
    let local_of_global = view.local_of_global();
    let n = active.len();
    let per_micro = n.div_ceil(config.grad_accum.max(1)).max(1);
    let chunks: Vec<std::ops::Range<usize>> = (0..n).step_by(per_micro).map(|s| s..(s + per_micro).min(n)).collect();
    let step_active: usize = active.iter().sum();
    let accum = chunks.len();
    let mut out = Vec::new();
    for chunk in chunks {
        let weights = token_weights(config.loss_type, &active[chunk.clone()], accum, step_active, config.max_completion_len);
        // This peer's rows of the micro-batch and their slices of its weights.
        let (mut rows, mut row_weights, mut offset) = (Vec::new(), Vec::new(), 0);
        for c in chunk {
            if let Some(j) = local_of_global[c] {
                rows.push(j);
                row_weights.extend_from_slice(&weights[offset..offset + active[c]]);
            }
            offset += active[c];
        }
        if rows.is_empty() {
            continue;
        }
        let m = MicroBatch::build(rollout, prompts, &rows, config.mask_truncated_completions, pad_id)?;
        let mut first_token = 0;
        for piece in prompt_pieces(&m.rows, rollout, prompts, budget) {
            let count: usize = m.active[piece.clone()].iter().sum();
            let part = MicroBatch::build(rollout, prompts, &m.rows[piece], config.mask_truncated_completions, pad_id)?;
            out.push((part, row_weights[first_token..first_token + count].to_vec()));
            first_token += count;
        }
    }
    Ok(out)
}

/// Consecutive ranges of `rows` with one prompt each and `P − 1 + rows × longest completion`
/// within `budget` (one completion always fits).
fn prompt_pieces(rows: &[usize], rollout: &Rollout, prompts: &[&GrpoPrompt], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut pieces = Vec::new();
    let (mut start, mut longest) = (0, 0);
    for (i, &j) in rows.iter().enumerate() {
        let s = &rollout.completions[j];
        let same_prompt = rollout.completions[rows[start]].prompt_index == s.prompt_index;
        let wider = longest.max(s.completion.tokens.len());
        let prompt_len = prompts[s.prompt_index].prompt.len();
        let fits = prompt_len.saturating_sub(1) + (i + 1 - start) * wider <= budget;
        if i > start && !(same_prompt && fits) {
            pieces.push(start..i);
            start = i;
            longest = s.completion.tokens.len();
        } else {
            longest = wider;
        }
    }
    if start < rows.len() {
        pieces.push(start..rows.len());
    }
    pieces
}

/// The policy's (or reference's) log-probs of a pass's active tokens, in `m.positions`
/// order: its prompt once, then every completion after it.
fn pass_scores<B: Backend>(
    model: &CausalLm<B>,
    m: &MicroBatch,
    rollout: &Rollout,
    prompts: &[&GrpoPrompt],
    config: &GrpoConfig,
    entropy: bool,
) -> Result<(Tensor<B, 1>, Option<Tensor<B, 1>>)> {
    let (prompt, continuations) = pass_rows(m, rollout, prompts)?;
    Ok(model.continuation_scores(prompt, &continuations, &m.active, config.logprob_chunk, f64::from(config.temperature), entropy)?)
}

/// [`pass_scores`] with activation checkpointing (`gradient_checkpointing`).
fn checkpointed_pass_scores<'a, B: AutodiffBackend>(
    model: &'a CausalLm<B>,
    m: &MicroBatch,
    rollout: &Rollout,
    prompts: &[&GrpoPrompt],
    config: &GrpoConfig,
    entropy: bool,
) -> Result<CheckpointedScores<'a, B>> {
    let (prompt, continuations) = pass_rows(m, rollout, prompts)?;
    Ok(model.checkpointed_continuation_scores(prompt, &continuations, &m.active, config.logprob_chunk, f64::from(config.temperature), entropy)?)
}

/// A pass's prompt and its completions' tokens.
fn pass_rows<'p>(m: &MicroBatch, rollout: &Rollout, prompts: &[&'p GrpoPrompt]) -> Result<(&'p [u32], Vec<Vec<u32>>)> {
    let Some(&first) = m.rows.first() else {
        return Err(GrpoError::Data("an empty training pass".into()));
    };
    let prompt = &prompts[rollout.completions[first].prompt_index].prompt;
    let continuations: Vec<Vec<u32>> = m.rows.iter().map(|&j| rollout.completions[j].completion.tokens.clone()).collect();
    Ok((prompt, continuations))
}

fn to_host<B: burn::tensor::backend::Backend>(t: burn::tensor::Tensor<B, 1>) -> Result<Vec<f32>> {
    t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| GrpoError::Data(format!("reading log-probs: {e:?}")))
}

struct StepExtras {
    step: u64,
    updates: u64,
    lr: f64,
    loss: f64,
    grad_norm: f64,
    clip_scale: f64,
    entropy: f64,
    active_tokens: usize,
    skipped: usize,
    time: TimeSplit,
    beta: f64,
}

fn step_metrics(view: &BatchView, stats: &TokenStats, x: StepExtras) -> StepMetrics {
    let n = view.rewards.len().max(1) as f64;
    let overall = MeanStd::of(&view.rewards);
    let lens = &view.lens;
    let share = |flags: &[bool]| flags.iter().filter(|&&f| f).count() as f64 / n;
    StepMetrics {
        step: x.step,
        updates: x.updates,
        lr: x.lr,
        loss: x.loss,
        grad_norm: x.grad_norm,
        clip_scale: x.clip_scale,
        reward_mean: overall.mean,
        reward_std: overall.std,
        rewards: view.parts.iter().map(|(k, v)| (k.clone(), MeanStd::of(v))).collect(),
        frac_zero_std: view.advantages.frac_zero_std(),
        kl: if x.beta != 0.0 { stats.kl_mean() } else { 0.0 },
        clip_low: stats.clip_low_frac(),
        clip_high: stats.clip_high_frac(),
        max_ratio_dev: stats.max_ratio_dev,
        entropy: x.entropy,
        completion_len_mean: lens.iter().sum::<usize>() as f64 / n,
        completion_len_max: lens.iter().copied().max().unwrap_or(0),
        truncated_share: share(&view.truncated),
        valid_json_rate: share(&view.valid_json),
        schema_valid_rate: share(&view.schema_valid),
        active_tokens: x.active_tokens,
        skipped_updates: x.skipped,
        time: x.time,
    }
}
