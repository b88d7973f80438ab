//! Weight sources (HF safetensors, single or sharded; seeded random init) and the HF-layout writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use safetensors::{Dtype, SafeTensors};

use crate::config::{ModelConfig, StorageDtype};
use crate::error::{ModelError, Result};

/// Supplies tensors by HF name in HF layout, as f32.
pub(crate) trait WeightSource {
    fn fetch(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

/// Seeded random initialisation: N(0, `std`) for matrices, ones for norms, zeros for biases.
pub(crate) struct RandomSource {
    rng: ChaCha8Rng,
    normal: Normal<f32>,
}

impl RandomSource {
    pub(crate) fn new(seed: u64, std: f32) -> Result<Self> {
        let normal = Normal::new(0.0, std)
            .map_err(|e| ModelError::Input(format!("init std {std}: {e}")))?;
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            normal,
        })
    }
}

impl WeightSource for RandomSource {
    fn fetch(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        Ok(if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| self.normal.sample(&mut self.rng)).collect()
        })
    }
}

/// Tensors from `model.safetensors` or a sharded `model.safetensors.index.json`.
pub(crate) struct SafetensorsSource {
    /// Tensor name → file holding it; `None` means the single-file layout.
    index: Option<HashMap<String, PathBuf>>,
    single: PathBuf,
    loaded: HashMap<PathBuf, Vec<u8>>,
}

impl SafetensorsSource {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|cause| ModelError::Json {
                path: index_path.clone(),
                cause,
            })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                ModelError::Safetensors {
                    path: index_path.clone(),
                    reason: "no `weight_map` object".into(),
                }
            })?;
            let mut index = HashMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| ModelError::Safetensors {
                    path: index_path.clone(),
                    reason: format!("weight_map entry `{name}` is not a file name"),
                })?;
                index.insert(name.clone(), dir.join(file));
            }
            Ok(Self {
                index: Some(index),
                single,
                loaded: HashMap::new(),
            })
        } else if single.exists() {
            Ok(Self {
                index: None,
                single,
                loaded: HashMap::new(),
            })
        } else {
            Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            ))
        }
    }

    fn file_for(&self, name: &str) -> Result<PathBuf> {
        match &self.index {
            None => Ok(self.single.clone()),
            Some(index) => index.get(name).cloned().ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                place: "model.safetensors.index.json".into(),
            }),
        }
    }

    fn bytes(&mut self, path: &Path) -> Result<&[u8]> {
        if !self.loaded.contains_key(path) {
            let data = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
            self.loaded.insert(path.to_path_buf(), data);
        }
        Ok(self.loaded.get(path).map(Vec::as_slice).unwrap_or(&[]))
    }
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl WeightSource for SafetensorsSource {
    fn fetch(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let path = self.file_for(name)?;
        let bytes = self.bytes(&path)?;
        let st = parse(&path, bytes)?;
        let view = st.tensor(name).map_err(|_| ModelError::MissingTensor {
            name: name.to_string(),
            place: path.display().to_string(),
        })?;
        if view.shape() != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                found: view.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::TensorDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(values)
    }
}

/// A tensor encoded for safetensors: name, dtype, shape, little-endian bytes.
type Encoded = (String, Dtype, Vec<usize>, Vec<u8>);

fn encode(name: &str, shape: &[usize], values: &[f32], dtype: StorageDtype) -> Encoded {
    let bytes: Vec<u8> = match dtype {
        StorageDtype::Float32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        StorageDtype::Bfloat16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        StorageDtype::Float16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
    };
    (name.to_string(), storage_dtype(dtype), shape.to_vec(), bytes)
}

/// One tensor of a model in HF layout whose f32 values are read only when asked for.
pub(crate) struct HfEntry<'a> {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) read: Box<dyn Fn() -> Result<Vec<f32>> + 'a>,
}

/// Writes `model.safetensors` (metadata `format=pt`) atomically: temp file, then rename.
/// Each tensor is read and encoded when the writer reaches it, so one tensor's values and
/// bytes are in memory at a time rather than a copy of the model (a training checkpoint of
/// SmolLM2 full fine-tuning peaked about 1 GB higher when the whole file was built first).
pub(crate) fn write_safetensors(dir: &Path, tensors: &[HfEntry<'_>], dtype: StorageDtype) -> Result<()> {
    let lazy: Vec<LazyTensor<'_>> = tensors
        .iter()
        .map(|t| LazyTensor {
            name: t.name.clone(),
            dtype: storage_dtype(dtype),
            shape: t.shape.clone(),
            bytes: Box::new(move || Ok(encode(&t.name, &t.shape, &(t.read)()?, dtype).3)),
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors_lazily(&dir.join("model.safetensors"), &lazy, metadata)
}

/// A tensor of a safetensors file whose bytes are made when the writer reaches it.
pub(crate) struct LazyTensor<'a> {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) bytes: Box<dyn Fn() -> Result<Vec<u8>> + 'a>,
}

/// A [`LazyTensor`] as the writer sees it; a failure to make the bytes is kept for after
/// the write (the writer's `View` cannot return one) and zeros of the right length stand in.
struct LazyView<'a, 'b> {
    tensor: &'b LazyTensor<'a>,
    failure: &'b std::cell::RefCell<Option<ModelError>>,
}

impl safetensors::View for LazyView<'_, '_> {
    fn dtype(&self) -> Dtype {
        self.tensor.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }
    fn data_len(&self) -> usize {
        self.tensor.shape.iter().product::<usize>() * self.tensor.dtype.bitsize() / 8
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let len = self.data_len();
        let failed = match (self.tensor.bytes)() {
            Ok(bytes) if bytes.len() == len => return std::borrow::Cow::Owned(bytes),
            Ok(bytes) => ModelError::Input(format!("{}: {} bytes for a {len}-byte tensor", self.tensor.name, bytes.len())),
            Err(e) => e,
        };
        self.failure.borrow_mut().get_or_insert(failed);
        std::borrow::Cow::Owned(vec![0; len])
    }
}

/// Writes a safetensors file atomically (temp file, then rename), making one tensor's bytes
/// at a time. A tensor that cannot be read fails the write and leaves no file behind.
pub(crate) fn write_safetensors_lazily(path: &Path, tensors: &[LazyTensor<'_>], metadata: HashMap<String, String>) -> Result<()> {
    let tmp = temp_path(path);
    let failure = std::cell::RefCell::new(None);
    let views = tensors.iter().map(|t| (t.name.as_str(), LazyView { tensor: t, failure: &failure }));
    let written = safetensors::serialize_to_file(views, Some(metadata), &tmp);
    let failed = failure.into_inner();
    if written.is_err() || failed.is_some() {
        let _ = std::fs::remove_file(&tmp);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    written.map_err(|e| ModelError::Safetensors { path: tmp.clone(), reason: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::write(path, e))
}

fn storage_dtype(dtype: StorageDtype) -> Dtype {
    match dtype {
        StorageDtype::Float32 => Dtype::F32,
        StorageDtype::Bfloat16 => Dtype::BF16,
        StorageDtype::Float16 => Dtype::F16,
    }
}

/// Like [`write_safetensors`], fetching each tensor of `layout` from `source` and encoding it
/// before the next is fetched, so only the encoded model and one f32 tensor are in memory.
pub(crate) fn write_safetensors_streamed(
    dir: &Path,
    layout: &[(String, Vec<usize>)],
    source: &mut dyn WeightSource,
    dtype: StorageDtype,
) -> Result<()> {
    let mut encoded = Vec::with_capacity(layout.len());
    for (name, shape) in layout {
        let values = source.fetch(name, shape)?;
        encoded.push(encode(name, shape, &values, dtype));
    }
    serialize_atomic(dir, &encoded)
}

fn serialize_atomic(dir: &Path, encoded: &[Encoded]) -> Result<()> {
    let lazy: Vec<LazyTensor<'_>> = encoded
        .iter()
        .map(|(name, dtype, shape, bytes)| LazyTensor { name: name.clone(), dtype: *dtype, shape: shape.clone(), bytes: Box::new(move || Ok(bytes.clone())) })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors_lazily(&dir.join("model.safetensors"), &lazy, metadata)
}

/// Every tensor of a model with this config: HF name and HF shape (`[out, in]` for linears).
pub(crate) fn hf_layout(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, d) = (c.hidden_size, c.head_dim);
    let (q, kv, ffn) = (c.num_attention_heads * d, c.num_key_value_heads * d, c.intermediate_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h])];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut push = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
        push("self_attn.q_proj.weight", vec![q, h]);
        push("self_attn.k_proj.weight", vec![kv, h]);
        push("self_attn.v_proj.weight", vec![kv, h]);
        if c.attention_bias {
            push("self_attn.q_proj.bias", vec![q]);
            push("self_attn.k_proj.bias", vec![kv]);
            push("self_attn.v_proj.bias", vec![kv]);
        }
        push("self_attn.o_proj.weight", vec![h, q]);
        push("mlp.gate_proj.weight", vec![ffn, h]);
        push("mlp.up_proj.weight", vec![ffn, h]);
        push("mlp.down_proj.weight", vec![h, ffn]);
        push("input_layernorm.weight", vec![h]);
        push("post_attention_layernorm.weight", vec![h]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    out
}

/// Writes `contents` to `path` through a temp file and a rename, so readers never see half a file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    std::fs::write(&tmp, contents).map_err(|e| ModelError::write(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::write(path, e))
}

/// Where a file is written before it is renamed into place: `.NAME.tmp` beside it.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp"))
}

/// `[rows, cols]` → `[cols, rows]` (HF `[out, in]` ↔ burn `[in, out]`).
pub(crate) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_says_write_and_names_the_file() {
        let dir = std::env::temp_dir().join(format!("thinkjson-no-such-dir-{}", std::process::id()));
        let path = dir.join("bench.json");
        let err = write_atomic(&path, b"{}").map(|_| ()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with("cannot write "), "{err}");
        assert!(err.contains(".bench.json.tmp"), "{err}");
    }

    /// The lazy writer's file is byte for byte what `safetensors::serialize` makes of the
    /// same tensors; a tensor that cannot be read fails the write by name and leaves neither
    /// the file nor its temp file.
    #[test]
    fn lazy_writes_equal_serialize_and_a_failed_tensor_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("state.safetensors");
        let values: Vec<Vec<f32>> = vec![vec![1.0, -2.5, 3.25], vec![0.5; 8], vec![7.0]];
        let bytes: Vec<Vec<u8>> = values.iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let names = ["b.1", "a.0", "c.2"];
        let metadata = HashMap::from([("steps".to_string(), "3".to_string())]);
        let lazy: Vec<LazyTensor<'_>> = names
            .iter()
            .zip(&bytes)
            .map(|(n, b)| LazyTensor { name: n.to_string(), dtype: Dtype::F32, shape: vec![b.len() / 4], bytes: Box::new(move || Ok(b.clone())) })
            .collect();
        write_safetensors_lazily(&path, &lazy, metadata.clone()).unwrap_or_else(|e| panic!("{e}"));
        let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = names
            .iter()
            .zip(&bytes)
            .map(|(n, b)| (*n, safetensors::tensor::TensorView::new(Dtype::F32, vec![b.len() / 4], b).unwrap_or_else(|e| panic!("{e}"))))
            .collect();
        let expected = safetensors::serialize(views, Some(metadata.clone())).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::read(&path).unwrap_or_else(|e| panic!("{e}")), expected);

        let broken = dir.path().join("broken.safetensors");
        let mut failing = lazy;
        failing[1].bytes = Box::new(|| Err(ModelError::Input("a.0: cannot read tensor back".into())));
        let err = write_safetensors_lazily(&broken, &failing, metadata).map(|_| ()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("a.0"), "{err}");
        assert!(!broken.exists() && !dir.path().join(".broken.safetensors.tmp").exists());
    }
}
