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

use super::{
    stream_chunks, Chunk, ChunkSink, MergeMethod, ParamSpec, Source, StreamInputs, TensorInputs,
    VecSink,
};
use crate::tensor::{tensor_like, with_f32_slices};

/// Weighted average; see the module docs.
pub struct Linear;

impl Linear {
    /// The weights and the divisor (`None` without `normalize`).
    fn weights(x: &StreamInputs) -> Result<(Vec<f32>, Option<f32>)> {
        let weights: Vec<f32> = (0..x.models.len())
            .map(|i| x.model_param(i, "weight") as f32)
            .collect();
        let divisor = if x.flag("normalize") {
            let total: f32 = weights.iter().sum();
            if total.abs() < 1e-12 {
                candle_core::bail!("linear: the weights sum to zero, cannot normalize");
            }
            Some(total)
        } else {
            None
        };
        Ok((weights, divisor))
    }

    /// One chunk: a weighted sum accumulated in the output, model by model (vectorised
    /// loops, no temporaries).
    fn kernel(c: &Chunk, out: &mut [f32], weights: &[f32], divisor: Option<f32>) {
        out.fill(0.0);
        for (m, &w) in c.models.iter().zip(weights) {
            for (o, v) in out.iter_mut().zip(m.iter()) {
                *o += v * w;
            }
        }
        if let Some(d) = divisor {
            out.iter_mut().for_each(|o| *o /= d);
        }
    }
}

impl MergeMethod for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::flag("normalize", true)];
        P
    }

    fn model_parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::required("weight")];
        P
    }

    fn scratch_tensors(&self, _n_models: usize) -> usize {
        1
    }

    fn merge_streaming(&self, x: &StreamInputs, out: &dyn ChunkSink) -> Option<Result<()>> {
        Some(Self::weights(x).and_then(|(weights, divisor)| {
            stream_chunks(x, out, |c, o| {
                Self::kernel(&c, o, &weights, divisor);
                Ok(())
            })
        }))
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let inputs: Vec<&Tensor> = x.models.iter().collect();
        let out = with_f32_slices(&inputs, |models| {
            let sources: Vec<Source> = models.iter().map(|m| Source::F32(m)).collect();
            let s = x.streaming(None, &sources);
            let sink = VecSink::new(s.len());
            self.merge_streaming(&s, &sink).expect("always streams")?;
            Ok(sink.into_inner())
        })?;
        tensor_like(out, &x.models[0])
    }
}
