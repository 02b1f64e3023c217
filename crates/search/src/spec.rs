//! The `[search]` table of an entry: what to search, on which rows, against what objective,
//! within what budget. Schema only; [`crate::space::Space::new`] checks it against the entry's
//! merge and the registry, [`crate::rows::RowPlan::new`] against the validation files.
//!
//! ```toml
//! [search]
//! optimizer = "auto"     # auto (cmaes for ranges only, tpe with choices) | cmaes | tpe | random
//! seed = 1               # the same entry and seed give the same trials
//! trials = 60            # budget: trials, and/or
//! time = "10m"           # budget: wall time ("90s", "10m", "2h" or seconds)
//! methods = ["ties", "dare_ties"]   # a choice among methods (default: the entry's)
//! select = true          # model selection: each expert in or out (or a list of the experts
//!                        # that may be left out); the base always stays
//!
//! [[search.space]]       # one range per parameter; global unless `model` says otherwise
//! parameter = "density"
//! range = [0.2, 0.9]
//!
//! [[search.space]]
//! parameter = "weight"
//! model = "*"            # "*": one range per model; or a model as named in [[merge.models]]
//! range = [0.3, 1.5]
//! knots = 3              # a per-layer gradient with 3 knots (mergekit-evolve's layer_granularity)
//! filters = ["self_attn", "mlp"]   # one value per filter, and one for every other tensor
//!
//! [search.objective]     # weights of "dataset.metric"; default: each dataset's main metric
//! "cosmos_qa.accuracy" = 1.0
//! "xsum.rougeL" = 1.0
//!
//! [search.rows]
//! held_out = 0.3         # a seeded share of each validation file the search never sees
//! first_look = 20        # rows per file a candidate is first scored on (successive halving)
//! eta = 3                # a third of the candidates go on to three times the rows
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// The `[search]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SearchSpec {
    /// Which optimizer proposes candidates.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Seed of every random choice of the search (proposals; the row split unless
    /// `rows.split_seed` is set).
    #[serde(default)]
    pub seed: u64,
    /// Budget: most trials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trials: Option<u64>,
    /// Budget: wall time spent in trials (across interrupted runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Duration>,
    /// Methods to choose among; empty: the entry's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Model selection.
    #[serde(default)]
    pub select: Selection,
    /// The ranges searched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub space: Vec<RangeSpec>,
    /// Weights of `dataset.metric` terms; empty: every dataset's main metric, equally.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub objective: BTreeMap<String, f64>,
    /// Tuning and held-out rows.
    #[serde(default)]
    pub rows: RowsSpec,
    /// CMA-ES: candidates per generation (default 4 + ⌊3 ln d⌋).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub population: Option<usize>,
    /// CMA-ES: initial step size, as a share of each range (default 0.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma: Option<f64>,
    /// TPE: random candidates before the model takes over (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<usize>,
}

/// Trials when the table sets no budget at all.
pub const DEFAULT_TRIALS: u64 = 50;

/// The optimizers.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// CMA-ES when the space is ranges only, TPE when it also chooses methods or models.
    #[default]
    Auto,
    /// CMA-ES (the `cmaes` crate), as mergekit-evolve: continuous ranges only.
    Cmaes,
    /// Tree-structured Parzen estimators (the `tpe` crate): ranges and choices.
    Tpe,
    /// Uniform random proposals: the baseline.
    Random,
}

impl OptimizerKind {
    /// The name in the TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            OptimizerKind::Auto => "auto",
            OptimizerKind::Cmaes => "cmaes",
            OptimizerKind::Tpe => "tpe",
            OptimizerKind::Random => "random",
        }
    }
}

/// `select`: which experts the search may leave out.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Selection {
    /// `true`: every expert; `false` (the default): none.
    All(bool),
    /// These experts (as named in `[[merge.models]]`).
    Some(Vec<String>),
}

impl Default for Selection {
    fn default() -> Self {
        Selection::All(false)
    }
}

/// One `[[search.space]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RangeSpec {
    /// A parameter of the method(s), under mergekit's name.
    pub parameter: String,
    /// `None`: the global value (`[merge.parameters]`); `"*"`: one range per model; else a
    /// model as named in `[[merge.models]]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `[low, high]`.
    pub range: [f64; 2],
    /// Knots of a per-layer gradient (1: one value for every layer).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub knots: usize,
    /// Tensor-name filters with values of their own; every other tensor gets one more value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// `[search.rows]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RowsSpec {
    /// Share of each validation file held out (seeded split).
    #[serde(default = "default_held_out")]
    pub held_out: f64,
    /// Seed of the split (default: the search's seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_seed: Option<u64>,
    /// Rows per file of a candidate's first look (default: the tuning rows / eta², at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_look: Option<usize>,
    /// Successive halving's rate: the top 1/eta of a rung's candidates go on to eta times the
    /// rows.
    #[serde(default = "default_eta")]
    pub eta: usize,
}

fn default_held_out() -> f64 {
    0.3
}

fn default_eta() -> usize {
    3
}

impl Default for RowsSpec {
    fn default() -> Self {
        RowsSpec {
            held_out: default_held_out(),
            split_seed: None,
            first_look: None,
            eta: default_eta(),
        }
    }
}

/// A wall-time budget: seconds, or text with a unit (`"90s"`, `"10m"`, `"2h"`, `"1h30m"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DurationText", into = "DurationText")]
pub struct Duration(pub f64);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum DurationText {
    Seconds(f64),
    Text(String),
}

impl TryFrom<DurationText> for Duration {
    type Error = String;

    fn try_from(t: DurationText) -> Result<Self, String> {
        match t {
            DurationText::Seconds(s) => Ok(Duration(s)),
            DurationText::Text(s) => parse_duration(&s).map(Duration),
        }
    }
}

impl From<Duration> for DurationText {
    fn from(d: Duration) -> Self {
        DurationText::Seconds(d.0)
    }
}

/// `"1h30m"`, `"90s"`, `"2.5m"`, `"45"` → seconds.
pub fn parse_duration(s: &str) -> Result<f64, String> {
    let bad = || format!("`{s}` is not a duration (write e.g. \"90s\", \"10m\", \"2h\")");
    let mut total = 0.0;
    let mut number = String::new();
    for c in s.trim().chars() {
        match c {
            '0'..='9' | '.' => number.push(c),
            'h' | 'm' | 's' => {
                let x: f64 = number.parse().map_err(|_| bad())?;
                total += x * match c {
                    'h' => 3600.0,
                    'm' => 60.0,
                    _ => 1.0,
                };
                number.clear();
            }
            c if c.is_whitespace() => {}
            _ => return Err(bad()),
        }
    }
    if !number.is_empty() {
        total += number.parse::<f64>().map_err(|_| bad())?;
    }
    Ok(total)
}

/// The budget, checked: at least one of trials and time, neither zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Most trials.
    pub trials: Option<u64>,
    /// Most seconds spent in trials.
    pub seconds: Option<f64>,
}

impl SearchSpec {
    /// The budget, or the error naming a zero one. No budget at all means
    /// [`DEFAULT_TRIALS`] trials.
    pub fn budget(&self) -> Result<Budget, SpecError> {
        if self.trials == Some(0) {
            return Err(SpecError::ZeroBudget { key: "trials" });
        }
        if let Some(t) = self.time {
            if t.0.is_nan() || t.0 <= 0.0 {
                return Err(SpecError::ZeroBudget { key: "time" });
            }
        }
        let trials = match (self.trials, self.time) {
            (None, None) => Some(DEFAULT_TRIALS),
            (t, _) => t,
        };
        Ok(Budget {
            trials,
            seconds: self.time.map(|t| t.0),
        })
    }

    /// The table without its budget: what identifies a search, so that raising the budget
    /// continues the same search instead of starting another.
    pub fn identity(&self) -> String {
        let mut s = self.clone();
        s.trials = None;
        s.time = None;
        toml::to_string(&s).expect("a search spec always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90.0));
        assert_eq!(parse_duration("1h30m"), Ok(5400.0));
        assert_eq!(parse_duration("2.5m"), Ok(150.0));
        assert_eq!(parse_duration("45"), Ok(45.0));
        assert!(parse_duration("ten minutes").is_err());
    }

    #[test]
    fn parses_the_documented_table() {
        let text = r#"
optimizer = "tpe"
seed = 3
trials = 10
time = "2m"
methods = ["ties", "dare_ties"]
select = ["demo:reverse"]
[[space]]
parameter = "weight"
model = "*"
range = [0.3, 1.5]
knots = 2
filters = ["self_attn"]
[objective]
"largest.accuracy" = 2.0
[rows]
held_out = 0.25
first_look = 5
"#;
        let s: SearchSpec = toml::from_str(text).unwrap();
        assert_eq!(s.optimizer, OptimizerKind::Tpe);
        assert_eq!(s.time, Some(Duration(120.0)));
        assert_eq!(s.select, Selection::Some(vec!["demo:reverse".into()]));
        assert_eq!(s.space[0].knots, 2);
        assert_eq!(s.rows.eta, 3);
        let b = s.budget().unwrap();
        assert_eq!((b.trials, b.seconds), (Some(10), Some(120.0)));
        // The identity leaves the budget out.
        let mut more = s.clone();
        more.trials = Some(100);
        assert_eq!(s.identity(), more.identity());
        let err: Result<SearchSpec, _> = toml::from_str("colour = 1");
        assert!(err.unwrap_err().to_string().contains("colour"));
    }

    #[test]
    fn zero_budgets_are_errors() {
        let s: SearchSpec = toml::from_str("trials = 0").unwrap();
        assert!(matches!(
            s.budget(),
            Err(SpecError::ZeroBudget { key: "trials" })
        ));
        let s: SearchSpec = toml::from_str("time = \"0s\"").unwrap();
        assert!(matches!(
            s.budget(),
            Err(SpecError::ZeroBudget { key: "time" })
        ));
        let s: SearchSpec = toml::from_str("").unwrap();
        assert_eq!(s.budget().unwrap().trials, Some(DEFAULT_TRIALS));
    }
}
