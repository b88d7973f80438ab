//! [`Pretrained`]: one handle for "a model the user named", whether a Hugging Face directory
//! or a GGUF file, so every verb accepts both.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf::tokenizer::GgufTokenizer;
use crate::gguf::GgufFile;
use crate::model::CausalLm;
use crate::tokenizer::Tokenizer;

/// Where a pretrained model lives.
#[derive(Debug, Clone)]
pub enum Pretrained {
    /// `config.json`, safetensors weights, `tokenizer.json`, `tokenizer_config.json`.
    HfDir(PathBuf),
    /// A GGUF file (weights, tokenizer and chat template in one).
    Gguf(GgufFile),
}

impl Pretrained {
    /// A directory is read as a Hugging Face model; a file must be GGUF (checked by its magic).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(Self::HfDir(path.to_path_buf()));
        }
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
        match read {
            Ok(()) if &magic == b"GGUF" => Ok(Self::Gguf(GgufFile::open(path)?)),
            Err(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => Err(ModelError::io(path, e)),
            _ => Err(ModelError::Input(format!(
                "{}: neither a model directory nor a GGUF file (it does not start with \"GGUF\")",
                path.display()
            ))),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::HfDir(dir) => dir,
            Self::Gguf(g) => g.path(),
        }
    }

    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Self::HfDir(dir) => ModelConfig::from_file(dir),
            Self::Gguf(g) => ModelConfig::from_gguf(g),
        }
    }

    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<CausalLm<B>> {
        match self {
            Self::HfDir(dir) => CausalLm::from_pretrained(dir, device),
            Self::Gguf(g) => CausalLm::from_gguf(g.path(), device),
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Self::HfDir(dir) => Tokenizer::from_path(dir),
            Self::Gguf(g) => GgufTokenizer::from_gguf(g)?.tokenizer(g),
        }
    }

    /// The model's chat template (ChatML where it ships none).
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        match self {
            Self::HfDir(dir) if dir.join("tokenizer_config.json").exists() => ChatTemplate::from_tokenizer_config(dir),
            Self::HfDir(_) => Ok(ChatTemplate::chatml()),
            Self::Gguf(g) => GgufTokenizer::from_gguf(g)?.chat_template(),
        }
    }
}
