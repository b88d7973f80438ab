//! The engine: one thread that owns the model and a [`Batcher`]. Jobs arrive on a channel;
//! between forward passes the waiting ones join the running batch (while the batch has
//! room in sequences and in KV tokens), finished sequences leave, and a sequence whose
//! client went away is dropped. Results go back on each job's own channel.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinkjson_decode::{Admission, Batcher, Completion, Generator};
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::CausalLm;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;

/// A request's choices, queued for the engine.
pub struct Job {
    /// One per choice (`n`), ids unique in the server.
    pub choices: Vec<Admission>,
    /// Send text snapshots while generating (streaming requests).
    pub stream: bool,
    pub events: UnboundedSender<Event>,
    /// KV positions the job may take: prompt + max_tokens, per choice.
    pub reserve: usize,
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// The whole text of choice `index` so far (streaming only; sent when it changed).
    Text { index: usize, text: String },
    /// Choice `index` is done.
    Done { index: usize, completion: Completion },
    /// The job failed before generating (a constraint that does not compile, an engine error).
    Failed { message: String },
}

/// How much the running batch may hold.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Sequences decoded together.
    pub max_batch: usize,
    /// KV positions: the running sequences' reserves (prompt + max_tokens) summed, and the
    /// padded cache (sequences × the longest reserve, [`Batcher::fits`]) both stay within it,
    /// so the cache's memory is bounded whatever requests arrive.
    pub max_batch_tokens: usize,
}

struct Running {
    job: Arc<JobShared>,
    index: usize,
    sent: String,
}

struct JobShared {
    events: UnboundedSender<Event>,
    stream: bool,
    reserve: usize,
}

/// Runs until `jobs` closes (the server shut down) and nothing is left running.
pub fn run<B: Backend>(model: &CausalLm<B>, generator: &Generator, jobs: Receiver<Job>, capacity: Capacity, metrics: &Metrics) {
    let mut batch = Batcher::new(model).with_position_budget(capacity.max_batch_tokens);
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut running: HashMap<u64, Running> = HashMap::new();
    let mut reserved = 0usize;
    let mut open = true;
    while open || !waiting.is_empty() || !batch.is_empty() {
        // Block only when there is nothing to decode.
        if batch.is_empty() && waiting.is_empty() {
            match jobs.recv_timeout(Duration::from_millis(200)) {
                Ok(job) => waiting.push_back(job),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Join at the step boundary, first come first served. Every job fits an empty batch
        // (checked on arrival), so one that does not fit now waits for room.
        let mut joining = Vec::new();
        let mut longest = 0;
        while let Some(job) = waiting.front() {
            if job.events.is_closed() {
                waiting.pop_front();
                metrics.dequeued(1);
                continue;
            }
            let n = job.choices.len();
            let need = job.reserve * n;
            let fits = batch.len() + joining.len() + n <= capacity.max_batch
                && reserved + need <= capacity.max_batch_tokens
                && batch.fits(joining.len() + n, longest.max(job.reserve));
            let alone = batch.is_empty() && joining.is_empty();
            if !fits && !alone {
                break;
            }
            let Some(job) = waiting.pop_front() else { break };
            metrics.dequeued(1);
            reserved += need;
            longest = longest.max(job.reserve);
            let shared = Arc::new(JobShared { events: job.events, stream: job.stream, reserve: job.reserve });
            for (index, a) in job.choices.into_iter().enumerate() {
                running.insert(a.id, Running { job: shared.clone(), index, sent: String::new() });
                joining.push(a);
            }
        }
        if !joining.is_empty() {
            let started = Instant::now();
            let count = joining.len();
            let joined = batch.join(generator, model, joining);
            metrics.joined(count, started.elapsed());
            match joined {
                Ok(refused) => {
                    for (id, e) in refused {
                        if let Some(r) = running.remove(&id) {
                            reserved -= r.job.reserve;
                            let _ = r.job.events.send(Event::Failed { message: e.to_string() });
                        }
                    }
                }
                Err(e) => fail_all(&mut batch, &mut running, &mut reserved, &format!("prefill failed: {e}")),
            }
        }
        // A client that went away frees its sequences now.
        let gone: Vec<u64> = running.iter().filter(|(_, r)| r.job.events.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            if let Some(r) = running.remove(&id) {
                reserved -= r.job.reserve;
                let _ = batch.leave(id);
                metrics.cancelled(1);
            }
        }
        metrics.set_running(batch.len());
        metrics.cache(batch.cached_positions(), batch.peak_cached_positions(), capacity.max_batch_tokens);
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        if let Err(e) = batch.step(generator, model) {
            fail_all(&mut batch, &mut running, &mut reserved, &format!("decoding step failed: {e}"));
            continue;
        }
        metrics.step(batch.len(), started.elapsed());
        metrics.cache(batch.cached_positions(), batch.peak_cached_positions(), capacity.max_batch_tokens);
        match batch.take_finished(generator, model) {
            Ok(finished) => {
                for (id, completion) in finished {
                    if let Some(r) = running.remove(&id) {
                        reserved -= r.job.reserve;
                        let _ = r.job.events.send(Event::Done { index: r.index, completion });
                    }
                }
            }
            Err(e) => fail_all(&mut batch, &mut running, &mut reserved, &format!("finishing sequences failed: {e}")),
        }
        for (id, r) in running.iter_mut().filter(|(id, r)| r.job.stream && batch.streams(**id)) {
            if let Ok(Some(text)) = batch.text(generator, *id) {
                if text != r.sent {
                    r.sent.clone_from(&text);
                    let _ = r.job.events.send(Event::Text { index: r.index, text });
                }
            }
        }
    }
}

/// An engine error ends every running request with a message, and the batch starts empty.
fn fail_all<B: Backend>(batch: &mut Batcher<B>, running: &mut HashMap<u64, Running>, reserved: &mut usize, message: &str) {
    for id in batch.ids() {
        let _ = batch.leave(id);
    }
    for (_, r) in running.drain() {
        let _ = r.job.events.send(Event::Failed { message: message.to_string() });
    }
    *reserved = 0;
}
