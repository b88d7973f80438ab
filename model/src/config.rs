//! Model configuration mirroring Hugging Face `config.json` (transformers v4 and v5 forms).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{ModelError, Result};

/// The decoder families this crate runs. Both are the same pre-norm GQA + SwiGLU design;
/// Qwen2 adds biases on q/k/v.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Qwen2,
    Llama,
}

impl Architecture {
    fn hf_class(self) -> &'static str {
        match self {
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Llama => "LlamaForCausalLM",
        }
    }
    fn model_type(self) -> &'static str {
        match self {
            Self::Qwen2 => "qwen2",
            Self::Llama => "llama",
        }
    }
}

/// How weights are stored on disk (`torch_dtype` / `dtype` in config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageDtype {
    #[default]
    Float32,
    Float16,
    Bfloat16,
}

impl StorageDtype {
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::Float16 => "float16",
            Self::Bfloat16 => "bfloat16",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" | "fp32" => Some(Self::Float32),
            "float16" | "fp16" => Some(Self::Float16),
            "bfloat16" | "bf16" => Some(Self::Bfloat16),
            _ => None,
        }
    }
}

/// Hyper-parameters of a Qwen2/Llama-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (always on for Qwen2; `attention_bias` for Llama).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub dtype: StorageDtype,
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &[
    "qwen2.5-1.5b",
    "deepseek-r1-distill-qwen-1.5b",
    "smollm2-135m",
    "tiny",
];

impl ModelConfig {
    /// A built-in shape. `tiny` is a small Qwen2 for fast CPU runs (vocabulary sized for the
    /// real Qwen tokenizer; use [`ModelConfig::with_vocab_size`] for a trained small one).
    pub fn preset(name: &str) -> Result<Self> {
        let qwen = ModelConfig {
            architecture: Architecture::Qwen2,
            vocab_size: 151_936,
            hidden_size: 1536,
            intermediate_size: 8960,
            num_hidden_layers: 28,
            num_attention_heads: 12,
            num_key_value_heads: 2,
            head_dim: 128,
            max_position_embeddings: 131_072,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            attention_bias: true,
            bos_token_id: Some(151_643),
            eos_token_ids: vec![151_645, 151_643],
            pad_token_id: Some(151_643),
            dtype: StorageDtype::Bfloat16,
        };
        match name {
            "qwen2.5-1.5b" => Ok(qwen),
            "deepseek-r1-distill-qwen-1.5b" => Ok(ModelConfig {
                rope_theta: 10_000.0,
                tie_word_embeddings: false,
                bos_token_id: Some(151_646),
                eos_token_ids: vec![151_643],
                ..qwen
            }),
            "smollm2-135m" => Ok(ModelConfig {
                architecture: Architecture::Llama,
                vocab_size: 49_152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                max_position_embeddings: 8192,
                rope_theta: 100_000.0,
                rms_norm_eps: 1e-5,
                tie_word_embeddings: true,
                attention_bias: false,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
                pad_token_id: Some(2),
                dtype: StorageDtype::Bfloat16,
            }),
            "tiny" => Ok(ModelConfig {
                hidden_size: 128,
                intermediate_size: 384,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 32,
                max_position_embeddings: 4096,
                dtype: StorageDtype::Float32,
                ..qwen
            }),
            other => Err(ModelError::UnknownPreset(
                other.to_string(),
                PRESETS.join(", "),
            )),
        }
    }

    /// The same shape with another vocabulary size (e.g. a small trained tokenizer); special
    /// ids that no longer fit are dropped (the new tokenizer supplies its own).
    pub fn with_vocab_size(mut self, vocab_size: usize) -> Self {
        let fits = |id: &u32| (*id as usize) < vocab_size;
        self.vocab_size = vocab_size;
        self.bos_token_id = self.bos_token_id.filter(fits);
        self.pad_token_id = self.pad_token_id.filter(fits);
        self.eos_token_ids.retain(fits);
        self
    }

    /// Bytes the KV cache keeps per cached position of one sequence (f32 keys and values of
    /// every layer's key/value heads): SmolLM2-135M 46,080, Qwen2.5-1.5B 57,344.
    pub fn kv_bytes_per_position(&self) -> u64 {
        (4 * 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim) as u64
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = h * q + 2 * h * kv + q * h + bias;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }

    /// Reads `config.json` from a model directory (or the file itself).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| ModelError::io(&file, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|cause| ModelError::Json {
            path: file.clone(),
            cause,
        })?;
        Self::from_hf_value(&value)
    }

    /// Parses a Hugging Face config object; rejects what this crate cannot run, naming the field.
    pub fn from_hf_value(v: &Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| ModelError::config("<root>", "expected a JSON object"))?;
        let model_type = str_field(obj, "model_type")?;
        let architecture = match model_type {
            "qwen2" => Architecture::Qwen2,
            "llama" => Architecture::Llama,
            other => {
                return Err(ModelError::config(
                    "model_type",
                    format!("`{other}` is not supported (qwen2, llama)"),
                ))
            }
        };
        reject_unsupported(obj, architecture)?;

        let hidden_size = usize_field(obj, "hidden_size")?;
        let num_attention_heads = usize_field(obj, "num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(ModelError::config(
                "num_attention_heads",
                format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        let num_key_value_heads = match obj.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => usize_field(obj, "num_key_value_heads")?,
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::config(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match obj.get("head_dim") {
            None | Some(Value::Null) => hidden_size / num_attention_heads,
            Some(_) => usize_field(obj, "head_dim")?,
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::config("head_dim", format!("{head_dim} must be even for RoPE")));
        }
        let rope_theta = rope_theta(obj)?;
        let dtype = match obj.get("dtype").or_else(|| obj.get("torch_dtype")) {
            None | Some(Value::Null) => StorageDtype::Float32,
            Some(Value::String(s)) => StorageDtype::parse(s).ok_or_else(|| {
                ModelError::config("torch_dtype", format!("unsupported dtype `{s}`"))
            })?,
            Some(_) => return Err(ModelError::config("torch_dtype", "expected a string")),
        };
        let attention_bias = match architecture {
            Architecture::Qwen2 => true,
            Architecture::Llama => opt_bool(obj, "attention_bias")?.unwrap_or(false),
        };
        Ok(ModelConfig {
            architecture,
            vocab_size: usize_field(obj, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_field(obj, "intermediate_size")?,
            num_hidden_layers: usize_field(obj, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: match obj.get("max_position_embeddings") {
                None | Some(Value::Null) => 32_768,
                Some(_) => usize_field(obj, "max_position_embeddings")?,
            },
            rope_theta,
            rms_norm_eps: opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: opt_bool(obj, "tie_word_embeddings")?.unwrap_or(false),
            attention_bias,
            bos_token_id: id_list(obj, "bos_token_id")?.first().copied(),
            eos_token_ids: id_list(obj, "eos_token_id")?,
            pad_token_id: id_list(obj, "pad_token_id")?.first().copied(),
            dtype,
        })
    }

    /// The `config.json` that transformers loads for this model (v4 keys, which v5 also reads).
    pub fn to_hf_value(&self) -> Value {
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut v = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.dtype.hf_name(),
            "initializer_range": 0.02,
            "use_cache": true,
        });
        if let Some(map) = v.as_object_mut() {
            match self.architecture {
                Architecture::Qwen2 => {
                    map.insert("use_sliding_window".into(), json!(false));
                    map.insert("sliding_window".into(), Value::Null);
                    map.insert("max_window_layers".into(), json!(self.num_hidden_layers));
                }
                Architecture::Llama => {
                    map.insert("attention_bias".into(), json!(self.attention_bias));
                    map.insert("mlp_bias".into(), json!(false));
                    map.insert("rope_scaling".into(), Value::Null);
                }
            }
        }
        v
    }

    /// Checks an input against this config before any tensor is built.
    pub fn check_token(&self, id: u32, sequence: usize, position: usize) -> Result<()> {
        if (id as usize) < self.vocab_size {
            Ok(())
        } else {
            Err(ModelError::TokenOutOfRange {
                id,
                sequence,
                position,
                vocab: self.vocab_size,
            })
        }
    }
}

fn reject_unsupported(obj: &Map<String, Value>, arch: Architecture) -> Result<()> {
    if let Some(act) = obj.get("hidden_act") {
        if act != "silu" {
            return Err(ModelError::config("hidden_act", format!("{act} is not supported (silu)")));
        }
    }
    if obj.get("use_sliding_window") == Some(&Value::Bool(true)) {
        return Err(ModelError::config(
            "use_sliding_window",
            "sliding-window attention is not implemented",
        ));
    }
    if let Some(scaling) = obj.get("rope_scaling") {
        let is_default = scaling.is_null()
            || scaling.get("rope_type").or_else(|| scaling.get("type")) == Some(&json!("default"));
        if !is_default {
            return Err(ModelError::config(
                "rope_scaling",
                format!("{scaling} is not implemented (only plain RoPE)"),
            ));
        }
    }
    if let Some(params) = obj.get("rope_parameters") {
        if let Some(kind) = params.get("rope_type") {
            if kind != "default" {
                return Err(ModelError::config(
                    "rope_parameters.rope_type",
                    format!("{kind} is not implemented (only `default`)"),
                ));
            }
        }
    }
    if arch == Architecture::Llama && opt_bool(obj, "mlp_bias")? == Some(true) {
        return Err(ModelError::config("mlp_bias", "MLP biases are not implemented"));
    }
    Ok(())
}

fn rope_theta(obj: &Map<String, Value>) -> Result<f64> {
    if let Some(t) = opt_f64(obj, "rope_theta")? {
        return Ok(t);
    }
    if let Some(params) = obj.get("rope_parameters").and_then(Value::as_object) {
        if let Some(t) = opt_f64(params, "rope_theta")? {
            return Ok(t);
        }
    }
    Err(ModelError::config(
        "rope_theta",
        "missing (neither `rope_theta` nor `rope_parameters.rope_theta`)",
    ))
}

fn str_field<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a str> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(ModelError::config(field, format!("expected a string, got {other}"))),
        None => Err(ModelError::config(field, "missing")),
    }
}

fn usize_field(obj: &Map<String, Value>, field: &str) -> Result<usize> {
    match obj.get(field) {
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| ModelError::config(field, format!("expected a positive integer, got {v}"))),
        None => Err(ModelError::config(field, "missing")),
    }
}

fn opt_f64(obj: &Map<String, Value>, field: &str) -> Result<Option<f64>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ModelError::config(field, format!("expected a number, got {v}"))),
    }
}

fn opt_bool(obj: &Map<String, Value>, field: &str) -> Result<Option<bool>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ModelError::config(field, format!("expected a boolean, got {v}"))),
    }
}

fn id_list(obj: &Map<String, Value>, field: &str) -> Result<Vec<u32>> {
    let bad = |v: &Value| ModelError::config(field, format!("expected a token id or a list of ids, got {v}"));
    let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad(v));
    match obj.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_v5_forms_agree() {
        let v4 = json!({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "rope_theta": 1e6, "torch_dtype": "bfloat16",
            "eos_token_id": [3, 4]});
        let mut v5 = v4.clone();
        let m = v5.as_object_mut().unwrap();
        m.remove("rope_theta");
        m.remove("torch_dtype");
        m.insert("rope_parameters".into(), json!({"rope_theta": 1e6, "rope_type": "default"}));
        m.insert("dtype".into(), json!("bfloat16"));
        let a = ModelConfig::from_hf_value(&v4).unwrap();
        let b = ModelConfig::from_hf_value(&v5).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.dtype, StorageDtype::Bfloat16);
        assert_eq!(a.eos_token_ids, vec![3, 4]);
        assert_eq!(a.head_dim, 4);
    }

    #[test]
    fn rejects_by_field_name() {
        let base = json!({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_theta": 1e4});
        let cases = [
            ("model_type", json!("mistral")),
            ("use_sliding_window", json!(true)),
            ("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0})),
            ("hidden_act", json!("gelu")),
            ("vocab_size", json!(-3)),
            ("num_key_value_heads", json!(3)),
        ];
        for (field, value) in cases {
            let mut v = base.clone();
            v.as_object_mut().unwrap().insert(field.into(), value);
            let err = ModelConfig::from_hf_value(&v).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(ModelConfig::from_hf_value(&v).unwrap_err().to_string().contains("hidden_size"));
    }

    #[test]
    fn presets_round_trip_through_hf_json() {
        for name in PRESETS {
            let c = ModelConfig::preset(name).unwrap();
            let back = ModelConfig::from_hf_value(&c.to_hf_value()).unwrap();
            assert_eq!(c, back, "{name}");
        }
        let qwen = ModelConfig::preset("qwen2.5-1.5b").unwrap();
        // Qwen2.5-1.5B has 1.54 B parameters with tied embeddings.
        assert_eq!(qwen.num_parameters(), 1_543_714_304);
        assert!(ModelConfig::preset("gpt2").is_err());
    }
}
