//! `merge` with `regmean_plus` (RegMean++), end to end: the layer-wise driver's merge of the
//! tiny fixture experts equals the float64 reference that follows FusionBench's algorithm
//! (`scripts/goldens/regmean_plus_goldens.py`), differs from RegMean on the same data (so a
//! driver that forgot to propagate through the merged layers would fail), and bad input gives
//! one error line and no output. `run` over an entry whose `[merge]` is `regmean_plus` merges
//! the same model, reuses the merge stage while nothing changed, and merges again when a
//! calibration file's content changes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use merge_core::checkpoint::Checkpoint;
use testkit::cli::{entry, offline, ok, one_error_line, workspace};
use testkit::compare;
use testkit::synthetic::tiny_llama_config;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../merge-core/tests/fixtures")
}

fn bin(home: &Path) -> Command {
    offline(Command::new(env!("CARGO_BIN_EXE_llm-merging")), home)
}

fn merge(home: &Path, config: &Path, out: &Path, extra: &[&str]) -> Output {
    bin(home)
        .arg("merge")
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// A fixture expert with the fixtures' word-level tokenizer, as one model directory.
fn fixture_model(dir: &Path, expert: &str) -> PathBuf {
    let d = dir.join(expert);
    std::fs::create_dir_all(&d).unwrap();
    let src = fixtures().join("merge/models").join(expert);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let tok = fixtures().join("regmean/tokenizer");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), d.join(f)).unwrap();
    }
    d
}

/// A `regmean_plus` config over `(model, calibration)` pairs (`None`: no `calibration`) with
/// `extra` lines under `[merge]`, written to `dir/name`.
fn config(dir: &Path, name: &str, models: &[(&Path, Option<&Path>)], extra: &str) -> PathBuf {
    let mut text = format!("[merge]\nmethod = \"regmean_plus\"\ndtype = \"float32\"\n{extra}\n");
    for (m, c) in models {
        text.push_str(&format!("[[merge.models]]\nmodel = \"{}\"\n", m.display()));
        if let Some(c) = c {
            text.push_str(&format!("calibration = \"{}\"\n", c.display()));
        }
    }
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Our merge of golden case `case` (from `regmean_plus/cases.json`) and its max |diff|.
fn merged_case(home: &Path, case: &serde_json::Value) -> (PathBuf, f32) {
    let root = fixtures().join("regmean_plus");
    let name = case["case"].as_str().unwrap();
    let models: Vec<PathBuf> = case["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| fixture_model(&home.join(name), m.as_str().unwrap()))
        .collect();
    let calibs: Vec<PathBuf> = case["calibration"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| root.join(c.as_str().unwrap()))
        .collect();
    let pairs: Vec<(&Path, Option<&Path>)> = models
        .iter()
        .zip(&calibs)
        .map(|(m, c)| (&**m, Some(&**c)))
        .collect();
    let extra = match case["alpha"].as_f64() {
        Some(a) => format!("[merge.parameters]\nalpha = {a}"),
        None => String::new(),
    };
    let cfg = config(home, &format!("{name}.toml"), &pairs, &extra);
    let out = home.join(format!("merged-{name}"));
    ok(&merge(home, &cfg, &out, &[]));
    let ours = Checkpoint::open_dir(&out).unwrap();
    let golden = root.join(case["golden"].as_str().unwrap());
    let golden = Checkpoint::open_dir(golden.parent().unwrap()).unwrap();
    (out, compare::checkpoints(&ours, &golden))
}

#[test]
fn regmean_plus_equals_the_reference_and_differs_from_regmean() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("regmean_plus/cases.json")).unwrap(),
    )
    .unwrap();
    let mut two = None;
    for case in cases.as_array().unwrap() {
        let (out, d) = merged_case(home, case);
        println!("{}: max |diff| against the reference = {d:e}", case["case"]);
        assert!(d <= 1e-4, "{}: {d:e}", case["case"]);
        if case["case"] == "regmean_plus_two" {
            two = Some(out);
        }
    }
    // The same models, rows and alpha as regmean's `regmean_two` golden: RegMean++ takes every
    // layer's inputs from the merged layers below, so the merges must differ well beyond the
    // tolerance.
    let ours = Checkpoint::open_dir(two.expect("case regmean_plus_two")).unwrap();
    let regmean = Checkpoint::open_dir(fixtures().join("regmean/goldens/regmean_two")).unwrap();
    let d = compare::checkpoints(&ours, &regmean);
    println!("regmean_plus against regmean on the same data: max |diff| = {d:e}");
    assert!(d > 1e-2, "regmean_plus is regmean: {d:e}");
}

#[test]
fn bad_input_is_one_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let (a, b) = (
        fixture_model(home, "expert_a"),
        fixture_model(home, "expert_b"),
    );
    let calib = fixtures().join("regmean/calib.csv");
    let out = home.join("out");
    let fails = |cfg: &Path, needles: &[&str]| {
        let line = one_error_line(&merge(home, cfg, &out, &[]), needles);
        assert!(!out.exists(), "{line}: wrote {}", out.display());
        let leftovers: Vec<_> = std::fs::read_dir(home)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".regmean-plus"))
            .collect();
        assert!(leftovers.is_empty(), "{line}: left {leftovers:?}");
        line
    };

    // A model without calibration rows.
    let cfg = config(home, "none.toml", &[(&a, Some(&calib)), (&b, None)], "");
    let line = fails(
        &cfg,
        &["regmean_plus", "no calibration rows", "calibration = "],
    );
    assert!(line.contains(&b.display().to_string()), "{line}");
    // A calibration file that is not there, and one without rows.
    let missing = home.join("missing.csv");
    let cfg = config(
        home,
        "missing.toml",
        &[(&a, Some(&calib)), (&b, Some(&missing))],
        "",
    );
    fails(&cfg, &["missing.csv", "expert_b"]);
    let empty = home.join("empty.csv");
    std::fs::write(&empty, "id,input,answer_choices,eval_type\n").unwrap();
    let cfg = config(
        home,
        "empty.toml",
        &[(&a, Some(&empty)), (&b, Some(&calib))],
        "",
    );
    fails(&cfg, &["empty.csv", "no calibration rows", "expert_a"]);
    // alpha outside [0, 1].
    let cfg = config(
        home,
        "alpha.toml",
        &[(&a, Some(&calib)), (&b, Some(&calib))],
        "[merge.parameters]\nalpha = 1.5",
    );
    fails(&cfg, &["regmean_plus", "alpha must be in [0, 1]", "1.5"]);
    // Experts of different architectures: a testkit Llama (other sizes) and a fixture expert.
    let tokenizer = testkit::tokenizers::dir("llama2");
    let other = home.join("other");
    testkit::synthetic::write_scaled_decoder_dir(&other, &tiny_llama_config(), &tokenizer, 1.0);
    let cfg = config(
        home,
        "arch.toml",
        &[(&a, Some(&calib)), (&other, Some(&calib))],
        "",
    );
    fails(&cfg, &["another architecture", "one architecture"]);
    // An encoder-decoder.
    let (t1, t2) = (home.join("t5-a"), home.join("t5-b"));
    testkit::goldens::write_model("t5_v11", &t1);
    testkit::goldens::write_model("t5_v11", &t2);
    let cfg = config(
        home,
        "t5.toml",
        &[(&t1, Some(&calib)), (&t2, Some(&calib))],
        "",
    );
    fails(&cfg, &["encoder-decoder", "decoder models"]);
    // `stats` is regmean's: regmean_plus computes its own.
    let text = std::fs::read_to_string(config(
        home,
        "stats.toml",
        &[(&a, Some(&calib)), (&b, Some(&calib))],
        "",
    ))
    .unwrap()
    .replacen("calibration =", "stats = \"s\"\ncalibration =", 1);
    std::fs::write(home.join("stats.toml"), text).unwrap();
    fails(&home.join("stats.toml"), &["sets `stats`", "regmean_plus"]);

    // --dry-run checks the same and prints the rows per model; it writes nothing.
    let cfg = config(
        home,
        "good.toml",
        &[(&a, Some(&calib)), (&b, Some(&calib))],
        "",
    );
    let text = ok(&merge(home, &cfg, &out, &["--dry-run"]));
    assert!(text.contains("9 calibration rows"), "{text}");
    assert!(!out.exists());
}

/// The line `run` prints for `stage` (its name, seconds, then `ran` or `reused`).
fn stage_line<'a>(log: &'a str, stage: &str) -> &'a str {
    log.lines()
        .find(|l| l.starts_with(stage))
        .unwrap_or_else(|| panic!("no {stage} line in\n{log}"))
}

#[test]
fn run_merges_regmean_plus_and_keys_the_merge_on_the_calibration_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let ws = home.join("ws");
    workspace(&ws);
    for expert in ["expert_a", "expert_b"] {
        fixture_model(&ws.join("models"), expert);
    }
    // Rows in the fixture tokenizer's words (w0..w63), with targets for the validation eval.
    std::fs::create_dir_all(ws.join("data/validation")).unwrap();
    std::fs::write(
        ws.join("data/validation/mc.csv"),
        "id,input,target,answer_choices,eval_type\n\
         v1,w10 w28 w18,1,\"['w3', 'w4']\",multiple_choice\n\
         v2,w14 w21 w24 w13,0,\"['w5', 'w6', 'w7']\",multiple_choice\n",
    )
    .unwrap();
    std::fs::write(
        ws.join("data/validation/gen.csv"),
        "id,input,target,answer_choices,eval_type\ng1,w50 w32 w11 w21,w15 w55,,generation\n",
    )
    .unwrap();
    std::fs::write(
        ws.join("data/test.csv"),
        "id,input,answer_choices,eval_type\n\
         t1,w31 w46 w26,\"['w8', 'w9']\",multiple_choice\n\
         t2,w17 w20 w51,,generation\n",
    )
    .unwrap();
    // The golden case regmean_plus_two: experts a and b, regmean's calibration rows for both
    // (a copy next to the entry, named relative to it), the default alpha.
    let dir = entry(
        &ws,
        "rmp",
        r#"[merge]
method = "regmean_plus"
dtype = "float32"
[[merge.models]]
model = "../../models/expert_a"
calibration = "calib.csv"
[[merge.models]]
model = "../../models/expert_b"
calibration = "calib.csv"

[eval]
datasets = ["${DATA_DIR}/validation/mc.csv", "${DATA_DIR}/validation/gen.csv"]
max_gen_len = 4
batch_size = 2
device = "cpu"

[predict]
test_file = "${DATA_DIR}/test.csv"
"#,
    );
    let calib = dir.join("calib.csv");
    std::fs::copy(fixtures().join("regmean/calib.csv"), &calib).unwrap();
    let run = || {
        let mut c = bin(home);
        c.current_dir(&ws).env_remove("LLM_MERGING_DATA").args([
            "run",
            "--entry",
            "submissions/rmp",
        ]);
        c.output().unwrap()
    };
    let merged = ws.join("dist/rmp/work/merged");
    let golden =
        Checkpoint::open_dir(fixtures().join("regmean_plus/goldens/regmean_plus_two")).unwrap();

    // First run: merge (the layer-wise driver), eval, predict, package.
    let log = ok(&run());
    assert!(stage_line(&log, "merge").ends_with("ran"), "{log}");
    assert!(stage_line(&log, "eval").ends_with("ran"), "{log}");
    assert!(ws.join("dist/rmp/submission.csv").is_file(), "{log}");
    let scores: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.join("dist/rmp/scores.json")).unwrap())
            .unwrap();
    assert!(scores["mc"]["accuracy"].is_number(), "{scores}");
    let d = compare::checkpoints(&Checkpoint::open_dir(&merged).unwrap(), &golden);
    println!("run's regmean_plus merge against the reference: max |diff| = {d:e}");
    assert!(d <= 1e-4, "{d:e}");
    let first = std::fs::read(merged.join("model.safetensors")).unwrap();
    // The driver's statistics directory is gone once the merge is written.
    let leftovers: Vec<_> = std::fs::read_dir(ws.join("dist/rmp/work"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("regmean-plus"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Nothing changed: the merge stage (and the ones after it) are reused.
    let log = ok(&run());
    for stage in ["merge", "eval", "predict"] {
        assert!(stage_line(&log, stage).ends_with("reused"), "{log}");
    }

    // Another calibration row set in the same file (same path, size and name): the merge
    // stage runs again, and merges another model.
    let rows = std::fs::read_to_string(&calib).unwrap();
    std::fs::write(&calib, rows.replacen("w10 w28 w18", "w11 w29 w19", 1)).unwrap();
    let log = ok(&run());
    assert!(stage_line(&log, "merge").ends_with("ran"), "{log}");
    assert!(stage_line(&log, "eval").ends_with("ran"), "{log}");
    let second = std::fs::read(merged.join("model.safetensors")).unwrap();
    assert_ne!(first, second, "another calibration row, the same merge");
}

#[test]
fn a_merge_removes_the_statistics_a_killed_merge_left() {
    // The driver's statistics (every model's Grams: gigabytes for a 7B model) live in a
    // temporary directory beside the output, named with the merge's pid; a merge killed by a
    // signal cannot remove it, so the next merge there removes those of processes now gone.
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let (a, b) = (
        fixture_model(home, "expert_a"),
        fixture_model(home, "expert_b"),
    );
    let calib = fixtures().join("regmean/calib.csv");
    let cfg = config(
        home,
        "good.toml",
        &[(&a, Some(&calib)), (&b, Some(&calib))],
        "",
    );
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let abandoned = home.join(format!(".regmean-plus-{dead}-killed"));
    let live = home.join(format!(".regmean-plus-{}-running", std::process::id()));
    for d in [&abandoned, &live] {
        std::fs::create_dir_all(d.join("model-1")).unwrap();
        std::fs::write(d.join("model-1/meta.json"), "{}").unwrap();
    }
    let out = home.join("out");
    ok(&merge(home, &cfg, &out, &[]));
    assert!(out.join("model.safetensors").is_file());
    assert!(!abandoned.exists(), "a dead merge's statistics were kept");
    assert!(live.exists(), "a live merge's statistics were removed");
    let ours: Vec<_> = std::fs::read_dir(home)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".regmean-plus") && !n.ends_with("-running"))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
}
