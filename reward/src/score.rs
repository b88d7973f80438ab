//! Scores shared by rewards and evaluation: field match against a reference, schema
//! adherence with partial credit, extra keys, exact match.

use serde_json::Value;

/// Relative tolerance for numbers.
pub const NUMBER_TOLERANCE: f64 = 1e-6;
/// Credit for a number written as a string ("21.5" for 21.5): right value, wrong type.
pub const NUMBER_AS_STRING_CREDIT: f64 = 0.5;
/// Arrays of objects up to this length are matched by exhaustive best assignment.
const EXACT_ASSIGNMENT_MAX: usize = 7;

/// `matched` of `total` reference fields (leaves) were reproduced.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Match {
    pub matched: f64,
    pub total: usize,
}

impl Match {
    /// Share in [0, 1]; an empty reference is matched by anything empty.
    pub fn share(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            (self.matched / self.total as f64).clamp(0.0, 1.0)
        }
    }
    fn add(self, o: Match) -> Match {
        Match { matched: self.matched + o.matched, total: self.total + o.total }
    }
}

/// Leaves of `reference` reproduced by `pred`: objects by key (missing key → 0), arrays of
/// objects by best assignment (order does not matter), scalars with normalisation (strings
/// trimmed, case- and space-insensitive; numbers within tolerance; a number given as a string
/// gets partial credit). A reference null is matched by null or a missing key.
pub fn field_match(pred: Option<&Value>, reference: &Value) -> Match {
    match reference {
        Value::Object(r) => {
            if r.is_empty() {
                return Match { matched: if pred.is_some_and(Value::is_object) { 1.0 } else { 0.0 }, total: 1 };
            }
            let p = pred.and_then(Value::as_object);
            r.iter().fold(Match::default(), |acc, (k, rv)| acc.add(field_match(p.and_then(|p| p.get(k)), rv)))
        }
        Value::Array(r) => {
            let p: &[Value] = pred.and_then(Value::as_array).map_or(&[], Vec::as_slice);
            if r.is_empty() {
                return Match { matched: if pred.is_some_and(|v| v.as_array().is_some_and(Vec::is_empty)) { 1.0 } else { 0.0 }, total: 1 };
            }
            array_match(p, r)
        }
        Value::Null => Match { matched: if pred.is_none_or(Value::is_null) { 1.0 } else { 0.0 }, total: 1 },
        scalar => Match { matched: pred.map_or(0.0, |p| scalar_credit(p, scalar)), total: 1 },
    }
}

fn scalar_credit(p: &Value, r: &Value) -> f64 {
    match (p, r) {
        (Value::Number(a), Value::Number(b)) => f64::from(numbers_equal(a.as_f64(), b.as_f64())),
        (Value::String(a), Value::Number(b)) => match a.trim().replace(',', "").parse::<f64>() {
            Ok(x) if numbers_equal(Some(x), b.as_f64()) => NUMBER_AS_STRING_CREDIT,
            _ => 0.0,
        },
        (Value::String(a), Value::String(b)) => f64::from(normalise(a) == normalise(b)),
        (Value::Bool(a), Value::Bool(b)) => f64::from(a == b),
        _ => 0.0,
    }
}

fn numbers_equal(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= NUMBER_TOLERANCE * a.abs().max(b.abs()).max(1.0),
        _ => false,
    }
}

fn normalise(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Best one-to-one assignment of predicted items to reference items.
fn array_match(p: &[Value], r: &[Value]) -> Match {
    let per_item: Vec<Vec<Match>> = r.iter().map(|ri| p.iter().map(|pi| field_match(Some(pi), ri)).collect()).collect();
    let totals: Vec<usize> = r.iter().map(|ri| field_match(None, ri).total.max(1)).collect();
    let total: usize = totals.iter().sum();
    let score = |ri: usize, pi: usize| per_item[ri][pi].matched;
    let matched = if r.len() <= EXACT_ASSIGNMENT_MAX && p.len() <= EXACT_ASSIGNMENT_MAX {
        best_assignment(r.len(), p.len(), &score)
    } else {
        // Greedy for long arrays: highest-scoring pairs first.
        let mut pairs: Vec<(f64, usize, usize)> =
            (0..r.len()).flat_map(|ri| (0..p.len()).map(move |pi| (ri, pi))).map(|(ri, pi)| (score(ri, pi), ri, pi)).collect();
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let (mut used_r, mut used_p, mut sum) = (vec![false; r.len()], vec![false; p.len()], 0.0);
        for (s, ri, pi) in pairs {
            if !used_r[ri] && !used_p[pi] {
                used_r[ri] = true;
                used_p[pi] = true;
                sum += s;
            }
        }
        sum
    };
    Match { matched, total }
}

/// Exhaustive search over assignments (small arrays only).
fn best_assignment(nr: usize, np: usize, score: &dyn Fn(usize, usize) -> f64) -> f64 {
    fn go(ri: usize, nr: usize, np: usize, used: &mut Vec<bool>, score: &dyn Fn(usize, usize) -> f64) -> f64 {
        if ri == nr {
            return 0.0;
        }
        let mut best = go(ri + 1, nr, np, used, score); // reference item left unmatched
        for pi in 0..np {
            if !used[pi] {
                used[pi] = true;
                best = best.max(score(ri, pi) + go(ri + 1, nr, np, used, score));
                used[pi] = false;
            }
        }
        best
    }
    go(0, nr, np, &mut vec![false; np], score)
}

/// JSON equality with numbers compared as values (1 == 1.0).
pub fn exact_match(pred: &Value, reference: &Value) -> bool {
    match (pred, reference) {
        (Value::Object(a), Value::Object(b)) => a.len() == b.len() && b.iter().all(|(k, v)| a.get(k).is_some_and(|x| exact_match(x, v))),
        (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| exact_match(x, y)),
        (Value::Number(a), Value::Number(b)) => numbers_equal(a.as_f64(), b.as_f64()),
        _ => pred == reference,
    }
}

/// Keys in `pred` that the schema does not declare (walks `properties`, `items`, local `$ref`s).
pub fn extra_keys(pred: &Value, schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk_extra(pred, schema, schema, "", &mut out, 0);
    out
}

fn walk_extra(pred: &Value, node: &Value, root: &Value, ptr: &str, out: &mut Vec<String>, depth: usize) {
    if depth > 64 {
        return;
    }
    let node = resolve_local(root, node);
    match pred {
        Value::Object(m) => {
            let props = node.get("properties").and_then(Value::as_object);
            let Some(props) = props else { return };
            for (k, v) in m {
                match props.get(k) {
                    Some(child) => walk_extra(v, child, root, &format!("{ptr}/{k}"), out, depth + 1),
                    None => out.push(format!("{ptr}/{k}")),
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = node.get("items") {
                for (i, v) in items.iter().enumerate() {
                    walk_extra(v, item_schema, root, &format!("{ptr}/{i}"), out, depth + 1);
                }
            }
        }
        _ => {}
    }
}

/// Follows local references (`#/$defs/Name`, `#/definitions/Name`) from `node` against `root`.
pub fn resolve_local<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    let mut cur = node;
    for _ in 0..32 {
        let Some(r) = cur.get("$ref").and_then(Value::as_str) else { break };
        let target = r
            .strip_prefix("#/$defs/")
            .and_then(|n| root.get("$defs")?.get(n))
            .or_else(|| r.strip_prefix("#/definitions/").and_then(|n| root.get("definitions")?.get(n)));
        match target {
            Some(t) => cur = t,
            None => break,
        }
    }
    cur
}

/// Object nesting depth of a schema: the root object is 1; each object inside it (directly,
/// as array items, or in an `anyOf`/`oneOf` branch) adds one. Local `$ref`s are followed.
pub fn schema_depth(schema: &Value) -> usize {
    fn go(root: &Value, node: &Value, guard: usize) -> usize {
        if guard > 32 {
            return 0;
        }
        let node = resolve_local(root, node);
        let own = node
            .get("properties")
            .and_then(Value::as_object)
            .map_or(0, |p| 1 + p.values().map(|c| go(root, c, guard + 1)).max().unwrap_or(0));
        let items = node.get("items").map_or(0, |i| go(root, i, guard + 1));
        let branches = ["anyOf", "oneOf"]
            .iter()
            .filter_map(|k| node.get(*k).and_then(Value::as_array))
            .flat_map(|bs| bs.iter().map(|b| go(root, b, guard + 1)))
            .max()
            .unwrap_or(0);
        own.max(items).max(branches)
    }
    go(schema, schema, 0)
}

/// Number of nodes (values) in an instance, for schema partial credit.
pub fn count_nodes(v: &Value) -> usize {
    // Iterative: instances can be deep.
    let mut stack = vec![v];
    let mut n = 0;
    while let Some(x) = stack.pop() {
        n += 1;
        match x {
            Value::Object(m) => stack.extend(m.values()),
            Value::Array(a) => stack.extend(a.iter()),
            _ => {}
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arrays_of_objects_in_another_order_match_fully() {
        let r = json!({"items": [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]});
        let p = json!({"items": [{"a": 2, "b": "Y "}, {"a": 1, "b": "x"}]});
        assert_eq!(field_match(Some(&p), &r).share(), 1.0);
        assert!(!exact_match(&p, &r));
    }

    #[test]
    fn missing_extra_and_numbers_as_strings() {
        let r = json!({"a": 1.5, "b": "q", "c": true, "d": null});
        // missing `b`, `a` as a string, extra `z`, `d` missing (null reference → matched)
        let p = json!({"a": "1.5", "c": true, "z": 9});
        let m = field_match(Some(&p), &r);
        assert_eq!(m.total, 4);
        assert!((m.matched - (0.5 + 0.0 + 1.0 + 1.0)).abs() < 1e-12, "{m:?}");
        let schema = json!({"properties": {"a": {}, "b": {}, "c": {}, "d": {}}});
        assert_eq!(extra_keys(&p, &schema), vec!["/z".to_string()]);
    }

    #[test]
    fn nested_nulls() {
        let r = json!({"x": {"y": null, "z": [null, 1]}});
        assert_eq!(field_match(Some(&json!({"x": {"z": [null, 1]}})), &r).share(), 1.0);
        assert_eq!(field_match(Some(&json!({"x": {"y": 0, "z": [null, 1]}})), &r).matched, 2.0);
        assert_eq!(field_match(None, &r).matched, 1.0); // only the null leaf
    }
}
