//! Merge methods: one file per family behind one small trait, listed in one registry.
//!
//! A method sees one tensor at a time: the base model's tensor (if the config names a base),
//! every input model's tensor (adapters already applied), all in f32, and the parameters
//! resolved for this tensor (per-layer gradients and name filters already evaluated).
//!
//! # Adding a method
//! Write `methods/my_method.rs` with a unit struct implementing [`MergeMethod`], then add one
//! line to [`REGISTRY`]:
//!
//! ```
//! use candle_core::{Result, Tensor};
//! use merge_core::methods::{MergeMethod, ParamSpec, TensorInputs};
//!
//! /// Task arithmetic whose task vectors are clipped to ±`clip`.
//! pub struct ClippedTaskArithmetic;
//!
//! impl MergeMethod for ClippedTaskArithmetic {
//!     fn name(&self) -> &'static str { "clipped_task_arithmetic" }
//!     fn parameters(&self) -> &'static [ParamSpec] {
//!         const P: &[ParamSpec] = &[ParamSpec::optional("clip", 0.01)];
//!         P
//!     }
//!     fn model_parameters(&self) -> &'static [ParamSpec] {
//!         const P: &[ParamSpec] = &[ParamSpec::required("weight")];
//!         P
//!     }
//!     fn requires_base(&self) -> bool { true }
//!     fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
//!         let base = x.base.expect("requires_base");
//!         let clip = x.param("clip");
//!         let mut out = base.clone();
//!         for (i, m) in x.models.iter().enumerate() {
//!             let tv = (m - base)?.clamp(-clip, clip)?;
//!             out = (out + tv.affine(x.model_param(i, "weight"), 0.0)?)?;
//!         }
//!         Ok(out)
//!     }
//! }
//! ```

mod linear;

use std::collections::BTreeMap;

use candle_core::{Result, Tensor};

pub use linear::Linear;

/// A declared parameter: its name and default (`None` = required).
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    /// mergekit's parameter name.
    pub name: &'static str,
    /// Default value; `None` when the user must give it.
    pub default: Option<f64>,
}

impl ParamSpec {
    /// A parameter the config must set.
    pub const fn required(name: &'static str) -> Self {
        ParamSpec {
            name,
            default: None,
        }
    }

    /// A parameter with a default (booleans: 1.0 true, 0.0 false).
    pub const fn optional(name: &'static str, default: f64) -> Self {
        ParamSpec {
            name,
            default: Some(default),
        }
    }
}

/// Parameters resolved for one tensor.
pub type Params = BTreeMap<&'static str, f64>;

/// What a method gets for one tensor.
pub struct TensorInputs<'a> {
    /// Output tensor name.
    pub name: &'a str,
    /// The base model's tensor (f32), when the config names a base.
    pub base: Option<&'a Tensor>,
    /// The input models' tensors (f32), in config order.
    pub models: &'a [Tensor],
    /// Global parameters.
    pub params: &'a Params,
    /// Per-model parameters, in config order.
    pub model_params: &'a [Params],
    /// Seed for this tensor (the config seed mixed with the tensor name), for random methods.
    pub seed: u64,
}

impl TensorInputs<'_> {
    /// A global parameter (declared by the method, so always present).
    pub fn param(&self, name: &str) -> f64 {
        *self
            .params
            .get(name)
            .unwrap_or_else(|| panic!("parameter `{name}` is not declared by the method"))
    }

    /// A per-model parameter of model `i`.
    pub fn model_param(&self, i: usize, name: &str) -> f64 {
        *self.model_params[i]
            .get(name)
            .unwrap_or_else(|| panic!("model parameter `{name}` is not declared by the method"))
    }
}

/// A merge method. See the module docs for how to add one.
pub trait MergeMethod: Send + Sync {
    /// The name configs use (mergekit's, where mergekit has the method).
    fn name(&self) -> &'static str;
    /// Global parameters (set under `[merge.parameters]`).
    fn parameters(&self) -> &'static [ParamSpec] {
        &[]
    }
    /// Per-model parameters (set under `[merge.models.parameters]`, or globally for all).
    fn model_parameters(&self) -> &'static [ParamSpec] {
        &[]
    }
    /// Whether the config must name a `base_model`.
    fn requires_base(&self) -> bool {
        false
    }
    /// Merge one tensor. Inputs are f32; the output must have the base's (or first model's)
    /// shape and is cast to the output dtype by the caller.
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor>;
}

/// Every method, by name. Adding a method: one file above and one line here.
pub static REGISTRY: &[&dyn MergeMethod] = &[&Linear];

/// The method called `name`.
pub fn lookup(name: &str) -> Option<&'static dyn MergeMethod> {
    REGISTRY.iter().copied().find(|m| m.name() == name)
}

/// All method names.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|m| m.name()).collect()
}
