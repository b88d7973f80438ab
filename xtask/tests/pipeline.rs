//! `cargo xtask pipeline` end to end on a reduced configuration: every stage runs, a rerun
//! with --resume redoes nothing (nor does one in a copied run directory), a config change reruns only what it affects, a kill
//! mid-SFT resumes from the checkpoint, and bad configs fail before any work.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(repo());
    c
}

/// A pipeline small enough for a test: a few rows, a small BPE, steps counted on one hand.
fn reduced_config(out: &Path, sft_rows: usize, grpo_steps: u64) -> String {
    let template = repo().join("assets/qwen/tokenizer_config.json");
    format!(
        r#"out = "{out}"
finetune = "full"
[model]
preset = "tiny"
[synth]
grpo_rows = 4
sft_rows = {sft_rows}
eval_rows = 2
kinds = ["training"]
[tokenizer]
vocab_size = 600
template_from = "{template}"
[sft]
epochs = 1
batch_size = 1
max_len = 2048
lr = 2e-3
save_every = 2
eval_generations = 0
[grpo]
num_generations = 2
prompts_per_step = 1
max_steps = {grpo_steps}
max_completion_len = 12
max_prompt_len = 2048
save_every = 1
[eval]
rows = 2
max_new_tokens = 12
max_think_tokens = 4
batch_size = 2
"#,
        out = out.display(),
        template = template.display()
    )
}

fn run(args: &[&str]) -> Output {
    xtask().args(args).output().expect("run xtask")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn manifest(out: &Path, stage: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("manifests").join(format!("{stage}.json"))).expect("manifest");
    serde_json::from_str(&text).expect("manifest JSON")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[test]
fn every_stage_runs_and_resume_redoes_only_what_changed() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, reduced_config(&out, 3, 2)).expect("config");
    let first = run(&["pipeline", "--config", cfg.to_str().expect("utf-8")]);
    assert!(first.status.success(), "{}", stderr(&first));
    for stage in ["synth", "tokenizer", "model", "sft", "grpo", "eval"] {
        assert_eq!(manifest(&out, stage)["finished"], true, "{stage}");
        assert!(stderr(&first).contains(&format!("== {stage}")), "{stage} ran");
    }
    let report = std::fs::read_to_string(out.join("eval/report/report.md")).expect("report.md");
    for system in ["base", "sft", "sft+grpo", "base constrained", "sft constrained", "sft+grpo constrained"] {
        assert!(report.contains(&format!("| {system} |")), "{system} missing from the report");
    }
    let systems = manifest(&out, "eval")["summary"]["systems"].as_array().expect("systems").len();
    assert_eq!(systems, 6);
    assert!(out.join("pipeline.log").exists());

    // Nothing changed: nothing runs.
    let again = run(&["pipeline", "--config", cfg.to_str().expect("utf-8"), "--resume"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(!stderr(&again).contains("== "), "a finished stage ran again:\n{}", stderr(&again));

    // A copy of the run directory, with its config pointing at the copy, resumes as is.
    let moved = dir.path().join("moved");
    copy_dir(&out, &moved);
    let moved_cfg = dir.path().join("moved.toml");
    std::fs::write(&moved_cfg, reduced_config(&moved, 3, 2)).expect("config");
    let copied = run(&["pipeline", "--config", moved_cfg.to_str().expect("utf-8"), "--resume"]);
    assert!(copied.status.success(), "{}", stderr(&copied));
    assert!(!stderr(&copied).contains("== "), "a copied run redid a stage:\n{}", stderr(&copied));

    // A GRPO change reruns GRPO and eval only.
    std::fs::write(&cfg, reduced_config(&out, 3, 3)).expect("config");
    let changed = run(&["pipeline", "--config", cfg.to_str().expect("utf-8"), "--resume"]);
    let log = stderr(&changed);
    assert!(changed.status.success(), "{log}");
    assert!(log.contains("== grpo") && log.contains("== eval"), "{log}");
    for stage in ["synth", "tokenizer", "model", "sft"] {
        assert!(!log.contains(&format!("== {stage}")), "{stage} reran:\n{log}");
    }
    assert_eq!(manifest(&out, "grpo")["summary"]["last_step"], 3);

    // Without --resume an earlier run is not overwritten.
    let refused = run(&["pipeline", "--config", cfg.to_str().expect("utf-8")]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("--resume"), "{}", stderr(&refused));
}

#[test]
fn a_kill_mid_sft_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, reduced_config(&out, 10, 1)).expect("config");
    let mut child = xtask()
        .args(["pipeline", "--config", cfg.to_str().expect("utf-8")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let checkpoint = out.join("sft/checkpoints/step-00000004");
    let started = Instant::now();
    while !checkpoint.exists() {
        assert!(started.elapsed() < Duration::from_secs(600), "no SFT checkpoint appeared");
        assert!(child.try_wait().expect("poll").is_none(), "the pipeline ended before it could be killed");
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().expect("kill");
    child.wait().expect("reap");
    assert_eq!(manifest(&out, "sft")["finished"], false);

    let resumed = run(&["pipeline", "--config", cfg.to_str().expect("utf-8"), "--resume"]);
    let log = stderr(&resumed);
    assert!(resumed.status.success(), "{log}");
    assert!(log.contains("== sft (resuming)") && log.contains("resuming from"), "{log}");
    for stage in ["synth", "tokenizer", "model"] {
        assert!(!log.contains(&format!("== {stage}")), "{stage} was redone:\n{log}");
    }
    // One metrics line per step, none lost or repeated across the kill.
    let steps: Vec<u64> = std::fs::read_to_string(out.join("sft/metrics.jsonl"))
        .expect("metrics")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .filter_map(|v| v["step"].as_u64())
        .collect();
    let total = manifest(&out, "sft")["summary"]["total_steps"].as_u64().expect("total");
    assert_eq!(steps, (1..=total).collect::<Vec<_>>());
    assert_eq!(manifest(&out, "eval")["finished"], true);
}

#[test]
fn bad_configs_fail_before_any_work_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let cases = [
        (format!("out = \"{}\"\n[sft]\nlearning_rate = 1.0\n", out.display()), "learning_rate"),
        (format!("out = \"{}\"\n[model]\ndir = \"/no/such/model\"\n", out.display()), "/no/such/model"),
        ("out = \"/proc/thinkjson-cannot-write\"\n".to_string(), "/proc/thinkjson-cannot-write"),
    ];
    for (text, named) in cases {
        let cfg = dir.path().join("bad.toml");
        std::fs::write(&cfg, &text).expect("config");
        let o = run(&["pipeline", "--config", cfg.to_str().expect("utf-8")]);
        assert!(!o.status.success(), "{text}");
        assert!(stderr(&o).contains(named), "{text}: {}", stderr(&o));
        assert!(!out.join("manifests").exists(), "{text}: work started");
    }
}

/// `[lora]` trains adapters in both stages; each stage's adapter is merged into `merged/`,
/// which the next stage and the evaluation read.
#[test]
fn a_lora_pipeline_trains_adapters_and_merges_them_for_the_next_stage() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let cfg = dir.path().join("p.toml");
    let config = format!("{}[lora]\nr = 4\nalpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\", \"up_proj\"]\n", reduced_config(&out, 2, 1).replace("finetune = \"full\"", "finetune = \"lora\""));
    std::fs::write(&cfg, config).expect("config");
    let o = run(&["pipeline", "--config", cfg.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    for stage in ["sft", "grpo"] {
        let adapter = out.join(stage).join("final");
        let text = std::fs::read_to_string(adapter.join("adapter_config.json")).expect("the stage saved an adapter");
        let cfg: serde_json::Value = serde_json::from_str(&text).expect("adapter config");
        assert_eq!(cfg["r"], 4, "{stage}");
        assert!(!adapter.join("model.safetensors").exists(), "{stage}: no full model in final/");
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            assert!(out.join(stage).join("merged").join(f).exists(), "{stage}/merged/{f}");
        }
    }
    assert_eq!(manifest(&out, "eval")["finished"], true);
}

/// The paper's order: GRPO from the base model, then SFT from GRPO's model; the report
/// compares base, grpo and grpo+sft.
#[test]
fn grpo_then_sft_runs_end_to_end_and_reports_its_systems() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, format!("order = \"grpo-then-sft\"\n{}", reduced_config(&out, 2, 1))).expect("config");
    let o = run(&["pipeline", "--config", cfg.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let (g, s) = (err.find("== grpo").expect("grpo ran"), err.find("== sft").expect("sft ran"));
    assert!(g < s, "GRPO runs before SFT");
    let report = std::fs::read_to_string(out.join("eval/report/report.md")).expect("report.md");
    for system in ["base", "grpo", "grpo+sft", "base constrained", "grpo constrained", "grpo+sft constrained"] {
        assert!(report.contains(&format!("| {system} |")), "{system} missing from the report");
    }
    assert!(!report.contains("| sft+grpo |"));
}
