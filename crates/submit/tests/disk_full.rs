//! `llm-merging merge` when the disk fills: a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored,
//! so a write past it fails as a write to a full disk does) at two deterministic points — the
//! shard cannot be allocated, and the shards are written but a tokenizer file cannot be
//! copied after them. Either way: one clear error line, no output directory, no temporary
//! files, and the same merge succeeds once there is room.

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::cli::{offline, ok, one_error_line};
use testkit::faults::file_size_limit;
use testkit::models::TinyLlama;

const CONFIG: &str = r#"[merge]
method = "linear"
[[merge.models]]
model = "a"
parameters = { weight = 0.5 }
[[merge.models]]
model = "b"
parameters = { weight = 0.5 }
"#;

/// Two tiny models (about 7 KB of f32 weights each), the first with a 16 KB tokenizer.json
/// that the merge copies into its output after the weights.
fn workspace() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    TinyLlama::default().write(&tmp.path().join("a"), 1, 1);
    TinyLlama::default().write(&tmp.path().join("b"), 2, 1);
    let tokenizer = format!("{{\"padding\": \"{}\"}}", "x".repeat(16_000));
    std::fs::write(tmp.path().join("a/tokenizer.json"), tokenizer).unwrap();
    std::fs::write(tmp.path().join("merge.toml"), CONFIG).unwrap();
    tmp
}

fn merge(ws: &Path, out: &Path, extra: &[&str], limit: Option<u64>) -> std::process::Output {
    let mut cmd = offline(Command::new(env!("CARGO_BIN_EXE_llm-merging")), ws);
    cmd.current_dir(ws)
        .arg("merge")
        .arg("merge.toml")
        .arg("--out")
        .arg(out)
        .args(extra);
    if let Some(bytes) = limit {
        file_size_limit(&mut cmd, bytes);
    }
    cmd.output().unwrap()
}

/// Everything in `dir` whose name starts with `.` (the writer's temporary directories).
fn hidden(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

#[test]
fn a_full_disk_fails_the_merge_with_one_error_and_leaves_nothing() {
    let tmp = workspace();
    let ws = tmp.path();
    let out = ws.join("outputs/merged");
    // 1. The single 7 KB shard cannot be allocated under a 4 KB limit.
    let o = merge(ws, &out, &[], Some(4096));
    let line = one_error_line(&o, &["model.safetensors", "File too large"]);
    assert!(!out.exists(), "{line}");
    assert_eq!(hidden(&ws.join("outputs")), Vec::<PathBuf>::new(), "{line}");

    // 2. Shards of 2 KB fit, and are written; copying the 16 KB tokenizer.json after them
    //    does not.
    let o = merge(ws, &out, &["--shard-size", "2KB"], Some(8192));
    let line = one_error_line(&o, &["tokenizer.json", "File too large"]);
    assert!(!out.exists(), "{line}");
    assert_eq!(hidden(&ws.join("outputs")), Vec::<PathBuf>::new(), "{line}");

    // With room again, the same merge succeeds.
    ok(&merge(ws, &out, &["--shard-size", "2KB"], None));
    assert!(out.join("model.safetensors.index.json").is_file());
    assert!(out.join("tokenizer.json").is_file());
    assert_eq!(hidden(&ws.join("outputs")), Vec::<PathBuf>::new());
}
