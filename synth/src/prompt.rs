//! The chat messages every stage uses (system instruction + text + schema), and the target
//! completion in the paper's `<think>…</think><answer>…</answer>` format.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One chat message (same field names as `thinkjson_model::ChatMessage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptMessage {
    pub role: String,
    pub content: String,
}

pub const SYSTEM_PROMPT: &str = "You convert unstructured manufacturing and quality records into JSON. \
First reason step by step inside <think> </think>: for each field of the schema, find its value in the text \
and normalise it to the schema's type and format. Then write only the JSON object, valid against the schema, \
inside <answer> </answer>.";

/// System + user messages for a (text, schema) pair.
pub fn messages(text: &str, schema: &Value) -> Vec<PromptMessage> {
    messages_with(text, schema, |role, content| PromptMessage { role: role.into(), content })
}

/// [`messages`] built by `make(role, content)` — e.g. `thinkjson_model::ChatMessage::new` —
/// so every stage renders the one prompt written here.
pub fn messages_with<M>(text: &str, schema: &Value, make: impl Fn(&str, String) -> M) -> Vec<M> {
    let schema = serde_json::to_string(schema).unwrap_or_default();
    vec![
        make("system", SYSTEM_PROMPT.into()),
        make("user", format!("Text:\n{text}\n\nJSON Schema:\n{schema}\n\nExtract the JSON object.")),
    ]
}

/// The assistant turn a trained model should produce.
pub fn completion(reasoning: &str, object: &Value) -> String {
    let json = serde_json::to_string(object).unwrap_or_default();
    format!("<think>\n{reasoning}\n</think>\n\n<answer>\n{json}\n</answer>")
}
