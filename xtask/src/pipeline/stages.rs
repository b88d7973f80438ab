//! The data and model stages: synthetic rows, the tokenizer, the starting model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use thinkjson_model::burn::module::Module;
use thinkjson_model::{CausalLm, CpuBackend, ModelConfig, StorageDtype, Tokenizer};
use thinkjson_synth::{DocKind, Row, Split, SynthConfig};

use super::config::PipelineFile;

/// Special tokens of the trained tokenizer: ChatML's (stripped from decoded completions).
pub const SPECIAL: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Ordinary added tokens: one id each, kept in decoded text for the rewards to see.
pub const ADDED: &[&str] = &["<think>", "</think>", "<answer>", "</answer>"];

pub fn split_path(out: &Path, split: Split) -> PathBuf {
    out.join("synth").join(format!("{}.jsonl", split.name()))
}

/// Writes `synth/{grpo,sft,eval}.jsonl`; returns the row counts.
pub fn synth(file: &PipelineFile) -> Result<Value> {
    let s = &file.synth;
    let kinds = s
        .kinds
        .iter()
        .map(|k| DocKind::parse(k).with_context(|| format!("synth.kinds: unknown kind `{k}`")))
        .collect::<Result<Vec<_>>>()?;
    let mut counts = serde_json::Map::new();
    for (split, rows) in [(Split::Grpo, s.grpo_rows), (Split::Sft, s.sft_rows), (Split::Eval, s.eval_rows)] {
        let config = SynthConfig {
            rows,
            seed: s.seed,
            kinds: kinds.clone(),
            split: Some(split),
            random_schema_share: s.random_schema_share,
            reasoning: s.reasoning,
            ..SynthConfig::default()
        };
        let rows = thinkjson_synth::generate(config)?;
        let mut text = String::new();
        for row in &rows {
            text.push_str(&serde_json::to_string(row)?);
            text.push('\n');
        }
        let path = split_path(&file.out, split);
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).with_context(|| format!("creating {}", path.display()))?;
        thinkjson_model::write_atomic(&path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        counts.insert(split.name().into(), rows.len().into());
    }
    Ok(Value::Object(counts))
}

/// `model.dir` when it is an HF directory used as is; `None` for a GGUF file or embedded
/// name (imported into the run) and for a preset.
pub fn own_hf_dir(file: &PipelineFile) -> Option<&Path> {
    file.model.pretrained().filter(|d| d.is_dir())
}

/// The GGUF model `model.dir` names, if it names one.
fn gguf_model(file: &PipelineFile) -> Result<Option<thinkjson_model::Pretrained>> {
    match file.model.pretrained() {
        Some(arg) if !arg.is_dir() => Ok(Some(crate::model_ref::open(arg)?)),
        _ => Ok(None),
    }
}

pub fn tokenizer_dir(file: &PipelineFile) -> PathBuf {
    match own_hf_dir(file) {
        Some(dir) => dir.to_path_buf(),
        None => file.out.join("tokenizer"),
    }
}

/// Trains the byte-level BPE on the SFT and GRPO rows (prompts as the template renders them,
/// and target completions) and writes tokenizer.json + tokenizer_config.json (ChatML
/// template). With a model directory, its tokenizer is used as is.
pub fn tokenizer(file: &PipelineFile) -> Result<Value> {
    if own_hf_dir(file).is_some() {
        let tok = Tokenizer::from_path(&tokenizer_dir(file))?;
        return Ok(json!({"trained": false, "vocab_size": tok.vocab_size()}));
    }
    if let Some(gguf) = gguf_model(file)? {
        let dir = crate::model_ref::tokenizer_dir(&gguf, &tokenizer_dir(file))?;
        let tok = Tokenizer::from_path(&dir)?;
        return Ok(json!({"trained": false, "from_gguf": gguf.path(), "vocab_size": tok.vocab_size()}));
    }
    let mut texts = Vec::new();
    for split in [Split::Sft, Split::Grpo] {
        for row in read_rows(&split_path(&file.out, split))? {
            for m in thinkjson_synth::prompt::messages(&row.text, &row.schema) {
                texts.push(m.content);
            }
            texts.push(thinkjson_synth::prompt::completion(&row.reasoning, &row.object));
        }
    }
    let trained = thinkjson_model::train_bpe(&texts, file.tokenizer.vocab_size, SPECIAL, ADDED)?;
    let dir = tokenizer_dir(file);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = trained.to_string(false).map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    thinkjson_model::write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
    let source = &file.tokenizer.template_from;
    let template: Value = serde_json::from_str(&std::fs::read_to_string(source).with_context(|| format!("reading {}", source.display()))?)
        .with_context(|| format!("{} is not JSON", source.display()))?;
    let Some(chat_template) = template.get("chat_template").cloned() else {
        bail!("{} has no chat_template", source.display());
    };
    let config = json!({
        "chat_template": chat_template,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": null,
        "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    thinkjson_model::write_atomic(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let tok = Tokenizer::from_path(&dir)?;
    let tokens: usize = texts.iter().map(|t| tok.encode(t).map(|ids| ids.len()).unwrap_or(0)).sum();
    let chars: usize = texts.iter().map(|t| t.chars().count()).sum();
    Ok(json!({"trained": true, "vocab_size": tok.vocab_size(), "corpus_texts": texts.len(), "chars_per_token": chars as f64 / tokens.max(1) as f64}))
}

pub fn base_dir(file: &PipelineFile) -> PathBuf {
    match own_hf_dir(file) {
        Some(dir) => dir.to_path_buf(),
        None => file.out.join("base"),
    }
}

/// The starting model: the configured directory, or the preset with seeded random weights
/// and the trained tokenizer's vocabulary, saved in HF layout with the tokenizer files.
pub fn model(file: &PipelineFile) -> Result<Value> {
    if let Some(dir) = own_hf_dir(file) {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        return Ok(json!({"dir": dir, "hidden_size": config.hidden_size, "layers": config.num_hidden_layers}));
    }
    if let Some(thinkjson_model::Pretrained::Gguf(gguf)) = gguf_model(file)? {
        let dir = base_dir(file);
        let config = thinkjson_model::gguf::hf::import_gguf(&gguf, &dir, StorageDtype::Float32)?;
        return Ok(json!({"dir": dir, "from_gguf": gguf.path(), "parameters": config.num_parameters()}));
    }
    let tok_dir = tokenizer_dir(file);
    let tok = Tokenizer::from_path(&tok_dir)?;
    let preset = file.model.preset.as_deref().context("[model]: neither `dir` nor `preset` is set")?;
    let config = ModelConfig::preset(preset)?.with_vocab_size(tok.vocab_size());
    let model = CausalLm::<CpuBackend>::random(&config, file.model.init_seed, &Default::default())?;
    let dir = base_dir(file);
    model.save_pretrained(&dir, StorageDtype::Float32)?;
    for f in crate::backend::tokenizer_files(&tok_dir) {
        if let Some(name) = f.file_name() {
            std::fs::copy(&f, dir.join(name)).with_context(|| format!("copying {}", f.display()))?;
        }
    }
    Ok(json!({"dir": dir, "preset": file.model.preset, "vocab_size": config.vocab_size, "parameters": model.num_params()}))
}

pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    crate::cmd_sft::read_rows(path)
}
