//! The search loop: the optimizer proposes, each proposal becomes a trial — its recipe scored
//! on the first rung's rows, then on more rows while successive halving promotes it — and
//! every finished trial is written to the store before the next starts.
//!
//! Resuming is replaying: the optimizers are deterministic given their seed and the scores
//! they are told, so a rerun proposes the same candidates in the same order, and the trials
//! already in the store answer with their stored scores instead of being computed again. The
//! first trial missing from the store is where the search goes on.

use std::time::Instant;

use crate::error::{Error, Result, SpecError};
use crate::halving::Ladder;
use crate::optimizer;
use crate::plan::recipe_key;
use crate::progress::Progress;
use crate::scorer::{Scored, Scorer};
use crate::space::Point;
use crate::store::Trial;

/// Consecutive proposals naming no valid recipe (fewer experts than the method merges)
/// before the search gives up.
const MOST_INVALID_IN_A_ROW: usize = 1000;

/// What a search run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Every trial of the search, in order (stored and new).
    pub trials: Vec<Trial>,
    /// How many of them were replayed from the store.
    pub resumed: usize,
    /// Rungs of the ladder (the last one is every tuning row).
    pub rungs: usize,
    /// The entry's own recipe on every tuning row.
    pub entry_tuning: f64,
}

impl Outcome {
    /// The best trial: the highest objective among the trials that reached the highest rung
    /// (all tuning rows), the earliest on a tie.
    pub fn best(&self) -> Option<&Trial> {
        best_of(&self.trials)
    }
}

/// The best of `trials` (see [`Outcome::best`]).
pub fn best_of(trials: &[Trial]) -> Option<&Trial> {
    let scored = || trials.iter().filter(|t| t.error.is_none());
    let top = scored().map(|t| t.rung).max()?;
    scored()
        .filter(|t| t.rung == top)
        .fold(None, |best: Option<&Trial>, t| match best {
            Some(b) if b.objective >= t.objective => Some(b),
            _ => Some(t),
        })
}

/// Runs the search of `scorer`'s plan until its budget is spent, resuming from the trials
/// its store holds.
pub fn run(scorer: &mut Scorer<'_>, progress: &Progress) -> Result<Outcome> {
    let plan = scorer.plan();
    scorer
        .store()
        .begin_search(&plan.key, &plan.spec.identity())?;
    let prior = scorer.store().trials(&plan.key)?;
    let store_path = scorer.store().path().to_path_buf();

    let entry = plan.space.base();
    let baseline = scorer.score(entry, plan.rows.tuning())?;
    let entry_tuning = plan.objective.score(&baseline.rows).unwrap_or(0.0);
    progress.say(&format!(
        "entry's own recipe ({}): {entry_tuning:.4} on the {} tuning rows{}",
        entry.method,
        baseline.rows.len(),
        if baseline.new_rows == 0 {
            " (stored)"
        } else {
            ""
        }
    ));

    let rungs = plan.rows.rungs.len();
    let mut ladder = Ladder::new(rungs, plan.rows.eta);
    let mut trials: Vec<Trial> = Vec::new();
    let mut invalid = 0usize;
    let mut announced = false;
    let budget = plan.budget;
    let mut trial = |p: &Point| -> Result<Option<f64>> {
        let done = trials.len();
        if budget.trials.is_some_and(|n| done as u64 >= n)
            || budget
                .seconds
                .is_some_and(|s| trials.iter().map(|t| t.seconds).sum::<f64>() >= s)
        {
            return Ok(None);
        }
        let Some(recipe) = plan.space.recipe(p) else {
            invalid += 1;
            if invalid > MOST_INVALID_IN_A_ROW {
                return Err(SpecError::Invalid(format!(
                    "[search] select: {MOST_INVALID_IN_A_ROW} proposals in a row left too few experts for their method; let fewer experts be left out"
                ))
                .into());
            }
            return Ok(Some(f64::NEG_INFINITY));
        };
        invalid = 0;
        let key = recipe_key(&recipe);
        let seq = done + 1;
        if let Some(t) = prior.get(done) {
            if t.recipe != key {
                return Err(Error::Diverged {
                    path: store_path.clone(),
                    seq,
                    stored: t.recipe.clone(),
                    proposed: key,
                });
            }
            if t.error.is_none() {
                for (r, s) in t.rung_scores.iter().enumerate() {
                    ladder.record(r, *s);
                }
            }
            trials.push(t.clone());
            return Ok(Some(t.objective));
        }
        if !announced && done > 0 {
            progress.say(&format!(
                "resumed: trials 1–{done} replayed from {} (nothing recomputed)",
                store_path.display()
            ));
        }
        announced = true;
        let start = Instant::now();
        let (mut merge_seconds, mut eval_seconds, mut new_rows) = (0.0, 0.0, 0);
        let mut rung_scores = Vec::new();
        let mut rung = 0;
        let mut error = None;
        let scored = loop {
            let s = match scorer.score(&recipe, &plan.rows.rungs[rung]) {
                Ok(s) => s,
                Err(e) if e.is_refused_recipe() => {
                    error = Some(e.to_string());
                    rung_scores.push(0.0);
                    break Scored::default();
                }
                Err(e) => return Err(e),
            };
            merge_seconds += s.merge_seconds;
            eval_seconds += s.eval_seconds;
            new_rows += s.new_rows;
            let score = plan.objective.score(&s.rows).unwrap_or(0.0);
            ladder.record(rung, score);
            rung_scores.push(score);
            if ladder.promote(rung, score) {
                rung += 1;
            } else {
                break s;
            }
        };
        let t = Trial {
            seq,
            recipe: key,
            point: plan.space.describe(p),
            raw: p.clone(),
            rung,
            rows: scored.rows.len(),
            objective: *rung_scores.last().expect("one rung at least"),
            scores: plan.objective.per_dataset(&scored.rows),
            rung_scores,
            new_rows,
            merge_seconds,
            eval_seconds,
            seconds: start.elapsed().as_secs_f64(),
            error,
        };
        scorer.store().add_trial(&plan.key, &t)?;
        trials.push(t);
        let t = trials.last().expect("just pushed");
        progress.trial(t, rungs, best_of(&trials), &trials);
        Ok(Some(t.objective))
    };
    optimizer::for_space(&plan.space, &plan.spec).run(&plan.space, &mut trial)?;
    progress.finish();
    let resumed = prior.len().min(trials.len());
    if resumed > 0 && resumed == trials.len() {
        progress.say(&format!(
            "resumed: all {resumed} trials replayed from {} (the budget was already spent)",
            store_path.display()
        ));
    }
    Ok(Outcome {
        trials,
        resumed,
        rungs,
        entry_tuning,
    })
}
