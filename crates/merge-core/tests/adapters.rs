//! Adapter-level merges: the starter kit's `lora_avg`, `cat` and `svd`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use merge_core::adapter::{write_adapter, Adapter};
use merge_core::engine::{self, MergeOptions};
use merge_core::MergeConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use testkit::compare::max_abs_diff;
use testkit::resolver::offline;

const OUT: usize = 6;
const IN: usize = 5;
const MODULES: [&str; 4] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
];

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Tensor {
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

/// A PEFT adapter of rank `r` over q_proj and v_proj of two layers.
fn make_adapter(dir: &Path, r: usize, alpha: f64, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = Vec::new();
    for m in MODULES {
        tensors.push((
            format!("base_model.model.{m}.lora_A.weight"),
            random(&mut rng, r, IN),
        ));
        tensors.push((
            format!("base_model.model.{m}.lora_B.weight"),
            random(&mut rng, OUT, r),
        ));
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "task_type": "CAUSAL_LM",
    });
    write_adapter(dir, &config, &tensors, DType::F32, false).unwrap();
}

fn merge_adapters(dir: &Path, toml: &str, out: &str) -> Adapter {
    let cfg = MergeConfig::from_toml_str(toml, "test.toml").unwrap();
    engine::run(&cfg, &offline(dir), &MergeOptions::new(dir.join(out))).unwrap();
    Adapter::open_dir(dir.join(out)).unwrap()
}

fn setup() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    make_adapter(&tmp.path().join("r16"), 16, 32.0, 1);
    make_adapter(&tmp.path().join("r8"), 8, 16.0, 2);
    tmp
}

const KIT: &str = r#"
[merge]
method = "lora_avg"
[[merge.models]]
model = "r16"
parameters = { weight = 0.8 }
[[merge.models]]
model = "r8"
parameters = { weight = 0.2 }
"#;

#[test]
fn lora_avg_is_the_starter_kits_factor_average() {
    let tmp = setup();
    let merged = merge_adapters(tmp.path(), KIT, "avg");
    let first = Adapter::open_dir(tmp.path().join("r16")).unwrap();
    let second = Adapter::open_dir(tmp.path().join("r8")).unwrap();
    // The first adapter's config: r 16, alpha 32.
    assert_eq!(merged.config.r, 16);
    assert_eq!(merged.config.lora_alpha, 32.0);
    assert_eq!(merged.tensor_keys().count(), 2 * MODULES.len());
    for key in first.tensor_keys() {
        let p1 = first
            .load_factor_f32(key)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let p2 = second
            .load_factor_f32(key)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let got = merged
            .load_factor_f32(key)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // The kit's formula written out: 0.8·P1 + 0.2·pad(P2), zeros FIRST.
        let is_a = key.contains("lora_A");
        for (i, row) in got.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let padded = if is_a {
                    if i < 8 {
                        0.0
                    } else {
                        p2[i - 8][j]
                    }
                } else if j < 8 {
                    0.0
                } else {
                    p2[i][j - 8]
                };
                let want = 0.8f32 * p1[i][j] + 0.2f32 * padded;
                assert_eq!(
                    v.to_bits(),
                    want.to_bits(),
                    "{key}[{i}][{j}]: {v} vs {want}"
                );
            }
        }
    }
}

/// ‖t‖², the sum of the squares of its elements.
fn squared_norm(t: &Tensor) -> f32 {
    t.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap()
}

/// 0.8·ΔW₁ + 0.2·ΔW₂ for every module.
fn expected_sum(tmp: &Path) -> Vec<(String, Tensor)> {
    let first = Adapter::open_dir(tmp.join("r16")).unwrap();
    let second = Adapter::open_dir(tmp.join("r8")).unwrap();
    MODULES
        .iter()
        .map(|m| {
            let name = format!("{m}.weight");
            let d1 = first.delta(&name, &Device::Cpu).unwrap().unwrap();
            let d2 = second.delta(&name, &Device::Cpu).unwrap().unwrap();
            let sum = (d1.affine(0.8, 0.0).unwrap() + d2.affine(0.2, 0.0).unwrap()).unwrap();
            (name, sum)
        })
        .collect()
}

#[test]
fn cat_is_the_exact_sum_of_deltas() {
    let tmp = setup();
    let merged = merge_adapters(tmp.path(), &KIT.replace("lora_avg", "cat"), "cat");
    assert_eq!(merged.config.r, 24, "ranks stack");
    for (name, want) in expected_sum(tmp.path()) {
        let got = merged.delta(&name, &Device::Cpu).unwrap().unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{name}: {d}");
    }
}

#[test]
fn svd_at_full_rank_is_exact_and_truncation_is_optimal() {
    let tmp = setup();
    // Rank 5 = min(out, in) is full rank for these 6 × 5 deltas.
    let toml = KIT.replace("lora_avg", "svd").replace(
        "[[merge.models]]\nmodel = \"r16\"",
        "[merge.parameters]\nrank = 5\n[[merge.models]]\nmodel = \"r16\"",
    );
    let merged = merge_adapters(tmp.path(), &toml, "svd5");
    assert_eq!(merged.config.r, 5);
    for (name, want) in expected_sum(tmp.path()) {
        let got = merged.delta(&name, &Device::Cpu).unwrap().unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{name}: {d}");
    }
    // Rank 2: an SVD truncation is an orthogonal projection of ΔW, so
    // ‖ΔW − approx‖² = ‖ΔW‖² − ‖approx‖² (the dropped σ²); other rank-2 factors are not.
    let toml2 = toml.replace("rank = 5", "rank = 2");
    let merged2 = merge_adapters(tmp.path(), &toml2, "svd2");
    assert_eq!(merged2.config.r, 2);
    for (name, want) in expected_sum(tmp.path()) {
        let got = merged2.delta(&name, &Device::Cpu).unwrap().unwrap();
        let resid = squared_norm(&(&want - &got).unwrap());
        let total = squared_norm(&want);
        let kept = squared_norm(&got);
        assert!(
            (resid - (total - kept)).abs() < 1e-3 * total,
            "{name}: residual not orthogonal"
        );
        assert!(
            kept > 0.5 * total,
            "{name}: the top two directions hold most of ΔW"
        );
    }
}

#[test]
fn model_level_inputs_are_rejected_with_a_clear_error() {
    let tmp = setup();
    std::fs::create_dir_all(tmp.path().join("full")).unwrap();
    std::fs::write(tmp.path().join("full/config.json"), "{}").unwrap();
    let cfg = MergeConfig::from_toml_str(&KIT.replace("\"r8\"", "\"full\""), "t.toml").unwrap();
    let err = engine::run(
        &cfg,
        &offline(tmp.path()),
        &MergeOptions::new(tmp.path().join("x")),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a PEFT adapter"), "{err}");
    assert!(!tmp.path().join("x").exists());
}

mod linear_algebra {
    use merge_core::adapter::linalg::jacobi_svd;

    #[test]
    fn jacobi_svd_reconstructs() {
        let m = [4.0, 0.0, 1.0, 2.0, 3.0, -1.0, 0.5, 0.0, 2.0];
        let (u, s, v) = jacobi_svd(3, &m);
        assert!(s[0] >= s[1] && s[1] >= s[2]);
        for i in 0..3 {
            for j in 0..3 {
                let x: f64 = (0..3).map(|c| u[i * 3 + c] * s[c] * v[j * 3 + c]).sum();
                assert!((x - m[i * 3 + j]).abs() < 1e-12, "{i},{j}: {x}");
            }
        }
    }
}
