//! The evaluation goldens in `crates/eval-harness/tests/goldens`, written by
//! `scripts/goldens/eval_goldens.py` and `t5_goldens.py`: a JSON file per tiny model (its
//! `config.json`, the tokenizer it uses, and transformers' / peft's logits, choice scores and
//! generations on `rows.csv`), the rows themselves, and the committed T5-style tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use eval_harness::dataset::{self, Dataset, Example};
use eval_harness::greedy::greedy;
use eval_harness::hf::tokenizer::Tokenizer;
use eval_harness::report::DatasetOutcome;
use eval_harness::{EvalOptions, LanguageModel, Scoring};
use serde_json::Value;

/// The goldens directory.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/eval-harness/tests/goldens")
}

/// Golden `name` (`llama`, `t5_v11`, `rouge`, ...): the whole JSON file.
pub fn golden(name: &str) -> Value {
    let path = dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `config` (a `config.json`) of golden `name`.
pub fn config(name: &str) -> Value {
    golden(name)["config"].clone()
}

/// `rows.csv`: the rows every golden was computed on.
pub fn rows_csv() -> PathBuf {
    dir().join("rows.csv")
}

/// `rows.csv`, loaded.
pub fn rows() -> Dataset {
    dataset::load(&rows_csv()).unwrap()
}

/// The row `id` of `rows`.
pub fn example<'a>(rows: &'a Dataset, id: &str) -> &'a Example {
    rows.examples
        .iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| panic!("no row `{id}`"))
}

/// The committed T5-style Unigram tokenizer the T5 goldens use.
pub fn t5_tokenizer() -> PathBuf {
    dir().join("t5-tokenizer")
}

/// The tokenizer directory of golden `g`: the fetched one it names (`"tokenizer": "llama2"`),
/// else (the T5 goldens) the committed T5 tokenizer.
pub fn tokenizer(g: &Value) -> PathBuf {
    match g["tokenizer"].as_str() {
        Some(name) => crate::tokenizers::dir(name),
        None => t5_tokenizer(),
    }
}

/// Writes golden `name` as a loadable model directory `dir` (its config, the synthetic weights,
/// its tokenizer); returns the golden.
pub fn write_model(name: &str, dir: &Path) -> Value {
    let g = golden(name);
    if g["config"]["model_type"] == "t5" {
        crate::synthetic::write_t5_dir(dir, &g["config"], &tokenizer(&g));
    } else {
        crate::synthetic::write_decoder_dir(dir, &g["config"], &tokenizer(&g));
    }
    g
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an id list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// What the kit predicts on each row golden `g` covers, by row id: the chosen index of a
/// multiple-choice row (`prediction`, or `kit_prediction` where the golden also scores the full
/// way), the text of a generation row.
pub fn predictions(g: &Value) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for x in g["mc"].as_array().unwrap() {
        let p = x.get("kit_prediction").unwrap_or(&x["prediction"]);
        m.insert(x["id"].as_str().unwrap().to_string(), p.to_string());
    }
    for x in g["gen"].as_array().unwrap() {
        let text = x["text"].as_str().unwrap();
        m.insert(x["id"].as_str().unwrap().to_string(), text.to_string());
    }
    m
}

/// Every row of `outcome` that golden `g` covers was predicted as the golden says
/// ([`predictions`]); `what` prefixes the failure messages.
pub fn check_predictions(outcome: &DatasetOutcome, g: &Value, what: &str) {
    let want = predictions(g);
    for e in &outcome.examples {
        if let Some(w) = want.get(&e.id) {
            assert_eq!(&e.prediction, w, "{what} {}", e.id);
        }
    }
}

/// The entry for row `id` in a golden's `mc` or `gen` list, if it has one.
pub fn entry<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|x| x["id"] == id)
}

/// Quiet evaluation options: `batch_size` rows, `max_gen_len` new tokens at most, the kit's
/// scoring, every row, no progress bar.
pub fn options(batch_size: usize, max_gen_len: Option<usize>) -> EvalOptions {
    EvalOptions {
        batch_size,
        max_gen_len,
        limit: None,
        scoring: Scoring::StarterKit,
        progress: false,
        ..Default::default()
    }
}

/// max |ours − golden| over a golden `logits` entry: `logits` (positions × vocabulary) read at
/// the golden's `vocab` ids against its `values`, and the log-sum-exp of each position against
/// its `logsumexp`.
pub fn logits_diff(logits: &Tensor, golden: &Value, vocab: &[u32]) -> f64 {
    let lse: Vec<f32> = logits.log_sum_exp(1).unwrap().to_vec1().unwrap();
    let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let mut max = 0f64;
    for (p, row) in golden["values"].as_array().unwrap().iter().enumerate() {
        for (k, v) in row.as_array().unwrap().iter().enumerate() {
            let d = (logits[p][vocab[k] as usize] as f64 - v.as_f64().unwrap()).abs();
            max = max.max(d);
        }
        max = max.max((lse[p] as f64 - golden["logsumexp"][p].as_f64().unwrap()).abs());
    }
    max
}

/// A golden with the model it describes and the rows it was computed on.
pub struct Fixture<M> {
    /// The golden.
    pub g: Value,
    /// The model, built from the golden's config.
    pub model: M,
    /// `rows.csv`.
    pub rows: Dataset,
}

impl<M: LanguageModel> Fixture<M> {
    /// Golden `name` with the model `model` builds from it.
    pub fn new(name: &str, model: impl FnOnce(&Value) -> M) -> Self {
        let g = golden(name);
        let model = model(&g);
        Fixture {
            g,
            model,
            rows: rows(),
        }
    }

    /// The model's tokenizer.
    pub fn tok(&self) -> &Tokenizer {
        self.model.tokenizer()
    }

    /// Row `id`.
    pub fn example(&self, id: &str) -> &Example {
        example(&self.rows, id)
    }

    /// Every `logits` entry of the golden: the row's input ids, then the logits `logits_of`
    /// computes from them (positions × vocabulary), within 1e-4 of the golden's
    /// ([`logits_diff`]).
    pub fn check_logits(&self, logits_of: impl Fn(&M, &[u32]) -> Tensor) {
        let vocab = ids(&self.g["vocab_ids"]);
        for l in self.g["logits"].as_array().unwrap() {
            let e = self.example(l["id"].as_str().unwrap());
            let input = self.tok().encode_input(&e.input).unwrap();
            assert_eq!(input, ids(&l["input_ids"]), "input ids of {}", e.id);
            let max = logits_diff(&logits_of(&self.model, &input), l, &vocab);
            assert!(
                max <= 1e-4,
                "{}: logits of {} differ by {max}",
                self.g["model"],
                e.id
            );
        }
    }

    /// Greedy generation on every `gen` row of the golden (input ids checked first), one row
    /// at a time and all rows in one left-padded batch, equals the golden's generated ids and
    /// decoded text.
    pub fn check_greedy(&self, max_new: usize) {
        let model: &dyn LanguageModel = &self.model;
        let gens = self.g["gen"].as_array().unwrap();
        let prompts: Vec<Vec<u32>> = gens
            .iter()
            .map(|x| {
                let e = self.example(x["id"].as_str().unwrap());
                let p = self.tok().encode_input(&e.input).unwrap();
                assert_eq!(p, ids(&x["input_ids"]), "input ids of {}", e.id);
                p
            })
            .collect();
        let eos = [self.tok().eos_id()];
        let single: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                greedy(model, std::slice::from_ref(p), max_new, &eos)
                    .unwrap()
                    .remove(0)
            })
            .collect();
        let batched = greedy(model, &prompts, max_new, &eos).unwrap();
        for ((x, s), b) in gens.iter().zip(&single).zip(&batched) {
            let want = ids(&x["generated_ids"]);
            assert_eq!(s, &want, "{} {} batch 1", self.g["model"], x["id"]);
            assert_eq!(b, &want, "{} {} batched", self.g["model"], x["id"]);
            assert_eq!(self.tok().decode(s).unwrap(), x["text"].as_str().unwrap());
        }
    }
}
