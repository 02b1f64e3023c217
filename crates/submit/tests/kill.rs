//! SIGKILL at seeded moments of `merge`, `run` and `package` on a tiny entry whose models come
//! from a local hub server (so kills also land mid-download). Each kill time is drawn from a
//! fixed seed over the measured length of an uninterrupted run. After every kill: the output
//! is complete and valid or absent, no stage state claims a stage whose outputs are not
//! there and valid, and the next run completes with results byte-identical to the
//! uninterrupted run's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::cli::{entry, ok, text, workspace};
use testkit::faults::{kill_times, run_killed_at, timed};
use testkit::hub::{HubServer, Repo};
use testkit::synthetic::tiny_llama_config;

const KILLS: usize = 20;
const SHA_A: &str = "1111111111111111111111111111111111111111";
const SHA_B: &str = "2222222222222222222222222222222222222222";

/// A tiny model directory; `scale` makes the second expert differ from the first.
fn write_model(dir: &Path, scale: f64) {
    let tokenizer = testkit::tokenizers::dir("llama2");
    testkit::synthetic::write_scaled_decoder_dir(dir, &tiny_llama_config(), &tokenizer, scale);
}

const VALIDATION: &str = "id,input,target,answer_choices,eval_type
v1,\"Question: Which is larger, 3 or 9?\nAnswer:\",1,\"['3', '9']\",multiple_choice
g1,Summarize: the cat sat on the mat all day long.,a cat sat on a mat,,generation
";
const TEST: &str = "id,input,answer_choices,eval_type
t1,\"Question: Which is smaller, 2 or 8?\nAnswer:\",\"['2', '8']\",multiple_choice
t2,Summarize: it rained in the city.,,generation
";

fn entry_toml() -> String {
    format!(
        r#"[merge]
method = "linear"
dtype = "float32"
[[merge.models]]
model = "org/expert-a"
revision = "{SHA_A}"
parameters = {{ weight = 0.7 }}
[[merge.models]]
model = "org/expert-b"
revision = "{SHA_B}"
parameters = {{ weight = 0.3 }}

[eval]
datasets = ["${{DATA_DIR}}/validation/mixed.csv"]
max_gen_len = 6
batch_size = 2
device = "cpu"

[predict]
test_file = "${{DATA_DIR}}/test.csv"
"#
    )
}

/// The hub serving both experts, and the directory the workspaces live in.
struct Fixture {
    root: tempfile::TempDir,
    hub: HubServer,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let models = root.path().join("models");
    write_model(&models.join("a"), 1.0);
    write_model(&models.join("b"), 0.5);
    let hub = HubServer::start(BTreeMap::from([
        (
            "org/expert-a".to_string(),
            Repo::single(SHA_A, Repo::files_from_dir(&models.join("a"))),
        ),
        (
            "org/expert-b".to_string(),
            Repo::single(SHA_B, Repo::files_from_dir(&models.join("b"))),
        ),
    ]));
    Fixture { root, hub }
}

impl Fixture {
    /// A fresh workspace `name` with the entry and data, and its own hub cache.
    fn workspace(&self, name: &str) -> PathBuf {
        let ws = self.root.path().join(name);
        workspace(&ws);
        std::fs::create_dir_all(ws.join("data/validation")).unwrap();
        std::fs::write(ws.join("data/validation/mixed.csv"), VALIDATION).unwrap();
        std::fs::write(ws.join("data/test.csv"), TEST).unwrap();
        std::fs::write(
            ws.join("merge.toml"),
            entry_toml().split("\n[eval]").next().unwrap(),
        )
        .unwrap();
        entry(&ws, "tiny", &entry_toml());
        ws
    }

    fn bin(&self, ws: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-merging"));
        cmd.current_dir(ws)
            .env("HF_ENDPOINT", &self.hub.endpoint)
            .env("HF_HOME", ws.join("hf"))
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("LLM_MERGING_DATA")
            .args(args);
        cmd
    }
}

/// Every regular file under `dir` (relative path → bytes), hidden ones included.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The results a run must reproduce byte for byte: the package (manifest without its
/// timings and command line), the merged weights and the predictions.
fn results(ws: &Path) -> BTreeMap<String, Vec<u8>> {
    let dist = ws.join("dist/tiny");
    let mut out = BTreeMap::new();
    for f in ["submission.csv", "scores.json", "tiny.tar"] {
        out.insert(f.to_string(), std::fs::read(dist.join(f)).unwrap());
    }
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dist.join("manifest.json")).unwrap()).unwrap();
    let m = manifest.as_object_mut().unwrap();
    m.remove("stages");
    m.remove("command_line");
    out.insert("manifest.json".into(), manifest.to_string().into_bytes());
    for (f, bytes) in files(&dist.join("work/merged")) {
        out.insert(format!("merged/{f}"), bytes);
    }
    for (f, bytes) in files(&dist.join("work/eval/predictions")) {
        out.insert(format!("eval/{f}"), bytes);
    }
    out
}

/// A merged model directory is complete and valid: every weight file its state (or the
/// reference) lists, loadable.
fn assert_merged_valid(dir: &Path, reference: &BTreeMap<String, Vec<u8>>, what: &str) {
    let got = files(dir);
    for (f, bytes) in reference
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("merged/")?, v)))
    {
        assert_eq!(
            got.get(f),
            Some(bytes),
            "{what}: merged/{f} differs or is missing"
        );
    }
    merge_core::checkpoint::Checkpoint::open_dir(dir)
        .unwrap_or_else(|e| panic!("{what}: merged output does not open: {e}"));
}

/// After a kill: no stage state claims outputs that are missing or invalid, and the package
/// in dist/ is either complete (its manifest present and naming the files beside it) or
/// has no manifest; every file present is whole.
fn assert_consistent(ws: &Path, reference: &BTreeMap<String, Vec<u8>>, what: &str) {
    let dist = ws.join("dist/tiny");
    let work = dist.join("work");
    let state = |s: &str| work.join(format!("{s}.json")).is_file();
    if state("merge") {
        assert_merged_valid(&work.join("merged"), reference, what);
    }
    if state("eval") {
        let scores = std::fs::read(work.join("eval/scores.json"));
        assert_eq!(
            scores.ok().as_ref(),
            reference.get("scores.json"),
            "{what}: eval state without its scores"
        );
    }
    if state("predict") {
        let csv = std::fs::read(work.join("predict/submission.csv"));
        assert_eq!(
            csv.ok().as_ref(),
            reference.get("submission.csv"),
            "{what}: predict state without its predictions"
        );
    }
    if dist.join("manifest.json").is_file() {
        let got = results(ws);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "{what}"
        );
        for (k, v) in reference {
            assert_eq!(
                &got[k], v,
                "{what}: {k} differs from the uninterrupted run's"
            );
        }
    }
    for f in ["submission.csv", "scores.json"] {
        if let Ok(bytes) = std::fs::read(dist.join(f)) {
            assert_eq!(Some(&bytes), reference.get(f), "{what}: a partial {f}");
        }
    }
    if let Ok(bytes) = std::fs::read(dist.join("tiny.tar")) {
        assert_eq!(
            Some(&bytes),
            reference.get("tiny.tar"),
            "{what}: a partial tiny.tar"
        );
    }
}

/// No temporary file or directory is left anywhere in the package or the work directory.
fn assert_no_leftovers(ws: &Path, what: &str) {
    let left: Vec<String> = files(&ws.join("dist"))
        .into_keys()
        .filter(|f| f.split('/').any(|c| c.starts_with('.') && c != ".run.lock"))
        .collect();
    assert!(left.is_empty(), "{what}: left behind {left:?}");
}

/// `args` killed at KILLS seeded moments of its measured length, each in a workspace
/// prepared by `prepare`; after each kill the state is checked, then the command is rerun
/// (and `run` after it) and must reproduce the uninterrupted results.
fn kill_loop(f: &Fixture, seed: u64, args: &[&str], prepare: impl Fn(&Path)) {
    let reference_ws = f.workspace(&format!("reference-{seed}"));
    prepare(&reference_ws);
    let (duration, _) = timed(&mut f.bin(&reference_ws, args));
    if args[0] == "merge" {
        // The merge alone: its output is the reference.
        ok(&f
            .bin(&reference_ws, &["run", "--entry", "submissions/tiny"])
            .output()
            .unwrap());
    }
    let reference = results(&reference_ws);
    let mut interrupted = 0;
    for (i, at) in kill_times(seed, KILLS, duration).into_iter().enumerate() {
        let what = format!(
            "`{}` killed at {at:?} of {duration:?} (#{i})",
            args.join(" ")
        );
        let ws = f.workspace(&format!("ws-{seed}-{i}"));
        prepare(&ws);
        let killed = run_killed_at(&mut f.bin(&ws, args), at);
        interrupted += usize::from(killed.interrupted);
        if !killed.interrupted {
            assert!(
                killed.output.status.success(),
                "{what}: {}",
                text(&killed.output)
            );
        }
        if args[0] == "merge" {
            let out = ws.join("merged");
            if out.exists() {
                assert_merged_valid(&out, &reference_rebased(&reference_ws), &what);
            }
            ok(&f.bin(&ws, args).arg("--force").output().unwrap());
            assert_merged_valid(&out, &reference_rebased(&reference_ws), &what);
            let hidden: Vec<_> = std::fs::read_dir(&ws)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".merged"))
                .collect();
            assert!(hidden.is_empty(), "{what}: {hidden:?} left");
        } else {
            assert_consistent(&ws, &reference, &what);
        }
        let log = ok(&f
            .bin(&ws, &["run", "--entry", "submissions/tiny"])
            .output()
            .unwrap());
        assert_eq!(
            results(&ws),
            reference,
            "{what}: the next run differs\n{log}"
        );
        assert_no_leftovers(&ws, &what);
        std::fs::remove_dir_all(&ws).unwrap();
    }
    eprintln!(
        "`{}`: {interrupted} of {KILLS} kills interrupted a run of {duration:?}",
        args.join(" ")
    );
    // Every check above holds wherever a kill lands; this one only makes sure the loop tested
    // something. Runs vary in length (a loaded machine, the other tests beside this one), so
    // the bar is low: most kills land mid-run (11 to 16 of 20 measured).
    assert!(
        interrupted * 4 >= KILLS,
        "only {interrupted} of {KILLS} kills landed before the end"
    );
}

/// The merged weights of the reference workspace's `merge` output as `merged/...` entries.
fn reference_rebased(ws: &Path) -> BTreeMap<String, Vec<u8>> {
    files(&ws.join("merged"))
        .into_iter()
        .filter(|(f, _)| f.ends_with(".safetensors") || f.ends_with(".json"))
        .map(|(f, b)| (format!("merged/{f}"), b))
        .collect()
}

#[test]
fn sigkill_during_merge_leaves_a_whole_output_or_none() {
    let f = fixture();
    kill_loop(&f, 1, &["merge", "merge.toml", "--out", "merged"], |_| {});
}

#[test]
fn sigkill_during_run_never_leaves_a_stage_claiming_what_is_not_there() {
    let f = fixture();
    kill_loop(&f, 2, &["run", "--entry", "submissions/tiny"], |_| {});
}

#[test]
fn sigkill_during_package_leaves_a_whole_package_or_none() {
    let f = fixture();
    // Every stage done once: `package` reuses them and packages again.
    kill_loop(&f, 3, &["package", "--entry", "submissions/tiny"], |ws| {
        ok(&f
            .bin(ws, &["run", "--entry", "submissions/tiny"])
            .output()
            .unwrap());
    });
}

#[test]
fn a_run_is_refused_while_another_holds_the_entry_and_sweeps_after_it_dies() {
    let f = fixture();
    let ws = f.workspace("locked");
    let dist = ws.join("dist/tiny");
    std::fs::create_dir_all(dist.join("work")).unwrap();
    // What a killed run leaves: a temporary beside a package file, and in work/.
    std::fs::write(dist.join(".tmpXyZ"), b"half a submission").unwrap();
    std::fs::create_dir_all(dist.join("work/.tmp-merged")).unwrap();
    // A live run holds the lock (this process stands in for it).
    let lock = std::fs::File::create(dist.join(".run.lock")).unwrap();
    lock.try_lock().unwrap();
    let o = f
        .bin(&ws, &["run", "--entry", "submissions/tiny"])
        .output()
        .unwrap();
    let line = testkit::cli::one_error_line(&o, &["another run of this entry is in progress"]);
    assert!(
        dist.join(".tmpXyZ").exists(),
        "swept under a live run: {line}"
    );
    // The holder dies (the kernel releases its lock): the next run sweeps and completes.
    drop(lock);
    ok(&f
        .bin(&ws, &["run", "--entry", "submissions/tiny"])
        .output()
        .unwrap());
    assert!(!dist.join(".tmpXyZ").exists() && !dist.join("work/.tmp-merged").exists());
    assert_no_leftovers(&ws, "after the sweep");
}
