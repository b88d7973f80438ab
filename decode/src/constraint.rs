//! What a sequence may generate: nothing enforced, a JSON Schema, a Lark grammar, or the
//! paper's format — free reasoning in `<think>…</think>`, then schema-valid JSON inside
//! `<answer>…</answer>`. Each compiles to an llguidance grammar before any token is made.

use llguidance::api::TopLevelGrammar;
use llguidance::Matcher;
use serde_json::{json, Value};

use crate::env::ConstraintEnv;
use crate::error::{DecodeError, Result};
use crate::schema_check::{plan_schema, KeywordAt, Relax};

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

    /// The schema the JSON must satisfy, if any.
    pub fn schema(&self) -> Option<&Value> {
        match self {
            Constraint::JsonSchema { schema, .. } | Constraint::ThinkThenJson { schema, .. } => Some(schema),
            _ => None,
        }
    }

    /// Compiles against `env`; every schema problem is reported here, before generation.
    /// Keywords the grammar cannot express are left to validation against the full schema
    /// (see [`crate::schema_check`]).
    pub fn compile(&self, env: &ConstraintEnv) -> Result<Option<CompiledConstraint>> {
        match self {
            Constraint::None => Ok(None),
            Constraint::Lark(text) => {
                let prototype = build(env, TopLevelGrammar::from_lark(text.clone()))?;
                Ok(Some(CompiledConstraint { prototype, check: None, think_close: None }))
            }
            Constraint::JsonSchema { schema, style } => {
                compile_schema(env, schema, *style, AnswerLayout::Whole, |g| Ok(TopLevelGrammar::from_json_schema(g))).map(Some)
            }
            Constraint::ThinkThenJson { schema, max_think_tokens, style } => {
                let plain = env.think_tokens().is_none();
                let mut cc = compile_schema(env, schema, *style, AnswerLayout::Tagged, |g| {
                    Ok(TopLevelGrammar::from_lark(think_then_json_lark(env, &g, *max_think_tokens)?))
                })?;
                if plain && *max_think_tokens > 0 {
                    cc.think_close = Some(ThinkClose { tokens: env.tokenize(THINK_CLOSE), budget: *max_think_tokens });
                }
                Ok(Some(cc))
            }
        }
    }
}

/// The text that ends the reasoning.
pub(crate) const THINK_CLOSE: &str = "</think>";

/// Where the JSON sits in a constrained output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AnswerLayout {
    /// The whole output.
    Whole,
    /// Between `<answer>\n` and `\n</answer>`.
    Tagged,
}

impl AnswerLayout {
    pub(crate) fn json(self, text: &str) -> Option<&str> {
        match self {
            AnswerLayout::Whole => Some(text),
            AnswerLayout::Tagged => {
                let start = text.find("<answer>\n")? + "<answer>\n".len();
                let end = text.rfind("\n</answer>")?;
                text.get(start..end)
            }
        }
    }
}

/// The full-schema check of a finished output.
#[derive(Clone)]
pub(crate) struct OutputCheck {
    pub validator: std::sync::Arc<jsonschema::Validator>,
    pub layout: AnswerLayout,
    /// Keywords the grammar did not enforce (named when validation keeps failing).
    pub validated: Vec<KeywordAt>,
}

impl OutputCheck {
    /// `None` when the output's JSON is valid under the full schema, else why not.
    pub(crate) fn violation(&self, text: &str) -> Option<String> {
        let Some(json) = self.layout.json(text) else {
            return Some("no <answer> block".into());
        };
        let value: Value = match serde_json::from_str(json) {
            Ok(v) => v,
            Err(e) => return Some(format!("not JSON: {e}")),
        };
        let error = self.validator.iter_errors(&value).next()?;
        Some(format!("{error} (schema path {})", error.schema_path()))
    }
}

/// The plain-text `</think>` of a tokenizer without think tokens, and the reasoning budget the
/// generator enforces by writing it (a grammar token limit would end the reasoning without it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ThinkClose {
    pub tokens: Vec<u32>,
    pub budget: usize,
}

/// A compiled constraint; [`CompiledConstraint::matcher`] gives each sequence its own state.
#[derive(Clone)]
pub struct CompiledConstraint {
    prototype: Matcher,
    pub(crate) check: Option<OutputCheck>,
    pub(crate) think_close: Option<ThinkClose>,
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

    /// Keywords of the schema that the grammar leaves to validation of the finished output.
    pub fn validated_keywords(&self) -> &[KeywordAt] {
        self.check.as_ref().map_or(&[], |c| c.validated.as_slice())
    }
}

fn build(env: &ConstraintEnv, grammar: TopLevelGrammar) -> Result<Matcher> {
    let parser = env.factory().create_parser(grammar).map_err(|e| DecodeError::Grammar(e.to_string()))?;
    let prototype = Matcher::new(Ok(parser));
    if let Some(e) = prototype.get_error() {
        return Err(DecodeError::Grammar(e));
    }
    Ok(prototype)
}

/// Plans the schema, compiles the grammar (leaving to validation, step by step, what
/// llguidance reports it cannot compile: see [`Relax`]), and builds the full-schema validator.
fn compile_schema(
    env: &ConstraintEnv,
    schema: &Value,
    style: JsonStyle,
    layout: AnswerLayout,
    grammar: impl Fn(Value) -> Result<TopLevelGrammar>,
) -> Result<CompiledConstraint> {
    let mut relax = Relax::default();
    loop {
        let plan = plan_schema(schema, relax)?;
        match build(env, grammar(prepare_schema(plan.grammar, style)?)?) {
            Ok(prototype) => {
                let validator = jsonschema::validator_for(schema).map_err(|e| DecodeError::InvalidSchema {
                    pointer: e.instance_path().to_string(),
                    message: format!("the validator cannot compile it: {e}"),
                })?;
                let check = OutputCheck { validator: std::sync::Arc::new(validator), layout, validated: plan.validated };
                return Ok(CompiledConstraint { prototype, check: Some(check), think_close: None });
            }
            Err(DecodeError::Grammar(m)) => match relax.after(&m) {
                Some(next) => relax = next,
                None => return Err(DecodeError::Grammar(m)),
            },
            Err(e) => return Err(e),
        }
    }
}

/// Bounds open numbers and attaches the layout options llguidance reads from `x-guidance`.
fn prepare_schema(schema: Value, style: JsonStyle) -> Result<Value> {
    let mut schema = match schema {
        Value::Bool(true) => json!({}),
        Value::Bool(false) => {
            return Err(DecodeError::InvalidSchema {
                pointer: "/".into(),
                message: "the schema `false` accepts no value".into(),
            })
        }
        other => other,
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

/// `<think>…</think>\n\n<answer>\n{json}\n</answer>`. With think tokens the grammar bounds
/// the reasoning; with plain text the reasoning ends at the first `</think>`, which stays in
/// the output (`suffix`), and the generator enforces the budget (a grammar token limit would
/// end the reasoning without writing `</think>`). A zero budget leaves the reasoning empty.
fn think_then_json_lark(env: &ConstraintEnv, schema: &Value, max_think_tokens: usize) -> Result<String> {
    let json = serde_json::to_string(schema).map_err(|e| DecodeError::Input(format!("schema: {e}")))?;
    let answer = format!("answer[capture]: %json {json}\n");
    let tail = "\"\\n\\n<answer>\\n\" answer \"\\n</answer>\"";
    Ok(match (env.think_tokens(), max_think_tokens) {
        (Some(_), 0) => format!("start: <think> </think> {tail}\n{answer}"),
        // Special tokens: the reasoning cannot contain them, so any text is fine.
        (Some(_), budget) => format!("start: <think> think </think> {tail}\nthink[max_tokens={budget}]: /(.|\\n)*/\n{answer}"),
        (None, 0) => format!("start: \"<think></think>\" {tail}\n{answer}"),
        (None, _) => format!("start: \"<think>\" think {tail}\nthink[suffix=\"</think>\"]: /(.|\\n)*/\n{answer}"),
    })
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
                clamp_bound(map, "minimum", "exclusiveMinimum", -1);
                clamp_bound(map, "maximum", "exclusiveMaximum", 1);
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

/// Bounds one side (`sign` −1 for the lower, +1 for the upper) to ±(2^53 − 1) where it is
/// open or beyond that (a schema's `i64::MIN` bound is no bound a parser can meet exactly);
/// only ever tighter.
fn clamp_bound(map: &mut serde_json::Map<String, Value>, inclusive: &str, exclusive: &str, sign: i64) {
    let limit = sign * JSON_SAFE_INTEGER;
    let beyond = |v: Option<&Value>| v.and_then(Value::as_f64).is_some_and(|x| x * sign as f64 > JSON_SAFE_INTEGER as f64);
    if beyond(map.get(exclusive)) {
        map.remove(exclusive);
    }
    let open = !map.contains_key(inclusive) && !map.contains_key(exclusive);
    if open || beyond(map.get(inclusive)) {
        map.insert(inclusive.into(), Value::from(limit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_bounds_are_clamped_and_exclusive_ones_kept() {
        let mut s = json!({"type": "integer", "minimum": i64::MIN, "exclusiveMaximum": 10});
        bound_numbers(&mut s);
        assert_eq!(s["minimum"], json!(-JSON_SAFE_INTEGER));
        assert_eq!(s["exclusiveMaximum"], json!(10));
        assert!(s.get("maximum").is_none());
    }

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
