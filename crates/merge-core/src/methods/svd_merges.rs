//! The data-free SVD merges: `tsv` (TSV-M), `iso_c` (Iso-C) and `iso_cts` (Iso-CTS). One
//! file: all three decompose task vectors per weight matrix, keep some singular directions,
//! orthogonalise and reconstruct, and share that code.
//!
//! For each tensor, with base θ₀, experts θ₁…θ_T and task vectors δₜ = θₜ − θ₀. A 2-D tensor
//! (m × n, k = min(m, n)) is merged as below; every other tensor (norms, biases) gets the
//! mean task vector, θ₀ + α·(1/T)·Σₜ δₜ, as the papers' code does. Every 2-D tensor counts,
//! embeddings and `lm_head` included (the papers' rule: "per weight matrix").
//!
//! **`iso_c`** — Iso-C, Marczak et al., "No Task Left Behind: Isotropic Model Merging with
//! Common and Task-Specific Subspaces", ICML 2025 (arXiv:2502.04959). Sum the task vectors,
//! Δ = Σₜ δₜ = U·diag(σ)·Vᵀ, and flatten the spectrum to its mean:
//! θ = θ₀ + α·σ̄·U·Vᵀ with σ̄ = (1/k)·Σᵢ σᵢ.
//!
//! **`iso_cts`** — Iso-CTS, same paper. A common subspace from the sum plus task-specific
//! subspaces from what the common one misses, then an isotropic spectrum:
//! 1. sizes: c₀ = ⌊k·f⌋ (f = `common_space_fraction`), the task-specific total
//!    s_tot = round((k − c₀)/T)·T (round half to even, as Python's `round`; at most ⌊k/T⌋·T),
//!    c = k − s_tot common directions and s = s_tot/T per task;
//! 2. common: the top c triplets (U_c, σ_c, V_c) of Δ = Σₜ δₜ;
//! 3. task t: the top s triplets (Uₜ, σₜ, Vₜ) of the residual (I − U_c·U_cᵀ)·δₜ;
//! 4. stack U = [U_c U₁ … U_T] (m × k) and V = [V_c V₁ … V_T] (n × k), orthogonalise each by
//!    its polar factor (X = P·Σ·Qᵀ ↦ P·Qᵀ, the nearest matrix with orthonormal columns);
//! 5. θ = θ₀ + α·σ̄·U⊥·V⊥ᵀ, σ̄ the mean of the k kept singular values (σ_c and every σₜ).
//!
//! **`tsv`** — TSV-M, Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
//! Model Merging", CVPR 2025 (arXiv:2412.00081). Each task keeps its top r = ⌊k/T⌋ triplets
//! (Uₜ, σₜ, Vₜ) of δₜ = Uₜ·diag(σₜ)·Vₜᵀ; stack U = [U₁ … U_T] (m × T·r), σ = [σ₁ … σ_T],
//! V = [V₁ … V_T] (n × T·r); orthogonalise (U⊥, V⊥: polar factors, as above) and
//! θ = θ₀ + α·U⊥·diag(σ)·V⊥ᵀ. A matrix with fewer singular directions than models
//! (k < T) is an error.
//!
//! Parameters (global): `alpha` = 1.0 (α; TSV-M's default, and FusionBench's for Iso-C/CTS —
//! the Iso paper tunes it on validation data, typically 1.0–1.6); `iso_cts` also
//! `common_space_fraction` = 0.8 (the paper's default), in [0, 1]. No per-model parameters:
//! the methods weigh tasks equally.
//!
//! The SVDs are full thin SVDs in f32 ([`super::dense_linalg`], faer), O(m·n·k) each: `iso_c`
//! takes one per matrix, `tsv` T + 2, `iso_cts` T + 3. The results are unique whenever the
//! task vectors have full rank (always, for real fine-tunes): singular vectors' signs cancel
//! in every product above.
//!
//! ```toml
//! [merge]
//! method = "tsv"
//! base_model = "meta-llama/Llama-3.1-8B"
//! [merge.parameters]
//! alpha = 1.0
//! [[merge.models]]
//! model = "meta-llama/Llama-3.1-8B-Instruct"
//! [[merge.models]]
//! model = "NousResearch/Hermes-3-Llama-3.1-8B"
//! ```

use candle_core::{Result, Tensor};
use faer::{Mat, MatRef};
use rayon::prelude::*;

use super::dense_linalg::{hcat, polar_factor, scale_cols, thin_svd, to_rows, view_rows};
use super::{MergeMethod, ParamSpec, Params, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tsv,
    IsoC,
    IsoCts,
}

/// One of the SVD merges; see the module docs.
pub struct SvdMerge {
    kind: Kind,
}

/// `tsv`: TSV-M, each task's top ⌊k/T⌋ singular triplets, orthogonalised.
pub static TSV: SvdMerge = SvdMerge { kind: Kind::Tsv };
/// `iso_c`: the summed task vectors' singular vectors with their mean singular value.
pub static ISO_C: SvdMerge = SvdMerge { kind: Kind::IsoC };
/// `iso_cts`: Iso-C's common subspace plus task-specific ones, isotropic spectrum.
pub static ISO_CTS: SvdMerge = SvdMerge { kind: Kind::IsoCts };

/// (c, s): Iso-CTS's common directions and directions per task for k = min(m, n), T tasks
/// and common-space fraction `f` (step 1 of the module docs).
pub fn iso_cts_sizes(k: usize, tasks: usize, f: f64) -> (usize, usize) {
    let c0 = ((k as f64) * f).floor() as usize;
    let per_task = (((k - c0.min(k)) as f64) / tasks as f64).round_ties_even() as usize;
    let per_task = per_task.min(k / tasks);
    (k - per_task * tasks, per_task)
}

/// The merged update (before α) of one m × n matrix from its task vectors.
fn update(kind: Kind, deltas: &[MatRef<'_, f32>], p: &Params) -> Result<Mat<f32>> {
    let (m, n) = deltas[0].shape();
    let k = m.min(n);
    let t = deltas.len();
    let sum = || {
        let mut s = deltas[0].to_owned();
        for d in &deltas[1..] {
            s += d;
        }
        s
    };
    Ok(match kind {
        Kind::IsoC => {
            let svd = thin_svd(sum().as_ref())?;
            let mean = svd.s.iter().sum::<f32>() / k as f32;
            (&svd.u * svd.v.transpose()) * faer::Scale(mean)
        }
        Kind::Tsv => {
            let r = k / t;
            if r == 0 {
                candle_core::bail!(
                    "tsv keeps ⌊min(m, n)/T⌋ singular directions per model: a {m} × {n} matrix has fewer than the {t} models"
                );
            }
            // Each task's SVD on its own rayon task: the T decompositions are independent.
            let parts: Vec<_> = deltas
                .par_iter()
                .map(|d| thin_svd(*d))
                .collect::<std::result::Result<_, _>>()?;
            let trunc: Vec<_> = parts.iter().map(|s| s.truncated(r)).collect();
            let u = hcat(&trunc.iter().map(|x| x.0).collect::<Vec<_>>());
            let v = hcat(&trunc.iter().map(|x| x.2).collect::<Vec<_>>());
            let s: Vec<f32> = trunc.iter().flat_map(|x| x.1.iter().copied()).collect();
            let (u, v) = rayon::join(|| polar_factor(u.as_ref()), || polar_factor(v.as_ref()));
            scale_cols(u?.as_ref(), &s) * v?.transpose()
        }
        Kind::IsoCts => {
            let (c, per_task) = iso_cts_sizes(k, t, p.number("common_space_fraction"));
            let common = thin_svd(sum().as_ref())?;
            let (uc, sc, vc) = common.truncated(c);
            let residuals: Vec<Mat<f32>> = deltas
                .iter()
                .map(|d| d.to_owned() - uc * (uc.transpose() * d))
                .collect();
            let parts: Vec<_> = residuals
                .par_iter()
                .map(|r| thin_svd(r.as_ref()))
                .collect::<std::result::Result<_, _>>()?;
            let trunc: Vec<_> = parts.iter().map(|s| s.truncated(per_task)).collect();
            let us: Vec<_> = std::iter::once(uc)
                .chain(trunc.iter().map(|x| x.0))
                .collect();
            let vs: Vec<_> = std::iter::once(vc)
                .chain(trunc.iter().map(|x| x.2))
                .collect();
            let kept = sc.len() + trunc.iter().map(|x| x.1.len()).sum::<usize>();
            let total: f32 = sc.iter().chain(trunc.iter().flat_map(|x| x.1)).sum();
            let mean = total / kept.max(1) as f32;
            let (u, v) = rayon::join(
                || polar_factor(hcat(&us).as_ref()),
                || polar_factor(hcat(&vs).as_ref()),
            );
            (u? * v?.transpose()) * faer::Scale(mean)
        }
    })
}

impl MergeMethod for SvdMerge {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Tsv => "tsv",
            Kind::IsoC => "iso_c",
            Kind::IsoCts => "iso_cts",
        }
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const ALPHA: &[ParamSpec] = &[ParamSpec::optional("alpha", 1.0)];
        const CTS: &[ParamSpec] = &[
            ParamSpec::optional("alpha", 1.0),
            ParamSpec::optional("common_space_fraction", 0.8),
        ];
        if self.kind == Kind::IsoCts {
            CTS
        } else {
            ALPHA
        }
    }

    fn requires_base(&self) -> bool {
        true
    }

    fn scratch_tensors(&self, n_models: usize) -> usize {
        // task vectors, their SVD factors (U, V), stacked factors and the result
        match self.kind {
            Kind::IsoC => 5,
            Kind::Tsv | Kind::IsoCts => 3 * n_models + 5,
        }
    }

    fn check_params(
        &self,
        params: &Params,
        _model_params: &[Params],
    ) -> std::result::Result<(), String> {
        let alpha = params.number("alpha");
        if !alpha.is_finite() {
            return Err(format!("alpha must be a finite number, got {alpha}"));
        }
        if self.kind == Kind::IsoCts {
            let f = params.number("common_space_fraction");
            if !(0.0..=1.0).contains(&f) {
                return Err(format!("common_space_fraction must be in [0, 1], got {f}"));
            }
        }
        Ok(())
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let base = x.base.expect("requires_base");
        let alpha = x.param("alpha") as f32;
        let mut all: Vec<&Tensor> = vec![base];
        all.extend(x.models.iter());
        let out = with_f32_slices(&all, |s| {
            let (b, models) = (s[0], &s[1..]);
            let deltas: Vec<Vec<f32>> = models
                .iter()
                .map(|m| m.par_iter().zip(b.par_iter()).map(|(m, b)| m - b).collect())
                .collect();
            let delta = match base.dims() {
                &[m, n] if m > 0 && n > 0 => {
                    let views: Vec<MatRef<f32>> =
                        deltas.iter().map(|d| view_rows(d, m, n)).collect();
                    to_rows(update(self.kind, &views, x.params)?.as_ref())
                }
                _ => {
                    let t = deltas.len() as f32;
                    let mut mean = deltas[0].clone();
                    for d in &deltas[1..] {
                        mean.iter_mut().zip(d).for_each(|(a, d)| *a += d);
                    }
                    mean.iter_mut().for_each(|a| *a /= t);
                    mean
                }
            };
            Ok(b.iter().zip(&delta).map(|(b, d)| b + alpha * d).collect())
        })
        .map_err(|e| candle_core::Error::Msg(format!("{}: `{}`: {e}", self.name(), x.name)))?;
        tensor_like(out, base)
    }
}

#[cfg(test)]
mod tests {
    use super::iso_cts_sizes;

    #[test]
    fn iso_cts_sizes_follow_the_paper_rounding() {
        // k = 16, T = 3, f = 0.8: c₀ = 12, round(4/3)·3 = 3 → c = 13, s = 1.
        assert_eq!(iso_cts_sizes(16, 3, 0.8), (13, 1));
        // k = 16, T = 2, f = 0.8: round(4/2)·2 = 4 → c = 12, s = 2.
        assert_eq!(iso_cts_sizes(16, 2, 0.8), (12, 2));
        // half to even: k = 10, T = 2, f = 0.5 → round(2.5) = 2 → c = 6.
        assert_eq!(iso_cts_sizes(10, 2, 0.5), (6, 2));
        // never more task directions than fit: k = 7, T = 2, f = 0 → round(3.5) = 4 > 3.
        assert_eq!(iso_cts_sizes(7, 2, 0.0), (1, 3));
        assert_eq!(iso_cts_sizes(4096, 8, 0.8), (3280, 102));
    }
}
