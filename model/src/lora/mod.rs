//! LoRA (Hu et al., 2021) on the decoder's seven linear projections, as PEFT does it:
//! `y = x·W (+ b) + (alpha / r)·(dropout(x)·A)·B` with `W` frozen, `A` drawn like PEFT's
//! default (`kaiming_uniform(a = √5)`, i.e. U(−1/√in, 1/√in)), `B = 0`, and optional rsLoRA
//! scaling `alpha / √r`. Only `A` and `B` carry gradients, so the optimiser keeps state for
//! them alone.
//!
//! [`peft`] reads and writes PEFT's on-disk format (`adapter_config.json` +
//! `adapter_model.safetensors`); [`CausalLm::merge_lora`] folds the adapters into the base
//! weights for a plain HF model.

pub mod peft;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::layers::Projection;
use crate::model::CausalLm;

/// The projections LoRA can wrap, by PEFT's (= the HF module's) name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// PEFT's `target_modules` name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`, …).
    pub fn path(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

fn default_targets() -> Vec<String> {
    Target::ALL.iter().map(|t| t.name().to_string()).collect()
}

/// LoRA hyper-parameters (PEFT's `LoraConfig` names in `adapter_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of `A·B`. Default 16.
    pub r: usize,
    /// Scale numerator: the update is multiplied by `alpha / r` (`alpha / √r` with rsLoRA).
    /// Default 32 (2·r, the common choice).
    pub alpha: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`). Default 0.
    pub dropout: f64,
    /// Which projections get adapters: any of q_proj, k_proj, v_proj, o_proj, gate_proj,
    /// up_proj, down_proj, or `all-linear` for all seven. Default: all seven.
    pub target_modules: Vec<String>,
    /// rsLoRA (Kalajdzievski, 2023): scale by `alpha / √r`, stable at high ranks. Default false.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: default_targets(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The adapter's output scale.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The targets, in the decoder's order; an unknown name is an error that names it.
    pub fn targets(&self) -> Result<Vec<Target>> {
        let mut out = Vec::new();
        for name in &self.target_modules {
            if name == "all-linear" {
                out.extend(Target::ALL);
                continue;
            }
            let target = Target::from_name(name).ok_or_else(|| {
                ModelError::config(
                    "lora.target_modules",
                    format!("`{name}` is not a projection of this decoder (known: {}, all-linear)", default_targets().join(", ")),
                )
            })?;
            out.push(target);
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err(ModelError::config("lora.target_modules", "is empty: name at least one projection"));
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(ModelError::config("lora.r", "must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(ModelError::config("lora.alpha", format!("{} (need a positive number)", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::config("lora.dropout", format!("{} (need 0 ≤ dropout < 1)", self.dropout)));
        }
        self.targets().map(|_| ())
    }
}

/// The low-rank pair of one projection, burn layout: `a` is `[in, r]`, `b` is `[r, out]`
/// (PEFT's `lora_A.weight` is `[r, in]` and `lora_B.weight` `[out, r]`).
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    pub a: Param<Tensor<B, 2>>,
    pub b: Param<Tensor<B, 2>>,
    #[module(skip)]
    pub scale: f64,
    #[module(skip)]
    pub dropout: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// `s·(drop(x)·A)·B` for `[batch, seq, in]`, as two 2-D GEMMs through the rank.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let mut x = x.reshape([b * s, d]);
        // Dropout only while training (an autodiff backend), as PEFT's module in train mode.
        if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = 1.0 - self.dropout;
            let mask = x.random_like(Distribution::Bernoulli(keep));
            x = x * mask / keep;
        }
        let y = x.matmul(self.a.val()).matmul(self.b.val()) * self.scale;
        let out = y.dims()[1];
        y.reshape([b, s, out])
    }
}

impl<B: Backend> CausalLm<B> {
    /// Every projection LoRA can wrap: layer index, target, projection — in the decoder's order.
    pub(crate) fn projections(&self) -> Vec<(usize, Target, &Projection<B>)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter().enumerate() {
            let a = &l.self_attn;
            let m = &l.mlp;
            for (t, p) in [
                (Target::Q, &a.q_proj),
                (Target::K, &a.k_proj),
                (Target::V, &a.v_proj),
                (Target::O, &a.o_proj),
                (Target::Gate, &m.gate_proj),
                (Target::Up, &m.up_proj),
                (Target::Down, &m.down_proj),
            ] {
                out.push((i, t, p));
            }
        }
        out
    }

    /// Every projection, mutably, in the decoder's order.
    pub(crate) fn projections_mut(&mut self) -> Vec<(usize, Target, &mut Projection<B>)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            for (t, p) in [
                (Target::Q, &mut a.q_proj),
                (Target::K, &mut a.k_proj),
                (Target::V, &mut a.v_proj),
                (Target::O, &mut a.o_proj),
                (Target::Gate, &mut m.gate_proj),
                (Target::Up, &mut m.up_proj),
                (Target::Down, &mut m.down_proj),
            ] {
                out.push((i, t, p));
            }
        }
        out
    }

    /// Freezes every base weight and adds fresh adapters to the configured projections:
    /// `A` ~ U(−1/√in, 1/√in) from `seed` (the same on every machine), `B = 0`, so the
    /// model's outputs are unchanged until the first update.
    pub fn with_lora(self, config: &LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        if self.lora.is_some() {
            return Err(ModelError::Input("the model already has LoRA adapters; merge them first".into()));
        }
        let targets = config.targets()?;
        let device = self.device();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4C6F_5241_0000_0001);
        let (r, scale, dropout) = (config.r, config.scale(), config.dropout);
        let mut model = self.no_grad();
        for (_, t, p) in model.projections_mut() {
            if targets.contains(&t) {
                let [d_in, d_out] = p.dims();
                let bound = 1.0 / (d_in as f32).sqrt();
                let a: Vec<f32> = (0..d_in * r).map(|_| rng.random_range(-bound..bound)).collect();
                p.lora = Some(LoraAdapter {
                    a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [d_in, r]), &device)),
                    b: Param::from_tensor(Tensor::zeros([r, d_out], &device)),
                    scale,
                    dropout,
                });
            }
        }
        model.lora = Some(config.clone());
        Ok(model)
    }

    /// The LoRA settings of the attached adapters, if any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// The base model: adapters removed, base weights shared (no copy). GRPO's reference.
    pub fn without_lora(mut self) -> Self {
        for (_, _, p) in self.projections_mut() {
            p.lora = None;
        }
        self.lora = None;
        self
    }

    /// Folds every adapter into its base weight, `W ← W + s·A·B`, and removes the adapters.
    pub fn merge_lora(mut self) -> Self {
        for (_, _, p) in self.projections_mut() {
            if let Some(lora) = p.lora.take() {
                let delta = lora.a.val().matmul(lora.b.val()) * lora.scale;
                let w = p.base.weight.val().detach() + delta.detach();
                p.base.weight = Param::from_tensor(w);
            }
        }
        self.lora = None;
        self
    }

    /// Parameters that train (all of them without LoRA, the adapters' with it).
    pub fn trainable_parameters(&self) -> usize {
        match self.lora {
            None => self.num_params(),
            Some(_) => self
                .projections()
                .iter()
                .filter_map(|(_, _, p)| p.lora.as_ref())
                .map(|l| l.a.shape().num_elements() + l.b.shape().num_elements())
                .sum(),
        }
    }
}
