//! JSON Schema transformations: normalisation of schemars output, the variator that derives
//! many schemas from one, random schemas built from the domain's fields, and measurements
//! (depth, keyword counts) used by `--stats`.

use std::collections::BTreeMap;

use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::{json, Map, Value};

use crate::domain::DocKind;

/// String formats kept in schemas (others, like schemars' `uint32` / `double`, are dropped:
/// constrained decoders reject unknown formats).
pub const KEPT_FORMATS: &[&str] = &["date", "date-time", "email", "uuid"];

/// Deepest object nesting the variator produces.
pub const MAX_DEPTH: usize = 6;

/// How property names are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    Snake,
    Camel,
    Title,
}

impl KeyStyle {
    pub fn name(self) -> &'static str {
        match self {
            KeyStyle::Snake => "snake_case",
            KeyStyle::Camel => "camelCase",
            KeyStyle::Title => "Title Case",
        }
    }

    pub fn apply(self, snake: &str) -> String {
        let words = key_words(snake);
        match self {
            KeyStyle::Snake => words.join("_"),
            KeyStyle::Camel => words
                .iter()
                .enumerate()
                .map(|(i, w)| if i == 0 { w.clone() } else { capitalize(w) })
                .collect(),
            KeyStyle::Title => words.iter().map(|w| capitalize(w)).collect::<Vec<_>>().join(" "),
        }
    }
}

fn capitalize(w: &str) -> String {
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Lower-case words of a key in any style: `lotNumber`, `Lot Number`, `lot_number` → `[lot, number]`.
pub fn key_words(key: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for ch in key.chars() {
        if ch == '_' || ch == ' ' || ch == '-' || ch == '.' {
            if !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
        } else if ch.is_uppercase() && prev_lower {
            words.push(std::mem::take(&mut cur));
            cur.extend(ch.to_lowercase());
            prev_lower = false;
        } else {
            cur.extend(ch.to_lowercase());
            prev_lower = ch.is_lowercase() || ch.is_ascii_digit();
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// schemars output → the form we hand to models: no `$schema`, only standard formats.
pub fn normalize(mut schema: Value) -> Value {
    if let Some(m) = schema.as_object_mut() {
        m.remove("$schema");
    }
    walk_mut(&mut schema, &mut |node| {
        if let Some(m) = node.as_object_mut() {
            let keep = m.get("format").and_then(Value::as_str).is_none_or(|f| KEPT_FORMATS.contains(&f));
            if !keep {
                m.remove("format");
            }
        }
    });
    schema
}

/// Applies `f` to every schema node (pre-order).
pub fn walk_mut(node: &mut Value, f: &mut dyn FnMut(&mut Value)) {
    f(node);
    if let Some(m) = node.as_object_mut() {
        for key in ["properties", "$defs", "definitions"] {
            if let Some(Value::Object(props)) = m.get_mut(key) {
                for v in props.values_mut() {
                    walk_mut(v, f);
                }
            }
        }
        for key in ["items", "additionalProperties", "not"] {
            if let Some(v) = m.get_mut(key) {
                if v.is_object() {
                    walk_mut(v, f);
                }
            }
        }
        for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
            if let Some(Value::Array(list)) = m.get_mut(key) {
                for v in list {
                    walk_mut(v, f);
                }
            }
        }
    }
}

/// Resolves a local `$ref` against the root schema.
pub use thinkjson_reward::score::resolve_local as resolve;
/// Object nesting depth (root object = 1).
pub use thinkjson_reward::score::schema_depth as depth;

/// Replaces every local `$ref` by its target and drops `$defs`.
pub fn inline_refs(schema: &Value) -> Value {
    fn go(root: &Value, node: &Value, depth: usize) -> Value {
        // A recursive `$ref` cannot be inlined: stop expanding and keep the reference.
        if depth > 32 {
            return node.clone();
        }
        let node = resolve(root, node);
        let Some(m) = node.as_object() else {
            return node.clone();
        };
        let mut out = Map::new();
        for (k, v) in m {
            if k == "$defs" || k == "definitions" {
                continue;
            }
            let v = match k.as_str() {
                "properties" => match v.as_object() {
                    Some(p) => Value::Object(p.iter().map(|(pk, pv)| (pk.clone(), go(root, pv, depth + 1))).collect()),
                    None => v.clone(),
                },
                "items" if v.is_object() => go(root, v, depth + 1),
                "anyOf" | "oneOf" | "allOf" => match v.as_array() {
                    Some(list) => Value::Array(list.iter().map(|x| go(root, x, depth + 1)).collect()),
                    None => v.clone(),
                },
                _ => v.clone(),
            };
            out.insert(k.clone(), v);
        }
        Value::Object(out)
    }
    let mut out = go(schema, schema, 0);
    // References left by a recursive schema still need their targets.
    if out.to_string().contains("\"$ref\"") {
        if let (Some(m), Some(defs)) = (out.as_object_mut(), schema.get("$defs")) {
            m.insert("$defs".into(), defs.clone());
        }
    }
    out
}

/// How often each JSON Schema keyword appears (for `--stats`).
pub fn keyword_counts(schema: &Value, counts: &mut BTreeMap<String, usize>) {
    let mut s = schema.clone();
    walk_mut(&mut s, &mut |node| {
        if let Some(m) = node.as_object() {
            for k in m.keys() {
                *counts.entry(k.clone()).or_default() += 1;
            }
            if let Some(f) = m.get("format").and_then(Value::as_str) {
                *counts.entry(format!("format:{f}")).or_default() += 1;
            }
            if let Some(Value::Array(t)) = m.get("type") {
                if t.iter().any(|x| x == "null") {
                    *counts.entry("nullable".into()).or_default() += 1;
                }
            }
        }
    });
}

/// Knobs of the variator (probabilities per node or per schema).
#[derive(Debug, Clone)]
pub struct Variation {
    pub inline_refs: f64,
    pub drop_optional: f64,
    pub drop_required: f64,
    pub toggle_required: f64,
    pub make_nullable: f64,
    pub no_additional: f64,
    pub strip_descriptions: f64,
    pub group_sections: f64,
    pub envelope: f64,
    pub drop_bounds: f64,
}

impl Default for Variation {
    fn default() -> Self {
        Self {
            inline_refs: 0.5,
            drop_optional: 0.25,
            drop_required: 0.08,
            toggle_required: 0.12,
            make_nullable: 0.1,
            no_additional: 0.4,
            strip_descriptions: 0.25,
            group_sections: 0.3,
            envelope: 0.15,
            drop_bounds: 0.2,
        }
    }
}

/// Derives a schema variant from a normalised base schema.
pub fn vary<R: Rng>(base: &Value, v: &Variation, rng: &mut R) -> Value {
    let mut schema = if rng.random_bool(v.inline_refs) { inline_refs(base) } else { base.clone() };
    let title = schema.get("title").cloned();
    let description = schema.get("description").cloned();
    walk_mut(&mut schema, &mut |node| vary_object(node, v, rng));
    // Each adds a level; depth stays within MAX_DEPTH.
    if rng.random_bool(v.group_sections) && depth(&schema) < MAX_DEPTH {
        schema = group_sections(schema, rng);
    }
    if rng.random_bool(v.envelope) && depth(&schema) < MAX_DEPTH {
        schema = envelope(schema, rng);
    }
    if rng.random_bool(v.no_additional) {
        walk_mut(&mut schema, &mut |node| {
            if let Some(m) = node.as_object_mut() {
                if m.contains_key("properties") {
                    m.insert("additionalProperties".into(), Value::Bool(false));
                }
            }
        });
    }
    if rng.random_bool(v.strip_descriptions) {
        walk_mut(&mut schema, &mut |node| {
            if let Some(m) = node.as_object_mut() {
                m.remove("description");
            }
        });
    } else if let (Some(m), Some(d)) = (schema.as_object_mut(), description) {
        m.insert("description".into(), d);
    }
    if let (Some(m), Some(t)) = (schema.as_object_mut(), title) {
        m.insert("title".into(), t);
    }
    let key_style = *[KeyStyle::Snake, KeyStyle::Snake, KeyStyle::Camel, KeyStyle::Title]
        .choose(rng)
        .unwrap_or(&KeyStyle::Snake);
    rename_keys(&mut schema, key_style);
    schema
}

fn vary_object<R: Rng>(node: &mut Value, v: &Variation, rng: &mut R) {
    let Some(m) = node.as_object_mut() else { return };
    if rng.random_bool(v.drop_bounds) {
        m.remove("minimum");
        m.remove("maximum");
    }
    let Some(Value::Object(props)) = m.get("properties").cloned() else { return };
    let mut required: Vec<String> = m
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let mut kept = Map::new();
    for (k, mut p) in props {
        let is_req = required.contains(&k);
        let drop_p = if is_req { v.drop_required } else { v.drop_optional };
        if rng.random_bool(drop_p) {
            continue;
        }
        if is_req && rng.random_bool(v.make_nullable) {
            make_nullable(&mut p);
        }
        kept.insert(k, p);
    }
    if kept.len() < 2 {
        return; // too small to be interesting: leave this object as it was
    }
    required.retain(|r| kept.contains_key(r));
    for k in kept.keys() {
        if rng.random_bool(v.toggle_required) {
            if let Some(i) = required.iter().position(|r| r == k) {
                required.remove(i);
            } else {
                required.push(k.clone());
            }
        }
    }
    // Required in property order: stable, readable schemas.
    let required: Vec<Value> = kept.keys().filter(|k| required.contains(k)).map(|k| json!(k)).collect();
    m.insert("properties".into(), Value::Object(kept));
    m.insert("required".into(), Value::Array(required));
}

fn make_nullable(p: &mut Value) {
    let Some(m) = p.as_object_mut() else { return };
    match m.get("type").cloned() {
        Some(Value::String(t)) if t != "object" && t != "array" && t != "null" => {
            m.insert("type".into(), json!([t, "null"]));
            if let Some(Value::Array(e)) = m.get_mut("enum") {
                e.push(Value::Null);
            }
        }
        _ => {}
    }
}

const SECTION_NAMES: &[&str] = &["header", "details", "results", "approval", "summary", "record_info", "measurements", "review"];

/// Moves the root's properties into 2–3 nested sections (depth + 1).
fn group_sections<R: Rng>(mut schema: Value, rng: &mut R) -> Value {
    let Some(m) = schema.as_object_mut() else { return schema };
    let Some(Value::Object(props)) = m.get("properties").cloned() else { return schema };
    if props.len() < 4 {
        return schema;
    }
    let required: Vec<Value> = m.get("required").and_then(Value::as_array).cloned().unwrap_or_default();
    let n_sections = rng.random_range(2..=3usize).min(props.len());
    let names: Vec<&str> = SECTION_NAMES.choose_multiple(rng, n_sections).copied().collect();
    let per = props.len().div_ceil(n_sections);
    let entries: Vec<(String, Value)> = props.into_iter().collect();
    let mut sections = Map::new();
    for (i, chunk) in entries.chunks(per).enumerate() {
        let req: Vec<Value> = chunk.iter().filter(|(k, _)| required.contains(&json!(k))).map(|(k, _)| json!(k)).collect();
        let section = json!({
            "type": "object",
            "properties": Value::Object(chunk.iter().cloned().collect()),
            "required": req,
        });
        sections.insert(names.get(i).copied().unwrap_or("section").to_string(), section);
    }
    let all: Vec<Value> = sections.keys().map(|k| json!(k)).collect();
    m.insert("properties".into(), Value::Object(sections));
    m.insert("required".into(), Value::Array(all));
    schema
}

/// Wraps the whole record in `{"document": {...}}` (depth + 1).
fn envelope<R: Rng>(schema: Value, rng: &mut R) -> Value {
    let name = *["document", "record", "report", "entry"].choose(rng).unwrap_or(&"document");
    let mut inner = schema;
    let mut outer = Map::new();
    if let Some(m) = inner.as_object_mut() {
        for k in ["$defs", "title", "description"] {
            if let Some(v) = m.remove(k) {
                outer.insert(k.to_string(), v);
            }
        }
    }
    outer.insert("type".into(), json!("object"));
    outer.insert("properties".into(), json!({ name: inner }));
    outer.insert("required".into(), json!([name]));
    Value::Object(outer)
}

/// Renames every property key (and `required` entries) to `style`.
pub fn rename_keys(schema: &mut Value, style: KeyStyle) {
    walk_mut(schema, &mut |node| {
        let Some(m) = node.as_object_mut() else { return };
        if let Some(Value::Object(props)) = m.remove("properties") {
            let renamed: Map<String, Value> = props.into_iter().map(|(k, v)| (style.apply(&k), v)).collect();
            m.insert("properties".into(), Value::Object(renamed));
        }
        if let Some(Value::Array(req)) = m.get_mut("required") {
            for r in req.iter_mut() {
                if let Some(s) = r.as_str() {
                    *r = json!(style.apply(s));
                }
            }
        }
    });
}

/// Leaf fields of every domain kind, `(key, schema)`, for random schemas.
pub fn leaf_catalogue() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for kind in DocKind::ALL {
        let schema = inline_refs(&normalize(Value::from(kind.base_schema())));
        collect_leaves(&schema, &mut out);
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

fn collect_leaves(node: &Value, out: &mut Vec<(String, Value)>) {
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, p) in props {
            let is_leaf = p.get("properties").is_none() && p.get("items").is_none();
            if is_leaf {
                out.push((k.clone(), p.clone()));
            } else {
                collect_leaves(p, out);
                if let Some(items) = p.get("items") {
                    collect_leaves(items, out);
                }
            }
        }
    }
}

const GROUP_NAMES: &[&str] = &["sample", "equipment", "material", "approval", "measurement", "inspection", "shipment", "review", "operator_info", "storage"];

/// A random record schema built from domain leaves: nested objects and arrays of objects up
/// to `max_depth` levels.
pub fn random_schema<R: Rng>(catalogue: &[(String, Value)], max_depth: usize, rng: &mut R) -> Value {
    fn object<R: Rng>(cat: &[(String, Value)], depth_left: usize, rng: &mut R) -> Value {
        let mut props = Map::new();
        let n_leaves = rng.random_range(2..=5);
        for (k, v) in cat.choose_multiple(rng, n_leaves) {
            props.insert(k.clone(), v.clone());
        }
        if depth_left > 1 {
            let n_children = rng.random_range(0..=2);
            for _ in 0..n_children {
                let name = GROUP_NAMES.choose(rng).copied().unwrap_or("group");
                let child = object(cat, depth_left - 1, rng);
                let (key, node) = if rng.random_bool(0.4) {
                    (format!("{name}s"), json!({"type": "array", "items": child, "minItems": 1, "maxItems": 3}))
                } else {
                    (name.to_string(), child)
                };
                props.insert(key, node);
            }
        }
        let required: Vec<Value> = props.keys().filter(|_| rng.random_bool(0.7)).map(|k| json!(k)).collect();
        json!({"type": "object", "properties": props, "required": required})
    }
    let mut s = object(catalogue, max_depth.max(1), rng);
    if let Some(m) = s.as_object_mut() {
        m.insert("title".into(), json!("Record"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn key_styles_round_trip_through_words() {
        assert_eq!(KeyStyle::Camel.apply("lot_number"), "lotNumber");
        assert_eq!(KeyStyle::Title.apply("lot_number"), "Lot Number");
        assert_eq!(key_words("lotNumber"), vec!["lot", "number"]);
        assert_eq!(key_words("Lot Number"), vec!["lot", "number"]);
        assert_eq!(key_words("temperature_c"), vec!["temperature", "c"]);
    }

    #[test]
    fn normalize_drops_non_standard_formats() {
        let s = normalize(Value::from(DocKind::Training.base_schema()));
        let mut counts = BTreeMap::new();
        keyword_counts(&s, &mut counts);
        assert!(counts.keys().filter(|k| k.starts_with("format:")).all(|k| {
            KEPT_FORMATS.contains(&k.trim_start_matches("format:"))
        }));
        assert!(s.get("$schema").is_none());
    }

    #[test]
    fn depth_and_inlining() {
        let s = normalize(Value::from(DocKind::BatchRecord.base_schema()));
        assert_eq!(depth(&s), 3); // record → step → signatory
        let inlined = inline_refs(&s);
        assert!(!inlined.to_string().contains("$ref"));
        assert_eq!(depth(&inlined), 3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let e = envelope(inlined, &mut rng);
        assert_eq!(depth(&e), 4);
        // A recursive schema keeps its $defs so the remaining reference resolves.
        let recursive = json!({"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object",
            "properties": {"child": {"$ref": "#/$defs/Node"}}}}});
        let out = inline_refs(&recursive);
        assert!(out.get("$defs").is_some());
    }
}
