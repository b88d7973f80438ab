//! The same systems evaluated in several runs (seeds): per system and metric, the mean over
//! the runs and the lowest and highest run, so a table states how far one seed's figure can
//! be trusted. Every run must report every system, once; a gap is an error naming both.

use std::collections::HashSet;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::metrics::Aggregate;
use crate::report::{pct, Report, METRICS};

/// Mean, lowest and highest value of one metric over the runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    fn of(values: &[f64]) -> Self {
        let n = values.len().max(1) as f64;
        Self {
            mean: values.iter().sum::<f64>() / n,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// One system across the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemSpread {
    pub system: String,
    /// Scored rows in each run, in the runs' order.
    pub rows: Vec<usize>,
    /// Each metric's value in each run, in the runs' order (names in [`Spread::metrics`]).
    pub values: Vec<Vec<f64>>,
    /// Each metric over the runs.
    pub stats: Vec<Stat>,
}

/// Systems in the first run's order, each metric over every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// The runs' labels (e.g. their directories), in order.
    pub runs: Vec<String>,
    pub metrics: Vec<String>,
    pub systems: Vec<SystemSpread>,
}

/// Gathers `reports` (label, report) — one per run of the same systems — into a [`Spread`].
/// Errors name a system missing from a run, one reported twice in a run, or no runs at all.
pub fn spread(reports: &[(String, Report)]) -> Result<Spread, String> {
    let (_, first) = reports.first().ok_or("no runs to compare")?;
    for (label, report) in reports {
        let mut seen = HashSet::new();
        for run in &report.runs {
            if !seen.insert(run.name.as_str()) {
                return Err(format!("{label}: system `{}` is reported twice", run.name));
            }
        }
    }
    let mut systems = Vec::with_capacity(first.runs.len());
    for system in &first.runs {
        let mut per_run: Vec<&Aggregate> = Vec::with_capacity(reports.len());
        for (label, report) in reports {
            let found = report.runs.iter().find(|r| r.name == system.name);
            per_run.push(&found.ok_or_else(|| format!("{label}: no system `{}` (the first run has it)", system.name))?.overall);
        }
        let values: Vec<Vec<f64>> = METRICS.iter().map(|(_, f)| per_run.iter().map(|a| f(a)).collect()).collect();
        systems.push(SystemSpread {
            system: system.name.clone(),
            rows: per_run.iter().map(|a| a.rows).collect(),
            stats: values.iter().map(|v| Stat::of(v)).collect(),
            values,
        });
    }
    for (label, report) in &reports[1..] {
        if let Some(extra) = report.runs.iter().find(|r| !first.runs.iter().any(|f| f.name == r.name)) {
            return Err(format!("{label}: system `{}` is not in the first run", extra.name));
        }
    }
    Ok(Spread {
        runs: reports.iter().map(|(l, _)| l.clone()).collect(),
        metrics: METRICS.iter().map(|(m, _)| m.to_string()).collect(),
        systems,
    })
}

/// `mean % (min–max)`, in percent with one decimal.
fn cell(s: &Stat) -> String {
    format!("{} ({:.1}–{:.1})", pct(s.mean), 100.0 * s.min, 100.0 * s.max)
}

/// Markdown: the mean and range of every metric per system, then each run's figures.
pub fn spread_markdown(spread: &Spread) -> String {
    let mut out = String::from("# thinkjson: the same systems over several runs\n\n");
    let _ = writeln!(out, "Runs: {}. Each cell: the mean over the runs (the lowest – the highest run).\n", spread.runs.join(", "));
    let _ = writeln!(out, "| system | rows | {} |", spread.metrics.join(" | "));
    let _ = writeln!(out, "|---|---|{}", "---|".repeat(spread.metrics.len()));
    for s in &spread.systems {
        let rows: Vec<String> = s.rows.iter().map(usize::to_string).collect();
        let cells: Vec<String> = s.stats.iter().map(cell).collect();
        let _ = writeln!(out, "| {} | {} | {} |", s.system, rows.join(" / "), cells.join(" | "));
    }
    out.push_str("\n### Each run\n\n");
    let _ = writeln!(out, "| system | run | {} |", spread.metrics.join(" | "));
    let _ = writeln!(out, "|---|---|{}", "---|".repeat(spread.metrics.len()));
    for s in &spread.systems {
        for (i, run) in spread.runs.iter().enumerate() {
            let cells: Vec<String> = s.values.iter().map(|v| pct(v[i])).collect();
            let _ = writeln!(out, "| {} | {run} | {} |", s.system, cells.join(" | "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::RunReport;

    fn run(name: &str, rows: usize, valid_json: f64, mean_match: f64) -> RunReport {
        let mut r: RunReport = serde_json::from_value(serde_json::json!({
            "name": name,
            "overall": {"rows": rows, "no_output": 0.0, "valid_json": 0.0, "schema_valid": 0.0, "format_valid": 0.0,
                        "mean_match": 0.0, "mean_noise": 0.0, "exact": 0.0, "content": 0.0,
                        "mean_latency_ms": null, "mean_tokens": null},
            "by_kind": {}, "by_style": {}, "by_depth": {}, "unknown_ids": 0, "skipped": [], "rows": []
        }))
        .unwrap();
        r.overall.valid_json = valid_json;
        r.overall.mean_match = mean_match;
        r
    }

    fn report(runs: Vec<RunReport>) -> Report {
        Report { runs, curves: Vec::new() }
    }

    fn metric(spread: &Spread, system: &str, metric: &str) -> (Vec<f64>, Stat) {
        let i = spread.metrics.iter().position(|m| m == metric).unwrap();
        let s = spread.systems.iter().find(|s| s.system == system).unwrap();
        (s.values[i].clone(), s.stats[i])
    }

    #[test]
    fn mean_and_range_per_system_in_the_first_runs_order() {
        let reports = vec![
            ("seed1".to_string(), report(vec![run("base", 64, 0.25, 0.5), run("sft", 64, 0.5, 0.25)])),
            // Another order in the second run: systems are matched by name.
            ("seed2".to_string(), report(vec![run("sft", 63, 0.75, 0.5), run("base", 64, 0.0, 0.25)])),
            ("seed3".to_string(), report(vec![run("base", 64, 0.5, 0.0), run("sft", 64, 1.0, 0.75)])),
        ];
        let s = spread(&reports).unwrap();
        assert_eq!(s.runs, ["seed1", "seed2", "seed3"]);
        assert_eq!(s.systems.iter().map(|s| s.system.as_str()).collect::<Vec<_>>(), ["base", "sft"]);
        assert_eq!(s.systems[1].rows, [64, 63, 64]);
        let (values, stat) = metric(&s, "base", "valid JSON");
        assert_eq!(values, [0.25, 0.0, 0.5]);
        assert_eq!(stat, Stat { mean: 0.25, min: 0.0, max: 0.5 });
        let (values, stat) = metric(&s, "sft", "mean match");
        assert_eq!(values, [0.25, 0.5, 0.75]);
        assert_eq!(stat, Stat { mean: 0.5, min: 0.25, max: 0.75 });
        let md = spread_markdown(&s);
        assert!(md.contains("| sft | 64 / 63 / 64 | 0.0 % (0.0–0.0) | 75.0 % (50.0–100.0) |"), "{md}");
        assert!(md.contains("| base | seed2 | 0.0 % | 0.0 % |"), "{md}");
    }

    #[test]
    fn a_system_missing_or_extra_or_repeated_is_named() {
        let full = || report(vec![run("base", 64, 0.0, 0.0), run("sft", 64, 0.0, 0.0)]);
        let missing = vec![("a".to_string(), full()), ("b".to_string(), report(vec![run("base", 64, 0.0, 0.0)]))];
        assert_eq!(spread(&missing).unwrap_err(), "b: no system `sft` (the first run has it)");
        let mut extra = full();
        extra.runs.push(run("sft+grpo", 64, 0.0, 0.0));
        let extra = vec![("a".to_string(), full()), ("b".to_string(), extra)];
        assert_eq!(spread(&extra).unwrap_err(), "b: system `sft+grpo` is not in the first run");
        let twice = vec![("a".to_string(), report(vec![run("base", 64, 0.0, 0.0), run("base", 64, 0.0, 0.0)]))];
        assert_eq!(spread(&twice).unwrap_err(), "a: system `base` is reported twice");
        assert!(spread(&[]).is_err());
    }
}
