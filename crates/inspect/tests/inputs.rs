//! Bad input and the outputs: experts that do not share the base's architecture fail on the
//! first mismatched tensor, a config without a base says what to set, and the outputs are
//! written whole (JSON that reads back, well-formed heatmaps) without replacing other files.

use std::path::Path;

use inspect::Error;
use merge_core::MergeConfig;
use testkit::models::{write_lora, TinyLlama};

fn config(dir: &Path, method: &str, base: Option<&str>, models: &[&str]) -> MergeConfig {
    let mut s = format!("[merge]\nmethod = \"{method}\"\n");
    if let Some(b) = base {
        s.push_str(&format!("base_model = \"{b}\"\n"));
    }
    s.push_str("[merge.parameters]\nweight = 1.0\n");
    if method == "ties" {
        s.push_str("density = 0.5\n");
    }
    for m in models {
        s.push_str(&format!("[[merge.models]]\nmodel = \"{m}\"\n"));
    }
    let _ = dir;
    MergeConfig::from_toml_str(&s, "test").unwrap()
}

fn run(dir: &Path, cfg: &MergeConfig) -> inspect::Result<inspect::Inspection> {
    inspect::inspect(cfg, &testkit::resolver::offline(dir), false)
}

#[test]
fn a_different_shape_names_the_first_mismatched_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    TinyLlama::default().write(&d.join("base"), 1, 1);
    TinyLlama::default().write(&d.join("good"), 2, 1);
    let wider = TinyLlama {
        intermediate: 24,
        ..TinyLlama::default()
    };
    wider.write(&d.join("wider"), 3, 1);
    let err = run(d, &config(d, "ties", Some("base"), &["good", "wider"])).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Mismatch { expert: 2, .. }), "{msg}");
    // Layers sort numerically and `down_proj` is the first MLP tensor of layer 0.
    assert!(
        msg.contains("tensor `model.layers.0.mlp.down_proj.weight` has shape [8, 24] in the expert and [8, 16] in the base"),
        "{msg}"
    );
}

#[test]
fn another_architecture_names_the_first_tensor_the_base_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    TinyLlama::default().write(&d.join("base"), 1, 1);
    let deeper = TinyLlama {
        layers: 3,
        ..TinyLlama::default()
    };
    deeper.write(&d.join("deeper"), 2, 1);
    let msg = run(d, &config(d, "task_arithmetic", Some("base"), &["deeper"]))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(
            "tensor `model.layers.2.input_layernorm.weight` is in the expert but not in the base"
        ),
        "{msg}"
    );
    assert!(msg.contains("expert 1"), "{msg}");
}

#[test]
fn full_experts_without_a_base_have_no_task_vector() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    TinyLlama::default().write(&d.join("a"), 1, 1);
    TinyLlama::default().write(&d.join("b"), 2, 1);
    let err = run(d, &config(d, "linear", None, &["a", "b"])).unwrap_err();
    assert!(matches!(err, Error::NoBase(_)), "{err}");
    assert!(err.to_string().contains("set `base_model`"), "{err}");
}

#[test]
fn adapters_over_one_base_need_no_base_model_and_entries_naming_the_base_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let shape = TinyLlama::default();
    shape.write(&d.join("base"), 1, 1);
    for (name, seed) in [("lora_a", 5), ("lora_b", 6)] {
        write_lora(&d.join(name), &shape, &["q_proj", "v_proj"], 2, 4.0, seed);
        // The adapters name their base, as PEFT writes it.
        let p = d.join(name).join("adapter_config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        c["base_model_name_or_path"] = "../base".into();
        std::fs::write(&p, c.to_string()).unwrap();
    }
    let x = run(d, &config(d, "lora_avg", None, &["lora_a", "lora_b"])).unwrap();
    assert_eq!(x.experts.len(), 2);
    assert!(x.experts.iter().all(|e| e.lora));
    // Only q_proj and v_proj change: every other tensor has a zero task vector.
    let changed: Vec<&str> = x
        .tensors
        .iter()
        .filter(|t| t.metrics.norm[0] > 0.0)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(changed.len(), 4, "{changed:?}");
    assert!(changed
        .iter()
        .all(|n| n.ends_with("q_proj.weight") || n.ends_with("v_proj.weight")));
    // linear with the base also listed as a model: the base entry is not an expert.
    TinyLlama::default().write(&d.join("full"), 2, 1);
    let x = run(d, &config(d, "linear", Some("base"), &["base", "full"])).unwrap();
    assert_eq!(x.experts.len(), 1);
    assert_eq!(x.experts[0].name, "full");
}

#[test]
fn outputs_are_written_whole_and_only_replace_an_earlier_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let shape = TinyLlama {
        layers: 4,
        ..TinyLlama::default()
    };
    shape.write(&d.join("base"), 1, 1);
    shape.write(&d.join("a"), 2, 1);
    shape.write(&d.join("b"), 3, 1);
    let x = run(d, &config(d, "ties", Some("base"), &["a", "b"])).unwrap();
    let out = d.join("out");
    let files = x.write(&out).unwrap();
    assert_eq!(
        files,
        [
            "inspect.json",
            "cosine.svg",
            "sign_conflict.svg",
            "relative_norm.svg",
            "kept_fraction.svg"
        ]
    );
    let back = inspect::Inspection::read(&out.join("inspect.json")).unwrap();
    assert_eq!(back.tensors.len(), x.tensors.len());
    // (serde_json reads floats back to within an ulp.)
    for (a, b) in back.model.metrics.norm.iter().zip(&x.model.metrics.norm) {
        assert!((a - b).abs() <= 1e-12 * b, "{a} vs {b}");
    }
    assert_eq!(back.model.sums.kept, x.model.sums.kept);
    assert_eq!(back.findings, x.findings);
    assert_eq!(back.layer_groups("all").len(), 4);
    // A heatmap: one cell per layer and pair, and valid SVG text.
    let svg = std::fs::read_to_string(out.join("cosine.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("layer 3") && svg.contains("1-2"), "{svg}");
    // Rerunning replaces the earlier output; a directory of other files is refused.
    x.write(&out).unwrap();
    let other = d.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let err = x.write(&other).unwrap_err();
    assert!(matches!(err, Error::OutExists(_)), "{err}");
    assert!(other.join("notes.txt").is_file());
    assert!(!d.read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp-")));
}

#[test]
fn identical_experts_point_the_same_way_and_never_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    TinyLlama::default().write(&d.join("base"), 1, 1);
    TinyLlama::default().write(&d.join("a"), 2, 1);
    TinyLlama::default().write(&d.join("a_again"), 2, 1);
    let x = run(d, &config(d, "ties", Some("base"), &["a", "a_again"])).unwrap();
    let m = &x.model.metrics;
    assert!((m.cosine[0][1].unwrap() - 1.0).abs() < 1e-12);
    assert_eq!(m.sign_conflict[0][1], Some(0.0));
    assert_eq!(m.overlap[0][1], Some(1.0));
    assert!(
        x.findings.iter().any(|f| f.contains("point the same way")),
        "{:?}",
        x.findings
    );
    let summary = x.summary();
    assert!(
        summary.contains("1-2") && summary.contains("findings:"),
        "{summary}"
    );
}
