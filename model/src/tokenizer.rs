//! The Hugging Face tokenizer (`tokenizer.json`) with the ids the other stages need.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// Ids of the tokens generation and training care about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpecialTokens {
    /// Every id that ends a turn (e.g. `<|im_end|>` and `<|endoftext|>` for Qwen).
    pub eos_ids: Vec<u32>,
    pub pad_id: Option<u32>,
    pub bos_id: Option<u32>,
}

/// A `tokenizers` tokenizer plus its special ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory (or the file itself). Special ids come
    /// from `tokenizer_config.json` beside it when present (`eos_token`, `pad_token`,
    /// `bos_token`), else from the usual names (`<|im_end|>`, `<|endoftext|>`, `</s>`).
    pub fn from_path(path: &Path) -> Result<Self> {
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_path_buf())
        } else {
            (path.to_path_buf(), path.parent().map(Path::to_path_buf).unwrap_or_default())
        };
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| ModelError::Tokenizer {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        let mut tok = Self {
            inner,
            special: SpecialTokens::default(),
            path: file,
        };
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
            Some(serde_json::from_str(&text).map_err(|cause| ModelError::Json {
                path: config_path.clone(),
                cause,
            })?)
        } else {
            None
        };
        let named = |key: &str| -> Option<u32> {
            let v = config.as_ref()?.get(key)?;
            let s = v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            tok.token_id(s)
        };
        let eos = named("eos_token");
        let pad = named("pad_token");
        let bos = named("bos_token");
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        // Only added tokens count: "</s>" is an ordinary BPE piece in Qwen's vocabulary.
        let added = tok.inner.get_added_tokens_decoder();
        for fallback in ["<|im_end|>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>"] {
            if let Some(id) = tok.token_id(fallback).filter(|id| added.contains_key(id)) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        tok.special = SpecialTokens {
            pad_id: pad.or_else(|| tok.token_id("<|endoftext|>")).or(eos_ids.first().copied()),
            bos_id: bos,
            eos_ids,
        };
        Ok(tok)
    }

    /// Wraps an in-memory tokenizer (e.g. one trained on a corpus).
    pub fn from_inner(inner: tokenizers::Tokenizer, special: SpecialTokens) -> Self {
        Self {
            inner,
            special,
            path: PathBuf::new(),
        }
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Size including added tokens (may be less than the model's padded embedding rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text; added tokens written in the text (`<|im_start|>`, `<think>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.error(format!("encode: {e}")))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.error(format!("decode: {e}")))
    }

    /// The id every stage pads with, for a model of `vocab_size` embedding rows: the pad
    /// token, else the first end-of-sequence token, else 0 — the first that is a valid row.
    /// Pads are masked out of attention and loss; only their ids must be valid.
    pub fn pad_id_for(&self, vocab_size: usize) -> u32 {
        [self.special.pad_id, self.special.eos_ids.first().copied()]
            .into_iter()
            .flatten()
            .find(|&id| (id as usize) < vocab_size)
            .unwrap_or(0)
    }

    /// The id of a single token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids that spell `marker` (e.g. `<think>`): one id where it is an added token, several
    /// where it is plain text for this tokenizer.
    pub fn marker_ids(&self, marker: &str) -> Result<Vec<u32>> {
        match self.token_id(marker) {
            Some(id) => Ok(vec![id]),
            None => self.encode(marker),
        }
    }

    fn error(&self, reason: String) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            reason,
        }
    }
}

/// Trains a byte-level BPE (GPT-2 pre-tokenisation, as Qwen's family) on `texts`.
/// `special` become special added tokens (ChatML markers: stripped when decoding with
/// `skip_special`), `added` ordinary added tokens (`<think>`, `<answer>`: kept in decoded
/// text, always one id). `vocab_size` counts the learned merges and the special tokens.
pub fn train_bpe(texts: &[String], vocab_size: usize, special: &[&str], added: &[&str]) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::{ModelWrapper, TrainerWrapper};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;
    let fail = |reason: String| ModelError::Tokenizer { path: PathBuf::from("<trained BPE>"), reason };
    if texts.is_empty() {
        return Err(fail("no texts to train on".into()));
    }
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(special.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = tokenizers::Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.train(&mut trainer, texts.iter()).map_err(|e| fail(format!("training: {e}")))?;
    tok.add_tokens(&added.iter().map(|s| AddedToken::from(*s, false)).collect::<Vec<_>>());
    Ok(tok)
}
