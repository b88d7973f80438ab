//! # thinkjson-eval
//!
//! Evaluation of any system's completions against a (text, schema, object) dataset, on the
//! same scoring the GRPO rewards use (`thinkjson-reward`): rows with no output, valid JSON,
//! schema-valid, format-valid, mean match %, mean noise %, exact match and a content score,
//! overall and by document kind, text style and schema depth. Reports are Markdown, JSON and
//! SVG charts (metric bars per run; training curves from metrics JSONL). Files are the
//! caller's business: this crate returns strings.
//!
//! Key types: [`Sample`], [`Prediction`], [`RunReport`], [`Report`], [`Curves`], and
//! [`Spread`] for the same systems over several runs (seeds): mean and range per metric.
//!
//! ```
//! use thinkjson_eval::{evaluate, Prediction, Sample};
//! use thinkjson_reward::ValidatorCache;
//! let s = Sample { id: "1".into(), kind: "k".into(), style: "s".into(),
//!     schema: serde_json::json!({"type": "object"}), object: serde_json::json!({"a": 1}) };
//! let p = Prediction { id: "1".into(), completion: "<think>t</think><answer>{\"a\": 1}</answer>".into(),
//!     latency_ms: None, tokens: None, closed: None };
//! let run = evaluate("demo", &[s], &[p], vec![], &ValidatorCache::new());
//! assert_eq!(run.overall.mean_match, 1.0);
//! ```

pub mod metrics;
pub mod report;
pub mod spread;

pub use metrics::{evaluate, parse_jsonl, score_row, Aggregate, Prediction, RowResult, RunReport, Sample, Skipped};
pub use report::{curves_svg, markdown, metrics_svg, Curves, Report};
pub use spread::{spread, spread_markdown, Spread, Stat, SystemSpread};
