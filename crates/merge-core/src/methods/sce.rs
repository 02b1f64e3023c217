//! `sce`: Select, Calculate, Erase — task vectors kept where the experts vary most, weighted
//! by their energy, sign-elected as in TIES (Wan et al. 2024, "FuseChat: Knowledge Fusion of
//! Chat Models", arXiv:2408.07990; mergekit 0.1.5 `sce.py`).
//!
//! With task vectors δᵢ = θᵢ − θ₀ of the n experts, per tensor:
//!
//! 1. Select: where `select_topk` < 1, keep only the ⌊select_topk · nnz⌋ elements with the
//!    largest variance across the experts, σ² = Varᵢ(δᵢ) (population variance; nnz counts
//!    the elements with σ² ≠ 0; ties at the cut-off kept by position); zero the rest in every δᵢ.
//! 2. Calculate: wᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) (1/n each when Σ < 1e-6).
//! 3. Erase: per element, keep δᵢ only where its sign equals that of Σⱼ δⱼ (+ when ≥ 0).
//!
//! out = θ₀ + Σᵢ wᵢ mᵢ δᵢ / max(Σᵢ wᵢ mᵢ, 1e-6), with mᵢ the sign mask of step 3.
//!
//! Parameters: global `select_topk` (default 1.0: select everything), `int8_mask` (default
//! false; mergekit's mask storage type, accepted and without effect here). Needs `base_model`;
//! an entry naming the base is the base.
//!
//! ```toml
//! [merge]
//! method = "sce"
//! base_model = "Qwen/Qwen2.5-7B"
//! parameters = { select_topk = 0.1 }
//! [[merge.models]]
//! model = "Qwen/Qwen2.5-7B-Instruct"
//! [[merge.models]]
//! model = "Qwen/Qwen2.5-Math-7B"
//! ```

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::sparsify::mag_key;
use super::task_arithmetic::agrees_with;
use super::{MergeMethod, ParamSpec, Params, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices, CHUNK};

/// SCE; see the module docs.
pub struct Sce;

/// The population variance across `deltas` per element (f32, as mergekit ranks it).
fn variance(deltas: &[Vec<f32>]) -> Vec<f32> {
    let n = deltas.len() as f64;
    (0..deltas[0].len())
        .into_par_iter()
        .map(|j| {
            let mean = deltas.iter().map(|d| f64::from(d[j])).sum::<f64>() / n;
            let var = deltas
                .iter()
                .map(|d| (f64::from(d[j]) - mean).powi(2))
                .sum::<f64>()
                / n;
            var as f32
        })
        .collect()
}

/// Which elements step 1 keeps: the ⌊density · nnz⌋ largest `var` (ties by position).
fn select_mask(var: &[f32], density: f64) -> Vec<bool> {
    if density >= 1.0 {
        return vec![true; var.len()];
    }
    let nonzero = var.iter().filter(|v| **v != 0.0).count();
    let k = if density <= 0.0 {
        0
    } else {
        (nonzero as f64 * density) as usize
    };
    if k == 0 {
        return vec![false; var.len()];
    }
    let mut keys: Vec<u32> = var.par_iter().map(|v| mag_key(*v)).collect();
    let (_, &mut cut, _) = keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    let above = var.iter().filter(|v| mag_key(**v) > cut).count();
    let mut ties_left = k - above;
    var.iter()
        .map(|v| {
            let key = mag_key(*v);
            let tie = key == cut && ties_left > 0;
            ties_left -= usize::from(tie);
            key > cut || tie
        })
        .collect()
}

impl MergeMethod for Sce {
    fn name(&self) -> &'static str {
        "sce"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[
            ParamSpec::optional("select_topk", 1.0),
            ParamSpec::flag("int8_mask", false),
        ];
        P
    }

    fn requires_base(&self) -> bool {
        true
    }

    fn scratch_tensors(&self, n_models: usize) -> usize {
        n_models + 3
    }

    fn check_params(&self, params: &Params, _: &[Params]) -> std::result::Result<(), String> {
        let k = params.number("select_topk");
        if !k.is_finite() {
            return Err(format!("select_topk must be a number in [0, 1], got {k}"));
        }
        Ok(())
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let base = x.base.expect("requires_base");
        let mut all = vec![base];
        all.extend(x.models);
        let out = with_f32_slices(&all, |s| {
            let (b, models) = (s[0], &s[1..]);
            let mut deltas: Vec<Vec<f32>> = models
                .iter()
                .map(|m| m.par_iter().zip(b).map(|(m, b)| m - b).collect())
                .collect();
            let topk = x.param("select_topk");
            if topk < 1.0 {
                let keep = select_mask(&variance(&deltas), topk);
                for d in &mut deltas {
                    d.par_iter_mut()
                        .zip(&keep)
                        .for_each(|(v, k)| *v = if *k { *v } else { 0.0 });
                }
            }
            let n = deltas.len();
            let energy: Vec<f64> = deltas
                .iter()
                .map(|d| d.par_iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / d.len() as f64)
                .collect();
            let total: f64 = energy.iter().sum();
            let weights: Vec<f32> = if total.abs() < 1e-6 {
                vec![1.0 / n as f32; n]
            } else {
                energy.iter().map(|e| (e / total) as f32).collect()
            };
            let mut out = b.to_vec();
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                let off = c * CHUNK;
                for (j, o) in o.iter_mut().enumerate() {
                    let sum: f32 = deltas.iter().map(|d| d[off + j]).sum();
                    let (mut mixed, mut div) = (0f32, 0f32);
                    for (d, w) in deltas.iter().zip(&weights) {
                        let v = d[off + j];
                        if agrees_with(v, sum) {
                            mixed += v * w;
                            div += w;
                        }
                    }
                    *o += mixed / div.max(1e-6);
                }
            });
            Ok(out)
        })?;
        tensor_like(out, base)
    }
}
