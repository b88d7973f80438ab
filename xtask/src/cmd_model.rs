//! `logits` and `init-model`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::{CausalLm, DeviceSpec, ModelConfig, Padding, StorageDtype, TokenBatch};

use crate::backend::{dispatch, OnBackend};

#[derive(Args)]
pub struct LogitsArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index).
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long)]
    tokens: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

pub fn logits(args: LogitsArgs) -> Result<()> {
    let tokens = parse_tokens(&args.tokens)?;
    let rows = dispatch(args.device, LogitsJob { dir: args.model, tokens })?;
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
    dir: PathBuf,
    tokens: Vec<u32>,
}

impl OnBackend for LogitsJob {
    type Output = Vec<Vec<f32>>;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        let model = CausalLm::<B>::from_pretrained(&self.dir, &device)
            .with_context(|| format!("loading {}", self.dir.display()))?;
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
