//! The material of an entry's report beyond its own scores, on request (`run --references`,
//! or `references = true` under `[eval]`): the base and each expert evaluated alone on the
//! same validation rows, a stage each (`ref-base`, `ref-expert-1`, …), and the task-vector
//! diagnostics (`inspect`). Each is reused while its model, settings and data are unchanged;
//! none counts against the competition's budget.

use anyhow::Result;
use merge_core::engine::InputModel;
use serde::{Deserialize, Serialize};

use super::identity;
use super::stage::{Key, StageReport};
use super::Run;

/// Where an entry's task-vector diagnostics go (`inspect --entry` and the `inspect` stage),
/// and where the report reads them.
pub fn inspect_dir(entry: &crate::entry::Entry) -> std::path::PathBuf {
    entry.dist_dir().join("inspect")
}

/// `work/references.json`: the reference rows the last run evaluated.
pub const FILE: &str = "references.json";

/// One reference row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reference {
    /// Its name in the report ("base (demo:base)", "expert 1 (demo:largest)").
    pub name: String,
    /// `base` or `expert`.
    pub role: String,
    /// Its evaluation outputs, relative to `work/`.
    pub dir: String,
}

impl Run<'_> {
    /// The base (when the config names one) and each expert, as the merge reads them.
    fn reference_models(&self) -> Vec<(String, String, String, &InputModel)> {
        let cfg = &self.entry.file.merge;
        let mut out = Vec::new();
        if let (Some(b), Some(name)) = (&self.inputs.base, &cfg.base_model) {
            out.push(("base".into(), "base".into(), format!("base ({name})"), b));
        }
        let base_ref = cfg.base_ref();
        let refs = cfg.model_refs();
        let mut n = 0;
        for (m, &entry) in self.inputs.models.iter().zip(&self.inputs.model_entries) {
            if base_ref.is_some() && base_ref.as_ref() == refs.get(entry) {
                continue;
            }
            n += 1;
            let name = format!("expert {n} ({})", cfg.models[entry].model);
            out.push((format!("expert-{n}"), "expert".into(), name, m));
        }
        out
    }

    /// Evaluates every reference model on the validation rows into `work/references/<slug>/`.
    pub(super) fn references(&self, reports: &mut Vec<StageReport>) -> Result<Vec<Reference>> {
        let opts = self.eval_options()?;
        let mut list = Vec::new();
        for (slug, role, name, model) in self.reference_models() {
            let dir = self.work.join("references").join(&slug);
            let mut key = Key::new(&format!("reference;{};", env!("CARGO_PKG_VERSION")))
                .add(self.eval_settings_key()?)
                .add(crate::device::name(&self.device));
            // The references are prompted as the merge is (the same rows, the same prompter).
            if let Some(p) = &self.prompting {
                key = key.add(p.key()?);
            }
            identity::model_identity(model.checkpoint().files(), key.hasher())?;
            if let InputModel::Adapted { adapter, .. } = model {
                identity::model_identity(
                    adapter.files().expect("opened from files"),
                    key.hasher(),
                )?;
            }
            for d in &self.datasets {
                key = key.file(d)?;
            }
            let key = key.finish();
            let present = dir.join("scores.json").is_file();
            self.stage(&format!("ref-{slug}"))
                .run_or_reuse(&key, present, reports, || {
                    let dtype =
                        eval_harness::resolve_dtype(&self.entry.file.eval.dtype, &self.device)
                            .map_err(anyhow::Error::msg)?;
                    let m = eval_harness::load_input(model, dtype, &self.device)?;
                    let results = self
                        .datasets
                        .iter()
                        .map(|d| {
                            let ds = eval_harness::dataset::load(d)?;
                            Ok(eval_harness::evaluate(&*m, &ds, &opts)?)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    if dir.exists() {
                        std::fs::remove_dir_all(&dir)?;
                    }
                    eval_harness::report::write_eval_outputs(&dir, &results)?;
                    println!("reference {name}:");
                    print!("{}", eval_harness::report::score_table(&results));
                    Ok(serde_json::json!({ "name": name }))
                })?;
            list.push(Reference {
                name,
                role,
                dir: format!("references/{slug}"),
            });
        }
        crate::package::write_file(
            &self.work.join(FILE),
            serde_json::to_string_pretty(&list)?.as_bytes(),
        )?;
        Ok(list)
    }

    /// The task-vector diagnostics of the entry's merge into `dist/<entry>/inspect/`. A merge
    /// without task vectors (no base) is noted and skipped.
    pub(super) fn inspect(&self, reports: &mut Vec<StageReport>) -> Result<()> {
        let cfg = &self.entry.file.merge;
        let out = inspect_dir(self.entry);
        let mut key =
            Key::new(&format!("inspect;{};", env!("CARGO_PKG_VERSION"))).add(cfg.to_toml());
        for (_, f) in &self.input_files {
            identity::model_identity(f, key.hasher())?;
        }
        let key = key.finish();
        let present = out.join(inspect::JSON).is_file();
        self.stage("inspect")
            .run_or_reuse(&key, present, reports, || {
                match inspect::inspect_inputs(cfg, &self.inputs, true) {
                    Ok(x) => {
                        print!("{}", x.summary());
                        x.write(&out)?;
                    }
                    Err(inspect::Error::NoBase(why)) => println!("inspect skipped: {why}"),
                    Err(e) => return Err(e.into()),
                }
                Ok(serde_json::Value::Null)
            })?;
        Ok(())
    }
}
