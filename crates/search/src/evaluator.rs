//! Scoring a recipe on some rows. [`InMemory`] is what searches use: the entry's models are
//! opened once ([`MergedModel`]), and each recipe is merged into the loaded model's weights in
//! place — no checkpoint is written per trial — then evaluated on the rows asked for.
//!
//! The merge runs on the CPU from the memory-mapped inputs whatever the evaluation device;
//! each merged tensor is handed to the model (on the GPU when the entry evaluates there).

use std::time::Instant;

use candle_core::{DType, Device};
use eval_harness::dataset::{Dataset, EvalType};
use eval_harness::merged::MergedModel;
use eval_harness::metrics::rouge;
use eval_harness::report::DatasetOutcome;
use eval_harness::EvalOptions;
use merge_core::source::Resolver;
use merge_core::MergeConfig;

use crate::error::Result;
use crate::objective::{RowMetrics, RowScore};
use crate::rows::RowSet;

/// The rows of one evaluation and where its time went.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// One score per row asked for.
    pub rows: Vec<RowScore>,
    /// Seconds merging (0 when the model already held the recipe).
    pub merge_seconds: f64,
    /// Seconds evaluating.
    pub eval_seconds: f64,
}

/// Something that scores recipes on rows of the search's datasets.
pub trait Evaluator {
    /// Scores `recipe` on `rows` (per dataset, in the search's dataset order).
    fn evaluate(&mut self, recipe: &MergeConfig, rows: &RowSet) -> Result<Evaluation>;
}

/// Merges in memory and evaluates the merged weights in place.
pub struct InMemory {
    model: MergedModel,
    datasets: Vec<Dataset>,
    opts: EvalOptions,
    /// The recipe the model's weights hold now (`None` after a merge failed half-way).
    current: Option<MergeConfig>,
}

impl InMemory {
    /// Opens every model `recipe` names (the entry's own recipe: every expert a search may
    /// select from), loads the model in `dtype` on `device` and merges `recipe` into it.
    pub fn open(
        recipe: &MergeConfig,
        resolver: &Resolver,
        dtype: DType,
        device: &Device,
        datasets: Vec<Dataset>,
        opts: EvalOptions,
    ) -> Result<InMemory> {
        let model = MergedModel::open(recipe, resolver, dtype, device)?;
        // Every trial reads the same inputs again.
        model.read_mapped(true);
        Ok(InMemory {
            model,
            datasets,
            opts,
            current: Some(recipe.clone()),
        })
    }
}

impl Evaluator for InMemory {
    fn evaluate(&mut self, recipe: &MergeConfig, rows: &RowSet) -> Result<Evaluation> {
        let start = Instant::now();
        if self.current.as_ref() != Some(recipe) {
            self.current = None;
            self.model.merge(recipe)?;
            self.current = Some(recipe.clone());
        }
        let merge_seconds = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut out = Vec::new();
        for (d, picked) in rows.0.iter().enumerate() {
            if picked.is_empty() {
                continue;
            }
            let full = &self.datasets[d];
            let subset = Dataset {
                name: full.name.clone(),
                path: full.path.clone(),
                examples: picked.iter().map(|&i| full.examples[i].clone()).collect(),
            };
            let outcome = eval_harness::evaluate(self.model.model(), &subset, &self.opts)?;
            out.extend(row_scores(d, picked, &outcome));
        }
        Ok(Evaluation {
            rows: out,
            merge_seconds,
            eval_seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// The per-row metrics of an evaluation of rows `picked` of dataset `d` (the outcome lists
/// them in the same order).
pub fn row_scores(d: usize, picked: &[usize], outcome: &DatasetOutcome) -> Vec<RowScore> {
    picked
        .iter()
        .zip(&outcome.examples)
        .map(|(&row, e)| {
            let target = e.target.as_deref().unwrap_or_default();
            let metrics = if e.eval_type == EvalType::MultipleChoice.as_str() {
                RowMetrics::Choice {
                    correct: e.prediction.trim() == target.trim(),
                    correct_norm: e
                        .prediction_norm
                        .as_deref()
                        .map(|p| p.trim() == target.trim()),
                }
            } else {
                let r = rouge(target, &e.prediction);
                RowMetrics::Generation {
                    rouge1: r.rouge1,
                    rouge2: r.rouge2,
                    rouge_l: r.rouge_l,
                    rouge_lsum: r.rouge_lsum,
                }
            };
            RowScore {
                dataset: d,
                row,
                prediction: e.prediction.clone(),
                metrics,
            }
        })
        .collect()
}
