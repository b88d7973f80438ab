//! Splitting a completion into its parts: `<think>`, `<answer>`, the JSON inside, and noise.

use serde::Serialize;
use serde_json::Value;

/// Where the JSON was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JsonForm {
    /// Inside `<answer>…</answer>` (optionally fenced there).
    Answer,
    /// A fenced ```json block outside answer tags.
    Fenced,
    /// A bare JSON object somewhere in the text.
    Bare,
    /// No JSON object found.
    Missing,
}

/// A completion taken apart.
#[derive(Debug, Clone, Serialize)]
pub struct Parsed {
    pub think: Option<String>,
    pub answer: Option<String>,
    pub form: JsonForm,
    /// The parsed JSON (objects or arrays only), if it parses.
    pub json: Option<Value>,
    /// Why the JSON text did not parse.
    pub json_error: Option<String>,
    /// Tag counts and order, for the format reward.
    pub think_open: usize,
    pub think_close: usize,
    pub answer_open: usize,
    pub answer_close: usize,
    /// `<think>` block ends before `<answer>` starts.
    pub ordered: bool,
    /// Non-whitespace characters outside the think block, the JSON text and the tags.
    pub noise_chars: usize,
    /// Non-whitespace characters in the whole completion.
    pub total_chars: usize,
}

impl Parsed {
    /// Share of the completion that is neither reasoning, nor tags, nor the JSON, in [0, 1].
    pub fn noise_share(&self) -> f64 {
        if self.total_chars == 0 {
            0.0
        } else {
            self.noise_chars as f64 / self.total_chars as f64
        }
    }

    /// Exactly one think block followed by exactly one answer block.
    pub fn format_ok(&self) -> bool {
        self.think_open == 1 && self.think_close == 1 && self.answer_open == 1 && self.answer_close == 1 && self.ordered
    }
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const ANSWER_OPEN: &str = "<answer>";
const ANSWER_CLOSE: &str = "</answer>";

/// Byte range of the text between the first `open` and the first `close` after it.
fn block(text: &str, open: &str, close: &str) -> Option<(usize, usize, usize, usize)> {
    let start = text.find(open)?;
    let inner = start + open.len();
    let end = text[inner..].find(close)? + inner;
    Some((start, inner, end, end + close.len()))
}

fn non_ws(s: &str) -> usize {
    s.chars().filter(|c| !c.is_whitespace()).count()
}

/// Parses a completion. Linear in its length; never recurses on the input's nesting
/// (serde_json's depth limit stops hostile JSON).
pub fn parse(text: &str) -> Parsed {
    let think = block(text, THINK_OPEN, THINK_CLOSE);
    let answer = block(text, ANSWER_OPEN, ANSWER_CLOSE);
    let ordered = match (think, answer) {
        (Some((_, _, _, t_end)), Some((a_start, _, _, _))) => t_end <= a_start,
        _ => false,
    };
    // Where the JSON text is: answer block, else a fenced block, else the first bare object.
    let (form, json_range) = match answer {
        Some((_, inner, end, _)) => {
            let body = &text[inner..end];
            match fenced(body) {
                Some((s, e)) => (JsonForm::Answer, Some((inner + s, inner + e))),
                None => {
                    let trimmed_start = inner + (body.len() - body.trim_start().len());
                    let trimmed_end = inner + body.trim_end().len();
                    (JsonForm::Answer, Some((trimmed_start, trimmed_end.max(trimmed_start))))
                }
            }
        }
        None => match fenced(text) {
            Some(r) => (JsonForm::Fenced, Some(r)),
            None => match bare_object(text, think.map_or(0, |t| t.3)) {
                Some(r) => (JsonForm::Bare, Some(r)),
                None => (JsonForm::Missing, None),
            },
        },
    };
    let (json, json_error) = match json_range {
        Some((s, e)) => match serde_json::from_str::<Value>(&text[s..e]) {
            Ok(v @ (Value::Object(_) | Value::Array(_))) => (Some(v), None),
            Ok(other) => (None, Some(format!("answer is a JSON {}, not an object", kind(&other)))),
            Err(err) => (None, Some(err.to_string())),
        },
        None => (None, Some("no JSON found".to_string())),
    };
    // Noise: everything not inside the think block, not the JSON text, not a tag.
    let mut covered: Vec<(usize, usize)> = Vec::new();
    if let Some((s, _, _, e)) = think {
        covered.push((s, e));
    }
    if let Some((s, e)) = json_range {
        covered.push((s, e));
    }
    if let Some((s, inner, end, e)) = answer {
        covered.push((s, inner));
        covered.push((end, e));
    }
    covered.sort_unstable();
    let mut noise = 0;
    let mut pos = 0;
    for (s, e) in covered {
        if s > pos {
            noise += non_ws(&text[pos..s]);
        }
        pos = pos.max(e);
    }
    noise += non_ws(&text[pos.min(text.len())..]);
    // Fence markers inside the answer count as (small) noise only through the text outside the range.
    Parsed {
        think: think.map(|(_, i, e, _)| text[i..e].to_string()),
        answer: answer.map(|(_, i, e, _)| text[i..e].to_string()),
        form,
        json,
        json_error,
        think_open: text.matches(THINK_OPEN).count(),
        think_close: text.matches(THINK_CLOSE).count(),
        answer_open: text.matches(ANSWER_OPEN).count(),
        answer_close: text.matches(ANSWER_CLOSE).count(),
        ordered,
        noise_chars: noise,
        total_chars: non_ws(text),
    }
}

/// Parses raw bytes (model output may not be UTF-8): invalid sequences become U+FFFD.
pub fn parse_bytes(bytes: &[u8]) -> Parsed {
    parse(&String::from_utf8_lossy(bytes))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The inside of the first ```json (or ```) fence.
fn fenced(text: &str) -> Option<(usize, usize)> {
    let open = text.find("```")?;
    let after = open + 3;
    let line_end = text[after..].find('\n').map_or(text.len(), |i| after + i + 1);
    let lang = text[after..line_end].trim();
    if !(lang.is_empty() || lang.eq_ignore_ascii_case("json")) {
        return None;
    }
    let close = text[line_end..].find("```")? + line_end;
    Some((line_end, close))
}

/// The first `{…}` that parses as one JSON value, searched from `from`.
fn bare_object(text: &str, from: usize) -> Option<(usize, usize)> {
    let start = text.get(from..)?.find('{')? + from;
    let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
    match stream.next() {
        Some(Ok(_)) => Some((start, start + stream.byte_offset())),
        // Unparseable: report the rest of the text as the JSON attempt, so the error surfaces.
        _ => Some((start, text.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed() {
        let p = parse("<think>\nlot is A\n</think>\n\n<answer>\n{\"lot\": \"A\"}\n</answer>");
        assert!(p.format_ok());
        assert_eq!(p.form, JsonForm::Answer);
        assert_eq!(p.json, Some(serde_json::json!({"lot": "A"})));
        assert_eq!(p.noise_chars, 0);
    }

    #[test]
    fn fenced_and_bare_and_noise() {
        let p = parse("Sure! ```json\n{\"a\": 1}\n``` hope it helps");
        assert_eq!(p.form, JsonForm::Fenced);
        assert_eq!(p.json, Some(serde_json::json!({"a": 1})));
        assert!(p.noise_chars > 10 && !p.format_ok());
        let b = parse("Here: {\"a\": [1, 2]} done");
        assert_eq!(b.form, JsonForm::Bare);
        assert_eq!(b.json, Some(serde_json::json!({"a": [1, 2]})));
        assert_eq!(b.noise_chars, "Here:done".len());
        let m = parse("no json at all");
        assert_eq!(m.form, JsonForm::Missing);
        assert!(m.json.is_none() && m.json_error.is_some());
    }

    #[test]
    fn unbalanced_and_misordered_tags() {
        let p = parse("<answer>{\"a\":1}</answer><think>late</think>");
        assert!(!p.ordered && !p.format_ok());
        let q = parse("<think>never closed <answer>{}");
        assert!(q.answer.is_none() && !q.format_ok());
        let r = parse("<think>a</think><think>b</think><answer>{}</answer>");
        assert_eq!(r.think_open, 2);
        assert!(!r.format_ok());
    }
}
