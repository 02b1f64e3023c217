//! `ram` and `ramplus_tl`: Reinforced Agent Merging — each element of the merged task vector
//! is the mean of the experts that changed it, and (RAM+, tensor-local) experts whose changes
//! are mostly their own are boosted (arXiv:2601.13572; mergekit 0.1.5 `ram.py`).
//!
//! With task vectors δᵢ = θᵢ − θ₀ and cᵢ = [|δᵢ| > ε] (expert i changed the element), the
//! count k = Σᵢ cᵢ per element, per tensor:
//!
//! `ram`:        out = θ₀ + Σᵢ cᵢ δᵢ / max(k, 1)
//!
//! `ramplus_tl`: for each expert, ρᵢ = #(cᵢ ∧ k > 1) / max(#(cᵢ ∧ k = 1), ε) (shared over
//! unique changes in this tensor) and λᵢ = 1 + r · clamp(ρᵢ, 0, α); then
//! out = θ₀ + Σᵢ cᵢ δᵢ · (λᵢ where k = 1, 1/k where k > 1).
//!
//! Parameters: global `epsilon` (default 1e-5: the smallest change that counts); for
//! `ramplus_tl` also `r` (default 0.1) and `alpha` (default 0.2). Needs `base_model`; an
//! entry naming the base is the base.
//!
//! ```toml
//! [merge]
//! method = "ramplus_tl"
//! base_model = "Qwen/Qwen2.5-7B"
//! parameters = { epsilon = 1e-5, r = 0.1, alpha = 0.2 }
//! [[merge.models]]
//! model = "Qwen/Qwen2.5-7B-Instruct"
//! [[merge.models]]
//! model = "Qwen/Qwen2.5-Coder-7B-Instruct"
//! ```

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{MergeMethod, ParamSpec, TensorInputs};
use crate::tensor::{tensor_like, with_f32_slices, CHUNK};

/// RAM (`plus: false`) or RAM+ tensor-local (`plus: true`); see the module docs.
pub struct Ram {
    plus: bool,
}

/// `ram`.
pub const RAM: Ram = Ram { plus: false };
/// `ramplus_tl`.
pub const RAMPLUS_TL: Ram = Ram { plus: true };

/// Per element: the bit set of experts that changed it (at most 64 experts per merge here).
fn changed(b: &[f32], models: &[&[f32]], eps: f32, j: usize) -> u64 {
    models.iter().enumerate().fold(0u64, |m, (i, x)| {
        m | (u64::from((x[j] - b[j]).abs() > eps) << i)
    })
}

impl MergeMethod for Ram {
    fn name(&self) -> &'static str {
        if self.plus {
            "ramplus_tl"
        } else {
            "ram"
        }
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const BASIC: &[ParamSpec] = &[ParamSpec::optional("epsilon", 1e-5)];
        const PLUS: &[ParamSpec] = &[
            ParamSpec::optional("r", 0.1),
            ParamSpec::optional("alpha", 0.2),
            ParamSpec::optional("epsilon", 1e-5),
        ];
        if self.plus {
            PLUS
        } else {
            BASIC
        }
    }

    fn requires_base(&self) -> bool {
        true
    }

    fn max_models(&self) -> Option<usize> {
        Some(64)
    }

    fn scratch_tensors(&self, _n_models: usize) -> usize {
        1
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let base = x.base.expect("requires_base");
        let mut all = vec![base];
        all.extend(x.models);
        let eps = x.param("epsilon");
        let n = x.models.len();
        let out = with_f32_slices(&all, |s| {
            let (b, models) = (s[0], &s[1..]);
            let eps32 = eps as f32;
            // RAM+: each expert's boost from its shared and unique counts over the tensor.
            let lambda: Vec<f32> = if self.plus {
                let (shared, unique) = (0..b.len())
                    .into_par_iter()
                    .fold(
                        || (vec![0u64; n], vec![0u64; n]),
                        |(mut sh, mut un), j| {
                            let c = changed(b, models, eps32, j);
                            let count = c.count_ones();
                            for i in (0..n).filter(|i| (c >> i) & 1 == 1) {
                                if count > 1 {
                                    sh[i] += 1;
                                } else {
                                    un[i] += 1;
                                }
                            }
                            (sh, un)
                        },
                    )
                    .reduce(
                        || (vec![0u64; n], vec![0u64; n]),
                        |(a, b), (c, d)| {
                            let add = |x: Vec<u64>, y: Vec<u64>| -> Vec<u64> {
                                x.iter().zip(&y).map(|(x, y)| x + y).collect()
                            };
                            (add(a, c), add(b, d))
                        },
                    );
                let (r, alpha) = (x.param("r"), x.param("alpha"));
                shared
                    .iter()
                    .zip(&unique)
                    .map(|(&s, &u)| {
                        let rho = s as f64 / (u as f64).max(eps);
                        (1.0 + r * rho.clamp(0.0, alpha)) as f32
                    })
                    .collect()
            } else {
                vec![1.0; n]
            };
            let mut out = b.to_vec();
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
                let off = k * CHUNK;
                for (j, o) in o.iter_mut().enumerate() {
                    let j = off + j;
                    let c = changed(b, models, eps32, j);
                    let count = c.count_ones();
                    let mut sum = 0f32;
                    for (i, m) in models.iter().enumerate().filter(|(i, _)| (c >> i) & 1 == 1) {
                        let d = m[j] - b[j];
                        sum += if count == 1 {
                            d * lambda[i]
                        } else {
                            d / count as f32
                        };
                    }
                    *o += sum;
                }
            });
            Ok(out)
        })?;
        tensor_like(out, base)
    }
}
