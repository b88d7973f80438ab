//! `cargo xtask serve`: an OpenAI-compatible HTTP server (axum + tokio) in front of a model,
//! with continuous batching, JSON-Schema-constrained output and reasoning-then-JSON.
//!
//! Threads: tokio's workers parse and check requests (schema compiled before queueing, so a
//! refused schema is a 400 at once) and turn engine events into responses; one engine
//! thread owns the model and the running batch ([`engine`]). A bounded queue between them
//! answers 429 when full; the batch is bounded in sequences and in KV positions (reserved
//! and padded).

pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use thinkjson_decode::Generator;
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::DeviceSpec;

use crate::backend::{dispatch, OnBackend};

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// An HF model directory, a GGUF file, or an embedded model name (smollm2-135m-instruct).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory, merged into --model at load.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The name clients send as `model` (default: the --model argument's file name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on. Loopback unless told otherwise: anything else exposes the model
    /// (and, without --api-key, to anyone who can reach the port).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed on stderr).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long)]
    api_key: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// KV positions of the running batch: its sequences' prompt + max_tokens summed, and its
    /// padded cache (sequences × the longest of them), both stay within it; bounds the KV
    /// cache's memory. `GET /metrics` reports the positions held and their peak.
    #[arg(long, default_value_t = 32_768)]
    max_batch_tokens: usize,
    /// Requests waiting beyond this are answered 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest max_tokens a request may ask for, and the default when it asks none.
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Largest `n`.
    #[arg(long, default_value_t = 8)]
    max_n: usize,
    /// Context length (default: the model's, at most 8192).
    #[arg(long)]
    context: Option<usize>,
    /// Largest request body.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Reasoning budgets (tokens) of reasoning_effort low, medium, high.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    reasoning_budgets: Vec<usize>,
    /// Stop by itself after this many seconds (tests and benchmarks; 0 = run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    exit_after_secs: u64,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    if args.max_batch == 0 || args.max_queue == 0 || args.max_n == 0 {
        anyhow::bail!("--max-batch, --max-queue and --max-n must be at least 1");
    }
    if args.max_n > args.max_batch {
        anyhow::bail!("--max-n {} is above --max-batch {}: a request's choices run together", args.max_n, args.max_batch);
    }
    if args.reasoning_budgets.len() != 3 {
        anyhow::bail!("--reasoning-budgets takes three numbers (low,medium,high)");
    }
    let device = args.device;
    dispatch(device, ServeJob { args })
}

struct ServeJob {
    args: ServeArgs,
}

impl OnBackend for ServeJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let args = self.args;
        let pretrained = crate::model_ref::open(&args.model)?;
        let model = crate::model_ref::load::<B>(&pretrained, args.adapter.as_deref(), &device)?.merge_lora();
        let tokenizer = crate::cmd_predict::tokenizer_of(&pretrained, args.adapter.as_deref())?;
        let template = pretrained.chat_template()?;
        let generator = Arc::new(Generator::for_model(&tokenizer, &model)?);
        let name = args.served_model_name.clone().unwrap_or_else(|| {
            let p = args.model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| args.model.display().to_string());
            p.trim_end_matches(".gguf").to_string()
        });
        let context = args.context.unwrap_or(model.config().max_position_embeddings.min(8192));
        let limits = api::Limits {
            max_n: args.max_n,
            max_tokens: args.max_tokens,
            context,
            effort_tokens: [args.reasoning_budgets[0], args.reasoning_budgets[1], args.reasoning_budgets[2]],
            max_batch_tokens: args.max_batch_tokens,
        };
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel(args.max_queue);
        let metrics = Arc::new(metrics::Metrics::default());
        let state = Arc::new(http::AppState {
            model_name: name.clone(),
            generator: generator.clone(),
            tokenizer,
            template,
            limits,
            api_key: args.api_key.clone(),
            max_body_bytes: args.max_body_bytes,
            max_queue: args.max_queue,
            jobs: jobs_tx,
            metrics: metrics.clone(),
            next_id: AtomicU64::new(1),
            started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the tokio runtime")?;
        let addr: SocketAddr = format!("{}:{}", args.host, args.port).parse().with_context(|| format!("--host {} --port {}", args.host, args.port))?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr)).with_context(|| format!("listening on {addr}"))?;
        let bound = listener.local_addr().context("the bound address")?;
        eprintln!("serve: `{name}` listening on http://{bound} (max batch {}, queue {}, context {context})", args.max_batch, args.max_queue);
        let exit_after = args.exit_after_secs;
        let server = runtime.spawn(async move {
            let app = http::router(state);
            let shutdown = async move {
                if exit_after > 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(exit_after)) => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                } else {
                    let _ = tokio::signal::ctrl_c().await;
                }
                eprintln!("serve: shutting down");
            };
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        });
        // The engine runs here, on the thread that owns the model, until the server (the
        // last holder of the job queue) is gone and nothing is left running.
        let capacity = engine::Capacity { max_batch: args.max_batch, max_batch_tokens: args.max_batch_tokens };
        engine::run(&model, &generator, jobs_rx, capacity, &metrics);
        let served = runtime.block_on(server).context("the HTTP server task")?;
        served.context("serving HTTP")?;
        runtime.shutdown_timeout(Duration::from_secs(5));
        Ok(())
    }
}
