//! `pipeline.toml`: one file for every stage. Every field has a default (the embedded CPU
//! run); unknown fields are errors.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thinkjson_grpo::{GrpoConfig, RolloutConstraint};
use thinkjson_model::train::{AdamWConfig, Decay};
use thinkjson_model::LoraConfig;
use thinkjson_sft::SftConfig;
use thinkjson_synth::ReasoningStyle;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineFile {
    pub out: PathBuf,
    /// Order of the two training stages: `sft-then-grpo` (default: SFT teaches the format,
    /// GRPO sharpens it) or `grpo-then-sft` (the paper's: R1-Zero-style GRPO from the base
    /// model, then SFT). The report compares base, first stage, and both.
    pub order: StageOrder,
    /// cpu, cuda or cuda:N.
    pub device: String,
    pub synth: SynthSection,
    pub tokenizer: TokenizerSection,
    pub model: ModelSection,
    pub sft: SftConfig,
    pub grpo: GrpoConfig,
    pub eval: EvalSection,
    /// LoRA for both training stages (each may set its own as `[sft.lora]` / `[grpo.lora]`).
    /// After a LoRA stage the pipeline merges the adapter into `merged/` for the next stage
    /// and the evaluation. Default: none (full fine-tuning).
    pub lora: Option<LoraConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageOrder {
    #[default]
    SftThenGrpo,
    GrpoThenSft,
}

impl StageOrder {
    /// The training stages, first to last.
    pub fn training(self) -> [&'static str; 2] {
        match self {
            StageOrder::SftThenGrpo => ["sft", "grpo"],
            StageOrder::GrpoThenSft => ["grpo", "sft"],
        }
    }
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
    /// Share of rows with a random schema built from the domain's fields.
    pub random_schema_share: f64,
    /// `full` (field-by-field traces, as in the paper) or `brief` (one sentence).
    pub reasoning: ReasoningStyle,
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
    /// The starting model: an HF model directory (config.json, safetensors, tokenizer.json,
    /// tokenizer_config.json), a GGUF file, or an embedded model name
    /// (`smollm2-135m-instruct`). A GGUF model is imported into OUT/base (f32) by the model
    /// stage and its tokenizer files into OUT/tokenizer by the tokenizer stage. Default: none.
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
            order: StageOrder::SftThenGrpo,
            device: "cpu".into(),
            synth: SynthSection::default(),
            tokenizer: TokenizerSection::default(),
            model: ModelSection::default(),
            sft: SftConfig {
                lr: 2e-3,
                warmup_ratio: 0.05,
                decay: Decay::Cosine,
                epochs: 6,
                batch_size: 4,
                grad_accum: 1,
                max_len: 1024,
                save_every: 25,
                keep_last: 2,
                eval_every: 0,
                eval_generations: 0,
                ..SftConfig::default()
            },
            // Free rollouts, as in the paper. About a quarter of the SFT model's samples are
            // valid JSON, so the groups differ in the JSON and format rewards; at TRL's
            // 1.5B learning rate 16 steps would move this small a model nowhere.
            grpo: GrpoConfig {
                num_generations: 8,
                prompts_per_step: 2,
                max_steps: 16,
                max_completion_len: 256,
                max_prompt_len: 640,
                constraint: RolloutConstraint::None,
                lr: 1e-3,
                grad_accum: 2,
                save_every: 5,
                keep_last: 2,
                sample_every: 5,
                optimizer: AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() },
                ..GrpoConfig::default()
            },
            eval: EvalSection::default(),
            lora: None,
        }
    }
}

impl Default for SynthSection {
    fn default() -> Self {
        // The four kinds with the shortest records: the embedded run is about format, not length.
        let kinds = ["training", "supplier_audit", "capa", "stability_study"].map(String::from).to_vec();
        // Brief traces: a model trained from scratch for minutes learns the JSON, not prose.
        Self { seed: 1, grpo_rows: 64, sft_rows: 320, eval_rows: 32, kinds, random_schema_share: 0.1, reasoning: ReasoningStyle::Brief }
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
        Self { rows: 32, max_new_tokens: 256, max_think_tokens: 64, batch_size: 8 }
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
        assert_eq!(file.order, StageOrder::GrpoThenSft, "the paper's order");
        assert_eq!(file.sft.lora.as_ref().map(|l| l.r), Some(16), "SFT with LoRA, as the paper");
        assert!(file.grpo.lora.is_none());
        let default = PipelineFile::default();
        default.sft.validate().unwrap();
        default.grpo.validate().unwrap();
        for (text, field) in [("[synth]\nrows = 3\n", "rows"), ("[grpo]\nepsilon = 0.1\n", "epsilon"), ("devic = \"cpu\"\n", "devic")] {
            let err = toml::from_str::<PipelineFile>(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn a_config_changes_only_the_fields_it_sets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[sft]\nepochs = 7\n[grpo.optimizer]\nbeta2 = 0.95\n").unwrap();
        let file = crate::pipeline::read_config(&path).unwrap();
        let default = PipelineFile::default();
        assert_eq!(file.sft.epochs, 7);
        assert_eq!(file.sft.lr, default.sft.lr, "an unset field keeps the embedded value");
        assert_eq!(file.grpo.optimizer.beta2, 0.95);
        assert_eq!(file.grpo.optimizer.weight_decay, default.grpo.optimizer.weight_decay);
        assert_eq!(file.grpo.max_steps, default.grpo.max_steps);
        std::fs::write(&path, "[sft]\nepochs = 7\nepoch = 2\n").unwrap();
        let err = crate::pipeline::read_config(&path).unwrap_err().to_string();
        assert!(err.contains("epoch") && err.contains("p.toml"), "{err}");
    }
}
