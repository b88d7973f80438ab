//! The llguidance side of a tokenizer: a token trie over the model's vocabulary and the
//! parser factory every constraint is compiled with.

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokTrie, TokenId, TokenizerEnv};
use llguidance::ParserFactory;
use thinkjson_model::Tokenizer;
use toktrie_hf_tokenizers::{ByteTokenizer, ByteTokenizerEnv};

use crate::error::{DecodeError, Result};

/// The tokenizer as llguidance sees it, sized to the model's logits.
pub struct ConstraintEnv {
    factory: ParserFactory,
    env: TokEnv,
    think: Option<(TokenId, TokenId)>,
}

impl std::fmt::Debug for ConstraintEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintEnv")
            .field("vocab", &self.env.tok_trie().vocab_size())
            .field("think_tokens", &self.think)
            .finish()
    }
}

impl ConstraintEnv {
    /// Builds the trie for `tokenizer` with the model's vocabulary size (`n_vocab` ≥ the
    /// tokenizer's; the extra rows of the embedding are never allowed).
    pub fn new(tokenizer: &Tokenizer, n_vocab: usize) -> Result<Self> {
        let err = |e: anyhow::Error| DecodeError::Tokenizer(e.to_string());
        let mut bt = ByteTokenizer::from_tokenizer(tokenizer.inner().clone()).map_err(err)?;
        let eos = &tokenizer.special().eos_ids;
        if !eos.is_empty() {
            bt.set_eos_tokens(eos);
        }
        let inner = ByteTokenizerEnv::new(bt, Some(n_vocab)).map_err(err)?;
        let env: TokEnv = Arc::new(PlainLiterals { inner });
        let mut factory = ParserFactory::new_simple(&env).map_err(err)?;
        factory.quiet();
        let trie = env.tok_trie();
        let special = |s: &str| {
            let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            bytes.extend_from_slice(s.as_bytes());
            trie.token_id_at_bytes(&bytes)
        };
        let think = special("<think>").zip(special("</think>"));
        Ok(Self { factory, env, think })
    }

    pub fn factory(&self) -> &ParserFactory {
        &self.factory
    }

    pub fn trie(&self) -> &TokTrie {
        self.env.tok_trie()
    }

    /// Text as tokens, the way the grammar tokenizes forced literals (added tokens spelled
    /// as plain bytes).
    pub fn tokenize(&self, text: &str) -> Vec<TokenId> {
        self.env.tokenize_bytes(text.as_bytes())
    }

    /// Ids of `<think>` / `</think>` when the tokenizer has them as single tokens.
    pub fn think_tokens(&self) -> Option<(TokenId, TokenId)> {
        self.think
    }
}

/// Tokenizes literal text that the grammar forces without turning it into added tokens.
///
/// A grammar literal such as a JSON `const` of `"<tool_call>"` equals the text of an added
/// token; the Hugging Face tokenizer would return the special id, which the byte-level mask
/// never allows, so the matcher would dead-end. Special ids in such output are re-tokenized
/// as plain bytes instead.
struct PlainLiterals {
    inner: ByteTokenizerEnv,
}

impl TokenizerEnv for PlainLiterals {
    fn tok_trie(&self) -> &TokTrie {
        self.inner.tok_trie()
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let trie = self.inner.tok_trie();
        let ids = self.inner.tokenize_bytes(s);
        if !ids.iter().any(|&t| trie.is_special_token(t)) {
            return ids;
        }
        let mut out = Vec::with_capacity(ids.len() + 4);
        for t in ids {
            if trie.is_special_token(t) {
                let text = trie.decode_ext(&[t], true);
                out.extend(trie.greedy_tokenize(&text));
            } else {
                out.push(t);
            }
        }
        out
    }

    fn tokenize_bytes_special(&self, s: &[u8]) -> Vec<TokenId> {
        self.inner.tokenize_bytes_special(s)
    }
}
