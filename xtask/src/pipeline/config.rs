//! `pipeline.toml`: one file for every stage. Every field has a default (the embedded CPU
//! run); unknown fields are errors.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thinkjson_grpo::{GrpoConfig, RolloutConstraint};
use thinkjson_model::train::{AdamWConfig, Decay};
use thinkjson_sft::SftConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineFile {
    pub out: PathBuf,
    /// cpu, cuda or cuda:N.
    pub device: String,
    pub synth: SynthSection,
    pub tokenizer: TokenizerSection,
    pub model: ModelSection,
    pub sft: SftConfig,
    pub grpo: GrpoConfig,
    pub eval: EvalSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthSection {
    pub seed: u64,
    pub grpo_rows: usize,
    pub sft_rows: usize,
    pub eval_rows: usize,
    /// Document kinds to draw from (all when empty), e.g. ["batch_record", "deviation"].
    pub kinds: Vec<String>,
}

/// With a model directory, its own tokenizer is used and nothing is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerSection {
    /// Learned BPE entries plus the special tokens.
    pub vocab_size: usize,
    /// Chat template source: a tokenizer_config.json whose `chat_template` is copied.
    pub template_from: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// An HF model directory (config.json, safetensors, tokenizer.json, tokenizer_config.json).
    pub dir: Option<PathBuf>,
    /// Otherwise: seeded random weights of this preset, sized to the trained tokenizer.
    pub preset: String,
    pub init_seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Held-out rows scored per model (at most the synth stage's `eval_rows`).
    pub rows: usize,
    pub max_new_tokens: usize,
    /// Think budget of the constrained (think-then-JSON) runs.
    pub max_think_tokens: usize,
    /// Sequences generated together.
    pub batch_size: usize,
}

impl Default for PipelineFile {
    /// The embedded CPU run: a tiny Qwen2 and a BPE tokenizer trained on the synthetic corpus,
    /// sized to finish in minutes on 2 cores.
    fn default() -> Self {
        Self {
            out: PathBuf::from("runs/pipeline"),
            device: "cpu".into(),
            synth: SynthSection::default(),
            tokenizer: TokenizerSection::default(),
            model: ModelSection::default(),
            sft: SftConfig {
                lr: 2e-3,
                warmup_ratio: 0.05,
                decay: Decay::Cosine,
                epochs: 2,
                batch_size: 4,
                grad_accum: 1,
                max_len: 1024,
                save_every: 25,
                keep_last: 2,
                eval_every: 0,
                eval_generations: 0,
                ..SftConfig::default()
            },
            grpo: GrpoConfig {
                num_generations: 4,
                prompts_per_step: 2,
                max_steps: 16,
                max_completion_len: 320,
                max_prompt_len: 640,
                constraint: RolloutConstraint::None,
                lr: 2e-4,
                grad_accum: 2,
                save_every: 5,
                keep_last: 2,
                sample_every: 5,
                optimizer: AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() },
                ..GrpoConfig::default()
            },
            eval: EvalSection::default(),
        }
    }
}

impl Default for SynthSection {
    fn default() -> Self {
        // The four kinds with the shortest records: the embedded run is about format, not length.
        let kinds = ["training", "supplier_audit", "capa", "stability_study"].map(String::from).to_vec();
        Self { seed: 1, grpo_rows: 64, sft_rows: 160, eval_rows: 16, kinds }
    }
}

impl Default for TokenizerSection {
    fn default() -> Self {
        Self { vocab_size: 8192, template_from: PathBuf::from("assets/qwen/tokenizer_config.json") }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { dir: None, preset: "tiny".into(), init_seed: 0 }
    }
}

impl Default for EvalSection {
    fn default() -> Self {
        Self { rows: 16, max_new_tokens: 400, max_think_tokens: 256, batch_size: 8 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_configs_parse_and_unknown_fields_are_named() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/pipeline-1.5b.toml");
        let file: PipelineFile = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        file.sft.validate().unwrap();
        file.grpo.validate().unwrap();
        assert_eq!(file.synth.grpo_rows, 20_000);
        assert_eq!(file.grpo.num_generations, 8);
        let default = PipelineFile::default();
        default.sft.validate().unwrap();
        default.grpo.validate().unwrap();
        for (text, field) in [("[synth]\nrows = 3\n", "rows"), ("[grpo]\nepsilon = 0.1\n", "epsilon"), ("devic = \"cpu\"\n", "devic")] {
            let err = toml::from_str::<PipelineFile>(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
