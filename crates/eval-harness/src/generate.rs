//! Batched greedy decoding: prompts prefilled one by one and their caches left-padded into one
//! batch (positions still start at 0 for every row), one token per step for all unfinished
//! rows, a row leaving the batch as soon as it emits EOS. Token for token what the kit's
//! batch-size-1 `generate` produces.

use candle_core::{IndexOp, Tensor};

use crate::error::Result;
use crate::models::{Decoder, KvCache};

/// Index of the first maximum of each row of `[rows, vocab]` f32 logits (torch's argmax rule).
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut best = 0usize;
            for (i, &x) in r.iter().enumerate() {
                if x > r[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect())
}

/// Greedily continues each prompt by at most `max_new` tokens, stopping a row at `eos` (which
/// is kept at the end of its output). Returns the generated ids only.
pub fn greedy_batch(
    model: &Decoder,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: u32,
) -> Result<Vec<Vec<u32>>> {
    let mut out = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() || max_new == 0 {
        return Ok(out);
    }
    // Each prompt is prefilled on its own, so no padding is computed (prompts of a batch can
    // differ several-fold in length); the caches are then left-padded into one batch, which
    // decodes exactly as a left-padded batched prefill would.
    let mut caches = Vec::with_capacity(prompts.len());
    let mut last = Vec::with_capacity(prompts.len());
    for p in prompts {
        let mut cache = model.new_cache();
        // Only the last position's hidden state (and vocabulary projection) is needed.
        let hidden = model
            .forward_last(
                std::slice::from_ref(p),
                &[vec![true; p.len()]],
                &mut cache,
                1,
            )?
            .ok_or_else(|| crate::error::Error::Msg("empty prompt".into()))?;
        last.push(hidden.i((.., 0))?);
        caches.push(cache);
    }
    let mut cache = KvCache::stack_left_padded(&caches)?;
    drop(caches);
    let mut next = argmax_rows(&model.logits(&Tensor::cat(&last, 0)?)?)?;
    // Rows of the running batch, as indices into `prompts`.
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..max_new {
        let mut keep = Vec::with_capacity(active.len());
        for (slot, &row) in active.iter().enumerate() {
            out[row].push(next[slot]);
            if next[slot] != eos {
                keep.push(slot);
            }
        }
        if keep.is_empty() || step + 1 == max_new {
            break;
        }
        if keep.len() != active.len() {
            cache.select(&keep)?;
            active = keep.iter().map(|&s| active[s]).collect();
            next = keep.iter().map(|&s| next[s]).collect();
        }
        let ids: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        let h = model.forward(&ids, &vec![vec![true]; ids.len()], &mut cache)?;
        next = argmax_rows(&model.logits(&h.i((.., 0))?)?)?;
    }
    Ok(out)
}
