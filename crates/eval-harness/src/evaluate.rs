//! Evaluation of a loaded model on competition datasets, whatever the model: multiple-choice
//! rows one example at a time (prompt once, choices batched over it), generation rows in
//! length-sorted batches, progress with examples/s, metrics at the end.

use std::collections::BTreeMap;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::choices::{score_choices, Scoring};
use crate::dataset::{Dataset, EvalType, Example};
use crate::error::{Error, Result};
use crate::greedy::{generation_batches, greedy};
use crate::lm::LanguageModel;
use crate::metrics::{accuracy, rouge, Rouge};
use crate::report::{DatasetOutcome, ExampleOutcome};

/// Settings of an evaluation run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Generation rows decoded together, counted in rows of up to
    /// [`crate::greedy::TOKENS_PER_BATCH_ROW`] cached tokens (see
    /// [`crate::greedy::generation_batches`]; multiple choice batches the choices of one
    /// example).
    pub batch_size: usize,
    /// Most new tokens per generation (the kit's max_gen_len). `None`: the model's default
    /// (decoders [`crate::models::decoder::DEFAULT_MAX_GEN_LEN`], encoder-decoders their
    /// generation config, as the kit's `flant5_avg`, which sets none).
    pub max_gen_len: Option<usize>,
    /// Only the first N rows of each dataset.
    pub limit: Option<usize>,
    /// Multiple-choice scoring rule.
    pub scoring: Scoring,
    /// Show a progress bar (it hides itself anyway when stderr is not a terminal).
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            max_gen_len: None,
            limit: None,
            scoring: Scoring::StarterKit,
            progress: true,
        }
    }
}

/// Generation rows decoded together when none is set. On the CPU each decoding step streams
/// all the weights once for the whole batch, so 32 rows cost little more than 8; on a GPU the
/// cache is what grows (Llama-2-7B in bf16: about 16 GB for 32 × 1024 tokens).
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// `e`, an error about row `ex` of `ds`.
fn row_error(ds: &Dataset, ex: &Example, e: Error) -> Error {
    Error::Row {
        path: ds.path.clone(),
        line: ex.line,
        id: ex.id.clone(),
        source: Box::new(e),
    }
}

/// The generation rows of `rows`, tokenized with the model's input tokenizer and sorted
/// longest first so batches carry little padding: (row index, ids). An empty tokenization is
/// an error naming the row.
fn generation_inputs(
    model: &dyn LanguageModel,
    ds: &Dataset,
    rows: &[Example],
) -> Result<Vec<(usize, Vec<u32>)>> {
    let mut gen = Vec::new();
    for (i, e) in rows.iter().enumerate() {
        if e.eval_type == EvalType::Generation {
            let ids = model
                .tokenizer()
                .encode_input(&e.input)
                .map_err(|err| row_error(ds, e, err))?;
            if ids.is_empty() {
                let err = Error::Msg("the input tokenizes to no tokens".into());
                return Err(row_error(ds, e, err));
            }
            gen.push((i, ids));
        }
    }
    gen.sort_by_key(|(_, ids)| std::cmp::Reverse(ids.len()));
    Ok(gen)
}

fn progress(n: usize, name: &str, show: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        Some(n as u64),
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec:>10} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(name.to_string());
    pb
}

/// Evaluates one dataset: predictions for every row, metrics where targets exist.
pub fn evaluate(
    model: &dyn LanguageModel,
    ds: &Dataset,
    opts: &EvalOptions,
) -> Result<DatasetOutcome> {
    let start = Instant::now();
    let rows = &ds.examples[..opts.limit.unwrap_or(usize::MAX).min(ds.examples.len())];
    let pb = progress(rows.len(), &ds.name, opts.progress);
    let mut results: Vec<Option<ExampleOutcome>> = vec![None; rows.len()];

    for (i, e) in rows.iter().enumerate() {
        if e.eval_type != EvalType::MultipleChoice {
            continue;
        }
        let t = Instant::now();
        let r = score_choices(model, &e.input, &e.answer_choices, opts.scoring)
            .map_err(|err| row_error(ds, e, err))?;
        results[i] = Some(ExampleOutcome {
            id: e.id.clone(),
            eval_type: EvalType::MultipleChoice.as_str(),
            prediction: r.prediction.to_string(),
            target: e.target.clone(),
            choice_scores: Some(r.scores),
            choice_scores_norm: r.norm_scores,
            prediction_norm: r.prediction_norm.map(|p| p.to_string()),
            prompt_tokens: r.prompt_tokens,
            output_tokens: r.choice_tokens,
            seconds: t.elapsed().as_secs_f64(),
        });
        pb.inc(1);
    }

    // Generation: tokenize, sort by length so batches carry little padding, decode in batches.
    let gen = generation_inputs(model, ds, rows)?;
    let defaults = model.generation();
    let max_new = opts.max_gen_len.unwrap_or(defaults.max_new_tokens);
    for batch in generation_batches(&gen, opts.batch_size, max_new) {
        let t = Instant::now();
        let prompts: Vec<Vec<u32>> = batch.iter().map(|(_, ids)| ids.clone()).collect();
        let outs = greedy(model, &prompts, max_new, &defaults.eos_token_ids)
            .map_err(|err| row_error(ds, &rows[batch[0].0], err))?;
        let secs = t.elapsed().as_secs_f64() / batch.len() as f64;
        for ((i, ids), out) in batch.iter().zip(outs) {
            let e = &rows[*i];
            results[*i] = Some(ExampleOutcome {
                id: e.id.clone(),
                eval_type: EvalType::Generation.as_str(),
                prediction: model.tokenizer().decode(&out)?,
                target: e.target.clone(),
                choice_scores: None,
                choice_scores_norm: None,
                prediction_norm: None,
                prompt_tokens: ids.len(),
                output_tokens: vec![out.len()],
                seconds: secs,
            });
        }
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();

    let examples: Vec<ExampleOutcome> = results.into_iter().flatten().collect();
    let scores = compute_scores(&examples, opts.scoring);
    Ok(DatasetOutcome {
        name: ds.name.clone(),
        examples,
        scores,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// accuracy (and accuracy_norm in full mode) over multiple-choice rows with targets; ROUGE means
/// over generation rows with targets.
pub fn compute_scores(examples: &[ExampleOutcome], scoring: Scoring) -> BTreeMap<String, f64> {
    let mut s = BTreeMap::new();
    let mc: Vec<&ExampleOutcome> = examples
        .iter()
        .filter(|e| e.eval_type == "multiple_choice" && e.target.is_some())
        .collect();
    if !mc.is_empty() {
        s.insert(
            "accuracy".into(),
            accuracy(
                mc.iter()
                    .map(|e| (e.prediction.as_str(), e.target.as_deref().unwrap())),
            ),
        );
        if scoring == Scoring::Full {
            s.insert(
                "accuracy_norm".into(),
                accuracy(mc.iter().map(|e| {
                    (
                        e.prediction_norm.as_deref().unwrap_or(""),
                        e.target.as_deref().unwrap(),
                    )
                })),
            );
        }
    }
    let rg: Vec<Rouge> = examples
        .iter()
        .filter(|e| e.eval_type == "generation")
        .filter_map(|e| e.target.as_deref().map(|t| rouge(t, &e.prediction)))
        .collect();
    if !rg.is_empty() {
        for (k, v) in Rouge::mean(&rg).named() {
            s.insert(k.into(), v);
        }
    }
    s
}
