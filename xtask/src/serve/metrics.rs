//! Counters for `GET /metrics`, in Prometheus' text format.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the request-latency histogram buckets.
const BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<Vec<(String, u16, u64)>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    queued: AtomicU64,
    running: AtomicU64,
    cancelled: AtomicU64,
    steps: AtomicU64,
    step_rows: AtomicU64,
    step_micros: AtomicU64,
    joins: AtomicU64,
    join_micros: AtomicU64,
    cache_positions: AtomicU64,
    cache_positions_peak: AtomicU64,
    cache_position_budget: AtomicU64,
    latency: Mutex<(Vec<u64>, f64, u64)>,
}

impl Metrics {
    /// A request answered with `status` on `endpoint`, `secs` after it arrived.
    pub fn answered(&self, endpoint: &str, status: u16, secs: f64) {
        if let Ok(mut r) = self.requests.lock() {
            match r.iter_mut().find(|(e, s, _)| e == endpoint && *s == status) {
                Some(entry) => entry.2 += 1,
                None => r.push((endpoint.to_string(), status, 1)),
            }
        }
        if let Ok(mut l) = self.latency.lock() {
            if l.0.is_empty() {
                l.0 = vec![0; BUCKETS.len()];
            }
            for (i, &b) in BUCKETS.iter().enumerate() {
                if secs <= b {
                    l.0[i] += 1;
                }
            }
            l.1 += secs;
            l.2 += 1;
        }
    }

    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens.fetch_add(prompt as u64, Relaxed);
        self.completion_tokens.fetch_add(completion as u64, Relaxed);
    }

    /// Reserves a queue slot; `false` when `limit` jobs already wait.
    pub fn try_enqueue(&self, limit: usize) -> bool {
        self.queued.fetch_update(Relaxed, Relaxed, |q| (q < limit as u64).then_some(q + 1)).is_ok()
    }

    pub fn dequeued(&self, n: u64) {
        let _ = self.queued.fetch_update(Relaxed, Relaxed, |q| Some(q.saturating_sub(n)));
    }

    pub fn cancelled(&self, n: u64) {
        self.cancelled.fetch_add(n, Relaxed);
    }

    pub fn set_running(&self, n: usize) {
        self.running.store(n as u64, Relaxed);
    }

    pub fn step(&self, rows: usize, took: Duration) {
        self.steps.fetch_add(1, Relaxed);
        self.step_rows.fetch_add(rows as u64, Relaxed);
        self.step_micros.fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// Sequences that joined the batch (prefill and first token) and the time it took.
    pub fn joined(&self, sequences: usize, took: Duration) {
        self.joins.fetch_add(sequences as u64, Relaxed);
        self.join_micros.fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// The running batch's KV cache in positions (sequences × padded width): now, the most
    /// since the server started, and the budget (`--max-batch-tokens`).
    pub fn cache(&self, held: usize, peak: usize, budget: usize) {
        self.cache_positions.store(held as u64, Relaxed);
        self.cache_positions_peak.store(peak as u64, Relaxed);
        self.cache_position_budget.store(budget as u64, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP thinkjson_requests_total Requests answered, by endpoint and status.\n# TYPE thinkjson_requests_total counter\n");
        if let Ok(r) = self.requests.lock() {
            for (e, s, n) in r.iter() {
                out.push_str(&format!("thinkjson_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}\n"));
            }
        }
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        };
        gauge(&mut out, "thinkjson_prompt_tokens_total", "Prompt tokens of answered requests.", "counter", self.prompt_tokens.load(Relaxed));
        gauge(&mut out, "thinkjson_completion_tokens_total", "Generated tokens of answered requests.", "counter", self.completion_tokens.load(Relaxed));
        gauge(&mut out, "thinkjson_queue_depth", "Requests waiting to join the running batch.", "gauge", self.queued.load(Relaxed));
        gauge(&mut out, "thinkjson_running_sequences", "Sequences in the running batch.", "gauge", self.running.load(Relaxed));
        gauge(&mut out, "thinkjson_cancelled_sequences_total", "Sequences dropped because their client went away.", "counter", self.cancelled.load(Relaxed));
        gauge(&mut out, "thinkjson_decode_steps_total", "Forward passes of the running batch.", "counter", self.steps.load(Relaxed));
        gauge(&mut out, "thinkjson_decode_step_rows_total", "Sequences summed over decode steps (rows per step = this / steps).", "counter", self.step_rows.load(Relaxed));
        out.push_str(&format!(
            "# HELP thinkjson_decode_step_seconds_total Time in decode steps.\n# TYPE thinkjson_decode_step_seconds_total counter\nthinkjson_decode_step_seconds_total {:.6}\n",
            self.step_micros.load(Relaxed) as f64 / 1e6
        ));
        gauge(&mut out, "thinkjson_joined_sequences_total", "Sequences that joined the running batch.", "counter", self.joins.load(Relaxed));
        out.push_str(&format!(
            "# HELP thinkjson_join_seconds_total Time joining sequences (prefill, first token, cache merge).\n# TYPE thinkjson_join_seconds_total counter\nthinkjson_join_seconds_total {:.6}\n",
            self.join_micros.load(Relaxed) as f64 / 1e6
        ));
        gauge(&mut out, "thinkjson_kv_cache_positions", "KV positions the running batch holds (sequences x padded width).", "gauge", self.cache_positions.load(Relaxed));
        gauge(&mut out, "thinkjson_kv_cache_positions_peak", "The most KV positions the running batch has held since the server started.", "gauge", self.cache_positions_peak.load(Relaxed));
        gauge(&mut out, "thinkjson_kv_cache_position_budget", "The most KV positions the running batch may hold (--max-batch-tokens).", "gauge", self.cache_position_budget.load(Relaxed));
        out.push_str("# HELP thinkjson_request_latency_seconds Time from arrival to the last byte of the answer.\n# TYPE thinkjson_request_latency_seconds histogram\n");
        if let Ok(l) = self.latency.lock() {
            for (i, b) in BUCKETS.iter().enumerate() {
                out.push_str(&format!("thinkjson_request_latency_seconds_bucket{{le=\"{b}\"}} {}\n", l.0.get(i).copied().unwrap_or(0)));
            }
            out.push_str(&format!("thinkjson_request_latency_seconds_bucket{{le=\"+Inf\"}} {}\n", l.2));
            out.push_str(&format!("thinkjson_request_latency_seconds_sum {:.6}\nthinkjson_request_latency_seconds_count {}\n", l.1, l.2));
        }
        out
    }
}
