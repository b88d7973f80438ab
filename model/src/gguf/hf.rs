//! GGUF `llama` / `qwen2` models as Hugging Face models: the config, the tensor names, the
//! undoing of llama.cpp's rotary row permutation, and the import into an HF directory.

use std::path::Path;

use crate::config::{Architecture, ModelConfig, StorageDtype};
use crate::error::{ModelError, Result};
use crate::gguf::tokenizer::GgufTokenizer;
use crate::gguf::{GgufFile, MetaValue};
use crate::weights::{hf_layout, write_atomic, write_safetensors_streamed, WeightSource};

/// Architectures (`general.architecture`) this crate maps to its decoder.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

fn architecture(gguf: &GgufFile) -> Result<Architecture> {
    match gguf.str("general.architecture")? {
        "llama" => Ok(Architecture::Llama),
        "qwen2" => Ok(Architecture::Qwen2),
        other => Err(gguf.error(format!(
            "architecture `{other}` is not supported (supported: {})",
            SUPPORTED_ARCHITECTURES.join(", ")
        ))),
    }
}

/// Whether llama.cpp's converter interleaved the rotary halves of q/k rows for this
/// architecture. Its llama converter permutes (and transformers' GGUF loader undoes it); its
/// qwen2 converter writes HF's order as is. Both are checked against transformers' loader
/// by the parity tests (the real SmolLM2 file and a qwen2 fixture).
fn rotary_rows_interleaved(arch: Architecture) -> bool {
    match arch {
        Architecture::Llama => true,
        Architecture::Qwen2 => false,
    }
}

/// A metadata float as its shortest decimal (an f32 `1e-5` stays `1e-5`, not `9.99…e-6`).
fn decimal(v: &MetaValue) -> Option<f64> {
    match v {
        MetaValue::F32(x) => x.to_string().parse().ok(),
        other => other.as_f64(),
    }
}

impl ModelConfig {
    /// The config of a GGUF `llama` or `qwen2` model, from its metadata and tensor table.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = architecture(gguf)?;
        let a = gguf.str("general.architecture")?.to_string();
        let key = |k: &str| format!("{a}.{k}");
        let usize_of = |k: &str| -> Result<usize> { Ok(gguf.u64(&key(k))? as usize) };
        if let Some(scaling) = gguf.get(&key("rope.scaling.type")) {
            if scaling.as_str() != Some("none") {
                return Err(gguf.error(format!("`{}` = {scaling:?}: only plain RoPE is implemented", key("rope.scaling.type"))));
            }
        }
        let hidden_size = usize_of("embedding_length")?;
        let heads = usize_of("attention.head_count")?;
        let kv_heads = gguf.opt_u64(&key("attention.head_count_kv"))?.map_or(heads, |v| v as usize);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(gguf.error(format!("{heads} attention heads cannot share {kv_heads} key/value heads")));
        }
        let head_dim = match gguf.opt_u64(&key("attention.key_length"))? {
            Some(d) => d as usize,
            None if hidden_size % heads == 0 => hidden_size / heads,
            None => return Err(gguf.error(format!("{heads} heads do not divide embedding_length {hidden_size}"))),
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(gguf.error(format!("head dimension {head_dim} must be positive and even for RoPE")));
        }
        if let Some(rot) = gguf.opt_u64(&key("rope.dimension_count"))? {
            if rot as usize != head_dim {
                return Err(gguf.error(format!(
                    "`{}` = {rot} but the head dimension is {head_dim}: partial rotary embeddings are not implemented",
                    key("rope.dimension_count")
                )));
            }
        }
        let embed = gguf
            .tensor("token_embd.weight")
            .ok_or_else(|| gguf.error("tensor `token_embd.weight` is missing"))?;
        let vocab_size = match embed.shape().as_slice() {
            [rows, cols] if *cols == hidden_size => *rows,
            other => {
                return Err(gguf.error(format!(
                    "tensor `token_embd.weight` has shape {other:?}, expected [vocab, {hidden_size}]"
                )))
            }
        };
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let rms_norm_eps = gguf.get(&eps_key).and_then(decimal).ok_or_else(|| gguf.missing(&eps_key))?;
        let rope_theta = match gguf.get(&key("rope.freq_base")) {
            Some(v) => decimal(v).ok_or_else(|| gguf.error(format!("`{}` is not a number", key("rope.freq_base"))))?,
            None => 10_000.0,
        };
        let attention_bias = match arch {
            Architecture::Qwen2 => true,
            Architecture::Llama => gguf.tensor("blk.0.attn_q.bias").is_some(),
        };
        let special = GgufTokenizer::special_ids(gguf)?;
        Ok(ModelConfig {
            architecture: arch,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_hidden_layers: usize_of("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: gguf.opt_u64(&key("context_length"))?.map_or(32_768, |v| v as usize),
            rope_theta,
            rms_norm_eps,
            tie_word_embeddings: gguf.tensor("output.weight").is_none(),
            attention_bias,
            bos_token_id: special.bos_id,
            eos_token_ids: special.eos_ids,
            pad_token_id: special.pad_id,
            // Dequantized values are exact in f32.
            dtype: StorageDtype::Float32,
        })
    }
}

/// The GGUF name of an HF tensor name (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`).
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

/// Serves HF-named f32 tensors in HF layout from a GGUF file.
pub(crate) struct GgufSource<'a> {
    gguf: &'a GgufFile,
    config: &'a ModelConfig,
}

impl<'a> GgufSource<'a> {
    pub(crate) fn new(gguf: &'a GgufFile, config: &'a ModelConfig) -> Self {
        Self { gguf, config }
    }
}

impl WeightSource for GgufSource<'_> {
    fn fetch(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let gguf_name = gguf_tensor_name(name)
            .ok_or_else(|| self.gguf.error(format!("no GGUF tensor corresponds to `{name}`")))?;
        let info = self.gguf.tensor(&gguf_name).ok_or_else(|| ModelError::MissingTensor {
            name: format!("{gguf_name} (HF `{name}`)"),
            place: self.gguf.path().display().to_string(),
        })?;
        if info.shape() != shape {
            return Err(ModelError::TensorShape {
                name: format!("{gguf_name} (HF `{name}`)"),
                found: info.shape(),
                expected: shape.to_vec(),
            });
        }
        let values = self.gguf.tensor_f32(info)?;
        let c = self.config;
        let heads = if name.contains("self_attn.q_proj.") {
            Some(c.num_attention_heads)
        } else if name.contains("self_attn.k_proj.") {
            Some(c.num_key_value_heads)
        } else {
            None
        };
        Ok(match heads {
            Some(n) if rotary_rows_interleaved(c.architecture) => {
                let row = values.len() / (n * c.head_dim);
                deinterleave_rotary_rows(&values, n, c.head_dim, row)
            }
            _ => values,
        })
    }
}

/// Undoes llama.cpp's q/k permutation: within each head of `d` rows, GGUF row `2i + p`
/// is HF row `p·d/2 + i` (`row` values per row; 1 for a bias).
fn deinterleave_rotary_rows(values: &[f32], heads: usize, d: usize, row: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    let half = d / 2;
    for h in 0..heads {
        for i in 0..half {
            for p in 0..2 {
                let src = (h * d + 2 * i + p) * row;
                let dst = (h * d + p * half + i) * row;
                out[dst..dst + row].copy_from_slice(&values[src..src + row]);
            }
        }
    }
    out
}

/// Writes a Hugging Face directory from a GGUF file: `config.json`, `model.safetensors`
/// (f32 keeps the dequantized values exactly), `tokenizer.json`, `tokenizer_config.json`
/// (with the chat template) and `generation_config.json`. Tensors are dequantized and
/// encoded one at a time.
pub fn import_gguf(gguf: &GgufFile, out: &Path, dtype: StorageDtype) -> Result<ModelConfig> {
    let config = ModelConfig::from_gguf(gguf)?;
    let tokenizer = GgufTokenizer::from_gguf(gguf)?;
    std::fs::create_dir_all(out).map_err(|e| ModelError::write(out, e))?;
    let mut source = GgufSource::new(gguf, &config);
    write_safetensors_streamed(out, &hf_layout(&config), &mut source, dtype)?;
    let saved = ModelConfig { dtype, ..config.clone() };
    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).map_err(|e| ModelError::Input(e.to_string()));
    write_atomic(&out.join("tokenizer.json"), json(tokenizer.tokenizer_json())?.as_bytes())?;
    write_atomic(&out.join("tokenizer_config.json"), json(&tokenizer.tokenizer_config(&config))?.as_bytes())?;
    let generation = serde_json::json!({
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids,
        "pad_token_id": config.pad_token_id,
    });
    write_atomic(&out.join("generation_config.json"), json(&generation)?.as_bytes())?;
    write_atomic(&out.join("config.json"), json(&saved.to_hf_value())?.as_bytes())?;
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways_for_every_layer_tensor() {
        assert_eq!(gguf_tensor_name("model.layers.12.self_attn.q_proj.bias").as_deref(), Some("blk.12.attn_q.bias"));
        assert_eq!(gguf_tensor_name("model.layers.0.mlp.down_proj.weight").as_deref(), Some("blk.0.ffn_down.weight"));
        assert_eq!(gguf_tensor_name("model.layers.0.post_attention_layernorm.weight").as_deref(), Some("blk.0.ffn_norm.weight"));
        assert_eq!(gguf_tensor_name("model.layers.0.mlp.bogus.weight"), None);
        let config = ModelConfig::preset("tiny").unwrap();
        for (name, _) in hf_layout(&config) {
            assert!(gguf_tensor_name(&name).is_some(), "{name}");
        }
    }

    #[test]
    fn deinterleave_matches_the_documented_row_map() {
        // 2 heads of d = 4, one value per row: GGUF rows [a0 b0 a1 b1] → HF [a0 a1 b0 b1].
        let gguf = [0.0, 10.0, 1.0, 11.0, 2.0, 12.0, 3.0, 13.0];
        let hf = deinterleave_rotary_rows(&gguf, 2, 4, 1);
        assert_eq!(hf, vec![0.0, 1.0, 10.0, 11.0, 2.0, 3.0, 12.0, 13.0]);
    }
}
