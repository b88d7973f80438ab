//! [`CausalLm`]: the Qwen2/Llama decoder with its forward modes.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::batch::{plan, rope_tables, TokenBatch};
use crate::config::{ModelConfig, StorageDtype};
use crate::error::{ModelError, Result};
use crate::gguf::hf::GgufSource;
use crate::gguf::GgufFile;
use crate::layers::{project, Attention, DecoderLayer, LayerCache, LayerKv, Mlp, Projection, Rope, RmsNorm};
use crate::lora::LoraConfig;
use crate::weights::{transpose, write_atomic, write_safetensors, HfEntry, RandomSource, SafetensorsSource, WeightSource};

/// A decoder-only language model (`Qwen2ForCausalLM` / `LlamaForCausalLM`).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    config: ModelConfig,
    /// The settings of the attached LoRA adapters (`None`: none attached).
    #[module(skip)]
    pub(crate) lora: Option<LoraConfig>,
}

/// The constant inputs of one forward pass: token ids, RoPE tables and attention mask.
pub(crate) struct PassInputs<B: Backend> {
    pub(crate) ids: Tensor<B, 2, Int>,
    pub(crate) rope: Rope<B>,
    pub(crate) mask: Option<Tensor<B, 4, Bool>>,
}

/// GRPO's continuation rows (`prompt[P − 1]` then each continuation), the flattened positions
/// scored and their targets, and the prompt's first `P − 1` tokens (`None` when `P = 1`).
pub(crate) struct ContinuationPass {
    pub(crate) rows: TokenBatch,
    pub(crate) positions: Vec<usize>,
    pub(crate) targets: Vec<u32>,
    pub(crate) prefix: Option<TokenBatch>,
}

/// Keys and values of every layer plus, per sequence, which cached keys are real and the
/// next position — enough to continue a left-padded batch one token at a time.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    valid: Vec<Vec<bool>>,
    next_pos: Vec<usize>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(batch: usize, num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }
    /// Cached positions (the same for every sequence; pads included).
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn batch(&self) -> usize {
        self.valid.len()
    }

    /// Real (non-pad) cached keys of the fullest sequence.
    pub fn max_valid(&self) -> usize {
        self.valid.iter().map(|v| v.iter().filter(|&&m| m).count()).max().unwrap_or(0)
    }

    /// A cache for `rows.len()` sequences where sequence `i` continues cached sequence
    /// `rows[i]` — requests that share a prompt (GRPO's G completions) prefill it once and
    /// each continue their own copy.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        if let Some(&r) = rows.iter().find(|&&r| r >= self.batch()) {
            return Err(ModelError::Input(format!("row {r} of a cache of {} sequences", self.batch())));
        }
        Ok(Self {
            layers: self.layers.iter().map(|slot| slot.as_ref().map(|kv| kv.select_rows(rows))).collect(),
            valid: rows.iter().map(|&r| self.valid[r].clone()).collect(),
            next_pos: rows.iter().map(|&r| self.next_pos[r]).collect(),
        })
    }

    /// Keeps only sequences `keep` (strictly ascending): what [`KvCache::select_rows`] gives
    /// for them, moved down in place on the CPU backend instead of copied (sequences leaving
    /// a running batch).
    pub fn keep_sequences(&mut self, keep: &[usize]) -> Result<()> {
        if keep.windows(2).any(|w| w[0] >= w[1]) || keep.last().is_some_and(|&r| r >= self.batch()) {
            return Err(ModelError::Input(format!("sequences to keep {keep:?} are not ascending rows of a cache of {}", self.batch())));
        }
        if keep.is_empty() {
            *self = Self::new(0, self.layers.len());
            return Ok(());
        }
        for slot in self.layers.iter_mut() {
            *slot = slot.take().map(|kv| kv.keep_sequences(keep));
        }
        self.valid = keep.iter().map(|&r| std::mem::take(&mut self.valid[r])).collect();
        self.next_pos = keep.iter().map(|&r| self.next_pos[r]).collect();
        Ok(())
    }

    /// Appends the sequences of `other` after this cache's (continuous batching: requests
    /// prefilled on their own join a running batch). The shorter side is left-padded with
    /// masked columns, so every sequence keeps its own keys, positions and validity.
    pub fn append_rows(&mut self, other: KvCache<B>) -> Result<()> {
        if other.batch() == 0 {
            return Ok(());
        }
        if self.batch() == 0 {
            *self = other;
            return Ok(());
        }
        if self.layers.len() != other.layers.len() {
            return Err(ModelError::Input(format!("caches of {} and {} layers cannot be joined", self.layers.len(), other.layers.len())));
        }
        if let Some(i) = self.layers.iter().zip(&other.layers).position(|(a, b)| a.is_none() || b.is_none()) {
            return Err(ModelError::Input(format!("layer {i} of a cache to join holds no keys")));
        }
        let width = self.len().max(other.len());
        // Layer by layer, each old layer dropped as soon as its joined one is built: the
        // cache is held about once during a join, not twice (it is most of a batch's memory).
        let mut theirs = other.layers;
        for (i, (slot, their)) in self.layers.iter_mut().zip(theirs.iter_mut()).enumerate() {
            let (Some(a), Some(b)) = (slot.take(), their.take()) else {
                return Err(ModelError::Input(format!("layer {i} of a cache to join holds no keys")));
            };
            let (ka, va) = a.filled();
            drop(a);
            let (kb, vb) = b.filled();
            drop(b);
            let k = Tensor::cat(vec![left_pad(ka, width), left_pad(kb, width)], 0);
            let v = Tensor::cat(vec![left_pad(va, width), left_pad(vb, width)], 0);
            *slot = Some(LayerKv::whole(k, v));
        }
        let pad = |rows: Vec<Vec<bool>>| -> Vec<Vec<bool>> {
            rows.into_iter()
                .map(|r| {
                    let mut v = vec![false; width - r.len()];
                    v.extend(r);
                    v
                })
                .collect()
        };
        let mut valid = pad(std::mem::take(&mut self.valid));
        valid.extend(pad(other.valid));
        self.valid = valid;
        self.next_pos.extend(other.next_pos);
        Ok(())
    }

    /// Drops pad columns: each sequence's real keys move to the right end, left-padded to
    /// the fullest sequence. Batched steps feed pads to sequences with fewer new tokens, so
    /// without this the cache (and every step's attention) grows with the widest row.
    /// Keys already carry their RoPE rotation and every cached key precedes every new
    /// query, so attention over the compacted cache is unchanged.
    pub fn compact(&mut self) {
        let len = self.len();
        let keep = self.max_valid();
        if keep == len {
            return;
        }
        let b = self.batch();
        // index[row][j]: which old column lands in new column j (pads read column 0).
        let mut index = Vec::with_capacity(b * keep);
        let mut valid = Vec::with_capacity(b);
        for row in &self.valid {
            let real: Vec<usize> = row.iter().enumerate().filter(|(_, &m)| m).map(|(i, _)| i).collect();
            let pads = keep - real.len();
            index.extend(std::iter::repeat_n(0i64, pads));
            index.extend(real.iter().map(|&i| i as i64));
            let mut v = vec![false; pads];
            v.extend(std::iter::repeat_n(true, real.len()));
            valid.push(v);
        }
        for slot in self.layers.iter_mut() {
            if let Some(kv) = slot.take() {
                let (k, v) = kv.filled();
                let [_, heads, _, d] = k.dims();
                let device = k.device();
                let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(index.clone(), [b, keep]), &device)
                    .reshape([b, 1, keep, 1])
                    .expand([b, heads, keep, d]);
                *slot = Some(LayerKv::whole(k.gather(2, idx.clone()), v.gather(2, idx)));
            }
        }
        self.valid = valid;
    }
}

impl<B: Backend> CausalLm<B> {
    /// Random weights from a seed (N(0, 0.02), like transformers' `initializer_range`).
    pub fn random(config: &ModelConfig, seed: u64, device: &B::Device) -> Result<Self> {
        Self::build(config, &mut RandomSource::new(seed, 0.02)?, device)
    }

    /// Loads a Hugging Face model directory: `config.json` plus `model.safetensors` or a
    /// sharded `model.safetensors.index.json` (f32, f16 or bf16; cast to the backend's dtype).
    pub fn from_pretrained(dir: &Path, device: &B::Device) -> Result<Self> {
        let config = ModelConfig::from_file(dir)?;
        Self::from_safetensors(&config, dir, device)
    }

    /// Like [`CausalLm::from_pretrained`] with a config given by the caller.
    pub fn from_safetensors(config: &ModelConfig, dir: &Path, device: &B::Device) -> Result<Self> {
        // A tied checkpoint that still carries `lm_head.weight` is fine: the embeddings win.
        Self::build(config, &mut SafetensorsSource::open(dir)?, device)
    }

    /// Loads a GGUF `llama` or `qwen2` model, dequantizing every tensor to f32 (see
    /// [`crate::gguf`]).
    pub fn from_gguf(path: &Path, device: &B::Device) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&gguf)?;
        Self::build(&config, &mut GgufSource::new(&gguf, &config), device)
    }

    fn build(config: &ModelConfig, src: &mut dyn WeightSource, device: &B::Device) -> Result<Self> {
        let c = config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let embed = src.fetch("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let embed_tokens = Embedding {
            weight: Param::from_tensor(tensor2(embed, [c.vocab_size, h], device)),
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = c.attention_bias;
            let self_attn = Attention {
                q_proj: Projection::new(linear(src, &format!("{p}.self_attn.q_proj"), h, c.num_attention_heads * d, bias, device)?),
                k_proj: Projection::new(linear(src, &format!("{p}.self_attn.k_proj"), h, c.num_key_value_heads * d, bias, device)?),
                v_proj: Projection::new(linear(src, &format!("{p}.self_attn.v_proj"), h, c.num_key_value_heads * d, bias, device)?),
                o_proj: Projection::new(linear(src, &format!("{p}.self_attn.o_proj"), c.num_attention_heads * d, h, false, device)?),
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: d,
            };
            let mlp = Mlp {
                gate_proj: Projection::new(linear(src, &format!("{p}.mlp.gate_proj"), h, c.intermediate_size, false, device)?),
                up_proj: Projection::new(linear(src, &format!("{p}.mlp.up_proj"), h, c.intermediate_size, false, device)?),
                down_proj: Projection::new(linear(src, &format!("{p}.mlp.down_proj"), c.intermediate_size, h, false, device)?),
            };
            layers.push(DecoderLayer {
                input_layernorm: norm(src, &format!("{p}.input_layernorm"), h, c.rms_norm_eps, device)?,
                self_attn,
                post_attention_layernorm: norm(src, &format!("{p}.post_attention_layernorm"), h, c.rms_norm_eps, device)?,
                mlp,
            });
        }
        let final_norm = norm(src, "model.norm", h, c.rms_norm_eps, device)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(linear(src, "lm_head", h, c.vocab_size, false, device)?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
            config: c.clone(),
            lora: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> B::Device {
        self.embed_tokens.weight.val().device()
    }

    /// Logits `[batch, seq, vocab]` for every position of a padded batch (either side).
    /// Real tokens never attend to pads; their positions count real tokens only.
    pub fn forward(&self, batch: &TokenBatch) -> Result<Tensor<B, 3>> {
        Ok(self.logits(self.hidden_states(batch)?))
    }

    /// Final-norm hidden states `[batch, seq, hidden]`.
    pub fn hidden_states(&self, batch: &TokenBatch) -> Result<Tensor<B, 3>> {
        let empty = vec![Vec::new(); batch.batch];
        let next = vec![0; batch.batch];
        self.run(batch, &empty, &next, None)
    }

    /// Incremental decoding: feeds `batch` (a left-padded prompt, then one token per step)
    /// after what `cache` holds and returns the logits of the new positions.
    pub fn forward_cached(&self, batch: &TokenBatch, cache: &mut KvCache<B>) -> Result<Tensor<B, 3>> {
        Ok(self.logits(self.hidden_cached(batch, cache)?))
    }

    /// [`CausalLm::forward_cached`] without the vocabulary projection, so a caller can take
    /// the logits of the last position only.
    pub fn hidden_cached(&self, batch: &TokenBatch, cache: &mut KvCache<B>) -> Result<Tensor<B, 3>> {
        batch.validate()?;
        if batch.segments.is_some() {
            return Err(ModelError::Input("packed batches (segments) cannot be decoded with a KV cache".into()));
        }
        if cache.batch() != batch.batch || cache.layers.len() != self.layers.len() {
            return Err(ModelError::Input(format!(
                "cache holds {} sequences × {} layers, input has {} sequences",
                cache.batch(),
                cache.layers.len(),
                batch.batch
            )));
        }
        let past_valid = std::mem::take(&mut cache.valid);
        let next_pos = cache.next_pos.clone();
        let mut layer_caches = std::mem::take(&mut cache.layers);
        let out = self.run(batch, &past_valid, &next_pos, Some(&mut layer_caches));
        cache.layers = layer_caches;
        cache.valid = past_valid;
        let hidden = out?;
        for (bi, row) in batch.mask.chunks(batch.seq).enumerate() {
            cache.valid[bi].extend_from_slice(row);
            cache.next_pos[bi] += row.iter().filter(|&&m| m).count();
        }
        Ok(hidden)
    }

    /// Log-probability of `targets[b * seq + t]` at each position `t`, `[batch, seq]`,
    /// computed `chunk` positions at a time so no full `[batch, seq, vocab]` tensor is kept.
    pub fn token_logprobs(&self, batch: &TokenBatch, targets: &[u32], chunk: usize) -> Result<Tensor<B, 2>> {
        batch.validate()?;
        if targets.len() != batch.ids.len() {
            return Err(ModelError::Input(format!(
                "{} targets for {} input positions",
                targets.len(),
                batch.ids.len()
            )));
        }
        for (i, &t) in targets.iter().enumerate() {
            self.config.check_token(t, i / batch.seq, i % batch.seq)?;
        }
        let hidden = self.hidden_states(batch)?;
        let (b, s) = (batch.batch, batch.seq);
        let chunk = chunk.max(1);
        let mut parts = Vec::with_capacity(s.div_ceil(chunk));
        for start in (0..s).step_by(chunk) {
            let end = (start + chunk).min(s);
            let h = hidden.clone().slice([0..b, start..end]);
            let rows = b * (end - start);
            let logits = self.logits(h).reshape([rows, self.config.vocab_size]);
            let t: Vec<u32> = (0..b).flat_map(|bi| targets[bi * s + start..bi * s + end].iter().copied()).collect();
            let (lp, _) = crate::lean_logprobs::target_logprobs(logits, &t, 1.0, false);
            parts.push(lp.reshape([b, end - start]));
        }
        Ok(Tensor::cat(parts, 1))
    }

    /// Log-probabilities of `targets[i]` at flattened positions `positions[i]` (`b * seq + t`),
    /// `[positions.len()]`. Only those rows go through the vocabulary projection — for
    /// completion-only losses that skips the prompt's share of the largest matmul — `chunk`
    /// rows at a time.
    pub fn selected_logprobs(
        &self,
        batch: &TokenBatch,
        positions: &[usize],
        targets: &[u32],
        chunk: usize,
    ) -> Result<Tensor<B, 1>> {
        Ok(self.selected_scores(batch, positions, targets, chunk, 1.0, false)?.0)
    }

    /// [`Self::selected_logprobs`] of `log_softmax(logits / temperature)` — the policy
    /// log-probs of a sampler at that temperature, as RL trainers score them — and, with
    /// `entropy`, each position's entropy of that distribution (detached: for logging).
    pub fn selected_scores(
        &self,
        batch: &TokenBatch,
        positions: &[usize],
        targets: &[u32],
        chunk: usize,
        temperature: f64,
        entropy: bool,
    ) -> Result<(Tensor<B, 1>, Option<Tensor<B, 1>>)> {
        batch.validate()?;
        if positions.len() != targets.len() || positions.is_empty() {
            return Err(ModelError::Input(format!(
                "{} positions for {} targets (need the same, non-zero number)",
                positions.len(),
                targets.len()
            )));
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(ModelError::Input(format!("temperature {temperature} (need a positive number)")));
        }
        let n = batch.batch * batch.seq;
        for (i, (&p, &t)) in positions.iter().zip(targets).enumerate() {
            if p >= n {
                return Err(ModelError::Input(format!("position {p} (entry {i}) is outside the {n}-position batch")));
            }
            self.config.check_token(t, p / batch.seq, p % batch.seq)?;
        }
        let hidden = self.hidden_states(batch)?;
        Ok(self.scores_at(hidden.reshape([n, self.config.hidden_size]), positions, targets, chunk, temperature, entropy))
    }

    /// Log-probs of several continuations of one prompt — GRPO's G completions — with the
    /// prompt run once: its keys and values are computed a single time and every continuation
    /// attends to them (the gradient through them is the sum over the continuations). The
    /// same values and gradients as [`Self::selected_scores`] over the `prompt + continuation`
    /// rows, for `P − 1 + G·C` tokens instead of `G·(P + C)`. Returns the log-probs of the
    /// first `active[r]` tokens of each continuation, in order, and with `entropy` their
    /// entropies (detached).
    pub fn continuation_scores(
        &self,
        prompt: &[u32],
        continuations: &[Vec<u32>],
        active: &[usize],
        chunk: usize,
        temperature: f64,
        entropy: bool,
    ) -> Result<(Tensor<B, 1>, Option<Tensor<B, 1>>)> {
        let pass = self.continuation_pass(prompt, continuations, active)?;
        let hidden = match &pass.prefix {
            None => self.hidden_states(&pass.rows)?,
            Some(prefix) => {
                let mut shared = KvCache::new(1, self.layers.len());
                self.hidden_cached(prefix, &mut shared)?;
                let mut cache = shared.select_rows(&vec![0; pass.rows.batch])?;
                self.hidden_cached(&pass.rows, &mut cache)?
            }
        };
        let n = pass.rows.batch * pass.rows.seq;
        Ok(self.scores_at(hidden.reshape([n, self.config.hidden_size]), &pass.positions, &pass.targets, chunk, temperature, entropy))
    }

    /// The rows, scored positions and targets of [`Self::continuation_scores`], checked.
    pub(crate) fn continuation_pass(&self, prompt: &[u32], continuations: &[Vec<u32>], active: &[usize]) -> Result<ContinuationPass> {
        if continuations.len() != active.len() || prompt.is_empty() {
            return Err(ModelError::Input(format!(
                "{} continuations with {} active counts after a {}-token prompt (need equal counts and a prompt)",
                continuations.len(),
                active.len(),
                prompt.len()
            )));
        }
        if let Some((r, (c, &n))) = continuations.iter().zip(active).enumerate().find(|(_, (c, &n))| n > c.len()) {
            return Err(ModelError::Input(format!("continuation {r}: {n} active tokens of {}", c.len())));
        }
        // Position P − 1 + k predicts continuation token k: the rows start with the prompt's
        // last token, after a cache of the first P − 1.
        let rows: Vec<Vec<u32>> = continuations
            .iter()
            .zip(active)
            .map(|(c, &n)| std::iter::once(prompt[prompt.len() - 1]).chain(c[..n.saturating_sub(1)].iter().copied()).collect())
            .collect();
        let rows = TokenBatch::new(&rows, crate::batch::Padding::Right, 0)?;
        let seq = rows.seq;
        let (positions, targets): (Vec<usize>, Vec<u32>) =
            continuations.iter().zip(active).enumerate().flat_map(|(r, (c, &n))| (0..n).map(move |k| (r * seq + k, c[k]))).unzip();
        if positions.is_empty() {
            return Err(ModelError::Input("no active continuation tokens to score".into()));
        }
        for (&p, &t) in positions.iter().zip(&targets) {
            self.config.check_token(t, p / seq, p % seq)?;
        }
        let prefix = &prompt[..prompt.len() - 1];
        let prefix = if prefix.is_empty() { None } else { Some(TokenBatch::new(&[prefix.to_vec()], crate::batch::Padding::Right, 0)?) };
        Ok(ContinuationPass { rows, positions, targets, prefix })
    }

    /// Log-softmax (at `temperature`) of `targets[i]` at rows `positions[i]` of flattened
    /// hidden states `[n, hidden]`, `chunk` rows through the vocabulary projection at a time.
    pub(crate) fn scores_at(
        &self,
        flat: Tensor<B, 2>,
        positions: &[usize],
        targets: &[u32],
        chunk: usize,
        temperature: f64,
        entropy: bool,
    ) -> (Tensor<B, 1>, Option<Tensor<B, 1>>) {
        let device = flat.device();
        let h = self.config.hidden_size;
        let chunk = chunk.max(1);
        let mut parts = Vec::with_capacity(positions.len().div_ceil(chunk));
        let mut entropies = Vec::new();
        for (pos, tgt) in positions.chunks(chunk).zip(targets.chunks(chunk)) {
            let k = pos.len();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(pos.iter().map(|&p| p as i64).collect(), [k]), &device);
            let rows = flat.clone().select(0, idx).reshape([1, k, h]);
            let logits = self.logits(rows).reshape([k, self.config.vocab_size]);
            let (lp, row_entropy) = crate::lean_logprobs::target_logprobs(logits, tgt, temperature, entropy);
            entropies.extend(row_entropy);
            parts.push(lp);
        }
        let entropy = entropy.then(|| Tensor::cat(entropies, 0));
        (Tensor::cat(parts, 0), entropy)
    }

    /// Projects hidden states to vocabulary logits.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => project(head, hidden),
            None => {
                // A decode step's rows: the CPU kernel reads E's rows in place. Otherwise
                // `(E · hᵀ)ᵀ`, not `h · Eᵀ`: CPU matmul on a transposed view of the
                // [vocab, hidden] matrix copies it first (16× slower measured on Flex);
                // transposing the small operand instead costs nothing.
                let [b, s, h] = hidden.dims();
                let embed = self.embed_tokens.weight.val();
                let flat = hidden.reshape([b * s, h]);
                if let Some(logits) = crate::cpu_kernels::matmul_few_rows(&flat, &embed.clone().transpose()) {
                    return logits.reshape([b, s, self.config.vocab_size]);
                }
                let flat = flat.transpose();
                let logits = crate::cpu_kernels::matmul_gemm(&embed, &flat)
                    .map(Tensor::transpose)
                    .or_else(|| crate::lean_linear::matmul_transposed(&embed, &flat))
                    .unwrap_or_else(|| embed.matmul(flat).transpose());
                logits.reshape([b, s, self.config.vocab_size])
            }
        }
    }

    /// The token ids, RoPE tables and attention mask of a pass over `batch` after the cached
    /// positions `past_valid` (per sequence) whose next position is `next_pos`.
    pub(crate) fn pass_inputs(&self, batch: &TokenBatch, past_valid: &[Vec<bool>], next_pos: &[usize]) -> Result<PassInputs<B>> {
        batch.validate()?;
        for (i, &id) in batch.ids.iter().enumerate() {
            self.config.check_token(id, i / batch.seq, i % batch.seq)?;
        }
        let device = self.device();
        let (b, s, d) = (batch.batch, batch.seq, self.config.head_dim);
        let plan = plan(batch, past_valid, next_pos);
        let (cos, sin) = rope_tables(&plan.positions, d, self.config.rope_theta);
        let rope = Rope {
            cos: Tensor::from_data(TensorData::new(cos, [b, s, 1, d]), &device),
            sin: Tensor::from_data(TensorData::new(sin, [b, s, 1, d]), &device),
        };
        let mask = plan
            .blocked
            .map(|blocked| Tensor::<B, 4, Bool>::from_data(TensorData::new(blocked, [b, 1, s, plan.keys]), &device));
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(batch.ids.iter().map(|&t| t as i64).collect(), [b, s]),
            &device,
        );
        Ok(PassInputs { ids, rope, mask })
    }

    fn run(
        &self,
        batch: &TokenBatch,
        past_valid: &[Vec<bool>],
        next_pos: &[usize],
        mut caches: Option<&mut Vec<LayerCache<B>>>,
    ) -> Result<Tensor<B, 3>> {
        let inputs = self.pass_inputs(batch, past_valid, next_pos)?;
        Ok(crate::cpu_kernels::on_workers::<B, _>(|| {
            let mut x = crate::lean_embedding::lookup(&self.embed_tokens, inputs.ids);
            for (i, layer) in self.layers.iter().enumerate() {
                let slot = caches.as_deref_mut().and_then(|c| c.get_mut(i));
                x = layer.forward(x, &inputs.rope, inputs.mask.as_ref(), slot);
            }
            self.norm.forward(x)
        }))
    }

    /// Saves `config.json` and `model.safetensors` in Hugging Face layout, atomically, so
    /// `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads them.
    pub fn save_pretrained(&self, dir: &Path, dtype: StorageDtype) -> Result<()> {
        if self.lora.is_some() {
            return Err(ModelError::Input(
                "the model has LoRA adapters: save them with `save_adapter`, or `merge_lora` first to save a full model".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| ModelError::write(dir, e))?;
        write_safetensors(dir, &self.hf_entries(), dtype)?;
        let config = ModelConfig {
            dtype,
            ..self.config.clone()
        };
        let text = serde_json::to_string_pretty(&config.to_hf_value())
            .map_err(|e| ModelError::Input(format!("config.json: {e}")))?;
        write_atomic(&dir.join("config.json"), text.as_bytes())
    }

    /// Every tensor in HF layout, read when asked for.
    fn hf_entries(&self) -> Vec<HfEntry<'_>> {
        let mut out = vec![host_entry("model.embed_tokens.weight", self.embed_tokens.weight.val())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            for (name, lin) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)] {
                push_linear(&mut out, &format!("{p}.self_attn.{name}"), &lin.base);
            }
            for (name, lin) in [("gate_proj", &l.mlp.gate_proj), ("up_proj", &l.mlp.up_proj), ("down_proj", &l.mlp.down_proj)] {
                push_linear(&mut out, &format!("{p}.mlp.{name}"), &lin.base);
            }
            out.push(host_entry(&format!("{p}.input_layernorm.weight"), l.input_layernorm.weight.val()));
            out.push(host_entry(&format!("{p}.post_attention_layernorm.weight"), l.post_attention_layernorm.weight.val()));
        }
        out.push(host_entry("model.norm.weight", self.norm.weight.val()));
        if let Some(head) = &self.lm_head {
            push_linear(&mut out, "lm_head", head);
        }
        out
    }
}

/// `[batch, heads, len, d]` keys or values, zero columns prepended up to `width`.
fn left_pad<B: Backend>(t: Tensor<B, 4>, width: usize) -> Tensor<B, 4> {
    let [b, h, len, d] = t.dims();
    if len >= width {
        return t;
    }
    let zeros = Tensor::zeros([b, h, width - len, d], &t.device());
    Tensor::cat(vec![zeros, t], 2)
}

fn tensor2<B: Backend>(values: Vec<f32>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn linear<B: Backend>(
    src: &mut dyn WeightSource,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>> {
    let w = src.fetch(&format!("{name}.weight"), &[d_out, d_in])?;
    let weight = tensor2(transpose(&w, d_out, d_in), [d_in, d_out], device);
    let bias = if bias {
        let b = src.fetch(&format!("{name}.bias"), &[d_out])?;
        Some(Param::from_tensor(Tensor::from_data(TensorData::new(b, [d_out]), device)))
    } else {
        None
    };
    Ok(Linear {
        weight: Param::from_tensor(weight),
        bias,
    })
}

fn norm<B: Backend>(src: &mut dyn WeightSource, name: &str, size: usize, eps: f64, device: &B::Device) -> Result<RmsNorm<B>> {
    let w = src.fetch(&format!("{name}.weight"), &[size])?;
    Ok(RmsNorm::new(Tensor::from_data(TensorData::new(w, [size]), device), eps))
}

fn host_values<B: Backend, const D: usize>(name: &str, t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| ModelError::Input(format!("{name}: cannot read tensor back: {e:?}")))
}

fn host_entry<'a, B: Backend, const D: usize>(name: &str, t: Tensor<B, D>) -> HfEntry<'a> {
    let owned = name.to_string();
    HfEntry { name: owned.clone(), shape: t.dims().to_vec(), read: Box::new(move || host_values(&owned, t.clone())) }
}

/// A linear layer's weight (burn's `[in, out]` read back as HF's `[out, in]`) and bias.
fn push_linear<'a, B: Backend>(out: &mut Vec<HfEntry<'a>>, name: &str, lin: &Linear<B>) {
    let w = lin.weight.val();
    let [d_in, d_out] = w.dims();
    let weight = format!("{name}.weight");
    out.push(HfEntry {
        name: weight.clone(),
        shape: vec![d_out, d_in],
        read: Box::new(move || Ok(transpose(&host_values(&weight, w.clone())?, d_in, d_out))),
    });
    if let Some(b) = &lin.bias {
        out.push(host_entry(&format!("{name}.bias"), b.val()));
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use crate::config::Architecture;
    use crate::weights::hf_layout;

    /// The GGUF import writes tensors from `hf_layout`; it must list exactly what a saved
    /// model holds (names and HF shapes), for biased, unbiased, tied and untied models.
    #[test]
    fn hf_layout_lists_every_saved_tensor() {
        let base = ModelConfig::preset("tiny").unwrap().with_vocab_size(32);
        let llama = ModelConfig { architecture: Architecture::Llama, attention_bias: false, tie_word_embeddings: false, ..base.clone() };
        for config in [base, llama] {
            let model = CausalLm::<crate::CpuBackend>::random(&config, 1, &Default::default()).unwrap();
            let mut saved: Vec<(String, Vec<usize>)> = model.hf_entries().into_iter().map(|t| (t.name, t.shape)).collect();
            let mut listed = hf_layout(&config);
            saved.sort();
            listed.sort();
            assert_eq!(saved, listed);
        }
    }
}

#[cfg(test)]
mod continuation_tests {
    use super::*;
    use crate::CpuTrainBackend as T;

    fn grads_of(model: &CausalLm<T>, loss: Tensor<T, 1>) -> Vec<Vec<f32>> {
        let grads = loss.backward();
        let attn = &model.layers[0].self_attn;
        let params = [
            model.embed_tokens.weight.val(),
            attn.q_proj.base.weight.val(),
            attn.k_proj.base.weight.val(),
            attn.v_proj.base.weight.val(),
            model.layers[1].mlp.down_proj.base.weight.val(),
        ];
        params
            .iter()
            .map(|p| p.grad(&grads).map(|g| g.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()).unwrap_or_default())
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Scoring G continuations after one shared prompt pass gives the log-probs and the
    /// gradients of scoring each full `prompt + continuation` row on its own — through the
    /// cached-prefix attention path (long continuations) and the grouped one (short).
    #[test]
    fn shared_prompt_scores_and_gradients_match_full_rows() {
        let config = ModelConfig::preset("tiny").unwrap_or_else(|e| panic!("{e}")).with_vocab_size(97);
        let model = CausalLm::<T>::random(&config, 3, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let prompt: Vec<u32> = (0..45).map(|i| (i * 7 + 3) % 97).collect();
        for continuations in [vec![(0..40u32).map(|i| (i * 5 + 1) % 97).collect::<Vec<_>>(), vec![4, 9, 16, 25, 36], vec![11, 12]], vec![vec![5; 6], vec![8, 2, 7]]] {
            let active: Vec<usize> = continuations.iter().enumerate().map(|(r, c)| if r == 2 { 0 } else { c.len() - usize::from(r == 1) }).collect();
            let (shared, entropy) = model.continuation_scores(&prompt, &continuations, &active, 7, 0.9, true).unwrap_or_else(|e| panic!("{e}"));
            assert!(entropy.is_some());
            let rows: Vec<Vec<u32>> = continuations.iter().map(|c| prompt.iter().chain(c).copied().collect()).collect();
            let batch = TokenBatch::new(&rows, crate::batch::Padding::Right, 0).unwrap_or_else(|e| panic!("{e}"));
            let (seq, last) = (batch.seq, prompt.len() - 1);
            let (positions, targets): (Vec<usize>, Vec<u32>) =
                continuations.iter().zip(&active).enumerate().flat_map(|(r, (c, &n))| (0..n).map(move |k| (r * seq + last + k, c[k]))).unzip();
            let (full, _) = model.selected_scores(&batch, &positions, &targets, 7, 0.9, false).unwrap_or_else(|e| panic!("{e}"));
            let values = |t: &Tensor<T, 1>| t.clone().inner().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
            let (a, b) = (values(&shared), values(&full));
            assert_eq!(a.len(), positions.len());
            assert!(max_diff(&a, &b) < 1e-5, "log-probs differ by {}", max_diff(&a, &b));
            // A weighted sum, so every token's gradient counts differently.
            let weights = Tensor::<T, 1>::from_data(TensorData::new((0..a.len()).map(|i| 1.0 + (i % 5) as f32 * 0.3).collect::<Vec<f32>>(), [a.len()]), &Default::default());
            let ga = grads_of(&model, shared.mul(weights.clone()).sum());
            let gb = grads_of(&model, full.mul(weights).sum());
            for (i, (x, y)) in ga.iter().zip(&gb).enumerate() {
                assert!(!x.is_empty() && x.iter().any(|v| *v != 0.0), "parameter {i} has no gradient");
                let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
                assert!(max_diff(x, y) < 1e-4 * scale, "parameter {i}: gradients differ by {} (scale {scale})", max_diff(x, y));
            }
        }
    }
}

#[cfg(test)]
mod join_tests {
    use super::*;
    use crate::CpuBackend as C;

    fn one_row(ids: &[u32]) -> TokenBatch {
        TokenBatch { ids: ids.to_vec(), mask: vec![true; ids.len()], batch: 1, seq: ids.len(), segments: None }
    }

    fn host(t: Tensor<C, 3>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    /// Two sequences prefilled apart (5 and 9 tokens), then joined into one cache, decode the
    /// same next-token logits as each alone, step after step, and after the first leaves.
    #[test]
    fn joined_caches_decode_like_separate_ones() {
        let config = ModelConfig::preset("tiny").unwrap().with_vocab_size(64);
        let model = CausalLm::<C>::random(&config, 7, &Default::default()).unwrap();
        let layers = config.num_hidden_layers;
        let prompts: [&[u32]; 2] = [&[1, 5, 9, 2, 4], &[3, 3, 8, 1, 7, 6, 2, 9, 11]];
        let mut alone: Vec<KvCache<C>> = Vec::new();
        let mut joined = KvCache::<C>::new(0, layers);
        for p in prompts {
            let mut c = KvCache::new(1, layers);
            model.forward_cached(&one_row(p), &mut c).unwrap();
            let mut d = KvCache::new(1, layers);
            model.forward_cached(&one_row(p), &mut d).unwrap();
            alone.push(c);
            joined.append_rows(d).unwrap();
        }
        assert_eq!((joined.batch(), joined.len()), (2, 9));
        for step in 0..3u32 {
            let next = [10 + step, 20 + step];
            let batch = TokenBatch { ids: next.to_vec(), mask: vec![true; 2], batch: 2, seq: 1, segments: None };
            let both = host(model.forward_cached(&batch, &mut joined).unwrap());
            for (i, c) in alone.iter_mut().enumerate() {
                let own = host(model.forward_cached(&one_row(&[next[i]]), c).unwrap());
                let diff = own.iter().zip(&both[i * 64..(i + 1) * 64]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(diff < 1e-5, "step {step} row {i}: {diff}");
            }
        }
        // The first sequence leaves; the second goes on alone in the joined cache.
        let mut rest = joined.select_rows(&[1]).unwrap();
        rest.compact();
        let a = host(model.forward_cached(&one_row(&[30]), &mut rest).unwrap());
        let b = host(model.forward_cached(&one_row(&[30]), &mut alone[1]).unwrap());
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-5, "after a leave: {diff}");
    }

    /// A cache with a layer that holds no keys cannot join, and the refused join leaves the
    /// running cache whole: `append_rows` takes it apart layer by layer (to hold it about
    /// once), so every layer is checked before the first is taken.
    #[test]
    fn a_refused_join_leaves_the_running_cache_whole() {
        let config = ModelConfig::preset("tiny").unwrap().with_vocab_size(64);
        let model = CausalLm::<C>::random(&config, 5, &Default::default()).unwrap();
        let layers = config.num_hidden_layers;
        let mut running = KvCache::<C>::new(1, layers);
        model.forward_cached(&one_row(&[1, 5, 9]), &mut running).unwrap();
        let mut untouched = running.clone();
        let err = running.append_rows(KvCache::new(1, layers)).unwrap_err();
        assert!(err.to_string().contains("layer 0"), "{err}");
        assert_eq!((running.batch(), running.len()), (1, 3));
        let a = host(model.forward_cached(&one_row(&[4]), &mut running).unwrap());
        let b = host(model.forward_cached(&one_row(&[4]), &mut untouched).unwrap());
        assert_eq!(a, b);
    }

    /// Decode steps written into the blocks' room, and sequences leaving by moving down in
    /// place, give the bits of the copying path (a cache whose blocks a clone shares is
    /// never written in place) across block boundaries and after a leave.
    #[test]
    fn in_place_cache_writes_equal_copied_blocks_bit_for_bit() {
        let config = ModelConfig::preset("tiny").unwrap().with_vocab_size(64);
        let model = CausalLm::<C>::random(&config, 11, &Default::default()).unwrap();
        let layers = config.num_hidden_layers;
        let prompt: Vec<u32> = (0..3 * 21).map(|i| (i * 7 + 3) % 60 + 1).collect();
        let batch = TokenBatch { ids: prompt, mask: vec![true; 63], batch: 3, seq: 21, segments: None };
        let mut in_place = KvCache::<C>::new(3, layers);
        let mut copied = KvCache::<C>::new(3, layers);
        assert_eq!(host(model.forward_cached(&batch, &mut in_place).unwrap()), host(model.forward_cached(&batch, &mut copied).unwrap()));
        if crate::cpu_kernels::writes_in_place::<C>() {
            let kv = in_place.layers[0].as_ref().unwrap();
            assert_eq!((kv.blocks[0].0.dims()[2], kv.open), (128, 21), "a prefill's block has room for the steps after it");
        }
        // Steps of 1–3 new positions per sequence (forced runs feed several), so blocks
        // close with room left in them.
        let step = |cache: &mut KvCache<C>, rows: usize, t: u32| {
            let width = 1 + t as usize % 3;
            let ids: Vec<u32> = (0..(rows * width) as u32).map(|i| (t * 5 + i * 11) % 60 + 1).collect();
            let batch = TokenBatch { ids, mask: vec![true; rows * width], batch: rows, seq: width, segments: None };
            host(model.forward_cached(&batch, cache).unwrap())
        };
        let views_cover_the_positions = |cache: &KvCache<C>| {
            for kv in cache.layers.iter().flatten() {
                let seen: usize = kv.views().iter().map(|(k, v)| {
                    assert_eq!(k.dims(), v.dims());
                    k.dims()[2]
                }).sum();
                assert_eq!(seen, kv.len);
            }
        };
        // 21 + 130 positions: the first block closes at 126 of 128, a second opens.
        for t in 0..65 {
            let hold = copied.clone();
            assert_eq!(step(&mut in_place, 3, t), step(&mut copied, 3, t), "step {t}");
            drop(hold);
            views_cover_the_positions(&in_place);
        }
        assert_eq!(in_place.layers[0].as_ref().unwrap().views().len(), 2);
        in_place.keep_sequences(&[0, 2]).unwrap();
        let mut copied = copied.select_rows(&[0, 2]).unwrap();
        for t in 65..75 {
            let hold = copied.clone();
            assert_eq!(step(&mut in_place, 2, t), step(&mut copied, 2, t), "step {t} after a leave");
            drop(hold);
            views_cover_the_positions(&in_place);
        }
        assert!(in_place.keep_sequences(&[1, 0]).is_err() && in_place.keep_sequences(&[2]).is_err());
        in_place.keep_sequences(&[]).unwrap();
        assert_eq!(in_place.batch(), 0);
    }
}
