//! Every committed fuzz input through its parser, in `cargo test`: the seed corpora
//! (`fuzz/corpus/<target>/`, made from the tests' fixtures by `fuzz/make_seeds.py`) and the
//! inputs the fuzzer found that once crashed, hung or over-allocated (`fuzz/regressions/
//! <target>/`, each fixed). A panic fails the test and names the file.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

fn feed(target: &str, f: fuzz_harness::Target, dir: &Path) -> usize {
    let inputs = files(dir);
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        let outcome = std::panic::catch_unwind(|| f(&data));
        assert!(outcome.is_ok(), "{target}: {} panics", path.display());
    }
    inputs.len()
}

#[test]
fn every_seed_of_every_target_reads_without_panicking() {
    for (target, f) in fuzz_harness::TARGETS {
        let n = feed(target, *f, &fuzz_dir().join("corpus").join(target));
        assert!(n > 0, "no seed corpus for {target} in fuzz/corpus/{target}");
    }
}

#[test]
fn every_regression_input_reads_without_panicking() {
    let mut total = 0;
    for (target, f) in fuzz_harness::TARGETS {
        total += feed(target, *f, &fuzz_dir().join("regressions").join(target));
    }
    // Each finding of the fuzzer is committed (see fuzz/README.md for the list).
    assert!(total > 0, "no regression inputs in fuzz/regressions/");
}

#[test]
fn every_fuzz_target_has_a_harness_and_a_corpus() {
    let mut targets: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    targets.sort();
    let mut harnesses: Vec<String> = fuzz_harness::TARGETS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    harnesses.sort();
    assert_eq!(targets, harnesses);
}
