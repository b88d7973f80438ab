//! Repository rules, enforced (rust-analyzer's "tidy" idea): the dependency direction of the
//! design (docs/design in ../shared/DESIGN.md: `xtask → {synth, sft, grpo, eval} → {decode,
//! reward} → model`, `grpo` ⟂ `sft`, no tensors in synth/reward/eval), only `xtask` prints,
//! draws progress or listens on the network, and tensor layouts stay inside `model`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `[dependencies]` (not dev-dependencies) of a workspace crate, by name.
fn dependencies(krate: &str) -> BTreeSet<String> {
    let path = root().join(krate).join("Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let manifest: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeSet::new();
    for section in ["dependencies", "build-dependencies"] {
        if let Some(deps) = manifest.get(section).and_then(toml::Value::as_table) {
            out.extend(deps.keys().cloned());
        }
    }
    if let Some(targets) = manifest.get("target").and_then(toml::Value::as_table) {
        for t in targets.values() {
            if let Some(deps) = t.get("dependencies").and_then(toml::Value::as_table) {
                out.extend(deps.keys().cloned());
            }
        }
    }
    out
}

const CRATES: &[&str] = &["model", "decode", "synth", "reward", "sft", "grpo", "eval", "xtask"];

/// Which of our crates each crate may depend on (the design's direction, no cycles).
fn allowed_internal(krate: &str) -> &'static [&'static str] {
    match krate {
        "model" | "reward" => &[],
        "decode" => &["thinkjson-model"],
        "synth" | "eval" => &["thinkjson-reward"],
        "sft" | "grpo" => &["thinkjson-model", "thinkjson-decode", "thinkjson-synth", "thinkjson-reward"],
        "xtask" => &["thinkjson-model", "thinkjson-decode", "thinkjson-synth", "thinkjson-reward", "thinkjson-sft", "thinkjson-grpo", "thinkjson-eval"],
        other => panic!("no rule for crate {other}"),
    }
}

/// Crates that only `xtask` may use: command line, progress bars, network listeners, log sinks.
const XTASK_ONLY: &[&str] = &["clap", "indicatif", "tokio", "axum", "hyper", "tracing-subscriber", "reqwest", "ureq"];

#[test]
fn crates_depend_only_in_the_designed_direction() {
    let mut problems = Vec::new();
    for krate in CRATES {
        let deps = dependencies(krate);
        for dep in deps.iter().filter(|d| d.starts_with("thinkjson-")) {
            if !allowed_internal(krate).contains(&dep.as_str()) {
                problems.push(format!("{krate} depends on {dep}, which the design forbids"));
            }
        }
        if ["synth", "reward", "eval"].contains(krate) {
            for dep in deps.iter().filter(|d| d.starts_with("burn") || d.starts_with("cubecl") || d.as_str() == "cudarc") {
                problems.push(format!("{krate} depends on {dep}: synth, reward and eval need no tensors"));
            }
        }
        if *krate != "xtask" {
            for dep in deps.iter().filter(|d| XTASK_ONLY.contains(&d.as_str())) {
                problems.push(format!("{krate} depends on {dep}: only xtask owns the CLI, progress bars and listeners"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Lines of code (comments and doc comments dropped) that contain any of `needles`:
/// "path:line: text".
fn offending_lines(krate: &str, needles: &[&str]) -> Vec<String> {
    offending_lines_in(&root().join(krate).join("src"), needles)
}

fn offending_lines_in(dir: &Path, needles: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for file in sources(dir) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            let code = code.split(" //").next().unwrap_or(code);
            if let Some(n) = needles.iter().find(|n| code.contains(*n)) {
                let rel = file.strip_prefix(root()).unwrap_or(&file).display().to_string();
                out.push(format!("{rel}:{}: `{n}` in: {}", i + 1, line.trim()));
            }
        }
    }
    out
}

#[test]
fn only_xtask_prints_draws_progress_or_listens() {
    let needles = ["println!", "eprintln!", "print!(", "eprint!(", "dbg!(", "indicatif", "ProgressBar", "TcpListener", "UdpSocket", "std::net::"];
    let mut problems = Vec::new();
    for krate in CRATES.iter().filter(|k| **k != "xtask") {
        problems.extend(offending_lines(krate, &needles));
    }
    assert!(problems.is_empty(), "library crates report through return values and observers, not output:\n{}", problems.join("\n"));
}

#[test]
fn tensor_layouts_stay_inside_model() {
    // Shape and indexing operations: whoever uses them knows a tensor layout. Outside `model`
    // tensors may only be reduced or combined element-wise (losses over log-prob vectors).
    let needles = [
        ".slice(", ".reshape(", ".gather(", ".select(", ".matmul(", ".swap_dims(", ".permute(", ".narrow(", ".unsqueeze", ".squeeze",
        ".expand(", "Tensor::cat(", ".repeat_dim(",
    ];
    let mut problems = Vec::new();
    for krate in CRATES.iter().filter(|k| **k != "model") {
        problems.extend(offending_lines(krate, &needles));
    }
    assert!(problems.is_empty(), "tensor layout code outside `model` (ask the model for scores instead):\n{}", problems.join("\n"));
}

#[test]
fn backward_passes_go_through_the_model() {
    // `thinkjson_model::train::backward` runs a pass on the CPU training backend's pool of its
    // own; a plain `loss.backward()` wakes its caller after each of the pass's parallel kernels.
    let mut problems = Vec::new();
    for krate in CRATES.iter().filter(|k| **k != "model") {
        problems.extend(offending_lines(krate, &[".backward()"]));
    }
    assert!(problems.is_empty(), "call `thinkjson_model::train::backward(loss)` instead:\n{}", problems.join("\n"));
}

/// The scan can fail: planted violations in a scratch source tree are caught, and comments
/// are not.
#[test]
fn the_source_scan_catches_a_planted_violation() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("deep")).expect("mkdir");
    std::fs::write(src.join("lib.rs"), "// println!(\"comment\")\n/// x.reshape([1])\nfn f() { let y = t.reshape([2, 3]); }\n").expect("write");
    std::fs::write(src.join("deep/m.rs"), "fn g() { eprintln!(\"hi\"); } // .matmul( in a comment\n").expect("write");
    let found = offending_lines_in(&src, &[".reshape(", "eprintln!", ".matmul(", "println!"]);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().any(|l| l.contains("lib.rs:3") && l.contains(".reshape(")), "{found:?}");
    assert!(found.iter().any(|l| l.contains("m.rs:1") && l.contains("eprintln!")), "{found:?}");
}
