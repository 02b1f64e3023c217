//! The demo table: base, each expert and reference merges, scored on every skill's validation
//! CSV with the eval harness. Merged models and scores are cached inside the demo directory
//! (which a recipe change replaces whole), keyed by the merge config and eval settings.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use eval_harness::{EvalOptions, LanguageModel, Scoring};
use merge_core::engine::{self, InputModel, Inputs, MergeOptions};
use merge_core::source::Resolver;
use merge_core::MergeConfig;
use sha2::{Digest, Sha256};

use crate::tasks::Skill;
use crate::{BASE, EXPERT_LARGEST, EXPERT_REVERSE, LORA_OPPOSITE};

/// Evaluation settings of the demo (the demo entry uses the same).
pub fn eval_options() -> EvalOptions {
    EvalOptions {
        batch_size: 16,
        // Four words and EOS are five tokens; a little slack shows run-on answers as errors.
        max_gen_len: Some(8),
        limit: None,
        // Every choice token scored: the kit's rule leaves only log p(EOS | choice) for
        // one-token answers, which measures how an answer ends, not whether it is right.
        scoring: Scoring::Full,
        progress: false,
        ..EvalOptions::default()
    }
}

/// The merge parameters of the reference rows, as merge config TOML bodies (after
/// `[merge]`'s `method` and `base_model`, which are filled in): the classic methods with the
/// entry's settings, then the newer data-free ones at their defaults. Methods that need what
/// the demo family lacks are left out: exactly one or two models (`slerp`, `nuslerp`,
/// `nearswap`, `arcee_fusion`, `passthrough`), the base as one more input (`karcher`,
/// `geometric_median` would average the base in), calibration statistics (`regmean`).
pub const REFERENCE_MERGES: &[(&str, &str)] = &[
    ("ties", "[merge.parameters]\ndensity = 0.5\nweight = 1.0\n"),
    ("task_arithmetic", "[merge.parameters]\nweight = 1.0\n"),
    ("linear", "[merge.parameters]\nweight = 1.0\n"),
    ("sce", ""),
    ("multislerp", "[merge.parameters]\nweight = 1.0\n"),
    ("ram", ""),
    ("ramplus_tl", ""),
    ("tsv", ""),
    ("iso_c", ""),
    ("iso_cts", ""),
];

/// A merge config over the demo family in `dir` with local paths. `base_model` is named for
/// every method: task-vector methods subtract it, and for the others (`linear`) it is only the
/// base of the LoRA expert, not an input of the merge.
pub fn merge_config_toml(dir: &Path, method: &str, params: &str) -> String {
    let p = |n: &str| dir.join(n).display().to_string().replace('\\', "/");
    let mut s = format!(
        "[merge]\nmethod = \"{method}\"\nbase_model = \"{}\"\ndtype = \"float32\"\n{params}",
        p(BASE)
    );
    for m in [EXPERT_LARGEST, EXPERT_REVERSE, LORA_OPPOSITE] {
        s.push_str(&format!("[[merge.models]]\nmodel = \"{}\"\n", p(m)));
    }
    s
}

/// One table row.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    /// Model name.
    pub name: String,
    /// Score per skill, in [`Skill::ALL`] order.
    pub scores: Vec<f64>,
}

impl Row {
    /// Mean of the skill scores.
    pub fn average(&self) -> f64 {
        self.scores.iter().sum::<f64>() / self.scores.len().max(1) as f64
    }
}

/// The comparison.
#[derive(Debug, Clone)]
pub struct Table {
    /// Rows in display order.
    pub rows: Vec<Row>,
}

impl Table {
    /// The row named `name`.
    pub fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// Plain-text rendering: one column per skill (its metric in the header) and the average.
    pub fn render(&self) -> String {
        let mut s = format!("{:<22}", "model");
        for k in Skill::ALL {
            s.push_str(&format!(
                " {:>18}",
                format!("{} ({})", k.name(), k.metric())
            ));
        }
        s.push_str(&format!(" {:>8}\n", "average"));
        for r in &self.rows {
            s.push_str(&format!("{:<22}", r.name));
            for v in &r.scores {
                s.push_str(&format!(" {:>18.3}", v));
            }
            s.push_str(&format!(" {:>8.3}\n", r.average()));
        }
        s
    }
}

/// Scores a loaded model on every skill's validation CSV of `dir`.
pub fn score_model(dir: &Path, m: &dyn LanguageModel) -> Result<Vec<f64>> {
    let opts = eval_options();
    let mut out = Vec::new();
    for k in Skill::ALL {
        let path = crate::validation_csv(dir, k);
        let ds = eval_harness::dataset::load(&path)?;
        let r = eval_harness::evaluate(m, &ds, &opts)?;
        out.push(
            *r.scores
                .get(k.metric())
                .with_context(|| format!("{}: no {} score", path.display(), k.metric()))?,
        );
    }
    Ok(out)
}

fn cached_scores(
    cache: &Path,
    name: &str,
    key: &str,
    f: impl FnOnce() -> Result<Vec<f64>>,
) -> Result<Row> {
    let file = cache.join(format!("{name}.json"));
    if let Ok(text) = std::fs::read_to_string(&file) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if v["key"] == key {
                if let Ok(row) = serde_json::from_value::<Row>(v["row"].clone()) {
                    return Ok(row);
                }
            }
        }
    }
    let row = Row {
        name: name.to_string(),
        scores: f()?,
    };
    std::fs::create_dir_all(cache)?;
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&serde_json::json!({ "key": key, "row": row }))?,
    )?;
    Ok(row)
}

fn key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.update(format!("{:?}", eval_options()).as_bytes());
    format!("{:x}", h.finalize())
}

/// Merges the family in `dir` with a merge config (TOML text) into `out`.
pub fn run_merge(toml: &str, out: &Path) -> Result<()> {
    let cfg = MergeConfig::from_toml_str(toml, "demo merge")?;
    let mut opts = MergeOptions::new(out);
    opts.overwrite = true;
    engine::run(&cfg, &Resolver::from_env(), &opts)?;
    Ok(())
}

/// The base and each expert as the demo's merges read them (the LoRA expert on its base),
/// named by directory: the table's reference rows, the same models `run --references` scores.
fn reference_models(dir: &Path) -> Result<Vec<(&'static str, InputModel)>> {
    let toml = merge_config_toml(dir, "task_arithmetic", "[merge.parameters]\nweight = 1.0\n");
    let cfg = MergeConfig::from_toml_str(&toml, "demo references")?;
    let inputs = Inputs::open(&cfg, &Resolver::from_env())?;
    let base = inputs
        .base
        .clone()
        .context("the demo config names its base")?;
    Ok(std::iter::once((BASE, base))
        .chain(
            [EXPERT_LARGEST, EXPERT_REVERSE, LORA_OPPOSITE]
                .into_iter()
                .zip(inputs.models),
        )
        .collect())
}

/// The demo table for the family in `dir`: base, the three experts, and the reference merges
/// ([`REFERENCE_MERGES`]). Cached per row in `dir/compare/`.
pub fn compare(dir: &Path) -> Result<Table> {
    let cache = dir.join("compare");
    let load = |model: &Path| -> Result<Box<dyn LanguageModel>> {
        Ok(eval_harness::load(model, None, DType::F32, &Device::Cpu)?)
    };
    let mut rows = Vec::new();
    for (name, model) in reference_models(dir)? {
        let k = key(&["model", name]);
        rows.push(cached_scores(&cache, name, &k, || {
            score_model(
                dir,
                &*eval_harness::load_input(&model, DType::F32, &Device::Cpu)?,
            )
        })?);
    }
    for &(method, params) in REFERENCE_MERGES {
        let toml = merge_config_toml(dir, method, params);
        let name = format!("merge: {method}");
        let k = key(&["merge", &toml]);
        rows.push(cached_scores(
            &cache,
            &format!("merge-{method}"),
            &k,
            || {
                let out = cache.join(format!("merged-{method}"));
                run_merge(&toml, &out)?;
                score_model(dir, &*load(&out)?)
            },
        )?);
        rows.last_mut().expect("pushed").name = name;
    }
    Ok(Table { rows })
}
