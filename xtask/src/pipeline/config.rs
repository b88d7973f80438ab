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
    /// Data-parallel peers of the SFT and GRPO stages, one per device (`["cpu", "cpu"]`,
    /// `["cuda:0", "cuda:1"]`); empty: `device` alone. Eval runs on `device`.
    pub devices: Vec<String>,
    pub synth: SynthSection,
    pub tokenizer: TokenizerSection,
    pub model: ModelSection,
    pub sft: SftConfig,
    pub grpo: GrpoConfig,
    pub eval: EvalSection,
    /// How a training stage without its own `[sft.lora]` / `[grpo.lora]` trains: `lora`
    /// (default) with the `[lora]` table, or LoRA's defaults when there is none (r 16,
    /// alpha 32, the seven projections); `full`: every weight (a `[lora]` table is then an
    /// error). After a LoRA stage the pipeline merges the adapter into `merged/` for the
    /// next stage and the evaluation.
    pub finetune: Finetune,
    /// LoRA for both training stages (each may set its own as `[sft.lora]` / `[grpo.lora]`).
    /// Default: none (LoRA's defaults).
    pub lora: Option<LoraConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Finetune {
    #[default]
    Lora,
    Full,
}

impl PipelineFile {
    /// Gives each training stage its LoRA settings (see [`PipelineFile::finetune`]).
    pub fn resolve_lora(&mut self) -> anyhow::Result<()> {
        match (self.finetune, self.lora.take()) {
            (Finetune::Full, Some(_)) => anyhow::bail!("finetune = \"full\" and a [lora] table: choose one (a stage may still set [sft.lora] or [grpo.lora])"),
            (Finetune::Full, None) => {}
            (Finetune::Lora, lora) => {
                let lora = lora.unwrap_or_default();
                self.sft.lora.get_or_insert_with(|| lora.clone());
                self.grpo.lora.get_or_insert(lora);
            }
        }
        Ok(())
    }
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
    /// stage and its tokenizer files into OUT/tokenizer by the tokenizer stage.
    /// Default: `smollm2-135m-instruct` (committed, no download).
    pub dir: Option<PathBuf>,
    /// Instead of `dir`: seeded random weights of this preset (`tiny`, `smollm2-135m`, …),
    /// sized to a BPE tokenizer trained on the synthetic corpus (`[tokenizer]`). When set,
    /// `dir` is not used. Default: none.
    pub preset: Option<String>,
    /// Seed of the preset's random weights.
    pub init_seed: u64,
}

impl ModelSection {
    /// The pretrained model to start from: `dir`, unless a `preset` asks for random weights.
    pub fn pretrained(&self) -> Option<&std::path::Path> {
        if self.preset.is_some() {
            None
        } else {
            self.dir.as_deref()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Held-out rows scored per model (at most the synth stage's `eval_rows`).
    pub rows: usize,
    pub max_new_tokens: usize,
    /// Think budget of the constrained (think-then-JSON) runs.
    pub max_think_tokens: usize,
    /// Held-out rows whose loss the SFT stage measures when it ends (one forward pass each).
    pub loss_rows: usize,
    /// Sequences generated together (a running batch that rows join as others finish; a
    /// row's free and constrained outputs share one prefill). Default 32.
    pub batch_size: usize,
    /// KV-cache positions (sequences × padded width) the running batch may hold: a row joins
    /// only when it fits with room for every sequence's new tokens, so a long prompt lowers
    /// the batch instead of the memory growing. 0 (default): 2 GiB of cache for the model.
    pub max_cached_positions: usize,
}

impl Default for PipelineFile {
    /// The embedded CPU run: LoRA on the committed SmolLM2-135M-Instruct (its own tokenizer
    /// and chat template), sized by measurement for 2 cores: it took 49–58 minutes on a
    /// first-generation AMD EPYC and 25 on an AVX-512 Xeon, evaluation most of it (README),
    /// against a 20-minute goal.
    fn default() -> Self {
        Self {
            out: PathBuf::from("runs/pipeline"),
            order: StageOrder::SftThenGrpo,
            device: "cpu".into(),
            devices: Vec::new(),
            synth: SynthSection::default(),
            tokenizer: TokenizerSection::default(),
            model: ModelSection::default(),
            // One pass at LoRA's larger step: the instruct model already writes JSON-like
            // text, so a few dozen examples teach it the <think>/<answer> format and the
            // schema's field names.
            // No warmup: with LoRA's B at zero, a first step at lr 0 would be a lost step.
            sft: SftConfig {
                lr: 1e-3,
                warmup_ratio: 0.0,
                decay: Decay::Cosine,
                epochs: 1,
                batch_size: 4,
                grad_accum: 1,
                max_len: 1024,
                save_every: 5,
                keep_last: 2,
                eval_every: 0,
                eval_generations: 0,
                ..SftConfig::default()
            },
            // Think-then-JSON rollouts: every completion is schema-valid, so a group's rewards
            // differ in the values it extracted (match), and three steps teach content.
            // Free rollouts (the paper's) differ mostly in whether the JSON parses at all;
            // over three seeds they lowered SFT's match (free −0.3, constrained −0.2 points),
            // constrained ones raised it (+0.9, +0.2) and kept schema-valid.
            // A small step: three AdamW updates move each adapter weight by about lr each,
            // whatever the strength of eight rollouts' signal; 2e-4 lowered every figure
            // (README, "How long it takes, and what it gives").
            grpo: GrpoConfig {
                num_generations: 4,
                prompts_per_step: 2,
                max_steps: 3,
                max_completion_len: 224,
                max_prompt_len: 1024,
                constraint: RolloutConstraint::ThinkThenJson,
                lr: 5e-5,
                warmup_ratio: 0.0,
                decay: Decay::Constant,
                grad_accum: 1,
                save_every: 1,
                keep_last: 2,
                sample_every: 1,
                optimizer: AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() },
                ..GrpoConfig::default()
            },
            eval: EvalSection::default(),
            finetune: Finetune::Lora,
            lora: None,
        }
    }
}

impl Default for SynthSection {
    fn default() -> Self {
        // The four kinds with the shortest records: the embedded run is about format, not length.
        let kinds = ["training", "supplier_audit", "capa", "stability_study"].map(String::from).to_vec();
        // Brief traces: minutes of training teach the JSON, not prose; and they keep eval short.
        Self { seed: 1, grpo_rows: 64, sft_rows: 64, eval_rows: 64, kinds, random_schema_share: 0.1, reasoning: ReasoningStyle::Brief }
    }
}

impl Default for TokenizerSection {
    fn default() -> Self {
        Self { vocab_size: 8192, template_from: PathBuf::from("assets/qwen/tokenizer_config.json") }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { dir: Some(PathBuf::from("smollm2-135m-instruct")), preset: None, init_seed: 0 }
    }
}

impl Default for EvalSection {
    fn default() -> Self {
        // 32 with the cache budget: a running batch pads every sequence's cache to its
        // longest one, and the default's eval rows include a 6,000-character prompt (1-237);
        // by a count of sequences alone, 32 peaked at 8.0 GiB of RSS (README).
        Self { rows: 64, max_new_tokens: 224, max_think_tokens: 48, loss_rows: 16, batch_size: 32, max_cached_positions: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_goes_to_stages_without_their_own_and_full_refuses_a_lora_table() {
        let mut file = PipelineFile::default();
        file.resolve_lora().unwrap();
        assert_eq!(file.sft.lora, Some(LoraConfig::default()));
        assert_eq!(file.grpo.lora, Some(LoraConfig::default()));
        let mut file = PipelineFile { lora: Some(LoraConfig { r: 4, ..LoraConfig::default() }), ..PipelineFile::default() };
        file.sft.lora = Some(LoraConfig { r: 8, ..LoraConfig::default() });
        file.resolve_lora().unwrap();
        assert_eq!((file.sft.lora.map(|l| l.r), file.grpo.lora.map(|l| l.r)), (Some(8), Some(4)));
        let mut full = PipelineFile { finetune: Finetune::Full, ..PipelineFile::default() };
        full.resolve_lora().unwrap();
        assert_eq!((full.sft.lora, full.grpo.lora), (None, None));
        let mut both = PipelineFile { finetune: Finetune::Full, lora: Some(LoraConfig::default()), ..PipelineFile::default() };
        let err = both.resolve_lora().unwrap_err().to_string();
        assert!(err.contains("finetune") && err.contains("[lora]"), "{err}");
    }

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
        assert_eq!(file.finetune, Finetune::Full, "GRPO trains every weight");
        let default = PipelineFile::default();
        default.sft.validate().unwrap();
        default.grpo.validate().unwrap();
        assert_eq!(default.model.pretrained(), Some(std::path::Path::new("smollm2-135m-instruct")));
        assert_eq!(default.finetune, Finetune::Lora);
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/pipeline-tiny.toml");
        let tiny: PipelineFile = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!((tiny.model.preset.as_deref(), tiny.model.pretrained(), tiny.finetune), (Some("tiny"), None, Finetune::Full));
        for name in ["pipeline-tiny.toml", "pipeline-smollm2-1h.toml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs").join(name);
            let file: PipelineFile = crate::train_common::read_config(&path).unwrap();
            file.sft.validate().unwrap();
            file.grpo.validate().unwrap();
        }
        for (text, field) in [("[synth]\nrows = 3\n", "rows"), ("[grpo]\nepsilon = 0.1\n", "epsilon"), ("devic = \"cpu\"\n", "devic")] {
            let err = toml::from_str::<PipelineFile>(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    /// The README's seed table: seed N differs from the default in its seeds (and `out`) only.
    #[test]
    fn seed_configs_are_the_default_with_other_seeds() {
        for n in [2u64, 3] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../configs/pipeline-seed{n}.toml"));
            let file: PipelineFile = crate::train_common::read_config(&path).unwrap();
            let mut expected = PipelineFile { out: PathBuf::from(format!("runs/pipeline-seed{n}")), ..PipelineFile::default() };
            expected.synth.seed = n;
            expected.sft.seed = n - 1;
            expected.grpo.seed = n - 1;
            assert_eq!(file, expected, "{}", path.display());
        }
    }

    #[test]
    fn a_config_changes_only_the_fields_it_sets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[sft]\nepochs = 7\n[grpo.optimizer]\nbeta2 = 0.95\n").unwrap();
        let file = crate::train_common::read_config::<PipelineFile>(&path).unwrap();
        let default = PipelineFile::default();
        assert_eq!(file.sft.epochs, 7);
        assert_eq!(file.sft.lr, default.sft.lr, "an unset field keeps the embedded value");
        assert_eq!(file.grpo.optimizer.beta2, 0.95);
        assert_eq!(file.grpo.optimizer.weight_decay, default.grpo.optimizer.weight_decay);
        assert_eq!(file.grpo.max_steps, default.grpo.max_steps);
        std::fs::write(&path, "[sft]\nepochs = 7\nepoch = 2\n").unwrap();
        let err = crate::train_common::read_config::<PipelineFile>(&path).unwrap_err().to_string();
        assert!(err.contains("epoch") && err.contains("p.toml"), "{err}");
    }
}
