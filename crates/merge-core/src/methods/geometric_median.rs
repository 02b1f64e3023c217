//! `geometric_median`: the base plus the geometric median of the task vectors, found by
//! Weiszfeld's algorithm (Weiszfeld 1937; the smoothed form of Pillutla, Kakade & Harchaoui
//! 2022, "Robust aggregation for federated learning", arXiv:1912.13445). The LLM Merging
//! Competition's most creative entry merged 20 Flan-T5 LoRA task vectors this way.
//!
//! Each tensor's task vectors δᵢ = θᵢ − θ₀ are points; the median z minimises
//! Σᵢ wᵢ‖δᵢ − z‖. Starting at the weighted mean, each step sets
//!
//! z ← Σᵢ βᵢ δᵢ / Σᵢ βᵢ,   βᵢ = wᵢ / max(‖δᵢ − z‖, eps),
//!
//! until a step moves z by less than 1e-7 of its norm (f32 resolution), or `max_iter` steps. Unlike
//! the mean, one far-off expert moves the median by a bounded amount. Output θ₀ + z.
//!
//! Parameters: global `eps` (default 1e-6: the distance floor that keeps a step defined when
//! z reaches an input), `max_iter` (default 100); per model `weight` (default 1.0).
//! Needs `base_model`.
//!
//! ```toml
//! [merge]
//! method = "geometric_median"
//! base_model = "google/flan-t5-xl"
//! parameters = { eps = 1e-6, max_iter = 100 }
//! [[merge.models]]
//! model = "lorahub/flan_t5_xl-wiki_qa_Is_This_True_"
//! [[merge.models]]
//! model = "lorahub/flan_t5_xl-kilt_tasks_hotpotqa_complex_question"
//! [[merge.models]]
//! model = "lorahub/flan_t5_xl-duorc_SelfRC_answer_question"
//! ```

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{MergeMethod, ParamSpec, Params, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices, CHUNK};

/// Geometric median of task vectors; see the module docs.
pub struct GeometricMedian;

/// Weiszfeld's algorithm on `points` (all the same length) with `weights`; returns the
/// median and the number of steps taken. Accumulates in f64.
pub fn weiszfeld(
    points: &[&[f32]],
    weights: &[f64],
    eps: f64,
    max_iter: usize,
) -> (Vec<f32>, usize) {
    let n = points[0].len();
    let combine = |betas: &[f64]| -> Vec<f32> {
        let total: f64 = betas.iter().sum();
        let mut z = vec![0f32; n];
        z.par_chunks_mut(CHUNK).enumerate().for_each(|(c, zc)| {
            let off = c * CHUNK;
            for (j, zj) in zc.iter_mut().enumerate() {
                let s: f64 = points
                    .iter()
                    .zip(betas)
                    .map(|(p, b)| b * f64::from(p[off + j]))
                    .sum();
                *zj = (s / total) as f32;
            }
        });
        z
    };
    let distances = |z: &[f32]| -> Vec<f64> {
        points
            .iter()
            .map(|p| {
                p.par_chunks(CHUNK)
                    .zip(z.par_chunks(CHUNK))
                    .map(|(p, z)| {
                        p.iter()
                            .zip(z)
                            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                            .sum::<f64>()
                    })
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    };
    let norm = |v: &[f32], w: &[f32]| -> f64 {
        v.par_chunks(CHUNK)
            .zip(w.par_chunks(CHUNK))
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            .sqrt()
    };
    let mut z = combine(weights);
    let mut d = distances(&z);
    let mut steps = 0;
    while steps < max_iter {
        let betas: Vec<f64> = weights
            .iter()
            .zip(&d)
            .map(|(w, d)| w / d.max(eps))
            .collect();
        let next = combine(&betas);
        steps += 1;
        let step = norm(&next, &z);
        let size = next
            .par_iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        z = next;
        // Converged once a step no longer moves z at f32 resolution.
        if step <= 1e-7 * size.max(eps) {
            break;
        }
        d = distances(&z);
    }
    (z, steps)
}

impl MergeMethod for GeometricMedian {
    fn name(&self) -> &'static str {
        "geometric_median"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[
            ParamSpec::optional("eps", 1e-6),
            ParamSpec::optional("max_iter", 100.0),
        ];
        P
    }

    fn model_parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::optional("weight", 1.0)];
        P
    }

    fn requires_base(&self) -> bool {
        true
    }

    fn scratch_tensors(&self, n_models: usize) -> usize {
        n_models + 2
    }

    fn check_params(
        &self,
        params: &Params,
        model_params: &[Params],
    ) -> std::result::Result<(), String> {
        if params.number("eps") <= 0.0 {
            return Err("eps must be positive".into());
        }
        if params.number("max_iter") < 0.0 {
            return Err("max_iter must not be negative".into());
        }
        let weight = |p: &Params| p.number("weight");
        if model_params.iter().any(|p| weight(p) < 0.0)
            || model_params.iter().all(|p| weight(p) == 0.0)
        {
            return Err("weights must be non-negative and not all zero".into());
        }
        Ok(())
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let base = x.base.expect("requires_base");
        let weights: Vec<f64> = (0..x.models.len())
            .map(|i| x.model_param(i, "weight"))
            .collect();
        let eps = x.param("eps");
        let max_iter = x.param("max_iter") as usize;
        let mut all: Vec<&Tensor> = vec![base];
        all.extend(x.models.iter());
        let out = with_f32_slices(&all, |s| {
            let b = s[0];
            let deltas: Vec<Vec<f32>> = s[1..]
                .iter()
                .map(|m| m.par_iter().zip(b.par_iter()).map(|(m, b)| m - b).collect())
                .collect();
            let points: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
            let (mut z, _) = weiszfeld(&points, &weights, eps, max_iter);
            z.par_iter_mut()
                .zip(b.par_iter())
                .for_each(|(z, b)| *z += b);
            Ok(z)
        })?;
        tensor_like(out, base)
    }
}
