//! `llm-merging search --entry DIR [--report]`: the entry's `[search]` table run (or, with
//! `--report`, its store printed without computing anything), into `search/<entry>/`:
//! `store.sqlite`, `trials.csv`, `score.svg`, `held_out.svg` and `best/entry.toml`, a
//! complete entry with the best recipe frozen, ready for `run` and `package`.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use eval_harness::dataset::{self, Dataset};
use eval_harness::{EvalOptions, Scoring};
use merge_core::source::Resolver;
use merge_core::MergeConfig;
use search::{Check, Evaluator, Finished, InMemory, Plan, Recommendation, SearchSpec, Space};

use crate::entry::{Entry, EntryFile};
use crate::prompting::Prompting;

/// Arguments of `llm-merging search`.
#[derive(clap::Args, Debug, Clone)]
pub struct SearchArgs {
    /// The entry directory (or its name under submissions/); its entry.toml needs a [search]
    /// table.
    #[arg(long)]
    pub entry: PathBuf,
    /// Print the trials and the held-out check from the store, computing nothing.
    #[arg(long)]
    pub report: bool,
}

/// Whether the entry at `dir` merges the offline demo family (tiny models, which evaluate
/// fastest on one thread per product).
pub fn is_demo(dir: &Path) -> bool {
    Entry::load(dir).is_ok_and(|e| e.text.contains(demo::DEMO_PREFIX))
}

/// The entry's search settings, or the error saying how to add them.
fn spec(entry: &Entry) -> Result<&SearchSpec> {
    entry.file.search.as_ref().with_context(|| {
        format!(
            "{}: no [search] table (see the README, \"Searching\", for its syntax)",
            entry.file_path.display()
        )
    })
}

fn load_datasets(paths: &[PathBuf]) -> Result<Vec<Dataset>> {
    let mut out: Vec<Dataset> = Vec::new();
    for p in paths {
        let ds = dataset::load(p)?;
        if out.iter().any(|d| d.name == ds.name) {
            bail!(
                "{}: another data file has the stem `{}`; rename one",
                p.display(),
                ds.name
            );
        }
        out.push(ds);
    }
    Ok(out)
}

/// The search directory of an entry: `search/<entry>/` in its workspace.
pub fn search_dir(entry: &Entry) -> PathBuf {
    entry.workspace.join("search").join(&entry.name)
}

/// Runs `llm-merging search`.
pub fn run(args: SearchArgs) -> Result<()> {
    let entry = Entry::load(&args.entry)?;
    let origin = entry.file_path.display().to_string();
    let spec = spec(&entry)?;
    // The space and the budget first: a mistake there needs no data and no model.
    Space::new(spec, &entry.file.merge).with_context(|| origin.clone())?;
    spec.budget().with_context(|| origin.clone())?;
    crate::demo_family::ensure_for_entry(&entry)?;
    let datasets = load_datasets(&entry.datasets()?)?;
    let eval = &entry.file.eval;
    let device = crate::device::resolve(&eval.device)?;
    let dtype = eval_harness::resolve_dtype(&eval.dtype, &device).map_err(anyhow::Error::msg)?;
    let scoring: Scoring = eval.scoring.parse().map_err(anyhow::Error::msg)?;
    let resolver = demo::with_demo_models(Resolver::from_env().with_base_dir(&entry.dir));
    let prompting = prompting(&entry, &resolver, &datasets)?;
    let mut identity = format!(
        "scoring={};max_gen_len={:?};dtype={dtype:?};device={}",
        eval.scoring,
        eval.max_gen_len,
        crate::device::name(&device)
    );
    if let Some(p) = &prompting {
        // Rows scored under one prompt are not the same rows under another.
        identity += &format!(";{}", p.key()?);
    }
    let plan = Plan::new(
        spec,
        &entry.file.merge,
        datasets,
        &identity,
        scoring == Scoring::Full,
    )
    .with_context(|| origin.clone())?;
    let dir = search_dir(&entry);
    let shown = dir
        .strip_prefix(&entry.workspace)
        .unwrap_or(&dir)
        .to_path_buf();
    let best_path = shown.join("best").join("entry.toml");

    if args.report {
        let Some(done) = search::report(&plan, &dir)? else {
            bail!(
                "{}: no trials of this search yet; run `llm-merging search --entry {}`",
                shown.display(),
                entry.path_in_workspace()
            );
        };
        print_results(&plan, &done, &best_path, true);
        return Ok(());
    }

    println!(
        "search {}: {} over {} ({}), {} tuning and {} held-out rows in {} rungs, budget {}",
        entry.name,
        plan.space.optimizer().as_str(),
        describe_space(&plan),
        plan.space.methods().join("/"),
        plan.rows.tuning().len(),
        plan.rows.held_out.len(),
        plan.rows.rungs.len(),
        describe_budget(&plan)
    );
    let opts = EvalOptions {
        batch_size: eval.batch_size.max(1),
        max_gen_len: eval.max_gen_len,
        limit: None,
        scoring,
        progress: false,
        // The entry's own prompting, as `run` evaluates it; no standard errors (the held-out
        // check computes its own intervals from the rows).
        prompt: prompting.map(|p| p.prompter),
        stderr_resamples: None,
    };
    let recipe = entry.file.merge.clone();
    let data = plan.datasets.clone();
    let open = Box::new(move || -> search::Result<Box<dyn Evaluator>> {
        eprintln!("loading the entry's models (opened once; every trial merges in memory)");
        Ok(Box::new(InMemory::open(
            &recipe,
            &resolver,
            dtype,
            &device,
            data.clone(),
            opts.clone(),
        )?))
    });
    let done = search::search(&plan, &dir, open, true)?;
    if let Some(check) = &done.check {
        let best = plan
            .space
            .recipe(&done.outcome.best().expect("a check has a best").raw)
            .expect("a trial's recipe is valid");
        write_best_entry(&entry, &dir.join("best"), &best, check, &plan)?;
    }
    print_results(&plan, &done, &best_path, false);
    println!(
        "outputs in {}: best/entry.toml, trials.csv, score.svg, held_out.svg, store.sqlite",
        shown.display()
    );
    // The entry's report shows the search's plots and trials; before the entry's first run
    // there is no report to write, which is said, not an error.
    match crate::pipeline::report::write_entry_report(&entry) {
        Ok(path) => println!("report written to {}", path.display()),
        Err(e) if matches!(e.downcast_ref(), Some(report::Error::NotRun { .. })) => {
            println!("no report yet: {e}")
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// The entry's `[prompt]`, every validation row rendered once (a bad prompt fails here,
/// before any model loads); the chat template, when a task uses one, from the merge's
/// reference model.
fn prompting(
    entry: &Entry,
    resolver: &Resolver,
    datasets: &[Dataset],
) -> Result<Option<Prompting>> {
    let Some(settings) = &entry.file.prompt else {
        return Ok(None);
    };
    let merge = &entry.file.merge;
    let reference = merge
        .base_model
        .clone()
        .or_else(|| merge.models.first().map(|m| m.model.clone()))
        .unwrap_or_default();
    let p = crate::prompting::prepare(
        settings,
        |p| entry.path(p),
        &entry.datasets()?,
        || {
            let inputs = merge_core::engine::Inputs::open(merge, resolver)?;
            Ok(inputs.reference.files().model_dir()?)
        },
        &reference,
        &datasets.iter().collect::<Vec<_>>(),
    );
    Ok(Some(
        p.with_context(|| entry.file_path.display().to_string())?,
    ))
}

fn describe_space(plan: &Plan) -> String {
    let mut parts = Vec::new();
    if !plan.space.dims().is_empty() {
        parts.push(format!("{} ranges", plan.space.dims().len()));
    }
    if plan.space.methods().len() > 1 {
        parts.push(format!("{} methods", plan.space.methods().len()));
    }
    if !plan.space.selectable().is_empty() {
        parts.push(format!(
            "{} selectable experts",
            plan.space.selectable().len()
        ));
    }
    parts.join(", ")
}

fn describe_budget(plan: &Plan) -> String {
    let mut parts = Vec::new();
    if let Some(n) = plan.budget.trials {
        parts.push(format!("{n} trials"));
    }
    if let Some(s) = plan.budget.seconds {
        parts.push(search::progress::human(s));
    }
    parts.join(" or ")
}

fn print_results(plan: &Plan, done: &Finished, best_path: &Path, report: bool) {
    let o = &done.outcome;
    println!();
    if report {
        print!("{}", search::outputs::trial_table(plan, &o.trials, None));
    } else {
        println!("best trials:");
        print!("{}", search::outputs::trial_table(plan, &o.trials, Some(5)));
    }
    println!();
    match &done.check {
        Some(c) => print!("{}", c.render(&best_path.display().to_string())),
        None => println!("held-out check: not run yet (the search has not finished)"),
    }
}

/// `best/entry.toml`: the entry with its `[merge]` replaced by the best recipe and no
/// `[search]`; paths relative to the entry's directory rewritten for the new one.
fn write_best_entry(
    entry: &Entry,
    dir: &Path,
    best: &MergeConfig,
    check: &Check,
    plan: &Plan,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let up = relative(&dir, &entry.dir);
    let rebase = |p: &str, must_exist: bool| -> String {
        let local = !(p.starts_with('$') || p.starts_with('/') || p.starts_with('~'));
        if local && (!must_exist || entry.dir.join(p).exists()) {
            up.join(p).display().to_string().replace('\\', "/")
        } else {
            p.to_string()
        }
    };
    let mut merge = best.clone();
    if let Some(b) = &merge.base_model {
        merge.base_model = Some(rebase(b, true));
    }
    for m in &mut merge.models {
        m.model = rebase(&m.model, true);
    }
    let mut file = EntryFile {
        merge,
        search: None,
        ..entry.file.clone()
    };
    file.eval.datasets = file
        .eval
        .datasets
        .iter()
        .map(|d| rebase(d, false))
        .collect();
    file.predict.test_file = rebase(&file.predict.test_file, false);
    let verdict = match (check.within_noise, check.recommend) {
        (false, Recommendation::Best) => "beats the entry's own recipe",
        (false, Recommendation::Entry) => {
            "does WORSE than the entry's own recipe (it overfit the tuning rows)"
        }
        (true, _) => "is within the noise of the entry's own recipe",
    };
    let header = format!(
        "# Written by `llm-merging search --entry {}`: trial {} of {} (seed {}).\n\
         # Objective on the tuning rows {:.4}; on the {} held-out rows {:.4} against the entry's\n\
         # {:.4}: {verdict} (difference {:+.4}, 95% interval [{:+.4}, {:+.4}]).\n\n",
        entry.path_in_workspace(),
        check.best_seq,
        plan.budget
            .trials
            .map_or("?".to_string(), |n| n.to_string()),
        plan.spec.seed,
        check.best.tuning,
        check.rows,
        check.best.held_out,
        check.entry.held_out,
        check.difference.difference,
        check.difference.low,
        check.difference.high,
    );
    let text = header + &toml::to_string_pretty(&file)?;
    let path = dir.join("entry.toml");
    let tmp = dir.join(".entry.toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("{}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("{}", path.display()))?;
    Ok(())
}

/// The relative path from directory `from` to directory `to` (both absolute).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative(
                Path::new("/w/search/demo/best"),
                Path::new("/w/submissions/demo")
            ),
            PathBuf::from("../../../submissions/demo")
        );
        assert_eq!(
            relative(Path::new("/w/a"), Path::new("/w/a")),
            PathBuf::new()
        );
    }
}
