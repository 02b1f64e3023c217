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
//!
//! # Streaming
//! `merge` gets whole tensors in f32. An elementwise method (each output element depends only
//! on the same element of the inputs) can also implement [`MergeMethod::merge_streaming`]
//! with one call to [`stream_chunks`]: the engine then feeds it chunks of a few MB read
//! straight from the checkpoint files and writes each finished chunk, so no tensor-sized
//! buffer is ever allocated. `linear.rs` shows the pattern (one kernel serves both paths).

mod geometric_median;
mod linear;
mod model_stock;
mod slerp;
mod stream;
mod task_arithmetic;

use std::collections::BTreeMap;

use candle_core::{DType, Result, Storage, StorageRef, Tensor};

pub use geometric_median::GeometricMedian;
pub use linear::Linear;
pub use model_stock::ModelStock;
pub use slerp::Slerp;
pub use stream::{
    fold_chunks, map_chunks, stream_chunks, Chunk, ChunkSink, Source, StreamInputs, VecSink,
    STREAM_CHUNK,
};
pub use task_arithmetic::{
    Consensus, TaskArithmeticFamily, BREADCRUMBS, BREADCRUMBS_TIES, DARE_LINEAR, DARE_TIES, DELLA,
    DELLA_LINEAR, TASK_ARITHMETIC, TIES,
};

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

/// The value of a parameter the method declared: planning resolved every declared parameter
/// (defaults included), so a missing one is a bug in the method, not in the config.
pub(crate) fn declared(params: &Params, name: &str, what: &str) -> f64 {
    *params
        .get(name)
        .unwrap_or_else(|| panic!("{what} `{name}` is not declared by the method"))
}

impl TensorInputs<'_> {
    /// A global parameter (declared by the method, so always present).
    pub fn param(&self, name: &str) -> f64 {
        declared(self.params, name, "parameter")
    }

    /// A per-model parameter of model `i`.
    pub fn model_param(&self, i: usize, name: &str) -> f64 {
        declared(&self.model_params[i], name, "model parameter")
    }

    /// The same tensor as [`StreamInputs`] over `base` and `models` (these tensors' data), so
    /// `merge` can run a method's streaming implementation on whole tensors.
    pub fn streaming<'s>(
        &'s self,
        base: Option<Source<'s>>,
        models: &'s [Source<'s>],
    ) -> StreamInputs<'s> {
        StreamInputs {
            name: self.name,
            shape: self.base.unwrap_or(&self.models[0]).dims(),
            base,
            models,
            params: self.params,
            model_params: self.model_params,
            seed: self.seed,
        }
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
    /// Whether the config must name a `base_model`. Such methods see the base separately:
    /// a `[[merge.models]]` entry naming the base model is the base, not an input model (as
    /// in mergekit, where the base is never among the "non-base" inputs).
    fn requires_base(&self) -> bool {
        false
    }
    /// Fewest input models (besides the base) the method accepts.
    fn min_models(&self) -> usize {
        1
    }
    /// Most input models (besides the base) the method accepts; `None` = no limit.
    fn max_models(&self) -> Option<usize> {
        None
    }
    /// Tensor-sized f32 buffers the method allocates besides its inputs (for the executor's
    /// memory budget).
    fn scratch_tensors(&self, n_models: usize) -> usize {
        let _ = n_models;
        2
    }
    /// Check parameter values that have a valid range (called once per tensor at planning,
    /// so bad values fail before anything is written). `params` are the global parameters
    /// and `model_params` the per-model ones, as resolved for one tensor.
    fn check_params(
        &self,
        params: &Params,
        model_params: &[Params],
    ) -> std::result::Result<(), String> {
        let _ = (params, model_params);
        Ok(())
    }
    /// Merge one tensor. Inputs are f32; the output must have the base's (or first model's)
    /// shape and is cast to the output dtype by the caller.
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor>;
    /// Optional fast path: merge one tensor straight from the checkpoint files to the output,
    /// a chunk at a time (see "Streaming" in the module docs). Return `None` (the default) to get
    /// whole f32 tensors through [`MergeMethod::merge`] instead; a method may also return
    /// `None` for parameters it only handles whole. Must give the same result as `merge`.
    fn merge_streaming(&self, inputs: &StreamInputs, out: &dyn ChunkSink) -> Option<Result<()>> {
        let _ = (inputs, out);
        None
    }
}

/// Every method, by name. Adding a method: one file above and one line here.
pub static REGISTRY: &[&dyn MergeMethod] = &[
    &Linear,
    &TASK_ARITHMETIC,
    &TIES,
    &DARE_LINEAR,
    &DARE_TIES,
    &BREADCRUMBS,
    &BREADCRUMBS_TIES,
    &DELLA,
    &DELLA_LINEAR,
    &Slerp,
    &ModelStock,
    &GeometricMedian,
];

/// The method called `name`.
pub fn lookup(name: &str) -> Option<&'static dyn MergeMethod> {
    REGISTRY.iter().copied().find(|m| m.name() == name)
}

/// All method names.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|m| m.name()).collect()
}

/// Run `f` on the f32 data of `tensors`, without copying when they are contiguous f32 CPU
/// tensors (the common case: the executor loads every input as f32 on the CPU). Other
/// tensors (another device, a strided view) are copied to host memory first.
pub fn with_f32_slices<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    enum Held<'a> {
        Borrowed(StorageRef<'a>, usize, usize),
        Owned(Vec<f32>),
    }
    let mut held = Vec::with_capacity(tensors.len());
    for t in tensors {
        let (storage, layout) = t.storage_and_layout();
        let borrowed = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(_), Some((start, end))) if t.dtype() == DType::F32 => Some((start, end)),
            _ => None,
        };
        match borrowed {
            Some((start, end)) => held.push(Held::Borrowed(storage, start, end)),
            None => {
                drop(storage);
                held.push(Held::Owned(
                    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                ));
            }
        }
    }
    let mut slices: Vec<&[f32]> = Vec::with_capacity(held.len());
    for h in &held {
        slices.push(match h {
            Held::Borrowed(storage, start, end) => match &**storage {
                Storage::Cpu(c) => &c.as_slice::<f32>()?[*start..*end],
                _ => unreachable!("only CPU storage is borrowed"),
            },
            Held::Owned(v) => v.as_slice(),
        });
    }
    f(&slices)
}

/// A tensor with `like`'s shape and device from f32 data.
pub fn tensor_like(data: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(data, like.shape(), &candle_core::Device::Cpu)?.to_device(like.device())
}

/// Elements per parallel chunk for elementwise loops within one tensor: large enough that
/// rayon's overhead vanishes, small enough that a big tensor (an embedding) splits over
/// every core.
pub const CHUNK: usize = 1 << 16;

/// Every method name a config may use: the model-level methods above and the adapter-level
/// ones of [`crate::adapter_merge`].
pub fn all_names() -> Vec<&'static str> {
    let mut n = names();
    n.extend(
        crate::adapter_merge::ADAPTER_METHODS
            .iter()
            .map(|m| m.name()),
    );
    n
}
