//! SFT: loss and optimiser parity with transformers/torch, completion-only masking, learning
//! on synthetic data, and kill-and-resume.

mod common;

use std::path::Path;

use common::{assets, fixtures, logits_of, max_abs_diff, read_json};
use thinkjson_model::burn::module::AutodiffModule;
use thinkjson_model::burn::optim::GradientsParams;
use thinkjson_model::burn::tensor::{ElementConversion, Tensor, TensorData};
use thinkjson_model::train::{AdamW, AdamWConfig, Checkpoints};
use thinkjson_model::{CausalLm, CpuTrainBackend, ModelConfig, Tokenizer};
use thinkjson_sft::{completion_loss, train, Control, Encoder, MicroBatch, Observer, SftConfig, SftError, SftExample, SftRun, StepMetrics};

type B = CpuTrainBackend;

fn scalar(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

fn parity_examples(fx: &serde_json::Value) -> Vec<SftExample> {
    fx["examples"]
        .as_array()
        .expect("examples")
        .iter()
        .map(|e| SftExample {
            id: String::new(),
            prompt: serde_json::from_value(e["prompt"].clone()).expect("prompt ids"),
            completion: serde_json::from_value(e["completion"].clone()).expect("completion ids"),
        })
        .collect()
}

fn loss_of(model: &CausalLm<B>, examples: &[SftExample], rows: &[Vec<usize>], packed: bool) -> f64 {
    let batch = MicroBatch::build(examples, rows, 0, packed).expect("batch");
    scalar(completion_loss(model, &batch, batch.targets.len(), 7).expect("loss"))
}

#[test]
fn completion_loss_equals_transformers_with_prompt_labels_masked() {
    let fx = read_json(&fixtures().join("sft/parity.json"));
    let examples = parity_examples(&fx);
    let model = CausalLm::<B>::from_pretrained(&fixtures().join("qwen2-small"), &Default::default()).expect("model");
    let expected = fx["loss"].as_f64().expect("loss");
    let rows: Vec<Vec<usize>> = (0..examples.len()).map(|i| vec![i]).collect();
    let padded = loss_of(&model, &examples, &rows, false);
    assert!((padded - expected).abs() < 1e-5, "padded batch: ours {padded}, transformers {expected}");
    // Packing all three into one row gives the same loss: no attention across examples.
    let packed = loss_of(&model, &examples, &[vec![0, 1, 2]], true);
    assert!((packed - expected).abs() < 1e-5, "packed: ours {packed}, transformers {expected}");
}

#[test]
fn prompt_labels_and_padding_do_not_change_the_loss() {
    let fx = read_json(&fixtures().join("sft/parity.json"));
    let examples = parity_examples(&fx);
    let model = CausalLm::<B>::from_pretrained(&fixtures().join("qwen2-small"), &Default::default()).expect("model");
    // Every target is a completion token, one per completion token, nothing from the prompt.
    let batch = MicroBatch::build(&examples, &[vec![0], vec![1], vec![2]], 0, false).expect("batch");
    let expected_targets: Vec<u32> = examples.iter().flat_map(|e| e.completion.clone()).collect();
    assert_eq!(batch.targets, expected_targets);
    for (&p, &t) in batch.positions.iter().zip(&batch.targets) {
        let (row, pos) = (p / batch.tokens.seq, p % batch.tokens.seq);
        let e = &examples[row];
        assert!(pos + 1 >= e.prompt.len(), "target at prompt position {pos} of example {row}");
        assert_eq!(e.completion[pos + 1 - e.prompt.len()], t);
    }
    // A full-sequence loss whose prompt positions carry arbitrary labels, masked out, equals
    // the completion loss — for two different sets of prompt labels.
    let n = batch.tokens.batch * batch.tokens.seq;
    let masked_loss = |garbage: u32| -> f64 {
        let mut labels = vec![garbage; n];
        let mut weight = vec![0.0f32; n];
        for (&p, &t) in batch.positions.iter().zip(&batch.targets) {
            labels[p] = t;
            weight[p] = 1.0;
        }
        let lp = model.token_logprobs(&batch.tokens, &labels, 8).expect("logprobs");
        let w = Tensor::<B, 2>::from_data(TensorData::new(weight, [batch.tokens.batch, batch.tokens.seq]), &Default::default());
        -scalar((lp * w).sum()) / batch.targets.len() as f64
    };
    let reference = scalar(completion_loss(&model, &batch, batch.targets.len(), 8).expect("loss"));
    for garbage in [3, 77] {
        assert!((masked_loss(garbage) - reference).abs() < 1e-5);
    }
    // Padding: each example alone (no pads) sums to the padded batch's sum.
    let sum_alone: f64 = (0..examples.len())
        .map(|i| {
            let b = MicroBatch::build(&examples, &[vec![i]], 0, false).expect("batch");
            scalar(completion_loss(&model, &b, 1, 8).expect("loss"))
        })
        .sum();
    let sum_padded = scalar(completion_loss(&model, &batch, 1, 8).expect("loss"));
    assert!((sum_alone - sum_padded).abs() < 1e-4, "alone {sum_alone} vs padded {sum_padded}");
}

#[test]
fn adamw_steps_match_torch() {
    let fx = read_json(&fixtures().join("sft/parity.json"));
    let examples = parity_examples(&fx);
    let t = &fx["train"];
    let mut model = CausalLm::<B>::from_pretrained(&fixtures().join("qwen2-small"), &Default::default()).expect("model");
    let mut opt = AdamW::<B>::new(AdamWConfig {
        weight_decay: t["weight_decay"].as_f64().expect("wd"),
        max_grad_norm: t["max_grad_norm"].as_f64(),
        ..AdamWConfig::default()
    });
    let lr = t["lr"].as_f64().expect("lr");
    let batch = MicroBatch::build(&examples, &[vec![0], vec![1], vec![2]], 0, false).expect("batch");
    let losses: Vec<f64> = serde_json::from_value(t["losses"].clone()).expect("losses");
    let norms: Vec<f64> = serde_json::from_value(t["grad_norms"].clone()).expect("norms");
    for (step, (want_loss, want_norm)) in losses.iter().zip(&norms).enumerate() {
        let loss = completion_loss(&model, &batch, batch.targets.len(), 8).expect("loss");
        let value = scalar(loss.clone());
        assert!((value - want_loss).abs() < 1e-5, "step {step}: loss {value} vs torch {want_loss}");
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (next, report) = opt.step(lr, model, grads).expect("step");
        model = next;
        assert!(
            (report.grad_norm - want_norm).abs() < 1e-4 * want_norm.max(1.0),
            "step {step}: grad norm {} vs torch {want_norm}",
            report.grad_norm
        );
        assert!(report.clip_scale < 1.0, "the fixture's norm limit clips");
    }
    let after = loss_of(&model, &examples, &[vec![0], vec![1], vec![2]], false);
    let want = t["loss_after"].as_f64().expect("loss_after");
    assert!((after - want).abs() < 1e-4, "after 3 steps: {after} vs torch {want}");
}

/// Small random examples for the resume tests (vocab 96, like the fixture model).
fn random_examples(n: usize) -> Vec<SftExample> {
    (0..n)
        .map(|i| {
            let p = 3 + i % 5;
            let c = 2 + (i * 7) % 4;
            SftExample {
                id: format!("ex{i}"),
                prompt: (0..p).map(|j| ((i * 31 + j * 7) % 90 + 3) as u32).collect(),
                completion: (0..c).map(|j| ((i * 13 + j * 11) % 90 + 3) as u32).collect(),
            }
        })
        .collect()
}

fn small_model(seed: u64) -> CausalLm<B> {
    let config = ModelConfig::preset("tiny").expect("tiny").with_vocab_size(96);
    CausalLm::random(&config, seed, &Default::default()).expect("model")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_path(&assets().join("qwen")).expect("tokenizer")
}

struct Record {
    losses: Vec<f64>,
    stop_after: Option<u64>,
}

impl Observer for Record {
    fn on_step(&mut self, m: &StepMetrics) -> Control {
        self.losses.push(m.loss);
        if Some(m.step) == self.stop_after {
            Control::Stop
        } else {
            Control::Continue
        }
    }
}

fn resume_config() -> SftConfig {
    SftConfig {
        lr: 3e-3,
        warmup_ratio: 0.2,
        epochs: 2,
        batch_size: 2,
        grad_accum: 2,
        max_len: 32,
        save_every: 2,
        keep_last: 2,
        eval_generations: 0,
        seed: 5,
        ..SftConfig::default()
    }
}

fn run_in(dir: &Path, config: SftConfig, resume: bool) -> SftRun {
    SftRun {
        config,
        checkpoint_root: dir.to_path_buf(),
        extra_files: Vec::new(),
        resume,
    }
}

#[test]
fn kill_and_resume_reproduces_the_uninterrupted_run() {
    let data = random_examples(11);
    let tok = tokenizer();
    let whole_dir = tempfile::tempdir().expect("tmp");
    let mut whole = Record { losses: Vec::new(), stop_after: None };
    let (_, summary) = train(small_model(1), &tok, &data, &[], &run_in(whole_dir.path(), resume_config(), false), &mut whole).expect("train");
    // 11 examples → 6 micro-batches → 3 steps per epoch, 2 epochs.
    assert_eq!(summary.info.total_steps, 6);
    assert_eq!(whole.losses.len(), 6);
    let kept = Checkpoints::new(whole_dir.path(), 2).list().expect("list");
    assert_eq!(kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 6], "keeps the last 2");

    // Killed after step 5 (last checkpoint: step 4), then resumed from a different init.
    let dir = tempfile::tempdir().expect("tmp");
    let mut first = Record { losses: Vec::new(), stop_after: Some(5) };
    let (_, s1) = train(small_model(1), &tok, &data, &[], &run_in(dir.path(), resume_config(), false), &mut first).expect("train");
    assert!(s1.stopped_early);
    let mut second = Record { losses: Vec::new(), stop_after: None };
    let (_, s2) = train(small_model(99), &tok, &data, &[], &run_in(dir.path(), resume_config(), true), &mut second).expect("resume");
    assert_eq!(s2.info.start_step, 4);
    assert_eq!(second.losses.len(), 2);
    for (i, (a, b)) in second.losses.iter().zip(&whole.losses[4..]).enumerate() {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "step {}: resumed {a} vs uninterrupted {b}", i + 5);
    }
    // The checkpoint is a plain HF model directory.
    let (_, last) = Checkpoints::new(dir.path(), 0).latest().expect("list").expect("a checkpoint");
    let reloaded = CausalLm::<B>::from_pretrained(&last, &Default::default()).expect("reload");
    assert_eq!(reloaded.config().vocab_size, 96);

    // A fresh run over existing checkpoints is refused rather than mixed with them.
    let err = train(small_model(1), &tok, &data, &[], &run_in(dir.path(), resume_config(), false), &mut ()).unwrap_err();
    assert!(err.to_string().contains("already holds a checkpoint"), "{err}");

    // A resume with another plan is refused, naming the reason.
    let other = SftConfig { batch_size: 3, ..resume_config() };
    let err = train(small_model(1), &tok, &data, &[], &run_in(dir.path(), other, true), &mut ()).unwrap_err();
    assert!(matches!(err, SftError::Resume(_)), "{err}");
}

#[test]
fn non_finite_values_stop_the_run_and_keep_the_last_checkpoint() {
    let data = random_examples(6);
    let dir = tempfile::tempdir().expect("tmp");
    let config = SftConfig {
        lr: 1e30,
        warmup_ratio: 0.0,
        max_steps: Some(6),
        save_every: 1,
        optimizer: AdamWConfig { max_grad_norm: None, ..AdamWConfig::default() },
        ..resume_config()
    };
    let err = train(small_model(1), &tokenizer(), &data, &[], &run_in(dir.path(), config, false), &mut ()).unwrap_err();
    assert!(matches!(err, SftError::NonFinite { .. }), "{err}");
    assert!(err.to_string().contains("not finite"), "{err}");
    let (step, last) = Checkpoints::new(dir.path(), 0).latest().expect("list").expect("a checkpoint before the failure");
    assert!(step >= 1);
    CausalLm::<B>::from_pretrained(&last, &Default::default()).expect("the last checkpoint loads");
}

#[test]
fn training_loss_falls_on_synthetic_data_with_the_tiny_preset() {
    let tok = tokenizer();
    let template = thinkjson_model::ChatTemplate::from_tokenizer_config(&assets().join("qwen")).expect("template");
    let rows = thinkjson_synth::generate(thinkjson_synth::SynthConfig { rows: 24, seed: 3, ..Default::default() }).expect("rows");
    let encoder = Encoder::new(&tok, &template, 768).expect("encoder");
    let (examples, report) = encoder.encode_rows(&rows).expect("encode");
    assert!(examples.len() >= 16, "{report:?}");
    let config = ModelConfig::preset("tiny").expect("tiny").with_vocab_size(tok.vocab_size());
    let model = CausalLm::<B>::random(&config, 0, &Default::default()).expect("model");
    let dir = tempfile::tempdir().expect("tmp");
    let sft = SftConfig {
        lr: 3e-3,
        warmup_ratio: 0.1,
        max_steps: Some(20),
        batch_size: 1,
        max_len: 768,
        save_every: 0,
        eval_generations: 1,
        eval_max_new_tokens: 8,
        seed: 1,
        ..SftConfig::default()
    };
    let mut rec = Record { losses: Vec::new(), stop_after: None };
    let (trained, summary) = train(model, &tok, &examples, &examples[..2], &run_in(dir.path(), sft, false), &mut rec).expect("train");
    let head: f64 = rec.losses[..3].iter().sum::<f64>() / 3.0;
    let tail: f64 = rec.losses[15..].iter().sum::<f64>() / 5.0;
    eprintln!("loss: first 3 steps {head:.3}, last 5 {tail:.3}");
    assert!(head > 11.0, "a random model starts near ln(vocab) ≈ 11.9, got {head}");
    assert!(tail < head - 3.0, "loss fell from {head:.3} to only {tail:.3}");
    let eval = summary.final_eval.expect("evaluated at the end");
    assert!(eval.eval_loss < head - 3.0, "held-out loss {} vs start {head}", eval.eval_loss);
    assert_eq!(eval.generations, 1);
    // The trained model generalises to the inner backend used for generation.
    let _inner = trained.valid();
}

/// A token budget cuts each micro-batch into forward/backward passes (every row alone at a
/// budget of 1); the losses and the trained weights stay those of one pass per micro-batch.
#[test]
fn a_token_budget_changes_the_passes_not_the_update() {
    let data = random_examples(11);
    let tok = tokenizer();
    let config = SftConfig { max_steps: Some(3), save_every: 0, ..resume_config() };
    let probe = [3u32, 9, 27, 81, 5];
    let mut runs = Vec::new();
    for budget in [0, 1, 12] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut rec = Record { losses: Vec::new(), stop_after: None };
        let run = run_in(dir.path(), SftConfig { max_tokens_per_pass: budget, ..config.clone() }, false);
        let (model, _) = train(small_model(1), &tok, &data, &[], &run, &mut rec).expect("train");
        runs.push((budget, rec.losses, logits_of(&model.valid(), &probe)));
    }
    let (_, losses, logits) = &runs[0];
    for (budget, l, g) in &runs[1..] {
        for (a, b) in l.iter().zip(losses) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "budget {budget}: loss {a} vs {b}");
        }
        let d = max_abs_diff(g, logits);
        assert!(d <= 1e-5, "budget {budget}: logits after training differ by {d}");
    }
    assert!(max_abs_diff(logits, &logits_of(&small_model(1).valid(), &probe)) > 1e-3, "training moved the weights");
}
