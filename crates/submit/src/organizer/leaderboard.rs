//! The leaderboard from every submission's result: `leaderboard.csv` and a self-contained
//! `leaderboard.html`, scored entries sorted by their overall score, failures listed with why.

use std::path::Path;

use anyhow::{Context, Result};

use super::result::{Outcome, SubmissionResult};
use crate::package;

/// Reads every `results/*.json` under each of `dirs` (a submission scored in two shards'
/// directories must have the same result in both).
pub fn collect(dirs: &[impl AsRef<Path>]) -> Result<Vec<SubmissionResult>> {
    let mut all: Vec<SubmissionResult> = Vec::new();
    for dir in dirs {
        let results = dir.as_ref().join("results");
        let read = std::fs::read_dir(&results).with_context(|| {
            format!(
                "{}: no results (score submissions into this directory first)",
                results.display()
            )
        })?;
        for e in read {
            let p = e?.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let r: SubmissionResult = serde_json::from_str(&std::fs::read_to_string(&p)?)
                .with_context(|| format!("{}: not a submission result", p.display()))?;
            match all.iter().find(|x| x.name == r.name) {
                Some(x) if *x != r => anyhow::bail!(
                    "{}: submission `{}` has different results in two directories",
                    p.display(),
                    r.name
                ),
                Some(_) => {}
                None => all.push(r),
            }
        }
    }
    sort(&mut all);
    Ok(all)
}

/// Scored entries first, best overall score first (name breaks ties), then failures by name.
fn sort(rows: &mut [SubmissionResult]) {
    rows.sort_by(|a, b| {
        let key = |r: &SubmissionResult| match &r.outcome {
            Outcome::Scored(s) => (0, -s.overall),
            _ => (1, 0.0),
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.total_cmp(&kb.1))
            .then(a.name.cmp(&b.name))
    });
}

/// Writes `leaderboard.csv` and `leaderboard.html` into `out`.
pub fn write(out: &Path, rows: &[SubmissionResult]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "rank",
        "submission",
        "entry",
        "overall",
        "multiple_choice_accuracy",
        "generation_rougeL",
        "merge_seconds",
        "predict_seconds",
        "status",
        "reason",
    ])?;
    let mut rank = 0;
    for r in rows {
        let (rank_s, overall, mc, gen, status, reason) = match &r.outcome {
            Outcome::Scored(s) => {
                rank += 1;
                (
                    rank.to_string(),
                    format!("{:.4}", s.overall),
                    s.multiple_choice
                        .map(|v| format!("{v:.4}"))
                        .unwrap_or_default(),
                    s.generation
                        .as_ref()
                        .and_then(|g| g.get("rougeL"))
                        .map(|v| format!("{v:.4}"))
                        .unwrap_or_default(),
                    "scored".to_string(),
                    String::new(),
                )
            }
            Outcome::Failed { stage, reason } => (
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                format!("failed at {stage}"),
                reason.clone(),
            ),
        };
        let secs = |name: &str| {
            r.stage_seconds(name)
                .map(|s| format!("{s:.1}"))
                .unwrap_or_default()
        };
        w.write_record([
            rank_s,
            r.name.clone(),
            r.entry.clone().unwrap_or_default(),
            overall,
            mc,
            gen,
            secs("merge"),
            secs("predict"),
            status,
            reason,
        ])?;
    }
    package::write_file(&out.join("leaderboard.csv"), &w.into_inner()?)?;
    package::write_file(&out.join("leaderboard.html"), html(rows).as_bytes())?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html(rows: &[SubmissionResult]) -> String {
    let mut body = String::new();
    let mut rank = 0;
    for r in rows {
        let secs = |name: &str| {
            r.stage_seconds(name)
                .map(|s| format!("{s:.1}"))
                .unwrap_or_default()
        };
        match &r.outcome {
            Outcome::Scored(s) => {
                rank += 1;
                let mc = s.multiple_choice.map(|v| format!("{v:.4}")).unwrap_or_default();
                let gen = s
                    .generation
                    .as_ref()
                    .and_then(|g| g.get("rougeL"))
                    .map(|v| format!("{v:.4}"))
                    .unwrap_or_default();
                body.push_str(&format!(
                    "<tr><td>{rank}</td><td>{}</td><td>{}</td><td class=n>{:.4}</td><td class=n>{mc}</td><td class=n>{gen}</td><td class=n>{}</td><td class=n>{}</td><td>scored</td></tr>\n",
                    escape(&r.name),
                    escape(r.entry.as_deref().unwrap_or("")),
                    s.overall,
                    secs("merge"),
                    secs("predict"),
                ));
            }
            Outcome::Failed { stage, reason } => body.push_str(&format!(
                "<tr class=failed><td></td><td>{}</td><td>{}</td><td colspan=5>failed at {}: {}</td><td>failed</td></tr>\n",
                escape(&r.name),
                escape(r.entry.as_deref().unwrap_or("")),
                escape(stage),
                escape(reason),
            )),
        }
    }
    format!(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>Leaderboard</title>\n\
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
td,th{{border:1px solid #ccc;padding:4px 8px}}td.n{{text-align:right}}\
tr.failed{{color:#a00}}</style></head><body>\n<h1>Leaderboard</h1>\n\
<p>{} submissions: {} scored, {} failed.</p>\n<table>\n<tr><th>rank</th><th>submission</th>\
<th>entry</th><th>overall</th><th>multiple choice (accuracy)</th><th>generation (rougeL)</th>\
<th>merge (s)</th><th>predict (s)</th><th>status</th></tr>\n{body}</table>\n</body></html>\n",
        rows.len(),
        rank,
        rows.len() - rank
    )
}
