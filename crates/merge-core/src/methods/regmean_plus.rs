//! `regmean_plus`: RegMean++ (Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and
//! Generalization of Regression Mean for Model Merging", arXiv:2508.03121).
//!
//! The same closed form per linear layer as [`regmean`](super::RegMean), with the same `alpha`
//! (default 0.9):
//!
//! W*ₗ = ((Σᵢ G̃ᵢₗ)⁻¹ Σᵢ G̃ᵢₗ Wᵢₗᵀ)ᵀ,   G̃ᵢₗ = α·Gᵢₗ + (1−α)·diag(Gᵢₗ),
//!
//! but each Gram matrix Gᵢₗ (mean over model i's calibration tokens) is of the inputs that
//! model i's own layer l sees when its calibration rows run through the *merged* layers
//! 0..l−1 (RegMean takes them from model i's own lower layers). Merging and the forward pass
//! therefore alternate, layer by layer, as FusionBench's `RegMeanAlgorithmPlusPlus.run` does:
//!
//! 1. the embeddings are the mean of the models' (so are the final norm and the head); every
//!    model's calibration rows are embedded with this merged embedding: Hᵢ;
//! 2. for each decoder layer l: model i's layer l runs on Hᵢ (observers on its linear layers
//!    give Gᵢₗ, its output is dropped); the layer's linear weights are solved as above, its
//!    other tensors (norms, biases) are the models' mean; then Hᵢ ← merged layer l (Hᵢ).
//!
//! merge-core cannot run a model, so the layer loop lives in the CLI (`llm-merging merge` and
//! `run`, crate `submit`, module `regmean_plus`): it computes every model's statistics this
//! way and hands them to the engine, which then merges every tensor as `regmean` does. This
//! file only declares the method: its name, `alpha`, and [`MergeMethod::merges_layer_by_layer`].
//!
//! Each `[[merge.models]]` entry names calibration rows (a competition CSV, tokenized as
//! `llm-merging stats` does) instead of a statistics directory; decoders only (Llama, Mistral,
//! Qwen2, Gemma), all experts of one architecture:
//!
//! ```toml
//! [merge]
//! method = "regmean_plus"
//! [merge.parameters]
//! alpha = 0.9
//! [[merge.models]]
//! model = "org/expert-a"
//! calibration = "calib/expert-a.csv"
//! calibration_rows = 64            # optional: the first 64 rows
//! [[merge.models]]
//! model = "org/expert-b"
//! calibration = "calib/expert-b.csv"
//! ```

use candle_core::{Result, Tensor};

use super::{MergeMethod, ParamSpec, Params, RegMean, TensorInputs};

/// RegMean++; see the module docs.
pub struct RegMeanPlus;

impl MergeMethod for RegMeanPlus {
    fn name(&self) -> &'static str {
        "regmean_plus"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        RegMean.parameters()
    }

    fn uses_input_statistics(&self) -> bool {
        true
    }

    fn merges_layer_by_layer(&self) -> bool {
        true
    }

    fn scratch_tensors(&self, n_models: usize) -> usize {
        RegMean.scratch_tensors(n_models)
    }

    fn check_params(
        &self,
        params: &Params,
        model_params: &[Params],
    ) -> std::result::Result<(), String> {
        RegMean.check_params(params, model_params)
    }

    /// Given the statistics the layer-wise driver computed, the final step is RegMean's.
    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        RegMean.merge(x)
    }
}
