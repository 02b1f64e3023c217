//! An entry's `dist/<entry>/` is used by one run at a time, and each run starts by removing
//! what a killed run left there: the temporary files and directories every output is written
//! to before it is renamed into place (all named with a leading `.`). A lock file held for
//! the run (`flock`, released by the kernel when the process dies, however it dies) makes
//! that safe: no live run can own them.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The lock's file name, in `dist/<entry>/`.
const LOCK: &str = ".run.lock";

/// Held while a run uses `dist/<entry>/`.
pub struct WorkDirLock {
    _file: File,
}

/// Locks `dist` for this run (failing at once if another run holds it) and removes the
/// temporaries killed runs left in it, its `work/` and `work/predict/`.
pub fn lock_and_sweep(dist: &Path) -> Result<WorkDirLock> {
    std::fs::create_dir_all(dist).with_context(|| format!("{}", dist.display()))?;
    let path = dist.join(LOCK);
    let file = File::create(&path).with_context(|| format!("{}", path.display()))?;
    if file.try_lock().is_err() {
        bail!(
            "{}: another run of this entry is in progress (it holds {})",
            dist.display(),
            path.display()
        );
    }
    for dir in [
        dist.to_path_buf(),
        dist.join("work"),
        dist.join("work/predict"),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with('.') || name == LOCK {
                continue;
            }
            let p = e.path();
            let removed = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match removed {
                Ok(()) => tracing::info!("removed {}, left by an interrupted run", p.display()),
                Err(e) => tracing::warn!("cannot remove {}: {e}", p.display()),
            }
        }
    }
    Ok(WorkDirLock { _file: file })
}
