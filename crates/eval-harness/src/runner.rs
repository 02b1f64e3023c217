//! Evaluation of a loaded model on competition datasets: multiple-choice rows one example at a
//! time (prompt once, choices batched over its cache), generation rows in length-sorted
//! batches, progress with examples/s, metrics at the end.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::dataset::{Dataset, EvalType};
use crate::error::{Error, Result};
use crate::generate::greedy_batch;
use crate::metrics::{accuracy, rouge, Rouge};
use crate::models::{Decoder, DecoderConfig};
use crate::report::{DatasetOutcome, ExampleOutcome};
use crate::score::{score_choices, Scoring};
use crate::tokenize::EvalTokenizer;
use crate::weights::{CheckpointSource, WeightSource};

/// Settings of an evaluation run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Generation rows decoded together, counted in rows of up to [`TOKENS_PER_BATCH_ROW`]
    /// cached tokens (see [`generation_batches`]; multiple choice batches the choices of one
    /// example).
    pub batch_size: usize,
    /// Most new tokens per generation (the kit's max_gen_len). `None`: decoders use
    /// [`DEFAULT_MAX_GEN_LEN`], encoder-decoders the model's generation config (as the kit's
    /// `flant5_avg`, which sets none).
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

/// New tokens per generation for decoder-only models when none is set (the kit's baselines).
pub const DEFAULT_MAX_GEN_LEN: usize = 64;

/// Generation rows decoded together when none is set. On the CPU each decoding step streams
/// all the weights once for the whole batch, so 32 rows cost little more than 8; on a GPU the
/// cache is what grows (Llama-2-7B in bf16: about 16 GB for 32 × 1024 tokens).
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// Cached tokens (prompt + new) one unit of the batch size stands for: a generation batch of
/// batch size N holds at most N rows and at most N × this many cached tokens, so long prompts
/// decode in smaller batches and the KV cache's memory is bounded whatever the prompts' length.
pub const TOKENS_PER_BATCH_ROW: usize = 1024;

/// Splits generation inputs sorted longest first (as [`generation_inputs`] returns them) into
/// decoding batches for `batch_size` (see [`TOKENS_PER_BATCH_ROW`]); a single row longer than
/// the whole budget still gets a batch of its own.
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

/// Parses `f32|float32|bf16|bfloat16|f16|float16`.
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(format!("unknown dtype `{s}` (f32, bf16 or f16)")),
    }
}

/// A dtype setting for `device`: `auto` is bf16 on a GPU (fast, within rounding of f32) and f32
/// on the CPU (the kit's exact numbers, and faster than bf16 there); otherwise as
/// [`parse_dtype`].
pub fn resolve_dtype(s: &str, device: &Device) -> std::result::Result<DType, String> {
    match s {
        "auto" => Ok(if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        }),
        _ => parse_dtype(s).map_err(|e| e.replace("(f32,", "(auto, f32,")),
    }
}

/// A model and its tokenizer, ready to evaluate.
pub struct LoadedModel {
    /// The network.
    pub model: Decoder,
    /// The kit's tokenizers.
    pub tok: EvalTokenizer,
}

impl LoadedModel {
    /// Loads `config.json`, the tokenizer files and the weights from `source`.
    pub fn load_with(
        dir: &Path,
        source: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cfg = DecoderConfig::from_file(&dir.join("config.json"))?;
        let tok = EvalTokenizer::from_dir(dir, cfg.eos_token_ids.first().copied())?;
        if tok.vocab_size() > cfg.vocab_size {
            tracing::warn!(
                "tokenizer has {} tokens, the model's vocabulary {}",
                tok.vocab_size(),
                cfg.vocab_size
            );
        }
        let model = Decoder::load(cfg, source, dtype, device)?;
        Ok(LoadedModel { model, tok })
    }

    /// Loads a model directory (any checkpoint layout merge-core reads), optionally folding a
    /// PEFT LoRA adapter into the weights.
    pub fn load(dir: &Path, adapter: Option<&Path>, dtype: DType, device: &Device) -> Result<Self> {
        let src = CheckpointSource::open(dir, adapter)?;
        Self::load_with(dir, &src, dtype, device)
    }
}

/// A loaded model of either kind, chosen from `config.json`'s `model_type`, so callers need
/// no flag to tell T5 from a decoder.
pub enum AnyModel {
    /// Decoder-only (Llama, Mistral, Qwen2, Gemma).
    Decoder(LoadedModel),
    /// Encoder-decoder (T5, Flan-T5, mT5).
    Seq2Seq(crate::seq2seq::Seq2SeqModel),
}

impl AnyModel {
    /// Loads a model directory, optionally folding a PEFT LoRA adapter into the weights.
    pub fn load(dir: &Path, adapter: Option<&Path>, dtype: DType, device: &Device) -> Result<Self> {
        let p = dir.join("config.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: p.clone(),
            message: format!("invalid JSON: {e}"),
        })?;
        let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        if crate::models::t5::T5_MODEL_TYPES.contains(&model_type) {
            Ok(AnyModel::Seq2Seq(crate::seq2seq::Seq2SeqModel::load(
                dir, adapter, dtype, device,
            )?))
        } else {
            Ok(AnyModel::Decoder(LoadedModel::load(
                dir, adapter, dtype, device,
            )?))
        }
    }

    /// Evaluates one dataset with whichever evaluation the model's kind needs.
    pub fn evaluate(&self, ds: &Dataset, opts: &EvalOptions) -> Result<DatasetOutcome> {
        match self {
            AnyModel::Decoder(m) => evaluate(m, ds, opts),
            AnyModel::Seq2Seq(m) => crate::seq2seq::evaluate(m, ds, opts),
        }
    }

    /// `decoder` or `encoder-decoder`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyModel::Decoder(_) => "decoder",
            AnyModel::Seq2Seq(_) => "encoder-decoder",
        }
    }
}

/// The generation rows of `rows`, tokenized with `encode` and sorted longest first so batches
/// carry little padding: (row index, ids). An empty tokenization is an error naming the row.
pub(crate) fn generation_inputs(
    ds: &Dataset,
    rows: &[crate::dataset::Example],
    encode: impl Fn(&str) -> Result<Vec<u32>>,
) -> Result<Vec<(usize, Vec<u32>)>> {
    let with_ctx = |e: Error, id: &str, line: u64| {
        Error::Msg(format!("{}:{line}: row id `{id}`: {e}", ds.path.display()))
    };
    let mut gen = Vec::new();
    for (i, e) in rows.iter().enumerate() {
        if e.eval_type == EvalType::Generation {
            let ids = encode(&e.input).map_err(|err| with_ctx(err, &e.id, e.line))?;
            if ids.is_empty() {
                return Err(with_ctx(
                    Error::Msg("the input tokenizes to no tokens".into()),
                    &e.id,
                    e.line,
                ));
            }
            gen.push((i, ids));
        }
    }
    gen.sort_by_key(|(_, ids)| std::cmp::Reverse(ids.len()));
    Ok(gen)
}

pub(crate) fn progress(n: usize, name: &str, show: bool) -> ProgressBar {
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
pub fn evaluate(m: &LoadedModel, ds: &Dataset, opts: &EvalOptions) -> Result<DatasetOutcome> {
    let start = Instant::now();
    let rows = &ds.examples[..opts.limit.unwrap_or(usize::MAX).min(ds.examples.len())];
    let pb = progress(rows.len(), &ds.name, opts.progress);
    let mut results: Vec<Option<ExampleOutcome>> = vec![None; rows.len()];
    let with_ctx = |e: Error, id: &str, line: u64| {
        Error::Msg(format!("{}:{line}: row id `{id}`: {e}", ds.path.display()))
    };

    for (i, e) in rows.iter().enumerate() {
        if e.eval_type != EvalType::MultipleChoice {
            continue;
        }
        let t = Instant::now();
        let r = score_choices(&m.model, &m.tok, &e.input, &e.answer_choices, opts.scoring)
            .map_err(|err| with_ctx(err, &e.id, e.line))?;
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
    let gen = generation_inputs(ds, rows, |t| m.tok.encode_input(t))?;
    let max_new = opts.max_gen_len.unwrap_or(DEFAULT_MAX_GEN_LEN);
    for batch in generation_batches(&gen, opts.batch_size, max_new) {
        let t = Instant::now();
        let prompts: Vec<Vec<u32>> = batch.iter().map(|(_, ids)| ids.clone()).collect();
        let outs = greedy_batch(&m.model, &prompts, max_new, m.tok.eos_id()).map_err(|err| {
            let e = &rows[batch[0].0];
            with_ctx(err, &e.id, e.line)
        })?;
        let secs = t.elapsed().as_secs_f64() / batch.len() as f64;
        for ((i, ids), out) in batch.iter().zip(outs) {
            let e = &rows[*i];
            let text = m.tok.decode(&out)?;
            results[*i] = Some(ExampleOutcome {
                id: e.id.clone(),
                eval_type: EvalType::Generation.as_str(),
                prediction: text,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_dtype_is_f32_on_the_cpu_and_names_are_checked() {
        assert_eq!(resolve_dtype("auto", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(resolve_dtype("bf16", &Device::Cpu).unwrap(), DType::BF16);
        assert_eq!(resolve_dtype("float16", &Device::Cpu).unwrap(), DType::F16);
        let e = resolve_dtype("fp8", &Device::Cpu).unwrap_err();
        assert!(e.contains("`fp8`") && e.contains("auto"), "{e}");
    }

    #[test]
    fn generation_batches_bound_rows_and_cached_tokens() {
        let rows = |lens: &[usize]| -> Vec<(usize, Vec<u32>)> {
            lens.iter()
                .enumerate()
                .map(|(i, &n)| (i, vec![0; n]))
                .collect()
        };
        let sizes = |g: &[(usize, Vec<u32>)], bs: usize, new: usize| -> Vec<usize> {
            generation_batches(g, bs, new)
                .iter()
                .map(|b| b.len())
                .collect()
        };
        // Short prompts: batches of `batch_size` rows.
        assert_eq!(sizes(&rows(&[100; 70]), 32, 64), vec![32, 32, 6]);
        // Long ones (longest first): 4 × 1024 tokens hold 2 rows of 1936 + 64, or 4 of 900 + 64.
        let g = rows(&[1936, 1936, 1936, 900, 900, 900, 900, 900]);
        assert_eq!(sizes(&g, 4, 64), vec![2, 2, 4]);
        // A row longer than the whole budget still gets a batch.
        assert_eq!(sizes(&rows(&[50_000, 10]), 2, 64), vec![1, 1]);
        // Every row once, in order.
        let all: Vec<usize> = generation_batches(&g, 3, 64)
            .iter()
            .flat_map(|b| b.iter().map(|(i, _)| *i))
            .collect();
        assert_eq!(all, (0..g.len()).collect::<Vec<_>>());
        assert!(generation_batches(&rows(&[]), 8, 64).is_empty());
        assert_eq!(sizes(&rows(&[10, 10]), 0, 64), vec![1, 1]);
    }
}
