//! Data parallelism on CPU peers (threads of this process on burn-collective): two peers
//! with half of every step give the weights one peer gives with the whole step, a peer's
//! failure stops every peer instead of hanging them, and drifted weights are caught.

mod common;

use common::assets;
use thinkjson_model::burn::module::{Module, ModuleVisitor, Param};
use thinkjson_model::burn::optim::GradientsParams;
use thinkjson_model::burn::tensor::backend::AutodiffBackend;
use thinkjson_model::burn::tensor::Tensor;
use thinkjson_model::lora::LoraConfig;
use thinkjson_model::train::{all_reduce_step, check_in_sync, run_in_process, Checkpoints, Collective, StepTotals};
use thinkjson_model::{CausalLm, CpuTrainBackend, ModelConfig, ModelError, Tokenizer};
use thinkjson_sft::{train, train_data_parallel, Observer, SftConfig, SftError, SftExample, SftRun, StepMetrics};

type B = CpuTrainBackend;
type Inner = <B as AutodiffBackend>::InnerBackend;

/// Examples of varied lengths (vocab 96, like the tiny model below), so the peers' halves
/// hold different numbers of target tokens and the global normaliser matters.
fn examples(n: usize) -> Vec<SftExample> {
    (0..n)
        .map(|i| SftExample {
            id: format!("ex{i}"),
            prompt: (0..3 + i % 5).map(|j| ((i * 31 + j * 7) % 90 + 3) as u32).collect(),
            completion: (0..2 + (i * 7) % 6).map(|j| ((i * 13 + j * 11) % 90 + 3) as u32).collect(),
        })
        .collect()
}

fn model() -> CausalLm<B> {
    let config = ModelConfig::preset("tiny").expect("tiny").with_vocab_size(96);
    CausalLm::random(&config, 3, &Default::default()).expect("model")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_path(&assets().join("qwen")).expect("tokenizer")
}

fn config(lora: Option<LoraConfig>) -> SftConfig {
    SftConfig {
        lr: 3e-3,
        warmup_ratio: 0.0,
        max_steps: Some(3),
        batch_size: 3,
        grad_accum: 2,
        max_len: 32,
        save_every: 0,
        eval_generations: 0,
        seed: 11,
        lora,
        ..SftConfig::default()
    }
}

fn run(dir: &std::path::Path, config: SftConfig) -> SftRun {
    SftRun { config, checkpoint_root: dir.to_path_buf(), extra_files: Vec::new(), resume: false }
}

/// Every float parameter of the model (frozen ones too), in traversal order.
fn weights(model: &CausalLm<B>) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.extend(param.val().into_data().to_vec::<f32>().expect("f32 weights"));
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

struct Losses(Vec<f64>);

impl Observer for Losses {
    fn on_step(&mut self, m: &StepMetrics) -> thinkjson_sft::Control {
        self.0.push(m.loss);
        thinkjson_sft::Control::Continue
    }
}

fn assert_two_peers_equal_one(lora: Option<LoraConfig>) {
    let data = examples(20);
    let tok = tokenizer();
    let solo_dir = tempfile::tempdir().expect("tmp");
    let mut solo_losses = Losses(Vec::new());
    let (solo, _) = train(model(), &tok, &data, &[], &run(solo_dir.path(), config(lora.clone())), &mut solo_losses).expect("one peer");

    let dir = tempfile::tempdir().expect("tmp");
    let spec = run(dir.path(), config(lora.clone()));
    let devices = vec![Default::default(); 2];
    let outcomes = run_in_process::<Inner, _, _, _>(&devices, |rank, _device, peer| {
        let mut losses = Losses(Vec::new());
        let observer: &mut dyn Observer = if rank == 0 { &mut losses } else { &mut () };
        let (trained, summary) = train_data_parallel(model(), &tok, &data, &[], &spec, observer, peer)?;
        Ok::<_, SftError>((weights(&trained), summary.last_step, losses.0))
    })
    .expect("two peers");
    let what = if lora.is_some() { "LoRA" } else { "full" };
    let solo_weights = weights(&solo);
    assert!(solo_weights.iter().zip(&weights(&model())).any(|(a, b)| (a - b).abs() > 1e-4), "{what}: training moved the weights");
    for (rank, (w, last_step, _)) in outcomes.iter().enumerate() {
        assert_eq!(*last_step, 3, "{what}: rank {rank} ran 3 optimiser steps");
        assert_eq!(w.len(), solo_weights.len());
        let diff = w.iter().zip(&solo_weights).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-5, "{what}: rank {rank}'s weights differ from one peer's by {diff}");
    }
    assert_eq!(outcomes[0].0, outcomes[1].0, "{what}: the two peers hold bit-identical weights");
    // Rank 0 reports the global loss of each step: the one peer's.
    assert_eq!(outcomes[0].2.len(), 3);
    for (a, b) in outcomes[0].2.iter().zip(&solo_losses.0) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{what}: step loss {a} on two peers vs {b} on one");
    }
    assert!(outcomes[1].2.is_empty(), "only rank 0 reports");
}

#[test]
fn two_peers_with_half_of_each_step_train_the_weights_of_one_peer() {
    assert_two_peers_equal_one(None);
    assert_two_peers_equal_one(Some(LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() }));
}

#[test]
fn only_rank_zero_writes_checkpoints() {
    let data = examples(20);
    let tok = tokenizer();
    // Each rank gets its own checkpoint root, so a write by rank 1 would show.
    let dirs = [tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp")];
    let specs: Vec<SftRun> = dirs.iter().map(|d| run(d.path(), SftConfig { save_every: 1, ..config(None) })).collect();
    let devices = vec![Default::default(); 2];
    run_in_process::<Inner, _, _, _>(&devices, |rank, _, peer| {
        train_data_parallel(model(), &tok, &data, &[], &specs[rank], &mut (), peer)?;
        Ok::<_, SftError>(())
    })
    .expect("two peers");
    let steps = |d: &tempfile::TempDir| -> Vec<u64> { Checkpoints::new(d.path(), 0).list().expect("list").into_iter().map(|(s, _)| s).collect() };
    assert_eq!(steps(&dirs[0]), vec![1, 2, 3]);
    assert!(steps(&dirs[1]).is_empty(), "rank 1 wrote checkpoints");
}

/// Rank 0's observer stops the group after step 3 (as a kill would: the last checkpoint is
/// step 2's); a `--resume` of both peers then ends with the weights of the uninterrupted
/// two-peer run, having run steps 3 and 4 only.
#[test]
fn two_peers_stop_together_and_resume_exactly() {
    struct StopAt(u64, Vec<u64>);
    impl Observer for StopAt {
        fn on_step(&mut self, m: &StepMetrics) -> thinkjson_sft::Control {
            self.1.push(m.step);
            if m.step == self.0 {
                thinkjson_sft::Control::Stop
            } else {
                thinkjson_sft::Control::Continue
            }
        }
    }
    let data = examples(20);
    let tok = tokenizer();
    let cfg = SftConfig { max_steps: Some(4), save_every: 2, ..config(None) };
    let devices = vec![Default::default(); 2];
    let group = |dir: &std::path::Path, resume: bool, stop_at: u64| {
        let spec = SftRun { resume, ..run(dir, cfg.clone()) };
        run_in_process::<Inner, _, _, _>(&devices, |rank, _, peer| {
            let mut obs = StopAt(stop_at, Vec::new());
            let observer: &mut dyn Observer = if rank == 0 { &mut obs } else { &mut () };
            let (trained, summary) = train_data_parallel(model(), &tok, &data, &[], &spec, observer, peer)?;
            Ok::<_, SftError>((weights(&trained), summary.last_step, summary.stopped_early, obs.1))
        })
        .expect("two peers")
    };
    let whole_dir = tempfile::tempdir().expect("tmp");
    let whole = group(whole_dir.path(), false, 0);
    let dir = tempfile::tempdir().expect("tmp");
    let first = group(dir.path(), false, 3);
    for (rank, (_, last, stopped, _)) in first.iter().enumerate() {
        assert_eq!((*last, *stopped), (3, true), "rank {rank} stopped with rank 0 after step 3");
    }
    let second = group(dir.path(), true, 0);
    assert_eq!(second[0].3, vec![3, 4], "the resumed run did steps 3 and 4 only");
    for (rank, (w, last, _, _)) in second.iter().enumerate() {
        assert_eq!(*last, 4);
        let diff = w.iter().zip(&whole[0].0).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-6, "rank {rank}: resumed weights differ from the uninterrupted run by {diff}");
    }
}

/// A peer whose step failed still joins the reduction with its flag set: it keeps its own
/// error and every other peer gets one naming it, instead of waiting forever.
#[test]
fn a_failed_peer_stops_every_peer_with_its_rank() {
    let devices = vec![Default::default(); 3];
    let outcomes = run_in_process::<Inner, _, _, _>(&devices, |rank, _, peer: &mut dyn Collective<Inner>| {
        let m = model();
        let reduced = all_reduce_step(&m, GradientsParams::new(), StepTotals::default(), rank == 1, peer);
        Ok::<_, ModelError>(reduced.err().map(|e| e.to_string()))
    })
    .expect("the group itself ran");
    for (rank, outcome) in outcomes.iter().enumerate() {
        let message = outcome.as_deref().unwrap_or_else(|| panic!("rank {rank} must fail"));
        assert!(message.contains("[1]"), "rank {rank}: {message}");
    }
}

#[test]
fn drifted_weights_are_caught() {
    let devices = vec![Default::default(); 2];
    let outcomes = run_in_process::<Inner, _, _, _>(&devices, |rank, _, peer| {
        let same = check_in_sync(&model(), peer).is_ok();
        let drifted_model = if rank == 1 { CausalLm::random(&ModelConfig::preset("tiny").expect("tiny").with_vocab_size(96), 4, &Default::default())? } else { model() };
        let drift = check_in_sync(&drifted_model, peer).err().map(|e| e.to_string());
        Ok::<_, ModelError>((same, drift))
    })
    .expect("group");
    for (rank, (same, drift)) in outcomes.iter().enumerate() {
        assert!(same, "rank {rank}: identical models pass");
        let message = drift.as_deref().unwrap_or_else(|| panic!("rank {rank}: the drift must be caught"));
        assert!(message.contains("[1]") && message.contains("drifted"), "{message}");
    }
}

mod grpo {
    use super::{common, weights, Inner, B};
    use thinkjson_grpo::{train, train_data_parallel, Control, GrpoConfig, GrpoError, GrpoPrompt, GrpoRun, LossType, Observer, RolloutConstraint, ScaleRewards, StepMetrics};
    use thinkjson_model::lora::LoraConfig;
    use thinkjson_model::train::run_in_process;
    use thinkjson_model::{CausalLm, ModelConfig};
    use thinkjson_reward::RewardSet;

    /// The tiny preset with the Qwen vocabulary (constrained decoding needs every id).
    fn model() -> CausalLm<B> {
        CausalLm::random(&ModelConfig::preset("tiny").expect("tiny"), 4, &Default::default()).expect("model")
    }

    fn prompts(n: usize) -> Vec<GrpoPrompt> {
        common::bool_prompts(n)
    }

    fn rewards() -> RewardSet {
        common::match_only()
    }

    /// 4 prompts per batch in 2 micro-batches: each micro-batch holds one prompt of each
    /// peer, so the loss weights of the whole batch must reach both.
    /// `iterations` updates per batch (μ), three batches.
    fn config(loss_type: LossType, scale_rewards: ScaleRewards, lora: Option<LoraConfig>, beta: f64, iterations: usize) -> GrpoConfig {
        GrpoConfig {
            num_generations: 4,
            prompts_per_step: 4,
            max_steps: 3,
            max_completion_len: 12,
            constraint: RolloutConstraint::JsonSchema,
            // At 1e-2 Adam turns the last-bit differences of the summation order (the peers'
            // sums vs one peer's running sum) into 2e-5 after six updates.
            lr: 3e-3,
            grad_accum: 2,
            num_iterations: iterations,
            loss_type,
            scale_rewards,
            beta,
            lora,
            seed: 3,
            save_every: 0,
            sample_every: 0,
            ..GrpoConfig::default()
        }
    }

    struct Record(Vec<StepMetrics>);
    impl Observer for Record {
        fn on_step(&mut self, m: &StepMetrics) -> Control {
            self.0.push(m.clone());
            Control::Continue
        }
    }

    fn check(config: GrpoConfig, what: &str) {
        let data = prompts(6);
        let tok = super::tokenizer();
        let dir = tempfile::tempdir().expect("tmp");
        let run = GrpoRun { config, checkpoint_root: dir.path().to_path_buf(), extra_files: Vec::new(), resume: false };
        let mut solo_steps = Record(Vec::new());
        let (solo, _) = train(model(), &tok, &data, &rewards(), &run, &mut solo_steps).expect("one peer");
        let solo_weights = weights(&solo);
        assert!(solo_steps.0.iter().any(|m| m.skipped_updates < 2), "{what}: some update happened");
        let devices = vec![Default::default(); 2];
        let dir2 = tempfile::tempdir().expect("tmp");
        let run2 = GrpoRun { checkpoint_root: dir2.path().to_path_buf(), ..run.clone() };
        let outcomes = run_in_process::<Inner, _, _, _>(&devices, |rank, _, peer| {
            let mut rec = Record(Vec::new());
            let observer: &mut dyn Observer = if rank == 0 { &mut rec } else { &mut () };
            let (trained, _) = train_data_parallel(model(), &tok, &data, &rewards(), &run2, observer, peer)?;
            Ok::<_, GrpoError>((weights(&trained), rec.0))
        })
        .expect("two peers");
        assert_ne!(solo_weights, weights(&model()), "{what}: training moved the weights");
        // Rank 0's metrics are the whole batch's: the same completions were drawn and scored.
        for (a, b) in outcomes[0].1.iter().zip(&solo_steps.0) {
            assert!((a.reward_mean - b.reward_mean).abs() < 1e-9, "{what}: step {} reward {} vs {}", a.step, a.reward_mean, b.reward_mean);
            assert_eq!((a.active_tokens, a.skipped_updates), (b.active_tokens, b.skipped_updates), "{what}: step {}", a.step);
            assert!((a.loss - b.loss).abs() <= 1e-5 * b.loss.abs().max(1.0), "{what}: step {} loss {} vs {}", a.step, a.loss, b.loss);
        }
        for (rank, (w, _)) in outcomes.iter().enumerate() {
            let diff = w.iter().zip(&solo_weights).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff <= 1e-5, "{what}: rank {rank}'s weights differ from one peer's by {diff}");
        }
        assert_eq!(outcomes[0].0, outcomes[1].0, "{what}: the peers hold bit-identical weights");
        assert_eq!(outcomes[0].1.len(), 3);
        assert!(outcomes[1].1.is_empty(), "only rank 0 reports");
    }

    #[test]
    fn two_peers_with_half_of_each_batch_train_the_weights_of_one_peer() {
        check(config(LossType::Dapo, ScaleRewards::Group, None, 0.0, 2), "full, dapo, μ 2");
        check(config(LossType::Bnpo, ScaleRewards::Batch, None, 0.0, 1), "full, bnpo, batch-scaled");
        let lora = LoraConfig { r: 4, alpha: 16.0, ..LoraConfig::default() };
        check(config(LossType::Grpo, ScaleRewards::Group, Some(lora), 0.05, 1), "LoRA, grpo, β 0.05");
    }

    /// A peer without a prompt group of its own is refused before any work, on every peer.
    #[test]
    fn fewer_prompt_groups_than_peers_are_refused() {
        let data = prompts(4);
        let tok = super::tokenizer();
        let dir = tempfile::tempdir().expect("tmp");
        let config = GrpoConfig { prompts_per_step: 1, ..config(LossType::Dapo, ScaleRewards::Group, None, 0.0, 1) };
        let run = GrpoRun { config, checkpoint_root: dir.path().to_path_buf(), extra_files: Vec::new(), resume: false };
        let devices = vec![Default::default(); 2];
        let err = run_in_process::<Inner, _, _, _>(&devices, |_, _, peer| {
            train_data_parallel(model(), &tok, &data, &rewards(), &run, &mut (), peer)?;
            Ok::<_, GrpoError>(())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("prompts_per_step") && err.contains("2 peers"), "{err}");
    }
}
