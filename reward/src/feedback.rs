//! Human feedback as a reward: reviewers' verdicts on sampled completions, keyed by sample id,
//! steer GRPO towards their corrections.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::parse::Parsed;
use crate::rewards::{Context, RewardFn, Score};
use crate::score::{exact_match, field_match};

/// A reviewer's verdict on a whole output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Reject,
}

/// One JSONL line of reviews.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Review {
    /// The sample (prompt) id the reviewed completion answered.
    pub id: String,
    /// The object the reviewer saw.
    pub output: Value,
    pub verdict: Option<Verdict>,
    /// The reviewer's corrected object.
    pub corrected: Option<Value>,
    /// Per-field verdicts by JSON pointer: `true` = right, `false` = wrong.
    #[serde(default)]
    pub fields: HashMap<String, bool>,
    /// Context for the reviewer (`cargo xtask grpo --export-samples` fills it); not scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
}

/// Rejected review lines, with their line number and why.
pub type ReviewErrors = Vec<(usize, String)>;

/// Reviews by sample id. Range of its reward: [-1, 1].
///
/// - a corrected object: the share of its fields reproduced (0..1);
/// - accept: the share of the accepted output's fields reproduced; reject: minus that share
///   (reproducing a rejected output is penalised);
/// - per-field verdicts: +1 for each right field kept, −1 for each wrong field repeated,
///   averaged; blended half and half with the whole-output part when both exist.
pub struct FeedbackReward {
    reviews: HashMap<String, Review>,
}

impl FeedbackReward {
    /// Parses review JSONL; malformed lines are returned, not fatal.
    pub fn from_jsonl(text: &str) -> (Self, ReviewErrors) {
        let mut reviews = HashMap::new();
        let mut errors = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Review>(line) {
                Ok(r) => {
                    reviews.insert(r.id.clone(), r);
                }
                Err(e) => errors.push((i + 1, e.to_string())),
            }
        }
        (Self { reviews }, errors)
    }

    pub fn len(&self) -> usize {
        self.reviews.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reviews.is_empty()
    }
}

fn pointer<'a>(v: &'a Value, ptr: &str) -> Option<&'a Value> {
    if ptr.is_empty() {
        Some(v)
    } else {
        v.pointer(ptr)
    }
}

impl RewardFn for FeedbackReward {
    fn name(&self) -> &str {
        "feedback"
    }
    fn range(&self) -> (f64, f64) {
        (-1.0, 1.0)
    }
    fn score(&self, _: &str, p: &Parsed, ctx: &Context<'_>) -> Score {
        let Some(review) = ctx.sample_id.and_then(|id| self.reviews.get(id)) else {
            return Score { value: 0.0, reason: "no review for this sample".into() };
        };
        let pred = p.json.as_ref();
        let whole = match (&review.corrected, review.verdict) {
            (Some(c), _) => Some(field_match(pred, c).share()),
            (None, Some(Verdict::Accept)) => Some(field_match(pred, &review.output).share()),
            (None, Some(Verdict::Reject)) => Some(-field_match(pred, &review.output).share()),
            (None, None) => None,
        };
        let fields = (!review.fields.is_empty()).then(|| {
            let sum: f64 = review
                .fields
                .iter()
                .map(|(ptr, right)| {
                    let same = match (pred.and_then(|j| pointer(j, ptr)), pointer(&review.output, ptr)) {
                        (Some(a), Some(b)) => exact_match(a, b),
                        _ => false,
                    };
                    match (right, same) {
                        (true, true) => 1.0,
                        (false, true) => -1.0,
                        _ => 0.0,
                    }
                })
                .sum();
            sum / review.fields.len() as f64
        });
        let value = match (whole, fields) {
            (Some(w), Some(f)) => 0.5 * w + 0.5 * f,
            (Some(w), None) => w,
            (None, Some(f)) => f,
            (None, None) => 0.0,
        };
        Score { value, reason: format!("review of {}: whole {whole:?}, fields {fields:?}", review.id) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ValidatorCache;

    /// A line as `cargo xtask grpo --export-samples` writes it, with a reviewer's correction
    /// added, reads back and scores; the context fields are not scored.
    #[test]
    fn exported_review_lines_read_back() {
        let line = r#"{"id":"s1","output":{"lot":"A-1"},"verdict":null,"corrected":{"lot":"A-17"},"fields":{},"completion":"<answer>{\"lot\":\"A-1\"}</answer>","reward":2.5,"step":3}"#;
        let (fb, bad) = FeedbackReward::from_jsonl(line);
        assert!(bad.is_empty(), "{bad:?}");
        let schema = serde_json::json!({});
        let cache = ValidatorCache::new();
        let ctx = Context { schema: &schema, reference: None, sample_id: Some("s1"), validators: &cache };
        let right = fb.score("", &crate::parse::parse("<answer>{\"lot\": \"A-17\"}</answer>"), &ctx);
        let wrong = fb.score("", &crate::parse::parse("<answer>{\"lot\": \"A-1\"}</answer>"), &ctx);
        assert_eq!((right.value, wrong.value), (1.0, 0.0));
    }
}
