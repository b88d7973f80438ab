//! `cargo xtask <verb>`: thinkjson's command line. The only crate that owns the CLI, files
//! and progress output; the library crates do the work.

mod backend;
mod bench;
mod cmd_model;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "thinkjson: teach small LMs to emit schema-valid JSON", version)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Print the logits of every position of a token sequence as JSON (for parity checks).
    Logits(cmd_model::LogitsArgs),
    /// Initialise a model from a preset with seeded random weights and save it in HF layout.
    InitModel(cmd_model::InitArgs),
    /// Run benchmarks and print the figures (and write them as JSON).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.verb {
        Verb::Logits(a) => cmd_model::logits(a),
        Verb::InitModel(a) => cmd_model::init(a),
        Verb::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
