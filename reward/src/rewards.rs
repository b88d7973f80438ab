//! Reward functions behind one trait, and their weighted sum.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::{adherence, ValidatorCache};
use crate::parse::{JsonForm, Parsed};
use crate::score::{extra_keys, field_match};

/// What a reward function sees besides the completion.
pub struct Context<'a> {
    pub schema: &'a Value,
    /// The reference object, when the sample has one.
    pub reference: Option<&'a Value>,
    /// The sample id (for human feedback).
    pub sample_id: Option<&'a str>,
    pub validators: &'a ValidatorCache,
}

/// A score and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub value: f64,
    pub reason: String,
}

impl Score {
    fn new(value: f64, reason: impl Into<String>) -> Self {
        Self { value, reason: reason.into() }
    }
}

/// One reward function. `range` documents the scores it returns.
pub trait RewardFn: Send + Sync {
    fn name(&self) -> &str;
    fn range(&self) -> (f64, f64);
    fn score(&self, completion: &str, parsed: &Parsed, ctx: &Context<'_>) -> Score;
}

/// Think/answer structure: 1 for exactly one `<think>` block then one `<answer>` block; 0.5
/// when the answer block is there but the think block is missing, doubled or misordered; 0
/// without an answer block. Range [0, 1].
pub struct FormatReward;

impl RewardFn for FormatReward {
    fn name(&self) -> &str {
        "format"
    }
    fn range(&self) -> (f64, f64) {
        (0.0, 1.0)
    }
    fn score(&self, _: &str, p: &Parsed, _: &Context<'_>) -> Score {
        if p.format_ok() {
            Score::new(1.0, "one think block, then one answer block")
        } else if p.answer.is_some() {
            Score::new(0.5, format!(
                "answer present but think/answer tags are off (think {}/{}, answer {}/{}, ordered {})",
                p.think_open, p.think_close, p.answer_open, p.answer_close, p.ordered
            ))
        } else {
            Score::new(0.0, "no <answer>…</answer> block")
        }
    }
}

/// The JSON parses: 1 inside the answer block, 0.5 when found elsewhere (fenced or bare), 0
/// otherwise. Range [0, 1].
pub struct JsonValidReward;

impl RewardFn for JsonValidReward {
    fn name(&self) -> &str {
        "json_valid"
    }
    fn range(&self) -> (f64, f64) {
        (0.0, 1.0)
    }
    fn score(&self, _: &str, p: &Parsed, _: &Context<'_>) -> Score {
        match (&p.json, p.form) {
            (Some(_), JsonForm::Answer) => Score::new(1.0, "valid JSON in the answer"),
            (Some(_), form) => Score::new(0.5, format!("valid JSON found as {form:?}, not in <answer>")),
            (None, _) => Score::new(0.0, p.json_error.clone().unwrap_or_else(|| "no JSON".into())),
        }
    }
}

/// Schema adherence with partial credit: 1 when valid, else the share of instance locations
/// without errors; 0 without JSON or when the schema does not compile. Range [0, 1].
pub struct SchemaReward;

impl RewardFn for SchemaReward {
    fn name(&self) -> &str {
        "schema"
    }
    fn range(&self) -> (f64, f64) {
        (0.0, 1.0)
    }
    fn score(&self, _: &str, p: &Parsed, ctx: &Context<'_>) -> Score {
        let Some(json) = &p.json else { return Score::new(0.0, "no JSON to validate") };
        let (v, why) = adherence(&ctx.validators.get(ctx.schema), json);
        Score::new(v, why.unwrap_or_else(|| "valid against the schema".into()))
    }
}

/// Share of the reference's fields reproduced (see [`crate::score::field_match`]). Range
/// [0, 1]; 0 without a reference.
pub struct FieldMatchReward;

impl RewardFn for FieldMatchReward {
    fn name(&self) -> &str {
        "match"
    }
    fn range(&self) -> (f64, f64) {
        (0.0, 1.0)
    }
    fn score(&self, _: &str, p: &Parsed, ctx: &Context<'_>) -> Score {
        let Some(reference) = ctx.reference else { return Score::new(0.0, "no reference object") };
        let m = field_match(p.json.as_ref(), reference);
        Score::new(m.share(), format!("{:.1} of {} fields", m.matched, m.total))
    }
}

/// Penalty for noise: minus the share of characters outside think/answer/JSON, minus the share
/// of keys the schema does not declare. Range [-2, 0].
pub struct NoiseReward;

impl RewardFn for NoiseReward {
    fn name(&self) -> &str {
        "noise"
    }
    fn range(&self) -> (f64, f64) {
        (-2.0, 0.0)
    }
    fn score(&self, _: &str, p: &Parsed, ctx: &Context<'_>) -> Score {
        let extra = p.json.as_ref().map(|j| (extra_keys(j, ctx.schema).len(), crate::score::count_nodes(j))).unwrap_or((0, 1));
        let extra_share = extra.0 as f64 / extra.1.max(1) as f64;
        Score::new(-(p.noise_share() + extra_share), format!("{} noise chars, {} extra keys", p.noise_chars, extra.0))
    }
}

/// Optional length shaping: 0 up to `target_chars`, then down linearly to -1 at twice that.
/// Range [-1, 0].
pub struct LengthReward {
    pub target_chars: usize,
}

impl RewardFn for LengthReward {
    fn name(&self) -> &str {
        "length"
    }
    fn range(&self) -> (f64, f64) {
        (-1.0, 0.0)
    }
    fn score(&self, completion: &str, _: &Parsed, _: &Context<'_>) -> Score {
        let n = completion.chars().count();
        let t = self.target_chars.max(1);
        let over = n.saturating_sub(t) as f64 / t as f64;
        Score::new(-over.min(1.0), format!("{n} chars (target {t})"))
    }
}

/// Weights of the built-in functions (0 turns one off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardWeights {
    pub format: f64,
    pub json_valid: f64,
    pub schema: f64,
    #[serde(rename = "match")]
    pub field_match: f64,
    pub noise: f64,
    pub length: f64,
    pub length_target_chars: usize,
    pub feedback: f64,
}

impl Default for RewardWeights {
    fn default() -> Self {
        Self {
            format: 0.5,
            json_valid: 0.5,
            schema: 1.0,
            field_match: 1.0,
            noise: 0.5,
            length: 0.0,
            length_target_chars: 4000,
            feedback: 1.0,
        }
    }
}

/// Per-function score of one completion, kept for logging.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub name: String,
    pub weight: f64,
    pub score: Score,
}

/// The weighted sum and its parts.
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub total: f64,
    pub parts: Vec<Part>,
}

/// Weighted reward functions.
pub struct RewardSet {
    fns: Vec<(Box<dyn RewardFn>, f64)>,
}

impl RewardSet {
    pub fn new() -> Self {
        Self { fns: Vec::new() }
    }

    /// The built-in functions with `weights` (zero-weight ones left out).
    pub fn from_weights(w: &RewardWeights) -> Self {
        let mut set = Self::new();
        let all: Vec<(Box<dyn RewardFn>, f64)> = vec![
            (Box::new(FormatReward), w.format),
            (Box::new(JsonValidReward), w.json_valid),
            (Box::new(SchemaReward), w.schema),
            (Box::new(FieldMatchReward), w.field_match),
            (Box::new(NoiseReward), w.noise),
            (Box::new(LengthReward { target_chars: w.length_target_chars }), w.length),
        ];
        for (f, weight) in all {
            if weight != 0.0 {
                set.fns.push((f, weight));
            }
        }
        set
    }

    pub fn with(mut self, f: Box<dyn RewardFn>, weight: f64) -> Self {
        self.fns.push((f, weight));
        self
    }

    pub fn names(&self) -> Vec<String> {
        self.fns.iter().map(|(f, _)| f.name().to_string()).collect()
    }

    /// Scores one completion.
    pub fn score(&self, completion: &str, ctx: &Context<'_>) -> Scored {
        let parsed = crate::parse::parse(completion);
        let parts: Vec<Part> = self
            .fns
            .iter()
            .map(|(f, w)| Part { name: f.name().to_string(), weight: *w, score: f.score(completion, &parsed, ctx) })
            .collect();
        Scored { total: parts.iter().map(|p| p.weight * p.score.value).sum(), parts }
    }
}

impl Default for RewardSet {
    fn default() -> Self {
        Self::from_weights(&RewardWeights::default())
    }
}
