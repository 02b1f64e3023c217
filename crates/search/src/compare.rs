//! The held-out check, the search's final word: the best recipe and the entry's own scored on
//! the held-out rows no trial ever saw, compared row by row — the difference of the objective
//! with a paired bootstrap 95% interval, per dataset too, and McNemar's exact test where a
//! dataset is multiple choice. When the interval contains zero the difference is noise, and
//! the simpler recipe (fewer free values) is the one to keep.

use merge_core::MergeConfig;
use stats::{mcnemar, paired_bootstrap, McNemar, PairedDifference, DEFAULT_RESAMPLES};

use crate::error::Result;
use crate::objective::{Metric, RowMetrics, RowScore};
use crate::plan::Plan;
use crate::scorer::Scorer;
use crate::space::complexity;
use crate::store::{Store, Trial};

/// One recipe in the check.
#[derive(Debug, Clone)]
pub struct Side {
    /// `entry (ties)` / `best (#17)`.
    pub label: String,
    /// The recipe.
    pub recipe: MergeConfig,
    /// The objective on every tuning row.
    pub tuning: f64,
    /// Each dataset's main metric on the tuning rows.
    pub tuning_per_dataset: Vec<Option<f64>>,
    /// The objective on the held-out rows.
    pub held_out: f64,
    /// Each dataset's main metric on the held-out rows.
    pub held_out_per_dataset: Vec<Option<f64>>,
    /// Free values of the recipe ([`complexity`]).
    pub complexity: usize,
}

/// One dataset of the check.
#[derive(Debug, Clone)]
pub struct DatasetCheck {
    /// The dataset.
    pub name: String,
    /// Its main metric's name (`accuracy`, `rougeL`, or `main` for a mixed file).
    pub metric: &'static str,
    /// best − entry on its held-out rows, with a 95% interval.
    pub difference: PairedDifference,
    /// McNemar's test (best against entry) for a multiple-choice dataset.
    pub mcnemar: Option<McNemar>,
}

/// Which recipe the check recommends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recommendation {
    /// The best recipe found.
    Best,
    /// The entry's own recipe.
    Entry,
}

/// The held-out check.
#[derive(Debug, Clone)]
pub struct Check {
    /// The entry's own recipe.
    pub entry: Side,
    /// The best recipe found.
    pub best: Side,
    /// The best trial's number.
    pub best_seq: usize,
    /// Held-out rows (all datasets).
    pub rows: usize,
    /// best − entry in the objective on the held-out rows, with a 95% interval.
    pub difference: PairedDifference,
    /// Per dataset.
    pub datasets: Vec<DatasetCheck>,
    /// The interval contains zero.
    pub within_noise: bool,
    /// What to keep.
    pub recommend: Recommendation,
}

/// The rows of `dataset` in `rows`, sorted.
fn of(rows: &[RowScore], dataset: usize) -> Vec<&RowScore> {
    rows.iter().filter(|r| r.dataset == dataset).collect()
}

impl Check {
    /// Scores both recipes on the held-out rows (from the store where it has them) and
    /// compares them.
    pub fn run(scorer: &mut Scorer<'_>, best: &Trial) -> Result<Check> {
        let plan = scorer.plan();
        let (entry, best_recipe) = the_two_recipes(plan, best);
        let mut sides = Vec::new();
        for recipe in [&entry, &best_recipe] {
            let tuning = scorer.score(recipe, plan.rows.tuning())?.rows;
            let held_out = scorer.score(recipe, &plan.rows.held_out)?.rows;
            sides.push((tuning, held_out));
        }
        let (b, e) = (sides.pop().expect("two"), sides.pop().expect("two"));
        Ok(Check::compare(plan, entry, e, best_recipe, b, best.seq))
    }

    /// The check from the store alone (`--report`): `None` unless both recipes' tuning and
    /// held-out rows are all stored.
    pub fn from_store(plan: &Plan, store: &Store, best: &Trial) -> Result<Option<Check>> {
        let (entry, best_recipe) = the_two_recipes(plan, best);
        let mut sides = Vec::new();
        for recipe in [&entry, &best_recipe] {
            let key = crate::plan::recipe_key(recipe);
            let mut pair = Vec::new();
            for set in [plan.rows.tuning(), &plan.rows.held_out] {
                let (mut rows, missing) = store.cached(&key, &plan.data_keys, set)?;
                if !missing.is_empty() {
                    return Ok(None);
                }
                rows.sort_by_key(|r| (r.dataset, r.row));
                pair.push(rows);
            }
            let held_out = pair.pop().expect("two");
            sides.push((pair.pop().expect("two"), held_out));
        }
        let (b, e) = (sides.pop().expect("two"), sides.pop().expect("two"));
        Ok(Some(Check::compare(
            plan,
            entry,
            e,
            best_recipe,
            b,
            best.seq,
        )))
    }

    fn compare(
        plan: &Plan,
        entry: MergeConfig,
        (entry_tuning, entry_held): (Vec<RowScore>, Vec<RowScore>),
        best: MergeConfig,
        (best_tuning, best_held): (Vec<RowScore>, Vec<RowScore>),
        best_seq: usize,
    ) -> Check {
        let o = &plan.objective;
        let seed = plan.spec.seed;
        let side =
            |label: String, recipe: MergeConfig, tuning: &[RowScore], held: &[RowScore]| Side {
                label,
                complexity: complexity(&recipe),
                recipe,
                tuning: o.score(tuning).unwrap_or(0.0),
                tuning_per_dataset: o.per_dataset(tuning),
                held_out: o.score(held).unwrap_or(0.0),
                held_out_per_dataset: o.per_dataset(held),
            };
        let difference = paired_bootstrap(
            &o.per_row(&best_held),
            &o.per_row(&entry_held),
            DEFAULT_RESAMPLES,
            seed,
        );
        let datasets = (0..o.datasets.len())
            .map(|d| {
                let (b, e) = (of(&best_held, d), of(&entry_held, d));
                let main = |rows: &[&RowScore]| -> Vec<f64> {
                    rows.iter()
                        .filter_map(|r| Metric::Main.of(&r.metrics))
                        .collect()
                };
                let correct = |rows: &[&RowScore]| -> Option<Vec<bool>> {
                    rows.iter()
                        .map(|r| match r.metrics {
                            RowMetrics::Choice { correct, .. } => Some(correct),
                            RowMetrics::Generation { .. } => None,
                        })
                        .collect()
                };
                let all_choice = b
                    .iter()
                    .all(|r| matches!(r.metrics, RowMetrics::Choice { .. }));
                let all_generation = b
                    .iter()
                    .all(|r| matches!(r.metrics, RowMetrics::Generation { .. }));
                DatasetCheck {
                    name: o.datasets[d].clone(),
                    metric: if all_choice {
                        "accuracy"
                    } else if all_generation {
                        "rougeL"
                    } else {
                        "main"
                    },
                    difference: paired_bootstrap(&main(&b), &main(&e), DEFAULT_RESAMPLES, seed),
                    mcnemar: match (correct(&b), correct(&e)) {
                        (Some(b), Some(e)) if !b.is_empty() => Some(mcnemar(&b, &e)),
                        _ => None,
                    },
                }
            })
            .collect();
        let entry = side(
            format!("entry ({})", entry.method),
            entry,
            &entry_tuning,
            &entry_held,
        );
        let best = side(
            format!("best (#{best_seq})"),
            best,
            &best_tuning,
            &best_held,
        );
        let within_noise = difference.includes_zero();
        let recommend = if within_noise {
            if best.complexity < entry.complexity {
                Recommendation::Best
            } else {
                Recommendation::Entry
            }
        } else if difference.difference > 0.0 {
            Recommendation::Best
        } else {
            Recommendation::Entry
        };
        Check {
            entry,
            best,
            best_seq,
            rows: best_held.len(),
            difference,
            datasets,
            within_noise,
            recommend,
        }
    }

    /// The check as a table and a verdict; `best_path` is where the best entry was written.
    pub fn render(&self, best_path: &str) -> String {
        let sign = |x: f64| format!("{x:+.4}");
        let interval = |d: &PairedDifference| format!("[{}, {}]", sign(d.low), sign(d.high));
        let mut s = format!(
            "held-out check: {} rows no trial saw\n{:<14} {:<9} {:>14} {:>14} {:>10}  {:<20}  {}\n",
            self.rows,
            "dataset",
            "metric",
            self.entry.label,
            self.best.label,
            "difference",
            "95% interval",
            "McNemar"
        );
        for (d, c) in self.datasets.iter().enumerate() {
            let v = |x: Option<f64>| x.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into());
            s += &format!(
                "{:<14} {:<9} {:>14} {:>14} {:>10}  {:<20}  {}\n",
                c.name,
                c.metric,
                v(self.entry.held_out_per_dataset[d]),
                v(self.best.held_out_per_dataset[d]),
                sign(c.difference.difference),
                interval(&c.difference),
                c.mcnemar
                    .map(|m| format!("p = {:.4} ({} vs {} rows)", m.p_value, m.only_a, m.only_b))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        s += &format!(
            "{:<14} {:<9} {:>14.4} {:>14.4} {:>10}  {:<20}\n",
            "objective",
            "",
            self.entry.held_out,
            self.best.held_out,
            sign(self.difference.difference),
            interval(&self.difference),
        );
        s += &format!(
            "{:<14} {:<9} {:>14.4} {:>14.4}   (the rows the best was chosen on: optimistic)\n",
            "tuning rows", "", self.entry.tuning, self.best.tuning
        );
        let d = &self.difference;
        s += "\nverdict: ";
        s += &if !self.within_noise && d.difference > 0.0 {
            format!(
                "the best recipe (trial {}) beats the entry's own on the held-out rows by {} (95% interval {}): use {best_path}.\n",
                self.best_seq,
                sign(d.difference),
                interval(d)
            )
        } else if !self.within_noise {
            format!(
                "the best recipe (trial {}) does worse than the entry's own on the held-out rows ({}, 95% interval {}): it overfit the tuning rows; keep the entry's recipe.\n",
                self.best_seq,
                sign(d.difference),
                interval(d)
            )
        } else {
            let (simpler, n, other) = match self.recommend {
                Recommendation::Best => (
                    format!("the best recipe ({best_path})"),
                    self.best.complexity,
                    self.entry.complexity,
                ),
                Recommendation::Entry => (
                    "the entry's own".to_string(),
                    self.entry.complexity,
                    self.best.complexity,
                ),
            };
            format!(
                "the difference on the held-out rows ({}, 95% interval {}) is within the noise. Keep the simpler recipe: {simpler} ({n} free values against {other}).\n",
                sign(d.difference),
                interval(d)
            )
        };
        s
    }
}

/// The two recipes the held-out check compares: the entry's own and the best trial's.
fn the_two_recipes(plan: &Plan, best: &Trial) -> (MergeConfig, MergeConfig) {
    let best_recipe = plan
        .space
        .recipe(&best.raw)
        .expect("a trial's recipe is valid");
    (plan.space.base().clone(), best_recipe)
}
