//! The tokenizer and chat template stored in GGUF metadata (`tokenizer.ggml.*`,
//! `tokenizer.chat_template`), rebuilt as a Hugging Face `tokenizer.json`.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported. The pre-tokenizer is
//! chosen by `tokenizer.ggml.pre`, the name llama.cpp gives the original tokenizer's
//! splitting rules; each entry below reproduces that original `tokenizer.json`.

use serde_json::{json, Value};

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::{SpecialTokens, Tokenizer};

/// `tokenizer.ggml.pre` values this crate knows how to split for.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] = &["default", "gpt2", "smollm", "qwen2"];

/// The splitting regex of Qwen2's `tokenizer.json` (one digit per piece, letters with one
/// leading non-letter, punctuation runs, newline runs).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// A GGUF file's tokenizer as `tokenizer.json`, with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    json: Value,
    special: SpecialTokens,
    tokens: Vec<String>,
    unk_id: Option<u32>,
    chat_template: Option<String>,
}

fn pre_tokenizer(pre: &str) -> Option<(Value, Value)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Some(match pre {
        "default" | "gpt2" => (Value::Null, byte_level(true)),
        // llama.cpp: every digit is its own piece before the GPT-2 regex runs.
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            ]}),
        ),
        _ => return None,
    })
}

impl GgufTokenizer {
    /// bos / eos / pad ids from `tokenizer.ggml.*` (eos also lists `eot_token_id` when it differs).
    pub fn special_ids(gguf: &GgufFile) -> Result<SpecialTokens> {
        let id = |key: &str| -> Result<Option<u32>> {
            gguf.opt_u64(key)?
                .map(|v| u32::try_from(v).map_err(|_| gguf.error(format!("`{key}` = {v} is not a token id"))))
                .transpose()
        };
        let mut eos_ids: Vec<u32> = id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
        if let Some(eot) = id("tokenizer.ggml.eot_token_id")? {
            if !eos_ids.contains(&eot) {
                eos_ids.push(eot);
            }
        }
        Ok(SpecialTokens {
            pad_id: id("tokenizer.ggml.padding_token_id")?.or(eos_ids.first().copied()),
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_ids,
        })
    }

    /// Rebuilds the tokenizer; an unsupported tokenizer model or pre-tokenizer is named.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(gguf.error(format!(
                "tokenizer.ggml.model `{model}` is not supported (only byte-level BPE, `gpt2`)"
            )));
        }
        let pre = match gguf.get("tokenizer.ggml.pre") {
            None => "default",
            Some(_) => gguf.str("tokenizer.ggml.pre")?,
        };
        let (normalizer, pre_tokenizer) = pre_tokenizer(pre).ok_or_else(|| {
            gguf.error(format!(
                "tokenizer.ggml.pre `{pre}` is not supported (supported: {})",
                SUPPORTED_PRE_TOKENIZERS.join(", ")
            ))
        })?;
        let tokens = gguf
            .opt_strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| gguf.missing("tokenizer.ggml.tokens"))?;
        let merges = gguf.opt_strings("tokenizer.ggml.merges")?.unwrap_or_default();
        let types: Vec<u64> = match gguf.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(items) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(gguf.error(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, (token, &ty)) in tokens.iter().zip(&types).enumerate() {
            // A repeated string (padding entries of some converted vocabularies) keeps its first id.
            vocab.entry(token.to_string()).or_insert(json!(id));
            if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
                }));
            }
        }
        let special = Self::special_ids(gguf)?;
        for (what, id) in [("bos", special.bos_id), ("pad", special.pad_id)]
            .into_iter()
            .chain(special.eos_ids.iter().map(|&i| ("eos", Some(i))))
        {
            if let Some(id) = id.filter(|&i| i as usize >= tokens.len()) {
                return Err(gguf.error(format!("{what} token id {id} is outside the {}-token vocabulary", tokens.len())));
            }
        }
        let bos_token = special.bos_id.map(|i| tokens[i as usize].to_string());
        let post_processor = match (gguf.opt_bool("tokenizer.ggml.add_bos_token")?, &bos_token) {
            (Some(true), Some(bos)) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [special.bos_id], "tokens": [bos]}},
            }),
            _ => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}),
        };
        let json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let chat_template = match gguf.get("tokenizer.chat_template") {
            None => None,
            Some(_) => Some(gguf.str("tokenizer.chat_template")?.to_string()),
        };
        let unk_id = gguf.opt_u64("tokenizer.ggml.unknown_token_id")?.and_then(|v| u32::try_from(v).ok());
        Ok(Self {
            json,
            special,
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            unk_id: unk_id.filter(|&i| (i as usize) < tokens.len()),
            chat_template,
        })
    }

    /// The `tokenizer.json` document.
    pub fn tokenizer_json(&self) -> &Value {
        &self.json
    }

    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize)).map(String::as_str)
    }

    /// `tokenizer_config.json`: the special tokens by name, the chat template, and
    /// `PreTrainedTokenizerFast` (transformers would otherwise replace a `GPT2Tokenizer`'s
    /// pre-tokenizer with plain byte-level and change the ids).
    pub fn tokenizer_config(&self, config: &ModelConfig) -> Value {
        json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.token(self.special.bos_id),
            "eos_token": self.token(self.special.eos_ids.first().copied()),
            "pad_token": self.token(self.special.pad_id),
            "unk_token": self.token(self.unk_id),
            "chat_template": self.chat_template,
            "model_max_length": config.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
        })
    }

    /// The tokenizer, ready to encode.
    pub fn tokenizer(&self, gguf: &GgufFile) -> Result<Tokenizer> {
        let inner: tokenizers::Tokenizer = self.json.to_string().parse().map_err(|e| ModelError::Tokenizer {
            path: gguf.path().to_path_buf(),
            reason: format!("rebuilding tokenizer.json from GGUF metadata: {e}"),
        })?;
        Ok(Tokenizer::from_inner(inner, self.special.clone()))
    }

    /// The chat template (ChatML where the file has none).
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        match &self.chat_template {
            Some(source) => ChatTemplate::new(
                source,
                self.token(self.special.bos_id).unwrap_or(""),
                self.token(self.special.eos_ids.first().copied()).unwrap_or(""),
            ),
            None => Ok(ChatTemplate::chatml()),
        }
    }
}
