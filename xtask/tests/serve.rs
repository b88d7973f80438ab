//! `cargo xtask serve` over loopback with a tiny random model: streaming and whole answers
//! agree, JSON-Schema answers validate, reasoning and content are separated, each bad
//! request gets its status and OpenAI-shaped error while the server keeps serving, a client
//! that leaves frees its sequence, 64 concurrent clients are all answered, a full queue
//! answers 429, a padded batch stays within `--max-batch-tokens`, and `predict --endpoint`
//! reproduces `predict --model`. Every server listens on 127.0.0.1 and stops by itself
//! (`--exit-after-secs`) or when its test ends.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(repo());
    c
}

/// One tiny random model (committed Qwen tokenizer and chat template) for every test.
fn tiny_model() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = dir.path().join("tiny");
        let o = xtask().args(["init-model", "--preset", "tiny", "--seed", "3", "--out"]).arg(&model).output().expect("init-model");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(repo().join("assets/qwen").join(f), model.join(f)).expect("copy tokenizer");
        }
        (dir, model)
    })
    .1
}

/// A running server; killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = xtask()
            .args(["serve", "--model"])
            .arg(tiny_model())
            .args(["--port", "0", "--exit-after-secs", "300"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(120);
        let base = loop {
            assert!(Instant::now() < deadline, "the server did not start");
            let line = lines.next().expect("server exited before listening").expect("stderr line");
            if let Some(at) = line.find("http://") {
                break line[at..].split_whitespace().next().expect("address").to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` (raw text) and returns (status, body).
    fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
        let mut req = ureq::post(&self.url(path)).timeout(Duration::from_secs(120)).set("Content-Type", "application/json");
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        match req.send_string(body) {
            Ok(r) => (r.status(), r.into_string().expect("body")),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().expect("body")),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    fn post(&self, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
        let (status, text) = self.post_raw(path, &body.to_string(), key);
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text}: {e}")))
    }

    fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&self.url(path)).timeout(Duration::from_secs(30)).call() {
            Ok(r) => (r.status(), r.into_string().expect("body")),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().expect("body")),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    /// A streamed chat answer: per choice, (reasoning, content, finish_reason); and the usage.
    fn stream(&self, body: &Value) -> (Vec<(String, String, String)>, Value) {
        let resp = ureq::post(&self.url("/v1/chat/completions")).timeout(Duration::from_secs(120)).set("Content-Type", "application/json").send_string(&body.to_string()).expect("stream");
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
        let mut choices = vec![(String::new(), String::new(), String::new()); body["n"].as_u64().unwrap_or(1) as usize];
        let mut usage = Value::Null;
        let mut done = false;
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.expect("line");
            let Some(data) = line.strip_prefix("data: ") else { continue };
            assert!(!done, "data after [DONE]");
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data).expect("chunk JSON");
            assert_eq!(chunk["object"], "chat.completion.chunk");
            if !chunk["usage"].is_null() {
                usage = chunk["usage"].clone();
            }
            for c in chunk["choices"].as_array().expect("choices") {
                let i = c["index"].as_u64().expect("index") as usize;
                choices[i].0.push_str(c["delta"]["reasoning_content"].as_str().unwrap_or(""));
                choices[i].1.push_str(c["delta"]["content"].as_str().unwrap_or(""));
                if let Some(f) = c["finish_reason"].as_str() {
                    choices[i].2 = f.to_string();
                }
            }
        }
        assert!(done, "the stream did not end with [DONE]");
        (choices, usage)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn schema() -> Value {
    json!({"type": "object", "properties": {
        "lot": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "units": {"type": "integer", "minimum": 0, "maximum": 999},
        "released": {"type": "boolean"}
    }, "required": ["lot", "units", "released"], "additionalProperties": false})
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "messages": [
        {"role": "system", "content": "Extract the record as JSON."},
        {"role": "user", "content": "Lot AB-123: 40 units, released."}
    ]});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

#[test]
fn streamed_and_whole_answers_agree_and_json_schema_answers_validate() {
    let server = Server::start(&[]);
    let validator = jsonschema::validator_for(&schema()).expect("validator");
    let format = json!({"type": "json_schema", "json_schema": {"name": "record", "schema": schema(), "strict": true}});
    let cases = [
        ("text", json!({"n": 2, "temperature": 0.8, "seed": 7, "max_tokens": 24})),
        ("json_schema", json!({"n": 2, "temperature": 0.9, "seed": 8, "max_tokens": 64, "response_format": format})),
        ("reasoning", json!({"n": 2, "temperature": 0.9, "seed": 9, "max_tokens": 96, "response_format": format, "reasoning_effort": "low"})),
        ("stop", json!({"temperature": 1.0, "seed": 10, "max_tokens": 40, "stop": ["e", "\n"]})),
    ];
    for (name, extra) in cases {
        let (status, whole) = server.post("/v1/chat/completions", &chat_body(extra.clone()), None);
        assert_eq!(status, 200, "{name}: {whole}");
        let mut streamed_body = chat_body(extra.clone());
        streamed_body["stream"] = json!(true);
        streamed_body["stream_options"] = json!({"include_usage": true});
        let (streamed, usage) = server.stream(&streamed_body);
        assert_eq!(usage, whole["usage"], "{name}: usage");
        for (i, choice) in whole["choices"].as_array().expect("choices").iter().enumerate() {
            let content = choice["message"]["content"].as_str().expect("content");
            let reasoning = choice["message"]["reasoning_content"].as_str().unwrap_or("");
            let finish = choice["finish_reason"].as_str().expect("finish_reason");
            assert_eq!((reasoning, content, finish), (streamed[i].0.as_str(), streamed[i].1.as_str(), streamed[i].2.as_str()), "{name} choice {i}");
            if name == "json_schema" || name == "reasoning" {
                let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{name}: {content:?}: {e}"));
                assert!(validator.is_valid(&v), "{name}: {v} breaks the schema");
                assert_eq!(finish, "stop", "{name}");
            }
            if name == "reasoning" {
                assert!(choice["message"]["reasoning_content"].is_string(), "{name}: no reasoning_content");
                for tag in ["<think>", "</think>", "<answer>", "</answer>"] {
                    assert!(!content.contains(tag) && !reasoning.contains(tag), "{name}: {tag} leaked: {reasoning:?} / {content:?}");
                }
            }
            if name == "stop" {
                assert!(!content.contains('e') && !content.contains('\n'), "stop strings in {content:?}");
            }
        }
        // Two choices with one seed differ (each choice samples with its own seed).
        if name == "text" {
            assert_ne!(whole["choices"][0]["message"]["content"], whole["choices"][1]["message"]["content"]);
        }
    }
    // The raw completions endpoint and the model list.
    let (status, c) = server.post("/v1/completions", &json!({"model": "tiny", "prompt": "Lot AB-123", "max_tokens": 5, "temperature": 0}), None);
    assert_eq!((status, c["object"].as_str()), (200, Some("text_completion")), "{c}");
    assert_eq!(c["usage"]["completion_tokens"], 5);
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&models).expect("json")["data"][0]["id"], "tiny");
}

#[test]
fn bad_requests_get_their_status_and_error_and_the_server_keeps_serving() {
    let server = Server::start(&["--api-key", "s3cret", "--max-body-bytes", "4096", "--context", "96", "--max-tokens", "32", "--max-n", "2", "--max-batch-tokens", "100"]);
    let key = Some("s3cret");
    let good = chat_body(json!({"max_tokens": 4, "temperature": 0}));
    let bad_schema = chat_body(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}}}}));
    let long = chat_body(json!({"messages": [{"role": "user", "content": "lot AB-123 ".repeat(60)}]}));
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        ("no key", good.to_string(), None, 401, "API key"),
        ("wrong key", good.to_string(), Some("nope"), 401, "incorrect API key"),
        ("malformed JSON", "{\"model\": \"tiny\", ".into(), key, 400, "malformed JSON"),
        ("unknown model", chat_body(json!({"model": "gpt-9"})).to_string(), key, 404, "gpt-9"),
        ("refused schema", bad_schema.to_string(), key, 400, "/properties/a/$ref"),
        ("unsupported field", chat_body(json!({"logit_bias": {"5": 3}})).to_string(), key, 400, "logit_bias"),
        ("prompt over the context", long.to_string(), key, 400, "context"),
        ("n above the limit", chat_body(json!({"n": 5})).to_string(), key, 400, "`n`"),
        ("max_tokens above the limit", chat_body(json!({"max_tokens": 500})).to_string(), key, 400, "max_tokens"),
        ("prompt + max_tokens over the context", chat_body(json!({"max_tokens": 32, "messages": [{"role": "user", "content": "lot AB-123 ".repeat(12)}]})).to_string(), key, 400, "context"),
        ("body over the limit", chat_body(json!({"messages": [{"role": "user", "content": "x".repeat(5000)}]})).to_string(), key, 413, "larger than 4096"),
        ("reasoning without JSON", chat_body(json!({"reasoning_effort": "low"})).to_string(), key, 400, "response_format"),
        ("choices over the batch budget", chat_body(json!({"n": 2, "max_tokens": 32})).to_string(), key, 400, "batch budget"),
    ];
    for (name, body, k, status, needle) in cases {
        let (got, text) = server.post_raw("/v1/chat/completions", &body, k);
        assert_eq!(got, status, "{name}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: not JSON: {text}: {e}"));
        let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{name}: no error.message in {v}"));
        assert!(message.contains(needle), "{name}: {message:?} lacks {needle:?}");
        assert!(v["error"]["type"].is_string(), "{name}: {v}");
        // Still serving after each.
        let (ok, answer) = server.post("/v1/chat/completions", &good, key);
        assert_eq!(ok, 200, "after {name}: {answer}");
    }
    let (status, _) = server.get("/nowhere");
    assert_eq!(status, 404);
    let (status, health) = server.get("/health");
    assert_eq!((status, health.contains("ok")), (200, true));
    let (_, metrics) = server.get("/metrics");
    for line in ["status=\"401\"} 2", "status=\"413\"} 1", "status=\"200\"} 13", "thinkjson_request_latency_seconds_count"] {
        assert!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
    }
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_sequence() {
    let server = Server::start(&["--max-tokens", "4000"]);
    let mut body = chat_body(json!({"max_tokens": 3000, "temperature": 1.0, "seed": 1, "stream": true}));
    body["messages"][1]["content"] = json!("Write a long story.");
    let resp = ureq::post(&server.url("/v1/chat/completions")).set("Content-Type", "application/json").send_string(&body.to_string()).expect("stream");
    let mut reader = resp.into_reader();
    let mut first = [0u8; 64];
    reader.read_exact(&mut first).expect("first bytes");
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, metrics) = server.get("/metrics");
        if metrics.contains("thinkjson_cancelled_sequences_total 1") && metrics.contains("thinkjson_running_sequences 0") {
            break;
        }
        assert!(Instant::now() < deadline, "the sequence was not freed:\n{metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, _) = server.post("/v1/chat/completions", &chat_body(json!({"max_tokens": 3})), None);
    assert_eq!(status, 200);
}

#[test]
fn sixty_four_concurrent_clients_are_all_answered() {
    let server = Server::start(&[]);
    let answered = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for client in 0..64 {
            let (server, answered) = (&server, &answered);
            scope.spawn(move || {
                for k in 0..4 {
                    let body = chat_body(json!({"max_tokens": 6, "temperature": 0.7, "seed": client * 4 + k}));
                    let (status, v) = server.post("/v1/chat/completions", &body, None);
                    assert_eq!(status, 200, "client {client} request {k}: {v}");
                    assert_eq!(v["usage"]["completion_tokens"].as_u64().map(|t| t > 0), Some(true), "{v}");
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(answered.into_inner(), 256);
    let (_, metrics) = server.get("/metrics");
    assert!(metrics.contains("endpoint=\"/v1/chat/completions\",status=\"200\"} 256"), "{metrics}");
}

#[test]
fn a_full_queue_answers_429() {
    let server = Server::start(&["--max-batch", "1", "--max-n", "1", "--max-queue", "1", "--max-tokens", "400"]);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let server = &server;
                scope.spawn(move || {
                    let (status, v) = server.post("/v1/chat/completions", &chat_body(json!({"max_tokens": 300, "temperature": 1.0, "seed": i})), None);
                    if status == 429 {
                        assert_eq!(v["error"]["code"], "queue_full", "{v}");
                    }
                    status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client")).collect()
    });
    assert!(statuses.iter().all(|&s| s == 200 || s == 429), "{statuses:?}");
    assert!(statuses.contains(&429) && statuses.contains(&200), "{statuses:?}");
}

/// The value of an unlabelled line of `GET /metrics`.
fn metric(text: &str, name: &str) -> u64 {
    let line = text.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or_else(|| panic!("no {name} in {text}"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

/// A long request is running when short ones arrive whose reserves (prompt + max_tokens)
/// still fit `--max-batch-tokens` beside it, but whose rows, padded to the long one's width,
/// would not: they wait, and the padded cache never passes the budget.
#[test]
fn a_padded_batch_stays_within_max_batch_tokens() {
    let budget: u64 = 600;
    let server = Server::start(&["--max-batch-tokens", &budget.to_string()]);
    let long_text = "Lot AB-123: 40 units, released. ".repeat(10);
    let long = json!({"model": "tiny", "stream": true, "max_tokens": 250, "temperature": 1.0, "seed": 1,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "system", "content": "Extract the record as JSON."}, {"role": "user", "content": long_text}]});
    let resp = ureq::post(&server.url("/v1/chat/completions")).timeout(Duration::from_secs(120)).set("Content-Type", "application/json").send_string(&long.to_string()).expect("long request");
    let mut lines = BufReader::new(resp.into_reader()).lines();
    // Its first chunk: the long request is queued (first) and running.
    assert!(lines.next().expect("first chunk").expect("line").starts_with("data: "));
    let shorts: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let server = &server;
                scope.spawn(move || {
                    let (status, v) = server.post("/v1/chat/completions", &chat_body(json!({"max_tokens": 8, "temperature": 1.0, "seed": 10 + i})), None);
                    assert_eq!(status, 200, "{v}");
                    v
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client")).collect()
    });
    let mut long_usage = Value::Null;
    for line in lines {
        let line = line.expect("line");
        if let Some(chunk) = line.strip_prefix("data: ").filter(|d| *d != "[DONE]") {
            let chunk: Value = serde_json::from_str(chunk).expect("chunk");
            if !chunk["usage"].is_null() {
                long_usage = chunk["usage"].clone();
            }
        }
    }
    // The set-up holds: the reserves fit side by side, two rows of the long one's width do not.
    let long_prompt = long_usage["prompt_tokens"].as_u64().expect("long usage");
    let long_reserve = long_prompt + 250;
    let short_reserve = shorts[0]["usage"]["prompt_tokens"].as_u64().expect("short usage") + 8;
    assert!(long_reserve + 4 * short_reserve <= budget && 2 * long_reserve > budget, "{long_reserve} {short_reserve}");
    assert!(long_usage["completion_tokens"].as_u64().expect("completion tokens") > 16, "{long_usage}");
    let (_, metrics) = server.get("/metrics");
    let peak = metric(&metrics, "thinkjson_kv_cache_positions_peak");
    assert!(peak <= budget && peak >= long_prompt, "peak {peak} of {budget}, long prompt {long_prompt}");
    assert_eq!(metric(&metrics, "thinkjson_kv_cache_position_budget"), budget);
}

#[test]
fn predict_over_the_endpoint_reproduces_predict_with_the_model() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rows = dir.path().join("rows.jsonl");
    let o = xtask().args(["synth", "--rows", "6", "--seed", "5", "--out"]).arg(&rows).output().expect("synth");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let server = Server::start(&["--api-key", "k1"]);
    for (format, constraint) in [("text", "none"), ("json_schema", "json_schema")] {
        let local = dir.path().join(format!("local-{format}.jsonl"));
        let remote = dir.path().join(format!("remote-{format}.jsonl"));
        let o = xtask().args(["predict", "--model"]).arg(tiny_model()).args(["--max-new-tokens", "48", "--constraint", constraint, "--data"]).arg(&rows).arg("--out").arg(&local).output().expect("predict");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = xtask()
            .args(["predict", "--endpoint", &format!("{}/v1", server.base), "--api-model", "tiny", "--api-key-env", "THINKJSON_TEST_KEY"])
            .args(["--max-new-tokens", "48", "--response-format", format, "--concurrency", "3", "--data"])
            .arg(&rows)
            .arg("--out")
            .arg(&remote)
            .env("THINKJSON_TEST_KEY", "k1")
            .output()
            .expect("predict --endpoint");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let read = |p: &Path| -> std::collections::BTreeMap<String, String> {
            std::fs::read_to_string(p)
                .expect("predictions")
                .lines()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).expect("line");
                    (v["id"].as_str().expect("id").to_string(), v["completion"].as_str().expect("completion").to_string())
                })
                .collect()
        };
        let (a, b) = (read(&local), read(&remote));
        assert_eq!(a.len(), 6);
        assert_eq!(a, b, "{format}: greedy predictions differ");
        let report = dir.path().join(format!("eval-{format}"));
        let o = xtask().args(["eval", "--data"]).arg(&rows).arg("--predictions").arg(format!("local={}", local.display())).arg("--predictions").arg(format!("remote={}", remote.display())).arg("--out").arg(&report).output().expect("eval");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: Value = serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).expect("report")).expect("json");
        let overall = |i: usize, k: &str| r["runs"][i]["overall"][k].clone();
        for k in ["valid_json", "schema_valid", "mean_match"] {
            assert_eq!(overall(0, k), overall(1, k), "{format}: {k}");
        }
    }
    // A wrong key is not retried into success: the rows are reported and the run fails.
    let out = dir.path().join("denied.jsonl");
    let o = xtask()
        .args(["predict", "--endpoint", &server.base, "--api-model", "tiny", "--api-key-env", "THINKJSON_TEST_KEY", "--data"])
        .arg(&rows)
        .arg("--out")
        .arg(&out)
        .env("THINKJSON_TEST_KEY", "wrong")
        .output()
        .expect("predict");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("HTTP 401"), "{}", String::from_utf8_lossy(&o.stderr));
}
