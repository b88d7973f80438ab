//! `cargo xtask predict --endpoint URL`: the same predictions file as `predict --model`, from
//! any OpenAI-compatible server (ours, vLLM, llama.cpp's, OpenAI). Rows go out `--concurrency`
//! at a time; 429, 5xx and broken connections are retried with backoff; each answer is
//! appended and synced as it comes, so `--resume` continues a killed run.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use thinkjson_eval::Prediction;
use thinkjson_model::ChatMessage;
use thinkjson_synth::Row;

use crate::cmd_predict::{plan, ConstraintKind, Decoding, Plan, PredictSummary};

/// What the endpoint is asked to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text.
    Text,
    /// `response_format: json_schema` with the row's schema (strict).
    #[value(alias = "json-schema")]
    JsonSchema,
}

#[derive(Args, Clone)]
pub struct EndpointArgs {
    /// An OpenAI-compatible server's base URL (`http://127.0.0.1:8000/v1`); rows go to its
    /// /chat/completions.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The `model` to ask the endpoint for.
    #[arg(long, requires = "endpoint")]
    pub api_model: Option<String>,
    /// The environment variable holding the API key (sent as a bearer token).
    #[arg(long, requires = "endpoint")]
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// With --endpoint: text, or json_schema (the row's schema as `response_format`).
    #[arg(long, value_enum, default_value = "text")]
    pub response_format: ResponseFormat,
    /// Tries per row on 429, 5xx or a broken connection before the row is reported failed.
    #[arg(long, default_value_t = 6)]
    pub max_tries: usize,
}

/// The chat/completions URL of a base URL given with or without `/v1`.
fn chat_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/chat/completions") {
        base.to_string()
    } else if base.ends_with("/v1") {
        format!("{base}/chat/completions")
    } else {
        format!("{base}/v1/chat/completions")
    }
}

pub fn predict_endpoint(args: &EndpointArgs, decoding: &Decoding, rows: &[Row], out: &Path, resume: bool) -> Result<PredictSummary> {
    let started = Instant::now();
    let Some(endpoint) = &args.endpoint else { bail!("--endpoint is required without --model") };
    let Some(model) = args.api_model.clone() else { bail!("--api-model is required with --endpoint (the `model` the server serves)") };
    if decoding.constraint != ConstraintKind::None {
        bail!("--constraint applies to --model; with --endpoint ask for --response-format json_schema");
    }
    if args.concurrency == 0 || args.max_tries == 0 {
        bail!("--concurrency and --max-tries must be at least 1");
    }
    let key = match &args.api_key_env {
        Some(var) => Some(std::env::var(var).with_context(|| format!("--api-key-env {var}: the variable is not set"))?),
        None => None,
    };
    let Plan { pending, kept, skipped } = plan(rows, out, resume)?;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(out).with_context(|| format!("opening {}", out.display()))?;
    let client = Client { url: chat_url(endpoint), model, key, format: args.response_format, max_tries: args.max_tries, agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build() };
    let bar = crate::metrics_log::step_bar("predict", (pending.len() + kept) as u64, kept as u64);
    let queue = Mutex::new(pending.iter());
    let sink = Mutex::new((file, 0usize, Vec::<String>::new()));
    let client = Arc::new(client);
    std::thread::scope(|scope| {
        for _ in 0..args.concurrency.min(pending.len().max(1)) {
            scope.spawn(|| loop {
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some(row) = next else { break };
                let result = client.predict(row, decoding);
                let Ok(mut sink) = sink.lock() else { break };
                match result.and_then(|p| {
                    let line = serde_json::to_string(&p)? + "\n";
                    sink.0.write_all(line.as_bytes()).and_then(|_| sink.0.sync_data()).with_context(|| format!("appending to {}", out.display()))
                }) {
                    Ok(()) => sink.1 += 1,
                    Err(e) => {
                        bar.suspend(|| eprintln!("predict: row `{}`: {e:#}", row.id));
                        sink.2.push(row.id.clone());
                    }
                }
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    let (_, written, failed) = sink.into_inner().map_err(|_| anyhow::anyhow!("a prediction thread panicked"))?;
    Ok(PredictSummary { rows: rows.len(), kept, written, skipped, failed, out: out.to_path_buf(), secs: started.elapsed().as_secs_f64(), cache_budget: 0, peak_cached_positions: 0 })
}

struct Client {
    url: String,
    model: String,
    key: Option<String>,
    format: ResponseFormat,
    max_tries: usize,
    agent: ureq::Agent,
}

impl Client {
    fn body(&self, row: &Row, d: &Decoding) -> Value {
        let messages = thinkjson_synth::prompt::messages_with(&row.text, &row.schema, ChatMessage::new);
        let messages: Vec<Value> = messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        let mut body = json!({"model": self.model, "messages": messages, "max_tokens": d.max_new_tokens, "temperature": d.temperature});
        if d.temperature > 0.0 {
            body["seed"] = Value::from(d.seed);
        }
        if self.format == ResponseFormat::JsonSchema {
            body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "row_schema", "schema": row.schema, "strict": true}});
        }
        body
    }

    /// One row's prediction, retried on what a retry can fix.
    fn predict(&self, row: &Row, d: &Decoding) -> Result<Prediction> {
        let body = self.body(row, d);
        let mut wait = Duration::from_millis(250);
        for attempt in 1..=self.max_tries {
            let started = Instant::now();
            let mut req = self.agent.post(&self.url).set("Content-Type", "application/json");
            if let Some(k) = &self.key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let retry_why = match req.send_string(&body.to_string()) {
                Ok(resp) => {
                    let text = resp.into_string().context("reading the answer")?;
                    let v: Value = serde_json::from_str(&text).with_context(|| format!("the answer is not JSON: {}", clip(&text)))?;
                    let completion = v["choices"][0]["message"]["content"].as_str().map(str::to_string);
                    let Some(completion) = completion else { bail!("the answer has no choices[0].message.content: {}", clip(&text)) };
                    let tokens = v["usage"]["completion_tokens"].as_f64();
                    return Ok(Prediction { id: row.id.clone(), completion, latency_ms: Some(started.elapsed().as_secs_f64() * 1000.0), tokens, closed: None });
                }
                Err(ureq::Error::Status(code, resp)) if code == 429 || code >= 500 => format!("HTTP {code}: {}", clip(&resp.into_string().unwrap_or_default())),
                Err(ureq::Error::Status(code, resp)) => bail!("HTTP {code}: {}", clip(&resp.into_string().unwrap_or_default())),
                Err(e) => format!("{e}"),
            };
            if attempt == self.max_tries {
                bail!("gave up after {attempt} tries: {retry_why}");
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(8));
        }
        bail!("no try was made")
    }
}

fn clip(s: &str) -> String {
    let mut end = s.len().min(300);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
