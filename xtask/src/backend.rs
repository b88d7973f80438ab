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
pub trait OnTrainBackend: Sized {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;
    /// The job data-parallel over several devices of one backend (one peer per device). Jobs
    /// that train on one device only refuse more.
    fn run_group<B: AutodiffBackend>(self, mut devices: Vec<B::Device>) -> Result<Self::Output> {
        match devices.len() {
            1 => self.run::<B>(devices.remove(0)),
            n => anyhow::bail!("this command trains on one device; {n} were given (--devices)"),
        }
    }
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

/// [`dispatch_train`] over a group of devices: all CPU peers (`cpu,cpu`: threads of this
/// process) or all CUDA devices, each index once, every one probed first.
pub fn dispatch_train_group<J: OnTrainBackend>(specs: &[DeviceSpec], job: J) -> Result<J::Output> {
    match specs {
        [] => anyhow::bail!("no device given"),
        [one] => dispatch_train(*one, job),
        _ if specs.iter().all(|s| *s == DeviceSpec::Cpu) => job.run_group::<CpuTrainBackend>(vec![Default::default(); specs.len()]),
        _ => {
            let mut indices = Vec::new();
            for spec in specs {
                let DeviceSpec::Cuda(index) = *spec else {
                    anyhow::bail!("--devices mixes cpu and cuda ({}); a group is all one kind", join(specs));
                };
                if indices.contains(&index) {
                    anyhow::bail!("--devices names cuda:{index} twice ({})", join(specs));
                }
                probe_cuda(index)?;
                indices.push(index);
            }
            #[cfg(feature = "cuda")]
            {
                use thinkjson_model::burn::backend::cuda::CudaDevice;
                job.run_group::<thinkjson_model::burn::backend::Autodiff<thinkjson_model::CudaBackend>>(indices.into_iter().map(CudaDevice::new).collect())
            }
            #[cfg(not(feature = "cuda"))]
            unreachable!("probe_cuda fails without the cuda feature")
        }
    }
}

fn join(specs: &[DeviceSpec]) -> String {
    specs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The devices of a run: `devices` when given (a data-parallel group), else `device` alone.
pub fn device_group(device: &str, devices: &[String]) -> Result<Vec<DeviceSpec>> {
    if devices.is_empty() {
        return Ok(vec![device.parse()?]);
    }
    devices.iter().map(|d| Ok(d.parse()?)).collect()
}

/// Runs `peer(rank, device, collective)` for this process's share of a run and returns rank
/// 0's result (or, in a launched process, this process's): one peer on one device alone, one
/// peer of a multi-process run started by `cargo xtask launch`, or one thread per device in
/// an in-process group.
pub fn run_peers<B, T, F>(stage: &str, devices: &[B::Device], peer: F) -> Result<T>
where
    B: AutodiffBackend,
    T: Send,
    F: Fn(usize, &B::Device, &mut dyn thinkjson_model::train::Collective<B::InnerBackend>) -> Result<T> + Sync,
{
    let first = devices.first().ok_or_else(|| anyhow::anyhow!("no device given"))?;
    let mut outcomes = if let Some(rendezvous) = crate::launch::current() {
        if devices.len() != 1 {
            anyhow::bail!("a launched process is one peer on one device; --devices groups the devices of one process");
        }
        let mut tcp = crate::launch::TcpPeer::join(rendezvous)?;
        vec![peer(rendezvous.rank, first, &mut tcp)?]
    } else if devices.len() == 1 {
        vec![peer(0, first, &mut thinkjson_model::train::Solo)?]
    } else {
        eprintln!("{stage}: data-parallel over {} peers", devices.len());
        thinkjson_model::train::run_in_process::<B::InnerBackend, _, _, _>(devices, peer)?
    };
    Ok(outcomes.swap_remove(0))
}

/// The model to train: an HF directory, a GGUF file or an embedded model name (see
/// [`crate::model_ref`]), or seeded random weights of a preset sized for the tokenizer's
/// vocabulary.
pub fn load_or_init<B: Backend>(
    model: Option<&std::path::Path>,
    adapter: Option<&std::path::Path>,
    preset: Option<&str>,
    init_seed: u64,
    tokenizer: &thinkjson_model::Tokenizer,
    device: &B::Device,
) -> Result<thinkjson_model::CausalLm<B>> {
    use thinkjson_model::{CausalLm, ModelConfig};
    match (model, preset) {
        (Some(arg), _) => crate::model_ref::load::<B>(&crate::model_ref::open(arg)?, adapter, device),
        (None, Some(_)) if adapter.is_some() => anyhow::bail!("an adapter needs its base model: set `model`, not `preset`"),
        (None, Some(preset)) => {
            let config = ModelConfig::preset(preset)?.with_vocab_size(tokenizer.vocab_size());
            Ok(CausalLm::<B>::random(&config, init_seed, device)?)
        }
        (None, None) => anyhow::bail!("no model: set `model` (an HF directory, a GGUF file or an embedded model name) or `preset` in the config, or pass --model / --preset"),
    }
}

/// The directory whose tokenizer files a run uses and copies into its checkpoints: the
/// model's own (a GGUF file's rebuilt under `scratch`), else `fallback` (presets).
pub fn tokenizer_dir(model: Option<&std::path::Path>, fallback: &std::path::Path, scratch: &std::path::Path) -> Result<std::path::PathBuf> {
    let Some(arg) = model else { return Ok(fallback.to_path_buf()) };
    let pretrained = crate::model_ref::open(arg)?;
    match &pretrained {
        thinkjson_model::Pretrained::HfDir(dir) if !dir.join("tokenizer.json").exists() => Ok(fallback.to_path_buf()),
        _ => crate::model_ref::tokenizer_dir(&pretrained, &scratch.join("base-tokenizer")),
    }
}

/// The tokenizer files copied into every checkpoint, so each is a complete model directory.
pub fn tokenizer_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    ["tokenizer.json", "tokenizer_config.json"].iter().map(|f| dir.join(f)).filter(|p| p.exists()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports how many devices the group got.
    struct Count;
    impl OnTrainBackend for Count {
        type Output = usize;
        fn run<B: AutodiffBackend>(self, _device: B::Device) -> Result<usize> {
            Ok(1)
        }
        fn run_group<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<usize> {
            Ok(devices.len())
        }
    }

    /// Uses the default `run_group`: one device only.
    struct Single;
    impl OnTrainBackend for Single {
        type Output = ();
        fn run<B: AutodiffBackend>(self, _device: B::Device) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn device_groups_are_parsed_and_checked() {
        let cpus = device_group("cpu", &["cpu".into(), "cpu".into(), "cpu".into()]).unwrap();
        assert_eq!(dispatch_train_group(&cpus, Count).unwrap(), 3);
        assert_eq!(device_group("cuda:1", &[]).unwrap(), vec![DeviceSpec::Cuda(1)]);
        let bad = device_group("cpu", &["cpu".into(), "tpu".into()]).unwrap_err().to_string();
        assert!(bad.contains("tpu"), "{bad}");
        let mixed = dispatch_train_group(&[DeviceSpec::Cpu, DeviceSpec::Cuda(0)], Count).unwrap_err().to_string();
        assert!(mixed.contains("mixes cpu and cuda"), "{mixed}");
        let single = dispatch_train_group(&cpus, Single).unwrap_err().to_string();
        assert!(single.contains("one device") && single.contains('3'), "{single}");
    }
}
