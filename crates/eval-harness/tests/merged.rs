//! Merges evaluated in memory equal merge-then-evaluate bit for bit: scores, predictions and
//! choice scores, for a decoder and T5, full-model methods (streamed and whole-tensor, f32 and
//! half-precision outputs) and an adapter-level method, and over one session re-merged with
//! other parameters and methods.

use std::path::Path;

use candle_core::{DType, Device};
use eval_harness::merged::MergedModel;
use eval_harness::report::DatasetOutcome;
use eval_harness::{EvalOptions, LanguageModel, Scoring};
use merge_core::engine::{self, MergeOptions};
use merge_core::MergeConfig;
use testkit::family::{self, Family};
use testkit::resolver;

fn config(f: &Family, toml: &str) -> MergeConfig {
    MergeConfig::from_toml_str(&f.config_text(toml), "test").unwrap()
}

fn options() -> EvalOptions {
    EvalOptions {
        scoring: Scoring::Full,
        ..testkit::goldens::options(4, Some(6))
    }
}

fn evaluate(m: &dyn LanguageModel) -> DatasetOutcome {
    eval_harness::evaluate(m, &testkit::goldens::rows(), &options()).unwrap()
}

/// Merges `cfg` to disk and evaluates the written model (or base + written adapter).
fn from_disk(f: &Family, cfg: &MergeConfig, out: &Path) -> DatasetOutcome {
    let report = engine::run(cfg, &resolver::offline(&f.dir), &MergeOptions::new(out)).unwrap();
    let m = if report.adapter {
        eval_harness::load(&f.dir.join("base"), Some(out), DType::F32, &Device::Cpu)
    } else {
        eval_harness::load(out, None, DType::F32, &Device::Cpu)
    }
    .unwrap();
    evaluate(&*m)
}

/// The same outcome, bit for bit (timings aside).
fn assert_same(a: &DatasetOutcome, b: &DatasetOutcome, what: &str) {
    assert_eq!(a.scores, b.scores, "{what}: scores");
    assert_eq!(a.examples.len(), b.examples.len());
    for (x, y) in a.examples.iter().zip(&b.examples) {
        assert_eq!(x.prediction, y.prediction, "{what}: row {}", x.id);
        assert_eq!(x.prediction_norm, y.prediction_norm, "{what}: row {}", x.id);
        let bits = |s: &Option<Vec<f64>>| {
            s.as_ref()
                .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        assert_eq!(
            bits(&x.choice_scores),
            bits(&y.choice_scores),
            "{what}: {}",
            x.id
        );
        assert_eq!(x.output_tokens, y.output_tokens, "{what}: row {}", x.id);
    }
}

const TIES_BF16: &str = r#"
[merge]
method = "ties"
base_model = "DIR/base"
dtype = "bfloat16"
[merge.parameters]
density = 0.5
[[merge.models]]
model = "DIR/expert1"
parameters = { weight = 0.7 }
[[merge.models]]
model = "DIR/expert2"
parameters = { weight = 0.5 }
"#;

const LORA_AVG: &str = r#"
[merge]
method = "lora_avg"
base_model = "DIR/base"
[[merge.models]]
model = "DIR/adapter1"
parameters = { weight = 0.8 }
[[merge.models]]
model = "DIR/adapter2"
parameters = { weight = 0.2 }
"#;

/// One session over a family: each config merged in memory, in order, equals its disk merge.
fn check_session(f: &Family, configs: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let first = config(f, configs[0]);
    let mut m =
        MergedModel::open(&first, &resolver::offline(&f.dir), DType::F32, &Device::Cpu).unwrap();
    for (i, toml) in configs.iter().enumerate() {
        let cfg = config(f, toml);
        if i > 0 {
            m.merge(&cfg).unwrap();
        }
        let disk = from_disk(f, &cfg, &tmp.path().join(format!("out{i}")));
        let what = format!(
            "{} config {i} ({})",
            if f.t5 { "t5" } else { "llama" },
            cfg.method
        );
        assert_same(&evaluate(m.model()), &disk, &what);
    }
}

#[test]
fn decoder_merges_in_memory_equal_merge_then_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let f = family::write(tmp.path(), false);
    let dare = r#"
[merge]
method = "dare_ties"
base_model = "DIR/base"
seed = 11
[merge.parameters]
density = 0.6
[[merge.models]]
model = "DIR/expert1"
parameters = { weight = 1.0 }
[[merge.models]]
model = "DIR/expert2"
parameters = { weight = 0.5 }
"#;
    let slerp = r#"
[merge]
method = "slerp"
base_model = "DIR/base"
dtype = "float16"
[merge.parameters]
t = [0.2, 0.8]
[[merge.models]]
model = "DIR/expert1"
"#;
    let ties_again = TIES_BF16.replace("density = 0.5", "density = 0.3");
    // Streamed (ties, dare_ties) and whole-tensor (slerp) methods, f32 and half outputs, over
    // one session. The layers' panel copies, made by the first evaluation, are bf16 (the values
    // are) and take the second bf16 merge alone; the f32 merge drops them; the f16 and last bf16
    // merges write f32 panels alone. Each time the long rows (over 32 tokens) read `Wᵀ`
    // restored from the panels.
    check_session(&f, &[TIES_BF16, &ties_again, dare, slerp, TIES_BF16]);
    // The adapter-level method folds onto the base.
    check_session(&f, &[LORA_AVG]);
}

#[test]
fn t5_merges_in_memory_equal_merge_then_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let f = family::write(tmp.path(), true);
    // The base is named so the session opens it for the TIES merge that follows.
    let linear = r#"
[merge]
method = "linear"
base_model = "DIR/base"
dtype = "float16"
[[merge.models]]
model = "DIR/expert1"
parameters = { weight = 0.6 }
[[merge.models]]
model = "DIR/expert2"
parameters = { weight = 0.4 }
"#;
    check_session(&f, &[linear, TIES_BF16]);
    check_session(&f, &[LORA_AVG]);
}

/// Over adapters, a tensor-level merge changes every tensor and an adapter-level merge only
/// the adapted ones: switching between them leaves no stale weight behind.
#[test]
fn switching_between_tensor_and_adapter_level_methods_restores_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let f = family::write(tmp.path(), false);
    // Unnormalised weights summing to 0.6: every tensor moves, adapted or not.
    let linear = r#"
[merge]
method = "linear"
base_model = "DIR/base"
[merge.parameters]
normalize = false
[[merge.models]]
model = "DIR/adapter1"
parameters = { weight = 0.3 }
[[merge.models]]
model = "DIR/adapter2"
parameters = { weight = 0.3 }
"#;
    let other_avg = LORA_AVG.replace("0.8", "0.4").replace("0.2", "0.9");
    check_session(&f, &[linear, LORA_AVG, &other_avg, linear, LORA_AVG]);
}

#[test]
fn bad_inputs_fail_before_any_weight_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let f = family::write(tmp.path(), false);
    let open = |toml: &str| {
        MergedModel::open(
            &config(&f, toml),
            &resolver::offline(&f.dir),
            DType::F32,
            &Device::Cpu,
        )
        .err()
        .expect("an error")
        .to_string()
    };
    // An adapter-level method given full fine-tunes.
    let e = open(&LORA_AVG.replace("adapter", "expert"));
    assert!(e.contains("lora_avg") && e.contains("expert1"), "{e}");
    assert!(e.contains("adapter"), "{e}");
    // A tensor missing in one model.
    f.broken_copy("expert1", "model.layers.0.mlp.up_proj.weight");
    let e = open(&TIES_BF16.replace("expert2", "broken"));
    assert!(e.contains("model.layers.0.mlp.up_proj.weight"), "{e}");
    assert!(e.contains("broken"), "{e}");

    // A session refuses a model it did not open, and the model keeps its weights.
    let mut m = MergedModel::open(
        &config(&f, TIES_BF16),
        &resolver::offline(&f.dir),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let before = evaluate(m.model());
    let e = m
        .merge(&config(&f, &TIES_BF16.replace("expert2", "adapter1")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not opened by this merge session"), "{e}");
    assert_same(&evaluate(m.model()), &before, "after a refused merge");
}
