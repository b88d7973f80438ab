//! Continuous batching: a running batch that sequences join between forward passes and
//! leave as soon as they finish, each with its own settings (temperature, length, stop
//! strings, constraint). A server feeds it requests as they arrive; nobody waits for the
//! slowest sequence of a fixed batch.
//!
//! The per-token work is [`Generator`]'s own — the same masking, sampling, forced tokens,
//! closing policy and full-schema validation as [`Generator::generate`] — so one request
//! alone in a [`Batcher`] gives what `generate` gives it.

use std::time::Instant;

use burn::tensor::backend::Backend;
use rayon::prelude::*;
use thinkjson_model::{CausalLm, KvCache, ModelConfig};

use crate::constraint::OutputCheck;
use crate::error::{DecodeError, Result};
use crate::generate::{give_up, masks_during, retry_config, retry_seed, violation_of, Seq, StepOutput};
use crate::sampling::lse_at;
use crate::{Completion, GenerateConfig, GenerationStats, Generator, Request};

/// A request entering a [`Batcher`]: the caller's id for it, the prompt and constraint, and
/// its own settings (`sampling.seed` seeds it unless `request.seed` is set).
#[derive(Debug, Clone)]
pub struct Admission {
    pub id: u64,
    pub request: Request,
    pub config: GenerateConfig,
}

/// What the batch knows of a live sequence besides its decoding state.
struct Member {
    id: u64,
    /// The request as generated: think budget fitted, seed fixed.
    request: Request,
    config: GenerateConfig,
    check: Option<OutputCheck>,
    retries: usize,
    /// The first try's seed; retry `k` samples with `retry_seed(seed, k)`.
    seed: u64,
}

/// KV-cache memory a running batch may hold when no budget is set: 2 GiB, which beside the
/// weights and one prompt's prefill keeps a ≤ 1.5B model's decoding well inside 24 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 2 << 30;

/// Cached positions (sequences × padded width) a batch may hold: `setting`, or when it is 0
/// [`DEFAULT_CACHE_BYTES`] over the model's bytes per position (SmolLM2-135M: 46,603;
/// Qwen2.5-1.5B: 37,449).
pub fn cache_position_budget(setting: usize, config: &ModelConfig) -> usize {
    if setting > 0 {
        return setting;
    }
    (DEFAULT_CACHE_BYTES / config.kv_bytes_per_position().max(1)).max(1) as usize
}

/// A running batch over one KV cache. Use: [`Batcher::join`] new requests, [`Batcher::step`]
/// once per forward pass, [`Batcher::take_finished`] after each step; [`Batcher::leave`]
/// drops a sequence whose client went away.
///
/// Memory: the cache holds sequences × padded width positions (a joining prompt pads the
/// shorter side to the longer). With a budget ([`Batcher::with_position_budget`]) and
/// callers that admit only what [`Batcher::fits`] allows, it never holds more: every live
/// sequence was admitted with room for its prompt and all its new tokens, and the batch
/// drops its pad columns (`KvCache::compact`) whenever a join or a step would otherwise
/// pass the budget. A batch that is empty admits one request whatever its size.
pub struct Batcher<B: Backend> {
    seqs: Vec<Seq>,
    members: Vec<Member>,
    cache: KvCache<B>,
    layers: usize,
    stats: GenerationStats,
    /// Cached positions the cache may hold (`usize::MAX`: no budget).
    budget: usize,
    /// The most cached positions held after a join or a step.
    peak_positions: usize,
}

impl<B: Backend> Batcher<B> {
    pub fn new(model: &CausalLm<B>) -> Self {
        let layers = model.config().num_hidden_layers;
        Self { seqs: Vec::new(), members: Vec::new(), cache: KvCache::new(0, layers), layers, stats: GenerationStats::default(), budget: usize::MAX, peak_positions: 0 }
    }

    /// Bounds the cache to `positions` cached positions (see the type's doc and
    /// [`cache_position_budget`]).
    pub fn with_position_budget(mut self, positions: usize) -> Self {
        self.budget = positions.max(1);
        self
    }

    /// Whether `joining` more sequences, the longest of them `longest` positions once done
    /// (prompt + max new tokens), fit the budget beside the live ones, each live one counted
    /// with room for all the new tokens it may still take. Pad columns do not count: the
    /// batch drops them when it has to.
    pub fn fits(&self, joining: usize, longest: usize) -> bool {
        let live = self.members.iter().map(|m| m.config.max_new_tokens).max().map_or(0, |n| self.cache.max_valid().saturating_add(n));
        (self.len() + joining).saturating_mul(live.max(longest)) <= self.budget
    }

    /// Cached positions now: sequences × padded width.
    pub fn cached_positions(&self) -> usize {
        self.len() * self.cache_len()
    }

    /// The most cached positions the batch has held after a join or a step.
    pub fn peak_cached_positions(&self) -> usize {
        self.peak_positions
    }

    /// Drops the cache's pad columns when `sequences` rows `width` wide would pass the
    /// budget and dropping them helps.
    fn keep_within_budget(&mut self, sequences: usize, width: usize) {
        if sequences.saturating_mul(width) > self.budget && self.cache.len() > self.cache.max_valid() {
            self.cache.compact();
        }
    }

    fn note_positions(&mut self) {
        self.peak_positions = self.peak_positions.max(self.cached_positions());
    }

    /// Live sequences.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Ids of the live sequences, in batch order.
    pub fn ids(&self) -> Vec<u64> {
        self.members.iter().map(|m| m.id).collect()
    }

    /// Cached positions per sequence (pads included): the batch's attention width.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Forward passes, tokens and time so far.
    pub fn stats(&self) -> &GenerationStats {
        &self.stats
    }

    /// Prefills the prompts of `joining` (requests with the same prompt share one prefill)
    /// and adds them to the batch with their first token sampled. A request whose
    /// constraint does not compile is returned with its error and does not join.
    pub fn join(&mut self, generator: &Generator, model: &CausalLm<B>, joining: Vec<Admission>) -> Result<Vec<(u64, DecodeError)>> {
        let mut refused = Vec::new();
        let mut seqs = Vec::new();
        let mut members = Vec::new();
        for a in joining {
            match self.admit(generator, a) {
                Ok((seq, member)) => {
                    seqs.push(seq);
                    members.push(member);
                }
                Err((id, e)) => refused.push((id, e)),
            }
        }
        self.prefill(generator, model, seqs, members)?;
        Ok(refused)
    }

    fn admit(&self, generator: &Generator, a: Admission) -> std::result::Result<(Seq, Member), (u64, DecodeError)> {
        let Admission { id, request, config } = a;
        if request.prompt.is_empty() {
            return Err((id, DecodeError::Input(format!("request {id} has an empty prompt"))));
        }
        let constraint = generator.fit_think_budget(&request.constraint, &config).map_err(|e| (id, e))?;
        let compiled = constraint.compile(generator.env()).map_err(|e| (id, e))?;
        let seed = request.seed.unwrap_or(config.sampling.seed);
        let request = Request { prompt: request.prompt, constraint, seed: Some(seed) };
        let seq = Seq::new(&request, compiled.as_ref(), seed, &config);
        let check = compiled.and_then(|c| c.check);
        Ok((seq, Member { id, request, config, check, retries: 0, seed }))
    }

    /// Prefills the new sequences' prompts, samples their first tokens and joins them to the
    /// cache. Each distinct prompt runs alone: a padded batch of prompts of different lengths
    /// takes the masked attention path, which at real prompt lengths (hundreds of tokens) was
    /// measured 3× slower in total than one prompt at a time; requests that share a prompt
    /// share its prefill.
    fn prefill(&mut self, generator: &Generator, model: &CausalLm<B>, seqs: Vec<Seq>, members: Vec<Member>) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut groups: Vec<(Vec<u32>, Vec<usize>)> = Vec::new();
        for (i, m) in members.iter().enumerate() {
            match groups.iter_mut().find(|(p, _)| *p == m.request.prompt) {
                Some((_, rows)) => rows.push(i),
                None => groups.push((m.request.prompt.clone(), vec![i])),
            }
        }
        let mut cache = KvCache::new(0, self.layers);
        let mut firsts = Vec::with_capacity(groups.len());
        for (prompt, rows) in &groups {
            let (one, last, lse) = generator.prefill(model, std::slice::from_ref(prompt), 1.0)?;
            cache.append_rows(if rows.len() > 1 { one.select_rows(&vec![0; rows.len()])? } else { one })?;
            firsts.push((last, lse[0]));
        }
        self.stats.forward_secs += t0.elapsed().as_secs_f64();
        self.stats.steps += groups.len();
        // Cache rows follow the groups; put the sequences in that order.
        let mut slots: Vec<Option<(Seq, Member)>> = seqs.into_iter().zip(members).map(Some).collect();
        let mut ordered = Vec::with_capacity(slots.len());
        for (g, (_, rows)) in groups.iter().enumerate() {
            for &i in rows {
                if let Some((seq, m)) = slots[i].take() {
                    ordered.push((seq, m, g));
                }
            }
        }
        let t1 = Instant::now();
        ordered.par_iter_mut().for_each(|(seq, m, g)| {
            let (row, lse) = (&firsts[*g].0, firsts[*g].1);
            seq.clear_pending();
            if seq.finish().is_none() {
                generator.advance(seq, row, lse_at(row, m.config.sampling.temperature, 1.0, lse), &m.config);
            }
        });
        self.stats.host_secs += t1.elapsed().as_secs_f64();
        let (joining, width) = (cache.batch(), cache.len());
        self.keep_within_budget(self.len() + joining, self.cache_len().max(width));
        self.cache.append_rows(cache)?;
        for (seq, m, _) in ordered {
            self.seqs.push(seq);
            self.members.push(m);
        }
        self.note_positions();
        Ok(())
    }

    /// One forward pass over every live sequence's new tokens, then each samples its next
    /// token (its masks were computed during the pass). Does nothing when no sequence waits.
    pub fn step(&mut self, generator: &Generator, model: &CausalLm<B>) -> Result<()> {
        if !self.seqs.iter().any(Seq::has_pending) {
            return Ok(());
        }
        let widest_feed = self.seqs.iter().map(Seq::pending_len).max().unwrap_or(0);
        self.keep_within_budget(self.len(), self.cache_len() + widest_feed);
        let t0 = Instant::now();
        let cache = &mut self.cache;
        let members = &self.members;
        let temperature_of = |b: usize| members[b].config.sampling.temperature;
        let StepOutput { last, lse, scored, fed } = masks_during(&mut self.seqs, |seqs| generator.forward_step(model, &[], seqs, cache, true, temperature_of))?;
        self.stats.forward_secs += t0.elapsed().as_secs_f64();
        self.stats.steps += 1;
        let t1 = Instant::now();
        let vocab = model.config().vocab_size;
        self.seqs.par_iter_mut().zip(self.members.par_iter()).enumerate().for_each(|(b, (seq, m))| {
            generator.after_forward(seq, &scored[b], fed[b], &last[b * vocab..(b + 1) * vocab], lse[b], &m.config);
        });
        self.stats.host_secs += t1.elapsed().as_secs_f64();
        self.note_positions();
        Ok(())
    }

    /// The text generated so far by sequence `id` (`None`: not in the batch).
    pub fn text(&self, generator: &Generator, id: u64) -> Result<Option<String>> {
        match self.members.iter().position(|m| m.id == id) {
            Some(i) => generator.text_of(&self.seqs[i]).map(Some),
            None => Ok(None),
        }
    }

    /// Whether `id`'s text so far is final as it grows: false when its output is validated
    /// against keywords the grammar does not enforce, so a finished output may be generated
    /// again (stream it only once finished).
    pub fn streams(&self, id: u64) -> bool {
        self.members.iter().find(|m| m.id == id).is_none_or(|m| m.check.as_ref().is_none_or(|c| c.validated.is_empty()))
    }

    /// Removes the finished sequences and returns their completions. An output that breaks
    /// the full schema starts again with a new seed (up to `max_retries`), as in
    /// [`Generator::generate`]; it is returned once valid or given up on.
    pub fn take_finished(&mut self, generator: &Generator, model: &CausalLm<B>) -> Result<Vec<(u64, Completion)>> {
        let done: Vec<usize> = (0..self.seqs.len()).filter(|&i| self.seqs[i].finish().is_some() && !self.seqs[i].has_pending()).collect();
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let (seqs, members) = self.remove(&done)?;
        let mut out = Vec::new();
        let mut again = Vec::new();
        for (seq, m) in seqs.into_iter().zip(members) {
            let mut c = generator.completion(seq, &mut self.stats)?;
            c.retries = m.retries;
            match violation_of(m.check.as_ref(), &c) {
                Some(why) if m.retries >= m.config.max_retries => {
                    give_up(&mut c, m.check.as_ref(), &why);
                    out.push((m.id, c));
                }
                Some(_) => again.push(m),
                None => out.push((m.id, c)),
            }
        }
        if !again.is_empty() {
            self.stats.retries += again.len();
            let mut seqs = Vec::with_capacity(again.len());
            for m in &mut again {
                m.retries += 1;
                m.config = retry_config(&m.config);
                let seed = retry_seed(m.seed, m.retries as u64);
                m.request.seed = Some(seed);
                let compiled = m.request.constraint.compile(generator.env())?;
                seqs.push(Seq::new(&m.request, compiled.as_ref(), seed, &m.config));
            }
            self.prefill(generator, model, seqs, again)?;
        }
        Ok(out)
    }

    /// Drops sequence `id` (its client went away); `false` when it is not in the batch.
    pub fn leave(&mut self, id: u64) -> Result<bool> {
        match self.members.iter().position(|m| m.id == id) {
            Some(i) => {
                self.remove(&[i])?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Takes rows `rows` (ascending) out of the batch and its cache.
    fn remove(&mut self, rows: &[usize]) -> Result<(Vec<Seq>, Vec<Member>)> {
        let keep: Vec<usize> = (0..self.seqs.len()).filter(|i| rows.binary_search(i).is_err()).collect();
        self.cache.keep_sequences(&keep)?;
        if self.cache.len() > 2 * self.cache.max_valid() + 16 {
            self.cache.compact();
        }
        let mut seqs = Vec::with_capacity(rows.len());
        let mut members = Vec::with_capacity(rows.len());
        for &i in rows.iter().rev() {
            seqs.push(self.seqs.remove(i));
            members.push(self.members.remove(i));
        }
        seqs.reverse();
        members.reverse();
        Ok((seqs, members))
    }
}
