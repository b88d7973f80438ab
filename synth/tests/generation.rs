//! The synth crate's must-show properties over thousands of generated rows.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde_json::Value;
use thinkjson_synth::{generate, import, stats::stats, Row, Split, SynthConfig};

fn rows(n: usize, seed: u64) -> Vec<Row> {
    generate(SynthConfig { rows: n, seed, ..Default::default() }).expect("generation")
}

#[test]
fn every_object_validates_against_its_schema() {
    let mut checked = 0;
    for seed in [1, 2, 3] {
        for row in rows(1500, seed) {
            let validator = jsonschema::validator_for(&row.schema)
                .unwrap_or_else(|e| panic!("{}: schema does not compile: {e}\n{}", row.id, row.schema));
            if let Some(err) = validator.iter_errors(&row.object).next() {
                panic!("{}: invalid at {}: {err}\nschema {}\nobject {}", row.id, err.instance_path(), row.schema, row.object);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 4500);
}

#[test]
fn same_seed_gives_byte_identical_rows() {
    let a: Vec<String> = rows(300, 42).iter().map(|r| serde_json::to_string(r).unwrap()).collect();
    let b: Vec<String> = rows(300, 42).iter().map(|r| serde_json::to_string(r).unwrap()).collect();
    assert_eq!(a, b);
    let c: Vec<String> = rows(300, 43).iter().map(|r| serde_json::to_string(r).unwrap()).collect();
    assert_ne!(a, c);
}

fn leaves(v: &Value, ptr: String, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) => m.iter().for_each(|(k, x)| leaves(x, format!("{ptr}/{k}"), out)),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| leaves(x, format!("{ptr}/{i}"), out)),
        leaf => out.push((ptr, leaf.clone())),
    }
}

/// `/steps/0/equipment_id` → `steps[0].equipment_id` (the reasoning's notation).
fn path_of(ptr: &str) -> String {
    let mut out = String::new();
    for part in ptr.split('/').skip(1) {
        if part.parse::<usize>().is_ok() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

#[test]
fn every_leaf_value_appears_in_the_text_and_the_reasoning() {
    for row in rows(2000, 5) {
        let mut found = Vec::new();
        leaves(&row.object, String::new(), &mut found);
        let spans: HashMap<&str, &thinkjson_synth::Span> = row.spans.iter().map(|s| (s.pointer.as_str(), s)).collect();
        for (ptr, value) in &found {
            let path = path_of(ptr);
            assert!(row.reasoning.contains(&format!("`{path}`")), "{}: reasoning misses {path}", row.id);
            if value.is_null() {
                continue;
            }
            let span = spans.get(ptr.as_str()).unwrap_or_else(|| panic!("{}: no span for {ptr} = {value}\n{}", row.id, row.text));
            assert_eq!(&row.text[span.start..span.end], span.surface, "{}: span of {ptr}", row.id);
        }
        // Properties the schema has but the object omits are explained too.
        if let Some(props) = row.schema.get("properties").and_then(Value::as_object) {
            for key in props.keys() {
                assert!(row.reasoning.contains(&format!("`{key}")), "{}: reasoning misses top-level `{key}`", row.id);
            }
        }
    }
}

#[test]
fn splits_share_no_schema_template_pair() {
    let all = rows(3000, 9);
    let mut by_split: HashMap<String, HashSet<(String, String)>> = HashMap::new();
    for r in &all {
        by_split.entry(r.split.clone()).or_default().insert((r.schema.to_string(), r.template.clone()));
    }
    assert_eq!(by_split.len(), 3, "all three splits present");
    let names: Vec<&String> = by_split.keys().collect();
    for i in 0..names.len() {
        for j in i + 1..names.len() {
            let shared = by_split[names[i]].intersection(&by_split[names[j]]).count();
            assert_eq!(shared, 0, "{} and {} share pairs", names[i], names[j]);
        }
    }
    let eval = generate(SynthConfig { rows: 200, seed: 9, split: Some(Split::Eval), ..Default::default() }).unwrap();
    assert!(eval.iter().all(|r| r.split == "eval"));
}

#[test]
fn variety_covers_kinds_styles_and_depths() {
    let s = stats(&rows(3000, 11));
    assert_eq!(s.kinds.len(), 12, "11 kinds + random: {:?}", s.kinds);
    assert_eq!(s.styles.len(), 6);
    let depths: BTreeSet<usize> = s.depth_histogram.keys().copied().collect();
    for d in 1..=6 {
        assert!(depths.contains(&d), "no schema of depth {d}: {:?}", s.depth_histogram);
    }
    assert!(depths.iter().all(|&d| d <= 6), "depth beyond 6: {:?}", s.depth_histogram);
    assert!(s.text_chars[0] > 0.0, "a row with empty text");
    for k in ["$ref", "$defs", "enum", "pattern", "format:date", "format:date-time", "format:email", "format:uuid", "nullable", "minimum", "additionalProperties"] {
        assert!(s.keywords.get(k).copied().unwrap_or(0) > 0, "keyword {k} never used");
    }
    assert!(s.distinct_schemas > 2000, "only {} distinct schemas", s.distinct_schemas);
}

#[test]
fn jsonl_import_reports_and_skips_bad_rows() {
    let input = include_str!("fixtures/import.jsonl");
    let (rows, report) = import::import_jsonl(input);
    assert_eq!(report.total, 9);
    assert_eq!(report.accepted, 2);
    assert_eq!(rows[0].id, "ok-1");
    assert_eq!(rows[1].object["ph"], 7.2);
    let reason = |line: usize| report.rejected.iter().find(|r| r.line == line).map(|r| r.reason.clone()).unwrap_or_default();
    assert!(reason(3).contains("not a JSON object"), "{}", reason(3));
    assert!(reason(4).contains("missing column `object`"), "{}", reason(4));
    assert!(reason(5).contains("does not match") && reason(5).contains("/ph"), "{}", reason(5));
    assert!(!reason(6).is_empty(), "remote $ref must be rejected, not fetched");
    assert!(reason(7).contains("invalid schema"), "{}", reason(7));
    assert!(reason(8).contains("unparseable JSON"), "{}", reason(8));
    assert!(reason(10).contains("`text` is empty"), "{}", reason(10));
    // Imported rows get a trace and spans where values occur verbatim.
    assert!(rows[0].spans.iter().any(|s| s.surface == "LOT-2024-0001"));
}

#[test]
fn csv_import_reports_and_skips_bad_rows() {
    let (rows, report) = import::import_csv(include_str!("fixtures/import.csv"));
    assert_eq!((report.total, report.accepted), (4, 1));
    assert_eq!(rows[0].object["batch"], "B123456");
    let reasons: Vec<&str> = report.rejected.iter().map(|r| r.reason.as_str()).collect();
    assert!(reasons[0].contains("does not match"), "{reasons:?}");
    assert!(reasons[1].contains("`schema` is empty"), "{reasons:?}");
    assert!(reasons[2].contains("unparseable JSON"), "{reasons:?}");
    assert_eq!(report.rejected[0].line, 3);
}
