//! One error type for the crate; every variant names the thing that was wrong.

use std::path::PathBuf;

/// Errors from loading, validating and running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // Causes are part of the message (not chained as `source`) so one line says it all.
    #[error("cannot read {path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("cannot write {path}: {cause}")]
    Write { path: PathBuf, cause: std::io::Error },
    #[error("{path}: invalid JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("config: field `{field}`: {reason}")]
    Config { field: String, reason: String },
    #[error("unknown preset `{0}` (known: {1})")]
    UnknownPreset(String, String),
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("weights: tensor `{name}` is missing (looked in {place})")]
    MissingTensor { name: String, place: String },
    #[error("weights: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("weights: tensor `{name}` has unsupported dtype {dtype}")]
    TensorDtype { name: String, dtype: String },
    #[error("input: token id {id} at sequence {sequence}, position {position} is out of range (vocab size {vocab})")]
    TokenOutOfRange {
        id: u32,
        sequence: usize,
        position: usize,
        vocab: usize,
    },
    #[error("input: {0}")]
    Input(String),
    #[error("{path}: {reason}")]
    Gguf { path: PathBuf, reason: String },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("device: {0}")]
    Device(String),
    #[error("resume: {0}")]
    Resume(String),
    #[error("training stopped: {0}")]
    NonFinite(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            cause,
        }
    }
    pub(crate) fn write(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Self::Write {
            path: path.into(),
            cause,
        }
    }
    pub fn config(field: &str, reason: impl Into<String>) -> Self {
        Self::Config {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}
