//! Per-stage manifests: what a stage was run with (its key), what it read (input hashes),
//! and whether it finished. `--resume` trusts a finished stage only when both still match.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    /// Hash of the stage's configuration and of every upstream stage's key.
    pub key: String,
    /// Input file → hash, as read when the stage started.
    pub inputs: BTreeMap<String, String>,
    pub finished: bool,
    pub secs: f64,
    /// The stage's own figures (steps, rewards, rates).
    #[serde(default)]
    pub summary: serde_json::Value,
}

pub fn dir(out: &Path) -> PathBuf {
    out.join("manifests")
}

pub fn path(out: &Path, stage: &str) -> PathBuf {
    dir(out).join(format!("{stage}.json"))
}

/// The stage's manifest, if one was written (an unreadable one counts as absent: the
/// stage is redone).
pub fn read(out: &Path, stage: &str) -> Option<Manifest> {
    let text = std::fs::read_to_string(path(out, stage)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write(out: &Path, m: &Manifest) -> Result<()> {
    std::fs::create_dir_all(dir(out)).with_context(|| format!("creating {}", dir(out).display()))?;
    let text = serde_json::to_string_pretty(m)?;
    thinkjson_model::write_atomic(&path(out, &m.stage), text.as_bytes()).with_context(|| format!("writing the {} manifest", m.stage))
}

/// Hex of a stable 64-bit hash.
pub fn hash_bytes(bytes: &[u8]) -> String {
    format!("{:016x}", thinkjson_synth::stable_hash(bytes))
}

/// A key from serialisable parts (a config section, upstream keys).
pub fn key_of(parts: &[&serde_json::Value]) -> String {
    let text = serde_json::to_string(parts).unwrap_or_default();
    hash_bytes(text.as_bytes())
}

/// Hash of an input: a file's bytes; for a model directory, its config.json and the sizes
/// of its weight files (hashing gigabytes of weights on every resume is not worth it).
pub fn hash_input(path: &Path) -> Result<String> {
    if path.is_dir() {
        let mut parts = Vec::new();
        let config = path.join("config.json");
        parts.push(std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?);
        let mut weights: Vec<(String, u64)> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
            .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), e.metadata().ok()?.len())))
            .collect();
        weights.sort();
        parts.push(format!("{weights:?}").into_bytes());
        Ok(hash_bytes(&parts.concat()))
    } else {
        Ok(hash_bytes(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?))
    }
}

/// Hashes keyed by path, relative to the run directory `out` for files inside it, so a run
/// directory that is moved or copied still resumes.
pub fn hash_inputs(out: &Path, paths: &[PathBuf]) -> Result<BTreeMap<String, String>> {
    paths
        .iter()
        .map(|p| {
            let name = p.strip_prefix(out).unwrap_or(p);
            Ok((name.display().to_string(), hash_input(p)?))
        })
        .collect()
}
