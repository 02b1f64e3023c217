//! T5's layers with their Hugging Face weight names, each read from its checkpoint prefix with
//! `new(cfg, vb)`: self and cross attention (q/k/v and k/v stacked into one product), the
//! plain or gated feed-forward, blocks and stacks.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::config::{T5Activation, T5Config};
use crate::error::Result;
use crate::models::linear::Lin;
use crate::models::vector_math;
use crate::models::weights::Weight;

/// Self attention: queries, keys and values in one product (`[q | k | v]` outputs).
pub(super) struct SelfAttention {
    pub qkv: Lin,
    pub o: Lin,
}

impl SelfAttention {
    fn new(cfg: &T5Config, vb: &VarBuilder) -> Result<Self> {
        let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
        Ok(SelfAttention {
            qkv: Lin::load(vb, &[("q", inner), ("k", inner), ("v", inner)], d, false)?,
            o: Lin::load(vb, &[("o", d)], inner, false)?,
        })
    }

    fn set(&mut self, name: &str, t: &Tensor) -> Result<bool> {
        Ok(self.qkv.set(name, t)? || self.o.set(name, t)?)
    }
}

/// Cross attention: queries from the decoder, keys and values (`[k | v]`) from the encoder.
pub(super) struct CrossAttention {
    pub q: Lin,
    pub kv: Lin,
    pub o: Lin,
}

impl CrossAttention {
    fn new(cfg: &T5Config, vb: &VarBuilder) -> Result<Self> {
        let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
        Ok(CrossAttention {
            q: Lin::load(vb, &[("q", inner)], d, false)?,
            kv: Lin::load(vb, &[("k", inner), ("v", inner)], d, false)?,
            o: Lin::load(vb, &[("o", d)], inner, false)?,
        })
    }

    fn set(&mut self, name: &str, t: &Tensor) -> Result<bool> {
        Ok(self.q.set(name, t)? || self.kv.set(name, t)? || self.o.set(name, t)?)
    }
}

/// `DenseReluDense`: `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) · wi_1(x))` with `wi` holding
/// `[wi_0 | wi_1]` (the activated half and the linear half in one product).
pub(super) struct FeedForward {
    wi: Lin,
    wo: Lin,
    gated: bool,
    d_ff: usize,
    activation: T5Activation,
}

impl FeedForward {
    fn new(cfg: &T5Config, vb: &VarBuilder) -> Result<Self> {
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        let wi: &[(&str, usize)] = if cfg.gated {
            &[("wi_0", ff), ("wi_1", ff)]
        } else {
            &[("wi", ff)]
        };
        Ok(FeedForward {
            wi: Lin::load(vb, wi, d, false)?,
            wo: Lin::load(vb, &[("wo", d)], ff, false)?,
            gated: cfg.gated,
            d_ff: ff,
            activation: cfg.activation,
        })
    }

    fn set(&mut self, name: &str, t: &Tensor) -> Result<bool> {
        Ok(self.wi.set(name, t)? || self.wo.set(name, t)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let act = |x: Tensor| -> Result<Tensor> {
            Ok(match self.activation {
                T5Activation::Relu => x.relu()?,
                T5Activation::GeluNew => x.gelu()?,
                T5Activation::Gelu => x.gelu_erf()?,
                T5Activation::Silu => x.silu()?,
            })
        };
        if !self.gated {
            return self.wo.forward(&act(self.wi.forward(x)?)?);
        }
        let y = self.wi.forward(x)?;
        let ff = self.d_ff;
        if self.activation == T5Activation::GeluNew {
            if let Some(h) = vector_math::gated_tensor(&y, ff, vector_math::Gate::GeluTanh)? {
                return self.wo.forward(&h);
            }
        }
        let gate = act(y.narrow(D::Minus1, 0, ff)?)?;
        self.wo.forward(&(gate * y.narrow(D::Minus1, ff, ff)?)?)
    }
}

/// One block (`{encoder,decoder}.block.N.layer`): self attention, cross attention (decoder
/// only) and feed-forward, each behind its RMSNorm.
pub(super) struct Block {
    pub self_norm: Weight,
    pub self_attn: SelfAttention,
    pub cross: Option<(Weight, CrossAttention)>,
    pub ff_norm: Weight,
    pub ff: FeedForward,
}

impl Block {
    fn new(cfg: &T5Config, vb: &VarBuilder, decoder: bool) -> Result<Self> {
        let norm = |i: usize| {
            Weight::load(
                vb,
                &format!("{i}.layer_norm.weight"),
                &[cfg.d_model],
                vb.dtype(),
                false,
            )
        };
        let ff_layer = if decoder { 2 } else { 1 };
        Ok(Block {
            self_norm: norm(0)?,
            self_attn: SelfAttention::new(cfg, &vb.pp("0.SelfAttention"))?,
            cross: if decoder {
                Some((
                    norm(1)?,
                    CrossAttention::new(cfg, &vb.pp("1.EncDecAttention"))?,
                ))
            } else {
                None
            },
            ff_norm: norm(ff_layer)?,
            ff: FeedForward::new(cfg, &vb.pp(format!("{ff_layer}.DenseReluDense")))?,
        })
    }

    fn lins(&self) -> impl Iterator<Item = &Lin> {
        let (sa, ff) = (&self.self_attn, &self.ff);
        let cross = self.cross.iter().flat_map(|(_, c)| [&c.q, &c.kv, &c.o]);
        [&sa.qkv, &sa.o, &ff.wi, &ff.wo].into_iter().chain(cross)
    }

    fn set(&mut self, name: &str, t: &Tensor) -> Result<bool> {
        if self.self_norm.set(name, t)?
            || self.self_attn.set(name, t)?
            || self.ff_norm.set(name, t)?
            || self.ff.set(name, t)?
        {
            return Ok(true);
        }
        match &mut self.cross {
            Some((norm, attn)) => Ok(norm.set(name, t)? || attn.set(name, t)?),
            None => Ok(false),
        }
    }
}

/// The encoder or the decoder: blocks, the final norm, and the relative position bias that the
/// first block computes and every block shares.
pub(super) struct Stack {
    pub blocks: Vec<Block>,
    pub final_norm: Weight,
    /// `[num_buckets, num_heads]`, f32.
    pub rel_bias: Weight,
    pub bidirectional: bool,
}

impl Stack {
    /// `encoder` or `decoder` (`vb` at that prefix).
    pub fn new(cfg: &T5Config, vb: &VarBuilder, decoder: bool) -> Result<Self> {
        let n = if decoder {
            cfg.num_decoder_layers
        } else {
            cfg.num_layers
        };
        let blocks = (0..n)
            .map(|i| Block::new(cfg, &vb.pp(format!("block.{i}.layer")), decoder))
            .collect::<Result<_>>()?;
        Ok(Stack {
            blocks,
            final_norm: Weight::load(
                vb,
                "final_layer_norm.weight",
                &[cfg.d_model],
                vb.dtype(),
                false,
            )?,
            // The bias is tiny and added to f32 scores: keep it in f32.
            rel_bias: Weight::load(
                vb,
                "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                &[cfg.relative_attention_num_buckets, cfg.num_heads],
                DType::F32,
                false,
            )?,
            bidirectional: !decoder,
        })
    }

    /// Every linear layer of the stack.
    pub fn lins(&self) -> impl Iterator<Item = &Lin> {
        self.blocks.iter().flat_map(Block::lins)
    }

    pub fn set(&mut self, name: &str, t: &Tensor) -> Result<bool> {
        if self.final_norm.set(name, t)? || self.rel_bias.set(name, t)? {
            return Ok(true);
        }
        for b in &mut self.blocks {
            if b.set(name, t)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
