//! Multiple-choice scoring, one scorer for every model: the prompt is prefilled once and every
//! choice scored from it ([`LanguageModel::continuation_log_probs`]).
//!
//! `StarterKit` reproduces the official kit: choices come from the *target* tokenizer; for
//! decoders the scores shift inside the choice only (logits at choice positions 0..n-2 score
//! tokens 1..n-1, so the first choice token is never scored), for encoder-decoders every
//! choice token is scored given the encoder output; score = sum of log-probs, prediction =
//! first argmax. `Full` scores every choice token given the input (a leading BOS that the
//! target tokenizer may add is dropped) and also reports the lm-evaluation-harness style
//! length-normalised choice (log-likelihood divided by the choice's character length).

use crate::error::{Error, Result};
use crate::greedy::first_argmax;
use crate::lm::{LanguageModel, ModelKind};

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

/// Scores the choices of one example given its prompt's token ids (the kit's: the input
/// tokenizer's ids of the row's input).
pub fn score_choices(
    model: &dyn LanguageModel,
    ids: &[u32],
    choices: &[String],
    mode: Scoring,
) -> Result<ChoiceResult> {
    let tok = model.tokenizer();
    if ids.is_empty() {
        return Err(Error::Msg("the input tokenizes to no tokens".into()));
    }
    if choices.is_empty() {
        return Err(Error::Msg("a multiple-choice row without choices".into()));
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
    // The kit's decoder quirk: the first choice token is context, never scored.
    let first_scored =
        usize::from(mode == Scoring::StarterKit && model.kind() == ModelKind::Decoder);
    let log_probs = model.continuation_log_probs(ids, &cids, first_scored)?;
    let scores: Vec<f64> = log_probs
        .iter()
        .map(|lp| lp.iter().fold(0f64, |s, &v| s + v as f64))
        .collect();
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
        prompt_tokens: ids.len(),
        choice_tokens: cids.iter().map(Vec::len).collect(),
    })
}
