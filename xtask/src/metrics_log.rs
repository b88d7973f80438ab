//! A JSONL metrics file that survives resumes: on (re)start it keeps only the lines of steps
//! the run is resuming after, so a resumed run's file reads like an uninterrupted one's.

use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

pub struct MetricsLog {
    path: PathBuf,
    out: Option<std::fs::File>,
}

impl MetricsLog {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), out: None }
    }

    /// Opens the file, dropping lines whose `step` is past `start_step` (written by an
    /// interrupted run after its last checkpoint). Problems are warnings: metrics are not
    /// worth stopping training for.
    pub fn open(&mut self, start_step: u64) {
        let kept: Vec<String> = std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= start_step)
            })
            .map(str::to_string)
            .collect();
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        let opened = std::fs::write(&self.path, text).and_then(|_| std::fs::OpenOptions::new().append(true).open(&self.path));
        match opened {
            Ok(f) => self.out = Some(f),
            Err(e) => eprintln!("warning: cannot write {}: {e}", self.path.display()),
        }
    }

    /// Appends one line; a failure is printed above the progress bar.
    pub fn write(&mut self, value: &serde_json::Value, bar: &ProgressBar) {
        if let Some(f) = &mut self.out {
            if let Err(e) = writeln!(f, "{value}") {
                let path = self.path.display();
                bar.suspend(|| eprintln!("warning: cannot append to {path}: {e}"));
            }
        }
    }
}

/// Every progress bar of the process, drawn together (the pipeline's stage bar above a
/// trainer's step bar).
pub fn progress() -> &'static indicatif::MultiProgress {
    static MULTI: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    MULTI.get_or_init(indicatif::MultiProgress::new)
}

/// A step progress bar with ETA, positioned at `start` (a resumed run).
pub fn step_bar(stage: &str, total: u64, start: u64) -> ProgressBar {
    let bar = progress().add(ProgressBar::new(total));
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("{{spinner}} {stage} [{{bar:30}}] {{pos}}/{{len}} steps · {{msg}} · ETA {{eta}}"))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start);
    bar.reset_eta();
    bar
}
