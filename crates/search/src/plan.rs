//! A search, checked and keyed before any model is loaded: the space (against the entry's
//! merge and the registry), the budget, the rows (against the validation files), the
//! objective (against their names and kinds), and the keys that make the store's records
//! reusable: one per data file (its bytes and the evaluation settings) and one for the search.

use eval_harness::dataset::Dataset;
use merge_core::MergeConfig;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result, SpecError};
use crate::objective::Objective;
use crate::rows::{DatasetSize, RowPlan};
use crate::space::Space;
use crate::spec::{Budget, SearchSpec};

/// Bumped when a change makes the same inputs propose other trials, so stored trials of the
/// old algorithm are not replayed as this one's.
const ALGORITHM: &str = "search-1";

/// A checked search.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The `[search]` table.
    pub spec: SearchSpec,
    /// Its budget.
    pub budget: Budget,
    /// The space.
    pub space: Space,
    /// Held-out and tuning rows, the rungs.
    pub rows: RowPlan,
    /// The objective.
    pub objective: Objective,
    /// The validation files, loaded.
    pub datasets: Vec<Dataset>,
    /// Per dataset: the key of its rows' scores in the store.
    pub data_keys: Vec<String>,
    /// The search's key in the store.
    pub key: String,
}

/// The key of a recipe: sha256 of its canonical TOML.
pub fn recipe_key(cfg: &MergeConfig) -> String {
    hex(Sha256::digest(cfg.to_toml().as_bytes()).as_slice())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Plan {
    /// Checks `spec` against the entry's `recipe` and its validation `datasets` (rows with
    /// targets). `eval_identity` names the evaluation settings (scoring, generation length,
    /// dtype, device): scores stored under other settings are not reused. `full_scoring`:
    /// whether `accuracy_norm` is computed.
    pub fn new(
        spec: &SearchSpec,
        recipe: &MergeConfig,
        datasets: Vec<Dataset>,
        eval_identity: &str,
        full_scoring: bool,
    ) -> Result<Plan> {
        let budget = spec.budget()?;
        let space = Space::new(spec, recipe)?;
        for d in &datasets {
            if let Some(e) = d.examples.iter().find(|e| e.target.is_none()) {
                return Err(SpecError::Invalid(format!(
                    "{}:{}: row `{}` has no target; a search scores validation files, whose rows all have one",
                    d.path.display(),
                    e.line,
                    e.id
                ))
                .into());
            }
        }
        let sizes: Vec<DatasetSize> = datasets
            .iter()
            .map(|d| DatasetSize {
                name: d.name.clone(),
                rows: d.examples.len(),
            })
            .collect();
        let rows = RowPlan::new(&spec.rows, spec.seed, &sizes)?;
        let objective = Objective::new(&spec.objective, &datasets, full_scoring)?;
        let mut data_keys = Vec::new();
        for d in &datasets {
            let bytes = std::fs::read(&d.path).map_err(|e| Error::io(&d.path, e))?;
            let mut h = Sha256::new();
            h.update(&bytes);
            h.update(eval_identity.as_bytes());
            data_keys.push(hex(h.finalize().as_slice()));
        }
        let mut h = Sha256::new();
        h.update(ALGORITHM.as_bytes());
        h.update(recipe.to_toml().as_bytes());
        h.update(spec.identity().as_bytes());
        for k in &data_keys {
            h.update(k.as_bytes());
        }
        Ok(Plan {
            spec: spec.clone(),
            budget,
            space,
            rows,
            objective,
            datasets,
            data_keys,
            key: hex(h.finalize().as_slice()),
        })
    }
}
