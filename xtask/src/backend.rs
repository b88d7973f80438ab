//! Runs a backend-generic job on the device the user asked for.

use anyhow::Result;
use thinkjson_model::burn::tensor::backend::{AutodiffBackend, Backend};
use thinkjson_model::{probe_cuda, CpuBackend, CpuTrainBackend, DeviceSpec};

/// A job written once for any backend.
pub trait OnBackend {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Picks the backend for `spec`; CUDA is probed first so a missing GPU is an error, not a panic.
pub fn dispatch<J: OnBackend>(spec: DeviceSpec, job: J) -> Result<J::Output> {
    match spec {
        DeviceSpec::Cpu => job.run::<CpuBackend>(Default::default()),
        DeviceSpec::Cuda(index) => {
            probe_cuda(index)?;
            #[cfg(feature = "cuda")]
            {
                use thinkjson_model::burn::backend::cuda::CudaDevice;
                job.run::<thinkjson_model::CudaBackend>(CudaDevice::new(index))
            }
            #[cfg(not(feature = "cuda"))]
            unreachable!("probe_cuda fails without the cuda feature")
        }
    }
}

/// A training job written once for any autodiff backend.
pub trait OnTrainBackend {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// [`dispatch`] for training: CPU (`Autodiff<Flex>`) or CUDA (`Autodiff<Cuda>`), probed first.
pub fn dispatch_train<J: OnTrainBackend>(spec: DeviceSpec, job: J) -> Result<J::Output> {
    match spec {
        DeviceSpec::Cpu => job.run::<CpuTrainBackend>(Default::default()),
        DeviceSpec::Cuda(index) => {
            probe_cuda(index)?;
            #[cfg(feature = "cuda")]
            {
                use thinkjson_model::burn::backend::cuda::CudaDevice;
                job.run::<thinkjson_model::burn::backend::Autodiff<thinkjson_model::CudaBackend>>(CudaDevice::new(index))
            }
            #[cfg(not(feature = "cuda"))]
            unreachable!("probe_cuda fails without the cuda feature")
        }
    }
}
