//! Schema-driven object generation: every object validates against the schema it came from.

use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::{Map, Value};

use crate::error::SynthError;
use crate::schema_ops::resolve;
use crate::values::{infer, leaf, node_type};

/// Probability that an optional property is present, and that a nullable value is null.
const OPTIONAL_PRESENT: f64 = 0.75;
const NULLABLE_NULL: f64 = 0.2;

/// Generates an object for `schema` (local `$ref`s resolved against it).
pub fn generate<R: Rng>(schema: &Value, rng: &mut R) -> Result<Value, SynthError> {
    node(schema, schema, "record", rng, 0)
}

fn node<R: Rng>(root: &Value, n: &Value, key: &str, rng: &mut R, depth: usize) -> Result<Value, SynthError> {
    if depth > 24 {
        return Err(SynthError::Invalid(format!("`{key}`: schema nests deeper than 24 levels (recursive $ref?)")));
    }
    let n = resolve(root, n);
    for combinator in ["anyOf", "oneOf"] {
        if let Some(branches) = n.get(combinator).and_then(Value::as_array) {
            let (nulls, others): (Vec<&Value>, Vec<&Value>) =
                branches.iter().partition(|b| resolve(root, b).get("type") == Some(&Value::from("null")));
            if !nulls.is_empty() && (others.is_empty() || rng.random_bool(NULLABLE_NULL)) {
                return Ok(Value::Null);
            }
            // oneOf needs exactly one match: always the first non-null branch.
            let branch = if combinator == "oneOf" { others.first() } else { others.choose(rng) };
            return match branch {
                Some(b) => node(root, b, key, rng, depth + 1),
                None => Ok(Value::Null),
            };
        }
    }
    let nullable = matches!(n.get("type"), Some(Value::Array(t)) if t.iter().any(|x| x == "null"));
    if nullable && rng.random_bool(NULLABLE_NULL) {
        return Ok(Value::Null);
    }
    let ty = if n.get("properties").is_some() { "object" } else { node_type(n) };
    match ty {
        "object" => {
            let required: Vec<&str> = n
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut out = Map::new();
            if let Some(props) = n.get("properties").and_then(Value::as_object) {
                for (k, p) in props {
                    if required.contains(&k.as_str()) || rng.random_bool(OPTIONAL_PRESENT) {
                        out.insert(k.clone(), node(root, p, k, rng, depth + 1)?);
                    }
                }
            }
            Ok(Value::Object(out))
        }
        "array" => {
            let min = n.get("minItems").and_then(Value::as_u64).unwrap_or(0) as usize;
            // Fewer items deeper down: nested arrays multiply, and texts must stay readable.
            let cap = if depth > 6 { 1 } else if depth > 3 { 2 } else { 3 };
            let max = n.get("maxItems").and_then(Value::as_u64).map_or(cap, |m| m as usize).min(cap).max(min);
            let count = rng.random_range(min.max(1).min(max)..=max);
            let items = n.get("items").cloned().unwrap_or(Value::Bool(true));
            (0..count).map(|_| node(root, &items, key, rng, depth + 1)).collect::<Result<Vec<_>, _>>().map(Value::Array)
        }
        _ => leaf(infer(key, n), n, rng),
    }
}
