//! Reports: Markdown tables, JSON, and SVG charts (metric bars per run; training curves).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::metrics::{Aggregate, RunReport};

/// Training metrics of one run (JSONL lines with a `step` and numeric fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Curves {
    pub name: String,
    /// Metric name → (step, value) points.
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
}

/// Metrics plotted as curves when present.
pub const CURVE_KEYS: &[&str] = &["reward_mean", "loss", "kl", "completion_len_mean", "valid_json_rate", "schema_valid_rate"];

impl Curves {
    /// Reads metrics JSONL; lines without a numeric `step` are skipped.
    pub fn from_jsonl(name: &str, text: &str) -> Self {
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
            let Some(step) = v.get("step").and_then(Value::as_f64) else { continue };
            for key in CURVE_KEYS {
                if let Some(x) = v.get(*key).and_then(Value::as_f64).filter(|x| x.is_finite()) {
                    series.entry(key.to_string()).or_default().push((step, x));
                }
            }
        }
        Self { name: name.to_string(), series }
    }
}

/// The report document: every run and every training curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub runs: Vec<RunReport>,
    #[serde(default)]
    pub curves: Vec<Curves>,
}

/// Reads one metric of an aggregate.
type MetricFn = fn(&Aggregate) -> f64;

pub(crate) const METRICS: &[(&str, MetricFn)] = &[
    ("no output", |a| a.no_output),
    ("valid JSON", |a| a.valid_json),
    ("schema-valid", |a| a.schema_valid),
    ("format-valid", |a| a.format_valid),
    ("mean match", |a| a.mean_match),
    ("mean noise", |a| a.mean_noise),
    ("exact", |a| a.exact),
    ("content", |a| a.content),
];

pub(crate) fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

fn table(out: &mut String, title: &str, rows: &[(String, &Aggregate)]) {
    let _ = writeln!(out, "\n### {title}\n");
    let _ = writeln!(out, "| | rows | {} |", METRICS.iter().map(|m| m.0).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(out, "|---|---|{}", "---|".repeat(METRICS.len()));
    for (name, a) in rows {
        let cells: Vec<String> = METRICS.iter().map(|(_, f)| pct(f(a))).collect();
        let _ = writeln!(out, "| {name} | {} | {} |", a.rows, cells.join(" | "));
    }
}

/// `report.md`: overall comparison, then per-run breakdowns.
pub fn markdown(report: &Report) -> String {
    let mut out = String::from("# thinkjson evaluation report\n\n");
    out.push_str("Definitions: valid JSON = a JSON object or array was found and parses; schema-valid = it validates against the row's schema; format-valid = exactly one `<think>` block then one `<answer>` block; mean match = share of reference fields reproduced (arrays of objects matched in any order); mean noise = share of non-whitespace characters outside think/answer/JSON (rows with output); exact = equal to the reference; content = match × (1 − noise).\n");
    let overall: Vec<(String, &Aggregate)> = report.runs.iter().map(|r| (r.name.clone(), &r.overall)).collect();
    table(&mut out, "All runs", &overall);
    for run in &report.runs {
        let _ = writeln!(out, "\n## {}\n", run.name);
        if !run.skipped.is_empty() || run.unknown_ids > 0 {
            let _ = writeln!(out, "{} malformed prediction line(s) skipped, {} prediction(s) with unknown ids.", run.skipped.len(), run.unknown_ids);
        }
        if let (Some(l), Some(t)) = (run.overall.mean_latency_ms, run.overall.mean_tokens) {
            let _ = writeln!(out, "Mean latency {l:.1} ms, mean completion tokens {t:.1}.");
        }
        let kinds: Vec<(String, &Aggregate)> = run.by_kind.iter().map(|(k, a)| (k.clone(), a)).collect();
        table(&mut out, "By document kind", &kinds);
        let styles: Vec<(String, &Aggregate)> = run.by_style.iter().map(|(k, a)| (k.clone(), a)).collect();
        table(&mut out, "By text style", &styles);
        let depths: Vec<(String, &Aggregate)> = run.by_depth.iter().map(|(k, a)| (format!("depth {k}"), a)).collect();
        table(&mut out, "By schema depth", &depths);
    }
    if !report.curves.is_empty() {
        out.push_str("\n## Training curves\n\n");
        for key in CURVE_KEYS {
            if report.curves.iter().any(|c| c.series.contains_key(*key)) {
                let _ = writeln!(out, "![{key}](curve_{key}.svg)");
            }
        }
    }
    out.push_str("\n![metrics](metrics.svg)\n");
    out
}

const PALETTE: [RGBColor; 6] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];

/// Grouped bars: one group per metric, one bar per run (SVG text).
pub fn metrics_svg(report: &Report) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let groups = METRICS.len() as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption("Metrics per run", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..groups, 0f64..1.25)
            .map_err(|e| e.to_string())?;
        // Ticks every half unit; only the group centres (x.5) carry the metric's name.
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * METRICS.len() + 1)
            .x_label_formatter(&|x| {
                let centred = (x - x.floor() - 0.5).abs() < 1e-6;
                METRICS.get(x.floor() as usize).filter(|_| centred).map_or(String::new(), |m| m.0.to_string())
            })
            .y_desc("share")
            .draw()
            .map_err(|e| e.to_string())?;
        let n = report.runs.len().max(1) as f64;
        for (ri, run) in report.runs.iter().enumerate() {
            let color = PALETTE[ri % PALETTE.len()];
            let bars = METRICS.iter().enumerate().map(|(mi, (_, f))| {
                let x0 = mi as f64 + 0.1 + 0.8 * ri as f64 / n;
                Rectangle::new([(x0, 0.0), (x0 + 0.8 / n, f(&run.overall))], color.filled())
            });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(run.name.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// One SVG per curve key present: the metric over steps, a line per run.
pub fn curves_svg(curves: &[Curves]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for key in CURVE_KEYS {
        let series: Vec<(&str, &Vec<(f64, f64)>)> = curves.iter().filter_map(|c| c.series.get(*key).map(|s| (c.name.as_str(), s))).collect();
        if series.is_empty() {
            continue;
        }
        let pts = series.iter().flat_map(|(_, s)| s.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        if y1 <= y0 {
            y1 = y0 + 1.0;
        }
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (720, 360)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let mut chart = ChartBuilder::on(&root)
                .caption(*key, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(56)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(|e| e.to_string())?;
            chart.configure_mesh().x_desc("step").draw().map_err(|e| e.to_string())?;
            for (i, (name, s)) in series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                chart
                    .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(name.to_string())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], color));
            }
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| e.to_string())?;
            root.present().map_err(|e| e.to_string())?;
        }
        out.push((format!("curve_{key}.svg"), svg));
    }
    Ok(out)
}
