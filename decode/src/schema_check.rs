//! Up-front check of a JSON Schema against what the constrained decoder enforces, so an
//! unsupported keyword is an error naming the keyword and its JSON pointer instead of a
//! silently unconstrained (or half-constrained) run.

use serde_json::Value;

use crate::error::{DecodeError, Result};

/// Keywords of JSON Schema (drafts 4 to 2020-12) that change what validates and that the
/// decoder cannot enforce.
pub const UNSUPPORTED_KEYWORDS: &[&str] = &[
    "not",
    "if",
    "then",
    "else",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "$dynamicRef",
    "$dynamicAnchor",
    "$recursiveRef",
    "$recursiveAnchor",
    "contentSchema",
];

/// String formats the decoder enforces (llguidance's built-in regexes).
pub const SUPPORTED_FORMATS: &[&str] = &[
    "date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri", "unknown",
];

/// Keywords whose value is one subschema.
const SCHEMA_KEYWORDS: &[&str] = &["additionalProperties", "additionalItems", "items"];
/// Keywords whose value is an array of subschemas.
const SCHEMA_ARRAY_KEYWORDS: &[&str] = &["anyOf", "oneOf", "allOf", "prefixItems", "items"];
/// Keywords whose value maps names to subschemas.
const SCHEMA_MAP_KEYWORDS: &[&str] = &["properties", "patternProperties", "$defs", "definitions"];

/// Rejects an invalid schema (checked against its meta-schema) or one using a keyword,
/// `format` or reference the decoder cannot enforce.
pub fn check_schema(schema: &Value) -> Result<()> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(DecodeError::InvalidSchema {
            pointer: String::new(),
            message: format!("a schema must be an object or a boolean, got {}", kind(schema)),
        });
    }
    if let Err(e) = jsonschema::meta::validate(schema) {
        return Err(DecodeError::InvalidSchema {
            pointer: e.instance_path().to_string(),
            message: e.to_string(),
        });
    }
    walk(schema, &mut String::new())
}

fn walk(schema: &Value, pointer: &mut String) -> Result<()> {
    let Some(map) = schema.as_object() else {
        return Ok(()); // `true` / `false`
    };
    for (key, value) in map {
        if UNSUPPORTED_KEYWORDS.contains(&key.as_str()) {
            return Err(DecodeError::UnsupportedKeyword {
                keyword: key.clone(),
                pointer: at(pointer),
            });
        }
        let len = pointer.len();
        push(pointer, key);
        match key.as_str() {
            "$ref" => {
                if let Some(r) = value.as_str() {
                    if !r.starts_with('#') {
                        return Err(DecodeError::RemoteRef {
                            reference: r.to_string(),
                            pointer: at(pointer),
                        });
                    }
                }
            }
            "format" => {
                if let Some(f) = value.as_str() {
                    if !SUPPORTED_FORMATS.contains(&f) {
                        return Err(DecodeError::UnknownFormat {
                            format: f.to_string(),
                            pointer: at(pointer),
                            supported: SUPPORTED_FORMATS.join(", "),
                        });
                    }
                }
            }
            k if SCHEMA_MAP_KEYWORDS.contains(&k) => {
                if let Some(children) = value.as_object() {
                    for (name, child) in children {
                        let l = pointer.len();
                        push(pointer, name);
                        walk(child, pointer)?;
                        pointer.truncate(l);
                    }
                }
            }
            k if SCHEMA_ARRAY_KEYWORDS.contains(&k) && value.is_array() => {
                for (i, child) in value.as_array().into_iter().flatten().enumerate() {
                    let l = pointer.len();
                    push(pointer, &i.to_string());
                    walk(child, pointer)?;
                    pointer.truncate(l);
                }
            }
            k if SCHEMA_KEYWORDS.contains(&k) => walk(value, pointer)?,
            _ => {}
        }
        pointer.truncate(len);
    }
    Ok(())
}

fn push(pointer: &mut String, segment: &str) {
    pointer.push('/');
    pointer.push_str(&segment.replace('~', "~0").replace('/', "~1"));
}

fn at(pointer: &str) -> String {
    if pointer.is_empty() {
        "/".to_string()
    } else {
        pointer.to_string()
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_keyword_and_pointer() {
        let s = json!({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": true}}});
        match check_schema(&s) {
            Err(DecodeError::UnsupportedKeyword { keyword, pointer }) => {
                assert_eq!(keyword, "uniqueItems");
                assert_eq!(pointer, "/properties/a");
            }
            other => panic!("expected UnsupportedKeyword, got {other:?}"),
        }
    }

    #[test]
    fn annotations_and_supported_keywords_pass() {
        let s = json!({"title": "x", "description": "d", "type": "object",
            "$defs": {"p": {"type": "string", "format": "date"}},
            "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
            "required": ["a"], "additionalProperties": false});
        check_schema(&s).expect("supported schema");
    }

    #[test]
    fn pointer_escapes_segments() {
        let s = json!({"properties": {"a/b": {"not": {}}}});
        match check_schema(&s) {
            Err(DecodeError::UnsupportedKeyword { pointer, .. }) => assert_eq!(pointer, "/properties/a~1b"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
