//! Where an entry's run leaves what its report shows, and writing `dist/<entry>/report.html`
//! (at the end of every run, and by `llm-merging report`). The page itself is the `report`
//! crate's.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::references::{self, Reference};
use super::BUDGET_SECONDS;
use crate::entry::Entry;

/// The name of the page in `dist/<entry>/`.
pub const FILE: &str = "report.html";

/// The stages of the entry's last run, from its manifest (absent before its first package).
fn stages(dist: &Path) -> Result<Vec<report::StageTime>> {
    let path = dist.join(super::manifest::FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    Ok(serde_json::from_value(v["stages"].clone()).unwrap_or_default())
}

/// Where the entry's run left its outputs.
pub fn source(entry: &Entry) -> Result<report::EntrySource> {
    let dist = entry.dist_dir();
    let work = dist.join("work");
    let refs: Vec<Reference> = match std::fs::read_to_string(work.join(references::FILE)) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}", work.join(references::FILE).display()))?,
        Err(_) => Vec::new(),
    };
    let references = refs
        .into_iter()
        .filter(|r| work.join(&r.dir).join("scores.json").is_file())
        .map(|r| report::RunDir {
            name: r.name,
            role: if r.role == "base" {
                report::Role::Base
            } else {
                report::Role::Expert
            },
            dir: work.join(r.dir),
        })
        .collect();
    Ok(report::EntrySource {
        name: entry.name.clone(),
        method: entry.file.merge.method.clone(),
        entry_path: entry.path_in_workspace(),
        entry_toml: entry.text.clone(),
        // Unresolvable data paths only leave the inputs out of the browser.
        datasets: entry.datasets().unwrap_or_default(),
        merged: report::RunDir {
            name: format!("merge: {}", entry.file.merge.method),
            role: report::Role::Merge,
            dir: work.join("eval"),
        },
        references,
        stages: stages(&dist)?,
        budget_seconds: BUDGET_SECONDS,
        inspect_dir: Some(references::inspect_dir(entry)),
        search_dir: Some(entry.workspace.join("search").join(&entry.name)),
    })
}

/// Writes `dist/<entry>/report.html`; returns its path.
pub fn write_entry_report(entry: &Entry) -> Result<PathBuf> {
    let path = entry.dist_dir().join(FILE);
    write(&path, &report::entry_html(&source(entry)?)?)?;
    Ok(path)
}

/// Writes a page through a temporary file beside it.
pub fn write(path: &Path, html: &str) -> Result<()> {
    report::write(path, html).with_context(|| format!("writing {}", path.display()))
}
