//! Tensor-level merge methods: one file per family behind one small trait, listed in
//! [`crate::registry::REGISTRY`] with the adapter-level ones.
//!
//! A method sees one tensor at a time: the base model's tensor (if the config names a base),
//! every input model's tensor (adapters already applied), all in f32, and the parameters
//! resolved for this tensor (per-layer gradients and name filters already evaluated).
//!
//! # Adding a method
//! Write `methods/my_method.rs` with a unit struct implementing [`MergeMethod`], declare it
//! here (`mod my_method; pub use my_method::MyMethod;`) and add one line to
//! [`crate::registry::REGISTRY`]: `Method::Tensor(&MyMethod),`. Parameters are declared
//! typed ([`ParamSpec::optional`] for numbers, [`ParamSpec::flag`] for booleans) and read with
//! [`TensorInputs::param`] / [`TensorInputs::flag`] / [`TensorInputs::model_param`].
//!
//! ```
//! use candle_core::{Result, Tensor};
//! use merge_core::methods::{MergeMethod, ParamSpec, TensorInputs};
//! use merge_core::registry::Method;
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
//!
//! // The registry line (in registry.rs): one entry of `REGISTRY`.
//! let entry = Method::Tensor(&ClippedTaskArithmetic);
//! assert_eq!(entry.name(), "clipped_task_arithmetic");
//! assert!(entry.requires_base());
//! ```
//!
//! # Streaming
//! `merge` gets whole tensors in f32. An elementwise method (each output element depends only
//! on the same element of the inputs) can also implement [`MergeMethod::merge_streaming`]
//! with one call to [`stream_chunks`]: the engine then feeds it chunks of a few MB read
//! straight from the checkpoint files and writes each finished chunk, so no tensor-sized
//! buffer is ever allocated. `linear.rs` shows the pattern (one kernel serves both paths).

mod arcee_fusion;
pub mod dense_linalg;
mod geometric_median;
mod karcher;
mod linear;
mod memo;
mod model_stock;
mod multislerp;
mod nearswap;
mod nuslerp;
mod passthrough;
mod ram;
mod regmean;
mod regmean_plus;
mod sce;
mod slerp;
pub mod sparsify;
mod stream;
mod svd_merges;
mod task_arithmetic;

use candle_core::{Result, Tensor};

pub use crate::params::{ParamSpec, Params};
pub use arcee_fusion::ArceeFusion;
pub use geometric_median::GeometricMedian;
pub use karcher::Karcher;
pub use linear::Linear;
pub use memo::{InputId, MemoFor, StreamMemo};
pub use model_stock::ModelStock;
pub use multislerp::Multislerp;
pub use nearswap::Nearswap;
pub use nuslerp::Nuslerp;
pub use passthrough::Passthrough;
pub use ram::{Ram, RAM, RAMPLUS_TL};
pub use regmean::{regmean_solve, RegMean};
pub use regmean_plus::RegMeanPlus;
pub use sce::Sce;
pub use slerp::Slerp;
pub use stream::{
    fold_chunks, map_chunks, stream_chunks, Chunk, ChunkSink, Source, StreamInputs, VecSink,
    STREAM_CHUNK,
};
pub use svd_merges::{SvdMerge, ISO_C, ISO_CTS, TSV};
pub use task_arithmetic::{
    Consensus, Sparsification, TaskArithmeticFamily, BREADCRUMBS, BREADCRUMBS_TIES, DARE_LINEAR,
    DARE_TIES, DELLA, DELLA_LINEAR, TASK_ARITHMETIC, TIES,
};

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
    /// For methods that use input statistics ([`MergeMethod::uses_input_statistics`]), when
    /// every model has them for this tensor (a 2-D weight `[out, in]`): per model, in config
    /// order, the mean Gram matrix `[in, in]` of the layer's inputs over its calibration
    /// tokens (f32). `None` for tensors without statistics and for every other method.
    pub grams: Option<&'a [Tensor]>,
}

impl<'a> TensorInputs<'a> {
    /// The inputs of tensor `name` with seed 0 and no input statistics: what a test of a
    /// method (or a caller merging tensors it holds) passes to [`MergeMethod::merge`].
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use merge_core::methods::{Linear, MergeMethod, Params, TensorInputs};
    ///
    /// let a = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
    /// let b = Tensor::new(&[3f32, 6.0], &Device::Cpu)?;
    /// let params = Params::defaults(Linear.parameters());
    /// let mut per_model = Params::defaults(Linear.model_parameters());
    /// per_model.set("weight", 1.0);
    /// let models = [a, b];
    /// let per_model = [per_model.clone(), per_model];
    /// let x = TensorInputs::new("w", None, &models, &params, &per_model);
    /// assert_eq!(Linear.merge(&x)?.to_vec1::<f32>()?, [2.0, 4.0]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new(
        name: &'a str,
        base: Option<&'a Tensor>,
        models: &'a [Tensor],
        params: &'a Params,
        model_params: &'a [Params],
    ) -> Self {
        TensorInputs {
            name,
            base,
            models,
            params,
            model_params,
            seed: 0,
            grams: None,
        }
    }

    /// A global number parameter (declared by the method, so always present).
    pub fn param(&self, name: &str) -> f64 {
        self.params.number(name)
    }

    /// A global flag parameter (declared by the method, so always present).
    pub fn flag(&self, name: &str) -> bool {
        self.params.flag(name)
    }

    /// A per-model number parameter of model `i`.
    pub fn model_param(&self, i: usize, name: &str) -> f64 {
        self.model_params[i].number(name)
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
            memo: None,
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
    /// Whether an entry naming the base model is the base rather than an input model when the
    /// base is optional (mergekit's "optional" base policy: `nuslerp`, `multislerp`). Methods
    /// that require a base always separate it.
    fn separates_base(&self) -> bool {
        self.requires_base()
    }
    /// Whether a named base model is one more input, after the models (mergekit's "ignored"
    /// base policy, under which the base is merged like any model: `karcher`, `passthrough`).
    /// The method then finds it in [`TensorInputs::base`] and counts it in its model bounds.
    fn base_is_input(&self) -> bool {
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
    /// Whether the method reads each model's input statistics (a `stats = "DIR"` per model,
    /// made by `llm-merging stats`); the engine then checks them at planning and passes the
    /// Gram matrices of each weight in [`TensorInputs::grams`].
    fn uses_input_statistics(&self) -> bool {
        false
    }
    /// Whether the method's input statistics must be computed through the layers merged so
    /// far (`regmean_plus`): each model names `calibration` rows instead of `stats`, and the
    /// CLI's layer-wise driver (`llm-merging merge` / `run`) alternates forward passes and
    /// merges layer by layer, then hands the engine the statistics it computed.
    fn merges_layer_by_layer(&self) -> bool {
        false
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
    /// For methods on task vectors: how each is sparsified (by its `density`) and whether
    /// signs are elected, so diagnostics (`llm-merging inspect`) can tell what the method keeps.
    fn task_vector_rule(&self) -> Option<(Sparsification, Option<Consensus>)> {
        None
    }
}
