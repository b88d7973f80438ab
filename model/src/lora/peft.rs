//! PEFT's adapter format, both ways: `adapter_config.json` and `adapter_model.safetensors`
//! with keys `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`
//! (`lora_A` is `[r, in]`, `lora_B` is `[out, r]`), so `peft.PeftModel.from_pretrained(base,
//! dir)` loads what we write and we load what PEFT writes.
//!
//! Settings that change the math and that we do not implement (DoRA, per-layer rank or
//! alpha patterns, bias training, `modules_to_save`, layer subsets, and any setting this
//! reader does not know, unless it is off) are refused by name; metadata (task type, base
//! model path, PEFT version, initialisation settings) is ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::{LoraAdapter, LoraConfig, Target};
use crate::error::{ModelError, Result};
use crate::model::CausalLm;
use crate::weights::{transpose, write_atomic};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Tensors of an adapter file by key: PEFT-layout shape and f32 values.
type AdapterWeights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// PEFT's prefix for a `*ForCausalLM` wrapped by `PeftModelForCausalLM`.
const PREFIX: &str = "base_model.model.model.layers";

/// Keys read into [`LoraConfig`].
const READ: &[&str] = &["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"];

/// Keys that do not change what a saved adapter computes: descriptions, and settings of how
/// the weights were initialised or trained (the saved weights are what they are).
const METADATA: &[&str] = &[
    "base_model_name_or_path",
    "revision",
    "task_type",
    "peft_version",
    "inference_mode",
    "auto_mapping",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "qalora_group_size",
];

/// Every other key changes the math (DoRA, bias training, per-layer ranks, `modules_to_save`,
/// layer subsets, newer PEFT variants, …): accepted only when it is off — null, false, an
/// empty list or map, or `bias = "none"`.
fn refused_unless_off(key: &str, value: &Value) -> Option<String> {
    if READ.contains(&key) || METADATA.contains(&key) {
        return None;
    }
    let off = match value {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => key == "bias" && s == "none",
        _ => false,
    };
    (!off).then(|| format!("`{key}` = {value} is not supported (thinkjson implements plain LoRA on q/k/v/o/gate/up/down)"))
}

/// Reads and checks `dir/adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|cause| ModelError::Json { path: path.clone(), cause })?;
    let bad = |reason: String| ModelError::Config { field: format!("{}", path.display()), reason };
    let obj = value.as_object().ok_or_else(|| bad("is not a JSON object".into()))?;
    match obj.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => return Err(bad(format!("`peft_type` is `{other}`: only LORA adapters are supported"))),
        None => return Err(bad("`peft_type` is missing (a PEFT adapter config names it, e.g. \"LORA\")".into())),
    }
    for (key, v) in obj {
        if let Some(reason) = refused_unless_off(key, v) {
            return Err(bad(reason));
        }
    }
    let r = obj
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad(format!("`r` must be a positive integer, found {}", obj.get("r").unwrap_or(&Value::Null))))?;
    let alpha = obj
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad(format!("`lora_alpha` must be a number, found {}", obj.get("lora_alpha").unwrap_or(&Value::Null))))?;
    let dropout = match obj.get("lora_dropout") {
        None | Some(Value::Null) => 0.0,
        Some(v) => v.as_f64().ok_or_else(|| bad(format!("`lora_dropout` must be a number, found {v}")))?,
    };
    let use_rslora = match obj.get("use_rslora") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or_else(|| bad(format!("`use_rslora` must be true or false, found {v}")))?,
    };
    let target_modules = match obj.get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad(format!("`target_modules` entry {v} is not a string"))))
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(s)) if s == "all-linear" => vec![s.clone()],
        Some(Value::String(s)) => {
            return Err(bad(format!("`target_modules` is the pattern `{s}`: give a list of module names or \"all-linear\"")))
        }
        other => return Err(bad(format!("`target_modules` must be a list of module names, found {}", other.unwrap_or(&Value::Null)))),
    };
    let config = LoraConfig { r: r as usize, alpha, dropout, target_modules, use_rslora };
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}

fn key(layer: usize, target: Target, which: &str) -> String {
    format!("{PREFIX}.{layer}.{}.lora_{which}.weight", target.path())
}

impl<B: Backend> CausalLm<B> {
    /// Writes the attached adapters in PEFT's format (f32), atomically per file.
    /// `base_model` goes into `base_model_name_or_path` (metadata only; `null` when `None`).
    pub fn save_adapter(&self, dir: &Path, base_model: Option<&str>) -> Result<()> {
        let config = self
            .lora
            .as_ref()
            .ok_or_else(|| ModelError::Input("the model has no LoRA adapters to save".into()))?;
        std::fs::create_dir_all(dir).map_err(|e| ModelError::write(dir, e))?;
        let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (layer, target, p) in self.projections() {
            let Some(lora) = &p.lora else { continue };
            for (which, t) in [("A", lora.a.val()), ("B", lora.b.val())] {
                let [rows, cols] = t.dims();
                let values = host(t, &key(layer, target, which))?;
                // burn [in, r] / [r, out] → PEFT [r, in] / [out, r].
                let hf = transpose(&values, rows, cols);
                blobs.push((key(layer, target, which), vec![cols, rows], hf.iter().flat_map(|v| v.to_le_bytes()).collect()));
            }
        }
        let path = dir.join(ADAPTER_WEIGHTS_FILE);
        let mut views = Vec::with_capacity(blobs.len());
        for (name, shape, bytes) in &blobs {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map_err(|e| ModelError::Safetensors { path: path.clone(), reason: format!("{name}: {e}") })?;
            views.push((name.as_str(), view));
        }
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| ModelError::Safetensors { path: path.clone(), reason: e.to_string() })?;
        write_atomic(&path, &bytes)?;
        let targets: Vec<&str> = config.targets()?.iter().map(|t| t.name()).collect();
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": targets,
            "use_rslora": config.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
        });
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| ModelError::Input(format!("{ADAPTER_CONFIG_FILE}: {e}")))?;
        write_atomic(&dir.join(ADAPTER_CONFIG_FILE), text.as_bytes())
    }

    /// The adapter parameters under PEFT's key names, burn layout (`lora_A` is `[in, r]`,
    /// `lora_B` `[r, out]`: the transposes of PEFT's tensors), in the decoder's order.
    pub fn adapter_params(&self) -> Vec<(String, Param<Tensor<B, 2>>)> {
        let mut out = Vec::new();
        for (layer, target, p) in self.projections() {
            if let Some(lora) = &p.lora {
                out.push((key(layer, target, "A"), lora.a.clone()));
                out.push((key(layer, target, "B"), lora.b.clone()));
            }
        }
        out
    }

    /// Attaches the PEFT adapter in `dir` to this base model (which must have none), frozen
    /// base, trainable adapters. Every tensor must be present with this base's shapes; a
    /// tensor for a module or layer this base lacks is refused, naming it.
    pub fn load_adapter(self, dir: &Path) -> Result<Self> {
        let config = read_adapter_config(dir)?;
        let weights = read_adapter_weights(dir)?;
        self.with_adapter_weights(config, weights, dir)
    }

    /// Replaces the values of the attached adapters with those saved in `dir` (a checkpoint
    /// of this run); the LoRA settings there must equal the attached ones.
    pub fn reload_adapter(self, dir: &Path) -> Result<Self> {
        let attached = self
            .lora
            .clone()
            .ok_or_else(|| ModelError::Input("the model has no LoRA adapters to reload".into()))?;
        let saved = read_adapter_config(dir)?;
        if saved.r != attached.r || saved.targets()? != attached.targets()? || saved.scale() != attached.scale() {
            return Err(ModelError::Config {
                field: dir.join(ADAPTER_CONFIG_FILE).display().to_string(),
                reason: format!("saved with LoRA {saved:?}, this run uses {attached:?}"),
            });
        }
        self.without_lora().with_adapter_weights(attached, read_adapter_weights(dir)?, dir)
    }

    fn with_adapter_weights(self, config: LoraConfig, mut weights: AdapterWeights, dir: &Path) -> Result<Self> {
        if self.lora.is_some() {
            return Err(ModelError::Input("the model already has LoRA adapters; merge them first".into()));
        }
        let targets = config.targets()?;
        let (r, scale, dropout) = (config.r, config.scale(), config.dropout);
        let device = self.device();
        let file = dir.join(ADAPTER_WEIGHTS_FILE);
        let layers = self.layers.len();
        let mut model = self.no_grad();
        for (layer, target, p) in model.projections_mut() {
            if !targets.contains(&target) {
                continue;
            }
            let [d_in, d_out] = p.dims();
            let mut take = |which: &str, expected: [usize; 2]| -> Result<Vec<f32>> {
                let name = key(layer, target, which);
                let (shape, values) = weights.remove(&name).ok_or_else(|| ModelError::MissingTensor {
                    name: name.clone(),
                    place: file.display().to_string(),
                })?;
                if shape != expected {
                    return Err(ModelError::Config {
                        field: file.display().to_string(),
                        reason: format!(
                            "tensor `{name}` has shape {shape:?}, this base model needs {expected:?} (r = {r}): an adapter for another base model?"
                        ),
                    });
                }
                Ok(values)
            };
            let a = transpose(&take("A", [r, d_in])?, r, d_in);
            let b = transpose(&take("B", [d_out, r])?, d_out, r);
            p.lora = Some(LoraAdapter {
                a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [d_in, r]), &device)),
                b: Param::from_tensor(Tensor::from_data(TensorData::new(b, [r, d_out]), &device)),
                scale,
                dropout,
            });
        }
        if let Some(name) = weights.keys().next() {
            let why = match name.strip_prefix(&format!("{PREFIX}.")).and_then(|rest| rest.split('.').next()?.parse::<usize>().ok()) {
                Some(i) if i >= layers => format!("layer {i}, but this base model has {layers} layers"),
                _ => format!("a module not in `target_modules` ({}) or not a decoder projection", config.target_modules.join(", ")),
            };
            return Err(ModelError::Config {
                field: file.display().to_string(),
                reason: format!("tensor `{name}` targets {why}: an adapter for another base model?"),
            });
        }
        model.lora = Some(config);
        Ok(model)
    }
}

/// Every tensor of `adapter_model.safetensors`, as f32 in PEFT layout.
fn read_adapter_weights(dir: &Path) -> Result<AdapterWeights> {
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    if !path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(ModelError::Safetensors {
            path: dir.join("adapter_model.bin"),
            reason: "pickled adapters are not read; save with `safe_serialization=True` (PEFT's default)".into(),
        });
    }
    let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors { path: path.clone(), reason: e.to_string() })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(ModelError::TensorDtype { name, dtype: format!("{other:?}") }),
        };
        if view.shape().len() != 2 {
            return Err(ModelError::Config {
                field: path.display().to_string(),
                reason: format!("tensor `{name}` has shape {:?}; LoRA weights are matrices", view.shape()),
            });
        }
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

fn host<B: Backend>(t: Tensor<B, 2>, name: &str) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| ModelError::Input(format!("{name}: cannot read tensor back: {e:?}")))
}
