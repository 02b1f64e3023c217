//! `arcee_fusion`: take the other model's value only where it matters most, by a Tukey fence
//! on an importance score (Arcee AI's "Arcee Fusion", <https://arcee.ai>; mergekit 0.1.5
//! `arcee_fusion.py`).
//!
//! With a the base's tensor and b the other model's, per row r (the last axis; a 1-D tensor
//! is one row), p = softmax(b_r) + 1e-8, q = softmax(a_r) + 1e-8 and
//! KL_r = Σ p log(p/q); each element's importance is s = |b − a| · KL_r. With Q1, Q2, Q3 the
//! quartiles of s over the tensor (order statistics at ⌊q·(n−1)⌋, as mergekit indexes them),
//! the fence is Q2 + 1.5·(Q3 − Q1) and
//!
//! out = a + (b − a) · [s ≥ fence].
//!
//! mergekit estimates the quartiles of a tensor over 10⁶ elements from a random sample (with
//! replacement, unseeded); here they are always exact, so on such tensors the fence can
//! differ slightly from any one mergekit run, which itself varies run to run.
//!
//! Parameters: none. Needs `base_model` and exactly one other model; an entry naming the
//! base is the base.
//!
//! ```toml
//! [merge]
//! method = "arcee_fusion"
//! base_model = "meta-llama/Llama-3.1-8B-Instruct"
//! [[merge.models]]
//! model = "arcee-ai/Llama-3.1-SuperNova-Lite"
//! ```

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{MergeMethod, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices};

/// Arcee Fusion; see the module docs.
pub struct ArceeFusion;

/// Added to both softmax distributions before the KL divergence.
const SOFTMAX_EPS: f64 = 1e-8;

/// softmax(x) + eps in f64.
fn softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let e: Vec<f64> = x.iter().map(|v| f64::from(v - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s + SOFTMAX_EPS).collect()
}

/// Each element's importance |b − a| · KL(softmax b ‖ softmax a) of its row.
fn importance(a: &[f32], b: &[f32], row: usize) -> Vec<f32> {
    let mut s = vec![0f32; a.len()];
    s.par_chunks_mut(row)
        .zip(a.par_chunks(row).zip(b.par_chunks(row)))
        .for_each(|(s, (a, b))| {
            let (p, q) = (softmax(b), softmax(a));
            let kl: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
            for ((s, a), b) in s.iter_mut().zip(a).zip(b) {
                *s = (f64::from((b - a).abs()) * kl) as f32;
            }
        });
    s
}

/// Q2 + 1.5·(Q3 − Q1) of `s`, quartiles at the sorted indices ⌊q·(n−1)⌋.
fn tukey_fence(s: &[f32]) -> f32 {
    let mut sorted = s.to_vec();
    sorted.par_sort_unstable_by(f32::total_cmp);
    let at = |q: f32| sorted[(q * (sorted.len() - 1) as f32) as usize];
    let (q1, q2, q3) = (at(0.25), at(0.5), at(0.75));
    q2 + 1.5 * (q3 - q1)
}

impl MergeMethod for ArceeFusion {
    fn name(&self) -> &'static str {
        "arcee_fusion"
    }

    fn requires_base(&self) -> bool {
        true
    }

    fn max_models(&self) -> Option<usize> {
        Some(1)
    }

    fn scratch_tensors(&self, _n_models: usize) -> usize {
        // the importance scores, their sorted copy and the output
        3
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let base = x.base.expect("requires_base");
        let row = base.dims().last().copied().unwrap_or(1).max(1);
        let out = with_f32_slices(&[base, &x.models[0]], |t| {
            let (a, b) = (t[0], t[1]);
            let s = importance(a, b, row);
            let fence = tukey_fence(&s);
            Ok(a.par_iter()
                .zip(b)
                .zip(&s)
                .map(|((a, b), s)| if *s >= fence { a + (b - a) } else { *a })
                .collect())
        })?;
        tensor_like(out, base)
    }
}
