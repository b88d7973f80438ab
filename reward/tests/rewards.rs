//! Rewards on hand-written cases with known answers, human feedback, and hostile inputs.

use proptest::prelude::*;
use serde_json::{json, Value};
use thinkjson_reward::{parse, parse_bytes, Context, FeedbackReward, RewardSet, RewardWeights, ValidatorCache};

fn weights_one() -> RewardWeights {
    RewardWeights { format: 1.0, json_valid: 1.0, schema: 1.0, field_match: 1.0, noise: 1.0, length: 0.0, ..Default::default() }
}

#[test]
fn known_answer_cases() {
    let cases: Vec<Value> = serde_json::from_str(include_str!("fixtures/cases.json")).unwrap();
    let set = RewardSet::from_weights(&weights_one());
    let cache = ValidatorCache::new();
    for case in &cases {
        let ctx = Context { schema: &case["schema"], reference: Some(&case["reference"]), sample_id: None, validators: &cache };
        let scored = set.score(case["completion"].as_str().unwrap(), &ctx);
        for part in &scored.parts {
            let want = case["expected"][&part.name].as_f64().unwrap();
            assert!(
                (part.score.value - want).abs() < 1e-9,
                "{}: {} = {} ({}), expected {want}",
                case["name"], part.name, part.score.value, part.score.reason
            );
        }
        let total: f64 = scored.parts.iter().map(|p| p.score.value).sum();
        assert!((scored.total - total).abs() < 1e-12);
    }
}

#[test]
fn validators_are_cached_per_schema() {
    let cache = ValidatorCache::new();
    let set = RewardSet::default();
    let schema = json!({"type": "object"});
    for _ in 0..10 {
        let ctx = Context { schema: &schema, reference: None, sample_id: None, validators: &cache };
        set.score("<answer>{}</answer>", &ctx);
    }
    assert_eq!(cache.len(), 1);
}

#[test]
fn human_feedback_steers_towards_corrections() {
    let reviews = r#"{"id": "s1", "output": {"lot": "A-1", "qty": 3}, "corrected": {"lot": "A-17", "qty": 3}}
{"id": "s2", "output": {"lot": "B"}, "verdict": "reject"}
{"id": "s3", "output": {"lot": "C", "qty": 9}, "fields": {"/lot": true, "/qty": false}}
not json
{"id": "s4", "output": {}, "unexpected": 1}"#;
    let (fb, errors) = FeedbackReward::from_jsonl(reviews);
    assert_eq!(fb.len(), 3);
    assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), vec![4, 5]);
    let set = RewardSet::new().with(Box::new(fb), 1.0);
    let cache = ValidatorCache::new();
    let schema = json!({"type": "object"});
    let score = |id: &str, answer: &str| {
        let ctx = Context { schema: &schema, reference: None, sample_id: Some(id), validators: &cache };
        set.score(&format!("<think>t</think><answer>{answer}</answer>"), &ctx).total
    };
    assert_eq!(score("s1", r#"{"lot": "A-17", "qty": 3}"#), 1.0); // the correction
    assert_eq!(score("s1", r#"{"lot": "A-1", "qty": 3}"#), 0.5); // the reviewed mistake
    assert_eq!(score("s2", r#"{"lot": "B"}"#), -1.0); // the rejected output again
    assert_eq!(score("s2", r#"{"lot": "other"}"#), 0.0);
    assert_eq!(score("s3", r#"{"lot": "C", "qty": 9}"#), 0.0); // one right kept, one wrong repeated
    assert_eq!(score("s3", r#"{"lot": "C", "qty": 4}"#), 0.5);
    assert_eq!(score("unknown", "{}"), 0.0);
}

fn score_all(completion: &str, schema: &Value) -> f64 {
    let cache = ValidatorCache::new();
    let reference = json!({"a": [1, {"b": "x"}]});
    let ctx = Context { schema, reference: Some(&reference), sample_id: Some("x"), validators: &cache };
    RewardSet::from_weights(&RewardWeights { length: 1.0, ..Default::default() }).score(completion, &ctx).total
}

#[test]
fn hostile_completions_are_scored_without_panicking() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "array"}}});
    let deep = format!("<answer>{}{}</answer>", "[".repeat(100_000), "]".repeat(100_000));
    let deep_obj = format!("<answer>{}</answer>", "{\"a\":".repeat(100_000));
    let huge_string = format!("<think>x</think><answer>{{\"a\": \"{}\"}}</answer>", "y".repeat(10 * 1024 * 1024));
    let cases = [
        deep,
        deep_obj,
        huge_string,
        "<think><think><answer></think></answer></answer>".to_string(),
        "<answer>{\"a\": 1e400}</answer>".to_string(),
        "<answer>{\"a\": 123456789012345678901234567890123456789}</answer>".to_string(),
        "<answer>".repeat(10_000),
        "{".repeat(50_000),
        String::new(),
    ];
    for c in &cases {
        let total = score_all(c, &schema);
        assert!(total.is_finite(), "non-finite reward for a {}-byte input", c.len());
    }
    let bytes: Vec<u8> = b"<answer>{\"a\": \"\xff\xfe\"}</answer>".to_vec();
    assert!(parse_bytes(&bytes).json.is_some());
    // A remote $ref is never fetched: the schema reward is 0 with a reason.
    let remote = json!({"$ref": "http://example.com/s.json"});
    let cache = ValidatorCache::new();
    let ctx = Context { schema: &remote, reference: None, sample_id: None, validators: &cache };
    let scored = RewardSet::default().score("<think>t</think><answer>{}</answer>", &ctx);
    let schema_part = scored.parts.iter().find(|p| p.name == "schema").unwrap();
    assert_eq!(schema_part.score.value, 0.0);
    assert!(schema_part.score.reason.contains("does not compile"), "{}", schema_part.score.reason);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_string_gets_a_bounded_reward(s in "(<think>|</think>|<answer>|</answer>|```json|```|\\{|\\}|\\[|\\]|\"a\"|:|,|1|x| |\n){0,60}", junk in ".{0,40}") {
        let text = format!("{s}{junk}");
        let p = parse(&text);
        prop_assert!(p.noise_share() >= 0.0 && p.noise_share() <= 1.0);
        let schema = json!({"type": "object"});
        let total = score_all(&text, &schema);
        // weights: format .5, json .5, schema 1, match 1, noise .5 (range [-2, 0]), length 1 ([-1, 0])
        prop_assert!((-2.0..=3.0).contains(&total), "{total}");
    }
}
