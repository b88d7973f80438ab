//! What the constrained decoder does with each JSON Schema keyword — the one place that
//! decides it.
//!
//! A schema is turned into a [`SchemaPlan`]: the schema the grammar (llguidance) compiles,
//! plus the keywords the grammar does not enforce. Those are never ignored: every finished
//! output is validated against the **full** schema (the same `jsonschema` validator the
//! reward and eval crates use), and an invalid one is regenerated a bounded number of times
//! or returned as a constraint error naming the keyword (see `Generator::generate`).
//!
//! | keywords | treatment |
//! |---|---|
//! | types, `properties`, `required`, `additionalProperties`, `items`, `prefixItems`, `enum`, `const`, `anyOf`, `allOf`, local `$ref`, string/number/array bounds, `pattern` | enforced by the grammar |
//! | `oneOf` | enforced as `anyOf` when its branches are provably exclusive (disjoint types, a required `const`/`enum` discriminator, or each pair split by a required key the other forbids); otherwise generated as `anyOf` and validated |
//! | [`VALIDATED_KEYWORDS`] (`not`, `if`/`then`/`else`, `dependencies`, `uniqueItems`, `contains`, `propertyNames`, …) | left out of the grammar, validated after generation |
//! | `minProperties` / `maxProperties` | enforced where llguidance can (all listed keys required, or "exactly/at least one"); otherwise left out and validated |
//! | `format` in [`GRAMMAR_FORMATS`] | enforced by the grammar |
//! | `format` in [`OPENAPI_FORMATS`] | enforced as the bounds or alphabet it means (`int32`, `int64`, `byte`) or an annotation (`float`, `double`, `binary`, `password`) |
//! | any other `format` | an annotation, as the JSON Schema specification treats unknown formats; the validator still checks the formats it knows |
//! | remote `$ref` | refused: nothing is fetched |

use serde_json::{json, Map, Value};

use crate::error::{DecodeError, Result};

/// Keywords that change what validates and that the grammar cannot express: they are left
/// out of the grammar and checked on the finished output.
pub const VALIDATED_KEYWORDS: &[&str] = &[
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
    "$recursiveRef",
];

/// Kept out of the grammar only when llguidance cannot compile them in place (see [`Relax`]).
pub const VALIDATED_WHEN_NEEDED: &[&str] = &["minProperties", "maxProperties", "pattern", "patternProperties", "$ref siblings"];

/// What to leave to validation beyond [`VALIDATED_KEYWORDS`], chosen by what llguidance
/// reports it cannot compile; each step keeps the grammar as tight as it can be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relax {
    /// `minProperties`/`maxProperties` with optional keys.
    pub property_counts: bool,
    /// `pattern`s the grammar's regex engine does not parse: 1 = their lookaround groups are
    /// taken out (the rest, a looser regex, stays in the grammar); 2 = they leave the grammar.
    pub patterns: u8,
    /// `patternProperties` whose regexes overlap.
    pub pattern_properties: bool,
    /// What a `$ref` would be intersected with in a recursive schema: its sibling keywords
    /// (ignored by drafts 4–7 anyway), other `allOf` members, a `type` beside an `anyOf` of
    /// references.
    pub ref_siblings: bool,
}

impl Relax {
    /// The next relaxation for a grammar error, or `None` when none applies (or it is on).
    pub fn after(self, grammar_error: &str) -> Option<Relax> {
        let mut next = self;
        if grammar_error.contains("min/maxProperties") {
            next.property_counts = true;
        } else if grammar_error.contains("regex parse error") || grammar_error.contains("lookarounds not supported") {
            next.patterns = (next.patterns + 1).min(2);
        } else if grammar_error.contains("patternProperty regexes") {
            next.pattern_properties = true;
        } else if grammar_error.contains("circular references with sibling keys") {
            // A reference is intersected with its siblings, or (next) with the
            // `patternProperties` its property name also matches.
            if next.ref_siblings {
                next.pattern_properties = true;
            }
            next.ref_siblings = true;
        }
        (next != self).then_some(next)
    }
}

/// Annotations the grammar has no use for (they do not change what validates for us).
const DROPPED_ANNOTATIONS: &[&str] = &["$dynamicAnchor", "$recursiveAnchor", "contentSchema", "contentMediaType", "contentEncoding"];

/// String formats the grammar enforces (llguidance's built-in regexes).
pub const GRAMMAR_FORMATS: &[&str] = &[
    "date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri", "unknown",
];

/// OpenAPI's formats and what the grammar makes of them.
pub const OPENAPI_FORMATS: &[(&str, &str)] = &[
    ("int32", "integer bounds [-2^31, 2^31 - 1]"),
    ("int64", "integer bounds ±(2^53 - 1), the range every JSON parser reads exactly"),
    ("byte", "the base64 alphabet and padding"),
    ("float", "annotation (any JSON number)"),
    ("double", "annotation (any JSON number)"),
    ("binary", "annotation"),
    ("password", "annotation"),
];

const BASE64: &str = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$";
const INT32: (i64, i64) = (-2_147_483_648, 2_147_483_647);

/// A keyword and the JSON pointer of the schema object that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeywordAt {
    pub keyword: String,
    pub pointer: String,
}

impl std::fmt::Display for KeywordAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` at `{}`", self.keyword, self.pointer)
    }
}

/// What the grammar compiles, and what it leaves to validation.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaPlan {
    pub grammar: Value,
    /// Keywords not enforced by the grammar; the output is validated against them.
    pub validated: Vec<KeywordAt>,
    /// `format`s kept as annotations.
    pub annotations: Vec<KeywordAt>,
}

/// Checks a schema against its meta-schema and plans it (see the module table); `relax`
/// says what else to leave to validation.
pub fn plan_schema(schema: &Value, relax: Relax) -> Result<SchemaPlan> {
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
    let mut planner = Planner { root: schema, relax, speculative: 0, validated: Vec::new(), annotations: Vec::new() };
    let mut grammar = schema.clone();
    planner.walk(&mut grammar, &mut String::new())?;
    Ok(SchemaPlan { grammar, validated: planner.validated, annotations: planner.annotations })
}

/// Rejects an invalid schema (checked against its meta-schema) or one the decoder cannot
/// use at all (a remote `$ref`). Everything else is accepted: see [`plan_schema`].
pub fn check_schema(schema: &Value) -> Result<()> {
    plan_schema(schema, Relax::default()).map(|_| ())
}

struct Planner<'a> {
    root: &'a Value,
    relax: Relax,
    /// Inside an unknown key: rewritten in case a `$ref` points there, but not reported.
    speculative: usize,
    validated: Vec<KeywordAt>,
    annotations: Vec<KeywordAt>,
}

/// Keywords whose value is one subschema.
const SCHEMA_KEYWORDS: &[&str] = &["additionalProperties", "additionalItems", "items", "not", "if", "then", "else", "contains", "propertyNames", "unevaluatedProperties", "unevaluatedItems"];
/// Keywords whose value is an array of subschemas.
const SCHEMA_ARRAY_KEYWORDS: &[&str] = &["anyOf", "oneOf", "allOf", "prefixItems", "items"];
/// Keywords whose value maps names to subschemas.
const SCHEMA_MAP_KEYWORDS: &[&str] = &["properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"];
/// Keywords whose value is data, never a schema.
const VALUE_KEYWORDS: &[&str] = &["const", "enum", "default", "examples", "required", "x-guidance", "type", "$ref", "format", "pattern"];
/// What a `$ref`'s siblings keep when they are relaxed: what other references resolve through.
const STRUCTURAL: &[&str] = &["$id", "id", "$anchor", "$defs", "definitions"];

impl Planner<'_> {
    fn walk(&mut self, schema: &mut Value, pointer: &mut String) -> Result<()> {
        let Some(map) = schema.as_object_mut() else {
            return Ok(()); // `true` / `false`
        };
        // Children first (with pointers into the original layout), then this object's keywords.
        let keys: Vec<String> = map.keys().cloned().collect();
        for key in &keys {
            let len = pointer.len();
            push(pointer, key);
            if let Some(value) = map.get_mut(key) {
                self.children(key, value, pointer)?;
            }
            pointer.truncate(len);
        }
        self.rewrite(map, pointer)
    }

    fn children(&mut self, key: &str, value: &mut Value, pointer: &mut String) -> Result<()> {
        match key {
            "$ref" => {
                if let Some(r) = value.as_str() {
                    if !r.starts_with('#') {
                        return Err(DecodeError::RemoteRef { reference: r.to_string(), pointer: at(pointer) });
                    }
                }
            }
            k if SCHEMA_MAP_KEYWORDS.contains(&k) => {
                if let Some(children) = value.as_object_mut() {
                    for (name, child) in children.iter_mut() {
                        let l = pointer.len();
                        push(pointer, name);
                        self.walk(child, pointer)?;
                        pointer.truncate(l);
                    }
                }
            }
            k if SCHEMA_ARRAY_KEYWORDS.contains(&k) && value.is_array() => {
                for (i, child) in value.as_array_mut().into_iter().flatten().enumerate() {
                    let l = pointer.len();
                    push(pointer, &i.to_string());
                    self.walk(child, pointer)?;
                    pointer.truncate(l);
                }
            }
            k if SCHEMA_KEYWORDS.contains(&k) => self.walk(value, pointer)?,
            // An unknown key can still hold a schema that a `$ref` points to
            // (`"$ref": "#/x-shared/item"`): plan it like one.
            k if !VALUE_KEYWORDS.contains(&k) && value.is_object() => {
                self.speculative += 1;
                let walked = self.walk(value, pointer);
                self.speculative -= 1;
                walked?
            }
            _ => {}
        }
        Ok(())
    }

    fn rewrite(&mut self, map: &mut Map<String, Value>, pointer: &str) -> Result<()> {
        let here = at(pointer);
        let (validated_before, annotations_before) = (self.validated.len(), self.annotations.len());
        let relax = |map: &mut Map<String, Value>, keyword: &str, validated: &mut Vec<KeywordAt>| {
            if map.remove(keyword).is_some() {
                validated.push(KeywordAt { keyword: keyword.to_string(), pointer: here.clone() });
            }
        };
        // `uniqueItems: false` constrains nothing.
        if map.get("uniqueItems") == Some(&Value::Bool(false)) {
            map.remove("uniqueItems");
        }
        for &k in VALIDATED_KEYWORDS {
            relax(map, k, &mut self.validated);
        }
        if self.relax.property_counts {
            relax(map, "minProperties", &mut self.validated);
            relax(map, "maxProperties", &mut self.validated);
        }
        match self.relax.patterns {
            0 => {}
            1 => {
                let loosened = map.get("pattern").and_then(Value::as_str).and_then(without_lookarounds);
                if let Some(p) = loosened {
                    map.insert("pattern".into(), Value::from(p));
                    self.validated.push(KeywordAt { keyword: "pattern (lookaround)".into(), pointer: here.clone() });
                }
            }
            _ => relax(map, "pattern", &mut self.validated),
        }
        if self.relax.pattern_properties {
            relax(map, "patternProperties", &mut self.validated);
        }

        for &k in DROPPED_ANNOTATIONS {
            map.remove(k);
        }
        if let Some(branches) = map.remove("oneOf") {
            let exclusive = branches.as_array().is_some_and(|b| self.provably_exclusive(b));
            if !exclusive {
                self.validated.push(KeywordAt { keyword: "oneOf".into(), pointer: here.clone() });
            }
            match map.remove("anyOf") {
                None => {
                    map.insert("anyOf".into(), branches);
                }
                Some(any) => {
                    let all = map.entry("allOf").or_insert_with(|| json!([]));
                    if let Some(list) = all.as_array_mut() {
                        list.push(json!({"anyOf": any}));
                        list.push(json!({"anyOf": branches}));
                    }
                }
            }
        }
        if self.relax.ref_siblings {
            self.cut_ref_intersections(map, &here);
        }
        self.format(map, &here);
        if self.speculative > 0 {
            self.validated.truncate(validated_before);
            self.annotations.truncate(annotations_before);
        }
        Ok(())
    }

    /// llguidance intersects a `$ref` with whatever sits beside it (sibling keywords, other
    /// `allOf` members, a `type` next to an `anyOf` of references), which fails in recursive
    /// schemas: keep the references, leave the rest to validation.
    fn cut_ref_intersections(&mut self, map: &mut Map<String, Value>, here: &str) {
        let is_ref = |v: &Value| v.get("$ref").is_some();
        if let Some(Value::Array(all)) = map.get("allOf") {
            if all.iter().any(is_ref) && all.len() > 1 {
                let first = all.iter().find(|v| is_ref(v)).cloned();
                map.remove("allOf");
                if let Some(r) = first {
                    map.insert("allOf".into(), Value::Array(vec![r]));
                }
                self.validated.push(KeywordAt { keyword: "allOf".into(), pointer: here.to_string() });
            }
        }
        let refs_inside = |k: &str| map.get(k).and_then(Value::as_array).is_some_and(|a| a.iter().any(is_ref));
        let applicator = ["$ref", "anyOf", "allOf"].into_iter().find(|&k| if k == "$ref" { map.contains_key(k) } else { refs_inside(k) });
        let Some(applicator) = applicator else { return };
        let siblings: Vec<String> = map
            .keys()
            .filter(|k| k.as_str() != applicator && !STRUCTURAL.contains(&k.as_str()))
            .cloned()
            .collect();
        if !siblings.is_empty() {
            for k in siblings {
                map.remove(&k);
            }
            self.validated.push(KeywordAt { keyword: format!("{applicator} siblings"), pointer: here.to_string() });
        }
    }

    fn format(&mut self, map: &mut Map<String, Value>, here: &str) {
        let Some(format) = map.get("format").and_then(Value::as_str).map(str::to_string) else {
            return;
        };
        if GRAMMAR_FORMATS.contains(&format.as_str()) {
            return;
        }
        map.remove("format");
        match format.as_str() {
            "int32" => {
                let (lo, hi) = INT32;
                tighten(map, "minimum", lo, |old, new| old < new);
                tighten(map, "maximum", hi, |old, new| old > new);
            }
            // Bounded to ±(2^53 − 1) with every open number (`constraint::bound_numbers`).
            "int64" => {}
            "byte" if !map.contains_key("pattern") => {
                map.insert("pattern".into(), Value::from(BASE64));
            }
            _ => self.annotations.push(KeywordAt { keyword: format!("format: {format}"), pointer: here.to_string() }),
        }
    }

    /// Whether at most one branch can match any value, judged without generating.
    fn provably_exclusive(&self, branches: &[Value]) -> bool {
        let resolved: Vec<&Value> = branches.iter().map(|b| self.resolve(b)).collect();
        let pairs = || (0..resolved.len()).flat_map(|i| (i + 1..resolved.len()).map(move |j| (i, j)));
        let types: Vec<Option<Vec<&str>>> = resolved.iter().map(|b| type_set(b)).collect();
        if pairs().all(|(i, j)| match (&types[i], &types[j]) {
            (Some(a), Some(b)) => a.iter().all(|x| b.iter().all(|y| !types_overlap(x, y))),
            _ => false,
        }) {
            return true;
        }
        if discriminated(&resolved) {
            return true;
        }
        pairs().all(|(i, j)| splits(resolved[i], resolved[j]) || splits(resolved[j], resolved[i]))
    }

    /// A local `$ref` branch resolved one level (JSON pointer into the root).
    fn resolve<'v>(&'v self, branch: &'v Value) -> &'v Value {
        match branch.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix('#')) {
            Some(ptr) => self.root.pointer(ptr).unwrap_or(branch),
            None => branch,
        }
    }
}

/// `regex` without its lookaround groups (`(?=…)`, `(?!…)`, `(?<=…)`, `(?<!…)`): a regex
/// that matches everything the original matches, and more. `None` when it has none.
fn without_lookarounds(regex: &str) -> Option<String> {
    let chars: Vec<char> = regex.chars().collect();
    let mut out = String::with_capacity(regex.len());
    let mut i = 0;
    let mut removed = false;
    let mut in_class = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            out.push(c);
            if let Some(&n) = chars.get(i + 1) {
                out.push(n);
            }
            i += 2;
            continue;
        }
        if in_class {
            in_class = c != ']';
            out.push(c);
            i += 1;
            continue;
        }
        let rest: String = chars[i..chars.len().min(i + 4)].iter().collect();
        if ["(?=", "(?!", "(?<=", "(?<!"].iter().any(|p| rest.starts_with(p)) {
            // Skip to the matching `)`, minding escapes and classes.
            let (mut depth, mut j, mut class) = (0usize, i, false);
            while j < chars.len() {
                match chars[j] {
                    '\\' => j += 1,
                    '[' if !class => class = true,
                    ']' if class => class = false,
                    '(' if !class => depth += 1,
                    ')' if !class => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            i = j + 1;
            removed = true;
            continue;
        }
        in_class = c == '[';
        out.push(c);
        i += 1;
    }
    removed.then_some(out)
}

/// The JSON types a branch can take, when stated (`type`, or the types of `const`/`enum`).
fn type_set(branch: &Value) -> Option<Vec<&'static str>> {
    const NAMES: &[&str] = &["null", "boolean", "object", "array", "number", "integer", "string"];
    let name = |s: &str| NAMES.iter().copied().find(|n| *n == s);
    match branch.get("type") {
        Some(Value::String(t)) => return name(t).map(|n| vec![n]),
        Some(Value::Array(ts)) => return ts.iter().map(|t| t.as_str().and_then(name)).collect(),
        _ => {}
    }
    let values: Vec<&Value> = match (branch.get("const"), branch.get("enum")) {
        (Some(c), _) => vec![c],
        (None, Some(Value::Array(e))) => e.iter().collect(),
        _ => return None,
    };
    Some(values.into_iter().map(json_type).collect())
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn types_overlap(a: &str, b: &str) -> bool {
    a == b || matches!((a, b), ("integer", "number") | ("number", "integer"))
}

/// Every branch requires property `p` with a `const`/`enum`, and the value sets are disjoint.
fn discriminated(branches: &[&Value]) -> bool {
    let Some(first) = branches.first() else { return false };
    let required = |b: &Value| -> Vec<String> {
        b.get("required").and_then(Value::as_array).map(|r| r.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
    };
    let values = |b: &Value, p: &str| -> Option<Vec<Value>> {
        let prop = b.get("properties")?.get(p)?;
        match (prop.get("const"), prop.get("enum")) {
            (Some(c), _) => Some(vec![c.clone()]),
            (None, Some(Value::Array(e))) => Some(e.clone()),
            _ => None,
        }
    };
    required(first).iter().any(|p| {
        let sets: Option<Vec<Vec<Value>>> = branches
            .iter()
            .map(|b| if required(b).contains(p) { values(b, p) } else { None })
            .collect();
        let Some(sets) = sets else { return false };
        (0..sets.len()).all(|i| (i + 1..sets.len()).all(|j| sets[i].iter().all(|v| !sets[j].contains(v))))
    })
}

/// `a` requires a key that `b` forbids (closed object without that property or patterns).
fn splits(a: &Value, b: &Value) -> bool {
    let closed = b.get("additionalProperties") == Some(&Value::Bool(false)) && b.get("patternProperties").is_none();
    if !closed {
        return false;
    }
    let b_props = b.get("properties").and_then(Value::as_object);
    a.get("required")
        .and_then(Value::as_array)
        .is_some_and(|req| req.iter().filter_map(Value::as_str).any(|k| !b_props.is_some_and(|p| p.contains_key(k))))
}

/// Raises a lower bound / lowers an upper bound to `value` where the schema's is looser.
fn tighten(map: &mut Map<String, Value>, key: &str, value: i64, looser: impl Fn(f64, f64) -> bool) {
    let current = map.get(key).and_then(Value::as_f64);
    if current.is_none_or(|c| looser(c, value as f64)) {
        map.insert(key.into(), Value::from(value));
    }
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

    #[test]
    fn validated_keywords_leave_the_grammar_with_their_pointer() {
        let s = json!({"type": "object", "properties": {"a/b": {"type": "array", "uniqueItems": true, "items": {"not": {"const": 1}}}}});
        let plan = plan_schema(&s, Relax::default()).unwrap();
        assert_eq!(plan.grammar["properties"]["a/b"], json!({"type": "array", "items": {}}));
        let names: Vec<String> = plan.validated.iter().map(ToString::to_string).collect();
        assert_eq!(names, vec!["`not` at `/properties/a~1b/items`", "`uniqueItems` at `/properties/a~1b`"]);
    }

    #[test]
    fn formats_known_openapi_and_unknown() {
        let s = json!({"type": "object", "properties": {
            "d": {"type": "string", "format": "date"},
            "i": {"type": "integer", "format": "int32", "minimum": -5},
            "b": {"type": "string", "format": "byte"},
            "u": {"type": "string", "format": "uri-reference"},
        }});
        let plan = plan_schema(&s, Relax::default()).unwrap();
        let p = &plan.grammar["properties"];
        assert_eq!(p["d"]["format"], "date");
        assert_eq!((p["i"]["minimum"].clone(), p["i"]["maximum"].clone()), (json!(-5), json!(2_147_483_647)));
        assert!(p["i"].get("format").is_none());
        assert_eq!(p["b"]["pattern"], BASE64);
        assert!(p["u"].get("format").is_none());
        assert_eq!(plan.annotations, vec![KeywordAt { keyword: "format: uri-reference".into(), pointer: "/properties/u".into() }]);
        assert!(plan.validated.is_empty());
    }

    #[test]
    fn one_of_is_exact_only_when_exclusive() {
        let by_type = json!({"oneOf": [{"type": "string"}, {"type": "integer"}]});
        let by_const = json!({"oneOf": [
            {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
            {"type": "object", "properties": {"kind": {"enum": ["b", "c"]}}, "required": ["kind"]}]});
        let by_keys = json!({"$defs": {"x": {"type": "object", "properties": {"x": {}}, "required": ["x"], "additionalProperties": false}},
            "oneOf": [{"$ref": "#/$defs/x"}, {"type": "object", "properties": {"y": {}}, "required": ["y"], "additionalProperties": false}]});
        for s in [by_type, by_const, by_keys] {
            let plan = plan_schema(&s, Relax::default()).unwrap();
            assert!(plan.validated.is_empty(), "{s}");
            assert!(plan.grammar.get("anyOf").is_some() && plan.grammar.get("oneOf").is_none());
        }
        for overlapping in [
            json!({"oneOf": [{"type": "number"}, {"type": "integer"}]}),
            json!({"oneOf": [{"type": "object", "properties": {"a": {}}}, {"type": "object", "required": ["b"]}]}),
        ] {
            let plan = plan_schema(&overlapping, Relax::default()).unwrap();
            assert_eq!(plan.validated, vec![KeywordAt { keyword: "oneOf".into(), pointer: "/".into() }]);
        }
    }

    #[test]
    fn remote_refs_and_invalid_schemas_are_refused() {
        let remote = json!({"properties": {"a": {"not": {"$ref": "https://example.com/s.json"}}}});
        assert!(matches!(plan_schema(&remote, Relax::default()), Err(DecodeError::RemoteRef { .. })));
        assert!(matches!(plan_schema(&json!({"type": "strng"}), Relax::default()), Err(DecodeError::InvalidSchema { .. })));
        // A property named like a keyword is a name, not a keyword.
        let named = json!({"type": "object", "properties": {"not": {"type": "string"}, "$ref": {"type": "integer"}}});
        let plan = plan_schema(&named, Relax::default()).unwrap();
        assert!(plan.validated.is_empty());
        assert_eq!(plan.grammar, named);
    }

    #[test]
    fn lookarounds_are_taken_out_of_patterns() {
        assert_eq!(without_lookarounds("^(?!ZZ)[A-Z]{2}[0-9]$").as_deref(), Some("^[A-Z]{2}[0-9]$"));
        assert_eq!(without_lookarounds(r"^(?=.*\d)(?<![(]x)a[(?=]b$").as_deref(), Some(r"^a[(?=]b$"));
        assert_eq!(without_lookarounds(r"^\(?=x$"), None);
        assert_eq!(without_lookarounds("^(a|b)$"), None);
    }

    #[test]
    fn property_counts_are_relaxed_only_on_request() {
        let s = json!({"type": "object", "properties": {"a": {}, "b": {}}, "minProperties": 1, "maxProperties": 2});
        assert!(plan_schema(&s, Relax::default()).unwrap().validated.is_empty());
        let relaxed = plan_schema(&s, Relax { property_counts: true, ..Relax::default() }).unwrap();
        assert_eq!(relaxed.validated.len(), 2);
        assert!(relaxed.grammar.get("minProperties").is_none());
    }
}
