//! Schemas in the shapes people write (fixtures/schemas-in-the-wild/): each is accepted, and
//! every output the generator returns as finished is valid under the full schema, checked
//! here with `jsonschema` — keywords the grammar cannot express are validated and retried,
//! and what still fails ends as a constraint error, never as an invalid output.

mod common;

use serde_json::Value;
use thinkjson_decode::{Constraint, FinishReason, GenerateConfig, Generator, Request, SamplingConfig};
use thinkjson_model::{CausalLm, CpuBackend, ModelConfig, Tokenizer};

#[test]
fn every_returned_output_is_valid_under_the_full_schema() {
    let dir = common::fixtures().join("schemas-in-the-wild");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 11);
    let tok = Tokenizer::from_path(&common::assets().join("qwen")).expect("tokenizer");
    let model = CausalLm::<CpuBackend>::random(&ModelConfig::preset("tiny").expect("preset"), 2, &Default::default()).expect("model");
    let generator = Generator::for_model(&tok, &model).expect("generator");
    let prompt = tok.encode("Fill the schema.").expect("encode");
    let mut schemas = Vec::new();
    let mut requests = Vec::new();
    for path in &files {
        let schema = common::read_json(path);
        let compiled = generator.compile(&Constraint::json_schema(schema.clone()));
        assert!(compiled.is_ok(), "{}: {:?}", path.display(), compiled.err());
        for _ in 0..3 {
            schemas.push((path.clone(), schema.clone()));
            requests.push(Request::new(prompt.clone(), Constraint::json_schema(schema.clone())));
        }
    }
    let config = GenerateConfig { max_new_tokens: 160, max_retries: 6, sampling: SamplingConfig { seed: 21, ..Default::default() }, ..Default::default() };
    let (outs, stats) = generator.generate(&model, &requests, &config).expect("generate");
    let (mut valid, mut errors) = (0, 0);
    for ((path, schema), o) in schemas.iter().zip(&outs) {
        match o.finish {
            FinishReason::ConstraintError => {
                errors += 1;
                eprintln!("{}: {:?}", path.display(), o.error);
                assert!(o.error.as_deref().is_some_and(|e| e.starts_with("constraint_error")), "{}: {:?}", path.display(), o.error);
            }
            FinishReason::ConstraintComplete | FinishReason::Eos => {
                let value: Value = serde_json::from_str(&o.text).unwrap_or_else(|e| panic!("{}: {:?}: {e}", path.display(), o.text));
                let validator = jsonschema::validator_for(schema).expect("validator");
                assert!(validator.is_valid(&value), "{}: returned {value}, invalid under the full schema", path.display());
                valid += 1;
            }
            other => panic!("{}: {other:?} {:?}", path.display(), o.text),
        }
    }
    eprintln!("{valid} valid, {errors} constraint errors, {} retries over {} requests", stats.retries, outs.len());
    assert!(valid * 3 >= outs.len() * 2, "only {valid} of {} valid", outs.len());
    assert!(stats.retries > 0);
}
