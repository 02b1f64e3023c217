//! search: find an entry's merge recipe within a budget without overfitting the validation
//! set — `llm-merging search`.
//!
//! A search reads the entry's `[search]` table ([`spec`]), checks it against the entry's
//! merge, the registry and the validation files before any model loads ([`plan`]: the
//! [`space`], the [`rows`] split, the [`objective`]), then lets an [`optimizer`] (CMA-ES, TPE
//! or random, seeded) propose candidates. Each trial merges its recipe in memory into the
//! loaded model and evaluates the merged weights in place ([`evaluator`]), first on a few
//! tuning rows and on more only while successive halving promotes it ([`halving`]). Every row
//! scored and every trial lands in an SQLite store ([`store`]) as it completes, so a search
//! resumes where it stopped and never scores a row twice ([`scorer`], [`runner`]). At the end
//! the best recipe and the entry's own are compared on held-out rows no trial saw
//! ([`compare`]), and the trials are written as `trials.csv` and plots ([`outputs`],
//! [`plot`]).
//!
//! Modules, each importing only those listed before it: error, spec, space, rows, objective,
//! halving, optimizer, store, evaluator, plan, scorer, progress, runner, compare, outputs,
//! plot.
//!
//! ```no_run
//! use search::{Plan, SearchSpec};
//! # fn demo(recipe: merge_core::MergeConfig, datasets: Vec<eval_harness::dataset::Dataset>,
//! #         open: search::scorer::OpenEvaluator<'static>) -> search::Result<()> {
//! let spec: SearchSpec = toml::from_str(r#"
//!     trials = 40
//!     [[space]]
//!     parameter = "weight"
//!     model = "*"
//!     range = [0.2, 1.5]
//! "#).unwrap();
//! let plan = Plan::new(&spec, &recipe, datasets, "scoring=full", true)?;
//! let done = search::search(&plan, "search/my_entry".as_ref(), open, true)?;
//! if let Some(check) = &done.check {
//!     print!("{}", check.render("search/my_entry/best/entry.toml"));
//! }
//! # Ok(()) }
//! ```

pub mod compare;
pub mod error;
pub mod evaluator;
pub mod halving;
pub mod objective;
pub mod optimizer;
pub mod outputs;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod rows;
pub mod runner;
pub mod scorer;
pub mod space;
pub mod spec;
pub mod store;

use std::path::Path;

pub use compare::{Check, Recommendation};
pub use error::{Error, Result, SpecError};
pub use evaluator::{Evaluation, Evaluator, InMemory};
pub use plan::Plan;
pub use runner::Outcome;
pub use space::{Point, Space};
pub use spec::SearchSpec;
pub use store::{Store, Trial};

use crate::progress::Progress;
use crate::scorer::{OpenEvaluator, Scorer};

/// The trial store in a search directory.
pub const STORE_FILE: &str = "store.sqlite";
/// Every trial, one row each.
pub const TRIALS_CSV: &str = "trials.csv";
/// Objective per trial, best so far.
pub const SCORE_SVG: &str = "score.svg";
/// The held-out check.
pub const HELD_OUT_SVG: &str = "held_out.svg";

/// A search's results.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The trials.
    pub outcome: Outcome,
    /// The held-out check of the best trial (`None`: no trial, or, in a report, its rows are
    /// not all stored yet).
    pub check: Option<Check>,
}

/// Runs the search of `plan` in `dir` (resuming from its store): the trials within the
/// budget, the held-out check of the best, then `trials.csv` and the plots. `open` loads the
/// evaluator the first time a row must be scored; `lines`: print a line per trial.
pub fn search(plan: &Plan, dir: &Path, open: OpenEvaluator<'_>, lines: bool) -> Result<Finished> {
    let mut store = Store::open(&dir.join(STORE_FILE))?;
    let mut scorer = Scorer::new(plan, &mut store, open);
    let progress = Progress::new(plan.budget, lines);
    let outcome = runner::run(&mut scorer, &progress)?;
    let check = match outcome.best() {
        Some(best) => Some(Check::run(&mut scorer, best)?),
        None => None,
    };
    write_outputs(plan, dir, &outcome, check.as_ref())?;
    Ok(Finished { outcome, check })
}

/// The search of `plan` as its store in `dir` holds it, computing nothing: `None` when there
/// is no store or no trial of this search.
pub fn report(plan: &Plan, dir: &Path) -> Result<Option<Finished>> {
    let Some(store) = Store::open_existing(&dir.join(STORE_FILE))? else {
        return Ok(None);
    };
    let trials = store.trials(&plan.key)?;
    if trials.is_empty() {
        return Ok(None);
    }
    let key = plan::recipe_key(plan.space.base());
    let (rows, missing) = store.cached(&key, &plan.data_keys, plan.rows.tuning())?;
    let entry_tuning = if missing.is_empty() {
        plan.objective.score(&rows).unwrap_or(0.0)
    } else {
        f64::NAN
    };
    let outcome = Outcome {
        resumed: trials.len(),
        rungs: plan.rows.rungs.len(),
        trials,
        entry_tuning,
    };
    let check = match outcome.best() {
        Some(best) => Check::from_store(plan, &store, best)?,
        None => None,
    };
    Ok(Some(Finished { outcome, check }))
}

/// Writes `trials.csv` and the plots into `dir`.
pub fn write_outputs(
    plan: &Plan,
    dir: &Path,
    outcome: &Outcome,
    check: Option<&Check>,
) -> Result<()> {
    outputs::write_trials_csv(&dir.join(TRIALS_CSV), plan, &outcome.trials)?;
    plot::score_plot(
        &dir.join(SCORE_SVG),
        &outcome.trials,
        outcome.rungs,
        outcome.entry_tuning,
    )?;
    if let Some(c) = check {
        plot::held_out_plot(&dir.join(HELD_OUT_SVG), c, &plan.objective.datasets)?;
    }
    Ok(())
}
