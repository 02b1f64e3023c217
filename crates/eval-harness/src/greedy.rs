//! Batched greedy decoding for every model: prompts prefilled into one state, one token per
//! step for all unfinished rows, a row leaving the batch as soon as it emits an EOS id (kept at
//! the end of its output), torch's first-argmax rule. Token for token what the kit's
//! batch-size-1 `generate` produces. Also the batching policy for generation rows.

use candle_core::Tensor;

use crate::error::Result;
use crate::lm::LanguageModel;

/// Cached tokens (prompt + new) one unit of the batch size stands for: a generation batch of
/// batch size N holds at most N rows and at most N × this many cached tokens, so long prompts
/// decode in smaller batches and the KV cache's memory is bounded whatever the prompts' length.
pub const TOKENS_PER_BATCH_ROW: usize = 1024;

/// Index of the first maximum (torch's argmax and the kit's tie rule).
pub fn first_argmax<T: PartialOrd>(xs: &[T]) -> usize {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best
}

/// [`first_argmax`] of each row of `[rows, vocab]` f32 logits.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    Ok(rows.iter().map(|r| first_argmax(r) as u32).collect())
}

/// Greedily continues each prompt by at most `max_new` tokens, stopping a row at any of `eos`.
/// Returns the generated ids only.
pub fn greedy(
    model: &dyn LanguageModel,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let mut out = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() || max_new == 0 {
        return Ok(out);
    }
    let (mut state, logits) = model.start_greedy(prompts)?;
    let mut next = argmax_rows(&logits)?;
    // Rows of the running batch, as indices into `prompts`.
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..max_new {
        let mut keep = Vec::with_capacity(active.len());
        for (slot, &row) in active.iter().enumerate() {
            out[row].push(next[slot]);
            if !eos.contains(&next[slot]) {
                keep.push(slot);
            }
        }
        if keep.is_empty() || step + 1 == max_new {
            break;
        }
        if keep.len() != active.len() {
            state.retain(&keep)?;
            active = keep.iter().map(|&s| active[s]).collect();
            next = keep.iter().map(|&s| next[s]).collect();
        }
        next = argmax_rows(&state.step(&next)?)?;
    }
    Ok(out)
}

/// Splits generation inputs sorted longest first (`(row, ids)`) into decoding batches for
/// `batch_size` (see [`TOKENS_PER_BATCH_ROW`]); a single row longer than the whole budget
/// still gets a batch of its own.
pub fn generation_batches<T>(
    gen: &[(usize, Vec<T>)],
    batch_size: usize,
    max_new: usize,
) -> Vec<&[(usize, Vec<T>)]> {
    let batch_size = batch_size.max(1);
    let mut batches = Vec::new();
    let mut rest = gen;
    while let Some((_, first)) = rest.first() {
        // The first row is the batch's longest: it sets every row's padded cache length.
        let fit = batch_size * TOKENS_PER_BATCH_ROW / (first.len() + max_new).max(1);
        let (batch, tail) = rest.split_at(fit.clamp(1, batch_size).min(rest.len()));
        batches.push(batch);
        rest = tail;
    }
    batches
}
