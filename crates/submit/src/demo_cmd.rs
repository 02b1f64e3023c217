//! `llm-merging demo` (build the offline demo family and print its table) and the
//! no-argument run (the demo entry end to end, then the table).

use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;

use crate::demo_family::{self, ensure};
use crate::entry::Entry;
use crate::pipeline::{self, RunOptions};

/// Arguments of `llm-merging demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Rebuild the family even when the cached one matches the recipe.
    #[arg(long)]
    pub force: bool,
    /// Only build the family (no comparison table).
    #[arg(long)]
    pub build_only: bool,
}

/// `llm-merging demo`.
pub fn run(args: &DemoArgs) -> Result<()> {
    let dir = demo_family::dir(None)?;
    if args.force {
        demo::build(&dir, &demo::Recipe::default())?;
    } else {
        ensure(&dir)?;
    }
    println!("demo family: {}", dir.display());
    if !args.build_only {
        let table = demo::compare(&dir)?;
        print!("\n{}", table.render());
    }
    Ok(())
}

/// The no-argument run: the demo entry (merge → eval → predict → package), then the table of
/// base, experts, reference merges and the entry's own merge.
pub fn run_default(entry: &Path) -> Result<()> {
    pipeline::run(&RunOptions {
        entry: entry.to_path_buf(),
        force: false,
        dir_name: "LLM-Merging".into(),
        until: pipeline::Until::Package,
        test_file: None,
        references: false,
    })?;
    let e = Entry::load(entry)?;
    let dir = demo_family::dir(Some(&e.dir))?;
    let mut table = demo::compare(&dir)?;
    let scores_path = e.dist_dir().join("scores.json");
    let scores: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&scores_path)
            .with_context(|| format!("{}", scores_path.display()))?,
    )?;
    let mut row = demo::Row {
        name: format!("entry: {}", e.file.merge.method),
        scores: Vec::new(),
    };
    for k in demo::tasks::Skill::ALL {
        // The entry's datasets are the demo CSVs, named by skill.
        match scores[k.name()][k.metric()].as_f64() {
            Some(v) => row.scores.push(v),
            None => {
                // An entry evaluated on other datasets has no demo row.
                row.scores.clear();
                break;
            }
        }
    }
    if !row.scores.is_empty() {
        table.rows.push(row);
    }
    println!(
        "\nthe demo (skills' validation scores):\n{}",
        table.render()
    );
    println!("package written to {}", e.dist_dir().display());
    Ok(())
}
