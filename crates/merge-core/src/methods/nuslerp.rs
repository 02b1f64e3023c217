//! `nuslerp`: spherical interpolation of two models, per row, per column or per tensor, with
//! or without a base (mergekit's "NuSLERP", mergekit 0.1.5 `nuslerp.py`; SLERP after
//! Shoemake 1985, "Animating rotation with quaternion curves").
//!
//! With a, b the two models' tensors (task vectors a − θ₀, b − θ₀ when the config names a
//! base θ₀), t = w_b / (w_a + w_b) (0.5 when the weights sum to ~0), and each vector pair
//! (the whole tensor, each row, or each column) interpolated as
//!
//! out = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b,   cos θ = â·b̂ (norms floored at 1e-7),
//!
//! or linearly, (1−t)·a + t·b, where 1 − cos²θ ≤ 1e-16 (colinear). With a base the output
//! is θ₀ + that. Unlike `slerp` the weights are per model and the base is optional.
//!
//! Parameters: per model `weight` (required; gradients and filters as usual); global
//! `nuslerp_flatten` (default true: each tensor is one vector), `nuslerp_row_wise` (default
//! false: without flattening, each row, i.e. the last axis, is a vector; true: each column,
//! the first axis). 1-D tensors are always one vector. Exactly two models besides the base;
//! an entry naming the base is the base.
//!
//! ```toml
//! [merge]
//! method = "nuslerp"
//! base_model = "meta-llama/Llama-3.1-8B"
//! [merge.parameters]
//! nuslerp_flatten = false
//! [[merge.models]]
//! model = "meta-llama/Llama-3.1-8B-Instruct"
//! parameters = { weight = 0.6 }
//! [[merge.models]]
//! model = "NousResearch/Hermes-3-Llama-3.1-8B"
//! parameters = { weight = 0.4 }
//! ```

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::slerp::{dots, spherical_coefficients};
use super::{MergeMethod, ParamSpec, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices, CHUNK};

/// Per-model-weighted spherical interpolation of two models; see the module docs.
pub struct Nuslerp;

/// Norm floor of nuslerp's unit vectors.
const NORM_FLOOR: f64 = 1e-7;
/// nuslerp's `eps`: vectors with 1 − cos²θ at most eps² are interpolated linearly.
const EPS: f64 = 1e-8;

/// nuslerp's coefficients (of a, of b) from a vector pair's [`dots`].
fn coefficients(d: (f64, f64, f64), t: f64) -> (f32, f32) {
    let (ca, cb) =
        spherical_coefficients(d, t, |n| n.max(NORM_FLOOR), |c| 1.0 - c * c <= EPS * EPS);
    (ca as f32, cb as f32)
}

/// Which elements form one interpolated vector.
enum Vectors {
    /// The whole tensor.
    Whole,
    /// Runs of this many contiguous elements (rows: the last axis).
    Rows(usize),
    /// Elements this far apart (columns: the first axis).
    Columns(usize),
}

/// Interpolate `a` and `b` at `t`, vector by vector.
fn interpolate(a: &[f32], b: &[f32], t: f64, vectors: Vectors) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    match vectors {
        Vectors::Whole => {
            let (ca, cb) = coefficients(dots(a, b), t);
            out.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(o, (a, b))| combine(o, a, b, ca, cb));
        }
        Vectors::Rows(len) => {
            out.par_chunks_mut(len)
                .zip(a.par_chunks(len).zip(b.par_chunks(len)))
                .for_each(|(o, (a, b))| {
                    let (ca, cb) = coefficients(row_dots(a, b), t);
                    combine(o, a, b, ca, cb);
                });
        }
        Vectors::Columns(stride) => {
            let mut d = vec![(0f64, 0f64, 0f64); stride];
            for (a, b) in a.chunks(stride).zip(b.chunks(stride)) {
                for ((d, x), y) in d.iter_mut().zip(a).zip(b) {
                    let (x, y) = (f64::from(*x), f64::from(*y));
                    *d = (d.0 + x * x, d.1 + y * y, d.2 + x * y);
                }
            }
            let c: Vec<(f32, f32)> = d.into_iter().map(|d| coefficients(d, t)).collect();
            out.par_chunks_mut(stride)
                .zip(a.par_chunks(stride).zip(b.par_chunks(stride)))
                .for_each(|(o, (a, b))| {
                    for (((o, a), b), (ca, cb)) in o.iter_mut().zip(a).zip(b).zip(&c) {
                        *o = ca * a + cb * b;
                    }
                });
        }
    }
    out
}

/// [`dots`] of one short vector pair, sequentially.
fn row_dots(a: &[f32], b: &[f32]) -> (f64, f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0, 0.0), |d, (x, y)| {
        let (x, y) = (f64::from(*x), f64::from(*y));
        (d.0 + x * x, d.1 + y * y, d.2 + x * y)
    })
}

fn combine(o: &mut [f32], a: &[f32], b: &[f32], ca: f32, cb: f32) {
    for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
        *o = ca * a + cb * b;
    }
}

impl MergeMethod for Nuslerp {
    fn name(&self) -> &'static str {
        "nuslerp"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[
            ParamSpec::flag("nuslerp_flatten", true),
            ParamSpec::flag("nuslerp_row_wise", false),
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

    fn max_models(&self) -> Option<usize> {
        Some(2)
    }

    fn scratch_tensors(&self, _n_models: usize) -> usize {
        // two task vectors (with a base) and the output
        3
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let (wa, wb) = (x.model_param(0, "weight"), x.model_param(1, "weight"));
        let total = wa + wb;
        let t = if total.abs() < 1e-6 { 0.5 } else { wb / total };
        let dims = x.models[0].dims();
        let vectors = match dims.len() {
            _ if x.flag("nuslerp_flatten") => Vectors::Whole,
            0 | 1 => Vectors::Whole,
            _ if x.flag("nuslerp_row_wise") => {
                Vectors::Columns(dims[1..].iter().product::<usize>().max(1))
            }
            _ => Vectors::Rows(dims[dims.len() - 1].max(1)),
        };
        let out = match x.base {
            None => with_f32_slices(&[&x.models[0], &x.models[1]], |s| {
                Ok(interpolate(s[0], s[1], t, vectors))
            })?,
            Some(base) => with_f32_slices(&[base, &x.models[0], &x.models[1]], |s| {
                let delta = |m: &[f32]| -> Vec<f32> {
                    m.par_iter().zip(s[0]).map(|(m, b)| m - b).collect()
                };
                let mut out = interpolate(&delta(s[1]), &delta(s[2]), t, vectors);
                out.par_iter_mut().zip(s[0]).for_each(|(o, b)| *o += b);
                Ok(out)
            })?,
        };
        tensor_like(out, &x.models[0])
    }
}
