//! Running the decoder one block at a time, for merges that alternate forward passes and
//! merging layer by layer (`regmean_plus`): embed a batch once ([`Decoder::embed_batch`]),
//! then push it through block after block ([`Decoder::block_forward`]), replacing a block's
//! weights in between with [`LanguageModel::set_weight`](crate::LanguageModel::set_weight).
//! The same computation as [`Decoder::forward`] without a cache: positions, padding mask
//! and sliding window are its.
//!
//! ```no_run
//! use eval_harness::models::Decoder;
//! # fn demo(model: &Decoder) -> eval_harness::Result<()> {
//! let ids = vec![vec![1, 5, 9], vec![1, 7, 0]];
//! let valid = vec![vec![true; 3], vec![true, true, false]]; // right padding
//! let mut batch = model.embed_batch(&ids, &valid)?;
//! for layer in 0..model.config().num_layers {
//!     batch = model.block_forward(layer, &batch)?;
//! }
//! println!("{:?}", batch.hidden().dims()); // [2, 3, hidden]: before the final norm
//! # Ok(()) }
//! ```

use candle_core::Tensor;

use super::Decoder;
use crate::error::{Error, Result};
use crate::models::attention::Mask;
use crate::models::batch_shape;

/// A batch between two blocks: hidden states `[b, t, hidden]`, which tokens are real, and the
/// rotary angles of their positions (kept, since every block uses the same).
#[derive(Clone)]
pub struct BlockBatch {
    hidden: Tensor,
    valid: Vec<Vec<bool>>,
    rope: (Tensor, Tensor),
}

impl BlockBatch {
    /// The hidden states `[b, t, hidden]` (padding positions included).
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }

    /// Per row, per position: a real token (false: padding).
    pub fn valid(&self) -> &[Vec<bool>] {
        &self.valid
    }
}

impl Decoder {
    /// The input of block 0 for `ids` (`[batch][t]`, equal lengths; `valid` marks real tokens
    /// as in [`Decoder::forward`]): the embeddings (scaled for Gemma) and the positions, which
    /// count the real tokens before each one.
    pub fn embed_batch(&self, ids: &[Vec<u32>], valid: &[Vec<bool>]) -> Result<BlockBatch> {
        let (b, t) = batch_shape(ids, Some(valid), self.cfg.vocab_size)?;
        let mut pos = Vec::with_capacity(b * t);
        for v in valid {
            let mut n = 0f32;
            for &real in v {
                pos.push(n);
                n += f32::from(u8::from(real));
            }
        }
        Ok(BlockBatch {
            hidden: self.embed_ids(ids, (b, t))?,
            valid: valid.to_vec(),
            rope: self.rotary(pos, (b, t))?,
        })
    }

    /// Block `layer` on `batch`: the next block's input (every position; padding positions
    /// are computed but never attended to). Observers installed with
    /// [`Decoder::set_observer`] see the block's linear-layer inputs.
    pub fn block_forward(&self, layer: usize, batch: &BlockBatch) -> Result<BlockBatch> {
        let block = self.layers.get(layer).ok_or_else(|| {
            Error::Msg(format!(
                "block {layer} of a decoder with {} layers",
                self.layers.len()
            ))
        })?;
        let t = batch.hidden.dim(1)?;
        let mask = Mask::new(&batch.valid, 0, t, self.cfg.sliding_window);
        let mut kv = None;
        let (cos, sin) = &batch.rope;
        let hidden = block
            .forward(batch.hidden.clone(), (cos, sin), &mask, (&mut kv, true), 0)?
            .ok_or_else(|| Error::Msg("block_forward on an empty batch".into()))?;
        Ok(BlockBatch {
            hidden,
            ..batch.clone()
        })
    }
}
