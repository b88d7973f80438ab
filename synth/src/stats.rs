//! Variety figures of a dataset (`cargo xtask synth --stats`).

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::dataset::{schema_depth, Row};
use crate::schema_ops::keyword_counts;

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub rows: usize,
    pub distinct_schemas: usize,
    pub kinds: BTreeMap<String, usize>,
    pub styles: BTreeMap<String, usize>,
    pub splits: BTreeMap<String, usize>,
    /// Schema depth → rows.
    pub depth_histogram: BTreeMap<usize, usize>,
    /// Keyword → occurrences over all rows' schemas.
    pub keywords: BTreeMap<String, usize>,
    /// Text length in characters: min, p50, p90, max, mean.
    pub text_chars: [f64; 5],
}

pub fn stats(rows: &[Row]) -> Stats {
    let mut s = Stats {
        rows: rows.len(),
        distinct_schemas: 0,
        kinds: BTreeMap::new(),
        styles: BTreeMap::new(),
        splits: BTreeMap::new(),
        depth_histogram: BTreeMap::new(),
        keywords: BTreeMap::new(),
        text_chars: [0.0; 5],
    };
    let mut schemas = HashSet::new();
    let mut lens: Vec<usize> = Vec::with_capacity(rows.len());
    for r in rows {
        *s.kinds.entry(r.kind.clone()).or_default() += 1;
        *s.styles.entry(r.style.clone()).or_default() += 1;
        *s.splits.entry(r.split.clone()).or_default() += 1;
        *s.depth_histogram.entry(schema_depth(r)).or_default() += 1;
        keyword_counts(&r.schema, &mut s.keywords);
        schemas.insert(serde_json::to_string(&r.schema).unwrap_or_default());
        lens.push(r.text.chars().count());
    }
    s.distinct_schemas = schemas.len();
    lens.sort_unstable();
    if let (Some(&min), Some(&max)) = (lens.first(), lens.last()) {
        let at = |q: f64| lens[((lens.len() - 1) as f64 * q).round() as usize] as f64;
        let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
        s.text_chars = [min as f64, at(0.5), at(0.9), max as f64, mean];
    }
    s
}
