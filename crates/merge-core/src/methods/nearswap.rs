//! `nearswap`: take the other model's value where it is near the base's, keep the base's
//! where they differ much (mergekit 0.1.5 `nearswap.py`; alchemonaut,
//! <https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001>).
//!
//! Per element, with a the base's value and b the other model's:
//!
//! w = clamp(t / max(|a − b|, 1e-6), 0, 1),   out = w·b + (1 − w)·a.
//!
//! Elements closer than t are swapped in whole; farther ones move towards b by t/|a − b|.
//!
//! Parameters: global `t` (required; the distance scale, e.g. 1e-4; gradients and filters as
//! usual). Needs `base_model` and exactly one other model; an entry naming the base is the
//! base.
//!
//! ```toml
//! [merge]
//! method = "nearswap"
//! base_model = "Qwen/Qwen2.5-7B-Instruct"
//! parameters = { t = 0.0001 }
//! [[merge.models]]
//! model = "Qwen/Qwen2.5-Math-7B-Instruct"
//! ```

use candle_core::{Result, Tensor};

use crate::tensor::{tensor_like, with_f32_slices};

use super::{
    stream_chunks, ChunkSink, MergeMethod, ParamSpec, Source, StreamInputs, TensorInputs, VecSink,
};

/// NearSwap; see the module docs.
pub struct Nearswap;

/// The kernel: one chunk of base `a` and model `b` into `out`.
fn nearswap(a: &[f32], b: &[f32], t: f32, out: &mut [f32]) {
    for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
        let w = (t / (a - b).abs().max(1e-6)).clamp(0.0, 1.0);
        *o = w * b + (1.0 - w) * a;
    }
}

impl MergeMethod for Nearswap {
    fn name(&self) -> &'static str {
        "nearswap"
    }

    fn parameters(&self) -> &'static [ParamSpec] {
        const P: &[ParamSpec] = &[ParamSpec::required("t")];
        P
    }

    fn requires_base(&self) -> bool {
        true
    }

    fn max_models(&self) -> Option<usize> {
        Some(1)
    }

    fn scratch_tensors(&self, _n_models: usize) -> usize {
        1
    }

    fn merge(&self, x: &TensorInputs) -> Result<Tensor> {
        let base = x.base.expect("requires_base");
        let out = with_f32_slices(&[base, &x.models[0]], |s| {
            let models = [Source::F32(s[1])];
            let inputs = x.streaming(Some(Source::F32(s[0])), &models);
            let sink = VecSink::new(inputs.len());
            self.merge_streaming(&inputs, &sink)
                .expect("always streams")?;
            Ok(sink.into_inner())
        })?;
        tensor_like(out, base)
    }

    fn merge_streaming(&self, x: &StreamInputs, out: &dyn ChunkSink) -> Option<Result<()>> {
        let t = x.param("t") as f32;
        Some(stream_chunks(x, out, |c, o| {
            nearswap(
                c.base.as_deref().expect("requires_base"),
                &*c.models[0],
                t,
                o,
            );
            Ok(())
        }))
    }
}
