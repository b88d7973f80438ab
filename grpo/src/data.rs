//! Prompts for rollouts: the chat-templated prompt ids, the schema the answer must follow
//! and, when known, the reference object rewards compare against.

use serde_json::Value;
use thinkjson_model::{ChatTemplate, Tokenizer};
use thinkjson_synth::Row;

use crate::error::Result;

/// One RL prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoPrompt {
    /// The sample id (human feedback is keyed by it).
    pub id: String,
    pub prompt: Vec<u32>,
    pub schema: Value,
    pub reference: Option<Value>,
}

/// Rows left out of a prompt set: `(row id, reason)`.
pub type Dropped = Vec<(String, String)>;

/// Renders synthetic rows with `template` (generation prompt added) and encodes them.
/// Rows whose prompt is longer than `max_prompt_len` tokens are left out and returned as
/// `(row id, reason)`.
pub fn encode_prompts(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    rows: &[Row],
    max_prompt_len: usize,
) -> Result<(Vec<GrpoPrompt>, Dropped)> {
    let mut prompts = Vec::with_capacity(rows.len());
    let mut dropped = Vec::new();
    for row in rows {
        let messages = thinkjson_synth::prompt::messages_with(&row.text, &row.schema, thinkjson_model::ChatMessage::new);
        let ids = tokenizer.encode(&template.render(&messages, true)?)?;
        if ids.len() > max_prompt_len {
            dropped.push((row.id.clone(), format!("prompt has {} tokens, max_prompt_len is {max_prompt_len}", ids.len())));
            continue;
        }
        prompts.push(GrpoPrompt { id: row.id.clone(), prompt: ids, schema: row.schema.clone(), reference: Some(row.object.clone()) });
    }
    Ok((prompts, dropped))
}
