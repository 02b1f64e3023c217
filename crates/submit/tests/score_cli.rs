//! The organizers' flow on the offline demo: three submissions (the demo entry's package, a
//! package whose entry names an unpinned hub model, a corrupt tar) scored as two shards,
//! collected into one leaderboard, and scored again without any work.

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::cli::{demo, demo_workspace, ok};

fn bin(ws: &Path, demo_dir: &Path) -> Command {
    demo(
        Command::new(env!("CARGO_BIN_EXE_llm-merging")),
        ws,
        demo_dir,
    )
}

/// A workspace holding the demo entry, packaged: returns (workspace, its tar).
fn demo_package(root: &Path, demo_dir: &Path) -> (PathBuf, PathBuf) {
    let ws = demo_workspace(root);
    ok(&bin(&ws, demo_dir)
        .args(["package", "--entry", "submissions/demo"])
        .output()
        .unwrap());
    let tar = ws.join("dist/demo/demo.tar");
    assert!(tar.is_file());
    (ws, tar)
}

/// A tar of `files` under `LLM-Merging/`.
fn tar_of(path: &Path, files: &[(&str, &str)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, format!("LLM-Merging/{name}"), data.as_bytes())
            .unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn shards_score_and_collect_into_one_leaderboard() {
    let tmp = tempfile::tempdir().unwrap();
    let demo_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-family");
    let (ws, demo_tar) = demo_package(tmp.path(), &demo_dir);

    // The package carries its manifest at the top of the tree, naming the entry.
    let mut names = Vec::new();
    for e in tar::Archive::new(std::fs::File::open(&demo_tar).unwrap())
        .entries()
        .unwrap()
    {
        names.push(e.unwrap().path().unwrap().display().to_string());
    }
    assert_eq!(names[0], "LLM-Merging/manifest.json", "{names:?}");

    let subs = tmp.path().join("submissions");
    std::fs::create_dir_all(&subs).unwrap();
    std::fs::copy(&demo_tar, subs.join("alice.tar")).unwrap();
    tar_of(
        &subs.join("bob.tar"),
        &[
            (
                "manifest.json",
                r#"{"entry": "hub", "entry_path": "submissions/hub"}"#,
            ),
            ("Cargo.toml", "[workspace]\nmembers = []\n"),
            (
                "submissions/hub/entry.toml",
                "[merge]\nmethod = \"linear\"\n[[merge.models]]\nmodel = \"someone/some-model\"\n",
            ),
        ],
    );
    let bytes = std::fs::read(&demo_tar).unwrap();
    std::fs::write(subs.join("carol.tar"), &bytes[..bytes.len() / 3]).unwrap();

    let data = demo_dir.join("data");
    let labels = data.join("test-labels.csv");
    let out = tmp.path().join("scores");
    // `score` of every submission into `out`.
    let score_into = |out: &Path, extra: &[&str]| {
        bin(&ws, &demo_dir)
            .arg("score")
            .arg("--submissions")
            .arg(&subs)
            .arg("--labels")
            .arg(&labels)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let score = |extra: &[&str]| ok(&score_into(&out, extra));
    let first = score(&["--shard", "0/2"]);
    assert!(first.contains("alice: scored"), "{first}");
    assert!(first.contains("carol: failed at unpack"), "{first}");
    let second = score(&["--shard", "1/2"]);
    assert!(second.contains("bob: failed at rules"), "{second}");
    let collected = ok(&bin(&ws, &demo_dir)
        .arg("score")
        .arg("--collect")
        .arg(&out)
        .output()
        .unwrap());
    assert!(collected.contains("3 submissions"), "{collected}");

    let board = std::fs::read_to_string(out.join("leaderboard.csv")).unwrap();
    let lines: Vec<&str> = board.lines().collect();
    assert_eq!(lines.len(), 4, "{board}");
    assert!(lines[1].starts_with("1,alice,demo,"), "{board}");
    assert!(lines[1].contains(",scored,"), "{board}");
    assert!(
        lines[2].starts_with(",bob,hub,") && lines[2].contains("someone/some-model: no revision"),
        "{board}"
    );
    assert!(
        lines[3].starts_with(",carol,,") && lines[3].contains("truncated"),
        "{board}"
    );
    let html = std::fs::read_to_string(out.join("leaderboard.html")).unwrap();
    assert!(html.contains("3 submissions: 1 scored, 2 failed"), "{html}");

    // The scores equal scoring the entry's own submission.csv directly.
    let direct: serde_json::Value = serde_json::from_str(&ok(&bin(&ws, &demo_dir)
        .arg("score")
        .arg("--predictions")
        .arg(ws.join("dist/demo/submission.csv"))
        .arg("--labels")
        .arg(&labels)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap()))
    .unwrap();
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results/alice.json")).unwrap())
            .unwrap();
    assert_eq!(result["status"], "scored");
    for k in ["multiple_choice", "generation", "overall", "rows"] {
        assert_eq!(result[k], direct[k], "{k}: {result} vs {direct}");
    }
    assert!(direct["overall"].as_f64().unwrap() > 0.3, "{direct}");
    let stages: Vec<&str> = result["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["merge", "predict"]);

    // A rerun does no work.
    let before = std::fs::metadata(out.join("results/alice.json"))
        .unwrap()
        .modified()
        .unwrap();
    let again = score(&[]);
    for name in ["alice", "bob", "carol"] {
        assert!(
            again.contains(&format!("{name}: already scored")),
            "{again}"
        );
    }
    let after = std::fs::metadata(out.join("results/alice.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);

    // An entry over budget is stopped (or, finished between two looks, refused) and says so:
    // no run of a process, let alone a merge, fits in a millisecond.
    let tight = tmp.path().join("tight");
    let t = ok(&score_into(
        &tight,
        &["--budget", "0.001s", "--shard", "0/3"],
    ));
    assert!(t.contains("alice: failed at budget: over budget"), "{t}");
}

/// The Slurm and Kubernetes templates: their syntax, their GPU and shard settings, and the
/// command each runs, executed here for real on the demo submissions (with the variables the
/// schedulers would set).
#[test]
fn cluster_templates_run_the_shards_they_are_given() {
    let tmp = tempfile::tempdir().unwrap();
    let demo_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-family");
    let (ws, demo_tar) = demo_package(tmp.path(), &demo_dir);
    let work = tmp.path().join("work");
    let subs = work.join("submissions");
    std::fs::create_dir_all(&subs).unwrap();
    std::fs::copy(&demo_tar, subs.join("alice.tar")).unwrap();
    std::fs::write(subs.join("zed.tar"), b"not a tar").unwrap();
    let data = demo_dir.join("data");
    std::os::unix::fs::symlink(&data, work.join("data")).unwrap();
    std::fs::copy(data.join("test-labels.csv"), work.join("labels.csv")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let exe = Path::new(env!("CARGO_BIN_EXE_llm-merging"));

    // Slurm: a bash script whose #SBATCH lines ask for one GPU per array task.
    let sbatch = root.join("scripts/cluster/score.sbatch");
    let script = std::fs::read_to_string(&sbatch).unwrap();
    assert!(Command::new("bash")
        .arg("-n")
        .arg(&sbatch)
        .status()
        .unwrap()
        .success());
    assert!(script.contains("#SBATCH --gres=gpu:1"), "{script}");
    let out = work.join("slurm");
    for task in ["0", "1"] {
        let o = demo(Command::new("bash"), &ws, &demo_dir)
            .arg(&sbatch)
            .env("PATH", std::env::var("PATH").unwrap())
            .env("SLURM_ARRAY_TASK_ID", task)
            .env("SLURM_ARRAY_TASK_MAX", "1")
            .env("SUBMISSIONS", &subs)
            .env("LABELS", work.join("labels.csv"))
            .env("DATA", &data)
            .env("OUT", &out)
            .env("LLM_MERGING", exe)
            .output()
            .unwrap();
        ok(&o);
    }
    // Each task scored its own shard: alice in 0, zed in 1.
    assert!(out.join("shard-0/results/alice.json").is_file());
    assert!(out.join("shard-1/results/zed.json").is_file());
    assert!(!out.join("shard-0/results/zed.json").exists());
    let collected = ok(&bin(&ws, &demo_dir)
        .arg("score")
        .arg("--collect")
        .arg(out.join("shard-0"))
        .arg(out.join("shard-1"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap());
    assert!(collected.contains("2 submissions"), "{collected}");
    let board = std::fs::read_to_string(out.join("leaderboard.csv")).unwrap();
    assert!(
        board.lines().nth(1).unwrap().starts_with("1,alice,"),
        "{board}"
    );

    // Kubernetes: an Indexed Job, one GPU per pod, as many shards as completions.
    let yaml: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("scripts/cluster/score-job.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(yaml["apiVersion"], "batch/v1");
    assert_eq!(yaml["kind"], "Job");
    let spec = &yaml["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    let completions = spec["completions"].as_u64().unwrap();
    assert_eq!(spec["parallelism"].as_u64(), Some(completions));
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let container = &pod["containers"][0];
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], 1);
    let env = |name: &str| -> String {
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("no env {name}"))
            .to_string()
    };
    assert_eq!(env("SHARDS"), completions.to_string());
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    // The pod's command, run here with the volume at `work` and the index Kubernetes sets.
    let cmd = container["args"][0]
        .as_str()
        .unwrap()
        .replace(&format!("{mount}/"), &format!("{}/", work.display()));
    assert_eq!(container["command"][0], "/bin/sh");
    let path = format!(
        "{}:{}",
        exe.parent().unwrap().display(),
        std::env::var("PATH").unwrap()
    );
    let o = demo(Command::new("/bin/sh"), &ws, &demo_dir)
        .arg("-c")
        .arg(&cmd)
        .env("PATH", path)
        .env("JOB_COMPLETION_INDEX", "1")
        .env("SHARDS", env("SHARDS"))
        .env("BUDGET", env("BUDGET"))
        .output()
        .unwrap();
    ok(&o);
    // Index 1 of 4 over [alice, zed]: zed only.
    assert!(work.join("out/shard-1/results/zed.json").is_file());
    assert!(!work.join("out/shard-1/results/alice.json").exists());
}
