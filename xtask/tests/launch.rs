//! `cargo xtask launch`: data-parallel SFT across processes over loopback. Two processes train
//! the weights the in-process group trains, a killed rank stops the other naming it and
//! `--resume` finishes with no step redone or skipped, and rank 0 refuses a peer with a wrong
//! token or from an address it does not admit. Every process runs one compute thread and
//! every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(repo()).env("RAYON_NUM_THREADS", "1").env_remove("THINKJSON_RUN_TOKEN");
    c
}

/// Synth rows and a small BPE (600 ids) from the pipeline's first two stages, so the tiny
/// model's steps take milliseconds.
fn prepare(dir: &Path) -> (PathBuf, PathBuf) {
    let out = dir.join("prep");
    let cfg = dir.join("prep.toml");
    let template = repo().join("assets/qwen/tokenizer_config.json");
    std::fs::write(
        &cfg,
        format!(
            "out = \"{}\"\n[model]\npreset = \"tiny\"\n[synth]\ngrpo_rows = 2\nsft_rows = 24\neval_rows = 2\nkinds = [\"training\"]\n[tokenizer]\nvocab_size = 600\ntemplate_from = \"{}\"\n",
            out.display(),
            template.display()
        ),
    )
    .expect("config");
    let o = xtask().args(["pipeline", "--config", cfg.to_str().expect("utf-8"), "--stages", "synth,tokenizer"]).output().expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (out.join("tokenizer"), out.join("synth/sft.jsonl"))
}

fn sft_config(dir: &Path, name: &str, tokenizer: &Path, data: &Path, steps: u64, save_every: u64) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "preset = \"tiny\"\ntokenizer = \"{}\"\ndata = \"{}\"\nout = \"{}\"\n[train]\nlr = 1e-3\nwarmup_ratio = 0.0\nmax_steps = {steps}\nbatch_size = 2\ngrad_accum = 1\nmax_len = 2048\nsave_every = {save_every}\nkeep_last = 0\neval_generations = 0\nseed = 7\n",
            tokenizer.display(),
            data.display(),
            dir.join(name).display()
        ),
    )
    .expect("config");
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn launch(rank: usize, port: u16, token: &str, extra: &[&str], command: &[&str]) -> Child {
    let mut c = xtask();
    c.args(["launch", "--nodes", "2", "--node-rank", &rank.to_string(), "--rendezvous", &format!("127.0.0.1:{port}"), "--token", token]);
    if !extra.contains(&"--join-timeout") {
        c.args(["--join-timeout", "60"]);
    }
    c.args(extra).arg("--").args(command).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().expect("spawn")
}

/// Waits for a child at most `limit`, killing it past that.
fn wait(mut child: Child, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (child.wait_with_output().expect("output"), started.elapsed())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn steps_logged(metrics: &Path) -> Vec<u64> {
    std::fs::read_to_string(metrics)
        .expect("metrics.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

#[test]
fn two_processes_train_the_weights_of_the_in_process_group() {
    let dir = tempfile::tempdir().expect("tmp");
    let (tokenizer, data) = prepare(dir.path());
    let cfg = sft_config(dir.path(), "launched", &tokenizer, &data, 50, 25);
    let port = free_port();
    let command = ["sft", "--config", cfg.to_str().expect("utf-8")];
    let rank1 = launch(1, port, "t0ken", &[], &command);
    let rank0 = launch(0, port, "t0ken", &[], &command);
    let (o0, _) = wait(rank0, Duration::from_secs(600));
    let (o1, _) = wait(rank1, Duration::from_secs(60));
    assert!(o0.status.success(), "rank 0: {}", stderr(&o0));
    // Rank 1 ends only after the last step's weight checksums matched rank 0's.
    assert!(o1.status.success(), "rank 1: {}", stderr(&o1));
    assert!(stderr(&o0).contains("rank 1 joined from 127.0.0.1"), "{}", stderr(&o0));
    assert_eq!(steps_logged(&dir.path().join("launched/metrics.jsonl")), (1..=50).collect::<Vec<u64>>());

    let in_process_cfg = sft_config(dir.path(), "in-process", &tokenizer, &data, 50, 25);
    let o = xtask().args(["sft", "--config", in_process_cfg.to_str().expect("utf-8"), "--devices", "cpu,cpu"]).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (weights(&dir.path().join("launched/final")), weights(&dir.path().join("in-process/final")));
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x.len(), y.len(), "{name}");
        worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(worst, f32::max);
    }
    assert!(worst <= 1e-5, "launched vs in-process weights differ by {worst}");
}

#[test]
fn a_killed_rank_stops_the_other_and_resume_finishes_every_step_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let (tokenizer, data) = prepare(dir.path());
    let cfg = sft_config(dir.path(), "run", &tokenizer, &data, 12, 2);
    let command = ["sft", "--config", cfg.to_str().expect("utf-8")];
    let port = free_port();
    let mut rank1 = launch(1, port, "t0ken", &[], &command);
    let rank0 = launch(0, port, "t0ken", &[], &command);
    let checkpoint = dir.path().join("run/checkpoints/step-00000004");
    let started = Instant::now();
    while !checkpoint.exists() {
        assert!(started.elapsed() < Duration::from_secs(300), "no step-4 checkpoint in 300 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    rank1.kill().expect("kill rank 1");
    let _ = rank1.wait();
    let (o0, waited) = wait(rank0, Duration::from_secs(60));
    assert!(!o0.status.success(), "rank 0 must fail when rank 1 is lost");
    assert!(waited < Duration::from_secs(60), "rank 0 took {waited:?} to notice");
    eprintln!("rank 0 stopped {waited:?} after rank 1 was killed");
    assert!(stderr(&o0).contains("lost rank 1"), "{}", stderr(&o0));

    let port = free_port();
    let resume = ["sft", "--config", cfg.to_str().expect("utf-8"), "--resume"];
    let rank1 = launch(1, port, "t0ken", &[], &resume);
    let rank0 = launch(0, port, "t0ken", &[], &resume);
    let (o0, _) = wait(rank0, Duration::from_secs(600));
    let (o1, _) = wait(rank1, Duration::from_secs(60));
    assert!(o0.status.success(), "rank 0: {}", stderr(&o0));
    assert!(o1.status.success(), "rank 1: {}", stderr(&o1));
    assert!(stderr(&o0).contains("resuming from"), "{}", stderr(&o0));
    assert_eq!(steps_logged(&dir.path().join("run/metrics.jsonl")), (1..=12).collect::<Vec<u64>>(), "every step once");
}

#[test]
fn rank_zero_refuses_a_wrong_token_and_an_address_it_does_not_admit() {
    let dir = tempfile::tempdir().expect("tmp");
    let (tokenizer, data) = prepare(dir.path());
    let cfg = sft_config(dir.path(), "refused", &tokenizer, &data, 2, 0);
    let command = ["sft", "--config", cfg.to_str().expect("utf-8")];
    for (extra, token, why) in [(&[][..], "wrong", "wrong run token"), (&["--allow", "192.0.2.7"][..], "right", "address not allowed")] {
        let port = free_port();
        let rank0 = launch(0, port, "right", &[&["--join-timeout", "8"], extra].concat(), &command);
        std::thread::sleep(Duration::from_millis(500));
        let rank1 = launch(1, port, token, &["--join-timeout", "8"], &command);
        let (o1, _) = wait(rank1, Duration::from_secs(30));
        let (o0, _) = wait(rank0, Duration::from_secs(30));
        assert!(!o1.status.success() && stderr(&o1).contains(why), "rank 1: {}", stderr(&o1));
        assert!(stderr(&o0).contains("refused a peer from 127.0.0.1") && stderr(&o0).contains(why), "rank 0: {}", stderr(&o0));
        assert!(!o0.status.success() && stderr(&o0).contains("did not join"), "rank 0: {}", stderr(&o0));
    }
}
