//! `llm-merging inspect` and `llm-merging report` end to end: bad input as one error line,
//! and the demo's report rendered in a real browser (headless Chromium, Debian's `chromium`
//! package; `.ci/run` installs it): it loads without console messages, shows the scores table
//! and the heatmaps, its example filter works, and it makes the screenshot the README shows.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::cli::{demo, demo_workspace, entry, offline, ok, one_error_line, workspace};
use testkit::models::TinyLlama;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llm-merging"))
}

#[test]
fn report_on_an_entry_that_never_ran_says_which_command_to_run() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    workspace(&ws);
    entry(&ws, "fresh", "[merge]\nmethod = \"linear\"\n[[merge.models]]\nmodel = \"a\"\nparameters = { weight = 1 }\n");
    let o = offline(bin(), &ws)
        .current_dir(&ws)
        .args(["report", "--entry", "submissions/fresh"])
        .output()
        .unwrap();
    one_error_line(
        &o,
        &[
            "entry `fresh` has not been run",
            "run `llm-merging run --entry submissions/fresh` first",
        ],
    );
    assert!(!ws.join("dist/fresh/report.html").exists());
}

#[test]
fn inspect_names_the_first_mismatched_tensor_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    TinyLlama::default().write(&d.join("base"), 1, 1);
    TinyLlama::default().write(&d.join("a"), 2, 1);
    TinyLlama {
        hidden: 12,
        heads: 2,
        ..TinyLlama::default()
    }
    .write(&d.join("b"), 3, 1);
    let cfg = "[merge]\nmethod = \"ties\"\nbase_model = \"base\"\n[merge.parameters]\nweight = 1.0\ndensity = 0.5\n[[merge.models]]\nmodel = \"a\"\n[[merge.models]]\nmodel = \"b\"\n";
    std::fs::write(d.join("ties.toml"), cfg).unwrap();
    let o = offline(bin(), d)
        .current_dir(d)
        .args(["inspect", "ties.toml", "--out", "out"])
        .output()
        .unwrap();
    one_error_line(
        &o,
        &[
            "expert 2",
            "tensor `lm_head.weight` has shape [32, 12] in the expert and [32, 8] in the base",
        ],
    );
    assert!(!d.join("out").exists());
    // The same config over matching experts: a summary with findings, and the files.
    std::fs::write(d.join("ok.toml"), cfg.replace("\"b\"", "\"a\"")).unwrap();
    let o = offline(bin(), d)
        .current_dir(d)
        .args(["inspect", "ok.toml"])
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(
        out.contains("findings:") && out.contains("point the same way"),
        "{out}"
    );
    for f in [
        "inspect.json",
        "cosine.svg",
        "sign_conflict.svg",
        "relative_norm.svg",
    ] {
        assert!(d.join("inspect").join(f).is_file(), "{f}");
    }
}

/// The Chromium binary: `$CHROMIUM`, else `chromium` on the PATH. Missing, the test fails:
/// the browser check is part of the suite, and `.ci/run` installs Debian's package.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "chromium not found: the report's browser test needs Debian's `chromium` package \
         (`apt-get install -y chromium`, which .ci/run does as root) or CHROMIUM=/path/to/it"
    );
}

/// What loading a page did.
struct Loaded {
    /// Chromium's output (stdout: the DOM, with `--dump-dom`).
    output: Output,
    /// The page's console messages: Chromium logs each one (errors, uncaught exceptions,
    /// `console.log`) as a `CONSOLE` line on stderr.
    console: Vec<String>,
    /// Network requests made for the page (from Chromium's net log: requests whose isolation
    /// key is the page's `file://` site, which leaves out Chromium's own background fetches).
    network: Vec<String>,
}

/// Loads `page` in headless Chromium with `args` (`--dump-dom`, `--screenshot=…`) in a fresh
/// profile.
fn render(page: &Path, args: &[&str]) -> Loaded {
    let profile = tempfile::tempdir().unwrap();
    let net_log = profile.path().join("net-log.json");
    let o = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ))
        .arg(format!("--log-net-log={}", net_log.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs");
    assert!(
        o.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let console = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(String::from)
        .collect();
    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&net_log).unwrap()).unwrap();
    let mut network: Vec<String> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["params"]["network_isolation_key"]
                .as_str()
                .is_some_and(|k| k.starts_with("file://"))
        })
        .filter_map(|e| e["params"]["url"].as_str().map(String::from))
        .filter(|u| !u.starts_with("file:"))
        .collect();
    network.dedup();
    Loaded {
        output: o,
        console,
        network,
    }
}

#[test]
fn the_browser_checks_catch_script_errors_and_network_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let page = tmp.path().join("bad.html");
    std::fs::write(
        &page,
        "<html><body><p>x</p><img src=\"http://127.0.0.1:9/nothing.png\">\
         <script>notAFunction();</script></body></html>",
    )
    .unwrap();
    let loaded = render(&page, &["--dump-dom"]);
    let all = loaded.console.join("\n");
    assert!(all.contains("notAFunction is not defined"), "{all}");
    assert_eq!(loaded.network, ["http://127.0.0.1:9/nothing.png"]);
}

/// The `<tr>` rows of the table with id `id` in `dom`.
fn table_rows<'a>(dom: &'a str, id: &str) -> Vec<&'a str> {
    let start = dom
        .find(&format!("<table id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no table {id}"));
    let table = &dom[start..start + dom[start..].find("</table>").unwrap()];
    let body = &table[table.find("<tbody>").unwrap()..];
    body.split("<tr").skip(1).collect()
}

#[test]
fn the_demo_report_renders_in_a_real_browser() {
    let chromium_check = chromium();
    let tmp = tempfile::tempdir().unwrap();
    let ws = demo_workspace(tmp.path());
    let demo_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-family");
    ok(&demo(bin(), &ws, &demo_dir).output().unwrap());
    let page = ws.join("dist/demo/report.html");
    assert!(
        page.is_file(),
        "run wrote no report ({})",
        chromium_check.display()
    );

    // Loaded: no console message at all, no network request, and the DOM after the scripts
    // ran.
    let loaded = render(&page, &["--dump-dom"]);
    assert!(
        loaded.console.is_empty(),
        "console messages:\n{}",
        loaded.console.join("\n")
    );
    assert!(loaded.network.is_empty(), "network: {:?}", loaded.network);
    let dom = String::from_utf8_lossy(&loaded.output.stdout).into_owned();
    let rows = table_rows(&dom, "scores");
    let names: Vec<&str> = rows
        .iter()
        .map(|r| {
            r.split("<td>")
                .nth(1)
                .unwrap()
                .split("</td>")
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(
        names,
        [
            "merge: ties",
            "base (demo:base)",
            "expert 1 (demo:largest)",
            "expert 2 (demo:reverse)",
            "expert 3 (demo:opposite-lora)"
        ]
    );
    // The merge's largest-skill accuracy (0.690 in the README's demo table) with its error.
    assert!(
        rows[0].contains("0.690 <span class=\"se\">± 0.0"),
        "{}",
        rows[0]
    );
    let heatmaps = dom.matches("<figure class=\"heatmap\">").count();
    assert_eq!(
        heatmaps, 4,
        "cosine, sign conflict, relative norm, kept fraction"
    );
    assert!(dom[dom.find("id=\"inspect\"").unwrap()..].contains("<svg"));
    // The filters' script ran: every browser counts its rows.
    assert_eq!(dom.matches("100 of 100 rows").count(), 3, "one per skill");

    // The filter "merge wrong, other right" on the first dataset (largest) shows the rows where
    // the merge scored below some reference.
    let work = ws.join("dist/demo/work");
    let load = |dir: PathBuf| {
        report::Evaluated::load(&report::RunDir {
            name: String::new(),
            role: report::Role::Merge,
            dir,
        })
        .unwrap()
    };
    let merge = load(work.join("eval"));
    let refs: Vec<report::Evaluated> = ["base", "expert-1", "expert-2", "expert-3"]
        .iter()
        .map(|r| load(work.join("references").join(r)))
        .collect();
    let expected = merge
        .values("largest", "accuracy")
        .iter()
        .filter(|(id, v)| {
            refs.iter().any(|r| {
                r.values("largest", "accuracy")
                    .iter()
                    .any(|(i, w)| i == id && w > v)
            })
        })
        .count();
    assert!(expected > 0 && expected < 100, "{expected}");
    let filtered = ws.join("dist/demo/filtered.html");
    let html = std::fs::read_to_string(&page).unwrap().replace(
        "</body>",
        "<script>var f = document.querySelector('.filters'); var m = f.querySelector('.mode');\
         m.value = 'worse'; m.dispatchEvent(new Event('change'));\
         document.title = 'COUNT ' + f.querySelector('.count').textContent;</script></body>",
    );
    std::fs::write(&filtered, html).unwrap();
    let loaded = render(&filtered, &["--dump-dom"]);
    assert!(loaded.console.is_empty(), "{}", loaded.console.join("\n"));
    let dom = String::from_utf8_lossy(&loaded.output.stdout);
    assert!(
        dom.contains(&format!("<title>COUNT {expected} of 100 rows</title>")),
        "expected {expected} rows: {}",
        &dom[..dom.len().min(400)]
    );

    // The screenshot (the README's, docs/report-demo.png, is this one, colour-reduced).
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-demo.png");
    let _ = std::fs::remove_file(&shot);
    let loaded = render(
        &page,
        &[
            "--window-size=1280,1700",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    assert!(loaded.console.is_empty(), "{}", loaded.console.join("\n"));
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!((dim(16), dim(20)), (1280, 1700));
    assert!(
        png.len() > 50_000,
        "a blank page is smaller: {} bytes",
        png.len()
    );

    // Two entries compared on the same rows: a paired test per dataset.
    // The second entry without `references = true`: its run scores only the merge, then
    // `run --references` adds the reference stages and reuses the merge's own.
    let demo_toml = include_str!("../../../submissions/demo/entry.toml");
    assert!(demo_toml.contains("references = true"));
    let other = demo_toml
        .replace("method = \"ties\"", "method = \"task_arithmetic\"")
        .replace("references = true", "references = false");
    entry(&ws, "demo_ta", &other);
    let run = |args: &[&str]| ok(&demo(bin(), &ws, &demo_dir).args(args).output().unwrap());
    let out = run(&["run", "--entry", "submissions/demo_ta"]);
    assert!(
        !out.contains("ref-base") && !out.contains("inspect"),
        "{out}"
    );
    let stage_line = |out: &str, stage: &str, status: &str| {
        out.lines()
            .any(|l| l.split_whitespace().next() == Some(stage) && l.ends_with(status))
    };
    let out = run(&["run", "--entry", "submissions/demo_ta", "--references"]);
    for stage in ["merge", "eval", "predict"] {
        assert!(
            stage_line(&out, stage, "reused"),
            "{stage} not reused:\n{out}"
        );
    }
    for stage in [
        "ref-base",
        "ref-expert-1",
        "ref-expert-2",
        "ref-expert-3",
        "inspect",
    ] {
        assert!(
            stage_line(&out, stage, "ran"),
            "{stage} did not run:\n{out}"
        );
    }
    // A `[prompt]` changes how every row is put to the models: the references are evaluated
    // again with it (the task vectors are not), and the standard errors the evaluation then
    // records (`<metric>_stderr`) are the page's, not extra columns.
    let prompted = format!(
        "{other}\n[prompt.multiple_choice]\ntemplate = \"Question. {{input}}\"\n\
         [prompt.generation]\ntemplate = \"{{input}}\"\n"
    );
    entry(&ws, "demo_ta", &prompted);
    let out = run(&["run", "--entry", "submissions/demo_ta", "--references"]);
    for stage in ["merge", "inspect"] {
        assert!(
            stage_line(&out, stage, "reused"),
            "{stage} not reused:\n{out}"
        );
    }
    for stage in ["eval", "ref-base", "ref-expert-3"] {
        assert!(
            stage_line(&out, stage, "ran"),
            "{stage} did not run:\n{out}"
        );
    }
    let scores =
        std::fs::read_to_string(ws.join("dist/demo_ta/work/references/base/scores.json")).unwrap();
    assert!(scores.contains("accuracy_stderr"), "{scores}");
    let html = std::fs::read_to_string(ws.join("dist/demo_ta/report.html")).unwrap();
    assert!(!html.contains("_stderr") && html.contains("<span class=\"se\">± 0.0"));
    let out = run(&[
        "report",
        "--entry",
        "submissions/demo",
        "--entry",
        "submissions/demo_ta",
    ]);
    let page = ws.join("dist/compare-demo-demo_ta.html");
    assert!(out.contains(&page.display().to_string()), "{out}");
    let loaded = render(&page, &["--dump-dom"]);
    assert!(loaded.console.is_empty(), "{}", loaded.console.join("\n"));
    let dom = String::from_utf8_lossy(&loaded.output.stdout);
    assert!(dom.contains("entries compared: demo, demo_ta"));
    let paired = table_rows(&dom, "paired");
    assert_eq!(paired.len(), 3, "one paired test per skill");
    assert!(paired
        .iter()
        .all(|r| r.contains("demo_ta (task_arithmetic)")));
}
