//! Properties of the methods that have no Python golden: the randomised ones (DARE, DELLA),
//! the geometric median, and the task-arithmetic family's streamed and whole-tensor paths
//! against its algorithm written plainly.

use candle_core::{Device, Tensor};
use merge_core::methods::{Params, TensorInputs};
use merge_core::registry::{self, Method};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: usize = 1 << 20;

fn method(name: &str) -> &'static dyn merge_core::methods::MergeMethod {
    match registry::lookup(name) {
        Some(Method::Tensor(m)) => m,
        _ => panic!("{name} is not a tensor-level method"),
    }
}

/// The method's defaults, then `global` / `per_model` (flags given as booleans).
fn params(
    name: &str,
    global: &[(&'static str, f64)],
    per_model: &[(&'static str, f64)],
    k: usize,
) -> (Params, Vec<Params>) {
    let m = method(name);
    let mut g = Params::defaults(m.parameters());
    for &(k, v) in global {
        match k {
            "rescale" | "normalize" => g.set(k, v != 0.0),
            _ => g.set(k, v),
        }
    }
    let mut p = Params::defaults(m.model_parameters());
    for s in m.model_parameters().iter().filter(|s| s.default.is_none()) {
        p.set(s.name, 1.0);
    }
    for &(k, v) in per_model {
        p.set(k, v);
    }
    (g, vec![p; k])
}

fn run(
    method: &str,
    base: &Tensor,
    models: &[Tensor],
    g: &Params,
    p: &[Params],
    seed: u64,
) -> Vec<f32> {
    self::method(method)
        .merge(&TensorInputs {
            seed,
            ..TensorInputs::new(
                "model.layers.0.mlp.up_proj.weight",
                Some(base),
                models,
                g,
                p,
            )
        })
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// A 1024×1024 tensor of values in [lo, hi).
fn uniform(seed: u64, lo: f32, hi: f32) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..N).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(v, (1024, 1024), &Device::Cpu).unwrap()
}

const RANDOM: [&str; 4] = ["dare_linear", "dare_ties", "della", "della_linear"];

#[test]
fn random_methods_are_deterministic_per_seed() {
    let base = uniform(1, -1.0, 1.0);
    let models = vec![uniform(2, -1.0, 1.0), uniform(3, -1.0, 1.0)];
    for method in RANDOM {
        let (g, p) = params(method, &[], &[("weight", 0.5), ("density", 0.4)], 2);
        let a = run(method, &base, &models, &g, &p, 7);
        let b = run(method, &base, &models, &g, &p, 7);
        let c = run(method, &base, &models, &g, &p, 8);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{method}: same seed, different output");
        let differing = a.iter().zip(&c).filter(|(x, y)| x != y).count();
        assert!(
            differing > N / 10,
            "{method}: seeds 7 and 8 differ in only {differing} elements"
        );
    }
}

#[test]
fn random_methods_keep_density_and_expected_sum() {
    let base = Tensor::zeros((1024, 1024), candle_core::DType::F32, &Device::Cpu).unwrap();
    // Positive task vectors, so the sum is far from zero and its relative error is small.
    let expert = uniform(4, 0.5, 1.5);
    let total: f64 = expert
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| f64::from(*v))
        .sum();
    for method in RANDOM {
        for density in [0.1, 0.3, 0.7] {
            // della needs density ± epsilon inside (0, 1)
            let (g, p) = params(
                method,
                &[],
                &[("weight", 1.0), ("density", density), ("epsilon", 0.05)],
                1,
            );
            let out = run(method, &base, std::slice::from_ref(&expert), &g, &p, 11);
            let kept = out.iter().filter(|v| **v != 0.0).count() as f64 / N as f64;
            assert!(
                (kept - density).abs() <= 0.01 * density,
                "{method} density {density}: kept {kept}"
            );
            let sum: f64 = out.iter().map(|v| f64::from(*v)).sum();
            assert!(
                ((sum - total) / total).abs() < 0.01,
                "{method} density {density}: rescaled sum {sum}, input sum {total}"
            );
            // Without rescaling the sum shrinks to about density × the input's.
            let (g, p) = params(
                method,
                &[("rescale", 0.0)],
                &[("weight", 1.0), ("density", density), ("epsilon", 0.05)],
                1,
            );
            let out = run(method, &base, std::slice::from_ref(&expert), &g, &p, 11);
            let sum: f64 = out.iter().map(|v| f64::from(*v)).sum();
            assert!(
                (sum / total - density).abs() < 0.05 * density + 0.01,
                "{method} density {density}, no rescale: sum ratio {}",
                sum / total
            );
        }
    }
}

#[test]
fn della_keeps_large_magnitudes_more_often() {
    let base = Tensor::zeros((1024, 1024), candle_core::DType::F32, &Device::Cpu).unwrap();
    let expert = uniform(5, -1.0, 1.0);
    let (g, p) = params(
        "della_linear",
        &[("rescale", 0.0)],
        &[("weight", 1.0), ("density", 0.5), ("epsilon", 0.3)],
        1,
    );
    let out = run(
        "della_linear",
        &base,
        std::slice::from_ref(&expert),
        &g,
        &p,
        3,
    );
    let input = expert.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let frac = |pred: &dyn Fn(f32) -> bool| {
        let idx: Vec<usize> = (0..N).filter(|&i| pred(input[i].abs())).collect();
        idx.iter().filter(|&&i| out[i] != 0.0).count() as f64 / idx.len() as f64
    };
    let small = frac(&|a| a < 0.1);
    let large = frac(&|a| a > 0.9);
    // p runs from 0.2 (smallest) to 0.8 (largest) within each row
    assert!((small - 0.23).abs() < 0.03, "small magnitudes kept {small}");
    assert!((large - 0.77).abs() < 0.03, "large magnitudes kept {large}");
}

#[test]
fn della_rejects_bad_epsilon() {
    let mut x = vec![1.0f32; 8];
    assert!(merge_core::methods::sparsify::della_magprune(&mut x, 4, 0.9, 0.15, true, 1).is_err());
}

fn small(values: &[f32]) -> Tensor {
    Tensor::from_vec(values.to_vec(), values.len(), &Device::Cpu).unwrap()
}

/// Weiszfeld written out plainly in f64, as an independent reference.
fn reference_median(points: &[Vec<f64>], weights: &[f64], iters: usize) -> Vec<f64> {
    let dim = points[0].len();
    let total: f64 = weights.iter().sum();
    let mut z: Vec<f64> = (0..dim)
        .map(|j| {
            points
                .iter()
                .zip(weights)
                .map(|(p, w)| w * p[j])
                .sum::<f64>()
                / total
        })
        .collect();
    for _ in 0..iters {
        let betas: Vec<f64> = points
            .iter()
            .zip(weights)
            .map(|(p, w)| {
                let d = p
                    .iter()
                    .zip(&z)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>()
                    .sqrt();
                w / d.max(1e-12)
            })
            .collect();
        let bt: f64 = betas.iter().sum();
        z = (0..dim)
            .map(|j| {
                points
                    .iter()
                    .zip(&betas)
                    .map(|(p, b)| b * p[j])
                    .sum::<f64>()
                    / bt
            })
            .collect();
    }
    z
}

#[test]
fn geometric_median_matches_direct_weiszfeld() {
    let base = [0.5f32, -1.0, 2.0, 0.0];
    let experts = [
        [1.0f32, 0.0, 2.5, 1.0],
        [0.0, -2.0, 1.0, 0.5],
        [2.0, -1.5, 3.0, -1.0],
        [0.7, 0.3, 2.2, 0.2],
    ];
    let weights = [1.0, 2.0, 0.5, 1.5];
    let points: Vec<Vec<f64>> = experts
        .iter()
        .map(|e| {
            e.iter()
                .zip(&base)
                .map(|(a, b)| f64::from(*a) - f64::from(*b))
                .collect()
        })
        .collect();
    let expected = reference_median(&points, &weights, 2000);
    let models: Vec<Tensor> = experts.iter().map(|e| small(e)).collect();
    let (mut g, mut p) = params(
        "geometric_median",
        &[("eps", 1e-12), ("max_iter", 2000.0)],
        &[],
        4,
    );
    for (pi, w) in p.iter_mut().zip(weights) {
        pi.set("weight", w);
    }
    g.set("eps", 1e-12);
    let out = run("geometric_median", &small(&base), &models, &g, &p, 0);
    for j in 0..4 {
        let want = f64::from(base[j]) + expected[j];
        assert!(
            (f64::from(out[j]) - want).abs() < 1e-5,
            "element {j}: {} vs {want}",
            out[j]
        );
    }
    // The median is not the weighted mean here (the test would be vacuous otherwise).
    let mean0: f64 = points
        .iter()
        .zip(&weights)
        .map(|(p, w)| w * p[0])
        .sum::<f64>()
        / 5.0;
    assert!((expected[0] - mean0).abs() > 1e-3);
}

#[test]
fn geometric_median_of_two_points_is_their_mean() {
    let base = small(&[0.0, 0.0, 0.0]);
    let models = vec![small(&[1.0, 2.0, -3.0]), small(&[3.0, -2.0, 1.0])];
    let (g, p) = params("geometric_median", &[], &[], 2);
    let out = run("geometric_median", &base, &models, &g, &p, 0);
    assert_eq!(out, vec![2.0, 0.0, -1.0]);
}

#[test]
fn geometric_median_resists_one_outlier() {
    // Four experts agree on a task vector near (1, 1, 1, 1); a fifth is far off.
    let base = small(&[0.0; 4]);
    let mut models: Vec<Tensor> = [
        [1.0f32, 1.1, 0.9, 1.0],
        [0.9, 1.0, 1.0, 1.1],
        [1.1, 0.9, 1.0, 1.0],
        [1.0, 1.0, 1.1, 0.9],
    ]
    .iter()
    .map(|v| small(v))
    .collect();
    models.push(small(&[100.0, -100.0, 100.0, -100.0]));
    let (g, p) = params("geometric_median", &[], &[], 5);
    let median = run("geometric_median", &base, &models, &g, &p, 0);
    let (g, p) = params(
        "task_arithmetic",
        &[("normalize", 1.0)],
        &[("weight", 1.0)],
        5,
    );
    let mean = run("task_arithmetic", &base, &models, &g, &p, 0);
    let dist = |v: &[f32]| v.iter().map(|x| (x - 1.0).powi(2)).sum::<f32>().sqrt();
    assert!(dist(&mean) > 30.0, "the mean is dragged away: {mean:?}");
    assert!(
        dist(&median) < 0.5,
        "the median stays with the majority: {median:?}"
    );
}

#[test]
fn every_method_has_a_parsing_example_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../submissions/examples");
    for name in registry::names() {
        let path = dir.join(format!("{name}.toml"));
        let cfg = merge_core::MergeConfig::from_file(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(cfg.method, name, "{}", path.display());
    }
}

#[test]
fn magnitude_selection_ranks_by_magnitude_then_position() {
    // One expert of weight 1 over a zero base: the output is its sparsified task vector.
    let sparsified =
        |method: &str, x: &[f32], global: &[(&'static str, f64)], p: &[(&'static str, f64)]| {
            let (g, p) = params(method, global, p, 1);
            let out = run(method, &small(&vec![0.0; x.len()]), &[small(x)], &g, &p, 0);
            let kept: Vec<usize> = (0..x.len()).filter(|&i| out[i] != 0.0).collect();
            (kept, out)
        };
    let x = [0.1, -5.0, 0.3, 2.0, -0.2, 4.0];
    assert_eq!(
        sparsified("ties", &x, &[], &[("density", 0.5)]).0,
        [1, 3, 5]
    );
    // At least one element survives a tiny density.
    assert_eq!(
        sparsified("ties", &[1.0, -3.0, 2.0], &[], &[("density", 0.01)]).0,
        [1]
    );
    // Rescaling restores the L1 norm.
    let (kept, out) = sparsified(
        "ties",
        &[1.0, -2.0, 3.0, -4.0],
        &[("rescale", 1.0)],
        &[("density", 0.5)],
    );
    assert_eq!(kept, [2, 3]);
    assert!(
        (out.iter().map(|v| v.abs()).sum::<f32>() - 10.0).abs() < 1e-5,
        "{out:?}"
    );
    // Breadcrumbs drops the top `gamma` share, then the bottom, keeping `density`.
    let ten: Vec<f32> = (1..=10).map(|v| v as f32).collect();
    let b = |x: &[f32], d, g| sparsified("breadcrumbs", x, &[], &[("density", d), ("gamma", g)]).0;
    assert_eq!(b(&ten, 0.5, 0.2), [3, 4, 5, 6, 7]);
    // Equal magnitudes rank by position: ranks 0.5 → 0, then the four 1s → 1, 2, 3, 4.
    assert_eq!(b(&[1.0, -1.0, 1.0, 1.0, 0.5], 0.4, 0.4), [0, 1]);
    assert_eq!(b(&[2.0, 1.0, 1.0, 1.0, 3.0], 0.4, 0.2), [0, 3]);
}

/// How a task-arithmetic member sparsifies, for [`plain_task_arithmetic`].
#[derive(Clone, Copy)]
enum Sparsify {
    Magnitude,
    Outliers,
    Random,
}

/// The family's algorithm written plainly: task vectors sparsified by sorting magnitudes (ties
/// ranked by position) or by DARE's per-block draws, L1-rescaled, then combined (TIES' sign
/// election with `consensus`).
fn plain_task_arithmetic(
    (sparsify, consensus): (Sparsify, bool),
    b: &[f32],
    models: &[Vec<f32>],
    weights: &[f32],
    densities: &[f64],
    (normalize, rescale): (bool, bool),
    seed: u64,
) -> Vec<f32> {
    use merge_core::methods::sparsify::{self as s, bernoulli_block, mag_key, mix_seed};
    let n = b.len();
    let deltas: Vec<Vec<f32>> = models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut d: Vec<f32> = m.iter().zip(b).map(|(m, b)| m - b).collect();
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&j| (mag_key(d[j]), j));
            let keep = |range: std::ops::Range<usize>, d: &mut Vec<f32>| {
                let before = s::l1(d);
                let mut kept = vec![0f32; n];
                for &j in &order[range] {
                    kept[j] = d[j];
                }
                *d = kept;
                if rescale {
                    s::rescale_l1(d, before);
                }
            };
            match sparsify {
                Sparsify::Magnitude => {
                    let k = ((densities[i] * n as f64) as usize).max(1);
                    keep(n - k..n, &mut d);
                }
                Sparsify::Outliers => {
                    let target = (densities[i] * n as f64) as usize;
                    let bottom = n - target - (0.01 * n as f64) as usize;
                    keep(bottom..bottom + target, &mut d);
                }
                Sparsify::Random => {
                    for (c, block) in d.chunks_mut(s::RNG_CHUNK).enumerate() {
                        bernoulli_block(block, c, densities[i], rescale, mix_seed(seed, i as u64));
                    }
                }
            }
            d
        })
        .collect();
    let sum_w: f32 = weights.iter().sum();
    let norm = |v: f32, div: f32| if normalize { v / div } else { v };
    (0..n)
        .map(|j| {
            let mut total = deltas[0][j] * weights[0];
            for (d, w) in deltas[1..].iter().zip(&weights[1..]) {
                total += d[j] * w;
            }
            if !consensus {
                return b[j] + norm(total, sum_w);
            }
            let (mut mixed, mut div) = (0f32, 0f32);
            for (d, w) in deltas.iter().zip(weights) {
                let v = d[j] * w;
                if (total >= 0.0 && v > 0.0) || (total < 0.0 && v < 0.0) {
                    mixed += v;
                    div += w;
                }
            }
            b[j] + norm(mixed, if div == 0.0 { 1.0 } else { div })
        })
        .collect()
}

#[test]
fn task_arithmetic_streamed_and_whole_equal_the_plain_algorithm() {
    // Three streaming chunks, the last partial; few distinct values, so many equal
    // magnitudes sit at the thresholds and span chunk boundaries.
    let n = 2 * merge_core::methods::STREAM_CHUNK + 12_345;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut draw = |scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.gen_range(0..41) as f32 - 20.0) * scale)
            .collect()
    };
    let b = draw(1e-3);
    let models: Vec<Vec<f32>> = (0..2)
        .map(|_| draw(1e-4).iter().zip(&b).map(|(d, b)| b + d).collect())
        .collect();
    let (weights, densities) = ([0.6f32, 0.4], [0.5, 0.3]);
    let base = Tensor::from_slice(&b, n, &Device::Cpu).unwrap();
    let experts: Vec<Tensor> = models
        .iter()
        .map(|m| Tensor::from_slice(m, n, &Device::Cpu).unwrap())
        .collect();
    // Without rescaling, magnitude selection streams; with it, the method merges whole.
    for (name, kind, rescale) in [
        ("ties", Sparsify::Magnitude, false),
        ("ties", Sparsify::Magnitude, true),
        ("dare_ties", Sparsify::Random, true),
        ("breadcrumbs", Sparsify::Outliers, false),
        ("breadcrumbs_ties", Sparsify::Outliers, true),
    ] {
        let m = method(name);
        let mut g = Params::defaults(m.parameters());
        g.set("rescale", rescale);
        let p: Vec<Params> = (0..2)
            .map(|i| {
                let mut p = Params::defaults(m.model_parameters());
                p.set("weight", f64::from(weights[i]));
                p.set("density", densities[i]);
                p
            })
            .collect();
        let got = run(name, &base, &experts, &g, &p, 77);
        let how = (kind, name.ends_with("ties"));
        let flags = (g.flag("normalize"), rescale);
        let want = plain_task_arithmetic(how, &b, &models, &weights, &densities, flags, 77);
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| g.to_bits() != w.to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "{name} (rescale {rescale}): {differ} elements differ"
        );
    }
}
