//! Save/load round trips and the errors bad model directories produce.

mod common;

use std::path::Path;

use common::*;
use thinkjson_model::{CausalLm, CpuBackend, ModelConfig, ModelError, Padding, StorageDtype, TokenBatch};

type B = CpuBackend;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load(dir: &Path) -> Result<CausalLm<B>, ModelError> {
    CausalLm::<B>::from_pretrained(dir, &Default::default())
}

#[test]
fn save_then_load_is_bit_identical() {
    for name in ["qwen2-small", "llama-small"] {
        let src = fixtures().join(name);
        let model = load(&src).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        model.save_pretrained(tmp.path(), StorageDtype::Float32).unwrap();
        let again = load(tmp.path()).unwrap();
        assert_eq!(model.config().clone(), ModelConfig { dtype: StorageDtype::Float32, ..again.config().clone() });
        // Same bytes per tensor as the transformers-written original.
        let a = std::fs::read(src.join("model.safetensors")).unwrap();
        let b = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
        let (a, b) = (
            safetensors_names_and_bytes(&a),
            safetensors_names_and_bytes(&b),
        );
        assert_eq!(a, b, "{name}: tensors differ after a round trip");
        let batch = TokenBatch::new(&[vec![1, 2, 3]], Padding::Right, 0).unwrap();
        assert_eq!(to_vec(model.forward(&batch).unwrap()), to_vec(again.forward(&batch).unwrap()));
        assert!(!tmp.path().join(".model.safetensors.tmp").exists(), "temp file left behind");
    }
}

/// Minimal safetensors reader for the test: header JSON → (name, raw bytes), sorted.
fn safetensors_names_and_bytes(file: &[u8]) -> Vec<(String, Vec<u8>)> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    let data = &file[8 + n..];
    let mut out: Vec<(String, Vec<u8>)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let off: Vec<usize> = serde_json::from_value(v["data_offsets"].clone()).unwrap();
            (k.clone(), data[off[0]..off[1]].to_vec())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn bf16_save_round_trips_through_bf16() {
    let model = load(&fixtures().join("qwen2-small-bf16")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model.save_pretrained(tmp.path(), StorageDtype::Bfloat16).unwrap();
    let a = std::fs::read(fixtures().join("qwen2-small-bf16/model.safetensors")).unwrap();
    let b = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
    assert_eq!(safetensors_names_and_bytes(&a), safetensors_names_and_bytes(&b));
    let cfg = read_json(&tmp.path().join("config.json"));
    assert_eq!(cfg["torch_dtype"], "bfloat16");
}

#[test]
fn sharded_checkpoints_load() {
    // Split the fixture in two shards with an index, as transformers does for large models.
    let src = fixtures().join("qwen2-small");
    let model = load(&src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let tensors = safetensors_names_and_bytes(&bytes);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in tensors.chunks(tensors.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let mut head = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, raw) in part {
            let mut meta = header[name].clone();
            meta["data_offsets"] = serde_json::json!([data.len(), data.len() + raw.len()]);
            head.insert(name.clone(), meta);
            data.extend_from_slice(raw);
            weight_map.insert(name.clone(), serde_json::json!(file));
        }
        let head = serde_json::to_vec(&head).unwrap();
        let mut out = (head.len() as u64).to_le_bytes().to_vec();
        out.extend(head);
        out.extend(data);
        std::fs::write(tmp.path().join(&file), out).unwrap();
    }
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let sharded = load(tmp.path()).unwrap();
    let batch = TokenBatch::new(&[vec![5, 6, 7]], Padding::Right, 0).unwrap();
    assert_eq!(to_vec(model.forward(&batch).unwrap()), to_vec(sharded.forward(&batch).unwrap()));
}

fn err_of(dir: &Path) -> String {
    load(dir).map(|_| ()).unwrap_err().to_string()
}

#[test]
fn bad_model_directories_give_named_errors() {
    let src = fixtures().join("qwen2-small");
    let tmp = tempfile::tempdir().unwrap();

    let missing = tmp.path().join("missing-config");
    std::fs::create_dir_all(&missing).unwrap();
    std::fs::copy(src.join("model.safetensors"), missing.join("model.safetensors")).unwrap();
    assert!(err_of(&missing).contains("config.json"), "{}", err_of(&missing));

    let corrupt = tmp.path().join("corrupt-config");
    copy_dir(&src, &corrupt);
    std::fs::write(corrupt.join("config.json"), "{\"model_type\": \"qwen2\", ").unwrap();
    let e = err_of(&corrupt);
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");

    // Config asks for 3 layers; the file has 2 → the first missing tensor is named.
    let more_layers = tmp.path().join("missing-tensor");
    copy_dir(&src, &more_layers);
    let mut cfg = read_json(&src.join("config.json"));
    cfg["num_hidden_layers"] = 3.into();
    cfg["layer_types"] = serde_json::json!(["full_attention", "full_attention", "full_attention"]);
    std::fs::write(more_layers.join("config.json"), cfg.to_string()).unwrap();
    let e = err_of(&more_layers);
    assert!(e.contains("model.layers.2.self_attn.q_proj.weight") && e.contains("missing"), "{e}");

    let wrong_shape = tmp.path().join("wrong-shape");
    copy_dir(&src, &wrong_shape);
    let mut cfg = read_json(&src.join("config.json"));
    cfg["intermediate_size"] = 100.into();
    std::fs::write(wrong_shape.join("config.json"), cfg.to_string()).unwrap();
    let e = err_of(&wrong_shape);
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("[128, 64]") && e.contains("[100, 64]"), "{e}");

    let garbage = tmp.path().join("garbage-weights");
    copy_dir(&src, &garbage);
    std::fs::write(garbage.join("model.safetensors"), b"not a safetensors file at all").unwrap();
    let e = err_of(&garbage);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");

    let no_weights = tmp.path().join("no-weights");
    std::fs::create_dir_all(&no_weights).unwrap();
    std::fs::copy(src.join("config.json"), no_weights.join("config.json")).unwrap();
    assert!(err_of(&no_weights).contains("model.safetensors"));
}

#[test]
fn out_of_range_token_ids_are_errors() {
    let model = load(&fixtures().join("qwen2-small")).unwrap();
    let batch = TokenBatch::new(&[vec![1, 2], vec![3, 96]], Padding::Right, 0).unwrap();
    let e = model.forward(&batch).map(|_| ()).unwrap_err();
    assert!(
        matches!(e, ModelError::TokenOutOfRange { id: 96, sequence: 1, position: 1, vocab: 96 }),
        "{e}"
    );
    assert!(e.to_string().contains("96"));
    let ok = TokenBatch::new(&[vec![1, 2]], Padding::Right, 0).unwrap();
    let e = model.token_logprobs(&ok, &[1, 500], 4).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("500"), "{e}");
}
