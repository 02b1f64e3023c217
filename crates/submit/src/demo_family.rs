//! The offline demo family as entries and commands see it: where it lives, and building it
//! the first time something needs it.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::entry::Entry;

/// The demo directory for this workspace (`LLM_MERGING_DEMO_DIR` overrides).
pub fn dir(start: Option<&Path>) -> Result<PathBuf> {
    Ok(demo::demo_dir(start)?)
}

/// Builds the demo family when the cache is missing or from another recipe.
pub fn ensure(dir: &Path) -> Result<()> {
    let recipe = demo::Recipe::default();
    if demo::cached(dir, &recipe).is_none() {
        println!(
            "building the demo model family in {} (once; under a minute on 2 cores)",
            dir.display()
        );
        demo::build(dir, &recipe)?;
    }
    Ok(())
}

/// Before an entry runs: builds the demo family if the entry uses `demo:` models.
pub fn ensure_for_entry(entry: &Entry) -> Result<()> {
    if entry.text.contains(demo::DEMO_PREFIX) {
        ensure(&dir(Some(&entry.dir))?)?;
    }
    Ok(())
}
