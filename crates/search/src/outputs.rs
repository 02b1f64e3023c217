//! The files a search leaves in its directory besides the store: `trials.csv` (every trial:
//! its candidate, rows, scores and times) and the trial table `--report` prints.

use std::path::Path;

use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::progress::human;
use crate::runner::best_of;
use crate::store::Trial;

/// Writes `trials.csv`: one row per trial, one column per dimension of the space (empty where
/// the trial's method or experts did not use it) and per dataset, written beside and renamed
/// into place.
pub fn write_trials_csv(path: &Path, plan: &Plan, trials: &[Trial]) -> Result<()> {
    let tmp = path.with_extension("csv.tmp");
    let csv_err = |e: csv::Error| Error::io(path, std::io::Error::other(e));
    {
        let mut w = csv::Writer::from_path(&tmp).map_err(csv_err)?;
        let mut header = vec![
            "trial".to_string(),
            "method".into(),
            "models".into(),
            "rung".into(),
            "rows".into(),
            "objective".into(),
        ];
        header.extend(plan.objective.datasets.iter().cloned());
        header.extend(plan.space.dims().iter().map(|d| d.label.clone()));
        header.extend(
            [
                "new_rows",
                "merge_seconds",
                "eval_seconds",
                "seconds",
                "recipe",
            ]
            .map(String::from),
        );
        w.write_record(&header).map_err(csv_err)?;
        for t in trials {
            let mut row = vec![
                t.seq.to_string(),
                t.point.method.clone(),
                t.point.models.join(" "),
                (t.rung + 1).to_string(),
                t.rows.to_string(),
                format!("{:.6}", t.objective),
            ];
            row.extend(
                t.scores
                    .iter()
                    .map(|s| s.map(|x| format!("{x:.6}")).unwrap_or_default()),
            );
            row.extend(plan.space.dims().iter().map(|d| {
                t.point
                    .values
                    .get(&d.label)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            }));
            row.extend([
                t.new_rows.to_string(),
                format!("{:.3}", t.merge_seconds),
                format!("{:.3}", t.eval_seconds),
                format!("{:.3}", t.seconds),
                t.recipe[..12].to_string(),
            ]);
            w.write_record(&row).map_err(csv_err)?;
        }
        w.flush().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The trials as a table, best first (the `top` best; all with `None`), with a summary line.
pub fn trial_table(plan: &Plan, trials: &[Trial], top: Option<usize>) -> String {
    let mut sorted: Vec<&Trial> = trials.iter().collect();
    sorted.sort_by(|a, b| {
        b.rung
            .cmp(&a.rung)
            .then(b.objective.total_cmp(&a.objective))
            .then(a.seq.cmp(&b.seq))
    });
    let rungs = plan.rows.rungs.len();
    let mut s = format!(
        "{:>5}  {:<16} {:>4} {:>5} {:>9}",
        "trial", "method", "rung", "rows", "objective"
    );
    for d in &plan.objective.datasets {
        s += &format!(" {:>10}", truncate(d, 10));
    }
    s += "  values\n";
    for t in sorted.iter().take(top.unwrap_or(usize::MAX)) {
        s += &format!(
            "{:>5}  {:<16} {:>4} {:>5} {:>9.4}",
            t.seq,
            t.point.method,
            format!("{}/{rungs}", t.rung + 1),
            t.rows,
            t.objective
        );
        for x in &t.scores {
            s += &match x {
                Some(x) => format!(" {x:>10.4}"),
                None => format!(" {:>10}", "-"),
            };
        }
        let values: Vec<String> = t
            .point
            .values
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut extra = values.join(" ");
        if !plan.space.selectable().is_empty() {
            extra = format!("[{}] {extra}", t.point.models.join(" "));
        }
        s += &format!("  {extra}\n");
    }
    let spent: f64 = trials.iter().map(|t| t.seconds).sum();
    let full = trials.iter().filter(|t| t.rung + 1 == rungs).count();
    s += &format!(
        "{} trials ({full} on all {} tuning rows) in {}; best: {}\n",
        trials.len(),
        plan.rows.tuning().len(),
        human(spent),
        best_of(trials)
            .map(|b| format!("trial {} ({:.4})", b.seq, b.objective))
            .unwrap_or_else(|| "none yet".into())
    );
    s
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
