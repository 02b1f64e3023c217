//! What identifies a stage's model inputs, and where their files are on disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use merge_core::source::ModelFiles;
use sha2::{Digest, Sha256};

use crate::package;

/// Size and mtime of every file of a local directory: a cheap identity for stage keys.
fn fingerprint_dir(dir: &Path, h: &mut Sha256) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let meta = e.metadata()?;
        if meta.is_file() {
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            h.update(format!(
                "{}:{}:{mtime};",
                e.file_name().to_string_lossy(),
                meta.len()
            ));
        }
    }
    Ok(())
}

/// Feeds the identity of one resolved model to `h`: its id plus the commit of a hub model, or
/// the file sizes and times of a local directory.
pub fn model_identity(files: &ModelFiles, h: &mut Sha256) -> Result<()> {
    h.update(files.reference.model.as_bytes());
    match (&files.commit, files.local_dir()) {
        (Some(c), _) => h.update(c.as_bytes()),
        (None, Some(dir)) => fingerprint_dir(dir, h)?,
        (None, None) => {}
    }
    Ok(())
}

/// The local directory of a model's weight files (downloaded already by the merge).
pub fn weights_dir(files: &ModelFiles) -> Result<PathBuf> {
    if let Some(d) = files.local_dir() {
        return Ok(d.to_path_buf());
    }
    for name in [
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
        "adapter_model.safetensors",
        "adapter_model.bin",
    ] {
        if let Some(p) = files.get(name)? {
            return Ok(p.parent().context("snapshot dir")?.to_path_buf());
        }
    }
    bail!("{}: no weight files", files.describe())
}

/// sha256 of every weight file (`*.safetensors`, `*.bin`, `*.index.json`) directly in `dir`.
pub fn weight_file_hashes(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let weight = name.ends_with(".safetensors")
            || name.ends_with(".bin")
            || name.ends_with(".index.json");
        if e.path().is_file() && weight {
            out.insert(name, package::sha256_file(&e.path())?);
        }
    }
    Ok(out)
}
