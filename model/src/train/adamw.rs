//! AdamW with torch's semantics, clipping by the global gradient norm, and a state that
//! can be saved and restored exactly.
//!
//! burn's own `AdamW` applies weight decay to every tensor and clips gradients per tensor;
//! trainers users compare us with (transformers, TRL) decay only matrices and clip by the
//! norm over all parameters together. This one does what they do.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Hyper-parameters, with torch's defaults (burn's differ: eps 1e-5, weight decay 1e-4).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled decay, applied to matrices (rank ≥ 2) only: not to norms or biases.
    pub weight_decay: f64,
    /// Clip the global L2 norm of all gradients to this; `None` (or ≤ 0) disables clipping.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// Factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f64,
    pub lr: f64,
}

type InnerDevice<B> = <<B as AutodiffBackend>::InnerBackend as burn::tensor::backend::BackendTypes>::Device;

type Moments<B> = (Tensor<B, 1>, Tensor<B, 1>);

/// The optimiser: first and second moments per parameter, kept in the order burn visits
/// the module's parameters (stable for a given architecture, so a saved state reloads into
/// a freshly built model whose parameter ids differ).
pub struct AdamW<B: AutodiffBackend> {
    pub config: AdamWConfig,
    /// Optimiser steps taken (torch's `state["step"]`).
    pub steps: u64,
    moments: Vec<Option<Moments<B::InnerBackend>>>,
}

impl<B: AutodiffBackend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            steps: 0,
            moments: Vec::new(),
        }
    }

    /// Global L2 norm of `grads` over every parameter of `model`.
    pub fn grad_norm<M: AutodiffModule<B>>(model: &M, grads: &GradientsParams) -> f64 {
        let mut visitor = SquaredNorm::<B> { grads, total: None };
        model.visit(&mut visitor);
        visitor.total.map_or(0.0, |t| t.into_scalar().elem::<f64>().sqrt())
    }

    /// One update with learning rate `lr`. Non-finite gradients are an error and leave the
    /// model and the optimiser state untouched.
    pub fn step<M: AutodiffModule<B>>(&mut self, lr: f64, model: M, grads: GradientsParams) -> Result<(M, StepReport)> {
        let grad_norm = Self::grad_norm(&model, &grads);
        self.step_with_norm(lr, model, grads, grad_norm)
    }

    /// [`AdamW::step`] with the global norm already measured: data-parallel peers clip by one
    /// agreed value (a parallel sum on two peers can differ in its last bit).
    pub fn step_with_norm<M: AutodiffModule<B>>(&mut self, lr: f64, model: M, mut grads: GradientsParams, grad_norm: f64) -> Result<(M, StepReport)> {
        if !grad_norm.is_finite() {
            return Err(ModelError::NonFinite(format!(
                "gradient norm is {grad_norm} at optimiser step {}",
                self.steps + 1
            )));
        }
        let clip_scale = match self.config.max_grad_norm {
            // torch's clip_grad_norm_: max_norm / (norm + 1e-6), capped at 1.
            Some(max) if max > 0.0 => (max / (grad_norm + 1e-6)).min(1.0),
            _ => 1.0,
        };
        self.steps += 1;
        let t = self.steps as i32;
        let mut mapper = Update::<B> {
            config: self.config,
            lr,
            clip_scale,
            bias1: 1.0 - self.config.beta1.powi(t),
            bias2: 1.0 - self.config.beta2.powi(t),
            grads: &mut grads,
            moments: &mut self.moments,
            index: 0,
        };
        let model = model.map(&mut mapper);
        Ok((
            model,
            StepReport {
                grad_norm,
                clip_scale,
                lr,
            },
        ))
    }

    /// Writes the step count and moments as safetensors (`m.{i}`, `v.{i}` by parameter
    /// order, names in the metadata), atomically.
    pub fn save<M: AutodiffModule<B>>(&self, model: &M, path: &Path) -> Result<()> {
        let params = param_layout(model);
        // Each moment is read back and encoded when the writer reaches it: one tensor's bytes
        // in memory at a time, not a second copy of the state (2 × the parameters in f32).
        let mut tensors = Vec::new();
        for (i, slot) in self.moments.iter().enumerate() {
            if let Some((m, v)) = slot {
                for (kind, t) in [("m", m), ("v", v)] {
                    tensors.push(crate::weights::LazyTensor {
                        name: format!("{kind}.{i}"),
                        dtype: safetensors::Dtype::F32,
                        shape: vec![t.shape().num_elements()],
                        bytes: Box::new(move || {
                            let values = t
                                .clone()
                                .into_data()
                                .convert::<f32>()
                                .to_vec::<f32>()
                                .map_err(|e| ModelError::Input(format!("optimiser state {kind}.{i}: {e:?}")))?;
                            Ok(values.iter().flat_map(|x| x.to_le_bytes()).collect())
                        }),
                    });
                }
            }
        }
        let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        let metadata = HashMap::from([
            ("steps".to_string(), self.steps.to_string()),
            ("config".to_string(), serde_json::to_string(&self.config).unwrap_or_default()),
            ("params".to_string(), serde_json::to_string(&names).unwrap_or_default()),
        ]);
        crate::weights::write_safetensors_lazily(path, &tensors, metadata)
    }

    /// Restores what [`AdamW::save`] wrote, onto `model`'s device, checking that every
    /// moment matches its parameter's name and size. The hyper-parameters stay those of `self`.
    pub fn load<M: AutodiffModule<B>>(&mut self, model: &M, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let bad = |reason: String| ModelError::Safetensors { path: path.to_path_buf(), reason };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let steps: u64 = meta
            .get("steps")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("metadata has no `steps`".into()))?;
        let saved_names: Vec<String> = meta
            .get("params")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("metadata has no `params`".into()))?;
        let params = param_layout(model);
        let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        if saved_names != names {
            return Err(bad(format!(
                "saved for {} parameters that do not match this model's {} (first: {:?} vs {:?})",
                saved_names.len(),
                names.len(),
                saved_names.first(),
                names.first()
            )));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let read = |name: &str, size: usize, device: &InnerDevice<B>| -> Result<Option<Tensor<B::InnerBackend, 1>>> {
            let view = match st.tensor(name) {
                Ok(v) => v,
                Err(_) => return Ok(None),
            };
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != [size] {
                return Err(bad(format!("{name}: expected f32 [{size}], found {:?} {:?}", view.dtype(), view.shape())));
            }
            let values: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Ok(Some(Tensor::from_data(TensorData::new(values, [size]), device)))
        };
        let mut moments = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            let m = read(&format!("m.{i}"), p.size, &p.device)?;
            let v = read(&format!("v.{i}"), p.size, &p.device)?;
            moments.push(match (m, v) {
                (Some(m), Some(v)) => Some((m, v)),
                (None, None) => None,
                _ => return Err(bad(format!("parameter {} has only one of its two moments", p.name))),
            });
        }
        self.steps = steps;
        self.moments = moments;
        Ok(())
    }
}

struct ParamInfo<D> {
    name: String,
    size: usize,
    device: D,
}

/// Name (module path), element count and device of every float parameter, in visiting order.
fn param_layout<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> Vec<ParamInfo<InnerDevice<B>>> {
    struct Layout<B: AutodiffBackend> {
        path: Vec<String>,
        out: Vec<ParamInfo<InnerDevice<B>>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Layout<B> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            self.out.push(ParamInfo {
                name: self.path.join("."),
                size: t.shape().num_elements(),
                device: t.inner().device(),
            });
        }
    }
    let mut v = Layout::<B> { path: Vec::new(), out: Vec::new() };
    model.visit(&mut v);
    v.out
}

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq = g.reshape([-1]).powi_scalar(2).sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + sq,
                None => sq,
            });
        }
    }
}

struct Update<'a, B: AutodiffBackend> {
    config: AdamWConfig,
    lr: f64,
    clip_scale: f64,
    bias1: f64,
    bias2: f64,
    grads: &'a mut GradientsParams,
    moments: &'a mut Vec<Option<Moments<B::InnerBackend>>>,
    index: usize,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Update<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let index = self.index;
        self.index += 1;
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let c = self.config;
        let shape = tensor.shape();
        let require_grad = tensor.is_require_grad();
        let mut p = tensor.inner().reshape([-1]);
        let mut g = grad.reshape([-1]);
        if self.clip_scale < 1.0 {
            g = g.mul_scalar(self.clip_scale);
        }
        if self.moments.len() <= index {
            self.moments.resize_with(index + 1, || None);
        }
        let (m, v) = match self.moments[index].take() {
            Some((m, v)) => (m, v),
            None => (g.zeros_like(), g.zeros_like()),
        };
        // torch.optim.AdamW (non-fused): decay first, then the Adam step.
        let m = m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
        let v = v.mul_scalar(c.beta2) + g.powi_scalar(2).mul_scalar(1.0 - c.beta2);
        if D >= 2 && c.weight_decay != 0.0 {
            p = p.mul_scalar(1.0 - self.lr * c.weight_decay);
        }
        let denom = v.clone().sqrt().div_scalar(self.bias2.sqrt()).add_scalar(c.eps);
        p = p - m.clone().div(denom).mul_scalar(self.lr / self.bias1);
        self.moments[index] = Some((m, v));
        let mut updated = Tensor::from_inner(p.reshape(shape));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}
