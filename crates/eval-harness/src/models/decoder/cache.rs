//! The decoder's KV cache: keys and values of the tokens seen so far, per layer, grown in
//! place, repeatable for the choices of one prompt, stackable (left-padded) for a generation
//! batch, and selectable as rows finish.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Keys and values of the tokens seen so far, per layer, plus which of them are real tokens.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values `[batch, kv_heads, capacity, head_dim]`, the first `len`
    /// positions filled: new positions are written in place while they fit (copying the whole
    /// cache at every decoding step took a tenth of a long-prompt generation on the CPU).
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per row: whether each cached position is a real (non-padding) token.
    pub(super) valid: Vec<Vec<bool>>,
    /// Shared by clones: a cache whose buffers another clone can see copies them before
    /// writing instead of writing in place.
    pub(super) owner: std::sync::Arc<()>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            valid: Vec::new(),
            owner: Default::default(),
        }
    }

    /// Layer `l`'s keys and values, `[batch, kv_heads, len, head_dim]` views.
    fn filled(&self, l: usize) -> Option<Result<(Tensor, Tensor)>> {
        let len = self.len();
        self.layers[l]
            .as_ref()
            .map(|(k, v)| Ok((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)))
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows in the cache.
    pub fn batch(&self) -> usize {
        self.valid.len()
    }

    /// Whether no clone shares the buffers (so they may be written in place).
    pub(super) fn exclusive(&self) -> bool {
        std::sync::Arc::strong_count(&self.owner) == 1
    }

    /// A cache of `n` identical rows from a single-row cache: a prompt computed once and shared
    /// by `n` continuations.
    pub fn repeat(&self, n: usize) -> Result<Self> {
        if self.batch() != 1 {
            return Err(Error::Msg(format!(
                "KvCache::repeat needs a single-row cache, this one has {} rows",
                self.batch()
            )));
        }
        let layers = (0..self.layers.len())
            .map(|l| {
                self.filled(l)
                    .map(|kv| -> Result<_> {
                        let (k, v) = kv?;
                        Ok((k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?))
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            valid: vec![self.valid[0].clone(); n],
            owner: Default::default(),
        })
    }

    /// One cache of `caches.len()` rows from single-row caches of any lengths, each row
    /// left-padded (zero keys and values, marked as padding, so never attended to) to the
    /// longest. Prompts prefilled one by one this way decode together exactly as a left-padded
    /// batch would, without computing the padding.
    pub fn stack_left_padded(caches: &[KvCache]) -> Result<Self> {
        if caches.iter().any(|c| c.batch() != 1) {
            return Err(Error::Msg(
                "KvCache::stack_left_padded needs single-row caches".into(),
            ));
        }
        let Some(first) = caches.first() else {
            return Err(Error::Msg("KvCache::stack_left_padded: no caches".into()));
        };
        let width = caches.iter().map(KvCache::len).max().unwrap_or(0);
        let pad = |t: &Tensor, n: usize| -> Result<Tensor> {
            if n == 0 {
                return Ok(t.clone());
            }
            let (b, h, _, d) = t.dims4()?;
            let z = Tensor::zeros((b, h, n, d), t.dtype(), t.device())?;
            Ok(Tensor::cat(&[&z, t], 2)?)
        };
        let mut layers = Vec::with_capacity(first.layers.len());
        for l in 0..first.layers.len() {
            let mut ks = Vec::with_capacity(caches.len());
            let mut vs = Vec::with_capacity(caches.len());
            for c in caches {
                let Some(kv) = c.filled(l) else {
                    return Err(Error::Msg(
                        "KvCache::stack_left_padded: a cache has no entries".into(),
                    ));
                };
                let (k, v) = kv?;
                let n = width - c.len();
                ks.push(pad(&k, n)?);
                vs.push(pad(&v, n)?);
            }
            layers.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        let valid = caches
            .iter()
            .map(|c| {
                std::iter::repeat_n(false, width - c.len())
                    .chain(c.valid[0].iter().copied())
                    .collect()
            })
            .collect();
        Ok(KvCache {
            layers,
            valid,
            owner: Default::default(),
        })
    }

    /// Keeps only the given rows (finished sequences leave a generation batch).
    pub fn select(&mut self, rows: &[usize]) -> Result<()> {
        let Some(device) = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.device().clone())
        else {
            return Ok(());
        };
        let idx = Tensor::new(
            rows.iter()
                .map(|&r| r as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            &device,
        )?;
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.valid = rows.iter().map(|&r| self.valid[r].clone()).collect();
        self.owner = Default::default();
        Ok(())
    }
}

/// Appends `k`, `v` (`[batch, kv_heads, t, head_dim]`) to one layer's cache buffers after the
/// first `past` positions: in place when they fit and `exclusive` (no clone shares them), else
/// into new buffers with room to grow. Returns the buffers (filled up to `past + t`).
pub(super) fn append_kv(
    slot: &mut Option<(Tensor, Tensor)>,
    past: usize,
    k: &Tensor,
    v: &Tensor,
    exclusive: bool,
) -> Result<(Tensor, Tensor)> {
    let total = past + k.dim(2)?;
    match &mut *slot {
        Some((kb, vb)) if exclusive && kb.dim(2)? >= total => {
            kb.slice_set(&k.contiguous()?, 2, past)?;
            vb.slice_set(&v.contiguous()?, 2, past)?;
        }
        old => {
            let cap = old.as_ref().map_or(Ok(0), |(kb, _)| kb.dim(2))?;
            // The first pass (a prompt) gets exactly its length; growth adds half again.
            let cap = if old.is_none() {
                total
            } else {
                total.max(cap + (cap / 2).max(64))
            };
            let (b, h, _, d) = k.dims4()?;
            let grow = |new: &Tensor, old: Option<&Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, h, cap, d), new.dtype(), new.device())?;
                if let Some(o) = old.filter(|_| past > 0) {
                    buf.slice_set(&o.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
                }
                buf.slice_set(&new.contiguous()?, 2, past)?;
                Ok(buf)
            };
            let kb = grow(k, old.as_ref().map(|(kb, _)| kb))?;
            let vb = grow(v, old.as_ref().map(|(_, vb)| vb))?;
            *old = Some((kb, vb));
        }
    }
    let (kb, vb) = slot.as_ref().expect("just written");
    Ok((kb.clone(), vb.clone()))
}
