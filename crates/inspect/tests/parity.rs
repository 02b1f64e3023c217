//! inspect's numbers against the committed goldens of scripts/goldens/inspect_goldens.py (an
//! independent numpy/torch computation on tiny fixtures): every tensor's, layer's and the
//! model's norms, cosines, sign conflicts, overlaps and kept fractions within 1e-5, kept
//! counts exactly; and a LoRA expert (task vector from its factors) equal to the same expert
//! folded into a full checkpoint (the dense path).

use std::path::{Path, PathBuf};

use inspect::{Inspection, Metrics};
use merge_core::MergeConfig;
use serde_json::Value;

const TOLERANCE: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn run(config: &str) -> Inspection {
    let cfg = MergeConfig::from_toml_str(config, "case").unwrap();
    inspect::inspect(&cfg, &testkit::resolver::offline(&fixtures()), false).unwrap()
}

/// Largest difference between a metric value and its golden (`null` must match `None`).
fn diff(ours: Option<f64>, golden: &Value, what: &str) -> f64 {
    match (ours, golden.as_f64()) {
        (Some(a), Some(b)) => (a - b).abs(),
        (None, None) => 0.0,
        _ => panic!("{what}: ours {ours:?}, golden {golden}"),
    }
}

/// Compares every metric; returns the largest difference.
fn compare(ours: &Metrics, golden: &Value, what: &str) -> f64 {
    let mut worst = 0f64;
    let vec = |name: &str, v: Vec<Option<f64>>, worst: &mut f64| {
        for (i, x) in v.iter().enumerate() {
            *worst = worst.max(diff(*x, &golden[name][i], &format!("{what} {name}[{i}]")));
        }
    };
    vec(
        "norm",
        ours.norm.iter().map(|x| Some(*x)).collect(),
        &mut worst,
    );
    vec("relative_norm", ours.relative_norm.clone(), &mut worst);
    vec("kept_fraction", ours.kept_fraction.clone(), &mut worst);
    for (name, m) in [
        ("cosine", &ours.cosine),
        ("sign_conflict", &ours.sign_conflict),
        ("overlap", &ours.overlap),
    ] {
        for (i, row) in m.iter().enumerate() {
            for (j, x) in row.iter().enumerate() {
                let w = diff(*x, &golden[name][i][j], &format!("{what} {name}[{i}][{j}]"));
                worst = worst.max(w);
            }
        }
    }
    worst
}

#[test]
fn inspect_matches_the_reference_computation() {
    let cases = cases();
    assert_eq!(cases.len(), 5);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let golden = &case["golden"];
        let x = run(case["config"].as_str().unwrap());
        let mut worst = 0f64;
        let tensors = golden["tensors"].as_object().unwrap();
        assert_eq!(x.tensors.len(), tensors.len(), "{name}: tensor count");
        for t in &x.tensors {
            let g = &tensors[&t.name];
            worst = worst.max(compare(&t.metrics, g, &format!("{name} {}", t.name)));
            let kept: Vec<u64> = g["kept"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(t.sums.kept, kept, "{name} {}: kept counts", t.name);
            assert_eq!(t.kind.name(), g["kind"].as_str().unwrap(), "{}", t.name);
            assert_eq!(t.layer.map(|l| l as u64), g["layer"].as_u64(), "{}", t.name);
        }
        let layers = x.layer_groups("all");
        assert_eq!(layers.len(), golden["layers"].as_object().unwrap().len());
        for l in layers {
            let key = l.layer.unwrap().to_string();
            worst = worst.max(compare(&l.metrics, &golden["layers"][&key], &key));
        }
        worst = worst.max(compare(&x.model.metrics, &golden["model"], "model"));
        assert!(worst <= TOLERANCE, "{name}: largest difference {worst:e}");
        println!("{name}: largest difference {worst:e}");
    }
}

#[test]
fn a_lora_expert_from_its_factors_equals_the_same_expert_folded_in() {
    let cases = cases();
    let config = |n: &str| {
        cases.iter().find(|c| c["name"] == n).unwrap()["config"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let lora = run(&config("ties_lora"));
    let folded = run(&config("ties_lora_folded"));
    assert!(lora.experts[2].lora && !folded.experts[2].lora);
    let mut worst = 0f64;
    for (a, b) in lora.tensors.iter().zip(&folded.tensors) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.sums.kept, b.sums.kept, "{}", a.name);
        let golden = serde_json::to_value(&b.metrics).unwrap();
        worst = worst.max(compare(&a.metrics, &golden, &a.name));
    }
    assert!(worst <= TOLERANCE, "factor vs dense path: {worst:e}");
    // The adapter leaves k_proj alone: a zero task vector, nothing kept, no cosine.
    let k = lora
        .tensors
        .iter()
        .find(|t| t.name == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(k.metrics.norm[2], 0.0);
    assert_eq!(k.sums.kept[2], 0);
    assert_eq!(k.metrics.cosine[0][2], None);
}

#[test]
fn ties_at_the_threshold_are_split_by_position() {
    // bf16 task vectors repeat magnitudes: the kept counts must still be exactly TIES' k.
    let cases = cases();
    let case = cases.iter().find(|c| c["name"] == "ties_bf16").unwrap();
    let x = run(case["config"].as_str().unwrap());
    let mut split = 0;
    for t in &x.tensors {
        let n = t.sums.numel as usize;
        let k = ((0.4 * n as f64) as usize).max(1);
        for e in 0..2 {
            // Zeros are never kept, so at most k; exactly k where the task vector has k nonzeros.
            assert!(t.sums.kept[e] as usize <= k, "{}", t.name);
        }
        if t.sums.kept.iter().all(|&c| c as usize == k) {
            split += 1;
        }
    }
    assert!(split > 10, "most tensors keep exactly k: {split}");
}

#[test]
fn findings_name_the_layers_where_experts_clash() {
    // The fixture flips expert_b's MLP task vector in layer 2 (scripts/goldens): its signs
    // disagree with expert_a's there far more than elsewhere.
    let cases = cases();
    let case = cases.iter().find(|c| c["name"] == "ties_full").unwrap();
    let x = run(case["config"].as_str().unwrap());
    let layer2 = x
        .layers
        .iter()
        .find(|g| g.layer == Some(2) && g.kind == "mlp")
        .unwrap();
    let rate = layer2.metrics.sign_conflict[0][1].unwrap();
    let expected = format!(
        "experts 1 (expert_a) and 2 (expert_b) disagree in sign on {:.0}% of the MLP weights both keep in layer 2",
        100.0 * rate
    );
    assert!(rate > 0.6, "{rate}");
    assert!(
        x.findings.iter().any(|f| f.starts_with(&expected)),
        "{expected}\nnot in {:#?}",
        x.findings
    );
    assert!(!x
        .findings
        .iter()
        .any(|f| f.contains("attention weights both keep in")));
}
