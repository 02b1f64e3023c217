//! `dist/<entry>/manifest.json` (what ran, on what, with which inputs and results) and the
//! stage summary printed at the end of a run.

use std::path::Path;

use anyhow::Result;

use super::stage::{StageReport, StageState};
use super::BUDGET_SECONDS;
use crate::entry::Entry;
use crate::package;

/// Everything the manifest records.
pub struct Manifest<'a> {
    pub entry: &'a Entry,
    pub device: &'a str,
    /// The merge stage's state (its inputs' and outputs' weight-file hashes).
    pub merge_state: &'a StageState,
    pub scores: serde_json::Value,
    pub reports: &'a [StageReport],
    pub submission_rows: usize,
    pub tar: &'a Path,
    pub tar_files: usize,
    pub dir_name: &'a str,
    /// The entry's prompting (settings, chat template sha256, few-shot files), if any.
    pub prompt: Option<serde_json::Value>,
}

/// The manifest's file name, in `dist/<entry>/` and at the top of the tar's tree.
pub const FILE: &str = "manifest.json";

/// The manifest as JSON.
pub fn render(m: &Manifest) -> Result<serde_json::Value> {
    let entry = m.entry;
    let cfg = &entry.file.merge;
    let eval = &entry.file.eval;
    let dist = entry.dist_dir();
    let mut manifest = serde_json::json!({
        "entry": entry.name,
        // Where the entry is inside the packed tree (a directory with entry.toml, or one .toml).
        "entry_path": entry.path_in_workspace(),
        "entry_toml": entry.text,
        "tool": {
            "name": "llm-merging-kit",
            "version": env!("CARGO_PKG_VERSION"),
            "git_commit": package::git_commit(&entry.workspace),
        },
        "merge": {
            "method": cfg.method,
            "dtype": cfg.dtype.map(|d| d.torch_name()),
            "seed": cfg.seed,
        },
        "models": m.merge_state.extra["models"],
        "merged_weights": m.merge_state.extra["merged_files"],
        "eval": {
            "device": m.device,
            "dtype": eval.dtype,
            "scoring": eval.scoring,
            "max_gen_len": eval.max_gen_len,
            "batch_size": eval.batch_size,
        },
        "scores": m.scores,
        "stages": m.reports,
        "submission": {
            "rows": m.submission_rows,
            "sha256": package::sha256_file(&dist.join("submission.csv"))?,
        },
        "tar": {
            "file": m.tar.file_name().map(|f| f.to_string_lossy().into_owned()),
            "files": m.tar_files,
            "top_level": m.dir_name,
        },
        "command_line": std::env::args().collect::<Vec<_>>(),
    });
    if let (Some(p), Some(o)) = (&m.prompt, manifest.as_object_mut()) {
        o.insert("prompt".into(), p.clone());
    }
    Ok(manifest)
}

/// The manifest as it goes into the tar: without what changes from run to run of the same
/// tree (stage timings, the command line), so packaging stays deterministic.
pub fn for_tar(manifest: &serde_json::Value) -> serde_json::Value {
    let mut m = manifest.clone();
    if let Some(o) = m.as_object_mut() {
        o.remove("stages");
        o.remove("command_line");
    }
    m
}

/// The stage table, the time counted against the competition's budget, and the wall time.
pub fn print_summary(reports: &[StageReport], wall_seconds: f64) {
    println!("\n{:<14} {:>10}  status", "stage", "seconds");
    let mut budget = 0.0;
    let mut counted = Vec::new();
    for r in reports {
        println!(
            "{:<14} {:>10.1}  {}",
            r.stage,
            r.seconds,
            if r.reused { "reused" } else { "ran" }
        );
        // Merging, evaluation and prediction count against the competition's budget;
        // packaging, reference rows and diagnostics do not.
        if report::timings::counted(&r.stage) {
            budget += r.seconds;
            counted.push(r.stage.as_str());
        }
    }
    println!(
        "{}: {:.1}s{}",
        counted.join(" + "),
        budget,
        if budget > BUDGET_SECONDS {
            " — OVER the competition's 1-hour budget"
        } else {
            " (within the 1-hour budget)"
        }
    );
    println!("wall time of this run: {wall_seconds:.1}s");
}
