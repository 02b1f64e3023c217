//! Scores of a recipe on a set of rows, from the store where it has them, evaluated (and then
//! stored) where it does not. The model is loaded only when a row must be evaluated, so a
//! search whose rows are all stored — a finished search rerun, a report — loads nothing.

use merge_core::MergeConfig;

use crate::error::Result;
use crate::evaluator::Evaluator;
use crate::objective::RowScore;
use crate::plan::{recipe_key, Plan};
use crate::rows::RowSet;
use crate::store::Store;

/// Opens the evaluator, the first time one is needed.
pub type OpenEvaluator<'a> = Box<dyn FnMut() -> Result<Box<dyn Evaluator>> + 'a>;

/// A recipe's scores on some rows, and what it took.
#[derive(Debug, Clone, Default)]
pub struct Scored {
    /// One score per row, sorted by dataset and row.
    pub rows: Vec<RowScore>,
    /// Rows evaluated now (the rest came from the store).
    pub new_rows: usize,
    /// Seconds merging.
    pub merge_seconds: f64,
    /// Seconds evaluating.
    pub eval_seconds: f64,
}

/// The store in front of a lazily opened evaluator.
pub struct Scorer<'a> {
    plan: &'a Plan,
    store: &'a mut Store,
    open: OpenEvaluator<'a>,
    evaluator: Option<Box<dyn Evaluator>>,
}

impl<'a> Scorer<'a> {
    /// A scorer over `store`; `open` is called at most once, when a row must be evaluated.
    pub fn new(plan: &'a Plan, store: &'a mut Store, open: OpenEvaluator<'a>) -> Self {
        Scorer {
            plan,
            store,
            open,
            evaluator: None,
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        self.store
    }

    /// The plan.
    pub fn plan(&self) -> &'a Plan {
        self.plan
    }

    /// Whether a model was loaded (some row had to be evaluated).
    pub fn loaded(&self) -> bool {
        self.evaluator.is_some()
    }

    /// `recipe`'s scores on `set`.
    pub fn score(&mut self, recipe: &MergeConfig, set: &RowSet) -> Result<Scored> {
        let key = recipe_key(recipe);
        let (mut rows, missing) = self.store.cached(&key, &self.plan.data_keys, set)?;
        let mut scored = Scored::default();
        if !missing.is_empty() {
            if self.evaluator.is_none() {
                self.evaluator = Some((self.open)()?);
            }
            let ev = self
                .evaluator
                .as_mut()
                .expect("opened above")
                .evaluate(recipe, &missing)?;
            self.store.add_evaluation(
                &key,
                &recipe.to_toml(),
                &self.plan.data_keys,
                &ev.rows,
                ev.merge_seconds,
                ev.eval_seconds,
            )?;
            scored.new_rows = ev.rows.len();
            scored.merge_seconds = ev.merge_seconds;
            scored.eval_seconds = ev.eval_seconds;
            rows.extend(ev.rows);
        }
        rows.sort_by_key(|r| (r.dataset, r.row));
        scored.rows = rows;
        Ok(scored)
    }
}
