//! `karcher`: the Karcher (Riemannian, Fréchet) mean of the models on the unit hypersphere,
//! scaled back by their mean norm (Karcher 1977, "Riemannian center of mass and mollifier
//! smoothing"; mergekit 0.1.5 `karcher.py`, <https://arxiv.org/abs/2603.04972>).
//!
//! Each tensor of input i is one vector xᵢ with unit vector uᵢ = xᵢ/‖xᵢ‖ and weight αᵢ = 1/n.
//! Inputs with ‖xᵢ‖ ≤ `tol` are left out of the direction (their weights renormalised among
//! the rest). Starting at m = Σαᵢuᵢ/‖Σαᵢuᵢ‖ (u₁ if that norm is below `tol`), each step
//!
//! v = Σᵢ αᵢ θᵢ/sin θᵢ · (uᵢ − cos θᵢ · m),   cos θᵢ = m·uᵢ  (terms with θᵢ < tol skipped)
//! m ← cos‖v‖ · m + sin‖v‖ · v/‖v‖,  then m ← m/‖m‖,
//!
//! stopping when ‖v‖ < `tol` or after `max_iter` steps. Output (Σ αᵢ‖xᵢ‖) · m; all zero when
//! every input is (near) zero. Plain tensors, not task vectors: the Karcher mean of the
//! weights themselves.
//!
//! Parameters: global `max_iter` (default 10), `tol` (default 1e-5). At least two inputs; a
//! named `base_model` is one of them (as in mergekit, whose karcher merges the base like any
//! model). One input is an error here (mergekit returns it unchanged: nothing to average).
//!
//! ```toml
//! [merge]
//! method = "karcher"
//! parameters = { max_iter = 10, tol = 1e-5 }
//! [[merge.models]]
//! model = "mistralai/Mistral-7B-Instruct-v0.2"
//! [[merge.models]]
//! model = "HuggingFaceH4/zephyr-7b-beta"
//! [[merge.models]]
//! model = "teknium/OpenHermes-2.5-Mistral-7B"
//! ```

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::multislerp::{dot, weighted_sum};
use super::{MergeMethod, ParamSpec, Params, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices, CHUNK};

/// Karcher mean on the hypersphere; see the module docs.
pub struct Karcher;

/// The weighted Karcher mean of `xs` (weights `alphas`), scaled by Σ αᵢ‖xᵢ‖.
pub fn karcher_mean(xs: &[&[f32]], alphas: &[f64], max_iter: usize, tol: f64) -> Vec<f32> {
    let len = xs[0].len();
    let norms: Vec<f64> = xs.iter().map(|x| dot(x, x).sqrt()).collect();
    let valid: Vec<usize> = (0..xs.len()).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; len];
    }
    // Unit vectors in f32, as mergekit keeps them.
    let units: Vec<Vec<f32>> = valid
        .iter()
        .map(|&i| {
            let n = norms[i] as f32;
            xs[i].par_iter().map(|x| x / n).collect()
        })
        .collect();
    let units: Vec<&[f32]> = units.iter().map(Vec::as_slice).collect();
    let alpha_sum: f64 = valid.iter().map(|&i| alphas[i]).sum();
    let a: Vec<f64> = valid.iter().map(|&i| alphas[i] / alpha_sum).collect();
    let mut mean = weighted_sum(&units, &a);
    let mean_norm = dot(&mean, &mean).sqrt();
    if mean_norm < tol {
        mean = units[0].to_vec();
    } else {
        scale(&mut mean, 1.0 / mean_norm);
    }
    for _ in 0..max_iter {
        // v = Σ cᵢ uᵢ + c_m m, with cᵢ = αᵢ θᵢ/sin θᵢ and c_m = −Σ cᵢ cos θᵢ
        let mut c = vec![0f64; units.len()];
        let mut c_mean = 0f64;
        for (i, u) in units.iter().enumerate() {
            let d = dot(&mean, u).clamp(-1.0, 1.0);
            let theta = d.acos();
            if theta < tol {
                continue;
            }
            c[i] = a[i] * theta / theta.sin();
            c_mean -= c[i] * d;
        }
        let mut vectors = units.clone();
        vectors.push(&mean);
        c.push(c_mean);
        let tangent = weighted_sum(&vectors, &c);
        let tn = dot(&tangent, &tangent).sqrt();
        if tn < tol {
            break;
        }
        let next = weighted_sum(&[&mean, &tangent], &[tn.cos(), tn.sin() / tn]);
        mean = next;
        let n = dot(&mean, &mean).sqrt();
        if n > tol {
            scale(&mut mean, 1.0 / n);
        }
    }
    let s: f64 = alphas.iter().zip(&norms).map(|(a, n)| a * n).sum();
    scale(&mut mean, s);
    mean
}

fn scale(v: &mut [f32], s: f64) {
    let s = s as f32;
    v.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|x| *x *= s));
}

impl MergeMethod for Karcher {
    fn name(&self) -> &'static str {
        "karcher"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[
            ParamSpec::optional("max_iter", 10.0),
            ParamSpec::optional("tol", 1e-5),
        ];
        P
    }

    fn base_is_input(&self) -> bool {
        true
    }

    fn min_models(&self) -> usize {
        2
    }

    fn scratch_tensors(&self, n_models: usize) -> usize {
        // a unit vector per input (a named base included), the mean, the tangent, the next mean
        n_models + 4
    }

    fn check_params(&self, params: &Params, _: &[Params]) -> std::result::Result<(), String> {
        let max_iter = params.number("max_iter");
        if max_iter < 0.0 || max_iter.fract() != 0.0 {
            return Err(format!(
                "max_iter must be a whole number ≥ 0, got {max_iter}"
            ));
        }
        Ok(())
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let all: Vec<&Tensor> = x.models.iter().chain(x.base).collect();
        let alphas = vec![1.0 / all.len() as f64; all.len()];
        let max_iter = x.param("max_iter") as usize;
        let tol = x.param("tol");
        let out = with_f32_slices(&all, |s| Ok(karcher_mean(s, &alphas, max_iter, tol)))?;
        tensor_like(out, all[0])
    }
}
