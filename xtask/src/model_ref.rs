//! What `--model` (and a config's `model`) may name: a Hugging Face directory, a GGUF file,
//! or the name of a model committed to this repository.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use thinkjson_model::gguf::tokenizer::GgufTokenizer;
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::{CausalLm, ModelConfig, Pretrained};

/// Models that ship with the repository, by name: (name, file under the repository root).
pub const EMBEDDED: &[(&str, &str)] = &[(
    "smollm2-135m-instruct",
    "assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
)];

/// The repository root (where `assets/` lives), whatever the working directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The committed file of an embedded model name.
pub fn embedded_path(name: &str) -> Option<PathBuf> {
    EMBEDDED.iter().find(|(n, _)| *n == name).map(|(_, file)| repo_root().join(file))
}

/// Opens what the user named: an existing path (directory or GGUF file) first, then an
/// embedded model name.
pub fn open(arg: &Path) -> Result<Pretrained> {
    if arg.exists() {
        return Pretrained::open(arg).with_context(|| format!("opening the model {}", arg.display()));
    }
    let name = arg.to_string_lossy();
    match embedded_path(&name) {
        Some(path) => Pretrained::open(&path).with_context(|| format!("opening the embedded model `{name}` ({})", path.display())),
        None => bail!(
            "--model `{name}`: no such file or directory, and not an embedded model name (known: {})",
            EMBEDDED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A directory holding the model's `tokenizer.json` and `tokenizer_config.json`: the model's
/// own directory, or for a GGUF file the two files rebuilt from its metadata in `dir`.
pub fn tokenizer_dir(model: &Pretrained, dir: &Path) -> Result<PathBuf> {
    match model {
        Pretrained::HfDir(own) => Ok(own.clone()),
        Pretrained::Gguf(gguf) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let tok = GgufTokenizer::from_gguf(gguf)?;
            let config = ModelConfig::from_gguf(gguf)?;
            let write = |name: &str, v: &serde_json::Value| -> Result<()> {
                let path = dir.join(name);
                thinkjson_model::write_atomic(&path, serde_json::to_string_pretty(v)?.as_bytes())
                    .with_context(|| format!("writing {}", path.display()))
            };
            write("tokenizer.json", tok.tokenizer_json())?;
            write("tokenizer_config.json", &tok.tokenizer_config(&config))?;
            Ok(dir.to_path_buf())
        }
    }
}

/// Loads `model` onto `device` and, with `adapter`, attaches the PEFT LoRA adapter in that
/// directory (refused, with the reason, when it was made for another base).
pub fn load<B: Backend>(model: &Pretrained, adapter: Option<&Path>, device: &B::Device) -> Result<CausalLm<B>> {
    let base = model.load::<B>(device).with_context(|| format!("loading {}", model.path().display()))?;
    match adapter {
        None => Ok(base),
        Some(dir) => base
            .load_adapter(dir)
            .with_context(|| format!("loading the adapter {} onto {}", dir.display(), model.path().display())),
    }
}
