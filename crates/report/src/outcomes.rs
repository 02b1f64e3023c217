//! An evaluation's outputs as `eval` and `run` write them (`scores.json` and
//! `details/<dataset>.jsonl`), read back with each row's own metric values, which the
//! standard errors and paired tests resample.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use eval_harness::metrics::{accuracy, rouge};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a row of the report's tables stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The entry's merged model.
    Merge,
    /// The base model alone.
    Base,
    /// One expert alone (an adapter on its base).
    Expert,
    /// An entry's merge, in a comparison of entries.
    Entry,
}

/// One evaluated model: where its outputs are and what to call it.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// The row's name in tables ("merge: ties", "base (demo:base)", an entry's name).
    pub name: String,
    /// What it is.
    pub role: Role,
    /// The evaluation's output directory (`scores.json`, `details/`).
    pub dir: PathBuf,
}

/// The lines of `details/<dataset>.jsonl` the report reads.
#[derive(Debug, Deserialize)]
struct DetailLine {
    id: String,
    eval_type: String,
    prediction: String,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    prediction_norm: Option<String>,
}

/// One row of one dataset, as one model did it.
#[derive(Debug, Clone)]
pub struct RowOutcome {
    /// The row id.
    pub id: String,
    /// A generation row (else multiple choice).
    pub generation: bool,
    /// The chosen index or the generated text.
    pub prediction: String,
    /// The reference.
    pub target: Option<String>,
    /// The row's value of each metric (accuracy 0 or 1, ROUGE F-measures).
    pub values: BTreeMap<String, f64>,
}

/// One evaluated model's outputs.
#[derive(Debug, Clone)]
pub struct Evaluated {
    /// Its name in tables.
    pub name: String,
    /// What it is.
    pub role: Role,
    /// `scores.json`: dataset → metric → value.
    pub scores: BTreeMap<String, BTreeMap<String, f64>>,
    /// The standard errors the evaluation computed (`<metric>_stderr` in `scores.json`, with
    /// `[eval] stderr` or `[prompt]`): dataset → metric → value.
    pub recorded_stderr: BTreeMap<String, BTreeMap<String, f64>>,
    /// Dataset → rows in file order.
    pub rows: BTreeMap<String, Vec<RowOutcome>>,
}

/// The metric a dataset is judged by: accuracy for multiple choice, rougeL for generation.
pub fn primary_metric(metrics: &BTreeMap<String, f64>) -> Option<&str> {
    ["accuracy", "rougeL"]
        .into_iter()
        .find(|m| metrics.contains_key(*m))
        .or_else(|| metrics.keys().next().map(String::as_str))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

impl Evaluated {
    /// Reads `run.dir`'s `scores.json` and the details of every dataset it scores.
    pub fn load(run: &RunDir) -> Result<Evaluated> {
        let scores_path = run.dir.join("scores.json");
        let mut scores: BTreeMap<String, BTreeMap<String, f64>> =
            serde_json::from_str(&read(&scores_path)?)
                .map_err(|e| Error::parse(&scores_path, e))?;
        // `<metric>_stderr` entries are the evaluation's standard errors, not metrics.
        let mut recorded_stderr = BTreeMap::new();
        for (dataset, metrics) in &mut scores {
            let errors: BTreeMap<String, f64> = metrics
                .iter()
                .filter_map(|(k, v)| Some((k.strip_suffix("_stderr")?.to_string(), *v)))
                .collect();
            metrics.retain(|k, _| !k.ends_with("_stderr"));
            if !errors.is_empty() {
                recorded_stderr.insert(dataset.clone(), errors);
            }
        }
        let mut rows = BTreeMap::new();
        for dataset in scores.keys() {
            let path = run.dir.join("details").join(format!("{dataset}.jsonl"));
            let mut list = Vec::new();
            for (i, line) in read(&path)?.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let d: DetailLine = serde_json::from_str(line)
                    .map_err(|e| Error::parse(&path, format!("line {}: {e}", i + 1)))?;
                list.push(row_outcome(d));
            }
            rows.insert(dataset.clone(), list);
        }
        Ok(Evaluated {
            name: run.name.clone(),
            role: run.role,
            scores,
            recorded_stderr,
            rows,
        })
    }

    /// The rows of `dataset` that have `metric`, as (id, value), in file order.
    pub fn values(&self, dataset: &str, metric: &str) -> Vec<(&str, f64)> {
        self.rows
            .get(dataset)
            .map(|rows| {
                rows.iter()
                    .filter_map(|r| Some((r.id.as_str(), *r.values.get(metric)?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The standard error of `metric` on `dataset`: the one the evaluation recorded, else a
    /// bootstrap over the rows' values (1000 resamples, seed 0).
    pub fn standard_error(&self, dataset: &str, metric: &str) -> Option<f64> {
        if let Some(se) = self
            .recorded_stderr
            .get(dataset)
            .and_then(|m| m.get(metric))
        {
            return Some(*se);
        }
        let v: Vec<f64> = self.values(dataset, metric).iter().map(|x| x.1).collect();
        (v.len() >= 2).then(|| stats::bootstrap_se(&v, stats::DEFAULT_RESAMPLES, 0))
    }
}

fn row_outcome(d: DetailLine) -> RowOutcome {
    let generation = d.eval_type == "generation";
    let mut values = BTreeMap::new();
    if let Some(t) = &d.target {
        if generation {
            for (k, v) in rouge(t, &d.prediction).named() {
                values.insert(k.to_string(), v);
            }
        } else {
            values.insert(
                "accuracy".into(),
                accuracy([(d.prediction.as_str(), t.as_str())]),
            );
            if let Some(p) = &d.prediction_norm {
                values.insert("accuracy_norm".into(), accuracy([(p.as_str(), t.as_str())]));
            }
        }
    }
    RowOutcome {
        id: d.id,
        generation,
        prediction: d.prediction,
        target: d.target,
        values,
    }
}
