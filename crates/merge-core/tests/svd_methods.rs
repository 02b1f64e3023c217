//! The SVD-based merges (`tsv`, `iso_c`, `iso_cts`) against the float64 torch transcription of
//! the papers' formulas in scripts/goldens/svd_goldens.py, on the tiny Llama fixtures of
//! tests/fixtures/merge (goldens in tests/fixtures/svd); and their properties and errors.
//! `extract-lora` against the same script's torch SVD reference.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use merge_core::adapter::extract::{extract_lora, ExtractOptions};
use merge_core::adapter::Adapter;
use merge_core::checkpoint::Checkpoint;
use merge_core::engine::{self, MergeOptions};
use merge_core::methods::dense_linalg::{thin_svd, view_rows};
use merge_core::methods::{MergeMethod, Params, TensorInputs};
use merge_core::registry::{self, Method};
use merge_core::MergeConfig;
use testkit::compare;
use testkit::resolver::offline;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn method(name: &str) -> &'static dyn MergeMethod {
    match registry::lookup(name) {
        Some(Method::Tensor(m)) => m,
        _ => panic!("{name} is not a tensor-level method"),
    }
}

#[test]
fn svd_merges_match_the_reference_formulas() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("svd/cases.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    let mut failed = Vec::new();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg: MergeConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let out = tmp.path().join(name);
        engine::run(
            &cfg,
            &offline(&fixtures().join("merge")),
            &MergeOptions::new(&out),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours = Checkpoint::open_dir(&out).unwrap();
        let golden = fixtures()
            .join("svd")
            .join(case["golden"].as_str().unwrap());
        let golden = Checkpoint::open_dir(golden.parent().unwrap()).unwrap();
        let d = compare::checkpoints(&ours, &golden);
        println!("{name}: max |diff| vs reference = {d:e}");
        if d.is_nan() || d > 1e-4 {
            failed.push(format!("{name}: {d:e}"));
        }
        seen.push(cfg.method.clone());
    }
    for m in ["tsv", "iso_c", "iso_cts"] {
        let n = seen.iter().filter(|s| *s == m).count();
        assert!(
            n >= 2,
            "{m}: {n} reference case(s), expected two and three experts"
        );
    }
    assert!(failed.is_empty(), "above 1e-4: {failed:?}");
}

/// A random m × n tensor (a small LCG: deterministic, no dependency).
fn random(seed: u64, m: usize, n: usize) -> Tensor {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..m * n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, (m, n), &Device::Cpu).unwrap()
}

fn merge(
    name: &str,
    base: &Tensor,
    models: &[Tensor],
    set: &[(&'static str, f64)],
) -> candle_core::Result<Tensor> {
    let m = method(name);
    let mut params = Params::defaults(m.parameters());
    for (k, v) in set {
        params.set(k, *v);
    }
    let model_params = vec![Params::defaults(m.model_parameters()); models.len()];
    m.merge(&TensorInputs::new(
        "model.layers.0.mlp.up_proj.weight",
        Some(base),
        models,
        &params,
        &model_params,
    ))
}

fn singular_values(t: &Tensor) -> Vec<f32> {
    let (m, n) = t.dims2().unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    thin_svd(view_rows(&v, m, n)).unwrap().s
}

#[test]
fn iso_merges_have_an_isotropic_spectrum_and_tsv_keeps_a_single_task() {
    let base = random(1, 24, 40);
    let models: Vec<Tensor> = (2..5)
        .map(|s| (&base + random(s, 24, 40)).unwrap())
        .collect();
    for name in ["iso_c", "iso_cts"] {
        let delta = (merge(name, &base, &models, &[("alpha", 2.0)]).unwrap() - &base).unwrap();
        let s = singular_values(&delta);
        let (lo, hi) = (s[s.len() - 1], s[0]);
        assert!(
            hi - lo < 1e-4 * hi,
            "{name}: spectrum {lo}..{hi} is not flat"
        );
    }
    // Iso-C's flat level is α times the mean singular value of the summed task vectors.
    let sum = models
        .iter()
        .map(|m| (m - &base).unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let mean = singular_values(&sum).iter().sum::<f32>() / 24.0;
    let iso = singular_values(
        &(merge("iso_c", &base, &models, &[("alpha", 2.0)]).unwrap() - &base).unwrap(),
    );
    assert!(
        (iso[0] - 2.0 * mean).abs() < 1e-4 * mean,
        "{} vs {}",
        iso[0],
        2.0 * mean
    );
    // One expert: TSV keeps all of its directions, so it returns the expert (α = 1).
    let one = merge("tsv", &base, &models[..1], &[]).unwrap();
    assert!(compare::max_abs_diff(&one, &models[0]) < 1e-5);
}

#[test]
fn one_dimensional_tensors_get_the_mean_task_vector() {
    let base = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
    let a = Tensor::new(&[2f32, 2.0, 5.0], &Device::Cpu).unwrap();
    let b = Tensor::new(&[1f32, 4.0, 3.0], &Device::Cpu).unwrap();
    for name in ["tsv", "iso_c", "iso_cts"] {
        let out = merge(name, &base, &[a.clone(), b.clone()], &[("alpha", 2.0)]).unwrap();
        assert_eq!(out.to_vec1::<f32>().unwrap(), [2.0, 4.0, 5.0], "{name}");
    }
}

#[test]
fn bad_parameters_and_shapes_are_clear_errors() {
    let m = method("iso_cts");
    let mut p = Params::defaults(m.parameters());
    p.set("common_space_fraction", 1.5);
    let e = m.check_params(&p, &[]).unwrap_err();
    assert!(e.contains("common_space_fraction"), "{e}");
    // TSV on a matrix with fewer singular directions than models.
    let base = random(1, 1, 8);
    let models: Vec<Tensor> = (2..4).map(|s| random(s, 1, 8)).collect();
    let e = merge("tsv", &base, &models, &[]).unwrap_err().to_string();
    assert!(e.contains("tsv") && e.contains("1 × 8"), "{e}");
    // Non-finite values do not reach the SVD.
    let nan = Tensor::new(&[[f32::NAN, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
    let base = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = merge("iso_c", &base, &[nan], &[]).unwrap_err().to_string();
    assert!(e.contains("NaN"), "{e}");
}

/// `extract-lora`'s adapter against the torch SVD reference: the same ranks, B·A equal to the
/// reference's rank-r reconstruction, the same singular values, and ‖Δ − B·A‖²_F equal to the
/// sum of the dropped σ² (Eckart–Young); the written adapter reads back through our reader.
#[test]
fn extracted_lora_matches_the_reference_svd_and_its_truncation_error() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("svd/extract_lora.json")).unwrap(),
    )
    .unwrap();
    let merge = fixtures().join("merge");
    let tmp = tempfile::tempdir().unwrap();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let base = Checkpoint::open_dir(merge.join(case["base"].as_str().unwrap())).unwrap();
        let model = Checkpoint::open_dir(merge.join(case["model"].as_str().unwrap())).unwrap();
        let opts = ExtractOptions {
            rank: case["rank"].as_u64().unwrap() as usize,
            energy: case["energy"].as_f64(),
            base_name: "models/base".into(),
        };
        let lora = extract_lora(&base, &model, &opts).unwrap();
        let out = tmp.path().join(name);
        lora.write(&out, false).unwrap();
        let adapter = Adapter::open_dir(&out).unwrap();
        let golden = Checkpoint::open_dir(
            fixtures()
                .join("svd")
                .join(case["golden"].as_str().unwrap())
                .parent()
                .unwrap(),
        )
        .unwrap();
        let ranks = case["ranks"].as_object().unwrap();
        assert_eq!(lora.modules.len(), ranks.len(), "{name}: extracted layers");
        let (mut worst, mut worst_sigma, mut worst_err) = (0f32, 0f32, 0f64);
        for m in &lora.modules {
            assert_eq!(
                m.rank as u64,
                ranks[&m.module].as_u64().unwrap(),
                "{name}: {}",
                m.module
            );
            let weight = format!("{}.weight", m.module);
            let ours = adapter.delta(&weight, &Device::Cpu).unwrap().unwrap();
            let reference = golden.load_f32(&weight, &Device::Cpu).unwrap();
            worst = worst.max(compare::max_abs_diff(&ours, &reference));
            let sigma = golden
                .load_f32(&format!("{}.sigma", m.module), &Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let ds = compare::max_abs_diff_f32(&m.sigma, &sigma);
            worst_sigma = worst_sigma.max(ds);
            // The truncation error the singular values predict.
            let delta = (model.load_f32(&weight, &Device::Cpu).unwrap()
                - base.load_f32(&weight, &Device::Cpu).unwrap())
            .unwrap();
            let residual = (delta - &ours).unwrap();
            let err_sq = f64::from(
                residual
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            );
            let predicted = m.error_sq();
            let rel = (err_sq - predicted).abs() / predicted.max(1e-12);
            worst_err = worst_err.max(rel);
            assert!(
                rel < 1e-3,
                "{name} {}: ‖Δ − BA‖² = {err_sq}, Σ dropped σ² = {predicted}",
                m.module
            );
            if let Some(e) = opts.energy {
                assert!(m.energy() >= e || m.rank == opts.rank, "{}", m.module);
            }
        }
        println!(
            "{name}: max |BA − reference| = {worst:e}, max |σ − reference σ| = {worst_sigma:e}, \
             max relative gap ‖Δ − BA‖² vs Σ dropped σ² = {worst_err:e}"
        );
        assert!(worst <= 1e-4, "{name}: {worst}");
        assert!(worst_sigma <= 1e-4, "{name}: {worst_sigma}");
        // The config: scale 1, the ranks as extracted, the linear layers as targets.
        let cfg = &adapter.raw_config;
        assert_eq!(cfg["r"], cfg["lora_alpha"]);
        assert_eq!(cfg["peft_type"], "LORA");
        let targets: Vec<&str> = cfg["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(
            targets,
            [
                "down_proj",
                "gate_proj",
                "k_proj",
                "o_proj",
                "q_proj",
                "up_proj",
                "v_proj"
            ]
        );
        assert!(adapter.modules().values().all(|m| adapter.scale(m) == 1.0));
    }
}

#[test]
fn extraction_rejects_bad_options_and_writes_nothing() {
    let merge = fixtures().join("merge/models");
    let base = Checkpoint::open_dir(merge.join("base")).unwrap();
    let model = Checkpoint::open_dir(merge.join("expert_a")).unwrap();
    let opts = |rank, energy| ExtractOptions {
        rank,
        energy,
        base_name: "base".into(),
    };
    for (o, needle) in [
        (opts(0, None), "--rank"),
        (opts(4, Some(0.0)), "--energy"),
        (opts(4, Some(1.5)), "--energy"),
    ] {
        let e = extract_lora(&base, &model, &o)
            .err()
            .expect("an error")
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
    let e = extract_lora(&base, &base, &opts(4, None))
        .err()
        .expect("an error")
        .to_string();
    assert!(e.contains("nothing to extract"), "{e}");
}
