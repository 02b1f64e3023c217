//! `llm-merging stats` → `merge` with `regmean`, end to end. Our statistics of the tiny
//! fixture experts equal the ones transformers' forward hooks computed
//! (`scripts/goldens/regmean_goldens.py`), and the merge over them the reference RegMean; on a
//! testkit model the Gram matrices do not depend on the batch size (padding is not counted);
//! bad input gives one error line and no output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use merge_core::checkpoint::Checkpoint;
use merge_core::input_stats::{StatsMeta, GRAMS_FILE, META_FILE};
use testkit::cli::{offline, ok, one_error_line};
use testkit::compare;
use testkit::synthetic::tiny_llama_config;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../merge-core/tests/fixtures")
}

fn bin(home: &Path) -> Command {
    offline(Command::new(env!("CARGO_BIN_EXE_llm-merging")), home)
}

fn stats(home: &Path, model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    bin(home)
        .arg("stats")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--device", "cpu"])
        .args(extra)
        .output()
        .unwrap()
}

/// A regmean config over `(model dir, stats dir)` pairs, written to `dir/merge.toml`.
fn regmean_config(dir: &Path, models: &[(&Path, &Path)]) -> PathBuf {
    let mut text = String::from("[merge]\nmethod = \"regmean\"\ndtype = \"float32\"\n");
    for (m, s) in models {
        text.push_str(&format!(
            "[[merge.models]]\nmodel = \"{}\"\nstats = \"{}\"\n",
            m.display(),
            s.display()
        ));
    }
    let p = dir.join("merge.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn merge(home: &Path, config: &Path, out: &Path) -> Output {
    bin(home)
        .arg("merge")
        .arg(config)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn meta(dir: &Path) -> StatsMeta {
    serde_json::from_str(&std::fs::read_to_string(dir.join(META_FILE)).unwrap()).unwrap()
}

fn grams(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(GRAMS_FILE), &Device::Cpu).unwrap()
}

/// Largest |a − b| over every matrix, relative to the largest |b|.
fn relative_diff(ours: &Path, theirs: &Path) -> f32 {
    let (a, b) = (grams(ours), grams(theirs));
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect()
    );
    a.iter()
        .map(|(k, t)| compare::max_abs_diff(t, &b[k]) / compare::max_abs(&b[k]).max(1e-12))
        .fold(0.0, f32::max)
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

#[test]
fn stats_equal_transformers_hooks_and_regmean_equals_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let calib = fixtures().join("regmean/calib.csv");
    let mut pairs = Vec::new();
    for expert in ["expert_a", "expert_b"] {
        let model = fixture_model(home, expert);
        let out = home.join(format!("stats-{expert}"));
        // Batches of 4 right-padded rows: padding must not count.
        ok(&stats(home, &model, &calib, &out, &["--batch-size", "4"]));
        let reference = fixtures().join("regmean/stats").join(expert);
        let (ours, theirs) = (meta(&out), meta(&reference));
        assert_eq!(ours.tokens, theirs.tokens, "{expert}: token count");
        assert_eq!(ours.rows, theirs.rows);
        assert_eq!(
            ours.grams, theirs.grams,
            "{expert}: which weight reads which matrix"
        );
        assert_eq!(ours.fingerprint, theirs.fingerprint);
        assert!(ours.skipped.contains_key("lm_head.weight"));
        let d = relative_diff(&out, &reference);
        println!("{expert}: max relative |diff| against transformers' hooks = {d:e}");
        assert!(d < 1e-5, "{expert}: {d:e}");
        pairs.push((model, out));
    }
    let refs: Vec<(&Path, &Path)> = pairs.iter().map(|(m, s)| (&**m, &**s)).collect();
    let config = regmean_config(home, &refs);
    let out = home.join("merged");
    ok(&merge(home, &config, &out));
    let ours = Checkpoint::open_dir(&out).unwrap();
    let golden = Checkpoint::open_dir(fixtures().join("regmean/goldens/regmean_two")).unwrap();
    let d = compare::checkpoints(&ours, &golden);
    println!("stats → merge against the reference RegMean: max |diff| = {d:e}");
    assert!(d <= 1e-4, "{d:e}");
}

const CALIB: &str = "id,input,target,answer_choices,eval_type
c1,\"Question: Which is larger, 3 or 9?\nAnswer:\",1,\"['3', '9']\",multiple_choice
c2,Summarize: the cat sat on the mat all day long.,a cat sat on a mat,,generation
c3,The weather today,sunny,,generation
";

#[test]
fn stats_then_regmean_on_a_testkit_model_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let tokenizer = testkit::tokenizers::dir("llama2");
    let (a, b) = (home.join("a"), home.join("b"));
    testkit::synthetic::write_scaled_decoder_dir(&a, &tiny_llama_config(), &tokenizer, 1.0);
    testkit::synthetic::write_scaled_decoder_dir(&b, &tiny_llama_config(), &tokenizer, 1.5);
    let calib = home.join("calib.csv");
    std::fs::write(&calib, CALIB).unwrap();

    // One row per pass and three per pass (rows of different lengths, right-padded) agree.
    let (one, three) = (home.join("stats-a1"), home.join("stats-a3"));
    ok(&stats(home, &a, &calib, &one, &["--batch-size", "1"]));
    ok(&stats(home, &a, &calib, &three, &["--batch-size", "3"]));
    assert_eq!(meta(&one).tokens, meta(&three).tokens);
    let d = relative_diff(&three, &one);
    assert!(d < 1e-5, "batch size changed the statistics: {d:e}");
    // q/k/v and gate/up share a matrix: 4 per layer, 7 weights per layer.
    assert_eq!(grams(&one).len(), 2 * 4);
    assert_eq!(meta(&one).grams.len(), 2 * 7);
    // --rows takes the first rows.
    let two = home.join("stats-a-two");
    ok(&stats(home, &a, &calib, &two, &["--rows", "2"]));
    assert_eq!(meta(&two).rows, ["c1", "c2"]);

    let sb = home.join("stats-b");
    ok(&stats(home, &b, &calib, &sb, &[]));
    let config = regmean_config(home, &[(&a, &one), (&b, &sb)]);
    let out = home.join("merged");
    ok(&merge(home, &config, &out));
    let merged = Checkpoint::open_dir(&out).unwrap();
    assert_eq!(merged.len(), Checkpoint::open_dir(&a).unwrap().len());

    // An existing output is not replaced without --overwrite.
    let o = stats(home, &a, &calib, &one, &[]);
    one_error_line(&o, &["stats-a1", "exists", "--overwrite"]);
    // Statistics of another architecture: the fixture expert's (64-token vocabulary, 3 layers).
    let fixture_stats = fixtures().join("regmean/stats/expert_a");
    let config = regmean_config(home, &[(&a, &one), (&b, &fixture_stats)]);
    let out = home.join("bad");
    let o = merge(home, &config, &out);
    let line = one_error_line(&o, &["another architecture", "expert_a"]);
    assert!(line.contains(&b.display().to_string()), "{line}");
    assert!(!out.exists());
}
