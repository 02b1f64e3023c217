//! The per-example browser: for each dataset, every row's input and target beside each
//! model's prediction (the first model is the merge, or the first entry), with the row's
//! primary-metric value per model for the page's filters ("merge wrong, other right" and the
//! reverse).

use std::collections::HashMap;

use eval_harness::dataset::Dataset;
use serde::Serialize;

use crate::outcomes::{primary_metric, Evaluated, RowOutcome};

/// One model's prediction of one row.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub text: String,
    /// `right`, `wrong` (multiple choice), `""` otherwise.
    pub class: String,
    /// The row's primary-metric value as text (generation rows).
    pub score: String,
}

/// One row of a dataset.
#[derive(Debug, Clone, Serialize)]
pub struct ExampleRow {
    pub id: String,
    pub input: String,
    /// The first characters of the input, shown collapsed.
    pub preview: String,
    pub target: String,
    pub predictions: Vec<Prediction>,
    /// Each model's primary-metric value, comma-separated (empty where missing).
    pub scores: String,
}

/// One dataset's browser.
#[derive(Debug, Clone, Serialize)]
pub struct Browser {
    pub dataset: String,
    /// An HTML id.
    pub anchor: String,
    pub metric: String,
    pub models: Vec<String>,
    pub rows: Vec<ExampleRow>,
}

const PREVIEW: usize = 160;

fn preview(s: &str) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= PREVIEW {
        flat
    } else {
        flat.chars().take(PREVIEW).collect::<String>() + "…"
    }
}

/// A choice index with its text (`2: the cat`), or the text as is.
fn with_choice(answer: &str, choices: &[String]) -> String {
    match answer
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|i| choices.get(i))
    {
        Some(c) => format!("{}: {c}", answer.trim()),
        None => answer.to_string(),
    }
}

/// The browsers of every dataset the first model scored; `inputs` are the datasets' files
/// (for inputs and answer choices), matched by name.
pub fn browsers(models: &[Evaluated], inputs: &[Dataset]) -> Vec<Browser> {
    let Some(first) = models.first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (n, (dataset, rows)) in first.rows.iter().enumerate() {
        let metric = first
            .scores
            .get(dataset)
            .and_then(primary_metric)
            .unwrap_or("accuracy")
            .to_string();
        let file = inputs.iter().find(|d| &d.name == dataset);
        let by_id: HashMap<&str, &eval_harness::dataset::Example> = file
            .map(|f| f.examples.iter().map(|e| (e.id.as_str(), e)).collect())
            .unwrap_or_default();
        let lookups: Vec<HashMap<&str, &RowOutcome>> = models
            .iter()
            .map(|m| {
                m.rows
                    .get(dataset)
                    .map(|r| r.iter().map(|r| (r.id.as_str(), r)).collect())
                    .unwrap_or_default()
            })
            .collect();
        let rows = rows
            .iter()
            .map(|row| {
                let example = by_id.get(row.id.as_str());
                let choices: &[String] = example.map_or(&[], |e| &e.answer_choices);
                let input = example.map_or(String::new(), |e| e.input.clone());
                let mut scores = Vec::new();
                let predictions = lookups
                    .iter()
                    .map(|l| match l.get(row.id.as_str()) {
                        None => {
                            scores.push(String::new());
                            Prediction {
                                text: "—".into(),
                                class: String::new(),
                                score: String::new(),
                            }
                        }
                        Some(r) => {
                            let v = r.values.get(&metric).copied();
                            scores.push(v.map_or(String::new(), |v| format!("{v:.4}")));
                            let class = match (r.generation, v) {
                                (false, Some(v)) if v > 0.5 => "right",
                                (false, Some(_)) => "wrong",
                                _ => "",
                            };
                            Prediction {
                                text: if r.generation {
                                    r.prediction.clone()
                                } else {
                                    with_choice(&r.prediction, choices)
                                },
                                class: class.into(),
                                score: match (r.generation, v) {
                                    (true, Some(v)) => format!("{metric} {v:.2}"),
                                    _ => String::new(),
                                },
                            }
                        }
                    })
                    .collect();
                ExampleRow {
                    id: row.id.clone(),
                    preview: preview(&input),
                    input,
                    target: row
                        .target
                        .as_deref()
                        .map_or(String::new(), |t| with_choice(t, choices)),
                    predictions,
                    scores: scores.join(","),
                }
            })
            .collect();
        out.push(Browser {
            dataset: dataset.clone(),
            anchor: format!("examples-{n}"),
            metric,
            models: models.iter().map(|m| m.name.clone()).collect(),
            rows,
        });
    }
    out
}
