//! The task-arithmetic family: every method that adds (sparsified, sign-elected) task vectors
//! to a base. mergekit's "generalized task arithmetic", with its names, parameters and
//! defaults.
//!
//! For each tensor, with base θ₀ and experts θᵢ:
//! 1. δᵢ = θᵢ − θ₀, sparsified per expert (see [`crate::sparsify`]) with that expert's
//!    `density` (and `gamma` / `epsilon`); `rescale` restores the kept mass;
//! 2. δᵢ ← wᵢ·δᵢ;
//! 3. consensus (TIES' sign election, methods marked "sum"): per element the majority sign
//!    is sign(Σᵢ δᵢ) (≥ 0 counts as +); only δᵢ with that sign count, and the divisor is the
//!    sum of their weights (1 where none agrees). Without consensus the divisor is Σᵢ wᵢ (1
//!    when |Σ wᵢ| < 1e-8);
//! 4. δ = Σ δᵢ (divided by the divisor when `normalize`), times `lambda`;
//! 5. θ = θ₀ + δ.
//!
//! | method | sparsification | consensus | normalize | rescale | paper |
//! |---|---|---|---|---|---|
//! | `task_arithmetic` | none | none | false | false | Ilharco et al. 2023, arXiv:2212.04089 |
//! | `ties` | magnitude | sum | true | false | Yadav et al. 2023, arXiv:2306.01708 |
//! | `dare_linear` | random | none | false | true | Yu et al. 2024, arXiv:2311.03099 |
//! | `dare_ties` | random | sum | false | true | Yu et al. 2024, arXiv:2311.03099 |
//! | `breadcrumbs` | magnitude outliers | none | false | false | Davari & Belilovsky 2023, arXiv:2312.06795 |
//! | `breadcrumbs_ties` | magnitude outliers | sum | false | false | arXiv:2312.06795 |
//! | `della` | DELLA MagPrune | sum | true | true | Deep et al. 2024, arXiv:2406.11617 |
//! | `della_linear` | DELLA MagPrune | none | false | true | arXiv:2406.11617 |
//!
//! Parameters — global: `normalize`, `rescale` (defaults above), `lambda` = 1.0,
//! `int8_mask` = false (accepted for mergekit configs; it only saves memory there, the
//! result is the same). Per model (or global as a default for all): `weight` (required),
//! `density` = 1.0, `gamma` = 0.01 (breadcrumbs), `epsilon` = 0.15 (della).
//! `task_arithmetic` accepts `density` like mergekit but does not sparsify.
//!
//! Random masks (DARE, DELLA) come from the tensor's seed (the config's `seed` mixed with the
//! tensor name) and the expert's position, so the same config gives byte-identical output.
//!
//! ```toml
//! [merge]
//! method = "ties"
//! base_model = "meta-llama/Meta-Llama-3-8B"
//! [merge.parameters]
//! density = 0.5
//! [[merge.models]]
//! model = "meta-llama/Meta-Llama-3-8B-Instruct"
//! parameters = { weight = 0.6 }
//! [[merge.models]]
//! model = "NousResearch/Hermes-2-Pro-Llama-3-8B"
//! parameters = { weight = 0.4, density = 0.7 }
//! ```

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{tensor_like, with_f32_slices, MergeMethod, ParamSpec, Params, TensorInputs, CHUNK};
use crate::sparsify;

/// How task vectors are sparsified before they are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsification {
    /// Keep every element.
    None,
    /// Keep the largest magnitudes (TIES).
    Magnitude,
    /// Drop the largest `gamma` share, then the smallest (Model Breadcrumbs).
    MagnitudeOutliers,
    /// Keep at random with probability `density` (DARE).
    Random,
    /// Keep at random with magnitude-ranked probabilities (DELLA).
    DellaMagprune,
}

/// How the experts' task vectors are reconciled per element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consensus {
    /// TIES sign election by summed (weighted) mass.
    Sum,
}

/// One member of the family; see the module docs.
pub struct TaskArithmeticFamily {
    name: &'static str,
    sparsification: Sparsification,
    consensus: Option<Consensus>,
    params: &'static [ParamSpec],
    model_params: &'static [ParamSpec],
}

const fn shared(normalize: bool, rescale: bool) -> [ParamSpec; 4] {
    [
        ParamSpec::optional("int8_mask", 0.0),
        ParamSpec::optional("normalize", if normalize { 1.0 } else { 0.0 }),
        ParamSpec::optional("rescale", if rescale { 1.0 } else { 0.0 }),
        ParamSpec::optional("lambda", 1.0),
    ]
}

const PER_MODEL: &[ParamSpec] = &[
    ParamSpec::required("weight"),
    ParamSpec::optional("density", 1.0),
];
const PER_MODEL_GAMMA: &[ParamSpec] = &[
    ParamSpec::required("weight"),
    ParamSpec::optional("density", 1.0),
    ParamSpec::optional("gamma", 0.01),
];
const PER_MODEL_EPSILON: &[ParamSpec] = &[
    ParamSpec::required("weight"),
    ParamSpec::optional("density", 1.0),
    ParamSpec::optional("epsilon", 0.15),
];

/// `task_arithmetic`: θ₀ + λ·Σ wᵢ(θᵢ − θ₀).
pub static TASK_ARITHMETIC: TaskArithmeticFamily = TaskArithmeticFamily {
    name: "task_arithmetic",
    sparsification: Sparsification::None,
    consensus: None,
    params: &shared(false, false),
    model_params: PER_MODEL,
};
/// `ties`: magnitude pruning, sign election, disjoint mean.
pub static TIES: TaskArithmeticFamily = TaskArithmeticFamily {
    name: "ties",
    sparsification: Sparsification::Magnitude,
    consensus: Some(Consensus::Sum),
    params: &shared(true, false),
    model_params: PER_MODEL,
};
/// `dare_linear`: random drop and rescale, then a weighted sum.
pub static DARE_LINEAR: TaskArithmeticFamily = TaskArithmeticFamily {
    name: "dare_linear",
    sparsification: Sparsification::Random,
    consensus: None,
    params: &shared(false, true),
    model_params: PER_MODEL,
};
/// `dare_ties`: random drop and rescale, then TIES' sign election.
pub static DARE_TIES: TaskArithmeticFamily = TaskArithmeticFamily {
    name: "dare_ties",
    sparsification: Sparsification::Random,
    consensus: Some(Consensus::Sum),
    params: &shared(false, true),
    model_params: PER_MODEL,
};
/// `breadcrumbs`: drop outliers and small values, then a weighted sum.
pub static BREADCRUMBS: TaskArithmeticFamily = TaskArithmeticFamily {
    name: "breadcrumbs",
    sparsification: Sparsification::MagnitudeOutliers,
    consensus: None,
    params: &shared(false, false),
    model_params: PER_MODEL_GAMMA,
};
/// `breadcrumbs_ties`: breadcrumbs' pruning with TIES' sign election.
pub static BREADCRUMBS_TIES: TaskArithmeticFamily = TaskArithmeticFamily {
    name: "breadcrumbs_ties",
    sparsification: Sparsification::MagnitudeOutliers,
    consensus: Some(Consensus::Sum),
    params: &shared(false, false),
    model_params: PER_MODEL_GAMMA,
};
/// `della`: magnitude-ranked random drop, sign election.
pub static DELLA: TaskArithmeticFamily = TaskArithmeticFamily {
    name: "della",
    sparsification: Sparsification::DellaMagprune,
    consensus: Some(Consensus::Sum),
    params: &shared(true, true),
    model_params: PER_MODEL_EPSILON,
};
/// `della_linear`: magnitude-ranked random drop, weighted sum.
pub static DELLA_LINEAR: TaskArithmeticFamily = TaskArithmeticFamily {
    name: "della_linear",
    sparsification: Sparsification::DellaMagprune,
    consensus: None,
    params: &shared(false, true),
    model_params: PER_MODEL_EPSILON,
};

impl TaskArithmeticFamily {
    /// Sparsify one task vector in place.
    fn sparsify(
        &self,
        delta: &mut [f32],
        row_len: usize,
        p: &Params,
        rescale: bool,
        seed: u64,
    ) -> std::result::Result<(), String> {
        let density = p["density"];
        match self.sparsification {
            Sparsification::None => {}
            Sparsification::Magnitude => sparsify::magnitude(delta, density, rescale),
            Sparsification::MagnitudeOutliers => {
                sparsify::magnitude_outliers(delta, density, p["gamma"], rescale)
            }
            Sparsification::Random => sparsify::bernoulli(delta, density, rescale, seed),
            Sparsification::DellaMagprune => {
                sparsify::della_magprune(delta, row_len, density, p["epsilon"], rescale, seed)?
            }
        }
        Ok(())
    }
}

impl MergeMethod for TaskArithmeticFamily {
    fn name(&self) -> &'static str {
        self.name
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        self.params
    }

    fn model_parameters(&self) -> &'static [ParamSpec] {
        self.model_params
    }

    fn requires_base(&self) -> bool {
        true
    }

    fn scratch_tensors(&self, n_models: usize) -> usize {
        if self.sparsification == Sparsification::None {
            1
        } else {
            // one task vector per expert plus the selection keys
            n_models + 1
        }
    }

    fn check_params(
        &self,
        _params: &Params,
        model_params: &[Params],
    ) -> std::result::Result<(), String> {
        if self.sparsification == Sparsification::DellaMagprune {
            for p in model_params {
                let (d, e) = (p["density"], p["epsilon"]);
                if d < 1.0 && d > 0.0 && (d + e >= 1.0 || d - e <= 0.0) {
                    return Err(format!(
                        "epsilon ({e}) must keep density ± epsilon in (0, 1) (density {d})"
                    ));
                }
            }
        }
        Ok(())
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let base = x.base.expect("requires_base");
        let k = x.models.len();
        let weights: Vec<f32> = (0..k).map(|i| x.model_param(i, "weight") as f32).collect();
        let normalize = x.param("normalize") != 0.0;
        let rescale = x.param("rescale") != 0.0;
        let lambda = x.param("lambda") as f32;
        let row_len = match base.dims() {
            [] => 1,
            [n] => *n,
            [_, rest @ ..] => rest.iter().product(),
        };
        let mut all: Vec<&Tensor> = vec![base];
        all.extend(x.models.iter());
        let out = with_f32_slices(&all, |s| {
            let (b, models) = (s[0], &s[1..]);
            let n = b.len();
            let sum_w: f32 = weights.iter().sum();
            let linear_div = if sum_w.abs() < 1e-8 { 1.0 } else { sum_w };
            if self.sparsification == Sparsification::None && self.consensus.is_none() {
                // One pass, no task-vector buffers.
                let mut out = vec![0f32; n];
                out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                    let off = c * CHUNK;
                    for (j, o) in o.iter_mut().enumerate() {
                        let j = off + j;
                        let mut mixed = 0f32;
                        for (m, w) in models.iter().zip(&weights) {
                            mixed += (m[j] - b[j]) * w;
                        }
                        if normalize {
                            mixed /= linear_div;
                        }
                        if lambda != 1.0 {
                            mixed *= lambda;
                        }
                        *o = b[j] + mixed;
                    }
                });
                return Ok(out);
            }
            // Weighted, sparsified task vectors.
            let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(k);
            for (i, m) in models.iter().enumerate() {
                let mut d: Vec<f32> = m.par_iter().zip(b.par_iter()).map(|(m, b)| m - b).collect();
                self.sparsify(
                    &mut d,
                    row_len,
                    &x.model_params[i],
                    rescale,
                    sparsify::mix_seed(x.seed, i as u64),
                )
                .map_err(candle_core::Error::msg)?;
                deltas.push(d);
            }
            // Combine into the first buffer, a block at a time, expert by expert (vectorisable
            // loops; each element is read before it is written). Weights are applied here,
            // after sparsification, as mergekit does.
            let (first, rest) = deltas.split_first_mut().expect("at least one model");
            let consensus = self.consensus.is_some();
            const BLOCK: usize = 4096;
            first.par_chunks_mut(BLOCK).enumerate().for_each(|(c, o)| {
                let off = c * BLOCK;
                let len = o.len();
                let base = &b[off..off + len];
                let others: Vec<&[f32]> = rest.iter().map(|r| &r[off..off + len]).collect();
                let w0 = weights[0];
                // Σᵢ wᵢδᵢ, in expert order
                let mut total: Vec<f32> = o.iter().map(|v| v * w0).collect();
                for (r, w) in others.iter().zip(&weights[1..]) {
                    for (t, v) in total.iter_mut().zip(r.iter()) {
                        *t += v * w;
                    }
                }
                if !consensus {
                    for ((o, t), b) in o.iter_mut().zip(&total).zip(base) {
                        let mut mixed = *t;
                        if normalize {
                            mixed /= linear_div;
                        }
                        if lambda != 1.0 {
                            mixed *= lambda;
                        }
                        *o = b + mixed;
                    }
                    return;
                }
                // TIES: only values whose sign agrees with the elected sign count.
                let mut mixed = vec![0f32; len];
                let mut div = vec![0f32; len];
                let mut add = |d: &[f32], w: f32| {
                    for j in 0..len {
                        let v = d[j] * w;
                        let agree = if total[j] >= 0.0 { v > 0.0 } else { v < 0.0 };
                        if agree {
                            mixed[j] += v;
                            div[j] += w;
                        }
                    }
                };
                add(o, w0);
                for (r, w) in others.iter().zip(&weights[1..]) {
                    add(r, *w);
                }
                for j in 0..len {
                    let mut m = mixed[j];
                    if normalize {
                        m /= if div[j] == 0.0 { 1.0 } else { div[j] };
                    }
                    if lambda != 1.0 {
                        m *= lambda;
                    }
                    o[j] = base[j] + m;
                }
            });
            deltas.truncate(1);
            Ok(deltas.pop().expect("one buffer"))
        })?;
        tensor_like(out, base)
    }
}
