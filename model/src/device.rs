//! Backends and device selection: a CPU backend by default, CUDA behind the `cuda` feature,
//! probed before use so a machine without a GPU gets an error instead of a panic.

use std::fmt;
use std::str::FromStr;

use crate::error::{ModelError, Result};

#[cfg(not(any(feature = "flex", feature = "ndarray")))]
compile_error!("thinkjson-model needs a CPU backend: enable the `flex` (default) or `ndarray` feature");

/// The CPU backend (Flex by default; chosen by measurement, see the README).
#[cfg(feature = "flex")]
pub type CpuBackend = burn::backend::Flex;
#[cfg(all(feature = "ndarray", not(feature = "flex")))]
pub type CpuBackend = burn::backend::NdArray;

/// The CPU backend with automatic differentiation, for training.
pub type CpuTrainBackend = burn::backend::Autodiff<CpuBackend>;

/// CUDA in f32.
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32, i32>;
/// CUDA in bf16 (no autocast: weights and activations are bf16).
#[cfg(feature = "cuda")]
pub type CudaBf16Backend = burn::backend::Cuda<half::bf16, i32>;

/// Where a model runs, as written on the command line: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| {
                    ModelError::Device(format!("`{s}`: expected cuda:N with N a GPU index"))
                }),
                None => Err(ModelError::Device(format!(
                    "unknown device `{s}` (expected cpu, cuda or cuda:N)"
                ))),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Checks that CUDA GPU `index` can be used, without initialising burn's CUDA runtime
/// (which panics when there is no driver).
pub fn probe_cuda(index: usize) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to dlopen libcuda; no CUDA call is made if it is absent.
        let present = unsafe { cudarc::driver::sys::is_culib_present() };
        if !present {
            return Err(ModelError::Device(
                "CUDA requested but no NVIDIA driver (libcuda) was found on this machine; use --device cpu".into(),
            ));
        }
        let count = cudarc::driver::CudaContext::device_count()
            .map_err(|e| ModelError::Device(format!("CUDA driver present but unusable: {e:?}")))?;
        if index as i64 >= count as i64 {
            return Err(ModelError::Device(format!(
                "cuda:{index} requested but {count} CUDA device(s) are visible"
            )));
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(ModelError::Device(format!(
            "cuda:{index} requested but this binary was built without the `cuda` feature \
             (rebuild with `--features cuda`); use --device cpu"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().to_string().contains("tpu"));
    }

    #[test]
    fn cuda_probe_fails_cleanly_without_gpu() {
        // This machine class has no GPU: the probe must answer with an error, not panic.
        if std::path::Path::new("/dev/nvidia0").exists() {
            return;
        }
        let err = probe_cuda(0).unwrap_err().to_string();
        assert!(err.contains("cuda"), "{err}");
    }
}
