//! `slerp`: spherical linear interpolation between the base and one other model
//! (Shoemake 1985, "Animating rotation with quaternion curves"; as used for model merging by
//! mergekit).
//!
//! Each tensor is one vector. With a = base, b = the other model, â, b̂ their unit vectors
//! (a norm ≤ 1e-8 counts as 1), d = â·b̂ clamped to [−1, 1] and θ = acos d:
//!
//! out = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b,
//!
//! and out = (1−t)·a + t·b when |d| > 0.9995 (near-colinear or antipodal tensors, where the
//! formula loses precision).
//!
//! Parameters: `t` (global, required; 0 = base, 1 = the other model), usually a gradient
//! across layers, with name filters for attention and MLP as in mergekit's examples.
//! Needs `base_model` and exactly one other model; a `[[merge.models]]` entry naming the
//! base is the base.
//!
//! ```toml
//! [merge]
//! method = "slerp"
//! base_model = "meta-llama/Meta-Llama-3-8B-Instruct"
//! [merge.parameters]
//! t = [{ filter = "self_attn", value = [0.0, 0.5, 0.3, 0.7, 1.0] }, { value = 0.5 }]
//! [[merge.models]]
//! model = "NousResearch/Hermes-2-Pro-Llama-3-8B"
//! ```

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{MergeMethod, ParamSpec, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices, CHUNK};

/// Above this |cos θ| the two tensors are treated as colinear and interpolated linearly.
pub const DOT_THRESHOLD: f64 = 0.9995;
/// Norms at or below this count as 1 (a zero tensor has no direction).
const NORM_EPS: f64 = 1e-8;

/// Spherical interpolation; see the module docs.
pub struct Slerp;

/// The coefficients (of a, of b) for interpolating a and b at t.
pub fn slerp_coefficients(a: &[f32], b: &[f32], t: f64) -> (f64, f64) {
    let unit = |n: f64| if n > NORM_EPS { n } else { 1.0 };
    spherical_coefficients(dots(a, b), t, unit, |d| d.abs() > DOT_THRESHOLD)
}

/// (Σa², Σb², Σab) in f64.
pub fn dots(a: &[f32], b: &[f32]) -> (f64, f64, f64) {
    a.par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(x, y)| {
            let mut s = (0f64, 0f64, 0f64);
            for (x, y) in x.iter().zip(y) {
                let (x, y) = (f64::from(*x), f64::from(*y));
                s.0 += x * x;
                s.1 += y * y;
                s.2 += x * y;
            }
            s
        })
        .reduce(|| (0.0, 0.0, 0.0), |p, q| (p.0 + q.0, p.1 + q.1, p.2 + q.2))
}

/// The spherical interpolation coefficients (of a, of b) at t from a and b's [`dots`]:
/// sin((1−t)θ)/sin θ and sin(tθ)/sin θ, with θ the angle between a and b. `unit_norm` maps a
/// norm to the one a vector is divided by (how a near-zero vector is treated), and where
/// `colinear(cos θ)` holds the result is the linear (1 − t, t) instead. `slerp` and `nuslerp`
/// differ only in these two rules.
pub fn spherical_coefficients(
    (aa, bb, ab): (f64, f64, f64),
    t: f64,
    unit_norm: impl Fn(f64) -> f64,
    colinear: impl Fn(f64) -> bool,
) -> (f64, f64) {
    let dot = (ab / (unit_norm(aa.sqrt()) * unit_norm(bb.sqrt()))).clamp(-1.0, 1.0);
    if colinear(dot) {
        return (1.0 - t, t);
    }
    let theta = dot.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

impl MergeMethod for Slerp {
    fn name(&self) -> &'static str {
        "slerp"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::required("t")];
        P
    }

    fn requires_base(&self) -> bool {
        true
    }

    fn max_models(&self) -> Option<usize> {
        Some(1)
    }

    fn scratch_tensors(&self, _n_models: usize) -> usize {
        1
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let base = x.base.expect("requires_base");
        let t = x.param("t");
        let out = with_f32_slices(&[base, &x.models[0]], |s| {
            let (a, b) = (s[0], s[1]);
            let (ca, cb) = slerp_coefficients(a, b, t);
            let (ca, cb) = (ca as f32, cb as f32);
            let mut out = vec![0f32; a.len()];
            out.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(o, (a, b))| {
                    for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                        *o = ca * a + cb * b;
                    }
                });
            Ok(out)
        })?;
        tensor_like(out, base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_unit_vectors_stay_on_the_circle() {
        let (ca, cb) = slerp_coefficients(&[1.0, 0.0], &[0.0, 1.0], 0.5);
        let (x, y) = (ca, cb);
        assert!((x * x + y * y - 1.0).abs() < 1e-12);
        assert!((x - y).abs() < 1e-12);
    }

    #[test]
    fn colinear_tensors_fall_back_to_linear() {
        assert_eq!(
            slerp_coefficients(&[1.0, 2.0], &[2.0, 4.0], 0.3),
            (0.7, 0.3)
        );
        assert_eq!(
            slerp_coefficients(&[1.0, 2.0], &[-1.0, -2.0], 0.3),
            (0.7, 0.3)
        );
    }
}
