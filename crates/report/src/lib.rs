//! One self-contained HTML page per entry run (`dist/<entry>/report.html`, written by
//! `llm-merging report` and at the end of `llm-merging run`), and a page comparing several
//! entries on the same rows.
//!
//! An entry's page holds: the scores table (the merge, the base and each expert when they
//! were evaluated, the official baselines' published numbers where they score the same
//! datasets) with bootstrap standard errors; paired differences of the merge against each
//! reference with 95% intervals (and McNemar's test on multiple choice); stage timings against
//! the 1-hour budget; the task-vector heatmaps and findings of `llm-merging inspect`; a
//! search's plots and trials when one ran; and a per-example browser per dataset (input,
//! target, every model's prediction side by side, filters for "merge wrong, other right" and
//! the reverse). No network: styles, SVG and the few lines of JavaScript are inline.
//!
//! The caller (the `llm-merging` binary) says where the outputs are ([`EntrySource`]); this
//! crate reads them, computes and renders.

pub mod baselines;
pub mod error;
pub mod examples;
pub mod extras;
pub mod outcomes;
mod page;
pub mod paired;
pub mod scores;
pub mod timings;

use std::path::{Path, PathBuf};

pub use error::{Error, Result};
pub use outcomes::{Evaluated, Role, RunDir};
pub use timings::StageTime;

/// Where one entry's run left its outputs.
#[derive(Debug, Clone)]
pub struct EntrySource {
    /// The entry's name.
    pub name: String,
    /// Its merge method.
    pub method: String,
    /// Where the entry is (for the page and the commands it suggests).
    pub entry_path: String,
    /// Its `entry.toml`, shown on the page.
    pub entry_toml: String,
    /// The validation files (inputs and answer choices for the browser).
    pub datasets: Vec<PathBuf>,
    /// The merged model's evaluation.
    pub merged: RunDir,
    /// The base's and the experts' evaluations on the same rows, when run with references.
    pub references: Vec<RunDir>,
    /// The last run's stages.
    pub stages: Vec<StageTime>,
    /// The competition's budget in seconds.
    pub budget_seconds: f64,
    /// `llm-merging inspect`'s output directory for the entry.
    pub inspect_dir: Option<PathBuf>,
    /// A search's directory for the entry.
    pub search_dir: Option<PathBuf>,
}

impl EntrySource {
    /// The merge's evaluation, or the error saying which command produces it.
    fn load_merged(&self) -> Result<Evaluated> {
        let scores = self.merged.dir.join("scores.json");
        if !scores.is_file() {
            return Err(Error::NotRun {
                entry: self.name.clone(),
                missing: scores,
                command: format!("llm-merging run --entry {}", self.entry_path),
            });
        }
        Evaluated::load(&self.merged)
    }

    fn datasets(&self) -> Vec<eval_harness::dataset::Dataset> {
        // Inputs only enrich the browser: a data file moved since the run is left out.
        self.datasets
            .iter()
            .filter_map(|p| eval_harness::dataset::load(p).ok())
            .collect()
    }
}

/// The report of one entry's run.
pub fn entry_html(src: &EntrySource) -> Result<String> {
    let mut models = vec![src.load_merged()?];
    for r in &src.references {
        models.push(Evaluated::load(r)?);
    }
    let mut hints = Vec::new();
    if src.references.is_empty() {
        hints.push(format!(
            "No reference rows: `llm-merging run --entry {} --references` (or `references = true` \
             under [eval]) also scores the base and each expert on the same rows.",
            src.entry_path
        ));
    }
    let inspect = match &src.inspect_dir {
        Some(d) => extras::inspect_section(d)?,
        None => None,
    };
    if inspect.is_none() {
        hints.push(format!(
            "No task-vector diagnostics: `llm-merging inspect --entry {}` adds them.",
            src.entry_path
        ));
    }
    let search = match &src.search_dir {
        Some(d) => extras::search_section(d)?,
        None => None,
    };
    page::render(&page::Page {
        title: format!("{} — {}", src.name, src.method),
        entries: vec![page::EntryInfo::of(src)],
        scores: scores::table(&models),
        paired: paired::paired(&models, false)?,
        timings: vec![(
            src.name.clone(),
            timings::timings(&src.stages, src.budget_seconds),
        )],
        inspect,
        search,
        browsers: examples::browsers(&models, &src.datasets()),
        first_is: "merge".into(),
        hints,
    })
}

/// A page comparing entries on the same rows: their scores, paired tests of the first entry
/// against each other one per dataset, timings and the per-example browser. Entries
/// evaluated on different rows of a dataset are an error.
pub fn comparison_html(srcs: &[EntrySource]) -> Result<String> {
    let mut models = Vec::new();
    for s in srcs {
        let mut m = s.load_merged()?;
        m.name = format!("{} ({})", s.name, s.method);
        m.role = Role::Entry;
        models.push(m);
    }
    let names: Vec<&str> = srcs.iter().map(|s| s.name.as_str()).collect();
    page::render(&page::Page {
        title: format!("entries compared: {}", names.join(", ")),
        entries: srcs.iter().map(page::EntryInfo::of).collect(),
        scores: scores::table(&models),
        paired: paired::paired(&models, true)?,
        timings: srcs
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    timings::timings(&s.stages, s.budget_seconds),
                )
            })
            .collect(),
        inspect: None,
        search: None,
        browsers: examples::browsers(
            &models,
            &srcs.first().map(EntrySource::datasets).unwrap_or_default(),
        ),
        first_is: "first entry".into(),
        hints: Vec::new(),
    })
}

/// Writes `html` to `path` through a temporary file beside it (never a half-written page).
pub fn write(path: &Path, html: &str) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map_or("report".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    std::fs::write(&tmp, html).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
