//! `cargo xtask <verb>`: thinkjson's command line. The only crate that owns the CLI, files
//! and progress output; the library crates do the work.

mod backend;
mod bench;
mod bench_gguf;
mod bench_gpu;
mod bench_grpo;
mod bench_serve;
mod cmd_decode;
mod cmd_model;
mod cmd_predict;
mod cmd_predict_endpoint;
mod cmd_grpo;
mod cmd_schemas;
mod cmd_sft;
mod metrics_log;
mod model_ref;
mod train_common;
mod pipeline;
mod cmd_eval;
mod cmd_synth;
mod serve;
mod launch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// glibc returns large freed blocks to the OS, so every training step page-faults its
/// gradient buffers afresh (a quarter of step time measured); mimalloc, told never to purge,
/// keeps them (1.7× faster fwd+bwd at the smollm2-135m shape).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (not named by libmimalloc-sys).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn keep_freed_memory() {
    // SAFETY: sets a process-wide tuning option; valid at any time, no pointers involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about = "thinkjson: teach small LMs to emit schema-valid JSON", version)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Print the logits of every position of a token sequence as JSON (for parity checks).
    Logits(cmd_model::LogitsArgs),
    /// Convert a GGUF file (llama or qwen2) into a Hugging Face directory that transformers loads.
    ImportGguf(cmd_model::ImportGgufArgs),
    /// Fold a PEFT LoRA adapter into its base model and save a full Hugging Face model.
    MergeLora(cmd_model::MergeLoraArgs),
    /// Initialise a model from a preset with seeded random weights and save it in HF layout.
    InitModel(cmd_model::InitArgs),
    /// Generate a completion with a model, optionally constrained to a JSON Schema (--think for think-then-JSON).
    Generate(cmd_decode::GenerateArgs),
    /// Which JSON Schemas of a folder tree are accepted, per subfolder, and why others are not; with --model, check every returned output against the full schema.
    Schemas(cmd_schemas::SchemasArgs),
    /// Generate synthetic (text, schema, object, reasoning) rows as JSONL, or print a file's variety figures.
    Synth(cmd_synth::SynthArgs),
    /// Import an external CSV/JSONL set (text, schema, object columns) into our JSONL format.
    Import(cmd_synth::ImportArgs),
    /// Batched predictions of a model over a dataset (the JSONL `eval` reads), resumable.
    Predict(cmd_predict::PredictArgs),
    /// Score predictions (JSONL of id + completion) against a dataset and write a report directory.
    Eval(cmd_eval::EvalArgs),
    /// Merge the report.json of several eval directories into one report, or (--spread) give
    /// each system's mean and range over repeated runs such as seeds.
    Report(cmd_eval::ReportArgs),
    /// Supervised fine-tuning (completion-only loss) from a TOML config; checkpoints, metrics JSONL, --resume.
    Sft(cmd_sft::SftArgs),
    /// GRPO reinforcement learning with schema/format rewards (optionally constrained rollouts) from a TOML config.
    Grpo(cmd_grpo::GrpoArgs),
    /// The whole recipe: synth → tokenizer → model → SFT → GRPO → eval report (embedded CPU default without --config).
    Pipeline(pipeline::PipelineArgs),
    /// Run benchmarks and print the figures (and write them as JSON).
    Bench(bench::BenchArgs),
    /// One process of a multi-process data-parallel `sft`/`grpo` run: rendezvous, token, rank.
    Launch(launch::LaunchArgs),
    /// Serve a model over OpenAI's HTTP API (chat/completions, completions, models) with continuous batching, JSON-Schema output and reasoning-then-JSON.
    Serve(serve::ServeArgs),
}

/// Writes to stdout; a closed pipe (`… | head`) ends output quietly instead of panicking.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.write_all(b"\n")).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match run_verb(cli.verb) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_verb(verb: Verb) -> anyhow::Result<()> {
    match verb {
        Verb::Logits(a) => cmd_model::logits(a),
        Verb::InitModel(a) => cmd_model::init(a),
        Verb::MergeLora(a) => cmd_model::merge_lora(a),
        Verb::ImportGguf(a) => cmd_model::import_gguf(a),
        Verb::Generate(a) => cmd_decode::generate(a),
        Verb::Schemas(a) => cmd_schemas::schemas(a),
        Verb::Synth(a) => cmd_synth::synth(a),
        Verb::Import(a) => cmd_synth::import(a),
        Verb::Predict(a) => cmd_predict::predict(a),
        Verb::Eval(a) => cmd_eval::eval(a),
        Verb::Report(a) => cmd_eval::report(a),
        Verb::Sft(a) => cmd_sft::sft(a),
        Verb::Grpo(a) => cmd_grpo::grpo(a),
        Verb::Pipeline(a) => pipeline::pipeline(a),
        Verb::Bench(a) => bench::run(a),
        Verb::Launch(a) => launch::launch(a),
        Verb::Serve(a) => serve::serve(a),
    }
}
