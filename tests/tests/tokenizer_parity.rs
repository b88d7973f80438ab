//! The real Qwen tokenizer and chat template against Python `tokenizers` and transformers'
//! `apply_chat_template` (fixtures/tokenizer/qwen.json).

mod common;

use common::*;
use thinkjson_model::{ChatMessage, ChatTemplate, Tokenizer};

#[test]
fn qwen_ids_match_python_tokenizers() {
    let tok = Tokenizer::from_path(&assets().join("qwen")).unwrap();
    let exp = read_json(&fixtures().join("tokenizer/qwen.json"));
    let cases = exp["encodings"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "text {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text, "decode {text:?}");
    }
}

#[test]
fn qwen_special_ids() {
    let tok = Tokenizer::from_path(&assets().join("qwen")).unwrap();
    let s = tok.special();
    assert_eq!(s.eos_ids, vec![151645, 151643]); // <|im_end|>, <|endoftext|>
    assert_eq!(s.pad_id, Some(151643));
    assert_eq!(tok.marker_ids("<think>").unwrap(), vec![151667]);
    assert_eq!(tok.marker_ids("</think>").unwrap(), vec![151668]);
    // `<answer>` is plain text for Qwen: several ids.
    assert!(tok.marker_ids("<answer>").unwrap().len() > 1);
}

#[test]
fn think_tags_work_as_plain_text_when_not_special() {
    // A tokenizer without <think> as an added token spells it with ordinary pieces.
    let small = fixtures().join("tokenizer/no-think-tokenizer.json");
    let tok = Tokenizer::from_path(&small).unwrap();
    assert_eq!(tok.token_id("<think>"), None);
    let ids = tok.marker_ids("<think>").unwrap();
    assert!(ids.len() > 1);
    assert_eq!(tok.decode(&ids, false).unwrap(), "<think>");
}

#[test]
fn qwen_chat_template_matches_transformers() {
    let template = ChatTemplate::from_tokenizer_config(&assets().join("qwen")).unwrap();
    let exp = read_json(&fixtures().join("tokenizer/qwen.json"));
    for case in exp["chats"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let extra = case.get("enable_thinking").map(|v| serde_json::json!({"enable_thinking": v}));
        let got = template.render_with(&messages, gen, extra.as_ref()).unwrap();
        assert_eq!(got, case["rendered"].as_str().unwrap(), "conversation {messages:?}");
    }
}
