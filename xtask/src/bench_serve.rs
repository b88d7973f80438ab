//! `cargo xtask bench serve`: load on loopback against `cargo xtask serve` — CLIENTS
//! concurrent clients × REQUESTS chat requests each — once with continuous batching and once
//! one request at a time (`--max-batch 1`), same model, prompts and seeds, one sitting.
//! Prompts are short records (about 40 tokens) or, with `--serve-prompts extraction`, the
//! synthetic extraction prompts the pipeline trains on (text + schema, several hundred
//! tokens). Reports requests/s, completion tokens/s, p50/p99 latency and the server's peak RSS.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bench::{BenchArgs, Figure};

struct ServerProcess {
    child: Child,
    base: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(model: &Path, max_batch: usize) -> Result<ServerProcess> {
    let exe = std::env::current_exe().context("this executable")?;
    let mut child = Command::new(exe)
        .args(["serve", "--model"])
        .arg(model)
        .args(["--port", "0", "--exit-after-secs", "3600", "--max-batch", &max_batch.to_string(), "--max-n", &max_batch.min(8).to_string()])
        .args(["--served-model-name", "bench"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the server")?;
    let stderr = child.stderr.take().context("server stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let base = loop {
        let Some(line) = lines.next() else { bail!("the server exited before listening") };
        let line = line.context("server stderr")?;
        if let Some(at) = line.find("http://") {
            break line[at..].split_whitespace().next().unwrap_or_default().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(ServerProcess { child, base })
}

/// Peak RSS of process `pid` (VmHWM), MiB.
fn peak_rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Load {
    secs: f64,
    requests: usize,
    tokens: u64,
    latencies: Vec<f64>,
}

/// The chat messages of request `k` of client `c`.
fn messages(prompts: &[Vec<Value>], c: usize, k: usize, per_client: usize) -> Value {
    if prompts.is_empty() {
        return json!([
            {"role": "system", "content": "Extract the record as JSON."},
            {"role": "user", "content": format!("Lot AB-{:03}: {} units counted on line {}, released.", c, 10 + k, c % 7)}
        ]);
    }
    Value::from(prompts[(c * per_client + k) % prompts.len()].clone())
}

fn load(base: &str, clients: usize, per_client: usize, max_tokens: usize, prompts: &[Vec<Value>]) -> Result<Load> {
    let url = format!("{base}/v1/chat/completions");
    let started = Instant::now();
    let results: Vec<Result<Vec<(f64, u64)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let url = &url;
                scope.spawn(move || -> Result<Vec<(f64, u64)>> {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(3600)).build();
                    let mut out = Vec::new();
                    for k in 0..per_client {
                        let body = json!({"model": "bench", "max_tokens": max_tokens, "temperature": 0.7, "seed": c * per_client + k, "messages": messages(prompts, c, k, per_client)});
                        let t = Instant::now();
                        let resp = agent.post(url).set("Content-Type", "application/json").send_string(&body.to_string()).with_context(|| format!("client {c} request {k}"))?;
                        let v: Value = serde_json::from_str(&resp.into_string()?)?;
                        out.push((t.elapsed().as_secs_f64(), v["usage"]["completion_tokens"].as_u64().unwrap_or(0)));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))).collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut tokens = 0;
    for r in results {
        for (l, t) in r? {
            latencies.push(l);
            tokens += t;
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Load { secs, requests: latencies.len(), tokens, latencies })
}

/// The unlabelled figures of the server's `/metrics`.
fn metric_values(base: &str) -> Result<Vec<(String, f64)>> {
    let text = ureq::get(&format!("{base}/metrics")).call().context("GET /metrics")?.into_string()?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.parse().ok()?))
        })
        .collect())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn serve_suite(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    let [clients, per_client, max_tokens] = match args.serve_load.as_slice() {
        [a, b, c] => [*a, *b, *c],
        _ => bail!("--serve-load takes CLIENTS,REQUESTS,MAX_TOKENS"),
    };
    let scratch = tempfile::tempdir().context("scratch folder")?;
    let model: PathBuf = match &args.model {
        Some(m) => m.clone(),
        None => tiny_model(scratch.path())?,
    };
    let name = model.file_name().map_or_else(|| model.display().to_string(), |n| n.to_string_lossy().into_owned());
    let prompts: Vec<Vec<Value>> = match args.serve_prompts.as_str() {
        "short" => Vec::new(),
        "extraction" => thinkjson_synth::generate(thinkjson_synth::SynthConfig { rows: 32, seed: 5, ..Default::default() })?
            .iter()
            .map(|row| thinkjson_synth::prompt::messages_with(&row.text, &row.schema, |role, content| json!({"role": role, "content": content})))
            .collect(),
        other => bail!("--serve-prompts {other}: short or extraction"),
    };
    let name = format!("{name} ({} prompts)", args.serve_prompts);
    let mut rates = Vec::new();
    for (label, max_batch) in [("continuous batching (max batch 16)", 16), ("one at a time (max batch 1)", 1)] {
        let server = start(&model, max_batch)?;
        let l = load(&server.base, clients, per_client, max_tokens, &prompts)?;
        let rss = peak_rss_of(server.child.id());
        let scraped = metric_values(&server.base)?;
        let value = |name: &str| scraped.iter().find(|(n, _)| n == name).map_or(0.0, |(_, v)| *v);
        let push = |figures: &mut Vec<Figure>, what: &str, value: f64, unit: &'static str| {
            figures.push(Figure { name: format!("serve {name} {clients}x{per_client}x{max_tokens} {label}: {what}"), value, unit });
        };
        push(figures, "requests answered", l.requests as f64, "requests");
        push(figures, "throughput", l.requests as f64 / l.secs, "requests/s");
        push(figures, "completion tokens", l.tokens as f64 / l.secs, "tokens/s");
        push(figures, "latency p50", 1000.0 * percentile(&l.latencies, 0.5), "ms");
        push(figures, "latency p99", 1000.0 * percentile(&l.latencies, 0.99), "ms");
        push(figures, "server peak RSS", rss, "MiB");
        let steps = value("thinkjson_decode_steps_total");
        push(figures, "decode steps", steps, "steps");
        push(figures, "mean sequences per decode step", value("thinkjson_decode_step_rows_total") / steps.max(1.0), "rows");
        push(figures, "time in decode steps", value("thinkjson_decode_step_seconds_total"), "s");
        push(figures, "time joining (prefill + first token)", value("thinkjson_join_seconds_total"), "s");
        rates.push(l.tokens as f64 / l.secs);
    }
    figures.push(Figure { name: format!("serve {name}: continuous / one at a time (tokens/s)"), value: rates[0] / rates[1].max(1e-9), unit: "x" });
    Ok(())
}

/// A tiny random model with the committed Qwen tokenizer and chat template.
fn tiny_model(dir: &Path) -> Result<PathBuf> {
    let model = dir.join("tiny");
    let exe = std::env::current_exe().context("this executable")?;
    let o = Command::new(exe).args(["init-model", "--preset", "tiny", "--seed", "3", "--out"]).arg(&model).output().context("init-model")?;
    if !o.status.success() {
        bail!("init-model: {}", String::from_utf8_lossy(&o.stderr));
    }
    let assets = crate::model_ref::repo_root().join("assets/qwen");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(assets.join(f), model.join(f)).with_context(|| format!("copying {f}"))?;
    }
    Ok(model)
}
