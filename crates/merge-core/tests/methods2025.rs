//! Parity with mergekit 0.1.5 for its 2025 methods (`sce`, `nuslerp`, `multislerp`,
//! `karcher`, `nearswap`, `arcee_fusion`, `ram`, `ramplus_tl`, `passthrough`) on the tiny
//! fixtures: each case is a mergekit YAML config, run unchanged through our mergekit reader and
//! compared with mergekit's output (both made by `scripts/goldens/mergekit2025_goldens.py`);
//! and the bad inputs these methods reject.

use std::path::{Path, PathBuf};

use merge_core::checkpoint::Checkpoint;
use merge_core::config::mergekit;
use merge_core::engine::{self, MergeOptions};
use merge_core::MergeConfig;
use testkit::compare;
use testkit::resolver::offline;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge")
}

/// A mergekit YAML config, read as `llm-merging merge x.yml` reads it.
fn from_yaml(text: &str, origin: &str) -> merge_core::Result<MergeConfig> {
    let cfg = mergekit::parse(text, origin)?;
    cfg.validate(origin)?;
    Ok(cfg)
}

/// Run `cfg` into `out` over the fixtures.
fn merge(cfg: &MergeConfig, out: &Path) -> merge_core::Result<()> {
    engine::run(cfg, &offline(&fixtures()), &MergeOptions::new(out)).map(|_| ())
}

#[test]
fn every_2025_method_matches_mergekit() {
    let path = fixtures().join("goldens2025/cases.json");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut results: Vec<(String, String, f32)> = Vec::new();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg = from_yaml(case["yaml"].as_str().unwrap(), name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = tmp.path().join(name);
        merge(&cfg, &out).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours = Checkpoint::open_dir(&out).unwrap();
        let golden =
            Checkpoint::open_dir(fixtures().join(case["golden"].as_str().unwrap())).unwrap();
        let d = compare::checkpoints(&ours, &golden);
        println!("{name}: max |diff| = {d:e}");
        results.push((name.to_string(), cfg.method.clone(), d));
    }
    // Every method has goldens: two or more configs where it takes more than one shape of input.
    for (method, cases) in [
        ("sce", 3),
        ("nuslerp", 3),
        ("multislerp", 3),
        ("karcher", 3),
        ("nearswap", 2),
        ("arcee_fusion", 2),
        ("ram", 2),
        ("ramplus_tl", 2),
        ("passthrough", 2),
    ] {
        let n = results.iter().filter(|r| r.1 == method).count();
        assert!(n >= cases, "{method}: {n} golden case(s), expected {cases}");
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, _, d)| d.is_nan() || *d > 1e-5)
        .map(|(name, _, d)| format!("{name}: {d:e}"))
        .collect();
    assert!(failed.is_empty(), "max |diff| above 1e-5: {failed:?}");
}

/// The error of running mergekit YAML `text`, checking that nothing was written.
fn merge_error(text: &str, origin: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = from_yaml(text, origin)
        .and_then(|cfg| merge(&cfg, &out))
        .expect_err("bad input must fail")
        .to_string();
    assert!(!out.exists(), "{origin}: output written despite `{err}`");
    err
}

#[test]
fn karcher_and_multislerp_need_two_models() {
    for (method, params) in [
        ("karcher", ""),
        ("multislerp", "\n    parameters: {weight: 1.0}"),
    ] {
        let text = format!("merge_method: {method}\nmodels:\n  - model: models/expert_a{params}\n");
        let err = merge_error(&text, &format!("{method}.yml"));
        assert!(
            err.contains(method) && err.contains("at least 2") && err.contains("got 1"),
            "{err}"
        );
    }
    // With a base, multislerp's inputs are still the models besides it.
    let text = "merge_method: multislerp\nbase_model: models/base\nmodels:\n  - model: models/base\n  - model: models/expert_a\n    parameters: {weight: 1.0}\n";
    let err = merge_error(text, "multislerp_base.yml");
    assert!(err.contains("multislerp") && err.contains("got 1"), "{err}");
}

#[test]
fn passthrough_slices_that_change_the_layers_are_rejected() {
    // A frankenmerge: 3 + 2 layers from a 3-layer model.
    let text = "merge_method: passthrough\nslices:\n  - sources:\n      - model: models/expert_a\n        layer_range: [0, 3]\n  - sources:\n      - model: models/expert_b\n        layer_range: [1, 3]\n";
    let err = merge_error(text, "frankenmerge.yml");
    assert!(
        err.contains("frankenmerge.yml") && err.contains("slices") && err.contains("layer"),
        "{err}"
    );
    // Passthrough takes one input: a named base is one more.
    let text =
        "merge_method: passthrough\nbase_model: models/base\nmodels:\n  - model: models/expert_a\n";
    let err = merge_error(text, "two_inputs.yml");
    assert!(
        err.contains("passthrough") && err.contains("got 2"),
        "{err}"
    );
}

/// One tensor merged by `method` directly (its defaults, then `global` and `weight`s).
fn merge_tensor(
    method: &str,
    base: Option<&[f32]>,
    models: &[&[f32]],
    global: &[(&'static str, f64)],
    weights: &[f64],
) -> candle_core::Result<Vec<f32>> {
    use candle_core::{Device, Tensor};
    use merge_core::methods::{Params, TensorInputs};
    use merge_core::registry::{lookup, Method};
    let Some(Method::Tensor(m)) = lookup(method) else {
        panic!("{method} is not a tensor-level method")
    };
    let t = |x: &[f32]| Tensor::from_slice(x, x.len(), &Device::Cpu).unwrap();
    let mut g = Params::defaults(m.parameters());
    for &(k, v) in global {
        g.set(k, v);
    }
    let per_model: Vec<Params> = (0..models.len())
        .map(|i| {
            let mut p = Params::defaults(m.model_parameters());
            if let Some(w) = weights.get(i) {
                p.set("weight", *w);
            }
            p
        })
        .collect();
    let base = base.map(t);
    let models: Vec<Tensor> = models.iter().map(|x| t(x)).collect();
    m.merge(&TensorInputs::new(
        "model.layers.0.mlp.up_proj.weight",
        base.as_ref(),
        &models,
        &g,
        &per_model,
    ))?
    .to_vec1::<f32>()
}

#[test]
fn multislerp_of_cancelling_directions_is_an_error_for_three_and_linear_for_two() {
    let (a, b) = ([1.0f32, 2.0], [-1.0f32, -2.0]);
    // Two antipodal inputs of equal weight: mergekit's linear fallback, Σ wᵢxᵢ = 0.
    let two = merge_tensor("multislerp", None, &[&a, &b], &[], &[1.0, 1.0]).unwrap();
    assert_eq!(two, [0.0, 0.0]);
    let err = merge_tensor(
        "multislerp",
        None,
        &[&a, &b, &[0.0, 0.0]],
        &[],
        &[1.0, 1.0, 1.0],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("multislerp") && err.contains("model.layers.0.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn spherical_means_keep_the_norm_and_stay_between_the_inputs() {
    // Orthogonal unit vectors: every spherical mean lies on the unit circle at 45°.
    let (a, b) = ([1.0f32, 0.0], [0.0f32, 1.0]);
    let h = std::f32::consts::FRAC_1_SQRT_2;
    for (method, global) in [
        ("karcher", vec![]),
        ("multislerp", vec![]),
        ("nuslerp", vec![]),
    ] {
        let out = merge_tensor(method, None, &[&a, &b], &global, &[1.0, 1.0]).unwrap();
        assert!(
            (out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6,
            "{method}: {out:?}"
        );
    }
    // nuslerp's weights sum to zero: t = 0.5, as in mergekit.
    let out = merge_tensor("nuslerp", None, &[&a, &b], &[], &[1.0, -1.0]).unwrap();
    assert!(
        (out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6,
        "{out:?}"
    );
    // Karcher of all-zero inputs is zero (no direction to average).
    let zero = [0.0f32, 0.0];
    let out = merge_tensor("karcher", None, &[&zero, &zero], &[], &[]).unwrap();
    assert_eq!(out, [0.0, 0.0]);
}

#[test]
fn ram_averages_only_the_experts_that_changed_an_element() {
    let base = [0.0f32, 0.0, 0.0];
    let a = [1.0f32, 2.0, 0.0];
    let b = [3.0f32, 0.0, 0.0];
    let out = merge_tensor("ram", Some(&base), &[&a, &b], &[], &[]).unwrap();
    assert_eq!(out, [2.0, 2.0, 0.0]);
    // RAM+: a has one shared and one unique change (ρ = 1), b none unique (ρ = 1/ε):
    // λ = 1 + r·min(ρ, α) = 1.02 for both; only a's unique change is scaled.
    let out = merge_tensor("ramplus_tl", Some(&base), &[&a, &b], &[], &[]).unwrap();
    assert_eq!(out, [2.0, 2.0 * 1.02, 0.0]);
}
