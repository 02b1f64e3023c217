//! The no-argument run: the demo entry end to end on a fresh workspace, offline (the hub
//! endpoint is a closed port), then again from the caches.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use testkit::cli::{demo, demo_workspace, ok};

fn run(ws: &Path, demo_dir: &Path) -> Output {
    demo(
        Command::new(env!("CARGO_BIN_EXE_llm-merging")),
        ws,
        demo_dir,
    )
    .output()
    .unwrap()
}

#[test]
fn default_run_is_the_offline_demo() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = demo_workspace(tmp.path());
    // Shared with the demo crate's tests (same recipe hash → built once per target dir).
    let demo_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-family");

    let t = Instant::now();
    let first_output = run(&ws, &demo_dir);
    let first = t.elapsed().as_secs_f64();
    let out = ok(&first_output);
    println!("{out}\nfirst run: {first:.1}s");
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
    for f in [
        "submission.csv",
        "scores.json",
        "manifest.json",
        "demo.tar",
        "report.html",
        "inspect/inspect.json",
        "work/references/expert-3/scores.json",
    ] {
        assert!(dist.join(f).is_file(), "{f} missing");
    }

    let t = Instant::now();
    let o = run(&ws, &demo_dir);
    let second = t.elapsed().as_secs_f64();
    let again = ok(&o);
    println!("{again}\nsecond run: {second:.1}s");
    // The demo entry sets `references = true`: the base and experts are scored and the task
    // vectors inspected once, then reused.
    for stage in [
        "merge",
        "eval",
        "predict",
        "ref-base",
        "ref-expert-3",
        "inspect",
    ] {
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
