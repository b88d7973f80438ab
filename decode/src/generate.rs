//! The batched generation loop: prefill, then one step per token with the KV cache; per
//! sequence a matcher masks the logits, forced tokens are fed without sampling, and
//! stopping is decided per sequence.

use std::time::Instant;

use burn::tensor::backend::Backend;
use llguidance::Matcher;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use thinkjson_model::{CausalLm, KvCache, Padding, TokenBatch, Tokenizer, DECODE_STEP_ROWS};

use crate::closing::{closing_cost, ClosingRanks, ClosingWatch};
use crate::constraint::{CompiledConstraint, Constraint, OutputCheck};
use crate::env::ConstraintEnv;
use crate::error::{DecodeError, Result};
use crate::sampling::{logprob_with_lse, lse_at, sample, SamplingConfig};

/// Settings shared by every sequence of a [`Generator::generate`] call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateConfig {
    /// New tokens per sequence, forced tokens included.
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation ends at the first of these strings (the text is cut before it).
    pub stop: Vec<String>,
    /// `false` recomputes the whole sequence every step (a reference for the cache).
    pub use_cache: bool,
    /// Constrained sequences finish their grammar inside `max_new_tokens`: near the end of
    /// the budget the generator stops sampling and closes the grammar by the shortest path it
    /// finds; [`Completion::closed`] marks such sequences.
    pub close_within_budget: bool,
    /// Every finished JSON-schema output is validated against the full schema (keywords the
    /// grammar cannot express — `not`, `uniqueItems`, `if`/`then`, … — are checked only
    /// there). An invalid one is generated again, up to this many times, with a new seed
    /// (and temperature 1 when the request was greedy, which would repeat itself); one still
    /// invalid after that ends as [`FinishReason::ConstraintError`] naming the keywords.
    /// Default 3.
    pub max_retries: usize,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingConfig::default(),
            stop: Vec::new(),
            use_cache: true,
            close_within_budget: true,
            max_retries: 3,
        }
    }
}

/// One sequence to generate.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Prompt token ids (e.g. from [`crate::chat_prompt`]).
    pub prompt: Vec<u32>,
    pub constraint: Constraint,
    /// Overrides the seed derived from the config's seed and the request's index.
    pub seed: Option<u64>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, constraint: Constraint) -> Self {
        Self { prompt, constraint, seed: None }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token was sampled (it is the last of `tokens`).
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The constraint's grammar is complete: nothing more may follow.
    ConstraintComplete,
    /// The matcher failed (see `error`); should not happen with a compiled constraint.
    ConstraintError,
}

/// The result for one sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Generated ids, forced tokens and a final end-of-sequence token included.
    pub tokens: Vec<u32>,
    /// Decoded text without special tokens (`skip_special_tokens`); when a stop string
    /// ended the sequence, the text before it (added tokens such as `<think>` kept).
    pub text: String,
    /// `log_softmax(logits / temperature)` of each token over the whole vocabulary, before
    /// any mask or truncation — the "old" log-probs of GRPO.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
    pub error: Option<String>,
    /// The budget ran short and the closing policy, not the model, chose the last tokens.
    #[serde(default)]
    pub closed: bool,
    /// Times this output was generated again because its JSON failed the full schema.
    #[serde(default)]
    pub retries: usize,
}

/// Where the time of a call went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationStats {
    /// Forward passes, prefill included.
    pub steps: usize,
    pub generated_tokens: usize,
    /// Tokens appended without sampling because the grammar allowed only one continuation.
    pub forced_tokens: usize,
    pub forward_secs: f64,
    /// Masking, sampling and matcher updates (all sequences in parallel).
    pub host_secs: f64,
    /// Every mask computation, in microseconds.
    pub mask_micros: Vec<f64>,
    pub total_secs: f64,
    /// Sequences generated again because their JSON failed the full schema.
    #[serde(default)]
    pub retries: usize,
}

impl GenerationStats {
    fn absorb(&mut self, other: GenerationStats) {
        self.steps += other.steps;
        self.generated_tokens += other.generated_tokens;
        self.forced_tokens += other.forced_tokens;
        self.forward_secs += other.forward_secs;
        self.host_secs += other.host_secs;
        self.mask_micros.extend(other.mask_micros);
        self.retries += other.retries;
    }
}

/// A plain-text reasoning block the generator closes itself (see `ThinkClose`).
#[derive(Debug, Clone)]
struct ThinkGuard {
    close: Vec<u32>,
    budget: usize,
    used: usize,
    open: bool,
}

/// Generates batches of completions for one tokenizer.
pub struct Generator {
    env: ConstraintEnv,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    pad: u32,
    vocab: usize,
    ranks: ClosingRanks,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator").field("env", &self.env).field("eos", &self.eos).finish()
    }
}

/// What one forward pass hands back to the host.
pub(crate) struct StepOutput {
    /// Next-token logits, `[batch * vocab]`.
    pub(crate) last: Vec<f32>,
    /// `logsumexp(logits / t)` per row.
    pub(crate) lse: Vec<f32>,
    /// Log-probs of each row's forced tokens.
    pub(crate) scored: Vec<Vec<f32>>,
    /// How many of each row's pending tokens the pass took (the rest wait for the next).
    pub(crate) fed: Vec<usize>,
}

pub(crate) struct Seq {
    matcher: Option<Matcher>,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    /// Tokens to feed at the next forward.
    pending: Vec<u32>,
    /// How many trailing `pending` tokens still need their log-prob from that forward.
    unscored: usize,
    finish: Option<FinishReason>,
    error: Option<String>,
    bytes: Vec<u8>,
    stop_at: Option<usize>,
    mask_micros: Vec<f64>,
    forced: usize,
    watch: ClosingWatch,
    think: Option<ThinkGuard>,
    /// The allowed tokens at the matcher's current state, computed while the forward pass
    /// that produces this step's logits ran.
    premask: Option<std::result::Result<Vec<u32>, String>>,
}

impl Seq {
    /// A sequence about to prefill `r.prompt` under `cc`.
    pub(crate) fn new(r: &Request, cc: Option<&CompiledConstraint>, seed: u64, config: &GenerateConfig) -> Self {
        Seq {
            think: cc.and_then(|c| c.think_close.clone()).map(|t| ThinkGuard { close: t.tokens, budget: t.budget, used: 0, open: true }),
            matcher: cc.map(CompiledConstraint::matcher),
            rng: ChaCha8Rng::seed_from_u64(seed),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            pending: r.prompt.clone(),
            unscored: 0,
            finish: (config.max_new_tokens == 0).then_some(FinishReason::Length),
            error: None,
            bytes: Vec::new(),
            stop_at: None,
            mask_micros: Vec::new(),
            forced: 0,
            watch: ClosingWatch::default(),
            premask: None,
        }
    }

    pub(crate) fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    pub(crate) fn clear_pending(&mut self) {
        self.pending.clear();
    }

    /// Whether the sequence waits for a forward pass (its new tokens, or the log-probs of
    /// forced ones).
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Tokens the next forward pass feeds this sequence (the cache positions it adds).
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

impl Generator {
    /// `n_vocab` is the model's logits width (≥ the tokenizer's vocabulary).
    pub fn new(tokenizer: &Tokenizer, n_vocab: usize, extra_eos: &[u32]) -> Result<Self> {
        let mut eos = tokenizer.special().eos_ids.clone();
        for &e in extra_eos {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        if eos.is_empty() {
            return Err(DecodeError::Tokenizer("no end-of-sequence token is known".into()));
        }
        let mut tok = tokenizer.clone();
        let mut special = tok.special().clone();
        special.eos_ids = eos.clone();
        tok = Tokenizer::from_inner(tok.inner().clone(), special);
        let env = ConstraintEnv::new(&tok, n_vocab)?;
        let pad = tokenizer.pad_id_for(n_vocab);
        let ranks = ClosingRanks::new(env.trie(), &eos);
        Ok(Self { env, vocab: tokenizer.vocab_size().min(n_vocab), tokenizer: tok, eos, pad, ranks })
    }

    /// For a model: its vocabulary size and end-of-sequence ids.
    pub fn for_model<B: Backend>(tokenizer: &Tokenizer, model: &CausalLm<B>) -> Result<Self> {
        let c = model.config();
        Self::new(tokenizer, c.vocab_size, &c.eos_token_ids)
    }

    pub fn env(&self) -> &ConstraintEnv {
        &self.env
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Compiles a constraint now (errors name the schema keyword and pointer).
    pub fn compile(&self, constraint: &Constraint) -> Result<Option<CompiledConstraint>> {
        constraint.compile(&self.env)
    }

    /// The fewest tokens a whole output of `constraint` takes when the closing policy writes
    /// it (forced tokens and the end-of-sequence token included); `None` when more than
    /// `limit`, or for [`Constraint::None`]. No smaller budget can end in a complete
    /// output; with [`crate::CLOSING_MARGIN`] more, an output ends complete unless one sampled
    /// token raises the cost by more than the margin between two measurements.
    pub fn closing_cost(&self, constraint: &Constraint, limit: usize) -> Result<Option<usize>> {
        Ok(match constraint.compile(&self.env)? {
            Some(cc) => {
                let prefix = cc.think_close.as_ref().map(|t| t.tokens.clone()).unwrap_or_default();
                closing_cost(&cc.matcher(), &self.ranks, limit, &prefix)
            }
            None => None,
        })
    }

    /// The reasoning budget a think-then-JSON request actually gets: at most what
    /// `max_new_tokens` leaves after the tags and the JSON's own closing cost (and the
    /// closing margin), so the JSON always has room.
    pub(crate) fn fit_think_budget(&self, constraint: &Constraint, config: &GenerateConfig) -> Result<Constraint> {
        let Constraint::ThinkThenJson { schema, max_think_tokens, style } = constraint else {
            return Ok(constraint.clone());
        };
        if *max_think_tokens == 0 {
            return Ok(constraint.clone());
        }
        let budget = config.max_new_tokens;
        let bare = Constraint::ThinkThenJson { schema: schema.clone(), max_think_tokens: 0, style: *style };
        let rest = self.closing_cost(&bare, budget)?.unwrap_or(budget);
        let margin = crate::closing::MARGIN.min(budget / 4).max(1);
        let fitted = (*max_think_tokens).min(budget.saturating_sub(rest + margin));
        Ok(Constraint::ThinkThenJson { schema: schema.clone(), max_think_tokens: fitted, style: *style })
    }

    /// Generates one completion per request. Every constraint is compiled before the
    /// first forward pass, so a bad schema fails the call without generating anything.
    /// Finished JSON-schema outputs are validated against the full schema and regenerated
    /// up to [`GenerateConfig::max_retries`] times when invalid.
    pub fn generate<B: Backend>(
        &self,
        model: &CausalLm<B>,
        requests: &[Request],
        config: &GenerateConfig,
    ) -> Result<(Vec<Completion>, GenerationStats)> {
        let start = Instant::now();
        let mut fitted: Vec<(Constraint, Constraint)> = Vec::new();
        let mut effective = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let constraint = match fitted.iter().find(|(c, _)| c == &r.constraint) {
                Some((_, f)) => f.clone(),
                None => {
                    let f = self.fit_think_budget(&r.constraint, config)?;
                    fitted.push((r.constraint.clone(), f.clone()));
                    f
                }
            };
            effective.push(Request { prompt: r.prompt.clone(), constraint, seed: Some(seed_of(r, i, config)) });
        }
        let (mut out, mut stats, checks) = self.generate_once(model, &effective, config)?;
        let violation = |i: usize, c: &Completion| violation_of(checks[i].as_ref(), c);
        let mut failing: Vec<(usize, String)> = out.iter().enumerate().filter_map(|(i, c)| violation(i, c).map(|v| (i, v))).collect();
        let retry_config = retry_config(config);
        for attempt in 1..=config.max_retries as u64 {
            if failing.is_empty() {
                break;
            }
            let again: Vec<Request> = failing
                .iter()
                .map(|&(i, _)| {
                    let r = &effective[i];
                    Request { prompt: r.prompt.clone(), constraint: r.constraint.clone(), seed: Some(retry_seed(r.seed.unwrap_or(0), attempt)) }
                })
                .collect();
            let (outs, s, _) = self.generate_once(model, &again, &retry_config)?;
            stats.absorb(s);
            stats.retries += again.len();
            let mut still = Vec::new();
            for (&(i, _), o) in failing.iter().zip(outs) {
                let retries = out[i].retries + 1;
                out[i] = Completion { retries, ..o };
                if let Some(v) = violation(i, &out[i]) {
                    still.push((i, v));
                }
            }
            failing = still;
        }
        for (i, why) in failing {
            give_up(&mut out[i], checks[i].as_ref(), &why);
        }
        stats.total_secs = start.elapsed().as_secs_f64();
        Ok((out, stats))
    }

    /// One pass of generation; also returns each request's full-schema check.
    #[allow(clippy::type_complexity)]
    fn generate_once<B: Backend>(
        &self,
        model: &CausalLm<B>,
        requests: &[Request],
        config: &GenerateConfig,
    ) -> Result<(Vec<Completion>, GenerationStats, Vec<Option<OutputCheck>>)> {
        let start = Instant::now();
        if requests.is_empty() {
            return Ok((Vec::new(), GenerationStats::default(), Vec::new()));
        }
        if let Some(i) = requests.iter().position(|r| r.prompt.is_empty()) {
            return Err(DecodeError::Input(format!("request {i} has an empty prompt")));
        }
        let mut compiled: Vec<(&Constraint, Option<CompiledConstraint>)> = Vec::new();
        let mut seqs = Vec::with_capacity(requests.len());
        let mut checks = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let index = match compiled.iter().position(|(c, _)| *c == &r.constraint) {
                Some(k) => k,
                None => {
                    compiled.push((&r.constraint, r.constraint.compile(&self.env)?));
                    compiled.len() - 1
                }
            };
            let cc = compiled[index].1.as_ref();
            checks.push(cc.and_then(|c| c.check.clone()));
            seqs.push(Seq::new(r, cc, seed_of(r, i, config), config));
        }

        let mut stats = GenerationStats::default();
        let mut cache = KvCache::<B>::new(requests.len(), model.config().num_hidden_layers);
        let temperature = config.sampling.temperature;
        // Requests with the same prompt (GRPO's G completions of a prompt) share one prefill:
        // each prompt is run once and its cache rows copied to every request that has it.
        let mut unique: Vec<usize> = Vec::new();
        let mut row_of = Vec::with_capacity(requests.len());
        for r in requests {
            match unique.iter().position(|&u| requests[u].prompt == r.prompt) {
                Some(k) => row_of.push(k),
                None => {
                    row_of.push(unique.len());
                    unique.push(row_of.len() - 1);
                }
            }
        }
        if config.use_cache && unique.len() < requests.len() {
            let t0 = Instant::now();
            let prompts: Vec<Vec<u32>> = unique.iter().map(|&u| requests[u].prompt.clone()).collect();
            let (shared, last, lse) = self.prefill(model, &prompts, temperature)?;
            cache = shared.select_rows(&row_of)?;
            stats.forward_secs += t0.elapsed().as_secs_f64();
            stats.steps += 1;
            let t1 = Instant::now();
            let vocab = model.config().vocab_size;
            seqs.par_iter_mut().zip(row_of.par_iter()).for_each(|(seq, &u)| {
                seq.pending.clear();
                if seq.finish.is_none() {
                    self.advance(seq, &last[u * vocab..(u + 1) * vocab], lse[u], config);
                }
            });
            stats.host_secs += t1.elapsed().as_secs_f64();
        }
        loop {
            if seqs.iter().all(|s| s.pending.is_empty()) {
                break;
            }
            let t0 = Instant::now();
            let StepOutput { last, lse, scored, fed } = masks_during(&mut seqs, |seqs| self.forward_step(model, requests, seqs, &mut cache, config.use_cache, |_| temperature))?;
            stats.forward_secs += t0.elapsed().as_secs_f64();
            stats.steps += 1;

            let t1 = Instant::now();
            let vocab = model.config().vocab_size;
            seqs.par_iter_mut().enumerate().for_each(|(b, seq)| {
                self.after_forward(seq, &scored[b], fed[b], &last[b * vocab..(b + 1) * vocab], lse[b], config);
            });
            stats.host_secs += t1.elapsed().as_secs_f64();
        }

        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            out.push(self.completion(seq, &mut stats)?);
        }
        stats.total_secs = start.elapsed().as_secs_f64();
        Ok((out, stats, checks))
    }

    /// Prefills left-padded `prompts` into a new cache; returns it with each row's last
    /// logits (`[rows * vocab]`) and `logsumexp(logits / temperature)`.
    pub(crate) fn prefill<B: Backend>(&self, model: &CausalLm<B>, prompts: &[Vec<u32>], temperature: f32) -> Result<(KvCache<B>, Vec<f32>, Vec<f32>)> {
        let mut cache = KvCache::<B>::new(prompts.len(), model.config().num_hidden_layers);
        let hidden = model.hidden_cached(&TokenBatch::new(prompts, Padding::Left, self.pad)?, &mut cache)?;
        let (last, lse) = model.last_position_scores(&hidden, if temperature > 0.0 { temperature } else { 1.0 })?;
        Ok((cache, last, lse))
    }

    /// The finished sequence's [`Completion`]; adds its counts to `stats`.
    pub(crate) fn completion(&self, seq: Seq, stats: &mut GenerationStats) -> Result<Completion> {
        let text = self.text_of(&seq)?;
        stats.generated_tokens += seq.tokens.len();
        stats.forced_tokens += seq.forced;
        stats.mask_micros.extend(seq.mask_micros);
        Ok(Completion {
            tokens: seq.tokens,
            text,
            logprobs: seq.logprobs,
            finish: seq.finish.unwrap_or(FinishReason::Length),
            error: seq.error,
            closed: seq.watch.closing,
            retries: 0,
        })
    }

    /// The text of a sequence so far (its final text once finished).
    pub(crate) fn text_of(&self, seq: &Seq) -> Result<String> {
        Ok(match seq.stop_at {
            Some(cut) => String::from_utf8_lossy(&seq.bytes[..cut.min(seq.bytes.len())]).into_owned(),
            None => {
                let shown: Vec<u32> = seq.tokens.iter().copied().filter(|t| (*t as usize) < self.vocab).collect();
                self.tokenizer.decode(&shown, true)?
            }
        })
    }

    /// Runs the model on every sequence's pending tokens. Returns the next-token logits of
    /// each row (`[batch * vocab]`, host), each row's `logsumexp(logits / t)`, and the
    /// log-probs of each row's forced tokens (`[batch][unscored]`).
    pub(crate) fn forward_step<B: Backend>(
        &self,
        model: &CausalLm<B>,
        requests: &[Request],
        seqs: &[Seq],
        cache: &mut KvCache<B>,
        use_cache: bool,
        temperature_of: impl Fn(usize) -> f32,
    ) -> Result<StepOutput> {
        let b = seqs.len();
        let fed = fed_per_row(seqs, use_cache);
        let width = fed.iter().copied().max().unwrap_or(1).max(1);
        let hidden = if use_cache {
            let mut ids = Vec::with_capacity(b * width);
            let mut mask = Vec::with_capacity(b * width);
            for (s, &n) in seqs.iter().zip(&fed) {
                let pad = width - n;
                ids.extend(std::iter::repeat_n(self.pad, pad).chain(s.pending[..n].iter().copied()));
                mask.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, n)));
            }
            let batch = TokenBatch { ids, mask, batch: b, seq: width, segments: None };
            // Forced runs pad every other row; squeeze the pads out once they dominate.
            if cache.len() > 2 * cache.max_valid() + 16 {
                cache.compact();
            }
            model.hidden_cached(&batch, cache)?
        } else {
            // Full recomputation: prompt + everything generated, left-padded, so the newest
            // tokens of every row sit in the last columns just as with the cache.
            let full: Vec<Vec<u32>> = requests
                .iter()
                .zip(seqs)
                .map(|(r, s)| r.prompt.iter().chain(&s.tokens).copied().collect())
                .collect();
            let batch = TokenBatch::new(&full, Padding::Left, self.pad)?;
            model.hidden_tail(model.hidden_states(&batch)?, width)
        };
        let s = hidden.dims()[1];
        let vocab = model.config().vocab_size;
        let effective = |bi: usize| {
            let t = temperature_of(bi);
            if t > 0.0 {
                t
            } else {
                1.0
            }
        };
        let t0 = effective(0);
        let (last, mut lse) = model.last_position_scores(&hidden, t0)?;
        for (bi, l) in lse.iter_mut().enumerate() {
            *l = lse_at(&last[bi * vocab..(bi + 1) * vocab], effective(bi), t0, *l);
        }

        // Forced tokens: logits only at the positions that predict them (the token before),
        // one projection per temperature among the rows that have them. A row scores the
        // forced tokens whose predecessor this pass took: pending[j] for j ≤ fed (the last
        // one from the pass's last position).
        let scorable = |bi: usize| -> std::ops::Range<usize> {
            let seq = &seqs[bi];
            let n = seq.pending.len();
            (n - seq.unscored).max(1)..(fed[bi] + 1).min(n)
        };
        let mut scored = vec![Vec::new(); b];
        let mut temperatures: Vec<f32> = (0..b).filter(|&bi| !scorable(bi).is_empty()).map(effective).collect();
        temperatures.sort_by(f32::total_cmp);
        temperatures.dedup();
        for t in temperatures {
            let rows: Vec<usize> = (0..b).filter(|&bi| !scorable(bi).is_empty() && effective(bi) == t).collect();
            if rows.is_empty() {
                continue;
            }
            let mut positions = Vec::new();
            let mut targets = Vec::new();
            for &bi in &rows {
                // The row's fed tokens sit in the last fed[bi] columns.
                let first_column = bi * s + s - fed[bi];
                for j in scorable(bi) {
                    positions.push(first_column + j - 1);
                    targets.push(seqs[bi].pending[j]);
                }
            }
            let lp = model.hidden_logprobs(hidden.clone(), &positions, &targets, t)?;
            let mut it = lp.into_iter();
            for &bi in &rows {
                scored[bi] = it.by_ref().take(scorable(bi).len()).collect();
            }
        }
        Ok(StepOutput { last, lse, scored, fed })
    }

    /// Takes a forward pass's output for one sequence: the log-probs of its forced tokens,
    /// then (unless finished) its next token from `row`.
    pub(crate) fn after_forward(&self, seq: &mut Seq, scored: &[f32], fed: usize, row: &[f32], lse: f32, config: &GenerateConfig) {
        if seq.pending.is_empty() {
            return;
        }
        // Log-probs of forced tokens come from the positions before them; they are the first
        // of the trailing `unscored` tokens.
        let n = seq.tokens.len();
        for (k, &lp) in scored.iter().enumerate() {
            seq.logprobs[n - seq.unscored + k] = lp;
        }
        seq.unscored -= scored.len();
        seq.pending.drain(..fed.min(seq.pending.len()));
        if !seq.pending.is_empty() {
            // Forced tokens left for the next pass; the next token is sampled after them.
            return;
        }
        seq.unscored = 0;
        if seq.finish.is_none() {
            self.advance(seq, row, lse, config);
        }
    }

    /// Samples one token for `seq` from its logits row, updates its matcher, appends forced
    /// tokens, and decides whether it has finished.
    pub(crate) fn advance(&self, seq: &mut Seq, row: &[f32], lse: f32, config: &GenerateConfig) {
        let allowed = match seq.matcher.as_mut() {
            Some(m) => {
                let mask = match seq.premask.take() {
                    Some(mask) => mask,
                    None => allowed_ids(m, &mut seq.mask_micros),
                };
                match mask {
                    Ok(ids) => Some(ids),
                    Err(e) => return fail(seq, e),
                }
            }
            None => None,
        };
        let remaining = config.max_new_tokens.saturating_sub(seq.tokens.len());
        let open_think: &[u32] = match &seq.think {
            Some(g) if g.open => &g.close,
            _ => &[],
        };
        let closing = match (&allowed, seq.matcher.as_ref()) {
            (Some(_), Some(m)) => config.close_within_budget && seq.watch.must_close(m, &self.ranks, remaining, open_think),
            _ => false,
        };
        // A plain-text reasoning block ends by our hand, `</think>` written out, at its budget
        // or when closing begins.
        let mut extra = Vec::new();
        let think_due = seq.think.as_ref().is_some_and(|g| g.open && (g.used >= g.budget || closing));
        let sampled = match &allowed {
            Some(ids) if think_due && seq.think.as_ref().is_some_and(|g| g.close.first().is_some_and(|t| ids.contains(t))) => {
                let g = seq.think.as_mut().map(|g| {
                    g.open = false;
                    g.close.clone()
                });
                let close = g.unwrap_or_default();
                extra = close[1..].to_vec();
                close.first().copied()
            }
            Some(ids) if closing => {
                let token = self.ranks.pick(ids, &seq.watch.uses);
                if let Some(t) = token {
                    seq.watch.uses.add(t);
                }
                token
            }
            Some(ids) => sample(row, Some(ids), &config.sampling, &mut seq.rng),
            None => sample(&row[..self.vocab.min(row.len())], None, &config.sampling, &mut seq.rng),
        };
        let Some(token) = sampled else {
            return fail(seq, "the constraint allows no token here".into());
        };
        if let Some(g) = seq.think.as_mut().filter(|g| g.open) {
            g.used += 1;
        }
        seq.tokens.push(token);
        seq.logprobs.push(logprob_with_lse(row, token as usize, config.sampling.temperature, lse));
        if self.eos.contains(&token) {
            seq.finish = Some(FinishReason::Eos);
            return;
        }
        self.append_bytes(seq, &[token], config);
        if seq.think.as_ref().is_some_and(|g| g.open) && ends_think(&seq.bytes) {
            if let Some(g) = seq.think.as_mut() {
                g.open = false;
            }
        }
        let mut feed = vec![token];
        if let Some(mut m) = seq.matcher.take() {
            let result = self.follow_grammar(seq, &mut m, token, &extra, config, &mut feed);
            seq.matcher = Some(m);
            if let Err(e) = result {
                return fail(seq, e);
            }
        }
        if seq.finish.is_none() && seq.tokens.len() >= config.max_new_tokens {
            seq.finish = Some(FinishReason::Length);
        }
        // Feed the new tokens unless nothing more will be read from the model: a finished
        // sequence is still fed when its forced tokens need log-probs.
        if seq.finish.is_none() || seq.unscored > 0 {
            seq.pending = feed;
        }
    }

    /// Advances the matcher by the sampled token, then appends what the grammar forces.
    fn follow_grammar(&self, seq: &mut Seq, m: &mut Matcher, token: u32, extra: &[u32], config: &GenerateConfig, feed: &mut Vec<u32>) -> std::result::Result<(), String> {
        {
            if let Err(e) = m.consume_token(token) {
                return Err(e.to_string());
            }
            // Tokens the generator writes itself after `token` (the rest of `</think>`).
            let room = config.max_new_tokens.saturating_sub(seq.tokens.len());
            let extra = &extra[..extra.len().min(room)];
            if !extra.is_empty() && !m.is_stopped() {
                if let Err(e) = m.consume_tokens(extra) {
                    return Err(e.to_string());
                }
                seq.tokens.extend_from_slice(extra);
                seq.logprobs.extend(std::iter::repeat_n(f32::NAN, extra.len()));
                seq.forced += extra.len();
                seq.unscored += extra.len();
                self.append_bytes(seq, extra, config);
                feed.extend_from_slice(extra);
            }
            if m.is_stopped() {
                seq.finish.get_or_insert(FinishReason::ConstraintComplete);
            } else if seq.finish.is_none() {
                let room = config.max_new_tokens.saturating_sub(seq.tokens.len());
                let mut ff = m.compute_ff_tokens();
                ff.truncate(room);
                if !ff.is_empty() {
                    if let Err(e) = m.consume_tokens(&ff) {
                        return Err(e.to_string());
                    }
                    seq.tokens.extend_from_slice(&ff);
                    seq.logprobs.extend(std::iter::repeat_n(f32::NAN, ff.len()));
                    seq.forced += ff.len();
                    seq.unscored += ff.len();
                    self.append_bytes(seq, &ff, config);
                    feed.extend_from_slice(&ff);
                    if m.is_stopped() {
                        seq.finish.get_or_insert(FinishReason::ConstraintComplete);
                    }
                }
            }
        }
        Ok(())
    }

    fn append_bytes(&self, seq: &mut Seq, tokens: &[u32], config: &GenerateConfig) {
        let from = seq.bytes.len();
        seq.bytes.extend(self.env.trie().decode_ext(tokens, true));
        if config.stop.is_empty() || seq.stop_at.is_some() {
            return;
        }
        let longest = config.stop.iter().map(String::len).max().unwrap_or(0);
        let window_start = from.saturating_sub(longest);
        let window = &seq.bytes[window_start..];
        let hit = config
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| find(window, s.as_bytes()))
            .min();
        if let Some(pos) = hit {
            seq.stop_at = Some(window_start + pos);
            seq.finish.get_or_insert(FinishReason::Stop);
        }
    }
}

/// How many pending tokens each row feeds to the next forward pass. A prompt (pending tokens
/// with none of them forced: a prefill) goes in whole. Otherwise a step stays within
/// [`DECODE_STEP_ROWS`] rows (batch × width): every row is padded to the widest, so one
/// row's long forced run fed at once would make the pass a many-row GEMM that is mostly
/// padding (a batch of 16 with one 20-token run: 320 rows for 35 tokens). Rows with more
/// forced tokens than the width feed the rest in the next passes, before their next sample.
fn fed_per_row(seqs: &[Seq], use_cache: bool) -> Vec<usize> {
    let prefill = seqs.iter().any(|s| s.pending.len() > 1 && s.unscored == 0);
    let width = if !use_cache || prefill { usize::MAX } else { (DECODE_STEP_ROWS / seqs.len().max(1)).max(1) };
    seqs.iter().map(|s| s.pending.len().min(width)).collect()
}

/// The tokens `m` allows now; the time it took is pushed to `micros`.
fn allowed_ids(m: &mut Matcher, micros: &mut Vec<f64>) -> std::result::Result<Vec<u32>, String> {
    let t = Instant::now();
    let mask = m.compute_mask();
    micros.push(t.elapsed().as_secs_f64() * 1e6);
    let mask = mask.map_err(|e| e.to_string())?;
    let mut ids = Vec::with_capacity(mask.num_set().min(4096));
    mask.iter_set_entries(|i| ids.push(i as u32));
    Ok(ids)
}

/// Runs `forward` while the next masks of the constrained, unfinished sequences are computed
/// beside it: a mask depends only on the tokens already consumed, so it need not wait for
/// the logits (llguidance's advice: masks off the forward pass's critical path).
pub(crate) fn masks_during<R: Send>(seqs: &mut [Seq], forward: impl FnOnce(&[Seq]) -> R + Send) -> R {
    let mut taken: Vec<(usize, Matcher, Vec<f64>)> = Vec::new();
    for (i, s) in seqs.iter_mut().enumerate() {
        if s.finish.is_none() && s.premask.is_none() {
            if let Some(m) = s.matcher.take() {
                taken.push((i, m, Vec::new()));
            }
        }
    }
    if taken.is_empty() {
        return forward(seqs);
    }
    let (out, masks) = rayon::join(
        || forward(seqs),
        || taken.par_iter_mut().map(|(_, m, micros)| allowed_ids(m, micros)).collect::<Vec<_>>(),
    );
    for ((i, m, micros), mask) in taken.into_iter().zip(masks) {
        let s = &mut seqs[i];
        s.matcher = Some(m);
        s.premask = Some(mask);
        s.mask_micros.extend(micros);
    }
    out
}

/// Why a finished output breaks the full schema (`None`: it does not, or it is no JSON
/// output that validation applies to).
pub(crate) fn violation_of(check: Option<&OutputCheck>, c: &Completion) -> Option<String> {
    let check = check?;
    matches!(c.finish, FinishReason::ConstraintComplete | FinishReason::Eos).then(|| check.violation(&c.text)).flatten()
}

/// The settings of a regeneration: a greedy request would repeat itself, so it samples.
pub(crate) fn retry_config(config: &GenerateConfig) -> GenerateConfig {
    let mut retry = config.clone();
    if retry.sampling.temperature <= 0.0 {
        retry.sampling.temperature = 1.0;
    }
    retry
}

/// The seed of regeneration number `attempt` of a request seeded with `seed`.
pub(crate) fn retry_seed(seed: u64, attempt: u64) -> u64 {
    seed ^ attempt.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Ends an output that stayed invalid under the full schema as a constraint error naming
/// the keywords only validation checks.
pub(crate) fn give_up(c: &mut Completion, check: Option<&OutputCheck>, why: &str) {
    let named = check.map(|c| c.validated.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    let keywords = if named.is_empty() {
        "the grammar and the validator disagree".to_string()
    } else {
        format!("keywords checked only after generation: {named}")
    };
    c.finish = FinishReason::ConstraintError;
    c.error = Some(format!("constraint_error: invalid under the full schema after {} tries ({keywords}): {why}", c.retries + 1));
}

/// The seed a request samples with: its own, or one derived from the config's and its index.
pub(crate) fn seed_of(r: &Request, i: usize, config: &GenerateConfig) -> u64 {
    r.seed.unwrap_or_else(|| config.sampling.seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// Whether the text has reached the end of a plain-text reasoning block.
fn ends_think(bytes: &[u8]) -> bool {
    let close = crate::constraint::THINK_CLOSE.as_bytes();
    let tail = &bytes[bytes.len().saturating_sub(close.len() + 64)..];
    find(tail, close).is_some()
}

fn fail(seq: &mut Seq, message: String) {
    seq.finish = Some(FinishReason::ConstraintError);
    seq.error = Some(message);
    seq.unscored = 0;
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

