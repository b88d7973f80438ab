//! `logits`, `init-model` and `import-gguf`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::gguf::GgufFile;
use thinkjson_model::{CausalLm, DeviceSpec, ModelConfig, Padding, Pretrained, StorageDtype, TokenBatch};

use crate::backend::{dispatch, OnBackend};

#[derive(Args)]
pub struct LogitsArgs {
    /// An HF model directory, a GGUF file, or an embedded model name (smollm2-135m-instruct).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long)]
    tokens: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

pub fn logits(args: LogitsArgs) -> Result<()> {
    let tokens = parse_tokens(&args.tokens)?;
    let model = crate::model_ref::open(&args.model)?;
    let rows = dispatch(args.device, LogitsJob { model, adapter: args.adapter, tokens })?;
    crate::print_out(&serde_json::json!({ "logits": rows }).to_string())
}

fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let tokens: Vec<u32> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().with_context(|| format!("--tokens: `{t}` is not a token id")))
        .collect::<Result<_>>()?;
    if tokens.is_empty() {
        bail!("--tokens: no token ids given");
    }
    Ok(tokens)
}

struct LogitsJob {
    model: Pretrained,
    adapter: Option<PathBuf>,
    tokens: Vec<u32>,
}

impl OnBackend for LogitsJob {
    type Output = Vec<Vec<f32>>;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        let model = crate::model_ref::load::<B>(&self.model, self.adapter.as_deref(), &device)?;
        let batch = TokenBatch::new(&[self.tokens], Padding::Right, 0)?;
        let logits = model.forward(&batch)?;
        let [_, seq, vocab] = logits.dims();
        let values = logits
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("reading logits: {e:?}"))?;
        Ok((0..seq).map(|t| values[t * vocab..(t + 1) * vocab].to_vec()).collect())
    }
}

#[derive(Args)]
pub struct InitArgs {
    /// Preset shape: qwen2.5-1.5b, deepseek-r1-distill-qwen-1.5b, smollm2-135m, tiny.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Override the vocabulary size (e.g. for a small trained tokenizer).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Override the number of layers.
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
}

pub fn init(args: InitArgs) -> Result<()> {
    let mut config = ModelConfig::preset(&args.preset)?;
    if let Some(v) = args.vocab_size {
        config = config.with_vocab_size(v);
    }
    if let Some(l) = args.layers {
        config.num_hidden_layers = l;
    }
    let dtype: StorageDtype = serde_json::from_value(serde_json::Value::String(args.dtype.clone()))
        .with_context(|| format!("--dtype: `{}` (float32, bfloat16, float16)", args.dtype))?;
    let model = CausalLm::<thinkjson_model::CpuBackend>::random(&config, args.seed, &Default::default())?;
    model
        .save_pretrained(&args.out, dtype)
        .with_context(|| format!("saving to {}", args.out.display()))?;
    eprintln!(
        "saved {} ({} parameters) to {}",
        args.preset,
        config.num_parameters(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct ImportGgufArgs {
    /// A GGUF file (`llama` or `qwen2` architecture), or an embedded model name.
    #[arg(long = "in")]
    input: PathBuf,
    /// Output directory (created): config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json, generation_config.json.
    #[arg(long)]
    out: PathBuf,
    /// Storage dtype of model.safetensors: f32 (exact dequantized values) or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
}

pub fn import_gguf(args: ImportGgufArgs) -> Result<()> {
    let dtype = storage_dtype(&args.dtype)?;
    let path = match crate::model_ref::open(&args.input)? {
        Pretrained::Gguf(g) => g.path().to_path_buf(),
        Pretrained::HfDir(dir) => bail!("--in {}: a directory; import-gguf reads a GGUF file", dir.display()),
    };
    let start = std::time::Instant::now();
    let gguf = GgufFile::open(&path)?;
    let config = thinkjson_model::gguf::hf::import_gguf(&gguf, &args.out, dtype)
        .with_context(|| format!("importing {} into {}", path.display(), args.out.display()))?;
    let secs = start.elapsed().as_secs_f64();
    if args.json {
        let v = serde_json::json!({"in": path, "out": args.out, "architecture": config.architecture,
            "parameters": config.num_parameters(), "dtype": dtype.hf_name(), "seconds": secs});
        crate::print_out(&serde_json::to_string_pretty(&v)?)
    } else {
        eprintln!(
            "imported {} ({:?}, {} parameters, {}) into {} in {secs:.1}s",
            path.display(),
            config.architecture,
            config.num_parameters(),
            dtype.hf_name(),
            args.out.display()
        );
        Ok(())
    }
}

#[derive(Args)]
pub struct MergeLoraArgs {
    /// The base model the adapter was trained on: an HF directory, a GGUF file or an embedded name.
    #[arg(long)]
    model: PathBuf,
    /// The PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory: a full HF model (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    out: PathBuf,
    /// Storage dtype of model.safetensors: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

/// `W ← W + (alpha / r)·B·A` for every adapted projection, saved as a plain HF model.
pub fn merge_lora(args: MergeLoraArgs) -> Result<()> {
    let dtype = storage_dtype(&args.dtype)?;
    let l = crate::train_common::write_merged(&args.model, &args.adapter, &args.out, dtype)?;
    eprintln!(
        "merged LoRA r={} alpha={} ({}) into {}: {}",
        l.r,
        l.alpha,
        l.target_modules.join(","),
        args.model.display(),
        args.out.display()
    );
    Ok(())
}

/// `--dtype` of the verbs that write safetensors: f32 or bf16.
fn storage_dtype(arg: &str) -> Result<StorageDtype> {
    match arg {
        "f32" | "float32" => Ok(StorageDtype::Float32),
        "bf16" | "bfloat16" => Ok(StorageDtype::Bfloat16),
        other => bail!("--dtype: `{other}` (f32 or bf16)"),
    }
}
