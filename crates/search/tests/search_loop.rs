//! The search loop on a synthetic evaluator (a known landscape, no model): seeded proposals,
//! resuming after a failure without losing or repeating a trial, never scoring a row twice,
//! successive halving, the held-out rows kept out of tuning, and bad `[search]` input.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use eval_harness::dataset::{self, Dataset, EvalType};
use merge_core::config::ParamValue;
use merge_core::MergeConfig;
use search::objective::{RowMetrics, RowScore};
use search::rows::RowSet;
use search::{Evaluation, Evaluator, Finished, Plan, SearchSpec, SpecError, Trial};

const RECIPE: &str = r#"
[merge]
method = "ties"
base_model = "base"
[merge.parameters]
density = 0.5
weight = 1.0
[[merge.models]]
model = "a"
[[merge.models]]
model = "b"
[[merge.models]]
model = "c"
"#;

fn recipe() -> MergeConfig {
    MergeConfig::from_toml_str(RECIPE, "test").unwrap()
}

/// Two validation files: 60 multiple-choice rows and 30 generation rows.
fn datasets(dir: &Path) -> Vec<Dataset> {
    let mc = dir.join("mc.csv");
    let mut s = String::from("id,input,target,answer_choices,eval_type\n");
    for i in 0..60 {
        s += &format!("m{i},q{i},{},\"['x', 'y']\",multiple_choice\n", i % 2);
    }
    std::fs::write(&mc, s).unwrap();
    let gen = dir.join("gen.csv");
    let mut s = String::from("id,input,target,answer_choices,eval_type\n");
    for i in 0..30 {
        s += &format!("g{i},text {i},summary {i},,generation\n");
    }
    std::fs::write(&gen, s).unwrap();
    vec![dataset::load(&mc).unwrap(), dataset::load(&gen).unwrap()]
}

fn plan(dir: &Path, spec: &str) -> Plan {
    try_plan(dir, spec).unwrap()
}

fn try_plan(dir: &Path, spec: &str) -> search::Result<Plan> {
    let spec: SearchSpec = toml::from_str(spec).unwrap();
    Plan::new(&spec, &recipe(), datasets(dir), "synthetic", false)
}

fn number(v: Option<&ParamValue>) -> Option<f64> {
    match v? {
        ParamValue::Number(x) => Some(*x),
        _ => None,
    }
}

/// A landscape with its peak at weights (1.2, 0.6, any) and density 0.4: a row is right when
/// its fixed pseudo-random draw is below the recipe's quality.
struct Synthetic {
    calls: Arc<AtomicUsize>,
    rows: Arc<AtomicUsize>,
    fail_after: Option<usize>,
    datasets: Vec<Dataset>,
}

fn draw(d: usize, row: usize) -> f64 {
    let mut x = (d as u64 * 1_000_003 + row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    (x % 10_000) as f64 / 10_000.0
}

impl Evaluator for Synthetic {
    fn evaluate(&mut self, cfg: &MergeConfig, rows: &RowSet) -> search::Result<Evaluation> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_after.is_some_and(|k| n >= k) {
            return Err(search::Error::Optimizer("killed".into()));
        }
        let weight = |m: &str| {
            cfg.models
                .iter()
                .find(|x| x.model == m)
                .and_then(|x| number(x.parameters.get("weight")))
                .or_else(|| number(cfg.parameters.get("weight")))
                .unwrap_or(1.0)
        };
        let density = number(cfg.parameters.get("density")).unwrap_or(1.0);
        let q = 1.0
            - ((weight("a") - 1.2).powi(2) + (weight("b") - 0.6).powi(2) + (density - 0.4).powi(2));
        let mut out = Vec::new();
        for (d, picked) in rows.0.iter().enumerate() {
            for &row in picked {
                let u = draw(d, row);
                let metrics = match self.datasets[d].examples[row].eval_type {
                    EvalType::MultipleChoice => RowMetrics::Choice {
                        correct: u < q,
                        correct_norm: None,
                    },
                    EvalType::Generation => {
                        let r = (q * (0.5 + u)).clamp(0.0, 1.0);
                        RowMetrics::Generation {
                            rouge1: r,
                            rouge2: r,
                            rouge_l: r,
                            rouge_lsum: r,
                        }
                    }
                };
                out.push(RowScore {
                    dataset: d,
                    row,
                    prediction: String::new(),
                    metrics,
                });
            }
        }
        self.rows.fetch_add(out.len(), Ordering::SeqCst);
        Ok(Evaluation {
            rows: out,
            merge_seconds: 0.0,
            eval_seconds: 0.0,
        })
    }
}

struct Counters {
    calls: Arc<AtomicUsize>,
    rows: Arc<AtomicUsize>,
}

fn run(plan: &Plan, dir: &Path, fail_after: Option<usize>) -> (search::Result<Finished>, Counters) {
    let calls = Arc::new(AtomicUsize::new(0));
    let rows = Arc::new(AtomicUsize::new(0));
    let (c, r) = (calls.clone(), rows.clone());
    let data = plan.datasets.clone();
    let open = Box::new(move || -> search::Result<Box<dyn Evaluator>> {
        Ok(Box::new(Synthetic {
            calls: c.clone(),
            rows: r.clone(),
            fail_after,
            datasets: data.clone(),
        }))
    });
    (
        search::search(plan, dir, open, false),
        Counters { calls, rows },
    )
}

fn sequence(trials: &[Trial]) -> Vec<(String, u64, usize)> {
    trials
        .iter()
        .map(|t| (t.recipe.clone(), t.objective.to_bits(), t.rung))
        .collect()
}

const CMAES: &str = r#"
seed = 5
trials = 14
[[space]]
parameter = "weight"
model = "*"
range = [0.0, 2.0]
[[space]]
parameter = "density"
range = [0.1, 1.0]
"#;

const TPE: &str = r#"
seed = 5
trials = 16
methods = ["ties", "dare_ties", "linear"]
select = ["c"]
[[space]]
parameter = "weight"
model = "a"
range = [0.0, 2.0]
knots = 2
[[space]]
parameter = "density"
range = [0.1, 1.0]
filters = ["self_attn"]
"#;

#[test]
fn the_same_seed_gives_the_same_trials() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, spec) in [
        ("cmaes", CMAES.to_string()),
        ("tpe", TPE.to_string()),
        ("random", format!("optimizer = \"random\"\n{CMAES}")),
    ] {
        let p = plan(tmp.path(), &spec);
        let a = run(&p, &tmp.path().join(format!("{name}-a")), None)
            .0
            .unwrap();
        let b = run(&p, &tmp.path().join(format!("{name}-b")), None)
            .0
            .unwrap();
        assert_eq!(
            a.outcome.trials.len(),
            p.budget.trials.unwrap() as usize,
            "{name}"
        );
        assert_eq!(
            sequence(&a.outcome.trials),
            sequence(&b.outcome.trials),
            "{name}"
        );
        let distinct: std::collections::BTreeSet<_> =
            a.outcome.trials.iter().map(|t| t.recipe.clone()).collect();
        assert!(
            distinct.len() > 3,
            "{name}: {} distinct recipes",
            distinct.len()
        );
        let other = plan(tmp.path(), &spec.replace("seed = 5", "seed = 6"));
        let c = run(&other, &tmp.path().join(format!("{name}-c")), None)
            .0
            .unwrap();
        assert_ne!(
            sequence(&a.outcome.trials),
            sequence(&c.outcome.trials),
            "{name}"
        );
    }
}

#[test]
fn the_tpe_space_chooses_methods_and_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let p = plan(tmp.path(), TPE);
    let done = run(&p, &tmp.path().join("s"), None).0.unwrap();
    let methods: std::collections::BTreeSet<_> = done
        .outcome
        .trials
        .iter()
        .map(|t| t.point.method.clone())
        .collect();
    assert!(methods.len() >= 2, "{methods:?}");
    assert!(done
        .outcome
        .trials
        .iter()
        .any(|t| t.point.models.len() == 2));
    assert!(done
        .outcome
        .trials
        .iter()
        .any(|t| t.point.models.len() == 3));
    // linear takes no density: its trials carry none.
    for t in &done.outcome.trials {
        let has_density = t.point.values.keys().any(|k| k.starts_with("density"));
        assert_eq!(has_density, t.point.method != "linear", "{:?}", t.point);
    }
    let t = done
        .outcome
        .trials
        .iter()
        .find(|t| t.point.method == "ties")
        .unwrap();
    let cfg = p.space.recipe(&t.raw).unwrap();
    let toml = cfg.to_toml();
    assert!(toml.contains("filter = \"self_attn\""), "{toml}");
}

#[test]
fn a_failed_search_resumes_without_losing_or_repeating_a_trial() {
    let tmp = tempfile::tempdir().unwrap();
    let p = plan(tmp.path(), CMAES);
    let (whole, whole_counts) = run(&p, &tmp.path().join("whole"), None);
    let whole = whole.unwrap();

    let dir = tmp.path().join("interrupted");
    let (first, first_counts) = run(&p, &dir, Some(9));
    assert!(first.is_err(), "the evaluator fails on its 10th call");
    let stored = search::Store::open(&dir.join(search::STORE_FILE))
        .unwrap()
        .trials(&p.key)
        .unwrap();
    assert!(!stored.is_empty() && stored.len() < whole.outcome.trials.len());
    let (second, second_counts) = run(&p, &dir, None);
    let second = second.unwrap();
    assert_eq!(second.outcome.resumed, stored.len());
    assert_eq!(
        sequence(&second.outcome.trials),
        sequence(&whole.outcome.trials)
    );
    let seqs: Vec<usize> = second.outcome.trials.iter().map(|t| t.seq).collect();
    assert_eq!(seqs, (1..=whole.outcome.trials.len()).collect::<Vec<_>>());
    // Every row was scored once: the two runs together scored what the uninterrupted one did
    // (the failed call scored nothing).
    let rows = |c: &Counters| c.rows.load(Ordering::SeqCst);
    assert_eq!(
        rows(&first_counts) + rows(&second_counts),
        rows(&whole_counts)
    );
    let store = search::Store::open(&dir.join(search::STORE_FILE)).unwrap();
    let whole_store =
        search::Store::open(&tmp.path().join("whole").join(search::STORE_FILE)).unwrap();
    assert_eq!(
        store.scored_rows().unwrap().0,
        whole_store.scored_rows().unwrap().0
    );
    assert_eq!(
        second.check.unwrap().difference,
        whole.check.unwrap().difference
    );

    // A third run recomputes nothing and loads no model.
    let (third, third_counts) = run(&p, &dir, None);
    assert_eq!(
        sequence(&third.unwrap().outcome.trials),
        sequence(&whole.outcome.trials)
    );
    assert_eq!(third_counts.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn raising_the_budget_continues_the_same_search() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let short = plan(tmp.path(), &CMAES.replace("trials = 14", "trials = 6"));
    let long = plan(tmp.path(), CMAES);
    assert_eq!(
        short.key, long.key,
        "the budget is not part of a search's identity"
    );
    let a = run(&short, &dir, None).0.unwrap();
    assert_eq!(a.outcome.trials.len(), 6);
    let b = run(&long, &dir, None).0.unwrap();
    assert_eq!(b.outcome.resumed, 6);
    let fresh = run(&long, &tmp.path().join("fresh"), None).0.unwrap();
    assert_eq!(sequence(&b.outcome.trials), sequence(&fresh.outcome.trials));
    // The report reads the same trials and check without an evaluator.
    let r = search::report(&long, &dir).unwrap().unwrap();
    assert_eq!(sequence(&r.outcome.trials), sequence(&b.outcome.trials));
    assert!(r.check.is_some());
    assert!(search::report(&long, &tmp.path().join("none"))
        .unwrap()
        .is_none());
}

#[test]
fn halving_spends_rows_on_good_candidates_and_never_tunes_on_held_out_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let p = plan(tmp.path(), &CMAES.replace("trials = 14", "trials = 30"));
    // 42 + 21 tuning rows, first look 4 rows per file (42 / 9): rungs 4+4, 12+12, 36+21, 42+21.
    let sizes: Vec<usize> = p.rows.rungs.iter().map(|r| r.len()).collect();
    assert_eq!(sizes, vec![8, 24, 57, 63]);
    let dir = tmp.path().join("s");
    let done = run(&p, &dir, None).0.unwrap();
    let trials = &done.outcome.trials;
    let top = p.rows.rungs.len() - 1;
    let full = trials.iter().filter(|t| t.rung == top).count();
    assert!(
        full >= 1 && full < trials.len() / 2,
        "{full} of {} on all rows",
        trials.len()
    );
    let best = done.outcome.best().unwrap();
    assert_eq!(best.rung, top);
    assert_eq!(best.rows, 63);
    // No trial's recipe has a held-out row in the store, except the two the check scored.
    let store = search::Store::open(&dir.join(search::STORE_FILE)).unwrap();
    let entry_key = search::plan::recipe_key(p.space.base());
    for t in trials {
        let (found, _) = store
            .cached(&t.recipe, &p.data_keys, &p.rows.held_out)
            .unwrap();
        if t.recipe == best.recipe || t.recipe == entry_key {
            assert_eq!(found.len(), p.rows.held_out.len());
        } else {
            assert!(found.is_empty(), "trial {} saw held-out rows", t.seq);
        }
    }
    let check = done.check.unwrap();
    assert_eq!(check.rows, 18 + 9);
    assert!(check.best.tuning >= check.entry.tuning);
    let text = check.render("best/entry.toml");
    assert!(text.contains("verdict: "), "{text}");
    // The outputs.
    let csv = std::fs::read_to_string(dir.join(search::TRIALS_CSV)).unwrap();
    assert_eq!(csv.lines().count(), trials.len() + 1);
    assert!(csv.lines().next().unwrap().contains("weight@a"), "{csv}");
    for svg in [search::SCORE_SVG, search::HELD_OUT_SVG] {
        let text = std::fs::read_to_string(dir.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.contains("</svg>"), "{svg}");
    }
}

#[test]
fn bad_input_is_one_clear_error_before_any_model() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |spec: &str| match try_plan(tmp.path(), spec) {
        Err(search::Error::Spec(e)) => e,
        other => panic!("{spec}: expected a spec error, got {other:?}"),
    };
    let range = |p: &str, extra: &str| {
        format!("[[space]]\nparameter = \"{p}\"\nrange = [0.1, 0.9]\n{extra}")
    };
    let e = err(&range("epsilon", ""));
    assert!(matches!(e, SpecError::UndeclaredParameter { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("`epsilon`: not a parameter of `ties` (it takes: "),
        "{e}"
    );
    let e = err(&range("lambda", "model = \"a\""));
    assert!(
        e.to_string()
            .contains("not a per-model parameter of `ties`"),
        "{e}"
    );
    let e = err(&range("weight", "model = \"nope\""));
    assert!(matches!(e, SpecError::UnknownModel { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("model `nope` is not in the entry's [[merge.models]] (it has: a, b, c)"),
        "{e}"
    );
    let e = err("[[space]]\nparameter = \"density\"\nrange = [0.9, 0.1]\n");
    assert!(matches!(e, SpecError::EmptyRange { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("range [0.9, 0.1] is empty or inverted"),
        "{e}"
    );
    let e = err("[[space]]\nparameter = \"density\"\nrange = [0.5, 0.5]\n");
    assert!(matches!(e, SpecError::EmptyRange { .. }), "{e}");
    let e = err(&format!("trials = 0\n{}", range("density", "")));
    assert!(matches!(e, SpecError::ZeroBudget { key: "trials" }), "{e}");
    let e = err(&format!("time = \"0s\"\n{}", range("density", "")));
    assert!(matches!(e, SpecError::ZeroBudget { key: "time" }), "{e}");
    let e = err(&format!("{}[rows]\nheld_out = 0.0\n", range("density", "")));
    assert!(matches!(e, SpecError::NoHeldOutRows { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("no row of `mc` (60 rows) is held out"),
        "{e}"
    );
    let e = err(&format!(
        "{}[rows]\nheld_out = 0.01\n",
        range("density", "")
    ));
    assert!(
        e.to_string()
            .contains("no row of `gen` (30 rows) is held out"),
        "{e}"
    );
    // A method that merges the base as one more input counts it, as merge-core does.
    let e = err(&format!(
        "methods = [\"passthrough\"]\n{}",
        range("scale", "model = \"*\"")
    ));
    assert!(
        e.to_string()
            .contains("`passthrough` merges 1 models, and the entry has 4 (its base_model counts"),
        "{e}"
    );
    let e = err(&format!("methods = [\"tie\"]\n{}", range("density", "")));
    assert!(matches!(e, SpecError::UnknownMethod { .. }), "{e}");
    // A method merged layer by layer cannot be a trial (merged in memory in one pass).
    let e = err(&format!(
        "methods = [\"ties\", \"regmean_plus\"]\n{}",
        range("density", "")
    ));
    assert!(
        matches!(&e, SpecError::LayerwiseMethod { method } if method == "regmean_plus"),
        "{e}"
    );
    let e = err(&format!("select = [\"z\"]\n{}", range("density", "")));
    assert!(
        e.to_string().starts_with("[search] select: model `z`"),
        "{e}"
    );
    let e = err(&format!(
        "optimizer = \"cmaes\"\nmethods = [\"ties\", \"linear\"]\n{}",
        range("density", "")
    ));
    assert!(matches!(e, SpecError::Optimizer { .. }), "{e}");
    let e = err(&range("normalize", ""));
    assert!(matches!(e, SpecError::FlagParameter { .. }), "{e}");
    let e = err(&format!(
        "{}[objective]\n\"mc.rougeL\" = 1\n",
        range("density", "")
    ));
    assert!(
        e.to_string()
            .contains("`mc.rougeL`: `mc` has no generation rows"),
        "{e}"
    );
    let e = err(&format!(
        "{}[objective]\n\"nope.accuracy\" = 1\n",
        range("density", "")
    ));
    assert!(e.to_string().contains("no dataset `nope`"), "{e}");
    // slerp needs `t`, which neither the entry nor the space gives.
    let e = err(&format!(
        "methods = [\"ties\", \"slerp\"]\n{}",
        range("density", "")
    ));
    assert!(e.to_string().contains("`slerp`"), "{e}");
    let e = err("");
    assert!(e.to_string().contains("the space is empty"), "{e}");
}
