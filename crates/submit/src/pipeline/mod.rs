//! An entry's run: merge → validation eval → test predictions → package, each a [`Stage`]
//! reused when the key of its inputs did not change.
//!
//! A stage's key is a hash of everything it depends on: the tool version, the entry's settings,
//! the input models' revisions (a commit for hub models, file sizes and mtimes for local
//! directories), the data files' sha256 and the key of the stage before it. Stage outputs and
//! their keys live in `dist/<entry>/work/`.

mod identity;
pub mod manifest;
pub mod references;
pub mod report;
mod stage;
mod workdir;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use eval_harness::{EvalOptions, LanguageModel};
use merge_core::engine::{self, Inputs, MergeOptions};
use merge_core::source::{HubSettings, ModelFiles, Resolver};

use crate::entry::Entry;
use crate::package;
use crate::prompting::{self, Prompting};
pub use stage::StageReport;
use stage::{Key, Stage};

/// The competition's budget for merge plus evaluation, in seconds.
pub const BUDGET_SECONDS: f64 = 3600.0;

/// How to run an entry.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The entry directory (or its name under submissions/, or one .toml file).
    pub entry: PathBuf,
    /// Redo every stage even if its inputs did not change.
    pub force: bool,
    /// Top-level directory inside the tar.
    pub dir_name: String,
    /// The last stage to run: `predict` stops before packaging (and skips the validation
    /// eval), as organizers re-running an entry on the hidden test set do.
    pub until: Until,
    /// Predict this file instead of the entry's `[predict] test_file`.
    pub test_file: Option<PathBuf>,
    /// Also evaluate the base and each expert on the validation rows and inspect the task
    /// vectors, for the report (the entry's `[eval] references` turns it on too).
    pub references: bool,
}

/// The last stage a run goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Until {
    /// Merge and predict the test file only.
    Predict,
    /// Every stage: merge, validation eval, predict, package.
    Package,
}

/// What the stages share: the entry, where its outputs go, its data and model inputs.
struct Run<'a> {
    entry: &'a Entry,
    opts: &'a RunOptions,
    work: PathBuf,
    datasets: Vec<PathBuf>,
    test_file: PathBuf,
    device: Device,
    token: Option<String>,
    inputs: Inputs,
    /// Every input model's files (adapters with their bases), labelled for the manifest.
    input_files: Vec<(String, ModelFiles)>,
    /// The entry's `[prompt]`, ready for the merged model (the same for eval and predict).
    prompting: Option<Prompting>,
}

/// Runs every stage of an entry and packages it. Returns the stage reports.
pub fn run(opts: &RunOptions) -> Result<Vec<StageReport>> {
    let total = Instant::now();
    let entry = Entry::load(&opts.entry)?;
    // One run per entry at a time; what a killed run left half-written goes first.
    let _lock = workdir::lock_and_sweep(&entry.dist_dir())?;
    // An entry over the offline demo family builds it first (once; cached by recipe).
    crate::demo_family::ensure_for_entry(&entry)?;
    let run = Run::open(&entry, opts)?;
    println!("entry {} ({})", entry.name, entry.dir.display());
    let mut reports = Vec::new();
    let merged = run.merge(&mut reports)?;
    // Loaded once, when eval or predict first needs it.
    let mut model = None;
    if opts.until == Until::Predict {
        let submission = run.predict(&merged, &mut model, &mut reports)?;
        manifest::print_summary(&reports, total.elapsed().as_secs_f64());
        println!("predictions written to {}", submission.display());
        return Ok(reports);
    }
    let scores = run.eval(&merged, &mut model, &mut reports)?;
    let submission = run.predict(&merged, &mut model, &mut reports)?;
    drop(model);
    if opts.references || entry.file.eval.references {
        run.references(&mut reports)?;
        run.inspect(&mut reports)?;
    }
    let dist = run.package(&submission, &scores, &merged, &mut reports)?;
    manifest::print_summary(&reports, total.elapsed().as_secs_f64());
    println!("package written to {}", dist.display());
    let report = report::write_entry_report(&entry)?;
    println!("report written to {}", report.display());
    Ok(reports)
}

/// The merge stage's outcome: its key and what it remembered.
struct Merged {
    key: String,
    state: stage::StageState,
    dir: PathBuf,
}

impl<'a> Run<'a> {
    fn open(entry: &'a Entry, opts: &'a RunOptions) -> Result<Self> {
        let settings = HubSettings::from_env();
        let token = settings.token.clone();
        let resolver = demo::with_demo_models(Resolver::new(settings).with_base_dir(&entry.dir));
        let device = crate::device::resolve(&entry.file.eval.device)?;
        let work = entry.dist_dir().join("work");
        std::fs::create_dir_all(&work).with_context(|| format!("{}", work.display()))?;
        // Inputs first: a missing data file fails before minutes of merging.
        let datasets = match opts.until {
            Until::Predict => Vec::new(),
            Until::Package => entry.datasets()?,
        };
        let test_file = match &opts.test_file {
            Some(f) => f.clone(),
            None => entry.test_file()?,
        };
        for f in datasets.iter().chain([&test_file]) {
            if !f.is_file() {
                bail!(
                    "{}: data file not found; run `llm-merging fetch-data` to download the official files (or copy them there by hand)",
                    f.display()
                );
            }
        }
        let inputs = Inputs::open(&entry.file.merge, &resolver)?;
        let mut input_files = Vec::new();
        if let Some(b) = &inputs.base {
            input_files.push(("base".into(), b.checkpoint().files().clone()));
        }
        for (i, m) in inputs.models.iter().enumerate() {
            input_files.push((format!("model {}", i + 1), m.checkpoint().files().clone()));
            if let engine::InputModel::Adapted { adapter, .. } = m {
                let files = adapter.files().expect("opened from files");
                input_files.push((format!("adapter {}", i + 1), files.clone()));
            }
        }
        let prompting = match &entry.file.prompt {
            None => None,
            Some(settings) => {
                // The merged model takes the reference model's tokenizer and chat template;
                // every validation and test row is prompted once before anything is merged.
                let data = datasets.iter().chain([&test_file]);
                let rows = data
                    .map(|d| Ok(eval_harness::dataset::load(d)?))
                    .collect::<Result<Vec<_>>>()?;
                let reference = inputs.reference.files();
                let p = prompting::prepare(
                    settings,
                    |p| entry.path(p),
                    &entry.datasets()?,
                    || Ok(reference.model_dir()?),
                    &reference.describe(),
                    &rows.iter().collect::<Vec<_>>(),
                );
                Some(p.with_context(|| entry.file_path.display().to_string())?)
            }
        };
        Ok(Run {
            entry,
            opts,
            work,
            datasets,
            test_file,
            device,
            token,
            inputs,
            input_files,
            prompting,
        })
    }

    fn stage(&self, name: &str) -> Stage {
        Stage::new(&self.work, name, self.opts.force)
    }

    /// The merged model (or adapter) in `work/merged`, with the hashes of its inputs' and its
    /// own weight files for the manifest.
    fn merge(&self, reports: &mut Vec<StageReport>) -> Result<Merged> {
        let cfg = &self.entry.file.merge;
        let dir = self.work.join("merged");
        let mut key = Key::new(&format!("merge;{};", env!("CARGO_PKG_VERSION"))).add(cfg.to_toml());
        for (_, f) in &self.input_files {
            identity::model_identity(f, key.hasher())?;
        }
        let layerwise = crate::regmean_plus::is_layerwise(cfg)?;
        if layerwise {
            // regmean_plus reads calibration rows: their contents are inputs of the merge.
            // (A missing one fails in the merge, with the driver's error.)
            for f in crate::regmean_plus::calibration_files(cfg, &self.inputs)? {
                key = if f.is_file() { key.file(&f)? } else { key };
            }
        }
        let key = key.finish();
        let state = self
            .stage("merge")
            .run_or_reuse(&key, dir.is_dir(), reports, || {
                let mut opts = MergeOptions::new(&dir);
                opts.overwrite = true;
                // Merges stay on the CPU, which was faster than the GPU for every method
                // measured (scripts/gpu-check.sh); `device` is the evaluation's.
                opts.device = Device::Cpu;
                // Adapter-level methods write an adapter (the kit's llama_avg / flant5_avg).
                if layerwise {
                    // Statistics through the merged layers first (regmean_plus), on the
                    // evaluation's device: forward passes, unlike merging, gain from a GPU.
                    let stats = crate::regmean_plus::statistics(
                        cfg,
                        &self.inputs,
                        &self.work,
                        &self.device,
                    )?;
                    engine::merge_to_disk(&stats.cfg, &self.inputs, &opts)?;
                } else {
                    engine::merge_to_disk(cfg, &self.inputs, &opts)?;
                }
                let mut models = Vec::new();
                for (role, f) in &self.input_files {
                    models.push(serde_json::json!({
                        "role": role,
                        "id": f.reference.model,
                        "revision": f.commit,
                        "files": identity::weight_file_hashes(&identity::weights_dir(f)?)?,
                    }));
                }
                Ok(serde_json::json!({
                    "models": models,
                    "merged_files": identity::weight_file_hashes(&dir)?,
                }))
            })?;
        Ok(Merged { key, state, dir })
    }

    /// The `[eval]` settings that change scores, as key material (`references` only adds
    /// stages, so it is left out).
    fn eval_settings_key(&self) -> Result<String> {
        let mut eval = self.entry.file.eval.clone();
        eval.references = false;
        Ok(toml::to_string(&eval)?)
    }

    /// The key of the eval or predict stage over `data`.
    fn eval_key(&self, stage: &str, merge_key: &str, data: &[PathBuf]) -> Result<String> {
        let mut key = Key::new(&format!("{stage};{merge_key};"))
            .add(self.eval_settings_key()?)
            .add(crate::device::name(&self.device));
        if let Some(p) = &self.prompting {
            key = key.add(p.key()?);
        }
        for d in data {
            key = key.file(d)?;
        }
        Ok(key.finish())
    }

    fn eval_options(&self) -> Result<EvalOptions> {
        let eval = &self.entry.file.eval;
        Ok(EvalOptions {
            batch_size: eval.batch_size.max(1),
            max_gen_len: eval.max_gen_len,
            limit: eval.limit,
            scoring: eval.scoring.parse().map_err(anyhow::Error::msg)?,
            progress: true,
            prompt: self.prompting.as_ref().map(|p| p.prompter.clone()),
            stderr_resamples: prompting::stderr_resamples(eval.stderr, self.prompting.is_some()),
        })
    }

    /// The merged model loaded for evaluation (once, for eval and predict together). An
    /// adapter-level merge evaluates as its base plus the merged adapter.
    fn load_model<'m>(
        &self,
        merged: &Path,
        model: &'m mut Option<Box<dyn LanguageModel>>,
    ) -> Result<&'m dyn LanguageModel> {
        if model.is_none() {
            let dtype = eval_harness::resolve_dtype(&self.entry.file.eval.dtype, &self.device)
                .map_err(anyhow::Error::msg)?;
            *model = Some(if merged.join("adapter_config.json").is_file() {
                let base = match &self.inputs.base {
                    Some(b) => b.checkpoint().files().clone(),
                    None => self.inputs.reference.files().clone(),
                };
                eval_harness::load(&base.model_dir()?, Some(merged), dtype, &self.device)?
            } else {
                eval_harness::load(merged, None, dtype, &self.device)?
            });
        }
        Ok(model.as_deref().expect("loaded above"))
    }

    /// Scores on the validation files in `work/eval`; returns the path of its scores.json.
    fn eval(
        &self,
        merged: &Merged,
        model: &mut Option<Box<dyn LanguageModel>>,
        reports: &mut Vec<StageReport>,
    ) -> Result<PathBuf> {
        let out = self.work.join("eval");
        let scores = out.join("scores.json");
        let key = self.eval_key("eval", &merged.key, &self.datasets)?;
        let opts = self.eval_options()?;
        self.stage("eval")
            .run_or_reuse(&key, scores.is_file(), reports, || {
                let data = self
                    .datasets
                    .iter()
                    .map(|d| Ok(eval_harness::dataset::load(d)?))
                    .collect::<Result<Vec<_>>>()?;
                let m = self.load_model(&merged.dir, model)?;
                let results = data
                    .iter()
                    .map(|ds| Ok(eval_harness::evaluate(m, ds, &opts)?))
                    .collect::<Result<Vec<_>>>()?;
                if out.exists() {
                    std::fs::remove_dir_all(&out)?;
                }
                eval_harness::report::write_eval_outputs(&out, &results)?;
                print!("{}", eval_harness::report::score_table(&results));
                Ok(serde_json::Value::Null)
            })?;
        Ok(scores)
    }

    /// Predictions for the test file in `work/predict/submission.csv`.
    fn predict(
        &self,
        merged: &Merged,
        model: &mut Option<Box<dyn LanguageModel>>,
        reports: &mut Vec<StageReport>,
    ) -> Result<PathBuf> {
        let csv = self.work.join("predict").join("submission.csv");
        let key = self.eval_key(
            "predict",
            &merged.key,
            std::slice::from_ref(&self.test_file),
        )?;
        let mut opts = self.eval_options()?;
        // Every test row is predicted, whatever `limit` says about validation.
        opts.limit = None;
        self.stage("predict")
            .run_or_reuse(&key, csv.is_file(), reports, || {
                let ds = eval_harness::dataset::load(&self.test_file)?;
                let r = eval_harness::evaluate(self.load_model(&merged.dir, model)?, &ds, &opts)?;
                std::fs::create_dir_all(csv.parent().expect("has parent"))?;
                eval_harness::report::write_atomic(&csv, |p| {
                    eval_harness::report::write_predictions_csv(p, &r.examples)
                })?;
                Ok(serde_json::Value::Null)
            })?;
        Ok(csv)
    }

    /// `dist/<entry>/`: the validated submission, scores, the tar and the manifest.
    fn package(
        &self,
        submission: &Path,
        scores: &Path,
        merged: &Merged,
        reports: &mut Vec<StageReport>,
    ) -> Result<PathBuf> {
        let t = Instant::now();
        let dist = self.entry.dist_dir();
        // The manifest is written last: a package without one is unfinished, never a mix of
        // this run's files and an older manifest.
        match std::fs::remove_file(dist.join(manifest::FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let rows = package::validate_submission(submission, &self.test_file)?;
        package::write_file(&dist.join("submission.csv"), &std::fs::read(submission)?)?;
        let scores_text = std::fs::read(scores)?;
        package::write_file(&dist.join("scores.json"), &scores_text)?;
        let tar = dist.join(format!("{}.tar", self.entry.name));
        let files = package::source_files(&self.entry.workspace)?;
        reports.push(StageReport {
            stage: "package".into(),
            seconds: t.elapsed().as_secs_f64(),
            reused: false,
        });
        // The manifest goes into the tar too, at the top of the tree: it names the entry that
        // was run, so whoever unpacks the tar (the organizers' `score`) knows what to run.
        // That copy leaves out run-to-run details, so the same tree still gives the same tar.
        let manifest = manifest::render(&manifest::Manifest {
            entry: self.entry,
            device: crate::device::name(&self.device),
            merge_state: &merged.state,
            scores: serde_json::from_slice(&scores_text)?,
            reports,
            submission_rows: rows,
            tar: &tar,
            tar_files: files.len() + 1,
            dir_name: &self.opts.dir_name,
            prompt: match &self.prompting {
                Some(p) => Some(p.manifest(&self.entry.workspace)?),
                None => None,
            },
        })?;
        let in_tar = serde_json::to_string_pretty(&manifest::for_tar(&manifest))?;
        package::write_tar(
            &self.entry.workspace,
            &files,
            &self.opts.dir_name,
            &tar,
            self.token.as_deref(),
            &[(manifest::FILE, in_tar.as_bytes())],
        )?;
        package::write_file(
            &dist.join(manifest::FILE),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )?;
        Ok(dist)
    }
}
