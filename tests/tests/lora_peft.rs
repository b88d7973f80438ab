//! LoRA: parity with PEFT + torch (committed fixtures from scripts/make_lora_fixtures.py),
//! the PEFT format both ways, merging, frozen base weights, refused adapters, and exact
//! kill-and-resume of SFT and GRPO with adapters.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{fixtures, logits_of, max_abs_diff, read_json, to_vec};
use serde_json::json;
use thinkjson_model::burn::module::AutodiffModule;
use thinkjson_model::burn::optim::GradientsParams;
use thinkjson_model::burn::tensor::backend::AutodiffBackend;
use thinkjson_model::burn::tensor::ElementConversion;
use thinkjson_model::train::{AdamW, AdamWConfig, Checkpoints};
use thinkjson_model::{CausalLm, CpuTrainBackend, LoraConfig, ModelConfig, StorageDtype, Tokenizer};
use thinkjson_sft::{completion_loss, MicroBatch, SftExample};

type B = CpuTrainBackend;
type Inner = <B as AutodiffBackend>::InnerBackend;

fn base() -> CausalLm<B> {
    CausalLm::from_pretrained(&fixtures().join("qwen2-small"), &Default::default()).expect("base model")
}

fn with_fixture_adapter() -> CausalLm<B> {
    base().load_adapter(&fixtures().join("lora/adapter")).expect("PEFT adapter")
}

fn examples(fx: &serde_json::Value) -> Vec<SftExample> {
    fx["examples"]
        .as_array()
        .expect("examples")
        .iter()
        .map(|e| SftExample {
            id: String::new(),
            prompt: serde_json::from_value(e["prompt"].clone()).expect("prompt"),
            completion: serde_json::from_value(e["completion"].clone()).expect("completion"),
        })
        .collect()
}

/// PEFT-layout tensors of a safetensors fixture: key → (shape, values).
fn read_st(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let vals = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (k, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// `[rows, cols]` row-major → its transpose.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// Our adapter tensor (burn layout) compared with a PEFT-layout one.
fn assert_close_peft(name: &str, ours_burn: Vec<f32>, burn_dims: [usize; 2], peft: &(Vec<usize>, Vec<f32>), tol: f32) {
    assert_eq!(peft.0, vec![burn_dims[1], burn_dims[0]], "{name}: shape");
    let ours = transpose(&ours_burn, burn_dims[0], burn_dims[1]);
    let d = max_abs_diff(&ours, &peft.1);
    assert!(d <= tol, "{name}: max |Δ| {d} > {tol}");
}

#[test]
fn peft_adapter_gives_peft_logits() {
    let fx = read_json(&fixtures().join("lora/parity.json"));
    let tokens: Vec<u32> = serde_json::from_value(fx["logit_tokens"].clone()).expect("tokens");
    let expected: Vec<f32> = fx["logits"].as_array().expect("rows").iter().flat_map(|r| serde_json::from_value::<Vec<f32>>(r.clone()).expect("row")).collect();
    let ours = logits_of(&with_fixture_adapter().valid(), &tokens);
    let d = max_abs_diff(&ours, &expected);
    assert!(d < 1e-5, "logits differ from PEFT's by {d}");
    // The adapter matters: the base alone is far from these logits.
    let plain = logits_of(&base().valid(), &tokens);
    assert!(max_abs_diff(&plain, &expected) > 1e-2, "the fixture adapter should change the logits");
}

#[test]
fn loss_gradients_and_three_adamw_steps_match_peft_and_torch() {
    let fx = read_json(&fixtures().join("lora/parity.json"));
    let data = examples(&fx);
    let t = &fx["train"];
    let losses: Vec<f64> = serde_json::from_value(t["losses"].clone()).expect("losses");
    let norms: Vec<f64> = serde_json::from_value(t["grad_norms"].clone()).expect("norms");
    let grads_fx = read_st(&fixtures().join("lora/grads.safetensors"));
    let after_fx = read_st(&fixtures().join("lora/after.safetensors"));
    let batch = MicroBatch::build(&data, &[vec![0], vec![1], vec![2]], 0, false).expect("batch");
    let mut model = with_fixture_adapter();
    let mut opt = AdamW::<B>::new(AdamWConfig {
        weight_decay: t["weight_decay"].as_f64().expect("wd"),
        max_grad_norm: t["max_grad_norm"].as_f64(),
        ..AdamWConfig::default()
    });
    let lr = t["lr"].as_f64().expect("lr");
    for (step, (want_loss, want_norm)) in losses.iter().zip(&norms).enumerate() {
        let loss = completion_loss(&model, &batch, batch.targets.len(), 8).expect("loss");
        let value = loss.clone().into_scalar().elem::<f64>();
        assert!((value - want_loss).abs() < 1e-5, "step {step}: loss {value} vs PEFT {want_loss}");
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        if step == 0 {
            let params = model.adapter_params();
            assert_eq!(params.len(), grads_fx.len(), "one gradient per adapter tensor");
            for (name, p) in &params {
                let g = grads.get::<Inner, 2>(p.id).unwrap_or_else(|| panic!("{name}: no gradient"));
                let dims = g.dims();
                assert_close_peft(name, to_vec(g), dims, &grads_fx[name], 1e-5);
            }
        }
        let (next, report) = opt.step(lr, model, grads).expect("step");
        model = next;
        assert!((report.grad_norm - want_norm).abs() < 1e-5, "step {step}: grad norm {} vs torch {want_norm}", report.grad_norm);
    }
    for (name, p) in model.adapter_params() {
        let v = p.val();
        let dims = v.dims();
        assert_close_peft(&name, to_vec(v), dims, &after_fx[&name], 1e-5);
    }
}

#[test]
fn saved_adapters_round_trip_and_merging_keeps_the_logits() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = with_fixture_adapter().valid();
    model.save_adapter(dir.path(), Some("fixtures/qwen2-small")).expect("save adapter");
    let cfg: serde_json::Value = read_json(&dir.path().join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let reloaded = CausalLm::<Inner>::from_pretrained(&fixtures().join("qwen2-small"), &Default::default())
        .expect("base")
        .load_adapter(dir.path())
        .expect("our adapter loads");
    // The saved tensors are PEFT's, key for key and bit for bit.
    let ours = read_st(&dir.path().join("adapter_model.safetensors"));
    let theirs = read_st(&fixtures().join("lora/adapter/adapter_model.safetensors"));
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (k, v) in &ours {
        assert_eq!(v, &theirs[k], "{k}");
    }
    let tokens = [3u32, 14, 15, 92, 65, 35];
    let adapted = logits_of(&reloaded, &tokens);
    let merged = reloaded.merge_lora();
    assert!(merged.lora_config().is_none());
    let d = max_abs_diff(&logits_of(&merged, &tokens), &adapted);
    assert!(d < 1e-4, "merged vs adapter logits: {d}");
    // The merged model saves as a plain HF model and loads back the same.
    let full = tempfile::tempdir().expect("tmp");
    merged.save_pretrained(full.path(), StorageDtype::Float32).expect("save merged");
    let loaded = CausalLm::<Inner>::from_pretrained(full.path(), &Default::default()).expect("load merged");
    assert!(max_abs_diff(&logits_of(&loaded, &tokens), &adapted) < 1e-4);
    // A model with adapters does not save as if it were the base.
    let err = with_fixture_adapter().save_pretrained(full.path(), StorageDtype::Float32).unwrap_err().to_string();
    assert!(err.contains("LoRA"), "{err}");
}

#[test]
fn fresh_adapters_leave_outputs_unchanged_and_train_only_themselves() {
    let config = LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() };
    let model = base().with_lora(&config, 7).expect("lora");
    let tokens = [5u32, 6, 7, 8, 9];
    assert_eq!(logits_of(&model.valid(), &tokens), logits_of(&base().valid(), &tokens), "B = 0: outputs unchanged");
    // 2 layers × 7 projections × r·(in + out).
    let c = model.config().clone();
    let (h, q, kv, f) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size);
    let per_layer = 4 * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h));
    assert_eq!(model.trainable_parameters(), c.num_hidden_layers * per_layer);
    // Only adapters get gradients.
    let data = vec![SftExample { id: "a".into(), prompt: vec![3, 4, 5], completion: vec![6, 7, 2] }];
    let batch = MicroBatch::build(&data, &[vec![0]], 0, false).expect("batch");
    let loss = completion_loss(&model, &batch, batch.targets.len(), 8).expect("loss");
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    assert_eq!(grads.len(), model.adapter_params().len(), "gradients exist for adapter tensors only");
    // A bad setting is refused by name.
    let err = base().with_lora(&LoraConfig { target_modules: vec!["qkv_proj".into()], ..config.clone() }, 1).unwrap_err().to_string();
    assert!(err.contains("qkv_proj"), "{err}");
    let err = base().with_lora(&LoraConfig { r: 0, ..config }, 1).unwrap_err().to_string();
    assert!(err.contains("lora.r"), "{err}");
}

/// Writes a copy of the fixture adapter whose config is `edit`ed.
fn adapter_with(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    let src = fixtures().join("lora/adapter");
    std::fs::copy(src.join("adapter_model.safetensors"), dir.path().join("adapter_model.safetensors")).expect("copy");
    let mut cfg = read_json(&src.join("adapter_config.json"));
    edit(&mut cfg);
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).expect("write");
    dir
}

fn load_err(dir: &Path, onto: &Path) -> String {
    match CausalLm::<Inner>::from_pretrained(onto, &Default::default()).expect("base").load_adapter(dir) {
        Ok(_) => panic!("{} loaded onto {}", dir.display(), onto.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn adapters_for_another_base_or_with_bad_configs_are_refused_with_the_reason() {
    let qwen = fixtures().join("qwen2-small");
    let adapter = fixtures().join("lora/adapter");
    // Another base: a model whose projections have other shapes.
    let other = tempfile::tempdir().expect("tmp");
    let mut cfg = ModelConfig::from_file(&qwen).expect("config");
    cfg.intermediate_size = 96;
    CausalLm::<Inner>::random(&cfg, 1, &Default::default()).expect("model").save_pretrained(other.path(), StorageDtype::Float32).expect("save");
    let e = load_err(&adapter, other.path());
    assert!(e.contains("mlp.gate_proj.lora_B.weight") && e.contains("another base model"), "{e}");
    // Another base: fewer layers.
    let short = tempfile::tempdir().expect("tmp");
    let mut one = ModelConfig::from_file(&qwen).expect("config");
    one.num_hidden_layers = 1;
    CausalLm::<Inner>::random(&one, 1, &Default::default()).expect("model").save_pretrained(short.path(), StorageDtype::Float32).expect("save");
    let e = load_err(&adapter, short.path());
    assert!(e.contains("layer 1") && e.contains("1 layers"), "{e}");
    // Targets that do not match the tensors.
    let d = adapter_with(|c| c["target_modules"] = json!(["q_proj", "v_proj"]));
    let e = load_err(d.path(), &qwen);
    assert!(e.contains("not in `target_modules`"), "{e}");
    let d = adapter_with(|c| c["target_modules"] = json!(["q_proj", "fc1"]));
    assert!(load_err(d.path(), &qwen).contains("`fc1`"));
    // Settings we do not implement are refused by name, never ignored.
    for (key, value) in [("use_dora", json!(true)), ("bias", json!("all")), ("modules_to_save", json!(["lm_head"])), ("rank_pattern", json!({"q_proj": 8})), ("some_future_variant", json!({"x": 1}))] {
        let d = adapter_with(|c| c[key] = value.clone());
        let e = load_err(d.path(), &qwen);
        assert!(e.contains(&format!("`{key}`")) && e.contains("not supported"), "{key}: {e}");
    }
    let d = adapter_with(|c| c["peft_type"] = json!("IA3"));
    assert!(load_err(d.path(), &qwen).contains("IA3"));
    let d = adapter_with(|c| c["r"] = json!(0));
    assert!(load_err(d.path(), &qwen).contains("`r`"));
    // Malformed JSON names the file.
    let d = adapter_with(|_| {});
    std::fs::write(d.path().join("adapter_config.json"), "{\"peft_type\": \"LORA\", ").expect("write");
    let e = load_err(d.path(), &qwen);
    assert!(e.contains("adapter_config.json") && e.contains("invalid JSON"), "{e}");
    // A missing tensor is named.
    let d = tempfile::tempdir().expect("tmp");
    std::fs::copy(adapter.join("adapter_config.json"), d.path().join("adapter_config.json")).expect("copy");
    let mut tensors = read_st(&adapter.join("adapter_model.safetensors"));
    tensors.remove("base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight");
    let blobs: Vec<(String, Vec<usize>, Vec<u8>)> = tensors.into_iter().map(|(k, (s, v))| (k, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = blobs
        .iter()
        .map(|(k, s, b)| (k.as_str(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, &d.path().join("adapter_model.safetensors")).expect("write");
    let e = load_err(d.path(), &qwen);
    assert!(e.contains("layers.1.self_attn.o_proj.lora_A.weight") && e.contains("missing"), "{e}");
}

mod resume {
    use super::*;
    use thinkjson_sft::{train, Control, Observer, SftConfig, SftRun, StepMetrics};

    fn data(n: usize) -> Vec<SftExample> {
        (0..n)
            .map(|i| SftExample {
                id: format!("ex{i}"),
                prompt: (0..3 + i % 5).map(|j| ((i * 31 + j * 7) % 90 + 3) as u32).collect(),
                completion: (0..2 + (i * 7) % 4).map(|j| ((i * 13 + j * 11) % 90 + 3) as u32).collect(),
            })
            .collect()
    }

    fn config() -> SftConfig {
        SftConfig {
            lr: 1e-2,
            warmup_ratio: 0.2,
            epochs: 2,
            batch_size: 2,
            grad_accum: 2,
            max_len: 32,
            save_every: 2,
            keep_last: 0,
            eval_generations: 0,
            seed: 5,
            // Dropout draws from the backend's generator: the resume must redraw the same.
            lora: Some(LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, ..LoraConfig::default() }),
            ..SftConfig::default()
        }
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

    fn run(dir: &Path, resume: bool) -> SftRun {
        SftRun { config: config(), checkpoint_root: dir.to_path_buf(), extra_files: Vec::new(), resume }
    }

    fn tok() -> Tokenizer {
        Tokenizer::from_path(&common::assets().join("qwen")).expect("tokenizer")
    }

    /// The base's tensors as saved, byte for byte.
    fn base_bytes(model: &CausalLm<B>) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tmp");
        model.valid().without_lora().save_pretrained(dir.path(), StorageDtype::Float32).expect("save base");
        std::fs::read(dir.path().join("model.safetensors")).expect("read")
    }

    #[test]
    fn sft_with_lora_resumes_exactly_keeps_the_base_and_checkpoints_only_the_adapter() {
        let examples = data(11);
        let whole_dir = tempfile::tempdir().expect("tmp");
        let mut whole = Record { losses: Vec::new(), stop_after: None };
        let before = base_bytes(&base());
        let (trained, _) = train(base(), &tok(), &examples, &[], &run(whole_dir.path(), false), &mut whole).expect("train");
        assert_eq!(whole.losses.len(), 6);
        assert!(whole.losses[5] < whole.losses[0], "the adapter learns: {:?}", whole.losses);
        assert_eq!(base_bytes(&trained), before, "base weights are bit-identical after a LoRA run");
        // Checkpoints hold the adapter (PEFT format) and its optimiser state, not the model.
        let (_, last) = Checkpoints::new(whole_dir.path(), 0).latest().expect("list").expect("checkpoint");
        assert!(last.join("adapter_config.json").exists() && last.join("adapter_model.safetensors").exists());
        assert!(!last.join("model.safetensors").exists(), "no full model in a LoRA checkpoint");
        let reloaded = base().valid().load_adapter(&last).expect("the checkpoint is a PEFT adapter");
        let tokens = [3u32, 9, 27, 81];
        assert!(max_abs_diff(&logits_of(&reloaded, &tokens), &logits_of(&trained.valid(), &tokens)) < 1e-6);

        let dir = tempfile::tempdir().expect("tmp");
        let mut first = Record { losses: Vec::new(), stop_after: Some(5) };
        train(base(), &tok(), &examples, &[], &run(dir.path(), false), &mut first).expect("first");
        let mut second = Record { losses: Vec::new(), stop_after: None };
        let (resumed, s2) = train(base(), &tok(), &examples, &[], &run(dir.path(), true), &mut second).expect("resume");
        assert_eq!(s2.info.start_step, 4);
        for (i, (a, b)) in second.losses.iter().zip(&whole.losses[4..]).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "step {}: resumed {a} vs uninterrupted {b}", i + 5);
        }
        let w: Vec<f32> = trained.adapter_params().into_iter().flat_map(|(_, p)| to_vec(p.val())).collect();
        let r: Vec<f32> = resumed.adapter_params().into_iter().flat_map(|(_, p)| to_vec(p.val())).collect();
        assert!(max_abs_diff(&w, &r) <= 1e-6, "adapter weights after resume differ by {}", max_abs_diff(&w, &r));
    }
}
