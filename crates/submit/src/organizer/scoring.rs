//! Scoring a submission against the organizers' labels: accuracy on multiple-choice rows,
//! ROUGE on generation rows (`rouge_score`'s, as the validation scores), a mean per `eval_type`
//! and an overall score.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use eval_harness::dataset::{self, EvalType};
use eval_harness::metrics::{rouge, Rouge};
use serde::Serialize;

/// How the overall score combines the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overall {
    /// The mean of the per-type scores (accuracy, rougeL): each task kind counts the same.
    PerType,
    /// The mean over rows of each row's score (1/0 for a choice, rougeL for a generation).
    PerRow,
}

/// A submission's scores on the hidden test set.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct TestScores {
    /// Multiple-choice accuracy, when there are such rows.
    pub multiple_choice: Option<f64>,
    /// Generation ROUGE (rouge1, rouge2, rougeL, rougeLsum), when there are such rows.
    pub generation: Option<BTreeMap<String, f64>>,
    /// The overall score.
    pub overall: f64,
    /// Rows scored.
    pub rows: usize,
}

/// The labels: per id, the target and the row's kind.
pub struct Labels {
    rows: BTreeMap<String, (EvalType, String)>,
}

impl Labels {
    /// Reads `FILE`: either `id,target` (kinds from `test_file`, or from an `eval_type`
    /// column) or a competition CSV with a `target` column.
    pub fn load(file: &Path, test_file: Option<&Path>) -> Result<Self> {
        let mut reader =
            csv::Reader::from_path(file).with_context(|| format!("labels {}", file.display()))?;
        let header: Vec<String> = reader.headers()?.iter().map(str::to_string).collect();
        let col = |name: &str| header.iter().position(|h| h == name);
        let (Some(id_col), Some(target_col)) = (col("id"), col("target")) else {
            bail!(
                "{}:1: labels need `id` and `target` columns (found {})",
                file.display(),
                header.join(",")
            );
        };
        let kinds: HashMap<String, EvalType> = match test_file {
            Some(t) => dataset::load(t)
                .with_context(|| format!("reading the test file {}", t.display()))?
                .examples
                .into_iter()
                .map(|e| (e.id, e.eval_type))
                .collect(),
            None => HashMap::new(),
        };
        let type_col = col("eval_type");
        let mut rows = BTreeMap::new();
        for (i, rec) in reader.records().enumerate() {
            let line = i + 2;
            let rec = rec.with_context(|| format!("{}:{line}", file.display()))?;
            let id = rec.get(id_col).unwrap_or_default().to_string();
            let kind = match type_col.and_then(|c| rec.get(c)) {
                Some("multiple_choice") => EvalType::MultipleChoice,
                Some("generation") => EvalType::Generation,
                Some(other) => bail!("{}:{line}: eval_type `{other}`", file.display()),
                None => *kinds.get(&id).with_context(|| {
                    format!(
                        "{}:{line}: id `{id}`: no eval_type column and the test file has no such id",
                        file.display()
                    )
                })?,
            };
            let target = rec.get(target_col).unwrap_or_default().to_string();
            if rows.insert(id.clone(), (kind, target)).is_some() {
                bail!("{}:{line}: id `{id}` appears twice", file.display());
            }
        }
        if rows.is_empty() {
            bail!("{}: no labels", file.display());
        }
        Ok(Labels { rows })
    }

    /// Scores a `id,prediction,dummy_field` file. Every labelled id must be predicted.
    pub fn score(&self, predictions: &Path, overall: Overall) -> Result<TestScores> {
        let mut reader = csv::Reader::from_path(predictions)
            .with_context(|| format!("{}", predictions.display()))?;
        let mut predicted: HashMap<String, String> = HashMap::new();
        for rec in reader.records() {
            let rec = rec.with_context(|| format!("{}", predictions.display()))?;
            predicted.insert(
                rec.get(0).unwrap_or_default().to_string(),
                rec.get(1).unwrap_or_default().to_string(),
            );
        }
        let mut correct = Vec::new();
        let mut rouges = Vec::new();
        for (id, (kind, target)) in &self.rows {
            let Some(p) = predicted.get(id) else {
                bail!("{}: no prediction for id `{id}`", predictions.display());
            };
            match kind {
                EvalType::MultipleChoice => correct.push(f64::from(u8::from(p.trim() == target))),
                EvalType::Generation => rouges.push(rouge(target, p)),
            }
        }
        let accuracy = (!correct.is_empty()).then(|| mean(&correct));
        let generation = (!rouges.is_empty()).then(|| Rouge::mean(&rouges));
        let overall = match overall {
            Overall::PerType => {
                let parts: Vec<f64> = accuracy
                    .iter()
                    .copied()
                    .chain(generation.map(|r| r.rouge_l))
                    .collect();
                mean(&parts)
            }
            Overall::PerRow => {
                let rows: Vec<f64> = correct
                    .iter()
                    .copied()
                    .chain(rouges.iter().map(|r| r.rouge_l))
                    .collect();
                mean(&rows)
            }
        };
        Ok(TestScores {
            multiple_choice: accuracy,
            generation: generation.map(|r| {
                r.named()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect()
            }),
            overall,
            rows: self.rows.len(),
        })
    }
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_per_type_and_per_row() {
        let tmp = tempfile::tempdir().unwrap();
        let labels = tmp.path().join("labels.csv");
        std::fs::write(
            &labels,
            "id,target,eval_type\na,1,multiple_choice\nb,0,multiple_choice\nc,the cat sat,generation\n",
        )
        .unwrap();
        let preds = tmp.path().join("p.csv");
        std::fs::write(
            &preds,
            "id,prediction,dummy_field\na,1,0\nb,2,0\nc,the cat sat,0\n",
        )
        .unwrap();
        let l = Labels::load(&labels, None).unwrap();
        let s = l.score(&preds, Overall::PerType).unwrap();
        assert_eq!(s.multiple_choice, Some(0.5));
        assert_eq!(s.generation.as_ref().unwrap()["rougeL"], 1.0);
        assert_eq!(s.overall, 0.75);
        assert_eq!(l.score(&preds, Overall::PerRow).unwrap().overall, 2.0 / 3.0);
        std::fs::write(&preds, "id,prediction,dummy_field\na,1,0\n").unwrap();
        let e = l.score(&preds, Overall::PerType).unwrap_err().to_string();
        assert!(e.contains("no prediction for id `b`"), "{e}");
        std::fs::write(&labels, "id,answer\na,1\n").unwrap();
        let e = Labels::load(&labels, None).err().unwrap().to_string();
        assert!(e.contains("`id` and `target`"), "{e}");
    }
}
