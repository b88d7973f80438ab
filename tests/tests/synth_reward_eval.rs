//! The contract between synth, reward and eval: a dataset's own reference completions get the
//! maximum of every reward and perfect evaluation metrics; a broken completion does not.

use thinkjson_eval::{evaluate, Prediction, Sample};
use thinkjson_reward::{Context, RewardSet, RewardWeights, ValidatorCache};
use thinkjson_synth::{generate, prompt, SynthConfig};

#[test]
fn reference_completions_score_perfectly() {
    let rows = generate(SynthConfig { rows: 400, seed: 21, ..Default::default() }).unwrap();
    let set = RewardSet::from_weights(&RewardWeights::default());
    let cache = ValidatorCache::new();
    for r in &rows {
        let completion = prompt::completion(&r.reasoning, &r.object);
        let ctx = Context { schema: &r.schema, reference: Some(&r.object), sample_id: None, validators: &cache };
        for part in set.score(&completion, &ctx).parts {
            let (_, best) = match part.name.as_str() {
                "noise" => (-2.0, 0.0),
                _ => (0.0, 1.0),
            };
            assert_eq!(part.score.value, best, "{}: {} = {} ({})", r.id, part.name, part.score.value, part.score.reason);
        }
    }
    let samples: Vec<Sample> = rows
        .iter()
        .map(|r| Sample { id: r.id.clone(), kind: r.kind.clone(), style: r.style.clone(), schema: r.schema.clone(), object: r.object.clone() })
        .collect();
    let good: Vec<Prediction> = rows
        .iter()
        .map(|r| Prediction { id: r.id.clone(), completion: prompt::completion(&r.reasoning, &r.object), latency_ms: None, tokens: None, closed: None })
        .collect();
    let run = evaluate("reference", &samples, &good, vec![], &cache);
    let o = &run.overall;
    assert_eq!((o.valid_json, o.schema_valid, o.format_valid, o.mean_match, o.exact), (1.0, 1.0, 1.0, 1.0, 1.0));
    assert_eq!(o.mean_noise, 0.0);
    // The answer without its think block and with chatter around it scores lower.
    let sloppy: Vec<Prediction> = rows
        .iter()
        .map(|r| Prediction { id: r.id.clone(), completion: format!("Sure! {}", r.object), latency_ms: None, tokens: None, closed: None })
        .collect();
    let run = evaluate("sloppy", &samples, &sloppy, vec![], &cache);
    assert_eq!(run.overall.format_valid, 0.0);
    assert!(run.overall.mean_noise > 0.0 && run.overall.mean_match == 1.0);
}
