//! Running the `llm-merging` binary in end-to-end tests: cut off from any real hub, and the
//! one-error-line rule for bad input.

use std::path::Path;
use std::process::{Command, Output};

/// `cmd` with the hub at a closed port, `HF_HOME` under `home`, and no token or offline flag
/// from the user's environment.
pub fn offline(mut cmd: Command, home: &Path) -> Command {
    cmd.env("HF_ENDPOINT", "http://127.0.0.1:9")
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
