//! Shared helpers for the integration tests (included with `mod common;`).
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;
use thinkjson_model::burn::tensor::{backend::Backend, Tensor};

/// The committed Qwen tokenizer.
pub fn qwen() -> thinkjson_model::Tokenizer {
    thinkjson_model::Tokenizer::from_path(&assets().join("qwen")).expect("qwen tokenizer")
}

/// The `tiny` preset with seeded random weights.
pub fn tiny(seed: u64) -> thinkjson_model::CausalLm<thinkjson_model::CpuBackend> {
    let config = thinkjson_model::ModelConfig::preset("tiny").expect("preset");
    thinkjson_model::CausalLm::random(&config, seed, &Default::default()).expect("model")
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

pub fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets")
}

pub fn read_json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).expect("list of id lists")
}

pub fn floats3(v: &Value) -> Vec<Vec<Vec<f32>>> {
    serde_json::from_value(v.clone()).expect("3-d float list")
}

pub fn floats2(v: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v.clone()).expect("2-d float list")
}

pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data")
}

/// Largest |a - b| over two slices of equal length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The logits of one right-padded sequence: a fingerprint of every weight of `model`.
pub fn logits_of<B: Backend>(model: &thinkjson_model::CausalLm<B>, tokens: &[u32]) -> Vec<f32> {
    let batch = thinkjson_model::TokenBatch::new(&[tokens.to_vec()], thinkjson_model::Padding::Right, 0).expect("batch");
    to_vec(model.forward(&batch).expect("forward"))
}

/// An easy verifiable task: answer `{"ok":true}`; schema-constrained rollouts make every
/// completion valid JSON, and the `match` reward is 1 for `true` and 0 for `false`.
pub fn bool_prompts(n: usize) -> Vec<thinkjson_grpo::GrpoPrompt> {
    let schema = serde_json::json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false});
    (0..n)
        .map(|i| thinkjson_grpo::GrpoPrompt {
            id: format!("p{i}"),
            prompt: (0..4 + i % 3).map(|j| ((i * 17 + j * 5) % 2000 + 3) as u32).collect(),
            schema: schema.clone(),
            reference: Some(serde_json::json!({"ok": true})),
        })
        .collect()
}

/// Rewards the `match` score alone.
pub fn match_only() -> thinkjson_reward::RewardSet {
    let zero = thinkjson_reward::RewardWeights { format: 0.0, json_valid: 0.0, schema: 0.0, field_match: 1.0, noise: 0.0, length: 0.0, feedback: 0.0, ..thinkjson_reward::RewardWeights::default() };
    thinkjson_reward::RewardSet::from_weights(&zero)
}
