//! `multislerp`: barycentric interpolation of any number of models on the hypersphere
//! (mergekit's "Multi-SLERP", mergekit 0.1.5 `multislerp.py`; C. Goddard,
//! <https://goddard.blog/posts/multislerp-wow-what-a-cool-idea>).
//!
//! Each tensor of model i is one vector xᵢ (the task vector xᵢ − θ₀ when the config names a
//! base θ₀), with weight wᵢ (divided by Σw when `normalize_weights`). With uᵢ = xᵢ/(‖xᵢ‖+ε):
//!
//! m = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖                  (the weighted mean, on the sphere)
//! v = Σ wᵢ (uᵢ − (uᵢ·m) m)              (the weighted mean in m's tangent space)
//! out = (cos ‖v‖′ · m + sin ‖v‖′ / ‖v‖′ · v) · Σ wᵢ‖xᵢ‖,   ‖v‖′ = ‖v‖ + ε
//!
//! (θ₀ + that with a base). Where Σ wᵢuᵢ has norm below ε (antipodal inputs that cancel),
//! two models are averaged linearly, Σ wᵢxᵢ, and more are an error, as in mergekit.
//!
//! Parameters: per model `weight` (required); global `normalize_weights` (default true),
//! `eps` (default 1e-8). At least two models besides the base (one model has nothing to
//! interpolate: an error here, where mergekit returns it unchanged); an entry naming the base
//! is the base.
//!
//! ```toml
//! [merge]
//! method = "multislerp"
//! base_model = "Qwen/Qwen2.5-7B"
//! [[merge.models]]
//! model = "Qwen/Qwen2.5-7B-Instruct"
//! parameters = { weight = 1.0 }
//! [[merge.models]]
//! model = "Qwen/Qwen2.5-Math-7B"
//! parameters = { weight = 0.5 }
//! [[merge.models]]
//! model = "Qwen/Qwen2.5-Coder-7B"
//! parameters = { weight = 0.5 }
//! ```

use candle_core::{Error, Result, Tensor};
use rayon::prelude::*;

use super::{MergeMethod, ParamSpec, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices, CHUNK};

/// Barycentric spherical interpolation of several models; see the module docs.
pub struct Multislerp;

/// Σ xᵢyᵢ in f64.
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f64 {
    x.par_chunks(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>()
        })
        .sum()
}

/// Σᵢ cᵢ·vᵢ elementwise (f64 accumulation, f32 result).
pub(crate) fn weighted_sum(vectors: &[&[f32]], c: &[f64]) -> Vec<f32> {
    let mut out = vec![0f32; vectors[0].len()];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
        let off = k * CHUNK;
        for (j, o) in o.iter_mut().enumerate() {
            let s: f64 = vectors
                .iter()
                .zip(c)
                .map(|(v, c)| c * f64::from(v[off + j]))
                .sum();
            *o = s as f32;
        }
    });
    out
}

/// Multi-SLERP of `xs` with (already normalised) `weights`; `Err` when the mean vanishes for
/// three or more inputs.
fn multislerp(xs: &[&[f32]], weights: &[f64], eps: f64) -> std::result::Result<Vec<f32>, String> {
    let norms: Vec<f64> = xs.iter().map(|x| dot(x, x).sqrt()).collect();
    // The unit vectors are never built: m and v are sums of the xᵢ with these coefficients.
    let inv: Vec<f64> = norms.iter().map(|n| 1.0 / (n + eps)).collect();
    let mean_c: Vec<f64> = weights.iter().zip(&inv).map(|(w, i)| w * i).collect();
    // ‖Σ cᵢxᵢ‖² = Σᵢⱼ cᵢcⱼ xᵢ·xⱼ
    let n = xs.len();
    let mut gram = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in i..n {
            let d = if i == j {
                norms[i] * norms[i]
            } else {
                dot(xs[i], xs[j])
            };
            gram[i][j] = d;
            gram[j][i] = d;
        }
    }
    let quad = |c: &[f64], d: &[f64]| -> f64 {
        (0..n)
            .map(|i| (0..n).map(|j| c[i] * d[j] * gram[i][j]).sum::<f64>())
            .sum()
    };
    let mean_norm = quad(&mean_c, &mean_c).sqrt();
    if mean_norm < eps {
        if n == 2 {
            return Ok(weighted_sum(xs, weights));
        }
        return Err(
            "the weighted sum of the inputs' directions is zero (antipodal inputs whose \
                    weights cancel); use other weights"
                .into(),
        );
    }
    // m = Σ mᵢxᵢ
    let m: Vec<f64> = mean_c.iter().map(|c| c / mean_norm).collect();
    // v = Σ wᵢ(uᵢ − (uᵢ·m) m) = Σ wᵢ invᵢ xᵢ − (Σ wᵢ uᵢ·m) m
    let mut proj = 0.0;
    for i in 0..n {
        let unit_i: Vec<f64> = (0..n).map(|j| if j == i { inv[i] } else { 0.0 }).collect();
        proj += weights[i] * quad(&unit_i, &m);
    }
    let v: Vec<f64> = (0..n).map(|i| weights[i] * inv[i] - proj * m[i]).collect();
    let v_norm = quad(&v, &v).max(0.0).sqrt() + eps;
    let avg_norm: f64 = norms.iter().zip(weights).map(|(n, w)| n * w).sum();
    let (cm, cv) = (v_norm.cos(), v_norm.sin() / v_norm);
    let c: Vec<f64> = (0..n).map(|i| (cm * m[i] + cv * v[i]) * avg_norm).collect();
    Ok(weighted_sum(xs, &c))
}

impl MergeMethod for Multislerp {
    fn name(&self) -> &'static str {
        "multislerp"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[
            ParamSpec::flag("normalize_weights", true),
            ParamSpec::optional("eps", 1e-8),
        ];
        P
    }

    fn model_parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::required("weight")];
        P
    }

    fn separates_base(&self) -> bool {
        true
    }

    fn min_models(&self) -> usize {
        2
    }

    fn scratch_tensors(&self, n_models: usize) -> usize {
        // the task vectors (with a base) and the output
        n_models + 1
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let n = x.models.len();
        let mut weights: Vec<f64> = (0..n).map(|i| x.model_param(i, "weight")).collect();
        if x.flag("normalize_weights") {
            let total: f64 = weights.iter().sum();
            weights.iter_mut().for_each(|w| *w /= total);
        }
        let eps = x.param("eps");
        let mut all: Vec<&Tensor> = x.base.into_iter().collect();
        all.extend(x.models);
        let out = with_f32_slices(&all, |s| {
            let (base, models) = match x.base {
                Some(_) => (Some(s[0]), &s[1..]),
                None => (None, s),
            };
            let deltas: Vec<Vec<f32>>;
            let xs: Vec<&[f32]> = match base {
                None => models.to_vec(),
                Some(b) => {
                    deltas = models
                        .iter()
                        .map(|m| m.par_iter().zip(b).map(|(m, b)| m - b).collect())
                        .collect();
                    deltas.iter().map(Vec::as_slice).collect()
                }
            };
            let mut out = multislerp(&xs, &weights, eps)
                .map_err(|e| Error::Msg(format!("multislerp, tensor `{}`: {e}", x.name)))?;
            if let Some(b) = base {
                out.par_iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
            Ok(out)
        })?;
        tensor_like(out, &x.models[0])
    }
}
