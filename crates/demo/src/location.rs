//! Where the demo family lives, and the `demo:NAME` references that name its members: the
//! demo registers them as an alias on merge-core's resolver ([`with_demo_models`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use merge_core::source::Resolver;

/// Prefix of references to the demo family (`demo:base`, `demo:largest`, ...).
pub const DEMO_PREFIX: &str = "demo:";

/// The workspace root above `start`: the nearest directory whose `Cargo.toml` declares a
/// `[workspace]`.
pub fn find_workspace(start: &Path) -> Option<PathBuf> {
    let start = start.canonicalize().unwrap_or_else(|_| start.to_path_buf());
    start.ancestors().find_map(|d| {
        let text = std::fs::read_to_string(d.join("Cargo.toml")).ok()?;
        text.contains("[workspace]").then(|| d.to_path_buf())
    })
}

/// Where the demo family lives: `LLM_MERGING_DEMO_DIR`, else `.cache/demo` in the workspace
/// above `start` (or above the working directory).
pub fn demo_dir(start: Option<&Path>) -> merge_core::Result<PathBuf> {
    if let Some(d) = std::env::var_os("LLM_MERGING_DEMO_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let cwd = std::env::current_dir().ok();
    start
        .and_then(find_workspace)
        .or_else(|| cwd.as_deref().and_then(find_workspace))
        .map(|w| w.join(".cache").join("demo"))
        .ok_or_else(|| merge_core::Error::Config {
            path: DEMO_PREFIX.into(),
            message: "cannot find the workspace for `demo:` models; set LLM_MERGING_DEMO_DIR"
                .into(),
        })
}

/// `resolver` with `demo:NAME` resolving to the family member `NAME`, in the demo directory of
/// the workspace above the resolver's base directory (see [`demo_dir`]).
pub fn with_demo_models(resolver: Resolver) -> Resolver {
    let start = resolver.base_dir().map(Path::to_path_buf);
    resolver.with_alias(
        DEMO_PREFIX,
        Arc::new(move |name: &str| {
            let dir = demo_dir(start.as_deref())?.join(name);
            if !dir.is_dir() {
                return Err(merge_core::Error::MissingFile {
                    path: dir,
                    hint: Some("demo model; build the demo family with `llm-merging demo`".into()),
                });
            }
            Ok(dir)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use merge_core::source::ModelRef;

    #[test]
    fn demo_models_live_under_the_workspace() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().canonicalize().unwrap();
        std::fs::write(ws.join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
        let entry = ws.join("submissions").join("demo");
        std::fs::create_dir_all(&entry).unwrap();
        assert_eq!(find_workspace(&entry), Some(ws.clone()));
        // A missing family says how to build it (whatever LLM_MERGING_DEMO_DIR says).
        let r = with_demo_models(Resolver::from_env().with_base_dir(&entry));
        let err = r
            .resolve(&ModelRef::new("demo:no-such-model"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("llm-merging demo"), "{err}");
        if std::env::var_os("LLM_MERGING_DEMO_DIR").is_none() {
            std::fs::create_dir_all(ws.join(".cache/demo/base")).unwrap();
            let f = r.resolve(&ModelRef::new("demo:base")).unwrap();
            assert_eq!(f.local_dir(), Some(ws.join(".cache/demo/base").as_path()));
            assert_eq!(f.commit, None);
        }
    }
}
