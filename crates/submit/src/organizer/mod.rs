//! `llm-merging score`: the organizers' side. Every `<name>.tar` of a folder of submissions is
//! unpacked as untrusted input, its entry's rules checked, its merge → predict run on the hidden
//! test file by this binary (in a child process with a hard time limit; nothing from the
//! submission is executed), its predictions scored against the labels, and the results gathered
//! into a leaderboard. `--shard I/N` splits the work over machines; `--collect` joins them.
//!
//! ```text
//! OUT/unpacked/<name>/     the submission's tree (LLM-Merging/...)
//! OUT/logs/<name>.log      the run's output
//! OUT/results/<name>.json  scores, stage times, rule verdicts, or the failure and its reason
//! OUT/leaderboard.{csv,html}
//! ```

mod leaderboard;
mod result;
mod scoring;
mod untrusted_tar;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::entry::Entry;
use crate::package;
use crate::pipeline::manifest;
use result::{Outcome, StageTime, SubmissionResult};
use scoring::{Labels, Overall};

/// Arguments of `llm-merging score`.
#[derive(Args, Debug, Clone)]
pub struct ScoreArgs {
    /// A folder of submitted `<name>.tar` files (what `llm-merging package` writes).
    #[arg(long, required_unless_present_any = ["collect", "predictions"])]
    pub submissions: Option<PathBuf>,
    /// The hidden labels: a CSV `id,target` (row kinds from the test file), or the test file
    /// with a `target` column.
    #[arg(long, required_unless_present = "collect")]
    pub labels: Option<PathBuf>,
    /// The scoring directory (unpacked trees, logs, results, leaderboard). With `--collect`:
    /// where the joined leaderboard goes (default: the first collected directory).
    #[arg(long, required_unless_present_any = ["collect", "predictions"])]
    pub out: Option<PathBuf>,
    /// The organizers' data directory: `${DATA_DIR}` for the entries; its `test.csv` is the
    /// hidden test file every entry predicts.
    #[arg(long, default_value = "data")]
    pub data: PathBuf,
    /// Hard limit for one entry's merge + predict (`1h`, `45m`, `90s`): the run is stopped
    /// and the submission marked over budget.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub budget: Duration,
    /// Score only every N-th submission (sorted by name) from the I-th, counting from 0:
    /// `--shard I/N` (for array jobs; join with `--collect`).
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
    /// Score finished submissions again.
    #[arg(long)]
    pub force: bool,
    /// Largest total size a submission may unpack to.
    #[arg(long, default_value = "2GB", value_parser = crate::merge_cmd::parse_size)]
    pub max_unpacked_size: u64,
    /// Most files (and directories and links) a submission may hold.
    #[arg(long, default_value_t = 100_000)]
    pub max_files: usize,
    /// The overall score: the mean of the per-type scores, or the mean over rows.
    #[arg(long, value_enum, default_value = "per-type")]
    pub overall: Overall,
    /// Join the results scored into these directories (by shards) into one leaderboard.
    #[arg(long, num_args = 1.., conflicts_with_all = ["submissions", "shard", "predictions"])]
    pub collect: Vec<PathBuf>,
    /// Score one predictions file (`id,prediction,dummy_field`) against `--labels` and print
    /// its scores (row kinds from `--data`'s test.csv when the labels have none).
    #[arg(long, conflicts_with_all = ["submissions", "shard"])]
    pub predictions: Option<PathBuf>,
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'h')) => (&s[..i], 3600.0),
        Some((i, 'm')) => (&s[..i], 60.0),
        Some((i, 's')) => (&s[..i], 1.0),
        _ => (s, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v * mult)),
        _ => Err(format!("`{s}` is not a duration (e.g. 1h, 45m, 90s)")),
    }
}

fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("`{s}` is not a shard I/N with 0 <= I < N");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Runs `llm-merging score`.
pub fn run(args: ScoreArgs) -> Result<()> {
    let test_file = args.data.join("test.csv");
    if let Some(p) = &args.predictions {
        let labels = Labels::load(
            args.labels.as_ref().expect("clap"),
            Some(&test_file)
                .filter(|t| t.is_file())
                .map(PathBuf::as_path),
        )?;
        let scores = labels.score(p, args.overall)?;
        println!("{}", serde_json::to_string_pretty(&scores)?);
        return Ok(());
    }
    if !args.collect.is_empty() {
        let out = args.out.clone().unwrap_or_else(|| args.collect[0].clone());
        let rows = leaderboard::collect(&args.collect)?;
        leaderboard::write(&out, &rows)?;
        println!(
            "leaderboard of {} submissions written to {}",
            rows.len(),
            out.join("leaderboard.html").display()
        );
        return Ok(());
    }
    let submissions = args.submissions.as_ref().expect("clap");
    let out = args.out.as_ref().expect("clap");
    if !test_file.is_file() {
        bail!(
            "{}: the hidden test file is missing (--data names the directory that holds test.csv)",
            test_file.display()
        );
    }
    let labels = Labels::load(args.labels.as_ref().expect("clap"), Some(&test_file))?;
    let mut tars: Vec<PathBuf> = std::fs::read_dir(submissions)
        .with_context(|| format!("{}", submissions.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tar") && p.is_file())
        .collect();
    tars.sort();
    if tars.is_empty() {
        bail!("{}: no .tar submissions", submissions.display());
    }
    let (shard, shards) = args.shard.unwrap_or((0, 1));
    let mine: Vec<&PathBuf> = tars.iter().skip(shard).step_by(shards).collect();
    println!(
        "scoring {} of {} submissions (shard {shard}/{shards}) into {}",
        mine.len(),
        tars.len(),
        out.display()
    );
    // Absolute: the entries run in child processes started in their own trees.
    std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
    let out = &std::fs::canonicalize(out)?;
    let scorer = Scorer {
        args: &args,
        out: out.clone(),
        data: std::fs::canonicalize(&args.data)?,
        test_file: std::fs::canonicalize(&test_file)?,
        labels,
    };
    for tar in mine {
        let name = tar
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let status = scorer.score(&name, tar)?;
        println!("{name}: {status}");
    }
    let rows = leaderboard::collect(&[out])?;
    leaderboard::write(out, &rows)?;
    println!("leaderboard: {}", out.join("leaderboard.html").display());
    Ok(())
}

/// One scoring run's settings.
struct Scorer<'a> {
    args: &'a ScoreArgs,
    out: PathBuf,
    data: PathBuf,
    test_file: PathBuf,
    labels: Labels,
}

/// A failure at one step of scoring a submission.
struct Failure {
    stage: &'static str,
    reason: String,
}

fn fail<E: std::fmt::Display>(stage: &'static str) -> impl FnOnce(E) -> Failure {
    move |e| Failure {
        stage,
        reason: format!("{e:#}").replace('\n', " "),
    }
}

impl Scorer<'_> {
    /// Scores one submission (or finds it already scored); returns a status line. Only a
    /// problem of the scoring directory itself is an error: the submission's own failures are
    /// its result.
    fn score(&self, name: &str, tar: &Path) -> Result<String> {
        let result_path = self.out.join("results").join(format!("{name}.json"));
        let sha = package::sha256_file(tar)?;
        if !self.args.force {
            if let Some(r) = std::fs::read_to_string(&result_path)
                .ok()
                .and_then(|t| serde_json::from_str::<SubmissionResult>(&t).ok())
                .filter(|r| r.tar_sha256 == sha)
            {
                return Ok(format!("already scored ({})", status_of(&r)));
            }
        }
        let mut result = SubmissionResult {
            name: name.to_string(),
            tar_sha256: sha,
            entry: None,
            outcome: Outcome::Failed {
                stage: String::new(),
                reason: String::new(),
            },
            rules: Vec::new(),
            stages: Vec::new(),
            budget_seconds: self.args.budget.as_secs_f64(),
        };
        result.outcome = match self.run_one(name, tar, &mut result) {
            Ok(scores) => Outcome::Scored(scores),
            Err(f) => Outcome::Failed {
                stage: f.stage.into(),
                reason: f.reason,
            },
        };
        package::write_file(
            &result_path,
            serde_json::to_string_pretty(&result)?.as_bytes(),
        )?;
        Ok(status_of(&result))
    }

    fn run_one(
        &self,
        name: &str,
        tar: &Path,
        result: &mut SubmissionResult,
    ) -> std::result::Result<scoring::TestScores, Failure> {
        // A fresh tree every time: nothing of an earlier attempt is trusted.
        let unpacked = self.out.join("unpacked").join(name);
        if unpacked.exists() {
            std::fs::remove_dir_all(&unpacked).map_err(fail("unpack"))?;
        }
        let limits = untrusted_tar::Limits {
            max_bytes: self.args.max_unpacked_size,
            max_entries: self.args.max_files,
        };
        untrusted_tar::unpack(tar, &unpacked, limits).map_err(fail("unpack"))?;

        let (root, entry_path) = find_manifest(&unpacked).map_err(fail("manifest"))?;
        let entry = Entry::load(&root.join(&entry_path)).map_err(fail("entry"))?;
        result.entry = Some(entry.name.clone());
        if !method_known(&entry.file.merge.method) {
            return Err(Failure {
                stage: "entry",
                reason: format!(
                    "merge method `{}` is unknown to this binary: the entry needs code of its own; build and run that tree's binary in a container",
                    entry.file.merge.method
                ),
            });
        }

        // Rules before compute: pinned revisions need no network; the rest asks the hub.
        let unpinned = crate::rules::unpinned(&entry);
        if !unpinned.is_empty() {
            result.rules = unpinned.clone();
            return Err(Failure {
                stage: "rules",
                reason: unpinned.join("; "),
            });
        }
        let settings = merge_core::source::HubSettings::from_env();
        let checks = crate::rules::check_entry(&entry, &settings).map_err(fail("rules"))?;
        let violations: Vec<String> = checks.iter().flat_map(|c| c.violations()).collect();
        result.rules = if violations.is_empty() {
            vec!["ok".into()]
        } else {
            violations.clone()
        };
        if !violations.is_empty() {
            return Err(Failure {
                stage: "rules",
                reason: violations.join("; "),
            });
        }

        // merge → predict by this binary, in a child process it can stop.
        let log_path = self.out.join("logs").join(format!("{name}.log"));
        std::fs::create_dir_all(log_path.parent().expect("has parent")).map_err(fail("run"))?;
        let log = std::fs::File::create(&log_path).map_err(fail("run"))?;
        let exe = std::env::current_exe().map_err(fail("run"))?;
        let mut child = Command::new(exe)
            .arg("run")
            .arg("--entry")
            .arg(root.join(&entry_path))
            .args(["--until", "predict", "--test-file"])
            .arg(&self.test_file)
            .env("LLM_MERGING_DATA", &self.data)
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(fail("run"))?)
            .stderr(log)
            .spawn()
            .map_err(fail("run"))?;
        let start = Instant::now();
        let budget = self.args.budget;
        let over_budget = |what: &str| Failure {
            stage: "budget",
            reason: format!(
                "over budget: {what} after {:.1} s (--budget {:.1} s); log: {}",
                start.elapsed().as_secs_f64(),
                budget.as_secs_f64(),
                log_path.display()
            ),
        };
        let status = loop {
            if let Some(s) = child.try_wait().map_err(fail("run"))? {
                // It may have finished past the budget, between two looks.
                if start.elapsed() > budget {
                    return Err(over_budget("finished"));
                }
                break s;
            }
            if start.elapsed() > budget {
                let _ = child.kill();
                let _ = child.wait();
                return Err(over_budget("stopped"));
            }
            std::thread::sleep(Duration::from_millis(100).min(budget));
        };
        let work = entry.dist_dir().join("work");
        for stage in ["merge", "predict"] {
            let state: Option<serde_json::Value> =
                std::fs::read_to_string(work.join(format!("{stage}.json")))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
            if let Some(seconds) = state.and_then(|s| s["seconds"].as_f64()) {
                result.stages.push(StageTime {
                    stage: stage.into(),
                    seconds,
                });
            }
        }
        if !status.success() {
            let last = std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .lines()
                .rev()
                .find(|l| l.starts_with("error:"))
                .unwrap_or("the run failed")
                .to_string();
            return Err(Failure {
                stage: "run",
                reason: format!("{last} (log: {})", log_path.display()),
            });
        }
        let predictions = work.join("predict").join("submission.csv");
        package::validate_submission(&predictions, &self.test_file).map_err(fail("predictions"))?;
        self.labels
            .score(&predictions, self.args.overall)
            .map_err(fail("predictions"))
    }
}

/// Whether this binary has the merge method an entry names.
fn method_known(name: &str) -> bool {
    merge_core::registry::lookup(name).is_some()
}

fn status_of(r: &SubmissionResult) -> String {
    match &r.outcome {
        Outcome::Scored(s) => format!("scored, overall {:.4}", s.overall),
        Outcome::Failed { stage, reason } => format!("failed at {stage}: {reason}"),
    }
}

/// The submission's tree (the top-level directory holding `manifest.json`) and the entry's
/// path inside it, as the manifest names it.
fn find_manifest(unpacked: &Path) -> Result<(PathBuf, PathBuf)> {
    let mut tops = Vec::new();
    for e in std::fs::read_dir(unpacked)? {
        let p = e?.path();
        if p.join(manifest::FILE).is_file() {
            tops.push(p);
        }
    }
    let root = match tops.as_slice() {
        [one] => one.clone(),
        [] if unpacked.join(manifest::FILE).is_file() => unpacked.to_path_buf(),
        [] => bail!("no {} at the top of the tree: package the entry with `llm-merging package`, which writes it", manifest::FILE),
        _ => bail!("more than one top-level directory holds a {}", manifest::FILE),
    };
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(manifest::FILE))?)
            .with_context(|| format!("{} is not JSON", manifest::FILE))?;
    let Some(path) = m["entry_path"].as_str() else {
        bail!("{} names no entry (`entry_path`)", manifest::FILE);
    };
    let rel = Path::new(path);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!("{}: entry_path `{path}` leaves the tree", manifest::FILE);
    }
    Ok((root, rel.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_shards_parse() {
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("20").unwrap(), Duration::from_secs(20));
        assert!(parse_duration("0s").is_err() && parse_duration("soon").is_err());
        assert_eq!(parse_shard("1/3").unwrap(), (1, 3));
        assert!(
            parse_shard("3/3").is_err() && parse_shard("1/0").is_err() && parse_shard("x").is_err()
        );
    }
}
