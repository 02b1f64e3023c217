//! Running the `llm-merging` binary in end-to-end tests: cut off from any real hub, in the
//! workspaces and entries the tests write, and the one-error-line rule for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `cmd` with the hub at a closed port, `HF_HOME` under `home`, and no token or offline flag
/// from the user's environment.
pub fn offline(mut cmd: Command, home: &Path) -> Command {
    cmd.env("HF_ENDPOINT", crate::hub::CLOSED_ENDPOINT)
        .env("HF_HOME", home.join("hf-home"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_AUTH_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    cmd
}

/// stdout followed by stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts that the run succeeded; returns its output.
pub fn ok(o: &Output) -> String {
    let t = text(o);
    assert!(o.status.success(), "failed:\n{t}");
    t
}

/// Asserts that the run failed with exactly one line on stderr, `error: ...`, containing every
/// one of `needles`; returns that line.
pub fn one_error_line(o: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "succeeded:\n{}", text(o));
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {stderr}");
    }
    lines[0].to_string()
}

/// `cmd` run in workspace `ws` on the offline demo: [`offline`] with `HF_HOME` under `ws`, the
/// demo family cached in `demo_dir`, and no `LLM_MERGING_DATA` from the user's environment.
pub fn demo(cmd: Command, ws: &Path, demo_dir: &Path) -> Command {
    let mut cmd = offline(cmd, ws);
    cmd.current_dir(ws)
        .env_remove("LLM_MERGING_DATA")
        .env("LLM_MERGING_DEMO_DIR", demo_dir);
    cmd
}

/// A participant workspace at `ws`: a `Cargo.toml` that makes it a (empty) workspace root.
pub fn workspace(ws: &Path) {
    std::fs::create_dir_all(ws).unwrap();
    std::fs::write(ws.join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
}

/// Writes entry `name` of workspace `ws` (`submissions/<name>/entry.toml`); returns the entry's
/// directory.
pub fn entry(ws: &Path, name: &str, toml: &str) -> PathBuf {
    let dir = ws.join("submissions").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("entry.toml"), toml).unwrap();
    dir
}

/// `root/ws`, a [`workspace`] holding the repository's demo entry as `submissions/demo`.
pub fn demo_workspace(root: &Path) -> PathBuf {
    let ws = root.join("ws");
    workspace(&ws);
    entry(&ws, "demo", include_str!("../submissions/demo/entry.toml"));
    ws
}
