//! Evaluation metrics on hand-written rows with known answers, malformed prediction lines,
//! and the report outputs.

use thinkjson_eval::{curves_svg, evaluate, markdown, metrics_svg, parse_jsonl, Curves, Prediction, Report, Sample};
use thinkjson_reward::ValidatorCache;

fn run() -> thinkjson_eval::RunReport {
    let (samples, bad_data) = parse_jsonl::<Sample>(include_str!("fixtures/data.jsonl"));
    assert!(bad_data.is_empty());
    let (preds, skipped) = parse_jsonl::<Prediction>(include_str!("fixtures/predictions.jsonl"));
    evaluate("model-a", &samples, &preds, skipped, &ValidatorCache::new())
}

#[test]
fn metrics_have_known_values() {
    let r = run();
    let o = &r.overall;
    assert_eq!(o.rows, 4);
    // r4 has no prediction → no output.
    assert_eq!(o.no_output, 0.25);
    assert_eq!(o.valid_json, 0.75);
    // r1 valid; r2 valid (fenced); r3 "21.5" is a string → invalid.
    assert_eq!(o.schema_valid, 0.5);
    assert_eq!(o.format_valid, 0.5);
    // match: r1 1, r2 1 (order-free), r3 0.5 (number as string), r4 0.
    assert!((o.mean_match - 2.5 / 4.0).abs() < 1e-12);
    assert_eq!(o.exact, 0.25);
    // noise over rows with output: r1 0, r3 0, r2: "```json" + "```" = 10 of 10 + 27 chars
    // (`{"items":[{"a":2},{"a":1}]}` has 27 non-whitespace characters).
    let r2_noise = 10.0 / 37.0;
    assert!((o.mean_noise - r2_noise / 3.0).abs() < 1e-12, "{}", o.mean_noise);
    assert_eq!(o.mean_latency_ms, Some(200.0));
    assert_eq!(o.mean_tokens, Some(30.0));
    assert_eq!(r.by_kind["batch_record"].rows, 2);
    assert_eq!(r.by_kind["deviation"].mean_match, 0.25);
    assert_eq!(r.by_style.len(), 3);
    assert_eq!(r.by_depth[&2].rows, 1);
}

#[test]
fn malformed_prediction_lines_are_reported_and_the_rest_scored() {
    let r = run();
    let lines: Vec<usize> = r.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, vec![3, 5]);
    assert!(r.skipped[1].reason.contains("id"), "{}", r.skipped[1].reason);
    assert_eq!(r.unknown_ids, 1);
    assert_eq!(r.rows.len(), 4);
}

#[test]
fn report_has_tables_and_charts() {
    let baseline = run();
    let mut other = run();
    other.name = "model-b".into();
    let curves = vec![Curves::from_jsonl("grpo", "{\"step\": 1, \"reward_mean\": 0.1, \"kl\": 0.0}\n{\"step\": 2, \"reward_mean\": 0.4}\nnot json\n")];
    let report = Report { runs: vec![baseline, other], curves };
    let md = markdown(&report);
    assert!(md.contains("| model-a | 4 |") && md.contains("| model-b | 4 |"), "{md}");
    assert!(md.contains("By schema depth") && md.contains("curve_reward_mean.svg"));
    let svg = metrics_svg(&report).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("model-b"));
    let charts = curves_svg(&report.curves).unwrap();
    let names: Vec<&str> = charts.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(names, vec!["curve_reward_mean.svg", "curve_kl.svg"]);
    let json = serde_json::to_string(&report).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.runs.len(), 2);
}
