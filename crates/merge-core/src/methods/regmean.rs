//! `regmean`: Regression Mean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging
//! Weights of Language Models").
//!
//! Every linear layer is merged into the weight whose outputs are closest, in least squares,
//! to each model's own outputs on that model's calibration inputs. With `Gᵢ` the Gram matrix
//! of model i's inputs to the layer (`[in, in]`) and `Wᵢ` its weight (PyTorch layout
//! `[out, in]`):
//!
//! W* = ((Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢᵀ)ᵀ,   G̃ᵢ = α·Gᵢ + (1−α)·diag(Gᵢ)
//!
//! `alpha` (α, default 0.9) scales the off-diagonal entries (the paper's remedy for
//! performance degeneration; the authors and FusionBench tune it per setting, FusionBench's
//! GPT-2 config uses 0.6). Each `Gᵢ` is the model's mean over its calibration tokens (the sum
//! `llm-merging stats` stores, divided by its token count, as the authors' code does with
//! `regmean_mean`), so models weigh equally whatever their number of tokens. The system is
//! solved in f64 by Cholesky (Σ G̃ᵢ is symmetric positive definite when every input feature
//! varies); a singular one falls back to the pseudo-inverse, with a warning.
//!
//! Tensors without statistics (embeddings, norms, the head: not inputs of a block's linear
//! layers) are the plain mean of the models, as in the authors' code.
//!
//! Each model's `[[merge.models]]` entry names its statistics directory with `stats`:
//!
//! ```toml
//! [merge]
//! method = "regmean"
//! [merge.parameters]
//! alpha = 0.9
//! [[merge.models]]
//! model = "org/expert-a"
//! stats = "stats/expert-a"   # llm-merging stats --model org/expert-a --data calib.csv --out stats/expert-a
//! [[merge.models]]
//! model = "org/expert-b"
//! stats = "stats/expert-b"
//! ```

use candle_core::{Result, Tensor};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

use super::{MergeMethod, ParamSpec, Params, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices};

/// Regression Mean; see the module docs.
pub struct RegMean;

impl MergeMethod for RegMean {
    fn name(&self) -> &'static str {
        "regmean"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::optional("alpha", 0.9)];
        P
    }

    fn uses_input_statistics(&self) -> bool {
        true
    }

    fn scratch_tensors(&self, n_models: usize) -> usize {
        // Per model a Gram matrix (up to in/out ≈ 2.7 times the weight for a down projection)
        // and the f64 systems: a generous bound.
        6 * n_models + 8
    }

    fn check_params(
        &self,
        params: &Params,
        _model_params: &[Params],
    ) -> std::result::Result<(), String> {
        let alpha = params.number("alpha");
        if !(0.0..=1.0).contains(&alpha) {
            return Err(format!("alpha must be in [0, 1], got {alpha}"));
        }
        Ok(())
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let models: Vec<&Tensor> = x.models.iter().collect();
        let Some(grams) = x.grams else {
            let n = models.len() as f32;
            let out = with_f32_slices(&models, |m| {
                let mut out = vec![0f32; m[0].len()];
                for w in m {
                    out.iter_mut().zip(w.iter()).for_each(|(o, v)| *o += v);
                }
                out.iter_mut().for_each(|o| *o /= n);
                Ok(out)
            })?;
            return tensor_like(out, &x.models[0]);
        };
        let (rows, cols) = x.models[0].dims2()?;
        let grams: Vec<&Tensor> = grams.iter().collect();
        let alpha = x.param("alpha");
        let out = with_f32_slices(&models, |weights| {
            with_f32_slices(&grams, |grams| {
                Ok(regmean_solve(weights, grams, rows, cols, alpha, x.name))
            })
        })?;
        tensor_like(out, &x.models[0])
    }
}

/// The RegMean weight (`[rows, cols]`, row-major) of weights `weights` (each `[rows, cols]`)
/// with input Gram matrices `grams` (each `[cols, cols]`) and off-diagonal scale `alpha`;
/// `name` is for the warning on a singular system.
pub fn regmean_solve(
    weights: &[&[f32]],
    grams: &[&[f32]],
    rows: usize,
    cols: usize,
    alpha: f64,
    name: &str,
) -> Vec<f32> {
    let n = cols;
    let mut a = Mat::<f64>::zeros(n, n);
    let mut b = Mat::<f64>::zeros(n, rows);
    for (w, g) in weights.iter().zip(grams) {
        let scaled = Mat::<f64>::from_fn(n, n, |i, j| {
            let v = f64::from(g[i * n + j]);
            if i == j {
                v
            } else {
                alpha * v
            }
        });
        // Wᵢᵀ: `[in, out]`.
        let wt = Mat::<f64>::from_fn(n, rows, |i, o| f64::from(w[o * n + i]));
        a += &scaled;
        b += &scaled * &wt;
    }
    let solved = match a.llt(Side::Lower) {
        Ok(llt) => llt.solve(&b),
        Err(_) => {
            tracing::warn!(
                "regmean: the summed Gram matrix of `{name}` is not positive definite (an \
                 input feature never varies?); solving with its pseudo-inverse"
            );
            match a.self_adjoint_eigen(Side::Lower) {
                Ok(eig) => eig.pseudoinverse() * &b,
                Err(_) => a.partial_piv_lu().solve(&b),
            }
        }
    };
    let mut out = vec![0f32; rows * cols];
    for (o, row) in out.chunks_exact_mut(cols).enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = solved[(i, o)] as f32;
        }
    }
    out
}
