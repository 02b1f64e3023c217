//! Evaluation of a loaded model on competition datasets, whatever the model: multiple-choice
//! rows one example at a time (prompt once, choices batched over it), generation rows in
//! length-sorted batches, progress with examples/s, metrics at the end. With a [`Prompter`]
//! each row's text comes from it, and generate-mode multiple-choice rows are decoded with the
//! generation rows, then their answers extracted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use prompt::{ExtractedBy, Mode, Prompter, Task, TaskKind};

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
    /// Prompting (an entry's `[prompt]`): each row's text, generate-mode multiple choice.
    /// `None`: the raw `input`, the starter kit's semantics.
    pub prompt: Option<Arc<Prompter>>,
    /// Bootstrap standard errors of every metric as `<metric>_stderr` (this many resamples,
    /// seed 0); `None`: none, the kit's scores only.
    pub stderr_resamples: Option<usize>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            max_gen_len: None,
            limit: None,
            scoring: Scoring::StarterKit,
            progress: true,
            prompt: None,
            stderr_resamples: None,
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

fn kind(t: EvalType) -> TaskKind {
    match t {
        EvalType::MultipleChoice => TaskKind::MultipleChoice,
        EvalType::Generation => TaskKind::Generation,
    }
}

/// The prompting task of rows of type `t`, when the options prompt them.
fn task(opts: &EvalOptions, t: EvalType) -> Option<&Task> {
    opts.prompt.as_ref()?.task(kind(t))
}

/// The text a row gives the model (`None`: its raw input) and its token ids: the kit's input
/// tokenizer, or nothing added to a chat template's rendering.
pub fn prompt_ids(
    model: &dyn LanguageModel,
    e: &Example,
    opts: &EvalOptions,
) -> Result<(Option<String>, Vec<u32>)> {
    let tok = model.tokenizer();
    let item = prompt::Item {
        id: &e.id,
        input: &e.input,
        choices: &e.answer_choices,
        kind: kind(e.eval_type),
    };
    let rendered = opts.prompt.as_ref().map(|p| p.render(&item)).transpose()?;
    let (text, ids) = match rendered.flatten() {
        None => (None, tok.encode_input(&e.input)?),
        Some(r) => {
            let ids = if r.chat {
                tok.encode_plain(&r.text)?
            } else {
                tok.encode_input(&r.text)?
            };
            (Some(r.text), ids)
        }
    };
    if ids.is_empty() {
        return Err(Error::Msg("the input tokenizes to no tokens".into()));
    }
    Ok((text, ids))
}

/// The rows of `rows` of type `t` that generate, tokenized and sorted longest first so
/// batches carry little padding: (row index, ids); their prompts go to `texts`.
fn generation_inputs(
    model: &dyn LanguageModel,
    ds: &Dataset,
    rows: &[Example],
    t: EvalType,
    opts: &EvalOptions,
    texts: &mut [Option<String>],
) -> Result<Vec<(usize, Vec<u32>)>> {
    let mut gen = Vec::new();
    for (i, e) in rows.iter().enumerate().filter(|(_, e)| e.eval_type == t) {
        let (text, ids) = prompt_ids(model, e, opts).map_err(|err| row_error(ds, e, err))?;
        texts[i] = text;
        gen.push((i, ids));
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
    // Generate-mode multiple choice is decoded below, with the generation rows.
    let mc_generates =
        task(opts, EvalType::MultipleChoice).is_some_and(|t| t.mode() == Mode::Generate);

    for (i, e) in rows.iter().enumerate() {
        if e.eval_type != EvalType::MultipleChoice || mc_generates {
            continue;
        }
        let t = Instant::now();
        let (prompt, ids) = prompt_ids(model, e, opts).map_err(|err| row_error(ds, e, err))?;
        let r = score_choices(model, &ids, &e.answer_choices, opts.scoring)
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
            prompt,
            ..Default::default()
        });
        pb.inc(1);
    }

    // Generation (then generate-mode multiple choice): tokenize, sort by length so batches
    // carry little padding, decode in batches.
    let defaults = model.generation();
    let mut texts = vec![None; rows.len()];
    for kind in [EvalType::Generation, EvalType::MultipleChoice] {
        let task = task(opts, kind);
        if kind == EvalType::MultipleChoice && !mc_generates {
            continue;
        }
        let max_new = (task.and_then(Task::max_gen_len).or(opts.max_gen_len))
            .unwrap_or(defaults.max_new_tokens);
        let gen = generation_inputs(model, ds, rows, kind, opts, &mut texts)?;
        for batch in generation_batches(&gen, opts.batch_size, max_new) {
            let t = Instant::now();
            let prompts: Vec<Vec<u32>> = batch.iter().map(|(_, ids)| ids.clone()).collect();
            let outs = greedy(model, &prompts, max_new, &defaults.eos_token_ids)
                .map_err(|err| row_error(ds, &rows[batch[0].0], err))?;
            let secs = t.elapsed().as_secs_f64() / batch.len() as f64;
            for ((i, ids), out) in batch.iter().zip(outs) {
                let e = &rows[*i];
                let text = model.tokenizer().decode(&out)?;
                let mut o = ExampleOutcome {
                    id: e.id.clone(),
                    eval_type: kind.as_str(),
                    prediction: task.map_or_else(|| text.clone(), |k| k.postprocess(&text)),
                    target: e.target.clone(),
                    prompt_tokens: ids.len(),
                    output_tokens: vec![out.len()],
                    seconds: secs,
                    prompt: texts[*i].take(),
                    completion: task.map(|_| text),
                    ..Default::default()
                };
                if let (EvalType::MultipleChoice, Some(task)) = (kind, task) {
                    answer(model, task, e, ids, opts.scoring, &mut o)
                        .map_err(|err| row_error(ds, e, err))?;
                }
                results[*i] = Some(o);
            }
            pb.inc(batch.len() as u64);
        }
    }
    pb.finish_and_clear();

    let examples: Vec<ExampleOutcome> = results.into_iter().flatten().collect();
    let scores = compute_scores(&examples, opts.scoring, opts.stderr_resamples);
    Ok(DatasetOutcome {
        name: ds.name.clone(),
        examples,
        scores,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Generate-mode multiple choice: the choice the kept generation names, else (recorded as
/// `loglik`) the one the choices' log-likelihoods given the same prompt pick.
fn answer(
    model: &dyn LanguageModel,
    task: &Task,
    e: &Example,
    ids: &[u32],
    scoring: Scoring,
    o: &mut ExampleOutcome,
) -> Result<()> {
    let (choice, by) = match task.extract(&o.prediction, &e.answer_choices) {
        Some(found) => found,
        None => {
            let r = score_choices(model, ids, &e.answer_choices, scoring)?;
            o.choice_scores = Some(r.scores);
            (r.prediction, ExtractedBy::Loglik)
        }
    };
    o.prediction = choice.to_string();
    o.extracted_by = Some(by.as_str());
    Ok(())
}

/// accuracy (and accuracy_norm in full mode) over multiple-choice rows with targets; ROUGE means
/// over generation rows with targets; with `stderr_resamples`, each one's bootstrap standard
/// error over rows as `<metric>_stderr`.
pub fn compute_scores(
    examples: &[ExampleOutcome],
    scoring: Scoring,
    stderr_resamples: Option<usize>,
) -> BTreeMap<String, f64> {
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
    if let Some(n) = stderr_resamples {
        // Per-row values of every metric, in row order; one seed, so the same resamples.
        let mut rows: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for e in examples {
            let Some(t) = e.target.as_deref() else {
                continue;
            };
            let mut push = |k: &str, v: f64| rows.entry(format!("{k}_stderr")).or_default().push(v);
            if e.eval_type == "multiple_choice" {
                push("accuracy", accuracy([(e.prediction.as_str(), t)]));
                if scoring == Scoring::Full {
                    let p = e.prediction_norm.as_deref().unwrap_or("");
                    push("accuracy_norm", accuracy([(p, t)]));
                }
            } else {
                for (k, v) in rouge(t, &e.prediction).named() {
                    push(k, v);
                }
            }
        }
        for (k, v) in rows {
            s.insert(k, stats::bootstrap_se(&v, n, 0));
        }
    }
    s
}
