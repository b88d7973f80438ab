//! `cargo xtask predict`: malformed data rows are reported and skipped, a killed run resumes
//! with every row written exactly once, and an existing output is not overwritten silently.

use std::collections::HashMap;
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

fn run(args: &[&str]) -> Output {
    xtask().args(args).output().expect("run xtask")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tiny random model with the committed Qwen tokenizer and chat template.
fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    let o = run(&["init-model", "--preset", "tiny", "--seed", "3", "--out", model.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(repo().join("assets/qwen").join(f), model.join(f)).expect("copy tokenizer");
    }
    model
}

/// 30 synthetic rows with a malformed line, a row missing its fields, and a repeated id.
fn data(dir: &Path) -> (PathBuf, Vec<String>) {
    let rows = dir.join("rows.jsonl");
    let o = run(&["synth", "--rows", "30", "--seed", "5", "--out", rows.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&rows).expect("rows");
    let lines: Vec<&str> = text.lines().collect();
    let ids: Vec<String> = lines.iter().map(|l| serde_json::from_str::<serde_json::Value>(l).expect("row")["id"].as_str().expect("id").to_string()).collect();
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edited.insert(3, "{\"id\": \"broken\", \"text\": ".into());
    edited.insert(7, "{\"id\": \"no-fields\"}".into());
    edited.push(lines[0].to_string());
    std::fs::write(&rows, edited.join("\n") + "\n").expect("write");
    (rows, ids)
}

fn ids_in(path: &Path) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for line in std::fs::read_to_string(path).expect("predictions").lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(v["completion"].is_string() && v["tokens"].is_number(), "{line}");
        *count.entry(v["id"].as_str().expect("id").to_string()).or_default() += 1;
    }
    count
}

#[test]
fn killed_predictions_resume_with_every_row_exactly_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = tiny_model(dir.path());
    let (rows, ids) = data(dir.path());
    let out = dir.path().join("preds.jsonl");
    let args = |resume: bool| {
        let mut a = vec![
            "predict".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--data".into(),
            rows.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--batch-size".into(),
            "2".into(),
            "--max-new-tokens".into(),
            "24".into(),
            "--constraint".into(),
            "json_schema".into(),
        ];
        if resume {
            a.push("--resume".into());
        }
        a
    };
    // Killed as soon as its first batch is on disk.
    let mut child = xtask().args(args(false)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&out).map(|t| t.lines().count()).unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "no predictions written in 2 minutes");
        assert!(child.try_wait().expect("wait").is_none(), "predict exited before it was killed");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().expect("kill");
    let killed = child.wait_with_output().expect("output");
    let first_err = stderr(&killed);
    assert!(first_err.contains("rows.jsonl:4: skipped"), "the malformed line is named: {first_err}");
    assert!(first_err.contains("rows.jsonl:8: skipped"), "the row without fields is named: {first_err}");
    let partial = ids_in(&out);
    assert!(partial.len() < ids.len(), "the kill came before the end ({} of {})", partial.len(), ids.len());
    // A write cut mid-line (a kill during the write) is dropped on resume.
    let mut text = std::fs::read_to_string(&out).expect("preds");
    text.push_str("{\"id\": \"cut-off");
    std::fs::write(&out, text).expect("write");

    // Without --resume an existing output is refused.
    let refused = run(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("--resume"), "{}", stderr(&refused));

    let resumed = run(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(stderr(&resumed).contains("appears again"), "the repeated id is reported: {}", stderr(&resumed));
    let all = ids_in(&out);
    assert_eq!(all.len(), ids.len(), "every row predicted");
    for id in &ids {
        assert_eq!(all.get(id), Some(&1), "row {id} exactly once");
    }
    // Resuming a finished file writes nothing more.
    let again = run(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(ids_in(&out), all);
}
