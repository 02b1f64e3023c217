//! The report from evaluation outputs written here: the scores table with standard errors and
//! the published baselines, paired tests, the browser's rows, escaping, no network, and the
//! errors for an entry that never ran and for entries scored on different rows.

use std::path::{Path, PathBuf};

use report::{EntrySource, Error, Role, RunDir, StageTime};

/// Writes an evaluation output directory: `cosmos_qa` (multiple choice, target 1) answered
/// right on the rows in `right`, and `xsum` (generation) with the given predictions.
fn eval_dir(dir: &Path, mc: &[(&str, bool)], gen: &[(&str, &str, &str)]) {
    std::fs::create_dir_all(dir.join("details")).unwrap();
    let mut lines = String::new();
    let mut hits = 0;
    for (id, right) in mc {
        let p = if *right { "1" } else { "0" };
        hits += usize::from(*right);
        lines += &format!(
            "{{\"id\":\"{id}\",\"eval_type\":\"multiple_choice\",\"prediction\":\"{p}\",\"target\":\"1\",\"prompt_tokens\":3,\"output_tokens\":[1,1],\"seconds\":0.1}}\n"
        );
    }
    std::fs::write(dir.join("details/cosmos_qa.jsonl"), lines).unwrap();
    let mut lines = String::new();
    let mut rouge_l = 0.0;
    for (id, pred, target) in gen {
        rouge_l += eval_harness::metrics::rouge(target, pred).rouge_l;
        let line = serde_json::json!({"id": id, "eval_type": "generation", "prediction": pred, "target": target, "prompt_tokens": 3, "output_tokens": [2], "seconds": 0.1});
        lines += &format!("{line}\n");
    }
    std::fs::write(dir.join("details/xsum.jsonl"), lines).unwrap();
    let scores = serde_json::json!({
        "cosmos_qa": {"accuracy": hits as f64 / mc.len() as f64},
        "xsum": {"rougeL": rouge_l / gen.len() as f64},
    });
    std::fs::write(dir.join("scores.json"), scores.to_string()).unwrap();
}

fn dataset_csv(dir: &Path) -> PathBuf {
    let p = dir.join("cosmos_qa.csv");
    std::fs::write(
        &p,
        "id,input,target,answer_choices,eval_type\n\
         a,\"Is <script>alert(1)</script> safe?\",1,\"['no', 'yes']\",multiple_choice\n\
         b,Question b,1,\"['no', 'yes']\",multiple_choice\n\
         c,Question c,1,\"['no', 'yes']\",multiple_choice\n\
         d,Question d,1,\"['no', 'yes']\",multiple_choice\n",
    )
    .unwrap();
    p
}

fn source(root: &Path, name: &str, merged: PathBuf, references: Vec<RunDir>) -> EntrySource {
    EntrySource {
        name: name.into(),
        method: "ties".into(),
        entry_path: format!("submissions/{name}"),
        entry_toml: "[merge]\nmethod = \"ties\"\n".into(),
        datasets: vec![dataset_csv(root)],
        merged: RunDir {
            name: "merge: ties".into(),
            role: Role::Merge,
            dir: merged,
        },
        references,
        stages: vec![
            StageTime {
                stage: "merge".into(),
                seconds: 600.0,
                reused: false,
            },
            StageTime {
                stage: "eval".into(),
                seconds: 1200.0,
                reused: true,
            },
            StageTime {
                stage: "ref-base".into(),
                seconds: 900.0,
                reused: false,
            },
        ],
        budget_seconds: 3600.0,
        inspect_dir: None,
        search_dir: None,
    }
}

const GEN: [(&str, &str, &str); 3] = [
    ("x1", "the cat sat", "the cat sat on the mat"),
    ("x2", "a dog", "the dog ran"),
    ("x3", "nothing", "birds fly south"),
];

#[test]
fn an_entry_page_has_scores_errors_baselines_paired_tests_and_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    eval_dir(
        &root.join("merged"),
        &[("a", true), ("b", true), ("c", false), ("d", true)],
        &GEN,
    );
    eval_dir(
        &root.join("base"),
        &[("a", false), ("b", false), ("c", true), ("d", false)],
        &[("x1", "cat", "the cat sat on the mat"), GEN[1], GEN[2]],
    );
    let base = RunDir {
        name: "base (org/base)".into(),
        role: Role::Base,
        dir: root.join("base"),
    };
    let html = report::entry_html(&source(root, "mine", root.join("merged"), vec![base])).unwrap();
    assert!(html.contains("<table id=\"scores\">"));
    // merge accuracy 3/4 with its bootstrap standard error; the base 1/4.
    let merged = report::Evaluated::load(&RunDir {
        name: "m".into(),
        role: Role::Merge,
        dir: root.join("merged"),
    })
    .unwrap();
    let se = merged.standard_error("cosmos_qa", "accuracy").unwrap();
    assert!(se > 0.1 && se < 0.35, "{se}");
    assert!(
        html.contains(&format!("0.750 <span class=\"se\">± {se:.3}</span>")),
        "{html}"
    );
    assert!(html.contains("0.250"));
    // The published llama_avg numbers on cosmos_qa / xsum.
    assert!(html.contains("published: llama_avg"));
    assert!(html.contains("0.234") && html.contains("0.093"));
    // Paired test of merge against base on cosmos_qa: +0.5, McNemar 3 vs 1 rows.
    assert!(html.contains("+0.500"), "{html}");
    assert!(html.contains("3 &#x2f; 1 rows"), "{html}");
    // Timings: merge + eval count (1800 s = 50%), ref-base does not.
    assert!(html.contains("<b>1800.0 s</b> of 3600 s (50.0%)"), "{html}");
    // The browser: the input escaped, choices spelled out, one score per model per row.
    assert!(html.contains("Is &lt;script&gt;alert(1)&lt;&#x2f;script&gt; safe?"));
    assert!(!html.contains("<script>alert(1)"));
    assert!(html.contains("1: yes"));
    assert!(html.contains("data-s=\"1.0000,0.0000\""), "{html}");
    // Hints for what is missing: the inspect diagnostics.
    assert!(html.contains("llm-merging inspect --entry submissions&#x2f;mine"));
    // Self-contained: nothing is fetched.
    for needle in ["src=\"http", "href=\"http", "<link", "@import", "url("] {
        assert!(!html.contains(needle), "{needle}");
    }
}

#[test]
fn an_entry_that_never_ran_says_which_command_to_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let err = report::entry_html(&source(root, "fresh", root.join("nothing"), vec![])).unwrap_err();
    assert!(matches!(err, Error::NotRun { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("entry `fresh` has not been run")
            && msg.contains("run `llm-merging run --entry submissions/fresh` first"),
        "{msg}"
    );
}

#[test]
fn entries_compare_on_the_same_rows_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    eval_dir(
        &root.join("a"),
        &[("a", true), ("b", true), ("c", true), ("d", true)],
        &GEN,
    );
    eval_dir(
        &root.join("b"),
        &[("a", false), ("b", true), ("c", false), ("d", true)],
        &GEN,
    );
    let html = report::comparison_html(&[
        source(root, "first", root.join("a"), vec![]),
        source(root, "second", root.join("b"), vec![]),
    ])
    .unwrap();
    assert!(html.contains("entries compared: first, second"));
    assert!(html.contains("first (ties)") && html.contains("second (ties)"));
    assert!(
        html.contains("+0.500") && html.contains("2 &#x2f; 0 rows"),
        "{html}"
    );
    // Different rows: an error naming the dataset.
    eval_dir(&root.join("c"), &[("a", true), ("z", true)], &GEN);
    let err = report::comparison_html(&[
        source(root, "first", root.join("a"), vec![]),
        source(root, "third", root.join("c"), vec![]),
    ])
    .unwrap_err();
    assert!(matches!(err, Error::DifferentRows { .. }), "{err}");
    assert!(
        err.to_string().contains("different rows of `cosmos_qa`"),
        "{err}"
    );
}

#[test]
fn a_search_directory_adds_its_plots_and_trials() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    eval_dir(
        &root.join("merged"),
        &[("a", true), ("b", true), ("c", false), ("d", true)],
        &GEN,
    );
    let mut src = source(root, "mine", root.join("merged"), vec![]);
    // No search directory: no section.
    src.search_dir = Some(root.join("search/mine"));
    let html = report::entry_html(&src).unwrap();
    assert!(!html.contains("<h2 id=\"search\">"));
    // What `llm-merging search` leaves: trials.csv and SVG plots (an XML prolog is dropped).
    let dir = root.join("search/mine");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("trials.csv"),
        "trial,density,weight,score\n0,0.5,1.0,0.61\n1,0.3,0.8,0.67\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("score.svg"),
        "<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\"><rect id=\"curve\"/></svg>",
    )
    .unwrap();
    let html = report::entry_html(&src).unwrap();
    assert!(html.contains("<h2 id=\"search\">"), "{html}");
    assert!(html.contains("<table id=\"trials\">"));
    assert!(html.contains("<td>0.67</td>") && html.contains("<th>density</th>"));
    assert!(html.contains("<figcaption>score</figcaption><svg"));
    assert!(html.contains("<rect id=\"curve\"/>") && !html.contains("<?xml"));
}

#[test]
fn standard_errors_the_evaluation_recorded_are_shown_not_made_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("merged");
    eval_dir(
        &dir,
        &[("a", true), ("b", true), ("c", false), ("d", true)],
        &GEN,
    );
    // As `[eval] stderr = N` (or `[prompt]`) writes them: `<metric>_stderr` beside each metric.
    let mut scores: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("scores.json")).unwrap()).unwrap();
    scores["cosmos_qa"]["accuracy_stderr"] = 0.1234.into();
    std::fs::write(dir.join("scores.json"), scores.to_string()).unwrap();
    let html = report::entry_html(&source(root, "mine", dir, vec![])).unwrap();
    assert!(!html.contains("accuracy_stderr"), "{html}");
    assert!(
        html.contains("0.750 <span class=\"se\">± 0.123</span>"),
        "{html}"
    );
}
