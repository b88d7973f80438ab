//! Dataset rows, the generator's configuration, and splits.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::DocKind;
use crate::error::SynthError;
use crate::render::{facts, render, Span, Style};
use crate::schema_ops::{self, leaf_catalogue, normalize, random_schema, vary, Variation};
use crate::reasoning::{self, ReasoningStyle};
use crate::object;

/// One (text, schema, object, reasoning) example; serialised as a JSONL line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    /// Document kind (`batch_record`, …), `random` for random schemas, `imported` for imports.
    pub kind: String,
    pub style: String,
    pub text: String,
    pub schema: Value,
    pub object: Value,
    pub reasoning: String,
    /// Where each leaf value of `object` appears in `text`.
    #[serde(default)]
    pub spans: Vec<Span>,
    /// Which split the row belongs to (`grpo`, `sft`, `eval`).
    #[serde(default)]
    pub split: String,
    /// The text template family (`kind/style`).
    #[serde(default)]
    pub template: String,
}

/// The three uses of the data; a (schema, template) pair lives in one split only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Grpo,
    Sft,
    Eval,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Grpo => "grpo",
            Split::Sft => "sft",
            Split::Eval => "eval",
        }
    }
    pub fn parse(s: &str) -> Result<Split, SynthError> {
        match s {
            "grpo" => Ok(Split::Grpo),
            "sft" => Ok(Split::Sft),
            "eval" => Ok(Split::Eval),
            other => Err(SynthError::UnknownSplit(other.to_string())),
        }
    }
}

/// Generator settings; every field has a default.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub rows: usize,
    pub seed: u64,
    /// Kinds to draw from (all when empty).
    pub kinds: Vec<DocKind>,
    /// Share of rows whose schema is random (built from domain fields) rather than a kind's.
    pub random_schema_share: f64,
    /// Only rows of this split (all splits when `None`).
    pub split: Option<Split>,
    /// Shares of grpo / sft / eval, by hash of (schema, template). The paper: 20K / 10K / 6.5K.
    pub split_shares: [f64; 3],
    pub styles: Vec<Style>,
    pub variation: Variation,
    /// Deepest nesting of random schemas.
    pub max_random_depth: usize,
    /// How long the `<think>` traces are.
    pub reasoning: ReasoningStyle,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            rows: 1000,
            seed: 0,
            kinds: Vec::new(),
            random_schema_share: 0.2,
            split: None,
            split_shares: [0.55, 0.27, 0.18],
            styles: Style::ALL.to_vec(),
            variation: Variation::default(),
            max_random_depth: 5,
            reasoning: ReasoningStyle::Full,
        }
    }
}

/// FNV-1a: a hash that is the same on every platform and Rust version (splits must not move).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The split of a (schema, template) pair.
pub fn split_of(schema: &Value, template: &str, shares: [f64; 3]) -> Split {
    let key = format!("{}\u{1f}{template}", serde_json::to_string(schema).unwrap_or_default());
    let x = (stable_hash(key.as_bytes()) % 1_000_000) as f64 / 1_000_000.0;
    let total: f64 = shares.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    if x < shares[0] / total {
        Split::Grpo
    } else if x < (shares[0] + shares[1]) / total {
        Split::Sft
    } else {
        Split::Eval
    }
}

/// Generates rows; the same config gives byte-identical rows.
pub struct Generator {
    config: SynthConfig,
    bases: Vec<(DocKind, Value)>,
    catalogue: Vec<(String, Value)>,
}

impl Generator {
    pub fn new(config: SynthConfig) -> Self {
        let kinds = if config.kinds.is_empty() { DocKind::ALL.to_vec() } else { config.kinds.clone() };
        let bases = kinds.into_iter().map(|k| (k, normalize(Value::from(k.base_schema())))).collect();
        Self { config, bases, catalogue: leaf_catalogue() }
    }

    /// Candidate row `index` (before split filtering); depends only on (seed, index).
    pub fn candidate(&self, index: u64) -> Result<Row, SynthError> {
        let c = &self.config;
        if !(0.0..=1.0).contains(&c.random_schema_share) {
            return Err(SynthError::Invalid(format!("random_schema_share must be within [0, 1], got {}", c.random_schema_share)));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(c.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (kind_name, title, schema) = if rng.random_bool(c.random_schema_share) {
            let depth = rng.random_range(1..=c.max_random_depth.max(1));
            let base = random_schema(&self.catalogue, depth, &mut rng);
            ("random".to_string(), "Quality record".to_string(), vary(&base, &c.variation, &mut rng))
        } else {
            let (kind, base) = self.bases.choose(&mut rng).ok_or_else(|| SynthError::Invalid("no document kinds selected".into()))?;
            (kind.name().to_string(), kind.title().to_string(), vary(base, &c.variation, &mut rng))
        };
        let style = *c.styles.choose(&mut rng).ok_or_else(|| SynthError::Invalid("no styles selected".into()))?;
        // An object with no leaf value at all (every property optional and left out) teaches
        // nothing: draw again (a handful of tries; the rng stream keeps it deterministic).
        let mut object = object::generate(&schema, &mut rng)?;
        for _ in 0..8 {
            if has_leaf(&object) {
                break;
            }
            object = object::generate(&schema, &mut rng)?;
        }
        let facts = facts(&schema, &object, &mut rng);
        let rendered = render(&title, &facts, style, &mut rng);
        let reasoning = reasoning::reason(c.reasoning, &title, &facts, &rendered.distractors);
        let template = format!("{kind_name}/{}", style.name());
        let split = split_of(&schema, &template, c.split_shares);
        Ok(Row {
            id: format!("{:x}-{index}", c.seed),
            kind: kind_name,
            style: style.name().to_string(),
            text: rendered.text,
            schema,
            object,
            reasoning,
            spans: rendered.spans,
            split: split.name().to_string(),
            template,
        })
    }

    /// The configured number of rows (of the configured split, if any).
    pub fn rows(&self) -> Result<Vec<Row>, SynthError> {
        let mut out = Vec::with_capacity(self.config.rows);
        let attempts = self.config.rows.saturating_mul(20).max(100);
        for index in 0..attempts as u64 {
            if out.len() == self.config.rows {
                return Ok(out);
            }
            let row = self.candidate(index)?;
            if self.config.split.is_none_or(|s| s.name() == row.split) {
                out.push(row);
            }
        }
        if out.len() == self.config.rows {
            return Ok(out);
        }
        Err(SynthError::SplitStarved {
            wanted: self.config.rows,
            split: self.config.split.map_or("all", Split::name).to_string(),
            attempts,
        })
    }
}

fn has_leaf(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.values().any(has_leaf),
        Value::Array(a) => a.iter().any(has_leaf),
        Value::Null => false,
        _ => true,
    }
}

/// Convenience: `Generator::new(config).rows()`.
pub fn generate(config: SynthConfig) -> Result<Vec<Row>, SynthError> {
    Generator::new(config).rows()
}

/// Depth of a row's schema (for stats and eval breakdowns).
pub fn schema_depth(row: &Row) -> usize {
    schema_ops::depth(&row.schema)
}
