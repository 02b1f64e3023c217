//! `model_stock`: interpolate from the base towards the experts' average by an amount set by
//! the angle between their task vectors (Jang et al. 2024, "Model Stock: All we need is just
//! a few fine-tuned models", arXiv:2403.19522).
//!
//! With base θ₀, N experts θᵢ, task vectors δᵢ = θᵢ − θ₀ and c the mean over pairs i < j of
//! cos(δᵢ, δⱼ) = δᵢ·δⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6) clamped to [−1, 1]:
//!
//! t = N·c / (1 + (N−1)·c),   θ = t·mean(θᵢ) + (1−t)·θ₀,
//!
//! keeping the base (t = 0) where 1 + (N−1)·c is within 1e-6 of zero.
//!
//! Parameters: `filter_wise` (global, default false): compute c and t per row (output
//! filter) instead of per tensor. Needs `base_model` and at least two other models.
//!
//! ```toml
//! [merge]
//! method = "model_stock"
//! base_model = "meta-llama/Llama-2-7b-hf"
//! [[merge.models]]
//! model = "meta-llama/Llama-2-7b-chat-hf"
//! [[merge.models]]
//! model = "lmsys/vicuna-7b-v1.5"
//! [[merge.models]]
//! model = "WizardLMTeam/WizardLM-7B-V1.0"
//! ```

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{MergeMethod, ParamSpec, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices};

/// Model Stock; see the module docs.
pub struct ModelStock;

/// The interpolation ratio t for one group of elements (a row or a whole tensor).
fn ratio(base: &[f32], models: &[&[f32]]) -> f64 {
    let n = models.len();
    let delta = |i: usize, j: usize| f64::from(models[i][j]) - f64::from(base[j]);
    let norms: Vec<f64> = (0..n)
        .map(|i| {
            (0..base.len())
                .map(|j| delta(i, j).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mut cos_sum = 0.0;
    let mut pairs = 0usize;
    for a in 0..n {
        for b in a + 1..n {
            let dot: f64 = (0..base.len()).map(|j| delta(a, j) * delta(b, j)).sum();
            cos_sum += (dot / (norms[a] * norms[b]).max(1e-6)).clamp(-1.0, 1.0);
            pairs += 1;
        }
    }
    let cos = cos_sum / pairs as f64;
    let denominator = 1.0 + (n as f64 - 1.0) * cos;
    if denominator.abs() < 1e-6 {
        0.0
    } else {
        n as f64 * cos / denominator
    }
}

impl MergeMethod for ModelStock {
    fn name(&self) -> &'static str {
        "model_stock"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::flag("filter_wise", false)];
        P
    }

    fn requires_base(&self) -> bool {
        true
    }

    fn min_models(&self) -> usize {
        2
    }

    fn scratch_tensors(&self, _n_models: usize) -> usize {
        1
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let base = x.base.expect("requires_base");
        let filter_wise = x.flag("filter_wise");
        let row_len = match (filter_wise, base.dims()) {
            (true, [_, rest @ ..]) if !rest.is_empty() => rest.iter().product(),
            _ => base.elem_count().max(1),
        };
        let mut all: Vec<&Tensor> = vec![base];
        all.extend(x.models.iter());
        let out = with_f32_slices(&all, |s| {
            let (b, models) = (s[0], &s[1..]);
            let n = models.len() as f32;
            let mut out = vec![0f32; b.len()];
            out.par_chunks_mut(row_len).enumerate().for_each(|(r, o)| {
                let range = r * row_len..r * row_len + o.len();
                let rows: Vec<&[f32]> = models.iter().map(|m| &m[range.clone()]).collect();
                let base_row = &b[range];
                let t = ratio(base_row, &rows) as f32;
                for (j, o) in o.iter_mut().enumerate() {
                    let avg = rows.iter().map(|m| m[j]).sum::<f32>() / n;
                    *o = t * avg + (1.0 - t) * base_row[j];
                }
            });
            Ok(out)
        })?;
        tensor_like(out, base)
    }
}
