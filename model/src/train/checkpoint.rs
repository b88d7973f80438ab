//! Training checkpoints: a directory per step in Hugging Face layout (so transformers and
//! [`CausalLm::from_pretrained`] load it as is) plus the optimiser and trainer state needed
//! to resume exactly. Each is written under a temporary name and renamed into place, so a
//! crash leaves either the previous checkpoint or the new one, never half of one.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::adamw::AdamW;
use crate::config::StorageDtype;
use crate::error::{ModelError, Result};
use crate::model::CausalLm;
use crate::weights::write_atomic;

/// File names inside a checkpoint directory, besides `config.json` and `model.safetensors`.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// The `step-NNNNNNNN` directories under one root, keeping the newest `keep_last`.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub root: PathBuf,
    /// 0 keeps every checkpoint.
    pub keep_last: usize,
}

impl Checkpoints {
    pub fn new(root: impl Into<PathBuf>, keep_last: usize) -> Self {
        Self {
            root: root.into(),
            keep_last,
        }
    }

    pub fn dir_for(&self, step: u64) -> PathBuf {
        self.root.join(format!("step-{step:08}"))
    }

    /// Finished checkpoints, oldest first (temporary directories are ignored).
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ModelError::io(&self.root, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ModelError::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
                if entry.path().join(TRAINER_STATE_FILE).is_file() {
                    out.push((step, entry.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn latest(&self) -> Result<Option<(u64, PathBuf)>> {
        Ok(self.list()?.pop())
    }

    /// Writes a checkpoint for `step`: `fill` writes the files into a temporary directory,
    /// which is then renamed into place; older checkpoints beyond `keep_last` are removed.
    pub fn save(&self, step: u64, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.root).map_err(|e| ModelError::write(&self.root, e))?;
        let tmp = self.root.join(format!(".step-{step:08}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::write(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| ModelError::write(&tmp, e))?;
        fill(&tmp)?;
        let dest = self.dir_for(step);
        if dest.exists() {
            // Re-saving a step (a resumed run): move the old one aside first, drop it after.
            let old = self.root.join(format!(".step-{step:08}.old"));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&dest, &old).map_err(|e| ModelError::write(&dest, e))?;
            std::fs::rename(&tmp, &dest).map_err(|e| ModelError::write(&dest, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &dest).map_err(|e| ModelError::write(&dest, e))?;
        }
        if self.keep_last > 0 {
            let all = self.list()?;
            let excess = all.len().saturating_sub(self.keep_last);
            for (_, dir) in all.into_iter().take(excess) {
                std::fs::remove_dir_all(&dir).map_err(|e| ModelError::write(&dir, e))?;
            }
        }
        Ok(dest)
    }
}

/// Writes the model (f32, HF layout — or with LoRA the PEFT adapter alone), optimiser
/// state, trainer state and copies of `extra_files` (tokenizer files, so the directory is a
/// complete model) into `dir`.
pub fn write_training_state<B: AutodiffBackend, S: Serialize>(
    dir: &Path,
    model: &CausalLm<B>,
    optimizer: &AdamW<B>,
    state: &S,
    extra_files: &[PathBuf],
) -> Result<()> {
    if model.lora_config().is_some() {
        model.save_adapter(dir, None)?;
    } else {
        model.save_pretrained(dir, StorageDtype::Float32)?;
    }
    optimizer.save(model, &dir.join(OPTIMIZER_FILE))?;
    copy_into(dir, extra_files)?;
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| ModelError::Input(format!("{TRAINER_STATE_FILE}: {e}")))?;
    // Last, so a directory with a trainer state is a complete one.
    write_atomic(&dir.join(TRAINER_STATE_FILE), text.as_bytes())
}

/// Reads a checkpoint's trainer state.
pub fn read_trainer_state<S: DeserializeOwned>(dir: &Path) -> Result<S> {
    let path = dir.join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|cause| ModelError::Json { path, cause })
}

/// Copies each of `files` into `dir` under its own name (tokenizer files beside a model or
/// an adapter).
pub fn copy_into(dir: &Path, files: &[PathBuf]) -> Result<()> {
    for src in files {
        if let Some(name) = src.file_name() {
            std::fs::copy(src, dir.join(name)).map_err(|e| ModelError::io(src, e))?;
        }
    }
    Ok(())
}
