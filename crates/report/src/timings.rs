//! Stage timings against the competition's 1-hour budget (merge + evaluation + prediction
//! count; packaging, reference rows and diagnostics do not).

use serde::{Deserialize, Serialize};

/// One stage of a run, as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageTime {
    /// Stage name.
    pub stage: String,
    /// Seconds it took when it last ran.
    pub seconds: f64,
    /// Whether the run reused it.
    pub reused: bool,
}

/// Whether a stage counts against the budget.
pub fn counted(stage: &str) -> bool {
    matches!(stage, "merge" | "eval" | "predict")
}

/// One row of the timing section.
#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    pub stage: String,
    pub seconds: String,
    pub reused: bool,
    pub counted: bool,
    /// Share of the budget, for the bar (percent, at most 100).
    pub width: f64,
}

/// The timing section.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub stages: Vec<StageRow>,
    pub counted_seconds: String,
    pub budget_seconds: String,
    pub percent: String,
    pub over: bool,
}

/// The timing section of `stages` against `budget` seconds.
pub fn timings(stages: &[StageTime], budget: f64) -> Timings {
    let total: f64 = stages
        .iter()
        .filter(|s| counted(&s.stage))
        .map(|s| s.seconds)
        .sum();
    Timings {
        stages: stages
            .iter()
            .map(|s| StageRow {
                stage: s.stage.clone(),
                seconds: format!("{:.1}", s.seconds),
                reused: s.reused,
                counted: counted(&s.stage),
                width: (100.0 * s.seconds / budget).clamp(0.0, 100.0),
            })
            .collect(),
        counted_seconds: format!("{total:.1}"),
        budget_seconds: format!("{budget:.0}"),
        percent: format!("{:.1}", 100.0 * total / budget),
        over: total > budget,
    }
}
