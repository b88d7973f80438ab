//! Examples → token ids: the prompt rendered with the model's chat template, the completion
//! (`<think>…</think>\n\n<answer>…</answer>`) encoded after it and closed with the template's
//! end-of-turn token. Only completion tokens carry loss.

use serde::{Deserialize, Serialize};
use thinkjson_model::{ChatMessage, ChatTemplate, Tokenizer};
use thinkjson_synth::{prompt, Row};

use crate::error::{Result, SftError};

/// One training example as token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftExample {
    pub id: String,
    pub prompt: Vec<u32>,
    /// Ends with the end-of-turn token, so the model learns to stop.
    pub completion: Vec<u32>,
}

impl SftExample {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What encoding did to a set of rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EncodeReport {
    pub examples: usize,
    /// Examples whose completion was cut to fit `max_len`.
    pub truncated: usize,
    /// `(row id, reason)` of rows left out (prompt alone too long, nothing to learn).
    pub dropped: Vec<(String, String)>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// The outcome of encoding one example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    Kept { example: SftExample, truncated: bool },
    Dropped(String),
}

/// Turns (messages, completion text) into [`SftExample`]s for one model.
pub struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    template: &'a ChatTemplate,
    end_of_turn: u32,
    max_len: usize,
}

impl<'a> Encoder<'a> {
    /// The end-of-turn token is the tokenizer's first end-of-sequence id (`<|im_end|>` for
    /// Qwen chat models), the one generation stops on.
    pub fn new(tokenizer: &'a Tokenizer, template: &'a ChatTemplate, max_len: usize) -> Result<Self> {
        let end_of_turn = tokenizer
            .special()
            .eos_ids
            .first()
            .copied()
            .ok_or_else(|| SftError::Data("the tokenizer names no end-of-sequence token to close completions".into()))?;
        Ok(Self {
            tokenizer,
            template,
            end_of_turn,
            max_len,
        })
    }

    /// Encodes one example, cutting the completion's end if prompt + completion exceed
    /// `max_len`; an example whose prompt leaves no room for one completion token is dropped.
    pub fn encode(&self, id: &str, messages: &[ChatMessage], completion: &str) -> Result<Encoded> {
        let text = self.template.render(messages, true)?;
        let prompt = self.tokenizer.encode(&text)?;
        if prompt.len() >= self.max_len {
            return Ok(Encoded::Dropped(format!(
                "prompt has {} tokens, max_len is {}",
                prompt.len(),
                self.max_len
            )));
        }
        let mut completion_ids = self.tokenizer.encode(completion)?;
        completion_ids.push(self.end_of_turn);
        let room = self.max_len - prompt.len();
        let truncated = completion_ids.len() > room;
        completion_ids.truncate(room);
        Ok(Encoded::Kept {
            example: SftExample {
                id: id.to_string(),
                prompt,
                completion: completion_ids,
            },
            truncated,
        })
    }

    /// Encodes synthetic rows: the shared prompt of `synth::prompt` and its target completion.
    pub fn encode_rows(&self, rows: &[Row]) -> Result<(Vec<SftExample>, EncodeReport)> {
        let mut report = EncodeReport::default();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let messages = chat_messages(&row.text, &row.schema);
            let target = prompt::completion(&row.reasoning, &row.object);
            match self.encode(&row.id, &messages, &target)? {
                Encoded::Kept { example, truncated } => {
                    report.truncated += usize::from(truncated);
                    report.prompt_tokens += example.prompt.len();
                    report.completion_tokens += example.completion.len();
                    out.push(example);
                }
                Encoded::Dropped(reason) => report.dropped.push((row.id.clone(), reason)),
            }
        }
        report.examples = out.len();
        Ok((out, report))
    }
}

/// `synth`'s system + user messages as chat messages.
pub fn chat_messages(text: &str, schema: &serde_json::Value) -> Vec<ChatMessage> {
    prompt::messages_with(text, schema, ChatMessage::new)
}
