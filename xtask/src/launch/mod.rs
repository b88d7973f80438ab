//! `cargo xtask launch`: one process of a multi-process (multi-node) data-parallel run.
//!
//! ```sh
//! # on each node I of N (rank 0's address is the rendezvous; every node passes the same token)
//! THINKJSON_RUN_TOKEN=secret cargo xtask launch --nodes 2 --node-rank I --rendezvous 10.0.0.1:29500 \
//!     --allow 10.0.0.2 -- sft --config my.toml --out /shared/run
//! ```
//! Each process is one peer on one device (`--device` of the inner command); rank 0 reports
//! and writes checkpoints. The peers reduce through [`tcp::TcpPeer`], our
//! [`Collective`](thinkjson_model::train::Collective) over plain TCP (burn-collective's
//! multi-node mode listens on every address and has no authentication).

pub mod tcp;

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser};

pub use tcp::{Rendezvous, TcpPeer};

#[derive(Args)]
pub struct LaunchArgs {
    /// Processes in the run (one device each).
    #[arg(long)]
    nodes: usize,
    /// This process's rank, 0..nodes; rank 0 hosts the rendezvous.
    #[arg(long)]
    node_rank: usize,
    /// HOST:PORT where rank 0 listens (on that address only) and the others connect.
    #[arg(long)]
    rendezvous: SocketAddr,
    /// Shared secret every process must present (default: $THINKJSON_RUN_TOKEN).
    #[arg(long)]
    token: Option<String>,
    /// Peer addresses rank 0 admits (comma-separated IPs); default: loopback only.
    #[arg(long, value_delimiter = ',')]
    allow: Vec<IpAddr>,
    /// Seconds to wait for every peer to join.
    #[arg(long, default_value_t = 300)]
    join_timeout: u64,
    /// Seconds of silence after which a peer counts as lost; a process that dies is seen at
    /// once (its socket closes). Must exceed rank 0's longest pause (its evaluations).
    #[arg(long, default_value_t = 1800)]
    peer_timeout: u64,
    /// The command every process runs: `sft …` or `grpo …`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

static RENDEZVOUS: OnceLock<Rendezvous> = OnceLock::new();

/// The rendezvous of this process when it was started by `launch`.
pub fn current() -> Option<&'static Rendezvous> {
    RENDEZVOUS.get()
}

pub fn launch(args: LaunchArgs) -> Result<()> {
    let token = match args.token.or_else(|| std::env::var("THINKJSON_RUN_TOKEN").ok()) {
        Some(t) if !t.is_empty() => t,
        _ => bail!("a run token is required: --token or $THINKJSON_RUN_TOKEN (every process passes the same)"),
    };
    if args.nodes < 2 {
        bail!("--nodes {}: a launched run has at least 2 processes (run the command directly for one)", args.nodes);
    }
    if args.node_rank >= args.nodes {
        bail!("--node-rank {} is not below --nodes {}", args.node_rank, args.nodes);
    }
    let cli = crate::Cli::try_parse_from(std::iter::once("cargo xtask".to_string()).chain(args.command.iter().cloned()))?;
    if !matches!(cli.verb, crate::Verb::Sft(_) | crate::Verb::Grpo(_)) {
        bail!("launch runs `sft …` or `grpo …`, not `{}`", args.command.first().map_or("", String::as_str));
    }
    let rendezvous = Rendezvous {
        nodes: args.nodes,
        rank: args.node_rank,
        address: args.rendezvous,
        token,
        allow: args.allow,
        join_timeout: Duration::from_secs(args.join_timeout),
        peer_timeout: Duration::from_secs(args.peer_timeout),
    };
    if RENDEZVOUS.set(rendezvous).is_err() {
        bail!("launch was started twice in one process");
    }
    crate::run_verb(cli.verb)
}
