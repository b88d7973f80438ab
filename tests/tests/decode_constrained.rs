//! Constrained decoding on the committed schema set with the real Qwen tokenizer and a
//! random-weight tiny model: every finished output validates, in plain-JSON and
//! think-then-JSON modes; the same model unconstrained mostly does not.

mod common;

use std::path::PathBuf;

use serde_json::Value;
use thinkjson_decode::{Completion, Constraint, CLOSING_MARGIN, FinishReason, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_model::{CausalLm, CpuBackend, ModelConfig, Tokenizer};

const BUDGET: usize = 200;

fn schema_set() -> Vec<(String, Value)> {
    let dir = common::fixtures().join("schemas");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures/schemas")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_stem().unwrap_or_default().to_string_lossy().into_owned(), common::read_json(&p)))
        .collect()
}

/// The test's budget: a random-weight model rambles inside free strings, arrays and extra
/// property names, so every free string (and email) gets `maxLength`, every array `maxItems` and every
/// object with `properties` `additionalProperties: false` where the schema leaves these
/// open (bounded schemas are unchanged). Applied to the whole set, none left out.
fn bounded(schema: &Value) -> Value {
    // Inside `allOf` branches a closed object would reject the other branches' keys.
    fn walk(v: &mut Value, in_all_of: bool) {
        match v {
            Value::Object(map) => {
                let is_string = map.get("type") == Some(&Value::from("string"));
                // An email's local part is as open as a free string.
                let email = map.get("format") == Some(&Value::from("email"));
                let fixed = ["maxLength", "pattern", "format", "enum", "const"].iter().any(|k| map.contains_key(*k));
                let free = email || !fixed;
                if is_string && free {
                    map.insert("maxLength".into(), Value::from(16));
                }
                if !in_all_of && map.contains_key("properties") && !map.contains_key("additionalProperties") {
                    map.insert("additionalProperties".into(), Value::Bool(false));
                }
                if map.get("type") == Some(&Value::from("array")) && !map.contains_key("maxItems") {
                    map.insert("maxItems".into(), Value::from(3));
                }
                for (k, child) in map.iter_mut() {
                    walk(child, k == "allOf");
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| walk(i, in_all_of)),
            _ => {}
        }
    }
    let mut s = schema.clone();
    walk(&mut s, false);
    s
}

fn setup() -> (Tokenizer, CausalLm<CpuBackend>, Generator) {
    let tokenizer = Tokenizer::from_path(&common::assets().join("qwen")).expect("qwen tokenizer");
    let config = ModelConfig::preset("tiny").expect("preset");
    let model = CausalLm::<CpuBackend>::random(&config, 5, &Default::default()).expect("model");
    let generator = Generator::for_model(&tokenizer, &model).expect("generator");
    (tokenizer, model, generator)
}

fn prompts(tokenizer: &Tokenizer, schemas: &[(String, Value)]) -> Vec<Vec<u32>> {
    schemas
        .iter()
        .map(|(name, _)| tokenizer.encode(&format!("Extract the {name} record as JSON.")).expect("encode"))
        .collect()
}

/// The JSON text of a completion: all of it, or what sits inside `<answer>…</answer>`.
fn json_part(c: &Completion, think: bool) -> Option<String> {
    if !think {
        return Some(c.text.clone());
    }
    let start = c.text.find("<answer>\n")? + "<answer>\n".len();
    let end = c.text.rfind("\n</answer>")?;
    (end >= start).then(|| c.text[start..end].to_string())
}

struct Tally {
    finished: usize,
    valid: usize,
    length_limited: usize,
    failures: Vec<String>,
}

fn tally(schemas: &[(String, Value)], outs: &[Completion], think: bool) -> Tally {
    let mut t = Tally { finished: 0, valid: 0, length_limited: 0, failures: Vec::new() };
    for ((name, schema), c) in schemas.iter().zip(outs) {
        let validator = jsonschema::validator_for(schema).expect("schema compiles in jsonschema");
        let ok = json_part(c, think)
            .and_then(|j| serde_json::from_str::<Value>(&j).ok())
            .is_some_and(|v| validator.is_valid(&v));
        if c.finish == FinishReason::Length {
            t.length_limited += 1;
        } else {
            t.finished += 1;
            if !ok {
                t.failures.push(format!("{name}: {:?} {:?}", c.finish, c.text));
            }
        }
        if ok {
            t.valid += 1;
        }
    }
    t
}

fn run(generator: &Generator, model: &CausalLm<CpuBackend>, prompts: &[Vec<u32>], constraints: Vec<Constraint>, budget: usize) -> Vec<Completion> {
    let requests: Vec<Request> = prompts.iter().cloned().zip(constraints).map(|(p, c)| Request::new(p, c)).collect();
    // Seeded sampling: greedy decoding of random weights loops on one token forever.
    let sampling = SamplingConfig { temperature: 1.0, seed: 17, ..Default::default() };
    let config = GenerateConfig { max_new_tokens: budget, sampling, ..Default::default() };
    let (outs, stats) = generator.generate(model, &requests, &config).expect("generate");
    let mut m = stats.mask_micros.clone();
    m.sort_by(f64::total_cmp);
    let p = |q: f64| m.get(((m.len() as f64 - 1.0) * q) as usize).copied().unwrap_or(0.0);
    eprintln!(
        "{} seqs: {} steps, {} tokens ({} forced), forward {:.2}s, host {:.2}s, mask p50 {:.0}µs p99 {:.0}µs",
        requests.len(),
        stats.steps,
        stats.generated_tokens,
        stats.forced_tokens,
        stats.forward_secs,
        stats.host_secs,
        p(0.5),
        p(0.99)
    );
    outs
}

#[test]
fn schema_set_is_large_and_varied() {
    let schemas = schema_set();
    assert!(schemas.len() >= 50, "{} schemas", schemas.len());
    let text: String = schemas.iter().map(|(_, s)| s.to_string()).collect();
    for needle in ["\"$ref\"", "\"anyOf\"", "\"enum\"", "\"const\"", "\"date-time\"", "\"email\"", "\"uuid\"", "\"pattern\"", "\"maxLength\"", "\"minimum\"", "\"additionalProperties\":false", "\"$defs\""] {
        assert!(text.contains(needle), "no schema uses {needle}");
    }
}

#[test]
fn constrained_json_always_validates_and_unconstrained_does_not() {
    let (tokenizer, model, generator) = setup();
    let schemas: Vec<(String, Value)> = schema_set().into_iter().map(|(n, s)| (n, bounded(&s))).collect();
    let prompts = prompts(&tokenizer, &schemas);

    let json = run(&generator, &model, &prompts, schemas.iter().map(|(_, s)| Constraint::json_schema(s.clone())).collect(), BUDGET);
    let t = tally(&schemas, &json, false);
    eprintln!("json mode: {} finished, {} valid, {} length-limited of {}", t.finished, t.valid, t.length_limited, schemas.len());
    assert!(t.failures.is_empty(), "finished but invalid:\n{}", t.failures.join("\n"));
    assert!(t.finished * 10 >= schemas.len() * 9, "only {} of {} finished within {BUDGET} tokens", t.finished, schemas.len());

    let think = run(
        &generator,
        &model,
        &prompts,
        schemas.iter().map(|(_, s)| Constraint::think_then_json(s.clone(), 16)).collect(),
        BUDGET,
    );
    let t = tally(&schemas, &think, true);
    eprintln!("think mode: {} finished, {} valid, {} length-limited of {}", t.finished, t.valid, t.length_limited, schemas.len());
    assert!(t.failures.is_empty(), "finished but invalid:\n{}", t.failures.join("\n"));
    assert!(t.finished * 10 >= schemas.len() * 9, "only {} of {} finished within {BUDGET} tokens", t.finished, schemas.len());
    for c in think.iter().filter(|c| c.finish != FinishReason::Length) {
        assert!(c.text.starts_with("<think>"), "{:?}", c.text);
        assert!(c.text.ends_with("\n</answer>"), "{:?}", c.text);
    }

    // Unconstrained, a random model never closes a JSON object; a short budget shows it.
    let free = run(&generator, &model, &prompts, vec![Constraint::None; schemas.len()], 48);
    let t = tally(&schemas, &free, false);
    eprintln!("unconstrained: {} valid of {}", t.valid, schemas.len());
    assert!(t.valid * 10 <= schemas.len(), "unconstrained valid {} of {}", t.valid, schemas.len());
}

/// With the schemas as committed (free strings, open arrays and extra properties) and a
/// budget a random model overruns, closing inside the budget finishes every sequence whose
/// schema fits the budget at all, with valid JSON; without it most are cut at the limit.
#[test]
fn closing_within_budget_finishes_every_schema_that_fits() {
    let (tokenizer, model, generator) = setup();
    let schemas = schema_set();
    let prompts = prompts(&tokenizer, &schemas);
    let budget = 200;
    let constraints: Vec<Constraint> = schemas.iter().map(|(_, s)| Constraint::json_schema(s.clone())).collect();
    let fits: Vec<bool> = constraints
        .iter()
        .map(|c| generator.closing_cost(c, budget).expect("compiles").is_some_and(|n| n + CLOSING_MARGIN <= budget))
        .collect();
    let requests: Vec<Request> = prompts.iter().cloned().zip(constraints).map(|(p, c)| Request::new(p, c)).collect();
    let sampling = SamplingConfig { temperature: 1.0, seed: 17, ..Default::default() };
    let closing = GenerateConfig { max_new_tokens: budget, sampling, ..Default::default() };
    let (outs, _) = generator.generate(&model, &requests, &closing).expect("generate");
    let t = tally(&schemas, &outs, false);
    let closed = outs.iter().filter(|c| c.closed).count();
    let fitting = fits.iter().filter(|f| **f).count();
    eprintln!("closing: {} valid, {} length-limited, {closed} closed by the policy; {fitting} of {} fit {budget} tokens", t.valid, t.length_limited, schemas.len());
    assert!(t.failures.is_empty(), "finished but invalid:\n{}", t.failures.join("\n"));
    let cut: Vec<&String> = outs.iter().zip(&schemas).zip(&fits).filter(|((c, _), fit)| **fit && c.finish == FinishReason::Length).map(|((_, s), _)| &s.0).collect();
    assert!(cut.is_empty(), "cut at the limit although they fit: {cut:?}");
    assert!(fitting * 10 >= schemas.len() * 9, "only {fitting} of {} schemas fit {budget} tokens", schemas.len());
    assert!(closed * 2 >= fitting, "the budget rarely ran short ({closed} closed): the test shows little");
    assert!(outs.iter().all(|c| c.tokens.len() <= budget));

    // A reasoning budget larger than the whole budget: closing ends the reasoning first, so
    // the wrapper adds only its few marker tokens to the JSON's own cost.
    let think: Vec<Request> =
        prompts.iter().zip(&schemas).take(12).map(|(p, (_, s))| Request::new(p.clone(), Constraint::think_then_json(s.clone(), 4 * budget))).collect();
    let mut think_fits = Vec::new();
    for (r, (name, schema)) in think.iter().zip(&schemas) {
        let json = generator.closing_cost(&Constraint::json_schema(schema.clone()), 1000).expect("compiles").expect("closes");
        let wrapped = generator.closing_cost(&r.constraint, 1000).expect("compiles").expect("closes");
        assert!(wrapped <= json + 12, "{name}: {wrapped} tokens to close think-then-JSON, {json} for the JSON alone");
        think_fits.push(wrapped + CLOSING_MARGIN <= budget);
    }
    let (outs, _) = generator.generate(&model, &think, &closing).expect("generate");
    let t = tally(&schemas[..think.len()], &outs, true);
    assert!(t.failures.is_empty(), "think-then-JSON, finished but invalid: {:?}", t.failures);
    for ((c, fit), (name, _)) in outs.iter().zip(&think_fits).zip(&schemas) {
        assert!(!fit || c.finish != FinishReason::Length, "{name}: think-then-JSON cut at the limit although it fits");
    }

    let open = GenerateConfig { close_within_budget: false, ..closing };
    let (outs, _) = generator.generate(&model, &requests, &open).expect("generate");
    let t = tally(&schemas, &outs, false);
    eprintln!("without closing: {} valid, {} length-limited of {}", t.valid, t.length_limited, schemas.len());
    assert!(t.length_limited * 2 >= closed, "{} cut without closing, {closed} closed with it", t.length_limited);
}
