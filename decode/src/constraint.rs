//! What a sequence may generate: nothing enforced, a JSON Schema, a Lark grammar, or the
//! paper's format — free reasoning in `<think>…</think>`, then schema-valid JSON inside
//! `<answer>…</answer>`. Each compiles to an llguidance grammar before any token is made.

use llguidance::api::TopLevelGrammar;
use llguidance::Matcher;
use serde_json::{json, Value};

use crate::env::ConstraintEnv;
use crate::error::{DecodeError, Result};
use crate::schema_check::check_schema;

/// How the JSON may be laid out. Property order is always the schema's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "style")]
pub enum JsonStyle {
    /// `{"a":1,"b":[2,3]}` — what `serde_json::to_string` and the synthetic targets use.
    #[default]
    Compact,
    /// `{"a": 1, "b": [2, 3]}` — Python's `json.dumps` default.
    Spaced,
    /// Any whitespace between tokens, at most `max_whitespace` characters at a time, so a
    /// small model cannot loop on newlines until the length limit.
    Flexible { max_whitespace: usize },
}

impl JsonStyle {
    /// llguidance's options. `\u` escapes are left out: `\ud800` alone matches the JSON
    /// grammar but is no Unicode text, and `serde_json` rejects it. Every character can still
    /// be written as itself.
    fn options(self) -> Value {
        let mut options = match self {
            JsonStyle::Compact => json!({"whitespace_flexible": false, "item_separator": ",", "key_separator": ":"}),
            JsonStyle::Spaced => json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            JsonStyle::Flexible { max_whitespace } => json!({
                "whitespace_flexible": true,
                "whitespace_pattern": format!("[\\x20\\x0A\\x0D\\x09]{{0,{max_whitespace}}}"),
            }),
        };
        options["json_allowed_escapes"] = Value::from("nrbtf\"\\");
        options
    }
}

/// A per-sequence generation constraint.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Constraint {
    #[default]
    None,
    /// The whole completion is one JSON value valid against `schema`.
    JsonSchema { schema: Value, style: JsonStyle },
    /// A grammar in llguidance's Lark dialect (`%json {…}` embeds a schema).
    Lark(String),
    /// `<think>` free text of at most `max_think_tokens` tokens `</think>`, a blank line,
    /// `<answer>`, the JSON, `</answer>` — the exact layout of the training targets.
    ThinkThenJson { schema: Value, max_think_tokens: usize, style: JsonStyle },
}

impl Constraint {
    pub fn json_schema(schema: Value) -> Self {
        Constraint::JsonSchema { schema, style: JsonStyle::default() }
    }

    pub fn think_then_json(schema: Value, max_think_tokens: usize) -> Self {
        Constraint::ThinkThenJson { schema, max_think_tokens, style: JsonStyle::default() }
    }

    /// Compiles against `env`; every schema problem is reported here, before generation.
    pub fn compile(&self, env: &ConstraintEnv) -> Result<Option<CompiledConstraint>> {
        let grammar = match self {
            Constraint::None => return Ok(None),
            Constraint::JsonSchema { schema, style } => {
                TopLevelGrammar::from_json_schema(prepare_schema(schema, *style)?)
            }
            Constraint::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Constraint::ThinkThenJson { schema, max_think_tokens, style } => {
                let schema = prepare_schema(schema, *style)?;
                TopLevelGrammar::from_lark(think_then_json_lark(env, &schema, *max_think_tokens))
            }
        };
        let parser = env
            .factory()
            .create_parser(grammar)
            .map_err(|e| DecodeError::Grammar(e.to_string()))?;
        let prototype = Matcher::new(Ok(parser));
        if let Some(e) = prototype.get_error() {
            return Err(DecodeError::Grammar(e));
        }
        Ok(Some(CompiledConstraint { prototype }))
    }
}

/// A compiled constraint; [`CompiledConstraint::matcher`] gives each sequence its own state.
#[derive(Clone)]
pub struct CompiledConstraint {
    prototype: Matcher,
}

impl std::fmt::Debug for CompiledConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompiledConstraint")
    }
}

impl CompiledConstraint {
    /// A fresh matcher at the start of the grammar.
    pub fn matcher(&self) -> Matcher {
        self.prototype.deep_clone()
    }
}

/// Checks the schema, bounds open numbers, and attaches the layout options llguidance reads
/// from `x-guidance`.
fn prepare_schema(schema: &Value, style: JsonStyle) -> Result<Value> {
    check_schema(schema)?;
    let mut schema = match schema {
        Value::Bool(true) => json!({}),
        Value::Bool(false) => {
            return Err(DecodeError::InvalidSchema {
                pointer: "/".into(),
                message: "the schema `false` accepts no value".into(),
            })
        }
        other => other.clone(),
    };
    bound_numbers(&mut schema);
    let Some(map) = schema.as_object_mut() else {
        return Err(DecodeError::InvalidSchema { pointer: "/".into(), message: "not an object".into() });
    };
    match map.get("x-guidance") {
        // Lenient mode silently drops keywords it cannot enforce: never allowed.
        Some(opts) if opts.get("lenient") == Some(&Value::Bool(true)) => {
            return Err(DecodeError::UnsupportedKeyword {
                keyword: "x-guidance.lenient".into(),
                pointer: "/x-guidance".into(),
            })
        }
        Some(_) => {}
        None => {
            map.insert("x-guidance".into(), style.options());
        }
    }
    Ok(schema)
}

fn think_then_json_lark(env: &ConstraintEnv, schema: &Value, max_think_tokens: usize) -> String {
    let budget = max_think_tokens.max(1);
    let json = serde_json::to_string(schema).unwrap_or_default();
    match env.think_tokens() {
        // Special tokens: the reasoning cannot contain them, so any text is fine.
        Some(_) => format!(
            "start: <think> think </think> \"\\n\\n<answer>\\n\" answer \"\\n</answer>\"\n\
             think[max_tokens={budget}]: /(.|\\n)*/\n\
             answer[capture]: %json {json}\n"
        ),
        // Plain text: the reasoning ends at the first `</think>`.
        None => format!(
            "start: \"<think>\" think \"\\n\\n<answer>\\n\" answer \"\\n</answer>\"\n\
             think[stop=\"</think>\", max_tokens={budget}]: /(.|\\n)*/\n\
             answer[capture]: %json {json}\n"
        ),
    }
}

/// The largest integer every JSON parser reads exactly (2^53 − 1).
pub(crate) const JSON_SAFE_INTEGER: i64 = 9_007_199_254_740_991;

/// Gives every `number` / `integer` without a bound on a side the bound ±(2^53 − 1), so a
/// model cannot write hundreds of digits that the grammar accepts but no f64 parser reads
/// (`serde_json` rejects them as out of range). Stricter than the schema, never looser:
/// every output still validates.
fn bound_numbers(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let numeric = match map.get("type") {
                Some(Value::String(t)) => t == "number" || t == "integer",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "number" || t == "integer"),
                _ => false,
            };
            if numeric {
                if !map.contains_key("minimum") && !map.contains_key("exclusiveMinimum") {
                    map.insert("minimum".into(), Value::from(-JSON_SAFE_INTEGER));
                }
                if !map.contains_key("maximum") && !map.contains_key("exclusiveMaximum") {
                    map.insert("maximum".into(), Value::from(JSON_SAFE_INTEGER));
                }
            }
            for (key, child) in map.iter_mut() {
                // Values, not schemas.
                if !matches!(key.as_str(), "enum" | "const" | "default" | "examples" | "x-guidance") {
                    bound_numbers(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound_numbers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_numbers_get_safe_bounds_and_values_are_left_alone() {
        let mut s = json!({
            "type": "object",
            "properties": {
                "n": {"type": ["number", "null"]},
                "k": {"type": "integer", "minimum": 0},
                "type": {"type": "string", "const": {"type": "number"}}
            }
        });
        bound_numbers(&mut s);
        assert_eq!(s["properties"]["n"]["minimum"], json!(-JSON_SAFE_INTEGER));
        assert_eq!(s["properties"]["n"]["maximum"], json!(JSON_SAFE_INTEGER));
        assert_eq!(s["properties"]["k"]["minimum"], json!(0));
        assert_eq!(s["properties"]["k"]["maximum"], json!(JSON_SAFE_INTEGER));
        assert_eq!(s["properties"]["type"]["const"], json!({"type": "number"}));
    }
}
