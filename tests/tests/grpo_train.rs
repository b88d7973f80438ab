//! GRPO: loss and advantages against TRL's formulas (fixtures from
//! `scripts/make_grpo_fixtures.py`), the identities at policy = old = reference, learning on
//! the tiny preset with a verifiable reward, kill-and-resume, and non-finite stops.

mod common;

use std::path::Path;

use common::{assets, bool_prompts, fixtures, logits_of, match_only, max_abs_diff, read_json};
use serde_json::{json, Value};
use thinkjson_decode::Generator;
use thinkjson_model::burn::module::AutodiffModule;
use thinkjson_model::burn::tensor::{ElementConversion, Tensor, TensorData};
use thinkjson_model::train::Checkpoints;
use thinkjson_model::{CausalLm, CpuTrainBackend, ModelConfig, Tokenizer};
use thinkjson_grpo::{
    advantages, policy_loss, sample_and_score, token_weights, train, Control, GrpoConfig, GrpoError, GrpoPrompt, GrpoRun, LossType, MicroBatch,
    Observer, RolloutConstraint, ScaleRewards, StepMetrics, Surrogate, TokenInputs,
};
use std::sync::atomic::{AtomicUsize, Ordering};

use thinkjson_reward::{Context, Parsed, RewardFn, RewardSet, Score, ValidatorCache};

type B = CpuTrainBackend;

fn rows(v: &Value) -> Vec<Vec<f64>> {
    serde_json::from_value(v.clone()).expect("2-d list")
}

fn loss_type(name: &str) -> LossType {
    match name {
        "grpo" => LossType::Grpo,
        "bnpo" => LossType::Bnpo,
        "dr_grpo" => LossType::DrGrpo,
        "dapo" => LossType::Dapo,
        other => panic!("unknown loss type {other}"),
    }
}

#[test]
fn advantages_match_trl_for_every_scale_mode() {
    let fx = read_json(&fixtures().join("grpo/loss.json"));
    let rewards: Vec<f64> = serde_json::from_value(fx["rewards"].clone()).expect("rewards");
    let g = fx["group_size"].as_u64().expect("G") as usize;
    for (name, mode) in [("group", ScaleRewards::Group), ("batch", ScaleRewards::Batch), ("none", ScaleRewards::None)] {
        let want: Vec<f64> = serde_json::from_value(fx["advantages"][name].clone()).expect("advantages");
        let got = advantages(&rewards, g, mode);
        for (i, (a, b)) in got.values.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-9, "{name} advantage {i}: ours {a}, TRL {b}");
        }
        assert_eq!(got.zero_std_groups, 1, "the fixture's second group has equal rewards");
    }
}

/// Every loss type, with and without the KL term, over two accumulated micro-batches:
/// the loss, its gradient with respect to the policy log-probs, the mean KL and the clip
/// fractions equal TRL's formulas.
#[test]
fn loss_types_clipping_and_kl_match_trl() {
    let fx = read_json(&fixtures().join("grpo/loss.json"));
    let (logps, old, reference) = (rows(&fx["logps"]), rows(&fx["old"]), rows(&fx["ref"]));
    let lengths: Vec<usize> = serde_json::from_value(fx["lengths"].clone()).expect("lengths");
    let rewards: Vec<f64> = serde_json::from_value(fx["rewards"].clone()).expect("rewards");
    let g = fx["group_size"].as_u64().expect("G") as usize;
    let t_max = fx["max_completion_len"].as_u64().expect("T") as usize;
    let accum = fx["grad_accum"].as_u64().expect("accum") as usize;
    let adv = advantages(&rewards, g, ScaleRewards::Group).values;
    let step_active: usize = lengths.iter().sum();
    let half = lengths.len() / accum;
    let active = |seqs: std::ops::Range<usize>, m: &Vec<Vec<f64>>| -> Vec<f32> {
        seqs.flat_map(|i| m[i][..lengths[i]].iter().map(|&x| x as f32).collect::<Vec<_>>()).collect()
    };
    for case in fx["cases"].as_array().expect("cases") {
        let lt = loss_type(case["loss_type"].as_str().expect("loss_type"));
        let beta = case["beta"].as_f64().expect("beta");
        let surrogate = Surrogate {
            epsilon_low: fx["epsilon_low"].as_f64().expect("eps"),
            epsilon_high: fx["epsilon_high"].as_f64().expect("eps"),
            beta,
        };
        let want_grad = rows(&case["grad"]);
        let mut total = 0.0;
        let mut stats = thinkjson_grpo::TokenStats::default();
        for k in 0..accum {
            let seqs = k * half..(k + 1) * half;
            let values = active(seqs.clone(), &logps);
            let n = values.len();
            let leaf = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), &Default::default()).require_grad();
            let inputs = TokenInputs {
                old: Some(active(seqs.clone(), &old)),
                reference: Some(active(seqs.clone(), &reference)),
                advantages: seqs.clone().flat_map(|i| std::iter::repeat_n(adv[i] as f32, lengths[i])).collect(),
                weights: token_weights(lt, &lengths[seqs.clone()], accum, step_active, t_max),
            };
            let (loss, s) = policy_loss(leaf.clone(), &inputs, &surrogate).expect("loss");
            stats.add(&s);
            total += loss.clone().into_scalar().elem::<f64>();
            let grads = loss.backward();
            let grad: Vec<f32> = leaf.grad(&grads).expect("gradient").into_data().to_vec().expect("f32");
            let want: Vec<f32> = seqs.clone().flat_map(|i| want_grad[i][..lengths[i]].iter().map(|&x| x as f32).collect::<Vec<_>>()).collect();
            for (j, (a, b)) in grad.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-6, "{lt:?} β={beta}: d loss / d logp[{j}] ours {a}, TRL {b}");
            }
        }
        let want = case["loss"].as_f64().expect("loss");
        assert!((total - want).abs() < 1e-6, "{lt:?} β={beta}: loss ours {total}, TRL {want}");
        assert!((stats.kl_mean() - fx["kl_mean"].as_f64().expect("kl")).abs() < 1e-6, "KL {}", stats.kl_mean());
        assert!((stats.clip_low_frac() - fx["clip_low"].as_f64().expect("low")).abs() < 1e-9);
        assert!((stats.clip_high_frac() - fx["clip_high"].as_f64().expect("high")).abs() < 1e-9);
    }
}

#[test]
fn at_policy_equals_old_equals_reference_the_ratio_is_one_and_kl_zero() {
    let lp = [-0.3f32, -1.7, -2.2, -0.01, -4.0];
    let adv = [1.5f32, 1.5, -0.5, -0.5, 2.0];
    for lt in [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo, LossType::Dapo] {
        let leaf = Tensor::<B, 1>::from_data(TensorData::new(lp.to_vec(), [5]), &Default::default()).require_grad();
        let weights = token_weights(lt, &[2, 3], 1, 5, 4);
        let inputs = TokenInputs { old: Some(lp.to_vec()), reference: Some(lp.to_vec()), advantages: adv.to_vec(), weights: weights.clone() };
        let (loss, stats) = policy_loss(leaf, &inputs, &Surrogate { epsilon_low: 0.2, epsilon_high: 0.2, beta: 0.1 }).expect("loss");
        assert_eq!(stats.kl_sum, 0.0);
        assert_eq!(stats.max_ratio_dev, 0.0);
        assert_eq!((stats.clipped_low, stats.clipped_high), (0, 0));
        // ratio 1, KL 0: the loss is −Σ w · A.
        let want: f64 = -weights.iter().zip(&adv).map(|(w, a)| f64::from(*w) * f64::from(*a)).sum::<f64>();
        let got = loss.into_scalar().elem::<f64>();
        assert!((got - want).abs() < 1e-6, "{lt:?}: {got} vs {want}");
    }
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_path(&assets().join("qwen")).expect("tokenizer")
}

/// The tiny preset with the Qwen vocabulary (constrained decoding needs every tokenizer id).
fn small_model(seed: u64) -> CausalLm<B> {
    let config = ModelConfig::preset("tiny").expect("tiny");
    CausalLm::random(&config, seed, &Default::default()).expect("model")
}

fn bool_config() -> GrpoConfig {
    GrpoConfig {
        num_generations: 8,
        prompts_per_step: 2,
        max_steps: 12,
        max_completion_len: 16,
        constraint: RolloutConstraint::JsonSchema,
        lr: 1e-2,
        grad_accum: 2,
        seed: 3,
        save_every: 0,
        sample_every: 0,
        ..GrpoConfig::default()
    }
}

fn run_in(dir: &Path, config: GrpoConfig, resume: bool) -> GrpoRun {
    GrpoRun { config, checkpoint_root: dir.to_path_buf(), extra_files: Vec::new(), resume }
}

#[derive(Default)]
struct Record {
    steps: Vec<StepMetrics>,
    stop_after: Option<u64>,
}

impl Observer for Record {
    fn on_step(&mut self, m: &StepMetrics) -> Control {
        self.steps.push(m.clone());
        if Some(m.step) == self.stop_after {
            Control::Stop
        } else {
            Control::Continue
        }
    }
}

#[test]
fn mean_reward_rises_on_the_tiny_preset_with_a_verifiable_reward() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut rec = Record::default();
    let (_, summary) = train(small_model(11), &tokenizer(), &bool_prompts(6), &match_only(), &run_in(dir.path(), bool_config(), false), &mut rec).expect("train");
    assert_eq!(summary.last_step, 12);
    let r = &summary.reward_means;
    let head = (r[0] + r[1] + r[2]) / 3.0;
    let tail = (r[9] + r[10] + r[11]) / 3.0;
    assert!(tail > head + 0.25 && tail > 0.9, "mean reward went from {head:.3} to only {tail:.3}: {r:?}");
    for m in &rec.steps {
        assert_eq!(m.valid_json_rate, 1.0, "constrained rollouts are always valid JSON");
        assert_eq!(m.schema_valid_rate, 1.0);
        assert_eq!(m.kl, 0.0, "β = 0 keeps no reference");
        assert!(m.time.generation > 0.0 && m.time.total >= m.time.generation);
        assert!(m.rewards.contains_key("match"));
    }
    assert_eq!(Checkpoints::new(dir.path(), 0).latest().expect("list").map(|c| c.0), Some(12), "a checkpoint at the end");
}

/// With β > 0 the first update's KL is to an identical model, and with μ = 1 the old
/// log-probs are the current ones: KL 0, ratio 1. The rollout's own log-probs (used as the
/// old ones when μ > 1) equal the training forward's.
#[test]
fn first_update_has_zero_kl_and_rollout_logprobs_match_the_training_forward() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = GrpoConfig { beta: 0.05, max_steps: 1, temperature: 0.7, ..bool_config() };
    let mut rec = Record::default();
    train(small_model(2), &tokenizer(), &bool_prompts(4), &match_only(), &run_in(dir.path(), config.clone(), false), &mut rec).expect("train");
    let m = &rec.steps[0];
    assert!(m.kl.abs() < 1e-6, "KL to an identical reference: {}", m.kl);
    assert_eq!(m.max_ratio_dev, 0.0);
    assert!(m.entropy > 0.0);

    let model = small_model(2);
    let inner = model.valid();
    let tok = tokenizer();
    let generator = Generator::for_model(&tok, &inner).expect("generator");
    let prompts = bool_prompts(4);
    let chosen: Vec<&GrpoPrompt> = prompts.iter().take(2).collect();
    let rollout = sample_and_score(&inner, &generator, &chosen, &match_only(), &ValidatorCache::new(), &config, 0).expect("rollout");
    let rows: Vec<usize> = (0..rollout.completions.len()).collect();
    let mb = MicroBatch::build(&rollout, &chosen, &rows, false, 0).expect("batch");
    let (lp, _) = inner.selected_scores(&mb.tokens, &mb.positions, &mb.targets, 64, 0.7, false).expect("scores");
    let ours: Vec<f32> = lp.into_data().to_vec().expect("f32");
    let decoded = mb.rollout_logprobs(&rollout);
    let worst = ours.iter().zip(&decoded).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "rollout vs training log-probs differ by {worst}");
}

#[test]
fn kill_and_resume_reproduces_the_uninterrupted_run() {
    let config = GrpoConfig { max_steps: 4, save_every: 1, keep_last: 0, num_iterations: 2, beta: 0.02, ..bool_config() };
    let prompts = bool_prompts(5);
    let whole_dir = tempfile::tempdir().expect("tmp");
    let mut whole = Record::default();
    train(small_model(4), &tokenizer(), &prompts, &match_only(), &run_in(whole_dir.path(), config.clone(), false), &mut whole).expect("whole");

    let dir = tempfile::tempdir().expect("tmp");
    let mut first = Record { stop_after: Some(3), ..Record::default() };
    let (_, s1) = train(small_model(4), &tokenizer(), &prompts, &match_only(), &run_in(dir.path(), config.clone(), false), &mut first).expect("first");
    assert!(s1.stopped_early);
    let mut second = Record::default();
    let (_, s2) = train(small_model(4), &tokenizer(), &prompts, &match_only(), &run_in(dir.path(), config.clone(), true), &mut second).expect("resume");
    assert_eq!(s2.info.start_step, 2, "the kill came before step 3's checkpoint");
    assert_eq!(second.steps.len(), 2);
    for (a, b) in second.steps.iter().zip(&whole.steps[2..]) {
        assert_eq!(a.step, b.step);
        assert_eq!(a.updates, b.updates);
        assert_eq!(a.reward_mean, b.reward_mean, "step {}: the same completions are sampled", a.step);
        assert!((a.loss - b.loss).abs() <= 1e-6 * b.loss.abs().max(1.0), "step {}: loss {} vs {}", a.step, a.loss, b.loss);
        assert!((a.kl - b.kl).abs() <= 1e-6, "step {}: KL {} vs {}", a.step, a.kl, b.kl);
    }
    let other = GrpoConfig { seed: 99, ..config };
    let err = train(small_model(4), &tokenizer(), &prompts, &match_only(), &run_in(dir.path(), other, true), &mut ()).unwrap_err();
    assert!(matches!(err, GrpoError::Resume(_)), "{err}");
}

/// A reward that breaks after `after` calls.
struct BreaksAfter {
    calls: AtomicUsize,
    after: usize,
}

impl RewardFn for BreaksAfter {
    fn name(&self) -> &str {
        "breaks"
    }
    fn range(&self) -> (f64, f64) {
        (0.0, 1.0)
    }
    fn score(&self, completion: &str, _: &Parsed, _: &Context<'_>) -> Score {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let value = if n >= self.after { f64::NAN } else { f64::from(completion.contains("true")) };
        Score { value, reason: String::new() }
    }
}

#[test]
fn non_finite_values_stop_the_run_and_keep_the_last_checkpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = GrpoConfig { max_steps: 6, save_every: 1, ..bool_config() };
    let per_step = config.completions_per_step();
    let rewards = RewardSet::new().with(Box::new(BreaksAfter { calls: AtomicUsize::new(0), after: 2 * per_step }), 1.0);
    let err = train(small_model(1), &tokenizer(), &bool_prompts(4), &rewards, &run_in(dir.path(), config, false), &mut ()).unwrap_err();
    assert!(matches!(err, GrpoError::NonFiniteReward { step: 3, .. }), "{err}");
    assert!(err.to_string().contains("`breaks`") && err.to_string().contains("not finite"), "{err}");
    let (step, last) = Checkpoints::new(dir.path(), 0).latest().expect("list").expect("a checkpoint before the failure");
    assert_eq!(step, 2);
    CausalLm::<B>::from_pretrained(&last, &Default::default()).expect("the last checkpoint loads");
}

#[test]
fn a_schema_the_constraint_cannot_compile_is_rejected_by_prompt() {
    let mut prompts = bool_prompts(3);
    // A remote reference: nothing is fetched, so the schema cannot be used.
    prompts[1].schema = json!({"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}});
    let dir = tempfile::tempdir().expect("tmp");
    let err = train(small_model(1), &tokenizer(), &prompts, &match_only(), &run_in(dir.path(), bool_config(), false), &mut ()).unwrap_err();
    assert!(err.to_string().contains("prompt p1") && err.to_string().contains("https://example.com/s.json"), "{err}");
}

/// GRPO with LoRA and β > 0: the reference is the base with the adapters off (KL 0 at the
/// first update, where the adapters are still zero), the base weights never change, and a
/// killed run resumes to the uninterrupted one.
#[test]
fn lora_with_kl_uses_the_adapter_free_base_as_reference_and_resumes_exactly() {
    use thinkjson_model::{LoraConfig, StorageDtype};
    let lora = LoraConfig { r: 4, alpha: 16.0, target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()], ..LoraConfig::default() };
    let config = GrpoConfig { max_steps: 4, save_every: 1, keep_last: 0, num_iterations: 2, beta: 0.05, lora: Some(lora), ..bool_config() };
    let prompts = bool_prompts(5);
    let base_bytes = |m: &CausalLm<B>| {
        let d = tempfile::tempdir().expect("tmp");
        m.valid().without_lora().save_pretrained(d.path(), StorageDtype::Float32).expect("save");
        std::fs::read(d.path().join("model.safetensors")).expect("read")
    };
    let before = base_bytes(&small_model(4));
    let whole_dir = tempfile::tempdir().expect("tmp");
    let mut whole = Record::default();
    let (trained, _) = train(small_model(4), &tokenizer(), &prompts, &match_only(), &run_in(whole_dir.path(), config.clone(), false), &mut whole).expect("whole");
    let one = GrpoConfig { max_steps: 1, num_iterations: 1, save_every: 0, ..config.clone() };
    let mut first_update = Record::default();
    let d = tempfile::tempdir().expect("tmp");
    train(small_model(4), &tokenizer(), &prompts, &match_only(), &run_in(d.path(), one, false), &mut first_update).expect("one step");
    assert!(first_update.steps[0].kl.abs() < 1e-6, "first update: policy = base, KL {}", first_update.steps[0].kl);
    assert!(whole.steps.iter().skip(1).any(|m| m.kl > 0.0), "the adapters move the policy away from the reference");
    assert_eq!(base_bytes(&trained), before, "base weights are bit-identical");

    let dir = tempfile::tempdir().expect("tmp");
    let mut first = Record { stop_after: Some(3), ..Record::default() };
    train(small_model(4), &tokenizer(), &prompts, &match_only(), &run_in(dir.path(), config.clone(), false), &mut first).expect("first");
    let mut second = Record::default();
    let (resumed, s2) = train(small_model(4), &tokenizer(), &prompts, &match_only(), &run_in(dir.path(), config, true), &mut second).expect("resume");
    assert_eq!(s2.info.start_step, 2);
    for (a, b) in second.steps.iter().zip(&whole.steps[2..]) {
        assert_eq!(a.reward_mean, b.reward_mean, "step {}: the same completions are sampled", a.step);
        assert!((a.loss - b.loss).abs() <= 1e-6 * b.loss.abs().max(1.0), "step {}: loss {} vs {}", a.step, a.loss, b.loss);
        assert!((a.kl - b.kl).abs() <= 1e-6, "step {}: KL {} vs {}", a.step, a.kl, b.kl);
    }
    let flat = |m: &CausalLm<B>| -> Vec<f32> { m.adapter_params().into_iter().flat_map(|(_, p)| p.val().into_data().to_vec::<f32>().expect("f32")).collect() };
    let (w, r) = (flat(&trained), flat(&resumed));
    let worst = w.iter().zip(&r).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-6, "adapter weights after resume differ by {worst}");
}

/// A token budget cuts each micro-batch into forward/backward passes (every completion alone
/// at a budget of 1) under each loss type's normalisation; the update is unchanged.
#[test]
fn a_token_budget_changes_the_passes_not_the_update() {
    let probe = [3u32, 9, 27, 81, 5];
    for loss_type in [LossType::Grpo, LossType::Bnpo] {
        let mut runs = Vec::new();
        for budget in [0, 1] {
            let dir = tempfile::tempdir().expect("tmp");
            let config = GrpoConfig { max_steps: 2, loss_type, max_tokens_per_pass: budget, ..bool_config() };
            let mut rec = Record::default();
            let (model, _) = train(small_model(4), &tokenizer(), &bool_prompts(4), &match_only(), &run_in(dir.path(), config, false), &mut rec).expect("train");
            runs.push((rec.steps, logits_of(&model.valid(), &probe)));
        }
        let ((whole, logits), (cut, cut_logits)) = (&runs[0], &runs[1]);
        assert!(whole.iter().any(|m| m.skipped_updates == 0), "{loss_type:?}: some step must train");
        for (a, b) in cut.iter().zip(whole) {
            assert_eq!(a.reward_mean, b.reward_mean, "{loss_type:?} step {}: same rollouts", a.step);
            assert!((a.loss - b.loss).abs() <= 1e-5 * b.loss.abs().max(1.0), "{loss_type:?} step {}: loss {} vs {}", a.step, a.loss, b.loss);
        }
        // Summation order differs between the passes; AdamW at lr 1e-2 carries it into the
        // weights at the 1e-5 level, against a training effect hundreds of times larger.
        let d = max_abs_diff(cut_logits, logits);
        assert!(d <= 1e-4, "{loss_type:?}: logits after training differ by {d}");
        let moved = max_abs_diff(logits, &logits_of(&small_model(4).valid(), &probe));
        assert!(moved > 1e-2, "{loss_type:?}: training moved the logits by only {moved}");
    }
}

/// Activation checkpointing recomputes each layer in the backward pass; the run is the same
/// — rewards and losses bit for bit; gradient norms and the trained weights bit for bit with
/// LoRA, and to 1e-6 with full fine-tuning — and the config refuses LoRA dropout with it.
///
/// Full fine-tuning is compared to a tolerance because its own runs differ: the tied
/// embedding's gradient at step 3 comes out in one of two versions, a last bit apart (squared
/// norms 0.91773546 and 0.9177354; every other parameter's gradient has the same bits), in
/// the plain and in the checkpointed run alike, so the two step-3 norms are
/// 1.0955500912341978 or 1.0955500368280628 on either side. Seen on 2026-12-02 in 4 of 28 runs
/// of this binary (2 of them with other CPU load beside it); the cause is not found (see
/// docs/design.md, "Activation checkpointing").
#[test]
fn gradient_checkpointing_changes_memory_not_the_run() {
    use thinkjson_model::LoraConfig;
    let probe = [3u32, 9, 27, 81, 5];
    let lora = LoraConfig { r: 4, alpha: 16.0, ..LoraConfig::default() };
    for adapters in [None, Some(lora.clone())] {
        let mut runs = Vec::new();
        for checkpointing in [false, true] {
            let dir = tempfile::tempdir().expect("tmp");
            let config = GrpoConfig { max_steps: 3, gradient_checkpointing: checkpointing, lora: adapters.clone(), ..bool_config() };
            let mut rec = Record::default();
            let (model, _) = train(small_model(4), &tokenizer(), &bool_prompts(4), &match_only(), &run_in(dir.path(), config, false), &mut rec).expect("train");
            runs.push((rec.steps, logits_of(&model.valid(), &probe)));
        }
        let ((plain, logits), (checkpointed, checkpointed_logits)) = (&runs[0], &runs[1]);
        assert!(plain.iter().any(|m| m.skipped_updates == 0), "some step must train");
        assert_eq!(plain.len(), checkpointed.len());
        for (a, b) in checkpointed.iter().zip(plain) {
            assert_eq!((a.reward_mean, a.loss), (b.reward_mean, b.loss), "step {}", a.step);
            if adapters.is_some() {
                assert_eq!(a.grad_norm, b.grad_norm, "step {}", a.step);
            } else {
                assert!((a.grad_norm - b.grad_norm).abs() <= 1e-6 * b.grad_norm, "step {}: grad norm {} vs {}", a.step, a.grad_norm, b.grad_norm);
            }
        }
        if adapters.is_some() {
            assert_eq!(checkpointed_logits, logits, "weights after training differ");
        } else {
            let d = max_abs_diff(checkpointed_logits, logits);
            assert!(d <= 1e-5, "logits after training differ by {d}");
        }
        let moved = max_abs_diff(logits, &logits_of(&small_model(4).valid(), &probe));
        assert!(moved > 1e-3, "training moved the logits by only {moved}");
    }
    let dropout = GrpoConfig { gradient_checkpointing: true, lora: Some(LoraConfig { dropout: 0.1, ..lora }), ..bool_config() };
    let err = dropout.validate().expect_err("checkpointing with LoRA dropout must be refused").to_string();
    assert!(err.contains("gradient_checkpointing") && err.contains("dropout"), "{err}");
}
