//! `llm-merging run --entry DIR` and `llm-merging package`: every stage of an entry (see
//! [`crate::pipeline`]), reusing those whose inputs did not change.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::pipeline::{self, RunOptions, Until};

/// Arguments of `llm-merging run` and `llm-merging package`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The entry directory (or its name under submissions/).
    #[arg(long, default_value = "submissions/demo")]
    pub entry: PathBuf,
    /// Redo every stage even if its inputs did not change.
    #[arg(long)]
    pub force: bool,
    /// Top-level directory inside the tar (the competition asked for `LLM-Merging`).
    #[arg(long, default_value = "LLM-Merging")]
    pub dir_name: String,
    /// The last stage: `predict` merges and predicts the test file only (no validation eval,
    /// no package), as organizers re-run an entry.
    #[arg(long, value_enum, default_value = "package")]
    pub until: Until,
    /// Predict this test file instead of the entry's `[predict] test_file`.
    #[arg(long)]
    pub test_file: Option<PathBuf>,
    /// Also score the base and each expert on the same validation rows and inspect the task
    /// vectors (stages reused while unchanged), for the report's comparison rows and heatmaps.
    #[arg(long)]
    pub references: bool,
}

/// Runs `llm-merging run` / `package`.
pub fn run(args: RunArgs) -> Result<()> {
    pipeline::run(&RunOptions {
        entry: args.entry,
        force: args.force,
        dir_name: args.dir_name,
        until: args.until,
        test_file: args.test_file,
        references: args.references,
    })
    .map(drop)
}
