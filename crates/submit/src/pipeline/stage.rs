//! A stage of an entry's run: a key over everything it depends on, its outputs, and reuse.
//!
//! A stage's state (`work/<stage>.json`: the key it ran with, how long it took, and what it
//! wants to remember) is written only after its outputs are complete, so a run killed mid-stage
//! never leaves a state that claims outputs which are not there; and the old state is removed
//! before a stage reruns, so it never vouches for outputs the rerun is halfway through
//! replacing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::package;

/// The identity of a stage's inputs: a sha256 over the parts fed to it, in order.
pub struct Key(Sha256);

impl Key {
    /// A key that starts with `prefix` (the stage's name and what it builds on).
    pub fn new(prefix: &str) -> Self {
        let mut h = Sha256::new();
        h.update(prefix.as_bytes());
        Key(h)
    }

    /// Adds bytes.
    pub fn add(mut self, part: impl AsRef<[u8]>) -> Self {
        self.0.update(part.as_ref());
        self
    }

    /// Adds a file's sha256 (its contents, not its name or time).
    pub fn file(self, path: &Path) -> Result<Self> {
        Ok(self.add(package::sha256_file(path)?))
    }

    /// The underlying hasher, for parts that feed it themselves.
    pub fn hasher(&mut self) -> &mut Sha256 {
        &mut self.0
    }

    /// The hex digest.
    pub fn finish(self) -> String {
        format!("{:x}", self.0.finalize())
    }
}

/// What a stage left behind, stored as `work/<stage>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct StageState {
    /// The key it ran with.
    pub key: String,
    /// Seconds it took.
    pub seconds: f64,
    /// What the stage wants to remember (e.g. the merge's input files and their hashes).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// How one stage went this time.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub stage: String,
    /// Seconds it took when it last ran.
    pub seconds: f64,
    /// Whether this run reused it.
    pub reused: bool,
}

/// One stage under a work directory.
pub struct Stage {
    name: String,
    state_path: PathBuf,
    force: bool,
}

impl Stage {
    /// The stage `name`, its state in `work/<name>.json`; `force` never reuses.
    pub fn new(work: &Path, name: &str, force: bool) -> Self {
        Stage {
            name: name.to_string(),
            state_path: work.join(format!("{name}.json")),
            force,
        }
    }

    /// The state of an earlier run with the same key whose outputs are still `present`.
    pub fn reusable(&self, key: &str, present: bool) -> Option<StageState> {
        if self.force || !present {
            return None;
        }
        let text = std::fs::read_to_string(&self.state_path).ok()?;
        serde_json::from_str::<StageState>(&text)
            .ok()
            .filter(|s| s.key == key)
    }

    /// Reuses the earlier run when [`Stage::reusable`], else runs `run` (which returns the
    /// stage's `extra`) and records its state. Either way, reports to `reports`.
    pub fn run_or_reuse(
        &self,
        key: &str,
        present: bool,
        reports: &mut Vec<StageReport>,
        run: impl FnOnce() -> Result<serde_json::Value>,
    ) -> Result<StageState> {
        let (state, reused) = match self.reusable(key, present) {
            Some(s) => (s, true),
            None => {
                // The old state goes before the outputs change: a run killed while this stage
                // rewrites them must not leave a state that claims them.
                match std::fs::remove_file(&self.state_path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
                let t = Instant::now();
                let extra = run()?;
                let s = StageState {
                    key: key.to_string(),
                    seconds: t.elapsed().as_secs_f64(),
                    extra,
                };
                package::write_file(
                    &self.state_path,
                    serde_json::to_string_pretty(&s)?.as_bytes(),
                )?;
                (s, false)
            }
        };
        reports.push(StageReport {
            stage: self.name.clone(),
            seconds: state.seconds,
            reused,
        });
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_reruns_when_its_key_or_outputs_change_and_never_when_it_failed() {
        let dir = tempfile::tempdir().unwrap();
        let stage = Stage::new(dir.path(), "s", false);
        let mut reports = Vec::new();
        let mut runs = 0;
        for (key, present) in [("a", true), ("a", true), ("b", true), ("b", false)] {
            stage
                .run_or_reuse(key, present, &mut reports, || {
                    runs += 1;
                    Ok(serde_json::json!(runs))
                })
                .unwrap();
        }
        assert_eq!(runs, 3, "the second run with key a is reused");
        assert_eq!(
            reports.iter().map(|r| r.reused).collect::<Vec<_>>(),
            [false, true, false, false]
        );
        assert_eq!(
            stage.reusable("b", true).unwrap().extra,
            serde_json::json!(3)
        );
        assert!(Stage::new(dir.path(), "s", true)
            .reusable("b", true)
            .is_none());
        // A stage that fails records nothing, and its old state went before it started (the
        // failed run may have changed the outputs): nothing is reused afterwards.
        let failed = stage.run_or_reuse("c", true, &mut reports, || anyhow::bail!("boom"));
        assert!(failed.is_err());
        assert!(stage.reusable("c", true).is_none());
        assert!(stage.reusable("b", true).is_none());
    }

    #[test]
    fn keys_depend_on_every_part_in_order() {
        let k = |parts: &[&str]| parts.iter().fold(Key::new("x;"), |k, p| k.add(p)).finish();
        assert_eq!(k(&["a", "b"]), k(&["a", "b"]));
        assert_ne!(k(&["a", "b"]), k(&["b", "a"]));
        assert_ne!(k(&["a"]), k(&["b"]));
    }
}
