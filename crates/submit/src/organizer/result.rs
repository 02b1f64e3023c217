//! What scoring one submission produced: `results/<name>.json`.

use serde::{Deserialize, Serialize};

use super::scoring::TestScores;

/// One stage of the entry's run and its time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageTime {
    /// `merge` or `predict`.
    pub stage: String,
    /// Seconds.
    pub seconds: f64,
}

/// How the submission ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Its predictions were scored.
    Scored(TestScores),
    /// It stopped at `stage` (unpack, manifest, entry, rules, run, budget, predictions) for
    /// `reason`.
    Failed {
        /// Where it stopped.
        stage: String,
        /// Why, in one line.
        reason: String,
    },
}

/// `results/<name>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubmissionResult {
    /// The tar's stem.
    pub name: String,
    /// sha256 of the tar (a changed tar is scored again).
    pub tar_sha256: String,
    /// The entry its manifest names, once known.
    pub entry: Option<String>,
    /// The outcome.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Rule verdicts (`ok`, or each violation), when the rules were checked.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Merge and predict times, when the run got that far.
    #[serde(default)]
    pub stages: Vec<StageTime>,
    /// The budget for merge + predict, in seconds.
    pub budget_seconds: f64,
}

impl SubmissionResult {
    /// Seconds of a stage, if it ran.
    pub fn stage_seconds(&self, stage: &str) -> Option<f64> {
        self.stages
            .iter()
            .find(|s| s.stage == stage)
            .map(|s| s.seconds)
    }
}
