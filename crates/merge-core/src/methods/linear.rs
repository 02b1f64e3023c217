//! `linear`: a weighted average of the models (Wortsman et al. 2022, "Model soups").
//!
//! out = Σᵢ wᵢ·θᵢ, divided by Σᵢ wᵢ when `normalize` (default true).
//!
//! Parameters: per model `weight` (required); global `normalize` (default true).
//! The base model, if named, is not an input (it still provides config and tokenizer).
//!
//! ```toml
//! [merge]
//! method = "linear"
//! [[merge.models]]
//! model = "TinyLlama/TinyLlama_v1.1"
//! parameters = { weight = 0.8 }
//! [[merge.models]]
//! model = "TinyLlama/TinyLlama_v1.1_math_code"
//! parameters = { weight = 0.2 }
//! ```

use candle_core::{Result, Tensor};

use rayon::prelude::*;

use super::{tensor_like, with_f32_slices, MergeMethod, ParamSpec, TensorInputs, CHUNK};

/// Weighted average; see the module docs.
pub struct Linear;

impl MergeMethod for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::optional("normalize", 1.0)];
        P
    }

    fn model_parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::required("weight")];
        P
    }

    fn scratch_tensors(&self, _n_models: usize) -> usize {
        1
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let weights: Vec<f32> = (0..x.models.len())
            .map(|i| x.model_param(i, "weight") as f32)
            .collect();
        let divisor = if x.param("normalize") != 0.0 {
            let total: f32 = weights.iter().sum();
            if total.abs() < 1e-12 {
                candle_core::bail!("linear: the weights sum to zero, cannot normalize");
            }
            Some(total)
        } else {
            None
        };
        let inputs: Vec<&Tensor> = x.models.iter().collect();
        // One fused pass into one buffer: no per-model temporaries.
        let out = with_f32_slices(&inputs, |models| {
            let mut out = vec![0f32; models[0].len()];
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                let off = c * CHUNK;
                for (j, o) in o.iter_mut().enumerate() {
                    let mut acc = 0f32;
                    for (m, w) in models.iter().zip(&weights) {
                        acc += m[off + j] * w;
                    }
                    *o = match divisor {
                        Some(d) => acc / d,
                        None => acc,
                    };
                }
            });
            Ok(out)
        })?;
        tensor_like(out, &x.models[0])
    }
}
