//! Multiple-choice scoring. The prompt runs once per example; its KV cache is repeated for all
//! choices, which run on top of it in one batched pass.
//!
//! `StarterKit` reproduces the official kit: choices come from the *target* tokenizer, the
//! scores shift inside the choice only (logits at choice positions 0..n-2 score tokens 1..n-1,
//! so the first choice token is never scored), score = sum of log-probs, prediction = first
//! argmax. `Full` scores every choice token given the input (a leading BOS that the target
//! tokenizer may add is dropped) and also reports the lm-evaluation-harness style
//! length-normalised choice (log-likelihood divided by the choice's character length).

use candle_core::{DType, IndexOp, Tensor, D};

use crate::error::{Error, Result};
use crate::models::Decoder;
use crate::tokenize::EvalTokenizer;

/// How choices are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scoring {
    /// Exactly what the official starter kit computes.
    #[default]
    StarterKit,
    /// Every choice token scored given the input; adds `accuracy_norm`.
    Full,
}

impl std::str::FromStr for Scoring {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "starter-kit" | "starter_kit" => Ok(Scoring::StarterKit),
            "full" => Ok(Scoring::Full),
            _ => Err(format!("unknown scoring `{s}` (starter-kit or full)")),
        }
    }
}

/// The outcome for one multiple-choice example.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChoiceResult {
    /// Summed log-probability per choice.
    pub scores: Vec<f64>,
    /// Index of the first maximal score.
    pub prediction: usize,
    /// `Full` mode: scores divided by the choice's character length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_scores: Option<Vec<f64>>,
    /// `Full` mode: first argmax of `norm_scores`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_norm: Option<usize>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens per choice (as scored).
    pub choice_tokens: Vec<usize>,
}

/// Index of the first maximum (the kit's tie rule).
pub fn first_argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(logits)[row, targets[row]]` for every row of `logits` (`[.., vocab]`, f32),
/// without materialising the log-softmax: one pass for the maximum and one for the sum of
/// exponentials per row (vectorised where the CPU allows), rows in parallel.
pub(crate) fn picked_log_probs(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let vocab = logits.dim(D::Minus1)?;
    let flat: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if flat.len() != targets.len() * vocab {
        return Err(Error::Msg(format!(
            "{} targets for {} rows of logits",
            targets.len(),
            flat.len() / vocab.max(1)
        )));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Msg(format!(
            "target id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(flat
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let lse = crate::models::vector_math::log_sum_exp(row).unwrap_or_else(|| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln()
            });
            row[t as usize] - lse
        })
        .collect())
}

/// Scores the choices of one example.
pub fn score_choices(
    model: &Decoder,
    tok: &EvalTokenizer,
    input: &str,
    choices: &[String],
    mode: Scoring,
) -> Result<ChoiceResult> {
    let ids = tok.encode_input(input)?;
    if ids.is_empty() {
        return Err(Error::Msg("the input tokenizes to no tokens".into()));
    }
    let mut cids = choices
        .iter()
        .map(|c| tok.encode_target(c))
        .collect::<Result<Vec<_>>>()?;
    if mode == Scoring::Full {
        for c in cids.iter_mut() {
            if c.len() > 1 && tok.bos_id() == Some(c[0]) {
                c.remove(0);
            }
        }
    }
    let n = ids.len();
    let mut cache = model.new_cache();
    // Starter-kit scoring needs no prompt logits at all; full scoring only the last position's.
    let keep = usize::from(mode == Scoring::Full);
    let hidden = model.forward_last(
        std::slice::from_ref(&ids),
        &[vec![true; n]],
        &mut cache,
        keep,
    )?;
    let mut scores = vec![0f64; choices.len()];

    if let Some(hidden) = hidden {
        // The prompt's last position predicts each choice's first token.
        let last = hidden.i((0, 0..1))?;
        let lp = candle_nn::ops::log_softmax(&model.logits(&last)?, D::Minus1)?;
        let lp: Vec<f32> = lp.squeeze(0)?.to_vec1()?;
        for (s, c) in scores.iter_mut().zip(&cids) {
            if let Some(&first) = c.first() {
                *s += lp[first as usize] as f64;
            }
        }
    }

    // Choice tokens 0..L-2 are the inputs whose logits score tokens 1..L-1.
    let max_len = cids.iter().map(Vec::len).max().unwrap_or(0);
    if max_len >= 2 {
        let width = max_len - 1;
        let pad = tok.pad_id();
        let rows: Vec<Vec<u32>> = cids
            .iter()
            .map(|c| {
                (0..width)
                    .map(|j| c.get(j).copied().unwrap_or(pad))
                    .collect()
            })
            .collect();
        let valid: Vec<Vec<bool>> = cids
            .iter()
            .map(|c| (0..width).map(|j| j < c.len()).collect())
            .collect();
        let mut cache = cache.repeat(choices.len())?;
        let h = model.forward(&rows, &valid, &mut cache)?;
        // The log-prob of each next choice token; padding targets point at token 0 and are
        // masked out below.
        let targets: Vec<u32> = cids
            .iter()
            .flat_map(|c| (0..width).map(move |j| c.get(j + 1).copied().unwrap_or(0)))
            .collect();
        let picked = picked_log_probs(&model.logits(&h)?, &targets)?;
        let picked: Vec<&[f32]> = picked.chunks(width).collect();
        for ((s, c), row) in scores.iter_mut().zip(&cids).zip(picked) {
            for (j, &v) in row.iter().enumerate() {
                if j + 1 < c.len() {
                    *s += v as f64;
                }
            }
        }
    }

    let prediction = first_argmax(&scores);
    let (norm_scores, prediction_norm) = if mode == Scoring::Full {
        let norm: Vec<f64> = scores
            .iter()
            .zip(choices)
            .map(|(s, c)| s / c.chars().count().max(1) as f64)
            .collect();
        let p = first_argmax(&norm);
        (Some(norm), Some(p))
    } else {
        (None, None)
    };
    Ok(ChoiceResult {
        scores,
        prediction,
        norm_scores,
        prediction_norm,
        prompt_tokens: n,
        choice_tokens: cids.iter().map(Vec::len).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_pick_the_first() {
        assert_eq!(first_argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(first_argmax(&[0.0, 0.0]), 0);
        assert_eq!(first_argmax(&[-2.0, -1.0]), 1);
    }
}
