//! Import of external (text, schema, object) sets — CSV or JSONL with `text`, `schema` and
//! `object` columns, schema and object as JSON strings or inline JSON — with a per-row report.
//! Bad rows are reported and skipped, never fatal.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use thinkjson_reward::{adherence, ValidatorCache};

use crate::dataset::Row;
use crate::render::Span;

/// What happened to one input row that was not imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// 1-based line (JSONL) or record number counting the header as line 1 (CSV).
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    pub total: usize,
    pub accepted: usize,
    pub rejected: Vec<Rejected>,
}

/// Imports JSONL (one JSON object per line; blank lines skipped).
pub fn import_jsonl(input: &str) -> (Vec<Row>, ImportReport) {
    let mut rows = Vec::new();
    let mut report = ImportReport::default();
    let validators = ValidatorCache::new();
    for (i, line) in input.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        report.total += 1;
        let outcome = serde_json::from_str::<Value>(line)
            .map_err(|e| format!("not a JSON object: {e}"))
            .and_then(|v| match v {
                Value::Object(m) => Ok(m.into_iter().collect::<HashMap<String, Value>>()),
                _ => Err("not a JSON object".to_string()),
            })
            .and_then(|cols| build(&cols, i + 1, &validators));
        accept(outcome, i + 1, &mut rows, &mut report);
    }
    (rows, report)
}

/// Imports CSV with a header row naming `text`, `schema`, `object` (other columns ignored).
pub fn import_csv(input: &str) -> (Vec<Row>, ImportReport) {
    let mut rows = Vec::new();
    let mut report = ImportReport::default();
    let validators = ValidatorCache::new();
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(input.as_bytes());
    let headers: Vec<String> = match reader.headers() {
        Ok(h) => h.iter().map(|s| s.trim().to_lowercase()).collect(),
        Err(e) => {
            report.rejected.push(Rejected { line: 1, reason: format!("unreadable CSV header: {e}") });
            return (rows, report);
        }
    };
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        report.total += 1;
        let outcome = record.map_err(|e| format!("unreadable CSV record: {e}")).and_then(|rec| {
            let cols: HashMap<String, Value> =
                headers.iter().cloned().zip(rec.iter().map(|s| Value::String(s.to_string()))).collect();
            build(&cols, line, &validators)
        });
        accept(outcome, line, &mut rows, &mut report);
    }
    (rows, report)
}

fn accept(outcome: Result<Row, String>, line: usize, rows: &mut Vec<Row>, report: &mut ImportReport) {
    match outcome {
        Ok(row) => {
            report.accepted += 1;
            rows.push(row);
        }
        Err(reason) => report.rejected.push(Rejected { line, reason }),
    }
}

/// Accepts `object` only if it validates against `schema` (compiled once per schema).
fn check(validators: &ValidatorCache, schema: &Value, object: &Value) -> Result<(), String> {
    let compiled = validators.get(schema);
    if let Err(e) = compiled.as_ref() {
        return Err(format!("invalid schema: {e}"));
    }
    match adherence(&compiled, object) {
        (_, None) => Ok(()),
        (_, Some(first_error)) => Err(format!("object does not match its schema {first_error}")),
    }
}

fn json_column(cols: &HashMap<String, Value>, name: &str) -> Result<Value, String> {
    match cols.get(name) {
        None => Err(format!("missing column `{name}`")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("column `{name}` is empty")),
        Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| format!("column `{name}`: unparseable JSON: {e}")),
        Some(v) => Ok(v.clone()),
    }
}

fn build(cols: &HashMap<String, Value>, line: usize, validators: &ValidatorCache) -> Result<Row, String> {
    let text = match cols.get("text") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err("column `text` is empty".into()),
        Some(_) => return Err("column `text` is not a string".into()),
        None => return Err("missing column `text`".into()),
    };
    let schema = json_column(cols, "schema")?;
    if !schema.is_object() {
        return Err("column `schema`: not a JSON object".into());
    }
    let object = json_column(cols, "object")?;
    check(validators, &schema, &object)?;
    let (reasoning, spans) = trace_imported(&text, &object);
    Ok(Row {
        id: cols.get("id").and_then(Value::as_str).map_or_else(|| format!("import-{line}"), String::from),
        kind: "imported".into(),
        style: "external".into(),
        text,
        schema,
        object,
        reasoning,
        spans,
        split: String::new(),
        template: "imported/external".into(),
    })
}

/// A reasoning trace for rows we did not generate: where each leaf value occurs verbatim.
fn trace_imported(text: &str, object: &Value) -> (String, Vec<Span>) {
    let mut leaves = Vec::new();
    collect(object, "", &mut leaves);
    let mut spans = Vec::new();
    let mut out = format!("The reference object has {} leaf value(s). I look for each in the text.\n", leaves.len());
    for (i, (ptr, v)) in leaves.iter().enumerate() {
        let shown = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match text.find(&shown).filter(|_| !shown.is_empty() && !v.is_null()) {
            Some(start) => {
                out.push_str(&format!("{}. `{ptr}`: the text has \"{shown}\" → {v}.\n", i + 1));
                spans.push(Span { pointer: ptr.clone(), surface: shown.clone(), start, end: start + shown.len() });
            }
            None => out.push_str(&format!("{}. `{ptr}`: not written verbatim in the text; inferred as {v}.\n", i + 1)),
        }
    }
    (out, spans)
}

fn collect(v: &Value, ptr: &str, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                collect(x, &format!("{ptr}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                collect(x, &format!("{ptr}/{i}"), out);
            }
        }
        leaf => out.push((ptr.to_string(), leaf.clone())),
    }
}
