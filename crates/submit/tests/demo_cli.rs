//! The no-argument run: the demo entry end to end on a fresh workspace, offline (the hub
//! endpoint is a closed port), then again from the caches.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

fn run(ws: &Path, demo_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llm-merging"))
        .current_dir(ws)
        // Any hub access would fail: nothing listens on port 9.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", ws.join("hf-home"))
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env_remove("LLM_MERGING_DATA")
        .env("LLM_MERGING_DEMO_DIR", demo_dir)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn default_run_is_the_offline_demo() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    std::fs::create_dir_all(ws.join("submissions/demo")).unwrap();
    std::fs::write(ws.join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
    std::fs::write(
        ws.join("submissions/demo/entry.toml"),
        include_str!("../../../submissions/demo/entry.toml"),
    )
    .unwrap();
    // Shared with the demo crate's tests (same recipe hash → built once per target dir).
    let demo_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-family");

    let t = Instant::now();
    let first_output = run(&ws, &demo_dir);
    let first = t.elapsed().as_secs_f64();
    let out = text(&first_output);
    println!("{out}\nfirst run: {first:.1}s");
    assert!(first_output.status.success(), "{out}");
    for row in [
        "base",
        "largest",
        "reverse",
        "opposite-lora",
        "merge: ties",
        "merge: task_arithmetic",
        "merge: linear",
        "entry: ties",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(row)),
            "no `{row}` row in\n{out}"
        );
    }
    assert!(out.contains("package written to"), "{out}");
    let dist = ws.join("dist/demo");
    for f in ["submission.csv", "scores.json", "manifest.json", "demo.tar"] {
        assert!(dist.join(f).is_file(), "{f} missing");
    }

    let t = Instant::now();
    let o = run(&ws, &demo_dir);
    let second = t.elapsed().as_secs_f64();
    let again = text(&o);
    println!("{again}\nsecond run: {second:.1}s");
    assert!(o.status.success(), "{again}");
    for stage in ["merge", "eval", "predict"] {
        assert!(
            again
                .lines()
                .any(|l| l.starts_with(stage) && l.ends_with("reused")),
            "stage {stage} not reused:\n{again}"
        );
    }
    assert!(!again.contains("building the demo model family"));
    assert!(second < 30.0, "second run took {second:.1}s");
    // Same table both times (on stdout: stderr carries the family's build log when this test
    // is the one that builds it).
    let table = |o: &Output| -> String {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .skip_while(|l| !l.starts_with("the demo"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(table(&first_output), table(&o));
}
