//! GGUF files (llama.cpp, Ollama, LM Studio): the v2/v3 container, typed metadata, tensor
//! infos, dequantization to f32 ([`quants`]), the mapping of `llama`/`qwen2` models to our
//! [`ModelConfig`](crate::ModelConfig) and HF tensor names ([`hf`]), and the tokenizer and
//! chat template stored in the metadata ([`tokenizer`]).
//!
//! Only the header is read when a file is opened; tensor bytes are read one tensor at a time
//! when asked for, so peak memory is the model being built plus one tensor.

pub mod hf;
pub mod quants;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
pub use quants::{dequantize, GgmlType};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value (GGUF's typed key-value store).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer type that fits a `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F32(_) => "f32",
            Self::F64(_) => "f64",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: innermost (contiguous) dimension first — the reverse of PyTorch's shape.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape as PyTorch / safetensors write it (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn elements(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }
}

/// An opened GGUF file: its metadata and tensor table (tensor data stays on disk).
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
}

impl GgufFile {
    /// Reads and checks the header: magic, version, metadata, tensor infos, and that every
    /// tensor of a known type lies inside the file (a truncated file fails here, naming the
    /// first tensor it cuts).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let mut r = Reader {
            inner: BufReader::with_capacity(1 << 16, file),
            path,
            len,
            pos: 0,
        };
        let mut magic = [0u8; 4];
        r.bytes_into(&mut magic, "the magic number")?;
        if &magic != MAGIC {
            return Err(gguf_error(
                path,
                format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\" (47 47 55 46)"),
            ));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(gguf_error(path, format!("GGUF version {version} is not supported (2 or 3)")));
        }
        let tensor_count = r.u64("the tensor count")?;
        let kv_count = r.u64("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("metadata key {i}"))?;
            let ty = r.u32(&format!("the type of metadata `{key}`"))?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        // Each tensor info takes at least 24 bytes: a bound before allocating.
        if tensor_count > len / 24 {
            return Err(gguf_error(path, format!("claims {tensor_count} tensors, more than a {len}-byte file can hold")));
        }
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let name = r.string(&format!("the name of tensor {i}"))?;
            let n_dims = r.u32(&format!("the dimension count of tensor `{name}`"))?;
            if n_dims > 8 {
                return Err(gguf_error(path, format!("tensor `{name}` claims {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64(&format!("the shape of tensor `{name}`")))
                .collect::<Result<Vec<_>>>()?;
            let ty = GgmlType::from_id(r.u32(&format!("the type of tensor `{name}`"))?);
            let offset = r.u64(&format!("the offset of tensor `{name}`"))?;
            tensors.push(TensorInfo { name, dims, ty, offset });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(gguf_error(path, format!("general.alignment {v:?} is not a power of two"))),
            },
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let gguf = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
        };
        gguf.check_extents(len)?;
        Ok(gguf)
    }

    fn check_extents(&self, len: u64) -> Result<()> {
        for t in &self.tensors {
            let elements = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let Some(elements) = elements.and_then(|e| usize::try_from(e).ok()) else {
                return Err(gguf_error(&self.path, format!("tensor `{}` has an impossible shape {:?}", t.name, t.dims)));
            };
            let Ok(bytes) = t.ty.byte_size(elements) else {
                continue; // an unreadable type is reported when the tensor is asked for
            };
            let end = self.data_start.saturating_add(t.offset).saturating_add(bytes as u64);
            if end > len {
                return Err(gguf_error(
                    &self.path,
                    format!("truncated: tensor `{}` needs bytes up to {end}, the file has {len}", t.name),
                ));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required string, or an error naming the key.
    pub fn str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(v) => v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v)),
            None => Err(self.missing(key)),
        }
    }

    /// An optional unsigned integer.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            Some(v) => v.as_u64().map(Some).ok_or_else(|| self.wrong_type(key, "an unsigned integer", v)),
            None => Ok(None),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong_type(key, "a number", v)),
            None => Ok(None),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong_type(key, "a boolean", v)),
            None => Ok(None),
        }
    }

    /// An optional array of strings.
    pub fn opt_strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let items = v.as_array().ok_or_else(|| self.wrong_type(key, "an array of strings", v))?;
        items
            .iter()
            .map(|i| i.as_str().ok_or_else(|| self.wrong_type(key, "an array of strings", i)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>> {
        let bytes = info
            .ty
            .byte_size(info.elements())
            .map_err(|reason| gguf_error(&self.path, format!("tensor `{}`: {reason}", info.name)))?;
        let mut file = File::open(&self.path).map_err(|e| ModelError::io(&self.path, e))?;
        file.seek(SeekFrom::Start(self.data_start + info.offset))
            .map_err(|e| ModelError::io(&self.path, e))?;
        let mut buf = vec![0u8; bytes];
        file.read_exact(&mut buf).map_err(|e| {
            gguf_error(&self.path, format!("tensor `{}`: cannot read its {bytes} bytes: {e}", info.name))
        })?;
        Ok(buf)
    }

    /// A tensor dequantized to f32, in GGUF's (row-major, innermost-first) element order.
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let bytes = self.tensor_bytes(info)?;
        dequantize(info.ty, &bytes, info.elements())
            .map_err(|reason| gguf_error(&self.path, format!("tensor `{}`: {reason}", info.name)))
    }

    pub(crate) fn missing(&self, key: &str) -> ModelError {
        gguf_error(&self.path, format!("metadata `{key}` is missing"))
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &MetaValue) -> ModelError {
        gguf_error(&self.path, format!("metadata `{key}`: expected {expected}, found {}", found.type_name()))
    }

    pub(crate) fn error(&self, reason: impl Into<String>) -> ModelError {
        gguf_error(&self.path, reason.into())
    }
}

pub(crate) fn gguf_error(path: &Path, reason: String) -> ModelError {
    ModelError::Gguf {
        path: path.to_path_buf(),
        reason,
    }
}

/// Little-endian reads that name what they were reading when the file ends early.
struct Reader<'a> {
    inner: BufReader<File>,
    path: &'a Path,
    len: u64,
    pos: u64,
}

/// Arrays nest at most this deep (GGUF writers use one level).
const MAX_NESTING: usize = 4;

impl Reader<'_> {
    fn bytes_into(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| {
            let reason = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                format!("truncated: the file ends at byte {} while reading {what}", self.len)
            } else {
                format!("reading {what}: {e}")
            };
            gguf_error(self.path, reason)
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.bytes_into(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length that must fit in what is left of the file (`unit` bytes per item at least).
    fn length(&mut self, what: &str, unit: u64) -> Result<usize> {
        let n = self.u64(what)?;
        let left = self.len.saturating_sub(self.pos);
        if n.saturating_mul(unit) > left {
            return Err(gguf_error(
                self.path,
                format!("truncated or corrupt: {what} claims {n} items, only {left} bytes are left"),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.length(what, 1)?;
        let mut buf = vec![0u8; n];
        self.bytes_into(&mut buf, what)?;
        String::from_utf8(buf).map_err(|_| gguf_error(self.path, format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        let what = format!("metadata `{key}`");
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(&what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(gguf_error(self.path, format!("{what}: boolean byte {b}"))),
            },
            8 => MetaValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(gguf_error(self.path, format!("{what}: arrays nested deeper than {MAX_NESTING}")));
                }
                let item_ty = self.u32(&what)?;
                let n = self.length(&what, 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(gguf_error(self.path, format!("{what}: unknown value type {other}"))),
        })
    }
}
