//! Generation mechanics: KV cache vs recomputation, batch vs single, seeds, log-probs,
//! stopping, layout options, and rejection of schemas the decoder cannot enforce.

mod common;

use serde_json::{json, Value};
use thinkjson_decode::{
    Completion, Constraint, DecodeError, FinishReason, GenerateConfig, Generator, JsonStyle, Request, SamplingConfig,
};
use thinkjson_model::{CausalLm, CpuBackend, Padding, TokenBatch, Tokenizer};

use common::{qwen, tiny};

fn schema() -> Value {
    json!({"type": "object", "properties": {
        "lot": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "status": {"enum": ["released", "rejected"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99}
    }, "required": ["lot", "status", "count"], "additionalProperties": false})
}

fn requests(tok: &Tokenizer, constraint: &Constraint) -> Vec<Request> {
    ["Batch AB-123 was released.", "Count", "Lot XY-999: rejected, 12 units counted today."]
        .iter()
        .map(|p| Request::new(tok.encode(p).expect("encode"), constraint.clone()))
        .collect()
}

fn greedy(n: usize) -> GenerateConfig {
    GenerateConfig { max_new_tokens: n, sampling: SamplingConfig::greedy(), ..Default::default() }
}

#[test]
fn cached_greedy_equals_recomputed_greedy() {
    let tok = qwen();
    let model = tiny(3);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    for constraint in [Constraint::None, Constraint::json_schema(schema()), Constraint::think_then_json(schema(), 8)] {
        let reqs = requests(&tok, &constraint);
        let cached = generator.generate(&model, &reqs, &greedy(40)).expect("cached").0;
        let full = generator.generate(&model, &reqs, &GenerateConfig { use_cache: false, ..greedy(40) }).expect("full").0;
        for (a, b) in cached.iter().zip(&full) {
            assert_eq!(a.tokens, b.tokens, "{constraint:?}");
            assert_eq!(a.finish, b.finish);
            let diff = common::max_abs_diff(&a.logprobs, &b.logprobs);
            assert!(diff < 1e-4, "log-probs differ by {diff}");
        }
    }
}

#[test]
fn batch_gives_each_sequence_what_it_gets_alone() {
    let tok = qwen();
    let model = tiny(4);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    for constraint in [Constraint::None, Constraint::think_then_json(schema(), 8)] {
        let reqs = requests(&tok, &constraint);
        let together = generator.generate(&model, &reqs, &greedy(32)).expect("batch").0;
        for (r, t) in reqs.iter().zip(&together) {
            let alone = generator.generate(&model, std::slice::from_ref(r), &greedy(32)).expect("alone").0;
            assert_eq!(alone[0].tokens, t.tokens);
        }
    }
}

#[test]
fn same_seed_same_tokens_other_seed_other_tokens() {
    let tok = qwen();
    let model = tiny(5);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let reqs = requests(&tok, &Constraint::None);
    let config = |seed| GenerateConfig {
        max_new_tokens: 16,
        sampling: SamplingConfig { temperature: 0.9, top_k: 50, top_p: 0.95, min_p: 0.01, seed },
        ..Default::default()
    };
    let a = generator.generate(&model, &reqs, &config(1)).expect("a").0;
    let b = generator.generate(&model, &reqs, &config(1)).expect("b").0;
    let c = generator.generate(&model, &reqs, &config(2)).expect("c").0;
    assert_eq!(a, b);
    assert_ne!(a.iter().map(|x| &x.tokens).collect::<Vec<_>>(), c.iter().map(|x| &x.tokens).collect::<Vec<_>>());
}

#[test]
fn logprobs_of_sampled_and_forced_tokens_match_a_full_forward() {
    let tok = qwen();
    let model = tiny(6);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let temperature = 0.7;
    let reqs = requests(&tok, &Constraint::think_then_json(schema(), 8));
    let config = GenerateConfig {
        max_new_tokens: 60,
        sampling: SamplingConfig { temperature, seed: 9, ..Default::default() },
        ..Default::default()
    };
    let (outs, stats) = generator.generate(&model, &reqs, &config).expect("generate");
    assert!(stats.forced_tokens > 0, "the grammar should force some tokens");
    for (i, (r, o)) in reqs.iter().zip(&outs).enumerate() {
        assert_logprobs_of_full_forward(&model, r, o, temperature, i);
    }
}

/// Every log-prob of `o` (sampled and forced tokens) within 1e-4 of a full forward's over
/// prompt + completion.
fn assert_logprobs_of_full_forward(model: &CausalLm<CpuBackend>, r: &Request, o: &Completion, temperature: f32, request: usize) {
    let full: Vec<u32> = r.prompt.iter().chain(&o.tokens).copied().collect();
    let batch = TokenBatch::new(std::slice::from_ref(&full), Padding::Right, 0).expect("batch");
    let logits = common::to_vec(model.forward(&batch).expect("forward"));
    let v = model.config().vocab_size;
    for (k, &t) in o.tokens.iter().enumerate() {
        let pos = r.prompt.len() + k - 1;
        let want = thinkjson_decode::token_logprob(&logits[pos * v..(pos + 1) * v], t as usize, temperature);
        assert!((o.logprobs[k] - want).abs() < 1e-4, "request {request} token {k}: {} vs {want}", o.logprobs[k]);
    }
}

/// A batch wide enough that a forward pass takes at most 2 tokens per sequence
/// ([`thinkjson_model::DECODE_STEP_ROWS`] rows): forced runs longer than that are fed over
/// several passes before the next sample. Each sequence must get what it gets alone (where
/// its runs go in whole), and every log-prob must be the full forward's.
#[test]
fn forced_runs_split_over_passes_keep_tokens_and_logprobs() {
    let tok = qwen();
    let model = tiny(6);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let temperature = 0.7;
    let rows = thinkjson_model::DECODE_STEP_ROWS / 2;
    let reqs: Vec<Request> = (0..rows)
        .map(|i| Request {
            seed: Some(100 + i as u64),
            ..Request::new(tok.encode(&format!("Lot AB-{:03}: released, {} units.", i * 7, i)).expect("encode"), Constraint::think_then_json(schema(), 8))
        })
        .collect();
    let config = GenerateConfig {
        max_new_tokens: 60,
        sampling: SamplingConfig { temperature, seed: 9, ..Default::default() },
        ..Default::default()
    };
    let (outs, stats) = generator.generate(&model, &reqs, &config).expect("generate");
    let mut longest_alone = 0;
    for (i, (r, o)) in reqs.iter().zip(&outs).enumerate() {
        let (own, own_stats) = generator.generate(&model, std::slice::from_ref(r), &config).expect("alone");
        longest_alone = longest_alone.max(own_stats.steps);
        assert_eq!((&o.tokens, o.finish, &o.text), (&own[0].tokens, own[0].finish, &own[0].text), "request {i}");
        assert_logprobs_of_full_forward(&model, r, o, temperature, i);
    }
    // Alone, a sequence takes one pass per sampled token; the batch took more passes than
    // the longest of them, so some forced run was split.
    assert!(stats.forced_tokens > 0, "the grammar should force some tokens");
    assert!(stats.steps > longest_alone, "no forced run was split: {} passes vs {longest_alone} alone", stats.steps);
}

#[test]
fn finish_reasons_length_stop_and_grammar() {
    let tok = qwen();
    let model = tiny(7);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let prompt = tok.encode("Report:").expect("encode");
    let free = generator.generate(&model, &[Request::new(prompt.clone(), Constraint::None)], &greedy(5)).expect("free").0;
    assert_eq!(free[0].finish, FinishReason::Length);
    assert_eq!(free[0].tokens.len(), 5);

    // A stop string taken from what greedy decoding will produce anyway.
    let longer = generator.generate(&model, &[Request::new(prompt.clone(), Constraint::None)], &greedy(12)).expect("free").0;
    let text = &longer[0].text;
    let stop: String = text.chars().skip(text.chars().count() / 2).take(2).collect();
    let cut = text.find(&stop).expect("stop inside text");
    let config = GenerateConfig { stop: vec![stop.clone()], ..greedy(12) };
    let stopped = generator.generate(&model, &[Request::new(prompt.clone(), Constraint::None)], &config).expect("stop").0;
    assert_eq!(stopped[0].finish, FinishReason::Stop);
    assert_eq!(stopped[0].text, text[..cut]);

    let c = Constraint::json_schema(json!({"type": "object", "properties": {"ok": {"const": true}}, "required": ["ok"], "additionalProperties": false}));
    let done = generator.generate(&model, &[Request::new(prompt, c)], &greedy(50)).expect("json").0;
    assert_eq!(done[0].text, r#"{"ok":true}"#);
    assert_eq!(done[0].finish, FinishReason::ConstraintComplete);
}

#[test]
fn json_styles_control_layout() {
    let tok = qwen();
    let model = tiny(8);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let prompt = tok.encode("Give the record.").expect("encode");
    let schema = json!({"type": "object", "properties": {"a": {"const": 1}, "b": {"const": [true, null]}}, "required": ["a", "b"], "additionalProperties": false});
    let run = |style| {
        let c = Constraint::JsonSchema { schema: schema.clone(), style };
        generator.generate(&model, &[Request::new(prompt.clone(), c)], &greedy(40)).expect("generate").0.remove(0).text
    };
    assert_eq!(run(JsonStyle::Compact), r#"{"a":1,"b":[true,null]}"#);
    assert_eq!(run(JsonStyle::Spaced), r#"{"a": 1, "b": [true, null]}"#);
    // Flexible whitespace is bounded: never more than 2 whitespace characters in a row.
    let sampled = {
        let c = Constraint::JsonSchema { schema: schema.clone(), style: JsonStyle::Flexible { max_whitespace: 2 } };
        let config = GenerateConfig { max_new_tokens: 60, sampling: SamplingConfig { seed: 3, ..Default::default() }, ..Default::default() };
        generator.generate(&model, &[Request::new(prompt.clone(), c)], &config).expect("generate").0.remove(0)
    };
    assert_eq!(sampled.finish, FinishReason::ConstraintComplete, "{:?}", sampled.text);
    let v: Value = serde_json::from_str(&sampled.text).expect("valid JSON");
    assert_eq!(v, json!({"a": 1, "b": [true, null]}));
    let mut run_len = 0;
    for ch in sampled.text.chars() {
        run_len = if ch.is_whitespace() { run_len + 1 } else { 0 };
        assert!(run_len <= 2, "{:?}", sampled.text);
    }
}

/// Keywords the grammar cannot express are validated on the finished output and
/// regenerated: each case is one a random model's first try often violates.
#[test]
fn keywords_outside_the_grammar_are_validated_and_retried() {
    let tok = qwen();
    let model = tiny(9);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let small = |lo: i64, hi: i64| json!({"type": "integer", "minimum": lo, "maximum": hi});
    let cases: Vec<(&str, Value)> = vec![
        ("uniqueItems", json!({"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 2, "uniqueItems": true})),
        ("not", json!({"type": "integer", "minimum": 0, "maximum": 2, "not": {"const": 1}})),
        ("if", json!({"type": "object", "properties": {"a": {"type": "boolean"}, "b": small(0, 3)}, "required": ["a", "b"],
            "additionalProperties": false, "if": {"properties": {"a": {"const": true}}}, "then": {"properties": {"b": {"const": 0}}}})),
        ("contains", json!({"type": "array", "items": small(0, 3), "minItems": 1, "maxItems": 2, "contains": {"const": 3}})),
        ("oneOf", json!({"oneOf": [small(0, 5), small(3, 9)]})),
        ("dependentRequired", json!({"type": "object", "properties": {"a": small(0, 1), "b": small(0, 1)}, "required": ["a"],
            "additionalProperties": false, "dependentRequired": {"a": ["b"]}})),
        ("propertyNames", json!({"type": "object", "properties": {"x": small(0, 1), "yy": small(0, 1)},
            "additionalProperties": false, "propertyNames": {"maxLength": 1}})),
        ("minProperties", json!({"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}, "c": {"type": "boolean"}},
            "additionalProperties": false, "minProperties": 2})),
    ];
    let config = GenerateConfig { max_new_tokens: 48, max_retries: 12, sampling: SamplingConfig { seed: 5, ..Default::default() }, ..Default::default() };
    for (keyword, schema) in cases {
        let constraint = Constraint::json_schema(schema.clone());
        let compiled = generator.compile(&constraint).expect(keyword).expect("constraint");
        assert!(compiled.validated_keywords().iter().any(|k| k.keyword == keyword), "{keyword}: {:?}", compiled.validated_keywords());
        let prompt = tok.encode("value").expect("encode");
        let reqs: Vec<Request> = (0..6).map(|_| Request::new(prompt.clone(), constraint.clone())).collect();
        let (outs, stats) = generator.generate(&model, &reqs, &config).expect("generate");
        let validator = jsonschema::validator_for(&schema).expect("validator");
        for o in &outs {
            assert_ne!(o.finish, FinishReason::ConstraintError, "{keyword}: {:?}", o.error);
            let v: Value = serde_json::from_str(&o.text).unwrap_or_else(|e| panic!("{keyword}: {:?}: {e}", o.text));
            assert!(validator.is_valid(&v), "{keyword}: {v} is invalid");
        }
        let retries: usize = outs.iter().map(|o| o.retries).sum();
        assert!(retries > 0 && stats.retries == retries, "{keyword}: retries {retries}, stats {}", stats.retries);
    }

    // Unsatisfiable beyond the grammar: every try fails, and the error names the keyword.
    let never = json!({"type": "integer", "minimum": 0, "maximum": 1, "not": {"enum": [0, 1]}});
    let greedy_retry = GenerateConfig { max_retries: 2, ..greedy(16) };
    let (outs, stats) = generator.generate(&model, &[Request::new(tok.encode("x").expect("encode"), Constraint::json_schema(never))], &greedy_retry).expect("generate");
    assert_eq!(outs[0].finish, FinishReason::ConstraintError);
    assert_eq!((outs[0].retries, stats.retries), (2, 2));
    let error = outs[0].error.clone().unwrap_or_default();
    assert!(error.contains("`not` at `/`") && error.contains("after 3 tries"), "{error}");
}

#[test]
fn schemas_that_cannot_be_used_are_rejected_by_name_and_pointer() {
    let tok = qwen();
    let model = tiny(9);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let remote = json!({"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}});
    match generator.compile(&Constraint::json_schema(remote.clone())) {
        Err(DecodeError::RemoteRef { pointer, .. }) => assert_eq!(pointer, "/properties/x/$ref"),
        other => panic!("remote ref accepted: {other:?}"),
    }
    // An unknown format is an annotation: accepted, and the string generated as a string.
    let format = json!({"type": "string", "format": "credit-card"});
    assert!(generator.compile(&Constraint::json_schema(format)).expect("annotation").is_some());
    let invalid = json!({"type": "object", "properties": {"x": {"type": "strng"}}});
    match generator.compile(&Constraint::json_schema(invalid)) {
        Err(DecodeError::InvalidSchema { .. }) => {}
        other => panic!("invalid schema accepted: {other:?}"),
    }
    let unsatisfiable = json!({"type": "integer", "minimum": 5, "maximum": 1});
    assert!(generator.compile(&Constraint::json_schema(unsatisfiable)).is_err());
    let lenient = json!({"type": "object", "x-guidance": {"lenient": true}});
    assert!(generator.compile(&Constraint::json_schema(lenient)).is_err());

    // In a batch, one bad schema fails the call before anything is generated.
    let prompt = tok.encode("x").expect("encode");
    let reqs = vec![
        Request::new(prompt.clone(), Constraint::None),
        Request::new(prompt, Constraint::think_then_json(remote, 8)),
    ];
    assert!(matches!(generator.generate(&model, &reqs, &greedy(4)), Err(DecodeError::RemoteRef { .. })));
}

/// The training targets (from `synth`) are sentences of the think-then-JSON grammar, with
/// `<think>` as a special token (Qwen) and as plain text (a tokenizer without it).
#[test]
fn training_completions_are_accepted_by_the_think_grammar() {
    let rows = thinkjson_synth::generate(thinkjson_synth::SynthConfig { rows: 6, seed: 4, ..Default::default() }).expect("synth");
    for tok_path in [common::assets().join("qwen"), common::fixtures().join("tokenizer/no-think-tokenizer.json")] {
        let tok = Tokenizer::from_path(&tok_path).expect("tokenizer");
        let generator = Generator::new(&tok, tok.vocab_size(), &[]).expect("generator");
        for row in &rows {
            let completion = thinkjson_synth::prompt::completion(&row.reasoning, &row.object);
            let ids = tok.encode(&completion).expect("encode");
            let compiled = generator.compile(&Constraint::think_then_json(row.schema.clone(), 4096)).expect("compile").expect("constraint");
            let mut m = compiled.matcher();
            for (i, &t) in ids.iter().enumerate() {
                let mask = m.compute_mask().expect("mask");
                assert!(mask.is_allowed(t), "{}: token {i} ({t}) of {completion:?} not allowed", tok_path.display());
                m.consume_token(t).expect("consume");
            }
            assert!(m.is_stopped() || m.is_accepting().unwrap_or(false), "grammar not complete after the target");
        }
    }
}

#[test]
fn compacting_the_kv_cache_keeps_the_logits() {
    let model = tiny(10);
    let mut plain = thinkjson_model::KvCache::new(2, model.config().num_hidden_layers);
    let prompts = TokenBatch::new(&[vec![5, 6], (10..22).collect()], Padding::Left, 0).expect("batch");
    // Row 0 feeds six tokens, row 1 one: five pad columns for row 1.
    let wide = TokenBatch {
        ids: vec![7, 8, 9, 10, 11, 12, 0, 0, 0, 0, 0, 30],
        mask: vec![true, true, true, true, true, true, false, false, false, false, false, true],
        batch: 2,
        seq: 6,
        segments: None,
    };
    let step = TokenBatch::step(&[Some(40), Some(41)], 0).expect("step");
    model.forward_cached(&prompts, &mut plain).expect("prefill");
    model.forward_cached(&wide, &mut plain).expect("wide");
    let mut compacted = plain.clone();
    compacted.compact();
    assert_eq!(compacted.len(), 13);
    assert!(plain.len() > compacted.len());
    let a = common::to_vec(model.forward_cached(&step, &mut plain).expect("plain"));
    let b = common::to_vec(model.forward_cached(&step, &mut compacted).expect("compacted"));
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff < 1e-5, "compaction changed logits by {diff}");
}

/// `"\ud800"` matches JSON's string grammar but is no Unicode text (`serde_json` rejects it):
/// the constraint allows no `\u` escape, while every character can still be written as is.
#[test]
fn constrained_strings_never_hold_a_lone_surrogate_escape() {
    let tok = qwen();
    let generator = Generator::new(&tok, tok.vocab_size(), &[]).expect("generator");
    let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]});
    let compiled = generator.compile(&Constraint::json_schema(schema)).expect("compile").expect("constraint");
    let accepts = |text: &str| {
        let mut m = compiled.matcher();
        let ids = tok.encode(text).expect("encode");
        m.validate_tokens(&ids).expect("validate") == ids.len()
    };
    assert!(accepts("{\"a\":\"é \\\"q\\\"\\n\"}"));
    assert!(serde_json::from_str::<Value>("{\"a\":\"\\ud800\"}").is_err());
    assert!(!accepts("{\"a\":\"\\ud800\"}"));
}

/// Requests that share a prompt (GRPO's G completions) prefill it once; each still samples
/// exactly what it samples alone with its seed, free and constrained.
#[test]
fn shared_prompts_prefill_once_and_sample_what_each_samples_alone() {
    let tok = qwen();
    let model = tiny(8);
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let config = GenerateConfig {
        max_new_tokens: 24,
        sampling: SamplingConfig { temperature: 0.9, top_k: 50, top_p: 0.95, min_p: 0.01, seed: 0 },
        ..Default::default()
    };
    for constraint in [Constraint::None, Constraint::think_then_json(schema(), 8)] {
        let base = requests(&tok, &constraint);
        let mut reqs = Vec::new();
        for (i, seed) in [(0usize, 11u64), (0, 12), (1, 13), (0, 14), (1, 15)] {
            reqs.push(Request { seed: Some(seed), ..base[i].clone() });
        }
        let (together, stats) = generator.generate(&model, &reqs, &config).expect("batch");
        if constraint == Constraint::None {
            assert!(together.iter().any(|c| c.tokens != together[0].tokens), "different seeds, different samples");
        }
        for (r, t) in reqs.iter().zip(&together) {
            let alone = generator.generate(&model, std::slice::from_ref(r), &config).expect("alone").0;
            assert_eq!(alone[0].tokens, t.tokens);
            let d = alone[0].logprobs.iter().zip(&t.logprobs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(d < 1e-4, "log-probs differ by {d}");
        }
        assert!(stats.steps > 0);
    }
}
