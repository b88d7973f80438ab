//! Next-token scores read out of hidden states, on the host. Callers (the decoder, the
//! benchmarks) ask for scores by position; only this crate indexes tensor layouts.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::model::CausalLm;

fn host<B: Backend, const D: usize>(t: Tensor<B, D>, what: &str) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| ModelError::Input(format!("{what}: cannot read tensor back: {e:?}")))
}

impl<B: Backend> CausalLm<B> {
    /// The hidden states of the last `width` positions of every row, `[batch, width, hidden]`.
    pub fn hidden_tail(&self, hidden: Tensor<B, 3>, width: usize) -> Tensor<B, 3> {
        let [b, s, h] = hidden.dims();
        hidden.slice([0..b, s - width.min(s)..s, 0..h])
    }

    /// Logits of each row's last position (`[batch × vocab]`, row-major) and, per row,
    /// `logsumexp(logits / temperature)` computed on the device — a sampled token's
    /// log-prob then costs one subtraction on the host.
    pub fn last_position_scores(&self, hidden: &Tensor<B, 3>, temperature: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        let [b, s, h] = hidden.dims();
        if s == 0 {
            return Err(ModelError::Input("no positions to score".into()));
        }
        let vocab = self.config().vocab_size;
        let last = self.logits(hidden.clone().slice([0..b, s - 1..s, 0..h])).reshape([b, vocab]);
        let scaled = last.clone() / temperature;
        let peak = scaled.clone().max_dim(1);
        let lse = (scaled - peak.clone()).exp().sum_dim(1).log() + peak;
        Ok((host(last, "logits")?, host(lse.reshape([b]), "logsumexp")?))
    }

    /// `log_softmax(logits / temperature)[target]` at flattened positions `row × seq + t` of
    /// `hidden`; only those rows go through the vocabulary projection.
    pub fn hidden_logprobs(&self, hidden: Tensor<B, 3>, positions: &[usize], targets: &[u32], temperature: f32) -> Result<Vec<f32>> {
        let [b, s, h] = hidden.dims();
        let n = positions.len();
        if n != targets.len() {
            return Err(ModelError::Input(format!("{n} positions for {} targets", targets.len())));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        if let Some(&p) = positions.iter().find(|&&p| p >= b * s) {
            return Err(ModelError::Input(format!("position {p} is outside the {}-position batch", b * s)));
        }
        let device = hidden.device();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(positions.iter().map(|&p| p as i64).collect(), [n]), &device);
        let rows = hidden.reshape([b * s, h]).select(0, index);
        let logits = self.logits(rows.reshape([1, n, h]));
        let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets.iter().map(|&t| t as i64).collect(), [1, n, 1]), &device);
        host(log_softmax(logits / temperature, 2).gather(2, targets).reshape([n]), "log-probs")
    }

    /// Greedy next token of every row: the argmax of its last position's logits.
    pub fn last_argmax(&self, hidden: Tensor<B, 3>) -> Result<Vec<u32>> {
        let [b, s, h] = hidden.dims();
        let logits = self.logits(hidden.slice([0..b, s.saturating_sub(1)..s, 0..h]));
        let ids = logits.argmax(2).into_data().convert::<i64>().to_vec::<i64>();
        let ids = ids.map_err(|e| ModelError::Input(format!("argmax: {e:?}")))?;
        Ok(ids.into_iter().map(|i| i as u32).collect())
    }
}
