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

use super::{MergeMethod, ParamSpec, TensorInputs};

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

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let weights: Vec<f64> = (0..x.models.len())
            .map(|i| x.model_param(i, "weight"))
            .collect();
        let mut acc = x.models[0].affine(weights[0], 0.0)?;
        for (m, w) in x.models.iter().zip(&weights).skip(1) {
            acc = (acc + m.affine(*w, 0.0)?)?;
        }
        if x.param("normalize") != 0.0 {
            let total: f64 = weights.iter().sum();
            if total.abs() < 1e-12 {
                candle_core::bail!("linear: the weights sum to zero, cannot normalize");
            }
            acc = acc.affine(1.0 / total, 0.0)?;
        }
        Ok(acc)
    }
}
