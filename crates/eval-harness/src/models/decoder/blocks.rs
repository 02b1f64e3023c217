//! The decoder's layers: attention (RoPE, grouped-query, KV cache), the gated MLP and the
//! pre-norm block around them, each read from its checkpoint prefix with `new(cfg, vb)`.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::cache::append_kv;
use super::config::{Activation, DecoderConfig, Family};
use crate::error::Result;
use crate::models::attention::{fused_cpu, weigh_values, Mask};
use crate::models::linear::{InputObserver, Lin};
use crate::models::vector_math;
use crate::models::weights::Weight;

/// Upper bound on attention-score elements materialised at once (queries are chunked to stay
/// under it, so long prompts do not need O(T²·heads) memory).
const SCORE_BUDGET: usize = 1 << 25;

/// Self attention over the KV cache (`self_attn.{q,k,v,o}_proj`).
pub(super) struct Attention {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
}

impl Attention {
    fn new(cfg: &DecoderConfig, vb: &VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        Ok(Attention {
            q: Lin::load(vb, &[("q_proj", nh * hd)], h, cfg.qkv_bias)?,
            k: Lin::load(vb, &[("k_proj", nkv * hd)], h, cfg.qkv_bias)?,
            v: Lin::load(vb, &[("v_proj", nkv * hd)], h, cfg.qkv_bias)?,
            o: Lin::load(vb, &[("o_proj", h)], nh * hd, cfg.o_bias)?,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            dtype: vb.dtype(),
        })
    }

    fn lins(&self) -> [&Lin; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    fn set(&mut self, name: &str, t: &Tensor) -> Result<bool> {
        Ok(self.q.set(name, t)?
            || self.k.set(name, t)?
            || self.v.set(name, t)?
            || self.o.set(name, t)?)
    }

    /// Attention output for the positions from `q_start` on (`None` when there are none);
    /// keys and values of every position of `x` are appended to the layer's cache `kv`.
    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Mask,
        (kv, exclusive): (&mut Option<(Tensor, Tensor)>, bool),
        q_start: usize,
    ) -> Result<Option<Tensor>> {
        let (b, t_all, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let heads = |y: Tensor, t: usize, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let k = heads(self.k.forward(x)?, t_all, nkv)?;
        let v = heads(self.v.forward(x)?, t_all, nkv)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        // The cache's buffers, filled up to `total`, and views of the filled part.
        let (kb, vb) = append_kv(kv, mask.past, &k, &v, exclusive)?;
        let (k, v) = (kb.narrow(2, 0, mask.total)?, vb.narrow(2, 0, mask.total)?);
        let t = t_all - q_start;
        if t == 0 {
            return Ok(None);
        }
        let (xq, cq, sq) = if q_start == 0 {
            (x.clone(), cos.clone(), sin.clone())
        } else {
            (
                x.narrow(1, q_start, t)?,
                cos.narrow(1, q_start, t)?.contiguous()?,
                sin.narrow(1, q_start, t)?.contiguous()?,
            )
        };
        let q = heads(self.q.forward(&xq)?, t, nh)?;
        let q = candle_nn::rotary_emb::rope(&q, &cq, &sq)?;
        let tk = k.dim(2)?;
        if let Some(o) = fused_cpu(&q, (&kb, &vb), nkv, mask, q_start)? {
            return Ok(Some(self.o.forward(&o)?));
        }
        // candle's products want the keys and values without the spare capacity between rows.
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let rep = nh / nkv;
        // Transposed view: the matmul reads the column-major layout without a copy.
        let kt = k.transpose(2, 3)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // Queries in chunks so the score matrix stays bounded for long prompts.
        let chunk = (SCORE_BUDGET / (b * nh * tk).max(1)).clamp(1, t);
        let mut outs = Vec::with_capacity(t.div_ceil(chunk));
        let mut start = 0;
        while start < t {
            let len = chunk.min(t - start);
            let qc = q.narrow(2, start, len)?;
            // Grouped-query attention without copying keys: the `rep` query heads sharing a
            // key/value head are stacked along the sequence axis.
            let qg = qc.contiguous()?.reshape((b, nkv, rep * len, hd))?;
            let s = (qg.matmul(&kt)? * scale)?.to_dtype(DType::F32)?;
            let s = s.reshape((b, nkv, rep, len, tk))?;
            let s = match mask.chunk(q_start + start, len, x.device())? {
                Some(m) => s.broadcast_add(&m)?,
                None => s,
            };
            let s = s.reshape((b, nkv, rep * len, tk))?;
            outs.push(weigh_values(&s, &v, self.dtype)?.reshape((b, nh, len, hd))?);
            start += len;
        }
        let o = if outs.len() == 1 {
            outs.pop().unwrap()
        } else {
            Tensor::cat(&outs, 2)?
        };
        let o = o.transpose(1, 2)?.contiguous()?.reshape((b, t, nh * hd))?;
        Ok(Some(self.o.forward(&o)?))
    }
}

/// The gated MLP, `down(act(gate(h)) · up(h))`, gate and up as one product.
pub(super) struct Mlp {
    gate_up: Lin,
    down: Lin,
    ff: usize,
    activation: Activation,
}

impl Mlp {
    fn new(cfg: &DecoderConfig, vb: &VarBuilder) -> Result<Self> {
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_up: Lin::load(vb, &[("gate_proj", ff), ("up_proj", ff)], h, false)?,
            down: Lin::load(vb, &[("down_proj", h)], ff, false)?,
            ff,
            activation: cfg.activation,
        })
    }

    fn lins(&self) -> [&Lin; 2] {
        [&self.gate_up, &self.down]
    }

    fn set(&mut self, name: &str, t: &Tensor) -> Result<bool> {
        Ok(self.gate_up.set(name, t)? || self.down.set(name, t)?)
    }

    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let y = self.gate_up.forward(h)?;
        let ff = self.ff;
        if self.activation == Activation::Silu {
            if let Some(a) = vector_math::gated_tensor(&y, ff, vector_math::Gate::Silu)? {
                return self.down.forward(&a);
            }
        }
        let g = y.narrow(D::Minus1, 0, ff)?;
        let g = match self.activation {
            Activation::Silu => g.silu()?,
            Activation::Gelu => g.gelu_erf()?,
            Activation::GeluTanh => g.gelu()?,
        };
        self.down.forward(&(g * y.narrow(D::Minus1, ff, ff)?)?)
    }
}

/// One pre-norm layer (`model.layers.N`): attention and MLP, each with its RMSNorm.
pub(super) struct Block {
    input_norm: Weight,
    attn: Attention,
    post_norm: Weight,
    mlp: Mlp,
    eps: f32,
}

impl Block {
    pub fn new(cfg: &DecoderConfig, vb: &VarBuilder) -> Result<Self> {
        let norm = |name: &str| {
            // Gemma's RMSNorm multiplies by (1 + w); the 1 is folded in once, in f32.
            let gemma = cfg.family == Family::Gemma;
            Weight::load(vb, name, &[cfg.hidden_size], vb.dtype(), gemma)
        };
        Ok(Block {
            input_norm: norm("input_layernorm.weight")?,
            attn: Attention::new(cfg, &vb.pp("self_attn"))?,
            post_norm: norm("post_attention_layernorm.weight")?,
            mlp: Mlp::new(cfg, &vb.pp("mlp"))?,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// The layer's linear layers.
    pub fn lins(&self) -> impl Iterator<Item = &Lin> {
        self.attn.lins().into_iter().chain(self.mlp.lins())
    }

    /// The layer's linear layers, to change.
    pub fn lins_mut(&mut self) -> [&mut Lin; 6] {
        let (a, m) = (&mut self.attn, &mut self.mlp);
        [
            &mut a.q,
            &mut a.k,
            &mut a.v,
            &mut a.o,
            &mut m.gate_up,
            &mut m.down,
        ]
    }

    /// Installs `o` on every linear layer of the block (see [`InputObserver`]).
    pub fn set_observer(&mut self, o: Option<Arc<dyn InputObserver>>) {
        for lin in self.lins_mut() {
            lin.set_observer(o.clone());
        }
    }

    pub fn set(&mut self, name: &str, t: &Tensor) -> Result<bool> {
        Ok(self.input_norm.set(name, t)?
            || self.post_norm.set(name, t)?
            || self.attn.set(name, t)?
            || self.mlp.set(name, t)?)
    }

    /// The layer on `x` (`[b, t, hidden]`); only the positions from `q_start` on come out
    /// (`None` when there are none), every position's keys and values go into `kv`.
    pub fn forward(
        &self,
        x: Tensor,
        rope: (&Tensor, &Tensor),
        mask: &Mask,
        kv: (&mut Option<(Tensor, Tensor)>, bool),
        q_start: usize,
    ) -> Result<Option<Tensor>> {
        let h = candle_nn::ops::rms_norm(&x, self.input_norm.tensor(), self.eps)?;
        let Some(a) = self.attn.forward(&h, rope, mask, kv, q_start)? else {
            return Ok(None);
        };
        let x = if q_start > 0 {
            x.narrow(1, q_start, x.dim(1)? - q_start)?
        } else {
            x
        };
        let x = (x + a)?;
        let h = candle_nn::ops::rms_norm(&x, self.post_norm.tensor(), self.eps)?;
        Ok(Some((&x + self.mlp.forward(&h)?)?))
    }
}
