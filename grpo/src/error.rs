//! Errors of the GRPO stage; each names what was wrong.

use thinkjson_decode::DecodeError;
use thinkjson_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum GrpoError {
    #[error(transparent)]
    Model(ModelError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("config: field `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("data: {0}")]
    Data(String),
    #[error("resume: {0}")]
    Resume(String),
    #[error("training stopped at step {step}: {what} is not finite ({value}); the last checkpoint is intact")]
    NonFinite { step: u64, what: &'static str, value: f64 },
    #[error("training stopped at step {step}: reward function `{function}` returned {value}, which is not finite; the last checkpoint is intact")]
    NonFiniteReward { step: u64, function: String, value: f64 },
}

impl From<ModelError> for GrpoError {
    /// The shared trainer skeleton's resume refusals stay this stage's `Resume` errors.
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Resume(reason) => Self::Resume(reason),
            other => Self::Model(other),
        }
    }
}

pub type Result<T, E = GrpoError> = std::result::Result<T, E>;
