//! `synth` and `import`: files and progress around the `thinkjson-synth` library.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use thinkjson_synth::{import as importer, stats::stats, DocKind, Generator, Row, Split, SynthConfig};

#[derive(Args)]
pub struct SynthArgs {
    /// Number of rows to write.
    #[arg(long, default_value_t = 1000)]
    rows: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output JSONL file.
    #[arg(long, required_unless_present = "stats")]
    out: Option<PathBuf>,
    /// Comma-separated document kinds (default: all), e.g. batch_record,deviation.
    #[arg(long)]
    kinds: Option<String>,
    /// Only rows of this split: grpo, sft or eval.
    #[arg(long)]
    split: Option<String>,
    /// Print the variety figures of an existing JSONL file instead of generating.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Print figures as JSON.
    #[arg(long)]
    json: bool,
}

pub fn synth(args: SynthArgs) -> Result<()> {
    if let Some(path) = &args.stats {
        return print_stats(path, args.json);
    }
    let Some(out) = args.out.clone() else { bail!("--out FILE is required") };
    let kinds = match &args.kinds {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|k| DocKind::parse(k.trim()).with_context(|| {
                let known: Vec<&str> = DocKind::ALL.iter().map(|k| k.name()).collect();
                format!("--kinds: unknown kind `{k}` (known: {})", known.join(", "))
            }))
            .collect::<Result<_>>()?,
    };
    let split = args.split.as_deref().map(Split::parse).transpose()?;
    let config = SynthConfig { rows: args.rows, seed: args.seed, kinds, split, ..Default::default() };
    let generator = Generator::new(config);
    let file = create(&out)?;
    let mut w = BufWriter::new(file);
    let bar = progress(args.rows as u64, "synth");
    let start = Instant::now();
    let (mut written, mut index) = (0usize, 0u64);
    let limit = (args.rows as u64).saturating_mul(20).max(100);
    while written < args.rows {
        if index >= limit {
            bail!("could not produce {} rows of split {:?} within {limit} candidates", args.rows, args.split);
        }
        let row = generator.candidate(index)?;
        index += 1;
        if split.is_some_and(|s| s.name() != row.split) {
            continue;
        }
        serde_json::to_writer(&mut w, &row)?;
        w.write_all(b"\n")?;
        written += 1;
        bar.inc(1);
    }
    w.flush().with_context(|| format!("writing {}", out.display()))?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!("wrote {written} rows to {} in {secs:.2} s ({:.0} rows/s)", out.display(), written as f64 / secs);
    Ok(())
}

fn print_stats(path: &Path, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str::<Row>(line) {
            Ok(r) => rows.push(r),
            Err(e) => eprintln!("{}:{}: skipped, not a dataset row: {e}", path.display(), i + 1),
        }
    }
    let s = stats(&rows);
    if json {
        return crate::print_out(&serde_json::to_string_pretty(&s)?);
    }
    let [min, p50, p90, max, mean] = s.text_chars;
    let mut kw: Vec<_> = s.keywords.iter().collect();
    kw.sort_by(|a, b| b.1.cmp(a.1));
    let lines = [
        format!("rows {}  distinct schemas {}", s.rows, s.distinct_schemas),
        format!("kinds      {}", fmt_map(&s.kinds)),
        format!("styles     {}", fmt_map(&s.styles)),
        format!("splits     {}", fmt_map(&s.splits)),
        format!("depth      {}", s.depth_histogram.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(" ")),
        format!("text chars min {min} p50 {p50} p90 {p90} max {max} mean {mean:.0}"),
        format!("keywords   {}", kw.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(" ")),
    ];
    crate::print_out(&lines.join("\n"))
}

fn fmt_map(m: &std::collections::BTreeMap<String, usize>) -> String {
    m.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(" ")
}

#[derive(Args)]
pub struct ImportArgs {
    /// Input CSV or JSONL (by extension; `.csv` is CSV, anything else JSONL).
    #[arg(long = "in")]
    input: PathBuf,
    /// Output JSONL in thinkjson's row format.
    #[arg(long)]
    out: PathBuf,
    /// Where to write the per-row report (JSON); printed to stderr either way.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn import(args: ImportArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let is_csv = args.input.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let (rows, report) = if is_csv { importer::import_csv(&text) } else { importer::import_jsonl(&text) };
    let mut w = BufWriter::new(create(&args.out)?);
    for row in &rows {
        serde_json::to_writer(&mut w, row)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    for r in &report.rejected {
        eprintln!("{}:{}: rejected: {}", args.input.display(), r.line, r.reason);
    }
    eprintln!("imported {} of {} rows into {} ({} rejected)", report.accepted, report.total, args.out.display(), report.rejected.len());
    if let Some(p) = &args.report {
        std::fs::write(p, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn create(path: &Path) -> Result<std::fs::File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} rows  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}
