//! `cargo xtask bench gguf`: importing the embedded GGUF file, and loading a model from the
//! GGUF file vs from the imported HF directory. Each measurement runs in its own process (the
//! hidden `gguf-import` / `gguf-load` suites), so each peak RSS is that step's alone.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use thinkjson_model::{CpuBackend, StorageDtype};

use crate::bench::{peak_rss_mib, BenchArgs, Figure};

const RUNS: usize = 3;

/// Runs one hidden step in a child process and returns its figures.
fn child(suite: &str, input: &Path, scratch: &Path) -> Result<Vec<(String, f64)>> {
    let out = scratch.join(format!("{suite}.json"));
    let status = Command::new(std::env::current_exe()?)
        .args(["bench", suite, "--input"])
        .arg(input)
        .arg("--out")
        .arg(&out)
        .arg("--scratch")
        .arg(scratch)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running bench {suite}"))?;
    if !status.success() {
        bail!("bench {suite} on {} failed ({status})", input.display());
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let figures = report["figures"].as_array().context("figures")?;
    Ok(figures
        .iter()
        .filter_map(|f| Some((f["name"].as_str()?.to_string(), f["value"].as_f64()?)))
        .collect())
}

fn spread(figures: &mut Vec<Figure>, name: &str, values: &[f64], unit: &'static str) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    figures.push(Figure { name: format!("{name} (min of {})", values.len()), value: min, unit });
    figures.push(Figure { name: format!("{name} (max of {})", values.len()), value: max, unit });
}

pub fn gguf_suite(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    let gguf = match &args.input {
        Some(p) => p.clone(),
        None => crate::model_ref::embedded_path("smollm2-135m-instruct").context("embedded model")?,
    };
    let scratch = tempfile::tempdir()?;
    let hf = scratch.path().join("imported");
    let collect = |suite: &str, input: &Path| -> Result<(Vec<f64>, Vec<f64>)> {
        let (mut secs, mut rss) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            for (name, value) in child(suite, input, scratch.path())? {
                match name.as_str() {
                    "seconds" => secs.push(value),
                    "peak RSS" => rss.push(value),
                    _ => {}
                }
            }
        }
        Ok((secs, rss))
    };
    let (secs, rss) = collect("gguf-import", &gguf)?;
    spread(figures, "import-gguf f32", &secs, "s");
    spread(figures, "import-gguf f32 peak RSS", &rss, "MiB");
    let (secs, rss) = collect("gguf-load", &gguf)?;
    spread(figures, "load --model FILE.gguf", &secs, "s");
    spread(figures, "load --model FILE.gguf peak RSS", &rss, "MiB");
    let (secs, rss) = collect("gguf-load", &hf)?;
    spread(figures, "load --model imported-dir", &secs, "s");
    spread(figures, "load --model imported-dir peak RSS", &rss, "MiB");
    Ok(())
}

/// Child step: import `--input` into `<scratch>/imported`.
pub fn import_step(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    let (input, scratch) = child_args(args)?;
    let t = Instant::now();
    let g = thinkjson_model::gguf::GgufFile::open(input)?;
    thinkjson_model::gguf::hf::import_gguf(&g, &scratch.join("imported"), StorageDtype::Float32)?;
    figures.push(Figure { name: "seconds".into(), value: t.elapsed().as_secs_f64(), unit: "s" });
    figures.push(Figure { name: "peak RSS".into(), value: peak_rss_mib(), unit: "MiB" });
    Ok(())
}

/// Child step: load `--input` (GGUF file or HF directory) onto the CPU backend.
pub fn load_step(args: &BenchArgs, figures: &mut Vec<Figure>) -> Result<()> {
    let (input, _) = child_args(args)?;
    let t = Instant::now();
    let model = thinkjson_model::Pretrained::open(input)?.load::<CpuBackend>(&Default::default())?;
    let secs = t.elapsed().as_secs_f64();
    drop(model);
    figures.push(Figure { name: "seconds".into(), value: secs, unit: "s" });
    figures.push(Figure { name: "peak RSS".into(), value: peak_rss_mib(), unit: "MiB" });
    Ok(())
}

fn child_args(args: &BenchArgs) -> Result<(&Path, &Path)> {
    match (&args.input, &args.scratch) {
        (Some(i), Some(s)) => Ok((i, s)),
        _ => bail!("this bench step needs --input and --scratch"),
    }
}
