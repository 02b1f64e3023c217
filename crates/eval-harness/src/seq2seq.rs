//! Encoder-decoder (T5 / Flan-T5) evaluation with the official starter kit's semantics
//! (docs/starter-kit-semantics.md, "Encoder-decoder models"):
//!
//! - one tokenizer, `tokenizer.json` as shipped (T5's post-processor appends `</s>` to every
//!   text), truncation at `model_max_length` from `tokenizer_config.json` (512 for flan-t5),
//!   rows right-padded and masked;
//! - multiple choice: the encoder runs once; each choice's ids (with EOS) are the labels, the
//!   decoder inputs are the labels shifted right behind the decoder start token (pad, 0),
//!   shorter choices padded with 0 and masked; every label token (the first included) is
//!   scored, score = sum of log-probs, prediction = first argmax;
//! - generation: greedy from the decoder start token, `max_gen_len` new tokens when given,
//!   else the model's generation config (`max_new_tokens`, or `max_length` 20 counting the
//!   start token), stopping at EOS; the output is decoded with special tokens skipped and, as
//!   transformers 4.39 does unless `tokenizer_config.json` says otherwise, the tokenization
//!   spaces cleaned up.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::dataset::{Dataset, EvalType};
use crate::error::{Error, Result};
use crate::models::t5::{T5Config, T5};
use crate::report::{DatasetOutcome, ExampleOutcome};
use crate::runner::{compute_scores, generation_batches, generation_inputs, progress, EvalOptions};
use crate::score::{first_argmax, ChoiceResult, Scoring};
use crate::tokenize::clean_up_tokenization;
use crate::weights::{CheckpointSource, WeightSource};

/// transformers writes `model_max_length` as `int(1e30)` when a tokenizer has no limit.
const UNLIMITED: f64 = 1e18;

/// The T5 tokenizer as the kit uses it.
pub struct Seq2SeqTokenizer {
    tok: tokenizers::Tokenizer,
    max_length: Option<usize>,
    eos_id: u32,
    pad_id: u32,
    clean_up_spaces: bool,
}

impl std::fmt::Debug for Seq2SeqTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seq2SeqTokenizer")
            .field("max_length", &self.max_length)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("clean_up_spaces", &self.clean_up_spaces)
            .finish()
    }
}

fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Seq2SeqTokenizer {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from a model directory;
    /// `cfg` supplies EOS and pad ids when the tokenizer config names none.
    pub fn from_dir(dir: &Path, cfg: &T5Config) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&tj).map_err(|e| Error::Config {
            path: tj.clone(),
            message: format!(
                "cannot read the tokenizer ({e}); the model directory needs a tokenizer.json"
            ),
        })?;
        let cp = dir.join("tokenizer_config.json");
        let config = match std::fs::read_to_string(&cp) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| Error::Config {
                path: cp.clone(),
                message: format!("invalid JSON: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
            Err(e) => return Err(Error::io(cp, e)),
        };
        Self::from_json(&json, &config, cfg).map_err(|e| match e {
            Error::Msg(m) => Error::Config {
                path: tj,
                message: m,
            },
            other => other,
        })
    }

    /// Builds from the text of a tokenizer.json and a parsed tokenizer_config.json.
    pub fn from_json(
        tokenizer_json: &str,
        config: &serde_json::Value,
        cfg: &T5Config,
    ) -> Result<Self> {
        let mut tok: tokenizers::Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| Error::Tokenizer(format!("cannot parse tokenizer.json: {e}")))?;
        tok.with_padding(None);
        let max_length = match config.get("model_max_length").and_then(|v| v.as_f64()) {
            Some(m) if m < UNLIMITED => {
                if m < 2.0 {
                    return Err(Error::Msg(format!(
                        "model_max_length {m} in tokenizer_config.json is too small"
                    )));
                }
                Some(m as usize)
            }
            _ => None,
        };
        // tokenizers' truncation leaves room for the post-processor's special tokens, as
        // transformers' `truncation=True` does: the text is cut, `</s>` stays.
        tok.with_truncation(max_length.map(|max_length| tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let id_of = |t: Option<String>| -> Result<Option<u32>> {
            match t {
                None => Ok(None),
                Some(t) => tok.token_to_id(&t).map(Some).ok_or_else(|| {
                    Error::Msg(format!("special token `{t}` is not in the vocabulary"))
                }),
            }
        };
        let eos_id = id_of(token_text(config.get("eos_token")))?.unwrap_or(cfg.eos_token_id);
        let pad_id = id_of(token_text(config.get("pad_token")))?.unwrap_or(cfg.pad_token_id);
        // transformers 4.39 (the kit's) cleans up unless the config says false; T5 configs
        // do not say.
        let clean_up_spaces = config
            .get("clean_up_tokenization_spaces")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        Ok(Seq2SeqTokenizer {
            tok,
            max_length,
            eos_id,
            pad_id,
            clean_up_spaces,
        })
    }

    /// The ids of `text` as the kit's tokenizer call produces them: post-processed (EOS
    /// appended by T5's template) and truncated to `model_max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes with special tokens skipped, then the optional space clean-up.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let s = self
            .tok
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&s)
        } else {
            s
        })
    }

    /// Inputs are cut to this many tokens (EOS included), when the tokenizer has a limit.
    pub fn max_length(&self) -> Option<usize> {
        self.max_length
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
}

/// The parts of a model's generation config that greedy decoding uses.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSettings {
    /// Total output length, decoder start token included (transformers' default 20).
    pub max_length: usize,
    /// New tokens, when the config sets it (it then wins over `max_length`).
    pub max_new_tokens: Option<usize>,
    /// First decoder input.
    pub decoder_start_token_id: u32,
    /// Generation stops at any of these.
    pub eos_token_ids: Vec<u32>,
}

fn ids_of(v: Option<&serde_json::Value>) -> Option<Vec<u32>> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64().map(|x| vec![x as u32]),
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
        ),
        _ => None,
    }
}

impl GenerationSettings {
    /// From `generation_config.json` when the directory has one, else from `config.json`, as
    /// transformers builds a model's generation config (unset fields take its defaults).
    pub fn from_dir(dir: &Path, cfg: &T5Config) -> Result<Self> {
        let read = |p: &Path| -> Result<Option<serde_json::Value>> {
            match std::fs::read_to_string(p) {
                Ok(s) => serde_json::from_str(&s)
                    .map(Some)
                    .map_err(|e| Error::Config {
                        path: p.to_path_buf(),
                        message: format!("invalid JSON: {e}"),
                    }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(p, e)),
            }
        };
        let gp = dir.join("generation_config.json");
        let v = match read(&gp)? {
            Some(v) => v,
            None => read(&dir.join("config.json"))?.unwrap_or_else(|| serde_json::json!({})),
        };
        Ok(Self::from_json(&v, cfg))
    }

    /// Interprets a generation config (or config.json) object.
    pub fn from_json(v: &serde_json::Value, cfg: &T5Config) -> Self {
        let usize_of = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        for k in ["num_beams", "num_beam_groups"] {
            if usize_of(k).is_some_and(|n| n > 1) {
                tracing::warn!("the generation config sets {k} > 1; the kit decodes greedily");
            }
        }
        GenerationSettings {
            max_length: usize_of("max_length").unwrap_or(20),
            max_new_tokens: usize_of("max_new_tokens"),
            decoder_start_token_id: usize_of("decoder_start_token_id")
                .map_or(cfg.decoder_start_token_id, |x| x as u32),
            eos_token_ids: ids_of(v.get("eos_token_id")).unwrap_or_else(|| vec![cfg.eos_token_id]),
        }
    }

    /// New tokens to generate: `max_gen_len` when the caller sets it, else the config's.
    pub fn new_tokens(&self, max_gen_len: Option<usize>) -> usize {
        max_gen_len
            .or(self.max_new_tokens)
            .unwrap_or(self.max_length.saturating_sub(1))
    }
}

/// A T5 model, its tokenizer and generation settings, ready to evaluate.
pub struct Seq2SeqModel {
    /// The network.
    pub model: T5,
    /// The kit's tokenizer.
    pub tok: Seq2SeqTokenizer,
    /// Generation defaults from the model directory.
    pub generation: GenerationSettings,
}

impl Seq2SeqModel {
    /// Loads `config.json`, tokenizer files, the generation config and the weights.
    pub fn load_with(
        dir: &Path,
        source: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cfg = T5Config::from_file(&dir.join("config.json"))?;
        let tok = Seq2SeqTokenizer::from_dir(dir, &cfg)?;
        if tok.vocab_size() > cfg.vocab_size {
            tracing::warn!(
                "tokenizer has {} tokens, the model's vocabulary {}",
                tok.vocab_size(),
                cfg.vocab_size
            );
        }
        let generation = GenerationSettings::from_dir(dir, &cfg)?;
        let model = T5::load(cfg, source, dtype, device)?;
        Ok(Seq2SeqModel {
            model,
            tok,
            generation,
        })
    }

    /// Loads a model directory (any checkpoint layout merge-core reads), optionally folding a
    /// PEFT LoRA adapter into the weights.
    pub fn load(dir: &Path, adapter: Option<&Path>, dtype: DType, device: &Device) -> Result<Self> {
        let src = CheckpointSource::open(dir, adapter)?;
        Self::load_with(dir, &src, dtype, device)
    }
}

/// Scores the choices of one example: encoder once, all choices in one decoder pass.
/// `Full` adds the length-normalised choice (every token is scored in both modes, as the kit
/// does for encoder-decoders).
pub fn score_choices(
    model: &T5,
    tok: &Seq2SeqTokenizer,
    start: u32,
    input: &str,
    choices: &[String],
    mode: Scoring,
) -> Result<ChoiceResult> {
    let ids = tok.encode(input)?;
    if ids.is_empty() {
        return Err(Error::Msg("the input tokenizes to no tokens".into()));
    }
    if choices.is_empty() {
        return Err(Error::Msg("a multiple-choice row without choices".into()));
    }
    let cids = choices
        .iter()
        .map(|c| tok.encode(c))
        .collect::<Result<Vec<_>>>()?;
    let enc = model.encode(std::slice::from_ref(&ids), &[vec![true; ids.len()]])?;
    let width = cids.iter().map(Vec::len).max().unwrap_or(0);
    let mut scores = vec![0f64; choices.len()];
    if width > 0 {
        // Labels padded with 0; decoder inputs = labels shifted right behind the start token.
        let labels: Vec<Vec<u32>> = cids
            .iter()
            .map(|c| (0..width).map(|j| c.get(j).copied().unwrap_or(0)).collect())
            .collect();
        let inputs: Vec<Vec<u32>> = labels
            .iter()
            .map(|l| {
                std::iter::once(start)
                    .chain(l[..width - 1].iter().copied())
                    .collect()
            })
            .collect();
        let mut cache = model.new_cache(&enc)?;
        let h = model.decode(&inputs, &mut cache)?;
        let targets: Vec<u32> = labels.into_iter().flatten().collect();
        let picked = crate::score::picked_log_probs(&model.logits(&h)?, &targets)?;
        let picked: Vec<&[f32]> = picked.chunks(width).collect();
        for ((s, c), row) in scores.iter_mut().zip(&cids).zip(picked) {
            *s = row[..c.len()].iter().map(|&v| v as f64).sum();
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
        prompt_tokens: ids.len(),
        choice_tokens: cids.iter().map(Vec::len).collect(),
    })
}

/// Index of the first maximum of each row of `[rows, vocab]` f32 logits (torch's argmax).
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

/// Greedy decoding for a batch of encoder inputs (right-padded into one encoder pass), one
/// token per step for all unfinished rows, a row leaving the batch when it emits an EOS id
/// (kept at the end of its output). Returns the generated ids, the start token excluded.
pub fn greedy_batch(
    model: &T5,
    inputs: &[Vec<u32>],
    max_new: usize,
    start: u32,
    eos: &[u32],
    pad: u32,
) -> Result<Vec<Vec<u32>>> {
    let mut out = vec![Vec::new(); inputs.len()];
    if inputs.is_empty() || max_new == 0 {
        return Ok(out);
    }
    let width = inputs.iter().map(Vec::len).max().unwrap_or(0);
    if width == 0 {
        return Err(Error::Msg("an input tokenizes to no tokens".into()));
    }
    let rows: Vec<Vec<u32>> = inputs
        .iter()
        .map(|p| {
            p.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, width - p.len()))
                .collect()
        })
        .collect();
    let valid: Vec<Vec<bool>> = inputs
        .iter()
        .map(|p| (0..width).map(|j| j < p.len()).collect())
        .collect();
    let enc = model.encode(&rows, &valid)?;
    let mut cache = model.new_cache(&enc)?;
    let mut next = vec![start; inputs.len()];
    let mut active: Vec<usize> = (0..inputs.len()).collect();
    for _ in 0..max_new {
        let ids: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        let h = model.decode(&ids, &mut cache)?;
        next = argmax_rows(&model.logits(&h.i((.., 0))?)?)?;
        let mut keep = Vec::with_capacity(active.len());
        for (slot, &row) in active.iter().enumerate() {
            out[row].push(next[slot]);
            if !eos.contains(&next[slot]) {
                keep.push(slot);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            cache.select(&keep)?;
            active = keep.iter().map(|&s| active[s]).collect();
            next = keep.iter().map(|&s| next[s]).collect();
        }
    }
    Ok(out)
}

/// Evaluates one dataset with a T5 model: predictions for every row, metrics where targets
/// exist (the encoder-decoder counterpart of [`crate::runner::evaluate`]).
pub fn evaluate(m: &Seq2SeqModel, ds: &Dataset, opts: &EvalOptions) -> Result<DatasetOutcome> {
    let start_time = Instant::now();
    let rows = &ds.examples[..opts.limit.unwrap_or(usize::MAX).min(ds.examples.len())];
    let pb = progress(rows.len(), &ds.name, opts.progress);
    let mut results: Vec<Option<ExampleOutcome>> = vec![None; rows.len()];
    let with_ctx = |e: Error, id: &str, line: u64| {
        Error::Msg(format!("{}:{line}: row id `{id}`: {e}", ds.path.display()))
    };
    let start = m.generation.decoder_start_token_id;

    for (i, e) in rows.iter().enumerate() {
        if e.eval_type != EvalType::MultipleChoice {
            continue;
        }
        let t = Instant::now();
        let r = score_choices(
            &m.model,
            &m.tok,
            start,
            &e.input,
            &e.answer_choices,
            opts.scoring,
        )
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

    // Generation: sort by length so batches carry little padding.
    let max_new = m.generation.new_tokens(opts.max_gen_len);
    let gen = generation_inputs(ds, rows, |t| m.tok.encode(t))?;
    for batch in generation_batches(&gen, opts.batch_size, max_new) {
        let t = Instant::now();
        let inputs: Vec<Vec<u32>> = batch.iter().map(|(_, ids)| ids.clone()).collect();
        let outs = greedy_batch(
            &m.model,
            &inputs,
            max_new,
            start,
            &m.generation.eos_token_ids,
            m.tok.pad_id(),
        )
        .map_err(|err| {
            let e = &rows[batch[0].0];
            with_ctx(err, &e.id, e.line)
        })?;
        let secs = t.elapsed().as_secs_f64() / batch.len() as f64;
        for ((i, ids), out) in batch.iter().zip(outs) {
            let e = &rows[*i];
            results[*i] = Some(ExampleOutcome {
                id: e.id.clone(),
                eval_type: EvalType::Generation.as_str(),
                prediction: m.tok.decode(&out)?,
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
        seconds: start_time.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> T5Config {
        T5Config::from_json(&serde_json::json!({"model_type": "t5"})).unwrap()
    }

    #[test]
    fn generation_length_falls_back_to_the_config() {
        let g = GenerationSettings::from_json(
            &serde_json::json!({"decoder_start_token_id": 0, "eos_token_id": 1}),
            &cfg(),
        );
        // max_length 20 counts the decoder start token.
        assert_eq!(g.new_tokens(None), 19);
        assert_eq!(g.new_tokens(Some(64)), 64);
        let g = GenerationSettings::from_json(
            &serde_json::json!({"max_new_tokens": 7, "max_length": 100, "eos_token_id": [1, 5]}),
            &cfg(),
        );
        assert_eq!(g.new_tokens(None), 7);
        assert_eq!(g.eos_token_ids, [1, 5]);
    }
}
