//! What can go wrong in a search: bad `[search]` input (found before any model loads, one
//! variant per mistake so callers and tests can branch on it), and failures while searching.

use std::path::PathBuf;

/// A mistake in the `[search]` table (or in how it fits the entry), found before any model is
/// loaded. Each message names the key at fault and what would be right.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A method in `methods` the registry does not know.
    #[error("[search] methods: unknown merge method `{method}` (known: {known})")]
    UnknownMethod {
        /// The name written.
        method: String,
        /// Every registered method.
        known: String,
    },
    /// A method merged layer by layer (`regmean_plus`), as the entry's method or among
    /// `methods`: a trial is merged in memory in one pass, and this method's statistics come
    /// from forward passes through the merged lower layers, so only `merge` / `run` can merge it.
    #[error("[search] method `{method}` cannot be searched: its statistics depend on the merged lower layers (forward passes alternate with merging, layer by layer), and a search merges each trial in memory in one pass; merge it with `llm-merging merge` or `run`, or search `regmean` (statistics from `llm-merging stats`)")]
    LayerwiseMethod {
        /// The method named (as the entry's `[merge] method` or in `[search] methods`).
        method: String,
    },
    /// A `[[search.space]]` parameter that none of the searched methods declares (globally, or
    /// per model when the range names a model).
    #[error("[[search.space]] `{parameter}`{}: not a {}parameter of {} (it takes: {takes})",
        model.as_ref().map(|m| format!(" (model {m})")).unwrap_or_default(),
        if model.is_some() { "per-model " } else { "" },
        methods.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(" or "))]
    UndeclaredParameter {
        /// The parameter.
        parameter: String,
        /// The model the range is for, if per model.
        model: Option<String>,
        /// The searched methods.
        methods: Vec<String>,
        /// What they take there.
        takes: String,
    },
    /// A parameter declared as a flag given a numeric range.
    #[error("[[search.space]] `{parameter}` is a flag of `{method}`, not a number: ranges are for numbers")]
    FlagParameter {
        /// The parameter.
        parameter: String,
        /// The method declaring it as a flag.
        method: String,
    },
    /// A model named in `[search]` that is not in the entry's `[[merge.models]]`.
    #[error("{key}: model `{model}` is not in the entry's [[merge.models]] (it has: {known})")]
    UnknownModel {
        /// Where it was named (`[[search.space]] weight`, `[search] select`).
        key: String,
        /// The name written.
        model: String,
        /// The entry's models.
        known: String,
    },
    /// A range with low ≥ high, or not finite.
    #[error("[[search.space]] `{parameter}`{}: range [{low}, {high}] is empty or inverted (write [low, high] with low < high)",
        model.as_ref().map(|m| format!(" (model {m})")).unwrap_or_default())]
    EmptyRange {
        /// The parameter.
        parameter: String,
        /// The model the range is for, if per model.
        model: Option<String>,
        /// The range as written.
        low: f64,
        /// The range as written.
        high: f64,
    },
    /// A budget of zero trials or zero seconds.
    #[error("[search] `{key}`: the budget is zero; give at least one trial or some time (e.g. trials = 40, time = \"10m\")")]
    ZeroBudget {
        /// `trials` or `time`.
        key: &'static str,
    },
    /// A held-out split that leaves a validation file without held-out rows.
    #[error("[search.rows] held_out = {fraction}: no row of `{dataset}` ({rows} rows) is held out; the best recipe must be checked on rows the search never saw (e.g. held_out = 0.3)")]
    NoHeldOutRows {
        /// The dataset (file stem).
        dataset: String,
        /// Its rows.
        rows: usize,
        /// The fraction written.
        fraction: f64,
    },
    /// A held-out split that leaves nothing to tune on.
    #[error("[search.rows] held_out = {fraction}: no row of `{dataset}` ({rows} rows) is left to tune on")]
    NoTuningRows {
        /// The dataset (file stem).
        dataset: String,
        /// Its rows.
        rows: usize,
        /// The fraction written.
        fraction: f64,
    },
    /// An objective term naming a dataset or metric the entry does not evaluate.
    #[error("[search.objective] `{term}`: {reason}")]
    BadObjective {
        /// The key as written (`dataset.metric`).
        term: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An optimizer that cannot search this space.
    #[error("[search] optimizer = \"{optimizer}\": {reason}")]
    Optimizer {
        /// The optimizer named.
        optimizer: String,
        /// Why it does not fit.
        reason: String,
    },
    /// Any other value out of its domain (the message names the key).
    #[error("{0}")]
    Invalid(String),
}

/// Anything that stops a search.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input, found before any model loads.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Merging or evaluating failed.
    #[error(transparent)]
    Eval(#[from] eval_harness::Error),
    /// The trial store (SQLite) failed.
    #[error("trial store {path}: {source}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The store holds a different trial where this search expects its own: it was written by
    /// another version of the tool or from other inputs.
    #[error("trial store {path}: trial {seq} was {stored}, but this search proposes {proposed} there; the store was written by another version (move it away to start over)")]
    Diverged {
        /// The database file.
        path: PathBuf,
        /// The trial number.
        seq: usize,
        /// The recipe key stored.
        stored: String,
        /// The recipe key proposed now.
        proposed: String,
    },
    /// Writing an output file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Drawing a plot failed.
    #[error("plot {path}: {message}")]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// plotters' message.
        message: String,
    },
    /// An optimizer crate failed (never expected with valid ranges).
    #[error("optimizer: {0}")]
    Optimizer(String),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the merge engine refused a candidate's recipe for its values (a parameter out
    /// of the method's domain, e.g. DELLA's density ± epsilon outside (0, 1)): the candidate
    /// is infeasible, and the search goes on without it.
    pub fn is_refused_recipe(&self) -> bool {
        match self {
            Error::Eval(eval_harness::Error::Merge(e)) => matches!(
                **e,
                merge_core::Error::Config { .. } | merge_core::Error::Method { .. }
            ),
            _ => false,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
