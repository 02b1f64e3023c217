//! `llm-merging search` on the offline demo, end to end: the committed demo search beats the
//! entry's hand-set TIES on the held-out rows; the same seed gives the same trials in fresh
//! workspaces; a search killed mid-way and restarted loses and repeats no trial; bad
//! `[search]` input is one error line before any model loads.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use testkit::cli::{demo, entry, text, workspace};

const DEMO_ENTRY: &str = include_str!("../../../submissions/demo/entry.toml");

/// The binary, offline, in workspace `ws`, with no thread count from the user's environment.
fn bin(ws: &Path) -> Command {
    // Shared with the other demo tests (same recipe hash → built once per target dir).
    let demo_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-family");
    let mut c = demo(
        Command::new(env!("CARGO_BIN_EXE_llm-merging")),
        ws,
        &demo_dir,
    );
    c.env_remove("RAYON_NUM_THREADS");
    c
}

/// `root/name`, a workspace holding `submissions/demo/entry.toml` = `toml`.
fn demo_ws(root: &Path, name: &str, toml: &str) -> PathBuf {
    let ws = root.join(name);
    workspace(&ws);
    entry(&ws, "demo", toml);
    ws
}

fn search(ws: &Path, extra: &[&str]) -> Output {
    bin(ws)
        .args(["search", "--entry", "submissions/demo"])
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    testkit::cli::ok(&o)
}

/// trials.csv without the columns that depend on timing or on what the store already held.
fn trials(ws: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(ws.join("search/demo/trials.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| !["new_rows", "merge_seconds", "eval_seconds", "seconds"].contains(&header[i]))
        .collect();
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            keep.iter().map(|&i| f[i]).collect::<Vec<_>>().join(",")
        })
        .collect()
}

/// The numbers of the held-out check's `objective` line: entry, best, difference, low, high.
fn objective_line(out: &str) -> Vec<f64> {
    let line = out
        .lines()
        .find(|l| l.starts_with("objective"))
        .unwrap_or_else(|| panic!("no objective line in\n{out}"));
    line.split(|c: char| c.is_whitespace() || c == '[' || c == ']' || c == ',')
        .filter_map(|w| w.parse::<f64>().ok())
        .collect()
}

#[test]
fn the_demo_search_beats_the_hand_set_ties_on_held_out_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = demo_ws(tmp.path(), "ws", DEMO_ENTRY);
    let t = std::time::Instant::now();
    let out = ok(search(&ws, &[]));
    println!("{out}\nsearch: {:.1}s", t.elapsed().as_secs_f64());
    let o = objective_line(&out);
    let (entry, best) = (o[0], o[1]);
    assert!(best > entry, "best {best} vs entry {entry}\n{out}");
    assert!(out.contains("verdict: the best recipe (trial"), "{out}");
    assert!(
        out.contains("beats the entry's own on the held-out rows"),
        "{out}"
    );
    assert!(out.contains("McNemar"), "{out}");
    let dir = ws.join("search/demo");
    for f in [
        "best/entry.toml",
        "trials.csv",
        "score.svg",
        "held_out.svg",
        "store.sqlite",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert_eq!(trials(&ws).len(), 150);
    // The entry never ran: no report to add the search to, and the command to run is named.
    assert!(
        out.contains("no report yet: entry `demo` has not been run")
            && out.contains("run `llm-merging run --entry submissions/demo` first"),
        "{out}"
    );

    // The best entry is complete: `run` merges and predicts with it as it is.
    let best = std::fs::read_to_string(dir.join("best/entry.toml")).unwrap();
    assert!(!best.contains("[search]"), "{best}");
    assert!(best.contains("beats the entry's own recipe"), "{best}");
    let run = ok(bin(&ws)
        .args(["run", "--entry", "search/demo/best", "--until", "predict"])
        .output()
        .unwrap());
    assert!(run.contains("predictions written to"), "{run}");

    // --report reads the store and computes nothing; so does a rerun of the finished search.
    let report = ok(search(&ws, &["--report"]));
    assert!(!report.contains("loading the entry's models"), "{report}");
    assert_eq!(objective_line(&report), o);
    assert!(report.contains("150 trials"), "{report}");
    // Once the entry has run, the search writes its report with the search's plots and trials.
    ok(bin(&ws)
        .args(["run", "--entry", "submissions/demo"])
        .output()
        .unwrap());
    let again = ok(search(&ws, &[]));
    assert!(!again.contains("loading the entry's models"), "{again}");
    let page = ws.join("dist/demo/report.html");
    assert!(
        again.contains(&format!("report written to {}", page.display())),
        "{again}"
    );
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("<h2 id=\"search\">") && html.contains("<table id=\"trials\">"));
    assert!(html.contains("<figcaption>score</figcaption><svg"));
    assert!(
        again.contains("resumed: all 150 trials replayed"),
        "{again}"
    );
    assert_eq!(objective_line(&again), o);
}

/// The demo entry with another budget and seed.
fn demo_entry(trials: u64, seed: u64) -> String {
    DEMO_ENTRY
        .replace("trials = 150", &format!("trials = {trials}"))
        .replace("seed = 4", &format!("seed = {seed}"))
}

#[test]
fn the_same_seed_gives_the_same_trials_in_fresh_workspaces() {
    let tmp = tempfile::tempdir().unwrap();
    let a = demo_ws(tmp.path(), "a", &demo_entry(25, 4));
    let b = demo_ws(tmp.path(), "b", &demo_entry(25, 4));
    let c = demo_ws(tmp.path(), "c", &demo_entry(25, 5));
    for ws in [&a, &b, &c] {
        ok(search(ws, &[]));
    }
    assert_eq!(trials(&a).len(), 25);
    assert_eq!(trials(&a), trials(&b));
    assert_ne!(trials(&a), trials(&c));
    let best = |ws: &Path| std::fs::read_to_string(ws.join("search/demo/best/entry.toml")).unwrap();
    assert_eq!(best(&a), best(&b));
}

#[test]
fn a_killed_search_resumes_without_losing_or_repeating_a_trial() {
    let tmp = tempfile::tempdir().unwrap();
    let entry = demo_entry(40, 4);
    let whole = demo_ws(tmp.path(), "whole", &entry);
    ok(search(&whole, &[]));

    let ws = demo_ws(tmp.path(), "killed", &entry);
    let mut child = bin(&ws)
        .args(["search", "--entry", "submissions/demo"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = 0;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("trial ") {
            seen += 1;
            if seen == 15 {
                child.kill().unwrap(); // SIGKILL: no chance to tidy up
                break;
            }
        }
    }
    assert!(!child.wait().unwrap().success(), "killed after 15 trials");
    assert!(
        !ws.join("search/demo/trials.csv").exists(),
        "nothing is written before the end"
    );
    let store = search::Store::open(&ws.join("search/demo/store.sqlite")).unwrap();
    let (rows_before, _) = store.scored_rows().unwrap();
    drop(store);

    let out = ok(search(&ws, &[]));
    assert!(
        out.contains("resumed: trials 1–15 replayed")
            || out.contains("resumed: trials 1–16 replayed"),
        "{out}"
    );
    let resumed = trials(&ws);
    assert_eq!(resumed.len(), 40);
    assert_eq!(
        resumed,
        trials(&whole),
        "the same trials, in the same order, once each"
    );
    let rows = |ws: &Path| {
        search::Store::open(&ws.join("search/demo/store.sqlite"))
            .unwrap()
            .scored_rows()
            .unwrap()
            .0
    };
    // Every row was scored exactly once across the killed run and its resumption: as many
    // rows as the uninterrupted search scored (a row stored twice would fail its insert).
    assert!(rows_before > 0);
    assert_eq!(rows(&ws), rows(&whole));
    assert_eq!(
        objective_line(&out),
        objective_line(&ok(search(&whole, &["--report"])))
    );
}

#[test]
fn bad_search_input_is_one_error_line_before_any_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &str); 8] = [
        (
            "parameter = \"density\"\nrange = [0.1, 1.0]",
            "parameter = \"epsilonx\"\nrange = [0.1, 1.0]",
            "[[search.space]] `epsilonx`: not a parameter of `ties` or `task_arithmetic` or `dare_ties` or `breadcrumbs_ties` or `della`",
        ),
        (
            "model = \"*\"",
            "model = \"demo:nope\"",
            "[[search.space]] `weight`: model `demo:nope` is not in the entry's [[merge.models]] (it has: demo:largest, demo:reverse, demo:opposite-lora)",
        ),
        (
            "range = [0.2, 2.0]",
            "range = [2.0, 0.2]",
            "[[search.space]] `weight` (model *): range [2, 0.2] is empty or inverted",
        ),
        ("trials = 150", "trials = 0", "[search] `trials`: the budget is zero"),
        (
            "held_out = 0.3",
            "held_out = 0.001",
            "[search.rows] held_out = 0.001: no row of `largest` (100 rows) is held out",
        ),
        (
            "methods = [",
            "methods = [\"tie\", ",
            "[search] methods: unknown merge method `tie`",
        ),
        // A layer-wise method, among `methods` or as the entry's own: a trial is merged in
        // memory in one pass, which cannot compute its statistics.
        (
            "methods = [",
            "methods = [\"regmean_plus\", ",
            "[search] method `regmean_plus` cannot be searched: its statistics depend on the merged lower layers",
        ),
        (
            "method = \"ties\"",
            "method = \"regmean_plus\"",
            "merge it with `llm-merging merge` or `run`",
        ),
    ];
    for (i, (from, to, message)) in cases.iter().enumerate() {
        assert!(DEMO_ENTRY.contains(from), "{from}");
        let ws = demo_ws(
            tmp.path(),
            &format!("bad{i}"),
            &DEMO_ENTRY.replacen(from, to, 1),
        );
        let o = search(&ws, &[]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{to}: {}", text(&o));
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains("entry.toml"), "{stderr}");
        assert!(
            errors[0].contains(message),
            "expected `{message}` in\n{stderr}"
        );
        assert!(!text(&o).contains("loading the entry's models"), "{stderr}");
        assert!(!ws.join("search").exists(), "nothing written for bad input");
    }
}

/// The objective line of the entry's own recipe on the tuning rows: its score.
fn entry_tuning_score(out: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("entry's own recipe"))
        .unwrap_or_else(|| panic!("no entry line in\n{out}"));
    line.split_whitespace()
        .find_map(|w| w.parse::<f64>().ok())
        .unwrap()
}

#[test]
fn trials_are_scored_with_the_entrys_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = demo_entry(3, 4);
    let prompted = format!(
        "{plain}\n[prompt.multiple_choice]\ntemplate = \"Question: {{input}}\"\n\n[prompt.generation]\ntemplate = \"Text: {{input}}\"\n"
    );
    let a = ok(search(&demo_ws(tmp.path(), "plain", &plain), &[]));
    let ws = demo_ws(tmp.path(), "prompted", &prompted);
    let b = ok(search(&ws, &[]));
    // The demo's models were trained on the raw inputs: prompted rows score otherwise.
    assert_ne!(entry_tuning_score(&a), entry_tuning_score(&b), "{a}\n{b}");
    let best = std::fs::read_to_string(ws.join("search/demo/best/entry.toml")).unwrap();
    assert!(best.contains("[prompt.multiple_choice]"), "{best}");

    // A bad prompt is one error line, before any model loads.
    let bad = format!("{plain}\n[prompt.generation]\ntemplate = \"Summarize {{text}}\"\n");
    let ws = demo_ws(tmp.path(), "bad-prompt", &bad);
    let o = search(&ws, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{}", text(&o));
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("entry.toml")
            && errors[0].contains("`prompt.generation.template`: unknown placeholder `{text}`"),
        "{stderr}"
    );
    assert!(!text(&o).contains("loading the entry's models"), "{stderr}");
    assert!(!ws.join("search").exists());
}
