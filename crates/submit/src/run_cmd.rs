//! `llm-merging run --entry DIR` (and `package`, and the no-argument run): merge → validation
//! eval → test predictions → package, each stage timed and reused when its inputs did not
//! change.
//!
//! A stage's key is a hash of everything it depends on: the tool version, the entry's
//! settings, the input models' revisions (a commit for hub models, file sizes and mtimes for
//! local directories), the data files' sha256 and the key of the stage before it. Stage
//! outputs and their keys live in `dist/<entry>/work/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use merge_core::engine::{self, MergeOptions, SIDE_FILES};
use merge_core::source::{HubSettings, ModelFiles, Resolver};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::entry::Entry;
use crate::package;

/// The competition's budget for merge plus evaluation, in seconds.
pub const BUDGET_SECONDS: f64 = 3600.0;

/// Arguments of `llm-merging run` and `llm-merging package`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The entry directory (or its name under submissions/).
    #[arg(long, default_value = "submissions/demo")]
    pub entry: PathBuf,
    /// Redo every stage even if its inputs did not change.
    #[arg(long)]
    pub force: bool,
    /// Top-level directory inside the tar (the competition asked for `LLM-Merging`).
    #[arg(long, default_value = "LLM-Merging")]
    pub dir_name: String,
}

/// What a stage left behind, stored as `work/<stage>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct StageState {
    key: String,
    seconds: f64,
    #[serde(default)]
    extra: serde_json::Value,
}

/// How one stage went this time.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub stage: String,
    /// Seconds it took when it last ran.
    pub seconds: f64,
    /// Whether this run reused it.
    pub reused: bool,
}

fn hex(h: Sha256) -> String {
    format!("{:x}", h.finalize())
}

fn read_state(path: &Path) -> Option<StageState> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn write_state(path: &Path, s: &StageState) -> Result<()> {
    package::write_file(path, serde_json::to_string_pretty(s)?.as_bytes())
}

/// Size and mtime of every file of a local directory: a cheap identity for stage keys.
fn fingerprint_dir(dir: &Path, h: &mut Sha256) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let meta = e.metadata()?;
        if meta.is_file() {
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            h.update(format!(
                "{}:{}:{mtime};",
                e.file_name().to_string_lossy(),
                meta.len()
            ));
        }
    }
    Ok(())
}

/// Identity of one resolved model for stage keys.
fn model_identity(files: &ModelFiles, h: &mut Sha256) -> Result<()> {
    h.update(files.reference.model.as_bytes());
    match (&files.commit, files.local_dir()) {
        (Some(c), _) => h.update(c.as_bytes()),
        (None, Some(dir)) => fingerprint_dir(dir, h)?,
        (None, None) => {}
    }
    Ok(())
}

/// Download what evaluation needs of a model (config, tokenizer, weights) and return its
/// directory.
fn materialize(files: &ModelFiles) -> Result<PathBuf> {
    if let Some(d) = files.local_dir() {
        return Ok(d.to_path_buf());
    }
    let config = files.require("config.json")?;
    for f in SIDE_FILES {
        files.get(f)?;
    }
    merge_core::checkpoint::Checkpoint::open(files)?;
    Ok(config.parent().context("snapshot dir")?.to_path_buf())
}

/// sha256 of every regular file in `dir` whose name matches `keep`.
fn hash_files(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_file() && keep(&name) {
            out.insert(name, package::sha256_file(&e.path())?);
        }
    }
    Ok(out)
}

fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".bin") || name.ends_with(".index.json")
}

/// Run every stage of an entry and package it. Returns the stage reports.
pub fn run(args: &RunArgs) -> Result<Vec<StageReport>> {
    let total = Instant::now();
    let entry = Entry::load(&args.entry)?;
    // An entry over the offline demo family builds it first (once; cached by recipe).
    crate::demo_cmd::ensure_for_entry(&entry)?;
    let settings = HubSettings::from_env();
    let token = settings.token.clone();
    let resolver = demo::with_demo_models(Resolver::new(settings).with_base_dir(&entry.dir));
    let cfg = &entry.file.merge;
    let eval = &entry.file.eval;
    let dev = crate::device::resolve(&eval.device)?;
    let device = crate::device::name(&dev).to_string();
    let dist = entry.dist_dir();
    let work = dist.join("work");
    std::fs::create_dir_all(&work).with_context(|| format!("{}", work.display()))?;

    // Inputs first: a missing data file fails before minutes of merging.
    let datasets = entry.datasets()?;
    let test_file = entry.test_file()?;
    for f in datasets.iter().chain([&test_file]) {
        if !f.is_file() {
            bail!(
                "{}: data file not found; run `llm-merging fetch-data` to download the official files (or copy them there by hand)",
                f.display()
            );
        }
    }

    let mut reports = Vec::new();
    println!("entry {} ({})", entry.name, entry.dir.display());

    // ---- merge ----
    let merged = work.join("merged");
    let merge_state_path = work.join("merge.json");
    let inputs = engine::Inputs::open(cfg, &resolver)?;
    let mut h = Sha256::new();
    h.update(format!("merge;{};", env!("CARGO_PKG_VERSION")));
    h.update(cfg.to_toml().as_bytes());
    let mut input_files: Vec<(String, ModelFiles)> = Vec::new();
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
    for (_, f) in &input_files {
        model_identity(f, &mut h)?;
    }
    let merge_key = hex(h);
    let merge_state = match read_state(&merge_state_path) {
        Some(s) if !args.force && s.key == merge_key && merged.is_dir() => {
            reports.push(StageReport {
                stage: "merge".into(),
                seconds: s.seconds,
                reused: true,
            });
            s
        }
        _ => {
            let t = Instant::now();
            let mut opts = MergeOptions::new(&merged);
            opts.overwrite = true;
            // Merges stay on the CPU, which was faster than the GPU for every method measured
            // (scripts/gpu-check.sh); `device` is the evaluation's.
            opts.device = engine::Device::Cpu;
            // Adapter-level methods write an adapter (the kit's llama_avg / flant5_avg).
            engine::merge_to_disk(cfg, &inputs, &opts)?;
            let mut models = Vec::new();
            for (role, f) in &input_files {
                let dir = materialize_weights_dir(f)?;
                models.push(serde_json::json!({
                    "role": role,
                    "id": f.reference.model,
                    "revision": f.commit,
                    "files": hash_files(&dir, is_weight_file)?,
                }));
            }
            let s = StageState {
                key: merge_key.clone(),
                seconds: t.elapsed().as_secs_f64(),
                extra: serde_json::json!({
                    "models": models,
                    "merged_files": hash_files(&merged, is_weight_file)?,
                }),
            };
            write_state(&merge_state_path, &s)?;
            reports.push(StageReport {
                stage: "merge".into(),
                seconds: s.seconds,
                reused: false,
            });
            s
        }
    };

    // ---- eval and predict: one model load for both ----
    let mut h = Sha256::new();
    h.update(format!("eval;{merge_key};"));
    h.update(toml::to_string(eval)?.as_bytes());
    h.update(device.as_bytes());
    for d in &datasets {
        h.update(package::sha256_file(d)?.as_bytes());
    }
    let eval_key = hex(h);
    let mut h = Sha256::new();
    h.update(format!("predict;{merge_key};"));
    h.update(toml::to_string(eval)?.as_bytes());
    h.update(device.as_bytes());
    h.update(package::sha256_file(&test_file)?.as_bytes());
    let predict_key = hex(h);

    let eval_dir = work.join("eval");
    let eval_state_path = work.join("eval.json");
    let predict_csv = work.join("predict").join("submission.csv");
    let predict_state_path = work.join("predict.json");
    let eval_cached = read_state(&eval_state_path)
        .filter(|s| !args.force && s.key == eval_key && eval_dir.join("scores.json").is_file());
    let predict_cached = read_state(&predict_state_path)
        .filter(|s| !args.force && s.key == predict_key && predict_csv.is_file());

    let mut model = None;
    let load_model = || -> Result<eval_harness::runner::AnyModel> {
        let dtype =
            eval_harness::runner::resolve_dtype(&eval.dtype, &dev).map_err(anyhow::Error::msg)?;
        // An adapter-level merge evaluates as its base plus the merged adapter.
        if merged.join("adapter_config.json").is_file() {
            let base_files = match &inputs.base {
                Some(b) => b.checkpoint().files().clone(),
                None => inputs.reference.files().clone(),
            };
            let base_dir = materialize(&base_files)?;
            Ok(eval_harness::runner::AnyModel::load(
                &base_dir,
                Some(&merged),
                dtype,
                &dev,
            )?)
        } else {
            Ok(eval_harness::runner::AnyModel::load(
                &merged, None, dtype, &dev,
            )?)
        }
    };
    let opts = eval_harness::runner::EvalOptions {
        batch_size: eval.batch_size.max(1),
        max_gen_len: eval.max_gen_len,
        limit: eval.limit,
        scoring: eval.scoring.parse().map_err(anyhow::Error::msg)?,
        progress: true,
    };

    match eval_cached {
        Some(s) => {
            reports.push(StageReport {
                stage: "eval".into(),
                seconds: s.seconds,
                reused: true,
            });
        }
        None => {
            let t = Instant::now();
            let mut loaded = Vec::new();
            for d in &datasets {
                loaded.push(eval_harness::dataset::load(d)?);
            }
            let m = match model.take() {
                Some(m) => m,
                None => load_model()?,
            };
            let mut results = Vec::new();
            for ds in &loaded {
                results.push(m.evaluate(ds, &opts)?);
            }
            model = Some(m);
            if eval_dir.exists() {
                std::fs::remove_dir_all(&eval_dir)?;
            }
            eval_harness::report::write_eval_outputs(&eval_dir, &results)?;
            print!("{}", eval_harness::report::score_table(&results));
            let s = StageState {
                key: eval_key,
                seconds: t.elapsed().as_secs_f64(),
                extra: serde_json::Value::Null,
            };
            write_state(&eval_state_path, &s)?;
            reports.push(StageReport {
                stage: "eval".into(),
                seconds: s.seconds,
                reused: false,
            });
        }
    }

    match predict_cached {
        Some(s) => reports.push(StageReport {
            stage: "predict".into(),
            seconds: s.seconds,
            reused: true,
        }),
        None => {
            let t = Instant::now();
            let ds = eval_harness::dataset::load(&test_file)?;
            let m = match model.take() {
                Some(m) => m,
                None => load_model()?,
            };
            let mut test_opts = opts.clone();
            test_opts.limit = None;
            let r = m.evaluate(&ds, &test_opts)?;
            std::fs::create_dir_all(predict_csv.parent().expect("has parent"))?;
            eval_harness::report::write_atomic(&predict_csv, |p| {
                eval_harness::report::write_predictions_csv(p, &r.examples)
            })?;
            let s = StageState {
                key: predict_key,
                seconds: t.elapsed().as_secs_f64(),
                extra: serde_json::Value::Null,
            };
            write_state(&predict_state_path, &s)?;
            reports.push(StageReport {
                stage: "predict".into(),
                seconds: s.seconds,
                reused: false,
            });
        }
    }

    // ---- package ----
    let t = Instant::now();
    let n = package::validate_submission(&predict_csv, &test_file)?;
    package::write_file(&dist.join("submission.csv"), &std::fs::read(&predict_csv)?)?;
    let scores_text = std::fs::read(eval_dir.join("scores.json"))?;
    package::write_file(&dist.join("scores.json"), &scores_text)?;
    let tar_path = dist.join(format!("{}.tar", entry.name));
    let packed = package::write_tar(
        &entry.workspace,
        &args.dir_name,
        &tar_path,
        token.as_deref(),
    )?;
    reports.push(StageReport {
        stage: "package".into(),
        seconds: t.elapsed().as_secs_f64(),
        reused: false,
    });
    let manifest = serde_json::json!({
        "entry": entry.name,
        "entry_toml": entry.text,
        "tool": {
            "name": "llm-merging-kit",
            "version": env!("CARGO_PKG_VERSION"),
            "git_commit": package::git_commit(&entry.workspace),
        },
        "merge": {
            "method": cfg.method,
            "dtype": cfg.dtype.map(|d| d.torch_name()),
            "seed": cfg.seed,
        },
        "models": merge_state.extra["models"],
        "merged_weights": merge_state.extra["merged_files"],
        "eval": {
            "device": device,
            "dtype": eval.dtype,
            "scoring": eval.scoring,
            "max_gen_len": eval.max_gen_len,
            "batch_size": eval.batch_size,
        },
        "scores": serde_json::from_slice::<serde_json::Value>(&scores_text)?,
        "stages": reports,
        "submission": { "rows": n, "sha256": package::sha256_file(&dist.join("submission.csv"))? },
        "tar": { "file": tar_path.file_name().map(|f| f.to_string_lossy().into_owned()), "files": packed, "top_level": args.dir_name },
        "command_line": std::env::args().collect::<Vec<_>>(),
    });
    package::write_file(
        &dist.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;

    println!("\n{:<10} {:>10}  status", "stage", "seconds");
    let mut budget = 0.0;
    for r in &reports {
        println!(
            "{:<10} {:>10.1}  {}",
            r.stage,
            r.seconds,
            if r.reused { "reused" } else { "ran" }
        );
        if r.stage != "package" {
            budget += r.seconds;
        }
    }
    println!(
        "merge + eval + predict: {:.1}s{}",
        budget,
        if budget > BUDGET_SECONDS {
            " — OVER the competition's 1-hour budget"
        } else {
            " (within the 1-hour budget)"
        }
    );
    println!(
        "wall time of this run: {:.1}s",
        total.elapsed().as_secs_f64()
    );
    println!("package written to {}", dist.display());
    Ok(reports)
}

/// The local directory of a model's weight files (downloaded already by the merge).
fn materialize_weights_dir(files: &ModelFiles) -> Result<PathBuf> {
    if let Some(d) = files.local_dir() {
        return Ok(d.to_path_buf());
    }
    for name in [
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
        "adapter_model.safetensors",
        "adapter_model.bin",
    ] {
        if let Some(p) = files.get(name)? {
            return Ok(p.parent().context("snapshot dir")?.to_path_buf());
        }
    }
    bail!("{}: no weight files", files.describe())
}
