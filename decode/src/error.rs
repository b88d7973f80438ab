//! Errors of the decode crate. Schema problems name the keyword and the JSON pointer.

use thinkjson_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A setting the constrained decoder refuses (e.g. llguidance's `lenient` mode, which
    /// would silently stop enforcing keywords).
    #[error("unsupported JSON Schema keyword `{keyword}` at `{pointer}`: constrained decoding cannot enforce it")]
    UnsupportedKeyword { keyword: String, pointer: String },
    #[error("remote `$ref` `{reference}` at `{pointer}`: only local references (`#/...`) are resolved")]
    RemoteRef { reference: String, pointer: String },
    #[error("invalid JSON Schema at `{pointer}`: {message}")]
    InvalidSchema { pointer: String, message: String },
    /// The grammar compiler (llguidance) rejected the constraint.
    #[error("constraint does not compile: {0}")]
    Grammar(String),
    #[error("tokenizer for constrained decoding: {0}")]
    Tokenizer(String),
    #[error("invalid generation request: {0}")]
    Input(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub type Result<T> = std::result::Result<T, DecodeError>;
