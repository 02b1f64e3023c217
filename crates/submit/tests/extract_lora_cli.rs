//! `llm-merging extract-lora`: the adapter it writes loads through our adapter reader and in
//! `eval --adapter`, reproduces the fine-tune at full rank; bad input gives one error line and
//! writes nothing.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::Device;
use merge_core::adapter::Adapter;
use testkit::cli::{offline, ok, one_error_line};
use testkit::compare::max_abs_diff;
use testkit::family;

fn bin(home: &Path) -> Command {
    offline(Command::new(env!("CARGO_BIN_EXE_llm-merging")), home)
}

fn extract(home: &Path, dir: &Path, model: &str, out: &Path, extra: &[&str]) -> Output {
    bin(home)
        .arg("extract-lora")
        .arg("--base")
        .arg(dir.join("base"))
        .arg("--model")
        .arg(dir.join(model))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn extracted_adapters_load_and_evaluate() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let f = family::write(tmp.path(), false);
    let base = family::read(&f.dir.join("base"));
    let expert = family::read(&f.dir.join("expert1"));

    // Full rank: B·A is the fine-tune's difference (up to f32 rounding).
    let full = tmp.path().join("full");
    let text = ok(&extract(
        home,
        &f.dir,
        "expert1",
        &full,
        &["--rank", "100000"],
    ));
    assert!(text.contains("extracted"), "{text}");
    let adapter = Adapter::open_dir(&full).unwrap();
    assert!(!adapter.modules().is_empty());
    for name in adapter.modules().keys() {
        let delta = adapter.delta(name, &Device::Cpu).unwrap().unwrap();
        let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let want = (f32(&expert[name]) - f32(&base[name])).unwrap();
        let d = max_abs_diff(&delta, &want);
        assert!(d < 1e-4, "{name}: max |diff| {d}");
        assert!(!name.contains("embed") && !name.contains("lm_head") && !name.contains("norm"));
    }

    // Rank 2 with an energy share: scale 1, ranks at most 2, and `eval --adapter` runs on it.
    let low = tmp.path().join("low");
    ok(&extract(
        home,
        &f.dir,
        "expert1",
        &low,
        &["--rank", "2", "--energy", "0.5"],
    ));
    let adapter = Adapter::open_dir(&low).unwrap();
    assert!(adapter
        .modules()
        .values()
        .all(|m| m.rank <= 2 && m.rank >= 1));
    assert!(adapter.modules().values().all(|m| adapter.scale(m) == 1.0));
    let scores = tmp.path().join("eval");
    ok(&bin(home)
        .arg("eval")
        .arg("--model")
        .arg(f.dir.join("base"))
        .arg("--adapter")
        .arg(&low)
        .arg("--data")
        .arg(testkit::goldens::rows_csv())
        .arg("--out")
        .arg(&scores)
        .args(["--scoring", "full", "--max-gen-len", "4"])
        .output()
        .unwrap());
    assert!(scores.join("scores.json").is_file());

    // Bad input: one error line, nothing written.
    let never = tmp.path().join("never");
    let broken = f.broken_copy("expert1", "model.layers.0.self_attn.q_proj.weight");
    let broken = broken.file_name().unwrap().to_str().unwrap().to_string();
    for (model, extra, needles) in [
        ("expert1", vec!["--rank", "0"], vec!["--rank"]),
        (
            "expert1",
            vec!["--rank", "4", "--energy", "1.5"],
            vec!["--energy", "1.5"],
        ),
        ("base", vec!["--rank", "4"], vec!["nothing to extract"]),
        (
            broken.as_str(),
            vec!["--rank", "4"],
            vec!["model.layers.0.self_attn.q_proj.weight", "missing"],
        ),
    ] {
        let line = one_error_line(&extract(home, &f.dir, model, &never, &extra), &needles);
        eprintln!("{line}");
        assert!(!never.exists(), "{line}: output written");
    }
    // An existing output is kept unless --force.
    let before = std::fs::read(low.join("adapter_model.safetensors")).unwrap();
    one_error_line(
        &extract(home, &f.dir, "expert2", &low, &["--rank", "4"]),
        &["exists"],
    );
    assert_eq!(
        std::fs::read(low.join("adapter_model.safetensors")).unwrap(),
        before
    );
    ok(&extract(
        home,
        &f.dir,
        "expert2",
        &low,
        &["--rank", "4", "--force"],
    ));
}
