//! What `sft`, `grpo` and the pipeline share on the command line and in their files: the
//! config-file reader, the LoRA / adapter options, and the final save.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::{CausalLm, LoraConfig, StorageDtype};

/// The one reader of `sft`, `grpo` and `pipeline` config files: the file is read as changes
/// to `T::default()`, table by table — a `[sft]` table that sets only `epochs` keeps the
/// embedded learning rate, not `SftConfig`'s. Unknown fields and wrong types are errors that
/// name the field, its line and the file.
pub fn read_config<T: DeserializeOwned + Serialize + Default>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let named = |e: toml::de::Error| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim());
    // Parsed on its own first, so unknown fields and wrong types are reported with their line.
    toml::from_str::<T>(&text).map_err(named)?;
    let given: toml::Table = toml::from_str(&text).map_err(named)?;
    let mut merged = toml::Table::try_from(T::default()).context("the defaults")?;
    overlay(&mut merged, given);
    toml::Value::Table(merged).try_into().map_err(named)
}

/// Writes `given` over `base`, table by table.
fn overlay(base: &mut toml::Table, given: toml::Table) {
    for (key, value) in given {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(g)) => overlay(b, g),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `--adapter`, `--lora`, `--lora-r`, `--lora-alpha` of the trainers.
#[derive(Args, Debug, Clone, Default)]
pub struct LoraArgs {
    /// Start from this PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) on
    /// --model, and train it.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Train LoRA adapters instead of every weight (settings from `[lora]`, else the defaults:
    /// r 16, alpha 32, all seven projections).
    #[arg(long)]
    pub lora: bool,
    /// LoRA rank (implies --lora).
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha (implies --lora).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
}

impl LoraArgs {
    /// Applies the flags to a file's `[lora]` table and `adapter`.
    pub fn apply(&self, lora: &mut Option<LoraConfig>, adapter: &mut Option<PathBuf>) {
        if self.lora || self.lora_r.is_some() || self.lora_alpha.is_some() {
            let l = lora.get_or_insert_with(LoraConfig::default);
            if let Some(r) = self.lora_r {
                l.r = r;
            }
            if let Some(a) = self.lora_alpha {
                l.alpha = a;
            }
        }
        if self.adapter.is_some() {
            adapter.clone_from(&self.adapter);
        }
    }
}

/// The LoRA settings a run trains with: the file's top-level `[lora]` or `[train.lora]`, not both.
pub fn resolve_lora(top: &Option<LoraConfig>, train: &mut Option<LoraConfig>) -> Result<()> {
    match (top, &train) {
        (Some(_), Some(_)) => bail!("LoRA is set twice: keep `[lora]` or `[train.lora]`, not both"),
        (Some(l), None) => *train = Some(l.clone()),
        _ => {}
    }
    Ok(())
}

/// Saves a trained model in `dir`: the PEFT adapter with LoRA (merge it with `cargo xtask
/// merge-lora`), else the full model; plus the tokenizer files.
pub fn save_final<B: Backend>(model: &CausalLm<B>, dir: &Path, extra_files: &[PathBuf], base: Option<&Path>) -> Result<()> {
    if model.lora_config().is_some() {
        let base = base.map(|p| p.display().to_string());
        model.save_adapter(dir, base.as_deref())?;
    } else {
        model.save_pretrained(dir, StorageDtype::Float32)?;
    }
    Ok(thinkjson_model::train::copy_into(dir, extra_files)?)
}

/// Folds the adapter in `adapter` into `base` and writes a full HF model (with `base`'s
/// tokenizer files, or those beside the adapter) to `out`.
pub fn write_merged(base: &Path, adapter: &Path, out: &Path, dtype: StorageDtype) -> Result<thinkjson_model::LoraConfig> {
    let pretrained = crate::model_ref::open(base)?;
    let model = crate::model_ref::load::<thinkjson_model::CpuBackend>(&pretrained, Some(adapter), &Default::default())?;
    let lora = model.lora_config().cloned().context("the adapter attached no LoRA settings")?;
    model.merge_lora().save_pretrained(out, dtype).with_context(|| format!("saving to {}", out.display()))?;
    let tok_dir = if adapter.join("tokenizer.json").exists() {
        adapter.to_path_buf()
    } else {
        crate::model_ref::tokenizer_dir(&pretrained, &out.join(".tokenizer"))?
    };
    if tok_dir != out {
        let files: Vec<PathBuf> = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
            .iter()
            .map(|name| tok_dir.join(name))
            .filter(|p| p.exists())
            .collect();
        thinkjson_model::train::copy_into(out, &files)?;
    }
    let scratch = out.join(".tokenizer");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    Ok(lora)
}

/// The full model a training stage left in `stage_dir`: `final/`, or `merged/` when
/// `final/` is a LoRA adapter.
pub fn stage_model(stage_dir: &Path) -> PathBuf {
    if stage_dir.join("final").join(thinkjson_model::lora::peft::ADAPTER_CONFIG_FILE).exists() {
        stage_dir.join("merged")
    } else {
        stage_dir.join("final")
    }
}

/// "LoRA adapter" or "model", for what `save_final` left in `dir`.
pub fn final_kind(dir: &Path) -> &'static str {
    if dir.join(thinkjson_model::lora::peft::ADAPTER_CONFIG_FILE).exists() {
        "LoRA adapter (PEFT format; use it with --adapter, or merge it with `cargo xtask merge-lora`)"
    } else {
        "model"
    }
}
