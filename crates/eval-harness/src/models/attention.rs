//! Attention pieces shared by the decoder and T5: additive masks (causal, key padding,
//! sliding window), the one softmax, `softmax(scores)·v`, and the glue to the fused CPU kernel
//! ([`super::attention_cpu`]).

use candle_core::{DType, Device, Storage, Tensor, D};

use super::{attention_cpu, vector_math};
use crate::error::Result;

/// Mask value for excluded keys (transformers uses the dtype's minimum; scores are f32).
pub(crate) const MASKED: f32 = f32::MIN;

/// Additive mask of the decoder's self attention over its cache: causal, key padding and
/// sliding window.
pub(crate) struct Mask<'a> {
    /// Per row, which cache positions are real tokens.
    pub valid: &'a [Vec<bool>],
    /// Cache positions before this pass.
    pub past: usize,
    /// Cache positions after it.
    pub total: usize,
    /// Each query sees at most this many most recent keys (itself included).
    pub window: Option<usize>,
    /// No key of any row is padding.
    pub all_valid: bool,
}

impl<'a> Mask<'a> {
    /// The mask of a pass that takes the cache from `past` to `total` positions.
    pub fn new(valid: &'a [Vec<bool>], past: usize, total: usize, window: Option<usize>) -> Self {
        let all_valid = valid.iter().all(|r| r.iter().all(|&x| x));
        Mask {
            valid,
            past,
            total,
            window,
            all_valid,
        }
    }

    /// Mask for query rows `start..start+len` of this pass, shaped `[b|1, 1, 1, len, total]`,
    /// or `None` when nothing needs masking.
    pub fn chunk(&self, start: usize, len: usize, device: &Device) -> Result<Option<Tensor>> {
        let last_query = self.past + start + len - 1;
        let window_bites = self.window.is_some_and(|w| last_query >= w);
        // A single newest query with every key real sees everything: no mask.
        if self.all_valid && !window_bites && start + len == self.total - self.past && len == 1 {
            return Ok(None);
        }
        let rows = if self.all_valid { 1 } else { self.valid.len() };
        let mut m = vec![0f32; rows * len * self.total];
        for r in 0..rows {
            for qi in 0..len {
                let abs = self.past + start + qi;
                let base = (r * len + qi) * self.total;
                for j in 0..self.total {
                    let visible = j <= abs
                        && self.window.is_none_or(|w| abs - j < w)
                        && (self.all_valid || self.valid[r][j]);
                    if !visible {
                        m[base + j] = MASKED;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(
            m,
            (rows, 1, 1, len, self.total),
            device,
        )?))
    }
}

/// Additive key-padding mask `[rows, 1, 1, len]` (f32), or `None` when nothing is padding.
pub(crate) fn padding_mask(valid: &[Vec<bool>], device: &Device) -> Result<Option<Tensor>> {
    if valid.iter().all(|r| r.iter().all(|&x| x)) {
        return Ok(None);
    }
    let len = valid.first().map_or(0, Vec::len);
    let m: Vec<f32> = valid
        .iter()
        .flat_map(|r| r.iter().map(|&x| if x { 0.0 } else { MASKED }))
        .collect();
    Ok(Some(Tensor::from_vec(m, (valid.len(), 1, 1, len), device)?))
}

/// Softmax over the last dimension: [`vector_math::softmax_rows`] on the CPU in f32, else
/// candle's.
pub(crate) fn softmax_last_dim(s: &Tensor) -> Result<Tensor> {
    if s.device().is_cpu() && s.dtype() == DType::F32 {
        let cols = s.dim(D::Minus1)?;
        let mut v: Vec<f32> = s.flatten_all()?.to_vec1()?;
        if vector_math::softmax_rows(&mut v, cols) {
            return Ok(Tensor::from_vec(v, s.shape(), s.device())?);
        }
    }
    Ok(candle_nn::ops::softmax_last_dim(s)?)
}

/// `softmax(s)·v`: f32 scores `s` (`[.., queries, keys]`, masks added) to weights in `dtype`,
/// times values `v` (`[.., keys, head_dim]`).
pub(crate) fn weigh_values(s: &Tensor, v: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(softmax_last_dim(s)?.to_dtype(dtype)?.matmul(v)?)
}

/// [`attention_cpu::attend`] where it applies (f32 on the CPU): the attention output
/// `[b, t, heads·head_dim]` of queries `q` (`[b, heads, t, head_dim]`, the first at cache
/// position `mask.past + q_start`) over the cache buffers `kb`, `vb`
/// (`[b, kv_heads, capacity, head_dim]`, filled up to `mask.total`), scaled by `1/√head_dim`;
/// `None` to compose it from candle operations instead.
pub(crate) fn fused_cpu(
    q: &Tensor,
    (kb, vb): (&Tensor, &Tensor),
    kv_heads: usize,
    mask: &Mask,
    q_start: usize,
) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || q.dtype() != DType::F32 {
        return Ok(None);
    }
    let (b, nh, t, hd) = q.dims4()?;
    let q = q.contiguous()?;
    let capacity = kb.dim(2)?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = kb.storage_and_layout();
    let (vs, vl) = vb.storage_and_layout();
    let (Storage::Cpu(qc), Storage::Cpu(kc), Storage::Cpu(vc)) = (&*qs, &*ks, &*vs) else {
        return Ok(None);
    };
    let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) = (
        ql.contiguous_offsets(),
        kl.contiguous_offsets(),
        vl.contiguous_offsets(),
    ) else {
        return Ok(None);
    };
    let args = attention_cpu::CpuAttention {
        q: &qc.as_slice::<f32>()?[q0..q1],
        k: &kc.as_slice::<f32>()?[k0..k1],
        v: &vc.as_slice::<f32>()?[v0..v1],
        batch: b,
        heads: nh,
        kv_heads,
        queries: t,
        keys: mask.total,
        head_dim: hd,
        kv_stride: capacity * hd,
        first_query: mask.past + q_start,
        window: mask.window,
        valid: (!mask.all_valid).then_some(mask.valid),
        scale: (1.0 / (hd as f64).sqrt()) as f32,
    };
    Ok(attention_cpu::attend(&args)
        .map(|o| Tensor::from_vec(o, (b, t, nh * hd), &Device::Cpu))
        .transpose()?)
}
