//! `llm-merging convert CONFIG.yml`: a mergekit YAML config as our TOML.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use merge_core::MergeConfig;

/// Arguments of `llm-merging convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A mergekit YAML config (merge_method, base_model, models, parameters, dtype).
    pub config: PathBuf,
}

/// Run `llm-merging convert`: print the equivalent TOML on stdout.
pub fn run(args: ConvertArgs) -> Result<()> {
    let cfg = MergeConfig::from_mergekit_file(&args.config)?;
    print!("{}", cfg.to_toml());
    Ok(())
}
