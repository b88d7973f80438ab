//! # thinkjson-model
//!
//! The Qwen2/Llama-family decoder every other thinkjson stage runs on, written against burn's
//! `Backend` so one model serves CPU (Flex) and CUDA. It reads and writes Hugging Face
//! formats: `config.json` (transformers v4 and v5), safetensors (f32/f16/bf16, single or
//! sharded), `tokenizer.json` and the Jinja `chat_template` of `tokenizer_config.json`.
//!
//! It also reads GGUF files (llama.cpp's format): [`gguf`] parses the container, dequantizes
//! F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K-quants Q2_K…Q6_K, maps `llama` and
//! `qwen2` models to HF names, and rebuilds their tokenizer and chat template;
//! [`Pretrained`] opens either form behind one handle.
//!
//! Key types: [`ModelConfig`], [`CausalLm`], [`Pretrained`], [`TokenBatch`], [`KvCache`],
//! [`Tokenizer`], [`ChatTemplate`], [`DeviceSpec`].
//!
//! The usage loop:
//! 1. load a config and weights — [`CausalLm::from_pretrained`] (or [`CausalLm::random`]);
//! 2. render a conversation with [`ChatTemplate`] and encode it with [`Tokenizer`];
//! 3. pad ids into a [`TokenBatch`] and call [`CausalLm::forward`] for logits,
//!    [`CausalLm::forward_cached`] step by step with a [`KvCache`] to generate, or
//!    [`CausalLm::token_logprobs`] for training losses.
//!
//! ```
//! use thinkjson_model::{CausalLm, CpuBackend, ModelConfig, Padding, TokenBatch};
//! let config = ModelConfig::preset("tiny")?.with_vocab_size(64);
//! let model = CausalLm::<CpuBackend>::random(&config, 7, &Default::default())?;
//! let batch = TokenBatch::new(&[vec![1, 2, 3], vec![4, 5]], Padding::Right, 0)?;
//! let logits = model.forward(&batch)?;
//! assert_eq!(logits.dims(), [2, 3, 64]);
//! # Ok::<(), thinkjson_model::ModelError>(())
//! ```

mod batch;
mod checkpointed;
mod chat;
mod config;
mod device;
mod error;
pub mod gguf;
mod cpu_kernels;
mod layers;
mod lean_attention;
mod lean_embedding;
mod lean_linear;
mod lean_logprobs;
mod lean_mlp;
mod lean_rope;
pub mod lora;
mod model;
mod pretrained;
mod scores;
mod tokenizer;
pub mod train;
mod weights;

pub use batch::{Padding, TokenBatch};
pub use chat::{ChatMessage, ChatTemplate};
pub use checkpointed::CheckpointedScores;
pub use config::{Architecture, ModelConfig, StorageDtype, PRESETS};
pub use device::{probe_cuda, CpuBackend, CpuTrainBackend, DeviceSpec};
#[cfg(feature = "cuda")]
pub use device::{CudaBackend, CudaBf16Backend};
pub use error::{ModelError, Result};
pub use lora::{LoraConfig, Target};
pub use model::{CausalLm, KvCache};
pub use pretrained::Pretrained;
pub use tokenizer::{train_bpe, SpecialTokens, Tokenizer};
pub use weights::write_atomic;

/// Rows (batch × new positions) up to which a forward pass's projections run on the CPU
/// decode kernels, whose every output is the same FMA chain whatever the row count; past it a
/// pass is a prefill for burn's GEMM. A decoder that feeds several tokens per sequence in one
/// step (forced tokens) keeps a step within this many rows.
pub const DECODE_STEP_ROWS: usize = cpu_kernels::MAX_ROWS;

/// Re-exported so dependants name the same burn.
pub use burn;
