//! The OpenAI wire format: what a request may hold, how it becomes our generation
//! settings, and the error shape. Every field a request sends is either used or refused by
//! name — never silently ignored.

use serde_json::{json, Map, Value};
use thinkjson_decode::{Constraint, SamplingConfig};
use thinkjson_model::ChatMessage;

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self { status: 400, message: message.into(), kind: "invalid_request_error", param: param.map(str::to_string), code: None }
    }

    pub fn with_code(mut self, status: u16, code: &'static str) -> Self {
        self.status = status;
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// Request fields read by both endpoints, and what each endpoint adds.
const COMMON_FIELDS: &[&str] = &["model", "temperature", "top_p", "max_tokens", "seed", "stop", "n", "stream", "stream_options", "user"];
const CHAT_FIELDS: &[&str] = &["messages", "max_completion_tokens", "response_format", "reasoning_effort", "max_reasoning_tokens", "metadata", "store"];
const COMPLETION_FIELDS: &[&str] = &["prompt"];

/// Limits the server enforces on every request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest `n`.
    pub max_n: usize,
    /// Largest `max_tokens`; also the default when a request gives none.
    pub max_tokens: usize,
    /// The model's context: prompt + max_tokens must fit.
    pub context: usize,
    /// Reasoning budgets of `reasoning_effort` low / medium / high.
    pub effort_tokens: [usize; 3],
    /// KV positions the running batch may hold: its choices' reserves (prompt + max_tokens
    /// each) summed, and its padded cache (choices × the longest reserve); a request needing
    /// more alone is refused.
    pub max_batch_tokens: usize,
}

/// A request made ready for the engine.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub model: String,
    pub n: usize,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    /// `None`: the server picks a seed per request.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub constraint: Constraint,
    /// Reasoning first: the text holds `<think>…</think>` then `<answer>` JSON `</answer>`.
    pub reasoning: bool,
    pub input: Input,
}

/// What the model is given.
#[derive(Debug, Clone)]
pub enum Input {
    Chat(Vec<ChatMessage>),
    Text(String),
}

fn number(v: &Value, field: &str) -> Result<f64, ApiError> {
    v.as_f64().ok_or_else(|| ApiError::invalid(format!("`{field}` must be a number"), Some(field)))
}

fn count(v: &Value, field: &str) -> Result<usize, ApiError> {
    v.as_u64().map(|n| n as usize).ok_or_else(|| ApiError::invalid(format!("`{field}` must be a non-negative integer"), Some(field)))
}

/// Parses a `/v1/chat/completions` (`chat`) or `/v1/completions` body.
pub fn parse(body: &Value, chat: bool, limits: &Limits) -> Result<Parsed, ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::invalid("the request body must be a JSON object", None));
    };
    for (key, value) in obj {
        let known = COMMON_FIELDS.contains(&key.as_str()) || (if chat { CHAT_FIELDS } else { COMPLETION_FIELDS }).contains(&key.as_str());
        let neutral = value.is_null() || neutral_value(key, value);
        if !known && !neutral {
            return Err(ApiError::invalid(format!("unsupported parameter `{key}`: this server does not implement it, and does not ignore it"), Some(key)));
        }
    }
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => return Err(ApiError::invalid("`model` is required (a string)", Some("model"))),
    };
    let n = match obj.get("n").filter(|v| !v.is_null()) {
        Some(v) => count(v, "n")?,
        None => 1,
    };
    if n == 0 || n > limits.max_n {
        return Err(ApiError::invalid(format!("`n` = {n} is outside 1..={}", limits.max_n), Some("n")));
    }
    let max_field = if chat && obj.get("max_completion_tokens").is_some_and(|v| !v.is_null()) { "max_completion_tokens" } else { "max_tokens" };
    let max_tokens = match obj.get(max_field).filter(|v| !v.is_null()) {
        Some(v) => count(v, max_field)?,
        None => limits.max_tokens,
    };
    if max_tokens > limits.max_tokens {
        return Err(ApiError::invalid(format!("`{max_field}` = {max_tokens} is above this server's limit of {}", limits.max_tokens), Some(max_field)));
    }
    let temperature = match obj.get("temperature").filter(|v| !v.is_null()) {
        Some(v) => number(v, "temperature")?,
        None => 1.0,
    };
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(format!("`temperature` = {temperature} is outside [0, 2]"), Some("temperature")));
    }
    let top_p = match obj.get("top_p").filter(|v| !v.is_null()) {
        Some(v) => number(v, "top_p")?,
        None => 1.0,
    };
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(format!("`top_p` = {top_p} is outside (0, 1]"), Some("top_p")));
    }
    let seed = match obj.get("seed").filter(|v| !v.is_null()) {
        Some(v) => Some(v.as_i64().map(|s| s as u64).or_else(|| v.as_u64()).ok_or_else(|| ApiError::invalid("`seed` must be an integer", Some("seed")))?),
        None => None,
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid("`stop` must hold strings", Some("stop"))))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid("`stop` must be a string or up to 4 strings", Some("stop"))),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("`stream` must be a boolean", Some("stream"))),
    };
    let include_usage = obj.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let sampling = if temperature == 0.0 {
        SamplingConfig::greedy()
    } else {
        SamplingConfig { temperature: temperature as f32, top_p: top_p as f32, ..SamplingConfig::default() }
    };
    let (input, constraint, reasoning) = if chat {
        let messages = messages(obj.get("messages"))?;
        let (constraint, reasoning) = output_format(obj, limits)?;
        (Input::Chat(messages), constraint, reasoning)
    } else {
        let prompt = match obj.get("prompt") {
            Some(Value::String(p)) => p.clone(),
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => items[0].as_str().unwrap_or_default().to_string(),
            Some(Value::Array(_)) => return Err(ApiError::invalid("`prompt` arrays hold exactly one string here; send one request per prompt", Some("prompt"))),
            _ => return Err(ApiError::invalid("`prompt` is required (a string)", Some("prompt"))),
        };
        (Input::Text(prompt), Constraint::None, false)
    };
    Ok(Parsed { model, n, max_tokens, sampling, seed, stop, stream, include_usage, constraint, reasoning, input })
}

/// Fields some clients always send, accepted at the value that changes nothing.
fn neutral_value(key: &str, value: &Value) -> bool {
    match key {
        "frequency_penalty" | "presence_penalty" => value.as_f64() == Some(0.0),
        "logprobs" | "echo" | "parallel_tool_calls" => value == &Value::Bool(false),
        "logit_bias" => value.as_object().is_some_and(Map::is_empty),
        "tools" => value.as_array().is_some_and(Vec::is_empty),
        "tool_choice" => value == "none",
        _ => false,
    }
}

fn messages(value: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(items)) = value else {
        return Err(ApiError::invalid("`messages` is required (an array)", Some("messages")));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("`messages` is empty", Some("messages")));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(format!("{at}.role is required"), Some(&at)))?;
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => return Err(ApiError::invalid(format!("{at}.role `{other}` is not supported (system, developer, user, assistant)"), Some(&at))),
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (k, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(format!("{at}.content[{k}]: part type {kind:?} is not supported (text only)"), Some(&at)));
                        }
                    }
                }
                text
            }
            _ => return Err(ApiError::invalid(format!("{at}.content must be a string or text parts"), Some(&at))),
        };
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

/// `response_format` and the reasoning fields → the constraint.
fn output_format(obj: &Map<String, Value>, limits: &Limits) -> Result<(Constraint, bool), ApiError> {
    let schema = match obj.get("response_format").filter(|v| !v.is_null()) {
        None => None,
        Some(rf) => match rf.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(json!({"type": "object"})),
            Some("json_schema") => {
                let js = rf.get("json_schema").ok_or_else(|| ApiError::invalid("response_format.json_schema is required", Some("response_format.json_schema")))?;
                if js.get("name").is_some_and(|n| !n.is_string()) {
                    return Err(ApiError::invalid("response_format.json_schema.name must be a string", Some("response_format.json_schema.name")));
                }
                match js.get("schema") {
                    Some(s) if s.is_object() || s.is_boolean() => Some(s.clone()),
                    _ => return Err(ApiError::invalid("response_format.json_schema.schema is required (a JSON Schema)", Some("response_format.json_schema.schema"))),
                }
            }
            other => return Err(ApiError::invalid(format!("response_format.type {other:?} is not one of text, json_object, json_schema"), Some("response_format.type"))),
        },
    };
    let budget = match (obj.get("reasoning_effort").filter(|v| !v.is_null()), obj.get("max_reasoning_tokens").filter(|v| !v.is_null())) {
        (_, Some(v)) => Some(count(v, "max_reasoning_tokens")?),
        (Some(e), None) => Some(match e.as_str() {
            Some("low" | "minimal") => limits.effort_tokens[0],
            Some("medium") => limits.effort_tokens[1],
            Some("high") => limits.effort_tokens[2],
            _ => return Err(ApiError::invalid("`reasoning_effort` must be minimal, low, medium or high", Some("reasoning_effort"))),
        }),
        (None, None) => None,
    };
    Ok(match (schema, budget) {
        (None, None) => (Constraint::None, false),
        (Some(schema), None) => (Constraint::json_schema(schema), false),
        (Some(schema), Some(b)) => (Constraint::think_then_json(schema, b), true),
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "reasoning (reasoning_effort / max_reasoning_tokens) is given before JSON: it needs response_format json_schema or json_object",
                Some("reasoning_effort"),
            ))
        }
    })
}

/// The reasoning and the content of a think-then-JSON text (or a prefix of one, while it
/// streams): a tag cut at the end of a prefix is held back, so both parts only grow.
pub fn split_reasoning(text: &str) -> (String, String) {
    const OPEN: &str = "<think>";
    const CLOSE: &str = "</think>";
    const ANSWER: &str = "<answer>\n";
    const END: &str = "\n</answer>";
    let Some(body) = text.strip_prefix(OPEN) else {
        return (String::new(), String::new());
    };
    let reasoning = match body.find(CLOSE) {
        Some(end) => &body[..end],
        None => &body[..body.len() - partial_tag(body, CLOSE)],
    };
    let content = match body.find(ANSWER) {
        Some(start) => {
            let rest = &body[start + ANSWER.len()..];
            match rest.find(END) {
                Some(end) => &rest[..end],
                None => &rest[..rest.len() - partial_tag(rest, END)],
            }
        }
        None => "",
    };
    (reasoning.to_string(), content.to_string())
}

/// Length of the longest end of `text` that begins `tag` (a tag still being written).
pub fn partial_tag(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1)).rev().find(|&k| text.is_char_boundary(text.len() - k) && tag.starts_with(&text[text.len() - k..])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_n: 4, max_tokens: 256, context: 2048, effort_tokens: [32, 128, 512], max_batch_tokens: 8192 }
    }

    #[test]
    fn reasoning_and_content_split_and_only_grow() {
        let full = "<think>The lot is A-1.</think>\n\n<answer>\n{\"lot\":\"A-1\"}\n</answer>";
        assert_eq!(split_reasoning(full), ("The lot is A-1.".to_string(), "{\"lot\":\"A-1\"}".to_string()));
        let (mut r0, mut c0) = (String::new(), String::new());
        for end in (0..=full.len()).filter(|&e| full.is_char_boundary(e)) {
            let (r, c) = split_reasoning(&full[..end]);
            assert!(r.starts_with(&r0) && c.starts_with(&c0), "{end}: {r:?} {c:?}");
            (r0, c0) = (r, c);
        }
    }

    #[test]
    fn fields_are_used_or_refused_by_name() {
        let ok = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}, "reasoning_effort": "low"});
        let p = parse(&ok, true, &limits()).expect("parses");
        assert!(p.reasoning && matches!(p.constraint, Constraint::ThinkThenJson { max_think_tokens: 32, .. }));
        let cases = [
            (json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}}), "logit_bias"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 9}), "n"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 999}), "max_tokens"),
            (json!({"model": "m", "messages": [{"role": "tool", "content": "hi"}]}), "messages[0]"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low"}), "reasoning_effort"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}), "response_format.type"),
        ];
        for (body, param) in cases {
            let e = parse(&body, true, &limits()).expect_err(param);
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{}", e.message);
        }
    }
}
