//! What a search maximises: a weighted combination of validation metrics, computed from
//! per-row outcomes so that any subset of rows (a rung, the held-out rows) scores the same way,
//! and so that two recipes can be compared row by row (paired bootstrap, McNemar).
//!
//! Every row has a main value: right (1) or wrong (0) for multiple choice, its rougeL for
//! generation; a dataset's main metric is their mean (accuracy or rougeL for the competition's
//! single-kind files). The default objective is the mean of every dataset's main metric.

use std::collections::BTreeMap;

use eval_harness::dataset::{Dataset, EvalType};
use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// One scored row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowScore {
    /// Index of the dataset in the search's list.
    pub dataset: usize,
    /// Row index in the file.
    pub row: usize,
    /// The prediction (a choice index, or generated text).
    pub prediction: String,
    /// The metrics of this row.
    pub metrics: RowMetrics,
}

/// A row's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum RowMetrics {
    /// A multiple-choice row.
    Choice {
        /// The prediction is the target.
        correct: bool,
        /// The length-normalised prediction is the target (`scoring = "full"` only).
        correct_norm: Option<bool>,
    },
    /// A generation row: ROUGE F-measures against the target.
    Generation {
        /// ROUGE-1.
        rouge1: f64,
        /// ROUGE-2.
        rouge2: f64,
        /// ROUGE-L.
        rouge_l: f64,
        /// ROUGE-Lsum.
        rouge_lsum: f64,
    },
}

/// A metric of the objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Accuracy on multiple-choice rows, rougeL on generation rows.
    Main,
    /// Multiple choice: accuracy.
    Accuracy,
    /// Multiple choice: length-normalised accuracy (`scoring = "full"`).
    AccuracyNorm,
    /// Generation: ROUGE-1.
    Rouge1,
    /// Generation: ROUGE-2.
    Rouge2,
    /// Generation: ROUGE-L.
    RougeL,
    /// Generation: ROUGE-Lsum.
    RougeLsum,
}

impl Metric {
    fn parse(s: &str) -> Option<Metric> {
        Some(match s {
            "main" => Metric::Main,
            "accuracy" => Metric::Accuracy,
            "accuracy_norm" => Metric::AccuracyNorm,
            "rouge1" => Metric::Rouge1,
            "rouge2" => Metric::Rouge2,
            "rougeL" => Metric::RougeL,
            "rougeLsum" => Metric::RougeLsum,
            _ => return None,
        })
    }

    /// The metric's name as scores.json writes it.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Main => "main",
            Metric::Accuracy => "accuracy",
            Metric::AccuracyNorm => "accuracy_norm",
            Metric::Rouge1 => "rouge1",
            Metric::Rouge2 => "rouge2",
            Metric::RougeL => "rougeL",
            Metric::RougeLsum => "rougeLsum",
        }
    }

    /// The value of this metric on row `m`, if the row has it.
    pub fn of(self, m: &RowMetrics) -> Option<f64> {
        let b = |x: bool| f64::from(u8::from(x));
        match (self, m) {
            (Metric::Main | Metric::Accuracy, RowMetrics::Choice { correct, .. }) => {
                Some(b(*correct))
            }
            (Metric::AccuracyNorm, RowMetrics::Choice { correct_norm, .. }) => correct_norm.map(b),
            (Metric::Main | Metric::RougeL, RowMetrics::Generation { rouge_l, .. }) => {
                Some(*rouge_l)
            }
            (Metric::Rouge1, RowMetrics::Generation { rouge1, .. }) => Some(*rouge1),
            (Metric::Rouge2, RowMetrics::Generation { rouge2, .. }) => Some(*rouge2),
            (Metric::RougeLsum, RowMetrics::Generation { rouge_lsum, .. }) => Some(*rouge_lsum),
            _ => None,
        }
    }

    fn needs(self) -> Option<EvalType> {
        match self {
            Metric::Main => None,
            Metric::Accuracy | Metric::AccuracyNorm => Some(EvalType::MultipleChoice),
            _ => Some(EvalType::Generation),
        }
    }
}

/// One weighted term.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    /// Dataset index.
    pub dataset: usize,
    /// The metric.
    pub metric: Metric,
    /// Its weight (the weights are normalised to sum to 1).
    pub weight: f64,
}

/// The objective, checked against the datasets.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// The terms.
    pub terms: Vec<Term>,
    /// Dataset names, for reports.
    pub datasets: Vec<String>,
}

impl Objective {
    /// From `[search.objective]` (`"dataset.metric" = weight`; empty: every dataset's main
    /// metric, equal weights). `full_scoring`: whether `accuracy_norm` exists.
    pub fn new(
        spec: &BTreeMap<String, f64>,
        datasets: &[Dataset],
        full_scoring: bool,
    ) -> Result<Objective, SpecError> {
        let names: Vec<String> = datasets.iter().map(|d| d.name.clone()).collect();
        if spec.is_empty() {
            let terms = (0..datasets.len())
                .map(|dataset| Term {
                    dataset,
                    metric: Metric::Main,
                    weight: 1.0,
                })
                .collect();
            return Ok(Objective {
                terms,
                datasets: names,
            });
        }
        let mut terms = Vec::new();
        for (key, &weight) in spec {
            let bad = |reason: String| SpecError::BadObjective {
                term: key.clone(),
                reason,
            };
            let (ds, metric) = key
                .rsplit_once('.')
                .ok_or_else(|| bad("write \"dataset.metric\" (e.g. \"xsum.rougeL\")".into()))?;
            let dataset = names.iter().position(|n| n == ds).ok_or_else(|| {
                bad(format!(
                    "no dataset `{ds}` in the entry's [eval] datasets (it has: {})",
                    names.join(", ")
                ))
            })?;
            let metric = Metric::parse(metric).ok_or_else(|| {
                bad(format!(
                    "unknown metric `{metric}` (known: main, accuracy, accuracy_norm, rouge1, rouge2, rougeL, rougeLsum)"
                ))
            })?;
            if let Some(kind) = metric.needs() {
                if !datasets[dataset]
                    .examples
                    .iter()
                    .any(|e| e.eval_type == kind)
                {
                    return Err(bad(format!(
                        "`{ds}` has no {} rows",
                        kind.as_str().replace('_', "-")
                    )));
                }
            }
            if metric == Metric::AccuracyNorm && !full_scoring {
                return Err(bad("accuracy_norm needs [eval] scoring = \"full\"".into()));
            }
            if !(weight.is_finite() && weight > 0.0) {
                return Err(bad(format!(
                    "weight {weight}: weights are positive numbers"
                )));
            }
            terms.push(Term {
                dataset,
                metric,
                weight,
            });
        }
        Ok(Objective {
            terms,
            datasets: names,
        })
    }

    /// The objective over `rows` (terms without a row in `rows` are left out and the other
    /// weights renormalised); `None` without any row.
    pub fn score(&self, rows: &[RowScore]) -> Option<f64> {
        let mut total = 0.0;
        let mut weights = 0.0;
        for t in &self.terms {
            let values: Vec<f64> = rows
                .iter()
                .filter(|r| r.dataset == t.dataset)
                .filter_map(|r| t.metric.of(&r.metrics))
                .collect();
            if !values.is_empty() {
                total += t.weight * values.iter().sum::<f64>() / values.len() as f64;
                weights += t.weight;
            }
        }
        (weights > 0.0).then(|| total / weights)
    }

    /// Per-row contributions whose mean over `rows` is [`Objective::score`]: what the paired
    /// bootstrap resamples (rows of all datasets together).
    pub fn per_row(&self, rows: &[RowScore]) -> Vec<f64> {
        let n = rows.len() as f64;
        let counts: Vec<usize> = self
            .terms
            .iter()
            .map(|t| {
                rows.iter()
                    .filter(|r| r.dataset == t.dataset && t.metric.of(&r.metrics).is_some())
                    .count()
            })
            .collect();
        let weights: f64 = self
            .terms
            .iter()
            .zip(&counts)
            .filter(|(_, c)| **c > 0)
            .map(|(t, _)| t.weight)
            .sum();
        rows.iter()
            .map(|r| {
                self.terms
                    .iter()
                    .zip(&counts)
                    .filter(|(t, c)| **c > 0 && t.dataset == r.dataset)
                    .filter_map(|(t, c)| {
                        t.metric
                            .of(&r.metrics)
                            .map(|v| v * t.weight / weights * n / *c as f64)
                    })
                    .sum()
            })
            .collect()
    }

    /// Each dataset's main metric over `rows` (`None` where it has no row).
    pub fn per_dataset(&self, rows: &[RowScore]) -> Vec<Option<f64>> {
        (0..self.datasets.len())
            .map(|d| {
                let v: Vec<f64> = rows
                    .iter()
                    .filter(|r| r.dataset == d)
                    .filter_map(|r| Metric::Main.of(&r.metrics))
                    .collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(dataset: usize, row: usize, correct: bool) -> RowScore {
        RowScore {
            dataset,
            row,
            prediction: String::new(),
            metrics: RowMetrics::Choice {
                correct,
                correct_norm: None,
            },
        }
    }

    fn generation(dataset: usize, row: usize, rouge_l: f64) -> RowScore {
        RowScore {
            dataset,
            row,
            prediction: String::new(),
            metrics: RowMetrics::Generation {
                rouge1: rouge_l,
                rouge2: 0.0,
                rouge_l,
                rouge_lsum: rouge_l,
            },
        }
    }

    #[test]
    fn mean_of_main_metrics_and_its_per_row_form() {
        let o = Objective {
            terms: vec![
                Term {
                    dataset: 0,
                    metric: Metric::Main,
                    weight: 1.0,
                },
                Term {
                    dataset: 1,
                    metric: Metric::Main,
                    weight: 3.0,
                },
            ],
            datasets: vec!["mc".into(), "gen".into()],
        };
        // accuracy 2/3 and rougeL 0.5: (1 * 2/3 + 3 * 0.5) / 4.
        let rows = vec![
            choice(0, 0, true),
            choice(0, 1, true),
            choice(0, 2, false),
            generation(1, 0, 0.25),
            generation(1, 1, 0.75),
        ];
        let s = o.score(&rows).unwrap();
        assert!((s - (2.0 / 3.0 + 1.5) / 4.0).abs() < 1e-12);
        let per_row = o.per_row(&rows);
        let mean = per_row.iter().sum::<f64>() / per_row.len() as f64;
        assert!((mean - s).abs() < 1e-12, "{mean} vs {s}");
        assert_eq!(o.per_dataset(&rows), vec![Some(2.0 / 3.0), Some(0.5)]);
    }
}
