//! Per-row metrics and aggregates, on the reward crate's definitions.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thinkjson_reward::score::{exact_match, field_match, schema_depth};
use thinkjson_reward::{adherence, parse, ValidatorCache};

/// A dataset row as evaluation needs it (extra fields of the JSONL are ignored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub id: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub style: String,
    pub schema: Value,
    pub object: Value,
}

/// One system output for a sample.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    pub completion: String,
    #[serde(default)]
    pub latency_ms: Option<f64>,
    #[serde(default)]
    pub tokens: Option<f64>,
    /// Constrained decoding ran short of tokens and closed the JSON itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<bool>,
}

/// A JSONL line that was reported and skipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub line: usize,
    pub reason: String,
}

/// Parses JSONL of `T`, reporting malformed lines instead of failing.
pub fn parse_jsonl<T: serde::de::DeserializeOwned>(text: &str) -> (Vec<T>, Vec<Skipped>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => ok.push(v),
            Err(e) => bad.push(Skipped { line: i + 1, reason: e.to_string() }),
        }
    }
    (ok, bad)
}

/// Metrics of one row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowResult {
    pub id: String,
    pub kind: String,
    pub style: String,
    pub depth: usize,
    pub no_output: bool,
    pub valid_json: bool,
    pub schema_valid: bool,
    pub format_valid: bool,
    /// Share of the reference's fields reproduced, [0, 1].
    pub match_share: f64,
    /// Share of the completion outside think/answer/JSON, [0, 1].
    pub noise_share: f64,
    pub exact: bool,
    /// `match × (1 − noise)`: right content, cleanly delivered.
    pub content: f64,
    pub latency_ms: Option<f64>,
    pub tokens: Option<f64>,
}

/// Scores one completion against its sample.
pub fn score_row(sample: &Sample, completion: Option<&Prediction>, cache: &ValidatorCache) -> RowResult {
    let text = completion.map_or("", |p| p.completion.as_str());
    let parsed = parse(text);
    let no_output = text.trim().is_empty();
    let json = parsed.json.as_ref();
    let schema_valid = json.is_some_and(|j| adherence(&cache.get(&sample.schema), j).0 >= 1.0);
    let match_share = if json.is_some() { field_match(json, &sample.object).share() } else { 0.0 };
    let noise_share = parsed.noise_share();
    RowResult {
        id: sample.id.clone(),
        kind: sample.kind.clone(),
        style: sample.style.clone(),
        depth: schema_depth(&sample.schema),
        no_output,
        valid_json: json.is_some(),
        schema_valid,
        format_valid: parsed.format_ok(),
        match_share,
        noise_share,
        exact: json.is_some_and(|j| exact_match(j, &sample.object)),
        content: match_share * (1.0 - noise_share),
        latency_ms: completion.and_then(|p| p.latency_ms),
        tokens: completion.and_then(|p| p.tokens),
    }
}

/// Aggregate metrics over rows (rates and means in [0, 1], except latency and tokens).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Aggregate {
    pub rows: usize,
    pub no_output: f64,
    pub valid_json: f64,
    pub schema_valid: f64,
    pub format_valid: f64,
    pub mean_match: f64,
    /// Mean over rows that have output.
    pub mean_noise: f64,
    pub exact: f64,
    pub content: f64,
    pub mean_latency_ms: Option<f64>,
    pub mean_tokens: Option<f64>,
}

impl Aggregate {
    pub fn of(rows: &[&RowResult]) -> Self {
        let n = rows.len().max(1) as f64;
        let rate = |f: &dyn Fn(&RowResult) -> bool| rows.iter().filter(|r| f(r)).count() as f64 / n;
        let mean = |f: &dyn Fn(&RowResult) -> f64| rows.iter().map(|r| f(r)).sum::<f64>() / n;
        let with_output: Vec<&&RowResult> = rows.iter().filter(|r| !r.no_output).collect();
        let opt_mean = |f: &dyn Fn(&RowResult) -> Option<f64>| {
            let v: Vec<f64> = rows.iter().filter_map(|r| f(r)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        Self {
            rows: rows.len(),
            no_output: rate(&|r| r.no_output),
            valid_json: rate(&|r| r.valid_json),
            schema_valid: rate(&|r| r.schema_valid),
            format_valid: rate(&|r| r.format_valid),
            mean_match: mean(&|r| r.match_share),
            // (An empty float sum is -0.0: start from +0.0.)
            mean_noise: with_output.iter().fold(0.0, |acc, r| acc + r.noise_share) / with_output.len().max(1) as f64,
            exact: rate(&|r| r.exact),
            content: mean(&|r| r.content),
            mean_latency_ms: opt_mean(&|r| r.latency_ms),
            mean_tokens: opt_mean(&|r| r.tokens),
        }
    }
}

/// One evaluated system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub name: String,
    pub overall: Aggregate,
    pub by_kind: BTreeMap<String, Aggregate>,
    pub by_style: BTreeMap<String, Aggregate>,
    pub by_depth: BTreeMap<usize, Aggregate>,
    /// Predictions whose id is not in the dataset.
    pub unknown_ids: usize,
    /// Malformed prediction lines (reported, not scored).
    pub skipped: Vec<Skipped>,
    pub rows: Vec<RowResult>,
}

/// Scores `predictions` (one per sample id; a missing one counts as no output).
pub fn evaluate(name: &str, samples: &[Sample], predictions: &[Prediction], skipped: Vec<Skipped>, cache: &ValidatorCache) -> RunReport {
    let by_id: HashMap<&str, &Prediction> = predictions.iter().map(|p| (p.id.as_str(), p)).collect();
    let known: std::collections::HashSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    let rows: Vec<RowResult> = samples.iter().map(|s| score_row(s, by_id.get(s.id.as_str()).copied(), cache)).collect();
    let all: Vec<&RowResult> = rows.iter().collect();
    fn group<K: Ord + Clone>(rows: &[RowResult], key: impl Fn(&RowResult) -> K) -> BTreeMap<K, Aggregate> {
        let mut m: BTreeMap<K, Vec<&RowResult>> = BTreeMap::new();
        for r in rows {
            m.entry(key(r)).or_default().push(r);
        }
        m.into_iter().map(|(k, v)| (k, Aggregate::of(&v))).collect()
    }
    RunReport {
        name: name.to_string(),
        overall: Aggregate::of(&all),
        by_kind: group(&rows, |r| r.kind.clone()),
        by_style: group(&rows, |r| r.style.clone()),
        by_depth: group(&rows, |r| r.depth),
        unknown_ids: predictions.iter().filter(|p| !known.contains(p.id.as_str())).count(),
        skipped,
        rows,
    }
}
