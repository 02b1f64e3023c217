//! The base and the experts whose task vectors are inspected, taken from a merge's opened
//! inputs, and the one check that they share an architecture.
//!
//! The base is the config's `base_model`; without one, adapters over a single base are
//! inspected against that base (an adapter's task vector is its ΔW). Full experts without a
//! base have no task vector, which is an error that says so.

use std::sync::Arc;

use merge_core::adapter::Adapter;
use merge_core::checkpoint::Checkpoint;
use merge_core::engine::{InputModel, Inputs};
use merge_core::params::natural_key;
use merge_core::MergeConfig;

use crate::error::{Error, Result};

/// What an expert is stored as.
#[derive(Clone)]
pub enum ExpertModel {
    /// A full checkpoint: its task vector is expert − base, tensor by tensor.
    Full(Arc<Checkpoint>),
    /// A PEFT LoRA adapter over the base: its task vector is ΔW, computed from the factors.
    Lora(Arc<Adapter>),
}

/// One expert.
#[derive(Clone)]
pub struct Expert {
    /// For messages and reports.
    pub label: String,
    /// Its index in the config's `[[merge.models]]`.
    pub entry: usize,
    /// How it is stored.
    pub model: ExpertModel,
}

impl Expert {
    /// Whether it is a LoRA adapter.
    pub fn is_lora(&self) -> bool {
        matches!(self.model, ExpertModel::Lora(_))
    }
}

/// The base and the experts.
pub struct Experts {
    /// The model every task vector is measured from.
    pub base: Arc<Checkpoint>,
    /// The experts, in config order (entries naming the base left out).
    pub list: Vec<Expert>,
}

impl Experts {
    /// The base and experts of `cfg`'s opened `inputs`.
    pub fn from_inputs(cfg: &MergeConfig, inputs: &Inputs) -> Result<Self> {
        let base_ref = cfg.base_ref();
        let refs = cfg.model_refs();
        let mut list = Vec::new();
        let mut adapter_base: Option<Arc<Checkpoint>> = None;
        for (model, &entry) in inputs.models.iter().zip(&inputs.model_entries) {
            // An entry naming the base is the base (methods without a base keep it as a model).
            if base_ref.is_some() && base_ref.as_ref() == refs.get(entry) {
                continue;
            }
            let label = model.label();
            let model = match model {
                InputModel::Full(c) => ExpertModel::Full(c.clone()),
                InputModel::Adapted { base, adapter } => {
                    match &adapter_base {
                        Some(b) if !same_checkpoint(b, base) => {
                            return Err(Error::NoBase(format!(
                                "the adapters are over different bases ({} and {}) and the \
                                 config names no base_model; task vectors are measured from one \
                                 base",
                                b.label, base.label
                            )))
                        }
                        _ => adapter_base = Some(base.clone()),
                    }
                    ExpertModel::Lora(adapter.clone())
                }
            };
            list.push(Expert {
                label,
                entry,
                model,
            });
        }
        let base = match (&inputs.base, adapter_base) {
            (Some(b), _) => b.checkpoint().clone(),
            (None, Some(b)) if list.iter().all(Expert::is_lora) => b,
            _ => {
                return Err(Error::NoBase(
                    "the merge config names no base_model, so the experts have no task vector \
                     (expert − base): set `base_model` to the model they were fine-tuned from"
                        .into(),
                ))
            }
        };
        if list.is_empty() {
            return Err(Error::NoBase(
                "the merge config lists no expert besides the base".into(),
            ));
        }
        Ok(Experts { base, list })
    }

    /// The tensors to inspect (the base's floating-point tensors, layers in numeric order),
    /// after checking that every full expert has exactly the base's tensors and shapes: the
    /// first tensor that is missing, extra or shaped differently is the error. (Adapters were
    /// checked against the base when they were opened.)
    pub fn tensors(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self.base.names().map(String::from).collect();
        for e in &self.list {
            if let ExpertModel::Full(c) = &e.model {
                names.extend(
                    c.names()
                        .filter(|n| !self.base.contains(n))
                        .map(String::from),
                );
            }
        }
        names.sort_by_cached_key(|n| natural_key(n));
        names.dedup();
        for name in &names {
            for (i, e) in self.list.iter().enumerate() {
                let ExpertModel::Full(c) = &e.model else {
                    continue;
                };
                let detail = match (self.base.info(name), c.info(name)) {
                    (Some(b), Some(x)) if b.shape == x.shape => continue,
                    (Some(b), Some(x)) => format!(
                        "has shape {:?} in the expert and {:?} in the base",
                        x.shape, b.shape
                    ),
                    (Some(_), None) => "is missing from the expert".to_string(),
                    (None, _) => "is in the expert but not in the base".to_string(),
                };
                return Err(Error::Mismatch {
                    expert: i + 1,
                    label: e.label.clone(),
                    base: self.base.label.clone(),
                    tensor: name.clone(),
                    detail,
                });
            }
        }
        names.retain(|n| self.base.info(n).is_some_and(|i| i.dtype.is_float()));
        Ok(names)
    }
}

/// Whether two opened checkpoints are the same files (adapters naming their base by other
/// relative paths open it twice).
fn same_checkpoint(a: &Checkpoint, b: &Checkpoint) -> bool {
    let files = |c: &Checkpoint| -> Vec<std::path::PathBuf> {
        c.weight_files()
            .into_iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
            .collect()
    };
    std::ptr::eq(a, b) || a.label == b.label || files(a) == files(b)
}
