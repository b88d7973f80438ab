//! The HTTP side: routes, authentication, body limits, turning a request into engine jobs
//! and the engine's events into OpenAI responses or server-sent events.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use thinkjson_decode::{Admission, Completion, FinishReason, GenerateConfig, Generator, Request};
use thinkjson_model::{ChatTemplate, Tokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{self, ApiError, Input, Limits, Parsed};
use super::engine::{Event, Job};
use super::metrics::Metrics;

/// What every handler shares.
pub struct AppState {
    pub model_name: String,
    pub generator: Arc<Generator>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub limits: Limits,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub max_queue: usize,
    pub jobs: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    pub next_id: AtomicU64,
    pub started: u64,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(e.body())).into_response()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn not_found() -> Response {
    error_response(&ApiError::invalid("no such route", None).with_code(404, "not_found"))
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&s, &headers) {
        return error_response(&e);
    }
    axum::Json(json!({"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.started, "owned_by": "thinkjson"}]})).into_response()
}

async fn chat(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(s, headers, body, true).await
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(s, headers, body, false).await
}

fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &s.api_key else { return Ok(()) };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if g == key => Ok(()),
        Some(_) => Err(ApiError { status: 401, message: "incorrect API key".into(), kind: "invalid_request_error", param: None, code: Some("invalid_api_key") }),
        None => Err(ApiError { status: 401, message: "missing API key: send `Authorization: Bearer KEY`".into(), kind: "invalid_request_error", param: None, code: Some("invalid_api_key") }),
    }
}

/// A prepared request: the parsed fields, the prompt ids and the choices' admissions.
struct Prepared {
    parsed: Parsed,
    prompt_len: usize,
    choices: Vec<Admission>,
    reserve: usize,
}

async fn handle(s: Arc<AppState>, headers: HeaderMap, body: Body, chat: bool) -> Response {
    let arrived = Instant::now();
    let endpoint = if chat { "/v1/chat/completions" } else { "/v1/completions" };
    let prepared = match prepare(&s, &headers, body, chat).await {
        Ok(p) => p,
        Err(e) => {
            s.metrics.answered(endpoint, e.status, arrived.elapsed().as_secs_f64());
            return error_response(&e);
        }
    };
    if !s.metrics.try_enqueue(s.max_queue) {
        let e = ApiError { status: 429, message: format!("the queue is full ({} requests wait); retry later", s.max_queue), kind: "rate_limit_error", param: None, code: Some("queue_full") };
        s.metrics.answered(endpoint, 429, arrived.elapsed().as_secs_f64());
        return error_response(&e);
    }
    let (tx, rx) = unbounded_channel();
    let stream = prepared.parsed.stream;
    let job = Job { choices: prepared.choices.clone(), stream, events: tx, reserve: prepared.reserve };
    if s.jobs.try_send(job).is_err() {
        s.metrics.dequeued(1);
        let e = ApiError { status: 503, message: "the engine is not accepting work (shutting down)".into(), kind: "server_error", param: None, code: None };
        s.metrics.answered(endpoint, 503, arrived.elapsed().as_secs_f64());
        return error_response(&e);
    }
    let reply = Reply { state: s.clone(), chat, id: format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, prepared.choices[0].id), created: now_secs(), parsed: prepared.parsed, prompt_len: prepared.prompt_len, arrived, endpoint };
    if stream {
        sse(reply, rx)
    } else {
        reply.whole(rx).await
    }
}

async fn prepare(s: &Arc<AppState>, headers: &HeaderMap, body: Body, chat: bool) -> Result<Prepared, ApiError> {
    authorize(s, headers)?;
    let bytes = axum::body::to_bytes(body, s.max_body_bytes)
        .await
        .map_err(|_| ApiError::invalid(format!("the request body is larger than {} bytes", s.max_body_bytes), None).with_code(413, "request_too_large"))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}"), None))?;
    let parsed = api::parse(&value, chat, &s.limits)?;
    if parsed.model != s.model_name {
        return Err(ApiError::invalid(format!("the model `{}` does not exist here; this server serves `{}`", parsed.model, s.model_name), Some("model")).with_code(404, "model_not_found"));
    }
    // Rendering, tokenizing and compiling the schema take CPU time: off the async workers.
    let state = s.clone();
    let p = parsed.clone();
    let (prompt, constraint_error) = tokio::task::spawn_blocking(move || -> Result<(Vec<u32>, Option<String>), ApiError> {
        let prompt = match &p.input {
            Input::Chat(messages) => {
                let text = state.template.render(messages, true).map_err(|e| ApiError::invalid(format!("chat template: {e}"), Some("messages")))?;
                state.tokenizer.encode(&text)
            }
            Input::Text(text) => state.tokenizer.encode(text),
        }
        .map_err(|e| ApiError::invalid(format!("tokenizing the prompt: {e}"), None))?;
        let compiled = state.generator.compile(&p.constraint).err().map(|e| e.to_string());
        Ok((prompt, compiled))
    })
    .await
    .map_err(|e| ApiError { status: 500, message: format!("preparing the request: {e}"), kind: "server_error", param: None, code: None })??;
    if let Some(message) = constraint_error {
        return Err(ApiError::invalid(format!("the schema cannot be enforced: {message}"), Some("response_format.json_schema.schema")).with_code(400, "invalid_schema"));
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", None));
    }
    let context = s.limits.context;
    if prompt.len() >= context {
        return Err(ApiError::invalid(format!("the prompt has {} tokens; the model's context is {context}", prompt.len()), None).with_code(400, "context_length_exceeded"));
    }
    let max_tokens = if value_has_max(&value) {
        if prompt.len() + parsed.max_tokens > context {
            return Err(ApiError::invalid(
                format!("{} prompt tokens + {} new tokens exceed the model's context of {context}", prompt.len(), parsed.max_tokens),
                Some("max_tokens"),
            )
            .with_code(400, "context_length_exceeded"));
        }
        parsed.max_tokens
    } else {
        parsed.max_tokens.min(context - prompt.len())
    };
    let reserve = prompt.len() + max_tokens;
    if reserve * parsed.n > s.limits.max_batch_tokens {
        return Err(ApiError::invalid(
            format!("{} choices × ({} prompt + {max_tokens} new tokens) exceed this server's batch budget of {} tokens", parsed.n, prompt.len(), s.limits.max_batch_tokens),
            Some("max_tokens"),
        ));
    }
    let base_seed = parsed.seed.unwrap_or_else(|| now_nanos() ^ s.next_id.load(Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut choices = Vec::with_capacity(parsed.n);
    for i in 0..parsed.n {
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        let seed = base_seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut sampling = parsed.sampling;
        sampling.seed = seed;
        let config = GenerateConfig { max_new_tokens: max_tokens, sampling, stop: parsed.stop.clone(), ..GenerateConfig::default() };
        choices.push(Admission { id, request: Request { prompt: prompt.clone(), constraint: parsed.constraint.clone(), seed: Some(seed) }, config });
    }
    Ok(Prepared { prompt_len: prompt.len(), reserve, parsed: Parsed { max_tokens, ..parsed }, choices })
}

fn value_has_max(v: &Value) -> bool {
    ["max_tokens", "max_completion_tokens"].iter().any(|k| v.get(k).is_some_and(|x| !x.is_null()))
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn finish_reason(c: &Completion) -> &'static str {
    match c.finish {
        FinishReason::Eos | FinishReason::Stop | FinishReason::ConstraintComplete => "stop",
        FinishReason::Length => "length",
        FinishReason::ConstraintError => "constraint_error",
    }
}

/// What a choice shows: its reasoning (think-then-JSON) and its content, from the text so
/// far; while streaming, the end that may still change (a cut UTF-8 character, the start
/// of a stop string) is held back so both parts only grow.
fn view(parsed: &Parsed, text: &str, finished: bool) -> (String, String) {
    if finished {
        return if parsed.reasoning { api::split_reasoning(text) } else { (String::new(), text.to_string()) };
    }
    // A character cut between tokens decodes as U+FFFD until its last byte arrives.
    let settled = text.trim_end_matches('\u{FFFD}');
    if parsed.reasoning {
        return api::split_reasoning(settled);
    }
    let mut end = settled.len();
    let hold = parsed.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
    end = end.saturating_sub(hold);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (String::new(), text[..end].to_string())
}

struct Reply {
    state: Arc<AppState>,
    chat: bool,
    id: String,
    created: u64,
    parsed: Parsed,
    prompt_len: usize,
    arrived: Instant,
    endpoint: &'static str,
}

impl Reply {
    fn usage(&self, completion_tokens: usize) -> Value {
        json!({"prompt_tokens": self.prompt_len, "completion_tokens": completion_tokens, "total_tokens": self.prompt_len + completion_tokens})
    }

    fn finish_metrics(&self, status: u16, completion_tokens: usize) {
        self.state.metrics.tokens(self.prompt_len, completion_tokens);
        self.state.metrics.answered(self.endpoint, status, self.arrived.elapsed().as_secs_f64());
    }

    async fn whole(self, mut rx: UnboundedReceiver<Event>) -> Response {
        let n = self.parsed.n;
        let mut done: Vec<Option<Completion>> = vec![None; n];
        while done.iter().any(Option::is_none) {
            match rx.recv().await {
                Some(Event::Done { index, completion }) => done[index] = Some(completion),
                Some(Event::Text { .. }) => {}
                Some(Event::Failed { message }) => return self.failed(message),
                None => return self.failed("the engine stopped".into()),
            }
        }
        let completions: Vec<Completion> = done.into_iter().flatten().collect();
        let tokens: usize = completions.iter().map(|c| c.tokens.len()).sum();
        let choices: Vec<Value> = completions
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let (reasoning, content) = view(&self.parsed, &c.text, true);
                if self.chat {
                    let mut message = json!({"role": "assistant", "content": content});
                    if self.parsed.reasoning {
                        message["reasoning_content"] = Value::from(reasoning);
                    }
                    let mut choice = json!({"index": index, "message": message, "finish_reason": finish_reason(c), "logprobs": null});
                    if let Some(e) = &c.error {
                        choice["error"] = Value::from(e.clone());
                    }
                    choice
                } else {
                    json!({"index": index, "text": content, "finish_reason": finish_reason(c), "logprobs": null})
                }
            })
            .collect();
        let object = if self.chat { "chat.completion" } else { "text_completion" };
        let body = json!({"id": self.id, "object": object, "created": self.created, "model": self.parsed.model, "choices": choices, "usage": self.usage(tokens)});
        self.finish_metrics(200, tokens);
        axum::Json(body).into_response()
    }

    fn failed(&self, message: String) -> Response {
        let e = ApiError { status: 500, message, kind: "server_error", param: None, code: None };
        self.state.metrics.answered(self.endpoint, 500, self.arrived.elapsed().as_secs_f64());
        error_response(&e)
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let object = if self.chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.parsed.model, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Bytes::from(format!("data: {v}\n\n"))
    }

    /// A delta of choice `index`: new reasoning and/or content, or its finish.
    fn delta(&self, index: usize, reasoning: &str, content: &str, finish: Option<&str>, first: bool) -> Bytes {
        let choice = if self.chat {
            let mut delta = json!({});
            if first {
                delta["role"] = Value::from("assistant");
            }
            if !reasoning.is_empty() {
                delta["reasoning_content"] = Value::from(reasoning);
            }
            if !content.is_empty() || (first && finish.is_none()) {
                delta["content"] = Value::from(content);
            }
            json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": null})
        } else {
            json!({"index": index, "text": content, "finish_reason": finish, "logprobs": null})
        };
        self.chunk(json!([choice]), None)
    }
}

/// Per choice: what the client has been sent.
#[derive(Clone, Default)]
struct Sent {
    reasoning: String,
    content: String,
    started: bool,
    finished: bool,
    tokens: usize,
}

/// Streams a reply as server-sent events in OpenAI's chunk format, ending `data: [DONE]`.
fn sse(reply: Reply, rx: UnboundedReceiver<Event>) -> Response {
    let n = reply.parsed.n;
    let state = (reply, rx, vec![Sent::default(); n], false);
    let stream = futures_util::stream::unfold(state, |(reply, mut rx, mut sent, ended)| async move {
        if ended {
            return None;
        }
        loop {
            let event = rx.recv().await;
            let mut out: Vec<u8> = Vec::new();
            match event {
                Some(Event::Text { index, text }) => {
                    let (r, c) = view(&reply.parsed, &text, false);
                    push_delta(&reply, &mut sent[index], index, &r, &c, None, &mut out);
                }
                Some(Event::Done { index, completion }) => {
                    let (r, c) = view(&reply.parsed, &completion.text, true);
                    sent[index].tokens = completion.tokens.len();
                    push_delta(&reply, &mut sent[index], index, &r, &c, Some(finish_reason(&completion)), &mut out);
                    if sent.iter().all(|s| s.finished) {
                        let tokens: usize = sent.iter().map(|s| s.tokens).sum();
                        if reply.parsed.include_usage {
                            out.extend_from_slice(&reply.chunk(json!([]), Some(reply.usage(tokens))));
                        }
                        out.extend_from_slice(b"data: [DONE]\n\n");
                        reply.finish_metrics(200, tokens);
                        return Some((Ok::<Bytes, Infallible>(Bytes::from(out)), (reply, rx, sent, true)));
                    }
                }
                Some(Event::Failed { message }) => return Some(stream_error(reply, rx, sent, message)),
                None => return Some(stream_error(reply, rx, sent, "the engine stopped".into())),
            }
            if !out.is_empty() {
                return Some((Ok(Bytes::from(out)), (reply, rx, sent, false)));
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error_response(&ApiError { status: 500, message: "building the stream".into(), kind: "server_error", param: None, code: None }))
}

type StreamState = (Reply, UnboundedReceiver<Event>, Vec<Sent>, bool);

/// An engine failure mid-stream: an error event in OpenAI's shape, and the stream ends.
fn stream_error(reply: Reply, rx: UnboundedReceiver<Event>, sent: Vec<Sent>, message: String) -> (Result<Bytes, Infallible>, StreamState) {
    let e = ApiError { status: 500, message, kind: "server_error", param: None, code: None };
    reply.state.metrics.answered(reply.endpoint, 500, reply.arrived.elapsed().as_secs_f64());
    (Ok(Bytes::from(format!("data: {}\n\n", e.body()))), (reply, rx, sent, true))
}

/// Appends the chunk that brings choice `index` from what it was sent to `(r, c)`.
fn push_delta(reply: &Reply, sent: &mut Sent, index: usize, r: &str, c: &str, finish: Option<&str>, out: &mut Vec<u8>) {
    let new_r = r.strip_prefix(sent.reasoning.as_str()).unwrap_or("");
    let new_c = c.strip_prefix(sent.content.as_str()).unwrap_or("");
    if new_r.is_empty() && new_c.is_empty() && finish.is_none() && sent.started {
        return;
    }
    let first = !sent.started;
    if finish.is_some() && (!new_r.is_empty() || !new_c.is_empty() || first) {
        out.extend_from_slice(&reply.delta(index, new_r, new_c, None, first));
        out.extend_from_slice(&reply.delta(index, "", "", finish, false));
    } else {
        out.extend_from_slice(&reply.delta(index, new_r, new_c, finish, first));
    }
    sent.started = true;
    if r.starts_with(sent.reasoning.as_str()) {
        sent.reasoning = r.to_string();
    }
    if c.starts_with(sent.content.as_str()) {
        sent.content = c.to_string();
    }
    sent.finished |= finish.is_some();
}
