//! GGUF import against the Python references (scripts/make_gguf_fixtures.py):
//! dequantization bit for bit against `gguf.quants.dequantize`, the real SmolLM2-135M-Instruct
//! and a tiny qwen2 file against transformers' GGUF loader, the tokenizer against Python
//! `tokenizers`, the chat template against `apply_chat_template`, and bad files by name.

mod common;
mod gguf_writer;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use gguf_writer::Writer;
use serde_json::Value;
use thinkjson_model::gguf::hf::import_gguf;
use thinkjson_model::gguf::tokenizer::GgufTokenizer;
use thinkjson_model::gguf::{GgufFile, MetaValue};
use thinkjson_model::{CausalLm, ChatMessage, ChatTemplate, CpuBackend, ModelConfig, Padding, Pretrained, StorageDtype, TokenBatch, Tokenizer};

type B = CpuBackend;

fn smollm2_path() -> PathBuf {
    assets().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn smollm2() -> &'static CausalLm<B> {
    static MODEL: OnceLock<CausalLm<B>> = OnceLock::new();
    MODEL.get_or_init(|| CausalLm::<B>::from_gguf(&smollm2_path(), &Default::default()).expect("load SmolLM2 GGUF"))
}

fn smollm2_fixture() -> &'static Value {
    static FIX: OnceLock<Value> = OnceLock::new();
    FIX.get_or_init(|| read_json(&fixtures().join("gguf/smollm2.json")))
}

fn logits(model: &CausalLm<B>, ids: &[u32]) -> (Vec<f32>, usize) {
    let batch = TokenBatch::new(&[ids.to_vec()], Padding::Right, 0).unwrap();
    let out = model.forward(&batch).unwrap();
    let vocab = out.dims()[2];
    (to_vec(out), vocab)
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
}

#[test]
fn dequantization_is_bit_identical_to_gguf_py() {
    let g = GgufFile::open(&fixtures().join("gguf/quants.gguf")).unwrap();
    let expected_bytes = std::fs::read(fixtures().join("gguf/quants_expected.safetensors")).unwrap();
    let expected = thinkjson_model_safetensors(&expected_bytes);
    let names: Vec<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
    for want in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"] {
        assert!(names.contains(&want), "fixture lacks {want}");
    }
    for t in &g.tensors {
        assert_eq!(t.ty.name(), t.name, "tensor named for its type");
        let ours = g.tensor_f32(t).unwrap();
        let theirs = expected.iter().find(|(n, _)| n == &t.name).map(|(_, v)| v).expect("expected values");
        assert_eq!(ours.len(), theirs.len(), "{}", t.name);
        let differing = ours.iter().zip(theirs.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differing, 0, "{}: {differing} of {} values differ in their bits", t.name, ours.len());
    }
}

/// f32 tensors of a safetensors file (the test reads the reference without our loader).
fn thinkjson_model_safetensors(bytes: &[u8]) -> Vec<(String, Vec<f32>)> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            assert_eq!(v["dtype"], "F32");
            let [a, b]: [usize; 2] = serde_json::from_value(v["data_offsets"].clone()).unwrap();
            let values = data[a..b].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (k.clone(), values)
        })
        .collect()
}

#[test]
fn smollm2_config_from_metadata() {
    let g = GgufFile::open(&smollm2_path()).unwrap();
    let c = ModelConfig::from_gguf(&g).unwrap();
    let preset = ModelConfig::preset("smollm2-135m").unwrap();
    assert_eq!(c, ModelConfig { dtype: StorageDtype::Float32, ..preset });
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(g.tensors.len(), 272);
}

#[test]
fn smollm2_logits_match_transformers_gguf_loader() {
    let fix = smollm2_fixture();
    let columns: Vec<usize> = serde_json::from_value(fix["columns"].clone()).unwrap();
    let model = smollm2();
    let mut worst = 0.0f32;
    for p in fix["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
        let (out, vocab) = logits(model, &ids);
        let want_argmax: Vec<usize> = serde_json::from_value(p["argmax"].clone()).unwrap();
        let want_max: Vec<f32> = serde_json::from_value(p["max"].clone()).unwrap();
        let want_cols = floats2(&p["columns"]);
        for (t, row) in out.chunks(vocab).enumerate() {
            assert_eq!(argmax(row), want_argmax[t], "argmax at position {t} of {:?}", p["text"]);
            worst = worst.max((row[want_argmax[t]] - want_max[t]).abs());
            let ours: Vec<f32> = columns.iter().map(|&c| row[c]).collect();
            worst = worst.max(max_abs_diff(&ours, &want_cols[t]));
        }
    }
    assert!(worst < 1e-3, "max |Δlogit| {worst}");
}

#[test]
fn imported_directory_reloads_with_the_same_logits_tokenizer_and_template() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2");
    let g = GgufFile::open(&smollm2_path()).unwrap();
    import_gguf(&g, &dir, StorageDtype::Float32).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let reloaded = CausalLm::<B>::from_pretrained(&dir, &Default::default()).unwrap();
    let fix = smollm2_fixture();
    let ids: Vec<u32> = serde_json::from_value(fix["prompts"][0]["ids"].clone()).unwrap();
    let (a, _) = logits(smollm2(), &ids);
    let (b, _) = logits(&reloaded, &ids);
    assert_eq!(max_abs_diff(&a, &b), 0.0, "f32 import is exact");
    let tok = Tokenizer::from_path(&dir).unwrap();
    check_strings(&tok);
    check_chats(&ChatTemplate::from_tokenizer_config(&dir).unwrap());
    // `<|im_end|>` first; the directory loader also stops on the `<|endoftext|>` control token.
    assert_eq!(tok.special().eos_ids.first(), Some(&2));
    // transformers reads the written tokenizer with our pre-tokenizer only as a fast tokenizer.
    let cfg = read_json(&dir.join("tokenizer_config.json"));
    assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
    // The fixture records transformers' own check of the same directory (made by the script).
    let reload = &fix["import_reload"];
    assert!(reload["max_abs_logit_diff"].as_f64().unwrap() < 1e-4, "{reload}");
    assert_eq!(reload["token_ids_equal"], true);
    assert_eq!(reload["chat_equal"], true);

    // bf16 storage: half the bytes, logits close.
    let dir16 = tmp.path().join("smollm2-bf16");
    import_gguf(&g, &dir16, StorageDtype::Bfloat16).unwrap();
    let size = |d: &Path| std::fs::metadata(d.join("model.safetensors")).unwrap().len();
    assert!((size(&dir16) as f64) < 0.51 * size(&dir) as f64);
    assert_eq!(ModelConfig::from_file(&dir16).unwrap().dtype, StorageDtype::Bfloat16);
}

fn check_strings(tok: &Tokenizer) {
    let fix = smollm2_fixture();
    let mut disagreements = 0;
    for s in fix["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(s["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "ids of {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text, "decode of {text:?}");
        if s["transformers_gguf_agrees"] == false {
            disagreements += 1;
        }
    }
    // The strings separate the pre-tokenizers: transformers' plain byte-level differs on some.
    assert!(disagreements > 0, "no string separates smollm's digit split from plain byte-level");
}

fn check_chats(template: &ChatTemplate) {
    for c in smollm2_fixture()["chats"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(template.render(&messages, gen).unwrap(), c["text"].as_str().unwrap(), "{messages:?} gen={gen}");
    }
}

#[test]
fn smollm2_tokenizer_and_template_from_gguf_match_the_references() {
    let model = Pretrained::open(&smollm2_path()).unwrap();
    let tok = model.tokenizer().unwrap();
    check_strings(&tok);
    check_chats(&model.chat_template().unwrap());
    let s = tok.special();
    assert_eq!((s.bos_id, s.pad_id, s.eos_ids.clone()), (Some(1), Some(2), vec![2]));
    assert_eq!(tok.vocab_size(), 49_152);
}

#[test]
fn qwen2_gguf_matches_transformers_without_row_permutation() {
    let path = fixtures().join("gguf/qwen2-tiny.gguf");
    let model = CausalLm::<B>::from_gguf(&path, &Default::default()).unwrap();
    assert!(model.config().attention_bias && model.config().tie_word_embeddings);
    let fix = read_json(&fixtures().join("gguf/qwen2-tiny.json"));
    for case in fix["sequences"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let want: Vec<f32> = floats2(&case["logits"]).concat();
        let (got, _) = logits(&model, &ids);
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "max |Δlogit| {d} for {ids:?}");
    }
}

/// The qwen2 pre-tokenizer, checked against the committed Qwen tokenizer.json: its vocab,
/// merges and added tokens written as GGUF metadata must encode as the original does.
#[test]
fn qwen2_pre_tokenizer_reproduces_the_qwen_tokenizer() {
    let original = read_json(&assets().join("qwen/tokenizer.json"));
    let vocab = original["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    let mut types = vec![1i32; vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    for added in original["added_tokens"].as_array().unwrap() {
        let id = added["id"].as_u64().unwrap() as usize;
        if id >= tokens.len() {
            tokens.resize(id + 1, String::new());
            types.resize(id + 1, 1);
        }
        tokens[id] = added["content"].as_str().unwrap().to_string();
        types[id] = if added["special"] == true { 3 } else { 4 };
    }
    let merges: Vec<MetaValue> = original["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| MetaValue::String(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap())))
        .collect();
    let mut w = Writer::default();
    w.set("general.architecture", MetaValue::String("qwen2".into()));
    w.set("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    w.set("tokenizer.ggml.pre", MetaValue::String("qwen2".into()));
    w.set("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()));
    w.set("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()));
    w.set("tokenizer.ggml.merges", MetaValue::Array(merges));
    w.set("tokenizer.ggml.eos_token_id", MetaValue::U32(151_645));
    w.set("tokenizer.ggml.padding_token_id", MetaValue::U32(151_643));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qwen-tokenizer.gguf");
    w.write(&path);
    let g = GgufFile::open(&path).unwrap();
    let ours = GgufTokenizer::from_gguf(&g).unwrap().tokenizer(&g).unwrap();
    let reference = Tokenizer::from_path(&assets().join("qwen")).unwrap();
    let fix = read_json(&fixtures().join("tokenizer/qwen.json"));
    let mut texts: Vec<String> = fix["encodings"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    texts.extend(smollm2_fixture()["strings"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap().to_string()));
    for text in &texts {
        assert_eq!(ours.encode(text).unwrap(), reference.encode(text).unwrap(), "{text:?}");
    }
}

/// Writes an edited copy of the qwen2 fixture and returns the error of loading it.
fn load_error(edit: impl FnOnce(&mut Writer)) -> String {
    let g = GgufFile::open(&fixtures().join("gguf/qwen2-tiny.gguf")).unwrap();
    let mut w = Writer::copy_of(&g);
    edit(&mut w);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("edited.gguf");
    w.write(&path);
    match CausalLm::<B>::from_gguf(&path, &Default::default()) {
        Ok(_) => panic!("the edited file loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_files_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    // Wrong magic.
    let not_gguf = tmp.path().join("model.gguf");
    std::fs::write(&not_gguf, b"GGML\x03\x00\x00\x00rest of a file").unwrap();
    let e = GgufFile::open(&not_gguf).unwrap_err().to_string();
    assert!(e.contains("not a GGUF file") && e.contains("magic"), "{e}");
    let e = Pretrained::open(&not_gguf).unwrap_err().to_string();
    assert!(e.contains("GGUF"), "{e}");

    // Truncated: inside the header, and inside the tensor data (names the tensor).
    let full = std::fs::read(fixtures().join("gguf/qwen2-tiny.gguf")).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &full[..200]).unwrap();
    let e = GgufFile::open(&cut).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(&cut, &full[..full.len() - 100]).unwrap();
    let e = GgufFile::open(&cut).unwrap_err().to_string();
    assert!(e.contains("truncated") && e.contains("tensor `"), "{e}");

    // Unknown quantization type, named.
    let e = load_error(|w| w.tensor_mut("blk.0.attn_q.weight").type_id = 16);
    assert!(e.contains("IQ2_XXS") && e.contains("blk.0.attn_q.weight"), "{e}");
    let e = load_error(|w| w.tensor_mut("blk.0.attn_q.weight").type_id = 77);
    assert!(e.contains("type 77") && e.contains("blk.0.attn_q.weight"), "{e}");

    // Unsupported architecture, named.
    let e = load_error(|w| w.set("general.architecture", MetaValue::String("gemma".into())));
    assert!(e.contains("`gemma`") && e.contains("not supported"), "{e}");

    // A missing tensor, named.
    let e = load_error(|w| w.tensors.retain(|t| t.name != "blk.1.ffn_down.weight"));
    assert!(e.contains("blk.1.ffn_down.weight") && e.contains("missing"), "{e}");

    // A mis-shaped tensor, named with both shapes.
    let e = load_error(|w| {
        let t = w.tensor_mut("blk.0.attn_norm.weight");
        t.dims = vec![32];
        t.data.truncate(32 * 4);
    });
    assert!(e.contains("blk.0.attn_norm.weight") && e.contains("[32]") && e.contains("[64]"), "{e}");

    // Missing required metadata, named.
    let e = load_error(|w| w.metadata.retain(|(k, _)| k != "qwen2.block_count"));
    assert!(e.contains("qwen2.block_count"), "{e}");

    // An unsupported tokenizer pre-tokenizer, named (the model itself still loads).
    let g = GgufFile::open(&fixtures().join("gguf/qwen2-tiny.gguf")).unwrap();
    let mut w = Writer::copy_of(&g);
    w.set("tokenizer.ggml.pre", MetaValue::String("deepseek-coder".into()));
    let path = tmp.path().join("pre.gguf");
    w.write(&path);
    let g = GgufFile::open(&path).unwrap();
    let e = GgufTokenizer::from_gguf(&g).unwrap_err().to_string();
    assert!(e.contains("deepseek-coder"), "{e}");
}

#[test]
fn writer_round_trips_metadata_types() {
    let g = GgufFile::open(&fixtures().join("gguf/qwen2-tiny.gguf")).unwrap();
    let mut w = Writer::copy_of(&g);
    let values = [
        MetaValue::U8(7),
        MetaValue::I8(-7),
        MetaValue::U16(700),
        MetaValue::I16(-700),
        MetaValue::I32(-70_000),
        MetaValue::U64(1 << 40),
        MetaValue::I64(-(1 << 40)),
        MetaValue::F64(0.1),
        MetaValue::Bool(true),
        MetaValue::Array(vec![MetaValue::F32(1.5), MetaValue::F32(-2.0)]),
    ];
    for (i, v) in values.iter().enumerate() {
        w.set(&format!("test.value{i}"), v.clone());
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rt.gguf");
    w.write(&path);
    let back = GgufFile::open(&path).unwrap();
    for (i, v) in values.iter().enumerate() {
        assert_eq!(back.get(&format!("test.value{i}")), Some(v));
    }
    assert_eq!(back.tensors, g.tensors);
}
