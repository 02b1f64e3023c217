//! Outputs of an evaluation: `OUT/predictions/<stem>.csv` (`id,prediction,dummy_field`),
//! `OUT/scores.json` and `OUT/details/<stem>.jsonl`, plus the score table printed at the end.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One evaluated row.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExampleOutcome {
    /// Row id, echoed from the input file.
    pub id: String,
    /// `multiple_choice` or `generation`.
    pub eval_type: &'static str,
    /// Chosen index (as text) or generated text.
    pub prediction: String,
    /// Reference, when the file has one.
    pub target: Option<String>,
    /// Per-choice scores (multiple choice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choice_scores: Option<Vec<f64>>,
    /// Length-normalised choice scores (`--scoring full`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choice_scores_norm: Option<Vec<f64>>,
    /// Index chosen by the normalised scores (`--scoring full`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_norm: Option<String>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens per choice (multiple choice) or generated tokens (generation).
    pub output_tokens: Vec<usize>,
    /// Wall time attributed to this row (a batch's time shared by its rows).
    pub seconds: f64,
    /// With a `[prompt]` table: the text the model was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// With a `[prompt]` table, rows that generate: the generation as decoded, before
    /// post-processing and answer extraction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    /// Generate-mode multiple choice: how the answer was found (`regex`, `choice_text`,
    /// `loglik`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extracted_by: Option<&'static str>,
}

/// One evaluated dataset.
#[derive(Debug, Clone)]
pub struct DatasetOutcome {
    /// File stem.
    pub name: String,
    /// Rows in file order.
    pub examples: Vec<ExampleOutcome>,
    /// Metric name to value (empty without targets).
    pub scores: BTreeMap<String, f64>,
    /// Wall time of the dataset.
    pub seconds: f64,
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(path, e))
}

/// Writes the competition's per-row predictions CSV (`dummy_field` is always 0).
pub fn write_predictions_csv(path: &Path, examples: &[ExampleOutcome]) -> Result<()> {
    let mut w =
        csv::Writer::from_path(path).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
    let mut write = || -> std::result::Result<(), csv::Error> {
        w.write_record(["id", "prediction", "dummy_field"])?;
        for e in examples {
            w.write_record([e.id.as_str(), e.prediction.as_str(), "0"])?;
        }
        w.flush()?;
        Ok(())
    };
    write().map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
}

/// Writes a file next to its final place and renames it there, so a failure never leaves a
/// truncated file behind.
pub fn write_atomic(path: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    io(parent, std::fs::create_dir_all(parent))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    match f(&tmp) {
        Ok(()) => io(path, std::fs::rename(&tmp, path)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// `scores.json`: `{dataset: {metric: value}}`.
pub fn scores_json(results: &[DatasetOutcome]) -> serde_json::Value {
    let m: BTreeMap<&str, &BTreeMap<String, f64>> = results
        .iter()
        .map(|r| (r.name.as_str(), &r.scores))
        .collect();
    serde_json::to_value(m).unwrap_or_default()
}

/// Writes predictions, details and scores under `out`. Everything is first written into a
/// temporary sibling directory, then moved into place file by file, so a failure leaves no
/// half-written output.
pub fn write_eval_outputs(out: &Path, results: &[DatasetOutcome]) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    io(parent, std::fs::create_dir_all(parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".eval-out-")
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for sub in ["predictions", "details"] {
        let d = tmp.path().join(sub);
        io(&d, std::fs::create_dir_all(&d))?;
    }
    for r in results {
        let rel = PathBuf::from("predictions").join(format!("{}.csv", r.name));
        write_predictions_csv(&tmp.path().join(&rel), &r.examples)?;
        files.push(rel);
        let rel = PathBuf::from("details").join(format!("{}.jsonl", r.name));
        let p = tmp.path().join(&rel);
        let mut f = std::io::BufWriter::new(io(&p, std::fs::File::create(&p))?);
        for e in &r.examples {
            let line = serde_json::to_string(e).map_err(|e| Error::Msg(e.to_string()))?;
            io(&p, writeln!(f, "{line}"))?;
        }
        io(&p, f.flush())?;
        files.push(rel);
    }
    let p = tmp.path().join("scores.json");
    let text = serde_json::to_string_pretty(&scores_json(results))
        .map_err(|e| Error::Msg(e.to_string()))?;
    io(&p, std::fs::write(&p, text + "\n"))?;
    files.push("scores.json".into());
    for rel in files {
        let dst = out.join(&rel);
        if let Some(d) = dst.parent() {
            io(d, std::fs::create_dir_all(d))?;
        }
        io(&dst, std::fs::rename(tmp.path().join(&rel), &dst))?;
    }
    Ok(())
}

/// A plain-text table: dataset, rows, metric values (`±` the standard error where computed),
/// seconds.
pub fn score_table(results: &[DatasetOutcome]) -> String {
    let mut s = format!("{:<20} {:>6} {:>9}  scores\n", "dataset", "rows", "seconds");
    for r in results {
        let scores = if r.scores.is_empty() {
            "(no targets)".to_string()
        } else {
            let se = |k: &str| r.scores.get(&format!("{k}_stderr"));
            r.scores
                .iter()
                .filter(|(k, _)| !k.ends_with("_stderr"))
                .map(|(k, v)| match se(k) {
                    Some(se) => format!("{k}={v:.4}±{se:.4}"),
                    None => format!("{k}={v:.4}"),
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        s += &format!(
            "{:<20} {:>6} {:>9.1}  {scores}\n",
            r.name,
            r.examples.len(),
            r.seconds
        );
    }
    s
}
