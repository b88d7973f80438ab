//! Errors of the synth crate; each names what was wrong.

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("schema pattern `{0}` has no value generator (use one of the domain's id patterns)")]
    UnknownPattern(String),
    #[error("unknown split `{0}` (grpo, sft, eval)")]
    UnknownSplit(String),
    #[error("could not produce {wanted} rows for split {split} within {attempts} attempts")]
    SplitStarved { wanted: usize, split: String, attempts: usize },
    #[error("{0}")]
    Invalid(String),
}
