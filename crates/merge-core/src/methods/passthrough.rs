//! `passthrough`: one model, copied (optionally scaled per tensor) — mergekit 0.1.5
//! `passthrough.py`, restricted to same-shape outputs.
//!
//! out = s · θ, with s the model's `scale` for the tensor (default 1: unchanged).
//!
//! mergekit's passthrough is mostly used with `slices:` to stack layers of several models
//! (frankenmerges). Output layers that differ in number or order from the input's change the
//! architecture, which the ≤8B / one-architecture rule forbids, so configs with `slices:` are
//! rejected by the config reader with an error saying so; what remains is a model copied
//! whole (a dtype conversion, a re-upload, or a tensor scaled by a name filter).
//!
//! Parameters: per model `scale` (default 1.0; mergekit's default `None` means the same).
//! Exactly one input; a named `base_model` counts as one (as in mergekit). When that one input
//! is the base itself (named as `base_model` and listed under `models`), it is copied unscaled:
//! the base takes no per-model parameters here.
//!
//! ```toml
//! [merge]
//! method = "passthrough"
//! dtype = "bfloat16"
//! [[merge.models]]
//! model = "meta-llama/Llama-3.2-3B-Instruct"
//! parameters = { scale = [{ filter = "lm_head", value = 0.9 }, { value = 1.0 }] }
//! ```

use candle_core::{Result, Tensor};

use super::{MergeMethod, ParamSpec, TensorInputs};

/// Passthrough of one model; see the module docs.
pub struct Passthrough;

impl MergeMethod for Passthrough {
    fn name(&self) -> &'static str {
        "passthrough"
    }

    fn model_parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::optional("scale", 1.0)];
        P
    }

    fn base_is_input(&self) -> bool {
        true
    }

    fn max_models(&self) -> Option<usize> {
        Some(1)
    }

    fn scratch_tensors(&self, _n_models: usize) -> usize {
        1
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        match (x.models.first(), x.base) {
            (Some(m), _) => {
                let scale = x.model_param(0, "scale");
                if scale == 1.0 {
                    Ok(m.clone())
                } else {
                    m.affine(scale, 0.0)
                }
            }
            (None, Some(base)) => Ok(base.clone()),
            (None, None) => candle_core::bail!("passthrough: no input model"),
        }
    }
}
