//! `llm-merging inspect CONFIG` / `--entry DIR`: the task-vector diagnostics of a merge's
//! experts (see the `inspect` crate), printed as a summary with findings and written as
//! `inspect.json` plus SVG heatmaps.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use merge_core::source::{HubSettings, Resolver};
use merge_core::MergeConfig;

use crate::entry::Entry;

/// Arguments of `llm-merging inspect`.
#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// A merge config: TOML with a `[merge]` table, or a mergekit YAML file.
    #[arg(required_unless_present = "entry", conflicts_with = "entry")]
    pub config: Option<PathBuf>,
    /// An entry directory (or its name under submissions/): its `[merge]` table.
    #[arg(long)]
    pub entry: Option<PathBuf>,
    /// Output directory (default: `inspect/`; with `--entry`, `dist/<entry>/inspect/`, where
    /// `llm-merging report` finds it).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Inspects the task vectors of `cfg` (models resolved by `resolver`) into `out`, printing the
/// summary.
pub fn inspect_into(cfg: &MergeConfig, resolver: &Resolver, out: &Path) -> Result<()> {
    let x = inspect::inspect(cfg, resolver, true)?;
    print!("{}", x.summary());
    let files = x
        .write(out)
        .with_context(|| format!("writing the inspect outputs to {}", out.display()))?;
    println!("\nwritten to {}: {}", out.display(), files.join(", "));
    Ok(())
}

/// The resolver of an entry's models (relative paths from the entry, `demo:` models built on
/// first use).
pub fn entry_resolver(entry: &Entry) -> Result<Resolver> {
    crate::demo_family::ensure_for_entry(entry)?;
    Ok(demo::with_demo_models(
        Resolver::new(HubSettings::from_env()).with_base_dir(&entry.dir),
    ))
}

/// Runs `llm-merging inspect`.
pub fn run(args: InspectArgs) -> Result<()> {
    if let Some(dir) = &args.entry {
        let entry = Entry::load(dir)?;
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| crate::pipeline::references::inspect_dir(&entry));
        return inspect_into(&entry.file.merge, &entry_resolver(&entry)?, &out);
    }
    let config = args
        .config
        .as_ref()
        .expect("clap requires a config or --entry");
    let cfg = MergeConfig::from_file(config)?;
    let config_dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolver = demo::with_demo_models(Resolver::from_env().with_base_dir(config_dir));
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("inspect"));
    inspect_into(&cfg, &resolver, &out)
}
