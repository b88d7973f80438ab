//! Prompts from chat messages, rendered with the model's own chat template.

use thinkjson_model::{ChatMessage, ChatTemplate, Tokenizer};

use crate::error::Result;

/// Renders `messages` with the generation prompt (the assistant turn opened) and encodes
/// the text; special tokens written by the template become their ids.
pub fn chat_prompt(template: &ChatTemplate, tokenizer: &Tokenizer, messages: &[ChatMessage]) -> Result<Vec<u32>> {
    let text = template.render(messages, true)?;
    Ok(tokenizer.encode(&text)?)
}
