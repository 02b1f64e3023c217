//! `llm-merging report --entry DIR [--entry DIR …]`: an entry's run as one self-contained
//! HTML page (`dist/<entry>/report.html`, also written at the end of `run`), or several
//! entries compared on the same rows (see [`crate::pipeline::report`] for where the outputs
//! are, and the `report` crate for the page).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::entry::Entry;
use crate::pipeline::report::{source, write, FILE};

/// Arguments of `llm-merging report`.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// The entry directory (or its name under submissions/); give it several times to compare
    /// entries on the same rows (a paired test per dataset).
    #[arg(long, required = true)]
    pub entry: Vec<PathBuf>,
    /// Where to write the page (default: `dist/<entry>/report.html`; for a comparison,
    /// `dist/compare-<entry>-<entry>….html`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs `llm-merging report`.
pub fn run(args: ReportArgs) -> Result<()> {
    let entries = args
        .entry
        .iter()
        .map(|e| Entry::load(e))
        .collect::<Result<Vec<_>>>()?;
    let path = if let [entry] = &entries[..] {
        let path = args
            .out
            .clone()
            .unwrap_or_else(|| entry.dist_dir().join(FILE));
        write(&path, &report::entry_html(&source(entry)?)?)?;
        path
    } else {
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        let path = args.out.clone().unwrap_or_else(|| {
            entries[0]
                .workspace
                .join("dist")
                .join(format!("compare-{}.html", names.join("-")))
        });
        let sources = entries.iter().map(source).collect::<Result<Vec<_>>>()?;
        write(&path, &report::comparison_html(&sources)?)?;
        path
    };
    println!("report written to {}", path.display());
    Ok(())
}
