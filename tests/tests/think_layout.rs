//! Think-then-JSON produces exactly the training layout
//! `<think>…</think>\n\n<answer>\n{json}\n</answer>` with either kind of tokenizer — Qwen's,
//! where `<think>`/`</think>` are tokens, and SmolLM2's, where they are plain text — greedy
//! and sampled, for budgets from 32 to 512 tokens and reasoning budgets larger than the
//! whole budget: the reasoning always ends with `</think>` and leaves room for the JSON.

mod common;

use serde_json::{json, Value};
use thinkjson_decode::{Constraint, FinishReason, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_model::{CausalLm, CpuBackend, ModelConfig, Pretrained, Tokenizer};

fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {"lot": {"type": "string", "maxLength": 8}, "released": {"type": "boolean"}},
            "required": ["lot", "released"], "additionalProperties": false}),
        json!({"type": "object", "properties": {"ph": {"type": "number", "minimum": 0, "maximum": 14},
            "status": {"enum": ["open", "closed"]}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
            "required": ["ph", "status"]}),
    ]
}

fn check(tokenizer: &Tokenizer, label: &str) {
    let vocab = tokenizer.vocab_size().max(49_152);
    let config = ModelConfig::preset("tiny").expect("preset").with_vocab_size(vocab);
    let model = CausalLm::<CpuBackend>::random(&config, 3, &Default::default()).expect("model");
    let generator = Generator::new(tokenizer, vocab, &[]).expect("generator");
    let prompt = tokenizer.encode("Extract the record as JSON.").expect("encode");
    // Before the first token only `<think` is forced as whole tokens; the closing cost must
    // still be measurable there. (It was not, for SmolLM2's plain-text tags: the closing
    // policy then took over every sequence at its first token, and no output was the model's.)
    for s in schemas() {
        let cost = generator.closing_cost(&Constraint::think_then_json(s, 64), 512).expect("closing cost");
        assert!(cost.is_some_and(|c| (5..100).contains(&c)), "{label}: closing cost at the start {cost:?}");
    }
    for max_new_tokens in [32, 64, 128, 512] {
        for sampling in [SamplingConfig::greedy(), SamplingConfig { seed: 11, ..Default::default() }] {
            let requests: Vec<Request> = schemas()
                .into_iter()
                .flat_map(|s| {
                    let r = Request::new(prompt.clone(), Constraint::think_then_json(s, 4 * max_new_tokens));
                    [r.clone(), r]
                })
                .collect();
            let cfg = GenerateConfig { max_new_tokens, sampling, ..Default::default() };
            let (outs, _) = generator.generate(&model, &requests, &cfg).expect("generate");
            for (r, o) in requests.iter().zip(&outs) {
                let what = format!("{label}, {max_new_tokens} tokens, temperature {}: {:?}", sampling.temperature, o.text);
                assert!(matches!(o.finish, FinishReason::ConstraintComplete | FinishReason::Eos), "{what}: {:?} {:?}", o.finish, o.error);
                assert!(o.tokens.len() <= max_new_tokens, "{what}");
                assert!(o.text.starts_with("<think>") && o.text.ends_with("\n</answer>"), "{what}");
                let close = o.text.find("</think>").unwrap_or_else(|| panic!("no </think>: {what}"));
                let rest = &o.text[close..];
                assert!(rest.starts_with("</think>\n\n<answer>\n"), "{what}");
                let json = &rest["</think>\n\n<answer>\n".len()..rest.len() - "\n</answer>".len()];
                let value: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{what}: {e}"));
                let schema = match &r.constraint {
                    Constraint::ThinkThenJson { schema, .. } => schema,
                    _ => unreachable!(),
                };
                assert!(jsonschema::validator_for(schema).expect("validator").is_valid(&value), "{what}");
                let parsed = thinkjson_reward::parse(&o.text);
                assert!(parsed.format_ok(), "{what}: format {parsed:?}");
                assert_eq!(parsed.noise_share(), 0.0, "{what}");
            }
        }
    }
}

#[test]
fn qwen_think_tokens() {
    check(&Tokenizer::from_path(&common::assets().join("qwen")).expect("tokenizer"), "qwen");
}

#[test]
fn smollm2_plain_text_think_tags() {
    let gguf = common::assets().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let tokenizer = Pretrained::open(&gguf).expect("gguf").tokenizer().expect("tokenizer");
    assert_eq!(tokenizer.token_id("</think>"), None);
    check(&tokenizer, "smollm2");
}
