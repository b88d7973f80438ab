//! Continuous batching ([`Batcher`]): requests that join a running batch at different steps,
//! each with its own settings, get exactly what `Generator::generate` gives each alone —
//! the same tokens, finish reasons, retries and errors — and a request that leaves frees
//! its row without disturbing the others.

mod common;

use serde_json::{json, Value};
use thinkjson_decode::{Admission, Batcher, Completion, Constraint, FinishReason, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_model::{CausalLm, CpuBackend};

use common::{qwen, tiny};

fn schema() -> Value {
    json!({"type": "object", "properties": {
        "lot": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "count": {"type": "integer", "minimum": 0, "maximum": 99}
    }, "required": ["lot", "count"], "additionalProperties": false})
}

fn config(max_new_tokens: usize, temperature: f32, seed: u64) -> GenerateConfig {
    let sampling = if temperature > 0.0 { SamplingConfig { temperature, seed, ..Default::default() } } else { SamplingConfig::greedy() };
    GenerateConfig { max_new_tokens, sampling, ..Default::default() }
}

/// Steps until every sequence has finished; `joins[k]` enters before step `k`.
fn run(generator: &Generator, model: &CausalLm<CpuBackend>, mut joins: Vec<Vec<Admission>>, leave: Option<(usize, u64)>) -> Vec<(u64, Completion)> {
    let mut batch = Batcher::new(model);
    let mut done = Vec::new();
    let mut texts: Vec<(u64, String)> = Vec::new();
    let mut step = 0;
    loop {
        if step < joins.len() {
            let refused = batch.join(generator, model, std::mem::take(&mut joins[step])).expect("join");
            assert!(refused.is_empty(), "{refused:?}");
        }
        if let Some((at, id)) = leave {
            if at == step {
                assert!(batch.leave(id).expect("leave"));
            }
        }
        // Text so far only grows (streaming sends the difference).
        for id in batch.ids() {
            let now = batch.text(generator, id).expect("text").expect("live");
            if let Some((_, before)) = texts.iter().find(|(i, _)| *i == id).filter(|_| batch.streams(id)) {
                assert!(now.starts_with(before.as_str()), "{id}: {before:?} → {now:?}");
            }
            texts.retain(|(i, _)| *i != id);
            texts.push((id, now));
        }
        batch.step(generator, model).expect("step");
        done.extend(batch.take_finished(generator, model).expect("finished"));
        step += 1;
        if batch.is_empty() && step >= joins.len() {
            break;
        }
        assert!(step < 500, "the batch never drained");
    }
    done
}

fn alone(generator: &Generator, model: &CausalLm<CpuBackend>, a: &Admission) -> Completion {
    generator.generate(model, std::slice::from_ref(&a.request), &a.config).expect("alone").0.remove(0)
}

#[test]
fn requests_joining_a_running_batch_get_what_they_get_alone() {
    let tok = qwen();
    let model = tiny(4);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let enc = |s: &str| tok.encode(s).expect("encode");
    let admission = |id: u64, prompt: &str, constraint: Constraint, config: GenerateConfig| Admission { id, request: Request::new(enc(prompt), constraint), config };
    let stop = GenerateConfig { stop: vec!["e".into()], ..config(30, 0.9, 11) };
    let joins = vec![
        vec![admission(1, "Batch AB-123 was released.", Constraint::None, config(24, 0.0, 0))],
        vec![],
        vec![],
        vec![
            admission(2, "Lot XY-999: rejected, 12 units.", Constraint::json_schema(schema()), config(40, 0.0, 0)),
            admission(3, "Count the units of lot QQ-100.", Constraint::think_then_json(schema(), 8), config(60, 0.8, 3)),
            // Same prompt as 3, other settings: one prefill, two sequences.
            admission(4, "Count the units of lot QQ-100.", Constraint::None, config(12, 1.0, 9)),
        ],
        vec![],
        vec![admission(5, "Anything", Constraint::None, stop)],
        vec![admission(6, "Zero budget", Constraint::None, config(0, 0.0, 0))],
    ];
    let all: Vec<Admission> = joins.iter().flatten().cloned().collect();
    let mut done = run(&generator, &model, joins, None);
    done.sort_by_key(|(id, _)| *id);
    assert_eq!(done.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    for ((id, c), a) in done.iter().zip(&all) {
        let own = alone(&generator, &model, a);
        assert_eq!(c.tokens, own.tokens, "request {id}");
        assert_eq!((c.finish, &c.text, c.closed), (own.finish, &own.text, own.closed), "request {id}");
        for (x, y) in c.logprobs.iter().zip(&own.logprobs) {
            assert!((x - y).abs() < 1e-3 || (x.is_nan() && y.is_nan()), "request {id}: log-prob {x} vs {y}");
        }
    }
    let json_out: Value = serde_json::from_str(&done[1].1.text).expect("request 2 is JSON");
    assert!(jsonschema::validator_for(&schema()).expect("validator").is_valid(&json_out));
    assert_eq!(done[5].1.finish, FinishReason::Length);
    assert!(done[5].1.tokens.is_empty());
}

#[test]
fn validation_retries_and_give_ups_match_generate() {
    let tok = qwen();
    let model = tiny(9);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    // `not` is checked only after generation: some tries fail and are generated again.
    let retried = json!({"type": "integer", "minimum": 0, "maximum": 2, "not": {"const": 1}});
    let never = json!({"type": "integer", "minimum": 0, "maximum": 1, "not": {"enum": [0, 1]}});
    let mut joins = Vec::new();
    for (i, s) in [retried.clone(), retried, never].into_iter().enumerate() {
        let config = GenerateConfig { max_retries: 4, ..config(16, 1.0, 20 + i as u64) };
        joins.push(vec![Admission { id: i as u64, request: Request::new(tok.encode("value").expect("encode"), Constraint::json_schema(s)), config }]);
    }
    let all: Vec<Admission> = joins.iter().flatten().cloned().collect();
    let mut batch = Batcher::new(&model);
    batch.join(&generator, &model, all.clone()).expect("join");
    assert!(!batch.streams(0), "an output validated after generation is not streamed while it runs");
    let mut done = run(&generator, &model, joins, None);
    done.sort_by_key(|(id, _)| *id);
    for ((id, c), a) in done.iter().zip(&all) {
        let own = alone(&generator, &model, a);
        assert_eq!((&c.tokens, c.finish, c.retries, &c.error), (&own.tokens, own.finish, own.retries, &own.error), "request {id}");
    }
    assert_eq!(done[2].1.finish, FinishReason::ConstraintError);
    assert_eq!(done[2].1.retries, 4);
    assert!(done.iter().map(|(_, c)| c.retries).sum::<usize>() > 4, "no retry outside the impossible schema");
}

#[test]
fn a_request_that_leaves_frees_its_row_and_the_rest_go_on() {
    let tok = qwen();
    let model = tiny(5);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let joins: Vec<Vec<Admission>> = (0..3)
        .map(|i| vec![Admission { id: i, request: Request::new(tok.encode(&format!("row {i} says")).expect("encode"), Constraint::None), config: config(20, 0.0, 0) }])
        .collect();
    let all: Vec<Admission> = joins.iter().flatten().cloned().collect();
    let done = run(&generator, &model, joins, Some((4, 1)));
    let mut ids: Vec<u64> = done.iter().map(|(id, _)| *id).collect();
    ids.sort();
    assert_eq!(ids, vec![0, 2]);
    for (id, c) in &done {
        assert_eq!(c.tokens, alone(&generator, &model, &all[*id as usize]).tokens, "request {id}");
    }
}

#[test]
fn a_schema_that_cannot_be_used_is_refused_alone() {
    let tok = qwen();
    let model = tiny(4);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let bad = json!({"type": "object", "properties": {"a": {"$ref": "https://example.com/x.json"}}});
    let good = Admission { id: 1, request: Request::new(tok.encode("ok").expect("encode"), Constraint::None), config: config(4, 0.0, 0) };
    let refused_one = Admission { id: 2, request: Request::new(tok.encode("no").expect("encode"), Constraint::json_schema(bad)), config: config(4, 0.0, 0) };
    let mut batch = Batcher::new(&model);
    let refused = batch.join(&generator, &model, vec![good, refused_one]).expect("join");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0, 2);
    assert!(refused[0].1.to_string().contains("$ref"), "{}", refused[0].1);
    assert_eq!(batch.ids(), vec![1]);
}

/// With a budget of cached positions, admission by [`Batcher::fits`] keeps the cache
/// (sequences × padded width) within it at every step — a long prompt lowers how many
/// sequences run, and the pads a finished long sequence leaves are dropped when a join or a
/// step needs the room — and no output changes.
#[test]
fn a_position_budget_bounds_the_cache_and_changes_no_output() {
    let tok = qwen();
    let model = tiny(6);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let long = "Batch record of lot AB-123: ".repeat(12);
    // A long prompt that stops early, then short ones that run on beside its pads.
    let prompts: Vec<(String, usize)> = vec![(long.clone(), 3), ("Lot XY-1 count".into(), 20), ("Lot XY-2".into(), 18), ("Row 4".into(), 20), (long, 10), ("Row 6, short".into(), 16), ("Row 7".into(), 12)];
    let queue: Vec<Admission> = prompts
        .iter()
        .enumerate()
        .map(|(i, (p, max_new))| Admission { id: i as u64, request: Request::new(tok.encode(p).expect("encode"), Constraint::None), config: config(*max_new, 0.0, 0) })
        .collect();
    let longest = queue.iter().map(|a| a.request.prompt.len() + a.config.max_new_tokens).max().expect("requests");
    let budget = 3 * longest;
    let mut batch = Batcher::new(&model).with_position_budget(budget);
    let mut waiting: std::collections::VecDeque<Admission> = queue.iter().cloned().collect();
    let (mut done, mut refused_beside_others, mut most_at_once) = (Vec::new(), false, 0);
    for _ in 0..200 {
        while let Some(a) = waiting.front() {
            if !batch.is_empty() && !batch.fits(1, a.request.prompt.len() + a.config.max_new_tokens) {
                refused_beside_others = true;
                break;
            }
            let a = waiting.pop_front().expect("front");
            assert!(batch.join(&generator, &model, vec![a]).expect("join").is_empty());
            assert!(batch.cached_positions() <= budget, "after a join: {} > {budget}", batch.cached_positions());
        }
        most_at_once = most_at_once.max(batch.len());
        batch.step(&generator, &model).expect("step");
        assert!(batch.cached_positions() <= budget, "after a step: {} > {budget}", batch.cached_positions());
        done.extend(batch.take_finished(&generator, &model).expect("finished"));
        if batch.is_empty() && waiting.is_empty() {
            break;
        }
    }
    assert!(waiting.is_empty() && batch.is_empty(), "the queue never drained");
    assert!(refused_beside_others, "the budget never held a request back");
    assert!(most_at_once >= 3, "the budget let at most {most_at_once} sequences run at once");
    assert!(batch.peak_cached_positions() <= budget);
    done.sort_by_key(|(id, _)| *id);
    assert_eq!(done.len(), queue.len());
    for ((id, c), a) in done.iter().zip(&queue) {
        let own = alone(&generator, &model, a);
        assert_eq!((&c.tokens, c.finish), (&own.tokens, own.finish), "request {id}");
    }
}

/// The pads a finished long prompt leaves beside a short sequence (fewer than a leave
/// compacts) are dropped when a step or a join would otherwise take the cache over its
/// budget, and the outputs stay each request's own.
#[test]
fn pads_are_dropped_when_the_budget_needs_the_room() {
    let tok = qwen();
    let model = tiny(7);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let long = Admission { id: 0, request: Request::new(tok.encode(&"Batch record AB-123. ".repeat(3)).expect("encode"), Constraint::None), config: config(1, 0.0, 0) };
    let short = |id: u64| Admission { id, request: Request::new(tok.encode(&format!("Row {id} of lot AB-123")).expect("encode"), Constraint::None), config: config(12, 0.0, 0) };
    // A batch where the long prompt has left and its pads are still there.
    let beside_pads = || {
        let mut batch = Batcher::new(&model);
        assert!(batch.join(&generator, &model, vec![long.clone(), short(1)]).expect("join").is_empty());
        let mut done = Vec::new();
        while batch.ids().contains(&0) {
            batch.step(&generator, &model).expect("step");
            done.extend(batch.take_finished(&generator, &model).expect("finished"));
        }
        assert_eq!(batch.ids(), vec![1]);
        assert!(batch.cache_len() >= long.request.prompt.len(), "the leave already dropped the pads; the test needs them");
        (batch, done)
    };
    let finish = |mut batch: Batcher<CpuBackend>, budget: usize, mut done: Vec<(u64, Completion)>| {
        while !batch.is_empty() {
            batch.step(&generator, &model).expect("step");
            assert!(batch.cached_positions() <= budget, "after a step: {} > {budget}", batch.cached_positions());
            done.extend(batch.take_finished(&generator, &model).expect("finished"));
        }
        done
    };
    // A step: the next position would pass a budget of the padded width.
    let (batch, done) = beside_pads();
    let budget = batch.cache_len();
    let done = finish(batch.with_position_budget(budget), budget, done);
    assert_eq!(done.len(), 2);
    // A join: two rows as wide as the pads would pass the budget; without them they fit.
    let (batch, done) = beside_pads();
    let budget = 2 * batch.cache_len() - 1;
    let mut batch = batch.with_position_budget(budget);
    assert!(batch.join(&generator, &model, vec![short(2)]).expect("join").is_empty());
    assert!(batch.cached_positions() <= budget, "after the join: {} > {budget}", batch.cached_positions());
    let mut done = finish(batch, budget, done);
    done.sort_by_key(|(id, _)| *id);
    assert_eq!(done.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![0, 1, 2]);
    for (id, c) in &done {
        let a = if *id == 0 { long.clone() } else { short(*id) };
        assert_eq!(c.tokens, alone(&generator, &model, &a).tokens, "request {id}");
    }
}
